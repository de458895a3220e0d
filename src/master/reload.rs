//! Reload: replace the workers one at a time while the master keeps every listener open, so
//! no connection is refused. For each worker index, a new process is started from the binary
//! now installed at the master's path (this is how new code is deployed) with the re-read
//! config; once it says `ready` it shares the index's listener. Then, by `reload_mode`:
//!
//! - `close` (or `reload --close`): the old one is told to close its clients with 1012
//!   (service restart) and exit; the new one takes the slot.
//! - `handoff`: the new one was started with one end of a fresh socket pair (descriptor 8);
//!   the old one gets `Request::HandOff` with the other end attached, moves its open
//!   connections to the new one (worker/handoff/) and answers `Reply::HandOff`. Meanwhile
//!   the old one keeps the slot. `moved` or `fell_back`: the new one takes the slot and the
//!   old one retires (it exits by itself). `failed`, no answer within `handoff_timeout_ms`
//!   plus `HANDOFF_SLACK`, or the old one dying: the new one is killed, the old one keeps
//!   serving and the reload fails.
//!
//! A graceful reload waits for the old one to drain before moving to the next index. A new
//! process that fails to start aborts the reload and leaves the old workers serving.
//!
//! The channel server is not replaced by a reload (in-flight messages would be lost); a
//! `restart` replaces it.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::children::{ChildProc, Role};
use super::{notify, Master, Retiring, READY_TIMEOUT, STOP_GRACE};
use crate::config::{Config, ReloadMode};
use crate::control::{HandOffOutcome, HandOffReport, ReloadOutcome, Request};
use crate::ws::close_code;

/// How long past `handoff_timeout_ms` the master waits for the old worker's report (it rolls
/// back at its own timeout and then answers) before giving up on it.
const HANDOFF_SLACK: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct ReloadState {
    /// Reloads started so far; the running or last one has this generation.
    pub started: u64,
    job: Option<Job>,
    /// A reload requested while one runs; starts when it ends.
    pending: Option<Requested>,
    pub last: Option<ReloadOutcome>,
}

/// What a reload was asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requested {
    /// `-g`: wait for each old worker's clients to go before the next index.
    pub graceful: bool,
    /// `--close`: close mode for this reload, whatever `reload_mode` says.
    pub force_close: bool,
}

struct Job {
    generation: u64,
    graceful: bool,
    mode: ReloadMode,
    /// Slot indexes still to replace.
    queue: VecDeque<usize>,
    step: Step,
    replaced: usize,
    began: Instant,
    /// The old workers' reports, one per slot handed off so far.
    handoffs: Vec<HandOffReport>,
}

enum Step {
    Next,
    /// A new process for `slot` is starting; the old one still serves. Hand-off mode: the
    /// master's copy of the old worker's end of the hand-off socket.
    Starting {
        slot: usize,
        candidate: ChildProc,
        deadline: Instant,
        handoff: Option<OwnedFd>,
    },
    /// The old process (`old_pid`, still in the slot) moves its connections to `candidate`;
    /// waiting for its `Reply::HandOff`.
    HandingOff {
        slot: usize,
        candidate: ChildProc,
        old_pid: u32,
        deadline: Instant,
    },
    /// Graceful: the old process of the previous index is draining; wait for it.
    Draining {
        old_pid: u32,
    },
}

impl ReloadState {
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    pub fn in_progress(&self) -> bool {
        self.job.is_some() || self.pending.is_some()
    }

    /// The slot whose replacement is starting: if its old process dies now, the replacement
    /// takes the slot instead of a respawn. Not while handing off: then the replacement is
    /// killed and the slot respawns as after any crash.
    pub fn slot_being_replaced(&self) -> Option<usize> {
        match self.job.as_ref()?.step {
            Step::Starting { slot, .. } => Some(slot),
            _ => None,
        }
    }

    /// The slot whose old process is handing its connections over: the reload, not the
    /// reaper, reads its last words (the report may come just before it exits) and lets the
    /// reaper have it once the hand-off is over.
    pub fn slot_handing_off(&self) -> Option<usize> {
        match self.job.as_ref()?.step {
            Step::HandingOff { slot, .. } => Some(slot),
            _ => None,
        }
    }

    /// The replacement receiving a hand-off (in slot `slot_handing_off`): `status` shows it (state
    /// `receiving`) next to the old process still in the slot.
    pub fn receiving(&mut self) -> Option<&mut ChildProc> {
        match &mut self.job.as_mut()?.step {
            Step::HandingOff { candidate, .. } => Some(candidate),
            _ => None,
        }
    }

    /// Kills a starting or receiving replacement (the master is stopping).
    pub fn abort(&mut self) {
        if let Some(Job { step: Step::Starting { candidate, .. } | Step::HandingOff { candidate, .. }, .. }) =
            self.job.as_mut()
        {
            candidate.kill_and_wait();
        }
        self.job = None;
        self.pending = None;
    }
}

impl Master {
    /// Starts a reload, or queues it behind the running one (requests made meanwhile merge:
    /// graceful if any was, close mode if any asked for it).
    pub(super) fn request_reload(&mut self, requested: Requested) {
        if self.reload.busy() {
            info!("reload requested while one runs; it will follow");
            let before = self.reload.pending.unwrap_or_default();
            self.reload.pending = Some(Requested {
                graceful: before.graceful || requested.graceful,
                force_close: before.force_close || requested.force_close,
            });
            return;
        }
        self.begin_reload(requested);
    }

    fn begin_reload(&mut self, requested: Requested) {
        let graceful = requested.graceful;
        self.reload.started += 1;
        let generation = self.reload.started;
        notify::notify("RELOADING=1");
        info!("reload {generation} ({}) started", if graceful { "graceful" } else { "immediate" });
        let reread = self.reread_config();
        // The re-read config decides, so a reload can switch the mode for itself.
        let mode = if requested.force_close { ReloadMode::Close } else { self.config.reload_mode };
        if let Err(e) = reread {
            self.finish_reload(
                Job::new(generation, graceful, mode, VecDeque::new()),
                false,
                format!("config not reloaded: {e:#}; workers left as they were"),
            );
            return;
        }
        info!("reload {generation}: {} mode", mode.name());
        let queue = self.slots.iter().enumerate().filter(|(_, s)| matches!(s.role, Role::Worker(_))).map(|(i, _)| i);
        self.reload.job = Some(Job::new(generation, graceful, mode, queue.collect()));
        self.advance_reload();
    }

    /// Reads the config again; settings that need a restart keep their running values.
    fn reread_config(&mut self) -> anyhow::Result<()> {
        let fresh = Config::load(self.source.path.as_deref(), &self.source.overrides)?;
        let fixed = self.config.fixed_settings_changed(&fresh);
        if !fixed.is_empty() {
            warn!("reload keeps the running {}: changing them needs a restart", fixed.join(", "));
        }
        let config = self.config.reloaded(fresh);
        // The certificate and key are read again (renewal is a reload) and checked before any
        // worker is replaced: a broken pair fails the reload and the old workers keep serving.
        let tls_material = super::load_tls_material(&config)?;
        if let Some(level) = crate::config::log_level_filter(&config.log.level) {
            log::set_max_level(level);
        }
        self.config_json = crate::control::encode_child_config(&config)?;
        self.config = config;
        self.tls_material = tls_material;
        Ok(())
    }

    /// Moves the running reload on as far as it can go without waiting.
    pub(super) fn advance_reload(&mut self) {
        while let Some(mut job) = self.reload.job.take() {
            match std::mem::replace(&mut job.step, Step::Next) {
                Step::Next => {
                    let Some(slot) = job.queue.pop_front() else {
                        let message = self.summary(&job);
                        self.finish_reload(job, true, message);
                        continue;
                    };
                    match self.start_candidate(slot, job.mode) {
                        Ok((candidate, handoff)) => {
                            let deadline = Instant::now() + READY_TIMEOUT;
                            job.step = Step::Starting { slot, candidate, deadline, handoff };
                            self.reload.job = Some(job);
                        }
                        Err(e) => self.fail(job, format!("{e:#}")),
                    }
                }
                Step::Starting { slot, mut candidate, deadline, handoff } => match candidate.poll_ready() {
                    Ok(true) => {
                        match handoff {
                            Some(end) => self.begin_hand_off(slot, candidate, end, &mut job),
                            None => self.hand_over(slot, candidate, &mut job),
                        }
                        self.reload.job = Some(job);
                    }
                    Ok(false) if Instant::now() < deadline => {
                        job.step = Step::Starting { slot, candidate, deadline, handoff };
                        self.reload.job = Some(job);
                        return;
                    }
                    outcome => {
                        let why = match outcome {
                            // The link closes a moment before the process is reapable.
                            Err(_) => match candidate.wait_exit(Duration::from_secs(1)) {
                                Some(status) => status.to_string(),
                                None => "closed its status link".to_owned(),
                            },
                            _ => format!("was not ready within {READY_TIMEOUT:?}"),
                        };
                        candidate.kill_and_wait();
                        let role = self.slots[slot].role.name();
                        self.fail(job, format!("new {role} from {} {why}", self.exe.display()));
                    }
                },
                Step::HandingOff { slot, candidate, old_pid, deadline } => {
                    match self.poll_hand_off(slot, old_pid, deadline) {
                        Polled::Waiting => {
                            job.step = Step::HandingOff { slot, candidate, old_pid, deadline };
                            self.reload.job = Some(job);
                            return;
                        }
                        Polled::Report(report) => self.hand_off_ended(slot, candidate, report, job),
                        Polled::Lost(why) => self.hand_off_lost(slot, candidate, why, job),
                    }
                }
                Step::Draining { old_pid } => {
                    if self.retiring.iter().any(|r| r.proc.pid() == old_pid) {
                        job.step = Step::Draining { old_pid };
                        self.reload.job = Some(job);
                        return;
                    }
                    self.reload.job = Some(job);
                }
            }
        }
    }

    /// Starts the replacement of `slot`; in hand-off mode with its end of a fresh hand-off
    /// socket, returning the master's copy of the other end (for the old worker).
    fn start_candidate(&mut self, slot: usize, mode: ReloadMode) -> anyhow::Result<(ChildProc, Option<OwnedFd>)> {
        let role = self.slots[slot].role;
        // Only a running old worker can hand anything over.
        if mode == ReloadMode::Close || self.slots[slot].proc.is_none() {
            return Ok((self.spawn_proc(role, None)?, None));
        }
        let (for_old, for_new) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| anyhow::anyhow!("cannot create the hand-off socket for {}: {e}", role.name()))?;
        // The master's copy of the new worker's end closes when `for_new` drops, right after
        // the spawn: the new worker then holds the only one.
        let candidate = self.spawn_proc(role, Some(for_new.as_fd()))?;
        Ok((candidate, Some(for_old)))
    }

    /// The new process is ready: the old one (if still there) gets `HandOff` and the other
    /// end of the hand-off socket; the new one waits as the candidate. An old process that is
    /// gone or cannot be told is replaced as in close mode.
    fn begin_hand_off(&mut self, slot: usize, candidate: ChildProc, end: OwnedFd, job: &mut Job) {
        let timeout_ms = self.config.handoff_timeout_ms;
        let request = Request::HandOff { generation: job.generation, timeout_ms };
        let sent = match self.slots[slot].proc.as_mut() {
            Some(old) => old.send_with_fd(&request, end.as_fd()).then(|| old.pid()),
            None => None,
        };
        // The old worker holds its own copy now (or never will).
        drop(end);
        let Some(old_pid) = sent else {
            // The new one finds its hand-off socket closed and serves without one.
            warn!("{}: the old process is gone; replacing it without a hand-off", self.slots[slot].role.name());
            self.hand_over(slot, candidate, job);
            return;
        };
        info!(
            "{} (pid {}) ready; pid {old_pid} hands its connections over to it",
            self.slots[slot].role.name(),
            candidate.pid()
        );
        let deadline = Instant::now() + Duration::from_millis(timeout_ms) + HANDOFF_SLACK;
        job.step = Step::HandingOff { slot, candidate, old_pid, deadline };
    }

    /// Looks for the old worker's report without blocking. The slot is not reaped meanwhile
    /// (`slot_handing_off`), so a report sent just before the old process exits is read.
    fn poll_hand_off(&mut self, slot: usize, old_pid: u32, deadline: Instant) -> Polled {
        let old = self.slots[slot].proc.as_mut().filter(|p| p.pid() == old_pid);
        let Some(old) = old else {
            return Polled::Lost(format!("the old process (pid {old_pid}) is gone"));
        };
        match old.poll_reply() {
            Ok(Some(report)) => Polled::Report(report),
            Ok(None) if Instant::now() < deadline => Polled::Waiting,
            Ok(None) => Polled::Lost(format!(
                "the old process (pid {old_pid}) did not report within handoff_timeout_ms + {HANDOFF_SLACK:?}"
            )),
            // Its link closes when it dies; the reaper restarts the slot once the reload is over.
            Err(_) => Polled::Lost(format!("the old process (pid {old_pid}) died during the hand-off")),
        }
    }

    /// The old worker reported: `moved`/`fell_back` put the candidate in the slot, `failed`
    /// keeps the old one and ends the reload.
    fn hand_off_ended(&mut self, slot: usize, mut candidate: ChildProc, report: HandOffReport, mut job: Job) {
        let role = self.slots[slot].role;
        info!("reload {}: {}", job.generation, report.line());
        let outcome = report.outcome;
        let reason = report.reason.clone();
        job.handoffs.push(report);
        if outcome == HandOffOutcome::Failed {
            candidate.kill_and_wait();
            self.fail(job, format!("{} hand-off failed: {reason}", role.name()));
            return;
        }
        let old = self.slots[slot].proc.replace(candidate);
        self.slots[slot].respawn_at = None;
        job.replaced += 1;
        let Some(old) = old else {
            self.reload.job = Some(job);
            return;
        };
        let drain = if job.graceful { Duration::from_millis(self.config.graceful_timeout_ms) } else { Duration::ZERO };
        // It exits by itself once what it still holds (TLS clients closed with 1012, closing
        // ones) has finished its close handshake (worker/handoff/send.rs); killed if not.
        let old_pid = old.pid();
        self.retiring.push(Retiring { role, proc: old, kill_at: Instant::now() + drain + STOP_GRACE });
        if job.graceful {
            job.step = Step::Draining { old_pid };
        }
        self.reload.job = Some(job);
    }

    /// No report will come: the candidate is killed, the old worker (if alive) keeps the slot.
    fn hand_off_lost(&mut self, slot: usize, mut candidate: ChildProc, why: String, mut job: Job) {
        candidate.kill_and_wait();
        let index = self.slots[slot].role.index().unwrap_or(slot);
        job.handoffs.push(HandOffReport {
            generation: job.generation,
            index,
            outcome: HandOffOutcome::Failed,
            reason: why.clone(),
            ..Default::default()
        });
        self.fail(job, format!("{} hand-off failed: {why}", self.slots[slot].role.name()));
    }

    /// The new process is ready: it takes the slot, the old one retires.
    fn hand_over(&mut self, slot: usize, candidate: ChildProc, job: &mut Job) {
        let role = self.slots[slot].role;
        info!("{} (pid {}) ready; replacing the old one", role.name(), candidate.pid());
        let old = self.slots[slot].proc.replace(candidate);
        self.slots[slot].respawn_at = None;
        job.replaced += 1;
        let Some(mut old) = old else { return };
        let drain = if job.graceful { Duration::from_millis(self.config.graceful_timeout_ms) } else { Duration::ZERO };
        let shutdown = Request::Shutdown { code: close_code::SERVICE_RESTART, drain_ms: duration_ms(drain) };
        if !old.send(&shutdown) {
            old.signal(nix::sys::signal::Signal::SIGTERM);
        }
        let old_pid = old.pid();
        self.retiring.push(Retiring { role, proc: old, kill_at: Instant::now() + drain + STOP_GRACE });
        if job.graceful {
            job.step = Step::Draining { old_pid };
        }
    }

    /// The message of a reload that replaced every worker.
    fn summary(&self, job: &Job) -> String {
        let secs = job.began.elapsed().as_secs_f64();
        let mut message = format!("reloaded {} workers from {} in {secs:.1}s", job.replaced, self.exe.display());
        if job.mode == ReloadMode::Handoff {
            let moved: u64 = job.handoffs.iter().filter(|r| r.outcome == HandOffOutcome::Moved).map(|r| r.moved).sum();
            let fell_back: Vec<String> = job
                .handoffs
                .iter()
                .filter(|r| r.outcome == HandOffOutcome::FellBack)
                .map(|r| format!("worker-{}", r.index))
                .collect();
            message += &format!("; handed over {moved} connections");
            if !fell_back.is_empty() {
                message += &format!("; {} fell back to closing their clients with 1012", fell_back.join(", "));
            }
        }
        message
    }

    fn fail(&mut self, job: Job, why: String) {
        let message = format!(
            "reload failed after replacing {} workers: {why}; the remaining workers keep serving",
            job.replaced
        );
        self.finish_reload(job, false, message);
    }

    fn finish_reload(&mut self, job: Job, ok: bool, message: String) {
        let generation = job.generation;
        if ok {
            info!("reload {generation}: {message}");
        } else {
            error!("reload {generation}: {message}");
        }
        self.reload.last = Some(ReloadOutcome {
            generation,
            ok,
            message,
            graceful: job.graceful,
            mode: job.mode.name().to_owned(),
            handoffs: job.handoffs,
        });
        self.reload.job = None;
        if ok {
            // The api process runs the new binary and config (a rotated key) from now on.
            self.replace_api();
        }
        notify::notify("READY=1");
        if let Some(requested) = self.reload.pending.take() {
            self.begin_reload(requested);
        }
    }
}

/// What the old worker's link says during a hand-off.
enum Polled {
    Waiting,
    Report(HandOffReport),
    /// No report will come (why).
    Lost(String),
}

impl Job {
    fn new(generation: u64, graceful: bool, mode: ReloadMode, queue: VecDeque<usize>) -> Job {
        Job {
            generation,
            graceful,
            mode,
            queue,
            step: Step::Next,
            replaced: 0,
            began: Instant::now(),
            handoffs: Vec::new(),
        }
    }
}

/// Whole milliseconds of `d`, saturating (a drain time is bounded at load anyway).
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
