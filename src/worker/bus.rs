//! The worker's bus: what carries group messages to and from the other workers and hosts,
//! chosen once at start (`bus = "channel"` or `"redis"`). It owns subscribing, publishing,
//! draining what arrived, duplicate filtering and its counters, so the event loop never asks
//! which bus it runs on.

use std::time::Instant;

use anyhow::Context;
use log::{error, warn};
use mio::{Registry, Token};

use crate::channel::client::{ChannelClient, ClientSettings};
use crate::channel::dedupe::Dedupe;
use crate::channel::redis_bus::{RedisBus, RedisSettings, Timeouts};
use crate::channel::wire;
use crate::config::{BusKind, Config};

/// The bus's event-loop token: the channel socket, or the waker of the Redis threads.
pub const TOKEN: Token = Token(1);

/// The bus's figures for `status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct BusCounters {
    /// Connected to the broker (or to Redis, both connections).
    pub connected: bool,
    /// Publishes dropped because the queue bound was reached.
    pub dropped: u64,
    /// Publishes waiting: unacknowledged by the broker, or not yet sent to Redis.
    pub queued: u64,
    /// Publishes sent again after a reconnect.
    pub resent: u64,
    /// Messages dropped as already delivered (by origin and seq).
    pub duplicates: u64,
}

enum Carrier {
    /// Boxed: the client's buffers make it far larger than the Redis handle.
    Channel(Box<ChannelClient>),
    Redis(RedisBus),
}

pub struct Bus {
    carrier: Carrier,
    /// What arrived already (origin, seq): a resend after a reconnect is not a duplicate.
    dedupe: Dedupe,
    /// Our own publishes, delivered locally already: dropped when the bus echoes them.
    origin: u64,
    /// Largest channel frame accepted from the broker.
    max_frame: usize,
}

impl Bus {
    /// Builds the configured bus and starts connecting; only that bus's settings are read.
    pub fn start(config: &Config, registry: &Registry, index: usize) -> anyhow::Result<Bus> {
        let origin = crate::channel::auth::random_origin(false).context("no random origin id")?;
        let carrier = match config.bus {
            BusKind::Channel => {
                let settings = ClientSettings {
                    addr: config.channel_target().into_owned(),
                    secret: config.channel.secret_file.as_deref().map(crate::channel::auth::load_secret).transpose()?,
                    queue_max_messages: config.channel.queue_max_messages,
                    queue_max_bytes: config.channel.queue_max_bytes,
                    auth_timeout: std::time::Duration::from_millis(config.channel.auth_timeout_ms),
                };
                let mut client = ChannelClient::new(settings, TOKEN, origin, format!("worker-{index}"));
                client.maybe_connect(registry);
                Carrier::Channel(Box::new(client))
            }
            BusKind::Redis => {
                let waker = mio::Waker::new(registry, TOKEN).context("cannot create the Redis waker")?;
                let settings = RedisSettings {
                    url: config.redis.url.clone(),
                    prefix: config.redis.prefix.clone(),
                    queue_max_messages: config.channel.queue_max_messages,
                    queue_max_bytes: config.channel.queue_max_bytes,
                    timeouts: Timeouts::from_millis(config.redis.connect_timeout_ms, config.redis.io_timeout_ms),
                    max_message: config.channel.max_frame,
                };
                Carrier::Redis(RedisBus::start(settings, origin, waker)?)
            }
        };
        Ok(Bus { carrier, dedupe: Dedupe::default(), origin, max_frame: config.channel.max_frame })
    }

    pub fn subscribe(&mut self, group: &str) {
        match &mut self.carrier {
            Carrier::Channel(c) => c.subscribe(group),
            Carrier::Redis(r) => r.subscribe(group),
        }
    }

    pub fn unsubscribe(&mut self, group: &str) {
        match &mut self.carrier {
            Carrier::Channel(c) => c.unsubscribe(group),
            Carrier::Redis(r) => r.unsubscribe(group),
        }
    }

    /// Sends a message to the other workers; this worker delivered it locally already.
    pub fn publish(&mut self, group: &str, payload: &[u8]) {
        match &mut self.carrier {
            Carrier::Channel(c) => c.publish(group, payload),
            Carrier::Redis(r) => r.publish(group, payload),
        }
    }

    /// The bus's token fired: read what arrived and hand every message seen for the first time
    /// to `deliver` (group, payload). `local_groups` are subscribed again after a reconnect.
    pub fn on_ready<'g>(
        &mut self,
        registry: &Registry,
        scratch: &mut [u8],
        local_groups: impl Iterator<Item = &'g str>,
        mut deliver: impl FnMut(&str, &[u8]),
    ) {
        let dedupe = &mut self.dedupe;
        match &mut self.carrier {
            Carrier::Channel(client) => {
                // What arrived before an error or EOF is still delivered: the broker may have
                // written (and acknowledged) it just before it died.
                let read_error = client.on_ready(scratch).err();
                let input = client.take_input();
                let mut pos = 0;
                let mut local_groups = Some(local_groups);
                let failure = loop {
                    match wire::decode(&input[pos..], self.max_frame) {
                        Ok(Some((frame, used))) => {
                            pos += used;
                            match frame {
                                wire::Frame::Message { origin, seq, group, payload } => {
                                    if let Err(why) = client.accept_message() {
                                        break Some(why);
                                    }
                                    if dedupe.first_time(origin, seq) {
                                        deliver(group, payload);
                                    }
                                }
                                other => {
                                    let groups = local_groups.take().into_iter().flatten();
                                    if let Err(why) = client.on_control(&other, groups) {
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
                    None => client.restore_input(input, pos),
                    Some(why) => {
                        error!("channel: {why}");
                        client.restore_input(input, 0);
                        client.disconnect(registry, &why);
                    }
                }
            }
            Carrier::Redis(redis) => {
                for (_, frame) in redis.take_incoming() {
                    match wire::decode(&frame, usize::MAX) {
                        Ok(Some((wire::Frame::Message { origin, seq, group, payload }, _))) => {
                            if origin != self.origin && dedupe.first_time(origin, seq) {
                                deliver(group, payload);
                            }
                        }
                        _ => warn!("ignored a malformed message from Redis"),
                    }
                }
            }
        }
    }

    /// End of a loop turn: write what is queued, reconnect when due.
    pub fn end_of_turn(&mut self, registry: &Registry) {
        if let Carrier::Channel(client) = &mut self.carrier {
            if let Err(e) = client.flush() {
                client.disconnect(registry, &e.to_string());
            }
            client.maybe_connect(registry);
        }
    }

    /// When the loop must wake up for the bus (a reconnect attempt, a handshake deadline).
    pub fn next_wake(&self) -> Option<Instant> {
        match &self.carrier {
            Carrier::Channel(client) => client.next_wake(),
            Carrier::Redis(_) => None,
        }
    }

    pub fn counters(&self) -> BusCounters {
        let duplicates = self.dedupe.duplicates;
        match &self.carrier {
            Carrier::Channel(c) => BusCounters {
                connected: c.is_connected(),
                dropped: c.dropped,
                queued: c.queued() as u64,
                resent: c.resent,
                duplicates,
            },
            Carrier::Redis(r) => BusCounters {
                connected: r.is_connected(),
                dropped: r.dropped(),
                queued: r.queued(),
                resent: 0,
                duplicates,
            },
        }
    }
}
