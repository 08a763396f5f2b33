//! Running `ip` and `bridge`: commands inside a namespace ([`command_in`], `ip -n`), run to
//! completion with their output captured and a failure turned into a [`TopologyError`], and the
//! per-thread [`fault`] injection that tests of cleanup after partial failure use.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use crate::error::TopologyError;

/// `ip netns exec <netns> <program>`: run `program` inside a namespace. Add arguments with
/// [`Command::arg`].
pub fn command_in(netns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, program]);
    cmd
}

/// `ip -n <netns>`.
pub(crate) fn ip_in(netns: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", netns]);
    cmd
}

/// A command about to be run; `iproute(ns, args).args(more).run()`.
pub(crate) struct Ip(Command);

pub(crate) fn iproute(netns: &str, args: &[&str]) -> Ip {
    let mut cmd = ip_in(netns);
    cmd.args(args);
    Ip(cmd)
}

impl Ip {
    pub(crate) fn args<'a>(mut self, args: impl IntoIterator<Item = &'a str>) -> Self {
        self.0.args(args);
        self
    }

    pub(crate) fn run(mut self) -> Result<Output, TopologyError> {
        run(&mut self.0)
    }
}

pub(crate) fn describe_command(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run to completion, capture output, fail on a non-zero exit.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, TopologyError> {
    run_with_stdin(cmd, &[])
}

pub(crate) fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Result<Output, TopologyError> {
    let command = describe_command(cmd);
    if let Some(status) = fault::take_injected() {
        return Err(TopologyError::CommandFailed {
            command,
            status,
            stderr: "injected fault".into(),
        });
    }
    // Its own process group: a terminal's Ctrl-C reaches only the program using this module,
    // which decides what to do (the demo tears the cluster down); an `ip` killed half way through
    // a teardown would leave interfaces behind.
    let spawned = cmd
        .process_group(0)
        .stdin(if stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(source) => return Err(TopologyError::Spawn { command, source }),
    };
    if let Some(mut input) = child.stdin.take() {
        // A write error means the child exited early; its status tells the story.
        let _ = input.write_all(stdin);
    }
    let out = child
        .wait_with_output()
        .map_err(|source| TopologyError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(TopologyError::CommandFailed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Fault injection for tests of cleanup after partial failure. Per thread, so parallel tests do
/// not disturb each other.
#[doc(hidden)]
pub mod fault {
    use std::cell::Cell;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    thread_local! {
        static FAIL_AFTER: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// Make this thread's command number `n` from now on (0 = the next one) fail with
    /// "injected fault" instead of running. Fires once.
    pub fn fail_command_after(n: usize) {
        FAIL_AFTER.with(|f| f.set(Some(n)));
    }

    /// Cancel a pending injected fault; returns whether one was still pending.
    pub fn clear() -> bool {
        FAIL_AFTER.with(|f| f.take().is_some())
    }

    pub(super) fn take_injected() -> Option<ExitStatus> {
        FAIL_AFTER.with(|f| match f.get() {
            None => None,
            Some(0) => {
                f.set(None);
                // Wait status of a process that exited with code 1.
                Some(ExitStatus::from_raw(1 << 8))
            }
            Some(n) => {
                f.set(Some(n - 1));
                None
            }
        })
    }
}
