//! Queue pairs: `ibv_create_qp` (its rings and capacities), the state machine of
//! `ibv_modify_qp` (transitions, attribute values, the route to the destination), `ibv_query_qp`
//! and `ibv_destroy_qp`.
//!
//! Where a QP's destination lives is decided at RTR from its GID (`::ffff:<overlay ip>`): a
//! container of the caller's tenant with a verbs context on this host is [`Route::Local`]; a
//! registered container of the caller's tenant on another host (the daemon's table of the
//! cluster) is [`Route::Remote`], reached through the router-to-router transport
//! (`crate::verbs::remote`); anything else fails the modify with ENETUNREACH.

use super::{ring_slots, slot_size, Context, Engine};
use crate::verbs::ids::{AttachmentId, CqId, PdId, QpId, SrqId};
use crate::verbs::remote::{Link, RemoteQp};
use crate::verbs::send_op::SendOp;
use crate::verbs::VerbsError;
use freeflow_proto::region::SharedRegion;
use freeflow_proto::verbs::qp::{
    check_transition_of, mask, CreateQp, ModifyQp, QpAttr, QpCap, QpCreated, QpQueried, QpState,
    QpType, MTU_MAX, MTU_MIN, PRIVILEGED_QKEY_BIT,
};
use freeflow_proto::verbs::work::{RecvWqe, SendWqe, MAX_SGE};
use freeflow_proto::verbs::{limits, AccessFlags, QueueFileKind, RECV_RING, SEND_RING};
use freeflow_proto::{Consumer, RingError, RingGeometry};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

/// The device's one port.
const PORT: u8 = 1;

/// `enum ibv_qp_attr_mask` bits whose attributes this device does not model.
/// The access flags a QP may carry.
const QP_ACCESS: AccessFlags = AccessFlags::LOCAL_WRITE
    .union(AccessFlags::REMOTE_WRITE)
    .union(AccessFlags::REMOTE_READ)
    .union(AccessFlags::REMOTE_ATOMIC);
const UNSUPPORTED_MASK: u32 = mask::ALT_PATH | mask::EN_SQD_ASYNC_NOTIFY | mask::RATE_LIMIT;

/// Where a connected QP's destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::verbs) enum Route {
    /// A QP of a container on this host, served by this engine.
    Local { ip: Ipv4Addr, qpn: u32 },
    /// A QP of a container that another engine serves: on another host (whose router is at
    /// `Link::Host`) or on another shard of this router.
    Remote { link: Link, ip: Ipv4Addr, qpn: u32 },
}

impl Route {
    /// The same destination with QP number `qpn`.
    fn with_qpn(self, qpn: u32) -> Route {
        match self {
            Route::Local { ip, .. } => Route::Local { ip, qpn },
            Route::Remote { link, ip, .. } => Route::Remote { link, ip, qpn },
        }
    }
}

/// Why a send WQE waits, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::verbs) enum Wait {
    /// Not waiting: execute now.
    Ready,
    /// Receiver Not Ready: retry after the responder's RNR timer; `left` retries remain (7:
    /// for ever).
    Rnr { left: u8, deadline: Instant },
    /// The destination did not answer (missing, not ready, not connected back): retry after
    /// the local ACK timeout, `left` times.
    Transport { left: u8, deadline: Instant },
    /// Waiting for the transport to another host (an answer, room on the connection, a
    /// connect): a socket wakes the shard.
    Remote,
}

/// The send WQE a QP is executing (or waiting to execute).
#[derive(Debug, Clone, Copy)]
pub(in crate::verbs) struct Pending {
    pub(in crate::verbs) wqe: SendWqe,
    /// The WQE's operation, decoded once when it was taken off the ring.
    pub(in crate::verbs) op: SendOp,
    pub(in crate::verbs) wait: Wait,
}

#[derive(Debug)]
pub(in crate::verbs) struct Qp {
    pub(in crate::verbs) owner: AttachmentId,
    pub(in crate::verbs) qpn: u32,
    /// RC, UC or UD.
    pub(in crate::verbs) qp_type: QpType,
    pub(in crate::verbs) pd: PdId,
    pub(in crate::verbs) send_cq: CqId,
    pub(in crate::verbs) recv_cq: CqId,
    pub(in crate::verbs) state: QpState,
    pub(in crate::verbs) attr: QpAttr,
    pub(in crate::verbs) cap: QpCap,
    pub(in crate::verbs) sq_sig_all: bool,
    pub(in crate::verbs) sq: Consumer,
    /// The QP's own receive queue; unused (never read) when it has an SRQ.
    pub(in crate::verbs) rq: Consumer,
    /// The SRQ it takes its receives from instead of `rq`.
    pub(in crate::verbs) srq: Option<SrqId>,
    /// The router's copy of the send WQE being executed (its inline data stays here while it
    /// waits).
    pub(in crate::verbs) sq_slot: Vec<u8>,
    pub(in crate::verbs) rq_slot: Vec<u8>,
    pub(in crate::verbs) pending: Option<Pending>,
    pub(in crate::verbs) route: Option<Route>,
    /// The transport's state, with a destination on another host.
    pub(in crate::verbs) remote: Option<Box<RemoteQp>>,
    /// The owner wrote a corrupt index into a ring: the QP is no longer touched.
    pub(in crate::verbs) broken: bool,
    /// In the error state: flushing stopped at a full CQ; retry then.
    pub(in crate::verbs) held: Option<Instant>,
    /// IBV_EVENT_QP_LAST_WQE_REACHED was raised for its current stay in the error state (a QP
    /// with an SRQ: see `events`).
    pub(in crate::verbs) last_wqe_raised: bool,
    _region: SharedRegion,
}

impl Qp {
    /// Enters RESET: forgets the queues without completions, and the connection. A corrupt
    /// ring breaks the QP (the caller ends its owner).
    fn reset(&mut self) -> Result<(), RingError> {
        self.pending = None;
        self.route = None;
        self.remote = None;
        let drained = drain(&mut self.sq, &mut self.sq_slot)
            .and_then(|()| drain(&mut self.rq, &mut self.rq_slot));
        self.attr = QpAttr {
            cap: self.cap,
            ..QpAttr::default()
        };
        self.state = QpState::Reset;
        self.held = None;
        drained.inspect_err(|_| self.broken = true)
    }
}

/// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
pub(super) fn gid_ipv4(gid: &[u8; 16]) -> Option<Ipv4Addr> {
    if gid[..10].iter().all(|b| *b == 0) && gid[10] == 0xff && gid[11] == 0xff {
        Some(Ipv4Addr::new(gid[12], gid[13], gid[14], gid[15]))
    } else {
        None
    }
}

/// Refuses capacities beyond the device's limits (EINVAL).
fn check_cap(c: &QpCap) -> Result<(), VerbsError> {
    if c.max_send_wr > limits::MAX_QP_WR
        || c.max_recv_wr > limits::MAX_QP_WR
        || c.max_send_sge > limits::MAX_SGE
        || c.max_recv_sge > limits::MAX_SGE
        || c.max_inline_data > limits::MAX_INLINE_DATA
    {
        return Err(VerbsError::Invalid("capacity beyond the device's limits"));
    }
    Ok(())
}

/// The objects of its context a new QP uses, found by their handles.
#[derive(Debug, Clone, Copy)]
struct QpQueues {
    send_cq: CqId,
    recv_cq: CqId,
    srq: Option<SrqId>,
    /// The size of its SRQ's slots (the QP's copy of a receive WQE has it), with an SRQ.
    srq_slot: Option<usize>,
}

impl QpQueues {
    /// The queues `r` names in `ctx`, each found in the engine's tables too (before anything
    /// changes, so that creating the QP cannot fail half-way for a table that disagrees).
    fn find(engine: &Engine, ctx: &Context, r: &CreateQp) -> Result<QpQueues, VerbsError> {
        let send_cq = *ctx
            .cqs
            .get(&r.send_cq)
            .ok_or(VerbsError::NoSuchObject("completion queue", r.send_cq))?;
        let recv_cq = *ctx
            .cqs
            .get(&r.recv_cq)
            .ok_or(VerbsError::NoSuchObject("completion queue", r.recv_cq))?;
        let srq = match r.srq {
            0 => None,
            h => Some(
                *ctx.srqs
                    .get(&h)
                    .ok_or(VerbsError::NoSuchObject("shared receive queue", h))?,
            ),
        };
        engine.cqs.entry(send_cq)?;
        engine.cqs.entry(recv_cq)?;
        let srq_slot = match srq {
            Some(i) => Some(engine.srqs.entry(i)?.ring.slot_size()),
            None => None,
        };
        Ok(QpQueues {
            send_cq,
            recv_cq,
            srq,
            srq_slot,
        })
    }
}

/// A QP's two rings and the capacities it gets.
#[derive(Debug, Clone, Copy)]
struct QpLayout {
    send: RingGeometry,
    recv: RingGeometry,
    cap: QpCap,
}

impl QpLayout {
    /// Every slot holds the largest WQE the capacities allow; what the slot has room for
    /// beyond that is granted too (a device reports at least what was asked). With an SRQ the
    /// receive capacities are ignored (rdma-core): the QP's own receive ring is the smallest
    /// one and stays unused.
    fn new(mut c: QpCap, has_srq: bool) -> QpLayout {
        if has_srq {
            c.max_recv_wr = 0;
            c.max_recv_sge = 0;
        }
        let send_slot = slot_size(SendWqe::slot_bytes(
            c.max_send_sge.max(1),
            c.max_inline_data,
        ));
        let recv_slot = slot_size(RecvWqe::slot_bytes(c.max_recv_sge.max(1)));
        let send = RingGeometry {
            slot_size: send_slot,
            slot_count: ring_slots(c.max_send_wr),
        };
        let recv = RingGeometry {
            slot_size: recv_slot,
            slot_count: ring_slots(c.max_recv_wr),
        };
        let cap = QpCap {
            max_send_wr: send.slot_count,
            max_recv_wr: if has_srq { 0 } else { recv.slot_count },
            max_send_sge: ((send_slot as usize - SendWqe::slot_bytes(0, 0)) / 16)
                .min(MAX_SGE as usize) as u32,
            max_recv_sge: if has_srq {
                0
            } else {
                ((recv_slot as usize - RecvWqe::slot_bytes(0)) / 16).min(MAX_SGE as usize) as u32
            },
            max_inline_data: (send_slot - SendWqe::slot_bytes(0, 0) as u32)
                .min(limits::MAX_INLINE_DATA),
        };
        QpLayout { send, recv, cap }
    }

    /// The QP's shared region with its send and receive rings.
    fn create_rings(&self) -> Result<QpRings, VerbsError> {
        let (region, memfd) = SharedRegion::create("freeflow-qp", &[self.send, self.recv])?;
        let sq = Consumer::new(region.ring(SEND_RING)?);
        let rq = Consumer::new(region.ring(RECV_RING)?);
        Ok(QpRings {
            region,
            memfd,
            sq,
            rq,
        })
    }
}

struct QpRings {
    region: SharedRegion,
    /// The region's file, for the shim.
    memfd: OwnedFd,
    sq: Consumer,
    rq: Consumer,
}

impl Engine {
    /// A QP number in neither this engine's table nor the reserved range (QP0, QP1), 24 bits.
    fn new_qpn(&mut self) -> u32 {
        loop {
            let n = self.qpn_keys.next() & 0x00ff_ffff;
            if n > 1 && !self.qpns.contains_key(&n) {
                return n;
            }
        }
    }

    /// `ibv_create_qp`: an RC, UC or UD QP in RESET, holding its PD, CQs and SRQ, with rings
    /// that hold at least the capacities asked for.
    pub(super) fn create_qp(
        &mut self,
        attachment: AttachmentId,
        conn: BorrowedFd<'_>,
        r: &CreateQp,
    ) -> Result<QpCreated, VerbsError> {
        let qp_type = QpType::from_u32(r.qp_type)
            .ok_or(VerbsError::NotSupported("only RC, UC and UD queue pairs"))?;
        check_cap(&r.cap)?;
        #[cfg(feature = "rdma-hw")]
        if self.device.is_some() {
            if qp_type != QpType::Rc {
                return Err(crate::verbs::hw::path::refuse(
                    "UC and UD queue pairs on the RDMA device path (RC only)",
                ));
            }
            if r.srq != 0 {
                return Err(crate::verbs::hw::path::refuse(
                    "shared receive queues on the RDMA device path",
                ));
            }
        }
        let qpn = self.new_qpn();
        let ctx = self.context_ref(attachment)?;
        if ctx.qps.len() >= limits::MAX_QP as usize {
            return Err(VerbsError::Limit("queue pairs"));
        }
        let queues = QpQueues::find(self, ctx, r)?;
        let layout = QpLayout::new(r.cap, queues.srq.is_some());
        let ctx = super::context_mut(&mut self.contexts, attachment)?;
        // The router keeps the rings' mapping: a unit of the container's budget.
        let budgets = &mut self.budgets;
        let (handle, rings) = Self::holding_pd(ctx, PdId(r.pd), |ctx| {
            budgets.charged(ctx, |ctx| {
                let rings = layout.create_rings()?;
                let handle = Self::new_handle(ctx);
                Self::pass_file(conn, QueueFileKind::Qp, handle, rings.memfd.as_fd())?;
                Ok((handle, rings))
            })
        })?;
        let index = self.insert_qp(attachment, (qpn, qp_type), r, queues, &layout, rings);
        self.context(attachment)?.qps.insert(handle, index);
        #[allow(unused_mut)]
        let mut cap = layout.cap;
        #[cfg(feature = "rdma-hw")]
        if self.device.is_some() {
            match self.device_create_qp(index) {
                Ok(granted) => {
                    cap = granted;
                    let qp = self.qps.entry_mut(index)?;
                    qp.cap = granted;
                    qp.attr.cap = granted;
                }
                Err(e) => {
                    // The container never sees this QP: undone whole (its file was passed
                    // already; the shim drops it with the failed reply).
                    let _ = self.destroy_qp(attachment, handle);
                    return Err(e);
                }
            }
        }
        Ok(QpCreated {
            qp: handle,
            qpn,
            cap,
        })
    }

    /// Enters a new QP in the engine's tables and counts it as a user of its CQs and SRQ.
    fn insert_qp(
        &mut self,
        owner: AttachmentId,
        (qpn, qp_type): (u32, QpType),
        r: &CreateQp,
        queues: QpQueues,
        layout: &QpLayout,
        rings: QpRings,
    ) -> QpId {
        // With an SRQ, the receive slot copy is the SRQ's size.
        let rq_slot = queues.srq_slot.unwrap_or(layout.recv.slot_size as usize);
        let index = self.qps.insert(Qp {
            owner,
            qpn,
            qp_type,
            pd: PdId(r.pd),
            send_cq: queues.send_cq,
            recv_cq: queues.recv_cq,
            state: QpState::Reset,
            attr: QpAttr {
                cap: layout.cap,
                ..QpAttr::default()
            },
            cap: layout.cap,
            sq_sig_all: r.sq_sig_all != 0,
            sq: rings.sq,
            rq: rings.rq,
            srq: queues.srq,
            sq_slot: vec![0; layout.send.slot_size as usize],
            rq_slot: vec![0; rq_slot],
            pending: None,
            route: None,
            remote: None,
            broken: false,
            held: None,
            last_wqe_raised: false,
            _region: rings.region,
        });
        self.qpns.insert(qpn, index);
        // `QpQueues::find` found each of them in the tables.
        for cq in [queues.send_cq, queues.recv_cq] {
            if let Some(cq) = self.cqs.get_mut(cq) {
                cq.users += 1;
            }
        }
        if let Some(srq) = queues.srq.and_then(|i| self.srqs.get_mut(i)) {
            srq.users += 1;
        }
        index
    }

    fn qp_index(&self, attachment: AttachmentId, handle: u32) -> Result<QpId, VerbsError> {
        self.index_of(attachment, handle, "queue pair", |c| &c.qps)
    }

    /// Checks the values of the attributes `attr_mask` names, as the kernel and a device check
    /// them (EINVAL), and what this device does not do (EOPNOTSUPP).
    fn check_values(attr_mask: u32, a: &QpAttr) -> Result<(), VerbsError> {
        let bad = |why| Err(VerbsError::Invalid(why));
        if attr_mask & UNSUPPORTED_MASK != 0 {
            return Err(VerbsError::NotSupported(
                "alternate paths, SQD notifications and rate limits",
            ));
        }
        let has = |bit| attr_mask & bit != 0;
        if has(mask::ACCESS_FLAGS)
            && !QP_ACCESS.contains(AccessFlags::from_bits_retain(a.qp_access_flags))
        {
            return bad("unknown QP access flags");
        }
        if has(mask::QKEY) && a.qkey & PRIVILEGED_QKEY_BIT != 0 {
            // The kernel's rule: only CAP_NET_RAW may give a QP a privileged qkey, and a
            // container has no capability over the router.
            return Err(VerbsError::Permission(
                "a qkey with the high bit set is privileged",
            ));
        }
        if has(mask::PKEY_INDEX) && a.pkey_index != 0 {
            return bad("the P_Key table has one entry");
        }
        if has(mask::PORT) && a.port_num != PORT {
            return bad("the device has port 1 only");
        }
        if has(mask::PATH_MTU) && !(MTU_MIN..=MTU_MAX).contains(&a.path_mtu) {
            return bad("path MTU out of range");
        }
        if has(mask::DEST_QPN) && a.dest_qp_num > 0x00ff_ffff {
            return bad("destination QP number wider than 24 bits");
        }
        if (has(mask::RQ_PSN) && a.rq_psn > 0x00ff_ffff)
            || (has(mask::SQ_PSN) && a.sq_psn > 0x00ff_ffff)
        {
            return bad("packet sequence number wider than 24 bits");
        }
        if (has(mask::MAX_DEST_RD_ATOMIC)
            && u32::from(a.max_dest_rd_atomic) > limits::MAX_QP_RD_ATOM)
            || (has(mask::MAX_QP_RD_ATOMIC) && u32::from(a.max_rd_atomic) > limits::MAX_QP_RD_ATOM)
        {
            return bad("more outstanding reads and atomics than the device allows");
        }
        if has(mask::MIN_RNR_TIMER) && a.min_rnr_timer > 31 {
            return bad("min_rnr_timer out of range");
        }
        if has(mask::TIMEOUT) && a.timeout > 31 {
            return bad("timeout out of range");
        }
        if (has(mask::RETRY_CNT) && a.retry_cnt > 7) || (has(mask::RNR_RETRY) && a.rnr_retry > 7) {
            return bad("retry counts go up to 7");
        }
        if has(mask::AV) {
            if a.is_global == 0 {
                return bad("a RoCE address needs the GRH (is_global) with the destination GID");
            }
            if a.sgid_index != 0 {
                return bad("the GID table has one entry");
            }
            if a.ah_port_num > 1 {
                return bad("the device has port 1 only");
            }
        }
        Ok(())
    }

    /// Where the GID of a QP's destination leads: a container of the caller's tenant with a
    /// verbs context here, or else a registered container of the caller's tenant on another
    /// host.
    fn route(
        &self,
        attachment: AttachmentId,
        dgid: &[u8; 16],
        dest_qpn: u32,
    ) -> Result<Route, VerbsError> {
        let caller = &self.context_ref(attachment)?.container;
        let ip = gid_ipv4(dgid).ok_or_else(|| {
            VerbsError::Unreachable("the destination GID is not an IPv4-mapped address".into())
        })?;
        let local = self
            .contexts
            .values()
            .any(|c| c.container.ip == ip && c.container.tenant == caller.tenant);
        if local {
            return Ok(Route::Local { ip, qpn: dest_qpn });
        }
        match self.remote.link_of(ip, &caller.tenant) {
            Some(link) => Ok(Route::Remote {
                link,
                ip,
                qpn: dest_qpn,
            }),
            None => Err(VerbsError::Unreachable(format!(
                "{ip} is no container of tenant {} with RDMA on this host or a registered \
                 container of it on another host",
                caller.tenant
            ))),
        }
    }

    /// `ibv_modify_qp`: checks the transition and the values, resolves the destination if the
    /// address vector changes, then takes the attributes and enters the new state.
    pub(super) fn modify_qp(
        &mut self,
        attachment: AttachmentId,
        r: &ModifyQp,
    ) -> Result<QpState, VerbsError> {
        let index = self.qp_index(attachment, r.qp)?;
        let (current, qp_type) = {
            let qp = self.qps.entry(index)?;
            (qp.state, qp.qp_type)
        };
        let next = check_transition_of(qp_type, current, r.attr_mask, &r.attr)?;
        Self::check_values(r.attr_mask, &r.attr)?;
        if matches!(next, QpState::Sqd | QpState::Sqe) {
            return Err(VerbsError::NotSupported("the SQD and SQE states"));
        }
        let route = if r.attr_mask & mask::AV != 0 {
            Some(self.route(attachment, &r.attr.dgid, r.attr.dest_qp_num)?)
        } else {
            None
        };
        // The device's twin changes first: if the device refuses, nothing changed here.
        #[cfg(feature = "rdma-hw")]
        if self.is_device_qp(index) {
            let qp = self.qps.entry(index)?;
            let mut merged = qp.attr;
            take_attrs(&mut merged, r.attr_mask, &r.attr);
            let destination = route.or(qp.route).map(|d| {
                if r.attr_mask & mask::DEST_QPN != 0 {
                    d.with_qpn(r.attr.dest_qp_num)
                } else {
                    d
                }
            });
            self.device_modify_qp(index, (current, next), &merged, destination)?;
        }
        let qp = self.qps.entry_mut(index)?;
        take_attrs(&mut qp.attr, r.attr_mask, &r.attr);
        if let Some(route) = route {
            qp.route = Some(route);
        }
        if let (Some(route), true) = (qp.route, r.attr_mask & mask::DEST_QPN != 0) {
            qp.route = Some(route.with_qpn(r.attr.dest_qp_num));
        }
        // Across hosts, requests are numbered from the PSNs: the responder expects its
        // rq_psn from RTR on, the requester counts from its sq_psn at RTS.
        if matches!(qp.route, Some(Route::Remote { .. })) {
            let remote = qp.remote.get_or_insert_with(Box::default);
            if next == QpState::Rtr && current != QpState::Rtr {
                remote.expected = qp.attr.rq_psn;
            }
            if next == QpState::Rts && current != QpState::Rts {
                remote.next_seq = qp.attr.sq_psn;
            }
        }
        if next != QpState::Err {
            qp.last_wqe_raised = false;
        }
        match next {
            QpState::Reset => {
                if let Err(e) = qp.reset() {
                    let owner = qp.owner;
                    self.break_owner(owner, e);
                }
            }
            other => qp.state = other,
        }
        Ok(next)
    }

    pub(super) fn query_qp(
        &self,
        attachment: AttachmentId,
        handle: u32,
    ) -> Result<QpQueried, VerbsError> {
        let index = self.qp_index(attachment, handle)?;
        let qp = self.qps.entry(index)?;
        let mut attr = qp.attr;
        attr.qp_state = qp.state as u8;
        attr.cur_qp_state = qp.state as u8;
        attr.cap = qp.cap;
        Ok(QpQueried {
            attr,
            sq_sig_all: u32::from(qp.sq_sig_all),
        })
    }

    pub(super) fn destroy_qp(
        &mut self,
        attachment: AttachmentId,
        handle: u32,
    ) -> Result<(), VerbsError> {
        let index = self.qp_index(attachment, handle)?;
        #[cfg(feature = "rdma-hw")]
        if let Ok(qp) = self.qps.entry(index) {
            let qpn = qp.qpn;
            self.device_destroy_qp(index, qpn);
        }
        let qp = self.qps.take(index)?;
        self.qpns.remove(&qp.qpn);
        for cq in [qp.send_cq, qp.recv_cq] {
            if let Some(cq) = self.cqs.get_mut(cq) {
                cq.users -= 1;
            }
        }
        if let Some(srq) = qp.srq.and_then(|i| self.srqs.get_mut(i)) {
            srq.users -= 1;
        }
        let ctx = super::context_mut(&mut self.contexts, attachment)?;
        ctx.qps.remove(&handle);
        ctx.table.release_pd(qp.pd);
        self.budgets.refund(ctx);
        Ok(())
    }

    /// The QP with virtual number `qpn`.
    pub(in crate::verbs) fn qp_by_number(&self, qpn: u32) -> Option<QpId> {
        self.qpns.get(&qpn).copied()
    }
}

/// Copies the attributes `m` names from `a` into `t`.
fn take_attrs(t: &mut QpAttr, m: u32, a: &QpAttr) {
    macro_rules! take {
        ($bit:expr, $($field:ident),+) => {
            if m & $bit != 0 { $(t.$field = a.$field;)+ }
        };
    }
    take!(mask::ACCESS_FLAGS, qp_access_flags);
    take!(mask::PKEY_INDEX, pkey_index);
    take!(mask::PORT, port_num);
    take!(mask::QKEY, qkey);
    take!(
        mask::AV,
        dgid,
        flow_label,
        sgid_index,
        hop_limit,
        traffic_class,
        is_global,
        dlid,
        sl,
        src_path_bits,
        static_rate,
        ah_port_num
    );
    take!(mask::PATH_MTU, path_mtu);
    take!(mask::TIMEOUT, timeout);
    take!(mask::RETRY_CNT, retry_cnt);
    take!(mask::RNR_RETRY, rnr_retry);
    take!(mask::RQ_PSN, rq_psn);
    take!(mask::SQ_PSN, sq_psn);
    take!(mask::MAX_QP_RD_ATOMIC, max_rd_atomic);
    take!(mask::MAX_DEST_RD_ATOMIC, max_dest_rd_atomic);
    take!(mask::MIN_RNR_TIMER, min_rnr_timer);
    take!(mask::PATH_MIG_STATE, path_mig_state);
    take!(mask::DEST_QPN, dest_qp_num);
}

/// Pops and forgets everything in a ring (a QP going to RESET).
fn drain(ring: &mut Consumer, scratch: &mut [u8]) -> Result<(), RingError> {
    while ring.pop(scratch)? {}
    ring.release();
    Ok(())
}
