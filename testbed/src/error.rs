//! Errors of the test bed.

use std::path::PathBuf;
use std::process::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Building namespaces needs root.
    #[error(
        "building network namespaces needs root (effective uid is {euid}); \
         run as root, e.g. `sudo -E cargo test`"
    )]
    NotRoot {
        /// The effective uid we run with.
        euid: u32,
    },
    /// The caller asked for something that cannot be built.
    #[error("invalid topology request: {0}")]
    InvalidSpec(String),
    /// A namespace (or container) of that name is already there.
    #[error("{0} already exists")]
    Exists(String),
    /// No host with that index.
    #[error("no host {index} in this cluster (it has {count})")]
    NoSuchHost {
        /// The index asked for.
        index: usize,
        /// How many hosts there are.
        count: usize,
    },
    /// No container with that name.
    #[error("no container named {0:?} in this cluster")]
    NoSuchContainer(String),
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// What it said on stderr, trimmed.
        stderr: String,
    },
    /// A command could not be started at all.
    #[error("cannot run `{command}` (is iproute2 installed?): {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// A command said something we could not understand.
    #[error("unexpected output from `{command}`: {detail}")]
    BadOutput {
        /// The command line.
        command: String,
        /// What was wrong with it.
        detail: String,
    },
    /// Reading the namespace directory failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Teardown tried everything and some steps failed.
    #[error("teardown of cluster {tag} incomplete: {}", errors.join("; "))]
    TeardownIncomplete {
        /// The cluster's tag.
        tag: String,
        /// One message per failed step.
        errors: Vec<String>,
    },
}
