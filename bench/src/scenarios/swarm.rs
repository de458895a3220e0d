//! A swarm: member connections joined to groups plus publisher connections,
//! and one measured publish phase (publish, drain, account, sample CPU).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::conn::{self, Target};
use crate::procfs::Server;
use crate::publisher::{self, Plan};
use crate::sys::self_cpu_us;
use crate::tracker::{PhaseReport, Tracker, EPOCH_STRIDE};
use crate::ws::Writer;

/// Shape of a swarm.
#[derive(Clone, Debug)]
pub struct Spec {
    pub members: usize,
    pub groups: usize,
    pub per_conn: usize,
    pub publishers: usize,
}

impl Spec {
    pub fn to_json(&self) -> Value {
        json!({"members": self.members, "groups": self.groups,
               "groups_per_member": self.per_conn, "publishers": self.publishers})
    }
}

pub struct Swarm {
    pub spec: Spec,
    pub tracker: Arc<Tracker>,
    /// Publisher sinks (connection indices members..members+publishers).
    pub pubs: Vec<Writer>,
    _members: Vec<Writer>,
    readers: Vec<JoinHandle<()>>,
    group_size: HashMap<u32, u64>,
    pub setup: Duration,
}

/// One phase's figures.
pub struct Phase {
    pub report: PhaseReport,
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub server_cpu_us: Option<u64>,
    pub loader_cpu_us: u64,
    pub elapsed: Duration,
    pub errors: Vec<String>,
}

impl Phase {
    pub fn to_json(&self) -> Value {
        let per_delivery = self
            .server_cpu_us
            .filter(|_| self.report.delivered > 0)
            .map(|us| (us as f64 / self.report.delivered as f64 * 1000.0).round() / 1000.0);
        let mut v = json!({
            "target_rate": self.target_rate,
            "achieved_rate": (self.achieved_rate * 10.0).round() / 10.0,
            "deliveries_per_s": (self.report.delivered as f64 / self.elapsed.as_secs_f64()).round(),
            "server_cpu_us": self.server_cpu_us,
            "server_cpu_us_per_delivery": per_delivery,
            "loader_cpu_us": self.loader_cpu_us,
            "box_cpu_busy": self.box_cpu_busy(),
            "errors": self.errors,
        });
        if let (Value::Object(a), Value::Object(b)) = (&mut v, self.report.to_json()) {
            a.extend(b);
        }
        v
    }

    /// The share of the whole machine (every online core) that the server and the loader
    /// used together during the phase, 0..=1. Near 1 the two compete for the cores: a server's
    /// CPU per delivery is then the CPU it was given over the deliveries, not what the work
    /// costs (docs/benchmarks.md, "The channel hop, profiled").
    pub fn box_cpu_busy(&self) -> Option<f64> {
        let cores = crate::sys::online_cpus() as f64;
        let wall_us = self.elapsed.as_secs_f64() * 1e6 * cores;
        self.server_cpu_us
            .filter(|_| wall_us > 0.0)
            .map(|srv| ((srv + self.loader_cpu_us) as f64 / wall_us * 1000.0).round() / 1000.0)
    }

    /// Exact delivery and no connection/server errors.
    pub fn clean(&self) -> bool {
        self.report.exact() && self.errors.is_empty()
    }
}

impl Swarm {
    /// The member connections' sinks (connection indices 0..members).
    pub fn members(&self) -> &[Writer] {
        &self._members
    }

    pub async fn open(t: &Target, spec: Spec, concurrency: usize) -> Result<Swarm> {
        let start = Instant::now();
        let mut groups = conn::membership(spec.members, spec.groups, spec.per_conn);
        let mut group_size = HashMap::new();
        for g in groups.iter().flatten() {
            *group_size.entry(*g).or_insert(0) += 1;
        }
        groups.extend((0..spec.publishers).map(|_| Vec::new()));
        let tracker = Arc::new(Tracker::new(&groups, t.protocol2()));
        let (mut sinks, readers) = conn::establish(t, &groups, &tracker, concurrency).await?;
        let pubs = sinks.split_off(spec.members);
        // Joins were acknowledged; give cross-process subscriptions a moment to settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Swarm { spec, tracker, pubs, _members: sinks, readers, group_size, setup: start.elapsed() })
    }

    /// Publish `rate` msg/s in total for `duration`, drain, and account.
    pub async fn phase(&mut self, rate: f64, duration: Duration, size: usize, server: Server) -> Phase {
        let epoch = self.tracker.epoch();
        let (cpu0, srv0, del0) = (self_cpu_us(), server.cpu_us(), self.tracker.delivered());
        let start = Instant::now();
        let n = self.pubs.len().max(1);
        let mut tasks = Vec::new();
        for (p, sink) in std::mem::take(&mut self.pubs).into_iter().enumerate() {
            let mut groups: Vec<u32> = (0..self.spec.groups as u32).collect();
            let shift = p % groups.len().max(1);
            groups.rotate_left(shift);
            let plan = Plan { id: epoch * EPOCH_STRIDE + p as u32, groups, rate: rate / n as f64, duration, size };
            tasks.push(tokio::spawn(async move {
                let out = publisher::run(&sink, &plan).await;
                (sink, plan.id, out)
            }));
        }
        let mut sent = HashMap::new();
        let mut errors = Vec::new();
        let (mut total, mut pub_elapsed) = (0u64, Duration::ZERO);
        for t in tasks {
            match t.await {
                Ok((sink, id, out)) => {
                    self.pubs.push(sink);
                    total += out.total;
                    pub_elapsed = pub_elapsed.max(out.elapsed);
                    errors.extend(out.error);
                    for (g, k) in out.sent {
                        sent.insert((id, g), k);
                    }
                }
                Err(e) => errors.push(format!("publisher task: {e}")),
            }
        }
        let expected: u64 = sent.iter().map(|((_, g), k)| k * self.group_size.get(g).copied().unwrap_or(0)).sum();
        self.drain(del0 + expected).await;
        let elapsed = start.elapsed();
        let (cpu1, srv1) = (self_cpu_us(), server.cpu_us());
        let report = self.tracker.finish_phase(&sent);
        if self.tracker.errors() > 0 || self.tracker.conn_failures() > 0 {
            errors.extend(self.tracker.first_error());
        }
        Phase {
            report,
            target_rate: rate,
            achieved_rate: total as f64 / pub_elapsed.as_secs_f64().max(1e-9),
            server_cpu_us: srv0.zip(srv1).map(|(a, b)| b.saturating_sub(a)),
            loader_cpu_us: cpu1 - cpu0,
            elapsed,
            errors,
        }
    }

    /// Wait until `target` deliveries were counted, or nothing arrived for 1 s (max 15 s).
    async fn drain(&self, target: u64) {
        let start = Instant::now();
        let (mut last, mut last_change) = (self.tracker.delivered(), Instant::now());
        while self.tracker.delivered() < target && start.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now = self.tracker.delivered();
            if now != last {
                (last, last_change) = (now, Instant::now());
            } else if last_change.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        // Let stray duplicates or late frames show up before accounting.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}
