//! Integration with the host: a daemon's log lines reach the configured syslog socket with
//! the configured facility (start, reload, a crash, stop); systemd readiness notifications
//! (READY, RELOADING, STOPPING) go to `$NOTIFY_SOCKET`; the unit file passes
//! `systemd-analyze verify`; `scripts/install --destdir` stages every file.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Syslog priority of facility local3 (19) with `severity`.
fn local3(severity: u32) -> String {
    format!("<{}>", 19 * 8 + severity)
}
const INFO: u32 = 6;
const ERR: u32 = 3;

#[test]
fn daemon_logs_start_reload_crash_and_stop_to_syslog() {
    let dir = TempDir::new("syslog");
    let pid_file = dir.join("g.pid");
    let log_sock = dir.join("log.sock");
    let syslog = DatagramSink::bind(&log_sock);
    let config = dir.join("g.toml");
    std::fs::write(&config, format!("[log]\nsyslog_socket = \"{}\"\nsyslog_facility = \"local3\"\n", p(&log_sock)))
        .unwrap();
    let start = run_timed(
        &["start", "-d", "--listen", "127.0.0.1:0", "--workers", "2", "--pid-file", p(&pid_file), "-c", p(&config)],
        dir.path(),
    );
    let server = Server::adopt_daemon(TempDir::new("syslog-guard"), pid_file.clone(), Some(2));
    assert_eq!(start.code, Some(0), "start -d: {start:?}");
    assert!(!start.stderr.contains("syslog"), "syslog is reachable, no warning about it: {start:?}");

    let is_info = |l: &str, what: &str| l.starts_with(&local3(INFO)) && l.contains("groupcast[") && l.contains(what);
    let ready = syslog.wait_line("the ready line", 0, |l| is_info(l, "master[") && l.contains(" ready: "));
    assert!(syslog.lines()[ready].contains(&format!("groupcast[{}]", server.master_pid)), "{}", syslog.lines()[ready]);

    let reload = run_timed(&["reload", "--pid-file", p(&pid_file)], dir.path());
    assert_eq!(reload.code, Some(0), "reload: {reload:?}");
    let mark = syslog.wait_line("the reload start", ready, |l| is_info(l, "reload 1 (immediate) started"));
    syslog.wait_line("the reload outcome", mark, |l| is_info(l, "reload 1: reloaded 2 workers"));

    let victim = worker_pids(&server.status())[1];
    signal(victim, libc::SIGKILL);
    let crash = syslog.wait_line("the crash, as an error", mark, |l| {
        l.starts_with(&local3(ERR)) && l.contains("worker-1 was killed by signal 9")
    });
    server.wait_status("worker 1 restarted", |r| {
        let rows = slot_rows(r);
        field(&rows[1], "pid") as u32 != victim && rows[1]["state"] == "running" && rows[1]["channel_connected"] == true
    });

    let stop = run_timed(&["stop", "--pid-file", p(&pid_file)], dir.path());
    assert_eq!(stop.code, Some(0), "stop: {stop:?}");
    syslog.wait_line("the stop line", crash, |l| is_info(l, "groupcast stopped"));

    // Every line of every process carries the facility and the identity.
    for line in syslog.lines() {
        let pri: u32 = line[1..line.find('>').expect("a priority")].parse().unwrap();
        assert_eq!(pri / 8, 19, "not facility local3: {line}");
        assert!(line.contains("groupcast["), "no identity: {line}");
    }
    assert!(syslog.lines().len() > 5, "{:?}", syslog.lines());
}

#[test]
fn systemd_notifications_ready_reloading_stopping() {
    let dir = TempDir::new("notify");
    let notify_sock = dir.join("notify.sock");
    let notes = DatagramSink::bind(&notify_sock);
    let mut server = Server::launch(Launch {
        env: vec![("NOTIFY_SOCKET".into(), p(&notify_sock).into())],
        ..Launch::new(dir, Opts::workers(2))
    });
    let master = server.master_pid;
    let ready = notes.wait_line("READY=1", 0, |l| l.split('\n').any(|f| f == "READY=1"));
    assert!(notes.lines()[ready].split('\n').any(|f| f == format!("MAINPID={master}")), "{:?}", notes.lines());
    assert_eq!(ready, 0, "READY is the first notification: {:?}", notes.lines());

    let run = server.cli(&["reload"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let reloading = notes.wait_line("RELOADING=1", ready + 1, |l| l == "RELOADING=1");
    notes.wait_line("READY=1 after the reload", reloading + 1, |l| l == "READY=1");

    signal(master, libc::SIGTERM);
    let status = server.wait_master_exit(TIMEOUT);
    assert!(status.success(), "{status}");
    let stopping = notes.wait_line("STOPPING=1", reloading + 1, |l| l == "STOPPING=1");
    assert_eq!(stopping, notes.lines().len() - 1, "STOPPING is the last notification: {:?}", notes.lines());
    // Only the master notifies (children do not inherit NOTIFY_SOCKET): exactly these four.
    assert_eq!(notes.lines().len(), 4, "{:?}", notes.lines());
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let dir = TempDir::new("unit");
    let Ok(which) = Command::new("sh").args(["-c", "command -v systemd-analyze"]).output() else {
        return skip_or_fail("no sh to look for systemd-analyze");
    };
    if !require(which.status.success(), "systemd-analyze is not installed (package systemd)") {
        return;
    }
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/groupcast.service")).unwrap();
    assert!(unit.contains("/usr/local/bin/groupcast"), "the unit runs the installed binary");
    let path = dir.join("groupcast.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/groupcast", bin())).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", p(&path)]).output().expect("run systemd-analyze");
    assert!(out.status.success(), "systemd-analyze verify failed ({}):\n{}{}", out.status, stdout(&out), stderr(&out));
}

#[test]
fn install_script_stages_binary_unit_and_config() {
    let dir = TempDir::new("install");
    let stage = dir.join("stage");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install");
    let out =
        Command::new(&script).args(["--destdir", p(&stage), "--binary", bin()]).output().expect("run scripts/install");
    assert!(out.status.success(), "scripts/install failed ({}):\n{}{}", out.status, stdout(&out), stderr(&out));
    let installed = stage.join("usr/local/bin/groupcast");
    assert_eq!(std::fs::read(&installed).unwrap(), binary_bytes(), "the given binary is installed");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777, 0o755);
    let unit = std::fs::read_to_string(stage.join("etc/systemd/system/groupcast.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/groupcast -c /etc/groupcast/groupcast.toml start"), "{unit}");
    let config = std::fs::read_to_string(stage.join("etc/groupcast/groupcast.toml")).unwrap();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/groupcast.toml")).unwrap();
    assert_eq!(config, shipped);
    assert!(!stage.join("usr/local/bin/.groupcast.new").exists(), "no temporary file left");
    assert!(stdout(&out).contains("installed groupcast"), "{}", stdout(&out));
    // The staged binary runs.
    let version = Command::new(&installed).arg("--version").output().unwrap();
    assert!(version.status.success() && stdout(&version).starts_with("groupcast "), "{version:?}");
}
