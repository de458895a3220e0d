//! Connections per client address, counted across every worker (`limits.max_connections_per_ip`).
//!
//! Each worker accepts on its own listener, and the kernel spreads one address's connections
//! over all of them, so no worker alone can tell how many an address holds. The count lives in
//! one shared-memory table the master creates and hands to each worker:
//!
//! - **Columns.** Every live worker writes only its own column, so when a worker dies however
//!   it dies (SIGKILL included) the master zeroes that column and its connections stop counting.
//!   Columns are leased by the master (`Columns`), three per configured worker so the workers
//!   of a reload and the ones still draining normally each have their own. Should more be
//!   alive at once, two share a column: counting stays exact (every update is an atomic add or
//!   subtract), and the column is zeroed only when the last of its workers is reaped.
//! - **Rows.** An address is hashed (SipHash with a random key per instance, so nobody can aim
//!   collisions) into one bucket in each of two rows; its count is the smaller of the two
//!   bucket sums (a count-min sketch). Collisions only ever add, so the cap is never exceeded;
//!   an address is refused early only if both of its buckets collide with busy addresses.
//! - **Addresses.** IPv4 counts per address (IPv4-mapped IPv6 too); IPv6 counts per /64, the
//!   block one host or home normally gets, so the cap cannot be dodged by changing the low bits.

use std::cell::RefCell;
use std::hash::Hasher;
use std::io;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};

use siphasher::sip::SipHasher13;

use crate::sys::SharedWords;

/// Buckets per row; a power of two (the hash is split into 16-bit bucket numbers).
const BUCKETS: usize = 1 << 16;
const ROWS: usize = 2;
/// Header words: magic, column count, then the 128-bit hash key.
const HEADER: usize = 8;
const MAGIC: u32 = 0x6763_6970;

/// Columns leased per configured worker: the workers, their reload replacements, and a margin
/// for workers that are still draining while another reload starts.
pub const COLUMNS_PER_WORKER: usize = 3;

/// The shared table, as mapped by the master or by one worker.
pub struct PerIpTable {
    shared: SharedWords,
    columns: usize,
    key: (u64, u64),
}

impl PerIpTable {
    /// Creates a zeroed table with `columns` columns and a fresh random hash key; returns the
    /// descriptor the children inherit.
    pub fn create(columns: usize) -> io::Result<(OwnedFd, PerIpTable)> {
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).map_err(|e| io::Error::other(format!("no randomness for the per-IP table: {e}")))?;
        let (fd, shared) = SharedWords::create(HEADER + columns * ROWS * BUCKETS)?;
        let words = shared.words();
        words[0].store(MAGIC, Ordering::Relaxed);
        words[1].store(columns as u32, Ordering::Relaxed);
        for (i, chunk) in key.chunks(4).enumerate() {
            let word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            words[2 + i].store(word, Ordering::Relaxed);
        }
        let table = PerIpTable::from_shared(shared)?;
        Ok((fd, table))
    }

    /// Maps the table the master created (a worker's side).
    pub fn adopt(fd: &OwnedFd) -> io::Result<PerIpTable> {
        PerIpTable::from_shared(SharedWords::map(fd)?)
    }

    fn from_shared(shared: SharedWords) -> io::Result<PerIpTable> {
        let words = shared.words();
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("per-IP table: {what}"));
        if words.len() < HEADER || words[0].load(Ordering::Relaxed) != MAGIC {
            return Err(bad("not a groupcast per-IP table".into()));
        }
        let columns = words[1].load(Ordering::Relaxed) as usize;
        if words.len() != HEADER + columns * ROWS * BUCKETS {
            return Err(bad(format!("{} words for {columns} columns", words.len())));
        }
        let word = |i: usize| u64::from(words[i].load(Ordering::Relaxed));
        let key = (word(2) | word(3) << 32, word(4) | word(5) << 32);
        Ok(PerIpTable { shared, columns, key })
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Index of `ip`'s bucket in each row (relative to a column's start).
    fn buckets(&self, ip: IpAddr) -> [usize; ROWS] {
        let mut hasher = SipHasher13::new_with_keys(self.key.0, self.key.1);
        match canonical(ip) {
            IpAddr::V4(v4) => hasher.write(&v4.octets()),
            IpAddr::V6(v6) => hasher.write(&v6.octets()[..8]),
        }
        let hash = hasher.finish();
        std::array::from_fn(|row| row * BUCKETS + ((hash >> (16 * row)) as usize & (BUCKETS - 1)))
    }

    fn column(&self, column: usize) -> &[AtomicU32] {
        let start = HEADER + column * ROWS * BUCKETS;
        &self.shared.words()[start..start + ROWS * BUCKETS]
    }

    /// Connections `ip` holds on every worker (never fewer than the truth; see the module doc).
    pub fn count(&self, ip: IpAddr) -> u64 {
        let buckets = self.buckets(ip);
        buckets
            .iter()
            .map(|&b| (0..self.columns).map(|c| u64::from(self.column(c)[b].load(Ordering::Relaxed))).sum::<u64>())
            .min()
            .unwrap_or(0)
    }

    /// Forgets every connection counted in `column` (its worker is gone).
    pub fn zero_column(&self, column: usize) {
        for cell in self.column(column) {
            cell.store(0, Ordering::Relaxed);
        }
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 client they stand for.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One worker's side: the table and the column it writes.
pub struct PerIpCounter {
    table: PerIpTable,
    column: usize,
}

impl PerIpCounter {
    pub fn new(table: PerIpTable, column: usize) -> io::Result<PerIpCounter> {
        if column >= table.columns() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("per-IP column {column} of {}", table.columns()),
            ));
        }
        Ok(PerIpCounter { table, column })
    }

    /// Counts a new connection from `ip`, unless `ip` already holds `max`: then it is not
    /// counted and the answer is false. Two workers admitting the same address at once may both
    /// refuse (each sees the other's increment), never both exceed.
    pub fn admit(&self, ip: IpAddr, max: u64) -> bool {
        let mine = self.table.column(self.column);
        let buckets = self.table.buckets(ip);
        for &b in &buckets {
            mine[b].fetch_add(1, Ordering::SeqCst);
        }
        if self.table.count(ip) <= max {
            return true;
        }
        self.release(ip);
        false
    }

    /// A connection admitted from `ip` is gone.
    pub fn release(&self, ip: IpAddr) {
        let mine = self.table.column(self.column);
        for b in self.table.buckets(ip) {
            // Never below zero: a wrapped counter would refuse every address in its bucket.
            let _ = mine[b].fetch_update(Ordering::SeqCst, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }
}

/// The master's side: the table and which columns live workers hold.
pub struct Columns {
    table: PerIpTable,
    /// Workers holding each column (more than one only if every column is taken).
    users: RefCell<Vec<u32>>,
}

/// A worker's claim on a column, held by the master with the worker's process; dropping it
/// (the process was reaped) frees the column, zeroed, for the next worker.
pub struct ColumnLease {
    owner: Rc<Columns>,
    pub column: usize,
}

impl Columns {
    pub fn new(table: PerIpTable) -> Rc<Columns> {
        let users = RefCell::new(vec![0; table.columns()]);
        Rc::new(Columns { table, users })
    }

    /// The least used column (a free one while any is free).
    pub fn lease(self: &Rc<Self>) -> ColumnLease {
        let mut users = self.users.borrow_mut();
        let column = (0..users.len()).min_by_key(|&c| users[c]).unwrap_or(0);
        users[column] += 1;
        ColumnLease { owner: Rc::clone(self), column }
    }
}

impl Drop for ColumnLease {
    fn drop(&mut self) {
        let mut users = self.owner.users.borrow_mut();
        if let Some(n) = users.get_mut(self.column) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.owner.table.zero_column(self.column);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(columns: usize) -> (OwnedFd, PerIpTable) {
        PerIpTable::create(columns).expect("memfd")
    }

    #[test]
    fn counts_across_columns_and_caps_at_max() {
        let (fd, master) = table(3);
        let a = PerIpCounter::new(PerIpTable::adopt(&fd).unwrap(), 0).unwrap();
        let b = PerIpCounter::new(PerIpTable::adopt(&fd).unwrap(), 1).unwrap();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(a.admit(ip, 3) && b.admit(ip, 3) && a.admit(ip, 3));
        assert!(!b.admit(ip, 3), "the fourth is refused whichever worker sees it");
        assert_eq!(master.count(ip), 3, "a refusal is not counted");
        b.release(ip);
        assert!(a.admit(ip, 3), "a freed place can be taken again");
        assert_eq!(master.count("192.0.2.8".parse().unwrap()), 0, "other addresses are not affected");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let (fd, _master) = table(1);
        let w = PerIpCounter::new(PerIpTable::adopt(&fd).unwrap(), 0).unwrap();
        assert!(w.admit("2001:db8:1:2::1".parse().unwrap(), 1));
        assert!(!w.admit("2001:db8:1:2:ffff::9".parse().unwrap(), 1), "same /64");
        assert!(w.admit("2001:db8:1:3::1".parse().unwrap(), 1), "another /64");
        assert!(w.admit("198.51.100.1".parse().unwrap(), 1));
        assert!(!w.admit("::ffff:198.51.100.1".parse().unwrap(), 1), "mapped IPv4 is the same client");
    }

    #[test]
    fn a_dead_workers_column_is_zeroed_when_its_lease_drops() {
        let (fd, master) = table(2);
        let columns = Columns::new(master);
        let lease = columns.lease();
        let other = columns.lease();
        assert_ne!(lease.column, other.column, "free columns are handed out first");
        let w = PerIpCounter::new(PerIpTable::adopt(&fd).unwrap(), lease.column).unwrap();
        let ip: IpAddr = "203.0.113.5".parse().unwrap();
        assert!(w.admit(ip, 10) && w.admit(ip, 10));
        assert_eq!(columns.table.count(ip), 2);
        drop(lease);
        assert_eq!(columns.table.count(ip), 0, "the reaped worker's connections no longer count");
    }

    #[test]
    fn release_never_wraps_below_zero() {
        let (fd, master) = table(1);
        let w = PerIpCounter::new(PerIpTable::adopt(&fd).unwrap(), 0).unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        w.release(ip);
        assert_eq!(master.count(ip), 0);
        assert!(w.admit(ip, 1));
    }

    #[test]
    fn a_foreign_region_is_refused() {
        let (fd, _) = SharedWords::create(HEADER + 5).unwrap();
        assert!(PerIpTable::adopt(&fd).is_err());
        let (fd, _t) = table(1);
        assert!(PerIpCounter::new(PerIpTable::adopt(&fd).unwrap(), 1).is_err(), "column out of range");
    }
}
