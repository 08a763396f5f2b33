//! The software verbs engine of one shard: every verbs context (one per verbs attachment) with
//! its PD/MR table, completion channels, CQs and QPs, and the execution of work requests by
//! copying between containers' registered memory.
//!
//! Routing: all verbs attachments of a host are served by one shard (the control thread sends
//! them to shard 0), so both ends of a same-host connection live in this one engine and a work
//! request runs to completion on one thread, with no locks and no cross-shard handoff. That
//! caps RDMA mode at one router core per host for now; spreading it means handing work between
//! engines (a crossbeam queue per shard pair) or partitioning by connection.
//!
//! Where a QP's destination lives is decided at RTR from its GID (`::ffff:<overlay ip>`): a
//! container of the caller's tenant with a verbs context on this host is [`Route::Local`];
//! anything else fails the modify with ENETUNREACH. Other hosts (a router-to-router transport)
//! and a hardware backend would be further routes, resolved at the same point.
//!
//! The fast path: the shim pushes WQEs onto the QP's send and receive rings and polls the CQ's
//! ring; the engine pops send WQEs of QPs in RTS, executes each (SEND pops the responder's next
//! receive WQE), pushes CQEs and publishes each touched CQ once per pass, ringing the CQ's
//! completion channel if the program armed it. Everything read from shared memory is copied and
//! checked first (see `freeflow_proto::verbs::work`); a ring whose indices are corrupt ends the
//! attachment that owns it.
//!
//! Shared receive queues: an SRQ is a ring of receive WQEs of its own; a QP created with one
//! takes the receives of incoming messages from it (an empty SRQ is RNR, as an empty receive
//! queue is), and the keys of those receives are checked in the SRQ's protection domain. A QP
//! going to the error state flushes its send queue only: the SRQ's WQEs stay for its other
//! QPs. A resized CQ gets a new ring holding the completions not polled yet
//! (`Engine::resize_cq`).
//!
//! Semantics follow the InfiniBand RC rules as rdma-core reports them: completions in order per
//! queue; unsignaled sends complete silently unless they fail; a failed work request moves its
//! QP to the error state, and every WQE still queued there (send and receive) completes with
//! IBV_WC_WR_FLUSH_ERR. A SEND finding no receive waits the responder's RNR timer and retries
//! up to `rnr_retry` times (7: for ever); a destination QP that is missing, not ready or not
//! connected back to the sender is retried every local ACK timeout up to `retry_cnt` times, then
//! IBV_WC_RETRY_EXC_ERR. A CQ without room for a completion holds its QP back (the ring never
//! overflows); the shard then wakes every millisecond to retry.

use super::notify;
use super::{KeyGen, NumberMap, VerbsError, VerbsTable};
use freeflow_proto::control::ContainerEntry;
use freeflow_proto::fdpass;
use freeflow_proto::region::SharedRegion;
use freeflow_proto::verbs::qp::{
    check_transition, mask, CreateQp, ModifyQp, QpAttr, QpCap, QpCreated, QpQueried, QpState,
    MTU_MAX, MTU_MIN, QPT_RC,
};
use freeflow_proto::verbs::srq::{self, CreateSrq, ModifySrq, SrqAttr, SrqCreated};
use freeflow_proto::verbs::work::{RecvWqe, SendWqe, MAX_SGE};
use freeflow_proto::verbs::{
    access, limits, op, Body, CqCreated, CreateCq, DecodeError, MemoryFileMsg, ObjectHandle,
    QueueFileKind, QueueFileMsg, ResizeCq, RECV_RING, SEND_RING,
};
use freeflow_proto::{Consumer, Producer, RingError, RingGeometry, Wake};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Smallest number of slots of a queue's ring.
const MIN_RING_SLOTS: u32 = 16;
/// How often a QP held back by a full CQ retries.
pub(super) const CQ_FULL_RETRY: Duration = Duration::from_millis(1);
/// The device's one port.
const PORT: u8 = 1;

/// A simple slab: stable indices, reused after removal.
#[derive(Debug)]
pub(super) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, item: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(item);
                i
            }
            None => {
                self.items.push(Some(item));
                self.items.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) -> Option<T> {
        let item = self.items.get_mut(i)?.take();
        if item.is_some() {
            self.free.push(i);
        }
        item
    }

    pub(super) fn get(&self, i: usize) -> Option<&T> {
        self.items.get(i)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i)?.as_mut()
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter().flatten()
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.items.iter_mut().flatten()
    }
}

/// The verbs state of one attachment (one open device context).
#[derive(Debug)]
pub(super) struct Context {
    pub(super) container: ContainerEntry,
    /// The container's tenant as a number of this engine (compared on every work request).
    pub(super) tenant: u32,
    pub(super) table: VerbsTable,
    channels: NumberMap<CompChannel>,
    cqs: NumberMap<usize>,
    qps: NumberMap<usize>,
    srqs: NumberMap<usize>,
    next_handle: u32,
}

#[derive(Debug)]
struct CompChannel {
    /// The write end of the channel's pipe.
    pipe: Arc<OwnedFd>,
    cqs: u32,
}

#[derive(Debug)]
pub(super) struct Cq {
    pub(super) owner: u32,
    handle: u32,
    pub(super) ring: Producer,
    channel: u32,
    notify: Option<Arc<OwnedFd>>,
    users: u32,
    pub(super) dirty: bool,
    /// The owner wrote a corrupt index into the ring: it is no longer touched.
    pub(super) broken: bool,
    _region: SharedRegion,
}

/// A shared receive queue: receive WQEs that any QP created with it consumes.
#[derive(Debug)]
pub(super) struct Srq {
    pub(super) owner: u32,
    /// Its protection domain: the keys of its receives are checked there.
    pub(super) pd: u32,
    pub(super) ring: Consumer,
    pub(super) attr: SrqAttr,
    /// QPs created with it (destroying it is refused while there are any).
    users: u32,
    /// The owner wrote a corrupt index into the ring: it is no longer touched.
    pub(super) broken: bool,
    _region: SharedRegion,
}

/// Where a connected QP's destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// A QP of a container on this host, served by this engine.
    Local { ip: Ipv4Addr, qpn: u32 },
}

/// Why a send WQE waits, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// Not waiting: execute now.
    Ready,
    /// Receiver Not Ready: retry after the responder's RNR timer; `left` retries remain (7:
    /// for ever).
    Rnr { left: u8, deadline: Instant },
    /// The destination did not answer (missing, not ready, not connected back): retry after
    /// the local ACK timeout, `left` times.
    Transport { left: u8, deadline: Instant },
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) wqe: SendWqe,
    pub(super) wait: Wait,
}

#[derive(Debug)]
pub(super) struct Qp {
    pub(super) owner: u32,
    pub(super) qpn: u32,
    pub(super) pd: u32,
    pub(super) send_cq: usize,
    pub(super) recv_cq: usize,
    pub(super) state: QpState,
    pub(super) attr: QpAttr,
    pub(super) cap: QpCap,
    pub(super) sq_sig_all: bool,
    pub(super) sq: Consumer,
    /// The QP's own receive queue; unused (never read) when it has an SRQ.
    pub(super) rq: Consumer,
    /// The SRQ it takes its receives from instead of `rq`.
    pub(super) srq: Option<usize>,
    /// The router's copy of the send WQE being executed (its inline data stays here while it
    /// waits).
    pub(super) sq_slot: Vec<u8>,
    pub(super) rq_slot: Vec<u8>,
    pub(super) pending: Option<Pending>,
    pub(super) route: Option<Route>,
    /// The owner wrote a corrupt index into a ring: the QP is no longer touched.
    pub(super) broken: bool,
    /// In the error state: flushing stopped at a full CQ; retry then.
    pub(super) held: Option<Instant>,
    _region: SharedRegion,
}

/// What the shard should do about parking.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParkPlan {
    /// A queue has work: do not park.
    pub busy: bool,
    /// Wake up by then (a retry timer), even if nothing rings.
    pub deadline: Option<Instant>,
}

/// What a context held when it closed (for the detach log line).
#[derive(Debug, Default, Clone, Copy)]
pub struct Held {
    pub pds: usize,
    pub mrs: usize,
    pub cqs: usize,
    pub qps: usize,
}

/// The verbs engine of one shard.
#[derive(Debug)]
pub struct Engine {
    pub(super) contexts: NumberMap<Context>,
    pub(super) cqs: Slab<Cq>,
    pub(super) qps: Slab<Qp>,
    pub(super) srqs: Slab<Srq>,
    /// Virtual QP number to QP, for every QP of this engine.
    qpns: NumberMap<usize>,
    qpn_keys: KeyGen,
    /// Tenant names to the numbers contexts carry.
    tenants: std::collections::HashMap<String, u32>,
    test_hooks: bool,
    /// CQs with entries pushed and not yet published.
    pub(super) dirty: Vec<usize>,
    /// Attachments that broke a ring (to be detached by the shard), with the reason.
    pub(super) broken: Vec<(u32, String)>,
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(super::test_hooks_enabled())
    }
}

/// `enum ibv_qp_attr_mask` bits whose attributes this device does not model.
const UNSUPPORTED_MASK: u32 = mask::ALT_PATH | mask::EN_SQD_ASYNC_NOTIFY | mask::RATE_LIMIT;

fn ring_slots(wanted: u32) -> u32 {
    wanted.max(MIN_RING_SLOTS).next_power_of_two()
}

fn slot_size(bytes: usize) -> u32 {
    (bytes.max(64) as u32).next_multiple_of(64)
}

/// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
fn gid_ipv4(gid: &[u8; 16]) -> Option<Ipv4Addr> {
    if gid[..10].iter().all(|b| *b == 0) && gid[10] == 0xff && gid[11] == 0xff {
        Some(Ipv4Addr::new(gid[12], gid[13], gid[14], gid[15]))
    } else {
        None
    }
}

/// The RNR NAK timer of the InfiniBand specification (encoded 0..=31), in nanoseconds.
pub(super) fn rnr_timer(code: u8) -> Duration {
    const MICROS_X100: [u64; 32] = [
        65536, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
        1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152,
    ];
    Duration::from_micros(MICROS_X100[usize::from(code & 31)] * 10)
}

/// The local ACK timeout (4.096 µs × 2^timeout); 0 means infinite, which retries every
/// millisecond here without ever giving up.
pub(super) fn ack_timeout(code: u8) -> Option<Duration> {
    if code == 0 {
        return None;
    }
    Some(Duration::from_nanos(4096u64 << code.min(31)))
}

impl Engine {
    pub fn new(test_hooks: bool) -> Engine {
        Engine {
            contexts: NumberMap::default(),
            cqs: Slab::default(),
            qps: Slab::default(),
            srqs: Slab::default(),
            qpns: NumberMap::default(),
            qpn_keys: KeyGen::new(),
            tenants: std::collections::HashMap::new(),
            test_hooks,
            dirty: Vec::new(),
            broken: Vec::new(),
        }
    }

    /// A verbs attachment arrived: it gets an empty context.
    pub fn open(&mut self, attachment: u32, container: ContainerEntry) {
        let next = self.tenants.len() as u32;
        let tenant = *self.tenants.entry(container.tenant.clone()).or_insert(next);
        self.contexts.insert(
            attachment,
            Context {
                container,
                tenant,
                table: VerbsTable::new(self.test_hooks),
                channels: NumberMap::default(),
                cqs: NumberMap::default(),
                qps: NumberMap::default(),
                srqs: NumberMap::default(),
                next_handle: 0,
            },
        );
    }

    /// An attachment went: everything of its context goes (peers connected to its QPs see
    /// their destination gone, as if the remote host had died).
    pub fn close(&mut self, attachment: u32) -> Option<Held> {
        let ctx = self.contexts.remove(&attachment)?;
        let held = Held {
            pds: ctx.table.pd_count(),
            mrs: ctx.table.mr_count(),
            cqs: ctx.cqs.len(),
            qps: ctx.qps.len(),
        };
        for &i in ctx.qps.values() {
            if let Some(qp) = self.qps.remove(i) {
                self.qpns.remove(&qp.qpn);
            }
        }
        for &i in ctx.cqs.values() {
            self.cqs.remove(i);
        }
        for &i in ctx.srqs.values() {
            self.srqs.remove(i);
        }
        self.dirty.retain(|&i| self.cqs.get(i).is_some());
        Some(held)
    }

    pub fn has_memory_file(&self, attachment: u32) -> bool {
        self.contexts
            .get(&attachment)
            .is_some_and(|c| c.table.has_memory_file())
    }

    pub fn adopt_memory_file(
        &mut self,
        attachment: u32,
        msg: MemoryFileMsg,
        fd: OwnedFd,
    ) -> Result<(), VerbsError> {
        self.contexts
            .get_mut(&attachment)
            .ok_or(VerbsError::NoSuchObject("context", attachment))?
            .table
            .adopt_memory_file(msg, fd)
    }

    /// Attachments whose rings broke since the last call (the shard detaches them).
    pub fn take_broken(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.broken)
    }

    pub(super) fn break_owner(&mut self, owner: u32, e: RingError) {
        if !self.broken.iter().any(|(id, _)| *id == owner) {
            self.broken
                .push((owner, format!("verbs queue protocol violation: {e}")));
        }
    }

    /// Serves one verbs request of `attachment`, whose attach connection is `conn` (queue files
    /// go there). Writes the reply body into `reply`; returns its status and length.
    pub fn serve(
        &mut self,
        attachment: u32,
        conn: BorrowedFd<'_>,
        opcode: u16,
        body: &[u8],
        reply: &mut [u8],
    ) -> (u16, usize) {
        match self.serve_inner(attachment, conn, opcode, body, reply) {
            Ok(len) => (freeflow_proto::msg::status::OK, len),
            Err(e) => (e.status(), 0),
        }
    }

    fn serve_inner(
        &mut self,
        attachment: u32,
        conn: BorrowedFd<'_>,
        opcode: u16,
        body: &[u8],
        reply: &mut [u8],
    ) -> Result<usize, VerbsError> {
        if !self.contexts.contains_key(&attachment) {
            return Err(VerbsError::NoSuchObject("context", attachment));
        }
        match opcode {
            op::CREATE_COMP_CHANNEL => {
                if !body.is_empty() {
                    return Err(DecodeError::Length {
                        what: "CreateCompChannel",
                        got: body.len(),
                        expected: 0,
                    }
                    .into());
                }
                let handle = self.create_channel(attachment, conn)?;
                Ok(ObjectHandle { handle }.encode(reply))
            }
            op::DESTROY_COMP_CHANNEL => {
                let r = ObjectHandle::decode(body)?;
                self.destroy_channel(attachment, r.handle)?;
                Ok(0)
            }
            op::CREATE_CQ => {
                let r = CreateCq::decode(body)?;
                Ok(self.create_cq(attachment, conn, &r)?.encode(reply))
            }
            op::DESTROY_CQ => {
                let r = ObjectHandle::decode(body)?;
                self.destroy_cq(attachment, r.handle)?;
                Ok(0)
            }
            op::RESIZE_CQ => {
                let r = ResizeCq::decode(body)?;
                Ok(self.resize_cq(attachment, conn, &r)?.encode(reply))
            }
            op::CREATE_QP => {
                let r = CreateQp::decode(body)?;
                Ok(self.create_qp(attachment, conn, &r)?.encode(reply))
            }
            op::MODIFY_QP => {
                let r = ModifyQp::decode(body)?;
                let state = self.modify_qp(attachment, &r)?;
                Ok(ObjectHandle {
                    handle: state as u32,
                }
                .encode(reply))
            }
            op::QUERY_QP => {
                let r = ObjectHandle::decode(body)?;
                Ok(self.query_qp(attachment, r.handle)?.encode(reply))
            }
            op::DESTROY_QP => {
                let r = ObjectHandle::decode(body)?;
                self.destroy_qp(attachment, r.handle)?;
                Ok(0)
            }
            op::CREATE_SRQ => {
                let r = CreateSrq::decode(body)?;
                Ok(self.create_srq(attachment, conn, &r)?.encode(reply))
            }
            op::MODIFY_SRQ => {
                let r = ModifySrq::decode(body)?;
                self.modify_srq(attachment, &r)?;
                Ok(0)
            }
            op::QUERY_SRQ => {
                let r = ObjectHandle::decode(body)?;
                let index = self.srq_index(attachment, r.handle)?;
                Ok(self
                    .srqs
                    .get(index)
                    .expect("tables agree")
                    .attr
                    .encode(reply))
            }
            op::DESTROY_SRQ => {
                let r = ObjectHandle::decode(body)?;
                self.destroy_srq(attachment, r.handle)?;
                Ok(0)
            }
            _ => {
                let ctx = self.contexts.get_mut(&attachment).expect("checked above");
                ctx.table.serve_inner(opcode, body, reply)
            }
        }
    }

    fn context(&mut self, attachment: u32) -> Result<&mut Context, VerbsError> {
        self.contexts
            .get_mut(&attachment)
            .ok_or(VerbsError::NoSuchObject("context", attachment))
    }

    fn new_handle(ctx: &mut Context) -> u32 {
        loop {
            ctx.next_handle = ctx.next_handle.wrapping_add(1);
            let h = ctx.next_handle;
            if h != 0
                && !ctx.channels.contains_key(&h)
                && !ctx.cqs.contains_key(&h)
                && !ctx.qps.contains_key(&h)
                && !ctx.srqs.contains_key(&h)
            {
                return h;
            }
        }
    }

    fn pass_file(
        conn: BorrowedFd<'_>,
        kind: QueueFileKind,
        handle: u32,
        fd: BorrowedFd<'_>,
    ) -> Result<(), VerbsError> {
        let msg = QueueFileMsg { kind, handle }.encode();
        fdpass::try_send_with_fds(conn, &msg, &[fd]).map_err(VerbsError::PassFile)?;
        Ok(())
    }

    fn create_channel(&mut self, attachment: u32, conn: BorrowedFd<'_>) -> Result<u32, VerbsError> {
        let ctx = self.context(attachment)?;
        if ctx.channels.len() >= limits::MAX_COMP_CHANNELS as usize {
            return Err(VerbsError::Limit("completion channels"));
        }
        let (read, write) = notify::channel_pipe().map_err(VerbsError::PassFile)?;
        let handle = Self::new_handle(ctx);
        Self::pass_file(conn, QueueFileKind::Channel, handle, read.as_fd())?;
        ctx.channels.insert(
            handle,
            CompChannel {
                pipe: Arc::new(write),
                cqs: 0,
            },
        );
        Ok(handle)
    }

    fn destroy_channel(&mut self, attachment: u32, handle: u32) -> Result<(), VerbsError> {
        let ctx = self.context(attachment)?;
        let ch = ctx
            .channels
            .get(&handle)
            .ok_or(VerbsError::NoSuchObject("completion channel", handle))?;
        if ch.cqs > 0 {
            return Err(VerbsError::ObjectBusy("completion channel", handle));
        }
        ctx.channels.remove(&handle);
        Ok(())
    }

    fn create_cq(
        &mut self,
        attachment: u32,
        conn: BorrowedFd<'_>,
        r: &CreateCq,
    ) -> Result<CqCreated, VerbsError> {
        let ctx = self
            .contexts
            .get_mut(&attachment)
            .expect("checked by serve");
        if r.cqe == 0 || r.cqe > limits::MAX_CQE {
            return Err(VerbsError::Invalid("cqe out of range"));
        }
        if r.comp_vector != 0 {
            return Err(VerbsError::Invalid("the device has one completion vector"));
        }
        if ctx.cqs.len() >= limits::MAX_CQ as usize {
            return Err(VerbsError::Limit("completion queues"));
        }
        let notify = match r.channel {
            0 => None,
            h => Some(
                ctx.channels
                    .get(&h)
                    .ok_or(VerbsError::NoSuchObject("completion channel", h))?
                    .pipe
                    .clone(),
            ),
        };
        let geometry = RingGeometry {
            slot_size: 64,
            slot_count: ring_slots(r.cqe),
        }
        .validate()
        .map_err(|_| VerbsError::Invalid("cqe out of range"))?;
        let (region, memfd) = SharedRegion::create("freeflow-cq", &[geometry])?;
        let ring = Producer::new(region.ring(0)?);
        let handle = Self::new_handle(ctx);
        Self::pass_file(conn, QueueFileKind::Cq, handle, memfd.as_fd())?;
        if r.channel != 0 {
            ctx.channels.get_mut(&r.channel).expect("found above").cqs += 1;
        }
        let index = self.cqs.insert(Cq {
            owner: attachment,
            handle,
            ring,
            channel: r.channel,
            notify,
            users: 0,
            dirty: false,
            broken: false,
            _region: region,
        });
        ctx.cqs.insert(handle, index);
        Ok(CqCreated {
            cq: handle,
            cqe: geometry.slot_count,
        })
    }

    fn destroy_cq(&mut self, attachment: u32, handle: u32) -> Result<(), VerbsError> {
        let ctx = self
            .contexts
            .get_mut(&attachment)
            .expect("checked by serve");
        let &index = ctx
            .cqs
            .get(&handle)
            .ok_or(VerbsError::NoSuchObject("completion queue", handle))?;
        let cq = self.cqs.get(index).expect("tables agree");
        if cq.users > 0 {
            return Err(VerbsError::ObjectBusy("completion queue", handle));
        }
        if let Some(ch) = ctx.channels.get_mut(&cq.channel) {
            ch.cqs -= 1;
        }
        ctx.cqs.remove(&handle);
        self.cqs.remove(index);
        self.dirty.retain(|&i| i != index);
        Ok(())
    }

    /// `ibv_resize_cq`: a new ring of at least `cqe` entries replaces the CQ's ring, holding
    /// the completions the program has not polled yet, in order (at the start of the new
    /// ring). Nothing is produced between the copy and the switch: this shard is the only
    /// producer and serves the request between two passes. Entries pushed but not published
    /// are published first (so an armed CQ is notified of them as at any publish), and a
    /// request for notification still pending on the old ring is carried over to the new one.
    /// Fewer entries than the completions in the CQ is EINVAL, and the CQ stays as it was.
    ///
    /// The count of completions relies on the shim: it holds the CQ's lock across the call,
    /// so the consumer's head is published and stands still. A shim that polls meanwhile only
    /// sees its own completions twice.
    fn resize_cq(
        &mut self,
        attachment: u32,
        conn: BorrowedFd<'_>,
        r: &ResizeCq,
    ) -> Result<CqCreated, VerbsError> {
        let ctx = self
            .contexts
            .get_mut(&attachment)
            .expect("checked by serve");
        let &index = ctx
            .cqs
            .get(&r.cq)
            .ok_or(VerbsError::NoSuchObject("completion queue", r.cq))?;
        if r.cqe == 0 || r.cqe > limits::MAX_CQE {
            return Err(VerbsError::Invalid("cqe out of range"));
        }
        let cq = self.cqs.get_mut(index).expect("tables agree");
        if cq.broken {
            return Err(VerbsError::Invalid("the CQ's ring is broken"));
        }
        if cq.ring.publish() == Wake::Needed {
            if let Some(pipe) = &cq.notify {
                notify::notify(pipe, cq.handle);
            }
        }
        let pending = match cq.ring.unconsumed() {
            Ok(n) => n,
            Err(e) => {
                cq.broken = true;
                let owner = cq.owner;
                self.break_owner(owner, e);
                return Err(VerbsError::Invalid("the CQ's ring is broken"));
            }
        };
        if pending > r.cqe {
            return Err(VerbsError::Invalid(
                "fewer entries than the completions in the CQ",
            ));
        }
        let geometry = RingGeometry {
            slot_size: 64,
            slot_count: ring_slots(r.cqe),
        }
        .validate()
        .map_err(|_| VerbsError::Invalid("cqe out of range"))?;
        let (region, memfd) = SharedRegion::create("freeflow-cq", &[geometry])?;
        let mut ring = Producer::new(region.ring(0)?);
        let mut slot = [0u8; 64];
        for n in 0..pending {
            let copied = cq.ring.read_unconsumed(n, &mut slot);
            let pushed = matches!(ring.push(&slot), Ok(true));
            debug_assert!(copied && pushed, "the new ring holds every pending entry");
        }
        // The new ring's consumer is not parked: this publish wakes nobody.
        let _ = ring.publish();
        if cq.ring.consumer_parked() {
            ring.raise_parked();
        }
        Self::pass_file(conn, QueueFileKind::Cq, r.cq, memfd.as_fd())?;
        cq.ring = ring;
        cq._region = region;
        Ok(CqCreated {
            cq: r.cq,
            cqe: geometry.slot_count,
        })
    }

    /// A QP number in neither this engine's table nor the reserved range (QP0, QP1), 24 bits.
    fn new_qpn(&mut self) -> u32 {
        loop {
            let n = self.qpn_keys.next() & 0x00ff_ffff;
            if n > 1 && !self.qpns.contains_key(&n) {
                return n;
            }
        }
    }

    fn create_qp(
        &mut self,
        attachment: u32,
        conn: BorrowedFd<'_>,
        r: &CreateQp,
    ) -> Result<QpCreated, VerbsError> {
        if r.qp_type != QPT_RC {
            return Err(VerbsError::NotSupported("only RC queue pairs"));
        }
        let mut c = r.cap;
        if c.max_send_wr > limits::MAX_QP_WR
            || c.max_recv_wr > limits::MAX_QP_WR
            || c.max_send_sge > limits::MAX_SGE
            || c.max_recv_sge > limits::MAX_SGE
            || c.max_inline_data > limits::MAX_INLINE_DATA
        {
            return Err(VerbsError::Invalid("capacity beyond the device's limits"));
        }
        let qpn = self.new_qpn();
        let ctx = self
            .contexts
            .get_mut(&attachment)
            .expect("checked by serve");
        if ctx.qps.len() >= limits::MAX_QP as usize {
            return Err(VerbsError::Limit("queue pairs"));
        }
        let send_cq = *ctx
            .cqs
            .get(&r.send_cq)
            .ok_or(VerbsError::NoSuchObject("completion queue", r.send_cq))?;
        let recv_cq = *ctx
            .cqs
            .get(&r.recv_cq)
            .ok_or(VerbsError::NoSuchObject("completion queue", r.recv_cq))?;
        // With an SRQ the receive capacities are ignored (rdma-core): the QP's own receive
        // ring is the smallest one and stays unused; its receive slot copy is the SRQ's size.
        let srq = match r.srq {
            0 => None,
            h => Some(
                *ctx.srqs
                    .get(&h)
                    .ok_or(VerbsError::NoSuchObject("shared receive queue", h))?,
            ),
        };
        if srq.is_some() {
            c.max_recv_wr = 0;
            c.max_recv_sge = 0;
        }
        ctx.table.hold_pd(r.pd)?;
        // Every slot holds the largest WQE the capacities allow; what the slot has room for
        // beyond that is granted too (a device reports at least what was asked).
        let send_slot = slot_size(SendWqe::slot_bytes(
            c.max_send_sge.max(1),
            c.max_inline_data,
        ));
        let recv_slot = slot_size(RecvWqe::slot_bytes(c.max_recv_sge.max(1)));
        let send = RingGeometry {
            slot_size: send_slot,
            slot_count: ring_slots(c.max_send_wr),
        };
        let recv = RingGeometry {
            slot_size: recv_slot,
            slot_count: ring_slots(c.max_recv_wr),
        };
        let cap = QpCap {
            max_send_wr: send.slot_count,
            max_recv_wr: if srq.is_some() { 0 } else { recv.slot_count },
            max_send_sge: ((send_slot as usize - SendWqe::slot_bytes(0, 0)) / 16)
                .min(MAX_SGE as usize) as u32,
            max_recv_sge: if srq.is_some() {
                0
            } else {
                ((recv_slot as usize - RecvWqe::slot_bytes(0)) / 16).min(MAX_SGE as usize) as u32
            },
            max_inline_data: (send_slot - SendWqe::slot_bytes(0, 0) as u32)
                .min(limits::MAX_INLINE_DATA),
        };
        let made = (|| {
            let (region, memfd) = SharedRegion::create("freeflow-qp", &[send, recv])?;
            let sq = Consumer::new(region.ring(SEND_RING)?);
            let rq = Consumer::new(region.ring(RECV_RING)?);
            Ok::<_, VerbsError>((region, memfd, sq, rq))
        })();
        let (region, memfd, sq, rq) = match made {
            Ok(parts) => parts,
            Err(e) => {
                ctx.table.release_pd(r.pd);
                return Err(e);
            }
        };
        let handle = Self::new_handle(ctx);
        if let Err(e) = Self::pass_file(conn, QueueFileKind::Qp, handle, memfd.as_fd()) {
            ctx.table.release_pd(r.pd);
            return Err(e);
        }
        let rq_slot = match srq {
            Some(i) => self.srqs.get(i).expect("tables agree").ring.slot_size(),
            None => recv_slot as usize,
        };
        let index = self.qps.insert(Qp {
            owner: attachment,
            qpn,
            pd: r.pd,
            send_cq,
            recv_cq,
            state: QpState::Reset,
            attr: QpAttr {
                cap,
                ..QpAttr::default()
            },
            cap,
            sq_sig_all: r.sq_sig_all != 0,
            sq,
            rq,
            srq,
            sq_slot: vec![0; send_slot as usize],
            rq_slot: vec![0; rq_slot],
            pending: None,
            route: None,
            broken: false,
            held: None,
            _region: region,
        });
        ctx.qps.insert(handle, index);
        self.qpns.insert(qpn, index);
        for cq in [send_cq, recv_cq] {
            self.cqs.get_mut(cq).expect("tables agree").users += 1;
        }
        if let Some(i) = srq {
            self.srqs.get_mut(i).expect("tables agree").users += 1;
        }
        Ok(QpCreated {
            qp: handle,
            qpn,
            cap,
        })
    }

    fn qp_index(&self, attachment: u32, handle: u32) -> Result<usize, VerbsError> {
        self.contexts
            .get(&attachment)
            .and_then(|c| c.qps.get(&handle))
            .copied()
            .ok_or(VerbsError::NoSuchObject("queue pair", handle))
    }

    /// Checks the values of the attributes `attr_mask` names, as the kernel and a device check
    /// them (EINVAL), and what this device does not do (EOPNOTSUPP).
    fn check_values(attr_mask: u32, a: &QpAttr) -> Result<(), VerbsError> {
        let bad = |why| Err(VerbsError::Invalid(why));
        if attr_mask & UNSUPPORTED_MASK != 0 {
            return Err(VerbsError::NotSupported(
                "alternate paths, SQD notifications and rate limits",
            ));
        }
        let has = |bit| attr_mask & bit != 0;
        if has(mask::ACCESS_FLAGS)
            && a.qp_access_flags
                & !(access::LOCAL_WRITE
                    | access::REMOTE_WRITE
                    | access::REMOTE_READ
                    | access::REMOTE_ATOMIC)
                != 0
        {
            return bad("unknown QP access flags");
        }
        if has(mask::PKEY_INDEX) && a.pkey_index != 0 {
            return bad("the P_Key table has one entry");
        }
        if has(mask::PORT) && a.port_num != PORT {
            return bad("the device has port 1 only");
        }
        if has(mask::PATH_MTU) && !(MTU_MIN..=MTU_MAX).contains(&a.path_mtu) {
            return bad("path MTU out of range");
        }
        if has(mask::DEST_QPN) && a.dest_qp_num > 0x00ff_ffff {
            return bad("destination QP number wider than 24 bits");
        }
        if (has(mask::RQ_PSN) && a.rq_psn > 0x00ff_ffff)
            || (has(mask::SQ_PSN) && a.sq_psn > 0x00ff_ffff)
        {
            return bad("packet sequence number wider than 24 bits");
        }
        if (has(mask::MAX_DEST_RD_ATOMIC)
            && u32::from(a.max_dest_rd_atomic) > limits::MAX_QP_RD_ATOM)
            || (has(mask::MAX_QP_RD_ATOMIC) && u32::from(a.max_rd_atomic) > limits::MAX_QP_RD_ATOM)
        {
            return bad("more outstanding reads and atomics than the device allows");
        }
        if has(mask::MIN_RNR_TIMER) && a.min_rnr_timer > 31 {
            return bad("min_rnr_timer out of range");
        }
        if has(mask::TIMEOUT) && a.timeout > 31 {
            return bad("timeout out of range");
        }
        if (has(mask::RETRY_CNT) && a.retry_cnt > 7) || (has(mask::RNR_RETRY) && a.rnr_retry > 7) {
            return bad("retry counts go up to 7");
        }
        if has(mask::AV) {
            if a.is_global == 0 {
                return bad("a RoCE address needs the GRH (is_global) with the destination GID");
            }
            if a.sgid_index != 0 {
                return bad("the GID table has one entry");
            }
            if a.ah_port_num > 1 {
                return bad("the device has port 1 only");
            }
        }
        Ok(())
    }

    /// Where the GID of a QP's destination leads: a container of the caller's tenant with a
    /// verbs context here. Other hosts are not reachable yet.
    fn route(&self, attachment: u32, dgid: &[u8; 16], dest_qpn: u32) -> Result<Route, VerbsError> {
        let caller = &self.contexts.get(&attachment).expect("checked").container;
        let ip = gid_ipv4(dgid).ok_or_else(|| {
            VerbsError::Unreachable("the destination GID is not an IPv4-mapped address".into())
        })?;
        let local = self
            .contexts
            .values()
            .any(|c| c.container.ip == ip && c.container.tenant == caller.tenant);
        if local {
            Ok(Route::Local { ip, qpn: dest_qpn })
        } else {
            Err(VerbsError::Unreachable(format!(
                "{ip} is no container of tenant {} with RDMA on this host (RDMA to other hosts is not implemented yet)",
                caller.tenant
            )))
        }
    }

    fn modify_qp(&mut self, attachment: u32, r: &ModifyQp) -> Result<QpState, VerbsError> {
        let index = self.qp_index(attachment, r.qp)?;
        let current = self.qps.get(index).expect("tables agree").state;
        let next = check_transition(current, r.attr_mask, &r.attr)?;
        Self::check_values(r.attr_mask, &r.attr)?;
        if matches!(next, QpState::Sqd | QpState::Sqe) {
            return Err(VerbsError::NotSupported("the SQD and SQE states"));
        }
        let route = if r.attr_mask & mask::AV != 0 {
            Some(self.route(attachment, &r.attr.dgid, r.attr.dest_qp_num)?)
        } else {
            None
        };
        let qp = self.qps.get_mut(index).expect("tables agree");
        let a = &r.attr;
        let m = r.attr_mask;
        let t = &mut qp.attr;
        macro_rules! take {
            ($bit:expr, $($field:ident),+) => {
                if m & $bit != 0 { $(t.$field = a.$field;)+ }
            };
        }
        take!(mask::ACCESS_FLAGS, qp_access_flags);
        take!(mask::PKEY_INDEX, pkey_index);
        take!(mask::PORT, port_num);
        take!(
            mask::AV,
            dgid,
            flow_label,
            sgid_index,
            hop_limit,
            traffic_class,
            is_global,
            dlid,
            sl,
            src_path_bits,
            static_rate,
            ah_port_num
        );
        take!(mask::PATH_MTU, path_mtu);
        take!(mask::TIMEOUT, timeout);
        take!(mask::RETRY_CNT, retry_cnt);
        take!(mask::RNR_RETRY, rnr_retry);
        take!(mask::RQ_PSN, rq_psn);
        take!(mask::SQ_PSN, sq_psn);
        take!(mask::MAX_QP_RD_ATOMIC, max_rd_atomic);
        take!(mask::MAX_DEST_RD_ATOMIC, max_dest_rd_atomic);
        take!(mask::MIN_RNR_TIMER, min_rnr_timer);
        take!(mask::PATH_MIG_STATE, path_mig_state);
        take!(mask::DEST_QPN, dest_qp_num);
        if let Some(route) = route {
            qp.route = Some(route);
        }
        if let (Some(Route::Local { ip, .. }), true) = (qp.route, m & mask::DEST_QPN != 0) {
            qp.route = Some(Route::Local {
                ip,
                qpn: a.dest_qp_num,
            });
        }
        match next {
            QpState::Reset => {
                // A reset QP forgets its queues without completions, and its connection.
                qp.pending = None;
                qp.route = None;
                let owner = qp.owner;
                let drained = drain(&mut qp.sq, &mut qp.sq_slot)
                    .and_then(|()| drain(&mut qp.rq, &mut qp.rq_slot));
                qp.attr = QpAttr {
                    cap: qp.cap,
                    ..QpAttr::default()
                };
                qp.state = QpState::Reset;
                qp.held = None;
                if let Err(e) = drained {
                    qp.broken = true;
                    self.break_owner(owner, e);
                }
            }
            other => qp.state = other,
        }
        Ok(next)
    }

    fn query_qp(&self, attachment: u32, handle: u32) -> Result<QpQueried, VerbsError> {
        let index = self.qp_index(attachment, handle)?;
        let qp = self.qps.get(index).expect("tables agree");
        let mut attr = qp.attr;
        attr.qp_state = qp.state as u8;
        attr.cur_qp_state = qp.state as u8;
        attr.cap = qp.cap;
        Ok(QpQueried {
            attr,
            sq_sig_all: u32::from(qp.sq_sig_all),
        })
    }

    fn destroy_qp(&mut self, attachment: u32, handle: u32) -> Result<(), VerbsError> {
        let index = self.qp_index(attachment, handle)?;
        let qp = self.qps.remove(index).expect("tables agree");
        self.qpns.remove(&qp.qpn);
        for cq in [qp.send_cq, qp.recv_cq] {
            if let Some(cq) = self.cqs.get_mut(cq) {
                cq.users -= 1;
            }
        }
        if let Some(srq) = qp.srq.and_then(|i| self.srqs.get_mut(i)) {
            srq.users -= 1;
        }
        let ctx = self.contexts.get_mut(&attachment).expect("checked");
        ctx.qps.remove(&handle);
        ctx.table.release_pd(qp.pd);
        Ok(())
    }

    fn srq_index(&self, attachment: u32, handle: u32) -> Result<usize, VerbsError> {
        self.contexts
            .get(&attachment)
            .and_then(|c| c.srqs.get(&handle))
            .copied()
            .ok_or(VerbsError::NoSuchObject("shared receive queue", handle))
    }

    /// `ibv_create_srq`: a ring of at least `max_wr` receive slots of `max_sge` entries in the
    /// caller's PD (held, like a QP holds it). A zero `max_wr` is EINVAL; `max_sge` 0 gets 1.
    fn create_srq(
        &mut self,
        attachment: u32,
        conn: BorrowedFd<'_>,
        r: &CreateSrq,
    ) -> Result<SrqCreated, VerbsError> {
        if r.max_wr == 0 || r.max_wr > limits::MAX_SRQ_WR || r.max_sge > limits::MAX_SRQ_SGE {
            return Err(VerbsError::Invalid("SRQ capacity out of range"));
        }
        let ctx = self
            .contexts
            .get_mut(&attachment)
            .expect("checked by serve");
        if ctx.srqs.len() >= limits::MAX_SRQ as usize {
            return Err(VerbsError::Limit("shared receive queues"));
        }
        ctx.table.hold_pd(r.pd)?;
        let slot = slot_size(RecvWqe::slot_bytes(r.max_sge.max(1)));
        let geometry = RingGeometry {
            slot_size: slot,
            slot_count: ring_slots(r.max_wr),
        };
        let made = (|| {
            let (region, memfd) = SharedRegion::create("freeflow-srq", &[geometry])?;
            let ring = Consumer::new(region.ring(0)?);
            Ok::<_, VerbsError>((region, memfd, ring))
        })();
        let (region, memfd, ring) = match made {
            Ok(parts) => parts,
            Err(e) => {
                ctx.table.release_pd(r.pd);
                return Err(e);
            }
        };
        let handle = Self::new_handle(ctx);
        if let Err(e) = Self::pass_file(conn, QueueFileKind::Srq, handle, memfd.as_fd()) {
            ctx.table.release_pd(r.pd);
            return Err(e);
        }
        let attr = SrqAttr {
            max_wr: geometry.slot_count,
            max_sge: ((slot as usize - RecvWqe::slot_bytes(0)) / 16).min(MAX_SGE as usize) as u32,
            srq_limit: 0,
        };
        let index = self.srqs.insert(Srq {
            owner: attachment,
            pd: r.pd,
            ring,
            attr,
            users: 0,
            broken: false,
            _region: region,
        });
        ctx.srqs.insert(handle, index);
        Ok(SrqCreated { srq: handle, attr })
    }

    /// `ibv_modify_srq`. Resizing (IBV_SRQ_MAX_WR) is refused as by a device without
    /// IBV_DEVICE_SRQ_RESIZE (EINVAL). Arming the limit (IBV_SRQ_LIMIT) would need the
    /// asynchronous event IBV_EVENT_SRQ_LIMIT_REACHED, which this device does not deliver yet:
    /// a limit of 0 (disarmed, what the SRQ has) is accepted, any other is EOPNOTSUPP (EINVAL
    /// first if it exceeds `max_wr`, as a device checks).
    fn modify_srq(&mut self, attachment: u32, r: &ModifySrq) -> Result<(), VerbsError> {
        let index = self.srq_index(attachment, r.srq)?;
        let attr = self.srqs.get(index).expect("tables agree").attr;
        if r.attr_mask & !srq::mask::KNOWN != 0 {
            return Err(VerbsError::Invalid("unknown SRQ attribute mask bits"));
        }
        if r.attr_mask & srq::mask::MAX_WR != 0 {
            return Err(VerbsError::Invalid("the device cannot resize an SRQ"));
        }
        if r.attr_mask & srq::mask::LIMIT != 0 {
            if r.srq_limit > attr.max_wr {
                return Err(VerbsError::Invalid("SRQ limit beyond max_wr"));
            }
            if r.srq_limit != 0 {
                return Err(VerbsError::NotSupported(
                    "SRQ limit events (no asynchronous events yet)",
                ));
            }
        }
        Ok(())
    }

    fn destroy_srq(&mut self, attachment: u32, handle: u32) -> Result<(), VerbsError> {
        let index = self.srq_index(attachment, handle)?;
        let srq = self.srqs.get(index).expect("tables agree");
        if srq.users > 0 {
            return Err(VerbsError::ObjectBusy("shared receive queue", handle));
        }
        let srq = self.srqs.remove(index).expect("tables agree");
        let ctx = self.contexts.get_mut(&attachment).expect("checked");
        ctx.srqs.remove(&handle);
        ctx.table.release_pd(srq.pd);
        Ok(())
    }

    /// The QP with virtual number `qpn`.
    pub(super) fn qp_by_number(&self, qpn: u32) -> Option<usize> {
        self.qpns.get(&qpn).copied()
    }

    /// One pass over every QP: executes send WQEs of QPs in RTS, flushes QPs in the error
    /// state, then publishes the CQs that got entries (ringing armed ones' channels). Returns
    /// how much work was done.
    pub fn poll(&mut self) -> usize {
        let mut work = 0;
        let mut now = None;
        for index in 0..self.qps.len() {
            let Some(qp) = self.qps.get(index) else {
                continue;
            };
            if qp.broken {
                continue;
            }
            match qp.state {
                QpState::Rts => work += self.run_send_queue(index, &mut now),
                QpState::Err => work += self.flush(index, &mut now),
                _ => {}
            }
        }
        self.publish();
        work
    }

    /// Publishes every CQ with new entries once; a program that armed the CQ
    /// (`ibv_req_notify_cq`) gets the CQ's handle on its completion channel.
    pub(super) fn publish(&mut self) {
        while let Some(index) = self.dirty.pop() {
            let Some(cq) = self.cqs.get_mut(index) else {
                continue;
            };
            cq.dirty = false;
            if cq.ring.publish() == Wake::Needed {
                if let Some(pipe) = &cq.notify {
                    notify::notify(pipe, cq.handle);
                }
            }
        }
    }

    /// Raises the parked flag on every queue the engine would act on when something is posted:
    /// the send rings of QPs in RTS that are not waiting, both rings of QPs in the error state,
    /// and the receive rings of responders a SEND waits on (RNR). Other receive rings stay
    /// unflagged: a posted receive needs no action until a SEND arrives. Waits (RNR and
    /// transport timers, full CQs) set the deadline of the park.
    pub fn prepare_park(&mut self) -> ParkPlan {
        let mut plan = ParkPlan::default();
        let mut broken = Vec::new();
        let mut rnr_peers = Vec::new();
        for qp in self.qps.iter_mut() {
            if qp.broken {
                continue;
            }
            let result = match (qp.state, &qp.pending) {
                (QpState::Rts, None) => qp.sq.prepare_park(),
                (QpState::Rts | QpState::Err, _) if qp.held.is_some() => {
                    let deadline = qp.held.expect("checked");
                    plan.deadline = Some(plan.deadline.map_or(deadline, |d| d.min(deadline)));
                    continue;
                }
                (QpState::Rts, Some(p)) => {
                    let deadline = match p.wait {
                        Wait::Ready => {
                            plan.busy = true;
                            continue;
                        }
                        Wait::Rnr { deadline, .. } => {
                            if let Some(Route::Local { qpn, .. }) = qp.route {
                                rnr_peers.push(qpn);
                            }
                            deadline
                        }
                        Wait::Transport { deadline, .. } => deadline,
                    };
                    plan.deadline = Some(plan.deadline.map_or(deadline, |d| d.min(deadline)));
                    continue;
                }
                // An SRQ is not the QP's to flush: only its own receive ring.
                (QpState::Err, None) if qp.srq.is_some() => qp.sq.prepare_park(),
                (QpState::Err, None) => qp
                    .sq
                    .prepare_park()
                    .and_then(|idle| Ok(idle && qp.rq.prepare_park()?)),
                (QpState::Err, Some(_)) => Ok(false),
                _ => continue,
            };
            match result {
                Ok(true) => {}
                Ok(false) => plan.busy = true,
                Err(e) => {
                    qp.broken = true;
                    broken.push((qp.owner, e));
                }
            }
        }
        // A SEND waiting for a receive retries at once when the responder posts one, instead
        // of sleeping out its RNR timer: the responder's receive ring rings the doorbell too.
        for qpn in rnr_peers {
            let Some(&index) = self.qpns.get(&qpn) else {
                continue;
            };
            let Some(peer) = self.qps.get_mut(index).filter(|q| !q.broken) else {
                continue;
            };
            let result = match peer.srq {
                None => peer.rq.prepare_park().map_err(|e| {
                    peer.broken = true;
                    (peer.owner, e)
                }),
                // The receive comes from the SRQ: its ring rings the doorbell.
                Some(i) => match self.srqs.get_mut(i).filter(|q| !q.broken) {
                    None => continue,
                    Some(q) => q.ring.prepare_park().map_err(|e| {
                        q.broken = true;
                        (q.owner, e)
                    }),
                },
            };
            match result {
                Ok(true) => {}
                Ok(false) => plan.busy = true,
                Err(owner_error) => broken.push(owner_error),
            }
        }
        for (owner, e) in broken {
            self.break_owner(owner, e);
        }
        plan
    }

    /// Lowers every parked flag after the shard woke.
    pub fn unpark(&self) {
        for qp in self.qps.iter() {
            qp.sq.unpark();
            qp.rq.unpark();
        }
        for srq in self.srqs.iter() {
            srq.ring.unpark();
        }
    }
}

/// Pops and forgets everything in a ring (a QP going to RESET).
fn drain(ring: &mut Consumer, scratch: &mut [u8]) -> Result<(), RingError> {
    while ring.pop(scratch)? {}
    ring.release();
    Ok(())
}
