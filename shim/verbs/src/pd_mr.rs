//! Protection domains and memory regions: `ibv_alloc_pd`, `ibv_dealloc_pd`, `ibv_reg_mr`,
//! `ibv_reg_mr_iova`, `ibv_reg_mr_iova2`, `ibv_dereg_mr`, with rdma-core's symbol versions and
//! error conventions (NULL with errno for the constructors, an errno value from the
//! destructors). The router's table is the authority (handles, keys, limits, EBUSY); this side
//! checks what it needs before moving memory (access flags, lengths, page offsets) and moves the
//! registered pages onto the process's memory file (`pages`).
//!
//! Also two test hooks, not part of the verbs API and served only by a router started with
//! `FREEFLOW_TEST_HOOKS=1`: `freeflow_test_mr_read` and `freeflow_test_mr_write` make the router
//! read (a digest) or write bytes of a region through its own mapping, the path the engine's
//! copies take, so tests can show that the router and the program see the same memory.
#![allow(unsafe_code)]

use crate::abi::{IbvContext, IbvMr, IbvPd};
use crate::error::{returns_errno, returns_object, VerbsError};
use crate::pages::PagesError;
use crate::registry::{self, lock, MrEntry, MrMemory, PdEntry};
use freeflow_proto::verbs::{
    check_mr_access, limits, op, AccessFlags, Body, DeallocPd, DeregMr, MrCreated, PdCreated,
    RegMr, TestDigest, TestRead, TestWrite, MAX_TEST_WRITE, OWN_MEMORY_FILE, PAGE_SIZE,
};
use std::ffi::{c_int, c_uint, c_void};
use std::os::fd::AsFd;

symbol_versions! {
    "IBVERBS_1.1": [ibv_alloc_pd, ibv_dealloc_pd, ibv_reg_mr, ibv_dereg_mr],
    "IBVERBS_1.7": [ibv_reg_mr_iova],
    "IBVERBS_1.8": [ibv_reg_mr_iova2],
}

fn alloc_pd(context: *mut IbvContext) -> Result<*mut IbvPd, VerbsError> {
    let key = context as usize;
    let state = registry::context(key)?;
    let reply = lock(&state.channel).call(op::ALLOC_PD, &[])?;
    let handle = reply.decode::<PdCreated>()?.pd;
    let pd = Box::into_raw(Box::new(IbvPd { context, handle }));
    registry::add_pd(
        pd as usize,
        PdEntry {
            context: key,
            handle,
        },
    );
    registry::debug(format_args!("allocated PD {handle}"));
    Ok(pd)
}

/// `ibv_alloc_pd`: a protection domain, or NULL with errno.
#[no_mangle]
pub extern "C" fn ibv_alloc_pd(context: *mut IbvContext) -> *mut IbvPd {
    returns_object("ibv_alloc_pd", || alloc_pd(context))
}

fn dealloc_pd(pd: *mut IbvPd) -> Result<(), VerbsError> {
    let entry = registry::pd(pd as usize)?;
    let state = registry::context(entry.context)?;
    let body = DeallocPd { pd: entry.handle }.to_vec();
    lock(&state.channel).destroy(op::DEALLOC_PD, &body[..DeallocPd::LEN])?;
    if registry::remove_object(pd as usize) {
        // SAFETY: the registry held `pd`, so it is the Box leaked by `alloc_pd`, freed once
        // (removal from the registry happens once).
        drop(unsafe { Box::from_raw(pd) });
    }
    Ok(())
}

/// `ibv_dealloc_pd`: 0, or an errno value (EBUSY while memory regions use it, EINVAL for a
/// pointer that is not a live PD of this library).
#[no_mangle]
pub extern "C" fn ibv_dealloc_pd(pd: *mut IbvPd) -> c_int {
    returns_errno("ibv_dealloc_pd", || dealloc_pd(pd))
}

/// The checks made here before any memory moves; the router makes them again.
fn check_registration(addr: u64, length: u64, iova: u64) -> Result<(u64, u64), VerbsError> {
    if length == 0 {
        return Err(VerbsError::InvalidArgument("zero-length memory region"));
    }
    if length > limits::MAX_MR_SIZE {
        return Err(VerbsError::InvalidArgument(
            "region longer than max_mr_size",
        ));
    }
    if addr % PAGE_SIZE != iova % PAGE_SIZE {
        return Err(VerbsError::InvalidArgument(
            "iova and addr differ in their offset in the page",
        ));
    }
    let end = addr
        .checked_add(length)
        .ok_or(VerbsError::InvalidArgument("addr + length overflows"))?;
    iova.checked_add(length)
        .ok_or(VerbsError::InvalidArgument("iova + length overflows"))?;
    let first = addr - addr % PAGE_SIZE;
    let end = end
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or(VerbsError::InvalidArgument(
            "region ends beyond the address space",
        ))?;
    Ok((first, end))
}

fn reg_mr(
    pd: *mut IbvPd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: u32,
) -> Result<*mut IbvMr, VerbsError> {
    let entry = registry::pd(pd as usize)?;
    let state = registry::context(entry.context)?;
    check_mr_access(access)?;
    let (first, end) = check_registration(addr as u64, length as u64, iova)?;
    let mut pages_guard = registry::pages();
    let pages = pages_guard.as_mut().expect("made by registry::pages");
    let request = |file, file_offset| RegMr {
        pd: entry.handle,
        access,
        addr: addr as u64,
        length: length as u64,
        iova,
        file,
        file_offset,
    };
    // One reading of the process's mappings serves the whole registration.
    let vmas = crate::maps::read_self_for(first, end).map_err(PagesError::Maps)?;
    let writes = AccessFlags::from_bits_retain(access).intersects(
        AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_ATOMIC,
    );
    let (created, memory) =
        if let Some(further) = pages.acquire_further_in(&vmas, first, end, writes)? {
            // A shared mapping of a memory file of the program's: registered where it is.
            let number = further.number;
            let registered = (|| {
                let mut channel = lock(&state.channel);
                channel.ensure_further_file(number, further.fd.as_fd(), further.size)?;
                let body = request(number, further.file_offset).to_vec();
                let created = channel
                    .call(op::REG_MR, &body[..RegMr::LEN])
                    .and_then(|reply| reply.decode::<MrCreated>());
                channel.further_file_registered(number, created.is_ok());
                created
            })();
            match registered {
                Ok(created) => (created, MrMemory::FurtherFile(number)),
                Err(e) => {
                    pages.release_further(number);
                    return Err(e);
                }
            }
        } else {
            pages.acquire_in(&vmas, first, end, writes)?;
            let registered = (|| {
                let (fd, generation) = pages.file()?;
                let mut channel = lock(&state.channel);
                channel.ensure_memory_file(fd.as_fd(), generation)?;
                let body = request(OWN_MEMORY_FILE, 0).to_vec();
                let reply = channel.call(op::REG_MR, &body[..RegMr::LEN])?;
                reply.decode::<MrCreated>()
            })();
            match registered {
                Ok(created) => (created, MrMemory::Pages(first, end)),
                Err(e) => {
                    pages.release(first, end);
                    return Err(e);
                }
            }
        };
    let mr = Box::into_raw(Box::new(IbvMr {
        // The context key is the address of the program's `struct ibv_context`.
        context: entry.context as *mut IbvContext,
        pd,
        addr,
        length,
        handle: created.mr,
        lkey: created.lkey,
        rkey: created.rkey,
    }));
    registry::add_mr(
        mr as usize,
        MrEntry {
            context: entry.context,
            handle: created.mr,
            memory,
        },
    );
    registry::debug(format_args!(
        "registered MR {} ({length} bytes at {addr:p}, pages {first:#x}..{end:#x}, access {access:#x})",
        created.mr
    ));
    Ok(mr)
}

fn reg_mr_c(
    verb: &str,
    pd: *mut IbvPd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: u32,
) -> *mut IbvMr {
    returns_object(verb, || reg_mr(pd, addr, length, iova, access))
}

/// `ibv_reg_mr`: a region over `length` bytes at `addr`, or NULL with errno (EINVAL for bad
/// flags or arguments, EFAULT for memory that is not mapped, EOPNOTSUPP for shared mappings and
/// on-demand paging, ENOMEM at the device's limits).
#[no_mangle]
pub extern "C" fn ibv_reg_mr(
    pd: *mut IbvPd,
    addr: *mut c_void,
    length: usize,
    access: c_int,
) -> *mut IbvMr {
    reg_mr_c("ibv_reg_mr", pd, addr, length, addr as u64, access as u32)
}

/// `ibv_reg_mr_iova`: as `ibv_reg_mr`, with work requests addressing the region as `iova`.
#[no_mangle]
pub extern "C" fn ibv_reg_mr_iova(
    pd: *mut IbvPd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: c_int,
) -> *mut IbvMr {
    reg_mr_c("ibv_reg_mr_iova", pd, addr, length, iova, access as u32)
}

/// `ibv_reg_mr_iova2`: what the inline `ibv_reg_mr` of current headers calls for flags that are
/// not compile-time constants or that include optional ones.
#[no_mangle]
pub extern "C" fn ibv_reg_mr_iova2(
    pd: *mut IbvPd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: c_uint,
) -> *mut IbvMr {
    reg_mr_c("ibv_reg_mr_iova2", pd, addr, length, iova, access)
}

fn dereg_mr(mr: *mut IbvMr) -> Result<(), VerbsError> {
    let entry = registry::mr(mr as usize)?;
    let state = registry::context(entry.context)?;
    let mut pages_guard = registry::pages();
    let body = DeregMr { mr: entry.handle }.to_vec();
    {
        let mut channel = lock(&state.channel);
        channel.destroy(op::DEREG_MR, &body[..DeregMr::LEN])?;
        if let MrMemory::FurtherFile(number) = entry.memory {
            channel.further_file_deregistered(number);
        }
    }
    if registry::remove_object(mr as usize) {
        if let Some(pages) = pages_guard.as_mut() {
            release_memory(pages, entry.memory);
        }
        // SAFETY: the registry held `mr`, so it is the Box leaked by `reg_mr`, freed once.
        drop(unsafe { Box::from_raw(mr) });
    }
    registry::debug(format_args!("deregistered MR {}", entry.handle));
    Ok(())
}

/// `ibv_dereg_mr`: 0, or an errno value (EINVAL for a pointer that is not a live region of
/// this library). The region's pages move back onto private memory when no other region uses
/// them.
#[no_mangle]
pub extern "C" fn ibv_dereg_mr(mr: *mut IbvMr) -> c_int {
    returns_errno("ibv_dereg_mr", || dereg_mr(mr))
}

/// A context is closing: its PDs and MRs are forgotten (later calls with them fail with EINVAL
/// instead of touching freed memory; their C structures are left allocated for the same
/// reason) and its regions' pages released.
pub fn forget_objects_of(context: usize) {
    let regions = registry::remove_objects_of(context);
    if regions.is_empty() {
        return;
    }
    let mut pages_guard = registry::pages();
    if let Some(pages) = pages_guard.as_mut() {
        for r in regions {
            release_memory(pages, r.memory);
        }
    }
}

fn release_memory(pages: &mut crate::pages::Pages, memory: MrMemory) {
    match memory {
        MrMemory::Pages(first, end) => pages.release(first, end),
        MrMemory::FurtherFile(number) => pages.release_further(number),
    }
}

/// Test hook: the router reads `length` bytes at `addr` (iova space) through the region with
/// local key `lkey` in `pd`, and `*digest` receives their 64-bit FNV-1a. Returns 0, or an errno
/// value: EACCES if the key, range or PD did not resolve (a work request would complete with
/// IBV_WC_LOC_PROT_ERR), EOPNOTSUPP if the router's test hooks are off, EINVAL for a PD that is
/// not ours.
///
/// # Safety
/// `digest` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn freeflow_test_mr_read(
    pd: *mut IbvPd,
    lkey: u32,
    addr: u64,
    length: u64,
    digest: *mut u64,
) -> c_int {
    returns_errno("freeflow_test_mr_read", || {
        let entry = registry::pd(pd as usize)?;
        let state = registry::context(entry.context)?;
        let body = TestRead {
            pd: entry.handle,
            lkey,
            addr,
            length,
        }
        .to_vec();
        let reply = lock(&state.channel).call(op::TEST_READ, &body[..TestRead::LEN])?;
        let d = reply.decode::<TestDigest>()?;
        if !digest.is_null() {
            // SAFETY: the caller passes NULL or a writable u64.
            unsafe { digest.write_unaligned(d.digest) };
        }
        Ok(())
    })
}

/// Test hook: the router writes `length` (at most 32) bytes from `data` at `addr` (iova space)
/// through the region with local key `lkey` in `pd` (which needs IBV_ACCESS_LOCAL_WRITE).
/// Returns 0 or an errno value, as `freeflow_test_mr_read`.
///
/// # Safety
/// `data` is readable for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn freeflow_test_mr_write(
    pd: *mut IbvPd,
    lkey: u32,
    addr: u64,
    data: *const c_void,
    length: usize,
) -> c_int {
    returns_errno("freeflow_test_mr_write", || {
        if length > MAX_TEST_WRITE || (data.is_null() && length > 0) {
            return Err(VerbsError::InvalidArgument(
                "test write of more than 32 bytes",
            ));
        }
        let bytes = if length == 0 {
            Vec::new()
        } else {
            // SAFETY: the caller guarantees `length` readable bytes at `data`.
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), length) }.to_vec()
        };
        let entry = registry::pd(pd as usize)?;
        let state = registry::context(entry.context)?;
        let mut body = [0u8; 64];
        let n = TestWrite {
            pd: entry.handle,
            lkey,
            addr,
            data: bytes,
        }
        .encode(&mut body)
        .ok_or(VerbsError::InvalidArgument("test write too long"))?;
        lock(&state.channel).call(op::TEST_WRITE, &body[..n])?;
        Ok(())
    })
}

const _: () = assert!(RegMr::LEN <= 64 && TestRead::LEN <= 64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_checked_before_memory_moves() {
        assert!(check_registration(0x1000, 0, 0x1000).is_err());
        assert!(check_registration(0x1000, limits::MAX_MR_SIZE + 1, 0x1000).is_err());
        assert!(check_registration(0x1001, 10, 0x1000).is_err());
        assert!(check_registration(u64::MAX - 5, 10, u64::MAX - 5).is_err());
        assert!(check_registration(0x1001, 0x1000, u64::MAX - 4094).is_err());
        assert_eq!(
            check_registration(0x1001, 10, 0x5001).unwrap(),
            (0x1000, 0x2000)
        );
        assert_eq!(
            check_registration(0x1fff, 2, 0x1fff).unwrap(),
            (0x1000, 0x3000)
        );
        assert_eq!(
            check_registration(0x2000, 0x1000, 0x2000).unwrap(),
            (0x2000, 0x3000)
        );
    }
}
