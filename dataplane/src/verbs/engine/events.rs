//! Asynchronous events, router side: each context may open one event pipe
//! ([`op::CREATE_ASYNC_EVENTS`]); the router keeps its write end (non-blocking) and writes an
//! [`AsyncEventRecord`] when an SRQ's armed limit is crossed (`srq`) or a QP that takes its
//! receives from an SRQ enters the error state ([`Engine::raise_last_wqe`]). The shim's watcher thread turns the records into its own
//! pollable `async_fd` (see the shim's `async_event`).
//!
//! Why a pipe, not slot messages on the attach connection: the shim reads that connection only
//! inside a verb's call (queue files precede replies), so unsolicited messages would interleave
//! with them; and a pipe's write end is the router's own open file, so a container that never
//! reads its events fills only its pipe (64 KiB: 8192 records) and the router's next write gets
//! EAGAIN: the record is dropped and counted, never waited for (as the completion channels,
//! see `notify`).

use super::{context_mut, Engine};
use crate::verbs::ids::{AttachmentId, QpId};
use crate::verbs::notify;
use crate::verbs::VerbsError;
use freeflow_proto::verbs::async_event::event_type;
use freeflow_proto::verbs::{AsyncEventRecord, QueueFileKind};
use std::os::fd::{AsFd, OwnedFd};

/// A context's event pipe.
#[derive(Debug)]
pub(in crate::verbs) struct EventPipe {
    write: OwnedFd,
    /// Records lost to a full pipe.
    pub(super) dropped: u64,
}

impl Engine {
    /// `CREATE_ASYNC_EVENTS`: the context's event pipe (once per context).
    pub(super) fn create_async_events(
        &mut self,
        attachment: AttachmentId,
        conn: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), VerbsError> {
        let ctx = context_mut(&mut self.contexts, attachment)?;
        if ctx.events.is_some() {
            return Err(VerbsError::Invalid(
                "the context's event pipe is open already",
            ));
        }
        // The router keeps the write end: a descriptor of the container's budget.
        let write = self.budgets.charged(ctx, |_| {
            let (read, write) = notify::channel_pipe().map_err(VerbsError::PassFile)?;
            Self::pass_file(conn, QueueFileKind::AsyncEvents, 0, read.as_fd())?;
            Ok(write)
        })?;
        ctx.events = Some(EventPipe { write, dropped: 0 });
        Ok(())
    }

    /// Raises an event for `owner`'s context. While the engine works on a request its contexts
    /// are taken out of it (see `exec`), so the event waits in `deferred_events` until
    /// [`Engine::flush_events`] (right after they are put back).
    pub(in crate::verbs) fn raise_event(
        &mut self,
        owner: AttachmentId,
        event_type: u32,
        handle: u32,
    ) {
        self.deferred_events
            .push((owner, AsyncEventRecord { event_type, handle }));
    }

    /// Writes the raised events into their contexts' pipes (nothing for a context without a
    /// pipe, or gone). Never blocks: a full pipe drops the record and counts it.
    pub(in crate::verbs) fn flush_events(&mut self) {
        if self.deferred_events.is_empty() {
            return;
        }
        for (owner, record) in std::mem::take(&mut self.deferred_events) {
            let Some(pipe) = self
                .contexts
                .get_mut(&owner)
                .and_then(|c| c.events.as_mut())
            else {
                continue;
            };
            if !notify::write_record(&pipe.write, &record.encode()) {
                pipe.dropped += 1;
            }
        }
    }

    /// A QP with an SRQ in the error state: IBV_EVENT_QP_LAST_WQE_REACHED, once per stay in
    /// it (as an HCA raises it when such a QP enters ERR: no receive of the SRQ will be taken
    /// for it any more, so the program may destroy it). Called by the poll loop, with the
    /// contexts in place.
    pub(super) fn raise_last_wqe(&mut self, index: QpId) {
        let Some(qp) = self.qps.get_mut(index) else {
            return;
        };
        if qp.srq.is_none() || qp.last_wqe_raised {
            return;
        }
        qp.last_wqe_raised = true;
        let owner = qp.owner;
        let handle = self.contexts.get(&owner).and_then(|c| {
            c.qps
                .iter()
                .find_map(|(&handle, &i)| (i == index).then_some(handle))
        });
        if let Some(handle) = handle {
            self.raise_event(owner, event_type::QP_LAST_WQE_REACHED, handle);
        }
    }
}
