//! The seed's wire protocol: messages delivered as sent (strings as is, other JSON compacted,
//! UTF-8 intact), on the sender's worker and across the broker alike; replies only when asked
//! for with an `id`, echoing it; no unsolicited frames otherwise.

mod common;

use common::*;
use serde_json::{json, Value};

/// Two members on each worker; the sender (`clients[0]`) is a member too.
fn setup(server: &Server, group: &str) -> Vec<Client> {
    let (clients, on) = server.connect_spread(2);
    // Keep two per worker, one on worker 0 first: the sender.
    let mut keep = Vec::new();
    for w in [0, 1] {
        keep.extend((0..on.len()).filter(|&c| on[c] == w).take(2));
    }
    let mut slots: Vec<Option<Client>> = clients.into_iter().map(Some).collect();
    let mut kept: Vec<Client> = keep.iter().map(|&k| slots[k].take().unwrap()).collect();
    for client in &mut kept {
        client.add_group(&json!(group));
        client.sync_quiet();
    }
    server.wait_subscriptions(kept.len() as u64);
    kept
}

/// Sends raw `frame` from client 0 and checks that every client receives exactly `expected`.
fn deliver(clients: &mut [Client], frame: &str, expected: &str) {
    clients[0].send(frame);
    for (i, c) in clients.iter_mut().enumerate() {
        let got = c.recv();
        assert_eq!(got, expected, "client {i} for {frame}");
    }
}

#[test]
fn messages_are_delivered_as_sent() {
    let server = Server::start_with(Opts::workers(2));
    let mut clients = setup(&server, "compat");
    let refs: Vec<&Client> = clients.iter().collect();
    let on = server.workers_of(&refs);
    assert_eq!(on[0], 0, "the sender is on worker 0");
    assert!(on.contains(&1), "members on the other worker: {on:?}");

    // Strings as is (escapes decoded), whatever the spelling of the command.
    deliver(&mut clients, r#"{"cmd":"send_to_group","group_id":"compat","message":"hello"}"#, "hello");
    deliver(
        &mut clients,
        r#"{ "message" : "quote \" backslash \\ newline \n tab \t é \u00e9 \ud83c\udf89" , "group_id":"compat", "cmd" : "send_to_group" }"#,
        "quote \" backslash \\ newline \n tab \t é é 🎉",
    );
    deliver(
        &mut clients,
        &json!({"cmd":"send_to_group","group_id":"compat","message":"héllo ✓ 你好 🎉"}).to_string(),
        "héllo ✓ 你好 🎉",
    );
    // A JSON text inside a string is still just a string.
    deliver(
        &mut clients,
        &json!({"cmd":"send_to_group","group_id":"compat","message":"{\"a\": [1, 2]}"}).to_string(),
        "{\"a\": [1, 2]}",
    );
    deliver(&mut clients, r#"{"cmd":"send_to_group","group_id":"compat","message":""}"#, "");
    // Anything else: its compact JSON text.
    deliver(&mut clients, r#"{"cmd":"send_to_group","group_id":"compat","message":{"a": [1, 2]}}"#, r#"{"a":[1,2]}"#);
    deliver(
        &mut clients,
        r#"{"cmd":"send_to_group","group_id":"compat","message": [ 1 , "✓" , { } ] }"#,
        r#"[1,"✓",{}]"#,
    );
    deliver(&mut clients, r#"{"cmd":"send_to_group","group_id":"compat","message":42}"#, "42");
    deliver(&mut clients, r#"{"cmd":"send_to_group","group_id":"compat","message":-7}"#, "-7");
    deliver(&mut clients, r#"{"cmd":"send_to_group","group_id":"compat","message":true}"#, "true");
    deliver(
        &mut clients,
        r#"{"cmd":"send_to_group","group_id":"compat","message":{"k": "héllo ✓ 你好", "n": {"deep": [true, false]}}}"#,
        r#"{"k":"héllo ✓ 你好","n":{"deep":[true,false]}}"#,
    );
    // Unknown fields are ignored, as the seed does.
    deliver(&mut clients, r#"{"cmd":"send_to_group","group_id":"compat","message":"x","extra":[1]}"#, "x");
    // A large message crosses the broker intact.
    let big: String = "0123456789abcdef✓".repeat(4096);
    deliver(&mut clients, &json!({"cmd":"send_to_group","group_id":"compat","message":big}).to_string(), &big);
    for c in &mut clients {
        c.sync_quiet();
    }
}

#[test]
fn null_message_is_delivered_as_json_null() {
    // `message` is "any JSON value"; null is one: its compact text is `null`.
    let server = Server::start_with(Opts::workers(1));
    let mut c = Client::connect(server.addr);
    c.add_group(&json!("n"));
    c.send(r#"{"cmd":"send_to_group","group_id":"n","message":null}"#);
    assert_eq!(c.recv(), "null");
}

#[test]
fn integer_and_string_group_ids_are_one_group() {
    let server = Server::start_with(Opts::workers(2));
    let (mut clients, on) = server.connect_spread(1);
    for (i, c) in clients.iter_mut().enumerate() {
        if i % 2 == 0 {
            c.add_group(&json!(123));
        } else {
            c.add_group(&json!("123"));
        }
        c.sync_quiet();
    }
    let report = server.wait_subscriptions(clients.len() as u64);
    for w in worker_rows(&report) {
        assert_eq!(field(&w, "groups"), 1, "one group per worker: {w}");
    }
    let s0 = on.iter().position(|&w| w == 0).unwrap();
    let s1 = on.iter().position(|&w| w == 1).unwrap();
    clients[s0].send_to_group(&json!(123), "by integer");
    clients[s1].send_to_group(&json!("123"), "by string");
    for (i, c) in clients.iter_mut().enumerate() {
        let mut got = vec![c.recv(), c.recv()];
        got.sort();
        assert_eq!(got, ["by integer", "by string"], "client {i}");
        c.sync_quiet();
    }
    // "0123" and 123.0 are other groups than 123 (or invalid): nothing arrives before the fence
    // that follows them from the same sender.
    clients[s1].send_json(&json!({"cmd":"send_to_group","group_id":"0123","message":"other"}));
    clients[s1].send_json(&json!({"cmd":"send_to_group","group_id":" 123","message":"other"}));
    clients[s1].send(r#"{"cmd":"send_to_group","group_id":123.0,"message":"other"}"#);
    clients[s1].send_to_group(&json!(123), "fence");
    for (i, c) in clients.iter_mut().enumerate() {
        let mut got = c.recv();
        if i == s1 {
            assert!(got.contains("invalid_field"), "123.0 is not an integer id: {got}");
            got = c.recv();
        }
        assert_eq!(got, "fence", "client {i}");
    }
}

#[test]
fn replies_only_when_asked_with_an_id() {
    let server = Server::start_with(Opts::workers(2));
    let mut clients = setup(&server, "r");
    let ids =
        [json!("req-1"), json!(17), json!(-3.5), json!({"k": ["nested", 1], "u": "✓"}), json!([1, "two"]), json!("")];
    for id in &ids {
        for cmd in [
            json!({"cmd":"add_group","group_id":"other","id":id}),
            json!({"cmd":"leave_group","group_id":"other","id":id}),
            json!({"cmd":"send_to_group","group_id":"nobody-here","message":"m","id":id}),
        ] {
            clients[0].send_json(&cmd);
            let reply: Value = serde_json::from_str(&clients[0].recv()).unwrap();
            assert_eq!(reply, json!({"id": id, "ok": true}), "reply to {cmd}");
        }
    }
    // The raw id text is echoed, spacing and all, within a valid JSON reply.
    clients[0].send(r#"{"id" : { "a" : [ 1 ,2 ] },"cmd":"add_group","group_id":"other"}"#);
    let reply: Value = serde_json::from_str(&clients[0].recv()).unwrap();
    assert_eq!(reply, json!({"id": {"a": [1, 2]}, "ok": true}));

    // An id on a send to the sender's own group: its copy of the message and the reply.
    clients[0].send_json(&json!({"cmd":"send_to_group","group_id":"r","message":"with id","id":9}));
    let mut got = vec![clients[0].recv(), clients[0].recv()];
    got.sort();
    assert_eq!(got, ["with id".to_string(), r#"{"id":9,"ok":true}"#.to_string()]);
    for c in &mut clients[1..] {
        assert_eq!(c.recv(), "with id", "no reply goes to the other members");
    }

    // Without an id: silence. Commands of every kind, then a probe whose reply must be the
    // very next frame.
    for c in &mut clients {
        c.add_group(&json!("quiet"));
        c.add_group(&json!("quiet"));
        c.leave_group(&json!("quiet"));
        c.leave_group(&json!("never-joined"));
        c.send_to_group(&json!("nobody-here"), "into the void");
        c.sync_quiet();
    }
    for c in &mut clients {
        c.sync_quiet();
    }
    assert_eq!(field(&server.status()["totals"], "bad_requests"), 0);
}
