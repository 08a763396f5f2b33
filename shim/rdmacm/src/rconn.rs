//! The verbs side of one rsocket connection: a registered region of receive and send slots, a
//! CQ with its completion channel (whose fd rpoll waits on), and the RC QP made through the
//! connection's rdma_cm id. Posts and polls go through the context's operations table, as
//! `verbs.h`'s inline `ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq` and `ibv_req_notify_cq`
//! do; the flow control itself is [`crate::rflow`].
#![allow(unsafe_code)]

use crate::abi::{IbvQpCap, IbvQpInitAttr, Ptr, IBV_QPT_RC};
use crate::cm::{Fail, Id};
use crate::ibv;
use crate::rflow::{Imm, SLOTS, SLOT_LEN};
use freeflow_proto::verbs::work::Cqe;
use std::ffi::{c_int, c_void};

/// `struct ibv_sge`.
#[repr(C)]
struct IbvSge {
    addr: u64,
    length: u32,
    lkey: u32,
}

/// `struct ibv_send_wr` (x86-64: 128 bytes; the `wr` union is 32, the `bind_mw`/`tso` union
/// 48).
#[repr(C)]
struct IbvSendWr {
    wr_id: u64,
    next: *mut IbvSendWr,
    sg_list: *mut IbvSge,
    num_sge: c_int,
    opcode: u32,
    send_flags: u32,
    imm_data: u32,
    wr: [u64; 4],
    qp_type: u32,
    bind_mw: [u64; 6],
}

/// `struct ibv_recv_wr`.
#[repr(C)]
struct IbvRecvWr {
    wr_id: u64,
    next: *mut IbvRecvWr,
    sg_list: *mut IbvSge,
    num_sge: c_int,
}

/// `struct ibv_context` up to `ops.post_recv` (the operations are pointers, 8 bytes each,
/// in `struct ibv_context_ops` order).
#[repr(C)]
struct IbvContextHead {
    device: Ptr,
    ops: [Ptr; 27],
}
const OP_POLL_CQ: usize = 11;
const OP_REQ_NOTIFY_CQ: usize = 12;
const OP_POST_SEND: usize = 25;
const OP_POST_RECV: usize = 26;

/// The first field of `struct ibv_cq` and of `struct ibv_qp`: the context.
#[repr(C)]
struct ObjectHead {
    context: *mut IbvContextHead,
}

/// `struct ibv_comp_channel`.
#[repr(C)]
struct IbvCompChannel {
    context: Ptr,
    fd: c_int,
    refcnt: c_int,
}

/// `struct ibv_mr` up to the keys.
#[repr(C)]
struct IbvMrHead {
    context: Ptr,
    pd: Ptr,
    addr: Ptr,
    length: usize,
    handle: u32,
    lkey: u32,
    rkey: u32,
}

const IBV_WR_RDMA_WRITE: u32 = 0;
const IBV_WR_SEND_WITH_IMM: u32 = 3;
const IBV_SEND_SIGNALED: u32 = 2;
const IBV_WC_SUCCESS: u32 = 0;
const IBV_WC_RECV: u32 = 128;
const IBV_ACCESS_LOCAL_WRITE: c_int = 1;
const IBV_ACCESS_REMOTE_WRITE: c_int = 2;

/// wr_id: the kind in the top byte, the slot below.
const WR_RECV: u64 = 1 << 56;
const WR_SEND_DATA: u64 = 2 << 56;
const WR_SEND_CONTROL: u64 = 3 << 56;
const WR_WRITE: u64 = 4 << 56;

/// What one completion was.
#[derive(Debug)]
pub enum Done {
    Received {
        slot: u16,
        len: usize,
        imm: Imm,
    },
    Sent {
        slot: Option<u16>,
    },
    /// A work request failed (the peer went, the QP is in error, the router went): status.
    Failed(u32),
}

/// One connection's verbs objects.
pub struct Conn {
    region: *mut u8,
    mr: Ptr,
    lkey: u32,
    channel: *mut IbvCompChannel,
    cq: Ptr,
    qp: Ptr,
    armed: bool,
}

// SAFETY: the verbs objects and the region are usable from any thread; the rsocket's lock
// serialises every use of a Conn.
unsafe impl Send for Conn {}

fn verbs() -> Result<&'static ibv::Verbs, Fail> {
    ibv::verbs().map_err(|m| Fail::new(libc::ENODEV, m.0))
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .filter(|&e| e != 0)
        .unwrap_or(libc::EIO)
}

const REGION_LEN: usize = 2 * SLOTS as usize * SLOT_LEN;

impl Conn {
    /// The region, CQ and QP for `id` (which has its device), every receive posted.
    pub fn create(id: &mut Id) -> Result<Conn, Fail> {
        let v = verbs()?;
        let dev = ibv::device().map_err(|why| Fail::new(libc::ENODEV, why))?;
        // A mapping of its own, so that registering it moves no page the program uses.
        // SAFETY: a fresh anonymous private mapping.
        let region = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if region == libc::MAP_FAILED {
            return Err(Fail::new(errno(), "mmap of the rsocket's slots failed"));
        }
        let mut conn = Conn {
            region: region.cast(),
            mr: std::ptr::null_mut(),
            lkey: 0,
            channel: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            qp: std::ptr::null_mut(),
            armed: false,
        };
        // SAFETY: the process's PD and the mapping just made.
        conn.mr = unsafe { (v.reg_mr)(dev.pd, region, REGION_LEN, IBV_ACCESS_LOCAL_WRITE) };
        if conn.mr.is_null() {
            return Err(Fail::new(
                errno(),
                "ibv_reg_mr of the rsocket's slots failed",
            ));
        }
        // SAFETY: a live MR.
        conn.lkey = unsafe { (*conn.mr.cast::<IbvMrHead>()).lkey };
        // SAFETY: the process's context.
        conn.channel = unsafe { (v.create_comp_channel)(dev.context) }.cast();
        if conn.channel.is_null() {
            return Err(Fail::new(errno(), "ibv_create_comp_channel failed"));
        }
        let depth = 3 * c_int::from(SLOTS) + 2;
        // SAFETY: live context and channel.
        conn.cq = unsafe {
            (v.create_cq)(
                dev.context,
                depth,
                std::ptr::null_mut(),
                conn.channel.cast(),
                0,
            )
        };
        if conn.cq.is_null() {
            return Err(Fail::new(errno(), "ibv_create_cq failed"));
        }
        let mut attr = IbvQpInitAttr {
            qp_context: std::ptr::null_mut(),
            send_cq: conn.cq,
            recv_cq: conn.cq,
            srq: std::ptr::null_mut(),
            cap: IbvQpCap {
                // Data sends, credit updates and FIN: at most the peer's receives in flight
                // plus one data slot each.
                max_send_wr: 2 * u32::from(SLOTS) + 1,
                max_recv_wr: u32::from(SLOTS),
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: IBV_QPT_RC,
            sq_sig_all: 0,
        };
        id.create_qp(dev.pd, &mut attr)?;
        conn.qp = id.c.qp.cast();
        for slot in 0..SLOTS {
            if let Err(e) = conn.post_recv(slot) {
                conn.release(Some(id));
                return Err(e);
            }
        }
        Ok(conn)
    }

    /// The completion channel's fd: readable when an armed CQ has a completion.
    pub fn wake_fd(&self) -> c_int {
        // SAFETY: a live channel.
        unsafe { (*self.channel).fd }
    }

    fn ops(&self) -> &[Ptr; 27] {
        // SAFETY: a live CQ, whose context is the live context of libibverbs.
        unsafe { &(*(*self.cq.cast::<ObjectHead>()).context).ops }
    }

    fn recv_slot(&self, slot: u16) -> *mut u8 {
        // SAFETY: slot < SLOTS: inside the region.
        unsafe { self.region.add(usize::from(slot) * SLOT_LEN) }
    }

    /// Send slot `slot`'s bytes.
    pub fn send_buf(&mut self, slot: u16) -> &mut [u8] {
        let at = (usize::from(SLOTS) + usize::from(slot)) * SLOT_LEN;
        // SAFETY: inside the region; the slot is the caller's (taken from the flow control).
        unsafe { std::slice::from_raw_parts_mut(self.region.add(at), SLOT_LEN) }
    }

    /// Receive slot `slot`'s bytes `offset..offset + len`.
    pub fn received(&self, slot: u16, offset: usize, len: usize) -> &[u8] {
        let len = len.min(SLOT_LEN.saturating_sub(offset));
        // SAFETY: inside the slot; the router wrote it before the completion we polled.
        unsafe { std::slice::from_raw_parts(self.recv_slot(slot).add(offset), len) }
    }

    pub fn post_recv(&mut self, slot: u16) -> Result<(), Fail> {
        let mut sge = IbvSge {
            addr: self.recv_slot(slot) as u64,
            length: SLOT_LEN as u32,
            lkey: self.lkey,
        };
        let mut wr = IbvRecvWr {
            wr_id: WR_RECV | u64::from(slot),
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut IbvRecvWr = std::ptr::null_mut();
        let post = self.ops()[OP_POST_RECV];
        // SAFETY: the context's post_recv, of verbs.h's signature; live QP and request.
        let rc = unsafe {
            std::mem::transmute::<
                Ptr,
                unsafe extern "C" fn(Ptr, *mut IbvRecvWr, *mut *mut IbvRecvWr) -> c_int,
            >(post)(self.qp, &mut wr, &mut bad)
        };
        match rc {
            0 => Ok(()),
            e => Err(Fail::new(e, "ibv_post_recv failed")),
        }
    }

    /// Sends `len` bytes of send slot `slot` (None: no data) with `imm`.
    pub fn post_send(&mut self, slot: Option<u16>, len: usize, imm: Imm) -> Result<(), Fail> {
        let (addr, wr_id) = match slot {
            Some(s) => (
                self.send_buf(s).as_mut_ptr() as u64,
                WR_SEND_DATA | u64::from(s),
            ),
            None => (self.region as u64, WR_SEND_CONTROL),
        };
        self.post(
            wr_id,
            addr,
            len,
            IBV_WR_SEND_WITH_IMM,
            imm.0.to_be(),
            [0; 4],
        )
    }

    /// RDMA-WRITEs `len` bytes of send slot `slot` to the peer's `remote_addr` under `rkey`
    /// (riowrite; the router checks the key and range against the peer's registrations).
    pub fn post_write(
        &mut self,
        slot: u16,
        len: usize,
        remote_addr: u64,
        rkey: u32,
    ) -> Result<(), Fail> {
        let addr = self.send_buf(slot).as_mut_ptr() as u64;
        // `wr.rdma`: remote_addr, then rkey.
        let rdma = [remote_addr, u64::from(rkey), 0, 0];
        self.post(
            WR_WRITE | u64::from(slot),
            addr,
            len,
            IBV_WR_RDMA_WRITE,
            0,
            rdma,
        )
    }

    fn post(
        &mut self,
        wr_id: u64,
        addr: u64,
        len: usize,
        opcode: u32,
        imm_data: u32,
        wr_union: [u64; 4],
    ) -> Result<(), Fail> {
        let mut sge = IbvSge {
            addr,
            length: len as u32,
            lkey: self.lkey,
        };
        let mut wr = IbvSendWr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: c_int::from(len > 0),
            opcode,
            send_flags: IBV_SEND_SIGNALED,
            imm_data,
            wr: wr_union,
            qp_type: 0,
            bind_mw: [0; 6],
        };
        let mut bad: *mut IbvSendWr = std::ptr::null_mut();
        let post = self.ops()[OP_POST_SEND];
        // SAFETY: the context's post_send, of verbs.h's signature; live QP and request.
        let rc = unsafe {
            std::mem::transmute::<
                Ptr,
                unsafe extern "C" fn(Ptr, *mut IbvSendWr, *mut *mut IbvSendWr) -> c_int,
            >(post)(self.qp, &mut wr, &mut bad)
        };
        match rc {
            0 => Ok(()),
            e => Err(Fail::new(e, "ibv_post_send failed")),
        }
    }

    /// The completions waiting, at most 32.
    pub fn poll(&mut self) -> Vec<Done> {
        let mut wc = [Cqe::default(); 32];
        let poll = self.ops()[OP_POLL_CQ];
        // SAFETY: the context's poll_cq, of verbs.h's signature; Cqe is `struct ibv_wc`.
        let n =
            unsafe {
                std::mem::transmute::<Ptr, unsafe extern "C" fn(Ptr, c_int, *mut Cqe) -> c_int>(
                    poll,
                )(self.cq, wc.len() as c_int, wc.as_mut_ptr())
            };
        let n = usize::try_from(n).unwrap_or(0).min(wc.len());
        wc[..n]
            .iter()
            .map(|c| {
                if c.status != IBV_WC_SUCCESS {
                    return Done::Failed(c.status);
                }
                let slot = (c.wr_id & 0xffff) as u16;
                match (c.wr_id & (0xff << 56), c.opcode) {
                    (WR_RECV, IBV_WC_RECV) => Done::Received {
                        slot,
                        len: c.byte_len as usize,
                        imm: Imm(u32::from_be(c.imm_data)),
                    },
                    (WR_SEND_DATA, _) => Done::Sent { slot: Some(slot) },
                    (WR_SEND_CONTROL, _) => Done::Sent { slot: None },
                    (WR_WRITE, _) => Done::Sent { slot: Some(slot) },
                    _ => Done::Failed(u32::MAX),
                }
            })
            .collect()
    }

    /// Registers the program's `len` bytes at `addr` (riomap) in the process's PD: writable by
    /// the peer's RDMA WRITEs when `remote_write`. Returns the MR and its rkey.
    pub fn register(addr: u64, len: usize, remote_write: bool) -> Result<(usize, u32), Fail> {
        let v = verbs()?;
        let dev = ibv::device().map_err(|why| Fail::new(libc::ENODEV, why))?;
        let access = IBV_ACCESS_LOCAL_WRITE
            | if remote_write {
                IBV_ACCESS_REMOTE_WRITE
            } else {
                0
            };
        // SAFETY: the process's PD; the range is the program's (riomap's contract); the verbs
        // library checks and registers it as for any ibv_reg_mr.
        let mr = unsafe { (v.reg_mr)(dev.pd, addr as *mut c_void, len, access) };
        if mr.is_null() {
            return Err(Fail::new(errno(), "ibv_reg_mr of the riomap range failed"));
        }
        // SAFETY: a live MR.
        let rkey = unsafe { (*mr.cast::<IbvMrHead>()).rkey };
        Ok((mr as usize, rkey))
    }

    /// Deregisters an MR of [`Conn::register`].
    pub fn deregister(mr: usize) {
        if let Ok(v) = verbs() {
            // SAFETY: an MR of ours, deregistered once (its map is gone from the tables).
            unsafe { (v.dereg_mr)(mr as Ptr) };
        }
    }

    /// Asks for a wake-up on the next completion (once per wake-up).
    pub fn arm(&mut self) -> Result<(), Fail> {
        if self.armed {
            return Ok(());
        }
        let notify = self.ops()[OP_REQ_NOTIFY_CQ];
        // SAFETY: the context's req_notify_cq, of verbs.h's signature, on a live CQ.
        let rc = unsafe {
            std::mem::transmute::<Ptr, unsafe extern "C" fn(Ptr, c_int) -> c_int>(notify)(
                self.cq, 0,
            )
        };
        if rc != 0 {
            return Err(Fail::new(rc, "ibv_req_notify_cq failed"));
        }
        self.armed = true;
        Ok(())
    }

    /// Takes the wake-up the channel's fd announced (call when it is readable).
    pub fn take_wakeup(&mut self) -> Result<(), Fail> {
        let v = verbs()?;
        let mut cq: Ptr = std::ptr::null_mut();
        let mut ctx: Ptr = std::ptr::null_mut();
        // SAFETY: a live channel; the out pointers are live.
        let rc = unsafe { (v.get_cq_event)(self.channel.cast(), &mut cq, &mut ctx) };
        if rc != 0 {
            return Err(Fail::new(
                errno(),
                "ibv_get_cq_event failed (the router went?)",
            ));
        }
        // SAFETY: the event's CQ (ours: the channel has no other).
        unsafe { (v.ack_cq_events)(cq, 1) };
        self.armed = false;
        Ok(())
    }

    /// Frees everything, the QP through its id (before the CQ it uses).
    pub fn destroy(mut self, id: Option<&mut Id>) {
        self.release(id);
    }

    fn release(&mut self, id: Option<&mut Id>) {
        let Ok(v) = verbs() else {
            return;
        };
        if let Some(id) = id {
            id.destroy_qp();
        }
        self.qp = std::ptr::null_mut();
        if !self.cq.is_null() {
            // SAFETY: our CQ, its QP gone, every event acked.
            unsafe { (v.destroy_cq)(self.cq) };
            self.cq = std::ptr::null_mut();
        }
        if !self.channel.is_null() {
            // SAFETY: our channel, after its CQ.
            unsafe { (v.destroy_comp_channel)(self.channel.cast()) };
            self.channel = std::ptr::null_mut();
        }
        if !self.mr.is_null() {
            // SAFETY: our MR.
            unsafe { (v.dereg_mr)(self.mr) };
            self.mr = std::ptr::null_mut();
        }
        if !self.region.is_null() {
            // SAFETY: our mapping, deregistered.
            unsafe { libc::munmap(self.region.cast::<c_void>(), REGION_LEN) };
            self.region = std::ptr::null_mut();
        }
    }
}

impl Drop for Conn {
    /// A Conn dropped without `destroy` (a failed setup) frees what it made; its QP, if any,
    /// goes with its id.
    fn drop(&mut self) {
        self.release(None);
    }
}
