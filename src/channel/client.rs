//! The worker's end of the channel: one connection to the broker, subscriptions per group
//! with local members, publishes out, group messages in.
//!
//! Connection life: connect → wait for the broker's CHALLENGE → (AUTH → wait for AUTH_OK, when
//! a secret is configured) → HELLO, one SUBSCRIBE per local group, every unacknowledged
//! publish again → ready. Lost connections are retried with back-off (50 ms doubling to 2 s).
//!
//! Exactly once across broker restarts, within bounds: every publish stays in a queue until
//! the broker acknowledges it (ACK carries the highest seq it has forwarded), bounded by
//! `channel.queue_max_messages` and `channel.queue_max_bytes` (oldest dropped first, counted,
//! logged); after a reconnect the queue is sent again; receivers drop what they have already
//! seen from an origin (`super::dedupe::Dedupe`, owned by the worker's bus), so a resend never
//! becomes a duplicate.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::{Interest, Registry, Token};

use super::{auth, wire, ChannelStream};
use crate::config::ChannelAddr;

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where the connection is.
enum Phase {
    /// TCP connect in progress.
    Connecting,
    /// Connected; the broker's CHALLENGE has not arrived yet.
    AwaitChallenge,
    /// AUTH sent; waiting for the broker's proof.
    AwaitAuthOk {
        peer_nonce: [u8; wire::NONCE_LEN],
        broker_nonce: [u8; wire::NONCE_LEN],
    },
    Ready,
}

enum Link {
    Up {
        stream: ChannelStream,
        phase: Phase,
    },
    /// Next attempt at `retry_at`.
    Down {
        retry_at: Instant,
    },
}

/// Settings of the channel client, from the config.
#[derive(Clone)]
pub struct ClientSettings {
    pub addr: ChannelAddr,
    pub secret: Option<Vec<u8>>,
    pub queue_max_messages: usize,
    pub queue_max_bytes: usize,
}

pub struct ChannelClient {
    settings: ClientSettings,
    token: Token,
    /// Identifies this worker's publishes: pid in the high bits, so a respawned worker differs.
    origin: u64,
    name: String,
    link: Link,
    backoff: Duration,
    seq: u64,
    /// Publishes the broker has not acknowledged yet, oldest first.
    unacked: VecDeque<(u64, Vec<u8>)>,
    unacked_bytes: usize,
    /// Received bytes not yet decoded; the worker takes them with `take_input`.
    inbuf: Vec<u8>,
    outbuf: crate::sendbuf::SendBuf,
    /// Publishes dropped because the queue bound was reached.
    pub dropped: u64,
    /// Publishes sent again after a reconnect.
    pub resent: u64,
    pub reconnects: u64,
    /// The broker let more than `queue_max_bytes` pile up unread; the link must be dropped.
    stalled: bool,
}

impl ChannelClient {
    pub fn new(settings: ClientSettings, token: Token, origin: u64, name: String) -> ChannelClient {
        ChannelClient {
            settings,
            token,
            origin,
            name,
            link: Link::Down { retry_at: Instant::now() },
            backoff: MIN_BACKOFF,
            seq: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            inbuf: Vec::new(),
            outbuf: Default::default(),
            dropped: 0,
            resent: 0,
            reconnects: 0,
            stalled: false,
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.link, Link::Up { phase: Phase::Ready, .. })
    }

    fn is_ready(&self) -> bool {
        self.is_connected()
    }

    /// Publishes waiting for the broker's acknowledgement.
    pub fn queued(&self) -> usize {
        self.unacked.len()
    }

    /// When the loop must wake up to retry the connection, if it is down.
    pub fn next_retry(&self) -> Option<Instant> {
        match self.link {
            Link::Down { retry_at } => Some(retry_at),
            Link::Up { .. } => None,
        }
    }

    /// Connects if down and due.
    pub fn maybe_connect(&mut self, registry: &Registry) {
        let Link::Down { retry_at } = self.link else { return };
        if Instant::now() < retry_at {
            return;
        }
        let mut stream = match ChannelStream::connect(&self.settings.addr) {
            Ok(s) => s,
            Err(e) => return self.schedule_retry(&format!("cannot connect to channel {}: {e}", self.settings.addr)),
        };
        if let Err(e) = registry.register(&mut stream, self.token, Interest::READABLE | Interest::WRITABLE) {
            return self.schedule_retry(&format!("cannot register channel socket: {e}"));
        }
        self.outbuf.clear();
        self.inbuf.clear();
        let phase = match self.settings.addr {
            ChannelAddr::Unix(_) => Phase::AwaitChallenge,
            ChannelAddr::Tcp(_) => Phase::Connecting,
        };
        self.link = Link::Up { stream, phase };
    }

    fn schedule_retry(&mut self, why: &str) {
        warn!("{why}; retrying in {:?} ({} publishes queued)", self.backoff, self.unacked.len());
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
        self.reconnects += 1;
        self.schedule_retry(&format!("channel {} lost: {why}", self.settings.addr));
    }

    pub fn subscribe(&mut self, group: &str) {
        if self.is_ready() {
            wire::encode_subscribe(self.outbuf.tail(), group);
        }
    }

    pub fn unsubscribe(&mut self, group: &str) {
        if self.is_ready() {
            wire::encode_unsubscribe(self.outbuf.tail(), group);
        }
    }

    /// Queues a publish until the broker acknowledges it; sends it now if connected.
    pub fn publish(&mut self, group: &str, payload: &[u8]) {
        self.seq += 1;
        let mut frame = Vec::with_capacity(32 + group.len() + payload.len());
        wire::encode_message(&mut frame, self.origin, self.seq, group, payload);
        if self.is_ready() {
            self.outbuf.extend_from_slice(&frame);
        }
        self.unacked_bytes += frame.len();
        if self.outbuf.len() > self.settings.queue_max_bytes {
            // The broker stopped reading: cut it off at the same bound as the queue (`flush`
            // reports it); the queue is sent again on the next connection.
            self.outbuf.clear();
            self.stalled = true;
        }
        self.unacked.push_back((self.seq, frame));
        while self.unacked.len() > self.settings.queue_max_messages
            || self.unacked_bytes > self.settings.queue_max_bytes
        {
            let Some((_, old)) = self.unacked.pop_front() else { break };
            self.unacked_bytes -= old.len();
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                warn!(
                    "channel publish queue full ({} messages, {} bytes): dropped the oldest; {} dropped so far",
                    self.unacked.len(),
                    self.unacked_bytes,
                    self.dropped
                );
            }
        }
    }

    /// Handles readiness: completes a TCP connect, reads into the input buffer.
    /// `Err` means the link failed; the caller calls `disconnect`.
    pub fn on_ready(&mut self, scratch: &mut [u8]) -> io::Result<()> {
        let Link::Up { stream, phase } = &mut self.link else { return Ok(()) };
        if let Phase::Connecting = phase {
            if !stream.is_connected()? {
                return Ok(());
            }
            *phase = Phase::AwaitChallenge;
        }
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

    /// Handles a frame that is not a group message. `groups` are the local groups, for
    /// subscribing once the connection is ready. `Err`: drop the connection, with the reason.
    pub fn on_control<'a>(
        &mut self,
        frame: &wire::Frame<'_>,
        groups: impl Iterator<Item = &'a str>,
    ) -> Result<(), String> {
        let Link::Up { phase, .. } = &mut self.link else { return Ok(()) };
        match (frame, &*phase) {
            (wire::Frame::Challenge { version, flags, nonce }, Phase::AwaitChallenge) => {
                if *version != wire::VERSION {
                    return Err(format!("broker speaks channel protocol {version}, this worker {}", wire::VERSION));
                }
                let required = flags & wire::FLAG_AUTH_REQUIRED != 0;
                match (&self.settings.secret, required) {
                    (Some(secret), true) => {
                        let peer_nonce = auth::nonce().map_err(|e| format!("no random nonce: {e}"))?;
                        let proof = auth::peer_proof(secret, nonce, &peer_nonce);
                        wire::encode_auth(self.outbuf.tail(), &peer_nonce, &proof);
                        *phase = Phase::AwaitAuthOk { peer_nonce, broker_nonce: *nonce };
                    }
                    (None, false) => self.become_ready(groups),
                    (None, true) => {
                        return Err("the broker requires a shared secret; set [channel] secret_file".into());
                    }
                    (Some(_), false) => {
                        return Err("the broker does not authenticate, but a secret is configured: refusing it".into());
                    }
                }
                Ok(())
            }
            (wire::Frame::AuthOk { mac }, Phase::AwaitAuthOk { peer_nonce, broker_nonce }) => {
                let secret = self.settings.secret.as_deref().unwrap_or_default();
                if !auth::verify_broker(secret, peer_nonce, broker_nonce, mac) {
                    return Err("the broker failed to prove the shared secret".into());
                }
                self.become_ready(groups);
                Ok(())
            }
            (wire::Frame::Ack { seq }, Phase::Ready) => {
                while self.unacked.front().is_some_and(|(s, _)| s <= seq) {
                    if let Some((_, frame)) = self.unacked.pop_front() {
                        self.unacked_bytes -= frame.len();
                    }
                }
                Ok(())
            }
            (other, _) => Err(format!("unexpected frame from the broker: {other:?}")),
        }
    }

    /// Authenticated (or no authentication needed): introduce ourselves, subscribe every local
    /// group, and send again every publish the broker has not acknowledged.
    fn become_ready<'a>(&mut self, groups: impl Iterator<Item = &'a str>) {
        wire::encode_hello(self.outbuf.tail(), self.origin, &self.name);
        for group in groups {
            wire::encode_resubscribe(self.outbuf.tail(), group);
        }
        for (_, frame) in &self.unacked {
            self.outbuf.extend_from_slice(frame);
        }
        if self.reconnects > 0 {
            info!(
                "channel {} connected again; re-subscribed, {} unacknowledged publishes sent again",
                self.settings.addr,
                self.unacked.len()
            );
            self.resent += self.unacked.len() as u64;
        }
        self.backoff = MIN_BACKOFF;
        if let Link::Up { phase, .. } = &mut self.link {
            *phase = Phase::Ready;
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
        if std::mem::take(&mut self.stalled) {
            return Err(io::Error::other(format!(
                "the broker stopped reading ({} bytes unsent, channel.queue_max_bytes)",
                self.settings.queue_max_bytes
            )));
        }
        let Link::Up { stream, phase } = &mut self.link else { return Ok(()) };
        if matches!(phase, Phase::Connecting) {
            return Ok(());
        }
        self.outbuf.write_to(stream)
    }
}
