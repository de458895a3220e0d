//! Helpers shared by the integration tests: start the real `groupcast` binary in a private temp
//! dir, wait for it with a deadline, read `status --json`, and talk WebSocket to it.
//!
//! Every server is owned by a guard (`Server`) that kills the whole instance on drop, panics
//! included: SIGTERM to the master, then SIGKILL to the master and to every child pid ever seen
//! in `status` (checked to still belong to this instance, since pids get reused).
//!
//! One of each: `Client` (tungstenite) and `RawWs` (hand-made frames, through the library's
//! `frame::encode_client`); `Broker` (broker.rs), the standalone broker guard; `Watchers`
//! (watchers.rs), the bystanders that prove delivery still works; `Swarm` (swarm.rs), thousands
//! of clients on one thread, and `GroupLoad` (group_load.rs), a checked workload on it; `skip_or_fail`/`require`
//! for a test that cannot run on this machine (skipped locally, failed under CI).
#![allow(dead_code)]

mod broker;
pub mod fake_broker;
mod group_load;
mod redis;
mod swarm;
mod watchers;

// Each test crate uses some of these only.
#[allow(unused_imports)]
pub use broker::{connect_args, write_secret, Broker, BrokerOpts, BROKER_SECRET};
#[allow(unused_imports)]
pub use group_load::{GroupLoad, LoadShape};
#[allow(unused_imports)]
pub use redis::Redis;
#[allow(unused_imports)]
pub use swarm::{Ended, Swarm};
#[allow(unused_imports)]
pub use watchers::Watchers;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use groupcast::ws::frame;
use serde_json::{json, Value};
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// Deadline for the instance to come up, for a frame to arrive, for status to settle.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two polls of a condition (polling, not synchronising by sleeping).
pub const POLL: Duration = Duration::from_millis(25);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_groupcast")
}

// ---- temp dirs -----------------------------------------------------------------------------

/// A directory of its own for one test, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "gc-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- processes -----------------------------------------------------------------------------

/// Runs `groupcast ARGS` to completion.
pub fn groupcast(args: &[&str]) -> Output {
    Command::new(bin()).args(args).stdin(Stdio::null()).output().expect("run groupcast")
}

/// The outcome of a command run with `run_timed`.
#[derive(Debug)]
pub struct Run {
    /// Exit code; `None` if it had to be killed at the deadline (or died by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Starts groupcast with the TOML `config` (on a loopback port unless it sets `listen`) and
/// checks that it refuses it at load: exit 1, an error naming `key`, no pid file or socket left.
pub fn refused(config: &str, key: &str) {
    let dir = TempDir::new("badcfg");
    let path = dir.join("g.toml");
    let text =
        if config.starts_with("listen") { config.to_string() } else { format!("listen = \"127.0.0.1:0\"\n{config}") };
    std::fs::write(&path, text).unwrap();
    let pid_file = dir.join("g.pid");
    let run = run_timed(&["start", "--pid-file", pid_file.to_str().unwrap(), "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(run.code, Some(1), "config {config:?}: {run:?}");
    assert!(run.stderr.contains(key), "config {config:?}: stderr does not name {key:?}: {run:?}");
    assert!(!pid_file.exists(), "a refused config left a pid file");
    assert!(!dir.join("g.ctl.sock").exists());
}

/// Runs `groupcast ARGS` with its output in files under `dir` (a daemon may keep pipes open),
/// killing it if it has not exited after `TIMEOUT`.
pub fn run_timed(args: &[&str], dir: &Path) -> Run {
    run_bin_timed(Path::new(bin()), args, dir)
}

/// `run_timed` with another binary (a copy installed in the test's dir, a script).
pub fn run_bin_timed(bin: &Path, args: &[&str], dir: &Path) -> Run {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let out_path = dir.join(format!("cmd-{n}.out"));
    let err_path = dir.join(format!("cmd-{n}.err"));
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run groupcast");
    let deadline = Instant::now() + TIMEOUT;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        sleep(POLL);
    };
    Run {
        code,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The state letter of `/proc/PID/stat` (R, S, Z, ...), `None` when there is no such process.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": comm may contain spaces and parentheses; the state follows the last ')'.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next())
}

/// Whether `pid` is a live process (a zombie has exited: it only waits to be reaped).
pub fn alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Whether live process `pid` belongs to the instance with this pid file: the master has the
/// path in its command line, children in the config the master put in their environment.
pub fn belongs_to(pid: u32, pid_file: &Path) -> bool {
    let needle = pid_file.to_string_lossy();
    ["cmdline", "environ"].iter().any(|f| {
        std::fs::read(format!("/proc/{pid}/{f}"))
            .map(|b| String::from_utf8_lossy(&b).contains(&*needle))
            .unwrap_or(false)
    })
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory effects; callers pass pids of this test's instance only.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        sleep(POLL);
    }
}

/// Whether this run is CI (`CI` set, as CI services do, and not "false"/"0"): there every test
/// must run, so a missing tool or privilege is a failure, not a skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// For a test that cannot run on this machine (`reason` says why): under CI it fails here;
/// elsewhere it prints a SKIPPED line and returns, and the caller returns too:
/// `if !is_root() { return skip_or_fail("needs root"); }`.
pub fn skip_or_fail(reason: &str) {
    let current = std::thread::current();
    let test = current.name().unwrap_or("this test");
    if under_ci() {
        panic!("{test} cannot run here, and under CI every test must: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// `skip_or_fail(reason)` unless `ok`; whether the test can go on:
/// `if !require(is_root(), "needs root") { return; }`.
pub fn require(ok: bool, reason: &str) -> bool {
    if !ok {
        skip_or_fail(reason);
    }
    ok
}

/// Whether the tests run as root (privilege drop, network namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) only reads the caller's credentials.
    unsafe { libc::geteuid() == 0 }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("probe a free port").port()
}

// ---- the server guard ----------------------------------------------------------------------

/// How to start an instance.
/// The config line of a reload that closes clients with 1012 instead of handing them over.
pub const CLOSE_MODE: &str = "reload_mode = \"close\"\n";

#[derive(Clone, Debug)]
pub struct Opts {
    pub workers: Option<usize>,
    /// `--listen`; `None` leaves it to the config file.
    pub listen: Option<String>,
    /// TOML written to `DIR/g.toml` and passed with `-c`.
    pub config: Option<String>,
    pub extra: Vec<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { workers: Some(2), listen: Some("127.0.0.1:0".into()), config: None, extra: Vec::new() }
    }
}

impl Opts {
    pub fn workers(n: usize) -> Opts {
        Opts { workers: Some(n), ..Opts::default() }
    }

    /// `n` workers reloading the close way (`reload_mode = "close"`: clients get 1012), for
    /// the tests of that mode; live hand-off is the default and tests/handoff.rs's subject.
    pub fn close_mode(n: usize) -> Opts {
        Opts { workers: Some(n), config: Some(CLOSE_MODE.into()), ..Opts::default() }
    }
}

/// `Opts` plus where the instance lives, which binary starts it and extra environment, for
/// the tests of deployment (a copied binary), systemd notification and privileges.
pub struct Launch {
    /// The instance's directory (pid file, sockets, logs); prepared by the caller.
    pub dir: TempDir,
    pub opts: Opts,
    /// The binary the master is started from (children are started from the same path).
    pub bin: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Launch {
    pub fn new(dir: TempDir, opts: Opts) -> Launch {
        Launch { dir, opts, bin: PathBuf::from(bin()), env: Vec::new() }
    }
}

/// A running instance started by this test; killed on drop.
pub struct Server {
    pub dir: TempDir,
    pub pid_file: PathBuf,
    /// The foreground master, when this test spawned it (not for daemons).
    child: Option<Child>,
    pub master_pid: u32,
    pub addr: SocketAddr,
    pub workers: usize,
    /// Every child pid seen in a status report, for the kill on drop.
    seen: Mutex<BTreeSet<u32>>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(Opts::default())
    }

    /// Starts `groupcast start` in the foreground and waits until every process runs.
    pub fn start_with(opts: Opts) -> Server {
        Server::launch(Launch::new(TempDir::new("srv"), opts))
    }

    /// Starts `groupcast start` in the foreground as `launch` says (own dir, binary,
    /// environment) and waits until every process runs.
    pub fn launch(launch: Launch) -> Server {
        let Launch { dir, opts, bin, env } = launch;
        let pid_file = dir.join("g.pid");
        let args = start_args(&dir, &pid_file, &opts);
        let log = std::fs::File::create(dir.join("stderr.log")).expect("create log");
        let out = std::fs::File::create(dir.join("stdout.log")).expect("create log");
        let child = Command::new(&bin)
            .args(&args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawn groupcast start");
        let master_pid = child.id();
        let mut server = Server {
            dir,
            pid_file,
            child: Some(child),
            master_pid,
            addr: "127.0.0.1:1".parse().unwrap(),
            workers: 0,
            seen: Mutex::new(BTreeSet::new()),
        };
        server.wait_ready(opts.workers);
        server
    }

    /// Adopts an instance started with `start -d` (its master is not our child).
    pub fn adopt_daemon(dir: TempDir, pid_file: PathBuf, workers: Option<usize>) -> Server {
        let mut server = Server {
            dir,
            pid_file,
            child: None,
            master_pid: 0,
            addr: "127.0.0.1:1".parse().unwrap(),
            workers: 0,
            seen: Mutex::new(BTreeSet::new()),
        };
        server.wait_ready(workers);
        server
    }

    fn wait_ready(&mut self, workers: Option<usize>) {
        let deadline = Instant::now() + TIMEOUT;
        let report = loop {
            if self.child.is_none() && self.master_pid == 0 {
                // A daemon: know its pid early, so the guard can kill it if it never gets ready.
                if let Some(pid) = std::fs::read_to_string(&self.pid_file).ok().and_then(|s| s.trim().parse().ok()) {
                    self.master_pid = pid;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("groupcast start exited with {status} before it was ready:\n{}", self.log());
                }
            }
            if let Ok(r) = self.try_status() {
                let ws = worker_rows(&r);
                let all_running = r["processes"].as_array().is_some_and(|p| p.iter().all(|p| p["state"] == "running"));
                let connected = ws.iter().all(|w| w["channel_connected"] == true);
                let count_ok = workers.is_none_or(|n| ws.len() == n);
                if all_running && connected && count_ok && !ws.is_empty() {
                    break r;
                }
            }
            if Instant::now() >= deadline {
                panic!("groupcast did not become ready in {TIMEOUT:?}:\n{}", self.log());
            }
            sleep(POLL);
        };
        self.master_pid = report["master_pid"].as_u64().unwrap() as u32;
        if let Some(child) = &self.child {
            assert_eq!(self.master_pid, child.id(), "status names another master");
        }
        // Empty with `listen = ""` (a wss-only instance): the address stays a dead one.
        if let Some(addr) = report["listen"].as_str().and_then(|s| s.parse().ok()) {
            self.addr = addr;
        }
        self.workers = report["workers"].as_u64().unwrap() as usize;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn pid_file_arg(&self) -> String {
        self.pid_file.to_string_lossy().into_owned()
    }

    /// `groupcast status --json`, parsed; records the pids it names.
    pub fn try_status(&self) -> Result<Value, String> {
        let pid_file = self.pid_file_arg();
        let out = groupcast(&["status", "--pid-file", &pid_file, "--json"]);
        if !out.status.success() {
            return Err(format!("status failed: {}", stderr(&out)));
        }
        let report: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("status --json is not JSON ({e}): {}", stdout(&out)))?;
        let mut seen = self.seen.lock().unwrap();
        for p in report["processes"].as_array().into_iter().flatten() {
            if let Some(pid) = p["pid"].as_u64().filter(|&p| p > 0) {
                seen.insert(pid as u32);
            }
        }
        Ok(report)
    }

    pub fn status(&self) -> Value {
        self.try_status().unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }

    /// Polls status until `pred` holds; panics with the last report otherwise.
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let r = self.status();
            if pred(&r) {
                return r;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for {what}; last status:\n{}", serde_json::to_string_pretty(&r).unwrap());
            }
            sleep(POLL);
        }
    }

    /// Waits until the workers hold `memberships` in total and the channel server has exactly
    /// one subscription per (worker, group with local members): from then on a publish reaches
    /// every member.
    pub fn wait_subscriptions(&self, memberships: u64) -> Value {
        self.wait_status(&format!("{memberships} memberships with their channel subscriptions"), |r| {
            let groups: u64 = worker_rows(r).iter().map(|w| w["groups"].as_u64().unwrap()).sum();
            r["totals"]["memberships"] == memberships
                && channel_row(r)["memberships"] == groups
                && worker_rows(r).iter().all(|w| w["channel_connected"] == true)
        })
    }

    /// Every pid seen so far in status, the master's included.
    pub fn seen_pids(&self) -> Vec<u32> {
        self.seen.lock().unwrap().iter().copied().collect()
    }

    /// Pids of the children (channel server, workers) seen so far in status.
    pub fn child_pids(&self) -> Vec<u32> {
        let master = self.master_pid;
        self.seen_pids().into_iter().filter(|&p| p != master).collect()
    }

    /// The foreground master's `Child`, to wait for it.
    pub fn take_child(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// Index of the worker holding the server side of each client's connection, read from
    /// /proc: the server socket's inode (in the workers' TCP table) among the worker's
    /// descriptors.
    pub fn workers_of(&self, clients: &[&Client]) -> Vec<usize> {
        let ports: Vec<u16> = clients.iter().map(|c| c.port).collect();
        self.workers_of_ports(&ports)
    }

    /// `workers_of` for connections named by their client-side port. The TCP table is the
    /// workers' own (`/proc/PID/net/tcp` is per network namespace), so this also works for an
    /// instance started in another namespace.
    ///
    /// A connection being handed from one worker to another at a reload is in no worker's
    /// table for a moment (its descriptor is in flight): a port not found is looked up again
    /// for up to 5 s before this panics.
    pub fn workers_of_ports(&self, ports: &[u16]) -> Vec<usize> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.try_workers_of_ports(ports) {
                Ok(on) => return on,
                Err(e) if Instant::now() >= deadline => panic!("{e}"),
                Err(_) => sleep(POLL),
            }
        }
    }

    /// One look-up of `workers_of_ports`; the first port no worker holds is the error.
    fn try_workers_of_ports(&self, ports: &[u16]) -> Result<Vec<usize>, String> {
        let report = self.status();
        let mut inode_owner: HashMap<u64, usize> = HashMap::new();
        let mut tcp = String::new();
        for w in worker_rows(&report) {
            let index = w["index"].as_u64().unwrap() as usize;
            let pid = w["pid"].as_u64().unwrap();
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            if tcp.is_empty() {
                tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
            }
            for fd in fds.flatten() {
                if let Ok(target) = std::fs::read_link(fd.path()) {
                    let t = target.to_string_lossy();
                    if let Some(inode) =
                        t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse().ok())
                    {
                        inode_owner.insert(inode, index);
                    }
                }
            }
        }
        let server_port = self.addr.port();
        // client port -> inode of the server-side socket
        let mut by_peer: HashMap<u16, u64> = HashMap::new();
        for line in tcp.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
            if port(f[1]) == server_port {
                by_peer.insert(port(f[2]), f[9].parse().unwrap());
            }
        }
        ports
            .iter()
            .map(|port| {
                let inode = by_peer.get(port).ok_or_else(|| format!("no server socket for client port {port}"))?;
                inode_owner.get(inode).copied().ok_or_else(|| format!("no worker holds client port {port}"))
            })
            .collect()
    }

    /// Connects clients until every worker holds at least `per_worker` of them; returns the
    /// clients and the worker index of each.
    pub fn connect_spread(&self, per_worker: usize) -> (Vec<Client>, Vec<usize>) {
        self.connect_spread_path(per_worker, "/")
    }

    /// `connect_spread` with the clients connecting to `path` (e.g. `/?protocol=2`).
    pub fn connect_spread_path(&self, per_worker: usize, path: &str) -> (Vec<Client>, Vec<usize>) {
        let mut clients = Vec::new();
        for _ in 0..64 {
            for _ in 0..4 {
                clients.push(Client::connect_path(self.addr, path));
            }
            let refs: Vec<&Client> = clients.iter().collect();
            let on = self.workers_of(&refs);
            if (0..self.workers).all(|w| on.iter().filter(|&&x| x == w).count() >= per_worker) {
                return (clients, on);
            }
        }
        panic!("256 connections did not reach every one of {} workers", self.workers);
    }

    /// Stops the instance and forgets it (used by tests that check the stop itself).
    pub fn kill_now(&mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                signal(child.id(), libc::SIGTERM);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    sleep(POLL);
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        } else if self.master_pid > 0 && alive(self.master_pid) && belongs_to(self.master_pid, &self.pid_file) {
            signal(self.master_pid, libc::SIGTERM);
            while Instant::now() < deadline && alive(self.master_pid) {
                sleep(POLL);
            }
            if alive(self.master_pid) && belongs_to(self.master_pid, &self.pid_file) {
                signal(self.master_pid, libc::SIGKILL);
            }
        }
        for pid in self.seen_pids() {
            if alive(pid) && belongs_to(pid, &self.pid_file) {
                signal(pid, libc::SIGKILL);
            }
        }
        self.master_pid = 0;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn start_args(dir: &TempDir, pid_file: &Path, opts: &Opts) -> Vec<String> {
    let mut args = vec!["start".to_string()];
    if let Some(listen) = &opts.listen {
        args.extend(["--listen".into(), listen.clone()]);
    }
    if let Some(n) = opts.workers {
        args.extend(["--workers".into(), n.to_string()]);
    }
    args.extend(["--pid-file".into(), pid_file.to_string_lossy().into_owned()]);
    if let Some(config) = &opts.config {
        let path = dir.join("g.toml");
        std::fs::write(&path, config).expect("write config");
        args.extend(["-c".into(), path.to_string_lossy().into_owned()]);
    }
    args.extend(opts.extra.iter().cloned());
    args
}

// ---- status helpers ------------------------------------------------------------------------

/// The worker rows of a status report, by index.
pub fn worker_rows(r: &Value) -> Vec<Value> {
    let mut rows: Vec<Value> = r["processes"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["role"] == "worker").cloned().collect())
        .unwrap_or_default();
    rows.sort_by_key(|w| w["index"].as_u64());
    rows
}

pub fn channel_row(r: &Value) -> Value {
    r["processes"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["role"] == "channel").cloned())
        .expect("status has a channel row")
}

pub fn field(row: &Value, name: &str) -> u64 {
    row[name].as_u64().unwrap_or_else(|| panic!("no integer `{name}` in {row}"))
}

// ---- WebSocket clients ---------------------------------------------------------------------

/// A well-behaved client: tungstenite over a blocking socket with read timeouts.
pub struct Client {
    ws: WebSocket<TcpStream>,
    /// Local port, which identifies the connection on the server side.
    pub port: u16,
    next_id: u64,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::connect_path(addr, "/")
    }

    /// Connects to `path` (with its query, e.g. `/?protocol=2`).
    pub fn connect_path(addr: SocketAddr, path: &str) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to groupcast");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        let port = stream.local_addr().unwrap().port();
        let url = format!("ws://{addr}{path}");
        let mut attempt = tungstenite::client::client(url.as_str(), stream);
        let deadline = Instant::now() + TIMEOUT;
        let ws = loop {
            match attempt {
                Ok((ws, _response)) => break ws,
                Err(tungstenite::HandshakeError::Interrupted(mid)) if Instant::now() < deadline => {
                    attempt = mid.handshake();
                }
                Err(e) => panic!("WebSocket handshake failed: {e}"),
            }
        };
        Client { ws, port, next_id: 0 }
    }

    pub fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).unwrap_or_else(|e| panic!("send {text:?}: {e}"));
    }

    pub fn send_json(&mut self, v: &Value) {
        self.send(&v.to_string());
    }

    pub fn add_group(&mut self, group: &Value) {
        self.send_json(&json!({"cmd":"add_group","group_id":group}));
    }

    pub fn leave_group(&mut self, group: &Value) {
        self.send_json(&json!({"cmd":"leave_group","group_id":group}));
    }

    pub fn send_to_group(&mut self, group: &Value, message: &str) {
        self.send_json(&json!({"cmd":"send_to_group","group_id":group,"message":message}));
    }

    /// The next message of any kind, or `None` if nothing came within `timeout`.
    pub fn next_message(&mut self, timeout: Duration) -> Option<Message> {
        self.ws.get_mut().set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).unwrap();
        let result = self.ws.read();
        self.ws.get_mut().set_read_timeout(Some(TIMEOUT)).unwrap();
        match result {
            Ok(m) => Some(m),
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// The next text frame (pings are skipped); panics after `TIMEOUT`.
    pub fn recv(&mut self) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_message(left) {
                Some(Message::Text(t)) => return t.as_str().to_owned(),
                Some(Message::Ping(_) | Message::Pong(_)) => continue,
                Some(other) => panic!("expected a text frame, got {other:?}"),
                None => panic!("no frame within {TIMEOUT:?}"),
            }
        }
    }

    /// Sends `{"cmd":"leave_group","group_id":"__probe__","id":"probe-N"}` (a no-op asking for a
    /// reply) and returns every text frame received before that reply.
    pub fn sync(&mut self) -> Vec<String> {
        self.next_id += 1;
        let id = format!("probe-{}-{}", self.port, self.next_id);
        self.send_json(&json!({"cmd":"leave_group","group_id":"__probe__","id":id}));
        let expected = json!({"id": id, "ok": true});
        let mut before = Vec::new();
        loop {
            let text = self.recv();
            if serde_json::from_str::<Value>(&text).ok().as_ref() == Some(&expected) {
                return before;
            }
            before.push(text);
        }
    }

    /// `sync`, asserting nothing arrived before the reply.
    pub fn sync_quiet(&mut self) {
        let before = self.sync();
        assert!(before.is_empty(), "unexpected frames: {before:?}");
    }

    /// Closes with the WebSocket close handshake: our close frame, the server's echo, EOF.
    pub fn close(&mut self) {
        self.ws.close(None).expect("send close frame");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed) => return,
                Err(e) => panic!("close handshake failed: {e}"),
            }
            assert!(Instant::now() < deadline, "close handshake did not finish");
        }
    }

    /// The server ended the connection without a close handshake (its process died).
    pub fn expect_dropped(&mut self) {
        match self.ws.read() {
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof) => {}
            Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake)) => {}
            other => panic!("expected the connection to drop, got {other:?}"),
        }
    }

    /// Reads until the server's close frame; returns its code.
    pub fn expect_close(&mut self) -> u16 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_message(left) {
                Some(Message::Close(Some(frame))) => return u16::from(frame.code),
                Some(Message::Close(None)) => return 1005,
                Some(_) => continue,
                None => panic!("no close frame within {TIMEOUT:?}"),
            }
        }
    }
}

/// A hand-driven WebSocket client: a hand-made handshake, then raw frames out (any first
/// byte, masked or not: the protocol violations tungstenite refuses to produce) and frames in
/// without answering anything (a client that stops reading, or answers pings itself).
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// How reading a frame ended when it did not yield one.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Orderly end of stream (or a reset after the server closed).
    Eof,
    /// Nothing arrived before the read timeout.
    Timeout,
}

impl RawWs {
    pub fn connect(addr: SocketAddr) -> RawWs {
        let stream = TcpStream::connect(addr).expect("connect to groupcast");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        RawWs::upgrade(stream)
    }

    /// Completes the WebSocket handshake on `stream` (a socket prepared by the caller, e.g.
    /// with a small receive buffer).
    pub fn upgrade(mut stream: TcpStream) -> RawWs {
        stream
            .write_all(
                b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .unwrap();
        let mut raw = RawWs { stream, buf: Vec::new() };
        let head_end = loop {
            if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match raw.fill() {
                Ok(_) => {}
                Err(end) => panic!("handshake: {end:?} before the answer was complete"),
            }
        };
        let head = String::from_utf8_lossy(&raw.buf[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101 "), "handshake refused: {head}");
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "bad accept key: {head}");
        raw.buf.drain(..head_end);
        raw
    }

    /// A client whose upgrade the caller did by hand (e.g. split across a reload): `rest` is
    /// what arrived after the 101's head.
    pub fn after_upgrade(stream: TcpStream, rest: Vec<u8>) -> RawWs {
        RawWs { stream, buf: rest }
    }

    fn fill(&mut self) -> Result<usize, End> {
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(End::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(End::Timeout),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Err(End::Eof),
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// Writes one frame: `first` is FIN/RSV/opcode, masked unless `masked` is false.
    pub fn write_frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        self.stream.write_all(&encode_frame(first, payload, masked)).unwrap();
    }

    /// Local port, which identifies the connection on the server side (`workers_of_ports`).
    pub fn port(&self) -> u16 {
        self.stream.local_addr().unwrap().port()
    }

    /// Writes one masked text frame.
    pub fn send_text(&mut self, text: &str) {
        self.write_frame(0x81, text.as_bytes(), true);
    }

    /// The next frame (first byte, payload), or how the stream ended.
    pub fn next_frame(&mut self) -> Result<(u8, Vec<u8>), End> {
        loop {
            if self.buf.len() >= 2 {
                let (len, head) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                assert_eq!(self.buf[1] & 0x80, 0, "server frames must not be masked");
                if len != usize::MAX && self.buf.len() >= head + len {
                    let first = self.buf[0];
                    let payload = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    return Ok((first, payload));
                }
            }
            self.fill()?;
        }
    }

    /// The next frame from the server: (first byte, payload); `None` at end of stream. Panics
    /// when nothing arrives within the read timeout.
    pub fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        match self.next_frame() {
            Ok(frame) => Some(frame),
            Err(End::Eof) => None,
            Err(End::Timeout) => panic!("no frame within the read timeout"),
        }
    }

    /// The next frame, which must be a text frame (pings are not skipped).
    pub fn next_text(&mut self) -> String {
        match self.next_frame() {
            Ok((0x81, p)) => String::from_utf8(p).expect("UTF-8 text"),
            other => panic!("expected a text frame, got {:?}", other.map(|(f, p)| (f, p.len()))),
        }
    }

    /// Sets the read timeout (`None` = `TIMEOUT`).
    pub fn read_timeout(&self, t: Option<Duration>) {
        self.stream.set_read_timeout(Some(t.unwrap_or(TIMEOUT))).unwrap();
    }

    /// Reads frames until a close frame; returns its code. Panics if the stream ends first.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.read_frame() {
                Some((first, payload)) if first & 0x0f == 0x8 => {
                    assert!(first & 0x80 != 0, "close frame must be final");
                    assert!(payload.len() >= 2, "close frame without a code");
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// After the close frame: the server closes the TCP connection (EOF, or a reset).
    pub fn expect_eof(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected the server to close the connection: {e}"),
            }
            assert!(Instant::now() < deadline, "server kept the connection open");
        }
    }
}

/// One client frame: `first` is FIN/RSV/opcode as sent, masked unless `masked` is false (the
/// library's client encoder, shared with the load generator).
pub fn encode_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_client(&mut out, first, payload, masked.then_some(MASK));
    out
}

/// The masking key of the tests' client frames (any key will do; RFC 6455 wants it random
/// only against proxies that cache).
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Sends raw `request` bytes and returns everything the server answers until it closes.
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !out.is_empty() => break,
            Err(e) => panic!("reading the HTTP answer: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---- traffic with an exactly-once check ----------------------------------------------------

/// One sender's stream of messages to one group: `count` numbered messages, then a fence.
#[derive(Clone, Debug)]
pub struct Flow {
    pub sender: usize,
    /// Canonical group name (what the server uses: `123` and `"123"` are both "123").
    pub group: String,
    /// The `group_id` JSON the sender uses in its commands.
    pub group_id: Value,
}

/// Plays `flows` (`count` messages each, interleaved, then one fence per flow) and checks that
/// every client received, from each flow to a group it is a member of (`member_of[client]`),
/// exactly the `count` messages in order, then the fence; and nothing from any other group.
/// Returns the number of group frames delivered.
pub fn exchange(clients: &mut [Client], member_of: &[HashSet<String>], flows: &[Flow], count: usize, tag: &str) -> u64 {
    assert_eq!(clients.len(), member_of.len());
    for seq in 0..count {
        for f in flows {
            clients[f.sender].send_to_group(&f.group_id, &format!("{tag}|{}|{}|{seq}", f.sender, f.group));
        }
    }
    for f in flows {
        clients[f.sender].send_to_group(&f.group_id, &format!("{tag}|{}|{}|fence", f.sender, f.group));
    }
    let mut delivered = 0u64;
    for (c, client) in clients.iter_mut().enumerate() {
        let expected: BTreeSet<(usize, String)> =
            flows.iter().filter(|f| member_of[c].contains(&f.group)).map(|f| (f.sender, f.group.clone())).collect();
        let mut got: BTreeMap<(usize, String), Vec<usize>> = BTreeMap::new();
        let mut fenced: BTreeSet<(usize, String)> = BTreeSet::new();
        while fenced.len() < expected.len() {
            let text = client.recv();
            let parts: Vec<&str> = text.split('|').collect();
            assert!(parts.len() == 4 && parts[0] == tag, "client {c}: unexpected frame {text:?}");
            let key = (parts[1].parse::<usize>().unwrap(), parts[2].to_owned());
            assert!(
                member_of[c].contains(&key.1),
                "client {c} received {text:?} from group {} it is not a member of",
                key.1
            );
            assert!(expected.contains(&key), "client {c}: {text:?} from no flow");
            assert!(!fenced.contains(&key), "client {c}: {text:?} after its fence");
            delivered += 1;
            if parts[3] == "fence" {
                fenced.insert(key);
            } else {
                got.entry(key).or_default().push(parts[3].parse().unwrap());
            }
        }
        for key in &expected {
            let seqs = got.remove(key).unwrap_or_default();
            assert_eq!(
                seqs,
                (0..count).collect::<Vec<_>>(),
                "client {c}: messages of sender {} to group {} (missing, duplicated or out of order)",
                key.0,
                key.1
            );
        }
    }
    delivered
}

/// A deterministic pseudo-random sequence (xorshift), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

// ---- supervision: processes, files, binaries, datagram sinks -------------------------------

impl Server {
    /// `groupcast ARGS --pid-file P` run to completion (with `run_timed`).
    pub fn cli(&self, args: &[&str]) -> Run {
        self.cli_with(Path::new(bin()), args)
    }

    /// `cli` with another binary (e.g. the copy the instance was started from).
    pub fn cli_with(&self, bin: &Path, args: &[&str]) -> Run {
        let pid_file = self.pid_file_arg();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--pid-file", &pid_file]);
        run_bin_timed(bin, &all, self.dir.path())
    }

    /// Waits until the foreground master (our child) has exited; its exit status.
    pub fn wait_master_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("a foreground master");
        let status = wait_for("the master to exit", timeout, || child.try_wait().unwrap());
        self.child = None;
        status
    }

    /// The foreground master has not exited yet (reaped or not).
    pub fn master_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => alive(self.master_pid),
        }
    }

    /// One `RawWs` client on each worker (more connections are opened and dropped until every
    /// worker holds one); index i of the result is on worker i.
    pub fn raw_on_each_worker(&self) -> Vec<RawWs> {
        self.spread(1, || RawWs::connect(self.addr), RawWs::port)
    }

    /// Connections made with `connect` until each worker holds `per_worker` of them (those
    /// landing on a worker that has enough are dropped at once); connection i of the result
    /// is on worker i % workers. `port` names a connection's client side.
    pub fn spread<T>(&self, per_worker: usize, mut connect: impl FnMut() -> T, port: impl Fn(&T) -> u16) -> Vec<T> {
        let mut found: Vec<Vec<T>> = (0..self.workers).map(|_| Vec::new()).collect();
        for _ in 0..256 * per_worker {
            let conn = connect();
            let w = self.workers_of_ports(&[port(&conn)])[0];
            if found[w].len() < per_worker {
                found[w].push(conn);
            }
            if found.iter().all(|f| f.len() == per_worker) {
                let mut rounds: Vec<std::vec::IntoIter<T>> = found.into_iter().map(Vec::into_iter).collect();
                return (0..per_worker * self.workers).filter_map(|i| rounds[i % self.workers].next()).collect();
            }
        }
        panic!("{} connections did not reach every one of {} workers", 256 * per_worker, self.workers);
    }

    /// The files a running instance keeps beside its pid file.
    pub fn instance_files(&self) -> [PathBuf; 3] {
        instance_files(&self.pid_file)
    }
}

/// The files a running instance keeps beside its pid file `DIR/g.pid`.
pub fn instance_files(pid_file: &Path) -> [PathBuf; 3] {
    [pid_file.to_path_buf(), pid_file.with_file_name("g.ctl.sock"), pid_file.with_file_name("g.channel.sock")]
}

/// After a stop: none of the instance's files, none of its processes.
pub fn assert_instance_gone(pid_file: &Path, master: u32, children: &[u32]) {
    for f in instance_files(pid_file) {
        assert!(!f.exists(), "{} left behind", f.display());
    }
    for &pid in children {
        wait_for(&format!("child {pid} to be gone"), Duration::from_secs(10), || (!alive(pid)).then_some(()));
    }
    wait_for("the master to exit", Duration::from_secs(10), || (!alive(master)).then_some(()));
}

/// The worker rows of the slots, by index: without the old workers still retiring after a
/// reload (`worker_rows` lists those too).
pub fn slot_rows(r: &Value) -> Vec<Value> {
    worker_rows(r).into_iter().filter(|w| w["state"] != "retiring").collect()
}

/// Pids of the workers in the slots, by index.
pub fn worker_pids(r: &Value) -> Vec<u32> {
    slot_rows(r).iter().map(|w| field(w, "pid") as u32).collect()
}

pub fn channel_pid(r: &Value) -> u32 {
    field(&channel_row(r), "pid") as u32
}

pub fn master_row(r: &Value) -> Value {
    r["processes"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["role"] == "master").cloned())
        .expect("status has a master row")
}

/// Rows in state `retiring` (workers replaced by a reload, still draining).
pub fn retiring_rows(r: &Value) -> Vec<Value> {
    r["processes"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["state"] == "retiring").cloned().collect())
        .unwrap_or_default()
}

/// The real uid of `pid` (first field of the `Uid:` line of /proc/PID/status).
pub fn proc_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let ids: Vec<u32> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // Real, effective, saved and filesystem uid must all agree for a full drop.
    (ids.len() == 4 && ids.iter().all(|&u| u == ids[0])).then(|| ids[0])
}

/// Modification time of `path`, in Unix seconds (what status reports as `binary_mtime`).
pub fn mtime_secs(path: &Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Installs `content` as the executable `dest` the way `scripts/install` does: write
/// `dest.new`, set its mode and (optionally) its mtime, rename it over `dest`, so a process
/// running the old file is not disturbed.
pub fn install_executable(content: &[u8], dest: &Path, mtime: Option<SystemTime>) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dest.with_extension("new");
    {
        let mut f = std::fs::File::create(&tmp).expect("create the new binary");
        f.write_all(content).unwrap();
        f.set_permissions(std::fs::Permissions::from_mode(0o755)).unwrap();
        if let Some(t) = mtime {
            f.set_modified(t).unwrap();
        }
        f.sync_all().unwrap();
    }
    std::fs::rename(&tmp, dest).expect("rename the new binary into place");
}

/// The test binary's bytes (to install copies of it).
pub fn binary_bytes() -> Vec<u8> {
    std::fs::read(bin()).expect("read the groupcast binary")
}

/// A Unix datagram socket read by a thread of its own (syslog, systemd's notify socket): a
/// full datagram queue would make the daemon drop lines.
pub struct DatagramSink {
    lines: std::sync::Arc<Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DatagramSink {
    pub fn bind(path: &Path) -> DatagramSink {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let socket = std::os::unix::net::UnixDatagram::bind(path).expect("bind a datagram socket");
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (lines, stop) = (lines.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                        lines.lock().unwrap().push(line);
                    }
                }
            })
        };
        DatagramSink { lines, stop, thread: Some(thread) }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a datagram satisfying `pred` among those from index `from` on; its index.
    pub fn wait_line(&self, what: &str, from: usize, pred: impl Fn(&str) -> bool) -> usize {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let lines = self.lines();
            if let Some(i) = lines.iter().skip(from).position(|l| pred(l)) {
                return from + i;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for {what}; got:\n{}", lines.join("\n"));
            }
            sleep(POLL);
        }
    }
}

impl Drop for DatagramSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Client {
    /// Like `connect`, but reports failure (refused, handshake failed or timed out) instead
    /// of panicking, for tests that count failures.
    pub fn try_connect(addr: SocketAddr, timeout: Duration) -> Result<Client, String> {
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        stream.set_read_timeout(Some(timeout)).unwrap();
        stream.set_write_timeout(Some(timeout)).unwrap();
        let port = stream.local_addr().unwrap().port();
        let url = format!("ws://{addr}/");
        match tungstenite::client::client(url.as_str(), stream) {
            Ok((ws, _)) => Ok(Client { ws, port, next_id: 0 }),
            Err(e) => Err(format!("handshake: {e}")),
        }
    }

    /// Sends `cmd` with a fresh `"id"` and returns the frame answering it (`{"id":..,"ok":true}`
    /// or an error frame carrying the id); other frames before it are skipped.
    pub fn call(&mut self, mut cmd: Value) -> Value {
        self.next_id += 1;
        let id = format!("call-{}-{}", self.port, self.next_id);
        cmd["id"] = json!(id);
        self.send_json(&cmd);
        loop {
            let text = self.recv();
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                if v["id"] == json!(id) {
                    return v;
                }
            }
        }
    }

    /// After the server's close frame: send ours (tungstenite answers it on the next read)
    /// and read until the server ends the connection.
    pub fn finish_close(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => return,
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("finishing the close handshake: {e}"),
            }
            assert!(Instant::now() < deadline, "close handshake did not finish");
        }
    }

    /// The raw WebSocket, for tests that need tungstenite's own error values.
    pub fn ws_mut(&mut self) -> &mut WebSocket<TcpStream> {
        &mut self.ws
    }
}
