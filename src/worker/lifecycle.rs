//! A worker's dealings with its master and with signals: answering `stats` and `connections`
//! over the status link, and stopping, immediately or after letting clients drain.

use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::Worker;
use crate::control::{binary_identity, ConnectionList, ProcessStats, Reply, Request};
use crate::ws::close_code;

/// How the worker is stopping.
pub struct Stopping {
    /// Clients still connected then are dropped and the process exits.
    pub deadline: Instant,
}

/// How long past its drain deadline a stopping worker still waits for connections accepted
/// just before the stop to send their upgrade request, so they get 101 + close rather than a
/// failed handshake.
const HANDSHAKE_GRACE: Duration = Duration::from_secs(2);

impl Worker {
    /// The loop may end: every client is gone, or the drain deadline has passed and no
    /// connection is still in its handshake (those get until `HANDSHAKE_GRACE` after it).
    pub(super) fn finished_stopping(&self, stopping: &Stopping) -> bool {
        let now = Instant::now();
        if self.clients.is_empty() || now >= stopping.deadline + HANDSHAKE_GRACE {
            return true;
        }
        now >= stopping.deadline && !self.clients.any_handshaking()
    }

    pub(super) fn control_ready(&mut self) {
        match self.control.read_requests() {
            Ok(Some(requests)) => {
                for request in requests {
                    let sent = match request {
                        Request::Stats => {
                            let stats = self.snapshot();
                            self.control.send_json(&stats)
                        }
                        Request::Connections => {
                            let list = self.connection_list();
                            self.control.send_json(&list)
                        }
                        Request::Shutdown { code, drain_ms } => {
                            self.shut_down(code, Duration::from_millis(drain_ms));
                            Ok(())
                        }
                        Request::HandOff { generation, timeout_ms } => {
                            let fd = self.control.take_fd();
                            self.begin_hand_off(fd, generation, Duration::from_millis(timeout_ms));
                            Ok(())
                        }
                        Request::GroupMembers { group } => {
                            let count = self.groups.member_count(&group) as u64;
                            self.control.send_json(Reply::Members { count })
                        }
                        Request::CloseConnection { id, code, reason } => {
                            let found = self.clients.close_by_id(id, code, &reason);
                            if found {
                                info!("connection {id}: closing with {code} as the API asked");
                            }
                            self.control.send_json(Reply::Closed { found })
                        }
                    };
                    if let Err(e) = sent {
                        warn!("cannot answer the master: {e}");
                    }
                }
                let _ = self.control.flush();
            }
            Ok(None) | Err(_) => {
                error!("lost the link to the master; stopping");
                self.shut_down(close_code::GOING_AWAY, Duration::from_secs(2));
            }
        }
    }

    fn snapshot(&self) -> ProcessStats {
        let (version, binary_mtime) = binary_identity();
        let mut s = self.clients.counters().clone();
        s.role.clone_from(&self.stats.role);
        s.index = self.stats.index;
        s.pid = self.stats.pid;
        s.version = version;
        s.binary_mtime = binary_mtime;
        s.uptime_secs = self.started.elapsed().as_secs();
        s.state = match (&self.stopping, &self.handoff_out) {
            (Some(_), _) => "retiring".into(),
            (None, Some(_)) => "handing_off".into(),
            (None, None) => "running".into(),
        };
        s.connections = self.clients.len() as u64;
        s.groups = self.groups.len() as u64;
        s.memberships = self.groups.memberships() as u64;
        let bus = self.bus.counters();
        s.channel_connected = bus.connected;
        s.channel_dropped = bus.dropped;
        s.channel_queued = bus.queued;
        s.channel_resent = bus.resent;
        s.channel_duplicates = bus.duplicates;
        s.log_dropped = crate::logging::dropped_lines();
        s
    }

    fn connection_list(&self) -> ConnectionList {
        let connections = self.clients.connection_list(self.index, &self.groups);
        ConnectionList { connections, missing_workers: Vec::new() }
    }

    pub(super) fn signals_ready(&mut self) {
        use signal_hook::consts::SIGQUIT;
        let mut stop = None;
        for signal in self.signals.pending() {
            info!("signal {signal} received");
            let drain =
                if signal == SIGQUIT { Duration::from_millis(self.config.graceful_timeout_ms) } else { Duration::ZERO };
            stop = Some(drain);
        }
        if let Some(drain) = stop {
            self.shut_down(close_code::GOING_AWAY, drain);
        }
    }

    /// Stops accepting and closes every client with `code`; the loop ends once they are all
    /// gone or `drain` has passed. With a zero drain the close frames are written once and
    /// the worker exits at the end of the turn.
    pub(super) fn shut_down(&mut self, code: u16, drain: Duration) {
        if self.handoff_out.is_some() {
            // Stopping wins: the connections are closed from here, none half-moved.
            self.hand_off_failed("the worker was told to stop".into());
        }
        let deadline = Instant::now() + drain;
        if let Some(stopping) = &mut self.stopping {
            // A second, more urgent request shortens the wait.
            stopping.deadline = stopping.deadline.min(deadline);
            return;
        }
        info!(
            "worker {} stopping: closing {} connections with {code}, waiting up to {:?}",
            self.index,
            self.clients.len(),
            drain
        );
        self.stopping = Some(Stopping { deadline });
        self.deregister_listeners();
        let reason = if code == close_code::SERVICE_RESTART { "server restarting" } else { "server shutting down" };
        self.clients.close_all(code, reason, deadline);
    }
}
