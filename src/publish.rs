//! `groupcast publish GROUP [MESSAGE]`: push messages to a group from scripts and backends.
//!
//! Speaks the channel protocol straight to the broker the instance uses (`[channel] connect`,
//! else `[channel] listen`, a Unix socket by default), as one more channel peer: it answers
//! the broker's challenge when a secret is configured, sends the messages, and returns only
//! once the broker has acknowledged the last one. The broker forwards each message to every
//! worker with members of the group, so no WebSocket connection, client limit or command rate
//! applies. Without MESSAGE, every line of standard input is one message.
//!
//! With `bus = "redis"` there is no broker: the messages go through the same Lua script workers
//! publish with (channel/redis_history.rs), which numbers them in their group (protocol 2),
//! keeps them in the group's history and PUBLISHes them to the group's Redis channel
//! (`[redis] prefix` + group), so every subscribed worker delivers them and drops repeats
//! alike. Redis answers each script call, so the command returns once Redis has taken the last
//! one.

use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::channel::handshake::Handshake;
use crate::channel::publisher::Publisher;
use crate::channel::redis_history::{Epochs, HistoryLimits, Outgoing, Scripts};
use crate::channel::{auth, wire};
use crate::config::{BusKind, ChannelAddr, Config};

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
    if config.bus == BusKind::Redis {
        return publish_redis(config, group, message);
    }
    let secret = config.channel.secret_file.as_deref().map(auth::load_secret).transpose()?;
    let mut peer = Peer::connect(&config.channel_target(), config.channel.max_frame)?;
    let mut buf = Vec::with_capacity(BATCH);
    let mut handshake = Handshake::AwaitChallenge;
    while !handshake.is_done() {
        let sent = buf.len();
        peer.next_frame(|f| Ok(handshake.on_frame(secret.as_deref(), &f, &mut buf)?))?;
        if buf.len() > sent {
            peer.link.write_all(&buf)?;
            buf.clear();
        }
    }
    let mut publisher = Publisher::new(auth::random_origin(true)?);
    wire::encode_hello(&mut buf, wire::VERSION, publisher.origin(), "publish");
    let mut send = |peer: &mut Peer, buf: &mut Vec<u8>, text: &str| -> io::Result<()> {
        publisher.encode(buf, group, text.as_bytes());
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
    let seq = publisher.last_seq();
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

/// PUBLISHes per pipeline round trip when reading standard input.
const REDIS_BATCH: usize = 1024;

/// `publish` under `bus = "redis"`: straight to the group's Redis channel.
fn publish_redis(config: &Config, group: &str, message: Option<&str>) -> anyhow::Result<()> {
    let url = &config.redis.url;
    let client = redis::Client::open(url.as_str()).with_context(|| format!("invalid value for `redis.url` {url:?}"))?;
    let timeouts = crate::channel::redis_bus::Timeouts::from_millis(
        config.redis.connect_timeout_ms,
        config.redis.io_timeout_ms.max(ANSWER_TIMEOUT.as_millis() as u64),
    );
    let mut con = client
        .get_connection_with_timeout(timeouts.connect)
        .with_context(|| format!("cannot reach Redis at {url} (bus = \"redis\")"))?;
    con.set_read_timeout(Some(timeouts.io))?;
    con.set_write_timeout(Some(timeouts.io))?;
    let scripts = Scripts::load(&mut con, &config.redis.prefix).context("Redis refused the publish script")?;
    let limits = HistoryLimits::new(&config.history, config.channel.queue_max_bytes);
    let mut epochs = Epochs::new();
    let origin = auth::random_origin(true)?;
    let mut seq = 0;
    let texts: Box<dyn Iterator<Item = io::Result<String>>> = match message {
        Some(text) => Box::new(std::iter::once(Ok(text.to_owned()))),
        None => Box::new(io::stdin().lock().lines()),
    };
    let mut pipe = redis::pipe();
    let mut pending = 0;
    for text in texts {
        let text = text.context("cannot read standard input")?;
        seq += 1;
        let out = Outgoing::new(origin, seq, group, wire::PayloadKind::Text, text.as_bytes());
        let epoch = epochs.fresh().context("no random epoch")?;
        pipe.add_command(scripts.publish_cmd(&out, &epoch, &limits)).ignore();
        pending += 1;
        if pending >= REDIS_BATCH {
            pipe.query::<()>(&mut con).context("Redis refused a publish")?;
            pipe.clear();
            pending = 0;
        }
    }
    if pending > 0 {
        pipe.query::<()>(&mut con).context("Redis refused a publish")?;
    }
    eprintln!("published {seq} message(s) to group {group:?} through Redis");
    Ok(())
}
