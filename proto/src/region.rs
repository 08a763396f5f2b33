//! The shared region of one attachment: a sealed memfd holding a header and a set of rings.
//!
//! The router creates the memfd, sizes it, seals its size (so a container cannot shrink it and
//! make the router's accesses fault with SIGBUS), writes the header and passes the fd to the shim,
//! which maps it and validates the header against the file's real size before using it. The
//! router never reads the header back: it addresses the rings with the layout it created.
//!
//! The header also tells the shim which cores the router's shards run on
//! ([`announce_router_cores`]), so that a program polling a queue on one of them can give the
//! core up while it waits (the verbs shim's `poll_cq`). It is a hint, never trusted for
//! anything else.

use crate::codec;
use crate::ring::RingGeometry;
use crate::RingMemory;
use freeflow_os::memfd;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An `mmap`ed range, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range; it is only reached through atomics or the ring
// protocol's exclusive slot ownership, so sharing it between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared, readable and writable.
    pub fn map_fd(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        Self::map(Some(fd), len)
    }

    /// Anonymous shared memory, inherited across fork (for tests and single-process use).
    pub fn anonymous_shared(len: usize) -> io::Result<Self> {
        Self::map(None, len)
    }

    fn map(fd: Option<BorrowedFd<'_>>, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let (flags, raw) = match fd {
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no Rust object; the
        // arguments are plain values and the result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `len` bytes at `offset` out of the mapping.
    fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len);
        // SAFETY: the range is inside the mapping (asserted); bytes are copied as plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }

    /// Copies `data` into the mapping at `offset`.
    fn write_bytes(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: the range is inside the mapping (asserted); the source is a separate buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, and no reference into the range can
        // outlive self (RingMemory holds an Arc<Mapping>).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Magic at offset 0 of every region.
pub const REGION_MAGIC: [u8; 8] = *b"FFREGN\0\x01";
/// Layout version of the region header.
pub const REGION_VERSION: u32 = 1;
/// Most rings one region can hold.
pub const MAX_RINGS: usize = 8;
/// Bytes reserved for the header; rings start here.
pub const HEADER_SIZE: usize = 256;
/// Largest region the shim accepts (a sanity bound on what a router may ask it to map).
pub const MAX_REGION_SIZE: usize = 1 << 30;

/// The header's fields: the region's at the front, then from [`field::RINGS`] one entry of
/// [`field::RING_ENTRY`] bytes per ring, whose fields are offsets inside the entry. The rest of
/// the [`HEADER_SIZE`] bytes are zero.
mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..12;
    pub const RING_COUNT: Range<usize> = 12..16;
    /// The region's size in bytes, which the shim checks against the file's.
    pub const SIZE: Range<usize> = 16..24;
    /// The cores the router's shards run on: bit n for core n (cores 0..64); 0 when not
    /// published (this word was reserved and zero before, so either side may be older).
    pub const ROUTER_CORES: Range<usize> = 24..32;
    /// Where the ring entries start.
    pub const RINGS: usize = 32;
    /// Bytes of one ring entry.
    pub const RING_ENTRY: usize = 16;
    /// Where the ring starts in the region.
    pub const RING_OFFSET: Range<usize> = 0..8;
    pub const SLOT_SIZE: Range<usize> = 8..12;
    pub const SLOT_COUNT: Range<usize> = 12..16;

    /// Ring `i`'s entry in the header.
    pub fn ring(i: usize) -> Range<usize> {
        let start = RINGS + i * RING_ENTRY;
        start..start + RING_ENTRY
    }

    // Every entry the header may hold (one more than the most rings, which `attach` reads to
    // reject a count over the limit) ends inside the header.
    const _: () = assert!(RINGS + (super::MAX_RINGS + 1) * RING_ENTRY <= super::HEADER_SIZE);
}

/// Errors setting up or attaching a region.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("invalid region: {0}")]
    Invalid(String),
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> RegionError {
    move |source| RegionError::Os { op, source }
}

/// The cores of this process's router shards as a bit mask, written into the header of every
/// region the process creates from the announcement on.
static ROUTER_CORES: AtomicU64 = AtomicU64::new(0);

/// The router announces the cores its shards are pinned to, before it creates regions. Cores
/// from 64 up cannot be named in the header and are left out.
pub fn announce_router_cores(cores: &[usize]) {
    ROUTER_CORES.store(cores_mask(cores), Ordering::Relaxed);
}

/// `cores` as a bit mask (bit n: core n), without the cores from 64 up.
pub fn cores_mask(cores: &[usize]) -> u64 {
    cores
        .iter()
        .filter(|&&c| c < 64)
        .fold(0, |mask, &c| mask | 1 << c)
}

/// A mapped region with its validated ring layout.
#[derive(Debug, Clone)]
pub struct SharedRegion {
    mapping: Arc<Mapping>,
    rings: Vec<(usize, RingGeometry)>,
    /// The router's cores as its header says (see [`announce_router_cores`]).
    router_cores: u64,
}

/// Offsets for `rings` laid out after the header, each 128-byte aligned, and the total size
/// rounded up to a page.
fn layout(rings: &[RingGeometry]) -> Result<(Vec<(usize, RingGeometry)>, usize), RegionError> {
    if rings.is_empty() || rings.len() > MAX_RINGS {
        return Err(RegionError::Invalid(format!(
            "{} rings, expected 1..={MAX_RINGS}",
            rings.len()
        )));
    }
    let mut offset = HEADER_SIZE;
    let mut placed = Vec::with_capacity(rings.len());
    for &geometry in rings {
        let geometry = geometry.validate().map_err(RegionError::Invalid)?;
        placed.push((offset, geometry));
        offset = (offset + geometry.byte_len()).next_multiple_of(128);
    }
    let size = offset.next_multiple_of(4096);
    if size > MAX_REGION_SIZE {
        return Err(RegionError::Invalid(format!(
            "region of {size} bytes is too large"
        )));
    }
    Ok((placed, size))
}

impl SharedRegion {
    /// Creates a sealed memfd laid out with `rings` (router side). Returns the mapped region and
    /// the fd to pass to the other process.
    pub fn create(
        name: &str,
        rings: &[RingGeometry],
    ) -> Result<(SharedRegion, OwnedFd), RegionError> {
        let (placed, size) = layout(rings)?;
        let cname = std::ffi::CString::new(name)
            .map_err(|_| RegionError::Invalid("name has NUL".into()))?;
        let file = std::fs::File::from(memfd::create(&cname).map_err(os("memfd_create"))?);
        file.set_len(size as u64).map_err(os("ftruncate"))?;
        let fd = OwnedFd::from(file);
        memfd::add_seals(fd.as_fd(), memfd::FIXED_SIZE_SEALS).map_err(os("F_ADD_SEALS"))?;
        let mapping = Arc::new(Mapping::map_fd(fd.as_fd(), size).map_err(os("mmap"))?);
        let mut header = [0u8; HEADER_SIZE];
        codec::put(&mut header, field::MAGIC, REGION_MAGIC);
        codec::put(&mut header, field::VERSION, REGION_VERSION);
        codec::put(&mut header, field::RING_COUNT, placed.len() as u32);
        codec::put(&mut header, field::SIZE, size as u64);
        let router_cores = ROUTER_CORES.load(Ordering::Relaxed);
        codec::put(&mut header, field::ROUTER_CORES, router_cores);
        for (i, (offset, geometry)) in placed.iter().enumerate() {
            let ring = &mut header[field::ring(i)];
            codec::put(ring, field::RING_OFFSET, *offset as u64);
            codec::put(ring, field::SLOT_SIZE, geometry.slot_size);
            codec::put(ring, field::SLOT_COUNT, geometry.slot_count);
        }
        mapping.write_bytes(0, &header);
        Ok((
            SharedRegion {
                mapping,
                rings: placed,
                router_cores,
            },
            fd,
        ))
    }

    /// Maps a region received from the router (shim side) and validates its header against the
    /// file's real size and seals.
    pub fn attach(fd: BorrowedFd<'_>) -> Result<SharedRegion, RegionError> {
        // SAFETY: fstat writes into the zeroed stat buffer we pass; the fd is borrowed and open.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(os("fstat")(io::Error::last_os_error()));
        }
        let size = usize::try_from(st.st_size).unwrap_or(0);
        if !(HEADER_SIZE..=MAX_REGION_SIZE).contains(&size) {
            return Err(RegionError::Invalid(format!("region file of {size} bytes")));
        }
        let seals = memfd::seals(fd).unwrap_or(0);
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(RegionError::Invalid(
                "region file is not sealed against shrinking".into(),
            ));
        }
        let mapping = Arc::new(Mapping::map_fd(fd, size).map_err(os("mmap"))?);
        let mut header = [0u8; HEADER_SIZE];
        mapping.read_bytes(0, &mut header);
        if codec::get::<[u8; 8]>(&header, field::MAGIC) != REGION_MAGIC {
            return Err(RegionError::Invalid("bad magic".into()));
        }
        let version: u32 = codec::get(&header, field::VERSION);
        if version != REGION_VERSION {
            return Err(RegionError::Invalid(format!(
                "region version {version}, this build speaks {REGION_VERSION}"
            )));
        }
        let count = codec::get::<u32>(&header, field::RING_COUNT) as usize;
        let declared: u64 = codec::get(&header, field::SIZE);
        if declared != size as u64 {
            return Err(RegionError::Invalid(format!(
                "header says {declared} bytes, file has {size}"
            )));
        }
        let geometries: Vec<RingGeometry> = (0..count.min(MAX_RINGS + 1))
            .map(|i| RingGeometry {
                slot_size: codec::get(&header[field::ring(i)], field::SLOT_SIZE),
                slot_count: codec::get(&header[field::ring(i)], field::SLOT_COUNT),
            })
            .collect();
        let (placed, expected_size) = layout(&geometries)?;
        for (i, (offset, _)) in placed.iter().enumerate() {
            if codec::get::<u64>(&header[field::ring(i)], field::RING_OFFSET) != *offset as u64 {
                return Err(RegionError::Invalid(format!(
                    "ring {i} at an unexpected offset"
                )));
            }
        }
        if expected_size != size {
            return Err(RegionError::Invalid(format!(
                "layout needs {expected_size} bytes, file has {size}"
            )));
        }
        Ok(SharedRegion {
            mapping,
            rings: placed,
            router_cores: codec::get(&header, field::ROUTER_CORES),
        })
    }

    /// The cores the router's shards run on, as the region's creator announced them (bit n:
    /// core n; 0 if it did not).
    pub fn router_cores(&self) -> u64 {
        self.router_cores
    }

    /// Number of rings.
    pub fn ring_count(&self) -> usize {
        self.rings.len()
    }

    /// Handle on ring `index`.
    pub fn ring(&self, index: usize) -> Result<RingMemory, RegionError> {
        let (offset, geometry) = *self
            .rings
            .get(index)
            .ok_or_else(|| RegionError::Invalid(format!("no ring {index}")))?;
        RingMemory::new(self.mapping.clone(), offset, geometry).map_err(RegionError::Invalid)
    }

    /// Total mapped bytes.
    pub fn byte_len(&self) -> usize {
        self.mapping.len()
    }
}
