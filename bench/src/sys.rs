//! Small wrappers over libc: descriptor limit, CPU time of this process or thread, a shared clock.

use std::sync::OnceLock;
use std::time::Instant;

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

fn rusage_us(who: libc::c_int) -> u64 {
    // SAFETY: getrusage fills the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system CPU of this whole process (all threads), microseconds.
pub fn self_cpu_us() -> u64 {
    rusage_us(libc::RUSAGE_SELF)
}

/// User + system CPU of the calling thread, microseconds.
pub fn thread_cpu_us() -> u64 {
    rusage_us(libc::RUSAGE_THREAD)
}

/// Monotonic nanoseconds since the first call in this process; publishers and
/// receivers live in the same process, so send and receive stamps compare directly.
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Cores online on this machine (not this process's affinity: a loader pinned to one core
/// still shares a machine of several).
pub fn online_cpus() -> u64 {
    // SAFETY: sysconf reads a system constant; no memory is handed over.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as u64
    } else {
        1
    }
}
