//! Dropping root: after every socket is bound, the master switches to the configured
//! `user`/`group`, so the master and every child it starts run unprivileged.

use std::path::Path;

use anyhow::{bail, Context};
use nix::fcntl::AtFlags;
use nix::unistd::{fchownat, setgid, setgroups, setuid, Gid, Group, Uid, User};

use super::pidfile::PidFile;

/// Switches to `user`/`group` (names from the config). The pid file (through its descriptor)
/// and the `owned` paths (sockets the workers must reach, the private runtime directory) are
/// handed to them first, never following a symbolic link. Nothing to do when neither is set.
pub fn drop_privileges(
    user: Option<&str>,
    group: Option<&str>,
    pidfile: &PidFile,
    owned: &[&Path],
) -> anyhow::Result<()> {
    if user.is_none() && group.is_none() {
        return Ok(());
    }
    if !Uid::effective().is_root() {
        bail!("`user`/`group` are set, but groupcast was not started as root");
    }
    // Config::validate refuses `group` without `user`.
    let Some(name) = user else { bail!("invalid value for `group`: set without `user`") };
    let account = User::from_name(name)?.with_context(|| format!("invalid value for `user`: no user {name:?}"))?;
    let gid = match group {
        Some(name) => {
            Group::from_name(name)?.with_context(|| format!("invalid value for `group`: no group {name:?}"))?.gid
        }
        None => account.gid,
    };
    let uid = account.uid;
    pidfile.chown(Some(uid), Some(gid)).context("cannot hand the pid file to the service user")?;
    for path in owned {
        fchownat(None, *path, Some(uid), Some(gid), AtFlags::AT_SYMLINK_NOFOLLOW)
            .with_context(|| format!("cannot hand {} to the service user", path.display()))?;
    }
    setgroups(&[gid]).context("setgroups failed")?;
    setgid(gid).context("setgid failed")?;
    setuid(uid).context("setuid failed")?;
    log::info!("running as uid {} gid {}", Uid::effective(), Gid::effective());
    Ok(())
}
