//! Everything the Freeflow router and its shims share: the shared-memory ring, the region that
//! holds an attachment's rings, doorbells, the attach handshake on `router.sock`, the messages in
//! ring slots and the router's control protocol. Every fixed layout on the wire follows one
//! codec convention ([`codec`]): field offsets declared once, enums and flag words decoded with
//! `TryFrom`, a typed [`codec::DecodeError`].
//!
//! Unsafe code is confined (by `#![deny(unsafe_code)]` here and an `allow` on each module's
//! declaration) to `ring_memory` and `region` (shared memory), `sync` (a fence in assembly),
//! `doorbell` (futex and eventfd), `fdpass` (descriptors over Unix sockets) and `clock`. The
//! other OS calls go through `freeflow-os`.
#![deny(unsafe_code)]

pub mod cm;
pub mod codec;
pub mod ring;
#[allow(unsafe_code)]
mod ring_memory;
#[allow(unsafe_code)]
mod sync;

#[cfg(not(loom))]
pub mod attach;
#[cfg(not(loom))]
#[allow(unsafe_code)]
pub mod clock;
#[cfg(not(loom))]
pub mod control;
#[cfg(not(loom))]
#[allow(unsafe_code)]
pub mod doorbell;
#[cfg(not(loom))]
#[allow(unsafe_code)]
pub mod fdpass;
#[cfg(not(loom))]
pub mod identity;
pub mod msg;
#[cfg(not(loom))]
pub mod paths;
pub mod peer;
#[cfg(not(loom))]
#[allow(unsafe_code)]
pub mod region;
pub mod report;
pub mod sockmsg;
pub mod verbs;

pub use ring::{Consumer, Producer, RingError, RingGeometry, Wake};
pub use ring_memory::RingMemory;

/// Runtime directory used when `FREEFLOW_DIR` is not set. It holds only what containers may
/// see (they mount it read-only): the attach socket and the shims; the control plane is in the
/// state directory ([`paths`]).
pub const DEFAULT_DIR: &str = "/freeflow";
/// Name of the attach socket inside the runtime directory.
pub const ROUTER_SOCKET: &str = "router.sock";
/// Name of the router's control socket inside the state directory ([`paths::state_dir`]).
pub const CONTROL_SOCKET: &str = "router.ctl";

/// The runtime directory: `$FREEFLOW_DIR`, else [`DEFAULT_DIR`].
#[cfg(not(loom))]
pub fn runtime_dir() -> std::path::PathBuf {
    std::env::var_os("FREEFLOW_DIR")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(DEFAULT_DIR))
}
