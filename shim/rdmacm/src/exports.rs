//! The functions of rdma-core 44's librdmacm, as C functions with its names and symbol
//! versions. Each checks its arguments, runs under [`status`] or [`object`] (errno and NULL or
//! -1 as librdmacm reports failures, a debug line with FREEFLOW_DEBUG=1, a panic turned into
//! EIO) and leaves the work to [`crate::cm`].
#![allow(unsafe_code)]

use crate::abi::*;
use crate::cm::{self, Fail, Id};
use crate::ibv;
use freeflow_os::errno::set_errno;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::null_mut;

symbol_versions! {
    "RDMACM_1.0": [
        rdma_accept, rdma_ack_cm_event, rdma_bind_addr, rdma_connect, rdma_create_ep,
        rdma_create_event_channel, rdma_create_id, rdma_create_qp, rdma_create_qp_ex,
        rdma_create_srq, rdma_create_srq_ex, rdma_destroy_ep, rdma_destroy_event_channel,
        rdma_destroy_id, rdma_destroy_qp, rdma_destroy_srq, rdma_disconnect, rdma_event_str,
        rdma_free_devices, rdma_freeaddrinfo, rdma_get_cm_event, rdma_get_devices,
        rdma_get_dst_port, rdma_get_request, rdma_get_src_port, rdma_getaddrinfo,
        rdma_join_multicast, rdma_leave_multicast, rdma_listen, rdma_migrate_id, rdma_notify,
        rdma_reject, rdma_resolve_addr, rdma_resolve_route, rdma_set_option,
    ],
    "RDMACM_1.1": [rdma_join_multicast_ex],
    "RDMACM_1.2": [rdma_establish, rdma_init_qp_attr],
    "RDMACM_1.3": [rdma_get_remote_ece, rdma_reject_ece, rdma_set_local_ece],
}

/// 0, or -1 with errno (librdmacm's convention); a panic (a bug here) is EIO.
fn status(name: &str, f: impl FnOnce() -> Result<(), Fail>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            crate::debug(format_args!(
                "{name}: {} ({})",
                e.why,
                std::io::Error::from_raw_os_error(e.errno)
            ));
            set_errno(e.errno);
            -1
        }
        Err(_) => {
            set_errno(libc::EIO);
            -1
        }
    }
}

/// An object, or NULL with errno.
fn object<T>(name: &str, f: impl FnOnce() -> Result<*mut T, Fail>) -> *mut T {
    let mut out = null_mut();
    let rc = status(name, || {
        out = f()?;
        Ok(())
    });
    if rc == 0 {
        out
    } else {
        null_mut()
    }
}

/// Refuses what Freeflow does not offer: errno `errno`, and why with FREEFLOW_DEBUG=1.
fn refuse(name: &str, errno: i32, why: &str) -> c_int {
    status(name, || Err(Fail::new(errno, why)))
}

// ---- event channels and events ----

#[no_mangle]
pub extern "C" fn rdma_create_event_channel() -> *mut RdmaEventChannel {
    object("rdma_create_event_channel", || {
        let ch = cm::create_channel(true)?;
        Ok(std::sync::Arc::as_ptr(&ch) as *mut RdmaEventChannel)
    })
}

#[no_mangle]
pub extern "C" fn rdma_destroy_event_channel(channel: *mut RdmaEventChannel) {
    status("rdma_destroy_event_channel", || {
        cm::destroy_channel(channel)
    });
}

#[no_mangle]
pub extern "C" fn rdma_get_cm_event(
    channel: *mut RdmaEventChannel,
    event: *mut *mut RdmaCmEvent,
) -> c_int {
    status("rdma_get_cm_event", || get_cm_event(channel, event))
}

fn get_cm_event(channel: *mut RdmaEventChannel, out: *mut *mut RdmaCmEvent) -> Result<(), Fail> {
    if out.is_null() {
        return Err(Fail::new(libc::EINVAL, "event is NULL"));
    }
    let ch = cm::channel(channel)?;
    let event = cm::get_event(&ch, None)?;
    // SAFETY: `out` is the program's non-NULL pointer to an event pointer.
    unsafe { *out = Box::into_raw(event).cast() };
    Ok(())
}

#[no_mangle]
pub extern "C" fn rdma_ack_cm_event(event: *mut RdmaCmEvent) -> c_int {
    status("rdma_ack_cm_event", || {
        if event.is_null() {
            return Err(Fail::new(libc::EINVAL, "event is NULL"));
        }
        cm::ack(event);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn rdma_event_str(event: c_int) -> *const c_char {
    let name = cm::event_name(u16::try_from(event).unwrap_or(u16::MAX));
    // Each name is a static string; its C copy is made once.
    static NAMES: std::sync::OnceLock<Vec<std::ffi::CString>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        (0..=16u16)
            .map(|k| std::ffi::CString::new(cm::event_name(k)).expect("no NUL"))
            .collect()
    });
    names
        .iter()
        .find(|c| c.to_bytes() == name.as_bytes())
        .map_or(c"UNKNOWN EVENT".as_ptr(), |c| c.as_ptr())
}

// ---- ids ----

#[no_mangle]
pub extern "C" fn rdma_create_id(
    channel: *mut RdmaEventChannel,
    id: *mut *mut RdmaCmId,
    context: *mut c_void,
    ps: c_int,
) -> c_int {
    status("rdma_create_id", || create_id(channel, id, context, ps))
}

fn create_id(
    channel: *mut RdmaEventChannel,
    out: *mut *mut RdmaCmId,
    context: *mut c_void,
    ps: c_int,
) -> Result<(), Fail> {
    if out.is_null() {
        return Err(Fail::new(libc::EINVAL, "id is NULL"));
    }
    let ch = match channel.is_null() {
        true => None,
        false => Some(cm::channel(channel)?),
    };
    // As librdmacm: RDMA_PS_UDP ids have UD QPs.
    let qp_type = match cm::is_datagram_ps(ps) {
        true => IBV_QPT_UD,
        false => IBV_QPT_RC,
    };
    let id = Id::create(ch, context, ps, qp_type)?;
    // SAFETY: the program's non-NULL pointer to an id pointer.
    unsafe { *out = id.cast() };
    Ok(())
}

#[no_mangle]
pub extern "C" fn rdma_destroy_id(id: *mut RdmaCmId) -> c_int {
    status("rdma_destroy_id", || {
        cm::id(id)?;
        Id::destroy(id.cast())
    })
}

#[no_mangle]
pub extern "C" fn rdma_bind_addr(id: *mut RdmaCmId, addr: *mut libc::sockaddr) -> c_int {
    status("rdma_bind_addr", || {
        let id = cm::id(id)?;
        let a = cm::read_sockaddr(addr)?
            .ok_or_else(|| Fail::new(libc::EINVAL, "no address to bind"))?;
        id.bind(a)
    })
}

#[no_mangle]
pub extern "C" fn rdma_listen(id: *mut RdmaCmId, backlog: c_int) -> c_int {
    status("rdma_listen", || cm::id(id)?.listen(backlog))
}

#[no_mangle]
pub extern "C" fn rdma_resolve_addr(
    id: *mut RdmaCmId,
    src_addr: *mut libc::sockaddr,
    dst_addr: *mut libc::sockaddr,
    timeout_ms: c_int,
) -> c_int {
    status("rdma_resolve_addr", || {
        let id = cm::id(id)?;
        let src = cm::read_sockaddr(src_addr)?;
        let dst = cm::read_sockaddr(dst_addr)?
            .ok_or_else(|| Fail::new(libc::EINVAL, "no destination address"))?;
        id.resolve_addr(src, dst, u32::try_from(timeout_ms).unwrap_or(0))
    })
}

#[no_mangle]
pub extern "C" fn rdma_resolve_route(id: *mut RdmaCmId, _timeout_ms: c_int) -> c_int {
    status("rdma_resolve_route", || cm::id(id)?.resolve_route())
}

/// The program's connection parameters, if any.
fn param<'a>(p: *mut RdmaConnParam) -> Option<&'a RdmaConnParam> {
    // SAFETY: NULL or the program's live rdma_conn_param.
    unsafe { p.as_ref() }
}

#[no_mangle]
pub extern "C" fn rdma_connect(id: *mut RdmaCmId, conn_param: *mut RdmaConnParam) -> c_int {
    status("rdma_connect", || cm::id(id)?.connect(param(conn_param)))
}

#[no_mangle]
pub extern "C" fn rdma_accept(id: *mut RdmaCmId, conn_param: *mut RdmaConnParam) -> c_int {
    status("rdma_accept", || cm::id(id)?.accept(param(conn_param)))
}

fn bytes(data: *const c_void, len: u8) -> Vec<u8> {
    if data.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: the program passes `len` readable bytes at `data`.
    unsafe { std::slice::from_raw_parts(data.cast::<u8>(), usize::from(len)) }.to_vec()
}

#[no_mangle]
pub extern "C" fn rdma_reject(
    id: *mut RdmaCmId,
    private_data: *const c_void,
    private_data_len: u8,
) -> c_int {
    status("rdma_reject", || {
        cm::id(id)?.reject(bytes(private_data, private_data_len))
    })
}

#[no_mangle]
pub extern "C" fn rdma_reject_ece(
    id: *mut RdmaCmId,
    private_data: *const c_void,
    private_data_len: u8,
) -> c_int {
    rdma_reject(id, private_data, private_data_len)
}

#[no_mangle]
pub extern "C" fn rdma_establish(id: *mut RdmaCmId) -> c_int {
    status("rdma_establish", || cm::id(id)?.establish())
}

#[no_mangle]
pub extern "C" fn rdma_disconnect(id: *mut RdmaCmId) -> c_int {
    status("rdma_disconnect", || cm::id(id)?.disconnect())
}

#[no_mangle]
pub extern "C" fn rdma_init_qp_attr(
    id: *mut RdmaCmId,
    qp_attr: *mut IbvQpAttr,
    qp_attr_mask: *mut c_int,
) -> c_int {
    status("rdma_init_qp_attr", || {
        let id = cm::id(id)?;
        if qp_attr.is_null() || qp_attr_mask.is_null() {
            return Err(Fail::new(
                libc::EINVAL,
                "qp_attr and qp_attr_mask are required",
            ));
        }
        // SAFETY: the program's live ibv_qp_attr (non-NULL).
        let state = unsafe { (*qp_attr).qp_state };
        let (attr, mask) = id.qp_attr(state)?;
        // SAFETY: as above, and its live int.
        unsafe {
            *qp_attr = attr;
            *qp_attr_mask = mask;
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn rdma_get_src_port(id: *mut RdmaCmId) -> u16 {
    cm::id(id).map_or(0, |id| id.src_port().to_be())
}

#[no_mangle]
pub extern "C" fn rdma_get_dst_port(id: *mut RdmaCmId) -> u16 {
    cm::id(id).map_or(0, |id| id.dst_port().to_be())
}

/// `RDMA_OPTION_ID` (level) and its options that change nothing on Freeflow's device: type of
/// service, address reuse, IPv6-only, ACK timeout.
const RDMA_OPTION_ID: c_int = 0;

#[no_mangle]
pub extern "C" fn rdma_set_option(
    id: *mut RdmaCmId,
    level: c_int,
    optname: c_int,
    _optval: *mut c_void,
    _optlen: usize,
) -> c_int {
    status("rdma_set_option", || {
        cm::id(id)?;
        match (level, optname) {
            (RDMA_OPTION_ID, 0..=3) => Ok(()),
            _ => Err(Fail::new(
                libc::ENOSYS,
                format!("option {optname} of level {level} is not supported by Freeflow"),
            )),
        }
    })
}

#[no_mangle]
pub extern "C" fn rdma_notify(id: *mut RdmaCmId, _event: c_int) -> c_int {
    status("rdma_notify", || cm::id(id).map(|_| ()))
}

#[no_mangle]
pub extern "C" fn rdma_migrate_id(_id: *mut RdmaCmId, _channel: *mut RdmaEventChannel) -> c_int {
    refuse(
        "rdma_migrate_id",
        libc::EOPNOTSUPP,
        "moving an id to another channel is not supported by Freeflow yet",
    )
}

#[no_mangle]
pub extern "C" fn rdma_join_multicast(
    _id: *mut RdmaCmId,
    _addr: *mut libc::sockaddr,
    _context: *mut c_void,
) -> c_int {
    refuse(
        "rdma_join_multicast",
        libc::EOPNOTSUPP,
        "multicast is not supported by Freeflow",
    )
}

#[no_mangle]
pub extern "C" fn rdma_join_multicast_ex(
    _id: *mut RdmaCmId,
    _attr: *mut c_void,
    _context: *mut c_void,
) -> c_int {
    refuse(
        "rdma_join_multicast_ex",
        libc::EOPNOTSUPP,
        "multicast is not supported by Freeflow",
    )
}

#[no_mangle]
pub extern "C" fn rdma_leave_multicast(_id: *mut RdmaCmId, _addr: *mut libc::sockaddr) -> c_int {
    refuse(
        "rdma_leave_multicast",
        libc::EOPNOTSUPP,
        "multicast is not supported by Freeflow",
    )
}

#[no_mangle]
pub extern "C" fn rdma_set_local_ece(_id: *mut RdmaCmId, _ece: *mut c_void) -> c_int {
    refuse(
        "rdma_set_local_ece",
        libc::EOPNOTSUPP,
        "ECE is not supported by Freeflow",
    )
}

#[no_mangle]
pub extern "C" fn rdma_get_remote_ece(_id: *mut RdmaCmId, _ece: *mut c_void) -> c_int {
    refuse(
        "rdma_get_remote_ece",
        libc::EOPNOTSUPP,
        "ECE is not supported by Freeflow",
    )
}

// ---- QPs and SRQs ----

#[no_mangle]
pub extern "C" fn rdma_create_qp(
    id: *mut RdmaCmId,
    pd: *mut c_void,
    qp_init_attr: *mut IbvQpInitAttr,
) -> c_int {
    status("rdma_create_qp", || {
        let id = cm::id(id)?;
        // SAFETY: NULL or the program's live ibv_qp_init_attr.
        let attr = unsafe { qp_init_attr.as_mut() }
            .ok_or_else(|| Fail::new(libc::EINVAL, "qp_init_attr is NULL"))?;
        id.create_qp(pd, attr)
    })
}

#[no_mangle]
pub extern "C" fn rdma_create_qp_ex(id: *mut RdmaCmId, qp_init_attr: *mut c_void) -> c_int {
    status("rdma_create_qp_ex", || {
        let id = cm::id(id)?;
        // SAFETY: NULL or the program's live ibv_qp_init_attr_ex, which starts with these fields.
        let attr = unsafe { qp_init_attr.cast::<IbvQpInitAttrExHead>().as_mut() }
            .ok_or_else(|| Fail::new(libc::EINVAL, "qp_init_attr is NULL"))?;
        if attr.comp_mask & !IBV_QP_INIT_ATTR_PD != 0 {
            return Err(Fail::new(
                libc::EOPNOTSUPP,
                "extended QP attributes beyond the PD are not supported by Freeflow",
            ));
        }
        let pd = match attr.comp_mask & IBV_QP_INIT_ATTR_PD {
            0 => null_mut(),
            _ => attr.pd,
        };
        let mut plain = IbvQpInitAttr {
            qp_context: attr.qp_context,
            send_cq: attr.send_cq,
            recv_cq: attr.recv_cq,
            srq: attr.srq,
            cap: attr.cap,
            qp_type: attr.qp_type,
            sq_sig_all: attr.sq_sig_all,
        };
        id.create_qp(pd, &mut plain)?;
        // As rdma-core's, the caller's attributes say which CQs the QP got and its capacities.
        attr.send_cq = plain.send_cq;
        attr.recv_cq = plain.recv_cq;
        attr.cap = plain.cap;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn rdma_destroy_qp(id: *mut RdmaCmId) {
    status("rdma_destroy_qp", || {
        cm::id(id)?.destroy_qp();
        Ok(())
    });
}

#[no_mangle]
pub extern "C" fn rdma_create_srq(id: *mut RdmaCmId, pd: *mut c_void, attr: *mut c_void) -> c_int {
    status("rdma_create_srq", || {
        let id = cm::id(id)?;
        let v = ibv::verbs().map_err(|m| Fail::new(libc::ENOSYS, m.0))?;
        let pd = if pd.is_null() { id.c.pd } else { pd };
        if pd.is_null() || attr.is_null() {
            return Err(Fail::new(libc::EINVAL, "no PD (or attributes) for the SRQ"));
        }
        // SAFETY: a live PD and the program's ibv_srq_init_attr.
        let srq = unsafe { (v.create_srq)(pd, attr) };
        if srq.is_null() {
            return Err(Fail::new(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
                "ibv_create_srq failed",
            ));
        }
        id.c.srq = srq;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn rdma_create_srq_ex(_id: *mut RdmaCmId, _attr: *mut c_void) -> c_int {
    refuse(
        "rdma_create_srq_ex",
        libc::EOPNOTSUPP,
        "extended SRQs are not supported by Freeflow",
    )
}

#[no_mangle]
pub extern "C" fn rdma_destroy_srq(id: *mut RdmaCmId) {
    status("rdma_destroy_srq", || {
        let id = cm::id(id)?;
        if let (Ok(v), false) = (ibv::verbs(), id.c.srq.is_null()) {
            // SAFETY: the id's live SRQ.
            unsafe { (v.destroy_srq)(id.c.srq) };
            id.c.srq = null_mut();
        }
        Ok(())
    });
}

// ---- endpoints (synchronous ids) ----

#[no_mangle]
pub extern "C" fn rdma_create_ep(
    id: *mut *mut RdmaCmId,
    res: *mut RdmaAddrinfo,
    pd: *mut c_void,
    qp_init_attr: *mut IbvQpInitAttr,
) -> c_int {
    status("rdma_create_ep", || create_ep(id, res, pd, qp_init_attr))
}

fn create_ep(
    out: *mut *mut RdmaCmId,
    res: *mut RdmaAddrinfo,
    pd: *mut c_void,
    qp_init_attr: *mut IbvQpInitAttr,
) -> Result<(), Fail> {
    if out.is_null() {
        return Err(Fail::new(libc::EINVAL, "id is NULL"));
    }
    // SAFETY: NULL or the program's rdma_addrinfo (from rdma_getaddrinfo).
    let res = unsafe { res.as_ref() }.ok_or_else(|| Fail::new(libc::EINVAL, "res is NULL"))?;
    let ps = match res.ai_port_space {
        0 => freeflow_proto::cm::port_space::TCP.into(),
        ps => ps,
    };
    let qp_type = match res.ai_qp_type {
        0 if cm::is_datagram_ps(ps) => IBV_QPT_UD,
        0 => IBV_QPT_RC,
        t => t,
    };
    let p = Id::create(None, null_mut(), ps, qp_type)?;
    // SAFETY: just made, live until destroyed below or by the program.
    let id = unsafe { &mut *p };
    let setup = (|| {
        if res.ai_flags & RAI_PASSIVE != 0 {
            let src = cm::read_sockaddr(res.ai_src_addr)?
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
            id.bind(src)?;
            // SAFETY: NULL or the program's attributes, copied for each request.
            if let Some(attr) = unsafe { qp_init_attr.as_mut() } {
                // The endpoint's QP type is the address's (as librdmacm sets it).
                attr.qp_type = qp_type;
                id.set_ep_qp(*attr, pd);
            }
            return Ok(());
        }
        let src = cm::read_sockaddr(res.ai_src_addr)?;
        let dst = cm::read_sockaddr(res.ai_dst_addr)?
            .ok_or_else(|| Fail::new(libc::EINVAL, "no destination address"))?;
        id.resolve_addr(src, dst, cm::DEFAULT_RESOLVE_TIMEOUT_MS)?;
        id.resolve_route()?;
        // SAFETY: NULL or the program's live attributes.
        if let Some(attr) = unsafe { qp_init_attr.as_mut() } {
            attr.qp_type = qp_type;
            id.create_qp(pd, attr)?;
        }
        Ok(())
    })();
    if let Err(e) = setup {
        let _ = Id::destroy(p);
        return Err(e);
    }
    // SAFETY: the program's non-NULL pointer to an id pointer.
    unsafe { *out = p.cast() };
    Ok(())
}

#[no_mangle]
pub extern "C" fn rdma_destroy_ep(id: *mut RdmaCmId) {
    status("rdma_destroy_ep", || {
        cm::id(id)?.destroy_qp();
        Id::destroy(id.cast())
    });
}

#[no_mangle]
pub extern "C" fn rdma_get_request(listen: *mut RdmaCmId, id: *mut *mut RdmaCmId) -> c_int {
    status("rdma_get_request", || get_request(listen, id))
}

fn get_request(listen: *mut RdmaCmId, out: *mut *mut RdmaCmId) -> Result<(), Fail> {
    let listen = cm::id(listen)?;
    if out.is_null() || !listen.is_sync() {
        return Err(Fail::new(
            libc::EINVAL,
            "rdma_get_request needs a listener made without a channel",
        ));
    }
    let event = cm::wait_for(
        listen.channel(),
        listen.router_id(),
        Some(freeflow_proto::cm::event::CONNECT_REQUEST),
    )?;
    let child_ptr = event.c.id;
    let child = cm::id(child_ptr)?;
    if let Some((mut attr, pd)) = listen.ep_qp() {
        if let Err(e) = child.create_qp(pd, &mut attr) {
            let _ = child.reject(Vec::new());
            let _ = Id::destroy(child_ptr.cast());
            return Err(e);
        }
    }
    child.c.event = Box::into_raw(event).cast();
    // SAFETY: the program's non-NULL pointer to an id pointer.
    unsafe { *out = child_ptr };
    Ok(())
}

// ---- devices and addresses ----

#[no_mangle]
pub extern "C" fn rdma_get_devices(num_devices: *mut c_int) -> *mut *mut c_void {
    let dev = ibv::device();
    if let Err(why) = &dev {
        crate::debug(format_args!("rdma_get_devices: {why}"));
    }
    let n = usize::from(dev.is_ok());
    // SAFETY: calloc of n+1 pointers, freed by rdma_free_devices.
    let list =
        unsafe { libc::calloc(n + 1, std::mem::size_of::<*mut c_void>()) }.cast::<*mut c_void>();
    if list.is_null() {
        set_errno(libc::ENOMEM);
        return null_mut();
    }
    if let Ok(d) = dev {
        // SAFETY: the list has room for two pointers.
        unsafe { *list = d.context };
    }
    if !num_devices.is_null() {
        // SAFETY: the program's int.
        unsafe { *num_devices = n as c_int };
    }
    list
}

#[no_mangle]
pub extern "C" fn rdma_free_devices(list: *mut *mut c_void) {
    // SAFETY: a list from rdma_get_devices (calloc), or NULL.
    unsafe { libc::free(list.cast()) };
}

#[no_mangle]
pub extern "C" fn rdma_getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const RdmaAddrinfo,
    res: *mut *mut RdmaAddrinfo,
) -> c_int {
    status("rdma_getaddrinfo", || {
        getaddrinfo(node, service, hints, res)
    })
}

fn c_str<'a>(p: *const c_char) -> Option<&'a CStr> {
    // SAFETY: NULL or the program's NUL-terminated string.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

fn getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const RdmaAddrinfo,
    res: *mut *mut RdmaAddrinfo,
) -> Result<(), Fail> {
    if res.is_null() || (node.is_null() && service.is_null()) {
        return Err(Fail::new(libc::EINVAL, "needs res and a node or a service"));
    }
    // SAFETY: NULL or the program's hints.
    let hints = unsafe { hints.as_ref() };
    let flags = hints.map_or(0, |h| h.ai_flags);
    let passive = flags & RAI_PASSIVE != 0;
    let port = match c_str(service) {
        None => 0,
        Some(s) => s
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| Fail::new(libc::EINVAL, "the service must be a port number"))?,
    };
    let ip = match c_str(node) {
        None => Ipv4Addr::UNSPECIFIED,
        Some(n) => resolve_host(n, flags & RAI_NUMERICHOST != 0)?,
    };
    let addr = SocketAddrV4::new(ip, port);
    // SAFETY: calloc'ed structures, freed by rdma_freeaddrinfo.
    let ai = unsafe { libc::calloc(1, std::mem::size_of::<RdmaAddrinfo>()) }.cast::<RdmaAddrinfo>();
    let sa = new_sockaddr(addr);
    if ai.is_null() || sa.is_null() {
        // SAFETY: NULL or calloc'ed above.
        unsafe {
            libc::free(ai.cast());
            libc::free(sa.cast());
        }
        return Err(Fail::new(libc::ENOMEM, "out of memory"));
    }
    // SAFETY: `ai` is a zeroed RdmaAddrinfo of ours.
    let a = unsafe { &mut *ai };
    a.ai_family = libc::AF_INET;
    a.ai_port_space = hints.map_or(0, |h| h.ai_port_space);
    if a.ai_port_space == 0 {
        a.ai_port_space = freeflow_proto::cm::port_space::TCP.into();
    }
    a.ai_qp_type = hints.map_or(0, |h| h.ai_qp_type);
    if a.ai_qp_type == 0 {
        a.ai_qp_type = match cm::is_datagram_ps(a.ai_port_space) {
            true => IBV_QPT_UD,
            false => IBV_QPT_RC,
        };
    }
    a.ai_flags = flags;
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    if passive {
        a.ai_src_addr = sa;
        a.ai_src_len = len;
    } else {
        a.ai_dst_addr = sa;
        a.ai_dst_len = len;
        if let Some(src) = hints.and_then(|h| cm::read_sockaddr(h.ai_src_addr).ok().flatten()) {
            a.ai_src_addr = new_sockaddr(src);
            if !a.ai_src_addr.is_null() {
                a.ai_src_len = len;
            }
        }
    }
    // SAFETY: the program's non-NULL result pointer.
    unsafe { *res = ai };
    Ok(())
}

/// A calloc'ed sockaddr_in of `a` (NULL if out of memory).
fn new_sockaddr(a: SocketAddrV4) -> *mut libc::sockaddr {
    // SAFETY: calloc of a sockaddr_in, freed by rdma_freeaddrinfo.
    let sa = unsafe { libc::calloc(1, std::mem::size_of::<libc::sockaddr_in>()) }
        .cast::<libc::sockaddr_in>();
    if !sa.is_null() {
        // SAFETY: a fresh sockaddr_in.
        unsafe {
            (*sa).sin_family = libc::AF_INET as libc::sa_family_t;
            (*sa).sin_port = a.port().to_be();
            (*sa).sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
        }
    }
    sa.cast()
}

/// An IPv4 address for `node`: numeric, or looked up with the system's resolver.
fn resolve_host(node: &CStr, numeric_only: bool) -> Result<Ipv4Addr, Fail> {
    if let Some(ip) = node.to_str().ok().and_then(|s| s.parse::<Ipv4Addr>().ok()) {
        return Ok(ip);
    }
    if numeric_only {
        return Err(Fail::new(libc::EINVAL, "not a numeric IPv4 address"));
    }
    // SAFETY: zeroed addrinfo hints are valid; we set the family.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_INET;
    let mut out: *mut libc::addrinfo = null_mut();
    // SAFETY: a valid C string, hints and result pointer.
    let rc = unsafe { libc::getaddrinfo(node.as_ptr(), std::ptr::null(), &hints, &mut out) };
    if rc != 0 || out.is_null() {
        return Err(Fail::new(
            libc::EADDRNOTAVAIL,
            format!("cannot resolve {}", node.to_string_lossy()),
        ));
    }
    // SAFETY: getaddrinfo's AF_INET result: a sockaddr_in.
    let ip = unsafe { cm::read_sockaddr((*out).ai_addr) };
    // SAFETY: the list getaddrinfo returned.
    unsafe { libc::freeaddrinfo(out) };
    ip?.map(|a| *a.ip())
        .ok_or_else(|| Fail::new(libc::EADDRNOTAVAIL, "no IPv4 address"))
}

#[no_mangle]
pub extern "C" fn rdma_freeaddrinfo(res: *mut RdmaAddrinfo) {
    let mut next = res;
    while !next.is_null() {
        // SAFETY: a list from rdma_getaddrinfo: calloc'ed nodes and addresses.
        unsafe {
            let ai = next;
            next = (*ai).ai_next;
            libc::free((*ai).ai_src_addr.cast());
            libc::free((*ai).ai_dst_addr.cast());
            libc::free((*ai).ai_src_canonname.cast());
            libc::free((*ai).ai_dst_canonname.cast());
            libc::free((*ai).ai_route);
            libc::free((*ai).ai_connect);
            libc::free(ai.cast());
        }
    }
}
