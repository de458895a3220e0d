//! `OutQueue` against a model that holds plain byte frames: whatever is pushed, dropped,
//! discarded, moved in a hand-off and written in pieces, the queue writes what the model
//! says, counts the same bytes and reports the same backlog stamps. Guards the inline
//! single-frame storage (`slots`) and the tombstone bookkeeping alike.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::rc::Rc;

use proptest::prelude::*;

use super::{Chunk, Flushed, OutQueue, MAX_IOV};

#[derive(Debug, Clone)]
enum Op {
    /// A group message (`true`) or a reply of `len` bytes.
    Push {
        shared: bool,
        len: usize,
    },
    Drop {
        limit: usize,
    },
    Discard,
    /// A flush against a socket taking these write sizes in turn (0: interrupted), then full.
    Write(Vec<usize>),
    /// A live hand-off: the unsent bytes move to a new queue.
    Move,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), 1usize..40).prop_map(|(shared, len)| Op::Push { shared, len }),
        2 => (0usize..120).prop_map(|limit| Op::Drop { limit }),
        1 => Just(Op::Discard),
        4 => proptest::collection::vec(0usize..50, 0..6).prop_map(Op::Write),
        1 => Just(Op::Move),
    ]
}

/// The expected behaviour: frames not yet written completely (the front one maybe in part).
#[derive(Default)]
struct Model {
    frames: VecDeque<(Vec<u8>, bool)>,
    /// Bytes of the front frame written.
    front_written: usize,
    /// Every byte that should have reached the socket.
    out: Vec<u8>,
    stamp: u64,
}

impl Model {
    fn unsent(&self) -> Vec<u8> {
        let mut bytes: Vec<u8> = self.frames.iter().flat_map(|(f, _)| f.iter().copied()).collect();
        bytes.drain(..self.front_written);
        bytes
    }

    fn drop_oldest_shared(&mut self, limit: usize) -> usize {
        let mut bytes = self.unsent().len();
        let mut at = usize::from(self.front_written > 0);
        let mut dropped = 0;
        while bytes > limit && at < self.frames.len() {
            if self.frames[at].1 {
                bytes -= self.frames[at].0.len();
                self.frames.remove(at);
                dropped += 1;
            } else {
                at += 1;
            }
        }
        dropped
    }

    fn discard(&mut self) {
        let keep = usize::from(self.front_written > 0);
        self.frames.truncate(keep);
        if self.frames.is_empty() {
            self.stamp = 0;
        }
    }

    fn written(&mut self, mut n: usize) {
        while n > 0 {
            let (front, _) = &self.frames[0];
            let take = n.min(front.len() - self.front_written);
            self.out.extend_from_slice(&front[self.front_written..self.front_written + take]);
            self.front_written += take;
            n -= take;
            if self.front_written == front.len() {
                self.frames.pop_front();
                self.front_written = 0;
            }
        }
    }
}

/// A socket taking the scripted sizes, then WouldBlock; checks the iovecs it is given.
struct Socket {
    script: VecDeque<usize>,
    got: Vec<u8>,
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        assert!(!bufs.is_empty() && bufs.len() <= MAX_IOV, "{} iovecs", bufs.len());
        assert!(bufs.iter().all(|b| !b.is_empty()), "no iovec is spent on a tombstone");
        let Some(mut left) = self.script.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if left == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let mut n = 0;
        for buf in bufs {
            let take = left.min(buf.len());
            self.got.extend_from_slice(&buf[..take]);
            n += take;
            left -= take;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn check(q: &OutQueue, model: &Model, sock: &Socket) {
    let unsent = model.unsent();
    assert_eq!(q.bytes(), unsent.len());
    assert_eq!(q.unsent(), unsent);
    assert_eq!(q.total_written(), model.out.len() as u64);
    assert_eq!(sock.got, model.out);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn queue_writes_what_the_model_says(ops in proptest::collection::vec(op(), 1..120)) {
        let mut q = OutQueue::default();
        let mut model = Model::default();
        let mut sock = Socket { script: VecDeque::new(), got: Vec::new() };
        // Some push found frames (or tombstones) queued already.
        let mut stacked = false;
        let mut serial = 0u8;
        let mut turn = 0u64;
        for op in ops {
            match op {
                Op::Push { shared, len } => {
                    serial = serial.wrapping_add(1);
                    let bytes: Vec<u8> = (0..len).map(|i| serial.wrapping_add(i as u8)).collect();
                    stacked |= !q.is_empty();
                    q.push(if shared { Chunk::Shared(Rc::from(&bytes[..])) } else { Chunk::Owned(bytes.clone().into_boxed_slice()) });
                    model.frames.push_back((bytes, shared));
                }
                Op::Drop { limit } => assert_eq!(q.drop_oldest_shared(limit), model.drop_oldest_shared(limit)),
                Op::Discard => {
                    q.discard_unsent();
                    model.discard();
                }
                Op::Write(script) => {
                    turn += 1;
                    sock.script = script.into();
                    if model.stamp == 0 && !model.frames.is_empty() {
                        model.stamp = turn;
                    }
                    let mut seen = Vec::new();
                    let flushed = q.write_observed(&mut sock, turn, |since, queued| seen.push((since, queued))).unwrap();
                    // Replay the socket's answers on the model.
                    let mut expected = Vec::new();
                    let mut done = sock.got.len() - model.out.len();
                    while done > 0 {
                        let queued = model.unsent().len();
                        expected.push((model.stamp, queued));
                        let n = done.min(queued);
                        model.written(n);
                        done -= n;
                    }
                    if model.frames.is_empty() {
                        assert_eq!(flushed, Flushed::All);
                        model.stamp = 0;
                    } else {
                        assert_eq!(flushed, Flushed::Blocked);
                    }
                    // One report per write that took bytes: the model sees their sum, so
                    // compare what both agree on: stamps, and the first backlog.
                    assert_eq!(seen.first().map(|s| s.1), expected.first().map(|e| e.1));
                    assert!(seen.iter().all(|&(since, _)| since == expected[0].0 && since != 0));
                    assert_eq!(seen.is_empty(), expected.is_empty());
                }
                Op::Move => {
                    q = OutQueue::resume(q.unsent(), q.total_written());
                    let unsent = model.unsent();
                    model.frames.clear();
                    model.front_written = 0;
                    if !unsent.is_empty() {
                        model.frames.push_back((unsent, false));
                    }
                    model.stamp = 0;
                }
            }
            check(&q, &model, &sock);
            if !stacked {
                assert_eq!(q.heap_slots(), 0, "one frame at a time stays inline");
            }
        }
        // Whatever is left goes out in order.
        sock.script = std::iter::repeat_n(7, 100_000).collect();
        assert_eq!(q.write_to(&mut sock).unwrap(), Flushed::All);
        model.written(model.unsent().len());
        check(&q, &model, &sock);
        assert!(q.is_empty());
    }
}
