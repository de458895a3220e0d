//! What the worker checks before it answers or forwards (issue 10, defects 12 and 14): close
//! codes a peer may not send are answered with 1002 instead of being echoed, a close reason
//! that is not UTF-8 with 1007, a Sec-WebSocket-Key that is not base64 of 16 bytes with 400,
//! a message from the bus that is not UTF-8 is dropped instead of going out as a text frame,
//! and the 503 answer declares the length of the body it sends.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use groupcast::channel::wire;
use serde_json::json;

fn close_body(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(reason);
    body
}

#[test]
fn close_codes_that_may_not_go_on_the_wire_are_answered_with_1002() {
    let server = Server::start_with(Opts::workers(1));
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        let mut raw = RawWs::connect(server.addr);
        raw.write_frame(0x88, &close_body(code, b""), true);
        assert_eq!(raw.expect_close(), 1002, "close code {code}");
        raw.expect_eof();
    }
    for code in [1000u16, 1001, 1003, 1011, 3000, 4999] {
        let mut raw = RawWs::connect(server.addr);
        raw.write_frame(0x88, &close_body(code, b"bye"), true);
        assert_eq!(raw.expect_close(), code, "a valid close code is echoed");
        raw.expect_eof();
    }
    let report = server.status();
    assert_eq!(field(&worker_rows(&report)[0], "protocol_errors"), 10, "{report}");
}

#[test]
fn a_close_reason_that_is_not_utf8_is_answered_with_1007() {
    let server = Server::start_with(Opts::workers(1));
    let mut raw = RawWs::connect(server.addr);
    raw.write_frame(0x88, &close_body(1000, b"caf\xc3"), true);
    assert_eq!(raw.expect_close(), 1007);
    raw.expect_eof();
}

#[test]
fn a_sec_websocket_key_that_is_not_base64_of_16_bytes_gets_400() {
    let server = Server::start_with(Opts::workers(1));
    let request = |key: &str| {
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    // The answer's head: a 400 is followed by the end of the stream, a 101 is not.
    let head_of = |key: &str| {
        let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(request(key).as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
            got.push(byte[0]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    for key in ["abc", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZXh4eA==", "!!!!!!!!!!!!!!!!!!!!!A=="] {
        let answer = head_of(key);
        assert!(answer.starts_with("HTTP/1.1 400 "), "key {key:?}: {answer}");
    }
    let answer = head_of("AAAAAAAAAAAAAAAAAAAAAA==");
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
}

#[test]
fn a_message_from_the_bus_that_is_not_utf8_is_dropped() {
    let server = Server::start_with(Opts::workers(1));
    let mut member = Client::connect(server.addr);
    member.add_group(&json!("g"));
    server.wait_subscriptions(1);
    // Another publisher on the channel, sending bytes no client could have sent as text.
    let mut peer = UnixStream::connect(server.dir.join("g.channel.sock")).expect("connect to the channel socket");
    let origin = 0x5eed_0000_0000_0001;
    let mut out = Vec::new();
    wire::encode_hello(&mut out, wire::VERSION, origin, "test-publisher");
    wire::encode_message(&mut out, origin, 1, "g", b"\xff\xfe not text");
    wire::encode_message(&mut out, origin, 2, "g", b"after");
    peer.write_all(&out).unwrap();
    assert_eq!(member.recv(), "after", "the bytes that are not UTF-8 must not reach the client");
    let report = server.status();
    assert_eq!(field(&worker_rows(&report)[0], "bus_invalid_utf8"), 1, "{report}");
}

#[test]
fn the_503_answer_declares_the_length_of_its_body() {
    let server = Server::start_with(Opts {
        config: Some("[limits]\nmax_connections_per_worker = 1\n".into()),
        ..Opts::workers(1)
    });
    let _held = Client::connect(server.addr);
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    // The worker writes the answer and closes without reading the request.
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8(answer).unwrap();
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
    let declared: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("a Content-Length");
    assert_eq!(declared, body.len(), "{text:?}");
}
