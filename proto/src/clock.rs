//! The kernel's monotonic clock, read as a number that can travel in a message: every process of
//! a host reads the same CLOCK_MONOTONIC (containers share the kernel; a time namespace would
//! offset it, which only makes messages look older).

/// CLOCK_MONOTONIC in milliseconds, truncated to 32 bits (it wraps after 49 days: compare two
/// readings with `wrapping_sub`).
pub fn monotonic_ms() -> u32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, which lives across the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    debug_assert_eq!(rc, 0, "CLOCK_MONOTONIC is always there on Linux");
    (now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000) as u32
}

/// CLOCK_MONOTONIC in nanoseconds: a time two processes of one host can compare: the verbs
/// engine's completion timestamps (one tick a nanosecond, so the device's `hca_core_clock` is
/// 1 GHz), and the cluster bench's router watchers' stamps.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, which lives across the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    debug_assert_eq!(rc, 0, "CLOCK_MONOTONIC is always there on Linux");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn moves_forward_with_std_instant() {
        let a = super::monotonic_ms();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = super::monotonic_ms();
        assert!(b.wrapping_sub(a) >= 20, "{a} {b}");
        assert!(b.wrapping_sub(a) < 60_000, "{a} {b}");
    }

    #[test]
    fn nanoseconds_agree_with_milliseconds() {
        let ns = super::monotonic_ns();
        let ms = super::monotonic_ms();
        let ns_as_ms = (ns / 1_000_000) as u32;
        assert!(ms.wrapping_sub(ns_as_ms) < 1_000, "{ns} ns, {ms} ms");
    }
}
