//! `groupcast publish GROUP [MESSAGE]`: push messages to a group from scripts and backends.
//!
//! Speaks the channel protocol straight to the broker the instance uses (`[channel] connect`,
//! else `[channel] listen`, a Unix socket by default), as one more channel peer: it answers
//! the broker's challenge when a secret is configured, sends the messages, and returns only
//! once the broker has acknowledged the last one. The broker forwards each message to every
//! worker with members of the group, so no WebSocket connection, client limit or command rate
//! applies. Without MESSAGE, every line of standard input is one message.

use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::channel::{auth, wire};
use crate::config::{ChannelAddr, Config};

/// Bytes gathered before a write, so a long stdin costs few syscalls.
const BATCH: usize = 64 * 1024;
/// How long the broker may take to answer (challenge, proof, last acknowledgement).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A blocking channel connection, TCP or Unix.
trait Link: Read + Write {}
impl<T: Read + Write> Link for T {}

struct Peer {
    link: Box<dyn Link>,
    inbuf: Vec<u8>,
    max_frame: usize,
}

impl Peer {
    fn connect(addr: &ChannelAddr, max_frame: usize) -> anyhow::Result<Peer> {
        let unreachable = || format!("cannot reach the channel server at {addr} (is groupcast running?)");
        let link: Box<dyn Link> = match addr {
            ChannelAddr::Unix(path) => {
                let s = UnixStream::connect(path).with_context(unreachable)?;
                s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
                Box::new(s)
            }
            ChannelAddr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, Duration::from_secs(5)).with_context(unreachable)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
                Box::new(s)
            }
        };
        Ok(Peer { link, inbuf: Vec::new(), max_frame })
    }

    /// Reads until one whole frame is buffered and hands it to `f`.
    fn next_frame<T>(&mut self, f: impl FnOnce(wire::Frame<'_>) -> anyhow::Result<T>) -> anyhow::Result<T> {
        loop {
            if let Some((frame, used)) = wire::decode(&self.inbuf, self.max_frame)? {
                let out = f(frame);
                self.inbuf.drain(..used);
                return out;
            }
            let mut buf = [0u8; 4096];
            let n = self.link.read(&mut buf).context("no answer from the channel server")?;
            if n == 0 {
                bail!("the channel server closed the connection (wrong secret?)");
            }
            self.inbuf.extend_from_slice(&buf[..n]);
        }
    }
}

pub fn publish(config: &Config, group: &str, message: Option<&str>) -> anyhow::Result<()> {
    if group.is_empty() || group.len() > config.limits.max_group_id_len {
        bail!("the group id must be 1 to {} bytes", config.limits.max_group_id_len);
    }
    let secret = config.channel.secret_file.as_deref().map(auth::load_secret).transpose()?;
    let mut peer = Peer::connect(&config.channel_target(), config.channel.max_frame)?;
    let (flags, broker_nonce) = peer.next_frame(|f| match f {
        wire::Frame::Challenge { flags, nonce, .. } => Ok((flags, nonce)),
        other => bail!("unexpected first frame from the channel server: {other:?}"),
    })?;
    let mut buf = Vec::with_capacity(BATCH);
    if flags & wire::FLAG_AUTH_REQUIRED != 0 {
        let Some(secret) = secret.as_deref() else {
            bail!("the channel server requires a shared secret: set [channel] secret_file");
        };
        let nonce = auth::nonce()?;
        wire::encode_auth(&mut buf, &nonce, &auth::peer_proof(secret, &broker_nonce, &nonce));
        peer.link.write_all(&buf)?;
        buf.clear();
        let proof = peer.next_frame(|f| match f {
            wire::Frame::AuthOk { mac } => Ok(mac),
            other => bail!("unexpected answer to AUTH: {other:?}"),
        })?;
        if !auth::verify_broker(secret, &nonce, &broker_nonce, &proof) {
            bail!("the channel server failed to prove the shared secret");
        }
    } else if secret.is_some() {
        bail!("the channel server does not authenticate, but a secret is configured: refusing it");
    }
    let origin = auth::random_origin(true)?;
    wire::encode_hello(&mut buf, origin, "publish");
    let mut seq = 0u64;
    let mut send = |peer: &mut Peer, buf: &mut Vec<u8>, text: &str| -> io::Result<()> {
        seq += 1;
        wire::encode_message(buf, origin, seq, group, text.as_bytes());
        if buf.len() >= BATCH {
            peer.link.write_all(buf)?;
            buf.clear();
        }
        Ok(())
    };
    match message {
        Some(text) => send(&mut peer, &mut buf, text)?,
        None => {
            for line in io::stdin().lock().lines() {
                send(&mut peer, &mut buf, &line.context("cannot read standard input")?)?;
            }
        }
    }
    peer.link.write_all(&buf).and_then(|()| peer.link.flush()).context("the channel server closed the connection")?;
    // Done only when the broker has forwarded the last one.
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut acked = 0;
    while acked < seq {
        acked = acked.max(peer.next_frame(|f| match f {
            wire::Frame::Ack { seq } => Ok(seq),
            _ => Ok(0),
        })?);
        if acked < seq && Instant::now() > deadline {
            bail!("the channel server acknowledged only {acked} of {seq} messages");
        }
    }
    eprintln!("published {seq} message(s) to group {group:?}");
    Ok(())
}
