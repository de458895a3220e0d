//! `status` and `connections` report what the clients did: 37 connections over 2 workers and
//! 5 groups, counted per worker and per connection, in JSON and in the text forms; `status -d`
//! redraws in place.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CLIENTS: usize = 37;
const GROUPS: usize = 5;

fn group(k: usize) -> String {
    format!("g{k}")
}

/// The groups client `i` joins: one for everyone, a second one for every third client.
fn groups_of(i: usize) -> BTreeSet<String> {
    let mut g: BTreeSet<String> = [group(i % GROUPS)].into();
    if i.is_multiple_of(3) {
        g.insert(group((i + 2) % GROUPS));
    }
    g
}

#[test]
fn status_and_connections_match_the_clients() {
    let server = Server::start_with(Opts::workers(2));
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| Client::connect(server.addr)).collect();
    let on = server.workers_of(&clients.iter().collect::<Vec<_>>());
    assert!((0..2).all(|w| on.contains(&w)), "the 37 connections reach both workers: {on:?}");
    for (i, c) in clients.iter_mut().enumerate() {
        for g in groups_of(i) {
            c.add_group(&json!(g));
        }
    }
    let memberships: usize = (0..CLIENTS).map(|i| groups_of(i).len()).sum();
    server.wait_subscriptions(memberships as u64);
    // Client k < 5 sends one message to group k: every member of every group gets one frame.
    for (k, c) in clients.iter_mut().enumerate().take(GROUPS) {
        assert!(groups_of(k).contains(&group(k)));
        c.send_to_group(&json!(group(k)), &format!("m{k}"));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut got: BTreeSet<String> = BTreeSet::new();
        for _ in 0..groups_of(i).len() {
            got.insert(c.recv());
        }
        let expected: BTreeSet<String> = groups_of(i).iter().map(|g| format!("m{}", &g[1..])).collect();
        assert_eq!(got, expected, "client {i}");
        // One command with an id: nothing else arrives before its reply.
        c.sync_quiet();
    }
    // Per client: commands sent and frames received (deliveries, then the reply to sync).
    let sent = |i: usize| (groups_of(i).len() + usize::from(i < GROUPS) + 1) as u64;
    let received = |i: usize| (groups_of(i).len() + 1) as u64;
    // Whether replies count among the frames out is checked by
    // `messages_out_counts_replies` below; here both readings are accepted.
    let out_ok = |counted: u64, clients: &mut dyn Iterator<Item = usize>| {
        let idx: Vec<usize> = clients.collect();
        let with_replies: u64 = idx.iter().map(|&i| received(i)).sum();
        counted == with_replies || counted == with_replies - idx.len() as u64
    };

    // ---- status --json
    let report = server.status();
    let totals = &report["totals"];
    assert_eq!(field(totals, "connections"), CLIENTS as u64);
    assert_eq!(field(totals, "memberships"), memberships as u64);
    assert_eq!(field(totals, "messages_in"), (0..CLIENTS).map(sent).sum::<u64>());
    let out = field(totals, "messages_out");
    assert!(out_ok(out, &mut (0..CLIENTS)), "totals.messages_out {out}");
    assert_eq!(field(totals, "published"), GROUPS as u64);
    assert_eq!(field(totals, "bad_requests"), 0);
    let rows = slot_rows(&report);
    assert_eq!(rows.len(), 2);
    let mut sum_groups = 0;
    for (w, row) in rows.iter().enumerate() {
        let mine: Vec<usize> = (0..CLIENTS).filter(|&i| on[i] == w).collect();
        let groups: BTreeSet<String> = mine.iter().flat_map(|&i| groups_of(i)).collect();
        assert_eq!(field(row, "connections"), mine.len() as u64, "worker {w}");
        assert_eq!(field(row, "groups"), groups.len() as u64, "worker {w}");
        assert_eq!(field(row, "memberships"), mine.iter().map(|&i| groups_of(i).len() as u64).sum::<u64>());
        assert_eq!(field(row, "messages_in"), mine.iter().map(|&i| sent(i)).sum::<u64>(), "worker {w}");
        let out = field(row, "messages_out");
        assert!(out_ok(out, &mut mine.iter().copied()), "worker {w}: messages_out {out}");
        assert_eq!(field(row, "published"), mine.iter().filter(|&&i| i < GROUPS).count() as u64, "worker {w}");
        sum_groups += groups.len() as u64;
    }
    let channel = channel_row(&report);
    assert_eq!(field(&channel, "connections"), 2, "both workers connected to the channel server");
    assert_eq!(field(&channel, "memberships"), sum_groups, "one subscription per (worker, group)");

    // ---- connections --json
    let run = server.cli(&["connections", "--json"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let list: Value = serde_json::from_str(&run.stdout).expect("connections --json is JSON");
    assert_eq!(list["missing_workers"], json!([]));
    let conns = list["connections"].as_array().unwrap();
    assert_eq!(conns.len(), CLIENTS, "one entry per connection");
    let by_peer: HashMap<String, &Value> = conns.iter().map(|c| (c["peer"].as_str().unwrap().to_owned(), c)).collect();
    assert_eq!(by_peer.len(), CLIENTS, "peers are distinct");
    let pids = worker_pids(&report);
    for (i, c) in clients.iter().enumerate() {
        let peer = format!("127.0.0.1:{}", c.port);
        let e = by_peer.get(&peer).unwrap_or_else(|| panic!("client {i} ({peer}) not listed: {list}"));
        assert_eq!(field(e, "worker"), on[i] as u64, "client {i}: {e}");
        assert_eq!(field(e, "worker_pid"), u64::from(pids[on[i]]), "client {i}: {e}");
        assert_eq!(e["state"], "open", "client {i}: {e}");
        let groups: BTreeSet<String> =
            e["groups"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_owned()).collect();
        assert_eq!(groups, groups_of(i), "client {i}: {e}");
        assert!(field(e, "bytes_in") > 0 && field(e, "bytes_out") > 0, "client {i}: {e}");
        assert_eq!(field(e, "messages_in"), sent(i), "client {i}: commands sent; {e}");
        let out = field(e, "messages_out");
        assert!(out_ok(out, &mut std::iter::once(i)), "client {i}: frames received {}; {e}", received(i));
        assert_eq!(field(e, "send_buffer"), 0, "client {i}: {e}");
    }

    // ---- the text forms
    let run = server.cli(&["status"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let table = run.stdout;
    let totals_line = format!("connections {CLIENTS}  memberships {memberships}  ");
    assert!(table.contains(&totals_line), "no totals line {totals_line:?} in:\n{table}");
    let procs: Vec<(String, u32)> =
        [("master".to_string(), server.master_pid), ("channel".into(), channel_pid(&report))]
            .into_iter()
            .chain(pids.iter().enumerate().map(|(w, &p)| (format!("worker-{w}"), p)))
            .collect();
    for (role, pid) in &procs {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(role))
            .unwrap_or_else(|| panic!("no row {role} in:\n{table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], pid.to_string(), "{row}");
        assert_eq!(cells[2], "running", "{row}");
    }
    for (w, row) in rows.iter().enumerate() {
        let line = table.lines().find(|l| l.starts_with(&format!("worker-{w} "))).unwrap();
        assert!(
            line.split_whitespace().any(|c| c == field(row, "connections").to_string()),
            "worker {w}'s connections in {line:?}"
        );
    }

    let run = server.cli(&["connections"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let text = run.stdout;
    assert_eq!(text.trim_end().lines().last(), Some(format!("{CLIENTS} connections").as_str()), "{text}");
    assert_eq!(text.lines().count(), CLIENTS + 2, "header, one line per connection, total:\n{text}");
    for c in &clients {
        assert!(text.contains(&format!("127.0.0.1:{}", c.port)), "{} missing:\n{text}", c.port);
    }
}

/// `messages_out` is documented as the frames queued to a client, "deliveries and replies"
/// (src/worker/conn.rs, `Conn::messages_out`; `ProcessStats::messages_out`: frames queued to
/// clients): a reply to a command with an id, or an error frame, is such a frame.
#[test]
fn messages_out_counts_replies() {
    let server = Server::start_with(Opts::workers(1));
    let mut c = Client::connect(server.addr);
    c.add_group(&json!("o"));
    c.send_to_group(&json!("o"), "one delivery");
    assert_eq!(c.recv(), "one delivery");
    c.sync_quiet(); // a reply
    assert_eq!(c.call(json!({"cmd":"nope"}))["error"], "unknown_cmd"); // an error frame
                                                                       // 3 frames received: the delivery, the reply and the error frame.
    let run = server.cli(&["connections", "--json"]);
    let list: Value = serde_json::from_str(&run.stdout).expect("connections --json is JSON");
    let e = &list["connections"][0];
    assert_eq!(field(e, "messages_in"), 4, "{e}");
    assert_eq!(field(e, "messages_out"), 3, "frames the client received: {e}");
    let report = server.status();
    assert_eq!(field(&report["totals"], "messages_out"), 3, "{}", report["totals"]);
}

#[test]
fn status_d_redraws_the_table() {
    let server = Server::start_with(Opts::workers(1));
    let out_path = server.dir.join("status-d.out");
    let mut child = Command::new(bin())
        .args(["status", "-d", "--pid-file", &server.pid_file_arg()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("run status -d");
    const CLEAR: &str = "\x1b[H\x1b[2J";
    let seen = std::panic::catch_unwind(|| {
        wait_for("status -d to draw twice", Duration::from_secs(15), || {
            let out = std::fs::read_to_string(&out_path).unwrap_or_default();
            (out.matches(CLEAR).count() >= 2).then_some(out)
        })
    });
    let still_running = matches!(child.try_wait(), Ok(None));
    // Kill the child we spawned (by its pid), then reap it.
    let _ = child.kill();
    let _ = child.wait();
    let out = seen.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(still_running, "status -d exited by itself:\n{out}");
    let frames: Vec<&str> = out.split(CLEAR).filter(|f| !f.is_empty()).collect();
    assert!(frames.len() >= 2, "{out:?}");
    for frame in &frames[..2] {
        assert!(frame.contains(&format!("master pid {}", server.master_pid)), "{frame}");
        assert!(frame.lines().any(|l| l.starts_with("worker-0 ")), "{frame}");
    }
}
