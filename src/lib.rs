//! groupcast: a pre-forking, multi-process WebSocket group-push daemon.
//!
//! One master supervises a channel server (pub/sub broker) and N workers; clients join groups
//! on any worker and a message sent to a group reaches every member on every worker.
//! See docs/architecture.md.
#![deny(unsafe_code)]

/// Operator commands run from the shell: stop, status (talk to a running master).
pub mod admin;
/// The HTTP API process: publish, group counts, connections, metrics, health (docs/api.md).
pub mod api;
/// Client access control: JWT tokens, per-group tokens, `[[groups]]` rules (docs/security.md).
pub mod auth;
/// The channel: broker process, worker-side client, wire format.
pub mod channel;
/// Command-line parsing.
pub mod cli;
/// Configuration: defaults, TOML file, flags.
pub mod config;
/// The master <-> child status link.
pub mod control;
/// The hand-off socket protocol: an old worker gives its connections to its replacement at reload.
pub mod handoff;
/// The `log` backend: stderr or syslog, role and pid on every line.
pub mod logging;
/// The master: daemonizing, pid file, binding, spawning and supervising children.
pub mod master;
/// Connections per client address, counted across workers in shared memory.
pub mod per_ip;
/// Client commands (JSON) and their replies.
pub mod protocol;
/// `groupcast publish`: push messages to a group through the channel.
pub mod publish;
/// Unsent bytes of a non-blocking socket, written from an offset (no quadratic draining).
pub mod sendbuf;
/// The only unsafe code: inherited and received descriptors, the fork/exec hook, the shared counters' mapping.
pub mod sys;
/// `wss://`: the certificate and key (master), rustls over a client socket (worker).
pub mod tls;
/// A worker process: event loop, connections, local groups.
pub mod worker;
/// WebSocket handshake and frames.
pub mod ws;
