//! UD sends: each SEND (with immediate data) names an address handle of the sender's context,
//! a QP number and a qkey ([`UdDest`]). The message goes into the next receive of that QP,
//! behind the 40-byte GRH area (`freeflow_proto::verbs::grh`), if the QP is a UD QP in RTR or
//! RTS of a container at the handle's address, of the sender's tenant, whose qkey matches (a
//! `remote_qkey` with the high bit set means the sender QP's own qkey). Anything else is
//! dropped, as a datagram is on the wire: the sender completes successfully and nothing
//! arrives, so a forged handle or QP number reaches nothing outside the tenant. A receiver
//! without a posted receive drops the message too (UD has no RNR).
//!
//! Errors: a message beyond the port's MTU ([`limits::UD_MTU`]) is the sender's LOC_LEN_ERR, a
//! bad local key its LOC_PROT_ERR, an unknown address handle its LOC_QP_OP_ERR (each moves the
//! sender's QP to the error state). A receive shorter than GRH and message is the receiver's
//! LOC_LEN_ERR, a bad key in it LOC_PROT_ERR (the receiver's QP to the error state; the sender,
//! which cannot know, completes successfully).

use super::copy::{copy, resolve_list, Source, Views};
use super::ops::context_in;
use super::{Effects, NoReceive, Outcome, Peer};
use crate::verbs::engine::{Ah, Context, Engine, Fault, Pending};
use crate::verbs::ids::{AttachmentId, QpId};
use crate::verbs::{AccessFlags, Need, NumberMap};
use freeflow_proto::verbs::grh;
use freeflow_proto::verbs::qp::{QpState, QpType, PRIVILEGED_QKEY_BIT};
use freeflow_proto::verbs::work::{
    send_flags, wc_flags, wc_opcode, wr_opcode, Cqe, UdDest, GRH_LEN, MAX_SGE,
};
use freeflow_proto::verbs::{limits, wc_status};
use std::time::Instant;

const UD_MTU: usize = limits::UD_MTU as usize;

/// The sender's side of one UD send, as checked before delivery.
struct Datagram {
    base: Cqe,
    signaled: bool,
    ah: Ah,
    dest: UdDest,
    /// The sender's QP number and qkey.
    qpn: u32,
    qkey: u32,
    imm: Option<u32>,
}

impl Datagram {
    fn fail(&self, status: u32) -> Effects {
        Effects {
            sender: Some(Cqe {
                status,
                ..self.base
            }),
            sender_error: true,
            ..Effects::default()
        }
    }

    /// The sender's completion: the datagram left (whatever became of it).
    fn sent(&self, len: usize) -> Effects {
        Effects {
            sender: self.signaled.then_some(Cqe {
                byte_len: len as u32,
                ..self.base
            }),
            ..Effects::default()
        }
    }
}

impl Engine {
    /// One attempt at the pending UD send of the QP at `index` (its send CQ has room).
    pub(super) fn execute_ud(
        &mut self,
        index: QpId,
        pending: &Pending,
        now: &mut Option<Instant>,
    ) -> Result<Outcome, Fault> {
        let contexts = std::mem::take(&mut self.contexts);
        let slot = std::mem::take(&mut self.qps.entry_mut(index)?.sq_slot);
        let result = self.ud_send(&contexts, index, pending, &slot);
        if let Some(qp) = self.qps.get_mut(index) {
            qp.sq_slot = slot;
        }
        self.contexts = contexts;
        self.flush_events();
        let Some((effects, recv_cq)) = result? else {
            // The receiver's CQ is full: hold, as for RC (nothing is lost).
            self.hold(index, now);
            return Ok(Outcome::Waiting);
        };
        if let (Some(c), Some((cq, _))) = (effects.receiver, recv_cq) {
            self.push_cqe(cq, &c);
        }
        let qp = self.qps.entry_mut(index)?;
        qp.pending = None;
        qp.held = None;
        let send_cq = qp.send_cq;
        if effects.sender_error {
            qp.state = QpState::Err;
        }
        if let Some(c) = effects.sender {
            self.push_cqe(send_cq, &c);
        }
        if let (true, Some((_, peer))) = (effects.receiver_error, recv_cq) {
            if let Some(p) = self.qps.get_mut(peer) {
                p.state = QpState::Err;
            }
        }
        Ok(Outcome::Done)
    }

    /// Checks and delivers the datagram: its effects and the receiver's CQ and QP if a
    /// receive was consumed, or None if that CQ has no room.
    #[allow(clippy::type_complexity)]
    fn ud_send(
        &mut self,
        contexts: &NumberMap<AttachmentId, Context>,
        index: QpId,
        pending: &Pending,
        slot: &[u8],
    ) -> Result<Option<(Effects, Option<(crate::verbs::ids::CqId, QpId)>)>, Fault> {
        let (wqe, h) = (&pending.wqe, pending.wqe.header);
        let qp = self.qps.entry(index)?;
        let (owner, pd, send_cq) = (qp.owner, qp.pd, qp.send_cq);
        let ctx = context_in(contexts, owner)?;
        let dest = UdDest::of(&h);
        let base = Cqe {
            wr_id: h.wr_id,
            opcode: pending.op.wc_opcode(),
            qp_num: qp.qpn,
            ..Cqe::default()
        };
        let Some(ah) = ctx.ah(dest.ah).copied() else {
            let d = Cqe {
                status: wc_status::LOC_QP_OP_ERR,
                ..base
            };
            return Ok(Some((
                Effects {
                    sender: Some(d),
                    sender_error: true,
                    ..Effects::default()
                },
                None,
            )));
        };
        let d = Datagram {
            base,
            signaled: qp.sq_sig_all || h.has(send_flags::SIGNALED),
            ah,
            dest,
            qpn: qp.qpn,
            qkey: qp.attr.qkey,
            imm: (h.opcode == wr_opcode::SEND_WITH_IMM).then_some(h.imm_data),
        };
        // The message, behind room for its GRH.
        let mut msg = [0u8; GRH_LEN + UD_MTU];
        let len = if h.has(send_flags::INLINE) {
            let data = wqe.inline(slot);
            if data.len() > UD_MTU {
                return Ok(Some((d.fail(wc_status::LOC_LEN_ERR), None)));
            }
            msg[GRH_LEN..GRH_LEN + data.len()].copy_from_slice(data);
            data.len()
        } else {
            let mut views: Views<'_> = [const { None }; MAX_SGE as usize];
            let Ok(total) =
                resolve_list(&ctx.table, pd, wqe.sges(slot), Need::LocalRead, &mut views)
            else {
                return Ok(Some((d.fail(wc_status::LOC_PROT_ERR), None)));
            };
            if total > UD_MTU as u64 {
                return Ok(Some((d.fail(wc_status::LOC_LEN_ERR), None)));
            }
            let mut at = GRH_LEN;
            for v in views.iter().flatten() {
                v.read_at(0, &mut msg[at..at + v.len()])?;
                at += v.len();
            }
            total as usize
        };
        let Some(peer) = self.ud_peer(contexts, ctx, &d) else {
            return Ok(Some((d.sent(len), None)));
        };
        let both = if peer.recv_cq == send_cq { 2 } else { 1 };
        if !self.room(peer.recv_cq, both) {
            return Ok(None);
        }
        match self.receive_ready(&peer) {
            Ok(()) => {}
            Err(NoReceive::Rnr | NoReceive::Broken) => return Ok(Some((d.sent(len), None))),
            Err(NoReceive::Fault(f)) => return Err(f),
        }
        let target = Some((peer.recv_cq, peer.index));
        let Ok(recv) = self.take_receive(&peer) else {
            let r = Cqe {
                wr_id: self.receive_wr_id(&peer),
                status: wc_status::LOC_QP_OP_ERR,
                opcode: wc_opcode::RECV,
                qp_num: peer.qpn,
                ..Cqe::default()
            };
            return Ok(Some((d.received(len, r, true), target)));
        };
        let rbase = Cqe {
            wr_id: recv.wr_id,
            opcode: wc_opcode::RECV,
            qp_num: peer.qpn,
            src_qp: d.qpn,
            sl: ah.sl,
            ..Cqe::default()
        };
        let mut dst: Views<'_> = [const { None }; MAX_SGE as usize];
        let p_table = &context_in(contexts, peer.owner)?.table;
        let rq_slot = &self.qps.entry(peer.index)?.rq_slot;
        let Ok(room) = resolve_list(
            p_table,
            peer.recv_pd,
            recv.sges(rq_slot),
            Need::LocalWrite,
            &mut dst,
        ) else {
            let r = Cqe {
                status: wc_status::LOC_PROT_ERR,
                ..rbase
            };
            return Ok(Some((d.received(len, r, true), target)));
        };
        let whole = GRH_LEN + len;
        if room < whole as u64 {
            let r = Cqe {
                status: wc_status::LOC_LEN_ERR,
                ..rbase
            };
            return Ok(Some((d.received(len, r, true), target)));
        }
        let src_ip = ctx.container.ip;
        msg[..GRH_LEN].copy_from_slice(&grh::roce_v2_ipv4(
            src_ip,
            ah.ip,
            ah.traffic_class,
            ah.hop_limit,
            len,
            d.imm.is_some(),
        ));
        copy(&dst, Source::Bytes(&msg[..whole]), whole as u64)?;
        let r = Cqe {
            byte_len: whole as u32,
            imm_data: d.imm.unwrap_or(0),
            wc_flags: wc_flags::GRH
                | if d.imm.is_some() {
                    wc_flags::WITH_IMM
                } else {
                    0
                },
            ..rbase
        };
        Ok(Some((d.received(len, r, false), target)))
    }

    /// The UD QP the datagram reaches, if any: the QP numbered `remote_qpn`, a UD QP in RTR or
    /// RTS, of the container at the handle's address, of the sender's tenant, with the qkey.
    fn ud_peer(
        &self,
        contexts: &NumberMap<AttachmentId, Context>,
        sender: &Context,
        d: &Datagram,
    ) -> Option<Peer> {
        let p_index = self.qp_by_number(d.dest.remote_qpn)?;
        let p = self.qps.get(p_index)?;
        if p.qp_type != QpType::Ud || !matches!(p.state, QpState::Rtr | QpState::Rts) || p.broken {
            return None;
        }
        let p_ctx = contexts.get(&p.owner)?;
        if p_ctx.container.ip != d.ah.ip || p_ctx.tenant != sender.tenant {
            return None;
        }
        let qkey = if d.dest.remote_qkey & PRIVILEGED_QKEY_BIT != 0 {
            d.qkey
        } else {
            d.dest.remote_qkey
        };
        if qkey != p.attr.qkey {
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
            access: AccessFlags::empty(),
            min_rnr_timer: 0,
        })
    }
}

impl Datagram {
    /// The datagram reached a receive, which completes with `r` (`error`: an error that moves
    /// the receiver's QP to the error state).
    fn received(&self, len: usize, r: Cqe, error: bool) -> Effects {
        Effects {
            receiver: Some(r),
            receiver_error: error,
            ..self.sent(len)
        }
    }
}
