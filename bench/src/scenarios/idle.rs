//! S3 idle memory: PSS per connection above the fresh idle server; T3 is the same over wss://.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use super::swarm::{Spec, Swarm};
use super::{Ctx, Outcome};

/// S3: 10,000 connections in 100 groups, joined and probed, then left idle.
pub async fn s3(ctx: &Ctx) -> Result<Outcome> {
    let o = &ctx.o;
    let spec = Spec {
        members: ctx.pick(&o.connections, 10_000, 50),
        groups: ctx.pick(&o.groups, 100, 5),
        per_conn: 1,
        publishers: 0,
    };
    let before = ctx.server.pss_bytes();
    let swarm = Swarm::open(ctx.target()?, spec.clone(), ctx.concurrency()).await?;
    tokio::time::sleep(Duration::from_secs(if ctx.smoke { 1 } else { 3 })).await;
    let after = ctx.server.pss_bytes();
    let per_conn = before.zip(after).map(|(b, a)| (a.saturating_sub(b) as f64 / spec.members as f64).round());
    let failures = swarm.tracker.conn_failures() + swarm.tracker.errors();
    Ok(Outcome {
        ok: failures == 0,
        body: json!({
            "params": { "swarm": spec.to_json() },
            "setup_s": swarm.setup.as_secs_f64(),
            "result": {
                "server_pss_idle_bytes": before,
                "server_pss_loaded_bytes": after,
                "pss_bytes_per_connection": per_conn,
                "failures": failures,
            },
        }),
    })
}
