//! Helpers shared by the robustness tests (limits, slow readers, slowloris, channel defenses):
//! watchers that prove a worker still delivers after an offender was dealt with, a raw
//! WebSocket connection whose receive buffer is set small before `connect` (so a client that
//! stops reading fills the kernel buffers fast), a cheap flood publisher, and /proc-free
//! memory figures from `status --json`.
//!
//! Built on `tests/common/mod.rs` (the `Server` guard, `Client`, `exchange`, `workers_of`).
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

/// Starts an instance with `workers` workers and the TOML `config`.
pub fn start(workers: usize, config: &str) -> Server {
    Server::start_with(Opts { config: Some(config.into()), ..Opts::workers(workers) })
}

/// Sum of an integer counter over the worker rows.
pub fn worker_sum(r: &Value, name: &str) -> u64 {
    worker_rows(r).iter().map(|w| field(w, name)).sum()
}

/// Resident memory (KiB) of worker `index`.
pub fn worker_rss(r: &Value, index: usize) -> u64 {
    field(&worker_rows(r)[index], "rss_kib")
}

// ---- watchers ------------------------------------------------------------------------------

/// One well-behaved client per worker (index i on worker i), all members of `group`: after an
/// offender was dealt with, `check` proves every worker (the offender's included) still
/// delivers group messages exactly once, across workers.
pub struct Watchers {
    pub clients: Vec<Client>,
    pub group: String,
    member_of: Vec<HashSet<String>>,
    round: usize,
}

impl Watchers {
    /// Connects until every worker holds one watcher (extra connections are closed again).
    /// Costs each watcher two commands (join, probe).
    pub fn new(server: &Server, group: &str) -> Watchers {
        let mut found: Vec<Option<Client>> = (0..server.workers).map(|_| None).collect();
        for _ in 0..256 {
            let c = Client::connect(server.addr);
            let w = server.workers_of(&[&c])[0];
            if found[w].is_none() {
                found[w] = Some(c);
            }
            if found.iter().all(Option::is_some) {
                break;
            }
        }
        assert!(found.iter().all(Option::is_some), "256 connections did not reach every worker");
        let mut clients: Vec<Client> = found.into_iter().map(Option::unwrap).collect();
        for c in &mut clients {
            c.add_group(&json!(group));
            c.sync_quiet();
        }
        let n = clients.len();
        Watchers { clients, group: group.into(), member_of: vec![[group.to_string()].into(); n], round: 0 }
    }

    /// Waits until `extra` memberships besides the watchers' are subscribed (see
    /// `Server::wait_subscriptions`).
    pub fn settle(&self, server: &Server, extra: u64) {
        server.wait_subscriptions(self.clients.len() as u64 + extra);
    }

    /// Every watcher sends one message and a fence to the group; every watcher must receive
    /// all of them, exactly once and in order. Costs each watcher two commands.
    pub fn check(&mut self, after: &str) {
        self.round += 1;
        let flows: Vec<Flow> = (0..self.clients.len())
            .map(|s| Flow { sender: s, group: self.group.clone(), group_id: json!(self.group) })
            .collect();
        let tag = format!("w{}", self.round);
        let n = self.clients.len() as u64;
        let delivered = exchange(&mut self.clients, &self.member_of, &flows, 1, &tag);
        assert_eq!(delivered, n * n * 2, "watchers after {after}");
    }
}

// ---- raw connections -----------------------------------------------------------------------

/// A TCP connection to `addr` whose receive buffer was set to `rcvbuf` bytes before `connect`
/// (so the advertised window stays small), blocking, with read timeout `TIMEOUT`.
pub fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: i32) -> TcpStream {
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 only: {addr}") };
    // SAFETY: plain socket calls on a descriptor we create and then hand to TcpStream, which
    // owns (and closes) it from then on; the sockaddr and option value live on our stack.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &rcvbuf as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "setsockopt SO_RCVBUF: {}", std::io::Error::last_os_error());
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect {addr}: {}", std::io::Error::last_os_error());
        stream
    };
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// A hand-driven WebSocket connection (our own, since `RawWs` cannot adopt a prepared
/// socket): handshake, masked frames out, frames in.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// How reading a frame ended when it did not yield one.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Orderly end of stream (or a reset after the server closed).
    Eof,
    /// Nothing arrived before the read timeout.
    Timeout,
}

impl RawConn {
    /// Completes the WebSocket handshake on `stream`.
    pub fn upgrade(mut stream: TcpStream) -> RawConn {
        stream
            .write_all(
                b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .unwrap();
        let mut conn = RawConn { stream, buf: Vec::new() };
        let head_end = loop {
            if let Some(i) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(conn.fill().unwrap_or(0) > 0, "connection ended during the handshake");
        };
        let head = String::from_utf8_lossy(&conn.buf[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101 "), "handshake refused: {head}");
        conn.buf.drain(..head_end);
        conn
    }

    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).expect("connect to groupcast");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        RawConn::upgrade(stream)
    }

    /// Local port, which identifies the connection on the server side (`workers_of_ports`).
    pub fn port(&self) -> u16 {
        self.stream.local_addr().unwrap().port()
    }

    fn fill(&mut self) -> Result<usize, End> {
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(End::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(End::Timeout),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Err(End::Eof),
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// The next frame (first byte, payload), or how the stream ended.
    pub fn next_frame(&mut self) -> Result<(u8, Vec<u8>), End> {
        loop {
            if self.buf.len() >= 2 {
                let (len, head) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= head + len {
                    let first = self.buf[0];
                    let payload = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    return Ok((first, payload));
                }
            }
            self.fill()?;
        }
    }

    /// The next text frame, answering nothing (pings are returned like any frame).
    pub fn next_text(&mut self) -> String {
        match self.next_frame() {
            Ok((0x81, p)) => String::from_utf8(p).expect("UTF-8 text"),
            other => panic!("expected a text frame, got {:?}", other.map(|(f, p)| (f, p.len()))),
        }
    }

    pub fn write_frame(&mut self, first: u8, payload: &[u8]) {
        self.stream.write_all(&encode_frame(first, payload, true)).unwrap();
    }

    pub fn send_text(&mut self, text: &str) {
        self.write_frame(0x81, text.as_bytes());
    }

    /// Sets the read timeout (`None` = `TIMEOUT`).
    pub fn read_timeout(&self, t: Option<Duration>) {
        self.stream.set_read_timeout(Some(t.unwrap_or(TIMEOUT))).unwrap();
    }
}

/// A masked text frame with masking key 0 (payload bytes unchanged), so a flood costs the
/// test no per-byte work.
pub fn text_frame_zero_mask(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    groupcast::ws::frame::encode_client(&mut out, 0x81, payload, Some([0; 4]));
    out
}

/// The `send_to_group` frame of flood message `seq`: its text is `"<seq>|"` padded with `x`
/// to `size` bytes.
pub fn flood_frame(group: &str, seq: usize, size: usize) -> Vec<u8> {
    let mut message = format!("{seq}|");
    message.extend(std::iter::repeat_n('x', size.saturating_sub(message.len())));
    let cmd = json!({"cmd":"send_to_group","group_id":group,"message":message}).to_string();
    text_frame_zero_mask(cmd.as_bytes())
}

/// The sequence number of a flood message, `None` for other frames (replies, events).
pub fn flood_seq(text: &str) -> Option<usize> {
    text.split_once('|').and_then(|(n, _)| n.parse().ok())
}

/// Reads `stream` until end of stream (EOF or reset); returns the bytes read. Panics if it is
/// still open after `timeout`.
pub fn read_to_eof(stream: &mut impl Read, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read failed: {e}"),
        }
        assert!(Instant::now() < deadline, "still open after {timeout:?} ({} bytes read)", out.len());
    }
}
