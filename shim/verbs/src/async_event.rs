//! A context's asynchronous events (`ibv_get_async_event`, `ibv_ack_async_event`): a bounded
//! queue in the library and the context's `async_fd`, an eventfd the library owns.
//!
//! The eventfd is in semaphore mode: each queued event adds one to its counter, and
//! `ibv_get_async_event` takes one (a blocking read, as on rdma-core's `async_fd`; EAGAIN if the
//! program made the fd non-blocking) and then the oldest event. So `poll`/`epoll` on `async_fd`
//! say readable exactly while events wait. The eventfd is the library's own (the router never
//! sees it): a program that clears O_NONBLOCK or never reads can stall only itself.
//!
//! Events come from the router and from the library itself. The router writes 8-byte records
//! ([`AsyncEventRecord`]: event type and the object's handle) into the context's event pipe,
//! whose read end it passed at open; the context's watcher thread (see [`crate::faults`])
//! sleeps in `poll(2)` on it and on the attach connection, and [`AsyncEvents::pump`] turns
//! records into events about the program's objects (a record whose object is already
//! destroyed is dropped). Why not hand the pipe itself to the program: the library must add
//! its own event, IBV_EVENT_DEVICE_FATAL, when the router goes (the watcher sees the attachment
//! hang up), and give each event its object's address. After the fatal event, the fd stays
//! readable and every further `ibv_get_async_event` fails with EIO, as on a disassociated
//! device. The queue holds at most [`QUEUE_BOUND`] events; more are dropped and counted (debug
//! log), which only a program that never reads its events sees.
//!
//! Acknowledgement counts as rdma-core's: each event returned for a QP, SRQ or CQ is counted
//! against that object, and [`AsyncEvents::wait_acked`] (called by the destroy verbs) waits until
//! the program has acknowledged every one of them.
#![allow(unsafe_code)]

use crate::registry::{debug, lock};
use freeflow_proto::verbs::AsyncEventRecord;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Condvar, Mutex};

/// `enum ibv_event_type` values the library raises itself (the router's are in
/// `freeflow_proto::verbs::async_event::event_type`).
pub mod event_type {
    pub const DEVICE_FATAL: u32 = 8;
}

/// Most events a context queues; a program that never reads its events loses the newest.
pub const QUEUE_BOUND: usize = 1024;

/// What an event is about: `union element` of `struct ibv_async_event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    Port(u8),
    /// The address of the program's `struct ibv_qp` / `ibv_srq` / `ibv_cq`.
    Object(usize),
}

/// `struct ibv_async_event`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IbvAsyncEvent {
    pub element: IbvAsyncElement,
    pub event_type: u32,
}

/// `union element` of `struct ibv_async_event`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IbvAsyncElement {
    pub object: usize,
    pub port_num: i32,
}

/// One queued event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    pub event_type: u32,
    pub element: Element,
}

impl AsyncEvent {
    /// The C form handed to the program.
    pub fn to_c(self) -> IbvAsyncEvent {
        let element = match self.element {
            Element::Port(port) => IbvAsyncElement {
                port_num: i32::from(port),
            },
            Element::Object(addr) => IbvAsyncElement { object: addr },
        };
        IbvAsyncEvent {
            element,
            event_type: self.event_type,
        }
    }
}

/// Why `ibv_get_async_event` returned no event.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// The read of the eventfd failed (EAGAIN when non-blocking, EINTR).
    #[error("async_fd: {0}")]
    Fd(#[from] io::Error),
    /// The device is gone and its fatal event was handed out.
    #[error("the device is gone")]
    DeviceGone,
}

#[derive(Debug, Default)]
struct Pending {
    events: VecDeque<AsyncEvent>,
    dropped: u64,
    fatal: bool,
    /// Per object: (events handed out, events acknowledged).
    counts: HashMap<usize, (u64, u64)>,
    /// Objects destroyed: a record of theirs still in the router's pipe is dropped, until a
    /// new object is made at the same address ([`AsyncEvents::forget_destroyed`]).
    destroyed: std::collections::HashSet<usize>,
}

/// A context's event queue and its `async_fd`.
#[derive(Debug)]
pub struct AsyncEvents {
    fd: OwnedFd,
    pending: Mutex<Pending>,
    acked: Condvar,
}

/// Added to the eventfd at the fatal event so that it stays readable for ever after (each later
/// `ibv_get_async_event` takes one and fails with EIO).
const STAY_READABLE: u64 = 1 << 40;

impl AsyncEvents {
    /// A new, empty queue with a blocking, close-on-exec semaphore eventfd.
    pub fn new() -> io::Result<AsyncEvents> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(AsyncEvents {
            // SAFETY: `raw` is a fresh fd nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
            pending: Mutex::new(Pending::default()),
            acked: Condvar::new(),
        })
    }

    /// The context's `async_fd`.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Queues `event` (dropped and counted beyond [`QUEUE_BOUND`], or after the fatal event).
    pub fn push(&self, event: AsyncEvent) {
        let mut p = lock(&self.pending);
        if let Element::Object(addr) = event.element {
            if p.destroyed.contains(&addr) {
                return;
            }
        }
        if p.fatal || p.events.len() >= QUEUE_BOUND {
            p.dropped += 1;
            debug(format_args!(
                "asynchronous event {event:?} dropped ({} so far): the program does not read \
                 its events",
                p.dropped
            ));
            return;
        }
        p.events.push_back(event);
        drop(p);
        self.add(1);
    }

    /// Reads the records waiting in the router's event pipe `pipe` (of the context at
    /// `context`) and queues their events. False when the pipe is closed (the router is gone)
    /// or broken.
    pub fn pump(&self, pipe: &OwnedFd, context: usize) -> bool {
        let mut buf = [0u8; 64 * AsyncEventRecord::LEN];
        // SAFETY: reads into a live buffer of its length from the pipe the watcher owns.
        let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted;
        }
        // Each record was written whole (8 bytes < PIPE_BUF), so the pipe holds whole records.
        for chunk in buf[..n as usize].chunks_exact(AsyncEventRecord::LEN) {
            let Ok(r) = AsyncEventRecord::decode(chunk) else {
                continue;
            };
            match crate::registry::find_queue(context, r.is_about_srq(), r.handle) {
                Some(addr) => self.push(AsyncEvent {
                    event_type: r.event_type,
                    element: Element::Object(addr),
                }),
                None => debug(format_args!(
                    "event {r:?} about an object already destroyed"
                )),
            }
        }
        true
    }

    /// Queues IBV_EVENT_DEVICE_FATAL (once) and leaves the fd readable for ever.
    pub fn device_fatal(&self) {
        let mut p = lock(&self.pending);
        if p.fatal {
            return;
        }
        p.events.push_back(AsyncEvent {
            event_type: event_type::DEVICE_FATAL,
            element: Element::Port(crate::device::PORT),
        });
        p.fatal = true;
        drop(p);
        self.add(1 + STAY_READABLE);
    }

    fn add(&self, n: u64) {
        let bytes = n.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live array to our own eventfd. It cannot overflow: at
        // most QUEUE_BOUND + 1 + STAY_READABLE is ever outstanding.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), bytes.as_ptr().cast(), 8) };
    }

    /// `ibv_get_async_event`: waits on the fd (unless the program made it non-blocking), then
    /// takes the oldest event and counts it against its object.
    pub fn get(&self) -> Result<AsyncEvent, GetError> {
        let event = loop {
            let mut counter = 0u64;
            // SAFETY: reads at most 8 bytes into a live u64 from the eventfd we own.
            let n =
                unsafe { libc::read(self.fd.as_raw_fd(), (&mut counter as *mut u64).cast(), 8) };
            if n < 0 {
                return Err(io::Error::last_os_error().into());
            }
            let mut p = lock(&self.pending);
            match p.events.pop_front() {
                Some(event) => break (event, p),
                None if p.fatal => return Err(GetError::DeviceGone),
                // A stale count: its event went with its destroyed object.
                None => {}
            }
        };
        let (event, mut p) = event;
        if let Element::Object(addr) = event.element {
            p.counts.entry(addr).or_default().0 += 1;
        }
        Ok(event)
    }

    /// `ibv_ack_async_event` of an event about `element`.
    pub fn ack(&self, element: Element) {
        if let Element::Object(addr) = element {
            if let Some(c) = lock(&self.pending).counts.get_mut(&addr) {
                c.1 += 1;
            }
            self.acked.notify_all();
        }
    }

    /// Waits until every event handed out about the object at `addr` is acknowledged (as
    /// rdma-core's destroy verbs do), drops its queued ones, and forgets it.
    pub fn wait_acked(&self, addr: usize) {
        let mut p = lock(&self.pending);
        while p.counts.get(&addr).is_some_and(|c| c.1 < c.0) {
            p = self.acked.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.counts.remove(&addr);
        p.destroyed.insert(addr);
        // Its queued events go (the object is about to be freed); their counts stay in the
        // eventfd, and `get` skips such stale counts.
        p.events.retain(|e| e.element != Element::Object(addr));
    }

    /// A new object lives at `addr`: its events are welcome again.
    pub fn forget_destroyed(&self, addr: usize) {
        lock(&self.pending).destroyed.remove(&addr);
    }
}

/// The object an event returned to the program is about (None for port and device events,
/// which nothing waits for).
pub fn element_of(event: &IbvAsyncEvent) -> Option<Element> {
    use event_type::*;
    match event.event_type {
        DEVICE_FATAL | 9 | 10 | 11..=13 | 17 | 18 => None,
        // SAFETY: every other event type names an object by its address (`qp`, `srq`, `cq` or
        // `wq`, all pointers at the same place).
        _ => Some(Element::Object(unsafe { event.element.object })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freeflow_proto::verbs::async_event::event_type::SRQ_LIMIT_REACHED;

    fn nonblocking(events: &AsyncEvents) {
        // SAFETY: F_GETFL/F_SETFL on the test's own eventfd.
        unsafe {
            let flags = libc::fcntl(events.raw_fd(), libc::F_GETFL);
            assert!(libc::fcntl(events.raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0);
        }
    }

    fn readable(events: &AsyncEvents) -> bool {
        let mut fd = libc::pollfd {
            fd: events.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, no wait.
        unsafe { libc::poll(&mut fd, 1, 0) == 1 }
    }

    fn srq_limit(addr: usize) -> AsyncEvent {
        AsyncEvent {
            event_type: SRQ_LIMIT_REACHED,
            element: Element::Object(addr),
        }
    }

    #[test]
    fn events_come_out_in_order_and_the_fd_is_readable_while_they_wait() {
        let events = AsyncEvents::new().unwrap();
        nonblocking(&events);
        assert!(!readable(&events));
        assert!(
            matches!(events.get(), Err(GetError::Fd(e)) if e.raw_os_error() == Some(libc::EAGAIN))
        );
        events.push(srq_limit(0x1000));
        events.push(srq_limit(0x2000));
        assert!(readable(&events));
        assert_eq!(events.get().unwrap(), srq_limit(0x1000));
        assert!(readable(&events));
        assert_eq!(events.get().unwrap(), srq_limit(0x2000));
        assert!(!readable(&events));
    }

    #[test]
    fn device_fatal_comes_once_then_every_get_fails_and_the_fd_stays_readable() {
        let events = AsyncEvents::new().unwrap();
        events.device_fatal();
        events.device_fatal();
        events.push(srq_limit(0x1000));
        let fatal = events.get().unwrap();
        assert_eq!(fatal.event_type, event_type::DEVICE_FATAL);
        assert_eq!(fatal.element, Element::Port(1));
        // SAFETY: a port event's element is its port number.
        assert_eq!(unsafe { fatal.to_c().element.port_num }, 1);
        assert!(element_of(&fatal.to_c()).is_none());
        for _ in 0..3 {
            assert!(readable(&events));
            assert!(matches!(events.get(), Err(GetError::DeviceGone)));
        }
    }

    #[test]
    fn a_program_that_never_reads_loses_the_newest_events_only() {
        let events = AsyncEvents::new().unwrap();
        nonblocking(&events);
        for i in 0..QUEUE_BOUND + 5 {
            events.push(srq_limit(i));
        }
        for i in 0..QUEUE_BOUND {
            assert_eq!(events.get().unwrap(), srq_limit(i));
        }
        assert!(events.get().is_err());
        assert_eq!(lock(&events.pending).dropped, 5);
    }

    #[test]
    fn destroy_waits_for_the_acks_and_drops_queued_events_of_the_object() {
        let events = std::sync::Arc::new(AsyncEvents::new().unwrap());
        nonblocking(&events);
        events.push(srq_limit(0x1000));
        events.push(srq_limit(0x1000));
        events.push(srq_limit(0x2000));
        let got = events.get().unwrap();
        assert_eq!(element_of(&got.to_c()), Some(Element::Object(0x1000)));
        let waiter = {
            let events = events.clone();
            std::thread::spawn(move || events.wait_acked(0x1000))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "destroy returned before the ack");
        events.ack(Element::Object(0x1000));
        waiter.join().unwrap();
        // The second event of the destroyed object is gone; its count is skipped.
        assert_eq!(events.get().unwrap(), srq_limit(0x2000));
        assert!(events.get().is_err());
        // A record still in flight for it is dropped, until a new object lives there.
        events.push(srq_limit(0x1000));
        assert!(events.get().is_err());
        events.forget_destroyed(0x1000);
        events.push(srq_limit(0x1000));
        assert_eq!(events.get().unwrap(), srq_limit(0x1000));
    }
}
