//! The peer's side of the channel handshake, written once for every peer that dials a broker
//! (the worker's `ChannelClient`, `groupcast publish`): wait for CHALLENGE, answer with AUTH
//! when the broker requires the shared secret, and accept nothing else until the broker has
//! proved the secret in AUTH_OK. Sans-IO: frames in, bytes to send out, so the non-blocking
//! client and the blocking `publish` drive the same state machine.
//!
//! Any other frame before the handshake is done (a MESSAGE above all: a fake broker at the
//! configured address must not inject into groups) is a protocol violation; the caller drops
//! the connection.

use super::{auth, wire};

/// Why the handshake failed; the connection is dropped.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("broker speaks channel protocol {broker}, this peer {}", wire::VERSION)]
    Version { broker: u8 },
    #[error("the broker requires a shared secret; set [channel] secret_file")]
    SecretRequired,
    #[error("the broker does not authenticate, but a secret is configured: refusing it")]
    BrokerUnauthenticated,
    #[error("the broker failed to prove the shared secret")]
    BadBrokerProof,
    #[error("unexpected {frame} frame from the broker before the handshake finished")]
    Unexpected { frame: &'static str },
    #[error("no random nonce: {0}")]
    Random(#[from] std::io::Error),
}

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Connected; the broker's CHALLENGE has not arrived yet.
    AwaitChallenge,
    /// AUTH sent; waiting for the broker's proof.
    AwaitAuthOk { peer_nonce: [u8; wire::NONCE_LEN], broker_nonce: [u8; wire::NONCE_LEN] },
    /// The broker is trusted (proved the secret, or none is configured on either side).
    Done,
}

impl Handshake {
    pub fn is_done(&self) -> bool {
        matches!(self, Handshake::Done)
    }

    /// Feeds one frame from the broker; an answer (AUTH) is appended to `out`. `Ok(true)` once
    /// the handshake is done by this frame. Call only while not done.
    pub fn on_frame(
        &mut self,
        secret: Option<&[u8]>,
        frame: &wire::Frame<'_>,
        out: &mut Vec<u8>,
    ) -> Result<bool, HandshakeError> {
        match (frame, *self) {
            (wire::Frame::Challenge { version, flags, nonce }, Handshake::AwaitChallenge) => {
                if *version != wire::VERSION {
                    return Err(HandshakeError::Version { broker: *version });
                }
                let required = flags & wire::FLAG_AUTH_REQUIRED != 0;
                match (secret, required) {
                    (Some(secret), true) => {
                        let peer_nonce = auth::nonce()?;
                        wire::encode_auth(out, &peer_nonce, &auth::peer_proof(secret, nonce, &peer_nonce));
                        *self = Handshake::AwaitAuthOk { peer_nonce, broker_nonce: *nonce };
                        Ok(false)
                    }
                    (None, false) => {
                        *self = Handshake::Done;
                        Ok(true)
                    }
                    (None, true) => Err(HandshakeError::SecretRequired),
                    (Some(_), false) => Err(HandshakeError::BrokerUnauthenticated),
                }
            }
            (wire::Frame::AuthOk { mac }, Handshake::AwaitAuthOk { peer_nonce, broker_nonce }) => {
                let secret = secret.unwrap_or_default();
                if !auth::verify_broker(secret, &peer_nonce, &broker_nonce, mac) {
                    return Err(HandshakeError::BadBrokerProof);
                }
                *self = Handshake::Done;
                Ok(true)
            }
            (other, _) => Err(HandshakeError::Unexpected { frame: other.kind() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef-secret";

    fn challenge(flags: u8, nonce: [u8; wire::NONCE_LEN]) -> wire::Frame<'static> {
        wire::Frame::Challenge { version: wire::VERSION, flags, nonce }
    }

    #[test]
    fn authenticated_broker_must_prove_the_secret() {
        let mut h = Handshake::AwaitChallenge;
        let mut out = Vec::new();
        let sn = [9; wire::NONCE_LEN];
        assert!(!h.on_frame(Some(SECRET), &challenge(wire::FLAG_AUTH_REQUIRED, sn), &mut out).unwrap());
        let Some((wire::Frame::Auth { nonce: cn, mac }, _)) = wire::decode(&out, 1024).unwrap() else { panic!() };
        assert!(auth::verify_peer(SECRET, &sn, &cn, &mac));
        // A MESSAGE before AUTH_OK is a violation, and so is a wrong proof.
        let msg = wire::Frame::Message { origin: 1, seq: 1, group: "g", payload: b"x" };
        assert!(matches!(h.clone().on_frame(Some(SECRET), &msg, &mut out), Err(HandshakeError::Unexpected { .. })));
        let bad = wire::Frame::AuthOk { mac: [0; wire::MAC_LEN] };
        assert!(matches!(h.clone().on_frame(Some(SECRET), &bad, &mut out), Err(HandshakeError::BadBrokerProof)));
        let good = wire::Frame::AuthOk { mac: auth::broker_proof(SECRET, &cn, &sn) };
        assert!(h.on_frame(Some(SECRET), &good, &mut out).unwrap());
        assert!(h.is_done());
    }

    #[test]
    fn secrets_must_match_on_both_sides() {
        let mut out = Vec::new();
        let open = challenge(0, [1; wire::NONCE_LEN]);
        assert!(Handshake::AwaitChallenge.on_frame(None, &open, &mut out).unwrap());
        assert!(matches!(
            Handshake::AwaitChallenge.on_frame(Some(SECRET), &open, &mut out),
            Err(HandshakeError::BrokerUnauthenticated)
        ));
        let closed = challenge(wire::FLAG_AUTH_REQUIRED, [1; wire::NONCE_LEN]);
        assert!(matches!(
            Handshake::AwaitChallenge.on_frame(None, &closed, &mut out),
            Err(HandshakeError::SecretRequired)
        ));
        let msg = wire::Frame::Message { origin: 1, seq: 1, group: "g", payload: b"x" };
        assert!(Handshake::AwaitChallenge.on_frame(None, &msg, &mut out).is_err(), "nothing before CHALLENGE");
    }
}
