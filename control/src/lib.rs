//! The Freeflow control plane: registry, daemon, supervision, CLI, test topology and demo.
//!
//! Unsafe code is confined (by `#![deny(unsafe_code)]` here) to `topology` (which allows it for
//! `geteuid` and `kill`, until it uses `freeflow-os` too). The control plane's system calls are
//! [`os`]'s: `freeflow-os` and std.
#![deny(unsafe_code)]

pub mod cli;
pub mod cluster_cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod os;
pub mod registry;
pub mod supervise;
#[allow(unsafe_code)]
pub mod topology;
