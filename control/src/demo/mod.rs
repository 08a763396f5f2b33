//! `freeflow demo`: Freeflow on this machine in one command, for a newcomer.
//!
//! 1. Builds a simulated two-host cluster (network namespaces, VXLAN overlay; see `topology`),
//!    starts Freeflow on both hosts with the public commands (`freeflow up`, `container add`),
//!    shows each container attaching to its own host's router, a stranger refused, and
//!    `freeflow status`; then removes that cluster (`attach`).
//! 2. Runs the TCP comparison (host link, overlay, Freeflow) by starting the sibling binary
//!    `freeflow-bench tcp --json --progress-json`, which builds and removes a second cluster of
//!    its own (`tcp`). Its progress events (JSON lines on stderr) become our steps; its JSON
//!    report becomes the table. Both are the types of `freeflow_proto::report`, which the bench
//!    writes; running it as a program keeps this crate independent of the bench crate.
//! 3. Runs the RDMA comparison on this host the same way, with `freeflow-bench rdma --json`: a
//!    private router and two QPs through its software verbs engine; the table sets message rate,
//!    round trip and bandwidth against the project's targets and against memcpy in the same run
//!    (`rdma`). It needs a C compiler and the verbs headers (its measuring program is C): the
//!    demo installs what is missing with apt-get first (`prerequisites`; not with
//!    `--no-install`); if they still are not there it says the part is skipped and why, and
//!    still succeeds (`--part rdma` fails instead).
//!
//!    Then RDMA across two simulated hosts, `freeflow-bench rdma --hosts 2 --json` (a cluster of
//!    its own, a short run), next to the host link's TCP ping-pong and stream in the same run
//!    (`rdma_hosts`); its table follows the one-host table.
//!
//! `--part tcp` runs 1 and 2, `--part rdma` only 3.
//!
//! Progress goes to stderr, one line per step (`[3/16] ...`, `steps`); results go to stdout
//! (`table`).
//!
//! Ctrl-C: SIGINT, SIGTERM and SIGHUP are blocked and read from a signalfd (`signals`), so they
//! end the demo at the next step instead of killing it with everything in place. A child that is
//! running gets the signal (forwarded by `child`, and from the terminal anyway: it is in our
//! process group); `freeflow-bench` handles it by removing its cluster. Whatever the demo made
//! itself is removed on every way out, and afterwards it checks that no namespace of either
//! cluster is left.

mod attach;
mod child;
mod cluster_bench;
mod error;
mod prerequisites;
mod rdma;
mod rdma_hosts;
mod signals;
mod steps;
mod table;
mod tcp;

use std::io::{self, Write};
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use crate::supervise;
use freeflow_testbed::{self as topology, Cluster, ClusterSpec, TopologyError};

pub use error::DemoError;

use attach::{attach_part, ATTACH_STEPS};
use error::io_err;
use prerequisites::ensure_rdma_prerequisites;
use rdma::{rdma_part, RDMA_FIXED_STEPS};
use rdma_hosts::{rdma_hosts_part, RDMA_HOSTS_FIXED_STEPS};
use signals::Interrupt;
use steps::Steps;
use table::{print_rdma_hosts_table, print_rdma_skipped, print_rdma_table, print_tcp_table};
use tcp::{tcp_part, TCP_FIXED_STEPS};

/// Which parts of the demo to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// The simulated cluster, then the TCP and the RDMA comparisons
    All,
    /// The simulated cluster (attachments, status) and the TCP comparison
    Tcp,
    /// Only the RDMA comparison on this host
    Rdma,
}

/// `freeflow demo` options.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Which part to run
    #[arg(long, value_enum, default_value_t = Part::All)]
    part: Part,
    /// Repetitions of each TCP and RDMA measurement; the tables show medians
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    reps: u32,
    /// Seconds of each one-stream throughput measurement
    #[arg(long, value_name = "S", default_value_t = 2.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Print one JSON object (clusters, attachments, status, TCP and RDMA reports) instead of
    /// text
    #[arg(long)]
    json: bool,
    /// Do not install the Debian packages the RDMA part builds its measuring program with
    /// (libibverbs-dev, gcc, libc6-dev) when they are missing: skip that part instead
    #[arg(long)]
    no_install: bool,
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 60.0 => Ok(s),
        _ => Err(format!("{text:?} is not a number of seconds in (0, 60]")),
    }
}

/// The programs the demo runs: itself (`freeflow`) and the bench next to it.
struct Programs {
    freeflow: PathBuf,
    bench: PathBuf,
}

// ---------------------------------------------------------------- the command

fn require_root() -> Result<(), DemoError> {
    match topology::ensure_root() {
        Ok(()) => Ok(()),
        Err(TopologyError::NotRoot { euid }) => Err(DemoError::NotRoot {
            euid,
            exe: std::env::args()
                .next()
                .unwrap_or_else(|| "freeflow".to_owned()),
        }),
        Err(e) => Err(e.into()),
    }
}

fn require_file(path: PathBuf) -> Result<PathBuf, DemoError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(DemoError::Missing(path))
    }
}

/// Runs the demo. Errors, also [`DemoError::Interrupted`], come after everything the demo made
/// is removed.
pub fn run(args: &DemoArgs) -> Result<(), DemoError> {
    require_root()?;
    let with_tcp = args.part != Part::Rdma;
    let with_rdma = args.part != Part::Tcp;
    let programs = Programs {
        freeflow: std::env::current_exe().map_err(io_err("cannot find the freeflow executable"))?,
        bench: require_file(supervise::sibling_of_exe("freeflow-bench"))?,
    };
    supervise::router_program()
        .map_err(|_| DemoError::Missing(supervise::sibling_of_exe("freeflow-router")))?;
    if with_tcp {
        require_file(supervise::sibling_of_exe("libfsocket.so"))?;
    }
    let stop = Interrupt::install()?;
    // Whether the RDMA part can run here (after installing what it needs) is known before the
    // first step, so that the step count is right; asked for alone, it must run.
    let rdma_ready = if with_rdma {
        require_file(supervise::sibling_of_exe("libibverbs.so"))?;
        Some(ensure_rdma_prerequisites(!args.no_install, &stop)?)
    } else {
        None
    };
    if let (Part::Rdma, Some(Err(reason))) = (args.part, &rdma_ready) {
        return Err(DemoError::RdmaUnavailable(reason.clone()));
    }
    let mut steps = Steps::new(expected_steps(args, with_tcp, &rdma_ready));
    let mut value = serde_json::Map::new();
    let mut removed = Vec::new();
    if with_tcp {
        let tags = cluster_and_tcp(args, &programs, &stop, &mut steps, &mut value)?;
        removed.push(format!(
            "clusters {} and {} and their daemons",
            tags[0], tags[1]
        ));
    }
    if let Some(ready) = rdma_ready {
        let rdma_json = match ready {
            Ok(()) => {
                stop.check()?;
                let (json, report) = rdma_part(args, &programs, &stop, &mut steps)?;
                removed.push("the RDMA comparison's router and namespace".to_owned());
                stop.check()?;
                let tag = topology::fresh_tag("dmr");
                let (hosts_json, hosts) =
                    rdma_hosts_part(&tag, args, &programs, &stop, &mut steps)?;
                if !args.json {
                    print_rdma_table(&report);
                    print_rdma_hosts_table(&hosts);
                }
                removed.push(format!("cluster {tag} (RDMA across hosts)"));
                value.insert("rdma_hosts".into(), hosts_json);
                json
            }
            Err(reason) => {
                steps.step(format_args!("RDMA comparison skipped: {reason}"));
                if !args.json {
                    print_rdma_skipped(&reason);
                }
                json!({ "skipped": reason })
            }
        };
        value.insert("rdma".into(), rdma_json);
    }
    if args.json {
        let text =
            serde_json::to_string_pretty(&Value::Object(value)).unwrap_or_else(|_| "null".into());
        let _ = writeln!(io::stdout(), "{text}");
    }
    let _ = writeln!(io::stderr(), "done: {} are removed", removed.join("; "));
    Ok(())
}

/// How many steps the demo will show: the attach part's and the TCP comparison's, and the RDMA
/// comparison's (one if it is skipped).
fn expected_steps(
    args: &DemoArgs,
    with_tcp: bool,
    rdma_ready: &Option<Result<(), String>>,
) -> usize {
    let reps = args.reps as usize;
    let tcp = if with_tcp {
        ATTACH_STEPS + TCP_FIXED_STEPS + 3 * reps
    } else {
        0
    };
    let rdma = match rdma_ready {
        Some(Ok(())) => RDMA_FIXED_STEPS + RDMA_HOSTS_FIXED_STEPS + 2 * reps,
        Some(Err(_)) => 1,
        None => 0,
    };
    tcp + rdma
}

/// Parts 1 and 2: the simulated cluster, then the TCP comparison. Prints their text (unless
/// `--json`), adds `clusters`, `attach` and `tcp` to `value`, returns the two cluster tags.
fn cluster_and_tcp(
    args: &DemoArgs,
    programs: &Programs,
    stop: &Interrupt,
    steps: &mut Steps,
    value: &mut serde_json::Map<String, Value>,
) -> Result<[String; 2], DemoError> {
    // Two clusters, so two tags; both are printed in the progress lines, so a leftover (after
    // a SIGKILL) can be found and removed with `freeflow cluster down --tag`.
    let attach_tag = topology::fresh_tag("dm");
    let tcp_tag = topology::fresh_tag("dmt");

    let attached = attach_part(&attach_tag, programs, args.json, stop, steps)?;
    stop.check()?;

    let (tcp_json, report) = tcp_part(&tcp_tag, args, programs, stop, steps)?;
    if !args.json {
        print_tcp_table(&report);
    }
    let left: Vec<String> = [&attach_tag, &tcp_tag]
        .into_iter()
        .map(|t| topology::netns_of_tag(t))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    if !left.is_empty() {
        return Err(DemoError::Cleanup(vec![format!(
            "namespaces still present: {}",
            left.join(" ")
        )]));
    }
    value.insert("clusters".into(), json!([attach_tag, tcp_tag]));
    value.insert("attach".into(), attached.to_json());
    value.insert("tcp".into(), tcp_json);
    Ok([attach_tag, tcp_tag])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_bounded() {
        assert_eq!(parse_seconds("0.3"), Ok(0.3));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("nan").is_err());
        assert!(parse_seconds("61").is_err());
    }
}
