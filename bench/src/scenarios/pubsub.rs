//! S1 latency, S2 fan-out capacity (stepped rate), S4 exactly-once with overlapping groups,
//! T2 CPU per delivery over wss:// (S2's swarm at two fixed rates).

use anyhow::Result;
use serde_json::json;

use super::swarm::{Spec, Swarm};
use super::{Ctx, Outcome};

const SIZE: usize = 64;

/// One swarm, one phase at a fixed rate; ok = exact delivery.
async fn fixed(ctx: &Ctx, spec: Spec, rate: f64, secs: (f64, f64)) -> Result<Outcome> {
    let size = ctx.pick(&ctx.o.size, SIZE, SIZE);
    let duration = ctx.duration(secs.0, secs.1);
    let mut swarm = Swarm::open(ctx.target()?, spec.clone(), ctx.concurrency()).await?;
    let phase = swarm.phase(rate, duration, size, ctx.server).await;
    Ok(Outcome {
        ok: phase.clean(),
        body: json!({
            "params": { "swarm": spec.to_json(), "rate": rate, "duration_s": duration.as_secs_f64(), "size": size },
            "setup_s": swarm.setup.as_secs_f64(),
            // Any close fails the phase too (its errors); counted here for a reload's run.
            "connections_closed": swarm.tracker.conn_failures(),
            "result": phase.to_json(),
        }),
    })
}

/// S1: 1,000 connections in 10 groups, 2 publishers, 200 msg/s for 10 s.
pub async fn s1(ctx: &Ctx) -> Result<Outcome> {
    let o = &ctx.o;
    let spec = Spec {
        members: ctx.pick(&o.connections, 1000, 40),
        groups: ctx.pick(&o.groups, 10, 4),
        per_conn: 1,
        publishers: ctx.pick(&o.publishers, 2, 2),
    };
    fixed(ctx, spec, ctx.pick(&o.rate, 200.0, 200.0), (10.0, 2.0)).await
}

/// S4: 1,000 connections x 3 groups each (of 10), 4 publishers, 200 msg/s.
pub async fn s4(ctx: &Ctx) -> Result<Outcome> {
    let o = &ctx.o;
    let spec = Spec {
        members: ctx.pick(&o.connections, 1000, 40),
        groups: ctx.pick(&o.groups, 10, 10),
        per_conn: 3,
        publishers: ctx.pick(&o.publishers, 4, 4),
    };
    fixed(ctx, spec, ctx.pick(&o.rate, 200.0, 200.0), (10.0, 2.0)).await
}

/// S2: 2,000 connections in 20 groups of 100; rate stepped up until a step loses
/// messages or its p99 reaches 100 ms (or the loader cannot publish the rate).
pub async fn s2(ctx: &Ctx) -> Result<Outcome> {
    let steps =
        ctx.pick(&ctx.o.steps, vec![100.0, 1000.0, 2000.0, 5000.0, 10000.0, 15000.0, 20000.0], vec![100.0, 500.0]);
    stepped(ctx, steps, true).await
}

/// T2 (run over wss://): S2's swarm at 1,000, 2,000 and 5,000 msg/s, for the server's CPU
/// per delivery with TLS. Every step runs (a cost measurement, not a search): a step the
/// server cannot keep up with is marked `saturated`; integrity as in S2 (the first step
/// exact, no duplicate or wrong group anywhere).
pub async fn t2(ctx: &Ctx) -> Result<Outcome> {
    let steps = ctx.pick(&ctx.o.steps, vec![1000.0, 2000.0, 5000.0], vec![100.0, 500.0]);
    stepped(ctx, steps, false).await
}

/// 2,000 connections in 20 groups of 100, 2 publishers, one phase per rate step.
/// `capacity`: S2's search, stop at the first step that fails; otherwise every step runs.
async fn stepped(ctx: &Ctx, steps: Vec<f64>, capacity: bool) -> Result<Outcome> {
    let o = &ctx.o;
    let spec = Spec {
        members: ctx.pick(&o.connections, 2000, 40),
        groups: ctx.pick(&o.groups, 20, 4),
        per_conn: 1,
        publishers: ctx.pick(&o.publishers, 2, 2),
    };
    let size = ctx.pick(&o.size, SIZE, SIZE);
    let duration = ctx.duration(10.0, 1.5);
    let mut swarm = Swarm::open(ctx.target()?, spec.clone(), ctx.concurrency()).await?;
    let (mut results, mut highest, mut integrity, mut all_passed) = (Vec::new(), None, true, true);
    for (i, &rate) in steps.iter().enumerate() {
        let phase = swarm.phase(rate, duration, size, ctx.server).await;
        let r = &phase.report;
        let behind = phase.achieved_rate < 0.95 * rate;
        let pass = phase.clean() && r.p99_ms() < 100.0 && !behind;
        integrity &= r.duplicates == 0 && r.wrong_group == 0 && r.malformed == 0;
        if i == 0 && if capacity { !pass } else { !phase.clean() } {
            integrity = false;
        }
        let mut v = phase.to_json();
        v["pass"] = json!(pass);
        v["publisher_behind"] = json!(behind);
        v["saturated"] = json!(behind || r.lost > 0);
        eprintln!(
            "  step {rate} msg/s: pass={pass} p99={:.2}ms lost={} cpu/delivery={}",
            r.p99_ms(),
            r.lost,
            v["server_cpu_us_per_delivery"]
        );
        results.push(v);
        if !pass && capacity {
            break;
        }
        // Highest step such that it and every step below it passed.
        all_passed &= pass;
        if all_passed {
            highest = Some(rate);
        }
    }
    Ok(Outcome {
        ok: integrity,
        body: json!({
            "params": { "swarm": spec.to_json(), "steps": steps, "step_s": duration.as_secs_f64(), "size": size },
            "setup_s": swarm.setup.as_secs_f64(),
            "highest_passing_rate": highest,
            "highest_passing_deliveries_per_s": highest.map(|r| r * (spec.members * spec.per_conn / spec.groups) as f64),
            "steps": results,
        }),
    })
}
