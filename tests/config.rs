//! Configuration: values from a `-c FILE` are applied, flags override them, unknown keys and bad
//! values are refused naming the key, and `--channel-listen HOST:PORT` moves the channel to TCP.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::json;

/// Every client in "c", senders on each worker: delivery works across workers.
fn check_delivery(server: &Server) {
    let (mut clients, on) = server.connect_spread(2);
    for c in &mut clients {
        c.add_group(&json!("c"));
        c.sync_quiet();
    }
    server.wait_subscriptions(clients.len() as u64);
    let flows: Vec<Flow> = (0..server.workers)
        .map(|w| Flow { sender: on.iter().position(|&x| x == w).unwrap(), group: "c".into(), group_id: json!("c") })
        .collect();
    let members: Vec<HashSet<String>> = vec![["c".to_string()].into(); clients.len()];
    exchange(&mut clients, &members, &flows, 5, "cfg");
}

#[test]
fn file_values_are_applied() {
    let port = free_port();
    let server = Server::start_with(Opts {
        workers: None,
        listen: None,
        config: Some(format!(
            "# a comment\nlisten = \"127.0.0.1:{port}\"\nworkers = 3\nbacklog = 64\nstatus_timeout_ms = 5000\n\n\
             [log]\nlevel = \"debug\"\n\n[limits]\nmax_message_size = 4096\n"
        )),
        extra: Vec::new(),
    });
    let report = server.status();
    assert_eq!(report["listen"], format!("127.0.0.1:{port}"), "listen from the file");
    assert_eq!(report["workers"], 3);
    let rows = worker_rows(&report);
    assert_eq!(rows.len(), 3, "three worker rows");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["index"], i);
        assert_eq!(row["state"], "running");
    }
    check_delivery(&server);
    // log.level = debug: the workers log each connection.
    wait_for("debug lines in the log", TIMEOUT, || server.log().contains(" DEBUG ").then_some(()));
    // limits.max_message_size = 4096: 4097 bytes are refused with 1009.
    let mut c = Client::connect(server.addr);
    c.send(&" ".repeat(4097));
    assert_eq!(c.expect_close(), 1009);
}

#[test]
fn flags_override_the_file() {
    let server = Server::start_with(Opts {
        workers: Some(1),
        listen: Some("127.0.0.1:0".into()),
        config: Some(format!("listen = \"127.0.0.1:{}\"\nworkers = 3\n", free_port())),
        extra: Vec::new(),
    });
    let report = server.status();
    assert_eq!(worker_rows(&report).len(), 1, "--workers 1 wins over workers = 3");
    assert_eq!(report["workers"], 1);
    assert_eq!(report["listen"], server.addr.to_string());
    assert_ne!(server.addr.port(), 0);
}

/// Starts with `config` (on 127.0.0.1:0 unless it sets `listen`); expects exit 1 naming `key`.

#[test]
fn unknown_keys_are_refused() {
    refused("workers = 2\nbogus = 1\n", "unknown field `bogus`");
    refused("[limits]\nmax_mesage_size = 10\n", "unknown field `max_mesage_size`");
    refused("[channel]\nbogus = \"127.0.0.1:1\"\n", "unknown field `bogus`");
    refused("[nonsense]\nx = 1\n", "unknown field `nonsense`");
}

#[test]
fn bad_values_are_refused() {
    refused("workers = 0\n", "invalid value for `workers`");
    refused("listen = \"nonsense\"\n", "invalid value for `listen`");
    refused("listen = \"127.0.0.1\"\n", "invalid value for `listen`");
    refused("backlog = 0\n", "invalid value for `backlog`");
    refused("[channel]\nlisten = \"nowhere\"\n", "invalid value for `channel.listen`");
    refused("[log]\nlevel = \"loud\"\n", "invalid value for `log.level`");
    refused("[log]\nsyslog_facility = \"kitchen\"\n", "invalid value for `log.syslog_facility`");
    refused("[limits]\nmax_message_size = 0\n", "invalid value for `limits.max_message_size`");
    refused("[limits]\nmax_groups_per_connection = 0\n", "invalid value for `limits.max_groups_per_connection`");
    // Wrong TOML types name the key too.
    refused("workers = \"two\"\n", "workers");
    refused("workers = -1\n", "workers");
    refused("this is not toml\n", "g.toml");
    // And a missing file names the file.
    let dir = TempDir::new("nocfg");
    let missing = dir.join("missing.toml");
    let run = run_timed(
        &["start", "-c", missing.to_str().unwrap(), "--pid-file", dir.join("g.pid").to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("missing.toml"), "{run:?}");
}

#[test]
fn bad_flag_values_are_refused() {
    let dir = TempDir::new("badflag");
    let pid_file = dir.join("g.pid");
    let pid_file = pid_file.to_str().unwrap();
    for (args, key) in [
        (vec!["start", "--workers", "0", "--listen", "127.0.0.1:0"], "workers"),
        (vec!["start", "--listen", "nonsense"], "listen"),
        (vec!["start", "--listen", "127.0.0.1:0", "--channel-listen", "nowhere"], "channel.listen"),
    ] {
        let mut args = args;
        args.extend(["--pid-file", pid_file]);
        let run = run_timed(&args, dir.path());
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert!(run.stderr.contains(&format!("invalid value for `{key}`")), "{args:?}: {run:?}");
    }
}

#[test]
fn channel_over_tcp() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start_with(Opts { extra: vec!["--channel-listen".into(), addr.clone()], ..Opts::workers(2) });
    let report = server.status();
    assert_eq!(report["channel"], addr);
    assert_eq!(field(&channel_row(&report), "connections"), 2, "both workers connected over TCP");
    assert!(!server.pid_file.with_file_name("g.channel.sock").exists(), "no Unix channel socket");
    // The broker really listens there.
    std::net::TcpStream::connect(&addr).expect("channel server on its TCP port");
    check_delivery(&server);
}

#[test]
fn channel_over_a_unix_path_from_the_file() {
    let dir = TempDir::new("chan");
    let sock = dir.join("elsewhere.sock");
    let server = Server::start_with(Opts {
        config: Some(format!("[channel]\nlisten = \"unix:{}\"\n", sock.display())),
        ..Opts::workers(2)
    });
    assert_eq!(server.status()["channel"], format!("unix:{}", sock.display()));
    assert!(sock.exists());
    check_delivery(&server);
}

/// Issue 10, defect 13: every number is bounded at load, naming its key. Huge timeouts used to
/// be accepted and overflow `Instant + Duration` later; a `max_group_id_len` above 65535 cut
/// names mid-character in the channel wire's u16-length strings.
#[test]
fn issue10_out_of_bound_numbers_are_refused() {
    // TOML integers are i64: the largest one a file can hold.
    let huge = i64::MAX;
    for (config, key) in [
        (format!("status_timeout_ms = {huge}\n"), "status_timeout_ms"),
        (format!("graceful_timeout_ms = {huge}\n"), "graceful_timeout_ms"),
        ("backlog = 4294967295\n".to_string(), "backlog"),
        (format!("[limits]\nidle_timeout_ms = {huge}\n"), "limits.idle_timeout_ms"),
        (format!("[limits]\nhandshake_timeout_ms = {huge}\n"), "limits.handshake_timeout_ms"),
        (format!("[limits]\nping_interval_ms = {huge}\nidle_timeout_ms = 0\n"), "limits.ping_interval_ms"),
        ("[limits]\nmax_group_id_len = 70000\n".to_string(), "limits.max_group_id_len"),
        ("[limits]\nsend_buffer_limit = 9223372036854775807\n".to_string(), "limits.send_buffer_limit"),
        (format!("[channel]\ngrace_ms = {huge}\n"), "channel.grace_ms"),
        (format!("[channel]\nauth_timeout_ms = {huge}\n"), "channel.auth_timeout_ms"),
        ("[channel]\nauth_timeout_ms = 0\n".to_string(), "channel.auth_timeout_ms"),
        ("[channel]\nmax_peers = 0\n".to_string(), "channel.max_peers"),
        ("[channel]\nmax_frame = 4294967296\n".to_string(), "channel.max_frame"),
    ] {
        refused(&config, &format!("invalid value for `{key}`"));
    }
}

/// The channel keys added with issue 10 (`auth_timeout_ms`, `max_peers`) are read from the
/// file and shown by `status` with the other channel settings.
#[test]
fn channel_auth_timeout_and_max_peers_are_accepted() {
    let server = Server::start_with(Opts {
        config: Some("[channel]\nauth_timeout_ms = 1000\nmax_peers = 50\n".into()),
        ..Opts::workers(2)
    });
    let report = server.status();
    assert_eq!(report["channel_settings"]["auth_timeout_ms"], 1000);
    assert_eq!(report["channel_settings"]["max_peers"], 50);
    assert_eq!(report["channel_settings"]["max_frame"], 16 << 20, "defaults shown too");
    check_delivery(&server);
}

/// Issue 10, defect 13: a worker must not dial a non-loopback broker without a secret, and a
/// file that names a remote broker does not exempt its own non-loopback `channel.listen`.
#[test]
fn issue10_no_secret_is_refused_with_connect_set() {
    refused("[channel]\nconnect = \"192.0.2.1:2206\"\n", "invalid value for `channel.connect`");
    refused("[channel]\nlisten = \"0.0.0.0:0\"\nconnect = \"127.0.0.1:2206\"\n", "invalid value for `channel.listen`");
    // The standalone broker started from such a file is refused too.
    let dir = TempDir::new("brokercfg");
    let path = dir.join("b.toml");
    std::fs::write(&path, "[channel]\nlisten = \"0.0.0.0:0\"\nconnect = \"127.0.0.1:2206\"\n").unwrap();
    let pid_file = dir.join("b.pid");
    let run =
        run_timed(&["channel", "--pid-file", pid_file.to_str().unwrap(), "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("invalid value for `channel.listen`"), "{run:?}");
}

/// Issue 10, defect 13: `group` without `user` left every process running as uid 0 (root can
/// take back any group): refused at load, naming the key.
#[test]
fn issue10_group_without_user_is_refused() {
    refused("group = \"nogroup\"\n", "invalid value for `group`");
}
