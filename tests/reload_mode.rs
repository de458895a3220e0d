//! `reload_mode` and `reload --close` (issue 13): close mode closes every client with 1012 and
//! reports no hand-off; the default mode goes through the hand-off and reports one outcome per
//! worker in `status`; bad values of the new keys are refused at load.

mod common;

use common::*;
use serde_json::{json, Value};

/// What each worker's hand-off is expected to report in the default mode. The old worker
/// answers with the temporary stub (`worker/handoff/`) today: `fell_back`, clients closed
/// with 1012. The real hand-off changes this to `moved` and clients stay connected: update
/// this one place and `clients_after_default_reload`.
const EXPECTED_OUTCOME: &str = "moved";

/// Two clients on each worker, each in group "g".
fn clients_on_every_worker(server: &Server) -> Vec<Client> {
    let (mut clients, _) = server.connect_spread(2);
    for c in &mut clients {
        c.add_group(&json!("g"));
        c.sync_quiet();
    }
    server.wait_subscriptions(clients.len() as u64);
    clients
}

fn reload_ok(server: &Server, args: &[&str]) -> Value {
    let run = server.cli(args);
    assert_eq!(run.code, Some(0), "{args:?}: {run:?}\n{}", server.log());
    assert!(run.stdout.contains("groupcast reloaded"), "{args:?}: {run:?}");
    let report = server.status();
    assert_eq!(report["last_reload"]["ok"], true, "{report:#}");
    report
}

fn assert_closed_with_1012(clients: &mut [Client]) {
    for c in clients {
        assert_eq!(c.expect_close(), 1012, "a close-mode reload tells clients to reconnect");
    }
}

/// What clients of an old worker see after a default-mode reload (see `EXPECTED_OUTCOME`).
fn clients_after_default_reload(clients: &mut [Client]) {
    // Moved, not closed: each still answers and is still in "g".
    for c in clients.iter_mut() {
        c.sync_quiet();
    }
    clients[0].send_to_group(&json!("g"), "after");
    for c in clients.iter_mut() {
        assert_eq!(c.recv(), "after", "a moved member still gets its group's messages");
    }
}

#[test]
fn reload_close_closes_clients_with_1012() {
    // The graceful reload waits this long for each old worker's clients (which do not read).
    let server = Server::start_with(Opts { config: Some("graceful_timeout_ms = 1000\n".into()), ..Opts::workers(2) });
    assert_eq!(server.status()["reload_mode"], "handoff", "the default mode");
    let mut clients = clients_on_every_worker(&server);
    let old = worker_pids(&server.status());
    let report = reload_ok(&server, &["reload", "--close"]);
    assert_eq!(report["last_reload"]["mode"], "close", "{report:#}");
    assert_eq!(report["last_reload"]["handoffs"], json!([]), "close mode hands nothing over");
    assert!(worker_pids(&report).iter().all(|p| !old.contains(p)), "workers replaced");
    assert_closed_with_1012(&mut clients);
    // `--close` is for that one reload: the configured mode stays.
    assert_eq!(report["reload_mode"], "handoff");

    let mut clients = clients_on_every_worker(&server);
    let report = reload_ok(&server, &["reload", "--close", "-g"]);
    assert_eq!(report["last_reload"]["mode"], "close");
    assert_eq!(report["last_reload"]["graceful"], true);
    assert_eq!(report["reloads"], 2);
    assert_closed_with_1012(&mut clients);
}

#[test]
fn configured_close_mode_closes_clients_with_1012() {
    let server = Server::start_with(Opts {
        config: Some("reload_mode = \"close\"\nhandoff_timeout_ms = 2000\n".into()),
        ..Opts::workers(2)
    });
    let report = server.status();
    assert_eq!(report["reload_mode"], "close");
    assert_eq!(report["handoff_timeout_ms"], 2000);
    let mut clients = clients_on_every_worker(&server);
    let report = reload_ok(&server, &["reload"]);
    assert_eq!(report["last_reload"]["mode"], "close");
    assert_eq!(report["last_reload"]["handoffs"], json!([]));
    assert_closed_with_1012(&mut clients);
}

#[test]
fn default_reload_reports_a_hand_off_per_worker() {
    let server = Server::start_with(Opts::workers(2));
    let mut clients = clients_on_every_worker(&server);
    let old = worker_pids(&server.status());
    let run = server.cli(&["reload"]);
    assert_eq!(run.code, Some(0), "{run:?}\n{}", server.log());
    assert!(run.stdout.contains("worker-0: ") && run.stdout.contains("worker-1: "), "per-worker lines: {run:?}");
    let report = server.status();
    let last = &report["last_reload"];
    assert_eq!(last["ok"], true, "{report:#}");
    assert_eq!(last["mode"], "handoff");
    let handoffs = last["handoffs"].as_array().expect("handoffs listed");
    assert_eq!(handoffs.len(), 2, "one per worker: {last:#}");
    let mut indexes: Vec<u64> = handoffs.iter().map(|h| h["index"].as_u64().unwrap()).collect();
    indexes.sort();
    assert_eq!(indexes, [0, 1]);
    for h in handoffs {
        assert_eq!(h["outcome"], EXPECTED_OUTCOME, "{h:#}");
        assert_eq!(h["generation"], 1);
    }
    assert!(worker_pids(&report).iter().all(|p| !old.contains(p)), "every slot has its new worker");
    clients_after_default_reload(&mut clients);

    // The status table shows the per-worker lines under the last reload.
    let table = server.cli(&["status"]);
    assert_eq!(table.code, Some(0), "{table:?}");
    assert!(table.stdout.contains("reload mode handoff"), "{}", table.stdout);
    for w in ["worker-0", "worker-1"] {
        let line = table.stdout.lines().find(|l| l.trim_start().starts_with(&format!("{w}: ")));
        assert!(line.is_some(), "no {w} hand-off line in:\n{}", table.stdout);
    }
    // New workers got the reload's generation: their connection ids carry it above bit 42.
    let mut fresh = Client::connect(server.addr);
    fresh.add_group(&json!("h"));
    fresh.sync_quiet();
    let run = server.cli(&["connections", "--json"]);
    let list: Value = serde_json::from_str(&run.stdout).expect("connections --json");
    let ids: Vec<u64> = list["connections"].as_array().unwrap().iter().map(|c| c["id"].as_u64().unwrap()).collect();
    // The moved ones keep theirs (from generation 0).
    let fresh_ids = ids.iter().filter(|&&id| id >> 42 == 1).count();
    assert_eq!((ids.len(), fresh_ids), (clients.len() + 1, 1), "ids {ids:?}");
}

#[test]
fn bad_reload_mode_and_handoff_timeout_are_refused() {
    refused("reload_mode = \"fast\"\n", "reload_mode");
    refused("handoff_timeout_ms = 99\n", "invalid value for `handoff_timeout_ms`");
    refused("handoff_timeout_ms = 600001\n", "invalid value for `handoff_timeout_ms`");
    refused("handoff_timeout_ms = -1\n", "handoff_timeout_ms");
}
