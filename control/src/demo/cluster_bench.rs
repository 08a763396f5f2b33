//! What the demo's parts that run `freeflow-bench` on a cluster of its own share: running it
//! with its progress events turned into our steps, and afterwards removing whatever of its
//! cluster it could not remove itself (killed after a limit, crashed), whether or not it
//! succeeded.

use std::process::Command;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::child::{bench_report, describe, run_child, succeeded, Seen};
use super::error::{remove_leftover_dir, DemoError};
use super::signals::Interrupt;
use super::steps::Steps;
use super::topology;
use crate::supervise::signal_name;

/// One run of `freeflow-bench` that builds cluster `tag`.
pub(super) struct ClusterBench<'a> {
    /// The bench's part as its error messages name it (`tcp`, `rdma --hosts 2`).
    pub part: &'a str,
    pub tag: &'a str,
    /// The name of freeflow-bench's directory for the cluster in the temporary directory
    /// (`work_dir` of the part's module in bench/src).
    pub work_dir_name: String,
}

impl ClusterBench<'_> {
    /// Runs `cmd` (freeflow-bench with `--json --progress-json`), turning each stderr line that
    /// `step_of` recognises into a step and the others into notes; returns the report as
    /// printed and as the shared type.
    pub(super) fn run<T: DeserializeOwned>(
        &self,
        cmd: &mut Command,
        stop: &Interrupt,
        steps: &mut Steps,
        step_of: impl Fn(&str) -> Option<String>,
    ) -> Result<(Value, T), DemoError> {
        let command = describe(cmd);
        let finished = run_child(cmd, stop, &mut |seen| match seen {
            Seen::Line(line) => match step_of(line) {
                Some(step) => steps.step(step),
                None => steps.bench_note(line),
            },
            Seen::Signal(sig) => steps.note(format_args!(
                "{}: freeflow-bench stops and removes its cluster",
                signal_name(sig)
            )),
            Seen::Started(_) => {}
        });
        // Whatever happened to freeflow-bench, nothing of its cluster may stay: its namespaces
        // (and the processes in them) and its directory.
        let leftovers = self.remove_leftovers();
        let out = succeeded(finished?, &command)?;
        leftovers?;
        bench_report(self.part, &out)
    }

    /// Removes what a freeflow-bench that could not clean up left of the cluster.
    fn remove_leftovers(&self) -> Result<(), DemoError> {
        let mut problems = Vec::new();
        match topology::netns_of_tag(self.tag) {
            Ok(left) if left.is_empty() => {}
            Ok(_) => {
                if let Err(e) = topology::teardown_tag(self.tag) {
                    problems.push(e.to_string());
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
        let work = std::env::temp_dir().join(&self.work_dir_name);
        remove_leftover_dir(&work, &mut problems);
        DemoError::check_cleanup(problems)
    }
}
