//! A context's conversation with the router: one request at a time on the context's rings,
//! matched to its reply by cookie, and the memory file sent once per attachment on the attach
//! connection (before the first registration that needs it, so it is in the socket before the
//! router reads that registration from the ring).

use crate::error::VerbsError;
use freeflow_proto::attach::{AttachInfo, CallError, Session};
use freeflow_proto::doorbell::EventFd;
use freeflow_proto::fdpass;
use freeflow_proto::msg::{status, MsgHeader, HEADER_LEN};
use freeflow_proto::verbs::{
    Body, MemoryFileMsg, QueueFileKind, QueueFileMsg, VerbsStatus, MEMORY_FILE_SIZE, MIN_SLOT_SIZE,
    OWN_MEMORY_FILE,
};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long a verb waits for the router. Registration maps memory on the router's side; the
/// rest is table work. A router that does not answer in this time is stuck.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest reply body a verb receives.
pub const MAX_REPLY: usize = freeflow_proto::verbs::MAX_REPLY_BODY;

#[derive(Debug)]
pub struct Channel {
    session: Session,
    /// The process that opened the context: its rings are not a forked child's to use.
    owner: u32,
    next_cookie: u64,
    /// Generation of the memory file this attachment has (see `pages`).
    memory_generation: Option<u64>,
    /// Further memory files this attachment has (see `pages`), by number, with the regions
    /// registered in each: the router lets a file go with its last region, and so does this.
    further_files: Vec<(u16, u32)>,
    buf: Vec<u8>,
}

impl Channel {
    pub fn new(session: Session) -> Channel {
        let buf = vec![0; session.slot_size()];
        Channel {
            session,
            owner: std::process::id(),
            next_cookie: 1,
            memory_generation: None,
            further_files: Vec::new(),
            buf,
        }
    }

    /// The attach connection's descriptor, the context's `cmd_fd` (it lives as long as the
    /// channel).
    pub fn command_fd(&self) -> std::ffi::c_int {
        use std::os::fd::AsRawFd;
        self.session.connection().as_raw_fd()
    }

    pub fn info(&self) -> &AttachInfo {
        self.session.info()
    }

    fn check_owner(&self) -> Result<(), VerbsError> {
        if std::process::id() == self.owner {
            Ok(())
        } else {
            Err(VerbsError::ForkedContext)
        }
    }

    /// Sends `fd`, the process's memory file of `generation`, unless this attachment has it.
    pub fn ensure_memory_file(
        &mut self,
        fd: BorrowedFd<'_>,
        generation: u64,
    ) -> Result<(), VerbsError> {
        self.check_owner()?;
        if self.memory_generation == Some(generation) {
            return Ok(());
        }
        if self.memory_generation.is_some() {
            // The router takes one file per attachment; a new file means a new process
            // (check_owner rules that out), so this is a bug, not a case to handle.
            return Err(VerbsError::Protocol(
                "second memory file for one attachment".into(),
            ));
        }
        let msg = MemoryFileMsg {
            size: MEMORY_FILE_SIZE,
            file: OWN_MEMORY_FILE,
        };
        fdpass::send_with_fds(self.session.connection().as_fd(), &msg.encode(), &[fd])?;
        self.memory_generation = Some(generation);
        Ok(())
    }

    /// Sends further memory file `number` (`fd`, of `size` bytes), unless this attachment has
    /// it; a registration in it follows.
    pub fn ensure_further_file(
        &mut self,
        number: u16,
        fd: BorrowedFd<'_>,
        size: u64,
    ) -> Result<(), VerbsError> {
        self.check_owner()?;
        if self.further_files.iter().any(|&(n, _)| n == number) {
            return Ok(());
        }
        let msg = MemoryFileMsg { size, file: number };
        fdpass::send_with_fds(self.session.connection().as_fd(), &msg.encode(), &[fd])?;
        self.further_files.push((number, 0));
        Ok(())
    }

    /// Counts a registration in further file `number` that the router answered: one region
    /// more if it `succeeded`; a file left without regions is gone at the router, so here too.
    pub fn further_file_registered(&mut self, number: u16, succeeded: bool) {
        self.count_further(number, if succeeded { 1 } else { 0 });
    }

    /// Counts a region in further file `number` deregistered.
    pub fn further_file_deregistered(&mut self, number: u16) {
        self.count_further(number, -1);
    }

    fn count_further(&mut self, number: u16, change: i32) {
        if let Some(i) = self.further_files.iter().position(|&(n, _)| n == number) {
            let regions = self.further_files[i].1.saturating_add_signed(change);
            self.further_files[i].1 = regions;
            if regions == 0 {
                self.further_files.swap_remove(i);
            }
        }
    }

    /// A handle on the router shard's doorbell, for queues this context produces into.
    pub fn router_bell(&self) -> Result<EventFd, VerbsError> {
        Ok(self.session.router_bell().try_clone()?)
    }

    /// Takes the file of the `kind` object `handle` from the attach connection: the router
    /// sends it right before the reply that created the object, so it is there now. Files of
    /// earlier calls that timed out are dropped on the way.
    pub fn take_queue_file(
        &mut self,
        kind: QueueFileKind,
        handle: u32,
    ) -> Result<OwnedFd, VerbsError> {
        loop {
            let mut buf = [0u8; QueueFileMsg::LEN + 1];
            let got = match fdpass::recv_with_fds(
                self.session.connection().as_fd(),
                &mut buf,
                libc::MSG_DONTWAIT,
            ) {
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(VerbsError::Protocol(format!(
                        "the router sent no file for {kind:?} {handle}"
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if got.len == 0 && got.fds.is_empty() {
                return Err(VerbsError::RouterGone);
            }
            let msg = QueueFileMsg::decode(&buf[..got.len])
                .map_err(|e| VerbsError::Protocol(e.to_string()))?;
            let mut fds = got.fds.into_iter();
            if let (true, Some(fd), None) = (
                msg.kind == kind && msg.handle == handle && !got.truncated,
                fds.next(),
                fds.next(),
            ) {
                return Ok(fd);
            }
        }
    }

    /// Asks the router to destroy an object. A router that went away took the object with it:
    /// that counts as done.
    pub fn destroy(&mut self, opcode: u16, body: &[u8]) -> Result<(), VerbsError> {
        match self.call(opcode, body) {
            Ok(_) | Err(VerbsError::RouterGone) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sends a request that makes a queue object (or a new ring for one), decodes its reply
    /// `T`, and takes the file the router sent with it for the object `handle` names in the
    /// reply. A missing file does not undo the reply: the router's side exists then, for the
    /// caller to destroy.
    pub fn call_for_queue<T: Body>(
        &mut self,
        opcode: u16,
        body: &[u8],
        kind: QueueFileKind,
        handle: impl FnOnce(&T) -> u32,
    ) -> Result<(T, Result<OwnedFd, VerbsError>), VerbsError> {
        let reply = self.call(opcode, body)?.decode::<T>()?;
        let fd = self.take_queue_file(kind, handle(&reply));
        Ok((reply, fd))
    }

    /// Sends one request and waits for its reply. `Ok` holds the reply body of a successful
    /// verb; a refusal comes back as [`VerbsError::RouterRefused`].
    pub fn call(&mut self, opcode: u16, body: &[u8]) -> Result<ReplyBody, VerbsError> {
        self.check_owner()?;
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let header = MsgHeader {
            opcode,
            status: 0,
            len: body.len() as u32,
            cookie,
        };
        if !self.session.push(header, body).map_err(call_error)? {
            return Err(VerbsError::Protocol("request ring full".into()));
        }
        self.session.flush().map_err(call_error)?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = self
                .session
                .wait_reply(&mut self.buf, left)
                .map_err(call_error)?;
            // A reply to a call that timed out earlier: not ours, skip it.
            if reply.cookie != cookie {
                continue;
            }
            let body = reply
                .body(&self.buf)
                .ok_or_else(|| VerbsError::Protocol("reply longer than its slot".into()))?;
            return match reply.status {
                status::OK if body.len() <= MAX_REPLY => {
                    let mut out = ReplyBody {
                        bytes: [0; MAX_REPLY],
                        len: body.len(),
                    };
                    out.bytes[..body.len()].copy_from_slice(body);
                    Ok(out)
                }
                status::OK => Err(VerbsError::Protocol("reply body too long".into())),
                other => match VerbsStatus::from_u16(other) {
                    Some(refusal) => Err(VerbsError::RouterRefused(refusal)),
                    None => Err(VerbsError::Protocol(format!(
                        "router answered opcode {opcode:#x} with status {other}"
                    ))),
                },
            };
        }
    }
}

/// The body of a successful reply.
#[derive(Debug, Clone, Copy)]
pub struct ReplyBody {
    bytes: [u8; MAX_REPLY],
    len: usize,
}

impl ReplyBody {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The body as the reply `T` it should be; anything else is a protocol error.
    pub fn decode<T: Body>(&self) -> Result<T, VerbsError> {
        T::decode(self.bytes()).map_err(|e| VerbsError::Protocol(e.to_string()))
    }
}

fn call_error(e: CallError) -> VerbsError {
    match e {
        CallError::RouterGone => VerbsError::RouterGone,
        other => VerbsError::Protocol(other.to_string()),
    }
}

const _: () = assert!(HEADER_LEN + MAX_REPLY <= MIN_SLOT_SIZE as usize);
