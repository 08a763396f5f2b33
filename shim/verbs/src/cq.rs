//! Completion queues and completion channels: `ibv_create_cq`, `ibv_resize_cq`,
//! `ibv_destroy_cq`, the context ops `poll_cq` and `req_notify_cq` (reached through the inline
//! `ibv_poll_cq` and `ibv_req_notify_cq`), `ibv_create_comp_channel`, `ibv_destroy_comp_channel`,
//! `ibv_get_cq_event` and `ibv_ack_cq_events`.
//!
//! A CQ is a ring in memory shared with the router (a region it creates and passes on the
//! attach connection), which the router produces completions into in the layout of `struct
//! ibv_wc`. `poll_cq` pops slots straight into the program's array: an empty poll is a load of
//! the ring's tail, no system call. `req_notify_cq` raises the ring's parked flag (the ring's
//! park/wake protocol), so the router's next publish to that CQ writes the CQ's handle into the
//! completion channel's pipe, whose read end is `channel->fd` (poll/epoll work on it).
//!
//! Resizing replaces the ring: the router makes a new one, copies the completions not yet
//! polled into its start and produces only there from then on. The CQ's ring lock is held
//! from before the request until the new ring is in place, so a `poll_cq` in another thread
//! waits for the hand-over instead of taking from the old ring while the router copies it
//! (which would deliver those completions twice), and a `req_notify_cq` made before the resize
//! is carried over by the router.
//!
//! The fast-path ops receive the program's `struct ibv_cq *`: as every provider does, the
//! library takes it to be the first field of its own object (checking a magic number first);
//! the slow-path verbs look it up in the registry.
#![allow(unsafe_code)]

use crate::abi::{IbvCompChannel, IbvContext, IbvCq, IbvCqEx, IbvWc};
use crate::error::{returns_errno, returns_minus_one, returns_object, VerbsError};
use crate::faults::{CqUser, CqUsers, Gone, QpQueues};
use crate::ffi::{guard, set_errno};
use crate::registry::object::{self, HandedOut};
use crate::registry::{self, lock, QueueEntry, QueueKind};
use crate::shared_core::{self, IdlePolls};
use freeflow_proto::region::SharedRegion;
use freeflow_proto::verbs::work::Cqe;
use freeflow_proto::verbs::{
    limits, op, Body, CqCreated, CreateCq, ObjectHandle, QueueFileKind, ResizeCq,
};
use freeflow_proto::Consumer;
use std::collections::BTreeMap;
use std::ffi::{c_int, c_uint, c_void};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Condvar, Mutex};

symbol_versions! {
    "IBVERBS_1.0": [ibv_create_comp_channel, ibv_destroy_comp_channel],
    "IBVERBS_1.1": [
        ibv_create_cq, ibv_resize_cq, ibv_destroy_cq, ibv_get_cq_event, ibv_ack_cq_events,
    ],
}

/// What the library keeps for a CQ, behind its `struct ibv_cq`.
pub(crate) struct CqState {
    context: usize,
    handle: u32,
    /// The CQ's ring and the QPs completing on it.
    ring: Mutex<CqRing>,
    /// Its context's router is gone: its QPs' outstanding requests are flushed.
    gone: Gone,
    /// Events handed out by `ibv_get_cq_event` and acknowledged by `ibv_ack_cq_events`.
    events: Mutex<(u64, u64)>,
    acked: Condvar,
    /// The CQ's channel, or null.
    channel: *mut IbvCompChannel,
    /// The completion the poll API (`ibv_start_poll`, `ibv_next_poll`) took last, as the
    /// router stamped it: what the `ibv_wc_read_*` operations read.
    pub(crate) current: Mutex<[u8; Cqe::STAMPED_LEN]>,
}

/// A CQ's ring (it keeps the region's mapping alive; replaced by a resize) and the QPs whose
/// requests complete on it, for [`crate::faults`].
struct CqRing {
    ring: Consumer,
    users: CqUsers,
    /// Empty polls in a row, and the router's cores.
    idle: IdlePolls,
}

impl HandedOut for IbvCqEx {
    type State = CqState;
    const MAGIC: u64 = u64::from_le_bytes(*b"FFCQv001");
    const NAME: &'static str = "CQ";
}

/// What the library keeps for a completion channel.
pub(crate) struct ChannelState {
    handle: u32,
    /// The read end of the router's pipe (`channel->fd`).
    fd: OwnedFd,
    /// CQs using this channel: handle to `struct ibv_cq` address.
    cqs: Mutex<BTreeMap<u32, usize>>,
    /// Its context's router is gone.
    gone: Gone,
}

impl HandedOut for IbvCompChannel {
    type State = ChannelState;
    const MAGIC: u64 = u64::from_le_bytes(*b"FFCCv001");
    const NAME: &'static str = "completion channel";
}

/// The state behind `cq`, a CQ the registry holds.
fn registered_cq<'a>(cq: *mut IbvCq) -> Result<(QueueEntry, &'a CqState), VerbsError> {
    let entry = registry::queue(cq as usize, QueueKind::Cq)?;
    // SAFETY: the registry holds `cq`: a live CQ of this library.
    let state = unsafe { cq_state(cq) }.ok_or(VerbsError::UnknownObject("completion queue"))?;
    Ok((entry, state))
}

/// The state behind `cq`, if it is one of this library's CQs: every CQ is a `struct
/// ibv_cq_ex`, whose first fields are the `struct ibv_cq` programs pass.
///
/// # Safety
/// As [`object::state`].
pub(crate) unsafe fn cq_state<'a>(cq: *mut IbvCq) -> Option<&'a CqState> {
    // SAFETY: forwarded caller guarantee.
    unsafe { object::state(cq.cast::<IbvCqEx>()) }
}

fn create_comp_channel(context: *mut IbvContext) -> Result<*mut IbvCompChannel, VerbsError> {
    let key = context as usize;
    let state = registry::context(key)?;
    let gone = state.gone.clone();
    let (handle, fd) = {
        let mut channel = lock(&state.channel);
        let reply = channel.call(op::CREATE_COMP_CHANNEL, &[])?;
        let handle = reply.decode::<ObjectHandle>()?.handle;
        let fd = channel.take_queue_file(QueueFileKind::Channel, handle);
        (handle, fd)
    };
    let entry = QueueEntry {
        context: key,
        handle,
    };
    let fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            // Undoes the router's side (best effort).
            let _ = entry.destroy_on_router(op::DESTROY_COMP_CHANNEL);
            return Err(e);
        }
    };
    let raw = fd.as_raw_fd();
    let ibv = IbvCompChannel {
        context,
        fd: raw,
        refcnt: 0,
    };
    let state = ChannelState {
        handle,
        fd,
        cqs: Mutex::new(BTreeMap::new()),
        gone,
    };
    let obj = object::leak(ibv, state);
    registry::add_queue(obj as usize, QueueKind::Channel, entry);
    registry::debug(format_args!(
        "created completion channel {handle} (fd {raw})"
    ));
    Ok(obj)
}

/// `ibv_create_comp_channel`: a channel whose `fd` becomes readable when an armed CQ of it gets
/// a completion; NULL with errno on failure.
#[no_mangle]
pub extern "C" fn ibv_create_comp_channel(context: *mut IbvContext) -> *mut IbvCompChannel {
    returns_object("ibv_create_comp_channel", || create_comp_channel(context))
}

/// The channel object at `channel`, looked up in the registry.
fn channel_object(
    channel: *mut IbvCompChannel,
) -> Result<(QueueEntry, &'static ChannelState), VerbsError> {
    let entry = registry::queue(channel as usize, QueueKind::Channel)?;
    // SAFETY: the registry holds `channel`, so it is a live channel made by
    // `create_comp_channel`; its state lives until the channel is destroyed, which is the
    // program's promise not to do while it uses the channel.
    let state =
        unsafe { object::state(channel) }.ok_or(VerbsError::UnknownObject("completion channel"))?;
    Ok((entry, state))
}

fn destroy_comp_channel(channel: *mut IbvCompChannel) -> Result<(), VerbsError> {
    let (entry, state) = channel_object(channel)?;
    if !lock(&state.cqs).is_empty() {
        return Err(VerbsError::Busy("completion channel still has CQs"));
    }
    entry.destroy_on_router(op::DESTROY_COMP_CHANNEL)?;
    // SAFETY: the registry held the channel: made by `create_comp_channel`; the program no
    // longer uses it. Dropping the state closes the fd.
    unsafe { object::remove(channel) };
    Ok(())
}

/// `ibv_destroy_comp_channel`: 0, or an errno value (EBUSY while CQs use it).
#[no_mangle]
pub extern "C" fn ibv_destroy_comp_channel(channel: *mut IbvCompChannel) -> c_int {
    returns_errno("ibv_destroy_comp_channel", || destroy_comp_channel(channel))
}

/// Maps the region of a CQ's ring that the router passed: its ring, and the cores of the
/// router's shards the region announces.
fn attach_ring(fd: &OwnedFd) -> Result<(Consumer, u64), VerbsError> {
    let region = SharedRegion::attach(fd.as_fd())
        .map_err(|e| VerbsError::Protocol(format!("CQ region: {e}")))?;
    let ring = region
        .ring(0)
        .map_err(|e| VerbsError::Protocol(format!("CQ ring: {e}")))?;
    if (ring.geometry().slot_size as usize) < std::mem::size_of::<IbvWc>() {
        return Err(VerbsError::Protocol("CQ slots smaller than ibv_wc".into()));
    }
    Ok((Consumer::new(ring), region.router_cores()))
}

pub(crate) fn create_cq(
    context: *mut IbvContext,
    cqe: c_int,
    cq_context: *mut c_void,
    channel: *mut IbvCompChannel,
    comp_vector: c_int,
    flags: u32,
) -> Result<*mut IbvCq, VerbsError> {
    let key = context as usize;
    let state = registry::context(key)?;
    if cqe < 1 || cqe as u32 > limits::MAX_CQE {
        return Err(VerbsError::InvalidArgument("cqe out of range"));
    }
    if comp_vector != 0 {
        return Err(VerbsError::InvalidArgument(
            "the device has one completion vector",
        ));
    }
    let channel_state = if channel.is_null() {
        None
    } else {
        let (entry, st) = channel_object(channel)?;
        if entry.context != key {
            return Err(VerbsError::InvalidArgument(
                "the channel belongs to another context",
            ));
        }
        Some(st)
    };
    let body = CreateCq {
        cqe: cqe as u32,
        channel: channel_state.map_or(0, |c| c.handle),
        comp_vector: 0,
        flags,
    }
    .to_vec();
    let (created, fd) = lock(&state.channel).call_for_queue(
        op::CREATE_CQ,
        &body,
        QueueFileKind::Cq,
        |c: &CqCreated| c.cq,
    )?;
    let entry = QueueEntry {
        context: key,
        handle: created.cq,
    };
    let attached = fd.and_then(|fd| attach_ring(&fd));
    let (ring, router_cores) = match attached {
        Ok(parts) => parts,
        Err(e) => {
            // Undoes the router's side (best effort).
            let _ = entry.destroy_on_router(op::DESTROY_CQ);
            return Err(e);
        }
    };
    let ibv = crate::cq_ex::poll_api(IbvCq {
        context,
        channel,
        cq_context,
        handle: created.cq,
        cqe: created.cqe as c_int,
        mutex: libc::PTHREAD_MUTEX_INITIALIZER,
        cond: libc::PTHREAD_COND_INITIALIZER,
        comp_events_completed: 0,
        async_events_completed: 0,
    });
    let state = CqState {
        context: key,
        handle: created.cq,
        ring: Mutex::new(CqRing {
            ring,
            users: CqUsers::default(),
            idle: IdlePolls::new(router_cores),
        }),
        gone: state.gone.clone(),
        events: Mutex::new((0, 0)),
        acked: Condvar::new(),
        channel,
        current: Mutex::new([0; Cqe::STAMPED_LEN]),
    };
    let obj = object::leak(ibv, state).cast::<IbvCq>();
    if let Some(ch) = channel_state {
        lock(&ch.cqs).insert(created.cq, obj as usize);
        // SAFETY: `channel` is a live channel object (looked up above); the count is only
        // changed here and in destroy, under the registry's serialization of the program's
        // calls on this channel.
        unsafe { (*channel).refcnt += 1 };
    }
    registry::add_queue(obj as usize, QueueKind::Cq, entry);
    registry::debug(format_args!(
        "created CQ {} ({} entries{})",
        created.cq,
        created.cqe,
        if channel.is_null() {
            ""
        } else {
            ", with a channel"
        }
    ));
    Ok(obj)
}

/// `ibv_create_cq`: a CQ of at least `cqe` entries, or NULL with errno.
#[no_mangle]
pub extern "C" fn ibv_create_cq(
    context: *mut IbvContext,
    cqe: c_int,
    cq_context: *mut c_void,
    channel: *mut IbvCompChannel,
    comp_vector: c_int,
) -> *mut IbvCq {
    returns_object("ibv_create_cq", || {
        create_cq(context, cqe, cq_context, channel, comp_vector, 0)
    })
}

fn resize_cq(cq: *mut IbvCq, cqe: c_int) -> Result<(), VerbsError> {
    let (entry, state) = registered_cq(cq)?;
    if cqe < 1 || cqe as u32 > limits::MAX_CQE {
        return Err(VerbsError::InvalidArgument("cqe out of range"));
    }
    let ctx = registry::context(entry.context)?;
    // Held until the new ring replaces the old one (see the module comment). Every poll
    // releases what it took before unlocking, so the router sees the head as it is.
    let mut ring = lock(&state.ring);
    let body = ResizeCq {
        cq: entry.handle,
        cqe: cqe as u32,
    }
    .to_vec();
    let (resized, fd) = lock(&ctx.channel).call_for_queue(
        op::RESIZE_CQ,
        &body,
        QueueFileKind::Cq,
        |_: &CqCreated| entry.handle,
    )?;
    // The router produces into the new ring from now on: a failure here leaves the CQ without
    // completions (EIO), as a device whose CQ memory failed.
    let (new_ring, router_cores) = fd.and_then(|fd| attach_ring(&fd))?;
    ring.ring = new_ring;
    ring.idle = IdlePolls::new(router_cores);
    // SAFETY: `cq` is live; the library alone writes `cqe` (programs read it).
    unsafe { (*cq).cqe = resized.cqe as c_int };
    registry::debug(format_args!(
        "resized CQ {} to {} entries",
        entry.handle, resized.cqe
    ));
    Ok(())
}

/// `ibv_resize_cq`: 0, or an errno value (EINVAL for a size out of range or smaller than the
/// completions in the CQ, which then stays as it was). `cq->cqe` becomes the size granted.
#[no_mangle]
pub extern "C" fn ibv_resize_cq(cq: *mut IbvCq, cqe: c_int) -> c_int {
    returns_errno("ibv_resize_cq", || resize_cq(cq, cqe))
}

fn destroy_cq(cq: *mut IbvCq) -> Result<(), VerbsError> {
    let (entry, state) = registered_cq(cq)?;
    entry.destroy_on_router(op::DESTROY_CQ)?;
    // As rdma-core: a CQ goes only once every event handed out for it is acknowledged.
    {
        let mut events = lock(&state.events);
        while events.1 < events.0 {
            events = state.acked.wait(events).unwrap_or_else(|e| e.into_inner());
        }
    }
    // SAFETY: the CQ's channel, if it has one, outlives it (destroying a channel with CQs is
    // refused).
    if let Some(ch) = unsafe { object::state(state.channel) } {
        lock(&ch.cqs).remove(&state.handle);
        // SAFETY: as above, a live channel object.
        unsafe { (*state.channel).refcnt -= 1 };
    }
    // SAFETY: the registry held `cq`: made by `create_cq`; the program no longer uses it.
    unsafe { object::remove(cq.cast::<IbvCqEx>()) };
    registry::debug(format_args!("destroyed {} {}", IbvCqEx::NAME, entry.handle));
    Ok(())
}

/// `ibv_destroy_cq`: 0, or an errno value (EBUSY while QPs use it).
#[no_mangle]
pub extern "C" fn ibv_destroy_cq(cq: *mut IbvCq) -> c_int {
    returns_errno("ibv_destroy_cq", || destroy_cq(cq))
}

/// `ops.poll_cq` (the inline `ibv_poll_cq`): up to `num_entries` completions into `wc`; the
/// number taken, or -1. No system call: the ring is shared memory; only a poll loop that keeps
/// finding nothing on a core of the router yields it now and then ([`shared_core`]).
///
/// # Safety
/// `cq` is a live CQ of this library; `wc` has room for `num_entries` entries.
pub unsafe extern "C" fn poll_cq(cq: *mut IbvCq, num_entries: c_int, wc: *mut IbvWc) -> c_int {
    // SAFETY: forwarded caller guarantee.
    let Some(state) = (unsafe { cq_state(cq) }) else {
        set_errno(libc::EINVAL);
        return -1;
    };
    if num_entries <= 0 || wc.is_null() {
        return if num_entries == 0 { 0 } else { -1 };
    }
    guard(-1, || {
        // SAFETY: forwarded caller guarantee.
        let (taken, give_up_core) = unsafe { take_completions(state, num_entries as usize, wc) };
        if give_up_core {
            // After the CQ's lock is released: another thread may poll meanwhile.
            shared_core::yield_core();
        }
        taken
    })
}

/// The body of `poll_cq`: up to `max` completions (or flushes) into `wc`; the number taken or
/// -1, and whether the caller should now give its core up to the router ([`shared_core`]).
///
/// # Safety
/// `wc` has room for `max` entries.
unsafe fn take_completions(state: &CqState, max: usize, wc: *mut IbvWc) -> (c_int, bool) {
    let mut cq_ring = lock(&state.ring);
    let CqRing { ring, users, idle } = &mut *cq_ring;
    let mut taken = 0usize;
    while taken < max {
        // SAFETY: the caller's array has `max` entries; entry `taken` is inside it and the
        // program does not touch it during the call.
        let out = unsafe {
            std::slice::from_raw_parts_mut(wc.add(taken).cast::<u8>(), std::mem::size_of::<IbvWc>())
        };
        match ring.pop(out) {
            Ok(true) => {
                users.retire(out);
                taken += 1;
            }
            // Nothing from the router: if it is gone, what it will never complete.
            Ok(false) if state.gone.is_set() => match users.next_flush() {
                Some(cqe) => {
                    out[..Cqe::LEN].copy_from_slice(&cqe.encode());
                    taken += 1;
                }
                None => break,
            },
            Ok(false) => break,
            // The router broke the ring: nothing more can be trusted from it.
            Err(_) if taken == 0 => return (-1, false),
            Err(_) => break,
        }
    }
    if taken > 0 {
        ring.release();
        idle.found();
        return (taken as c_int, false);
    }
    (0, idle.found_nothing(shared_core::current_core))
}

/// The poll API's pop: the next completion (or flush) into `out`, stamped. Ok(true) if there was
/// one, Ok(false) if not (then `yield_core` tells whether the caller should give its core up to
/// the router, [`shared_core`]); Err if the router broke the ring.
pub(crate) fn take_one(
    state: &CqState,
    out: &mut [u8; Cqe::STAMPED_LEN],
) -> Result<(bool, bool), ()> {
    let mut cq_ring = lock(&state.ring);
    let CqRing { ring, users, idle } = &mut *cq_ring;
    match ring.pop(out) {
        Ok(true) => {
            users.retire(&out[..]);
            ring.release();
            idle.found();
            Ok((true, false))
        }
        Ok(false) if state.gone.is_set() => match users.next_flush() {
            Some(cqe) => {
                // A flush the library makes: no time from the router.
                *out = cqe.encode_stamped(0);
                Ok((true, false))
            }
            None => Ok((false, false)),
        },
        Ok(false) => Ok((false, idle.found_nothing(shared_core::current_core))),
        Err(_) => Err(()),
    }
}

/// `ops.req_notify_cq`: the next completion added to the CQ writes an event to its channel.
/// Solicited-only requests are treated as requests for any completion (more events than asked
/// for, which programs handle: they poll after each event). No system call.
///
/// # Safety
/// `cq` is a live CQ of this library.
pub unsafe extern "C" fn req_notify_cq(cq: *mut IbvCq, solicited_only: c_int) -> c_int {
    let _ = solicited_only;
    // SAFETY: forwarded caller guarantee.
    let Some(state) = (unsafe { cq_state(cq) }) else {
        return libc::EINVAL;
    };
    lock(&state.ring).ring.request_wake();
    0
}

fn get_cq_event(
    channel: *mut IbvCompChannel,
    cq: *mut *mut IbvCq,
    cq_context: *mut *mut c_void,
) -> Result<(), VerbsError> {
    let (_, ch) = channel_object(channel)?;
    if cq.is_null() || cq_context.is_null() {
        return Err(VerbsError::InvalidArgument("NULL out pointer"));
    }
    loop {
        let mut buf = [0u8; 4];
        // SAFETY: reads at most 4 bytes into a live buffer from the channel's fd. It blocks
        // unless the program made the fd non-blocking (then EAGAIN, as with rdma-core).
        let n = unsafe { libc::read(ch.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 4) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if n == 0 {
            // The router closed its end: it is gone. Armed CQs with work left fire once.
            ch.gone.set();
            return match faults_event(ch) {
                Some(ptr) => deliver_event(ptr, cq, cq_context),
                None => Err(VerbsError::DeviceFatal),
            };
        }
        if n != 4 {
            return Err(VerbsError::Protocol("partial event on the channel".into()));
        }
        let handle = u32::from_le_bytes(buf);
        let Some(&address) = lock(&ch.cqs).get(&handle) else {
            // The CQ was destroyed after its event was written: skip it.
            continue;
        };
        return deliver_event(address as *mut IbvCq, cq, cq_context);
    }
}

/// Hands the event of `ptr`, a CQ of the channel's table, to the caller's out pointers.
fn deliver_event(
    ptr: *mut IbvCq,
    cq: *mut *mut IbvCq,
    cq_context: *mut *mut c_void,
) -> Result<(), VerbsError> {
    // SAFETY: the channel's table holds only live CQs of this library (destroy removes them
    // first).
    let state = unsafe { cq_state(ptr) }.ok_or(VerbsError::UnknownObject("completion queue"))?;
    lock(&state.events).0 += 1;
    // SAFETY: the out pointers were checked for NULL and are the caller's; `ptr` is live.
    unsafe {
        *cq = ptr;
        *cq_context = std::ptr::addr_of!((*ptr).cq_context).read();
    }
    Ok(())
}

/// The channel's router is gone: the first CQ of the channel that is armed and has something
/// to hand out (completions, or requests to flush), disarmed; None if there is none.
fn faults_event(ch: &ChannelState) -> Option<*mut IbvCq> {
    let cqs: Vec<usize> = lock(&ch.cqs).values().copied().collect();
    cqs.into_iter().map(|a| a as *mut IbvCq).find(|&ptr| {
        // SAFETY: the channel's table holds only live CQs of this library.
        let Some(state) = (unsafe { cq_state(ptr) }) else {
            return false;
        };
        let mut cq_ring = lock(&state.ring);
        let has_work = cq_ring.ring.available().is_ok_and(|n| n > 0)
            || cq_ring.users.iter().any(CqUser::has_outstanding);
        let fire = cq_ring.ring.is_parked() && has_work;
        if fire {
            cq_ring.ring.unpark();
        }
        fire
    })
}

/// Registers a new QP's queues with its CQs (`send_cq` and `recv_cq`, maybe one CQ), which
/// retire its requests as their completions are polled and flush them if the router goes.
pub fn add_user(send_cq: *mut IbvCq, recv_cq: *mut IbvCq, queues: &QpQueues) {
    let sends = lock(&queues.send).shadow();
    let receives = if queues.has_srq {
        None
    } else {
        lock(&queues.recv).shadow()
    };
    let same = send_cq == recv_cq;
    let users = if same {
        vec![(send_cq, sends, receives)]
    } else {
        vec![(send_cq, sends, None), (recv_cq, None, receives)]
    };
    for (cq, sends, receives) in users {
        if let Ok((_, state)) = registered_cq(cq) {
            lock(&state.ring).users.add(CqUser {
                qpn: queues.qpn,
                sends,
                receives,
            });
        }
    }
}

/// Forgets the QP numbered `qpn` in its CQs (those still alive).
pub fn remove_user(send_cq: *mut IbvCq, recv_cq: *mut IbvCq, qpn: u32) {
    for cq in [send_cq, recv_cq] {
        if let Ok((_, state)) = registered_cq(cq) {
            lock(&state.ring).users.remove(qpn);
        }
    }
}

/// `ibv_get_cq_event`: waits for the next event on `channel`; 0, or -1 with errno.
#[no_mangle]
pub extern "C" fn ibv_get_cq_event(
    channel: *mut IbvCompChannel,
    cq: *mut *mut IbvCq,
    cq_context: *mut *mut c_void,
) -> c_int {
    returns_minus_one("ibv_get_cq_event", || get_cq_event(channel, cq, cq_context))
}

/// `ibv_ack_cq_events`: acknowledges `nevents` events of `cq` (a CQ can only be destroyed
/// once all its events are acknowledged).
#[no_mangle]
pub extern "C" fn ibv_ack_cq_events(cq: *mut IbvCq, nevents: c_uint) {
    guard((), || {
        let Ok((_, state)) = registered_cq(cq) else {
            return;
        };
        let mut events = lock(&state.events);
        events.1 += u64::from(nevents);
        // SAFETY: `cq` is live; programs read this field, the library alone writes it.
        unsafe { (*cq).comp_events_completed = events.1 as u32 };
        state.acked.notify_all();
    })
}

/// The context a CQ belongs to and its router handle (for `ibv_create_qp`).
pub fn cq_handle(cq: *mut IbvCq) -> Result<QueueEntry, VerbsError> {
    let (entry, state) = registered_cq(cq)?;
    debug_assert_eq!((state.context, state.handle), (entry.context, entry.handle));
    Ok(entry)
}
