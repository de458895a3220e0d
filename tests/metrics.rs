//! `GET /metrics` on the API listener against the real binary: clients on both workers join
//! and publish (over WebSocket and `POST /api/publish`), then the text is read by a real
//! parser (Python's `prometheus_client`, Debian's python3-prometheus-client) and its values
//! are checked against what the test did.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const KEY: &str = "metrics-test-key-0123456789abcdef";

/// One HTTP/1.1 request with `Connection: close`: (status, head, body).
fn http(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the API");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(key) = key {
        request += &format!("Authorization: Bearer {key}\r\n");
    }
    let body = body.map(Value::to_string).unwrap_or_default();
    if method == "POST" {
        request += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    }
    request += "\r\n";
    request += &body;
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read the answer");
    let answer = String::from_utf8(answer).expect("UTF-8 answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a complete answer");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, head.to_owned(), body.to_owned())
}

/// Sample name, labels and value.
type Sample = (String, BTreeMap<String, String>, f64);

/// The samples of `text` as Python's `prometheus_client` parser reads them, or `None` (test
/// skipped; a failure under CI) when no python3 here has the module.
fn parse(text: &str, dir: &TempDir) -> Option<Vec<Sample>> {
    let file = dir.join("metrics.txt");
    std::fs::write(&file, text).unwrap();
    const SCRIPT: &str = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        fams = text_string_to_metric_families(open(sys.argv[1]).read())\n\
        print(json.dumps([[s.name, s.labels, s.value] for f in fams for s in f.samples]))";
    // Debian's package is in the system python3, which a pyenv shim may come before.
    for python in ["python3", "/usr/bin/python3"] {
        let has = Command::new(python).args(["-c", "import prometheus_client"]).output();
        if !has.is_ok_and(|o| o.status.success()) {
            continue;
        }
        let out = Command::new(python).args(["-c", SCRIPT]).arg(&file).output().unwrap();
        assert!(out.status.success(), "the parser refused the text: {}\n{text}", String::from_utf8_lossy(&out.stderr));
        return Some(serde_json::from_slice(&out.stdout).unwrap());
    }
    skip_or_fail("python3 with prometheus_client not found (Debian: python3-prometheus-client)");
    None
}

/// Values of samples named `name` whose labels include `labels`, in text order.
fn values(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| *v)
        .collect()
}

fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    values(samples, name, labels).iter().sum()
}

#[test]
fn metrics_match_what_the_clients_and_the_api_did() {
    let keys = TempDir::new("metrics-key");
    let key_file = keys.join("api.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let config = format!("[api]\nlisten = \"127.0.0.1:0\"\nkey_file = \"{}\"\n", key_file.display());
    let server = Server::start_with(Opts { config: Some(config), ..Opts::workers(2) });
    let api: SocketAddr = server.status()["api_listen"].as_str().and_then(|a| a.parse().ok()).expect("api_listen");
    wait_for("the API to answer /health", TIMEOUT, || (http(api, "GET", "/health", None, None).0 == 200).then_some(()));

    let (status, head, _) = http(api, "GET", "/metrics", None, None);
    assert_eq!(status, 401, "no key: {head}");
    assert!(head.to_ascii_lowercase().contains("www-authenticate: bearer"), "{head}");
    assert_eq!(http(api, "GET", "/metrics", Some("wrong-key-wrong-key-wrong"), None).0, 401);

    // Clients on both workers: every one joins "room", the first three "side" too.
    let (mut clients, on) = server.connect_spread(2);
    let n = clients.len();
    assert!(on.contains(&0) && on.contains(&1), "clients on both workers: {on:?}");
    for (i, c) in clients.iter_mut().enumerate() {
        c.add_group(&json!("room"));
        if i < 3 {
            c.add_group(&json!("side"));
        }
    }
    server.wait_subscriptions(n as u64 + 3);

    // 3 publishes over WebSocket, 2 to "room" and 1 to "side" through the API.
    for i in 0..3 {
        clients[0].send_to_group(&json!("room"), &format!("ws-{i}"));
    }
    for i in 0..2 {
        let (status, _, body) =
            http(api, "POST", "/api/publish", Some(KEY), Some(&json!({"group":"room","message":format!("api-{i}")})));
        assert_eq!(status, 200, "{body}");
    }
    let (status, _, body) =
        http(api, "POST", "/api/publish", Some(KEY), Some(&json!({"groups":["side"],"message":"s"})));
    assert_eq!(status, 200, "{body}");
    // Every member gets every message of its groups (the sender too: it is a member).
    let mut delivered = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        let expected = if i < 3 { 6 } else { 5 };
        for _ in 0..expected {
            c.recv();
        }
        delivered += expected;
    }

    let (status, head, text) = http(api, "GET", "/metrics", Some(KEY), None);
    assert_eq!(status, 200, "{head}\n{text}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    let Some(samples) = parse(&text, &server.dir) else { return };
    let worker = [("role", "worker")];

    assert_eq!(sum(&samples, "groupcast_workers", &[]), 2.0);
    assert_eq!(sum(&samples, "groupcast_connections", &worker), n as f64, "{text}");
    for index in ["0", "1"] {
        let here = on.iter().filter(|w| w.to_string() == index).count();
        assert_eq!(
            values(&samples, "groupcast_connections", &[("role", "worker"), ("index", index)]),
            vec![here as f64]
        );
    }
    assert_eq!(sum(&samples, "groupcast_memberships", &worker), (n + 3) as f64);
    assert_eq!(sum(&samples, "groupcast_messages_in_total", &worker), (n + 3 + 3) as f64, "joins and publishes");
    assert_eq!(sum(&samples, "groupcast_published_total", &worker), 3.0);
    assert_eq!(values(&samples, "groupcast_published_total", &[("role", "api")]), vec![3.0]);
    assert_eq!(sum(&samples, "groupcast_messages_out_total", &worker), delivered as f64, "deliveries");
    assert!(
        values(&samples, "groupcast_api_requests_total", &[("role", "api")])[0] >= 6.0,
        "health, 2 x 401, 3 publishes"
    );
    assert!(values(&samples, "groupcast_api_errors_total", &[("role", "api")])[0] >= 2.0, "the two 401s");
    assert_eq!(sum(&samples, "groupcast_reloads_total", &[]), 0.0);
    assert_eq!(sum(&samples, "groupcast_processes", &[("state", "running")]), 5.0, "master, channel, api, 2 workers");
    assert!(sum(&samples, "groupcast_resident_memory_bytes", &[("role", "master")]) > 0.0);
    assert_eq!(sum(&samples, "groupcast_slow_closed_total", &worker), 0.0);

    for histogram in ["groupcast_publish_to_write_seconds", "groupcast_send_queue_bytes"] {
        let mut writes = 0.0;
        for index in ["0", "1"] {
            let labels = [("role", "worker"), ("index", index)];
            let count = values(&samples, &format!("{histogram}_count"), &labels);
            assert_eq!(count.len(), 1, "{histogram} of worker {index}");
            assert!(count[0] > 0.0, "{histogram} of worker {index} counted writes");
            let buckets: Vec<(f64, f64)> = samples
                .iter()
                .filter(|(name, l, _)| *name == format!("{histogram}_bucket") && l["index"] == index)
                .map(|(_, l, v)| (l["le"].parse::<f64>().unwrap(), *v))
                .collect();
            assert!(buckets.len() >= 2);
            assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{histogram}: {buckets:?}");
            assert_eq!(buckets.last().map(|b| b.0), Some(f64::INFINITY));
            assert_eq!(buckets.last().map(|b| b.1), Some(count[0]), "le=+Inf is the count");
            assert!(values(&samples, &format!("{histogram}_sum"), &labels)[0] > 0.0);
            writes += count[0];
        }
        // Each client got frames (its 101 answer, its messages): at least one write each.
        assert!(writes >= n as f64, "{histogram}: {writes} writes for {n} clients");
    }
    // The delays are real: a loopback delivery takes well under the 10 s top bound.
    let within_10s: f64 = samples
        .iter()
        .filter(|(name, l, _)| name == "groupcast_publish_to_write_seconds_bucket" && l["le"].parse() == Ok(10.0))
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(within_10s, sum(&samples, "groupcast_publish_to_write_seconds_count", &worker));
}
