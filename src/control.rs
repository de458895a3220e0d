//! The status link between the master and each child: a Unix socket pair created at spawn
//! (the child's end is descriptor 4). Newline-delimited text: the child first writes `ready`;
//! the master sends `stats` (answered by one JSON `ProcessStats` line), `connections`
//! (answered by one JSON `ConnectionList` line) and `shutdown CODE DRAIN_MS` (no answer: the
//! child closes its clients with CODE, waits up to DRAIN_MS for them, and exits).
//! Figures therefore always come live from the running processes, never from a file.

use std::io::{self, Read};

use mio::net::UnixStream;
use mio::{Interest, Registry, Token};
use serde::{Deserialize, Serialize};

/// Descriptor number at which a child finds its end of the status link.
pub const CHILD_LINK_FD: i32 = 4;
/// Descriptor number at which a child finds the listener the master bound for it.
pub const CHILD_LISTENER_FD: i32 = 3;
/// Environment variable carrying the resolved config (JSON) from master to child.
pub const CONFIG_ENV: &str = "GROUPCAST_CHILD_CONFIG";

/// Live figures of one process, as `status` shows them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessStats {
    /// `master`, `channel` or `worker`.
    pub role: String,
    /// Worker index 0..N-1, stable across respawns.
    pub index: Option<usize>,
    pub pid: u32,
    /// `running`, `starting` (spawned, not answering yet), `down` (waiting to be restarted)
    /// or `retiring` (replaced by a reload, closing its clients).
    pub state: String,
    /// groupcast version of the binary this process runs.
    pub version: String,
    /// Modification time (Unix seconds) of the binary this process was started from, so an
    /// upgrade shows which processes run the new file.
    pub binary_mtime: u64,
    /// Seconds since this process started.
    pub uptime_secs: u64,
    /// Resident memory in KiB (read by the master from /proc).
    pub rss_kib: u64,
    /// Times the master has started this slot again after it died.
    pub restarts: u32,
    /// Open WebSocket connections (worker) or channel peers (channel).
    pub connections: u64,
    /// Groups with at least one local member (worker) or one subscriber (channel).
    pub groups: u64,
    /// Group memberships (worker) or subscriptions (channel).
    pub memberships: u64,
    /// Commands received from clients (worker) or frames from peers (channel).
    pub messages_in: u64,
    /// Frames queued to clients (worker) or to peers (channel).
    pub messages_out: u64,
    /// Publishes sent to the channel (worker) or forwarded (channel).
    pub published: u64,
    /// Writes that failed, ending the connection.
    pub send_failures: u64,
    /// Commands answered with an error frame.
    pub bad_requests: u64,
    /// Connections closed by the server for a protocol violation.
    pub protocol_errors: u64,
    /// Clients cut off because their send buffer passed `limits.send_buffer_limit`.
    pub slow_closed: u64,
    /// Group messages dropped for slow clients (`slow_client = "drop"`).
    pub slow_dropped: u64,
    /// Connections refused with 503 because the worker was at its connection limit.
    pub rejected_connections: u64,
    /// Frames or messages over `max_frame_size` / `max_message_size` (closed with 1009).
    pub oversized: u64,
    /// `add_group` refused by `max_groups_per_connection`.
    pub too_many_groups: u64,
    /// Commands refused by the per-connection rate limit.
    pub rate_limited: u64,
    /// Connections that did not complete the handshake in time.
    pub handshake_timeouts: u64,
    /// Connections closed after `idle_timeout_ms` of silence.
    pub idle_timeouts: u64,
    /// Pings sent to silent clients.
    pub pings_sent: u64,
    /// Clients closed for not completing a frame or message within `message_timeout_ms`.
    pub message_timeouts: u64,
    /// Times a client was not read because its output was over `limits.send_buffer_limit`.
    pub backpressure_pauses: u64,
    /// Group messages from the bus dropped because they were not UTF-8 (text frames must be).
    pub bus_invalid_utf8: u64,
    /// Whether the worker's channel client is connected.
    pub channel_connected: bool,
    /// Publishes dropped because the channel queue bound was reached (worker), or held
    /// messages dropped past the grace-window bound (channel).
    pub channel_dropped: u64,
    /// Publishes not yet acknowledged by the broker (worker), or messages held for the grace
    /// window (channel).
    pub channel_queued: u64,
    /// Publishes sent again after a reconnect.
    pub channel_resent: u64,
    /// Messages from the broker dropped as already delivered (by origin and seq).
    pub channel_duplicates: u64,
    /// Log lines lost because syslog was full or unreachable.
    pub log_dropped: u64,
}

/// The child's end of the status link, driven by the child's own event loop.
pub struct ChildLink {
    stream: UnixStream,
    inbuf: Vec<u8>,
    outbuf: crate::sendbuf::SendBuf,
}

/// What the master asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Stats,
    Connections,
    /// Close every client with `code`, wait up to `drain_ms` for them to go, then exit.
    Shutdown {
        code: u16,
        drain_ms: u64,
    },
}

impl Request {
    fn parse(line: &[u8]) -> Option<Request> {
        let line = std::str::from_utf8(line).ok()?;
        let mut words = line.split_whitespace();
        match words.next()? {
            "stats" => Some(Request::Stats),
            "connections" => Some(Request::Connections),
            "shutdown" => {
                let code = words.next()?.parse().ok()?;
                let drain_ms = words.next()?.parse().ok()?;
                Some(Request::Shutdown { code, drain_ms })
            }
            _ => None,
        }
    }
}

/// One client connection, as `groupcast connections` lists it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionInfo {
    /// Unique within its worker's life.
    pub id: u64,
    pub worker: usize,
    pub worker_pid: u32,
    pub peer: String,
    pub state: String,
    pub groups: Vec<String>,
    pub age_secs: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    /// Bytes queued for the client, not yet written.
    pub send_buffer: u64,
}

/// A worker's answer to `connections`, and the master's merged answer to the CLI.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionList {
    pub connections: Vec<ConnectionInfo>,
    /// Workers that did not answer in time (their connections are missing from the list).
    pub missing_workers: Vec<usize>,
}

impl ChildLink {
    /// Adopts descriptor 4 and registers it; queues the `ready` line.
    pub fn inherit(registry: &Registry, token: Token) -> io::Result<ChildLink> {
        let fd = crate::sys::adopt_inherited_fd(CHILD_LINK_FD)?;
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream.set_nonblocking(true)?;
        let mut stream = UnixStream::from_std(std_stream);
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let mut link = ChildLink { stream, inbuf: Vec::new(), outbuf: Default::default() };
        link.outbuf.extend_from_slice(b"ready\n");
        link.flush()?;
        Ok(link)
    }

    /// Reads what the master sent. `Ok(None)` at end of stream: the master is gone.
    pub fn read_requests(&mut self) -> io::Result<Option<Vec<Request>>> {
        let mut buf = [0u8; 512];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let mut requests = Vec::new();
        while let Some(nl) = self.inbuf.iter().position(|&b| b == b'\n') {
            if let Some(request) = Request::parse(&self.inbuf[..nl]) {
                requests.push(request);
            }
            self.inbuf.drain(..=nl);
        }
        if self.inbuf.len() > 4096 {
            self.inbuf.clear();
        }
        Ok(Some(requests))
    }

    /// Sends one JSON line (a `ProcessStats` or a `ConnectionList`).
    pub fn send_json(&mut self, value: &impl Serialize) -> io::Result<()> {
        serde_json::to_writer(self.outbuf.tail(), value).map_err(io::Error::other)?;
        self.outbuf.extend_from_slice(b"\n");
        self.flush()
    }

    /// Writes what is queued; the rest waits for the next writable event.
    pub fn flush(&mut self) -> io::Result<()> {
        self.outbuf.write_to(&mut self.stream)
    }
}

/// Reads the resolved config the master put in the environment.
pub fn child_config() -> anyhow::Result<crate::config::Config> {
    use anyhow::Context;
    let json = std::env::var(CONFIG_ENV)
        .with_context(|| format!("{CONFIG_ENV} is not set: this subcommand is started by the master"))?;
    serde_json::from_str(&json).context("config passed by the master does not parse")
}

/// The master's answer to `status`: instance figures plus one row per process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReport {
    pub version: String,
    pub master_pid: u32,
    pub uptime_secs: u64,
    /// The WebSocket address actually bound (useful with port 0).
    pub listen: String,
    pub channel: String,
    pub workers: usize,
    /// 1, 5 and 15 minute load averages of the host.
    pub load: [f64; 3],
    pub processes: Vec<ProcessStats>,
    pub totals: Totals,
    /// Reloads started since the master started (a CLI `reload` waits for the next one to end).
    pub reloads: u64,
    /// Whether a reload is replacing workers right now.
    pub reloading: bool,
    pub last_reload: Option<ReloadOutcome>,
    /// How long a graceful stop waits for clients, so `stop -g` knows how long to wait.
    pub graceful_timeout_ms: u64,
    /// The client limits in force (of the running config).
    pub limits: crate::config::Limits,
}

/// How the most recent reload ended.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ReloadOutcome {
    /// Its number: the value of `reloads` when it started.
    pub generation: u64,
    pub ok: bool,
    pub message: String,
    pub graceful: bool,
}

/// Version and binary identity of the running process, for `ProcessStats`.
pub fn binary_identity() -> (String, u64) {
    let mtime = std::fs::metadata("/proc/self/exe")
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    (env!("CARGO_PKG_VERSION").to_owned(), mtime)
}

/// Sums over the workers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    pub connections: u64,
    pub memberships: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub published: u64,
    pub send_failures: u64,
    pub bad_requests: u64,
    pub restarts: u64,
    pub protocol_errors: u64,
    pub slow_closed: u64,
    pub slow_dropped: u64,
    pub rejected_connections: u64,
    pub oversized: u64,
    pub too_many_groups: u64,
    pub rate_limited: u64,
    pub handshake_timeouts: u64,
    pub idle_timeouts: u64,
}
