//! Helper of the broker tests: a raw channel peer that speaks the real protocol through the
//! public `groupcast::channel::{wire, auth}` modules, so it can authenticate with the test's
//! secret and then misbehave. The broker it talks to is an instance's own or a `common::Broker`.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use groupcast::channel::{auth, wire};

/// A frame as the test keeps it (owned).
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    Challenge { flags: u8, nonce: [u8; wire::NONCE_LEN] },
    AuthOk,
    Ack(u64),
    Message { origin: u64, seq: u64, group: String, payload: Vec<u8> },
    Other(String),
}

pub enum Link {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(buf),
            Link::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write(buf),
            Link::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A channel peer driven by the test, frame by frame.
pub struct RawPeer {
    pub link: Link,
    inbuf: Vec<u8>,
    pub origin: u64,
}

impl RawPeer {
    pub fn tcp(port: u16) -> RawPeer {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the broker");
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        RawPeer { link: Link::Tcp(s), inbuf: Vec::new(), origin: 0 }
    }

    pub fn unix(path: &Path) -> RawPeer {
        let s = UnixStream::connect(path).expect("connect to the broker");
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        RawPeer { link: Link::Unix(s), inbuf: Vec::new(), origin: 0 }
    }

    /// Reads the CHALLENGE, answers it (AUTH with `secret` when the broker asks), checks
    /// AUTH_OK, sends HELLO with `origin`.
    pub fn join(mut self, secret: Option<&[u8]>, origin: u64, name: &str) -> RawPeer {
        let Got::Challenge { flags, nonce } = self.next(Duration::from_secs(10)).expect("a CHALLENGE") else {
            panic!("the first frame is not a CHALLENGE")
        };
        let mut out = Vec::new();
        if flags & wire::FLAG_AUTH_REQUIRED != 0 {
            let secret = secret.expect("the broker asks for a secret");
            let mine = auth::nonce().unwrap();
            wire::encode_auth(&mut out, &mine, &auth::peer_proof(secret, &nonce, &mine));
            self.send(&out);
            out.clear();
            assert_eq!(self.next(Duration::from_secs(10)), Some(Got::AuthOk));
        }
        wire::encode_hello(&mut out, wire::VERSION, origin, name);
        self.send(&out);
        self.origin = origin;
        self
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.link.write_all(bytes).expect("write to the broker");
    }

    /// Writes `bytes`; the broker may have closed the connection already.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.link.write_all(bytes)
    }

    pub fn subscribe(&mut self, group: &str) {
        let mut out = Vec::new();
        wire::encode_subscribe(&mut out, group);
        self.send(&out);
    }

    pub fn resubscribe(&mut self, group: &str) {
        let mut out = Vec::new();
        wire::encode_resubscribe(&mut out, group);
        self.send(&out);
    }

    pub fn publish(&mut self, origin: u64, seq: u64, group: &str, payload: &[u8]) {
        let mut out = Vec::new();
        wire::encode_message(&mut out, origin, seq, group, payload);
        self.send(&out);
    }

    /// The next frame, or `None` at end of stream or after `timeout` of silence.
    pub fn next(&mut self, timeout: Duration) -> Option<Got> {
        self.next_with(timeout, |frame| match frame {
            wire::Frame::Challenge { flags, nonce, .. } => Got::Challenge { flags, nonce },
            wire::Frame::AuthOk { .. } => Got::AuthOk,
            wire::Frame::Ack { seq } => Got::Ack(seq),
            wire::Frame::Message { origin, seq, group, payload } => {
                Got::Message { origin, seq, group: group.into(), payload: payload.to_vec() }
            }
            other => Got::Other(format!("{other:?}")),
        })
    }

    /// The next frame as `read` turns it into an owned value, or `None` at end of stream or
    /// after `timeout` of silence.
    pub fn next_with<T>(&mut self, timeout: Duration, mut read: impl FnMut(wire::Frame<'_>) -> T) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = wire::decode(&self.inbuf, usize::MAX).expect("the broker sends valid frames") {
                let got = read(frame);
                self.inbuf.drain(..used);
                return Some(got);
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.link.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                }
                Err(e) => panic!("read from the broker failed: {e}"),
            }
        }
    }

    /// Whether the broker closed the connection within `timeout` (frames before are skipped).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let mut chunk = [0u8; 64 * 1024];
            match self.link.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("read from the broker failed: {e}"),
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }
}

/// A MESSAGE frame.
pub fn message(origin: u64, seq: u64, group: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode_message(&mut out, origin, seq, group, payload);
    out
}
