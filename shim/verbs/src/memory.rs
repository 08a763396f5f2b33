//! The system calls behind memory registration: the memory file, moving an application's pages
//! onto it without losing a byte, and moving them back. The only module of this library that
//! replaces memory under the application.
//!
//! Moving pages (`move_onto_file`): copy the bytes into the file at the offset equal to their
//! address, then map the file over the range with `MAP_FIXED | MAP_SHARED` and the range's own
//! protection. The kernel swaps the range's page tables in one call, so every thread sees
//! either the old private pages or the file's pages holding the same bytes. What this cannot
//! guarantee: a write by another thread to these pages (the buffer or, on its first and last
//! page, its neighbours) between the copy and the swap lands in the old pages and is lost.
//! Real RDMA registration pins pages instead and loses nothing; programs that register memory
//! while other threads write the same pages must not do that with this library. Moving back
//! (`move_off_file`, on deregistration) has the same window in the other direction.
//!
//! The calling thread itself writes its stack while it works, and a registered buffer may be on
//! that stack (`char buf[64]` in `main`), with this library's own frames on the same page below
//! it: those writes would fall into the window and be lost (return addresses included). So the
//! moves run on a [`SideStack`] of their own, mapped apart from anything the program owns; the
//! calling thread's stack is not written from before the copy until after the swap. The moves
//! allocate nothing either (the heap may be the registered range).
#![allow(unsafe_code)]

use freeflow_os::memfd;
use freeflow_proto::verbs::{MEMORY_FILE_SIZE, PAGE_SIZE};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, Ordering};

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A new memory file: a memfd of [`MEMORY_FILE_SIZE`] bytes (sparse), sealed so it can neither
/// shrink nor grow, nor change seals again (what the router requires before it maps it).
pub fn create_memory_file() -> io::Result<OwnedFd> {
    memfd::sized(c"freeflow-mr", MEMORY_FILE_SIZE, memfd::FIXED_SIZE_SEALS)
}

/// Device (major, minor) and inode of a file, as `/proc/self/maps` shows them.
pub fn file_id(fd: BorrowedFd<'_>) -> io::Result<((u32, u32), u64)> {
    // SAFETY: stat is plain data; fstat overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one struct stat into `st`.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(((libc::major(st.st_dev), libc::minor(st.st_dev)), st.st_ino))
}

fn page_range(addr: u64, len: u64) -> io::Result<(usize, usize)> {
    let aligned = addr.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE);
    match addr.checked_add(len) {
        Some(end) if aligned && len > 0 && end <= MEMORY_FILE_SIZE => {
            Ok((addr as usize, len as usize))
        }
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// Moves the pages `[addr, addr + len)` onto the memory file at offset `addr`, keeping their
/// bytes and protection `prot`, and keeps them out of forked children (MADV_DONTFORK, as
/// registered memory is with real RDMA). On failure the range is as it was.
///
/// # Safety
/// The range is page-aligned, mapped private and readable (the caller checked
/// `/proc/self/maps`), belongs to the application, and no Rust reference of this library points
/// into it. See the module comment for what concurrent writers lose.
pub unsafe fn move_onto_file(fd: BorrowedFd<'_>, addr: u64, len: u64, prot: i32) -> io::Result<()> {
    let (start, size) = page_range(addr, len)?;
    let mut done = 0usize;
    while done < size {
        // SAFETY: the caller guarantees the range is mapped readable; pwrite reads from it and
        // writes the file at the same offsets.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                (start + done) as *const libc::c_void,
                size - done,
                (start + done) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            punch_hole(fd, addr, len);
            return Err(e);
        }
        done += n as usize;
    }
    // SAFETY: MAP_FIXED replaces exactly the caller's range (theirs to give, per the contract)
    // with the file's pages, which now hold the same bytes.
    let mapped = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            size,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            start as libc::off_t,
        )
    };
    if mapped == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        punch_hole(fd, addr, len);
        return Err(e);
    }
    // SAFETY: madvise only changes what fork does with these pages.
    if unsafe { libc::madvise(start as *mut libc::c_void, size, libc::MADV_DONTFORK) } != 0 {
        // Without it a forked child would share these pages with us instead of getting a copy;
        // give the pages back rather than register them that way.
        let e = io::Error::last_os_error();
        // SAFETY: the range is ours again as the caller described it, now on the file.
        let _ = unsafe { move_off_file(addr, len, prot) };
        punch_hole(fd, addr, len);
        return Err(e);
    }
    Ok(())
}

/// Moves the pages `[addr, addr + len)` off the memory file onto private anonymous memory with
/// the same bytes and protection `prot` (then [`punch_hole`] frees the file's pages).
///
/// # Safety
/// The range is page-aligned, mapped readable from the memory file, belongs to the application,
/// and no Rust reference of this library points into it.
pub unsafe fn move_off_file(addr: u64, len: u64, prot: i32) -> io::Result<()> {
    let (start, size) = page_range(addr, len)?;
    // SAFETY: a new private mapping at an address the kernel picks overlaps nothing.
    let temp = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if temp == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the source is readable (caller), the destination our new mapping of `size` bytes;
    // they do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(start as *const u8, temp.cast::<u8>(), size) };
    let needs_protect = prot != libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: mprotect of our own new mapping.
    if needs_protect && unsafe { libc::mprotect(temp, size, prot) } != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: our own mapping, no references into it.
        unsafe { libc::munmap(temp, size) };
        return Err(e);
    }
    // SAFETY: mremap with MREMAP_FIXED moves our copy over the caller's range in one call,
    // unmapping what was there (the file's pages, theirs to give per the contract).
    let moved = unsafe {
        libc::mremap(
            temp,
            size,
            size,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            start as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        // SAFETY: as above.
        unsafe { libc::munmap(temp, size) };
        return Err(e);
    }
    Ok(())
}

/// Frees the memory file's pages `[offset, offset + len)` (their bytes become zeros). Failing
/// costs memory, not correctness, so it is not reported.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) {
    // SAFETY: fallocate on an fd we hold; it touches the file only.
    unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
}

/// Makes every page of `[addr, addr + len)` (page-aligned, in a shared mapping of a tmpfs
/// file) present in the file, so that the router's accesses to it allocate nothing (the
/// container pays for its memory, not the router): MADV_POPULATE_WRITE, or
/// MADV_POPULATE_READ unless `write` (on tmpfs a read fault allocates the page too). Where the
/// kernel has neither (before 5.14) every page is read once, which faults it in alike.
///
/// # Safety
/// `[addr, addr + len)` must be mapped readable (and writable if `write`) for the whole call.
/// Nothing is written: population keeps the bytes.
pub unsafe fn populate(addr: u64, len: u64, write: bool) -> io::Result<()> {
    let advice = if write {
        libc::MADV_POPULATE_WRITE
    } else {
        libc::MADV_POPULATE_READ
    };
    // SAFETY: madvise with a populate advice only faults pages in (the caller says the range
    // is mapped with the access the advice needs); no memory of ours changes.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    let mut at = addr;
    while at < addr + len {
        // SAFETY: `at` is inside the range the caller says is mapped readable; a volatile read
        // of one byte, through a raw pointer (the memory is shared: no reference is made).
        unsafe { std::ptr::read_volatile(at as *const u8) };
        at += PAGE_SIZE;
    }
    Ok(())
}

/// Bytes of a side stack (a guard page below it, the two saved contexts above it).
const SIDE_STACK_LEN: usize = 256 * 1024;
const CONTEXT_AREA_LEN: usize = 2 * 4096;

/// The saved contexts of a switch, kept in the side stack's mapping (not on the caller's
/// stack, not on the heap).
#[repr(C)]
struct Switch {
    caller: libc::ucontext_t,
    side: libc::ucontext_t,
    job: Option<*mut (dyn FnMut() + 'static)>,
}

const _: () = assert!(std::mem::size_of::<Switch>() <= CONTEXT_AREA_LEN);

/// The job the side stack's entry point runs. Set only while a [`SideStack`] is borrowed
/// mutably (one switch at a time per stack; the process has one, used under the pages lock).
static CURRENT: AtomicPtr<Switch> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn side_entry() {
    let switch = CURRENT.load(Ordering::Acquire);
    // SAFETY: `run` stored a live Switch whose job outlives the switch (it waits in
    // swapcontext until this function returns); nothing else touches it meanwhile.
    if let Some(job) = unsafe { (*switch).job } {
        // A panic must not unwind across the context switch: it stops here, and the job's
        // caller sees whatever result the job had recorded (none: its default error).
        // SAFETY: as above; the job is called once.
        let _ = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)() }));
    }
    // Returning resumes `uc_link`, the caller's saved context.
}

/// A stack for the moves, mapped once: `[guard page][stack][saved contexts]`.
#[derive(Debug)]
pub struct SideStack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is only used through `&mut self`.
unsafe impl Send for SideStack {}

impl SideStack {
    pub fn new() -> io::Result<SideStack> {
        let len = 4096 + SIDE_STACK_LEN + CONTEXT_AREA_LEN;
        // SAFETY: a new private mapping at an address the kernel picks overlaps nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the first page of our own mapping becomes the guard page.
        if unsafe { libc::mprotect(base, 4096, libc::PROT_NONE) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: our own mapping, never used.
            unsafe { libc::munmap(base, len) };
            return Err(e);
        }
        Ok(SideStack { base, len })
    }

    /// The addresses this stack occupies (registrations must not include them).
    pub fn range(&self) -> (u64, u64) {
        (self.base as u64, self.base as u64 + self.len as u64)
    }

    /// Runs `job` on this stack and returns when it is done. The calling thread's own stack is
    /// not written while `job` runs. `job` must not unwind (a panic is caught and ends it).
    pub fn run(&mut self, job: &mut dyn FnMut()) -> io::Result<()> {
        // SAFETY: the context area lies inside our mapping, is suitably aligned (page), and is
        // used by one switch at a time (&mut self).
        let switch = unsafe {
            &mut *(self
                .base
                .cast::<u8>()
                .add(4096 + SIDE_STACK_LEN)
                .cast::<Switch>())
        };
        // SAFETY: erasing the lifetime is sound because the pointer is used only until this
        // function returns (the side context finishes before swapcontext returns here).
        let job: *mut (dyn FnMut() + 'static) = unsafe { std::mem::transmute(job) };
        switch.job = Some(job);
        // SAFETY: getcontext fills the structure it is given.
        if unsafe { libc::getcontext(&mut switch.side) } != 0 {
            return Err(io::Error::last_os_error());
        }
        switch.side.uc_stack.ss_sp = self.base.cast::<u8>().wrapping_add(4096).cast();
        switch.side.uc_stack.ss_size = SIDE_STACK_LEN;
        switch.side.uc_stack.ss_flags = 0;
        switch.side.uc_link = &mut switch.caller;
        // SAFETY: the context has a valid stack and a link to resume; side_entry takes no
        // arguments.
        unsafe { libc::makecontext(&mut switch.side, side_entry, 0) };
        CURRENT.store(switch, Ordering::Release);
        // SAFETY: saves this thread's context into the side mapping and switches to the side
        // context, which returns here through uc_link when side_entry is done.
        let r = unsafe { libc::swapcontext(&mut switch.caller, &switch.side) };
        CURRENT.store(std::ptr::null_mut(), Ordering::Release);
        switch.job = None;
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for SideStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, not in use (run borrows self).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_stack_runs_jobs_away_from_the_callers_stack() {
        let mut side = SideStack::new().unwrap();
        let (lo, hi) = side.range();
        let mut seen = 0u64;
        let mut calls = 0;
        side.run(&mut || {
            let local = 0u8;
            seen = &local as *const u8 as u64;
            calls += 1;
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert!(lo < seen && seen < hi, "{seen:#x} not in {lo:#x}..{hi:#x}");
        // Deep enough for the moves, twice in a row, and a panic stays on the side.
        side.run(&mut || {
            let big = [1u8; 64 * 1024];
            calls += std::hint::black_box(&big)[100] as i32;
        })
        .unwrap();
        assert_eq!(calls, 2);
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        side.run(&mut || panic!("inside")).unwrap();
        std::panic::set_hook(prev);
    }
}
