//! A worker killed with SIGKILL is restarted by the master at the same index with a new pid;
//! clients of the other worker never notice, and new clients land on both workers again.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::json;

fn in_group(n: usize, g: &str) -> Vec<HashSet<String>> {
    vec![[g.to_string()].into(); n]
}

fn flows_from(senders: &[usize], g: &str) -> Vec<Flow> {
    senders.iter().map(|&s| Flow { sender: s, group: g.into(), group_id: json!(g) }).collect()
}

#[test]
fn killed_worker_is_restarted_and_others_keep_receiving() {
    let server = Server::start_with(Opts::workers(2));
    let (all, on) = server.connect_spread(3);
    let mut victims = Vec::new();
    let mut survivors = Vec::new();
    for (c, client) in all.into_iter().enumerate() {
        if on[c] == 0 {
            victims.push(client);
        } else {
            survivors.push(client);
        }
    }
    for c in victims.iter_mut().chain(survivors.iter_mut()) {
        c.add_group(&json!("r"));
        c.sync_quiet();
    }
    let before = server.wait_subscriptions((victims.len() + survivors.len()) as u64);
    let rows = worker_rows(&before);
    let (old0, old1) = (field(&rows[0], "pid") as u32, field(&rows[1], "pid") as u32);
    assert_eq!(field(&rows[0], "restarts"), 0);
    assert!(belongs_to(old0, &server.pid_file));

    signal(old0, libc::SIGKILL);

    // The victims' connections die with their worker.
    for c in &mut victims {
        c.expect_dropped();
    }
    // The survivors keep receiving from each other all along, whatever the state of worker 0.
    let members = in_group(survivors.len(), "r");
    let senders: Vec<usize> = (0..survivors.len()).collect();
    exchange(&mut survivors, &members, &flows_from(&senders, "r"), 3, "during");

    let after = server.wait_status("worker 0 to be restarted", |r| {
        let rows = worker_rows(r);
        rows[0]["state"] == "running" && field(&rows[0], "pid") as u32 != old0 && rows[0]["channel_connected"] == true
    });
    let rows = worker_rows(&after);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["index"], 0);
    assert_eq!(field(&rows[0], "restarts"), 1, "{}", rows[0]);
    assert_eq!(field(&rows[0], "connections"), 0, "the new worker starts empty");
    assert_eq!(field(&rows[1], "pid") as u32, old1, "worker 1 untouched");
    assert_eq!(field(&rows[1], "restarts"), 0);
    assert_eq!(field(&after["totals"], "restarts"), 1);
    assert_eq!(field(&rows[1], "connections"), survivors.len() as u64);
    assert!(!alive(old0), "the killed worker is reaped");
    // The dead worker's subscriptions went with it; the survivors' remain.
    server.wait_subscriptions(survivors.len() as u64);

    // New clients land on both workers again, and delivery crosses between them.
    let (fresh, fresh_on) = server.connect_spread(2);
    let mut clients: Vec<Client> = survivors;
    let old_count = clients.len();
    clients.extend(fresh);
    for c in clients[old_count..].iter_mut() {
        c.add_group(&json!("r"));
        c.sync_quiet();
    }
    let report = server.wait_subscriptions(clients.len() as u64);
    let rows = worker_rows(&report);
    let fresh_on_0 = fresh_on.iter().filter(|&&w| w == 0).count() as u64;
    assert_eq!(field(&rows[0], "connections"), fresh_on_0);
    assert_eq!(field(&rows[0], "memberships"), fresh_on_0);
    let refs: Vec<&Client> = clients.iter().collect();
    let on = server.workers_of(&refs);
    let senders = [on.iter().position(|&w| w == 0).unwrap(), on.iter().position(|&w| w == 1).unwrap()];
    let members = in_group(clients.len(), "r");
    exchange(&mut clients, &members, &flows_from(&senders, "r"), 5, "after");
    assert_eq!(field(&server.status()["totals"], "restarts"), 1);
}
