//! The standalone broker (`groupcast channel`) started by a test, with a shared secret, on
//! loopback or through a command prefix (`ip netns exec NS` for the simulated hosts), with an
//! optional config file and open-file limits (`BrokerOpts`); stopped, and failing that killed by
//! pid, on drop. Also the secret and connect flags a test's own fake broker hands an instance.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{alive, belongs_to, bin, free_port, signal, wait_for, Client, Opts, Server, TempDir, POLL, TIMEOUT};

/// The shared secret of a test broker, as peers prove it (the file holds it plus a newline,
/// which the loader strips).
pub const BROKER_SECRET: &[u8] = b"correct horse battery staple 42";

/// Writes `BROKER_SECRET` to `dir/secret` (mode 0600) and returns the file's path.
pub fn write_secret(dir: &Path) -> PathBuf {
    let secret = dir.join("secret");
    std::fs::write(&secret, [BROKER_SECRET, b"\n"].concat()).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    secret
}

/// The flags that connect an instance or `publish` to the broker at `addr` with the secret in
/// `secret_file`.
pub fn connect_args(addr: impl std::fmt::Display, secret_file: &Path) -> Vec<String> {
    vec![
        "--channel-connect".into(),
        addr.to_string(),
        "--channel-secret-file".into(),
        secret_file.to_string_lossy().into_owned(),
    ]
}

/// How to start a `Broker`; `BrokerOpts::default()` is a plain broker on a free loopback port.
#[derive(Debug, Default, Clone)]
pub struct BrokerOpts<'a> {
    /// A command prefix that execs its arguments (`ip netns exec NS`), so the child's pid is
    /// the broker master's.
    pub prefix: &'a [&'a str],
    /// `--listen`; `None`: a free loopback port.
    pub listen: Option<String>,
    /// TOML written to a config file passed with `-c` (`[channel]` bounds and the like).
    pub config: Option<String>,
    /// Soft and hard open-file limits set before exec, the hard one never above the test's
    /// own: `(1024, u64::MAX)` is what a shell with `ulimit -Sn 1024` would give the broker.
    pub nofile: Option<(u64, u64)>,
}

/// A running standalone broker and where its files are.
pub struct Broker {
    pub dir: TempDir,
    child: Child,
    pub pid_file: PathBuf,
    /// Where it listens (`--listen`).
    pub addr: SocketAddr,
    /// The shared secret's file (mode 0600, holding `BROKER_SECRET`), for the peers'
    /// `--channel-secret-file`.
    pub secret: PathBuf,
}

impl Broker {
    /// A broker on a free loopback port.
    pub fn start(name: &str) -> Broker {
        Broker::start_with(name, BrokerOpts::default())
    }

    /// A broker listening on `listen`, started as `PREFIX.. groupcast channel ..` (see
    /// `BrokerOpts::prefix`).
    pub fn start_via(name: &str, prefix: &[&str], listen: &str) -> Broker {
        Broker::start_with(name, BrokerOpts { prefix, listen: Some(listen.to_owned()), ..BrokerOpts::default() })
    }

    /// A broker started as `opts` say; returns once its channel process runs.
    pub fn start_with(name: &str, opts: BrokerOpts) -> Broker {
        let dir = TempDir::new(name);
        let secret = write_secret(dir.path());
        let pid_file = dir.join("broker.pid");
        let log = std::fs::File::create(dir.join("broker.log")).unwrap();
        let listen = opts.listen.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let (program, args) = match opts.prefix.split_first() {
            Some((program, args)) => (*program, [args, &[bin()]].concat()),
            None => (bin(), Vec::new()),
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .args(["channel", "--listen", &listen, "--channel-secret-file"])
            .arg(&secret)
            .arg("--pid-file")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(config) = &opts.config {
            let file = dir.join("broker.toml");
            std::fs::write(&file, config).unwrap();
            command.arg("-c").arg(file);
        }
        if let Some((soft, hard)) = opts.nofile {
            // SAFETY: runs in the child between fork and exec; getrlimit/setrlimit are
            // async-signal-safe and nothing is allocated.
            unsafe {
                command.pre_exec(move || {
                    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_max = hard.min(lim.rlim_max);
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().unwrap_or_else(|e| panic!("start the broker through {:?}: {e}", opts.prefix));
        let addr = listen.parse().expect("a broker address");
        let broker = Broker { dir, child, pid_file, addr, secret };
        wait_for("the broker to run", TIMEOUT, || broker.channel_pid());
        broker
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `groupcast status --json` of the broker's instance, `None` while it does not answer.
    pub fn status(&self) -> Option<Value> {
        let out = Command::new(bin()).args(["status", "--json", "--pid-file"]).arg(&self.pid_file).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The status row of the broker process (the master's channel child).
    pub fn channel_row(&self) -> Option<Value> {
        self.status()?["processes"].as_array()?.iter().find(|p| p["role"] == "channel").cloned()
    }

    /// Pid of the running broker process.
    pub fn channel_pid(&self) -> Option<u32> {
        let row = self.channel_row()?;
        (row["state"] == "running").then(|| row["pid"].as_u64()).flatten().map(|p| p as u32)
    }

    /// Peers connected to it now (0 while it does not answer).
    pub fn peers(&self) -> u64 {
        self.channel_row().and_then(|r| r["connections"].as_u64()).unwrap_or(0)
    }

    /// Waits until the broker holds at least `n` subscriptions.
    pub fn wait_memberships(&self, n: u64) {
        wait_for(&format!("{n} subscriptions at the broker"), TIMEOUT, || {
            (self.channel_row()?["memberships"].as_u64()? >= n).then_some(())
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }

    /// The flags that connect an instance or `publish` to this broker with its secret.
    pub fn connect_args(&self) -> Vec<String> {
        connect_args(self.addr, &self.secret)
    }

    /// The `[channel]` section that does the same from a config file.
    pub fn channel_config(&self) -> String {
        format!("[channel]\nconnect = \"{}\"\nsecret_file = {:?}\n", self.addr, self.secret.to_str().unwrap())
    }

    /// An instance (2 workers, on loopback) using this broker, with the TOML `config`.
    pub fn instance(&self, config: &str) -> Server {
        Server::start_with(Opts { config: Some(config.to_owned()), extra: self.connect_args(), ..Opts::workers(2) })
    }

    /// An instance as `instance` starts it, a client on its worker 0 (the sender) and one on
    /// worker 1 (the receiver) that is a member of `group`, its subscription at this broker: a
    /// message between them crosses the broker.
    pub fn sender_and_receiver(&self, config: &str, group: &str) -> (Server, Client, Client) {
        let server = self.instance(config);
        let (clients, on) = server.connect_spread(1);
        let mut clients: Vec<(usize, Client)> = on.into_iter().zip(clients).collect();
        let mut on_worker = |w: usize| clients.remove(clients.iter().position(|(on, _)| *on == w).unwrap()).1;
        let sender = on_worker(0);
        let mut receiver = on_worker(1);
        receiver.add_group(&serde_json::json!(group));
        receiver.sync();
        self.wait_memberships(1);
        (server, sender, receiver)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let child_pid = self.channel_row().and_then(|r| r["pid"].as_u64()).map(|p| p as u32);
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = child_pid.filter(|&p| p > 0) {
            if alive(pid) && belongs_to(pid, &self.pid_file) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}
