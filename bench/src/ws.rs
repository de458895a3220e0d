//! A lean WebSocket client: hand-written handshake and frame codec over a tokio
//! TcpStream (ws://) or a rustls stream over one (wss://), so the loader spends little
//! CPU per delivered frame (one read() drains many frames, one shard lock accounts for
//! all of them).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, Context, Result};
use groupcast::ws::frame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x9e];
const MAX_FRAME: usize = 64 * 1024 * 1024;

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// One client connection before the upgrade: plain TCP or TLS over TCP.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Plain(s)
    }
}

/// Read half of an upgraded connection. An enum rather than a trait object so the
/// plain path stays what it was (TcpStream's own lock-free halves).
pub enum ReadHalf {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream>),
}

/// Write half of an upgraded connection.
pub enum WriteHalf {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream>),
}

impl Stream {
    fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

/// AsyncWrite by delegation to the variant's stream.
macro_rules! delegate_write {
    ($ty:ident) => {
        impl AsyncWrite for $ty {
            fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_flush(cx),
                    $ty::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}
delegate_write!(Stream);
delegate_write!(WriteHalf);

/// Write side, shared between the connection's owner (commands) and its reader (pongs).
pub type Writer = Arc<Mutex<WriteHalf>>;

/// Append one masked client text frame carrying `text` to `out`.
pub fn encode_text(text: &str, out: &mut Vec<u8>) {
    encode(0x1, text.as_bytes(), out);
}

/// Append one masked pong frame echoing `payload`.
pub fn encode_pong(payload: &[u8], out: &mut Vec<u8>) {
    encode(0xA, payload, out);
}

fn encode(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    frame::encode_client(out, 0x80 | opcode, payload, Some(MASK));
}

/// Append one masked close frame with `code` (no reason).
pub fn encode_close(code: u16, out: &mut Vec<u8>) {
    encode(0x8, &code.to_be_bytes(), out);
}

/// Write pre-encoded frames. The flush matters for TLS only: it pushes out records
/// rustls still holds when the socket was full (a no-op on plain TCP).
pub async fn send(w: &Writer, frames: &[u8]) -> Result<()> {
    let mut w = w.lock().await;
    w.write_all(frames).await?;
    w.flush().await?;
    Ok(())
}

/// One frame parsed from the read buffer.
pub enum Frame {
    /// A complete text message: byte range in the buffer.
    Text(usize, usize),
    Ping(usize, usize),
    Close,
    Other,
}

/// Parse the next complete frame at `buf[at..]`: (frame, bytes consumed), None if incomplete.
/// Server frames are unmasked; fragmented messages are reported as `Other` (not used by
/// any server under test; the tracker would count the missing payload as loss).
pub fn parse(buf: &[u8], at: usize) -> Result<Option<(Frame, usize)>> {
    let b = &buf[at..];
    if b.len() < 2 {
        return Ok(None);
    }
    let (fin, opcode, masked) = (b[0] & 0x80 != 0, b[0] & 0x0f, b[1] & 0x80 != 0);
    let (len, mut hdr) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into()?) as usize, 10),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if masked {
        hdr += 4; // not expected from a server; skip the key, payload stays masked
    }
    if len > MAX_FRAME {
        bail!("frame of {len} bytes");
    }
    if b.len() < hdr + len {
        return Ok(None);
    }
    let (s, e) = (at + hdr, at + hdr + len);
    let frame = match opcode {
        0x1 if fin && !masked => Frame::Text(s, e),
        0x9 => Frame::Ping(s, e),
        0x8 => Frame::Close,
        _ => Frame::Other,
    };
    Ok(Some((frame, hdr + len)))
}

/// Read half plus its buffer.
pub struct Reader {
    pub half: ReadHalf,
    pub buf: Vec<u8>,
    /// Parsed up to here.
    pub pos: usize,
}

impl Reader {
    /// Read more bytes (compacting first); Ok(false) on EOF.
    pub async fn fill(&mut self) -> Result<bool> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        let n = self.half.read_buf(&mut self.buf).await?;
        Ok(n > 0)
    }

    /// Next text message (answering pings), for setup code; None on close/EOF.
    pub async fn next_text(&mut self, w: &Writer) -> Result<Option<String>> {
        loop {
            while let Some((frame, used)) = parse(&self.buf, self.pos)? {
                self.pos += used;
                match frame {
                    Frame::Text(s, e) => return Ok(Some(String::from_utf8_lossy(&self.buf[s..e]).into_owned())),
                    Frame::Ping(s, e) => {
                        let mut pong = Vec::new();
                        encode_pong(&self.buf[s..e], &mut pong);
                        send(w, &pong).await?;
                    }
                    Frame::Close => return Ok(None),
                    Frame::Other => {}
                }
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }
}

/// HTTP upgrade of `/` on an open (TCP or TLS) stream; returns the split connection.
pub async fn handshake(stream: impl Into<Stream>, host: &str) -> Result<(Reader, Writer)> {
    handshake_path(stream, host, "/").await
}

/// HTTP upgrade of `path` (e.g. `/?protocol=2`) on an open stream.
pub async fn handshake_path(stream: impl Into<Stream>, host: &str, path: &str) -> Result<(Reader, Writer)> {
    let mut stream = stream.into();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    stream.flush().await?;
    let mut buf = Vec::with_capacity(4096);
    let end = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed during handshake");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            bail!("handshake response too long");
        }
    };
    let head = std::str::from_utf8(&buf[..end]).context("handshake response not UTF-8")?;
    if !head.starts_with("HTTP/1.1 101") {
        bail!("handshake refused: {}", head.lines().next().unwrap_or(""));
    }
    let (r, w) = stream.split();
    let mut rest = buf.split_off(end);
    rest.reserve(8 * 1024);
    Ok((Reader { half: r, buf: rest, pos: 0 }, Arc::new(Mutex::new(w))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unmasked_server_frames() {
        let mut b = vec![0x81, 3, b'a', b'b', b'c', 0x81, 126, 0, 200];
        b.extend(std::iter::repeat_n(b'x', 200));
        let (f, n) = parse(&b, 0).unwrap().unwrap();
        assert!(matches!(f, Frame::Text(2, 5)) && n == 5);
        let (f, n) = parse(&b, 5).unwrap().unwrap();
        assert!(matches!(f, Frame::Text(9, 209)) && n == 204);
        assert!(parse(&b[..100], 5).unwrap().is_none());
    }

    #[test]
    fn masks_client_frames() {
        let mut out = Vec::new();
        encode_text("hi", &mut out);
        assert_eq!(out[..2], [0x81, 0x82]);
        assert_eq!(out[6] ^ MASK[0], b'h');
    }
}
