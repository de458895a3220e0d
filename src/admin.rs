//! Operator commands that talk to a running instance from the shell: `stop` (signal the
//! master, wait until it is gone) and `status` (ask the master over its control socket).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::Config;
use crate::control::StatusReport;
use crate::master::pidfile;

/// How long `stop` waits for the instance to be gone.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// `groupcast stop`: SIGTERM to the master, then wait until its pid-file lock is released
/// (which happens only when the master process has exited).
pub fn stop(config: &Config) -> anyhow::Result<()> {
    let path = &config.pid_file;
    let Some(pid) =
        pidfile::running_pid(path).with_context(|| format!("cannot read {}", path.display()))?
    else {
        bail!(
            "groupcast is not running (no live pid file at {})",
            path.display()
        );
    };
    if pid == 0 {
        bail!("pid file {} is locked but holds no pid", path.display());
    }
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM)
        .with_context(|| format!("cannot signal pid {pid}"))?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if pidfile::running_pid(path)?.is_none() {
            println!("groupcast stopped (pid {pid})");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "groupcast (pid {pid}) did not stop within {}s",
        STOP_TIMEOUT.as_secs()
    )
}

/// Asks the master for its live status report.
pub fn fetch_status(config: &Config) -> anyhow::Result<StatusReport> {
    let path = config.control_socket();
    let stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "groupcast is not running (no control socket at {})",
            path.display()
        )
    })?;
    let timeout = Duration::from_millis(config.status_timeout_ms * 2 + 2000);
    stream.set_read_timeout(Some(timeout))?;
    (&stream).write_all(b"status\n")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("no answer from the master")?;
    serde_json::from_str(&line).context("the master's answer does not parse")
}

/// `groupcast status [--json]`.
pub fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let report = fetch_status(config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_table(&report));
    }
    Ok(())
}

fn render_table(r: &StatusReport) -> String {
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
    out += &format!(
        "listen {}  channel {}  workers {}\n",
        r.listen, r.channel, r.workers
    );
    out += &format!(
        "connections {}  memberships {}  messages in {}  out {}  published {}  send failures {}  bad requests {}  restarts {}\n\n",
        t.connections, t.memberships, t.messages_in, t.messages_out, t.published, t.send_failures, t.bad_requests, t.restarts
    );
    out += &format!(
        "{:<10} {:>8} {:<9} {:>9} {:>7} {:>7} {:>8} {:>10} {:>10} {:>9} {:>9} {:>8}\n",
        "role",
        "pid",
        "state",
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
            "{:<10} {:>8} {:<9} {:>7.1}M {:>7} {:>7} {:>8} {:>10} {:>10} {:>9} {:>9} {:>8}\n",
            role,
            p.pid,
            p.state,
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
