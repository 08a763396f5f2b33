//! Running the demo's children (`freeflow`, `freeflow-bench`): their stderr line by line as it
//! comes, a termination signal forwarded to them, and their output when they are done
//! (freeflow-bench's JSON report read as printed and as the shared type: [`bench_report`]). The
//! running is `freeflow_os::child`'s; this module adds the demo's limits and its signals.

use std::io;
use std::process::Command;
use std::time::Duration;

use freeflow_os::child::{self, Limits, Stop, Watcher};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{io_err, DemoError};
use super::signals::Interrupt;
use crate::supervise;

pub(super) use freeflow_os::child::Finished;

/// After a signal, how long a child may take to finish its own clean-up before it is killed
/// (freeflow-bench stops two daemons and removes its namespaces: a few seconds).
const CHILD_CLEANUP_LIMIT: Duration = Duration::from_secs(60);
/// After a child exited, how long to wait for its pipes to close (a grandchild that survived
/// may hold them; we stop reading rather than hang).
const PIPE_GRACE: Duration = Duration::from_secs(2);
/// How long one wait for a signal lasts: the pause between two looks at the child.
const SIGNAL_WAIT: Duration = Duration::from_millis(20);

/// How the demo runs a child: without a limit of its own (the demo's tests bound the whole
/// demo), with the clean-up time and the pipe grace above.
const LIMITS: Limits = Limits {
    run: None,
    cleanup: CHILD_CLEANUP_LIMIT,
    pipes: PIPE_GRACE,
    pause: SIGNAL_WAIT,
};

/// Its stdout if it succeeded, else [`DemoError::CommandFailed`].
pub(super) fn succeeded(finished: Finished, command: &str) -> Result<String, DemoError> {
    if finished.status.success() {
        return Ok(finished.stdout);
    }
    Err(DemoError::CommandFailed {
        command: command.to_owned(),
        status: supervise::exit_reason(finished.status),
        said: last_words(&finished.stderr),
    })
}

/// The last non-empty line a program wrote, for an error message.
pub(super) fn last_words(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(nothing on stderr)")
        .to_owned()
}

pub(super) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// What [`run_child`] tells its caller while the child runs.
pub(super) enum Seen<'a> {
    /// The child started with this pid.
    Started(u32),
    /// A line the child wrote to stderr.
    Line(&'a str),
    /// A termination signal arrived and was forwarded to the child.
    Signal(i32),
}

/// Runs `cmd` to completion, telling `seen` each stderr line as it comes. A signal that
/// arrives meanwhile is forwarded to the child (which then cleans up and exits) and ends the
/// demo once the child is gone: `Err(Interrupted)`. A child that takes longer than
/// [`CHILD_CLEANUP_LIMIT`] after the signal is killed.
pub(super) fn run_child(
    cmd: &mut Command,
    stop: &Interrupt,
    seen: &mut dyn FnMut(Seen<'_>),
) -> Result<Finished, DemoError> {
    stop.check()?;
    let command = describe(cmd);
    let child = child::start(cmd).map_err(io_err(format!("cannot run `{command}`")))?;
    let mut forwarder = Forwarder {
        stop,
        seen,
        failed: None,
    };
    let finished = child::watch(child, &LIMITS, &mut forwarder);
    if let Some(e) = forwarder.failed {
        return Err(e);
    }
    let finished = finished.map_err(io_err(format!("waiting for `{command}`")))?;
    stop.check()?;
    Ok(finished)
}

/// The demo's watcher of a child: tells `seen` what happens and forwards a termination signal.
struct Forwarder<'a> {
    stop: &'a Interrupt,
    seen: &'a mut dyn FnMut(Seen<'_>),
    /// Why the signals could not be read (the run then ends with it).
    failed: Option<DemoError>,
}

impl Watcher for Forwarder<'_> {
    fn started(&mut self, pid: u32) {
        (self.seen)(Seen::Started(pid));
    }

    fn stderr_line(&mut self, line: &str) {
        (self.seen)(Seen::Line(line));
    }

    fn wait(&mut self, pause: Duration) -> io::Result<Option<Stop>> {
        match self.stop.poll(pause) {
            Ok(sig) => Ok(sig.map(Stop::Forward)),
            Err(e) => {
                let said = io::Error::other(e.to_string());
                self.failed = Some(e);
                Err(said)
            }
        }
    }

    fn stopping(&mut self, stop: Stop) {
        if let Stop::Forward(sig) = stop {
            (self.seen)(Seen::Signal(sig));
        }
    }
}

/// Runs `cmd`, which must succeed; returns its stdout.
pub(super) fn run_ok(cmd: &mut Command, stop: &Interrupt) -> Result<String, DemoError> {
    let command = describe(cmd);
    succeeded(run_child(cmd, stop, &mut |_| ())?, &command)
}

/// The report `freeflow-bench PART --json` printed on `stdout`: as printed (the demo's `--json`
/// passes it on unchanged) and as the shared type, which the tables read.
pub(super) fn bench_report<T: DeserializeOwned>(
    part: &str,
    stdout: &str,
) -> Result<(Value, T), DemoError> {
    let json: Value = serde_json::from_str(stdout.trim()).map_err(|e| {
        DemoError::Unexpected(format!(
            "freeflow-bench {part} printed no report ({e}): {stdout:?}"
        ))
    })?;
    let report = serde_json::from_value(json.clone()).map_err(|e| {
        DemoError::Unexpected(format!(
            "freeflow-bench {part}'s report is not what we read: {e}"
        ))
    })?;
    Ok((json, report))
}
