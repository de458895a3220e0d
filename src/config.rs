//! Configuration: embedded defaults, an optional TOML file (`-c FILE`), then command-line flags.
//!
//! Precedence, lowest first: the `DEFAULT_*` constants below, the TOML file, the flags of
//! `groupcast start`. The TOML layer is parsed into `FileConfig` (every field optional, unknown
//! keys rejected so a typo names itself), merged over `Config::default()`, and the result is
//! validated once by `Config::validate`. The master hands the resolved `Config` to each child as
//! JSON, so every process of an instance runs with exactly the same values.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// WebSocket listen address of the seed example.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:1234";
/// Pid file of an instance started without a config; the channel and control sockets sit beside it.
pub const DEFAULT_PID_FILE: &str = "/tmp/groupcast.pid";
/// Pid file of a standalone broker (`groupcast channel`) started without a config.
pub const DEFAULT_BROKER_PID_FILE: &str = "/tmp/groupcast-channel.pid";
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
/// Time a client has to finish a frame or fragmented message once it started sending it.
pub const DEFAULT_MESSAGE_TIMEOUT_MS: u64 = 30_000;
/// Longest `limits.message_timeout_ms` accepted: an hour.
const MAX_MESSAGE_TIMEOUT_MS: u64 = 3_600_000;
pub const DEFAULT_COMMANDS_PER_SECOND: u32 = 200;
pub const DEFAULT_COMMANDS_BURST: u32 = 400;
/// Bytes the broker queues for one channel peer before it cuts that peer off.
pub const DEFAULT_CHANNEL_PEER_BUFFER_LIMIT: usize = 256 << 20;
/// Largest channel frame accepted from a peer, in bytes.
pub const DEFAULT_CHANNEL_MAX_FRAME: usize = 16 << 20;
/// How long a channel peer may take to authenticate and send HELLO, in milliseconds.
pub const DEFAULT_CHANNEL_AUTH_TIMEOUT_MS: u64 = 5_000;
/// Channel peers one broker serves at once.
pub const DEFAULT_CHANNEL_MAX_PEERS: usize = 10_000;
/// How long a worker may take to answer the master's status query, in milliseconds.
pub const DEFAULT_STATUS_TIMEOUT_MS: u64 = 2000;
/// How long a graceful stop or reload waits for clients to close, in milliseconds.
pub const DEFAULT_GRACEFUL_TIMEOUT_MS: u64 = 30_000;

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

/// How an instance reaches the channel and how the channel protects what it carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelSettings {
    /// A remote broker to use instead of forking one (`[channel] connect`, `--channel-connect`).
    pub connect: Option<ChannelAddr>,
    /// File holding the shared secret peers and broker prove to each other (never the secret
    /// itself on a command line).
    pub secret_file: Option<PathBuf>,
    /// Let a broker without a secret listen on a non-loopback TCP address.
    pub insecure: bool,
    /// Unacknowledged publishes a worker keeps for resending, count (default 100000).
    pub queue_max_messages: usize,
    /// Unacknowledged publishes a worker keeps for resending, bytes (default 64 MiB).
    pub queue_max_bytes: usize,
    /// How long a fresh broker keeps messages for peers that subscribe late, ms (default 5000).
    pub grace_ms: u64,
    /// Bytes a fresh broker keeps during the grace window (default 64 MiB).
    pub grace_max_bytes: usize,
    /// Time a channel peer has to authenticate and introduce itself, ms (default 5000).
    pub auth_timeout_ms: u64,
    /// Channel peers a broker serves at once (default 10000); more are refused and counted.
    pub max_peers: usize,
}

impl Default for ChannelSettings {
    fn default() -> Self {
        ChannelSettings {
            connect: None,
            secret_file: None,
            insecure: false,
            queue_max_messages: 100_000,
            queue_max_bytes: 64 << 20,
            grace_ms: 5_000,
            grace_max_bytes: 64 << 20,
            auth_timeout_ms: DEFAULT_CHANNEL_AUTH_TIMEOUT_MS,
            max_peers: DEFAULT_CHANNEL_MAX_PEERS,
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
    /// Longest group id in bytes (default 256).
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
        }
    }
}

impl Limits {
    /// Connections one of `workers` workers may hold: its share of the total, at most the
    /// per-worker limit.
    pub fn connections_per_worker(&self, workers: usize) -> usize {
        self.max_connections_per_worker.min(self.max_connections.div_ceil(workers.max(1)))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let at_least = |key: &'static str, value: u64, min: u64, unit: &str| {
            if value < min {
                Err(invalid(key, format!("{value} is below the minimum of {min}{unit}")))
            } else {
                Ok(())
            }
        };
        at_least("limits.max_connections_per_worker", self.max_connections_per_worker as u64, 1, "")?;
        at_least("limits.max_connections", self.max_connections as u64, 1, "")?;
        at_least("limits.max_frame_size", self.max_frame_size as u64, 16, " bytes")?;
        at_least("limits.max_message_size", self.max_message_size as u64, 16, " bytes")?;
        at_least("limits.max_group_id_len", self.max_group_id_len as u64, 1, " bytes")?;
        at_least("limits.max_groups_per_connection", self.max_groups_per_connection as u64, 1, "")?;
        at_least("limits.send_buffer_limit", self.send_buffer_limit as u64, 1024, " bytes")?;
        at_least("limits.handshake_timeout_ms", self.handshake_timeout_ms, 100, " ms")?;
        at_least("limits.ping_interval_ms", self.ping_interval_ms, 100, " ms")?;
        at_least("limits.message_timeout_ms", self.message_timeout_ms, 100, " ms")?;
        if self.message_timeout_ms > MAX_MESSAGE_TIMEOUT_MS {
            return Err(invalid(
                "limits.message_timeout_ms",
                format!("{} is above the maximum of {MAX_MESSAGE_TIMEOUT_MS} ms", self.message_timeout_ms),
            ));
        }
        at_least("limits.commands_per_second", u64::from(self.commands_per_second), 1, "")?;
        at_least("limits.commands_burst", u64::from(self.commands_burst), 1, "")?;
        if self.idle_timeout_ms != 0 && self.idle_timeout_ms <= self.ping_interval_ms {
            return Err(invalid("limits.idle_timeout_ms", "must be 0 (off) or longer than limits.ping_interval_ms"));
        }
        Ok(())
    }
}

/// The resolved configuration of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// WebSocket listen address (default 0.0.0.0:1234).
    pub listen: SocketAddr,
    /// Number of worker processes (default: the CPU count).
    pub workers: usize,
    /// Pid file, locked while the instance runs (default /tmp/groupcast.pid).
    pub pid_file: PathBuf,
    /// Listen backlog of the WebSocket listeners (default 1024).
    pub backlog: u32,
    /// Channel server address (default: unix socket beside the pid file).
    pub channel_listen: ChannelAddr,
    /// Largest channel frame a peer may send, bytes (default 16 MiB).
    pub channel_max_frame: usize,
    /// Cluster settings of the channel: remote broker, secret, queues, grace window.
    pub channel: ChannelSettings,
    /// The bus between workers and instances (default channel).
    pub bus: BusKind,
    pub redis: RedisConfig,
    /// Bytes queued for one channel peer before the broker cuts it off (default 256 MiB).
    pub channel_peer_buffer_limit: usize,
    /// Log level: error, warn, info, debug, trace (default info).
    pub log_level: String,
    /// Log to syslog instead of stderr; set by `start -d`.
    pub syslog: bool,
    /// Path of the syslog socket (default /dev/log).
    pub syslog_socket: PathBuf,
    /// Syslog facility name (default daemon).
    pub syslog_facility: String,
    /// How long the master waits for each process's status answer, ms (default 2000).
    pub status_timeout_ms: u64,
    /// How long `stop -g` / `reload -g` let clients close before forcing, ms (default 30000).
    pub graceful_timeout_ms: u64,
    /// User to run as after binding, when started as root (default: stay as started).
    pub user: Option<String>,
    /// Group to run as after binding (default: the user's primary group).
    pub group: Option<String>,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        let pid_file = PathBuf::from(DEFAULT_PID_FILE);
        Config {
            listen: DEFAULT_LISTEN.parse().expect("default listen address parses"),
            workers: default_workers(),
            channel_listen: ChannelAddr::Unix(sibling_path(&pid_file, "channel.sock")),
            pid_file,
            backlog: DEFAULT_BACKLOG,
            channel_max_frame: DEFAULT_CHANNEL_MAX_FRAME,
            channel: ChannelSettings::default(),
            bus: BusKind::Channel,
            redis: RedisConfig::default(),
            channel_peer_buffer_limit: DEFAULT_CHANNEL_PEER_BUFFER_LIMIT,
            log_level: "info".into(),
            syslog: false,
            syslog_socket: PathBuf::from("/dev/log"),
            syslog_facility: "daemon".into(),
            status_timeout_ms: DEFAULT_STATUS_TIMEOUT_MS,
            graceful_timeout_ms: DEFAULT_GRACEFUL_TIMEOUT_MS,
            user: None,
            group: None,
            limits: Limits::default(),
        }
    }
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

/// The TOML file as written: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    workers: Option<usize>,
    pid_file: Option<PathBuf>,
    backlog: Option<u32>,
    status_timeout_ms: Option<u64>,
    graceful_timeout_ms: Option<u64>,
    user: Option<String>,
    group: Option<String>,
    channel: Option<FileChannel>,
    bus: Option<BusKind>,
    redis: Option<RedisConfig>,
    log: Option<FileLog>,
    limits: Option<Limits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileChannel {
    listen: Option<String>,
    connect: Option<String>,
    secret_file: Option<PathBuf>,
    insecure: Option<bool>,
    queue_max_messages: Option<usize>,
    queue_max_bytes: Option<usize>,
    grace_ms: Option<u64>,
    grace_max_bytes: Option<usize>,
    auth_timeout_ms: Option<u64>,
    max_peers: Option<usize>,
    max_frame: Option<usize>,
    peer_buffer_limit: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    level: Option<String>,
    syslog_socket: Option<PathBuf>,
    syslog_facility: Option<String>,
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

impl Config {
    /// Defaults, then the file at `path` (if any), then `overrides`; validated.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                })?
            }
            None => FileConfig::default(),
        };
        let mut config = Config::default();
        let mut channel_listen_set = false;
        let listen = overrides.listen.clone().or(file.listen);
        if let Some(listen) = listen {
            config.listen =
                listen.parse().map_err(|e| invalid("listen", format!("{listen:?} is not HOST:PORT ({e})")))?;
        }
        if let Some(workers) = overrides.workers.or(file.workers) {
            config.workers = workers;
        }
        if let Some(pid_file) = overrides.pid_file.clone().or(file.pid_file) {
            config.pid_file = pid_file;
        }
        if let Some(backlog) = file.backlog {
            config.backlog = backlog;
        }
        let channel = file.channel.unwrap_or_default();
        if let Some(addr) = overrides.channel_listen.clone().or(channel.listen) {
            config.channel_listen = addr.parse().map_err(|e| invalid("channel.listen", e))?;
            channel_listen_set = true;
        }
        if let Some(addr) = overrides.channel_connect.clone().or(channel.connect) {
            config.channel.connect = Some(addr.parse().map_err(|e| invalid("channel.connect", e))?);
        }
        if let Some(path) = overrides.channel_secret_file.clone().or(channel.secret_file) {
            config.channel.secret_file = Some(absolute(&path, "channel.secret_file")?);
        }
        config.channel.insecure = overrides.channel_insecure || channel.insecure.unwrap_or(false);
        if let Some(v) = channel.queue_max_messages {
            config.channel.queue_max_messages = v;
        }
        if let Some(v) = channel.queue_max_bytes {
            config.channel.queue_max_bytes = v;
        }
        if let Some(v) = channel.grace_ms {
            config.channel.grace_ms = v;
        }
        if let Some(v) = channel.grace_max_bytes {
            config.channel.grace_max_bytes = v;
        }
        if let Some(v) = channel.auth_timeout_ms {
            config.channel.auth_timeout_ms = v;
        }
        if let Some(v) = channel.max_peers {
            config.channel.max_peers = v;
        }
        if let Some(v) = channel.max_frame {
            config.channel_max_frame = v;
        }
        if let Some(v) = channel.peer_buffer_limit {
            config.channel_peer_buffer_limit = v;
        }
        let log = file.log.unwrap_or_default();
        if let Some(level) = log.level {
            config.log_level = level;
        }
        if let Some(socket) = log.syslog_socket {
            config.syslog_socket = socket;
        }
        if let Some(facility) = log.syslog_facility {
            config.syslog_facility = facility;
        }
        if let Some(bus) = file.bus {
            config.bus = bus;
        }
        if let Some(redis) = file.redis {
            config.redis = redis;
        }
        if let Some(limits) = file.limits {
            config.limits = limits;
        }
        if let Some(v) = file.status_timeout_ms {
            config.status_timeout_ms = v;
        }
        if let Some(v) = file.graceful_timeout_ms {
            config.graceful_timeout_ms = v;
        }
        config.user = file.user;
        config.group = file.group;
        // Paths must survive the daemon's chdir("/"), so they are made absolute here, once.
        config.pid_file = absolute(&config.pid_file, "pid_file")?;
        if !channel_listen_set {
            config.channel_listen = ChannelAddr::Unix(sibling_path(&config.pid_file, "channel.sock"));
        } else if let ChannelAddr::Unix(p) = &config.channel_listen {
            config.channel_listen = ChannelAddr::Unix(absolute(p, "channel.listen")?);
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 || self.workers > 1024 {
            return Err(invalid("workers", format!("{} is not in 1..=1024", self.workers)));
        }
        if self.backlog == 0 {
            return Err(invalid("backlog", "must be at least 1"));
        }
        if log_level_filter(&self.log_level).is_none() {
            return Err(invalid(
                "log.level",
                format!("{:?} is not one of error, warn, info, debug, trace", self.log_level),
            ));
        }
        if crate::logging::facility(&self.syslog_facility).is_none() {
            return Err(invalid(
                "log.syslog_facility",
                format!("{:?} is not a syslog facility (daemon, user, local0..local7)", self.syslog_facility),
            ));
        }
        self.limits.validate()?;
        if self.graceful_timeout_ms == 0 {
            return Err(invalid("graceful_timeout_ms", "must be at least 1"));
        }
        if self.channel.connect.is_none() {
            if let ChannelAddr::Tcp(addr) = self.channel_listen {
                if !addr.ip().is_loopback() && self.channel.secret_file.is_none() && !self.channel.insecure {
                    return Err(invalid(
                        "channel.listen",
                        format!(
                            "{addr} is reachable from other hosts and no channel.secret_file is set; \
                             set one (or channel.insecure = true to accept unauthenticated peers)"
                        ),
                    ));
                }
            }
        }
        if self.channel.queue_max_messages == 0 || self.channel.queue_max_bytes < 1024 {
            return Err(invalid(
                "channel.queue_max_messages",
                "the publish queue needs room (>= 1 message, >= 1024 bytes)",
            ));
        }
        if !(1..=3_600_000).contains(&self.channel.auth_timeout_ms) {
            return Err(invalid("channel.auth_timeout_ms", "must be 1 to 3600000 (one hour)"));
        }
        if !(1..=10_000_000).contains(&self.channel.max_peers) {
            return Err(invalid("channel.max_peers", "must be 1 to 10000000"));
        }
        if self.channel_max_frame < 1024 {
            return Err(invalid("channel.max_frame", "must be at least 1024 bytes"));
        }
        for (key, ms) in [
            ("redis.connect_timeout_ms", self.redis.connect_timeout_ms),
            ("redis.io_timeout_ms", self.redis.io_timeout_ms),
        ] {
            if !(1..=86_400_000).contains(&ms) {
                return Err(invalid(key, "must be 1 to 86400000 ms"));
            }
        }
        Ok(())
    }

    /// Settings a reload cannot change (they are bound or fixed at start), each named for the
    /// operator; the reloaded config keeps the running values for them.
    pub fn fixed_settings_changed(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        check("listen", self.listen != new.listen);
        check("workers", self.workers != new.workers);
        check("pid_file", self.pid_file != new.pid_file);
        check("backlog", self.backlog != new.backlog);
        check("channel.listen", self.channel_listen != new.channel_listen);
        check("channel.connect", self.channel.connect != new.channel.connect);
        check("bus", self.bus != new.bus);
        check("redis", self.redis != new.redis);
        check("channel.secret_file", self.channel.secret_file != new.channel.secret_file);
        check("user", self.user != new.user);
        check("group", self.group != new.group);
        check("log.syslog_socket", self.syslog_socket != new.syslog_socket);
        check("log.syslog_facility", self.syslog_facility != new.syslog_facility);
        changed
    }

    /// `new` with the settings a reload cannot change taken from `self`.
    pub fn reloaded(&self, new: Config) -> Config {
        Config {
            listen: self.listen,
            workers: self.workers,
            pid_file: self.pid_file.clone(),
            backlog: self.backlog,
            channel_listen: self.channel_listen.clone(),
            channel: ChannelSettings {
                connect: self.channel.connect.clone(),
                secret_file: self.channel.secret_file.clone(),
                ..new.channel.clone()
            },
            user: self.user.clone(),
            group: self.group.clone(),
            syslog: self.syslog,
            syslog_socket: self.syslog_socket.clone(),
            syslog_facility: self.syslog_facility.clone(),
            ..new
        }
    }

    /// The broker this instance's workers talk to: the remote one, or its own.
    pub fn channel_target(&self) -> &ChannelAddr {
        self.channel.connect.as_ref().unwrap_or(&self.channel_listen)
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
    fn defaults_follow_the_seed() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.listen.port(), 1234);
        assert_eq!(c.channel_listen, ChannelAddr::Unix("/tmp/groupcast.channel.sock".into()));
        assert!(c.workers >= 1);
    }

    #[test]
    fn channel_addr_forms() {
        assert_eq!("unix:/a/b".parse::<ChannelAddr>().unwrap(), ChannelAddr::Unix("/a/b".into()));
        assert!(matches!("127.0.0.1:2206".parse::<ChannelAddr>().unwrap(), ChannelAddr::Tcp(_)));
        assert!("nonsense".parse::<ChannelAddr>().is_err());
    }
}
