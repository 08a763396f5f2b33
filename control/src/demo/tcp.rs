//! Part 2 of the demo: the TCP comparison (host link, overlay, Freeflow) by the sibling binary
//! `freeflow-bench tcp --json --progress-json`, which builds and removes a second cluster of its
//! own. Its progress events become our steps; its report becomes the table.

use std::process::Command;

use freeflow_proto::report::{Progress, TcpPath, TcpReport};
use serde_json::Value;

use super::child::{bench_report, describe, run_child, succeeded, Seen};
use super::error::{remove_leftover_dir, DemoError};
use super::signals::Interrupt;
use super::steps::Steps;
use super::{topology, DemoArgs, Programs};
use crate::supervise::signal_name;

/// Per-repetition sizes of the TCP round-trip and setup measurements (those of scripts/demo.sh):
/// about one second per path on this VM, so the default demo takes about a minute.
const TCP_SAMPLES: &str = "10000";
const TCP_SETUPS: &str = "500";
/// Fixed steps of the TCP comparison (build, remove); each repetition adds one per path.
pub(super) const TCP_FIXED_STEPS: usize = 2;

/// What the table calls freeflow-bench's paths.
pub(super) fn path_label(path: TcpPath) -> &'static str {
    match path {
        TcpPath::Host => "host link",
        TcpPath::Overlay => "overlay (VXLAN)",
        TcpPath::Freeflow => "Freeflow",
    }
}

/// Our step line for one of freeflow-bench's stderr lines (`None`: not a TCP progress event).
fn tcp_step(line: &str, tag: &str) -> Option<String> {
    Some(match Progress::from_line(line)? {
        Progress::TcpBuilding => format!(
            "TCP comparison: building a second two-host cluster (namespaces ff-{tag}-*), \
             Freeflow on both, a server on host 1 for each path"
        ),
        Progress::TcpRepetition { rep, of, path } => format!(
            "TCP repetition {rep}/{of}: {} (stream, round trips, connection setups)",
            path_label(path)
        ),
        Progress::TcpRemoving => "TCP comparison: removing its cluster".to_owned(),
        _ => return None,
    })
}

/// Runs `freeflow-bench tcp` on cluster `tag`; returns its report as it printed it (the demo's
/// `--json` passes it on unchanged) and as the shared type, which the table reads.
pub(super) fn tcp_part(
    tag: &str,
    args: &DemoArgs,
    programs: &Programs,
    stop: &Interrupt,
    steps: &mut Steps,
) -> Result<(Value, TcpReport), DemoError> {
    let mut cmd = Command::new(&programs.bench);
    cmd.args(["tcp", "--json", "--progress-json"])
        .args(["--reps", &args.reps.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .args([
            "--samples",
            TCP_SAMPLES,
            "--setups",
            TCP_SETUPS,
            "--tag",
            tag,
        ]);
    let command = describe(&cmd);
    let finished = run_child(&mut cmd, stop, &mut |seen| match seen {
        Seen::Line(line) => match tcp_step(line, tag) {
            Some(step) => steps.step(step),
            None => steps.bench_note(line),
        },
        Seen::Signal(sig) => steps.note(format_args!(
            "{}: freeflow-bench stops and removes its cluster",
            signal_name(sig)
        )),
        Seen::Started(_) => {}
    });
    // Whatever happened to freeflow-bench (killed after the limit, crashed), nothing of its
    // cluster may stay: its namespaces (and the processes in them) and its directory.
    let leftovers = remove_bench_leftovers(tag);
    let out = succeeded(finished?, &command)?;
    leftovers?;
    let (json, report): (Value, TcpReport) = bench_report("tcp", &out)?;
    if report.paths.len() != 3 {
        return Err(DemoError::Unexpected(format!(
            "freeflow-bench tcp reported {} paths, not host, overlay and Freeflow",
            report.paths.len()
        )));
    }
    Ok((json, report))
}

/// Removes what a freeflow-bench that could not clean up left of cluster `tag`.
fn remove_bench_leftovers(tag: &str) -> Result<(), DemoError> {
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
    // freeflow-bench's directory for the cluster (bench/src/tcp/mod.rs `work_dir`).
    let work = std::env::temp_dir().join(format!("freeflow-bench-tcp-{tag}"));
    remove_leftover_dir(&work, &mut problems);
    DemoError::check_cleanup(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_progress_becomes_steps() {
        let repetition = Progress::TcpRepetition {
            rep: 2,
            of: 5,
            path: TcpPath::Overlay,
        };
        assert_eq!(
            tcp_step(&repetition.to_line(), "t1").as_deref(),
            Some("TCP repetition 2/5: overlay (VXLAN) (stream, round trips, connection setups)")
        );
        assert!(tcp_step(&Progress::TcpBuilding.to_line(), "t1")
            .unwrap()
            .contains("ff-t1-*"));
        assert_eq!(tcp_step("freeflow-bench: boom", "t1"), None);
    }
}
