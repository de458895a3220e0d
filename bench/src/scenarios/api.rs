//! A1 API publish (groupcast only: no peer has an HTTP publish API): members joined to a few
//! groups, then publishers one mode after another, each for a fixed time, publishing as fast
//! as their answers come back:
//! - `http-1`: one keep-alive connection, `POST /api/publish`, each waiting for its answer;
//! - `http-N`: N such connections at once (50; smoke 4);
//! - `ws-p2-1`: one protocol-2 WebSocket publisher, `send_to_group` with an `id`, each waiting
//!   for its acknowledgement (sent once the broker numbered it: what the API's answer waits for);
//! - `ws-p2-N`: N of those at once;
//! - `ws-p1`: one seed-protocol publisher, fire and forget, at most WINDOW messages not yet
//!   delivered to every member (the seed protocol has no answer to wait for).
//!
//! Per mode: publishes/s, publish latency (request to answer), the server's CPU per publish by
//! process role, and every member's deliveries checked (a publish answered but not delivered
//! is a loss; a broken API cannot look fast).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::swarm::{Spec, Swarm};
use super::{Ctx, Outcome};
use crate::conn::{self, Target};
use crate::http::HttpClient;
use crate::sys::{now_ns, self_cpu_us};
use crate::tracker::{Tracker, EPOCH_STRIDE};
use crate::wire::{self, Payload};
use crate::ws;

const SIZE: usize = 64;
/// ws-p1: messages published and not yet delivered to every member, at most.
const WINDOW: u64 = 128;

/// Where the API listens and its bearer key.
#[derive(Clone, Debug)]
pub struct ApiTarget {
    pub addr: SocketAddr,
    pub key: Option<String>,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Http(usize),
    WsAck(usize),
    WsFire,
}

impl Mode {
    fn name(&self) -> String {
        match self {
            Mode::Http(n) => format!("http-{n}"),
            Mode::WsAck(n) => format!("ws-p2-{n}"),
            Mode::WsFire => "ws-p1".into(),
        }
    }
    fn describe(&self) -> String {
        match self {
            Mode::Http(1) => "POST /api/publish, 1 keep-alive connection, each waiting for its answer".into(),
            Mode::Http(n) => format!("POST /api/publish, {n} keep-alive connections, each waiting for its answer"),
            Mode::WsAck(1) => {
                "WebSocket protocol 2 send_to_group with id, 1 connection, each waiting for its ack".into()
            }
            Mode::WsAck(n) => {
                format!("WebSocket protocol 2 send_to_group with id, {n} connections, each waiting for its ack")
            }
            Mode::WsFire => {
                format!("WebSocket seed protocol send_to_group, 1 connection, fire and forget (window {WINDOW})")
            }
        }
    }
}

/// What one publisher did.
struct PubResult {
    id: u32,
    sent: HashMap<u32, u64>,
    hist: Histogram<u64>,
    /// (group, offset) of every answer that carried one.
    offsets: Vec<(u32, u64)>,
    answered: u64,
    error: Option<String>,
    elapsed: Duration,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

/// A1: 200 members in 4 groups (50 deliveries per publish); 5 s per mode (smoke: 20 in 2, 1 s).
pub async fn a1(ctx: &Ctx) -> Result<Outcome> {
    let api = ctx.api.clone().context("a1 needs --api-addr (the groupcast [api] listener)")?;
    let t = ctx.target()?.clone();
    let o = &ctx.o;
    let spec = Spec {
        members: ctx.pick(&o.connections, 200, 20),
        groups: ctx.pick(&o.groups, 4, 2),
        per_conn: 1,
        publishers: 0,
    };
    let concurrent = ctx.pick(&o.publishers, 50, 4).max(1);
    let size = ctx.pick(&o.size, SIZE, SIZE);
    let duration = ctx.duration(5.0, 1.0);
    let mut group_size: HashMap<u32, u64> = HashMap::new();
    for g in conn::membership(spec.members, spec.groups, 1).iter().flatten() {
        *group_size.entry(*g).or_insert(0) += 1;
    }
    let swarm = Swarm::open(&t, spec.clone(), ctx.concurrency()).await?;
    let modes = [Mode::Http(1), Mode::Http(concurrent), Mode::WsAck(1), Mode::WsAck(concurrent), Mode::WsFire];
    let mut results = Vec::new();
    let mut ok = true;
    for mode in modes {
        let v = run_mode(ctx, &api, &t, &swarm, &group_size, mode, duration, size).await;
        ok &= v["ok"] == true;
        eprintln!(
            "  {}: {} publishes/s, p50 {} ms, p99 {} ms, server CPU {} us/publish (api {}), delivered {}/{}",
            v["mode"].as_str().unwrap_or("?"),
            v["publishes_per_s"],
            v["publish_p50_ms"],
            v["publish_p99_ms"],
            v["server_cpu_us_per_publish"],
            v["api_cpu_us_per_publish"],
            v["delivered"],
            v["expected"]
        );
        results.push(v);
    }
    let cpu =
        |name: &str| results.iter().find(|r| r["mode"] == name).and_then(|r| r["server_cpu_us_per_publish"].as_f64());
    let ratio = |a: Option<f64>, b: Option<f64>| {
        a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| (a / b * 100.0).round() / 100.0)
    };
    let n = concurrent;
    Ok(Outcome {
        ok,
        body: json!({
            "params": { "swarm": spec.to_json(), "concurrent": n, "mode_s": duration.as_secs_f64(), "size": size,
                        "api_addr": api.addr.to_string(), "api_key": api.key.is_some() },
            "setup_s": swarm.setup.as_secs_f64(),
            "modes": results,
            // Server CPU per publish through the API over the same through a WebSocket publisher
            // that waits for its acknowledgement (same concurrency).
            "cpu_ratio_http1_over_wsp2_1": ratio(cpu("http-1"), cpu("ws-p2-1")),
            format!("cpu_ratio_http{n}_over_wsp2_{n}"): ratio(cpu(&format!("http-{n}")), cpu(&format!("ws-p2-{n}"))),
        }),
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_mode(
    ctx: &Ctx,
    api: &ApiTarget,
    t: &Target,
    swarm: &Swarm,
    group_size: &HashMap<u32, u64>,
    mode: Mode,
    duration: Duration,
    size: usize,
) -> Value {
    let tracker = swarm.tracker.clone();
    let epoch = tracker.epoch();
    let groups: Vec<u32> = (0..swarm.spec.groups as u32).collect();
    // Connect first (not measured), then start every publisher at once.
    let publishers = match connect_all(api, t, mode).await {
        Ok(p) => p,
        Err(e) => return json!({ "mode": mode.name(), "ok": false, "error": format!("{e:#}") }),
    };
    let (cpu0, srv0, del0) = (self_cpu_us(), ctx.server.cpu_by_role(), tracker.delivered());
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for (i, p) in publishers.into_iter().enumerate() {
        let mut gs = groups.clone();
        let shift = i % gs.len().max(1);
        gs.rotate_left(shift);
        let id = epoch * EPOCH_STRIDE + i as u32;
        let tracker = tracker.clone();
        let per_publish = group_size.values().copied().max().unwrap_or(1);
        tasks.push(tokio::spawn(async move {
            let mut r = PubResult {
                id,
                sent: HashMap::new(),
                hist: new_hist(),
                offsets: Vec::new(),
                answered: 0,
                error: None,
                elapsed: Duration::ZERO,
            };
            let res = match p {
                Publisher::Http(c) => http_loop(c, &gs, size, deadline, &mut r).await,
                Publisher::Ws(rd, w) => ws_ack_loop(rd, w, &gs, size, deadline, &mut r).await,
                Publisher::Fire(w) => fire_loop(w, &gs, size, deadline, &tracker, per_publish, &mut r).await,
            };
            if let Err(e) = res {
                r.error = Some(format!("publisher {id}: {e:#}"));
            }
            r.elapsed = start.elapsed();
            r
        }));
    }
    let mut sent: HashMap<(u32, u32), u64> = HashMap::new();
    let mut hist = new_hist();
    let mut offsets = Vec::new();
    let (mut errors, mut answered, mut pub_elapsed) = (Vec::new(), 0u64, Duration::ZERO);
    for task in tasks {
        match task.await {
            Ok(r) => {
                for (g, k) in &r.sent {
                    sent.insert((r.id, *g), *k);
                }
                let _ = hist.add(&r.hist);
                offsets.extend(r.offsets);
                answered += r.answered;
                errors.extend(r.error);
                pub_elapsed = pub_elapsed.max(r.elapsed);
            }
            Err(e) => errors.push(format!("publisher task: {e}")),
        }
    }
    let total: u64 = sent.values().sum();
    let expected: u64 = sent.iter().map(|((_, g), k)| k * group_size.get(g).copied().unwrap_or(0)).sum();
    drain(&tracker, del0 + expected).await;
    let elapsed = start.elapsed();
    let srv1 = ctx.server.cpu_by_role();
    let report = tracker.finish_phase(&sent);
    if tracker.errors() > 0 || tracker.conn_failures() > 0 {
        errors.extend(tracker.first_error());
    }
    // Offsets the answers carried: each (group, offset) once, else the bus numbered twice.
    offsets.sort_unstable();
    let repeats = offsets.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    let acked = !matches!(mode, Mode::WsFire);
    let missing_offsets = if acked { answered - offsets.len() as u64 } else { 0 };
    if repeats > 0 {
        errors.push(format!("{repeats} offsets answered twice for one group"));
    }
    if missing_offsets > 0 {
        errors.push(format!("{missing_offsets} answers without an offset"));
    }
    let cpu = srv0.zip(srv1).map(|(a, b)| b.since(&a));
    let per = |us: u64| if total > 0 { Some((us as f64 / total as f64 * 100.0).round() / 100.0) } else { None };
    let ms = |q: f64| if hist.is_empty() { None } else { Some(hist.value_at_quantile(q) as f64 / 1000.0) };
    let ok = errors.is_empty() && report.exact() && total > 0;
    let mut v = json!({
        "mode": mode.name(),
        "describe": mode.describe(),
        "ok": ok,
        "connections": match mode { Mode::Http(n) | Mode::WsAck(n) => n, Mode::WsFire => 1 },
        "publishes": total,
        "publishes_per_s": (total as f64 / pub_elapsed.as_secs_f64().max(1e-9)).round(),
        "publish_s": (pub_elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        // Request written to whole answer read (ack modes only).
        "publish_p50_ms": if acked { ms(0.50) } else { None },
        "publish_p90_ms": if acked { ms(0.90) } else { None },
        "publish_p99_ms": if acked { ms(0.99) } else { None },
        "publish_max_ms": if acked { (!hist.is_empty()).then(|| hist.max() as f64 / 1000.0) } else { None },
        "answers_with_offset": offsets.len(),
        "deliveries_per_publish": if total > 0 { Some(report.delivered as f64 / total as f64) } else { None },
        "server_cpu_us": cpu.map(|c| c.total()),
        "server_cpu_us_per_publish": cpu.and_then(|c| per(c.total())),
        "api_cpu_us_per_publish": cpu.and_then(|c| per(c.api)),
        "cpu_us_per_publish_by_role": cpu.map(|c| json!({
            "master": per(c.master), "channel": per(c.channel), "workers": per(c.workers),
            "api": per(c.api), "other": per(c.other),
        })),
        "measured_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "loader_cpu_us": self_cpu_us() - cpu0,
        "errors": errors,
    });
    if let (Value::Object(a), Value::Object(b)) = (&mut v, report.to_json()) {
        // The report's p50/p99 are delivery latencies (publish to member): say so.
        for (k, val) in b {
            let k = if k.ends_with("_ms") { format!("delivery_{k}") } else { k };
            a.insert(k, val);
        }
    }
    v
}

enum Publisher {
    Http(HttpClient),
    Ws(ws::Reader, ws::Writer),
    Fire(ws::Writer),
}

async fn connect_all(api: &ApiTarget, t: &Target, mode: Mode) -> Result<Vec<Publisher>> {
    let mut out = Vec::new();
    match mode {
        Mode::Http(n) => {
            for _ in 0..n {
                out.push(Publisher::Http(HttpClient::connect(api.addr, api.key.as_deref()).await?));
            }
        }
        Mode::WsAck(n) => {
            let p2 = Target { protocol: 2, ..t.clone() };
            for i in 0..n {
                let (r, w) = conn::connect(&p2, 100_000 + i).await.context("connect a protocol-2 publisher")?;
                out.push(Publisher::Ws(r, w));
            }
        }
        Mode::WsFire => {
            let p1 = Target { protocol: 1, ..t.clone() };
            let (r, w) = conn::connect(&p1, 200_000).await.context("connect a seed-protocol publisher")?;
            // Nothing comes back to a publisher that joined nothing; keep the read half open.
            tokio::spawn(async move {
                let mut r = r;
                while let Ok(true) = r.fill().await {
                    r.pos = r.buf.len();
                }
            });
            out.push(Publisher::Fire(w));
        }
    }
    Ok(out)
}

/// The next payload of publisher `r` (round-robin over `groups`), its seq counted as sent.
fn next_payload(r: &mut PubResult, groups: &[u32], size: usize, n: u64) -> (u32, String) {
    let group = groups[(n % groups.len() as u64) as usize];
    let seq = r.sent.entry(group).or_insert(0);
    let p = Payload { publisher: r.id, seq: *seq, send_ns: now_ns(), group };
    *seq += 1;
    (group, p.encode(size))
}

/// The offset in an answer `{"ok":true,"offset":K}` / `{"id":N,"ok":true,"offset":K}`.
fn offset_in(body: &str) -> Option<u64> {
    let rest = &body[body.find("\"offset\":")? + "\"offset\":".len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

async fn http_loop(mut c: HttpClient, groups: &[u32], size: usize, deadline: Instant, r: &mut PubResult) -> Result<()> {
    let mut n = 0u64;
    let mut body = String::new();
    while Instant::now() < deadline {
        let (group, payload) = next_payload(r, groups, size, n);
        n += 1;
        body.clear();
        body.push_str(&format!(r#"{{"group":"{group}","message":"{payload}"}}"#));
        let t0 = Instant::now();
        let answer = c.post_json("/api/publish", body.as_bytes()).await?;
        let _ = r.hist.record((t0.elapsed().as_nanos() / 1000).max(1) as u64);
        let text = String::from_utf8_lossy(&answer.body);
        if answer.status != 200 || !text.starts_with(r#"{"ok":true"#) {
            bail!("POST /api/publish answered {}: {text:.200}", answer.status);
        }
        r.answered += 1;
        if let Some(offset) = offset_in(&text) {
            r.offsets.push((group, offset));
        }
    }
    Ok(())
}

async fn ws_ack_loop(
    mut rd: ws::Reader,
    w: ws::Writer,
    groups: &[u32],
    size: usize,
    deadline: Instant,
    r: &mut PubResult,
) -> Result<()> {
    let mut n = 0u64;
    let mut frame = Vec::new();
    while Instant::now() < deadline {
        let (group, payload) = next_payload(r, groups, size, n);
        n += 1;
        let cmd = wire::send_to_group(group, &payload);
        // Same command with an id: `..."message":"..."}` -> `..."message":"...","id":N}`.
        let cmd = format!("{},\"id\":{n}}}", &cmd[..cmd.len() - 1]);
        frame.clear();
        ws::encode_text(&cmd, &mut frame);
        let t0 = Instant::now();
        ws::send(&w, &frame).await?;
        let want = format!("{{\"id\":{n},");
        loop {
            let Some(text) = rd.next_text(&w).await? else { bail!("the server closed the publisher") };
            if text.starts_with(&want) {
                let _ = r.hist.record((t0.elapsed().as_nanos() / 1000).max(1) as u64);
                if !text.contains("\"ok\":true") {
                    bail!("send_to_group answered: {text:.200}");
                }
                r.answered += 1;
                if let Some(offset) = offset_in(&text) {
                    r.offsets.push((group, offset));
                }
                break;
            }
            if text.contains("\"error\"") {
                bail!("the server said: {text:.200}");
            }
        }
    }
    Ok(())
}

/// Seed protocol: no answer; at most WINDOW messages ahead of what every member received
/// (`per_publish` deliveries each), batched into one write.
async fn fire_loop(
    w: ws::Writer,
    groups: &[u32],
    size: usize,
    deadline: Instant,
    tracker: &Arc<Tracker>,
    per_publish: u64,
    r: &mut PubResult,
) -> Result<()> {
    let del0 = tracker.delivered();
    let (mut n, mut batch) = (0u64, Vec::new());
    let mut stalled = Instant::now();
    while Instant::now() < deadline {
        let done = (tracker.delivered() - del0) / per_publish.max(1);
        let room = (done + WINDOW).saturating_sub(n);
        if room == 0 {
            if stalled.elapsed() > Duration::from_secs(5) {
                bail!("no delivery for 5 s ({n} sent)");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
            continue;
        }
        stalled = Instant::now();
        batch.clear();
        for _ in 0..room.min(32) {
            let (group, payload) = next_payload(r, groups, size, n);
            n += 1;
            ws::encode_text(&wire::send_to_group(group, &payload), &mut batch);
        }
        ws::send(&w, &batch).await?;
    }
    Ok(())
}

/// Wait until `target` deliveries were counted, or nothing arrived for 1 s (max 15 s).
async fn drain(tracker: &Tracker, target: u64) {
    let start = Instant::now();
    let (mut last, mut last_change) = (tracker.delivered(), Instant::now());
    while tracker.delivered() < target && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = tracker.delivered();
        if now != last {
            (last, last_change) = (now, Instant::now());
        } else if last_change.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_read_from_answers() {
        assert_eq!(offset_in(r#"{"ok":true,"offset":42}"#), Some(42));
        assert_eq!(offset_in(r#"{"id":7,"ok":true,"offset":3}"#), Some(3));
        assert_eq!(offset_in(r#"{"ok":true}"#), None);
    }
}
