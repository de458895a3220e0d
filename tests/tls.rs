//! `wss://` (issue 11, point 6): a certificate made in the test (rcgen), real TLS WebSocket
//! clients (rustls + tungstenite), the seed protocol across workers with ws and wss clients in
//! one group, renewal by `reload` without a refused connection, a broken certificate at reload
//! and at start, what is not TLS on the TLS port, and a wss-only instance.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// A test CA and the leaf certificates it signs for `localhost` / 127.0.0.1.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// One leaf: PEM chain and key as written to the files, and its DER to compare with what the
/// server presents.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "groupcast test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn leaf(&self, name: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        // The chain: leaf first, then the CA (a chain in the file is allowed).
        Leaf {
            cert_pem: format!("{}{}", cert.pem(), self.cert.pem()),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(self.cert.der().to_vec())).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

impl Leaf {
    fn write(&self, dir: &Path) {
        std::fs::write(dir.join("cert.pem"), &self.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &self.key_pem).unwrap();
    }
}

/// `[tls]` on a free loopback port with the files in `dir`.
fn tls_config(dir: &Path, extra: &str) -> String {
    format!(
        "{extra}\n[tls]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    )
}

/// An instance serving ws and wss with `leaf`; the certificate files live in `dir`.
fn start_tls(dir: &TempDir, leaf: &Leaf, workers: usize, extra: &str) -> Server {
    leaf.write(dir.path());
    Server::start_with(Opts { config: Some(tls_config(dir.path(), extra)), ..Opts::workers(workers) })
}

fn tls_addr(server: &Server) -> SocketAddr {
    server.status()["tls_listen"].as_str().unwrap().parse().expect("status names the TLS address")
}

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A wss client: rustls over a blocking socket, tungstenite on top.
struct Wss {
    ws: WebSocket<TlsStream>,
    /// The leaf certificate the server presented.
    served: Vec<u8>,
    port: u16,
}

/// Connects and completes TLS and the WebSocket handshake; the error says which failed.
fn try_wss(addr: SocketAddr, tls: &Arc<ClientConfig>) -> Result<Wss, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(TIMEOUT)).unwrap();
    let port = tcp.local_addr().unwrap().port();
    let conn = ClientConnection::new(Arc::clone(tls), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).map_err(|e| format!("TLS handshake: {e}"))?;
    }
    let served = stream.conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    let (ws, _) = tungstenite::client::client(format!("wss://localhost:{}/", addr.port()), stream)
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
    Ok(Wss { ws, served, port })
}

impl Wss {
    fn connect(addr: SocketAddr, tls: &Arc<ClientConfig>) -> Wss {
        try_wss(addr, tls).unwrap_or_else(|e| panic!("wss://{addr}: {e}"))
    }

    fn send_json(&mut self, v: &Value) {
        self.ws.send(Message::text(v.to_string())).expect("send over wss");
    }

    /// The next text frame (pings skipped).
    fn recv(&mut self) -> String {
        loop {
            match self.ws.read().expect("read over wss") {
                Message::Text(t) => return t.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// A no-op with an id; returns the frames before its reply.
    fn sync(&mut self, tag: &str) -> Vec<String> {
        let id = format!("probe-{}-{tag}", self.port);
        self.send_json(&json!({"cmd":"leave_group","group_id":"__probe__","id":id}));
        let expected = json!({"id": id, "ok": true});
        let mut before = Vec::new();
        loop {
            let text = self.recv();
            if serde_json::from_str::<Value>(&text).ok().as_ref() == Some(&expected) {
                return before;
            }
            before.push(text);
        }
    }
}

/// The worker index holding each client, from `groupcast connections --json`.
fn workers_of(server: &Server, clients: &[Wss]) -> Vec<usize> {
    let run = server.cli(&["connections", "--json"]);
    let list: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"));
    let conns = list["connections"].as_array().unwrap();
    clients
        .iter()
        .map(|c| {
            let peer = format!("127.0.0.1:{}", c.port);
            let row = conns.iter().find(|r| r["peer"] == peer.as_str()).unwrap_or_else(|| panic!("{peer} not listed"));
            field(row, "worker") as usize
        })
        .collect()
}

fn tls_totals(server: &Server, name: &str) -> u64 {
    field(&server.status()["totals"], name)
}

#[test]
fn wss_and_ws_clients_share_a_group_across_workers() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-seed");
    let server = start_tls(&dir, &ca.leaf("one"), 2, "");
    let addr = tls_addr(&server);
    let tls = ca.client_config();
    // wss clients until both workers hold at least one.
    let mut wss = Vec::new();
    let on = loop {
        wss.push(Wss::connect(addr, &tls));
        let on = workers_of(&server, &wss);
        if on.contains(&0) && on.contains(&1) {
            break on;
        }
        assert!(wss.len() < 64, "64 wss connections did not reach both workers: {on:?}");
    };
    let mut ws = Client::connect(server.addr);
    for c in &mut wss {
        c.send_json(&json!({"cmd":"add_group","group_id":"room"}));
        assert!(c.sync("joined").is_empty());
    }
    ws.add_group(&json!("room"));
    ws.sync_quiet();
    server.wait_subscriptions(wss.len() as u64 + 1);
    assert_eq!(tls_totals(&server, "tls_connections"), wss.len() as u64);
    assert_eq!(tls_totals(&server, "connections"), wss.len() as u64 + 1);

    // From a wss client on worker 0 and one on worker 1, then from the plain client.
    let senders = [on.iter().position(|&w| w == 0).unwrap(), on.iter().position(|&w| w == 1).unwrap()];
    for (n, &s) in senders.iter().enumerate() {
        let text = format!("from wss {n}");
        wss[s].send_json(&json!({"cmd":"send_to_group","group_id":"room","message":text}));
        for c in &mut wss {
            assert_eq!(c.recv(), text);
        }
        assert_eq!(ws.recv(), text);
    }
    ws.send_to_group(&json!("room"), "from ws");
    for c in &mut wss {
        assert_eq!(c.recv(), "from ws");
    }
    assert_eq!(ws.recv(), "from ws");
    // A large message crosses several TLS records.
    let big = "x".repeat(100_000);
    ws.send_to_group(&json!("room"), &big);
    for c in &mut wss {
        assert_eq!(c.recv(), big);
    }
    assert_eq!(ws.recv(), big);
    let report = server.status();
    assert!(report["tls"]["cert_file"].as_str().unwrap().ends_with("cert.pem"), "{}", report["tls"]);
    assert_eq!(report["tls_not_after"], "2031-01-02 00:00:00 UTC");
    let text = server.cli(&["status"]);
    assert!(text.stdout.contains("tls:") && text.stdout.contains("tls handshake failures"), "{text:?}");
}

#[test]
fn renewal_by_reload_serves_the_new_certificate_and_refuses_nobody() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-renew");
    let old = ca.leaf("old");
    let server = start_tls(&dir, &old, 2, "graceful_timeout_ms = 20000");
    let addr = tls_addr(&server);
    let tls = ca.client_config();
    let mut before = Wss::connect(addr, &tls);
    assert_eq!(before.served, old.der);
    before.send_json(&json!({"cmd":"add_group","group_id":"g"}));
    assert!(before.sync("joined").is_empty());

    // Connections in a loop while the certificate is renewed: every one must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
    let looper = {
        let (stop, done, failed, tls) = (stop.clone(), done.clone(), failed.clone(), tls.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match try_wss(addr, &tls) {
                    Ok(mut c) => {
                        let _ = c.ws.close(None);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failed.lock().unwrap().push(e),
                }
            }
        })
    };
    wait_for("connections before the reload", TIMEOUT, || (done.load(Ordering::Relaxed) >= 5).then_some(()));
    let new = ca.leaf("new");
    new.write(dir.path());
    // Graceful: the old workers keep their clients (and the old certificate) while they drain.
    let reload = std::thread::spawn({
        let pid_file = server.pid_file_arg();
        let dir = dir.path().to_owned();
        move || run_timed(&["reload", "-g", "--pid-file", &pid_file], &dir)
    });
    // Worker 0 is replaced first; clients that reach the new one see the new certificate.
    let fresh = wait_for("a connection served with the new certificate", TIMEOUT, || {
        let c = Wss::connect(addr, &tls);
        (c.served == new.der).then_some(c)
    });
    drop(fresh);
    // The client from before is on its old TLS session: it keeps working until its worker is
    // replaced, then hears 1012 (reconnect) over that same session, like any client at a reload.
    let id = format!("probe-{}-during", before.port);
    before.send_json(&json!({"cmd":"leave_group","group_id":"__probe__","id":id}));
    match before.ws.read().expect("the old session still reads") {
        Message::Text(t) => assert_eq!(serde_json::from_str::<Value>(&t).unwrap(), json!({"id": id, "ok": true})),
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1012),
        other => panic!("unexpected {other:?}"),
    }
    let _ = before.ws.close(None);
    let _ = before.ws.flush();
    drop(before);
    let run = reload.join().unwrap();
    assert_eq!(run.code, Some(0), "reload: {run:?}");
    let after_reload = done.load(Ordering::Relaxed);
    wait_for("connections after the reload", TIMEOUT, || {
        (done.load(Ordering::Relaxed) >= after_reload + 5).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    looper.join().unwrap();
    assert!(failed.lock().unwrap().is_empty(), "refused during the reload: {:?}", failed.lock().unwrap());
    // Every worker serves the new one now.
    for _ in 0..8 {
        assert_eq!(Wss::connect(addr, &tls).served, new.der);
    }
}

#[test]
fn a_broken_certificate_fails_the_reload_and_the_old_workers_keep_serving() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-broken");
    let good = ca.leaf("good");
    let server = start_tls(&dir, &good, 2, "");
    let addr = tls_addr(&server);
    let tls = ca.client_config();
    let pids: Vec<u64> = worker_rows(&server.status()).iter().map(|w| field(w, "pid")).collect();
    let mut open = Wss::connect(addr, &tls);

    // Garbage instead of a certificate.
    std::fs::write(dir.join("cert.pem"), "not a certificate\n").unwrap();
    let run = server.cli(&["reload"]);
    assert_ne!(run.code, Some(0), "reload with a broken certificate: {run:?}");
    assert!(run.stderr.contains("tls.cert_file") && run.stderr.contains("no certificate"), "{run:?}");
    // A key of another certificate.
    good.write(dir.path());
    std::fs::write(dir.join("key.pem"), ca.leaf("other").key_pem).unwrap();
    let run = server.cli(&["reload"]);
    assert_ne!(run.code, Some(0), "reload with a mismatched key: {run:?}");
    assert!(run.stderr.contains("tls.key_file") && run.stderr.to_lowercase().contains("key"), "{run:?}");
    // A missing key file.
    std::fs::remove_file(dir.join("key.pem")).unwrap();
    let run = server.cli(&["reload"]);
    assert_ne!(run.code, Some(0), "reload with no key file: {run:?}");
    assert!(run.stderr.contains("cannot read tls.key_file"), "{run:?}");

    let report = server.status();
    assert_eq!(report["last_reload"]["ok"], false);
    let now: Vec<u64> = worker_rows(&report).iter().map(|w| field(w, "pid")).collect();
    assert_eq!(now, pids, "the old workers keep serving");
    assert!(open.sync("still").is_empty());
    assert_eq!(Wss::connect(addr, &tls).served, good.der);
}

#[test]
fn start_refuses_a_missing_or_broken_certificate() {
    let dir = TempDir::new("tls-start");
    let missing = tls_config(dir.path(), "");
    refused(&missing, "tls.cert_file");
    // The reason is said once, not once more by the error chain.
    let path = dir.join("g.toml");
    std::fs::write(&path, format!("listen = \"127.0.0.1:0\"\n{missing}")).unwrap();
    let run = run_timed(
        &["start", "--pid-file", dir.join("g.pid").to_str().unwrap(), "-c", path.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(run.stderr.matches("(os error 2)").count(), 1, "{run:?}");
    std::fs::write(dir.join("cert.pem"), "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
        .unwrap();
    std::fs::write(dir.join("key.pem"), Ca::new().leaf("k").key_pem).unwrap();
    refused(&missing, "tls.cert_file");
    let ca = Ca::new();
    let leaf = ca.leaf("x");
    std::fs::write(dir.join("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), "").unwrap();
    refused(&missing, "tls.key_file");
    refused("[tls]\nlisten = \"127.0.0.1:0\"\n", "tls.cert_file");
}

/// Sends `bytes` to the TLS port and reads until the server ends the connection.
fn dropped_after(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(bytes).unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            // At most a TLS alert comes back, never an HTTP answer.
            Ok(n) => assert!(buf[0] == 0x15 || !buf[..n].starts_with(b"HTTP"), "answered {:?}", &buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the server did not drop the connection: {e}"),
        }
        assert!(Instant::now() < deadline);
    }
}

#[test]
fn what_is_not_tls_on_the_tls_port_is_dropped_and_counted() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-garbage");
    let server = start_tls(&dir, &ca.leaf("g"), 1, "[limits]\nhandshake_timeout_ms = 300\n");
    let addr = tls_addr(&server);
    let pids: Vec<u64> = worker_rows(&server.status()).iter().map(|w| field(w, "pid")).collect();

    dropped_after(addr, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n");
    server.wait_status("one handshake failure", |r| r["totals"]["tls_handshake_failures"] == 1);
    dropped_after(addr, &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]);
    dropped_after(addr, &[0xff; 64]);
    server.wait_status("three handshake failures", |r| r["totals"]["tls_handshake_failures"] == 3);
    // Silence: the handshake timeout ends it, like a slowloris on the plain port.
    let timeouts = tls_totals(&server, "handshake_timeouts");
    dropped_after(addr, b"");
    server.wait_status("a handshake timeout", |r| field(&r["totals"], "handshake_timeouts") == timeouts + 1);
    // Half a ClientHello, then nothing: the same.
    dropped_after(addr, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
    server.wait_status("another handshake timeout", |r| field(&r["totals"], "handshake_timeouts") == timeouts + 2);

    let report = server.wait_status("no TLS connection left", |r| r["totals"]["tls_connections"] == 0);
    let now: Vec<u64> = worker_rows(&report).iter().map(|w| field(w, "pid")).collect();
    assert_eq!(now, pids, "no worker died");
    let mut c = Wss::connect(addr, &ca.client_config());
    assert!(c.sync("after").is_empty());
    // The plain port is unaffected.
    Client::connect(server.addr).sync_quiet();
}

#[test]
fn a_wss_only_instance_serves_and_no_listener_at_all_is_refused() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-only");
    let leaf = ca.leaf("only");
    leaf.write(dir.path());
    let opts = Opts { listen: Some(String::new()), config: Some(tls_config(dir.path(), "")), ..Opts::workers(2) };
    let server = Server::start_with(opts);
    let report = server.status();
    assert_eq!(report["listen"], "", "no plain listener");
    let addr = tls_addr(&server);
    let tls = ca.client_config();
    let mut a = Wss::connect(addr, &tls);
    let mut b = Wss::connect(addr, &tls);
    for c in [&mut a, &mut b] {
        c.send_json(&json!({"cmd":"add_group","group_id":"solo"}));
        assert!(c.sync("j").is_empty());
    }
    server.wait_subscriptions(2);
    a.send_json(&json!({"cmd":"send_to_group","group_id":"solo","message":"hi"}));
    assert_eq!(a.recv(), "hi");
    assert_eq!(b.recv(), "hi");

    refused("listen = \"\"\n", "listen");
    refused("listen = \"\"\n[tls]\nlisten = \"\"\n", "listen");
}

/// Random bytes (raw, behind a TLS handshake record header so they reach rustls's handshake
/// parser, or after a real ClientHello so they reach the states beyond it) sent to the TLS
/// port never kill a worker; the port keeps serving.
#[test]
fn random_bytes_to_the_tls_port_never_crash_a_worker() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let ca = Ca::new();
    let dir = TempDir::new("tls-fuzz");
    let server = start_tls(&dir, &ca.leaf("fuzz"), 1, "[limits]\nhandshake_timeout_ms = 200\n");
    let addr = tls_addr(&server);
    let pids: Vec<u64> = worker_rows(&server.status()).iter().map(|w| field(w, "pid")).collect();
    let tls = ca.client_config();
    let cases = std::env::var("TLS_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64);
    let input = (0..3u8, proptest::collection::vec(any::<u8>(), 0..2000));
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    runner
        .run(&input, |(mode, body)| {
            let mut bytes = Vec::new();
            match mode {
                0 => {}
                1 => {
                    bytes.extend_from_slice(&[0x16, 0x03, 0x01]);
                    bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
                }
                _ => {
                    let mut hello =
                        ClientConnection::new(tls.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
                    hello.write_tls(&mut bytes).unwrap();
                }
            }
            bytes.extend_from_slice(&body);
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&bytes);
            // Whatever comes back, until the server drops it (or the handshake timeout does).
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
            Ok(())
        })
        .unwrap();
    let report = server.status();
    let now: Vec<u64> = worker_rows(&report).iter().map(|w| field(w, "pid")).collect();
    assert_eq!(now, pids, "a worker died:\n{}", server.log());
    assert!(Wss::connect(addr, &ca.client_config()).sync("after").is_empty());
}

/// Proportional set size of `pid` in KiB (/proc/PID/smaps_rollup).
fn pss_kib(pid: u64) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let line = text.lines().find(|l| l.starts_with("Pss:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Rough idle memory per connection, ws against wss, in one worker: run by hand with
/// `cargo test --release --test tls idle_memory -- --ignored --nocapture` (not a timed or
/// sized assertion; the benchmark line gives the official figure).
#[test]
#[ignore]
fn idle_memory_per_connection_ws_and_wss() {
    const N: usize = 1000;
    let ca = Ca::new();
    let dir = TempDir::new("tls-mem");
    let server = start_tls(&dir, &ca.leaf("mem"), 1, "");
    let addr = tls_addr(&server);
    let tls = ca.client_config();
    let pid = field(&worker_rows(&server.status())[0], "pid");
    // Warm-up: the first connections of each kind grow tables that are not per connection.
    let warm: Vec<_> = (0..20).map(|_| (Client::connect(server.addr), Wss::connect(addr, &tls))).collect();
    drop(warm);
    server.wait_status("warm-up closed", |r| r["totals"]["connections"] == 0);
    let base = pss_kib(pid);
    let ws: Vec<Client> = (0..N).map(|_| Client::connect(server.addr)).collect();
    server.wait_status("ws open", |r| r["totals"]["connections"] == N as u64);
    let with_ws = pss_kib(pid);
    let wss: Vec<Wss> = (0..N).map(|_| Wss::connect(addr, &tls)).collect();
    server.wait_status("wss open", |r| r["totals"]["tls_connections"] == N as u64);
    let with_wss = pss_kib(pid);
    let per = |kib: u64| kib as f64 * 1024.0 / N as f64;
    println!(
        "worker PSS: base {base} KiB, +{N} ws {with_ws} KiB ({:.0} B/conn), +{N} wss {with_wss} KiB ({:.0} B/conn)",
        per(with_ws - base),
        per(with_wss - with_ws)
    );
    drop((ws, wss));
}

/// A wss client that stops reading is cut off by `limits.send_buffer_limit` like a ws one:
/// rustls holds only a bounded batch, the rest queues where the slow-client policy sees it.
#[test]
fn a_wss_client_that_stops_reading_is_closed_as_too_slow() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-slow");
    let extra = "[limits]\nsend_buffer_limit = 65536\ncommands_per_second = 100000\ncommands_burst = 100000\n";
    let server = start_tls(&dir, &ca.leaf("slow"), 1, extra);
    let addr = tls_addr(&server);
    let mut slow = Wss::connect(addr, &ca.client_config());
    slow.send_json(&json!({"cmd":"add_group","group_id":"flood"}));
    assert!(slow.sync("joined").is_empty());
    server.wait_subscriptions(1);
    // From here on `slow` reads nothing.
    let mut publisher = Client::connect(server.addr);
    let chunk = "y".repeat(16 * 1024);
    let deadline = Instant::now() + TIMEOUT;
    let mut sent = 0;
    while field(&server.status()["totals"], "slow_closed") == 0 {
        assert!(Instant::now() < deadline, "not closed after {sent} messages of 16 KiB");
        for _ in 0..64 {
            publisher.send_to_group(&json!("flood"), &chunk);
            sent += 1;
        }
        publisher.sync_quiet();
    }
    server.wait_status("the slow wss connection gone", |r| r["totals"]["tls_connections"] == 0);
    drop(slow);
}

/// Started as root with `user`: the master reads a root-only key before dropping privileges
/// and serves wss; a reload, run by the unprivileged master, cannot read it, says so, and
/// leaves the workers serving (docs/tls.md: make the key readable by the service user).
#[test]
fn a_root_only_key_is_read_before_the_privilege_drop() {
    use std::os::unix::fs::PermissionsExt;
    if !require(is_root(), "needs root to drop privileges") {
        return;
    }
    let nobody = std::process::Command::new("id").args(["-u", "nobody"]).output().ok().filter(|o| o.status.success());
    if nobody.is_none() {
        return skip_or_fail("needs a user `nobody` to drop to");
    }
    let ca = Ca::new();
    let dir = TempDir::new("tls-privs");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::set_permissions(dir.join("bin"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("bin").join("groupcast");
    install_executable(&binary_bytes(), &exe, None);
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o700)).unwrap();
    let leaf = ca.leaf("root-only");
    leaf.write(&certs);
    std::fs::set_permissions(certs.join("key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = tls_config(&certs, "user = \"nobody\"");
    let server = Server::launch(Launch {
        bin: exe.clone(),
        ..Launch::new(dir, Opts { config: Some(config), ..Opts::workers(1) })
    });
    let addr = tls_addr(&server);
    let tls = ca.client_config();
    let mut c = Wss::connect(addr, &tls);
    assert_eq!(c.served, leaf.der);
    let run = server.cli(&["reload"]);
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("cannot read tls.") && run.stderr.contains("ermission denied"), "{run:?}");
    assert!(c.sync("after").is_empty());
    assert_eq!(Wss::connect(addr, &tls).served, leaf.der);
}

/// `limits.max_connections_per_ip` counts ws and wss together; over the cap a wss connection is
/// closed before the TLS handshake (an HTTP 503 cannot precede it) and counted.
#[test]
fn the_per_ip_cap_counts_wss_and_ws_together() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-per-ip");
    let server = start_tls(&dir, &ca.leaf("one"), 2, "[limits]\nmax_connections_per_ip = 3\nper_ip_exempt = []");
    let addr = tls_addr(&server);
    let tls = ca.client_config();
    let _wss = [Wss::connect(addr, &tls), Wss::connect(addr, &tls)];
    let _ws = Client::connect(server.addr);
    let refused = try_wss(addr, &tls).err().expect("a fourth connection from 127.0.0.1 is refused");
    assert!(refused.starts_with("TLS handshake"), "{refused}");
    assert_eq!(tls_totals(&server, "per_ip_refused"), 1);
    assert_eq!(tls_totals(&server, "tls_handshake_failures"), 0, "refused before any TLS");
    // The plain port answers at accept, before any request: read without sending one.
    let mut plain = TcpStream::connect(server.addr).unwrap();
    plain.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).expect("the 503 answer");
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert_eq!(tls_totals(&server, "per_ip_refused"), 2);
}
