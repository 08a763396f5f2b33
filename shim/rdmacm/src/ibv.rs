//! The verbs this library calls, taken from the `libibverbs.so.1` the process loads (Freeflow's,
//! from `DIR/verbs` on the library path) with `dlvsym`, at the symbol versions rdma-core's
//! librdmacm imports. Looking them up at run time keeps this library's link free of a
//! libibverbs to link against; the loader hands back the copy the program already uses.
#![allow(unsafe_code)]

use crate::abi::{IbvQpAttr, IbvQpInitAttr, Ptr};
use std::ffi::{c_int, CStr};
use std::sync::OnceLock;

/// The verbs, resolved once.
pub struct Verbs {
    pub get_device_list: unsafe extern "C" fn(*mut c_int) -> *mut Ptr,
    pub free_device_list: unsafe extern "C" fn(*mut Ptr),
    pub open_device: unsafe extern "C" fn(Ptr) -> Ptr,
    pub alloc_pd: unsafe extern "C" fn(Ptr) -> Ptr,
    pub create_comp_channel: unsafe extern "C" fn(Ptr) -> Ptr,
    pub destroy_comp_channel: unsafe extern "C" fn(Ptr) -> c_int,
    pub create_cq: unsafe extern "C" fn(Ptr, c_int, Ptr, Ptr, c_int) -> Ptr,
    pub destroy_cq: unsafe extern "C" fn(Ptr) -> c_int,
    pub create_qp: unsafe extern "C" fn(Ptr, *mut IbvQpInitAttr) -> Ptr,
    pub destroy_qp: unsafe extern "C" fn(Ptr) -> c_int,
    pub modify_qp: unsafe extern "C" fn(Ptr, *mut IbvQpAttr, c_int) -> c_int,
    pub create_srq: unsafe extern "C" fn(Ptr, Ptr) -> Ptr,
    pub destroy_srq: unsafe extern "C" fn(Ptr) -> c_int,
    pub reg_mr: unsafe extern "C" fn(Ptr, *mut libc::c_void, usize, c_int) -> Ptr,
    pub dereg_mr: unsafe extern "C" fn(Ptr) -> c_int,
    pub get_cq_event: unsafe extern "C" fn(Ptr, *mut Ptr, *mut Ptr) -> c_int,
    pub ack_cq_events: unsafe extern "C" fn(Ptr, u32),
}

/// Why the verbs are not there.
#[derive(Debug, Clone)]
pub struct Missing(pub String);

static VERBS: OnceLock<Result<Verbs, Missing>> = OnceLock::new();

/// The verbs, or why they cannot be had (no libibverbs.so.1 on the library path, or one that
/// lacks a verb).
pub fn verbs() -> Result<&'static Verbs, Missing> {
    VERBS.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Verbs, Missing> {
    let name = c"libibverbs.so.1";
    // SAFETY: dlopen with a valid C string; a library already loaded is returned as is.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(Missing(format!(
            "cannot load libibverbs.so.1: {}",
            dl_error()
        )));
    }
    /// One verb at its version, as a function pointer of the field's type.
    macro_rules! sym {
        ($name:literal, $version:literal) => {{
            // SAFETY: `handle` is a live handle, both names are valid C strings.
            let p = unsafe { libc::dlvsym(handle, $name.as_ptr(), $version.as_ptr()) };
            if p.is_null() {
                return Err(Missing(format!(
                    "libibverbs.so.1 lacks {}@{}",
                    $name.to_string_lossy(),
                    $version.to_string_lossy()
                )));
            }
            // SAFETY: the symbol is rdma-core's verb of that name and version, whose C
            // signature the field's type spells out.
            unsafe { function(p) }
        }};
    }
    Ok(Verbs {
        get_device_list: sym!(c"ibv_get_device_list", c"IBVERBS_1.1"),
        free_device_list: sym!(c"ibv_free_device_list", c"IBVERBS_1.1"),
        open_device: sym!(c"ibv_open_device", c"IBVERBS_1.1"),
        alloc_pd: sym!(c"ibv_alloc_pd", c"IBVERBS_1.1"),
        create_comp_channel: sym!(c"ibv_create_comp_channel", c"IBVERBS_1.0"),
        destroy_comp_channel: sym!(c"ibv_destroy_comp_channel", c"IBVERBS_1.0"),
        create_cq: sym!(c"ibv_create_cq", c"IBVERBS_1.1"),
        destroy_cq: sym!(c"ibv_destroy_cq", c"IBVERBS_1.1"),
        create_qp: sym!(c"ibv_create_qp", c"IBVERBS_1.1"),
        destroy_qp: sym!(c"ibv_destroy_qp", c"IBVERBS_1.1"),
        modify_qp: sym!(c"ibv_modify_qp", c"IBVERBS_1.1"),
        create_srq: sym!(c"ibv_create_srq", c"IBVERBS_1.1"),
        destroy_srq: sym!(c"ibv_destroy_srq", c"IBVERBS_1.1"),
        reg_mr: sym!(c"ibv_reg_mr", c"IBVERBS_1.1"),
        dereg_mr: sym!(c"ibv_dereg_mr", c"IBVERBS_1.1"),
        get_cq_event: sym!(c"ibv_get_cq_event", c"IBVERBS_1.1"),
        ack_cq_events: sym!(c"ibv_ack_cq_events", c"IBVERBS_1.1"),
    })
}

/// The function at `p`, as the function pointer type `F`.
///
/// # Safety
/// `p` is a function whose C signature `F` spells out.
unsafe fn function<F: Copy>(p: *mut libc::c_void) -> F {
    assert_eq!(
        std::mem::size_of::<F>(),
        std::mem::size_of::<*mut libc::c_void>()
    );
    // SAFETY: F is a function pointer type of a pointer's size (checked), and the caller
    // guarantees `p` is such a function.
    unsafe { std::mem::transmute_copy::<*mut libc::c_void, F>(&p) }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a C string valid until the next dl call on this thread.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "unknown error".into();
    }
    // SAFETY: non-NULL, NUL-terminated (above).
    unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
}

/// The process's device context and protection domain for rdma_cm ids: Freeflow's one device
/// (`ffv0`), opened once, with one PD that ids without a PD of the program's use (as
/// librdmacm gives each device one).
#[derive(Clone, Copy)]
pub struct Device {
    pub context: Ptr,
    pub pd: Ptr,
}

// SAFETY: the context and PD are libibverbs objects, usable from any thread.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

static DEVICE: OnceLock<Result<Device, String>> = OnceLock::new();

/// The device, opened on first use; the reason (for FREEFLOW_DEBUG) when there is none.
pub fn device() -> Result<Device, String> {
    DEVICE.get_or_init(open).clone()
}

fn open() -> Result<Device, String> {
    let v = verbs().map_err(|m| m.0)?;
    let mut n: c_int = 0;
    // SAFETY: n is a live int.
    let list = unsafe { (v.get_device_list)(&mut n) };
    if list.is_null() || n <= 0 {
        if !list.is_null() {
            // SAFETY: the list came from get_device_list.
            unsafe { (v.free_device_list)(list) };
        }
        return Err("no RDMA device (is this a registered container with the router up?)".into());
    }
    // SAFETY: the list holds n devices.
    let first = unsafe { *list };
    // SAFETY: a device of the list, before the list is freed.
    let context = unsafe { (v.open_device)(first) };
    // SAFETY: the list came from get_device_list; the opened context outlives it.
    unsafe { (v.free_device_list)(list) };
    if context.is_null() {
        return Err(format!(
            "ibv_open_device failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a live context.
    let pd = unsafe { (v.alloc_pd)(context) };
    if pd.is_null() {
        return Err(format!(
            "ibv_alloc_pd failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(Device { context, pd })
}
