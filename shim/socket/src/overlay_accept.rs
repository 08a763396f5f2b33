//! Clients without Freeflow (docs/tcp-setup.md, "the relay"). They wait in the accept queue of
//! the application's own overlay listener, in the container; the router rings the host
//! listener once for each (a "doorbell": a connection from `127.0.0.1`, which no router
//! announces). When the application's accept gets a doorbell, the shim closes it and accepts
//! the client from its own duplicate of the overlay listener: the application gets the
//! client's connection and address as the kernel gives them, with no round trip.
//!
//! Where the shim sees the process wait for clients, it takes them itself, without a
//! doorbell: a blocking accept waits on the host listener and the overlay listener together
//! and accepts from whichever is ready, and a non-blocking accept that finds the host
//! listener empty looks at the overlay listener before it says EAGAIN. A process whose
//! blocking accept had to wait on both tells the router once (`Accepts`), and the router then
//! rings only for clients still waiting after a short grace (a process that stopped
//! accepting, or is busy elsewhere).
//!
//! Servers that wait in epoll, poll or select (nginx's workers, PostgreSQL's postmaster) are
//! seen too: an epoll instance that watches an accelerated listener watches its overlay
//! listener beside it (`epoll`), and the shim's poll and select add the overlay listener beside
//! the listener's fd and report its clients as the listener's; the application then calls
//! accept on the listener's fd, which takes the client from the overlay listener. Such a
//! process tells the router too.
//!
//! The duplicate is made at listen (forked children inherit it); a process without one (it
//! was exec'd: the duplicate is close-on-exec, or the application closed it) asks the router
//! for it once, with a `Resolve` of the doorbell.
//!
//! Its lifetime: closed with the process's last fd of the accelerated listener (the port is
//! then free in the container, once the router has let go of its own duplicate, which it does
//! before answering the Unlisten), and with the process. While no router serves it (the
//! router died or was stopped) it does not listen: nobody would ring for its clients, so
//! they must be refused rather than accepted by the kernel and left waiting. It listens again
//! when it is handed to the next router (`Relisten`).

use crate::epoll;
use crate::real;
use crate::session;
use crate::state::{self, KeptOverlay};
use freeflow_proto::sockmsg::{SockOp, SockRequest, SockStatus};
use libc::{c_int, sockaddr, socklen_t};
use std::net::Ipv4Addr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

/// Where the router's doorbells come from.
const DOORBELL_SOURCE: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// The least fd number of the shim's overlay listeners: out of the way of programs that count
/// on getting the lowest free numbers.
const KEPT_FD_FLOOR: c_int = 256;

/// Whether an accepted connection from `ip` is one of the router's doorbells.
pub fn is_doorbell(ip: Ipv4Addr) -> bool {
    ip == DOORBELL_SOURCE
}

/// A duplicate of socket `fd`, close-on-exec, at [`KEPT_FD_FLOOR`] or above if it can, with
/// O_NONBLOCK set on the socket (the router uses it non-blocking too): never blocks an accept.
fn duplicate(fd: c_int) -> Option<c_int> {
    let mut kept = real::fcntl_set(fd, libc::F_DUPFD_CLOEXEC, KEPT_FD_FLOOR);
    if kept < 0 {
        kept = real::fcntl_set(fd, libc::F_DUPFD_CLOEXEC, 0);
    }
    if kept < 0 {
        return None;
    }
    let status = real::fcntl_get(kept, libc::F_GETFL);
    if status < 0 || real::fcntl_set(kept, libc::F_SETFL, status | libc::O_NONBLOCK) < 0 {
        real::close(kept);
        return None;
    }
    Some(kept)
}

/// Keeps `fd` (the shim's) as the overlay listener of `local`, listened on with `backlog`,
/// unless one is kept already (another thread was first): returns the one kept.
fn keep_fd(local: (Ipv4Addr, u16), fd: c_int, backlog: c_int) -> c_int {
    let kept = state::keep_overlay_first(local, KeptOverlay { fd, backlog });
    if kept != fd {
        real::close(fd);
    }
    kept
}

/// At listen, while the application's `fd` is still its overlay listener (before it becomes
/// the host listener), listening with the application's `backlog`: keeps a duplicate for the
/// listener on overlay address `local`.
pub fn keep(fd: c_int, local: (Ipv4Addr, u16), backlog: c_int) {
    if let Some(kept) = duplicate(fd) {
        keep_fd(local, kept, backlog);
    }
}

/// No router serves this process's listeners any more (its session hung up, and no router
/// answers): every overlay listener the shim keeps stops listening, so that clients coming
/// over the overlay are refused (a reset) instead of accepted by the kernel and never served.
/// The socket stays bound, and the container's port taken, until [`kept_clone`] listens on it
/// again for the next router. Other processes holding the same socket see the same.
pub fn refuse_clients() {
    for kept in state::kept_overlays() {
        // Its hang-up would wake a level-triggered epoll instance without end.
        epoll::withdraw_overlay(kept.fd);
        if real::is_listening(kept.fd) {
            real::stop_listening(kept.fd);
            session::debug(format_args!(
                "no router: overlay listener fd {} stops listening",
                kept.fd
            ));
        }
    }
}

/// The listener on `local` is closed in this process: so is the shim's overlay listener (the
/// port is free in the container once no process holds it).
pub fn release(local: (Ipv4Addr, u16)) {
    state::forget_accepting(local);
    if let Some(fd) = state::take_overlay(local) {
        epoll::release_overlay(fd);
        real::close(fd);
    }
}

/// A duplicate of the shim's overlay listener of `local`, to hand to a restarted router,
/// listening again if [`refuse_clients`] stopped it (here or in another process holding it).
pub fn kept_clone(local: (Ipv4Addr, u16)) -> Option<OwnedFd> {
    let kept = state::kept_overlay(local)?;
    if !real::is_listening(kept.fd) && real::listen(kept.fd, kept.backlog) != 0 {
        return None;
    }
    epoll::rearm_overlay(kept.fd);
    let dup = real::fcntl_set(kept.fd, libc::F_DUPFD_CLOEXEC, 0);
    // SAFETY: a fresh fd nobody else owns.
    (dup >= 0).then(|| unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Asks the router for the overlay listener behind doorbell `port` (this process has none),
/// and keeps it for `local`.
fn fetch(local: (Ipv4Addr, u16), port: u16) -> Option<c_int> {
    let request = SockRequest {
        op: SockOp::Resolve,
        flags: 0,
        seq: 0,
        ip: DOORBELL_SOURCE,
        port,
        backlog: 0,
    };
    let (reply, passed) = session::call(request).ok()?;
    let passed = passed
        .filter(|_| reply.status == SockStatus::Ok)?
        .into_raw_fd();
    let listening = real::is_listening(passed);
    let kept = listening.then(|| duplicate(passed)).flatten();
    real::close(passed);
    session::debug(format_args!(
        "overlay listener of {}:{} from the router",
        local.0, local.1
    ));
    // The application's backlog is not known here: the kernel's cap, if it must listen again.
    Some(keep_fd(local, kept?, libc::SOMAXCONN))
}

/// Closes a doorbell. A plain close (no system call more): the router, woken by its end
/// turning readable, closes that end with a reset, which ends both without TIME_WAIT.
fn close_doorbell(fd: c_int) {
    real::close(fd);
}

/// The application's accept on the accelerated listener of overlay address `local` got
/// doorbell `doorbell` (from `port` of the loopback address): closes it and accepts a waiting
/// client from the overlay listener, with the application's accept4 `flags` and address
/// buffer. `Ok(None)` if none waits (another process took it, or the router is gone): the
/// accept goes on. `Err(errno)` for the application (out of descriptors, say).
///
/// # Safety
/// `addr`/`len` are the application's accept arguments (NULL allowed).
pub unsafe fn answer(
    local: (Ipv4Addr, u16),
    doorbell: c_int,
    port: u16,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> Result<Option<c_int>, c_int> {
    // Fetched before the doorbell closes: the router knows the listener by it.
    let Some(overlay) = state::overlay_of(local).or_else(|| fetch(local, port)) else {
        close_doorbell(doorbell);
        return Ok(None);
    };
    // SAFETY: the application's address buffer, passed on.
    let taken = unsafe { take(local, overlay, addr, len, flags) };
    // Closed after the accept: the router, woken by the close, counts the clients still
    // waiting, and must not ring again for this one.
    close_doorbell(doorbell);
    taken
}

/// Accepts a client without Freeflow from `overlay`, the shim's overlay listener of `local`,
/// with the application's accept4 `flags` and address buffer. `Ok(None)` if none waits
/// (another thread or process took it). `Err(errno)` for the application.
///
/// # Safety
/// `addr`/`len` are the application's accept arguments (NULL allowed).
pub unsafe fn take(
    local: (Ipv4Addr, u16),
    overlay: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> Result<Option<c_int>, c_int> {
    // SAFETY: the application's address buffer; `overlay` is the shim's own fd.
    let new = unsafe { real::accept4(overlay, addr, len, flags) };
    let err = real::errno();
    if new >= 0 {
        // A plain connection on the overlay: nothing for the shim to stand in for.
        state::remove(new);
        return Ok(Some(new));
    }
    match err {
        libc::EAGAIN | libc::ECONNABORTED | libc::EINTR => Ok(None),
        // Not listening while no router serves it (`refuse_clients`): kept, to listen again
        // for the next router; out of the process's epoll instances meanwhile.
        libc::EINVAL => {
            epoll::withdraw_overlay(overlay);
            Ok(None)
        }
        e @ (libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Err(e),
        // Not a listener any more: forget it.
        _ => {
            if state::drop_overlay(local, overlay) {
                epoll::release_overlay(overlay);
                real::close(overlay);
            }
            Ok(None)
        }
    }
}

/// What a blocking accept on an accelerated listener found, waiting on both its sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// The host listener (an accelerated client or a doorbell), or something to report about
    /// it: the application's accept on it says which.
    Host,
    /// The shim's overlay listener: a client without Freeflow waits.
    Overlay,
    /// Nothing within the listener's receive timeout (EAGAIN, as the kernel's accept says
    /// then), or a signal came (EINTR).
    Failed(c_int),
}

/// Waits as a blocking accept on host listener `fd` would (up to its SO_RCVTIMEO), until it or
/// the shim's overlay listener `overlay` of `local` has a client. The host listener first when
/// both have: a server that waits in select or poll (which the shim does not see) calls accept
/// when the router's doorbell made the host listener ready, and must get that client, not
/// block. Only a process that finds neither ready, so waits here, tells the router that it
/// takes its clients itself ([`announce_accepting`]). An overlay listener that stopped
/// listening (no router: its clients are refused) reports a hang-up, never a client: the wait
/// then is for the host listener's (its accept blocks as before).
pub fn wait_either(fd: c_int, overlay: c_int, local: (Ipv4Addr, u16)) -> Ready {
    // `fd` is the application's listener, in its own accept call, and `overlay` the shim's;
    // one closed meanwhile by another thread only makes poll report POLLNVAL. The C library's
    // poll: the shim's would add the overlay listener again.
    let mut fds = [fd, overlay].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let mut ready = real::poll_fds(&mut fds, Some(std::time::Duration::ZERO));
    if matches!(ready, Ok(0)) {
        announce_accepting(local);
        let timeout = real::receive_timeout(fd);
        loop {
            ready = real::poll_fds(&mut fds, timeout);
            // The kernel restarts an accept that a signal interrupted when the handler was
            // installed with SA_RESTART (and the socket has no receive timeout); poll is never
            // restarted. Forking servers reap children in a SIGCHLD handler with SA_RESTART
            // and may treat EINTR from accept as fatal: wait again when it cannot have been a
            // handler that asked for EINTR.
            let interrupted =
                matches!(&ready, Err(e) if e.kind() == std::io::ErrorKind::Interrupted);
            if !(interrupted && timeout.is_none() && every_handler_restarts()) {
                break;
            }
        }
    }
    match ready {
        Ok(0) => Ready::Failed(libc::EAGAIN),
        Ok(_) if fds[0].revents != 0 => Ready::Host,
        Ok(_) if fds[1].revents & libc::POLLIN != 0 && fds[1].revents & libc::POLLHUP == 0 => {
            Ready::Overlay
        }
        // Only the overlay listener hung up: the host listener's accept, as without it.
        Ok(_) => Ready::Host,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ready::Failed(libc::EINTR),
        Err(e) => Ready::Failed(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// The most descriptors a poll may list for the shim to look at them (a larger one is passed
/// on as it came: the kernel's own limit is RLIMIT_NOFILE).
const POLL_LOOK_LIMIT: usize = 1 << 16;

/// A poll or ppoll of the application (`wait`: the C library's, given the descriptors and their
/// number) over `nfds` entries at `fds`: the shim's overlay listener of each accelerated
/// listener polled for input is polled beside it, and its clients are reported as the
/// listener's (POLLIN), for the application's accept on the listener to take.
///
/// # Safety
/// `fds` points at `nfds` pollfd entries, as poll(2) requires.
pub unsafe fn poll_with_overlays(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    wait: impl Fn(*mut libc::pollfd, libc::nfds_t) -> c_int,
) -> c_int {
    let n = nfds as usize;
    if !state::in_use() || fds.is_null() || n == 0 || n > POLL_LOOK_LIMIT {
        return wait(fds, nfds);
    }
    // SAFETY: the application's array of `nfds` entries (the caller's contract).
    let polled = unsafe { std::slice::from_raw_parts_mut(fds, n) };
    let beside = state::overlays_of_listeners(
        polled
            .iter()
            .filter(|p| p.fd >= 0 && p.events & libc::POLLIN != 0)
            .map(|p| p.fd),
    );
    let beside: Vec<_> = beside
        .into_iter()
        .filter(|&(_, _, overlay)| real::is_listening(overlay))
        .collect();
    if beside.is_empty() {
        return wait(fds, nfds);
    }
    for &(_, local, _) in &beside {
        announce_accepting(local);
    }
    let mut all = polled.to_vec();
    all.extend(beside.iter().map(|&(_, _, overlay)| libc::pollfd {
        fd: overlay,
        events: libc::POLLIN,
        revents: 0,
    }));
    let rc = wait(all.as_mut_ptr(), all.len() as libc::nfds_t);
    if rc <= 0 {
        if rc == 0 {
            polled.iter_mut().for_each(|p| p.revents = 0);
        }
        return rc;
    }
    for (p, got) in polled.iter_mut().zip(&all) {
        p.revents = got.revents;
    }
    for (k, &(listener, _, _)) in beside.iter().enumerate() {
        let got = all[n + k].revents;
        // A hang-up: it stopped listening (no router), no client.
        if got & libc::POLLIN == 0 || got & libc::POLLHUP != 0 {
            continue;
        }
        for p in polled.iter_mut().filter(|p| p.fd == listener) {
            p.revents |= p.events & (libc::POLLIN | libc::POLLRDNORM);
        }
    }
    let ready = polled.iter().filter(|p| p.revents != 0).count();
    if ready == 0 {
        // Only an overlay listener's hang-up: the wait goes on without it.
        return wait(fds, nfds);
    }
    ready as c_int
}

/// The three sets of a select or pselect (each NULL or an fd_set).
#[derive(Debug, Clone, Copy)]
pub struct FdSets {
    pub read: *mut libc::fd_set,
    pub write: *mut libc::fd_set,
    pub except: *mut libc::fd_set,
}

/// One word of an fd_set, as the C library lays it out.
type SetWord = libc::c_ulong;
const SET_WORD_BITS: usize = SetWord::BITS as usize;

/// The words of an fd_set select reads and writes for `nfds`: howmany(nfds, NFDBITS). A
/// program may allocate only these (older sshd does).
fn set_words(nfds: usize) -> usize {
    nfds.div_ceil(SET_WORD_BITS)
}

/// The bits of word `i` that stand for fds below `nfds`.
fn word_mask(i: usize, nfds: usize) -> SetWord {
    let below = nfds.saturating_sub(i * SET_WORD_BITS);
    if below >= SET_WORD_BITS {
        SetWord::MAX
    } else {
        (1 << below) - 1
    }
}

/// A full-size copy of the application's set `set` (NULL: an empty one) holding its bits
/// for the fds below `nfds`, read word by word from the words select would read.
///
/// # Safety
/// `set` is NULL or has [`set_words`]`(nfds)` readable words, `nfds` at most FD_SETSIZE.
unsafe fn read_set(set: *const libc::fd_set, nfds: usize) -> libc::fd_set {
    // SAFETY: an all-zero fd_set is an empty one.
    let mut copy: libc::fd_set = unsafe { std::mem::zeroed() };
    if set.is_null() {
        return copy;
    }
    let words = (&mut copy as *mut libc::fd_set).cast::<SetWord>();
    for i in 0..set_words(nfds) {
        // SAFETY: word `i` is within the application's set (the caller's contract) and within
        // the full-size copy (`nfds` <= FD_SETSIZE); read unaligned: any address may come.
        unsafe {
            let word = std::ptr::read_unaligned(set.cast::<SetWord>().add(i));
            words.add(i).write(word & word_mask(i, nfds));
        }
    }
    copy
}

/// Writes the bits of `copy` for the fds below `nfds` into the application's set `set`
/// (NULL: nothing), in the words select would write, as the kernel's select does.
///
/// # Safety
/// As [`read_set`], the words writable.
unsafe fn write_set(set: *mut libc::fd_set, copy: &libc::fd_set, nfds: usize) {
    if set.is_null() {
        return;
    }
    let words = (copy as *const libc::fd_set).cast::<SetWord>();
    for i in 0..set_words(nfds) {
        // SAFETY: as in read_set.
        unsafe {
            let word = words.add(i).read() & word_mask(i, nfds);
            std::ptr::write_unaligned(set.cast::<SetWord>().add(i), word);
        }
    }
}

/// A select or pselect of the application (`wait`: the C library's, given nfds and the three
/// sets; the timeout is the application's) over the fds below `nfds` in `sets`: the shim's
/// overlay listener of each accelerated listener in the read set is selected beside it, and
/// its clients are reported as the listener's. The application's sets may hold only the
/// words for `nfds` fds, and the overlay listener's fd is usually above them: the wait is on
/// the shim's own full-size copies, and only the application's words are read and written.
///
/// # Safety
/// Each set is NULL or has the words select(2) reads and writes for `nfds`.
pub unsafe fn select_with_overlays(
    nfds: c_int,
    sets: FdSets,
    wait: impl Fn(c_int, FdSets) -> c_int,
) -> c_int {
    let setsize = libc::FD_SETSIZE as c_int;
    if !state::in_use() || sets.read.is_null() || nfds <= 0 || nfds > setsize {
        return wait(nfds, sets);
    }
    let n = nfds as usize;
    // SAFETY: the application's read set, for `nfds` (the caller's contract).
    let mut read = unsafe { read_set(sets.read, n) };
    // SAFETY: FD_ISSET reads a bit of a full-size set, for fds below FD_SETSIZE.
    let wanted = (0..nfds).filter(|&fd| unsafe { libc::FD_ISSET(fd, &read) });
    let beside: Vec<_> = state::overlays_of_listeners(wanted)
        .into_iter()
        .filter(|&(_, _, overlay)| overlay < setsize && real::is_listening(overlay))
        .collect();
    if beside.is_empty() {
        return wait(nfds, sets);
    }
    // SAFETY: the application's other sets, for `nfds` (the caller's contract).
    let (mut write, mut except) = unsafe { (read_set(sets.write, n), read_set(sets.except, n)) };
    let mut widest = nfds;
    for &(_, local, overlay) in &beside {
        announce_accepting(local);
        // SAFETY: `overlay` is below FD_SETSIZE (checked).
        unsafe { libc::FD_SET(overlay, &mut read) };
        widest = widest.max(overlay + 1);
    }
    // The application's NULL sets stay NULL.
    let own_or_null = |app: *mut libc::fd_set, own: &mut libc::fd_set| {
        if app.is_null() {
            app
        } else {
            own as *mut libc::fd_set
        }
    };
    let own = FdSets {
        read: &mut read,
        write: own_or_null(sets.write, &mut write),
        except: own_or_null(sets.except, &mut except),
    };
    let mut rc = wait(widest, own);
    if rc < 0 {
        return rc;
    }
    for &(listener, _, overlay) in &beside {
        // SAFETY: both fds are below FD_SETSIZE.
        unsafe {
            if libc::FD_ISSET(overlay, &read) {
                libc::FD_CLR(overlay, &mut read);
                if libc::FD_ISSET(listener, &read) {
                    rc -= 1;
                } else {
                    libc::FD_SET(listener, &mut read);
                }
            }
        }
    }
    // SAFETY: the application's sets, written for `nfds` as select writes them.
    unsafe {
        write_set(sets.read, &read, n);
        write_set(sets.write, &write, n);
        write_set(sets.except, &except, n);
    }
    rc
}

/// Whether every signal with a handler of the program's has SA_RESTART, so the signal that
/// interrupted a wait was one after which the kernel would have restarted the accept.
fn every_handler_restarts() -> bool {
    (1..=libc::SIGRTMAX()).all(|sig| {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            return true;
        }
        // SAFETY: sigaction with a NULL new action only reads the disposition into `old`, a
        // zeroed plain C structure owned here.
        let (got, old) = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            let got = libc::sigaction(sig, std::ptr::null(), &mut old);
            (got, old)
        };
        got != 0
            || old.sa_sigaction == libc::SIG_DFL
            || old.sa_sigaction == libc::SIG_IGN
            || old.sa_flags & libc::SA_RESTART != 0
    })
}

/// Tells the router, once per process and listener, that this process takes the clients
/// without Freeflow of the listener on `local` itself (its accept waits on the overlay
/// listener): the router then leaves them to it for a grace before ringing.
pub fn announce_accepting(local: (Ipv4Addr, u16)) {
    if state::note_accepting(real::getpid(), local) {
        tell_accepting(local);
    }
}

/// Tells a restarted router again which listeners this process takes the clients of.
pub fn announce_again() {
    for local in state::accepting_of(real::getpid()) {
        tell_accepting(local);
    }
}

fn tell_accepting(local: (Ipv4Addr, u16)) {
    let request = SockRequest {
        op: SockOp::Accepts,
        flags: 0,
        seq: 0,
        ip: local.0,
        port: local.1,
        backlog: 0,
    };
    // Without an answer the router rings for every client, as before: nothing is lost.
    let told = session::call(request).is_ok_and(|(reply, _)| reply.status == SockStatus::Ok);
    session::debug(format_args!(
        "listener {}:{}: this process takes its clients without Freeflow{}",
        local.0,
        local.1,
        if told {
            ""
        } else {
            " (the router did not take note)"
        }
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoll::tests::Pair;
    use std::os::fd::AsRawFd;

    /// The C library's poll, as the shim's poll calls it, with `ms`.
    fn poll_wait(ms: c_int) -> impl Fn(*mut libc::pollfd, libc::nfds_t) -> c_int {
        // SAFETY: the array and its length come from poll_with_overlays, live for the call.
        move |fds, nfds| unsafe { real::poll_raw(fds, nfds, ms) }
    }

    #[test]
    fn poll_reports_a_plain_client_as_the_listeners_and_ignores_a_dead_overlay_listener() {
        let pair = Pair::new((Ipv4Addr::new(10, 77, 1, 1), 4101));
        let (host, overlay) = (pair.host.as_raw_fd(), pair.overlay.as_raw_fd());
        // A pipe beside it, as a program polls other things too.
        let mut pipe = [0; 2];
        // SAFETY: pipe writes two fds into a live array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        let mut fds = [host, pipe[0]].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: a live array of two entries.
        let poll_now = |fds: &mut [libc::pollfd; 2], ms| unsafe {
            poll_with_overlays(fds.as_mut_ptr(), 2, poll_wait(ms))
        };
        assert_eq!(poll_now(&mut fds, 0), 0, "nothing yet");
        let _client = pair.plain_client();
        assert_eq!(poll_now(&mut fds, 5000), 1);
        assert_eq!(fds[0].revents, libc::POLLIN, "the listener's entry");
        assert_eq!(fds[1].revents, 0);
        // It stopped listening (no router): its hang-up is not a client.
        assert_eq!(real::stop_listening(overlay), 0);
        assert_eq!(poll_now(&mut fds, 0), 0);
        assert_eq!(fds[0].revents, 0);
        for fd in pipe {
            real::close(fd);
        }
    }

    #[test]
    fn select_reports_a_plain_client_as_the_listeners() {
        let pair = Pair::new((Ipv4Addr::new(10, 77, 1, 2), 4102));
        let host = pair.host.as_raw_fd();
        let overlay = pair.overlay.as_raw_fd();
        let select_now = |ms: i64| {
            // SAFETY: an all-zero fd_set is an empty one; FD_SET on an fd below FD_SETSIZE.
            let mut read: libc::fd_set = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::FD_SET(host, &mut read) };
            let mut timeout = libc::timeval {
                tv_sec: ms / 1000,
                tv_usec: (ms % 1000) * 1000,
            };
            let timeout = &mut timeout as *mut libc::timeval;
            // SAFETY: live sets and timeout; the C library's select.
            let wait = |nfds, sets: FdSets| unsafe {
                real::select(nfds, sets.read, sets.write, sets.except, timeout)
            };
            let sets = FdSets {
                read: &mut read,
                write: std::ptr::null_mut(),
                except: std::ptr::null_mut(),
            };
            // SAFETY: a live set, the others NULL.
            let rc = unsafe { select_with_overlays(host + 1, sets, wait) };
            // SAFETY: reads bits of a live set.
            let (listener, shims) =
                unsafe { (libc::FD_ISSET(host, &read), libc::FD_ISSET(overlay, &read)) };
            (rc, listener, shims)
        };
        assert_eq!(select_now(0), (0, false, false));
        let _client = pair.plain_client();
        assert_eq!(
            select_now(5000),
            (1, true, false),
            "the listener's bit, not the shim's"
        );
        let _accelerated = std::net::TcpStream::connect(pair.host_addr).unwrap();
        assert_eq!(select_now(5000), (1, true, false), "both ready: one count");
    }

    /// Words of a full fd_set (FD_SETSIZE bits).
    const SET_WORDS: usize = libc::FD_SETSIZE / 64;
    /// What the words past an application's set hold (other data of its own).
    const GUARD: u64 = 0x5a5a_5a5a_5a5a_5a5a;

    /// An fd_set sized for fds below 64 (one word, as a program sizes it for its nfds),
    /// followed by guard words: in an allocation of a full set's size, so that the words past
    /// it are the test's.
    fn narrow_set(fds: &[c_int]) -> Box<[u64; SET_WORDS]> {
        let mut set = Box::new([GUARD; SET_WORDS]);
        set[0] = fds.iter().fold(0, |word, &fd| word | 1 << fd);
        set
    }

    #[test]
    fn select_reads_and_writes_only_the_words_of_the_applications_sets() {
        let pair = Pair::new((Ipv4Addr::new(10, 77, 1, 3), 4103));
        let host = pair.host.as_raw_fd();
        let mut pipe = [0; 2];
        // SAFETY: pipe writes two fds into a live array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        let (readable, writable) = (pipe[0], pipe[1]);
        assert!(host.max(readable).max(writable) < 64 && pair.overlay.as_raw_fd() >= 64);
        let nfds = host.max(readable).max(writable) + 1;
        let mut read = narrow_set(&[host, readable]);
        let mut write = narrow_set(&[writable]);
        let mut except = narrow_set(&[host]);
        let _client = pair.plain_client();
        let sets = FdSets {
            read: read.as_mut_ptr().cast(),
            write: write.as_mut_ptr().cast(),
            except: except.as_mut_ptr().cast(),
        };
        let mut timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        let timeout = &mut timeout as *mut libc::timeval;
        // SAFETY: live sets and timeout; the C library's select.
        let wait = |nfds, sets: FdSets| unsafe {
            real::select(nfds, sets.read, sets.write, sets.except, timeout)
        };
        // SAFETY: live sets (of a full set's size, the words past the first the test's).
        let rc = unsafe { select_with_overlays(nfds, sets, wait) };
        assert_eq!(rc, 2, "the listener readable, the pipe writable");
        assert_eq!(read[0], 1 << host);
        assert_eq!(write[0], 1 << writable);
        assert_eq!(except[0], 0);
        for set in [&read, &write, &except] {
            assert!(
                set[1..].iter().all(|&w| w == GUARD),
                "past the set: {set:x?}"
            );
        }
        for fd in pipe {
            real::close(fd);
        }
    }
}
