//! The router's side of registered memory: a container's memory file (checked before use),
//! mappings of its page ranges, and views into them. One of the two modules of the verbs engine
//! that may hold unsafe code (with `notify`).
//!
//! Memory here is shared with a container that may write it at any moment. Nothing makes a Rust
//! reference into it: bytes move with raw copies (`ptr::copy`), and the RDMA atomics use
//! `AtomicU64` on the shared word, which is what hardware atomics promise too (atomic with
//! respect to other atomics only). A file sealed against shrinking cannot lose the pages a
//! mapping covers, so no access here can fault; a container that punches holes into its file
//! reads zeros and, at worst, makes the router's writes allocate pages, bounded by the mapped
//! range.
#![allow(unsafe_code)]

use freeflow_proto::verbs::{PAGE_SIZE, REQUIRED_SEALS};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a memory file or a mapping of it was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("the memory file is not a regular file")]
    NotAFile,
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

/// A container process's memory file, checked: a regular file of the size the shim declared,
/// sealed so it cannot shrink.
#[derive(Debug)]
pub struct MemoryFile {
    fd: OwnedFd,
    size: u64,
}

impl MemoryFile {
    /// Checks `fd` and takes it. `declared` is the size the shim's message names; `max` the
    /// largest size accepted.
    pub fn adopt(fd: OwnedFd, declared: u64, max: u64) -> Result<MemoryFile, MemoryError> {
        // SAFETY: stat is plain data; zero is a valid value for fstat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one struct stat into `st`, which lives across the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(os("fstat")(io::Error::last_os_error()));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(MemoryError::NotAFile);
        }
        let actual = st.st_size as u64;
        if actual != declared {
            return Err(MemoryError::SizeMismatch { declared, actual });
        }
        if actual > max {
            return Err(MemoryError::TooLarge(actual));
        }
        // A file that cannot be sealed (anything but memfd/shmem) fails with EINVAL: a refusal
        // too.
        let Ok(seals) = freeflow_os::memfd::seals(fd.as_fd()) else {
            return Err(MemoryError::NotSealed {
                missing: REQUIRED_SEALS,
            });
        };
        let missing = REQUIRED_SEALS & !seals;
        if missing != 0 {
            return Err(MemoryError::NotSealed { missing });
        }
        Ok(MemoryFile { fd, size: actual })
    }

    /// Maps `len` bytes of the file at `offset` (both page multiples, inside the file, every
    /// page backed: the shim wrote them when it moved the application's pages there).
    pub fn map(&self, offset: u64, len: u64) -> Result<Mapping, MemoryError> {
        self.map_pages(offset, len, true)
    }

    /// Maps `len` bytes of the file at `offset` (both page multiples, inside the file), holes
    /// and all: a further file is the program's own shared memory, where pages it never wrote
    /// are holes.
    pub fn map_sparse(&self, offset: u64, len: u64) -> Result<Mapping, MemoryError> {
        self.map_pages(offset, len, false)
    }

    fn map_pages(&self, offset: u64, len: u64, backed: bool) -> Result<Mapping, MemoryError> {
        let out_of_file = || MemoryError::OutOfFile { offset, len };
        if len == 0 || !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(out_of_file());
        }
        let end = offset.checked_add(len).ok_or_else(out_of_file)?;
        if end > self.size || usize::try_from(len).is_err() || i64::try_from(offset).is_err() {
            return Err(out_of_file());
        }
        if backed {
            self.check_backed(offset, len, end)?;
        }
        self.map_unchecked(offset, len)
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

    /// Maps pages [`MemoryFile::map_pages`] checked.
    fn map_unchecked(&self, offset: u64, len: u64) -> Result<Mapping, MemoryError> {
        // SAFETY: a new shared mapping at an address the kernel picks overlaps nothing of ours;
        // offset and length were checked to be page multiples inside the file; the result is
        // checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
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
        })
    }
}

/// A mapping of part of a memory file, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range owned by whoever holds it; it is only reached through
// views that copy bytes in and out with raw pointer operations, from any thread.
unsafe impl Send for Mapping {}

// SAFETY: the device reads and writes the mapping as the views do (raw bytes, no reference);
// shared between threads only as an address range.
#[cfg(feature = "rdma-hw")]
unsafe impl Sync for Mapping {}

// SAFETY: a Mapping is mapped read-write at its address from `map` until drop, and nothing
// else unmaps or moves it; a region holding it (an Arc) keeps it alive while registered.
#[cfg(feature = "rdma-hw")]
unsafe impl super::hw::sys::DeviceMemory for Mapping {
    fn range(&self) -> (NonNull<u8>, usize) {
        (self.ptr, self.len)
    }
}

impl Mapping {
    pub fn len(&self) -> usize {
        self.len
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
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
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
        // Not a memfd: /dev/null is no regular file; a regular file cannot be sealed.
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(matches!(
            MemoryFile::adopt(null, 0, size),
            Err(MemoryError::NotAFile)
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
                matches!(file.map(offset, len), Err(MemoryError::OutOfFile { .. })),
                "{offset:#x}+{len:#x}"
            );
        }
        assert!(matches!(
            file.map(1 << 20, 3 * 4096),
            Err(MemoryError::NotBacked { hole, .. }) if hole == (1 << 20) + 8192
        ));
        assert!(matches!(
            file.map(0, 4096),
            Err(MemoryError::NotBacked { .. })
        ));
        let m = file.map(1 << 20, 8192).unwrap();
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
