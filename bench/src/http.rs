//! A minimal HTTP/1.1 keep-alive client for A1 (`POST /api/publish`): one request written,
//! its answer read whole (head parsed with httparse, body by Content-Length), the connection
//! kept for the next. Nothing more: no chunked bodies, no redirects, no pipelining, so the
//! loader's own cost per request stays small and visible.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest answer head accepted: the API's answers are a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;
/// Longest answer body accepted (a publish answer is `{"ok":true,"offset":N}`).
const MAX_BODY: usize = 1 << 20;

/// One keep-alive connection to the API.
pub struct HttpClient {
    stream: TcpStream,
    host: String,
    /// `Authorization: Bearer KEY\r\n`, or empty.
    auth: String,
    buf: Vec<u8>,
    req: Vec<u8>,
}

/// An answer: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr, key: Option<&str>) -> Result<HttpClient> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect to the API at {addr}"))?;
        stream.set_nodelay(true)?;
        let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
        Ok(HttpClient { stream, host: addr.to_string(), auth, buf: Vec::with_capacity(4096), req: Vec::new() })
    }

    /// `POST path` with a JSON body; waits for the whole answer.
    pub async fn post_json(&mut self, path: &str, body: &[u8]) -> Result<Answer> {
        self.req.clear();
        self.req.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.host,
                self.auth,
                body.len()
            )
            .as_bytes(),
        );
        self.req.extend_from_slice(body);
        self.stream.write_all(&self.req).await.context("write the request")?;
        self.read_answer().await
    }

    async fn read_answer(&mut self) -> Result<Answer> {
        loop {
            if let Some((status, head_len, length, close)) = parse_head(&self.buf)? {
                let whole = head_len + length;
                while self.buf.len() < whole {
                    self.fill().await?;
                }
                let body = self.buf[head_len..whole].to_vec();
                self.buf.drain(..whole);
                if close {
                    bail!("the API closed the connection after a {status} answer");
                }
                return Ok(Answer { status, body });
            }
            if self.buf.len() > MAX_HEAD {
                bail!("answer head over {MAX_HEAD} bytes");
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<()> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(4096);
        }
        let n = self.stream.read_buf(&mut self.buf).await.context("read the answer")?;
        if n == 0 {
            bail!("the API closed the connection mid-answer ({} bytes buffered)", self.buf.len());
        }
        Ok(())
    }
}

/// (status, head length, body length, connection closes) once the head is whole.
fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, usize, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; 24];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf).context("malformed answer head")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = res.code.unwrap_or(0);
    let (mut length, mut close) = (0usize, false);
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .context("bad Content-Length in the answer")?;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("chunked answers are not expected from the API");
        }
    }
    if length > MAX_BODY {
        bail!("answer body of {length} bytes");
    }
    Ok(Some((status, head_len, length, close)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_whole_or_partial() {
        let a = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n{\"ok\":true,\"offset\":7}";
        assert_eq!(parse_head(a).unwrap(), Some((200, a.len() - 22, 22, false)));
        assert_eq!(parse_head(&a[..20]).unwrap(), None);
        let c = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_head(c).unwrap(), Some((503, c.len(), 0, true)));
    }
}
