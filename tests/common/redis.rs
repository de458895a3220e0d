//! A real redis-server for the Redis bus tests, on a free loopback port, killed on drop:
//! without persistence, or with appendonly in a directory (the data survives a restart).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{skip_or_fail, wait_for};

pub struct Redis {
    child: Child,
    pub port: u16,
    /// `Some(dir)`: appendonly in `dir` (the data survives a restart).
    dir: Option<PathBuf>,
}

impl Redis {
    /// The server's process id (to stop it with SIGSTOP, say).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts one on `port`; `None` (after `skip_or_fail`) where redis-server is missing.
    pub fn start(port: u16, dir: Option<&Path>) -> Option<Redis> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""]);
        match dir {
            Some(d) => cmd.args(["--appendonly", "yes", "--appendfsync", "always", "--dir"]).arg(d),
            None => cmd.args(["--appendonly", "no"]),
        };
        let child = match cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
            Ok(c) => c,
            Err(e) => {
                skip_or_fail(&format!("redis-server not available ({e}); .ci/run installs it"));
                return None;
            }
        };
        let redis = Redis { child, port, dir: dir.map(Path::to_path_buf) };
        wait_for("redis-server to answer PING", Duration::from_secs(20), || {
            redis.command("PING").contains("PONG").then_some(())
        });
        Some(redis)
    }

    /// Stops it (SIGTERM: with appendonly, everything written is on disk) and starts it again
    /// on the same port and directory.
    pub fn restart(mut self) -> Redis {
        super::signal(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
        let (port, dir) = (self.port, self.dir.take());
        drop(self);
        Redis::start(port, dir.as_deref()).expect("redis-server restarts")
    }

    /// One inline command, its raw answer.
    pub fn command(&self, cmd: &str) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return String::new() };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if s.write_all(format!("{cmd}\r\n").as_bytes()).is_err() {
            return String::new();
        }
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
