//! The master's answers on its control socket: one request line (`status`, `connections`,
//! `ping`, `reload close [graceful]`), one answer line (JSON, or `ok`/`error` words), then the connection closes (control_clients.rs does the
//! socket side without blocking). Figures are gathered live from each child over its status
//! link, within `status_timeout_ms`.

use std::time::{Duration, Instant};

use mio::{Registry, Token};

use log::warn;

use super::children::{rss_kib, ChildProc, Role};
use super::control_clients::Event;
use super::Master;
use crate::control::{binary_identity, ConnectionList, ProcessStats, Reply, Request, StatusReport, Totals};

impl Master {
    /// Accepts control clients, or reads/writes for one; a complete request is answered here.
    pub(super) fn control_event(&mut self, registry: &Registry, token: Token) {
        if token == super::CONTROL {
            self.control.accept(registry);
            return;
        }
        if let Event::Request { key, line } = self.control.ready(registry, token) {
            let answer = self.answer(&line);
            self.control.answer(registry, key, &answer);
        }
    }

    /// The answer line to one request line.
    fn answer(&mut self, request: &str) -> Vec<u8> {
        let mut out = match request {
            "status" => serde_json::to_vec(&self.status_report()),
            "connections" => serde_json::to_vec(&self.connection_list()),
            "ping" => Ok(b"pong".to_vec()),
            "reload close" | "reload close graceful" => {
                let graceful = request.ends_with(" graceful");
                let generation = self.reload_from_control(graceful);
                Ok(format!("ok {generation}").into_bytes())
            }
            other => Ok(format!("error unknown request {other:?}").into_bytes()),
        }
        .unwrap_or_else(|e| {
            warn!("cannot encode a control answer: {e}");
            b"error cannot encode the answer".to_vec()
        });
        out.push(b'\n');
        out
    }

    /// `reload --close`: a close-mode reload, started now or after the running one. Returns
    /// the generation the CLI waits for in `last_reload`.
    fn reload_from_control(&mut self, graceful: bool) -> u64 {
        let queued = self.reload.busy();
        self.request_reload(super::reload::Requested { graceful, force_close: true });
        if queued {
            self.reload.started + 1
        } else {
            self.reload.started
        }
    }

    fn status_report(&mut self) -> StatusReport {
        for slot in &mut self.slots {
            if let Some(proc) = slot.proc.as_mut() {
                proc.request(&Request::Stats);
            }
        }
        for r in &mut self.retiring {
            r.proc.request(&Request::Stats);
        }
        if let Some(candidate) = self.reload.receiving() {
            candidate.request(&Request::Stats);
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.status_timeout_ms);
        let master_pid = std::process::id();
        let (version, binary_mtime) = binary_identity();
        let mut processes = vec![ProcessStats {
            role: "master".into(),
            pid: master_pid,
            state: "running".into(),
            version,
            binary_mtime,
            uptime_secs: self.started.elapsed().as_secs(),
            rss_kib: rss_kib(master_pid),
            log_dropped: crate::logging::dropped_lines(),
            ..Default::default()
        }];
        let mut totals = Totals::default();
        for slot in &mut self.slots {
            let mut stats = row(slot.role, slot.proc.as_mut(), deadline);
            stats.restarts = slot.restarts;
            totals.restarts += u64::from(slot.restarts);
            processes.push(stats);
        }
        for r in &mut self.retiring {
            let mut stats = row(r.role, Some(&mut r.proc), deadline);
            stats.state = "retiring".into();
            processes.push(stats);
        }
        let receiving_role = self.reload.slot_handing_off().map(|slot| self.slots[slot].role);
        if let (Some(role), Some(candidate)) = (receiving_role, self.reload.receiving()) {
            let mut stats = row(role, Some(candidate), deadline);
            stats.state = "receiving".into();
            processes.push(stats);
        }
        for p in processes.iter().filter(|p| p.role == "worker") {
            totals.add(p);
        }
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            master_pid,
            uptime_secs: self.started.elapsed().as_secs(),
            listen: self.sockets.listen.map(|a| a.to_string()).unwrap_or_default(),
            tls_listen: self.sockets.tls_listen.map(|a| a.to_string()).unwrap_or_default(),
            tls: self.config.tls.clone(),
            tls_not_after: self.tls_material.as_ref().and_then(|m| m.not_after.clone()).unwrap_or_default(),
            channel: self.config.channel_target().to_string(),
            workers: self.sockets.workers,
            load: load_average(),
            processes,
            totals,
            reloads: self.reload.started,
            reloading: self.reload.in_progress(),
            last_reload: self.last_reload(),
            graceful_timeout_ms: self.config.graceful_timeout_ms,
            reload_mode: self.config.reload_mode,
            handoff_timeout_ms: self.config.handoff_timeout_ms,
            limits: self.config.limits.clone(),
            channel_settings: self.config.channel.clone(),
            history: self.config.history.clone(),
            auth: crate::control::AuthReport::of(&self.config),
        }
    }

    fn connection_list(&mut self) -> ConnectionList {
        let mut asked = Vec::new();
        for slot in &mut self.slots {
            if let (Role::Worker(i), Some(proc)) = (slot.role, slot.proc.as_mut()) {
                if proc.request(&Request::Connections) {
                    asked.push(i);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.status_timeout_ms);
        let mut list = ConnectionList::default();
        for slot in &mut self.slots {
            let Role::Worker(i) = slot.role else { continue };
            let answer =
                slot.proc.as_mut().filter(|_| asked.contains(&i)).and_then(|p| p.read_answer(deadline)).and_then(
                    |reply| match reply {
                        Reply::Connections(list) => Some(list.into_owned()),
                        _ => None,
                    },
                );
            match answer {
                Some(part) => list.connections.extend(part.connections),
                None => list.missing_workers.push(i),
            }
        }
        list
    }
}

/// One process's row: its own figures if it answered in time, else just what the master knows.
fn row(role: Role, proc: Option<&mut ChildProc>, deadline: Instant) -> ProcessStats {
    let mut stats = match proc {
        Some(proc) => {
            let pid = proc.pid();
            let answer = proc.read_answer(deadline).and_then(|reply| match reply {
                Reply::Stats(stats) => Some(stats.into_owned()),
                _ => None,
            });
            let mut s = answer.map_or_else(
                || ProcessStats { state: "starting".into(), ..Default::default() },
                |s| ProcessStats { state: if s.state.is_empty() { "running".into() } else { s.state.clone() }, ..s },
            );
            s.pid = pid;
            s.rss_kib = rss_kib(pid);
            s.uptime_secs = proc.started_at.elapsed().as_secs();
            s
        }
        None => ProcessStats { state: "down".into(), ..Default::default() },
    };
    stats.role = match role {
        Role::Channel => "channel".into(),
        Role::Worker(_) => "worker".into(),
    };
    stats.index = role.index();
    stats
}

fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut parts = text.split_whitespace().map(|p| p.parse().unwrap_or(0.0));
    [parts.next().unwrap_or(0.0), parts.next().unwrap_or(0.0), parts.next().unwrap_or(0.0)]
}
