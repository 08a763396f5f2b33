//! Part 3 of the demo: the RDMA comparison on this host by the sibling binary
//! `freeflow-bench rdma --json --progress-json`: a private router and two QPs through its
//! software verbs engine. It needs a C compiler and the verbs headers (its measuring program is
//! C); `prerequisites` checks beforehand that they are there, and installs them if not.

use std::path::{Path, PathBuf};
use std::process::Command;

use freeflow_proto::report::{Progress, RdmaReport};
use serde_json::Value;

use super::child::{bench_report, describe, last_words, run_child, succeeded, Seen};
use super::error::{remove_leftover_dir, DemoError};
use super::signals::Interrupt;
use super::steps::Steps;
use super::{topology, DemoArgs, Programs};
use crate::os;
use crate::supervise::signal_name;

/// Sizes of one RDMA repetition (`freeflow-bench rdma`): about a second on this VM, so three
/// repetitions add well under 20 s. Big enough for the router's CPU time, which the kernel counts
/// in 10 ms ticks: the shortest phase (the round trips) spans about ten of them.
const RDMA_MESSAGES: &str = "2000000";
const RDMA_SAMPLES: &str = "100000";
const RDMA_BW_OPS: &str = "100000";
/// rdma_cm connections of the setup-rate phase.
const RDMA_CM_CONNECTIONS: &str = "200";
/// Fixed steps of the RDMA comparison (start, stop); each repetition adds one.
pub(super) const RDMA_FIXED_STEPS: usize = 2;

/// freeflow-bench rdma's namespace and router directory, named after its pid (bench/src/rdma.rs
/// and bench/src/router.rs).
fn rdma_netns(bench_pid: u32) -> String {
    format!("ffrdma-{bench_pid}")
}

fn rdma_dir(bench_pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("freeflow-bench-rdma-{bench_pid}"))
}

/// Our step line for one of freeflow-bench rdma's stderr lines (`None`: not an RDMA progress
/// event).
fn rdma_step(line: &str, netns: &str) -> Option<String> {
    Some(match Progress::from_line(line)? {
        Progress::RdmaStarting { router_core } => format!(
            "RDMA comparison on this host: a private router on core {router_core}; a C program \
             built against the verbs headers runs in namespace {netns} (a registered container) \
             with two QPs connected through the router"
        ),
        Progress::RdmaRepetition { rep, of } => format!(
            "RDMA repetition {rep}/{of}: 64 B SEND/RECV and RDMA WRITE message rates, SEND round \
             trips, 64 KiB RDMA WRITE bandwidth and memcpy"
        ),
        Progress::RdmaStopping => {
            format!("RDMA comparison: stopping its router and removing namespace {netns}")
        }
        _ => return None,
    })
}

/// Runs `freeflow-bench rdma`; returns its report as it printed it (the demo's `--json` passes
/// it on unchanged) and as the shared type, which the table reads.
pub(super) fn rdma_part(
    args: &DemoArgs,
    programs: &Programs,
    stop: &Interrupt,
    steps: &mut Steps,
) -> Result<(Value, RdmaReport), DemoError> {
    let mut cmd = Command::new(&programs.bench);
    cmd.args(["rdma", "--json", "--progress-json"])
        .args(["--reps", &args.reps.to_string()])
        .args(["--messages", RDMA_MESSAGES, "--samples", RDMA_SAMPLES])
        .args(["--bw-ops", RDMA_BW_OPS])
        .args(["--cm-connections", RDMA_CM_CONNECTIONS]);
    let command = describe(&cmd);
    let mut bench_pid = None;
    let finished = run_child(&mut cmd, stop, &mut |seen| match seen {
        Seen::Started(pid) => bench_pid = Some(pid),
        Seen::Line(line) => {
            let netns = rdma_netns(bench_pid.unwrap_or_default());
            match rdma_step(line, &netns) {
                Some(step) => steps.step(step),
                None => steps.bench_note(line),
            }
        }
        Seen::Signal(sig) => steps.note(format_args!(
            "{}: freeflow-bench stops its router and removes its namespace",
            signal_name(sig)
        )),
    });
    let leftovers = bench_pid.map_or(Ok(()), remove_rdma_leftovers);
    let out = succeeded(finished?, &command)?;
    leftovers?;
    bench_report("rdma", &out)
}

/// Removes what a freeflow-bench rdma (pid `bench_pid`) that could not clean up left: the
/// program in its namespace, the namespace, its router and the router's directory.
fn remove_rdma_leftovers(bench_pid: u32) -> Result<(), DemoError> {
    let mut problems = Vec::new();
    let netns = rdma_netns(bench_pid);
    match topology::list_netns() {
        Ok(all) if all.contains(&netns) => {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &netns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = os::send_signal(pid, libc::SIGKILL);
                    }
                }
            }
            match Command::new("ip").args(["netns", "del", &netns]).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => problems.push(format!(
                    "ip netns del {netns}: {}",
                    last_words(&String::from_utf8_lossy(&out.stderr))
                )),
                Err(e) => problems.push(format!("ip netns del {netns}: {e}")),
            }
        }
        Ok(_) => {}
        Err(e) => problems.push(e.to_string()),
    }
    let dir = rdma_dir(bench_pid);
    for pid in routers_serving(&dir) {
        let _ = os::send_signal(pid, libc::SIGKILL);
    }
    remove_leftover_dir(&dir, &mut problems);
    DemoError::check_cleanup(problems)
}

/// Processes started with `--dir DIR` (a router freeflow-bench started and could not stop).
fn routers_serving(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let dir = dir.as_os_str().as_encoded_bytes();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.windows(2).any(|w| w[0] == b"--dir" && w[1] == dir)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_progress_becomes_steps() {
        let start = rdma_step(
            &Progress::RdmaStarting { router_core: 1 }.to_line(),
            "ffrdma-42",
        )
        .unwrap();
        assert!(start.contains("router on core 1;"), "{start}");
        assert!(start.contains("namespace ffrdma-42 "), "{start}");
        assert!(rdma_step(
            &Progress::RdmaRepetition { rep: 2, of: 3 }.to_line(),
            "ffrdma-42"
        )
        .unwrap()
        .starts_with("RDMA repetition 2/3: "));
        assert_eq!(
            rdma_step(&Progress::RdmaStopping.to_line(), "ffrdma-42").as_deref(),
            Some("RDMA comparison: stopping its router and removing namespace ffrdma-42")
        );
        assert_eq!(rdma_step("freeflow-bench: boom", "ffrdma-42"), None);
        assert_eq!(
            rdma_step(&Progress::TcpBuilding.to_line(), "ffrdma-42"),
            None
        );
    }
}
