//! Groups spanning two workers: 200 clients spread by the kernel over both, ten groups,
//! senders on both workers; status reflects exactly what the clients did, and every message
//! reaches every member once, in order, and no one else.

mod common;

use std::collections::{BTreeSet, HashSet};

use common::*;
use serde_json::{json, Value};

const CLIENTS: usize = 200;
const GROUPS: usize = 10;
const PER_FLOW: usize = 3;

/// Canonical name of group `g`: eight numeric groups (joined and addressed both as integers and
/// as strings) and two non-numeric ones with non-ASCII characters.
fn canon(g: usize) -> String {
    if g < 8 {
        (1000 + g).to_string()
    } else {
        format!("room-é-{g}")
    }
}

/// The `group_id` a client uses for group `g`: for numeric groups, `variant` picks integer
/// or string form.
fn group_id(g: usize, variant: usize) -> Value {
    match (g < 8, variant % 2) {
        (true, 0) => json!(1000 + g),
        (true, _) => json!((1000 + g).to_string()),
        (false, _) => json!(canon(g)),
    }
}

#[test]
fn groups_across_workers_deliver_exactly_once() {
    let server = Server::start_with(Opts::workers(2));
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);

    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| Client::connect(server.addr)).collect();
    let mut member_of: Vec<HashSet<String>> = Vec::new();
    let mut joined: Vec<Vec<usize>> = Vec::new();
    for (c, client) in clients.iter_mut().enumerate() {
        let want = 1 + rng.below(3);
        let mut mine: Vec<usize> = Vec::new();
        while mine.len() < want {
            let g = rng.below(GROUPS);
            if !mine.contains(&g) {
                mine.push(g);
            }
        }
        for (k, &g) in mine.iter().enumerate() {
            client.add_group(&group_id(g, c + k));
        }
        if c % 5 == 0 {
            // Joining again under the other spelling of the id is the same membership.
            client.add_group(&group_id(mine[0], c + 1));
        }
        member_of.push(mine.iter().map(|&g| canon(g)).collect());
        joined.push(mine);
    }
    // Every command processed, and none of them answered: no id, no reply.
    for client in &mut clients {
        client.sync_quiet();
    }
    let memberships: usize = member_of.iter().map(HashSet::len).sum();
    let report = server.wait_subscriptions(memberships as u64);

    // Where the kernel put each client, and what status must say about it.
    let refs: Vec<&Client> = clients.iter().collect();
    let on = server.workers_of(&refs);
    let workers = worker_rows(&report);
    assert_eq!(workers.len(), 2);
    let mut worker_groups = Vec::new();
    for (w, row) in workers.iter().enumerate() {
        let mine: Vec<usize> = (0..CLIENTS).filter(|&c| on[c] == w).collect();
        let groups: BTreeSet<&String> = mine.iter().flat_map(|&c| &member_of[c]).collect();
        let members: usize = mine.iter().map(|&c| member_of[c].len()).sum();
        assert!(!mine.is_empty(), "worker {w} got no connection: {on:?}");
        assert_eq!(field(row, "connections"), mine.len() as u64, "worker {w} connections");
        assert_eq!(field(row, "groups"), groups.len() as u64, "worker {w} groups");
        assert_eq!(field(row, "memberships"), members as u64, "worker {w} memberships");
        assert_eq!(row["state"], "running");
        worker_groups.push(groups.len() as u64);
    }
    assert_eq!(field(&report["totals"], "connections"), CLIENTS as u64);
    assert_eq!(field(&report["totals"], "memberships"), memberships as u64);
    let channel = channel_row(&report);
    assert_eq!(field(&channel, "connections"), 2, "both workers connected to the channel");
    assert_eq!(field(&channel, "groups"), GROUPS as u64);
    assert_eq!(field(&channel, "memberships"), worker_groups.iter().sum::<u64>());

    // Every client sends to one of its own groups (it must get its own messages back) and to
    // one random group (often one it is not in: then it must get nothing back).
    let mut flows = Vec::new();
    for c in 0..CLIENTS {
        let own = joined[c][rng.below(joined[c].len())];
        let other = rng.below(GROUPS);
        for (k, g) in [own, other].into_iter().enumerate() {
            if k == 1 && g == own {
                continue;
            }
            flows.push(Flow { sender: c, group: canon(g), group_id: group_id(g, c + k + 1) });
        }
    }
    let senders_on: BTreeSet<usize> = flows.iter().map(|f| on[f.sender]).collect();
    assert_eq!(senders_on.len(), 2, "senders on both workers");
    assert!(
        flows.iter().any(|f| !member_of[f.sender].contains(&f.group)),
        "some senders are not members of their target group"
    );
    assert!(
        flows.iter().any(|f| member_of[f.sender].contains(&f.group)),
        "some senders are members of their target group (and get their own messages)"
    );

    let delivered = exchange(&mut clients, &member_of, &flows, PER_FLOW, "x");
    let expected: usize =
        flows.iter().map(|f| member_of.iter().filter(|m| m.contains(&f.group)).count() * (PER_FLOW + 1)).sum();
    assert_eq!(delivered, expected as u64);

    // The servers' own account: each group frame queued once per member, each publish seen
    // once by the broker.
    let sends = (flows.len() * (PER_FLOW + 1)) as u64;
    let report =
        server.wait_status("the broker to count every publish", |r| field(&channel_row(r), "published") >= sends);
    assert_eq!(field(&report["totals"], "published"), sends);
    assert_eq!(field(&channel_row(&report), "published"), sends);
    // messages_out counts every frame queued to a client: the group deliveries plus the
    // replies to the commands that carried an id (joins and probes).
    assert!(field(&report["totals"], "messages_out") >= expected as u64);
    assert_eq!(field(&report["totals"], "send_failures"), 0);
    assert_eq!(field(&report["totals"], "bad_requests"), 0);
    // Nothing more trickles in afterwards.
    for client in clients.iter_mut().step_by(7) {
        client.sync_quiet();
    }
}
