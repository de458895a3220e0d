//! The master process: takes the pid file, binds every listener before forking, optionally
//! daemonizes, drops privileges, starts the channel server and the workers, then only
//! supervises: reaps and restarts children (with back-off in a crash loop), handles signals
//! (stop, graceful stop, reload), and answers `status`/`connections` on its control socket.
//! It stays single-threaded, because it forks. The life cycle is drawn in LIFECYCLE.md.

pub mod children;
mod control_clients;
pub mod listeners;
pub mod notify;
pub mod pidfile;
mod privileges;
mod reload;
mod runtime_dir;
mod status;

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use log::{error, info, warn};
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

use crate::config::{ChannelAddr, Config, Overrides};
use crate::control::{ReloadOutcome, Request};
use crate::per_ip::{Columns, PerIpTable, COLUMNS_PER_WORKER};
use crate::ws::close_code;
use children::{ChildProc, Role, Slot};
use pidfile::PidFile;

const SIGNALS: Token = Token(0);
const CONTROL: Token = Token(1);
/// Control clients get the tokens from here on.
const FIRST_CONTROL_CLIENT: usize = 16;
/// How long children get to exit after being told to stop, beyond any drain time, before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a replaced api process may take to answer the requests it holds.
const API_DRAIN: Duration = Duration::from_secs(5);
/// How long a freshly started child may take to report ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the configuration came from, so a reload can read it again.
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
}

/// A process replaced by a reload, closing its clients; killed if still there at `kill_at`.
struct Retiring {
    role: Role,
    proc: ChildProc,
    kill_at: Instant,
}

/// What the supervise loop was asked to do next.
enum Exit {
    Stop { graceful: bool },
}

pub struct Master {
    config: Config,
    config_json: String,
    source: ConfigSource,
    /// The binary children are exec'd from: the path this master was started from, so a
    /// binary installed there later is what new children run (the upgrade path of reload).
    exe: PathBuf,
    started: Instant,
    /// The workers' listeners, plain and TLS (none for a standalone broker).
    sockets: listeners::WorkerSockets,
    /// The certificate chain and key workers are started with; replaced by each reload that
    /// reads them anew.
    tls_material: Option<TlsMaterial>,
    /// The channel listener, when this master runs a broker (not with `channel.connect`).
    channel_listener: Option<OwnedFd>,
    /// The API listener (`[api] listen`) and the address it got.
    api_listener: Option<(OwnedFd, std::net::SocketAddr)>,
    control: control_clients::ControlClients,
    slots: Vec<Slot>,
    retiring: Vec<Retiring>,
    reload: reload::ReloadState,
    pidfile: Option<PidFile>,
    /// The per-IP connection table the workers share, and who holds which column.
    per_ip: Option<(OwnedFd, Rc<Columns>)>,
}

/// Everything bound before daemonizing, so failures reach the operator's terminal.
struct Bound {
    pidfile: PidFile,
    sockets: listeners::WorkerSockets,
    tls_material: Option<TlsMaterial>,
    channel_listener: Option<OwnedFd>,
    api_listener: Option<(OwnedFd, std::net::SocketAddr)>,
    control: UnixListener,
}

/// What a master runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `groupcast start`: workers, plus a private broker unless `channel.connect` names one.
    Instance,
    /// `groupcast channel`: a standalone broker for several instances.
    Broker,
}

impl Mode {
    fn runs_workers(self) -> bool {
        self == Mode::Instance
    }

    fn runs_broker(self, config: &Config) -> bool {
        self == Mode::Broker || (config.channel.connect.is_none() && config.bus == crate::config::BusKind::Channel)
    }
}

fn bind_all(config: &Config, mode: Mode) -> anyhow::Result<Bound> {
    // First, so a bad certificate leaves nothing behind; read as the user that started us
    // (root, before the privilege drop) and before daemonizing, so the operator's terminal
    // hears about it.
    let tls_material = if mode.runs_workers() { load_tls_material(config)? } else { None };
    // The default location is made private; a directory the operator chose is theirs to set.
    if config.pid_file.parent() == Some(crate::config::runtime_dir().as_path()) {
        let service_user = match &config.user {
            Some(name) => nix::unistd::User::from_name(name).ok().flatten().map(|u| u.uid.as_raw()),
            None => None,
        };
        runtime_dir::ensure_private(&crate::config::runtime_dir(), service_user)?;
    }
    let pidfile = PidFile::acquire(&config.pid_file)?;
    let sockets = if mode.runs_workers() {
        let options = listeners::ListenOptions {
            backlog: config.backlog,
            recv_buffer: config.socket_recv_buffer,
            send_buffer: config.socket_send_buffer,
        };
        listeners::WorkerSockets::bind(config.listen, config.tls.listen, config.workers, options)?
    } else {
        listeners::WorkerSockets::default()
    };
    let channel_listener = if mode.runs_broker(config) {
        // A Unix channel socket is unauthenticated: 0600, only our processes may connect.
        Some(
            runtime_dir::with_private_umask(|| crate::channel::bind_listener(&config.channel_listen(), config.backlog))
                .with_context(|| format!("cannot bind the channel server to {}", config.channel_listen()))?,
        )
    } else {
        None
    };
    let api_listener = match config.api.listen {
        Some(addr) if mode.runs_workers() => Some(
            listeners::bind_api_listener(addr, config.backlog)
                .with_context(|| format!("cannot listen on {addr} (api.listen)"))?,
        ),
        _ => None,
    };
    let control_path = config.control_socket();
    let control = runtime_dir::with_private_umask(|| listeners::bind_control_socket(&control_path))
        .with_context(|| format!("cannot bind the control socket {}", control_path.display()))?;
    Ok(Bound { pidfile, sockets, tls_material, channel_listener, api_listener, control })
}

/// The certificate and key the workers are started with.
struct TlsMaterial {
    /// Sealed memfd with the PEM chain and key (`tls::Material`).
    fd: OwnedFd,
    /// Expiry of the leaf certificate, for `status`.
    not_after: Option<String>,
}

/// Reads and checks `[tls]`'s certificate and key (with `tls.listen`), as the memfd the
/// workers inherit.
fn load_tls_material(config: &Config) -> anyhow::Result<Option<TlsMaterial>> {
    let Some(material) = crate::tls::Material::load(&config.tls)? else { return Ok(None) };
    let fd = material.to_memfd().context("cannot hand the TLS certificate to the workers (memfd)")?;
    Ok(Some(TlsMaterial { fd, not_after: material.not_after }))
}

/// `groupcast start [-d]`.
pub fn start(mut config: Config, source: ConfigSource, mode: Mode, daemon: bool) -> anyhow::Result<()> {
    // Installed first: a signal during startup waits until the children are up instead of
    // killing the master (the default action of SIGHUP, SIGUSR1, SIGUSR2).
    let signals = Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2])
        .context("cannot install signal handlers")?;
    let exe = current_exe()?;
    if mode == Mode::Broker {
        config.workers = 0;
    } else {
        raise_open_file_limit(&config);
    }
    let bound = bind_all(&config, mode)?;
    if !daemon {
        return run(config, source, exe, bound, signals, None);
    }
    config.log.syslog = true;
    // The daemon reports readiness (or why it failed) through this pipe, so `start -d`
    // returns only once the instance serves, with a meaningful exit code.
    let (mut ready_rx, ready_tx) = io::pipe().context("cannot create the readiness pipe")?;
    match daemonize::Daemonize::new().working_directory("/").execute() {
        daemonize::Outcome::Parent(Ok(_)) => {
            drop(ready_tx);
            // The daemon holds the pid lock through its copy of the descriptor; dropping ours
            // would unlock it for both (flock locks belong to the shared open file).
            std::mem::forget(bound);
            let mut failure = None;
            // Line by line: the daemon keeps its end open while it runs, so there is no EOF
            // to wait for on success.
            for line in BufReader::new(&mut ready_rx).lines().map_while(Result::ok) {
                if let Some(pid) = line.strip_prefix("ok ") {
                    println!("groupcast started as a daemon (pid {pid})");
                    return Ok(());
                } else if let Some(warning) = line.strip_prefix("warning ") {
                    eprintln!("groupcast: warning: {warning}");
                } else {
                    failure = Some(line);
                }
            }
            bail!("{}", failure.unwrap_or_else(|| "the daemon exited before it was ready (see syslog)".into()))
        }
        daemonize::Outcome::Parent(Err(e)) => bail!("cannot daemonize: {e}"),
        daemonize::Outcome::Child(Ok(_)) => {
            drop(ready_rx);
            if let Err(e) = crate::logging::use_syslog(&config.log.syslog_socket, &config.log.syslog_facility) {
                // Nowhere better to say it: stderr is /dev/null now.
                let _ = writeln!(&ready_tx, "warning {e}");
            }
            let report = ready_tx.try_clone().ok();
            let result = run(config, source, exe, bound, signals, Some(ready_tx));
            if let Err(e) = &result {
                error!("{e:#}");
                if let Some(mut report) = report {
                    let _ = writeln!(report, "{e:#}");
                }
            }
            result
        }
        daemonize::Outcome::Child(Err(e)) => bail!("cannot daemonize: {e}"),
    }
}

/// One descriptor per client: raise the soft limit to the hard one (children inherit it) and
/// say so if the connection limits cannot be reached under it.
fn raise_open_file_limit(config: &Config) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        warn!("cannot raise the open-file limit from {soft} to {hard}");
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    let wanted = config.limits.connections_per_worker(config.workers) as u64 + 64;
    if wanted > limit {
        warn!(
            "open-file limit {limit} is below the {wanted} descriptors a worker may need for \
             limits.max_connections_per_worker; accept will pause when it runs out (raise LimitNOFILE / ulimit -n)"
        );
    }
}

fn current_exe() -> anyhow::Result<PathBuf> {
    // Resolved once at start: /proc/self/exe would say "(deleted)" after an upgrade.
    std::env::current_exe().context("cannot find the path of the groupcast binary")
}

fn run(
    config: Config,
    source: ConfigSource,
    exe: PathBuf,
    bound: Bound,
    signals: Signals,
    ready: Option<io::PipeWriter>,
) -> anyhow::Result<()> {
    let Bound { mut pidfile, sockets, tls_material, channel_listener, api_listener, control } = bound;
    pidfile.write_pid().context("cannot write the pid file")?;
    let mut owned = vec![config.control_socket()];
    if let (Some(_), ChannelAddr::Unix(path)) = (&channel_listener, &*config.channel_listen()) {
        owned.push(path.clone());
    }
    // The private default directory must let the service user reach its sockets.
    let runtime_dir = crate::config::runtime_dir();
    if config.pid_file.parent() == Some(runtime_dir.as_path()) {
        owned.push(runtime_dir);
    }
    let owned: Vec<&std::path::Path> = owned.iter().map(PathBuf::as_path).collect();
    privileges::drop_privileges(config.user.as_deref(), config.group.as_deref(), &pidfile, &owned)?;
    let control = control_clients::ControlClients::new(control, FIRST_CONTROL_CLIENT)
        .context("cannot set up the control socket")?;
    let config_json = crate::control::encode_child_config(&config).context("cannot serialize the config")?;
    let mut slots = Vec::new();
    if channel_listener.is_some() {
        slots.push(Slot::new(Role::Channel));
    }
    slots.extend((0..sockets.workers).map(|i| Slot::new(Role::Worker(i))));
    if api_listener.is_some() {
        slots.push(Slot::new(Role::Api));
    }
    let per_ip = match sockets.workers {
        0 => None,
        workers => {
            let (fd, table) = PerIpTable::create(workers * COLUMNS_PER_WORKER)
                .context("cannot create the shared per-IP connection table")?;
            Some((fd, Columns::new(table)))
        }
    };
    let mut master = Master {
        config,
        config_json,
        source,
        exe,
        started: Instant::now(),
        sockets,
        tls_material,
        channel_listener,
        api_listener,
        control,
        slots,
        retiring: Vec::new(),
        reload: reload::ReloadState::default(),
        pidfile: Some(pidfile),
        per_ip,
    };
    let result = master.start_children().and_then(|()| {
        match (master.sockets.listen, master.sockets.tls_listen) {
            (listen, tls) if listen.is_some() || tls.is_some() => info!(
                "groupcast {} ready: {} workers on {}{}, channel {}{}",
                env!("CARGO_PKG_VERSION"),
                master.config.workers,
                listen.map_or_else(String::new, |a| format!("ws://{a}")),
                tls.map_or_else(String::new, |a| format!(" wss://{a}")),
                master.config.channel_target(),
                master.api_listener.as_ref().map_or_else(String::new, |(_, a)| format!(", api http://{a}")),
            ),
            _ => info!(
                "groupcast {} channel server ready on {}",
                env!("CARGO_PKG_VERSION"),
                master.config.channel_listen()
            ),
        }
        notify::notify(&format!("READY=1\nMAINPID={}", std::process::id()));
        if let Some(mut ready) = ready {
            let _ = writeln!(ready, "ok {}", std::process::id());
        }
        master.supervise(signals)
    });
    let graceful = matches!(result, Ok(Exit::Stop { graceful: true }));
    master.stop(graceful);
    result.map(|_| ())
}

impl Master {
    fn start_children(&mut self) -> anyhow::Result<()> {
        for i in 0..self.slots.len() {
            self.spawn_slot(i)?;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for slot in &mut self.slots {
            if let Some(proc) = slot.proc.as_mut() {
                proc.wait_ready(deadline).with_context(|| format!("{} failed to start", slot.role.name()))?;
            }
        }
        Ok(())
    }

    /// What a child of `role` inherits, at the descriptor numbers of `control::handoff`.
    fn inherited_fds(&self, role: Role) -> Vec<(std::os::fd::BorrowedFd<'_>, i32)> {
        use crate::control::handoff::{CHILD_PER_IP_FD, CHILD_TLS_LISTENER_FD, CHILD_TLS_MATERIAL_FD};
        use crate::control::CHILD_LISTENER_FD;
        match role {
            Role::Channel => {
                let fd = self.channel_listener.as_ref().expect("a channel slot exists only with its listener");
                vec![(fd.as_fd(), CHILD_LISTENER_FD)]
            }
            Role::Api => {
                let (fd, _) = self.api_listener.as_ref().expect("an api slot exists only with its listener");
                vec![(fd.as_fd(), CHILD_LISTENER_FD)]
            }
            Role::Worker(w) => {
                let mut fds = Vec::with_capacity(4);
                if let Some(fd) = self.sockets.plain.get(w) {
                    fds.push((fd.as_fd(), CHILD_LISTENER_FD));
                }
                if let Some(fd) = self.sockets.tls.get(w) {
                    fds.push((fd.as_fd(), CHILD_TLS_LISTENER_FD));
                }
                if let Some(material) = &self.tls_material {
                    fds.push((material.fd.as_fd(), CHILD_TLS_MATERIAL_FD));
                }
                if let Some((table, _)) = &self.per_ip {
                    fds.push((table.as_fd(), CHILD_PER_IP_FD));
                }
                fds
            }
        }
    }

    /// Starts a process for `role`, in the current reload generation (0 before any reload;
    /// a respawn after a crash takes the latest one), with `handoff` as its hand-off socket
    /// when it is to receive a worker's connections.
    fn spawn_proc(&self, role: Role, handoff: Option<std::os::fd::BorrowedFd<'_>>) -> anyhow::Result<ChildProc> {
        let per_ip = match (role, &self.per_ip) {
            (Role::Worker(_), Some((_, columns))) => Some(columns.lease()),
            _ => None,
        };
        let generation = self.reload.started;
        let mut env = Vec::new();
        if role == Role::Api {
            let port = |a: Option<std::net::SocketAddr>| a.map_or_else(String::new, |a| a.port().to_string());
            let ports = format!("{},{}", port(self.sockets.listen), port(self.sockets.tls_listen));
            env.push((crate::control::handoff::WS_PORTS_ENV, ports));
        }
        let extras = children::Extras { per_ip, generation, handoff, env };
        let proc = ChildProc::spawn(role, &self.exe, &self.config_json, &self.inherited_fds(role), extras)
            .with_context(|| format!("cannot start {} from {}", role.name(), self.exe.display()))?;
        info!("started {} (pid {})", role.name(), proc.pid());
        Ok(proc)
    }

    fn spawn_slot(&mut self, i: usize) -> anyhow::Result<()> {
        let proc = self.spawn_proc(self.slots[i].role, None)?;
        self.slots[i].proc = Some(proc);
        self.slots[i].respawn_at = None;
        Ok(())
    }

    fn supervise(&mut self, mut signals: Signals) -> anyhow::Result<Exit> {
        let mut poll = Poll::new().context("cannot create the event loop")?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        self.control.register(poll.registry(), CONTROL)?;
        let mut events = Events::with_capacity(64);
        loop {
            let mut wait = Duration::from_secs(1);
            let next = self.slots.iter().filter_map(|s| s.respawn_at).chain(self.control.next_deadline()).min();
            if let Some(at) = next {
                wait = wait.min(at.saturating_duration_since(Instant::now()));
            }
            if self.reload.busy() || !self.retiring.is_empty() {
                wait = wait.min(Duration::from_millis(20));
            }
            if let Err(e) = poll.poll(&mut events, Some(wait)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e).context("event loop failed");
                }
            }
            for event in events.iter() {
                match event.token() {
                    SIGNALS => {
                        for signal in signals.pending() {
                            if let Some(exit) = self.on_signal(signal) {
                                return Ok(exit);
                            }
                        }
                    }
                    token if token == CONTROL || self.control.owns(token) => self.control_event(poll.registry(), token),
                    _ => {}
                }
            }
            self.control.expire(poll.registry(), Instant::now());
            self.reap_children();
            self.respawn_due();
            self.advance_reload();
        }
    }

    fn on_signal(&mut self, signal: i32) -> Option<Exit> {
        match signal {
            SIGCHLD => None,
            SIGTERM | SIGINT => {
                info!("signal {signal}: stopping");
                Some(Exit::Stop { graceful: false })
            }
            SIGQUIT => {
                info!("signal {signal}: stopping gracefully (up to {} ms)", self.config.graceful_timeout_ms);
                Some(Exit::Stop { graceful: true })
            }
            SIGHUP | SIGUSR1 => {
                self.request_reload(reload::Requested { graceful: false, force_close: false });
                None
            }
            SIGUSR2 => {
                self.request_reload(reload::Requested { graceful: true, force_close: false });
                None
            }
            _ => None,
        }
    }

    fn reap_children(&mut self) {
        let in_reload = self.reload.slot_being_replaced();
        let handing_off = self.reload.slot_handing_off();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if handing_off == Some(i) {
                // The reload reads its report, then retires it (or finds it died).
                continue;
            }
            if let Some(how) = slot.reap() {
                error!("{} {how}", slot.role.name());
                if in_reload == Some(i) {
                    // Its replacement is starting already; no second one.
                    slot.respawn_at = None;
                }
            }
        }
        let now = Instant::now();
        self.retiring.retain_mut(|r| {
            if let Some(status) = r.proc.try_exit() {
                info!("retired {} (pid {}) {}", r.role.name(), r.proc.pid(), status);
                return false;
            }
            if now >= r.kill_at {
                warn!("retired {} (pid {}) did not exit in time; killing it", r.role.name(), r.proc.pid());
                r.proc.kill_and_wait();
                return false;
            }
            true
        });
    }

    fn respawn_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if self.slots[i].respawn_at.is_some_and(|at| at <= now) {
                self.slots[i].restarts += 1;
                if let Err(e) = self.spawn_slot(i) {
                    error!("{e:#}");
                    self.slots[i].respawn_at = Some(now + Duration::from_secs(1));
                }
            }
        }
    }

    /// Starts a new api process and retires the old one, which finishes the requests in hand
    /// (up to `API_DRAIN`) while the new one takes the listener's next connections.
    fn replace_api(&mut self) {
        let Some(i) = self.slots.iter().position(|s| s.role == Role::Api) else { return };
        let new = match self.spawn_proc(Role::Api, None) {
            Ok(new) => new,
            Err(e) => {
                error!("{e:#}; the running api process stays");
                return;
            }
        };
        self.slots[i].respawn_at = None;
        if let Some(mut old) = self.slots[i].proc.replace(new) {
            let shutdown = Request::Shutdown { code: close_code::GOING_AWAY, drain_ms: API_DRAIN.as_millis() as u64 };
            if !old.send(&shutdown) {
                old.signal(Signal::SIGTERM);
            }
            self.retiring.push(Retiring {
                role: Role::Api,
                proc: old,
                kill_at: Instant::now() + API_DRAIN + STOP_GRACE,
            });
        }
    }

    // ---- stopping --------------------------------------------------------------------------

    /// Stops every child and removes the files this instance created. Workers close their
    /// clients with 1001; graceful: they wait up to `graceful_timeout_ms` for clients to close.
    /// Whatever is still running after the drain plus `STOP_GRACE` is killed.
    fn stop(&mut self, graceful: bool) {
        notify::notify("STOPPING=1");
        self.reload.abort();
        let drain_ms = if graceful { self.config.graceful_timeout_ms } else { 0 };
        let shutdown = Request::Shutdown { code: close_code::GOING_AWAY, drain_ms };
        let mut workers: Vec<(Role, ChildProc)> = Vec::new();
        for slot in &mut self.slots {
            slot.respawn_at = None;
            if let (Role::Worker(_), Some(proc)) = (slot.role, slot.proc.take()) {
                workers.push((slot.role, proc));
            }
        }
        workers.extend(self.retiring.drain(..).map(|r| (r.role, r.proc)));
        for (_, proc) in &mut workers {
            if !proc.send(&shutdown) {
                proc.signal(Signal::SIGTERM);
            }
        }
        wait_or_kill(&mut workers, Duration::from_millis(drain_ms) + STOP_GRACE);
        // The broker goes last, so workers draining gracefully can still deliver.
        let mut channel: Vec<(Role, ChildProc)> =
            self.slots.iter_mut().filter_map(|s| s.proc.take().map(|p| (s.role, p))).collect();
        for (_, proc) in &channel {
            proc.signal(Signal::SIGTERM);
        }
        wait_or_kill(&mut channel, STOP_GRACE);
        let _ = std::fs::remove_file(self.config.control_socket());
        if let (Some(_), ChannelAddr::Unix(path)) = (&self.channel_listener, &*self.config.channel_listen()) {
            let _ = std::fs::remove_file(path);
        }
        if let Some(pidfile) = self.pidfile.take() {
            pidfile.remove();
        }
        info!("groupcast stopped");
    }

    /// Outcome of the last reload, for the status report.
    fn last_reload(&self) -> Option<ReloadOutcome> {
        self.reload.last.clone()
    }
}

/// Waits until every process in `procs` has exited, killing what is left after `limit`.
fn wait_or_kill(procs: &mut Vec<(Role, ChildProc)>, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !procs.is_empty() && Instant::now() < deadline {
        procs.retain_mut(|(role, proc)| match proc.try_exit() {
            Some(status) => {
                info!("{} (pid {}) {}", role.name(), proc.pid(), status);
                false
            }
            None => true,
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    for (role, proc) in procs.iter_mut() {
        warn!("{} (pid {}) did not stop in {:?}; killing it", role.name(), proc.pid(), limit);
        proc.kill_and_wait();
    }
    procs.clear();
}
