//! What the shim knows about the application's sockets that it set up: the overlay addresses
//! they stand for.

use crate::forklock::ForkLock;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Listener,
    Connection,
}

#[derive(Debug, Clone, Copy)]
pub struct Accelerated {
    pub role: Role,
    pub local: (Ipv4Addr, u16),
    /// The overlay peer, for connections.
    pub peer: Option<(Ipv4Addr, u16)>,
    /// The application's socket was AF_INET6: report v4-mapped addresses.
    pub v6: bool,
    /// A listener the application bound to the wildcard address: getsockname says `0.0.0.0`
    /// (or `::`), as the kernel would, though `local` holds the overlay address (which its
    /// accepted connections report).
    pub wildcard: bool,
}

impl Accelerated {
    /// What getsockname says: as the kernel would, `0.0.0.0` (or `::`) for a wildcard
    /// listener, else the overlay address.
    pub fn name(&self) -> (Ipv4Addr, u16) {
        if self.wildcard {
            (Ipv4Addr::UNSPECIFIED, self.local.1)
        } else {
            self.local
        }
    }
}

pub(crate) static TABLE: ForkLock<Option<HashMap<i32, Accelerated>>> = ForkLock::new(None);
/// Set once anything is in the table, so that close() in programs that never use an
/// accelerated socket costs one relaxed load.
static IN_USE: AtomicBool = AtomicBool::new(false);

fn with<R>(f: impl FnOnce(&mut HashMap<i32, Accelerated>) -> R) -> R {
    let mut guard = TABLE.lock();
    f(guard.get_or_insert_with(HashMap::new))
}

pub fn insert(fd: i32, state: Accelerated) {
    IN_USE.store(true, Ordering::Relaxed);
    with(|t| t.insert(fd, state));
}

pub fn get(fd: i32) -> Option<Accelerated> {
    if !IN_USE.load(Ordering::Relaxed) {
        return None;
    }
    with(|t| t.get(&fd).copied())
}

pub fn remove(fd: i32) -> Option<Accelerated> {
    if !IN_USE.load(Ordering::Relaxed) {
        return None;
    }
    with(|t| t.remove(&fd))
}

/// Forgets every fd from `first` to `last` (closed by close_range), returning what they were.
pub fn remove_range(first: i32, last: i32) -> Vec<Accelerated> {
    if !IN_USE.load(Ordering::Relaxed) {
        return Vec::new();
    }
    with(|t| {
        let fds: Vec<i32> = t
            .keys()
            .copied()
            .filter(|&fd| fd >= first && fd <= last)
            .collect();
        fds.iter().filter_map(|fd| t.remove(fd)).collect()
    })
}

/// Another fd now refers to the same socket (dup2/dup3/F_DUPFD).
pub fn copy(from: i32, to: i32) {
    if let Some(s) = get(from) {
        insert(to, s);
    } else {
        remove(to);
    }
}

/// Set once this process forked, or was forked, while holding an accelerated listener.
static FORKED: AtomicBool = AtomicBool::new(false);

pub fn note_fork() {
    if IN_USE.load(Ordering::Relaxed) {
        FORKED.store(true, Ordering::Relaxed);
    }
}

/// Whether listeners of this process may be held by another process too (see [`note_fork`]).
pub fn forked() -> bool {
    FORKED.load(Ordering::Relaxed)
}

/// Whether this process holds any accelerated listener (blocking: not for fork handlers).
pub fn has_listeners() -> bool {
    IN_USE.load(Ordering::Relaxed) && with(|t| t.values().any(|s| s.role == Role::Listener))
}

/// Every fd the table knows, with what it stands for.
pub fn snapshot() -> Vec<(i32, Accelerated)> {
    if !IN_USE.load(Ordering::Relaxed) {
        return Vec::new();
    }
    with(|t| t.iter().map(|(&fd, &s)| (fd, s)).collect())
}

/// Whether some fd of this process is still the listener on overlay address `local`.
pub fn holds_listener(local: (Ipv4Addr, u16)) -> bool {
    if !IN_USE.load(Ordering::Relaxed) {
        return false;
    }
    with(|t| {
        t.values()
            .any(|s| s.role == Role::Listener && s.local == local)
    })
}

/// Overlay ports of the listeners this process has (for a forked child to claim).
pub fn listener_ports() -> Vec<u16> {
    if !IN_USE.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let Some(mut guard) = TABLE.try_lock() else {
        return Vec::new();
    };
    let table = guard.get_or_insert_with(HashMap::new);
    let mut ports: Vec<u16> = table
        .values()
        .filter(|s| s.role == Role::Listener)
        .map(|s| s.local.1)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}
