//! Channel framing, shared by broker and workers (docs/channel-protocol.md).
//!
//! Every frame: `u32` big-endian length of what follows, then a `u8` type, then the body.
//! Strings are `u16` big-endian length + UTF-8 bytes. A MESSAGE frame travels unchanged from
//! the publishing worker through the broker to each subscriber, so the broker never re-encodes.

/// Version sent in HELLO and CHALLENGE by peers that know nothing of offsets (`groupcast
/// publish`, older workers).
pub const VERSION: u8 = 1;
/// HELLO version of a peer that speaks the offset frames (PUBLISH, PUBLICATION, STAMP,
/// HISTORY, HISTORY_ITEM, POSITION): it is sent PUBLICATION instead of MESSAGE and a STAMP for
/// each of its publishes. A broker accepts both versions.
pub const VERSION_OFFSETS: u8 = 2;

pub const HELLO: u8 = 1;
pub const SUBSCRIBE: u8 = 2;
pub const UNSUBSCRIBE: u8 = 3;
pub const MESSAGE: u8 = 4;
pub const CHALLENGE: u8 = 5;
pub const AUTH: u8 = 6;
pub const AUTH_OK: u8 = 7;
pub const ACK: u8 = 8;
pub const RESUBSCRIBE: u8 = 9;
pub const PUBLISH: u8 = 10;
pub const PUBLICATION: u8 = 11;
pub const STAMP: u8 = 12;
pub const HISTORY: u8 = 13;
pub const HISTORY_ITEM: u8 = 14;
pub const POSITION: u8 = 15;
pub const REPUBLISH: u8 = 16;

/// What a payload is, for protocol 2's envelope: the text of a JSON string (enveloped as a
/// JSON string again) or compact JSON text (enveloped as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    Text = 0,
    Json = 1,
}

impl PayloadKind {
    fn from_u8(b: u8) -> Option<PayloadKind> {
        match b {
            0 => Some(PayloadKind::Text),
            1 => Some(PayloadKind::Json),
            _ => None,
        }
    }
}

/// A client's position in a group's history (`since` of a join), as a peer asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since<'a> {
    pub epoch: &'a str,
    pub offset: u64,
}

/// Bytes of an authentication nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes of an HMAC-SHA256 proof.
pub const MAC_LEN: usize = 32;
/// CHALLENGE flag: the broker requires AUTH before anything else.
pub const FLAG_AUTH_REQUIRED: u8 = 1;
/// CHALLENGE flag: the broker understands REPUBLISH. Peers ignore flags they do not know, so
/// an older worker is unaffected, and a worker sends REPUBLISH only to a broker that sets it.
pub const FLAG_REPUBLISH: u8 = 2;

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// A decoded frame, borrowing from the receive buffer.
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    /// First frame of a connection: protocol version, the peer's origin id, a name for logs.
    Hello {
        version: u8,
        origin: u64,
        name: &'a str,
    },
    Subscribe {
        group: &'a str,
    },
    Unsubscribe {
        group: &'a str,
    },
    /// A subscription the peer had before it reconnected: a fresh broker replays what it
    /// holds for the group (plain SUBSCRIBE, a new first member, gets no history).
    Resubscribe {
        group: &'a str,
    },
    /// A group message: `origin` and `seq` identify the publish; `payload` is the text members get.
    Message {
        origin: u64,
        seq: u64,
        group: &'a str,
        payload: &'a [u8],
    },
    /// Broker's first frame on every connection: its protocol version, flags, a fresh nonce.
    Challenge {
        version: u8,
        flags: u8,
        nonce: [u8; NONCE_LEN],
    },
    /// Peer's proof of the shared secret: its own nonce and HMAC(secret, peer|sn|cn).
    Auth {
        nonce: [u8; NONCE_LEN],
        mac: [u8; MAC_LEN],
    },
    /// Broker's proof in return: HMAC(secret, broker|cn|sn).
    AuthOk {
        mac: [u8; MAC_LEN],
    },
    /// The broker has forwarded every MESSAGE of this peer up to `seq`.
    Ack {
        seq: u64,
    },
    /// A publish of an offsets peer (version 2): MESSAGE plus what the payload is.
    Publish {
        origin: u64,
        seq: u64,
        kind: PayloadKind,
        group: &'a str,
        payload: &'a [u8],
    },
    /// A PUBLISH sent again after a reconnect, written to an earlier connection and never
    /// acknowledged: a broker that lost the peer's record (a restarted one) may not number
    /// it, since the broker that died may have numbered and forwarded it already.
    Republish {
        origin: u64,
        seq: u64,
        kind: PayloadKind,
        group: &'a str,
        payload: &'a [u8],
    },
    /// A group message as the broker sends it to an offsets peer: with the offset the broker
    /// gave it in its group (0: forwarded without one, a REPUBLISH the broker may not number).
    Publication {
        origin: u64,
        seq: u64,
        offset: u64,
        kind: PayloadKind,
        group: &'a str,
        payload: &'a [u8],
    },
    /// To an offsets peer, for each of its own publishes, in stream order: the offset the
    /// publish `seq` got. Offset 0: a resend the broker had handled before (offset unknown).
    Stamp {
        seq: u64,
        offset: u64,
    },
    /// An offsets peer asks for a group's position and, with `since`, for the messages after
    /// it (at most `limit`). Answered by HISTORY_ITEMs (only when all of them can be given)
    /// and then one POSITION, all carrying `request`.
    History {
        request: u64,
        group: &'a str,
        since: Option<Since<'a>>,
        limit: u32,
    },
    /// One retained message after the `since` of HISTORY `request`, oldest first.
    HistoryItem {
        request: u64,
        offset: u64,
        kind: PayloadKind,
        payload: &'a [u8],
    },
    /// The end of the answer to HISTORY `request`: the group's epoch and last offset;
    /// `recovered` when every message after `since` was sent before it. Every message of the
    /// group after `offset` reaches the peer after this frame (when it is subscribed).
    Position {
        request: u64,
        epoch: &'a str,
        offset: u64,
        recovered: bool,
    },
}

impl Frame<'_> {
    /// The frame's type name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "HELLO",
            Frame::Subscribe { .. } => "SUBSCRIBE",
            Frame::Unsubscribe { .. } => "UNSUBSCRIBE",
            Frame::Resubscribe { .. } => "RESUBSCRIBE",
            Frame::Message { .. } => "MESSAGE",
            Frame::Challenge { .. } => "CHALLENGE",
            Frame::Auth { .. } => "AUTH",
            Frame::AuthOk { .. } => "AUTH_OK",
            Frame::Ack { .. } => "ACK",
            Frame::Publish { .. } => "PUBLISH",
            Frame::Republish { .. } => "REPUBLISH",
            Frame::Publication { .. } => "PUBLICATION",
            Frame::Stamp { .. } => "STAMP",
            Frame::History { .. } => "HISTORY",
            Frame::HistoryItem { .. } => "HISTORY_ITEM",
            Frame::Position { .. } => "POSITION",
        }
    }
}

/// Why a peer's bytes cannot be channel frames; the peer is disconnected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("truncated or malformed {0} frame")]
    Malformed(&'static str),
}

/// Decodes the frame at the start of `buf`: `Ok(None)` until all of it has arrived; on success
/// also the number of bytes it took.
pub fn decode(buf: &[u8], max_frame: usize) -> Result<Option<(Frame<'_>, usize)>, WireError> {
    let Some(len_bytes) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    if len > max_frame {
        return Err(WireError::TooLarge(len));
    }
    if len == 0 {
        return Err(WireError::Malformed("empty"));
    }
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    let mut r = Reader { buf: &body[1..] };
    let frame = match body[0] {
        HELLO => {
            let version = r.u8().ok_or(WireError::Malformed("hello"))?;
            let origin = r.u64().ok_or(WireError::Malformed("hello"))?;
            let name = r.str().ok_or(WireError::Malformed("hello"))?;
            Frame::Hello { version, origin, name }
        }
        SUBSCRIBE => Frame::Subscribe { group: r.str().ok_or(WireError::Malformed("subscribe"))? },
        UNSUBSCRIBE => Frame::Unsubscribe { group: r.str().ok_or(WireError::Malformed("unsubscribe"))? },
        MESSAGE => {
            let origin = r.u64().ok_or(WireError::Malformed("message"))?;
            let seq = r.u64().ok_or(WireError::Malformed("message"))?;
            let group = r.str().ok_or(WireError::Malformed("message"))?;
            Frame::Message { origin, seq, group, payload: r.buf }
        }
        CHALLENGE => {
            let version = r.u8().ok_or(WireError::Malformed("challenge"))?;
            let flags = r.u8().ok_or(WireError::Malformed("challenge"))?;
            let nonce = r.array().ok_or(WireError::Malformed("challenge"))?;
            Frame::Challenge { version, flags, nonce }
        }
        AUTH => {
            let nonce = r.array().ok_or(WireError::Malformed("auth"))?;
            let mac = r.array().ok_or(WireError::Malformed("auth"))?;
            Frame::Auth { nonce, mac }
        }
        AUTH_OK => Frame::AuthOk { mac: r.array().ok_or(WireError::Malformed("auth_ok"))? },
        RESUBSCRIBE => Frame::Resubscribe { group: r.str().ok_or(WireError::Malformed("resubscribe"))? },
        ACK => Frame::Ack { seq: r.u64().ok_or(WireError::Malformed("ack"))? },
        PUBLISH | REPUBLISH => {
            let name = if body[0] == PUBLISH { "publish" } else { "republish" };
            let bad = || WireError::Malformed(name);
            let origin = r.u64().ok_or_else(bad)?;
            let seq = r.u64().ok_or_else(bad)?;
            let kind = r.u8().and_then(PayloadKind::from_u8).ok_or_else(bad)?;
            let group = r.str().ok_or_else(bad)?;
            match body[0] {
                PUBLISH => Frame::Publish { origin, seq, kind, group, payload: r.buf },
                _ => Frame::Republish { origin, seq, kind, group, payload: r.buf },
            }
        }
        PUBLICATION => {
            let bad = || WireError::Malformed("publication");
            let origin = r.u64().ok_or_else(bad)?;
            let seq = r.u64().ok_or_else(bad)?;
            let offset = r.u64().ok_or_else(bad)?;
            let kind = r.u8().and_then(PayloadKind::from_u8).ok_or_else(bad)?;
            let group = r.str().ok_or_else(bad)?;
            Frame::Publication { origin, seq, offset, kind, group, payload: r.buf }
        }
        STAMP => {
            let bad = || WireError::Malformed("stamp");
            Frame::Stamp { seq: r.u64().ok_or_else(bad)?, offset: r.u64().ok_or_else(bad)? }
        }
        HISTORY => {
            let bad = || WireError::Malformed("history");
            let request = r.u64().ok_or_else(bad)?;
            let group = r.str().ok_or_else(bad)?;
            let since = match r.u8().ok_or_else(bad)? {
                0 => None,
                1 => Some(Since { epoch: r.str().ok_or_else(bad)?, offset: r.u64().ok_or_else(bad)? }),
                _ => return Err(bad()),
            };
            let limit = r.u32().ok_or_else(bad)?;
            Frame::History { request, group, since, limit }
        }
        HISTORY_ITEM => {
            let bad = || WireError::Malformed("history_item");
            let request = r.u64().ok_or_else(bad)?;
            let offset = r.u64().ok_or_else(bad)?;
            let kind = r.u8().and_then(PayloadKind::from_u8).ok_or_else(bad)?;
            Frame::HistoryItem { request, offset, kind, payload: r.buf }
        }
        POSITION => {
            let bad = || WireError::Malformed("position");
            let request = r.u64().ok_or_else(bad)?;
            let epoch = r.str().ok_or_else(bad)?;
            let offset = r.u64().ok_or_else(bad)?;
            let recovered = match r.u8().ok_or_else(bad)? {
                0 => false,
                1 => true,
                _ => return Err(bad()),
            };
            Frame::Position { request, epoch, offset, recovered }
        }
        other => return Err(WireError::UnknownType(other)),
    };
    Ok(Some((frame, LEN_PREFIX + len)))
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.buf.get(..n)?, self.buf.get(n..)?);
        self.buf = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn str(&mut self) -> Option<&'a str> {
        let len = self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)?;
        std::str::from_utf8(self.take(len)?).ok()
    }
}

/// Appends one frame of type `kind` whose body `write_body` produces; fills in the length.
fn frame(out: &mut Vec<u8>, kind: u8, write_body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind]);
    write_body(out);
    let len = (out.len() - start - LEN_PREFIX) as u32;
    out[start..start + LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Group ids are capped far below 64 KiB by config; a longer name is cut, never wrapped.
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// HELLO with `version` (`VERSION`, or `VERSION_OFFSETS` for a peer that speaks offsets).
pub fn encode_hello(out: &mut Vec<u8>, version: u8, origin: u64, name: &str) {
    frame(out, HELLO, |o| {
        o.push(version);
        o.extend_from_slice(&origin.to_be_bytes());
        put_str(o, name);
    });
}

pub fn encode_subscribe(out: &mut Vec<u8>, group: &str) {
    frame(out, SUBSCRIBE, |o| put_str(o, group));
}

pub fn encode_resubscribe(out: &mut Vec<u8>, group: &str) {
    frame(out, RESUBSCRIBE, |o| put_str(o, group));
}

pub fn encode_unsubscribe(out: &mut Vec<u8>, group: &str) {
    frame(out, UNSUBSCRIBE, |o| put_str(o, group));
}

pub fn encode_message(out: &mut Vec<u8>, origin: u64, seq: u64, group: &str, payload: &[u8]) {
    frame(out, MESSAGE, |o| {
        o.extend_from_slice(&origin.to_be_bytes());
        o.extend_from_slice(&seq.to_be_bytes());
        put_str(o, group);
        o.extend_from_slice(payload);
    });
}

pub fn encode_challenge(out: &mut Vec<u8>, flags: u8, nonce: &[u8; NONCE_LEN]) {
    frame(out, CHALLENGE, |o| {
        o.push(VERSION);
        o.push(flags);
        o.extend_from_slice(nonce);
    });
}

pub fn encode_auth(out: &mut Vec<u8>, nonce: &[u8; NONCE_LEN], mac: &[u8; MAC_LEN]) {
    frame(out, AUTH, |o| {
        o.extend_from_slice(nonce);
        o.extend_from_slice(mac);
    });
}

pub fn encode_auth_ok(out: &mut Vec<u8>, mac: &[u8; MAC_LEN]) {
    frame(out, AUTH_OK, |o| o.extend_from_slice(mac));
}

pub fn encode_ack(out: &mut Vec<u8>, seq: u64) {
    frame(out, ACK, |o| o.extend_from_slice(&seq.to_be_bytes()));
}

pub fn encode_publish(out: &mut Vec<u8>, origin: u64, seq: u64, kind: PayloadKind, group: &str, payload: &[u8]) {
    frame(out, PUBLISH, |o| {
        o.extend_from_slice(&origin.to_be_bytes());
        o.extend_from_slice(&seq.to_be_bytes());
        o.push(kind as u8);
        put_str(o, group);
        o.extend_from_slice(payload);
    });
}

/// Turns the PUBLISH frame `publish` (as `encode_publish` made it) into REPUBLISH: the same
/// body under another type.
pub fn as_republish(publish: &[u8], out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(publish);
    if let Some(kind) = out.get_mut(at + LEN_PREFIX).filter(|k| **k == PUBLISH) {
        *kind = REPUBLISH;
    }
}

/// PUBLICATION of a message the broker numbered `offset`.
pub struct Numbered<'a> {
    pub origin: u64,
    pub seq: u64,
    pub offset: u64,
    pub kind: PayloadKind,
    pub group: &'a str,
    pub payload: &'a [u8],
}

pub fn encode_publication(out: &mut Vec<u8>, m: &Numbered<'_>) {
    frame(out, PUBLICATION, |o| {
        o.extend_from_slice(&m.origin.to_be_bytes());
        o.extend_from_slice(&m.seq.to_be_bytes());
        o.extend_from_slice(&m.offset.to_be_bytes());
        o.push(m.kind as u8);
        put_str(o, m.group);
        o.extend_from_slice(m.payload);
    });
}

pub fn encode_stamp(out: &mut Vec<u8>, seq: u64, offset: u64) {
    frame(out, STAMP, |o| {
        o.extend_from_slice(&seq.to_be_bytes());
        o.extend_from_slice(&offset.to_be_bytes());
    });
}

pub fn encode_history(out: &mut Vec<u8>, request: u64, group: &str, since: Option<Since<'_>>, limit: u32) {
    frame(out, HISTORY, |o| {
        o.extend_from_slice(&request.to_be_bytes());
        put_str(o, group);
        match since {
            None => o.push(0),
            Some(s) => {
                o.push(1);
                put_str(o, s.epoch);
                o.extend_from_slice(&s.offset.to_be_bytes());
            }
        }
        o.extend_from_slice(&limit.to_be_bytes());
    });
}

pub fn encode_history_item(out: &mut Vec<u8>, request: u64, offset: u64, kind: PayloadKind, payload: &[u8]) {
    frame(out, HISTORY_ITEM, |o| {
        o.extend_from_slice(&request.to_be_bytes());
        o.extend_from_slice(&offset.to_be_bytes());
        o.push(kind as u8);
        o.extend_from_slice(payload);
    });
}

pub fn encode_position(out: &mut Vec<u8>, request: u64, epoch: &str, offset: u64, recovered: bool) {
    frame(out, POSITION, |o| {
        o.extend_from_slice(&request.to_be_bytes());
        put_str(o, epoch);
        o.extend_from_slice(&offset.to_be_bytes());
        o.push(u8::from(recovered));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_frame() {
        let mut buf = Vec::new();
        encode_hello(&mut buf, VERSION, 7, "worker-0");
        encode_subscribe(&mut buf, "g1");
        encode_unsubscribe(&mut buf, "g1");
        encode_message(&mut buf, 7, 42, "g1", "héllo".as_bytes());
        encode_challenge(&mut buf, FLAG_AUTH_REQUIRED, &[1; NONCE_LEN]);
        encode_auth(&mut buf, &[2; NONCE_LEN], &[3; MAC_LEN]);
        encode_auth_ok(&mut buf, &[4; MAC_LEN]);
        encode_ack(&mut buf, 99);
        let mut at = 0;
        let mut frames = Vec::new();
        while let Some((f, n)) = decode(&buf[at..], 1 << 20).unwrap() {
            frames.push(f);
            at += n;
        }
        assert_eq!(at, buf.len());
        assert_eq!(frames[0], Frame::Hello { version: VERSION, origin: 7, name: "worker-0" });
        assert_eq!(frames[3], Frame::Message { origin: 7, seq: 42, group: "g1", payload: "héllo".as_bytes() });
        assert_eq!(frames[4], Frame::Challenge { version: VERSION, flags: FLAG_AUTH_REQUIRED, nonce: [1; NONCE_LEN] });
        assert_eq!(frames[5], Frame::Auth { nonce: [2; NONCE_LEN], mac: [3; MAC_LEN] });
        assert_eq!(frames[6], Frame::AuthOk { mac: [4; MAC_LEN] });
        assert_eq!(frames[7], Frame::Ack { seq: 99 });
    }

    #[test]
    fn round_trip_offset_frames() {
        let mut buf = Vec::new();
        encode_publish(&mut buf, 7, 1, PayloadKind::Json, "g", b"{}");
        let m = Numbered { origin: 7, seq: 1, offset: 5, kind: PayloadKind::Text, group: "g", payload: b"hi" };
        encode_publication(&mut buf, &m);
        encode_stamp(&mut buf, 1, 5);
        encode_history(&mut buf, 3, "g", Some(Since { epoch: "e1", offset: 4 }), 100);
        encode_history(&mut buf, 4, "g", None, 0);
        encode_history_item(&mut buf, 3, 5, PayloadKind::Text, b"hi");
        encode_position(&mut buf, 3, "e1", 5, true);
        let mut at = 0;
        let mut frames = Vec::new();
        while let Some((f, n)) = decode(&buf[at..], 1 << 20).unwrap() {
            frames.push(f);
            at += n;
        }
        assert_eq!(
            frames,
            vec![
                Frame::Publish { origin: 7, seq: 1, kind: PayloadKind::Json, group: "g", payload: b"{}" },
                Frame::Publication {
                    origin: 7,
                    seq: 1,
                    offset: 5,
                    kind: PayloadKind::Text,
                    group: "g",
                    payload: b"hi"
                },
                Frame::Stamp { seq: 1, offset: 5 },
                Frame::History { request: 3, group: "g", since: Some(Since { epoch: "e1", offset: 4 }), limit: 100 },
                Frame::History { request: 4, group: "g", since: None, limit: 0 },
                Frame::HistoryItem { request: 3, offset: 5, kind: PayloadKind::Text, payload: b"hi" },
                Frame::Position { request: 3, epoch: "e1", offset: 5, recovered: true },
            ]
        );
        // REPUBLISH is PUBLISH under another type, made from the PUBLISH frame as queued.
        let mut publish = Vec::new();
        encode_publish(&mut publish, 7, 2, PayloadKind::Json, "g", b"[1]");
        let mut again = vec![0xee];
        as_republish(&publish, &mut again);
        assert_eq!(
            decode(&again[1..], 1 << 20).unwrap(),
            Some((
                Frame::Republish { origin: 7, seq: 2, kind: PayloadKind::Json, group: "g", payload: b"[1]" },
                publish.len()
            ))
        );
        again[1 + 4 + 1 + 16] = 9;
        assert_eq!(decode(&again[1..], 1 << 20), Err(WireError::Malformed("republish")));
        // A kind or flag byte out of range is malformed, not guessed.
        let mut bad = Vec::new();
        encode_publish(&mut bad, 7, 1, PayloadKind::Text, "g", b"x");
        bad[4 + 1 + 16] = 9;
        assert_eq!(decode(&bad, 1 << 20), Err(WireError::Malformed("publish")));
    }

    #[test]
    fn partial_oversized_and_garbage() {
        let mut buf = Vec::new();
        encode_message(&mut buf, 1, 1, "g", b"payload");
        assert_eq!(decode(&buf[..buf.len() - 1], 1 << 20), Ok(None));
        assert_eq!(decode(&buf, 8), Err(WireError::TooLarge(buf.len() - 4)));
        assert_eq!(decode(&[0, 0, 0, 1, 99], 1 << 20), Err(WireError::UnknownType(99)));
        assert_eq!(decode(&[0, 0, 0, 2, SUBSCRIBE, 0], 1 << 20), Err(WireError::Malformed("subscribe")));
    }
}
