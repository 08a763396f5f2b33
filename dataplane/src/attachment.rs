//! One attached shim process as its shard sees it: the connection, the shared region, the two
//! rings, and the request handlers. Everything read from the region is untrusted.
//!
//! A verbs shim's attachment has a context in the shard's verbs engine (`crate::verbs`), which
//! serves its verbs requests. Its connection carries one message from the shim after the
//! handshake, the shim's memory file; nothing else may arrive there. The other way, the engine
//! sends the files of the CQs, QPs and completion channels it creates.

use crate::sys::Untrusted;
use crate::verbs::{AttachmentId, Engine};
use freeflow_proto::attach::{wake_futex_consumer, ShimKind, REPLY_RING, REQUEST_RING};
use freeflow_proto::control::ContainerEntry;
use freeflow_proto::fdpass;
use freeflow_proto::msg::{op, status, MsgHeader, HEADER_LEN, REPLY};
use freeflow_proto::region::{RegionError, SharedRegion};
use freeflow_proto::verbs::{self as wire, MemoryFileMsg};
use freeflow_proto::{Consumer, Producer, RingError, RingGeometry, Wake};
use std::os::fd::{AsFd, OwnedFd};

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
    /// A verbs shim: its context lives in the shard's verbs engine, under this attachment's id.
    verbs: bool,
    /// Set when the connection carried something a shim must not send; the shard detaches.
    violation: Option<String>,
}

/// What reading the attach connection found.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// Everything waiting was taken: keep watching.
    Quiet,
    /// The process closed its end, or the connection broke.
    Closed,
    /// Something a shim must not send: the attachment must go.
    Violation(String),
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
        // Verbs requests (modify_qp, query_qp) need bigger slots than the default.
        let geometry = if kind == ShimKind::Verbs {
            RingGeometry {
                slot_size: geometry.slot_size.max(wire::MIN_SLOT_SIZE),
                ..geometry
            }
        } else {
            geometry
        };
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
                verbs: kind == ShimKind::Verbs,
                violation: None,
            },
            memfd,
        ))
    }

    /// This attachment's id as the verbs engine types it.
    pub fn engine_id(&self) -> AttachmentId {
        AttachmentId(self.id)
    }

    /// Serves up to [`BATCH`] requests, then publishes replies and consumed slots once.
    /// An error means the container broke the ring protocol and must be detached.
    pub fn visit(&mut self, engine: &mut Engine) -> Result<Visit, RingError> {
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
            self.serve_one(engine)?;
        }
        if served > 0 {
            self.requests.release();
            if self.replies.publish() == Wake::Needed {
                wake_futex_consumer(&self.replies);
            }
        }
        Ok(Visit { served })
    }

    fn serve_one(&mut self, engine: &mut Engine) -> Result<(), RingError> {
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
            opcode if wire::op::is_verbs(opcode) && self.verbs => self.serve_verbs(header, engine),
            _ => self.send_reply(header, status::UNKNOWN_OP, 0),
        }
    }

    fn serve_verbs(&mut self, header: MsgHeader, engine: &mut Engine) -> Result<(), RingError> {
        if header.opcode == wire::op::REG_MR {
            // The shim sends a memory file on the connection before the first registration
            // that uses it, so it is in the socket by now, even if the shard's watch on the
            // connection has not fired yet (one non-blocking read when there is none).
            match self.on_connection_readable(engine) {
                ConnectionEvent::Violation(why) => self.violation = Some(why),
                ConnectionEvent::Quiet | ConnectionEvent::Closed => {}
            }
        }
        let header_len = HEADER_LEN + header.len as usize;
        let (status, len) = engine.serve(
            self.engine_id(),
            self.conn.as_fd(),
            header.opcode,
            &self.scratch[HEADER_LEN..header_len],
            &mut self.reply[HEADER_LEN..],
        );
        self.send_reply(header, status, len)
    }

    /// Reads what waits on the attach connection. A verbs shim may send its memory file (once);
    /// anything else is a violation.
    pub fn on_connection_readable(&mut self, engine: &mut Engine) -> ConnectionEvent {
        if !self.verbs {
            let mut byte = [0u8; 64];
            return match crate::sys::recv_nonblocking(&self.conn, &mut byte) {
                Ok(None) => ConnectionEvent::Quiet,
                Ok(Some(0)) | Err(_) => ConnectionEvent::Closed,
                Ok(Some(_)) => {
                    ConnectionEvent::Violation("unexpected message on attach connection".into())
                }
            };
        }
        loop {
            let mut buf = [0u8; MemoryFileMsg::LEN + 1];
            let got = match fdpass::recv_with_fds(self.conn.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return ConnectionEvent::Quiet
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return ConnectionEvent::Closed,
            };
            // Every descriptor that came is the container's: one refused, or one too many,
            // closes on the closer thread (a FUSE file's or a lingering socket's close can
            // block), never on this shard.
            let fds: Vec<Untrusted> = got.fds.into_iter().map(Untrusted::new).collect();
            if got.len == 0 && fds.is_empty() {
                return ConnectionEvent::Closed;
            }
            let msg = match MemoryFileMsg::decode(&buf[..got.len]) {
                Ok(msg) if !got.truncated => msg,
                Ok(_) => return ConnectionEvent::Violation("memory file message truncated".into()),
                Err(e) => {
                    return ConnectionEvent::Violation(format!("bad memory file message: {e}"))
                }
            };
            let mut fds = fds.into_iter();
            let (Some(fd), None) = (fds.next(), fds.next()) else {
                return ConnectionEvent::Violation(
                    "a memory file message carries exactly one fd".into(),
                );
            };
            if let Err(e) = engine.adopt_memory_file(self.engine_id(), msg, fd) {
                return ConnectionEvent::Violation(format!("memory file refused: {e}"));
            }
        }
    }

    /// Why the attachment must go, if its connection carried something it must not.
    pub fn take_violation(&mut self) -> Option<String> {
        self.violation.take()
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
