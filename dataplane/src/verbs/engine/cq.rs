//! Completion channels and completion queues: `ibv_create_comp_channel`, `ibv_create_cq`,
//! `ibv_resize_cq` and their destruction, and the publishing of a pass's completions (with the
//! wake-up of armed CQs' channels).

use super::{context_mut, ring_slots, Engine};
use crate::verbs::ids::{AttachmentId, CqId, QpId};
use crate::verbs::{notify, VerbsError};
use freeflow_proto::region::SharedRegion;
use freeflow_proto::verbs::qp::QpState;
use freeflow_proto::verbs::{cq_flags, limits, CqCreated, CreateCq, QueueFileKind, ResizeCq};
use freeflow_proto::{Producer, RingGeometry, Wake};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

#[derive(Debug)]
pub(super) struct CompChannel {
    /// The write end of the channel's pipe.
    pipe: Arc<OwnedFd>,
    cqs: u32,
}

#[derive(Debug)]
pub(in crate::verbs) struct Cq {
    pub(in crate::verbs) owner: AttachmentId,
    handle: u32,
    pub(in crate::verbs) ring: Producer,
    channel: u32,
    notify: Option<Arc<OwnedFd>>,
    /// QPs that complete into it (destroying it is refused while there are any).
    pub(super) users: u32,
    pub(in crate::verbs) dirty: bool,
    /// In the engine's `published` list (see `Engine::completions_waiting`).
    pub(in crate::verbs) watched: bool,
    /// The consumer's head at the last check that found completions waiting in the ring (see
    /// `Engine::completions_waiting`); `None` when the last check found it empty.
    pub(in crate::verbs) untaken_at: Option<u32>,
    /// Completions carry the time they were produced (`cq_flags::TIMESTAMPS`).
    pub(in crate::verbs) stamped: bool,
    /// The owner wrote a corrupt index into the ring: it is no longer touched.
    pub(in crate::verbs) broken: bool,
    _region: SharedRegion,
}

impl Cq {
    /// Publishes the entries pushed since the last publish; a program that armed the CQ
    /// (`ibv_req_notify_cq`) gets the CQ's handle on its completion channel.
    fn publish(&mut self) {
        if self.ring.publish() == Wake::Needed {
            if let Some(pipe) = &self.notify {
                notify::notify(pipe, self.handle);
            }
        }
    }
}

/// The geometry of a CQ ring of at least `cqe` entries.
fn cq_geometry(cqe: u32) -> Result<RingGeometry, VerbsError> {
    RingGeometry {
        slot_size: 64,
        slot_count: ring_slots(cqe),
    }
    .validate()
    .map_err(|_| VerbsError::Invalid("cqe out of range"))
}

impl Engine {
    pub(super) fn cq_index(
        &self,
        attachment: AttachmentId,
        handle: u32,
    ) -> Result<CqId, VerbsError> {
        self.index_of(attachment, handle, "completion queue", |c| &c.cqs)
    }

    pub(super) fn create_channel(
        &mut self,
        attachment: AttachmentId,
        conn: BorrowedFd<'_>,
    ) -> Result<u32, VerbsError> {
        let ctx = context_mut(&mut self.contexts, attachment)?;
        if ctx.channels.len() >= limits::MAX_COMP_CHANNELS as usize {
            return Err(VerbsError::Limit("completion channels"));
        }
        // The router keeps the pipe's write end: a descriptor of the container's budget.
        let (handle, write) = self.budgets.charged(ctx, |ctx| {
            let (read, write) = notify::channel_pipe().map_err(VerbsError::PassFile)?;
            let handle = Self::new_handle(ctx);
            Self::pass_file(conn, QueueFileKind::Channel, handle, read.as_fd())?;
            Ok((handle, write))
        })?;
        ctx.channels.insert(
            handle,
            CompChannel {
                pipe: Arc::new(write),
                cqs: 0,
            },
        );
        Ok(handle)
    }

    pub(super) fn destroy_channel(
        &mut self,
        attachment: AttachmentId,
        handle: u32,
    ) -> Result<(), VerbsError> {
        let ctx = context_mut(&mut self.contexts, attachment)?;
        let ch = ctx
            .channels
            .get(&handle)
            .ok_or(VerbsError::NoSuchObject("completion channel", handle))?;
        if ch.cqs > 0 {
            return Err(VerbsError::ObjectBusy("completion channel", handle));
        }
        ctx.channels.remove(&handle);
        self.budgets.refund(ctx);
        Ok(())
    }

    pub(super) fn create_cq(
        &mut self,
        attachment: AttachmentId,
        conn: BorrowedFd<'_>,
        r: &CreateCq,
    ) -> Result<CqCreated, VerbsError> {
        let ctx = context_mut(&mut self.contexts, attachment)?;
        if r.cqe == 0 || r.cqe > limits::MAX_CQE {
            return Err(VerbsError::Invalid("cqe out of range"));
        }
        if r.comp_vector != 0 {
            return Err(VerbsError::Invalid("the device has one completion vector"));
        }
        if r.flags & !cq_flags::KNOWN != 0 {
            return Err(VerbsError::Invalid("unknown CQ flags"));
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
        let geometry = cq_geometry(r.cqe)?;
        // The router keeps the ring's mapping: a unit of the container's budget.
        let (handle, ring, region) = self.budgets.charged(ctx, |ctx| {
            let (region, memfd) = SharedRegion::create("freeflow-cq", &[geometry])?;
            let ring = Producer::new(region.ring(0)?);
            let handle = Self::new_handle(ctx);
            Self::pass_file(conn, QueueFileKind::Cq, handle, memfd.as_fd())?;
            Ok((handle, ring, region))
        })?;
        // Found above (for `notify`), when it is not 0.
        if let Some(channel) = ctx.channels.get_mut(&r.channel) {
            channel.cqs += 1;
        }
        let index = self.cqs.insert(Cq {
            owner: attachment,
            handle,
            ring,
            channel: r.channel,
            notify,
            users: 0,
            dirty: false,
            watched: false,
            untaken_at: None,
            stamped: r.flags & cq_flags::TIMESTAMPS != 0,
            broken: false,
            _region: region,
        });
        ctx.cqs.insert(handle, index);
        #[cfg(feature = "rdma-hw")]
        if let Err(e) = self.device_create_cq(index, geometry.slot_count) {
            let _ = self.destroy_cq(attachment, handle);
            return Err(e);
        }
        Ok(CqCreated {
            cq: handle,
            cqe: geometry.slot_count,
        })
    }

    pub(super) fn destroy_cq(
        &mut self,
        attachment: AttachmentId,
        handle: u32,
    ) -> Result<(), VerbsError> {
        let ctx = context_mut(&mut self.contexts, attachment)?;
        let &index = ctx
            .cqs
            .get(&handle)
            .ok_or(VerbsError::NoSuchObject("completion queue", handle))?;
        let cq = self.cqs.entry(index)?;
        if cq.users > 0 {
            return Err(VerbsError::ObjectBusy("completion queue", handle));
        }
        if let Some(ch) = ctx.channels.get_mut(&cq.channel) {
            ch.cqs -= 1;
        }
        ctx.cqs.remove(&handle);
        self.budgets.refund(ctx);
        self.cqs.remove(index);
        #[cfg(feature = "rdma-hw")]
        self.device_destroy_cq(index);
        self.dirty.retain(|&i| i != index);
        self.published.retain(|&i| i != index);
        Ok(())
    }

    /// Executes the send WQEs the caller's QPs in RTS have posted (at most
    /// `POSTED_SENDS_ROUNDS` batches each): a request that follows `ibv_post_send` in the
    /// program then sees the completions a device would have produced by the time the request
    /// reached it. Without this the shard may serve the request before its next pass over the
    /// send queues, and a program that posts sends and then shrinks the CQ below their
    /// completions (rdma-core's `test_resize_cq`) is not refused.
    fn run_posted_sends_of(&mut self, attachment: AttachmentId) {
        const POSTED_SENDS_ROUNDS: usize = 64;
        let mine: Vec<QpId> = self
            .qps
            .keys()
            .filter(|&i| {
                self.qps.get(i).is_some_and(|qp| {
                    qp.owner == attachment && qp.state == QpState::Rts && !qp.broken
                })
            })
            .collect();
        let mut now = None;
        for index in mine {
            for _ in 0..POSTED_SENDS_ROUNDS {
                if self.run_send_queue(index, &mut now) == 0 {
                    break;
                }
            }
        }
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
    pub(super) fn resize_cq(
        &mut self,
        attachment: AttachmentId,
        conn: BorrowedFd<'_>,
        r: &ResizeCq,
    ) -> Result<CqCreated, VerbsError> {
        let index = self.cq_index(attachment, r.cq)?;
        #[cfg(feature = "rdma-hw")]
        if self.device.is_some() {
            return Err(crate::verbs::hw::path::refuse(
                "resizing a CQ on the RDMA device path",
            ));
        }
        if r.cqe == 0 || r.cqe > limits::MAX_CQE {
            return Err(VerbsError::Invalid("cqe out of range"));
        }
        self.run_posted_sends_of(attachment);
        let cq = self.cqs.entry_mut(index)?;
        if cq.broken {
            return Err(VerbsError::Invalid("the CQ's ring is broken"));
        }
        cq.publish();
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
        let geometry = cq_geometry(r.cqe)?;
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

    /// Publishes every CQ with new entries once; a program that armed the CQ
    /// (`ibv_req_notify_cq`) gets the CQ's handle on its completion channel.
    pub(in crate::verbs) fn publish(&mut self) {
        while let Some(index) = self.dirty.pop() {
            let Some(cq) = self.cqs.get_mut(index) else {
                continue;
            };
            cq.dirty = false;
            cq.publish();
            // Only a shard serving QPs across hosts asks (see `completions_waiting`).
            if !cq.watched && self.remote.active() {
                cq.watched = true;
                self.published.push(index);
            }
        }
    }

    /// Whether a completion published since the last call still waits in its ring, the
    /// program not having polled it meanwhile; then each such CQ is forgotten until it gets
    /// completions again (so a CQ its program leaves full says so once, not at every call).
    /// A CQ whose program took nothing since the previous check that found it waiting does
    /// not count: its program is not polling, so it is not waiting for the core.
    ///
    /// The shard asks at its idle checks, a few microseconds after its last work: a program
    /// polling on a core of its own has taken its completions by then. One that has not is
    /// busy elsewhere or, typically, waiting for the core the shard holds (a program and its
    /// router sharing a core, as in `freeflow-bench rdma --hosts 2`): there the shard should
    /// give the core up rather than spin on (see the shard's `CoreSharing`).
    pub fn completions_waiting(&mut self) -> bool {
        let mut waiting = false;
        for index in self.published.drain(..) {
            let Some(cq) = self.cqs.get_mut(index) else {
                continue;
            };
            cq.watched = false;
            let untaken = !cq.broken && cq.ring.unconsumed().is_ok_and(|n| n > 0);
            let head = cq.ring.consumed();
            // A program that took nothing since the last check found its CQ waiting is not
            // polling it (it may never): that says nothing of the core, and must not let one
            // tenant make its shard park early for every other.
            waiting |= untaken && cq.untaken_at != Some(head);
            cq.untaken_at = untaken.then_some(head);
        }
        waiting
    }
}
