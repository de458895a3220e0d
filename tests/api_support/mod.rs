//! Helpers of the HTTP API tests: an instance with an `[api]` listener (and a bearer key file
//! when asked), requests through a real HTTP client (ureq) and by hand over raw sockets, and a
//! strict reader of HTTP/1.1 answers (status line, headers, a body of `Content-Length` bytes)
//! that reports a malformed answer instead of guessing.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{free_port, Opts, Server, TempDir, TIMEOUT};

/// A key of the right size (≥ 16 bytes), as an operator would generate it.
pub const KEY: &str = "k3y-0f-the-api-4-tests-0123456789";

/// How to start an instance with an API listener.
#[derive(Clone, Debug)]
pub struct ApiOpts {
    pub workers: usize,
    /// Whether `[api] key_file` is set (to a file holding `KEY` and a newline).
    pub key: bool,
    /// More lines of the `[api]` section (`max_connections = 2`...).
    pub api: String,
    /// TOML put before the `[api]` section (top-level keys, `[limits]`...).
    pub config: String,
    /// More command-line arguments (`--channel-connect`...).
    pub extra: Vec<String>,
    /// The WebSocket `--listen` (default: a port the kernel picks).
    pub listen: Option<String>,
}

impl Default for ApiOpts {
    fn default() -> Self {
        ApiOpts { workers: 2, key: false, api: String::new(), config: String::new(), extra: Vec::new(), listen: None }
    }
}

impl ApiOpts {
    pub fn api(lines: &str) -> ApiOpts {
        ApiOpts { api: lines.to_owned(), ..ApiOpts::default() }
    }
}

/// A running instance with its API listener.
pub struct Api {
    /// Declared first: dropped (killed) before the key's dir goes.
    pub server: Server,
    pub addr: SocketAddr,
    pub key: Option<String>,
    pub key_dir: TempDir,
    agent: ureq::Agent,
}

/// The config text of an `[api]` listener on `addr`, with `key_file` when given.
pub fn api_section(addr: SocketAddr, key_file: Option<&PathBuf>, more: &str) -> String {
    let mut s = format!("[api]\nlisten = \"{addr}\"\n");
    if let Some(k) = key_file {
        s += &format!("key_file = {:?}\n", k.to_str().unwrap());
    }
    s + more + "\n"
}

impl Api {
    pub fn start(opts: ApiOpts) -> Api {
        let key_dir = TempDir::new("apikey");
        let key_file = opts.key.then(|| {
            let path = key_dir.join("api.key");
            std::fs::write(&path, format!("{KEY}\n")).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            path
        });
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!("{}\n{}", opts.config, api_section(addr, key_file.as_ref(), &opts.api));
        let mut server_opts = Opts { config: Some(config), extra: opts.extra, ..Opts::workers(opts.workers) };
        if opts.listen.is_some() {
            server_opts.listen = opts.listen;
        }
        let server = Server::start_with(server_opts);
        let api = Api { server, addr, key: opts.key.then(|| KEY.to_owned()), key_dir, agent: agent() };
        api.wait_api_running();
        api
    }

    /// Waits until the api row runs and `/health` answers.
    pub fn wait_api_running(&self) {
        self.server.wait_status("the api process to run", |r| api_row(r).is_some_and(|a| a["state"] == "running"));
        crate::common::wait_for("/health to answer", TIMEOUT, || {
            let mut c = HttpConn::try_connect(self.addr)?;
            c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
            (c.read_response().ok()?.status == 200).then_some(())
        });
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A request through ureq with the instance's key (when it has one).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        self.call_with(method, path, body, self.key.as_deref())
    }

    /// A request through ureq with `key` as the bearer (or no Authorization).
    pub fn call_with(&self, method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> Resp {
        let mut req = self.agent.request(method, &self.url(path));
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        Resp::from_ureq(resp)
    }

    pub fn get(&self, path: &str) -> Resp {
        self.call("GET", path, None)
    }

    pub fn publish(&self, body: &Value) -> Resp {
        self.call("POST", "/api/publish", Some(&body.to_string()))
    }

    /// A raw connection to the API listener.
    pub fn raw(&self) -> HttpConn {
        HttpConn::connect(self.addr)
    }

    /// `Authorization: Bearer KEY\r\n` when the instance has a key, else nothing.
    pub fn auth_line(&self) -> String {
        self.key.as_ref().map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default()
    }

    /// The api process's status row.
    pub fn row(&self) -> Value {
        api_row(&self.server.status()).unwrap_or_else(|| panic!("no api row in status:\n{}", self.server.status()))
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(TIMEOUT).build()
}

/// The status row of role `api`.
pub fn api_row(report: &Value) -> Option<Value> {
    report["processes"].as_array()?.iter().find(|p| p["role"] == "api").cloned()
}

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    fn from_ureq(r: ureq::Response) -> Resp {
        let status = r.status();
        let headers = r.headers_names().iter().filter_map(|n| Some((n.clone(), r.header(n)?.to_owned()))).collect();
        let mut body = Vec::new();
        r.into_reader().read_to_end(&mut body).expect("read the body");
        Resp { status, headers, body }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {self}"))
    }

    /// Asserts an error answer: `status`, a JSON body `{"error":code,"detail":text}`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self}");
        let v = self.json();
        assert_eq!(v["error"], code, "{self}");
        assert!(v["detail"].is_string(), "an error has a detail text: {self}");
        assert!(
            self.header("content-type").is_some_and(|t| t.starts_with("application/json")),
            "errors are JSON: {self}"
        );
    }

    #[track_caller]
    pub fn assert_ok(&self) -> Value {
        assert_eq!(self.status, 200, "{self}");
        self.json()
    }
}

impl std::fmt::Display for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {}", self.status, self.headers, self.text())
    }
}

/// How a read of an answer ended without one.
#[derive(Debug, PartialEq, Eq)]
pub enum NoResp {
    /// The server closed the connection (EOF or reset) with nothing pending.
    Closed,
    /// Nothing (complete) arrived within the read timeout.
    Timeout,
    /// Bytes that are not an HTTP/1.1 answer (or a truncated one).
    Malformed(String),
}

/// A hand-driven HTTP connection: any bytes out, answers read strictly.
pub struct HttpConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// The server reset the connection (closed it with bytes of ours unread): what it had sent
    /// before may be cut.
    pub reset: bool,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> HttpConn {
        HttpConn::try_connect(addr).unwrap_or_else(|| panic!("connect to the API at {addr}"))
    }

    pub fn try_connect(addr: SocketAddr) -> Option<HttpConn> {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT).ok()?;
        stream.set_read_timeout(Some(TIMEOUT)).ok()?;
        stream.set_write_timeout(Some(TIMEOUT)).ok()?;
        Some(HttpConn { stream, buf: Vec::new(), reset: false })
    }

    /// Writes `bytes`; a write the server refused (it closed first) is not an error here.
    pub fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    pub fn read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t.max(Duration::from_millis(1)))).unwrap();
    }

    /// Ends the client's side (the server sees EOF).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Reads more; Ok(0) at EOF.
    fn fill(&mut self) -> Result<usize, NoResp> {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(NoResp::Timeout),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                self.reset = true;
                Ok(0)
            }
            Err(e) => panic!("read from the API: {e}"),
        }
    }

    /// The next answer, strictly parsed.
    pub fn read_response(&mut self) -> Result<Resp, NoResp> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.fill()? == 0 {
                return Err(if self.buf.is_empty() {
                    NoResp::Closed
                } else {
                    NoResp::Malformed(format!("EOF inside a head: {:?}", String::from_utf8_lossy(&self.buf)))
                });
            }
        };
        let (status, headers) = parse_response_head(&self.buf[..head_end]).map_err(NoResp::Malformed)?;
        let len = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| {
                v.trim().parse::<usize>().map_err(|e| NoResp::Malformed(format!("Content-Length {v:?}: {e}")))
            })
            .transpose()?
            .ok_or_else(|| NoResp::Malformed(format!("no Content-Length in {headers:?}")))?;
        while self.buf.len() < head_end + len {
            if self.fill()? == 0 {
                return Err(NoResp::Malformed(format!("EOF inside a body of {len} bytes")));
            }
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        Ok(Resp { status, headers, body })
    }

    /// Writes `bytes` and reads one answer, reporting instead of panicking.
    pub fn read_response_to(&mut self, bytes: &[u8]) -> Result<Resp, NoResp> {
        if !self.send(bytes) {
            return Err(NoResp::Closed);
        }
        self.read_response()
    }

    /// `read_response`, panicking unless an answer comes.
    #[track_caller]
    pub fn response(&mut self) -> Resp {
        self.read_response().unwrap_or_else(|e| panic!("no answer: {e:?}"))
    }

    /// One request written whole, its answer read.
    #[track_caller]
    pub fn request(&mut self, bytes: &[u8]) -> Resp {
        assert!(self.send(bytes), "the server closed before the request was written");
        self.response()
    }

    /// Waits (up to `TIMEOUT`) for the server to end the connection; what arrived before.
    #[track_caller]
    pub fn expect_closed(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.fill() {
                Ok(0) => return std::mem::take(&mut self.buf),
                Ok(_) => {}
                Err(NoResp::Timeout) if Instant::now() < deadline => {}
                Err(e) => {
                    panic!("the server kept the connection open: {e:?}; got {:?}", String::from_utf8_lossy(&self.buf))
                }
            }
        }
    }

    /// Whether the connection is still open with nothing to read (a non-blocking peek).
    pub fn still_open(&mut self) -> bool {
        self.stream.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let open = matches!(self.stream.peek(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
        self.stream.set_nonblocking(false).unwrap();
        open
    }
}

/// Parses "HTTP/1.1 NNN Reason\r\n" and headers; an error says what is wrong.
pub fn parse_response_head(head: &[u8]) -> Result<(u16, Vec<(String, String)>), String> {
    let text = std::str::from_utf8(head).map_err(|e| format!("head is not UTF-8: {e}"))?;
    let mut lines = text.strip_suffix("\r\n\r\n").ok_or("head does not end with CRLF CRLF")?.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code, reason) = (parts.next(), parts.next(), parts.next());
    if version != Some("HTTP/1.1") {
        return Err(format!("status line {status_line:?}: not HTTP/1.1"));
    }
    let status = code
        .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("status line {status_line:?}: bad code"))?;
    if reason.is_none_or(|r| r.is_empty()) {
        return Err(format!("status line {status_line:?}: no reason"));
    }
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(|| format!("header line {line:?} has no colon"))?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) {
            return Err(format!("header name {name:?}"));
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok((status, headers))
}

/// A complete request: `method path`, optional headers (lines with CRLF), body with its
/// Content-Length and Content-Type application/json.
pub fn request(method: &str, path: &str, extra_headers: &str, body: Option<&str>) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: api.test\r\n{extra_headers}");
    match body {
        Some(b) => r += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()),
        None => r += "\r\n",
    }
    r.into_bytes()
}
