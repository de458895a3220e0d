//! Signals to the master, each with its effect: SIGTERM/SIGINT stop (clients get 1001, nothing
//! left behind), SIGQUIT and `stop -g` stop gracefully (clients may close, up to
//! `graceful_timeout_ms`), SIGUSR1/SIGHUP reload (new workers, clients get 1012, the channel
//! server stays), SIGUSR2 reloads gracefully (one old worker drains before the next is replaced).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Generous drain for the graceful tests: far longer than what they wait for, so finishing
/// early proves the instance noticed the clients leave rather than timing out.
const DRAIN_MS: u64 = 10_000;

fn graceful_config() -> Opts {
    Opts { config: Some(format!("graceful_timeout_ms = {DRAIN_MS}\nstatus_timeout_ms = 5000\n")), ..Opts::workers(2) }
}

fn graceful_close_config() -> Opts {
    let config = format!("{CLOSE_MODE}graceful_timeout_ms = {DRAIN_MS}\nstatus_timeout_ms = 5000\n");
    Opts { config: Some(config), ..Opts::workers(2) }
}

/// Every client in group "s", a sender on each worker: delivery crosses the workers.
fn assert_delivers_across_workers(server: &Server, tag: &str) {
    // Clients of the test still connected keep their memberships.
    let base = field(&server.status()["totals"], "memberships");
    let (mut clients, on) = server.connect_spread(1);
    for c in &mut clients {
        c.add_group(&json!("s"));
        c.sync_quiet();
    }
    server.wait_subscriptions(base + clients.len() as u64);
    let flows: Vec<Flow> = (0..server.workers)
        .map(|w| Flow { sender: on.iter().position(|&x| x == w).unwrap(), group: "s".into(), group_id: json!("s") })
        .collect();
    let members: Vec<HashSet<String>> = vec![["s".to_string()].into(); clients.len()];
    exchange(&mut clients, &members, &flows, 5, tag);
}

fn stop_by_signal(sig: libc::c_int) {
    let mut server = Server::start_with(Opts::workers(2));
    let (mut clients, _) = server.connect_spread(1);
    for c in &mut clients {
        c.add_group(&json!("s"));
        c.sync_quiet();
    }
    server.status();
    let children = server.child_pids();
    assert_eq!(children.len(), 3, "channel and two workers: {children:?}");
    let master = server.master_pid;
    signal(master, sig);
    // Every client, on every worker, is told the server goes away.
    for c in &mut clients {
        assert_eq!(c.expect_close(), 1001, "close code after signal {sig}");
    }
    let status = server.wait_master_exit(TIMEOUT);
    assert!(status.success(), "master exited with {status} after signal {sig}\n{}", server.log());
    assert_instance_gone(&server.pid_file, master, &children);
    assert!(std::net::TcpStream::connect(server.addr).is_err(), "the port still accepts after signal {sig}");
    assert!(server.log().contains("groupcast stopped"), "no stop line in the log:\n{}", server.log());
}

#[test]
fn sigterm_stops_with_close_1001_and_leaves_nothing() {
    stop_by_signal(libc::SIGTERM);
}

#[test]
fn sigint_stops_with_close_1001_and_leaves_nothing() {
    stop_by_signal(libc::SIGINT);
}

/// SIGQUIT: client A answers the close at once, client B only closes its socket 1.5 s later.
/// The instance stays up (master alive, pid file kept) while B is connected and is gone soon
/// after B leaves, long before `graceful_timeout_ms`.
#[test]
fn sigquit_drains_until_the_last_client_closes() {
    let mut server = Server::start_with(graceful_config());
    let mut a = Client::connect(server.addr);
    a.add_group(&json!("q"));
    a.sync_quiet();
    let mut b = RawWs::connect(server.addr);
    server.status();
    let children = server.child_pids();
    let master = server.master_pid;

    let quit_at = Instant::now();
    signal(master, libc::SIGQUIT);
    assert_eq!(a.expect_close(), 1001, "A: close code of a graceful stop");
    a.finish_close();
    assert_eq!(b.expect_close(), 1001, "B: close code of a graceful stop");
    // B does not answer. For 1.5 s the instance must keep waiting for it.
    let hold_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < hold_until {
        assert!(server.master_running(), "the master stopped while client B was still connected\n{}", server.log());
        assert!(server.pid_file.exists(), "pid file removed while client B was still connected");
        std::thread::sleep(Duration::from_millis(50));
    }
    // B's worker still runs for it (the other worker, if B's is not A's, may be gone already).
    assert!(children.iter().any(|&p| alive(p)), "every child gone while B is connected");
    let b_closed = Instant::now();
    drop(b);
    let status = server.wait_master_exit(TIMEOUT);
    let after_b = b_closed.elapsed();
    let total = quit_at.elapsed();
    assert!(status.success(), "master exited with {status}\n{}", server.log());
    assert!(
        after_b < Duration::from_millis(DRAIN_MS / 2),
        "the stop took {after_b:?} after the last client left (drain timeout {DRAIN_MS} ms)"
    );
    assert!(total < Duration::from_millis(DRAIN_MS), "graceful stop took {total:?}: it waited for the timeout");
    assert_instance_gone(&server.pid_file, master, &children);
}

/// `stop -g`: clients get 1001, the command waits for the stop and says so.
#[test]
fn stop_g_closes_clients_with_1001_and_reports() {
    let server = Server::start_with(graceful_config());
    let (mut clients, _) = server.connect_spread(1);
    server.status();
    let children = server.child_pids();
    let master = server.master_pid;
    let pid_file = server.pid_file.clone();
    let handle = std::thread::spawn(move || {
        // The clients answer the close as soon as it comes.
        for c in &mut clients {
            assert_eq!(c.expect_close(), 1001);
            c.finish_close();
        }
    });
    let started = Instant::now();
    let stop = server.cli(&["stop", "-g"]);
    handle.join().expect("clients saw close 1001");
    assert_eq!(stop.code, Some(0), "stop -g: {stop:?}");
    assert!(stop.stdout.contains("groupcast stopped"), "stop -g: {stop:?}");
    assert!(started.elapsed() < Duration::from_millis(DRAIN_MS), "stop -g waited for the drain timeout");
    assert_instance_gone(&pid_file, master, &children);
}

/// SIGUSR1, then SIGHUP: new worker processes, same channel server, `reloads` counted,
/// old clients closed with 1012, and the instance keeps delivering across workers.
#[test]
fn sigusr1_and_sighup_reload_the_workers() {
    // Close mode: the signals' reload, seen by its 1012 (a hand-off moves clients silently:
    // tests/handoff.rs, `a_reload_by_sighup_hands_off_too`).
    let server = Server::start_with(Opts::close_mode(2));
    let first = server.status();
    let channel = channel_pid(&first);
    let mut old_workers = worker_pids(&first);
    assert_eq!(first["reloads"], 0);
    assert!(first["last_reload"].is_null(), "{}", first["last_reload"]);

    for (n, sig) in [(1u64, libc::SIGUSR1), (2, libc::SIGHUP)] {
        let (mut clients, _) = server.connect_spread(1);
        for c in &mut clients {
            c.add_group(&json!("s"));
            c.sync_quiet();
        }
        signal(server.master_pid, sig);
        for c in &mut clients {
            assert_eq!(c.expect_close(), 1012, "close code of a reload by signal {sig}");
            c.finish_close();
        }
        let report = server.wait_status(&format!("reload {n} (signal {sig}) to finish"), |r| {
            r["reloads"] == n
                && r["last_reload"]["generation"] == n
                && r["reloading"] == false
                && retiring_rows(r).is_empty()
                && worker_rows(r).iter().all(|w| w["state"] == "running" && w["channel_connected"] == true)
        });
        assert_eq!(report["last_reload"]["ok"], true, "{}", report["last_reload"]);
        assert_eq!(report["last_reload"]["graceful"], false, "{}", report["last_reload"]);
        let new_workers = worker_pids(&report);
        assert_eq!(new_workers.len(), 2);
        for (i, pid) in new_workers.iter().enumerate() {
            assert!(
                !old_workers.contains(pid),
                "worker {i} not replaced by signal {sig}: {old_workers:?} -> {new_workers:?}"
            );
        }
        for pid in &old_workers {
            wait_for("the old workers to exit", TIMEOUT, || (!alive(*pid)).then_some(()));
        }
        assert_eq!(channel_pid(&report), channel, "the channel server is not replaced by a reload");
        assert_eq!(field(&report["totals"], "restarts"), 0, "a reload is not a restart");
        assert_delivers_across_workers(&server, &format!("after-{n}"));
        old_workers = new_workers;
    }
}

/// SIGUSR2: worker 0 is replaced first and its old process retires while its client has not
/// closed; worker 1 is not touched until then. Then the same for worker 1.
#[test]
fn sigusr2_replaces_one_draining_worker_at_a_time() {
    // Close mode: draining is what a graceful close-mode reload does.
    let server = Server::start_with(graceful_close_config());
    let before = server.status();
    let old = worker_pids(&before);
    // Clients that read the close frame but do not answer it: they keep their worker draining.
    let mut raws = server.raw_on_each_worker();
    signal(server.master_pid, libc::SIGUSR2);

    for i in 0..2 {
        let report = server.wait_status(&format!("old worker {i} to retire"), |r| {
            retiring_rows(r).iter().any(|w| field(w, "pid") as u32 == old[i])
        });
        let rows = slot_rows(&report);
        assert_eq!(rows.len(), 2, "{report}");
        assert_ne!(field(&rows[i], "pid") as u32, old[i], "slot {i} has its new process");
        assert_eq!(report["reloading"], true);
        let retiring = retiring_rows(&report);
        assert_eq!(retiring.len(), 1, "one worker drains at a time: {retiring:?}");
        assert_eq!(retiring[0]["index"], i);
        assert_eq!(field(&retiring[0], "connections"), 1, "{}", retiring[0]);
        assert_eq!(raws[i].expect_close(), 1012, "close code of a reload");
        // While the client of old worker i stays, the next index is not replaced.
        let hold_until = Instant::now() + Duration::from_millis(700);
        while Instant::now() < hold_until {
            let r = server.status();
            let retiring = retiring_rows(&r);
            assert!(
                retiring.iter().any(|w| field(w, "pid") as u32 == old[i]),
                "old worker {i} stopped retiring while its client is connected: {r}"
            );
            if i == 0 {
                assert_eq!(worker_pids(&r)[1], old[1], "worker 1 replaced before worker 0 drained");
            }
        }
        assert!(alive(old[i]));
        // The client goes: the old worker exits and the reload moves on.
        raws[i].stream.shutdown(std::net::Shutdown::Both).unwrap();
        wait_for(&format!("old worker {i} to exit"), TIMEOUT, || (!alive(old[i])).then_some(()));
    }
    let report = server.wait_status("the graceful reload to finish", |r| {
        r["reloads"] == 1 && r["reloading"] == false && r["last_reload"]["generation"] == 1
    });
    assert_eq!(report["last_reload"]["ok"], true, "{}", report["last_reload"]);
    assert_eq!(report["last_reload"]["graceful"], true, "{}", report["last_reload"]);
    assert!(retiring_rows(&report).is_empty());
    let new = worker_pids(&report);
    assert!(new.iter().all(|p| !old.contains(p)), "{old:?} -> {new:?}");
    drop(raws);
    assert_delivers_across_workers(&server, "after-graceful");
}

/// SIGQUIT with a client that never closes: the drain ends at `graceful_timeout_ms`, not
/// before, and the stop then completes.
#[test]
fn sigquit_gives_up_on_a_silent_client_at_the_timeout() {
    const SHORT_MS: u64 = 1000;
    let mut server =
        Server::start_with(Opts { config: Some(format!("graceful_timeout_ms = {SHORT_MS}\n")), ..Opts::workers(1) });
    let mut silent = RawWs::connect(server.addr);
    server.status();
    let children = server.child_pids();
    let master = server.master_pid;
    let quit_at = Instant::now();
    signal(master, libc::SIGQUIT);
    assert_eq!(silent.expect_close(), 1001);
    // The client neither answers nor closes: the instance waits for it...
    while quit_at.elapsed() < Duration::from_millis(SHORT_MS * 7 / 10) {
        assert!(server.master_running(), "stopped after {:?}, before the drain timeout", quit_at.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...until the timeout: then the connection is cut and everything stops.
    silent.expect_eof();
    let status = server.wait_master_exit(TIMEOUT);
    let took = quit_at.elapsed();
    assert!(status.success(), "master exited with {status}\n{}", server.log());
    assert!(took >= Duration::from_millis(SHORT_MS), "stopped after {took:?}, before the drain timeout");
    assert!(took < Duration::from_millis(SHORT_MS + 5000), "stop took {took:?}");
    assert_instance_gone(&server.pid_file, master, &children);
}
