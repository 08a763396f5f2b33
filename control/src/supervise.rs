//! Supervision of `freeflow-router`: starting it with a readiness pipe, telling why it ended,
//! and the restart backoff. Its system calls are [`crate::os`]'s.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use freeflow_proto::control::{self, ControlRequest, ControlResponse, RouterStatus};

use crate::os;

/// Errors while starting or stopping the router.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The router binary is not where we looked.
    #[error(
        "router binary {} not found: build it (`cargo build --workspace`), install it next to \
         the freeflow executable, or set $FREEFLOW_ROUTER",
        .0.display()
    )]
    RouterMissing(PathBuf),
    /// A system call failed while preparing or spawning the router.
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        /// The router binary.
        program: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The router ended before it reported ready.
    #[error("the router {reason} before it was ready: {detail}")]
    DiedStarting {
        /// How it ended ("exited with status 1", "was killed by signal 9 (SIGKILL)").
        reason: String,
        /// Its last log line, or where to look.
        detail: String,
    },
    /// The router did not report ready in time and was killed.
    #[error("the router did not report ready within {0:?} and was killed; see its log")]
    NotReady(Duration),
    /// A termination signal arrived while waiting for the router.
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
    /// Waiting for the router failed.
    #[error("waiting for the router: {0}")]
    Wait(#[source] io::Error),
}

/// Where the router binary is: `$FREEFLOW_ROUTER`, else `freeflow-router` next to the running
/// executable.
pub fn router_program() -> Result<PathBuf, SuperviseError> {
    if let Some(path) = std::env::var_os("FREEFLOW_ROUTER").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(SuperviseError::RouterMissing(path))
        };
    }
    let path = sibling_of_exe("freeflow-router");
    if path.is_file() {
        Ok(path)
    } else {
        Err(SuperviseError::RouterMissing(path))
    }
}

/// `name` in the directory of the running executable.
pub fn sibling_of_exe(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// How to run the router.
#[derive(Debug, Clone)]
pub struct RouterSpec {
    /// The binary.
    pub program: PathBuf,
    /// Its runtime directory (`--dir`).
    pub dir: PathBuf,
    /// Its state directory (`--state-dir`), where its control socket and lock go.
    pub state_dir: PathBuf,
    /// `--cores`, if the user chose.
    pub cores: Option<String>,
    /// `--rdma-device`, if the user chose one.
    pub rdma_device: Option<String>,
    /// File its stdout and stderr are appended to.
    pub log: PathBuf,
}

/// A running router: our child (not reaped yet, so its pid cannot be reused while we hold it),
/// or one an earlier daemon started that this one adopted (watched through a pidfd, which names
/// that process however its pid is reused).
#[derive(Debug)]
pub struct Router {
    process: RouterProcess,
    /// Process id.
    pub pid: u32,
    /// When it was started (monotonic; for an adopted router, as its uptime says).
    pub started: Instant,
    /// When it was started (wall clock, ms since the epoch).
    pub started_unix_ms: u64,
}

#[derive(Debug)]
enum RouterProcess {
    /// Started by this daemon.
    Child(Child),
    /// Started by an earlier daemon: not our child, so its exit status is not ours to learn.
    Adopted(os::Pidfd),
}

/// How a router ended.
#[derive(Debug, Clone, Copy)]
pub enum RouterExit {
    /// Our child: its status, from waitpid.
    Status(ExitStatus),
    /// An adopted router: it is gone, but only its parent could learn how.
    NotOurChild,
}

impl RouterExit {
    /// How it ended, in words.
    pub fn reason(&self) -> String {
        match self {
            RouterExit::Status(status) => exit_reason(*status),
            RouterExit::NotOurChild => "exited (not our child: status unknown)".to_owned(),
        }
    }

    /// Whether it exited by itself with a status (then its last log line says why).
    pub fn exited_with_code(&self) -> bool {
        matches!(self, RouterExit::Status(status) if status.code().is_some())
    }
}

impl Router {
    /// Starts the router and waits until it writes its ready line (or `timeout` passes, or
    /// it dies, or a termination signal shows up on `signals`).
    ///
    /// The router runs in a session of its own and is not told when this process dies (no
    /// PR_SET_PDEATHSIG): a daemon killed with SIGKILL leaves it serving, and the next daemon
    /// adopts it ([`Router::adopt`]).
    pub fn start(
        spec: &RouterSpec,
        timeout: Duration,
        signals: &os::SignalFd,
    ) -> Result<Router, SuperviseError> {
        let spawn_error = |source| SuperviseError::Spawn {
            program: spec.program.clone(),
            source,
        };
        let (mut ours, theirs) = UnixStream::pair().map_err(spawn_error)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(spawn_error)?;
        let mut cmd = Command::new(&spec.program);
        cmd.arg("--dir")
            .arg(&spec.dir)
            .arg("--state-dir")
            .arg(&spec.state_dir)
            .arg("--ready-fd")
            .arg(theirs.as_raw_fd().to_string());
        if let Some(cores) = &spec.cores {
            cmd.arg("--cores").arg(cores);
        }
        if let Some(device) = &spec.rdma_device {
            cmd.arg("--rdma-device").arg(device);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_error)?)
            .stderr(log);
        os::prepare_router_child(&mut cmd, theirs.as_raw_fd());
        let log_start = std::fs::metadata(&spec.log).map(|m| m.len()).unwrap_or(0);
        let started = Instant::now();
        let child = cmd.spawn().map_err(spawn_error)?;
        // Only the router holds the write end now: its death closes the pipe.
        drop(theirs);
        let mut router = Router {
            pid: child.id(),
            process: RouterProcess::Child(child),
            started,
            started_unix_ms: unix_ms_now(),
        };
        match router.wait_ready(&mut ours, timeout, signals) {
            Ok(()) => Ok(router),
            Err(SuperviseError::DiedStarting { reason, .. }) => {
                router.kill_and_reap();
                let detail = last_log_line(&spec.log, log_start, "freeflow-router")
                    .unwrap_or_else(|| format!("nothing in {}", spec.log.display()));
                Err(SuperviseError::DiedStarting { reason, detail })
            }
            Err(e) => {
                router.kill_and_reap();
                Err(e)
            }
        }
    }

    /// Takes over the router `pid` that an earlier daemon started and left running: it must
    /// answer `control_socket` with that very pid, before and after we open a pidfd for it
    /// (so the pidfd names the process that answers, not a stranger that got a reused pid).
    pub fn adopt(pid: u32, control_socket: &Path, timeout: Duration) -> Result<Router, String> {
        let ask = || -> Result<RouterStatus, String> {
            match control::call(control_socket, &ControlRequest::Status, timeout) {
                Ok(ControlResponse::Status(status)) if status.pid == pid => Ok(status),
                Ok(ControlResponse::Status(status)) => Err(format!(
                    "{} is answered by pid {}, not by the recorded router pid {pid}",
                    control_socket.display(),
                    status.pid
                )),
                Ok(other) => Err(format!("unexpected answer from the router: {other:?}")),
                Err(e) => Err(format!("{}: {e}", control_socket.display())),
            }
        };
        ask()?;
        let pidfd = os::Pidfd::open(pid as i32).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
        let status = ask()?;
        if pidfd.has_exited().unwrap_or(true) {
            return Err(format!("router pid {pid} exited while being adopted"));
        }
        let uptime = Duration::from_millis(status.uptime_ms);
        Ok(Router {
            process: RouterProcess::Adopted(pidfd),
            pid,
            started: Instant::now()
                .checked_sub(uptime)
                .unwrap_or_else(Instant::now),
            started_unix_ms: unix_ms_now().saturating_sub(status.uptime_ms),
        })
    }

    /// Whether this router was adopted (an earlier daemon started it).
    pub fn adopted(&self) -> bool {
        matches!(self.process, RouterProcess::Adopted(_))
    }

    /// A descriptor that becomes readable when an adopted router exits (no SIGCHLD comes for
    /// a process that is not our child); `None` for our own child.
    pub fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.process {
            RouterProcess::Adopted(pidfd) => Some(pidfd.as_fd()),
            RouterProcess::Child(_) => None,
        }
    }

    fn child(&mut self) -> Option<&mut Child> {
        match &mut self.process {
            RouterProcess::Child(child) => Some(child),
            RouterProcess::Adopted(_) => None,
        }
    }

    fn wait_ready(
        &mut self,
        pipe: &mut UnixStream,
        timeout: Duration,
        signals: &os::SignalFd,
    ) -> Result<(), SuperviseError> {
        let deadline = Instant::now() + timeout;
        let mut line = Vec::new();
        pipe.set_nonblocking(true).map_err(SuperviseError::Wait)?;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(SuperviseError::NotReady(timeout));
            }
            let ready = os::poll_readable(&[pipe.as_fd(), signals.as_fd()], deadline - now)
                .map_err(SuperviseError::Wait)?;
            if ready[1] {
                if let Some(sig) = signals
                    .drain()
                    .map_err(SuperviseError::Wait)?
                    .into_iter()
                    .find(|s| os::TERMINATION_SIGNALS.contains(s))
                {
                    return Err(SuperviseError::Interrupted(sig));
                }
            }
            if !ready[0] {
                continue;
            }
            let mut buf = [0u8; 64];
            match pipe.read(&mut buf) {
                Ok(0) => {
                    // Closed without a ready line: it is exiting. Give it a moment to finish.
                    let reason = match self.wait_bounded(Duration::from_secs(1)) {
                        Some(exit) => exit.reason(),
                        None => "closed its ready pipe".to_owned(),
                    };
                    return Err(SuperviseError::DiedStarting {
                        reason,
                        detail: String::new(),
                    });
                }
                Ok(n) => {
                    line.extend_from_slice(&buf[..n]);
                    if line.contains(&b'\n') {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SuperviseError::Wait(e)),
            }
        }
    }

    /// Non-blocking: `Some(how)` once it has ended (our child is reaped then).
    pub fn try_wait(&mut self) -> io::Result<Option<RouterExit>> {
        match &mut self.process {
            RouterProcess::Child(child) => Ok(child.try_wait()?.map(RouterExit::Status)),
            RouterProcess::Adopted(pidfd) => {
                Ok(pidfd.has_exited()?.then_some(RouterExit::NotOurChild))
            }
        }
    }

    /// Reaps it (or, adopted, sees it gone) if it ends within `limit`.
    fn wait_bounded(&mut self, limit: Duration) -> Option<RouterExit> {
        if let RouterProcess::Adopted(pidfd) = &self.process {
            return matches!(pidfd.wait_exit(limit), Ok(true)).then_some(RouterExit::NotOurChild);
        }
        let deadline = Instant::now() + limit;
        loop {
            match self.try_wait() {
                Ok(Some(exit)) => return Some(exit),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return None,
            }
        }
    }

    /// Sends `signal`: through the pidfd to an adopted router; by pid to our child (not
    /// reaped yet, so the pid still names it).
    fn signal(&mut self, signal: i32) -> io::Result<()> {
        match &self.process {
            RouterProcess::Adopted(pidfd) => pidfd.send_signal(signal),
            RouterProcess::Child(_) => os::send_signal(self.pid as i32, signal),
        }
    }

    /// SIGKILL and reap (bounded: a killed process goes away unless stuck in the kernel).
    pub fn kill_and_reap(&mut self) -> Option<RouterExit> {
        if let Ok(Some(exit)) = self.try_wait() {
            return Some(exit);
        }
        match self.child() {
            Some(child) => {
                let _ = child.kill();
            }
            None => {
                let _ = self.signal(libc::SIGKILL);
            }
        }
        self.wait_bounded(Duration::from_secs(5))
    }

    /// Stops it: SIGTERM, up to `grace` to exit, then SIGKILL. Returns how it ended and
    /// whether it had to be killed.
    pub fn stop(&mut self, grace: Duration) -> (Option<RouterExit>, bool) {
        if let Ok(Some(exit)) = self.try_wait() {
            return (Some(exit), false);
        }
        if self.signal(libc::SIGTERM).is_ok() {
            if let Some(exit) = self.wait_bounded(grace) {
                return (Some(exit), false);
            }
        }
        (self.kill_and_reap(), true)
    }
}

/// How a process ended, in words.
pub fn exit_reason(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        format!(
            "was killed by signal {sig} ({}){}",
            signal_name(sig),
            if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            }
        )
    } else {
        format!("ended ({status})")
    }
}

/// The usual name of a signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGSYS => "SIGSYS",
        _ => "unknown signal",
    }
}

/// Delay before restarting a router that died: the first restart is immediate, each further
/// quick failure doubles the delay from [`Backoff::MIN`] up to [`Backoff::MAX`], and a router
/// that stayed up for [`Backoff::HEALTHY_AFTER`] resets the sequence.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    /// Failures since the last healthy run.
    consecutive: u32,
}

impl Backoff {
    /// Delay of the second restart in a row.
    pub const MIN: Duration = Duration::from_millis(50);
    /// Longest delay.
    pub const MAX: Duration = Duration::from_secs(5);
    /// A router up this long counts as healthy.
    pub const HEALTHY_AFTER: Duration = Duration::from_secs(10);

    /// The delay before the next start, given how long the router that just ended was up
    /// (`Duration::ZERO` for a start that failed).
    pub fn next_delay(&mut self, uptime: Duration) -> Duration {
        if uptime >= Self::HEALTHY_AFTER {
            self.consecutive = 0;
        }
        let delay = match self.consecutive {
            0 => Duration::ZERO,
            n => Self::MIN
                .checked_mul(1u32 << (n - 1).min(16))
                .unwrap_or(Self::MAX)
                .min(Self::MAX),
        };
        self.consecutive = self.consecutive.saturating_add(1);
        delay
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2024-05-01T12:00:00.123Z` for a time in ms since the epoch (UTC, proleptic Gregorian).
pub fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// `850ms`, `12.3s`, `5m 03s`, `2h 05m`, `3d 04h`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h {:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600)
    }
}

/// The last non-empty line of a log file that starts with `prefix` (or any line if `prefix`
/// is empty), looking only at the file's last 16 KiB and, if given, only after byte `from`.
pub fn last_log_line(path: &Path, from: u64, prefix: &str) -> Option<String> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let start = from.max(len.saturating_sub(16 * 1024));
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut text = String::new();
    file.take(16 * 1024).read_to_string(&mut text).ok()?;
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && l.contains(prefix))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_resets() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(100);
        let delays: Vec<u128> = (0..10).map(|_| b.next_delay(quick).as_millis()).collect();
        assert_eq!(delays, [0, 50, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.next_delay(Backoff::HEALTHY_AFTER), Duration::ZERO);
        assert_eq!(b.next_delay(Duration::ZERO), Backoff::MIN);
        for _ in 0..100 {
            assert!(b.next_delay(Duration::ZERO) <= Backoff::MAX);
        }
    }

    #[test]
    fn time_formats() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_unix_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            format_unix_ms(1_714_564_800_000),
            "2024-05-01T12:00:00.000Z"
        );
        assert_eq!(format_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(format_duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(format_duration(Duration::from_secs(303)), "5m 03s");
        assert_eq!(format_duration(Duration::from_secs(7500)), "2h 05m");
    }

    #[test]
    fn exit_reasons() {
        assert_eq!(
            exit_reason(ExitStatus::from_raw(1 << 8)),
            "exited with status 1"
        );
        assert_eq!(
            exit_reason(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
    }
}
