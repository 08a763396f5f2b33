//! Watching every router's table: one watcher per simulated host (this binary's hidden
//! `cluster-watch` role, run in the host's network namespace, since `router.ctl` answers only
//! root of the router's own namespace) asks its router for the table every
//! [`WATCH_INTERVAL`] (`ControlRequest::Table`, which costs a number when nothing changed) and
//! prints each change as one JSON line stamped with CLOCK_MONOTONIC, which every process of the
//! machine reads alike. The bench reads the lines of all watchers ([`Watchers`]) and keeps, per
//! router, when each address appeared and disappeared ([`View`]).

use freeflow_proto::clock::monotonic_ns;
use freeflow_proto::control::{self, ControlRequest, ControlResponse};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::signals::Interrupts;

/// How often a watcher asks its router: the resolution of every time the bench measures up to
/// "every router has seen it".
pub const WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// One change of a router's table, as a watcher prints it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Change {
    /// CLOCK_MONOTONIC (ns) when the watcher read the new table.
    pub t_ns: u64,
    pub pushes: u64,
    /// This host's containers in the table.
    pub local: usize,
    pub overlay_add: Vec<Ipv4Addr>,
    pub overlay_del: Vec<Ipv4Addr>,
    pub hosts_add: Vec<Ipv4Addr>,
    pub hosts_del: Vec<Ipv4Addr>,
}

/// The `cluster-watch DIR` role: follows the table of the router serving `dir` until killed
/// (the bench kills it; it also dies with the bench, PR_SET_PDEATHSIG) or until its output is
/// gone.
pub fn watch(dir: &Path) -> Result<(), String> {
    let ctl = freeflow_proto::paths::state_dir(dir).join(freeflow_proto::CONTROL_SOCKET);
    let mut pushes: Option<u64> = None;
    let mut overlay: HashSet<Ipv4Addr> = HashSet::new();
    let mut hosts: HashSet<Ipv4Addr> = HashSet::new();
    let mut out = std::io::stdout().lock();
    loop {
        // A router not up yet (or killed) is asked again at the next interval.
        let answer = control::call(
            &ctl,
            &ControlRequest::Table {
                unless_push: pushes,
            },
            Duration::from_secs(2),
        );
        if let Ok(ControlResponse::Table(table)) = answer {
            let t_ns = monotonic_ns();
            let (new_overlay, new_hosts): (HashSet<Ipv4Addr>, HashSet<Ipv4Addr>) =
                match &table.network {
                    Some(n) => (
                        n.overlay.iter().map(|o| o.ip).collect(),
                        n.hosts.iter().map(|h| h.host_ip).collect(),
                    ),
                    None => Default::default(),
                };
            let change = Change {
                t_ns,
                pushes: table.pushes,
                local: table.containers.len(),
                overlay_add: new_overlay.difference(&overlay).copied().collect(),
                overlay_del: overlay.difference(&new_overlay).copied().collect(),
                hosts_add: new_hosts.difference(&hosts).copied().collect(),
                hosts_del: hosts.difference(&new_hosts).copied().collect(),
            };
            let line = serde_json::to_string(&change).map_err(|e| e.to_string())?;
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
            pushes = Some(table.pushes);
            overlay = new_overlay;
            hosts = new_hosts;
        }
        std::thread::sleep(WATCH_INTERVAL);
    }
}

/// What one router holds, as its watcher saw it, with when each entry came and went.
#[derive(Debug, Default)]
pub struct View {
    /// Overlay addresses in the table, and when each appeared (ns).
    pub overlay: HashMap<Ipv4Addr, u64>,
    /// Other hosts in the table, and when each appeared.
    pub hosts: HashMap<Ipv4Addr, u64>,
    /// Overlay addresses and hosts that left the table, and when they last did.
    pub gone: HashMap<Ipv4Addr, u64>,
    pub local: usize,
    pub pushes: u64,
}

impl View {
    fn apply(&mut self, c: Change) {
        for ip in c.overlay_add {
            self.overlay.insert(ip, c.t_ns);
        }
        for ip in c.overlay_del {
            self.overlay.remove(&ip);
            self.gone.insert(ip, c.t_ns);
        }
        for ip in c.hosts_add {
            self.hosts.insert(ip, c.t_ns);
        }
        for ip in c.hosts_del {
            self.hosts.remove(&ip);
            self.gone.insert(ip, c.t_ns);
        }
        self.local = c.local;
        self.pushes = c.pushes;
    }
}

/// The watchers of all hosts and what they saw.
pub struct Watchers {
    children: Vec<Child>,
    events: Receiver<(usize, Change)>,
    pub views: Vec<View>,
}

impl Watchers {
    /// Starts one watcher per `(netns, dir)` of `hosts`, in order: view `i` is host `i`'s.
    pub fn start(hosts: &[(String, std::path::PathBuf)]) -> Result<Watchers, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let mut watchers = Watchers {
            children: Vec::new(),
            events: rx,
            views: hosts.iter().map(|_| View::default()).collect(),
        };
        for (index, (netns, dir)) in hosts.iter().enumerate() {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", netns])
                .arg(&exe)
                .arg("cluster-watch")
                .arg(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped());
            freeflow_os::process::die_with_parent_on_exec(&mut cmd, libc::SIGKILL);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("starting a watcher: {e}"))?;
            let stdout = child.stdout.take().ok_or("watcher without stdout")?;
            watchers.children.push(child);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let Ok(change) = serde_json::from_str::<Change>(&line) else {
                        continue;
                    };
                    if tx.send((index, change)).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(watchers)
    }

    /// Applies the changes that arrived, waiting up to `timeout` for the first.
    fn pump(&mut self, timeout: Duration) {
        match self.events.recv_timeout(timeout) {
            Ok((i, c)) => self.views[i].apply(c),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
        }
        while let Ok((i, c)) = self.events.try_recv() {
            self.views[i].apply(c);
        }
    }

    /// Waits until `done` holds of the views, at most `limit`; `what` names it in the error.
    pub fn wait_until(
        &mut self,
        stop: &Interrupts,
        limit: Duration,
        what: &str,
        done: impl Fn(&[View]) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if done(&self.views) {
                return Ok(());
            }
            stop.check()?;
            if Instant::now() > deadline {
                return Err(format!("{what}: not within {limit:?}"));
            }
            self.pump(Duration::from_millis(50));
        }
    }

    /// Stops every watcher (their routers are then left alone, as when idle).
    pub fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop();
    }
}
