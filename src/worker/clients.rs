//! The clients part of a worker: every WebSocket connection (a slab of `Conn`), the list of
//! connections to flush at the end of the loop turn, the list to read again next turn, the
//! handshake/close/drain timers, the per-connection output bound and slow-client policy, and
//! the client counters shown in `status`.
//!
//! It owns no group map and no bus: operations that touch them (a command, a departure) are
//! handed those parts in a `Parts`, so each part keeps its own state and the event loop
//! (worker/mod.rs) only wires them. Reading and commands are in input.rs, delivery and group
//! membership in delivery.rs, the bounds in limits.rs.

mod timers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::bus::Bus;
use super::conn::{AfterFlush, CommandBudget, Conn, ConnState};
use super::groups::Groups;
use super::offsets::Offsets;
use super::outqueue::Flushed;
use super::transport::Transport;
use crate::auth::Gate;
use crate::config::Limits;
use crate::control::histogram::{SEND_QUEUE_BOUNDS_BYTES, WRITE_DELAY_BOUNDS_US};
use crate::control::{ConnectionInfo, Histogram, ProcessStats};
use crate::per_ip::PerIpCounter;
use crate::tls::stream::TlsConn;

/// Connection tokens are slab keys shifted past the worker's fixed tokens.
pub const FIRST_CONN: usize = 16;
/// How long we wait for the peer's close frame after sending ours, or for our last bytes to
/// leave after answering the peer's close frame.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The other parts a client operation may touch: joining or leaving a group changes the group
/// map and the bus subscriptions, a departure deregisters the socket.
pub struct Parts<'a> {
    pub registry: &'a Registry,
    pub groups: &'a mut Groups,
    pub bus: &'a mut Bus,
    /// Protocol 2's requests and replies in flight.
    pub offsets: &'a mut Offsets,
}

/// How a stopping worker closes the connections it still holds or completes the handshake of.
#[derive(Debug, Clone, Copy)]
pub struct StopClose {
    pub code: u16,
    pub deadline: Instant,
}

pub struct Clients {
    pub(super) conns: Slab<Conn>,
    /// Connections with output queued this turn, flushed once at the end of it.
    pub(super) dirty: Vec<usize>,
    /// Connections that hit the per-turn read budget (or resumed after backpressure) and may
    /// still have data in the kernel: edge-triggered readiness will not report it again.
    pub(super) read_again: Vec<usize>,
    /// Handshake and close timeouts, on the worker clock (`clock_ms`).
    timers: timers::Timers,
    next_conn_id: u64,
    pub(super) limits: Limits,
    /// Who may connect, join and publish (`[auth]`, `[[groups]]`).
    pub(super) gate: Gate,
    /// Connections this worker may hold (`limits.connections_per_worker`).
    pub(super) max_conns: usize,
    /// This worker's column of the instance-wide per-IP counts (`limits.max_connections_per_ip`).
    per_ip: PerIpCounter,
    /// Origin of the worker clock (`clock_ms`) kept per connection.
    started: Instant,
    /// When the next idle/ping sweep over all connections is due.
    pub(super) next_sweep: Instant,
    /// Set once the worker stops: a handshake completing afterwards is closed at once.
    pub(super) stopping: Option<StopClose>,
    /// Set while this worker hands its connections over (worker/handoff): open connections
    /// are not read (their input waits, in the kernel or in `inbuf`, for whoever serves them
    /// next), handshakes still complete, keep-alive sweeps pause.
    pub(super) reads_frozen: bool,
    /// The client counters of `status` (the rest of `ProcessStats` is filled by the worker).
    pub(super) stats: ProcessStats,
    /// Worker clock (µs since `started`, at least 1) read once when the loop turn began:
    /// the stamp of frames first flushed in this turn (`OutQueue::write_observed`).
    turn_us: u64,
}

/// Connections written between two clock reads in a flush: the write time of a connection
/// is the clock read at most this many connections before it, which keeps the clock off the
/// per-delivery cost (one read per 32 socket writes or fewer) while the error stays within
/// the time of 32 writes (tens of microseconds).
const WRITES_PER_CLOCK_READ: u32 = 32;

impl Clients {
    /// `first_conn_id`: this worker's first connection id (`control::handoff::first_conn_id`:
    /// unique across the instance's workers and reloads).
    pub fn new(limits: Limits, gate: Gate, max_conns: usize, per_ip: PerIpCounter, first_conn_id: u64) -> Clients {
        Clients {
            conns: Slab::new(),
            dirty: Vec::new(),
            read_again: Vec::new(),
            timers: timers::Timers::default(),
            next_conn_id: first_conn_id,
            limits,
            gate,
            max_conns,
            per_ip,
            started: Instant::now(),
            next_sweep: Instant::now(),
            stopping: None,
            reads_frozen: false,
            stats: ProcessStats {
                publish_to_write_seconds: Histogram::new(WRITE_DELAY_BOUNDS_US),
                send_queue_bytes: Histogram::new(SEND_QUEUE_BOUNDS_BYTES),
                ..ProcessStats::default()
            },
            turn_us: 1,
        }
    }

    /// Microseconds since the worker's clock origin (at least 1: 0 means "not stamped").
    fn clock_us(&self) -> u64 {
        (self.started.elapsed().as_micros() as u64).max(1)
    }

    /// A loop turn begins (the poll returned): one clock read, the stamp of every frame this
    /// turn queues.
    pub fn begin_turn(&mut self) {
        self.turn_us = self.clock_us();
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn counters(&self) -> &ProcessStats {
        &self.stats
    }

    /// Whether a connection is still in its HTTP upgrade (a stopping worker waits for those).
    pub fn any_handshaking(&self) -> bool {
        self.conns.iter().any(|(_, c)| c.state == ConnState::Handshaking)
    }

    /// Worker clock in milliseconds, stored per connection in 4 bytes (wrapping after 49 days;
    /// only differences are used).
    pub(super) fn clock_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// The earliest timer, for the loop's sleep; or `Some(now)` when connections wait to be
    /// read again.
    pub fn next_wake(&self) -> Option<Instant> {
        if !self.read_again.is_empty() {
            return Some(Instant::now());
        }
        let elapsed = self.started.elapsed();
        // The clock read `clock_ms` would give: a timer is due once it reaches its deadline,
        // so waking at `started` + the deadline in whole milliseconds never wakes early.
        let now_ms = elapsed.as_millis() as u64;
        let timer = self
            .timers
            .next_in_ms(now_ms as u32)
            .map(|ms| self.started + Duration::from_millis(now_ms + u64::from(ms)));
        Some(timer.map_or(self.next_sweep, |t| t.min(self.next_sweep)))
    }

    /// Takes a freshly accepted connection: registered, on a handshake timer (which covers
    /// the TLS handshake too, when `tls` gives the server config of the `wss://` listener).
    /// Over the connection limit it is answered 503 and closed instead.
    pub fn accept(
        &mut self,
        registry: &Registry,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<&Arc<rustls::ServerConfig>>,
    ) {
        // TCP_NODELAY (group messages are small and latency matters more than packet count;
        // corking already batches frames per write) comes from the listener (worker/mod.rs).
        if self.conns.len() >= self.max_conns {
            self.refuse_connection(stream, peer, tls.is_some());
            return;
        }
        if let Some(cap) = self.limits.per_ip_cap(peer.ip()) {
            if !self.per_ip.admit(peer.ip(), cap) {
                self.refuse_per_ip(stream, peer, tls.is_some());
                return;
            }
        }
        let mut stream = match tls {
            None => Transport::Plain(stream),
            Some(config) => match TlsConn::new(stream, Arc::clone(config)) {
                Ok(conn) => Transport::Tls(Box::new(conn)),
                Err(e) => {
                    log::warn!("cannot start TLS with {peer}: {e}");
                    self.forget_per_ip(peer.ip());
                    return;
                }
            },
        };
        let now_ms = self.clock_ms();
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let token = Token(key + FIRST_CONN);
        if let Err(e) = registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
            log::warn!("cannot register connection from {peer}: {e}");
            self.forget_per_ip(peer.ip());
            return;
        }
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        let budget = CommandBudget::new(self.limits.commands_burst, now_ms);
        if stream.is_tls() {
            self.stats.tls_connections += 1;
        }
        entry.insert(Conn::new(stream, id, peer, now_ms, budget));
        let timeout = Duration::from_millis(self.limits.handshake_timeout_ms);
        self.timers.push(now_ms, timeout, key, id);
        debug!("connection {id} from {peer}");
    }

    /// Takes a connection handed over by the old worker (worker/handoff): registered, counted
    /// in the per-IP table (no cap: it is admitted already), held until the commit. Its
    /// memberships are restored by the caller. Returns its slab key.
    pub(super) fn adopt_handed(
        &mut self,
        registry: &Registry,
        make: impl FnOnce(u32) -> super::conn::Conn,
    ) -> std::io::Result<usize> {
        let conn = make(self.clock_ms());
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let mut conn = conn;
        registry.register(&mut conn.stream, Token(key + FIRST_CONN), Interest::READABLE | Interest::WRITABLE)?;
        if self.limits.per_ip_cap(conn.peer.ip()).is_some() {
            self.per_ip.admit(conn.peer.ip(), u64::MAX);
        }
        if conn.protocol2 {
            self.stats.protocol2_connections += 1;
        }
        self.next_conn_id = self.next_conn_id.max(conn.id.saturating_add(1));
        entry.insert(conn);
        Ok(key)
    }

    /// The old worker committed: serve these handed-over connections (slab key and id), what
    /// they sent meanwhile first. Returns how many there were.
    pub(super) fn serve_handed(&mut self, handed: impl Iterator<Item = (usize, u64)>) -> usize {
        let mut count = 0;
        for (key, id) in handed {
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == id) else { continue };
            conn.held = false;
            // Edge-triggered: input that came before registration is only found by reading.
            conn.resumed = true;
            self.read_again.push(key);
            self.mark_dirty(key);
            self.stats.handoffs_in += 1;
            count += 1;
        }
        count
    }

    /// Work done once per loop turn, after every event was handled.
    pub fn end_of_turn(&mut self, parts: &mut Parts<'_>) {
        self.flush_dirty(parts);
        self.expire_timers(parts);
        self.sweep_idle(parts);
    }

    // ---- writing and closing ---------------------------------------------------------------

    pub(super) fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    pub(super) fn flush_dirty(&mut self, parts: &mut Parts<'_>) {
        let dirty = std::mem::take(&mut self.dirty);
        self.flush_keys(&dirty, parts);
        self.give_back_dirty(dirty);
    }

    /// Returns a dirty list taken for a flush, emptied, for reuse of its allocation;
    /// connections queued again during the flush (a missed-messages report, more output
    /// after their write) stay queued.
    pub(super) fn give_back_dirty(&mut self, mut flushed: Vec<usize>) {
        flushed.clear();
        let requeued = std::mem::replace(&mut self.dirty, flushed);
        self.dirty.extend(requeued);
    }

    /// Writes the queued output of `keys`, connections taken from the dirty list (the worker
    /// flushes a long list in slices: worker/mod.rs `flush_members`).
    pub(super) fn flush_keys(&mut self, keys: &[usize], parts: &mut Parts<'_>) {
        let (turn_us, mut now_us, mut until_clock) = (self.turn_us, 0, 0);
        for &key in keys {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            if conn.held {
                // Written by whoever serves it after the hand-off (worker/handoff).
                continue;
            }
            if until_clock == 0 {
                now_us = (self.started.elapsed().as_micros() as u64).max(1);
                until_clock = WRITES_PER_CLOCK_READ;
            }
            until_clock -= 1;
            let (delays, depths) = (&mut self.stats.publish_to_write_seconds, &mut self.stats.send_queue_bytes);
            let observe = |since_us: u64, queued: usize| {
                delays.observe(now_us.saturating_sub(since_us));
                depths.observe(queued as u64);
            };
            // Then what the transport holds itself (TLS records), so "all written" means on
            // the wire, as for a plain socket.
            let result =
                conn.out.write_observed(&mut conn.stream, turn_us, observe).and_then(|flushed| match flushed {
                    Flushed::All if !conn.stream.flush_pending()? => Ok(Flushed::Blocked),
                    flushed => Ok(flushed),
                });
            if conn.paused && conn.out.bytes() <= self.limits.send_buffer_limit / 2 {
                // Drained to half the bound: read it again. Its socket may hold data that
                // edge-triggered readiness will not report a second time.
                conn.paused = false;
                conn.resumed = true;
                self.read_again.push(key);
            }
            match result {
                Ok(Flushed::All) if conn.missed > 0 && conn.state.is_open() => {
                    // Caught up after the drop policy discarded messages: say how many.
                    super::limits::report_missed(conn);
                    conn.dirty = true;
                    self.dirty.push(key);
                }
                Ok(Flushed::All) => match conn.state {
                    ConnState::Closing(AfterFlush::Drop) => self.drop_conn(key, "closed by the server", parts),
                    ConnState::Closing(AfterFlush::AwaitPeer) => {
                        let _ = conn.stream.shutdown_write();
                    }
                    _ => {}
                },
                Ok(Flushed::Blocked) => {}
                Err(e) => {
                    self.stats.send_failures += 1;
                    self.drop_conn(key, &format!("write failed: {e}"), parts);
                }
            }
        }
    }

    /// Server-initiated close with a WebSocket close code.
    pub(super) fn close_conn(&mut self, key: usize, code: u16, reason: &str) {
        self.close_conn_until(key, code, reason, Instant::now() + CLOSE_TIMEOUT);
    }

    /// Like `close_conn`, waiting for the client's close frame until `deadline`.
    pub(super) fn close_conn_until(&mut self, key: usize, code: u16, reason: &str, deadline: Instant) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        debug!("connection {}: closing with {code}: {reason}", conn.id);
        if conn.start_close(code, reason) {
            let id = conn.id;
            let now_ms = self.clock_ms();
            self.timers.push(now_ms, deadline.saturating_duration_since(Instant::now()), key, id);
            self.mark_dirty(key);
        }
    }

    /// Ends a connection once what is queued is written (an HTTP answer, the echo of the
    /// peer's close frame), or after `CLOSE_TIMEOUT` if the peer does not read it: a client
    /// with a full queue must not pin its slot and buffers forever.
    pub(super) fn close_after_flush(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        conn.state = ConnState::Closing(AfterFlush::Drop);
        let id = conn.id;
        self.timers.push(self.clock_ms(), CLOSE_TIMEOUT, key, id);
        self.mark_dirty(key);
    }

    /// Closes the connection numbered `id` (not its slab key) with `code`, as the API's
    /// `DELETE /api/connections/ID` asks; false when this worker does not hold it. A scan: the
    /// operator's request is rare, a map from ids would cost every connection memory.
    pub fn close_by_id(&mut self, id: u64, code: u16, reason: &str) -> bool {
        let Some(key) = self.conns.iter().find(|(_, c)| c.id == id).map(|(k, _)| k) else { return false };
        self.close_conn(key, code, reason);
        true
    }

    /// Closes every open connection with `code`, waiting for them until `deadline`; a
    /// handshake completing after this is closed the same way.
    pub fn close_all(&mut self, code: u16, reason: &str, deadline: Instant) {
        self.stopping = Some(StopClose { code, deadline });
        let open: Vec<usize> = self.conns.iter().filter(|(_, c)| c.state.is_open()).map(|(k, _)| k).collect();
        for key in open {
            self.close_conn_until(key, code, reason, deadline);
        }
    }

    /// Un-counts a connection from `ip` in the per-IP table. It was counted at accept exactly
    /// when a cap applied to `ip`, and the limits do not change during a worker's life.
    fn forget_per_ip(&self, ip: std::net::IpAddr) {
        if self.limits.per_ip_cap(ip).is_some() {
            self.per_ip.release(ip);
        }
    }

    /// Forgets a connection: socket closed, every group membership removed.
    pub(super) fn drop_conn(&mut self, key: usize, why: &str, parts: &mut Parts<'_>) {
        if let Some(conn) = self.remove_conn(key, parts) {
            debug!("connection {} from {} gone: {why}", conn.id, conn.peer);
        }
    }

    /// Forgets a connection handed over to the next worker (worker/handoff), which serves
    /// it now: out of the event loop before our descriptor closes (the open file lives on
    /// in the other process, and with it any epoll registration left behind), no shutdown,
    /// nothing written.
    pub(super) fn let_go(&mut self, key: usize, parts: &mut Parts<'_>) {
        if self.remove_conn(key, parts).is_some() {
            self.stats.handoffs_out += 1;
        }
    }

    /// A hand-off rolled back: every connection is read and written here again, beginning
    /// with what arrived while nothing was read. Returns how many there are.
    pub(super) fn resume_all(&mut self) -> usize {
        self.reads_frozen = false;
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for &key in &keys {
            let conn = &mut self.conns[key];
            let was_held = std::mem::replace(&mut conn.held, false);
            if conn.state.is_open() && !conn.paused {
                conn.resumed = true;
                self.read_again.push(key);
            } else if was_held && matches!(conn.state, ConnState::Closing(_)) {
                // Its close timer may have fired while it was held.
                let id = conn.id;
                self.timers.push(self.clock_ms(), CLOSE_TIMEOUT, key, id);
            }
            self.mark_dirty(key);
        }
        keys.len()
    }

    /// Takes connection `key` out of the slab, the event loop, the per-IP table and every
    /// group; the descriptor closes when the returned `Conn` drops.
    fn remove_conn(&mut self, key: usize, parts: &mut Parts<'_>) -> Option<super::conn::Conn> {
        if !self.conns.contains(key) {
            return None;
        }
        let mut conn = self.conns.remove(key);
        let _ = parts.registry.deregister(&mut conn.stream);
        self.forget_per_ip(conn.peer.ip());
        if conn.protocol2 {
            self.stats.protocol2_connections -= 1;
        }
        if conn.stream.is_tls() {
            self.stats.tls_connections -= 1;
            if conn.stream.tls_handshake_failed() {
                self.stats.tls_handshake_failures += 1;
            }
        }
        for id in conn.groups.drain(..) {
            super::delivery::leave_group(id, key, parts);
        }
        Some(conn)
    }

    fn expire_timers(&mut self, parts: &mut Parts<'_>) {
        let now_ms = self.clock_ms();
        while let Some((key, id)) = self.timers.pop_due(now_ms) {
            let Some(conn) = self.conns.get(key) else {
                continue;
            };
            if conn.id != id {
                continue;
            }
            if conn.held {
                // In a hand-off: it stays whole until the commit or the roll-back (which
                // starts its close timer again).
                continue;
            }
            match conn.state {
                ConnState::Handshaking => {
                    self.stats.handshake_timeouts += 1;
                    self.drop_conn(key, "handshake timed out", parts);
                }
                ConnState::Closing(_) => self.drop_conn(key, "close timed out", parts),
                ConnState::Open => {}
            }
        }
        self.timers.release_spare();
    }

    /// The `connections` listing of `status`.
    pub fn connection_list(&self, worker: usize, groups: &Groups) -> Vec<ConnectionInfo> {
        let pid = std::process::id();
        self.conns
            .iter()
            .map(|(_, c)| ConnectionInfo {
                id: c.id,
                worker,
                worker_pid: pid,
                peer: c.peer.to_string(),
                state: match c.state {
                    ConnState::Handshaking => "handshaking",
                    ConnState::Open => "open",
                    ConnState::Closing(_) => "closing",
                }
                .into(),
                groups: c.groups.iter().filter_map(|&g| groups.name(g).map(str::to_owned)).collect(),
                age_secs: c.opened.elapsed().as_secs(),
                bytes_in: c.bytes_in,
                bytes_out: c.out.total_written(),
                messages_in: c.messages_in,
                messages_out: c.messages_out,
                send_buffer: c.out.bytes() as u64,
                sub: c.identity().map(|i| i.sub.to_string()),
            })
            .collect()
    }
}
