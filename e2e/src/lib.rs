//! End-to-end tests of Freeflow: the TCP-mode shim (`libfsocket.so`), the verbs library
//! (`libibverbs.so.1`) and the router, with real programs (Python, redis, ibverbs-utils,
//! perftest, C probes) in the containers of a simulated cluster (freeflow-testbed) with
//! Freeflow up on its hosts. The tests are in `tests/`, their scaffolding in
//! `tests/common/mod.rs`, and the C and Python programs they run in `tests/programs/`.
//!
//! This library is empty: the crate exists for its tests. They need root and a built workspace
//! (`cargo build --workspace`), and fail, never skip, without them.

#![deny(unsafe_code)]
