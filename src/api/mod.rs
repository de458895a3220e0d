//! The api process (`[api] listen`, docs/api.md): a small HTTP/1.1 server in its own child of
//! the master, so neither the master (a single-threaded supervisor) nor a worker (which
//! cannot sum its siblings) blocks on HTTP clients. One mio event loop, no async runtime:
//! `http.rs` parses heads with httparse, `conn.rs` holds each connection and its deadlines,
//! `routes.rs` picks the endpoint, `publish.rs` publishes through the same bus the workers
//! use (`worker::bus`) and answers once the bus has numbered the message, `master_query.rs`
//! asks the master (over its control socket) for what only it can sum, `metrics.rs` renders
//! its `status` in the Prometheus format, `demo.rs` serves the chat page and `endpoints.rs`
//! does what each endpoint does.

mod conn;
mod demo;
mod endpoints;
pub mod errors;
pub mod http;
mod master_query;
pub mod metrics;
pub mod publish;
pub mod routes;

use std::io;
use std::time::{Duration, Instant};

use anyhow::Context;
use log::{debug, error, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::config::Config;
use crate::control::{self, ChildLink, ProcessStats, Request};
use crate::worker::bus::Bus;
use conn::{HttpConn, Phase};
use errors::ApiError;
use http::Response;
use master_query::MasterQueries;
use publish::{Bucket, Waiters};
use routes::Route;

const LISTENER: Token = Token(0);
// Token(1) is the bus's (worker::bus::TOKEN).
const LINK: Token = Token(2);
const SIGNALS: Token = Token(3);
const FIRST_QUERY: usize = 16;
const FIRST_CONN: usize = 64;
/// How often deadlines are checked while connections are open.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// `groupcast api-child`: started by the master with the API listener at fd 3.
pub fn run_child() -> anyhow::Result<()> {
    let config = control::child_config()?;
    crate::logging::init("api", crate::config::log_level_filter(&config.log.level).unwrap_or(log::LevelFilter::Info));
    if config.log.syslog {
        if let Err(e) = crate::logging::use_syslog(&config.log.syslog_socket, &config.log.syslog_facility) {
            warn!("{e}");
        }
    }
    if let Err(e) = crate::sys::raise_open_file_limit() {
        warn!("cannot raise the open-file limit: {e}");
    }
    let fd = crate::sys::adopt_inherited_fd(control::CHILD_LISTENER_FD).context("no API listener from the master")?;
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true).context("cannot make the API listener non-blocking")?;
    let mut server = ApiServer::new(TcpListener::from_std(listener), config)?;
    info!(
        "api listening on http://{}{}",
        server.config.api.listen.map_or_else(String::new, |a| a.to_string()),
        if server.config.api.key.is_some() { " (bearer key required)" } else { " (no key: loopback only)" }
    );
    server.run()
}

struct ApiServer {
    poll: Poll,
    listener: TcpListener,
    accepting: bool,
    /// The last accept failed (descriptors ran out): the sweep tries again.
    accept_paused: bool,
    conns: Slab<HttpConn>,
    next_serial: u64,
    queries: MasterQueries,
    bus: Bus,
    waiters: Waiters,
    bucket: Bucket,
    link: ChildLink,
    signals: Signals,
    config: Config,
    stats: ProcessStats,
    started: Instant,
    /// Set by the master's `Shutdown` (a reload replaced us): finish what is in hand, then go.
    stopping: Option<Instant>,
    next_sweep: Instant,
    scratch: Vec<u8>,
    /// The ports the WebSocket listeners got (the demo page connects there).
    ws_ports: (Option<u16>, Option<u16>),
}

impl ApiServer {
    fn new(mut listener: TcpListener, config: Config) -> anyhow::Result<ApiServer> {
        let poll = Poll::new().context("cannot create the event loop")?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let link = ChildLink::inherit(poll.registry(), LINK).context("no status link from the master")?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT])?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        let bus = Bus::start_as(&config, poll.registry(), "api".into())?;
        let queries =
            MasterQueries::new(config.control_socket(), Duration::from_millis(config.status_timeout_ms), FIRST_QUERY);
        let bucket = Bucket::new(config.api.publishes_per_second, config.api.publishes_burst);
        let stats = ProcessStats { role: "api".into(), pid: std::process::id(), ..Default::default() };
        Ok(ApiServer {
            poll,
            listener,
            accepting: true,
            accept_paused: false,
            conns: Slab::new(),
            next_serial: 0,
            queries,
            bus,
            waiters: Waiters::default(),
            bucket,
            link,
            signals,
            config,
            stats,
            started: Instant::now(),
            stopping: None,
            next_sweep: Instant::now(),
            scratch: vec![0; 64 * 1024],
            ws_ports: control::handoff::ws_ports(),
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_wake().map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e).context("event loop failed");
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    crate::worker::bus::TOKEN => self.bus_ready(),
                    // The master is gone: nothing left to serve for.
                    LINK if !self.link_ready() => return Ok(()),
                    SIGNALS if self.signals.pending().next().is_some() => {
                        info!("api stopping");
                        return Ok(());
                    }
                    token if self.queries.owns(token) => {
                        let answers = self.queries.ready(self.poll.registry(), token);
                        self.master_answered(answers);
                    }
                    Token(t) if t >= FIRST_CONN => {
                        if event.is_read_closed() {
                            if let Some(conn) = self.conns.get_mut(t - FIRST_CONN) {
                                conn.read_closed = true;
                            }
                        }
                        self.conn_ready(t - FIRST_CONN)
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
            for answered in self.waiters.expire(now, self.config.api.publish_timeout_ms) {
                self.publish_answered(answered);
            }
            let answers = self.queries.expire(self.poll.registry(), now);
            self.master_answered(answers);
            if now >= self.next_sweep {
                self.sweep(now);
                self.next_sweep = now + SWEEP_EVERY;
            }
            self.bus.end_of_turn(self.poll.registry());
            if let Some(until) = self.stopping {
                if self.conns.is_empty() || now >= until {
                    info!("api replaced; exiting");
                    return Ok(());
                }
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut wake = Instant::now() + Duration::from_secs(1);
        if !self.conns.is_empty() {
            wake = wake.min(self.next_sweep);
        }
        for at in [self.waiters.next_deadline(), self.queries.next_deadline(), self.bus.next_wake(), self.stopping]
            .into_iter()
            .flatten()
        {
            wake = wake.min(at);
        }
        Some(wake)
    }

    // ---- connections -----------------------------------------------------------------------

    fn accept(&mut self) {
        while self.accepting {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    let max = self.config.api.max_connections;
                    if self.conns.len() >= max {
                        // Best effort: one write of the refusal, then the socket goes.
                        let mut out = Vec::new();
                        ApiError::TooManyConnections(max).response().encode(false, &mut out);
                        let _ = io::Write::write(&mut stream, &out);
                        self.count(503);
                        debug!("api connection from {peer} refused: {max} already open");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let token = Token(FIRST_CONN + entry.key());
                    if let Err(e) =
                        self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                    {
                        warn!("cannot watch an api connection: {e}");
                        continue;
                    }
                    self.next_serial += 1;
                    let keepalive = Duration::from_millis(self.config.api.keepalive_timeout_ms);
                    entry.insert(HttpConn::new(stream, self.next_serial, keepalive));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: the connection waits in the backlog,
                    // and the sweep tries again.
                    warn!("api accept failed: {e}");
                    self.accept_paused = true;
                    return;
                }
            }
        }
    }

    /// Bytes the input buffer holds at most: one whole request (head and body) and a little.
    fn input_cap(&self) -> usize {
        self.config.api.max_header_bytes + self.config.limits.max_message_size + 4096
    }

    fn conn_ready(&mut self, key: usize) {
        self.pump(key);
        self.flush(key);
    }

    /// Reads and answers what the connection sent. Reading stops at the input bound, so when
    /// answering freed room, it reads again: with edge-triggered readiness no new event would
    /// come for bytes already waiting in the socket.
    pub(super) fn pump(&mut self, key: usize) {
        let cap = self.input_cap();
        loop {
            let Some(conn) = self.conns.get_mut(key) else { return };
            if matches!(conn.phase, Phase::Closing | Phase::Waiting) || conn.peer_done {
                break;
            }
            if conn.read(cap, &mut self.scratch).is_err() {
                self.drop_conn(key);
                return;
            }
            let full = conn.inbuf.len() >= cap;
            self.handle_input(key);
            let Some(conn) = self.conns.get(key) else { return };
            if !(full && conn.inbuf.len() < cap) {
                return;
            }
        }
        self.handle_input(key);
    }

    /// Answers every whole request buffered, in order, until one must wait.
    fn handle_input(&mut self, key: usize) {
        loop {
            let max_header = self.config.api.max_header_bytes;
            let Some(conn) = self.conns.get_mut(key) else { return };
            if matches!(conn.phase, Phase::Waiting | Phase::Closing) || conn.out.len() > conn::MAX_QUEUED_ANSWERS {
                return;
            }
            if conn.inbuf.is_empty() {
                if conn.peer_done {
                    conn.phase = Phase::Closing;
                } else if conn.phase == Phase::Reading {
                    conn.idle(Duration::from_millis(self.config.api.keepalive_timeout_ms));
                }
                return;
            }
            conn.reading(Duration::from_millis(self.config.api.request_timeout_ms));
            let head = match http::parse_head(&conn.inbuf, max_header) {
                Ok(Some(head)) => head,
                Ok(None) => {
                    if conn.peer_done {
                        self.answer(
                            key,
                            &ApiError::BadRequest("the connection ended inside a request".into()).response(),
                        );
                    }
                    return;
                }
                Err(e) => {
                    self.answer(key, &e.response());
                    return;
                }
            };
            conn.keep_alive = head.keep_alive;
            let cx = routes::Context {
                key: self.config.api.key.as_ref(),
                max_body: self.config.limits.max_message_size,
                max_group_id_len: self.config.limits.max_group_id_len,
                demo: self.config.api.demo,
                ws_port: self.ws_ports.0,
                wss_port: self.ws_ports.1,
            };
            let routed = routes::route(&head, &cx);
            let body_len = match &routed {
                Ok(Route::Publish { length }) => *length,
                _ => head.content_length.unwrap_or(0),
            };
            let whole = head.head_len.saturating_add(body_len);
            if conn.inbuf.len() < whole {
                match routed {
                    // The body is still coming: refuse now, and close (we will not read it).
                    Err(e) => {
                        let mut response = e.response();
                        response.close = true;
                        self.answer(key, &response);
                    }
                    Ok(_) => {
                        if head.expect_continue && !conn.continued {
                            conn.continued = true;
                            conn.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        }
                        if conn.peer_done {
                            self.answer(
                                key,
                                &ApiError::BadRequest("the connection ended inside a body".into()).response(),
                            );
                        }
                    }
                }
                return;
            }
            let body: Vec<u8> = conn.inbuf[head.head_len..whole].to_vec();
            conn.inbuf.drain(..whole);
            match routed {
                Err(e) => self.answer(key, &e.response()),
                Ok(route) => self.serve(key, route, &body),
            }
        }
    }

    /// Queues `response` for `key` and moves it to its next phase.
    pub(super) fn answer(&mut self, key: usize, response: &Response) {
        self.count(response.status);
        let keepalive = Duration::from_millis(self.config.api.keepalive_timeout_ms);
        let Some(conn) = self.conns.get_mut(key) else { return };
        if self.stopping.is_some() {
            // Replaced by a reload: this is the last answer on this connection.
            conn.keep_alive = false;
        }
        conn.answer(response);
        if conn.phase != Phase::Closing {
            conn.idle(keepalive);
        }
    }

    fn count(&mut self, status: u16) {
        self.stats.api_requests += 1;
        if status >= 400 {
            self.stats.api_errors += 1;
        }
    }

    pub(super) fn flush(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        match conn.flush() {
            Ok(false) => {}
            Ok(true) | Err(_) => self.drop_conn(key),
        }
    }

    fn drop_conn(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
    }

    /// Deadlines: idle keep-alive connections go silently, a request not whole in time gets
    /// 408, an answer not taken in time is dropped.
    fn sweep(&mut self, now: Instant) {
        let late: Vec<(usize, Phase)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now && c.phase != Phase::Waiting)
            .map(|(k, c)| (k, c.phase))
            .collect();
        for (key, phase) in late {
            match phase {
                Phase::Reading => {
                    self.answer(key, &ApiError::RequestTimeout(self.config.api.request_timeout_ms).response());
                    self.flush(key);
                }
                _ => self.drop_conn(key),
            }
        }
        if self.accept_paused && self.stopping.is_none() {
            // Out of descriptors at the last accept: the connections wait in the backlog.
            self.accept_paused = false;
            self.accept();
        }
    }

    /// An answer for (key, serial), if that connection is still the one that asked.
    pub(super) fn answer_later(&mut self, (key, serial): (usize, u64), response: &Response) {
        if self.conns.get(key).is_none_or(|c| c.serial != serial || c.phase != Phase::Waiting) {
            return;
        }
        self.answer(key, response);
        // Requests that were pipelined behind it.
        self.pump(key);
        self.flush(key);
    }

    // ---- the master ----------------------------------------------------------------------

    /// Reads the master's requests; false when the link is gone (the master died: exit).
    fn link_ready(&mut self) -> bool {
        match self.link.read_requests() {
            Ok(Some(requests)) => {
                for request in requests {
                    let sent = match request {
                        Request::Stats => {
                            let stats = self.snapshot();
                            self.link.send_json(&stats)
                        }
                        Request::Shutdown { drain_ms, .. } => {
                            self.stop_accepting(Duration::from_millis(drain_ms));
                            Ok(())
                        }
                        other => {
                            debug!("api: ignoring {other:?}");
                            Ok(())
                        }
                    };
                    if let Err(e) = sent {
                        warn!("cannot answer the master: {e}");
                    }
                }
                let _ = self.link.flush();
                true
            }
            Ok(None) | Err(_) => {
                error!("lost the link to the master; stopping");
                false
            }
        }
    }

    /// Replaced by a reload: the listener is the next api process's now; connections get
    /// their current answer (with `Connection: close`) and idle ones are closed.
    fn stop_accepting(&mut self, drain: Duration) {
        self.stopping = Some(Instant::now() + drain);
        self.accepting = false;
        let _ = self.poll.registry().deregister(&mut self.listener);
        // What the idle ones sent already is read and answered (with `Connection: close`);
        // then idle keep-alive connections are closed. A new connection that has not sent its
        // request yet keeps its place until the drain deadline: it was accepted, so its
        // request must be answered, not refused.
        let idle: Vec<usize> = self.conns.iter().filter(|(_, c)| c.phase == Phase::Idle).map(|(k, _)| k).collect();
        for key in idle {
            self.pump(key);
            self.flush(key);
            if self.conns.get(key).is_some_and(|c| c.phase == Phase::Idle && c.answered > 0 && c.inbuf.is_empty()) {
                self.drop_conn(key);
            }
        }
    }

    fn snapshot(&self) -> ProcessStats {
        let (version, binary_mtime) = control::binary_identity();
        let bus = self.bus.counters();
        ProcessStats {
            version,
            binary_mtime,
            uptime_secs: self.started.elapsed().as_secs(),
            state: if self.stopping.is_some() { "retiring".into() } else { "running".into() },
            connections: self.conns.len() as u64,
            channel_connected: bus.connected,
            channel_dropped: bus.dropped,
            channel_queued: bus.queued,
            channel_resent: bus.resent,
            log_dropped: crate::logging::dropped_lines(),
            ..self.stats.clone()
        }
    }
}
