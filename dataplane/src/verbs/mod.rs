//! The router's verbs state of one attachment (one open device context of a container): its
//! protection domains, its memory regions with the router's own mapping of their pages, and the
//! keys that name them. Everything the container sees is virtual: handles and keys are numbers
//! of this table, never addresses; keys are random, so a key of another container's table is a
//! guess that almost surely names nothing here (and if it does, it names this container's own
//! memory).
//!
//! `VerbsTable::serve_inner` answers the PD, MR and test-hook requests of
//! `freeflow_proto::verbs`, validating every field against this table; [`VerbsTable::resolve`]
//! is what the engine uses to turn a key and an address range of a work request into memory,
//! with the checks of
//! the IB specification: the key names a region of this table in the QP's protection domain, the
//! range lies inside the region (no wrap-around), and the region grants the access.
//!
//! Unsafe code is confined (by `#![deny(unsafe_code)]` here) to `memory` (the memory file,
//! mappings, views), `notify` (the completion channels' pipes) and, with the `rdma-hw`
//! feature, `hw::sys` (rdma-core's verbs).
//!
//! `engine` (with `exec`) is the software verbs engine of a shard: CQs, QPs and the execution
//! of work requests between the tables of two contexts; `remote` is the transport to other
//! hosts' routers (RDMA between hosts); `send_op` decodes a work request's
//! operation, and `ids` gives the engine's numbers their own types.
#![deny(unsafe_code)]

mod engine;
mod exec;
#[cfg(feature = "rdma-hw")]
pub mod hw;
mod ids;
mod memory;
mod notify;
mod remote;
mod send_op;

pub use engine::{budget_of_this_process, Engine, ParkPlan};
pub use ids::AttachmentId;
use ids::PdId;
pub use memory::{MemView, MemoryError, MemoryFile};
pub(crate) use remote::Conn;
pub use remote::{shard_of, SiblingLink};

use crate::sys::Untrusted;
use freeflow_proto::codec;
use freeflow_proto::msg::status;
use freeflow_proto::verbs::{
    self, check_mr_access, limits, AccessFlags, AccessFlagsError, Body, DeallocPd, DecodeError,
    DeregMr, MemoryFileMsg, MrCreated, PdCreated, RegMr, TestDigest, TestRead, TestWrite, VerbsOp,
    VerbsStatus, MAX_FURTHER_MEMORY_FILES, MEMORY_FILE_SIZE, OWN_MEMORY_FILE, PAGE_SIZE,
};
use memory::Mapping;
pub(crate) use memory::{recv_into, send_gathered, SendPiece, SharedSpan, MAX_PIECES};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

/// A hash map keyed by the router's own numbers (handles, keys, QP numbers, attachment ids).
/// They are chosen by the router, never by a container (which can only look them up), so a fast
/// multiplicative hash (rustc's Fx hash) is safe from collision attacks; SipHash cost a fifth of
/// the engine's time.
pub(crate) type NumberMap<K, V> = rustc_hash::FxHashMap<K, V>;

/// Why a verbs request failed, inside the router. [`VerbsError::status`] is what the reply says.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    #[error("malformed request: {0}")]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    Access(#[from] AccessFlagsError),
    #[error("invalid: {0}")]
    Invalid(&'static str),
    #[error("no protection domain {0}")]
    NoSuchPd(u32),
    #[error("no memory region {0}")]
    NoSuchMr(u32),
    #[error("protection domain {pd} still has {mrs} memory regions and {qps} queue pairs or SRQs")]
    PdBusy { pd: u32, mrs: u32, qps: u32 },
    #[error("limit reached: {0}")]
    Limit(&'static str),
    /// The container holds its whole budget of the router's descriptors and mappings (see
    /// `engine::budget`).
    #[error("the container holds {held} of its {budget} router descriptors and mappings")]
    Budget { held: usize, budget: usize },
    #[error("no memory file yet: the shim must send it before registering")]
    NoMemoryFile,
    #[error("the memory file was already given")]
    SecondMemoryFile,
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("test hooks are off (start the router with FREEFLOW_TEST_HOOKS=1)")]
    TestHooksOff,
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("unknown verbs opcode {0:#x}")]
    UnknownOp(u16),
    #[error("no {0} {1}")]
    NoSuchObject(&'static str, u32),
    #[error("{0} {1} is still in use")]
    ObjectBusy(&'static str, u32),
    #[error("{0}")]
    Unreachable(String),
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    #[error("not permitted: {0}")]
    Permission(&'static str),
    #[error(transparent)]
    Transition(#[from] freeflow_proto::verbs::qp::TransitionError),
    #[error("cannot set up the queue's shared memory: {0}")]
    Queue(#[from] freeflow_proto::region::RegionError),
    #[error("cannot pass the queue's file to the shim: {0}")]
    PassFile(std::io::Error),
    /// The engine's own bookkeeping failed (a bug): the reply is an error and the attachment
    /// ends.
    #[error("verbs engine fault: {0}")]
    Fault(#[from] engine::Fault),
    /// The RDMA device (the hardware backend) refused to make the object's twin.
    #[cfg(feature = "rdma-hw")]
    #[error("the RDMA device refused: {0}")]
    Device(#[from] hw::sys::NicError),
}

impl VerbsError {
    /// The status of the reply that reports this error.
    pub fn status(&self) -> u16 {
        let s = match self {
            VerbsError::Decode(_) => return status::BAD_LENGTH,
            VerbsError::Access(AccessFlagsError::NotSupported(_)) => VerbsStatus::NotSupported,
            VerbsError::Access(_) | VerbsError::Invalid(_) => VerbsStatus::Invalid,
            VerbsError::NoSuchPd(_) | VerbsError::NoSuchMr(_) => VerbsStatus::BadHandle,
            VerbsError::PdBusy { .. } => VerbsStatus::Busy,
            VerbsError::Limit(_) | VerbsError::Budget { .. } => VerbsStatus::NoResources,
            VerbsError::NoMemoryFile | VerbsError::SecondMemoryFile => VerbsStatus::NoMemoryFile,
            VerbsError::Memory(MemoryError::Os { source, .. })
                if source.raw_os_error() == Some(libc::ENOMEM) =>
            {
                VerbsStatus::NoResources
            }
            VerbsError::Memory(_) => VerbsStatus::Fault,
            VerbsError::TestHooksOff => VerbsStatus::TestHooksOff,
            VerbsError::Resolve(_) => VerbsStatus::Protection,
            VerbsError::UnknownOp(_) => return status::UNKNOWN_OP,
            VerbsError::NoSuchObject(..) => VerbsStatus::BadHandle,
            VerbsError::ObjectBusy(..) => VerbsStatus::Busy,
            VerbsError::Unreachable(_) => VerbsStatus::Unreachable,
            VerbsError::NotSupported(_) => VerbsStatus::NotSupported,
            VerbsError::Permission(_) => VerbsStatus::Permission,
            VerbsError::Transition(_) => VerbsStatus::Invalid,
            VerbsError::Queue(_) | VerbsError::PassFile(_) => VerbsStatus::NoResources,
            VerbsError::Fault(_) => VerbsStatus::Invalid,
            #[cfg(feature = "rdma-hw")]
            VerbsError::Device(_) => VerbsStatus::NoResources,
        };
        s as u16
    }
}

/// Which key a work request names: a local key (scatter/gather entries) or a remote key (the
/// target of RDMA READ/WRITE and atomics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Local(u32),
    Remote(u32),
}

/// What the engine will do with resolved memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read through a local key (gather of a send, source of a write): every region allows it.
    LocalRead,
    /// Write through a local key (scatter of a receive, destination of a read or an atomic's
    /// result): needs IBV_ACCESS_LOCAL_WRITE.
    LocalWrite,
    RemoteRead,
    RemoteWrite,
    RemoteAtomic,
}

impl Need {
    fn is_remote(self) -> bool {
        matches!(
            self,
            Need::RemoteRead | Need::RemoteWrite | Need::RemoteAtomic
        )
    }

    /// Whether the engine writes the memory.
    fn writes(self) -> bool {
        matches!(
            self,
            Need::LocalWrite | Need::RemoteWrite | Need::RemoteAtomic
        )
    }

    /// The access flag a region needs for this, if any.
    fn flag(self) -> AccessFlags {
        match self {
            Need::LocalRead => AccessFlags::empty(),
            Need::LocalWrite => AccessFlags::LOCAL_WRITE,
            Need::RemoteRead => AccessFlags::REMOTE_READ,
            Need::RemoteWrite => AccessFlags::REMOTE_WRITE,
            Need::RemoteAtomic => AccessFlags::REMOTE_ATOMIC,
        }
    }
}

/// Why a key and a range did not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResolveFailure {
    #[error("no region has this key")]
    UnknownKey,
    #[error("the region is in another protection domain")]
    WrongPd,
    #[error("the range leaves the region")]
    OutOfRange,
    #[error("address + length overflows")]
    Overflow,
    #[error("the region does not grant this access")]
    AccessDenied,
    #[error("a local key used for remote access or a remote key for local access")]
    WrongKeyKind,
}

/// A failed resolve, with what the work completion says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} key {key:#x}: {failure}", if *.remote { "remote" } else { "local" })]
pub struct ResolveError {
    pub remote: bool,
    pub key: u32,
    pub failure: ResolveFailure,
}

impl ResolveError {
    /// `IBV_WC_LOC_PROT_ERR` for local keys, `IBV_WC_REM_ACCESS_ERR` for remote ones.
    #[cfg(test)]
    pub fn wc_status(&self) -> u32 {
        use freeflow_proto::verbs::wc_status;
        if self.remote {
            wc_status::REM_ACCESS_ERR
        } else {
            wc_status::LOC_PROT_ERR
        }
    }
}

#[derive(Debug)]
struct Pd {
    mrs: u32,
    /// Queue pairs created in this PD (the engine holds and releases them).
    qps: u32,
}

#[derive(Debug)]
struct Mr {
    pd: PdId,
    access: u32,
    /// Start of the region in the address space work requests use.
    iova: u64,
    length: u64,
    lkey: u32,
    rkey: u32,
    /// The region's pages as the router maps them (shared with the zero-copy sends of its
    /// bytes still queued: see `memory::SharedSpan`).
    mapping: Arc<Mapping>,
    /// Where the region's first byte is in `mapping`.
    offset: usize,
    /// The memory file its pages are in.
    file: u16,
    /// The file offset of the mapping's first page (the device path maps it again).
    #[cfg(feature = "rdma-hw")]
    file_start: u64,
}

/// A region of a table as the device path registers it ([`VerbsTable::map_for_device`]).
#[cfg(feature = "rdma-hw")]
#[derive(Debug)]
pub(crate) struct DeviceRegion {
    pub pd: PdId,
    pub access: u32,
    pub iova: u64,
    pub length: u64,
    pub lkey: u32,
    pub rkey: u32,
    /// Where the region's first byte is in `mapping`.
    pub offset: usize,
    pub mapping: Mapping,
}

/// A further memory file and how many regions use it: the last one's deregistration (or a
/// failed registration that leaves none) lets it go, as the shim forgets it then too, so an
/// attachment holds only the files its regions use.
#[derive(Debug)]
struct FurtherFile {
    file: MemoryFile,
    mrs: u32,
}

/// Test hooks (`freeflow_proto::verbs::op::TEST_READ`/`TEST_WRITE`) are served only if the
/// router's environment says `FREEFLOW_TEST_HOOKS=1`.
fn test_hooks_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FREEFLOW_TEST_HOOKS").is_some_and(|v| v == "1"))
}

/// Random 32-bit keys from a randomly keyed SipHash of a counter (std's `RandomState`: its keys
/// come from the OS), so keys cannot be predicted from handles, from each other, or across
/// tables.
#[derive(Debug)]
pub(crate) struct KeyGen {
    state: std::collections::hash_map::RandomState,
    counter: u64,
}

impl KeyGen {
    pub(crate) fn new() -> KeyGen {
        KeyGen {
            state: std::collections::hash_map::RandomState::new(),
            counter: 0,
        }
    }

    pub(crate) fn next(&mut self) -> u32 {
        self.counter += 1;
        let mut h = self.state.build_hasher();
        h.write_u64(self.counter);
        h.finish() as u32
    }
}

/// The verbs table of one attachment.
#[derive(Debug)]
pub struct VerbsTable {
    memory: Option<MemoryFile>,
    /// Further memory files by the number the shim gave them (memfds the program mapped shared
    /// itself; see [`MemoryFileMsg`]).
    further_files: NumberMap<u16, FurtherFile>,
    pds: NumberMap<PdId, Pd>,
    mrs: NumberMap<u32, Mr>,
    /// Key to region handle. Local and remote keys are drawn apart (never equal), so a local key
    /// is never accepted as a remote one.
    lkeys: NumberMap<u32, u32>,
    rkeys: NumberMap<u32, u32>,
    next_handle: u32,
    keys: KeyGen,
    /// Bytes mapped for regions, counted until each mapping goes (a zero-copy span may hold
    /// one past its region's deregistration): the container's count, which all its contexts
    /// share (the engine gives it, see `Engine::open`), bounded by
    /// [`limits::MAX_MAPPED_BYTES`].
    mapped: Arc<AtomicU64>,
    test_hooks: bool,
}

impl Default for VerbsTable {
    fn default() -> Self {
        VerbsTable::new(test_hooks_enabled())
    }
}

impl VerbsTable {
    pub fn new(test_hooks: bool) -> VerbsTable {
        VerbsTable {
            memory: None,
            further_files: NumberMap::default(),
            pds: NumberMap::default(),
            mrs: NumberMap::default(),
            lkeys: NumberMap::default(),
            rkeys: NumberMap::default(),
            next_handle: 0,
            keys: KeyGen::new(),
            mapped: Arc::default(),
            test_hooks,
        }
    }

    pub fn pd_count(&self) -> usize {
        self.pds.len()
    }

    pub fn mr_count(&self) -> usize {
        self.mrs.len()
    }

    /// Bytes of memory files mapped for the regions of the count's owner (this table's, or its
    /// container's if the engine gave one), with those of deregistered regions still held.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }

    /// Counts this table's mappings in `count` (its container's, shared by its contexts);
    /// given before the first registration.
    pub fn count_mapped_in(&mut self, count: Arc<AtomicU64>) {
        debug_assert!(
            self.mrs.is_empty(),
            "the count changes under registered regions"
        );
        self.mapped = count;
    }

    /// Takes the memory file the shim sent with `msg`: its own (one per attachment: a second is
    /// refused), or a further one under a number not in use, up to
    /// [`MAX_FURTHER_MEMORY_FILES`]. Either is checked the same way (a regular tmpfs file of the
    /// size the message names, or more for a further file, which may grow, sealed against
    /// shrinking). A refused descriptor is closed off the shard (see `crate::sys::Untrusted`).
    pub fn adopt_memory_file(
        &mut self,
        msg: MemoryFileMsg,
        fd: impl Into<Untrusted>,
    ) -> Result<(), VerbsError> {
        if msg.file == OWN_MEMORY_FILE {
            if self.memory.is_some() {
                return Err(VerbsError::SecondMemoryFile);
            }
            self.memory = Some(MemoryFile::adopt(fd, msg.size, MEMORY_FILE_SIZE)?);
            return Ok(());
        }
        if self.further_files.contains_key(&msg.file) {
            return Err(VerbsError::SecondMemoryFile);
        }
        if self.further_files.len() >= MAX_FURTHER_MEMORY_FILES {
            return Err(VerbsError::Limit("further memory files"));
        }
        let file = MemoryFile::adopt_further(fd, msg.size, MEMORY_FILE_SIZE)?;
        self.further_files
            .insert(msg.file, FurtherFile { file, mrs: 0 });
        Ok(())
    }

    /// Further memory files held (each one of the container's budget units).
    pub fn further_file_count(&self) -> usize {
        self.further_files.len()
    }

    /// Whether the memory file numbered `file` was adopted.
    #[cfg(test)]
    pub fn has_file(&self, file: u16) -> bool {
        if file == OWN_MEMORY_FILE {
            self.memory.is_some()
        } else {
            self.further_files.contains_key(&file)
        }
    }

    /// A handle not in use by any PD or MR of this table (never 0).
    fn new_handle(&mut self) -> u32 {
        loop {
            self.next_handle = self.next_handle.wrapping_add(1);
            let h = self.next_handle;
            if h != 0 && !self.pds.contains_key(&PdId(h)) && !self.mrs.contains_key(&h) {
                return h;
            }
        }
    }

    /// A key in neither key table (never 0).
    fn new_key(&mut self) -> u32 {
        loop {
            let k = self.keys.next();
            if k != 0 && !self.lkeys.contains_key(&k) && !self.rkeys.contains_key(&k) {
                return k;
            }
        }
    }

    pub fn alloc_pd(&mut self) -> Result<PdId, VerbsError> {
        if self.pds.len() >= limits::MAX_PD as usize {
            return Err(VerbsError::Limit("protection domains"));
        }
        let pd = PdId(self.new_handle());
        self.pds.insert(pd, Pd { mrs: 0, qps: 0 });
        Ok(pd)
    }

    /// Frees a PD; refused (EBUSY) while regions use it, as the kernel refuses it.
    pub fn dealloc_pd(&mut self, pd: PdId) -> Result<(), VerbsError> {
        let entry = self.pds.get(&pd).ok_or(VerbsError::NoSuchPd(pd.0))?;
        if entry.mrs > 0 || entry.qps > 0 {
            return Err(VerbsError::PdBusy {
                pd: pd.0,
                mrs: entry.mrs,
                qps: entry.qps,
            });
        }
        self.pds.remove(&pd);
        Ok(())
    }

    /// Counts a queue pair created in `pd` (which must exist), so the PD stays until it goes.
    pub fn hold_pd(&mut self, pd: PdId) -> Result<(), VerbsError> {
        self.pds.get_mut(&pd).ok_or(VerbsError::NoSuchPd(pd.0))?.qps += 1;
        Ok(())
    }

    /// Undoes [`VerbsTable::hold_pd`].
    pub fn release_pd(&mut self, pd: PdId) {
        if let Some(entry) = self.pds.get_mut(&pd) {
            entry.qps = entry.qps.saturating_sub(1);
        }
    }

    /// Registers a region: checks every field, maps its pages from the memory file and gives it
    /// a handle and two keys. A further file that no region uses after the call goes.
    pub fn reg_mr(&mut self, r: &RegMr) -> Result<MrCreated, VerbsError> {
        let created = self.reg_mr_checked(r);
        if created.is_err() {
            self.drop_unused_file(r.file);
        }
        created
    }

    /// Lets further file `file` go if no region uses it (after a registration in it failed,
    /// wherever it failed: the shim forgets the file then too).
    pub fn drop_unused_file(&mut self, file: u16) {
        if self.further_files.get(&file).is_some_and(|f| f.mrs == 0) {
            self.further_files.remove(&file);
        }
    }

    fn reg_mr_checked(&mut self, r: &RegMr) -> Result<MrCreated, VerbsError> {
        let pd = PdId(r.pd);
        if !self.pds.contains_key(&pd) {
            return Err(VerbsError::NoSuchPd(r.pd));
        }
        let access = check_mr_access(r.access)?;
        if r.length == 0 {
            return Err(VerbsError::Invalid("zero-length region"));
        }
        if r.length > limits::MAX_MR_SIZE {
            return Err(VerbsError::Invalid("region longer than max_mr_size"));
        }
        let end = r
            .addr
            .checked_add(r.length)
            .ok_or(VerbsError::Invalid("addr + length overflows"))?;
        r.iova
            .checked_add(r.length)
            .ok_or(VerbsError::Invalid("iova + length overflows"))?;
        // As the kernel requires: the iova keeps the address's offset in its page.
        if r.addr % PAGE_SIZE != r.iova % PAGE_SIZE {
            return Err(VerbsError::Invalid(
                "iova and addr differ in their page offset",
            ));
        }
        if self.mrs.len() >= limits::MAX_MR as usize {
            return Err(VerbsError::Limit("memory regions"));
        }
        let first_page = r.addr - r.addr % PAGE_SIZE;
        let end_page = end
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(VerbsError::Invalid("region ends beyond the address space"))?;
        let pages = end_page - first_page;
        if pages > limits::MAX_MAPPED_BYTES.saturating_sub(self.mapped_bytes()) {
            return Err(VerbsError::Limit("registered bytes"));
        }
        // A region without any write access is mapped read-only: the router cannot write it
        // (nothing resolves a write through it either), and a further file the program opened
        // read-only can be registered so.
        let writable = AccessFlags::from_bits_retain(access).intersects(
            AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_ATOMIC,
        );
        #[cfg(feature = "rdma-hw")]
        let file_start = if r.file == OWN_MEMORY_FILE {
            first_page
        } else {
            r.file_offset
        };
        let mut mapping = if r.file == OWN_MEMORY_FILE {
            if r.file_offset != 0 {
                return Err(VerbsError::Invalid(
                    "a file offset for the process's own memory file",
                ));
            }
            let memory = self.memory.as_ref().ok_or(VerbsError::NoMemoryFile)?;
            // The page at virtual address A lives at file offset A (see freeflow_proto::verbs).
            memory.map(first_page, pages, writable)?
        } else {
            let further = self
                .further_files
                .get_mut(&r.file)
                .ok_or(VerbsError::NoMemoryFile)?;
            // The program's own shared memory: the shim populated the range before it asked,
            // so a hole here is refused and the container, not the router, pays for the pages.
            let mapping = further.file.map(r.file_offset, pages, writable)?;
            further.mrs += 1;
            mapping
        };
        self.pds.get_mut(&pd).ok_or(VerbsError::NoSuchPd(r.pd))?.mrs += 1;
        let handle = self.new_handle();
        let lkey = self.new_key();
        self.lkeys.insert(lkey, handle);
        let rkey = self.new_key();
        self.rkeys.insert(rkey, handle);
        mapping.charge_to(&self.mapped);
        self.mrs.insert(
            handle,
            Mr {
                pd,
                access,
                iova: r.iova,
                length: r.length,
                lkey,
                rkey,
                mapping: Arc::new(mapping),
                offset: (r.addr - first_page) as usize,
                file: r.file,
                #[cfg(feature = "rdma-hw")]
                file_start,
            },
        );
        Ok(MrCreated {
            mr: handle,
            lkey,
            rkey,
        })
    }

    /// A region as a device registers it: a writable mapping of its pages of its own (the
    /// device pins it while registered; the table's mapping stays the engine's), and what the
    /// device path's key table needs of it.
    #[cfg(feature = "rdma-hw")]
    pub(crate) fn map_for_device(&self, handle: u32) -> Result<DeviceRegion, VerbsError> {
        let mr = self.mrs.get(&handle).ok_or(VerbsError::NoSuchMr(handle))?;
        let file = if mr.file == OWN_MEMORY_FILE {
            self.memory.as_ref().ok_or(VerbsError::NoMemoryFile)?
        } else {
            &self
                .further_files
                .get(&mr.file)
                .ok_or(VerbsError::NoMemoryFile)?
                .file
        };
        let mut mapping = file.map(mr.file_start, mr.mapping.len() as u64, true)?;
        // The device's mapping is the container's too: counted while it lives, so that its
        // next registrations see what the router really maps for it.
        mapping.charge_to(&self.mapped);
        Ok(DeviceRegion {
            pd: mr.pd,
            access: mr.access,
            iova: mr.iova,
            length: mr.length,
            lkey: mr.lkey,
            rkey: mr.rkey,
            offset: mr.offset,
            mapping,
        })
    }

    /// Deregisters a region: its keys stop resolving and its mapping goes.
    pub fn dereg_mr(&mut self, mr: u32) -> Result<(), VerbsError> {
        let entry = self.mrs.remove(&mr).ok_or(VerbsError::NoSuchMr(mr))?;
        self.lkeys.remove(&entry.lkey);
        self.rkeys.remove(&entry.rkey);
        if let Some(pd) = self.pds.get_mut(&entry.pd) {
            pd.mrs -= 1;
        }
        if let Some(further) = self.further_files.get_mut(&entry.file) {
            further.mrs -= 1;
            self.drop_unused_file(entry.file);
        }
        Ok(())
    }

    /// The memory of `len` bytes at `addr` (in the region's iova space) of the region that
    /// `key` names, if that region is in protection domain `pd`, contains the whole range and
    /// grants `need`. A zero-length range touches no memory: only the key, the domain and the
    /// access are checked (the engine skips zero-length remote operations before calling this,
    /// as the IB specification does not validate their R_Key).
    pub fn resolve(
        &self,
        pd: PdId,
        key: Key,
        addr: u64,
        len: u64,
        need: Need,
    ) -> Result<MemView<'_>, ResolveError> {
        let (mr, offset, fail) = self.locate(pd, key, addr, len, need)?;
        mr.mapping
            .view(offset, len as usize)
            .ok_or(fail(ResolveFailure::OutOfRange))
    }

    /// As [`VerbsTable::resolve`], as a span that keeps the region's pages mapped while it is
    /// held, even past the region's deregistration (a zero-copy send of its bytes).
    pub(crate) fn resolve_shared(
        &self,
        pd: PdId,
        key: Key,
        addr: u64,
        len: u64,
        need: Need,
    ) -> Result<SharedSpan, ResolveError> {
        let (mr, offset, fail) = self.locate(pd, key, addr, len, need)?;
        SharedSpan::new(&mr.mapping, offset, len as usize).ok_or(fail(ResolveFailure::OutOfRange))
    }

    /// The checks of [`VerbsTable::resolve`]: the region and where the range starts in its
    /// mapping (its end is inside the mapping, unless the table is wrong: the caller's view
    /// then fails like a range outside the region), and how to name a failure.
    #[allow(clippy::type_complexity)]
    fn locate(
        &self,
        pd: PdId,
        key: Key,
        addr: u64,
        len: u64,
        need: Need,
    ) -> Result<(&Mr, usize, impl Fn(ResolveFailure) -> ResolveError), ResolveError> {
        let (remote, key, table) = match key {
            Key::Local(k) => (false, k, &self.lkeys),
            Key::Remote(k) => (true, k, &self.rkeys),
        };
        let fail = move |failure| ResolveError {
            remote,
            key,
            failure,
        };
        if remote != need.is_remote() {
            return Err(fail(ResolveFailure::WrongKeyKind));
        }
        let mr = table
            .get(&key)
            .and_then(|h| self.mrs.get(h))
            .ok_or(fail(ResolveFailure::UnknownKey))?;
        if mr.pd != pd {
            return Err(fail(ResolveFailure::WrongPd));
        }
        if !AccessFlags::from_bits_retain(mr.access).contains(need.flag())
            || (need.writes() && !mr.mapping.writable())
        {
            return Err(fail(ResolveFailure::AccessDenied));
        }
        if len == 0 {
            return Ok((mr, mr.offset, fail));
        }
        let end = addr
            .checked_add(len)
            .ok_or(fail(ResolveFailure::Overflow))?;
        // iova + length cannot overflow: reg_mr checked it.
        if addr < mr.iova || end > mr.iova + mr.length {
            return Err(fail(ResolveFailure::OutOfRange));
        }
        // Inside the region, hence inside its mapping: a view that is not would be a bug of
        // the table, and fails like a range outside the region.
        Ok((mr, mr.offset + (addr - mr.iova) as usize, fail))
    }

    /// The memory a test hook reads or writes: `len` bytes at `addr`, under local key `lkey` of
    /// protection domain `pd`.
    fn test_view(
        &self,
        pd: u32,
        lkey: u32,
        addr: u64,
        len: u64,
        need: Need,
    ) -> Result<MemView<'_>, ResolveError> {
        self.resolve(PdId(pd), Key::Local(lkey), addr, len, need)
    }

    /// Serves one PD, MR or test-hook request: writes the reply body into `reply` and returns
    /// its status and length (the engine serves the rest, and calls `serve_inner`).
    #[cfg(test)]
    pub fn serve(&mut self, opcode: u16, body: &[u8], reply: &mut [u8]) -> (u16, usize) {
        let served = VerbsOp::try_from(opcode)
            .map_err(|_| VerbsError::UnknownOp(opcode))
            .and_then(|op| self.serve_inner(op, body, reply));
        match served {
            Ok(len) => (status::OK, len),
            Err(e) => (e.status(), 0),
        }
    }

    pub(super) fn serve_inner(
        &mut self,
        op: VerbsOp,
        body: &[u8],
        reply: &mut [u8],
    ) -> Result<usize, VerbsError> {
        match op {
            VerbsOp::AllocPd => {
                codec::exact("AllocPd", body, 0)?;
                let pd = self.alloc_pd()?;
                Ok(PdCreated { pd: pd.0 }.encode(reply))
            }
            VerbsOp::DeallocPd => {
                let r = DeallocPd::decode(body)?;
                self.dealloc_pd(PdId(r.pd))?;
                Ok(0)
            }
            VerbsOp::RegMr => {
                let r = RegMr::decode(body)?;
                Ok(self.reg_mr(&r)?.encode(reply))
            }
            VerbsOp::DeregMr => {
                let r = DeregMr::decode(body)?;
                self.dereg_mr(r.mr)?;
                Ok(0)
            }
            VerbsOp::TestRead | VerbsOp::TestWrite if !self.test_hooks => {
                Err(VerbsError::TestHooksOff)
            }
            VerbsOp::TestRead => {
                let r = TestRead::decode(body)?;
                let view = self.test_view(r.pd, r.lkey, r.addr, r.length, Need::LocalRead)?;
                Ok(TestDigest {
                    digest: view.digest(),
                }
                .encode(reply))
            }
            VerbsOp::TestWrite => {
                let r = TestWrite::decode(body)?;
                let len = r.data.len() as u64;
                let view = self.test_view(r.pd, r.lkey, r.addr, len, Need::LocalWrite)?;
                view.write_at(0, &r.data).map_err(engine::Fault::from)?;
                Ok(0)
            }
            other => Err(VerbsError::UnknownOp(other as u16)),
        }
    }
}

/// Largest reply body of a verbs request.
pub const MAX_REPLY_BODY: usize = verbs::MAX_REPLY_BODY;

const _: () = assert!(MrCreated::LEN <= MAX_REPLY_BODY && TestDigest::LEN <= MAX_REPLY_BODY);
const _: () = assert!(verbs::MEMORY_FILE_SIZE.is_multiple_of(PAGE_SIZE));

#[cfg(test)]
mod tests;
