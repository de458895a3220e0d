//! `groupcast restart`: stops the running instance (gracefully with -g) and starts a new one
//! with the given flags; the new master serves, the old processes are gone.

mod common;

use common::{alive, run_timed, Server, TempDir};

#[test]
fn restart_replaces_every_process_and_serves_again() {
    let dir = TempDir::new("restart");
    let pid_file = dir.join("g.pid");
    let pid = pid_file.to_str().unwrap();
    let config = dir.join("g.toml");
    std::fs::write(
        &config,
        format!("graceful_timeout_ms = 1000\n[log]\nsyslog_socket = \"{}\"\n", dir.join("none.sock").display()),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let start = run_timed(
        &["-c", cfg, "--pid-file", pid, "start", "-d", "--listen", "127.0.0.1:0", "--workers", "2"],
        dir.path(),
    );
    let first = Server::adopt_daemon(TempDir::new("restart-guard-1"), pid_file.clone(), Some(2));
    assert_eq!(start.code, Some(0), "{start:?}");
    let old_pids: Vec<u32> = std::iter::once(first.master_pid).chain(first.child_pids()).collect();

    let restart = run_timed(
        &["-c", cfg, "--pid-file", pid, "restart", "-g", "-d", "--listen", "127.0.0.1:0", "--workers", "2"],
        dir.path(),
    );
    let second = Server::adopt_daemon(TempDir::new("restart-guard-2"), pid_file.clone(), Some(2));
    assert_eq!(restart.code, Some(0), "{restart:?}");
    assert!(restart.stdout.contains("groupcast stopped"), "{restart:?}");
    assert!(restart.stdout.contains("groupcast started as a daemon"), "{restart:?}");
    assert_ne!(second.master_pid, first.master_pid);
    for p in &old_pids {
        assert!(!alive(*p), "process {p} of the first instance survived the restart");
    }
    // The new instance serves.
    let mut c = common::Client::connect(second.addr);
    c.add_group(&serde_json::json!("r"));
    c.send_to_group(&serde_json::json!("r"), "after restart");
    assert_eq!(c.recv(), "after restart");
    drop(first);
}
