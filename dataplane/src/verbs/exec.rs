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

use super::engine::{ack_timeout, rnr_timer, Engine, Pending, Route, Wait, CQ_FULL_RETRY};
use super::{Key, MemView, Need, VerbsTable};
use freeflow_proto::verbs::qp::QpState;
use freeflow_proto::verbs::work::{
    send_flags, wc_flags, wc_opcode, wr_opcode, Cqe, RecvWqe, SendWqe, SendWqeHeader, Sge, MAX_SGE,
    RECV_WQE_HEADER,
};
use freeflow_proto::verbs::{access, limits, wc_status};
use std::time::Instant;

/// Send WQEs one QP may execute per pass before the engine moves on (fairness).
const QP_BATCH: usize = 32;

type Views<'a> = [Option<MemView<'a>>; MAX_SGE as usize];

/// The completion opcode of a send opcode (flushes of garbage report SEND).
fn wc_opcode_of(op: u8) -> u32 {
    match op {
        wr_opcode::RDMA_WRITE | wr_opcode::RDMA_WRITE_WITH_IMM => wc_opcode::RDMA_WRITE,
        wr_opcode::RDMA_READ => wc_opcode::RDMA_READ,
        wr_opcode::ATOMIC_CMP_AND_SWP => wc_opcode::COMP_SWAP,
        wr_opcode::ATOMIC_FETCH_AND_ADD => wc_opcode::FETCH_ADD,
        _ => wc_opcode::SEND,
    }
}

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
}

/// What became of one attempt at a send WQE.
enum Outcome {
    /// Completed (successfully or not): take the next.
    Done,
    /// Waiting (RNR, transport retry, full CQ): the queue stops here for now.
    Waiting,
}

/// Facts about the QP at the other end of a connection.
#[derive(Debug, Clone, Copy)]
struct Peer {
    index: usize,
    owner: u32,
    pd: u32,
    qpn: u32,
    recv_cq: usize,
    /// Where its receives come from: its SRQ, or its own receive queue.
    srq: Option<usize>,
    /// The protection domain the keys of its receives belong to (the SRQ's, with one).
    recv_pd: u32,
    access: u32,
    min_rnr_timer: u8,
}

/// Resolves a scatter/gather list into `views`; returns the total length.
fn resolve_list<'a>(
    table: &'a VerbsTable,
    pd: u32,
    sges: impl Iterator<Item = Sge>,
    need: Need,
    views: &mut Views<'a>,
) -> Result<u64, ()> {
    let mut total = 0u64;
    for (slot, sge) in views.iter_mut().zip(sges) {
        let view = table
            .resolve(
                pd,
                Key::Local(sge.lkey),
                sge.addr,
                u64::from(sge.length),
                need,
            )
            .map_err(|_| ())?;
        total += u64::from(sge.length);
        *slot = Some(view);
    }
    Ok(total)
}

/// Where bytes come from: registered memory or a WQE's inline data.
enum Source<'s, 'a> {
    Views(&'s [Option<MemView<'a>>]),
    Bytes(&'s [u8]),
}

/// Copies `len` bytes of `src` into `dst` (whose total is at least `len`), piece by piece.
fn copy(dst: &[Option<MemView<'_>>], src: Source<'_, '_>, len: u64) {
    let mut dst_pieces = dst.iter().flatten();
    let mut current = dst_pieces.next();
    let mut at = 0usize;
    let mut left = len as usize;
    let mut put = |bytes: Option<&MemView<'_>>, data: Option<&[u8]>, n: usize| {
        // Copies n bytes from `bytes` (a view) or `data` into the destination pieces.
        let mut done = 0;
        while done < n {
            let Some(d) = current else { return };
            if at == d.len() {
                current = dst_pieces.next();
                at = 0;
                continue;
            }
            let step = (n - done).min(d.len() - at);
            let target = d.slice(at, step).expect("inside the piece");
            match (bytes, data) {
                (Some(v), _) => target
                    .copy_from(&v.slice(done, step).expect("inside the source"))
                    .expect("same lengths"),
                (None, Some(b)) => target
                    .write_at(0, &b[done..done + step])
                    .expect("inside the piece"),
                (None, None) => {}
            }
            at += step;
            done += step;
        }
    };
    match src {
        Source::Views(views) => {
            for v in views.iter().flatten() {
                let n = v.len().min(left);
                put(Some(v), None, n);
                left -= n;
            }
        }
        Source::Bytes(b) => put(None, Some(&b[..left.min(b.len())]), left.min(b.len())),
    }
}

impl Engine {
    /// Executes up to a batch of send WQEs of the QP at `index` (in RTS).
    pub(super) fn run_send_queue(&mut self, index: usize, now: &mut Option<Instant>) -> usize {
        let mut done = 0;
        let mut popped = false;
        while done < QP_BATCH {
            let qp = self.qps.get_mut(index).expect("caller checked");
            if qp.state != QpState::Rts || qp.broken {
                break;
            }
            if qp.pending.is_none() {
                // A WQE's completion always needs room in the send CQ (errors complete even
                // unsignaled): check before taking it off the ring.
                let send_cq = qp.send_cq;
                if !self.room(send_cq, 1) {
                    self.hold(index, now);
                    break;
                }
                let qp = self.qps.get_mut(index).expect("caller checked");
                qp.held = None;
                match qp.sq.pop(&mut qp.sq_slot) {
                    Ok(true) => popped = true,
                    Ok(false) => break,
                    Err(e) => {
                        qp.broken = true;
                        let owner = qp.owner;
                        self.break_owner(owner, e);
                        break;
                    }
                }
                match SendWqe::decode(&qp.sq_slot, qp.cap.max_send_sge, qp.cap.max_inline_data) {
                    Ok(wqe) => {
                        qp.pending = Some(Pending {
                            wqe,
                            wait: Wait::Ready,
                        })
                    }
                    Err(_) => {
                        // Malformed (a shim would not write it): the QP fails as a device's
                        // does on a bad WQE.
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
                        done += 1;
                        break;
                    }
                }
            }
            match self.execute(index, now) {
                Outcome::Done => done += 1,
                Outcome::Waiting => break,
            }
        }
        if popped {
            if let Some(qp) = self.qps.get_mut(index) {
                qp.sq.release();
            }
        }
        done
    }

    /// Whether the CQ at `cq` has room for `n` more entries (false for a broken one).
    pub(super) fn room(&mut self, cq: usize, n: u32) -> bool {
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
    fn hold(&mut self, index: usize, now: &mut Option<Instant>) {
        let t = *now.get_or_insert_with(Instant::now);
        if let Some(qp) = self.qps.get_mut(index) {
            qp.held = Some(t + CQ_FULL_RETRY);
        }
    }

    /// Pushes a completion (room was checked) and marks the CQ for publishing.
    pub(super) fn push_cqe(&mut self, cq: usize, cqe: &Cqe) {
        let Some(c) = self.cqs.get_mut(cq) else {
            return;
        };
        if c.broken {
            return;
        }
        match c.ring.push(&cqe.encode()) {
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
    fn peer(&self, index: usize, route: Route) -> Option<Peer> {
        let me = self.qps.get(index)?;
        let my_ctx = self.contexts.get(&me.owner)?;
        let Route::Local { ip, qpn } = route;
        let p_index = self.qp_by_number(qpn)?;
        let p = self.qps.get(p_index)?;
        let p_ctx = self.contexts.get(&p.owner)?;
        if p_ctx.container.ip != ip || p_ctx.tenant != my_ctx.tenant {
            return None;
        }
        if !matches!(p.state, QpState::Rtr | QpState::Rts) || p.broken {
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
            access: p.attr.qp_access_flags,
            min_rnr_timer: p.attr.min_rnr_timer,
        })
    }

    /// Completes the pending WQE of `index` with `status` (an error) and moves the QP to the
    /// error state.
    fn fail_pending(&mut self, index: usize, status: u32) -> Outcome {
        let qp = self.qps.get_mut(index).expect("caller checked");
        let Some(p) = qp.pending.take() else {
            return Outcome::Done;
        };
        let cqe = Cqe {
            wr_id: p.wqe.header.wr_id,
            status,
            opcode: wc_opcode_of(p.wqe.header.opcode),
            qp_num: qp.qpn,
            ..Cqe::default()
        };
        qp.state = QpState::Err;
        let send_cq = qp.send_cq;
        self.push_cqe(send_cq, &cqe);
        Outcome::Done
    }

    /// The destination did not take the packet: wait a local ACK timeout and retry, up to
    /// `retry_cnt` times, then IBV_WC_RETRY_EXC_ERR.
    fn transport_wait(&mut self, index: usize, now: &mut Option<Instant>) -> Outcome {
        let t = *now.get_or_insert_with(Instant::now);
        let qp = self.qps.get_mut(index).expect("caller checked");
        let period = ack_timeout(qp.attr.timeout).unwrap_or(CQ_FULL_RETRY);
        let infinite = qp.attr.timeout == 0;
        let retry_cnt = qp.attr.retry_cnt;
        let pending = qp.pending.as_mut().expect("caller checked");
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
        Outcome::Waiting
    }

    /// The responder had no receive: wait its RNR timer and retry, up to `rnr_retry` times (7:
    /// for ever), then IBV_WC_RNR_RETRY_EXC_ERR. A receive posted meanwhile is taken at the
    /// next pass (a retry that came early).
    fn rnr_wait(&mut self, index: usize, peer: &Peer, now: &mut Option<Instant>) -> Outcome {
        let t = *now.get_or_insert_with(Instant::now);
        let period = rnr_timer(peer.min_rnr_timer);
        let qp = self.qps.get_mut(index).expect("caller checked");
        let rnr_retry = qp.attr.rnr_retry;
        let pending = qp.pending.as_mut().expect("caller checked");
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
        Outcome::Waiting
    }

    /// One attempt at the pending WQE of the QP at `index`.
    fn execute(&mut self, index: usize, now: &mut Option<Instant>) -> Outcome {
        let qp = self.qps.get(index).expect("caller checked");
        let pending = qp.pending.expect("caller set it");
        let (send_cq, route) = (qp.send_cq, qp.route);
        let op = pending.wqe.header.opcode;
        if !self.room(send_cq, 1) {
            self.hold(index, now);
            return Outcome::Waiting;
        }
        let Some(peer) = route.and_then(|r| self.peer(index, r)) else {
            return self.transport_wait(index, now);
        };
        let needs_recv = matches!(
            op,
            wr_opcode::SEND | wr_opcode::SEND_WITH_IMM | wr_opcode::RDMA_WRITE_WITH_IMM
        );
        if needs_recv {
            let both = if peer.recv_cq == send_cq { 2 } else { 1 };
            if !self.room(peer.recv_cq, both) {
                self.hold(index, now);
                return Outcome::Waiting;
            }
        }
        if let Some(qp) = self.qps.get_mut(index) {
            qp.held = None;
        }
        let slot = std::mem::take(&mut self.qps.get_mut(index).expect("checked").sq_slot);
        let moved = self.move_data(index, &peer, &pending, &slot);
        self.qps.get_mut(index).expect("checked").sq_slot = slot;
        let effects = match moved {
            Ok(effects) => effects,
            Err(NoReceive::Rnr) => return self.rnr_wait(index, &peer, now),
            Err(NoReceive::Broken) => return self.transport_wait(index, now),
        };
        let recv_cq = peer.recv_cq;
        if let Some(c) = effects.receiver {
            self.push_cqe(recv_cq, &c);
        }
        if let Some(c) = effects.sender {
            self.push_cqe(send_cq, &c);
        }
        let qp = self.qps.get_mut(index).expect("checked");
        qp.pending = None;
        if effects.sender_error {
            qp.state = QpState::Err;
        }
        if effects.receiver_error {
            if let Some(p) = self.qps.get_mut(peer.index) {
                p.state = QpState::Err;
            }
        }
        Outcome::Done
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
        RecvWqe::decode(&p.rq_slot, max_sge).map_err(|_| ())
    }

    /// The wr_id of the receive WQE in the responder's slot copy (for a malformed one).
    fn receive_wr_id(&self, peer: &Peer) -> u64 {
        self.qps
            .get(peer.index)
            .map(|p| u64::from_le_bytes(p.rq_slot[..8].try_into().expect("8 bytes")))
            .unwrap_or(0)
    }

    /// Moves the data of one WQE and says what completes. `slot` is the sender's copy of the
    /// WQE (inline data). The checks that refuse a message before it reaches the responder
    /// (local keys, then remote keys) come before the one for a posted receive, as on the wire.
    fn move_data(
        &mut self,
        index: usize,
        peer: &Peer,
        pending: &Pending,
        slot: &[u8],
    ) -> Result<Effects, NoReceive> {
        let wqe = &pending.wqe;
        let h = wqe.header;
        let qp = self.qps.get(index).expect("checked");
        let (owner, pd, qpn) = (qp.owner, qp.pd, qp.qpn);
        let signaled = qp.sq_sig_all || h.has(send_flags::SIGNALED);
        let base = Cqe {
            wr_id: h.wr_id,
            opcode: wc_opcode_of(h.opcode),
            qp_num: qpn,
            ..Cqe::default()
        };
        let fail = |status| Effects {
            sender: Some(Cqe { status, ..base }),
            sender_error: true,
            ..Effects::default()
        };
        let inline = h.has(send_flags::INLINE);
        let is_atomic = matches!(
            h.opcode,
            wr_opcode::ATOMIC_CMP_AND_SWP | wr_opcode::ATOMIC_FETCH_AND_ADD
        );
        if inline && (is_atomic || h.opcode == wr_opcode::RDMA_READ) {
            return Ok(fail(wc_status::LOC_QP_OP_ERR));
        }
        let local_need = if h.opcode == wr_opcode::RDMA_READ || is_atomic {
            Need::LocalWrite
        } else {
            Need::LocalRead
        };

        // The receive a SEND or WRITE_WITH_IMM consumes is taken after the local and remote
        // checks that would refuse the message without consuming one.
        let contexts = std::mem::take(&mut self.contexts);
        let mut no_receive = None;
        let effects = (|| {
            let local_table = &contexts.get(&owner).expect("a QP's context").table;
            let remote_table = &contexts.get(&peer.owner).expect("a QP's context").table;
            let mut src: Views<'_> = [const { None }; MAX_SGE as usize];
            let total = if inline {
                wqe.inline(slot).len() as u64
            } else {
                match resolve_list(local_table, pd, wqe.sges(slot), local_need, &mut src) {
                    Ok(t) => t,
                    Err(()) => return fail(wc_status::LOC_PROT_ERR),
                }
            };
            if total > limits::MAX_MSG_SZ {
                return fail(wc_status::LOC_LEN_ERR);
            }
            let remote_fail = |status| Effects {
                sender: Some(Cqe { status, ..base }),
                sender_error: true,
                receiver: None,
                receiver_error: true,
            };
            let ok = |byte_len: u64| {
                signaled.then_some(Cqe {
                    byte_len: byte_len as u32,
                    ..base
                })
            };
            match h.opcode {
                wr_opcode::SEND | wr_opcode::SEND_WITH_IMM => {
                    if let Err(why) = self.receive_ready(peer) {
                        no_receive = Some(why);
                        return Effects::default();
                    }
                    let recv = match self.take_receive(peer) {
                        Ok(r) => r,
                        Err(()) => {
                            let rcqe = Cqe {
                                wr_id: self.receive_wr_id(peer),
                                status: wc_status::LOC_QP_OP_ERR,
                                opcode: wc_opcode::RECV,
                                qp_num: peer.qpn,
                                src_qp: qpn,
                                ..Cqe::default()
                            };
                            return Effects {
                                receiver: Some(rcqe),
                                ..remote_fail(wc_status::REM_OP_ERR)
                            };
                        }
                    };
                    let rbase = Cqe {
                        wr_id: recv.wr_id,
                        opcode: wc_opcode::RECV,
                        qp_num: peer.qpn,
                        src_qp: qpn,
                        ..Cqe::default()
                    };
                    let mut dst: Views<'_> = [const { None }; MAX_SGE as usize];
                    let rq_slot = &self.qps.get(peer.index).expect("found above").rq_slot;
                    let room = match resolve_list(
                        remote_table,
                        peer.recv_pd,
                        recv.sges(rq_slot),
                        Need::LocalWrite,
                        &mut dst,
                    ) {
                        Ok(r) => r,
                        Err(()) => {
                            return Effects {
                                receiver: Some(Cqe {
                                    status: wc_status::LOC_PROT_ERR,
                                    ..rbase
                                }),
                                ..remote_fail(wc_status::REM_OP_ERR)
                            }
                        }
                    };
                    if room < total {
                        return Effects {
                            receiver: Some(Cqe {
                                status: wc_status::LOC_LEN_ERR,
                                ..rbase
                            }),
                            ..remote_fail(wc_status::REM_INV_REQ_ERR)
                        };
                    }
                    if inline {
                        copy(&dst, Source::Bytes(wqe.inline(slot)), total);
                    } else {
                        copy(&dst, Source::Views(&src), total);
                    }
                    let with_imm = h.opcode == wr_opcode::SEND_WITH_IMM;
                    Effects {
                        sender: ok(total),
                        receiver: Some(Cqe {
                            byte_len: total as u32,
                            imm_data: if with_imm { h.imm_data } else { 0 },
                            wc_flags: if with_imm { wc_flags::WITH_IMM } else { 0 },
                            ..rbase
                        }),
                        ..Effects::default()
                    }
                }
                wr_opcode::RDMA_WRITE | wr_opcode::RDMA_WRITE_WITH_IMM => {
                    if peer.access & access::REMOTE_WRITE == 0 {
                        return remote_fail(wc_status::REM_ACCESS_ERR);
                    }
                    let target = if total > 0 {
                        match remote_table.resolve(
                            peer.pd,
                            Key::Remote(h.rkey),
                            h.remote_addr,
                            total,
                            Need::RemoteWrite,
                        ) {
                            Ok(v) => Some(v),
                            Err(_) => return remote_fail(wc_status::REM_ACCESS_ERR),
                        }
                    } else {
                        None
                    };
                    if h.opcode == wr_opcode::RDMA_WRITE_WITH_IMM {
                        if let Err(why) = self.receive_ready(peer) {
                            no_receive = Some(why);
                            return Effects::default();
                        }
                    }
                    let dst = [target];
                    if inline {
                        copy(&dst, Source::Bytes(wqe.inline(slot)), total);
                    } else {
                        copy(&dst, Source::Views(&src), total);
                    }
                    let receiver = if h.opcode == wr_opcode::RDMA_WRITE_WITH_IMM {
                        match self.take_receive(peer) {
                            Ok(recv) => Some(Cqe {
                                wr_id: recv.wr_id,
                                opcode: wc_opcode::RECV_RDMA_WITH_IMM,
                                byte_len: total as u32,
                                imm_data: h.imm_data,
                                wc_flags: wc_flags::WITH_IMM,
                                qp_num: peer.qpn,
                                src_qp: qpn,
                                ..Cqe::default()
                            }),
                            Err(()) => {
                                return Effects {
                                    receiver: Some(Cqe {
                                        wr_id: self.receive_wr_id(peer),
                                        status: wc_status::LOC_QP_OP_ERR,
                                        opcode: wc_opcode::RECV,
                                        qp_num: peer.qpn,
                                        src_qp: qpn,
                                        ..Cqe::default()
                                    }),
                                    ..remote_fail(wc_status::REM_OP_ERR)
                                }
                            }
                        }
                    } else {
                        None
                    };
                    Effects {
                        sender: ok(total),
                        receiver,
                        ..Effects::default()
                    }
                }
                wr_opcode::RDMA_READ => {
                    if peer.access & access::REMOTE_READ == 0 {
                        return remote_fail(wc_status::REM_ACCESS_ERR);
                    }
                    if total > 0 {
                        let from = match remote_table.resolve(
                            peer.pd,
                            Key::Remote(h.rkey),
                            h.remote_addr,
                            total,
                            Need::RemoteRead,
                        ) {
                            Ok(v) => [Some(v)],
                            Err(_) => return remote_fail(wc_status::REM_ACCESS_ERR),
                        };
                        copy(&src, Source::Views(&from), total);
                    }
                    Effects {
                        sender: ok(total),
                        ..Effects::default()
                    }
                }
                wr_opcode::ATOMIC_CMP_AND_SWP | wr_opcode::ATOMIC_FETCH_AND_ADD => {
                    let Some(Some(result)) = src.first() else {
                        return fail(wc_status::LOC_LEN_ERR);
                    };
                    let Ok(result) = result.slice(0, 8) else {
                        return fail(wc_status::LOC_LEN_ERR);
                    };
                    if !h.remote_addr.is_multiple_of(8) {
                        return remote_fail(wc_status::REM_INV_REQ_ERR);
                    }
                    if peer.access & access::REMOTE_ATOMIC == 0 {
                        return remote_fail(wc_status::REM_ACCESS_ERR);
                    }
                    let word = match remote_table.resolve(
                        peer.pd,
                        Key::Remote(h.rkey),
                        h.remote_addr,
                        8,
                        Need::RemoteAtomic,
                    ) {
                        Ok(v) => v,
                        Err(_) => return remote_fail(wc_status::REM_ACCESS_ERR),
                    };
                    let old = if h.opcode == wr_opcode::ATOMIC_CMP_AND_SWP {
                        word.compare_swap_u64(h.compare_add, h.swap)
                    } else {
                        word.fetch_add_u64(h.compare_add)
                    };
                    let Ok(old) = old else {
                        return remote_fail(wc_status::REM_INV_REQ_ERR);
                    };
                    result
                        .write_at(0, &old.to_ne_bytes())
                        .expect("8 bytes in the slice");
                    Effects {
                        sender: ok(8),
                        ..Effects::default()
                    }
                }
                _ => fail(wc_status::LOC_QP_OP_ERR),
            }
        })();
        self.contexts = contexts;
        match no_receive {
            Some(why) => Err(why),
            None => Ok(effects),
        }
    }

    /// Completes everything queued on a QP in the error state with IBV_WC_WR_FLUSH_ERR, as far
    /// as its CQs have room.
    pub(super) fn flush(&mut self, index: usize, now: &mut Option<Instant>) -> usize {
        let mut n = 0;
        let (send_cq, recv_cq) = {
            let qp = self.qps.get(index).expect("caller checked");
            (qp.send_cq, qp.recv_cq)
        };
        let mut blocked = false;
        let mut popped = [false; 2];
        // Send queue: the pending WQE first, then the ring.
        loop {
            if !self.room(send_cq, 1) {
                blocked = true;
                break;
            }
            let qp = self.qps.get_mut(index).expect("caller checked");
            let (wr_id, opcode) = if let Some(p) = qp.pending.take() {
                (p.wqe.header.wr_id, p.wqe.header.opcode)
            } else {
                match qp.sq.pop(&mut qp.sq_slot) {
                    Ok(true) => {
                        popped[0] = true;
                        let h = SendWqeHeader::read(&qp.sq_slot);
                        (h.wr_id, h.opcode)
                    }
                    Ok(false) => break,
                    Err(e) => {
                        qp.broken = true;
                        let owner = qp.owner;
                        self.break_owner(owner, e);
                        return n;
                    }
                }
            };
            let cqe = Cqe {
                wr_id,
                status: wc_status::WR_FLUSH_ERR,
                opcode: wc_opcode_of(opcode),
                qp_num: qp.qpn,
                ..Cqe::default()
            };
            self.push_cqe(send_cq, &cqe);
            n += 1;
        }
        // Receive queue: the QP's own. An SRQ's receives are not this QP's: a QP going to the
        // error state leaves them for the SRQ's other QPs, as the IB specification has it.
        let has_srq = self.qps.get(index).is_some_and(|q| q.srq.is_some());
        while !blocked && !has_srq {
            if !self.room(recv_cq, 1) {
                blocked = true;
                break;
            }
            let qp = self.qps.get_mut(index).expect("caller checked");
            match qp.rq.pop(&mut qp.rq_slot) {
                Ok(true) => popped[1] = true,
                Ok(false) => break,
                Err(e) => {
                    qp.broken = true;
                    let owner = qp.owner;
                    self.break_owner(owner, e);
                    return n;
                }
            }
            debug_assert!(qp.rq_slot.len() >= RECV_WQE_HEADER);
            let cqe = Cqe {
                wr_id: u64::from_le_bytes(qp.rq_slot[..8].try_into().expect("8 bytes")),
                status: wc_status::WR_FLUSH_ERR,
                opcode: wc_opcode::RECV,
                qp_num: qp.qpn,
                ..Cqe::default()
            };
            self.push_cqe(recv_cq, &cqe);
            n += 1;
        }
        if blocked {
            self.hold(index, now);
        } else if let Some(qp) = self.qps.get_mut(index) {
            qp.held = None;
        }
        if let Some(qp) = self.qps.get_mut(index) {
            if popped[0] {
                qp.sq.release();
            }
            if popped[1] {
                qp.rq.release();
            }
        }
        n
    }
}
