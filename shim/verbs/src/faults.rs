//! When the router goes: it died (SIGKILL, crash) or detached this context. Either way the
//! context's attach connection hangs up, and the library behaves as a device after a fatal
//! error does (rdma-core's programs expect errors, not silence):
//!
//! - a watcher thread per context ([`Watcher`]) sleeps in `poll(2)` on the attach connection,
//!   asking for nothing but hang-up, and sets the context's `gone` flag when it comes. The fast
//!   path never makes a system call for this: it loads the flag, and only when it has nothing
//!   else to do (an empty `poll_cq`) or is about to post;
//! - every work request posted and not completed comes back through `ibv_poll_cq` with
//!   IBV_WC_WR_FLUSH_ERR, in order per queue, after the completions the router had published.
//!   The library knows which ones those are from its own shadow of each queue ([`Outstanding`]):
//!   the wr_ids posted, retired as `poll_cq` hands their completions out (completions are in
//!   order per queue; a successful send completion retires the unsignaled sends before it, an
//!   error retires one request, as the engine reports errors even for unsignaled sends). The
//!   rings' own indices cannot tell this: the router takes a send off its ring before it
//!   completes (an RNR wait holds it), and publishes completions after releasing the ring.
//!   An SRQ's receives are not flushed (they belong to no QP: a QP in error leaves them, as the
//!   router's own flush does); posting to the SRQ fails;
//! - posts fail with EIO, as mlx5 answers after a fatal error; verbs that need the router fail
//!   (ENODEV, as before) and destroy verbs free the library's side, so programs clean up;
//! - a completion channel's pipe reads end-of-file (the router held its write end), and
//!   `ibv_get_cq_event` returns each armed CQ of the channel that still has something to hand
//!   out, once; then it fails with EIO, as a channel of a disassociated device does.
//!
//! Not done: IBV_EVENT_DEVICE_FATAL (this device has no asynchronous events yet).

use crate::error::VerbsError;
use crate::registry::{debug, lock};
use freeflow_os::poll::{poll, PollFd};
use freeflow_proto::verbs::wc_status;
use freeflow_proto::verbs::work::{wc_opcode, wr_opcode, Cqe};
use freeflow_proto::Producer;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A context's "the router is gone" flag, shared by its objects. Set once, never cleared: a
/// context of a dead attachment stays dead (a new `ibv_open_device` attaches anew).
#[derive(Debug, Clone, Default)]
pub struct Gone(Arc<AtomicBool>);

impl Gone {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The thread that watches a context's attach connection. Dropping it (closing the context)
/// shuts the connection down, which also ends the thread.
#[derive(Debug)]
pub struct Watcher {
    /// Another handle on the attach connection, to shut it down at close.
    conn: UnixStream,
    /// The process that opened the context: a forked child must not shut its parent's
    /// attachment down.
    owner: u32,
}

impl Watcher {
    /// Starts watching `conn` (a duplicate of the attach connection): its hang-up sets `gone`.
    pub fn start(conn: OwnedFd, gone: Gone) -> io::Result<Watcher> {
        let shut = conn.try_clone()?;
        std::thread::Builder::new()
            .name("ffverbs-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || wait_for_hang_up(&conn, &gone))?;
        Ok(Watcher {
            conn: UnixStream::from(shut),
            owner: std::process::id(),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if std::process::id() == self.owner {
            // Wakes the watcher (its poll sees the hang-up), and tells the router at once.
            let _ = self.conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn wait_for_hang_up(conn: &OwnedFd, gone: &Gone) {
    loop {
        // Hang-up and errors are always reported; POLLIN is not asked for, so the queue files
        // the router sends on this connection do not wake us.
        let mut fds = [PollFd::new(conn.as_fd(), libc::POLLRDHUP)];
        match poll(&mut fds, None) {
            Ok(_) if fds[0].revents() != 0 => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    gone.set();
    debug(format_args!(
        "the router closed this context's attachment (it exited or detached us): \
         outstanding work requests complete with IBV_WC_WR_FLUSH_ERR"
    ));
}

/// A work request posted and not yet known to be complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posted {
    pub wr_id: u64,
    /// The `ibv_wc_opcode` its completion has.
    pub wc_opcode: u32,
    /// It gets a completion when it succeeds (receives always do).
    pub signaled: bool,
}

impl Posted {
    pub fn send(wr_id: u64, opcode: u8, signaled: bool) -> Posted {
        let wc_opcode = match opcode {
            wr_opcode::RDMA_WRITE | wr_opcode::RDMA_WRITE_WITH_IMM => wc_opcode::RDMA_WRITE,
            wr_opcode::RDMA_READ => wc_opcode::RDMA_READ,
            wr_opcode::ATOMIC_CMP_AND_SWP => wc_opcode::COMP_SWAP,
            wr_opcode::ATOMIC_FETCH_AND_ADD => wc_opcode::FETCH_ADD,
            _ => wc_opcode::SEND,
        };
        Posted {
            wr_id,
            wc_opcode,
            signaled,
        }
    }

    pub fn recv(wr_id: u64) -> Posted {
        Posted {
            wr_id,
            wc_opcode: wc_opcode::RECV,
            signaled: true,
        }
    }
}

/// A queue's work requests posted and not completed, oldest first. As on hardware, a request
/// holds its place until its completion is polled (or, unsignaled, a later one's), so the queue
/// is full when `capacity` requests are outstanding.
#[derive(Debug)]
pub struct Outstanding {
    list: VecDeque<Posted>,
    capacity: usize,
}

impl Outstanding {
    pub fn new(capacity: usize) -> Outstanding {
        Outstanding {
            list: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn is_full(&self) -> bool {
        self.list.len() >= self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn record(&mut self, posted: Posted) {
        self.list.push_back(posted);
    }

    /// A send completion was polled: a success retires the requests up to the oldest
    /// signaled one (the unsignaled ones before it completed silently); an error retires the
    /// oldest request, whatever its flags.
    pub fn retire_send(&mut self, success: bool) {
        while let Some(p) = self.list.pop_front() {
            if !success || p.signaled {
                return;
            }
        }
    }

    /// A receive completion was polled: it was the oldest receive's.
    pub fn retire_recv(&mut self) {
        self.list.pop_front();
    }

    /// The oldest request, taken out to be flushed.
    pub fn take_oldest(&mut self) -> Option<Posted> {
        self.list.pop_front()
    }
}

/// One of the QP's rings (or an SRQ's ring), the buffer a WQE is built in, and (for a QP's
/// queues) the requests posted and not completed ([`crate::faults`]).
pub(crate) struct Queue {
    pub ring: Producer,
    pub buf: Vec<u8>,
    pub outstanding: Option<Outstanding>,
}

impl Queue {
    /// An SRQ's ring (its receives are not tracked).
    pub(crate) fn new(ring: Producer) -> Mutex<Queue> {
        let size = ring.slot_size();
        Mutex::new(Queue {
            ring,
            buf: vec![0; size],
            outstanding: None,
        })
    }

    /// A QP's send or receive ring, fresh: as many requests may be outstanding as it has slots.
    pub(crate) fn tracked(mut ring: Producer) -> Result<Mutex<Queue>, VerbsError> {
        let slots = ring
            .free_slots()
            .map_err(|e| VerbsError::Protocol(format!("QP ring: {e}")))?;
        let queue = Queue::new(ring);
        lock(&queue).outstanding = Some(Outstanding::new(slots as usize));
        Ok(queue)
    }

    pub(crate) fn outstanding_is_empty(&self) -> bool {
        self.outstanding.as_ref().is_none_or(Outstanding::is_empty)
    }

    /// Retires requests whose completion was polled (`how`: see [`Outstanding`]).
    pub(crate) fn retire(&mut self, how: impl FnOnce(&mut Outstanding)) {
        if let Some(o) = self.outstanding.as_mut() {
            how(o);
        }
    }

    /// Forgets every outstanding request (the QP went to RESET).
    pub(crate) fn clear_outstanding(&mut self) {
        if let Some(o) = self.outstanding.as_mut() {
            while o.take_oldest().is_some() {}
        }
    }

    /// The oldest outstanding request, taken out to be flushed.
    pub(crate) fn take_oldest(&mut self) -> Option<Posted> {
        self.outstanding.as_mut()?.take_oldest()
    }
}

/// A QP's queues as its CQs see them: the CQs retire its requests and flush them.
pub struct QpQueues {
    pub qpn: u32,
    pub send: Mutex<Queue>,
    pub recv: Mutex<Queue>,
    /// Its receives come from an SRQ (not tracked here).
    pub has_srq: bool,
}

/// A QP that completes on a CQ: its queues and which of them complete there.
pub struct CqUser {
    pub queues: Arc<QpQueues>,
    pub sends: bool,
    pub receives: bool,
}

impl CqUser {
    fn tracks_receives(&self) -> bool {
        self.receives && !self.queues.has_srq
    }

    /// Whether a request of this QP waits for a completion on the CQ.
    pub fn has_outstanding(&self) -> bool {
        (self.sends && !lock(&self.queues.send).outstanding_is_empty())
            || (self.tracks_receives() && !lock(&self.queues.recv).outstanding_is_empty())
    }
}

/// Retires the request whose completion `wc` (the bytes of a `struct ibv_wc` just polled)
/// reports, in the shadow of its QP among `users`.
pub fn retire(users: &[CqUser], wc: &[u8]) {
    let word = |at: usize| u32::from_ne_bytes([wc[at], wc[at + 1], wc[at + 2], wc[at + 3]]);
    let (status, opcode, qpn) = (word(8), word(12), word(28));
    let Some(user) = users.iter().find(|u| u.queues.qpn == qpn) else {
        return;
    };
    if opcode & wc_opcode::RECV != 0 {
        if user.tracks_receives() {
            lock(&user.queues.recv).retire(|o| o.retire_recv());
        }
    } else {
        let success = status == wc_status::SUCCESS;
        lock(&user.queues.send).retire(|o| o.retire_send(success));
    }
}

/// The next flush completion of a CQ whose router is gone: the oldest outstanding request of
/// the first of `users` that has one (sends before receives), or None when all are flushed.
pub fn next_flush(users: &[CqUser]) -> Option<Cqe> {
    for user in users {
        let queues = [
            (user.sends, &user.queues.send),
            (user.tracks_receives(), &user.queues.recv),
        ];
        for (completes_here, queue) in queues {
            if !completes_here {
                continue;
            }
            if let Some(p) = lock(queue).take_oldest() {
                return Some(Cqe {
                    wr_id: p.wr_id,
                    status: wc_status::WR_FLUSH_ERR,
                    opcode: p.wc_opcode,
                    qp_num: user.queues.qpn,
                    ..Cqe::default()
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(o: &mut Outstanding) -> Vec<u64> {
        std::iter::from_fn(|| o.take_oldest().map(|p| p.wr_id)).collect()
    }

    #[test]
    fn a_signaled_success_retires_the_unsignaled_sends_before_it() {
        let mut o = Outstanding::new(8);
        o.record(Posted::send(1, wr_opcode::SEND, false));
        o.record(Posted::send(2, wr_opcode::RDMA_WRITE, false));
        o.record(Posted::send(3, wr_opcode::SEND, true));
        o.record(Posted::send(4, wr_opcode::SEND, false));
        o.record(Posted::send(5, wr_opcode::RDMA_READ, true));
        o.retire_send(true);
        assert_eq!(o.list.front().map(|p| p.wr_id), Some(4));
        // An error completes the oldest request, signaled or not.
        o.retire_send(false);
        let left: Vec<Posted> = o.list.iter().copied().collect();
        assert_eq!(left, vec![Posted::send(5, wr_opcode::RDMA_READ, true)]);
        assert_eq!(left[0].wc_opcode, wc_opcode::RDMA_READ);
    }

    #[test]
    fn receives_retire_in_order_and_the_rest_flush_in_order() {
        let mut o = Outstanding::new(3);
        for id in [10, 11, 12] {
            o.record(Posted::recv(id));
        }
        assert!(o.is_full());
        o.retire_recv();
        assert!(!o.is_full());
        assert_eq!(ids(&mut o), vec![11, 12]);
        assert!(o.is_empty());
        o.retire_recv();
        o.retire_send(true);
        assert!(o.is_empty());
    }

    #[test]
    fn the_flag_is_shared_by_clones() {
        let gone = Gone::default();
        let seen = gone.clone();
        assert!(!seen.is_set());
        gone.set();
        assert!(seen.is_set());
    }
}
