//! Live hand-off at reload (issue 13): the old worker gives every open plain-TCP connection to
//! its replacement, so a reload closes nothing. Under load with a new binary; a new binary
//! dying in prepare (every connection stays with the old worker); an old worker writing the
//! previous state format; an unknown format (fall back to close 1012); TLS connections (1012)
//! next to plain ones (moved); `reload --close` and `reload_mode = "close"` (today's
//! behaviour); a frame and a handshake split across the reload.
//!
//! The instance runs from a copy of the binary in the test's dir, so a test can put another
//! binary, or a `#!/bin/sh` wrapper setting a test switch, at the master's path before a reload
//! (the master resolves its path once at start; a reload starts whatever is there).

mod common;
mod robustness;
#[path = "handoff_support/wss.rs"]
mod wss;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::{json, Value};

/// The test switches of the hand-off (docs/operations.md).
const FAULT_ENV: &str = "GROUPCAST_TEST_HANDOFF_FAULT";
const WRITE_FORMAT_ENV: &str = "GROUPCAST_HANDOFF_WRITE_FORMAT";

/// Deadline for a whole load to be delivered and acknowledged on a slow, shared machine.
const DELIVERY: Duration = Duration::from_secs(90);

fn days_ago(days: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(days * 86_400)
}

/// Copies the test binary to `DIR/bin/NAME` (new inode, by rename) with `mtime`; its path.
fn install_copy(dir: &Path, name: &str, mtime: SystemTime) -> PathBuf {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let exe = dir.join("bin").join(name);
    install_executable(&binary_bytes(), &exe, Some(mtime));
    exe
}

/// Installs at `exe` a shell wrapper running `real` with `setup` (shell lines) first.
fn install_wrapper(exe: &Path, real: &Path, setup: &str) {
    let script = format!("#!/bin/sh\n{setup}\nexec '{}' \"$@\"\n", real.display());
    install_executable(script.as_bytes(), exe, None);
}

/// The wrapper without any test switch.
fn plain_setup() -> String {
    format!("unset {FAULT_ENV} {WRITE_FORMAT_ENV}")
}

/// An instance started from `DIR/bin/groupcast`, a copy of the test binary.
fn start_from_copy(name: &str, config: &str, workers: usize, env: &[(&str, &str)]) -> (Server, PathBuf) {
    let dir = TempDir::new(name);
    let exe = install_copy(dir.path(), "groupcast", days_ago(3));
    let mut launch = Launch::new(dir, Opts { config: Some(config.to_owned()), ..Opts::workers(workers) });
    launch.bin = exe.clone();
    launch.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    (Server::launch(launch), exe)
}

/// History deep enough that the switch is always bridged from it (a small history would make
/// a slow hand-off a gap, which is not what these tests are about).
const CONFIG: &str = "graceful_timeout_ms = 3000\n[history]\nsize = 5000\n";

/// Runs `groupcast ARGS` while `load` keeps publishing and reading; the command's result.
fn reload_during(server: &Server, load: &mut GroupLoad, args: &[&str]) -> Run {
    std::thread::scope(|s| {
        let cli = s.spawn(|| server.cli(args));
        load.run_until(|_| cli.is_finished());
        cli.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// `last_reload.handoffs` of a status report.
fn handoffs(report: &Value) -> Vec<Value> {
    report["last_reload"]["handoffs"].as_array().cloned().unwrap_or_default()
}

fn outcomes(report: &Value) -> Vec<String> {
    handoffs(report).iter().map(|h| h["outcome"].as_str().unwrap_or("?").to_owned()).collect()
}

fn moved_total(report: &Value) -> u64 {
    handoffs(report).iter().map(|h| h["moved"].as_u64().unwrap_or(0)).sum()
}

/// The assertion these tests exist for: no connection of `swarm` ended.
fn assert_none_closed(swarm: &Swarm, when: &str) {
    assert!(swarm.ended().is_empty(), "connections closed {when}: {}", swarm.ended_summary());
}

/// The new workers replaced every old one.
fn assert_all_replaced(before: &[u32], after: &[u32], when: &str) {
    assert_eq!(before.len(), after.len(), "{when}: {before:?} -> {after:?}");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{when}: worker pids did not all change: {before:?} -> {after:?}"
    );
}

/// What one reload of the loaded test left behind.
struct ReloadDone {
    before: Vec<u32>,
    after: Vec<u32>,
    run: Run,
    report: Value,
}

/// Three reloads while the load runs; before the third a fresh copy of the binary is renamed
/// over the master's path. Waits for `published` to grow between reloads so each happens under
/// traffic.
fn three_reloads(server: &Server, exe: &Path, published: &AtomicU64) -> Vec<ReloadDone> {
    let mut done = Vec::new();
    for k in 0..3u64 {
        let target = published.load(Ordering::Relaxed) + 100;
        wait_for("publishing before a reload", TIMEOUT, || (published.load(Ordering::Relaxed) >= target).then_some(()));
        if k == 2 {
            install_executable(&binary_bytes(), exe, Some(days_ago(1)));
        }
        let before = worker_pids(&server.status());
        let run = server.cli(&["reload"]);
        let report = server.status();
        let after = worker_pids(&report);
        done.push(ReloadDone { before, after, run, report });
    }
    done
}

/// The load: 2,000 members in 20 groups, 4 publishers every 8 ms.
fn two_thousand_in_twenty_groups() -> LoadShape {
    LoadShape {
        members: 2000,
        groups: 20,
        max_groups_per_member: 2,
        publishers: 4,
        period: Duration::from_millis(8),
        seed: 13,
    }
}

#[test]
fn two_thousand_connections_survive_three_reloads_one_to_a_new_binary() {
    let (server, exe) = start_from_copy("handoff-2k", CONFIG, 2, &[]);
    let shape = two_thousand_in_twenty_groups();
    let started = Instant::now();
    let mut load = GroupLoad::start(server.addr, &shape, Duration::from_secs(60));
    server.wait_subscriptions(load.memberships());
    eprintln!("2,000 connections joined in {:?}", started.elapsed());

    let published = AtomicU64::new(0);
    let reloads = std::thread::scope(|s| {
        let reloads = s.spawn(|| three_reloads(&server, &exe, &published));
        load.run_until(|l| {
            published.store(l.published(), Ordering::Relaxed);
            reloads.is_finished()
        });
        // Some more traffic through the last workers.
        load.run_for(Duration::from_millis(500));
        reloads.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    eprintln!("3 reloads under {} publishes in {:?}", load.published(), started.elapsed());
    for (k, r) in reloads.iter().enumerate() {
        assert_eq!(r.run.code, Some(0), "reload {k}: {:?}\n{}", r.run, server.log());
    }
    assert_none_closed(&load.swarm, "across three reloads");

    for (k, r) in reloads.iter().enumerate() {
        assert_all_replaced(&r.before, &r.after, &format!("reload {k}"));
        assert_eq!(r.report["last_reload"]["ok"], true, "reload {k}: {}", r.report["last_reload"]);
        assert_eq!(
            outcomes(&r.report),
            vec!["moved"; 2],
            "reload {k}: one hand-off per worker, each moved: {}",
            r.report["last_reload"]
        );
    }
    let last = &reloads[2].report;
    assert!(
        moved_total(last) >= 2000,
        "the last reload moved {} connections: {}",
        moved_total(last),
        last["last_reload"]
    );
    let mut indexes: Vec<u64> = handoffs(last).iter().map(|h| field(h, "index")).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, vec![0, 1], "one hand-off per worker slot: {}", last["last_reload"]);
    for h in handoffs(last) {
        assert_eq!(h["generation"], last["last_reload"]["generation"], "{h}");
        assert!(field(&h, "rounds") >= 1, "{h}");
    }
    let received: u64 = slot_rows(last).iter().map(|w| field(w, "handoffs_in")).sum();
    assert!(received >= 2000, "the new workers count the connections they received: {received}");
    let text = server.cli(&["status"]).stdout;
    for w in 0..2 {
        assert!(text.contains(&format!("worker-{w}: moved ")), "status names each worker's hand-off:\n{text}");
    }
    let new_mtime = mtime_secs(&exe);
    let mtimes: Vec<u64> = slot_rows(last).iter().map(|w| field(w, "binary_mtime")).collect();
    assert_eq!(mtimes, vec![new_mtime; 2], "the last workers run the binary installed before the third reload");

    load.wait_acks(DELIVERY);
    load.check_delivery(DELIVERY);
    assert_none_closed(&load.swarm, "by the end");
    eprintln!("{} publishes delivered exactly once in {:?}", load.published(), started.elapsed());
}

/// A smaller load for the tests that are about one reload's outcome.
fn small_load(server: &Server, seed: u64) -> GroupLoad {
    let shape = LoadShape {
        members: 200,
        groups: 5,
        max_groups_per_member: 2,
        publishers: 2,
        period: Duration::from_millis(10),
        seed,
    };
    let load = GroupLoad::start(server.addr, &shape, Duration::from_secs(60));
    server.wait_subscriptions(load.memberships());
    load
}

/// A reload whose new worker fails the hand-off before commit (`fault`, a value of the test
/// switch): the command fails, every worker keeps its pid, no client notices, publishing
/// before, during and after reaches everyone exactly once; the good binary back, the next
/// reload moves everyone.
fn failed_handoff_keeps_every_connection(name: &str, fault: &str) {
    let (server, exe) = start_from_copy(name, CONFIG, 2, &[]);
    let real = install_copy(server.dir.path(), "groupcast-real", days_ago(2));
    let mut load = small_load(&server, 2);
    load.run_for(Duration::from_millis(300));

    // No core file from the abort: the disk is not the test's to fill.
    install_wrapper(&exe, &real, &format!("{}\nulimit -c 0\nexport {FAULT_ENV}={fault}", plain_setup()));
    let before = worker_pids(&server.status());
    let run = reload_during(&server, &mut load, &["reload"]);
    load.run_for(Duration::from_millis(300));
    assert_none_closed(&load.swarm, &format!("by a reload whose new worker failed ({fault})"));

    assert_ne!(run.code, Some(0), "the reload must fail: {run:?}");
    let report = server.status();
    assert_eq!(report["last_reload"]["ok"], false, "{}", report["last_reload"]);
    let outcomes = outcomes(&report);
    assert!(
        !outcomes.is_empty() && outcomes.iter().all(|o| o == "failed"),
        "hand-offs of the failed reload: {}",
        report["last_reload"]
    );
    assert_eq!(worker_pids(&report), before, "the old workers keep their slots");
    wait_for("no retiring worker", TIMEOUT, || retiring_rows(&server.status()).is_empty().then_some(()));
    load.run_for(Duration::from_millis(300));

    // The good binary back: the next reload moves everyone.
    install_wrapper(&exe, &real, &plain_setup());
    let run = reload_during(&server, &mut load, &["reload"]);
    load.run_for(Duration::from_millis(300));
    assert_none_closed(&load.swarm, "by the reload after the failed one");
    assert_eq!(run.code, Some(0), "{run:?}\n{}", server.log());
    let report = server.status();
    assert_eq!(self::outcomes(&report), vec!["moved"; 2], "{}", report["last_reload"]);
    assert_all_replaced(&before, &worker_pids(&report), "the reload after the failed one");

    load.wait_acks(DELIVERY);
    load.check_delivery(DELIVERY);
    assert_none_closed(&load.swarm, "by the end");
}

#[test]
fn a_new_binary_dying_in_prepare_leaves_every_connection_with_the_old_worker() {
    failed_handoff_keeps_every_connection("handoff-die", "die-in-prepare");
}

#[test]
fn a_new_binary_refusing_the_state_leaves_every_connection_with_the_old_worker() {
    failed_handoff_keeps_every_connection("handoff-refuse", "refuse");
}

/// The variables in the environment of `pid`.
fn environ(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default()).replace('\0', "\n")
}

#[test]
fn connections_move_from_a_binary_writing_the_previous_format() {
    // The first workers (children of a master with the switch) write format 1; the wrapper
    // installed before the reload starts the new ones without it.
    let (server, exe) = start_from_copy("handoff-v1", CONFIG, 2, &[(WRITE_FORMAT_ENV, "1")]);
    let real = install_copy(server.dir.path(), "groupcast-real", days_ago(2));
    let before = worker_pids(&server.status());
    for &pid in &before {
        assert!(environ(pid).contains(&format!("{WRITE_FORMAT_ENV}=1\n")), "worker {pid} writes format 1");
    }
    let mut load = small_load(&server, 3);
    load.run_for(Duration::from_millis(300));

    install_wrapper(&exe, &real, &plain_setup());
    let run = reload_during(&server, &mut load, &["reload"]);
    load.run_for(Duration::from_millis(500));
    assert_none_closed(&load.swarm, "by a reload from a format-1 writer");

    assert_eq!(run.code, Some(0), "{run:?}\n{}", server.log());
    let report = server.status();
    let after = worker_pids(&report);
    assert_all_replaced(&before, &after, "the reload");
    for &pid in &after {
        assert!(!environ(pid).contains(WRITE_FORMAT_ENV), "new worker {pid} runs without the switch");
    }
    assert_eq!(outcomes(&report), vec!["moved"; 2], "{}", report["last_reload"]);
    assert!(moved_total(&report) >= 200, "{}", report["last_reload"]);
    // Both ways: the publishers' commands are read by the new workers, the members receive.
    load.wait_acks(DELIVERY);
    load.check_delivery(DELIVERY);
}

/// Clients on every worker in group `g` (each has seen its join answered).
fn members_on_every_worker(server: &Server, g: &str) -> Vec<Client> {
    let (mut clients, _) = server.connect_spread(1);
    for c in &mut clients {
        assert_eq!(c.call(json!({"cmd":"add_group","group_id":g}))["ok"], true);
    }
    clients
}

/// After a reload that closed `clients` with 1012: new clients on every worker exchange
/// messages across the workers.
fn reconnect_works(server: &Server, g: &str, tag: &str) {
    // The closed clients' memberships are gone with their old workers.
    server.wait_status("the old workers gone", |r| retiring_rows(r).is_empty() && r["totals"]["memberships"] == 0);
    let (mut clients, on) = server.connect_spread(1);
    for c in &mut clients {
        c.add_group(&json!(g));
        c.sync_quiet();
    }
    server.wait_subscriptions(clients.len() as u64);
    let flows: Vec<Flow> = (0..server.workers)
        .map(|w| Flow { sender: on.iter().position(|&x| x == w).unwrap(), group: g.into(), group_id: json!(g) })
        .collect();
    let members: Vec<std::collections::HashSet<String>> = vec![[g.to_string()].into(); clients.len()];
    exchange(&mut clients, &members, &flows, 5, tag);
}

#[test]
fn an_unknown_format_falls_back_to_close_1012() {
    let (server, _exe) = start_from_copy("handoff-v99", CONFIG, 2, &[(WRITE_FORMAT_ENV, "99")]);
    let mut clients = members_on_every_worker(&server, "f");
    let before = worker_pids(&server.status());
    let run = server.cli(&["reload"]);
    assert_eq!(run.code, Some(0), "falling back is a successful reload: {run:?}\n{}", server.log());
    for c in &mut clients {
        assert_eq!(c.expect_close(), 1012, "a client of a worker that fell back");
    }
    let report = server.status();
    assert_eq!(report["last_reload"]["ok"], true, "{}", report["last_reload"]);
    assert_eq!(outcomes(&report), vec!["fell_back"; 2], "{}", report["last_reload"]);
    for h in handoffs(&report) {
        assert_eq!(h["moved"], 0, "{h}");
        assert!(!h["reason"].as_str().unwrap_or_default().is_empty(), "a fall-back says why: {h}");
    }
    assert_all_replaced(&before, &worker_pids(&report), "the reload");
    drop(clients);
    reconnect_works(&server, "f2", "after-fallback");
}

#[test]
fn tls_connections_get_1012_while_plain_ones_move() {
    let ca = wss::Ca::new();
    let dir = TempDir::new("handoff-tls-files");
    let config = format!("{CONFIG}{}", ca.write_leaf(dir.path()));
    let (server, _exe) = start_from_copy("handoff-tls", &config, 1, &[]);
    let tls_addr: std::net::SocketAddr =
        server.status()["tls_listen"].as_str().unwrap().parse().expect("status names the TLS address");
    let tls = ca.client_config();
    let mut secure = wss::Wss::connect(tls_addr, &tls);
    secure.send_json(&json!({"cmd":"add_group","group_id":"t","id":1}));
    assert_eq!(secure.recv(), json!({"id":1,"ok":true}).to_string());
    let mut plain = Client::connect(server.addr);
    assert_eq!(plain.call(json!({"cmd":"add_group","group_id":"t"}))["ok"], true);
    server.wait_subscriptions(2);

    let run = server.cli(&["reload"]);
    assert_eq!(run.code, Some(0), "{run:?}\n{}", server.log());
    assert_eq!(secure.expect_close(), 1012, "a wss connection cannot move: told to reconnect");
    if let Some(m) = plain.next_message(Duration::from_millis(300)) {
        panic!("the plain connection got {m:?} at the reload: it must move silently");
    }
    let report = server.status();
    let h = handoffs(&report);
    assert_eq!(outcomes(&report), vec!["moved"], "{}", report["last_reload"]);
    assert_eq!(h[0]["moved"], 1, "{}", report["last_reload"]);
    assert_eq!(h[0]["closed"], 1, "the wss connection is counted as closed: {}", report["last_reload"]);

    // The moved plain client still receives, and sends.
    let mut other = Client::connect(server.addr);
    other.send_to_group(&json!("t"), "after");
    assert_eq!(plain.recv(), "after");
    plain.send_to_group(&json!("t"), "from-moved");
    assert_eq!(plain.recv(), "from-moved");
    plain.sync_quiet();
    // And wss clients reconnect.
    let mut again = wss::Wss::connect(tls_addr, &tls);
    again.send_json(&json!({"cmd":"add_group","group_id":"t","id":2}));
    assert_eq!(again.recv(), json!({"id":2,"ok":true}).to_string());
}

/// Every client closed with 1012 by a reload in close mode, which status records as such.
fn assert_close_mode_reload(server: &Server, clients: &mut [Client], run: &Run) {
    assert_eq!(run.code, Some(0), "{run:?}\n{}", server.log());
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close(), 1012, "close mode: every client is told to reconnect");
    }
    let report = server.status();
    assert_eq!(report["last_reload"]["ok"], true, "{}", report["last_reload"]);
    assert_eq!(report["last_reload"]["mode"], "close", "{}", report["last_reload"]);
    assert!(handoffs(&report).is_empty(), "no hand-off in close mode: {}", report["last_reload"]);
}

#[test]
fn reload_close_keeps_todays_behaviour() {
    let server = Server::start_with(Opts { config: Some(CONFIG.into()), ..Opts::workers(2) });
    let mut clients = members_on_every_worker(&server, "c");
    let run = server.cli(&["reload", "--close"]);
    assert_close_mode_reload(&server, &mut clients, &run);
    drop(clients);
    reconnect_works(&server, "c2", "after-close");
    // `--close` is for that one reload: the next one hands off again.
    let mut load = small_load(&server, 6);
    let run = reload_during(&server, &mut load, &["reload"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_none_closed(&load.swarm, "by a reload after a --close one");
    assert_eq!(server.status()["last_reload"]["mode"], "handoff");
}

#[test]
fn reload_mode_close_in_the_config_keeps_todays_behaviour() {
    let server =
        Server::start_with(Opts { config: Some(format!("reload_mode = \"close\"\n{CONFIG}")), ..Opts::workers(2) });
    let mut clients = members_on_every_worker(&server, "c");
    let run = server.cli(&["reload"]);
    assert_close_mode_reload(&server, &mut clients, &run);
}

/// The upgrade request, to be sent in two halves.
const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Reads the answer's head on `stream`; (head, bytes after it).
fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        match stream.read(&mut chunk) {
            Ok(0) => panic!("EOF before the answer to the upgrade: {:?}", String::from_utf8_lossy(&buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading the answer to the upgrade: {e} (got {:?})", String::from_utf8_lossy(&buf)),
        }
    }
}

/// Nothing arrives on `raw` for a moment: in particular no close frame, no EOF.
fn assert_raw_open(raw: &mut RawWs, who: &str) {
    raw.read_timeout(Some(Duration::from_millis(300)));
    let got = raw.next_frame();
    raw.read_timeout(None);
    assert_eq!(got.as_ref().map(|(f, p)| (*f, p.len())), Err(&End::Timeout), "{who}: the reload closed it ({got:?})");
}

#[test]
fn a_frame_split_across_the_reload_is_processed_once() {
    // Also a fragmented message and a handshake split across the same reload.
    let (server, _exe) = start_from_copy("handoff-split", CONFIG, 1, &[]);
    let mut member = Client::connect(server.addr);
    member.add_group(&json!("s"));
    member.sync_quiet();
    server.wait_subscriptions(1);
    let mut sender = RawWs::connect(server.addr);
    let frame = encode_frame(
        0x81,
        json!({"cmd":"send_to_group","group_id":"s","message":"split"}).to_string().as_bytes(),
        true,
    );
    let half = frame.len() / 2;
    sender.stream.write_all(&frame[..half]).unwrap();
    // A message in two fragments, the first before the reload.
    let mut fragmenter = RawWs::connect(server.addr);
    let message = json!({"cmd":"send_to_group","group_id":"s","message":"fragmented"}).to_string();
    let (first, second) = message.as_bytes().split_at(message.len() / 2);
    fragmenter.write_frame(0x01, first, true);

    // A handshake in progress: half the upgrade request, accepted by the worker.
    let mut pending = TcpStream::connect(server.addr).unwrap();
    pending.set_read_timeout(Some(TIMEOUT)).unwrap();
    let port = pending.local_addr().unwrap().port();
    let cut = UPGRADE.len() / 2;
    pending.write_all(&UPGRADE[..cut]).unwrap();
    wait_for("the worker to accept the pending handshake", TIMEOUT, || {
        std::panic::catch_unwind(|| server.workers_of_ports(&[port])).ok()
    });

    let old = worker_pids(&server.status());
    let run = std::thread::scope(|s| {
        let cli = s.spawn(|| server.cli(&["reload"]));
        // The rest of the request once the replacement exists (the hand-off is under way or
        // about to be), or when the reload is over, whichever comes first.
        wait_for("the new worker to start", TIMEOUT, || {
            let started = server.try_status().ok().is_some_and(|r| {
                worker_rows(&r).iter().any(|w| w["pid"].as_u64().is_some_and(|p| !old.contains(&(p as u32))))
            });
            (started || cli.is_finished()).then_some(())
        });
        pending.write_all(&UPGRADE[cut..]).expect("send the rest of the upgrade request");
        cli.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    assert_eq!(run.code, Some(0), "{run:?}\n{}", server.log());
    if let Some(m) = member.next_message(Duration::from_millis(300)) {
        panic!("the member got {m:?} at the reload: it must move silently");
    }
    assert_raw_open(&mut sender, "the sender with half a frame sent");

    assert_raw_open(&mut fragmenter, "the sender with one fragment sent");

    // The second half, to the new worker: the message is processed once.
    sender.stream.write_all(&frame[half..]).unwrap();
    assert_eq!(member.recv(), "split");
    fragmenter.write_frame(0x80, second, true);
    assert_eq!(member.recv(), "fragmented");
    member.sync_quiet();

    // The split handshake completed and the connection works, after the old worker is gone
    // (so it is with the new one).
    let (head, rest) = read_head(&mut pending);
    assert!(head.starts_with("HTTP/1.1 101 "), "the split handshake: {head}");
    let mut late = RawWs::after_upgrade(pending, rest);
    wait_for("the old worker to exit", TIMEOUT, || old.iter().all(|&p| !alive(p)).then_some(()));
    assert_raw_open(&mut late, "the connection whose handshake spanned the reload");
    late.send_text(&json!({"cmd":"add_group","group_id":"s","id":1}).to_string());
    assert_eq!(late.next_text(), json!({"id":1,"ok":true}).to_string());
    sender.send_text(&json!({"cmd":"send_to_group","group_id":"s","message":"after"}).to_string());
    assert_eq!(late.next_text(), "after");
    assert_eq!(member.recv(), "after");
    member.sync_quiet();
    assert_eq!(outcomes(&server.status()), vec!["moved"]);
}

/// The harness itself, without a reload: the same 2,000-connection load is delivered exactly
/// once and nothing closes. When the reload tests fail, this one says whether the load and
/// its checks are sound on this machine.
#[test]
fn the_load_without_a_reload_is_delivered_exactly_once() {
    let (server, _exe) = start_from_copy("handoff-control", CONFIG, 2, &[]);
    let shape = two_thousand_in_twenty_groups();
    let started = Instant::now();
    let mut load = GroupLoad::start(server.addr, &shape, Duration::from_secs(60));
    server.wait_subscriptions(load.memberships());
    load.run_for(Duration::from_secs(3));
    assert_none_closed(&load.swarm, "without a reload");
    load.wait_acks(DELIVERY);
    load.check_delivery(DELIVERY);
    eprintln!("{} publishes delivered exactly once in {:?}", load.published(), started.elapsed());
}

/// A reload by signal (SIGHUP, as an init system sends it) hands off like the command.
#[test]
fn a_reload_by_sighup_hands_off_too() {
    let (server, _exe) = start_from_copy("handoff-hup", CONFIG, 2, &[]);
    let mut load = small_load(&server, 8);
    load.run_for(Duration::from_millis(300));
    let before = worker_pids(&server.status());
    let report = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            signal(server.master_pid, libc::SIGHUP);
            server.wait_status("the reload by SIGHUP to finish", |r| {
                r["reloads"] == 1 && r["reloading"] == false && r["last_reload"]["generation"] == 1
            })
        });
        load.run_until(|_| waiter.is_finished());
        waiter.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    load.run_for(Duration::from_millis(300));
    assert_none_closed(&load.swarm, "by a reload by SIGHUP");
    assert_eq!(report["last_reload"]["ok"], true, "{}", report["last_reload"]);
    assert_eq!(outcomes(&report), vec!["moved"; 2], "{}", report["last_reload"]);
    assert_all_replaced(&before, &worker_pids(&report), "the reload by SIGHUP");
    load.wait_acks(DELIVERY);
    load.check_delivery(DELIVERY);
}

/// Bytes the worker holds queued for the client on local `port` (`connections --json`).
fn send_buffer_of(server: &Server, port: u16) -> u64 {
    let run = server.cli(&["connections", "--json"]);
    let list: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"));
    let peer = format!("127.0.0.1:{port}");
    list["connections"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["peer"] == peer.as_str()))
        .map_or(0, |r| field(r, "send_buffer"))
}

/// A client that stopped reading has a backlog in the worker's own queue (not only in the
/// kernel's buffers): the queue moves with the connection, and once the client reads again
/// it gets every message once, in order (the trap PgBouncer fell into).
#[test]
fn a_queued_backlog_moves_with_its_connection() {
    // More than the kernel's buffers take (tcp_wmem's default maximum is 4 MiB), less than
    // the queue may hold.
    const COUNT: usize = 6000;
    let pad = "x".repeat(1000);
    // The publisher sends faster than the default command rate; the queue may hold the rest.
    let config = format!(
        "{CONFIG}[limits]\ncommands_per_second = 100000\ncommands_burst = 100000\nsend_buffer_limit = 16777216\n"
    );
    let (server, _exe) = start_from_copy("handoff-backlog", &config, 1, &[]);
    let mut slow = RawWs::upgrade(robustness::connect_small_rcvbuf(server.addr, 4096));
    slow.send_text(&json!({"cmd":"add_group","group_id":"q","id":1}).to_string());
    assert_eq!(slow.next_text(), json!({"id":1,"ok":true}).to_string());
    server.wait_subscriptions(1);
    let mut publisher = Client::connect(server.addr);
    for i in 0..COUNT {
        publisher.send_to_group(&json!("q"), &format!("m{i}-{pad}"));
        if i % 100 == 99 {
            publisher.sync_quiet();
        }
    }
    publisher.sync_quiet();
    let port = slow.port();
    wait_for("a backlog in the worker's queue", TIMEOUT, || {
        (send_buffer_of(&server, port) >= 512 * 1024).then_some(())
    });

    let run = server.cli(&["reload"]);
    assert_eq!(run.code, Some(0), "{run:?}\n{}", server.log());
    // A new publisher: the slow reader's stream is what this test is about.
    let mut publisher = Client::connect(server.addr);
    publisher.send_to_group(&json!("q"), "after");
    publisher.sync_quiet();
    for i in 0..=COUNT {
        let want = if i == COUNT { "after".to_string() } else { format!("m{i}-{pad}") };
        match slow.next_frame() {
            Ok((0x81, p)) => {
                assert!(p == want.as_bytes(), "message {i}: got {:?}", String::from_utf8_lossy(&p[..p.len().min(40)]))
            }
            Ok((first, p)) if first & 0x0f == 0x8 => {
                panic!("the reload closed the slow reader after {i} of {COUNT} queued messages: close {:?}", p.get(..2))
            }
            Err(End::Eof) => {
                panic!("the reload ended the slow reader's connection (EOF) after {i} of {COUNT} queued messages")
            }
            other => panic!("message {i}: {:?}", other.map(|(f, p)| (f, p.len()))),
        }
    }
    slow.read_timeout(Some(Duration::from_millis(300)));
    assert_eq!(slow.next_frame().map(|(f, p)| (f, p.len())), Err(End::Timeout), "nothing after the last message");
    assert_eq!(outcomes(&server.status()), vec!["moved"]);
}

#[test]
fn an_unreadable_batch_is_refused_and_the_old_worker_keeps_serving() {
    // The first workers send a batch the new ones cannot decode (test switch): the new worker's
    // decoding and bounds are the input path under test; its refusal rolls the hand-off back.
    let (server, exe) = start_from_copy("handoff-corrupt", CONFIG, 2, &[(FAULT_ENV, "corrupt-batch")]);
    let real = install_copy(server.dir.path(), "groupcast-real", days_ago(2));
    let mut load = small_load(&server, 4);
    load.run_for(Duration::from_millis(300));
    install_wrapper(&exe, &real, &plain_setup());
    let before = worker_pids(&server.status());
    let run = reload_during(&server, &mut load, &["reload"]);
    load.run_for(Duration::from_millis(300));
    assert_none_closed(&load.swarm, "by a reload whose batch was unreadable");
    assert_ne!(run.code, Some(0), "the reload must fail: {run:?}");
    let report = server.status();
    let last = &report["last_reload"];
    assert_eq!(last["ok"], false, "{last}");
    assert_eq!(outcomes(&report), vec!["failed"], "the first worker's hand-off fails and ends the reload: {last}");
    let reason = handoffs(&report)[0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("refused"), "the new worker's refusal is the reason: {reason}");
    assert_eq!(worker_pids(&report), before, "the old workers keep their slots");
    assert!(server.log().contains("hand-off: bad record"), "the new worker says why in the log");
    load.wait_acks(DELIVERY);
    load.check_delivery(DELIVERY);
    assert_none_closed(&load.swarm, "by the end");
}

#[test]
fn connections_move_on_the_redis_bus_too() {
    // On Redis the cut's position is read on another connection than the one that publishes,
    // so the old worker first waits for its own publishes to be numbered (worker/bus.rs).
    let redis_port = free_port();
    let Some(_redis) = Redis::start(redis_port, None) else { return };
    let config = format!(
        "bus = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:{redis_port}/\"\nprefix = \"gc-handoff:\"\n\
         [history]\nsize = 5000\n"
    );
    let (server, _exe) = start_from_copy("handoff-redis", &config, 2, &[]);
    let shape = LoadShape {
        members: 200,
        groups: 5,
        max_groups_per_member: 2,
        publishers: 2,
        period: Duration::from_millis(10),
        seed: 9,
    };
    let mut load = GroupLoad::start(server.addr, &shape, Duration::from_secs(60));
    // No broker here: every membership joined and both workers connected to Redis.
    let memberships = load.memberships();
    server.wait_status("the members joined, the workers on Redis", |r| {
        r["totals"]["memberships"] == memberships && worker_rows(r).iter().all(|w| w["channel_connected"] == true)
    });
    load.run_for(Duration::from_millis(300));
    let before = worker_pids(&server.status());
    for reload in 1..=2 {
        let run = reload_during(&server, &mut load, &["reload"]);
        load.run_for(Duration::from_millis(300));
        assert_none_closed(&load.swarm, &format!("by reload {reload} on the Redis bus"));
        assert_eq!(run.code, Some(0), "{run:?}\n{}", server.log());
        assert_eq!(outcomes(&server.status()), vec!["moved"; 2]);
    }
    assert_all_replaced(&before, &worker_pids(&server.status()), "the reloads on the Redis bus");
    load.wait_acks(DELIVERY);
    load.check_delivery(DELIVERY);
    assert_none_closed(&load.swarm, "by the end");
}
