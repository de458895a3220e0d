//! Protocol 2 on the clients side: a protocol-2 join (ask the bus for the group's position
//! and, with `since`, the messages after it), and what the bus brings back (numbered
//! messages, history answers, our publishes' offsets, a reconnect), turned into envelopes,
//! replies and gap notices for the members. The per-group rules live in `numbered.rs`.

use std::rc::Rc;

use log::warn;
use serde_json::value::RawValue;

use super::bus::BusEvent;
use super::clients::{Clients, Parts};
use super::groups::{Groups, Joined};
use super::numbered::{self, gap_notice, Position, Sink};
use super::offsets::{Asked, Offsets, StampReply};
use crate::channel::wire::{PayloadKind, Since};
use crate::protocol::{self, RequestError, SinceArg};

/// A history request to send to the bus once it is free (the bus is busy handing out events
/// when most of them arise).
pub struct Ask {
    pub request: u64,
    pub group: Rc<str>,
    pub since: Option<Position>,
}

impl Ask {
    pub fn since(&self) -> Option<Since<'_>> {
        self.since.as_ref().map(|p| Since { epoch: &p.epoch, offset: p.offset })
    }
}

/// How a command is answered.
pub(super) enum Answer {
    /// `{"id":..,"ok":true}` when it has an id.
    Ok,
    /// The answer comes later (from the bus), or was given already.
    Later,
}

/// The `Sink` of one group: envelopes and notices to its members' queues, catch-ups to the
/// bus's to-do list.
struct ToMembers<'a> {
    clients: &'a mut Clients,
    group: &'a Rc<str>,
    offsets: &'a mut Offsets,
    asks: &'a mut Vec<Ask>,
    /// The join whose answer is being handled (for its reply).
    join: Option<&'a Asked>,
}

impl Sink for ToMembers<'_> {
    fn send(&mut self, conn: usize, frame: &Rc<[u8]>) {
        self.clients.queue_shared(conn, frame.clone());
    }
    fn gap(&mut self, conn: usize, at: &Position) {
        self.clients.tell_gap(conn, self.group, at);
    }
    fn request(&mut self, request: u64, since: Option<&Position>) {
        self.offsets.asked.insert(request, Asked::CatchUp { group: self.group.clone() });
        self.asks.push(Ask { request, group: self.group.clone(), since: since.cloned() });
    }
    fn next_request(&mut self) -> u64 {
        self.offsets.next_request()
    }
    fn joined(&mut self, joined: &numbered::Joined) {
        match self.join {
            Some(Asked::Join { conn_id, handed: true, .. }) => {
                self.clients.handed_joined(joined.conn, *conn_id, self.group, &joined.at, joined.recovered)
            }
            Some(Asked::Join { conn_id, id, since, .. }) => {
                let (conn, at) = (joined.conn, &joined.at);
                self.clients.joined(conn, *conn_id, id.as_deref(), since.is_some(), at, joined.recovered);
            }
            _ => {}
        }
    }
}

impl Clients {
    /// A protocol-2 `add_group`: the member waits for the bus's answer (the reply, and the
    /// replay when `since` is given, come with it).
    pub(super) fn join_numbered(
        &mut self,
        key: usize,
        group: &str,
        since: Option<SinceArg<'_>>,
        id: Option<&RawValue>,
        parts: &mut Parts<'_>,
    ) -> Result<Answer, RequestError> {
        let limit = self.limits.max_groups_per_connection;
        let conn = &mut self.conns[key];
        if conn.groups.len() >= limit && parts.groups.lookup(group).is_none_or(|g| !conn.groups.contains(&g)) {
            self.stats.too_many_groups += 1;
            return Err(RequestError::TooManyGroups(limit));
        }
        let request = parts.offsets.next_request();
        let buffer_max = parts.offsets.max_recover as usize;
        match parts.groups.join_numbered(group, key, request, buffer_max) {
            Joined::New { id: gid, first } => {
                conn.groups.push(gid);
                if first {
                    parts.bus.subscribe(group);
                }
                let since = since.map(|s| Position { epoch: Rc::from(&*s.epoch), offset: s.offset });
                let ask = Ask { request, group: Rc::from(group), since };
                parts.bus.request_history(request, group, ask.since(), parts.offsets.max_recover);
                let conn_id = conn.id;
                let id = id.map(RawValue::to_owned);
                let asked = Asked::Join { group: ask.group, conn_id, id, since: ask.since, handed: false };
                parts.offsets.asked.insert(request, asked);
                Ok(Answer::Later)
            }
            Joined::AlreadyMember => {
                // Already receiving the stream: its position is the group's.
                let at = parts.groups.lookup(group).and_then(|g| parts.groups.numbered(g)?.position().cloned());
                match (id, at) {
                    (Some(id), Some(at)) => {
                        let recovered = since.is_some().then_some(true);
                        self.reply(key, &protocol::position_reply(id, &at.epoch, at.offset, recovered));
                        Ok(Answer::Later)
                    }
                    _ => Ok(Answer::Ok),
                }
            }
        }
    }

    /// A protocol-2 `send_to_group` with an `id`: answered with the offset once known.
    pub(super) fn await_offset(&mut self, key: usize, seq: u64, id: &RawValue, offsets: &mut Offsets) {
        let conn_id = self.conns.get(key).map_or(0, |c| c.id);
        if let Some(old) = offsets.await_stamp(StampReply { seq, conn: key, conn_id, id: id.to_owned() }) {
            self.answer_stamp(&old, 0);
        }
    }

    fn answer_stamp(&mut self, waiting: &StampReply, offset: u64) {
        if self.conns.get(waiting.conn).is_some_and(|c| c.id == waiting.conn_id) {
            self.reply_open(waiting.conn, &protocol::offset_reply(&waiting.id, offset));
        }
    }

    /// One event from the bus. History requests it gives rise to are added to `asks`.
    pub fn on_bus_event(
        &mut self,
        event: BusEvent<'_>,
        groups: &mut Groups,
        offsets: &mut Offsets,
        asks: &mut Vec<Ask>,
    ) {
        match event {
            BusEvent::Message { group, offset, kind, payload, own } => {
                let Some(id) = groups.lookup(group) else { return };
                let numbered = offset != 0 && groups.numbered(id).is_some();
                // Our own publish, back from Redis only to be numbered: the seed members had
                // it, so without protocol-2 members here it costs nothing more (as before).
                if own && !numbered {
                    return;
                }
                if !self.valid_from_bus(group, PayloadKind::Text, payload) {
                    return;
                }
                if !own {
                    self.deliver_to(groups, id, payload);
                }
                // UTF-8 was checked above: only the JSON an envelope embeds is left to check.
                if !numbered || (kind == PayloadKind::Json && !self.valid_from_bus(group, kind, payload)) {
                    return;
                }
                let Some(name) = groups.name_rc(id) else { return };
                if let Some(numbered) = groups.numbered_mut(id) {
                    let mut sink = ToMembers { clients: self, group: &name, offsets, asks, join: None };
                    numbered.on_live(offset, kind, payload, &mut sink);
                }
            }
            BusEvent::Stamped { seq, offset } => {
                while offsets.stamp_replies.front().is_some_and(|r| r.seq <= seq) {
                    if let Some(waiting) = offsets.stamp_replies.pop_front() {
                        let offset = if waiting.seq == seq { offset } else { 0 };
                        self.answer_stamp(&waiting, offset);
                    }
                }
            }
            BusEvent::HistoryItem { request, offset, kind, payload } => {
                let Some(asked) = offsets.asked.get(&request) else { return };
                let name = asked.group().clone();
                let Some(id) = groups.lookup(&name) else { return };
                if !self.valid_from_bus(&name, kind, payload) {
                    return;
                }
                if let Some(numbered) = groups.numbered_mut(id) {
                    let mut sink = ToMembers { clients: self, group: &name, offsets, asks, join: None };
                    numbered.on_item(request, offset, kind, payload, &mut sink);
                }
            }
            BusEvent::Position { request, epoch, offset, recovered } => {
                let Some(asked) = offsets.asked.remove(&request) else { return };
                let name = asked.group().clone();
                let Some(numbered) = groups.lookup(&name).and_then(|id| groups.numbered_mut(id)) else { return };
                // The reply goes out from the sink, between the replay and the live stream.
                let mut sink = ToMembers { clients: self, group: &name, offsets, asks, join: Some(&asked) };
                numbered.on_position(request, epoch, offset, recovered, &mut sink);
            }
            BusEvent::LinkUp => {
                // Every join still waiting is asked again; catch-ups start afresh.
                offsets.asked.retain(|_, a| matches!(a, Asked::Join { .. }));
                for (&request, asked) in &offsets.asked {
                    if let Asked::Join { group, since, .. } = asked {
                        asks.push(Ask { request, group: group.clone(), since: since.clone() });
                    }
                }
                for id in groups.numbered_ids() {
                    let Some(name) = groups.name_rc(id) else { continue };
                    if let Some(numbered) = groups.numbered_mut(id) {
                        let mut sink = ToMembers { clients: self, group: &name, offsets, asks, join: None };
                        numbered.on_link_up(&mut sink);
                    }
                }
            }
        }
    }

    /// Tells `conn` it lost messages of `group` before `at`: a gap notice on protocol 2; a
    /// seed-protocol connection (a handed-over one, the only kind that follows offsets) has
    /// no way to hear it, so it is only counted (`handoff_gaps`).
    fn tell_gap(&mut self, conn: usize, group: &str, at: &Position) {
        match self.conns.get(conn) {
            Some(c) if c.protocol2 => {
                self.stats.gap_notices += 1;
                self.reply_open(conn, &gap_notice(group, at));
            }
            Some(_) => self.stats.handoff_gaps += 1,
            None => {}
        }
    }

    /// A membership handed over by a reload is in step with the group: what the history could
    /// not give between the old worker's cut and now is a gap.
    fn handed_joined(&mut self, conn: usize, conn_id: u64, group: &str, at: &Position, recovered: bool) {
        if self.conns.get(conn).is_some_and(|c| c.id == conn_id) && !recovered {
            self.tell_gap(conn, group, at);
        }
    }

    /// Makes connection `key` (just handed over, not yet serving) a numbered member of `group`
    /// from `cut`, the last offset the old worker queued to it: the bus is asked for what
    /// follows, so the member gets every later message once, the missing ones from the
    /// history first. `bare`: a seed-protocol connection, sent bare messages.
    pub(super) fn join_handed(&mut self, key: usize, group: &str, cut: Position, bare: bool, parts: &mut Parts<'_>) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let request = parts.offsets.next_request();
        let buffer_max = parts.offsets.max_recover as usize;
        let joined = if bare {
            parts.groups.join_numbered_bare(group, key, request, buffer_max)
        } else {
            parts.groups.join_numbered(group, key, request, buffer_max)
        };
        let Joined::New { id: gid, first } = joined else { return };
        conn.groups.push(gid);
        if first {
            parts.bus.subscribe(group);
        }
        let since = Since { epoch: &cut.epoch, offset: cut.offset };
        parts.bus.request_history(request, group, Some(since), parts.offsets.max_recover);
        let asked = Asked::Join { group: Rc::from(group), conn_id: conn.id, id: None, since: Some(cut), handed: true };
        parts.offsets.asked.insert(request, asked);
    }

    /// A join got its answer: reply (with `recovered` when it asked with `since`), count it.
    fn joined(
        &mut self,
        conn: usize,
        conn_id: u64,
        id: Option<&RawValue>,
        asked_since: bool,
        at: &Position,
        recovered: bool,
    ) {
        if self.conns.get(conn).is_none_or(|c| c.id != conn_id) {
            return;
        }
        if asked_since {
            if recovered {
                self.stats.joins_recovered += 1;
            } else {
                self.stats.joins_unrecovered += 1;
            }
        }
        if let Some(id) = id {
            let recovered = asked_since.then_some(recovered);
            self.reply_open(conn, &protocol::position_reply(id, &at.epoch, at.offset, recovered));
        }
    }

    /// A reply or notice the bus gave rise to: only while the connection is open. One that is
    /// closing has its close frame queued already, and nothing may follow it (RFC 6455 5.5.1);
    /// the envelopes check the same in `queue_shared`.
    fn reply_open(&mut self, key: usize, text: &[u8]) {
        if self.conns.get(key).is_some_and(|c| c.state.is_open()) {
            self.reply(key, text);
        }
    }

    /// A message from the bus goes out as a text frame, so it must be UTF-8, and JSON when it
    /// says so (protocol 2 embeds it as it is): a client could only produce those, another
    /// publisher on the channel or in Redis could send anything. Checked once per message.
    fn valid_from_bus(&mut self, group: &str, kind: PayloadKind, payload: &[u8]) -> bool {
        let valid = std::str::from_utf8(payload).is_ok()
            && (kind == PayloadKind::Text || serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok());
        if !valid {
            self.stats.bus_invalid_utf8 += 1;
            if self.stats.bus_invalid_utf8.is_power_of_two() {
                warn!(
                    "dropped a message for group {group:?} from the bus: not UTF-8 or not the JSON it claims ({} so far)",
                    self.stats.bus_invalid_utf8
                );
            }
        }
        valid
    }
}
