//! Freeflow's one operating-system layer: the Linux calls that std does not wrap and that more
//! than one Freeflow crate makes, each written once, small and safe to call.
//!
//! - [`signals`]: termination signals blocked and read from a signalfd; sending a signal.
//! - [`poll`]: waiting for readiness on a few descriptors.
//! - [`memfd`]: sealed memory files (the rings' region, registered memory).
//! - [`errno`]: the calling thread's `errno`, for the C boundary of the shims.
//! - [`process`]: what a child does between fork and exec, facts and limits of processes, and
//!   [`process::Pidfd`] (pidfd_open: watching and signalling a process that is not our child).
//! - [`namespace`]: what kind of namespace a namespace file is.
//! - [`child`]: run a child, drain its pipes, wait with a deadline.
//! - [`logfile`]: what the router's and the daemon's logs share: the rate limit on repeated
//!   lines ([`logfile::RateLimiter`]) and the copy-truncate rotation of a log file
//!   ([`logfile::rotate_if_larger`]).
//! - [`symbol_versions!`]: `.symver` directives for the shims' exported C functions.
//!
//! File locks are std's (`File::lock`, `try_lock`, `unlock`: `flock(2)` on Linux), so they have
//! no wrapper here.
//!
//! Unsafe code is confined (by `#![deny(unsafe_code)]` here and `#![allow(unsafe_code)]` at the
//! top of each) to the modules that make system calls: `signals`, `poll`, `memfd`, `errno`,
//! `process` and `namespace`. `child`, `logfile` and the macro are safe code.
//!
//! The socket shim (libfsocket) links this crate and interposes some libc symbols (`close`,
//! `dup`, `fcntl`, `connect`, ...): a function here that calls one of those from inside that
//! library would reach the shim's own version. None does today (`poll`, `signalfd`, `read`,
//! `memfd_create` are not interposed); keep it so, or call through the shim's `real` module.
#![deny(unsafe_code)]

pub mod child;
pub mod errno;
pub mod logfile;
pub mod memfd;
pub mod namespace;
pub mod poll;
pub mod process;
pub mod signals;
mod symbol_versions;
