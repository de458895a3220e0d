//! Each kind of bad input gets its documented answer (an error frame on a connection that stays
//! open, a close code, or an HTTP status), and never harms anyone else: after every case,
//! well-behaved clients on both workers (so on the offender's worker and on the other one)
//! still receive their group messages.

mod common;

use common::*;
use serde_json::{json, Value};

const CONFIG: &str = "[limits]\nmax_message_size = 1024\nmax_groups_per_connection = 3\nmax_group_id_len = 16\n";

/// Observers: clients 0 and 1 are on workers 0 and 1, clients 2 and 3 too; all in "watch".
fn watch(server: &Server) -> Watchers {
    let watch = Watchers::per_worker(server, "watch", 2);
    watch.settle(server, 0);
    watch
}

fn error_of(text: &str) -> Value {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(v["error"].is_string(), "not an error frame: {text}");
    assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "error frame without detail: {text}");
    v
}

#[test]
fn bad_commands_get_error_frames_and_the_connection_stays() {
    let server = Server::start_with(Opts { config: Some(CONFIG.into()), ..Opts::workers(2) });
    let mut watch = watch(&server);
    let pids_before: Vec<u64> = worker_rows(&server.status()).iter().map(|w| field(w, "pid")).collect();
    let long_id = "x".repeat(17);
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "invalid_json"),
        ("{\"cmd\":\"add_group\",".into(), "invalid_json"),
        ("".into(), "invalid_json"),
        ("{'cmd':'add_group'}".into(), "invalid_json"),
        ("[1,2]".into(), "not_an_object"),
        ("\"add_group\"".into(), "not_an_object"),
        ("42".into(), "not_an_object"),
        ("null".into(), "not_an_object"),
        (r#"{"cmd":"fly","group_id":"1"}"#.into(), "unknown_cmd"),
        (r#"{"cmd":"ADD_GROUP","group_id":"1"}"#.into(), "unknown_cmd"),
        (r#"{"group_id":"1"}"#.into(), "missing_field"),
        ("{}".into(), "missing_field"),
        (r#"{"cmd":"add_group"}"#.into(), "missing_field"),
        (r#"{"cmd":"leave_group"}"#.into(), "missing_field"),
        (r#"{"cmd":"send_to_group","group_id":"1"}"#.into(), "missing_field"),
        (r#"{"cmd":"send_to_group","message":"m"}"#.into(), "missing_field"),
        (r#"{"cmd":7,"group_id":"1"}"#.into(), "invalid_field"),
        (r#"{"cmd":["add_group"],"group_id":"1"}"#.into(), "invalid_field"),
        (r#"{"cmd":"add_group","group_id":1.5}"#.into(), "invalid_field"),
        (r#"{"cmd":"add_group","group_id":true}"#.into(), "invalid_field"),
        (r#"{"cmd":"add_group","group_id":[]}"#.into(), "invalid_field"),
        (r#"{"cmd":"add_group","group_id":{}}"#.into(), "invalid_field"),
        (r#"{"cmd":"add_group","group_id":""}"#.into(), "invalid_field"),
        (r#"{"cmd":"send_to_group","group_id":"","message":"m"}"#.into(), "invalid_field"),
        (json!({"cmd":"add_group","group_id":long_id}).to_string(), "invalid_field"),
    ];
    let mut bad_requests = 0u64;
    // Clients 2 and 3 (one per worker) misbehave and must stay members of "watch".
    for (text, code) in &cases {
        for c in [2, 3] {
            let client = &mut watch.clients[c];
            client.send(text);
            let reply = error_of(&client.recv());
            assert_eq!(reply["error"], *code, "for {text:?}: {reply}");
            assert!(reply.get("id").is_none(), "no id asked, none echoed: {reply}");
            bad_requests += 1;
            // With an id, when the frame is an object: the same error, carrying the id.
            if let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(text) {
                obj.insert("id".into(), json!({"n": c}));
                client.send_json(&Value::Object(obj));
                let reply = error_of(&client.recv());
                assert_eq!(reply["error"], *code, "for {text:?} with id: {reply}");
                assert_eq!(reply["id"], json!({"n": c}));
                bad_requests += 1;
            }
            client.sync_quiet();
        }
        watch.check(text);
    }
    // None of the refused commands joined or created anything.
    let report = server.wait_subscriptions(4);
    assert_eq!(field(&report["totals"], "bad_requests"), bad_requests);
    for w in worker_rows(&report) {
        assert_eq!(field(&w, "groups"), 1, "only watch: {w}");
        assert_eq!(field(&w, "protocol_errors"), 0);
    }

    // too_many_groups: "watch" plus two more is the limit of 3.
    for c in [2, 3] {
        let client = &mut watch.clients[c];
        client.add_group(&json!("t1"));
        client.add_group(&json!("t2"));
        client.add_group(&json!("t1")); // already a member: not a new group
        client.sync_quiet();
        client.add_group(&json!("t3"));
        let reply = error_of(&client.recv());
        assert_eq!(reply["error"], "too_many_groups", "{reply}");
        client.send_json(&json!({"cmd":"add_group","group_id":"t4","id":"x"}));
        let reply = error_of(&client.recv());
        assert_eq!((&reply["error"], &reply["id"]), (&json!("too_many_groups"), &json!("x")));
        bad_requests += 2;
    }
    server.wait_subscriptions(4 + 4);
    // Not members of t3: a message to t3, then one to watch from the same sender; the first
    // frame the refused clients see is the watch message.
    for s in [0, 1] {
        watch.clients[s].send_to_group(&json!("t3"), "not for you");
        watch.clients[s].send_to_group(&json!("watch"), "fence");
    }
    for c in 0..4 {
        for _ in 0..2 {
            assert_eq!(watch.clients[c].recv(), "fence", "client {c}");
        }
    }
    // Leaving one makes room again.
    for c in [2, 3] {
        watch.clients[c].leave_group(&json!("t1"));
        watch.clients[c].add_group(&json!("t3"));
        watch.clients[c].sync_quiet();
    }
    watch.check("too_many_groups");
    let report = server.status();
    assert_eq!(field(&report["totals"], "bad_requests"), bad_requests);
    let pids_after: Vec<u64> = worker_rows(&report).iter().map(|w| field(w, "pid")).collect();
    assert_eq!(pids_before, pids_after, "no worker died");
    assert_eq!(field(&report["totals"], "restarts"), 0);
}

#[test]
fn protocol_violations_close_with_the_documented_code() {
    let server = Server::start_with(Opts { config: Some(CONFIG.into()), ..Opts::workers(2) });
    let mut watch = watch(&server);
    let pids_before: Vec<u64> = worker_rows(&server.status()).iter().map(|w| field(w, "pid")).collect();
    // (name, frames as (first byte, payload, masked), expected close code)
    type Frames = Vec<(u8, Vec<u8>, bool)>;
    let cases: Vec<(&str, Frames, u16)> = vec![
        ("binary frame", vec![(0x82, vec![0, 1, 2], true)], 1003),
        ("binary fragments", vec![(0x02, b"ab".to_vec(), true), (0x80, b"cd".to_vec(), true)], 1003),
        ("invalid UTF-8", vec![(0x81, b"{\"cmd\":\"\xff\xfe\"}".to_vec(), true)], 1007),
        ("truncated UTF-8", vec![(0x81, b"caf\xc3".to_vec(), true)], 1007),
        ("invalid UTF-8 over fragments", vec![(0x01, b"ab\xc3".to_vec(), true), (0x80, b"(".to_vec(), true)], 1007),
        ("message over max_message_size", vec![(0x81, vec![b' '; 1025], true)], 1009),
        ("fragments over max_message_size", vec![(0x01, vec![b' '; 600], true), (0x80, vec![b' '; 600], true)], 1009),
        ("unmasked frame", vec![(0x81, b"{}".to_vec(), false)], 1002),
        ("RSV1 set", vec![(0xC1, b"{}".to_vec(), true)], 1002),
        ("RSV2 set", vec![(0xA1, b"{}".to_vec(), true)], 1002),
        ("RSV3 set", vec![(0x91, b"{}".to_vec(), true)], 1002),
        ("fragmented ping", vec![(0x09, b"p".to_vec(), true)], 1002),
        ("ping over 125 bytes", vec![(0x89, vec![b'p'; 126], true)], 1002),
        ("close over 125 bytes", vec![(0x88, vec![3; 126], true)], 1002),
        ("continuation without a start", vec![(0x80, b"x".to_vec(), true)], 1002),
        ("reserved data opcode", vec![(0x83, b"x".to_vec(), true)], 1002),
        ("reserved control opcode", vec![(0x8B, b"x".to_vec(), true)], 1002),
        ("text inside a fragmented message", vec![(0x01, b"{".to_vec(), true), (0x81, b"{}".to_vec(), true)], 1002),
    ];
    let mut on_worker = [0usize; 2];
    for (name, frames, code) in &cases {
        let mut raw = RawWs::connect(server.addr);
        let port = raw.stream.local_addr().unwrap().port();
        on_worker[server.workers_of_ports(&[port])[0]] += 1;
        for (first, payload, masked) in frames {
            raw.write_frame(*first, payload, *masked);
        }
        assert_eq!(raw.expect_close(), *code, "{name}");
        raw.expect_eof();
        watch.check(name);
    }
    let report = server.status();
    // Oversized frames and messages have their own counter; every other case is a protocol error.
    let closed = |w: &serde_json::Value| field(w, "protocol_errors") + field(w, "oversized");
    let oversized: u64 = worker_rows(&report).iter().map(|w| field(w, "oversized")).sum();
    assert_eq!(oversized, cases.iter().filter(|c| c.2 == 1009).count() as u64);
    assert_eq!(worker_rows(&report).iter().map(closed).sum::<u64>(), cases.len() as u64);
    for (w, row) in worker_rows(&report).iter().enumerate() {
        assert_eq!(closed(row), on_worker[w] as u64, "worker {w}");
    }
    // All those connections are gone; the observers remain.
    server.wait_status("bad connections to be dropped", |r| field(&r["totals"], "connections") == 4);
    let pids_after: Vec<u64> = worker_rows(&server.status()).iter().map(|w| field(w, "pid")).collect();
    assert_eq!(pids_before, pids_after, "no worker died");
}

#[test]
fn well_formed_raw_frames_are_accepted() {
    // The counterpart of the violations: fragments (with a ping in between), UTF-8 split
    // across fragments, and a message exactly at the size limit all work.
    let server = Server::start_with(Opts { config: Some(CONFIG.into()), ..Opts::workers(1) });
    let mut raw = RawWs::connect(server.addr);
    raw.write_frame(0x01, br#"{"cmd":"add_group","#, true);
    raw.write_frame(0x89, b"are you there", true);
    assert_eq!(raw.read_frame(), Some((0x8A, b"are you there".to_vec())), "pong");
    raw.write_frame(0x00, br#""group_id":"caf"#, true);
    raw.write_frame(0x00, b"\xc3", true);
    raw.write_frame(0x80, b"\xa9\",\"id\":1}", true);
    let reply = raw.read_frame().unwrap();
    assert_eq!(reply, (0x81, br#"{"id":1,"ok":true}"#.to_vec()));
    let head = r#"{"cmd":"send_to_group","group_id":"café","message":""#;
    let text = format!("{head}{}\"}}", "m".repeat(1024 - head.len() - 2));
    assert_eq!(text.len(), 1024);
    raw.write_frame(0x81, text.as_bytes(), true);
    let (first, payload) = raw.read_frame().unwrap();
    assert_eq!(first, 0x81);
    assert_eq!(payload, "m".repeat(1024 - head.len() - 2).as_bytes());
    // A close from the client is echoed with its code.
    raw.write_frame(0x88, &1000u16.to_be_bytes(), true);
    assert_eq!(raw.expect_close(), 1000);
    raw.expect_eof();
}

#[test]
fn plain_http_gets_http_answers() {
    let server = Server::start_with(Opts::workers(2));
    let mut watch = watch(&server);

    let answer = http_exchange(server.addr, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{answer}");
    watch.check("plain GET");

    let answer = http_exchange(server.addr, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    assert_eq!(body.trim(), "ok");
    watch.check("health check");

    let answer = http_exchange(server.addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    watch.check("garbage");

    let answer = http_exchange(server.addr, b"NOT AN HTTP REQUEST AT ALL\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    watch.check("garbage line");

    // A request cut short by the client's close: nothing to answer, nothing harmed.
    drop(std::net::TcpStream::connect(server.addr).and_then(|mut s| {
        use std::io::Write;
        s.write_all(b"GET / HTTP/1.1\r\nHo")
    }));
    watch.check("half a request");
    server.wait_status("HTTP connections to be closed", |r| field(&r["totals"], "connections") == 4);
}
