//! UD sends: each SEND (with immediate data) names an address handle of the sender's context,
//! a QP number and a qkey ([`UdDest`]). The message goes into the next receive of that QP,
//! behind the 40-byte GRH area (`freeflow_proto::verbs::grh`), if the QP is a UD QP in RTR or
//! RTS of a container at the handle's address, of the sender's tenant, whose qkey matches (a
//! `remote_qkey` with the high bit set means the sender QP's own qkey). Anything else is
//! dropped, as a datagram is on the wire: the sender completes successfully and nothing
//! arrives, so a forged handle or QP number reaches nothing outside the tenant. A receiver
//! without a posted receive drops the message too (UD has no RNR).
//!
//! Across hosts (a handle to a container on another host): the datagram is a
//! [`FrameKind::Datagram`] on the connection to that host's router and the send completes when
//! it is queued there; that router delivers it with the same checks (the source address a
//! registered container of the host the connection comes from, of the receiver's tenant) or
//! drops it, and answers nothing. A receiver whose CQ is full drops it there (on one host the
//! sender waits instead).
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
use crate::verbs::ids::{AttachmentId, CqId, QpId, TenantId};
use crate::verbs::remote::{Link, OutConn};
use crate::verbs::{AccessFlags, Need, NumberMap};
use freeflow_proto::verbs::grh;
use freeflow_proto::verbs::qp::{QpState, QpType, PRIVILEGED_QKEY_BIT};
use freeflow_proto::verbs::remote::{FrameHeader, FrameKind};
use freeflow_proto::verbs::work::{
    send_flags, wc_flags, wc_opcode, wr_opcode, Cqe, UdDest, GRH_LEN, MAX_SGE,
};
use freeflow_proto::verbs::{limits, wc_status};
use std::net::Ipv4Addr;
use std::time::Instant;

const UD_MTU: usize = limits::UD_MTU as usize;

/// A message with room for its GRH area in front.
type Message = [u8; GRH_LEN + UD_MTU];

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

    /// The qkey it carries.
    fn qkey(&self) -> u32 {
        if self.dest.remote_qkey & PRIVILEGED_QKEY_BIT != 0 {
            self.qkey
        } else {
            self.dest.remote_qkey
        }
    }
}

/// Where a datagram comes from and how its GRH area reads.
#[derive(Debug, Clone, Copy)]
struct Origin {
    ip: Ipv4Addr,
    qpn: u32,
    tenant: TenantId,
    qkey: u32,
    traffic_class: u8,
    hop_limit: u8,
    sl: u8,
}

/// What became of a datagram at its receiver.
enum Delivery {
    /// Into a receive, which completes with this entry (`error`: the receiver's QP goes to
    /// the error state).
    Received { cqe: Cqe, error: bool, cq: CqId },
    /// Dropped.
    Dropped,
    /// The receiver's CQ has no room (one host: the sender waits).
    Full,
}

/// What one attempt at a UD send leads to.
enum Attempt {
    Done(Effects, Option<(CqId, QpId)>),
    /// Wait a moment (a full CQ at the receiver, a connection being made).
    Hold,
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
        let result = self.ud_send(&contexts, index, pending, &slot, now);
        if let Some(qp) = self.qps.get_mut(index) {
            qp.sq_slot = slot;
        }
        self.contexts = contexts;
        self.flush_events();
        let (effects, receiver) = match result? {
            Attempt::Done(effects, receiver) => (effects, receiver),
            Attempt::Hold => {
                self.hold(index, now);
                return Ok(Outcome::Waiting);
            }
        };
        if let (Some(c), Some((cq, _))) = (effects.receiver, receiver) {
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
        if let (true, Some((_, peer))) = (effects.receiver_error, receiver) {
            if let Some(p) = self.qps.get_mut(peer) {
                p.state = QpState::Err;
            }
        }
        Ok(Outcome::Done)
    }

    /// Checks the datagram and delivers it (or sends it to another host's router).
    fn ud_send(
        &mut self,
        contexts: &NumberMap<AttachmentId, Context>,
        index: QpId,
        pending: &Pending,
        slot: &[u8],
        now: &mut Option<Instant>,
    ) -> Result<Attempt, Fault> {
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
            let failed = Effects {
                sender: Some(Cqe {
                    status: wc_status::LOC_QP_OP_ERR,
                    ..base
                }),
                sender_error: true,
                ..Effects::default()
            };
            return Ok(Attempt::Done(failed, None));
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
        let mut msg: Message = [0u8; GRH_LEN + UD_MTU];
        let len = if h.has(send_flags::INLINE) {
            let data = wqe.inline(slot);
            if data.len() > UD_MTU {
                return Ok(Attempt::Done(d.fail(wc_status::LOC_LEN_ERR), None));
            }
            msg[GRH_LEN..GRH_LEN + data.len()].copy_from_slice(data);
            data.len()
        } else {
            let mut views: Views<'_> = [const { None }; MAX_SGE as usize];
            let Ok(total) =
                resolve_list(&ctx.table, pd, wqe.sges(slot), Need::LocalRead, &mut views)
            else {
                return Ok(Attempt::Done(d.fail(wc_status::LOC_PROT_ERR), None));
            };
            if total > UD_MTU as u64 {
                return Ok(Attempt::Done(d.fail(wc_status::LOC_LEN_ERR), None));
            }
            let mut at = GRH_LEN;
            for v in views.iter().flatten() {
                v.read_at(0, &mut msg[at..at + v.len()])?;
                at += v.len();
            }
            total as usize
        };
        if let Some(link) = ah.link {
            return Ok(self.ud_send_remote(link, ctx, &d, &msg[GRH_LEN..GRH_LEN + len], now));
        }
        let origin = Origin {
            ip: ctx.container.ip,
            qpn: d.qpn,
            tenant: ctx.tenant,
            qkey: d.qkey(),
            traffic_class: ah.traffic_class,
            hop_limit: ah.hop_limit,
            sl: ah.sl,
        };
        let Some(peer) = self.ud_peer(contexts, &origin, ah.ip, dest.remote_qpn) else {
            return Ok(Attempt::Done(d.sent(len), None));
        };
        // The sender's completion goes to its CQ too: with one CQ for both, room for two.
        let room = if peer.recv_cq == send_cq { 2 } else { 1 };
        let delivery = self.deliver(contexts, &peer, &origin, &mut msg, len, d.imm, room)?;
        Ok(match delivery {
            Delivery::Full => Attempt::Hold,
            Delivery::Dropped => Attempt::Done(d.sent(len), None),
            Delivery::Received { cqe, error, cq } => {
                let effects = Effects {
                    receiver: Some(cqe),
                    receiver_error: error,
                    ..d.sent(len)
                };
                Attempt::Done(effects, Some((cq, peer.index)))
            }
        })
    }

    /// Queues the datagram on the connection to `host`'s router; holds while the connection
    /// is being made or full. A router that cannot be reached drops it.
    fn ud_send_remote(
        &mut self,
        link: Link,
        ctx: &Context,
        d: &Datagram,
        payload: &[u8],
        now: &mut Option<Instant>,
    ) -> Attempt {
        let t = *now.get_or_insert_with(Instant::now);
        let conn = match self.remote.out_conn(link, d.ah.ip, t) {
            OutConn::Up(c) if !c.tx_full() => c,
            OutConn::Up(_) | OutConn::Connecting => return Attempt::Hold,
            OutConn::Down => return Attempt::Done(d.sent(payload.len()), None),
        };
        let mut f = FrameHeader::new(FrameKind::Datagram);
        f.len = payload.len() as u32;
        f.src_ip = ctx.container.ip;
        f.dst_ip = d.ah.ip;
        f.src_qpn = d.qpn;
        f.dst_qpn = d.dest.remote_qpn;
        f.rkey = d.qkey();
        f.code = u8::from(d.imm.is_some());
        f.imm = d.imm.unwrap_or(0);
        f.arg = u32::from(d.ah.traffic_class)
            | u32::from(d.ah.hop_limit) << 8
            | u32::from(d.ah.sl) << 16;
        let _ = conn.push_frame(&f, |buf| {
            buf.copy_from_slice(payload);
            Ok::<(), ()>(())
        });
        Attempt::Done(d.sent(payload.len()), None)
    }

    /// A datagram from another host's router (on a connection from `from`): delivered with
    /// the checks of one host, or dropped. Nothing is answered.
    pub(super) fn on_datagram(&mut self, from: Link, h: &FrameHeader, payload: &[u8]) {
        let Some(source) = self.remote.source_tenant(h.src_ip, from) else {
            return;
        };
        if payload.len() > UD_MTU {
            return;
        }
        // No container of that tenant here: nobody to receive it.
        let Some(tenant) = self.tenant_number(source) else {
            return;
        };
        let origin = Origin {
            ip: h.src_ip,
            qpn: h.src_qpn,
            tenant,
            qkey: h.rkey,
            traffic_class: h.arg as u8,
            hop_limit: (h.arg >> 8) as u8,
            sl: (h.arg >> 16) as u8,
        };
        let contexts = std::mem::take(&mut self.contexts);
        let mut msg: Message = [0u8; GRH_LEN + UD_MTU];
        msg[GRH_LEN..GRH_LEN + payload.len()].copy_from_slice(payload);
        let imm = (h.code & 1 != 0).then_some(h.imm);
        let Some(peer) = self.ud_peer(&contexts, &origin, h.dst_ip, h.dst_qpn) else {
            self.contexts = contexts;
            return;
        };
        let delivered = self.deliver(&contexts, &peer, &origin, &mut msg, payload.len(), imm, 1);
        self.contexts = contexts;
        self.flush_events();
        match delivered {
            Ok(Delivery::Received { cqe, error, cq }) => {
                self.push_cqe(cq, &cqe);
                if error {
                    if let Some(p) = self.qps.get_mut(peer.index) {
                        p.state = QpState::Err;
                    }
                }
            }
            Ok(Delivery::Dropped | Delivery::Full) => {}
            Err(fault) => self.fault_qp(peer.index, fault),
        }
    }

    /// The UD QP numbered `qpn` at `ip` that takes a datagram from `origin`, if any: a UD QP
    /// in RTR or RTS of the container at `ip`, of the origin's tenant, with its qkey.
    fn ud_peer(
        &self,
        contexts: &NumberMap<AttachmentId, Context>,
        origin: &Origin,
        ip: Ipv4Addr,
        qpn: u32,
    ) -> Option<Peer> {
        let p_index = self.qp_by_number(qpn)?;
        let p = self.qps.get(p_index)?;
        if p.qp_type != QpType::Ud || !matches!(p.state, QpState::Rtr | QpState::Rts) || p.broken {
            return None;
        }
        let p_ctx = contexts.get(&p.owner)?;
        if p_ctx.container.ip != ip || p_ctx.tenant != origin.tenant || origin.qkey != p.attr.qkey {
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

    /// Puts the datagram (`len` bytes at `msg[GRH_LEN..]`) into `peer`'s next receive, behind
    /// its GRH area, if its CQ has room for `room` entries and a receive is posted.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        contexts: &NumberMap<AttachmentId, Context>,
        peer: &Peer,
        origin: &Origin,
        msg: &mut Message,
        len: usize,
        imm: Option<u32>,
        room: u32,
    ) -> Result<Delivery, Fault> {
        if !self.room(peer.recv_cq, room) {
            return Ok(Delivery::Full);
        }
        match self.receive_ready(peer) {
            Ok(()) => {}
            Err(NoReceive::Rnr | NoReceive::Broken) => return Ok(Delivery::Dropped),
            Err(NoReceive::Fault(f)) => return Err(f),
        }
        let cq = peer.recv_cq;
        let Ok(recv) = self.take_receive(peer) else {
            let cqe = Cqe {
                wr_id: self.receive_wr_id(peer),
                status: wc_status::LOC_QP_OP_ERR,
                opcode: wc_opcode::RECV,
                qp_num: peer.qpn,
                ..Cqe::default()
            };
            return Ok(Delivery::Received {
                cqe,
                error: true,
                cq,
            });
        };
        let rbase = Cqe {
            wr_id: recv.wr_id,
            opcode: wc_opcode::RECV,
            qp_num: peer.qpn,
            src_qp: origin.qpn,
            sl: origin.sl,
            ..Cqe::default()
        };
        let failed = |status| Delivery::Received {
            cqe: Cqe { status, ..rbase },
            error: true,
            cq,
        };
        let mut dst: Views<'_> = [const { None }; MAX_SGE as usize];
        let table = &context_in(contexts, peer.owner)?.table;
        let rq_slot = &self.qps.entry(peer.index)?.rq_slot;
        let sges = recv.sges(rq_slot);
        let Ok(space) = resolve_list(table, peer.recv_pd, sges, Need::LocalWrite, &mut dst) else {
            return Ok(failed(wc_status::LOC_PROT_ERR));
        };
        let whole = GRH_LEN + len;
        if space < whole as u64 {
            return Ok(failed(wc_status::LOC_LEN_ERR));
        }
        let to = context_in(contexts, peer.owner)?.container.ip;
        msg[..GRH_LEN].copy_from_slice(&grh::roce_v2_ipv4(
            origin.ip,
            to,
            origin.traffic_class,
            origin.hop_limit,
            len,
            imm.is_some(),
        ));
        copy(&dst, Source::Bytes(&msg[..whole]), whole as u64)?;
        let with_imm = if imm.is_some() { wc_flags::WITH_IMM } else { 0 };
        Ok(Delivery::Received {
            cqe: Cqe {
                byte_len: whole as u32,
                imm_data: imm.unwrap_or(0),
                wc_flags: wc_flags::GRH | with_imm,
                ..rbase
            },
            error: false,
            cq,
        })
    }
}
