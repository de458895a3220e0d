//! The master process: takes the pid file, binds every listener before forking, optionally
//! daemonizes, starts the channel server and the workers, then only supervises: reaps and
//! restarts children (with back-off in a crash loop), handles signals, and answers `status`
//! on its control socket. It stays single-threaded, because it forks.

pub mod children;
pub mod listeners;
pub mod pidfile;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use log::{error, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

use crate::config::{ChannelAddr, Config};
use crate::control::{ProcessStats, StatusReport, Totals};
use children::{Role, Slot};
use pidfile::PidFile;

const SIGNALS: Token = Token(0);
const CONTROL: Token = Token(1);
/// How long children get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a freshly started child may take to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Master {
    config: Config,
    config_json: String,
    /// The binary children are exec'd from: the path this master was started from, so a
    /// binary installed there later is what new children run.
    exe: PathBuf,
    started: Instant,
    listen: SocketAddr,
    worker_listeners: Vec<OwnedFd>,
    channel_listener: OwnedFd,
    control: UnixListener,
    slots: Vec<Slot>,
    pidfile: Option<PidFile>,
}

/// Everything bound before daemonizing, so failures reach the operator's terminal.
struct Bound {
    pidfile: PidFile,
    worker_listeners: Vec<OwnedFd>,
    listen: SocketAddr,
    channel_listener: OwnedFd,
    control: UnixListener,
}

fn bind_all(config: &Config) -> anyhow::Result<Bound> {
    let pidfile = PidFile::acquire(&config.pid_file)?;
    let (worker_listeners, listen) =
        listeners::bind_worker_listeners(config.listen, config.workers, config.backlog)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
    let channel_listener = crate::channel::bind_listener(&config.channel_listen, config.backlog)
        .with_context(|| {
            format!(
                "cannot bind the channel server to {}",
                config.channel_listen
            )
        })?;
    let control_path = config.control_socket();
    let control = listeners::bind_control_socket(&control_path)
        .with_context(|| format!("cannot bind the control socket {}", control_path.display()))?;
    Ok(Bound {
        pidfile,
        worker_listeners,
        listen,
        channel_listener,
        control,
    })
}

/// `groupcast start [-d]`.
pub fn start(mut config: Config, daemon: bool) -> anyhow::Result<()> {
    let exe = current_exe()?;
    let bound = bind_all(&config)?;
    if !daemon {
        return run(config, exe, bound, None);
    }
    config.syslog = true;
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
                    failure = Some(line.to_owned());
                }
            }
            bail!("{}", failure.unwrap_or_else(|| "the daemon exited before it was ready (see syslog)".into()))
        }
        daemonize::Outcome::Parent(Err(e)) => bail!("cannot daemonize: {e}"),
        daemonize::Outcome::Child(Ok(_)) => {
            drop(ready_rx);
            if let Err(e) =
                crate::logging::use_syslog(&config.syslog_socket, &config.syslog_facility)
            {
                // Nowhere better to say it: stderr is /dev/null now.
                let _ = writeln!(&ready_tx, "warning {e}");
            }
            let report = ready_tx.try_clone().ok();
            let result = run(config, exe, bound, Some(ready_tx));
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

fn current_exe() -> anyhow::Result<PathBuf> {
    // Resolved once at start: /proc/self/exe would say "(deleted)" after an upgrade.
    std::env::current_exe().context("cannot find the path of the groupcast binary")
}

fn run(
    config: Config,
    exe: PathBuf,
    bound: Bound,
    ready: Option<io::PipeWriter>,
) -> anyhow::Result<()> {
    let Bound {
        mut pidfile,
        worker_listeners,
        listen,
        channel_listener,
        control,
    } = bound;
    pidfile.write_pid().context("cannot write the pid file")?;
    let config_json = serde_json::to_string(&config).context("cannot serialize the config")?;
    let mut slots = vec![Slot::new(Role::Channel)];
    slots.extend((0..config.workers).map(|i| Slot::new(Role::Worker(i))));
    let mut master = Master {
        config,
        config_json,
        exe,
        started: Instant::now(),
        listen,
        worker_listeners,
        channel_listener,
        control,
        slots,
        pidfile: Some(pidfile),
    };
    let result = master.start_children().and_then(|()| {
        info!(
            "groupcast {} ready: {} workers on {}, channel {}",
            env!("CARGO_PKG_VERSION"),
            master.config.workers,
            master.listen,
            master.config.channel_listen
        );
        if let Some(mut ready) = ready {
            let _ = writeln!(ready, "ok {}", std::process::id());
        }
        master.supervise()
    });
    master.shutdown();
    result
}

impl Master {
    fn start_children(&mut self) -> anyhow::Result<()> {
        for i in 0..self.slots.len() {
            self.spawn(i)?;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for slot in &mut self.slots {
            slot.wait_ready(deadline)
                .with_context(|| format!("{} failed to start", slot.role.name()))?;
        }
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let role = self.slots[i].role;
        let listener = match role {
            Role::Channel => self.channel_listener.as_fd(),
            Role::Worker(w) => self.worker_listeners[w].as_fd(),
        };
        let pid = self.slots[i]
            .spawn(&self.exe, &self.config_json, listener)
            .with_context(|| format!("cannot start {} from {}", role.name(), self.exe.display()))?;
        info!("started {} (pid {pid})", role.name());
        Ok(())
    }

    fn supervise(&mut self) -> anyhow::Result<()> {
        let mut poll = Poll::new().context("cannot create the event loop")?;
        let mut signals =
            Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2])
                .context("cannot install signal handlers")?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let control_fd = self.control.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&control_fd), CONTROL, Interest::READABLE)?;
        let mut events = Events::with_capacity(16);
        loop {
            let timeout = self.next_respawn().map_or(Duration::from_secs(1), |at| {
                at.saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(1))
            });
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e).context("event loop failed");
                }
            }
            for event in events.iter() {
                match event.token() {
                    SIGNALS => {
                        for signal in signals.pending() {
                            match signal {
                                SIGCHLD => {}
                                SIGTERM | SIGINT | SIGQUIT => {
                                    info!("signal {signal}: stopping");
                                    return Ok(());
                                }
                                _ => warn!("signal {signal}: reload is not supported by this version; ignored"),
                            }
                        }
                    }
                    CONTROL => self.serve_control(),
                    _ => {}
                }
            }
            self.reap_children();
            self.respawn_due();
        }
    }

    fn next_respawn(&self) -> Option<Instant> {
        self.slots.iter().filter_map(|s| s.respawn_at).min()
    }

    fn reap_children(&mut self) {
        for slot in &mut self.slots {
            if let Some(how) = slot.reap() {
                error!("{} {how}", slot.role.name());
            }
        }
    }

    fn respawn_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if self.slots[i].respawn_at.is_some_and(|at| at <= now) {
                self.slots[i].restarts += 1;
                if let Err(e) = self.spawn(i) {
                    error!("{e:#}");
                    self.slots[i].respawn_at = Some(now + Duration::from_secs(1));
                }
            }
        }
    }

    // ---- the control socket ----------------------------------------------------------------

    fn serve_control(&mut self) {
        loop {
            match self.control.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = self.answer(stream) {
                        warn!("control request failed: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("control accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// One request line, one answer, then the connection closes.
    fn answer(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        BufReader::new(&stream).take(1024).read_line(&mut line)?;
        let mut out = &stream;
        match line.trim() {
            "status" => {
                let report = self.status_report();
                serde_json::to_writer(&mut out, &report).map_err(io::Error::other)?;
                out.write_all(b"\n")
            }
            "ping" => out.write_all(b"pong\n"),
            other => writeln!(out, "error unknown request {other:?}"),
        }
    }

    fn status_report(&mut self) -> StatusReport {
        for slot in &mut self.slots {
            slot.request_stats();
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.status_timeout_ms);
        let master_pid = std::process::id();
        let mut processes = vec![ProcessStats {
            role: "master".into(),
            pid: master_pid,
            state: "running".into(),
            rss_kib: children::rss_kib(master_pid),
            ..Default::default()
        }];
        let mut totals = Totals::default();
        for slot in &mut self.slots {
            let (role, index) = match slot.role {
                Role::Channel => ("channel", None),
                Role::Worker(i) => ("worker", Some(i)),
            };
            let mut stats = match slot.pid() {
                Some(_) => slot.collect_stats(deadline).map_or_else(
                    || ProcessStats {
                        state: "starting".into(),
                        ..Default::default()
                    },
                    |s| ProcessStats {
                        state: "running".into(),
                        ..s
                    },
                ),
                None => ProcessStats {
                    state: "down".into(),
                    ..Default::default()
                },
            };
            stats.role = role.into();
            stats.index = index;
            stats.pid = slot.pid().unwrap_or(0);
            stats.restarts = slot.restarts;
            stats.rss_kib = slot.pid().map_or(0, children::rss_kib);
            totals.restarts += u64::from(slot.restarts);
            if index.is_some() {
                totals.connections += stats.connections;
                totals.memberships += stats.memberships;
                totals.messages_in += stats.messages_in;
                totals.messages_out += stats.messages_out;
                totals.published += stats.published;
                totals.send_failures += stats.send_failures;
                totals.bad_requests += stats.bad_requests;
            }
            processes.push(stats);
        }
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            master_pid,
            uptime_secs: self.started.elapsed().as_secs(),
            listen: self.listen.to_string(),
            channel: self.config.channel_listen.to_string(),
            workers: self.config.workers,
            load: load_average(),
            processes,
            totals,
        }
    }

    // ---- stopping --------------------------------------------------------------------------

    /// Stops every child (SIGTERM, then SIGKILL after the grace period) and removes the files
    /// this instance created.
    fn shutdown(&mut self) {
        for slot in &mut self.slots {
            slot.respawn_at = None;
            if let Some(pid) = slot.pid() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while self.slots.iter().any(|s| s.child.is_some()) && Instant::now() < deadline {
            for slot in &mut self.slots {
                if slot.reap().is_some() {
                    info!("{} stopped", slot.role.name());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for slot in &mut self.slots {
            if let Some(child) = slot.child.as_mut() {
                warn!(
                    "{} did not stop in {:?}; killing it",
                    slot.role.name(),
                    STOP_GRACE
                );
                let _ = child.kill();
                let _ = child.wait();
            }
            slot.child = None;
        }
        let _ = std::fs::remove_file(self.config.control_socket());
        if let ChannelAddr::Unix(path) = &self.config.channel_listen {
            let _ = std::fs::remove_file(path);
        }
        if let Some(pidfile) = self.pidfile.take() {
            pidfile.remove();
        }
        info!("groupcast stopped");
    }
}

fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut parts = text.split_whitespace().map(|p| p.parse().unwrap_or(0.0));
    [
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
    ]
}
