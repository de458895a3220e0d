//! One publisher's numbering of its MESSAGE frames, used by every sender of group messages
//! (the worker's channel client and Redis bus, `groupcast publish`): each frame carries the
//! publisher's random origin and the next sequence number, which receivers use to drop
//! repeats (`dedupe`).

use super::wire;

pub struct Publisher {
    origin: u64,
    /// Sequence number of the last MESSAGE encoded; the first is 1.
    seq: u64,
}

impl Publisher {
    pub fn new(origin: u64) -> Publisher {
        Publisher { origin, seq: 0 }
    }

    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// Sequence number of the last message encoded (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Appends the next MESSAGE frame to `out`; returns its sequence number.
    pub fn encode(&mut self, out: &mut Vec<u8>, group: &str, payload: &[u8]) -> u64 {
        self.seq += 1;
        wire::encode_message(out, self.origin, self.seq, group, payload);
        self.seq
    }

    /// The next PUBLISH frame (a MESSAGE that says what its payload is, for peers that speak
    /// offsets) in a buffer of its own.
    pub fn publish_frame(&mut self, group: &str, kind: wire::PayloadKind, payload: &[u8]) -> (u64, Vec<u8>) {
        let mut out = Vec::with_capacity(33 + group.len() + payload.len());
        self.seq += 1;
        wire::encode_publish(&mut out, self.origin, self.seq, kind, group, payload);
        (self.seq, out)
    }

    /// The next MESSAGE frame in a buffer of its own.
    pub fn frame(&mut self, group: &str, payload: &[u8]) -> (u64, Vec<u8>) {
        let mut out = Vec::with_capacity(32 + group.len() + payload.len());
        let seq = self.encode(&mut out, group, payload);
        (seq, out)
    }
}
