//! `[api]`: the HTTP API listener (docs/api.md): where it listens, the bearer key that guards
//! it, and the bounds every HTTP client is held to. Without `listen` (the default) there is no
//! API and no api process.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use super::{invalid, ConfigError, MAX_DURATION_MS};

/// Longest key file read, in bytes.
const MAX_KEY_FILE: u64 = 4096;
/// Shortest key accepted: anything shorter is guessable.
pub const MIN_KEY_LEN: usize = 16;

/// The bearer key. Its `Debug` never shows it, so it cannot reach a log line.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey(Vec<u8>);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({} bytes)", self.0.len())
    }
}

impl ApiKey {
    /// Whether `presented` is the key, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use sha2::{Digest, Sha256};
        // Comparing digests makes the time independent of the length too.
        let (a, b) = (Sha256::digest(&self.0), Sha256::digest(presented));
        a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    #[cfg(test)]
    pub fn from_bytes(bytes: &[u8]) -> ApiKey {
        ApiKey(bytes.to_vec())
    }
}

/// Reads a key file: at most `MAX_KEY_FILE` bytes, one trailing newline removed, at least
/// `MIN_KEY_LEN` bytes left, no other control characters (a header cannot carry them).
pub fn load_key(path: &Path) -> Result<ApiKey, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > MAX_KEY_FILE {
        return Err(format!("{} is {} bytes; a key file is at most {MAX_KEY_FILE}", path.display(), meta.len()));
    }
    let mut bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if bytes.len() < MIN_KEY_LEN {
        return Err(format!("the key in {} is {} bytes; use at least {MIN_KEY_LEN}", path.display(), bytes.len()));
    }
    if bytes.iter().any(|&b| !(0x21..=0x7e).contains(&b)) {
        return Err(format!(
            "the key in {} must be printable ASCII without spaces (it travels in an HTTP header)",
            path.display()
        ));
    }
    Ok(ApiKey(bytes))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// The API's listen address, e.g. `127.0.0.1:1235` (default none: no API; `""` is none).
    #[serde(deserialize_with = "api_listen_addr")]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer key (`Authorization: Bearer KEY`); default none: no key, and
    /// then `listen` must be a loopback address.
    pub key_file: Option<PathBuf>,
    /// Serve the chat demo (examples/chat) at `/demo/` (default false).
    pub demo: bool,
    /// HTTP connections served at once (default 256).
    pub max_connections: usize,
    /// Longest request line plus headers, bytes (default 16384).
    pub max_header_bytes: usize,
    /// Time from a request's first byte to its last, ms (default 10000).
    pub request_timeout_ms: u64,
    /// Time an idle keep-alive connection stays open, ms (default 30000).
    pub keepalive_timeout_ms: u64,
    /// Time the bus may take to number a publish before the answer is 503, ms (default 5000).
    pub publish_timeout_ms: u64,
    /// Group publishes per second through the API, all clients together (default 100000).
    pub publishes_per_second: u32,
    /// Their burst (default 200000).
    pub publishes_burst: u32,
    /// The key read from `key_file` at load (the master reads it and hands it to the api
    /// process beside the config, control::handoff); never shown in `status`.
    #[serde(skip)]
    pub key: Option<ApiKey>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            listen: None,
            key_file: None,
            demo: false,
            max_connections: 256,
            max_header_bytes: 16 * 1024,
            request_timeout_ms: 10_000,
            keepalive_timeout_ms: 30_000,
            publish_timeout_ms: 5_000,
            publishes_per_second: 100_000,
            publishes_burst: 200_000,
            key: None,
        }
    }
}

impl ApiSettings {
    /// Bounds every value and refuses an unguarded API reachable from other hosts.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        #[rustfmt::skip]
        let bounds: &[(&'static str, u64, u64, u64)] = &[
            ("api.max_connections", self.max_connections as u64, 1, 100_000),
            ("api.max_header_bytes", self.max_header_bytes as u64, 1024, 1 << 20),
            ("api.request_timeout_ms", self.request_timeout_ms, 100, MAX_DURATION_MS),
            ("api.keepalive_timeout_ms", self.keepalive_timeout_ms, 100, MAX_DURATION_MS),
            ("api.publish_timeout_ms", self.publish_timeout_ms, 100, MAX_DURATION_MS),
            ("api.publishes_per_second", u64::from(self.publishes_per_second), 1, 10_000_000),
            ("api.publishes_burst", u64::from(self.publishes_burst), 1, 10_000_000),
        ];
        for &(key, value, min, max) in bounds {
            if !(min..=max).contains(&value) {
                return Err(invalid(key, format!("{value} is not in {min}..={max}")));
            }
        }
        if let Some(addr) = self.listen {
            if self.key_file.is_none() && !addr.ip().is_loopback() {
                return Err(invalid(
                    "api.listen",
                    format!(
                        "{addr} is reachable from other hosts and no api.key_file is set; set one \
                         (anyone who reaches the API can publish to every group)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads `key_file` (the master does this at start and at every reload).
    pub(super) fn load_key(&mut self) -> Result<(), ConfigError> {
        self.key = match &self.key_file {
            Some(path) => Some(load_key(path).map_err(|e| invalid("api.key_file", e))?),
            None => None,
        };
        Ok(())
    }
}

fn api_listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    super::optional_listen(d, "api.listen")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_matches_itself_only() {
        let key = ApiKey::from_bytes(b"0123456789abcdef");
        assert!(key.matches(b"0123456789abcdef"));
        assert!(!key.matches(b"0123456789abcdeF"));
        assert!(!key.matches(b"0123456789abcdef0"));
        assert!(!key.matches(b""));
        assert_eq!(format!("{key:?}"), "ApiKey(16 bytes)");
    }

    #[test]
    fn key_files_are_bounded_and_checked() {
        let dir = std::env::temp_dir().join(format!("groupcast-apikey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        assert_eq!(load_key(&write("ok", b"0123456789abcdef\r\n")).unwrap(), ApiKey::from_bytes(b"0123456789abcdef"));
        assert!(load_key(&write("short", b"short\n")).unwrap_err().contains("at least 16"));
        assert!(load_key(&write("space", b"0123456789 abcdef")).unwrap_err().contains("printable"));
        assert!(load_key(&write("long", &[b'a'; 5000])).unwrap_err().contains("at most 4096"));
        assert!(load_key(&dir.join("missing")).unwrap_err().contains("cannot read"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_open_api_must_stay_on_loopback() {
        let mut api = ApiSettings { listen: Some("0.0.0.0:1235".parse().unwrap()), ..Default::default() };
        assert!(api.validate().unwrap_err().to_string().contains("api.listen"));
        api.listen = Some("127.0.0.1:1235".parse().unwrap());
        assert!(api.validate().is_ok());
        api.listen = Some("0.0.0.0:1235".parse().unwrap());
        api.key_file = Some("/k".into());
        assert!(api.validate().is_ok());
        api.max_connections = 0;
        assert!(api.validate().unwrap_err().to_string().contains("api.max_connections"));
    }
}
