//! Shared receive queues: `ibv_create_srq`, `ibv_modify_srq`, `ibv_query_srq`,
//! `ibv_destroy_srq`, and the context op `post_srq_recv` (reached through the inline
//! `ibv_post_srq_recv`). `ibv_create_srq_ex` is the inline of `verbs.h`, which calls
//! `ibv_create_srq` for a basic SRQ with a PD; other types (XRC, tag matching) find no
//! `create_srq_ex` op and fail with EOPNOTSUPP.
//!
//! An SRQ is a ring of receive WQEs in a region the router creates and passes on the attach
//! connection, like a QP's receive queue: posting encodes each request into a slot and
//! publishes the batch with one store, and rings the router's doorbell only if its shard
//! parked, so `ibv_post_srq_recv` makes no system call on a busy router. The router is the
//! authority on everything else: capacities, the PD, handles (another context's SRQ is
//! nothing to it), and users (destroying an SRQ that QPs use is EBUSY).
//!
//! The SRQ limit (IBV_SRQ_LIMIT in `ibv_modify_srq`) is armed in the router: one shot, it
//! raises IBV_EVENT_SRQ_LIMIT_REACHED (see `async_event`) when taking a receive leaves fewer
//! than the limit posted, and disarms. `srq_limit` at creation is ignored as rdma-core
//! documents.
#![allow(unsafe_code)]

use crate::abi::{IbvContext, IbvPd, IbvRecvWr, IbvSrq, IbvSrqAttr, IbvSrqInitAttr};
use crate::error::{returns_errno, returns_object, VerbsError};
use crate::faults::{Gone, Queue};
use crate::ffi::copy_out;
use crate::qp::{push_receives, report_recv};
use crate::registry::object::{self, HandedOut};
use crate::registry::{self, lock, QueueEntry, QueueKind};
use freeflow_proto::doorbell::EventFd;
use freeflow_proto::region::SharedRegion;
use freeflow_proto::verbs::srq::{CreateSrq, ModifySrq, SrqAttr, SrqCreated};
use freeflow_proto::verbs::{op, Body, QueueFileKind};
use freeflow_proto::Producer;
use std::ffi::c_int;
use std::os::fd::AsFd;
use std::sync::Mutex;

symbol_versions! {
    "IBVERBS_1.1": [ibv_create_srq, ibv_modify_srq, ibv_query_srq, ibv_destroy_srq],
}

/// What the library keeps for an SRQ, behind its `struct ibv_srq`.
pub(crate) struct SrqShared {
    max_sge: u32,
    recv: Mutex<Queue>,
    /// The router shard's doorbell (rung only when the shard parked).
    bell: EventFd,
    /// Its context's router is gone: posts fail ([`crate::faults`]).
    gone: Gone,
}

impl HandedOut for IbvSrq {
    type State = SrqShared;
    const MAGIC: u64 = u64::from_le_bytes(*b"FFSRv001");
    const NAME: &'static str = "SRQ";
}

fn create_srq(pd: *mut IbvPd, init: *mut IbvSrqInitAttr) -> Result<*mut IbvSrq, VerbsError> {
    let pd_entry = registry::pd(pd as usize)?;
    if init.is_null() {
        return Err(VerbsError::InvalidArgument("srq_init_attr is NULL"));
    }
    // SAFETY: the caller's init attributes (checked for NULL).
    let a = unsafe { *init };
    let state = registry::context(pd_entry.context)?;
    let body = CreateSrq {
        pd: pd_entry.handle,
        max_wr: a.attr.max_wr,
        max_sge: a.attr.max_sge,
        srq_limit: a.attr.srq_limit,
    }
    .to_vec();
    let (created, fd, bell) = {
        let mut ch = lock(&state.channel);
        let kind = QueueFileKind::Srq;
        let (created, fd) =
            ch.call_for_queue(op::CREATE_SRQ, &body, kind, |c: &SrqCreated| c.srq)?;
        (created, fd, ch.router_bell())
    };
    let made = fd.and_then(|fd| {
        let region = SharedRegion::attach(fd.as_fd())
            .map_err(|e| VerbsError::Protocol(format!("SRQ region: {e}")))?;
        let ring = region
            .ring(0)
            .map(Producer::new)
            .map_err(|e| VerbsError::Protocol(format!("SRQ ring: {e}")))?;
        Ok((ring, bell?))
    });
    let entry = QueueEntry {
        context: pd_entry.context,
        handle: created.srq,
    };
    let (ring, bell) = match made {
        Ok(parts) => parts,
        Err(e) => {
            // Undoes the router's side (best effort).
            let _ = entry.destroy_on_router(op::DESTROY_SRQ);
            return Err(e);
        }
    };
    let ibv = IbvSrq {
        context: pd_entry.context as *mut IbvContext,
        srq_context: a.srq_context,
        pd,
        handle: created.srq,
        mutex: libc::PTHREAD_MUTEX_INITIALIZER,
        cond: libc::PTHREAD_COND_INITIALIZER,
        events_completed: 0,
    };
    let state = SrqShared {
        max_sge: created.attr.max_sge,
        recv: Queue::new(ring),
        bell,
        gone: state.gone.clone(),
    };
    let obj = object::leak(ibv, state);
    // As rdma-core documents: the caller learns the capacities the SRQ really has.
    // SAFETY: `init` is the caller's (checked for NULL above).
    unsafe {
        (*init).attr.max_wr = created.attr.max_wr;
        (*init).attr.max_sge = created.attr.max_sge;
    }
    registry::add_queue(obj as usize, QueueKind::Srq, entry);
    registry::debug(format_args!(
        "created SRQ {} ({} WRs of {} SGEs)",
        created.srq, created.attr.max_wr, created.attr.max_sge
    ));
    Ok(obj)
}

/// `ibv_create_srq`: an SRQ of at least `attr.max_wr` receives of `attr.max_sge` entries
/// (written back), or NULL with errno (EINVAL for capacities beyond the device's).
#[no_mangle]
pub extern "C" fn ibv_create_srq(pd: *mut IbvPd, init: *mut IbvSrqInitAttr) -> *mut IbvSrq {
    returns_object("ibv_create_srq", || create_srq(pd, init))
}

/// The context an SRQ belongs to and its router handle (for `ibv_create_qp`).
pub fn srq_handle(srq: *mut IbvSrq) -> Result<QueueEntry, VerbsError> {
    let entry = registry::queue(srq as usize, QueueKind::Srq)?;
    // SAFETY: the registry holds `srq`: a live SRQ of this library.
    unsafe { object::state(srq) }.ok_or(VerbsError::UnknownObject("shared receive queue"))?;
    Ok(entry)
}

fn modify_srq(srq: *mut IbvSrq, attr: *mut IbvSrqAttr, mask: c_int) -> Result<(), VerbsError> {
    let entry = srq_handle(srq)?;
    if attr.is_null() {
        return Err(VerbsError::InvalidArgument("srq_attr is NULL"));
    }
    // SAFETY: the caller's attributes (checked for NULL).
    let a = unsafe { *attr };
    let body = ModifySrq {
        srq: entry.handle,
        attr_mask: mask as u32,
        max_wr: a.max_wr,
        srq_limit: a.srq_limit,
    }
    .to_vec();
    entry.call(op::MODIFY_SRQ, &body)?;
    Ok(())
}

/// `ibv_modify_srq`: 0, or an errno value (EINVAL for a resize, which this device does not
/// do, or a limit above `max_wr`).
#[no_mangle]
pub extern "C" fn ibv_modify_srq(srq: *mut IbvSrq, attr: *mut IbvSrqAttr, mask: c_int) -> c_int {
    returns_errno("ibv_modify_srq", || modify_srq(srq, attr, mask))
}

fn query_srq(srq: *mut IbvSrq, attr: *mut IbvSrqAttr) -> Result<(), VerbsError> {
    let entry = srq_handle(srq)?;
    if attr.is_null() {
        return Err(VerbsError::InvalidArgument("srq_attr is NULL"));
    }
    let q = entry
        .call(op::QUERY_SRQ, &entry.handle_body())?
        .decode::<SrqAttr>()?;
    let out = IbvSrqAttr {
        max_wr: q.max_wr,
        max_sge: q.max_sge,
        srq_limit: q.srq_limit,
    };
    // SAFETY: the caller's structure (checked for NULL), written whole.
    unsafe { copy_out(attr, &out, std::mem::size_of::<IbvSrqAttr>()) };
    Ok(())
}

/// `ibv_query_srq`: 0, or an errno value.
#[no_mangle]
pub extern "C" fn ibv_query_srq(srq: *mut IbvSrq, attr: *mut IbvSrqAttr) -> c_int {
    returns_errno("ibv_query_srq", || query_srq(srq, attr))
}

/// `ibv_destroy_srq`: 0, or an errno value (EBUSY while QPs use it).
#[no_mangle]
pub extern "C" fn ibv_destroy_srq(srq: *mut IbvSrq) -> c_int {
    returns_errno("ibv_destroy_srq", || {
        let entry = srq_handle(srq)?;
        // SAFETY: the registry holds `srq`: made by `create_srq`; the program no longer uses
        // it.
        unsafe { object::destroy(srq, entry, op::DESTROY_SRQ) }
    })
}

/// `ops.post_srq_recv` (the inline `ibv_post_srq_recv`): 0, or an errno value with `*bad_wr`
/// at the first request not posted (ENOMEM when the SRQ is full, EINVAL for more entries than
/// `max_sge`). No system call unless the router sleeps.
///
/// # Safety
/// `srq` is a live SRQ of this library; `wr` a valid list of receive requests; `bad_wr` NULL
/// or writable.
pub unsafe extern "C" fn post_srq_recv(
    srq: *mut IbvSrq,
    wr: *mut IbvRecvWr,
    bad_wr: *mut *mut IbvRecvWr,
) -> c_int {
    // SAFETY: forwarded caller guarantee.
    let Some(state) = (unsafe { object::state(srq) }) else {
        // SAFETY: forwarded caller guarantee about `bad_wr`.
        return unsafe { report_recv(bad_wr, wr, libc::EINVAL) };
    };
    if state.gone.is_set() {
        // SAFETY: forwarded caller guarantee about `bad_wr`.
        return unsafe { report_recv(bad_wr, wr, libc::EIO) };
    }
    // SAFETY: forwarded caller guarantee.
    unsafe { push_receives(&state.recv, state.max_sge, &state.bell, wr, bad_wr) }
}
