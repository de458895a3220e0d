//! Helpers of the access-control tests (tokens.rs, group_rules.rs): a server with an HS256
//! secret (or an RSA / EC key made with the `openssl` CLI), tokens minted here with the
//! `jsonwebtoken` crate, a WebSocket client that connects with a token in the URL or in an
//! `Authorization` header, and the raw HTTP answer of a refused upgrade.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

use crate::common::{http_exchange, skip_or_fail, Opts, Server, TempDir, TIMEOUT};

/// The HS256 secret of the test servers (test-only, obviously).
pub const SECRET: &[u8] = b"test-only-secret-0123456789abcdef";

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An HS256 token signed with `SECRET`.
pub fn mint(claims: &Value) -> String {
    mint_with(Algorithm::HS256, &EncodingKey::from_secret(SECRET), claims)
}

pub fn mint_with(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(alg), claims, key).expect("mint a token")
}

/// A server whose config is `[auth] jwt_secret_file = <SECRET's file>` plus `extra` (more
/// `[auth]` keys first, then any tables). The returned dir holds the secret file.
pub fn server_with_secret(auth_keys: &str, tables: &str, workers: usize) -> (Server, TempDir) {
    let dir = TempDir::new("jwt");
    let secret = dir.join("jwt.secret");
    let mut text = SECRET.to_vec();
    text.push(b'\n');
    std::fs::write(&secret, text).unwrap();
    let config = format!("[auth]\njwt_secret_file = {:?}\n{auth_keys}\n{tables}", secret.display().to_string());
    (Server::start_with(Opts { config: Some(config), ..Opts::workers(workers) }), dir)
}

/// A key pair made by `openssl` in `dir`: (private PEM path, public PEM path). `None` (after
/// `skip_or_fail`) when openssl is missing.
pub fn openssl_keypair(dir: &TempDir, kind: &str) -> Option<(PathBuf, PathBuf)> {
    let private = dir.join(&format!("{kind}.key"));
    let public = dir.join(&format!("{kind}.pub.pem"));
    let gen: &[&str] = match kind {
        "rsa" => &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        "ec" => &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "ec384" => &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
        other => panic!("unknown key kind {other}"),
    };
    let made = Command::new("openssl").args(gen).arg("-out").arg(&private).output();
    if !made.as_ref().is_ok_and(|o| o.status.success()) {
        skip_or_fail(&format!("openssl cannot make a {kind} key: {made:?}"));
        return None;
    }
    let out = Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(&private).arg("-out").arg(&public).output();
    assert!(out.as_ref().is_ok_and(|o| o.status.success()), "openssl pkey -pubout: {out:?}");
    Some((private, public))
}

/// A WebSocket client that may carry a token.
pub struct WsClient {
    ws: WebSocket<TcpStream>,
    pub port: u16,
}

/// The answer to a refused upgrade: status code and body.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub body: String,
    pub www_authenticate: Option<String>,
}

impl WsClient {
    /// Connects to `path` (e.g. `/?token=...`), with `Authorization: Bearer <bearer>` if given.
    pub fn connect(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Result<WsClient, Refusal> {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        let port = stream.local_addr().unwrap().port();
        let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
        if let Some(token) = bearer {
            request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        let mut attempt = tungstenite::client::client(request, stream);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match attempt {
                Ok((ws, _)) => return Ok(WsClient { ws, port }),
                Err(tungstenite::HandshakeError::Interrupted(mid)) if Instant::now() < deadline => {
                    attempt = mid.handshake();
                }
                Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                    return Err(Refusal {
                        status: response.status().as_u16(),
                        body: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
                        www_authenticate: response
                            .headers()
                            .get("WWW-Authenticate")
                            .map(|v| v.to_str().unwrap_or_default().to_owned()),
                    })
                }
                Err(e) => panic!("handshake failed: {e}"),
            }
        }
    }

    /// Connects with `token` in the URL; panics if refused.
    pub fn with_token(addr: SocketAddr, token: &str) -> WsClient {
        WsClient::connect(addr, &format!("/?token={token}"), None).unwrap_or_else(|r| panic!("refused: {r:?}"))
    }

    pub fn anonymous(addr: SocketAddr) -> WsClient {
        WsClient::connect(addr, "/", None).unwrap_or_else(|r| panic!("refused: {r:?}"))
    }

    pub fn send(&mut self, v: &Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    /// The next text frame as JSON (or as a JSON string if it is not JSON); pings skipped.
    pub fn recv(&mut self) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            assert!(Instant::now() < deadline, "no frame within {TIMEOUT:?}");
            match self.ws.read().expect("read") {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).unwrap_or_else(|_| Value::String(t.as_str().to_owned()))
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Sends `cmd` with `"id": id` and returns the reply carrying that id (group messages
    /// arriving before it are returned too, in order).
    pub fn request(&mut self, mut cmd: Value, id: u64) -> (Value, Vec<Value>) {
        cmd["id"] = Value::from(id);
        self.send(&cmd);
        let mut before = Vec::new();
        loop {
            let v = self.recv();
            if v.get("id") == Some(&Value::from(id)) {
                return (v, before);
            }
            before.push(v);
        }
    }

    /// Reads until the server's close frame; its code. Waits up to `within`.
    pub fn expect_close_within(&mut self, within: Duration) -> u16 {
        self.ws.get_mut().set_read_timeout(Some(within)).unwrap();
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(frame))) => return u16::from(frame.code),
                Ok(Message::Close(None)) => return 1005,
                Ok(_) => continue,
                Err(e) => panic!("no close frame: {e}"),
            }
        }
    }
}

/// The raw HTTP answer to an upgrade request for `path` with `headers` (each `Name: value\r\n`):
/// for the refusals, whose connection the server closes after answering.
pub fn refused_upgrade(addr: SocketAddr, path: &[u8], headers: &[u8]) -> String {
    let mut request = b"GET ".to_vec();
    request.extend_from_slice(path);
    request.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n");
    request.extend_from_slice(headers);
    request.extend_from_slice(
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    );
    http_exchange(addr, &request)
}
