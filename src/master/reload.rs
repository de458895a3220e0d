//! Reload: replace the workers one at a time while the master keeps every listener open, so
//! no connection is refused. For each worker index, a new process is started from the binary
//! now installed at the master's path (this is how new code is deployed) with the re-read
//! config; once it says `ready` it shares the index's listener, and only then is the old one
//! told to close its clients with 1012 (service restart) and exit. A graceful reload waits
//! for the old one to drain before moving to the next index. A new process that fails to
//! start aborts the reload and leaves the old workers serving.
//!
//! The channel server is not replaced by a reload (in-flight messages would be lost); a
//! `restart` replaces it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::children::{ChildProc, Role};
use super::{notify, Master, Retiring, READY_TIMEOUT, STOP_GRACE};
use crate::config::Config;
use crate::control::{ReloadOutcome, Request};
use crate::ws::close_code;

#[derive(Default)]
pub struct ReloadState {
    /// Reloads started so far; the running or last one has this generation.
    pub started: u64,
    job: Option<Job>,
    /// A reload requested while one runs; starts when it ends (true: graceful).
    pending: Option<bool>,
    pub last: Option<ReloadOutcome>,
}

struct Job {
    generation: u64,
    graceful: bool,
    /// Slot indexes still to replace.
    queue: VecDeque<usize>,
    step: Step,
    replaced: usize,
    began: Instant,
}

enum Step {
    Next,
    /// A new process for `slot` is starting; the old one still serves.
    Starting {
        slot: usize,
        candidate: ChildProc,
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

    pub fn slot_being_replaced(&self) -> Option<usize> {
        match self.job.as_ref()?.step {
            Step::Starting { slot, .. } => Some(slot),
            _ => None,
        }
    }

    /// Kills a starting replacement (the master is stopping).
    pub fn abort(&mut self) {
        if let Some(Job { step: Step::Starting { candidate, .. }, .. }) = self.job.as_mut() {
            candidate.kill_and_wait();
        }
        self.job = None;
        self.pending = None;
    }
}

impl Master {
    pub(super) fn request_reload(&mut self, graceful: bool) {
        if self.reload.busy() {
            info!("reload requested while one runs; it will follow");
            self.reload.pending = Some(self.reload.pending.unwrap_or(false) || graceful);
            return;
        }
        self.begin_reload(graceful);
    }

    fn begin_reload(&mut self, graceful: bool) {
        self.reload.started += 1;
        let generation = self.reload.started;
        notify::notify("RELOADING=1");
        info!("reload {generation} ({}) started", if graceful { "graceful" } else { "immediate" });
        if let Err(e) = self.reread_config() {
            self.finish_reload(
                generation,
                graceful,
                false,
                format!("config not reloaded: {e:#}; workers left as they were"),
            );
            return;
        }
        let queue = self.slots.iter().enumerate().filter(|(_, s)| matches!(s.role, Role::Worker(_))).map(|(i, _)| i);
        self.reload.job = Some(Job {
            generation,
            graceful,
            queue: queue.collect(),
            step: Step::Next,
            replaced: 0,
            began: Instant::now(),
        });
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
                        let secs = job.began.elapsed().as_secs_f64();
                        let message =
                            format!("reloaded {} workers from {} in {secs:.1}s", job.replaced, self.exe.display());
                        self.finish_reload(job.generation, job.graceful, true, message);
                        continue;
                    };
                    let role = self.slots[slot].role;
                    match self.spawn_proc(role) {
                        Ok(candidate) => {
                            job.step = Step::Starting { slot, candidate, deadline: Instant::now() + READY_TIMEOUT };
                            self.reload.job = Some(job);
                        }
                        Err(e) => self.fail(job, format!("{e:#}")),
                    }
                }
                Step::Starting { slot, mut candidate, deadline } => match candidate.poll_ready() {
                    Ok(true) => {
                        self.hand_over(slot, candidate, &mut job);
                        self.reload.job = Some(job);
                    }
                    Ok(false) if Instant::now() < deadline => {
                        job.step = Step::Starting { slot, candidate, deadline };
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

    fn fail(&mut self, job: Job, why: String) {
        self.finish_reload(
            job.generation,
            job.graceful,
            false,
            format!(
                "reload failed after replacing {} workers: {why}; the remaining workers keep serving",
                job.replaced
            ),
        );
    }

    fn finish_reload(&mut self, generation: u64, graceful: bool, ok: bool, message: String) {
        if ok {
            info!("reload {generation}: {message}");
        } else {
            error!("reload {generation}: {message}");
        }
        self.reload.last = Some(ReloadOutcome { generation, ok, message, graceful });
        self.reload.job = None;
        notify::notify("READY=1");
        if let Some(graceful) = self.reload.pending.take() {
            self.begin_reload(graceful);
        }
    }
}

/// Whole milliseconds of `d`, saturating (a drain time is bounded at load anyway).
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
