//! The shard's io_uring: readiness polls on doorbells and attach connections, cancellations,
//! and the blocking wait used to park. Submissions are batched: pushes only queue, the shard
//! submits once per loop iteration, and checking for completions reads shared memory only.

use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::RawFd;

pub struct Uring {
    ring: IoUring,
    queued: u32,
}

impl Uring {
    pub fn new(entries: u32) -> io::Result<Uring> {
        Ok(Uring {
            ring: IoUring::new(entries)?,
            queued: 0,
        })
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entries pushed here reference no memory of ours (poll and cancel
            // take only an fd and a user_data value). Fds must stay open until the entry is
            // submitted: callers submit (`submit_queued`) before closing any fd they polled.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.queued += 1;
                return Ok(());
            }
            // Submission queue full: hand what is queued to the kernel and retry.
            self.submit_queued()?;
        }
    }

    /// Queues a one-shot readiness poll on `fd`.
    pub fn poll_add(&mut self, fd: RawFd, events: u32, user_data: u64) -> io::Result<()> {
        self.push(
            opcode::PollAdd::new(types::Fd(fd), events)
                .build()
                .user_data(user_data),
        )
    }

    /// Queues cancellation of the in-flight request tagged `user_data`.
    pub fn cancel(&mut self, user_data: u64) -> io::Result<()> {
        self.push(
            opcode::AsyncCancel::new(user_data)
                .build()
                .user_data(CANCEL_TAG),
        )
    }

    /// Submits queued entries, if any (one syscall; none when nothing is queued).
    pub fn submit_queued(&mut self) -> io::Result<()> {
        if self.queued > 0 {
            self.ring.submit()?;
            self.queued = 0;
        }
        Ok(())
    }

    /// Submits queued entries and blocks until at least one completion is ready.
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {
                self.queued = 0;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// As [`Uring::submit_and_wait`], but returns after `timeout` at the latest.
    pub fn submit_and_wait_timeout(&mut self, timeout: std::time::Duration) -> io::Result<()> {
        let ts = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {
                self.queued = 0;
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                self.queued = 0;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Hands every ready completion to `f` as (user_data, result). Cancellation acknowledgements
    /// are swallowed here.
    pub fn drain(&mut self, mut f: impl FnMut(u64, i32)) -> usize {
        let mut n = 0;
        for cqe in self.ring.completion() {
            n += 1;
            if cqe.user_data() != CANCEL_TAG {
                f(cqe.user_data(), cqe.result());
            }
        }
        n
    }

    /// True if a completion is waiting (a read of the shared completion ring, no syscall).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }
}

/// user_data of cancellation requests themselves.
const CANCEL_TAG: u64 = u64::MAX;
