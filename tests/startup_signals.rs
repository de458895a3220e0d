//! Issue 10, defect 13: the master installs its signal handlers before anything else, so a
//! SIGHUP (reload) that arrives while the children are still starting is handled once they are
//! up, instead of killing the master with the signal's default action.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn issue10_sighup_during_startup_does_not_kill_the_master() {
    let dir = TempDir::new("hupstart");
    let pid_file = dir.join("g.pid");
    // From the moment the pid file names the master (it is written just before the children
    // are spawned) until the instance serves, SIGHUP it over and over.
    let hupper = std::thread::spawn(move || {
        let deadline = Instant::now() + TIMEOUT;
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
                break pid;
            }
            assert!(Instant::now() < deadline, "no pid file");
            std::thread::sleep(Duration::from_millis(1));
        };
        let mut sent = 0;
        while alive(pid) && sent < 200 {
            signal(pid, libc::SIGHUP);
            sent += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        (pid, sent)
    });
    // Eight workers: startup takes long enough for the signals to land in it.
    let server = Server::launch(Launch::new(dir, Opts::workers(8)));
    let (pid, sent) = hupper.join().unwrap();
    assert_eq!(pid, server.master_pid);
    assert!(sent > 0);
    assert!(alive(server.master_pid), "the master died of a SIGHUP during startup:\n{}", server.log());
    // The SIGHUPs were taken as reload requests, and the instance still serves once they end.
    server.wait_status("the reloads to end", |r| r["reloads"].as_u64() > Some(0) && r["reloading"] == false);
    let mut c = Client::connect(server.addr);
    c.add_group(&serde_json::json!("h"));
    c.sync_quiet();
    server.wait_subscriptions(1);
    c.send_to_group(&serde_json::json!("h"), "after the storm");
    assert_eq!(c.recv(), "after the storm");
}
