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
//!   The library knows which ones those are from its own shadow of each queue
//!   ([`crate::shadow`], a lock-free ring): the wr_ids posted, retired as `poll_cq` hands their
//!   completions out (completions are in order per queue; a successful send completion retires
//!   the unsignaled sends before it, an error retires one request, as the engine reports errors
//!   even for unsignaled sends). A CQ finds the QP of a completion by its number ([`CqUsers`]:
//!   the last QP found first). The
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
//! - the context's asynchronous event queue gets IBV_EVENT_DEVICE_FATAL (see
//!   [`crate::async_event`]), as a real device raises when it dies.

use crate::async_event::AsyncEvents;
use crate::error::VerbsError;
use crate::registry::{debug, lock};
use crate::shadow::{Shadow, ShadowWriter};
use freeflow_os::poll::{poll, PollFd};
use freeflow_proto::verbs::wc_status;
use freeflow_proto::verbs::work::{wc_opcode, Cqe};
use freeflow_proto::Producer;
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
    /// Starts watching `conn` (a duplicate of the attach connection): its hang-up sets `gone`
    /// and raises IBV_EVENT_DEVICE_FATAL. Meanwhile the records of the router's event pipe
    /// `pipe` (if the router gave one) become the events of the context at `context`.
    pub fn start(
        conn: OwnedFd,
        gone: Gone,
        events: Arc<AsyncEvents>,
        pipe: Option<OwnedFd>,
        context: usize,
    ) -> io::Result<Watcher> {
        let shut = conn.try_clone()?;
        std::thread::Builder::new()
            .name("ffverbs-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                watch(&conn, pipe, &events, context);
                gone.set();
                events.device_fatal();
                debug(format_args!(
                    "the router closed this context's attachment (it exited or detached us): \
                     outstanding work requests complete with IBV_WC_WR_FLUSH_ERR"
                ));
            })?;
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

/// Returns when `conn` hangs up; passes the event pipe's records on meanwhile.
fn watch(conn: &OwnedFd, mut pipe: Option<OwnedFd>, events: &AsyncEvents, context: usize) {
    loop {
        // Hang-up and errors are always reported; POLLIN is not asked for on the connection,
        // so the queue files the router sends on it do not wake us.
        let mut fds = [PollFd::new(conn.as_fd(), libc::POLLRDHUP)];
        let mut both;
        let fds: &mut [PollFd] = match &pipe {
            Some(p) => {
                both = [fds[0], PollFd::new(p.as_fd(), libc::POLLIN)];
                &mut both
            }
            None => &mut fds,
        };
        match poll(fds, None) {
            Ok(_) if fds[0].revents() != 0 => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        let ready = fds.get(1).is_some_and(|f| f.revents() != 0);
        if ready && !pipe.as_ref().is_some_and(|p| events.pump(p, context)) {
            // Closed: the router is gone (the connection's hang-up follows).
            pipe = None;
        }
    }
}

/// One of the QP's rings (or an SRQ's ring), the buffer a WQE is built in, and (for a QP's
/// queues) the posting side of its shadow ([`crate::shadow`]).
pub(crate) struct Queue {
    pub ring: Producer,
    pub buf: Vec<u8>,
    pub shadow: Option<ShadowWriter>,
}

impl Queue {
    /// An SRQ's ring (its receives are not tracked).
    pub(crate) fn new(ring: Producer) -> Mutex<Queue> {
        let size = ring.slot_size();
        Mutex::new(Queue {
            ring,
            buf: vec![0; size],
            shadow: None,
        })
    }

    /// A QP's send or receive ring, fresh: as many requests may be outstanding as it has slots.
    pub(crate) fn tracked(mut ring: Producer) -> Result<Mutex<Queue>, VerbsError> {
        let slots = ring
            .free_slots()
            .map_err(|e| VerbsError::Protocol(format!("QP ring: {e}")))?;
        let queue = Queue::new(ring);
        lock(&queue).shadow = Some(ShadowWriter::new(Arc::new(Shadow::new(slots))));
        Ok(queue)
    }

    /// The shadow its CQ retires and flushes.
    pub(crate) fn shadow(&self) -> Option<Arc<Shadow>> {
        self.shadow.as_ref().map(|w| w.shadow().clone())
    }

    /// Forgets every outstanding request (the QP went to RESET).
    pub(crate) fn forget_outstanding(&mut self) {
        if let Some(w) = self.shadow.as_mut() {
            w.forget_all();
        }
    }
}

/// A QP's queues, as its post verbs use them.
pub struct QpQueues {
    pub qpn: u32,
    pub send: Mutex<Queue>,
    pub recv: Mutex<Queue>,
    /// Its receives come from an SRQ (not tracked).
    pub has_srq: bool,
}

/// A QP that completes on a CQ: the shadows of its queues that complete there (none for
/// receives taken from an SRQ).
pub struct CqUser {
    pub qpn: u32,
    pub sends: Option<Arc<Shadow>>,
    pub receives: Option<Arc<Shadow>>,
}

impl CqUser {
    /// Whether a request of this QP waits for a completion on the CQ.
    pub fn has_outstanding(&self) -> bool {
        [&self.sends, &self.receives]
            .into_iter()
            .flatten()
            .any(|s| s.has_outstanding())
    }
}

/// The QPs completing on one CQ, found by QP number. A CQ usually serves one QP or a few, and
/// completions come in runs of one QP: the last one found is tried first, then the list.
#[derive(Default)]
pub struct CqUsers {
    list: Vec<CqUser>,
    last: usize,
}

impl CqUsers {
    pub fn add(&mut self, user: CqUser) {
        self.list.push(user);
    }

    pub fn remove(&mut self, qpn: u32) {
        self.list.retain(|u| u.qpn != qpn);
        self.last = 0;
    }

    pub fn iter(&self) -> impl Iterator<Item = &CqUser> {
        self.list.iter()
    }

    fn find(&mut self, qpn: u32) -> Option<&CqUser> {
        if self.list.get(self.last).is_none_or(|u| u.qpn != qpn) {
            self.last = self.list.iter().position(|u| u.qpn == qpn)?;
        }
        self.list.get(self.last)
    }

    /// Retires the request whose completion `wc` (the bytes of a `struct ibv_wc` just polled)
    /// reports, in the shadow of its QP.
    pub fn retire(&mut self, wc: &[u8]) {
        let word = |at: usize| u32::from_ne_bytes([wc[at], wc[at + 1], wc[at + 2], wc[at + 3]]);
        let (status, opcode, qpn) = (word(8), word(12), word(28));
        let Some(user) = self.find(qpn) else {
            return;
        };
        if opcode & wc_opcode::RECV != 0 {
            if let Some(s) = &user.receives {
                s.retire_recv();
            }
        } else if let Some(s) = &user.sends {
            s.retire_send(status == wc_status::SUCCESS);
        }
    }

    /// The next flush completion of a CQ whose router is gone: the oldest outstanding request
    /// of the first QP that has one (sends before receives), or None when all are flushed.
    pub fn next_flush(&self) -> Option<Cqe> {
        self.list.iter().find_map(|user| {
            let p = [&user.sends, &user.receives]
                .into_iter()
                .flatten()
                .find_map(|s| s.take_oldest())?;
            Some(Cqe {
                wr_id: p.wr_id,
                status: wc_status::WR_FLUSH_ERR,
                opcode: p.wc_opcode,
                qp_num: user.qpn,
                ..Cqe::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shadow::{Posted, ShadowWriter};
    use freeflow_proto::verbs::work::wr_opcode;

    #[test]
    fn the_flag_is_shared_by_clones() {
        let gone = Gone::default();
        let seen = gone.clone();
        assert!(!seen.is_set());
        gone.set();
        assert!(seen.is_set());
    }

    fn wc(qpn: u32, opcode: u32, status: u32) -> Vec<u8> {
        let mut wc = vec![0u8; 48];
        wc[8..12].copy_from_slice(&status.to_ne_bytes());
        wc[12..16].copy_from_slice(&opcode.to_ne_bytes());
        wc[28..32].copy_from_slice(&qpn.to_ne_bytes());
        wc
    }

    #[test]
    fn completions_retire_in_their_own_qps_shadow_and_the_rest_flush_in_order() {
        let mut users = CqUsers::default();
        let mut writers = Vec::new();
        for qpn in [7, 9] {
            let mut sends = ShadowWriter::new(Arc::new(Shadow::new(8)));
            let mut recvs = ShadowWriter::new(Arc::new(Shadow::new(8)));
            for id in 0..3 {
                sends.record(Posted::send(
                    u64::from(qpn) * 10 + id,
                    wr_opcode::SEND,
                    true,
                ));
                recvs.record(Posted::recv(u64::from(qpn) * 100 + id));
            }
            users.add(CqUser {
                qpn,
                sends: Some(sends.shadow().clone()),
                receives: Some(recvs.shadow().clone()),
            });
            writers.push((sends, recvs));
        }
        users.retire(&wc(9, wc_opcode::SEND, wc_status::SUCCESS));
        users.retire(&wc(7, wc_opcode::RECV, wc_status::SUCCESS));
        users.retire(&wc(9, wc_opcode::RECV, wc_status::SUCCESS));
        users.retire(&wc(9, wc_opcode::RECV, wc_status::SUCCESS));
        // A completion of a QP the CQ does not know changes nothing.
        users.retire(&wc(8, wc_opcode::RECV, wc_status::SUCCESS));
        let flushed: Vec<(u32, u64)> = std::iter::from_fn(|| users.next_flush())
            .map(|c| {
                assert_eq!(c.status, wc_status::WR_FLUSH_ERR);
                (c.qp_num, c.wr_id)
            })
            .collect();
        let expected = [
            (7, 70),
            (7, 71),
            (7, 72),
            (7, 701),
            (7, 702),
            (9, 91),
            (9, 92),
            (9, 902),
        ];
        assert_eq!(flushed, expected);
        users.remove(7);
        assert!(users.iter().all(|u| !u.has_outstanding()));
    }
}
