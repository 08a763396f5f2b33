//! Running a child to completion: its stdout and stderr are read on threads while it runs (so a
//! child that writes a lot cannot stall on a full pipe), the waiting caller watches for a reason
//! to stop it (a termination signal), and a deadline bounds the whole run.
//!
//! The demo runs every step this way (forwarding a signal so the step cleans up), the bench its
//! experiments' commands and its RDMA measuring program (killing on a signal or the deadline).
//!
//! [`run`] starts the child and watches it; a caller that tells a failed start from a failed
//! wait calls its two halves, [`start`] and [`watch`].

use std::io::{self, BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a run may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The longest the child may run before it is killed (`None`: no limit).
    pub run: Option<Duration>,
    /// After a signal was forwarded ([`Stop::Forward`]), how long the child gets to clean up and
    /// exit before it is killed.
    pub cleanup: Duration,
    /// After the child exited, how long to wait for its pipes to close (a grandchild that
    /// inherited them may hold them open).
    pub pipes: Duration,
    /// The longest pause between two looks at the child (the watcher's wait; once the child
    /// exited, the wait for its pipes).
    pub pause: Duration,
}

impl Limits {
    /// No run limit, 30 s to clean up, 2 s for the pipes, a look every 20 ms (also
    /// `Limits::default()`; this one is for constants: `..Limits::DEFAULT`).
    pub const DEFAULT: Limits = Limits {
        run: None,
        cleanup: Duration::from_secs(30),
        pipes: Duration::from_secs(2),
        pause: Duration::from_millis(20),
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// What to do with a running child, when the watcher has a reason to end it early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Send it this signal and let it exit (killed after [`Limits::cleanup`]).
    Forward(i32),
    /// Kill it now (SIGKILL), because of this signal.
    Kill(i32),
}

/// What the caller sees of a run while it waits.
pub trait Watcher {
    /// The child started with this pid.
    fn started(&mut self, _pid: u32) {}
    /// A line the child wrote to stderr (without its newline).
    fn stderr_line(&mut self, _line: &str) {}
    /// Waits up to `pause` for a reason to end the child early (a termination signal arrived):
    /// this wait is the run's pause between two looks at the child. An error (the watcher
    /// cannot watch) ends the run with it, the child left as it is.
    fn wait(&mut self, pause: Duration) -> io::Result<Option<Stop>>;
    /// The run acted on `stop`: the first reason to stop that came while the child ran (later
    /// ones change nothing).
    fn stopping(&mut self, _stop: Stop) {}
}

/// A watcher without reasons to stop: it only sleeps.
#[derive(Debug, Default)]
pub struct Sleeper;

impl Watcher for Sleeper {
    fn wait(&mut self, pause: Duration) -> io::Result<Option<Stop>> {
        std::thread::sleep(pause);
        Ok(None)
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The child exited by itself.
    Exited,
    /// The child ran past [`Limits::run`] and was killed.
    TimedOut,
    /// The watcher stopped it because of this signal.
    Interrupted(i32),
}

/// A child that ran to completion.
#[derive(Debug)]
pub struct Finished {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (invalid UTF-8 replaced).
    pub stdout: String,
    /// Everything it wrote to stderr (invalid UTF-8 replaced).
    pub stderr: String,
    /// Why it ended.
    pub ended: Ended,
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr piped) to completion within `limits`,
/// telling `watcher` what happens: [`start`], then [`watch`]. Fails only if the child cannot be
/// started or waited for, or the watcher fails.
pub fn run(cmd: &mut Command, limits: &Limits, watcher: &mut dyn Watcher) -> io::Result<Finished> {
    watch(start(cmd)?, limits, watcher)
}

/// Starts `cmd` with stdin from /dev/null and stdout and stderr piped, for [`watch`].
pub fn start(cmd: &mut Command) -> io::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// Runs a child that [`start`] started to completion within `limits`, telling `watcher` what
/// happens. Fails only if the child cannot be waited for or the watcher fails; the child is then
/// left as it is.
pub fn watch(mut child: Child, limits: &Limits, watcher: &mut dyn Watcher) -> io::Result<Finished> {
    watcher.started(child.id());
    let mut run = Run::new(&mut child, limits);
    loop {
        run.take_output(watcher);
        if let Some(finished) = run.finished()? {
            return Ok(finished);
        }
        if run.exited() {
            // Only its pipes are left to read: wait for them, not for the watcher's pause.
            run.await_output(watcher);
            continue;
        }
        if let Some(stop) = watcher.wait(limits.pause)? {
            if run.stop(stop) {
                watcher.stopping(stop);
            }
        }
        run.enforce_limits();
    }
}

/// What a reader thread sends.
enum Output {
    Stdout(Vec<u8>),
    StderrLine(String),
    StderrClosed,
}

/// The state of one run.
struct Run<'a> {
    child: &'a mut Child,
    limits: &'a Limits,
    started: Instant,
    output: mpsc::Receiver<Output>,
    stdout: Option<Vec<u8>>,
    stderr: String,
    stderr_closed: bool,
    exited: Option<(ExitStatus, Instant)>,
    stopping: Option<Instant>,
    ended: Ended,
}

impl<'a> Run<'a> {
    fn new(child: &'a mut Child, limits: &'a Limits) -> Run<'a> {
        let (tx, output) = mpsc::channel();
        if let Some(mut out) = child.stdout.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = out.read_to_end(&mut bytes);
                let _ = tx.send(Output::Stdout(bytes));
            });
        }
        if let Some(err) = child.stderr.take() {
            std::thread::spawn(move || read_lines(err, &tx));
        }
        Run {
            child,
            limits,
            started: Instant::now(),
            output,
            stdout: None,
            stderr: String::new(),
            stderr_closed: false,
            exited: None,
            stopping: None,
            ended: Ended::Exited,
        }
    }

    /// Takes what the readers sent so far.
    fn take_output(&mut self, watcher: &mut dyn Watcher) {
        loop {
            match self.output.try_recv() {
                Ok(output) => self.accept(output, watcher),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => return self.readers_gone(),
            }
        }
    }

    /// Waits up to the pause for the readers' next message (the child has exited, so there is
    /// nothing else to wait for), and takes it.
    fn await_output(&mut self, watcher: &mut dyn Watcher) {
        match self.output.recv_timeout(self.limits.pause) {
            Ok(output) => self.accept(output, watcher),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => self.readers_gone(),
        }
    }

    fn accept(&mut self, output: Output, watcher: &mut dyn Watcher) {
        match output {
            Output::Stdout(bytes) => self.stdout = Some(bytes),
            Output::StderrLine(line) => {
                watcher.stderr_line(&line);
                self.stderr.push_str(&line);
                self.stderr.push('\n');
            }
            Output::StderrClosed => self.stderr_closed = true,
        }
    }

    /// Both readers are done (and sent all they had).
    fn readers_gone(&mut self) {
        self.stdout.get_or_insert_with(Vec::new);
        self.stderr_closed = true;
    }

    fn exited(&self) -> bool {
        self.exited.is_some()
    }

    /// The result, once the child has exited and its pipes are read (or their grace is over).
    fn finished(&mut self) -> io::Result<Option<Finished>> {
        if self.exited.is_none() {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some((status, Instant::now()));
            }
        }
        let Some((status, at)) = self.exited else {
            return Ok(None);
        };
        let drained = self.stdout.is_some() && self.stderr_closed;
        if !drained && at.elapsed() <= self.limits.pipes {
            return Ok(None);
        }
        Ok(Some(Finished {
            status,
            stdout: String::from_utf8_lossy(&self.stdout.take().unwrap_or_default()).into_owned(),
            stderr: std::mem::take(&mut self.stderr),
            ended: self.ended,
        }))
    }

    /// Acts on the watcher's first reason to stop (later ones change nothing); whether it did.
    fn stop(&mut self, stop: Stop) -> bool {
        if self.exited.is_some() || self.stopping.is_some() {
            return false;
        }
        self.stopping = Some(Instant::now());
        match stop {
            Stop::Forward(sig) => {
                self.ended = Ended::Interrupted(sig);
                // Not reaped yet (try_wait said so), so the pid is still this child's.
                if crate::signals::send_signal(self.child.id() as i32, sig).is_err() {
                    let _ = self.child.kill();
                }
            }
            Stop::Kill(sig) => {
                self.ended = Ended::Interrupted(sig);
                let _ = self.child.kill();
            }
        }
        true
    }

    /// Kills a child past its deadline or its clean-up time.
    fn enforce_limits(&mut self) {
        if self.exited.is_some() {
            return;
        }
        let overdue = self
            .limits
            .run
            .is_some_and(|limit| self.started.elapsed() > limit);
        if overdue && self.stopping.is_none() {
            self.ended = Ended::TimedOut;
            self.stopping = Some(Instant::now());
            let _ = self.child.kill();
        }
        if self
            .stopping
            .is_some_and(|at| at.elapsed() > self.limits.cleanup)
        {
            let _ = self.child.kill();
        }
    }
}

/// Sends each line of `pipe` (without its `\n` or `\r\n`, as `BufRead::lines` gives it; invalid
/// UTF-8 replaced), then that it closed.
fn read_lines(pipe: impl Read, tx: &mpsc::Sender<Output>) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                if tx.send(Output::StderrLine(text)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Output::StderrClosed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    #[derive(Default)]
    struct Recorder {
        pid: Option<u32>,
        lines: Vec<String>,
        waits: usize,
        stop_after: Option<(usize, Stop)>,
        stopping: Vec<Stop>,
    }

    impl Watcher for Recorder {
        fn started(&mut self, pid: u32) {
            self.pid = Some(pid);
        }
        fn stderr_line(&mut self, line: &str) {
            self.lines.push(line.to_owned());
        }
        fn wait(&mut self, pause: Duration) -> io::Result<Option<Stop>> {
            self.waits += 1;
            std::thread::sleep(pause);
            Ok(self
                .stop_after
                .filter(|&(n, _)| self.waits >= n)
                .map(|(_, stop)| stop))
        }
        fn stopping(&mut self, stop: Stop) {
            self.stopping.push(stop);
        }
    }

    #[test]
    fn a_child_that_says_a_lot_runs_to_completion() {
        let mut watcher = Recorder::default();
        let script = "head -c 1000000 /dev/zero | tr '\\0' x; echo one >&2; echo two >&2; exit 3";
        let done = run(&mut sh(script), &Limits::default(), &mut watcher).unwrap();
        assert_eq!(done.status.code(), Some(3));
        assert_eq!(done.ended, Ended::Exited);
        assert_eq!(done.stdout.len(), 1_000_000);
        assert_eq!(done.stderr, "one\ntwo\n");
        assert_eq!(watcher.lines, ["one", "two"]);
        assert!(watcher.pid.is_some());
    }

    #[test]
    fn a_forwarded_signal_lets_the_child_clean_up() {
        let mut watcher = Recorder {
            stop_after: Some((2, Stop::Forward(libc::SIGTERM))),
            ..Recorder::default()
        };
        let script = "trap 'echo cleaned >&2; exit 7' TERM; echo up >&2; \
                      while :; do sleep 0.01; done";
        let done = run(&mut sh(script), &Limits::default(), &mut watcher).unwrap();
        assert_eq!(done.ended, Ended::Interrupted(libc::SIGTERM));
        assert_eq!(done.status.code(), Some(7));
        assert!(done.stderr.contains("cleaned"), "{:?}", done.stderr);
        // Asked again and again while the child cleans up, the run forwarded the signal once.
        assert_eq!(watcher.stopping, [Stop::Forward(libc::SIGTERM)]);
    }

    #[test]
    fn a_child_past_its_deadline_is_killed() {
        let limits = Limits {
            run: Some(Duration::from_millis(100)),
            ..Limits::default()
        };
        let started = Instant::now();
        let done = run(&mut sh("exec sleep 30"), &limits, &mut Sleeper).unwrap();
        assert_eq!(done.ended, Ended::TimedOut);
        assert!(done.status.code().is_none());
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn stderr_lines_lose_their_line_ends_as_with_buf_read_lines() {
        let mut watcher = Recorder::default();
        let script = "printf 'dos\\r\\nunix\\nlast\\r' >&2";
        let done = run(&mut sh(script), &Limits::default(), &mut watcher).unwrap();
        assert_eq!(watcher.lines, ["dos", "unix", "last\r"]);
        assert_eq!(done.stderr, "dos\nunix\nlast\r\n");
    }

    /// A watcher that cannot watch.
    struct Blind;

    impl Watcher for Blind {
        fn wait(&mut self, _pause: Duration) -> io::Result<Option<Stop>> {
            Err(io::Error::other("blind"))
        }
    }

    #[test]
    fn a_failing_watcher_ends_the_run_with_its_error() {
        let child = start(&mut sh("exec sleep 30")).unwrap();
        let pid = child.id() as i32;
        let err = watch(child, &Limits::default(), &mut Blind).unwrap_err();
        assert_eq!(err.to_string(), "blind");
        // The child was left as it was: still there to be signalled.
        crate::signals::send_signal(pid, libc::SIGKILL).unwrap();
    }

    #[test]
    fn a_kill_ends_the_run_at_once() {
        let mut watcher = Recorder {
            stop_after: Some((1, Stop::Kill(libc::SIGINT))),
            ..Recorder::default()
        };
        let done = run(&mut sh("exec sleep 30"), &Limits::default(), &mut watcher).unwrap();
        assert_eq!(done.ended, Ended::Interrupted(libc::SIGINT));
        assert!(done.status.code().is_none());
    }
}
