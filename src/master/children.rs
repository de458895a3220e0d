//! The master's children: one slot per role (the channel server, worker 0..N-1), each started
//! by fork + exec of the binary at the path the master was started from, with its listener and
//! status link inherited. A slot outlives its processes: when one dies, the next takes its place
//! with the same index.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::control::{ProcessStats, CHILD_LINK_FD, CHILD_LISTENER_FD, CONFIG_ENV};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Channel,
    Worker(usize),
}

impl Role {
    pub fn name(self) -> String {
        match self {
            Role::Channel => "channel".into(),
            Role::Worker(i) => format!("worker-{i}"),
        }
    }
}

/// A child that lived less than this counts as a crash loop and is restarted with back-off.
const STABLE_AFTER: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub struct Slot {
    pub role: Role,
    pub child: Option<Child>,
    /// Master's end of the status link.
    link: Option<UnixStream>,
    /// Bytes read from the link that do not yet form a line.
    linebuf: Vec<u8>,
    pub started_at: Instant,
    /// Respawns after the first start.
    pub restarts: u32,
    /// Consecutive deaths shortly after start; drives the back-off.
    quick_deaths: u32,
    pub respawn_at: Option<Instant>,
}

impl Slot {
    pub fn new(role: Role) -> Slot {
        Slot {
            role,
            child: None,
            link: None,
            linebuf: Vec::new(),
            started_at: Instant::now(),
            restarts: 0,
            quick_deaths: 0,
            respawn_at: None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts this slot's process with `listener` as descriptor 3 and the link as 4.
    pub fn spawn(
        &mut self,
        exe: &Path,
        config_json: &str,
        listener: BorrowedFd<'_>,
    ) -> io::Result<u32> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut command = Command::new(exe);
        match self.role {
            Role::Channel => command.arg("channel-child"),
            Role::Worker(i) => command.arg("worker").arg("--index").arg(i.to_string()),
        };
        command.env(CONFIG_ENV, config_json).stdin(Stdio::null());
        let child = crate::sys::spawn_with_fds(
            &mut command,
            &[
                (listener, CHILD_LISTENER_FD),
                (theirs.as_fd(), CHILD_LINK_FD),
            ],
        )?;
        let pid = child.id();
        self.child = Some(child);
        self.link = Some(ours);
        self.linebuf.clear();
        self.started_at = Instant::now();
        self.respawn_at = None;
        Ok(pid)
    }

    /// If the process has exited, reaps it and returns how; schedules the respawn.
    pub fn reap(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        let status = match child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return None,
            Err(e) => return Some(format!("cannot be waited for: {e}")),
        };
        self.child = None;
        self.link = None;
        let lived = self.started_at.elapsed();
        if lived < STABLE_AFTER {
            self.quick_deaths += 1;
        } else {
            self.quick_deaths = 0;
        }
        let delay = if self.quick_deaths <= 1 {
            Duration::ZERO
        } else {
            (Duration::from_millis(100) * 2u32.saturating_pow(self.quick_deaths - 2))
                .min(MAX_BACKOFF)
        };
        self.respawn_at = Some(Instant::now() + delay);
        Some(describe_exit(status, lived, delay))
    }

    /// Waits until the child says `ready` on its link, or `deadline`.
    pub fn wait_ready(&mut self, deadline: Instant) -> io::Result<()> {
        match self.read_line(deadline)? {
            Some(line) if line == "ready" => Ok(()),
            Some(other) => Err(io::Error::other(format!("unexpected first line {other:?}"))),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "did not become ready in time",
            )),
        }
    }

    /// Sends a stats request; the answer is collected by `collect_stats`.
    pub fn request_stats(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        // Drop answers to earlier requests that timed out, so they are not taken for this one.
        if link.set_nonblocking(true).is_ok() {
            let mut scratch = [0u8; 4096];
            while let Ok(n) = link.read(&mut scratch) {
                if n == 0 {
                    break;
                }
            }
            let _ = link.set_nonblocking(false);
        }
        self.linebuf.clear();
        if link.write_all(b"stats\n").is_err() {
            self.link = None;
        }
    }

    /// Reads the answer to `request_stats`, skipping the `ready` line, until `deadline`.
    pub fn collect_stats(&mut self, deadline: Instant) -> Option<ProcessStats> {
        loop {
            let line = self.read_line(deadline).ok()??;
            if line == "ready" {
                continue;
            }
            return serde_json::from_str(&line).ok();
        }
    }

    fn read_line(&mut self, deadline: Instant) -> io::Result<Option<String>> {
        let Some(link) = self.link.as_mut() else {
            return Ok(None);
        };
        loop {
            if let Some(nl) = self.linebuf.iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.linebuf[..nl]).into_owned();
                self.linebuf.drain(..=nl);
                return Ok(Some(line));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            link.set_read_timeout(Some(left))?;
            let mut buf = [0u8; 4096];
            match link.read(&mut buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the process closed its link",
                    ))
                }
                Ok(n) => self.linebuf.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn describe_exit(status: std::process::ExitStatus, lived: Duration, delay: Duration) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!(
            "was killed by signal {sig} ({})",
            nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("unknown")
        ),
        _ => "ended".to_owned(),
    };
    format!(
        "{how} after {:.1}s; restarting in {:.1}s",
        lived.as_secs_f64(),
        delay.as_secs_f64()
    )
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
