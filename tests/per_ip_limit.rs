//! `limits.max_connections_per_ip` (issue 11, point 5): one address holds at most that many
//! connections on the whole instance, whichever workers the kernel hands them to; the next is
//! answered 503 at accept and counted as `per_ip_refused`; a closed connection frees its place;
//! a worker killed with SIGKILL stops counting; addresses in `limits.per_ip_exempt` (loopback
//! by default) are not capped. Clients come from distinct loopback addresses (127.0.0.2, ...)
//! by binding the source address before connecting.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::json;
use socket2::{Domain, Socket, Type};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A TCP connection to `addr` from the loopback address `from`.
fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let source: IpAddr = from.parse().expect("source address");
    socket.bind(&SocketAddr::new(source, 0).into()).expect("bind the source address");
    socket.connect(&addr.into()).expect("connect to groupcast");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    stream
}

/// A WebSocket from `from`, upgraded (panics if refused).
fn open_from(from: &str, addr: SocketAddr) -> RawWs {
    RawWs::upgrade(connect_from(from, addr))
}

/// What the server says to a connection from `from` without a request being sent: a refused
/// one is answered at accept and closed.
fn refusal_from(from: &str, addr: SocketAddr) -> String {
    let mut stream = connect_from(from, addr);
    let mut out = Vec::new();
    match stream.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset && !out.is_empty() => {}
        Err(e) => panic!("no refusal for {from}: {e} (got {:?})", String::from_utf8_lossy(&out)),
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn capped_server(workers: usize, limits: &str) -> Server {
    Server::start_with(Opts { config: Some(format!("[limits]\n{limits}\n")), ..Opts::workers(workers) })
}

fn per_ip_refused(server: &Server) -> u64 {
    field(&server.status()["totals"], "per_ip_refused")
}

#[test]
fn an_address_over_the_cap_gets_503_whichever_worker_accepts_it() {
    let server = capped_server(2, "max_connections_per_ip = 6\nper_ip_exempt = [\"127.0.0.1/32\"]");
    let held: Vec<RawWs> = (0..6).map(|_| open_from("127.0.0.2", server.addr)).collect();
    // Counting per worker only would let most of these through (each worker holds about 3).
    for n in 1..=6u64 {
        let answer = refusal_from("127.0.0.2", server.addr);
        assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer}");
        assert!(answer.contains("\r\nRetry-After: 5\r\n"), "{answer}");
        assert!(answer.ends_with("too many connections from your address\n"), "{answer}");
        assert_eq!(per_ip_refused(&server), n);
    }
    // Another address has its own count; the exempt one has none.
    let others: Vec<RawWs> = (0..6).map(|_| open_from("127.0.0.3", server.addr)).collect();
    let exempt: Vec<RawWs> = (0..8).map(|_| open_from("127.0.0.1", server.addr)).collect();
    let report = server.status();
    assert_eq!(field(&report["totals"], "connections"), 20);
    assert_eq!(field(&report["totals"], "per_ip_refused"), 6);
    assert_eq!(report["limits"]["max_connections_per_ip"], 6);
    assert_eq!(report["limits"]["per_ip_exempt"], json!(["127.0.0.1/32"]));
    drop((held, others, exempt));
}

#[test]
fn a_closed_connection_frees_its_place() {
    let server = capped_server(2, "max_connections_per_ip = 2\nper_ip_exempt = []");
    let mut first = open_from("127.0.0.4", server.addr);
    let _second = open_from("127.0.0.4", server.addr);
    assert!(refusal_from("127.0.0.4", server.addr).starts_with("HTTP/1.1 503 "));
    first.write_frame(0x88, &1000u16.to_be_bytes(), true);
    drop(first);
    server.wait_status("the closed connection is gone", |r| r["totals"]["connections"].as_u64() == Some(1));
    let mut again = open_from("127.0.0.4", server.addr);
    // The new one is a working client.
    again.send_text(r#"{"cmd":"add_group","group_id":"g","id":1}"#);
    assert_eq!(again.next_text(), r#"{"id":1,"ok":true}"#);
    assert!(refusal_from("127.0.0.4", server.addr).starts_with("HTTP/1.1 503 "), "full again");
}

#[test]
fn a_killed_workers_connections_stop_counting() {
    let server = capped_server(1, "max_connections_per_ip = 3\nper_ip_exempt = []");
    let held: Vec<RawWs> = (0..3).map(|_| open_from("127.0.0.5", server.addr)).collect();
    assert!(refusal_from("127.0.0.5", server.addr).starts_with("HTTP/1.1 503 "));
    let old = field(&worker_rows(&server.status())[0], "pid") as u32;
    signal(old, libc::SIGKILL);
    server.wait_status("worker 0 restarted", |r| {
        let rows = worker_rows(r);
        rows[0]["state"] == "running" && field(&rows[0], "pid") as u32 != old
    });
    drop(held);
    // The dead worker never released its three: the master zeroed its column when it reaped it.
    let fresh: Vec<RawWs> = (0..3).map(|_| open_from("127.0.0.5", server.addr)).collect();
    assert!(refusal_from("127.0.0.5", server.addr).starts_with("HTTP/1.1 503 "));
    assert_eq!(fresh.len(), 3);
}

#[test]
fn loopback_is_exempt_by_default_and_zero_turns_the_cap_off() {
    let server = capped_server(1, "max_connections_per_ip = 2");
    let held: Vec<RawWs> = (0..4).map(|_| open_from("127.0.0.6", server.addr)).collect();
    let report = server.status();
    assert_eq!(field(&report["totals"], "connections"), 4);
    assert_eq!(report["limits"]["per_ip_exempt"], json!(["127.0.0.0/8", "::1/128"]));
    drop(held);

    let server = capped_server(1, "max_connections_per_ip = 0\nper_ip_exempt = []");
    let held: Vec<RawWs> = (0..4).map(|_| open_from("127.0.0.7", server.addr)).collect();
    assert_eq!(per_ip_refused(&server), 0);
    drop(held);
}

#[test]
fn bad_per_ip_settings_are_refused_at_load() {
    refused("[limits]\nper_ip_exempt = [\"not a network\"]\n", "per_ip_exempt");
    refused("[limits]\nmax_connections_per_ip = -1\n", "max_connections_per_ip");
    refused("[limits]\nmax_connections_per_ip = 1000000000\n", "limits.max_connections_per_ip");
    let many: Vec<String> = (0..1025).map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256)).collect();
    refused(&format!("[limits]\nper_ip_exempt = [{}]\n", many.join(",")), "limits.per_ip_exempt");
}
