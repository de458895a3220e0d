//! The master's children. A `Slot` is a role (the channel server, worker 0..N-1) that outlives
//! its processes: when its `ChildProc` dies, the next one takes its place with the same index.
//! A `ChildProc` is one process started by fork + exec of the binary at the path the master
//! was started from, with its listeners and status link inherited (see `control::handoff`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::control::handoff::{CHILD_HANDOFF_FD, GENERATION_ENV, HANDOFF_ENV, PER_IP_COLUMN_ENV};
use crate::control::report::HandOffReport;
use crate::control::{MasterLink, Reply, Request, CHILD_LINK_FD, CONFIG_ENV};
use crate::per_ip::ColumnLease;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Channel,
    Worker(usize),
    /// The HTTP API (`[api] listen`, src/api/).
    Api,
}

impl Role {
    pub fn name(self) -> String {
        match self {
            Role::Channel => "channel".into(),
            Role::Worker(i) => format!("worker-{i}"),
            Role::Api => "api".into(),
        }
    }

    pub fn index(self) -> Option<usize> {
        match self {
            Role::Channel | Role::Api => None,
            Role::Worker(i) => Some(i),
        }
    }
}

/// What a child gets beyond its descriptors: a worker's per-IP column (`per_ip`) and its reload
/// `generation` named in its environment, for a worker that is to receive a hand-off its end
/// of the hand-off socket as 8, and any further environment (`env`).
pub struct Extras<'a> {
    pub per_ip: Option<ColumnLease>,
    pub generation: u64,
    pub handoff: Option<BorrowedFd<'a>>,
    pub env: Vec<(&'static str, String)>,
}

/// A child that lived less than this counts as a crash loop and is restarted with back-off.
const STABLE_AFTER: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One running child process and the master's end of its status link.
pub struct ChildProc {
    child: Child,
    link: MasterLink,
    pub started_at: Instant,
    /// The child has sent `Reply::Ready`.
    ready: bool,
    /// Its answer to `Request::HandOff`, kept by whichever reader of the link saw it (a
    /// `status` may be gathering figures when it arrives) until the reload takes it.
    pub handoff_report: Option<HandOffReport>,
    /// A worker's column of the per-IP table; freed (and zeroed) when this process is dropped
    /// after it was reaped.
    _per_ip: Option<ColumnLease>,
}

impl ChildProc {
    /// Starts `role` from `exe` with each of `inherit` at its descriptor number (the listeners
    /// and, for a worker, the per-IP table; see `control::handoff`), a fresh link as 4, and what
    /// `extras` adds.
    pub fn spawn(
        role: Role,
        exe: &Path,
        config_json: &str,
        inherit: &[(BorrowedFd<'_>, i32)],
        extras: Extras<'_>,
    ) -> io::Result<ChildProc> {
        let Extras { per_ip, generation, handoff, env: extra_env } = extras;
        let (ours, theirs) = UnixStream::pair()?;
        let mut command = Command::new(exe);
        match role {
            Role::Channel => command.arg("channel-child"),
            Role::Api => command.arg("api-child"),
            Role::Worker(i) => command.arg("worker").arg("--index").arg(i.to_string()),
        };
        // NOTIFY_SOCKET is the master's alone: systemd takes readiness from the main process.
        command.env(CONFIG_ENV, config_json).env_remove("NOTIFY_SOCKET").stdin(Stdio::null());
        command.envs(extra_env.iter().map(|(k, v)| (k, v)));
        if let Some(lease) = &per_ip {
            command.env(PER_IP_COLUMN_ENV, lease.column.to_string());
        }
        if let Role::Worker(_) = role {
            command.env(GENERATION_ENV, generation.to_string());
        }
        let mut fds = inherit.to_vec();
        fds.push((theirs.as_fd(), CHILD_LINK_FD));
        match handoff {
            Some(fd) => {
                command.env(HANDOFF_ENV, "1");
                fds.push((fd, CHILD_HANDOFF_FD));
            }
            // Never inherited from the master's own environment.
            None => {
                command.env_remove(HANDOFF_ENV);
            }
        }
        let child = crate::sys::spawn_with_fds(&mut command, &fds)?;
        Ok(ChildProc {
            child,
            link: MasterLink::new(ours),
            started_at: Instant::now(),
            ready: false,
            handoff_report: None,
            _per_ip: per_ip,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reaps the process if it has exited.
    pub fn try_exit(&mut self) -> Option<Ended> {
        let pid = self.pid();
        reaped(self.child.try_wait(), pid)
    }

    /// Waits up to `limit` for the process to exit (used once it is known to be dying).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<Ended> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.pid() as i32), signal);
    }

    pub fn kill_and_wait(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends one request that has no answer; false if the link is gone.
    pub fn send(&mut self, request: &Request) -> bool {
        self.link.send(request)
    }

    /// Sends a request with a descriptor attached (`Request::HandOff` and its socket).
    pub fn send_with_fd(&mut self, request: &Request, fd: BorrowedFd<'_>) -> bool {
        self.link.send_with_fd(request, fd)
    }

    /// Sends a request that expects an answer, first dropping answers to earlier requests that
    /// timed out so they are not taken for this one's.
    pub fn request(&mut self, request: &Request) -> bool {
        for reply in self.link.discard_pending() {
            self.note(reply);
        }
        self.link.send(request)
    }

    /// Keeps what a reply that is no answer says (`Ready`, a hand-off report); returns the
    /// reply if it is an answer.
    fn note(&mut self, reply: Reply<'static>) -> Option<Reply<'static>> {
        match reply {
            Reply::Ready => self.ready = true,
            Reply::HandOff(report) => self.handoff_report = Some(report),
            answer => return Some(answer),
        }
        None
    }

    /// Reads the answer to `request` (noting `Ready` and hand-off reports on the way), waiting
    /// until `deadline`.
    pub fn read_answer(&mut self, deadline: Instant) -> Option<Reply<'static>> {
        loop {
            let reply = self.link.read_reply(Some(deadline)).ok()??;
            if let Some(answer) = self.note(reply) {
                return Some(answer);
            }
        }
    }

    /// Waits until the child says it is ready, or `deadline`.
    pub fn wait_ready(&mut self, deadline: Instant) -> io::Result<()> {
        while !self.ready {
            match self.link.read_reply(Some(deadline))? {
                Some(reply) => {
                    self.note(reply);
                }
                None => return Err(io::Error::new(io::ErrorKind::TimedOut, "did not become ready in time")),
            }
        }
        Ok(())
    }

    /// Non-blocking readiness check for reloads: `Ok(true)` once `Ready` was read, `Err` if
    /// the process closed its link (it died).
    pub fn poll_ready(&mut self) -> io::Result<bool> {
        while !self.ready {
            match self.link.read_reply(None)? {
                Some(reply) => {
                    self.note(reply);
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Non-blocking check for the answer to `Request::HandOff`: `Ok(Some)` once it was read
    /// (here or by a `status` reading the link meanwhile), `Err` if the link closed without it.
    pub fn poll_reply(&mut self) -> io::Result<Option<HandOffReport>> {
        loop {
            if let Some(report) = self.handoff_report.take() {
                return Ok(Some(report));
            }
            match self.link.read_reply(None)? {
                Some(reply) => {
                    self.note(reply);
                }
                None => return Ok(None),
            }
        }
    }
}

pub struct Slot {
    pub role: Role,
    pub proc: Option<ChildProc>,
    /// Respawns after the first start.
    pub restarts: u32,
    /// Consecutive deaths shortly after start; drives the back-off.
    quick_deaths: u32,
    pub respawn_at: Option<Instant>,
}

impl Slot {
    pub fn new(role: Role) -> Slot {
        Slot { role, proc: None, restarts: 0, quick_deaths: 0, respawn_at: None }
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(ChildProc::pid)
    }

    /// If the process has exited, reaps it, schedules its replacement and says how it ended.
    pub fn reap(&mut self) -> Option<String> {
        let proc = self.proc.as_mut()?;
        let status = proc.try_exit()?;
        let lived = proc.started_at.elapsed();
        self.proc = None;
        if lived < STABLE_AFTER {
            self.quick_deaths += 1;
        } else {
            self.quick_deaths = 0;
        }
        // The first quick death restarts at once; a crash loop backs off 0.1 s, 0.2 s, ... 10 s.
        let delay = match self.quick_deaths {
            0 | 1 => Duration::ZERO,
            n => (FIRST_BACKOFF * 2u32.saturating_pow(n - 2)).min(MAX_BACKOFF),
        };
        self.respawn_at = Some(Instant::now() + delay);
        Some(format!("{} after {:.1}s; restarting in {:.1}s", status, lived.as_secs_f64(), delay.as_secs_f64()))
    }
}

/// How a child ended: its wait status, or, if it could not be had, why.
#[derive(Debug)]
pub enum Ended {
    Status(ExitStatus),
    Unknown(io::Error),
}

/// What a `try_wait` result says about a child: ended (with its status when known), or not
/// yet, or not known now (a transient error is retried at the next check).
fn reaped(result: io::Result<Option<ExitStatus>>, pid: u32) -> Option<Ended> {
    match result {
        Ok(status) => status.map(Ended::Status),
        // ECHILD: reaped already, by nobody we know of: gone, with no status to report
        // (not "exited with status 0", which would read as a clean exit).
        Err(e) if e.raw_os_error() == Some(nix::libc::ECHILD) => Some(Ended::Unknown(e)),
        Err(e) => {
            log::warn!("cannot check on pid {pid}: {e}");
            None
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Status(status) => f.write_str(&describe_exit(*status)),
            Ended::Unknown(e) => write!(f, "ended (exit status unknown: {e})"),
        }
    }
}

/// "exited with status 3" or "was killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            format!("was killed by signal {sig} ({})", Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("unknown"))
        }
        _ => "ended".to_owned(),
    }
}

/// Resident memory of `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_wait_is_never_read_as_a_clean_exit() {
        let gone = reaped(Err(io::Error::from_raw_os_error(nix::libc::ECHILD)), 1);
        assert!(matches!(gone, Some(Ended::Unknown(_))), "ECHILD: ended, status unknown");
        assert!(gone.unwrap().to_string().contains("unknown"));
        assert!(reaped(Err(io::Error::from_raw_os_error(nix::libc::EINTR)), 1).is_none(), "transient: ask again");
        assert!(reaped(Ok(None), 1).is_none());
    }
}
