//! Server process-tree sampling from /proc: CPU (utime+stime) and memory (PSS).

use std::collections::HashMap;
use std::fs;

/// All live pids in the tree rooted at `root` (root included).
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|s| s.parse().ok())) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids);
        }
        i += 1;
    }
    out
}

/// Fields of /proc/PID/stat after the command name: index 0 is state, 1 ppid, 11 utime, 12 stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime+stime of every process in the tree, microseconds.
pub fn tree_cpu_us(root: u32) -> u64 {
    let ticks: u64 = tree(root)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            let get = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            get(11) + get(12)
        })
        .sum();
    ticks * 1_000_000 / clock_ticks()
}

/// PSS of every process in the tree, bytes (from smaps_rollup).
pub fn tree_pss_bytes(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|text| {
            text.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .sum::<u64>()
        * 1024
}

/// Optional server handle: every method returns None when no pid was given.
#[derive(Clone, Copy, Debug)]
pub struct Server(pub Option<u32>);

impl Server {
    pub fn cpu_us(&self) -> Option<u64> {
        self.0.map(tree_cpu_us)
    }
    pub fn pss_bytes(&self) -> Option<u64> {
        self.0.map(tree_pss_bytes)
    }
    pub fn cpu_by_role(&self) -> Option<RoleCpu> {
        self.0.map(tree_cpu_by_role)
    }
}

/// CPU (utime+stime, microseconds) of a groupcast instance split by process role, read from
/// each process's command line: the root is the master; children run `groupcast worker`,
/// `channel-child` or `api-child`. Anything else (a child we do not know) counts as `other`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoleCpu {
    pub master: u64,
    pub channel: u64,
    pub workers: u64,
    pub api: u64,
    pub other: u64,
}

impl RoleCpu {
    pub fn total(&self) -> u64 {
        self.master + self.channel + self.workers + self.api + self.other
    }

    /// What was spent between `earlier` and `self`.
    pub fn since(&self, earlier: &RoleCpu) -> RoleCpu {
        RoleCpu {
            master: self.master.saturating_sub(earlier.master),
            channel: self.channel.saturating_sub(earlier.channel),
            workers: self.workers.saturating_sub(earlier.workers),
            api: self.api.saturating_sub(earlier.api),
            other: self.other.saturating_sub(earlier.other),
        }
    }
}

/// The instance rooted at `root`, by role (see RoleCpu).
pub fn tree_cpu_by_role(root: u32) -> RoleCpu {
    let ticks = clock_ticks();
    let mut out = RoleCpu::default();
    for pid in tree(root) {
        let Some(f) = stat_fields(pid) else { continue };
        let get = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let us = (get(11) + get(12)) * 1_000_000 / ticks;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).skip(1).collect();
        let has = |word: &[u8]| args.contains(&word);
        let slot = if pid == root {
            &mut out.master
        } else if has(b"api-child") {
            &mut out.api
        } else if has(b"channel-child") {
            &mut out.channel
        } else if has(b"worker") {
            &mut out.workers
        } else {
            &mut out.other
        };
        *slot += us;
    }
    out
}
