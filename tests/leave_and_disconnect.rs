//! Leaving a group stops delivery at once; a disconnected client's memberships vanish from the
//! worker and the broker, and the others keep receiving.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::json;

fn set(groups: &[&str]) -> HashSet<String> {
    groups.iter().map(|g| g.to_string()).collect()
}

/// Indices of the first `n` clients on worker `w`.
fn pick(on: &[usize], w: usize, n: usize) -> Vec<usize> {
    let found: Vec<usize> = (0..on.len()).filter(|&c| on[c] == w).take(n).collect();
    assert_eq!(found.len(), n, "not enough clients on worker {w}: {on:?}");
    found
}

#[test]
fn leave_group_stops_delivery() {
    let server = Server::start_with(Opts::workers(2));
    let (mut clients, on) = server.connect_spread(3);
    // Per worker: a leaver, a witness that stays (proves its worker delivered past the point
    // where the leaver would have received), a sender.
    let w0 = pick(&on, 0, 3);
    let w1 = pick(&on, 1, 3);
    let leavers = [w0[0], w1[0]];
    let senders = [w0[2], w1[2]];
    let mut member_of: Vec<HashSet<String>> = vec![set(&["A"]); clients.len()];
    for (c, client) in clients.iter_mut().enumerate() {
        client.add_group(&json!("A"));
        if leavers.contains(&c) {
            // A group only the leaver is in, on its worker, to watch the subscription go.
            client.add_group(&json!(format!("solo-{c}")));
            member_of[c].insert(format!("solo-{c}"));
        }
        client.sync_quiet();
    }
    let total: usize = member_of.iter().map(HashSet::len).sum();
    let before = server.wait_subscriptions(total as u64);
    for w in 0..2 {
        assert_eq!(field(&worker_rows(&before)[w], "groups"), 2, "A and one solo group");
    }
    assert_eq!(field(&channel_row(&before), "groups"), 3);

    // Everyone gets a first round, leavers included.
    let flows: Vec<Flow> =
        senders.iter().map(|&s| Flow { sender: s, group: "A".into(), group_id: json!("A") }).collect();
    exchange(&mut clients, &member_of, &flows, 2, "before");

    for &l in &leavers {
        clients[l].leave_group(&json!("A"));
        clients[l].leave_group(&json!(format!("solo-{l}")));
        // Leaving a group one is not in (or leaving twice) is harmless.
        clients[l].leave_group(&json!("A"));
        clients[l].sync_quiet();
        member_of[l].clear();
    }
    let total: usize = member_of.iter().map(HashSet::len).sum();
    let after = server.wait_subscriptions(total as u64);
    for w in 0..2 {
        let row = &worker_rows(&after)[w];
        assert_eq!(field(row, "groups"), 1, "solo group gone from worker {w}");
        assert_eq!(field(row, "connections"), on.iter().filter(|&&x| x == w).count() as u64);
    }
    assert_eq!(field(&channel_row(&after), "groups"), 1, "solo subscriptions dropped");
    assert_eq!(field(&channel_row(&after), "memberships"), 2);

    // Second round: the witnesses on both workers receive everything (exchange checks it),
    // the leavers nothing at all.
    exchange(&mut clients, &member_of, &flows, 5, "after");
    for &l in &leavers {
        let got = clients[l].sync();
        assert!(got.is_empty(), "client {l} left A but still received {got:?}");
    }
}

#[test]
fn disconnect_drops_memberships() {
    let server = Server::start_with(Opts::workers(2));
    let (mut clients, on) = server.connect_spread(3);
    let w0 = pick(&on, 0, 3);
    let w1 = pick(&on, 1, 3);
    // One client per worker goes away: w0's politely (close handshake), w1's abruptly.
    let polite = w0[0];
    let abrupt = w1[0];
    let mut member_of: Vec<HashSet<String>> = vec![set(&["A"]); clients.len()];
    for c in [polite, abrupt] {
        member_of[c] = set(&["A", "B", &format!("only-{c}")]);
    }
    for (c, client) in clients.iter_mut().enumerate() {
        let mut groups: Vec<&String> = member_of[c].iter().collect();
        groups.sort();
        for g in groups {
            client.add_group(&json!(g));
        }
        client.sync_quiet();
    }
    let n = clients.len() as u64;
    let total: usize = member_of.iter().map(HashSet::len).sum();
    let before = server.wait_subscriptions(total as u64);
    assert_eq!(field(&before["totals"], "connections"), n);
    for w in 0..2 {
        assert_eq!(field(&worker_rows(&before)[w], "groups"), 3, "A, B, only-*");
    }

    // Remove the two from the vector (highest index first), closing one of them properly.
    let (first, second) = (polite.max(abrupt), polite.min(abrupt));
    let a = clients.remove(first);
    let b = clients.remove(second);
    let (mut polite_client, abrupt_client) = if first == polite { (a, b) } else { (b, a) };
    member_of.remove(first);
    member_of.remove(second);
    polite_client.close();
    drop(abrupt_client);
    drop(polite_client);

    let total: usize = member_of.iter().map(HashSet::len).sum();
    let after = server.wait_status("the two departed clients to be forgotten", |r| {
        field(&r["totals"], "connections") == n - 2
            && field(&r["totals"], "memberships") == total as u64
            && field(&channel_row(r), "groups") == 1
    });
    for (w, row) in worker_rows(&after).iter().enumerate() {
        let left = on.iter().filter(|&&x| x == w).count() as u64 - 1;
        assert_eq!(field(row, "connections"), left, "worker {w}");
        assert_eq!(field(row, "memberships"), left, "worker {w}: only A is left");
        assert_eq!(field(row, "groups"), 1, "worker {w}: B and only-* are gone");
    }
    assert_eq!(field(&channel_row(&after), "memberships"), 2);

    // The others still get everything, from senders on both workers.
    let refs: Vec<&Client> = clients.iter().collect();
    let on = server.workers_of(&refs);
    let senders = [on.iter().position(|&w| w == 0).unwrap(), on.iter().position(|&w| w == 1).unwrap()];
    let flows: Vec<Flow> = senders
        .iter()
        .flat_map(|&s| {
            [("A", json!("A")), ("B", json!("B"))].map(|(g, id)| Flow { sender: s, group: g.into(), group_id: id })
        })
        .collect();
    exchange(&mut clients, &member_of, &flows, 4, "left");
    assert_eq!(field(&server.status()["totals"], "send_failures"), 0);
}
