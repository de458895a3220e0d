//! The channel server (broker): accepts channel peers (workers of any instance, `publish`),
//! authenticates them when a secret is configured, records which peer subscribes to which
//! group, and forwards each MESSAGE frame, unchanged, to every subscriber of its group except
//! the peer that published it (that worker already delivered to its own members). Each peer
//! gets an ACK with the highest seq forwarded once the forwards are written, so it can forget
//! those publishes.
//!
//! For `channel.grace_ms` after it starts, the broker also keeps every message it forwarded
//! (bounded by `channel.grace_max_bytes`) and replays them to peers that subscribe during that
//! window, so instances reconnecting at different speeds after a broker restart miss nothing
//! that reached the broker; receivers drop the repeats by (origin, seq).
//!
//! Runs as a child of a master (`groupcast channel-child`), on the listener the master bound,
//! whether inside an instance or standalone (`groupcast channel`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::time::{Duration, Instant};

use anyhow::Context;
use log::{debug, info, warn};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use super::{auth, wire, ChannelListener, ChannelStream};
use crate::config::Config;
use crate::control::{self, ChildLink, ProcessStats};

const LISTENER: Token = Token(0);
const CONTROL: Token = Token(1);
const SIGNALS: Token = Token(2);
const FIRST_PEER: usize = 16;
const READ_BUF: usize = 256 * 1024;

enum PeerPhase {
    /// CHALLENGE sent with this nonce; only AUTH is accepted.
    AwaitAuth {
        nonce: [u8; wire::NONCE_LEN],
    },
    Ready,
}

struct Peer {
    stream: ChannelStream,
    phase: PeerPhase,
    /// Name from the peer's HELLO, for logs.
    name: String,
    /// Origin from the peer's HELLO: held messages are not replayed to their own origin.
    origin: Option<u64>,
    inbuf: Vec<u8>,
    outbuf: crate::sendbuf::SendBuf,
    /// Groups this peer subscribed to, for cleaning `subscribers` when it goes.
    groups: HashSet<Box<str>>,
    /// Highest seq of this peer's MESSAGEs handled this turn, to acknowledge after the flush.
    ack: Option<u64>,
    dirty: bool,
}

/// A message kept during the grace window.
struct Held {
    group: Box<str>,
    origin: u64,
    frame: Vec<u8>,
}

pub struct Broker {
    poll: Poll,
    listener: ChannelListener,
    peers: Slab<Peer>,
    /// group -> subscribed peers (slab keys).
    subscribers: HashMap<Box<str>, Vec<usize>>,
    control: ChildLink,
    signals: Signals,
    read_buf: Vec<u8>,
    dirty: Vec<usize>,
    max_frame: usize,
    peer_buffer_limit: usize,
    secret: Option<Vec<u8>>,
    /// Messages kept for replay until `grace_until`, in arrival order.
    held: VecDeque<Held>,
    held_bytes: usize,
    grace_max_bytes: usize,
    grace_until: Option<Instant>,
    stats: ProcessStats,
    started: Instant,
}

/// Entry point of `groupcast channel-child`, exec'd by the master.
pub fn run_child() -> anyhow::Result<()> {
    let config = control::child_config()?;
    crate::logging::init(
        "channel",
        crate::config::log_level_filter(&config.log.level).unwrap_or(log::LevelFilter::Info),
    );
    if config.log.syslog {
        if let Err(e) = crate::logging::use_syslog(&config.log.syslog_socket, &config.log.syslog_facility) {
            warn!("{e}");
        }
    }
    let fd =
        crate::sys::adopt_inherited_fd(control::CHILD_LISTENER_FD).context("no channel listener from the master")?;
    let listener = ChannelListener::from_fd(fd, &config.channel_listen())?;
    let mut broker = Broker::new(listener, &config)?;
    info!(
        "channel server listening on {} ({})",
        config.channel_listen(),
        if broker.secret.is_some() { "peers must prove the shared secret" } else { "no authentication" }
    );
    broker.run()
}

impl Broker {
    fn new(mut listener: ChannelListener, config: &Config) -> anyhow::Result<Broker> {
        let poll = Poll::new().context("cannot create the event loop")?;
        listener.register(poll.registry(), LISTENER)?;
        let control = ChildLink::inherit(poll.registry(), CONTROL).context("no status link from the master")?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT])?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        let secret = config.channel.secret_file.as_deref().map(auth::load_secret).transpose()?;
        let grace = Duration::from_millis(config.channel.grace_ms);
        Ok(Broker {
            poll,
            listener,
            peers: Slab::new(),
            subscribers: HashMap::new(),
            control,
            signals,
            read_buf: vec![0; READ_BUF],
            dirty: Vec::new(),
            max_frame: config.channel.max_frame,
            peer_buffer_limit: config.channel.peer_buffer_limit,
            secret,
            held: VecDeque::new(),
            held_bytes: 0,
            grace_max_bytes: config.channel.grace_max_bytes,
            grace_until: (!grace.is_zero()).then(|| Instant::now() + grace),
            stats: ProcessStats { role: "channel".into(), pid: std::process::id(), ..Default::default() },
            started: Instant::now(),
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.grace_until.map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("event loop failed");
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    CONTROL => {
                        if !self.control_ready() {
                            info!("master gone; channel server stopping");
                            return Ok(());
                        }
                    }
                    SIGNALS => {
                        if self.signals.pending().next().is_some() {
                            info!("channel server stopping");
                            return Ok(());
                        }
                    }
                    Token(t) => {
                        let key = t - FIRST_PEER;
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.peer_readable(key);
                        }
                        if event.is_writable() {
                            self.mark_dirty(key);
                        }
                    }
                }
            }
            self.end_of_turn();
        }
    }

    /// Writes the forwards, then acknowledges what was forwarded, then ends the grace window
    /// when its time is up.
    fn end_of_turn(&mut self) {
        self.flush_dirty();
        let mut acked = false;
        for (key, peer) in self.peers.iter_mut() {
            if let Some(seq) = peer.ack.take() {
                wire::encode_ack(peer.outbuf.tail(), seq);
                if !peer.dirty {
                    peer.dirty = true;
                    self.dirty.push(key);
                }
                acked = true;
            }
        }
        if acked {
            self.flush_dirty();
        }
        if self.grace_until.is_some_and(|t| Instant::now() >= t) {
            info!("grace window over: {} held messages released", self.held.len());
            self.grace_until = None;
            self.held = VecDeque::new();
            self.held_bytes = 0;
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok(mut stream) => {
                    let nonce = match auth::nonce() {
                        Ok(n) => n,
                        Err(e) => {
                            warn!("no random nonce for a channel peer: {e}");
                            continue;
                        }
                    };
                    let entry = self.peers.vacant_entry();
                    let key = entry.key();
                    let token = Token(key + FIRST_PEER);
                    if let Err(e) =
                        self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                    {
                        warn!("cannot register a channel peer: {e}");
                        continue;
                    }
                    let (flags, phase) = match self.secret {
                        Some(_) => (wire::FLAG_AUTH_REQUIRED, PeerPhase::AwaitAuth { nonce }),
                        None => (0, PeerPhase::Ready),
                    };
                    let mut outbuf = crate::sendbuf::SendBuf::default();
                    wire::encode_challenge(outbuf.tail(), flags, &nonce);
                    entry.insert(Peer {
                        stream,
                        phase,
                        name: String::from("(unnamed)"),
                        origin: None,
                        inbuf: Vec::new(),
                        outbuf,
                        groups: HashSet::new(),
                        ack: None,
                        dirty: true,
                    });
                    self.dirty.push(key);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("channel accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn peer_readable(&mut self, key: usize) {
        loop {
            let Some(peer) = self.peers.get_mut(key) else { return };
            match peer.stream.read(&mut self.read_buf) {
                Ok(0) => return self.drop_peer(key, "closed the connection"),
                Ok(n) => {
                    peer.inbuf.extend_from_slice(&self.read_buf[..n]);
                    if let Err(e) = self.process(key) {
                        return self.drop_peer(key, &e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.drop_peer(key, &format!("read failed: {e}")),
            }
        }
    }

    /// Handles every whole frame in the peer's input buffer.
    fn process(&mut self, key: usize) -> Result<(), String> {
        let input = std::mem::take(&mut self.peers[key].inbuf);
        let mut pos = 0;
        let mut new_groups: Vec<Box<str>> = Vec::new();
        let result = loop {
            let (frame, used) = match wire::decode(&input[pos..], self.max_frame) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("sent a bad frame: {e}")),
            };
            let raw = &input[pos..pos + used];
            pos += used;
            self.stats.messages_in += 1;
            if let PeerPhase::AwaitAuth { nonce } = self.peers[key].phase {
                match self.authenticate(key, &frame, &nonce) {
                    Ok(()) => continue,
                    Err(e) => break Err(e),
                }
            }
            match frame {
                wire::Frame::Hello { version, origin, name } => {
                    if version != wire::VERSION {
                        break Err(format!("speaks channel protocol {version}, not {}", wire::VERSION));
                    }
                    let peer = &mut self.peers[key];
                    peer.name = name.to_owned();
                    peer.origin = Some(origin);
                    info!("channel peer {name} (origin {origin:#x}) connected");
                }
                wire::Frame::Subscribe { group } | wire::Frame::Resubscribe { group } => {
                    if self.peers[key].groups.insert(group.into()) {
                        self.subscribers.entry(group.into()).or_default().push(key);
                    }
                    // Only members the peer had before it reconnected are owed history.
                    if matches!(frame, wire::Frame::Resubscribe { .. }) && self.grace_until.is_some() {
                        new_groups.push(group.into());
                    }
                }
                wire::Frame::Unsubscribe { group } => {
                    if self.peers[key].groups.remove(group) {
                        self.remove_subscriber(group, key);
                    }
                }
                wire::Frame::Message { origin, seq, group, .. } => {
                    self.forward(key, group, raw);
                    self.hold(group, origin, raw);
                    let peer = &mut self.peers[key];
                    peer.ack = Some(peer.ack.map_or(seq, |a| a.max(seq)));
                }
                other => break Err(format!("sent a frame only the broker sends: {other:?}")),
            }
        };
        if !new_groups.is_empty() {
            self.replay_held(key, &new_groups);
        }
        if let Some(peer) = self.peers.get_mut(key) {
            let mut rest = input;
            rest.drain(..pos);
            peer.inbuf = rest;
        }
        result
    }

    /// Checks the first frame of a peer when a secret is configured: it must be a valid AUTH.
    fn authenticate(
        &mut self,
        key: usize,
        frame: &wire::Frame<'_>,
        nonce: &[u8; wire::NONCE_LEN],
    ) -> Result<(), String> {
        let secret = self.secret.as_deref().unwrap_or_default();
        let wire::Frame::Auth { nonce: peer_nonce, mac } = frame else {
            return Err("did not authenticate (its first frame was not AUTH)".into());
        };
        if !auth::verify_peer(secret, nonce, peer_nonce, mac) {
            return Err("failed authentication (wrong shared secret)".into());
        }
        let proof = auth::broker_proof(secret, peer_nonce, nonce);
        let peer = &mut self.peers[key];
        wire::encode_auth_ok(peer.outbuf.tail(), &proof);
        peer.phase = PeerPhase::Ready;
        self.mark_dirty(key);
        Ok(())
    }

    /// Queues the frame `raw` to every subscriber of `group` but its publisher.
    fn forward(&mut self, from: usize, group: &str, raw: &[u8]) {
        self.stats.published += 1;
        let Some(subs) = self.subscribers.get(group) else { return };
        let mut cut = Vec::new();
        for &to in subs {
            if to == from {
                continue;
            }
            let Some(peer) = self.peers.get_mut(to) else { continue };
            if peer.outbuf.len() + raw.len() > self.peer_buffer_limit {
                cut.push(to);
                continue;
            }
            peer.outbuf.extend_from_slice(raw);
            self.stats.messages_out += 1;
            if !peer.dirty {
                peer.dirty = true;
                self.dirty.push(to);
            }
        }
        for to in cut {
            self.drop_peer(to, "stopped reading: its buffer passed channel.peer_buffer_limit");
        }
    }

    /// During the grace window, keeps a copy of each message for peers that subscribe later.
    fn hold(&mut self, group: &str, origin: u64, raw: &[u8]) {
        if self.grace_until.is_none() {
            return;
        }
        self.held_bytes += raw.len();
        self.held.push_back(Held { group: group.into(), origin, frame: raw.to_vec() });
        while self.held_bytes > self.grace_max_bytes {
            let Some(old) = self.held.pop_front() else { break };
            self.held_bytes -= old.frame.len();
            self.stats.channel_dropped += 1;
        }
    }

    /// Sends the held messages of `groups` (just subscribed) to peer `key`, in arrival order,
    /// except those it published itself.
    fn replay_held(&mut self, key: usize, groups: &[Box<str>]) {
        let Some(peer) = self.peers.get_mut(key) else { return };
        let mut replayed = 0;
        for held in &self.held {
            if Some(held.origin) != peer.origin && groups.contains(&held.group) {
                peer.outbuf.extend_from_slice(&held.frame);
                replayed += 1;
            }
        }
        if replayed > 0 {
            debug!("replayed {replayed} held messages to {}", peer.name);
            self.mark_dirty(key);
        }
    }

    fn remove_subscriber(&mut self, group: &str, key: usize) {
        if let Some(subs) = self.subscribers.get_mut(group) {
            subs.retain(|&k| k != key);
            if subs.is_empty() {
                self.subscribers.remove(group);
            }
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(peer) = self.peers.get_mut(key) {
            if !peer.dirty {
                peer.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    fn flush_dirty(&mut self) {
        for key in std::mem::take(&mut self.dirty) {
            let Some(peer) = self.peers.get_mut(key) else { continue };
            peer.dirty = false;
            let failed = peer.outbuf.write_to(&mut peer.stream).err();
            if let Some(e) = failed {
                self.stats.send_failures += 1;
                self.drop_peer(key, &format!("write failed: {e}"));
            }
        }
    }

    fn drop_peer(&mut self, key: usize, why: &str) {
        if !self.peers.contains(key) {
            return;
        }
        let mut peer = self.peers.remove(key);
        let _ = self.poll.registry().deregister(&mut peer.stream);
        for group in &peer.groups {
            self.remove_subscriber(group, key);
        }
        if why == "closed the connection" {
            debug!("channel peer {} {why}", peer.name);
        } else {
            warn!("channel peer {} dropped: {why}", peer.name);
        }
    }

    /// Answers the master; false when the master is gone.
    fn control_ready(&mut self) -> bool {
        match self.control.read_requests() {
            Ok(Some(requests)) => {
                for _ in requests {
                    let mut s = self.stats.clone();
                    s.connections = self.peers.len() as u64;
                    s.groups = self.subscribers.len() as u64;
                    s.memberships = self.subscribers.values().map(|v| v.len() as u64).sum();
                    let (version, binary_mtime) = crate::control::binary_identity();
                    s.version = version;
                    s.binary_mtime = binary_mtime;
                    s.uptime_secs = self.started.elapsed().as_secs();
                    s.state = "running".into();
                    s.log_dropped = crate::logging::dropped_lines();
                    s.channel_queued = self.held.len() as u64;
                    let _ = self.control.send_json(&s);
                }
                true
            }
            Ok(None) | Err(_) => false,
        }
    }
}
