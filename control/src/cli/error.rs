//! [`CliError`], the one error type of the `freeflow` commands.

use std::io;
use std::path::PathBuf;

use crate::config::ConfigError;
use crate::daemon::DaemonError;
use crate::registry::RegistryError;
use crate::supervise::SuperviseError;

/// Errors of CLI commands; each prints as one line after `freeflow: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Runtime directory or `config.json`.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The registry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The daemon.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// Finding or starting the router.
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
    /// An argument or state that does not work, with the reason.
    #[error("{0}")]
    Invalid(String),
    /// `up` did not get a ready daemon.
    #[error("up failed: {reason} (logs: {} and {})", log.display(), log.with_file_name("router.log").display())]
    UpFailed {
        /// Why.
        reason: String,
        /// The daemon's log.
        log: PathBuf,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Wraps an `io::Error` as [`CliError::Io`] saying what was being done.
pub(super) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CliError {
    let what = what.into();
    move |source| CliError::Io { what, source }
}
