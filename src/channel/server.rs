//! The channel server (broker): accepts channel clients, records which peer subscribes to which
//! group, and forwards each MESSAGE frame, unchanged, to every subscriber of its group except
//! the peer that published it (that worker already delivered to its own members).
//!
//! Runs as a child of the master (`groupcast channel-child`), on the listener the master bound.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};

use anyhow::Context;
use log::{debug, info, warn};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use super::{wire, ChannelListener, ChannelStream};
use crate::config::Config;
use crate::control::{self, ChildLink, ProcessStats};

const LISTENER: Token = Token(0);
const CONTROL: Token = Token(1);
const SIGNALS: Token = Token(2);
const FIRST_PEER: usize = 16;
const READ_BUF: usize = 256 * 1024;

struct Peer {
    stream: ChannelStream,
    /// Name from the peer's HELLO, for logs.
    name: String,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// Groups this peer subscribed to, for cleaning `subscribers` when it goes.
    groups: HashSet<Box<str>>,
    dirty: bool,
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
    stats: ProcessStats,
    started: std::time::Instant,
}

/// Entry point of `groupcast channel-child`, exec'd by the master.
pub fn run_child() -> anyhow::Result<()> {
    let config = control::child_config()?;
    crate::logging::init(
        "channel",
        crate::config::log_level_filter(&config.log_level).unwrap_or(log::LevelFilter::Info),
    );
    if config.syslog {
        if let Err(e) = crate::logging::use_syslog(&config.syslog_socket, &config.syslog_facility) {
            warn!("{e}");
        }
    }
    let fd =
        crate::sys::adopt_inherited_fd(control::CHILD_LISTENER_FD).context("no channel listener from the master")?;
    let listener = ChannelListener::from_fd(fd, &config.channel_listen)?;
    let mut broker = Broker::new(listener, &config)?;
    info!("channel server listening on {}", config.channel_listen);
    broker.run()
}

impl Broker {
    fn new(mut listener: ChannelListener, config: &Config) -> anyhow::Result<Broker> {
        let poll = Poll::new().context("cannot create the event loop")?;
        listener.register(poll.registry(), LISTENER)?;
        let control = ChildLink::inherit(poll.registry(), CONTROL).context("no status link from the master")?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT])?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        Ok(Broker {
            poll,
            listener,
            peers: Slab::new(),
            subscribers: HashMap::new(),
            control,
            signals,
            read_buf: vec![0; READ_BUF],
            dirty: Vec::new(),
            max_frame: config.channel_max_frame,
            peer_buffer_limit: config.channel_peer_buffer_limit,
            stats: ProcessStats { role: "channel".into(), pid: std::process::id(), ..Default::default() },
            started: std::time::Instant::now(),
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(256);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
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
            self.flush_dirty();
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok(mut stream) => {
                    let entry = self.peers.vacant_entry();
                    let token = Token(entry.key() + FIRST_PEER);
                    if let Err(e) =
                        self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                    {
                        warn!("cannot register a channel peer: {e}");
                        continue;
                    }
                    entry.insert(Peer {
                        stream,
                        name: String::from("(unnamed)"),
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                        groups: HashSet::new(),
                        dirty: false,
                    });
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
            let Some(peer) = self.peers.get_mut(key) else {
                return;
            };
            match peer.stream.read(&mut self.read_buf) {
                Ok(0) => return self.drop_peer(key, "closed the connection"),
                Ok(n) => {
                    peer.inbuf.extend_from_slice(&self.read_buf[..n]);
                    if let Err(e) = self.process(key) {
                        return self.drop_peer(key, &format!("sent a bad frame: {e}"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.drop_peer(key, &format!("read failed: {e}")),
            }
        }
    }

    /// Handles every whole frame in the peer's input buffer.
    fn process(&mut self, key: usize) -> Result<(), wire::WireError> {
        let input = std::mem::take(&mut self.peers[key].inbuf);
        let mut pos = 0;
        let result = loop {
            let (frame, used) = match wire::decode(&input[pos..], self.max_frame) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let raw = &input[pos..pos + used];
            pos += used;
            self.stats.messages_in += 1;
            match frame {
                wire::Frame::Hello { version, origin, name } => {
                    if version != wire::VERSION {
                        break Err(wire::WireError::Malformed("hello (unsupported version)"));
                    }
                    let peer = &mut self.peers[key];
                    peer.name = name.to_owned();
                    info!("channel peer {name} (origin {origin:#x}) connected");
                }
                wire::Frame::Subscribe { group } => {
                    if self.peers[key].groups.insert(group.into()) {
                        self.subscribers.entry(group.into()).or_default().push(key);
                    }
                }
                wire::Frame::Unsubscribe { group } => {
                    if self.peers[key].groups.remove(group) {
                        self.remove_subscriber(group, key);
                    }
                }
                wire::Frame::Message { group, .. } => self.forward(key, group, raw),
            }
        };
        if let Some(peer) = self.peers.get_mut(key) {
            let mut rest = input;
            rest.drain(..pos);
            peer.inbuf = rest;
        }
        result
    }

    /// Queues the frame `raw` to every subscriber of `group` but its publisher.
    fn forward(&mut self, from: usize, group: &str, raw: &[u8]) {
        self.stats.published += 1;
        let Some(subs) = self.subscribers.get(group) else {
            return;
        };
        let mut cut = Vec::new();
        for &to in subs {
            if to == from {
                continue;
            }
            let Some(peer) = self.peers.get_mut(to) else {
                continue;
            };
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
            let Some(peer) = self.peers.get_mut(key) else {
                continue;
            };
            peer.dirty = false;
            let mut written = 0;
            let mut failed = None;
            while written < peer.outbuf.len() {
                match peer.stream.write(&peer.outbuf[written..]) {
                    Ok(0) => {
                        failed = Some(io::Error::from(io::ErrorKind::WriteZero));
                        break;
                    }
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            peer.outbuf.drain(..written);
            if peer.outbuf.is_empty() && peer.outbuf.capacity() > 1 << 20 {
                peer.outbuf = Vec::new();
            }
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
                    let _ = self.control.send_json(&s);
                }
                true
            }
            Ok(None) | Err(_) => false,
        }
    }
}
