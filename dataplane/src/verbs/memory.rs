//! The router's side of registered memory: a container's memory file (checked before use),
//! mappings of its page ranges, and views into them. One of the two modules of the verbs engine
//! that may hold unsafe code (with `notify`).
//!
//! Memory here is shared with a container that may write it at any moment. Nothing makes a Rust
//! reference into it: bytes move with raw copies (`ptr::copy`), and the RDMA atomics use
//! `AtomicU64` on the shared word, which is what hardware atomics promise too (atomic with
//! respect to other atomics only).
//!
//! Why the router's accesses do not fault (SIGBUS): a memory file is a tmpfs (shmem) file
//! sealed against shrinking, so no page a mapping covers can leave the file. Hugetlbfs memfds
//! are refused: their pages come from the huge page pool at fault time, and an empty pool
//! makes the fault a SIGBUS. What remains: a hole in a tmpfs file (a page never written, or one
//! the container punched with `fallocate(PUNCH_HOLE)`, which F_SEAL_SHRINK allows) reads as
//! zeros, and the router's write there allocates a page, charged to the router's memory cgroup;
//! if that allocation fails the kernel's OOM handling runs, not a SIGBUS. Registration checks
//! that every page is backed (the shim populates them first, so the container pays), which
//! leaves only holes punched after registration, bounded by the bytes mapped (see
//! `freeflow_proto::verbs::limits::MAX_MAPPED_BYTES` and the container's budget of regions).
#![allow(unsafe_code)]

use crate::sys::Untrusted;
use freeflow_proto::verbs::{PAGE_SIZE, REQUIRED_SEALS};
use std::io;
use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why a memory file or a mapping of it was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("the memory file is not a regular file")]
    NotAFile,
    #[error("the memory file is not on tmpfs (filesystem magic {0:#x}; hugetlbfs is refused)")]
    NotTmpfs(u64),
    #[error("the memory file has {actual} bytes, the shim said {declared}")]
    SizeMismatch { declared: u64, actual: u64 },
    #[error("the memory file has {0} bytes, more than a process can address")]
    TooLarge(u64),
    #[error("the memory file lacks seals {missing:#x} (it must not shrink)")]
    NotSealed { missing: i32 },
    #[error("pages {offset:#x}+{len:#x} are not page-aligned or leave the memory file")]
    OutOfFile { offset: u64, len: u64 },
    #[error(
        "pages {offset:#x}+{len:#x} are not all backed in the memory file (hole at {hole:#x})"
    )]
    NotBacked { offset: u64, len: u64, hole: u64 },
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> MemoryError {
    move |source| MemoryError::Os { op, source }
}

/// A container process's memory file, checked: a regular tmpfs file of the size the shim
/// declared (at least that size, for a further file, which may grow), sealed so it cannot
/// shrink.
#[derive(Debug)]
pub struct MemoryFile {
    fd: OwnedFd,
    /// Its size when adopted (the own file's size; a further file's may have grown since).
    size: u64,
    /// The largest size accepted.
    max: u64,
    /// A further file: it may grow (not sealed against it), so its size is read again when
    /// pages are mapped.
    growable: bool,
}

impl MemoryFile {
    /// Checks `fd` and takes it: the process's own memory file, of exactly `declared` bytes;
    /// `max` is the largest size accepted. A refused descriptor is closed off the calling
    /// thread (see [`Untrusted`]).
    pub fn adopt(
        fd: impl Into<Untrusted>,
        declared: u64,
        max: u64,
    ) -> Result<MemoryFile, MemoryError> {
        Self::adopt_checked(fd.into(), declared, max, false)
    }

    /// As [`MemoryFile::adopt`], for a further memory file: the program's own memfd, which it
    /// may grow (it is sealed only against shrinking), so it has at least `declared` bytes.
    pub fn adopt_further(
        fd: impl Into<Untrusted>,
        declared: u64,
        max: u64,
    ) -> Result<MemoryFile, MemoryError> {
        Self::adopt_checked(fd.into(), declared, max, true)
    }

    fn adopt_checked(
        fd: Untrusted,
        declared: u64,
        max: u64,
        growable: bool,
    ) -> Result<MemoryFile, MemoryError> {
        // The seals first: F_GET_SEALS is answered by the kernel itself and fails (EINVAL) for
        // anything but a memfd (shmem or hugetlbfs), without entering the file's filesystem.
        // fstat on a FUSE file would ask its server, which may never answer.
        let Ok(seals) = freeflow_os::memfd::seals(fd.as_fd()) else {
            return Err(MemoryError::NotSealed {
                missing: REQUIRED_SEALS,
            });
        };
        let missing = REQUIRED_SEALS & !seals;
        if missing != 0 {
            return Err(MemoryError::NotSealed { missing });
        }
        // SAFETY: statfs is plain data; zero is a valid value for fstatfs to overwrite.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs writes one struct statfs into `fs`, which lives across the call.
        if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } != 0 {
            return Err(os("fstatfs")(io::Error::last_os_error()));
        }
        if fs.f_type as u64 != libc::TMPFS_MAGIC as u64 {
            return Err(MemoryError::NotTmpfs(fs.f_type as u64));
        }
        let actual = file_size(fd.as_fd())?;
        if actual != declared && !(growable && actual > declared) {
            return Err(MemoryError::SizeMismatch { declared, actual });
        }
        if actual > max {
            return Err(MemoryError::TooLarge(actual));
        }
        Ok(MemoryFile {
            fd: fd.into_inner(),
            size: actual,
            max,
            growable,
        })
    }

    /// The size the file has now (a further file may have grown since it was adopted), at
    /// most the largest accepted.
    fn current_size(&self) -> Result<u64, MemoryError> {
        if !self.growable {
            return Ok(self.size);
        }
        Ok(file_size(self.fd.as_fd())?.min(self.max))
    }

    /// Maps `len` bytes of the file at `offset` (both page multiples, inside the file, every
    /// page backed: the shim wrote them when it moved the application's pages there, or
    /// populated them in a further file), read-write or, unless `writable`, read-only.
    pub fn map(&self, offset: u64, len: u64, writable: bool) -> Result<Mapping, MemoryError> {
        let out_of_file = || MemoryError::OutOfFile { offset, len };
        if len == 0 || !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(out_of_file());
        }
        let end = offset.checked_add(len).ok_or_else(out_of_file)?;
        if end > self.current_size()?
            || usize::try_from(len).is_err()
            || i64::try_from(offset).is_err()
        {
            return Err(out_of_file());
        }
        self.check_backed(offset, len, end)?;
        self.map_unchecked(offset, len, writable)
    }

    fn check_backed(&self, offset: u64, len: u64, end: u64) -> Result<(), MemoryError> {
        // SAFETY: lseek only moves this fd's file position (nobody else reads through it).
        let hole = unsafe { libc::lseek(self.fd.as_raw_fd(), offset as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(os("lseek(SEEK_HOLE)")(io::Error::last_os_error()));
        }
        if (hole as u64) < end {
            return Err(MemoryError::NotBacked {
                offset,
                len,
                hole: hole as u64,
            });
        }
        Ok(())
    }

    /// Maps pages [`MemoryFile::map`] checked.
    fn map_unchecked(&self, offset: u64, len: u64, writable: bool) -> Result<Mapping, MemoryError> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping at an address the kernel picks overlaps nothing of ours;
        // offset and length were checked to be page multiples inside the file; the result is
        // checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                offset as i64,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os("mmap")(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| os("mmap")(io::Error::other("mmap returned NULL")))?;
        Ok(Mapping {
            ptr,
            len: len as usize,
            writable,
            charge: None,
        })
    }
}

/// The size of the file `fd` names (fstat: only for a descriptor known to be a memfd).
fn file_size(fd: std::os::fd::BorrowedFd<'_>) -> Result<u64, MemoryError> {
    // SAFETY: stat is plain data; zero is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one struct stat into `st`, which lives across the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(os("fstat")(io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(MemoryError::NotAFile);
    }
    Ok(st.st_size as u64)
}

/// A mapping of part of a memory file, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// Mapped PROT_WRITE too (else read-only: the router must not write it).
    writable: bool,
    /// The count of mapped bytes this mapping's length is charged to until it is unmapped
    /// (see [`Mapping::charge_to`]).
    charge: Option<Arc<AtomicU64>>,
}

// SAFETY: a Mapping is an address range owned by whoever holds it; it is only reached through
// views that copy bytes in and out with raw pointer operations, from any thread.
unsafe impl Send for Mapping {}

// SAFETY: a Mapping hands out no reference into its bytes: views copy with raw pointer
// operations and atomics, the kernel reads it for a zero-copy send (`SharedSpan`, whose Arc
// makes this needed) and a device reads and writes it as the views do; shared between threads
// only as an address range.
unsafe impl Sync for Mapping {}

// SAFETY: a Mapping is mapped at its address from `map` until drop, and nothing else unmaps
// or moves it; a region holding it (an Arc) keeps it alive while registered. The hw path maps
// the regions it registers on a device writable (`map(.., true)`); a read-only one given to a
// device would make the kernel refuse to pin it for writing (the registration fails), it is
// never written through.
#[cfg(feature = "rdma-hw")]
unsafe impl super::hw::sys::DeviceMemory for Mapping {
    fn range(&self) -> (NonNull<u8>, usize) {
        debug_assert!(self.writable, "a read-only mapping registered on a device");
        (self.ptr, self.len)
    }
}

impl Mapping {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Counts the mapping's length in `count` until it is unmapped: past a region's
    /// deregistration while a zero-copy span still holds it, so a peer that stops reading
    /// cannot keep uncounted mappings alive.
    pub fn charge_to(&mut self, count: &Arc<AtomicU64>) {
        count.fetch_add(self.len as u64, Ordering::Relaxed);
        if let Some(old) = self.charge.replace(Arc::clone(count)) {
            old.fetch_sub(self.len as u64, Ordering::Relaxed);
        }
    }

    /// Whether the router may write the mapping (a region registered without any write
    /// access is mapped read-only).
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Anonymous shared memory of `len` bytes (unit tests of the tables above this module).
    #[cfg(test)]
    pub fn anonymous(len: usize) -> Mapping {
        // SAFETY: as in `MemoryFile::map`, without a file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Mapping {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned NULL"),
            len,
            writable: true,
            charge: None,
        }
    }

    /// The bytes `offset..offset + len`, or None if they leave the mapping.
    pub fn view(&self, offset: usize, len: usize) -> Option<MemView<'_>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(MemView {
            // SAFETY: offset <= len of the mapping (checked above), so the pointer stays
            // inside it or one past its end (for an empty view at the end).
            ptr: unsafe { self.ptr.as_ptr().add(offset) },
            len,
            _mapping: PhantomData,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are what mmap returned; views borrow the mapping, so none is alive.
        if unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) } != 0 {
            // Only a bad address or length fails, which would be a bug here: the range stays
            // mapped (leaked), and the log (rate-limited per call site) says so.
            let e = io::Error::last_os_error();
            debug_assert!(false, "munmap of {:p}+{:#x}: {e}", self.ptr, self.len);
            log::warn!("munmap of a memory region's mapping failed (leaked): {e}");
        }
        if let Some(count) = &self.charge {
            count.fetch_sub(self.len as u64, Ordering::Relaxed);
        }
    }
}

/// Why a view operation did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("{offset}+{len} leaves a view of {view_len} bytes")]
    OutOfRange {
        offset: usize,
        len: usize,
        view_len: usize,
    },
    #[error("views of {0} and {1} bytes")]
    LengthMismatch(usize, usize),
    #[error("an atomic needs exactly 8 bytes at an 8-byte aligned address")]
    Misaligned,
}

/// A range of registered memory, valid while the table it came from is borrowed. Bytes move in
/// and out by copies; the view never hands out references into memory a container shares.
#[derive(Debug)]
pub struct MemView<'a> {
    ptr: *mut u8,
    len: usize,
    _mapping: PhantomData<&'a Mapping>,
}

impl MemView<'_> {
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), ViewError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(ViewError::OutOfRange {
                offset,
                len,
                view_len: self.len,
            }),
        }
    }

    /// The bytes `offset..offset + len` of this view.
    pub fn slice(&self, offset: usize, len: usize) -> Result<MemView<'_>, ViewError> {
        self.check(offset, len)?;
        Ok(MemView {
            // SAFETY: offset + len <= self.len (checked), so the pointer stays inside the view
            // (or one past its end for an empty slice), which lies inside a live mapping.
            ptr: unsafe { self.ptr.add(offset) },
            len,
            _mapping: PhantomData,
        })
    }

    /// Copies `out.len()` bytes at `offset` into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), ViewError> {
        self.check(offset, out.len())?;
        // SAFETY: the range is inside the view (checked), hence inside a live mapping; `out` is
        // our own buffer, which a shared mapping cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` into the view at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), ViewError> {
        self.check(offset, data.len())?;
        // SAFETY: as in `read_at`, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
        Ok(())
    }

    /// Copies all of `src` into this view (same length). The two may overlap (two regions on
    /// one page, or one region twice), so this is a memmove.
    pub fn copy_from(&self, src: &MemView<'_>) -> Result<(), ViewError> {
        if src.len != self.len {
            return Err(ViewError::LengthMismatch(src.len, self.len));
        }
        // SAFETY: both ranges lie inside live mappings (views are only made by
        // `Mapping::view`, which checks bounds); `ptr::copy` allows overlap.
        unsafe { std::ptr::copy(src.ptr, self.ptr, self.len) };
        Ok(())
    }

    fn atomic(&self) -> Result<&AtomicU64, ViewError> {
        if self.len != 8 || !(self.ptr as usize).is_multiple_of(8) {
            return Err(ViewError::Misaligned);
        }
        // SAFETY: 8 bytes, 8-aligned, inside a live mapping that outlives the borrow of self;
        // every access the router makes to these bytes while the view lives is atomic or a raw
        // copy, and the container's accesses are outside Rust's model (shared memory).
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.cast::<u64>()) })
    }

    /// `IBV_WR_ATOMIC_FETCH_AND_ADD` on this 8-byte view: returns the old value.
    pub fn fetch_add_u64(&self, add: u64) -> Result<u64, ViewError> {
        Ok(self.atomic()?.fetch_add(add, Ordering::SeqCst))
    }

    /// `IBV_WR_ATOMIC_CMP_AND_SWP` on this 8-byte view: returns the old value (swapped if it
    /// equalled `compare`).
    pub fn compare_swap_u64(&self, compare: u64, swap: u64) -> Result<u64, ViewError> {
        let atomic = self.atomic()?;
        Ok(
            match atomic.compare_exchange(compare, swap, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(old) | Err(old) => old,
            },
        )
    }

    /// FNV-1a of the bytes (test hooks), read in chunks through a private buffer.
    pub fn digest(&self) -> u64 {
        let mut hash = freeflow_proto::verbs::Fnv1a::default();
        let mut buf = [0u8; 4096];
        let mut at = 0;
        while at < self.len {
            let n = (self.len - at).min(buf.len());
            self.read_at(at, &mut buf[..n]).expect("inside the view");
            hash.update(&buf[..n]);
            at += n;
        }
        hash.0
    }
}

/// A range of a mapping that stays mapped while this is held: the mapping is shared (an
/// `Arc`), so a region deregistered, or a container gone, while a zero-copy send of its bytes
/// is partial leaves the pages mapped until the last piece went to the kernel. Like a view, it
/// hands out no reference into the shared bytes: only [`send_gathered`] reads them, in the
/// kernel.
#[derive(Debug, Clone)]
pub struct SharedSpan {
    mapping: Arc<Mapping>,
    offset: usize,
    len: usize,
}

impl SharedSpan {
    /// The bytes `offset..offset + len` of `mapping`, or None if they leave it.
    pub fn new(mapping: &Arc<Mapping>, offset: usize, len: usize) -> Option<SharedSpan> {
        mapping.view(offset, len)?;
        Some(SharedSpan {
            mapping: Arc::clone(mapping),
            offset,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Copies `data` into the span at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), ViewError> {
        let view = self
            .mapping
            .view(self.offset, self.len)
            .ok_or(ViewError::OutOfRange {
                offset: self.offset,
                len: self.len,
                view_len: self.mapping.len(),
            })?;
        view.write_at(offset, data)
    }
}

/// Receives from the socket `fd` with one `recvmsg` (non-blocking) into `span` from `skip` to
/// its end, then into `after`; the bytes received (the span's first). The kernel writes the
/// span's bytes in the container's memory during the call: what the container reads there
/// meanwhile is some mix of old and new bytes, as with a NIC's DMA. Err(InvalidInput) for a
/// span of a read-only mapping or a `skip` beyond it.
pub fn recv_into(
    fd: BorrowedFd<'_>,
    span: &SharedSpan,
    skip: usize,
    after: &mut [u8],
) -> io::Result<usize> {
    if !span.mapping.writable() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let view = span
        .mapping
        .view(span.offset + skip, span.len.saturating_sub(skip))
        .filter(|_| skip <= span.len)
        .ok_or(io::ErrorKind::InvalidInput)?;
    let mut iov = [
        libc::iovec {
            iov_base: view.ptr.cast(),
            iov_len: view.len,
        },
        libc::iovec {
            iov_base: after.as_mut_ptr().cast(),
            iov_len: after.len(),
        },
    ];
    // SAFETY: a zeroed msghdr is a valid empty one; only the iovec fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    // SAFETY: the first iovec lies inside the span's mapping (bounds checked by `view`), mapped
    // writable (checked) and kept mapped across the call by the span's `Arc`; nothing in the
    // router holds a reference into it (views copy with raw pointers). The second is `after`,
    // borrowed mutably for the call. The kernel writes at most their lengths.
    let got = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(got as usize)
}

/// One piece of a gathered send: bytes of the router's own, or a shared span from `skip` on.
#[derive(Debug, Clone, Copy)]
pub enum SendPiece<'a> {
    Bytes(&'a [u8]),
    Shared(&'a SharedSpan, usize),
}

/// The most pieces one [`send_gathered`] call takes (the rest waits for the next call).
pub const MAX_PIECES: usize = 64;

/// Sends `pieces` in order with one `sendmsg` (non-blocking, no SIGPIPE) on the socket `fd`;
/// the bytes sent (a prefix, possibly short). The kernel copies the shared spans' bytes out of
/// the container's memory during the call: if the container writes them meanwhile, what goes
/// out is some mix of old and new bytes (as on a NIC reading host memory), never a fault of the
/// router (the pages stay mapped, see [`SharedSpan`]; a hole reads as zeros).
pub fn send_gathered(fd: BorrowedFd<'_>, pieces: &[SendPiece<'_>]) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_PIECES];
    let mut n = 0;
    for piece in pieces.iter().take(MAX_PIECES) {
        let (base, len) = match *piece {
            SendPiece::Bytes(b) => (b.as_ptr(), b.len()),
            SendPiece::Shared(span, skip) => {
                let view = span
                    .mapping
                    .view(span.offset + skip, span.len.saturating_sub(skip))
                    .ok_or(io::ErrorKind::InvalidInput)?;
                (view.ptr.cast_const(), view.len)
            }
        };
        if len > 0 {
            iov[n] = libc::iovec {
                iov_base: base.cast_mut().cast(),
                iov_len: len,
            };
            n += 1;
        }
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: a zeroed msghdr is a valid empty one; only the iovec fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n;
    // SAFETY: `msg` names `n` iovecs that live across the call; each points either into a slice
    // borrowed for the call or into a shared span's mapping (bounds checked by `view` above),
    // which its `Arc` held by `pieces` keeps mapped across the call. The kernel only reads them.
    let sent = unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// A memfd of `size` bytes with `seals` (tests of this module and of the tables above it).
#[cfg(test)]
pub fn test_memfd(size: u64, seals: i32) -> OwnedFd {
    freeflow_os::memfd::sized(c"ff-test", size, seals).expect("memfd_create, ftruncate, seals")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(size: u64, seals: i32) -> OwnedFd {
        test_memfd(size, seals)
    }

    fn pwrite(fd: &OwnedFd, data: &[u8], offset: u64) {
        // SAFETY: writes from a live buffer.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                offset as i64,
            )
        };
        assert_eq!(n, data.len() as isize);
    }

    #[test]
    fn files_are_checked_before_use() {
        let size = 1 << 30;
        assert!(matches!(
            MemoryFile::adopt(memfd(size, 0), size, size),
            Err(MemoryError::NotSealed { .. })
        ));
        assert!(matches!(
            MemoryFile::adopt(memfd(size, libc::F_SEAL_SHRINK), size, size),
            Err(MemoryError::NotSealed { missing }) if missing == libc::F_SEAL_SEAL
        ));
        assert!(matches!(
            MemoryFile::adopt(memfd(size, REQUIRED_SEALS), size - 4096, size),
            Err(MemoryError::SizeMismatch { .. })
        ));
        assert!(matches!(
            MemoryFile::adopt(memfd(size, REQUIRED_SEALS), size, size / 2),
            Err(MemoryError::TooLarge(_))
        ));
        // Not a memfd: neither /dev/null nor a regular file can be sealed (the seals are asked
        // first: the kernel answers without entering the file's filesystem).
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(matches!(
            MemoryFile::adopt(null, 0, size),
            Err(MemoryError::NotSealed { .. })
        ));
        let path = std::env::temp_dir().join(format!("ff-memfile-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(
            MemoryFile::adopt(OwnedFd::from(file), 0, size),
            Err(MemoryError::NotSealed { .. })
        ));
        assert!(MemoryFile::adopt(memfd(size, REQUIRED_SEALS), size, size).is_ok());
    }

    /// A sealed hugetlbfs memfd (huge page pool empty or not: its pages come from the pool at
    /// fault time, and a fault the pool cannot serve is a SIGBUS in the router) is refused,
    /// as the process's own file and as a further one.
    #[test]
    fn hugetlb_memory_files_are_refused() {
        let size = 2 << 20;
        let make = || {
            // SAFETY: a NUL-terminated name; constant flags.
            let raw = unsafe {
                libc::memfd_create(
                    c"ff-huge".as_ptr(),
                    libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_HUGETLB,
                )
            };
            assert!(
                raw >= 0,
                "memfd_create(MFD_HUGETLB): {}",
                io::Error::last_os_error()
            );
            // SAFETY: a new descriptor nobody else owns.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
            // SAFETY: plain integers.
            assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
            freeflow_os::memfd::add_seals(fd.as_fd(), REQUIRED_SEALS).unwrap();
            fd
        };
        for adopted in [
            MemoryFile::adopt(make(), size, size),
            MemoryFile::adopt_further(make(), size, size),
        ] {
            assert!(
                matches!(adopted, Err(MemoryError::NotTmpfs(magic)) if magic == libc::HUGETLBFS_MAGIC as u64),
                "{adopted:?}"
            );
        }
    }

    /// A further file is the program's memfd, which it may grow (it is sealed only against
    /// shrinking): bigger than declared is fine, and pages it grew by since can be mapped.
    #[test]
    fn further_files_may_grow() {
        let size = 16 * 4096u64;
        let fd = memfd(size, REQUIRED_SEALS);
        assert!(matches!(
            MemoryFile::adopt(fd.try_clone().unwrap(), size - 4096, size * 4),
            Err(MemoryError::SizeMismatch { .. })
        ));
        let file =
            MemoryFile::adopt_further(fd.try_clone().unwrap(), size - 4096, size * 4).unwrap();
        assert!(matches!(
            MemoryFile::adopt_further(fd.try_clone().unwrap(), size + 4096, size * 4),
            Err(MemoryError::SizeMismatch { .. })
        ));
        // SAFETY: ftruncate takes plain integers and touches no memory of ours.
        let grown = unsafe { libc::ftruncate(fd.as_raw_fd(), (2 * size) as i64) };
        assert_eq!(grown, 0);
        pwrite(&fd, &[1u8; 8192], size + 4096);
        let m = file.map(size + 4096, 8192, true).unwrap();
        let mut out = [0u8; 4];
        m.view(0, 4).unwrap().read_at(0, &mut out).unwrap();
        assert_eq!(out, [1u8; 4]);
        // Not beyond its size now.
        assert!(matches!(
            file.map(2 * size, 4096, true),
            Err(MemoryError::OutOfFile { .. })
        ));
    }

    /// Regions without write access are mapped read-only, so a file open read-only can hold
    /// them; one with write access cannot be mapped from such a file.
    #[test]
    fn read_only_mappings() {
        let size = 4 * 4096u64;
        let fd = memfd(size, REQUIRED_SEALS);
        pwrite(&fd, &[2u8; 4 * 4096], 0);
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let read_only = OwnedFd::from(std::fs::File::open(path).unwrap());
        let file = MemoryFile::adopt_further(read_only, size, size).unwrap();
        let m = file.map(0, 4096, false).unwrap();
        assert!(!m.writable());
        let mut out = [0u8; 2];
        m.view(0, 2).unwrap().read_at(0, &mut out).unwrap();
        assert_eq!(out, [2u8; 2]);
        assert!(matches!(
            file.map(0, 4096, true),
            Err(MemoryError::Os { op: "mmap", .. })
        ));
    }

    #[test]
    fn only_backed_pages_inside_the_file_are_mapped() {
        let size = 1 << 30;
        let fd = memfd(size, REQUIRED_SEALS);
        pwrite(&fd, &[7u8; 8192], 1 << 20);
        let file = MemoryFile::adopt(fd, size, size).unwrap();
        for (offset, len) in [
            (1 << 20, 0),
            ((1 << 20) + 1, 4096),
            (1 << 20, 100),
            (size - 4096, 8192),
            (u64::MAX - 4095, 8192),
        ] {
            assert!(
                matches!(
                    file.map(offset, len, true),
                    Err(MemoryError::OutOfFile { .. })
                ),
                "{offset:#x}+{len:#x}"
            );
        }
        assert!(matches!(
            file.map(1 << 20, 3 * 4096, true),
            Err(MemoryError::NotBacked { hole, .. }) if hole == (1 << 20) + 8192
        ));
        assert!(matches!(
            file.map(0, 4096, true),
            Err(MemoryError::NotBacked { .. })
        ));
        let m = file.map(1 << 20, 8192, true).unwrap();
        let v = m.view(4000, 200).unwrap();
        let mut out = [0u8; 200];
        v.read_at(0, &mut out).unwrap();
        assert_eq!(out, [7u8; 200]);
        // The router's writes reach the file (and so every other mapping of it).
        v.write_at(10, b"router").unwrap();
        let mut back = [0u8; 6];
        // SAFETY: pread into a live buffer.
        let n = unsafe {
            libc::pread(
                file.fd.as_raw_fd(),
                back.as_mut_ptr().cast(),
                6,
                (1 << 20) + 4010,
            )
        };
        assert_eq!(n, 6);
        assert_eq!(&back, b"router");
    }

    #[test]
    fn views_check_their_bounds() {
        let m = Mapping::anonymous(8192);
        assert!(m.view(8192, 0).is_some());
        assert!(m.view(8192, 1).is_none());
        assert!(m.view(1, usize::MAX).is_none());
        assert!(m.view(usize::MAX, 2).is_none());
        let v = m.view(100, 50).unwrap();
        assert_eq!(v.write_at(0, &[1u8; 50]), Ok(()));
        assert!(v.write_at(1, &[1u8; 50]).is_err());
        assert!(v.read_at(usize::MAX, &mut [0u8; 2]).is_err());
        let w = m.view(120, 50).unwrap();
        // Overlapping copy behaves as memmove.
        let mut pattern = [0u8; 50];
        for (i, b) in pattern.iter_mut().enumerate() {
            *b = i as u8;
        }
        v.write_at(0, &pattern).unwrap();
        w.copy_from(&v).unwrap();
        let mut out = [0u8; 50];
        w.read_at(0, &mut out).unwrap();
        assert_eq!(out, pattern);
        assert_eq!(
            w.copy_from(&m.view(0, 10).unwrap()),
            Err(ViewError::LengthMismatch(10, 50))
        );
    }

    #[test]
    fn atomics_need_eight_aligned_bytes() {
        let m = Mapping::anonymous(4096);
        let v = m.view(64, 8).unwrap();
        v.write_at(0, &5u64.to_ne_bytes()).unwrap();
        assert_eq!(v.fetch_add_u64(3), Ok(5));
        assert_eq!(v.compare_swap_u64(7, 100), Ok(8));
        assert_eq!(v.compare_swap_u64(8, 100), Ok(8));
        let mut out = [0u8; 8];
        v.read_at(0, &mut out).unwrap();
        assert_eq!(u64::from_ne_bytes(out), 100);
        assert_eq!(
            m.view(65, 8).unwrap().fetch_add_u64(1),
            Err(ViewError::Misaligned)
        );
        assert_eq!(
            m.view(64, 16).unwrap().compare_swap_u64(0, 1),
            Err(ViewError::Misaligned)
        );
    }

    #[test]
    fn digest_is_fnv1a_of_the_bytes() {
        let m = Mapping::anonymous(3 * 4096);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let v = m.view(5, data.len()).unwrap();
        v.write_at(0, &data).unwrap();
        assert_eq!(v.digest(), freeflow_proto::verbs::Fnv1a::digest(&data));
    }
}
