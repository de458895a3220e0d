//! A worker process: one mio event loop that accepts on the listener the master bound for it,
//! speaks WebSocket to its clients, keeps the local group map, and exchanges group messages
//! with the other workers through its channel client.
//!
//! The delivery path is a straight line: a client's `send_to_group` is delivered at once to
//! local members and published to the broker, which skips this worker when forwarding; a
//! message from the broker is encoded as a WebSocket frame once and the same bytes queued to
//! every local member. Every connection touched in a loop turn is flushed once, at the end of
//! the turn, with one vectored write (corking; `transport::send_plain`).

pub mod bus;
mod clients;
pub mod conn;
mod delivery;
pub mod groups;
mod handoff;
mod input;
mod lifecycle;
mod limits;
mod numbered;
mod offsets;
pub mod outqueue;
mod recovery;
mod transport;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use log::{debug, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::config::Config;
use crate::control::{self, ChildLink, ProcessStats};
use clients::{Clients, Parts, FIRST_CONN};
use groups::Groups;
use input::Drain;

const LISTENER: Token = Token(0);
// Token(1) is the bus's (`bus::TOKEN`).
const CONTROL: Token = Token(2);
const SIGNALS: Token = Token(3);
const TLS_LISTENER: Token = Token(4);
// Token(5) is the hand-off socket's (`handoff::TOKEN`).

/// Size of the worker-wide read buffer every connection reads into.
const READ_BUF: usize = 64 * 1024;
/// Connections written between two reads of the bus in a long flush (`flush_members`).
const FLUSH_SLICE: usize = 32;

/// Longest sleep of the loop, so timers are checked at least this often.
const MAX_WAIT: Duration = Duration::from_millis(500);

/// The event loop and the parts it wires: the clients, the local groups and the bus each own
/// their state; the loop hands one part to another only as an argument (`Parts`, or the
/// group map to `Clients::deliver`).
pub struct Worker {
    index: usize,
    config: Config,
    poll: Poll,
    /// The plain (`ws://`) listener; none with `listen = ""`.
    listener: Option<TcpListener>,
    /// The `wss://` listener and the server config its connections use (`[tls]`).
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    control: ChildLink,
    signals: Signals,
    clients: Clients,
    groups: Groups,
    bus: bus::Bus,
    /// Protocol 2's requests and replies in flight.
    offsets: offsets::Offsets,
    /// Shared by every connection and the bus: data is copied to a connection's own buffer
    /// only when a frame is incomplete.
    read_buf: Vec<u8>,
    /// Retry accepting after running out of descriptors.
    accept_paused_until: Option<Instant>,
    /// The worker's own figures (role, pid); the clients and the bus add theirs in `status`.
    stats: ProcessStats,
    /// Set once the worker was told to stop: no more accepting, clients closing.
    stopping: Option<lifecycle::Stopping>,
    /// Handing this worker's connections to its replacement (a reload).
    handoff_out: Option<Box<handoff::Sending>>,
    /// Receiving the connections of the worker this one replaces.
    handoff_in: Option<Box<handoff::Receiving>>,
    started: Instant,
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
    if std::env::var(control::handoff::HANDOFF_ENV).is_ok_and(|v| v == "1") {
        let fd = crate::sys::adopt_inherited_fd(control::handoff::CHILD_HANDOFF_FD)
            .context("no hand-off socket from the master")?;
        worker.expect_hand_off(fd).context("cannot take the hand-off socket")?;
    }
    info!("worker {index} started");
    worker.run()
}

impl Worker {
    fn new(index: usize, config: Config) -> anyhow::Result<Worker> {
        let poll = Poll::new().context("cannot create the event loop")?;
        let listener = match config.listen {
            Some(_) => Some(inherit_listener(&poll, control::CHILD_LISTENER_FD, LISTENER)?),
            None => None,
        };
        let tls = match config.tls.listen {
            Some(_) => {
                let listener = inherit_listener(&poll, control::handoff::CHILD_TLS_LISTENER_FD, TLS_LISTENER)?;
                let material = crate::sys::adopt_inherited_fd(control::handoff::CHILD_TLS_MATERIAL_FD)
                    .context("no TLS certificate from the master")?;
                Some((listener, crate::tls::inherited_config(material)?))
            }
            None => None,
        };
        let control = ChildLink::inherit(poll.registry(), CONTROL).context("no status link from the master")?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT]).context("cannot install signal handlers")?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        let pid = std::process::id() as u64;
        let bus = bus::Bus::start(&config, poll.registry(), index)?;
        let stats = ProcessStats { role: "worker".into(), index: Some(index), pid: pid as u32, ..Default::default() };
        let clients = Clients::new(
            config.limits.clone(),
            crate::auth::Gate::new(config.auth.clone(), config.groups.clone())
                .map_err(|e| anyhow::anyhow!("token key from the master: {e}"))?,
            config.limits.connections_per_worker(config.workers),
            inherit_per_ip_counter()?,
            control::handoff::first_conn_id(control::handoff::generation(), index),
        );
        Ok(Worker {
            index,
            poll,
            listener,
            tls,
            control,
            signals,
            clients,
            groups: Groups::default(),
            bus,
            offsets: offsets::Offsets::new(config.history.max_recover, config.channel.queue_max_messages),
            read_buf: vec![0; READ_BUF],
            accept_paused_until: None,
            stats,
            stopping: None,
            handoff_out: None,
            handoff_in: None,
            started: Instant::now(),
            config,
        })
    }

    /// The clients' view of the other parts, for operations that touch them.
    fn parts(&mut self) -> (&mut Clients, Parts<'_>, &mut [u8]) {
        let parts = Parts {
            registry: self.poll.registry(),
            groups: &mut self.groups,
            bus: &mut self.bus,
            offsets: &mut self.offsets,
        };
        (&mut self.clients, parts, &mut self.read_buf)
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
            self.clients.begin_turn();
            for event in events.iter() {
                match event.token() {
                    LISTENER | TLS_LISTENER => self.accept_all(),
                    bus::TOKEN => self.bus_ready(),
                    CONTROL => self.control_ready(),
                    SIGNALS => self.signals_ready(),
                    handoff::TOKEN if self.handoff_out.is_some() => self.hand_off_answers(),
                    handoff::TOKEN => self.hand_off_records(),
                    Token(t) => {
                        let key = t - FIRST_CONN;
                        let (clients, mut parts, buf) = self.parts();
                        if event.is_read_closed() || event.is_error() {
                            clients.readable(key, buf, &mut parts, Drain::UntilWouldBlock);
                        } else if event.is_readable() {
                            clients.readable(key, buf, &mut parts, Drain::StopAtShortRead);
                        }
                        if event.is_writable() {
                            clients.writable(key);
                        }
                    }
                }
            }
            let (clients, mut parts, buf) = self.parts();
            clients.read_again(buf, &mut parts);
            self.end_of_turn();
            if self.stopping.as_ref().is_some_and(|s| self.finished_stopping(s)) {
                info!("worker {} stopped ({} connections left)", self.index, self.clients.len());
                return Ok(());
            }
        }
    }

    fn next_wait(&self) -> Duration {
        let now = Instant::now();
        let mut wake = now + MAX_WAIT;
        if let Some(at) = self.clients.next_wake() {
            wake = wake.min(at);
        }
        if let Some(at) = self.bus.next_wake() {
            wake = wake.min(at);
        }
        if let Some(at) = self.accept_paused_until {
            wake = wake.min(at);
        }
        if let Some(receiving) = &self.handoff_in {
            wake = wake.min(receiving.deadline());
        }
        if let Some(sending) = &self.handoff_out {
            // Rounds start at the end of a turn; handshakes still completing need turns too.
            wake = wake.min(sending.deadline()).min(now + Duration::from_millis(20));
        }
        wake.saturating_duration_since(now)
    }

    /// Work done once per loop turn, after every event was handled.
    fn end_of_turn(&mut self) {
        self.bus.end_of_turn(self.poll.registry());
        if self.flush_members() {
            // What the bus input asked for (history requests, subscriptions) goes out now.
            self.bus.end_of_turn(self.poll.registry());
        }
        let (clients, mut parts, _) = self.parts();
        clients.end_of_turn(&mut parts);
        if self.handoff_out.is_some() {
            self.hand_off_turn();
        }
        if self.handoff_in.is_some() {
            self.hand_off_in_turn();
        }
        if self.accept_paused_until.is_some_and(|t| Instant::now() >= t) {
            self.accept_paused_until = None;
            self.accept_all();
        }
    }

    /// Writes every connection with output queued, when there are many. Writing a socket
    /// costs ~5 µs, so a flush of thousands of members takes milliseconds; every
    /// `FLUSH_SLICE` connections the worker reads the bus, and group messages that came from
    /// other workers meanwhile join the queues of the connections not written yet, so one
    /// write carries both. That matters when the worker is busy and its flushes run long:
    /// on a quiet machine it changes nothing measurable, on a loaded one it merged writes
    /// (docs/benchmarks.md "The channel hop, profiled"). It costs one read (usually EAGAIN)
    /// per slice. Returns whether the bus was read; what is left to write (connections that
    /// got more after their write) is flushed by `Clients::end_of_turn`.
    fn flush_members(&mut self) -> bool {
        if !self.bus.reads_mid_flush() || self.clients.dirty.len() <= FLUSH_SLICE {
            return false;
        }
        let pending = std::mem::take(&mut self.clients.dirty);
        for (i, slice) in pending.chunks(FLUSH_SLICE).enumerate() {
            if i > 0 {
                self.bus_ready();
            }
            let (clients, mut parts, _) = self.parts();
            clients.flush_keys(slice, &mut parts);
        }
        self.clients.give_back_dirty(pending);
        true
    }

    // ---- accepting -------------------------------------------------------------------------

    /// Stops hearing about new connections (a stopping worker; the master keeps the sockets).
    fn deregister_listeners(&mut self) {
        if let Some(listener) = self.listener.as_mut() {
            let _ = self.poll.registry().deregister(listener);
        }
        if let Some((listener, _)) = self.tls.as_mut() {
            let _ = self.poll.registry().deregister(listener);
        }
    }

    /// Accepts everything waiting on both listeners (edge-triggered: each until WouldBlock).
    fn accept_all(&mut self) {
        if self.listener.is_some() {
            self.accept_from(false);
        }
        if self.tls.is_some() {
            self.accept_from(true);
        }
    }

    fn accept_from(&mut self, tls: bool) {
        if self.stopping.is_some() || self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let (listener, tls_config) = match (tls, &self.listener, &self.tls) {
                (false, Some(listener), _) => (listener, None),
                (true, _, Some((listener, config))) => (listener, Some(config)),
                _ => return,
            };
            match listener.accept() {
                Ok((stream, peer)) => self.clients.accept(self.poll.registry(), stream, peer, tls_config),
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

    // ---- the bus ---------------------------------------------------------------------------

    /// Hands the clients what the bus brought (new messages from other workers, numbered
    /// messages, history answers), then sends the history requests that gave rise to.
    fn bus_ready(&mut self) {
        let (clients, groups, offsets) = (&mut self.clients, &mut self.groups, &mut self.offsets);
        let handoff = &mut self.handoff_out;
        let mut asks = Vec::new();
        let mut link_up = false;
        self.bus.on_ready(self.poll.registry(), &mut self.read_buf, |event| {
            // A hand-off making its cut watches the stream and takes its own answers.
            if handoff.as_mut().is_some_and(|h| h.observe(&event, groups)) {
                return;
            }
            link_up |= event == bus::BusEvent::LinkUp;
            clients.on_bus_event(event, groups, offsets, &mut asks)
        });
        if link_up {
            // Before the history requests: their answers assume the subscription.
            self.bus.resubscribe(self.groups.names());
        }
        for ask in &asks {
            self.bus.request_history(ask.request, &ask.group, ask.since(), self.offsets.max_recover);
        }
    }
}

/// The per-IP table the master handed down (descriptor and column), mapped.
fn inherit_per_ip_counter() -> anyhow::Result<crate::per_ip::PerIpCounter> {
    use crate::control::handoff::{CHILD_PER_IP_FD, PER_IP_COLUMN_ENV};
    let fd = crate::sys::adopt_inherited_fd(CHILD_PER_IP_FD).context("no per-IP table from the master")?;
    let column = std::env::var(PER_IP_COLUMN_ENV)
        .ok()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{PER_IP_COLUMN_ENV} is not a column number"))?;
    let table = crate::per_ip::PerIpTable::adopt(&fd).context("cannot map the per-IP table")?;
    // The mapping stays valid after the descriptor closes.
    Ok(crate::per_ip::PerIpCounter::new(table, column)?)
}

/// The listener the master bound for this worker at descriptor `fd`, registered as `token`.
fn inherit_listener(poll: &Poll, fd: i32, token: Token) -> anyhow::Result<TcpListener> {
    let fd = crate::sys::adopt_inherited_fd(fd).context("no listener from the master")?;
    let std_listener = std::net::TcpListener::from(fd);
    std_listener.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from their listener (Linux): one system call here
    // instead of one per connection. Set by the worker, not the master, so a master started
    // from an older binary still gets it after a reload to this one.
    socket2::SockRef::from(&std_listener).set_nodelay(true).context("cannot set TCP_NODELAY on the listener")?;
    let mut listener = TcpListener::from_std(std_listener);
    poll.registry().register(&mut listener, token, Interest::READABLE)?;
    Ok(listener)
}
