//! Part 3b of the demo: RDMA across two simulated hosts, by the sibling binary
//! `freeflow-bench rdma --hosts 2 --json --progress-json`, which builds and removes a cluster of
//! its own (a container on each host, each host's router on a core of its own when there are
//! two), and measures the host link's TCP floor in the same run. A short run: the demo's part
//! stays within about 20 s.

use std::process::Command;

use freeflow_proto::report::{Progress, RdmaHostsReport};
use serde_json::Value;

use super::child::{bench_report, describe, run_child, succeeded, Seen};
use super::error::{remove_leftover_dir, DemoError};
use super::signals::Interrupt;
use super::steps::Steps;
use super::{topology, DemoArgs, Programs};
use crate::supervise::signal_name;

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
    let command = describe(&cmd);
    let finished = run_child(&mut cmd, stop, &mut |seen| match seen {
        Seen::Line(line) => match rdma_hosts_step(line, tag) {
            Some(step) => steps.step(step),
            None => steps.bench_note(line),
        },
        Seen::Signal(sig) => steps.note(format_args!(
            "{}: freeflow-bench stops and removes its cluster",
            signal_name(sig)
        )),
        Seen::Started(_) => {}
    });
    let leftovers = remove_leftovers(tag);
    let out = succeeded(finished?, &command)?;
    leftovers?;
    let (json, report): (Value, RdmaHostsReport) = bench_report("rdma --hosts 2", &out)?;
    if report.median.routers.len() != 2 {
        return Err(DemoError::Unexpected(format!(
            "freeflow-bench rdma --hosts 2 reported {} routers, not 2",
            report.median.routers.len()
        )));
    }
    Ok((json, report))
}

/// Removes what a freeflow-bench that could not clean up left of cluster `tag`.
fn remove_leftovers(tag: &str) -> Result<(), DemoError> {
    let mut problems = Vec::new();
    match topology::netns_of_tag(tag) {
        Ok(left) if left.is_empty() => {}
        Ok(_) => {
            if let Err(e) = topology::teardown_tag(tag) {
                problems.push(e.to_string());
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    // freeflow-bench's directory for the cluster (bench/src/rdma_hosts.rs `work_dir`).
    let work = std::env::temp_dir().join(format!("freeflow-bench-rdma-hosts-{tag}"));
    remove_leftover_dir(&work, &mut problems);
    DemoError::check_cleanup(problems)
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
