//! Issue 10, defects 10 and 11: where the pid file and sockets live and who may touch them.
//! The default files go in a private directory (0700, ours); sockets are 0600 whatever the
//! umask; a silent control client does not hold up the master; the pid file is never opened
//! through a symlink; `stop` signals only a groupcast master named by a trusted pid file.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

fn euid() -> u32 {
    // SAFETY: geteuid(2) only reads the caller's credentials.
    unsafe { libc::geteuid() }
}

/// What the binary takes as its private runtime directory (config::runtime_dir).
fn runtime_dir() -> PathBuf {
    if euid() == 0 {
        return PathBuf::from("/run/groupcast");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("groupcast"),
        _ => PathBuf::from(format!("/tmp/groupcast-{}", euid())),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o777
}

/// A process this test started, killed on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `groupcast ARGS` in the background with umask 0, so any mode it gets is one it set.
fn spawn_loose_umask(args: &[&str], dir: &Path) -> Guard {
    let mut command = Command::new(bin());
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("stdout.log")).unwrap())
        .stderr(File::create(dir.join("stderr.log")).unwrap());
    // SAFETY: umask(2) is async-signal-safe and touches only the child's own mask.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    Guard(command.spawn().expect("spawn groupcast"))
}

fn wait_status(extra: &[&str], dir: &Path, master: u32) {
    wait_for("the instance to answer status", TIMEOUT, || {
        let mut args = vec!["status", "--json"];
        args.extend_from_slice(extra);
        let run = run_timed(&args, dir);
        let report: serde_json::Value = serde_json::from_str(&run.stdout).ok()?;
        (report["master_pid"] == master && report["processes"].as_array()?.iter().all(|p| p["state"] == "running"))
            .then_some(())
    });
}

#[test]
fn issue10_default_files_live_in_a_private_dir() {
    let dir = TempDir::new("rundir");
    let rundir = runtime_dir();
    let _ = std::fs::create_dir_all(&rundir);
    // A symlink in its place is refused (it could point anywhere).
    let moved = rundir.with_file_name(format!("{}-moved", rundir.file_name().unwrap().to_string_lossy()));
    std::fs::rename(&rundir, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &rundir).unwrap();
    let run = run_timed(&["start", "--listen", "127.0.0.1:0", "--workers", "1"], dir.path());
    std::fs::remove_file(&rundir).unwrap();
    std::fs::rename(&moved, &rundir).unwrap();
    assert_eq!(run.code, Some(1), "a symlinked runtime dir: {run:?}");
    assert!(run.stderr.contains("not a directory"), "{run:?}");
    // Another user's directory is refused (only root can make one here).
    if euid() == 0 {
        std::os::unix::fs::chown(&rundir, Some(65534), None).unwrap();
        let run = run_timed(&["start", "--listen", "127.0.0.1:0", "--workers", "1"], dir.path());
        std::os::unix::fs::chown(&rundir, Some(0), None).unwrap();
        assert_eq!(run.code, Some(1), "a runtime dir of uid 65534: {run:?}");
        assert!(run.stderr.contains("belongs to uid 65534"), "{run:?}");
    }
    // Ours but open to others: tightened to 0700.
    std::fs::set_permissions(&rundir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut master = spawn_loose_umask(&["start", "--listen", "127.0.0.1:0", "--workers", "1"], dir.path());
    let pid = master.0.id();
    wait_status(&[], dir.path(), pid);
    assert_eq!(mode(&rundir), 0o700, "runtime dir {}", rundir.display());
    assert_eq!(std::fs::metadata(&rundir).unwrap().uid(), euid());
    for name in ["groupcast.ctl.sock", "groupcast.channel.sock"] {
        assert_eq!(mode(&rundir.join(name)), 0o600, "{name} under umask 0");
    }
    let stop = run_timed(&["stop"], dir.path());
    assert_eq!(stop.code, Some(0), "{stop:?}");
    wait_for("the master to exit", TIMEOUT, || master.0.try_wait().unwrap());
    if euid() == 0 {
        root_with_a_service_user_reuses_the_dir_it_handed_over(&dir, &rundir);
    }
}

/// As root with `user`, the master hands the default directory to that user (its children
/// must reach the sockets in it); the next start as root accepts that owner.
fn root_with_a_service_user_reuses_the_dir_it_handed_over(dir: &TempDir, rundir: &Path) {
    let config = dir.join("user.toml");
    std::fs::write(&config, "user = \"nobody\"\nlisten = \"127.0.0.1:0\"\nworkers = 1\n").unwrap();
    // Children are exec'd by `nobody`: start from a copy it can surely read and run.
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let exe = dir.join("bin").join("groupcast");
    install_executable(&binary_bytes(), &exe, None);
    let cfg = config.to_str().unwrap();
    /// Gives the directory back to root however the test ends.
    struct BackToRoot<'a>(&'a Path);
    impl Drop for BackToRoot<'_> {
        fn drop(&mut self) {
            let _ = std::os::unix::fs::chown(self.0, Some(0), Some(0));
        }
    }
    let _back = BackToRoot(rundir);
    for round in 0..2 {
        let mut master = Guard(
            Command::new(&exe)
                .args(["-c", cfg, "start"])
                .stdin(Stdio::null())
                .stderr(File::create(dir.join(&format!("user-{round}.log"))).unwrap())
                .spawn()
                .unwrap(),
        );
        let pid = master.0.id();
        let log = || std::fs::read_to_string(dir.join(&format!("user-{round}.log"))).unwrap_or_default();
        wait_for("the instance to answer status", TIMEOUT, || {
            assert!(
                master.0.try_wait().unwrap().is_none(),
                "start {round} as root with user = nobody failed:\n{}",
                log()
            );
            let run = run_timed(&["-c", cfg, "status", "--json"], dir.path());
            let report: serde_json::Value = serde_json::from_str(&run.stdout).ok()?;
            (report["master_pid"] == pid && report["processes"].as_array()?.iter().all(|p| p["state"] == "running"))
                .then_some(())
        });
        assert_eq!(std::fs::metadata(rundir).unwrap().uid(), 65534, "the dir is handed to nobody");
        assert_eq!(mode(rundir), 0o700);
        let stop = run_timed(&["-c", cfg, "stop"], dir.path());
        assert_eq!(stop.code, Some(0), "{stop:?}");
        wait_for("the master to exit", TIMEOUT, || master.0.try_wait().unwrap());
    }
}

#[test]
fn issue10_sockets_are_0600_in_a_directory_of_the_operators_choice() {
    let dir = TempDir::new("sockmode");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pid_file = dir.join("g.pid");
    let pid_arg = pid_file.to_str().unwrap();
    let master =
        spawn_loose_umask(&["start", "--listen", "127.0.0.1:0", "--workers", "1", "--pid-file", pid_arg], dir.path());
    wait_status(&["--pid-file", pid_arg], dir.path(), master.0.id());
    assert_eq!(mode(&dir.join("g.ctl.sock")), 0o600);
    assert_eq!(mode(&dir.join("g.channel.sock")), 0o600);
    assert_eq!(mode(dir.path()), 0o755, "a directory the operator chose keeps its mode");
}

/// Twenty connections to the control socket that never say a word: `status` still answers
/// (each used to hold the master for 2 s, one after the other, past the CLI's patience).
#[test]
fn issue10_silent_control_clients_do_not_delay_status() {
    let server = Server::start_with(Opts::workers(1));
    let ctl = server.pid_file.with_file_name("g.ctl.sock");
    let silent: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(&ctl).expect("connect")).collect();
    let run = server.cli(&["status", "--json"]);
    assert_eq!(run.code, Some(0), "status with 20 silent control clients: {run:?}");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["master_pid"], server.master_pid);
    drop(silent);
}

#[test]
fn issue10_a_symlinked_pid_file_is_refused() {
    let dir = TempDir::new("pidlink");
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let pid_file = dir.join("g.pid");
    std::os::unix::fs::symlink(&victim, &pid_file).unwrap();
    let run = run_timed(
        &["start", "--listen", "127.0.0.1:0", "--workers", "1", "--pid-file", pid_file.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("symbolic link"), "{run:?}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n", "the link's target is untouched");
}

/// A locked pid file naming `pid`, held by this test (as a live master would hold it).
fn locked_pid_file(path: &Path, pid: u32) -> File {
    std::fs::write(path, format!("{pid}\n")).unwrap();
    let file = File::open(path).unwrap();
    // SAFETY: flock(2) on a descriptor we own.
    assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    file
}

#[test]
fn issue10_stop_refuses_a_pid_that_is_not_a_groupcast_master() {
    let dir = TempDir::new("notmaster");
    let sleeper = Guard(Command::new("sleep").arg("60").spawn().expect("spawn sleep"));
    let pid = sleeper.0.id();
    let pid_file = dir.join("g.pid");
    let _lock = locked_pid_file(&pid_file, pid);
    let run = run_timed(&["stop", "--pid-file", pid_file.to_str().unwrap()], dir.path());
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("not a groupcast master"), "{run:?}");
    assert!(alive(pid), "stop signalled a process that is not a groupcast master");
}

#[test]
fn issue10_stop_refuses_a_pid_file_of_another_user() {
    if euid() != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI: this test needs root (to give a file to another user)");
        eprintln!("note: not root; skipping the pid-file owner test");
        return;
    }
    let dir = TempDir::new("pidowner");
    let sleeper = Guard(Command::new("sleep").arg("60").spawn().expect("spawn sleep"));
    let pid_file = dir.join("g.pid");
    let _lock = locked_pid_file(&pid_file, sleeper.0.id());
    std::os::unix::fs::chown(&pid_file, Some(65534), Some(65534)).unwrap();
    let run = run_timed(&["stop", "--pid-file", pid_file.to_str().unwrap()], dir.path());
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("belongs to uid 65534"), "{run:?}");
    assert!(alive(sleeper.0.id()));
}
