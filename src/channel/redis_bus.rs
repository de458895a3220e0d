//! The Redis bus (`bus = "redis"`): for deployments that outgrow one broker, workers exchange
//! group messages through Redis pub/sub instead of the channel server. Each group is one Redis
//! channel, `[redis] prefix` + group id, and a worker subscribes only while it has local
//! members, so Redis sends a message only to instances that need it.
//!
//! The payload is the channel protocol's MESSAGE frame (origin, seq, group, text), so receivers
//! skip their own publishes (already delivered locally) and drop repeats exactly as with the
//! channel server.
//!
//! The redis crate's connections block, so each worker runs two small threads (a worker never
//! forks, so threads are safe there): one owns the subscription connection and hands incoming
//! messages to the event loop through a channel and a `mio::Waker`; one owns the publishing
//! connection and keeps a bounded queue while Redis is unreachable. Both reconnect with
//! back-off and the subscriber re-subscribes every group.
//!
//! Guarantees during outages (docs/cluster.md): publishes made while Redis is down wait in the
//! bounded queue and are sent when it is back; Redis pub/sub keeps nothing for a subscriber that
//! is disconnected, so members on an instance whose subscription connection is down miss what is
//! published meanwhile (at most once). Local members always get local messages.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{info, warn};

use super::publisher::Publisher;

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the subscriber thread looks for new (un)subscriptions while waiting for messages.
const POLL: Duration = Duration::from_millis(20);

/// Settings from the config.
#[derive(Clone)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    pub queue_max_messages: usize,
    pub queue_max_bytes: usize,
}

enum SubCommand {
    Subscribe(String),
    Unsubscribe(String),
}

/// Counters shared with the threads.
#[derive(Default)]
struct Shared {
    subscribed: AtomicBool,
    publisher_up: AtomicBool,
    dropped: AtomicU64,
    queued: AtomicU64,
}

/// A publish on its way to Redis: the Redis channel (prefix + group), the MESSAGE frame.
struct Outgoing {
    channel: String,
    frame: Vec<u8>,
}

pub struct RedisBus {
    publisher: Publisher,
    prefix: String,
    sub_tx: Sender<SubCommand>,
    pub_tx: Sender<Outgoing>,
    incoming: Receiver<(String, Vec<u8>)>,
    shared: Arc<Shared>,
}

impl RedisBus {
    /// Starts the two threads; `waker` wakes the worker's loop when messages arrive.
    pub fn start(settings: RedisSettings, origin: u64, waker: mio::Waker) -> anyhow::Result<RedisBus> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| anyhow::anyhow!("invalid value for `redis.url` {:?}: {e}", settings.url))?;
        let shared = Arc::new(Shared::default());
        let (sub_tx, sub_rx) = mpsc::channel();
        let (pub_tx, pub_rx) = mpsc::channel();
        let (in_tx, incoming) = mpsc::channel();
        let prefix = settings.prefix.clone();
        let (c1, s1, p1) = (client.clone(), shared.clone(), prefix.clone());
        thread::Builder::new()
            .name("redis-sub".into())
            .spawn(move || subscriber(c1, p1, sub_rx, in_tx, waker, s1))?;
        let s2 = shared.clone();
        thread::Builder::new().name("redis-pub".into()).spawn(move || publisher(client, settings, pub_rx, s2))?;
        Ok(RedisBus { publisher: Publisher::new(origin), prefix, sub_tx, pub_tx, incoming, shared })
    }

    pub fn subscribe(&mut self, group: &str) {
        let _ = self.sub_tx.send(SubCommand::Subscribe(group.to_owned()));
    }

    pub fn unsubscribe(&mut self, group: &str) {
        let _ = self.sub_tx.send(SubCommand::Unsubscribe(group.to_owned()));
    }

    pub fn publish(&mut self, group: &str, payload: &[u8]) {
        let (_, frame) = self.publisher.frame(group, payload);
        let _ = self.pub_tx.send(Outgoing { channel: format!("{}{group}", self.prefix), frame });
    }

    /// Messages that arrived, as (group, MESSAGE frame); empty when none are waiting.
    pub fn next_incoming(&mut self) -> Option<(String, Vec<u8>)> {
        self.incoming.try_recv().ok()
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

    pub fn queued(&self) -> u64 {
        self.shared.queued.load(Ordering::Relaxed)
    }
}

/// Owns the pub/sub connection: applies (un)subscriptions, forwards messages to the worker.
fn subscriber(
    client: redis::Client,
    prefix: String,
    commands: Receiver<SubCommand>,
    incoming: Sender<(String, Vec<u8>)>,
    waker: mio::Waker,
    shared: Arc<Shared>,
) {
    let mut groups: HashSet<String> = HashSet::new();
    let mut backoff = MIN_BACKOFF;
    loop {
        let mut con = match client.get_connection() {
            Ok(c) => c,
            Err(e) => {
                shared.subscribed.store(false, Ordering::Relaxed);
                warn!("redis subscriber cannot connect: {e}; retrying in {backoff:?}");
                if !drain_commands(&commands, &mut groups) {
                    return;
                }
                thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let mut pubsub = con.as_pubsub();
        if pubsub.set_read_timeout(Some(POLL)).is_err() {
            continue;
        }
        let resubscribed = groups.iter().all(|g| pubsub.subscribe(format!("{prefix}{g}")).is_ok());
        if !resubscribed {
            continue;
        }
        if backoff > MIN_BACKOFF {
            info!("redis subscriber connected again; {} groups re-subscribed", groups.len());
        }
        backoff = MIN_BACKOFF;
        shared.subscribed.store(true, Ordering::Relaxed);
        'connected: loop {
            loop {
                match commands.try_recv() {
                    Ok(SubCommand::Subscribe(g)) => {
                        if groups.insert(g.clone()) && pubsub.subscribe(format!("{prefix}{g}")).is_err() {
                            break 'connected;
                        }
                    }
                    Ok(SubCommand::Unsubscribe(g)) => {
                        if groups.remove(&g) && pubsub.unsubscribe(format!("{prefix}{g}")).is_err() {
                            break 'connected;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    let group = msg.get_channel_name().strip_prefix(prefix.as_str()).unwrap_or_default().to_owned();
                    if incoming.send((group, msg.get_payload_bytes().to_vec())).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => {
                    warn!("redis subscription lost: {e}");
                    break 'connected;
                }
            }
        }
        shared.subscribed.store(false, Ordering::Relaxed);
    }
}

/// Applies (un)subscriptions while disconnected; false when the worker is gone.
fn drain_commands(commands: &Receiver<SubCommand>, groups: &mut HashSet<String>) -> bool {
    loop {
        match commands.try_recv() {
            Ok(SubCommand::Subscribe(g)) => {
                groups.insert(g);
            }
            Ok(SubCommand::Unsubscribe(g)) => {
                groups.remove(&g);
            }
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
}

/// Owns the publishing connection and the bounded queue of publishes not yet sent.
fn publisher(client: redis::Client, settings: RedisSettings, frames: Receiver<Outgoing>, shared: Arc<Shared>) {
    let mut queue: VecDeque<Outgoing> = VecDeque::new();
    let mut queued_bytes = 0usize;
    // Connect at once, so `status` shows the bus up before the first publish.
    let mut con: Option<redis::Connection> = client.get_connection().ok();
    shared.publisher_up.store(con.is_some(), Ordering::Relaxed);
    let mut backoff = MIN_BACKOFF;
    loop {
        // Wait for work: block while the queue is empty, wake up to retry while it is not.
        let next = if queue.is_empty() {
            match frames.recv() {
                Ok(frame) => Some(frame),
                Err(_) => return,
            }
        } else {
            match frames.recv_timeout(backoff) {
                Ok(frame) => Some(frame),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        if let Some(frame) = next {
            queued_bytes += frame.frame.len();
            queue.push_back(frame);
            while let Ok(more) = frames.try_recv() {
                queued_bytes += more.frame.len();
                queue.push_back(more);
            }
        }
        while queue.len() > settings.queue_max_messages || queued_bytes > settings.queue_max_bytes {
            if let Some(old) = queue.pop_front() {
                queued_bytes -= old.frame.len();
                let n = shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!("redis publish queue full: dropped the oldest; {n} dropped so far");
                }
            }
        }
        if con.is_none() {
            match client.get_connection() {
                Ok(c) => {
                    if backoff > MIN_BACKOFF {
                        info!("redis publisher connected again; {} queued publishes to send", queue.len());
                    }
                    con = Some(c);
                    backoff = MIN_BACKOFF;
                    shared.publisher_up.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    shared.publisher_up.store(false, Ordering::Relaxed);
                    warn!("redis publisher cannot connect: {e}; {} publishes queued", queue.len());
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    shared.queued.store(queue.len() as u64, Ordering::Relaxed);
                    continue;
                }
            }
        }
        while let Some(out) = queue.front() {
            let Some(c) = con.as_mut() else { break };
            let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH").arg(&out.channel).arg(&out.frame[..]).query(c);
            match sent {
                Ok(_) => {
                    if let Some(done) = queue.pop_front() {
                        queued_bytes -= done.frame.len();
                    }
                }
                Err(e) => {
                    warn!("redis publish failed: {e}; reconnecting");
                    con = None;
                    shared.publisher_up.store(false, Ordering::Relaxed);
                    break;
                }
            }
        }
        shared.queued.store(queue.len() as u64, Ordering::Relaxed);
    }
}
