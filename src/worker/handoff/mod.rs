//! Live hand-off: at a reload, the old worker gives each open plain-TCP connection to its
//! replacement instead of closing it (docs/architecture.md, "Live hand-off"). The descriptor
//! moves over a SOCK_SEQPACKET socket the master made for the pair (`crate::handoff`), with
//! the connection's state (`snapshot.rs`); the client sees nothing.
//!
//! The old worker's side is `send.rs` (rounds: freeze, cut, snapshot, prepare, commit or roll
//! back), the new worker's is `receive.rs` (validate and register without I/O, then serve on
//! commit). Exactly-once across the switch comes from the group offsets: the old worker says,
//! per membership, the last offset it queued (the cut), and the new one delivers only what
//! follows, from the history first.

mod receive;
mod send;
mod snapshot;

pub use receive::Receiving;
pub use send::Sending;

/// The hand-off socket's event-loop token (after the worker's fixed tokens, before the
/// connections').
pub const TOKEN: mio::Token = mio::Token(5);

/// Environment switch for tests: the state format the old worker offers
/// (docs/operations.md, "Live hand-off").
pub const WRITE_FORMAT_ENV: &str = "GROUPCAST_HANDOFF_WRITE_FORMAT";
/// Environment switch for tests: make the new worker fail while it prepares.
pub const FAULT_ENV: &str = "GROUPCAST_TEST_HANDOFF_FAULT";
