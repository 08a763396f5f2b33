//! The processes the cluster bench runs besides Freeflow's: etcd in host 0's namespace, the
//! attached holders of the big host; and what /proc says about a process (RSS, CPU time).

use crate::signals::Interrupts;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// etcd's client and peer ports on host 0's link address.
pub const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
/// How long etcd may take to answer its health check.
const ETCD_START_LIMIT: Duration = Duration::from_secs(30);

/// Debian's etcd (etcd-server 3.4), one member, in a host's namespace with its data on tmpfs;
/// killed when dropped (and with the bench: PR_SET_PDEATHSIG).
pub struct Etcd {
    netns: String,
    ip: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    pub fn new(netns: &str, ip: &str, work: &Path) -> Etcd {
        Etcd {
            netns: netns.to_owned(),
            ip: ip.to_owned(),
            data_dir: work.join("etcd-data"),
            log: work.join("etcd.log"),
            child: None,
        }
    }

    /// `IP:PORT` of its client port.
    pub fn endpoint(&self) -> String {
        format!("{}:{ETCD_CLIENT_PORT}", self.ip)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it (on the data it has, if any) and waits until it answers its health check;
    /// returns how long that took.
    pub fn start(&mut self, stop: &Interrupts) -> Result<Duration, String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let client = format!("http://{}:{ETCD_CLIENT_PORT}", self.ip);
        let peer = format!("http://{}:{ETCD_PEER_PORT}", self.ip);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, "etcd", "--name", "ffbench"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("ffbench={peer}")])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        freeflow_os::process::die_with_parent_on_exec(&mut cmd, libc::SIGKILL);
        let started = Instant::now();
        self.child =
            Some(cmd.spawn().map_err(|e| {
                format!("cannot run etcd (Debian: apt-get install etcd-server): {e}")
            })?);
        while started.elapsed() < ETCD_START_LIMIT {
            stop.check()?;
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status}; see {}",
                    self.log.display()
                ));
            }
            if self.healthy() {
                return Ok(started.elapsed());
            }
            stop.sleep(Duration::from_millis(50))?;
        }
        Err(format!(
            "etcd was not healthy after {ETCD_START_LIMIT:?}; see {}",
            self.log.display()
        ))
    }

    /// Whether etcd answers `GET /health` with `"health":"true"` (curl in its namespace).
    fn healthy(&self) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "curl",
                "-s",
                "--max-time",
                "2",
            ])
            .arg(format!("http://{}/health", self.endpoint()))
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("\"health\":\"true\""))
    }

    /// SIGKILL: nothing it has not made durable survives.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Processes attached to a router, one per container namespace (this binary's `cluster-hold`
/// role): each prints how long its attach took, then holds the attachment until its stdin
/// closes. Killed when dropped.
#[derive(Default)]
pub struct Holders {
    children: Vec<(Child, Option<ChildStdin>)>,
}

impl Holders {
    /// Starts a holder in `netns` attaching as `kind` (`verbs` or `socket`) to the router of
    /// `dir`, and returns its attach time once it reports it.
    pub fn attach(&mut self, netns: &str, dir: &Path, kind: &str) -> Result<Duration, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(exe)
            .arg("cluster-hold")
            .arg(dir)
            .arg(kind)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        freeflow_os::process::die_with_parent_on_exec(&mut cmd, libc::SIGKILL);
        let mut child = cmd.spawn().map_err(|e| format!("starting a holder: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        self.children.push((child, stdin));
        let mut line = String::new();
        if let Some(out) = stdout {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let ns: u64 = line
            .trim()
            .parse()
            .map_err(|_| format!("holder in {netns} did not attach: {:?}", line.trim()))?;
        Ok(Duration::from_nanos(ns))
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for (child, stdin) in &mut self.children {
            drop(stdin.take());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `cluster-hold DIR KIND` role: attaches to the router of `dir` from this namespace as a
/// verbs shim (rings in a shared region) or a socket shim, prints the attach time (ns), then
/// holds the attachment until stdin closes.
pub fn hold(dir: &Path, kind: &str) -> Result<(), String> {
    use freeflow_proto::attach::{attach, attach_socket, ShimKind};
    let limit = Duration::from_secs(10);
    let started = Instant::now();
    let session: Box<dyn std::any::Any> = match kind {
        "verbs" => Box::new(attach(dir, ShimKind::Verbs, limit).map_err(|e| e.to_string())?),
        "socket" => Box::new(attach_socket(dir, limit).map_err(|e| e.to_string())?),
        other => return Err(format!("unknown attach kind {other:?}")),
    };
    let took = started.elapsed();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", took.as_nanos())
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(session);
    Ok(())
}

/// What /proc says of one process: resident memory (KiB, and its shared-memory part) and CPU
/// time so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub rss_kib: u64,
    pub rss_shmem_kib: u64,
    pub cpu: Duration,
}

pub fn usage(pid: u32) -> Result<Usage, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok(Usage {
        rss_kib: field("VmRSS:"),
        rss_shmem_kib: field("RssShmem:"),
        cpu: crate::router::cpu_time(pid)?,
    })
}

/// A pid from a pid file.
pub fn read_pid(path: &Path) -> Result<u32, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .trim()
        .parse()
        .map_err(|_| format!("{}: not a pid", path.display()))
}
