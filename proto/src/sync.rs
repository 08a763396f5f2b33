//! Atomics used by the ring protocol, swapped for loom's under `cfg(loom)` so the
//! publish and park/wake protocol can be model-checked with the same code.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, Ordering};

/// One index or flag on a line of its own: 128 bytes, because adjacent-line prefetch pairs
/// 64-byte lines on x86, and a shared pair would bounce between producer and consumer.
#[repr(C, align(128))]
#[derive(Debug)]
pub struct Padded<T>(pub T);
