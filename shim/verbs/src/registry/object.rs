//! The allocation behind a pointer this library hands out for a CQ, QP, SRQ or completion
//! channel. The C structure the program sees comes first, so the program's pointer is the
//! object's (as every provider does); then a magic number, checked before anything else is
//! read; then the library's state for it, allocated apart: the program writes fields of the C
//! structure, so the state is never reached through a reference to the whole.
#![allow(unsafe_code)]

use super::QueueEntry;
use crate::error::VerbsError;

/// A C structure this library hands out with state of its own behind it.
pub(crate) trait HandedOut: Sized {
    /// What the library keeps for it.
    type State;
    /// Marks this library's objects of the kind (a pointer made elsewhere is refused).
    const MAGIC: u64;
    /// The kind, as `FREEFLOW_DEBUG` lines name it.
    const NAME: &'static str;
}

#[repr(C)]
struct Object<C: HandedOut> {
    ibv: C,
    magic: u64,
    state: *const C::State,
}

/// A new object: `ibv` for the program, `state` for the library. The pointer is the C
/// structure's; the object lives until [`remove`].
pub fn leak<C: HandedOut>(ibv: C, state: C::State) -> *mut C {
    let state = Box::into_raw(Box::new(state));
    let object = Object {
        ibv,
        magic: C::MAGIC,
        state,
    };
    Box::into_raw(Box::new(object)).cast()
}

/// The state behind `ptr`, if it is one of this library's objects of its kind.
///
/// # Safety
/// `ptr` is NULL or points at an object [`leak`] made and [`remove`] has not freed (what the
/// inline wrappers of `verbs.h` pass, and what every provider assumes); the caller does not
/// use the state after the object is freed.
pub unsafe fn state<'a, C: HandedOut>(ptr: *mut C) -> Option<&'a C::State> {
    if ptr.is_null() {
        return None;
    }
    let obj = ptr.cast::<Object<C>>();
    // SAFETY: per the contract, `obj` is a live Object; fields are read through raw pointers,
    // without a reference to the part the program shares.
    unsafe {
        if std::ptr::addr_of!((*obj).magic).read() != C::MAGIC {
            return None;
        }
        std::ptr::addr_of!((*obj).state).read().as_ref()
    }
}

/// Forgets the object at `ptr` in the registry and frees it with its state, unless the
/// registry no longer held it (another thread destroyed it first: removal happens once).
///
/// # Safety
/// `ptr` was made by [`leak`] and registered (the caller looked it up as an object of its
/// kind); nothing uses it or its state afterwards.
pub unsafe fn remove<C: HandedOut>(ptr: *mut C) {
    if !super::remove_object(ptr as usize) {
        return;
    }
    // SAFETY: per the contract, the object and its state are the Boxes `leak` leaked; the
    // registry held them until now, so they are freed once.
    unsafe {
        let obj = Box::from_raw(ptr.cast::<Object<C>>());
        drop(Box::from_raw(obj.state.cast_mut()));
    }
}

/// Destroys an object that needs nothing undone on this side first: the router's side (with
/// `opcode`), then (once its asynchronous events are acknowledged) this library's ([`remove`]).
///
/// # Safety
/// As [`remove`]; `entry` is what the registry holds for `ptr`.
pub unsafe fn destroy<C: HandedOut>(
    ptr: *mut C,
    entry: QueueEntry,
    opcode: u16,
) -> Result<(), VerbsError> {
    entry.destroy_on_router(opcode)?;
    // As rdma-core's destroy verbs: the program acknowledges every asynchronous event it got
    // about the object before the object goes.
    if let Ok(ctx) = super::context(entry.context) {
        ctx.async_events.wait_acked(ptr as usize);
    }
    // SAFETY: forwarded caller guarantee.
    unsafe { remove(ptr) };
    super::debug(format_args!("destroyed {} {}", C::NAME, entry.handle));
    Ok(())
}
