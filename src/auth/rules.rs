//! `[[groups]]`: who may join and publish to which groups, and at what command rate. Rules are
//! read in order and the first whose `pattern` matches the group decides; a group no rule
//! matches is open to anyone, as in the seed. Parsed and bounded at load (config.rs calls
//! `validate_rules`); the worker asks `Rules::find` on each join and publish.

use serde::{Deserialize, Serialize};

use super::glob;

/// Most `[[groups]]` rules: each join or publish may scan them all.
pub const MAX_RULES: usize = 1024;
/// Longest `pattern`, in bytes.
pub const MAX_PATTERN_LEN: usize = 1024;
/// Highest per-rule `commands_per_second` / `commands_burst` (as for `[limits]`).
const MAX_RATE: u32 = 1_000_000;

/// Who may do something to a group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Every connection, with or without a token (the seed's behaviour).
    #[default]
    Anyone,
    /// A connection whose token allows it (its `groups` / `publish` claims), or for joins a
    /// per-group token.
    Token,
    /// Nobody over WebSocket (publishing stays possible through the channel: `groupcast publish`).
    None,
}

/// One `[[groups]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRule {
    /// Glob over group names (`*` any run, `.` included; `?` one character). Required.
    pub pattern: String,
    /// Who may `add_group` a matching group (default anyone).
    #[serde(default)]
    pub join: Access,
    /// Who may `send_to_group` a matching group (default anyone).
    #[serde(default)]
    pub publish: Access,
    /// Command rate for commands naming a matching group, replacing `limits.commands_per_second`
    /// for them (default: none, the connection's limit applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands_per_second: Option<u32>,
    /// Burst of that rate (default twice `commands_per_second`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands_burst: Option<u32>,
}

impl GroupRule {
    /// The rule's own command rate (per second, burst), if it sets one.
    pub fn rate(&self) -> Option<(u32, u32)> {
        self.commands_per_second.map(|r| (r, self.commands_burst.unwrap_or(r.saturating_mul(2).min(MAX_RATE))))
    }
}

/// Checks the rules at load; the message names the rule by its position (1-based, as an
/// operator counts `[[groups]]` tables).
pub fn validate_rules(rules: &[GroupRule]) -> Result<(), String> {
    if rules.len() > MAX_RULES {
        return Err(format!("{} rules; at most {MAX_RULES}", rules.len()));
    }
    for (i, rule) in rules.iter().enumerate() {
        let n = i + 1;
        if rule.pattern.is_empty() || rule.pattern.len() > MAX_PATTERN_LEN {
            return Err(format!("rule {n}: `pattern` must be 1..={MAX_PATTERN_LEN} bytes"));
        }
        if let Some(rate) = rule.commands_per_second {
            if !(1..=MAX_RATE).contains(&rate) {
                return Err(format!(
                    "rule {n} ({:?}): commands_per_second {rate} is not in 1..={MAX_RATE}",
                    rule.pattern
                ));
            }
        }
        match (rule.commands_per_second, rule.commands_burst) {
            (None, Some(_)) => {
                return Err(format!("rule {n} ({:?}): commands_burst without commands_per_second", rule.pattern))
            }
            (_, Some(burst)) if !(1..=MAX_RATE).contains(&burst) => {
                return Err(format!("rule {n} ({:?}): commands_burst {burst} is not in 1..={MAX_RATE}", rule.pattern))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The rules in force in a worker.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<GroupRule>,
}

impl Rules {
    pub fn new(rules: Vec<GroupRule>) -> Rules {
        Rules { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule matching `group` and its index, or `None` (anyone, default rate).
    pub fn find(&self, group: &str) -> Option<(usize, &GroupRule)> {
        self.rules.iter().enumerate().find(|(_, r)| glob::matches(&r.pattern, group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, join: Access) -> GroupRule {
        GroupRule {
            pattern: pattern.into(),
            join,
            publish: Access::Anyone,
            commands_per_second: None,
            commands_burst: None,
        }
    }

    #[test]
    fn first_match_wins() {
        let rules = Rules::new(vec![rule("public.*", Access::Anyone), rule("*", Access::Token)]);
        assert_eq!(rules.find("public.news").map(|(i, _)| i), Some(0));
        assert_eq!(rules.find("user.1").map(|(_, r)| r.join), Some(Access::Token));
        assert!(Rules::default().find("x").is_none());
    }

    #[test]
    fn bounds() {
        assert!(validate_rules(&[rule("", Access::Anyone)]).is_err());
        let mut r = rule("x", Access::Anyone);
        r.commands_burst = Some(5);
        assert!(validate_rules(&[r.clone()]).is_err());
        r.commands_per_second = Some(0);
        assert!(validate_rules(&[r.clone()]).is_err());
        r.commands_per_second = Some(10);
        assert!(validate_rules(&[r.clone()]).is_ok());
        assert_eq!(r.rate(), Some((10, 5)));
        r.commands_burst = None;
        assert_eq!(r.rate(), Some((10, 20)));
    }
}
