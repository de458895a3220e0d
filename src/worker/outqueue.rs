//! A connection's outgoing bytes: a queue of whole frames, shared ones (a group message encoded
//! once per worker, referenced by every member) and owned ones (replies, close frames).
//! Flushed with one vectored write per loop turn, so a busy connection gets many frames per
//! syscall.
//!
//! Every queued byte counts in `bytes()`, whatever the frame, so the worker can hold each
//! connection to `limits.send_buffer_limit`. The drop policy replaces dropped group messages
//! in place with `Chunk::Dropped` and remembers where it stopped (`scan`), so queued replies
//! are passed over once, not on every delivery; tombstones are swept out once they are half
//! the queue.
//!
//! A queue holding one frame keeps it inline (`slots::Slots`): an idle connection that got
//! a reply now and then costs no allocation here (docs/benchmarks.md, S8).

#[cfg(test)]
mod model_tests;
mod slots;

use std::io::{self, IoSlice, Write};
use std::ops::Deref;
use std::rc::Rc;

/// Most frames handed to one vectored write.
const MAX_IOV: usize = 64;
/// A drained queue keeps at most this many slots, so a burst does not pin memory forever.
const KEEP_SLOTS: usize = 16;

/// Tombstones tolerated before a sweep, whatever the queue length.
const MIN_SWEEP: usize = 32;

pub enum Chunk {
    Shared(Rc<[u8]>),
    Owned(Box<[u8]>),
    /// A group message dropped by the drop policy: writes nothing.
    Dropped,
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Shared(b) => b,
            Chunk::Owned(b) => b,
            Chunk::Dropped => &[],
        }
    }
}

#[derive(Default)]
pub struct OutQueue {
    /// The frames, oldest first; one is held inline, a deque exists only past one.
    chunks: slots::Slots,
    /// Bytes of the front chunk already written.
    offset: usize,
    /// Unwritten bytes in the queue.
    bytes: usize,
    /// Bytes written over the connection's life.
    written: u64,
    /// Index from which unsent group messages may be found: every chunk before it (past a
    /// partly written front) is a reply, a close frame or a tombstone.
    /// A frame count, so `u32` (4 G frames would not fit in memory): with `tombstones`, this
    /// keeps `OutQueue`, held by every connection, 8 bytes smaller.
    scan: u32,
    /// `Chunk::Dropped` entries in `chunks`.
    tombstones: u32,
    /// Worker clock (µs, `Clients::turn_us`) of the loop turn whose flush first found this
    /// queue non-empty since it was last empty; 0 while empty. Stamped by the flush, not by
    /// `push`: queueing a frame costs no clock read (see `write_observed`).
    since_us: u64,
}

/// How a flush ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    All,
    /// The socket is full; the rest waits for the next writable event.
    Blocked,
}

impl OutQueue {
    pub fn push(&mut self, chunk: Chunk) {
        self.bytes += chunk.len();
        self.chunks.push_back(chunk);
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn total_written(&self) -> u64 {
        self.written
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Drops every frame not yet started, keeping a partly written one so the stream stays
    /// well-formed (used before queueing a close frame for a client that fell behind).
    pub fn discard_unsent(&mut self) {
        let keep = usize::from(self.offset > 0);
        self.chunks.truncate(keep);
        self.bytes = self.chunks.front().map_or(0, |c| c.len() - self.offset);
        self.scan = keep as u32;
        self.tombstones = 0;
        if self.chunks.is_empty() {
            self.since_us = 0;
        }
    }

    /// Drops the oldest group messages not yet started until at most `limit` bytes are
    /// queued; replies and close frames stay. Returns how many messages were dropped.
    /// Amortised O(1) per queued frame: chunks before `scan` are never looked at again.
    pub fn drop_oldest_shared(&mut self, limit: usize) -> usize {
        let mut dropped = 0;
        // A partly written front frame must finish, or the stream would be corrupt.
        let mut at = (self.scan as usize).max(usize::from(self.offset > 0));
        while self.bytes > limit {
            let Some(slot) = self.chunks.get_mut(at) else { break };
            if matches!(slot, Chunk::Shared(_)) {
                let chunk = std::mem::replace(slot, Chunk::Dropped);
                self.bytes -= chunk.len();
                self.tombstones += 1;
                dropped += 1;
            }
            at += 1;
        }
        self.scan = at as u32;
        let tombstones = self.tombstones as usize;
        if tombstones > MIN_SWEEP && tombstones * 2 > self.chunks.len() {
            self.chunks.retain(|c| !matches!(c, Chunk::Dropped));
            self.tombstones = 0;
            // Positions moved: look again from the front (paid for by the drops above).
            self.scan = 0;
        }
        dropped
    }

    /// Every byte not yet written, in order (the first may be inside a frame): what a live
    /// hand-off moves to the next worker (worker/handoff).
    pub fn unsent(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.bytes);
        for (i, chunk) in self.chunks.iter().enumerate() {
            let start = if i == 0 { self.offset } else { 0 };
            bytes.extend_from_slice(&chunk[start.min(chunk.len())..]);
        }
        bytes
    }

    /// A queue holding `unsent` (handed over from another worker) and counting `written` bytes
    /// written before. The bytes form one owned chunk: the drop policy never cuts into them
    /// (they may end inside a frame).
    pub fn resume(unsent: Vec<u8>, written: u64) -> OutQueue {
        let mut queue = OutQueue { written, ..OutQueue::default() };
        if !unsent.is_empty() {
            queue.push(Chunk::Owned(unsent.into_boxed_slice()));
            // Nothing before it may be dropped.
            queue.scan = 1;
        }
        queue
    }

    pub fn write_to(&mut self, out: &mut impl Write) -> io::Result<Flushed> {
        self.write_observed(out, 0, |_, _| {})
    }

    /// `write_to`, telling `on_write(since_us, queued)` about each write that took bytes:
    /// `since_us` is the turn stamp of this queue's backlog, `queued` the bytes queued just
    /// before the write. `turn_us` (worker clock of the current loop turn, never 0) stamps
    /// a queue found non-empty and unstamped: every frame is flushed at the end of the turn
    /// that queued it, so that turn is the one its message entered the worker. The stamp
    /// holds until the queue drains: a write after a partial one reports the age of the
    /// oldest frame still queued, an upper bound for the frames it carries.
    pub fn write_observed(
        &mut self,
        out: &mut impl Write,
        turn_us: u64,
        mut on_write: impl FnMut(u64, usize),
    ) -> io::Result<Flushed> {
        if self.since_us == 0 && !self.chunks.is_empty() {
            self.since_us = turn_us;
        }
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (i, chunk) in self.chunks.iter().enumerate() {
                let start = if i == 0 { self.offset } else { 0 };
                if chunk.len() == start {
                    // A tombstone: nothing to write, no iovec spent on it.
                    continue;
                }
                slices[n] = IoSlice::new(&chunk[start..]);
                n += 1;
                if n == MAX_IOV {
                    break;
                }
            }
            if n == 0 {
                // Only tombstones left.
                self.chunks.clear();
                self.offset = 0;
                self.scan = 0;
                self.tombstones = 0;
                break;
            }
            let queued = self.bytes;
            match out.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    on_write(self.since_us, queued);
                    self.advance(written);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.chunks.release_if_over(KEEP_SLOTS);
        self.since_us = 0;
        Ok(Flushed::All)
    }

    /// Frame slots allocated on the heap (0 while at most one frame was queued at a time).
    #[cfg(test)]
    pub(crate) fn heap_slots(&self) -> usize {
        self.chunks.heap_slots()
    }

    fn advance(&mut self, mut written: usize) {
        self.bytes -= written;
        self.written += written as u64;
        while let Some(front) = self.chunks.front() {
            let left = front.len() - self.offset;
            if written < left {
                self.offset += written;
                return;
            }
            written -= left;
            self.offset = 0;
            if matches!(self.chunks.pop_front(), Some(Chunk::Dropped)) {
                self.tombstones -= 1;
            }
            self.scan = self.scan.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts at most `limit` bytes per call, then WouldBlock once it has `cap` in total.
    struct Trickle {
        got: Vec<u8>,
        limit: usize,
        cap: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.got.len() >= self.cap {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.limit).min(self.cap - self.got.len());
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn dropping_keeps_replies_and_the_frame_in_flight() {
        let msg: Rc<[u8]> = Rc::from(&b"0123456789"[..]);
        let mut q = OutQueue::default();
        for _ in 0..3 {
            q.push(Chunk::Shared(msg.clone()));
        }
        q.push(Chunk::Owned(b"reply".to_vec().into_boxed_slice()));
        q.push(Chunk::Shared(msg.clone()));
        let mut sink = Trickle { got: Vec::new(), limit: 4, cap: 4 };
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::Blocked);
        assert_eq!(q.drop_oldest_shared(10), 3, "two whole messages after the partial one, then one more");
        sink.cap = 100;
        q.write_to(&mut sink).unwrap();
        assert_eq!(sink.got, b"0123456789reply");
    }

    #[test]
    fn dropping_passes_over_replies_once() {
        let msg: Rc<[u8]> = Rc::from(&b"0123456789"[..]);
        let mut q = OutQueue::default();
        for _ in 0..1000 {
            q.push(Chunk::Owned(b"reply".to_vec().into_boxed_slice()));
        }
        let mut dropped = 0;
        for _ in 0..1500 {
            q.push(Chunk::Shared(msg.clone()));
            dropped += q.drop_oldest_shared(5000);
            // Every reply was passed over by the first drop: later ones start past them.
            assert!(q.scan >= 1000 || q.tombstones == 0, "scan {} tombstones {}", q.scan, q.tombstones);
        }
        assert_eq!(dropped, 1500, "replies alone fill the bound: every message goes");
        assert_eq!(q.bytes(), 5000);
        assert!(q.chunks.len() < 1000 + 1500, "tombstones are swept: {}", q.chunks.len());
        let mut sink = Trickle { got: Vec::new(), limit: usize::MAX, cap: usize::MAX };
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::All);
        assert_eq!(sink.got, b"reply".repeat(1000));
        assert!(q.is_empty());
    }

    #[test]
    fn tombstones_write_nothing_and_partial_writes_cross_them() {
        let a: Rc<[u8]> = Rc::from(&b"aaaa"[..]);
        let b: Rc<[u8]> = Rc::from(&b"bbbb"[..]);
        let mut q = OutQueue::default();
        q.push(Chunk::Shared(a.clone()));
        q.push(Chunk::Owned(b"r1".to_vec().into_boxed_slice()));
        q.push(Chunk::Shared(b.clone()));
        q.push(Chunk::Shared(a.clone()));
        q.push(Chunk::Owned(b"r2".to_vec().into_boxed_slice()));
        q.push(Chunk::Shared(b));
        // 16 + 4 queued: keep 12, so the first two messages go (one before, one after r1).
        assert_eq!(q.drop_oldest_shared(12), 2);
        assert_eq!(q.bytes(), 12);
        let mut sink = Trickle { got: Vec::new(), limit: 3, cap: 5 };
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::Blocked);
        // The front is partly written now: it is kept, the next message may go.
        assert_eq!(q.drop_oldest_shared(0), 1);
        sink.cap = 100;
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::All);
        assert_eq!(sink.got, b"r1aaaar2");
        assert!(q.is_empty() && q.bytes() == 0);
        // Only tombstones left also counts as drained.
        q.push(Chunk::Shared(a.clone()));
        q.push(Chunk::Shared(a));
        assert_eq!(q.drop_oldest_shared(0), 2);
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::All);
        assert!(q.is_empty());
    }

    #[test]
    fn unsent_bytes_move_whole_and_resume_in_order() {
        let shared: Rc<[u8]> = Rc::from(&b"abcdef"[..]);
        let mut q = OutQueue::default();
        q.push(Chunk::Shared(shared.clone()));
        q.push(Chunk::Owned(b"XYZ".to_vec().into_boxed_slice()));
        q.push(Chunk::Shared(shared.clone()));
        q.drop_oldest_shared(100);
        let mut sink = Trickle { got: Vec::new(), limit: 4, cap: 4 };
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::Blocked);
        assert_eq!(q.unsent(), b"efXYZabcdef", "from inside the first frame on");
        let mut moved = OutQueue::resume(q.unsent(), q.total_written());
        assert_eq!((moved.bytes(), moved.total_written()), (11, 4));
        moved.push(Chunk::Shared(shared));
        assert_eq!(moved.drop_oldest_shared(0), 1, "only what came after the move may be dropped");
        sink.cap = 100;
        assert_eq!(moved.write_to(&mut sink).unwrap(), Flushed::All);
        assert_eq!(sink.got, b"abcdefXYZabcdef");
    }

    #[test]
    fn writes_report_the_backlog_stamp_until_the_queue_drains() {
        let mut q = OutQueue::default();
        let mut seen = Vec::new();
        let mut sink = Trickle { got: Vec::new(), limit: 4, cap: 6 };
        q.push(Chunk::Owned(b"abcdef".to_vec().into_boxed_slice()));
        q.push(Chunk::Owned(b"gh".to_vec().into_boxed_slice()));
        // Turn 10: two writes (4 + 2 bytes), then the socket is full.
        assert_eq!(
            q.write_observed(&mut sink, 10, |since, queued| seen.push((since, queued))).unwrap(),
            Flushed::Blocked
        );
        // Turn 20: the backlog keeps its stamp of turn 10.
        sink.cap = 100;
        assert_eq!(q.write_observed(&mut sink, 20, |since, queued| seen.push((since, queued))).unwrap(), Flushed::All);
        // Turn 30: drained, so a new frame is stamped anew.
        q.push(Chunk::Owned(b"ij".to_vec().into_boxed_slice()));
        q.write_observed(&mut sink, 30, |since, queued| seen.push((since, queued))).unwrap();
        // An empty flush reports nothing.
        q.write_observed(&mut sink, 40, |since, queued| seen.push((since, queued))).unwrap();
        assert_eq!(seen, vec![(10, 8), (10, 4), (10, 2), (30, 2)]);
        assert_eq!(sink.got, b"abcdefghij");
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let shared: Rc<[u8]> = Rc::from(&b"abcdef"[..]);
        let mut q = OutQueue::default();
        q.push(Chunk::Shared(shared.clone()));
        q.push(Chunk::Owned(b"XYZ".to_vec().into_boxed_slice()));
        q.push(Chunk::Shared(shared));
        let mut sink = Trickle { got: Vec::new(), limit: 4, cap: 7 };
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::Blocked);
        assert_eq!(q.bytes(), 8);
        q.discard_unsent();
        assert_eq!(q.bytes(), 2, "the partly written frame stays");
        sink.cap = 100;
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::All);
        assert_eq!(sink.got, b"abcdefXYZ");
    }

    #[test]
    fn one_frame_at_a_time_never_allocates_slots() {
        let msg: Rc<[u8]> = Rc::from(&b"message"[..]);
        let mut q = OutQueue::default();
        let mut sink = Trickle { got: Vec::new(), limit: 3, cap: usize::MAX };
        for turn in 1..=10u8 {
            if turn % 2 == 0 {
                q.push(Chunk::Shared(msg.clone()));
            } else {
                q.push(Chunk::Owned(vec![turn; 5].into_boxed_slice()));
            }
            assert_eq!(q.heap_slots(), 0, "a single frame is held inline");
            // Written in several partial writes (3 bytes each).
            assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::All);
            assert!(q.is_empty());
            assert_eq!(q.heap_slots(), 0);
        }
        // A single frame dropped by the policy, or discarded, leaves nothing behind either.
        q.push(Chunk::Shared(msg.clone()));
        assert_eq!(q.drop_oldest_shared(0), 1);
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::All);
        q.push(Chunk::Shared(msg));
        q.discard_unsent();
        assert!(q.is_empty() && q.bytes() == 0 && q.heap_slots() == 0);
        assert_eq!(q.total_written(), 5 * 5 + 5 * 7);
    }

    #[test]
    fn two_frames_allocate_slots_that_a_drained_queue_keeps() {
        let mut q = OutQueue::default();
        let mut sink = Trickle { got: Vec::new(), limit: usize::MAX, cap: usize::MAX };
        q.push(Chunk::Owned(b"a".to_vec().into_boxed_slice()));
        q.push(Chunk::Owned(b"b".to_vec().into_boxed_slice()));
        let slots = q.heap_slots();
        assert!(slots >= 2, "two frames at once need the deque: {slots}");
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::All);
        assert_eq!(q.heap_slots(), slots, "a busy connection does not allocate per turn");
        q.push(Chunk::Owned(b"c".to_vec().into_boxed_slice()));
        assert_eq!(q.heap_slots(), slots, "the kept deque takes the next frame");
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::All);
        // A burst past KEEP_SLOTS gives its slots back once drained.
        for _ in 0..=KEEP_SLOTS {
            q.push(Chunk::Owned(b"d".to_vec().into_boxed_slice()));
        }
        assert!(q.heap_slots() > KEEP_SLOTS);
        assert_eq!(q.write_to(&mut sink).unwrap(), Flushed::All);
        assert_eq!(q.heap_slots(), 0);
        assert_eq!(sink.got, [&b"abc"[..], &b"d".repeat(KEEP_SLOTS + 1)].concat());
    }
}
