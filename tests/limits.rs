//! Every configured bound of `[limits]` is enforced with its documented answer (503, close 1009,
//! an error frame, a ping, close 1001), counted in `status`, and shown by `status`; and after
//! each offender was dealt with, a well-behaved client on the offender's worker still receives
//! its group messages (issue 6). Plain bad input is in bad_input.rs; slow readers, slowloris
//! and the channel have files of their own.

mod common;
mod robustness;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use robustness::*;
use serde_json::{json, Value};

/// Connects and reads what the server says without sending a request (a refused connection
/// is answered at accept): the whole answer, until the server closes.
fn refused_answer(server: &Server) -> String {
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).expect("read the refusal");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn connections_over_max_connections_per_worker_get_503() {
    let server = start(1, "[limits]\nmax_connections_per_worker = 3\n");
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(server.addr)).collect();
    for c in &mut clients {
        c.add_group(&json!("g"));
        c.sync_quiet();
    }
    for n in 1..=2u64 {
        let answer = refused_answer(&server);
        assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer}");
        assert!(answer.contains("\r\nRetry-After: 5\r\n"), "{answer}");
        assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
        assert_eq!(field(&server.status()["totals"], "rejected_connections"), n);
    }
    // The three accepted clients are unharmed.
    let member_of = vec![["g".to_string()].into(); 3];
    let flows = [Flow { sender: 0, group: "g".into(), group_id: json!("g") }];
    exchange(&mut clients, &member_of, &flows, 3, "full");

    // One leaves: there is room for exactly one more.
    let mut gone = clients.remove(0);
    gone.close();
    server.wait_status("the closed client to be forgotten", |r| field(&r["totals"], "connections") == 2);
    let mut newcomer = Client::connect(server.addr);
    newcomer.add_group(&json!("g"));
    newcomer.sync_quiet();
    clients.push(newcomer);
    let answer = refused_answer(&server);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    let report = server.status();
    assert_eq!(field(&report["totals"], "rejected_connections"), 3);
    assert_eq!(field(&report["totals"], "connections"), 3);
    let flows = [Flow { sender: 2, group: "g".into(), group_id: json!("g") }];
    exchange(&mut clients, &member_of, &flows, 3, "again");
}

#[test]
fn max_connections_is_an_equal_share_per_worker() {
    // 4 for the instance over 2 workers: ceil(4 / 2) = 2 each.
    let server = start(2, "[limits]\nmax_connections = 4\n");
    let mut held: Vec<Client> = Vec::new();
    let mut on = [0usize; 2];
    let mut refused = 0u64;
    for attempt in 0..200 {
        if on == [2, 2] {
            break;
        }
        match Client::try_connect(server.addr, TIMEOUT) {
            Ok(c) => {
                let w = server.workers_of(&[&c])[0];
                on[w] += 1;
                assert!(on[w] <= 2, "worker {w} accepted a third connection (attempt {attempt})");
                held.push(c);
            }
            Err(_) => {
                refused += 1;
                // Only a full worker may refuse.
                let rows = worker_rows(&server.status());
                for (w, row) in rows.iter().enumerate() {
                    if field(row, "rejected_connections") > 0 {
                        assert_eq!(on[w], 2, "worker {w} refused while holding {} connections", on[w]);
                    }
                }
            }
        }
    }
    assert_eq!(on, [2, 2], "both workers should fill up to their share");
    // Full: every further connection is refused, whichever worker the kernel picks.
    for _ in 0..4 {
        let answer = refused_answer(&server);
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        refused += 1;
    }
    let report = server.status();
    assert_eq!(field(&report["totals"], "rejected_connections"), refused);
    for row in worker_rows(&report) {
        assert_eq!(field(&row, "connections"), 2, "{row}");
    }
    // The held connections work, across workers.
    let member_of = vec![["g".to_string()].into(); 4];
    for c in &mut held {
        c.add_group(&json!("g"));
        c.sync_quiet();
    }
    server.wait_subscriptions(4);
    let flows: Vec<Flow> = (0..4).map(|s| Flow { sender: s, group: "g".into(), group_id: json!("g") }).collect();
    exchange(&mut held, &member_of, &flows, 2, "shared");
}

#[test]
fn frames_over_max_frame_size_and_messages_over_max_message_size_close_with_1009() {
    let server = start(2, "[limits]\nmax_frame_size = 1024\nmax_message_size = 4096\n");
    let mut watchers = Watchers::new(&server, "watch");
    watchers.settle(&server, 0);
    let mut oversized_on = [0u64; 2];

    // One frame over the frame limit (the message limit would allow it).
    let mut raw = RawWs::connect(server.addr);
    let w = server.workers_of_ports(&[raw.port()])[0];
    raw.write_frame(0x81, &[b' '; 1025], true);
    assert_eq!(raw.expect_close(), 1009, "frame over max_frame_size");
    raw.expect_eof();
    oversized_on[w] += 1;
    watchers.check("a frame over max_frame_size");

    // A message in frames under the frame limit: accepted while the whole is within the
    // message limit (3 x 1000 bytes)...
    let mut raw = RawWs::connect(server.addr);
    let cmd = format!(r#"{{"cmd":"leave_group","group_id":"g","id":1,"pad":"{}"}}"#, "p".repeat(2900));
    let bytes = cmd.as_bytes();
    assert!(bytes.len() > 2048 && bytes.len() <= 3000);
    let parts: Vec<&[u8]> = bytes.chunks(1000).collect();
    for (i, part) in parts.iter().enumerate() {
        let first = match (i, i + 1 == parts.len()) {
            (0, _) => 0x01,
            (_, true) => 0x80,
            _ => 0x00,
        };
        raw.write_frame(first, part, true);
    }
    assert_eq!(raw.read_frame(), Some((0x81, br#"{"id":1,"ok":true}"#.to_vec())));
    // ... and closed with 1009 once the fragments pass it (5 x 1000 bytes > 4096).
    let w = server.workers_of_ports(&[raw.port()])[0];
    raw.write_frame(0x01, &[b' '; 1000], true);
    for _ in 0..3 {
        raw.write_frame(0x00, &[b' '; 1000], true);
    }
    raw.write_frame(0x80, &[b' '; 1000], true);
    assert_eq!(raw.expect_close(), 1009, "fragments over max_message_size");
    raw.expect_eof();
    oversized_on[w] += 1;
    watchers.check("fragments over max_message_size");

    let report = server.status();
    for (w, row) in worker_rows(&report).iter().enumerate() {
        assert_eq!(field(row, "oversized"), oversized_on[w], "worker {w}: {row}");
        assert_eq!(field(row, "protocol_errors"), 0, "worker {w}: {row}");
        assert_eq!(field(row, "restarts"), 0);
    }
}

#[test]
fn group_count_and_group_id_length_limits_answer_error_frames() {
    let server = start(2, "[limits]\nmax_groups_per_connection = 2\nmax_group_id_len = 10\n");
    let mut watchers = Watchers::new(&server, "watch");
    let mut c = Client::connect(server.addr);
    let w = server.workers_of(&[&c])[0];
    c.add_group(&json!("watch"));
    c.add_group(&json!("b"));
    c.sync_quiet();
    let reply = c.call(json!({"cmd":"add_group","group_id":"c"}));
    assert_eq!(reply["error"], "too_many_groups", "{reply}");
    assert!(reply["detail"].as_str().is_some_and(|d| !d.is_empty()), "{reply}");
    watchers.settle(&server, 2);
    assert_eq!(field(&worker_rows(&server.status())[w], "too_many_groups"), 1);
    // Not a member of "c": a message to "c" then one to "watch"; the first frame it sees is
    // the second.
    watchers.clients[0].send_to_group(&json!("c"), "not for you");
    watchers.clients[0].send_to_group(&json!("watch"), "fence");
    assert_eq!(c.recv(), "fence");
    for wc in &mut watchers.clients {
        assert_eq!(wc.recv(), "fence");
    }

    // Group ids: 11 bytes are refused as invalid_field, 10 are fine (after making room).
    let reply = c.call(json!({"cmd":"leave_group","group_id":"12345678901"}));
    assert_eq!(reply["error"], "invalid_field", "{reply}");
    c.leave_group(&json!("b"));
    let reply = c.call(json!({"cmd":"add_group","group_id":"1234567890"}));
    assert_eq!(reply["ok"], true, "{reply}");
    let reply = c.call(json!({"cmd":"add_group","group_id":"12345678901"}));
    assert_eq!(reply["error"], "invalid_field", "{reply}");
    watchers.settle(&server, 2);
    watchers.check("group limits");
    let report = server.status();
    assert_eq!(worker_sum(&report, "too_many_groups"), 1);
    assert_eq!(field(&worker_rows(&report)[w], "bad_requests"), 3);
}

#[test]
fn commands_over_the_rate_are_refused_not_executed_then_allowed_again() {
    let server = start(2, "[limits]\ncommands_per_second = 5\ncommands_burst = 5\n");
    let mut watchers = Watchers::new(&server, "watch");
    let mut raw = RawWs::connect(server.addr);
    let w = server.workers_of_ports(&[raw.port()])[0];
    // Nine commands in one write, so they arrive together: the burst of 5 passes, the rest
    // is refused (the ninth has no id).
    let mut burst = Vec::new();
    for i in 0..9 {
        let mut cmd = json!({"cmd":"add_group","group_id":format!("r{i}")});
        if i < 8 {
            cmd["id"] = json!(i);
        }
        burst.extend(encode_frame(0x81, cmd.to_string().as_bytes(), true));
    }
    std::io::Write::write_all(&mut raw.stream, &burst).unwrap();
    for i in 0..9 {
        let reply: Value = serde_json::from_str(&raw.next_text()).unwrap();
        if i < 5 {
            assert_eq!(reply, json!({"id": i, "ok": true}), "command {i}");
        } else {
            assert_eq!(reply["error"], "rate_limited", "command {i}: {reply}");
            assert!(reply["detail"].as_str().is_some_and(|d| !d.is_empty()), "{reply}");
            if i < 8 {
                assert_eq!(reply["id"], json!(i), "the id is echoed: {reply}");
            } else {
                assert!(reply.get("id").is_none(), "{reply}");
            }
        }
    }
    // Refused joins did not happen: r0..r4 only (plus the watchers' "watch").
    watchers.settle(&server, 5);
    assert_eq!(field(&worker_rows(&server.status())[w], "rate_limited"), 4);
    watchers.clients[0].send_to_group(&json!("r6"), "refused join");
    watchers.clients[0].send_to_group(&json!("r0"), "accepted join");
    assert_eq!(raw.next_text(), "accepted join");

    // The bucket refills at 5 per second: waiting for time to pass is the behaviour under test.
    std::thread::sleep(Duration::from_millis(1100));
    raw.send_text(r#"{"cmd":"add_group","group_id":"r6","id":"again"}"#);
    assert_eq!(raw.next_text(), r#"{"id":"again","ok":true}"#);
    watchers.settle(&server, 6);
    watchers.clients[1].send_to_group(&json!("r6"), "now a member");
    assert_eq!(raw.next_text(), "now a member");
    watchers.check("rate limiting");
    assert_eq!(worker_sum(&server.status(), "rate_limited"), 4);
}

/// What a keep-alive probe saw.
#[derive(Debug)]
struct Seen {
    pings: usize,
    /// Close code and reason, with the time since connecting, if the server closed.
    closed: Option<(u16, String, Duration)>,
}

/// Reads `raw` for `span` (or until the server closes): counts pings, answering them with a
/// pong when `answer`; when `chatter` is set, also sends a ping of its own that often.
fn keepalive_probe(mut raw: RawWs, since: Instant, span: Duration, answer: bool, chatter: Option<Duration>) -> Seen {
    let mut seen = Seen { pings: 0, closed: None };
    let end = since + span;
    let mut next_chat = chatter.map(|c| Instant::now() + c);
    while Instant::now() < end {
        let mut wake = end;
        if let Some(t) = next_chat {
            wake = wake.min(t);
        }
        raw.read_timeout(Some(wake.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))));
        match raw.next_frame() {
            Ok((0x89, payload)) => {
                seen.pings += 1;
                if answer {
                    raw.write_frame(0x8A, &payload, true);
                }
            }
            Ok((0x88, payload)) => {
                let code = if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 };
                let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).into_owned();
                seen.closed = Some((code, reason, since.elapsed()));
                return seen;
            }
            Ok(_) => {}
            Err(End::Eof) => {
                seen.closed = Some((0, "EOF without a close frame".into(), since.elapsed()));
                return seen;
            }
            Err(End::Timeout) => {}
        }
        if let (Some(t), Some(every)) = (next_chat, chatter) {
            if Instant::now() >= t {
                raw.write_frame(0x89, b"chat", true);
                next_chat = Some(Instant::now() + every);
            }
        }
    }
    seen
}

/// Runs the three keep-alive probes at once: a silent client, one that answers pings, one
/// that sends pings of its own; each watched for `span`.
fn keepalive_round(server: &Server, span: Duration) -> (Seen, Seen, Seen) {
    let conns: Vec<(RawWs, Instant)> = (0..3).map(|_| (RawWs::connect(server.addr), Instant::now())).collect();
    let mut it = conns.into_iter();
    let (silent, answering, chatty) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    std::thread::scope(|s| {
        let a = s.spawn(move || keepalive_probe(silent.0, silent.1, span, false, None));
        let b = s.spawn(move || keepalive_probe(answering.0, answering.1, span, true, None));
        let c = s.spawn(move || keepalive_probe(chatty.0, chatty.1, span, true, Some(Duration::from_millis(200))));
        (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
    })
}

#[test]
fn silent_clients_are_pinged_and_closed_after_idle_timeout_ms() {
    // The values of issue 6: a ping after 300 ms of silence, closed after 1 s.
    let server = start(2, "[limits]\nping_interval_ms = 300\nidle_timeout_ms = 1000\n");
    let (silent, answering, chatty) = keepalive_round(&server, Duration::from_millis(2500));
    // Watchers come after the round: they would be silent clients during it.
    let mut watchers = Watchers::new(&server, "watch");
    let all = format!("silent {silent:?}\nanswering {answering:?}\nchatty {chatty:?}");
    assert!(silent.pings >= 1, "a client silent for 300 ms gets a ping before its idle close:\n{all}");
    let (code, reason, after) = silent.closed.clone().unwrap_or_else(|| panic!("silent client not closed:\n{all}"));
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"), "{all}");
    assert!(after >= Duration::from_millis(900), "closed before 1 s of silence:\n{all}");
    assert!(answering.closed.is_none(), "a client answering pings stays connected:\n{all}");
    assert!(answering.pings >= 2, "pinged every 300 ms of silence:\n{all}");
    assert!(chatty.closed.is_none(), "a client that keeps talking stays connected:\n{all}");
    watchers.check("idle timeouts");
    let report = server.status();
    assert_eq!(field(&report["totals"], "idle_timeouts"), 1, "{all}");
    assert!(worker_sum(&report, "pings_sent") >= 3, "{all}");
}

#[test]
fn keepalive_with_whole_second_values() {
    // The same behaviour with second-multiples (ping after 1 s, close after 2 s), which the
    // worker's once-a-second sweep can honour.
    let server = start(2, "[limits]\nping_interval_ms = 1000\nidle_timeout_ms = 2000\n");
    let (silent, answering, chatty) = keepalive_round(&server, Duration::from_millis(4000));
    let mut watchers = Watchers::new(&server, "watch");
    let all = format!("silent {silent:?}\nanswering {answering:?}\nchatty {chatty:?}");
    assert_eq!(silent.pings, 1, "one ping, then the close:\n{all}");
    let (code, reason, after) = silent.closed.clone().unwrap_or_else(|| panic!("silent client not closed:\n{all}"));
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"), "{all}");
    assert!(after >= Duration::from_millis(1000) && after < Duration::from_millis(4000), "{all}");
    assert!(answering.closed.is_none() && answering.pings >= 1, "{all}");
    assert!(chatty.closed.is_none() && chatty.pings == 0, "{all}");
    watchers.check("idle timeouts");
    let report = server.status();
    assert_eq!(field(&report["totals"], "idle_timeouts"), 1, "{all}");
    assert!(worker_sum(&report, "pings_sent") >= 2, "{all}");
}

#[test]
fn status_shows_every_limit() {
    let config = "[limits]\nmax_connections_per_worker = 70\nmax_connections = 90\nmax_frame_size = 2000\n\
                  max_message_size = 3000\nmax_group_id_len = 13\nmax_groups_per_connection = 11\n\
                  send_buffer_limit = 70000\nslow_client = \"drop\"\nhandshake_timeout_ms = 1500\n\
                  ping_interval_ms = 2500\nidle_timeout_ms = 9000\nmessage_timeout_ms = 7000\n\
                  commands_per_second = 17\ncommands_burst = 19\nmax_connections_per_ip = 23\n\
                  per_ip_exempt = [\"10.0.0.0/8\"]\n";
    let server = start(1, config);
    let limits = &server.status()["limits"];
    let expected = json!({
        "max_connections_per_worker": 70, "max_connections": 90, "max_frame_size": 2000,
        "max_message_size": 3000, "max_group_id_len": 13, "max_groups_per_connection": 11,
        "send_buffer_limit": 70000, "slow_client": "drop", "handshake_timeout_ms": 1500,
        "ping_interval_ms": 2500, "idle_timeout_ms": 9000, "message_timeout_ms": 7000,
        "commands_per_second": 17, "commands_burst": 19, "max_connections_per_ip": 23,
        "per_ip_exempt": ["10.0.0.0/8"],
    });
    assert_eq!(*limits, expected);
    let text = server.cli(&["status"]);
    assert_eq!(text.code, Some(0), "{text:?}");
    let line = text.stdout.lines().position(|l| l.starts_with("limits:")).expect("a limits: line");
    let block: String = text.stdout.lines().skip(line).take(3).collect::<Vec<_>>().join("\n");
    for shown in [
        "conns 70/worker (total 90)",
        "frame 2000",
        "message 3000",
        "groups/conn 11",
        "group id 13",
        "send buffer 70000 (Drop)",
        "handshake 1500ms",
        "ping 2500ms",
        "idle 9000ms",
        "commands 17/s burst 19",
        "per IP 23 (exempt 10.0.0.0/8)",
    ] {
        assert!(block.contains(shown), "{shown:?} missing from:\n{block}");
    }
    assert!(text.stdout.contains("limit hits: refused conns 0"), "{}", text.stdout);
}
