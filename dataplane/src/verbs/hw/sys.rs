//! The only unsafe code of the hardware backend: rdma-core's verbs, through rdma-sys's
//! bindings, wrapped in owning types with typed errors. Every object holds what must outlive it
//! (a QP its PD and CQs, an MR its PD and its memory, everything the device context), so that
//! destroying in the wrong order cannot happen; `Drop` destroys each once.
//!
//! The provider's fast-path entry points (`post_send`, `post_recv`, `poll_cq`) are function
//! pointers in the context's ops table, as rdma-core's inline functions call them; a provider
//! that leaves one empty is an error here ([`NicError::MissingOp`]), never a panic.
//!
//! Nothing here knows about containers: the backend (`super`) translates their virtual names
//! before anything reaches this module.

use rdma_sys::*;
use std::ffi::CStr;
use std::os::raw::c_int;
use std::ptr::NonNull;
use std::sync::Arc;

/// Why a call to the device failed.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("no RDMA device {name} (libibverbs finds: {found:?})")]
    NoDevice { name: String, found: Vec<String> },
    #[error("no RDMA device has an active port 1")]
    NoActiveDevice,
    #[error("{verb} failed: {source}")]
    Call {
        verb: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the provider has no {0} entry point")]
    MissingOp(&'static str),
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
}

/// The error of `verb`, from errno (for calls that return NULL) or from the returned value.
fn call_error(verb: &'static str, ret: c_int) -> NicError {
    let source = if ret > 0 {
        std::io::Error::from_raw_os_error(ret)
    } else {
        std::io::Error::last_os_error()
    };
    NicError::Call { verb, source }
}

/// Names of the RDMA devices libibverbs finds.
pub fn device_names() -> Result<Vec<String>, NicError> {
    let mut count: c_int = 0;
    // SAFETY: ibv_get_device_list writes the count and returns a NULL-terminated array that we
    // free below, or NULL with errno set.
    let list = unsafe { ibv_get_device_list(&mut count) };
    if list.is_null() {
        return Err(call_error("ibv_get_device_list", 0));
    }
    let mut names = Vec::new();
    for i in 0..count.max(0) as usize {
        // SAFETY: i < count, so the entry is one of the list's devices.
        let device = unsafe { *list.add(i) };
        if device.is_null() {
            break;
        }
        // SAFETY: the device is valid until the list is freed; its name is a C string.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(device)) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: the list came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    Ok(names)
}

/// What the backend needs to know of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortInfo {
    pub active: bool,
    /// `enum ibv_mtu` (1: 256 bytes ... 5: 4096).
    pub active_mtu: u32,
    pub lid: u16,
    pub gid_table_len: i32,
}

/// An open device context.
#[derive(Debug)]
pub struct Device {
    ctx: NonNull<ibv_context>,
    name: String,
}

// SAFETY: libibverbs contexts may be used from any thread (rdma-core's documented thread
// safety); the router uses each from one thread at a time anyway.
unsafe impl Send for Device {}
// SAFETY: as above: every verb on a context is thread-safe in rdma-core.
unsafe impl Sync for Device {}

impl Device {
    /// Opens device `name`, or with `None` the first device whose port 1 is active.
    pub fn open(name: Option<&str>) -> Result<Arc<Device>, NicError> {
        let mut count: c_int = 0;
        // SAFETY: as in `device_names`.
        let list = unsafe { ibv_get_device_list(&mut count) };
        if list.is_null() {
            return Err(call_error("ibv_get_device_list", 0));
        }
        let mut found = None;
        for i in 0..count.max(0) as usize {
            // SAFETY: i < count.
            let device = unsafe { *list.add(i) };
            if device.is_null() {
                break;
            }
            // SAFETY: valid until the list is freed; a C string.
            let dev_name = unsafe { CStr::from_ptr(ibv_get_device_name(device)) }
                .to_string_lossy()
                .into_owned();
            if name.is_some_and(|n| n != dev_name) {
                continue;
            }
            // SAFETY: the device is one of the list's; the context outlives the list (rdma-core
            // keeps a reference to the device for an open context).
            let Some(ctx) = NonNull::new(unsafe { ibv_open_device(device) }) else {
                if name.is_some() {
                    // SAFETY: freed once, on this path only.
                    unsafe { ibv_free_device_list(list) };
                    return Err(call_error("ibv_open_device", 0));
                }
                continue;
            };
            let opened = Device {
                ctx,
                name: dev_name,
            };
            if name.is_some() || opened.query_port(1).is_ok_and(|p| p.active) {
                found = Some(opened);
                break;
            }
        }
        // SAFETY: freed once; open contexts keep their devices.
        unsafe { ibv_free_device_list(list) };
        match (found, name) {
            (Some(d), _) => Ok(Arc::new(d)),
            (None, Some(n)) => Err(NicError::NoDevice {
                name: n.to_owned(),
                found: device_names().unwrap_or_default(),
            }),
            (None, None) => Err(NicError::NoActiveDevice),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn query_port(&self, port: u8) -> Result<PortInfo, NicError> {
        // SAFETY: plain data; zero is a valid value the call overwrites.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; attr lives across the call and has the size the
        // provider is told (rdma-core's inline ibv_query_port).
        let ret = unsafe { ___ibv_query_port(self.ctx.as_ptr(), port, &mut attr) };
        if ret != 0 {
            return Err(call_error("ibv_query_port", ret));
        }
        Ok(PortInfo {
            active: attr.state == ibv_port_state::IBV_PORT_ACTIVE,
            active_mtu: attr.active_mtu,
            lid: attr.lid,
            gid_table_len: attr.gid_tbl_len,
        })
    }

    pub fn query_gid(&self, port: u8, index: i32) -> Result<[u8; 16], NicError> {
        let mut gid = ibv_gid { raw: [0; 16] };
        // SAFETY: the context is open; gid is 16 bytes living across the call.
        let ret = unsafe { ibv_query_gid(self.ctx.as_ptr(), port, index, &mut gid) };
        if ret != 0 {
            return Err(call_error("ibv_query_gid", ret));
        }
        // SAFETY: every bit pattern is a valid [u8; 16].
        Ok(unsafe { gid.raw })
    }

    pub fn alloc_pd(self: &Arc<Self>) -> Result<Arc<Pd>, NicError> {
        // SAFETY: the context is open.
        let pd = unsafe { ibv_alloc_pd(self.ctx.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| call_error("ibv_alloc_pd", 0))?;
        Ok(Arc::new(Pd {
            pd,
            _device: self.clone(),
        }))
    }

    /// A CQ of at least `entries` entries, without a completion channel (the shard polls).
    pub fn create_cq(self: &Arc<Self>, entries: u32) -> Result<Arc<Cq>, NicError> {
        self.create_cq_on(entries, None)
    }

    /// A CQ of at least `entries` entries whose events (once armed, [`Cq::arm`]) come on
    /// `channel`.
    pub fn create_cq_on(
        self: &Arc<Self>,
        entries: u32,
        channel: Option<&Arc<CompChannel>>,
    ) -> Result<Arc<Cq>, NicError> {
        let entries = c_int::try_from(entries).map_err(|_| NicError::Invalid("CQ size"))?;
        let channel_ptr = channel.map_or(std::ptr::null_mut(), |c| c.ch.as_ptr());
        // SAFETY: the context is open; the channel (if any) is alive and held by the CQ below
        // for its whole life; no context pointer.
        let cq = unsafe {
            ibv_create_cq(
                self.ctx.as_ptr(),
                entries,
                std::ptr::null_mut(),
                channel_ptr,
                0,
            )
        };
        let cq = NonNull::new(cq).ok_or_else(|| call_error("ibv_create_cq", 0))?;
        Ok(Arc::new(Cq {
            cq,
            _channel: channel.cloned(),
            _device: self.clone(),
        }))
    }

    /// A completion channel: a descriptor that becomes readable when an armed CQ of it gets a
    /// completion.
    pub fn create_comp_channel(self: &Arc<Self>) -> Result<Arc<CompChannel>, NicError> {
        // SAFETY: the context is open.
        let ch = unsafe { ibv_create_comp_channel(self.ctx.as_ptr()) };
        let ch = NonNull::new(ch).ok_or_else(|| call_error("ibv_create_comp_channel", 0))?;
        Ok(Arc::new(CompChannel {
            ch,
            _device: self.clone(),
        }))
    }
}

/// A completion channel of the device.
#[derive(Debug)]
pub struct CompChannel {
    ch: NonNull<ibv_comp_channel>,
    _device: Arc<Device>,
}

// SAFETY: see `Device`.
unsafe impl Send for CompChannel {}
// SAFETY: see `Device`.
unsafe impl Sync for CompChannel {}

impl CompChannel {
    /// Its descriptor (readable while an event waits), for the shard's io_uring.
    pub fn fd(&self) -> std::os::fd::RawFd {
        // SAFETY: the channel is alive; its fd field is plain data.
        unsafe { (*self.ch.as_ptr()).fd }
    }

    /// Takes and acknowledges every event waiting on the channel, without blocking (a poll
    /// of the descriptor says whether one is there before each read); returns how many.
    pub fn take_events(&self) -> Result<usize, NicError> {
        let mut taken = 0;
        loop {
            let mut pfd = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd living across the call; zero timeout.
            let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
            if ready < 0 {
                return Err(call_error("poll", 0));
            }
            if ready == 0 || pfd.revents & libc::POLLIN == 0 {
                return Ok(taken);
            }
            let mut cq: *mut ibv_cq = std::ptr::null_mut();
            let mut cq_context: *mut std::os::raw::c_void = std::ptr::null_mut();
            // SAFETY: the channel is alive; the descriptor is readable, so the call does not
            // block; it writes the CQ and its context pointer.
            let ret = unsafe { ibv_get_cq_event(self.ch.as_ptr(), &mut cq, &mut cq_context) };
            if ret != 0 {
                return Err(call_error("ibv_get_cq_event", 0));
            }
            if !cq.is_null() {
                // SAFETY: the event names a CQ of this channel, alive (CQs are destroyed on
                // this thread, which acknowledges each event as it takes it).
                unsafe { ibv_ack_cq_events(cq, 1) };
            }
            taken += 1;
        }
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: CQs hold an Arc of their channel, so none is left; destroyed once.
        unsafe { ibv_destroy_comp_channel(self.ch.as_ptr()) };
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every object of the context holds an Arc of it, so none is left; closed once.
        unsafe { ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// A protection domain.
#[derive(Debug)]
pub struct Pd {
    pd: NonNull<ibv_pd>,
    _device: Arc<Device>,
}

// SAFETY: see `Device`.
unsafe impl Send for Pd {}
// SAFETY: see `Device`.
unsafe impl Sync for Pd {}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: MRs and QPs hold an Arc of their PD, so none is left; freed once.
        unsafe { ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// Memory a device may read and write for as long as a region registers it.
///
/// # Safety
/// `range` names memory that stays mapped, readable and writable, at the same address, for the
/// whole life of the value; nothing else frees or moves it.
pub unsafe trait DeviceMemory: Send + Sync + std::fmt::Debug {
    /// Start and length of the memory.
    fn range(&self) -> (NonNull<u8>, usize);
}

/// Memory of the router's own, for tests and probes: an anonymous private mapping.
#[derive(Debug)]
pub struct OwnBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is only reached through raw copies (`read`, `write`), from any thread.
unsafe impl Send for OwnBuffer {}
// SAFETY: as above.
unsafe impl Sync for OwnBuffer {}

impl OwnBuffer {
    pub fn new(len: usize) -> Result<OwnBuffer, NicError> {
        if len == 0 {
            return Err(NicError::Invalid("empty buffer"));
        }
        // SAFETY: a new mapping at an address the kernel picks; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(call_error("mmap", 0));
        }
        let ptr = NonNull::new(ptr.cast()).ok_or(NicError::Invalid("mmap returned NULL"))?;
        Ok(OwnBuffer { ptr, len })
    }

    /// Copies `data` in at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), NicError> {
        let end = offset.checked_add(data.len());
        if end.is_none_or(|e| e > self.len) {
            return Err(NicError::Invalid("write outside the buffer"));
        }
        // SAFETY: the range is inside the mapping (checked); raw bytes, no reference made.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Copies `out.len()` bytes out from `offset`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), NicError> {
        let end = offset.checked_add(out.len());
        if end.is_none_or(|e| e > self.len) {
            return Err(NicError::Invalid("read outside the buffer"));
        }
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }
}

// SAFETY: the mapping lives until drop, at its address.
unsafe impl DeviceMemory for OwnBuffer {
    fn range(&self) -> (NonNull<u8>, usize) {
        (self.ptr, self.len)
    }
}

impl Drop for OwnBuffer {
    fn drop(&mut self) {
        // SAFETY: what mmap returned; regions registering it hold an Arc, so none is left.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Memory as the router holds a container's: a shared mapping of a sealed memory file (a
/// memfd), of which [`SharedFileBuffer::second_view`] makes a second mapping, as the container
/// has its own. What the backend registers with the device, with no copy.
#[derive(Debug)]
pub struct SharedFileBuffer {
    map: OwnBuffer,
    file: std::os::fd::OwnedFd,
}

impl SharedFileBuffer {
    pub fn new(len: usize) -> Result<SharedFileBuffer, NicError> {
        let file = freeflow_os::memfd::sized(
            c"ff-nic-probe",
            len as u64,
            freeflow_os::memfd::FIXED_SIZE_SEALS,
        )
        .map_err(|source| NicError::Call {
            verb: "memfd_create",
            source,
        })?;
        let map = Self::map_file(&file, len)?;
        Ok(SharedFileBuffer { map, file })
    }

    fn map_file(file: &std::os::fd::OwnedFd, len: usize) -> Result<OwnBuffer, NicError> {
        Self::map_file_at(file, 0, len)
    }

    fn map_file_at(
        file: &std::os::fd::OwnedFd,
        offset: usize,
        len: usize,
    ) -> Result<OwnBuffer, NicError> {
        use std::os::fd::AsRawFd;
        let offset = libc::off_t::try_from(offset).map_err(|_| NicError::Invalid("offset"))?;
        // SAFETY: a new shared mapping of part of the file at an address the kernel picks
        // (mmap checks the offset's alignment); checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(call_error("mmap", 0));
        }
        let ptr = NonNull::new(ptr.cast()).ok_or(NicError::Invalid("mmap returned NULL"))?;
        Ok(OwnBuffer { ptr, len })
    }

    /// Another mapping of the same file (the container's view of the same pages).
    pub fn second_view(&self) -> Result<OwnBuffer, NicError> {
        Self::map_file(&self.file, self.map.len)
    }

    /// A mapping of `len` bytes of the file from `offset` (a page multiple), as the router maps
    /// one region of a container's memory file.
    pub fn view_at(&self, offset: usize, len: usize) -> Result<OwnBuffer, NicError> {
        if offset.checked_add(len).is_none_or(|end| end > self.map.len) {
            return Err(NicError::Invalid("view outside the file"));
        }
        Self::map_file_at(&self.file, offset, len)
    }
}

// SAFETY: the mapping lives until drop (it is an OwnBuffer, unmapped then), at its address.
unsafe impl DeviceMemory for SharedFileBuffer {
    fn range(&self) -> (NonNull<u8>, usize) {
        self.map.range()
    }
}

/// A registered memory region (the device's keys for `memory`).
#[derive(Debug)]
pub struct Mr {
    mr: NonNull<ibv_mr>,
    pub lkey: u32,
    pub rkey: u32,
    /// The device's address of the first byte (the memory's own address: no iova).
    pub addr: u64,
    _memory: Arc<dyn DeviceMemory>,
    _pd: Arc<Pd>,
}

// SAFETY: see `Device`.
unsafe impl Send for Mr {}
// SAFETY: see `Device`.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers all of `memory` in `pd` with `enum ibv_access_flags` `access`.
    pub fn register(
        pd: &Arc<Pd>,
        memory: Arc<dyn DeviceMemory>,
        access: u32,
    ) -> Result<Mr, NicError> {
        let (ptr, len) = memory.range();
        let access = c_int::try_from(access).map_err(|_| NicError::Invalid("access flags"))?;
        // SAFETY: the PD is allocated; the memory stays mapped while this region holds it
        // (`DeviceMemory`'s contract), which outlives the registration.
        let mr = unsafe { ibv_reg_mr(pd.pd.as_ptr(), ptr.as_ptr().cast(), len, access) };
        let mr = NonNull::new(mr).ok_or_else(|| call_error("ibv_reg_mr", 0))?;
        // SAFETY: a registered region the call just returned.
        let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
        Ok(Mr {
            mr,
            lkey,
            rkey,
            addr: ptr.as_ptr() as u64,
            _memory: memory,
            _pd: pd.clone(),
        })
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered once, deregistered once, before its memory and PD go.
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// A completion as the device reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    /// `enum ibv_wc_status`.
    pub status: u32,
    /// `enum ibv_wc_opcode`.
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    /// Immediate data in network byte order (with IBV_WC_WITH_IMM).
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: u32,
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    cq: NonNull<ibv_cq>,
    _channel: Option<Arc<CompChannel>>,
    _device: Arc<Device>,
}

// SAFETY: see `Device`.
unsafe impl Send for Cq {}
// SAFETY: see `Device`.
unsafe impl Sync for Cq {}

/// Completions polled in one call at most.
const POLL_BATCH: usize = 16;

impl Cq {
    /// Polls up to `out.len()` (at most 16) completions; returns how many came.
    pub fn poll(&self, out: &mut [Completion]) -> Result<usize, NicError> {
        // SAFETY: ibv_wc is plain data; zero is valid and the provider overwrites it.
        let mut wcs: [ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
        let n = out.len().min(POLL_BATCH);
        // SAFETY: the CQ and its context are alive (we hold the device).
        let poll = unsafe { (*(*self.cq.as_ptr()).context).ops.poll_cq }
            .ok_or(NicError::MissingOp("poll_cq"))?;
        // SAFETY: the provider writes at most n entries into wcs, which holds POLL_BATCH >= n.
        let got = unsafe { poll(self.cq.as_ptr(), n as c_int, wcs.as_mut_ptr()) };
        if got < 0 {
            return Err(call_error("ibv_poll_cq", -got));
        }
        let got = (got as usize).min(n);
        for (o, w) in out.iter_mut().zip(&wcs[..got]) {
            *o = Completion {
                wr_id: w.wr_id,
                status: w.status,
                opcode: w.opcode,
                vendor_err: w.vendor_err,
                byte_len: w.byte_len,
                // SAFETY: both members are a u32; either reading is defined.
                imm_data: unsafe { w.imm_data_invalidated_rkey_union.imm_data },
                qp_num: w.qp_num,
                src_qp: w.src_qp,
                wc_flags: w.wc_flags,
            };
        }
        Ok(got)
    }
}

impl Cq {
    /// Asks for an event on its channel at the next completion (`ibv_req_notify_cq`, all
    /// completions).
    pub fn arm(&self) -> Result<(), NicError> {
        // SAFETY: the CQ and its context are alive (we hold the device).
        let notify = unsafe { (*(*self.cq.as_ptr()).context).ops.req_notify_cq }
            .ok_or(NicError::MissingOp("req_notify_cq"))?;
        // SAFETY: the CQ is alive.
        let ret = unsafe { notify(self.cq.as_ptr(), 0) };
        if ret != 0 {
            return Err(call_error("ibv_req_notify_cq", ret));
        }
        Ok(())
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: QPs hold an Arc of their CQs, so none is left; destroyed once.
        unsafe { ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// One scatter/gather entry in the device's terms (real address and lkey).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// A send work request's operation, with the device's remote address and rkey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOpcode {
    Send,
    /// A SEND with immediate data (`imm` in network byte order, as the WQE carries it).
    SendImm {
        imm: u32,
    },
    Write {
        remote_addr: u64,
        rkey: u32,
    },
    WriteImm {
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    },
    Read {
        remote_addr: u64,
        rkey: u32,
    },
    /// The 64-bit word at `remote_addr` becomes `swap` if it is `compare`; its old value comes
    /// back into the request's first 8 bytes.
    CompareSwap {
        remote_addr: u64,
        rkey: u32,
        compare: u64,
        swap: u64,
    },
    /// The 64-bit word at `remote_addr` grows by `add`; its old value comes back.
    FetchAdd {
        remote_addr: u64,
        rkey: u32,
        add: u64,
    },
}

/// A send work request in the device's terms.
#[derive(Debug, Clone, Copy)]
pub struct SendRequest<'a> {
    pub wr_id: u64,
    pub opcode: SendOpcode,
    pub sges: &'a [Sge],
    pub signaled: bool,
    pub fence: bool,
    /// IBV_SEND_INLINE: the provider copies the bytes `sges` name while it posts (they need
    /// no key and may be freed when the call returns).
    pub inline: bool,
}

/// Scatter/gather entries of one work request at most (the engine's own limit is lower).
const MAX_SGES: usize = 32;

/// Where an RC QP connects to, at RTR.
#[derive(Debug, Clone, Copy)]
pub struct Destination {
    pub qpn: u32,
    pub gid: [u8; 16],
    pub lid: u16,
    pub rq_psn: u32,
    /// `enum ibv_mtu`.
    pub mtu: u32,
    pub sgid_index: u8,
    pub port: u8,
    pub min_rnr_timer: u8,
    pub max_dest_rd_atomic: u8,
}

/// A reliable-connected queue pair.
#[derive(Debug)]
pub struct Qp {
    qp: NonNull<ibv_qp>,
    pub qpn: u32,
    /// The capacities the device granted (at least those asked).
    pub caps: QpCaps,
    _pd: Arc<Pd>,
    _send_cq: Arc<Cq>,
    _recv_cq: Arc<Cq>,
}

// SAFETY: see `Device`.
unsafe impl Send for Qp {}
// SAFETY: see `Device`.
unsafe impl Sync for Qp {}

/// Capacities asked of a new QP.
#[derive(Debug, Clone, Copy)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

impl Qp {
    /// An RC QP in RESET.
    pub fn create_rc(
        pd: &Arc<Pd>,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
        caps: QpCaps,
    ) -> Result<Qp, NicError> {
        // SAFETY: plain data; zero is valid for every field left unset (no SRQ, no context).
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = send_cq.cq.as_ptr();
        init.recv_cq = recv_cq.cq.as_ptr();
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.cap = ibv_qp_cap {
            max_send_wr: caps.max_send_wr,
            max_recv_wr: caps.max_recv_wr,
            max_send_sge: caps.max_send_sge,
            max_recv_sge: caps.max_recv_sge,
            max_inline_data: caps.max_inline_data,
        };
        // SAFETY: PD and CQs are alive (held below for the QP's life); init lives across the
        // call, which writes the granted capacities back into it.
        let qp = unsafe { ibv_create_qp(pd.pd.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| call_error("ibv_create_qp", 0))?;
        // SAFETY: a QP the call just returned.
        let qpn = unsafe { (*qp.as_ptr()).qp_num };
        let granted = init.cap;
        Ok(Qp {
            qp,
            qpn,
            caps: QpCaps {
                max_send_wr: granted.max_send_wr,
                max_recv_wr: granted.max_recv_wr,
                max_send_sge: granted.max_send_sge,
                max_recv_sge: granted.max_recv_sge,
                max_inline_data: granted.max_inline_data,
            },
            _pd: pd.clone(),
            _send_cq: send_cq.clone(),
            _recv_cq: recv_cq.clone(),
        })
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: ibv_qp_attr_mask) -> Result<(), NicError> {
        // SAFETY: the QP is alive; attr lives across the call.
        let ret = unsafe { ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as c_int) };
        if ret != 0 {
            return Err(call_error("ibv_modify_qp", ret));
        }
        Ok(())
    }

    /// Any state to ERR (the device flushes what is queued) or to RESET.
    pub fn to_error(&self) -> Result<(), NicError> {
        self.to_state(ibv_qp_state::IBV_QPS_ERR)
    }

    /// Any state to RESET (the device forgets what is queued).
    pub fn to_reset(&self) -> Result<(), NicError> {
        self.to_state(ibv_qp_state::IBV_QPS_RESET)
    }

    fn to_state(&self, state: ibv_qp_state::Type) -> Result<(), NicError> {
        // SAFETY: plain data; zero is valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = state;
        self.modify(&mut attr, ibv_qp_attr_mask::IBV_QP_STATE)
    }

    /// RESET to INIT on `port`, granting `enum ibv_access_flags` `access` to remote peers.
    pub fn to_init(&self, port: u8, access: u32) -> Result<(), NicError> {
        // SAFETY: plain data; zero is valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.port_num = port;
        attr.pkey_index = 0;
        attr.qp_access_flags = access;
        self.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ibv_qp_attr_mask::IBV_QP_PORT
                | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS,
        )
    }

    /// INIT to RTR, connected to `dest` (RoCE: through the GRH, GID index `sgid_index`).
    pub fn to_rtr(&self, dest: &Destination) -> Result<(), NicError> {
        // SAFETY: plain data; zero is valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = dest.mtu;
        attr.dest_qp_num = dest.qpn;
        attr.rq_psn = dest.rq_psn;
        attr.max_dest_rd_atomic = dest.max_dest_rd_atomic;
        attr.min_rnr_timer = dest.min_rnr_timer;
        attr.ah_attr.dlid = dest.lid;
        attr.ah_attr.port_num = dest.port;
        attr.ah_attr.is_global = 1;
        attr.ah_attr.grh.dgid = ibv_gid { raw: dest.gid };
        attr.ah_attr.grh.sgid_index = dest.sgid_index;
        attr.ah_attr.grh.hop_limit = 1;
        self.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_AV
                | ibv_qp_attr_mask::IBV_QP_PATH_MTU
                | ibv_qp_attr_mask::IBV_QP_DEST_QPN
                | ibv_qp_attr_mask::IBV_QP_RQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
                | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER,
        )
    }

    /// RTR to RTS.
    pub fn to_rts(
        &self,
        sq_psn: u32,
        timeout: u8,
        retry_cnt: u8,
        rnr_retry: u8,
        max_rd_atomic: u8,
    ) -> Result<(), NicError> {
        // SAFETY: plain data; zero is valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        attr.sq_psn = sq_psn;
        attr.timeout = timeout;
        attr.retry_cnt = retry_cnt;
        attr.rnr_retry = rnr_retry;
        attr.max_rd_atomic = max_rd_atomic;
        self.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_TIMEOUT
                | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
                | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
                | ibv_qp_attr_mask::IBV_QP_SQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }

    fn sge_list(sges: &[Sge]) -> Result<[ibv_sge; MAX_SGES], NicError> {
        if sges.len() > MAX_SGES {
            return Err(NicError::Invalid("too many scatter/gather entries"));
        }
        let mut list = [ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        }; MAX_SGES];
        for (l, s) in list.iter_mut().zip(sges) {
            *l = ibv_sge {
                addr: s.addr,
                length: s.length,
                lkey: s.lkey,
            };
        }
        Ok(list)
    }

    /// Posts one send work request.
    pub fn post_send(&self, req: &SendRequest<'_>) -> Result<(), NicError> {
        let mut list = Self::sge_list(req.sges)?;
        // SAFETY: plain data; zero (NULL next, no union member set) is valid.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = req.wr_id;
        wr.sg_list = list.as_mut_ptr();
        wr.num_sge = req.sges.len() as c_int;
        let mut flags = 0;
        if req.signaled {
            flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        if req.fence {
            flags |= ibv_send_flags::IBV_SEND_FENCE.0;
        }
        if req.inline {
            flags |= ibv_send_flags::IBV_SEND_INLINE.0;
        }
        wr.send_flags = flags;
        let rdma = |remote_addr, rkey| wr_t {
            rdma: rdma_t { remote_addr, rkey },
        };
        match req.opcode {
            SendOpcode::Send => wr.opcode = ibv_wr_opcode::IBV_WR_SEND,
            SendOpcode::SendImm { imm } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
                wr.imm_data_invalidated_rkey_union =
                    imm_data_invalidated_rkey_union_t { imm_data: imm };
            }
            SendOpcode::WriteImm {
                remote_addr,
                rkey,
                imm,
            } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                wr.wr = rdma(remote_addr, rkey);
                wr.imm_data_invalidated_rkey_union =
                    imm_data_invalidated_rkey_union_t { imm_data: imm };
            }
            SendOpcode::Write { remote_addr, rkey } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                wr.wr = rdma(remote_addr, rkey);
            }
            SendOpcode::Read { remote_addr, rkey } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.wr = rdma(remote_addr, rkey);
            }
            SendOpcode::CompareSwap {
                remote_addr,
                rkey,
                compare,
                swap,
            } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP;
                wr.wr = wr_t {
                    atomic: atomic_t {
                        remote_addr,
                        compare_add: compare,
                        swap,
                        rkey,
                    },
                };
            }
            SendOpcode::FetchAdd {
                remote_addr,
                rkey,
                add,
            } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD;
                wr.wr = wr_t {
                    atomic: atomic_t {
                        remote_addr,
                        compare_add: add,
                        swap: 0,
                        rkey,
                    },
                };
            }
        }
        // SAFETY: the QP and its context are alive.
        let post = unsafe { (*(*self.qp.as_ptr()).context).ops.post_send }
            .ok_or(NicError::MissingOp("post_send"))?;
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: wr and the list it points to live across the call; the provider copies the
        // request before returning.
        let ret = unsafe { post(self.qp.as_ptr(), &mut wr, &mut bad) };
        if ret != 0 {
            return Err(call_error("ibv_post_send", ret));
        }
        Ok(())
    }

    /// Posts one receive work request.
    pub fn post_recv(&self, wr_id: u64, sges: &[Sge]) -> Result<(), NicError> {
        let mut list = Self::sge_list(sges)?;
        let mut wr = ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: list.as_mut_ptr(),
            num_sge: sges.len() as c_int,
        };
        // SAFETY: the QP and its context are alive.
        let post = unsafe { (*(*self.qp.as_ptr()).context).ops.post_recv }
            .ok_or(NicError::MissingOp("post_recv"))?;
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: as in `post_send`.
        let ret = unsafe { post(self.qp.as_ptr(), &mut wr, &mut bad) };
        if ret != 0 {
            return Err(call_error("ibv_post_recv", ret));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once, before its PD and CQs (held above).
        unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
    }
}
