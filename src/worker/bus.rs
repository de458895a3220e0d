//! The worker's bus: what carries group messages to and from the other workers and hosts,
//! chosen once at start (`bus = "channel"` or `"redis"`). It owns subscribing, publishing,
//! history requests, draining what arrived, duplicate filtering and its counters, so the
//! event loop never asks which bus it runs on.
//!
//! Both buses number every group message in one place (the broker, or a Lua script in Redis)
//! and hand the worker `BusEvent`s: a group's messages in offset order, the offset each of our
//! publishes got, and the answers to history requests (docs/protocol.md, "Protocol 2").

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use anyhow::Context;
use log::{debug, error};
use mio::{Registry, Token};

use crate::channel::client::{ChannelClient, ClientSettings};
use crate::channel::dedupe::Dedupe;
use crate::channel::redis_bus::{Incoming, RedisBus, RedisSettings, Timeouts};
use crate::channel::wire::{self, PayloadKind, Since};
use crate::config::{BusKind, Config};

/// The bus's event-loop token: the channel socket, or the waker of the Redis threads.
pub const TOKEN: Token = Token(1);

/// Bytes a PUBLICATION may carry beyond `channel.max_frame`: the offset and kind the broker
/// adds to a publish that was just within the bound.
const PUBLICATION_SLACK: usize = 64;

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

/// What the bus hands the worker.
#[derive(Debug, PartialEq)]
pub enum BusEvent<'a> {
    /// A group message. `offset` is its place in the group (0: not numbered). `own`: one of
    /// our publishes coming back numbered; the seed members had it at once, only protocol-2
    /// members are owed it now.
    Message { group: &'a str, offset: u64, kind: PayloadKind, payload: &'a [u8], own: bool },
    /// Our publish `seq` got `offset` (0: unknown).
    Stamped { seq: u64, offset: u64 },
    /// A kept message answering history request `request`, oldest first.
    HistoryItem { request: u64, offset: u64, kind: PayloadKind, payload: &'a [u8] },
    /// The end of the answer to `request`: the group's epoch and last offset.
    Position { request: u64, epoch: &'a str, offset: u64, recovered: bool },
    /// The link (re)connected: history requests not answered yet are lost, and messages may
    /// have been missed meanwhile.
    LinkUp,
}

/// One of our publishes whose offset protocol-2 members here wait for (channel bus: the
/// broker does not echo our publishes, it stamps them).
struct AwaitingStamp {
    seq: u64,
    group: Rc<str>,
    kind: PayloadKind,
    payload: Rc<[u8]>,
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
    /// Our own publishes, delivered locally already: the seed members do not get them again.
    origin: u64,
    /// Largest channel frame accepted from the broker.
    max_frame: usize,
    /// Channel bus: our publishes kept until their STAMP, oldest first, bounded like the
    /// publish queue (`channel.queue_max_messages` and `queue_max_bytes`): while the broker
    /// is away nothing stamps them.
    awaiting: Awaiting,
    /// The seq of our last publish, and of the last one the bus numbered (its `Stamped`):
    /// publishes in between may not be numbered yet (a hand-off waits for them, see
    /// `publishes_in_flight`).
    last_published: u64,
    last_stamped: u64,
}

/// Our publishes waiting for their STAMP, with their payload bytes.
struct Awaiting {
    queue: VecDeque<AwaitingStamp>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl Awaiting {
    fn push(&mut self, mine: AwaitingStamp) {
        self.bytes += mine.payload.len();
        self.queue.push_back(mine);
        while self.queue.len() > self.max_messages || self.bytes > self.max_bytes {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) -> Option<AwaitingStamp> {
        let mine = self.queue.pop_front()?;
        self.bytes -= mine.payload.len();
        Some(mine)
    }

    fn front_seq(&self) -> Option<u64> {
        self.queue.front().map(|a| a.seq)
    }
}

impl Bus {
    /// Builds the configured bus and starts connecting; only that bus's settings are read.
    pub fn start(config: &Config, registry: &Registry, index: usize) -> anyhow::Result<Bus> {
        Bus::start_as(config, registry, format!("worker-{index}"))
    }

    /// `start` for a process that only publishes (the api process), named `name` to the broker.
    pub fn start_as(config: &Config, registry: &Registry, name: String) -> anyhow::Result<Bus> {
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
                let mut client = ChannelClient::new(settings, TOKEN, origin, name);
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
                    history: config.history.clone(),
                };
                Carrier::Redis(RedisBus::start(settings, origin, waker)?)
            }
        };
        Ok(Bus {
            carrier,
            dedupe: Dedupe::default(),
            origin,
            // A PUBLICATION is a few bytes longer than the publish it numbers (offset, kind).
            max_frame: config.channel.max_frame + PUBLICATION_SLACK,
            awaiting: Awaiting {
                queue: VecDeque::new(),
                bytes: 0,
                max_messages: config.channel.queue_max_messages,
                max_bytes: config.channel.queue_max_bytes,
            },
            last_published: 0,
            last_stamped: 0,
        })
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

    /// Sends a message to the other workers (this worker delivered it to its seed members
    /// already); returns its sequence number, which the `Stamped` event for it carries.
    /// `numbered_here`: protocol-2 members here wait for it with its offset.
    pub fn publish(&mut self, group: &str, kind: PayloadKind, payload: &[u8], numbered_here: bool) -> u64 {
        let seq = self.publish_on_carrier(group, kind, payload, numbered_here);
        self.last_published = seq;
        seq
    }

    /// Whether some of our publishes may not have their offset yet, so a hand-off's cut must
    /// wait (on Redis the history is read on another connection than the one that publishes,
    /// so only their numbering orders them).
    pub fn publishes_in_flight(&self) -> bool {
        match &self.carrier {
            // One connection carries our publishes and the position request after them, and
            // the broker answers in order: nothing to wait for.
            Carrier::Channel(_) => false,
            Carrier::Redis(r) => self.last_stamped < self.last_published && r.is_connected(),
        }
    }

    fn publish_on_carrier(&mut self, group: &str, kind: PayloadKind, payload: &[u8], numbered_here: bool) -> u64 {
        match &mut self.carrier {
            Carrier::Channel(c) => {
                let seq = c.publish(group, kind, payload);
                if numbered_here {
                    self.awaiting.push(AwaitingStamp { seq, group: group.into(), kind, payload: payload.into() });
                }
                seq
            }
            // Redis echoes our publishes to our own subscription, numbered.
            Carrier::Redis(r) => r.publish(group, kind, payload),
        }
    }

    /// Asks for `group`'s position (and the messages after `since`); answered by
    /// `HistoryItem`s and a `Position` with the same `request`, or lost at a `LinkUp`.
    pub fn request_history(&mut self, request: u64, group: &str, since: Option<Since<'_>>, limit: u32) {
        match &mut self.carrier {
            Carrier::Channel(c) => c.request_history(request, group, since, limit),
            Carrier::Redis(r) => r.request_history(request, group, since, limit),
        }
    }

    /// After a `LinkUp`: subscribe again to every group with local members.
    pub fn resubscribe<'g>(&mut self, groups: impl Iterator<Item = &'g str>) {
        match &mut self.carrier {
            Carrier::Channel(c) => c.resubscribe(groups),
            // The subscriber thread keeps Redis in step with the wanted groups itself.
            Carrier::Redis(_) => {}
        }
    }

    /// The bus's token fired: read what arrived and hand every event to `handle`, messages
    /// seen for the first time only. After a `LinkUp` the caller calls `resubscribe`.
    pub fn on_ready(&mut self, registry: &Registry, scratch: &mut [u8], mut handle: impl FnMut(BusEvent<'_>)) {
        let dedupe = &mut self.dedupe;
        let awaiting = &mut self.awaiting;
        let last_stamped = &mut self.last_stamped;
        let mut handle = |event: BusEvent<'_>| {
            if let BusEvent::Stamped { seq, .. } = event {
                *last_stamped = (*last_stamped).max(seq);
            }
            handle(event)
        };
        match &mut self.carrier {
            Carrier::Channel(client) => {
                // What arrived before an error or EOF is still delivered: the broker may have
                // written (and acknowledged) it just before it died.
                let read_error = client.on_ready(scratch).err();
                let input = client.take_input();
                let mut pos = 0;
                let failure = loop {
                    let frame = match wire::decode(&input[pos..], self.max_frame) {
                        Ok(Some((frame, used))) => {
                            pos += used;
                            frame
                        }
                        Ok(None) => break None,
                        Err(e) => break Some(format!("bad frame from the broker: {e}")),
                    };
                    let from_broker = matches!(
                        frame,
                        wire::Frame::Message { .. }
                            | wire::Frame::Publication { .. }
                            | wire::Frame::Stamp { .. }
                            | wire::Frame::HistoryItem { .. }
                            | wire::Frame::Position { .. }
                    );
                    if from_broker {
                        if let Err(why) = client.accept_message() {
                            break Some(why);
                        }
                    }
                    match frame {
                        wire::Frame::Message { origin, seq, group, payload } => {
                            if dedupe.first_time(origin, seq) {
                                let kind = PayloadKind::Text;
                                handle(BusEvent::Message { group, offset: 0, kind, payload, own: false });
                            }
                        }
                        wire::Frame::Publication { origin, seq, offset, kind, group, payload } => {
                            if dedupe.first_time(origin, seq) {
                                handle(BusEvent::Message { group, offset, kind, payload, own: false });
                            }
                        }
                        wire::Frame::Stamp { seq, offset } => {
                            stamped(awaiting, seq, offset, &mut handle);
                        }
                        wire::Frame::HistoryItem { request, offset, kind, payload } => {
                            handle(BusEvent::HistoryItem { request, offset, kind, payload });
                        }
                        wire::Frame::Position { request, epoch, offset, recovered } => {
                            handle(BusEvent::Position { request, epoch, offset, recovered });
                        }
                        other => {
                            if let Err(why) = client.on_control(&other) {
                                break Some(why);
                            }
                            if client.take_link_up() {
                                handle(BusEvent::LinkUp);
                            }
                        }
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
                for event in redis.take_incoming() {
                    match event {
                        Incoming::Message { origin, seq, offset, kind, group, payload } => {
                            let own = origin == self.origin;
                            // Our own come back only to be numbered: no repeat filtering needed.
                            if own || dedupe.first_time(origin, seq) {
                                handle(BusEvent::Message { group: &group, offset, kind, payload: &payload, own });
                            }
                        }
                        Incoming::Stamped { seq, offset } => handle(BusEvent::Stamped { seq, offset }),
                        Incoming::HistoryItem { request, offset, kind, payload } => {
                            handle(BusEvent::HistoryItem { request, offset, kind, payload: &payload })
                        }
                        Incoming::Position { request, epoch, offset, recovered } => {
                            handle(BusEvent::Position { request, epoch: &epoch, offset, recovered })
                        }
                        Incoming::LinkUp => handle(BusEvent::LinkUp),
                    }
                }
            }
        }
    }

    /// Whether reading the bus between slices of a long flush can find anything: the channel
    /// client reads its socket (one syscall); the Redis subscriber runs on its own thread
    /// and wakes the loop itself.
    pub fn reads_mid_flush(&self) -> bool {
        matches!(&self.carrier, Carrier::Channel(c) if c.is_connected())
    }

    /// End of a loop turn: write what is queued, reconnect when due.
    pub fn end_of_turn(&mut self, registry: &Registry) {
        if let Carrier::Channel(client) = &mut self.carrier {
            if let Err(e) = client.flush(registry) {
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

/// The broker numbered our publish `seq`: say so, and hand it to the protocol-2 members here
/// when they wait for it. Stamps come in publish order, so what is older than `seq` in the
/// queue will get none (dropped by the broker's bound, or published before a broker restart).
fn stamped(awaiting: &mut Awaiting, seq: u64, offset: u64, handle: &mut impl FnMut(BusEvent<'_>)) {
    handle(BusEvent::Stamped { seq, offset });
    while awaiting.front_seq().is_some_and(|s| s < seq) {
        awaiting.pop_front();
    }
    if awaiting.front_seq() == Some(seq) {
        if let Some(mine) = awaiting.pop_front() {
            if offset == 0 {
                // Numbered by the broker before a reconnect, or by one that died since
                // (REPUBLISH): its offset is unknown here. Local protocol-2 members get it
                // from the catch-up that follows the reconnect, or are told of the gap.
                debug!("our publish {seq} was numbered before a reconnect; its offset is unknown");
                return;
            }
            let AwaitingStamp { group, kind, payload, .. } = mine;
            handle(BusEvent::Message { group: &group, offset, kind, payload: &payload, own: true });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mine(seq: u64, len: usize) -> AwaitingStamp {
        AwaitingStamp { seq, group: "g".into(), kind: PayloadKind::Text, payload: vec![b'x'; len].into() }
    }

    #[test]
    fn publishes_waiting_for_their_stamp_are_bounded_in_bytes_too() {
        let mut a = Awaiting { queue: VecDeque::new(), bytes: 0, max_messages: 100, max_bytes: 1000 };
        for seq in 1..=5 {
            a.push(mine(seq, 300));
        }
        assert_eq!((a.queue.len(), a.bytes, a.front_seq()), (3, 900, Some(3)));
        let mut events = Vec::new();
        stamped(&mut a, 4, 40, &mut |e: BusEvent<'_>| events.push(format!("{e:?}")));
        assert_eq!(events.len(), 2, "the stamp, then our message numbered: {events:?}");
        assert_eq!((a.queue.len(), a.bytes, a.front_seq()), (1, 300, Some(5)));
    }
}
