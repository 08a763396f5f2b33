//! Which pages of this process are registered memory, and the memory file that backs them.
//!
//! One memory file per process (not per context): a page can only be mapped from one file, and
//! two contexts, or two regions, may register the same page. The page at virtual address A
//! lives at file offset A, so a region's pages are one contiguous file range, two regions on
//! one page share that page without any bookkeeping beyond a count, and the router maps a
//! region with one `mmap`. The counts say how many registered regions cover each page: the
//! first registration moves pages onto the file, the last deregistration moves them back onto
//! private memory and frees the file's pages, so after `ibv_dereg_mr` the process's memory is
//! as it was (and the file holds no memory for pages the program later unmaps).
//!
//! Before moving anything, `/proc/self/maps` says what the range is: unmapped or unreadable
//! pages fail with EFAULT, as pinning them would; pages shared with something else (a `MAP_SHARED`
//! mapping that is not ours) are not supported, since moving them would cut that sharing;
//! pages already counted must still be this file's mapping (else the program unmapped
//! registered memory and mapped something new there).
//!
//! After `fork`, the child has none of the registered pages (MADV_DONTFORK) and starts with an
//! empty table and a new file.
//!
//! One kind of shared mapping is registered as it is, without moving anything: a `MAP_SHARED`
//! mapping of a memory file the program holds open, sealed so it cannot shrink (a memfd it
//! made or received; a Freeflow router that runs on a Freeflow device maps its containers'
//! memory files so). The router gets that file too, as a further memory file with a number
//! (see `freeflow_proto::verbs::MemoryFileMsg`), and maps the region from it by file offset.
//! The library keeps its own descriptor of each such file while regions use it.

use crate::maps::{self, Vma};
use crate::memory::{self, SideStack};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// Why pages could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    #[error("address {0:#x} of the range is not mapped or not readable")]
    Unmapped(u64),
    #[error(
        "pages at {0:#x} are a shared mapping of something else; registering them is not supported"
    )]
    SharedMapping(u64),
    #[error("pages at {0:#x} are registered but no longer this library's mapping (unmapped and mapped anew while registered)")]
    Stale(u64),
    #[error("range {0:#x}.. lies beyond the addresses the memory file covers")]
    BeyondFile(u64),
    #[error("range {0:#x}.. includes this library's own memory")]
    LibraryMemory(u64),
    #[error("pages at {0:#x} are a shared mapping of a file not sealed against shrinking; registering them is not supported")]
    NotSealed(u64),
    #[error(
        "pages at {0:#x}.. span more than one shared mapping; registering them is not supported"
    )]
    SpansMappings(u64),
    #[error("too many memory files with registered regions")]
    TooManyFiles,
    #[error("pages at {0:#x} are not writable, and the region's access includes writing")]
    ReadOnly(u64),
    #[error("pages at {0:#x} are a shared mapping of a file the program has open only read-only (or write-only), and the region's access needs {1}")]
    FileAccess(u64, &'static str),
    #[error("reading /proc/self/maps: {0}")]
    Maps(io::Error),
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl PagesError {
    pub fn errno(&self) -> i32 {
        match self {
            PagesError::Unmapped(_)
            | PagesError::Stale(_)
            | PagesError::BeyondFile(_)
            | PagesError::LibraryMemory(_)
            | PagesError::ReadOnly(_) => libc::EFAULT,
            PagesError::SharedMapping(_)
            | PagesError::FileAccess(..)
            | PagesError::NotSealed(_)
            | PagesError::SpansMappings(_) => libc::EOPNOTSUPP,
            PagesError::TooManyFiles => libc::ENOMEM,
            PagesError::Maps(e) | PagesError::Os { source: e, .. } => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }
}

/// How many registrations cover each part of the address space: non-overlapping `[start, end)`
/// segments with non-zero counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeCounts {
    segments: BTreeMap<u64, (u64, u32)>,
}

impl RangeCounts {
    /// `[start, end)` cut at segment boundaries, with the count of each part (0: not covered).
    pub fn parts(&self, start: u64, end: u64) -> Vec<(u64, u64, u32)> {
        let mut out = Vec::new();
        let mut at = start;
        // The segment that may begin before `start`, then every segment beginning inside.
        let first = self.segments.range(..=start).next_back();
        let rest = self.segments.range(start.saturating_add(1)..end);
        for (&s, &(e, count)) in first.into_iter().chain(rest) {
            if e <= at || s >= end {
                continue;
            }
            if s > at {
                out.push((at, s, 0));
                at = s;
            }
            let part_end = e.min(end);
            out.push((at, part_end, count));
            at = part_end;
        }
        if at < end {
            out.push((at, end, 0));
        }
        out
    }

    /// Counts one more registration of `[start, end)`.
    pub fn add(&mut self, start: u64, end: u64) {
        self.change(start, end, |c| c + 1);
    }

    /// Counts one registration of `[start, end)` less; returns the parts no registration covers
    /// any more.
    pub fn remove(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let freed: Vec<(u64, u64)> = self
            .parts(start, end)
            .into_iter()
            .filter(|&(_, _, c)| c == 1)
            .map(|(s, e, _)| (s, e))
            .collect();
        self.change(start, end, |c| c.saturating_sub(1));
        freed
    }

    fn change(&mut self, start: u64, end: u64, f: impl Fn(u32) -> u32) {
        if start >= end {
            return;
        }
        self.split_at(start);
        self.split_at(end);
        for (s, e, count) in self.parts(start, end) {
            let new = f(count);
            self.segments.remove(&s);
            if new > 0 {
                self.segments.insert(s, (e, new));
            }
        }
        self.merge_around(start);
        self.merge_around(end);
    }

    /// Makes `at` a segment boundary.
    fn split_at(&mut self, at: u64) {
        if let Some((&s, &(e, c))) = self.segments.range(..at).next_back() {
            if e > at {
                self.segments.insert(s, (at, c));
                self.segments.insert(at, (e, c));
            }
        }
    }

    /// Joins the segments meeting at `at` if their counts are equal (keeps the map small).
    fn merge_around(&mut self, at: u64) {
        let Some((&s, &(e, c))) = self.segments.range(..at).next_back() else {
            return;
        };
        if e != at {
            return;
        }
        if let Some(&(e2, c2)) = self.segments.get(&at) {
            if c2 == c {
                self.segments.remove(&at);
                self.segments.insert(s, (e2, c));
            }
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

/// The memory file of this process and how its pages are used.
#[derive(Debug)]
struct Backing {
    pid: u32,
    fd: OwnedFd,
    id: ((u32, u32), u64),
    /// Changes with every new file (a forked child makes its own): attachments that were sent
    /// another generation need this one.
    generation: u64,
}

/// A memory file the program mapped shared itself, with regions registered in it.
#[derive(Debug)]
struct FurtherFile {
    number: u16,
    /// This library's own descriptor of the file (opened anew, with the access mode of the
    /// program's descriptor it was found by).
    fd: OwnedFd,
    /// `fd` allows writing (the program's descriptor was open read-write).
    writable: bool,
    id: ((u32, u32), u64),
    /// Registered regions in it; the entry goes with the last.
    regions: u32,
}

/// A range registered in a further memory file (see [`Pages::acquire_further`]).
#[derive(Debug)]
pub struct FurtherRange {
    /// The number the router knows the file by.
    pub number: u16,
    /// A descriptor of the file to send.
    pub fd: OwnedFd,
    /// The file's size now.
    pub size: u64,
    /// File offset of the range's first page.
    pub file_offset: u64,
}

/// The process's registered pages.
#[derive(Debug, Default)]
pub struct Pages {
    backing: Option<Backing>,
    /// Further memory files in use, and the process they belong to (a forked child starts with
    /// none: its regions are its own).
    further: Vec<FurtherFile>,
    further_pid: u32,
    last_number: u16,
    counts: RangeCounts,
    generations: u64,
    /// Where the moves run (see `memory`); made on first use.
    side: Option<SideStack>,
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> PagesError {
    move |source| PagesError::Os { op, source }
}

impl Pages {
    /// The memory file of this process (made on first use, and anew in a forked child) and its
    /// generation.
    pub fn file(&mut self) -> Result<(&OwnedFd, u64), PagesError> {
        let pid = std::process::id();
        if self.backing.as_ref().is_none_or(|b| b.pid != pid) {
            // A child inherited its parent's table and file; it has none of those pages.
            self.counts = RangeCounts::default();
            self.backing = None;
            let fd = memory::create_memory_file().map_err(|source| PagesError::Os {
                op: "memory file",
                source,
            })?;
            let id = memory::file_id(fd.as_fd()).map_err(|source| PagesError::Os {
                op: "fstat of the memory file",
                source,
            })?;
            self.generations += 1;
            self.backing = Some(Backing {
                pid,
                fd,
                id,
                generation: self.generations,
            });
        }
        let b = self.backing.as_ref().expect("set above");
        Ok((&b.fd, b.generation))
    }

    /// [`Pages::acquire_in`] with the mappings read now, for a region without write access
    /// (tests).
    #[cfg(test)]
    pub fn acquire(&mut self, start: u64, end: u64) -> Result<(), PagesError> {
        let vmas = maps::read_self_for(start, end).map_err(PagesError::Maps)?;
        self.acquire_in(&vmas, start, end, false)
    }

    /// Registers the pages `[start, end)` (page-aligned) once more: pages no registration
    /// covered yet move onto the memory file. `vmas` are the process's mappings, read for this
    /// registration; `writes`, whether the region's access includes writing (then every page
    /// must be writable, as the kernel's drivers require). On error nothing changed.
    pub fn acquire_in(
        &mut self,
        vmas: &[Vma],
        start: u64,
        end: u64,
        writes: bool,
    ) -> Result<(), PagesError> {
        if end > freeflow_proto::verbs::MEMORY_FILE_SIZE {
            return Err(PagesError::BeyondFile(start));
        }
        self.file()?;
        if self.side.is_none() {
            self.side = Some(SideStack::new().map_err(os("side stack"))?);
        }
        let side = self.side.as_mut().expect("made above");
        let (side_lo, side_hi) = side.range();
        if start < side_hi && side_lo < end {
            return Err(PagesError::LibraryMemory(start));
        }
        let backing = self.backing.as_ref().expect("made by file()");
        let mut plan: Vec<(u64, u64, i32)> = Vec::new();
        for (a, b, count) in self.counts.parts(start, end) {
            let pieces = maps::pieces(vmas, a, b).map_err(PagesError::Unmapped)?;
            for (pa, pb, vma) in pieces {
                if writes && !vma.write {
                    return Err(PagesError::ReadOnly(pa));
                }
                let ours = vma.is_identity_mapping_of(backing.id.0, backing.id.1);
                if count > 0 {
                    if !ours {
                        return Err(PagesError::Stale(pa));
                    }
                    continue;
                }
                check_movable(vma, pa, ours)?;
                if !ours {
                    plan.push((pa, pb, vma.prot()));
                }
            }
        }
        // The moves, on the side stack. Nothing in the job allocates; results are written
        // only between moves (see `memory`).
        let fd = backing.fd.as_fd();
        let mut failure: Option<io::Error> = None;
        let mut job = || {
            for (i, &(a, b, prot)) in plan.iter().enumerate() {
                // SAFETY: /proc/self/maps just said [a, b) is a private readable mapping of the
                // application (check_movable) and not this library's side stack; this library
                // holds no reference into it.
                #[allow(unsafe_code)]
                let moved = unsafe { memory::move_onto_file(fd, a, b - a, prot) };
                if let Err(e) = moved {
                    for &(a, b, prot) in plan[..i].iter().rev() {
                        // A page that cannot move back stays on the file, uncounted; a later
                        // registration finds it there and uses it as it is.
                        if give_back(a, b, prot).is_ok() {
                            memory::punch_hole(fd, a, b - a);
                        }
                    }
                    failure = Some(e);
                    return;
                }
            }
        };
        side.run(&mut job)
            .map_err(os("switching to the side stack"))?;
        if let Some(source) = failure {
            return Err(PagesError::Os {
                op: "moving pages onto the memory file",
                source,
            });
        }
        self.counts.add(start, end);
        Ok(())
    }

    /// Registers `[start, end)` once less: pages no registration covers any more move back
    /// onto private memory and leave the file. Pages the program unmapped meanwhile are only
    /// freed in the file.
    pub fn release(&mut self, start: u64, end: u64) {
        let pid = std::process::id();
        let Some(backing) = self.backing.as_ref().filter(|b| b.pid == pid) else {
            return; // registered by the parent of this forked child: nothing of it is here
        };
        let freed = self.counts.remove(start, end);
        if freed.is_empty() {
            return;
        }
        let vmas = maps::read_self().unwrap_or_default();
        let mut plan: Vec<(u64, u64, i32)> = Vec::new();
        for &(a, b) in &freed {
            for vma in vmas.iter().filter(|v| v.start < b && v.end > a) {
                if vma.is_identity_mapping_of(backing.id.0, backing.id.1) {
                    plan.push((vma.start.max(a), vma.end.min(b), vma.prot()));
                }
            }
        }
        let fd = backing.fd.as_fd();
        // Pieces that could not move back keep their pages in the file (the program still uses
        // them); everything else of the freed ranges leaves the file.
        let mut kept: Vec<(u64, u64)> = Vec::with_capacity(plan.len());
        let mut job = || {
            for &(a, b, prot) in &plan {
                if give_back(a, b, prot).is_err() {
                    kept.push((a, b)); // within capacity: no allocation
                }
            }
        };
        let Some(side) = self.side.as_mut() else {
            return; // nothing was ever moved
        };
        if let Err(e) = side.run(&mut job) {
            crate::registry::debug(format_args!("side stack: {e}"));
            return;
        }
        if !kept.is_empty() {
            crate::registry::debug(format_args!(
                "pages {kept:x?} could not move off the memory file; they stay on it"
            ));
        }
        for (a, b) in freed {
            let mut at = a;
            for &(ka, kb) in kept.iter().filter(|&&(ka, kb)| ka < b && kb > a) {
                if ka > at {
                    memory::punch_hole(fd, at, ka - at);
                }
                at = at.max(kb);
            }
            if at < b {
                memory::punch_hole(fd, at, b - at);
            }
        }
    }

    /// True if no page is registered (tests).
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.further.is_empty()
    }

    /// If `[start, end)` (page-aligned) is a shared mapping of a memory file the program holds
    /// open, other than this library's own, counts one more region in that file and says
    /// where the range is in it; `Ok(None)` if the range starts in anything else (which
    /// [`Pages::acquire`] handles). A shared mapping that cannot be registered so (no
    /// descriptor of its file open, a file that may shrink, several mappings) is an error.
    ///
    /// `vmas` and `writes` are as for [`Pages::acquire_in`]. The range's pages are populated
    /// (see [`memory::populate`]) before this returns: the router accepts only backed pages.
    pub fn acquire_further_in(
        &mut self,
        vmas: &[Vma],
        start: u64,
        end: u64,
        writes: bool,
    ) -> Result<Option<FurtherRange>, PagesError> {
        let pid = std::process::id();
        if self.further_pid != pid {
            self.further.clear();
            self.further_pid = pid;
        }
        let pieces = maps::pieces(vmas, start, end).map_err(PagesError::Unmapped)?;
        let Some(&(_, _, first)) = pieces.first() else {
            return Ok(None);
        };
        let ours = self
            .backing
            .as_ref()
            .filter(|b| b.pid == pid)
            .is_some_and(|b| first.is_identity_mapping_of(b.id.0, b.id.1));
        if !first.shared || ours {
            return Ok(None);
        }
        let file_offset = first.offset + (start - first.start);
        for &(a, _, vma) in &pieces[1..] {
            let same_file = vma.shared && vma.dev == first.dev && vma.inode == first.inode;
            if !same_file || vma.offset + (a - vma.start) != file_offset + (a - start) {
                return Err(PagesError::SpansMappings(start));
            }
        }
        for &(a, _, vma) in &pieces {
            if !vma.read {
                return Err(PagesError::Unmapped(a));
            }
            if writes && !vma.write {
                return Err(PagesError::ReadOnly(a));
            }
        }
        let id = (first.dev, first.inode);
        let size;
        if let Some(f) = self.further.iter_mut().find(|f| f.id == id) {
            if writes && !f.writable {
                return Err(PagesError::FileAccess(start, "writing"));
            }
            size = file_size(&f.fd).map_err(os("fstat of a further memory file"))?;
            f.regions += 1;
        } else {
            let (fd, writable) = open_mapped_file(id, writes)?.ok_or(if writes {
                PagesError::FileAccess(start, "writing")
            } else {
                PagesError::SharedMapping(start)
            })?;
            let seals = freeflow_os::memfd::seals(fd.as_fd()).unwrap_or(0);
            if seals & freeflow_proto::verbs::REQUIRED_SEALS
                != freeflow_proto::verbs::REQUIRED_SEALS
            {
                return Err(PagesError::NotSealed(start));
            }
            size = file_size(&fd).map_err(os("fstat of a further memory file"))?;
            let number = self.new_number()?;
            self.further.push(FurtherFile {
                number,
                fd,
                writable,
                id,
                regions: 1,
            });
        }
        // The container pays for the range's pages: they are allocated now, by this process,
        // in its memory cgroup, and the router (which refuses holes) allocates none.
        // SAFETY: every piece of [start, end) was just found mapped readable, and writable if
        // `writes`; this library holds no reference into the program's memory.
        #[allow(unsafe_code)]
        let populated = unsafe { memory::populate(start, end - start, writes) };
        if let Err(e) = populated {
            let number = self
                .further
                .iter()
                .find(|f| f.id == id)
                .expect("found or added above")
                .number;
            self.release_further(number);
            return Err(os("populating a further memory file's pages")(e));
        }
        let f = self
            .further
            .iter()
            .find(|f| f.id == id)
            .expect("found or added above");
        let fd = match f.fd.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                let number = f.number;
                self.release_further(number);
                return Err(os("dup of a further memory file")(e));
            }
        };
        Ok(Some(FurtherRange {
            number: f.number,
            fd,
            size,
            file_offset,
        }))
    }

    /// [`Pages::acquire_further_in`] with the mappings read now, for a region without write
    /// access (tests).
    #[cfg(test)]
    pub fn acquire_further(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Option<FurtherRange>, PagesError> {
        let vmas = maps::read_self_for(start, end).map_err(PagesError::Maps)?;
        self.acquire_further_in(&vmas, start, end, false)
    }

    /// Counts one region in further file `number` less; the last one's release closes the
    /// library's descriptor of it.
    pub fn release_further(&mut self, number: u16) {
        if self.further_pid != std::process::id() {
            return; // the parent's, in a forked child
        }
        if let Some(i) = self.further.iter().position(|f| f.number == number) {
            self.further[i].regions -= 1;
            if self.further[i].regions == 0 {
                self.further.swap_remove(i);
            }
        }
    }

    /// A further file number not in use (never the own file's).
    fn new_number(&mut self) -> Result<u16, PagesError> {
        if self.further.len() >= freeflow_proto::verbs::MAX_FURTHER_MEMORY_FILES {
            return Err(PagesError::TooManyFiles);
        }
        loop {
            self.last_number = self.last_number.wrapping_add(1);
            let n = self.last_number;
            if n != freeflow_proto::verbs::OWN_MEMORY_FILE
                && !self.further.iter().any(|f| f.number == n)
            {
                return Ok(n);
            }
        }
    }
}

fn file_size(fd: &OwnedFd) -> io::Result<u64> {
    Ok(std::fs::File::from(fd.try_clone()?).metadata()?.len())
}

/// A new descriptor of the file `id` (device, inode) names, found among the process's open
/// descriptors (`/proc/self/fd`), with the access mode of the program's descriptor it was found
/// by (opening the link anew would give read-write access to a memfd the program holds only
/// read-only), and whether it allows writing; None if no readable descriptor is open (one
/// that allows writing, if `writes`).
fn open_mapped_file(
    id: ((u32, u32), u64),
    writes: bool,
) -> Result<Option<(OwnedFd, bool)>, PagesError> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::read_dir("/proc/self/fd").map_err(os("reading /proc/self/fd"))?;
    for entry in dir.flatten() {
        let path = entry.path();
        // The metadata of the file the descriptor names (the link is followed).
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
        if (dev, meta.ino()) != id || !meta.is_file() {
            continue;
        }
        let Some(mode) = access_mode(&entry.file_name()) else {
            continue;
        };
        let writable = match mode {
            libc::O_RDWR => true,
            libc::O_RDONLY if !writes => false,
            _ => continue, // write-only (cannot be mapped), or read-only for a writing region
        };
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
        else {
            continue;
        };
        let same = file.metadata().is_ok_and(|m| {
            (libc::major(m.dev()), libc::minor(m.dev()), m.ino()) == (id.0 .0, id.0 .1, id.1)
        });
        if same {
            return Ok(Some((OwnedFd::from(file), writable)));
        }
    }
    Ok(None)
}

/// The access mode (`O_RDONLY`, `O_WRONLY`, `O_RDWR`) of this process's descriptor `fd` (a
/// name in /proc/self/fd), from /proc/self/fdinfo (the program's descriptor is not used).
fn access_mode(fd: &std::ffi::OsStr) -> Option<i32> {
    let info = std::fs::read(std::path::Path::new("/proc/self/fdinfo").join(fd)).ok()?;
    let flags = info
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"flags:"))?;
    let flags = i32::from_str_radix(std::str::from_utf8(flags).ok()?.trim(), 8).ok()?;
    Some(flags & libc::O_ACCMODE)
}

fn check_movable(vma: &Vma, at: u64, ours: bool) -> Result<(), PagesError> {
    if !vma.read {
        return Err(PagesError::Unmapped(at));
    }
    if vma.shared && !ours {
        return Err(PagesError::SharedMapping(at));
    }
    Ok(())
}

/// Moves `[a, b)` off the file onto private memory (bytes kept). Runs inside the moves: no
/// allocation, no logging.
fn give_back(a: u64, b: u64, prot: i32) -> io::Result<()> {
    // SAFETY: [a, b) is this library's identity mapping of the file (checked by the callers
    // from /proc/self/maps), registered memory of the application that no Rust reference
    // points into; this runs on the side stack.
    #[allow(unsafe_code)]
    unsafe {
        memory::move_off_file(a, b - a, prot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_split_merge_and_free() {
        let mut c = RangeCounts::default();
        c.add(0x1000, 0x3000);
        assert_eq!(
            c.parts(0, 0x4000),
            [(0, 0x1000, 0), (0x1000, 0x3000, 1), (0x3000, 0x4000, 0)]
        );
        c.add(0x2000, 0x5000);
        assert_eq!(
            c.parts(0x1000, 0x5000),
            [
                (0x1000, 0x2000, 1),
                (0x2000, 0x3000, 2),
                (0x3000, 0x5000, 1)
            ]
        );
        assert_eq!(c.parts(0x2800, 0x2900), [(0x2800, 0x2900, 2)]);
        // Freeing the first: only its page that nobody else covers is freed.
        assert_eq!(c.remove(0x1000, 0x3000), [(0x1000, 0x2000)]);
        assert_eq!(
            c.parts(0x1000, 0x5000),
            [(0x1000, 0x2000, 0), (0x2000, 0x5000, 1)]
        );
        assert_eq!(c.segments.len(), 1, "equal neighbours merge: {c:?}");
        assert_eq!(c.remove(0x2000, 0x5000), [(0x2000, 0x5000)]);
        assert!(c.is_empty());
    }

    #[test]
    fn counts_stay_consistent_under_many_overlaps() {
        // Compare with a page-by-page model.
        let mut c = RangeCounts::default();
        let mut model = vec![0u32; 64];
        let mut seed = 12345u64;
        let mut live: Vec<(u64, u64)> = Vec::new();
        for _ in 0..2000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let a = (seed >> 33) % 64;
            let b = a + 1 + (seed >> 20) % (64 - a);
            if live.is_empty() || !(seed >> 11).is_multiple_of(3) {
                c.add(a * 4096, b * 4096);
                (a..b).for_each(|p| model[p as usize] += 1);
                live.push((a, b));
            } else {
                let (a, b) = live.swap_remove((seed >> 40) as usize % live.len());
                let freed = c.remove(a * 4096, b * 4096);
                let expected: Vec<u64> = (a..b).filter(|&p| model[p as usize] == 1).collect();
                let got: Vec<u64> = freed
                    .iter()
                    .flat_map(|&(s, e)| (s / 4096)..(e / 4096))
                    .collect();
                assert_eq!(got, expected);
                (a..b).for_each(|p| model[p as usize] -= 1);
            }
            for (s, e, n) in c.parts(0, 64 * 4096) {
                for p in s / 4096..e / 4096 {
                    assert_eq!(n, model[p as usize]);
                }
            }
        }
    }

    fn mapping_of(addr: u64) -> Vma {
        maps::read_self()
            .unwrap()
            .into_iter()
            .find(|v| v.start <= addr && addr < v.end)
            .unwrap()
    }

    /// Five private pages of our own (not the heap: other test threads allocate there, and
    /// their writes could race with the move, see `memory`).
    fn private_pages() -> &'static mut [u8] {
        // SAFETY: a fresh private mapping, leaked for the test's lifetime; nothing else uses it.
        #[allow(unsafe_code)]
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                5 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            std::slice::from_raw_parts_mut(p.cast::<u8>(), 5 * 4096)
        }
    }

    /// The real thing in this test process: an unaligned buffer, its neighbours on the same
    /// pages, a second region on the same page, and the way back.
    #[test]
    fn pages_move_onto_the_file_and_back_keeping_every_byte() {
        use std::os::unix::fs::FileExt;
        let mut pages = Pages::default();
        let mem = private_pages();
        for (i, b) in mem.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let before = mem.to_vec();
        let base = mem.as_ptr() as u64;
        // A buffer from 100 bytes before the end of the first page to the middle of the third.
        let (buf, len) = (base + 4096 - 100, 8292u64);
        let (first, end) = (base, (buf + len).next_multiple_of(4096));
        assert_eq!(end, base + 3 * 4096);
        pages.acquire(first, end).unwrap();
        let (fd, _) = pages.file().unwrap();
        let id = memory::file_id(fd.as_fd()).unwrap();
        assert!(mapping_of(buf).is_identity_mapping_of(id.0, id.1));
        assert!(mapping_of(buf + len - 1).is_identity_mapping_of(id.0, id.1));
        assert!(!mapping_of(end).is_identity_mapping_of(id.0, id.1));
        // Every byte, buffer and neighbours, is where it was; the file holds the same bytes.
        assert_eq!(mem, &before[..]);
        let file = std::fs::File::from(fd.try_clone().unwrap());
        let mut in_file = vec![0u8; (end - first) as usize];
        file.read_exact_at(&mut in_file, first).unwrap();
        assert_eq!(in_file, mem[..in_file.len()]);
        // Writes after registration are in the file (what the router maps).
        mem[5000] = 0xee;
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, first + 5000).unwrap();
        assert_eq!(byte, [0xee]);
        // A second region on the first page shares it; the first one's release keeps it.
        pages.acquire(first, first + 4096).unwrap();
        pages.release(first, end);
        assert!(mapping_of(first).is_identity_mapping_of(id.0, id.1));
        assert!(!mapping_of(first + 4096).is_identity_mapping_of(id.0, id.1));
        mem[1] = 0xdd;
        file.read_exact_at(&mut byte, first + 1).unwrap();
        assert_eq!(byte, [0xdd]);
        pages.release(first, first + 4096);
        assert!(!mapping_of(first).is_identity_mapping_of(id.0, id.1));
        assert!(pages.is_empty());
        let mut expected = before.clone();
        expected[5000] = 0xee;
        expected[1] = 0xdd;
        assert_eq!(mem, &expected[..]);
        // The file gave its pages back.
        file.read_exact_at(&mut byte, first + 1).unwrap();
        assert_eq!(byte, [0]);
        // Registered pages that the program unmapped and mapped anew are refused, not reused.
        pages.acquire(first, first + 4096).unwrap();
        // SAFETY: replaces our own test page with a fresh private one.
        #[allow(unsafe_code)]
        unsafe {
            let p = libc::mmap(
                first as *mut libc::c_void,
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            );
            assert_eq!(p as u64, first);
        }
        assert!(matches!(
            pages.acquire(first, first + 4096),
            Err(PagesError::Stale(_))
        ));
        pages.release(first, first + 4096);
        assert!(pages.is_empty());
    }

    /// A buffer on this thread's own stack, with this library's frames on the same pages while
    /// it moves them (the reason for the side stack).
    #[test]
    fn a_buffer_on_the_callers_own_stack_survives() {
        let mut pages = Pages::default();
        let mut buf = [0u8; 3000];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let addr = std::hint::black_box(&buf).as_ptr() as u64;
        // From 32 KiB below the buffer: where the frames of acquire and release will be.
        let (first, end) = (
            (addr - 32 * 1024) & !4095,
            (addr + 3000).next_multiple_of(4096),
        );
        for _ in 0..3 {
            pages.acquire(first, end).unwrap();
            let (fd, _) = pages.file().unwrap();
            let id = memory::file_id(fd.as_fd()).unwrap();
            assert!(mapping_of(addr).is_identity_mapping_of(id.0, id.1));
            buf[7] = buf[7].wrapping_add(1);
            pages.release(first, end);
            assert!(!mapping_of(addr).is_identity_mapping_of(id.0, id.1));
        }
        let expected: Vec<u8> = (0..3000)
            .map(|i| if i == 7 { 10 } else { (i % 251) as u8 })
            .collect();
        assert_eq!(std::hint::black_box(&buf)[..], expected[..]);
    }

    /// A shared mapping of `fd` of `pages` pages from file page `first_page`.
    fn map_shared(fd: &OwnedFd, first_page: u64, pages: usize) -> u64 {
        map_shared_prot(fd, first_page, pages, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// [`map_shared`] with protection `prot`.
    fn map_shared_prot(fd: &OwnedFd, first_page: u64, pages: usize, prot: i32) -> u64 {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of a test file, leaked for the test's lifetime.
        #[allow(unsafe_code)]
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * 4096,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                (first_page * 4096) as i64,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as u64
    }

    /// A range of a program's own shared mapping of a sealed memfd (what a router maps of its
    /// containers' memory files) registers where it is: the same file (a new descriptor of
    /// it), the range's file offset, one number per file while regions use it.
    #[test]
    fn shared_mappings_of_sealed_memory_files_register_in_place() {
        use std::os::unix::fs::FileExt;
        let mut pages = Pages::default();
        let size = 16 * 4096u64;
        let fd =
            freeflow_os::memfd::sized(c"ff-further", size, freeflow_os::memfd::FIXED_SIZE_SEALS)
                .unwrap();
        let at = map_shared(&fd, 2, 6);
        // Private memory is not this path's.
        let private = private_pages().as_ptr() as u64;
        assert!(pages
            .acquire_further(private, private + 4096)
            .unwrap()
            .is_none());
        let one = pages
            .acquire_further(at + 4096, at + 3 * 4096)
            .unwrap()
            .unwrap();
        assert_eq!((one.size, one.file_offset), (size, 3 * 4096));
        assert_ne!(one.number, freeflow_proto::verbs::OWN_MEMORY_FILE);
        // Our descriptor is the program's file: bytes written through the mapping are in it.
        // SAFETY: our own mapping of 6 pages.
        #[allow(unsafe_code)]
        unsafe {
            *((at + 4096 + 5) as *mut u8) = 0xab;
        }
        let mut byte = [0u8; 1];
        std::fs::File::from(one.fd.try_clone().unwrap())
            .read_exact_at(&mut byte, 3 * 4096 + 5)
            .unwrap();
        assert_eq!(byte, [0xab]);
        // A second region in the same file has its number; the file stays while one is left.
        let two = pages.acquire_further(at, at + 6 * 4096).unwrap().unwrap();
        assert_eq!((two.number, two.file_offset), (one.number, 2 * 4096));
        pages.release_further(one.number);
        assert!(!pages.is_empty());
        pages.release_further(two.number);
        assert!(pages.is_empty());
        // A range beyond the mapping is unmapped memory (or another mapping): refused.
        assert!(pages.acquire_further(at, at + 7 * 4096).is_err());
        assert!(pages.is_empty());
    }

    /// The first hole at or after `offset` in `fd`'s file.
    fn first_hole(fd: &OwnedFd, offset: u64) -> u64 {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on a test file's descriptor.
        #[allow(unsafe_code)]
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), offset as i64, libc::SEEK_HOLE) };
        assert!(hole >= 0);
        hole as u64
    }

    /// The pages of a registered range are allocated by the library (the container pays), not
    /// left as holes for the router's writes to allocate; the bytes are kept.
    #[test]
    fn further_ranges_are_populated_before_registration() {
        use std::os::unix::fs::FileExt;
        let mut pages = Pages::default();
        let fd = freeflow_os::memfd::sized(
            c"ff-sparse",
            16 * 4096,
            freeflow_os::memfd::FIXED_SIZE_SEALS,
        )
        .unwrap();
        let file = std::fs::File::from(fd.try_clone().unwrap());
        file.write_all_at(b"kept", 3 * 4096 + 1).unwrap();
        let at = map_shared(&fd, 0, 16);
        assert_eq!(first_hole(&fd, 2 * 4096), 2 * 4096);
        // Writing access (MADV_POPULATE_WRITE) over pages 2..6.
        let vmas = maps::read_self_for(at, at + 16 * 4096).unwrap();
        let range = pages
            .acquire_further_in(&vmas, at + 2 * 4096, at + 6 * 4096, true)
            .unwrap()
            .unwrap();
        assert_eq!(first_hole(&fd, 2 * 4096), 6 * 4096);
        // Reading access (MADV_POPULATE_READ: a read fault allocates on tmpfs too).
        let read = pages
            .acquire_further(at + 8 * 4096, at + 10 * 4096)
            .unwrap()
            .unwrap();
        assert_eq!(first_hole(&fd, 8 * 4096), 10 * 4096);
        let mut kept = [0u8; 4];
        file.read_exact_at(&mut kept, 3 * 4096 + 1).unwrap();
        assert_eq!(&kept, b"kept");
        pages.release_further(range.number);
        pages.release_further(read.number);
        assert!(pages.is_empty());
    }

    /// A region whose access includes writing needs writable pages (EFAULT otherwise, as the
    /// kernel's drivers answer), and a further file the program holds only read-only is
    /// handed on read-only: the library never widens the program's access.
    #[test]
    fn write_access_needs_writable_pages_and_descriptors() {
        use std::os::fd::AsRawFd;
        let mut pages = Pages::default();
        // Private pages mapped read-only.
        let private = private_pages().as_ptr() as u64;
        // SAFETY: our own test mapping, made read-only.
        #[allow(unsafe_code)]
        let protected =
            unsafe { libc::mprotect(private as *mut libc::c_void, 4096, libc::PROT_READ) };
        assert_eq!(protected, 0);
        let vmas_ro = maps::read_self_for(private, private + 4096).unwrap();
        let e = pages
            .acquire_in(&vmas_ro, private, private + 4096, true)
            .unwrap_err();
        assert!(matches!(e, PagesError::ReadOnly(_)), "{e}");
        assert_eq!(e.errno(), libc::EFAULT);
        // A sealed memfd the program holds only read-only, mapped read-only.
        let fd =
            freeflow_os::memfd::sized(c"ff-ro", 4 * 4096, freeflow_os::memfd::FIXED_SIZE_SEALS)
                .unwrap();
        let read_only = OwnedFd::from(
            std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap(),
        );
        // A read-write mapping made while a read-write descriptor was open.
        let rw_at = map_shared(&fd, 0, 2);
        let ro_at = map_shared_prot(&read_only, 0, 2, libc::PROT_READ);
        drop(fd);
        let vmas = maps::read_self_for(ro_at, ro_at + 2 * 4096).unwrap();
        let e = pages
            .acquire_further_in(&vmas, ro_at, ro_at + 4096, true)
            .unwrap_err();
        assert!(matches!(e, PagesError::ReadOnly(_)), "{e}");
        let vmas = maps::read_self_for(rw_at, rw_at + 2 * 4096).unwrap();
        let e = pages
            .acquire_further_in(&vmas, rw_at, rw_at + 4096, true)
            .unwrap_err();
        assert!(matches!(e, PagesError::FileAccess(..)), "{e}");
        assert_eq!(e.errno(), libc::EOPNOTSUPP);
        assert!(pages.is_empty());
        // Without write access it registers, and the descriptor handed on is read-only.
        let range = pages
            .acquire_further(ro_at, ro_at + 2 * 4096)
            .unwrap()
            .unwrap();
        let written = std::os::unix::fs::FileExt::write_at(
            &std::fs::File::from(range.fd.try_clone().unwrap()),
            b"x",
            0,
        );
        assert_eq!(written.unwrap_err().raw_os_error(), Some(libc::EBADF));
        pages.release_further(range.number);
        assert!(pages.is_empty());
    }

    #[test]
    fn shared_mappings_that_cannot_register_in_place_are_refused() {
        let mut pages = Pages::default();
        // A memfd that may shrink (the router could lose pages it maps).
        let unsealed = freeflow_os::memfd::sized(c"ff-unsealed", 4 * 4096, 0).unwrap();
        let at = map_shared(&unsealed, 0, 4);
        let e = pages.acquire_further(at, at + 4096).unwrap_err();
        assert!(matches!(e, PagesError::NotSealed(_)), "{e}");
        assert_eq!(e.errno(), libc::EOPNOTSUPP);
        // A sealed file no descriptor of the program's names any more: nothing to hand over.
        let closed =
            freeflow_os::memfd::sized(c"ff-closed", 4 * 4096, freeflow_os::memfd::FIXED_SIZE_SEALS)
                .unwrap();
        let closed_at = map_shared(&closed, 0, 4);
        drop(closed);
        let e = pages
            .acquire_further(closed_at, closed_at + 4096)
            .unwrap_err();
        assert!(matches!(e, PagesError::SharedMapping(_)), "{e}");
        // Two mappings of one file that are not one contiguous range of it.
        let sealed =
            freeflow_os::memfd::sized(c"ff-two", 8 * 4096, freeflow_os::memfd::FIXED_SIZE_SEALS)
                .unwrap();
        let base = map_shared(&sealed, 0, 2);
        // SAFETY: replaces our own mapping's second page with file page 5.
        #[allow(unsafe_code)]
        unsafe {
            use std::os::fd::AsRawFd;
            let p = libc::mmap(
                (base + 4096) as *mut libc::c_void,
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                sealed.as_raw_fd(),
                5 * 4096,
            );
            assert_eq!(p as u64, base + 4096);
        }
        let e = pages.acquire_further(base, base + 2 * 4096).unwrap_err();
        assert!(matches!(e, PagesError::SpansMappings(_)), "{e}");
        assert_eq!(e.errno(), libc::EOPNOTSUPP);
        assert!(pages.is_empty());
    }

    #[test]
    fn unmapped_and_shared_pages_are_refused() {
        let mut pages = Pages::default();
        assert!(matches!(
            pages.acquire(0x1000, 0x2000),
            Err(PagesError::Unmapped(0x1000))
        ));
        assert!(matches!(
            pages.acquire(0, 1 << 48),
            Err(PagesError::BeyondFile(_))
        ));
        // SAFETY: a fresh shared anonymous mapping and a PROT_NONE one, unmapped at the end.
        #[allow(unsafe_code)]
        let (shared, none) = unsafe {
            (
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ),
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ),
            )
        };
        let e = pages
            .acquire(shared as u64, shared as u64 + 4096)
            .unwrap_err();
        assert!(matches!(e, PagesError::SharedMapping(_)), "{e}");
        assert_eq!(e.errno(), libc::EOPNOTSUPP);
        let e = pages.acquire(none as u64, none as u64 + 4096).unwrap_err();
        assert_eq!(e.errno(), libc::EFAULT);
        assert!(pages.is_empty());
        // SAFETY: our own mappings.
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(shared, 4096);
            libc::munmap(none, 4096);
        }
    }
}
