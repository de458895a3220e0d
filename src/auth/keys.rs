//! The key that verifies tokens, read by the master from `auth.jwt_secret_file` (HS256) or
//! `auth.jwt_public_key_file` (PEM: RSA -> RS256, EC P-256 -> ES256) at start and at every
//! reload. Workers never open the file (after a privilege drop they may not be able to): the
//! master hands them the bytes beside the config (control::handoff), and they build their
//! `jsonwebtoken::DecodingKey` from it once (verify.rs).

use std::fmt;
use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Longest key file read, in bytes: a 16384-bit RSA public key is under 3 KiB of PEM.
const MAX_KEY_FILE: u64 = 64 * 1024;
/// DER of the OID of the P-256 curve (1.2.840.10045.3.1.7), as it appears in the key's
/// SubjectPublicKeyInfo: ES256 is defined over this curve only.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

/// The one algorithm tokens must be signed with; any other (and `none`) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlg {
    HS256,
    RS256,
    ES256,
}

impl JwtAlg {
    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            JwtAlg::HS256 => "HS256",
            JwtAlg::RS256 => "RS256",
            JwtAlg::ES256 => "ES256",
        }
    }
}

/// The verification key's material: the shared secret (HS256) or the PEM text of the public
/// key. Its `Debug` shows the algorithm only, so it never reaches a log line.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtKey {
    pub alg: JwtAlg,
    pub material: Vec<u8>,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtKey({}, {} bytes)", self.alg.name(), self.material.len())
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > MAX_KEY_FILE {
        return Err(format!("{} is {} bytes; a key file is at most {MAX_KEY_FILE}", path.display(), meta.len()));
    }
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// HS256: the file's bytes, trailing newline (`\n` or `\r\n`, as editors add) removed.
pub fn load_secret(path: &Path) -> Result<JwtKey, String> {
    let mut secret = read_bounded(path)?;
    while secret.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
        secret.pop();
    }
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(JwtKey { alg: JwtAlg::HS256, material: secret })
}

/// RS256 or ES256, told by the PEM itself.
pub fn load_public_key(path: &Path) -> Result<JwtKey, String> {
    let pem = read_bounded(path)?;
    let text = std::str::from_utf8(&pem).map_err(|_| format!("{} is not PEM text", path.display()))?;
    if text.contains("PRIVATE KEY") {
        // Verifying needs only the public half; the private key has no business on this host.
        return Err(format!("{} holds a private key; give the public key (openssl pkey -pubout)", path.display()));
    }
    if jsonwebtoken::DecodingKey::from_rsa_pem(&pem).is_ok() {
        return Ok(JwtKey { alg: JwtAlg::RS256, material: pem });
    }
    if jsonwebtoken::DecodingKey::from_ec_pem(&pem).is_ok() {
        if !pem_der(text).is_some_and(|der| der.windows(P256_OID.len()).any(|w| w == P256_OID)) {
            return Err(format!("{}: an EC key on another curve than P-256 (ES256 needs P-256)", path.display()));
        }
        return Ok(JwtKey { alg: JwtAlg::ES256, material: pem });
    }
    Err(format!("{} is not an RSA or EC P-256 public key in PEM", path.display()))
}

/// The DER inside the first PEM block.
fn pem_der(text: &str) -> Option<Vec<u8>> {
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_loses_its_trailing_newline_and_never_shows() {
        let dir = std::env::temp_dir().join(format!("gc-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        std::fs::write(&path, "hunter2\r\n").unwrap();
        let key = load_secret(&path).unwrap();
        assert_eq!(key.material, b"hunter2");
        assert!(!format!("{key:?}").contains("hunter2"));
        std::fs::write(&path, "\n").unwrap();
        assert!(load_secret(&path).unwrap_err().contains("empty"));
        std::fs::write(&path, "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n").unwrap();
        assert!(load_public_key(&path).unwrap_err().contains("private key"));
        std::fs::write(&path, "nonsense").unwrap();
        assert!(load_public_key(&path).unwrap_err().contains("not an RSA or EC"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
