//! Requests and replies on the one router connection of a process, several threads at a time.
//!
//! A request is sent whole (SOCK_SEQPACKET) under the short session lock and registered by its
//! sequence number. Then its thread waits: one waiting thread at a time holds the reader role
//! and reads the connection outside the lock, one message at a time; under the lock it applies
//! a notice (in order: only the reader reads) or hands a reply to the thread it is for (its
//! slot, and a futex wake). A reader whose own reply came hands the role to another waiter.
//! Each waiter keeps its own deadline; a late reply finds no waiter and is undone (`absorb`).

use super::{
    attached, config, debug, Attached, Notices, RateLimited, RouterLink, Unanswered, Unavailable,
    REATTACH_INTERVAL, RESOLVE_GRACE, SEQ, SESSION,
};
use crate::real;
use crate::state;
use freeflow_proto::doorbell::{futex_wait, futex_wake};
use freeflow_proto::fdpass;
use freeflow_proto::sockmsg::{
    FromRouter, SockOp, SockReply, SockRequest, SockStatus, SOCKMSG_LEN,
};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

/// Requests one process has outstanding on its router connection at most; more threads wait
/// for a slot. Not 64 (the router's batch per turn): at 400 threads connecting at once, the 336
/// waiting for a slot each took a futex wake-up and a switch per request; with 256 the client's
/// CPU per request at 400 clients came down by about 10-40 µs (docs/tcp-setup.md). The
/// replies may then outgrow the socket buffer (about 270 messages) when the reader lags: the
/// router keeps them in order until there is room, and skips notices past 3/8 of the buffer
/// (the process resolves its accepts instead).
const MAX_IN_FLIGHT: usize = 256;
/// How often a thread waiting for room in a full socket buffer looks again without being
/// woken (the buffer frees without telling anyone).
const BUFFER_RECHECK: std::time::Duration = std::time::Duration::from_millis(2);
/// How often a thread waiting for one of the [`MAX_IN_FLIGHT`] slots looks again without being
/// woken. Every request that finishes wakes a waiter, so this only bounds a wake-up lost to a
/// waiter that gave up meanwhile. Not 2 ms: with hundreds of threads waiting (a server with a
/// connection per request and 400 clients), rechecks that often were tens of thousands of
/// wake-ups a second, each taking the session lock, and the connects queued behind them.
const SLOT_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// The debug lines of requests that fall back to the normal path, at most one per
/// [`RateLimited`] period each: waiting out a slot (or a full socket buffer), and a router
/// that did not answer.
static NO_SLOT: RateLimited = RateLimited::new();
static NO_ANSWER: RateLimited = RateLimited::new();

/// A waiting thread's wake-up word: it sleeps while `WAITING`.
const WAITING: u32 = 0;
/// Its reply is in its slot, or the session is gone (no slot): it looks.
const READY: u32 = 1;
/// The reader left: it may take the role.
const NUDGED: u32 = 2;

/// A request sent and not yet answered: how to wake its thread, and its reply once read.
pub(super) struct Pending {
    wake: Arc<AtomicU32>,
    reply: Option<(SockReply, Option<OwnedFd>)>,
}

/// Why an exchange got no reply.
pub(super) enum Failure {
    /// Nothing within the time allowed: the router is stopped or wedged.
    TimedOut,
    /// The connection failed or the router broke the protocol.
    Broken(String),
}

/// Sends `request` and waits for the reply and the socket that may come with it.
pub fn call(request: SockRequest) -> Result<(SockReply, Option<OwnedFd>), Unavailable> {
    call_passing_all(request, &[])
}

/// As [`call`], passing `fd` to the router with the request.
pub fn call_passing(
    request: SockRequest,
    fd: BorrowedFd<'_>,
) -> Result<(SockReply, Option<OwnedFd>), Unavailable> {
    call_passing_all(request, &[fd])
}

/// As [`call`], passing `passing` with the request.
pub(super) fn call_passing_all(
    mut request: SockRequest,
    passing: &[BorrowedFd<'_>],
) -> Result<(SockReply, Option<OwnedFd>), Unavailable> {
    let wake = Arc::new(AtomicU32::new(WAITING));
    // A request that finds the session full waits for a slot, at most the router timeout (the
    // router answers the requests ahead of it in microseconds each, or it is wedged).
    let give_up_at = Instant::now() + config().router_timeout;
    let mut waited = false;
    let (session, deadline) = loop {
        let mut guard = SESSION.lock();
        let attached = attached(&mut guard);
        // Still in line: it woke to look again, not because a request finished.
        let in_line = attached.slot_waiters.iter().any(|w| Arc::ptr_eq(w, &wake));
        let sent = send(attached, &mut request, passing, &wake);
        let give_up = Instant::now() >= give_up_at;
        if in_line && (give_up || !matches!(sent, Err(Sending::Full(_)))) {
            attached.slot_waiters.retain(|w| !Arc::ptr_eq(w, &wake));
        }
        match sent {
            Ok(sent) => break sent,
            Err(Sending::Failed(why)) => return Err(why),
            Err(Sending::Full(why)) => {
                if give_up {
                    // Every thread of a loaded server can come here at once: one line.
                    NO_SLOT.debug(format_args!(
                        "no room on the router connection for {:?} within {:?} ({}); the \
                         normal path (without Freeflow)",
                        request.op,
                        config().router_timeout,
                        match why {
                            Full::Slots => "every request slot taken",
                            Full::Buffer => "its socket buffer full",
                        }
                    ));
                    return Err(Unavailable::Wedged);
                }
                wake.store(WAITING, Ordering::Release);
                match (in_line, waited) {
                    (true, _) => {}
                    // Woken by a finished request, but a thread that had not waited took the
                    // slot first: this one is next, not last (else it could wait out its
                    // whole time behind newcomers).
                    (false, true) => attached.slot_waiters.push_front(wake.clone()),
                    (false, false) => attached.slot_waiters.push_back(wake.clone()),
                }
                waited = true;
                drop(guard);
                // Woken when a request ahead of it is done; rechecked anyway after a while (a
                // full socket buffer frees without telling anyone).
                let recheck = match why {
                    Full::Slots => SLOT_RECHECK,
                    Full::Buffer => BUFFER_RECHECK,
                };
                let left = give_up_at.saturating_duration_since(Instant::now());
                futex_wait(&wake, WAITING, Some(recheck.min(left)));
            }
        }
    };
    wait_for_reply(&request, &session, &wake, deadline)
}

/// Why a request was not sent.
enum Sending {
    /// As many requests as the session takes are outstanding, or its socket buffer is full:
    /// wait for one to finish.
    Full(Full),
    /// The caller takes the normal path.
    Failed(Unavailable),
}

/// What is full when a request cannot be sent yet.
#[derive(Clone, Copy)]
enum Full {
    /// [`MAX_IN_FLIGHT`] requests are outstanding: the next to finish wakes a waiter.
    Slots,
    /// The connection's socket buffer: it frees without a wake-up.
    Buffer,
}

/// Sends `request` (numbering it) and registers it as pending: the session it went on and the
/// deadline of its reply. A wedged router (an earlier request unanswered) is not asked. Never
/// blocks (the session lock is held): a full session is [`Sending::Full`].
fn send(
    attached: &mut Attached,
    request: &mut SockRequest,
    passing: &[BorrowedFd<'_>],
    wake: &Arc<AtomicU32>,
) -> Result<(Weak<RouterLink>, Instant), Sending> {
    if !attached.unanswered.is_empty() {
        // The router may have come back: its late replies are waiting.
        attached.drain();
        if !attached.unanswered.is_empty() && Instant::now() < attached.retry_at {
            return Err(Sending::Failed(Unavailable::Wedged));
        }
    }
    let Some(session) = attached.session.clone() else {
        return Err(Sending::Failed(Unavailable::NotAttached));
    };
    if attached.pending.len() >= MAX_IN_FLIGHT {
        return Err(Sending::Full(Full::Slots));
    }
    request.seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut wait = config().router_timeout;
    if request.op == SockOp::Resolve {
        wait += RESOLVE_GRACE;
    }
    loop {
        match fdpass::try_send_with_fds(session.conn.as_fd(), &request.encode(), passing) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(Sending::Full(Full::Buffer))
            }
            Err(e) => {
                let why = attached.failed(request, Failure::Broken(e.to_string()));
                return Err(Sending::Failed(why));
            }
            Ok(_) => break,
        }
    }
    let pending = Pending {
        wake: wake.clone(),
        reply: None,
    };
    attached.pending.insert(request.seq, pending);
    // Waiting threads hold no reference to the session, only the reader (a thread cut off by a
    // fork would keep the connection open in the child).
    Ok((Arc::downgrade(&session), Instant::now() + wait))
}

/// Waits until `deadline` for the reply to `request` (a reader blocked in a receive returns at
/// most one router timeout past it: see [`receive`]), reading the session while no other
/// waiting thread does.
fn wait_for_reply(
    request: &SockRequest,
    session: &Weak<RouterLink>,
    wake: &AtomicU32,
    deadline: Instant,
) -> Result<(SockReply, Option<OwnedFd>), Unavailable> {
    let seq = request.seq;
    loop {
        let mut guard = SESSION.lock();
        let Some(attached) = current(&mut guard, session) else {
            return Err(Unavailable::Broken);
        };
        let Some(slot) = attached.pending.get_mut(&seq) else {
            // The session broke meanwhile (its pending requests were let go).
            attached.hand_over_reading();
            return Err(Unavailable::Broken);
        };
        if let Some(answer) = slot.reply.take() {
            attached.finish(seq);
            // Answered: the requests sent before it (requests are numbered as they are sent)
            // were answered first or are lost.
            attached
                .unanswered
                .retain(|u| u.seq.wrapping_sub(seq) as i32 > 0);
            attached.backoff = REATTACH_INTERVAL;
            attached.hand_over_reading();
            return Ok(answer);
        }
        if Instant::now() >= deadline {
            attached.finish(seq);
            let why = attached.failed(request, Failure::TimedOut);
            attached.hand_over_reading();
            return Err(why);
        }
        if attached.reading {
            wake.store(WAITING, Ordering::Release);
            drop(guard);
            futex_wait(
                wake,
                WAITING,
                Some(deadline.saturating_duration_since(Instant::now())),
            );
            continue;
        }
        let Some(conn) = attached.session.clone() else {
            return Err(Unavailable::Broken);
        };
        attached.reading = true;
        drop(guard);
        let (messages, failure) = read_batch(conn.conn.as_fd(), deadline);
        drop(conn);
        let mut guard = SESSION.lock();
        let Some(attached) = current(&mut guard, session) else {
            // Replaced while we read (its fds, if any, close here): ours was let go with it.
            return Err(Unavailable::Broken);
        };
        attached.reading = false;
        for (msg, fds) in messages {
            attached.dispatch(msg, fds);
        }
        if let Some(Failure::Broken(why)) = failure {
            return Err(attached.failed(request, Failure::Broken(why)));
        }
    }
}

/// This process's attachment if it still uses `session`.
fn current<'a>(
    guard: &'a mut Option<Attached>,
    session: &Weak<RouterLink>,
) -> Option<&'a mut Attached> {
    let pid = real::getpid();
    guard.as_mut().filter(|a| {
        a.pid == pid
            && a.session
                .as_ref()
                .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), session.as_ptr()))
    })
}

/// The most messages a reader takes in per turn (replies come in bursts when many threads of
/// the process wait: one lock for the lot).
const READ_BATCH: usize = 16;

/// Receives the router's next message, waiting until `deadline`, and those already waiting
/// behind it: what was read, in order, and why reading stopped if it failed.
fn read_batch(
    conn: BorrowedFd<'_>,
    deadline: Instant,
) -> (Vec<(FromRouter, Vec<OwnedFd>)>, Option<Failure>) {
    let mut messages = Vec::new();
    let first = read_one(|buf| receive(conn, buf, deadline));
    match first {
        Ok(Some(m)) => messages.push(m),
        Ok(None) => return (messages, Some(Failure::TimedOut)),
        Err(f) => return (messages, Some(f)),
    }
    while messages.len() < READ_BATCH {
        let next = read_one(|buf| fdpass::recv_with_fds(conn, buf, libc::MSG_DONTWAIT));
        match next {
            Ok(Some(m)) => messages.push(m),
            Ok(None) => break,
            Err(f) => return (messages, Some(f)),
        }
    }
    (messages, None)
}

/// Receives (with `recv`) and decodes one message from the router; `None` if none came
/// (`WouldBlock`, `TimedOut` or `Interrupted`).
fn read_one(
    recv: impl FnOnce(&mut [u8]) -> std::io::Result<fdpass::Received>,
) -> Result<Option<(FromRouter, Vec<OwnedFd>)>, Failure> {
    let mut buf = [0u8; SOCKMSG_LEN + 1];
    let got = match recv(&mut buf) {
        Ok(got) => got,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::Interrupted
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(Failure::Broken(e.to_string())),
    };
    if got.len == 0 {
        return Err(Failure::Broken("router closed the connection".into()));
    }
    if got.len != SOCKMSG_LEN || got.truncated {
        return Err(Failure::Broken("malformed message from the router".into()));
    }
    let msg = FromRouter::decode(&buf[..got.len]).map_err(|e| Failure::Broken(e.to_string()))?;
    Ok(Some((msg, got.fds)))
}

impl Attached {
    /// What the failure of `request` means for the session; the caller takes the normal path.
    pub(super) fn failed(&mut self, request: &SockRequest, failure: Failure) -> Unavailable {
        match failure {
            Failure::TimedOut => {
                NO_ANSWER.debug(format_args!(
                    "router did not answer {:?} within {:?}; normal path",
                    request.op,
                    config().router_timeout
                ));
                self.gave_up(request);
                Unavailable::Wedged
            }
            Failure::Broken(why) => {
                // The router went away or misbehaved: stop using it (new connections take the
                // normal path; established ones are host sockets and do not need it).
                debug(format_args!("router unavailable: {why}"));
                self.break_session();
                Unavailable::Broken
            }
        }
    }

    /// Stops using the session: every thread waiting on it is woken and takes the normal path.
    pub(super) fn break_session(&mut self) {
        self.session = None;
        self.retry_at = Instant::now() + REATTACH_INTERVAL;
        self.let_go_of_pending();
    }

    /// Forgets the requests waiting for replies on this session, waking their threads, and the
    /// threads waiting to send one (they find the session gone).
    pub(super) fn let_go_of_pending(&mut self) {
        for (_, pending) in self.pending.drain() {
            pending.wake.store(READY, Ordering::Release);
            futex_wake(&pending.wake, 1);
        }
        for wake in self.slot_waiters.drain(..) {
            wake.store(NUDGED, Ordering::Release);
            futex_wake(&wake, 1);
        }
        self.reading = false;
    }

    /// Request `seq` is done with (answered or given up on): its slot goes to a thread waiting
    /// for one.
    fn finish(&mut self, seq: u32) {
        self.pending.remove(&seq);
        if let Some(wake) = self.slot_waiters.pop_front() {
            wake.store(NUDGED, Ordering::Release);
            futex_wake(&wake, 1);
        }
    }

    /// When nobody reads the session: wakes one thread still waiting, to read it.
    pub(super) fn hand_over_reading(&mut self) {
        if self.reading {
            return;
        }
        if let Some(next) = self.pending.values().find(|p| p.reply.is_none()) {
            next.wake.store(NUDGED, Ordering::Release);
            futex_wake(&next.wake, 1);
        }
    }

    /// Takes in a message read from the session: a reply goes to the thread that waits for it;
    /// anything else to [`absorb`].
    pub(super) fn dispatch(&mut self, msg: FromRouter, fds: Vec<OwnedFd>) {
        if let FromRouter::Reply(reply) = &msg {
            if let Some(pending) = self.pending.get_mut(&reply.seq) {
                pending.reply = Some((*reply, fds.into_iter().next()));
                pending.wake.store(READY, Ordering::Release);
                futex_wake(&pending.wake, 1);
                return;
            }
        }
        let Attached {
            session,
            notices,
            unanswered,
            ..
        } = self;
        if let Some(session) = session.as_ref() {
            absorb(session.conn.as_fd(), notices, unanswered, msg, fds);
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // In a forked child, an attachment inherited while a thread of the parent read it: that
        // thread's reference to the session did not come along and is never dropped, so the
        // child's copy of the connection is closed here (the router must see the parent's
        // session end when the parent's does).
        if !self.reading || self.pid == real::getpid() {
            return;
        }
        if let Some(session) = self.session.take() {
            if let Err(shared) = Arc::try_unwrap(session) {
                let raw = shared.conn.as_raw_fd();
                drop(shared);
                if !crate::private::close_orphan(raw) {
                    real::close(raw);
                }
            }
        }
    }
}

/// Takes in a message from the router that no thread waits for: a notice is kept; a reply is
/// late (its request was given up on, or is an Unlisten sent here): its socket is closed, and a
/// listen that the router set up after all is taken back (the application listens in the
/// container instead, on the socket the router got with the request).
fn absorb(
    conn: BorrowedFd<'_>,
    notices: &mut Notices,
    unanswered: &mut Vec<Unanswered>,
    msg: FromRouter,
    fds: Vec<OwnedFd>,
) {
    drop(fds);
    let reply = match msg {
        FromRouter::Notice(n) => return notices.remember(n),
        FromRouter::Reply(reply) => reply,
    };
    let Some(at) = unanswered.iter().position(|u| u.seq == reply.seq) else {
        return;
    };
    let given_up = unanswered.remove(at);
    debug(format_args!(
        "late reply to {:?} (request {}) dropped",
        given_up.op, given_up.seq
    ));
    let listening = (reply.ip, reply.port);
    if given_up.op == SockOp::Listen
        && reply.status == SockStatus::Ok
        && !state::holds_listener(listening)
    {
        let unlisten = SockRequest {
            op: SockOp::Unlisten,
            flags: 0,
            seq: SEQ.fetch_add(1, Ordering::Relaxed),
            ip: reply.ip,
            port: given_up.port,
            backlog: 0,
        };
        // Its reply is dropped as late when it comes.
        let _ = fdpass::send_with_fds(conn, &unlisten.encode(), &[]);
    }
}

/// Receives the router's next message: polls for up to `FREEFLOW_SPIN_US` (the router answers
/// in a few microseconds, and being woken can cost more than that), then blocks until
/// `deadline` (`TimedOut` after it). A blocking receive ends at the latest after the router
/// timeout (SO_RCVTIMEO, set at attach), so the wait ends at most that long after `deadline`
/// even when signals keep interrupting it; no system call is added to wait.
fn receive(
    conn: BorrowedFd<'_>,
    buf: &mut [u8],
    deadline: Instant,
) -> std::io::Result<fdpass::Received> {
    let spin = config().reply_spin;
    let start = Instant::now();
    while start.elapsed() < spin {
        match fdpass::recv_with_fds(conn, buf, libc::MSG_DONTWAIT) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            other => return other,
        }
    }
    loop {
        match fdpass::recv_with_fds(conn, buf, 0) {
            // A signal in the application, or SO_RCVTIMEO: wait on while there is time left.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) =>
            {
                if Instant::now() >= deadline {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
            }
            other => return other,
        }
    }
}
