//! A program spinning on `ibv_poll_cq` and a router shard on one core. Unpinned programs may
//! land on a router core; then the program's poll loop holds the core the router needs to
//! produce what the program waits for, until the scheduler's time slice ends (tens of
//! microseconds to milliseconds per completion). The router publishes the cores of its shards
//! in the header of every region it creates (`freeflow_proto::region::announce_router_cores`);
//! a CQ keeps them, and after [`YIELD_AFTER`] empty polls in a row its `poll_cq` asks which
//! core it runs on and, on a router core, yields (`sched_yield`). The router yields in its own
//! idle spin too, so the two take turns.
//!
//! Each yield costs the yielder: Linux's EEVDF scheduler moves its deadline a whole slice
//! later, so a loop that yields every few microseconds falls seconds behind the other busy
//! tasks of the core (measured: a prober pinned to a router core shared with other routers
//! missed a 3-second wait). A yield that found nothing again therefore doubles the empty polls
//! before the next one, up to [`YIELD_AFTER_MOST`]; a completion starts again from
//! [`YIELD_AFTER`]. A wait that the router answers costs one yield; a long one, a yield per
//! millisecond or so.
//!
//! The cost where the router is not: no system call is added. The core is read through
//! `sched_getcpu`, which glibc answers from the rseq area (or the vDSO), once every
//! [`YIELD_AFTER`] empty polls, and not at all when the router published no cores.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

/// Empty polls in a row before a poll on a router core yields: a few microseconds of spinning
/// (an empty poll takes tens of nanoseconds), short against a time slice, long against the
/// router's turn around a request.
pub const YIELD_AFTER: u32 = 64;
/// The most empty polls between two yields of one wait (about a millisecond of polling).
pub const YIELD_AFTER_MOST: u32 = YIELD_AFTER << 10;

/// Yields made by this process's polls, for tests and debugging.
static YIELDS: AtomicU64 = AtomicU64::new(0);

/// A CQ's count of empty polls in a row, when it yields next, and the router's cores its
/// region announced.
#[derive(Debug)]
pub struct IdlePolls {
    router_cores: u64,
    empty: u32,
    /// Empty polls in a row before the next look at the core: [`YIELD_AFTER`], doubled by
    /// each yield of one wait.
    next: u32,
}

impl IdlePolls {
    pub fn new(router_cores: u64) -> IdlePolls {
        IdlePolls {
            router_cores,
            empty: 0,
            next: YIELD_AFTER,
        }
    }

    /// A poll found completions.
    pub fn found(&mut self) {
        self.empty = 0;
        self.next = YIELD_AFTER;
    }

    /// A poll found nothing: whether the caller should yield the core (after releasing its
    /// locks). `core` says which core the caller runs on; it is asked only when the router
    /// announced cores, once per [`YIELD_AFTER`] empty polls (or more, after yields).
    pub fn found_nothing(&mut self, core: impl FnOnce() -> Option<u32>) -> bool {
        self.empty += 1;
        if self.empty < self.next {
            return false;
        }
        self.empty = 0;
        let on_router_core = self.router_cores != 0
            && core().is_some_and(|c| c < 64 && self.router_cores & (1 << c) != 0);
        if on_router_core {
            self.next = (self.next * 2).min(YIELD_AFTER_MOST);
        }
        on_router_core
    }
}

/// The core this thread runs on, if the C library can tell.
pub fn current_core() -> Option<u32> {
    // SAFETY: sched_getcpu takes no arguments and touches no memory of ours.
    let core = unsafe { libc::sched_getcpu() };
    u32::try_from(core).ok()
}

/// Gives the core up to whoever else wants it (returns at once if nobody does).
pub fn yield_core() {
    YIELDS.fetch_add(1, Ordering::Relaxed);
    std::thread::yield_now();
}

/// How many times this process's polls yielded.
pub fn yields() -> u64 {
    YIELDS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Runs `polls` empty polls on `core`; returns (yields asked for, times the core was read).
    fn run(cores: u64, core: Option<u32>, polls: u32) -> (u32, u32) {
        let mut idle = IdlePolls::new(cores);
        let asked = Cell::new(0);
        let mut yields = 0;
        for _ in 0..polls {
            let yield_now = idle.found_nothing(|| {
                asked.set(asked.get() + 1);
                core
            });
            yields += u32::from(yield_now);
        }
        (yields, asked.get())
    }

    #[test]
    fn a_poll_on_a_router_core_yields_less_often_the_longer_it_finds_nothing() {
        // Yields after 64, 128, 256, 512 and 1024 more empty polls.
        let five = YIELD_AFTER * (1 + 2 + 4 + 8 + 16);
        assert_eq!(run(0b10, Some(1), five), (5, 5));
        assert_eq!(run(0b10, Some(1), five - 1), (4, 4));
        assert_eq!(run(0b10, Some(1), YIELD_AFTER - 1), (0, 0));
        // At most one yield per YIELD_AFTER_MOST empty polls in the end.
        let (yields, _) = run(0b10, Some(1), YIELD_AFTER_MOST * 20);
        assert!((20..=30).contains(&yields), "{yields}");
    }

    #[test]
    fn a_poll_elsewhere_never_yields_and_reads_the_core_rarely() {
        assert_eq!(run(0b10, Some(0), YIELD_AFTER * 5), (0, 5));
        assert_eq!(run(0b10, None, YIELD_AFTER * 5), (0, 5));
        assert_eq!(run(1 << 63, Some(64), YIELD_AFTER), (0, 1));
    }

    #[test]
    fn without_published_cores_the_core_is_never_read() {
        assert_eq!(run(0, Some(0), YIELD_AFTER * 5), (0, 0));
    }

    #[test]
    fn completions_start_the_count_again() {
        let mut idle = IdlePolls::new(0b1);
        let polls_to_yield = |idle: &mut IdlePolls| {
            (1..=YIELD_AFTER_MOST)
                .find(|_| idle.found_nothing(|| Some(0)))
                .unwrap()
        };
        assert_eq!(polls_to_yield(&mut idle), YIELD_AFTER);
        assert_eq!(polls_to_yield(&mut idle), 2 * YIELD_AFTER);
        for _ in 0..YIELD_AFTER - 1 {
            assert!(!idle.found_nothing(|| Some(0)));
        }
        // A completion: the next wait yields after YIELD_AFTER empty polls again.
        idle.found();
        assert_eq!(polls_to_yield(&mut idle), YIELD_AFTER);
    }

    #[test]
    fn the_current_core_is_one_this_thread_may_run_on() {
        let core = current_core().expect("sched_getcpu");
        // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
        let allowed = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
                0
            );
            libc::CPU_ISSET(core as usize, &set)
        };
        assert!(allowed);
        let before = yields();
        yield_core();
        assert!(yields() > before);
    }
}
