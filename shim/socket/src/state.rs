//! What the shim knows about the application's sockets that it set up: the overlay addresses
//! they stand for, and its own duplicates of the accelerated listeners' overlay listeners.

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

#[derive(Default)]
pub(crate) struct Table {
    /// The application's fds that stand for overlay sockets.
    fds: HashMap<i32, Accelerated>,
    /// The shim's own duplicate of each accelerated listener's overlay listener (the
    /// application's socket, listening in the container), by overlay address: clients without
    /// Freeflow are accepted from it ([`crate::overlay_accept`]). The application does not
    /// know these fds; if it closes or replaces one, it is forgotten.
    overlay: HashMap<(Ipv4Addr, u16), KeptOverlay>,
    /// The listeners whose clients without Freeflow this process told the router it takes
    /// itself (`Accepts`), with the process id that told it (a forked child tells its own).
    accepting: Vec<(i32, (Ipv4Addr, u16))>,
}

/// The shim's duplicate of an overlay listener, and the backlog to listen with again (after
/// the router went away, the shim stops it listening until a router takes it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptOverlay {
    pub fd: i32,
    pub backlog: i32,
}

pub(crate) static TABLE: ForkLock<Option<Table>> = ForkLock::new(None);
/// Set once anything is in the table, so that close() in programs that never use an
/// accelerated socket costs one relaxed load.
static IN_USE: AtomicBool = AtomicBool::new(false);

fn with_table<R>(f: impl FnOnce(&mut Table) -> R) -> R {
    let mut guard = TABLE.lock();
    f(guard.get_or_insert_with(Table::default))
}

fn with<R>(f: impl FnOnce(&mut HashMap<i32, Accelerated>) -> R) -> R {
    with_table(|t| f(&mut t.fds))
}

/// The application closed or replaced `fd`: if it was one of the shim's overlay listeners,
/// it is not the shim's any more.
fn forget_overlay_fd(t: &mut Table, fd: i32) {
    if !t.overlay.is_empty() {
        t.overlay.retain(|_, kept| kept.fd != fd);
    }
}

pub fn insert(fd: i32, state: Accelerated) {
    IN_USE.store(true, Ordering::Relaxed);
    with_table(|t| {
        forget_overlay_fd(t, fd);
        t.fds.insert(fd, state)
    });
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
    with_table(|t| {
        forget_overlay_fd(t, fd);
        t.fds.remove(&fd)
    })
}

/// Keeps `kept` as the shim's overlay listener for the accelerated listener on overlay address
/// `local`, unless it has one already: returns the fd of the one kept.
pub fn keep_overlay_first(local: (Ipv4Addr, u16), kept: KeptOverlay) -> i32 {
    IN_USE.store(true, Ordering::Relaxed);
    with_table(|t| t.overlay.entry(local).or_insert(kept).fd)
}

/// Forgets `fd` as the shim's overlay listener for `local` (it failed); true if it was.
pub fn drop_overlay(local: (Ipv4Addr, u16), fd: i32) -> bool {
    with_table(|t| {
        let kept = t.overlay.get(&local).is_some_and(|k| k.fd == fd);
        if kept {
            t.overlay.remove(&local);
        }
        kept
    })
}

/// The shim's overlay listener for the listener on overlay address `local`, if it has one.
pub fn overlay_of(local: (Ipv4Addr, u16)) -> Option<i32> {
    kept_overlay(local).map(|k| k.fd)
}

/// For each of `fds` that is an accelerated listener with an overlay listener kept by the
/// shim: (the fd, its overlay address, the overlay listener's fd), looked up under one lock.
pub fn overlays_of_listeners(
    fds: impl IntoIterator<Item = i32>,
) -> Vec<(i32, (Ipv4Addr, u16), i32)> {
    if !IN_USE.load(Ordering::Relaxed) {
        return Vec::new();
    }
    with_table(|t| {
        if t.overlay.is_empty() {
            return Vec::new();
        }
        fds.into_iter()
            .filter_map(|fd| {
                let s = t.fds.get(&fd).filter(|s| s.role == Role::Listener)?;
                let kept = t.overlay.get(&s.local)?;
                Some((fd, s.local, kept.fd))
            })
            .collect()
    })
}

/// Whether anything is in the table (a relaxed load: the cheap test before a lookup).
pub fn in_use() -> bool {
    IN_USE.load(Ordering::Relaxed)
}

/// The shim's overlay listener for the listener on overlay address `local`, with its backlog.
pub fn kept_overlay(local: (Ipv4Addr, u16)) -> Option<KeptOverlay> {
    if !IN_USE.load(Ordering::Relaxed) {
        return None;
    }
    with_table(|t| t.overlay.get(&local).copied())
}

/// Every overlay listener the shim keeps.
pub fn kept_overlays() -> Vec<KeptOverlay> {
    if !IN_USE.load(Ordering::Relaxed) {
        return Vec::new();
    }
    with_table(|t| t.overlay.values().copied().collect())
}

/// Notes that process `pid` takes the clients without Freeflow of the listener on `local`
/// itself; true the first time (the router is to be told).
pub fn note_accepting(pid: i32, local: (Ipv4Addr, u16)) -> bool {
    with_table(|t| {
        let new = !t.accepting.contains(&(pid, local));
        if new {
            t.accepting.retain(|&(p, _)| p == pid);
            t.accepting.push((pid, local));
        }
        new
    })
}

/// The listeners process `pid` told the router it takes the clients of.
pub fn accepting_of(pid: i32) -> Vec<(Ipv4Addr, u16)> {
    if !IN_USE.load(Ordering::Relaxed) {
        return Vec::new();
    }
    with_table(|t| {
        t.accepting
            .iter()
            .filter(|&&(p, _)| p == pid)
            .map(|&(_, local)| local)
            .collect()
    })
}

/// The listener on `local` is closed in this process: a new one is told to the router anew.
pub fn forget_accepting(local: (Ipv4Addr, u16)) {
    if !IN_USE.load(Ordering::Relaxed) {
        return;
    }
    with_table(|t| t.accepting.retain(|&(_, l)| l != local));
}

/// Forgets the shim's overlay listener for `local` (its last listener fd closed); returns it,
/// for the caller to close.
pub fn take_overlay(local: (Ipv4Addr, u16)) -> Option<i32> {
    if !IN_USE.load(Ordering::Relaxed) {
        return None;
    }
    with_table(|t| t.overlay.remove(&local).map(|k| k.fd))
}

/// Forgets every fd from `first` to `last` (closed by close_range), returning what they were
/// (and the shim's overlay listeners among them: they are closed too).
pub fn remove_range(first: i32, last: i32) -> Vec<Accelerated> {
    if !IN_USE.load(Ordering::Relaxed) {
        return Vec::new();
    }
    with_table(|t| {
        t.overlay
            .retain(|_, kept| kept.fd < first || kept.fd > last);
        let fds: Vec<i32> = t
            .fds
            .keys()
            .copied()
            .filter(|&fd| fd >= first && fd <= last)
            .collect();
        fds.iter().filter_map(|fd| t.fds.remove(fd)).collect()
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
    let table = &guard.get_or_insert_with(Table::default).fds;
    let mut ports: Vec<u16> = table
        .values()
        .filter(|s| s.role == Role::Listener)
        .map(|s| s.local.1)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}
