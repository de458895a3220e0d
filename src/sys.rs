//! The only `unsafe` in groupcast: adopting inherited and received descriptors, preparing a child between
//! fork and exec, and mapping the one shared-memory region the workers count in
//! (`SharedWords`). Everything else goes through safe std/nix/mio calls.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Lowest descriptor used for the temporary copies made before a spawn, so they never collide
/// with the small target numbers (3, 4, ...) a child expects its inheritance at.
const HIGH_FD: RawFd = 64;

/// Takes ownership of descriptor `fd`, which the master passed down across exec.
///
/// Fails instead of adopting a number that is not open, so a child started by hand (without
/// the master) gets an error rather than closing someone else's descriptor later.
pub fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // F_GETFD only reads flags; it fails with EBADF if `fd` is not open.
    if fcntl(fd, FcntlArg::F_GETFD).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("descriptor {fd} was not inherited (is this process started by the master?)"),
        ));
    }
    // SAFETY: the descriptor is open (checked above) and, by the master/child contract, handed
    // to this process for it alone; nothing else in this process owns or closes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Keep it from leaking into anything this process might exec later.
    fcntl(owned.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(owned)
}

/// Takes ownership of descriptors that arrived in an SCM_RIGHTS message (recvmsg just
/// installed them in this process), so they close when dropped.
pub fn own_received_fds(fds: Vec<RawFd>) -> Vec<OwnedFd> {
    fds.into_iter()
        // SAFETY: the kernel created these descriptors in this process for the message just
        // received; nothing else knows their numbers, so each gets exactly one owner here.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Spawns `command` (fork + exec) with each `(fd, target)` of `fds` available in the child as
/// descriptor number `target`, and with the child asked to receive SIGTERM if the master dies,
/// so no worker outlives its supervisor.
pub fn spawn_with_fds(command: &mut Command, fds: &[(BorrowedFd<'_>, RawFd)]) -> io::Result<Child> {
    // Copies at high numbers, close-on-exec, so dup2 in the child never clobbers a source that
    // is itself a target of another pair. They close when `copies` drops after the spawn.
    let mut copies: Vec<(OwnedFd, RawFd)> = Vec::with_capacity(fds.len());
    for (fd, target) in fds {
        let high = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD))?;
        // SAFETY: fcntl just returned this new descriptor; we are its only owner.
        copies.push((unsafe { OwnedFd::from_raw_fd(high) }, *target));
    }
    let pairs: Vec<(RawFd, RawFd)> = copies.iter().map(|(fd, t)| (fd.as_fd().as_raw_fd(), *t)).collect();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: dup2, prctl, getppid and _exit are, and the closure allocates nothing
    // (`pairs` was built before the fork). The master is single-threaded, so no lock can be
    // held by a vanished thread.
    unsafe {
        command.pre_exec(move || {
            for &(src, target) in &pairs {
                // dup2 gives `target` a copy without FD_CLOEXEC: exactly the inheritance we want.
                if libc::dup2(src, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                return Err(io::Error::last_os_error());
            }
            // The master may have died before prctl took effect; then nobody would tell us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = command.spawn();
    drop(copies);
    child
}

/// Raises the soft open-file limit to the hard one (one descriptor per connection); returns
/// the soft limit now in force, so the caller can say whether its own bounds fit under it.
pub fn raise_open_file_limit() -> nix::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// An array of 32-bit atomic counters in memory shared by every process that maps it: a memfd
/// the master creates and hands to its children like a listener. Used for the per-IP
/// connection counts (`per_ip.rs`), which all workers must see at once.
pub struct SharedWords {
    ptr: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
}

impl SharedWords {
    /// Creates a zeroed region of `words` counters; returns the descriptor to hand down.
    pub fn create(words: usize) -> io::Result<(OwnedFd, SharedWords)> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"groupcast-shared", MemFdCreateFlag::MFD_CLOEXEC)?;
        let bytes = words.checked_mul(4).ok_or_else(|| io::Error::other("shared region too large"))?;
        nix::unistd::ftruncate(&fd, bytes as libc::off_t)?;
        let map = SharedWords::map(&fd)?;
        Ok((fd, map))
    }

    /// Maps the whole region behind `fd` (created by `create`, possibly in another process).
    pub fn map(fd: &OwnedFd) -> io::Result<SharedWords> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let bytes = nix::sys::stat::fstat(fd.as_raw_fd())?.st_size as usize;
        let length = std::num::NonZeroUsize::new(bytes)
            .filter(|_| bytes.is_multiple_of(4))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("shared region of {bytes} bytes")))?;
        // SAFETY: a fresh shared mapping of a file we hold open; it aliases no Rust object.
        // Other processes write it concurrently, which is why it is only ever accessed as
        // atomics (`words`).
        let ptr =
            unsafe { mmap(None, length, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, fd, 0)? };
        Ok(SharedWords { ptr, len: bytes / 4 })
    }

    pub fn words(&self) -> &[std::sync::atomic::AtomicU32] {
        // SAFETY: the mapping is page-aligned, `len * 4` bytes long, lives until `self` drops
        // (the borrow cannot outlive it), and `AtomicU32` has the size and alignment of `u32`;
        // all access, ours and other processes', is atomic.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; no borrow of `words` outlives self.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len * 4) };
    }
}

/// One `recvmsg` on a unix socket with room for `max_fds` descriptors (`SCM_RIGHTS`, received
/// close-on-exec): returns the bytes read into `buf`, the message flags (`MSG_TRUNC`,
/// `MSG_CTRUNC`: the caller decides) and the descriptors that arrived, owned — also when the
/// control data was cut short, so none leaks (nix refuses to walk a truncated control buffer).
pub fn recv_with_fds(fd: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, i32, Vec<OwnedFd>)> {
    const FD_SIZE: usize = std::mem::size_of::<RawFd>();
    let wanted = u32::try_from(max_fds * FD_SIZE).map_err(|_| io::Error::other("too many descriptors"))?;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(wanted) } as usize;
    // u64 words: the control buffer must be aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `buf` and `control`, both alive and writable for the lengths given.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // The kernel shrank msg_controllen to what it wrote; never trust more than we allocated.
    let used = (msg.msg_controllen as usize).min(space);
    let base = control.as_ptr() as usize;
    let mut fds = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk `control` within msg_controllen and return null
    // at its end; each header they return lies inside the buffer (aligned, u64 words).
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a non-null header inside `control` (see above).
        let (level, kind, len, data) =
            unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len as usize, libc::CMSG_DATA(c)) };
        let header = data as usize - c as usize;
        let end = (c as usize - base).saturating_add(len).min(used);
        let data_len = end.saturating_sub(data as usize - base);
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS && len >= header {
            for i in 0..data_len / FD_SIZE {
                // SAFETY: the i-th descriptor lies inside the data of this header, within the
                // bytes the kernel wrote; read_unaligned because CMSG_DATA promises no alignment.
                let raw = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                // SAFETY: recvmsg has just installed this descriptor in our table for this
                // message alone; nothing else knows its number, so it gets exactly one owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR; `c` came from it or from a previous CMSG_NXTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok((n as usize, msg.msg_flags, fds))
}
