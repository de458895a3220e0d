//! The delivery path of a worker: joining and leaving groups (and the subscriptions that
//! follow), delivering a group message to the local members (one encoded frame shared by all),
//! and the bus that carries messages to and from the other workers: the channel client or the
//! Redis bus.

use std::rc::Rc;

use log::{error, warn};

use super::groups::Joined;
use super::limits;
use super::outqueue::Chunk;
use super::Worker;
use crate::channel::wire;
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
                self.bus_subscribe(group);
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
            self.bus_unsubscribe(&name);
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

    // ---- the channel -----------------------------------------------------------------------

    pub(super) fn channel_ready(&mut self) {
        // What arrived before an error or EOF is still delivered: the broker may have written
        // (and acknowledged) it just before it died.
        let read_error = self.channel.on_ready(&mut self.read_buf).err();
        let input = self.channel.take_input();
        let mut pos = 0;
        let max = self.config.channel_max_frame;
        let failure = loop {
            match wire::decode(&input[pos..], max) {
                Ok(Some((frame, used))) => {
                    pos += used;
                    match frame {
                        wire::Frame::Message { origin, seq, group, payload } => {
                            // A resend after a broker restart must not become a duplicate.
                            if self.channel.dedupe.first_time(origin, seq) {
                                self.deliver_local(group, payload);
                            }
                        }
                        other => {
                            if let Err(why) = self.channel.on_control(&other, self.groups.names()) {
                                break Some(why);
                            }
                        }
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(format!("bad frame from the broker: {e}")),
            }
        };
        match failure.or_else(|| read_error.map(|e| e.to_string())) {
            None => self.channel.restore_input(input, pos),
            Some(why) => {
                error!("channel: {why}");
                self.channel.restore_input(input, 0);
                self.channel.disconnect(self.poll.registry(), &why);
            }
        }
    }

    // ---- the bus: channel or Redis -----------------------------------------------------------

    pub(super) fn bus_subscribe(&mut self, group: &str) {
        match self.redis.as_mut() {
            Some(redis) => redis.subscribe(group),
            None => self.channel.subscribe(group),
        }
    }

    pub(super) fn bus_unsubscribe(&mut self, group: &str) {
        match self.redis.as_mut() {
            Some(redis) => redis.unsubscribe(group),
            None => self.channel.unsubscribe(group),
        }
    }

    pub(super) fn bus_publish(&mut self, group: &str, payload: &[u8]) {
        match self.redis.as_mut() {
            Some(redis) => redis.publish(group, payload),
            None => self.channel.publish(group, payload),
        }
    }

    /// Delivers what the Redis threads received: every message but our own (already delivered
    /// locally) and repeats.
    pub(super) fn redis_ready(&mut self) {
        let Some(redis) = self.redis.as_mut() else { return };
        let own = redis.origin();
        let mut arrived = Vec::new();
        while let Some(item) = redis.next_incoming() {
            arrived.push(item);
        }
        for (_, frame) in arrived {
            match wire::decode(&frame, usize::MAX) {
                Ok(Some((wire::Frame::Message { origin, seq, group, payload }, _))) => {
                    if origin != own && self.channel.dedupe.first_time(origin, seq) {
                        self.deliver_local(group, payload);
                    }
                }
                _ => warn!("ignored a malformed message from Redis"),
            }
        }
    }
}
