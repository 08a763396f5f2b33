//! The extended QP: `ibv_create_qp_ex` (the `verbs_context` op the inline wrapper calls),
//! `ibv_qp_to_qp_ex`, and the new post API of `struct ibv_qp_ex` (`ibv_wr_start`, one
//! `ibv_wr_<operation>` per request with `ibv_wr_set_*` for its data, then `ibv_wr_complete`
//! or `ibv_wr_abort`), which `verbs.h` reaches through the structure's function pointers.
//!
//! Every QP of this library is a `struct ibv_qp_ex` with these operations; `ibv_qp_to_qp_ex`
//! hands it out for QPs created with IBV_QP_INIT_ATTR_SEND_OPS_FLAGS (as rdma-core's
//! providers), whose operations were declared then. The API builds requests in the QP's batch
//! (the caller's `wr_id` and `wr_flags` are read at each operation, inline data is copied at
//! once, as the API promises), and `ibv_wr_complete` posts the batch through the same path as
//! `ibv_post_send`, with its checks, all or nothing. A mistake while building (an operation the
//! QP was not created for or its transport lacks, a setter without an operation, a call outside
//! start/complete) is remembered and returned by `ibv_wr_complete`, which then posts nothing;
//! so does a refusal at posting (a request `ibv_post_send` would refuse, or a queue without room
//! for the whole batch: ENOMEM).
//!
//! Not supported (EOPNOTSUPP at creation, or from `ibv_wr_complete` if called anyway): XRC,
//! memory windows, local and send-with invalidate, TSO, atomic write; RSS and creation flags.
#![allow(unsafe_code)]

use crate::abi::{
    IbvAh, IbvAtomicWr, IbvContext, IbvDataBuf, IbvQp, IbvQpEx, IbvQpInitAttr, IbvQpInitAttrEx,
    IbvRdmaWr, IbvSendWr, IbvSendWrWr, IbvSge, IbvUdWr, IBV_QPT_XRC_RECV, IBV_QPT_XRC_SEND,
    IBV_QP_EX_WITH_ATOMIC_CMP_AND_SWP, IBV_QP_EX_WITH_ATOMIC_FETCH_AND_ADD,
    IBV_QP_EX_WITH_RDMA_READ, IBV_QP_EX_WITH_RDMA_WRITE, IBV_QP_EX_WITH_RDMA_WRITE_WITH_IMM,
    IBV_QP_EX_WITH_SEND, IBV_QP_EX_WITH_SEND_WITH_IMM, IBV_QP_INIT_ATTR_CREATE_FLAGS,
    IBV_QP_INIT_ATTR_IND_TABLE, IBV_QP_INIT_ATTR_MAX_TSO_HEADER, IBV_QP_INIT_ATTR_PD,
    IBV_QP_INIT_ATTR_RX_HASH, IBV_QP_INIT_ATTR_SEND_OPS_FLAGS, IBV_QP_INIT_ATTR_XRCD,
};
use crate::error::{returns_object, VerbsError};
use crate::ffi::guard;
use crate::qp::{qp_state, QpShared};
use crate::registry::{self, lock};
use freeflow_proto::verbs::qp::QpType;
use freeflow_proto::verbs::work::{send_flags, wr_opcode};
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;

symbol_versions! {
    "IBVERBS_1.6": [ibv_qp_to_qp_ex],
}

/// The operations of the new post API each transport has (as `ibv_post_send` allows them).
fn supported_send_ops(qp_type: QpType) -> u64 {
    let two_sided = IBV_QP_EX_WITH_SEND | IBV_QP_EX_WITH_SEND_WITH_IMM;
    let writes = IBV_QP_EX_WITH_RDMA_WRITE | IBV_QP_EX_WITH_RDMA_WRITE_WITH_IMM;
    match qp_type {
        QpType::Rc => {
            two_sided
                | writes
                | IBV_QP_EX_WITH_RDMA_READ
                | IBV_QP_EX_WITH_ATOMIC_CMP_AND_SWP
                | IBV_QP_EX_WITH_ATOMIC_FETCH_AND_ADD
        }
        QpType::Uc => two_sided | writes,
        QpType::Ud => two_sided,
    }
}

/// The `send_ops_flags` bit of a work request's opcode.
fn send_op_bit(opcode: u32) -> u64 {
    match opcode as u8 {
        wr_opcode::RDMA_WRITE => IBV_QP_EX_WITH_RDMA_WRITE,
        wr_opcode::RDMA_WRITE_WITH_IMM => IBV_QP_EX_WITH_RDMA_WRITE_WITH_IMM,
        wr_opcode::SEND => IBV_QP_EX_WITH_SEND,
        wr_opcode::SEND_WITH_IMM => IBV_QP_EX_WITH_SEND_WITH_IMM,
        wr_opcode::RDMA_READ => IBV_QP_EX_WITH_RDMA_READ,
        wr_opcode::ATOMIC_CMP_AND_SWP => IBV_QP_EX_WITH_ATOMIC_CMP_AND_SWP,
        wr_opcode::ATOMIC_FETCH_AND_ADD => IBV_QP_EX_WITH_ATOMIC_FETCH_AND_ADD,
        _ => 0,
    }
}

fn create_qp_ex(
    context: *mut IbvContext,
    attr: *mut IbvQpInitAttrEx,
) -> Result<*mut IbvQp, VerbsError> {
    if attr.is_null() {
        return Err(VerbsError::InvalidArgument("qp_init_attr_ex is NULL"));
    }
    // SAFETY: the caller's attributes (checked for NULL).
    let a = unsafe { *attr };
    let known = IBV_QP_INIT_ATTR_PD
        | IBV_QP_INIT_ATTR_XRCD
        | IBV_QP_INIT_ATTR_CREATE_FLAGS
        | IBV_QP_INIT_ATTR_MAX_TSO_HEADER
        | IBV_QP_INIT_ATTR_IND_TABLE
        | IBV_QP_INIT_ATTR_RX_HASH
        | IBV_QP_INIT_ATTR_SEND_OPS_FLAGS;
    if a.comp_mask & !known != 0 {
        return Err(VerbsError::InvalidArgument("unknown comp_mask"));
    }
    if a.comp_mask & IBV_QP_INIT_ATTR_XRCD != 0
        || a.qp_type == IBV_QPT_XRC_SEND
        || a.qp_type == IBV_QPT_XRC_RECV
    {
        return Err(VerbsError::NotSupported("XRC (no XRC domains or XRC QPs)"));
    }
    if a.comp_mask & (IBV_QP_INIT_ATTR_IND_TABLE | IBV_QP_INIT_ATTR_RX_HASH) != 0 {
        return Err(VerbsError::NotSupported("RSS QPs (no work queues)"));
    }
    if a.comp_mask & IBV_QP_INIT_ATTR_MAX_TSO_HEADER != 0 && a.max_tso_header != 0 {
        return Err(VerbsError::NotSupported("TSO"));
    }
    if a.comp_mask & IBV_QP_INIT_ATTR_CREATE_FLAGS != 0 && a.create_flags != 0 {
        return Err(VerbsError::NotSupported("QP creation flags"));
    }
    if a.comp_mask & IBV_QP_INIT_ATTR_PD == 0 {
        return Err(VerbsError::InvalidArgument(
            "a QP needs a PD (IBV_QP_INIT_ATTR_PD)",
        ));
    }
    if registry::pd(a.pd as usize)?.context != context as usize {
        return Err(VerbsError::InvalidArgument(
            "the PD belongs to another context",
        ));
    }
    let qp_type = QpType::from_u32(a.qp_type)
        .ok_or(VerbsError::NotSupported("only RC, UC and UD queue pairs"))?;
    let send_ops = if a.comp_mask & IBV_QP_INIT_ATTR_SEND_OPS_FLAGS != 0 {
        if a.send_ops_flags & !supported_send_ops(qp_type) != 0 {
            return Err(VerbsError::NotSupported(
                "send_ops_flags beyond the transport's SEND, RDMA WRITE, READ and atomics \
                 (no memory windows, invalidation, TSO or atomic write)",
            ));
        }
        Some(a.send_ops_flags)
    } else {
        None
    };
    let mut init = IbvQpInitAttr {
        qp_context: a.qp_context,
        send_cq: a.send_cq,
        recv_cq: a.recv_cq,
        srq: a.srq,
        cap: a.cap,
        qp_type: a.qp_type,
        sq_sig_all: a.sq_sig_all,
    };
    let qp = crate::qp::create_qp(a.pd, &mut init, send_ops)?;
    if let Some(ops) = send_ops {
        // SAFETY: the QP just made.
        let qpn = unsafe { (*qp).qp_num };
        registry::debug(format_args!(
            "QP number {qpn:#08x} takes the new post API (send_ops_flags {ops:#x})"
        ));
    }
    // SAFETY: the caller's attributes (checked for NULL): it learns the capacities granted.
    unsafe { (*attr).cap = init.cap };
    Ok(qp)
}

/// `verbs_context.create_qp_ex` (the inline `ibv_create_qp_ex` when `comp_mask` is more than
/// IBV_QP_INIT_ATTR_PD): a QP, or NULL with errno (EOPNOTSUPP for XRC and what else it cannot
/// honour).
///
/// # Safety
/// `attr` is NULL or the caller's attributes.
pub unsafe extern "C" fn create_qp_ex_op(
    context: *mut IbvContext,
    attr: *mut IbvQpInitAttrEx,
) -> *mut IbvQp {
    returns_object("ibv_create_qp_ex", || create_qp_ex(context, attr))
}

/// `ibv_qp_to_qp_ex`: the `struct ibv_qp_ex` of a QP created with IBV_QP_INIT_ATTR_SEND_OPS_FLAGS,
/// else NULL.
#[no_mangle]
pub extern "C" fn ibv_qp_to_qp_ex(qp: *mut IbvQp) -> *mut IbvQpEx {
    // SAFETY: the program passes one of this library's QPs (the magic number refuses others).
    match unsafe { qp_state(qp) } {
        Some(state) if state.send_ops.is_some() => qp.cast(),
        _ => null_mut(),
    }
}

/// `qp` with the new post API's operations: what every QP of this library is.
pub fn post_api(qp: IbvQp) -> IbvQpEx {
    IbvQpEx {
        qp_base: qp,
        comp_mask: 0,
        wr_id: 0,
        wr_flags: 0,
        wr_atomic_cmp_swp: Some(wr_atomic_cmp_swp),
        wr_atomic_fetch_add: Some(wr_atomic_fetch_add),
        wr_bind_mw: Some(wr_bind_mw),
        wr_local_inv: Some(wr_local_inv),
        wr_rdma_read: Some(wr_rdma_read),
        wr_rdma_write: Some(wr_rdma_write),
        wr_rdma_write_imm: Some(wr_rdma_write_imm),
        wr_send: Some(wr_send),
        wr_send_imm: Some(wr_send_imm),
        wr_send_inv: Some(wr_send_inv),
        wr_send_tso: Some(wr_send_tso),
        wr_set_ud_addr: Some(wr_set_ud_addr),
        wr_set_xrc_srqn: Some(wr_set_xrc_srqn),
        wr_set_inline_data: Some(wr_set_inline_data),
        wr_set_inline_data_list: Some(wr_set_inline_data_list),
        wr_set_sge: Some(wr_set_sge),
        wr_set_sge_list: Some(wr_set_sge_list),
        wr_start: Some(wr_start),
        wr_complete: Some(wr_complete),
        wr_abort: Some(wr_abort),
        wr_atomic_write: Some(wr_atomic_write),
    }
}

/// One request the new post API is building: what `struct ibv_send_wr` would hold, with the
/// data it points at owned here (plain numbers, so the batch can live behind a lock).
#[derive(Default)]
struct PendingWr {
    wr_id: u64,
    flags: u32,
    opcode: u32,
    imm_data: u32,
    remote_addr: u64,
    rkey: u32,
    compare_add: u64,
    swap: u64,
    /// UD: the address handle (a pointer the program passed, checked at posting), QP number
    /// and qkey.
    ah: usize,
    remote_qpn: u32,
    remote_qkey: u32,
    sges: Vec<IbvSge>,
    /// Inline data, copied at `ibv_wr_set_inline_data(_list)`.
    inline: Option<Vec<u8>>,
}

/// A QP's requests between `ibv_wr_start` and `ibv_wr_complete`.
#[derive(Default)]
pub(crate) struct WrBatch {
    open: bool,
    wrs: Vec<PendingWr>,
    /// The first mistake made while building (an errno value), returned by `ibv_wr_complete`.
    error: c_int,
}

impl WrBatch {
    fn fail(&mut self, errno: c_int) {
        if self.error == 0 {
            self.error = errno;
        }
    }
}

/// Runs `f` on the QP's batch (nothing for a QP not of this library: its `ibv_wr_complete`
/// then says EINVAL).
///
/// # Safety
/// `qp` is NULL or a QP of this library that the program has not destroyed.
unsafe fn with_batch(qp: *mut IbvQpEx, f: impl FnOnce(&QpShared, &mut WrBatch)) {
    // SAFETY: forwarded caller guarantee.
    let Some(state) = (unsafe { qp_state(qp.cast::<IbvQp>()) }) else {
        return;
    };
    guard((), || f(state, &mut lock(&state.batch)));
}

/// Starts a request of `opcode` with the caller's `wr_id` and `wr_flags`; `fill` sets its
/// remote fields.
///
/// # Safety
/// As [`with_batch`].
unsafe fn begin(qp: *mut IbvQpEx, opcode: u8, fill: impl FnOnce(&mut PendingWr)) {
    // SAFETY: `qp` is live (the caller's guarantee); the program writes these fields before
    // each operation, and they are read as plain values.
    let (wr_id, flags) = unsafe {
        if qp.is_null() {
            return;
        }
        (
            std::ptr::addr_of!((*qp).wr_id).read(),
            std::ptr::addr_of!((*qp).wr_flags).read(),
        )
    };
    // SAFETY: forwarded caller guarantee.
    unsafe {
        with_batch(qp, |state, batch| {
            if !batch.open {
                return batch.fail(libc::EINVAL);
            }
            let allowed = state.send_ops.unwrap_or(0);
            let bit = send_op_bit(u32::from(opcode));
            if bit == 0 || allowed & bit == 0 || !state.qp_type().allows(u32::from(opcode)) {
                return batch.fail(libc::EINVAL);
            }
            let mut wr = PendingWr {
                wr_id,
                flags,
                opcode: u32::from(opcode),
                ..PendingWr::default()
            };
            fill(&mut wr);
            batch.wrs.push(wr);
        })
    }
}

/// Applies `set` to the request being built (EINVAL at completion if there is none).
///
/// # Safety
/// As [`with_batch`].
unsafe fn set_on_last(qp: *mut IbvQpEx, set: impl FnOnce(&QpShared, &mut PendingWr) -> c_int) {
    // SAFETY: forwarded caller guarantee.
    unsafe {
        with_batch(qp, |state, batch| {
            let errno = match batch.wrs.last_mut() {
                Some(wr) if batch.open => set(state, wr),
                _ => libc::EINVAL,
            };
            if errno != 0 {
                batch.fail(errno);
            }
        })
    }
}

/// Records an operation this library does not have: `ibv_wr_complete` returns EOPNOTSUPP.
///
/// # Safety
/// As [`with_batch`].
unsafe fn unsupported(qp: *mut IbvQpEx, what: &str) {
    registry::debug(format_args!("{what} is not supported (EOPNOTSUPP)"));
    // SAFETY: forwarded caller guarantee.
    unsafe { with_batch(qp, |_, batch| batch.fail(libc::EOPNOTSUPP)) }
}

unsafe extern "C" fn wr_start(qp: *mut IbvQpEx) {
    // SAFETY: the program passes a QP of this library.
    unsafe {
        with_batch(qp, |_, batch| {
            *batch = WrBatch {
                open: true,
                ..WrBatch::default()
            }
        })
    }
}

unsafe extern "C" fn wr_abort(qp: *mut IbvQpEx) {
    // SAFETY: the program passes a QP of this library.
    unsafe { with_batch(qp, |_, batch| *batch = WrBatch::default()) }
}

/// Posts the batch, all of it or nothing: 0, or an errno value (a mistake made while building,
/// a request `ibv_post_send` would refuse, or no room for the whole batch).
unsafe extern "C" fn wr_complete(qp: *mut IbvQpEx) -> c_int {
    // SAFETY: the program passes a QP of this library.
    let Some(state) = (unsafe { qp_state(qp.cast::<IbvQp>()) }) else {
        return libc::EINVAL;
    };
    guard(libc::EIO, || {
        let batch = std::mem::take(&mut *lock(&state.batch));
        if !batch.open {
            return libc::EINVAL;
        }
        if batch.error != 0 {
            return batch.error;
        }
        if batch.wrs.is_empty() {
            return 0;
        }
        // The requests as `ibv_post_send` takes them, pointing into the batch (alive until
        // the end of this function); posted all or none.
        let mut inline_sges: Vec<IbvSge> = batch
            .wrs
            .iter()
            .map(|w| {
                w.inline
                    .as_ref()
                    .map_or_else(IbvSge::default, |data| IbvSge {
                        addr: data.as_ptr() as u64,
                        length: data.len() as u32,
                        lkey: 0,
                    })
            })
            .collect();
        let wrs: Vec<IbvSendWr> = batch
            .wrs
            .iter()
            .zip(inline_sges.iter_mut())
            .map(|(w, inline_sge)| send_wr(state, w, inline_sge))
            .collect();
        // SAFETY: requests whose lists and data live in `batch` and `inline_sges` for the
        // call; the QP is live.
        unsafe { crate::qp::post_send_all(qp.cast::<IbvQp>(), &wrs) }
    })
}

/// The `struct ibv_send_wr` of a pending request (`next` not set yet).
fn send_wr(state: &QpShared, w: &PendingWr, inline_sge: &mut IbvSge) -> IbvSendWr {
    let wr = if state.qp_type() == QpType::Ud {
        IbvSendWrWr {
            ud: IbvUdWr {
                ah: w.ah as *mut IbvAh,
                remote_qpn: w.remote_qpn,
                remote_qkey: w.remote_qkey,
            },
        }
    } else if matches!(
        w.opcode as u8,
        wr_opcode::ATOMIC_CMP_AND_SWP | wr_opcode::ATOMIC_FETCH_AND_ADD
    ) {
        IbvSendWrWr {
            atomic: IbvAtomicWr {
                remote_addr: w.remote_addr,
                compare_add: w.compare_add,
                swap: w.swap,
                rkey: w.rkey,
            },
        }
    } else {
        IbvSendWrWr {
            rdma: IbvRdmaWr {
                remote_addr: w.remote_addr,
                rkey: w.rkey,
            },
        }
    };
    let (sg_list, num_sge, flags) = match &w.inline {
        Some(_) => (inline_sge as *mut IbvSge, 1, w.flags | send_flags::INLINE),
        None => (
            w.sges.as_ptr().cast_mut(),
            w.sges.len() as c_int,
            w.flags & !send_flags::INLINE,
        ),
    };
    IbvSendWr {
        wr_id: w.wr_id,
        next: null_mut(),
        sg_list,
        num_sge,
        opcode: w.opcode,
        send_flags: flags,
        imm_data: w.imm_data,
        wr,
        qp_type: 0,
        bind_mw: [0; 6],
    }
}

unsafe extern "C" fn wr_atomic_cmp_swp(
    qp: *mut IbvQpEx,
    rkey: u32,
    remote_addr: u64,
    compare: u64,
    swap: u64,
) {
    // SAFETY: the program passes a QP of this library.
    unsafe {
        begin(qp, wr_opcode::ATOMIC_CMP_AND_SWP, |w| {
            (w.rkey, w.remote_addr, w.compare_add, w.swap) = (rkey, remote_addr, compare, swap);
        })
    }
}

unsafe extern "C" fn wr_atomic_fetch_add(qp: *mut IbvQpEx, rkey: u32, remote_addr: u64, add: u64) {
    // SAFETY: the program passes a QP of this library.
    unsafe {
        begin(qp, wr_opcode::ATOMIC_FETCH_AND_ADD, |w| {
            (w.rkey, w.remote_addr, w.compare_add) = (rkey, remote_addr, add);
        })
    }
}

unsafe extern "C" fn wr_rdma_read(qp: *mut IbvQpEx, rkey: u32, remote_addr: u64) {
    // SAFETY: the program passes a QP of this library.
    unsafe {
        begin(qp, wr_opcode::RDMA_READ, |w| {
            (w.rkey, w.remote_addr) = (rkey, remote_addr);
        })
    }
}

unsafe extern "C" fn wr_rdma_write(qp: *mut IbvQpEx, rkey: u32, remote_addr: u64) {
    // SAFETY: the program passes a QP of this library.
    unsafe {
        begin(qp, wr_opcode::RDMA_WRITE, |w| {
            (w.rkey, w.remote_addr) = (rkey, remote_addr);
        })
    }
}

/// `imm_data` in network byte order, as the program passes it.
unsafe extern "C" fn wr_rdma_write_imm(qp: *mut IbvQpEx, rkey: u32, remote_addr: u64, imm: u32) {
    // SAFETY: the program passes a QP of this library.
    unsafe {
        begin(qp, wr_opcode::RDMA_WRITE_WITH_IMM, |w| {
            (w.rkey, w.remote_addr, w.imm_data) = (rkey, remote_addr, imm);
        })
    }
}

unsafe extern "C" fn wr_send(qp: *mut IbvQpEx) {
    // SAFETY: the program passes a QP of this library.
    unsafe { begin(qp, wr_opcode::SEND, |_| {}) }
}

/// `imm_data` in network byte order, as the program passes it.
unsafe extern "C" fn wr_send_imm(qp: *mut IbvQpEx, imm: u32) {
    // SAFETY: the program passes a QP of this library.
    unsafe { begin(qp, wr_opcode::SEND_WITH_IMM, |w| w.imm_data = imm) }
}

unsafe extern "C" fn wr_bind_mw(qp: *mut IbvQpEx, _: *mut c_void, _: u32, _: *const c_void) {
    // SAFETY: the program passes a QP of this library.
    unsafe { unsupported(qp, "ibv_wr_bind_mw (memory windows)") }
}

unsafe extern "C" fn wr_local_inv(qp: *mut IbvQpEx, _: u32) {
    // SAFETY: the program passes a QP of this library.
    unsafe { unsupported(qp, "ibv_wr_local_inv") }
}

unsafe extern "C" fn wr_send_inv(qp: *mut IbvQpEx, _: u32) {
    // SAFETY: the program passes a QP of this library.
    unsafe { unsupported(qp, "ibv_wr_send_inv") }
}

unsafe extern "C" fn wr_send_tso(qp: *mut IbvQpEx, _: *mut c_void, _: u16, _: u16) {
    // SAFETY: the program passes a QP of this library.
    unsafe { unsupported(qp, "ibv_wr_send_tso") }
}

unsafe extern "C" fn wr_set_xrc_srqn(qp: *mut IbvQpEx, _: u32) {
    // SAFETY: the program passes a QP of this library.
    unsafe { unsupported(qp, "ibv_wr_set_xrc_srqn (XRC)") }
}

unsafe extern "C" fn wr_atomic_write(qp: *mut IbvQpEx, _: u32, _: u64, _: *const c_void) {
    // SAFETY: the program passes a QP of this library.
    unsafe { unsupported(qp, "ibv_wr_atomic_write") }
}

/// The address of a UD request (the handle is checked to be of the QP's context at posting).
unsafe extern "C" fn wr_set_ud_addr(qp: *mut IbvQpEx, ah: *mut IbvAh, qpn: u32, qkey: u32) {
    // SAFETY: the program passes a QP of this library.
    unsafe {
        set_on_last(qp, |state, w| {
            if state.qp_type() != QpType::Ud {
                return libc::EINVAL;
            }
            (w.ah, w.remote_qpn, w.remote_qkey) = (ah as usize, qpn, qkey);
            0
        })
    }
}

unsafe extern "C" fn wr_set_sge(qp: *mut IbvQpEx, lkey: u32, addr: u64, length: u32) {
    // SAFETY: the program passes a QP of this library.
    unsafe {
        set_on_last(qp, |_, w| {
            w.sges = vec![IbvSge { addr, length, lkey }];
            w.inline = None;
            0
        })
    }
}

unsafe extern "C" fn wr_set_sge_list(qp: *mut IbvQpEx, num_sge: usize, list: *const IbvSge) {
    // SAFETY: the program passes a QP of this library.
    unsafe {
        set_on_last(qp, |state, w| {
            if num_sge > state_max_send_sge(state) || (num_sge > 0 && list.is_null()) {
                return libc::EINVAL;
            }
            w.sges = if num_sge == 0 {
                Vec::new()
            } else {
                // SAFETY: the program's list has `num_sge` entries (bounded by the QP's
                // capacity above); copied now, as the API allows its reuse after the call.
                std::slice::from_raw_parts(list, num_sge).to_vec()
            };
            w.inline = None;
            0
        })
    }
}

/// The QP's `max_send_sge`, bounding a list copied from the program.
fn state_max_send_sge(state: &QpShared) -> usize {
    state.max_send_sge() as usize
}

unsafe extern "C" fn wr_set_inline_data(qp: *mut IbvQpEx, addr: *mut c_void, length: usize) {
    let buf = IbvDataBuf { addr, length };
    // SAFETY: the program passes a QP of this library and one buffer.
    unsafe { wr_set_inline_data_list(qp, 1, &buf) }
}

unsafe extern "C" fn wr_set_inline_data_list(
    qp: *mut IbvQpEx,
    num_buf: usize,
    list: *const IbvDataBuf,
) {
    // SAFETY: the program passes a QP of this library.
    unsafe {
        set_on_last(qp, |state, w| {
            if num_buf > 0 && list.is_null() {
                return libc::EINVAL;
            }
            let limit = state.max_inline_data() as usize;
            let bufs = if num_buf == 0 {
                &[][..]
            } else {
                // SAFETY: the program's list has `num_buf` entries; each is checked against
                // the QP's inline limit before any byte is copied.
                std::slice::from_raw_parts(list, num_buf)
            };
            let total = bufs
                .iter()
                .try_fold(0usize, |sum, b| sum.checked_add(b.length));
            match total {
                Some(t) if t <= limit => {}
                _ => return libc::EINVAL,
            }
            let mut data = Vec::with_capacity(total.unwrap_or(0));
            for b in bufs {
                if b.length > 0 {
                    if b.addr.is_null() {
                        return libc::EINVAL;
                    }
                    // SAFETY: the program's buffer of `length` bytes, copied now (the API
                    // lets it be reused after the call).
                    data.extend_from_slice(std::slice::from_raw_parts(
                        b.addr.cast::<u8>(),
                        b.length,
                    ));
                }
            }
            w.sges.clear();
            w.inline = Some(data);
            0
        })
    }
}
