//! The HTTP API (`[api]`, docs/api.md) against the real binary, through a real HTTP client
//! (ureq) and by hand over raw sockets: publish reaching members on both workers, and across
//! two instances on one broker or on Redis, exactly as a WebSocket `send_to_group`; member
//! counts summed over workers; the connection list and closing one connection; the bearer key;
//! every error status and code (503 `bus_unavailable`, `publish_timeout` and
//! `master_unavailable` with the broker gone, the channel server or the master stopped); slow
//! and silent HTTP clients; keep-alive and pipelining; `/ready` following the bus; the api
//! process restarted and replaced at a reload; the `[api]` config checks and `status`.

mod api_support;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use api_support::*;
use common::*;
use serde_json::{json, Value};

/// Commands come fast in these tests: lift the per-connection rate limit.
const FAST: &str = "[limits]\ncommands_per_second = 1000000\ncommands_burst = 1000000\n";

fn p2_join(c: &mut Client, group: &Value) -> Value {
    let reply = c.call(json!({"cmd":"add_group","group_id":group}));
    assert_eq!(reply["ok"], true, "{reply}");
    reply
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

// ---- publish ---------------------------------------------------------------------------------

#[test]
fn publish_reaches_members_on_both_workers_exactly_as_send_to_group() {
    let api = Api::start(ApiOpts { config: FAST.into(), ..ApiOpts::default() });
    let server = &api.server;
    let (mut seeds, seed_on) = server.connect_spread(1);
    let (mut p2s, p2_on) = server.connect_spread_path(1, "/?protocol=2");
    assert!((0..2).all(|w| seed_on.contains(&w) && p2_on.contains(&w)), "{seed_on:?} {p2_on:?}");
    for c in seeds.iter_mut() {
        c.add_group(&json!("room"));
        c.add_group(&json!(123));
        c.add_group(&json!("other"));
        c.sync_quiet();
    }
    for c in p2s.iter_mut() {
        p2_join(c, &json!("room"));
        p2_join(c, &json!(123));
        p2_join(c, &json!("other"));
    }
    server.wait_subscriptions(3 * (seeds.len() + p2s.len()) as u64);
    let mut ws_sender = Client::connect(server.addr);

    // The same messages through a WebSocket send_to_group, then through the API: byte for byte
    // the same frames (a string as is, anything else compacted).
    let bodies = [
        (r#"{"group":"room","message":"hello \"world\""}"#, json!("hello \"world\"")),
        (
            r#"{ "message" : { "a" : 1 , "b" : [ 1 , 2 , { "c" : null } ] } , "group" : "room" }"#,
            json!({"a":1,"b":[1,2,{"c":null}]}),
        ),
        (r#"{"group":"room","message":42}"#, json!(42)),
        (r#"{"group":"room","message":"{\"a\": 1}"}"#, json!("{\"a\": 1}")),
        (r#"{"group":"room","message":[true, false]}"#, json!([true, false])),
    ];
    let mut last_offset = 0;
    for (body, message) in &bodies {
        ws_sender.send_json(&json!({"cmd":"send_to_group","group_id":"room","message":message}));
        let expected: Vec<String> = seeds.iter_mut().map(|c| c.recv()).collect();
        let ws_offset = p2s.iter_mut().map(|c| parse(&c.recv())["offset"].as_u64().unwrap()).max().unwrap();
        assert!(ws_offset > last_offset);
        assert!(expected.iter().all(|e| e == &expected[0]), "{expected:?}");

        let resp = api.call("POST", "/api/publish", Some(body));
        let v = resp.assert_ok();
        assert_eq!(v["ok"], true, "{resp}");
        let offset = v["offset"].as_u64().unwrap_or_else(|| panic!("no offset in {resp}"));
        assert_eq!(offset, ws_offset + 1, "the group's next offset: {resp}");
        last_offset = offset;
        for (i, c) in seeds.iter_mut().enumerate() {
            assert_eq!(c.recv(), expected[0], "seed client {i} (worker {}), body {body}", seed_on[i]);
        }
        for (i, c) in p2s.iter_mut().enumerate() {
            let env = parse(&c.recv());
            assert_eq!(env, json!({"group":"room","offset":offset,"message":message}), "p2 client {i}: {env}");
        }
    }
    // Integer group ids, and Content-Type with parameters.
    let mut raw = api.raw();
    let body = r#"{"group":123,"message":"to 123"}"#;
    let resp = raw.request(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let offset = resp.assert_ok()["offset"].as_u64().unwrap_or_else(|| panic!("{resp}"));
    assert_eq!(offset, 1, "the first message of group 123: {resp}");
    for c in seeds.iter_mut() {
        assert_eq!(c.recv(), "to 123");
    }
    for c in p2s.iter_mut() {
        assert_eq!(parse(&c.recv()), json!({"group":"123","offset":1,"message":"to 123"}));
    }
    // The `groups` form: one publish per group, each with its offset.
    let resp = api.publish(&json!({"groups":["other", 123, "nobody-here"],"message":{"k":"v"}}));
    let v = resp.assert_ok();
    assert_eq!(v["ok"], true, "{resp}");
    let offsets = v["offsets"].as_object().unwrap_or_else(|| panic!("no offsets map: {resp}"));
    assert_eq!(offsets.get("other"), Some(&json!(1)), "{resp}");
    assert_eq!(offsets.get("123"), Some(&json!(2)), "{resp}");
    assert!(offsets.keys().all(|k| ["other", "123", "nobody-here"].contains(&k.as_str())), "{resp}");
    for c in seeds.iter_mut() {
        let got: BTreeSet<String> = [c.recv(), c.recv()].into();
        assert_eq!(got, BTreeSet::from(["{\"k\":\"v\"}".to_string()]));
        c.sync_quiet();
    }
    for c in p2s.iter_mut() {
        let mut got: Vec<Value> = vec![parse(&c.recv()), parse(&c.recv())];
        got.sort_by_key(|e| e["group"].as_str().unwrap_or_default().to_owned());
        assert_eq!(
            got,
            vec![
                json!({"group":"123","offset":2,"message":{"k":"v"}}),
                json!({"group":"other","offset":1,"message":{"k":"v"}}),
            ]
        );
        c.sync_quiet();
    }
    // A group listed twice is published once; unknown fields are ignored.
    let resp = api.publish(&json!({"groups":["other","other"],"message":"once","extra":[1]}));
    assert_eq!(resp.assert_ok(), json!({"ok":true,"offsets":{"other":2}}), "{resp}");
    for c in seeds.iter_mut() {
        assert_eq!(c.recv(), "once");
        c.sync_quiet();
    }
    for c in p2s.iter_mut() {
        assert_eq!(parse(&c.recv()), json!({"group":"other","offset":2,"message":"once"}));
        c.sync_quiet();
    }
    // The api process counts what it did: 5 + 1 + 3 + 1 group publishes.
    let row = api.row();
    assert_eq!(field(&row, "published"), 5 + 1 + 3 + 1, "{row}");
    assert!(field(&row, "api_requests") >= 7, "{row}");
    assert_eq!(field(&row, "api_errors"), 0, "{row}");
    // HTTP connections are the api row's, not the WebSocket totals'.
    let totals = &server.status()["totals"];
    assert_eq!(field(totals, "connections"), (seeds.len() + p2s.len() + 1) as u64, "{totals}");
}

/// One member of group "room" on each worker of instances `a` and `b`, named
/// `a-worker0`..., once each instance counts its memberships.
fn room_members_on_every_worker(a: &Api, b: &Api) -> Vec<(String, Client)> {
    let mut members: Vec<(String, Client)> = Vec::new();
    for (name, api) in [("a", a), ("b", b)] {
        let (clients, on) = api.server.connect_spread(1);
        for (mut c, w) in clients.into_iter().zip(on) {
            c.add_group(&json!("room"));
            c.sync_quiet();
            members.push((format!("{name}-worker{w}"), c));
        }
        let n = members.iter().filter(|(m, _)| m.starts_with(name)).count();
        api.server.wait_status(&format!("{n} memberships"), |r| r["totals"]["memberships"] == n as u64);
    }
    members
}

#[test]
fn publish_through_either_instance_reaches_both_on_one_broker() {
    let broker = Broker::start("api-cluster");
    let a = Api::start(ApiOpts { config: FAST.into(), extra: broker.connect_args(), ..ApiOpts::default() });
    let b = Api::start(ApiOpts { config: FAST.into(), extra: broker.connect_args(), ..ApiOpts::default() });
    // 2 workers and the api process of each instance.
    wait_for("6 peers (4 workers, 2 api processes) at the broker", TIMEOUT, || (broker.peers() == 6).then_some(()));
    let mut members = room_members_on_every_worker(&a, &b);
    broker.wait_memberships(4);
    for (i, api) in [&a, &b].into_iter().enumerate() {
        let message = format!("through the API of instance {i}");
        api.publish(&json!({"group":"room","message":message})).assert_ok();
        for (who, c) in members.iter_mut() {
            assert_eq!(c.recv(), message, "{who}");
        }
    }
    for (who, c) in members.iter_mut() {
        assert!(c.sync().is_empty(), "{who}: nothing twice");
    }
}

// ---- groups and connections -------------------------------------------------------------------

#[test]
fn group_members_are_summed_over_the_workers() {
    let api = Api::start(ApiOpts { config: FAST.into(), ..ApiOpts::default() });
    let (mut clients, on) = api.server.connect_spread(2);
    assert!((0..2).all(|w| on.iter().filter(|&&x| x == w).count() >= 2), "{on:?}");
    let odd = "a b/ü?#%";
    // Members of `odd`: the first two clients on each worker.
    let in_odd: Vec<bool> = (0..on.len()).map(|i| on[..i].iter().filter(|&&w| w == on[i]).count() < 2).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.add_group(&json!("all"));
        if in_odd[i] {
            c.add_group(&json!(odd));
        }
        c.add_group(&json!(7));
        c.sync_quiet();
    }
    let n = clients.len();
    let evens = in_odd.iter().filter(|&&b| b).count();
    assert_eq!(evens, 4);
    api.server.wait_subscriptions((2 * n + evens) as u64);
    let on_workers = |g: &str| {
        let members: BTreeSet<usize> = (0..n).filter(|&i| g != odd || in_odd[i]).map(|i| on[i]).collect();
        members
    };
    assert_eq!(on_workers("all").len(), 2, "members on both workers");
    assert_eq!(on_workers(odd).len(), 2, "members of {odd:?} on both workers: {on:?}");
    for (path, group, members) in [
        ("/api/groups/all", "all", n),
        ("/api/groups/a%20b%2F%C3%BC%3F%23%25", odd, evens),
        ("/api/groups/7", "7", n),
        ("/api/groups/nobody", "nobody", 0),
    ] {
        let resp = api.get(path);
        let v = resp.assert_ok();
        assert_eq!(v["group"], group, "{path}: {resp}");
        assert_eq!(v["members"], members, "{path}: {resp}");
        assert_eq!(v["missing_workers"], json!([]), "{path}: {resp}");
    }
    // Leaving is seen at once.
    clients[0].leave_group(&json!("all"));
    clients[0].sync_quiet();
    assert_eq!(api.get("/api/groups/all").assert_ok()["members"], n - 1);
    // Ids the WebSocket refuses are refused here too (longer than limits.max_group_id_len).
    api.get(&format!("/api/groups/{}", "x".repeat(300))).assert_error(400, "invalid_field");
    api.get("/api/groups/%ZZ").assert_error(400, "invalid_field");
    api.get("/api/groups/%C3").assert_error(400, "invalid_field");
    api.get("/api/groups/").assert_error(400, "invalid_field");
    api.get("/api/groups/a/b").assert_error(400, "invalid_field");
}

/// The list without the fields that move between two reads (age, counters).
fn stable(list: &Value) -> BTreeMap<u64, Value> {
    list["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("no connections array: {list}"))
        .iter()
        .map(|c| {
            let key = c["id"].as_u64().unwrap_or_else(|| panic!("no id: {c}"));
            let w = c["worker"].as_u64().unwrap();
            let mut groups: Vec<String> = c["groups"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_owned()).collect();
            groups.sort();
            ((w << 48) | key, json!({"id":c["id"],"worker":w,"worker_pid":c["worker_pid"],"peer":c["peer"],"state":c["state"],"groups":groups}))
        })
        .collect()
}

/// Clients on both workers, each in one group, and the API's list of them, by client port.
fn clients_and_list(api: &Api, per_worker: usize) -> (Vec<Client>, Vec<usize>, Value, Vec<u64>) {
    let (mut clients, on) = api.server.connect_spread(per_worker);
    for (i, c) in clients.iter_mut().enumerate() {
        c.add_group(&json!(format!("g{}", i % 2)));
        c.sync_quiet();
    }
    let listed = api.get("/api/connections").assert_ok();
    let by_port: BTreeMap<u16, Value> = listed["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("no connections: {listed}"))
        .iter()
        .map(|c| (c["peer"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap(), c.clone()))
        .collect();
    let ids: Vec<u64> = clients
        .iter()
        .map(|c| {
            by_port.get(&c.port).unwrap_or_else(|| panic!("port {} not listed: {listed}", c.port))["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    (clients, on, listed, ids)
}

#[test]
fn the_connection_list_equals_the_cli_and_names_each_connection_once() {
    let api = Api::start(ApiOpts { config: FAST.into(), ..ApiOpts::default() });
    let (clients, on, listed, ids) = clients_and_list(&api, 3);
    let run = api.server.cli(&["connections", "--json"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let cli: Value = serde_json::from_str(&run.stdout).expect("connections --json is JSON");
    let keys: BTreeSet<&String> = listed.as_object().unwrap().keys().collect();
    let cli_keys: BTreeSet<&String> = cli.as_object().unwrap().keys().collect();
    assert_eq!(keys, cli_keys, "the same fields: {listed}");
    assert_eq!(listed["missing_workers"], json!([]));
    assert_eq!(stable(&listed), stable(&cli), "the API's list and the CLI's");
    assert_eq!(stable(&listed).len(), clients.len());
    let fields: BTreeSet<&String> = listed["connections"][0].as_object().unwrap().keys().collect();
    let cli_fields: BTreeSet<&String> = cli["connections"][0].as_object().unwrap().keys().collect();
    assert_eq!(fields, cli_fields);
    // `DELETE /api/connections/ID` names one connection: an id must not be held by two.
    let mut holders: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        holders.entry(*id).or_default().push(on[i]);
    }
    let shared: Vec<(&u64, &Vec<usize>)> = holders.iter().filter(|(_, w)| w.len() > 1).collect();
    assert!(shared.is_empty(), "connection ids held by several workers (id, workers): {shared:?}");
}

/// Reads until the server's close frame: (code, reason); panics if none comes.
fn close_of(c: &mut Client, who: &str) -> (u16, String) {
    loop {
        match c.next_message(TIMEOUT) {
            Some(tungstenite::Message::Close(Some(frame))) => {
                return (u16::from(frame.code), frame.reason.as_str().to_owned())
            }
            Some(tungstenite::Message::Close(None)) => panic!("{who}: close without a code"),
            Some(_) => {}
            None => panic!("{who} was not closed"),
        }
    }
}

/// Every client but `closed` still answers; a closed one names itself.
fn others_still_talk(clients: &mut [Client], closed: &[usize], on: &[usize], ids: &[u64]) {
    for (i, c) in clients.iter_mut().enumerate() {
        if closed.contains(&i) {
            continue;
        }
        c.send_json(&json!({"cmd":"leave_group","group_id":"__probe__","id":"still"}));
        match c.next_message(TIMEOUT) {
            Some(tungstenite::Message::Text(t)) => assert_eq!(parse(t.as_str()), json!({"id":"still","ok":true})),
            other => panic!(
                "client {i} (id {}, worker {}) was not the one closed, yet got {other:?} (closed: {:?})",
                ids[i],
                on[i],
                closed.iter().map(|&k| (ids[k], on[k])).collect::<Vec<_>>()
            ),
        }
    }
}

#[test]
fn delete_closes_exactly_that_connection_with_its_code() {
    let api = Api::start(ApiOpts { config: FAST.into(), ..ApiOpts::default() });
    let (mut clients, on, _, ids) = clients_and_list(&api, 3);
    // Unknown ids, bad ids and bad codes close nothing.
    api.call("DELETE", "/api/connections/999999999", None).assert_error(404, "not_found");
    let some = ids[0];
    for bad in [
        "/api/connections/abc".to_string(),
        "/api/connections/-1".to_string(),
        "/api/connections/1.5".to_string(),
        "/api/connections/99999999999999999999999".to_string(),
        format!("/api/connections/{some}?code=999"),
        format!("/api/connections/{some}?code=1005"),
        format!("/api/connections/{some}?code=1011"),
        format!("/api/connections/{some}?code=2000"),
        format!("/api/connections/{some}?code=5000"),
        format!("/api/connections/{some}?code=x"),
        format!("/api/connections/{some}?reason={}", "r".repeat(124)),
    ] {
        api.call("DELETE", &bad, None).assert_error(400, "invalid_field");
    }
    others_still_talk(&mut clients, &[], &on, &ids);
    // Our code and reason on a client of worker 0, then the default on one of worker 1.
    let first = on.iter().rposition(|&w| w == 0).unwrap();
    let second = on.iter().position(|&w| w == 1).unwrap();
    let mut closed = Vec::new();
    for (victim, query, code, reason) in
        [(first, "?code=4001&reason=x", 4001u16, "x"), (second, "", 1008, "closed by the API")]
    {
        let id = ids[victim];
        let resp = api.call("DELETE", &format!("/api/connections/{id}{query}"), None);
        assert_eq!(resp.assert_ok(), json!({"ok":true,"id":id}), "{resp}");
        let (got_code, got_reason) = close_of(&mut clients[victim], &format!("client {victim} (id {id})"));
        assert_eq!(got_code, code, "client {victim}");
        assert_eq!(got_reason, reason, "client {victim}");
        closed.push(victim);
        others_still_talk(&mut clients, &closed, &on, &ids);
    }
    // A closed connection stays listed (`closing`) until its close handshake ends.
    let after = wait_for("the two closed connections to leave the list", Duration::from_secs(20), || {
        let listed = stable(&api.get("/api/connections").assert_ok());
        (listed.len() == clients.len() - 2).then_some(listed)
    });
    for victim in &closed {
        assert!(!after.contains_key(&ids[*victim]), "{after:?}");
    }
    // Gone: 404.
    api.call("DELETE", &format!("/api/connections/{}", ids[first]), None).assert_error(404, "not_found");
    // Codes at the ends of the ranges are taken.
    let mut c = Client::connect(api.server.addr);
    c.sync_quiet();
    let listed = api.get("/api/connections").assert_ok();
    let me = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["peer"] == format!("127.0.0.1:{}", c.port))
        .map(|e| e["id"].as_u64().unwrap())
        .unwrap();
    api.call("DELETE", &format!("/api/connections/{me}?code=1000"), None).assert_ok();
    assert_eq!(close_of(&mut c, "the 1000 client").0, 1000);
}

// ---- the key ----------------------------------------------------------------------------------

/// Every endpoint that needs the key: (method, path, body).
fn keyed_endpoints() -> Vec<(&'static str, &'static str, Option<&'static str>)> {
    vec![
        ("POST", "/api/publish", Some(r#"{"group":"k","message":"m"}"#)),
        ("GET", "/api/groups/k", None),
        ("GET", "/api/connections", None),
        ("DELETE", "/api/connections/424242", None),
        ("GET", "/metrics", None),
    ]
}

#[test]
fn with_a_key_file_the_api_and_metrics_need_the_bearer_key() {
    let api = Api::start(ApiOpts { key: true, ..ApiOpts::default() });
    let mut member = Client::connect(api.server.addr);
    member.add_group(&json!("k"));
    member.sync_quiet();
    api.server.wait_subscriptions(1);
    for (method, path, body) in keyed_endpoints() {
        let wrong = format!("{KEY}x");
        let short = &KEY[..KEY.len() - 1];
        for key in [None, Some(wrong.as_str()), Some(short), Some("")] {
            let resp = api.call_with(method, path, body, key);
            resp.assert_error(401, "unauthorized");
            assert!(
                resp.header("www-authenticate").is_some_and(|h| h.starts_with("Bearer")),
                "{method} {path} with {key:?}: {resp}"
            );
        }
        // Other schemes, and the key without the scheme.
        for auth in [format!("Basic {KEY}"), KEY.to_string(), format!("Bearer  {KEY}x")] {
            let mut raw = api.raw();
            let resp = raw.request(&request(method, path, &format!("Authorization: {auth}\r\n"), body));
            resp.assert_error(401, "unauthorized");
        }
        let resp = api.call(method, path, body);
        assert_ne!(resp.status, 401, "{method} {path} with the key: {resp}");
        // (`/metrics` itself is checked in the next test.)
        assert!(
            resp.status == 200 || path.starts_with("/api/connections/") || path == "/metrics",
            "{method} {path}: {resp}"
        );
    }
    // Nothing was published without the key; once with it.
    assert_eq!(member.recv(), "m");
    member.sync_quiet();
    // Health and readiness never need it.
    for path in ["/health", "/ready"] {
        let resp = api.call_with("GET", path, None, None);
        assert_eq!(resp.status, 200, "{path}: {resp}");
    }
    assert_eq!(api.call_with("GET", "/health", None, None).json(), json!({"ok":true}));
    assert_eq!(api.call_with("GET", "/ready", None, None).json(), json!({"ready":true}));
    // The key never shows in status.
    let run = api.server.cli(&["status", "--json"]);
    assert!(!run.stdout.contains(KEY), "status shows the key:\n{}", run.stdout);
}

#[test]
fn without_a_key_file_everything_is_open_and_metrics_are_prometheus_text() {
    let api = Api::start(ApiOpts::default());
    for (method, path, body) in keyed_endpoints() {
        let resp = api.call_with(method, path, body, None);
        let expected = if path.starts_with("/api/connections/") { 404 } else { 200 };
        assert!(resp.status == expected || (path == "/metrics" && resp.status != 401), "{method} {path}: {resp}");
        // A key sent anyway is ignored.
        let resp = api.call_with(method, path, body, Some("whatever"));
        assert_ne!(resp.status, 401, "{method} {path}: {resp}");
    }
    let resp = api.get("/metrics");
    assert_eq!(resp.status, 200, "{resp}");
    assert_eq!(resp.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"), "{resp}");
    assert!(resp.text().lines().any(|l| l.starts_with("# TYPE ")), "{}", resp.text());
    let resp = api.get("/health");
    assert_eq!((resp.status, resp.json()), (200, json!({"ok":true})));
    assert!(resp.header("content-type").is_some_and(|t| t.starts_with("application/json")), "{resp}");
    // No demo unless asked for.
    api.get("/demo/").assert_error(404, "not_found");
    api.get("/demo/config.json").assert_error(404, "not_found");
}

#[test]
fn the_demo_is_served_when_enabled() {
    // (A fixed WebSocket port: with port 0 the api process reports 0, not the bound port.)
    let ws = format!("127.0.0.1:{}", free_port());
    let api = Api::start(ApiOpts { key: true, listen: Some(ws), ..ApiOpts::api("demo = true") });
    for path in ["/demo/", "/demo/index.html"] {
        let resp = api.call_with("GET", path, None, None);
        assert_eq!(resp.status, 200, "{path}: {resp}");
        assert!(resp.header("content-type").is_some_and(|t| t.starts_with("text/html")), "{resp}");
        let page = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/chat/index.html")).unwrap();
        assert_eq!(resp.body, page, "{path} is examples/chat/index.html");
    }
    let resp = api.call_with("GET", "/demo/groupcast.js", None, None);
    assert_eq!(resp.status, 200, "{resp}");
    assert_eq!(resp.body, std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/groupcast.js")).unwrap());
    let resp = api.call_with("GET", "/demo/config.json", None, None);
    assert_eq!(resp.json(), json!({"ws_port": api.server.addr.port(), "wss_port": null}), "{resp}");
    api.call_with("GET", "/demo/../Cargo.toml", None, None);
    let resp = api.call_with("GET", "/demo/..%2fCargo.toml", None, None);
    assert_eq!(resp.status, 404, "{resp}");
}

// ---- errors -----------------------------------------------------------------------------------

/// Small bounds for the error tests.
const SMALL: &str = "[limits]\nmax_message_size = 1024\nmax_groups_per_connection = 3\nmax_group_id_len = 16\n";

#[test]
fn every_bad_request_gets_its_status_and_code() {
    let api = Api::start(ApiOpts { config: SMALL.into(), workers: 1, ..ApiOpts::api("max_header_bytes = 1024") });
    let post = |body: &str| api.call("POST", "/api/publish", Some(body));
    // 400: the body.
    post("{").assert_error(400, "invalid_json");
    post("").assert_error(400, "invalid_json");
    post("{\"group\":\"a\",\"message\":1} x").assert_error(400, "invalid_json");
    for not_object in ["[1]", "\"s\"", "3", "null"] {
        post(not_object).assert_error(400, "not_an_object");
    }
    for missing in [r#"{"message":"m"}"#, r#"{"group":"a"}"#, r#"{"groups":["a"]}"#, "{}"] {
        post(missing).assert_error(400, "missing_field");
    }
    for bad in [
        r#"{"group":"","message":"m"}"#,
        r#"{"group":"0123456789abcdefg","message":"m"}"#,
        r#"{"group":1.5,"message":"m"}"#,
        r#"{"group":true,"message":"m"}"#,
        r#"{"group":{"a":1},"message":"m"}"#,
        r#"{"groups":"a","message":"m"}"#,
        r#"{"groups":["a",""],"message":"m"}"#,
        r#"{"groups":["a",[1]],"message":"m"}"#,
        r#"{"group":"a","groups":["b"],"message":"m"}"#,
    ] {
        post(bad).assert_error(400, "invalid_field");
    }
    // `null` is as good as missing, or a bad value.
    let null = post(r#"{"group":null,"message":"m"}"#);
    assert!(["missing_field", "invalid_field"].contains(&null.json()["error"].as_str().unwrap_or_default()), "{null}");
    assert_eq!(null.status, 400, "{null}");
    let empty = post(r#"{"groups":[],"message":"m"}"#);
    assert_eq!(empty.status, 400, "{empty}");
    post(r#"{"groups":["a","b","c","d"],"message":"m"}"#).assert_error(400, "too_many_groups");
    post(r#"{"groups":["a","b","c"],"message":"m"}"#).assert_ok();

    let raw = |bytes: &[u8]| api.raw().request(bytes);
    // 400: malformed HTTP.
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
    ] {
        raw(bad).assert_error(400, "bad_request");
    }
    // 404 and 405.
    for path in ["/", "/api", "/api/nothing", "/api/publish/x", "/healthz"] {
        raw(&request("GET", path, "", None)).assert_error(404, "not_found");
    }
    for (method, path, allowed) in [
        ("GET", "/api/publish", "POST"),
        ("PUT", "/api/publish", "POST"),
        ("POST", "/api/connections", "GET"),
        ("DELETE", "/api/groups/a", "GET"),
        ("POST", "/health", "GET"),
        ("DELETE", "/ready", "GET"),
        ("GET", "/api/connections/1", "DELETE"),
    ] {
        let resp = raw(&request(method, path, "", (method == "POST" || method == "PUT").then_some("{}")));
        resp.assert_error(405, "method_not_allowed");
        let allow = resp.header("allow").unwrap_or_else(|| panic!("no Allow: {method} {path}: {resp}"));
        assert!(allow.split(',').any(|m| m.trim() == allowed), "{method} {path}: Allow {allow:?}");
    }
    // 411: no Content-Length, or a chunked body.
    raw(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\r\n")
        .assert_error(411, "length_required");
    let mut c = api.raw();
    c.send(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
    c.send(b"1b\r\n{\"group\":\"a\",\"message\":\"m\"}\r\n0\r\n\r\n");
    c.response().assert_error(411, "length_required");
    // 413: answered from Content-Length, before any body byte; then closed.
    let mut c = api.raw();
    c.send(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1025\r\n\r\n");
    c.response().assert_error(413, "body_too_large");
    c.expect_closed();
    // A body of exactly max_message_size is taken.
    let pad = 1024 - r#"{"group":"a","message":""}"#.len();
    let body = format!(r#"{{"group":"a","message":"{}"}}"#, "p".repeat(pad));
    assert_eq!(body.len(), 1024);
    post(&body).assert_ok();
    // 415: no or another Content-Type.
    let body = r#"{"group":"a","message":"m"}"#;
    for ct in [
        "",
        "Content-Type: text/plain\r\n",
        "Content-Type: application/x-www-form-urlencoded\r\n",
        "Content-Type: application/jsonx\r\n",
    ] {
        let r = format!("POST /api/publish HTTP/1.1\r\nHost: t\r\n{ct}Content-Length: {}\r\n\r\n{body}", body.len());
        raw(r.as_bytes()).assert_error(415, "unsupported_media_type");
    }
    // 431: headers over max_header_bytes (1024); just under is fine.
    let pad = "x".repeat(2000);
    raw(format!("GET /health HTTP/1.1\r\nHost: t\r\nX-Pad: {pad}\r\n\r\n").as_bytes())
        .assert_error(431, "headers_too_large");
    let pad = "x".repeat(900);
    assert_eq!(raw(format!("GET /health HTTP/1.1\r\nHost: t\r\nX-Pad: {pad}\r\n\r\n").as_bytes()).status, 200);
    // A head that never ends but grows past the bound is refused without waiting for its end.
    let mut c = api.raw();
    c.send(format!("GET /health HTTP/1.1\r\nX-Pad: {}", "y".repeat(4096)).as_bytes());
    c.response().assert_error(431, "headers_too_large");
    // 431 too: more than 64 header lines, however short.
    let many: String = (0..65).map(|i| format!("X-{i}: v\r\n")).collect();
    raw(format!("GET /health HTTP/1.1\r\n{many}\r\n").as_bytes()).assert_error(431, "headers_too_large");
    // 400: a Content-Length that is not a number, two that disagree, an Expect we do not know.
    for headers in [
        "Content-Length: 1x\r\n",
        "Content-Length: -1\r\n",
        "Content-Length: 2\r\nContent-Length: 3\r\n",
        "Expect: 200-ok\r\n",
    ] {
        let r = format!("POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{headers}\r\n{{}}");
        raw(r.as_bytes()).assert_error(400, "bad_request");
    }
    // 505: not HTTP/1.x.
    for version in ["HTTP/2.0", "HTTP/3.0"] {
        raw(format!("GET /health {version}\r\nHost: t\r\n\r\n").as_bytes())
            .assert_error(505, "http_version_not_supported");
    }
    // The api row counts the errors.
    let row = api.row();
    assert!(field(&row, "api_errors") >= 40, "{row}");
}

#[test]
fn publishes_over_the_rate_get_429_with_retry_after() {
    let api = Api::start(ApiOpts { workers: 1, ..ApiOpts::api("publishes_per_second = 1\npublishes_burst = 3") });
    let start = Instant::now();
    let mut ok = 0u64;
    let limited = (0..30).find_map(|_| {
        let resp = api.publish(&json!({"group":"r","message":"m"}));
        match resp.status {
            200 => {
                ok += 1;
                None
            }
            _ => Some(resp),
        }
    });
    let limited = limited.expect("a 429 within 30 publishes at 1/s with a burst of 3");
    limited.assert_error(429, "rate_limited");
    assert_eq!(limited.header("retry-after"), Some("1"), "{limited}");
    let refills = start.elapsed().as_secs() + 1;
    assert!((3..=3 + refills).contains(&ok), "{ok} publishes before the first 429 ({refills} s of refill)");
    // Each group counts: 3 groups need 3 tokens, the bucket has at most 1 or 2 now.
    let resp = api.publish(&json!({"groups":["a","b","c"],"message":"m"}));
    resp.assert_error(429, "rate_limited");
    // Other endpoints are not limited.
    for _ in 0..5 {
        api.get("/api/groups/r").assert_ok();
    }
    assert!(field(&api.row(), "api_rate_limited") >= 2, "{}", api.row());
}

#[test]
fn one_connection_over_max_connections_gets_503_and_is_closed() {
    let api = Api::start(ApiOpts { workers: 1, ..ApiOpts::api("max_connections = 2") });
    let mut a = api.raw();
    let mut b = api.raw();
    for c in [&mut a, &mut b] {
        assert_eq!(c.request(&request("GET", "/health", "", None)).status, 200);
    }
    // The api row counts the HTTP connections open.
    let count = |n: u64| {
        api.server.wait_status(&format!("{n} HTTP connections in the api row"), |r| {
            api_row(r).is_some_and(|a| a["connections"] == n)
        })
    };
    count(2);
    let mut third = api.raw();
    third.send(&request("GET", "/health", "", None));
    third.response().assert_error(503, "too_many_connections");
    third.expect_closed();
    // The two others still work; once one goes, a new one is served.
    assert_eq!(a.request(&request("GET", "/health", "", None)).status, 200);
    drop(b);
    count(1);
    wait_for("a connection to be served after one closed", TIMEOUT, || {
        let mut c = api.raw();
        c.send(&request("GET", "/health", "", None));
        (c.read_response().ok()?.status == 200).then_some(())
    });
}

// ---- slow and silent clients, keep-alive ------------------------------------------------------

#[test]
fn silent_and_slow_clients_do_not_delay_others_and_are_timed_out() {
    const TIMEOUT_MS: u64 = 3000;
    let api = Api::start(ApiOpts {
        workers: 1,
        ..ApiOpts::api(&format!("request_timeout_ms = {TIMEOUT_MS}\nkeepalive_timeout_ms = {TIMEOUT_MS}"))
    });
    let opened = Instant::now();
    let mut silent: Vec<HttpConn> = (0..10).map(|_| api.raw()).collect();
    let mut partial_head = api.raw();
    partial_head.send(b"GET /health HTTP/1.1\r\nHost: t\r\n");
    let mut partial_body = api.raw();
    partial_body.send(
        b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"gro",
    );
    // A slow loris: one byte of a never-ending head every 50 ms, on a thread of its own.
    let mut loris = api.raw();
    loris.send(b"GET /health HTTP/1.1\r\n");
    let writer = loris.stream.try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut w = writer;
            let deadline = Instant::now() + TIMEOUT;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                if w.write_all(b"X").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Another client is served, many times, while they hang.
    let mut other = api.raw();
    for i in 0..20 {
        let resp = other.request(&request("GET", "/api/groups/x", "", None));
        assert_eq!(resp.status, 200, "request {i}: {resp}");
    }
    api.publish(&json!({"group":"x","message":"m"})).assert_ok();
    if opened.elapsed() < Duration::from_millis(TIMEOUT_MS) {
        // Still within their timeout: they are open, nothing was answered to them.
        for (i, c) in silent.iter_mut().enumerate() {
            assert!(c.still_open(), "silent client {i} was closed or answered early");
        }
        assert!(partial_head.still_open() && partial_body.still_open());
    } else {
        eprintln!("the machine is slow: not checking that the silent clients are still open");
    }
    // Then every one of them is closed; those that started a request get a 408 first.
    for (i, c) in silent.iter_mut().enumerate() {
        let got = c.expect_closed();
        assert!(got.is_empty() || String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408 "), "silent {i}: {got:?}");
    }
    for (name, c) in
        [("partial head", &mut partial_head), ("partial body", &mut partial_body), ("slow loris", &mut loris)]
    {
        c.response().assert_error(408, "request_timeout");
        let rest = c.expect_closed();
        assert!(rest.is_empty(), "{name}: {rest:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickle.join().unwrap();
    // An idle keep-alive connection is closed without an answer.
    let mut idle = api.raw();
    assert_eq!(idle.request(&request("GET", "/health", "", None)).status, 200);
    assert!(idle.expect_closed().is_empty(), "an idle connection is closed silently");
    // The other client was kept alive all along (it may have idled past the keep-alive by now).
    let row = api.row();
    assert!(field(&row, "api_errors") >= 3, "{row}");
}

#[test]
fn keep_alive_pipelining_and_connection_close() {
    let api = Api::start(ApiOpts { config: FAST.into(), workers: 2, ..ApiOpts::default() });
    let mut g1 = Client::connect(api.server.addr);
    let mut g2 = [Client::connect(api.server.addr), Client::connect(api.server.addr)];
    g1.add_group(&json!("g1"));
    g1.sync_quiet();
    for c in g2.iter_mut() {
        c.add_group(&json!("g2"));
        c.sync_quiet();
    }
    api.server.wait_subscriptions(3);
    // Many requests on one connection.
    let mut c = api.raw();
    for i in 0..200 {
        let resp = c.request(&request("GET", "/api/groups/g2", "", None));
        assert_eq!(resp.json()["members"], 2, "request {i}: {resp}");
    }
    // Through ureq's connection pool too.
    for _ in 0..50 {
        api.get("/health").assert_ok();
    }
    // Pipelined: written at once, answered in order.
    let mut all = Vec::new();
    all.extend(request("GET", "/api/groups/g1", "", None));
    all.extend(request("GET", "/nope", "", None));
    all.extend(request("POST", "/api/publish", "", Some(r#"{"group":"g1","message":"piped"}"#)));
    all.extend(request("GET", "/api/groups/g2", "", None));
    all.extend(request("POST", "/api/publish", "", Some("{")));
    all.extend(request("GET", "/health", "", None));
    all.extend(request("GET", "/api/groups/g0", "Connection: close\r\n", None));
    all.extend(request("GET", "/health", "", None)); // after the close: not answered
    let mut c = api.raw();
    assert!(c.send(&all));
    let answers: Vec<Resp> = (0..7).map(|_| c.response()).collect();
    assert_eq!(answers[0].json()["members"], 1, "{}", answers[0]);
    answers[1].assert_error(404, "not_found");
    assert_eq!(answers[2].json()["offset"], 1, "{}", answers[2]);
    assert_eq!(answers[3].json()["members"], 2, "{}", answers[3]);
    answers[4].assert_error(400, "invalid_json");
    assert_eq!(answers[5].json(), json!({"ok":true}));
    assert_eq!(answers[6].json()["group"], "g0");
    assert!(answers[6].header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")), "{}", answers[6]);
    assert!(c.expect_closed().is_empty(), "nothing is answered after Connection: close");
    assert_eq!(g1.recv(), "piped");
    // Connection: close alone.
    let mut c = api.raw();
    assert_eq!(c.request(&request("GET", "/health", "Connection: close\r\n", None)).status, 200);
    assert!(c.expect_closed().is_empty());
    // HTTP/1.0 closes unless keep-alive.
    let mut c = api.raw();
    assert_eq!(c.request(b"GET /health HTTP/1.0\r\n\r\n").status, 200);
    assert!(c.expect_closed().is_empty());
    let mut c = api.raw();
    for _ in 0..3 {
        assert_eq!(c.request(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").status, 200);
    }
    // Expect: 100-continue gets its 100 once the head is accepted, then the answer.
    let mut c = api.raw();
    let body = r#"{"group":"g2","message":"after 100"}"#;
    c.send(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    while !interim.ends_with(b"\r\n\r\n") {
        use std::io::Read;
        assert_eq!(c.stream.read(&mut byte).expect("the 100 Continue"), 1, "closed before 100: {interim:?}");
        interim.push(byte[0]);
    }
    assert!(interim.starts_with(b"HTTP/1.1 100 "), "{:?}", String::from_utf8_lossy(&interim));
    c.send(body.as_bytes());
    c.response().assert_ok();
    for m in g2.iter_mut() {
        assert_eq!(m.recv(), "after 100");
    }
    // An oversized body with Expect gets its 413 instead of the 100.
    c.send(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 99999999\r\n\r\n");
    c.response().assert_error(413, "body_too_large");
    // An error that does not end the connection (404) keeps it.
    let mut c = api.raw();
    c.request(&request("GET", "/nope", "", None)).assert_error(404, "not_found");
    assert_eq!(c.request(&request("GET", "/health", "", None)).status, 200);
}

// ---- the bus, readiness -----------------------------------------------------------------------

#[test]
fn ready_and_publish_follow_the_bus() {
    let secret_dir = TempDir::new("api-bus-secret");
    let secret = write_secret(secret_dir.path());
    let broker = Broker::start("api-bus");
    let addr = broker.addr;
    let api = Api::start(ApiOpts {
        config: FAST.into(),
        extra: connect_args(addr, &secret),
        ..ApiOpts::api("publish_timeout_ms = 1000")
    });
    let ready = || api.call_with("GET", "/ready", None, None);
    let resp = ready();
    assert_eq!((resp.status, resp.json()), (200, json!({"ready":true})), "{resp}");
    let mut member = Client::connect(api.server.addr);
    member.add_group(&json!("room"));
    member.sync_quiet();
    broker.wait_memberships(1);
    api.publish(&json!({"group":"room","message":"before"})).assert_ok();
    assert_eq!(member.recv(), "before");

    // The broker goes: not ready, and publishes are refused.
    drop(broker);
    let resp = wait_for("/ready to say 503", TIMEOUT, || {
        let r = ready();
        (r.status != 200).then_some(r)
    });
    resp.assert_error(503, "not_ready");
    assert_eq!(resp.json()["ready"], false, "{resp}");
    let mut refused = Vec::new();
    let got = wait_for("a publish refused with bus_unavailable", TIMEOUT, || {
        let n = refused.len();
        let r = api.publish(&json!({"group":"room","message":format!("during-{n}")}));
        assert_eq!(r.status, 503, "{r}");
        let code = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(code == "bus_unavailable" || code == "publish_timeout", "{r}");
        refused.push((format!("during-{n}"), code.clone()));
        (code == "bus_unavailable").then_some(r)
    });
    got.assert_error(503, "bus_unavailable");

    // It comes back on the same address: ready again, publishes go through.
    let broker =
        Broker::start_with("api-bus-again", BrokerOpts { listen: Some(addr.to_string()), ..BrokerOpts::default() });
    wait_for("/ready to say 200 again", TIMEOUT, || (ready().status == 200).then_some(()));
    assert_eq!(ready().json(), json!({"ready":true}));
    broker.wait_memberships(1);
    let r = wait_for("a publish to go through", TIMEOUT, || {
        let r = api.publish(&json!({"group":"room","message":"after"}));
        (r.status == 200).then_some(r)
    });
    r.assert_ok();
    // The member gets "after"; of the refused ones, only those that timed out may arrive.
    let maybe: BTreeSet<String> =
        refused.iter().filter(|(_, c)| c == "publish_timeout").map(|(m, _)| m.clone()).collect();
    loop {
        let m = member.recv();
        if m == "after" {
            break;
        }
        assert!(maybe.contains(&m), "{m:?} was refused with bus_unavailable yet delivered");
    }
}

// ---- config -------------------------------------------------------------------------------------

#[test]
fn a_bad_api_config_is_refused_naming_the_key() {
    let port = free_port();
    refused(&format!("[api]\nlisten = \"0.0.0.0:{port}\"\n"), "api.listen");
    let dir = TempDir::new("api-badkey");
    let short = dir.join("short.key");
    std::fs::write(&short, "0123456789abcde\n").unwrap(); // 15 bytes after the newline goes
    let long = dir.join("long.key");
    std::fs::write(&long, "k".repeat(4097)).unwrap();
    let missing = dir.join("missing.key");
    for file in [&short, &long, &missing] {
        refused(
            &format!("[api]\nlisten = \"127.0.0.1:{port}\"\nkey_file = {:?}\n", file.to_str().unwrap()),
            "api.key_file",
        );
    }
    for (key, value) in [
        ("max_connections", "0"),
        ("max_connections", "100001"),
        ("max_header_bytes", "1023"),
        ("max_header_bytes", "1048577"),
        ("request_timeout_ms", "99"),
        ("keepalive_timeout_ms", "99"),
        ("publish_timeout_ms", "99"),
        ("publishes_per_second", "0"),
        ("publishes_per_second", "10000001"),
        ("publishes_burst", "0"),
        ("publishes_burst", "10000001"),
    ] {
        refused(&format!("[api]\nlisten = \"127.0.0.1:{port}\"\n{key} = {value}\n"), &format!("api.{key}"));
    }
    refused(&format!("[api]\nlisten = \"127.0.0.1:{port}\"\nno_such_key = 1\n"), "no_such_key");
}

#[test]
fn a_remote_listen_with_a_key_and_the_status_show_the_api() {
    // A key file allows any address (0.0.0.0 is served on loopback too); 16 bytes is enough.
    let dir = TempDir::new("api-remote");
    let key_file = dir.join("k");
    std::fs::write(&key_file, "0123456789abcdef\n").unwrap();
    let port = free_port();
    let config = format!(
        "[api]\nlisten = \"0.0.0.0:{port}\"\nkey_file = {:?}\nmax_connections = 77\nrequest_timeout_ms = 1234\n",
        key_file.to_str().unwrap()
    );
    let server = Server::start_with(Opts { config: Some(config), ..Opts::workers(1) });
    let report = server.wait_status("the api row to run", |r| api_row(r).is_some_and(|a| a["state"] == "running"));
    let row = api_row(&report).unwrap();
    assert!(row["index"].is_null(), "{row}");
    assert!(row["pid"].as_u64().is_some_and(|p| p > 0 && p != u64::from(server.master_pid)), "{row}");
    let a = &report["api"];
    assert_eq!(a["listen"], format!("0.0.0.0:{port}"), "{a}");
    assert_eq!(report["api_listen"], format!("0.0.0.0:{port}"), "{report}");
    assert_eq!(a["max_connections"], 77, "{a}");
    assert_eq!(a["request_timeout_ms"], 1234, "{a}");
    assert_eq!(a["max_header_bytes"], 16384, "{a}");
    assert_eq!(a["keepalive_timeout_ms"], 30000, "{a}");
    assert_eq!(a["publish_timeout_ms"], 5000, "{a}");
    assert_eq!(a["publishes_per_second"], 100000, "{a}");
    assert_eq!(a["publishes_burst"], 200000, "{a}");
    assert_eq!(a["demo"], false, "{a}");
    let text = server.cli(&["status", "--json"]).stdout;
    assert!(!text.contains("0123456789abcdef"), "status shows the key:\n{text}");
    let table = server.cli(&["status"]).stdout;
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some("api"))
        .unwrap_or_else(|| panic!("no api row:\n{table}"));
    assert!(line.contains(&row["pid"].to_string()) && line.contains("running"), "{line}");
    // The key is required, and the right one works.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = HttpConn::connect(addr);
    c.request(&request("GET", "/api/connections", "", None)).assert_error(401, "unauthorized");
    let resp = c.request(&request("GET", "/api/connections", "Authorization: Bearer 0123456789abcdef\r\n", None));
    assert_eq!(resp.status, 200, "{resp}");
    // Without [api], no api process and no api listener.
    let plain = Server::start_with(Opts::workers(1));
    assert!(api_row(&plain.status()).is_none(), "an api row without [api]");
}

/// Sends SIGCONT to a process this test stopped, panics included.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

#[test]
fn a_publish_the_bus_does_not_number_in_time_gets_503_publish_timeout() {
    let api = Api::start(ApiOpts { workers: 1, config: FAST.into(), ..ApiOpts::api("publish_timeout_ms = 1000") });
    let mut member = Client::connect(api.server.addr);
    member.add_group(&json!("t"));
    member.sync_quiet();
    api.server.wait_subscriptions(1);
    let first = api.publish(&json!({"group":"t","message":"numbered"}));
    assert_eq!(first.assert_ok()["offset"], 1, "{first}");
    assert_eq!(member.recv(), "numbered");
    // The channel server stops (SIGSTOP): its connections stay up, nothing gets numbered.
    let channel = channel_pid(&api.server.status());
    signal(channel, libc::SIGSTOP);
    let resume = Resume(channel);
    wait_for("the channel server to be stopped", TIMEOUT, || (proc_state(channel) == Some('T')).then_some(()));
    let resp = api.publish(&json!({"group":"t","message":"late"}));
    resp.assert_error(503, "publish_timeout");
    // Other requests are not held up by the waiting publish (the api does not block on it).
    assert_eq!(api.call_with("GET", "/health", None, None).status, 200);
    drop(resume);
    // Once it runs again, the publish that timed out may be delivered (documented), and new
    // ones are numbered after it.
    let next = wait_for("a publish to be numbered again", TIMEOUT, || {
        let r = api.publish(&json!({"group":"t","message":"again"}));
        (r.status == 200).then_some(r)
    });
    let offset = next.json()["offset"].as_u64().unwrap_or_else(|| panic!("{next}"));
    assert!(offset >= 2, "{next}");
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("again") {
        got.push(member.recv());
    }
    assert!(got.iter().all(|m| m == "late" || m == "again"), "{got:?}");
    assert!(got.iter().filter(|m| *m == "late").count() <= 1, "delivered twice: {got:?}");
}

#[test]
fn the_api_process_is_restarted_and_replaced_at_reload_without_refusing_a_request() {
    let api = Api::start(ApiOpts { workers: 1, ..ApiOpts::default() });
    let first = field(&api.row(), "pid") as u32;
    // Killed: the master starts another; the listener stays bound meanwhile.
    signal(first, libc::SIGKILL);
    let second = wait_for("a new api process", TIMEOUT, || {
        let row = api_row(&api.server.status())?;
        let pid = row["pid"].as_u64()? as u32;
        (pid != first && pid != 0 && row["state"] == "running").then_some(pid)
    });
    let row = api.row();
    assert_eq!(field(&row, "restarts"), 1, "the restart is counted: {row}");
    api.wait_api_running();
    // A reload replaces it; requests made all along are every one answered.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = api.addr;
    // Four clients, each opening a connection per request, all along the reload.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut answered = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut c = HttpConn::connect(addr);
                    match c.read_response_to(&request("GET", "/health", "Connection: close\r\n", None)) {
                        Ok(r) if r.status == 200 => answered += 1,
                        other => return Err(format!("after {answered} answers: {other:?}")),
                    }
                }
                Ok(answered)
            })
        })
        .collect();
    let run = api.server.cli(&["reload"]);
    assert_eq!(run.code, Some(0), "reload: {run:?}");
    let third = wait_for("the api process replaced by the reload", TIMEOUT, || {
        let row = api_row(&api.server.status())?;
        let pid = row["pid"].as_u64()? as u32;
        (pid != second && row["state"] == "running").then_some(pid)
    });
    // A few more requests to the new process, then stop.
    let more = Instant::now();
    while more.elapsed() < Duration::from_millis(300) {
        assert_eq!(api.call_with("GET", "/health", None, None).status, 200);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        let answered =
            client.join().unwrap().unwrap_or_else(|e| panic!("a request was not answered across the reload: {e}"));
        assert!(answered > 0);
    }
    wait_for("the old api process to exit", TIMEOUT, || (!alive(second)).then_some(()));
    assert!(alive(third));
}

#[test]
fn a_master_that_does_not_answer_gets_503_master_unavailable_and_health_still_answers() {
    let api = Api::start(ApiOpts { workers: 1, config: "status_timeout_ms = 500\n".into(), ..ApiOpts::default() });
    api.get("/api/groups/x").assert_ok();
    // The master stops (SIGSTOP): its control socket accepts, nobody answers.
    let master = api.server.master_pid;
    signal(master, libc::SIGSTOP);
    let resume = Resume(master);
    wait_for("the master to be stopped", TIMEOUT, || (proc_state(master) == Some('T')).then_some(()));
    let mut waiting = api.raw();
    waiting.send(&request("GET", "/api/groups/x", "", None));
    // Meanwhile the api process serves what does not need the master.
    let mut other = api.raw();
    for _ in 0..5 {
        assert_eq!(other.request(&request("GET", "/health", "", None)).status, 200);
    }
    api.publish(&json!({"group":"x","message":"the bus needs no master"})).assert_ok();
    waiting.response().assert_error(503, "master_unavailable");
    for path in ["/api/connections", "/api/groups/y"] {
        api.get(path).assert_error(503, "master_unavailable");
    }
    let ready = api.get("/ready");
    assert_eq!(ready.status, 503, "{ready}");
    drop(resume);
    wait_for("the master to answer again", TIMEOUT, || (api.get("/api/groups/x").status == 200).then_some(()));
}

#[test]
fn the_api_listen_flag_starts_the_api_and_is_checked_like_the_key() {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = Server::start_with(Opts { extra: vec!["--api-listen".into(), addr.to_string()], ..Opts::workers(1) });
    server.wait_status("the api row to run", |r| api_row(r).is_some_and(|a| a["state"] == "running"));
    let health = wait_for("/health on the flag's address", TIMEOUT, || {
        let mut c = HttpConn::try_connect(addr)?;
        c.read_response_to(&request("GET", "/health", "", None)).ok()
    });
    assert_eq!((health.status, health.json()), (200, json!({"ok":true})));
    assert_eq!(server.status()["api"]["listen"], addr.to_string());
    // Beyond loopback without a key file: refused at load, naming api.listen.
    let dir = TempDir::new("api-flag");
    let pid_file = dir.join("g.pid");
    let remote = format!("0.0.0.0:{}", free_port());
    let run = run_timed(
        &["start", "--listen", "127.0.0.1:0", "--api-listen", &remote, "--pid-file", pid_file.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("api.listen"), "{run:?}");
    assert!(!pid_file.exists());
}

#[test]
fn the_demo_config_names_the_bound_port_when_listen_asks_for_any() {
    // `--listen 127.0.0.1:0`: the kernel picks the WebSocket port; the page must get that one.
    let api = Api::start(ApiOpts { workers: 1, ..ApiOpts::api("demo = true") });
    assert_ne!(api.server.addr.port(), 0);
    let resp = api.get("/demo/config.json");
    assert_eq!(resp.json(), json!({"ws_port": api.server.addr.port(), "wss_port": null}), "{resp}");
}

#[test]
fn publish_through_the_api_reaches_both_instances_on_redis() {
    let port = free_port();
    let Some(redis) = Redis::start(port, None) else { return };
    let config = format!("bus = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:{port}/\"\nprefix = \"gc-api:\"\n{FAST}");
    let a = Api::start(ApiOpts { config: config.clone(), ..ApiOpts::default() });
    let b = Api::start(ApiOpts { config, ..ApiOpts::default() });
    let mut members = room_members_on_every_worker(&a, &b);
    // Every worker of both instances subscribes to the group's channel.
    wait_for("4 subscribers of the group's Redis channel", TIMEOUT, || {
        let answer = redis.command("PUBSUB NUMSUB gc-api:room");
        let subscribers: u64 = answer.lines().last()?.trim_start_matches(':').parse().ok()?;
        (subscribers >= 4).then_some(())
    });
    for (i, api) in [&a, &b].into_iter().enumerate() {
        let message = json!({"via": "redis", "from": i});
        let resp = api.publish(&json!({"group":"room","message":message}));
        assert_eq!(resp.assert_ok()["ok"], true, "{resp}");
        for (who, c) in members.iter_mut() {
            assert_eq!(parse(&c.recv()), message, "{who}");
        }
    }
    for (who, c) in members.iter_mut() {
        assert!(c.sync().is_empty(), "{who}: nothing twice");
    }
}

#[test]
fn ready_says_503_while_a_worker_does_not_serve() {
    let api = Api::start(ApiOpts { workers: 2, config: "status_timeout_ms = 500\n".into(), ..ApiOpts::default() });
    let ready = || api.call_with("GET", "/ready", None, None);
    assert_eq!(ready().status, 200);
    // A worker that stops answering (SIGSTOP) does not serve: not ready, and the detail names it.
    let worker = worker_pids(&api.server.status())[1];
    signal(worker, libc::SIGSTOP);
    let resume = Resume(worker);
    let resp = wait_for("/ready to say 503", TIMEOUT, || {
        let r = ready();
        (r.status == 503).then_some(r)
    });
    resp.assert_error(503, "not_ready");
    assert_eq!(resp.json()["ready"], false, "{resp}");
    assert!(resp.json()["detail"].as_str().is_some_and(|d| d.contains('1')), "names worker 1: {resp}");
    drop(resume);
    wait_for("/ready to say 200 again", TIMEOUT, || (ready().status == 200).then_some(()));
    assert_eq!(ready().json(), json!({"ready":true}));
}

#[test]
fn a_client_that_half_closes_after_its_requests_gets_its_answers_and_the_close() {
    // Timeouts far beyond the test's deadline: only the client's FIN can end these connections.
    let api = Api::start(ApiOpts {
        workers: 1,
        ..ApiOpts::api("request_timeout_ms = 600000\nkeepalive_timeout_ms = 600000")
    });
    let publish = request("POST", "/api/publish", "", Some(r#"{"group":"h","message":"m"}"#));
    let health = request("GET", "/health", "", None);
    for (what, bytes, answers) in [
        ("one request", health.clone(), 1),
        ("two pipelined", [health.clone(), request("GET", "/api/groups/h", "", None)].concat(), 2),
        ("a publish", publish, 1),
    ] {
        let mut c = api.raw();
        c.send(&bytes);
        c.shutdown_write();
        for i in 0..answers {
            assert_eq!(c.response().status, 200, "{what}: answer {i}");
        }
        assert!(c.expect_closed().is_empty(), "{what}: nothing more");
    }
}
