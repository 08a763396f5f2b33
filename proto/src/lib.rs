//! Everything the Freeflow router and its shims share: the shared-memory ring, the region that
//! holds an attachment's rings, doorbells, the attach handshake on `router.sock`, the messages in
//! ring slots and the router's control protocol. Every fixed layout on the wire follows one
//! codec convention ([`codec`]): field offsets declared once, enums and flag words decoded with
//! `TryFrom`, a typed [`codec::DecodeError`].
//!
//! Unsafe code lives only in `ring_memory`, `region`, `doorbell`, `fdpass` and `clock`.

pub mod codec;
pub mod ring;
mod ring_memory;
mod sync;

#[cfg(not(loom))]
pub mod attach;
#[cfg(not(loom))]
pub mod clock;
#[cfg(not(loom))]
pub mod control;
#[cfg(not(loom))]
pub mod doorbell;
#[cfg(not(loom))]
pub mod fdpass;
#[cfg(not(loom))]
pub mod identity;
pub mod msg;
#[cfg(not(loom))]
pub mod region;
pub mod sockmsg;
pub mod verbs;

pub use ring::{Consumer, Producer, RingError, RingGeometry, Wake};
pub use ring_memory::RingMemory;

/// Runtime directory used when `FREEFLOW_DIR` is not set.
pub const DEFAULT_DIR: &str = "/freeflow";
/// Name of the attach socket inside the runtime directory.
pub const ROUTER_SOCKET: &str = "router.sock";
/// Name of the router's control socket inside the runtime directory.
pub const CONTROL_SOCKET: &str = "router.ctl";

/// The runtime directory: `$FREEFLOW_DIR`, else [`DEFAULT_DIR`].
#[cfg(not(loom))]
pub fn runtime_dir() -> std::path::PathBuf {
    std::env::var_os("FREEFLOW_DIR")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(DEFAULT_DIR))
}
