//! Operator commands that talk to a running instance from the shell: `stop`, `reload` (signal
//! the master, then wait for and report the outcome), `status` and `connections` (ask the
//! master over its control socket).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::Config;
use crate::control::{ConnectionList, StatusReport};
use crate::master::pidfile;

/// How long `stop` waits for the instance to be gone, beyond a graceful drain.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether an instance holds the pid file's lock.
fn is_running(config: &Config) -> anyhow::Result<bool> {
    let path = &config.pid_file;
    Ok(pidfile::running(path).with_context(|| format!("cannot read {}", path.display()))?.is_some())
}

/// The master's pid, checked before anything signals it: the pid in a locked file may have
/// been reused, or written by another user to make `stop` signal a process of their choosing.
/// The file must belong to root, to us, or to the user the named process runs as (a master
/// that dropped privileges owns its pid file), and the process must be a groupcast master.
fn running_master(config: &Config) -> anyhow::Result<u32> {
    let path = &config.pid_file;
    let running = pidfile::running(path).with_context(|| format!("cannot read {}", path.display()))?;
    let Some(pidfile::Running { pid, file_owner }) = running else {
        bail!("groupcast is not running (no live pid file at {})", path.display())
    };
    if pid == 0 {
        bail!("pid file {} is locked but holds no pid", path.display());
    }
    let us = nix::unistd::Uid::effective().as_raw();
    if file_owner != 0 && file_owner != us && Some(file_owner) != process_uid(pid) {
        bail!(
            "pid file {} belongs to uid {file_owner}, neither root, us, nor the user pid {pid} runs as; \
             not signalling it",
            path.display()
        );
    }
    if !is_groupcast_master(pid) {
        bail!("pid {pid} in {} is not a groupcast master; not signalling it", path.display());
    }
    Ok(pid)
}

/// The real uid of `pid`, from /proc.
fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/// Whether `pid` runs a groupcast binary as a master (`start`, `restart` or `channel`), from
/// /proc.
fn is_groupcast_master(pid: u32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let exe_name = exe.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
    // After an upgrade the old file shows as "groupcast (deleted)".
    let is_groupcast = exe_name.is_some_and(|n| n.trim_end_matches(" (deleted)").starts_with("groupcast"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let master_command = cmdline.split(|&b| b == 0).any(|a| matches!(a, b"start" | b"restart" | b"channel"));
    is_groupcast && master_command
}

/// `groupcast stop [-g]`: SIGTERM (or SIGQUIT, graceful) to the master, then wait until its
/// pid-file lock is released, which happens only when the master process has exited.
pub fn stop(config: &Config, graceful: bool) -> anyhow::Result<()> {
    let pid = running_master(config)?;
    let (signal, limit) = if graceful {
        // Ask the running instance: its graceful timeout may differ from this config's.
        let drain = fetch_status(config).map_or(config.graceful_timeout_ms, |r| r.graceful_timeout_ms);
        (Signal::SIGQUIT, Duration::from_millis(drain) + STOP_TIMEOUT)
    } else {
        (Signal::SIGTERM, STOP_TIMEOUT)
    };
    kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("cannot signal pid {pid}"))?;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !is_running(config)? {
            println!("groupcast stopped (pid {pid})");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("groupcast (pid {pid}) did not stop within {}s", limit.as_secs())
}

/// For `restart`: stop the instance if one runs.
pub fn stop_if_running(config: &Config, graceful: bool) -> anyhow::Result<()> {
    if is_running(config)? {
        stop(config, graceful)?;
    }
    Ok(())
}

/// `groupcast reload [-g] [--close]`: SIGUSR1 (or SIGUSR2, graceful) to the master, or with
/// `--close` the control request `reload close [graceful]` (a signal cannot say the mode),
/// then wait until the reload it starts has ended and report how.
pub fn reload(config: &Config, graceful: bool, close: bool) -> anyhow::Result<()> {
    let pid = running_master(config)?;
    let before = fetch_status(config)?;
    let generation = if close {
        let request = if graceful { "reload close graceful" } else { "reload close" };
        let answer = ask(config, request)?;
        match answer.trim().strip_prefix("ok ").and_then(|g| g.parse::<u64>().ok()) {
            Some(generation) => generation,
            None => bail!("the master refused the reload: {}", answer.trim()),
        }
    } else {
        let signal = if graceful { Signal::SIGUSR2 } else { Signal::SIGUSR1 };
        kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("cannot signal pid {pid}"))?;
        before.reloads + 1
    };
    // Each worker may take the ready timeout, its hand-off and, graceful, the drain time; plus
    // margin.
    let per_worker = crate::master::READY_TIMEOUT
        + Duration::from_millis(before.handoff_timeout_ms)
        + if graceful { Duration::from_millis(before.graceful_timeout_ms) } else { Duration::ZERO };
    let deadline = Instant::now() + per_worker * before.workers as u32 + Duration::from_secs(10);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let Ok(report) = fetch_status(config) else { continue };
        if report.master_pid != pid {
            bail!("the instance was restarted during the reload");
        }
        match report.last_reload {
            Some(last) if last.generation >= generation => {
                let lines: String = last.handoffs.iter().map(|h| format!("\n  {}", h.line())).collect();
                if last.ok {
                    println!("groupcast reloaded: {}{lines}", last.message);
                    return Ok(());
                }
                bail!("{}{lines}", last.message);
            }
            _ => {}
        }
    }
    bail!("the reload did not finish in time (see the log)")
}

fn ask(config: &Config, request: &str) -> anyhow::Result<String> {
    let path = config.control_socket();
    let stream = UnixStream::connect(&path)
        .with_context(|| format!("groupcast is not running (no control socket at {})", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_millis(config.status_timeout_ms * 2 + 5000)))?;
    (&stream).write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).context("no answer from the master")?;
    Ok(line)
}

/// Asks the master for its live status report.
pub fn fetch_status(config: &Config) -> anyhow::Result<StatusReport> {
    serde_json::from_str(&ask(config, "status")?).context("the master's answer does not parse")
}

/// `groupcast status [--json] [-d]`.
pub fn status(config: &Config, json: bool, refresh: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&fetch_status(config)?)?);
        return Ok(());
    }
    if !refresh {
        print!("{}", render_status(&fetch_status(config)?));
        return Ok(());
    }
    loop {
        let table = render_status(&fetch_status(config)?);
        // Home the cursor and clear the screen, then draw: the table refreshes in place.
        println!("\x1b[H\x1b[2J{table}(refreshing every second; Ctrl-C to leave)");
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `groupcast connections [--json]`.
pub fn connections(config: &Config, json: bool) -> anyhow::Result<()> {
    let list: ConnectionList =
        serde_json::from_str(&ask(config, "connections")?).context("the master's answer does not parse")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:>8} {:>6} {:>8} {:<22} {:<8} {:>7} {:>10} {:>10} {:>8} {:>8} {:>8} {:<16} groups",
        "id", "worker", "pid", "peer", "state", "age", "bytes in", "bytes out", "msgs in", "msgs out", "sendbuf", "sub"
    );
    for c in &list.connections {
        println!(
            "{:>8} {:>6} {:>8} {:<22} {:<8} {:>6}s {:>10} {:>10} {:>8} {:>8} {:>8} {:<16} {}",
            c.id,
            c.worker,
            c.worker_pid,
            c.peer,
            c.state,
            c.age_secs,
            c.bytes_in,
            c.bytes_out,
            c.messages_in,
            c.messages_out,
            c.send_buffer,
            c.sub.as_deref().unwrap_or("-"),
            c.groups.join(",")
        );
    }
    println!("{} connections", list.connections.len());
    if !list.missing_workers.is_empty() {
        println!("workers that did not answer: {:?}", list.missing_workers);
    }
    Ok(())
}

fn render_status(r: &StatusReport) -> String {
    let mut out = String::new();
    let t = &r.totals;
    out += &format!(
        "groupcast {}  master pid {}  uptime {}  load {:.2} {:.2} {:.2}\n",
        r.version,
        r.master_pid,
        humantime::format_duration(Duration::from_secs(r.uptime_secs)),
        r.load[0],
        r.load[1],
        r.load[2]
    );
    out += &format!("listen {}  channel {}  workers {}  reloads {}", r.listen, r.channel, r.workers, r.reloads);
    if let Some(last) = &r.last_reload {
        out += &format!(" (last: {})", if last.ok { "ok" } else { "FAILED" });
    }
    out += if r.reloading { "  RELOADING\n" } else { "\n" };
    out += &format!("reload mode {}  hand-off timeout {}ms", r.reload_mode.name(), r.handoff_timeout_ms);
    if let Some(last) = &r.last_reload {
        let mode = if last.mode.is_empty() { "close" } else { &last.mode };
        out += &format!("  last reload {} ({mode}): {}", last.generation, last.message);
    }
    out += "\n";
    for handoff in r.last_reload.iter().flat_map(|l| &l.handoffs) {
        out += &format!("  {}\n", handoff.line());
    }
    out += &format!(
        "connections {}  memberships {}  messages in {}  out {}  published {}  send failures {}  bad requests {}  restarts {}\n",
        t.connections, t.memberships, t.messages_in, t.messages_out, t.published, t.send_failures, t.bad_requests, t.restarts
    );
    let l = &r.limits;
    out += &labelled(
        "limits:",
        6,
        &[
            ("conns", &format!("{}/worker (total {})", l.max_connections_per_worker, l.max_connections)),
            ("frame", &l.max_frame_size),
            ("message", &l.max_message_size),
            ("groups/conn", &l.max_groups_per_connection),
            ("group id", &l.max_group_id_len),
            ("send buffer", &format!("{} ({:?})", l.send_buffer_limit, l.slow_client)),
            ("handshake", &format!("{}ms", l.handshake_timeout_ms)),
            ("ping", &format!("{}ms", l.ping_interval_ms)),
            ("idle", &format!("{}ms", l.idle_timeout_ms)),
            ("message timeout", &format!("{}ms", l.message_timeout_ms)),
            ("commands", &format!("{}/s burst {}", l.commands_per_second, l.commands_burst)),
            ("per IP", &per_ip_text(l)),
        ],
    );
    let c = &r.channel_settings;
    out += &labelled(
        "channel:",
        6,
        &[
            ("max peers", &c.max_peers),
            ("auth timeout", &format!("{}ms", c.auth_timeout_ms)),
            ("max frame", &c.max_frame),
            ("peer buffer", &c.peer_buffer_limit),
            ("queue", &format!("{} msgs / {} bytes", c.queue_max_messages, c.queue_max_bytes)),
            ("grace", &format!("{}ms / {} bytes", c.grace_ms, c.grace_max_bytes)),
        ],
    );
    let h = &r.history;
    let kept = r.processes.iter().find(|p| p.role == "channel").map_or_else(
        || "in Redis".to_owned(),
        |c| format!("{} groups, {} messages, {} bytes", c.history_groups, c.history_messages, c.history_bytes),
    );
    out += &labelled(
        "history:",
        7,
        &[
            ("kept", &kept),
            ("size", &h.size),
            ("ttl", &format!("{}ms", h.ttl_ms)),
            ("max bytes", &h.max_bytes),
            ("max recover", &h.max_recover),
            ("max groups", &h.max_groups),
            ("meta ttl", &format!("{}ms", h.meta_ttl_ms)),
        ],
    );
    let origins = match r.auth.allowed_origins.as_slice() {
        [] => "any".to_owned(),
        list => list.join(" "),
    };
    let a = &r.auth;
    let key = match (&a.algorithm, &a.jwt_secret_file, &a.jwt_public_key_file) {
        (Some(alg), Some(file), _) | (Some(alg), None, Some(file)) => format!("{alg} from {}", file.display()),
        _ => "none (tokens refused)".to_owned(),
    };
    out += &labelled(
        "auth:",
        6,
        &[
            ("origins", &origins),
            ("tokens", &key),
            ("required", &a.require_token),
            ("leeway", &format!("{}s", a.leeway_secs)),
            ("group rules", &a.groups.len()),
        ],
    );
    for (n, rule) in a.groups.iter().enumerate() {
        let rate = match rule.rate() {
            Some((rate, burst)) => format!("  commands {rate}/s burst {burst}"),
            None => String::new(),
        };
        out += &format!(
            "  rule {:<4} {:<32} join {:<7} publish {:<7}{rate}\n",
            n + 1,
            rule.pattern,
            format!("{:?}", rule.join).to_lowercase(),
            format!("{:?}", rule.publish).to_lowercase()
        );
    }
    if !r.tls_listen.is_empty() {
        let path = |p: &Option<std::path::PathBuf>| p.as_ref().map_or("-".into(), |p| p.display().to_string());
        out += &labelled(
            "tls:",
            6,
            &[
                ("listen", &r.tls_listen),
                ("cert", &path(&r.tls.cert_file)),
                ("key", &path(&r.tls.key_file)),
                ("expires", &r.tls_not_after),
                ("open", &t.tls_connections),
            ],
        );
    }
    out += &labelled(
        "limit hits:",
        7,
        &[
            ("refused conns", &t.rejected_connections),
            ("oversized", &t.oversized),
            ("too many groups", &t.too_many_groups),
            ("rate limited", &t.rate_limited),
            ("slow closed", &t.slow_closed),
            ("slow dropped", &t.slow_dropped),
            ("backpressure pauses", &t.backpressure_pauses),
            ("handshake timeouts", &t.handshake_timeouts),
            ("idle timeouts", &t.idle_timeouts),
            ("message timeouts", &t.message_timeouts),
            ("protocol errors", &t.protocol_errors),
            ("bus invalid utf8", &t.bus_invalid_utf8),
            ("forbidden origins", &t.forbidden_origins),
            ("per-IP refused", &t.per_ip_refused),
            ("forbidden joins", &t.forbidden_joins),
            ("forbidden publishes", &t.forbidden_publishes),
            ("bad tokens", &t.bad_tokens),
            ("expired tokens", &t.expired_tokens),
            ("tls handshake failures", &t.tls_handshake_failures),
        ],
    );
    out += &labelled(
        "protocol 2:",
        7,
        &[
            ("connections", &t.protocol2_connections),
            ("joins recovered", &t.joins_recovered),
            ("joins unrecovered", &t.joins_unrecovered),
            ("gap notices", &t.gap_notices),
        ],
    );
    out += &labelled(
        "hand-off:",
        7,
        &[("received", &t.handoffs_in), ("handed over", &t.handoffs_out), ("seed gaps", &t.handoff_gaps)],
    );
    let buffer = |b: usize| if b == 0 { "kernel default".to_owned() } else { b.to_string() };
    out += &format!(
        "sockets: backlog {}  recv buffer {}  send buffer {}\n",
        r.backlog,
        buffer(r.socket_recv_buffer),
        buffer(r.socket_send_buffer)
    );
    out += &api_text(r);
    out += "\n";
    out += &format!(
        "{:<10} {:>8} {:<9} {:<8} {:>8} {:>9} {:>7} {:>7} {:>8} {:>10} {:>10} {:>9} {:>8} {:>8}\n",
        "role",
        "pid",
        "state",
        "version",
        "uptime",
        "memory",
        "conns",
        "groups",
        "members",
        "msgs in",
        "msgs out",
        "send fail",
        "bad req",
        "restarts"
    );
    for p in &r.processes {
        let role = match p.index {
            Some(i) => format!("{}-{i}", p.role),
            None => p.role.clone(),
        };
        out += &format!(
            "{:<10} {:>8} {:<9} {:<8} {:>7}s {:>8.1}M {:>7} {:>7} {:>8} {:>10} {:>10} {:>9} {:>8} {:>8}\n",
            role,
            p.pid,
            p.state,
            p.version,
            p.uptime_secs,
            p.rss_kib as f64 / 1024.0,
            p.connections,
            p.groups,
            p.memberships,
            p.messages_in,
            p.messages_out,
            p.send_failures,
            p.bad_requests,
            p.restarts
        );
    }
    out
}

/// A section of the status table: `heading`, then `label value` items two spaces apart,
/// `per_row` to a row, the rows after the first indented under the first.
/// The `[api]` line: where, guarded or not, its bounds, and its process's counters.
fn api_text(r: &StatusReport) -> String {
    let a = &r.api;
    if r.api_listen.is_empty() {
        return "api: off\n".into();
    }
    let row = r.processes.iter().find(|p| p.role == "api" && p.state != "retiring");
    let (requests, errors, limited, published) =
        row.map_or((0, 0, 0, 0), |p| (p.api_requests, p.api_errors, p.api_rate_limited, p.published));
    format!(
        "api: http://{}  key {}  demo {}  conns {}  header {}  request {}ms  keep-alive {}ms  publish wait {}ms  \
         publishes {}/s burst {}\n     requests {requests}  errors {errors}  rate limited {limited}  published {published}\n",
        r.api_listen,
        a.key_file.as_ref().map_or_else(|| "none (loopback only)".to_owned(), |p| p.display().to_string()),
        a.demo,
        a.max_connections,
        a.max_header_bytes,
        a.request_timeout_ms,
        a.keepalive_timeout_ms,
        a.publish_timeout_ms,
        a.publishes_per_second,
        a.publishes_burst,
    )
}

fn labelled(heading: &str, per_row: usize, items: &[(&str, &dyn std::fmt::Display)]) -> String {
    let indent = " ".repeat(heading.len());
    let mut out = String::new();
    for (i, row) in items.chunks(per_row).enumerate() {
        let row: Vec<String> = row.iter().map(|(label, value)| format!("{label} {value}")).collect();
        out += &format!("{} {}\n", if i == 0 { heading } else { &indent }, row.join("  "));
    }
    out
}

/// `limits.max_connections_per_ip` and its exemptions, for the status table.
fn per_ip_text(l: &crate::config::Limits) -> String {
    if l.max_connections_per_ip == 0 {
        return "off".to_owned();
    }
    let exempt: Vec<String> = l.per_ip_exempt.iter().map(ToString::to_string).collect();
    match exempt.as_slice() {
        [] => l.max_connections_per_ip.to_string(),
        _ => format!("{} (exempt {})", l.max_connections_per_ip, exempt.join(" ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_every_limit_and_counter() {
        let mut r = StatusReport::default();
        r.limits.message_timeout_ms = 7000;
        r.channel_settings.max_peers = 9;
        r.channel_settings.auth_timeout_ms = 1500;
        r.totals.backpressure_pauses = 3;
        r.totals.message_timeouts = 4;
        r.totals.bus_invalid_utf8 = 5;
        r.totals.bad_tokens = 6;
        r.totals.expired_tokens = 7;
        r.auth.algorithm = Some("HS256".into());
        r.auth.jwt_secret_file = Some("/etc/gc/jwt.secret".into());
        r.auth.groups = vec![crate::auth::GroupRule {
            pattern: "user.*".into(),
            join: crate::auth::Access::Token,
            publish: crate::auth::Access::None,
            commands_per_second: Some(5),
            commands_burst: None,
        }];
        r.last_reload = Some(crate::control::ReloadOutcome {
            generation: 3,
            ok: true,
            message: "reloaded 2 workers".into(),
            mode: "handoff".into(),
            handoffs: vec![crate::control::HandOffReport {
                generation: 3,
                index: 0,
                outcome: crate::control::HandOffOutcome::Moved,
                moved: 1000,
                rounds: 3,
                millis: 41,
                max_pause_ms: 12,
                ..Default::default()
            }],
            ..Default::default()
        });
        r.totals.handoffs_in = 8;
        let table = render_status(&r);
        for shown in [
            "reload mode handoff",
            "last reload 3 (handoff): reloaded 2 workers",
            "  worker-0: moved 1000 connections in 3 rounds, 41 ms, longest pause 12 ms\n",
            "hand-off: received 8",
            "message timeout 7000ms",
            "max peers 9",
            "auth timeout 1500ms",
            "backpressure pauses 3",
            "message timeouts 4",
            "bus invalid utf8 5",
            "limit hits: refused conns 0",
            "bad tokens 6",
            "expired tokens 7",
            "tokens HS256 from /etc/gc/jwt.secret",
            "join token   publish none",
            "commands 5/s burst 10",
        ] {
            assert!(table.contains(shown), "{shown:?} missing from:\n{table}");
        }
    }
}
