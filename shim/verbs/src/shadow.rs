//! The library's shadow of one queue of a QP: the work requests posted and not yet known to be
//! complete, oldest first, so that they can be flushed if the router goes ([`crate::faults`]).
//!
//! The shadow sits on the fast path twice: every posted request is recorded, and every polled
//! completion retires requests. It is therefore a fixed ring of plain slots with two counters
//! and no lock:
//!
//! - the posting side (`ibv_post_send`/`ibv_post_recv`, which hold the queue's lock) writes a
//!   request's slot, then publishes it by storing `posted` (Release);
//! - the retiring side (`ibv_poll_cq` of the one CQ the queue completes on, which holds that
//!   CQ's lock) loads `posted` (Acquire), reads slots, and stores `retired` (Release); the
//!   poster loads `retired` (Acquire) before it reuses a slot, and only when its cached view of
//!   the room says the shadow is full.
//!
//! rdma-core lets a QP be posted to and its CQ be polled from different threads: the two sides
//! never write the same word, and each slot is written only while it is free (between its
//! retirement and its next publication), so both may run at once. Slots are atomics read and
//! written with Relaxed ordering (plain moves on x86): the counters' Release/Acquire pairs order
//! them.
//!
//! A QP going to RESET forgets its requests (the router does too): the poster raises `floor` to
//! `posted`; both sides count from `max(retired, floor)`.
//!
//! As on hardware, a request holds its place until its completion is polled (or, unsignaled, a
//! later one's), so the shadow has as many places as the queue's ring has slots.

use freeflow_proto::verbs::work::{wc_opcode, wr_opcode};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A work request posted and not yet known to be complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posted {
    pub wr_id: u64,
    /// The `ibv_wc_opcode` its completion has.
    pub wc_opcode: u32,
    /// It gets a completion when it succeeds (receives always do).
    pub signaled: bool,
}

impl Posted {
    pub fn send(wr_id: u64, opcode: u8, signaled: bool) -> Posted {
        let wc_opcode = match opcode {
            wr_opcode::RDMA_WRITE | wr_opcode::RDMA_WRITE_WITH_IMM => wc_opcode::RDMA_WRITE,
            wr_opcode::RDMA_READ => wc_opcode::RDMA_READ,
            wr_opcode::ATOMIC_CMP_AND_SWP => wc_opcode::COMP_SWAP,
            wr_opcode::ATOMIC_FETCH_AND_ADD => wc_opcode::FETCH_ADD,
            _ => wc_opcode::SEND,
        };
        Posted {
            wr_id,
            wc_opcode,
            signaled,
        }
    }

    pub fn recv(wr_id: u64) -> Posted {
        Posted {
            wr_id,
            wc_opcode: wc_opcode::RECV,
            signaled: true,
        }
    }
}

/// The bit of a slot's `meta` word that says the request is signaled (the rest is its
/// `ibv_wc_opcode`, a small number).
const SIGNALED: u32 = 1 << 31;

/// One place of the shadow.
#[derive(Debug, Default)]
struct Slot {
    wr_id: AtomicU64,
    /// The completion's opcode, and [`SIGNALED`].
    meta: AtomicU32,
}

impl Slot {
    fn read(&self) -> Posted {
        let meta = self.meta.load(Ordering::Relaxed);
        Posted {
            wr_id: self.wr_id.load(Ordering::Relaxed),
            wc_opcode: meta & !SIGNALED,
            signaled: meta & SIGNALED != 0,
        }
    }
}

/// A queue's requests posted and not completed (see the module comment). Counters run over
/// `u64` and never wrap in practice.
#[derive(Debug)]
pub struct Shadow {
    slots: Box<[Slot]>,
    mask: u64,
    /// Places: the queue's ring slots.
    capacity: u64,
    /// Requests recorded; written by the poster only.
    posted: AtomicU64,
    /// Requests retired (completed and polled, or flushed); written by the retiring side only.
    retired: AtomicU64,
    /// Requests before it were forgotten at a RESET; written by the poster only.
    floor: AtomicU64,
}

impl Shadow {
    pub fn new(capacity: u32) -> Shadow {
        let len = capacity.max(1).next_power_of_two() as usize;
        Shadow {
            slots: (0..len).map(|_| Slot::default()).collect(),
            mask: len as u64 - 1,
            capacity: u64::from(capacity),
            posted: AtomicU64::new(0),
            retired: AtomicU64::new(0),
            floor: AtomicU64::new(0),
        }
    }

    /// The oldest request not retired nor forgotten.
    fn oldest(&self) -> u64 {
        let retired = self.retired.load(Ordering::Acquire);
        retired.max(self.floor.load(Ordering::Relaxed))
    }

    fn slot(&self, n: u64) -> &Slot {
        &self.slots[(n & self.mask) as usize]
    }

    /// Places free for new requests (poster side; a slow load of the retiring side's counter).
    fn room(&self) -> u64 {
        let outstanding = self.posted.load(Ordering::Relaxed) - self.oldest();
        self.capacity.saturating_sub(outstanding)
    }

    /// Whether a request of this queue waits for a completion.
    pub fn has_outstanding(&self) -> bool {
        self.posted.load(Ordering::Acquire) > self.oldest()
    }

    /// A send completion was polled: a success retires the requests up to the oldest
    /// signaled one (the unsignaled ones before it completed silently); an error retires the
    /// oldest request, whatever its flags, as the engine reports errors even for unsignaled
    /// sends.
    pub fn retire_send(&self, success: bool) {
        let posted = self.posted.load(Ordering::Acquire);
        let mut next = self.oldest();
        while next < posted {
            let meta = self.slot(next).meta.load(Ordering::Relaxed);
            next += 1;
            if !success || meta & SIGNALED != 0 {
                break;
            }
        }
        self.retired.store(next, Ordering::Release);
    }

    /// A receive completion was polled: it was the oldest receive's.
    pub fn retire_recv(&self) {
        let oldest = self.oldest();
        if oldest < self.posted.load(Ordering::Acquire) {
            self.retired.store(oldest + 1, Ordering::Release);
        }
    }

    /// The oldest request, retired to be flushed.
    pub fn take_oldest(&self) -> Option<Posted> {
        let oldest = self.oldest();
        if oldest >= self.posted.load(Ordering::Acquire) {
            return None;
        }
        let posted = self.slot(oldest).read();
        self.retired.store(oldest + 1, Ordering::Release);
        Some(posted)
    }
}

/// The posting side of a [`Shadow`], kept under the queue's lock with the ring: it caches the
/// room it knows of, so a post reads the retiring side's counter only when that runs out.
#[derive(Debug)]
pub struct ShadowWriter {
    shadow: std::sync::Arc<Shadow>,
    /// Places known free (at least this many are).
    room: u64,
}

impl ShadowWriter {
    pub fn new(shadow: std::sync::Arc<Shadow>) -> ShadowWriter {
        let room = shadow.room();
        ShadowWriter { shadow, room }
    }

    pub fn shadow(&self) -> &std::sync::Arc<Shadow> {
        &self.shadow
    }

    /// Whether every place holds a request not yet retired.
    pub fn is_full(&mut self) -> bool {
        if self.room == 0 {
            self.room = self.shadow.room();
        }
        self.room == 0
    }

    /// Whether `n` more requests fit.
    pub fn has_room_for(&mut self, n: u64) -> bool {
        if self.room < n {
            self.room = self.shadow.room();
        }
        self.room >= n
    }

    /// Records a posted request (the caller checked [`ShadowWriter::is_full`]).
    pub fn record(&mut self, posted: Posted) {
        let s = &self.shadow;
        let n = s.posted.load(Ordering::Relaxed);
        let slot = s.slot(n);
        slot.wr_id.store(posted.wr_id, Ordering::Relaxed);
        let signaled = if posted.signaled { SIGNALED } else { 0 };
        slot.meta
            .store(posted.wc_opcode | signaled, Ordering::Relaxed);
        s.posted.store(n + 1, Ordering::Release);
        self.room = self.room.saturating_sub(1);
    }

    /// Forgets every outstanding request (the QP went to RESET).
    pub fn forget_all(&mut self) {
        let s = &self.shadow;
        s.floor
            .store(s.posted.load(Ordering::Relaxed), Ordering::Release);
        self.room = s.room();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn writer(capacity: u32) -> ShadowWriter {
        ShadowWriter::new(Arc::new(Shadow::new(capacity)))
    }

    fn ids(s: &Shadow) -> Vec<u64> {
        std::iter::from_fn(|| s.take_oldest().map(|p| p.wr_id)).collect()
    }

    #[test]
    fn a_signaled_success_retires_the_unsignaled_sends_before_it() {
        let mut w = writer(8);
        w.record(Posted::send(1, wr_opcode::SEND, false));
        w.record(Posted::send(2, wr_opcode::RDMA_WRITE, false));
        w.record(Posted::send(3, wr_opcode::SEND, true));
        w.record(Posted::send(4, wr_opcode::SEND, false));
        w.record(Posted::send(5, wr_opcode::RDMA_READ, true));
        let s = w.shadow().clone();
        s.retire_send(true);
        // An error completes the oldest request, signaled or not.
        s.retire_send(false);
        let left: Vec<Posted> = std::iter::from_fn(|| s.take_oldest()).collect();
        assert_eq!(left, vec![Posted::send(5, wr_opcode::RDMA_READ, true)]);
        assert_eq!(left[0].wc_opcode, wc_opcode::RDMA_READ);
        assert!(!s.has_outstanding());
    }

    #[test]
    fn receives_retire_in_order_and_the_rest_flush_in_order() {
        let mut w = writer(3);
        for id in [10, 11, 12] {
            assert!(!w.is_full());
            w.record(Posted::recv(id));
        }
        assert!(w.is_full());
        let s = w.shadow().clone();
        s.retire_recv();
        assert!(!w.is_full());
        assert_eq!(ids(&s), vec![11, 12]);
        assert!(!s.has_outstanding());
        // Nothing left: retiring more changes nothing.
        s.retire_recv();
        s.retire_send(true);
        assert!(!s.has_outstanding());
        assert_eq!(w.shadow().room(), 3);
    }

    #[test]
    fn places_are_reused_around_the_ring_in_order() {
        let mut w = writer(4);
        let s = w.shadow().clone();
        for id in 0..50u64 {
            assert!(!w.is_full(), "request {id}");
            w.record(Posted::send(id, wr_opcode::SEND, id % 3 == 2));
            if id % 3 == 2 {
                s.retire_send(true);
                assert!(!s.has_outstanding());
            }
        }
        // 48 and 49 are outstanding (unsignaled, after the last signaled one).
        assert_eq!(ids(&s), vec![48, 49]);
    }

    #[test]
    fn a_reset_forgets_what_was_posted() {
        let mut w = writer(2);
        w.record(Posted::recv(1));
        w.record(Posted::recv(2));
        assert!(w.is_full());
        w.forget_all();
        let s = w.shadow().clone();
        assert!(!s.has_outstanding());
        assert!(!w.is_full());
        w.record(Posted::recv(3));
        assert_eq!(ids(&s), vec![3]);
    }

    #[test]
    fn a_poster_and_a_poller_on_two_threads_see_every_request_once_in_order() {
        const N: u64 = 20_000;
        let mut w = writer(16);
        let s = w.shadow().clone();
        let poller = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while (seen.len() as u64) < N {
                if let Some(p) = s.take_oldest() {
                    seen.push(p.wr_id);
                }
            }
            seen
        });
        for id in 0..N {
            while w.is_full() {
                std::hint::spin_loop();
            }
            w.record(Posted::send(id, wr_opcode::RDMA_WRITE, id % 2 == 0));
        }
        let seen = poller.join().unwrap();
        assert_eq!(seen, (0..N).collect::<Vec<_>>());
    }
}
