//! Where a ring's control lines and slots live: a shared mapping in real builds, loom-tracked
//! heap cells under `cfg(loom)`. This is the only place the ring touches raw memory.

#[cfg(not(loom))]
use crate::ring::RING_CONTROL_SIZE;
use crate::ring::{RingControl, RingGeometry};

#[cfg(not(loom))]
mod mapped {
    use super::*;
    use crate::region::Mapping;
    use std::ptr::NonNull;
    use std::sync::Arc;

    /// A ring inside a shared mapping. Cloning gives another handle on the same ring (one for
    /// each end in tests); the mapping lives as long as any handle.
    #[derive(Debug, Clone)]
    pub struct RingMemory {
        _mapping: Arc<Mapping>,
        control: NonNull<RingControl>,
        slots: NonNull<u8>,
        geometry: RingGeometry,
    }

    // SAFETY: the pointers refer into `_mapping`, which is kept alive by the Arc and is itself
    // plain shared memory; all concurrent access to the control lines goes through atomics and
    // slot access follows the ring protocol (one producer, one consumer).
    unsafe impl Send for RingMemory {}

    impl RingMemory {
        /// The ring at `offset` of `mapping`. Fails if the ring would not fit the mapping or the
        /// offset is not 128-byte aligned.
        pub fn new(
            mapping: Arc<Mapping>,
            offset: usize,
            geometry: RingGeometry,
        ) -> Result<Self, String> {
            let geometry = geometry.validate()?;
            let end = offset
                .checked_add(geometry.byte_len())
                .ok_or("ring offset overflows")?;
            if !offset.is_multiple_of(128) || end > mapping.len() {
                return Err(format!(
                    "ring at {offset}..{end} does not fit a {}-byte mapping (or is unaligned)",
                    mapping.len()
                ));
            }
            let base = mapping.as_ptr();
            // SAFETY: offset and offset + RING_CONTROL_SIZE are within the mapping (checked
            // above), so both pointers stay inside one allocation.
            let (control, slots) =
                unsafe { (base.add(offset), base.add(offset + RING_CONTROL_SIZE)) };
            Ok(RingMemory {
                control: NonNull::new(control.cast::<RingControl>()).ok_or("null mapping")?,
                slots: NonNull::new(slots).ok_or("null mapping")?,
                _mapping: mapping,
                geometry,
            })
        }

        /// The ring's control lines.
        pub fn control(&self) -> &RingControl {
            // SAFETY: `control` points at RING_CONTROL_SIZE bytes inside the live mapping,
            // 128-byte aligned (checked in `new`); RingControl is three atomics plus padding, for
            // which every bit pattern is valid, so whatever the peer wrote is a valid value.
            unsafe { self.control.as_ref() }
        }

        /// Slot geometry fixed when the ring was set up on this side.
        pub fn geometry(&self) -> RingGeometry {
            self.geometry
        }

        fn slot_ptr(&self, index: u32) -> *mut u8 {
            debug_assert!(index < self.geometry.slot_count);
            let offset = (index & (self.geometry.slot_count - 1)) as usize
                * self.geometry.slot_size as usize;
            // SAFETY: the index is masked to the slot count, so the slot lies inside the ring,
            // which lies inside the mapping (checked in `new`).
            unsafe { self.slots.as_ptr().add(offset) }
        }

        pub(crate) fn write_slot(&self, index: u32, message: &[u8]) {
            let len = message.len().min(self.geometry.slot_size as usize);
            // SAFETY: the slot has slot_size bytes and len <= slot_size; the ring protocol gives
            // this producer the slot exclusively until it publishes; the source is a separate
            // local buffer, so the ranges do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(message.as_ptr(), self.slot_ptr(index), len) };
        }

        /// Hints the CPU to start fetching slot `index`.
        #[inline(always)]
        pub(crate) fn prefetch_slot(&self, index: u32) {
            #[cfg(target_arch = "x86_64")]
            {
                let ptr = self.slot_ptr(index) as *const i8;
                // SAFETY: a prefetch is a hint with no architectural effect; the address is
                // inside the mapping (slot_ptr masks the index).
                unsafe { std::arch::x86_64::_mm_prefetch(ptr, std::arch::x86_64::_MM_HINT_T0) };
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = index;
        }

        pub(crate) fn read_slot(&self, index: u32, out: &mut [u8]) {
            let len = out.len().min(self.geometry.slot_size as usize);
            // SAFETY: as in write_slot, the slot is inside the mapping and len <= slot_size. The
            // bytes are copied out as plain bytes before anyone interprets them, so a hostile
            // peer rewriting the slot concurrently can only change what we copied, never a
            // value we already checked.
            unsafe { std::ptr::copy_nonoverlapping(self.slot_ptr(index), out.as_mut_ptr(), len) };
        }
    }
}

#[cfg(not(loom))]
pub use mapped::RingMemory;

#[cfg(loom)]
mod modelled {
    use super::*;
    use loom::cell::UnsafeCell;
    use std::sync::Arc;

    #[derive(Debug)]
    struct Inner {
        control: RingControl,
        slots: Vec<UnsafeCell<Vec<u8>>>,
    }

    /// Under loom: the control lines are loom atomics and every slot is a loom cell, so the
    /// model checker flags any slot access not ordered by the index protocol.
    #[derive(Debug, Clone)]
    pub struct RingMemory {
        inner: Arc<Inner>,
        geometry: RingGeometry,
    }

    impl RingMemory {
        /// A fresh ring on the (loom-tracked) heap.
        pub fn new_model(geometry: RingGeometry) -> Self {
            use crate::sync::{AtomicU32, Padded};
            let slots = (0..geometry.slot_count)
                .map(|_| UnsafeCell::new(vec![0u8; geometry.slot_size as usize]))
                .collect();
            RingMemory {
                inner: Arc::new(Inner {
                    control: RingControl {
                        tail: Padded(AtomicU32::new(0)),
                        head: Padded(AtomicU32::new(0)),
                        parked: Padded(AtomicU32::new(0)),
                    },
                    slots,
                }),
                geometry,
            }
        }

        pub fn control(&self) -> &RingControl {
            &self.inner.control
        }

        pub fn geometry(&self) -> RingGeometry {
            self.geometry
        }

        pub(crate) fn write_slot(&self, index: u32, message: &[u8]) {
            self.inner.slots[index as usize].with_mut(|slot| {
                // SAFETY: loom checks that this mutable access does not race with any other
                // access to the same cell; that is the property under test.
                let slot = unsafe { &mut *slot };
                slot[..message.len()].copy_from_slice(message);
            });
        }

        pub(crate) fn prefetch_slot(&self, _index: u32) {}

        pub(crate) fn read_slot(&self, index: u32, out: &mut [u8]) {
            self.inner.slots[index as usize].with(|slot| {
                // SAFETY: as in write_slot, loom checks the access is ordered.
                let slot = unsafe { &*slot };
                let len = out.len().min(slot.len());
                out[..len].copy_from_slice(&slot[..len]);
            });
        }
    }
}

#[cfg(loom)]
pub use modelled::RingMemory;

#[cfg(not(loom))]
const _: () = assert!(RING_CONTROL_SIZE == 384);
