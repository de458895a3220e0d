//! One client connection's state: where it is in its life (`ConnState`), the bytes of a frame
//! still arriving, the frames waiting to be written, and the groups it belongs to.
//! Buffers exist only while in use, so an idle connection costs little more than this struct.

use std::net::SocketAddr;
use std::time::Instant;

use smallvec::SmallVec;

use super::groups::GroupId;
use super::outqueue::{Chunk, OutQueue};
use super::transport::Transport;
use crate::auth::{Identity, RateOverride};
use crate::ws::frame;

/// How a connection that is closing ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFlush {
    /// Drop the socket once everything queued is written (HTTP replies, answered close frames).
    Drop,
    /// We sent a close frame: half-close, then wait for the peer's close frame, EOF or the deadline.
    AwaitPeer,
}

#[cfg(test)]
mod tests {
    use super::CommandBudget;

    #[test]
    fn budget_allows_the_burst_then_the_rate() {
        let mut b = CommandBudget::new(3, 0);
        assert!((0..3).all(|_| b.take(0, 10, 3)));
        assert!(!b.take(0, 10, 3));
        assert!(b.take(100, 10, 3), "10/s refills one token in 100 ms");
        assert!(!b.take(100, 10, 3));
    }

    /// Every connection costs at least a `Conn` in the worker's slab, idle or not: this bound
    /// guards user memory per idle connection (docs/benchmarks.md, S8: <= 0.5 KiB in all at
    /// 100,000 connections). Raise it only knowingly.
    #[test]
    fn an_idle_connection_stays_small() {
        use std::mem::size_of;
        assert_eq!(size_of::<super::OutQueue>(), 72, "frames inline in the deque's header");
        assert_eq!(size_of::<smallvec::SmallVec<[super::GroupId; 2]>>(), 24, "two groups inline, as large as a Vec");
        assert!(size_of::<super::Conn>() <= 264, "Conn grew to {} bytes", size_of::<super::Conn>());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Waiting for (the rest of) the HTTP upgrade request.
    Handshaking,
    Open,
    /// No more commands are processed; see `AfterFlush`.
    Closing(AfterFlush),
}

impl ConnState {
    /// Whether the connection takes group messages.
    pub fn is_open(self) -> bool {
        matches!(self, ConnState::Open)
    }
}

/// A message arriving in several frames.
pub struct Fragment {
    pub text: bool,
    pub data: Vec<u8>,
}

pub struct Conn {
    /// The socket, plain or TLS.
    pub stream: Transport,
    /// Unique for the worker's lifetime, unlike the slab key, which is reused: timers and
    /// logs name connections by it.
    pub id: u64,
    pub peer: SocketAddr,
    pub opened: Instant,
    pub state: ConnState,
    /// Received bytes of an incomplete handshake or frame; empty (unallocated) otherwise.
    pub inbuf: Vec<u8>,
    pub fragment: Option<Box<Fragment>>,
    pub out: OutQueue,
    /// Groups this connection joined, for leaving them all on close. Two are held inline
    /// (same 24 bytes as a `Vec`): most connections join one or two groups, and a heap list
    /// for them would cost every idle connection a 48-byte allocation (docs/benchmarks.md, S8).
    pub groups: SmallVec<[GroupId; 2]>,
    /// Already in the worker's list of connections to flush this turn.
    pub dirty: bool,
    pub bytes_in: u64,
    /// Commands received.
    pub messages_in: u64,
    /// Frames queued: deliveries and replies.
    pub messages_out: u64,
    /// Worker clock (milliseconds, wrapping) when the client last sent anything: drives pings
    /// and the idle timeout.
    pub last_seen: u32,
    /// A ping was sent and nothing came back since.
    pub ping_outstanding: bool,
    /// The client sent a command with an `id`: it wants to hear about dropped messages too.
    pub wants_replies: bool,
    /// Connected with `?protocol=2`: joins are numbered, messages come in envelopes.
    pub protocol2: bool,
    /// Group messages dropped by the `drop` slow-client policy, not yet reported.
    pub missed: u32,
    pub budget: CommandBudget,
    /// Not read while its output is over `limits.send_buffer_limit` (backpressure: what it
    /// sends would only queue more replies).
    pub paused: bool,
    /// Reading resumed after a pause: what is left in `inbuf` is processed before reading.
    pub resumed: bool,
    /// Worker clock (milliseconds, wrapping) when the frame or fragmented message still
    /// incomplete started to arrive: it must be done within `limits.message_timeout_ms`.
    pub message_since: Option<u32>,
    /// No I/O on this connection for now (worker/handoff): its state is being handed to the
    /// replacement worker (old worker, between snapshot and commit) or was just received
    /// from the old one (new worker, between prepare and commit). What arrives for it is
    /// queued, nothing is read or written.
    pub held: bool,
    /// Access-control state, boxed and absent for an anonymous connection that never used a
    /// rate rule: the common case pays 8 bytes.
    pub auth: Option<Box<ConnAuth>>,
}

/// What access control keeps per connection (docs/security.md).
#[derive(Debug, Default)]
pub struct ConnAuth {
    /// The connection token's claims; replaced by `refresh`.
    pub identity: Option<Identity>,
    /// Token buckets of `[[groups]]` rules with their own command rate, by rule index, each
    /// created the first time a command names one of the rule's groups.
    pub rule_budgets: Vec<(usize, CommandBudget)>,
}

/// Token bucket for the per-connection command rate (`limits.commands_per_second`, burst
/// `limits.commands_burst`).
#[derive(Debug, Clone, Copy)]
pub struct CommandBudget {
    tokens: f32,
    /// Worker clock (milliseconds, wrapping) of the last refill.
    at_ms: u32,
}

impl CommandBudget {
    pub fn new(burst: u32, now_ms: u32) -> CommandBudget {
        CommandBudget { tokens: burst as f32, at_ms: now_ms }
    }

    /// Tokens left and milliseconds since the last refill, at worker clock `now_ms`: the
    /// bucket in a form another worker's clock can take (worker/handoff).
    pub fn export(&self, now_ms: u32) -> (f32, u32) {
        (self.tokens, now_ms.wrapping_sub(self.at_ms))
    }

    /// The bucket `export` described, on this worker's clock.
    pub fn import(tokens: f32, since_refill_ms: u32, now_ms: u32) -> CommandBudget {
        CommandBudget {
            tokens: if tokens.is_finite() { tokens.max(0.0) } else { 0.0 },
            at_ms: now_ms.wrapping_sub(since_refill_ms),
        }
    }

    /// Takes one command's token; false when the client is over its rate.
    pub fn take(&mut self, now_ms: u32, per_second: u32, burst: u32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.at_ms);
        self.at_ms = now_ms;
        self.tokens = (self.tokens + elapsed as f32 * per_second as f32 / 1000.0).min(burst as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Conn {
    pub fn new(stream: Transport, id: u64, peer: SocketAddr, now_ms: u32, budget: CommandBudget) -> Conn {
        Conn {
            stream,
            id,
            peer,
            opened: Instant::now(),
            state: ConnState::Handshaking,
            inbuf: Vec::new(),
            fragment: None,
            out: OutQueue::default(),
            groups: SmallVec::new(),
            dirty: false,
            bytes_in: 0,
            messages_in: 0,
            messages_out: 0,
            last_seen: now_ms,
            ping_outstanding: false,
            wants_replies: false,
            protocol2: false,
            missed: 0,
            budget,
            paused: false,
            resumed: false,
            message_since: None,
            held: false,
            auth: None,
        }
    }

    /// The connection token's claims, if it presented one.
    pub fn identity(&self) -> Option<&Identity> {
        self.auth.as_ref().and_then(|a| a.identity.as_ref())
    }

    /// Attaches the connection token's claims at the upgrade. A token with its own
    /// `rate_limit: N` starts with that rate's full burst (2N), not with the `[limits]` burst
    /// the connection was accepted with: a fast publisher's first commands are not refused.
    pub fn authenticate(&mut self, identity: Identity, now_ms: u32) {
        if let RateOverride::PerSecond(n) = identity.rate {
            self.budget = CommandBudget::new(n.saturating_mul(2), now_ms);
        }
        self.auth = Some(Box::new(ConnAuth { identity: Some(identity), rule_budgets: Vec::new() }));
    }

    /// Takes one command from the bucket that governs it: none for a token with
    /// `rate_limit: false`; the token's own rate for `rate_limit: N`; else the bucket of the
    /// group's rule when it sets a rate (`rule_rate`: rule index, per second, burst); else
    /// the connection's bucket at `default` (per second, burst). `Err(rate)` when over it.
    pub fn take_command(
        &mut self,
        now_ms: u32,
        rule_rate: Option<(usize, (u32, u32))>,
        default: (u32, u32),
    ) -> Result<(), u32> {
        let (bucket, (rate, burst)) = match (self.identity().map(|i| i.rate), rule_rate) {
            (Some(RateOverride::Unlimited), _) => return Ok(()),
            (Some(RateOverride::PerSecond(n)), _) => (&mut self.budget, (n, n.saturating_mul(2))),
            (_, Some((rule, rate))) => {
                let auth = self.auth.get_or_insert_with(Box::default);
                let at = match auth.rule_budgets.iter().position(|(r, _)| *r == rule) {
                    Some(at) => at,
                    None => {
                        auth.rule_budgets.push((rule, CommandBudget::new(rate.1, now_ms)));
                        auth.rule_budgets.len() - 1
                    }
                };
                (&mut auth.rule_budgets[at].1, rate)
            }
            (_, None) => (&mut self.budget, default),
        };
        if bucket.take(now_ms, rate, burst) {
            Ok(())
        } else {
            Err(rate)
        }
    }

    /// Queues a text frame built for this connection alone.
    pub fn send_text(&mut self, payload: &[u8]) {
        self.messages_out += 1;
        self.out.push(Chunk::Owned(frame::text(payload).into_boxed_slice()));
    }

    pub fn send_raw(&mut self, bytes: Vec<u8>) {
        self.out.push(Chunk::Owned(bytes.into_boxed_slice()));
    }

    /// Starts a server-initiated close: queue the close frame, stop processing commands.
    /// Returns false if the connection was already closing.
    pub fn start_close(&mut self, code: u16, reason: &str) -> bool {
        match self.state {
            ConnState::Closing(_) => false,
            ConnState::Handshaking => {
                self.state = ConnState::Closing(AfterFlush::Drop);
                true
            }
            ConnState::Open => {
                self.send_raw(frame::close(code, reason));
                self.state = ConnState::Closing(AfterFlush::AwaitPeer);
                true
            }
        }
    }
}
