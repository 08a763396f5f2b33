//! What this process holds: its attachments to the router, the devices it has seen and its open
//! contexts.
//!
//! The device exists only for a process of a registered container. `ibv_get_device_list`
//! attaches to the router as the verbs shim (the router identifies the caller by its network
//! namespace, never by anything we say) and keeps that attachment for the first
//! `ibv_open_device`; every further context attaches anew, so each context has rings of its own.
//! A forked child attaches with its own credentials.
//!
//! It also holds the protection domains and memory regions handed out (by the address of their
//! C structures, so a pointer the program passes back is looked up, never trusted), and the
//! process's registered pages. The allocation behind a CQ, QP, SRQ or completion channel
//! pointer is [`object`]'s.

pub mod object;

use crate::abi::IbvDevice;
use crate::channel::{Channel, ReplyBody};
use crate::device::Identity;
use crate::error::VerbsError;
use crate::faults::{Gone, Watcher};
use crate::pages::Pages;
use freeflow_proto::attach::{attach, Session, ShimKind};
use freeflow_proto::verbs::{Body, ObjectHandle};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// How long an attach waits for the router's answer.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(2);

/// A device handed out to the program. Devices are never freed (programs may keep using a
/// `struct ibv_device *` of an open context after freeing the list); there is one per identity
/// this process has seen, normally one.
#[derive(Debug)]
pub struct Device {
    /// What the program sees. The program only reads it.
    pub ibv: IbvDevice,
    pub identity: Identity,
}

impl Device {
    /// The pointer handed to C.
    pub fn as_c(&'static self) -> *mut IbvDevice {
        &self.ibv as *const IbvDevice as *mut IbvDevice
    }
}

/// The Rust side of an open context (the C side is its `verbs_context`, see `exports`).
#[derive(Debug)]
pub struct ContextState {
    pub device: &'static Device,
    /// This context's attachment: the rings its verbs travel on (and the router's view of the
    /// process in `freeflow status`).
    pub channel: Mutex<Channel>,
    /// The asynchronous events and the `async_fd` they wait behind (see `async_event`).
    pub async_events: Arc<crate::async_event::AsyncEvents>,
    /// Set when the router closes the attachment (it died or detached us): see `faults`.
    pub gone: Gone,
    /// Watches the attachment for that; dropped with the context.
    pub _watcher: Watcher,
}

impl ContextState {
    /// The router's number for this context's attachment (`freeflow status`).
    pub fn attachment_id(&self) -> u32 {
        lock(&self.channel).info().attachment_id
    }
}

struct Process {
    devices: Vec<&'static Device>,
    /// The attachment made by the last `ibv_get_device_list`, for the next `ibv_open_device`.
    spare: Option<Spare>,
}

struct Spare {
    pid: u32,
    session: Session,
}

static PROCESS: Mutex<Process> = Mutex::new(Process {
    devices: Vec::new(),
    spare: None,
});

/// Open contexts by the address of their `struct ibv_context`.
static CONTEXTS: Mutex<BTreeMap<usize, Arc<ContextState>>> = Mutex::new(BTreeMap::new());

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data (no multi-step updates).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `FREEFLOW_DEBUG=1`: say what the library does, one line per event, on stderr.
pub fn debug_enabled() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| {
        std::env::var_os("FREEFLOW_DEBUG").is_some_and(|v| !v.is_empty() && v != "0")
    })
}

pub fn debug(msg: std::fmt::Arguments<'_>) {
    if debug_enabled() {
        eprintln!("libibverbs (freeflow) [{}]: {msg}", std::process::id());
    }
}

fn identity_of(session: &Session) -> Identity {
    let info = session.info();
    Identity {
        ip: info.ip,
        container: info.container.clone(),
        tenant: info.tenant.clone(),
    }
}

fn attach_now() -> Result<Session, VerbsError> {
    let dir = freeflow_proto::runtime_dir();
    match attach(&dir, ShimKind::Verbs, ATTACH_TIMEOUT) {
        Ok(session) => {
            let info = session.info();
            debug(format_args!(
                "attached to the router in {} as container {} ({}, tenant {})",
                dir.display(),
                info.container,
                info.ip,
                info.tenant
            ));
            Ok(session)
        }
        Err(e) => Err(VerbsError::from(e)),
    }
}

/// The device of this process, attaching to the router if needed. An error means the process
/// has no device (not in a registered container, or no router).
pub fn current_device() -> Result<&'static Device, VerbsError> {
    let mut process = lock(&PROCESS);
    let pid = std::process::id();
    let usable = process
        .spare
        .as_ref()
        .is_some_and(|s| s.pid == pid && !s.session.router_hung_up());
    if !usable {
        // A spare inherited across fork belongs to the parent: forget it without using it.
        process.spare = None;
        let session = attach_now()?;
        process.spare = Some(Spare { pid, session });
    }
    let identity = identity_of(&process.spare.as_ref().expect("set above").session);
    if let Some(device) = process.devices.iter().find(|d| d.identity == identity) {
        return Ok(device);
    }
    let device: &'static Device = Box::leak(Box::new(Device {
        ibv: identity.ibv_device(),
        identity,
    }));
    process.devices.push(device);
    Ok(device)
}

/// The device whose `struct ibv_device` is at `ptr`, if it is one of ours.
pub fn device_at(ptr: *const IbvDevice) -> Option<&'static Device> {
    lock(&PROCESS)
        .devices
        .iter()
        .copied()
        .find(|d| std::ptr::eq(&d.ibv, ptr))
}

/// The device most recently seen (what the virtual sysfs describes).
pub fn latest_device() -> Option<&'static Device> {
    lock(&PROCESS).devices.last().copied()
}

/// An attachment for a new context on `device`: the spare one if it is this process's and
/// still connected, else a new one. Fails if the router now says we are someone else.
pub fn attach_for(device: &'static Device) -> Result<Session, VerbsError> {
    let mut process = lock(&PROCESS);
    let pid = std::process::id();
    let session = match process.spare.take() {
        Some(s) if s.pid == pid && !s.session.router_hung_up() => s.session,
        _ => attach_now()?,
    };
    if identity_of(&session) != device.identity {
        return Err(VerbsError::DeviceGone);
    }
    Ok(session)
}

pub fn add_context(key: usize, state: Arc<ContextState>) {
    lock(&CONTEXTS).insert(key, state);
}

pub fn context(key: usize) -> Result<Arc<ContextState>, VerbsError> {
    lock(&CONTEXTS)
        .get(&key)
        .cloned()
        .ok_or(VerbsError::UnknownContext)
}

/// `ibv_ack_async_event` about `element`: counted by the context that handed it out.
pub fn ack_async_event(element: crate::async_event::Element) {
    let contexts: Vec<Arc<ContextState>> = lock(&CONTEXTS).values().cloned().collect();
    for c in contexts {
        c.async_events.ack(element);
    }
}

/// Forgets an open context; `None` if it was not open (closed twice, or not ours).
pub fn remove_context(key: usize) -> Option<Arc<ContextState>> {
    lock(&CONTEXTS).remove(&key)
}

/// A protection domain handed out, by the address of its `struct ibv_pd`.
#[derive(Debug, Clone, Copy)]
pub struct PdEntry {
    /// Key of its context in the context table.
    pub context: usize,
    /// The router's handle.
    pub handle: u32,
}

/// A memory region handed out, by the address of its `struct ibv_mr`.
#[derive(Debug, Clone, Copy)]
pub struct MrEntry {
    pub context: usize,
    pub handle: u32,
    pub memory: MrMemory,
}

/// Where a registered region's memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MrMemory {
    /// Pages `[first, end)` on the process's own memory file.
    Pages(u64, u64),
    /// In further memory file `number` (see `pages`).
    FurtherFile(u16),
}

/// A CQ, QP, SRQ or completion channel handed out, by the address of its object (whose C
/// structure comes first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueEntry {
    pub context: usize,
    pub handle: u32,
}

impl QueueEntry {
    /// The object's handle as a request body ([`ObjectHandle`]).
    pub fn handle_body(&self) -> Vec<u8> {
        ObjectHandle {
            handle: self.handle,
        }
        .to_vec()
    }

    /// Sends a request about this object on its context's channel.
    pub fn call(&self, opcode: u16, body: &[u8]) -> Result<ReplyBody, VerbsError> {
        let ctx = context(self.context)?;
        let reply = lock(&ctx.channel).call(opcode, body);
        reply
    }

    /// Asks the router to destroy this object with `opcode` ([`Channel::destroy`]).
    pub fn destroy_on_router(&self, opcode: u16) -> Result<(), VerbsError> {
        let ctx = context(self.context)?;
        let done = lock(&ctx.channel).destroy(opcode, &self.handle_body());
        done
    }
}

#[derive(Debug, Clone, Copy)]
enum Object {
    Pd(PdEntry),
    Mr(MrEntry),
    Cq(QueueEntry),
    Qp(QueueEntry),
    Channel(QueueEntry),
    Srq(QueueEntry),
    Ah(QueueEntry),
}

/// Which kind of queue object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    Cq,
    Qp,
    Channel,
    Srq,
    /// An address handle (not a queue, but a router object with a handle all the same).
    Ah,
}

static OBJECTS: Mutex<BTreeMap<usize, Object>> = Mutex::new(BTreeMap::new());

static PAGES: Mutex<Option<Pages>> = Mutex::new(None);

/// The process's registered pages. Held across a whole registration or deregistration (which
/// serializes them), taken before any context's channel.
pub fn pages() -> MutexGuard<'static, Option<Pages>> {
    let mut guard = lock(&PAGES);
    guard.get_or_insert_with(Pages::default);
    guard
}

pub fn add_pd(key: usize, entry: PdEntry) {
    lock(&OBJECTS).insert(key, Object::Pd(entry));
}

pub fn add_mr(key: usize, entry: MrEntry) {
    lock(&OBJECTS).insert(key, Object::Mr(entry));
}

pub fn add_queue(key: usize, kind: QueueKind, entry: QueueEntry) {
    let object = match kind {
        QueueKind::Cq => Object::Cq(entry),
        QueueKind::Qp => Object::Qp(entry),
        QueueKind::Channel => Object::Channel(entry),
        QueueKind::Srq => Object::Srq(entry),
        QueueKind::Ah => Object::Ah(entry),
    };
    if let Ok(ctx) = context(entry.context) {
        ctx.async_events.forget_destroyed(key);
    }
    lock(&OBJECTS).insert(key, object);
}

/// The address of context `context`'s QP (or SRQ, `srq`) with the router's `handle`, if it is
/// alive (asynchronous events name objects by handle).
pub fn find_queue(context: usize, srq: bool, handle: u32) -> Option<usize> {
    lock(&OBJECTS)
        .iter()
        .find_map(|(&key, object)| match object {
            Object::Srq(e) | Object::Qp(e)
                if srq == matches!(object, Object::Srq(_))
                    && e.context == context
                    && e.handle == handle =>
            {
                Some(key)
            }
            _ => None,
        })
}

/// The queue object of `kind` at `key`, if it is one of ours and alive.
pub fn queue(key: usize, kind: QueueKind) -> Result<QueueEntry, VerbsError> {
    match (lock(&OBJECTS).get(&key), kind) {
        (Some(Object::Cq(e)), QueueKind::Cq)
        | (Some(Object::Qp(e)), QueueKind::Qp)
        | (Some(Object::Channel(e)), QueueKind::Channel)
        | (Some(Object::Srq(e)), QueueKind::Srq)
        | (Some(Object::Ah(e)), QueueKind::Ah) => Ok(*e),
        _ => Err(VerbsError::UnknownObject(match kind {
            QueueKind::Cq => "completion queue",
            QueueKind::Qp => "queue pair",
            QueueKind::Channel => "completion channel",
            QueueKind::Srq => "shared receive queue",
            QueueKind::Ah => "address handle",
        })),
    }
}

pub fn pd(key: usize) -> Result<PdEntry, VerbsError> {
    match lock(&OBJECTS).get(&key) {
        Some(Object::Pd(e)) => Ok(*e),
        _ => Err(VerbsError::UnknownObject("protection domain")),
    }
}

pub fn mr(key: usize) -> Result<MrEntry, VerbsError> {
    match lock(&OBJECTS).get(&key) {
        Some(Object::Mr(e)) => Ok(*e),
        _ => Err(VerbsError::UnknownObject("memory region")),
    }
}

/// Forgets a PD or MR; false if it was not there (freed twice, or not ours).
pub fn remove_object(key: usize) -> bool {
    lock(&OBJECTS).remove(&key).is_some()
}

/// Forgets every object of a context that is closing; returns its memory regions.
pub fn remove_objects_of(context: usize) -> Vec<MrEntry> {
    let mut objects = lock(&OBJECTS);
    let mut regions = Vec::new();
    objects.retain(|_, o| match o {
        Object::Pd(e) => e.context != context,
        Object::Mr(e) if e.context == context => {
            regions.push(*e);
            false
        }
        Object::Mr(_) => true,
        Object::Cq(e) | Object::Qp(e) | Object::Channel(e) | Object::Srq(e) | Object::Ah(e) => {
            e.context != context
        }
    });
    regions
}
