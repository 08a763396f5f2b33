//! Queue pairs (RC, UC and UD): `ibv_create_qp`, `ibv_modify_qp`, `ibv_query_qp`,
//! `ibv_destroy_qp`, and the context ops `post_send` and `post_recv` (reached through the inline
//! `ibv_post_send` and `ibv_post_recv`). A QP created with an SRQ (`init_attr.srq`) takes its
//! receives from it (`srq`); its own receive ring stays unused.
//!
//! The router is the authority on a QP: its state machine checks every modify (transitions and
//! attribute masks, EINVAL as the kernel reports them), it gives the virtual QP number, and it
//! resolves the destination GID at RTR. A QP's send and receive queues are two rings in a region
//! the router creates and passes on the attach connection; posting encodes each work request
//! into a slot (inline data copied in) and publishes the batch with one store. The router's
//! shard is woken (an eventfd write) only if it parked: a busy router costs the poster no system
//! call.
//!
//! As in rdma-core, posting checks what a provider checks at post time (opcode, number of
//! scatter/gather entries, inline size, room in the queue, the QP's state) and returns an errno
//! value with `*bad_wr` at the first refused request; everything else (keys, ranges, access)
//! is checked by the router when the request executes and comes back as a completion.
#![allow(unsafe_code)]

use crate::abi::{
    IbvContext, IbvPd, IbvQp, IbvQpAttr, IbvQpCap, IbvQpEx, IbvQpInitAttr, IbvRecvWr, IbvSendWr,
    IbvSge,
};
use crate::error::{returns_errno, returns_object, VerbsError};
use crate::faults::{Gone, QpQueues, Queue};
use crate::ffi::{copy_out, guard};
use crate::qp_ex::WrBatch;
use crate::registry::object::{self, HandedOut};
use crate::registry::{self, lock, ContextState, PdEntry, QueueEntry, QueueKind};
use crate::route_wait;
use crate::shadow::Posted;
use freeflow_proto::doorbell::EventFd;
use freeflow_proto::region::SharedRegion;
use freeflow_proto::verbs::qp::{
    mask, CreateQp, ModifyQp, QpAttr, QpCap, QpCreated, QpQueried, QpState, QpType,
};
use freeflow_proto::verbs::work::{
    send_flags, wr_opcode, RecvWqe, SendWqeHeader, Sge, UdDest, RECV_WQE_HEADER,
};
use freeflow_proto::verbs::{op, Body, ObjectHandle, QueueFileKind, RECV_RING, SEND_RING};
use freeflow_proto::{Producer, Wake};
use std::ffi::c_int;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

symbol_versions! {
    "IBVERBS_1.1": [ibv_create_qp, ibv_query_qp, ibv_modify_qp, ibv_destroy_qp],
}

/// What the library keeps for a QP, behind its `struct ibv_qp`.
pub(crate) struct QpShared {
    /// The state the router last reported (modify and query replies).
    state: AtomicU8,
    /// RC, UC or UD: which operations a post may carry.
    qp_type: QpType,
    /// Its context's key (a UD send's address handle must be of it).
    context: usize,
    cap: QpCap,
    /// Every send is signaled (`sq_sig_all`).
    sig_all: bool,
    /// Its rings, shared with its CQs (which retire and flush its requests).
    queues: Arc<QpQueues>,
    /// Its context's router is gone: posts fail ([`crate::faults`]).
    gone: Gone,
    /// The router shard's doorbell (rung only when the shard parked).
    bell: EventFd,
    _region: SharedRegion,
    /// The operations the new post API may build (`send_ops_flags` of `ibv_create_qp_ex`);
    /// None for a QP made without them, which `ibv_qp_to_qp_ex` does not hand out.
    pub(crate) send_ops: Option<u64>,
    /// The work requests the new post API builds between `ibv_wr_start` and
    /// `ibv_wr_complete`.
    pub(crate) batch: Mutex<WrBatch>,
}

impl QpShared {
    pub(crate) fn qp_type(&self) -> QpType {
        self.qp_type
    }

    pub(crate) fn max_send_sge(&self) -> u32 {
        self.cap.max_send_sge
    }

    pub(crate) fn max_inline_data(&self) -> u32 {
        self.cap.max_inline_data
    }
}

impl HandedOut for IbvQpEx {
    type State = QpShared;
    const MAGIC: u64 = u64::from_le_bytes(*b"FFQPv001");
    const NAME: &'static str = "QP";
}

fn wire_cap(c: &IbvQpCap) -> QpCap {
    QpCap {
        max_send_wr: c.max_send_wr,
        max_recv_wr: c.max_recv_wr,
        max_send_sge: c.max_send_sge,
        max_recv_sge: c.max_recv_sge,
        max_inline_data: c.max_inline_data,
    }
}

fn c_cap(c: &QpCap) -> IbvQpCap {
    IbvQpCap {
        max_send_wr: c.max_send_wr,
        max_recv_wr: c.max_recv_wr,
        max_send_sge: c.max_send_sge,
        max_recv_sge: c.max_recv_sge,
        max_inline_data: c.max_inline_data,
    }
}

/// `ibv_create_qp` in steps: check the caller's objects, ask the router, map the queues it
/// passed (destroying the router's QP if that fails), then build and register the library's
/// object.
pub(crate) fn create_qp(
    pd: *mut IbvPd,
    init: *mut IbvQpInitAttr,
    send_ops: Option<u64>,
) -> Result<*mut IbvQp, VerbsError> {
    let request = QpRequest::check(pd, init)?;
    let state = registry::context(request.pd.context)?;
    let QpReply { created, fd, bell } = request_qp(&state, &request)?;
    let entry = QueueEntry {
        context: request.pd.context,
        handle: created.qp,
    };
    let (region, send, recv, bell) = match map_queues(fd, bell) {
        Ok(parts) => parts,
        Err(e) => {
            // Undoes the router's side (best effort).
            let _ = entry.destroy_on_router(op::DESTROY_QP);
            return Err(e);
        }
    };
    let queues = match (Queue::tracked(send), Queue::tracked(recv)) {
        (Ok(send), Ok(recv)) => Arc::new(QpQueues {
            qpn: created.qpn,
            send,
            recv,
            has_srq: request.srq.is_some(),
        }),
        (Err(e), _) | (_, Err(e)) => {
            let _ = entry.destroy_on_router(op::DESTROY_QP);
            return Err(e);
        }
    };
    let shared = QpShared {
        state: AtomicU8::new(QpState::Reset as u8),
        qp_type: request.qp_type,
        context: request.pd.context,
        cap: created.cap,
        sig_all: request.attr.sq_sig_all != 0,
        queues: queues.clone(),
        gone: state.gone.clone(),
        bell,
        _region: region,
        send_ops,
        batch: Mutex::new(WrBatch::default()),
    };
    let obj = new_qp_object(pd, &request, &created, shared);
    crate::cq::add_user(request.attr.send_cq, request.attr.recv_cq, &queues);
    // As providers do: the caller learns the capacities the QP really has.
    // SAFETY: `init` is the caller's (checked for NULL by QpRequest::check).
    unsafe { (*init).cap = c_cap(&created.cap) };
    registry::add_queue(obj as usize, QueueKind::Qp, entry);
    registry::debug(format_args!(
        "created QP {} (number {:#08x}, {} send / {} receive WRs, inline {})",
        created.qp,
        created.qpn,
        created.cap.max_send_wr,
        created.cap.max_recv_wr,
        created.cap.max_inline_data
    ));
    Ok(obj)
}

/// What `ibv_create_qp` was asked for, with the PD, CQs and SRQ found in the registry and
/// checked to be of one context.
struct QpRequest {
    pd: PdEntry,
    /// The caller's init attributes (a copy).
    attr: IbvQpInitAttr,
    send_cq: QueueEntry,
    recv_cq: QueueEntry,
    srq: Option<QueueEntry>,
    qp_type: QpType,
}

impl QpRequest {
    fn check(pd: *mut IbvPd, init: *mut IbvQpInitAttr) -> Result<QpRequest, VerbsError> {
        let pd_entry = registry::pd(pd as usize)?;
        if init.is_null() {
            return Err(VerbsError::InvalidArgument("qp_init_attr is NULL"));
        }
        // SAFETY: the caller's init attributes (checked for NULL).
        let a = unsafe { *init };
        let send_cq = crate::cq::cq_handle(a.send_cq)?;
        let recv_cq = crate::cq::cq_handle(a.recv_cq)?;
        if send_cq.context != pd_entry.context || recv_cq.context != pd_entry.context {
            return Err(VerbsError::InvalidArgument(
                "the CQs belong to another context than the PD",
            ));
        }
        let srq = if a.srq.is_null() {
            None
        } else {
            let entry = crate::srq::srq_handle(a.srq.cast())?;
            if entry.context != pd_entry.context {
                return Err(VerbsError::InvalidArgument(
                    "the SRQ belongs to another context than the PD",
                ));
            }
            Some(entry)
        };
        let qp_type = QpType::from_u32(a.qp_type)
            .ok_or(VerbsError::NotSupported("only RC, UC and UD queue pairs"))?;
        Ok(QpRequest {
            pd: pd_entry,
            attr: a,
            send_cq,
            recv_cq,
            srq,
            qp_type,
        })
    }
}

/// The router's answer to CREATE_QP. The router holds a QP from here on: if taking its file or
/// the doorbell failed, the caller destroys it.
struct QpReply {
    created: QpCreated,
    /// The QP's queue file, taken from the attach connection (the router sent it just before
    /// the reply).
    fd: Result<OwnedFd, VerbsError>,
    /// The router shard's doorbell.
    bell: Result<EventFd, VerbsError>,
}

/// Sends CREATE_QP.
fn request_qp(state: &ContextState, request: &QpRequest) -> Result<QpReply, VerbsError> {
    let a = &request.attr;
    let body = CreateQp {
        pd: request.pd.handle,
        send_cq: request.send_cq.handle,
        recv_cq: request.recv_cq.handle,
        srq: request.srq.map_or(0, |e| e.handle),
        qp_type: a.qp_type,
        sq_sig_all: u32::from(a.sq_sig_all != 0),
        cap: wire_cap(&a.cap),
    }
    .to_vec();
    let mut ch = lock(&state.channel);
    let kind = QueueFileKind::Qp;
    let (created, fd) = ch.call_for_queue(op::CREATE_QP, &body, kind, |c: &QpCreated| c.qp)?;
    Ok(QpReply {
        created,
        fd,
        bell: ch.router_bell(),
    })
}

/// Maps the QP's region from its queue file: its send and receive rings.
fn map_queues(
    fd: Result<OwnedFd, VerbsError>,
    bell: Result<EventFd, VerbsError>,
) -> Result<(SharedRegion, Producer, Producer, EventFd), VerbsError> {
    let fd = fd?;
    let region = SharedRegion::attach(fd.as_fd())
        .map_err(|e| VerbsError::Protocol(format!("QP region: {e}")))?;
    let ring = |i| {
        region
            .ring(i)
            .map(Producer::new)
            .map_err(|e| VerbsError::Protocol(format!("QP ring: {e}")))
    };
    let (send, recv) = (ring(SEND_RING)?, ring(RECV_RING)?);
    Ok((region, send, recv, bell?))
}

/// The library's object of a new QP: its `struct ibv_qp` (in RESET) and its state `shared`.
fn new_qp_object(
    pd: *mut IbvPd,
    request: &QpRequest,
    created: &QpCreated,
    shared: QpShared,
) -> *mut IbvQp {
    let a = &request.attr;
    let ibv = IbvQp {
        context: request.pd.context as *mut IbvContext,
        qp_context: a.qp_context,
        pd,
        send_cq: a.send_cq,
        recv_cq: a.recv_cq,
        srq: a.srq,
        handle: created.qp,
        qp_num: created.qpn,
        state: QpState::Reset as u32,
        qp_type: a.qp_type,
        mutex: libc::PTHREAD_MUTEX_INITIALIZER,
        cond: libc::PTHREAD_COND_INITIALIZER,
        events_completed: 0,
    };
    object::leak(crate::qp_ex::post_api(ibv), shared).cast::<IbvQp>()
}

/// `ibv_create_qp`: an RC, UC or UD QP in RESET, or NULL with errno (EOPNOTSUPP for other
/// types, EINVAL for capacities beyond the device's limits).
#[no_mangle]
pub extern "C" fn ibv_create_qp(pd: *mut IbvPd, init: *mut IbvQpInitAttr) -> *mut IbvQp {
    returns_object("ibv_create_qp", || create_qp(pd, init, None))
}

fn lookup(qp: *mut IbvQp) -> Result<(QueueEntry, &'static QpShared), VerbsError> {
    let entry = registry::queue(qp as usize, QueueKind::Qp)?;
    // SAFETY: the registry holds `qp`: a live QP of this library, whose state lives until the
    // program destroys it (which it promises not to do while using it).
    let state = unsafe { qp_state(qp) }.ok_or(VerbsError::UnknownObject("queue pair"))?;
    Ok((entry, state))
}

/// The state behind `qp`, if it is one of this library's QPs: every QP is a `struct
/// ibv_qp_ex`, whose first field is the `struct ibv_qp` programs pass.
///
/// # Safety
/// As [`object::state`].
pub(crate) unsafe fn qp_state<'a>(qp: *mut IbvQp) -> Option<&'a QpShared> {
    // SAFETY: forwarded caller guarantee.
    unsafe { object::state(qp.cast::<IbvQpEx>()) }
}

fn wire_attr(a: &IbvQpAttr) -> QpAttr {
    QpAttr {
        qp_state: a.qp_state.min(255) as u8,
        cur_qp_state: a.cur_qp_state.min(255) as u8,
        path_mtu: a.path_mtu.min(255) as u8,
        path_mig_state: a.path_mig_state.min(255) as u8,
        qkey: a.qkey,
        rq_psn: a.rq_psn,
        sq_psn: a.sq_psn,
        dest_qp_num: a.dest_qp_num,
        qp_access_flags: a.qp_access_flags,
        pkey_index: a.pkey_index,
        en_sqd_async_notify: a.en_sqd_async_notify,
        sq_draining: a.sq_draining,
        max_rd_atomic: a.max_rd_atomic,
        max_dest_rd_atomic: a.max_dest_rd_atomic,
        min_rnr_timer: a.min_rnr_timer,
        port_num: a.port_num,
        timeout: a.timeout,
        retry_cnt: a.retry_cnt,
        rnr_retry: a.rnr_retry,
        dgid: a.ah_attr.grh.dgid.raw,
        flow_label: a.ah_attr.grh.flow_label,
        sgid_index: a.ah_attr.grh.sgid_index,
        hop_limit: a.ah_attr.grh.hop_limit,
        traffic_class: a.ah_attr.grh.traffic_class,
        is_global: a.ah_attr.is_global,
        dlid: a.ah_attr.dlid,
        sl: a.ah_attr.sl,
        src_path_bits: a.ah_attr.src_path_bits,
        static_rate: a.ah_attr.static_rate,
        ah_port_num: a.ah_attr.port_num,
        rate_limit: a.rate_limit,
        cap: wire_cap(&a.cap),
    }
}

fn c_attr(a: &QpAttr) -> IbvQpAttr {
    let mut out = IbvQpAttr {
        qp_state: u32::from(a.qp_state),
        cur_qp_state: u32::from(a.cur_qp_state),
        path_mtu: u32::from(a.path_mtu),
        path_mig_state: u32::from(a.path_mig_state),
        qkey: a.qkey,
        rq_psn: a.rq_psn,
        sq_psn: a.sq_psn,
        dest_qp_num: a.dest_qp_num,
        qp_access_flags: a.qp_access_flags,
        cap: c_cap(&a.cap),
        pkey_index: a.pkey_index,
        en_sqd_async_notify: a.en_sqd_async_notify,
        sq_draining: a.sq_draining,
        max_rd_atomic: a.max_rd_atomic,
        max_dest_rd_atomic: a.max_dest_rd_atomic,
        min_rnr_timer: a.min_rnr_timer,
        port_num: a.port_num,
        timeout: a.timeout,
        retry_cnt: a.retry_cnt,
        rnr_retry: a.rnr_retry,
        rate_limit: a.rate_limit,
        ..IbvQpAttr::default()
    };
    out.ah_attr.grh.dgid.raw = a.dgid;
    out.ah_attr.grh.flow_label = a.flow_label;
    out.ah_attr.grh.sgid_index = a.sgid_index;
    out.ah_attr.grh.hop_limit = a.hop_limit;
    out.ah_attr.grh.traffic_class = a.traffic_class;
    out.ah_attr.is_global = a.is_global;
    out.ah_attr.dlid = a.dlid;
    out.ah_attr.sl = a.sl;
    out.ah_attr.src_path_bits = a.src_path_bits;
    out.ah_attr.static_rate = a.static_rate;
    out.ah_attr.port_num = a.ah_port_num;
    out
}

fn set_state(qp: *mut IbvQp, state: &QpShared, new: u32) {
    if new == QpState::Reset as u32 {
        // The router forgot the queues without completions: so does the shadow.
        lock(&state.queues.send).forget_outstanding();
        lock(&state.queues.recv).forget_outstanding();
    }
    state.state.store(new as u8, Ordering::Release);
    // SAFETY: `qp` is live (looked up); rdma-core updates `qp->state` after a modify or query,
    // and programs only read it.
    unsafe { (*qp).state = new };
}

fn modify_qp(qp: *mut IbvQp, attr: *mut IbvQpAttr, attr_mask: c_int) -> Result<(), VerbsError> {
    let (entry, state) = lookup(qp)?;
    if attr.is_null() {
        return Err(VerbsError::InvalidArgument("attr is NULL"));
    }
    // SAFETY: the caller's attributes (checked for NULL).
    let a = unsafe { *attr };
    let body = ModifyQp {
        qp: entry.handle,
        attr_mask: attr_mask as u32,
        attr: wire_attr(&a),
    }
    .to_vec();
    let reply = if attr_mask as u32 & mask::AV != 0 {
        route_wait::waiting_for_route(&a.ah_attr.grh.dgid.raw, "ibv_modify_qp", || {
            entry.call(op::MODIFY_QP, &body)
        })?
    } else {
        entry.call(op::MODIFY_QP, &body)?
    };
    let new = reply.decode::<ObjectHandle>()?.handle;
    set_state(qp, state, new);
    registry::debug(format_args!(
        "modified QP {} (mask {attr_mask:#x}): state {new}",
        entry.handle
    ));
    Ok(())
}

/// `ibv_modify_qp`: 0, or an errno value (EINVAL for a transition or attribute mask the state
/// machine refuses, ENETUNREACH for a destination that is no container of the caller's tenant,
/// after waiting for the router to learn it: see `route_wait`).
#[no_mangle]
pub extern "C" fn ibv_modify_qp(qp: *mut IbvQp, attr: *mut IbvQpAttr, attr_mask: c_int) -> c_int {
    returns_errno("ibv_modify_qp", || modify_qp(qp, attr, attr_mask))
}

fn query_qp(
    qp: *mut IbvQp,
    attr: *mut IbvQpAttr,
    init: *mut IbvQpInitAttr,
) -> Result<(), VerbsError> {
    let (entry, state) = lookup(qp)?;
    if attr.is_null() || init.is_null() {
        return Err(VerbsError::InvalidArgument("attr or init_attr is NULL"));
    }
    let q = entry
        .call(op::QUERY_QP, &entry.handle_body())?
        .decode::<QpQueried>()?;
    let out = c_attr(&q.attr);
    // SAFETY: `qp` is live; its public fields are read as plain values.
    let init_value = unsafe {
        IbvQpInitAttr {
            qp_context: (*qp).qp_context,
            send_cq: (*qp).send_cq,
            recv_cq: (*qp).recv_cq,
            srq: (*qp).srq,
            cap: out.cap,
            qp_type: (*qp).qp_type,
            sq_sig_all: q.sq_sig_all as c_int,
        }
    };
    // SAFETY: the caller's structures (checked for NULL), written whole.
    unsafe {
        copy_out(attr, &out, std::mem::size_of::<IbvQpAttr>());
        copy_out(init, &init_value, std::mem::size_of::<IbvQpInitAttr>());
    }
    set_state(qp, state, out.qp_state);
    Ok(())
}

/// `ibv_query_qp`: every attribute (whatever the mask asks) and the init attributes; 0 or an
/// errno value.
#[no_mangle]
pub extern "C" fn ibv_query_qp(
    qp: *mut IbvQp,
    attr: *mut IbvQpAttr,
    attr_mask: c_int,
    init_attr: *mut IbvQpInitAttr,
) -> c_int {
    let _ = attr_mask;
    returns_errno("ibv_query_qp", || query_qp(qp, attr, init_attr))
}

/// `ibv_destroy_qp`: 0 or an errno value.
#[no_mangle]
pub extern "C" fn ibv_destroy_qp(qp: *mut IbvQp) -> c_int {
    returns_errno("ibv_destroy_qp", || {
        let (entry, state) = lookup(qp)?;
        let qpn = state.queues.qpn;
        // SAFETY: `qp` is live (looked up); its public fields are read as plain values.
        let (send_cq, recv_cq) = unsafe { ((*qp).send_cq, (*qp).recv_cq) };
        // SAFETY: the registry holds `qp`: made by `create_qp`; the program no longer uses it.
        unsafe { object::destroy(qp.cast::<IbvQpEx>(), entry, op::DESTROY_QP) }?;
        crate::cq::remove_user(send_cq, recv_cq, qpn);
        Ok(())
    })
}

/// Encodes one send work request into `buf`; returns its length or the errno of a refusal.
///
/// # Safety
/// `wr` is a live work request whose scatter/gather list has `num_sge` entries, and whose inline
/// data (with IBV_SEND_INLINE) is readable.
unsafe fn encode_send(wr: &IbvSendWr, qp: &QpShared, buf: &mut [u8]) -> Result<usize, c_int> {
    let cap = &qp.cap;
    // As rxe and mlx5: an operation the QP's transport does not have (a UC READ, a UD WRITE)
    // is refused at post time.
    if !qp.qp_type.allows(wr.opcode) {
        return Err(libc::EINVAL);
    }
    let op = wr.opcode as u8;
    if wr.num_sge < 0 || wr.num_sge as u32 > cap.max_send_sge {
        return Err(libc::EINVAL);
    }
    let flags = wr.send_flags & send_flags::KNOWN;
    let inline = flags & send_flags::INLINE != 0;
    let sges: &[IbvSge] = if wr.num_sge == 0 || wr.sg_list.is_null() {
        &[]
    } else {
        // SAFETY: the caller's list has `num_sge` entries.
        unsafe { std::slice::from_raw_parts(wr.sg_list, wr.num_sge as usize) }
    };
    // SAFETY: reading the union member the QP type and opcode select, as a provider does.
    let (remote_addr, rkey, compare_add, swap) = unsafe {
        match op {
            _ if qp.qp_type == QpType::Ud => {
                let ud = wr.wr.ud;
                // SAFETY (of the call): the program passes an address handle of this library
                // (or garbage, which the magic number refuses).
                let ah = object::state(ud.ah).ok_or(libc::EINVAL)?;
                if ah.context != qp.context {
                    return Err(libc::EINVAL);
                }
                let mut h = SendWqeHeader::default();
                UdDest {
                    ah: ah.handle,
                    remote_qpn: ud.remote_qpn,
                    remote_qkey: ud.remote_qkey,
                }
                .put(&mut h);
                (h.remote_addr, h.rkey, 0, 0)
            }
            wr_opcode::ATOMIC_CMP_AND_SWP | wr_opcode::ATOMIC_FETCH_AND_ADD => (
                wr.wr.atomic.remote_addr,
                wr.wr.atomic.rkey,
                wr.wr.atomic.compare_add,
                wr.wr.atomic.swap,
            ),
            wr_opcode::SEND | wr_opcode::SEND_WITH_IMM => (0, 0, 0, 0),
            _ => (wr.wr.rdma.remote_addr, wr.wr.rdma.rkey, 0, 0),
        }
    };
    let with_imm = matches!(
        op,
        wr_opcode::SEND_WITH_IMM | wr_opcode::RDMA_WRITE_WITH_IMM
    );
    let mut header = SendWqeHeader {
        wr_id: wr.wr_id,
        opcode: op,
        flags: flags as u8,
        num_sge: sges.len() as u16,
        imm_data: if with_imm { wr.imm_data } else { 0 },
        remote_addr,
        rkey,
        inline_len: 0,
        compare_add,
        swap,
    };
    let body = &mut buf[SendWqeHeader::LEN..];
    let len = if inline {
        if matches!(
            op,
            wr_opcode::RDMA_READ | wr_opcode::ATOMIC_CMP_AND_SWP | wr_opcode::ATOMIC_FETCH_AND_ADD
        ) {
            return Err(libc::EINVAL);
        }
        let total: u64 = sges.iter().map(|s| u64::from(s.length)).sum();
        if total > u64::from(cap.max_inline_data) || total as usize > body.len() {
            return Err(libc::EINVAL);
        }
        let mut at = 0usize;
        for s in sges {
            let n = s.length as usize;
            if n > 0 {
                // SAFETY: inline data is read from the program's buffer at post time, as the
                // verbs API defines (the buffer may be reused right after the call).
                let src = unsafe { std::slice::from_raw_parts(s.addr as *const u8, n) };
                body[at..at + n].copy_from_slice(src);
            }
            at += n;
        }
        header.num_sge = 0;
        header.inline_len = total as u32;
        at
    } else {
        for (i, s) in sges.iter().enumerate() {
            Sge {
                addr: s.addr,
                length: s.length,
                lkey: s.lkey,
            }
            .write(&mut body[i * Sge::LEN..]);
        }
        sges.len() * Sge::LEN
    };
    header.write(buf);
    Ok(SendWqeHeader::LEN + len)
}

/// `ops.post_send` (the inline `ibv_post_send`): 0, or an errno value with `*bad_wr` at the
/// first request not posted (the ones before it are posted). No system call unless the router
/// sleeps.
///
/// # Safety
/// `qp` is a live QP of this library; `wr` a valid list of work requests; `bad_wr` NULL or
/// writable.
pub unsafe extern "C" fn post_send(
    qp: *mut IbvQp,
    wr: *mut IbvSendWr,
    bad_wr: *mut *mut IbvSendWr,
) -> c_int {
    let report = |at: *mut IbvSendWr, errno: c_int| {
        if !bad_wr.is_null() {
            // SAFETY: the caller's out pointer.
            unsafe { *bad_wr = at };
        }
        errno
    };
    // SAFETY: forwarded caller guarantee.
    let Some(state) = (unsafe { qp_state(qp) }) else {
        return report(wr, libc::EINVAL);
    };
    if state.gone.is_set() {
        // As mlx5 after a fatal error.
        return report(wr, libc::EIO);
    }
    let current = QpState::from_u32(u32::from(state.state.load(Ordering::Acquire)));
    if !current.is_some_and(QpState::accepts_sends) {
        return report(wr, libc::EINVAL);
    }
    guard(libc::EIO, || {
        let mut queue = lock(&state.queues.send);
        let Queue { ring, buf, shadow } = &mut *queue;
        let shadow = shadow.as_mut().expect("a QP's queues are tracked");
        let mut cur = wr;
        let mut errno = 0;
        while !cur.is_null() {
            // SAFETY: a live work request of the caller's list.
            let w = unsafe { &*cur };
            // SAFETY: forwarded caller guarantee about the request's lists and data.
            let len = match unsafe { encode_send(w, state, buf) } {
                Ok(len) if !shadow.is_full() => len,
                Ok(_) => {
                    errno = libc::ENOMEM;
                    break;
                }
                Err(e) => {
                    errno = e;
                    break;
                }
            };
            match ring.push(&buf[..len]) {
                Ok(true) => {
                    let signaled = state.sig_all || w.send_flags & send_flags::SIGNALED != 0;
                    shadow.record(Posted::send(w.wr_id, w.opcode as u8, signaled));
                }
                Ok(false) => {
                    errno = libc::ENOMEM;
                    break;
                }
                Err(_) => {
                    errno = libc::EIO;
                    break;
                }
            }
            cur = w.next;
        }
        if ring.publish() == Wake::Needed {
            let _ = state.bell.ring();
        }
        if errno != 0 {
            report(cur, errno)
        } else {
            0
        }
    })
}

/// Posts every request of `wrs`, or none: 0, or the errno value of the first request refused
/// (what `ibv_post_send` checks), or ENOMEM when they do not all fit in the queue. What
/// `ibv_wr_complete` does with its batch, as hardware does.
///
/// # Safety
/// `qp` is a QP of this library (or garbage the magic number refuses); each request's lists and
/// inline data are readable.
pub(crate) unsafe fn post_send_all(qp: *mut IbvQp, wrs: &[IbvSendWr]) -> c_int {
    // SAFETY: forwarded caller guarantee.
    let Some(state) = (unsafe { qp_state(qp) }) else {
        return libc::EINVAL;
    };
    if state.gone.is_set() {
        return libc::EIO;
    }
    let current = QpState::from_u32(u32::from(state.state.load(Ordering::Acquire)));
    if !current.is_some_and(QpState::accepts_sends) {
        return libc::EINVAL;
    }
    guard(libc::EIO, || {
        let mut queue = lock(&state.queues.send);
        let Queue { ring, buf, shadow } = &mut *queue;
        let shadow = shadow.as_mut().expect("a QP's queues are tracked");
        // Every request encoded first: a refusal posts nothing.
        let mut encoded = Vec::with_capacity(wrs.len());
        for w in wrs {
            let mut slot = vec![0u8; buf.len()];
            // SAFETY: forwarded caller guarantee about the request's lists and data.
            match unsafe { encode_send(w, state, &mut slot) } {
                Ok(len) => {
                    slot.truncate(len);
                    encoded.push(slot);
                }
                Err(e) => return e,
            }
        }
        let n = encoded.len() as u64;
        let fits = ring.free_slots().is_ok_and(|free| u64::from(free) >= n);
        if !fits || !shadow.has_room_for(n) {
            return libc::ENOMEM;
        }
        for (w, slot) in wrs.iter().zip(&encoded) {
            match ring.push(slot) {
                Ok(true) => {
                    let signaled = state.sig_all || w.send_flags & send_flags::SIGNALED != 0;
                    shadow.record(Posted::send(w.wr_id, w.opcode as u8, signaled));
                }
                // Room was checked under the queue's lock: only a broken ring gets here.
                Ok(false) | Err(_) => return libc::EIO,
            }
        }
        if ring.publish() == Wake::Needed {
            let _ = state.bell.ring();
        }
        0
    })
}

/// `ops.post_recv` (the inline `ibv_post_recv`): as `post_send`, for receive requests (the QP
/// must be past RESET). A QP that takes its receives from an SRQ refuses them (EINVAL), as
/// rdma-core's providers do.
///
/// # Safety
/// As `post_send`.
pub unsafe extern "C" fn post_recv(
    qp: *mut IbvQp,
    wr: *mut IbvRecvWr,
    bad_wr: *mut *mut IbvRecvWr,
) -> c_int {
    // SAFETY: forwarded caller guarantee.
    let Some(state) = (unsafe { qp_state(qp) }) else {
        // SAFETY: forwarded caller guarantee about `bad_wr`.
        return unsafe { report_recv(bad_wr, wr, libc::EINVAL) };
    };
    let current = QpState::from_u32(u32::from(state.state.load(Ordering::Acquire)));
    let refused = if state.gone.is_set() {
        libc::EIO
    } else if !current.is_some_and(QpState::accepts_receives) || state.queues.has_srq {
        libc::EINVAL
    } else {
        let queue = &state.queues.recv;
        // SAFETY: forwarded caller guarantee.
        return unsafe { push_receives(queue, state.cap.max_recv_sge, &state.bell, wr, bad_wr) };
    };
    // SAFETY: forwarded caller guarantee about `bad_wr`.
    unsafe { report_recv(bad_wr, wr, refused) }
}

/// Stores `at` in `*bad_wr` (if not NULL) and returns `errno`.
///
/// # Safety
/// `bad_wr` is NULL or writable.
pub(crate) unsafe fn report_recv(
    bad_wr: *mut *mut IbvRecvWr,
    at: *mut IbvRecvWr,
    errno: c_int,
) -> c_int {
    if !bad_wr.is_null() {
        // SAFETY: the caller's out pointer.
        unsafe { *bad_wr = at };
    }
    errno
}

/// Encodes the receive requests of the list `wr` into `queue`'s ring and publishes them with
/// one store, ringing the router's doorbell only if its shard parked: 0, or an errno value
/// with `*bad_wr` at the first request not posted (the ones before it are posted). Used for a
/// QP's receive queue and for an SRQ.
///
/// # Safety
/// `wr` is a valid list of receive requests; `bad_wr` NULL or writable.
pub(crate) unsafe fn push_receives(
    queue: &Mutex<Queue>,
    max_sge: u32,
    bell: &EventFd,
    wr: *mut IbvRecvWr,
    bad_wr: *mut *mut IbvRecvWr,
) -> c_int {
    guard(libc::EIO, || {
        let mut queue = lock(queue);
        let Queue { ring, buf, shadow } = &mut *queue;
        let mut cur = wr;
        let mut errno = 0;
        while !cur.is_null() {
            // SAFETY: a live work request of the caller's list.
            let w = unsafe { &*cur };
            if w.num_sge < 0 || w.num_sge as u32 > max_sge {
                errno = libc::EINVAL;
                break;
            }
            if shadow.as_mut().is_some_and(|s| s.is_full()) {
                errno = libc::ENOMEM;
                break;
            }
            let sges: &[IbvSge] = if w.num_sge == 0 || w.sg_list.is_null() {
                &[]
            } else {
                // SAFETY: the caller's list has `num_sge` entries.
                unsafe { std::slice::from_raw_parts(w.sg_list, w.num_sge as usize) }
            };
            RecvWqe::write_header(w.wr_id, sges.len() as u32, buf);
            for (i, s) in sges.iter().enumerate() {
                Sge {
                    addr: s.addr,
                    length: s.length,
                    lkey: s.lkey,
                }
                .write(&mut buf[RECV_WQE_HEADER + i * Sge::LEN..]);
            }
            let len = RecvWqe::slot_bytes(sges.len() as u32);
            match ring.push(&buf[..len]) {
                Ok(true) => {
                    if let Some(s) = shadow.as_mut() {
                        s.record(Posted::recv(w.wr_id));
                    }
                }
                Ok(false) => {
                    errno = libc::ENOMEM;
                    break;
                }
                Err(_) => {
                    errno = libc::EIO;
                    break;
                }
            }
            cur = w.next;
        }
        if ring.publish() == Wake::Needed {
            let _ = bell.ring();
        }
        if errno != 0 {
            // SAFETY: forwarded caller guarantee.
            unsafe { report_recv(bad_wr, cur, errno) }
        } else {
            0
        }
    })
}
