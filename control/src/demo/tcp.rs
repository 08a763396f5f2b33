//! Part 2 of the demo: the TCP comparison (host link, overlay, Freeflow) by the sibling binary
//! `freeflow-bench tcp --json --progress-json`, which builds and removes a second cluster of its
//! own. Its progress events become our steps; its report becomes the table.

use std::process::Command;

use freeflow_proto::report::{Progress, TcpPath, TcpReport};
use serde_json::Value;

use super::cluster_bench::ClusterBench;
use super::error::DemoError;
use super::signals::Interrupt;
use super::steps::Steps;
use super::{DemoArgs, Programs};

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
    let bench = ClusterBench {
        part: "tcp",
        tag,
        // bench/src/tcp/mod.rs `work_dir`.
        work_dir_name: format!("freeflow-bench-tcp-{tag}"),
    };
    let (json, report): (Value, TcpReport) =
        bench.run(&mut cmd, stop, steps, |line| tcp_step(line, tag))?;
    if report.paths.len() != 3 {
        return Err(DemoError::Unexpected(format!(
            "freeflow-bench tcp reported {} paths, not host, overlay and Freeflow",
            report.paths.len()
        )));
    }
    Ok((json, report))
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
