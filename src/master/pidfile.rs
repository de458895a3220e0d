//! The pid file: created and `flock`ed by the master for its whole life, so a second `start`
//! of the same instance refuses, and `stop`/`status` can tell a live instance from a stale file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("groupcast is already running (pid {pid}, pid file {path})")]
    AlreadyRunning { pid: String, path: PathBuf },
    #[error("cannot open pid file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot lock pid file {path}: {source}")]
    Lock { path: PathBuf, source: nix::Error },
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| PidFileError::Open { path: path.to_owned(), source })?;
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

    /// Removes the file while still holding the lock. The lock is deliberately not released
    /// here: it goes with the process, so `stop` (which waits for the lock) returns only once
    /// the master has really exited.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        std::mem::forget(self.lock);
    }
}

/// The pid of the instance holding `path`'s lock, or `None` if nothing runs there.
pub fn running_pid(path: &Path) -> io::Result<Option<u32>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // We got the lock: nobody holds it, the file is stale. Dropping releases it.
        Ok(_) => Ok(None),
        Err((_, nix::Error::EWOULDBLOCK)) => Ok(text.trim().parse().ok().or(Some(0))),
        Err((_, e)) => Err(io::Error::from(e)),
    }
}
