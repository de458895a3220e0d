//! Many WebSocket clients driven by one thread: non-blocking sockets multiplexed with mio,
//! a hand-made upgrade request and hand-made frames (the library's client encoder). For the
//! tests that hold thousands of connections through reloads (tests/handoff.rs): a thread per
//! client would not fit the machine.
//!
//! The swarm records every text frame each connection receives, answers pings, and records
//! how a connection ended (close frame, EOF, error, refused upgrade) instead of panicking:
//! the tests then assert on what happened to every connection at once.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::encode_frame;

/// How a connection of the swarm ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The server sent a close frame with this code (1005: none).
    Close(u16),
    /// The server closed the TCP connection without a close frame.
    Eof,
    /// A socket error (reset, ...).
    Error(String),
    /// The upgrade was answered with something else than 101 (the answer's first line).
    Refused(String),
}

/// Where a connection is in its life.
#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Upgrade request sent (or queued), waiting for the 101.
    Handshaking,
    Open,
    Ended,
}

/// One client connection of the swarm.
pub struct Conn {
    stream: TcpStream,
    /// Local port: identifies the connection on the server side.
    pub port: u16,
    /// The upgrade path (`/`, `/?protocol=2`).
    pub path: String,
    state: State,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// A text message arriving in fragments (servers do not fragment today; handled anyway).
    fragment: Option<Vec<u8>>,
    /// Every text frame received, in order.
    pub texts: Vec<String>,
    /// How it ended, if it did.
    pub ended: Option<Ended>,
    /// When the 101 arrived.
    pub opened_at: Option<Instant>,
}

impl Conn {
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }
}

/// The upgrade request every swarm client sends (any key does; the answer is checked for 101).
fn upgrade_request(addr: SocketAddr, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

pub struct Swarm {
    poll: Poll,
    events: Events,
    pub conns: Vec<Conn>,
}

impl Default for Swarm {
    fn default() -> Self {
        Swarm::new()
    }
}

impl Swarm {
    pub fn new() -> Swarm {
        Swarm { poll: Poll::new().expect("create a mio poll"), events: Events::with_capacity(4096), conns: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Connects one client to `path` and queues its upgrade request; its index. A refused TCP
    /// connect is recorded as ended, not a panic.
    pub fn add(&mut self, addr: SocketAddr, path: &str) -> usize {
        let i = self.conns.len();
        let std = match StdStream::connect_timeout(&addr, super::TIMEOUT) {
            Ok(s) => s,
            Err(e) => panic!("connect {addr} (client {i}): {e}"),
        };
        std.set_nodelay(true).unwrap();
        std.set_nonblocking(true).unwrap();
        let port = std.local_addr().unwrap().port();
        let mut stream = TcpStream::from_std(std);
        self.poll
            .registry()
            .register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)
            .expect("register a client socket");
        self.conns.push(Conn {
            stream,
            port,
            path: path.to_owned(),
            state: State::Handshaking,
            inbuf: Vec::new(),
            out: upgrade_request(addr, path),
            fragment: None,
            texts: Vec::new(),
            ended: None,
            opened_at: None,
        });
        self.flush(i);
        i
    }

    /// `add` for each path, `batch` at a time, each batch driven until every upgrade of it is
    /// answered (the listen backlog is not made to overflow); indexes in order. Panics with
    /// the failures if an upgrade fails or `timeout` passes.
    pub fn add_all(&mut self, addr: SocketAddr, paths: &[String], batch: usize, timeout: Duration) -> Vec<usize> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(paths.len());
        for chunk in paths.chunks(batch.max(1)) {
            let ids: Vec<usize> = chunk.iter().map(|p| self.add(addr, p)).collect();
            self.pump_until("the upgrades of a batch", deadline, |s| {
                ids.iter().all(|&i| s.conns[i].state != State::Handshaking)
            });
            let failed: Vec<String> = ids
                .iter()
                .filter_map(|&i| self.conns[i].ended.as_ref().map(|e| format!("client {i}: {e:?}")))
                .collect();
            assert!(failed.is_empty(), "upgrades failed: {failed:?}");
            out.extend(ids);
        }
        out
    }

    /// Queues one masked text frame for client `i` and writes what the socket takes. Ignored
    /// for an ended connection (the tests assert on `ended`).
    pub fn send_text(&mut self, i: usize, text: &str) {
        self.send_raw(i, &encode_frame(0x81, text.as_bytes(), true));
    }

    /// Queues raw bytes (any part of a frame, or of the upgrade request) for client `i`.
    pub fn send_raw(&mut self, i: usize, bytes: &[u8]) {
        if self.conns[i].state == State::Ended {
            return;
        }
        self.conns[i].out.extend_from_slice(bytes);
        self.flush(i);
    }

    /// Waits up to `timeout` for socket events and handles them all: reads, parses frames,
    /// answers pings, writes queued bytes.
    pub fn pump(&mut self, timeout: Duration) {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => return,
            Err(e) => panic!("poll: {e}"),
        }
        let ready: Vec<(usize, bool, bool)> = self
            .events
            .iter()
            .map(|e| (e.token().0, e.is_readable() || e.is_read_closed() || e.is_error(), e.is_writable()))
            .collect();
        for (i, readable, writable) in ready {
            if writable {
                self.flush(i);
            }
            if readable {
                self.read(i);
            }
        }
    }

    /// Pumps until `done` holds; panics naming `what` at `deadline`.
    pub fn pump_until(&mut self, what: &str, deadline: Instant, mut done: impl FnMut(&Swarm) -> bool) {
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.pump(Duration::from_millis(5));
        }
    }

    /// Pumps for `d` (to collect whatever is still in flight).
    pub fn pump_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.pump(Duration::from_millis(5));
        }
    }

    /// The connections that ended, with how.
    pub fn ended(&self) -> Vec<(usize, Ended)> {
        self.conns.iter().enumerate().filter_map(|(i, c)| c.ended.clone().map(|e| (i, e))).collect()
    }

    /// A short account of the ended connections for an assertion message: a count per kind
    /// and the first few.
    pub fn ended_summary(&self) -> String {
        let ended = self.ended();
        let mut kinds: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for (_, e) in &ended {
            let k = match e {
                Ended::Close(c) => format!("close {c}"),
                Ended::Eof => "EOF".into(),
                Ended::Error(_) => "error".into(),
                Ended::Refused(_) => "refused".into(),
            };
            *kinds.entry(k).or_default() += 1;
        }
        let first: Vec<_> = ended.iter().take(5).collect();
        format!("{} of {} connections ended: {kinds:?}; first: {first:?}", ended.len(), self.conns.len())
    }

    fn end(&mut self, i: usize, how: Ended) {
        let c = &mut self.conns[i];
        if c.state == State::Ended {
            return;
        }
        c.state = State::Ended;
        c.ended = Some(how);
        c.out.clear();
        let _ = self.poll.registry().deregister(&mut c.stream);
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        while !c.out.is_empty() && c.state != State::Ended {
            match c.stream.write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A not-yet-connected socket (connect in progress) says so; wait for writable.
                Err(e) if e.kind() == ErrorKind::NotConnected => break,
                Err(e) => {
                    let how = Ended::Error(format!("write: {e}"));
                    self.end(i, how);
                    return;
                }
            }
        }
    }

    fn read(&mut self, i: usize) {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if self.conns[i].state == State::Ended {
                return;
            }
            match self.conns[i].stream.read(&mut chunk) {
                Ok(0) => {
                    // Frames already buffered count before the EOF.
                    self.parse(i);
                    self.end(i, Ended::Eof);
                    return;
                }
                Ok(n) => self.conns[i].inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.parse(i);
                    let how =
                        if e.kind() == ErrorKind::ConnectionReset { Ended::Eof } else { Ended::Error(e.to_string()) };
                    self.end(i, how);
                    return;
                }
            }
        }
        self.parse(i);
    }

    /// Handles what is complete in the input buffer: the upgrade answer, then frames.
    fn parse(&mut self, i: usize) {
        if self.conns[i].state == State::Handshaking {
            let c = &mut self.conns[i];
            let Some(end) = c.inbuf.windows(4).position(|w| w == b"\r\n\r\n") else { return };
            let head = String::from_utf8_lossy(&c.inbuf[..end]).into_owned();
            c.inbuf.drain(..end + 4);
            if !head.starts_with("HTTP/1.1 101 ") {
                let first = head.lines().next().unwrap_or_default().to_owned();
                self.end(i, Ended::Refused(first));
                return;
            }
            c.state = State::Open;
            c.opened_at = Some(Instant::now());
        }
        // Frames are parsed from an offset and the buffer drained once: a read of 64 KiB may
        // hold a thousand small frames.
        let mut pos = 0;
        loop {
            if self.conns[i].state != State::Open {
                return;
            }
            let Some((first, start, end)) = frame_at(&self.conns[i].inbuf[pos..]) else { break };
            let payload = self.conns[i].inbuf[pos + start..pos + end].to_vec();
            pos += end;
            let opcode = first & 0x0f;
            let fin = first & 0x80 != 0;
            match opcode {
                0x1 | 0x0 => {
                    let c = &mut self.conns[i];
                    let mut whole = if opcode == 0x0 { c.fragment.take().unwrap_or_default() } else { Vec::new() };
                    whole.extend_from_slice(&payload);
                    if fin {
                        c.texts.push(String::from_utf8(whole).unwrap_or_else(|e| format!("<not UTF-8: {e}>")));
                    } else {
                        c.fragment = Some(whole);
                    }
                }
                0x8 => {
                    let code = if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 };
                    // Answer the close as a client does, then stop.
                    let reply = encode_frame(0x88, &payload[..payload.len().min(2)], true);
                    let _ = self.conns[i].stream.write(&reply);
                    self.end(i, Ended::Close(code));
                    return;
                }
                0x9 => {
                    let pong = encode_frame(0x8a, &payload, true);
                    self.conns[i].out.extend_from_slice(&pong);
                    self.flush(i);
                }
                _ => {}
            }
        }
        self.conns[i].inbuf.drain(..pos);
    }
}

/// The complete server frame at the front of `buf`, if any: (first byte, payload start,
/// frame end).
fn frame_at(buf: &[u8]) -> Option<(u8, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, head) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    // Server frames are never masked (RFC 6455 5.1); a masked one would be a server bug the
    // tests see as garbled text.
    let start = head + if buf[1] & 0x80 != 0 { 4 } else { 0 };
    (buf.len() >= start + len).then_some((buf[0], start, start + len))
}
