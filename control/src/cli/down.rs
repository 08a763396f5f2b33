//! `freeflow down`: stops the daemon of a directory, then its router: the daemon stops the
//! router on SIGTERM, and `down` makes sure of it (a router outlives a daemon that died), also
//! when no daemon runs (its daemon was killed, or it was started by hand).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use freeflow_proto::control::{self, ControlRequest, ControlResponse};

use super::error::io_err;
use super::{CliError, DirArg};
use crate::config::RuntimeDir;
use crate::daemon::{self, DaemonState, DaemonStatus};
use crate::os;
use crate::supervise::format_duration;

/// How long `down` waits for the daemon to exit (it gives the router 5 s, then kills it).
const DOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `down` waits for a daemon that holds its lock to write its pid file.
const PID_FILE_TIMEOUT: Duration = Duration::from_secs(2);

/// `freeflow down`: SIGTERM to the daemon (which stops its router), wait until it is gone, then
/// stop the router if it still runs.
pub(super) fn down(args: &DirArg) -> Result<ExitCode, CliError> {
    let dir = args.runtime_dir()?;
    let pid = match daemon::probe(&dir)? {
        DaemonState::Running { pid } => pid,
        DaemonState::Stopped => {
            if daemon::router_lock_held(&dir) == Some(true) {
                stop_router(&dir, "no daemon runs for")?;
                out!(
                    "freeflow: no daemon was running for {}; stopped the router that ran there \
                     without one",
                    dir.path().display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            out!(
                "freeflow: no daemon is running for {}; nothing to stop",
                dir.path().display()
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    // A daemon that is just starting may not have written its pid yet.
    let pid = match pid {
        Some(pid) => pid,
        None => wait_for_pid(&dir)?,
    };
    let router_pid = DaemonStatus::read(&dir).and_then(|s| s.router_pid);
    os::send_signal(pid as i32, libc::SIGTERM)
        .map_err(io_err(format!("cannot signal the daemon (pid {pid})")))?;
    let deadline = Instant::now() + DOWN_TIMEOUT;
    loop {
        if daemon::probe(&dir)? == DaemonState::Stopped {
            // The daemon stopped its router on the way out, unless something went wrong there:
            // do not rely on it.
            if daemon::router_lock_held(&dir) == Some(true) {
                stop_router(&dir, "the daemon stopped for")?;
            }
            out!(
                "freeflow: stopped the daemon (pid {pid}){} for {}",
                router_pid
                    .map(|p| format!(" and its router (pid {p})"))
                    .unwrap_or_default(),
                dir.path().display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            return Err(CliError::Invalid(format!(
                "the daemon (pid {pid}) did not stop within {}; see {} (`kill -9 {pid}` forces it; \
                 its router keeps running, and another `freeflow down` stops it)",
                format_duration(DOWN_TIMEOUT),
                dir.log().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The daemon's pid once its pid file names it (bounded: a lock holder without a pid file is
/// not a daemon that is starting).
fn wait_for_pid(dir: &RuntimeDir) -> Result<u32, CliError> {
    let deadline = Instant::now() + PID_FILE_TIMEOUT;
    loop {
        if let Some(pid) = daemon::read_pid(dir) {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            return Err(CliError::Invalid(format!(
                "a process holds {} but {} names no pid; find it with `fuser {}`",
                dir.daemon_lock().display(),
                dir.pid_file().display(),
                dir.daemon_lock().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a router that runs without a daemon (its daemon died or stopped without it, or it was
/// started by hand): asks it to shut down on `router.ctl` and waits until it lets go of
/// `router.lock`. `context` starts the error messages ("no daemon runs for").
fn stop_router(dir: &RuntimeDir, context: &str) -> Result<(), CliError> {
    match control::call(
        &dir.control_socket(),
        &ControlRequest::Shutdown,
        daemon::CONTROL_TIMEOUT,
    ) {
        Ok(ControlResponse::Ok) => {}
        Ok(other) => {
            return Err(CliError::Invalid(format!(
                "{context} {}, and the router there refused to shut down: {other:?}",
                dir.path().display()
            )))
        }
        Err(e) => {
            return Err(CliError::Invalid(format!(
                "{context} {}: a router holds {} and its control socket {} does not answer \
                 ({e}; it answers only root in its own network namespace)",
                dir.path().display(),
                dir.router_lock().display(),
                dir.control_socket().display()
            )))
        }
    }
    let deadline = Instant::now() + DOWN_TIMEOUT;
    while daemon::router_lock_held(dir) == Some(true) {
        if Instant::now() >= deadline {
            return Err(CliError::Invalid(format!(
                "the router of {} did not stop within {}",
                dir.path().display(),
                format_duration(DOWN_TIMEOUT)
            )));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = std::fs::remove_file(dir.router_pid_file());
    Ok(())
}
