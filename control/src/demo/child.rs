//! Running the demo's children (`freeflow`, `freeflow-bench`): their stderr line by line as it
//! comes, a termination signal forwarded to them, and their output when they are done
//! (freeflow-bench's JSON report read as printed and as the shared type: [`bench_report`]).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{io_err, DemoError};
use super::signals::Interrupt;
use crate::supervise::{self, os};

/// After a signal, how long a child may take to finish its own clean-up before it is killed
/// (freeflow-bench stops two daemons and removes its namespaces: a few seconds).
const CHILD_CLEANUP_LIMIT: Duration = Duration::from_secs(60);
/// After a child exited, how long to wait for its pipes to close (a grandchild that survived
/// may hold them; we stop reading rather than hang).
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// A finished child.
pub(super) struct Finished {
    pub(super) status: ExitStatus,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

impl Finished {
    /// Its stdout if it succeeded, else [`DemoError::CommandFailed`].
    pub(super) fn ok(self, command: &str) -> Result<String, DemoError> {
        if self.status.success() {
            return Ok(self.stdout);
        }
        Err(DemoError::CommandFailed {
            command: command.to_owned(),
            status: supervise::exit_reason(self.status),
            said: last_words(&self.stderr),
        })
    }
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

enum Event {
    Stdout(String),
    StderrLine(String),
    StderrClosed,
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
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("cannot run `{command}`")))?;
    seen(Seen::Started(child.id()));
    let events = read_pipes(&mut child);
    let mut output = Output::default();
    let mut exited: Option<(ExitStatus, Instant)> = None;
    let mut signalled: Option<Instant> = None;
    loop {
        output.take(&events, seen);
        if exited.is_none() {
            if let Some(status) = child
                .try_wait()
                .map_err(io_err(format!("waiting for `{command}`")))?
            {
                exited = Some((status, Instant::now()));
            }
        }
        if let Some((status, at)) = exited {
            if output.complete() || at.elapsed() > PIPE_GRACE {
                stop.check()?;
                return Ok(output.finish(status));
            }
        }
        // The wait for signals is also the loop's pause.
        if let Some(sig) = stop.poll(Duration::from_millis(20))? {
            if exited.is_none() && signalled.is_none() {
                signalled = Some(Instant::now());
                // Not reaped yet (try_wait said so), so the pid is still this child's.
                let _ = os::send_signal(child.id() as i32, sig);
                seen(Seen::Signal(sig));
            }
        }
        if let Some(at) = signalled {
            if exited.is_none() && at.elapsed() > CHILD_CLEANUP_LIMIT {
                let _ = child.kill();
            }
        }
    }
}

/// Reads `child`'s stdout (whole) and stderr (by line) in threads, so that the caller can watch
/// the signalfd and the child at the same time. The threads inherit the blocked signals.
fn read_pipes(child: &mut Child) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = out.read_to_end(&mut text);
            let _ = tx.send(Event::Stdout(String::from_utf8_lossy(&text).into_owned()));
        });
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(Event::StderrLine(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Event::StderrClosed);
        });
    }
    rx
}

/// What a child wrote so far.
#[derive(Default)]
struct Output {
    /// All of stdout, once it is closed.
    stdout: Option<String>,
    stderr: String,
    stderr_closed: bool,
}

impl Output {
    /// Takes what the readers sent since the last call, telling `seen` each stderr line.
    fn take(&mut self, events: &mpsc::Receiver<Event>, seen: &mut dyn FnMut(Seen<'_>)) {
        loop {
            match events.try_recv() {
                Ok(Event::Stdout(text)) => self.stdout = Some(text),
                Ok(Event::StderrLine(line)) => {
                    seen(Seen::Line(&line));
                    self.stderr.push_str(&line);
                    self.stderr.push('\n');
                }
                Ok(Event::StderrClosed) => self.stderr_closed = true,
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.stdout.get_or_insert_with(String::new);
                    self.stderr_closed = true;
                    break;
                }
            }
        }
    }

    /// Both pipes are closed and read.
    fn complete(&self) -> bool {
        self.stdout.is_some() && self.stderr_closed
    }

    fn finish(self, status: ExitStatus) -> Finished {
        Finished {
            status,
            stdout: self.stdout.unwrap_or_default(),
            stderr: self.stderr,
        }
    }
}

/// Runs `cmd`, which must succeed; returns its stdout.
pub(super) fn run_ok(cmd: &mut Command, stop: &Interrupt) -> Result<String, DemoError> {
    let command = describe(cmd);
    run_child(cmd, stop, &mut |_| ())?.ok(&command)
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
