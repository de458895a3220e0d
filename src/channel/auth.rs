//! Channel authentication: a challenge-response over a shared secret, so the secret itself
//! never crosses the wire. The broker sends a nonce (CHALLENGE); the peer answers with its own
//! nonce and HMAC-SHA256(secret, "groupcast-peer" | broker nonce | peer nonce) (AUTH); the broker
//! proves it knows the secret too with HMAC(secret, "groupcast-broker" | peer nonce | broker
//! nonce) (AUTH_OK). Fresh nonces on both sides make a recorded exchange useless for replay.
//! Threat model: docs/cluster.md.

use std::path::Path;

use anyhow::{bail, Context};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::wire::{MAC_LEN, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted: 16 bytes (128 bits) of key material.
const MIN_SECRET: usize = 16;

/// A fresh random nonce from the kernel (getrandom(2): no file descriptor, so it works when
/// a saturated broker has none left).
pub fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n)?;
    Ok(n)
}

/// A random origin id for a publisher (worker process or `publish` run). Origins must differ
/// across every host of a cluster and every restart, or receivers would take one publisher's
/// messages for another's repeats; 63 random bits make a collision practically impossible
/// (pids alone repeat across hosts). `top_bit` marks `publish` runs apart from workers.
pub fn random_origin(top_bit: bool) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b)?;
    let id = u64::from_be_bytes(b) & !(1 << 63);
    Ok(if top_bit { id | (1 << 63) } else { id.max(1) })
}

/// Reads the shared secret from `path` (trailing newline removed). Refuses short secrets and
/// warns when the file is readable by others.
pub fn load_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let mut secret =
        std::fs::read(path).with_context(|| format!("cannot read channel secret file {}", path.display()))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < MIN_SECRET {
        bail!("channel secret in {} is shorter than {MIN_SECRET} bytes", path.display());
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            log::warn!("channel secret file {} is readable by group or others; chmod 600 it", path.display());
        }
    }
    Ok(secret)
}

fn mac(secret: &[u8], label: &[u8], first: &[u8], second: &[u8]) -> HmacSha256 {
    // new_from_slice accepts keys of any length for HMAC.
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(first);
    m.update(second);
    m
}

/// The peer's proof for broker nonce `sn` and its own nonce `cn`.
pub fn peer_proof(secret: &[u8], sn: &[u8; NONCE_LEN], cn: &[u8; NONCE_LEN]) -> [u8; MAC_LEN] {
    mac(secret, b"groupcast-peer", sn, cn).finalize().into_bytes().into()
}

/// The broker's proof in return.
pub fn broker_proof(secret: &[u8], cn: &[u8; NONCE_LEN], sn: &[u8; NONCE_LEN]) -> [u8; MAC_LEN] {
    mac(secret, b"groupcast-broker", cn, sn).finalize().into_bytes().into()
}

/// Constant-time check of a peer's proof.
pub fn verify_peer(secret: &[u8], sn: &[u8; NONCE_LEN], cn: &[u8; NONCE_LEN], proof: &[u8; MAC_LEN]) -> bool {
    mac(secret, b"groupcast-peer", sn, cn).verify_slice(proof).is_ok()
}

/// Constant-time check of the broker's proof.
pub fn verify_broker(secret: &[u8], cn: &[u8; NONCE_LEN], sn: &[u8; NONCE_LEN], proof: &[u8; MAC_LEN]) -> bool {
    mac(secret, b"groupcast-broker", cn, sn).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_random_and_marked() {
        let a = random_origin(false).unwrap();
        let b = random_origin(false).unwrap();
        assert_ne!(a, b);
        assert_eq!(a >> 63, 0, "workers never set the top bit");
        assert_eq!(random_origin(true).unwrap() >> 63, 1, "publish runs do");
    }

    #[test]
    fn proofs_check_out_only_with_the_same_secret() {
        let (sn, cn) = (nonce().unwrap(), nonce().unwrap());
        let secret = b"0123456789abcdef-secret";
        let p = peer_proof(secret, &sn, &cn);
        assert!(verify_peer(secret, &sn, &cn, &p));
        assert!(!verify_peer(b"another secret of 16+", &sn, &cn, &p));
        assert!(!verify_peer(secret, &cn, &sn, &p), "nonces are not interchangeable");
        let b = broker_proof(secret, &cn, &sn);
        assert_ne!(b, p, "the two directions use different labels");
        assert!(verify_broker(secret, &cn, &sn, &b));
    }
}
