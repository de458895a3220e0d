//! The private directory of the default pid file and sockets (`config::runtime_dir()`):
//! created 0700, or, if it exists, accepted only as a real directory owned by us; a mode that
//! lets others in is tightened. Also the umask under which the master binds its Unix sockets,
//! so they are created 0600 wherever they live (chmod after bind would leave a window).

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{umask, Mode};
use nix::unistd::Uid;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("cannot create the runtime directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("runtime directory {path} is not a directory (a symlink or a file is refused)")]
    NotADirectory { path: PathBuf },
    #[error("runtime directory {path} belongs to uid {owner}, not to us (uid {us}); refusing to use it")]
    WrongOwner { path: PathBuf, owner: u32, us: u32 },
    #[error("cannot make the runtime directory {path} private: {source}")]
    Chmod { path: PathBuf, source: io::Error },
}

/// Makes sure `dir` exists, is a directory owned by the effective user (or by `service_user`,
/// the configured `user` a root master hands the directory to, as the last run did), and has
/// mode 0700.
pub fn ensure_private(dir: &Path, service_user: Option<u32>) -> Result<(), RuntimeDirError> {
    let us = Uid::effective().as_raw();
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                // Someone may have made it in between: check it like any existing one.
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(RuntimeDirError::Create { path: dir.to_owned(), source }),
            }
            std::fs::symlink_metadata(dir).map_err(|source| RuntimeDirError::Create { path: dir.to_owned(), source })?
        }
        Err(source) => return Err(RuntimeDirError::Create { path: dir.to_owned(), source }),
    };
    if !meta.file_type().is_dir() {
        return Err(RuntimeDirError::NotADirectory { path: dir.to_owned() });
    }
    if meta.uid() != us && Some(meta.uid()) != service_user {
        return Err(RuntimeDirError::WrongOwner { path: dir.to_owned(), owner: meta.uid(), us });
    }
    if meta.mode() & 0o777 != 0o700 {
        // Ours, but open to others (made by hand, or by an older version): tighten it. It is
        // ours and not a symlink (lstat above), and nobody else can swap it in a sticky /tmp.
        log::warn!("runtime directory {} had mode {:o}; setting 0700", dir.display(), meta.mode() & 0o777);
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| RuntimeDirError::Chmod { path: dir.to_owned(), source })?;
    }
    Ok(())
}

/// Runs `bind` with umask 0177, so the socket files it creates are 0600. The master is
/// single-threaded here, so the process-wide umask changes for nobody else.
pub fn with_private_umask<T>(bind: impl FnOnce() -> T) -> T {
    let old = umask(Mode::from_bits_truncate(0o177));
    let result = bind();
    umask(old);
    result
}
