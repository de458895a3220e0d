//! One channel peer as the broker sees it: its socket, how far it is through the connection
//! set-up (docs/channel-protocol.md), its buffers and its subscriptions. Used by the broker
//! process only (`channel/server.rs`).

use std::collections::HashSet;
use std::time::Instant;

use crate::channel::wire::{self, MAC_LEN, NONCE_LEN};
use crate::channel::{ChannelStream, WriteInterest};
use crate::sendbuf::SendBuf;

/// Length field of an AUTH frame (type + nonce + mac): the largest frame accepted before the
/// peer proved the secret, so an unauthenticated peer cannot make the broker buffer more.
pub const AUTH_FRAME_MAX: usize = 1 + NONCE_LEN + MAC_LEN;
/// Length field of the largest possible HELLO (type, version, origin, a name of 64 KiB - 1).
pub const HELLO_FRAME_MAX: usize = 1 + 1 + 8 + 2 + u16::MAX as usize;

/// Where a peer is in the connection set-up. Until `Ready` it runs against the admission
/// deadline (`channel.auth_timeout_ms`).
pub enum Phase {
    /// CHALLENGE sent with this nonce; only AUTH is accepted.
    AwaitAuth { nonce: [u8; NONCE_LEN] },
    /// Authenticated (or no secret is configured); HELLO must come next.
    AwaitHello,
    /// Introduced with HELLO. Every MESSAGE it sends must carry `origin`.
    Ready { origin: u64 },
}

impl Phase {
    /// Largest frame (length field) accepted in this phase, checked at the length prefix.
    pub fn max_frame(&self, configured: usize) -> usize {
        match self {
            Phase::AwaitAuth { .. } => AUTH_FRAME_MAX,
            Phase::AwaitHello => HELLO_FRAME_MAX.min(configured),
            Phase::Ready { .. } => configured,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, Phase::Ready { .. })
    }

    /// The origin bound at HELLO.
    pub fn origin(&self) -> Option<u64> {
        match self {
            Phase::Ready { origin } => Some(*origin),
            _ => None,
        }
    }
}

/// Why the broker ends a peer's connection; each kind is counted apart in `status`.
#[derive(Debug)]
pub enum Cut {
    /// The peer closed its end.
    Closed,
    /// The socket failed.
    Io(String),
    /// A length prefix over what the peer's phase allows (`oversized`).
    Oversized(String),
    /// A frame the protocol does not allow here (`protocol_errors`).
    Violation(String),
}

pub struct Peer {
    pub stream: ChannelStream,
    pub phase: Phase,
    /// Tells this peer apart from a later one given the same slab key, for the admission
    /// deadline queue.
    pub serial: u64,
    /// Name from the peer's HELLO, for logs.
    pub name: String,
    /// The unfinished frame of the last read (whole frames are handled straight from the
    /// broker's read buffer).
    pub inbuf: Vec<u8>,
    pub outbuf: SendBuf,
    /// Registered for WRITABLE only while `outbuf` holds bytes the socket did not take.
    pub write_interest: WriteInterest,
    /// Groups this peer subscribed to, for cleaning `subscribers` when it goes.
    pub groups: HashSet<Box<str>>,
    /// Groups whose held messages this peer already got (grace window): one replay each.
    pub replayed: HashSet<Box<str>>,
    /// Highest seq of this peer's MESSAGEs handled and not acknowledged yet.
    pub ack: Option<u64>,
    /// When the oldest publish covered by `ack` was handled, and how many `ack` covers: an
    /// ACK that would be a write of its own waits for the peer's next write, up to
    /// `ACK_DELAY` or `ACK_EVERY` publishes (server.rs `end_of_turn`).
    pub ack_since: Option<Instant>,
    pub ack_count: u32,
    /// Introduced with HELLO version 2: it is sent PUBLICATION instead of MESSAGE, a STAMP
    /// for each of its publishes, and may ask HISTORY.
    pub offsets: bool,
    /// Highest seq of its origin the broker numbered (kept across its reconnects): a publish
    /// at or below it is a resend, not numbered or forwarded again.
    pub numbered: Option<u64>,
    /// This broker run had a record of the peer's origin when it said HELLO (it was
    /// connected before): its REPUBLISH frames are numbered like PUBLISH (server.rs `publish`).
    pub origin_known: bool,
    /// Queued in the broker's dirty list (its output is written at the end of the turn).
    pub dirty: bool,
    /// Queued in the broker's read-again list (it spent its read budget with bytes left).
    pub read_again: bool,
}

impl Peer {
    /// A freshly accepted peer, greeted with a CHALLENGE (`flags` say whether AUTH is due).
    pub fn new(stream: ChannelStream, phase: Phase, serial: u64, flags: u8, nonce: &[u8; NONCE_LEN]) -> Peer {
        let mut outbuf = SendBuf::default();
        wire::encode_challenge(outbuf.tail(), flags, nonce);
        Peer {
            stream,
            phase,
            serial,
            name: String::from("(unnamed)"),
            inbuf: Vec::new(),
            outbuf,
            write_interest: WriteInterest::default(),
            groups: HashSet::new(),
            replayed: HashSet::new(),
            ack: None,
            ack_since: None,
            ack_count: 0,
            offsets: false,
            numbered: None,
            origin_known: false,
            dirty: true,
            read_again: false,
        }
    }
}
