//! Part 3b of the demo: RDMA across two simulated hosts, by the sibling binary
//! `freeflow-bench rdma --hosts 2 --json --progress-json`, which builds and removes a cluster of
//! its own (a container on each host, each host's router on a core of its own when there are
//! two), and measures the host link's TCP floor in the same run. A short run: the demo's part
//! stays within about 20 s.

use std::process::Command;

use freeflow_proto::report::{Progress, RdmaHostsReport};
use serde_json::Value;

use super::cluster_bench::ClusterBench;
use super::error::DemoError;
use super::signals::Interrupt;
use super::steps::Steps;
use super::{DemoArgs, Programs};

/// Sizes of one repetition: a fraction of a second in a release build on this VM (routers on
/// two cores, other builds running), about 15 s in a debug build (the demo test's), whose
/// router is some 30x slower across hosts.
const MESSAGES: &str = "50000";
const SAMPLES: &str = "1000";
const BW_OPS: &str = "2000";
const TCP_SECONDS: &str = "0.3";
const CM_CONNECTIONS: &str = "50";
/// Fixed steps of the cross-host comparison (build, remove); each repetition adds one.
pub(super) const RDMA_HOSTS_FIXED_STEPS: usize = 2;

/// Our step line for one of freeflow-bench's stderr lines (`None`: not one of its progress
/// events).
fn rdma_hosts_step(line: &str, tag: &str) -> Option<String> {
    Some(match Progress::from_line(line)? {
        Progress::RdmaHostsBuilding { router_cores } => format!(
            "RDMA across hosts: building a two-host cluster (namespaces ff-{tag}-*), Freeflow on \
             both, routers on cores {router_cores:?}; a C program in a container on host 0, its \
             peer on host 1"
        ),
        Progress::RdmaHostsRepetition { rep, of } => format!(
            "RDMA across hosts, repetition {rep}/{of}: SEND and WRITE rates, round trips, 64 KiB \
             WRITE bandwidth; then the host link's TCP ping-pong and stream"
        ),
        Progress::RdmaHostsRemoving => "RDMA across hosts: removing its cluster".to_owned(),
        _ => return None,
    })
}

/// Runs `freeflow-bench rdma --hosts 2` on cluster `tag`; returns its report as it printed it
/// and as the shared type, which the table reads.
pub(super) fn rdma_hosts_part(
    tag: &str,
    args: &DemoArgs,
    programs: &Programs,
    stop: &Interrupt,
    steps: &mut Steps,
) -> Result<(Value, RdmaHostsReport), DemoError> {
    let mut cmd = Command::new(&programs.bench);
    cmd.args(["rdma", "--hosts", "2", "--json", "--progress-json"])
        .args(["--reps", &args.reps.to_string()])
        .args(["--messages", MESSAGES, "--samples", SAMPLES])
        .args(["--bw-ops", BW_OPS, "--tcp-seconds", TCP_SECONDS])
        .args(["--cm-connections", CM_CONNECTIONS])
        .args(["--tag", tag]);
    let bench = ClusterBench {
        part: "rdma --hosts 2",
        tag,
        // bench/src/rdma_hosts.rs `work_dir`.
        work_dir_name: format!("freeflow-bench-rdma-hosts-{tag}"),
    };
    let (json, report): (Value, RdmaHostsReport) =
        bench.run(&mut cmd, stop, steps, |line| rdma_hosts_step(line, tag))?;
    if report.median.routers.len() != 2 {
        return Err(DemoError::Unexpected(format!(
            "freeflow-bench rdma --hosts 2 reported {} routers, not 2",
            report.median.routers.len()
        )));
    }
    Ok((json, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_progress_becomes_steps() {
        let building = Progress::RdmaHostsBuilding {
            router_cores: vec![0, 1],
        };
        let step = rdma_hosts_step(&building.to_line(), "dmr1").unwrap();
        assert!(step.contains("ff-dmr1-*"), "{step}");
        assert!(step.contains("cores [0, 1]"), "{step}");
        assert!(rdma_hosts_step(
            &Progress::RdmaHostsRepetition { rep: 1, of: 2 }.to_line(),
            "t"
        )
        .unwrap()
        .starts_with("RDMA across hosts, repetition 1/2: "));
        assert_eq!(rdma_hosts_step("freeflow-bench: boom", "t"), None);
        assert_eq!(
            rdma_hosts_step(&Progress::RdmaStopping.to_line(), "t"),
            None
        );
    }
}
