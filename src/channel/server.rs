//! The channel server (broker): accepts channel peers (workers of any instance, `publish`),
//! authenticates them when a secret is configured, records which peer subscribes to which
//! group, and forwards each published message to every subscriber of its group except the
//! peer that published it (that worker already delivered to its own members). Each peer gets
//! an ACK with the highest seq forwarded once the forwards are written, so it can forget those
//! publishes.
//!
//! Every message gets its group's next offset here, under the group's epoch (`history.rs`),
//! so each group has one order on every host; the last messages of each group are kept for
//! HISTORY (`[history]`). A peer introduced with HELLO version 2 publishes PUBLISH, receives
//! PUBLICATION (with the offset) and a STAMP for each of its publishes, and may ask HISTORY;
//! a version-1 peer sends and receives plain MESSAGE, as before offsets existed. A publish the
//! broker numbered already (same origin, seq not above the highest numbered, remembered across
//! reconnects in `departed.rs`) is a resend: acknowledged, stamped 0, not forwarded again.
//! docs/channel-protocol.md, "Offsets and history".
//!
//! For `channel.grace_ms` after it starts, the broker also keeps every message it forwarded
//! (bounded by `channel.grace_max_bytes`) and replays them to peers that re-subscribe during
//! that window, so instances reconnecting at different speeds after a broker restart miss
//! nothing that reached the broker; receivers drop the repeats by (origin, seq).
//!
//! Each peer is bound to the origin of its HELLO: a MESSAGE under another origin, or a HELLO
//! claiming an origin a connected peer holds, gets the peer dropped (a publisher could otherwise
//! silence another with seq = u64::MAX, since receivers drop what they take for repeats).
//!
//! Admission is bounded (docs/cluster.md, "Broker defences"): at most `channel.max_peers`
//! peers; each must authenticate (when a secret is set) and send HELLO within
//! `channel.auth_timeout_ms`, in frames no larger than those two need, checked at the length
//! prefix.
//!
//! Runs as a child of a master (`groupcast channel-child`), on the listener the master bound,
//! whether inside an instance or standalone (`groupcast channel`).

use std::collections::{HashMap, VecDeque};
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
use departed::Departed;
use grace::Grace;
use history::{History, Kept};
use peer::{Cut, Peer, Phase};

mod departed;
mod grace;
mod history;
mod peer;

const LISTENER: Token = Token(0);
const CONTROL: Token = Token(1);
const SIGNALS: Token = Token(2);
const FIRST_PEER: usize = 16;
const READ_BUF: usize = 256 * 1024;
/// Bytes read from one peer per loop turn: a peer that always has more to send (a flooding
/// publisher) is put back in line after this, so the others are read every turn too.
const READ_BUDGET: usize = READ_BUF;
/// Pause before accepting again when the process is out of descriptors (the pending
/// connections stay in the backlog meanwhile).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Longest an ACK waits for a write it can join (`end_of_turn`): the publisher's resend queue
/// holds this much more, and `groupcast publish`, which exits once its last publish is
/// acknowledged, waits this much longer at most.
const ACK_DELAY: Duration = Duration::from_millis(5);
/// Publishes after which an ACK is written even if alone, whatever `ACK_DELAY` says.
const ACK_EVERY: u32 = 256;

pub struct Broker {
    poll: Poll,
    listener: ChannelListener,
    peers: Slab<Peer>,
    /// group -> subscribed peers (slab keys).
    subscribers: HashMap<Box<str>, Subscribers>,
    /// origin -> the introduced peer it is bound to (slab key): one peer per origin.
    origins: HashMap<u64, usize>,
    control: ChildLink,
    signals: Signals,
    read_buf: Vec<u8>,
    /// Peers that used their read budget with bytes left: read again next turn (edge-triggered
    /// readiness will not report them again).
    again: Vec<usize>,
    dirty: Vec<usize>,
    /// Peers that published this turn and get an ACK after the flush.
    to_ack: Vec<usize>,
    max_frame: usize,
    peer_buffer_limit: usize,
    secret: Option<Vec<u8>>,
    /// Peers not introduced yet, by admission deadline (accept order is deadline order):
    /// (deadline, slab key, serial).
    admissions: VecDeque<(Instant, usize, u64)>,
    auth_timeout: Duration,
    max_peers: usize,
    /// Serial of the next peer accepted.
    next_serial: u64,
    /// Set when accept failed for want of descriptors: try again then.
    accept_retry_at: Option<Instant>,
    /// Accepting failed and was not resumed yet (for logging the pause once).
    accept_paused: bool,
    /// Messages kept for peers that re-subscribe late, while the grace window is open.
    grace: Grace,
    /// Each group's epoch and last offset, and its recent messages (`[history]`).
    history: History,
    /// Most messages one HISTORY replays (`history.max_recover`).
    max_recover: u64,
    /// Highest seq numbered per origin of the publishers gone, to know their resends.
    departed: Departed,
    /// The time of this loop turn, read once after each poll: messages kept during the turn
    /// share it.
    now: Instant,
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
    raise_open_file_limit(config.channel.max_peers);
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

/// One descriptor per peer: a standalone broker's master does not raise the limit for it (an
/// instance's master does), so the broker raises its own soft limit to the hard one.
fn raise_open_file_limit(max_peers: usize) {
    match crate::sys::raise_open_file_limit() {
        Ok(limit) if limit < max_peers as u64 + 64 => warn!(
            "open-file limit {limit} is below channel.max_peers ({max_peers}) + 64; accepting pauses \
             when descriptors run out (raise LimitNOFILE / ulimit -n)"
        ),
        Ok(_) => {}
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}

/// The start of this broker's epochs: random, so no two brokers (nor two runs of one) number
/// a group under the same epoch.
fn epoch_seed() -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).context("cannot draw a random epoch seed")?;
    Ok(u64::from_be_bytes(b))
}

/// Whether an accept error means this process (or the system) ran out of descriptors or
/// memory: the connection waits in the backlog and accepting resumes a little later.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

impl Broker {
    fn new(mut listener: ChannelListener, config: &Config) -> anyhow::Result<Broker> {
        let poll = Poll::new().context("cannot create the event loop")?;
        listener.register(poll.registry(), LISTENER)?;
        let control = ChildLink::inherit(poll.registry(), CONTROL).context("no status link from the master")?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT])?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        let secret = config.channel.secret_file.as_deref().map(auth::load_secret).transpose()?;
        Ok(Broker {
            poll,
            listener,
            peers: Slab::new(),
            subscribers: HashMap::new(),
            origins: HashMap::new(),
            control,
            signals,
            read_buf: vec![0; READ_BUF],
            again: Vec::new(),
            dirty: Vec::new(),
            to_ack: Vec::new(),
            max_frame: config.channel.max_frame,
            peer_buffer_limit: config.channel.peer_buffer_limit,
            secret,
            admissions: VecDeque::new(),
            auth_timeout: Duration::from_millis(config.channel.auth_timeout_ms),
            max_peers: config.channel.max_peers,
            next_serial: 0,
            accept_retry_at: None,
            accept_paused: false,
            grace: Grace::new(Duration::from_millis(config.channel.grace_ms), config.channel.grace_max_bytes),
            history: History::new(&config.history, epoch_seed()?),
            max_recover: config.history.max_recover as u64,
            departed: Departed::new(Duration::from_millis(config.history.meta_ttl_ms), config.history.max_groups),
            now: Instant::now(),
            stats: ProcessStats { role: "channel".into(), pid: std::process::id(), ..Default::default() },
            started: Instant::now(),
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = if self.again.is_empty() {
                self.next_wakeup().map(|t| t.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("event loop failed");
            }
            self.now = Instant::now();
            let again = std::mem::take(&mut self.again);
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
            for key in again {
                if let Some(peer) = self.peers.get_mut(key).filter(|p| p.read_again) {
                    peer.read_again = false;
                    self.peer_readable(key);
                }
            }
            let now = Instant::now();
            self.now = now;
            self.history.expire(now);
            self.departed.expire(now);
            if self.accept_retry_at.is_some_and(|t| now >= t) {
                self.accept_retry_at = None;
                self.accept_all();
            }
            self.expire_admissions(now);
            self.end_of_turn();
        }
    }

    /// When the oldest ACK kept back (`end_of_turn`) must be written.
    fn next_ack_due(&self) -> Option<Instant> {
        self.to_ack.iter().filter_map(|&key| self.peers.get(key)?.ack_since).min().map(|since| since + ACK_DELAY)
    }

    /// The earliest timer: the grace window's end, an admission deadline, an accept retry,
    /// the expiry of a kept message, a position or a departed origin.
    fn next_wakeup(&self) -> Option<Instant> {
        [
            self.grace.until(),
            self.admissions.front().map(|a| a.0),
            self.accept_retry_at,
            self.history.next_expiry(),
            self.departed.next_expiry(),
            self.next_ack_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Writes the forwards, then acknowledges what was forwarded, then ends the grace window
    /// when its time is up.
    ///
    /// The peers owed no ACK are written first; a publisher's ACK then joins whatever else it
    /// gets this turn (forwards of others' messages, STAMPs), so it costs no write of its own.
    /// A publisher that gets nothing else keeps its ACK for its next write, or until the ACK
    /// has waited `ACK_DELAY` or covers `ACK_EVERY` publishes: an ACK only frees the
    /// publisher's resend queue, and one written alone wakes the worker up for nothing, once
    /// per publish at low rates (issue 15's profile of the channel hop).
    fn end_of_turn(&mut self) {
        if self.to_ack.is_empty() {
            self.flush_dirty();
        } else {
            self.flush_dirty_owed_no_ack();
            let now = Instant::now();
            for key in std::mem::take(&mut self.to_ack) {
                let Some(peer) = self.peers.get_mut(key) else { continue };
                let Some(seq) = peer.ack else { continue };
                let due = peer.ack_since.is_none_or(|since| now.saturating_duration_since(since) >= ACK_DELAY);
                if !(peer.dirty || due || peer.ack_count >= ACK_EVERY) {
                    self.to_ack.push(key);
                    continue;
                }
                (peer.ack, peer.ack_since, peer.ack_count) = (None, None, 0);
                wire::encode_ack(peer.outbuf.tail(), seq);
                if !peer.dirty {
                    peer.dirty = true;
                    self.dirty.push(key);
                }
            }
            self.flush_dirty();
        }
        if let Some(released) = self.grace.expire(Instant::now()) {
            info!("grace window over: {released} held messages released");
            for (_, peer) in self.peers.iter_mut() {
                peer.replayed = Default::default();
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            // The nonce first: drawing it may need a descriptor too, and a connection is better
            // left waiting in the backlog than accepted and closed for want of one.
            let nonce = match auth::nonce() {
                Ok(n) => n,
                Err(e) => return self.pause_accepting(&e),
            };
            match self.listener.accept() {
                Ok(stream) => {
                    if std::mem::take(&mut self.accept_paused) {
                        info!("channel accept resumed ({} peers connected)", self.peers.len());
                    }
                    self.admit(stream, nonce)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => continue,
                Err(e) => return self.pause_accepting(&e),
            }
        }
    }

    /// Accepting failed: try again on a timer, since with edge-triggered readiness what is
    /// left in the backlog raises no new event. Said once per pause, not on every retry.
    fn pause_accepting(&mut self, e: &io::Error) {
        if !self.accept_paused {
            if out_of_resources(e) {
                warn!("channel accept paused: {e} ({} peers connected)", self.peers.len());
            } else {
                warn!("channel accept failed: {e}; retrying");
            }
        }
        self.accept_paused = true;
        self.accept_retry_at = Some(Instant::now() + ACCEPT_RETRY);
    }

    /// Greets a new peer with a CHALLENGE and starts its admission deadline, or refuses it
    /// (closes it unanswered) when `channel.max_peers` are connected.
    fn admit(&mut self, mut stream: ChannelStream, nonce: [u8; wire::NONCE_LEN]) {
        if self.peers.len() >= self.max_peers {
            self.stats.rejected_connections += 1;
            if self.stats.rejected_connections.is_power_of_two() {
                warn!(
                    "channel peer refused: {} peers connected (channel.max_peers); {} refused so far",
                    self.peers.len(),
                    self.stats.rejected_connections
                );
            }
            return;
        }
        let entry = self.peers.vacant_entry();
        let key = entry.key();
        let token = Token(key + FIRST_PEER);
        // WRITABLE only while output waits (`WriteInterest`): the CHALLENGE below usually
        // goes out whole at the end of this turn.
        if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE) {
            return warn!("cannot register a channel peer: {e}");
        }
        let (flags, phase) = match self.secret {
            Some(_) => (wire::FLAG_AUTH_REQUIRED | wire::FLAG_REPUBLISH, Phase::AwaitAuth { nonce }),
            None => (wire::FLAG_REPUBLISH, Phase::AwaitHello),
        };
        let serial = self.next_serial;
        self.next_serial += 1;
        entry.insert(Peer::new(stream, phase, serial, flags, &nonce));
        self.dirty.push(key);
        self.admissions.push_back((Instant::now() + self.auth_timeout, key, serial));
    }

    /// Drops the peers whose admission deadline passed before they were introduced.
    fn expire_admissions(&mut self, now: Instant) {
        while let Some(&(deadline, key, serial)) = self.admissions.front() {
            if deadline > now {
                return;
            }
            self.admissions.pop_front();
            let Some(peer) = self.peers.get(key) else { continue };
            if peer.serial != serial || peer.phase.is_ready() {
                continue;
            }
            self.stats.handshake_timeouts += 1;
            let count = self.stats.handshake_timeouts;
            let why = format!("did not authenticate and introduce itself within {:?}", self.auth_timeout);
            self.remove_peer(key);
            if count.is_power_of_two() {
                warn!("channel peer dropped: {why} (channel.auth_timeout_ms); {count} so far");
            } else {
                debug!("channel peer dropped: {why}");
            }
        }
    }

    /// Reads peer `key` until the socket is empty or its turn's budget is spent.
    fn peer_readable(&mut self, key: usize) {
        let mut scratch = std::mem::take(&mut self.read_buf);
        let mut budget = READ_BUDGET;
        let outcome = loop {
            let Some(peer) = self.peers.get_mut(key) else { break Ok(()) };
            if budget == 0 {
                if !peer.read_again {
                    peer.read_again = true;
                    self.again.push(key);
                }
                break Ok(());
            }
            let want = scratch.len().min(budget);
            match peer.stream.read(&mut scratch[..want]) {
                Ok(0) => break Err(Cut::Closed),
                Ok(n) => {
                    budget -= n;
                    if let Err(cut) = self.take_input(key, &scratch[..n]) {
                        break Err(cut);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(Cut::Io(format!("read failed: {e}"))),
            }
        };
        self.read_buf = scratch;
        if let Err(cut) = outcome {
            self.cut_peer(key, cut);
        }
    }

    /// Handles the whole frames of `fresh` (after the unfinished frame kept from the last
    /// read, if any) and keeps what is left of an unfinished one.
    fn take_input(&mut self, key: usize, fresh: &[u8]) -> Result<(), Cut> {
        if self.peers[key].inbuf.is_empty() {
            let used = self.process(key, fresh)?;
            if let Some(peer) = self.peers.get_mut(key) {
                peer.inbuf.extend_from_slice(&fresh[used..]);
            }
        } else {
            let mut input = std::mem::take(&mut self.peers[key].inbuf);
            input.extend_from_slice(fresh);
            let used = self.process(key, &input)?;
            if let Some(peer) = self.peers.get_mut(key) {
                input.drain(..used);
                peer.inbuf = input;
            }
        }
        Ok(())
    }

    /// Handles every whole frame at the start of `input`; returns the bytes they took.
    fn process(&mut self, key: usize, input: &[u8]) -> Result<usize, Cut> {
        let mut pos = 0;
        loop {
            let limit = self.peers[key].phase.max_frame(self.max_frame);
            let (frame, used) = match wire::decode(&input[pos..], limit) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => return Ok(pos),
                Err(wire::WireError::TooLarge(len)) if !self.peers[key].phase.is_ready() => {
                    return Err(Cut::Oversized(format!(
                        "announced a frame of {len} bytes before HELLO (at most {limit} allowed then)"
                    )))
                }
                Err(wire::WireError::TooLarge(len)) => {
                    return Err(Cut::Oversized(format!("sent a frame of {len} bytes (channel.max_frame is {limit})")))
                }
                Err(e) => return Err(Cut::Violation(format!("sent a bad frame: {e}"))),
            };
            let raw = &input[pos..pos + used];
            pos += used;
            self.stats.messages_in += 1;
            match (&self.peers[key].phase, frame) {
                (Phase::AwaitAuth { nonce }, wire::Frame::Auth { nonce: peer_nonce, mac }) => {
                    let nonce = *nonce;
                    self.authenticate(key, &nonce, &peer_nonce, &mac)?;
                }
                (Phase::AwaitAuth { .. }, _) => {
                    return Err(Cut::Violation("did not authenticate (its first frame was not AUTH)".into()))
                }
                (Phase::AwaitHello, wire::Frame::Hello { version, origin, name }) => {
                    self.introduce(key, version, origin, name)?;
                }
                (Phase::AwaitHello, other) => {
                    return Err(Cut::Violation(format!("sent {} before HELLO", other.kind())))
                }
                (Phase::Ready { .. }, wire::Frame::Hello { .. }) => {
                    return Err(Cut::Violation("sent HELLO twice".into()));
                }
                (Phase::Ready { .. }, wire::Frame::Subscribe { group }) => self.subscribe(key, group),
                (Phase::Ready { .. }, wire::Frame::Resubscribe { group }) => {
                    self.subscribe(key, group);
                    // Only members the peer had before it reconnected are owed history.
                    if self.grace.is_open() {
                        self.replay_held(key, group);
                    }
                }
                (Phase::Ready { .. }, wire::Frame::Unsubscribe { group }) => {
                    if self.peers[key].groups.remove(group) {
                        self.remove_subscriber(group, key);
                    }
                }
                (&Phase::Ready { origin: own }, wire::Frame::Message { origin, seq, group, payload }) => {
                    check_origin(own, origin, seq)?;
                    let m = Publish { origin, seq, kind: wire::PayloadKind::Text, group, payload, again: false };
                    self.publish(key, &m, Some(raw));
                }
                (&Phase::Ready { origin: own }, wire::Frame::Publish { origin, seq, kind, group, payload }) => {
                    self.require_offsets(key, "PUBLISH")?;
                    check_origin(own, origin, seq)?;
                    self.publish(key, &Publish { origin, seq, kind, group, payload, again: false }, None);
                }
                (&Phase::Ready { origin: own }, wire::Frame::Republish { origin, seq, kind, group, payload }) => {
                    self.require_offsets(key, "REPUBLISH")?;
                    check_origin(own, origin, seq)?;
                    self.publish(key, &Publish { origin, seq, kind, group, payload, again: true }, None);
                }
                (Phase::Ready { .. }, wire::Frame::History { request, group, since, limit }) => {
                    self.require_offsets(key, "HISTORY")?;
                    self.answer_history(key, request, group, since, limit);
                }
                (_, other) => return Err(Cut::Violation(format!("sent a frame only the broker sends: {other:?}"))),
            }
        }
    }

    /// Checks a peer's AUTH (the only frame accepted first when a secret is configured) and
    /// proves the secret in return.
    fn authenticate(
        &mut self,
        key: usize,
        nonce: &[u8; wire::NONCE_LEN],
        peer_nonce: &[u8; wire::NONCE_LEN],
        mac: &[u8; wire::MAC_LEN],
    ) -> Result<(), Cut> {
        let secret = self.secret.as_deref().unwrap_or_default();
        if !auth::verify_peer(secret, nonce, peer_nonce, mac) {
            return Err(Cut::Violation("failed authentication (wrong shared secret)".into()));
        }
        let proof = auth::broker_proof(secret, peer_nonce, nonce);
        let peer = &mut self.peers[key];
        wire::encode_auth_ok(peer.outbuf.tail(), &proof);
        peer.phase = Phase::AwaitHello;
        self.mark_dirty(key);
        Ok(())
    }

    /// HELLO: the peer is admitted and bound to `origin`, which no other peer may hold (the
    /// older connection keeps it: a newcomer taking it over could publish as that worker).
    fn introduce(&mut self, key: usize, version: u8, origin: u64, name: &str) -> Result<(), Cut> {
        if version != wire::VERSION && version != wire::VERSION_OFFSETS {
            return Err(Cut::Violation(format!(
                "speaks channel protocol {version}, not {} or {}",
                wire::VERSION,
                wire::VERSION_OFFSETS
            )));
        }
        if let Some(holder) = self.origins.get(&origin).and_then(|&k| self.peers.get(k)) {
            return Err(Cut::Violation(format!("claims origin {origin:#x}, which peer {} holds", holder.name)));
        }
        self.origins.insert(origin, key);
        let peer = &mut self.peers[key];
        peer.name = name.to_owned();
        peer.phase = Phase::Ready { origin };
        peer.offsets = version == wire::VERSION_OFFSETS;
        peer.numbered = self.departed.take(origin);
        peer.origin_known = peer.numbered.is_some();
        info!("channel peer {name} (origin {origin:#x}, protocol {version}) connected");
        Ok(())
    }

    /// Frames of protocol 2 from a peer that introduced itself with version 1 are a violation:
    /// it could not read the answers.
    fn require_offsets(&self, key: usize, frame: &str) -> Result<(), Cut> {
        match self.peers[key].offsets {
            true => Ok(()),
            false => Err(Cut::Violation(format!("sent {frame}, which needs HELLO version {}", wire::VERSION_OFFSETS))),
        }
    }

    fn subscribe(&mut self, key: usize, group: &str) {
        if self.peers[key].groups.insert(group.into()) {
            match self.subscribers.get_mut(group) {
                Some(subs) => subs.peers.push(key),
                None => {
                    let slot = self.history.subscribed(group, self.now);
                    self.subscribers.insert(group.into(), Subscribers { peers: vec![key], slot });
                }
            }
        }
    }

    /// A publish of peer `from`: numbered in its group, forwarded to every other subscriber
    /// (MESSAGE to version-1 peers, PUBLICATION to version-2 peers, each form encoded at most
    /// once), kept in the history, stamped back to a version-2 publisher, acknowledged after
    /// the flush. A resend (seq at or below the highest numbered for its origin) is only
    /// stamped (offset 0) and acknowledged. `raw` is the MESSAGE frame when it came as one.
    ///
    /// A REPUBLISH from an origin this broker has no record of (it restarted since the peer
    /// sent it) may have been numbered and forwarded by the broker that died: it is forwarded
    /// with offset 0, for the seed-protocol members that receiving workers de-duplicate by
    /// origin and seq, and neither numbered nor kept, so a protocol-2 member never gets it a
    /// second time under the new epoch (it falls in the gap the restart announces).
    fn publish(&mut self, from: usize, m: &Publish<'_>, raw: Option<&[u8]>) {
        let peer = &mut self.peers[from];
        if peer.ack.is_none() {
            self.to_ack.push(from);
            peer.ack_since = Some(self.now);
        }
        peer.ack = Some(peer.ack.map_or(m.seq, |a| a.max(m.seq)));
        peer.ack_count = peer.ack_count.saturating_add(1);
        let resend = peer.numbered.is_some_and(|n| m.seq <= n);
        let unnumbered = !resend && m.again && !peer.origin_known;
        // One lookup of the group on this path: its subscribers carry its history slot.
        let subs = self.subscribers.get(m.group);
        let numbering = (!resend && !unnumbered).then(|| match subs {
            Some(subs) => self.history.begin_at(subs.slot),
            None => self.history.begin(m.group),
        });
        if peer.offsets {
            wire::encode_stamp(peer.outbuf.tail(), m.seq, numbering.map_or(0, |n| n.offset));
            if !peer.dirty {
                peer.dirty = true;
                self.dirty.push(from);
            }
        }
        let offset = match &numbering {
            Some(numbering) => numbering.offset,
            None if unnumbered => 0,
            None => {
                self.stats.channel_resent += 1;
                return;
            }
        };
        peer.numbered = Some(m.seq);
        match unnumbered {
            true => self.stats.channel_unnumbered += 1,
            false => self.stats.published += 1,
        }
        let mut publication: Option<Vec<u8>> = None;
        let mut message: Option<Vec<u8>> = None;
        let mut cut = Vec::new();
        if let Some(subs) = subs {
            for &to in &subs.peers {
                if to == from {
                    continue;
                }
                let Some(peer) = self.peers.get_mut(to) else { continue };
                let frame: &[u8] = match (peer.offsets, raw) {
                    (true, _) => publication.get_or_insert_with(|| m.publication(offset)),
                    (false, Some(raw)) => raw,
                    (false, None) => message.get_or_insert_with(|| m.message()),
                };
                if peer.outbuf.len() + frame.len() > self.peer_buffer_limit {
                    cut.push(to);
                    continue;
                }
                peer.outbuf.extend_from_slice(frame);
                self.stats.messages_out += 1;
                if !peer.dirty {
                    peer.dirty = true;
                    self.dirty.push(to);
                }
            }
        }
        if self.grace.is_open() {
            let frame = publication.get_or_insert_with(|| m.publication(offset));
            self.stats.channel_dropped += self.grace.hold(m.group, m.origin, frame);
        }
        if let Some(numbering) = numbering {
            let kept = self.history.keeps().then(|| {
                let frame = publication.unwrap_or_else(|| m.publication(offset));
                Kept { payload_at: frame.len() - m.payload.len(), frame, kind: m.kind }
            });
            self.history.finish(numbering, kept, self.now);
        }
        // After `finish`: dropping a peer may unsubscribe it, which touches the history.
        for to in cut {
            self.drop_peer(to, "stopped reading: its buffer passed channel.peer_buffer_limit");
        }
    }

    /// HISTORY `request` of peer `key` for `group`: the messages after `since` when they can
    /// all be given (at most `limit` and `history.max_recover`, and within
    /// `channel.peer_buffer_limit`), then the group's POSITION.
    fn answer_history(&mut self, key: usize, request: u64, group: &str, since: Option<wire::Since<'_>>, limit: u32) {
        let limit = u64::from(limit).min(self.max_recover);
        let answer = self.history.recover(group, since.map(|s| (s.epoch, s.offset)), limit, self.now);
        let Some(peer) = self.peers.get_mut(key) else { return };
        let mut recovered = answer.replay_from.is_some();
        if let Some(from) = answer.replay_from {
            let items = || self.history.kept_from(answer.slot, from);
            let bytes: usize = items().map(|(_, k)| HISTORY_ITEM_OVERHEAD + k.payload().len()).sum();
            if peer.outbuf.len() + bytes > self.peer_buffer_limit {
                warn!(
                    "channel peer {}: {bytes} bytes of history do not fit under channel.peer_buffer_limit; \
                     answered recovered=false",
                    peer.name
                );
                recovered = false;
            } else {
                for (offset, k) in items() {
                    wire::encode_history_item(peer.outbuf.tail(), request, offset, k.kind, k.payload());
                    self.stats.messages_out += 1;
                }
            }
        }
        wire::encode_position(peer.outbuf.tail(), request, answer.epoch.as_str(), answer.top, recovered);
        self.mark_dirty(key);
    }

    /// Sends the held messages of `group` (just resubscribed) to peer `key`, in arrival order,
    /// except those it published itself: once per peer and group (a repeated RESUBSCRIBE gets
    /// nothing more), and only as much as fits under `channel.peer_buffer_limit` (the rest is
    /// counted as dropped: queuing it would break the bound, cutting the peer off would only
    /// make it reconnect and ask again).
    fn replay_held(&mut self, key: usize, group: &str) {
        let Some(peer) = self.peers.get_mut(key) else { return };
        if !peer.replayed.insert(group.into()) {
            return;
        }
        let (mut replayed, mut skipped) = (0u64, 0u64);
        let mut message = Vec::new();
        for publication in self.grace.frames(group, peer.phase.origin()) {
            // Held as PUBLICATION (with the offset it got); a version-1 peer gets MESSAGE.
            let frame = match peer.offsets {
                true => publication,
                false => {
                    message.clear();
                    as_message(publication, &mut message);
                    &message
                }
            };
            // Stop at the first that does not fit: the peer gets an unbroken, oldest-first run.
            if skipped > 0 || peer.outbuf.len() + frame.len() > self.peer_buffer_limit {
                skipped += 1;
                continue;
            }
            peer.outbuf.extend_from_slice(frame);
            replayed += 1;
        }
        if skipped > 0 {
            warn!(
                "replayed {replayed} held messages of a group to {}; {skipped} more did not fit under \
                 channel.peer_buffer_limit",
                peer.name
            );
            self.stats.channel_dropped += skipped;
        } else if replayed > 0 {
            debug!("replayed {replayed} held messages to {}", peer.name);
        }
        self.stats.messages_out += replayed;
        if replayed > 0 {
            self.mark_dirty(key);
        }
    }

    fn remove_subscriber(&mut self, group: &str, key: usize) {
        if let Some(subs) = self.subscribers.get_mut(group) {
            subs.peers.retain(|&k| k != key);
            if subs.peers.is_empty() {
                self.subscribers.remove(group);
                self.history.unsubscribed(group, self.now);
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

    /// `flush_dirty` for the peers that are owed no ACK; the others stay in the dirty list.
    fn flush_dirty_owed_no_ack(&mut self) {
        let mut owed = Vec::new();
        for key in std::mem::take(&mut self.dirty) {
            match self.peers.get(key) {
                Some(peer) if peer.ack.is_some() => owed.push(key),
                _ => self.dirty.push(key),
            }
        }
        self.flush_dirty();
        self.dirty = owed;
    }

    fn flush_dirty(&mut self) {
        for key in std::mem::take(&mut self.dirty) {
            let Some(peer) = self.peers.get_mut(key) else { continue };
            peer.dirty = false;
            let token = Token(key + FIRST_PEER);
            let failed =
                peer.write_interest.flush(self.poll.registry(), &mut peer.stream, token, &mut peer.outbuf).err();
            if let Some(e) = failed {
                self.stats.send_failures += 1;
                self.drop_peer(key, &format!("write failed: {e}"));
            }
        }
    }

    /// Ends a peer's connection for `cut`, counted by kind. Peers not introduced yet are
    /// logged at powers of two only: a flood of them must not flood the log too.
    fn cut_peer(&mut self, key: usize, cut: Cut) {
        let introduced = self.peers.get(key).is_some_and(|p| p.phase.is_ready());
        let (count, why) = match cut {
            Cut::Closed => {
                if let Some(peer) = self.remove_peer(key) {
                    debug!("channel peer {} closed the connection", peer.name);
                }
                return;
            }
            Cut::Io(why) => return self.drop_peer(key, &why),
            Cut::Oversized(why) => {
                self.stats.oversized += 1;
                (self.stats.oversized, why)
            }
            Cut::Violation(why) => {
                self.stats.protocol_errors += 1;
                (self.stats.protocol_errors, why)
            }
        };
        if introduced || count.is_power_of_two() {
            self.drop_peer(key, &why);
        } else if let Some(peer) = self.remove_peer(key) {
            debug!("channel peer {} dropped: {why}", peer.name);
        }
    }

    fn drop_peer(&mut self, key: usize, why: &str) {
        if let Some(peer) = self.remove_peer(key) {
            warn!("channel peer {} dropped: {why}", peer.name);
        }
    }

    /// Forgets peer `key` (closing its socket) and its subscriptions.
    fn remove_peer(&mut self, key: usize) -> Option<Peer> {
        let mut peer = self.peers.try_remove(key)?;
        if peer.ack.is_some() {
            // A later peer may get this key: it must not inherit a place in the ACK list.
            self.to_ack.retain(|&k| k != key);
        }
        let _ = self.poll.registry().deregister(&mut peer.stream);
        if let Some(origin) = peer.phase.origin() {
            if self.origins.get(&origin) == Some(&key) {
                self.origins.remove(&origin);
                // A version-2 peer is remembered even before its first publish: its REPUBLISH
                // frames after a reconnect are numbered only by a broker that knows it.
                if let Some(seq) = peer.numbered.or(peer.offsets.then_some(0)) {
                    self.departed.put(origin, seq, self.now);
                }
            }
        }
        for group in &peer.groups {
            self.remove_subscriber(group, key);
        }
        Some(peer)
    }

    /// Answers the master; false when the master is gone.
    fn control_ready(&mut self) -> bool {
        match self.control.read_requests() {
            Ok(Some(requests)) => {
                for _ in requests {
                    let mut s = self.stats.clone();
                    s.connections = self.peers.len() as u64;
                    s.groups = self.subscribers.len() as u64;
                    s.memberships = self.subscribers.values().map(|v| v.peers.len() as u64).sum();
                    let (version, binary_mtime) = crate::control::binary_identity();
                    s.version = version;
                    s.binary_mtime = binary_mtime;
                    s.uptime_secs = self.started.elapsed().as_secs();
                    s.state = "running".into();
                    s.log_dropped = crate::logging::dropped_lines();
                    s.channel_queued = self.grace.len() as u64;
                    s.history_groups = self.history.groups() as u64;
                    s.history_messages = self.history.messages() as u64;
                    s.history_bytes = self.history.bytes() as u64;
                    let _ = self.control.send_json(&s);
                }
                true
            }
            Ok(None) | Err(_) => false,
        }
    }
}

/// The peers subscribed to a group, and the group's slot in the history: stable while the
/// group has subscribers (a position is never forgotten then), so numbering a message costs
/// no second lookup of the group.
struct Subscribers {
    peers: Vec<usize>,
    slot: usize,
}

/// Bytes of a HISTORY_ITEM frame besides its payload: length, type, request, offset, kind.
const HISTORY_ITEM_OVERHEAD: usize = wire::LEN_PREFIX + 1 + 8 + 8 + 1;

/// A peer's publish (MESSAGE, PUBLISH or REPUBLISH), as the broker forwards it.
struct Publish<'a> {
    origin: u64,
    seq: u64,
    kind: wire::PayloadKind,
    group: &'a str,
    payload: &'a [u8],
    /// Came as REPUBLISH: an earlier connection of the peer carried it.
    again: bool,
}

impl Publish<'_> {
    /// The PUBLICATION frame of this publish numbered `offset`, allocated to its exact size
    /// (it may be kept in the history as it is).
    fn publication(&self, offset: u64) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(wire::LEN_PREFIX + 1 + 8 + 8 + 8 + 1 + 2 + self.group.len() + self.payload.len());
        let m = wire::Numbered {
            origin: self.origin,
            seq: self.seq,
            offset,
            kind: self.kind,
            group: self.group,
            payload: self.payload,
        };
        wire::encode_publication(&mut out, &m);
        out
    }

    /// The MESSAGE frame of this publish, for version-1 peers (the kind is dropped).
    fn message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(wire::LEN_PREFIX + 1 + 8 + 8 + 2 + self.group.len() + self.payload.len());
        wire::encode_message(&mut out, self.origin, self.seq, self.group, self.payload);
        out
    }
}

/// Writes the MESSAGE form of the PUBLICATION frame `publication` (held by the grace window)
/// to `out`.
fn as_message(publication: &[u8], out: &mut Vec<u8>) {
    if let Ok(Some((wire::Frame::Publication { origin, seq, group, payload, .. }, _))) =
        wire::decode(publication, usize::MAX)
    {
        wire::encode_message(out, origin, seq, group, payload);
    }
}

/// Each peer publishes under the origin of its HELLO only.
fn check_origin(own: u64, origin: u64, seq: u64) -> Result<(), Cut> {
    match origin == own {
        true => Ok(()),
        false => Err(Cut::Violation(format!("published under origin {origin:#x} (seq {seq}), not its own {own:#x}"))),
    }
}
