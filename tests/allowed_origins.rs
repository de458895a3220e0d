//! `[auth] allowed_origins` (issue 11, point 4): a handshake whose Origin is not on the list
//! gets 403 and a counter, one from a listed page or from a client that sends no Origin (not a
//! browser) upgrades, and without `[auth]` any Origin upgrades as in the seed. A malformed
//! entry is refused at load with the key named.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::json;

/// Sends an upgrade request with `origin` (a header line, or none) and returns the status line.
fn upgrade_status(addr: SocketAddr, origin: Option<&str>) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\n{origin}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).trim_end().to_owned()
}

fn origin_server(auth: &str) -> Server {
    Server::start_with(Opts { config: Some(auth.to_owned()), ..Opts::workers(2) })
}

#[test]
fn an_origin_outside_the_list_gets_403_and_is_counted() {
    let server = origin_server("[auth]\nallowed_origins = [\"https://app.example.com\", \"http://127.0.0.1:8080\"]\n");
    assert_eq!(upgrade_status(server.addr, Some("https://evil.example.com")), "HTTP/1.1 403 Forbidden");
    assert_eq!(upgrade_status(server.addr, Some("null")), "HTTP/1.1 403 Forbidden", "a sandboxed page");
    assert_eq!(upgrade_status(server.addr, Some("https://app.example.com")), "HTTP/1.1 101 Switching Protocols");
    assert_eq!(upgrade_status(server.addr, Some("HTTPS://APP.EXAMPLE.COM")), "HTTP/1.1 101 Switching Protocols");
    assert_eq!(upgrade_status(server.addr, Some("http://127.0.0.1:8080")), "HTTP/1.1 101 Switching Protocols");
    assert_eq!(upgrade_status(server.addr, None), "HTTP/1.1 101 Switching Protocols", "no Origin: not a browser");

    // A client without Origin (a backend) still works end to end.
    let mut a = Client::connect(server.addr);
    a.add_group(&json!("g"));
    a.sync();
    a.send_to_group(&json!("g"), "hi");
    assert_eq!(a.recv(), "hi");

    let report = server.wait_status("two refusals counted", |r| r["totals"]["forbidden_origins"].as_u64() == Some(2));
    assert_eq!(report["auth"]["allowed_origins"], json!(["https://app.example.com", "http://127.0.0.1:8080"]));
}

#[test]
fn without_auth_any_origin_upgrades_as_in_the_seed() {
    let server = Server::start_with(Opts::workers(1));
    assert_eq!(upgrade_status(server.addr, Some("https://evil.example.com")), "HTTP/1.1 101 Switching Protocols");
    assert_eq!(server.status()["auth"]["allowed_origins"], json!([]));
}

#[test]
fn a_malformed_origin_is_refused_at_load() {
    for bad in ["app.example.com", "https://app.example.com/", "https://app.example.com/path", "*", "ftp://x.org"] {
        refused(&format!("[auth]\nallowed_origins = [{bad:?}]\n"), "auth.allowed_origins");
    }
}
