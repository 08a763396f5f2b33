//! The engine's data path: executing send WQEs by copying between two containers' registered
//! memory (through `VerbsTable::resolve`, so every key, range and access right is checked
//! against the owner's own table), the waits of RC (RNR, transport retries, full CQs) and the
//! flush of QPs in the error state.
//!
//! Errors become completions as an RC requester and responder report them (see
//! `freeflow_proto::verbs::wc_status`): a bad local key or range is the requester's
//! LOC_PROT_ERR; a bad remote key, range or access right, or a QP that does not allow the
//! access, is REM_ACCESS_ERR (and the responder's QP goes to the error state too, as for the
//! specification's class C responder errors); a receive that is too short is LOC_LEN_ERR at the
//! responder and REM_INV_REQ_ERR at the requester; a receive with a bad key is LOC_PROT_ERR at
//! the responder and REM_OP_ERR at the requester. Atomics work on the 64-bit word in host byte
//! order (both containers are on this host), and return the old value in host order.
//!
//! This module drives a QP's send queue (waits, retries, completions); `ops` carries out each
//! operation, `copy` resolves scatter/gather lists and copies between them, `flush` empties
//! QPs in the error state. A QP whose destination is on another host sends requests to that
//! host's router instead (`remote`, the requester's side), and requests from other hosts'
//! routers are executed by `respond` (the responder's side). UC QPs run the same operations
//! without acknowledgements (what the responder refuses is dropped: `uc_effects`); UD sends
//! are `ud`'s.

mod copy;
mod flush;
mod ops;
mod remote;
mod respond;
mod ud;

pub(in crate::verbs) use remote::silence_budget;

use super::engine::{ack_timeout, rnr_timer, Engine, Fault, Pending, Route, Wait, CQ_FULL_RETRY};
use super::ids::{AttachmentId, CqId, ObjectKey, PdId, QpId, SrqId};
use super::send_op::{wc_opcode_of, SendOp};
use freeflow_proto::verbs::qp::{QpState, QpType};
use freeflow_proto::verbs::work::{send_flags, Cqe, RecvWqe, SendWqe, SendWqeHeader};
use freeflow_proto::verbs::{wc_status, AccessFlags};
use std::time::Instant;

/// Send WQEs one QP may execute per pass before the engine moves on (fairness).
const QP_BATCH: usize = 32;

/// What one executed WQE leaves behind.
#[derive(Debug, Default)]
struct Effects {
    /// For the requester's send CQ.
    sender: Option<Cqe>,
    sender_error: bool,
    /// For the responder's receive CQ (a receive WQE was consumed).
    receiver: Option<Cqe>,
    receiver_error: bool,
}

/// Why a message that consumes a receive could not go.
enum NoReceive {
    /// The responder has none posted (Receiver Not Ready).
    Rnr,
    /// The responder's receive ring is corrupt (its attachment is being detached).
    Broken,
    /// The engine's bookkeeping failed: the requester's attachment ends.
    Fault(Fault),
}

impl From<Fault> for NoReceive {
    fn from(fault: Fault) -> NoReceive {
        NoReceive::Fault(fault)
    }
}

/// The effects of an RC execution as UC has them: a responder that refuses the message (a bad
/// remote key, a receive too short) drops it, so the sender's completion is `success` (its
/// local errors stay); the responder's QP goes to the error state only for a receive it
/// completed with an error.
fn uc_effects(mut e: Effects, success: Option<Cqe>) -> Effects {
    let remote = e.sender.is_some_and(|c| {
        matches!(
            c.status,
            wc_status::REM_ACCESS_ERR | wc_status::REM_INV_REQ_ERR | wc_status::REM_OP_ERR
        )
    });
    if remote {
        e.sender = success.map(|c| Cqe { byte_len: 0, ..c });
        e.sender_error = false;
    }
    e.receiver_error = e.receiver.is_some_and(|c| c.status != wc_status::SUCCESS);
    e
}

/// The pending WQE of the QP at `index`, which the caller set.
fn pending_of(pending: &mut Option<Pending>, index: QpId) -> Result<&mut Pending, Fault> {
    pending.as_mut().ok_or(Fault::Missing {
        what: "pending work request of queue pair",
        index: index.index(),
    })
}

/// What became of one attempt at a send WQE.
enum Outcome {
    /// Completed (successfully or not): take the next.
    Done,
    /// Waiting (RNR, transport retry, full CQ): the queue stops here for now.
    Waiting,
}

/// What [`Engine::take_send`] found on a send ring.
enum Taken {
    /// A WQE, now the QP's pending one.
    Wqe,
    /// Nothing.
    Empty,
    /// A corrupt ring (its owner is being detached).
    Broken,
    /// A malformed WQE: it completed with an error and the QP is in the error state.
    Malformed,
}

/// Facts about the QP at the other end of a connection.
#[derive(Debug, Clone, Copy)]
struct Peer {
    index: QpId,
    owner: AttachmentId,
    pd: PdId,
    qpn: u32,
    recv_cq: CqId,
    /// Where its receives come from: its SRQ, or its own receive queue.
    srq: Option<SrqId>,
    /// The protection domain the keys of its receives belong to (the SRQ's, with one).
    recv_pd: PdId,
    access: AccessFlags,
    min_rnr_timer: u8,
}

impl Engine {
    /// Reads the transport's sockets and handles what came: requests from other hosts'
    /// routers (executed here), and responses to this router's requests.
    pub(in crate::verbs) fn poll_transport(&mut self, now: &mut Option<Instant>) -> usize {
        // A router with no connection to another host pays nothing here (not even the clock).
        if self.remote.idle() {
            return 0;
        }
        let t = *now.get_or_insert_with(Instant::now);
        self.revoke_landings();
        let mut work = self.remote.pump(t);
        work += self.serve_incoming(t);
        work += self.take_responses(t);
        work
    }

    /// Executes up to a batch of send WQEs of the QP at `index` (in RTS). A fault of the
    /// engine's bookkeeping ends the QP's owner.
    pub(in crate::verbs) fn run_send_queue(
        &mut self,
        index: QpId,
        now: &mut Option<Instant>,
    ) -> usize {
        self.try_run_send_queue(index, now).unwrap_or_else(|fault| {
            self.fault_qp(index, fault);
            0
        })
    }

    fn try_run_send_queue(
        &mut self,
        index: QpId,
        now: &mut Option<Instant>,
    ) -> Result<usize, Fault> {
        let mut done = 0;
        let mut popped = false;
        if self.qps.entry(index)?.remote.is_some() {
            self.tick_remote(index, now)?;
        }
        while done < QP_BATCH {
            let qp = self.qps.entry_mut(index)?;
            if qp.state != QpState::Rts || qp.broken {
                break;
            }
            if qp.pending.is_none() {
                // A WQE's completion always needs room in the send CQ (errors complete even
                // unsignaled): check before taking it off the ring, counting the signaled
                // requests in flight to another host (an error of an unsignaled one waits for
                // room: its answer stays in the connection's buffer until then).
                let send_cq = qp.send_cq;
                let signaled = qp.remote.as_ref().map_or(0, |r| r.signaled);
                if !self.room(send_cq, 1 + signaled) {
                    self.hold(index, now);
                    break;
                }
                match self.take_send(index, send_cq)? {
                    Taken::Wqe => popped = true,
                    Taken::Empty | Taken::Broken => break,
                    Taken::Malformed => {
                        popped = true;
                        done += 1;
                        break;
                    }
                }
            }
            match self.execute(index, now)? {
                Outcome::Done => done += 1,
                Outcome::Waiting => break,
            }
        }
        if popped {
            self.qps.entry_mut(index)?.sq.release();
        }
        Ok(done)
    }

    /// Takes the next send WQE off the ring of the QP at `index` (in RTS, with room in its
    /// send CQ `send_cq`) and makes it the QP's pending one.
    fn take_send(&mut self, index: QpId, send_cq: CqId) -> Result<Taken, Fault> {
        let qp = self.qps.entry_mut(index)?;
        qp.held = None;
        match qp.sq.pop(&mut qp.sq_slot) {
            Ok(true) => {}
            Ok(false) => return Ok(Taken::Empty),
            Err(e) => {
                self.break_qp(index, e);
                return Ok(Taken::Broken);
            }
        }
        // An operation the QP's transport does not have (a UC READ, a UD WRITE) is malformed
        // too: the shim refuses it at post time.
        let qp_type = qp.qp_type;
        let decoded = SendWqe::decode(&qp.sq_slot, qp.cap.max_send_sge, qp.cap.max_inline_data)
            .ok()
            .filter(|wqe| qp_type == QpType::Rc || qp_type.allows(u32::from(wqe.header.opcode)))
            .and_then(|wqe| Some((wqe, SendOp::decode(wqe.header.opcode)?)));
        let Some((wqe, op)) = decoded else {
            // Malformed (a shim would not write it): the QP fails as a device's does on a bad
            // WQE.
            let h = SendWqeHeader::read(&qp.sq_slot);
            let cqe = Cqe {
                wr_id: h.wr_id,
                status: wc_status::LOC_QP_OP_ERR,
                opcode: wc_opcode_of(h.opcode),
                qp_num: qp.qpn,
                ..Cqe::default()
            };
            qp.state = QpState::Err;
            self.push_cqe(send_cq, &cqe);
            return Ok(Taken::Malformed);
        };
        self.counters.ops += 1;
        self.counters.bytes += remote::estimate(&wqe, op, &qp.sq_slot);
        qp.pending = Some(Pending {
            wqe,
            op,
            wait: Wait::Ready,
        });
        Ok(Taken::Wqe)
    }

    /// Whether the CQ at `cq` has room for `n` more entries (false for a broken one).
    pub(in crate::verbs) fn room(&mut self, cq: CqId, n: u32) -> bool {
        let Some(c) = self.cqs.get_mut(cq) else {
            return false;
        };
        if c.broken {
            return false;
        }
        match c.ring.free_slots() {
            Ok(free) => free >= n,
            Err(e) => {
                c.broken = true;
                let owner = c.owner;
                self.break_owner(owner, e);
                false
            }
        }
    }

    /// Holds the QP back for a full CQ; the shard retries after [`CQ_FULL_RETRY`].
    fn hold(&mut self, index: QpId, now: &mut Option<Instant>) {
        let t = *now.get_or_insert_with(Instant::now);
        if let Some(qp) = self.qps.get_mut(index) {
            qp.held = Some(t + CQ_FULL_RETRY);
        }
    }

    /// Pushes a completion (room was checked) and marks the CQ for publishing.
    pub(in crate::verbs) fn push_cqe(&mut self, cq: CqId, cqe: &Cqe) {
        let Some(c) = self.cqs.get_mut(cq) else {
            return;
        };
        if c.broken {
            return;
        }
        // Stamped as it is produced, for a CQ that asked (`ibv_create_cq_ex` with completion
        // timestamps): a clock read per completion, which other CQs do not pay.
        let pushed = match c.stamped {
            true => c
                .ring
                .push(&cqe.encode_stamped(freeflow_proto::clock::monotonic_ns())),
            false => c.ring.push(&cqe.encode()),
        };
        match pushed {
            Ok(true) => {
                if !c.dirty {
                    c.dirty = true;
                    self.dirty.push(cq);
                }
            }
            // Room was checked before the work request ran.
            Ok(false) => debug_assert!(false, "CQ full after a room check"),
            Err(e) => {
                c.broken = true;
                let owner = c.owner;
                self.break_owner(owner, e);
            }
        }
    }

    /// The QP a connection leads to, if it is there, ready to receive (RTR or RTS) and
    /// connected back to the sender, in the sender's tenant: what an RC responder accepts.
    fn peer(&self, index: QpId, route: Route) -> Option<Peer> {
        let me = self.qps.get(index)?;
        let my_ctx = self.contexts.get(&me.owner)?;
        let Route::Local { ip, qpn } = route else {
            return None;
        };
        let p_index = self.qp_by_number(qpn)?;
        let p = self.qps.get(p_index)?;
        let p_ctx = self.contexts.get(&p.owner)?;
        if p_ctx.container.ip != ip || p_ctx.tenant != my_ctx.tenant {
            return None;
        }
        if !matches!(p.state, QpState::Rtr | QpState::Rts) || p.broken || p.qp_type != me.qp_type {
            return None;
        }
        let back = Route::Local {
            ip: my_ctx.container.ip,
            qpn: me.qpn,
        };
        if p.route != Some(back) {
            return None;
        }
        let recv_pd = match p.srq {
            Some(i) => self.srqs.get(i)?.pd,
            None => p.pd,
        };
        Some(Peer {
            index: p_index,
            owner: p.owner,
            pd: p.pd,
            qpn: p.qpn,
            recv_cq: p.recv_cq,
            srq: p.srq,
            recv_pd,
            access: AccessFlags::from_bits_retain(p.attr.qp_access_flags),
            min_rnr_timer: p.attr.min_rnr_timer,
        })
    }

    /// Completes the pending WQE of `index` with `status` (an error) and moves the QP to the
    /// error state.
    fn fail_pending(&mut self, index: QpId, status: u32) -> Result<Outcome, Fault> {
        let qp = self.qps.entry_mut(index)?;
        let Some(p) = qp.pending.take() else {
            return Ok(Outcome::Done);
        };
        let cqe = Cqe {
            wr_id: p.wqe.header.wr_id,
            status,
            opcode: p.op.wc_opcode(),
            qp_num: qp.qpn,
            ..Cqe::default()
        };
        qp.state = QpState::Err;
        let send_cq = qp.send_cq;
        self.push_cqe(send_cq, &cqe);
        Ok(Outcome::Done)
    }

    /// The destination did not take the packet: wait a local ACK timeout and retry, up to
    /// `retry_cnt` times, then IBV_WC_RETRY_EXC_ERR.
    fn transport_wait(&mut self, index: QpId, now: &mut Option<Instant>) -> Result<Outcome, Fault> {
        let t = *now.get_or_insert_with(Instant::now);
        let qp = self.qps.entry_mut(index)?;
        let period = ack_timeout(qp.attr.timeout).unwrap_or(CQ_FULL_RETRY);
        let infinite = qp.attr.timeout == 0;
        let retry_cnt = qp.attr.retry_cnt;
        let pending = pending_of(&mut qp.pending, index)?;
        pending.wait = match pending.wait {
            Wait::Transport { left, deadline } if t < deadline => {
                Wait::Transport { left, deadline }
            }
            Wait::Transport { left, .. } if infinite || left > 1 => Wait::Transport {
                left: if infinite { left } else { left - 1 },
                deadline: t + period,
            },
            Wait::Transport { .. } => return self.fail_pending(index, wc_status::RETRY_EXC_ERR),
            _ if retry_cnt == 0 && !infinite => {
                return self.fail_pending(index, wc_status::RETRY_EXC_ERR)
            }
            _ => Wait::Transport {
                left: retry_cnt,
                deadline: t + period,
            },
        };
        Ok(Outcome::Waiting)
    }

    /// The responder had no receive: wait its RNR timer and retry, up to `rnr_retry` times (7:
    /// for ever), then IBV_WC_RNR_RETRY_EXC_ERR. A receive posted meanwhile is taken at the
    /// next pass (a retry that came early).
    fn rnr_wait(
        &mut self,
        index: QpId,
        peer: &Peer,
        now: &mut Option<Instant>,
    ) -> Result<Outcome, Fault> {
        let t = *now.get_or_insert_with(Instant::now);
        let period = rnr_timer(peer.min_rnr_timer);
        let qp = self.qps.entry_mut(index)?;
        let rnr_retry = qp.attr.rnr_retry;
        let pending = pending_of(&mut qp.pending, index)?;
        pending.wait = match pending.wait {
            Wait::Rnr { left, deadline } if t < deadline => Wait::Rnr { left, deadline },
            Wait::Rnr { left: 7, .. } => Wait::Rnr {
                left: 7,
                deadline: t + period,
            },
            Wait::Rnr { left, .. } if left > 1 => Wait::Rnr {
                left: left - 1,
                deadline: t + period,
            },
            Wait::Rnr { .. } => return self.fail_pending(index, wc_status::RNR_RETRY_EXC_ERR),
            _ if rnr_retry == 0 => return self.fail_pending(index, wc_status::RNR_RETRY_EXC_ERR),
            _ => Wait::Rnr {
                left: rnr_retry,
                deadline: t + period,
            },
        };
        Ok(Outcome::Waiting)
    }

    /// One attempt at the pending WQE of the QP at `index`.
    fn execute(&mut self, index: QpId, now: &mut Option<Instant>) -> Result<Outcome, Fault> {
        let qp = self.qps.entry_mut(index)?;
        let pending = *pending_of(&mut qp.pending, index)?;
        let (send_cq, route, qp_type) = (qp.send_cq, qp.route, qp.qp_type);
        if !self.room(send_cq, 1) {
            self.hold(index, now);
            return Ok(Outcome::Waiting);
        }
        if qp_type == QpType::Ud {
            return self.execute_ud(index, &pending, now);
        }
        if let Some(Route::Remote { link, ip, qpn }) = route {
            return self.execute_remote(index, (link, ip, qpn), now);
        }
        let unreliable = qp_type == QpType::Uc;
        let Some(peer) = route.and_then(|r| self.peer(index, r)) else {
            if unreliable {
                return self.uc_dropped(index);
            }
            return self.transport_wait(index, now);
        };
        if pending.op.consumes_receive() {
            let both = if peer.recv_cq == send_cq { 2 } else { 1 };
            if !self.room(peer.recv_cq, both) {
                self.hold(index, now);
                return Ok(Outcome::Waiting);
            }
        }
        let qp = self.qps.entry_mut(index)?;
        qp.held = None;
        let slot = std::mem::take(&mut qp.sq_slot);
        let moved = self.move_data(index, &peer, &pending, &slot);
        self.qps.entry_mut(index)?.sq_slot = slot;
        let effects = match moved {
            Ok(effects) if unreliable => uc_effects(effects, self.uc_success(index)?),
            Ok(effects) => effects,
            Err(NoReceive::Rnr | NoReceive::Broken) if unreliable => return self.uc_dropped(index),
            Err(NoReceive::Rnr) => return self.rnr_wait(index, &peer, now),
            Err(NoReceive::Broken) => return self.transport_wait(index, now),
            Err(NoReceive::Fault(fault)) => return Err(fault),
        };
        let recv_cq = peer.recv_cq;
        if let Some(c) = effects.receiver {
            self.push_cqe(recv_cq, &c);
        }
        if let Some(c) = effects.sender {
            self.push_cqe(send_cq, &c);
        }
        let qp = self.qps.entry_mut(index)?;
        qp.pending = None;
        if effects.sender_error {
            qp.state = QpState::Err;
        }
        if effects.receiver_error {
            if let Some(p) = self.qps.get_mut(peer.index) {
                p.state = QpState::Err;
            }
        }
        Ok(Outcome::Done)
    }

    /// The sender's completion of a UC message that left, if it asked for one: UC has no
    /// acknowledgement, so the sender cannot learn what became of it.
    fn uc_success(&mut self, index: QpId) -> Result<Option<Cqe>, Fault> {
        let qp = self.qps.entry_mut(index)?;
        let p = pending_of(&mut qp.pending, index)?;
        let signaled = qp.sq_sig_all || p.wqe.header.has(send_flags::SIGNALED);
        Ok(signaled.then_some(Cqe {
            wr_id: p.wqe.header.wr_id,
            opcode: p.op.wc_opcode(),
            qp_num: qp.qpn,
            ..Cqe::default()
        }))
    }

    /// A UC message found no QP to take it (none there, not ready, no receive posted): it is
    /// dropped, and the sender completes as if it arrived.
    fn uc_dropped(&mut self, index: QpId) -> Result<Outcome, Fault> {
        let done = self.uc_success(index)?;
        let qp = self.qps.entry_mut(index)?;
        qp.pending = None;
        qp.held = None;
        let send_cq = qp.send_cq;
        if let Some(c) = done {
            self.push_cqe(send_cq, &c);
        }
        Ok(Outcome::Done)
    }

    /// Whether the responder has a receive posted (in its SRQ, if it has one: an empty SRQ
    /// is Receiver Not Ready as an empty receive queue is).
    fn receive_ready(&mut self, peer: &Peer) -> Result<(), NoReceive> {
        let available = match peer.srq {
            None => {
                let p = self.qps.get_mut(peer.index).ok_or(NoReceive::Broken)?;
                p.rq.available().map_err(|e| {
                    p.broken = true;
                    (p.owner, e)
                })
            }
            Some(i) => {
                let q = self.srqs.get_mut(i).ok_or(NoReceive::Broken)?;
                if q.broken {
                    return Err(NoReceive::Broken);
                }
                q.ring.available().map_err(|e| {
                    q.broken = true;
                    (q.owner, e)
                })
            }
        };
        match available {
            Ok(0) => Err(NoReceive::Rnr),
            Ok(_) => Ok(()),
            Err((owner, e)) => {
                self.break_owner(owner, e);
                Err(NoReceive::Broken)
            }
        }
    }

    /// Takes the responder's next receive WQE (one is there: checked before) into its slot
    /// copy `rq_slot`, from its SRQ if it has one.
    fn take_receive(&mut self, peer: &Peer) -> Result<RecvWqe, ()> {
        let p = self.qps.get_mut(peer.index).ok_or(())?;
        let (ring, max_sge) = match peer.srq {
            None => (&mut p.rq, p.cap.max_recv_sge),
            Some(i) => {
                let q = self.srqs.get_mut(i).ok_or(())?;
                (&mut q.ring, q.attr.max_sge)
            }
        };
        match ring.pop(&mut p.rq_slot) {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err(()),
        }
        ring.release();
        let wqe = RecvWqe::decode(&p.rq_slot, max_sge).map_err(|_| ());
        if let Some(i) = peer.srq {
            self.check_srq_limit(i);
        }
        wqe
    }

    /// The wr_id of the receive WQE in the responder's slot copy (for a malformed one).
    fn receive_wr_id(&self, peer: &Peer) -> u64 {
        self.qps
            .get(peer.index)
            .and_then(|p| p.rq_slot.first_chunk().copied())
            .map_or(0, u64::from_le_bytes)
    }
}
