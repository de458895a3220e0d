//! The bounds the clients part of a worker enforces beyond parsing: the connection cap (503),
//! the slow-client policy (close or drop), and the sweep that pings silent clients and closes
//! idle ones. Each bound has a counter in `status` (see `ProcessStats`).

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::TcpStream;

use super::clients::{Clients, Parts};
use super::conn::{Conn, ConnState};
use crate::config::SlowClient;
use crate::ws::close_code;
use crate::ws::frame::{self, Kind};
use crate::ws::handshake;

/// Longest pause between two keep-alive sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How often to sweep: a tenth of the shorter keep-alive interval, at most once a second, at
/// least every 20 ms, so pings and idle closes land within 10 % of their configured time.
fn sweep_interval(ping_ms: u64, idle_ms: u64, message_ms: u64) -> Duration {
    let shortest = if idle_ms == 0 { ping_ms } else { ping_ms.min(idle_ms) }.min(message_ms);
    Duration::from_millis(shortest / 10).clamp(Duration::from_millis(20), SWEEP_EVERY)
}

/// Tells a client that caught up how many group messages the drop policy discarded
/// (`{"event":"missed","count":N}`), if it asked for replies; resets the count either way.
pub(super) fn report_missed(conn: &mut Conn) {
    if conn.wants_replies {
        let note = format!("{{\"event\":\"missed\",\"count\":{}}}", conn.missed);
        conn.send_text(note.as_bytes());
    }
    conn.missed = 0;
}

impl Clients {
    /// Applies `limits.slow_client` to a connection whose send buffer passed the bound.
    pub(super) fn apply_slow_client_policy(&mut self, key: usize) {
        let limit = self.limits.send_buffer_limit;
        let Some(conn) = self.conns.get_mut(key) else { return };
        match self.limits.slow_client {
            SlowClient::Drop => {
                let dropped = conn.out.drop_oldest_shared(limit);
                conn.missed = conn.missed.saturating_add(dropped as u32);
                self.stats.slow_dropped += dropped as u64;
            }
            SlowClient::Close => {
                // A reader that does not keep up is cut off rather than allowed to grow.
                warn!(
                    "connection {} from {} is too slow ({} bytes queued); closing it",
                    conn.id,
                    conn.peer,
                    conn.out.bytes()
                );
                self.stats.slow_closed += 1;
                conn.out.discard_unsent();
                self.close_conn(key, close_code::POLICY_VIOLATION, "send buffer full: client too slow");
            }
        }
    }

    /// Backpressure: a connection whose output (replies, errors, pongs: what its own input
    /// produced) is over `limits.send_buffer_limit` is not read until it drained to half of
    /// it. Returns whether it was paused.
    pub(super) fn pause_if_backed_up(&mut self, key: usize) -> bool {
        let Some(conn) = self.conns.get_mut(key) else { return false };
        if conn.out.bytes() <= self.limits.send_buffer_limit || !conn.state.is_open() {
            return false;
        }
        if !conn.paused {
            conn.paused = true;
            self.stats.backpressure_pauses += 1;
            debug!("connection {}: {} bytes queued, not reading it until they drain", conn.id, conn.out.bytes());
        }
        true
    }

    /// Answers a connection over the limit with 503 and closes it, without registering it.
    /// A TLS connection is closed without an answer: plaintext would not reach its client.
    pub(super) fn refuse_connection(&mut self, mut stream: TcpStream, peer: SocketAddr, tls: bool) {
        self.stats.rejected_connections += 1;
        if self.stats.rejected_connections.is_power_of_two() {
            warn!(
                "connection limit of {} reached: refusing {peer} ({} refused so far)",
                self.max_conns, self.stats.rejected_connections
            );
        }
        // Best effort: a fresh socket's send buffer takes these few bytes at once.
        if !tls {
            let _ = stream.write(&handshake::service_unavailable());
        }
    }

    /// Answers a connection whose address holds `limits.max_connections_per_ip` already with
    /// 503 and closes it, without registering it.
    /// A `wss://` connection is closed unanswered: an HTTP answer cannot precede the TLS
    /// handshake, and refusing before it spares the handshake's cost.
    pub(super) fn refuse_per_ip(&mut self, mut stream: TcpStream, peer: SocketAddr, tls: bool) {
        self.stats.per_ip_refused += 1;
        debug!("refusing {peer}: it holds limits.max_connections_per_ip = {}", self.limits.max_connections_per_ip);
        if !tls {
            let _ = stream.write(&handshake::too_many_from_address());
        }
    }

    /// Every `sweep_interval`: ping clients silent for `ping_interval_ms`, close those silent
    /// for `idle_timeout_ms` (dead peers that never closed their TCP connection), and those
    /// that started a frame or message more than `message_timeout_ms` ago without finishing
    /// it (any byte resets idleness, so trickling would pin a partial message forever).
    pub(super) fn sweep_idle(&mut self, parts: &mut Parts<'_>) {
        let now = Instant::now();
        // A hand-off in progress: nothing is read, so silence means nothing (worker/handoff).
        if now < self.next_sweep || self.reads_frozen {
            return;
        }
        let limits = &self.limits;
        self.next_sweep =
            now + sweep_interval(limits.ping_interval_ms, limits.idle_timeout_ms, limits.message_timeout_ms);
        let clock = self.clock_ms();
        let ping_after = limits.ping_interval_ms.min(u64::from(u32::MAX)) as u32;
        let idle_after = match limits.idle_timeout_ms {
            0 => u32::MAX,
            ms => ms.min(u64::from(u32::MAX)) as u32,
        };
        let message_after = limits.message_timeout_ms.min(u64::from(u32::MAX)) as u32;
        let mut idle = Vec::new();
        let mut stalled = Vec::new();
        let mut expired = Vec::new();
        // Token expiry is in Unix seconds, as `exp` is; `leeway_secs` as at the handshake.
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(self.gate.settings().leeway_secs);
        for (key, conn) in self.conns.iter_mut() {
            if conn.state != ConnState::Open || conn.held {
                continue;
            }
            if conn.identity().and_then(|i| i.exp).is_some_and(|exp| exp < now_unix) {
                expired.push(key);
                continue;
            }
            let silent = clock.wrapping_sub(conn.last_seen);
            // A paused connection's input waits for us, not for the client.
            let stalled_since = conn.message_since.filter(|_| !conn.paused);
            if stalled_since.is_some_and(|since| clock.wrapping_sub(since) >= message_after) {
                stalled.push(key);
            } else if silent >= idle_after {
                idle.push(key);
            } else if silent >= ping_after && !conn.ping_outstanding {
                let mut ping = Vec::with_capacity(2);
                frame::encode(&mut ping, Kind::Ping, b"");
                conn.send_raw(ping);
                conn.ping_outstanding = true;
                self.stats.pings_sent += 1;
                if !conn.dirty {
                    conn.dirty = true;
                    self.dirty.push(key);
                }
            }
        }
        for key in stalled {
            self.stats.message_timeouts += 1;
            self.close_conn(key, close_code::POLICY_VIOLATION, "message not completed in time");
        }
        for key in expired {
            self.stats.expired_tokens += 1;
            self.close_conn(key, close_code::TOKEN_EXPIRED, "token expired");
        }
        for key in idle {
            self.stats.idle_timeouts += 1;
            self.close_conn(key, close_code::GOING_AWAY, "idle timeout");
        }
        if !self.dirty.is_empty() {
            self.flush_dirty(parts);
        }
    }
}
