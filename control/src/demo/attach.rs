//! Part 1 of the demo: a simulated two-host cluster with Freeflow on both hosts (the public
//! commands `freeflow up` and `container add`), each container attaching to its own host's
//! router (`freeflow-bench probe`), a stranger refused, and `freeflow status`; then all of it
//! removed.

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use freeflow_proto::report::ProbeReport;
use serde_json::{json, Value};

use super::child::{last_words, run_child, run_ok, succeeded, Finished};
use super::error::{io_err, DemoError};
use super::signals::Interrupt;
use super::steps::Steps;
use super::{topology, Cluster, ClusterSpec, Programs};

/// Overlay prefix of the simulated cluster.
const VNET: &str = "10.32.0.0/12";
/// The attach part's containers: name, host, overlay address.
const CONTAINERS: [(&str, usize, Ipv4Addr); 2] = [
    ("web", 0, Ipv4Addr::new(10, 32, 0, 2)),
    ("db", 1, Ipv4Addr::new(10, 32, 0, 4)),
];
/// Tenant of the demo's containers.
const TENANT: &str = "blue";
/// Round trips per attach probe: enough for a stable median, a few milliseconds.
const PROBE_SAMPLES: &str = "20000";
/// How long a container registration may take to reach its router before the probe counts as
/// failed (`container add` already waits for the daemon; this covers the router's table push).
const ATTACH_RETRY_FOR: Duration = Duration::from_secs(3);
/// Steps of the attach part: build, up, register, attach + status, remove.
pub(super) const ATTACH_STEPS: usize = 5;

/// Everything the attach part made; [`Made::remove`] (or drop) takes it all away.
struct Made {
    freeflow: PathBuf,
    cluster: Option<Cluster>,
    work: PathBuf,
    work_created: bool,
    /// Runtime directories `freeflow up` was run for (also if it failed half way).
    hosts_up: Vec<PathBuf>,
}

impl Made {
    /// Stops the daemons, removes the cluster and the directory; returns what went wrong.
    fn remove(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for dir in self.hosts_up.drain(..) {
            // In a process group of its own: a second Ctrl-C must not cut the clean-up short.
            let out = Command::new(&self.freeflow)
                .arg("down")
                .arg("--dir")
                .arg(&dir)
                .stdin(Stdio::null())
                .process_group(0)
                .output();
            match out {
                Ok(out) if out.status.success() => {}
                Ok(out) => problems.push(format!(
                    "freeflow down --dir {}: {}",
                    dir.display(),
                    last_words(&String::from_utf8_lossy(&out.stderr))
                )),
                Err(e) => problems.push(format!("freeflow down --dir {}: {e}", dir.display())),
            }
            // Its state directory (the default one: never one the user chose).
            let state = freeflow_proto::paths::default_state_dir(&dir);
            super::error::remove_leftover_dir(&state, &mut problems);
        }
        // Teardown also kills whatever still runs in the namespaces (a daemon `down` missed).
        if let Some(cluster) = self.cluster.take() {
            let tag = cluster.tag().to_owned();
            if let Err(e) = cluster.teardown() {
                problems.push(format!("{e} (try `freeflow cluster down --tag {tag}`)"));
            }
        }
        if std::mem::take(&mut self.work_created) {
            if let Err(e) = std::fs::remove_dir_all(&self.work) {
                problems.push(format!("removing {}: {e}", self.work.display()));
            }
        }
        problems
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        // Only reached on a panic; `remove` is the reporting variant.
        let _ = self.remove();
    }
}

/// What the attach part saw.
#[derive(Debug)]
pub(super) struct Attached {
    /// Each container's attachment (`freeflow-bench probe --json`), with its host.
    probes: Vec<(usize, ProbeReport)>,
    stranger_refused: String,
    status_text: String,
    status_json: Value,
}

impl Attached {
    /// The demo's `attach` JSON object.
    pub(super) fn to_json(&self) -> Value {
        json!({
            "containers": self.probes.iter().map(|(host, p)| json!({
                "host": host,
                "container": p.container,
                "tenant": p.tenant,
                "ip": p.ip,
                "shard": p.shard,
                "rtt_p50_ns": p.rtt_p50_ns,
                "rtt_p99_ns": p.rtt_p99_ns,
            })).collect::<Vec<_>>(),
            "stranger_refused": self.stranger_refused,
            "status": self.status_json,
        })
    }
}

/// Part 1 on cluster `tag`: builds it, shows the attachments (unless `json`), and removes all of
/// it, also when a step failed or a signal came.
pub(super) fn attach_part(
    tag: &str,
    programs: &Programs,
    json: bool,
    stop: &Interrupt,
    steps: &mut Steps,
) -> Result<Attached, DemoError> {
    let mut made = Made {
        freeflow: programs.freeflow.clone(),
        cluster: None,
        work: std::env::temp_dir().join(format!("freeflow-demo-{tag}")),
        work_created: false,
        hosts_up: Vec::new(),
    };
    let attached = attach_steps(&mut made, tag, programs, stop, steps);
    if let Ok(a) = &attached {
        if !json {
            print_attached(tag, a);
        }
    }
    steps.step(if stop.interrupted() {
        format!("interrupted: stopping Freeflow and removing cluster {tag}")
    } else {
        format!("stopping Freeflow on both hosts and removing cluster {tag}")
    });
    let problems = made.remove();
    match (attached, problems.is_empty()) {
        (Ok(a), true) => Ok(a),
        (Ok(_), false) => Err(DemoError::Cleanup(problems)),
        (Err(e), _) => {
            for p in problems {
                steps.note(format_args!("clean-up: {p}"));
            }
            Err(e)
        }
    }
}

/// The cluster's namespaces: the hosts', and the containers' (in the order of [`CONTAINERS`]).
struct Namespaces {
    hosts: Vec<String>,
    containers: Vec<PathBuf>,
}

fn attach_steps(
    made: &mut Made,
    tag: &str,
    programs: &Programs,
    stop: &Interrupt,
    steps: &mut Steps,
) -> Result<Attached, DemoError> {
    let freeflow = programs.freeflow.as_path();
    steps.step(format_args!(
        "building a simulated cluster (namespaces ff-{tag}-*): host 0 (192.168.1.1) and host 1 \
         (192.168.1.2) joined by a link, a VXLAN overlay {VNET}, containers web on host 0 and \
         db on host 1"
    ));
    let netns = build_cluster(made, tag)?;
    stop.check()?;

    steps.step("starting Freeflow on both hosts (freeflow up; one registry file for both)");
    let dirs = start_freeflow(made, &netns.hosts, freeflow, stop)?;

    steps.step(format_args!(
        "registering the containers (freeflow container add, tenant {TENANT})"
    ));
    register_containers(freeflow, &dirs, &netns.containers, stop)?;

    steps.step(
        "each container attaches to its own host's router; a stranger (a process in host 1's \
         own namespace) tries too",
    );
    let probes = probe_containers(tag, &programs.bench, &dirs, stop)?;
    let stranger_refused = probe_stranger(&programs.bench, &netns.hosts[1], &dirs[1], stop)?;
    let (status_text, status_json) = status_of(freeflow, &netns.hosts[0], &dirs[0], stop)?;
    Ok(Attached {
        probes,
        stranger_refused,
        status_text,
        status_json,
    })
}

/// The cluster, its containers and the demo's directory, each in `made` once it exists.
fn build_cluster(made: &mut Made, tag: &str) -> Result<Namespaces, DemoError> {
    let mut cluster = Cluster::create(ClusterSpec::new(tag, 2))?;
    for (name, host, ip) in CONTAINERS {
        cluster.add_container(host, name, ip, 12)?;
    }
    let hosts: Vec<String> = cluster.hosts().iter().map(|h| h.netns.clone()).collect();
    let containers: Vec<PathBuf> = CONTAINERS
        .iter()
        .map(|(name, ..)| cluster.container(name).map(|c| c.netns_path.clone()))
        .collect::<Result<_, _>>()?;
    made.cluster = Some(cluster);
    std::fs::create_dir(&made.work)
        .and_then(|()| std::fs::set_permissions(&made.work, std::fs::Permissions::from_mode(0o755)))
        .map_err(io_err(format!("cannot create {}", made.work.display())))?;
    made.work_created = true;
    Ok(Namespaces { hosts, containers })
}

/// `freeflow up` in each host's namespace, one registry file for both; returns the runtime
/// directories, host by host.
fn start_freeflow(
    made: &mut Made,
    hosts: &[String],
    freeflow: &Path,
    stop: &Interrupt,
) -> Result<Vec<PathBuf>, DemoError> {
    let dirs: Vec<PathBuf> = (0..2).map(|h| made.work.join(format!("h{h}"))).collect();
    let registry = format!("file:{}", made.work.join("registry.json").display());
    for (h, netns) in hosts.iter().enumerate() {
        made.hosts_up.push(dirs[h].clone());
        run_ok(
            topology::command_in(netns, &freeflow.to_string_lossy())
                .arg("up")
                .arg("--dir")
                .arg(&dirs[h])
                .args(["--host-ip", &topology::host_ip(h).to_string()])
                .args(["--vnet-prefix", VNET, "--registry", &registry]),
            stop,
        )?;
    }
    Ok(dirs)
}

/// `freeflow container add` for each container, with its host's directory.
fn register_containers(
    freeflow: &Path,
    dirs: &[PathBuf],
    netns: &[PathBuf],
    stop: &Interrupt,
) -> Result<(), DemoError> {
    for ((name, host, ip), netns) in CONTAINERS.iter().zip(netns) {
        run_ok(
            Command::new(freeflow)
                .args(["container", "add", name, "--dir"])
                .arg(&dirs[*host])
                .arg("--netns")
                .arg(netns)
                .args(["--ip", &ip.to_string(), "--tenant", TENANT]),
            stop,
        )?;
    }
    Ok(())
}

/// `freeflow-bench probe --json` in each container, against its own host's router.
fn probe_containers(
    tag: &str,
    bench: &Path,
    dirs: &[PathBuf],
    stop: &Interrupt,
) -> Result<Vec<(usize, ProbeReport)>, DemoError> {
    let mut probes = Vec::new();
    for (name, host, _) in CONTAINERS {
        let netns = topology::container_netns(tag, name);
        let out = retry_for(ATTACH_RETRY_FOR, stop, || {
            run_child(
                topology::command_in(&netns, &bench.to_string_lossy())
                    .arg("probe")
                    .arg(&dirs[host])
                    .args(["--json", "--samples", PROBE_SAMPLES]),
                stop,
                &mut |_| (),
            )
        })?;
        let probe: ProbeReport = serde_json::from_str(out.trim()).map_err(|e| {
            DemoError::Unexpected(format!("freeflow-bench probe printed {out:?}: {e}"))
        })?;
        probes.push((host, probe));
    }
    Ok(probes)
}

/// A probe from host 1's own namespace, which is no registered container: the router must
/// refuse it. Returns the reason it gave.
fn probe_stranger(
    bench: &Path,
    host_netns: &str,
    dir: &Path,
    stop: &Interrupt,
) -> Result<String, DemoError> {
    let stranger = run_child(
        topology::command_in(host_netns, &bench.to_string_lossy())
            .arg("probe")
            .arg(dir)
            .args(["--samples", "10"]),
        stop,
        &mut |_| (),
    )?;
    if stranger.status.success() {
        return Err(DemoError::Unexpected(format!(
            "host 1's own namespace is not a registered container, yet its router let it attach: {}",
            stranger.stdout.trim()
        )));
    }
    Ok(last_words(&stranger.stderr)
        .trim_start_matches("freeflow-bench: ")
        .to_owned())
}

/// `freeflow status` of the host with runtime directory `dir`, as text and as JSON, asked in
/// the host's network namespace `host` (its router answers only there).
fn status_of(
    freeflow: &Path,
    host: &str,
    dir: &Path,
    stop: &Interrupt,
) -> Result<(String, Value), DemoError> {
    let freeflow = freeflow.to_string_lossy();
    let text = run_ok(
        topology::command_in(host, &freeflow)
            .arg("status")
            .arg("--dir")
            .arg(dir),
        stop,
    )?;
    let json = run_ok(
        topology::command_in(host, &freeflow)
            .arg("status")
            .arg("--dir")
            .arg(dir)
            .arg("--json"),
        stop,
    )?;
    let json = serde_json::from_str(json.trim()).unwrap_or(Value::Null);
    Ok((text, json))
}

/// Runs `attempt` until it succeeds or `limit` has passed (the last failure is the error); a
/// registration can take a moment to reach the router.
fn retry_for(
    limit: Duration,
    stop: &Interrupt,
    mut attempt: impl FnMut() -> Result<Finished, DemoError>,
) -> Result<String, DemoError> {
    let deadline = Instant::now() + limit;
    loop {
        let finished = attempt()?;
        if finished.status.success() || Instant::now() >= deadline {
            return succeeded(finished, "freeflow-bench probe");
        }
        if stop.poll(Duration::from_millis(200))?.is_some() {
            stop.check()?;
        }
    }
}

fn print_attached(tag: &str, a: &Attached) {
    let mut out = io::stdout().lock();
    let _ = writeln!(
        out,
        "\nSimulated cluster {tag}: two hosts, Freeflow on both, containers of tenant {TENANT}"
    );
    for (host, p) in &a.probes {
        let _ = writeln!(
            out,
            "  {:<5} ({}, host {host}) attached to its host's router (shard {}): round trip \
             through shared memory p50 {} ns, p99 {} ns",
            p.container, p.ip, p.shard, p.rtt_p50_ns, p.rtt_p99_ns
        );
    }
    let _ = writeln!(
        out,
        "  a stranger (host 1's own namespace, not a registered container) was refused: {}",
        a.stranger_refused
    );
    let _ = writeln!(out, "\n$ freeflow status   (host 0)");
    for line in a.status_text.lines() {
        let _ = writeln!(out, "  {line}");
    }
    let _ = out.flush();
}
