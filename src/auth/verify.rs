//! Checking a token in a worker: the signature with the configured key and algorithm only, the
//! time claims (`exp`, `nbf`, with `auth.leeway_secs`), then our claims. A connection token
//! becomes an `Identity` kept on the connection; a per-group token only says yes or no.

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::keys::{JwtAlg, JwtKey};

/// Longest token accepted, in bytes (URL, header or command); a longer one is refused unread.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Longest `sub`, in bytes: it is kept per connection and shown by `connections`.
pub const MAX_SUB_LEN: usize = 256;
/// Highest `rate_limit` a token may set, commands per second (as for `[limits]`).
const MAX_RATE: u64 = 1_000_000;

/// Why a token was refused: the short text of the 401 body or of the `forbidden` detail.
/// It names the reason, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token required")]
    Missing,
    #[error("tokens not configured")]
    NotConfigured,
    #[error("token too long")]
    TooLong,
    #[error("two tokens (URL and Authorization)")]
    Twice,
    #[error("malformed token")]
    Malformed,
    #[error("algorithm not allowed")]
    WrongAlgorithm,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token has no sub")]
    NoSub,
    #[error("bad claim")]
    BadClaim,
}

/// What a connection token allows; kept (boxed) on the connection for its life or until a
/// refresh replaces it. Anonymous connections have none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub sub: Box<str>,
    /// Unix seconds; the worker's sweep closes the connection with 4001 after it.
    pub exp: Option<u64>,
    /// Globs of groups the connection may join where a rule says `join = "token"`.
    pub join: Box<[Box<str>]>,
    /// Globs of groups it may publish to where a rule says `publish = "token"`.
    pub publish: Box<[Box<str>]>,
    pub rate: RateOverride,
}

/// The `rate_limit` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateOverride {
    /// Absent (or `true`): the configured limits apply.
    Configured,
    /// `false`: no command rate limit at all (a trusted backend publisher).
    Unlimited,
    /// A number: that many commands per second, burst twice as many, for every command.
    PerSecond(u32),
}

#[derive(Deserialize)]
struct ConnectionClaims {
    sub: Option<String>,
    exp: Option<u64>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    rate_limit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct GroupClaims {
    group: Option<String>,
    sub: Option<String>,
}

/// Only the time claims are typed here: a string where a number belongs is refused rather
/// than ignored (jsonwebtoken skips a time claim it cannot parse).
#[derive(Deserialize)]
struct TimeClaims {
    #[allow(dead_code)]
    exp: Option<u64>,
    #[allow(dead_code)]
    nbf: Option<u64>,
}

#[derive(Deserialize)]
struct HeaderAlg {
    alg: String,
}

/// A worker's verifier, built once from the key the master handed over.
pub struct Verifier {
    alg: JwtAlg,
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(key: &JwtKey, leeway_secs: u64) -> Result<Verifier, String> {
        let (decoding, alg) = match key.alg {
            JwtAlg::HS256 => (DecodingKey::from_secret(&key.material), Algorithm::HS256),
            JwtAlg::RS256 => (DecodingKey::from_rsa_pem(&key.material).map_err(|e| e.to_string())?, Algorithm::RS256),
            JwtAlg::ES256 => (DecodingKey::from_ec_pem(&key.material).map_err(|e| e.to_string())?, Algorithm::ES256),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // `sub` is checked by us (with a reason of our own); `exp` is optional.
        validation.required_spec_claims.clear();
        // No audience or issuer is configured: the key alone says who minted the token.
        validation.validate_aud = false;
        Ok(Verifier { alg: key.alg, key: decoding, validation })
    }

    pub fn alg(&self) -> JwtAlg {
        self.alg
    }

    /// Signature and time claims; the payload's JSON on success.
    fn check(&self, token: &str) -> Result<serde_json::Value, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        // The header first, by hand: jsonwebtoken cannot even parse `"alg":"none"` and would
        // call it malformed; the operator should read what it is.
        let header = token.split('.').next().ok_or(TokenError::Malformed)?;
        let header =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).map_err(|_| TokenError::Malformed)?;
        let header: HeaderAlg = serde_json::from_slice(&header).map_err(|_| TokenError::Malformed)?;
        if header.alg != self.alg.name() {
            return Err(TokenError::WrongAlgorithm);
        }
        match jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation) {
            Ok(data) => {
                serde_json::from_value::<TimeClaims>(data.claims.clone()).map_err(|_| TokenError::BadClaim)?;
                Ok(data.claims)
            }
            Err(e) => Err(match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidEcdsaKey => {
                    TokenError::BadSignature
                }
                ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                _ => TokenError::Malformed,
            }),
        }
    }

    /// A connection token: signature, times, then `sub` and our claims.
    pub fn connection(&self, token: &str) -> Result<Identity, TokenError> {
        let claims = self.check(token)?;
        let claims: ConnectionClaims = serde_json::from_value(claims).map_err(|_| TokenError::BadClaim)?;
        let sub = claims.sub.filter(|s| !s.is_empty()).ok_or(TokenError::NoSub)?;
        if sub.len() > MAX_SUB_LEN {
            return Err(TokenError::BadClaim);
        }
        let rate = match claims.rate_limit {
            None | Some(serde_json::Value::Bool(true)) => RateOverride::Configured,
            Some(serde_json::Value::Bool(false)) => RateOverride::Unlimited,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=MAX_RATE).contains(&n) => RateOverride::PerSecond(n as u32),
                _ => return Err(TokenError::BadClaim),
            },
        };
        let boxed = |v: Vec<String>| v.into_iter().map(String::into_boxed_str).collect::<Box<[_]>>();
        Ok(Identity {
            sub: sub.into_boxed_str(),
            exp: claims.exp,
            join: boxed(claims.groups),
            publish: boxed(claims.publish),
            rate,
        })
    }

    /// A per-group token for joining `group`: its `group` claim names exactly that group and,
    /// when the connection has a `sub`, its `sub` is the same.
    pub fn group(&self, token: &str, group: &str, conn_sub: Option<&str>) -> Result<(), GroupTokenError> {
        let claims = self.check(token).map_err(GroupTokenError::Token)?;
        let claims: GroupClaims =
            serde_json::from_value(claims).map_err(|_| GroupTokenError::Token(TokenError::BadClaim))?;
        if claims.group.as_deref() != Some(group) {
            return Err(GroupTokenError::OtherGroup);
        }
        if let Some(sub) = conn_sub {
            if claims.sub.as_deref() != Some(sub) {
                return Err(GroupTokenError::OtherSub);
            }
        }
        Ok(())
    }
}

/// Why a per-group token does not open its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroupTokenError {
    #[error("group token: {0}")]
    Token(TokenError),
    #[error("group token is for another group")]
    OtherGroup,
    #[error("group token is for another sub")]
    OtherSub,
}
