//! Clients that reach an accelerated listener's overlay address without Freeflow (a container
//! not using the shim, or a host outside the cluster). They wait in the kernel's accept queue of
//! the application's own overlay listener, which the router holds but never accepts from: it
//! reads the queue's length (TCP_INFO) and keeps one "doorbell" rung per waiting client, a
//! loopback connection to the host listener. The application's accept gets the doorbell; the
//! shim recognises it (its peer is `127.0.0.1`, which no router announces), closes it and
//! accepts the client from its own duplicate of the overlay listener, with no round trip: the
//! client's connection never passes through the router.
//!
//! The shim closes an answered doorbell, which makes the router's end readable. The router
//! is woken by that only when it must ring again: while a listener has clients without a
//! doorbell (more than its share, say), its oldest doorbell is polled (doorbells are answered
//! in the order they were rung: the host listener's accept queue is first in, first out).
//! Otherwise every waiting client has a doorbell, and the answered ones are taken (closed,
//! counted) at the next arrival or check: a relayed client wakes the router once, not twice.
//! A listener with no doorbell rung has its overlay listener polled instead (readable: clients
//! wait); an edge-triggered epoll instance (the arrival watch, itself polled) reports clients
//! that come while doorbells are rung.
//!
//! What relaying costs the router, and how it is bounded: one descriptor per doorbell rung,
//! and one per overlay listener in the arrival watch.
//! Doorbells per listener are at most its waiting clients, within its share (its backlog, within
//! [`MAX_RELAYS_PER_LISTENER`]), per container and in all. Further clients wait in the overlay
//! listener's accept queue, as for any server that accepts slowly; none is turned away. No host
//! port is used: doorbells come from the loopback address and close with a reset (no
//! TIME_WAIT).

use super::endpoint::{HostEndpoint, OverlayEndpoint};
use super::{ok, TcpService};
use crate::sys::{self, ArrivalWatch, Untrusted};
use freeflow_os::poll::{self, PollFd};
use freeflow_proto::sockmsg::SockReply;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// How long a doorbell waits for the application's accept before the router rings again.
const RELAY_TTL: Duration = Duration::from_secs(60);
/// How often doorbells are checked (their time, their listener still there).
const EXPIRE_EVERY: Duration = Duration::from_millis(100);
/// How long the clients of a listener whose processes take them themselves (`Accepts`) are
/// left to those processes before the router rings for the ones still waiting: a process
/// that stopped accepting, or is busy, must not leave them waiting without bound. Arrivals in
/// that time do not wake the router. `FREEFLOW_ACCEPT_GRACE_MS` sets another (tests that must
/// tell a client the process took from one a doorbell brought, whatever the machine's load).
pub(super) const ACCEPT_GRACE: Duration = Duration::from_millis(20);

/// The grace in force: [`ACCEPT_GRACE`], or `FREEFLOW_ACCEPT_GRACE_MS` (at most a minute, so
/// that no client waits without bound).
fn accept_grace() -> Duration {
    static GRACE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *GRACE.get_or_init(|| grace_from(std::env::var("FREEFLOW_ACCEPT_GRACE_MS").ok().as_deref()))
}

/// The grace `FREEFLOW_ACCEPT_GRACE_MS` asks for: milliseconds, up to a minute; the default
/// when unset or unreadable.
pub(super) fn grace_from(setting: Option<&str>) -> Duration {
    setting
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map_or(ACCEPT_GRACE, |ms| Duration::from_millis(ms.min(60_000)))
}
/// Doorbells rung for one listener per turn of the control loop: the turn stays short, and
/// each answered doorbell rings again for the clients still waiting.
const RING_BATCH: usize = 64;
/// How many of a listener's doorbells, oldest first, one look for answered ones covers (one
/// `poll`). A listener with more rung is watched by its oldest doorbell (answered ones further
/// on could hide clients without a doorbell).
const REAP_WINDOW: usize = RING_BATCH + 1;
/// How long a listener's overlay listener is not polled after ringing for it failed (it would
/// stay readable, and the control loop would spin).
const RING_BACKOFF: Duration = Duration::from_millis(100);
/// Doorbells rung for one listener at most, whatever its backlog (the kernel's own cap on a
/// backlog, `net.core.somaxconn`, is 4096 by default).
pub(super) const MAX_RELAYS_PER_LISTENER: usize = 1024;
/// The least share of a listener with a small backlog: its doorbells may wait in the host
/// listener's queue a little longer than the application's backlog says.
const MIN_RELAYS_PER_LISTENER: usize = 16;
/// Doorbells for all the listeners of one container together: a container with many
/// listeners fills a quarter of the pool at most, never the whole of it.
pub(super) const MAX_RELAYS_PER_CONTAINER: usize = 1024;
/// Doorbells rung in all (each holds one descriptor of the router).
pub(super) const MAX_RELAYS: usize = 4096;
/// Where doorbells come from: no router announces it, and its ports are not the host
/// address's.
pub(super) const DOORBELL_SOURCE: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The share of doorbells of a listener whose application asked for `backlog` (0: the
/// kernel's default, or unknown).
pub(super) fn listener_share(backlog: u32) -> usize {
    match backlog as usize {
        0 => MAX_RELAYS_PER_LISTENER,
        n => n.clamp(MIN_RELAYS_PER_LISTENER, MAX_RELAYS_PER_LISTENER),
    }
}

/// A loopback connection to a host listener, rung for one client waiting on its overlay
/// listener.
struct Doorbell {
    socket: OwnedFd,
    since: Instant,
}

#[derive(Default)]
pub(super) struct Relays {
    /// Doorbells rung for each listener and not answered yet, oldest first.
    rung: HashMap<OverlayEndpoint, VecDeque<Doorbell>>,
    /// How many doorbells each container (overlay address) has, and all.
    by_container: HashMap<Ipv4Addr, usize>,
    total: usize,
    /// When the doorbells are next checked.
    next_check: Option<Instant>,
    /// Overlay listeners and doorbells found readable, served at the end of the control
    /// loop's turn.
    readable: Vec<RawFd>,
    /// Listeners for which ringing failed, not polled until then.
    backoff: HashMap<OverlayEndpoint, Instant>,
    /// Listeners that had clients left without a doorbell at their last ring (beyond their
    /// share or the turn's batch), or more doorbells than [`REAP_WINDOW`]: their oldest
    /// doorbell is polled, so that its answer wakes the router to ring again. The others'
    /// answers wait for the next arrival or check.
    starved: HashSet<OverlayEndpoint>,
    /// The overlay listeners watched for arrivals, edge-triggered: clients that come while a
    /// listener has doorbells rung (its overlay listener, readable, is not polled then) get
    /// theirs at once.
    watch: Option<ArrivalWatch>,
    watched: HashMap<OverlayEndpoint, Watched>,
    next_token: u64,
    /// Listeners whose processes take their clients themselves, with arrivals since the last
    /// look: out of the arrival watch until the time given, when the router rings for the
    /// clients still waiting and watches again.
    grace: HashMap<OverlayEndpoint, Instant>,
}

/// An overlay listener in the arrival watch, by a duplicate of the router's (so that it can be
/// taken out of the watch whatever happens to the listener's).
struct Watched {
    socket: Option<Untrusted>,
    inode: u64,
    token: u64,
}

impl Watched {
    fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_ref().expect("present until drop").as_fd()
    }
}

impl Drop for Watched {
    /// Closed at once (not on the closer thread), like the listener's own duplicate: once the
    /// router has let go of an overlay listener, it holds no descriptor of it, so the port is
    /// free in the container when the router answers.
    fn drop(&mut self) {
        if let Some(socket) = self.socket.take() {
            socket.close_if_listening();
        }
    }
}

impl Relays {
    fn push(&mut self, listener: OverlayEndpoint, doorbell: Doorbell) {
        self.next_check
            .get_or_insert(doorbell.since + EXPIRE_EVERY.min(RELAY_TTL));
        *self.by_container.entry(listener.ip()).or_default() += 1;
        self.total += 1;
        self.rung.entry(listener).or_default().push_back(doorbell);
    }

    /// Forgets (closes) the oldest doorbell of `listener`.
    fn pop(&mut self, listener: OverlayEndpoint) -> Option<Doorbell> {
        self.remove(listener, 0)
    }

    /// Forgets (closes) doorbell `index` (0: the oldest) of `listener`.
    fn remove(&mut self, listener: OverlayEndpoint, index: usize) -> Option<Doorbell> {
        let queue = self.rung.get_mut(&listener)?;
        let doorbell = queue.remove(index)?;
        if queue.is_empty() {
            self.rung.remove(&listener);
            self.starved.remove(&listener);
        }
        self.total = self.total.saturating_sub(1);
        if let Some(count) = self.by_container.get_mut(&listener.ip()) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.by_container.remove(&listener.ip());
            }
        }
        Some(doorbell)
    }

    fn forget_listener(&mut self, listener: OverlayEndpoint) {
        while self.pop(listener).is_some() {}
        self.backoff.remove(&listener);
        self.starved.remove(&listener);
    }

    /// A doorbell goes when it is answered, its time is up or its listener is gone (checked
    /// every [`EXPIRE_EVERY`]). Returns the listeners and how many of their doorbells were
    /// answered.
    pub fn expire(
        &mut self,
        now: Instant,
        listening: impl Fn(OverlayEndpoint) -> bool,
    ) -> Vec<(OverlayEndpoint, usize)> {
        let mut answered = Vec::new();
        if self.next_check.is_none_or(|at| now < at) {
            return answered;
        }
        let listeners: Vec<OverlayEndpoint> = self.rung.keys().copied().collect();
        for listener in listeners {
            // Answered before their listener went (a server that exits after its last
            // client), counted all the same.
            let gone = !listening(listener);
            let taken = match gone {
                true => self.take_all_answered(listener),
                false => self.take_answered(listener),
            };
            if taken > 0 {
                answered.push((listener, taken));
            }
            if gone {
                self.forget_listener(listener);
                continue;
            }
            while self
                .rung
                .get(&listener)
                .and_then(VecDeque::front)
                .is_some_and(|d| now.duration_since(d.since) >= RELAY_TTL)
            {
                self.pop(listener);
            }
        }
        self.backoff.retain(|_, until| *until > now);
        self.next_check =
            (self.total > 0 || !self.backoff.is_empty()).then_some(now + EXPIRE_EVERY);
        answered
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_check
            .into_iter()
            .chain(self.grace.values().copied())
            .min()
    }

    /// Leaves the clients of `listener` to its processes until `until`: its overlay listener
    /// leaves the arrival watch (no wake-up per arrival) meanwhile.
    fn pause(&mut self, listener: OverlayEndpoint, until: Instant) {
        if self.grace.contains_key(&listener) {
            return;
        }
        let (Some(watch), Some(watched)) = (self.watch.as_ref(), self.watched.get(&listener))
        else {
            return;
        };
        watch.remove(watched.socket());
        self.grace.insert(listener, until);
    }

    /// Ends the grace of `listener`: its overlay listener is watched again (an edge-triggered
    /// watch reports at once the clients waiting when it is added).
    fn resume(&mut self, listener: OverlayEndpoint) {
        if self.grace.remove(&listener).is_none() {
            return;
        }
        let (Some(watch), Some(watched)) = (self.watch.as_ref(), self.watched.get(&listener))
        else {
            return;
        };
        if watch.add(watched.socket(), watched.token).is_err() {
            // Not watched any more: polled as a listener without a watch.
            self.watched.remove(&listener);
        }
    }

    /// Whether `listener`'s arrivals are left to its processes for now (tests).
    #[cfg(test)]
    pub(super) fn in_grace(&self, listener: OverlayEndpoint) -> bool {
        self.grace.contains_key(&listener)
    }

    /// How many more doorbells `listener`, whose share is `share`, may have: within the
    /// listener's share, its container's (all listeners on the listener's overlay address)
    /// and the pool.
    pub(super) fn room_for(&self, listener: OverlayEndpoint, share: usize) -> usize {
        let held = self.pending(listener);
        let held_by_container = self.by_container.get(&listener.ip()).copied().unwrap_or(0);
        share
            .saturating_sub(held)
            .min(MAX_RELAYS_PER_CONTAINER.saturating_sub(held_by_container))
            .min(MAX_RELAYS.saturating_sub(self.total))
    }

    /// Doorbells of `listener` rung and not answered yet.
    pub(super) fn pending(&self, listener: OverlayEndpoint) -> usize {
        self.rung.get(&listener).map_or(0, VecDeque::len)
    }

    /// Forgets (closes) the answered doorbells (readable: the shim closed its end) among the
    /// oldest [`REAP_WINDOW`] of `listener`, wherever they are in it (several threads or
    /// processes accepting may answer out of order); returns how many. One `poll`.
    fn take_answered(&mut self, listener: OverlayEndpoint) -> usize {
        let Some(queue) = self.rung.get(&listener) else {
            return 0;
        };
        let mut window: Vec<PollFd<'_>> = queue
            .iter()
            .take(REAP_WINDOW)
            .map(|d| PollFd::new(d.socket.as_fd(), libc::POLLIN))
            .collect();
        if poll::poll(&mut window, Some(Duration::ZERO)).is_err() {
            return 0;
        }
        let answered: Vec<usize> = window
            .iter()
            .enumerate()
            .filter(|(_, fd)| fd.revents() != 0)
            .map(|(i, _)| i)
            .collect();
        // From the last, so that the indices before it stay.
        for &i in answered.iter().rev() {
            self.remove(listener, i);
        }
        answered.len()
    }

    /// As [`Self::take_answered`], one window after another until one has none answered.
    fn take_all_answered(&mut self, listener: OverlayEndpoint) -> usize {
        let mut all = 0;
        loop {
            // Each look takes at least one, or ends.
            match self.take_answered(listener) {
                0 => return all,
                n => all += n,
            }
        }
    }

    /// The doorbell to poll for `listener`: its oldest if it has doorbells rung and is starved
    /// (or no arrival watch reports its clients), else none.
    fn oldest_to_poll(&self, listener: OverlayEndpoint) -> Option<Option<BorrowedFd<'_>>> {
        let oldest = self.rung.get(&listener)?.front()?.socket.as_fd();
        let watched = self.watch.is_some() && self.watched.contains_key(&listener);
        // A full pool (the container's or all): an answer frees room for another listener,
        // whose overlay listener is polled only while it has room.
        let held_by_container = self.by_container.get(&listener.ip()).copied().unwrap_or(0);
        let full = held_by_container >= MAX_RELAYS_PER_CONTAINER || self.total >= MAX_RELAYS;
        Some((self.starved.contains(&listener) || !watched || full).then_some(oldest))
    }

    /// Whether the oldest doorbell of `listener` is polled (tests).
    #[cfg(test)]
    pub(super) fn polls_oldest(&self, listener: OverlayEndpoint) -> bool {
        self.oldest_to_poll(listener).flatten().is_some()
    }

    /// The oldest doorbell of `listener` (tests).
    #[cfg(test)]
    pub(super) fn oldest_for_test(&self, listener: OverlayEndpoint) -> Option<BorrowedFd<'_>> {
        Some(self.rung.get(&listener)?.front()?.socket.as_fd())
    }

    /// Holds `doorbell` as if rung for `listener` (tests of the shares).
    #[cfg(test)]
    pub(super) fn hold_for_test(&mut self, listener: OverlayEndpoint, doorbell: OwnedFd) {
        let doorbell = Doorbell {
            socket: doorbell,
            since: Instant::now(),
        };
        self.push(listener, doorbell);
    }

    /// The arrival watch's fd, once made (tests).
    #[cfg(test)]
    pub(super) fn arrival_watch_fd(&self) -> Option<RawFd> {
        self.watch.as_ref().map(|w| w.as_fd().as_raw_fd())
    }

    /// How many doorbells are rung in all (tests).
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.total
    }
}

impl TcpService {
    /// A Resolve of doorbell address `key` by container `container_ip`: the shim of a process
    /// without its own duplicate of the overlay listener (it was exec'd, or closed it) gets
    /// one, and accepts the client from it. Only the container that holds the listener gets it.
    pub(super) fn resolve_doorbell(
        &mut self,
        key: HostEndpoint,
        container_ip: Ipv4Addr,
        seq: u32,
    ) -> (SockReply, Option<OwnedFd>) {
        let refused = (SockReply::error(seq, libc::ECONNREFUSED), None);
        let Some(listener) = self
            .relays
            .rung
            .iter()
            .find(|(_, queue)| {
                // A rare request (a process without the overlay listener): the ports are read
                // here rather than kept for every doorbell.
                queue
                    .iter()
                    .any(|d| sys::local_port(&d.socket).is_ok_and(|port| port == key.port()))
            })
            .map(|(&listener, _)| listener)
        else {
            return refused;
        };
        if listener.ip() != container_ip {
            return refused;
        }
        let overlay = self.listeners.local.get(&listener).and_then(|l| {
            let overlay = l.overlay.as_ref()?;
            overlay.try_clone().ok()
        });
        match overlay {
            Some(overlay) => (ok(seq, listener), Some(overlay)),
            None => refused,
        }
    }

    /// What to poll for clients without Freeflow: for each listener, its oldest doorbell if
    /// any is rung (readable: answered), else its overlay listener if it may have more
    /// (readable: clients wait).
    pub(super) fn relay_poll_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> + '_ {
        let watch = self.relays.watch.as_ref();
        let arrivals = watch.filter(|_| !self.relays.watched.is_empty());
        let listeners = self.listeners.local.iter().filter_map(|(&key, l)| {
            if let Some(doorbell) = self.relays.oldest_to_poll(key) {
                // Doorbells rung: the oldest if its answer must wake the router, else nothing
                // (the arrival watch reports new clients).
                return doorbell;
            }
            let overlay = l.overlay.as_ref()?;
            if !l.accepting.is_empty() && self.relays.watched.contains_key(&key) {
                // Its processes take the clients; the arrival watch (or the grace's end)
                // wakes the router for those left waiting.
                return None;
            }
            let room = self.relays.room_for(key, listener_share(l.backlog)) > 0;
            (room && !self.relays.backoff.contains_key(&key)).then(|| overlay.as_fd())
        });
        arrivals
            .map(ArrivalWatch::as_fd)
            .into_iter()
            .chain(listeners)
    }

    /// Takes out of the arrival watch (and closes the router's duplicate of) every overlay
    /// listener the router no longer holds: called before a request that let go of one is
    /// answered (Listen, Relisten, Unlisten) and when a process goes, so that the container
    /// can listen on the port again at once.
    pub(super) fn unwatch_gone_overlays(&mut self) {
        let relays = &mut self.relays;
        let Some(watch) = relays.watch.as_ref() else {
            return;
        };
        let local = &self.listeners.local;
        relays.watched.retain(|key, w| {
            let overlay = local.get(key).and_then(|l| l.overlay.as_ref());
            let same = overlay.is_some_and(|o| sys::inode(o.as_fd()).ok() == Some(w.inode));
            if !same {
                watch.remove(w.socket());
            }
            same
        });
    }

    /// Keeps the arrival watch in step with the listeners: each overlay listener in it once,
    /// none that is gone or was replaced.
    fn sync_arrival_watch(&mut self) {
        if self.relays.watch.is_none() {
            match ArrivalWatch::new() {
                Ok(watch) => self.relays.watch = Some(watch),
                Err(e) => return log::warn!("tcp: no arrival watch: {e}"),
            }
        }
        // A listener replaced or let go of is taken out before its request is answered
        // (`handle`, `detach`); here only what the relay itself gave up (its overlay listener
        // gone). Compared by key, not by inode: no fstat per watched listener each turn.
        let local = &self.listeners.local;
        let given_up = self
            .relays
            .watched
            .keys()
            .any(|key| local.get(key).is_none_or(|l| l.overlay.is_none()));
        if given_up {
            self.unwatch_gone_overlays();
        }
        let relays = &mut self.relays;
        let watch = relays.watch.as_ref().expect("made above");
        let local = &self.listeners.local;
        for (&key, l) in local {
            let Some(overlay) = l.overlay.as_ref() else {
                continue;
            };
            if relays.watched.contains_key(&key) {
                continue;
            }
            let Ok(socket) = overlay.try_clone() else {
                continue;
            };
            let Ok(inode) = sys::inode(socket.as_fd()) else {
                continue;
            };
            relays.next_token += 1;
            let token = relays.next_token;
            if watch.add(socket.as_fd(), token).is_ok() {
                let socket = Some(Untrusted::new(socket));
                relays.watched.insert(
                    key,
                    Watched {
                        socket,
                        inode,
                        token,
                    },
                );
            }
        }
    }

    /// Notes that `fd` (an overlay listener or a doorbell) is readable: served at the end of
    /// the turn ([`Self::relay_readable`]), after the turn's requests are answered.
    pub(super) fn relay_later(&mut self, fd: RawFd) {
        if !self.relays.readable.contains(&fd) {
            self.relays.readable.push(fd);
        }
    }

    /// Serves the overlay listeners and doorbells found readable in this turn: the answered
    /// doorbells go first (before any new one could take the number of a readable one), then
    /// each listener is rung for its clients still without a doorbell.
    pub(super) fn relay_readable(&mut self) {
        let readable = std::mem::take(&mut self.relays.readable);
        let mut listeners = Vec::new();
        let watch_fd = self.relays.watch.as_ref().map(|w| w.as_fd().as_raw_fd());
        let now = Instant::now();
        for fd in readable {
            if Some(fd) == watch_fd {
                for key in self.arrivals() {
                    let accepting = self
                        .listeners
                        .local
                        .get(&key)
                        .is_some_and(|l| !l.accepting.is_empty());
                    if accepting {
                        // Its processes wait on the overlay listener: they take the client.
                        // (Doorbells rung at a grace's end are taken at the next one, or
                        // at the check: not a wake-up per arrival meanwhile.)
                        self.relays.pause(key, now + accept_grace());
                    } else {
                        listeners.push(key);
                    }
                }
                continue;
            }
            // An overlay listener (clients wait) or an oldest doorbell (answered): ring_for
            // takes the answered ones, then rings.
            let Some(key) = self.readable_listener(fd) else {
                continue;
            };
            if !listeners.contains(&key) {
                listeners.push(key);
            }
        }
        listeners.dedup();
        for key in listeners {
            self.ring_for(key);
        }
        self.sync_arrival_watch();
    }

    /// At the end of their grace, rings for the clients of listeners still waiting (their
    /// processes did not take them: stopped accepting, busy, or gone) and watches their
    /// arrivals again.
    pub(super) fn relay_grace_over(&mut self, now: Instant) {
        let due: Vec<OverlayEndpoint> = self
            .relays
            .grace
            .iter()
            .filter(|(_, &until)| until <= now)
            .map(|(&key, _)| key)
            .collect();
        for key in due {
            self.ring_for(key);
            self.relays.resume(key);
        }
    }

    /// The listeners that had arrivals since the last look.
    fn arrivals(&self) -> Vec<OverlayEndpoint> {
        let Some(watch) = self.relays.watch.as_ref() else {
            return Vec::new();
        };
        let tokens = watch.drain();
        self.relays
            .watched
            .iter()
            .filter(|(_, w)| tokens.contains(&w.token))
            .map(|(&key, _)| key)
            .collect()
    }

    /// Whose is readable `fd`: a listener's overlay listener, or its oldest doorbell.
    fn readable_listener(&self, fd: RawFd) -> Option<OverlayEndpoint> {
        let overlay = self.listeners.local.iter().find_map(|(&key, l)| {
            let overlay = l.overlay.as_ref()?;
            (overlay.as_raw_fd() == fd).then_some(key)
        });
        overlay.or_else(|| {
            self.relays.rung.iter().find_map(|(&key, queue)| {
                let oldest = queue.front()?;
                (oldest.socket.as_raw_fd() == fd).then_some(key)
            })
        })
    }

    /// Takes (and counts) the answered doorbells of every listener now, rather than at its
    /// next arrival or check (a status request).
    pub fn take_answered_doorbells(&mut self) {
        let listeners: Vec<OverlayEndpoint> = self.relays.rung.keys().copied().collect();
        for key in listeners {
            let answered = self.relays.take_all_answered(key);
            self.count_relayed(key, answered);
        }
    }

    /// `answered` doorbells of listener `key` were answered: clients relayed.
    pub(super) fn count_relayed(&mut self, key: OverlayEndpoint, answered: usize) {
        let tenant = self.registry.placement(key.ip()).map(|p| p.tenant.as_str());
        for _ in 0..answered {
            self.counters.relayed_to(tenant);
        }
    }

    /// Takes the answered doorbells of `key`, then rings its host listener once for each
    /// client waiting on its overlay listener without a doorbell yet, within its share and
    /// [`RING_BATCH`].
    fn ring_for(&mut self, key: OverlayEndpoint) {
        let Some(host_ip) = self.registry.host_ip() else {
            return;
        };
        if !self.listeners.local.contains_key(&key) {
            let answered = self.relays.take_all_answered(key);
            self.count_relayed(key, answered);
            return self.relays.forget_listener(key);
        }
        let answered = self.relays.take_answered(key);
        self.count_relayed(key, answered);
        let Some(listener) = self.listeners.local.get(&key) else {
            return;
        };
        if self.relays.backoff.contains_key(&key) {
            // Ringing failed a moment ago (expire lifts it): polled again after.
            return;
        }
        let Some(overlay) = listener.overlay.as_ref() else {
            return;
        };
        let share = listener_share(listener.backlog);
        let waiting = match sys::accept_queue(overlay.as_fd()) {
            Ok(Some(waiting)) => waiting as usize,
            // Shut down by the container, or failing: it would stay readable.
            Ok(None) => return self.listeners.give_up_overlay(key),
            Err(e) => {
                log::warn!("tcp: overlay listener {key} given up: {e}");
                return self.listeners.give_up_overlay(key);
            }
        };
        // A host listener the container shut down would reset every doorbell at once, and
        // each reset would ring again: back off instead.
        let host_listening = matches!(sys::accept_queue(listener.socket.as_fd()), Ok(Some(_)));
        let host_listener = HostEndpoint::new(host_ip, listener.host_port);
        let wanted = waiting
            .min(share)
            .saturating_sub(self.relays.pending(key))
            .min(self.relays.room_for(key, share))
            .min(RING_BATCH);
        for _ in 0..wanted {
            let rung = if host_listening {
                ring_doorbell(host_listener)
            } else {
                Err(io::Error::other("the host listener is not listening"))
            };
            match rung {
                Ok(doorbell) => self.relays.push(key, doorbell),
                Err(e) => {
                    log::warn!("tcp: relay for {key}: {e}");
                    let until = Instant::now() + RING_BACKOFF;
                    self.relays.backoff.insert(key, until);
                    self.relays.next_check.get_or_insert(until);
                    break;
                }
            }
        }
        // Clients left without a doorbell (or doorbells beyond one look for answers): the
        // oldest doorbell's answer must wake the router.
        let pending = self.relays.pending(key);
        if waiting > pending || pending > REAP_WINDOW {
            self.relays.starved.insert(key);
        } else {
            self.relays.starved.remove(&key);
        }
    }
}

/// Connects a doorbell to `host_listener` from the loopback address. It closes with a reset:
/// it holds no port afterwards.
fn ring_doorbell(host_listener: HostEndpoint) -> io::Result<Doorbell> {
    let socket = sys::tcp_socket(false)?;
    sys::set_linger_zero(&socket)?;
    sys::bind(&socket, DOORBELL_SOURCE, 0, false)?;
    sys::connect_nonblocking(&socket, host_listener.ip(), host_listener.port(), false)?;
    Ok(Doorbell {
        socket,
        since: Instant::now(),
    })
}

#[cfg(test)]
mod grace_tests {
    use super::{grace_from, ACCEPT_GRACE};
    use std::time::Duration;

    #[test]
    fn the_accept_grace_is_the_default_unless_set_and_at_most_a_minute() {
        assert_eq!(grace_from(None), ACCEPT_GRACE);
        assert_eq!(grace_from(Some("soon")), ACCEPT_GRACE);
        assert_eq!(grace_from(Some("-5")), ACCEPT_GRACE);
        assert_eq!(grace_from(Some(" 250 ")), Duration::from_millis(250));
        assert_eq!(grace_from(Some("99999999")), Duration::from_secs(60));
    }
}
