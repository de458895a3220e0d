//! Issue 10, defect 14: a reload keeps every setting it says needs a restart. `bus` and
//! `redis` were reported as kept but replaced, so a reload from the channel to Redis started
//! workers on a bus nothing else used: they stopped hearing the other workers.

mod common;

use common::*;
use serde_json::json;

#[test]
fn issue10_reload_with_a_changed_bus_keeps_the_running_bus() {
    let server = Server::start_with(Opts { config: Some("bus = \"channel\"\n".into()), ..Opts::workers(2) });
    std::fs::write(server.dir.join("g.toml"), "bus = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:1/\"\n").unwrap();
    let run = server.cli(&["reload"]);
    assert_eq!(run.code, Some(0), "reload: {run:?}");
    assert!(server.log().contains("reload keeps the running bus, redis"), "{}", server.log());
    let report = server.wait_status("the new workers on the channel", |r| {
        r["reloading"] == false && worker_rows(r).iter().all(|w| w["channel_connected"] == true)
    });
    assert_eq!(report["last_reload"]["ok"], true, "{}", report["last_reload"]);
    // Delivery still crosses the workers.
    let (mut clients, on) = server.connect_spread(1);
    assert!(on.contains(&0) && on.contains(&1), "clients on both workers: {on:?}");
    for c in &mut clients {
        c.add_group(&json!("b"));
        c.sync_quiet();
    }
    server.wait_subscriptions(clients.len() as u64);
    clients[0].send_to_group(&json!("b"), "still on the channel");
    for c in &mut clients {
        assert_eq!(c.recv(), "still on the channel");
    }
}
