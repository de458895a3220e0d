//! S7 large messages: 64 KiB messages to one group of 100, published closed-loop
//! (at most WINDOW messages ahead of the slowest member), for MB/s and CPU per MB.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use super::swarm::{Spec, Swarm};
use super::{Ctx, Outcome};
use crate::sys::{now_ns, self_cpu_us};
use crate::tracker::EPOCH_STRIDE;
use crate::wire::{self, Payload};
use crate::ws;

const WINDOW: u64 = 16;

/// S7: one publisher, 100 members of group 0, 64 KiB payloads, 10 s.
pub async fn s7(ctx: &Ctx) -> Result<Outcome> {
    let spec = Spec { members: ctx.pick(&ctx.o.connections, 100, 10), groups: 1, per_conn: 1, publishers: 1 };
    let size = ctx.pick(&ctx.o.size, 64 * 1024, 64 * 1024);
    let duration = ctx.duration(10.0, 1.5);
    let swarm = Swarm::open(ctx.target()?, spec.clone(), ctx.concurrency()).await?;
    let tracker = swarm.tracker.clone();
    let id = tracker.epoch() * EPOCH_STRIDE;
    let (cpu0, srv0) = (self_cpu_us(), ctx.server.cpu_us());
    let start = Instant::now();
    let mut sent = 0u64;
    let mut error = None;
    let sink = swarm.pubs[0].clone();
    let mut frame = Vec::new();
    let mut stalled_since = Instant::now();
    while start.elapsed() < duration {
        let slowest = (0..spec.members).map(|i| tracker.progress(i)).min().unwrap_or(0);
        if sent >= slowest + WINDOW {
            if stalled_since.elapsed() > Duration::from_secs(5) {
                error = Some(format!("no progress for 5 s ({sent} sent, slowest member has {slowest})"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        stalled_since = Instant::now();
        let p = Payload { publisher: id, seq: sent, send_ns: now_ns(), group: 0 };
        frame.clear();
        ws::encode_text(&wire::send_to_group(0, &p.encode(size)), &mut frame);
        if let Err(e) = ws::send(&sink, &frame).await {
            error = Some(format!("publisher: {e}"));
            break;
        }
        sent += 1;
    }
    // Drain: wait for the window to empty (max 10 s).
    let drain_start = Instant::now();
    while (0..spec.members).any(|i| tracker.progress(i) < sent) && drain_start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    let (cpu1, srv1) = (self_cpu_us(), ctx.server.cpu_us());
    let report = tracker.finish_phase(&HashMap::from([((id, 0), sent)]));
    let mb = report.delivered as f64 * size as f64 / 1e6;
    let server_cpu = srv0.zip(srv1).map(|(a, b)| b.saturating_sub(a));
    let errors: Vec<String> = error.into_iter().chain(tracker.first_error()).collect();
    let mut result = json!({
        "messages_sent": sent,
        "delivered_mb": (mb * 10.0).round() / 10.0,
        "delivered_mb_per_s": (mb / elapsed.as_secs_f64() * 10.0).round() / 10.0,
        "server_cpu_us": server_cpu,
        "server_cpu_us_per_mb": server_cpu.filter(|_| mb > 0.0).map(|us| (us as f64 / mb).round()),
        "loader_cpu_us": cpu1 - cpu0,
        "errors": errors,
    });
    if let (Some(a), serde_json::Value::Object(b)) = (result.as_object_mut(), report.to_json()) {
        a.extend(b);
    }
    Ok(Outcome {
        ok: report.exact() && errors.is_empty(),
        body: json!({
            "params": { "swarm": spec.to_json(), "size": size, "window": WINDOW, "duration_s": duration.as_secs_f64() },
            "setup_s": swarm.setup.as_secs_f64(),
            "result": result,
        }),
    })
}
