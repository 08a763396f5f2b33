//! One attached shim process as its shard sees it: the connection, the shared region, the two
//! rings, and the request handlers. Everything read from the region is untrusted.

use freeflow_proto::attach::{wake_futex_consumer, ShimKind, REPLY_RING, REQUEST_RING};
use freeflow_proto::control::ContainerEntry;
use freeflow_proto::msg::{op, status, MsgHeader, HEADER_LEN, REPLY};
use freeflow_proto::region::{RegionError, SharedRegion};
use freeflow_proto::{Consumer, Producer, RingError, RingGeometry, Wake};
use std::os::fd::OwnedFd;

/// Requests one attachment may have served per visit before the shard moves on (fairness).
pub const BATCH: usize = 64;

#[derive(Debug)]
pub struct Attachment {
    pub id: u32,
    pub container: ContainerEntry,
    pub pid: i32,
    pub kind: ShimKind,
    pub conn: OwnedFd,
    requests: Consumer,
    replies: Producer,
    _region: SharedRegion,
    scratch: Vec<u8>,
    reply: Vec<u8>,
    nops_since_flush: u64,
}

/// What one visit to an attachment did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Visit {
    pub served: usize,
}

impl Attachment {
    /// Creates the shared region for a new attachment. Returns the attachment and the memfd to
    /// send to the shim.
    pub fn create(
        id: u32,
        container: ContainerEntry,
        pid: i32,
        kind: ShimKind,
        conn: OwnedFd,
        geometry: RingGeometry,
    ) -> Result<(Attachment, OwnedFd), RegionError> {
        let (region, memfd) = SharedRegion::create(
            &format!("freeflow-{}", container.name),
            &[geometry, geometry],
        )?;
        let requests = Consumer::new(region.ring(REQUEST_RING)?);
        let replies = Producer::new(region.ring(REPLY_RING)?);
        let slot = geometry.slot_size as usize;
        Ok((
            Attachment {
                id,
                container,
                pid,
                kind,
                conn,
                requests,
                replies,
                _region: region,
                scratch: vec![0; slot],
                reply: vec![0; slot],
                nops_since_flush: 0,
            },
            memfd,
        ))
    }

    /// Serves up to [`BATCH`] requests, then publishes replies and consumed slots once.
    /// An error means the container broke the ring protocol and must be detached.
    pub fn visit(&mut self) -> Result<Visit, RingError> {
        let mut served = 0;
        while served < BATCH {
            // Back-pressure: a request may need a reply slot; a container that does not read
            // its replies stalls only itself.
            if self.replies.free_slots()? == 0 {
                break;
            }
            if !self.requests.pop(&mut self.scratch)? {
                break;
            }
            served += 1;
            self.serve_one()?;
        }
        if served > 0 {
            self.requests.release();
            if self.replies.publish() == Wake::Needed {
                wake_futex_consumer(&self.replies);
            }
        }
        Ok(Visit { served })
    }

    fn serve_one(&mut self) -> Result<(), RingError> {
        // `scratch` is our private copy of the slot: checks made on it hold.
        let header = MsgHeader::decode(&self.scratch);
        let Some(body) = header.body(&self.scratch) else {
            return self.send_reply(header, status::BAD_LENGTH, 0);
        };
        match header.opcode {
            op::PING => {
                let len = body.len();
                self.reply[HEADER_LEN..HEADER_LEN + len].copy_from_slice(body);
                self.send_reply(header, status::OK, len)
            }
            op::NOP => {
                self.nops_since_flush += 1;
                Ok(())
            }
            op::FLUSH => {
                let count = std::mem::take(&mut self.nops_since_flush);
                self.reply[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&count.to_le_bytes());
                self.send_reply(header, status::OK, 8)
            }
            _ => self.send_reply(header, status::UNKNOWN_OP, 0),
        }
    }

    fn send_reply(
        &mut self,
        request: MsgHeader,
        status: u16,
        body_len: usize,
    ) -> Result<(), RingError> {
        let header = MsgHeader {
            opcode: request.opcode | REPLY,
            status,
            len: body_len as u32,
            cookie: request.cookie,
        };
        header.encode(&mut self.reply);
        // Room was checked before the request was taken, so this push cannot fail for space.
        let pushed = self.replies.push(&self.reply[..HEADER_LEN + body_len])?;
        debug_assert!(pushed);
        Ok(())
    }

    /// Raises the parked flag on the request ring; false if a request arrived meanwhile.
    pub fn prepare_park(&mut self) -> Result<bool, RingError> {
        self.requests.prepare_park()
    }

    pub fn unpark(&self) {
        self.requests.unpark();
    }
}
