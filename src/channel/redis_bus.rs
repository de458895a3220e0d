//! The Redis bus (`bus = "redis"`): for deployments that outgrow one broker, workers exchange
//! group messages through Redis instead of the channel server. Each group is one Redis pub/sub
//! channel, `[redis] prefix` + group id, and a worker subscribes only while it has local
//! members, so Redis sends a message only to instances that need it.
//!
//! Protocol 2 (docs/protocol.md, docs/cluster.md): every publish runs a Lua script
//! (`redis_history`) that numbers the message in its group (epoch + offset, kept in Redis),
//! keeps it in the group's stream (the history) and PUBLISHes it as the channel wire's
//! PUBLICATION frame (origin, seq, offset, kind, group, payload). The contract with the worker
//! (`worker/bus.rs`), in the order of `take_incoming`:
//! 1. offsets are assigned in one place per group (the script, atomic in Redis), so every
//!    instance sees a group's messages in one order; each of our publishes is answered by
//!    `Stamped { seq, offset }`, in publish order (offset 0: unknown, e.g. a resend);
//! 2. our own publishes come back through our own subscription, numbered, as `Message`s like
//!    any other; a group's messages come in offset order (one subscription connection, one
//!    atomic script per publish);
//! 3. `request_history` is answered by `HistoryItem`s (only when recoverable: same epoch,
//!    every message after `since` still in the stream, at most min(limit, history.max_recover)
//!    of them and at most `channel.queue_max_bytes` of payload) then one `Position` with the
//!    group's epoch and last offset (the position is created when the group has none, so a
//!    join fixes the epoch). The history is read only once the subscription to the group is
//!    active (a PING on the subscription connection answered after the SUBSCRIBE), and the
//!    answer is handed over only after a second PING answered on that connection, so every
//!    message up to the answer's offset comes before the `Position`, and every later one
//!    comes live (possibly before the `Position`: the worker buffers);
//! 4. `LinkUp` whenever a Redis connection (subscriber or command) is (re)established: history
//!    requests asked before are lost (asked again by the worker), and messages may have been
//!    missed (the worker catches up every group from its last offset; after a Redis restart
//!    without persistence the epoch is new and the members get a gap notice).
//! 5. Bounds: publishes wait in a queue of at most `channel.queue_max_messages` /
//!    `queue_max_bytes` (the one being sent counts), beyond which the oldest is dropped,
//!    counted (`channel_dropped`) and logged; messages from Redis wait for the worker in a
//!    queue with the same bounds, beyond which the oldest *message* is dropped (the worker sees
//!    the hole and catches up from history; answers and stamps are never dropped: they are
//!    bounded by the requests in flight and the publish queue); at most
//!    `channel.queue_max_messages` history requests are in flight, a request beyond that is
//!    dropped and logged (its join waits for the next reconnect).
//!
//! Redis connections block, so each worker runs two small threads (a worker never forks, so
//! threads are safe there): `redis_sub` owns the subscription connection; the command thread
//! here owns the command connection (scripts). The worker's event loop never waits for either:
//! it only takes short locks on the state they share. Subscriptions are a set of wanted groups
//! (one entry per local group), not a queue of commands; the subscriber makes Redis match it.
//!
//! Connects time out after `redis.connect_timeout_ms`, reads and writes after
//! `redis.io_timeout_ms`; every failure reconnects with back-off (50 ms doubling to 2 s).
//! Publishes that queue up go in pipelines of up to `PIPELINE` script calls (one round trip).
//! A publish whose script call failed is sent again after the reconnect (the script numbers a
//! given origin and seq once). Local members always get local messages.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use log::{info, warn};

use super::redis_history::{Ask, Epochs, HistoryLimits, Outgoing, Scripts};
use super::redis_sub::Subscriber;
use super::wire;
use crate::config::HistorySettings;

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
    /// `[history]`: what the scripts keep.
    pub history: HistorySettings,
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
}

/// What waits for the worker: messages, bounded (the oldest message goes first), and answers
/// (stamps, history answers, link-ups), never dropped, in one FIFO.
struct Inbox {
    items: VecDeque<Incoming>,
    /// Messages among `items`, and their bytes.
    messages: usize,
    message_bytes: usize,
    max_items: usize,
    max_bytes: usize,
}

impl Inbox {
    fn size(m: &Incoming) -> usize {
        match m {
            Incoming::Message { group, payload, .. } => group.len() + payload.len(),
            _ => 0,
        }
    }

    /// Appends `m`; returns how many messages were dropped to stay in bounds.
    fn push(&mut self, m: Incoming) -> u64 {
        if matches!(m, Incoming::Message { .. }) {
            self.messages += 1;
            self.message_bytes += Self::size(&m);
        }
        self.items.push_back(m);
        let mut dropped = 0;
        while self.messages > self.max_items || self.message_bytes > self.max_bytes {
            let Some(i) = self.items.iter().position(|m| matches!(m, Incoming::Message { .. })) else { break };
            if let Some(old) = self.items.remove(i) {
                self.messages -= 1;
                self.message_bytes -= Self::size(&old);
                dropped += 1;
            }
        }
        dropped
    }
}

/// The groups the worker has members in; `changed` tells the subscriber to look again.
#[derive(Default)]
pub(super) struct Wanted {
    pub groups: HashSet<String>,
    pub changed: bool,
}

/// History requests on their way: asked by the worker; confirmed by the subscriber (the
/// subscription is active) for the command thread; answered, back to the subscriber, which
/// hands the answer over once the messages before it have come. `session` is the subscriber
/// connection the confirmation and the hand-over must happen on.
#[derive(Default)]
pub(super) struct Requests {
    pub asked: VecDeque<Ask>,
    pub ready: VecDeque<(u64, Ask)>,
    pub answered: VecDeque<(u64, Vec<Incoming>)>,
    /// Requests in any of the three queues, or running.
    pub in_flight: usize,
}

impl Requests {
    /// A new subscriber connection: what was on its way is lost (the worker asks again after
    /// the `LinkUp`).
    pub fn clear(&mut self) {
        let queued = self.asked.len() + self.ready.len() + self.answered.len();
        let running = self.in_flight.saturating_sub(queued);
        self.asked.clear();
        self.ready.clear();
        self.answered.clear();
        self.in_flight = running;
    }
}

/// State shared by the worker and its two Redis threads.
pub(super) struct Shared {
    pub subscribed: AtomicBool,
    publisher_up: AtomicBool,
    /// Messages dropped at either queue's bound, and history requests beyond theirs.
    dropped: AtomicU64,
    /// The worker dropped the bus: the threads end.
    pub closed: AtomicBool,
    pub wanted: Mutex<Wanted>,
    outgoing: Mutex<Bounded<Outgoing>>,
    /// Signalled when a publish or a confirmed history request is queued (or the bus closes);
    /// the command thread waits on it.
    pub work_ready: Condvar,
    incoming: Mutex<Inbox>,
    pub requests: Mutex<Requests>,
    /// The subscriber connection's number (a new one per connect).
    pub session: AtomicU64,
    /// Wakes the worker's loop.
    pub waker: mio::Waker,
}

/// Locks even if another thread panicked while holding the lock: the queues stay usable.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Nothing connected yet; both queues bounded by `max_items` and `max_bytes`.
    fn new(max_items: usize, max_bytes: usize, waker: mio::Waker) -> Shared {
        Shared {
            subscribed: AtomicBool::new(false),
            publisher_up: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            wanted: Mutex::new(Wanted::default()),
            outgoing: Mutex::new(Bounded::new(max_items, max_bytes)),
            work_ready: Condvar::new(),
            incoming: Mutex::new(Inbox { items: VecDeque::new(), messages: 0, message_bytes: 0, max_items, max_bytes }),
            requests: Mutex::new(Requests::default()),
            session: AtomicU64::new(0),
            waker,
        }
    }

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

    /// Queues what arrived for the worker (without waking it: the caller does, once per batch).
    pub fn push_incoming(&self, m: Incoming) {
        let dropped = lock(&self.incoming).push(m);
        self.count_dropped(dropped, "incoming");
    }

    pub fn wake_worker(&self) {
        let _ = self.waker.wake();
    }

    /// Hands confirmed history requests to the command thread.
    pub fn hand_to_commands(&self, session: u64, asks: Vec<Ask>) {
        lock(&self.requests).ready.extend(asks.into_iter().map(|a| (session, a)));
        // Taking the queue's lock orders this wake-up after the command thread's last look
        // at `ready` (it holds that lock until it waits), so the wake-up is not lost.
        drop(lock(&self.outgoing));
        self.work_ready.notify_one();
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
    Stamped {
        seq: u64,
        offset: u64,
    },
    HistoryItem {
        request: u64,
        offset: u64,
        kind: wire::PayloadKind,
        payload: Vec<u8>,
    },
    Position {
        request: u64,
        epoch: String,
        offset: u64,
        recovered: bool,
    },
    /// A Redis connection came back: messages and history answers may have been lost.
    LinkUp,
}

pub struct RedisBus {
    origin: u64,
    /// Sequence number of the last publish; the first is 1.
    seq: u64,
    shared: Arc<Shared>,
    /// Wakes the subscriber thread when the wanted groups change (non-blocking).
    wake_subscriber: UnixStream,
    max_requests: usize,
}

impl RedisBus {
    /// Starts the two threads; `waker` wakes the worker's loop when messages arrive.
    pub fn start(settings: RedisSettings, origin: u64, waker: mio::Waker) -> anyhow::Result<RedisBus> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| anyhow::anyhow!("invalid value for `redis.url` {:?}: {e}", settings.url))?;
        let (max_items, max_bytes) = (settings.queue_max_messages, settings.queue_max_bytes);
        let shared = Arc::new(Shared::new(max_items, max_bytes, waker));
        let (wake_subscriber, wake) = UnixStream::pair().context("cannot create the Redis wake-up socket")?;
        wake_subscriber.set_nonblocking(true)?;
        wake.set_nonblocking(true)?;
        let poke = wake_subscriber.try_clone().context("cannot share the Redis wake-up socket")?;
        let subscriber = Subscriber {
            info: client.get_connection_info().clone(),
            prefix: settings.prefix.clone(),
            timeouts: settings.timeouts,
            max_message: settings.max_message,
            shared: shared.clone(),
            wake,
        };
        thread::Builder::new().name("redis-sub".into()).spawn(move || subscriber.run())?;
        let limits = HistoryLimits::new(&settings.history, settings.queue_max_bytes);
        let commands = Commands {
            client,
            prefix: settings.prefix,
            timeouts: settings.timeouts,
            limits,
            shared: shared.clone(),
            poke_subscriber: poke,
        };
        thread::Builder::new().name("redis-cmd".into()).spawn(move || commands.run())?;
        Ok(RedisBus { origin, seq: 0, shared, wake_subscriber, max_requests: max_items.max(1) })
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

    /// Queues a publish for the command thread; never waits for Redis. Returns its seq, which
    /// the `Stamped` answer carries.
    pub fn publish(&mut self, group: &str, kind: wire::PayloadKind, payload: &[u8]) -> u64 {
        self.seq += 1;
        let out = Outgoing::new(self.origin, self.seq, group, kind, payload);
        let size = out.tail.len() + 16;
        let dropped = lock(&self.shared.outgoing).push(out, size);
        self.shared.work_ready.notify_one();
        self.shared.count_dropped(dropped, "publish");
        self.seq
    }

    /// Asks for `group`'s position and the messages after `since` (contract point 3 above).
    /// The worker subscribed to the group before asking.
    pub fn request_history(&mut self, request: u64, group: &str, since: Option<wire::Since<'_>>, limit: u32) {
        let ask = Ask { request, group: group.to_owned(), since: since.map(|s| (s.epoch.to_owned(), s.offset)), limit };
        let mut requests = lock(&self.shared.requests);
        if requests.in_flight >= self.max_requests {
            drop(requests);
            self.shared.count_dropped(1, "history request");
            return;
        }
        requests.in_flight += 1;
        requests.asked.push_back(ask);
        drop(requests);
        self.poke_subscriber();
    }

    /// Everything that arrived, oldest first.
    pub fn take_incoming(&mut self) -> Vec<Incoming> {
        let mut inbox = lock(&self.shared.incoming);
        inbox.messages = 0;
        inbox.message_bytes = 0;
        std::mem::take(&mut inbox.items).into()
    }

    pub fn origin(&self) -> u64 {
        self.origin
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
        self.shared.work_ready.notify_all();
        self.poke_subscriber();
    }
}

/// The command thread's work item.
enum Work {
    /// Publishes, oldest first, with their sizes in the queue.
    Publish(Vec<(Outgoing, usize)>),
    History(u64, Ask),
}

/// Most publishes sent in one pipeline (one round trip) when they queue up.
const PIPELINE: usize = 64;

/// The command connection's thread: runs the publish script for queued publishes, oldest
/// first, and the history script for confirmed requests (those first: a join waits on them).
struct Commands {
    client: redis::Client,
    prefix: String,
    timeouts: Timeouts,
    limits: HistoryLimits,
    shared: Arc<Shared>,
    poke_subscriber: UnixStream,
}

impl Commands {
    fn connect(&self) -> redis::RedisResult<(redis::Connection, Scripts)> {
        let mut c = self.client.get_connection_with_timeout(self.timeouts.connect)?;
        c.set_read_timeout(Some(self.timeouts.io))?;
        c.set_write_timeout(Some(self.timeouts.io))?;
        let scripts = Scripts::load(&mut c, &self.prefix)?;
        Ok((c, scripts))
    }

    /// The next thing to do, waiting for it; `None` when the bus closed.
    fn next_work(&self) -> Option<Work> {
        let shared = &*self.shared;
        let mut queue = lock(&shared.outgoing);
        loop {
            if shared.closed.load(Ordering::Relaxed) {
                return None;
            }
            if let Some((session, ask)) = lock(&shared.requests).ready.pop_front() {
                return Some(Work::History(session, ask));
            }
            if let Some(first) = queue.take() {
                let mut batch = vec![first];
                while batch.len() < PIPELINE {
                    let Some(next) = queue.take() else { break };
                    batch.push(next);
                }
                return Some(Work::Publish(batch));
            }
            queue = shared.work_ready.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Runs the publish script for `batch` (one round trip); `Some(why)` when the connection
    /// failed: then the whole batch is queued again (a publish that ran is not numbered twice).
    fn publish(
        &self,
        con: &mut redis::Connection,
        scripts: &Scripts,
        epochs: &mut Epochs,
        batch: Vec<(Outgoing, usize)>,
    ) -> Option<String> {
        let shared = &*self.shared;
        let result = if let [(out, _)] = &batch[..] {
            epochs.fresh().and_then(|epoch| scripts.publish(con, out, &epoch, &self.limits)).map(|o| vec![Ok(o)])
        } else {
            let mut pipe = redis::pipe();
            let mut made = Ok(());
            for (out, _) in &batch {
                match epochs.fresh() {
                    Ok(epoch) => {
                        pipe.add_command(scripts.publish_cmd(out, &epoch, &self.limits));
                    }
                    Err(e) => made = Err(e),
                }
            }
            made.and_then(|()| pipe.query::<Vec<redis::Value>>(con)).map(|values| {
                values
                    .into_iter()
                    .map(|v| match v {
                        redis::Value::Int(o) => Ok(o.max(0) as u64),
                        redis::Value::ServerError(e) => Err(redis::RedisError::from(e)),
                        other => Err(redis::RedisError::from((
                            redis::ErrorKind::TypeError,
                            "unexpected answer from the publish script",
                            format!("{other:?}"),
                        ))),
                    })
                    .collect()
            })
        };
        // A script cache flushed under the pipeline fails every entry with NOSCRIPT: that is
        // the pipeline refused, not each publish.
        let result = result.and_then(|offsets| {
            match offsets.iter().find_map(|o| o.as_ref().err().filter(|e| e.kind() == redis::ErrorKind::NoScriptError))
            {
                Some(e) => Err(redis::RedisError::from((redis::ErrorKind::NoScriptError, "NOSCRIPT", e.to_string()))),
                None => Ok(offsets),
            }
        });
        let offsets = match result {
            Ok(offsets) => offsets,
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                let mut queue = lock(&shared.outgoing);
                for (out, size) in batch.into_iter().rev() {
                    queue.put_back(out, size);
                }
                return Some(format!("redis publish failed: {e}"));
            }
            // Redis refused the pipeline as a whole (a NOSCRIPT after a script flush, ...):
            // one at a time, each with its own answer (EVAL when the script is gone).
            Err(e) if batch.len() > 1 => {
                warn!("redis refused a pipeline of {} publishes ({e}); sending them one at a time", batch.len());
                let mut failed = None;
                let mut rest = batch.into_iter();
                for one in rest.by_ref() {
                    failed = self.publish(con, scripts, epochs, vec![one]);
                    if failed.is_some() {
                        break;
                    }
                }
                let mut queue = lock(&shared.outgoing);
                for (out, size) in rest.rev() {
                    queue.put_back(out, size);
                }
                return failed;
            }
            Err(e) => vec![Err(e)],
        };
        let mut offsets = offsets.into_iter();
        for (out, size) in &batch {
            lock(&shared.outgoing).finish(*size);
            let offset = offsets.next().unwrap_or(Ok(0));
            let offset = offset.unwrap_or_else(|e| {
                // Redis refused it (a key of another type, out of memory, ...): sending it
                // again would fail again.
                shared.count_dropped(1, "publish");
                warn!("redis refused a publish to group {:?}: {e}", out.group);
                0
            });
            shared.push_incoming(Incoming::Stamped { seq: out.seq, offset });
        }
        shared.wake_worker();
        None
    }

    fn run(self) {
        let shared = &*self.shared;
        let mut con: Option<(redis::Connection, Scripts)> = None;
        let mut backoff = MIN_BACKOFF;
        let mut failed_before = false;
        let mut epochs = Epochs::new();
        while !shared.closed.load(Ordering::Relaxed) {
            // Connect at once (not at the first publish), so `status` shows the bus up early.
            let Some((c, scripts)) = con.as_mut() else {
                match self.connect() {
                    Ok(c) => {
                        if failed_before {
                            info!(
                                "redis command connection up again; {} publishes queued",
                                lock(&shared.outgoing).len()
                            );
                            // A history script may have been lost with the old connection.
                            shared.push_incoming(Incoming::LinkUp);
                            shared.wake_worker();
                        }
                        con = Some(c);
                        shared.publisher_up.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        shared.publisher_up.store(false, Ordering::Relaxed);
                        warn!("redis command connection cannot connect: {e}; retrying in {backoff:?}");
                        failed_before = true;
                        thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
                continue;
            };
            let Some(work) = self.next_work() else { return };
            let failed = match work {
                Work::Publish(batch) => self.publish(c, scripts, &mut epochs, batch),
                Work::History(session, ask) => {
                    let result = epochs.fresh().and_then(|epoch| scripts.history(c, &ask, &epoch, &self.limits));
                    let mut requests = lock(&shared.requests);
                    match result {
                        Ok(answer) => {
                            requests.answered.push_back((session, answer));
                            drop(requests);
                            // A full socket already holds a wake-up: WouldBlock is fine.
                            let _ = (&self.poke_subscriber).write(&[1]);
                            None
                        }
                        Err(e) => {
                            requests.in_flight = requests.in_flight.saturating_sub(1);
                            drop(requests);
                            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                                Some(format!("redis history request failed: {e}"))
                            } else {
                                warn!("redis refused a history request for group {:?}: {e}", ask.group);
                                None
                            }
                        }
                    }
                }
            };
            match failed {
                None => backoff = MIN_BACKOFF,
                Some(why) => {
                    con = None;
                    shared.publisher_up.store(false, Ordering::Relaxed);
                    warn!("{why}; reconnecting in {backoff:?}");
                    failed_before = true;
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
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

    #[test]
    fn a_pipeline_refused_for_a_flushed_script_is_sent_one_at_a_time() {
        use super::*;
        use crate::channel::redis_history::tests::{limits, redis};
        let Some((server, mut con, scripts)) = redis() else { return };
        let poll = mio::Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).unwrap();
        let (poke, _other) = UnixStream::pair().unwrap();
        let url = format!("redis://127.0.0.1:{}/", server.1);
        let shared = Arc::new(Shared::new(100, 1 << 20, waker));
        let commands = Commands {
            client: redis::Client::open(url).unwrap(),
            prefix: "t:".into(),
            timeouts: Timeouts::from_millis(1000, 1000),
            limits: limits(10),
            shared: shared.clone(),
            poke_subscriber: poke,
        };
        let mut epochs = Epochs::new();
        let mut batch = Vec::new();
        for seq in 1..=3 {
            let out = Outgoing::new(1, seq, "g", wire::PayloadKind::Text, b"m");
            let size = out.tail.len() + 16;
            shared.outgoing.lock().unwrap().push(out, size);
            batch.push(shared.outgoing.lock().unwrap().take().unwrap());
        }
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut con).unwrap();
        assert_eq!(commands.publish(&mut con, &scripts, &mut epochs, batch), None);
        let stamps: Vec<(u64, u64)> = shared
            .incoming
            .lock()
            .unwrap()
            .items
            .iter()
            .map(|i| match i {
                Incoming::Stamped { seq, offset } => (*seq, *offset),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(stamps, vec![(1, 1), (2, 2), (3, 3)]);
        assert_eq!(shared.outgoing.lock().unwrap().len(), 0, "every publish finished");
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 0);
    }
}
