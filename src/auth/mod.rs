//! Access control for clients (issue 11): JWT connection tokens checked at the HTTP upgrade,
//! per-group tokens on `add_group`, `[[groups]]` rules deciding who may join and publish, and
//! the glob matcher both use. Runs in the workers; the master only reads the key file
//! (keys.rs) and validates the rules at load. The whole design, and the answer to every case,
//! is in docs/security.md.
//!
//! - glob.rs: `*` / `?` patterns over group names.
//! - keys.rs: the verification key read from `auth.jwt_secret_file` / `jwt_public_key_file`.
//! - verify.rs: token checks, the `Identity` a connection token gives.
//! - rules.rs: `[[groups]]` and first-match lookup.

pub mod glob;
pub mod keys;
pub mod rules;
pub mod verify;

pub use keys::{JwtAlg, JwtKey};
pub use rules::{Access, GroupRule, Rules};
pub use verify::{GroupTokenError, Identity, RateOverride, TokenError, Verifier, MAX_TOKEN_LEN};

use crate::config::AuthSettings;

/// What a worker decides with: the `[auth]` settings, the verifier built from the key the
/// master read, and the rules. Without `[auth]` and `[[groups]]` (the default) every decision
/// is "yes" and no token is expected, as in the seed.
#[derive(Default)]
pub struct Gate {
    settings: AuthSettings,
    verifier: Option<Verifier>,
    rules: Rules,
}

impl Gate {
    /// Builds the worker's gate; fails only if the key handed over does not parse (the master
    /// checked it, so that would be a bug or a corrupted hand-over).
    pub fn new(settings: AuthSettings, rules: Vec<GroupRule>) -> Result<Gate, String> {
        let verifier = settings.jwt_key.as_ref().map(|key| Verifier::new(key, settings.leeway_secs)).transpose()?;
        Ok(Gate { settings, verifier, rules: Rules::new(rules) })
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn verifier(&self) -> Option<&Verifier> {
        self.verifier.as_ref()
    }

    /// The handshake's decision on the token it carried (if any): an identity, none
    /// (anonymous, allowed), or the reason for a 401. A token that is present is always
    /// checked, even where none is required: a bad one silently ignored hides bugs.
    pub fn admit(&self, token: Option<&str>) -> Result<Option<Identity>, TokenError> {
        match (token, &self.verifier) {
            (None, _) if self.settings.require_token => Err(TokenError::Missing),
            (None, _) => Ok(None),
            (Some(t), _) if t.len() > MAX_TOKEN_LEN => Err(TokenError::TooLong),
            (Some(_), None) => Err(TokenError::NotConfigured),
            (Some(t), Some(v)) => v.connection(t).map(Some),
        }
    }

    /// May this connection join `group`, governed by `rule` (the first matching one, if any)?
    /// `group_token` is the command's per-group token; when present it is always checked.
    pub fn may_join(
        &self,
        rule: Option<&GroupRule>,
        group: &str,
        identity: Option<&Identity>,
        group_token: Option<&str>,
    ) -> Result<(), String> {
        let access = rule.map_or(Access::Anyone, |r| r.join);
        if access == Access::None {
            return Err(format!("no one may join {group:?}"));
        }
        let by_group_token = match group_token {
            None => false,
            Some(token) => {
                let verifier = self.verifier.as_ref().ok_or_else(|| TokenError::NotConfigured.to_string())?;
                verifier.group(token, group, identity.map(|i| &*i.sub)).map_err(|e| e.to_string())?;
                true
            }
        };
        match access {
            Access::Token if !by_group_token && !identity.is_some_and(|i| glob::any_matches(&i.join, group)) => {
                Err(format!("joining {group:?} needs a token that allows it"))
            }
            _ => Ok(()),
        }
    }

    /// May this connection publish to `group` (with `send_to_group`), governed by `rule`?
    pub fn may_publish(
        &self,
        rule: Option<&GroupRule>,
        group: &str,
        identity: Option<&Identity>,
    ) -> Result<(), String> {
        match rule.map_or(Access::Anyone, |r| r.publish) {
            Access::Anyone => Ok(()),
            Access::None => Err(format!("no one may publish to {group:?} from a WebSocket")),
            Access::Token if identity.is_some_and(|i| glob::any_matches(&i.publish, group)) => Ok(()),
            Access::Token => Err(format!("publishing to {group:?} needs a token that allows it")),
        }
    }
}

impl From<AuthSettings> for Gate {
    /// A gate without rules (tests, the handshake property tests).
    fn from(settings: AuthSettings) -> Gate {
        Gate::new(settings, Vec::new()).expect("a key that parses")
    }
}
