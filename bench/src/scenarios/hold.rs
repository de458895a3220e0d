//! hold: open idle member connections, say so, keep them open until told to go on, then
//! check that every one of them is still open and still served (scripts/bench-handoff runs
//! a reload in between: issue 13's live hand-off must not close a single connection).
//!
//! Protocol on the loader's standard streams: once every member joined, one JSON line
//! `{"ready":true,...}` on stdout; then the loader waits for a line (or EOF) on stdin; then
//! every member sends its join again with an `id` and must get the answer (a connection the
//! hand-off lost or left unserved would not answer); the final JSON line follows as usual.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::json;
use tokio::sync::oneshot;

use super::swarm::{Spec, Swarm};
use super::{Ctx, Outcome};
use crate::conn::wait_for_replies;
use crate::tracker::Tracker;
use crate::wire;
use crate::ws;

/// How long the members may take to answer the probe after `go`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// hold: `--connections` members (default 1,000; smoke 40) in `--groups` groups (100; 4).
pub async fn hold(ctx: &Ctx) -> Result<Outcome> {
    let o = &ctx.o;
    let spec = Spec {
        members: ctx.pick(&o.connections, 1000, 40),
        groups: ctx.pick(&o.groups, 100, 4),
        per_conn: 1,
        publishers: 0,
    };
    let target = ctx.target()?;
    let swarm = Swarm::open(target, spec.clone(), ctx.concurrency()).await?;
    let joined = swarm.tracker.replies();
    println!("{}", json!({ "ready": true, "members": spec.members, "setup_s": swarm.setup.as_secs_f64() }));
    std::io::stdout().flush().context("stdout")?;

    // A blocking read on a plain thread: the runtime has no stdin support enabled.
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    let held = Instant::now();
    let _ = rx.await;
    let held_s = held.elapsed().as_secs_f64();
    let closed_while_held = swarm.tracker.conn_failures();

    // The probe: the same join again, with an id, on every member.
    let probe = Instant::now();
    let groups = crate::conn::membership(spec.members, spec.groups, spec.per_conn);
    let mut send_errors = 0u64;
    for (idx, w) in swarm.members().iter().enumerate() {
        let g = groups[idx][0];
        let id = if target.protocol2() { Tracker::join_id(idx, g) } else { idx as u64 };
        let mut frame = Vec::new();
        ws::encode_text(&wire::add_group(g, Some(id)), &mut frame);
        if let Err(e) = ws::send(w, &frame).await {
            send_errors += 1;
            swarm.tracker.note_conn_failure(format!("connection {idx}: probe: {e}"));
        }
    }
    let answered = wait_for_replies(&swarm.tracker, joined + spec.members as u64, PROBE_TIMEOUT).await;
    let probe_s = probe.elapsed().as_secs_f64();
    let failures = swarm.tracker.conn_failures();
    let errors = swarm.tracker.errors();
    let ok = answered.is_ok() && failures == 0 && errors == 0 && send_errors == 0;
    Ok(Outcome {
        ok,
        body: json!({
            "params": { "swarm": spec.to_json() },
            "setup_s": swarm.setup.as_secs_f64(),
            "result": {
                "members": spec.members,
                "held_s": held_s,
                "closed_while_held": closed_while_held,
                "closed": failures,
                "server_errors": errors,
                "probe_answered": swarm.tracker.replies().saturating_sub(joined),
                "probe_s": probe_s,
                "probe_error": answered.err().map(|e| format!("{e:#}")),
                "first_error": swarm.tracker.first_error(),
            },
        }),
    })
}
