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

use std::collections::{HashMap, HashSet, VecDeque};
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
    /// Receiving the stream: every offset above `floor` in `epoch` (which the group's
    /// position may not have reached yet when answers come out of stream order).
    Active { floor: u64, epoch: Rc<str> },
    /// Joined; the answer to its history request `request` has not come yet. `replay`: the
    /// answer's kept messages, held until its end says they are all there (recovery is all or
    /// nothing, and an answer cut by a reconnect is asked again); `replay_overflowed`: the
    /// answer brought more than the buffer holds. `buffered`: the live stream meanwhile (what
    /// overflows is found again as a hole when the member becomes active).
    Pending { request: u64, replay: VecDeque<Live>, replay_overflowed: bool, buffered: VecDeque<Live> },
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
    /// A join got its answer: reply now, before the live messages that follow it.
    fn joined(&mut self, joined: &Joined);
}

/// How a join ended, for its reply.
#[derive(Debug, PartialEq, Eq)]
pub struct Joined {
    pub conn: usize,
    pub at: Position,
    pub recovered: bool,
}

/// The protocol-2 side of one local group.
#[derive(Debug)]
pub struct NumberedGroup {
    /// The group id as a JSON string, quotes included: written into every envelope.
    name_json: Box<str>,
    position: Option<Position>,
    members: HashMap<usize, Member>,
    /// The pending members by their request: a join's answer finds its member without a scan
    /// of the group (a reload rejoins every member at once), and live messages skip the
    /// buffering pass when nobody waits.
    pending: HashMap<u64, usize>,
    catch_up: Option<CatchUp>,
    /// Most messages a buffer holds (`history.max_recover`, at least 64); beyond, the oldest
    /// go and the member (or the group) is told of a gap.
    buffer_max: usize,
    /// Members handed over by a reload from a seed-protocol connection (worker/handoff): they
    /// follow the group's offsets like the others, so nothing is repeated or skipped across
    /// the switch, but they are sent the bare message, as seed members are.
    bare: HashSet<usize>,
}

impl NumberedGroup {
    pub fn new(name: &str, buffer_max: usize) -> NumberedGroup {
        let name_json = serde_json::to_string(name).unwrap_or_else(|_| "\"\"".into()).into_boxed_str();
        NumberedGroup {
            name_json,
            position: None,
            members: HashMap::new(),
            pending: HashMap::new(),
            catch_up: None,
            buffer_max: buffer_max.max(64),
            bare: HashSet::new(),
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
        let member =
            Member::Pending { request, replay: VecDeque::new(), replay_overflowed: false, buffered: VecDeque::new() };
        if let Some(Member::Pending { request: old, .. }) = self.members.insert(conn, member) {
            self.pending.remove(&old);
        }
        self.pending.insert(request, conn);
    }

    /// Adds `conn` as a member taking the bare message (a handed-over seed member), waiting for
    /// the answer to `request`.
    pub fn add_pending_bare(&mut self, conn: usize, request: u64) {
        self.add_pending(conn, request);
        self.bare.insert(conn);
    }

    /// Whether `conn` takes the bare message rather than the envelope.
    pub fn is_bare(&self, conn: usize) -> bool {
        !self.bare.is_empty() && self.bare.contains(&conn)
    }

    /// The frame `conn` is sent for a message: the envelope, or the bare text.
    fn frame_for(&self, conn: usize, live: &Live) -> Rc<[u8]> {
        if self.is_bare(conn) {
            Rc::from(crate::ws::frame::text(&live.payload))
        } else {
            envelope_of(&self.name_json, live.offset, live.kind, &live.payload)
        }
    }

    pub fn remove(&mut self, conn: usize) {
        self.bare.remove(&conn);
        if let Some(Member::Pending { request, .. }) = self.members.remove(&conn) {
            self.pending.remove(&request);
        }
    }

    /// Where member `conn` stands: the epoch and the last offset it was given; `None` while
    /// its join waits for its answer (or it is no member).
    pub fn member_position(&self, conn: usize) -> Option<Position> {
        match self.members.get(&conn)? {
            Member::Active { floor, epoch } => Some(Position { epoch: epoch.clone(), offset: *floor }),
            Member::Pending { .. } => None,
        }
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
        // One copy of the payload for every buffer that keeps it.
        let mut shared: Option<Rc<[u8]>> = None;
        let mut live = || Live { offset, kind, payload: shared.get_or_insert_with(|| Rc::from(payload)).clone() };
        if !self.pending.is_empty() {
            for member in self.members.values_mut() {
                if let Member::Pending { buffered, .. } = member {
                    push_bounded(buffered, &mut false, live(), self.buffer_max);
                }
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
        let Some(at) = &mut self.position else { return };
        at.offset = offset;
        let (mut frame, mut bare_frame) = (None, None);
        for (&conn, member) in &mut self.members {
            if let Member::Active { floor, epoch } = member {
                if offset > *floor && (Rc::ptr_eq(epoch, &at.epoch) || **epoch == *at.epoch) {
                    *floor = offset;
                    let f = if !self.bare.is_empty() && self.bare.contains(&conn) {
                        bare_frame.get_or_insert_with(|| Rc::from(crate::ws::frame::text(payload)))
                    } else {
                        frame.get_or_insert_with(|| envelope_of(&self.name_json, offset, kind, payload))
                    };
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
    ///
    /// What was buffered before is dropped: it is older than the answers to come (which
    /// bring it again from the history when it is still the same epoch), or it belongs to an
    /// epoch the broker lost, whose offsets must not be mixed with the new ones.
    pub fn on_link_up(&mut self, sink: &mut impl Sink) {
        for member in self.members.values_mut() {
            if let Member::Pending { buffered, replay, replay_overflowed, .. } = member {
                buffered.clear();
                replay.clear();
                *replay_overflowed = false;
            }
        }
        self.catch_up = None;
        if self.position.is_some() {
            self.start_catch_up(VecDeque::new(), sink);
        }
    }

    /// A kept message answering `request`: a pending member's join or the group's catch-up.
    pub fn on_item(&mut self, request: u64, offset: u64, kind: PayloadKind, payload: &[u8], sink: &mut impl Sink) {
        if let Some(c) = self.catch_up.as_mut().filter(|c| c.request == request) {
            match self.position.as_ref().map(|at| at.offset) {
                Some(at) if offset == at + 1 => self.deliver(offset, kind, payload, sink),
                // A history with a hole (a bus trimming while it answers): what is missing is
                // lost, told at the answer's end.
                Some(at) if offset > at + 1 => c.overflowed = true,
                _ => {}
            }
            return;
        }
        let Some(conn) = self.pending.get(&request) else { return };
        if let Some(Member::Pending { replay, replay_overflowed, .. }) = self.members.get_mut(conn) {
            if replay.back().is_none_or(|l| offset > l.offset) {
                let live = Live { offset, kind, payload: Rc::from(payload) };
                push_bounded(replay, replay_overflowed, live, self.buffer_max);
            }
        }
    }

    /// The end of the answer to `request`. For a join: the member is answered
    /// (`Sink::joined`), becomes active at the answer's offset and gets what arrived
    /// meanwhile as long as it follows; what it missed beyond (a hole, an overflow) but the
    /// group delivered already is a gap notice. Returned as told to the sink. For the
    /// catch-up: the group's position moves to the answer; unrecovered, every active member is
    /// told of the gap.
    pub fn on_position(
        &mut self,
        request: u64,
        epoch: &str,
        offset: u64,
        recovered: bool,
        sink: &mut impl Sink,
    ) -> Option<Joined> {
        let at = Position { epoch: Rc::from(epoch), offset };
        if self.catch_up.as_ref().is_some_and(|c| c.request == request) {
            let c = self.catch_up.take()?;
            // Recovered when the items brought the group to the answer's top (or the stream
            // is beyond it already); a history that fell short is a loss too.
            let whole = self.position.as_ref().is_some_and(|p| *p.epoch == *epoch && p.offset >= offset);
            let new_epoch = self.position.as_ref().is_some_and(|p| *p.epoch != *epoch);
            if new_epoch && offset > 0 {
                // The bus restarted (a new epoch). What it numbered before answering is likely
                // still in its history: the gap is at the epoch's start, and the group asks
                // for the rest instead of losing it (what was live meanwhile waits again).
                let start = Position { epoch: at.epoch, offset: 0 };
                self.gap_to_members(&start, sink);
                self.position = Some(start);
                self.start_catch_up(c.buffered, sink);
                return None;
            }
            if !recovered || c.overflowed || !whole {
                self.gap_to_members(&at, sink);
                self.position = Some(at);
            }
            self.replay(c.buffered, sink);
            return None;
        }
        let conn = self.pending.remove(&request)?;
        if !matches!(self.members.get(&conn), Some(Member::Pending { request: r, .. }) if *r == request) {
            return None;
        }
        let Some(Member::Pending { buffered, replay, replay_overflowed, .. }) =
            self.members.insert(conn, Member::Active { floor: offset, epoch: at.epoch.clone() })
        else {
            return None;
        };
        // A replay cut short by our bound, or with a hole, or not reaching the answer's top, is
        // no recovery.
        let follows = replay.iter().zip(replay.iter().skip(1)).all(|(a, b)| b.offset == a.offset + 1);
        let recovered = recovered && !replay_overflowed && follows && replay.back().is_none_or(|l| l.offset == offset);
        if recovered {
            for live in &replay {
                sink.send(conn, &self.frame_for(conn, live));
            }
        }
        let joined = Joined { conn, at, recovered };
        // The reply comes between the replay and the live stream (docs/protocol.md).
        sink.joined(&joined);
        let mut floor = offset;
        for live in buffered {
            if live.offset <= floor {
                continue;
            }
            if live.offset != floor + 1 {
                // A hole: the group fills it (its catch-up), or it is told below.
                break;
            }
            floor = live.offset;
            sink.send(conn, &self.frame_for(conn, &live));
        }
        let mut member_epoch = joined.at.epoch.clone();
        match &self.position {
            None => self.position = Some(Position { epoch: member_epoch.clone(), offset: floor }),
            // The group handed out already what this member lacks: lost for it.
            Some(p) if *p.epoch == *epoch && p.offset > floor => {
                floor = p.offset;
                member_epoch = p.epoch.clone();
                sink.gap(conn, p);
            }
            // (The group's copy: deliveries compare it by pointer first.)
            Some(p) if *p.epoch == *epoch => member_epoch = p.epoch.clone(),
            // The group's stream runs under another epoch than the member's answer: the
            // group's position is stale, find out where it is.
            Some(_) if self.catch_up.is_none() => self.start_catch_up(VecDeque::new(), sink),
            Some(_) => {}
        }
        self.members.insert(conn, Member::Active { floor, epoch: member_epoch });
        Some(joined)
    }

    /// Tells every active member it lost messages before `at` (the group's catch-up fell short)
    /// and moves it there.
    fn gap_to_members(&mut self, at: &Position, sink: &mut impl Sink) {
        for (&conn, member) in &mut self.members {
            match member {
                // Joined since at a newer answer (out of stream order): it lacks nothing up to
                // its floor, and must not get those offsets again.
                Member::Active { floor, epoch } if **epoch == *at.epoch && *floor >= at.offset => {}
                Member::Active { floor, epoch } => {
                    *floor = at.offset;
                    *epoch = at.epoch.clone();
                    sink.gap(conn, at);
                }
                Member::Pending { .. } => {}
            }
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
        /// Everything a connection was sent, in order: `m<offset>`, `gap<offset>`, `reply<offset>`.
        log: Vec<String>,
    }

    impl Sink for Record {
        fn send(&mut self, conn: usize, frame: &Rc<[u8]>) {
            let payload = &frame[2..];
            let v: serde_json::Value = serde_json::from_slice(payload).expect("envelope is JSON");
            self.sent.push((conn, v["offset"].as_u64().expect("offset")));
            self.log.push(format!("{conn}:m{}", v["offset"]));
        }
        fn gap(&mut self, conn: usize, at: &Position) {
            self.gaps.push((conn, at.offset));
            self.log.push(format!("{conn}:gap{}", at.offset));
        }
        fn request(&mut self, request: u64, since: Option<&Position>) {
            self.requests.push((request, since.map(|p| p.offset)));
        }
        fn next_request(&mut self) -> u64 {
            self.next += 1;
            100 + self.next
        }
        fn joined(&mut self, j: &Joined) {
            self.log.push(format!("{}:reply{}{}", j.conn, j.at.offset, if j.recovered { "" } else { "!" }));
        }
    }

    /// Every frame's payload as sent, per connection.
    #[derive(Default)]
    struct Raw(Vec<(usize, String)>);

    impl Sink for Raw {
        fn send(&mut self, conn: usize, frame: &Rc<[u8]>) {
            self.0.push((conn, String::from_utf8_lossy(&frame[2..]).into_owned()));
        }
        fn gap(&mut self, conn: usize, at: &Position) {
            self.0.push((conn, format!("gap{}", at.offset)));
        }
        fn request(&mut self, _: u64, _: Option<&Position>) {}
        fn next_request(&mut self) -> u64 {
            1000
        }
        fn joined(&mut self, _: &Joined) {}
    }

    #[test]
    fn handed_over_seed_members_get_bare_messages_from_their_cut_on() {
        let mut g = NumberedGroup::new("g", 100);
        let mut s = Raw::default();
        g.add_pending(1, 7);
        g.add_pending_bare(2, 8);
        assert!(g.is_bare(2) && !g.is_bare(1));
        g.on_position(7, "e", 3, false, &mut s);
        // The seed member's cut was 2: the history brings 3, then the answer.
        g.on_item(8, 3, PayloadKind::Text, b"three", &mut s);
        g.on_position(8, "e", 3, true, &mut s);
        assert_eq!(g.member_position(2), Some(Position { epoch: Rc::from("e"), offset: 3 }));
        g.on_live(4, PayloadKind::Json, br#"{"n":4}"#, &mut s);
        let to = |c: usize| s.0.iter().filter(|(k, _)| *k == c).map(|(_, m)| m.clone()).collect::<Vec<_>>();
        assert_eq!(to(2), ["three", r#"{"n":4}"#], "bare, from the cut on, once each");
        assert_eq!(to(1), [r#"{"group":"g","offset":4,"message":{"n":4}}"#]);
        g.remove(2);
        assert!(!g.is_bare(2) && g.member_position(2).is_none());
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
        let joined = g.on_position(7, "e", 5, true, &mut s).expect("joined");
        assert!(joined.recovered && joined.at.offset == 5);
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

    /// Two members at e:10, then the bus restarts and numbers from 1 again under epoch f.
    fn restarted(s: &mut Record) -> NumberedGroup {
        let mut g = NumberedGroup::new("g", 100);
        g.add_pending(1, 1);
        g.add_pending(2, 2);
        g.on_position(1, "e", 10, false, s);
        g.on_position(2, "e", 10, false, s);
        g.on_link_up(s);
        assert_eq!(s.requests, vec![(101, Some(10))]);
        live(&mut g, 2, s); // f:1 was numbered before this worker subscribed again
        g.on_position(101, "f", 2, false, s);
        let mut gaps = s.gaps.clone();
        gaps.sort();
        assert_eq!(gaps, vec![(1, 0), (2, 0)], "the gap is at the new epoch's start");
        assert_eq!(s.requests[1..], [(102, Some(0))], "and the new epoch's history is asked for");
        live(&mut g, 3, s);
        g
    }

    #[test]
    fn a_restarted_bus_is_a_gap_at_its_epochs_start_and_its_history_is_recovered() {
        let mut s = Record::default();
        let mut g = restarted(&mut s);
        g.on_item(102, 1, PayloadKind::Text, b"m", &mut s);
        g.on_item(102, 2, PayloadKind::Text, b"m", &mut s);
        g.on_position(102, "f", 2, true, &mut s);
        live(&mut g, 4, &mut s);
        let mut sent = s.sent.clone();
        sent.sort();
        assert_eq!(sent, [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]);
        assert_eq!(s.gaps.len(), 2, "one gap each: {:?}", s.gaps);
        assert_eq!(g.position(), Some(&Position { epoch: "f".into(), offset: 4 }));
    }

    #[test]
    fn a_restarted_bus_without_the_history_is_a_second_gap_and_the_stream_goes_on() {
        let mut s = Record::default();
        let mut g = restarted(&mut s);
        g.on_position(102, "f", 2, false, &mut s);
        live(&mut g, 4, &mut s);
        let mut gaps = s.gaps.clone();
        gaps.sort();
        assert_eq!(gaps, vec![(1, 0), (1, 2), (2, 0), (2, 2)]);
        let mut sent = s.sent.clone();
        sent.sort();
        assert_eq!(sent, [(1, 3), (1, 4), (2, 3), (2, 4)]);
        assert_eq!(g.position(), Some(&Position { epoch: "f".into(), offset: 4 }));
    }

    // Regressions found by the model below.

    #[test]
    fn the_reply_comes_between_the_replay_and_the_live_stream() {
        let mut g = NumberedGroup::new("g", 100);
        let mut s = Record::default();
        g.add_pending(1, 7);
        g.on_item(7, 4, PayloadKind::Text, b"m", &mut s);
        g.on_item(7, 5, PayloadKind::Text, b"m", &mut s);
        // A Redis answer can come after live messages that follow it.
        live(&mut g, 6, &mut s);
        live(&mut g, 7, &mut s);
        g.on_position(7, "e", 5, true, &mut s);
        live(&mut g, 8, &mut s);
        assert_eq!(s.log, ["1:m4", "1:m5", "1:reply5", "1:m6", "1:m7", "1:m8"]);
    }

    #[test]
    fn a_replay_cut_by_a_broker_restart_is_not_half_delivered() {
        let mut g = NumberedGroup::new("g", 100);
        let mut s = Record::default();
        g.add_pending(1, 7);
        g.on_item(7, 1, PayloadKind::Text, b"m", &mut s);
        g.on_link_up(&mut s); // the broker restarted; the join is asked again
        g.on_position(7, "f", 0, false, &mut s);
        assert_eq!(s.log, ["1:reply0!"]);
    }

    #[test]
    fn what_a_join_buffered_before_a_broker_restart_is_not_sent_as_the_new_epoch() {
        let mut g = NumberedGroup::new("g", 100);
        let mut s = Record::default();
        g.add_pending(1, 7);
        live(&mut g, 2, &mut s); // old epoch
        g.on_link_up(&mut s);
        g.on_position(7, "f", 1, false, &mut s);
        live(&mut g, 2, &mut s); // new epoch
        assert_eq!(s.log, ["1:reply1!", "1:m2"]);
    }

    #[test]
    fn a_hole_in_what_a_join_buffered_is_not_skipped_silently() {
        let mut g = NumberedGroup::new("g", 100);
        let mut s = Record::default();
        g.add_pending(1, 1);
        g.on_position(1, "e", 3, false, &mut s);
        g.add_pending(2, 2);
        live(&mut g, 4, &mut s);
        live(&mut g, 6, &mut s); // 5 lost: the group catches up
        g.on_item(101, 5, PayloadKind::Text, b"m", &mut s);
        g.on_item(101, 6, PayloadKind::Text, b"m", &mut s);
        g.on_position(101, "e", 6, true, &mut s);
        // The join's answer (Redis: out of stream order) says 3; its buffer has 4 and 6.
        g.on_position(2, "e", 3, false, &mut s);
        let two: Vec<_> = s.log.iter().filter(|l| l.starts_with("2:")).collect();
        assert_eq!(two, ["2:reply3!", "2:m4", "2:gap6"]);
    }

    #[test]
    fn a_history_with_a_hole_is_no_recovery() {
        let mut g = NumberedGroup::new("g", 100);
        let mut s = Record::default();
        g.add_pending(1, 1);
        g.on_position(1, "e", 3, false, &mut s);
        live(&mut g, 6, &mut s); // 4 and 5 missing: catch-up 101
        g.on_item(101, 4, PayloadKind::Text, b"m", &mut s);
        g.on_item(101, 6, PayloadKind::Text, b"m", &mut s); // 5 trimmed meanwhile
        g.on_position(101, "e", 6, true, &mut s);
        live(&mut g, 7, &mut s);
        assert_eq!(s.log, ["1:reply3!", "1:m4", "1:gap6", "1:m7"]);
        g.add_pending(2, 2);
        g.on_item(2, 5, PayloadKind::Text, b"m", &mut s);
        g.on_item(2, 7, PayloadKind::Text, b"m", &mut s);
        g.on_position(2, "e", 7, true, &mut s);
        assert_eq!(s.log[4..], ["2:reply7!"]);
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

/// A model of the bus (the broker's numbering, history and stream order) driving one group
/// the way `recovery.rs` does, with lost and repeated messages, joins with and without
/// `since`, leaves and reconnects (some of them a broker restart: a new epoch). Checked:
/// every member's stream, from its join's answer on, follows offset by offset, each hole
/// announced by a gap notice; a join's replay is its `since`'s successors, before its reply;
/// buffers stay bounded; once the bus is quiet every member is at the group's top.
#[cfg(test)]
mod model {
    use std::collections::{BTreeMap, HashMap, VecDeque};
    use std::rc::Rc;

    use proptest::prelude::*;

    use super::{Joined, Member, NumberedGroup, Position, Sink};
    use crate::channel::wire::PayloadKind;

    #[derive(Debug, Clone, PartialEq)]
    enum Ev {
        /// A message: its true epoch and offset (from the payload).
        Msg(u32, u64),
        Gap(u32, u64),
        Reply {
            epoch: u32,
            offset: u64,
            recovered: bool,
        },
    }

    #[derive(Default)]
    struct Rec {
        events: HashMap<usize, Vec<Ev>>,
        requests: Vec<(u64, Option<Position>)>,
        next: u64,
    }

    fn epoch_of(s: &str) -> u32 {
        s.trim_start_matches('e').parse().expect("model epoch")
    }

    impl Sink for Rec {
        fn send(&mut self, conn: usize, frame: &Rc<[u8]>) {
            let v: serde_json::Value = serde_json::from_slice(&frame[2..]).expect("envelope is JSON");
            let label = v["offset"].as_u64().expect("offset");
            let msg = v["message"].as_str().expect("text message");
            let (e, k) = msg.split_once(':').expect("e:k");
            let (e, k): (u32, u64) = (e.parse().unwrap(), k.parse().unwrap());
            assert_eq!(label, k, "envelope offset is the message's own");
            self.events.entry(conn).or_default().push(Ev::Msg(e, k));
        }
        fn gap(&mut self, conn: usize, at: &Position) {
            self.events.entry(conn).or_default().push(Ev::Gap(epoch_of(&at.epoch), at.offset));
        }
        fn request(&mut self, request: u64, since: Option<&Position>) {
            self.requests.push((request, since.cloned()));
        }
        fn next_request(&mut self) -> u64 {
            self.next += 1;
            self.next
        }
        fn joined(&mut self, j: &Joined) {
            let ev = Ev::Reply { epoch: epoch_of(&j.at.epoch), offset: j.at.offset, recovered: j.recovered };
            self.events.entry(j.conn).or_default().push(ev);
        }
    }

    #[derive(Debug, Clone)]
    enum Frame {
        Live { epoch: u32, offset: u64 },
        Item { request: u64, epoch: u32, offset: u64 },
        Pos { request: u64, epoch: u32, offset: u64, recovered: bool },
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// The broker numbers a message; `lose`: the worker never sees it.
        Publish {
            lose: bool,
        },
        /// A message seen already comes again (`back` offsets below the top).
        Repeat {
            back: u8,
        },
        /// The worker reads up to `n` frames.
        Deliver {
            n: u8,
        },
        /// The broker answers the oldest history request.
        Serve,
        /// Out of stream order (the Redis bus): the answer overtakes the messages queued
        /// (`early`), or is held back behind later ones until `Release`.
        ServeOutOfOrder {
            early: bool,
        },
        Release,
        /// `since`: None, or `back` offsets below the top in the current (`old`: a past) epoch.
        Join {
            conn: u8,
            since: Option<(bool, u8)>,
        },
        Leave {
            conn: u8,
        },
        /// The link drops and comes back; `restart`: the broker lost everything.
        LinkUp {
            restart: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => proptest::bool::weighted(0.2).prop_map(|lose| Op::Publish { lose }),
            1 => (0u8..4).prop_map(|back| Op::Repeat { back }),
            6 => (1u8..6).prop_map(|n| Op::Deliver { n }),
            3 => Just(Op::Serve),
            1 => any::<bool>().prop_map(|early| Op::ServeOutOfOrder { early }),
            1 => Just(Op::Release),
            2 => (0u8..4, proptest::option::of((proptest::bool::weighted(0.2), 0u8..12)))
                .prop_map(|(conn, since)| Op::Join { conn, since }),
            1 => (0u8..4).prop_map(|conn| Op::Leave { conn }),
            1 => proptest::bool::weighted(0.4).prop_map(|restart| Op::LinkUp { restart }),
        ]
    }

    enum Asked {
        Join { conn: usize, since: Option<Position> },
        CatchUp,
    }

    /// One membership, from its join.
    struct Session {
        since: Option<(u32, u64)>,
        events: Vec<Ev>,
    }

    struct World {
        // The broker.
        epoch: u32,
        top: u64,
        size: u64,
        max_recover: u64,
        inbound: VecDeque<Frame>,
        outbound: VecDeque<(u64, Option<Position>)>,
        /// Answers held back (`ServeOutOfOrder`); `None`: answers keep stream order.
        held: Option<Vec<Frame>>,
        // The worker.
        group: Option<NumberedGroup>,
        buffer_max: usize,
        asked: HashMap<u64, Asked>,
        sink: Rec,
        sessions: BTreeMap<usize, Session>,
        ended: Vec<Session>,
    }

    fn pos(epoch: u32, offset: u64) -> Position {
        Position { epoch: Rc::from(format!("e{epoch}")), offset }
    }

    impl World {
        fn new(size: u64, max_recover: u64, buffer_max: usize) -> World {
            World {
                epoch: 1,
                top: 0,
                size,
                max_recover,
                inbound: VecDeque::new(),
                outbound: VecDeque::new(),
                held: None,
                group: None,
                buffer_max,
                asked: HashMap::new(),
                sink: Rec::default(),
                sessions: BTreeMap::new(),
                ended: Vec::new(),
            }
        }

        /// Catch-ups the group asked for (recovery.rs's `ToMembers::request`).
        fn take_requests(&mut self) {
            for (request, since) in std::mem::take(&mut self.sink.requests) {
                self.asked.insert(request, Asked::CatchUp);
                self.outbound.push_back((request, since));
            }
        }

        fn collect(&mut self) {
            for (conn, evs) in std::mem::take(&mut self.sink.events) {
                self.sessions.get_mut(&conn).expect("events for a member").events.extend(evs);
            }
        }

        fn apply(&mut self, op: &Op) {
            match *op {
                Op::Publish { lose } => {
                    self.top += 1;
                    if !lose {
                        self.inbound.push_back(Frame::Live { epoch: self.epoch, offset: self.top });
                    }
                }
                Op::Repeat { back } => {
                    if self.top > u64::from(back) {
                        let offset = self.top - u64::from(back);
                        self.inbound.push_back(Frame::Live { epoch: self.epoch, offset });
                    }
                }
                Op::Deliver { n } => {
                    for _ in 0..n {
                        let Some(frame) = self.inbound.pop_front() else { break };
                        self.deliver(frame);
                    }
                }
                Op::Serve => self.serve(),
                Op::ServeOutOfOrder { early } => {
                    if self.held.is_none() {
                        return;
                    }
                    let len = self.inbound.len();
                    self.serve();
                    let answer: Vec<_> = self.inbound.drain(len..).collect();
                    if early {
                        for f in answer.into_iter().rev() {
                            self.inbound.push_front(f);
                        }
                    } else if let Some(held) = &mut self.held {
                        held.extend(answer);
                    }
                }
                Op::Release => {
                    if let Some(held) = &mut self.held {
                        self.inbound.extend(held.drain(..));
                    }
                }
                Op::Join { conn, since } => {
                    let conn = usize::from(conn);
                    if self.group.as_ref().is_some_and(|g| g.contains(conn)) {
                        return;
                    }
                    let since = since.map(|(old, back)| {
                        let epoch = if old { self.epoch.saturating_sub(1).max(1) + 100 } else { self.epoch };
                        pos(epoch, self.top.saturating_sub(u64::from(back)))
                    });
                    let request = self.sink.next_request();
                    let g = self.group.get_or_insert_with(|| {
                        let mut g = NumberedGroup::new("g", 0);
                        g.buffer_max = self.buffer_max;
                        g
                    });
                    g.add_pending(conn, request);
                    let s = since.as_ref().map(|p| (epoch_of(&p.epoch), p.offset));
                    self.sessions.insert(conn, Session { since: s, events: Vec::new() });
                    self.asked.insert(request, Asked::Join { conn, since: since.clone() });
                    self.outbound.push_back((request, since));
                }
                Op::Leave { conn } => {
                    let conn = usize::from(conn);
                    let Some(g) = &mut self.group else { return };
                    if !g.contains(conn) {
                        return;
                    }
                    // delivery.rs: a pending join's request is forgotten.
                    if let Some(request) = g.pending_request(conn) {
                        self.asked.remove(&request);
                    }
                    g.remove(conn);
                    if g.is_empty() {
                        self.group = None;
                    }
                    if let Some(s) = self.sessions.remove(&conn) {
                        self.ended.push(s);
                    }
                }
                Op::LinkUp { restart } => {
                    self.inbound.clear();
                    self.outbound.clear();
                    if let Some(held) = &mut self.held {
                        held.clear();
                    }
                    if restart {
                        self.epoch += 1;
                        self.top = 0;
                    }
                    // recovery.rs, BusEvent::LinkUp.
                    self.asked.retain(|_, a| matches!(a, Asked::Join { .. }));
                    let mut joins: Vec<_> = self
                        .asked
                        .iter()
                        .filter_map(|(&r, a)| match a {
                            Asked::Join { since, .. } => Some((r, since.clone())),
                            Asked::CatchUp => None,
                        })
                        .collect();
                    joins.sort_by_key(|j| j.0);
                    self.outbound.extend(joins);
                    if let Some(g) = &mut self.group {
                        g.on_link_up(&mut self.sink);
                    }
                }
            }
            self.take_requests();
            self.collect();
            self.check_bounds();
        }

        /// recovery.rs, `on_bus_event`.
        fn deliver(&mut self, frame: Frame) {
            match frame {
                Frame::Live { epoch, offset } => {
                    if let Some(g) = &mut self.group {
                        g.on_live(offset, PayloadKind::Text, format!("{epoch}:{offset}").as_bytes(), &mut self.sink);
                    }
                }
                Frame::Item { request, epoch, offset } => {
                    if !self.asked.contains_key(&request) {
                        return;
                    }
                    if let Some(g) = &mut self.group {
                        let payload = format!("{epoch}:{offset}");
                        g.on_item(request, offset, PayloadKind::Text, payload.as_bytes(), &mut self.sink);
                    }
                }
                Frame::Pos { request, epoch, offset, recovered } => {
                    let Some(asked) = self.asked.remove(&request) else { return };
                    let Some(g) = &mut self.group else { return };
                    let joined = g.on_position(request, &format!("e{epoch}"), offset, recovered, &mut self.sink);
                    if let Some(j) = joined {
                        match asked {
                            Asked::Join { conn, .. } => assert_eq!(conn, j.conn, "the reply goes to the joiner"),
                            Asked::CatchUp => panic!("a catch-up answered a join"),
                        }
                    }
                }
            }
        }

        /// The broker's HISTORY: items only when recoverable, then POSITION.
        fn serve(&mut self) {
            let Some((request, since)) = self.outbound.pop_front() else { return };
            let oldest_kept = self.top.saturating_sub(self.size) + 1;
            let recovered = since.as_ref().is_some_and(|s| {
                epoch_of(&s.epoch) == self.epoch
                    && s.offset <= self.top
                    && self.top - s.offset <= self.max_recover
                    && (s.offset == self.top || s.offset + 1 >= oldest_kept)
            });
            if let (true, Some(s)) = (recovered, &since) {
                for offset in s.offset + 1..=self.top {
                    self.inbound.push_back(Frame::Item { request, epoch: self.epoch, offset });
                }
            }
            self.inbound.push_back(Frame::Pos { request, epoch: self.epoch, offset: self.top, recovered });
        }

        fn check_bounds(&self) {
            let Some(g) = &self.group else { return };
            let waiting = g.members.values().filter(|m| matches!(m, Member::Pending { .. })).count();
            assert_eq!(waiting, g.pending.len(), "pending members and their requests agree");
            for (request, conn) in &g.pending {
                assert!(matches!(g.members.get(conn), Some(Member::Pending { request: r, .. }) if r == request));
            }
            for m in g.members.values() {
                if let Member::Pending { buffered, .. } = m {
                    assert!(buffered.len() <= self.buffer_max, "a join's buffer is bounded");
                }
            }
            if let Some(c) = &g.catch_up {
                assert!(c.buffered.len() <= self.buffer_max, "the catch-up buffer is bounded");
            }
        }

        /// The bus goes quiet after one more message: everything is read and answered.
        fn settle(&mut self) {
            self.apply(&Op::Release);
            self.apply(&Op::Publish { lose: false });
            for _ in 0..1000 {
                if self.inbound.is_empty() && self.outbound.is_empty() {
                    return;
                }
                self.apply(&Op::Deliver { n: 50 });
                self.apply(&Op::Serve);
            }
            panic!("the group never settles: it keeps asking");
        }
    }

    /// Checks one membership's events. `at_end`: still a member after `settle`, at (epoch, top).
    fn check_session(s: &Session, at_end: Option<(u32, u64)>) -> Result<(), String> {
        let mut replay = Vec::new();
        let mut cur = None;
        for ev in &s.events {
            match (cur, ev) {
                (None, Ev::Msg(e, k)) => replay.push((*e, *k)),
                (None, Ev::Gap(..)) => return Err(format!("gap notice before the join's reply: {:?}", s.events)),
                (None, Ev::Reply { epoch, offset, recovered }) => {
                    if *recovered {
                        let (se, sk) = s.since.ok_or("recovered without since")?;
                        let want: Vec<_> = (sk + 1..=*offset).map(|k| (se, k)).collect();
                        if *epoch != se || replay != want {
                            return Err(format!("recovered join got {replay:?}, wants {want:?}: {:?}", s.events));
                        }
                    } else if !replay.is_empty() {
                        return Err(format!("unrecovered join got a replay: {:?}", s.events));
                    }
                    cur = Some((*epoch, *offset));
                }
                (Some(_), Ev::Reply { .. }) => return Err(format!("two replies: {:?}", s.events)),
                (Some((e, k)), Ev::Msg(me, mk)) => {
                    if (*me, *mk) != (e, k + 1) {
                        return Err(format!("after {e}:{k} came {me}:{mk} without a gap notice: {:?}", s.events));
                    }
                    cur = Some((e, k + 1));
                }
                (Some((ce, ck)), Ev::Gap(e, k)) => {
                    if *e == ce && *k < ck {
                        return Err(format!("a gap notice back to {e}:{k} after {ce}:{ck}: {:?}", s.events));
                    }
                    cur = Some((*e, *k));
                }
            }
        }
        if let Some(end) = at_end {
            if cur != Some(end) {
                return Err(format!("settled at {cur:?}, the group is at {end:?}: {:?}", s.events));
            }
        }
        Ok(())
    }

    fn run(size: u64, max_recover: u64, buffer_max: usize, redis: bool, ops: &[Op]) -> Result<(), String> {
        let mut w = World::new(size, max_recover, buffer_max);
        if redis {
            w.held = Some(Vec::new());
        }
        for op in ops {
            w.apply(op);
        }
        for s in &w.ended {
            check_session(s, None)?;
        }
        w.settle();
        for s in w.ended.iter() {
            check_session(s, None)?;
        }
        for s in w.sessions.values() {
            check_session(s, Some((w.epoch, w.top)))?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
        #[test]
        fn every_member_gets_the_stream_in_order_or_a_gap_notice(
            size in 0u64..12,
            max_recover in 1u64..12,
            buffer_max in 2usize..8,
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            if let Err(e) = run(size, max_recover, buffer_max, false, &ops) {
                prop_assert!(false, "{}", e);
            }
        }

        /// The same, with answers out of stream order (as on the Redis bus).
        #[test]
        fn answers_out_of_stream_order_keep_the_rules(
            size in 0u64..12,
            max_recover in 1u64..12,
            buffer_max in 2usize..8,
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            if let Err(e) = run(size, max_recover, buffer_max, true, &ops) {
                prop_assert!(false, "{}", e);
            }
        }
    }
}
