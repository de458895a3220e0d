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
/// The reload generation a worker was started in (0 at start); its connection ids carry it
/// (`first_conn_id`), so ids handed over from an older worker never collide.
pub const GENERATION_ENV: &str = "GROUPCAST_GENERATION";
/// Environment variable naming the per-IP table column a worker writes.
pub const PER_IP_COLUMN_ENV: &str = "GROUPCAST_PER_IP_COLUMN";
/// Environment variable telling the api process the ports the WebSocket listeners got
/// (`PLAIN,TLS`, each empty when absent), which the config cannot say when it asks for port 0.
pub const WS_PORTS_ENV: &str = "GROUPCAST_WS_PORTS";
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

/// Bits of a connection id below the worker index: each worker numbers up to 2^32
/// connections per reload generation before its counter runs into the index bits.
const CONN_COUNTER_BITS: u32 = 32;
/// Bits of the worker index (`workers` is at most 1024).
const CONN_INDEX_BITS: u32 = 10;

/// The first connection id of worker `index` started in reload `generation`: ids are
/// `generation << 42 | index << 32 | n`, n counting from 1, so they are unique across the
/// workers of an instance (the API closes a connection by its id) and across reloads
/// (connections handed over keep theirs). The generation wraps after 2^22 reloads.
pub fn first_conn_id(generation: u64, index: usize) -> u64 {
    let generation = generation & ((1 << (64 - CONN_COUNTER_BITS - CONN_INDEX_BITS)) - 1);
    let index = index as u64 & ((1 << CONN_INDEX_BITS) - 1);
    (generation << (CONN_COUNTER_BITS + CONN_INDEX_BITS)) | (index << CONN_COUNTER_BITS) | 1
}

/// The WebSocket ports the master bound (`WS_PORTS_ENV`), plain and TLS.
pub fn ws_ports() -> (Option<u16>, Option<u16>) {
    let value = std::env::var(WS_PORTS_ENV).unwrap_or_default();
    let mut ports = value.split(',').map(|p| p.parse().ok());
    (ports.next().flatten(), ports.next().flatten())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_differ_by_worker_and_generation() {
        assert_eq!(first_conn_id(0, 0), 1);
        assert_eq!(first_conn_id(0, 1), (1 << 32) + 1);
        assert_eq!(first_conn_id(1, 0), (1 << 42) + 1);
        assert_eq!(first_conn_id(3, 1023) >> 42, 3);
        assert_eq!((first_conn_id(3, 1023) >> 32) & 1023, 1023);
        // Out-of-range parts are masked, never shifted into a neighbour's bits.
        assert_eq!(first_conn_id(1 << 22, 1024), 1);
    }
}
