//! What a child inherits from the master across exec: its listeners (plain and TLS), its end of
//! the status link and the TLS certificate and key (a sealed memfd) at fixed descriptor numbers, and the resolved config in the environment, so every
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
/// Environment variable carrying the resolved config (JSON) from master to child.
pub const CONFIG_ENV: &str = "GROUPCAST_CHILD_CONFIG";

/// The environment value: the config plus what the master decided at run time and the file
/// cannot say (`log.syslog` is set by `start -d`, never by the file).
#[derive(Serialize, Deserialize)]
struct ChildConfig<'a> {
    syslog: bool,
    config: std::borrow::Cow<'a, Config>,
}

/// The value of `CONFIG_ENV` for children of a master running `config`.
pub fn encode_child_config(config: &Config) -> serde_json::Result<String> {
    serde_json::to_string(&ChildConfig { syslog: config.log.syslog, config: std::borrow::Cow::Borrowed(config) })
}

/// Reads the resolved config the master put in the environment.
pub fn child_config() -> anyhow::Result<Config> {
    let json = std::env::var(CONFIG_ENV)
        .with_context(|| format!("{CONFIG_ENV} is not set: this subcommand is started by the master"))?;
    let passed: ChildConfig<'static> =
        serde_json::from_str(&json).context("config passed by the master does not parse")?;
    let mut config = passed.config.into_owned();
    config.log.syslog = passed.syslog;
    Ok(config)
}
