//! The worker's end of the channel: one connection to the broker, subscriptions per group
//! with local members, publishes out, group messages in. Reconnects with back-off and
//! re-subscribes every local group after the broker comes back.
//!
//! Publishes made while the broker is unreachable are dropped and counted (`channel_dropped`
//! in status); the acknowledged resend queue is future work (see docs/channel-protocol.md).

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::{Interest, Registry, Token};

use super::{wire, ChannelStream};
use crate::config::ChannelAddr;

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Unsent bytes a worker keeps for the broker before it drops new publishes.
const OUT_LIMIT: usize = 64 << 20;

enum Link {
    /// Connect in progress (TCP) or established.
    Up { stream: ChannelStream, connected: bool },
    /// Next attempt at `retry_at`.
    Down { retry_at: Instant },
}

pub struct ChannelClient {
    addr: ChannelAddr,
    token: Token,
    /// Identifies this worker's publishes: pid in the high bits, so a respawned worker differs.
    origin: u64,
    name: String,
    link: Link,
    backoff: Duration,
    seq: u64,
    /// Received bytes not yet decoded; the worker takes them with `take_input`.
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    pub dropped: u64,
}

impl ChannelClient {
    pub fn new(addr: ChannelAddr, token: Token, origin: u64, name: String) -> ChannelClient {
        ChannelClient {
            addr,
            token,
            origin,
            name,
            link: Link::Down { retry_at: Instant::now() },
            backoff: MIN_BACKOFF,
            seq: 0,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            dropped: 0,
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.link, Link::Up { connected: true, .. })
    }

    /// When the loop must wake up to retry the connection, if it is down.
    pub fn next_retry(&self) -> Option<Instant> {
        match self.link {
            Link::Down { retry_at } => Some(retry_at),
            Link::Up { .. } => None,
        }
    }

    /// Connects if down and due; on success queues HELLO and a SUBSCRIBE per local group.
    pub fn maybe_connect<'a>(&mut self, registry: &Registry, groups: impl Iterator<Item = &'a str>) {
        let Link::Down { retry_at } = self.link else {
            return;
        };
        if Instant::now() < retry_at {
            return;
        }
        let mut stream = match ChannelStream::connect(&self.addr) {
            Ok(s) => s,
            Err(e) => return self.schedule_retry(&format!("cannot connect to channel {}: {e}", self.addr)),
        };
        if let Err(e) = registry.register(&mut stream, self.token, Interest::READABLE | Interest::WRITABLE) {
            return self.schedule_retry(&format!("cannot register channel socket: {e}"));
        }
        self.outbuf.clear();
        self.inbuf.clear();
        wire::encode_hello(&mut self.outbuf, self.origin, &self.name);
        let mut count = 0;
        for group in groups {
            wire::encode_subscribe(&mut self.outbuf, group);
            count += 1;
        }
        let connected = matches!(self.addr, ChannelAddr::Unix(_));
        self.link = Link::Up { stream, connected };
        if connected {
            self.on_connected(count);
        }
        let _ = count;
    }

    fn on_connected(&mut self, _groups: usize) {
        if self.backoff > MIN_BACKOFF {
            info!("channel {} connected again; re-subscribed local groups", self.addr);
        }
        self.backoff = MIN_BACKOFF;
    }

    fn schedule_retry(&mut self, why: &str) {
        warn!("{why}; retrying in {:?}", self.backoff);
        self.link = Link::Down { retry_at: Instant::now() + self.backoff };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.outbuf.clear();
        self.inbuf.clear();
    }

    /// Drops the connection (after an error or EOF) and schedules a reconnect.
    pub fn disconnect(&mut self, registry: &Registry, why: &str) {
        if let Link::Up { stream, .. } = &mut self.link {
            let _ = registry.deregister(stream);
        }
        self.schedule_retry(&format!("channel {} lost: {why}", self.addr));
    }

    pub fn subscribe(&mut self, group: &str) {
        if matches!(self.link, Link::Up { .. }) {
            wire::encode_subscribe(&mut self.outbuf, group);
        }
    }

    pub fn unsubscribe(&mut self, group: &str) {
        if matches!(self.link, Link::Up { .. }) {
            wire::encode_unsubscribe(&mut self.outbuf, group);
        }
    }

    /// Queues a publish; the broker forwards it to every other subscribed worker.
    pub fn publish(&mut self, group: &str, payload: &[u8]) {
        self.seq += 1;
        if !matches!(self.link, Link::Up { .. }) || self.outbuf.len() > OUT_LIMIT {
            self.dropped += 1;
            return;
        }
        wire::encode_message(&mut self.outbuf, self.origin, self.seq, group, payload);
    }

    /// Handles readiness: completes a TCP connect, reads into the input buffer.
    /// `Err` means the link failed; the caller calls `disconnect`.
    pub fn on_ready(&mut self, scratch: &mut [u8]) -> io::Result<()> {
        let Link::Up { stream, connected } = &mut self.link else {
            return Ok(());
        };
        if !*connected {
            if !stream.is_connected()? {
                return Ok(());
            }
            *connected = true;
            self.on_connected(0);
        }
        let Link::Up { stream, .. } = &mut self.link else {
            return Ok(());
        };
        loop {
            match stream.read(scratch) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed by the broker")),
                Ok(n) => self.inbuf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Hands the received bytes to the caller for decoding; give back what is left with
    /// `restore_input`.
    pub fn take_input(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.inbuf)
    }

    pub fn restore_input(&mut self, mut buf: Vec<u8>, consumed: usize) {
        buf.drain(..consumed);
        self.inbuf = buf;
    }

    /// Writes what is queued; called once at the end of each loop turn.
    pub fn flush(&mut self) -> io::Result<()> {
        let Link::Up { stream, connected: true } = &mut self.link else {
            return Ok(());
        };
        let mut written = 0;
        while written < self.outbuf.len() {
            match stream.write(&self.outbuf[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if written == self.outbuf.len() {
            self.outbuf.clear();
            if self.outbuf.capacity() > 1 << 20 {
                self.outbuf = Vec::new();
            }
        } else {
            self.outbuf.drain(..written);
        }
        Ok(())
    }
}
