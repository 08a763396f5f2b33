//! The Freeflow control plane: registry, daemon, supervision, CLI, test topology and demo.

pub mod registry;
pub mod topology;
