//! The status link between the master and each child, and what the CLI reads from the master.
//!
//! - `handoff`: what a child inherits across exec (descriptor numbers, the config in the
//!   environment).
//! - `messages`: the typed `Request`/`Reply` lines of the link, both directions.
//! - `link`: the child's end (`ChildLink`, in the child's event loop) and the master's end
//!   (`MasterLink`).
//! - `report`: the figures `status` and `connections` show.
//!
//! Figures therefore always come live from the running processes, never from a file. This
//! module depends on nothing role-specific (not on channel/, worker/ or master/).

pub mod handoff;
pub mod histogram;
pub mod link;
pub mod messages;
pub mod report;

// The names the worker, the channel server, the master and the CLI import from here.
pub use handoff::{child_config, encode_child_config, CHILD_LINK_FD, CHILD_LISTENER_FD, CONFIG_ENV};
pub use histogram::Histogram;
pub use link::{ChildLink, MasterLink};
pub use messages::{Reply, Request};
pub use report::{
    binary_identity, AuthReport, ConnectionInfo, ConnectionList, HandOffOutcome, HandOffReport, ProcessStats,
    ReloadOutcome, StatusReport, Totals,
};
