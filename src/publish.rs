//! `groupcast publish GROUP [MESSAGE]`: push messages to a group from scripts and backends.
//!
//! Speaks the channel protocol straight to the instance's channel server (the address of
//! `[channel] listen`, a Unix socket by default), as one more channel peer: the broker
//! forwards each MESSAGE to every worker with members of the group, so no WebSocket
//! connection, client limit or command rate applies. Without MESSAGE, every line of standard
//! input is one message.

use std::io::{self, BufRead, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::channel::wire;
use crate::config::{ChannelAddr, Config};

/// Bytes gathered before a write, so a long stdin costs few syscalls.
const BATCH: usize = 64 * 1024;

pub fn publish(config: &Config, group: &str, message: Option<&str>) -> anyhow::Result<()> {
    if group.is_empty() || group.len() > config.limits.max_group_id_len {
        bail!("the group id must be 1 to {} bytes", config.limits.max_group_id_len);
    }
    let addr = &config.channel_listen;
    let mut out: Box<dyn Write> = match addr {
        ChannelAddr::Unix(path) => Box::new(
            UnixStream::connect(path)
                .with_context(|| format!("cannot reach the channel server at {addr} (is groupcast running?)"))?,
        ),
        ChannelAddr::Tcp(a) => {
            let s = TcpStream::connect_timeout(a, Duration::from_secs(5))
                .with_context(|| format!("cannot reach the channel server at {addr}"))?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
    };
    // An origin of its own: high bit set so it never equals a worker's (pid << 16 | index).
    let origin = (1u64 << 63) | (u64::from(std::process::id()) << 16) | u64::from(nanos() & 0xFFFF);
    let mut buf = Vec::with_capacity(BATCH);
    wire::encode_hello(&mut buf, origin, "publish");
    let mut seq = 0u64;
    let mut send = |buf: &mut Vec<u8>, text: &str| -> io::Result<()> {
        seq += 1;
        wire::encode_message(buf, origin, seq, group, text.as_bytes());
        if buf.len() >= BATCH {
            out.write_all(buf)?;
            buf.clear();
        }
        Ok(())
    };
    match message {
        Some(text) => send(&mut buf, text)?,
        None => {
            for line in io::stdin().lock().lines() {
                let line = line.context("cannot read standard input")?;
                send(&mut buf, &line)?;
            }
        }
    }
    drop(send);
    out.write_all(&buf).and_then(|()| out.flush()).context("the channel server closed the connection")?;
    eprintln!("published {seq} message(s) to group {group:?}");
    Ok(())
}

fn nanos() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
}
