//! Simulated hosts for the integration tests: Linux network namespaces joined by veth pairs to
//! a bridge that lives in a "switch" namespace of its own, so the root namespace carries no
//! test address, route or device at all (every veth is created directly inside the test's
//! namespaces). Names carry the test process's pid; the guard deletes every namespace it
//! created on drop, panics included (deleting a namespace destroys its veth ends and the
//! bridge).
//!
//! Requires root and iproute2; `Net::setup` returns `Err` with the reason when the machine
//! cannot create namespaces, so the caller can skip.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where `ip netns add` puts its namespace handles.
const NETNS_DIR: &str = "/run/netns";

/// One simulated host: its namespace, its address on the test subnet, and the name of the
/// switch-side end of its cable (the device to pull to cut the host off).
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub addr: String,
    pub switch_port: String,
}

/// The namespaces of one test: a switch with a bridge, and hosts cabled to it.
pub struct Net {
    pub switch: String,
    pub hosts: Vec<Host>,
    created: Vec<String>,
    /// `/run/netns` did not exist before this test: remove it again if it is left empty.
    made_netns_dir: bool,
}

/// Runs `ip ARGS`; `Err` with its stderr when it fails.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    /// Creates the switch namespace (bridge `br0`) and one namespace per `(label, address)`,
    /// each cabled to the switch by a veth pair (`eth0` in the host, `v<label>` in the
    /// switch), address `address/prefix` on `eth0`, and `lo` up everywhere.
    pub fn setup(tag: &str, prefix_len: u8, hosts: &[(&str, &str)]) -> Result<Net, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        ip(&["-V"]).map_err(|e| format!("iproute2 is not usable: {e}"))?;
        let base = format!("gc{tag}{}", std::process::id());
        let mut net = Net {
            switch: format!("{base}-sw"),
            hosts: Vec::new(),
            created: Vec::new(),
            made_netns_dir: !Path::new(NETNS_DIR).exists(),
        };
        // From here on, `net`'s drop removes whatever was created if a step fails.
        net.add_ns(&net.switch.clone())?;
        let sw = net.switch.clone();
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (label, addr) in hosts {
            let ns = format!("{base}-{label}");
            net.add_ns(&ns)?;
            let port = format!("v{label}");
            ip(&["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/{prefix_len}"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            net.hosts.push(Host { ns, addr: (*addr).to_owned(), switch_port: port });
        }
        Ok(net)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        self.created.push(name.to_owned());
        Ok(())
    }

    /// The host with this label (as given to `setup`).
    pub fn host(&self, label: &str) -> &Host {
        self.hosts.iter().find(|h| h.switch_port == format!("v{label}")).unwrap_or_else(|| panic!("no host {label}"))
    }

    /// Pulls (`false`) or plugs back (`true`) the host's cable at the switch.
    pub fn set_cable(&self, host: &Host, up: bool) {
        ip(&["-n", &self.switch, "link", "set", &host.switch_port, if up { "up" } else { "down" }])
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("netns cleanup: {e}");
            }
        }
        if self.made_netns_dir {
            // `ip netns add` made /run/netns a (bind) mount point; undo that if nobody else
            // put a namespace there meanwhile.
            let empty = std::fs::read_dir(NETNS_DIR).map(|mut d| d.next().is_none()).unwrap_or(false);
            if empty {
                let path = std::ffi::CString::new(NETNS_DIR).unwrap();
                // SAFETY: a valid NUL-terminated path; detaching a mount has no memory effects.
                unsafe {
                    libc::umount2(path.as_ptr(), libc::MNT_DETACH);
                }
                let _ = std::fs::remove_dir(NETNS_DIR);
            }
        }
    }
}

/// The handle of namespace `ns`.
pub fn ns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Moves the calling thread into network namespace `ns`: sockets it creates from then on
/// live there (and stay there when handed to another thread).
pub fn enter(ns: &str) {
    let f = std::fs::File::open(ns_path(ns)).unwrap_or_else(|e| panic!("open namespace {ns}: {e}"));
    // SAFETY: setns on a valid namespace descriptor; only this thread changes namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({ns}): {}", std::io::Error::last_os_error());
}

/// Runs `f` on a thread of its own inside namespace `ns` and returns its result (sockets it
/// created keep living in `ns`; processes it spawns start in `ns`).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A script that runs the given binary inside namespace `ns` through `ip netns exec` (which
/// execs, so the pid is the binary's): for helpers that start "a binary" with arguments.
pub fn ns_wrapper(dir: &Path, ns: &str, bin: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("in-{ns}"));
    std::fs::write(&path, format!("#!/bin/sh\nexec ip netns exec '{ns}' '{bin}' \"$@\"\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}
