//! The shim's attachment to its router: configuration from the environment, a lazy attach on
//! the first overlay connect or listen, and request/reply exchanges that may carry a socket.

mod exchange;

pub use exchange::{call, call_passing};
use exchange::{call_passing_all, Pending};

use crate::forklock::ForkLock;
use crate::private::PrivateFd;
use crate::real;
use crate::state;
use freeflow_os::poll::{poll, PollFd};
use freeflow_proto::attach::{attach_socket, AttachError, Refusal, SocketSession};
use freeflow_proto::clock::monotonic_ms;
use freeflow_proto::fdpass;
use freeflow_proto::sockmsg::{
    FromRouter, NoticeMeaning, SockNotice, SockOp, SockRequest, SOCKMSG_LEN,
};
use ipnet::Ipv4Net;
use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The overlay prefix: `VNET_PREFIX`, an IPv4 CIDR prefix such as `10.32.0.0/12` (host bits
/// may be set; they are ignored).
#[derive(Debug, Clone, Copy)]
pub struct Prefix(Ipv4Net);

impl Prefix {
    /// `None` unless `s` (surrounding white space aside) is `a.b.c.d/len` with `len` at most 32.
    pub fn parse(s: &str) -> Option<Prefix> {
        s.trim().parse().ok().map(Prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.0.contains(&ip)
    }
}

/// The default of `FREEFLOW_ROUTER_TIMEOUT_MS`: the router answers in microseconds; a second
/// without an answer means it is stopped or wedged.
const DEFAULT_ROUTER_TIMEOUT_MS: u64 = 1000;

pub struct Config {
    pub prefix: Option<Prefix>,
    /// How long a request polls for its reply before sleeping (`FREEFLOW_SPIN_US`).
    pub reply_spin: Duration,
    /// How long the shim waits for the router, to attach or for a reply
    /// (`FREEFLOW_ROUTER_TIMEOUT_MS`): a stopped or wedged router costs a call this much, then
    /// the call takes the normal path.
    pub router_timeout: Duration,
    pub dir: std::path::PathBuf,
    pub debug: bool,
}

pub fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let debug = std::env::var_os("FREEFLOW_DEBUG").is_some_and(|v| !v.is_empty() && v != "0");
        let prefix = std::env::var("VNET_PREFIX").ok().and_then(|v| {
            let p = Prefix::parse(&v);
            if p.is_none() {
                eprintln!(
                    "libfsocket: VNET_PREFIX={v:?} is not an IPv4 CIDR prefix; acceleration off"
                );
            }
            p
        });
        let reply_spin = Duration::from_micros(
            std::env::var("FREEFLOW_SPIN_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        );
        let router_timeout = Duration::from_millis(
            std::env::var("FREEFLOW_ROUTER_TIMEOUT_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&ms: &u64| ms > 0)
                .unwrap_or(DEFAULT_ROUTER_TIMEOUT_MS),
        );
        Config {
            prefix,
            reply_spin,
            router_timeout,
            dir: freeflow_proto::runtime_dir(),
            debug,
        }
    })
}

pub fn debug(msg: std::fmt::Arguments<'_>) {
    if config().debug {
        eprintln!("libfsocket[{}]: {msg}", real::getpid());
    }
}

/// A debug line said at most once per [`RateLimited::EVERY`] (the first at once), with the
/// number of times it was not said since: a line that every thread of a loaded server would
/// say (hundreds of requests falling back together) stays one line.
pub(crate) struct RateLimited {
    /// When the line was last said, in ms of [`since_start_ms`] plus one (0: never).
    said_at_ms: AtomicU64,
    silenced: AtomicU64,
}

impl RateLimited {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) const fn new() -> RateLimited {
        RateLimited {
            said_at_ms: AtomicU64::new(0),
            silenced: AtomicU64::new(0),
        }
    }

    /// Says `msg` (with FREEFLOW_DEBUG only) unless it was said less than
    /// [`RateLimited::EVERY`] ago; true if it was said.
    pub(crate) fn debug(&self, msg: std::fmt::Arguments<'_>) -> bool {
        if !config().debug {
            return false;
        }
        match self.turn(since_start_ms() + 1) {
            None => false,
            Some(0) => {
                debug(msg);
                true
            }
            Some(n) => {
                debug(format_args!("{msg} ({n} more like it not shown)"));
                true
            }
        }
    }

    /// Whether the line is said at `now_ms` (at least 1): `Some(lines not said since)`, or
    /// `None` (counted as not said). One thread of those that find it due says it.
    fn turn(&self, now_ms: u64) -> Option<u64> {
        let last = self.said_at_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= Self::EVERY.as_millis() as u64;
        if !due
            || self
                .said_at_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.silenced.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.silenced.swap(0, Ordering::Relaxed))
    }
}

/// Milliseconds since the shim first looked at the clock (a process's own time line).
fn since_start_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The connection to the router, kept out of the application's way (see `private`).
pub(crate) struct RouterLink {
    pub conn: PrivateFd,
}

/// The attachment of this process (a forked child attaches anew: the router identifies each
/// process by its own credentials, and two processes must not share one request channel).
pub(crate) struct Attached {
    pid: i32,
    session: Option<Arc<RouterLink>>,
    /// Requests sent on the session and not answered yet, by sequence number.
    pending: HashMap<u32, Pending>,
    /// Threads waiting to send a request (the session has `MAX_IN_FLIGHT` outstanding), oldest
    /// first: each is woken when a request finishes.
    slot_waiters: VecDeque<Arc<AtomicU32>>,
    /// A thread reads the session (outside the lock): only it may, so notices are applied in
    /// the order they came.
    reading: bool,
    /// What the router's notices said (see `SockNotice`).
    notices: Notices,
    /// With no session: when attaching may be tried again (a router restarting, a container
    /// registered later). With unanswered requests: when to try the router again anyway.
    retry_at: Instant,
    /// Requests the router did not answer in time, oldest first. While any is unanswered the
    /// router is taken as wedged: requests take the normal path at once (until `retry_at`).
    /// Their replies, when they come, are dropped (a listen's is undone).
    unanswered: Vec<Unanswered>,
    /// The wait before the next try of a router that did not answer; doubles while it stays
    /// silent.
    backoff: Duration,
}

/// A request given up on: what its late reply must undo.
#[derive(Debug, Clone, Copy)]
struct Unanswered {
    seq: u32,
    op: SockOp,
    port: u16,
}

/// Unanswered requests remembered at most (the oldest are forgotten: their replies are then
/// dropped like any reply to an earlier request).
const MAX_UNANSWERED: usize = 64;
/// The longest wait before trying a silent router again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A Resolve waits this much longer than other requests: the router holds one up to a second
/// for the announcement of the connection (dataplane tcp/resolve.rs, `RESOLVE_WAIT`).
const RESOLVE_GRACE: Duration = Duration::from_secs(1);

/// How long after the router sent it a notice is trusted. Host ports are reused: a later
/// notice about the same port overrides an earlier one, but a port reused by a connection
/// nobody announced would not. Long enough for a port claimed ahead (a claim is told when the
/// port is bound, and used at the container's next connects to that listener).
const NOTICE_TTL_MS: u32 = 60_000;
/// How long accept polls for a notice that has not arrived before it asks the router.
const NOTICE_WAIT: Duration = Duration::from_micros(50);
/// How often a process without a router session tries to attach again.
const REATTACH_INTERVAL: Duration = Duration::from_secs(1);

/// Notices kept at most; beyond, the oldest knowledge is dropped (accept then asks the router).
/// Notices pile up in processes that hold a listener but leave the accepting to others.
const MAX_NOTICES: usize = 4096;

/// What the router's notices said: overlay addresses of connections about to be accepted, by
/// host address, with when the router sent each.
#[derive(Default)]
pub(crate) struct Notices(HashMap<(Ipv4Addr, u16), (Ipv4Addr, u16, u32)>);

/// Whether a notice sent at `sent_ms` (the router's reading of the shared monotonic clock) is
/// still to be trusted.
fn fresh(sent_ms: u32) -> bool {
    monotonic_ms().wrapping_sub(sent_ms) < NOTICE_TTL_MS
}

impl Notices {
    /// Applies one notice (in the order they came: a later one overrides).
    fn remember(&mut self, notice: SockNotice) {
        let (host, overlay) = match notice.meaning() {
            NoticeMeaning::Is { host, overlay } => (host, overlay),
            NoticeMeaning::Forget(host) => {
                self.0.remove(&host);
                return;
            }
            NoticeMeaning::ForgetAll => {
                self.0.clear();
                return;
            }
        };
        if self.0.len() >= MAX_NOTICES {
            self.0.retain(|_, (_, _, sent)| fresh(*sent));
            if self.0.len() >= MAX_NOTICES {
                self.0.clear();
            }
        }
        if fresh(notice.sent_ms) {
            self.0.insert(host, (overlay.0, overlay.1, notice.sent_ms));
        } else {
            // Too old to trust, but it still overrides what was said before it.
            self.0.remove(&host);
        }
    }

    fn knows(&self, host: (Ipv4Addr, u16)) -> bool {
        self.0.get(&host).is_some_and(|(_, _, sent)| fresh(*sent))
    }

    /// The fresh notice for `host`, taken out.
    fn take(&mut self, host: (Ipv4Addr, u16)) -> Option<(Ipv4Addr, u16)> {
        let (ip, port, sent) = self.0.remove(&host)?;
        fresh(sent).then_some((ip, port))
    }
}

pub(crate) static SESSION: ForkLock<Option<Attached>> = ForkLock::new(None);
static SEQ: AtomicU32 = AtomicU32::new(1);

/// Why a request got no answer: the caller then takes the normal path.
#[derive(Debug)]
pub enum Unavailable {
    NotAttached,
    Broken,
    /// The router did not answer in time (now or an earlier request): stopped or wedged.
    Wedged,
}

/// The overlay address of the connection accepted from host address `host`, if the router's
/// notice for it has arrived: no round trip. Reads the notices waiting on the session without
/// blocking.
pub fn noticed(host: (Ipv4Addr, u16)) -> Option<(Ipv4Addr, u16)> {
    let mut guard = SESSION.lock();
    let attached = guard.as_mut().filter(|a| a.pid == real::getpid())?;
    if attached.reading {
        // Another thread reads the session: what waits on it cannot be read here in order, so
        // a later notice could take back the one known. The caller asks the router.
        return None;
    }
    // What waits on the session first, in order: a notice kept from earlier may be stale (host
    // ports are reused), a later one replaces or takes it back.
    let Some(session) = attached.session.clone() else {
        return attached.notices.take(host);
    };
    let mut buf = [0u8; SOCKMSG_LEN + 1];
    // Every notice waiting is applied, in order, before deciding: an earlier one about this
    // host address may be overridden or taken back by a later one (host ports are reused).
    // The notice and the connection travel separately (router to router, then to us; and the
    // TCP handshake): the connection can win by a few microseconds. Polling for the notice that
    // long is cheaper than the round trip of a Resolve; but not when it came earlier (a claim
    // announced ahead). Bounded in time and in messages (a router sends at most part of a
    // socket buffer of notices ahead).
    // No router announces a loopback address: that is the router's doorbell for a client
    // without Freeflow (dataplane tcp/relay.rs), which only a Resolve answers.
    let wait = if host.0.is_loopback() {
        Duration::ZERO
    } else {
        NOTICE_WAIT
    };
    let deadline = Instant::now() + wait;
    for _ in 0..4096 {
        match fdpass::recv_with_fds(session.conn.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
            Ok(got) if got.len == SOCKMSG_LEN && !got.truncated => {
                match FromRouter::decode(&buf[..got.len]) {
                    Ok(msg) => attached.dispatch(msg, got.fds),
                    // Stop reading the session; the next request finds out.
                    Err(_) => break,
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && !attached.notices.knows(host)
                    && Instant::now() < deadline =>
            {
                std::hint::spin_loop();
            }
            _ => break,
        }
    }
    attached.notices.take(host)
}

/// In a freshly forked child (and after exec): tells the router this process holds the
/// listeners it inherited, so they outlive a parent that exits (daemonizing and pre-fork
/// servers). The fork handlers make sure no other thread holds the lock.
/// The inherited session stays open until the router answered: a parent that exits at once
/// (its session closing) must not leave the listener holderless, which drops its overlay
/// listener (clients without Freeflow would be refused).
pub fn claim_inherited_listeners(ports: &[u16]) {
    let pid = real::getpid();
    let inherited = SESSION.lock().take_if(|a| a.pid != pid);
    for &port in ports {
        let request = SockRequest {
            op: SockOp::Own,
            flags: 0,
            seq: 0,
            ip: Ipv4Addr::UNSPECIFIED,
            port,
            backlog: 0,
        };
        if call_passing_all(request, &[]).is_err() {
            break;
        }
    }
    drop(inherited);
}

/// This process's attachment, attaching first if it has none (or inherited its parent's) or
/// if the time to try again has come.
fn attached(guard: &mut Option<Attached>) -> &mut Attached {
    let pid = real::getpid();
    let attach_now = guard
        .as_ref()
        .is_none_or(|a| a.pid != pid || (a.session.is_none() && Instant::now() >= a.retry_at));
    if attach_now {
        let backoff = guard
            .as_ref()
            .filter(|a| a.pid == pid)
            .map_or(REATTACH_INTERVAL, |a| a.backoff);
        // A session inherited from the parent is forgotten without closing its fd here: the
        // child's copy closes with the OwnedFd drop, the parent's stays open.
        *guard = Some(Attached::attach(pid, backoff));
    }
    guard.get_or_insert_with(|| Attached::attach(pid, REATTACH_INTERVAL))
}

/// How long after its container started a process waits for the container to be registered
/// (`FREEFLOW_REGISTER_WAIT_MS`): a runtime registers a container when it has started (the
/// Docker watcher on the engine's start event), milliseconds after its first program ran; a
/// server that listens at once would otherwise stay on the overlay for its whole life.
const DEFAULT_REGISTRATION_GRACE_MS: u64 = 3000;
/// How often a refused attach is tried again within the grace.
const REGISTRATION_POLL: Duration = Duration::from_millis(50);

/// Attaches; if the router does not know this container yet and the container started less
/// than the grace ago, tries again until it does or the grace is over. A process started
/// later in an unregistered container (or in a network namespace without a pid namespace of
/// its own: pid 1 is the host's init) never waits.
fn attach_waiting_for_registration() -> Result<SocketSession, AttachError> {
    let first = attach_socket(&config().dir, config().router_timeout);
    let not_registered = |r: &Result<SocketSession, AttachError>| {
        matches!(
            r,
            Err(AttachError::Refused {
                reason: Refusal::NotRegistered,
                ..
            })
        )
    };
    if !not_registered(&first) {
        return first;
    }
    let grace = Duration::from_millis(
        std::env::var("FREEFLOW_REGISTER_WAIT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_REGISTRATION_GRACE_MS),
    );
    let Some(left) = container_age().and_then(|age| grace.checked_sub(age)) else {
        return first;
    };
    debug(format_args!(
        "container not registered yet; waiting up to {left:?} for its registration"
    ));
    let until = Instant::now() + left;
    let mut last = first;
    while not_registered(&last) && Instant::now() < until {
        std::thread::sleep(REGISTRATION_POLL);
        last = attach_socket(&config().dir, config().router_timeout);
    }
    last
}

/// How long ago this process's container started: the age of pid 1 of its pid namespace
/// (`/proc/1/stat` field 22, in clock ticks since boot, against `/proc/uptime`).
fn container_age() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/1/stat").ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last
    // ')'; field 3 is the first after it, so field 22 is the 20th.
    let after = &stat[stat.rfind(')')? + 1..];
    let start_ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let uptime_secs: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    // SAFETY: sysconf reads a system constant and touches no memory of ours.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_sec <= 0 {
        return None;
    }
    let started = start_ticks as f64 / ticks_per_sec as f64;
    Some(Duration::from_secs_f64((uptime_secs - started).max(0.0)))
}

impl Attached {
    /// Attaches to the router, waiting at most the router timeout (for its answer; a blocked
    /// send or receive gives up after it too: the attach sets SO_SNDTIMEO and SO_RCVTIMEO).
    fn attach(pid: i32, backoff: Duration) -> Attached {
        let mut attached = Attached {
            pid,
            session: None,
            notices: Notices::default(),
            retry_at: Instant::now() + REATTACH_INTERVAL,
            unanswered: Vec::new(),
            backoff,
            pending: HashMap::new(),
            slot_waiters: VecDeque::new(),
            reading: false,
        };
        match attach_waiting_for_registration() {
            Ok(s) => {
                debug(format_args!(
                    "attached as container {} ({})",
                    s.info.container, s.info.ip
                ));
                attached.session = Some(Arc::new(RouterLink {
                    conn: PrivateFd::adopt(s.conn),
                }));
                attached.backoff = REATTACH_INTERVAL;
            }
            Err(AttachError::Refused { message, .. }) => {
                debug(format_args!("not accelerated: {message}"));
            }
            // No router there (it is restarting, or down): failing costs nothing, so the
            // interval stays short.
            Err(e @ AttachError::Unreachable { .. }) => {
                debug(format_args!("not accelerated: {e}"));
            }
            Err(e) => {
                // No answer (a stopped router takes the connection but says nothing): try
                // again later and later.
                debug(format_args!("not accelerated: {e}"));
                attached.back_off();
            }
        }
        attached
    }

    /// `request` got no answer in time: its reply, if it comes, is to be dropped, and the
    /// router is left alone for a while.
    fn gave_up(&mut self, request: &SockRequest) {
        if self.unanswered.len() >= MAX_UNANSWERED {
            self.unanswered.remove(0);
        }
        self.unanswered.push(Unanswered {
            seq: request.seq,
            op: request.op,
            port: request.port,
        });
        self.back_off();
    }

    fn back_off(&mut self) {
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Reads what waits on the session without blocking: notices and late replies.
    fn drain(&mut self) {
        if self.reading {
            // The reader takes them in.
            return;
        }
        let Some(session) = self.session.clone() else {
            return;
        };
        let conn = session.conn.as_fd();
        let mut buf = [0u8; SOCKMSG_LEN + 1];
        for _ in 0..4096 {
            match fdpass::recv_with_fds(conn, &mut buf, libc::MSG_DONTWAIT) {
                Ok(got) if got.len == SOCKMSG_LEN && !got.truncated => {
                    match FromRouter::decode(&buf[..got.len]) {
                        Ok(msg) => self.dispatch(msg, got.fds),
                        Err(_) => break,
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => break,
            }
        }
        // The router closed the connection, or sent what it must not: stop using it.
        self.break_session();
    }
}

/// The process whose listener watcher runs (0: none); a forked child starts its own.
static WATCHER_PID: AtomicI32 = AtomicI32::new(0);
/// The watcher's duplicate of the router connection, for a forked child to close (-1: none).
static WATCHED_FD: AtomicI32 = AtomicI32::new(-1);
/// How long the watcher keeps trying to hand listeners to a restarting router.
const RECOVERY_WINDOW: Duration = Duration::from_secs(60);

/// Makes sure this process has a thread that notices its router going away and hands the
/// accelerated listeners to the router that replaces it (the daemon restarts a dead router in
/// milliseconds; without this, listeners would be unknown to the new one). Called where a
/// process holds listeners: after listen, at accept.
pub fn ensure_watcher() {
    let pid = real::getpid();
    if WATCHER_PID.load(Ordering::Relaxed) == pid || WATCHER_PID.swap(pid, Ordering::AcqRel) == pid
    {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("freeflow-watch".into())
        .spawn(watch_router);
    if spawned.is_err() {
        WATCHER_PID.store(0, Ordering::Release);
    }
}

/// In a forked child: the parent's watcher did not come along; its fd did.
pub fn forget_watcher_after_fork() {
    let fd = WATCHED_FD.swap(-1, Ordering::AcqRel);
    if fd >= 0 && !crate::private::close_orphan(fd) {
        real::close(fd);
    }
}

fn watch_router() {
    // Signals are the application's business: none may be delivered to this thread (a server
    // that blocks SIGTERM to read it from a signalfd must still get it there).
    // SAFETY: sigset_t is plain data filled by sigfillset; pthread_sigmask changes only this
    // thread's mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
    loop {
        let conn = {
            let guard = SESSION.lock();
            guard
                .as_ref()
                .filter(|a| a.pid == real::getpid())
                .and_then(|a| a.session.as_ref())
                .and_then(|s| s.conn.try_clone().ok())
        };
        if let Some(conn) = conn {
            WATCHED_FD.store(conn.as_raw_fd(), Ordering::Release);
            wait_for_hangup(conn.as_fd());
            WATCHED_FD.store(-1, Ordering::Release);
        }
        if !state::has_listeners() {
            break;
        }
        let deadline = std::time::Instant::now() + RECOVERY_WINDOW;
        while !relisten_all() {
            // No router takes the listeners (yet): nobody would ring for the clients that
            // reach their overlay listeners, so those are refused until one does.
            crate::overlay_accept::refuse_clients();
            if std::time::Instant::now() > deadline {
                debug(format_args!(
                    "router did not come back; listeners stay unknown to it"
                ));
                WATCHER_PID.store(0, Ordering::Release);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    WATCHER_PID.store(0, Ordering::Release);
}

/// Blocks until the router's end of `conn` is gone. Asks for no events: only hang-up and error
/// wake it, so it never competes with the requests for messages.
fn wait_for_hangup(conn: BorrowedFd<'_>) {
    let mut fds = [PollFd::new(conn, 0)];
    loop {
        match poll(&mut fds, None) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

/// Attaches to the (new) router and hands it every listener this process holds, each with its
/// overlay listener for clients without Freeflow (the one the shim kept, listening again, or a
/// fresh one). False if the router is not there yet.
fn relisten_all() -> bool {
    let attached = Attached::attach(real::getpid(), REATTACH_INTERVAL);
    if attached.session.is_none() {
        return false;
    }
    {
        let mut guard = SESSION.lock();
        if let Some(old) = guard.as_mut() {
            old.let_go_of_pending();
        }
        *guard = Some(attached);
    }
    let mut done = Vec::new();
    for (fd, s) in state::snapshot() {
        if s.role != state::Role::Listener || done.contains(&s.local.1) {
            continue;
        }
        // The application's own overlay listener if this process kept it (its port is
        // taken by it), else a fresh one.
        let overlay = crate::overlay_accept::kept_clone(s.local)
            .or_else(|| overlay_listener(s.local.1, s.v6));
        // SAFETY: fd is one of this process's listeners in the table; if the application
        // closed it meanwhile, the send fails with EBADF and the whole hand-over is retried.
        let host = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut fds = vec![host];
        fds.extend(overlay.as_ref().map(|o| o.as_fd()));
        let reuseport =
            real::get_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT).is_some_and(|v| v != 0);
        let request = SockRequest {
            op: SockOp::Relisten,
            flags: if reuseport {
                freeflow_proto::sockmsg::FLAG_REUSEPORT
            } else {
                0
            },
            seq: 0,
            ip: s.local.0,
            port: s.local.1,
            backlog: 0,
        };
        if call_passing_all(request, &fds).is_err() {
            return false;
        }
        done.push(s.local.1);
        debug(format_args!(
            "listener {}:{} handed to the restarted router",
            s.local.0, s.local.1
        ));
    }
    crate::overlay_accept::announce_again();
    true
}

/// A new listening socket on the wildcard address and overlay `port`, in this process's (the
/// container's) network namespace.
fn overlay_listener(port: u16, v6: bool) -> Option<OwnedFd> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain syscall; the result is checked.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return None;
    }
    // SAFETY: raw is a fresh fd nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    real::set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    // AF_INET6: `::`, dual-stack like the listener it stands in for (a v6-only listener is
    // never accelerated).
    let (addr, len) = real::inet_sockaddr(Ipv4Addr::UNSPECIFIED, port, v6);
    // SAFETY: addr holds a socket address of `len` bytes.
    let bound = unsafe { libc::bind(raw, (&addr as *const libc::sockaddr_storage).cast(), len) };
    (bound == 0 && real::listen(raw, 128) == 0).then_some(socket)
}

#[cfg(test)]
mod tests {
    use super::{monotonic_ms, Notices, Prefix, RateLimited, NOTICE_TTL_MS};
    use freeflow_proto::sockmsg::SockNotice;
    use std::net::Ipv4Addr;

    /// A line every thread would say at once is said once per period, then with the count of
    /// those not said.
    #[test]
    fn a_rate_limited_line_is_said_once_per_period_with_the_count_of_the_others() {
        let line = RateLimited::new();
        let every = RateLimited::EVERY.as_millis() as u64;
        assert_eq!(line.turn(1), Some(0), "the first at once");
        assert_eq!(line.turn(2), None);
        assert_eq!(line.turn(every), None, "not yet a period");
        assert_eq!(
            line.turn(1 + every),
            Some(2),
            "a period on, with the 2 not said"
        );
        assert_eq!(line.turn(2 + every), None);
        assert_eq!(line.turn(1 + 3 * every), Some(1));
    }

    #[test]
    fn notices_are_applied_in_order_and_can_be_taken_back() {
        let mut notices = Notices::default();
        let host_ip = Ipv4Addr::new(192, 168, 1, 2);
        let is = |port: u16, ip: Ipv4Addr| SockNotice {
            host_ip,
            host_port: port,
            ip,
            port,
            sent_ms: monotonic_ms(),
        };
        let a = Ipv4Addr::new(10, 32, 0, 2);
        let b = Ipv4Addr::new(10, 32, 0, 3);
        notices.remember(is(40001, a));
        notices.remember(is(40001, b));
        assert!(notices.knows((host_ip, 40001)));
        assert!(!notices.knows((host_ip, 40009)));
        assert_eq!(notices.take((host_ip, 40001)), Some((b, 40001)));
        assert_eq!(notices.take((host_ip, 40001)), None, "taken once");
        notices.remember(is(40002, a));
        notices.remember(SockNotice::forget((host_ip, 40002)));
        assert_eq!(notices.take((host_ip, 40002)), None);
        notices.remember(is(40003, a));
        notices.remember(is(40004, a));
        notices.remember(SockNotice::forget_all());
        notices.remember(is(40005, b));
        assert_eq!(notices.take((host_ip, 40003)), None);
        assert_eq!(notices.take((host_ip, 40004)), None);
        assert_eq!(notices.take((host_ip, 40005)), Some((b, 40005)));
        // Trusted for a while after the router sent it, however long it waited unread; an old
        // one is not trusted, but still overrides what came before it.
        notices.remember(is(40006, a));
        let old = SockNotice {
            sent_ms: monotonic_ms().wrapping_sub(NOTICE_TTL_MS + 1000),
            ..is(40006, b)
        };
        notices.remember(old);
        assert!(!notices.knows((host_ip, 40006)));
        assert_eq!(notices.take((host_ip, 40006)), None);
    }

    #[test]
    fn prefixes() {
        let p = Prefix::parse("10.32.0.0/12").unwrap();
        assert!(p.contains("10.32.0.5".parse().unwrap()));
        assert!(p.contains("10.47.255.255".parse().unwrap()));
        assert!(!p.contains("10.48.0.0".parse().unwrap()));
        assert!(!p.contains("192.168.1.1".parse().unwrap()));
        assert!(Prefix::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Prefix::parse("10.0.0.0/33").is_none());
        assert!(Prefix::parse("10.0.0/8").is_none());
        assert!(Prefix::parse("garbage").is_none());
    }
}
