//! The flush of a QP in the error state: everything queued on it completes with
//! IBV_WC_WR_FLUSH_ERR, as far as its CQs have room.

use crate::verbs::engine::{Engine, Fault};
use crate::verbs::ids::{CqId, QpId};
use crate::verbs::send_op::{wc_opcode_of, SendOp};
use freeflow_proto::verbs::wc_status;
use freeflow_proto::verbs::work::{wc_opcode, Cqe, SendWqeHeader, RECV_WQE_HEADER};
use std::time::Instant;

/// How far a flush got through one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flushed {
    /// The queue is empty.
    Empty,
    /// Its CQ is full.
    Blocked,
    /// Its ring is corrupt (its owner is being detached).
    Broken,
}

impl Engine {
    /// Completes everything queued on a QP in the error state with IBV_WC_WR_FLUSH_ERR, as far
    /// as its CQs have room. A fault of the engine's bookkeeping ends the QP's owner.
    pub(in crate::verbs) fn flush(&mut self, index: QpId, now: &mut Option<Instant>) -> usize {
        let mut n = 0;
        if let Err(fault) = self.try_flush(index, now, &mut n) {
            self.fault_qp(index, fault);
        }
        n
    }

    /// [`Engine::flush`], counting the completions in `n`.
    fn try_flush(
        &mut self,
        index: QpId,
        now: &mut Option<Instant>,
        n: &mut usize,
    ) -> Result<(), Fault> {
        let (send_cq, recv_cq, has_srq) = {
            let qp = self.qps.entry(index)?;
            (qp.send_cq, qp.recv_cq, qp.srq.is_some())
        };
        let mut popped = [false; 2];
        let mut flushed = self.flush_sends(index, send_cq, n, &mut popped[0])?;
        // Receive queue: the QP's own. An SRQ's receives are not this QP's: a QP going to the
        // error state leaves them for the SRQ's other QPs, as the IB specification has it.
        if flushed == Flushed::Empty && !has_srq {
            flushed = self.flush_receives(index, recv_cq, n, &mut popped[1])?;
        }
        match flushed {
            Flushed::Broken => return Ok(()),
            Flushed::Blocked => self.hold(index, now),
            Flushed::Empty => {
                if let Some(qp) = self.qps.get_mut(index) {
                    qp.held = None;
                }
            }
        }
        let qp = self.qps.entry_mut(index)?;
        if popped[0] {
            qp.sq.release();
        }
        if popped[1] {
            qp.rq.release();
        }
        Ok(())
    }

    /// Flushes the send queue: the pending WQE first, then the ring. Counts the completions
    /// in `n`; `popped` says whether the ring gave entries.
    fn flush_sends(
        &mut self,
        index: QpId,
        send_cq: CqId,
        n: &mut usize,
        popped: &mut bool,
    ) -> Result<Flushed, Fault> {
        loop {
            if !self.room(send_cq, 1) {
                return Ok(Flushed::Blocked);
            }
            let qp = self.qps.entry_mut(index)?;
            // Requests in flight to another host come first (they were posted first).
            let inflight = qp.remote.as_mut().and_then(|r| {
                let f = r.inflight.pop_front()?;
                r.inflight_bytes -= f.bytes;
                r.reads -= u32::from(f.op == SendOp::Read || f.op.is_atomic());
                r.signaled -= u32::from(f.signaled);
                Some(f)
            });
            let (wr_id, opcode) = if let Some(f) = inflight {
                (f.wqe.header.wr_id, f.op.wc_opcode())
            } else if let Some(p) = qp.pending.take() {
                (p.wqe.header.wr_id, p.op.wc_opcode())
            } else {
                match qp.sq.pop(&mut qp.sq_slot) {
                    Ok(true) => {
                        *popped = true;
                        let h = SendWqeHeader::read(&qp.sq_slot);
                        (h.wr_id, wc_opcode_of(h.opcode))
                    }
                    Ok(false) => return Ok(Flushed::Empty),
                    Err(e) => {
                        self.break_qp(index, e);
                        return Ok(Flushed::Broken);
                    }
                }
            };
            let cqe = Cqe {
                wr_id,
                status: wc_status::WR_FLUSH_ERR,
                opcode,
                qp_num: qp.qpn,
                ..Cqe::default()
            };
            self.push_cqe(send_cq, &cqe);
            *n += 1;
        }
    }

    /// Flushes the QP's own receive queue, as [`Engine::flush_sends`] the send queue.
    fn flush_receives(
        &mut self,
        index: QpId,
        recv_cq: CqId,
        n: &mut usize,
        popped: &mut bool,
    ) -> Result<Flushed, Fault> {
        loop {
            if !self.room(recv_cq, 1) {
                return Ok(Flushed::Blocked);
            }
            let qp = self.qps.entry_mut(index)?;
            match qp.rq.pop(&mut qp.rq_slot) {
                Ok(true) => *popped = true,
                Ok(false) => return Ok(Flushed::Empty),
                Err(e) => {
                    self.break_qp(index, e);
                    return Ok(Flushed::Broken);
                }
            }
            debug_assert!(qp.rq_slot.len() >= RECV_WQE_HEADER);
            let cqe = Cqe {
                wr_id: qp
                    .rq_slot
                    .first_chunk()
                    .map_or(0, |b| u64::from_le_bytes(*b)),
                status: wc_status::WR_FLUSH_ERR,
                opcode: wc_opcode::RECV,
                qp_num: qp.qpn,
                ..Cqe::default()
            };
            self.push_cqe(recv_cq, &cqe);
            *n += 1;
        }
    }
}
