//! The operator's life cycle: `start -d` → `status` → `stop`, with exit codes, messages, and
//! nothing left behind; a second `start` of the same instance refused; `stop`/`status` of an
//! instance that does not run.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The files a running instance keeps beside its pid file.
fn instance_files(pid_file: &Path) -> [std::path::PathBuf; 3] {
    [pid_file.to_path_buf(), pid_file.with_file_name("g.ctl.sock"), pid_file.with_file_name("g.channel.sock")]
}

/// After a stop: no file of the instance, no process of it.
fn assert_gone(pid_file: &Path, master: u32, children: &[u32]) {
    for f in instance_files(pid_file) {
        assert!(!f.exists(), "{} left behind", f.display());
    }
    // The master reaps its children before it lets go of the pid file.
    for &pid in children {
        assert!(!alive(pid), "child {pid} survived the stop");
    }
    // The master itself may need a moment to finish exiting after releasing its lock.
    wait_for("the master to exit", Duration::from_secs(10), || (!alive(master)).then_some(()));
}

/// A client joins a group and gets its own message back: the instance serves.
fn assert_serves(server: &Server) {
    let mut c = Client::connect(server.addr);
    c.add_group(&json!("life"));
    c.send_to_group(&json!("life"), "alive");
    assert_eq!(c.recv(), "alive");
}

fn already_running(run: &Run) {
    assert_eq!(run.code, Some(1), "second start: {run:?}");
    assert!(run.stderr.contains("already running"), "second start: {run:?}");
}

#[test]
fn daemon_start_status_stop() {
    let dir = TempDir::new("daemon");
    let pid_file = dir.join("g.pid");
    let log_sock = dir.join("log.sock");
    let syslog = DatagramSink::bind(&log_sock);
    let config = dir.join("g.toml");
    std::fs::write(&config, format!("[log]\nsyslog_socket = \"{}\"\n", p(&log_sock))).unwrap();

    let start = run_timed(
        &["start", "-d", "--listen", "127.0.0.1:0", "--workers", "2", "--pid-file", p(&pid_file), "-c", p(&config)],
        dir.path(),
    );
    // Own the instance before asserting anything, so a failure still kills it.
    let server = Server::adopt_daemon(TempDir::new("daemon-guard"), pid_file.clone(), Some(2));
    assert_eq!(start.code, Some(0), "start -d: {start:?}");
    let announced = format!("groupcast started as a daemon (pid {})", server.master_pid);
    assert!(start.stdout.contains(&announced), "start -d said {start:?}, expected {announced:?}");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), server.master_pid.to_string());
    for f in instance_files(&pid_file) {
        assert!(f.exists(), "{} missing while running", f.display());
    }

    // Its log lines go to the configured syslog socket, tagged groupcast, each naming the
    // process that wrote it.
    wait_for("a ready line in syslog", TIMEOUT, || {
        syslog.lines().iter().any(|l| l.contains("groupcast") && l.contains("ready")).then_some(())
    });
    for who in ["master[", "channel[", "worker-0[", "worker-1["] {
        wait_for(&format!("syslog lines of {who}"), TIMEOUT, || {
            syslog.lines().iter().any(|l| l.contains("groupcast") && l.contains(who)).then_some(())
        });
    }

    // status, table and JSON.
    let table = groupcast(&["status", "--pid-file", p(&pid_file)]);
    assert!(table.status.success(), "status: {}", stderr(&table));
    assert!(stdout(&table).contains(&server.master_pid.to_string()));
    let report = server.status();
    assert_eq!(field(&report, "master_pid"), u64::from(server.master_pid));
    assert_eq!(report["workers"], 2);
    assert_eq!(report["channel"], format!("unix:{}", p(&pid_file.with_file_name("g.channel.sock"))));
    assert!(report["version"].as_str().is_some_and(|v| !v.is_empty()));
    assert!(report["load"].as_array().is_some_and(|l| l.len() == 3));
    let roles: Vec<&str> =
        report["processes"].as_array().unwrap().iter().map(|p| p["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["master", "channel", "worker", "worker"]);
    for proc in report["processes"].as_array().unwrap() {
        assert_eq!(proc["state"], "running");
        assert!(field(proc, "pid") > 0 && field(proc, "rss_kib") > 0, "{proc}");
        assert!(alive(field(proc, "pid") as u32));
    }
    assert_serves(&server);

    // A second start of the same instance is refused, daemon or not.
    let args = ["start", "--listen", "127.0.0.1:0", "--workers", "1", "--pid-file", p(&pid_file)];
    already_running(&run_timed(&args, dir.path()));
    let args = ["start", "-d", "--listen", "127.0.0.1:0", "--workers", "1", "--pid-file", p(&pid_file)];
    already_running(&run_timed(&args, dir.path()));
    assert_eq!(field(&server.status(), "master_pid"), u64::from(server.master_pid));
    assert_serves(&server);

    let children = server.child_pids();
    assert_eq!(children.len(), 3, "channel and two workers: {children:?}");
    let stop = run_timed(&["stop", "--pid-file", p(&pid_file)], dir.path());
    assert_eq!(stop.code, Some(0), "stop: {stop:?}");
    assert!(stop.stdout.contains("groupcast stopped"), "stop: {stop:?}");
    assert_gone(&pid_file, server.master_pid, &children);
    wait_for("the stop logged in syslog", TIMEOUT, || {
        syslog.lines().iter().any(|l| l.contains("groupcast stopped")).then_some(())
    });
    assert!(std::net::TcpStream::connect(server.addr).is_err(), "the WebSocket port still accepts connections");

    // Nothing runs any more.
    let again = run_timed(&["stop", "--pid-file", p(&pid_file)], dir.path());
    assert_eq!(again.code, Some(1), "second stop: {again:?}");
    assert!(again.stderr.contains("not running"), "second stop: {again:?}");
    let status = run_timed(&["status", "--pid-file", p(&pid_file), "--json"], dir.path());
    assert_eq!(status.code, Some(1), "status after stop: {status:?}");
    assert!(status.stdout.is_empty(), "status after stop: {status:?}");
}

#[test]
fn daemon_without_syslog_warns_and_serves() {
    let dir = TempDir::new("daemon-nolog");
    let pid_file = dir.join("g.pid");
    let config = dir.join("g.toml");
    let missing = dir.join("no-such-syslog.sock");
    std::fs::write(&config, format!("[log]\nsyslog_socket = \"{}\"\n", p(&missing))).unwrap();
    // Global flags before the subcommand work too.
    let start = run_timed(
        &["-c", p(&config), "--pid-file", p(&pid_file), "start", "-d", "--listen", "127.0.0.1:0", "--workers", "1"],
        dir.path(),
    );
    let server = Server::adopt_daemon(TempDir::new("daemon-nolog-guard"), pid_file.clone(), Some(1));
    assert_eq!(start.code, Some(0), "start -d: {start:?}");
    assert!(start.stderr.contains("warning"), "no warning about syslog: {start:?}");
    assert!(start.stderr.contains(p(&missing)), "warning names the socket: {start:?}");
    assert_serves(&server);
    let children = server.child_pids();
    let stop = run_timed(&["--pid-file", p(&pid_file), "stop"], dir.path());
    assert_eq!(stop.code, Some(0), "stop: {stop:?}");
    assert_gone(&pid_file, server.master_pid, &children);
}

#[test]
fn foreground_start_refuses_a_second_start_and_stops() {
    let mut server = Server::start_with(Opts::workers(2));
    let pid_file = server.pid_file.clone();
    let dir = server.dir.path().to_path_buf();
    let args = ["start", "--listen", "127.0.0.1:0", "--workers", "1", "--pid-file", p(&pid_file)];
    already_running(&run_timed(&args, &dir));
    let args = ["start", "-d", "--listen", "127.0.0.1:0", "--pid-file", p(&pid_file)];
    already_running(&run_timed(&args, &dir));
    // The refused starts did not disturb the running instance or its files.
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), server.master_pid.to_string());
    assert_eq!(field(&server.status(), "master_pid"), u64::from(server.master_pid));
    assert_serves(&server);

    let children = server.child_pids();
    let master = server.master_pid;
    let stop = run_timed(&["stop", "--pid-file", p(&pid_file)], &dir);
    assert_eq!(stop.code, Some(0), "stop: {stop:?}");
    assert!(stop.stdout.contains("groupcast stopped"), "stop: {stop:?}");
    // Our child: reap it (a zombie until then) and see it exited cleanly.
    let mut child = server.take_child().unwrap();
    let status = wait_for("the master to exit", TIMEOUT, || child.try_wait().unwrap());
    assert!(status.success(), "master exited with {status}\n{}", server.log());
    assert_gone(&pid_file, master, &children);
}

#[test]
fn sigint_stops_a_foreground_instance() {
    let mut server = Server::start_with(Opts::workers(2));
    let children = server.child_pids();
    let master = server.master_pid;
    signal(master, libc::SIGINT);
    let mut child = server.take_child().unwrap();
    let status = wait_for("the master to exit", TIMEOUT, || child.try_wait().unwrap());
    assert!(status.success(), "master exited with {status}\n{}", server.log());
    assert_gone(&server.pid_file, master, &children);
}

#[test]
fn stop_and_status_when_nothing_runs() {
    let dir = TempDir::new("idle");
    let pid_file = dir.join("g.pid");
    let stop = run_timed(&["stop", "--pid-file", p(&pid_file)], dir.path());
    assert_eq!(stop.code, Some(1), "{stop:?}");
    assert!(stop.stderr.contains("not running"), "{stop:?}");
    for args in [&["status", "--pid-file", p(&pid_file)][..], &["status", "--pid-file", p(&pid_file), "--json"]] {
        let status = run_timed(args, dir.path());
        assert_eq!(status.code, Some(1), "{status:?}");
        assert!(status.stderr.contains("not running"), "{status:?}");
    }

    // A stale pid file and control socket (left by a crash) mean "not running" too, and do
    // not stop a new start.
    std::fs::write(&pid_file, "999999\n").unwrap();
    let stale = std::os::unix::net::UnixListener::bind(pid_file.with_file_name("g.ctl.sock")).unwrap();
    drop(stale);
    let stop = run_timed(&["stop", "--pid-file", p(&pid_file)], dir.path());
    assert_eq!(stop.code, Some(1), "{stop:?}");
    assert!(stop.stderr.contains("not running"), "{stop:?}");
    let status = run_timed(&["status", "--pid-file", p(&pid_file), "--json"], dir.path());
    assert_eq!(status.code, Some(1), "{status:?}");

    let mut child = std::process::Command::new(bin())
        .args(["start", "--listen", "127.0.0.1:0", "--workers", "1", "--pid-file", p(&pid_file)])
        .stderr(std::fs::File::create(dir.join("stale-start.log")).unwrap())
        .spawn()
        .unwrap();
    // The instance this start creates is owned by a guard as soon as it answers.
    let server =
        std::panic::catch_unwind(|| Server::adopt_daemon(TempDir::new("stale-guard"), pid_file.clone(), Some(1)));
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            std::panic::resume_unwind(e);
        }
    };
    assert_eq!(server.master_pid, child.id());
    assert_serves(&server);
    drop(server);
    let status = wait_for("the master to exit", TIMEOUT, || child.try_wait().unwrap());
    assert!(status.success(), "{status}");
}
