//! Verbs that exist (so unmodified programs load and link) but are not implemented yet. Each
//! fails the way its man page describes a failure: NULL or -1 with errno EOPNOTSUPP, or the
//! errno value EOPNOTSUPP itself. None pretends to succeed. Under `FREEFLOW_DEBUG` the first
//! call of each says so on stderr.
//!
//! The CQ and QP slices move their verbs from here into real implementations (PD and MR are in
//! `pd_mr`). `ibv_rereg_mr` stays here for now: it answers IBV_REREG_MR_ERR_INPUT, the old
//! region unchanged.
#![allow(unsafe_code)]

use crate::abi::IBV_REREG_MR_ERR_INPUT;
use crate::ffi::set_errno;
use std::collections::BTreeSet;
use std::ffi::{c_int, c_uint, c_void};
use std::ptr::null_mut;
use std::sync::Mutex;

/// Records the failure of `verb`: errno EOPNOTSUPP, and one debug line per verb.
fn not_supported(verb: &'static str) {
    static REPORTED: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    if crate::registry::debug_enabled()
        && REPORTED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(verb)
    {
        crate::registry::debug(format_args!(
            "{verb} is not supported by Freeflow yet (EOPNOTSUPP)"
        ));
    }
    set_errno(libc::EOPNOTSUPP);
}

/// `"NODE" fn name(args) -> type = failure;` defines the exported function `name`, bound to
/// version node NODE, that reports [`not_supported`] and returns `failure` (nothing for a void
/// function).
macro_rules! unsupported {
    ($($node:literal fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty = $fail:expr)?;)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`: not supported yet.")]
            #[no_mangle]
            pub extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
                $(let _ = $arg;)*
                not_supported(stringify!($name));
                $($fail)?
            }
            symbol_versions! { $node: [$name] }
        )*
    };
}

type Obj = *mut c_void;

unsupported! {
    "IBVERBS_1.0" fn ibv_create_comp_channel(context: Obj) -> Obj = null_mut();
    "IBVERBS_1.0" fn ibv_destroy_comp_channel(channel: Obj) -> c_int = libc::EOPNOTSUPP;

    "IBVERBS_1.1" fn ibv_rereg_mr(mr: Obj, flags: c_int, pd: Obj, addr: Obj, length: usize,
        access: c_int) -> c_int = IBV_REREG_MR_ERR_INPUT;
    "IBVERBS_1.1" fn ibv_create_cq(context: Obj, cqe: c_int, cq_context: Obj, channel: Obj,
        comp_vector: c_int) -> Obj = null_mut();
    "IBVERBS_1.1" fn ibv_resize_cq(cq: Obj, cqe: c_int) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_destroy_cq(cq: Obj) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_get_cq_event(channel: Obj, cq: *mut Obj, cq_context: *mut Obj) -> c_int =
        -1;
    "IBVERBS_1.1" fn ibv_ack_cq_events(cq: Obj, nevents: c_uint);
    "IBVERBS_1.1" fn ibv_create_srq(pd: Obj, srq_init_attr: Obj) -> Obj = null_mut();
    "IBVERBS_1.1" fn ibv_modify_srq(srq: Obj, srq_attr: Obj, srq_attr_mask: c_int) -> c_int =
        libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_query_srq(srq: Obj, srq_attr: Obj) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_destroy_srq(srq: Obj) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_create_qp(pd: Obj, qp_init_attr: Obj) -> Obj = null_mut();
    "IBVERBS_1.1" fn ibv_query_qp(qp: Obj, attr: Obj, attr_mask: c_int, init_attr: Obj) -> c_int =
        libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_modify_qp(qp: Obj, attr: Obj, attr_mask: c_int) -> c_int =
        libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_destroy_qp(qp: Obj) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_create_ah(pd: Obj, attr: Obj) -> Obj = null_mut();
    "IBVERBS_1.1" fn ibv_destroy_ah(ah: Obj) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_init_ah_from_wc(context: Obj, port_num: u8, wc: Obj, grh: Obj,
        ah_attr: Obj) -> c_int = -1;
    "IBVERBS_1.1" fn ibv_create_ah_from_wc(pd: Obj, wc: Obj, grh: Obj, port_num: u8) -> Obj =
        null_mut();
    "IBVERBS_1.1" fn ibv_attach_mcast(qp: Obj, gid: Obj, lid: u16) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_detach_mcast(qp: Obj, gid: Obj, lid: u16) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_resolve_eth_l2_from_gid(context: Obj, attr: Obj, eth_mac: *mut u8,
        vid: *mut u16) -> c_int = libc::EOPNOTSUPP;

    "IBVERBS_1.6" fn ibv_qp_to_qp_ex(qp: Obj) -> Obj = null_mut();

    "IBVERBS_1.10" fn ibv_import_device(cmd_fd: c_int) -> Obj = null_mut();
    "IBVERBS_1.10" fn ibv_import_pd(context: Obj, pd_handle: u32) -> Obj = null_mut();
    "IBVERBS_1.10" fn ibv_unimport_pd(pd: Obj);
    "IBVERBS_1.10" fn ibv_import_mr(pd: Obj, mr_handle: u32) -> Obj = null_mut();
    "IBVERBS_1.10" fn ibv_unimport_mr(mr: Obj);
    "IBVERBS_1.10" fn ibv_query_ece(qp: Obj, ece: Obj) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.10" fn ibv_set_ece(qp: Obj, ece: Obj) -> c_int = libc::EOPNOTSUPP;

    "IBVERBS_1.12" fn ibv_reg_dmabuf_mr(pd: Obj, offset: u64, length: usize, iova: u64, fd: c_int,
        access: c_int) -> Obj = null_mut();

    "IBVERBS_1.13" fn ibv_import_dm(context: Obj, dm_handle: u32) -> Obj = null_mut();
    "IBVERBS_1.13" fn ibv_unimport_dm(dm: Obj);

    // 0: "not guaranteed to be written in order", the answer that promises nothing.
    "IBVERBS_1.14" fn ibv_query_qp_data_in_order(qp: Obj, op: c_int, flags: u32) -> c_int = 0;
}

// The fast-path operations every context carries in `ibv_context.ops`. Programs reach them
// through inline functions with a CQ, QP or SRQ, none of which can exist yet; they are set
// anyway so that no call through a context of this library lands on NULL.

/// `ops.poll_cq`: negative on failure.
pub unsafe extern "C" fn poll_cq(cq: Obj, num_entries: c_int, wc: Obj) -> c_int {
    let _ = (cq, num_entries, wc);
    not_supported("ibv_poll_cq");
    -1
}

/// `ops.req_notify_cq`: an errno value on failure.
pub unsafe extern "C" fn req_notify_cq(cq: Obj, solicited_only: c_int) -> c_int {
    let _ = (cq, solicited_only);
    not_supported("ibv_req_notify_cq");
    libc::EOPNOTSUPP
}

/// `*bad_wr = wr`: the first work request is the one that failed.
///
/// # Safety
/// `bad_wr` is NULL or writable.
unsafe fn all_failed(wr: Obj, bad_wr: *mut Obj) {
    if !bad_wr.is_null() {
        // SAFETY: the caller passes its own `struct ibv_*_wr **`.
        unsafe { *bad_wr = wr };
    }
}

/// `ops.post_send`: an errno value on failure.
pub unsafe extern "C" fn post_send(qp: Obj, wr: Obj, bad_wr: *mut Obj) -> c_int {
    let _ = qp;
    not_supported("ibv_post_send");
    // SAFETY: forwarded caller guarantee.
    unsafe { all_failed(wr, bad_wr) };
    libc::EOPNOTSUPP
}

/// `ops.post_recv`.
pub unsafe extern "C" fn post_recv(qp: Obj, wr: Obj, bad_wr: *mut Obj) -> c_int {
    let _ = qp;
    not_supported("ibv_post_recv");
    // SAFETY: forwarded caller guarantee.
    unsafe { all_failed(wr, bad_wr) };
    libc::EOPNOTSUPP
}

/// `ops.post_srq_recv`.
pub unsafe extern "C" fn post_srq_recv(srq: Obj, wr: Obj, bad_wr: *mut Obj) -> c_int {
    let _ = srq;
    not_supported("ibv_post_srq_recv");
    // SAFETY: forwarded caller guarantee.
    unsafe { all_failed(wr, bad_wr) };
    libc::EOPNOTSUPP
}
