//! Protocol 2 in one local group: its protocol-2 members, the group's position (epoch and
//! last offset) in the stream the bus brings, and the two ways a member can fall behind that
//! stream and be brought back: a join waiting for its history answer (`Member::Pending`),
//! and the whole group catching up after a break in the stream (`CatchUp`: a reconnect, an
//! offset that does not follow).
//!
//! Pure state: it decides who gets which offset and tells a `Sink` what to send and what to
//! ask the bus for, so its rules are tested here without sockets. The rules (docs/protocol.md
//! "Protocol 2"): a member gets each offset at most once and in order (`floor` is the last it
//! was given); while its join or the group's catch-up is unanswered, live messages wait in a
//! bounded buffer; what cannot be recovered is said with a gap notice.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::channel::wire::PayloadKind;

/// A group's position: the epoch of its offsets and the last offset this worker delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Rc<str>,
    pub offset: u64,
}

/// A message waiting in a buffer.
#[derive(Debug, Clone)]
struct Live {
    offset: u64,
    kind: PayloadKind,
    payload: Rc<[u8]>,
}

#[derive(Debug)]
enum Member {
    /// Receiving the stream: every offset above `floor`.
    Active { floor: u64 },
    /// Joined; the answer to its history request `request` has not come yet. `given`: the
    /// last offset handed to it from that answer.
    Pending { request: u64, buffered: VecDeque<Live>, overflowed: bool, given: u64 },
}

#[derive(Debug)]
struct CatchUp {
    request: u64,
    buffered: VecDeque<Live>,
    overflowed: bool,
}

/// What the group asks of the worker.
pub trait Sink {
    /// Queue the protocol-2 message frame `frame` (a WebSocket text frame) to `conn`.
    fn send(&mut self, conn: usize, frame: &Rc<[u8]>);
    /// Tell `conn` it lost messages of the group; the stream goes on after `at`.
    fn gap(&mut self, conn: usize, at: &Position);
    /// Ask the bus for the group's position and the messages after `since`.
    fn request(&mut self, request: u64, since: Option<&Position>);
    /// A fresh request number.
    fn next_request(&mut self) -> u64;
    /// `conn`'s join got its answer: reply now, before the messages that waited for it.
    fn joined(&mut self, conn: usize, at: &Position, recovered: bool);
}

/// The protocol-2 side of one local group.
#[derive(Debug)]
pub struct NumberedGroup {
    /// The group id as a JSON string, quotes included: written into every envelope.
    name_json: Box<str>,
    position: Option<Position>,
    members: HashMap<usize, Member>,
    catch_up: Option<CatchUp>,
    /// Most messages a buffer holds (`history.max_recover`, at least 64); beyond, the oldest
    /// go and the member (or the group) is told of a gap.
    buffer_max: usize,
}

impl NumberedGroup {
    pub fn new(name: &str, buffer_max: usize) -> NumberedGroup {
        let name_json = serde_json::to_string(name).unwrap_or_else(|_| "\"\"".into()).into_boxed_str();
        NumberedGroup {
            name_json,
            position: None,
            members: HashMap::new(),
            catch_up: None,
            buffer_max: buffer_max.max(64),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn contains(&self, conn: usize) -> bool {
        self.members.contains_key(&conn)
    }

    pub fn position(&self) -> Option<&Position> {
        self.position.as_ref()
    }

    /// Adds `conn`, waiting for the answer to `request` (sent by the caller).
    pub fn add_pending(&mut self, conn: usize, request: u64) {
        let member = Member::Pending { request, buffered: VecDeque::new(), overflowed: false, given: 0 };
        self.members.insert(conn, member);
    }

    pub fn remove(&mut self, conn: usize) {
        self.members.remove(&conn);
    }

    /// The request a pending member waits on.
    pub fn pending_request(&self, conn: usize) -> Option<u64> {
        match self.members.get(&conn) {
            Some(Member::Pending { request, .. }) => Some(*request),
            _ => None,
        }
    }

    /// Encodes the envelope `{"group":..,"offset":..,"message":..}` as a text frame.
    pub fn envelope(&self, offset: u64, kind: PayloadKind, payload: &[u8]) -> Rc<[u8]> {
        envelope_of(&self.name_json, offset, kind, payload)
    }

    /// A message from the bus's stream. Delivered to the active members above their floor
    /// when it follows the group's position; a message that does not follow starts a
    /// catch-up (the stream broke: a reconnect, a lost subscription, an epoch that changed).
    pub fn on_live(&mut self, offset: u64, kind: PayloadKind, payload: &[u8], sink: &mut impl Sink) {
        let live = || Live { offset, kind, payload: Rc::from(payload) };
        for member in self.members.values_mut() {
            if let Member::Pending { buffered, overflowed, .. } = member {
                push_bounded(buffered, overflowed, live(), self.buffer_max);
            }
        }
        if let Some(c) = &mut self.catch_up {
            push_bounded(&mut c.buffered, &mut c.overflowed, live(), self.buffer_max);
            return;
        }
        match &self.position {
            None => return,
            Some(at) if offset != at.offset + 1 => {
                let mut buffered = VecDeque::new();
                buffered.push_back(live());
                return self.start_catch_up(buffered, sink);
            }
            Some(_) => {}
        }
        self.deliver(offset, kind, payload, sink);
    }

    /// Hands `offset` to every active member above its floor and moves the position on.
    fn deliver(&mut self, offset: u64, kind: PayloadKind, payload: &[u8], sink: &mut impl Sink) {
        if let Some(at) = &mut self.position {
            at.offset = offset;
        }
        let mut frame = None;
        for (&conn, member) in &mut self.members {
            if let Member::Active { floor } = member {
                if offset > *floor {
                    *floor = offset;
                    let f = frame.get_or_insert_with(|| envelope_of(&self.name_json, offset, kind, payload));
                    sink.send(conn, f);
                }
            }
        }
    }

    fn start_catch_up(&mut self, buffered: VecDeque<Live>, sink: &mut impl Sink) {
        let request = sink.next_request();
        sink.request(request, self.position.as_ref());
        self.catch_up = Some(CatchUp { request, buffered, overflowed: false });
    }

    /// The bus's link came back: the catch-up asked is lost, and the stream may have a hole.
    /// (Pending joins are asked again by the worker, which keeps their `since`.)
    pub fn on_link_up(&mut self, sink: &mut impl Sink) {
        let buffered = self.catch_up.take().map(|c| c.buffered).unwrap_or_default();
        if self.position.is_some() {
            self.start_catch_up(buffered, sink);
        }
    }

    /// A kept message answering `request`: a pending member's join or the group's catch-up.
    pub fn on_item(&mut self, request: u64, offset: u64, kind: PayloadKind, payload: &[u8], sink: &mut impl Sink) {
        if self.catch_up.as_ref().is_some_and(|c| c.request == request) {
            if self.position.as_ref().is_some_and(|at| offset > at.offset) {
                self.deliver(offset, kind, payload, sink);
            }
            return;
        }
        let name_json = &self.name_json;
        for (&conn, member) in &mut self.members {
            if let Member::Pending { request: r, given, .. } = member {
                if *r == request && offset > *given {
                    *given = offset;
                    sink.send(conn, &envelope_of(name_json, offset, kind, payload));
                }
            }
        }
    }

    /// The end of the answer to `request`. For a join: the member becomes active at the
    /// answer's offset, is answered (`Sink::joined`), then gets what arrived meanwhile. For the
    /// catch-up: the group's position moves to the answer; unrecovered, every active member is
    /// told of the gap.
    pub fn on_position(&mut self, request: u64, epoch: &str, offset: u64, recovered: bool, sink: &mut impl Sink) {
        let at = Position { epoch: Rc::from(epoch), offset };
        if self.catch_up.as_ref().is_some_and(|c| c.request == request) {
            let Some(c) = self.catch_up.take() else { return };
            let lost = !recovered || c.overflowed || self.position.as_ref().is_none_or(|p| *p.epoch != *epoch);
            if lost {
                for (&conn, member) in &mut self.members {
                    if let Member::Active { floor } = member {
                        *floor = offset;
                        sink.gap(conn, &at);
                    }
                }
            }
            self.position = Some(at);
            self.replay(c.buffered, sink);
            return;
        }
        let Some(conn) = self.members.iter().find_map(|(&conn, m)| match m {
            Member::Pending { request: r, .. } if *r == request => Some(conn),
            _ => None,
        }) else {
            return;
        };
        let Some(Member::Pending { buffered, overflowed, .. }) =
            self.members.insert(conn, Member::Active { floor: offset })
        else {
            return;
        };
        let mut rest = VecDeque::new();
        let mut floor = offset;
        for live in buffered {
            if live.offset > floor {
                floor = live.offset;
                rest.push_back(live);
            }
        }
        // The reply first (the protocol says: replayed messages, the reply, then live).
        sink.joined(conn, &at, recovered);
        for live in &rest {
            sink.send(conn, &envelope_of(&self.name_json, live.offset, live.kind, &live.payload));
        }
        self.members.insert(conn, Member::Active { floor });
        if overflowed {
            sink.gap(conn, &Position { epoch: at.epoch.clone(), offset: floor });
        }
        match &self.position {
            None => self.position = Some(Position { epoch: at.epoch.clone(), offset: floor }),
            // The group's stream runs under another epoch than the member's answer: the
            // group's position is stale, find out where it is.
            Some(p) if *p.epoch != *epoch && self.catch_up.is_none() => self.start_catch_up(VecDeque::new(), sink),
            Some(_) => {}
        }
    }

    /// Delivers buffered messages after a catch-up, in order, as long as they follow.
    fn replay(&mut self, buffered: VecDeque<Live>, sink: &mut impl Sink) {
        let mut rest = buffered.into_iter();
        while let Some(live) = rest.next() {
            let Some(at) = &self.position else { return };
            if live.offset <= at.offset {
                continue;
            }
            if live.offset != at.offset + 1 {
                let mut again: VecDeque<Live> = VecDeque::from([live]);
                again.extend(rest);
                return self.start_catch_up(again, sink);
            }
            self.deliver(live.offset, live.kind, &live.payload, sink);
        }
    }
}

fn envelope_of(name_json: &str, offset: u64, kind: PayloadKind, payload: &[u8]) -> Rc<[u8]> {
    let mut json = Vec::with_capacity(name_json.len() + payload.len() + 48);
    json.extend_from_slice(b"{\"group\":");
    json.extend_from_slice(name_json.as_bytes());
    json.extend_from_slice(b",\"offset\":");
    json.extend_from_slice(offset.to_string().as_bytes());
    json.extend_from_slice(b",\"message\":");
    match kind {
        PayloadKind::Json => json.extend_from_slice(payload),
        PayloadKind::Text => {
            let text = String::from_utf8_lossy(payload);
            json.extend_from_slice(serde_json::to_string(&*text).unwrap_or_default().as_bytes());
        }
    }
    json.push(b'}');
    Rc::from(crate::ws::frame::text(&json))
}

fn push_bounded(buf: &mut VecDeque<Live>, overflowed: &mut bool, live: Live, max: usize) {
    if buf.len() >= max {
        buf.pop_front();
        *overflowed = true;
    }
    buf.push_back(live);
}

/// The gap notice `{"group":..,"gap":true,"epoch":..,"offset":..}`.
pub fn gap_notice(group: &str, at: &Position) -> Vec<u8> {
    serde_json::json!({"group": group, "gap": true, "epoch": &*at.epoch, "offset": at.offset}).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Record {
        sent: Vec<(usize, u64)>,
        gaps: Vec<(usize, u64)>,
        requests: Vec<(u64, Option<u64>)>,
        next: u64,
        /// (conn, offset, recovered, frames sent to anyone before the answer)
        joins: Vec<(usize, u64, bool, usize)>,
    }

    impl Sink for Record {
        fn send(&mut self, conn: usize, frame: &Rc<[u8]>) {
            let payload = &frame[2..];
            let v: serde_json::Value = serde_json::from_slice(payload).expect("envelope is JSON");
            self.sent.push((conn, v["offset"].as_u64().expect("offset")));
        }
        fn gap(&mut self, conn: usize, at: &Position) {
            self.gaps.push((conn, at.offset));
        }
        fn request(&mut self, request: u64, since: Option<&Position>) {
            self.requests.push((request, since.map(|p| p.offset)));
        }
        fn next_request(&mut self) -> u64 {
            self.next += 1;
            100 + self.next
        }
        fn joined(&mut self, conn: usize, at: &Position, recovered: bool) {
            self.joins.push((conn, at.offset, recovered, self.sent.len()));
        }
    }

    fn live(g: &mut NumberedGroup, offset: u64, sink: &mut Record) {
        g.on_live(offset, PayloadKind::Text, b"m", sink);
    }

    #[test]
    fn a_join_gets_history_then_what_arrived_meanwhile_once_each() {
        let mut g = NumberedGroup::new("g", 100);
        let mut s = Record::default();
        g.add_pending(1, 7);
        live(&mut g, 5, &mut s); // arrived before the answer (possible on the Redis bus)
        live(&mut g, 6, &mut s);
        g.on_item(7, 3, PayloadKind::Text, b"m", &mut s);
        g.on_item(7, 4, PayloadKind::Text, b"m", &mut s);
        g.on_item(7, 5, PayloadKind::Text, b"m", &mut s);
        g.on_position(7, "e", 5, true, &mut s);
        // Answered after the replay (3, 4, 5), before what arrived meanwhile (6).
        assert_eq!(s.joins, vec![(1, 5, true, 3)]);
        live(&mut g, 7, &mut s);
        assert_eq!(s.sent, vec![(1, 3), (1, 4), (1, 5), (1, 6), (1, 7)]);
        assert!(s.gaps.is_empty() && s.requests.is_empty());
    }

    #[test]
    fn a_hole_in_the_stream_is_caught_up_from_history() {
        let mut g = NumberedGroup::new("g", 100);
        let mut s = Record::default();
        g.add_pending(1, 1);
        g.on_position(1, "e", 10, false, &mut s);
        live(&mut g, 11, &mut s);
        live(&mut g, 14, &mut s); // 12 and 13 never came
        assert_eq!(s.requests, vec![(101, Some(11))]);
        live(&mut g, 15, &mut s);
        g.on_item(101, 12, PayloadKind::Text, b"m", &mut s);
        g.on_item(101, 13, PayloadKind::Text, b"m", &mut s);
        g.on_item(101, 14, PayloadKind::Text, b"m", &mut s);
        g.on_position(101, "e", 14, true, &mut s);
        live(&mut g, 16, &mut s);
        assert_eq!(s.sent.iter().map(|x| x.1).collect::<Vec<_>>(), vec![11, 12, 13, 14, 15, 16]);
        assert!(s.gaps.is_empty());
    }

    #[test]
    fn a_lost_history_is_a_gap_and_the_stream_goes_on_in_the_new_epoch() {
        let mut g = NumberedGroup::new("g", 100);
        let mut s = Record::default();
        g.add_pending(1, 1);
        g.add_pending(2, 2);
        g.on_position(1, "e", 10, false, &mut s);
        g.on_position(2, "e", 10, false, &mut s);
        g.on_link_up(&mut s);
        assert_eq!(s.requests, vec![(101, Some(10))]);
        live(&mut g, 1, &mut s); // a restarted broker numbers from 1 again
        g.on_position(101, "f", 1, false, &mut s);
        live(&mut g, 2, &mut s);
        let mut gaps = s.gaps.clone();
        gaps.sort();
        assert_eq!(gaps, vec![(1, 1), (2, 1)]);
        let mut sent = s.sent.clone();
        sent.sort();
        assert_eq!(sent, vec![(1, 2), (2, 2)]);
        assert_eq!(g.position(), Some(&Position { epoch: "f".into(), offset: 2 }));
    }

    #[test]
    fn envelopes_keep_strings_strings() {
        let g = NumberedGroup::new("r\"1", 10);
        let f = g.envelope(3, PayloadKind::Text, b"{\"a\":1}");
        let v: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
        assert_eq!(v, serde_json::json!({"group": "r\"1", "offset": 3, "message": "{\"a\":1}"}));
        let f = g.envelope(4, PayloadKind::Json, b"{\"a\":1}");
        let v: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
        assert_eq!(v["message"]["a"], 1);
    }
}
