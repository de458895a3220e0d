//! Opening client connections, the reader task, joining groups, and the join probe.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::stream::StreamExt;
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

use crate::tls::Tls;
use crate::tracker::Tracker;
use crate::wire;
use crate::ws::{self, Frame, Reader, Stream, Writer};

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// Spread client source addresses over 127.0.0.1..=127.0.0.N (1 = let the kernel choose).
    pub source_ips: u8,
    /// wss:// when set: TLS over the TCP connection before the upgrade.
    pub tls: Option<Tls>,
    /// Client protocol: 1 = the seed protocol (upgrade `/`), 2 = `/?protocol=2`
    /// (numbered joins, envelopes with offsets).
    pub protocol: u8,
}

impl Target {
    pub fn protocol2(&self) -> bool {
        self.protocol == 2
    }
}

/// TCP connect (TCP_NODELAY) [+ TLS handshake] + WebSocket handshake on path `/`
/// (`/?protocol=2` for protocol 2).
pub async fn connect(t: &Target, idx: usize) -> Result<(Reader, Writer)> {
    let sock = TcpSocket::new_v4()?;
    if t.source_ips > 1 {
        let ip = Ipv4Addr::new(127, 0, 0, 1 + (idx % t.source_ips as usize) as u8);
        // Let connect() pick the port per 4-tuple instead of bind() per address.
        let one: libc::c_int = 1;
        // SAFETY: plain setsockopt on a socket we own, with a c_int option value.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::new(ip.into(), 0))?;
    }
    let stream = sock.connect(t.addr).await?;
    stream.set_nodelay(true)?;
    let stream = match &t.tls {
        Some(tls) => Stream::Tls(Box::new(tls.connect(stream).await?)),
        None => Stream::Plain(stream),
    };
    let path = if t.protocol2() { "/?protocol=2" } else { "/" };
    ws::handshake_path(stream, &t.addr.to_string(), path).await
}

/// Read every frame of connection `idx` into the tracker until it closes.
pub fn spawn_reader(idx: usize, mut r: Reader, w: Writer, tracker: Arc<Tracker>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut texts = Vec::new();
        loop {
            texts.clear();
            loop {
                match ws::parse(&r.buf, r.pos) {
                    Ok(Some((frame, used))) => {
                        match frame {
                            Frame::Text(s, e) => texts.push((s, e)),
                            Frame::Ping(s, e) => {
                                let mut pong = Vec::new();
                                ws::encode_pong(&r.buf[s..e], &mut pong);
                                if let Err(e) = ws::send(&w, &pong).await {
                                    tracker.note_conn_failure(format!("connection {idx}: pong: {e}"));
                                    return;
                                }
                            }
                            Frame::Close => {
                                tracker.on_texts(idx, &r.buf, &texts);
                                tracker.note_conn_failure(format!("connection {idx} closed by server"));
                                return;
                            }
                            Frame::Other => {}
                        }
                        r.pos += used;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracker.note_conn_failure(format!("connection {idx}: {e}"));
                        return;
                    }
                }
            }
            tracker.on_texts(idx, &r.buf, &texts);
            match r.fill().await {
                Ok(true) => {}
                Ok(false) => {
                    tracker.note_conn_failure(format!("connection {idx}: EOF from server"));
                    return;
                }
                Err(e) => {
                    tracker.note_conn_failure(format!("connection {idx}: {e}"));
                    return;
                }
            }
        }
    })
}

/// Open connections with these groups (`groups[i]` for connection i; empty = publisher),
/// join, and send the probe: the last add_group of each member carries an `id`
/// (protocol 2: every add_group does, its reply's offset anchors the offset check).
/// Returns the writers and reader tasks once every member's probe has been answered.
pub async fn establish(
    t: &Target,
    groups: &[Vec<u32>],
    tracker: &Arc<Tracker>,
    concurrency: usize,
) -> Result<(Vec<Writer>, Vec<JoinHandle<()>>)> {
    let opened: Vec<Result<(usize, Writer, JoinHandle<()>)>> = futures_util::stream::iter(groups.iter().enumerate())
        .map(|(idx, gs)| {
            let tracker = tracker.clone();
            async move {
                let (r, w) = connect(t, idx).await.with_context(|| format!("connect #{idx}"))?;
                let reader = spawn_reader(idx, r, w.clone(), tracker);
                let mut cmds = Vec::new();
                for (k, g) in gs.iter().enumerate() {
                    let id = if t.protocol2() {
                        Some(Tracker::join_id(idx, *g))
                    } else {
                        (k + 1 == gs.len()).then_some(idx as u64)
                    };
                    ws::encode_text(&wire::add_group(*g, id), &mut cmds);
                }
                ws::send(&w, &cmds).await?;
                Ok((idx, w, reader))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut slots: Vec<Option<(Writer, JoinHandle<()>)>> = (0..groups.len()).map(|_| None).collect();
    for r in opened {
        let (idx, w, reader) = r?;
        slots[idx] = Some((w, reader));
    }
    let members = if t.protocol2() {
        groups.iter().map(|g| g.len() as u64).sum()
    } else {
        groups.iter().filter(|g| !g.is_empty()).count() as u64
    };
    wait_for_replies(tracker, members, Duration::from_secs(60)).await?;
    Ok(slots.into_iter().flatten().unzip())
}

/// Wait until `n` probe replies have arrived (or fail with what went wrong).
pub async fn wait_for_replies(tracker: &Tracker, n: u64, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while tracker.replies() < n {
        if tracker.errors() > 0 || tracker.conn_failures() > 0 {
            bail!("while joining: {}", tracker.first_error().unwrap_or_default());
        }
        if start.elapsed() > timeout {
            bail!("probe timeout: {} of {} replies", tracker.replies(), n);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Members are spread round-robin: connection i joins `per_conn` distinct groups
/// `(i + k*stride) % groups`, so every group gets the same number of members.
pub fn membership(conns: usize, groups: usize, per_conn: usize) -> Vec<Vec<u32>> {
    let stride = (groups / per_conn.max(1)).max(1);
    (0..conns)
        .map(|i| {
            let mut gs: Vec<u32> = (0..per_conn).map(|k| ((i + k * stride) % groups) as u32).collect();
            gs.dedup();
            gs
        })
        .collect()
}
