//! The client wire protocol: one JSON object per text frame, parsed into a `Request`.
//!
//! Owned by the worker. Parsing borrows from the frame's bytes wherever the JSON has no escapes,
//! so the common command costs no allocation. Error codes and replies are documented in
//! docs/protocol.md; keep the two in step.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::channel::wire::PayloadKind;
use crate::config::Limits;

/// A command a client may send.
#[derive(Debug, PartialEq)]
pub enum Command<'a> {
    /// `token`: a per-group token (docs/security.md), for groups whose rule says `join = "token"`.
    /// `since`: protocol 2's recovery position (ignored on a seed connection).
    AddGroup {
        group: Cow<'a, str>,
        token: Option<Cow<'a, str>>,
        since: Option<SinceArg<'a>>,
    },
    /// Replace the connection token before it expires.
    Refresh {
        token: Cow<'a, str>,
    },
    LeaveGroup {
        group: Cow<'a, str>,
    },
    /// `message` is the text every member receives: a JSON string unescaped, anything else as
    /// its compact JSON text.
    SendToGroup {
        group: Cow<'a, str>,
        message: Cow<'a, str>,
        /// Whether `message` was a JSON string (protocol 2 envelopes it as one again).
        kind: PayloadKind,
    },
}

/// A join's `since`: the last position the client saw in the group.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinceArg<'a> {
    #[serde(borrow)]
    pub epoch: Cow<'a, str>,
    pub offset: u64,
}

/// Longest epoch accepted in `since` (the server's are 16 characters).
pub const MAX_EPOCH_LEN: usize = 64;

/// A parsed command plus the optional `id` that asks for a reply.
#[derive(Debug)]
pub struct Request<'a> {
    pub command: Command<'a>,
    /// Raw JSON of the client's `id`, echoed in the reply; `None`: the client wants silence.
    pub id: Option<&'a RawValue>,
}

/// Why a text frame was refused; each becomes an error frame with `code()`.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("not valid JSON: {0}")]
    InvalidJson(String),
    #[error("the frame must hold a JSON object")]
    NotAnObject,
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}` {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("unknown cmd {0:?} (expected add_group, send_to_group, leave_group or refresh)")]
    UnknownCmd(String),
    #[error("this connection is already in {0} groups, the most allowed")]
    TooManyGroups(usize),
    #[error("more than {0} commands per second: command refused")]
    RateLimited(u32),
    /// A group rule or the connection's token does not allow the command (docs/security.md).
    #[error("{0}")]
    Forbidden(String),
}

impl RequestError {
    /// The stable, machine-readable code sent in the error frame's `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::InvalidJson(_) => "invalid_json",
            RequestError::NotAnObject => "not_an_object",
            RequestError::MissingField(_) => "missing_field",
            RequestError::InvalidField { .. } => "invalid_field",
            RequestError::UnknownCmd(_) => "unknown_cmd",
            RequestError::TooManyGroups(_) => "too_many_groups",
            RequestError::RateLimited(_) => "rate_limited",
            RequestError::Forbidden(_) => "forbidden",
        }
    }
}

/// The object's fields as raw JSON; unknown fields are ignored, as the seed does. A field that
/// is present is `Some` even when it is `null` (serde's `Option` would make that `None`).
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    cmd: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    group_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    message: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    since: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses one text frame. On error, also returns the request's `id` when it could be read, so
/// the error frame can carry it.
pub fn parse_request<'a>(text: &'a str, limits: &Limits) -> Result<Request<'a>, (RequestError, Option<&'a RawValue>)> {
    // Checked first: serde would also accept an array as the struct's fields in order.
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => (RequestError::NotAnObject, None),
            Err(e) => (RequestError::InvalidJson(e.to_string()), None),
        });
    }
    let raw: RawRequest<'a> =
        serde_json::from_str(text).map_err(|e| (RequestError::InvalidJson(e.to_string()), None))?;
    let id = raw.id;
    parse_command(&raw, limits).map(|command| Request { command, id }).map_err(|e| (e, id))
}

fn parse_command<'a>(raw: &RawRequest<'a>, limits: &Limits) -> Result<Command<'a>, RequestError> {
    let cmd = raw.cmd.ok_or(RequestError::MissingField("cmd"))?;
    let cmd = json_string(cmd)
        .ok_or_else(|| RequestError::InvalidField { field: "cmd", reason: "must be a string".into() })?;
    match cmd.as_ref() {
        "add_group" => {
            let group = group_id(raw.group_id, limits)?;
            let since = raw.since.map(since).transpose()?;
            Ok(Command::AddGroup { group, token: raw.token.map(token).transpose()?, since })
        }
        "refresh" => Ok(Command::Refresh { token: token(raw.token.ok_or(RequestError::MissingField("token"))?)? }),
        "leave_group" => Ok(Command::LeaveGroup { group: group_id(raw.group_id, limits)? }),
        "send_to_group" => {
            let group = group_id(raw.group_id, limits)?;
            let (message, kind) = message_payload(raw.message.ok_or(RequestError::MissingField("message"))?)?;
            Ok(Command::SendToGroup { group, message, kind })
        }
        other => Err(RequestError::UnknownCmd(other.chars().take(64).collect())),
    }
}

/// A token: a string of at most `auth::MAX_TOKEN_LEN` bytes (checked before any decoding).
fn token(raw: &RawValue) -> Result<Cow<'_, str>, RequestError> {
    let max = crate::auth::MAX_TOKEN_LEN;
    if raw.get().len() > max + 2 {
        return Err(RequestError::InvalidField { field: "token", reason: format!("is longer than {max} bytes") });
    }
    json_string(raw).ok_or_else(|| RequestError::InvalidField { field: "token", reason: "must be a string".into() })
}

/// A join's `since`: `{"epoch":"...","offset":N}` with N a non-negative integer.
fn since(raw: &RawValue) -> Result<SinceArg<'_>, RequestError> {
    let bad = |reason: String| RequestError::InvalidField { field: "since", reason };
    let since: SinceArg<'_> = serde_json::from_str(raw.get())
        .map_err(|e| bad(format!("must be {{\"epoch\":string,\"offset\":non-negative integer}}: {e}")))?;
    if since.epoch.len() > MAX_EPOCH_LEN {
        return Err(bad(format!("epoch is longer than {MAX_EPOCH_LEN} bytes")));
    }
    Ok(since)
}

/// A JSON string's value, borrowed when it has no escapes.
fn json_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    if let Ok(s) = serde_json::from_str::<&str>(text) {
        return Some(Cow::Borrowed(s));
    }
    serde_json::from_str::<String>(text).ok().map(Cow::Owned)
}

/// A group id: a non-empty string or an integer, both as text, so `123` and `"123"` are one
/// group (PHP array keys merge them in the seed).
fn group_id<'a>(raw: Option<&'a RawValue>, limits: &Limits) -> Result<Cow<'a, str>, RequestError> {
    group_named(raw.ok_or(RequestError::MissingField("group_id"))?, "group_id", limits)
}

/// `group_id`'s rules for a group id in field `field` (the HTTP API calls it `group`).
pub fn group_named<'a>(raw: &'a RawValue, field: &'static str, limits: &Limits) -> Result<Cow<'a, str>, RequestError> {
    let group = if let Some(s) = json_string(raw) {
        s
    } else if let Ok(n) = raw.get().parse::<i64>() {
        Cow::Owned(n.to_string())
    } else if let Ok(n) = raw.get().parse::<u64>() {
        Cow::Owned(n.to_string())
    } else {
        return Err(RequestError::InvalidField { field, reason: "must be a string or an integer".into() });
    };
    if group.is_empty() {
        return Err(RequestError::InvalidField { field, reason: "must not be empty".into() });
    }
    if group.len() > limits.max_group_id_len {
        return Err(RequestError::InvalidField {
            field,
            reason: format!("is longer than {} bytes", limits.max_group_id_len),
        });
    }
    Ok(group)
}

/// A `message` as `send_to_group` delivers it: the text, and whether it was a JSON string.
pub fn message_payload(raw: &RawValue) -> Result<(Cow<'_, str>, PayloadKind), RequestError> {
    let kind = if raw.get().starts_with('"') { PayloadKind::Text } else { PayloadKind::Json };
    Ok((message_text(raw)?, kind))
}

/// The text delivered for `message`: a string as is, any other JSON value compacted.
fn message_text(raw: &RawValue) -> Result<Cow<'_, str>, RequestError> {
    if let Some(s) = json_string(raw) {
        return Ok(s);
    }
    let value: serde_json::Value = serde_json::from_str(raw.get())
        .map_err(|e| RequestError::InvalidField { field: "message", reason: e.to_string() })?;
    Ok(Cow::Owned(value.to_string()))
}

/// `{"id":<id>,"ok":true}`: the opt-in success reply.
pub fn ok_reply(id: &RawValue) -> Vec<u8> {
    format!("{{\"id\":{},\"ok\":true}}", id.get()).into_bytes()
}

/// A protocol-2 join's reply: `{"id":<id>,"ok":true,"epoch":"<e>","offset":N[,"recovered":B]}`.
pub fn position_reply(id: &RawValue, epoch: &str, offset: u64, recovered: Option<bool>) -> Vec<u8> {
    let epoch = serde_json::to_string(epoch).unwrap_or_else(|_| "\"\"".into());
    let mut out = format!("{{\"id\":{},\"ok\":true,\"epoch\":{epoch},\"offset\":{offset}", id.get());
    if let Some(recovered) = recovered {
        out.push_str(if recovered { ",\"recovered\":true" } else { ",\"recovered\":false" });
    }
    out.push('}');
    out.into_bytes()
}

/// A protocol-2 `send_to_group` reply: `{"id":<id>,"ok":true,"offset":N}`, without the offset
/// when it is unknown (0).
pub fn offset_reply(id: &RawValue, offset: u64) -> Vec<u8> {
    if offset == 0 {
        return ok_reply(id);
    }
    format!("{{\"id\":{},\"ok\":true,\"offset\":{offset}}}", id.get()).into_bytes()
}

/// `{"error":"<code>","detail":"<text>"[,"id":<id>]}`.
pub fn error_reply(error: &RequestError, id: Option<&RawValue>) -> Vec<u8> {
    // Built by hand so `error` comes first; the strings are escaped by serde_json.
    let detail = serde_json::to_string(&error.to_string()).unwrap_or_else(|_| "\"\"".into());
    let mut out = format!("{{\"error\":\"{}\",\"detail\":{detail}", error.code());
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(id.get());
    }
    out.push('}');
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Command<'_>, RequestError> {
        parse_request(text, &Limits::default()).map(|r| r.command).map_err(|(e, _)| e)
    }

    #[test]
    fn seed_commands() {
        assert_eq!(
            parse(r#"{"cmd":"add_group","group_id":"123"}"#),
            Ok(Command::AddGroup { group: "123".into(), token: None, since: None })
        );
        assert_eq!(
            parse(r#"{"cmd":"add_group","group_id":123}"#),
            Ok(Command::AddGroup { group: "123".into(), token: None, since: None })
        );
        assert_eq!(
            parse(r#"{"cmd":"send_to_group","group_id":"g","message":{"a": [1, 2]}}"#),
            Ok(Command::SendToGroup { group: "g".into(), message: r#"{"a":[1,2]}"#.into(), kind: PayloadKind::Json })
        );
        assert_eq!(
            parse(r#"{"cmd":"send_to_group","group_id":"g","message":null}"#),
            Ok(Command::SendToGroup { group: "g".into(), message: "null".into(), kind: PayloadKind::Json })
        );
        assert_eq!(
            parse(r#"{"cmd":"send_to_group","group_id":"g","message":"h\u00e9\"llo"}"#),
            Ok(Command::SendToGroup { group: "g".into(), message: "hé\"llo".into(), kind: PayloadKind::Text })
        );
    }

    #[test]
    fn bad_input_codes() {
        assert_eq!(parse("nope").unwrap_err().code(), "invalid_json");
        assert_eq!(parse("[1,2]").unwrap_err().code(), "not_an_object");
        assert_eq!(parse(r#"{"cmd":"x"}"#).unwrap_err().code(), "unknown_cmd");
        assert_eq!(parse(r#"{"group_id":"1"}"#).unwrap_err(), RequestError::MissingField("cmd"));
        assert_eq!(parse(r#"{"cmd":"add_group"}"#).unwrap_err(), RequestError::MissingField("group_id"));
        assert_eq!(parse(r#"{"cmd":"add_group","group_id":1.5}"#).unwrap_err().code(), "invalid_field");
        assert_eq!(parse(r#"{"cmd":"add_group","group_id":""}"#).unwrap_err().code(), "invalid_field");
        assert_eq!(
            parse(r#"{"cmd":"send_to_group","group_id":"1"}"#).unwrap_err(),
            RequestError::MissingField("message")
        );
        assert_eq!(parse(r#"{"cmd":7,"group_id":"1"}"#).unwrap_err().code(), "invalid_field");
        assert_eq!(parse(r#"{"cmd":null,"group_id":"1"}"#).unwrap_err().code(), "invalid_field");
        assert_eq!(parse(r#"{"cmd":"add_group","group_id":null}"#).unwrap_err().code(), "invalid_field");
    }

    #[test]
    fn tokens() {
        assert_eq!(
            parse(r#"{"cmd":"add_group","group_id":"r","token":"a.b.c"}"#),
            Ok(Command::AddGroup { group: "r".into(), token: Some("a.b.c".into()), since: None })
        );
        assert_eq!(parse(r#"{"cmd":"refresh","token":"a.b.c"}"#), Ok(Command::Refresh { token: "a.b.c".into() }));
        assert_eq!(parse(r#"{"cmd":"refresh"}"#).unwrap_err(), RequestError::MissingField("token"));
        assert_eq!(parse(r#"{"cmd":"refresh","token":7}"#).unwrap_err().code(), "invalid_field");
        let huge = format!(r#"{{"cmd":"refresh","token":"{}"}}"#, "a".repeat(5000));
        assert_eq!(parse(&huge).unwrap_err().code(), "invalid_field");
    }

    #[test]
    fn since_positions() {
        assert_eq!(
            parse(r#"{"cmd":"add_group","group_id":"g","since":{"epoch":"ab","offset":7}}"#),
            Ok(Command::AddGroup {
                group: "g".into(),
                token: None,
                since: Some(SinceArg { epoch: "ab".into(), offset: 7 })
            })
        );
        for bad in [
            r#"{"cmd":"add_group","group_id":"g","since":7}"#,
            r#"{"cmd":"add_group","group_id":"g","since":null}"#,
            r#"{"cmd":"add_group","group_id":"g","since":{"epoch":1,"offset":7}}"#,
            r#"{"cmd":"add_group","group_id":"g","since":{"epoch":"a","offset":-1}}"#,
            r#"{"cmd":"add_group","group_id":"g","since":{"epoch":"a","offset":1.5}}"#,
            r#"{"cmd":"add_group","group_id":"g","since":{"epoch":"a"}}"#,
            r#"{"cmd":"add_group","group_id":"g","since":{"epoch":"a","offset":1,"x":2}}"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().code(), "invalid_field", "{bad}");
        }
        let long =
            format!(r#"{{"cmd":"add_group","group_id":"g","since":{{"epoch":"{}","offset":1}}}}"#, "e".repeat(65));
        assert_eq!(parse(&long).unwrap_err().code(), "invalid_field");
    }

    #[test]
    fn replies_echo_the_id() {
        let r = parse_request(r#"{"cmd":"nope","id":{"k":1}}"#, &Limits::default()).unwrap_err();
        let reply: serde_json::Value = serde_json::from_slice(&error_reply(&r.0, r.1)).unwrap();
        assert_eq!(reply["id"]["k"], 1);
        assert_eq!(reply["error"], "unknown_cmd");
    }
}
