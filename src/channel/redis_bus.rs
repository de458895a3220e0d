//! The Redis bus (`bus = "redis"`): for deployments that outgrow one broker, workers exchange
//! group messages through Redis pub/sub instead of the channel server. Each group is one Redis
//! channel, `[redis] prefix` + group id, and a worker subscribes only while it has local
//! members, so Redis sends a message only to instances that need it.
//!
//! The payload is the channel protocol's MESSAGE frame (origin, seq, group, text), so receivers
//! skip their own publishes (already delivered locally) and drop repeats exactly as with the
//! channel server.
//!
//! Redis connections block, so each worker runs two small threads (a worker never forks, so
//! threads are safe there): `redis_sub` owns the subscription connection; the publisher thread
//! here owns the publishing connection. The worker's event loop never waits for either: it
//! only takes short locks on the state they share, all of it bounded, so a hung Redis costs
//! the worker nothing but dropped messages:
//! - publishes wait in a queue of at most `channel.queue_max_messages` / `queue_max_bytes`
//!   (the one being sent counts); beyond that the oldest is dropped, counted (`channel_dropped`)
//!   and logged;
//! - messages from Redis wait for the worker in a queue with the same bounds and policy;
//! - subscriptions are a set of wanted groups (one entry per local group), not a queue of
//!   commands; the subscriber makes Redis match it.
//!
//! Connects time out after `redis.connect_timeout_ms`, reads and writes after
//! `redis.io_timeout_ms`; every failure reconnects with back-off (50 ms doubling to 2 s).
//!
//! Guarantees during outages (docs/cluster.md): publishes made while Redis is down wait in the
//! bounded queue and are sent when it is back; Redis pub/sub keeps nothing for a subscriber that
//! is disconnected, so members on an instance whose subscription connection is down miss what is
//! published meanwhile (at most once). Local members always get local messages.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use log::{info, warn};

use super::publisher::Publisher;
use super::redis_sub::Subscriber;
use super::wire;

pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(50);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Settings from the config.
#[derive(Clone)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    pub queue_max_messages: usize,
    pub queue_max_bytes: usize,
    pub timeouts: Timeouts,
    /// Largest message accepted from Redis (`channel.max_frame`).
    pub max_message: usize,
}

/// How long a Redis connection may take.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// To connect (`redis.connect_timeout_ms`).
    pub connect: Duration,
    /// For one read or write, and for an answer to PING (`redis.io_timeout_ms`).
    pub io: Duration,
}

impl Timeouts {
    /// From the configured milliseconds; kept within 1 ms .. 1 day so that no value can
    /// disable a timeout or overflow clock arithmetic.
    pub fn from_millis(connect_ms: u64, io_ms: u64) -> Timeouts {
        let clamp = |ms: u64| Duration::from_millis(ms.clamp(1, 86_400_000));
        Timeouts { connect: clamp(connect_ms), io: clamp(io_ms) }
    }
}

/// A publish on its way to Redis: the Redis channel (prefix + group), the MESSAGE frame.
struct Outgoing {
    channel: String,
    frame: Vec<u8>,
}

/// A FIFO bounded in count and bytes that drops its oldest entries beyond the bounds.
struct Bounded<T> {
    items: VecDeque<(T, usize)>,
    bytes: usize,
    /// Entries taken out but not finished (the publish being sent): they count against the bounds.
    taken: usize,
    taken_bytes: usize,
    max_items: usize,
    max_bytes: usize,
}

impl<T> Bounded<T> {
    fn new(max_items: usize, max_bytes: usize) -> Bounded<T> {
        Bounded { items: VecDeque::new(), bytes: 0, taken: 0, taken_bytes: 0, max_items, max_bytes }
    }

    fn len(&self) -> usize {
        self.items.len() + self.taken
    }

    /// Appends `item`; returns how many entries were dropped (oldest first) to stay in bounds.
    fn push(&mut self, item: T, size: usize) -> u64 {
        self.items.push_back((item, size));
        self.bytes += size;
        let mut dropped = 0;
        while self.len() > self.max_items || self.bytes + self.taken_bytes > self.max_bytes {
            let Some((_, old)) = self.items.pop_front() else { break };
            self.bytes -= old;
            dropped += 1;
        }
        dropped
    }

    /// Takes the oldest entry out; it counts until `finish` or `put_back`.
    fn take(&mut self) -> Option<(T, usize)> {
        let (item, size) = self.items.pop_front()?;
        self.bytes -= size;
        self.taken += 1;
        self.taken_bytes += size;
        Some((item, size))
    }

    fn finish(&mut self, size: usize) {
        self.taken -= 1;
        self.taken_bytes -= size;
    }

    /// Returns a taken entry to the front (its send failed); the bounds still hold.
    fn put_back(&mut self, item: T, size: usize) {
        self.finish(size);
        self.items.push_front((item, size));
        self.bytes += size;
    }

    fn drain(&mut self) -> VecDeque<(T, usize)> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }
}

/// The groups the worker has members in; `changed` tells the subscriber to look again.
#[derive(Default)]
pub(super) struct Wanted {
    pub groups: HashSet<String>,
    pub changed: bool,
}

/// State shared by the worker and its two Redis threads.
pub(super) struct Shared {
    pub subscribed: AtomicBool,
    publisher_up: AtomicBool,
    /// Messages dropped at either queue's bound.
    dropped: AtomicU64,
    /// The worker dropped the bus: the threads end.
    pub closed: AtomicBool,
    pub wanted: Mutex<Wanted>,
    outgoing: Mutex<Bounded<Outgoing>>,
    /// Signalled when a publish is queued (or the bus closes); the publisher waits on it.
    outgoing_ready: Condvar,
    incoming: Mutex<Bounded<(String, Vec<u8>)>>,
}

/// Locks even if another thread panicked while holding the lock: the queues stay usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn count_dropped(&self, n: u64, queue: &str) {
        if n == 0 {
            return;
        }
        let before = self.dropped.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        // Logged at powers of two: a long outage does not flood the log.
        if (before + 1..=after).any(u64::is_power_of_two) {
            warn!("redis {queue} queue full: dropped the oldest; {after} dropped so far");
        }
    }

    /// Queues a message from Redis for the worker (subscriber thread).
    pub fn push_incoming(&self, group: String, payload: Vec<u8>) {
        let size = group.len() + payload.len();
        let dropped = lock(&self.incoming).push((group, payload), size);
        self.count_dropped(dropped, "incoming");
    }
}

/// What the Redis bus hands the worker, oldest first (owned: it crosses threads). Contract of
/// protocol 2 (docs/protocol.md): a group's `Message`s come in offset order; `request_history`
/// is answered by `HistoryItem`s then one `Position`, or superseded by a later `LinkUp`.
#[derive(Debug)]
pub enum Incoming {
    /// A group message (our own publishes included, numbered: seed members have those).
    Message {
        origin: u64,
        seq: u64,
        /// The group offset; 0 when the message was not numbered.
        offset: u64,
        kind: wire::PayloadKind,
        group: String,
        payload: Vec<u8>,
    },
    /// Our publish `seq` got `offset` (0: unknown).
    Stamped { seq: u64, offset: u64 },
    HistoryItem { request: u64, offset: u64, kind: wire::PayloadKind, payload: Vec<u8> },
    Position { request: u64, epoch: String, offset: u64, recovered: bool },
    /// A Redis connection came back: messages and history answers may have been lost.
    LinkUp,
}

pub struct RedisBus {
    /// Stub answers until Redis Streams back the history (replaced by the Redis part).
    local: VecDeque<Incoming>,
    publisher: Publisher,
    prefix: String,
    shared: Arc<Shared>,
    /// Wakes the subscriber thread when the wanted groups change (non-blocking).
    wake_subscriber: UnixStream,
}

impl RedisBus {
    /// Starts the two threads; `waker` wakes the worker's loop when messages arrive.
    pub fn start(settings: RedisSettings, origin: u64, waker: mio::Waker) -> anyhow::Result<RedisBus> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| anyhow::anyhow!("invalid value for `redis.url` {:?}: {e}", settings.url))?;
        let (max_items, max_bytes) = (settings.queue_max_messages, settings.queue_max_bytes);
        let shared = Arc::new(Shared {
            subscribed: AtomicBool::new(false),
            publisher_up: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            wanted: Mutex::new(Wanted::default()),
            outgoing: Mutex::new(Bounded::new(max_items, max_bytes)),
            outgoing_ready: Condvar::new(),
            incoming: Mutex::new(Bounded::new(max_items, max_bytes)),
        });
        let (wake_subscriber, wake) = UnixStream::pair().context("cannot create the Redis wake-up socket")?;
        wake_subscriber.set_nonblocking(true)?;
        wake.set_nonblocking(true)?;
        let subscriber = Subscriber {
            info: client.get_connection_info().clone(),
            prefix: settings.prefix.clone(),
            timeouts: settings.timeouts,
            max_message: settings.max_message,
            shared: shared.clone(),
            wake,
            waker,
        };
        thread::Builder::new().name("redis-sub".into()).spawn(move || subscriber.run())?;
        let s2 = shared.clone();
        let timeouts = settings.timeouts;
        thread::Builder::new().name("redis-pub".into()).spawn(move || publisher(client, timeouts, &s2))?;
        Ok(RedisBus { local: VecDeque::new(), publisher: Publisher::new(origin), prefix: settings.prefix, shared, wake_subscriber })
    }

    pub fn subscribe(&mut self, group: &str) {
        let mut wanted = lock(&self.shared.wanted);
        wanted.changed |= wanted.groups.insert(group.to_owned());
        drop(wanted);
        self.poke_subscriber();
    }

    pub fn unsubscribe(&mut self, group: &str) {
        let mut wanted = lock(&self.shared.wanted);
        wanted.changed |= wanted.groups.remove(group);
        drop(wanted);
        self.poke_subscriber();
    }

    fn poke_subscriber(&self) {
        // A full socket already holds a wake-up: WouldBlock is fine.
        let _ = (&self.wake_subscriber).write(&[1]);
    }

    /// Queues a publish for the publisher thread; never waits for Redis.
    pub fn publish(&mut self, group: &str, kind: wire::PayloadKind, payload: &[u8]) -> u64 {
        let _ = kind;
        let (seq, frame) = self.publisher.frame(group, payload);
        let size = frame.len();
        let out = Outgoing { channel: format!("{}{group}", self.prefix), frame };
        let dropped = lock(&self.shared.outgoing).push(out, size);
        self.shared.outgoing_ready.notify_one();
        self.shared.count_dropped(dropped, "publish");
        seq
    }

    /// Asks for `group`'s position and the messages after `since`.
    pub fn request_history(&mut self, request: u64, group: &str, since: Option<wire::Since<'_>>, limit: u32) {
        let _ = (group, since, limit);
        self.local.push_back(Incoming::Position { request, epoch: String::new(), offset: 0, recovered: false });
    }

    /// Everything that arrived, oldest first.
    pub fn take_incoming(&mut self) -> Vec<Incoming> {
        let mut out: Vec<Incoming> = self.local.drain(..).collect();
        for ((_, frame), _) in lock(&self.shared.incoming).drain() {
            if let Ok(Some((wire::Frame::Message { origin, seq, group, payload }, _))) = wire::decode(&frame, usize::MAX) {
                out.push(Incoming::Message {
                    origin,
                    seq,
                    offset: 0,
                    kind: wire::PayloadKind::Text,
                    group: group.to_owned(),
                    payload: payload.to_vec(),
                });
            }
        }
        out
    }

    pub fn origin(&self) -> u64 {
        self.publisher.origin()
    }

    pub fn is_connected(&self) -> bool {
        self.shared.subscribed.load(Ordering::Relaxed) && self.shared.publisher_up.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Publishes not yet sent to Redis, the one being sent included.
    pub fn queued(&self) -> u64 {
        lock(&self.shared.outgoing).len() as u64
    }
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        self.shared.outgoing_ready.notify_all();
        self.poke_subscriber();
    }
}

/// Owns the publishing connection: sends queued publishes one at a time, oldest first.
fn publisher(client: redis::Client, timeouts: Timeouts, shared: &Shared) {
    let mut con: Option<redis::Connection> = None;
    let mut backoff = MIN_BACKOFF;
    let mut failed_before = false;
    let connect = || -> redis::RedisResult<redis::Connection> {
        let c = client.get_connection_with_timeout(timeouts.connect)?;
        c.set_read_timeout(Some(timeouts.io))?;
        c.set_write_timeout(Some(timeouts.io))?;
        Ok(c)
    };
    while !shared.closed.load(Ordering::Relaxed) {
        // Connect at once (not at the first publish), so `status` shows the bus up early.
        let Some(c) = con.as_mut() else {
            match connect() {
                Ok(c) => {
                    if failed_before {
                        info!("redis publisher connected again; {} publishes queued", lock(&shared.outgoing).len());
                    }
                    con = Some(c);
                    shared.publisher_up.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    shared.publisher_up.store(false, Ordering::Relaxed);
                    warn!("redis publisher cannot connect: {e}; retrying in {backoff:?}");
                    failed_before = true;
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        };
        let (out, size) = {
            let mut queue = lock(&shared.outgoing);
            loop {
                if shared.closed.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(next) = queue.take() {
                    break next;
                }
                queue = shared.outgoing_ready.wait(queue).unwrap_or_else(|p| p.into_inner());
            }
        };
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH").arg(&out.channel).arg(&out.frame[..]).query(c);
        match sent {
            Ok(_) => {
                lock(&shared.outgoing).finish(size);
                backoff = MIN_BACKOFF;
            }
            Err(e) => {
                lock(&shared.outgoing).put_back(out, size);
                con = None;
                shared.publisher_up.store(false, Ordering::Relaxed);
                warn!("redis publish failed: {e}; reconnecting in {backoff:?}");
                failed_before = true;
                thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Bounded;

    #[test]
    fn bounded_drops_oldest_and_counts_what_is_being_sent() {
        let mut q = Bounded::new(3, 100);
        assert_eq!((0..3).map(|i| q.push(i, 10)).sum::<u64>(), 0);
        let (first, size) = q.take().unwrap();
        assert_eq!(first, 0);
        assert_eq!(q.push(3, 10), 1, "the one being sent still counts: the oldest queued goes");
        q.put_back(first, size);
        assert_eq!(q.items.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 2, 3]);
        assert_eq!(q.push(4, 90), 2, "the byte bound drops as many as it takes");
        assert_eq!((q.len(), q.bytes), (2, 100));
    }
}
