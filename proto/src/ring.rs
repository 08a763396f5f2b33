//! Single-producer single-consumer rings of fixed-size slots in memory shared by two processes.
//!
//! A ring is a [`RingControl`] (three 128-byte lines: the producer's tail, the consumer's head and
//! the consumer's parked flag) followed by `slot_count` slots of `slot_size` bytes. Indices run
//! freely over `u32` and wrap; `tail - head` (wrapping) is the number of filled slots.
//!
//! Memory ordering:
//! - The producer copies a message into the slot at `tail`, then publishes a batch with one
//!   `Release` store of `tail`. The consumer loads `tail` with `Acquire`, so the slot bytes written
//!   before the store are visible after the load.
//! - The consumer copies the slot out, then publishes `head` with `Release` (batched too). The
//!   producer loads `head` with `Acquire` before reusing a slot, so it never overwrites a slot the
//!   consumer is still copying.
//! - Each side caches the other's index and reloads it only when its cached view says the ring is
//!   full (producer) or empty (consumer), so a busy ring costs one shared-line load per batch.
//!
//! Park/wake (the doorbell): a consumer that found the ring empty for a while stores
//! `parked = 1`, issues a `SeqCst` fence and looks at `tail` once more; only if it is still empty
//! does it sleep. The producer, after publishing `tail`, issues a `SeqCst` fence and loads
//! `parked`. The two fences order the two store→load pairs, so at least one side sees the other's
//! store: either the consumer sees the new tail and does not sleep, or the producer sees the flag
//! and rings the bell. The producer claims the wake-up with a swap to 0, so one publish rings at
//! most once and a consumer that is not parked costs the producer one load, no syscall.
//! `loom` checks this protocol in `tests/loom_ring.rs`.
//!
//! Trust: either side may be hostile. Indices read from the other side are checked
//! (`tail - head <= capacity`), the geometry used for addressing is the local copy fixed at
//! construction and never re-read from shared memory, and slots are copied out before anyone
//! looks at them, so a peer that rewrites a slot while it is read cannot change a checked value.

use crate::sync::{full_fence, AtomicU32, Ordering, Padded};

/// Control lines at the start of every ring.
#[repr(C)]
#[derive(Debug)]
pub struct RingControl {
    /// Next slot the producer will fill; written only by the producer.
    pub tail: Padded<AtomicU32>,
    /// Next slot the consumer will read; written only by the consumer.
    pub head: Padded<AtomicU32>,
    /// 1 while the consumer is parked (or about to park); set by the consumer, cleared by
    /// whichever side gets there first.
    pub parked: Padded<AtomicU32>,
}

/// Size in bytes of [`RingControl`]; slots start right after it.
pub const RING_CONTROL_SIZE: usize = std::mem::size_of::<RingControl>();

/// Errors a ring reports about its peer's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The other side wrote an index that cannot be right: more filled slots than capacity, or
    /// a head ahead of the tail. The ring cannot be used any further.
    #[error("ring index out of bounds: head {head}, tail {tail}, capacity {capacity}")]
    CorruptIndex { head: u32, tail: u32, capacity: u32 },
    /// A message longer than a slot.
    #[error("message of {len} bytes does not fit a {slot_size}-byte slot")]
    TooLong { len: usize, slot_size: usize },
}

/// Whether a publish found the consumer parked; then the caller must ring its doorbell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a parked consumer sleeps until its doorbell is rung"]
pub enum Wake {
    /// The consumer is awake (or was already woken): nothing to do.
    NotNeeded,
    /// The consumer was parked and this publish claimed the wake-up.
    Needed,
}

/// Geometry of a ring: a power-of-two number of slots of a fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingGeometry {
    pub slot_size: u32,
    pub slot_count: u32,
}

impl RingGeometry {
    /// Smallest slot allowed: one 64-byte cache line.
    pub const MIN_SLOT: u32 = 64;
    /// Largest slot allowed.
    pub const MAX_SLOT: u32 = 64 * 1024;
    /// Largest number of slots allowed.
    pub const MAX_SLOTS: u32 = 1 << 20;

    /// Checks that the geometry is one the ring supports: slot size a multiple of 64 within
    /// bounds, slot count a power of two within bounds.
    pub fn validate(self) -> Result<Self, String> {
        if self.slot_size < Self::MIN_SLOT
            || self.slot_size > Self::MAX_SLOT
            || !self.slot_size.is_multiple_of(64)
        {
            return Err(format!(
                "slot size {} is not a multiple of 64 in [{}, {}]",
                self.slot_size,
                Self::MIN_SLOT,
                Self::MAX_SLOT
            ));
        }
        if !self.slot_count.is_power_of_two() || self.slot_count > Self::MAX_SLOTS {
            return Err(format!(
                "slot count {} is not a power of two up to {}",
                self.slot_count,
                Self::MAX_SLOTS
            ));
        }
        Ok(self)
    }

    /// Bytes the ring occupies: control lines plus slots.
    pub fn byte_len(self) -> usize {
        RING_CONTROL_SIZE + self.slot_size as usize * self.slot_count as usize
    }
}

use crate::ring_memory::RingMemory;

/// The producing end of a ring.
#[derive(Debug)]
pub struct Producer {
    mem: RingMemory,
    mask: u32,
    capacity: u32,
    slot_size: usize,
    /// Next slot to fill; published to `control.tail` by [`Producer::publish`].
    tail: u32,
    /// Last value of `control.tail` we published (to skip redundant stores).
    published: u32,
    /// The consumer's head as last seen.
    head_cache: u32,
}

impl Producer {
    /// Takes the producing end of the ring in `mem`. The caller promises that no other producer
    /// exists for this ring (in this process or another).
    pub fn new(mem: RingMemory) -> Self {
        let tail = mem.control().tail.0.load(Ordering::Relaxed);
        let head = mem.control().head.0.load(Ordering::Acquire);
        let geometry = mem.geometry();
        Producer {
            mask: geometry.slot_count - 1,
            capacity: geometry.slot_count,
            slot_size: geometry.slot_size as usize,
            tail,
            published: tail,
            head_cache: head,
            mem,
        }
    }

    /// Bytes in one slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Slots free for writing, reloading the consumer's head only when the cached view is full.
    pub fn free_slots(&mut self) -> Result<u32, RingError> {
        let used = self.tail.wrapping_sub(self.head_cache);
        if used < self.capacity {
            return Ok(self.capacity - used);
        }
        self.reload_head()?;
        Ok(self.capacity - self.tail.wrapping_sub(self.head_cache))
    }

    fn reload_head(&mut self) -> Result<(), RingError> {
        let head = self.mem.control().head.0.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.capacity {
            return Err(RingError::CorruptIndex {
                head,
                tail: self.tail,
                capacity: self.capacity,
            });
        }
        self.head_cache = head;
        Ok(())
    }

    /// Copies `message` into the next slot without publishing it; the rest of the slot keeps
    /// older bytes of this same ring (messages carry their own length). Returns `Ok(false)` when
    /// the ring is full.
    pub fn push(&mut self, message: &[u8]) -> Result<bool, RingError> {
        if message.len() > self.slot_size {
            return Err(RingError::TooLong {
                len: message.len(),
                slot_size: self.slot_size,
            });
        }
        if self.free_slots()? == 0 {
            return Ok(false);
        }
        self.mem.write_slot(self.tail & self.mask, message);
        self.tail = self.tail.wrapping_add(1);
        Ok(true)
    }

    /// Makes every pushed message visible to the consumer with one store, and tells whether the
    /// consumer is parked and must be woken.
    pub fn publish(&mut self) -> Wake {
        if self.tail == self.published {
            return Wake::NotNeeded;
        }
        let control = self.mem.control();
        control.tail.0.store(self.tail, Ordering::Release);
        self.published = self.tail;
        // Pairs with the consumer's fence in `Consumer::prepare_park` (see the module comment).
        full_fence();
        if control.parked.0.load(Ordering::Relaxed) != 0
            && control.parked.0.swap(0, Ordering::AcqRel) != 0
        {
            return Wake::Needed;
        }
        Wake::NotNeeded
    }

    /// Messages pushed and not yet published.
    pub fn unpublished(&self) -> u32 {
        self.tail.wrapping_sub(self.published)
    }

    /// Messages pushed and not yet consumed, published or not, with the consumer's head
    /// reloaded (not the cached view).
    pub fn unconsumed(&mut self) -> Result<u32, RingError> {
        self.reload_head()?;
        Ok(self.tail.wrapping_sub(self.head_cache))
    }

    /// How many messages the consumer had taken in all (modulo 2^32) as of the last
    /// [`Producer::unconsumed`]: unchanged between two calls when it took nothing.
    pub fn consumed(&self) -> u32 {
        self.head_cache
    }

    /// Copies the first `min(out.len(), slot_size)` bytes of the `n`th message not yet
    /// consumed (0: the oldest, as of the last [`Producer::unconsumed`]) into `out`; false if
    /// there is no such message. For handing what a ring holds over to a new ring while its
    /// consumer is known to stand still (a completion queue being resized): a consumer that
    /// pops meanwhile only duplicates its own messages.
    pub fn read_unconsumed(&self, n: u32, out: &mut [u8]) -> bool {
        if n >= self.tail.wrapping_sub(self.head_cache) {
            return false;
        }
        let len = out.len().min(self.slot_size);
        self.mem
            .read_slot(self.head_cache.wrapping_add(n) & self.mask, &mut out[..len]);
        true
    }

    /// Whether the consumer's parked flag is up: a completion queue's consumer asked to be
    /// told about the next message ([`Consumer::request_wake`]) and no publish claimed it yet.
    pub fn consumer_parked(&self) -> bool {
        self.mem.control().parked.0.load(Ordering::Relaxed) != 0
    }

    /// Raises the consumer's parked flag on its behalf, so that the next publish reports
    /// [`Wake::Needed`]: a request for a wake-up carried over from another ring (a resized
    /// completion queue). The fence orders it before this producer's next publish.
    pub fn raise_parked(&self) {
        self.mem.control().parked.0.store(1, Ordering::Relaxed);
        full_fence();
    }

    /// The ring's shared memory, for doorbells that wait on the parked word.
    pub fn memory(&self) -> &RingMemory {
        &self.mem
    }
}

/// How many slots ahead the consumer prefetches while draining a batch.
const PREFETCH_AHEAD: u32 = 4;

/// The consuming end of a ring.
#[derive(Debug)]
pub struct Consumer {
    mem: RingMemory,
    mask: u32,
    capacity: u32,
    slot_size: usize,
    /// Next slot to read; published to `control.head` by [`Consumer::release`].
    head: u32,
    published: u32,
    /// The producer's tail as last seen.
    tail_cache: u32,
}

impl Consumer {
    /// Takes the consuming end of the ring in `mem`. The caller promises that no other consumer
    /// exists for this ring.
    pub fn new(mem: RingMemory) -> Self {
        let head = mem.control().head.0.load(Ordering::Relaxed);
        let geometry = mem.geometry();
        Consumer {
            mask: geometry.slot_count - 1,
            capacity: geometry.slot_count,
            slot_size: geometry.slot_size as usize,
            head,
            published: head,
            tail_cache: head,
            mem,
        }
    }

    /// Bytes in one slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Messages ready to read, reloading the producer's tail only when the cached view is empty.
    pub fn available(&mut self) -> Result<u32, RingError> {
        if self.tail_cache != self.head {
            return Ok(self.tail_cache.wrapping_sub(self.head));
        }
        let tail = self.mem.control().tail.0.load(Ordering::Acquire);
        let filled = tail.wrapping_sub(self.head);
        if filled > self.capacity {
            return Err(RingError::CorruptIndex {
                head: self.head,
                tail,
                capacity: self.capacity,
            });
        }
        self.tail_cache = tail;
        Ok(filled)
    }

    /// Messages ready to read, from the producer's tail as it is now (not the cached view).
    pub fn available_now(&mut self) -> Result<u32, RingError> {
        self.tail_cache = self.head;
        self.available()
    }

    /// Copies the first `min(out.len(), slot_size)` bytes of the next message into `out` and
    /// consumes it. Returns `Ok(false)` when the ring is empty. The slot is handed back to the
    /// producer on the next [`Consumer::release`].
    pub fn pop(&mut self, out: &mut [u8]) -> Result<bool, RingError> {
        if self.available()? == 0 {
            return Ok(false);
        }
        let len = out.len().min(self.slot_size);
        // Ask for a slot a few ahead now, so its cross-core transfer overlaps with this one
        // instead of stalling the next pop.
        if self.tail_cache.wrapping_sub(self.head) > PREFETCH_AHEAD {
            self.mem
                .prefetch_slot(self.head.wrapping_add(PREFETCH_AHEAD) & self.mask);
        }
        self.mem.read_slot(self.head & self.mask, &mut out[..len]);
        self.head = self.head.wrapping_add(1);
        Ok(true)
    }

    /// Returns every consumed slot to the producer with one store.
    pub fn release(&mut self) {
        if self.head != self.published {
            self.mem
                .control()
                .head
                .0
                .store(self.head, Ordering::Release);
            self.published = self.head;
        }
    }

    /// First half of parking: raises the parked flag and checks the ring once more. Returns
    /// `Ok(true)` if the ring is still empty and the caller may sleep on its doorbell; `Ok(false)`
    /// if a message arrived (the flag is lowered again). Consumed slots are released first, so a
    /// producer waiting for room is never left behind a sleeping consumer.
    pub fn prepare_park(&mut self) -> Result<bool, RingError> {
        self.release();
        self.mem.control().parked.0.store(1, Ordering::Relaxed);
        // Pairs with the producer's fence in `Producer::publish` (see the module comment).
        full_fence();
        if self.available()? != 0 {
            self.unpark();
            return Ok(false);
        }
        Ok(true)
    }

    /// Raises the parked flag without looking at the ring and without sleeping, so that the
    /// producer's next publish claims it and reports [`Wake::Needed`]. This is a completion
    /// queue's `ibv_req_notify_cq` ("tell me about the next entry"; entries already in the ring
    /// do not count, the program polls after arming). The fence orders the flag before the
    /// caller's later loads of the tail and pairs with the producer's fence in
    /// [`Producer::publish`]: either the producer sees the flag and rings, or the caller's next
    /// poll sees the entry.
    pub fn request_wake(&self) {
        self.mem.control().parked.0.store(1, Ordering::Relaxed);
        full_fence();
    }

    /// Lowers the parked flag after waking (the producer may have lowered it already). A swap
    /// rather than a store: it only runs around a park, never on the fast path, and as a
    /// read-modify-write it is ordered after the producer's claim in the flag's modification
    /// order instead of racing with it.
    pub fn unpark(&self) {
        self.mem.control().parked.0.swap(0, Ordering::AcqRel);
    }

    /// Whether the parked flag is still up (a wake-up has not been claimed).
    pub fn is_parked(&self) -> bool {
        self.mem.control().parked.0.load(Ordering::Relaxed) != 0
    }

    /// The ring's shared memory, for doorbells that wait on the parked word.
    pub fn memory(&self) -> &RingMemory {
        &self.mem
    }
}
