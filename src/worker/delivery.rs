//! The delivery path of a worker: joining and leaving groups (and the subscriptions that
//! follow), delivering a group message to the local members (one encoded frame shared by all),
//! and the bus that carries messages to and from the other workers: the channel client or the
//! Redis bus.

use std::rc::Rc;


use super::groups::Joined;
use super::limits;
use super::outqueue::Chunk;
use super::Worker;
use crate::protocol::RequestError;
use crate::ws::frame;

impl Worker {
    // ---- groups ----------------------------------------------------------------------------

    pub(super) fn join(&mut self, key: usize, group: &str) -> Result<(), RequestError> {
        let limit = self.config.limits.max_groups_per_connection;
        let conn = &mut self.conns[key];
        if conn.groups.len() >= limit && self.groups.lookup(group).is_none_or(|id| !conn.groups.contains(&id)) {
            self.stats.too_many_groups += 1;
            return Err(RequestError::TooManyGroups(limit));
        }
        if let Joined::New { id, first } = self.groups.join(group, key) {
            conn.groups.push(id);
            if first {
                self.bus.subscribe(group);
            }
        }
        Ok(())
    }

    pub(super) fn leave(&mut self, key: usize, group: &str) {
        let Some(id) = self.groups.lookup(group) else {
            return;
        };
        let conn = &mut self.conns[key];
        let Some(at) = conn.groups.iter().position(|&g| g == id) else {
            return;
        };
        conn.groups.swap_remove(at);
        if let Some(name) = self.groups.leave(id, key) {
            self.bus.unsubscribe(&name);
        }
    }

    /// Encodes the frame once and queues the same bytes to every local member.
    pub(super) fn deliver_local(&mut self, group: &str, payload: &[u8]) {
        let Some(id) = self.groups.lookup(group) else {
            return;
        };
        let shared: Rc<[u8]> = Rc::from(frame::text(payload));
        let limit = self.config.limits.send_buffer_limit;
        let policy = self.config.limits.slow_client;
        for member in self.groups.members(id) {
            let Some(conn) = self.conns.get_mut(member) else {
                continue;
            };
            if !conn.state.is_open() {
                continue;
            }
            conn.out.push(Chunk::Shared(shared.clone()));
            conn.messages_out += 1;
            self.stats.messages_out += 1;
            if conn.out.bytes() > limit {
                limits::apply_slow_client_policy(conn, member, policy, limit, &mut self.stats, &mut self.timers);
            }
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(member);
            }
        }
    }

    // ---- the bus ---------------------------------------------------------------------------

    /// Delivers to local members what the bus brought (new messages from other workers only).
    pub(super) fn bus_ready(&mut self) {
        let mut deliveries = Vec::new();
        self.bus.on_ready(self.poll.registry(), &mut self.read_buf, self.groups.names(), |group, payload| {
            deliveries.push((group.to_owned(), payload.to_vec()));
        });
        for (group, payload) in deliveries {
            self.deliver_local(&group, &payload);
        }
    }
}
