//! A worker process: one mio event loop that accepts on the listener the master bound for it,
//! speaks WebSocket to its clients, keeps the local group map, and exchanges group messages
//! with the other workers through its channel client.
//!
//! The delivery path is a straight line: a client's `send_to_group` is delivered at once to
//! local members and published to the broker, which skips this worker when forwarding; a
//! message from the broker is encoded as a WebSocket frame once and the same bytes queued to
//! every local member. Every connection touched in a loop turn is flushed once, at the end of
//! the turn, with one writev (corking).

mod bus;
pub mod conn;
mod delivery;
pub mod groups;
mod lifecycle;
mod limits;
pub mod outqueue;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use anyhow::Context;
use log::{debug, info, trace, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::config::Config;
use crate::control::{self, ChildLink, ProcessStats};
use crate::protocol::{self, Command, RequestError};
use crate::ws::close_code;
use crate::ws::frame::{self, Frame, Kind};
use crate::ws::handshake::{self, Handshake};
use conn::{AfterFlush, CommandBudget, Conn, ConnState, Fragment};
use groups::Groups;
use outqueue::Flushed;

const LISTENER: Token = Token(0);
// Token(1) is the bus's (`bus::TOKEN`).
const CONTROL: Token = Token(2);
const SIGNALS: Token = Token(3);
/// Connection tokens are slab keys shifted past the fixed tokens above.
const FIRST_CONN: usize = 16;

/// Size of the worker-wide read buffer every connection reads into.
const READ_BUF: usize = 64 * 1024;
/// Reads per connection per readiness event before others get a turn.
const READS_PER_TURN: usize = 16;
/// How long we wait for the peer's close frame after sending ours.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest sleep of the loop, so timers are checked at least this often.
const MAX_WAIT: Duration = Duration::from_millis(500);

/// Whether the connection survives what just happened.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Stop reading this connection; it is closing or gone.
    Stop,
}

pub struct Worker {
    index: usize,
    config: Config,
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    groups: Groups,
    bus: bus::Bus,
    control: ChildLink,
    signals: Signals,
    /// Shared by every connection: data is copied to a connection's own buffer only when a
    /// frame is incomplete.
    read_buf: Vec<u8>,
    /// Connections with output queued this turn, flushed once at the end of it.
    dirty: Vec<usize>,
    /// Connections that hit the per-turn read budget and still have data.
    read_again: Vec<usize>,
    /// (deadline, slab key, connection id): handshake and close timeouts.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_conn_id: u64,
    /// Retry accepting after running out of descriptors.
    accept_paused_until: Option<Instant>,
    stats: ProcessStats,
    /// Set once the worker was told to stop: no more accepting, clients closing.
    stopping: Option<lifecycle::Stopping>,
    /// Origin of the worker clock (`clock_ms`) kept per connection.
    started: Instant,
    /// Connections this worker may hold (`limits.connections_per_worker`).
    max_conns: usize,
    /// When the next idle/ping sweep over all connections is due.
    next_sweep: Instant,
}

/// Entry point of `groupcast worker --index N`, exec'd by the master.
pub fn run(index: usize) -> anyhow::Result<()> {
    let config = control::child_config()?;
    crate::logging::init(
        &format!("worker-{index}"),
        crate::config::log_level_filter(&config.log.level).unwrap_or(log::LevelFilter::Info),
    );
    if config.log.syslog {
        if let Err(e) = crate::logging::use_syslog(&config.log.syslog_socket, &config.log.syslog_facility) {
            warn!("{e}");
        }
    }
    let mut worker = Worker::new(index, config).context("worker setup failed")?;
    info!("worker {index} started");
    worker.run()
}

impl Worker {
    fn new(index: usize, config: Config) -> anyhow::Result<Worker> {
        let poll = Poll::new().context("cannot create the event loop")?;
        let fd = crate::sys::adopt_inherited_fd(control::CHILD_LISTENER_FD).context("no listener from the master")?;
        let std_listener = std::net::TcpListener::from(fd);
        std_listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(std_listener);
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let control = ChildLink::inherit(poll.registry(), CONTROL).context("no status link from the master")?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT]).context("cannot install signal handlers")?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        let pid = std::process::id() as u64;
        let bus = bus::Bus::start(&config, poll.registry(), index)?;
        let stats = ProcessStats { role: "worker".into(), index: Some(index), pid: pid as u32, ..Default::default() };
        Ok(Worker {
            index,
            poll,
            listener,
            conns: Slab::new(),
            groups: Groups::default(),
            bus,
            control,
            signals,
            read_buf: vec![0; READ_BUF],
            dirty: Vec::new(),
            read_again: Vec::new(),
            timers: BinaryHeap::new(),
            next_conn_id: 1,
            accept_paused_until: None,
            stats,
            stopping: None,
            started: Instant::now(),
            max_conns: config.limits.connections_per_worker(config.workers),
            next_sweep: Instant::now(),
            config,
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_wait();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("event loop failed");
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    bus::TOKEN => self.bus_ready(),
                    CONTROL => self.control_ready(),
                    SIGNALS => self.signals_ready(),
                    Token(t) => {
                        let key = t - FIRST_CONN;
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.conn_readable(key);
                        }
                        if event.is_writable() {
                            self.mark_dirty(key);
                        }
                    }
                }
            }
            for key in std::mem::take(&mut self.read_again) {
                self.conn_readable(key);
            }
            self.end_of_turn();
            if self.stopping.as_ref().is_some_and(|s| self.finished_stopping(s)) {
                info!("worker {} stopped ({} connections left)", self.index, self.conns.len());
                return Ok(());
            }
        }
    }

    fn next_wait(&self) -> Duration {
        if !self.read_again.is_empty() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut wake = now + MAX_WAIT;
        if let Some(Reverse((at, _, _))) = self.timers.peek() {
            wake = wake.min(*at);
        }
        if let Some(at) = self.bus.next_wake() {
            wake = wake.min(at);
        }
        if let Some(at) = self.accept_paused_until {
            wake = wake.min(at);
        }
        wake.saturating_duration_since(now)
    }

    /// Work done once per loop turn, after every event was handled.
    fn end_of_turn(&mut self) {
        self.bus.end_of_turn(self.poll.registry());
        self.flush_dirty();
        self.expire_timers();
        self.sweep_idle();
        if self.accept_paused_until.is_some_and(|t| Instant::now() >= t) {
            self.accept_paused_until = None;
            self.accept_all();
        }
    }

    // ---- accepting -------------------------------------------------------------------------

    fn accept_all(&mut self) {
        if self.stopping.is_some() || self.accept_paused_until.is_some() {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    // Group messages are small and latency matters more than packet count;
                    // corking already batches frames per writev.
                    let _ = stream.set_nodelay(true);
                    if self.conns.len() >= self.max_conns {
                        self.refuse_connection(stream, peer);
                        continue;
                    }
                    let now_ms = self.clock_ms();
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    let token = Token(key + FIRST_CONN);
                    if let Err(e) =
                        self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                    {
                        warn!("cannot register connection from {peer}: {e}");
                        continue;
                    }
                    let id = self.next_conn_id;
                    self.next_conn_id += 1;
                    let budget = CommandBudget::new(self.config.limits.commands_burst, now_ms);
                    entry.insert(Conn::new(stream, id, peer, now_ms, budget));
                    let timeout = Duration::from_millis(self.config.limits.handshake_timeout_ms);
                    self.timers.push(Reverse((Instant::now() + timeout, key, id)));
                    debug!("connection {id} from {peer}");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) =>
                {
                    warn!("cannot accept: {e}; pausing accept for 100 ms");
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and the like concern one connection only.
                    debug!("accept failed: {e}");
                }
            }
        }
    }

    // ---- reading ---------------------------------------------------------------------------

    fn conn_readable(&mut self, key: usize) {
        let now_ms = self.clock_ms();
        for _ in 0..READS_PER_TURN {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            let mut buf = std::mem::take(&mut self.read_buf);
            let result = conn.stream.read(&mut buf);
            let flow = match result {
                Ok(0) => {
                    self.read_buf = buf;
                    self.drop_conn(key, "peer closed the connection");
                    return;
                }
                Ok(n) => {
                    conn.bytes_in += n as u64;
                    conn.last_seen = now_ms;
                    conn.ping_outstanding = false;
                    self.ingest(key, &mut buf, n)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_buf = buf;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Flow::Continue,
                Err(e) => {
                    self.read_buf = buf;
                    self.drop_conn(key, &format!("read failed: {e}"));
                    return;
                }
            };
            self.read_buf = buf;
            if flow == Flow::Stop {
                return;
            }
        }
        // Budget used up with data still waiting: come back next turn (edge-triggered).
        self.read_again.push(key);
    }

    /// Processes `buf[..n]`, freshly read, together with what the connection had buffered.
    fn ingest(&mut self, key: usize, buf: &mut [u8], n: usize) -> Flow {
        let conn = &mut self.conns[key];
        if conn.inbuf.is_empty() {
            let (used, flow) = self.process(key, &mut buf[..n]);
            if let Some(conn) = self.conns.get_mut(key) {
                if used < n && !matches!(conn.state, ConnState::Closing(AfterFlush::Drop)) {
                    conn.inbuf.extend_from_slice(&buf[used..n]);
                }
            }
            flow
        } else {
            conn.inbuf.extend_from_slice(&buf[..n]);
            let mut pending = std::mem::take(&mut conn.inbuf);
            let (used, flow) = self.process(key, &mut pending);
            if let Some(conn) = self.conns.get_mut(key) {
                pending.drain(..used);
                if !pending.is_empty() {
                    conn.inbuf = pending;
                }
            }
            flow
        }
    }

    /// Consumes whole handshakes and frames from `data`; returns how many bytes it used.
    fn process(&mut self, key: usize, data: &mut [u8]) -> (usize, Flow) {
        let mut pos = 0;
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return (pos, Flow::Stop);
            };
            match conn.state {
                ConnState::Closing(AfterFlush::Drop) => return (data.len(), Flow::Stop),
                ConnState::Handshaking => match handshake::process(&data[pos..]) {
                    Handshake::Incomplete => return (pos, Flow::Continue),
                    Handshake::Upgrade { response, consumed } => {
                        conn.send_raw(response);
                        conn.state = ConnState::Open;
                        pos += consumed;
                        self.mark_dirty(key);
                        if let Some(stopping) = &self.stopping {
                            // Accepted just before the stop: complete the handshake, then say
                            // why we close, so the client knows to come back.
                            let (code, deadline) = (stopping.code, stopping.deadline);
                            self.close_conn_until(key, code, "server restarting", deadline);
                            return (data.len(), Flow::Stop);
                        }
                    }
                    Handshake::Reply { response, reason } => {
                        debug!("connection {}: {reason}", conn.id);
                        conn.send_raw(response);
                        conn.state = ConnState::Closing(AfterFlush::Drop);
                        self.mark_dirty(key);
                        return (data.len(), Flow::Stop);
                    }
                },
                ConnState::Open | ConnState::Closing(AfterFlush::AwaitPeer) => {
                    // A single frame is a whole message too: both limits apply.
                    let max = self.config.limits.max_frame_size.min(self.config.limits.max_message_size);
                    match frame::parse(&mut data[pos..], max) {
                        Ok(None) => return (pos, Flow::Continue),
                        Ok(Some((frame, used))) => {
                            pos += used;
                            if self.handle_frame(key, frame) == Flow::Stop {
                                return (pos, Flow::Stop);
                            }
                        }
                        Err(e) => {
                            if e.code == close_code::MESSAGE_TOO_BIG {
                                self.stats.oversized += 1;
                            } else {
                                self.stats.protocol_errors += 1;
                            }
                            self.close_conn(key, e.code, e.reason);
                            return (data.len(), Flow::Stop);
                        }
                    }
                }
            }
        }
    }

    fn handle_frame(&mut self, key: usize, frame: Frame<'_>) -> Flow {
        let conn = &mut self.conns[key];
        if conn.state != ConnState::Open {
            // Closing: only the peer's close frame matters now.
            if frame.kind == Kind::Close {
                self.drop_conn(key, "close handshake complete");
                return Flow::Stop;
            }
            return Flow::Continue;
        }
        match frame.kind {
            Kind::Text | Kind::Binary if conn.fragment.is_some() => {
                self.protocol_violation(key, close_code::PROTOCOL_ERROR, "new message inside a fragmented one")
            }
            Kind::Binary => {
                self.protocol_violation(key, close_code::UNSUPPORTED_DATA, "binary frames are not supported")
            }
            Kind::Text if frame.fin => self.handle_text(key, frame.payload),
            Kind::Text => {
                conn.fragment = Some(Box::new(Fragment { text: true, data: frame.payload.to_vec() }));
                Flow::Continue
            }
            Kind::Continuation => {
                let Some(fragment) = conn.fragment.as_mut() else {
                    return self.protocol_violation(key, close_code::PROTOCOL_ERROR, "continuation without a start");
                };
                if fragment.data.len() + frame.payload.len() > self.config.limits.max_message_size {
                    self.stats.oversized += 1;
                    self.close_conn(key, close_code::MESSAGE_TOO_BIG, "message larger than the limit");
                    return Flow::Stop;
                }
                fragment.data.extend_from_slice(frame.payload);
                if !frame.fin {
                    return Flow::Continue;
                }
                let Some(whole) = conn.fragment.take() else {
                    return Flow::Continue;
                };
                if whole.text {
                    self.handle_text(key, &whole.data)
                } else {
                    Flow::Continue
                }
            }
            Kind::Ping => {
                let mut pong = Vec::with_capacity(2 + frame.payload.len());
                frame::encode(&mut pong, Kind::Pong, frame.payload);
                conn.send_raw(pong);
                self.mark_dirty(key);
                Flow::Continue
            }
            Kind::Pong => Flow::Continue,
            Kind::Close => {
                // Echo the peer's code, then close the TCP connection once the echo is out.
                let code = match frame.payload {
                    [] => None,
                    [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
                    [_] => Some(close_code::PROTOCOL_ERROR),
                };
                let mut reply = Vec::with_capacity(4);
                frame::encode(
                    &mut reply,
                    Kind::Close,
                    &code.map(u16::to_be_bytes).unwrap_or_default()[..code.map_or(0, |_| 2)],
                );
                conn.send_raw(reply);
                conn.state = ConnState::Closing(AfterFlush::Drop);
                self.mark_dirty(key);
                Flow::Stop
            }
        }
    }

    fn protocol_violation(&mut self, key: usize, code: u16, reason: &str) -> Flow {
        self.stats.protocol_errors += 1;
        self.close_conn(key, code, reason);
        Flow::Stop
    }

    fn handle_text(&mut self, key: usize, payload: &[u8]) -> Flow {
        let Ok(text) = std::str::from_utf8(payload) else {
            return self.protocol_violation(key, close_code::INVALID_PAYLOAD, "text frame is not valid UTF-8");
        };
        self.stats.messages_in += 1;
        let now_ms = self.clock_ms();
        let limits = &self.config.limits;
        let Some(conn) = self.conns.get_mut(key) else { return Flow::Stop };
        conn.messages_in += 1;
        let within_rate = conn.budget.take(now_ms, limits.commands_per_second, limits.commands_burst);
        trace!("connection {key}: {text}");
        let request = match protocol::parse_request(text, limits) {
            Ok(r) => r,
            Err((e, id)) => {
                self.reply_error(key, &e, id);
                return Flow::Continue;
            }
        };
        if request.id.is_some() {
            conn.wants_replies = true;
        }
        if !within_rate {
            // Refused, not queued: the client is told at once and nothing is executed.
            self.stats.rate_limited += 1;
            self.reply_error(key, &RequestError::RateLimited(limits.commands_per_second), request.id);
            return Flow::Continue;
        }
        let outcome = match request.command {
            Command::AddGroup { group } => self.join(key, &group),
            Command::LeaveGroup { group } => {
                self.leave(key, &group);
                Ok(())
            }
            Command::SendToGroup { group, message } => {
                self.deliver_local(&group, message.as_bytes());
                self.bus.publish(&group, message.as_bytes());
                self.stats.published += 1;
                Ok(())
            }
        };
        match (outcome, request.id) {
            (Err(e), id) => self.reply_error(key, &e, id),
            (Ok(()), Some(id)) => self.reply(key, &protocol::ok_reply(id)),
            (Ok(()), None) => {}
        }
        Flow::Continue
    }

    fn reply_error(&mut self, key: usize, error: &RequestError, id: Option<&serde_json::value::RawValue>) {
        self.stats.bad_requests += 1;
        debug!("connection {key}: bad request: {error}");
        self.reply(key, &protocol::error_reply(error, id));
    }

    /// Queues a text frame for one connection (a reply or an error), counted in `messages_out`.
    fn reply(&mut self, key: usize, text: &[u8]) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.send_text(text);
            self.stats.messages_out += 1;
            self.mark_dirty(key);
        }
    }

    // ---- writing and closing ---------------------------------------------------------------

    fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            match conn.out.write_to(&mut conn.stream) {
                Ok(Flushed::All) if conn.missed > 0 && conn.state.is_open() => {
                    // Caught up after the drop policy discarded messages: say how many.
                    limits::report_missed(conn);
                    self.dirty.push(key);
                    conn.dirty = true;
                }
                Ok(Flushed::All) => match conn.state {
                    ConnState::Closing(AfterFlush::Drop) => self.drop_conn(key, "closed by the server"),
                    ConnState::Closing(AfterFlush::AwaitPeer) => {
                        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                    }
                    _ => {}
                },
                Ok(Flushed::Blocked) => {}
                Err(e) => {
                    self.stats.send_failures += 1;
                    self.drop_conn(key, &format!("write failed: {e}"));
                }
            }
        }
        // Connections queued again during this flush (a missed-messages report) stay queued;
        // the emptied list goes back for reuse of its allocation.
        let requeued = std::mem::replace(&mut self.dirty, dirty);
        self.dirty.extend(requeued);
    }

    /// Server-initiated close with a WebSocket close code.
    fn close_conn(&mut self, key: usize, code: u16, reason: &str) {
        self.close_conn_until(key, code, reason, Instant::now() + CLOSE_TIMEOUT);
    }

    /// Like `close_conn`, waiting for the client's close frame until `deadline`.
    fn close_conn_until(&mut self, key: usize, code: u16, reason: &str, deadline: Instant) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        debug!("connection {}: closing with {code}: {reason}", conn.id);
        if conn.start_close(code, reason) {
            let id = conn.id;
            self.timers.push(Reverse((deadline, key, id)));
            self.mark_dirty(key);
        }
    }

    /// Forgets a connection: socket closed, every group membership removed.
    fn drop_conn(&mut self, key: usize, why: &str) {
        if !self.conns.contains(key) {
            return;
        }
        let mut conn = self.conns.remove(key);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        for id in conn.groups.drain(..) {
            if let Some(name) = self.groups.leave(id, key) {
                self.bus.unsubscribe(&name);
            }
        }
        debug!("connection {} from {} gone: {why}", conn.id, conn.peer);
    }

    fn expire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, key, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get(key) else {
                continue;
            };
            if conn.id != id {
                continue;
            }
            match conn.state {
                ConnState::Handshaking => {
                    self.stats.handshake_timeouts += 1;
                    self.drop_conn(key, "handshake timed out");
                }
                ConnState::Closing(_) => self.drop_conn(key, "close timed out"),
                ConnState::Open => {}
            }
        }
    }
}
