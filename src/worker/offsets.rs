//! The worker's bookkeeping for protocol 2 across groups: history requests in flight (a
//! join's, a group's catch-up) and `send_to_group` ids waiting for the offset their message
//! gets. Bounded: requests by the groups and joins that exist, replies by the publish queue.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use serde_json::value::RawValue;

use super::numbered::Position;

/// Who asked the bus for a group's history.
pub enum Asked {
    /// A protocol-2 join: the joining connection's id (the member is found by the request;
    /// the id guards against a reused slab key), its reply `id`, and its `since` (asked
    /// again after a reconnect).
    /// `handed`: not a client's join but a membership handed over by a reload
    /// (worker/handoff): no reply, and what cannot be recovered is a gap.
    Join { group: Rc<str>, conn_id: u64, id: Option<Box<RawValue>>, since: Option<Position>, handed: bool },
    /// The group's catch-up after a break in its stream.
    CatchUp { group: Rc<str> },
}

impl Asked {
    pub fn group(&self) -> &Rc<str> {
        match self {
            Asked::Join { group, .. } | Asked::CatchUp { group } => group,
        }
    }
}

/// A protocol-2 `send_to_group` with an `id`, answered when its publish `seq` is numbered.
pub struct StampReply {
    pub seq: u64,
    pub conn: usize,
    pub conn_id: u64,
    pub id: Box<RawValue>,
}

pub struct Offsets {
    next_request: u64,
    pub asked: HashMap<u64, Asked>,
    /// Oldest first; publishes are numbered in this order.
    pub stamp_replies: VecDeque<StampReply>,
    stamp_replies_max: usize,
    /// Most messages one join may replay (`history.max_recover`).
    pub max_recover: u32,
}

impl Offsets {
    pub fn new(max_recover: usize, stamp_replies_max: usize) -> Offsets {
        Offsets {
            next_request: 0,
            asked: HashMap::new(),
            stamp_replies: VecDeque::new(),
            stamp_replies_max,
            max_recover: u32::try_from(max_recover).unwrap_or(u32::MAX),
        }
    }

    pub fn next_request(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    /// Queues a reply for publish `seq`; returns the oldest one pushed out when the bound is
    /// reached (its publish was dropped from the queue too: answered without an offset).
    pub fn await_stamp(&mut self, reply: StampReply) -> Option<StampReply> {
        let evicted =
            if self.stamp_replies.len() >= self.stamp_replies_max { self.stamp_replies.pop_front() } else { None };
        self.stamp_replies.push_back(reply);
        evicted
    }
}
