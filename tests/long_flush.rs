//! A worker flushing many connections reads the bus every 32 of them, and group messages that
//! came from the other worker meanwhile join the queues not written yet (worker/mod.rs
//! `flush_members`; issue 15). Groups of ~200 members over 2 workers make every flush long;
//! four publishers, on both workers, publish concurrently; seed and protocol-2 members mixed.
//! Every member must get every message of its groups exactly once, in order per publisher,
//! protocol-2 ones in envelopes with consecutive offsets.

mod common;

use std::time::Duration;

use common::*;

const CONFIG: &str = "[limits]\ncommands_per_second = 100000\ncommands_burst = 100000\n";

#[test]
fn concurrent_publishers_reach_big_groups_exactly_once_in_order() {
    let server = Server::start_with(Opts { config: Some(CONFIG.into()), ..Opts::workers(2) });
    let shape = LoadShape {
        members: 600,
        groups: 3,
        max_groups_per_member: 2,
        publishers: 4,
        period: Duration::from_millis(1),
        seed: 15,
    };
    let mut load = GroupLoad::start(server.addr, &shape, Duration::from_secs(60));
    server.wait_subscriptions(load.memberships());
    load.run_for(Duration::from_secs(2));
    load.wait_acks(Duration::from_secs(60));
    load.check_delivery(Duration::from_secs(60));
    assert!(load.published() > 200, "only {} publishes in 2 s", load.published());
}
