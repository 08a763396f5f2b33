//! The shim's lock: a mutex that fork handlers can take before fork and hand back in both
//! processes after it. In the child, the only thread is the one that forked; no waiter of the
//! parent exists there, so the lock is simply set free (a general-purpose mutex would try to
//! wake, or hand the lock to, parent threads that are not in the child, and hang).

use freeflow_proto::doorbell::{futex_wait, futex_wake};
use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};

const FREE: u32 = 0;
const TAKEN: u32 = 1;
/// Taken, and someone may be waiting: unlocking must wake.
const CONTENDED: u32 = 2;

pub struct ForkLock<T> {
    state: AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reached only through a guard, and one guard exists at a time (the
// state word's compare-and-swap / swap protocol below); T moves between threads with it.
unsafe impl<T: Send> Sync for ForkLock<T> {}

pub struct Guard<'a, T> {
    lock: &'a ForkLock<T>,
}

impl<T> ForkLock<T> {
    pub const fn new(value: T) -> ForkLock<T> {
        ForkLock {
            state: AtomicU32::new(FREE),
            value: UnsafeCell::new(value),
        }
    }

    pub fn lock(&self) -> Guard<'_, T> {
        if self
            .state
            .compare_exchange(FREE, TAKEN, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.state.swap(CONTENDED, Ordering::Acquire) != FREE {
                futex_wait(&self.state, CONTENDED, None);
            }
        }
        Guard { lock: self }
    }

    pub fn try_lock(&self) -> Option<Guard<'_, T>> {
        self.state
            .compare_exchange(FREE, TAKEN, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Guard { lock: self })
    }

    fn unlock(&self) {
        if self.state.swap(FREE, Ordering::Release) == CONTENDED {
            futex_wake(&self.state, 1);
        }
    }

    /// Before fork: takes the lock and keeps it past the fork.
    pub fn hold_across_fork(&self) {
        std::mem::forget(self.lock());
    }

    /// After fork, in the parent: gives back what [`hold_across_fork`](Self::hold_across_fork)
    /// took, waking a waiter.
    pub fn release_in_parent(&self) {
        self.unlock();
    }

    /// After fork, in the child: the lock is free; the parent's waiters are not here.
    pub fn release_in_child(&self) {
        self.state.store(FREE, Ordering::Release);
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (see the Sync impl).
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, and the guard is borrowed mutably.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.lock.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::ForkLock;
    use std::sync::Arc;

    #[test]
    fn it_excludes_and_hands_over() {
        let lock = Arc::new(ForkLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        *lock.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*lock.lock(), 40_000);
        let held = lock.lock();
        assert!(lock.try_lock().is_none());
        drop(held);
        assert!(lock.try_lock().is_some());
        lock.hold_across_fork();
        assert!(lock.try_lock().is_none());
        lock.release_in_child();
        assert!(lock.try_lock().is_some());
    }
}
