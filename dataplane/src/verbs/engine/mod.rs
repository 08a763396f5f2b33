//! The software verbs engine of one shard: every verbs context (one per verbs attachment) with
//! its PD/MR table, completion channels, CQs and QPs, and the execution of work requests by
//! copying between containers' registered memory.
//!
//! Routing: every shard runs an engine; a container's verbs attachments all go to the shard
//! its overlay address picks (`remote::shard_of`), so both ends of a connection between two
//! containers that one shard serves live in one engine and a work request runs to completion
//! on one thread, with no locks. Where a QP's destination lives is decided at RTR from its GID
//! (`::ffff:<overlay ip>`): a container of the caller's tenant with a verbs context in this
//! engine is [`Route::Local`]; a registered container of the tenant that another shard of this
//! router serves, or one on another host, is [`Route::Remote`] over a [`super::remote::Link`]
//! (the same requester and responder code and frames for both, see `remote`); anything else
//! fails the modify with ENETUNREACH.
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
//!
//! Every object that costs the router a descriptor or a mapping (memory file, memory region,
//! completion channel, CQ, QP, SRQ) takes a unit of its container's budget, which all the
//! container's contexts share (`budget`): one container's objects cannot use up the router's
//! descriptors or mappings for the others.
//!
//! The engine is split by object: this module holds the engine, its per-attachment contexts and
//! the dispatch of requests; `cq` the completion channels and CQs, `qp` the QPs and their state
//! machine, `srq` the shared receive queues, `park` the parking of the shard and the retry
//! timers, `objects` the tables of CQs, QPs and SRQs, `budget` the containers' budgets of
//! descriptors and mappings. `super::exec` executes work requests.

mod ah;
mod budget;
mod cq;
mod events;
mod objects;
mod park;
#[cfg(test)]
mod prop_tests;
mod qp;
mod srq;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub(super) use ah::Ah;
pub use budget::budget_of_this_process;
pub use objects::Fault;
pub use park::ParkPlan;
pub(super) use park::{ack_timeout, rnr_timer, CQ_FULL_RETRY};
pub(super) use qp::{Pending, Qp, Route, Wait};

use super::ids::{AttachmentId, CqId, PdId, QpId, SrqId, TenantId};
use super::remote::Transport;
use super::{KeyGen, NumberMap, VerbsError, VerbsTable};
use budget::Budgets;
use cq::{CompChannel, Cq};
use freeflow_proto::codec;
use freeflow_proto::control::ContainerEntry;
use freeflow_proto::fdpass;
use freeflow_proto::identity::NetnsId;
use freeflow_proto::verbs::ah::CreateAh;
use freeflow_proto::verbs::qp::{CreateQp, ModifyQp, QpState};
use freeflow_proto::verbs::srq::{CreateSrq, ModifySrq};
use freeflow_proto::verbs::{
    Body, CreateCq, MemoryFileMsg, ObjectHandle, QueueFileKind, QueueFileMsg, RegMr, ResizeCq,
    VerbsOp,
};
use freeflow_proto::RingError;
use objects::Objects;
use srq::Srq;
use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Smallest number of slots of a queue's ring.
const MIN_RING_SLOTS: u32 = 16;

/// The verbs state of one attachment (one open device context).
#[derive(Debug)]
pub(super) struct Context {
    pub(super) container: ContainerEntry,
    /// The container's tenant as a number of this engine (compared on every work request).
    pub(super) tenant: TenantId,
    pub(super) table: VerbsTable,
    channels: NumberMap<u32, CompChannel>,
    cqs: NumberMap<u32, CqId>,
    qps: NumberMap<u32, QpId>,
    srqs: NumberMap<u32, SrqId>,
    /// Address handles (UD destinations), resolved at creation.
    ahs: NumberMap<u32, Ah>,
    next_handle: u32,
    /// Its asynchronous event pipe, once the shim opened it (see `events`).
    events: Option<events::EventPipe>,
    /// Units of its container's budget this context holds (given back when it closes).
    charged: usize,
}

/// Who a request comes from: an attachment, and its attach connection (where the files of the
/// queues it creates go).
#[derive(Clone, Copy)]
struct Caller<'a> {
    attachment: AttachmentId,
    conn: BorrowedFd<'a>,
}

/// What a context held when it closed (for the detach log line).
#[derive(Debug, Default, Clone, Copy)]
pub struct Held {
    pub pds: usize,
    pub mrs: usize,
    pub cqs: usize,
    pub qps: usize,
}

/// What an engine did, for the shard's status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Send work requests taken off the send queues.
    pub ops: u64,
    /// Their payload bytes (from their scatter/gather lists, or inline data; 8 per atomic).
    pub bytes: u64,
}

/// The verbs engine of one shard.
#[derive(Debug)]
pub struct Engine {
    /// What it did so far.
    pub(super) counters: Counters,
    pub(super) contexts: NumberMap<AttachmentId, Context>,
    /// Asynchronous events raised while the contexts were taken out (see `events`).
    deferred_events: Vec<(AttachmentId, freeflow_proto::verbs::AsyncEventRecord)>,
    pub(super) cqs: Objects<CqId, Cq>,
    pub(super) qps: Objects<QpId, Qp>,
    pub(super) srqs: Objects<SrqId, Srq>,
    /// Virtual QP number to QP, for every QP of this engine.
    qpns: NumberMap<u32, QpId>,
    qpn_keys: KeyGen,
    /// Tenant names to the numbers contexts carry.
    tenants: std::collections::HashMap<String, TenantId>,
    /// Each container's count of mapped bytes, shared by its contexts' tables and by the
    /// mappings (until unmapped) it is charged to; kept while anything holds it.
    mapped: std::collections::HashMap<NetnsId, Arc<AtomicU64>>,
    /// Each container's budget of the router's descriptors and mappings.
    budgets: Budgets,
    test_hooks: bool,
    /// CQs with entries pushed and not yet published.
    pub(super) dirty: Vec<CqId>,
    /// CQs published since the shard last asked whether their completions were taken
    /// (`completions_waiting`).
    pub(super) published: Vec<CqId>,
    /// Attachments that broke a ring (to be detached by the shard), with the reason.
    pub(super) broken: Vec<(AttachmentId, String)>,
    /// The transport to other hosts' routers (idle until the daemon describes a cluster).
    pub(super) remote: Transport,
    /// ACKs held back to ride on a reply, and for how long at most (`remote::ACK_HOLD`).
    pub(super) held_acks: Vec<super::remote::HeldAck>,
    pub(super) ack_hold: std::time::Duration,
    /// The RDMA device the containers' RC QPs run on (`--rdma-device`; see `hw::path`).
    #[cfg(feature = "rdma-hw")]
    pub(super) device: Option<Box<super::hw::path::DevicePath>>,
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(super::test_hooks_enabled())
    }
}

/// The context of `attachment` in `contexts` (a function of the table alone, so that the
/// engine's other tables stay free to borrow).
fn context_mut(
    contexts: &mut NumberMap<AttachmentId, Context>,
    attachment: AttachmentId,
) -> Result<&mut Context, VerbsError> {
    contexts
        .get_mut(&attachment)
        .ok_or(VerbsError::NoSuchObject("context", attachment.0))
}

fn ring_slots(wanted: u32) -> u32 {
    wanted.max(MIN_RING_SLOTS).next_power_of_two()
}

fn slot_size(bytes: usize) -> u32 {
    (bytes.max(64) as u32).next_multiple_of(64)
}

impl Engine {
    /// An engine whose containers each get the budget this process's limits allow
    /// ([`budget_of_this_process`]).
    pub fn new(test_hooks: bool) -> Engine {
        Engine::with_budget(test_hooks, budget_of_this_process())
    }

    /// An engine whose containers each get `budget` units of descriptors and mappings.
    pub fn with_budget(test_hooks: bool, budget: usize) -> Engine {
        Engine {
            counters: Counters::default(),
            contexts: NumberMap::default(),
            deferred_events: Vec::new(),
            cqs: Objects::default(),
            qps: Objects::default(),
            srqs: Objects::default(),
            qpns: NumberMap::default(),
            qpn_keys: KeyGen::new(),
            tenants: std::collections::HashMap::new(),
            mapped: std::collections::HashMap::new(),
            budgets: Budgets::new(budget),
            test_hooks,
            dirty: Vec::new(),
            published: Vec::new(),
            broken: Vec::new(),
            remote: Transport::default(),
            held_acks: Vec::new(),
            ack_hold: super::remote::ACK_HOLD,
            #[cfg(feature = "rdma-hw")]
            device: None,
        }
    }

    /// A verbs attachment arrived: it gets an empty context.
    pub fn open(&mut self, attachment: AttachmentId, container: ContainerEntry) {
        let next = TenantId(self.tenants.len() as u32);
        let tenant = *self.tenants.entry(container.tenant.clone()).or_insert(next);
        // A count nothing else holds is zero: that container has nothing mapped any more.
        self.mapped.retain(|_, count| Arc::strong_count(count) > 1);
        let mut table = VerbsTable::new(self.test_hooks);
        table.count_mapped_in(Arc::clone(self.mapped.entry(container.netns).or_default()));
        self.contexts.insert(
            attachment,
            Context {
                container,
                tenant,
                table,
                channels: NumberMap::default(),
                cqs: NumberMap::default(),
                qps: NumberMap::default(),
                srqs: NumberMap::default(),
                ahs: NumberMap::default(),
                next_handle: 0,
                events: None,
                charged: 0,
            },
        );
    }

    /// An attachment went: everything of its context goes (peers connected to its QPs see
    /// their destination gone, as if the remote host had died).
    pub fn close(&mut self, attachment: AttachmentId) -> Option<Held> {
        let ctx = self.contexts.remove(&attachment)?;
        self.budgets.refund_all(&ctx);
        let held = Held {
            pds: ctx.table.pd_count(),
            mrs: ctx.table.mr_count(),
            cqs: ctx.cqs.len(),
            qps: ctx.qps.len(),
        };
        #[cfg(feature = "rdma-hw")]
        {
            let qps: Vec<(QpId, u32)> = ctx
                .qps
                .values()
                .filter_map(|&i| Some((i, self.qps.get(i)?.qpn)))
                .collect();
            self.device_close(attachment, &qps);
            for &i in ctx.cqs.values() {
                self.device_destroy_cq(i);
            }
        }
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
        self.published.retain(|&i| self.cqs.get(i).is_some());
        Some(held)
    }

    pub fn adopt_memory_file(
        &mut self,
        attachment: AttachmentId,
        msg: MemoryFileMsg,
        fd: impl Into<crate::sys::Untrusted>,
    ) -> Result<(), VerbsError> {
        let ctx = context_mut(&mut self.contexts, attachment)?;
        self.budgets
            .charged(ctx, |ctx| ctx.table.adopt_memory_file(msg, fd))
    }

    /// Attachments whose rings broke since the last call (the shard detaches them).
    pub fn take_broken(&mut self) -> Vec<(AttachmentId, String)> {
        std::mem::take(&mut self.broken)
    }

    pub(super) fn break_owner(&mut self, owner: AttachmentId, e: RingError) {
        self.end_attachment(owner, || format!("verbs queue protocol violation: {e}"));
    }

    /// Marks `owner` to be detached, for the reason `why` says (unless it already is).
    fn end_attachment(&mut self, owner: AttachmentId, why: impl FnOnce() -> String) {
        if !self.broken.iter().any(|(id, _)| *id == owner) {
            self.broken.push((owner, why()));
        }
    }

    /// Marks the QP at `index` broken, a ring of it corrupt (`e`), and its owner to be
    /// detached. A QP that is gone has nothing left to break.
    pub(in crate::verbs) fn break_qp(&mut self, index: QpId, e: RingError) {
        if let Some(qp) = self.qps.get_mut(index) {
            qp.broken = true;
            let owner = qp.owner;
            self.break_owner(owner, e);
        }
    }

    /// The engine's bookkeeping failed (`fault`) while it worked on the QP at `index`: the QP
    /// is no longer touched and its owner is detached; other attachments go on. A QP that is
    /// gone has no owner left to end.
    pub(in crate::verbs) fn fault_qp(&mut self, index: QpId, fault: Fault) {
        if let Some(qp) = self.qps.get_mut(index) {
            qp.broken = true;
            let owner = qp.owner;
            self.end_attachment(owner, || format!("verbs engine fault: {fault}"));
        }
    }

    /// Serves one verbs request of `attachment`, whose attach connection is `conn` (queue files
    /// go there). Writes the reply body into `reply`; returns its status and length.
    pub fn serve(
        &mut self,
        attachment: AttachmentId,
        conn: BorrowedFd<'_>,
        opcode: u16,
        body: &[u8],
        reply: &mut [u8],
    ) -> (u16, usize) {
        match self.serve_inner(Caller { attachment, conn }, opcode, body, reply) {
            Ok(len) => (freeflow_proto::msg::status::OK, len),
            Err(e) => {
                // The engine's own bookkeeping failed serving this attachment: it ends (after
                // this reply), not the shard.
                if let VerbsError::Fault(fault) = &e {
                    self.end_attachment(attachment, || format!("verbs engine fault: {fault}"));
                }
                (e.status(), 0)
            }
        }
    }

    fn serve_inner(
        &mut self,
        caller: Caller<'_>,
        opcode: u16,
        body: &[u8],
        reply: &mut [u8],
    ) -> Result<usize, VerbsError> {
        let Caller { attachment, conn } = caller;
        self.context(attachment)?;
        let op = VerbsOp::try_from(opcode).map_err(|_| VerbsError::UnknownOp(opcode))?;
        let handle = || ObjectHandle::decode(body).map(|r| r.handle);
        match op {
            VerbsOp::CreateCompChannel => {
                codec::exact("CreateCompChannel", body, 0)?;
                let handle = self.create_channel(attachment, conn)?;
                Ok(ObjectHandle { handle }.encode(reply))
            }
            VerbsOp::CreateAsyncEvents => {
                codec::exact("CreateAsyncEvents", body, 0)?;
                self.create_async_events(attachment, conn).map(|()| 0)
            }
            VerbsOp::DestroyCompChannel => self.destroy_channel(attachment, handle()?).map(|()| 0),
            VerbsOp::CreateCq => {
                let r = CreateCq::decode(body)?;
                Ok(self.create_cq(attachment, conn, &r)?.encode(reply))
            }
            VerbsOp::DestroyCq => self.destroy_cq(attachment, handle()?).map(|()| 0),
            VerbsOp::ResizeCq => {
                let r = ResizeCq::decode(body)?;
                Ok(self.resize_cq(attachment, conn, &r)?.encode(reply))
            }
            VerbsOp::CreateQp => {
                let r = CreateQp::decode(body)?;
                Ok(self.create_qp(attachment, conn, &r)?.encode(reply))
            }
            VerbsOp::ModifyQp => {
                let state = self.modify_qp(attachment, &ModifyQp::decode(body)?)?;
                Ok(ObjectHandle {
                    handle: state as u32,
                }
                .encode(reply))
            }
            VerbsOp::QueryQp => Ok(self.query_qp(attachment, handle()?)?.encode(reply)),
            VerbsOp::DestroyQp => self.destroy_qp(attachment, handle()?).map(|()| 0),
            #[cfg(feature = "rdma-hw")]
            VerbsOp::CreateSrq if self.device.is_some() => Err(super::hw::path::refuse(
                "shared receive queues on the RDMA device path",
            )),
            VerbsOp::CreateSrq => {
                let r = CreateSrq::decode(body)?;
                Ok(self.create_srq(attachment, conn, &r)?.encode(reply))
            }
            VerbsOp::ModifySrq => self
                .modify_srq(attachment, &ModifySrq::decode(body)?)
                .map(|()| 0),
            VerbsOp::QuerySrq => Ok(self.query_srq(attachment, handle()?)?.encode(reply)),
            VerbsOp::DestroySrq => self.destroy_srq(attachment, handle()?).map(|()| 0),
            VerbsOp::CreateAh => {
                let handle = self.create_ah(attachment, &CreateAh::decode(body)?)?;
                Ok(ObjectHandle { handle }.encode(reply))
            }
            VerbsOp::DestroyAh => self.destroy_ah(attachment, handle()?).map(|()| 0),
            // A memory region is a mapping of the router's.
            // A further memory file that no region uses any more goes with the call (see
            // `VerbsTable::reg_mr`): its unit comes back too.
            VerbsOp::RegMr => {
                // The limit on mapped bytes is the container's: its contexts share one count
                // (`Engine::open`).
                let ctx = context_mut(&mut self.contexts, attachment)?;
                let files = ctx.table.further_file_count();
                let created = self
                    .budgets
                    .charged(ctx, |ctx| ctx.table.serve_inner(op, body, reply));
                if created.is_err() {
                    // Whatever failed (the budget too, before the table saw the request): a
                    // further file no region uses goes, as the shim forgets it.
                    if let Ok(r) = RegMr::decode(body) {
                        ctx.table.drop_unused_file(r.file);
                    }
                }
                for _ in ctx.table.further_file_count()..files {
                    self.budgets.refund(ctx);
                }
                #[cfg(feature = "rdma-hw")]
                if let Ok(len) = created {
                    self.reg_mr_on_device(attachment, &reply[..len])?;
                }
                created
            }
            VerbsOp::DeregMr => {
                #[cfg(feature = "rdma-hw")]
                if let Ok(r) = freeflow_proto::verbs::DeregMr::decode(body) {
                    // The device lets go of the pages (its own mapping of them) first.
                    self.device_dereg_mr(attachment, r.mr);
                }
                let ctx = context_mut(&mut self.contexts, attachment)?;
                let files = ctx.table.further_file_count();
                let len = ctx.table.serve_inner(op, body, reply)?;
                self.budgets.refund(ctx);
                for _ in ctx.table.further_file_count()..files {
                    self.budgets.refund(ctx);
                }
                Ok(len)
            }
            #[cfg(feature = "rdma-hw")]
            VerbsOp::AllocPd if self.device.is_some() => {
                let len = self
                    .context(attachment)?
                    .table
                    .serve_inner(op, body, reply)?;
                let pd = PdId(freeflow_proto::verbs::PdCreated::decode(&reply[..len])?.pd);
                if let Err(e) = self.device_alloc_pd(attachment, pd) {
                    let _ = self.context(attachment)?.table.dealloc_pd(pd);
                    return Err(e);
                }
                Ok(len)
            }
            #[cfg(feature = "rdma-hw")]
            VerbsOp::DeallocPd if self.device.is_some() => {
                let len = self
                    .context(attachment)?
                    .table
                    .serve_inner(op, body, reply)?;
                let pd = PdId(freeflow_proto::verbs::DeallocPd::decode(body)?.pd);
                self.device_dealloc_pd(attachment, pd);
                Ok(len)
            }
            _ => self.context(attachment)?.table.serve_inner(op, body, reply),
        }
    }

    /// The region a RegMr reply names gets its twin on the device; if the device refuses, the
    /// registration is undone (the container sees the error).
    #[cfg(feature = "rdma-hw")]
    fn reg_mr_on_device(
        &mut self,
        attachment: AttachmentId,
        reply: &[u8],
    ) -> Result<(), VerbsError> {
        if self.device.is_none() {
            return Ok(());
        }
        let mr = freeflow_proto::verbs::MrCreated::decode(reply)?.mr;
        let registered = self.device_reg_mr(attachment, mr);
        if registered.is_err() {
            let ctx = context_mut(&mut self.contexts, attachment)?;
            let files = ctx.table.further_file_count();
            if ctx.table.dereg_mr(mr).is_ok() {
                self.budgets.refund(ctx);
                for _ in ctx.table.further_file_count()..files {
                    self.budgets.refund(ctx);
                }
            }
        }
        registered
    }

    /// The engine's number of tenant `name`, if a context of it was ever opened here.
    pub(in crate::verbs) fn tenant_number(&self, name: &str) -> Option<TenantId> {
        self.tenants.get(name).copied()
    }

    fn context(&mut self, attachment: AttachmentId) -> Result<&mut Context, VerbsError> {
        context_mut(&mut self.contexts, attachment)
    }

    fn context_ref(&self, attachment: AttachmentId) -> Result<&Context, VerbsError> {
        self.contexts
            .get(&attachment)
            .ok_or(VerbsError::NoSuchObject("context", attachment.0))
    }

    /// The engine's index of the object `handle` (a `what`) of `attachment`, looked up in the
    /// context's table `table`.
    fn index_of<K: Copy>(
        &self,
        attachment: AttachmentId,
        handle: u32,
        what: &'static str,
        table: fn(&Context) -> &NumberMap<u32, K>,
    ) -> Result<K, VerbsError> {
        self.contexts
            .get(&attachment)
            .and_then(|c| table(c).get(&handle))
            .copied()
            .ok_or(VerbsError::NoSuchObject(what, handle))
    }

    /// Runs `make` (which creates an object in protection domain `pd` of `ctx`) with the PD
    /// held; the hold is released if `make` fails.
    fn holding_pd<T>(
        ctx: &mut Context,
        pd: PdId,
        make: impl FnOnce(&mut Context) -> Result<T, VerbsError>,
    ) -> Result<T, VerbsError> {
        ctx.table.hold_pd(pd)?;
        make(ctx).inspect_err(|_| ctx.table.release_pd(pd))
    }

    /// A handle not in use by any channel, CQ, QP, SRQ or address handle of the context (never
    /// 0).
    fn new_handle(ctx: &mut Context) -> u32 {
        loop {
            ctx.next_handle = ctx.next_handle.wrapping_add(1);
            let h = ctx.next_handle;
            if h != 0
                && !ctx.channels.contains_key(&h)
                && !ctx.cqs.contains_key(&h)
                && !ctx.qps.contains_key(&h)
                && !ctx.srqs.contains_key(&h)
                && !ctx.ahs.contains_key(&h)
            {
                return h;
            }
        }
    }

    /// Sends the file of a new queue (or channel) `handle` on the attach connection, before
    /// the reply that creates it.
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

    /// One pass over every QP: executes send WQEs of QPs in RTS, flushes QPs in the error
    /// state, then publishes the CQs that got entries (ringing armed ones' channels). Returns
    /// how much work was done.
    pub fn poll(&mut self) -> usize {
        let mut work = 0;
        let mut now = None;
        let remote = self.remote.active();
        if remote {
            work += self.poll_transport(&mut now);
        }
        for index in self.qps.keys() {
            let Some(qp) = self.qps.get(index) else {
                continue;
            };
            if qp.broken {
                continue;
            }
            // The device path runs these (below).
            #[cfg(feature = "rdma-hw")]
            if self.is_device_qp(index) {
                continue;
            }
            match qp.state {
                QpState::Rts => work += self.run_send_queue(index, &mut now),
                QpState::Err => {
                    self.raise_last_wqe(index);
                    work += self.flush(index, &mut now);
                }
                _ => {}
            }
        }
        if remote {
            if !self.held_acks.is_empty() {
                self.release_held_acks(*now.get_or_insert_with(std::time::Instant::now));
            }
            self.remote.flush_all();
        }
        #[cfg(feature = "rdma-hw")]
        {
            work += self.device_pass();
        }
        self.publish();
        // Events are written as soon as the contexts are back (see `events`); this catches any
        // raised elsewhere.
        self.flush_events();
        work
    }

    /// Takes the daemon's view of the cluster: which overlay addresses live on which host, and
    /// the other hosts' routers (for RDMA between hosts).
    pub fn set_network(&mut self, network: &freeflow_proto::control::NetworkView) {
        self.remote.set_network(network);
        #[cfg(feature = "rdma-hw")]
        if let Some(d) = &self.device {
            d.follow(network);
        }
    }

    /// Whether the transport to other hosts' routers has a connection (or one to accept).
    pub fn remote_connected(&self) -> bool {
        self.remote.active() && self.remote.reaches_hosts()
    }

    /// This engine is shard `shard`'s of `shards`, with a socket pair to each other shard
    /// (`links`: that shard and our end): QPs whose destination another shard serves reach it
    /// through them.
    pub fn set_shard(
        &mut self,
        shard: usize,
        shards: usize,
        links: Vec<super::remote::SiblingLink>,
    ) {
        self.remote.set_shard(shard, shards, links);
    }

    /// Takes this host's registered containers (overlay address, tenant): which of them other
    /// shards serve is a function of the address ([`super::remote::shard_of`]).
    pub fn set_local(
        &mut self,
        containers: impl IntoIterator<Item = (std::net::Ipv4Addr, String)>,
    ) {
        self.remote.set_local(containers);
    }

    /// What the engine did so far, and its number of QPs.
    pub fn counters(&self) -> (Counters, usize) {
        (self.counters, self.qpns.len())
    }

    /// The transport's sockets, for the shard's io_uring (see `remote::Transport::watch`).
    pub fn transport(&mut self) -> &mut Transport {
        &mut self.remote
    }
}
