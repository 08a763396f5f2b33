//! [`DemoError`]: everything that can end the demo, each printed as one line; and how a part's
//! clean-up collects its problems into one ([`DemoError::check_cleanup`], [`remove_leftover_dir`]).

use std::io;
use std::path::{Path, PathBuf};

use super::TopologyError;
use crate::supervise::signal_name;

/// Errors of the demo; each prints as one line after `freeflow: demo: `.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The demo builds network namespaces.
    #[error(
        "the demo builds network namespaces and must run as root (effective uid is {euid}): \
         sudo {exe} demo"
    )]
    NotRoot {
        /// Our effective uid.
        euid: u32,
        /// How we were started, for the hint.
        exe: String,
    },
    /// A program or library of the workspace is not built.
    #[error("{} not found: build the whole workspace first (cargo build --release --workspace)", .0.display())]
    Missing(PathBuf),
    /// SIGINT, SIGTERM or SIGHUP; everything was removed.
    #[error("interrupted by {}; removed everything the demo made", signal_name(*.0))]
    Interrupted(i32),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Building or removing the simulated cluster.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A command of the demo failed.
    #[error("`{command}` failed ({status}): {said}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// Its last words on stderr.
        said: String,
    },
    /// `--part rdma` on a machine that cannot build the RDMA measuring program.
    #[error("the RDMA comparison cannot run here: {0}")]
    RdmaUnavailable(String),
    /// Something did not behave as Freeflow should (e.g. a stranger was let in).
    #[error("{0}")]
    Unexpected(String),
    /// Clean-up left something behind.
    #[error("clean-up incomplete: {}", .0.join("; "))]
    Cleanup(Vec<String>),
}

impl DemoError {
    /// The signal that ended the demo, if one did (the CLI exits with 128 + its number).
    pub fn signal(&self) -> Option<i32> {
        match self {
            DemoError::Interrupted(sig) => Some(*sig),
            _ => None,
        }
    }

    /// `Ok` when a clean-up met no `problems`, else [`DemoError::Cleanup`] with them.
    pub(super) fn check_cleanup(problems: Vec<String>) -> Result<(), DemoError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DemoError::Cleanup(problems))
        }
    }
}

/// Removes the leftover directory `dir` if it is there; a failure becomes one of `problems`.
pub(super) fn remove_leftover_dir(dir: &Path, problems: &mut Vec<String>) {
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            problems.push(format!("removing {}: {e}", dir.display()));
        }
    }
}

pub(super) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}
