//! What the CLI shows: the master's answers on its control socket (`StatusReport`,
//! `ConnectionList`) and the per-process figures (`ProcessStats`) children send over their
//! status link to build them. Plain serde data, shared by the master, the children and
//! `groupcast status`/`connections`.

use serde::{Deserialize, Serialize};

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
    /// `retiring` (replaced by a reload, closing its clients), `handing_off` (a worker moving
    /// its connections to its replacement) or `receiving` (that replacement, until the hand-off
    /// ends).
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
    /// Handshakes refused with 403: their Origin is not in `auth.allowed_origins`.
    pub forbidden_origins: u64,
    /// Connections refused with 503 because their address held `limits.max_connections_per_ip`.
    pub per_ip_refused: u64,
    /// `add_group` refused by a `[[groups]]` rule (`forbidden` error).
    pub forbidden_joins: u64,
    /// `send_to_group` refused by a `[[groups]]` rule (`forbidden` error).
    pub forbidden_publishes: u64,
    /// Tokens refused: handshakes answered 401 (a missing token where one is required
    /// included) and refused `refresh` commands.
    pub bad_tokens: u64,
    /// Connections closed with 4001 because their token's `exp` passed without a refresh.
    pub expired_tokens: u64,
    /// Connections open now on the `wss://` listener (included in `connections`).
    pub tls_connections: u64,
    /// `wss://` connections whose TLS handshake failed: not TLS (plain HTTP, garbage), no
    /// common cipher or version, or an alert from the client (it refused our certificate).
    pub tls_handshake_failures: u64,
    /// Connections open now that speak protocol 2 (`?protocol=2`).
    pub protocol2_connections: u64,
    /// Protocol-2 joins with `since` that got every message after it.
    pub joins_recovered: u64,
    /// Protocol-2 joins with `since` told `recovered:false` (the history did not reach back).
    pub joins_unrecovered: u64,
    /// Gap notices sent to protocol-2 members (history lost under them).
    pub gap_notices: u64,
    /// Whether the worker's channel client is connected.
    pub channel_connected: bool,
    /// Publishes dropped because the channel queue bound was reached (worker), or held
    /// messages dropped past the grace-window bound (channel).
    pub channel_dropped: u64,
    /// Publishes not yet acknowledged by the broker (worker), or messages held for the grace
    /// window (channel).
    pub channel_queued: u64,
    /// Publishes sent again after a reconnect (worker), or resends the broker recognized and
    /// did not number or forward again (channel).
    pub channel_resent: u64,
    /// Publishes sent again after a broker restart (REPUBLISH from an origin the broker had
    /// no record of), forwarded with offset 0 and not numbered (channel).
    pub channel_unnumbered: u64,
    /// Messages from the broker dropped as already delivered (by origin and seq).
    pub channel_duplicates: u64,
    /// Log lines lost because syslog was full or unreachable.
    pub log_dropped: u64,
    /// Channel: groups whose position (epoch and last offset) the broker keeps (`[history]`).
    pub history_groups: u64,
    /// Channel: messages kept in the history now.
    pub history_messages: u64,
    /// Channel: bytes of the messages kept in the history now (bounded by `history.max_bytes`).
    pub history_bytes: u64,
    /// Connections this worker received from the worker it replaced (live hand-off).
    pub handoffs_in: u64,
    /// Connections this worker handed to its replacement, committed.
    pub handoffs_out: u64,
    /// Messages of a seed (protocol 1) member lost across a hand-off: the history could not
    /// bridge the switch (protocol-2 members get a gap notice instead).
    pub handoff_gaps: u64,
    /// API: HTTP requests answered.
    pub api_requests: u64,
    /// API: requests answered with an error (4xx or 5xx).
    pub api_errors: u64,
    /// API: publishes refused by `api.publishes_per_second` (429).
    pub api_rate_limited: u64,
    /// Worker: for each write() to a client socket that takes bytes, the time since the
    /// start of the loop turn in which the connection's queue last became non-empty (its
    /// messages were read from a client's `send_to_group` or taken from the bus in that
    /// turn): the age of the oldest frame the write carries, or of the backlog after a
    /// partial write. Microseconds here, seconds in /metrics. The broker hop before the
    /// worker is not included (docs/metrics.md).
    pub publish_to_write_seconds: super::Histogram,
    /// Worker: bytes queued for the connection at each write() to a client socket (before it).
    pub send_queue_bytes: super::Histogram,
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
    /// The connection token's `sub`, when it presented one.
    pub sub: Option<String>,
}

/// A worker's answer to `connections`, and the master's merged answer to the CLI.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionList {
    pub connections: Vec<ConnectionInfo>,
    /// Workers that did not answer in time (their connections are missing from the list).
    pub missing_workers: Vec<usize>,
}

/// The master's answer to `status`: instance figures plus one row per process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReport {
    pub version: String,
    pub master_pid: u32,
    pub uptime_secs: u64,
    /// The WebSocket address actually bound (useful with port 0); empty with `listen = ""`.
    pub listen: String,
    /// The `wss://` address actually bound; empty without `tls.listen`.
    pub tls_listen: String,
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
    /// How a reload replaces workers (`handoff` or `close`).
    pub reload_mode: crate::config::ReloadMode,
    /// How long one worker's hand-off may take.
    pub handoff_timeout_ms: u64,
    /// The client limits in force (of the running config).
    pub limits: crate::config::Limits,
    /// The channel settings in force: bounds of the broker and of the workers' channel client.
    pub channel_settings: crate::config::ChannelSettings,
    /// `[history]` in force: what backs protocol 2's offsets and recovery.
    pub history: crate::config::HistorySettings,
    /// Who may connect (`[auth]`) and the `[[groups]]` rules in force; never a key.
    pub auth: AuthReport,
    /// `[tls]` in force: its listen address and certificate and key files.
    pub tls: crate::config::TlsSettings,
    /// Expiry of the certificate workers serve now (`YYYY-MM-DD HH:MM:SS UTC`); empty without TLS.
    pub tls_not_after: String,
    /// Listen backlog and the client sockets' kernel buffers (0: the kernel's default).
    pub backlog: u32,
    pub socket_recv_buffer: usize,
    pub socket_send_buffer: usize,
    /// `[api]` in force (never the key).
    pub api: crate::config::ApiSettings,
    /// The API address actually bound; empty without `api.listen`.
    pub api_listen: String,
}

/// `[auth]` and `[[groups]]` as `status` shows them: which algorithm and which file, never
/// the secret or the key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthReport {
    /// `HS256`, `RS256`, `ES256`, or `None` when no key is configured (tokens refused).
    pub algorithm: Option<String>,
    pub jwt_secret_file: Option<std::path::PathBuf>,
    pub jwt_public_key_file: Option<std::path::PathBuf>,
    pub require_token: bool,
    pub leeway_secs: u64,
    pub allowed_origins: Vec<String>,
    pub groups: Vec<crate::auth::GroupRule>,
}

impl AuthReport {
    pub fn of(config: &crate::config::Config) -> AuthReport {
        let a = &config.auth;
        AuthReport {
            algorithm: a.jwt_key.as_ref().map(|k| k.alg.name().to_owned()),
            jwt_secret_file: a.jwt_secret_file.clone(),
            jwt_public_key_file: a.jwt_public_key_file.clone(),
            require_token: a.require_token,
            leeway_secs: a.leeway_secs,
            allowed_origins: a.allowed_origins.clone(),
            groups: config.groups.clone(),
        }
    }
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
    /// `handoff` or `close`: how this reload replaced the workers.
    pub mode: String,
    /// One report per worker replaced by hand-off in this reload (empty in close mode).
    pub handoffs: Vec<HandOffReport>,
}

/// How one worker's live hand-off ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandOffOutcome {
    /// Every open plain connection is with the new worker.
    Moved,
    /// The new worker refused the offered format (or there was nothing to offer): the old
    /// one closed its clients with 1012, as a close-mode reload does.
    FellBack,
    /// Rolled back before commit: the old worker serves on, the new one is killed.
    #[default]
    Failed,
}

/// The old worker's answer to `Request::HandOff`, when its hand-off is over.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HandOffReport {
    pub generation: u64,
    /// Worker index.
    pub index: usize,
    pub outcome: HandOffOutcome,
    /// Connections handed over.
    pub moved: u64,
    /// Connections the old worker closed with 1012 (TLS ones; all of them on `fell_back`).
    pub closed: u64,
    pub rounds: u32,
    /// `HandOff` received -> last commit.
    pub millis: u64,
    /// Longest time any moved connection went without I/O.
    pub max_pause_ms: u64,
    /// Empty when moved; why otherwise.
    pub reason: String,
}

impl HandOffReport {
    /// The `status` line of this worker, e.g. `worker-0: moved 1000 connections in 3 rounds,
    /// 41 ms, longest pause 12 ms`.
    pub fn line(&self) -> String {
        let who = format!("worker-{}", self.index);
        match self.outcome {
            HandOffOutcome::Moved => format!(
                "{who}: moved {} connections in {} rounds, {} ms, longest pause {} ms{}",
                self.moved,
                self.rounds,
                self.millis,
                self.max_pause_ms,
                if self.closed > 0 { format!(", closed {} (TLS)", self.closed) } else { String::new() }
            ),
            HandOffOutcome::FellBack => {
                format!("{who}: fell back to closing {} connections: {}", self.closed, self.reason)
            }
            HandOffOutcome::Failed => format!("{who}: failed: {}", self.reason),
        }
    }
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

/// Declares `Totals` with the instance-wide `restarts` plus one `u64` per listed counter of
/// `ProcessStats`, and `Totals::add` summing a row into it: the summed counters are named
/// once, here, so a counter added to the list is summed and shown under the same JSON name.
macro_rules! totals_of {
    ($($counter:ident),* $(,)?) => {
        /// Sums over the workers (same field names as `ProcessStats`).
        #[derive(Debug, Clone, Default, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Totals {
            /// Restarts of every slot (workers and the channel).
            pub restarts: u64,
            $(pub $counter: u64,)*
        }

        impl Totals {
            /// Adds the counters of one process's row.
            pub fn add(&mut self, row: &ProcessStats) {
                $(self.$counter += row.$counter;)*
            }
        }
    };
}

totals_of!(
    connections,
    memberships,
    messages_in,
    messages_out,
    published,
    send_failures,
    bad_requests,
    protocol_errors,
    slow_closed,
    slow_dropped,
    rejected_connections,
    oversized,
    too_many_groups,
    rate_limited,
    handshake_timeouts,
    idle_timeouts,
    message_timeouts,
    backpressure_pauses,
    bus_invalid_utf8,
    forbidden_origins,
    per_ip_refused,
    forbidden_joins,
    forbidden_publishes,
    bad_tokens,
    expired_tokens,
    tls_connections,
    tls_handshake_failures,
    protocol2_connections,
    joins_recovered,
    joins_unrecovered,
    gap_notices,
    handoffs_in,
    handoffs_out,
    handoff_gaps,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_rows_under_the_row_names() {
        let row = ProcessStats { connections: 2, idle_timeouts: 3, bus_invalid_utf8: 4, ..Default::default() };
        let mut t = Totals::default();
        t.add(&row);
        t.add(&row);
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!((json["connections"].as_u64(), json["idle_timeouts"].as_u64()), (Some(4), Some(6)));
        assert_eq!(json["bus_invalid_utf8"], 8);
        assert_eq!(json["restarts"], 0);
    }
}
