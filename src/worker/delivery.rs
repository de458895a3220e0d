//! The delivery path of a worker, on the clients side: joining and leaving groups (and the bus
//! subscriptions that follow), and delivering a group message to the local members: the frame
//! is encoded once and the same bytes (`Rc<[u8]>`) queued to every member, each flushed once
//! at the end of the loop turn.

use std::rc::Rc;

use super::clients::{Clients, Parts};

use super::groups::{GroupId, Groups, Joined};
use super::outqueue::Chunk;
use crate::protocol::RequestError;
use crate::ws::frame;

/// Takes connection `key` out of group `id`: forgets the history request its protocol-2 join
/// still waits on (nobody would take the answer), and unsubscribes when it was the last member.
pub(super) fn leave_group(id: GroupId, key: usize, parts: &mut Parts<'_>) {
    if let Some(request) = parts.groups.numbered(id).and_then(|n| n.pending_request(key)) {
        parts.offsets.asked.remove(&request);
    }
    if let Some(name) = parts.groups.leave(id, key) {
        parts.bus.unsubscribe(&name);
    }
}

impl Clients {
    pub(super) fn join(&mut self, key: usize, group: &str, parts: &mut Parts<'_>) -> Result<(), RequestError> {
        let limit = self.limits.max_groups_per_connection;
        let conn = &mut self.conns[key];
        if conn.groups.len() >= limit && parts.groups.lookup(group).is_none_or(|id| !conn.groups.contains(&id)) {
            self.stats.too_many_groups += 1;
            return Err(RequestError::TooManyGroups(limit));
        }
        if let Joined::New { id, first } = parts.groups.join(group, key) {
            conn.groups.push(id);
            if first {
                parts.bus.subscribe(group);
            }
        }
        Ok(())
    }

    pub(super) fn leave(&mut self, key: usize, group: &str, parts: &mut Parts<'_>) {
        let Some(id) = parts.groups.lookup(group) else {
            return;
        };
        let conn = &mut self.conns[key];
        let Some(at) = conn.groups.iter().position(|&g| g == id) else {
            return;
        };
        conn.groups.swap_remove(at);
        leave_group(id, key, parts);
    }

    /// Encodes the frame once and queues it to every seed-protocol member of group `id`.
    pub(super) fn deliver_to(&mut self, groups: &Groups, id: GroupId, payload: &[u8]) {
        let mut members = groups.members(id).peekable();
        if members.peek().is_none() {
            return;
        }
        let shared: Rc<[u8]> = Rc::from(frame::text(payload));
        for member in members {
            self.queue_shared(member, shared.clone());
        }
    }

    /// Queues a frame shared with other members to connection `member`, under its output
    /// bound.
    pub(super) fn queue_shared(&mut self, member: usize, shared: Rc<[u8]>) {
        let Some(conn) = self.conns.get_mut(member) else {
            return;
        };
        if !conn.state.is_open() {
            return;
        }
        conn.out.push(Chunk::Shared(shared));
        conn.messages_out += 1;
        self.stats.messages_out += 1;
        let over = conn.out.bytes() > self.limits.send_buffer_limit;
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(member);
        }
        if over {
            self.apply_slow_client_policy(member);
        }
    }
}
