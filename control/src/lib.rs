//! The Freeflow control plane: registry, daemon, supervision, CLI, demo, the chained CNI
//! plugin `freeflow-cni` (`cni`) and the daemon's Docker watcher (`docker`); the simulated
//! cluster the demo and `freeflow cluster` build is the crate freeflow-testbed.
//!
//! No unsafe code (`#![deny(unsafe_code)]`, and no module allows it): the control plane's
//! system calls are [`os`]'s, which uses `freeflow-os` and std.
#![deny(unsafe_code)]

pub mod cli;
pub mod cluster_cli;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod docker;
pub mod legacy;
pub mod metrics;
pub mod os;
pub mod registry;
pub mod supervise;
