//! Address handles, the destinations of UD sends: `ibv_create_ah` and `ibv_destroy_ah` (the
//! router resolves the address once, at creation, and refuses one outside the caller's tenant
//! with ENETUNREACH), and `ibv_init_ah_from_wc` / `ibv_create_ah_from_wc`, which answer a UD
//! receive: the address of its sender, read from the GRH area in front of the message (the
//! IPv4 header a RoCE v2 device puts there for IPv4-mapped GIDs, or an IPv6 GRH), as rdma-core
//! reads it.
#![allow(unsafe_code)]

use crate::abi::{IbvAh, IbvAhAttr, IbvContext, IbvGrh, IbvPd, IbvWc};
use crate::error::{returns_errno, returns_minus_one, returns_object, VerbsError};
use crate::ffi::copy_out;
use crate::registry::object::{self, HandedOut};
use crate::registry::{self, lock, QueueEntry, QueueKind};
use crate::route_wait;
use freeflow_proto::verbs::ah::CreateAh;
use freeflow_proto::verbs::grh;
use freeflow_proto::verbs::work::{wc_flags, GRH_LEN};
use freeflow_proto::verbs::{op, Body, ObjectHandle};
use std::ffi::c_int;

symbol_versions! {
    "IBVERBS_1.1": [ibv_create_ah, ibv_destroy_ah, ibv_init_ah_from_wc, ibv_create_ah_from_wc],
}

/// What the library keeps for an address handle: what a UD post needs, without a lock.
pub(crate) struct AhShared {
    /// The router's handle.
    pub(crate) handle: u32,
    /// Its context's key (a post on a QP of another context refuses it).
    pub(crate) context: usize,
}

impl HandedOut for IbvAh {
    type State = AhShared;
    const MAGIC: u64 = u64::from_le_bytes(*b"FFAHv001");
    const NAME: &'static str = "AH";
}

fn create_ah(pd: *mut IbvPd, attr: *const IbvAhAttr) -> Result<*mut IbvAh, VerbsError> {
    let pd_entry = registry::pd(pd as usize)?;
    if attr.is_null() {
        return Err(VerbsError::InvalidArgument("ah_attr is NULL"));
    }
    // SAFETY: the caller's attributes (checked for NULL).
    let a = unsafe { *attr };
    let body = CreateAh {
        pd: pd_entry.handle,
        dgid: a.grh.dgid.raw,
        flow_label: a.grh.flow_label,
        sgid_index: a.grh.sgid_index,
        hop_limit: a.grh.hop_limit,
        traffic_class: a.grh.traffic_class,
        is_global: a.is_global,
        dlid: a.dlid,
        sl: a.sl,
        src_path_bits: a.src_path_bits,
        static_rate: a.static_rate,
        port_num: a.port_num,
    }
    .to_vec();
    let state = registry::context(pd_entry.context)?;
    let reply = route_wait::waiting_for_route(&a.grh.dgid.raw, "ibv_create_ah", || {
        lock(&state.channel).call(op::CREATE_AH, &body)
    })?;
    let handle = reply.decode::<ObjectHandle>()?.handle;
    let ibv = IbvAh {
        context: pd_entry.context as *mut IbvContext,
        pd,
        handle,
    };
    let obj = object::leak(
        ibv,
        AhShared {
            handle,
            context: pd_entry.context,
        },
    );
    let entry = QueueEntry {
        context: pd_entry.context,
        handle,
    };
    registry::add_queue(obj as usize, QueueKind::Ah, entry);
    registry::debug(format_args!("created AH {handle}"));
    Ok(obj)
}

/// `ibv_create_ah`: an address handle, or NULL with errno (EINVAL without the GRH a RoCE
/// address needs, ENETUNREACH for an address that is no container of the caller's tenant).
#[no_mangle]
pub extern "C" fn ibv_create_ah(pd: *mut IbvPd, attr: *mut IbvAhAttr) -> *mut IbvAh {
    returns_object("ibv_create_ah", || create_ah(pd, attr))
}

/// `ibv_destroy_ah`: 0 or an errno value.
#[no_mangle]
pub extern "C" fn ibv_destroy_ah(ah: *mut IbvAh) -> c_int {
    returns_errno("ibv_destroy_ah", || {
        let entry = registry::queue(ah as usize, QueueKind::Ah)?;
        // SAFETY: the registry holds `ah`: made by `create_ah`; the program no longer uses it.
        unsafe { object::destroy(ah, entry, op::DESTROY_AH) }
    })
}

/// The address of the sender of the UD receive `wc` (with its GRH area `grh`), as
/// `ibv_init_ah_from_wc` fills it: the GRH's source as destination GID, this device's GID as
/// source (index 0; a packet to another GID is refused), hop limit 0xff.
fn ah_from_wc(
    context: *mut IbvContext,
    port_num: u8,
    wc: *const IbvWc,
    grh_area: *const IbvGrh,
) -> Result<IbvAhAttr, VerbsError> {
    let state = registry::context(context as usize)?;
    if port_num != crate::device::PORT {
        return Err(VerbsError::NoSuchPort(u32::from(port_num)));
    }
    if wc.is_null() || grh_area.is_null() {
        return Err(VerbsError::InvalidArgument("wc or grh is NULL"));
    }
    // SAFETY: the caller's completion and its GRH area (checked for NULL), read as plain data.
    let (wc, bytes) = unsafe { (*wc, *grh_area.cast::<[u8; GRH_LEN]>()) };
    // RoCE: every packet has a GRH.
    if wc.wc_flags & wc_flags::GRH == 0 {
        return Err(VerbsError::InvalidArgument(
            "a RoCE completion without IBV_WC_GRH",
        ));
    }
    let info = grh::parse(&bytes).ok_or(VerbsError::InvalidArgument(
        "the GRH area holds neither an IPv4 header nor an IPv6 GRH",
    ))?;
    if info.dgid != state.device.identity.gid().raw {
        return Err(VerbsError::InvalidArgument(
            "the packet was sent to a GID this port does not have",
        ));
    }
    let mut a = IbvAhAttr {
        dlid: wc.slid,
        sl: wc.sl,
        src_path_bits: wc.dlid_path_bits,
        is_global: 1,
        port_num,
        ..IbvAhAttr::default()
    };
    a.grh.dgid.raw = info.sgid;
    a.grh.sgid_index = 0;
    a.grh.hop_limit = 0xff;
    a.grh.traffic_class = info.traffic_class;
    a.grh.flow_label = info.flow_label;
    Ok(a)
}

/// `ibv_init_ah_from_wc`: 0, or -1 with errno (EINVAL for a completion without a GRH or a GRH
/// area that is neither form).
///
/// # Safety
/// `wc` and `grh` are NULL or readable (a completion and the 40 bytes in front of its
/// message); `ah_attr` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ibv_init_ah_from_wc(
    context: *mut IbvContext,
    port_num: u8,
    wc: *mut IbvWc,
    grh: *mut IbvGrh,
    ah_attr: *mut IbvAhAttr,
) -> c_int {
    returns_minus_one("ibv_init_ah_from_wc", || {
        let a = ah_from_wc(context, port_num, wc, grh)?;
        if ah_attr.is_null() {
            return Err(VerbsError::InvalidArgument("ah_attr is NULL"));
        }
        // SAFETY: the caller's structure (checked for NULL), written whole.
        unsafe { copy_out(ah_attr, &a, std::mem::size_of::<IbvAhAttr>()) };
        Ok(())
    })
}

/// `ibv_create_ah_from_wc`: an address handle to the sender of a UD receive, or NULL with
/// errno.
///
/// # Safety
/// As [`ibv_init_ah_from_wc`].
#[no_mangle]
pub unsafe extern "C" fn ibv_create_ah_from_wc(
    pd: *mut IbvPd,
    wc: *mut IbvWc,
    grh: *mut IbvGrh,
    port_num: u8,
) -> *mut IbvAh {
    returns_object("ibv_create_ah_from_wc", || {
        let pd_entry = registry::pd(pd as usize)?;
        let a = ah_from_wc(pd_entry.context as *mut IbvContext, port_num, wc, grh)?;
        create_ah(pd, &a)
    })
}
