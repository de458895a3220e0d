//! The master's answers on its control socket: one request line (`status`, `connections`,
//! `ping`, `reload close [graceful]`, and for the api process `group "NAME"` and
//! `close ID CODE "REASON"`), one answer line (JSON, or `ok`/`error` words), then the connection closes (control_clients.rs does the
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
            _ if request.starts_with("group ") => match self.group_members(&request["group ".len()..]) {
                Ok(count) => serde_json::to_vec(&count),
                Err(why) => Ok(format!("error {why}").into_bytes()),
            },
            _ if request.starts_with("close ") => match self.close_connection(&request["close ".len()..]) {
                Ok(closed) => serde_json::to_vec(&closed),
                Err(why) => Ok(format!("error {why}").into_bytes()),
            },
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
            backlog: self.config.backlog,
            socket_recv_buffer: self.config.socket_recv_buffer,
            socket_send_buffer: self.config.socket_send_buffer,
            api: self.config.api.clone(),
            api_listen: self.api_listener.as_ref().map(|(_, a)| a.to_string()).unwrap_or_default(),
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
        let (parts, missing_workers) = self.ask_workers(&Request::Connections, |reply| match reply {
            Reply::Connections(list) => Some(list.into_owned()),
            _ => None,
        });
        ConnectionList { connections: parts.into_iter().flat_map(|p| p.connections).collect(), missing_workers }
    }

    /// `group "NAME"` (the group as a JSON string): its connections summed over the workers.
    fn group_members(&mut self, quoted: &str) -> Result<GroupCount, String> {
        let group: String =
            serde_json::from_str(quoted).map_err(|e| format!("the group must be a JSON string: {e}"))?;
        let (counts, missing_workers) =
            self.ask_workers(&Request::GroupMembers { group: group.clone() }, |reply| match reply {
                Reply::Members { count } => Some(count),
                _ => None,
            });
        Ok(GroupCount { group, members: counts.iter().sum(), missing_workers })
    }

    /// `close ID CODE "REASON"`: the worker holding connection ID closes it.
    fn close_connection(&mut self, args: &str) -> Result<Closed, String> {
        let mut words = args.splitn(3, ' ');
        let id = words.next().and_then(|w| w.parse::<u64>().ok()).ok_or("the id must be a number")?;
        let code = words.next().and_then(|w| w.parse::<u16>().ok()).ok_or("the code must be a number")?;
        let reason: String = match words.next() {
            Some(quoted) => {
                serde_json::from_str(quoted).map_err(|e| format!("the reason must be a JSON string: {e}"))?
            }
            None => String::new(),
        };
        let request = Request::CloseConnection { id, code, reason };
        let (found, missing_workers) = self.ask_workers(&request, |reply| match reply {
            Reply::Closed { found } => Some(found),
            _ => None,
        });
        Ok(Closed { closed: found.contains(&true), missing_workers })
    }

    /// Sends `request` to every worker, then reads each answer (`take` picks it out of the
    /// reply) until `status_timeout_ms`; returns the answers and the workers that gave none.
    fn ask_workers<T>(
        &mut self,
        request: &Request,
        mut take: impl FnMut(Reply<'static>) -> Option<T>,
    ) -> (Vec<T>, Vec<usize>) {
        let mut asked = Vec::new();
        for slot in &mut self.slots {
            if let (Role::Worker(i), Some(proc)) = (slot.role, slot.proc.as_mut()) {
                if proc.request(request) {
                    asked.push(i);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.status_timeout_ms);
        let (mut answers, mut missing) = (Vec::new(), Vec::new());
        for slot in &mut self.slots {
            let Role::Worker(i) = slot.role else { continue };
            let answer = slot
                .proc
                .as_mut()
                .filter(|_| asked.contains(&i))
                .and_then(|p| p.read_answer(deadline))
                .and_then(&mut take);
            match answer {
                Some(answer) => answers.push(answer),
                None => missing.push(i),
            }
        }
        (answers, missing)
    }
}

/// The answer to `group`.
#[derive(serde::Serialize)]
struct GroupCount {
    group: String,
    members: u64,
    missing_workers: Vec<usize>,
}

/// The answer to `close`.
#[derive(serde::Serialize)]
struct Closed {
    closed: bool,
    missing_workers: Vec<usize>,
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
        Role::Api => "api".into(),
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
