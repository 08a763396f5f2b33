//! The verbs this library implements, as C functions with the names and symbol versions of
//! rdma-core's libibverbs: the device list, open/close, and the device, port, GID and P_Key
//! queries (plus the `verbs_context` ops `query_port` and `query_device_ex` that the inline
//! wrappers in `verbs.h` call). Arguments are checked here; the answers come from
//! [`crate::device`] and [`crate::registry`].
#![allow(unsafe_code)]

use crate::abi::*;
use crate::async_event::{AsyncEvents, GetError, IbvAsyncEvent};
use crate::device::{PKEY_BE, PORT};
use crate::error::{fail, returns_errno, returns_minus_one, returns_object, VerbsError};
use crate::faults::{Gone, Watcher};
use crate::ffi::{copy_out, guard, set_errno};
use crate::registry::{self, ContextState};
use crate::sysfs;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::mem::{offset_of, size_of};
use std::os::fd::OwnedFd;
use std::ptr::null_mut;
use std::sync::{Arc, Mutex};

symbol_versions! {
    "IBVERBS_1.0": [ibv_read_sysfs_file, ibv_get_sysfs_path],
    "IBVERBS_1.1": [
        ibv_get_device_list, ibv_free_device_list, ibv_get_device_name, ibv_get_device_guid,
        ibv_open_device, ibv_close_device, ibv_query_device, ibv_query_port, ibv_query_gid,
        ibv_query_pkey, ibv_get_async_event, ibv_ack_async_event,
    ],
    "IBVERBS_1.5": [ibv_get_pkey_index],
    "IBVERBS_1.9": [ibv_get_device_index],
    "IBVERBS_1.11": [_ibv_query_gid_ex, _ibv_query_gid_table],
    "IBVERBS_PRIVATE_34": [ibv_query_gid_type],
}

/// The state of the context at `context`, or EINVAL for a pointer that is not an open context.
fn state_of(context: *mut IbvContext) -> Result<Arc<ContextState>, VerbsError> {
    registry::context(context as usize)
}

fn check_port(port: u32) -> Result<(), VerbsError> {
    if port == u32::from(PORT) {
        Ok(())
    } else {
        Err(VerbsError::NoSuchPort(port))
    }
}

fn check_index(table: &'static str, index: i64) -> Result<(), VerbsError> {
    if index == 0 {
        Ok(())
    } else {
        Err(VerbsError::NoSuchIndex { table, index })
    }
}

/// The device's only GID: index 0 of port 1.
fn check_gid(port: u32, index: i64) -> Result<(), VerbsError> {
    check_port(port)?;
    check_index("GID", index)
}

/// The GID queries define no flags yet.
fn check_no_flags(flags: u32) -> Result<(), VerbsError> {
    if flags == 0 {
        Ok(())
    } else {
        Err(VerbsError::InvalidArgument("flags must be 0"))
    }
}

/// Answers a query: copies `value` into the caller's `len` bytes at `out`, or refuses (with
/// `refusal`) a NULL `out` or one shorter than `min_len` bytes.
///
/// # Safety
/// `out` is NULL or writable for `len` bytes.
unsafe fn answer<T: Copy>(
    out: *mut T,
    len: usize,
    min_len: usize,
    refusal: &'static str,
    value: T,
) -> Result<(), VerbsError> {
    if out.is_null() || len < min_len {
        return Err(VerbsError::InvalidArgument(refusal));
    }
    // SAFETY: the caller guarantees `len` writable bytes at `out`, which is not NULL.
    unsafe { copy_out(out, &value, len) };
    Ok(())
}

/// `ibv_get_device_list`: one device in a registered container, none elsewhere (then errno
/// says why: EPERM not registered, ENODEV no router, ECONNREFUSED refused). The array is
/// malloc'ed and NULL-terminated.
///
/// # Safety
/// `num_devices` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_device_list(num_devices: *mut c_int) -> *mut *mut IbvDevice {
    guard(null_mut(), || {
        let found = registry::current_device();
        let count = usize::from(found.is_ok());
        // SAFETY: calloc has no preconditions; the result is checked.
        let list = unsafe { libc::calloc(count + 1, size_of::<*mut IbvDevice>()) }
            .cast::<*mut IbvDevice>();
        if list.is_null() {
            set_errno(libc::ENOMEM);
            return null_mut();
        }
        match found {
            // SAFETY: `list` has room for count + 1 = 2 pointers; calloc zeroed the terminator.
            Ok(device) => unsafe { *list = device.as_c() },
            Err(e) => {
                registry::debug(format_args!("no RDMA device: {e}"));
                set_errno(e.errno());
            }
        }
        if !num_devices.is_null() {
            // SAFETY: the caller passes NULL or a writable int.
            unsafe { *num_devices = count as c_int };
        }
        list
    })
}

/// `ibv_free_device_list`. The devices stay valid (open contexts keep using theirs).
///
/// # Safety
/// `list` is NULL or came from `ibv_get_device_list` and was not freed yet.
#[no_mangle]
pub unsafe extern "C" fn ibv_free_device_list(list: *mut *mut IbvDevice) {
    // SAFETY: the list was allocated with calloc (or is NULL, which free accepts).
    unsafe { libc::free(list.cast::<c_void>()) };
}

/// `ibv_get_device_name`.
#[no_mangle]
pub extern "C" fn ibv_get_device_name(device: *mut IbvDevice) -> *const c_char {
    match registry::device_at(device) {
        Some(d) => d.ibv.name.as_ptr(),
        None => {
            fail("ibv_get_device_name", &VerbsError::UnknownDevice);
            std::ptr::null()
        }
    }
}

/// `ibv_get_device_guid`: the node GUID in network byte order (0 for a pointer that is not one
/// of our devices).
#[no_mangle]
pub extern "C" fn ibv_get_device_guid(device: *mut IbvDevice) -> u64 {
    match registry::device_at(device) {
        Some(d) => d.identity.guid_be(),
        None => {
            fail("ibv_get_device_guid", &VerbsError::UnknownDevice);
            0
        }
    }
}

/// `ibv_get_device_index`: -1, "no kernel device index", which is the truth for a virtual
/// device.
#[no_mangle]
pub extern "C" fn ibv_get_device_index(device: *mut IbvDevice) -> c_int {
    if registry::device_at(device).is_none() {
        fail("ibv_get_device_index", &VerbsError::UnknownDevice);
    }
    -1
}

/// The operations every context of this library carries.
fn context_ops() -> IbvContextOps {
    IbvContextOps {
        compat_query_device: Some(ibv_query_device),
        compat_query_port: Some(ibv_query_port),
        poll_cq: Some(crate::cq::poll_cq),
        req_notify_cq: Some(crate::cq::req_notify_cq),
        post_srq_recv: Some(crate::srq::post_srq_recv),
        post_send: Some(crate::qp::post_send),
        post_recv: Some(crate::qp::post_recv),
        ..IbvContextOps::default()
    }
}

fn verbs_context(device: *mut IbvDevice, cmd_fd: c_int, async_fd: c_int) -> VerbsContext {
    VerbsContext {
        query_port: Some(query_port_op),
        advise_mr: None,
        alloc_null_mr: None,
        read_counters: None,
        attach_counters_point_flow: None,
        create_counters: None,
        destroy_counters: None,
        reg_dm_mr: None,
        alloc_dm: None,
        free_dm: None,
        modify_flow_action_esp: None,
        destroy_flow_action: None,
        create_flow_action_esp: None,
        modify_qp_rate_limit: None,
        alloc_parent_domain: None,
        dealloc_td: None,
        alloc_td: None,
        modify_cq: None,
        post_srq_ops: None,
        destroy_rwq_ind_table: None,
        create_rwq_ind_table: None,
        destroy_wq: None,
        modify_wq: None,
        create_wq: None,
        query_rt_values: Some(crate::cq_ex::query_rt_values_op),
        create_cq_ex: Some(crate::cq_ex::create_cq_ex_op),
        priv_: null_mut(),
        query_device_ex: Some(query_device_ex_op),
        ibv_destroy_flow: None,
        abi_placeholder2: None,
        ibv_create_flow: None,
        abi_placeholder1: None,
        open_qp: None,
        create_qp_ex: Some(crate::qp_ex::create_qp_ex_op),
        get_srq_num: None,
        create_srq_ex: None,
        open_xrcd: None,
        close_xrcd: None,
        abi_placeholder3: 0,
        sz: size_of::<VerbsContext>(),
        context: IbvContext {
            device,
            ops: context_ops(),
            // The context's command channel: its attach connection to the router (no kernel
            // uverbs device). Programs only pass it on (`ibv_import_device`, refused).
            cmd_fd,
            async_fd,
            num_comp_vectors: 1,
            mutex: libc::PTHREAD_MUTEX_INITIALIZER,
            abi_compat: VERBS_ABI_IS_EXTENDED as *mut c_void,
        },
    }
}

/// `ibv_open_device`: a context with its own attachment to the router.
#[no_mangle]
pub extern "C" fn ibv_open_device(device: *mut IbvDevice) -> *mut IbvContext {
    returns_object("ibv_open_device", || {
        let device = registry::device_at(device).ok_or(VerbsError::UnknownDevice)?;
        let session = registry::attach_for(device)?;
        let conn = session.connection().try_clone()?;
        let mut channel = crate::channel::Channel::new(session);
        let pipe = open_event_pipe(&mut channel);
        let gone = Gone::default();
        let async_events = Arc::new(AsyncEvents::new()?);
        let cmd_fd = channel.command_fd();
        let c_side = Box::into_raw(Box::new(verbs_context(
            device.as_c(),
            cmd_fd,
            async_events.raw_fd(),
        )));
        // SAFETY: `c_side` is a live, exclusively owned allocation; this takes the address of
        // its `context` field without creating a reference.
        let context = unsafe { std::ptr::addr_of_mut!((*c_side).context) };
        let watcher = Watcher::start(
            conn,
            gone.clone(),
            async_events.clone(),
            pipe,
            context as usize,
        );
        let watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: leaked above and handed to nobody.
                drop(unsafe { Box::from_raw(c_side) });
                return Err(e.into());
            }
        };
        let state = Arc::new(ContextState {
            device,
            channel: Mutex::new(channel),
            async_events,
            gone,
            _watcher: watcher,
        });
        registry::debug(format_args!(
            "opened {} (attachment {})",
            crate::device::DEVICE_NAME,
            state.attachment_id()
        ));
        registry::add_context(context as usize, state);
        Ok(context)
    })
}

/// The router's asynchronous event pipe for a new context (None, with a debug line, from a
/// router that has none: the context then has only the library's own events).
fn open_event_pipe(channel: &mut crate::channel::Channel) -> Option<OwnedFd> {
    let opened = channel
        .call(freeflow_proto::verbs::op::CREATE_ASYNC_EVENTS, &[])
        .and_then(|_| {
            channel.take_queue_file(freeflow_proto::verbs::QueueFileKind::AsyncEvents, 0)
        });
    opened
        .map_err(|e| registry::debug(format_args!("no asynchronous events from the router: {e}")))
        .ok()
}

/// `ibv_close_device`: 0, or -1 with EINVAL for a pointer that is not an open context.
///
/// # Safety
/// `context` is not used by the program after this call.
#[no_mangle]
pub unsafe extern "C" fn ibv_close_device(context: *mut IbvContext) -> c_int {
    returns_minus_one("ibv_close_device", || {
        let state = registry::remove_context(context as usize).ok_or(VerbsError::UnknownContext)?;
        let c_side = context
            .cast::<u8>()
            .wrapping_sub(offset_of!(VerbsContext, context))
            .cast::<VerbsContext>();
        // SAFETY: the registry held `context`, so it is the `context` field of a VerbsContext
        // that `ibv_open_device` leaked with Box::into_raw and nobody freed (removal from the
        // registry happens once). The program no longer uses it.
        drop(unsafe { Box::from_raw(c_side) });
        registry::debug(format_args!(
            "closed {} (attachment {}); polls of this process yielded a router core {} times",
            crate::device::DEVICE_NAME,
            state.attachment_id(),
            crate::shared_core::yields()
        ));
        // PDs and MRs go with the context (the router frees its side when the attachment
        // closes); the regions' pages move back to private memory.
        crate::pd_mr::forget_objects_of(context as usize);
        // The attachment and the async eventfd close when the last user of the state is done.
        drop(state);
        Ok(())
    })
}

/// `ibv_query_device`: 0 or an errno value.
///
/// # Safety
/// `device_attr` is NULL or writable for a `struct ibv_device_attr`.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_device(
    context: *mut IbvContext,
    device_attr: *mut IbvDeviceAttr,
) -> c_int {
    returns_errno("ibv_query_device", || {
        let attr = state_of(context)?.device.identity.device_attr();
        let len = size_of::<IbvDeviceAttr>();
        // SAFETY: the caller's buffer holds a struct ibv_device_attr.
        unsafe { answer(device_attr, len, len, "device_attr is NULL", attr) }
    })
}

/// Port attributes into `len` bytes at `out`.
///
/// # Safety
/// `out` is NULL or writable for `len` bytes.
unsafe fn query_port(
    context: *mut IbvContext,
    port: u8,
    out: *mut IbvPortAttr,
    len: usize,
) -> c_int {
    returns_errno("ibv_query_port", || {
        let state = state_of(context)?;
        check_port(u32::from(port))?;
        let attr = state.device.identity.port_attr();
        // SAFETY: the caller guarantees `len` writable bytes at `out`.
        unsafe { answer(out, len, 0, "port_attr is NULL", attr) }
    })
}

/// The exported `ibv_query_port` (what programs reach when the context has no `query_port` op,
/// and old binaries): fills `struct _compat_ibv_port_attr`.
///
/// # Safety
/// `port_attr` is NULL or writable for `COMPAT_PORT_ATTR_LEN` bytes.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_port(
    context: *mut IbvContext,
    port_num: u8,
    port_attr: *mut IbvPortAttr,
) -> c_int {
    // SAFETY: forwarded caller guarantee.
    unsafe { query_port(context, port_num, port_attr, COMPAT_PORT_ATTR_LEN) }
}

/// `verbs_context.query_port`: the inline `ibv_query_port` of current headers calls this with
/// the size of its `struct ibv_port_attr`.
unsafe extern "C" fn query_port_op(
    context: *mut IbvContext,
    port_num: u8,
    port_attr: *mut IbvPortAttr,
    port_attr_len: usize,
) -> c_int {
    // SAFETY: the inline wrapper passes its own structure and its size.
    unsafe { query_port(context, port_num, port_attr, port_attr_len) }
}

/// `verbs_context.query_device_ex`: the plain attributes and completion timestamps.
unsafe extern "C" fn query_device_ex_op(
    context: *mut IbvContext,
    input: *const IbvQueryDeviceExInput,
    attr: *mut IbvDeviceAttrEx,
    attr_size: usize,
) -> c_int {
    returns_errno("ibv_query_device_ex", || {
        let state = state_of(context)?;
        // SAFETY: `input` is NULL or the caller's input structure.
        if !input.is_null() && unsafe { (*input).comp_mask } != 0 {
            return Err(VerbsError::InvalidArgument("unknown comp_mask in input"));
        }
        let value = state.device.identity.device_attr_ex();
        // SAFETY: the caller's buffer has `attr_size` bytes.
        unsafe {
            answer(
                attr,
                attr_size,
                size_of::<IbvDeviceAttr>(),
                "attr too small",
                value,
            )
        }
    })
}

/// `ibv_query_gid`: 0, or -1 with errno.
///
/// # Safety
/// `gid` is NULL or writable for a `union ibv_gid`.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_gid(
    context: *mut IbvContext,
    port_num: u8,
    index: c_int,
    gid: *mut IbvGid,
) -> c_int {
    returns_minus_one("ibv_query_gid", || {
        let state = state_of(context)?;
        check_gid(u32::from(port_num), i64::from(index))?;
        let (value, len) = (state.device.identity.gid(), size_of::<IbvGid>());
        // SAFETY: the caller's buffer holds a union ibv_gid.
        unsafe { answer(gid, len, len, "gid is NULL", value) }
    })
}

/// `ibv_query_gid_type` (rdma-core's private ABI, imported by `ibv_devinfo`): RoCE v2.
///
/// # Safety
/// `gid_type` is NULL or writable for an int-sized enum.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_gid_type(
    context: *mut IbvContext,
    port_num: u8,
    index: c_uint,
    gid_type: *mut c_int,
) -> c_int {
    returns_errno("ibv_query_gid_type", || {
        state_of(context)?;
        check_gid(u32::from(port_num), i64::from(index))?;
        if gid_type.is_null() {
            return Err(VerbsError::InvalidArgument("type is NULL"));
        }
        // SAFETY: the caller passes a writable enum.
        unsafe { *gid_type = IBV_GID_TYPE_SYSFS_ROCE_V2 };
        Ok(())
    })
}

/// `_ibv_query_gid_ex` (behind the inline `ibv_query_gid_ex`): 0 or an errno value.
///
/// # Safety
/// `entry` is NULL or writable for `entry_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn _ibv_query_gid_ex(
    context: *mut IbvContext,
    port_num: u32,
    gid_index: u32,
    entry: *mut IbvGidEntry,
    flags: u32,
    entry_size: usize,
) -> c_int {
    returns_errno("ibv_query_gid_ex", || {
        let state = state_of(context)?;
        check_gid(port_num, i64::from(gid_index))?;
        check_no_flags(flags)?;
        let value = state.device.identity.gid_entry();
        // SAFETY: the caller's buffer has `entry_size` bytes.
        unsafe {
            answer(
                entry,
                entry_size,
                size_of::<IbvGidEntry>(),
                "entry too small",
                value,
            )
        }
    })
}

/// `_ibv_query_gid_table` (behind the inline `ibv_query_gid_table`): the number of entries
/// (1), or a negative errno value.
///
/// # Safety
/// `entries` is NULL or writable for `max_entries` entries of `entry_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn _ibv_query_gid_table(
    context: *mut IbvContext,
    entries: *mut IbvGidEntry,
    max_entries: usize,
    flags: u32,
    entry_size: usize,
) -> isize {
    guard(-(libc::EIO as isize), || {
        let result = state_of(context).and_then(|state| {
            check_no_flags(flags)?;
            if entries.is_null() || max_entries < 1 || entry_size < size_of::<IbvGidEntry>() {
                return Err(VerbsError::InvalidArgument("no room for the GID table"));
            }
            let value = state.device.identity.gid_entry();
            // SAFETY: the caller's array has room for at least one entry of `entry_size` bytes.
            unsafe { copy_out(entries, &value, entry_size) };
            Ok(1)
        });
        result.unwrap_or_else(|e| -(fail("ibv_query_gid_table", &e) as isize))
    })
}

/// `ibv_query_pkey`: 0, or -1 with errno.
///
/// # Safety
/// `pkey` is NULL or writable for a `__be16`.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_pkey(
    context: *mut IbvContext,
    port_num: u8,
    index: c_int,
    pkey: *mut u16,
) -> c_int {
    returns_minus_one("ibv_query_pkey", || {
        state_of(context)?;
        check_port(u32::from(port_num))?;
        check_index("P_Key", i64::from(index))?;
        if pkey.is_null() {
            return Err(VerbsError::InvalidArgument("pkey is NULL"));
        }
        // SAFETY: the caller's buffer holds a __be16 (alignment not assumed).
        unsafe { pkey.write_unaligned(PKEY_BE) };
        Ok(())
    })
}

/// `ibv_get_pkey_index`: 0 for the default P_Key, else -1 with errno.
#[no_mangle]
pub extern "C" fn ibv_get_pkey_index(context: *mut IbvContext, port_num: u8, pkey: u16) -> c_int {
    guard(-1, || {
        let result = state_of(context).and_then(|_| {
            check_port(u32::from(port_num))?;
            if pkey == PKEY_BE {
                Ok(0)
            } else {
                Err(VerbsError::InvalidArgument("no such P_Key"))
            }
        });
        result.unwrap_or_else(|e| {
            fail("ibv_get_pkey_index", &e);
            -1
        })
    })
}

/// `ibv_get_async_event`: 0 with the oldest event in `*event`, or -1 with errno: EAGAIN when
/// none waits and the program made `async_fd` non-blocking, EINTR, EIO after the fatal event
/// of a device whose router is gone. Blocks otherwise, as rdma-core does.
///
/// # Safety
/// `event` is NULL or writable for a `struct ibv_async_event`.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_async_event(
    context: *mut IbvContext,
    event: *mut IbvAsyncEvent,
) -> c_int {
    guard(-1, || {
        let state = match state_of(context) {
            Ok(s) => s,
            Err(e) => {
                fail("ibv_get_async_event", &e);
                return -1;
            }
        };
        if event.is_null() {
            fail(
                "ibv_get_async_event",
                &VerbsError::InvalidArgument("event is NULL"),
            );
            return -1;
        }
        match state.async_events.get() {
            Ok(got) => {
                // SAFETY: the caller's structure (checked for NULL), written whole.
                unsafe { event.write(got.to_c()) };
                0
            }
            Err(GetError::Fd(e)) => {
                set_errno(e.raw_os_error().unwrap_or(libc::EIO));
                -1
            }
            Err(GetError::DeviceGone) => {
                set_errno(libc::EIO);
                -1
            }
        }
    })
}

/// `ibv_ack_async_event`: counts the acknowledgement against the event's object, so that its
/// destroy verb can finish (see `async_event`).
///
/// # Safety
/// `event` is NULL or an event `ibv_get_async_event` returned.
#[no_mangle]
pub unsafe extern "C" fn ibv_ack_async_event(event: *mut IbvAsyncEvent) {
    guard((), || {
        if event.is_null() {
            return;
        }
        // SAFETY: the caller's event (checked for NULL).
        let e = unsafe { event.read() };
        if let Some(element) = crate::async_event::element_of(&e) {
            registry::ack_async_event(element);
        }
    })
}

/// `ibv_read_sysfs_file`: the file's contents without its trailing newline, NUL-terminated;
/// returns their length, or -1 with errno. Files of the virtual device are served from its
/// identity.
///
/// # Safety
/// `dir` and `file` are NULL or C strings; `buf` is NULL or writable for `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ibv_read_sysfs_file(
    dir: *const c_char,
    file: *const c_char,
    buf: *mut c_char,
    size: usize,
) -> c_int {
    guard(-1, || {
        if dir.is_null() || file.is_null() || buf.is_null() || size == 0 {
            set_errno(libc::EINVAL);
            return -1;
        }
        // SAFETY: the caller passes C strings.
        let (dir, file) = unsafe { (CStr::from_ptr(dir), CStr::from_ptr(file)) };
        let (Ok(dir), Ok(file)) = (dir.to_str(), file.to_str()) else {
            set_errno(libc::ENOENT);
            return -1;
        };
        let mut contents = match sysfs::read(dir, file, size) {
            Ok(c) => c,
            Err(e) => {
                set_errno(e.errno());
                return -1;
            }
        };
        if contents.last() == Some(&b'\n') {
            contents.pop();
        }
        // Room for the terminator, or the value would reach the caller cut short.
        if contents.len() >= size {
            set_errno(libc::EOVERFLOW);
            return -1;
        }
        contents.push(0);
        // SAFETY: `contents.len() <= size` bytes fit the caller's buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(contents.as_ptr(), buf.cast::<u8>(), contents.len())
        };
        (contents.len() - 1) as c_int
    })
}

/// `ibv_get_sysfs_path`: where sysfs is mounted.
#[no_mangle]
pub extern "C" fn ibv_get_sysfs_path() -> *const c_char {
    c"/sys".as_ptr()
}
