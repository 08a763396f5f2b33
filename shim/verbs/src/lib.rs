//! The drop-in `libibverbs.so.1` of Freeflow's fully-isolated RDMA mode, installed by
//! `freeflow up` as `$FREEFLOW_DIR/verbs/libibverbs.so.1` and used with
//! `LD_LIBRARY_PATH=$FREEFLOW_DIR/verbs` by unmodified rdma-core programs.
//!
//! What works: in a registered container a process sees one virtual device, `ffv0`, with one
//! active RoCE-like port whose only GID is the container's overlay address (`::ffff:10.32.0.5`);
//! the device list, open/close and the device, port, GID and P_Key queries answer as rdma-core's
//! do (`ibv_devices`, `ibv_devinfo -v`). Protection domains and memory regions are real: each is
//! an entry of the router's table for the context (virtual handles and keys), and a region's
//! pages move onto the process's memory file, which the router maps too, so the router works on
//! the program's own bytes without a staging copy (`pages`, `memory`). CQs (resizable),
//! completion channels, RC QPs and shared receive queues are real too (`cq`, `qp`, `srq`):
//! QPs are RC, UC or UD, with address handles for UD (`ah`);
//! completions, send and receive queues are rings in
//! memory shared with the router, so posting and polling make no system call, and the router's
//! software engine executes the work requests between containers of the host. Outside a
//! registered container, or without a router, the device list is empty. Every other verb of
//! rdma-core 44's public ABI exists, with the same symbol version, and fails cleanly with
//! EOPNOTSUPP: programs load, and report the failure.
//!
//! Layout: `abi` is the C ABI (hand-written, checked against the installed headers); `device`
//! derives the device's attributes from the container's identity; `registry` holds the
//! process's attachments, devices, contexts and verbs objects; `channel` is a context's
//! request/reply conversation with the router; `maps`, `pages` and `memory` are registered
//! memory; `async_event` is a context's asynchronous event queue behind its `async_fd`;
//! `faults` is what happens when the router goes (flushes, errors), with `shadow` the
//! lock-free record of each queue's outstanding requests; `shared_core` is a poll loop's turn
//! taking with the router on its cores; `route_wait` asks again for a destination the router
//! has not learnt yet; `exports`, `ah`, `pd_mr`, `cq`, `qp`, `srq`, `utility`, `marshall` (the kernel-structure
//! converters librdmacm binds at load time) and `unsupported` are the exported C functions;
//! `cq_ex` and `qp_ex` the extended API (`ibv_create_cq_ex` and its poll API,
//! `ibv_create_qp_ex` and the `ibv_wr_*` post API), reached through function pointers.
//!
//! Unsafe code is confined (by `#![deny(unsafe_code)]` here and `#![allow(unsafe_code)]` at the
//! top of each) to the C boundary (`exports`, `ah`, `async_event`, `pd_mr`, `cq`, `cq_ex`, `qp`, `qp_ex`, `srq`, `unsupported`,
//! `utility`, `marshall`, `ffi`, and `shared_core`'s `sched_getcpu`) and to `memory` (the system calls that move pages), whose two
//! entry points `pages` calls (each call allowed on its own) right after checking
//! `/proc/self/maps`. errno, memory files and the `.symver` directives are `freeflow-os`'s.
#![deny(unsafe_code)]

/// `symbol_versions!` binds the exported functions to their version nodes of `libibverbs.map`
/// (`name@@NODE`), as with rdma-core's library; `macro_use` makes it usable in every module.
#[macro_use]
extern crate freeflow_os;

mod abi;
mod ah;
mod async_event;
mod channel;
mod cq;
mod cq_ex;
mod device;
mod error;
mod exports;
mod faults;
mod ffi;
mod maps;
mod marshall;
mod memory;
mod pages;
mod pd_mr;
mod qp;
mod qp_ex;
mod registry;
mod route_wait;
mod shadow;
mod shared_core;
mod srq;
mod strings;
mod sysfs;
mod unsupported;
mod utility;

/// Version of the library, for `strings libibverbs.so.1`.
#[allow(unsafe_code)]
#[no_mangle]
#[used]
pub static FREEFLOW_VERBS_VERSION: [u8; 6] = *b"0.1.0\0";
