//! S6 floor: this machine's CPU cost of one 64-byte write() into a loopback TCP
//! socket with TCP_NODELAY, and of one write carrying ten such frames.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use anyhow::Result;
use serde_json::{json, Value};

use super::{Ctx, Outcome};
use crate::sys::thread_cpu_us;

/// `iters` writes of `len` bytes; returns (writer CPU us per write, reader CPU us per write).
fn measure(len: usize, iters: u64) -> Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let cpu0 = thread_cpu_us();
        let mut buf = vec![0u8; 256 * 1024];
        while s.read(&mut buf)? > 0 {}
        Ok(thread_cpu_us() - cpu0)
    });
    let mut w = TcpStream::connect(addr)?;
    w.set_nodelay(true)?;
    let frame = vec![b'x'; len];
    let cpu0 = thread_cpu_us();
    for _ in 0..iters {
        w.write_all(&frame)?;
    }
    let writer_us = thread_cpu_us() - cpu0;
    drop(w);
    let reader_us = reader.join().map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    Ok((writer_us as f64 / iters as f64, reader_us as f64 / iters as f64))
}

fn entry(frames: usize, len: usize, iters: u64) -> Result<Value> {
    measure(len, iters / 10 + 1)?; // warm-up: page in, settle the CPU frequency
    let (w, r) = measure(len, iters)?;
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(json!({ "frames_per_write": frames, "bytes_per_write": len, "writes": iters,
               "writer_cpu_us_per_write": round(w), "reader_cpu_us_per_write": round(r),
               "writer_cpu_us_per_frame": round(w / frames as f64) }))
}

/// S6: 66-byte frames (64-byte payload + 2-byte WebSocket header), alone and ten per write.
pub async fn s6(ctx: &Ctx) -> Result<Outcome> {
    let iters = ctx.pick(&ctx.o.iterations, 200_000, 20_000);
    let (single, batch) = tokio::task::spawn_blocking(move || -> Result<(Value, Value)> {
        Ok((entry(1, 66, iters)?, entry(10, 660, iters)?))
    })
    .await??;
    Ok(Outcome { ok: true, body: json!({ "result": { "single": single, "ten": batch } }) })
}
