//! Configuration: embedded defaults, an optional TOML file (`-c FILE`), then command-line flags.
//!
//! Precedence, lowest first: the `DEFAULT_*` constants below, the TOML file, the flags of
//! `groupcast start`. The file deserializes straight into `Config` (every table and key has a
//! serde default, unknown keys are refused so a typo names itself); `Overrides::apply` lays the
//! flags over it; relative paths are made absolute; `Config::validate` bounds every value,
//! naming the key. A new key is one field with its default. The master hands the resolved
//! `Config` to each child as JSON, so every process of an instance runs with the same values.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

mod api;
pub use api::{ApiKey, ApiSettings};

/// WebSocket listen address of the seed example.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:1234";
/// Name of the pid file of an instance started without one, in `runtime_dir()`; the channel
/// and control sockets sit beside it.
pub const DEFAULT_PID_FILE_NAME: &str = "groupcast.pid";
/// Name of the pid file of a standalone broker (`groupcast channel`) started without one.
pub const DEFAULT_BROKER_PID_FILE_NAME: &str = "groupcast-channel.pid";
/// Pending-connection queue of each listening socket.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// Largest WebSocket message (after reassembly of fragments) a client may send, in bytes.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;
/// Longest group id, in bytes.
pub const DEFAULT_MAX_GROUP_ID_LEN: usize = 256;
/// Most groups one connection may join.
pub const DEFAULT_MAX_GROUPS_PER_CONNECTION: usize = 1024;
/// Bytes queued for one slow client before it is disconnected.
pub const DEFAULT_SEND_BUFFER_LIMIT: usize = 4 << 20;
pub const DEFAULT_MAX_CONNECTIONS_PER_WORKER: usize = 65536;
pub const DEFAULT_MAX_CONNECTIONS: usize = 1 << 20;
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_PING_INTERVAL_MS: u64 = 30_000;
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 75_000;
/// Time to complete a started frame or fragmented message, in milliseconds.
pub const DEFAULT_MESSAGE_TIMEOUT_MS: u64 = 30_000;
/// Longest `limits.message_timeout_ms` accepted: an hour.
const MAX_MESSAGE_TIMEOUT_MS: u64 = 3_600_000;
pub const DEFAULT_COMMANDS_PER_SECOND: u32 = 200;
pub const DEFAULT_COMMANDS_BURST: u32 = 400;
/// Connections one client address may hold (`limits.max_connections_per_ip`).
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 1000;
/// Most entries of `limits.per_ip_exempt`.
const MAX_PER_IP_EXEMPT: usize = 1024;

fn default_per_ip_exempt() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128"].iter().filter_map(|n| n.parse().ok()).collect()
}
/// Bytes the broker queues for one channel peer before it cuts that peer off.
pub const DEFAULT_CHANNEL_PEER_BUFFER_LIMIT: usize = 256 << 20;
/// Largest channel frame accepted from a peer, in bytes.
pub const DEFAULT_CHANNEL_MAX_FRAME: usize = 16 << 20;
/// How long a worker may take to answer the master's status query, in milliseconds.
pub const DEFAULT_STATUS_TIMEOUT_MS: u64 = 2000;
/// Smallest non-zero `socket_recv_buffer`/`socket_send_buffer`: below it the kernel rounds up
/// anyway (SOCK_MIN_RCVBUF), and TCP would crawl.
const MIN_SOCKET_BUFFER: usize = 4096;
/// Largest: the kernel caps SO_RCVBUF/SO_SNDBUF at net.core.rmem_max/wmem_max beyond this.
const MAX_SOCKET_BUFFER: usize = 64 << 20;
/// How long a graceful stop or reload waits for clients to close, in milliseconds.
pub const DEFAULT_GRACEFUL_TIMEOUT_MS: u64 = 30_000;
/// How long one worker's live hand-off at reload may take, in milliseconds.
pub const DEFAULT_HANDOFF_TIMEOUT_MS: u64 = 10_000;
/// How long a channel peer has to authenticate before the broker drops it, in milliseconds.
pub const DEFAULT_CHANNEL_AUTH_TIMEOUT_MS: u64 = 5_000;
/// Most channel peers one broker serves at once.
pub const DEFAULT_CHANNEL_MAX_PEERS: usize = 10_000;

/// Upper bound of every `*_ms` setting (one day): far beyond any sensible value, and far below
/// where `Instant + Duration` arithmetic could overflow.
pub const MAX_DURATION_MS: u64 = 86_400_000;
/// Upper bound of every byte-count setting (64 GiB).
pub const MAX_BYTES: u64 = 64 << 30;
/// Upper bound of every count setting that sizes a table or a queue.
pub const MAX_COUNT: u64 = 100_000_000;
/// Longest group id the channel wire can carry: its strings have a `u16` length.
pub const MAX_GROUP_ID_LEN: u64 = u16::MAX as u64;

/// Where a channel server listens or a channel client connects: `HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ChannelAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ChannelAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(ChannelAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>()
            .map(ChannelAddr::Tcp)
            .map_err(|e| format!("{s:?} is neither HOST:PORT nor unix:PATH ({e})"))
    }
}

impl TryFrom<String> for ChannelAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ChannelAddr> for String {
    fn from(a: ChannelAddr) -> String {
        a.to_string()
    }
}

impl fmt::Display for ChannelAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelAddr::Tcp(a) => write!(f, "{a}"),
            ChannelAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What happens to a client whose send buffer passes `send_buffer_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowClient {
    /// Close it with 1008 (the default): it reconnects and catches up from the application.
    Close,
    /// Drop its oldest queued group messages; if it asked for replies, tell it how many it
    /// missed once it has caught up.
    Drop,
}

/// What carries group messages between workers and instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// The channel server: the instance's own, or a shared one (`[channel] connect`).
    Channel,
    /// Redis pub/sub (`[redis]`), for deployments beyond one broker.
    Redis,
}

/// How a reload replaces a worker's open connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadMode {
    /// The old worker hands its plain connections to its replacement (live hand-off); the
    /// clients notice nothing. TLS connections are still closed with 1012.
    #[default]
    Handoff,
    /// The old worker closes every client with 1012 (service restart); clients reconnect.
    Close,
}

impl ReloadMode {
    pub fn name(self) -> &'static str {
        match self {
            ReloadMode::Handoff => "handoff",
            ReloadMode::Close => "close",
        }
    }
}

/// Redis bus settings (`bus = "redis"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Server URL (default redis://127.0.0.1:6379/).
    pub url: String,
    /// Prefix of the per-group Redis channels (default "groupcast:").
    pub prefix: String,
    /// Time to connect to Redis, ms (default 2000).
    pub connect_timeout_ms: u64,
    /// Time for one read or write, and for Redis to answer a health-check PING, ms (default 2000).
    pub io_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
            prefix: "groupcast:".into(),
            connect_timeout_ms: 2_000,
            io_timeout_ms: 2_000,
        }
    }
}

/// How an instance reaches the channel and how the channel protects what it carries: the
/// `[channel]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelSettings {
    /// Where the broker listens (`--channel-listen`); `None`: the Unix socket beside the pid
    /// file (see `Config::channel_listen`).
    #[serde(deserialize_with = "channel_listen_addr")]
    pub listen: Option<ChannelAddr>,
    /// A remote broker to use instead of forking one (`[channel] connect`, `--channel-connect`).
    #[serde(deserialize_with = "channel_connect_addr")]
    pub connect: Option<ChannelAddr>,
    /// File holding the shared secret peers and broker prove to each other (never the secret
    /// itself on a command line).
    pub secret_file: Option<PathBuf>,
    /// Let a broker without a secret listen on (or a worker connect to) a non-loopback address.
    pub insecure: bool,
    /// Unacknowledged publishes a worker keeps for resending, count (default 100000).
    pub queue_max_messages: usize,
    /// Unacknowledged publishes a worker keeps for resending, bytes (default 64 MiB).
    pub queue_max_bytes: usize,
    /// How long a fresh broker keeps messages for peers that subscribe late, ms (default 5000).
    pub grace_ms: u64,
    /// Bytes a fresh broker keeps during the grace window (default 64 MiB).
    pub grace_max_bytes: usize,
    /// Largest channel frame a peer may send, bytes (default 16 MiB).
    pub max_frame: usize,
    /// Bytes queued for one channel peer before the broker cuts it off (default 256 MiB).
    pub peer_buffer_limit: usize,
    /// Time a peer has to complete authentication, ms (default 5000).
    pub auth_timeout_ms: u64,
    /// Most peers one broker serves at once (default 10000); more are refused.
    pub max_peers: usize,
}

impl Default for ChannelSettings {
    fn default() -> Self {
        ChannelSettings {
            listen: None,
            connect: None,
            secret_file: None,
            insecure: false,
            queue_max_messages: 100_000,
            queue_max_bytes: 64 << 20,
            grace_ms: 5_000,
            grace_max_bytes: 64 << 20,
            max_frame: DEFAULT_CHANNEL_MAX_FRAME,
            peer_buffer_limit: DEFAULT_CHANNEL_PEER_BUFFER_LIMIT,
            auth_timeout_ms: DEFAULT_CHANNEL_AUTH_TIMEOUT_MS,
            max_peers: DEFAULT_CHANNEL_MAX_PEERS,
        }
    }
}

/// Per-group history behind protocol 2's offsets and recovery: the `[history]` table
/// (docs/protocol.md "Protocol 2"). Kept by the channel server, or in Redis Streams on the
/// Redis bus. Sized for a chat-like application: the last 100 messages of each group for
/// 5 minutes, 64 MiB in all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistorySettings {
    /// Messages kept per group (default 100; 0: no history, offsets only).
    pub size: usize,
    /// How long a message is kept, ms (default 300000). A group without members keeps its
    /// history until then.
    pub ttl_ms: u64,
    /// Bytes of history kept in all (default 64 MiB), oldest dropped first.
    pub max_bytes: usize,
    /// Most messages one join with `since` replays (default 1000); further back is a gap.
    pub max_recover: usize,
    /// Groups whose position (epoch and offset) is kept without members or messages, most
    /// idle forgotten first (default 100000): a forgotten group starts a new epoch.
    pub max_groups: usize,
    /// How long the position of a group without members and messages is kept, ms
    /// (default 86400000): a client coming back within it to a quiet group loses nothing.
    pub meta_ttl_ms: u64,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            size: 100,
            ttl_ms: 300_000,
            max_bytes: 64 << 20,
            max_recover: 1000,
            max_groups: 100_000,
            meta_ttl_ms: 86_400_000,
        }
    }
}

/// Where log lines go and which: the `[log]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// Log level: error, warn, info, debug, trace (default info).
    pub level: String,
    /// Path of the syslog socket (default /dev/log).
    pub syslog_socket: PathBuf,
    /// Syslog facility name (default daemon).
    pub syslog_facility: String,
    /// Log to syslog instead of stderr. Not a key of the file: `start -d` sets it, and the
    /// master passes it to its children beside the config (control::handoff).
    #[serde(skip)]
    pub syslog: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            syslog_socket: PathBuf::from("/dev/log"),
            syslog_facility: "daemon".into(),
            syslog: false,
        }
    }
}

/// Client-facing limits; each has a counter in `status` when it is hit. Written as the
/// `[limits]` table of the config file; a missing key keeps its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Open connections per worker (default 65536); more are answered 503 and closed.
    pub max_connections_per_worker: usize,
    /// Open connections of the whole instance (default 1048576), enforced as an equal share
    /// per worker (the kernel spreads connections evenly over the workers).
    pub max_connections: usize,
    /// Largest single WebSocket frame in bytes (default 1 MiB); larger ones close with 1009.
    pub max_frame_size: usize,
    /// Largest client message in bytes, after reassembling fragments (default 1 MiB); 1009.
    pub max_message_size: usize,
    /// Longest group id in bytes (default 256, at most 65535: the channel wire's bound).
    pub max_group_id_len: usize,
    /// Most groups per connection (default 1024).
    pub max_groups_per_connection: usize,
    /// Bytes queued for one client before `slow_client` applies (default 4 MiB).
    pub send_buffer_limit: usize,
    /// Policy for clients that do not read fast enough (default close).
    pub slow_client: SlowClient,
    /// Time to complete the HTTP upgrade, ms (default 10000): slowloris protection.
    pub handshake_timeout_ms: u64,
    /// Silence after which the server pings a client, ms (default 30000).
    pub ping_interval_ms: u64,
    /// Silence after which a client is closed with 1001, ms (default 75000; 0 disables).
    pub idle_timeout_ms: u64,
    /// Time to complete a frame or a fragmented message once its first byte arrived, ms
    /// (default 30000): trickled bytes cannot pin a partial message; closed with 1008.
    pub message_timeout_ms: u64,
    /// Commands a client may send per second on average (default 200).
    pub commands_per_second: u32,
    /// Commands a client may send at once above that rate (default 400).
    pub commands_burst: u32,
    /// Connections one client address may hold on the whole instance (default 1000; 0: no
    /// cap); the next is answered 503. IPv6 addresses count per /64.
    pub max_connections_per_ip: u32,
    /// Networks the per-IP cap does not apply to (default loopback: a reverse proxy on the
    /// same host brings every client from there).
    pub per_ip_exempt: Vec<ipnet::IpNet>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_worker: DEFAULT_MAX_CONNECTIONS_PER_WORKER,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_frame_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_group_id_len: DEFAULT_MAX_GROUP_ID_LEN,
            max_groups_per_connection: DEFAULT_MAX_GROUPS_PER_CONNECTION,
            send_buffer_limit: DEFAULT_SEND_BUFFER_LIMIT,
            slow_client: SlowClient::Close,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            ping_interval_ms: DEFAULT_PING_INTERVAL_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            message_timeout_ms: DEFAULT_MESSAGE_TIMEOUT_MS,
            commands_per_second: DEFAULT_COMMANDS_PER_SECOND,
            commands_burst: DEFAULT_COMMANDS_BURST,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            per_ip_exempt: default_per_ip_exempt(),
        }
    }
}

impl Limits {
    /// The per-IP cap that applies to a client at `ip`, if any.
    pub fn per_ip_cap(&self, ip: std::net::IpAddr) -> Option<u64> {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        let exempt = self.per_ip_exempt.iter().any(|net| net.contains(&ip));
        (self.max_connections_per_ip > 0 && !exempt).then_some(u64::from(self.max_connections_per_ip))
    }

    /// Connections one of `workers` workers may hold: its share of the total, at most the
    /// per-worker limit.
    pub fn connections_per_worker(&self, workers: usize) -> usize {
        self.max_connections_per_worker.min(self.max_connections.div_ceil(workers.max(1)))
    }
}

/// The configuration of one instance: the top level of the TOML file, then its tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Plain (`ws://`) listen address (default 0.0.0.0:1234); `listen = ""`: no plain
    /// listener (then `tls.listen` must be set).
    #[serde(deserialize_with = "listen_addr")]
    pub listen: Option<SocketAddr>,
    /// Number of worker processes (default: the CPU count).
    pub workers: usize,
    /// Pid file, locked while the instance runs (default `runtime_dir()/groupcast.pid`).
    pub pid_file: PathBuf,
    /// Listen backlog of the WebSocket and channel listeners (default 1024).
    pub backlog: u32,
    /// Kernel receive buffer of each client socket, bytes (SO_RCVBUF on the WebSocket
    /// listeners, inherited by every accepted socket); 0 (default): the kernel's default and
    /// its autotuning. Caps what an idle or slow client can make the kernel hold.
    pub socket_recv_buffer: usize,
    /// Kernel send buffer of each client socket, bytes (SO_SNDBUF, likewise); 0 (default):
    /// the kernel's. Beyond it the worker's own queue (`limits.send_buffer_limit`) holds.
    pub socket_send_buffer: usize,
    /// How long the master waits for each process's status answer, ms (default 2000).
    pub status_timeout_ms: u64,
    /// How long `stop -g` / `reload -g` let clients close before forcing, ms (default 30000).
    pub graceful_timeout_ms: u64,
    /// How a reload replaces workers: `"handoff"` (default) moves open connections to the new
    /// worker, `"close"` closes them with 1012 (`reload --close` forces it for one reload).
    pub reload_mode: ReloadMode,
    /// How long one worker's hand-off may take before it is rolled back, ms (default 10000).
    pub handoff_timeout_ms: u64,
    /// User to run as after binding, when started as root (default: stay as started).
    pub user: Option<String>,
    /// Group to run as after binding (default: the user's primary group).
    pub group: Option<String>,
    /// The bus between workers and instances (default channel).
    pub bus: BusKind,
    /// `[channel]`: the broker's address, the remote broker, secret, queues, grace window.
    pub channel: ChannelSettings,
    /// Per-group history for protocol 2 (`[history]`).
    pub history: HistorySettings,
    /// `[redis]`: the Redis bus (`bus = "redis"`).
    pub redis: RedisConfig,
    /// `[log]`: level and syslog.
    pub log: LogSettings,
    /// `[limits]`: what one client may do.
    pub limits: Limits,
    /// `[auth]`: who may connect: tokens, the Origin allow-list.
    pub auth: AuthSettings,
    /// `[[groups]]`: who may join and publish to which groups, first match wins (default none:
    /// anyone may do anything, as in the seed).
    pub groups: Vec<crate::auth::GroupRule>,
    /// `[tls]`: the `wss://` listener and its certificate.
    pub tls: TlsSettings,
    /// `[api]`: the HTTP API (publish, counts, connections, metrics, health).
    pub api: ApiSettings,
}

/// `[tls]`: serving `wss://` with rustls. Without `listen` (the default) there is no TLS
/// listener. The certificate and key are read by the master at start and again at every
/// `reload` (renewing a certificate is a reload); see docs/tls.md.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// TLS listen address, e.g. `0.0.0.0:1443` (default: none; `""` is none too).
    #[serde(deserialize_with = "tls_listen_addr")]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain, leaf first (required with `listen`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the leaf certificate: PKCS#8, RSA or SEC1 EC (required with `listen`).
    pub key_file: Option<PathBuf>,
}

impl TlsSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_some() {
            if self.cert_file.is_none() {
                return Err(invalid("tls.cert_file", "required when tls.listen is set"));
            }
            if self.key_file.is_none() {
                return Err(invalid("tls.key_file", "required when tls.listen is set"));
            }
        }
        Ok(())
    }
}

/// Most entries of `auth.allowed_origins`.
const MAX_ALLOWED_ORIGINS: usize = 1024;

/// Largest `auth.leeway_secs`: five minutes of clock skew is already generous.
const MAX_LEEWAY_SECS: u64 = 300;

/// `[auth]`: who may open a WebSocket. Without it (the default) anyone may, as in the seed.
/// docs/security.md explains the keys together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// File holding the HS256 secret of connection and group tokens (trailing newline removed;
    /// default none). Exclusive with `jwt_public_key_file`.
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key verifying tokens: RSA means RS256, EC P-256 means ES256 (default none).
    pub jwt_public_key_file: Option<PathBuf>,
    /// Refuse (401) a handshake without a token (default false: anonymous connections allowed;
    /// a token that is present is always checked).
    pub require_token: bool,
    /// Clock skew tolerated on `exp` and `nbf`, seconds (default 0, at most 300).
    pub leeway_secs: u64,
    /// Origins (`scheme://host[:port]`, as browsers send them) whose pages may connect; a
    /// handshake with another `Origin` header gets 403 (cross-site WebSocket hijacking). Empty
    /// (the default): any Origin. A request without `Origin` (not from a browser: a backend, a
    /// script) is not refused by this list.
    pub allowed_origins: Vec<String>,
    /// The key read from one of the files at load (never a key of the file: the master reads
    /// it and hands it to its children beside the config, see control::handoff).
    #[serde(skip)]
    pub jwt_key: Option<crate::auth::JwtKey>,
}

impl AuthSettings {
    /// Reads the key file named by `jwt_secret_file` or `jwt_public_key_file` (the master does
    /// this at start and at every reload); errors name the key and the file.
    fn load_key(&mut self) -> Result<(), ConfigError> {
        self.jwt_key = match (&self.jwt_secret_file, &self.jwt_public_key_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "auth.jwt_secret_file",
                    "set together with auth.jwt_public_key_file; set one (HS256 secret or RS256/ES256 public key)",
                ))
            }
            (Some(path), None) => {
                Some(crate::auth::keys::load_secret(path).map_err(|e| invalid("auth.jwt_secret_file", e))?)
            }
            (None, Some(path)) => {
                Some(crate::auth::keys::load_public_key(path).map_err(|e| invalid("auth.jwt_public_key_file", e))?)
            }
            (None, None) => None,
        };
        Ok(())
    }

    /// Whether a handshake with this `Origin` header value (if any) may upgrade.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match origin {
            Some(origin) if !self.allowed_origins.is_empty() => {
                let origin = origin.trim();
                self.allowed_origins.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin))
            }
            _ => true,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.leeway_secs > MAX_LEEWAY_SECS {
            return Err(invalid("auth.leeway_secs", format!("{} is not in 0..={MAX_LEEWAY_SECS}", self.leeway_secs)));
        }
        if self.require_token && self.jwt_secret_file.is_none() && self.jwt_public_key_file.is_none() {
            return Err(invalid(
                "auth.require_token",
                "true, but no auth.jwt_secret_file or auth.jwt_public_key_file to check tokens with",
            ));
        }
        if self.allowed_origins.len() > MAX_ALLOWED_ORIGINS {
            return Err(invalid(
                "auth.allowed_origins",
                format!("{} entries; at most {MAX_ALLOWED_ORIGINS}", self.allowed_origins.len()),
            ));
        }
        for origin in &self.allowed_origins {
            if !is_origin(origin) {
                return Err(invalid(
                    "auth.allowed_origins",
                    format!("{origin:?} is not an origin such as \"https://app.example.com\" (scheme://host[:port], no path)"),
                ));
            }
        }
        Ok(())
    }
}

/// `http(s)://host[:port]` with nothing after it: what a browser puts in `Origin`.
fn is_origin(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")) else { return false };
    let (host, port) = match rest.strip_prefix('[') {
        // An IPv6 literal: `[addr]` or `[addr]:port`.
        Some(v6) => match v6.split_once(']') {
            Some((addr, after)) => {
                (addr, after.strip_prefix(':').map(Some).unwrap_or((!after.is_empty()).then_some("")))
            }
            None => return false,
        },
        None => match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        },
    };
    s.len() <= 2048
        && !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Some(DEFAULT_LISTEN.parse().expect("default listen address parses")),
            workers: default_workers(),
            pid_file: default_pid_file(),
            backlog: DEFAULT_BACKLOG,
            socket_recv_buffer: 0,
            socket_send_buffer: 0,
            status_timeout_ms: DEFAULT_STATUS_TIMEOUT_MS,
            graceful_timeout_ms: DEFAULT_GRACEFUL_TIMEOUT_MS,
            reload_mode: ReloadMode::Handoff,
            handoff_timeout_ms: DEFAULT_HANDOFF_TIMEOUT_MS,
            user: None,
            group: None,
            bus: BusKind::Channel,
            channel: ChannelSettings::default(),
            history: HistorySettings::default(),
            redis: RedisConfig::default(),
            log: LogSettings::default(),
            limits: Limits::default(),
            auth: AuthSettings::default(),
            groups: Vec::new(),
            tls: TlsSettings::default(),
            api: ApiSettings::default(),
        }
    }
}

/// The private directory (mode 0700, ours) of the default pid file and sockets: under a loose
/// umask, sockets in a shared directory such as /tmp would let any local user connect to the
/// unauthenticated channel socket or read the control socket. `/run/groupcast` as root,
/// `$XDG_RUNTIME_DIR/groupcast` (itself private by the XDG spec) or `/tmp/groupcast-UID`
/// otherwise. The master creates it, and refuses it if another user owns it.
pub fn runtime_dir() -> PathBuf {
    let uid = nix::unistd::Uid::effective();
    if uid.is_root() {
        return PathBuf::from("/run/groupcast");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("groupcast"),
        _ => PathBuf::from(format!("/tmp/groupcast-{uid}")),
    }
}

/// The pid file used when neither the file nor `--pid-file` names one.
pub fn default_pid_file() -> PathBuf {
    runtime_dir().join(DEFAULT_PID_FILE_NAME)
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// `/run/x/groupcast.pid` + `ctl.sock` -> `/run/x/groupcast.ctl.sock`.
pub fn sibling_path(pid_file: &Path, suffix: &str) -> PathBuf {
    let stem = pid_file.file_stem().map(|s| s.to_string_lossy().into_owned());
    let name = format!("{}.{suffix}", stem.as_deref().unwrap_or("groupcast"));
    pid_file.with_file_name(name)
}

// Typed values that arrive as strings name their key when they do not parse, as the
// validation errors do (the TOML error adds line and column).
fn parsed<'de, D: Deserializer<'de>, T: FromStr>(d: D, key: &str) -> Result<Option<T>, D::Error>
where
    T::Err: fmt::Display,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|e| serde::de::Error::custom(format!("invalid value for `{key}`: {e}"))),
    }
}

/// A listen address where `""` (and, in the JSON handed to children, `null`) means "none".
fn optional_listen<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<Option<SocketAddr>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => s
            .parse::<HostPort>()
            .map(|h| Some(h.0))
            .map_err(|e| serde::de::Error::custom(format!("invalid value for `{key}`: {e}"))),
    }
}

fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    optional_listen(d, "listen")
}

fn tls_listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    optional_listen(d, "tls.listen")
}

fn channel_listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ChannelAddr>, D::Error> {
    parsed(d, "channel.listen")
}

fn channel_connect_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ChannelAddr>, D::Error> {
    parsed(d, "channel.connect")
}

/// A `SocketAddr` whose parse error says what was expected.
struct HostPort(SocketAddr);

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(HostPort).map_err(|e| format!("{s:?} is not HOST:PORT ({e})"))
    }
}

/// Command-line values that override the file (from `groupcast start` and friends).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub pid_file: Option<PathBuf>,
    pub listen: Option<String>,
    pub workers: Option<usize>,
    pub channel_listen: Option<String>,
    pub channel_connect: Option<String>,
    pub channel_secret_file: Option<PathBuf>,
    pub channel_insecure: bool,
    pub api_listen: Option<String>,
    /// `--demo`: serve the chat demo, on `DEMO_API_LISTEN` unless the API listens already.
    pub demo: bool,
}

/// Where `start --demo` puts the API when neither the file nor `--api-listen` does.
pub const DEMO_API_LISTEN: &str = "127.0.0.1:1235";

impl Overrides {
    /// Lays the flags over `config` (the one place flags meet the file).
    fn apply(&self, config: &mut Config) -> Result<(), ConfigError> {
        let flag = |key, e| invalid(key, e);
        if let Some(listen) = &self.listen {
            config.listen = match listen.trim() {
                "" => None,
                addr => Some(addr.parse::<HostPort>().map_err(|e| flag("listen", e))?.0),
            };
        }
        if let Some(workers) = self.workers {
            config.workers = workers;
        }
        if let Some(path) = &self.pid_file {
            config.pid_file = path.clone();
        }
        if let Some(addr) = &self.channel_listen {
            config.channel.listen = Some(addr.parse().map_err(|e| flag("channel.listen", e))?);
        }
        if let Some(addr) = &self.channel_connect {
            config.channel.connect = Some(addr.parse().map_err(|e| flag("channel.connect", e))?);
        }
        if let Some(path) = &self.channel_secret_file {
            config.channel.secret_file = Some(path.clone());
        }
        config.channel.insecure |= self.channel_insecure;
        if let Some(listen) = &self.api_listen {
            config.api.listen = match listen.trim() {
                "" => None,
                addr => Some(addr.parse::<HostPort>().map_err(|e| flag("api.listen", e))?.0),
            };
        }
        if self.demo {
            config.api.demo = true;
            if config.api.listen.is_none() {
                config.api.listen = Some(DEMO_API_LISTEN.parse().expect("the demo address parses"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// A setting a reload cannot change (it is bound or fixed at start, or belongs to the broker,
/// which a reload does not replace): how to tell it changed and how to keep the running value.
struct Fixed {
    name: &'static str,
    differs: fn(&Config, &Config) -> bool,
    keep: fn(&mut Config, &Config),
}

/// One entry per fixed setting; `fixed_settings_changed` and `reloaded` both read this list,
/// so what a reload reports it keeps is exactly what it keeps.
macro_rules! fixed_settings {
    ($($name:literal => $($field:ident).+;)*) => {
        &[$(Fixed {
            name: $name,
            differs: |old, new| old.$($field).+ != new.$($field).+,
            keep: |new, old| new.$($field).+ = old.$($field).+.clone(),
        },)*]
    };
}

const FIXED: &[Fixed] = fixed_settings! {
    "listen" => listen;
    "workers" => workers;
    "pid_file" => pid_file;
    "backlog" => backlog;
    "socket_recv_buffer" => socket_recv_buffer;
    "socket_send_buffer" => socket_send_buffer;
    "user" => user;
    "group" => group;
    "bus" => bus;
    "redis" => redis;
    "channel.listen" => channel.listen;
    "channel.connect" => channel.connect;
    "channel.secret_file" => channel.secret_file;
    "channel.insecure" => channel.insecure;
    "channel.max_frame" => channel.max_frame;
    "channel.peer_buffer_limit" => channel.peer_buffer_limit;
    "channel.grace_ms" => channel.grace_ms;
    "channel.grace_max_bytes" => channel.grace_max_bytes;
    "channel.auth_timeout_ms" => channel.auth_timeout_ms;
    "channel.max_peers" => channel.max_peers;
    // The broker keeps its history under the bounds it started with; a reload does not
    // restart it.
    "history" => history;
    "log.syslog_socket" => log.syslog_socket;
    "log.syslog_facility" => log.syslog_facility;
    "tls.listen" => tls.listen;
    "api.listen" => api.listen;
};

impl Config {
    /// Defaults, then the file at `path` (if any), then `overrides`; paths made absolute;
    /// validated.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                toml::from_str::<Config>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                })?
            }
            None => Config::default(),
        };
        overrides.apply(&mut config)?;
        config.make_paths_absolute()?;
        config.validate()?;
        config.auth.load_key()?;
        config.api.load_key()?;
        Ok(config)
    }

    /// Paths must survive the daemon's chdir("/"), so they are made absolute here, once.
    fn make_paths_absolute(&mut self) -> Result<(), ConfigError> {
        self.pid_file = absolute(&self.pid_file, "pid_file")?;
        if let Some(ChannelAddr::Unix(path)) = &self.channel.listen {
            self.channel.listen = Some(ChannelAddr::Unix(absolute(path, "channel.listen")?));
        }
        if let Some(ChannelAddr::Unix(path)) = &self.channel.connect {
            self.channel.connect = Some(ChannelAddr::Unix(absolute(path, "channel.connect")?));
        }
        if let Some(path) = &self.channel.secret_file {
            self.channel.secret_file = Some(absolute(path, "channel.secret_file")?);
        }
        if let Some(path) = &self.auth.jwt_secret_file {
            self.auth.jwt_secret_file = Some(absolute(path, "auth.jwt_secret_file")?);
        }
        if let Some(path) = &self.auth.jwt_public_key_file {
            self.auth.jwt_public_key_file = Some(absolute(path, "auth.jwt_public_key_file")?);
        }
        if let Some(path) = &self.tls.cert_file {
            self.tls.cert_file = Some(absolute(path, "tls.cert_file")?);
        }
        if let Some(path) = &self.tls.key_file {
            self.tls.key_file = Some(absolute(path, "tls.key_file")?);
        }
        if let Some(path) = &self.api.key_file {
            self.api.key_file = Some(absolute(path, "api.key_file")?);
        }
        Ok(())
    }

    /// Checks every value: numbers within their bounds, names that must mean something, and
    /// combinations that make no sense. Each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.channel;
        let l = &self.limits;
        let n = |v: usize| v as u64;
        #[rustfmt::skip]
        let bounds: &[(&'static str, u64, u64, u64)] = &[
            ("workers", n(self.workers), 1, 1024),
            ("backlog", u64::from(self.backlog), 1, 65_535),
            ("status_timeout_ms", self.status_timeout_ms, 1, MAX_DURATION_MS),
            ("graceful_timeout_ms", self.graceful_timeout_ms, 1, MAX_DURATION_MS),
            ("handoff_timeout_ms", self.handoff_timeout_ms, 100, 600_000),
            ("channel.queue_max_messages", n(c.queue_max_messages), 1, MAX_COUNT),
            ("channel.queue_max_bytes", n(c.queue_max_bytes), 1024, MAX_BYTES),
            ("channel.grace_ms", c.grace_ms, 0, MAX_DURATION_MS),
            ("channel.grace_max_bytes", n(c.grace_max_bytes), 0, MAX_BYTES),
            // The wire's frame length is a u32.
            ("channel.max_frame", n(c.max_frame), 1024, 1 << 30),
            ("channel.peer_buffer_limit", n(c.peer_buffer_limit), 1024, MAX_BYTES),
            ("channel.auth_timeout_ms", c.auth_timeout_ms, 100, MAX_DURATION_MS),
            ("channel.max_peers", n(c.max_peers), 1, 1_000_000),
            ("history.size", n(self.history.size), 0, 1_000_000),
            ("history.ttl_ms", self.history.ttl_ms, 1, MAX_DURATION_MS),
            ("history.max_bytes", n(self.history.max_bytes), 0, MAX_BYTES),
            ("history.max_recover", n(self.history.max_recover), 0, 1_000_000),
            ("history.max_groups", n(self.history.max_groups), 1, MAX_COUNT),
            ("history.meta_ttl_ms", self.history.meta_ttl_ms, 1, MAX_DURATION_MS),
            ("limits.max_connections_per_worker", n(l.max_connections_per_worker), 1, MAX_COUNT),
            ("limits.max_connections", n(l.max_connections), 1, MAX_COUNT),
            ("limits.max_frame_size", n(l.max_frame_size), 16, 1 << 30),
            ("limits.max_message_size", n(l.max_message_size), 16, 1 << 30),
            ("limits.max_group_id_len", n(l.max_group_id_len), 1, MAX_GROUP_ID_LEN),
            ("limits.max_groups_per_connection", n(l.max_groups_per_connection), 1, MAX_COUNT),
            ("limits.send_buffer_limit", n(l.send_buffer_limit), 1024, MAX_BYTES),
            ("limits.handshake_timeout_ms", l.handshake_timeout_ms, 100, MAX_DURATION_MS),
            ("limits.ping_interval_ms", l.ping_interval_ms, 100, MAX_DURATION_MS),
            ("limits.idle_timeout_ms", l.idle_timeout_ms, 0, MAX_DURATION_MS),
            ("limits.message_timeout_ms", l.message_timeout_ms, 100, MAX_MESSAGE_TIMEOUT_MS),
            ("redis.connect_timeout_ms", self.redis.connect_timeout_ms, 1, MAX_DURATION_MS),
            ("redis.io_timeout_ms", self.redis.io_timeout_ms, 1, MAX_DURATION_MS),
            ("limits.commands_per_second", u64::from(l.commands_per_second), 1, 1_000_000),
            ("limits.commands_burst", u64::from(l.commands_burst), 1, 1_000_000),
            ("limits.max_connections_per_ip", u64::from(l.max_connections_per_ip), 0, MAX_COUNT),
            ("limits.per_ip_exempt", n(l.per_ip_exempt.len()), 0, n(MAX_PER_IP_EXEMPT)),
        ];
        for &(key, value, min, max) in bounds {
            if !(min..=max).contains(&value) {
                return Err(invalid(key, format!("{value} is not in {min}..={max}")));
            }
        }
        for (key, value) in
            [("socket_recv_buffer", self.socket_recv_buffer), ("socket_send_buffer", self.socket_send_buffer)]
        {
            if value != 0 && !(MIN_SOCKET_BUFFER..=MAX_SOCKET_BUFFER).contains(&value) {
                return Err(invalid(
                    key,
                    format!(
                        "{value} is neither 0 (the kernel's default) nor in {MIN_SOCKET_BUFFER}..={MAX_SOCKET_BUFFER}"
                    ),
                ));
            }
        }
        if l.idle_timeout_ms != 0 && l.idle_timeout_ms <= l.ping_interval_ms {
            return Err(invalid("limits.idle_timeout_ms", "must be 0 (off) or longer than limits.ping_interval_ms"));
        }
        if log_level_filter(&self.log.level).is_none() {
            return Err(invalid(
                "log.level",
                format!("{:?} is not one of error, warn, info, debug, trace", self.log.level),
            ));
        }
        if crate::logging::facility(&self.log.syslog_facility).is_none() {
            return Err(invalid(
                "log.syslog_facility",
                format!("{:?} is not a syslog facility (daemon, user, local0..local7)", self.log.syslog_facility),
            ));
        }
        if self.group.is_some() && self.user.is_none() {
            // Root keeps uid 0 and can take back any group: that is no privilege drop.
            return Err(invalid("group", "set without `user`, the processes would still run as root; set `user` too"));
        }
        if self.listen.is_none() && self.tls.listen.is_none() {
            return Err(invalid("listen", "is empty and so is tls.listen: nothing to serve; set one of them"));
        }
        self.tls.validate()?;
        self.auth.validate()?;
        self.api.validate()?;
        crate::auth::rules::validate_rules(&self.groups).map_err(|e| invalid("groups", e))?;
        self.check_secret_for_remote_peers()
    }

    /// Without a secret, a broker on a non-loopback address lets any host inject into every
    /// group, and a worker dialing one takes whatever a host on the path sends. Both are
    /// refused unless `channel.insecure` says it is meant, whether or not `connect` is set:
    /// the file that names a remote broker may be the one that starts it.
    fn check_secret_for_remote_peers(&self) -> Result<(), ConfigError> {
        if self.channel.secret_file.is_some() || self.channel.insecure {
            return Ok(());
        }
        for (key, addr) in [("channel.listen", &self.channel.listen), ("channel.connect", &self.channel.connect)] {
            if let Some(ChannelAddr::Tcp(addr)) = addr {
                if !addr.ip().is_loopback() {
                    return Err(invalid(
                        key,
                        format!(
                            "{addr} is reachable from other hosts and no channel.secret_file is set; \
                             set one (or channel.insecure = true to accept unauthenticated peers)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Settings a reload cannot change, each named for the operator; the reloaded config keeps
    /// the running values for them (see `reloaded`).
    pub fn fixed_settings_changed(&self, new: &Config) -> Vec<&'static str> {
        FIXED.iter().filter(|f| (f.differs)(self, new)).map(|f| f.name).collect()
    }

    /// `new` with every fixed setting (and the run-time `log.syslog`) taken from `self`.
    pub fn reloaded(&self, mut new: Config) -> Config {
        for fixed in FIXED {
            (fixed.keep)(&mut new, self);
        }
        new.log.syslog = self.log.syslog;
        new
    }

    /// Where this instance's broker listens: `channel.listen`, or the Unix socket beside the
    /// pid file.
    pub fn channel_listen(&self) -> std::borrow::Cow<'_, ChannelAddr> {
        match &self.channel.listen {
            Some(addr) => std::borrow::Cow::Borrowed(addr),
            None => std::borrow::Cow::Owned(ChannelAddr::Unix(sibling_path(&self.pid_file, "channel.sock"))),
        }
    }

    /// The broker this instance's workers talk to: the remote one, or its own.
    pub fn channel_target(&self) -> std::borrow::Cow<'_, ChannelAddr> {
        match &self.channel.connect {
            Some(addr) => std::borrow::Cow::Borrowed(addr),
            None => self.channel_listen(),
        }
    }

    /// The master's control socket, beside the pid file.
    pub fn control_socket(&self) -> PathBuf {
        sibling_path(&self.pid_file, "ctl.sock")
    }
}

pub fn log_level_filter(level: &str) -> Option<log::LevelFilter> {
    level.parse().ok()
}

fn absolute(path: &Path, key: &'static str) -> Result<PathBuf, ConfigError> {
    std::path::absolute(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_host_and_port_only() {
        for good in ["https://app.example.com", "http://127.0.0.1:8080", "https://[::1]", "http://[::1]:3000"] {
            assert!(is_origin(good), "{good}");
        }
        for bad in [
            "app.example.com",
            "https://",
            "https://a.com/",
            "https://a.com/x",
            "ftp://a.com",
            "https://a.com:0",
            "https://a.com:99999",
            "https://[::1",
            "https://[::1]x",
            "https://a b.com",
            "null",
            "*",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
        let auth = AuthSettings { allowed_origins: vec!["https://App.example.com".into()], ..Default::default() };
        assert!(auth.origin_allowed(Some("https://app.example.com")));
        assert!(auth.origin_allowed(None), "no Origin: not a browser");
        assert!(!auth.origin_allowed(Some("https://evil.example.com")));
        assert!(AuthSettings::default().origin_allowed(Some("https://evil.example.com")), "empty list: any Origin");
    }

    #[test]
    fn defaults_follow_the_seed() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.listen.map(|a| a.port()), Some(1234));
        assert_eq!(c.tls.listen, None);
        assert_eq!(*c.channel_listen(), ChannelAddr::Unix(sibling_path(&c.pid_file, "channel.sock")));
        assert!(c.workers >= 1);
    }

    #[test]
    fn channel_addr_forms() {
        assert_eq!("unix:/a/b".parse::<ChannelAddr>().unwrap(), ChannelAddr::Unix("/a/b".into()));
        assert!(matches!("127.0.0.1:2206".parse::<ChannelAddr>().unwrap(), ChannelAddr::Tcp(_)));
        assert!("nonsense".parse::<ChannelAddr>().is_err());
    }

    #[test]
    fn the_child_json_round_trips() {
        let mut c = Config::load(None, &Overrides::default()).unwrap();
        c.channel.listen = Some("127.0.0.1:9".parse().unwrap());
        c.user = Some("nobody".into());
        let back: Config = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn reload_keeps_every_fixed_setting() {
        let old = Config::load(None, &Overrides::default()).unwrap();
        let mut new = old.clone();
        new.bus = BusKind::Redis;
        new.redis.url = "redis://127.0.0.1:1/".into();
        new.channel.max_peers = 5;
        new.limits.max_group_id_len = 9;
        let changed = old.fixed_settings_changed(&new);
        assert_eq!(changed, ["bus", "redis", "channel.max_peers"]);
        let kept = old.reloaded(new);
        assert!(old.fixed_settings_changed(&kept).is_empty(), "everything reported is kept");
        assert_eq!(kept.limits.max_group_id_len, 9, "other settings do change");
    }

    #[test]
    fn tls_listen_is_fixed_and_its_files_are_not() {
        let old = Config::load(None, &Overrides::default()).unwrap();
        let mut new = old.clone();
        new.tls.listen = Some("127.0.0.1:1443".parse().unwrap());
        new.tls.cert_file = Some("/c.pem".into());
        let changed = old.fixed_settings_changed(&new);
        assert_eq!(changed, ["tls.listen"]);
        let kept = old.reloaded(new);
        assert_eq!(kept.tls.listen, None);
        assert_eq!(kept.tls.cert_file.as_deref(), Some(Path::new("/c.pem")), "certificate files reload");
    }

    #[test]
    fn empty_listen_addresses_mean_none_and_one_must_remain() {
        let parse = |text: &str| {
            toml::from_str::<Config>(text).map_err(|e| e.to_string()).and_then(|c| {
                c.validate().map_err(|e| e.to_string())?;
                Ok(c)
            })
        };
        let tls_only =
            parse("listen = \"\"\n[tls]\nlisten = \"127.0.0.1:0\"\ncert_file = \"c\"\nkey_file = \"k\"\n").unwrap();
        assert_eq!(tls_only.listen, None);
        assert!(tls_only.tls.listen.is_some());
        let json = serde_json::to_string(&tls_only).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), tls_only, "the child's JSON keeps `none`");
        assert!(parse("listen = \"\"\n").unwrap_err().contains("nothing to serve"));
        assert!(parse("[tls]\nlisten = \"127.0.0.1:0\"\n").unwrap_err().contains("tls.cert_file"));
        assert!(parse("[tls]\nlisten = \"127.0.0.1:0\"\ncert_file = \"c\"\n").unwrap_err().contains("tls.key_file"));
        assert!(parse("[tls]\nlisten = \"nope\"\n").unwrap_err().contains("tls.listen"));
        assert_eq!(parse("[tls]\nlisten = \"\"\n").unwrap().tls.listen, None);
    }
}
