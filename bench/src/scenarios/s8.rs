//! S8 agent: one of several loader processes that together hold 100,000 connections
//! (scripts/bench starts them, one per ~17,000 connections: every process here is capped at
//! 20,000 open files). This process opens `--connections` members numbered from `--first`,
//! each joined to group `idx % --groups` and to the one group all of them join ([`ALL`]),
//! source addresses spread over 127.0.0.x (see conn::connect), then prints one `ready` JSON
//! line and obeys commands on stdin, one per line, answering each with one JSON line:
//!
//! - `bcast SEQ`: (the `--publisher` process) send one message to [`ALL`] stamped with the
//!   shared monotonic clock; answers `{"sent_ns":..}`;
//! - `rate STEP RATE SECS SIZE`: (publisher) send RATE messages/s for SECS seconds, round-robin
//!   over the groups of 100; answers `{"sent":..,"start_ns":..,"end_ns":..}`;
//! - `report`: what the members received: per broadcast the count and the last arrival
//!   (`CLOCK_MONOTONIC` ns, comparable across the loader processes), per rate step the same;
//! - `quit` (or EOF): exit.
//!
//! The orchestration (server memory and CPU from /proc, kernel slab and socket memory, the
//! percentiles over all processes) lives in scripts/bench_s8.py.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::{Ctx, Outcome};
use crate::conn::{self, Target};
use crate::wire::{self, Payload};
use crate::ws::{self, Frame, Reader, Writer};

/// The group every member joins (a number no `idx % groups` reaches).
pub const ALL: u32 = 4_000_000_000;
/// Payload `publisher` field of the broadcasts; rate-step messages carry `STEP_BASE + step`.
const BCAST: u32 = 1;
const STEP_BASE: u32 = 1000;

/// `CLOCK_MONOTONIC` in ns: one clock for every loader process on the machine.
pub fn mono_ns() -> u64 {
    // SAFETY: clock_gettime fills the timespec we own.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        ts
    };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What this process's members received.
#[derive(Default)]
struct Counts {
    /// Broadcast seq -> (deliveries, last arrival ns).
    bcast: Mutex<HashMap<u64, (u64, u64)>>,
    /// Rate step -> (deliveries, last arrival ns).
    steps: Mutex<HashMap<u32, (u64, u64)>>,
    /// Replies to the joins (the `id`-carrying add_group).
    replies: AtomicU64,
    /// Error frames, closes, read failures.
    failures: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counts {
    fn fail(&self, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_error.lock() {
            f.get_or_insert(why);
        }
    }

    /// Account one text frame.
    fn on_text(&self, text: &str, now: u64) {
        if let Some(p) = Payload::decode(text) {
            if p.publisher == BCAST {
                if let Ok(mut m) = self.bcast.lock() {
                    let e = m.entry(p.seq).or_insert((0, 0));
                    e.0 += 1;
                    e.1 = e.1.max(now);
                }
            } else if let Ok(mut m) = self.steps.lock() {
                let e = m.entry(p.publisher.saturating_sub(STEP_BASE)).or_insert((0, 0));
                e.0 += 1;
                e.1 = e.1.max(now);
            }
        } else if text.contains("\"error\"") {
            self.fail(format!("server error: {text}"));
        } else if text.contains("\"id\"") {
            self.replies.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Read more bytes with a small buffer: 100,000 idle readers must not hold 64 KiB each.
async fn fill_small(r: &mut Reader) -> Result<bool> {
    if r.pos > 0 {
        r.buf.drain(..r.pos);
        r.pos = 0;
    }
    if r.buf.capacity() - r.buf.len() < 1024 {
        r.buf.reserve(4096);
    }
    let n = r.half.read_buf(&mut r.buf).await?;
    Ok(n > 0)
}

/// A member's reader: counts deliveries, answers pings, until the connection ends.
fn spawn_reader(idx: usize, mut r: Reader, w: Writer, counts: Arc<Counts>) {
    tokio::spawn(async move {
        loop {
            let now = mono_ns();
            loop {
                match ws::parse(&r.buf, r.pos) {
                    Ok(Some((frame, used))) => {
                        match frame {
                            Frame::Text(s, e) => counts.on_text(&String::from_utf8_lossy(&r.buf[s..e]), now),
                            Frame::Ping(s, e) => {
                                let mut pong = Vec::new();
                                ws::encode_pong(&r.buf[s..e], &mut pong);
                                if let Err(e) = ws::send(&w, &pong).await {
                                    counts.fail(format!("connection {idx}: pong: {e}"));
                                    return;
                                }
                            }
                            Frame::Close => {
                                counts.fail(format!("connection {idx} closed by server"));
                                return;
                            }
                            Frame::Other => {}
                        }
                        r.pos += used;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        counts.fail(format!("connection {idx}: {e}"));
                        return;
                    }
                }
            }
            match fill_small(&mut r).await {
                Ok(true) => {}
                Ok(false) => {
                    counts.fail(format!("connection {idx}: EOF from server"));
                    return;
                }
                Err(e) => {
                    counts.fail(format!("connection {idx}: {e}"));
                    return;
                }
            }
        }
    });
}

/// Open member `idx`: TCP + upgrade (timed: the handshake), then its two joins.
async fn open_member(t: &Target, idx: usize, groups: usize, counts: Arc<Counts>) -> Result<(Duration, Writer)> {
    let start = Instant::now();
    let (r, w) = conn::connect(t, idx).await.with_context(|| format!("connect #{idx}"))?;
    let handshake = start.elapsed();
    spawn_reader(idx, r, w.clone(), counts);
    let mut cmds = Vec::new();
    ws::encode_text(&wire::add_group((idx % groups) as u32, None), &mut cmds);
    ws::encode_text(&wire::add_group(ALL, Some(idx as u64)), &mut cmds);
    ws::send(&w, &cmds).await?;
    Ok((handshake, w))
}

/// Read stdin lines on a plain thread (the runtime has no stdin support enabled).
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match std::io::stdin().read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send(line.trim().to_owned()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Send `rate` messages/s for `secs` to groups round-robin; returns how many were sent.
async fn publish_rate(w: &Writer, step: u32, rate: f64, secs: f64, size: usize, groups: usize) -> Result<u64> {
    let total = (rate * secs).round() as u64;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut buf = Vec::new();
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        buf.clear();
        while sent < due {
            let g = (sent % groups as u64) as u32;
            let p = Payload { publisher: STEP_BASE + step, seq: sent, send_ns: mono_ns(), group: g };
            ws::encode_text(&wire::send_to_group(g, &p.encode(size)), &mut buf);
            sent += 1;
        }
        if !buf.is_empty() {
            ws::send(w, &buf).await?;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(sent)
}

fn say(v: serde_json::Value) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// S8 agent (see the module doc): `--connections` (default 16,667; smoke 150) from `--first`,
/// `--groups` (default 1,000; smoke 3).
pub async fn s8(ctx: &Ctx) -> Result<Outcome> {
    let t = ctx.target()?.clone();
    let n = ctx.pick(&ctx.o.connections, 16_667, 150);
    let first = ctx.o.first.unwrap_or(0);
    let groups = ctx.pick(&ctx.o.groups, 1000, 3).max(1);
    let conc = ctx.pick(&ctx.o.concurrency, 100, 32);
    let counts = Arc::new(Counts::default());

    let t_start = mono_ns();
    let opened: Vec<Result<(Duration, Writer)>> = futures_util::stream::iter(first..first + n)
        .map(|idx| open_member(&t, idx, groups, counts.clone()))
        .buffer_unordered(conc.max(1))
        .collect()
        .await;
    let mut handshakes_us = Vec::with_capacity(n);
    let mut writers = Vec::with_capacity(n);
    let mut connect_failures = 0u64;
    for r in opened {
        match r {
            Ok((h, w)) => {
                handshakes_us.push(h.as_micros() as u64);
                writers.push(w);
            }
            Err(e) => {
                connect_failures += 1;
                counts.fail(format!("{e:#}"));
            }
        }
    }
    // Joined = every opened member's `id` reply is in (or something failed, or 120 s).
    let deadline = Instant::now() + Duration::from_secs(120);
    while counts.replies.load(Ordering::Relaxed) < writers.len() as u64
        && counts.failures.load(Ordering::Relaxed) == 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t_joined = mono_ns();
    // The publisher is an extra connection, opened after the storm and joined to nothing.
    let publisher =
        if ctx.o.publisher { Some(conn::connect(&t, first + n).await.context("publisher connect")?) } else { None };
    let pub_w = publisher.map(|(r, w)| {
        spawn_reader(first + n, r, w.clone(), counts.clone());
        w
    });
    handshakes_us.sort_unstable();
    say(json!({
        "ready": true,
        "opened": writers.len(),
        "joined": counts.replies.load(Ordering::Relaxed),
        "connect_failures": connect_failures,
        "first_error": counts.first_error.lock().ok().and_then(|f| f.clone()),
        "t_start_ns": t_start,
        "t_joined_ns": t_joined,
        "handshake_us": handshakes_us,
    }));

    let mut lines = stdin_lines();
    while let Some(line) = lines.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["bcast", seq] => {
                let w = pub_w.as_ref().context("bcast: this loader has no --publisher")?;
                let seq: u64 = seq.parse().context("bcast SEQ")?;
                let send_ns = mono_ns();
                let p = Payload { publisher: BCAST, seq, send_ns, group: ALL };
                let mut buf = Vec::new();
                ws::encode_text(&wire::send_to_group(ALL, &p.encode(64)), &mut buf);
                ws::send(w, &buf).await?;
                say(json!({ "sent_ns": send_ns }));
            }
            ["rate", step, rate, secs, size] => {
                let w = pub_w.as_ref().context("rate: this loader has no --publisher")?;
                let start_ns = mono_ns();
                let sent = publish_rate(w, step.parse()?, rate.parse()?, secs.parse()?, size.parse()?, groups).await?;
                say(json!({ "sent": sent, "start_ns": start_ns, "end_ns": mono_ns() }));
            }
            ["report"] => {
                let bcast: HashMap<String, (u64, u64)> = counts
                    .bcast
                    .lock()
                    .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                    .unwrap_or_default();
                let steps: HashMap<String, (u64, u64)> = counts
                    .steps
                    .lock()
                    .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                    .unwrap_or_default();
                say(json!({
                    "bcast": bcast,
                    "steps": steps,
                    "failures": counts.failures.load(Ordering::Relaxed),
                    "first_error": counts.first_error.lock().ok().and_then(|f| f.clone()),
                }));
            }
            ["quit"] => break,
            [] => {}
            other => bail!("unknown S8 command {other:?}"),
        }
    }
    let failures = counts.failures.load(Ordering::Relaxed);
    drop(writers);
    Ok(Outcome {
        ok: failures == 0,
        body: json!({ "result": { "members": n, "failures": failures,
            "first_error": counts.first_error.lock().ok().and_then(|f| f.clone()) } }),
    })
}
