//! Atomics used by the ring protocol, swapped for loom's under `cfg(loom)` so the
//! publish and park/wake protocol can be model-checked with the same code.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, Ordering};
#[cfg(all(not(loom), not(target_arch = "x86_64")))]
use std::sync::atomic::fence;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, Ordering};

/// One index or flag on a line of its own: 128 bytes, because adjacent-line prefetch pairs
/// 64-byte lines on x86, and a shared pair would bounce between producer and consumer.
#[repr(C, align(128))]
#[derive(Debug)]
pub struct Padded<T>(pub T);

/// A sequentially consistent fence. On x86_64 a locked read-modify-write of a stack word is a
/// full barrier (the Linux kernel's `smp_mb()`), and on most parts and under most hypervisors it
/// costs less than `mfence`, which `fence(SeqCst)` emits. Under loom and elsewhere it is the
/// standard fence.
#[inline(always)]
pub(crate) fn full_fence() {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    {
        // SAFETY: `lock or` of zero into the word at the stack pointer changes no value and
        // touches only memory the thread owns; it has no other effect than ordering. The asm
        // block is not marked `nomem`, so it is also a compiler barrier for all memory.
        unsafe {
            std::arch::asm!(
                "lock or dword ptr [rsp], 0",
                options(nostack, preserves_flags)
            )
        };
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    fence(Ordering::SeqCst);
}
