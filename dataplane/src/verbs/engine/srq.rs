//! Shared receive queues: `ibv_create_srq`, `ibv_modify_srq`, `ibv_query_srq` and
//! `ibv_destroy_srq`. An SRQ is a ring of receive WQEs of its own; a QP created with one takes
//! the receives of incoming messages from it, and the keys of those receives are checked in
//! the SRQ's protection domain.

use super::{context_mut, ring_slots, slot_size, Engine};
use crate::verbs::ids::{AttachmentId, PdId, SrqId};
use crate::verbs::VerbsError;
use freeflow_proto::region::SharedRegion;
use freeflow_proto::verbs::async_event::event_type;
use freeflow_proto::verbs::srq::{CreateSrq, ModifySrq, SrqAttr, SrqAttrMask, SrqCreated};
use freeflow_proto::verbs::work::{RecvWqe, MAX_SGE};
use freeflow_proto::verbs::{limits, QueueFileKind};
use freeflow_proto::{Consumer, RingGeometry};
use std::os::fd::{AsFd, BorrowedFd};

/// A shared receive queue: receive WQEs that any QP created with it consumes.
#[derive(Debug)]
pub(in crate::verbs) struct Srq {
    pub(in crate::verbs) owner: AttachmentId,
    /// Its protection domain: the keys of its receives are checked there.
    pub(in crate::verbs) pd: PdId,
    pub(in crate::verbs) ring: Consumer,
    /// Its attributes; `srq_limit` is the armed limit (0: disarmed).
    pub(in crate::verbs) attr: SrqAttr,
    /// The owner's handle for it (named in its events).
    pub(in crate::verbs) handle: u32,
    /// QPs created with it (destroying it is refused while there are any).
    pub(super) users: u32,
    /// The owner wrote a corrupt index into the ring: it is no longer touched.
    pub(in crate::verbs) broken: bool,
    _region: SharedRegion,
}

impl Engine {
    fn srq_index(&self, attachment: AttachmentId, handle: u32) -> Result<SrqId, VerbsError> {
        self.index_of(attachment, handle, "shared receive queue", |c| &c.srqs)
    }

    /// `ibv_create_srq`: a ring of at least `max_wr` receive slots of `max_sge` entries in the
    /// caller's PD (held, like a QP holds it). A zero `max_wr` is EINVAL; `max_sge` 0 gets 1.
    pub(super) fn create_srq(
        &mut self,
        attachment: AttachmentId,
        conn: BorrowedFd<'_>,
        r: &CreateSrq,
    ) -> Result<SrqCreated, VerbsError> {
        if r.max_wr == 0 || r.max_wr > limits::MAX_SRQ_WR || r.max_sge > limits::MAX_SRQ_SGE {
            return Err(VerbsError::Invalid("SRQ capacity out of range"));
        }
        let ctx = context_mut(&mut self.contexts, attachment)?;
        if ctx.srqs.len() >= limits::MAX_SRQ as usize {
            return Err(VerbsError::Limit("shared receive queues"));
        }
        let pd = PdId(r.pd);
        let slot = slot_size(RecvWqe::slot_bytes(r.max_sge.max(1)));
        let geometry = RingGeometry {
            slot_size: slot,
            slot_count: ring_slots(r.max_wr),
        };
        // The router keeps the ring's mapping: a unit of the container's budget.
        let budgets = &mut self.budgets;
        let (handle, region, ring) = Self::holding_pd(ctx, pd, |ctx| {
            budgets.charged(ctx, |ctx| {
                let (region, memfd) = SharedRegion::create("freeflow-srq", &[geometry])?;
                let ring = Consumer::new(region.ring(0)?);
                let handle = Self::new_handle(ctx);
                Self::pass_file(conn, QueueFileKind::Srq, handle, memfd.as_fd())?;
                Ok((handle, region, ring))
            })
        })?;
        let attr = SrqAttr {
            max_wr: geometry.slot_count,
            max_sge: ((slot as usize - RecvWqe::slot_bytes(0)) / 16).min(MAX_SGE as usize) as u32,
            srq_limit: 0,
        };
        let index = self.srqs.insert(Srq {
            owner: attachment,
            pd,
            ring,
            attr,
            handle,
            users: 0,
            broken: false,
            _region: region,
        });
        ctx.srqs.insert(handle, index);
        Ok(SrqCreated { srq: handle, attr })
    }

    /// `ibv_modify_srq`. Resizing (IBV_SRQ_MAX_WR) is refused as by a device without
    /// IBV_DEVICE_SRQ_RESIZE (EINVAL). IBV_SRQ_LIMIT arms the limit (EINVAL beyond `max_wr`;
    /// 0 disarms): one shot, IBV_EVENT_SRQ_LIMIT_REACHED goes to the owner's event pipe when
    /// taking a receive leaves fewer than the limit posted, and disarms it
    /// ([`Engine::check_srq_limit`]).
    pub(super) fn modify_srq(
        &mut self,
        attachment: AttachmentId,
        r: &ModifySrq,
    ) -> Result<(), VerbsError> {
        let index = self.srq_index(attachment, r.srq)?;
        let attr = self.srqs.entry(index)?.attr;
        let Some(mask) = SrqAttrMask::from_bits(r.attr_mask) else {
            return Err(VerbsError::Invalid("unknown SRQ attribute mask bits"));
        };
        if mask.contains(SrqAttrMask::MAX_WR) {
            return Err(VerbsError::Invalid("the device cannot resize an SRQ"));
        }
        if mask.contains(SrqAttrMask::LIMIT) {
            if r.srq_limit > attr.max_wr {
                return Err(VerbsError::Invalid("SRQ limit beyond max_wr"));
            }
            self.srqs.entry_mut(index)?.attr.srq_limit = r.srq_limit;
        }
        Ok(())
    }

    /// After a receive was taken from the SRQ at `index`: if its armed limit is now crossed
    /// (fewer receives posted than the limit), raise IBV_EVENT_SRQ_LIMIT_REACHED and disarm.
    pub(in crate::verbs) fn check_srq_limit(&mut self, index: SrqId) {
        let Some(q) = self.srqs.get_mut(index) else {
            return;
        };
        if q.attr.srq_limit == 0 {
            return;
        }
        // The producer's tail as it is now: the shim may have posted since the cached view.
        match q.ring.available_now() {
            Ok(posted) if posted < q.attr.srq_limit => {}
            _ => return,
        }
        q.attr.srq_limit = 0;
        let (owner, handle) = (q.owner, q.handle);
        self.raise_event(owner, event_type::SRQ_LIMIT_REACHED, handle);
    }

    pub(super) fn destroy_srq(
        &mut self,
        attachment: AttachmentId,
        handle: u32,
    ) -> Result<(), VerbsError> {
        let index = self.srq_index(attachment, handle)?;
        if self.srqs.entry(index)?.users > 0 {
            return Err(VerbsError::ObjectBusy("shared receive queue", handle));
        }
        let srq = self.srqs.take(index)?;
        let ctx = context_mut(&mut self.contexts, attachment)?;
        ctx.srqs.remove(&handle);
        ctx.table.release_pd(srq.pd);
        self.budgets.refund(ctx);
        Ok(())
    }

    /// `ibv_query_srq`: the SRQ's attributes.
    pub(super) fn query_srq(
        &self,
        attachment: AttachmentId,
        handle: u32,
    ) -> Result<SrqAttr, VerbsError> {
        let index = self.srq_index(attachment, handle)?;
        Ok(self.srqs.entry(index)?.attr)
    }
}
