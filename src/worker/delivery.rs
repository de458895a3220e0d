//! The delivery path of a worker, on the clients side: joining and leaving groups (and the bus
//! subscriptions that follow), and delivering a group message to the local members: the frame
//! is encoded once and the same bytes (`Rc<[u8]>`) queued to every member, each flushed once
//! at the end of the loop turn.

use std::rc::Rc;

use super::clients::{Clients, Parts};
use log::warn;

use super::groups::{GroupId, Groups, Joined};
use super::outqueue::Chunk;
use crate::protocol::RequestError;
use crate::ws::frame;

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
        if let Some(name) = parts.groups.leave(id, key) {
            parts.bus.unsubscribe(&name);
        }
    }

    /// Delivers a message the bus brought: it goes out as a text frame, so it must be UTF-8
    /// (a client sending text frames could only produce UTF-8; another publisher on the
    /// channel or in Redis could send anything). Checked once per message, before encoding.
    pub fn deliver_from_bus(&mut self, groups: &Groups, group: &str, payload: &[u8]) {
        let Some(id) = groups.lookup(group) else {
            return;
        };
        if std::str::from_utf8(payload).is_err() {
            self.stats.bus_invalid_utf8 += 1;
            if self.stats.bus_invalid_utf8.is_power_of_two() {
                warn!(
                    "dropped a message for group {group:?} from the bus: not UTF-8 ({} so far)",
                    self.stats.bus_invalid_utf8
                );
            }
            return;
        }
        self.deliver_to(groups, id, payload);
    }

    /// Encodes the frame once and queues the same bytes to every local member of `group`.
    pub fn deliver(&mut self, groups: &Groups, group: &str, payload: &[u8]) {
        if let Some(id) = groups.lookup(group) {
            self.deliver_to(groups, id, payload);
        }
    }

    fn deliver_to(&mut self, groups: &Groups, id: GroupId, payload: &[u8]) {
        let shared: Rc<[u8]> = Rc::from(frame::text(payload));
        let limit = self.limits.send_buffer_limit;
        for member in groups.members(id) {
            let Some(conn) = self.conns.get_mut(member) else {
                continue;
            };
            if !conn.state.is_open() {
                continue;
            }
            conn.out.push(Chunk::Shared(shared.clone()));
            conn.messages_out += 1;
            self.stats.messages_out += 1;
            let over = conn.out.bytes() > limit;
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(member);
            }
            if over {
                self.apply_slow_client_policy(member);
            }
        }
    }
}
