//! Started as root with `user`/`group` in the config, the master binds, hands its files to
//! that user and switches to it before starting any child: every process of the instance runs
//! unprivileged, serves, and still stops cleanly. Needs root: skipped otherwise, failed under CI.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use serde_json::json;

fn uid_of(name: &str) -> Option<u32> {
    let out = std::process::Command::new("id").args(["-u", name]).output().ok()?;
    out.status.success().then(|| stdout(&out).trim().parse().ok()).flatten()
}

fn group_exists(name: &str) -> bool {
    std::process::Command::new("getent").args(["group", name]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn root_drops_to_the_configured_user() {
    // SAFETY: geteuid(2) only reads the caller's credentials.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI: the privilege drop test needs root");
        eprintln!("note: not root; skipping the privilege drop test");
        return;
    }
    let Some(nobody) = uid_of("nobody") else {
        assert!(std::env::var_os("CI").is_none(), "CI: the privilege drop test needs a user `nobody`");
        eprintln!("note: no user `nobody`; skipping the privilege drop test");
        return;
    };
    let dir = TempDir::new("privs");
    // The pid file's directory must let the service user remove its files at stop.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    // The children are exec'd by `nobody`: start from a copy it can surely read and run.
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::set_permissions(dir.join("bin"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("bin").join("groupcast");
    install_executable(&binary_bytes(), &exe, None);
    let mut config = "user = \"nobody\"\n".to_string();
    if group_exists("nogroup") {
        config.push_str("group = \"nogroup\"\n");
    }
    let mut server = Server::launch(Launch {
        bin: exe.clone(),
        ..Launch::new(dir, Opts { config: Some(config), ..Opts::workers(2) })
    });

    let report = server.status();
    let pids: Vec<u32> = report["processes"].as_array().unwrap().iter().map(|p| field(p, "pid") as u32).collect();
    assert_eq!(pids.len(), 4, "master, channel, two workers");
    assert_eq!(pids[0], server.master_pid);
    for pid in &pids {
        assert_eq!(proc_uid(*pid), Some(nobody), "process {pid} does not run as nobody (uid {nobody})");
    }
    assert!(server.log().contains(&format!("running as uid {nobody}")), "{}", server.log());
    for f in server.instance_files() {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&f).unwrap().uid(), nobody, "{} is handed to nobody", f.display());
    }

    // It serves, across workers.
    let (mut clients, _) = server.connect_spread(1);
    for c in &mut clients {
        c.add_group(&json!("p"));
        c.sync_quiet();
    }
    server.wait_subscriptions(clients.len() as u64);
    clients[0].send_to_group(&json!("p"), "unprivileged");
    for c in &mut clients {
        assert_eq!(c.recv(), "unprivileged");
    }

    // `stop` (run as root) works, and the unprivileged master removes its files.
    let children = server.child_pids();
    let master = server.master_pid;
    let stop = server.cli(&["stop"]);
    assert_eq!(stop.code, Some(0), "stop: {stop:?}");
    let status = server.wait_master_exit(TIMEOUT);
    assert!(status.success(), "master exited with {status}\n{}", server.log());
    assert_instance_gone(&server.pid_file, master, &children);
}
