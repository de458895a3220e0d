//! Paced publishers: each sends `send_to_group` commands at a fixed rate,
//! round-robin over its groups, with a per-(publisher, group) sequence number.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::time::MissedTickBehavior;

use crate::sys::now_ns;
use crate::wire::{self, Payload};
use crate::ws::{self, Writer};

/// What one publisher should do.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Wire publisher id (epoch-qualified, see tracker::EPOCH_STRIDE).
    pub id: u32,
    pub groups: Vec<u32>,
    pub rate: f64,
    pub duration: Duration,
    pub size: usize,
}

/// What it did: messages per group (seqs 0..n) and how long it took.
#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: HashMap<u32, u64>,
    pub total: u64,
    pub elapsed: Duration,
    pub error: Option<String>,
}

/// Publish per `plan` on `sink`; a network error ends the run early and is reported.
pub async fn run(w: &Writer, plan: &Plan) -> Outcome {
    let mut out = Outcome::default();
    let start = Instant::now();
    if let Err(e) = paced(w, plan, start, &mut out).await {
        out.error = Some(format!("publisher {}: {e}", plan.id));
    }
    out.elapsed = start.elapsed();
    out
}

async fn paced(w: &Writer, plan: &Plan, start: Instant, out: &mut Outcome) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut batch = Vec::new();
    loop {
        tick.tick().await;
        batch.clear();
        let elapsed = start.elapsed().min(plan.duration);
        let due = (plan.rate * elapsed.as_secs_f64()) as u64;
        let batch_end = due.min(out.total + 10_000);
        while out.total < batch_end {
            let group = plan.groups[(out.total % plan.groups.len() as u64) as usize];
            let seq = out.sent.entry(group).or_insert(0);
            let p = Payload { publisher: plan.id, seq: *seq, send_ns: now_ns(), group };
            ws::encode_text(&wire::send_to_group(group, &p.encode(plan.size)), &mut batch);
            *seq += 1;
            out.total += 1;
        }
        if !batch.is_empty() {
            ws::send(w, &batch).await?;
        }
        if elapsed >= plan.duration && out.total >= due {
            return Ok(());
        }
    }
}
