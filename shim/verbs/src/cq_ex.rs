//! The extended CQ: `ibv_create_cq_ex` (the `verbs_context` op the inline wrapper calls) and the
//! poll API of `struct ibv_cq_ex` (`ibv_start_poll`, `ibv_next_poll`, `ibv_end_poll`,
//! `ibv_wc_read_*`), which `verbs.h` reaches through the structure's function pointers.
//!
//! Every CQ of this library is a `struct ibv_cq_ex` with these operations (a plain
//! `ibv_create_cq` too: `ibv_poll_cq` and the poll API then both work on it). A poll takes one
//! completion off the ring into the CQ's `current` slot and publishes the ring's head at once,
//! so `ibv_end_poll` has nothing left to do, and the CQ's ring lock is never held between two
//! calls of the program. The `read_*` operations read `current`.
//!
//! Completion timestamps are the router's: for a CQ created with
//! IBV_WC_EX_WITH_COMPLETION_TIMESTAMP, the engine stamps each completion with CLOCK_MONOTONIC
//! (nanoseconds) as it produces it, so `hca_core_clock` is 1 GHz and `completion_timestamp_mask`
//! is all ones. Other CQs do not pay for the clock read (their `read_completion_ts` reads 0). Wall-clock timestamps, CVLAN, flow tags and
//! tag matching are refused with EOPNOTSUPP, as are parent domains.
#![allow(unsafe_code)]

use crate::abi::{
    IbvContext, IbvCq, IbvCqEx, IbvCqInitAttrEx, IbvPollCqAttr, IBV_CQ_INIT_ATTR_MASK_FLAGS,
    IBV_CQ_INIT_ATTR_MASK_PD, IBV_CREATE_CQ_ATTR_IGNORE_OVERRUN,
    IBV_CREATE_CQ_ATTR_SINGLE_THREADED, IBV_WC_EX_WITH_BYTE_LEN,
    IBV_WC_EX_WITH_COMPLETION_TIMESTAMP, IBV_WC_EX_WITH_DLID_PATH_BITS, IBV_WC_EX_WITH_IMM,
    IBV_WC_EX_WITH_QP_NUM, IBV_WC_EX_WITH_SL, IBV_WC_EX_WITH_SLID, IBV_WC_EX_WITH_SRC_QP,
};
use crate::abi::{IbvValuesEx, IBV_VALUES_MASK_RAW_CLOCK};
use crate::cq::{cq_state, take_one, CqState};
use crate::error::{returns_object, VerbsError};
use crate::registry::lock;
use crate::shared_core;
use freeflow_proto::verbs::cq_flags;
use freeflow_proto::verbs::work::Cqe;
use std::ffi::c_int;

/// The `wc_flags` this library's CQs honour: every field of `struct ibv_wc`, and the router's
/// completion timestamp.
const SUPPORTED_WC_FLAGS: u64 = IBV_WC_EX_WITH_BYTE_LEN
    | IBV_WC_EX_WITH_IMM
    | IBV_WC_EX_WITH_QP_NUM
    | IBV_WC_EX_WITH_SRC_QP
    | IBV_WC_EX_WITH_SLID
    | IBV_WC_EX_WITH_SL
    | IBV_WC_EX_WITH_DLID_PATH_BITS
    | IBV_WC_EX_WITH_COMPLETION_TIMESTAMP;

/// `cq` with the poll API's operations: what every CQ of this library is.
pub fn poll_api(cq: IbvCq) -> IbvCqEx {
    IbvCqEx {
        cq,
        comp_mask: 0,
        status: 0,
        wr_id: 0,
        start_poll: Some(start_poll),
        next_poll: Some(next_poll),
        end_poll: Some(end_poll),
        read_opcode: Some(read_opcode),
        read_vendor_err: Some(read_vendor_err),
        read_byte_len: Some(read_byte_len),
        read_imm_data: Some(read_imm_data),
        read_qp_num: Some(read_qp_num),
        read_src_qp: Some(read_src_qp),
        read_wc_flags: Some(read_wc_flags),
        read_slid: Some(read_slid),
        read_sl: Some(read_sl),
        read_dlid_path_bits: Some(read_dlid_path_bits),
        read_completion_ts: Some(read_completion_ts),
        read_cvlan: None,
        read_flow_tag: None,
        read_tm_info: None,
        read_completion_wallclock_ns: None,
    }
}

fn create_cq_ex(
    context: *mut IbvContext,
    attr: *mut IbvCqInitAttrEx,
) -> Result<*mut IbvCqEx, VerbsError> {
    if attr.is_null() {
        return Err(VerbsError::InvalidArgument("cq_attr is NULL"));
    }
    // SAFETY: the caller's attributes (checked for NULL).
    let a = unsafe { *attr };
    if a.comp_mask & !(IBV_CQ_INIT_ATTR_MASK_FLAGS | IBV_CQ_INIT_ATTR_MASK_PD) != 0 {
        return Err(VerbsError::InvalidArgument("unknown comp_mask"));
    }
    if a.comp_mask & IBV_CQ_INIT_ATTR_MASK_PD != 0 {
        return Err(VerbsError::NotSupported("parent domains"));
    }
    if a.comp_mask & IBV_CQ_INIT_ATTR_MASK_FLAGS != 0
        && a.flags & !(IBV_CREATE_CQ_ATTR_SINGLE_THREADED | IBV_CREATE_CQ_ATTR_IGNORE_OVERRUN) != 0
    {
        return Err(VerbsError::NotSupported("unknown CQ creation flags"));
    }
    if a.wc_flags & !SUPPORTED_WC_FLAGS != 0 {
        return Err(VerbsError::NotSupported(
            "wc_flags beyond ibv_wc's fields and the completion timestamp \
             (no wall-clock timestamps, CVLAN, flow tags or tag matching)",
        ));
    }
    let cqe =
        c_int::try_from(a.cqe).map_err(|_| VerbsError::InvalidArgument("cqe out of range"))?;
    // Single-threaded CQs and ignored overruns need nothing: the poll takes the ring's lock
    // anyway, and the router never overruns a CQ.
    // Only a CQ that asks pays for the clock read per completion.
    let flags = match a.wc_flags & IBV_WC_EX_WITH_COMPLETION_TIMESTAMP {
        0 => 0,
        _ => cq_flags::TIMESTAMPS,
    };
    let comp_vector = a.comp_vector as c_int;
    let cq = crate::cq::create_cq(context, cqe, a.cq_context, a.channel, comp_vector, flags)?;
    Ok(cq.cast::<IbvCqEx>())
}

/// `verbs_context.create_cq_ex` (the inline `ibv_create_cq_ex`): a CQ with the poll API, or
/// NULL with errno (EOPNOTSUPP for `wc_flags` or options it cannot honour).
///
/// # Safety
/// `attr` is NULL or the caller's attributes.
pub unsafe extern "C" fn create_cq_ex_op(
    context: *mut IbvContext,
    attr: *mut IbvCqInitAttrEx,
) -> *mut IbvCqEx {
    returns_object("ibv_create_cq_ex", || create_cq_ex(context, attr))
}

/// `verbs_context.query_rt_values` (the inline `ibv_query_rt_values_ex`): the device's clock now,
/// the clock of the completion timestamps (CLOCK_MONOTONIC in nanoseconds), as mlx5 gives its
/// raw clock: the ticks in `raw_clock.tv_nsec`, `tv_sec` 0. 0, or an errno value (EINVAL for a
/// mask that asks for more than the raw clock).
///
/// # Safety
/// `values` is NULL or the caller's structure.
pub unsafe extern "C" fn query_rt_values_op(
    context: *mut IbvContext,
    values: *mut IbvValuesEx,
) -> c_int {
    let _ = context;
    if values.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: the caller's structure (checked for NULL).
    let v = unsafe { &mut *values };
    if v.comp_mask & !IBV_VALUES_MASK_RAW_CLOCK != 0 {
        return libc::EINVAL;
    }
    if v.comp_mask & IBV_VALUES_MASK_RAW_CLOCK != 0 {
        v.raw_clock.tv_sec = 0;
        v.raw_clock.tv_nsec = freeflow_proto::clock::monotonic_ns() as libc::c_long;
    }
    0
}

/// Takes the next completion into the CQ's `current` and its `status` and `wr_id`: 0, ENOENT
/// when there is none, EINVAL for a CQ not of this library, EIO for a ring the router broke.
///
/// # Safety
/// `cq` is NULL or a CQ of this library that the program has not destroyed.
unsafe fn poll_one(cq: *mut IbvCqEx) -> c_int {
    // SAFETY: forwarded caller guarantee.
    let Some(state) = (unsafe { cq_state(cq.cast::<IbvCq>()) }) else {
        return libc::EINVAL;
    };
    let mut slot = [0u8; Cqe::STAMPED_LEN];
    match take_one(state, &mut slot) {
        Ok((true, _)) => {
            let cqe = Cqe::decode(&slot);
            *lock(&state.current) = slot;
            // SAFETY: `cq` is live; the library writes these fields, the program reads them.
            unsafe {
                (*cq).status = cqe.status;
                (*cq).wr_id = cqe.wr_id;
            }
            0
        }
        Ok((false, give_up_core)) => {
            if give_up_core {
                shared_core::yield_core();
            }
            libc::ENOENT
        }
        Err(()) => libc::EIO,
    }
}

/// `ibv_cq_ex.start_poll`: the first completion of a poll (see [`poll_one`]). A non-zero
/// `attr->comp_mask` is EINVAL.
unsafe extern "C" fn start_poll(cq: *mut IbvCqEx, attr: *mut IbvPollCqAttr) -> c_int {
    // SAFETY: `attr` is NULL or the caller's structure.
    if !attr.is_null() && unsafe { (*attr).comp_mask } != 0 {
        return libc::EINVAL;
    }
    // SAFETY: the program passes a CQ of this library.
    unsafe { poll_one(cq) }
}

/// `ibv_cq_ex.next_poll`: the next completion (see [`poll_one`]).
unsafe extern "C" fn next_poll(cq: *mut IbvCqEx) -> c_int {
    // SAFETY: the program passes a CQ of this library.
    unsafe { poll_one(cq) }
}

/// `ibv_cq_ex.end_poll`: nothing to release (each poll released what it took).
unsafe extern "C" fn end_poll(cq: *mut IbvCqEx) {
    let _ = cq;
}

/// The state of the completion the last poll took, for the `read_*` operations.
///
/// # Safety
/// `cq` is NULL or a CQ of this library that the program has not destroyed.
unsafe fn current(cq: *mut IbvCqEx) -> Option<(&'static CqState, [u8; Cqe::STAMPED_LEN])> {
    // SAFETY: forwarded caller guarantee.
    let state: &'static CqState = unsafe { cq_state(cq.cast::<IbvCq>()) }?;
    let slot = *lock(&state.current);
    Some((state, slot))
}

/// The completion the last poll took (zeros for a CQ not of this library).
///
/// # Safety
/// As [`current`].
unsafe fn current_cqe(cq: *mut IbvCqEx) -> Cqe {
    // SAFETY: forwarded caller guarantee.
    unsafe { current(cq) }.map_or_else(Cqe::default, |(_, slot)| Cqe::decode(&slot))
}

unsafe extern "C" fn read_opcode(cq: *mut IbvCqEx) -> u32 {
    // SAFETY: the program passes a CQ of this library.
    unsafe { current_cqe(cq) }.opcode
}

unsafe extern "C" fn read_vendor_err(cq: *mut IbvCqEx) -> u32 {
    // SAFETY: the program passes a CQ of this library.
    unsafe { current_cqe(cq) }.vendor_err
}

unsafe extern "C" fn read_byte_len(cq: *mut IbvCqEx) -> u32 {
    // SAFETY: the program passes a CQ of this library.
    unsafe { current_cqe(cq) }.byte_len
}

/// Network byte order, as the sender posted it (the `__be32` of `verbs.h`).
unsafe extern "C" fn read_imm_data(cq: *mut IbvCqEx) -> u32 {
    // SAFETY: the program passes a CQ of this library.
    unsafe { current_cqe(cq) }.imm_data
}

unsafe extern "C" fn read_qp_num(cq: *mut IbvCqEx) -> u32 {
    // SAFETY: the program passes a CQ of this library.
    unsafe { current_cqe(cq) }.qp_num
}

unsafe extern "C" fn read_src_qp(cq: *mut IbvCqEx) -> u32 {
    // SAFETY: the program passes a CQ of this library.
    unsafe { current_cqe(cq) }.src_qp
}

unsafe extern "C" fn read_wc_flags(cq: *mut IbvCqEx) -> u32 {
    // SAFETY: the program passes a CQ of this library.
    unsafe { current_cqe(cq) }.wc_flags
}

unsafe extern "C" fn read_slid(cq: *mut IbvCqEx) -> u32 {
    // SAFETY: the program passes a CQ of this library.
    u32::from(unsafe { current_cqe(cq) }.slid)
}

unsafe extern "C" fn read_sl(cq: *mut IbvCqEx) -> u8 {
    // SAFETY: the program passes a CQ of this library.
    unsafe { current_cqe(cq) }.sl
}

unsafe extern "C" fn read_dlid_path_bits(cq: *mut IbvCqEx) -> u8 {
    // SAFETY: the program passes a CQ of this library.
    unsafe { current_cqe(cq) }.dlid_path_bits
}

/// The router's CLOCK_MONOTONIC when it produced the completion, in nanoseconds (the device's
/// clock ticks at 1 GHz); 0 for a flush the library made after the router went, and on a CQ
/// created without IBV_WC_EX_WITH_COMPLETION_TIMESTAMP.
unsafe extern "C" fn read_completion_ts(cq: *mut IbvCqEx) -> u64 {
    // SAFETY: the program passes a CQ of this library.
    unsafe { current(cq) }.map_or(0, |(_, slot)| Cqe::timestamp(&slot))
}
