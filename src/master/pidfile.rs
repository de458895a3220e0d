//! The pid file: created and `flock`ed by the master for its whole life, so a second `start`
//! of the same instance refuses, and `stop`/`status` can tell a live instance from a stale file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("groupcast is already running (pid {pid}, pid file {path})")]
    AlreadyRunning { pid: String, path: PathBuf },
    #[error("cannot open pid file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot lock pid file {path}: {source}")]
    Lock { path: PathBuf, source: nix::Error },
    #[error("pid file {path} is a symbolic link; refusing to follow it")]
    Symlink { path: PathBuf },
}

/// Opens `path` without following a symbolic link at its last component: a link planted
/// where the pid file goes must not make the master truncate or chown another file.
fn open_nofollow(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
    options.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

fn is_symlink_refusal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// A locked pid file. The lock lives as long as any copy of the descriptor (it survives the
/// daemonizing fork) and vanishes with the process, so it can never go stale.
pub struct PidFile {
    path: PathBuf,
    lock: Flock<File>,
}

impl PidFile {
    pub fn acquire(path: &Path) -> Result<PidFile, PidFileError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let file =
            open_nofollow(OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644), path)
                .map_err(|source| match is_symlink_refusal(&source) {
                    true => PidFileError::Symlink { path: path.to_owned() },
                    false => PidFileError::Open { path: path.to_owned(), source },
                })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(PidFile { path: path.to_owned(), lock }),
            Err((mut file, nix::Error::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                Err(PidFileError::AlreadyRunning { pid: pid.trim().to_owned(), path: path.to_owned() })
            }
            Err((_, source)) => Err(PidFileError::Lock { path: path.to_owned(), source }),
        }
    }

    /// Writes this process's pid (after daemonizing, when the pid is final).
    pub fn write_pid(&mut self) -> io::Result<()> {
        self.lock.set_len(0)?;
        self.lock.rewind()?;
        writeln!(&mut *self.lock, "{}", std::process::id())?;
        self.lock.sync_data()
    }

    /// Hands the file to the service user through its descriptor (no path, no symlink).
    pub fn chown(&self, uid: Option<Uid>, gid: Option<Gid>) -> nix::Result<()> {
        nix::unistd::fchown(self.lock.as_fd().as_raw_fd(), uid, gid)
    }

    /// Removes the file while still holding the lock. The lock is deliberately not released
    /// here: it goes with the process, so `stop` (which waits for the lock) returns only once
    /// the master has really exited.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        std::mem::forget(self.lock);
    }
}

/// What a locked pid file says: the pid in it, and who owns the file (so `stop` can check the
/// file was written by someone entitled to name that process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// 0 when the file holds no readable pid.
    pub pid: u32,
    pub file_owner: u32,
}

/// What the pid file at `path` says, if its lock is held; `None` if nothing runs there. A pid
/// file that is a symbolic link is refused.
pub fn running(path: &Path) -> io::Result<Option<Running>> {
    let mut file = match open_nofollow(OpenOptions::new().read(true), path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if is_symlink_refusal(&e) => {
            return Err(io::Error::other(format!("{} is a symbolic link; refusing to follow it", path.display())))
        }
        Err(e) => return Err(e),
    };
    let file_owner = file.metadata()?.uid();
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // We got the lock: nobody holds it, the file is stale. Dropping releases it.
        Ok(_) => Ok(None),
        Err((_, nix::Error::EWOULDBLOCK)) => Ok(Some(Running { pid: text.trim().parse().unwrap_or(0), file_owner })),
        Err((_, e)) => Err(io::Error::from(e)),
    }
}
