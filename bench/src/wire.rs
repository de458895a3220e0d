//! Wire format: the protocol's commands and the self-describing benchmark payload
//! `"<publisher>:<seq>:<send_ns>:<group>:<padding>"`, padded to the message size.

use std::fmt::Write;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_size() {
        let p = Payload { publisher: 1002, seq: 7, send_ns: 123_456_789, group: 19 };
        let s = p.encode(64);
        assert_eq!(s.len(), 64);
        assert_eq!(Payload::decode(&s), Some(p));
        assert_eq!(Payload::decode(r#"{"id":1,"ok":true}"#), None);
    }
}
