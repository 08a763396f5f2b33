//! The device path: with `--rdma-device`, each container's PD, MR, CQ and RC QP has a twin on
//! the device, made by the engine's verbs as it makes its own object (the engine keeps the
//! rings, handles and keys the container sees); each pass of the shard takes the rings of the
//! device's QPs, translates their work requests (`translate`: virtual keys and QP numbers
//! checked against the container's own tables) and posts them, and moves the device's
//! completions into the containers' CQ rings (never more than a ring has room for). The
//! software engine never executes a work request of a device QP.
//!
//! A destination on another host is connected at RTR with the real QP number and GID its
//! router answers (`exchange`: MasQ-style, checked there against its own tenants), and the
//! peer's virtual rkeys are translated with what that router answers about them.
//!
//! What the device path does not carry (UD and UC QPs, SRQs, a destination on
//! another shard of this router, resizing a CQ) is refused at the verb with EOPNOTSUPP (the
//! reason logged when FREEFLOW_DEBUG is set), never run by the software engine instead: a
//! device QP and a software QP cannot talk to each other.
//!
//! One engine per shard, each with its own twins; the device context is shared (libibverbs is
//! thread-safe).

use super::exchange::ExportedKey;
use super::sys::{
    CompChannel, Completion, Cq as DeviceCq, Destination, Mr as DeviceMr, NicError, Pd as DevicePd,
    Qp as DeviceQp, QpCaps, SendRequest, Sge as RealSge,
};
use super::translate::{translate_completion, translate_send, KeyTable, MrEntry, QpDirectory};
use super::{Nic, GID_INDEX, PORT};
use crate::verbs::engine::{Engine, Route};
use crate::verbs::ids::{AttachmentId, CqId, PdId, QpId};
use crate::verbs::remote::Link;
use crate::verbs::send_op::wc_opcode_of;
use crate::verbs::{NumberMap, VerbsError};
use freeflow_proto::verbs::device::{DeviceQuery, DeviceStatus, QueryKind};
use freeflow_proto::verbs::qp::{QpAttr, QpCap, QpState};
use freeflow_proto::verbs::work::{Cqe, RecvWqe, SendWqe, SendWqeHeader, WrOpcode, MAX_SGE};
use freeflow_proto::verbs::{wc_status, AccessFlags};
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

/// `enum ibv_wc_opcode` IBV_WC_RECV: what a flushed receive reports.
const WC_RECV: u32 = 128;
/// Work requests of one QP queue taken per pass (fairness between QPs).
const BATCH: usize = 32;
/// Completions polled from one device CQ per call.
const POLL_BATCH: usize = 16;

/// Whether FREEFLOW_DEBUG asks for the device path's reasons.
fn debug_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("FREEFLOW_DEBUG").is_some_and(|v| !v.is_empty() && v != "0")
    })
}

/// EOPNOTSUPP for what the device path does not carry, with the reason in the log under
/// FREEFLOW_DEBUG.
pub(in crate::verbs) fn refuse(why: &'static str) -> VerbsError {
    if debug_enabled() {
        log::info!("RDMA device path: refused: {why}");
    }
    VerbsError::NotSupported(why)
}

/// A container's RC QP on the device.
#[derive(Debug)]
struct QpTwin {
    qp: DeviceQp,
    /// The QP it connected to at RTR (on one host: one of this engine's), with its virtual
    /// number: an index reused by a later QP (the peer destroyed) must not lend that QP's
    /// keys.
    peer: Option<(QpId, u32)>,
    /// The engine's copy of the send slot holds a WQE taken off the ring that the device had
    /// no room for yet: posted again before the next one is taken.
    held: bool,
    /// The owner's overlay address (the exchange knows the QP by it and its virtual number).
    owner_ip: Ipv4Addr,
    /// The QP of another host's container it connected to at RTR.
    remote: Option<Box<RemotePeer>>,
}

/// A destination QP on another host, and what its router said about its container's keys.
#[derive(Debug)]
struct RemotePeer {
    /// The router's host.
    host: Ipv4Addr,
    /// The asking QP's container, and the destination's address and virtual QP number.
    src_ip: Ipv4Addr,
    ip: Ipv4Addr,
    qpn: u32,
    /// The destination container's regions asked about so far, by virtual rkey (in PD 0: the
    /// answering router checked the PD).
    keys: KeyTable,
}

/// A container's region on the device, with its virtual keys.
#[derive(Debug)]
struct MrTwin {
    _mr: DeviceMr,
    lkey: u32,
    rkey: u32,
    owner_ip: Ipv4Addr,
}

/// The device twins of one engine's objects.
#[derive(Debug)]
pub(in crate::verbs) struct DevicePath {
    nic: Nic,
    /// Where the device's CQs signal completions while the shard is parked (armed before
    /// each park); without one the shard wakes every [`CQ_FULL_RETRY`] to poll.
    channel: Option<Arc<CompChannel>>,
    pds: NumberMap<(AttachmentId, PdId), Arc<DevicePd>>,
    keys: NumberMap<AttachmentId, KeyTable>,
    mrs: NumberMap<(AttachmentId, u32), MrTwin>,
    cqs: NumberMap<CqId, Arc<DeviceCq>>,
    qps: NumberMap<QpId, QpTwin>,
    directory: QpDirectory,
    /// Scratch lists of a pass (kept to avoid allocating every pass).
    qp_list: Vec<QpId>,
    cq_list: Vec<CqId>,
}

impl DevicePath {
    pub(in crate::verbs) fn new(nic: Nic) -> DevicePath {
        let channel = match nic.device.create_comp_channel() {
            Ok(c) => Some(c),
            Err(e) => {
                log::warn!(
                    "RDMA device path: no completion channel ({e}): the shard polls the \
                     device's CQs every millisecond while it has QPs"
                );
                None
            }
        };
        DevicePath {
            nic,
            channel,
            pds: NumberMap::default(),
            keys: NumberMap::default(),
            mrs: NumberMap::default(),
            cqs: NumberMap::default(),
            qps: NumberMap::default(),
            directory: QpDirectory::default(),
            qp_list: Vec::new(),
            cq_list: Vec::new(),
        }
    }

    /// Whether any QP lives on the device (the shard then wakes to poll its CQs).
    pub(in crate::verbs) fn has_qps(&self) -> bool {
        !self.qps.is_empty()
    }

    /// Follows the daemon's view of the cluster (other hosts' routers and containers, for the
    /// exchange).
    pub(in crate::verbs) fn follow(&self, network: &freeflow_proto::control::NetworkView) {
        self.nic.exchange.follow(network);
    }

    /// A QP twin goes: it is withdrawn from the exchange (no other host connects to it).
    fn drop_qp(&mut self, index: QpId, qpn: u32) {
        if let Some(twin) = self.qps.remove(&index) {
            self.nic.exchange.withdraw_qp(twin.owner_ip, qpn);
        }
        self.directory.remove(qpn);
    }
}

/// Asks the router of `remote`'s host about virtual rkey `rkey` of its container, unless
/// asked already; a region it names enters `remote`'s keys. Nothing enters for a key it does
/// not give (or a router that does not answer): the work request then fails translation with
/// REM_ACCESS_ERR, as a forged rkey does on one host.
fn learn_remote_key(nic: &super::Nic, remote: &mut RemotePeer, rkey: u32) {
    if remote.keys.has_rkey(rkey) {
        return;
    }
    let query = DeviceQuery {
        kind: QueryKind::Key,
        src_ip: remote.src_ip,
        dst_ip: remote.ip,
        dst_qpn: remote.qpn,
        rkey,
    };
    match nic.exchange.ask(remote.host, &query) {
        Ok(a) if a.status == DeviceStatus::Found => remote.keys.insert_remote(
            rkey,
            MrEntry {
                pd: 0,
                access: AccessFlags::from_bits_retain(a.access),
                iova: a.iova,
                length: a.length,
                real_addr: a.real_addr,
                real_lkey: 0,
                real_rkey: a.real_rkey,
            },
        ),
        Ok(a) => {
            if debug_enabled() {
                log::info!(
                    "RDMA device path: rkey {rkey:#x} of {}: {:?}",
                    remote.ip,
                    a.status
                );
            }
        }
        Err(e) => log::warn!(
            "RDMA device path: asking about rkey {rkey:#x} of {}: {e}",
            remote.ip
        ),
    }
}

/// Whether a send opcode names the peer's memory by rkey (RDMA WRITE, WRITE_WITH_IMM, READ,
/// the atomics).
fn names_remote_memory(opcode: u8) -> bool {
    matches!(
        WrOpcode::try_from(opcode),
        Ok(WrOpcode::RdmaWrite
            | WrOpcode::RdmaWriteWithImm
            | WrOpcode::RdmaRead
            | WrOpcode::AtomicCmpAndSwp
            | WrOpcode::AtomicFetchAndAdd)
    )
}

/// The memory access bits a region grants on the device (`enum ibv_access_flags`: the
/// engine's flags have the same values).
fn device_access(access: u32) -> u32 {
    access
        & (AccessFlags::LOCAL_WRITE
            | AccessFlags::REMOTE_WRITE
            | AccessFlags::REMOTE_READ
            | AccessFlags::REMOTE_ATOMIC)
            .bits()
}

/// Whether a post failed because the device's queue is full (retried on the next pass).
fn queue_full(e: &NicError) -> bool {
    matches!(e, NicError::Call { source, .. } if source.raw_os_error() == Some(libc::ENOMEM))
}

impl Engine {
    /// From now on the engine's verbs make twins on `nic` and its RC QPs run there.
    pub fn set_device(&mut self, nic: Nic) {
        self.device = Some(Box::new(DevicePath::new(nic)));
    }

    /// The descriptor of the device's completion channel, for the shard to wait on.
    pub fn device_channel_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.as_ref()?.channel.as_ref().map(|c| c.fd())
    }

    /// The channel's descriptor fired: its events are taken (the pass that follows polls the
    /// CQs).
    pub fn device_take_events(&mut self) {
        let Some(channel) = self.device.as_ref().and_then(|d| d.channel.as_ref()) else {
            return;
        };
        if let Err(e) = channel.take_events() {
            log::warn!("RDMA device path: taking completion events: {e}");
        }
    }

    /// Before the shard parks: every device CQ is armed, then polled once more (a completion
    /// that came before the arm raises no event): the shard stays awake if one did. Without a
    /// channel, the shard wakes by `fallback` to poll.
    pub(in crate::verbs) fn device_arm(
        &mut self,
        fallback: std::time::Instant,
    ) -> (bool, Option<std::time::Instant>) {
        let Some(d) = self.device.as_deref_mut() else {
            return (false, None);
        };
        if d.qps.is_empty() {
            return (false, None);
        }
        // A WQE the device had no room for is posted again at the next pass: no event
        // announces the room (a completion of the QP may not be signaled).
        if d.channel.is_none() || d.qps.values().any(|t| t.held) {
            return (false, Some(fallback));
        }
        let mut cqs = std::mem::take(&mut d.cq_list);
        cqs.clear();
        cqs.extend(d.cqs.keys().copied());
        let mut armed_all = true;
        for twin in d.cqs.values() {
            if let Err(e) = twin.arm() {
                log::warn!("RDMA device path: arming a CQ: {e}");
                armed_all = false;
            }
        }
        let mut moved = 0;
        for &cq in &cqs {
            moved += self.device_poll_cq(cq);
        }
        if let Some(d) = self.device.as_deref_mut() {
            d.cq_list = cqs;
        }
        (moved > 0, (!armed_all).then_some(fallback))
    }

    /// Whether the QP at `index` runs on the device.
    pub(in crate::verbs) fn is_device_qp(&self, index: QpId) -> bool {
        self.device
            .as_ref()
            .is_some_and(|d| d.qps.contains_key(&index))
    }

    pub(in crate::verbs) fn device_alloc_pd(
        &mut self,
        attachment: AttachmentId,
        pd: PdId,
    ) -> Result<(), VerbsError> {
        let Some(d) = self.device.as_deref_mut() else {
            return Ok(());
        };
        let twin = d.nic.device.alloc_pd()?;
        d.pds.insert((attachment, pd), twin);
        Ok(())
    }

    pub(in crate::verbs) fn device_dealloc_pd(&mut self, attachment: AttachmentId, pd: PdId) {
        if let Some(d) = self.device.as_deref_mut() {
            d.pds.remove(&(attachment, pd));
        }
    }

    /// Registers region `handle` of `attachment`'s table on the device (a writable mapping of
    /// its pages of the router's: no copy) and enters its keys in the container's key table.
    pub(in crate::verbs) fn device_reg_mr(
        &mut self,
        attachment: AttachmentId,
        handle: u32,
    ) -> Result<(), VerbsError> {
        let Some(d) = self.device.as_deref_mut() else {
            return Ok(());
        };
        let ctx = self
            .contexts
            .get(&attachment)
            .ok_or(VerbsError::NoSuchObject("context", attachment.0))?;
        let region = ctx.table.map_for_device(handle)?;
        let pd = d
            .pds
            .get(&(attachment, region.pd))
            .ok_or(VerbsError::NoSuchPd(region.pd.0))?
            .clone();
        let mr = DeviceMr::register(&pd, Arc::new(region.mapping), device_access(region.access))?;
        let owner_ip = ctx.container.ip;
        d.nic.exchange.export_key(
            owner_ip,
            region.rkey,
            ExportedKey {
                pd: region.pd.0,
                access: region.access,
                iova: region.iova,
                length: region.length,
                real_addr: mr.addr + region.offset as u64,
                real_rkey: mr.rkey,
            },
        );
        d.keys.entry(attachment).or_default().insert(
            region.lkey,
            region.rkey,
            MrEntry {
                pd: region.pd.0,
                access: AccessFlags::from_bits_retain(region.access),
                iova: region.iova,
                length: region.length,
                real_addr: mr.addr + region.offset as u64,
                real_lkey: mr.lkey,
                real_rkey: mr.rkey,
            },
        );
        d.mrs.insert(
            (attachment, handle),
            MrTwin {
                _mr: mr,
                lkey: region.lkey,
                rkey: region.rkey,
                owner_ip,
            },
        );
        Ok(())
    }

    pub(in crate::verbs) fn device_dereg_mr(&mut self, attachment: AttachmentId, handle: u32) {
        let Some(d) = self.device.as_deref_mut() else {
            return;
        };
        if let Some(twin) = d.mrs.remove(&(attachment, handle)) {
            d.nic.exchange.withdraw_key(twin.owner_ip, twin.rkey);
            if let Some(keys) = d.keys.get_mut(&attachment) {
                keys.remove(twin.lkey, twin.rkey);
            }
        }
    }

    /// A device CQ for the engine's CQ `index` of `entries` slots (the device's completions
    /// move into the ring only as it has room).
    pub(in crate::verbs) fn device_create_cq(
        &mut self,
        index: CqId,
        entries: u32,
    ) -> Result<(), VerbsError> {
        let Some(d) = self.device.as_deref_mut() else {
            return Ok(());
        };
        let twin = d.nic.device.create_cq_on(entries, d.channel.as_ref())?;
        d.cqs.insert(index, twin);
        Ok(())
    }

    pub(in crate::verbs) fn device_destroy_cq(&mut self, index: CqId) {
        if let Some(d) = self.device.as_deref_mut() {
            d.cqs.remove(&index);
        }
    }

    /// The device QP for the engine's new QP `index` (RC, no SRQ: the caller refused the
    /// rest); returns the capacities the container gets (no more than the device granted).
    pub(in crate::verbs) fn device_create_qp(&mut self, index: QpId) -> Result<QpCap, VerbsError> {
        let Some(d) = self.device.as_deref_mut() else {
            return Err(VerbsError::Invalid("no device"));
        };
        let qp = self.qps.entry(index)?;
        let ctx = self
            .contexts
            .get(&qp.owner)
            .ok_or(VerbsError::NoSuchObject("context", qp.owner.0))?;
        let pd = d
            .pds
            .get(&(qp.owner, qp.pd))
            .ok_or(VerbsError::NoSuchPd(qp.pd.0))?;
        let cq = |i: CqId| {
            d.cqs
                .get(&i)
                .ok_or(VerbsError::NoSuchObject("completion queue", 0))
        };
        let (send_cq, recv_cq) = (cq(qp.send_cq)?, cq(qp.recv_cq)?);
        let caps = QpCaps {
            max_send_wr: qp.cap.max_send_wr,
            max_recv_wr: qp.cap.max_recv_wr,
            max_send_sge: qp.cap.max_send_sge.clamp(1, MAX_SGE),
            max_recv_sge: qp.cap.max_recv_sge.clamp(1, MAX_SGE),
            max_inline_data: qp.cap.max_inline_data,
        };
        // A device that refuses the ring's inline room gets no inline at all: the container
        // then sees max_inline_data 0 (as on a device without inline sends).
        let twin = match DeviceQp::create_rc(pd, send_cq, recv_cq, caps) {
            Ok(q) => q,
            Err(_) if caps.max_inline_data > 0 => DeviceQp::create_rc(
                pd,
                send_cq,
                recv_cq,
                QpCaps {
                    max_inline_data: 0,
                    ..caps
                },
            )?,
            Err(e) => return Err(e.into()),
        };
        let cap = QpCap {
            max_inline_data: qp.cap.max_inline_data.min(twin.caps.max_inline_data),
            ..qp.cap
        };
        d.directory.insert(
            qp.qpn,
            super::translate::QpPlace {
                real_qpn: twin.qpn,
                ip: ctx.container.ip,
                tenant: ctx.tenant.0,
            },
        );
        d.nic.exchange.export_qp(
            ctx.container.ip,
            qp.qpn,
            twin.qpn,
            &ctx.container.tenant,
            qp.pd.0,
        );
        d.qps.insert(
            index,
            QpTwin {
                qp: twin,
                peer: None,
                held: false,
                owner_ip: ctx.container.ip,
                remote: None,
            },
        );
        Ok(cap)
    }

    pub(in crate::verbs) fn device_destroy_qp(&mut self, index: QpId, qpn: u32) {
        if let Some(d) = self.device.as_deref_mut() {
            d.drop_qp(index, qpn);
        }
    }

    /// Everything of `attachment` on the device goes (its engine objects are gone already or
    /// go with it): QPs first, then regions, CQs and PDs (each twin holds what it needs).
    pub(in crate::verbs) fn device_close(&mut self, attachment: AttachmentId, qps: &[(QpId, u32)]) {
        let Some(d) = self.device.as_deref_mut() else {
            return;
        };
        for &(index, qpn) in qps {
            d.drop_qp(index, qpn);
        }
        let exchange = &d.nic.exchange;
        d.mrs.retain(|(a, _), twin| {
            let keep = *a != attachment;
            if !keep {
                exchange.withdraw_key(twin.owner_ip, twin.rkey);
            }
            keep
        });
        d.keys.remove(&attachment);
        d.pds.retain(|(a, _), _| *a != attachment);
    }

    /// Mirrors a modify the engine accepted (`current` to `next`, the attributes after it
    /// `attr`, the destination `route`) on the QP's twin. At RTR the destination must be a
    /// device QP of this engine, of the caller's tenant at the named address.
    pub(in crate::verbs) fn device_modify_qp(
        &mut self,
        index: QpId,
        (current, next): (QpState, QpState),
        attr: &QpAttr,
        route: Option<Route>,
    ) -> Result<(), VerbsError> {
        let peer = match (current, next, route) {
            (QpState::Init, QpState::Rtr, Some(Route::Local { qpn, .. })) => {
                self.qp_by_number(qpn).map(|index| (index, qpn))
            }
            _ => None,
        };
        let Some(d) = self.device.as_deref_mut() else {
            return Ok(());
        };
        let qp = self.qps.entry(index)?;
        let tenant = self
            .contexts
            .get(&qp.owner)
            .ok_or(VerbsError::NoSuchObject("context", qp.owner.0))?
            .tenant;
        let twin = d
            .qps
            .get_mut(&index)
            .ok_or(VerbsError::NoSuchObject("queue pair", qp.qpn))?;
        match (current, next) {
            (_, QpState::Reset) => {
                twin.qp.to_reset()?;
                twin.peer = None;
                twin.remote = None;
                twin.held = false;
            }
            (_, QpState::Err) => twin.qp.to_error()?,
            (QpState::Reset, QpState::Init) => twin.qp.to_init(PORT, attr.qp_access_flags)?,
            (QpState::Init, QpState::Rtr) => {
                let (real, gid, remote) = match route {
                    Some(Route::Local { ip, qpn }) => {
                        let real = d.directory.destination(tenant.0, ip, qpn).map_err(|e| {
                            if debug_enabled() {
                                log::info!("RDMA device path: RTR refused: {e}");
                            }
                            VerbsError::Unreachable(e.to_string())
                        })?;
                        (real, d.nic.gid, None)
                    }
                    Some(Route::Remote {
                        link: Link::Host(host),
                        ip,
                        qpn,
                    }) => {
                        // The destination's router says which real QP (and device) is behind
                        // its virtual number, if it is a QP of this QP's tenant.
                        let src_ip = twin.owner_ip;
                        let query = DeviceQuery {
                            kind: QueryKind::Qp,
                            src_ip,
                            dst_ip: ip,
                            dst_qpn: qpn,
                            rkey: 0,
                        };
                        let answer = d.nic.exchange.ask(host, &query).map_err(|e| {
                            log::warn!("RDMA device path: RTR toward {ip}: {e}");
                            VerbsError::Unreachable(e.to_string())
                        })?;
                        if answer.status != DeviceStatus::Found {
                            let why = format!(
                                "the router of {host} has no device QP {qpn:#x} of this \
                                 tenant at {ip} ({:?})",
                                answer.status
                            );
                            if debug_enabled() {
                                log::info!("RDMA device path: RTR refused: {why}");
                            }
                            return Err(VerbsError::Unreachable(why));
                        }
                        let remote = RemotePeer {
                            host,
                            src_ip,
                            ip,
                            qpn,
                            keys: KeyTable::default(),
                        };
                        // The exchange took this GID only as `host`'s IPv4-mapped one.
                        (answer.real_qpn, answer.gid, Some(Box::new(remote)))
                    }
                    Some(Route::Remote {
                        link: Link::Shard(_),
                        ..
                    }) => {
                        return Err(refuse(
                            "a destination on another shard of this router (the device path \
                             connects QPs of one shard, or of another host)",
                        ))
                    }
                    None => return Err(VerbsError::Invalid("RTR without a destination")),
                };
                twin.qp.to_rtr(&Destination {
                    qpn: real,
                    gid,
                    lid: d.nic.port.lid,
                    rq_psn: attr.rq_psn,
                    mtu: u32::from(attr.path_mtu).min(d.nic.port.active_mtu),
                    sgid_index: GID_INDEX,
                    port: PORT,
                    min_rnr_timer: attr.min_rnr_timer,
                    max_dest_rd_atomic: attr.max_dest_rd_atomic,
                })?;
                twin.peer = peer;
                twin.remote = remote;
            }
            (QpState::Rtr, QpState::Rts) => twin.qp.to_rts(
                attr.sq_psn,
                attr.timeout,
                attr.retry_cnt,
                attr.rnr_retry,
                attr.max_rd_atomic,
            )?,
            // The same state again (attributes the device path does not change).
            _ => {}
        }
        Ok(())
    }

    /// One pass of the device path: the rings of every device QP, then every device CQ.
    pub(in crate::verbs) fn device_pass(&mut self) -> usize {
        let Some(d) = self.device.as_deref_mut() else {
            return 0;
        };
        let mut qps = std::mem::take(&mut d.qp_list);
        let mut cqs = std::mem::take(&mut d.cq_list);
        qps.clear();
        qps.extend(d.qps.keys().copied());
        cqs.clear();
        cqs.extend(d.cqs.keys().copied());
        let mut work = 0;
        for &index in &qps {
            work += self.device_run_qp(index);
        }
        for &cq in &cqs {
            work += self.device_poll_cq(cq);
        }
        if let Some(d) = self.device.as_deref_mut() {
            d.qp_list = qps;
            d.cq_list = cqs;
        }
        work
    }

    /// Moves the QP at `index` to the error state (engine and device) after a work request
    /// failed in translation or at post.
    fn device_fail_qp(&mut self, index: QpId) {
        if let Some(qp) = self.qps.get_mut(index) {
            qp.state = QpState::Err;
        }
        if let Some(twin) = self.device.as_deref().and_then(|d| d.qps.get(&index)) {
            if let Err(e) = twin.qp.to_error() {
                log::warn!("RDMA device path: moving a failed QP to ERR: {e}");
            }
        }
    }

    /// Posts what the container put on the rings of device QP `index` (receives in INIT, RTR
    /// and RTS; sends in RTS), or flushes them in ERR.
    fn device_run_qp(&mut self, index: QpId) -> usize {
        let Some(qp) = self.qps.get(index) else {
            return 0;
        };
        if qp.broken {
            return 0;
        }
        match qp.state {
            QpState::Init | QpState::Rtr => self.device_post_recvs(index),
            QpState::Rts => self.device_post_recvs(index) + self.device_post_sends(index),
            QpState::Err => self.device_flush(index),
            _ => 0,
        }
    }

    fn device_post_recvs(&mut self, index: QpId) -> usize {
        let mut done = 0;
        let mut popped = false;
        while done < BATCH {
            let Some(qp) = self.qps.get_mut(index) else {
                break;
            };
            if qp.state == QpState::Err {
                break;
            }
            let (recv_cq, owner, pd) = (qp.recv_cq, qp.owner, qp.pd);
            // A receive that fails completes with an error: room first.
            if !self.room(recv_cq, 1) {
                break;
            }
            let Some(qp) = self.qps.get_mut(index) else {
                break;
            };
            match qp.rq.pop(&mut qp.rq_slot) {
                Ok(true) => popped = true,
                Ok(false) => break,
                Err(e) => {
                    self.break_qp(index, e);
                    return done;
                }
            }
            done += 1;
            let qpn = qp.qpn;
            let Ok(wqe) = RecvWqe::decode(&qp.rq_slot, qp.cap.max_recv_sge) else {
                let wr_id = u64::from_le_bytes(qp.rq_slot[..8].try_into().unwrap_or_default());
                self.device_complete_error(recv_cq, wr_id, WC_RECV, qpn, wc_status::LOC_QP_OP_ERR);
                self.device_fail_qp(index);
                break;
            };
            let mut sges = [RealSge::default(); MAX_SGE as usize];
            let mut n = 0;
            let mut fault = false;
            if let Some(keys) = self.device.as_deref().and_then(|d| d.keys.get(&owner)) {
                for (out, s) in sges.iter_mut().zip(wqe.sges(&qp.rq_slot)) {
                    match keys.local(pd.0, s, true) {
                        Ok(real) => *out = real,
                        Err(_) => fault = true,
                    }
                    n += 1;
                }
            } else {
                fault = wqe.num_sge > 0;
            }
            if fault {
                self.device_complete_error(
                    recv_cq,
                    wqe.wr_id,
                    WC_RECV,
                    qpn,
                    wc_status::LOC_PROT_ERR,
                );
                self.device_fail_qp(index);
                break;
            }
            let Some(d) = self.device.as_deref_mut() else {
                break;
            };
            let posted = d
                .qps
                .get(&index)
                .map(|t| t.qp.post_recv(wqe.wr_id, &sges[..n]));
            match posted {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    if debug_enabled() {
                        log::info!("RDMA device path: a receive failed at post: {e}");
                    }
                    self.device_complete_error(
                        recv_cq,
                        wqe.wr_id,
                        WC_RECV,
                        qpn,
                        wc_status::LOC_QP_OP_ERR,
                    );
                    self.device_fail_qp(index);
                    break;
                }
                None => break,
            }
        }
        if popped {
            if let Some(qp) = self.qps.get_mut(index) {
                qp.rq.release();
            }
        }
        done
    }

    fn device_post_sends(&mut self, index: QpId) -> usize {
        let mut done = 0;
        let mut popped = false;
        while done < BATCH {
            let Some(qp) = self.qps.get_mut(index) else {
                break;
            };
            if qp.state != QpState::Rts {
                break;
            }
            let (send_cq, owner, pd, sig_all) = (qp.send_cq, qp.owner, qp.pd, qp.sq_sig_all);
            let held = self
                .device
                .as_deref()
                .and_then(|d| d.qps.get(&index))
                .is_some_and(|t| t.held);
            if !held {
                // A WQE that fails completes with an error, even unsignaled: room first.
                if !self.room(send_cq, 1) {
                    break;
                }
                let Some(qp) = self.qps.get_mut(index) else {
                    break;
                };
                match qp.sq.pop(&mut qp.sq_slot) {
                    Ok(true) => popped = true,
                    Ok(false) => break,
                    Err(e) => {
                        self.break_qp(index, e);
                        return done;
                    }
                }
            }
            let Some(qp) = self.qps.get(index) else {
                break;
            };
            let qpn = qp.qpn;
            let header = SendWqeHeader::read(&qp.sq_slot);
            let Ok(wqe) = SendWqe::decode(&qp.sq_slot, qp.cap.max_send_sge, qp.cap.max_inline_data)
            else {
                self.device_complete_error(
                    send_cq,
                    header.wr_id,
                    wc_opcode_of(header.opcode),
                    qpn,
                    wc_status::LOC_QP_OP_ERR,
                );
                self.device_fail_qp(index);
                break;
            };
            let peer_of = self
                .device
                .as_deref()
                .and_then(|d| d.qps.get(&index))
                .and_then(|t| t.peer);
            let peer_gone =
                peer_of.is_some_and(|(p, qpn)| self.qps.get(p).is_none_or(|q| q.qpn != qpn));
            if peer_gone {
                // The QP it was connected to was destroyed, and the device may give its real
                // number to another QP (another tenant's): nothing is posted. A device whose
                // peer vanished exhausts its retries: so does this QP.
                if let Some(t) = self
                    .device
                    .as_deref_mut()
                    .and_then(|d| d.qps.get_mut(&index))
                {
                    t.held = false;
                }
                self.device_complete_error(
                    send_cq,
                    wqe.header.wr_id,
                    wc_opcode_of(wqe.header.opcode),
                    qpn,
                    wc_status::RETRY_EXC_ERR,
                );
                self.device_fail_qp(index);
                done += 1;
                break;
            }
            let Some(d) = self.device.as_deref_mut() else {
                break;
            };
            if names_remote_memory(wqe.header.opcode) {
                if let Some(remote) = d.qps.get_mut(&index).and_then(|t| t.remote.as_deref_mut()) {
                    learn_remote_key(&d.nic, remote, wqe.header.rkey);
                }
            }
            let empty = KeyTable::default();
            let own = d.keys.get(&owner).unwrap_or(&empty);
            let peer_qp = peer_of.and_then(|(p, qpn)| self.qps.get(p).filter(|q| q.qpn == qpn));
            let remote_keys = d
                .qps
                .get(&index)
                .and_then(|t| t.remote.as_deref())
                .map(|r| &r.keys);
            let (peer_table, peer_pd) = match (peer_qp, remote_keys) {
                (Some(p), _) => (d.keys.get(&p.owner).unwrap_or(&empty), p.pd.0),
                (None, Some(keys)) => (keys, 0),
                (None, None) => (&empty, 0),
            };
            let translated = translate_send(
                &wqe,
                &qp.sq_slot,
                (own, pd.0),
                (peer_table, peer_pd),
                sig_all,
            );
            let real = match translated {
                Ok(real) => real,
                Err(status) => {
                    if debug_enabled() {
                        log::info!(
                            "RDMA device path: QP {qpn:#x}: a work request failed translation \
                             (status {status})"
                        );
                    }
                    if let Some(t) = d.qps.get_mut(&index) {
                        t.held = false;
                    }
                    // A remote access error is the responder's too (the specification's
                    // class C): its QP goes to ERR as well, as the software engine does.
                    let responder = match peer_qp {
                        Some(_) if status == wc_status::REM_ACCESS_ERR => peer_of.map(|(p, _)| p),
                        _ => None,
                    };
                    self.device_complete_error(
                        send_cq,
                        wqe.header.wr_id,
                        wc_opcode_of(wqe.header.opcode),
                        qpn,
                        status,
                    );
                    self.device_fail_qp(index);
                    if let Some(responder) = responder {
                        self.device_fail_qp(responder);
                    }
                    done += 1;
                    break;
                }
            };
            let inline_data = wqe.inline(&qp.sq_slot);
            let inline_sge = [RealSge {
                addr: inline_data.as_ptr() as u64,
                length: inline_data.len() as u32,
                lkey: 0,
            }];
            let request = SendRequest {
                wr_id: wqe.header.wr_id,
                opcode: real.opcode,
                sges: if real.inline {
                    &inline_sge
                } else {
                    real.sges()
                },
                signaled: real.signaled,
                fence: real.fence,
                inline: real.inline,
            };
            let Some(twin) = d.qps.get_mut(&index) else {
                break;
            };
            match twin.qp.post_send(&request) {
                Ok(()) => {
                    twin.held = false;
                    done += 1;
                }
                Err(e) if queue_full(&e) => {
                    // Kept in the slot; posted again next pass.
                    twin.held = true;
                    break;
                }
                Err(e) => {
                    twin.held = false;
                    if debug_enabled() {
                        log::info!("RDMA device path: QP {qpn:#x}: post failed: {e}");
                    }
                    self.device_complete_error(
                        send_cq,
                        wqe.header.wr_id,
                        wc_opcode_of(wqe.header.opcode),
                        qpn,
                        wc_status::LOC_QP_OP_ERR,
                    );
                    self.device_fail_qp(index);
                    done += 1;
                    break;
                }
            }
        }
        if popped {
            if let Some(qp) = self.qps.get_mut(index) {
                qp.sq.release();
            }
        }
        done
    }

    /// A device QP in ERR: what is still on its rings completes with IBV_WC_WR_FLUSH_ERR (the
    /// device flushes what it was given itself), as far as the CQs have room.
    fn device_flush(&mut self, index: QpId) -> usize {
        let mut done = 0;
        for send in [true, false] {
            let mut popped = false;
            while done < 2 * BATCH {
                let Some(qp) = self.qps.get(index) else {
                    return done;
                };
                let cq = if send { qp.send_cq } else { qp.recv_cq };
                if !self.room(cq, 1) {
                    break;
                }
                let Some(qp) = self.qps.get_mut(index) else {
                    return done;
                };
                let (ring, slot) = if send {
                    (&mut qp.sq, &mut qp.sq_slot)
                } else {
                    (&mut qp.rq, &mut qp.rq_slot)
                };
                match ring.pop(slot) {
                    Ok(true) => popped = true,
                    Ok(false) => break,
                    Err(e) => {
                        self.break_qp(index, e);
                        return done;
                    }
                }
                let (wr_id, opcode) = if send {
                    let h = SendWqeHeader::read(slot);
                    (h.wr_id, wc_opcode_of(h.opcode))
                } else {
                    (
                        u64::from_le_bytes(slot[..8].try_into().unwrap_or_default()),
                        WC_RECV,
                    )
                };
                let qpn = qp.qpn;
                self.device_complete_error(cq, wr_id, opcode, qpn, wc_status::WR_FLUSH_ERR);
                done += 1;
            }
            if popped {
                if let Some(qp) = self.qps.get_mut(index) {
                    if send {
                        qp.sq.release();
                    } else {
                        qp.rq.release();
                    }
                }
            }
        }
        done
    }

    /// Pushes a completion with an error status (room was checked).
    fn device_complete_error(&mut self, cq: CqId, wr_id: u64, opcode: u32, qpn: u32, status: u32) {
        let cqe = Cqe {
            wr_id,
            status,
            opcode,
            qp_num: qpn,
            ..Cqe::default()
        };
        self.push_cqe(cq, &cqe);
    }

    /// Moves the device's completions of CQ `index` into its ring, as many as it has room for,
    /// with the containers' QP numbers.
    fn device_poll_cq(&mut self, index: CqId) -> usize {
        let Some(c) = self.cqs.get_mut(index) else {
            return 0;
        };
        if c.broken {
            return 0;
        }
        let free = match c.ring.free_slots() {
            Ok(free) => free as usize,
            Err(e) => {
                c.broken = true;
                let owner = c.owner;
                self.break_owner(owner, e);
                return 0;
            }
        };
        let Some(d) = self.device.as_deref() else {
            return 0;
        };
        let Some(twin) = d.cqs.get(&index) else {
            return 0;
        };
        let mut batch = [Completion::default(); POLL_BATCH];
        let n = free.min(POLL_BATCH);
        if n == 0 {
            return 0;
        }
        let got = match twin.poll(&mut batch[..n]) {
            Ok(got) => got,
            Err(e) => {
                log::warn!("RDMA device path: polling a CQ: {e}");
                return 0;
            }
        };
        let mut cqes = [Cqe::default(); POLL_BATCH];
        let mut kept = 0;
        for c in &batch[..got] {
            // A completion of a QP destroyed since has no one to go to.
            let Some(virtual_qpn) = d.directory.virtual_of(c.qp_num) else {
                continue;
            };
            let src = d.directory.virtual_of(c.src_qp).unwrap_or(0);
            cqes[kept] = translate_completion(c, virtual_qpn, src);
            kept += 1;
        }
        for cqe in &cqes[..kept] {
            self.push_cqe(index, cqe);
        }
        got
    }
}
