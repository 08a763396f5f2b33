//! This process's conversation with the router's connection manager (freeflow_proto::cm): one
//! requests connection, opened on first use, and an attach per event channel whose descriptor
//! is the channel's `fd`.

use freeflow_os::poll::{poll, PollFd};
use freeflow_proto::attach::{attach_cm, ShimKind, SocketSession};
use freeflow_proto::cm::{CmOp, CmRecord, CHANNEL_TOKEN, CM_RECORD_LEN, EVENT, REPLY, REQUEST};
use freeflow_proto::fdpass;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

/// How long the attach handshake and one request may take: the router answers at once, so
/// only a stopped router makes a call wait this long (and then fail).
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why the router cannot be asked; an errno for the program.
#[derive(Debug)]
pub struct RouterError {
    pub errno: i32,
    pub why: String,
}

impl RouterError {
    fn gone(why: impl Into<String>) -> RouterError {
        RouterError {
            errno: libc::ENODEV,
            why: why.into(),
        }
    }
}

struct Requests {
    session: SocketSession,
    seq: u32,
}

static REQUESTS: Mutex<Option<Requests>> = Mutex::new(None);

fn attach(kind: ShimKind) -> Result<SocketSession, RouterError> {
    attach_cm(&freeflow_proto::runtime_dir(), kind, TIMEOUT)
        .map_err(|e| RouterError::gone(format!("no Freeflow router to ask: {e}")))
}

/// Sends `request` and returns the router's reply; a reply with an errno is an error.
pub fn call(op: CmOp, mut request: CmRecord) -> Result<CmRecord, RouterError> {
    let mut guard = REQUESTS.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        *guard = Some(Requests {
            session: attach(ShimKind::CmRequests)?,
            seq: 0,
        });
    }
    let conn = guard.as_mut().expect("set above");
    conn.seq = conn.seq.wrapping_add(1);
    request.seq = conn.seq;
    request.op = op as u16;
    let result = exchange(conn.session.conn.as_fd(), &request);
    if result.is_err() {
        // A broken connection is not reused: the next call attaches again.
        *guard = None;
    }
    let reply = result?;
    if reply.seq != request.seq || reply.op != request.op {
        *guard = None;
        return Err(RouterError::gone("the router answered another request"));
    }
    match reply.status {
        0 => Ok(reply),
        errno => Err(RouterError {
            errno,
            why: format!(
                "the router refused {op:?}: {}",
                std::io::Error::from_raw_os_error(errno)
            ),
        }),
    }
}

fn exchange(fd: BorrowedFd<'_>, request: &CmRecord) -> Result<CmRecord, RouterError> {
    fdpass::send_with_fds(fd, &request.encode(REQUEST), &[])
        .map_err(|e| RouterError::gone(format!("router connection: {e}")))?;
    let record = receive(fd, Some(TIMEOUT))?.ok_or_else(|| {
        RouterError::gone(format!("the router did not answer within {TIMEOUT:?}"))
    })?;
    CmRecord::decode(&record, REPLY)
        .map_err(|e| RouterError::gone(format!("bad reply from the router: {e}")))
}

/// One record from `fd`, waiting at most `timeout` (None: as the descriptor's blocking mode
/// says). `Ok(None)` when the time is up or, on a non-blocking descriptor, nothing waits.
fn receive(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, RouterError> {
    if let Some(timeout) = timeout {
        let mut fds = [PollFd::new(fd, libc::POLLIN)];
        match poll(&mut fds, Some(timeout)) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(None),
            Err(e) => return Err(RouterError::gone(format!("poll: {e}"))),
        }
    }
    let mut buf = vec![0u8; CM_RECORD_LEN + 1];
    match fdpass::recv_with_fds(fd, &mut buf, 0) {
        Ok(got) if got.len == 0 => Err(RouterError::gone("the router closed the connection")),
        Ok(got) => {
            buf.truncate(got.len);
            Ok(Some(buf))
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(RouterError {
            errno: libc::EINTR,
            why: "interrupted".into(),
        }),
        Err(e) => Err(RouterError::gone(format!("router connection: {e}"))),
    }
}

/// A new event channel: its connection and its token.
pub fn open_channel() -> Result<(OwnedFd, u64), RouterError> {
    let session = attach(ShimKind::CmChannel)?;
    let first = receive(session.conn.as_fd(), Some(TIMEOUT))?
        .ok_or_else(|| RouterError::gone("the router sent no channel token"))?;
    let token = CmRecord::decode(&first, EVENT)
        .ok()
        .filter(|r| r.op == CHANNEL_TOKEN && r.token != 0)
        .ok_or_else(|| RouterError::gone("the router's first message was not a channel token"))?
        .token;
    Ok((session.conn, token))
}

/// The next event of a channel: blocks unless the descriptor is non-blocking (then EAGAIN
/// when none waits), or at most `timeout` when given (then ETIMEDOUT).
pub fn next_event(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<CmRecord, RouterError> {
    match receive(fd, timeout)? {
        Some(b) => CmRecord::decode(&b, EVENT)
            .map_err(|e| RouterError::gone(format!("bad event from the router: {e}"))),
        None if timeout.is_some() => Err(RouterError {
            errno: libc::ETIMEDOUT,
            why: "no event in time".into(),
        }),
        None => Err(RouterError {
            errno: libc::EAGAIN,
            why: "no event waiting".into(),
        }),
    }
}
