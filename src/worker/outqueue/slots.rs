//! The frames of one `OutQueue`, in order: none, one held inline, or a deque.
//!
//! Why not just a `VecDeque`: most of 100,000 idle connections have had exactly one frame
//! queued at a time (the reply to a join, a message now and then). A deque allocates on its
//! first push and a drained one keeps its slots, so every such connection would pin a
//! 96-byte allocation (a 112-byte malloc chunk) for nothing. A single frame lives here
//! instead, in the bytes the deque's header takes anyway (this type is as large as a
//! `VecDeque`); the deque is allocated only when two or more frames are queued at once, and
//! from then on `OutQueue` keeps it while it is small, so a busy connection does not
//! allocate per turn. Costs the hot path one branch per operation.

use std::collections::VecDeque;

use super::Chunk;

/// Slots a deque is created with: what `VecDeque` allocates on a first push of 24-byte items.
const FIRST_SLOTS: usize = 4;

#[derive(Default)]
pub(super) enum Slots {
    #[default]
    Empty,
    /// A single frame, inline: no allocation.
    One(Chunk),
    /// Two or more frames were queued at once since this queue last dropped its deque;
    /// it may be empty (drained, slots kept).
    Many(VecDeque<Chunk>),
}

impl Slots {
    pub(super) fn len(&self) -> usize {
        match self {
            Slots::Empty => 0,
            Slots::One(_) => 1,
            Slots::Many(deque) => deque.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn push_back(&mut self, chunk: Chunk) {
        if let Slots::Many(deque) = self {
            deque.push_back(chunk);
            return;
        }
        *self = match std::mem::take(self) {
            Slots::One(first) => {
                let mut deque = VecDeque::with_capacity(FIRST_SLOTS);
                deque.push_back(first);
                deque.push_back(chunk);
                Slots::Many(deque)
            }
            _ => Slots::One(chunk),
        };
    }

    pub(super) fn front(&self) -> Option<&Chunk> {
        match self {
            Slots::Empty => None,
            Slots::One(chunk) => Some(chunk),
            Slots::Many(deque) => deque.front(),
        }
    }

    pub(super) fn pop_front(&mut self) -> Option<Chunk> {
        match self {
            Slots::Many(deque) => deque.pop_front(),
            Slots::Empty => None,
            Slots::One(_) => match std::mem::take(self) {
                Slots::One(chunk) => Some(chunk),
                _ => None,
            },
        }
    }

    pub(super) fn get_mut(&mut self, at: usize) -> Option<&mut Chunk> {
        match self {
            Slots::Empty => None,
            Slots::One(chunk) => (at == 0).then_some(chunk),
            Slots::Many(deque) => deque.get_mut(at),
        }
    }

    /// The frames in order, as (up to) two slices, like `VecDeque::as_slices`.
    pub(super) fn as_slices(&self) -> (&[Chunk], &[Chunk]) {
        match self {
            Slots::Empty => (&[], &[]),
            Slots::One(chunk) => (std::slice::from_ref(chunk), &[]),
            Slots::Many(deque) => deque.as_slices(),
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Chunk> {
        let (a, b) = self.as_slices();
        a.iter().chain(b)
    }

    /// Keeps the first `len` frames.
    pub(super) fn truncate(&mut self, len: usize) {
        match self {
            Slots::One(_) if len == 0 => *self = Slots::Empty,
            Slots::Many(deque) => deque.truncate(len),
            _ => {}
        }
    }

    pub(super) fn retain(&mut self, keep: impl FnMut(&Chunk) -> bool) {
        match self {
            Slots::Many(deque) => deque.retain(keep),
            Slots::One(chunk) => {
                let mut keep = keep;
                if !keep(chunk) {
                    *self = Slots::Empty;
                }
            }
            Slots::Empty => {}
        }
    }

    /// Removes every frame; a deque keeps its slots.
    pub(super) fn clear(&mut self) {
        match self {
            Slots::Many(deque) => deque.clear(),
            _ => *self = Slots::Empty,
        }
    }

    /// Frees the deque of a drained queue when it has more than `keep` slots (a burst must
    /// not pin memory forever).
    pub(super) fn release_if_over(&mut self, keep: usize) {
        if let Slots::Many(deque) = self {
            if deque.is_empty() && deque.capacity() > keep {
                *self = Slots::Empty;
            }
        }
    }

    /// Slots allocated on the heap: 0 while no deque exists.
    #[cfg(test)]
    pub(super) fn heap_slots(&self) -> usize {
        match self {
            Slots::Many(deque) => deque.capacity(),
            _ => 0,
        }
    }
}
