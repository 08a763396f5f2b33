//! Stand-ins for rdma-core's hardware providers `libmlx5.so.1` (Mellanox/NVIDIA ConnectX) and
//! `libefa.so.1` (AWS EFA), installed by `freeflow up` next to Freeflow's `libibverbs.so.1` in
//! `$FREEFLOW_DIR/verbs`.
//!
//! Why: Debian's libraries and programs link these providers for their direct-verbs extras:
//! libfabric (its EFA provider), UCX's `libuct_ib` (mlx5 acceleration), perftest's `ib_*` tools
//! (DC and crypto on mlx5, SRD on EFA), python3-pyverbs' provider modules (rdma-core's test
//! suite). The real providers import the private libibverbs interface (IBVERBS_PRIVATE_34:
//! `ibv_cmd_*`, `verbs_register_driver_34`, ...) with immediate binding, so with Freeflow's
//! library they stop the program before `main`. These stand-ins carry the providers' version
//! nodes and every entry point those Debian files import (the list and how it was found: module
//! `exports`), claim no device and register no driver: every call reports that the device is not
//! theirs, what the real providers answer for a device of another vendor (EOPNOTSUPP, or NULL
//! with errno set; `mlx5dv_is_supported` is false, so UCX and libfabric use plain verbs).
//! e2e/tests/providers_load.rs checks the list against the installed packages and loads them.
//!
//! Unsafe code: none but the `#[no_mangle]` exports, which the compiler counts as unsafe code;
//! they are confined (by `#![deny(unsafe_code)]` here) to `exports`, the only module that
//! allows it. `errno` is set through `freeflow-os`.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod exports;
