//! S5 connect rate: TCP connect + WebSocket handshake + add_group (with reply), many at a time;
//! T1 is the same over wss:// (a TLS handshake between the TCP connect and the upgrade).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;

use super::{Ctx, Outcome};
use crate::conn::{self, Target};
use crate::sys::self_cpu_us;
use crate::wire;
use crate::ws::{self, Writer};

/// One connection: returns (handshake time, total time incl. the add_group reply) and the socket.
async fn one(t: &Target, idx: usize, groups: usize) -> Result<(Duration, Duration, Writer)> {
    let start = Instant::now();
    let (mut r, w) = conn::connect(t, idx).await?;
    let handshake = start.elapsed();
    let mut cmd = Vec::new();
    ws::encode_text(&wire::add_group((idx % groups) as u32, Some(idx as u64)), &mut cmd);
    ws::send(&w, &cmd).await?;
    match tokio::time::timeout(Duration::from_secs(10), r.next_text(&w)).await {
        Ok(Ok(Some(t))) if t.contains("\"id\"") && !t.contains("\"error\"") => {}
        Ok(Ok(Some(t))) => bail!("unexpected reply: {t}"),
        Ok(Ok(None)) => bail!("closed before reply"),
        Ok(Err(e)) => bail!("{e}"),
        Err(_) => bail!("no reply within 10 s"),
    }
    Ok((handshake, start.elapsed(), w))
}

/// S5: 5,000 new connections, 256 connecting at a time.
pub async fn s5(ctx: &Ctx) -> Result<Outcome> {
    let t = ctx.target()?;
    let n = ctx.pick(&ctx.o.connections, 5000, 60);
    let conc = ctx.pick(&ctx.o.concurrency, 256, 16);
    let groups = ctx.pick(&ctx.o.groups, 100, 5);
    let (cpu0, srv0) = (self_cpu_us(), ctx.server.cpu_us());
    let start = Instant::now();
    let results: Vec<Result<(Duration, Duration, Writer)>> =
        futures_util::stream::iter(0..n).map(|i| one(t, i, groups)).buffer_unordered(conc).collect().await;
    let elapsed = start.elapsed();
    let (cpu1, srv1) = (self_cpu_us(), ctx.server.cpu_us());
    let mut hs = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut full = hs.clone();
    let (mut failures, mut first_error, mut open) = (0u64, None, Vec::new());
    for r in results {
        match r {
            Ok((h, f, ws)) => {
                let _ = hs.record(h.as_micros() as u64);
                let _ = full.record(f.as_micros() as u64);
                open.push(ws);
            }
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    drop(open);
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(Outcome {
        ok: failures == 0,
        body: json!({
            "params": { "connections": n, "concurrency": conc, "groups": groups },
            "result": {
                "connects_per_s": ((n as u64 - failures) as f64 / elapsed.as_secs_f64()).round(),
                "handshake_p50_ms": ms(hs.value_at_quantile(0.5)),
                "handshake_p99_ms": ms(hs.value_at_quantile(0.99)),
                "handshake_max_ms": ms(hs.max()),
                "join_p99_ms": ms(full.value_at_quantile(0.99)),
                "failures": failures,
                "first_error": first_error,
                "server_cpu_us": srv0.zip(srv1).map(|(a, b)| b.saturating_sub(a)),
                "server_cpu_us_per_connect": srv0.zip(srv1).map(|(a, b)| (b.saturating_sub(a) as f64 / n as f64).round()),
                "loader_cpu_us": cpu1 - cpu0,
            },
        }),
    })
}
