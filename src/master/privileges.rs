//! Dropping root: after every socket is bound, the master switches to the configured
//! `user`/`group`, so the master and every child it starts run unprivileged.

use std::path::Path;

use anyhow::{bail, Context};
use nix::unistd::{chown, setgid, setgroups, setuid, Gid, Group, Uid, User};

/// Switches to `user`/`group` (names from the config); `owned` files (sockets the workers must
/// reach, the pid file) are handed to them first. Nothing to do when neither is configured.
pub fn drop_privileges(user: Option<&str>, group: Option<&str>, owned: &[&Path]) -> anyhow::Result<()> {
    if user.is_none() && group.is_none() {
        return Ok(());
    }
    if !Uid::effective().is_root() {
        bail!("`user`/`group` are set, but groupcast was not started as root");
    }
    let account = match user {
        Some(name) => {
            Some(User::from_name(name)?.with_context(|| format!("invalid value for `user`: no user {name:?}"))?)
        }
        None => None,
    };
    let gid = match group {
        Some(name) => {
            Group::from_name(name)?.with_context(|| format!("invalid value for `group`: no group {name:?}"))?.gid
        }
        None => account.as_ref().map_or(Gid::effective(), |u| u.gid),
    };
    let uid = account.as_ref().map(|u| u.uid);
    for path in owned {
        chown(*path, uid, Some(gid)).with_context(|| format!("cannot hand {} to the service user", path.display()))?;
    }
    setgroups(&[gid]).context("setgroups failed")?;
    setgid(gid).context("setgid failed")?;
    if let Some(uid) = uid {
        setuid(uid).context("setuid failed")?;
    }
    log::info!("running as uid {} gid {}", Uid::effective(), Gid::effective());
    Ok(())
}
