//! `freeflow-bench idle`: what a router costs with many attached containers that do nothing.
//! Needs root: every container is a network namespace of its own, registered with the router,
//! with one process attached from inside it.

use crate::router::{cpu_time, PrivateRouter};
use freeflow_proto::control::{ContainerEntry, RouterStatus, ShardStatus};
use freeflow_proto::identity::NetnsId;
use freeflow_proto::report::{IdleReport, Progress};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Options {
    pub containers: usize,
    pub seconds: u64,
    pub router_core: usize,
}

/// Network namespaces and the processes attached from inside them; removed on drop.
struct Containers {
    names: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Containers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

pub fn run(opts: &Options, progress: &mut dyn FnMut(&Progress)) -> Result<IdleReport, String> {
    let router = PrivateRouter::start("idle", &opts.router_core.to_string())?;
    let mut containers = Containers {
        names: Vec::new(),
        children: Vec::new(),
    };
    let entries = add_namespaces(&mut containers, opts.containers)?;
    router.set_containers(entries)?;
    progress(&Progress::IdleAttaching {
        containers: opts.containers,
    });
    start_holders(&mut containers, &router, opts.seconds + 60)?;
    let attached = wait_attached(&router, opts.containers)?;
    // Let the shard finish its spin and park before measuring.
    std::thread::sleep(Duration::from_millis(200));
    progress(&Progress::IdleMeasuring {
        seconds: opts.seconds,
    });
    let before_status = router.status()?;
    let cpu_before = cpu_time(router.pid())?;
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(opts.seconds));
    let cpu = cpu_time(router.pid())?.saturating_sub(cpu_before);
    let elapsed = start.elapsed();
    let after_status = router.status()?;
    let sum = |s: &RouterStatus, f: fn(&ShardStatus) -> u64| s.shards.iter().map(f).sum::<u64>();
    drop(containers);
    Ok(IdleReport {
        experiment: "idle".into(),
        containers: opts.containers,
        attached,
        seconds: elapsed.as_secs_f64(),
        router_cpu_percent: 100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64(),
        router_core: opts.router_core,
        router_parks: sum(&after_status, |s| s.parks) - sum(&before_status, |s| s.parks),
        router_wakeups: sum(&after_status, |s| s.wakeups) - sum(&before_status, |s| s.wakeups),
    })
}

/// `count` network namespaces, each in `containers` once it exists; returns their registrations.
fn add_namespaces(
    containers: &mut Containers,
    count: usize,
) -> Result<Vec<ContainerEntry>, String> {
    let mut entries = Vec::new();
    for i in 0..count {
        let name = format!("ffidle-{}-{i}", std::process::id());
        ip(&["netns", "add", &name])?;
        containers.names.push(name.clone());
        let netns =
            NetnsId::of_path(&Path::new("/run/netns").join(&name)).map_err(|e| e.to_string())?;
        entries.push(ContainerEntry {
            name: format!("idle{i}"),
            tenant: "bench".into(),
            ip: Ipv4Addr::new(10, 40, (i / 250) as u8, (i % 250 + 1) as u8),
            netns,
        });
    }
    Ok(entries)
}

/// One holder (this binary's `hold` role) in each namespace, attached to `router` for up to
/// `seconds`.
fn start_holders(
    containers: &mut Containers,
    router: &PrivateRouter,
    seconds: u64,
) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    for name in &containers.names {
        let child = Command::new("ip")
            .args(["netns", "exec", name])
            .arg(&exe)
            .arg("hold")
            .arg(router.dir())
            .arg(seconds.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn holder: {e}"))?;
        containers.children.push(child);
    }
    Ok(())
}

/// Waits up to 30 s until `count` processes are attached to `router`; returns how many are.
fn wait_attached(router: &PrivateRouter, count: usize) -> Result<usize, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = router.status()?;
        if status.attached.len() >= count {
            return Ok(status.attached.len());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {count} containers attached within 30 s",
                status.attached.len(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The attached process of one idle container: attach, then sleep until killed or `seconds`.
pub fn hold(dir: &Path, seconds: u64) -> Result<(), String> {
    let session = freeflow_proto::attach::attach(
        dir,
        freeflow_proto::attach::ShimKind::Probe,
        Duration::from_secs(10),
    )
    .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline && !session.router_hung_up() {
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}
