//! Verbs that exist (so unmodified programs load and link) but are not implemented yet. Each
//! fails the way its man page describes a failure: NULL or -1 with errno EOPNOTSUPP, or the
//! errno value EOPNOTSUPP itself. None pretends to succeed. Under `FREEFLOW_DEBUG` the first
//! call of each says so on stderr.
//!
//! Implemented verbs live elsewhere (`pd_mr`, `cq`, `qp`, `srq`, `ah`). `ibv_rereg_mr` stays here for
//! now: it answers IBV_REREG_MR_ERR_INPUT, the old region unchanged. Not yet: multicast.
#![allow(unsafe_code)]

use crate::abi::IBV_REREG_MR_ERR_INPUT;
use crate::ffi::set_errno;
use std::collections::BTreeSet;
use std::ffi::{c_int, c_void};
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
    "IBVERBS_1.1" fn ibv_rereg_mr(mr: Obj, flags: c_int, pd: Obj, addr: Obj, length: usize,
        access: c_int) -> c_int = IBV_REREG_MR_ERR_INPUT;
    "IBVERBS_1.1" fn ibv_attach_mcast(qp: Obj, gid: Obj, lid: u16) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_detach_mcast(qp: Obj, gid: Obj, lid: u16) -> c_int = libc::EOPNOTSUPP;
    "IBVERBS_1.1" fn ibv_resolve_eth_l2_from_gid(context: Obj, attr: Obj, eth_mac: *mut u8,
        vid: *mut u16) -> c_int = libc::EOPNOTSUPP;

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
