//! The Freeflow control plane: registry, daemon, supervision, CLI and demo (the simulated
//! cluster the demo and `freeflow cluster` build is the crate freeflow-testbed).

pub mod cli;
pub mod cluster_cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod registry;
pub mod supervise;
