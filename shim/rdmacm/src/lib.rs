//! The drop-in `librdmacm.so.1` (rdma_cm) of Freeflow's RDMA mode, installed by `freeflow up`
//! as `$FREEFLOW_DIR/verbs/librdmacm.so.1` beside the verbs library, so that unmodified
//! programs (rping, ucmatose, rdma_server/rdma_client, cmtime) connect with rdma_cm between
//! containers. rdma-core's own library cannot serve there: it needs the kernel's
//! `/dev/infiniband/rdma_cm`.
//!
//! The connection manager lives in the router (freeflow_proto::cm, dataplane/src/cm): ids,
//! listeners and the exchange of QP numbers and private data, with the tenant checks. This
//! library keeps the program's structures, turns the router's events into `rdma_cm_event`s on
//! a pollable channel fd (the channel's router connection itself), and moves QPs through
//! INIT, RTR and RTS with the verbs of the `libibverbs.so.1` the process loaded (Freeflow's),
//! as rdma-core's librdmacm does with the kernel's answers.
//!
//! Layout: `abi` is the C ABI; `ibv` the verbs, looked up at run time; `router` the
//! conversation with the router; `cm` the channels, ids and events; `exports` and
//! `rsocket_exports` the C functions (every function rdma-core 44's librdmacm exports, at its
//! version). rsockets (docs/rsockets.md): `rflow` the flow control, `riomap` the bookkeeping of
//! riomap/riowrite, `rconn` a connection's verbs, `rsocket` the sockets, `rsocket_exports`
//! their C functions.
//!
//! Unsafe code is confined (by `#![deny(unsafe_code)]` here and `#![allow(unsafe_code)]` at
//! the top of each) to the C boundary: `ibv` (dlopen), `cm` (the program's structures),
//! `rconn` (posts and polls through the context's operations), `rsocket` (eventfd, poll) and
//! `exports`, `rsocket_exports` (`#[no_mangle]`, the program's buffers).
#![deny(unsafe_code)]

#[macro_use]
extern crate freeflow_os;

mod abi;
mod cm;
mod exports;
mod ibv;
mod rconn;
mod rflow;
mod riomap;
mod router;
mod rsocket;
mod rsocket_exports;

/// One line on stderr when `FREEFLOW_DEBUG=1`: why a call failed.
pub(crate) fn debug(args: std::fmt::Arguments<'_>) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("FREEFLOW_DEBUG").is_some_and(|v| v == "1")) {
        eprintln!("freeflow librdmacm: {args}");
    }
}

/// Version of the library, for `strings librdmacm.so.1`.
#[allow(unsafe_code)]
#[no_mangle]
#[used]
pub static FREEFLOW_RDMACM_VERSION: [u8; 6] = *b"0.1.0\0";
