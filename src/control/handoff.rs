//! What a child inherits from the master across exec: its listeners (plain and TLS), its end of
//! the status link, the TLS certificate and key (a sealed memfd), (workers) the per-IP table
//! and (hand-off reload) the hand-off socket at fixed descriptor numbers, its generation, and the resolved config in the environment, so every
//! process of an instance runs with exactly the master's values.

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Descriptor number at which a child finds the listener the master bound for it.
pub const CHILD_LISTENER_FD: i32 = 3;
/// Descriptor number at which a child finds its end of the status link.
pub const CHILD_LINK_FD: i32 = 4;
/// Descriptor number at which a worker finds its `wss://` listener (with `tls.listen`).
pub const CHILD_TLS_LISTENER_FD: i32 = 5;
/// Descriptor number of the sealed memfd with the certificate chain and key the master read
/// and checked (with `tls.listen`); see `tls::Material`.
pub const CHILD_TLS_MATERIAL_FD: i32 = 6;
/// Descriptor number at which a worker finds the shared per-IP connection table (`per_ip.rs`).
pub const CHILD_PER_IP_FD: i32 = 7;
/// Descriptor number at which a worker started by a hand-off reload finds its end of the
/// hand-off socket (SOCK_SEQPACKET) shared with the worker it replaces.
pub const CHILD_HANDOFF_FD: i32 = 8;
/// Set (to `1`) in the environment of a worker started to receive a hand-off at
/// `CHILD_HANDOFF_FD`.
pub const HANDOFF_ENV: &str = "GROUPCAST_HANDOFF";
/// The reload generation a worker was started in (0 at start): its connection ids start at
/// `(generation << 32) + 1`, so ids handed over from an older worker never collide.
pub const GENERATION_ENV: &str = "GROUPCAST_GENERATION";
/// Environment variable naming the per-IP table column a worker writes.
pub const PER_IP_COLUMN_ENV: &str = "GROUPCAST_PER_IP_COLUMN";
/// Environment variable carrying the resolved config (JSON) from master to child.
pub const CONFIG_ENV: &str = "GROUPCAST_CHILD_CONFIG";

/// The environment value: the config plus what the master decided at run time and the file
/// cannot say (`log.syslog` is set by `start -d`, never by the file).
#[derive(Serialize, Deserialize)]
struct ChildConfig<'a> {
    syslog: bool,
    /// The token key the master read from `auth.jwt_*_file`: workers may not be able to read
    /// that file after the privilege drop.
    #[serde(default)]
    jwt_key: Option<crate::auth::JwtKey>,
    /// The API's bearer key, read from `api.key_file` by the master for the same reason.
    #[serde(default)]
    api_key: Option<crate::config::ApiKey>,
    config: std::borrow::Cow<'a, Config>,
}

/// The value of `CONFIG_ENV` for children of a master running `config`.
pub fn encode_child_config(config: &Config) -> serde_json::Result<String> {
    serde_json::to_string(&ChildConfig {
        syslog: config.log.syslog,
        jwt_key: config.auth.jwt_key.clone(),
        api_key: config.api.key.clone(),
        config: std::borrow::Cow::Borrowed(config),
    })
}

/// Reads the resolved config the master put in the environment.
pub fn child_config() -> anyhow::Result<Config> {
    let json = std::env::var(CONFIG_ENV)
        .with_context(|| format!("{CONFIG_ENV} is not set: this subcommand is started by the master"))?;
    let passed: ChildConfig<'static> =
        serde_json::from_str(&json).context("config passed by the master does not parse")?;
    let mut config = passed.config.into_owned();
    config.log.syslog = passed.syslog;
    config.auth.jwt_key = passed.jwt_key;
    config.api.key = passed.api_key;
    Ok(config)
}

/// The reload generation of this worker from `GENERATION_ENV` (0 when unset or unreadable:
/// a worker started by hand).
pub fn generation() -> u64 {
    std::env::var(GENERATION_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}
