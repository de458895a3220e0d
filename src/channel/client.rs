//! The worker's end of the channel: one connection to the broker, subscriptions per group
//! with local members, publishes out, group messages in.
//!
//! Connection life: connect → the handshake (`handshake.rs`: CHALLENGE, and AUTH / AUTH_OK
//! when a secret is configured; within `channel.auth_timeout_ms`, nothing delivered before it
//! is done) → HELLO, every unacknowledged publish again → ready; then the worker sends one
//! RESUBSCRIBE per local group and asks again what protocol 2 was waiting for. Lost connections are retried with back-off (50 ms doubling to 2 s).
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
use mio::{Registry, Token};

use super::handshake::Handshake;
use super::publisher::Publisher;
use super::{wire, ChannelStream, WriteInterest};
use crate::config::ChannelAddr;

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Longest handshake deadline honoured, whatever the configuration says.
const MAX_AUTH_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Where the connection is.
enum Phase {
    /// TCP connect in progress.
    Connecting,
    /// Connected; CHALLENGE / AUTH / AUTH_OK under way. Nothing from the broker is delivered
    /// in this phase: a MESSAGE here is a protocol violation.
    Handshake(Handshake),
    Ready,
}

enum Link {
    Up {
        stream: ChannelStream,
        /// WRITABLE while connecting and while output waits, not otherwise.
        write_interest: WriteInterest,
        phase: Phase,
        /// The handshake must be done by then (`channel.auth_timeout_ms` from the connect),
        /// or the link is dropped: a silent broker must not hold the worker forever.
        handshake_deadline: Instant,
    },
    /// Next attempt at `retry_at`.
    Down { retry_at: Instant },
}

/// Settings of the channel client, from the config.
#[derive(Clone)]
pub struct ClientSettings {
    pub addr: ChannelAddr,
    pub secret: Option<Vec<u8>>,
    pub queue_max_messages: usize,
    pub queue_max_bytes: usize,
    /// Time from connecting to a finished handshake (`channel.auth_timeout_ms`).
    pub auth_timeout: Duration,
}

pub struct ChannelClient {
    settings: ClientSettings,
    token: Token,
    /// Numbers and encodes this worker's publishes under its random origin.
    publisher: Publisher,
    name: String,
    link: Link,
    backoff: Duration,
    /// Publishes the broker has not acknowledged yet, oldest first.
    unacked: VecDeque<(u64, Vec<u8>)>,
    unacked_bytes: usize,
    /// The highest seq whose frame a connection's socket took whole: those up to it may have
    /// been numbered by the broker of that connection, so after a reconnect they go out as
    /// REPUBLISH, not PUBLISH (docs/channel-protocol.md "Resends"). A frame the socket never
    /// took (the broker was gone already) cannot have been numbered: it goes as PUBLISH.
    written_up_to: u64,
    /// Publishes in `outbuf`: where each frame ends in this connection's byte stream, and its
    /// seq; `written_up_to` moves as the socket takes them.
    unwritten: VecDeque<(u64, u64)>,
    /// Bytes this connection's socket has taken.
    written_bytes: u64,
    /// The broker of this connection understands REPUBLISH (its CHALLENGE said so).
    broker_republish: bool,
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
    /// The link became ready since the worker last asked (`take_link_up`): history requests
    /// sent before are lost and must be asked again.
    link_up: bool,
}

impl ChannelClient {
    pub fn new(settings: ClientSettings, token: Token, origin: u64, name: String) -> ChannelClient {
        ChannelClient {
            settings,
            token,
            publisher: Publisher::new(origin),
            name,
            link: Link::Down { retry_at: Instant::now() },
            backoff: MIN_BACKOFF,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            written_up_to: 0,
            unwritten: VecDeque::new(),
            written_bytes: 0,
            broker_republish: false,
            inbuf: Vec::new(),
            outbuf: Default::default(),
            dropped: 0,
            resent: 0,
            reconnects: 0,
            stalled: false,
            link_up: false,
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

    /// When the loop must wake up for the link: to retry the connection if it is down, to give
    /// up on a handshake that takes too long.
    pub fn next_wake(&self) -> Option<Instant> {
        match self.link {
            Link::Down { retry_at } => Some(retry_at),
            Link::Up { phase: Phase::Ready, .. } => None,
            Link::Up { handshake_deadline, .. } => Some(handshake_deadline),
        }
    }

    /// Connects if down and due; drops a link whose handshake is overdue.
    pub fn maybe_connect(&mut self, registry: &Registry) {
        if let Link::Up { phase, handshake_deadline, .. } = &self.link {
            if !matches!(phase, Phase::Ready) && Instant::now() >= *handshake_deadline {
                let why =
                    format!("no finished handshake within {:?} (channel.auth_timeout_ms)", self.settings.auth_timeout);
                self.disconnect(registry, &why);
            }
        }
        let Link::Down { retry_at } = self.link else { return };
        if Instant::now() < retry_at {
            return;
        }
        let mut stream = match ChannelStream::connect(&self.settings.addr) {
            Ok(s) => s,
            Err(e) => return self.schedule_retry(&format!("cannot connect to channel {}: {e}", self.settings.addr)),
        };
        let write_interest = WriteInterest::connecting();
        if let Err(e) = registry.register(&mut stream, self.token, write_interest.interest()) {
            return self.schedule_retry(&format!("cannot register channel socket: {e}"));
        }
        self.outbuf.clear();
        self.inbuf.clear();
        self.forget_unwritten();
        let phase = match self.settings.addr {
            ChannelAddr::Unix(_) => Phase::Handshake(Handshake::AwaitChallenge),
            ChannelAddr::Tcp(_) => Phase::Connecting,
        };
        // Capped so that no configured value can overflow the clock arithmetic.
        let handshake_deadline = Instant::now() + self.settings.auth_timeout.min(MAX_AUTH_TIMEOUT);
        self.link = Link::Up { stream, write_interest, phase, handshake_deadline };
    }

    fn schedule_retry(&mut self, why: &str) {
        warn!("{why}; retrying in {:?} ({} publishes queued)", self.backoff, self.unacked.len());
        self.link = Link::Down { retry_at: Instant::now() + self.backoff };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.outbuf.clear();
        self.inbuf.clear();
        self.forget_unwritten();
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

    /// Asks the broker for `group`'s position and the messages after `since`; dropped when
    /// the link is not ready (the worker asks again at `take_link_up`).
    pub fn request_history(&mut self, request: u64, group: &str, since: Option<wire::Since<'_>>, limit: u32) {
        if self.is_ready() {
            wire::encode_history(self.outbuf.tail(), request, group, since, limit);
        }
    }

    /// Whether the link became ready since the last call.
    pub fn take_link_up(&mut self) -> bool {
        std::mem::take(&mut self.link_up)
    }

    /// Queues a publish until the broker acknowledges it; sends it now if connected.
    /// Returns its sequence number (the broker's STAMP for it carries the same).
    pub fn publish(&mut self, group: &str, kind: wire::PayloadKind, payload: &[u8]) -> u64 {
        let (seq, frame) = self.publisher.publish_frame(group, kind, payload);
        if self.is_ready() {
            self.outbuf.extend_from_slice(&frame);
            self.mark_unwritten(seq);
        }
        self.unacked_bytes += frame.len();
        if self.outbuf.len() > self.settings.queue_max_bytes {
            // The broker stopped reading: cut it off at the same bound as the queue (`flush`
            // reports it); the queue is sent again on the next connection.
            self.outbuf.clear();
            self.forget_unwritten();
            self.stalled = true;
        }
        self.unacked.push_back((seq, frame));
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
        seq
    }

    /// Handles readiness: completes a TCP connect, reads into the input buffer.
    /// `Err` means the link failed; the caller calls `disconnect`.
    pub fn on_ready(&mut self, scratch: &mut [u8]) -> io::Result<()> {
        let Link::Up { stream, phase, .. } = &mut self.link else { return Ok(()) };
        if let Phase::Connecting = phase {
            if !stream.is_connected()? {
                return Ok(());
            }
            *phase = Phase::Handshake(Handshake::AwaitChallenge);
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

    /// Whether a MESSAGE from the broker may be delivered now: only once the handshake is
    /// done. `Err`: drop the connection, with the reason (a fake broker at the configured
    /// address must not inject into groups).
    pub fn accept_message(&self) -> Result<(), String> {
        match &self.link {
            Link::Up { phase: Phase::Ready, .. } => Ok(()),
            _ => Err("MESSAGE from the broker before the handshake finished: protocol violation".into()),
        }
    }

    /// Handles a frame that is not a group message. Once the connection is ready the worker
    /// learns it from `take_link_up` and subscribes its groups again (`resubscribe`).
    /// `Err`: drop the connection, with the reason.
    pub fn on_control(&mut self, frame: &wire::Frame<'_>) -> Result<(), String> {
        let Link::Up { phase, .. } = &mut self.link else { return Ok(()) };
        match (frame, phase) {
            (frame, Phase::Handshake(handshake)) => {
                if let wire::Frame::Challenge { flags, .. } = frame {
                    self.broker_republish = flags & wire::FLAG_REPUBLISH != 0;
                }
                let secret = self.settings.secret.as_deref();
                if handshake.on_frame(secret, frame, self.outbuf.tail()).map_err(|e| e.to_string())? {
                    self.become_ready();
                }
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
            (other, _) => Err(format!("unexpected {} frame from the broker", other.kind())),
        }
    }

    /// Subscribes again, after a reconnect, to the groups the worker has members in.
    pub fn resubscribe<'a>(&mut self, groups: impl Iterator<Item = &'a str>) {
        if self.is_ready() {
            for group in groups {
                wire::encode_resubscribe(self.outbuf.tail(), group);
            }
        }
    }

    /// Authenticated (or no authentication needed): introduce ourselves and send again every
    /// publish the broker has not acknowledged; the worker subscribes its groups again when
    /// it sees `take_link_up`.
    ///
    /// A publish an earlier connection's socket took goes as REPUBLISH when the broker knows
    /// that frame: if that broker died after numbering and forwarding it, a restarted one must
    /// not number it again (protocol-2 members would get it twice, once in each epoch). One no
    /// socket took goes as PUBLISH: no broker can have read it.
    fn become_ready(&mut self) {
        wire::encode_hello(self.outbuf.tail(), wire::VERSION_OFFSETS, self.publisher.origin(), &self.name);
        for i in 0..self.unacked.len() {
            let (seq, frame) = &self.unacked[i];
            let seq = *seq;
            if self.broker_republish && seq <= self.written_up_to {
                wire::as_republish(frame, self.outbuf.tail());
            } else {
                self.outbuf.extend_from_slice(frame);
            }
            self.mark_unwritten(seq);
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
        self.link_up = true;
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
    pub fn flush(&mut self, registry: &Registry) -> io::Result<()> {
        if std::mem::take(&mut self.stalled) {
            return Err(io::Error::other(format!(
                "the broker stopped reading ({} bytes unsent, channel.queue_max_bytes)",
                self.settings.queue_max_bytes
            )));
        }
        let Link::Up { stream, phase, write_interest, .. } = &mut self.link else { return Ok(()) };
        if matches!(phase, Phase::Connecting) {
            return Ok(());
        }
        let before = self.outbuf.len();
        let result = write_interest.flush(registry, stream, self.token, &mut self.outbuf);
        self.written_bytes += before.saturating_sub(self.outbuf.len()) as u64;
        while let Some(&(end, seq)) = self.unwritten.front() {
            if end > self.written_bytes {
                break;
            }
            self.written_up_to = self.written_up_to.max(seq);
            self.unwritten.pop_front();
        }
        result
    }

    /// The publish `seq` was just appended to `outbuf`.
    fn mark_unwritten(&mut self, seq: u64) {
        let end = self.written_bytes + self.outbuf.len() as u64;
        self.unwritten.push_back((end, seq));
    }

    /// `outbuf` was emptied unwritten: what it held was never taken by a socket.
    fn forget_unwritten(&mut self) {
        self.unwritten.clear();
        self.written_bytes = 0;
    }
}
