//! Wire format: the protocol's commands and the self-describing benchmark payload
//! `"<publisher>:<seq>:<send_ns>:<group>:<padding>"`, padded to the message size;
//! protocol 2's envelope `{"group":..,"offset":..,"message":..}` around it.

use std::borrow::Cow;
use std::fmt::Write;

use serde_json::Value;

/// `{"cmd":"add_group",...}`, with an `id` (asks for a reply) when given.
pub fn add_group(group: u32, id: Option<u64>) -> String {
    match id {
        Some(id) => format!(r#"{{"cmd":"add_group","group_id":"{group}","id":{id}}}"#),
        None => format!(r#"{{"cmd":"add_group","group_id":"{group}"}}"#),
    }
}

/// `{"cmd":"send_to_group",...}`; `message` is a payload (ASCII, no JSON escapes needed).
pub fn send_to_group(group: u32, message: &str) -> String {
    format!(r#"{{"cmd":"send_to_group","group_id":"{group}","message":"{message}"}}"#)
}

/// What a payload says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payload {
    pub publisher: u32,
    pub seq: u64,
    pub send_ns: u64,
    pub group: u32,
}

impl Payload {
    /// Encode, padded with `x` to `size` bytes (longer if the header alone exceeds it).
    pub fn encode(&self, size: usize) -> String {
        let mut s = String::with_capacity(size.max(48));
        let _ = write!(s, "{}:{}:{}:{}:", self.publisher, self.seq, self.send_ns, self.group);
        while s.len() < size {
            s.push('x');
        }
        s
    }

    /// Decode a received text frame; None if it is not a benchmark payload.
    pub fn decode(text: &str) -> Option<Payload> {
        let mut it = text.splitn(5, ':');
        let publisher = it.next()?.parse().ok()?;
        let seq = it.next()?.parse().ok()?;
        let send_ns = it.next()?.parse().ok()?;
        let group = it.next()?.parse().ok()?;
        it.next()?;
        Some(Payload { publisher, seq, send_ns, group })
    }
}

/// A protocol-2 frame about a group: a numbered message, or (message None) a gap notice
/// `{"group":..,"gap":true,"epoch":..,"offset":N}`.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub group: Cow<'a, str>,
    pub offset: u64,
    pub message: Option<Cow<'a, str>>,
}

impl Envelope<'_> {
    /// Parse a text frame that starts with `{"group":`; None if it is neither a message
    /// envelope nor a gap notice. The envelope the server writes (keys in this order, the
    /// payload a JSON string) is parsed without allocating or scanning the payload, so
    /// protocol 2 costs the loader about what protocol 1 does; anything else goes through
    /// serde_json. The fast path hands back a string payload's escapes as they are.
    pub fn decode(text: &str) -> Option<Envelope<'_>> {
        Self::fast(text).or_else(|| Self::slow(text))
    }

    fn fast(text: &str) -> Option<Envelope<'_>> {
        let rest = text.strip_prefix(r#"{"group":""#)?;
        let (group, rest) = rest.split_once('"')?;
        let rest = rest.strip_prefix(r#","offset":"#)?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let offset = rest[..digits].parse().ok()?;
        let message = rest[digits..].strip_prefix(r#","message":""#)?.strip_suffix(r#""}"#)?;
        // The message is not scanned for escapes: that would cost the loader a pass over every
        // 64 KiB S7 payload per delivery (it did: S7 became loader-bound). Only the payload's
        // header is read, and an escape there fails its number parsing (malformed), as the
        // protocol-1 path never looks at the padding either.
        if group.contains('\\') {
            return None;
        }
        Some(Envelope { group: Cow::Borrowed(group), offset, message: Some(Cow::Borrowed(message)) })
    }

    fn slow(text: &str) -> Option<Envelope<'static>> {
        let v: Value = serde_json::from_str(text).ok()?;
        let group = Cow::Owned(v.get("group")?.as_str()?.to_owned());
        let offset = v.get("offset")?.as_u64()?;
        if v.get("gap").and_then(Value::as_bool) == Some(true) {
            return Some(Envelope { group, offset, message: None });
        }
        let message = match v.get("message")? {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some(Envelope { group, offset, message: Some(Cow::Owned(message)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_and_gap_notices() {
        let e = Envelope::decode(r#"{"group":"7","offset":17,"message":"1:2:3:7:xx"}"#).unwrap();
        assert_eq!((e.group.as_ref(), e.offset, e.message.as_deref()), ("7", 17, Some("1:2:3:7:xx")));
        assert!(matches!(e.message, Some(Cow::Borrowed(_))));
        let e = Envelope::decode(r#"{"group":"7","offset":3,"message":{"a":1}}"#).unwrap();
        assert_eq!(e.message.as_deref(), Some(r#"{"a":1}"#));
        let e = Envelope::decode(r#"{"group":"7","offset":2,"message":"a\"b"}"#).unwrap();
        assert_eq!(e.message.as_deref(), Some(r#"a\"b"#), "raw: only the payload header is read");
        assert_eq!(Payload::decode(r#"1\":2:3:7:x"#), None, "an escape in the header is malformed");
        let e = Envelope::decode(r#"{"group":"7","gap":true,"epoch":"e","offset":9}"#).unwrap();
        assert_eq!((e.offset, e.message), (9, None));
        assert_eq!(Envelope::decode(r#"{"group":"7"}"#), None);
    }

    #[test]
    fn roundtrip_and_size() {
        let p = Payload { publisher: 1002, seq: 7, send_ns: 123_456_789, group: 19 };
        let s = p.encode(64);
        assert_eq!(s.len(), 64);
        assert_eq!(Payload::decode(&s), Some(p));
        assert_eq!(Payload::decode(r#"{"id":1,"ok":true}"#), None);
    }
}
