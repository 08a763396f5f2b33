//! A real etcd server for tests: Debian's `etcd` (etcd-server 3.4) started from the command line
//! on free loopback ports with its own data directory, killed when dropped or when the thread
//! that started it ends (PR_SET_PDEATHSIG): keep the server in the test function that uses it.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long etcd may take to answer its health check after starting.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting on fresh ports (another process may take a port we picked).
const START_ATTEMPTS: u32 = 3;

/// One etcd member serving on loopback; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    /// The network namespace etcd runs in (`None`: the caller's).
    netns: Option<String>,
    /// The address it listens on.
    ip: Ipv4Addr,
    data_dir: PathBuf,
    log: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd with its data in `dir/data` and its output in `dir/etcd.log`, and waits until
    /// it is healthy. Panics (the tests' way to fail) when etcd is missing or does not come up.
    pub fn start(dir: &Path) -> EtcdServer {
        crate::test_support::require_programs(&["etcd"], "etcd-server");
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut server = EtcdServer {
                netns: None,
                ip: Ipv4Addr::LOCALHOST,
                data_dir: dir.join("data"),
                log: dir.join("etcd.log"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            };
            match server.launch() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("etcd did not start: {last}");
    }

    /// Starts etcd in the network namespace `netns` (of a simulated host), listening on `ip`
    /// ports 2379 and 2380 (a fresh namespace has them free), data in `dir/data`.
    pub fn start_in_netns(dir: &Path, netns: &str, ip: Ipv4Addr) -> EtcdServer {
        crate::test_support::require_programs(&["etcd", "curl"], "etcd-server curl");
        let mut server = EtcdServer {
            netns: Some(netns.to_owned()),
            ip,
            data_dir: dir.join("data"),
            log: dir.join("etcd.log"),
            client_port: 2379,
            peer_port: 2380,
            child: None,
        };
        if let Err(e) = server.launch() {
            panic!("etcd did not start in {netns}: {e}");
        }
        server
    }

    /// The client address, `IP:PORT`.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.ip, self.client_port)
    }

    /// A registry URL for this server under `prefix` (for example `/test1`).
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}{prefix}", self.endpoint())
    }

    /// Kills etcd (SIGKILL, no chance to flush anything it has not made durable) and waits for
    /// it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory (after [`EtcdServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.launch() {
            panic!("etcd did not restart: {e}");
        }
    }

    /// etcd's output so far, for failure messages.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn launch(&mut self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let client = format!("http://{}:{}", self.ip, self.client_port);
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let mut command = match &self.netns {
            Some(netns) => crate::command_in(netns, "etcd"),
            None => Command::new("etcd"),
        };
        // Killed with this thread (the test that owns the server), even when the test process
        // is killed: no etcd outlives its test.
        freeflow_os::process::die_with_parent_on_exec(&mut command, libc::SIGKILL);
        let child = command
            .arg("--name")
            .arg("ff-test")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("ff-test={peer}")])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot run etcd: {e}"))?;
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < START_TIMEOUT {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "etcd exited with {status}; its log:\n{}",
                        self.log_text()
                    ));
                }
            }
            if self.healthy() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(format!(
            "etcd was not healthy after {START_TIMEOUT:?}; its log:\n{}",
            self.log_text()
        ))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

impl EtcdServer {
    /// Whether etcd answers `GET /health` with `"health":"true"` (asked with curl inside its
    /// namespace when it runs in one).
    fn healthy(&self) -> bool {
        match &self.netns {
            None => healthy_here(self.ip, self.client_port),
            Some(netns) => crate::command_in(netns, "curl")
                .args(["-s", "--max-time", "2"])
                .arg(format!("http://{}/health", self.endpoint()))
                .output()
                .is_ok_and(|out| {
                    String::from_utf8_lossy(&out.stdout).contains("\"health\":\"true\"")
                }),
        }
    }
}

/// Whether etcd at `ip:port`, reachable from here, answers `GET /health` with
/// `"health":"true"`.
fn healthy_here(ip: Ipv4Addr, port: u16) -> bool {
    let addr = SocketAddr::from((ip, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.take(64 << 10).read_to_string(&mut answer);
    answer.starts_with("HTTP/1.") && answer.contains("\"health\":\"true\"")
}
