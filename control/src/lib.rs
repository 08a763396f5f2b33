//! The Freeflow control plane: registry, daemon, supervision, CLI, test topology and demo.

pub mod cli;
pub mod cluster_cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod registry;
pub mod supervise;
pub mod topology;
