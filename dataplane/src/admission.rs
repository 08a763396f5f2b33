//! Shares of the router's attach resources per source, so that one container's flood fills only
//! its own share. A source is where an attach connection comes from, as the kernel says at
//! accept time (SO_PEERCRED, then the pid's network namespace): a registered container, or
//! "unregistered", one bucket for every namespace no registered container uses (a process can
//! make namespaces at will, so they cannot each have a share).
//!
//! The named limits (documented in docs/ARCHITECTURE.md, section 5):
//! - [`PENDING_PER_CONTAINER`] handshakes in progress per registered container,
//!   [`PENDING_UNREGISTERED`] for all unregistered namespaces together; when a source's share is
//!   full, its oldest pending connection is dropped (refused as busy), never another source's;
//! - [`ATTACHMENTS_PER_CONTAINER`] attachments (attached shim processes, both kinds) per
//!   container; more are refused as busy.

use crate::shard::AttachedTable;
use freeflow_proto::identity::NetnsId;
use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long a connected shim may take to send its hello.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(2);
/// Handshakes in progress at once from one registered container. A shim sends its hello right
/// after connecting, so a well-behaved container rarely has more than a few.
pub const PENDING_PER_CONTAINER: usize = 32;
/// Handshakes in progress at once from all unregistered namespaces together: they are only
/// ever refused, the share just lets them hear why.
pub const PENDING_UNREGISTERED: usize = 16;
/// Attachments one container may hold: each holds at least its connection (a verbs one also
/// its region, memory file and queue files), so this bounds the router's descriptors too.
pub const ATTACHMENTS_PER_CONTAINER: usize = 1024;

/// Where an attach connection comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The registered container that uses this network namespace (when the connection came).
    Registered(NetnsId),
    /// Any namespace no registered container uses.
    Unregistered,
}

impl Source {
    /// How many handshakes this source may have in progress.
    pub fn pending_share(self) -> usize {
        match self {
            Source::Registered(_) => PENDING_PER_CONTAINER,
            Source::Unregistered => PENDING_UNREGISTERED,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Registered(ns) => write!(f, "net:[{}]", ns.ino),
            Source::Unregistered => f.write_str("unregistered namespaces"),
        }
    }
}

/// An accepted connection whose hello has not come yet, and who sent it.
#[derive(Debug)]
pub struct Pending {
    pub conn: OwnedFd,
    pub source: Source,
    pub pid: i32,
    pub netns: NetnsId,
    /// Set once, at accept: waiting again (a spurious wake-up) does not extend it.
    pub deadline: Instant,
}

/// The handshakes in progress, each source within its share.
#[derive(Debug, Default)]
pub struct PendingHandshakes {
    entries: Vec<Pending>,
    counts: HashMap<Source, usize>,
}

impl PendingHandshakes {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The connections, in the order [`PendingHandshakes::take`] indexes them.
    pub fn conns(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.entries.iter().map(|p| p.conn.as_fd())
    }

    /// How many handshakes `source` has in progress.
    pub fn count_of(&self, source: Source) -> usize {
        self.counts.get(&source).copied().unwrap_or(0)
    }

    /// Adds `pending` within its source's share. If the share was full, the source's oldest
    /// pending connection makes room and is returned, for the caller to refuse.
    pub fn admit(&mut self, pending: Pending) -> Option<Pending> {
        let source = pending.source;
        let evicted = if self.count_of(source) >= source.pending_share() {
            self.entries
                .iter()
                .enumerate()
                .filter(|(_, p)| p.source == source)
                .min_by_key(|(_, p)| p.deadline)
                .map(|(i, _)| i)
                .map(|i| self.take(i))
        } else {
            None
        };
        *self.counts.entry(source).or_default() += 1;
        self.entries.push(pending);
        evicted
    }

    /// Removes and returns the entry at `index` (of [`PendingHandshakes::conns`]); the last
    /// entry takes its place, so walk indices backwards when taking several.
    pub fn take(&mut self, index: usize) -> Pending {
        let pending = self.entries.swap_remove(index);
        self.forget(pending.source);
        pending
    }

    /// Removes and returns the connections whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Pending> {
        let mut expired = Vec::new();
        for i in (0..self.entries.len()).rev() {
            if self.entries[i].deadline <= now {
                expired.push(self.take(i));
            }
        }
        expired
    }

    /// The earliest deadline of a pending connection.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.iter().map(|p| p.deadline).min()
    }

    fn forget(&mut self, source: Source) {
        if let Some(n) = self.counts.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&source);
            }
        }
    }
}

/// `Err(held)` when container `name` holds [`ATTACHMENTS_PER_CONTAINER`] attachments already.
pub fn attachment_room(attached: &AttachedTable, name: &str) -> Result<(), usize> {
    let held = attached
        .lock()
        .map(|t| t.values().filter(|a| a.container == name).count())
        .unwrap_or(0);
    if held >= ATTACHMENTS_PER_CONTAINER {
        Err(held)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freeflow_proto::control::AttachedStatus;
    use std::sync::{Arc, Mutex};

    fn ns(ino: u64) -> NetnsId {
        NetnsId { dev: 4, ino }
    }

    fn pending(source: Source, at: Instant) -> Pending {
        Pending {
            conn: OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
            source,
            pid: 1,
            netns: ns(0),
            deadline: at + HELLO_DEADLINE,
        }
    }

    #[test]
    fn a_flood_fills_only_its_own_share_and_evicts_its_own_oldest() {
        let (flood, victim) = (Source::Registered(ns(1)), Source::Registered(ns(2)));
        let start = Instant::now();
        let mut table = PendingHandshakes::default();
        table.admit(pending(victim, start));
        // The flood: ten times its share, each newer than the last.
        for i in 0..10 * PENDING_PER_CONTAINER {
            let at = start + Duration::from_millis(i as u64 + 1);
            let evicted = table.admit(pending(flood, at));
            if i < PENDING_PER_CONTAINER {
                assert!(evicted.is_none(), "within the share at {i}");
            } else {
                let evicted = evicted.expect("the share is full");
                assert_eq!(evicted.source, flood, "only the flood's own connections go");
                // The oldest of the flood: the one admitted a share ago.
                let oldest = i - PENDING_PER_CONTAINER;
                assert_eq!(
                    evicted.deadline,
                    start + Duration::from_millis(oldest as u64 + 1) + HELLO_DEADLINE
                );
            }
        }
        assert_eq!(table.count_of(flood), PENDING_PER_CONTAINER);
        assert_eq!(table.count_of(victim), 1);
        assert_eq!(table.len(), PENDING_PER_CONTAINER + 1);
        // Another container still gets its whole share.
        let other = Source::Registered(ns(3));
        for _ in 0..PENDING_PER_CONTAINER {
            assert!(table.admit(pending(other, start)).is_none());
        }
        assert_eq!(table.count_of(victim), 1);
    }

    #[test]
    fn unregistered_namespaces_share_one_smaller_bucket() {
        let mut table = PendingHandshakes::default();
        let now = Instant::now();
        let evicted: usize = (0..3 * PENDING_UNREGISTERED)
            .filter_map(|_| table.admit(pending(Source::Unregistered, now)))
            .count();
        assert_eq!(evicted, 2 * PENDING_UNREGISTERED);
        assert_eq!(table.count_of(Source::Unregistered), PENDING_UNREGISTERED);
        const { assert!(PENDING_UNREGISTERED <= PENDING_PER_CONTAINER) };
        assert!(table
            .admit(pending(Source::Registered(ns(9)), now))
            .is_none());
    }

    #[test]
    fn taking_and_expiring_give_the_share_back() {
        let source = Source::Registered(ns(1));
        let start = Instant::now();
        let mut table = PendingHandshakes::default();
        for i in 0..4u64 {
            table.admit(pending(source, start + Duration::from_secs(i)));
        }
        let taken = table.take(0);
        assert_eq!(taken.source, source);
        assert_eq!(table.count_of(source), 3);
        assert_eq!(
            table.next_deadline(),
            Some(start + Duration::from_secs(1) + HELLO_DEADLINE)
        );
        // Deadlines 1+2 and 2+2 s have passed at 4.5 s; 3+2 has not.
        let expired = table.expire(start + Duration::from_millis(4500));
        assert_eq!(expired.len(), 2);
        assert_eq!(table.count_of(source), 1);
        assert_eq!(table.conns().count(), 1);
        table.expire(start + Duration::from_secs(60));
        assert_eq!((table.len(), table.count_of(source)), (0, 0));
        assert!(table.counts.is_empty(), "no empty counters left behind");
    }

    #[test]
    fn a_container_at_its_attachment_share_is_refused_and_others_are_not() {
        let attached: AttachedTable = Arc::new(Mutex::new(Default::default()));
        let add = |id: u32, container: &str| {
            attached.lock().unwrap().insert(
                id,
                AttachedStatus {
                    id,
                    container: container.into(),
                    pid: 1,
                    shard: None,
                    kind: "socket".into(),
                },
            );
        };
        for id in 0..ATTACHMENTS_PER_CONTAINER as u32 - 1 {
            add(id, "flood");
        }
        add(u32::MAX, "web");
        assert_eq!(attachment_room(&attached, "flood"), Ok(()));
        add(u32::MAX - 1, "flood");
        assert_eq!(
            attachment_room(&attached, "flood"),
            Err(ATTACHMENTS_PER_CONTAINER)
        );
        assert_eq!(attachment_room(&attached, "web"), Ok(()));
        attached.lock().unwrap().remove(&0);
        assert_eq!(attachment_room(&attached, "flood"), Ok(()));
    }
}
