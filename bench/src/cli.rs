//! The command line: one subcommand per experiment, and the hidden roles that experiments run
//! this binary as (TCP server and client inside the simulated hosts, the idle containers'
//! holders).

use crate::{cluster, idle, rdma, rdma_hosts, ring, tcp};
use clap::{Args, Parser, Subcommand};
use freeflow_proto::report::Progress;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Freeflow's experiments. Each prints a table, or JSON with `--json`.
#[derive(Parser, Debug)]
#[command(name = "freeflow-bench", arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    pub experiment: Experiment,
}

#[derive(Subcommand, Debug)]
pub enum Experiment {
    /// Round trip of a request through a shared-memory ring to a router shard and back
    /// (p50/p99/p99.9), and one-way throughput of batched messages
    Ring(RingArgs),
    /// (root) Router CPU with N attached containers that do nothing
    Idle(IdleArgs),
    /// (root) Two simulated hosts: host link vs overlay vs Freeflow, side by side: one-stream
    /// throughput, 64-byte round trip, connection setup (connect to first byte), connections/s;
    /// the cluster's namespaces are ff-T-* (T: 1 to 8 of a-z 0-9); Ctrl-C removes everything
    Tcp(TcpArgs),
    /// (root) Two QPs of one host through the router's software engine: 64-byte SEND/RECV and
    /// RDMA WRITE message rate, SEND round trip (p50/p99), 64 KiB RDMA WRITE bandwidth against
    /// memcpy on the application's core, router CPU per operation (needs cc and
    /// libibverbs-dev). With --hosts 2: a container on each of two simulated hosts, through both
    /// routers and the host link, next to the host link's own TCP ping-pong and stream; the
    /// cluster's namespaces are ff-T-*; Ctrl-C removes everything
    Rdma(RdmaArgs),
    /// Attach to the router serving DIR from this process's network namespace (a registered
    /// container) and time round trips through it; a refusal is printed with the router's reason
    Probe(ProbeArgs),
    /// (root) The scale test: etcd on tmpfs, N simulated hosts each with its daemon and router
    /// on the etcd registry, M containers over them: cold start, registration throughput and
    /// latency, convergence of a change in every router, a host killed, etcd restarted, idle
    /// RSS and CPU per host, and one big host with many containers registered and attached (needs
    /// etcd-server and curl); the cluster's namespaces are ff-T-*; Ctrl-C removes everything
    Cluster(ClusterArgs),
    /// The `tcp` experiment's server role, inside a simulated host
    #[command(hide = true)]
    TcpServer { port: u16 },
    /// The `tcp` experiment's client role: prints one sample as JSON
    #[command(hide = true)]
    TcpClient {
        addr: SocketAddr,
        seconds: f64,
        samples: u64,
        setups: u64,
    },
    /// The `tcp` experiment's connection-per-request client: prints one sample as JSON
    #[command(hide = true)]
    TcpRequests {
        addr: SocketAddr,
        clients: usize,
        seconds: f64,
    },
    /// The `cluster` experiment's watcher of one router's table (prints each change)
    #[command(hide = true)]
    ClusterWatch { dir: PathBuf },
    /// The `cluster` experiment's attached process of one container (verbs or socket)
    #[command(hide = true)]
    ClusterHold { dir: PathBuf, kind: String },
    /// The attached process of one idle container
    #[command(hide = true)]
    Hold {
        dir: PathBuf,
        #[arg(default_value_t = 60)]
        seconds: u64,
    },
}

/// How an experiment reports: its result on stdout, its progress on stderr.
#[derive(Args, Debug)]
pub struct Output {
    /// Print the report as JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// Write progress to stderr as JSON lines, one event per line (for programs that run the
    /// bench, such as `freeflow demo`), instead of text
    #[arg(long)]
    pub progress_json: bool,
}

impl Output {
    /// Writes one progress event to stderr, as JSON or as text.
    pub fn progress(&self, event: &Progress) {
        if self.progress_json {
            eprintln!("{}", event.to_line());
        } else {
            eprintln!("[freeflow-bench] {event}");
        }
    }

    /// Prints `report` as pretty JSON with `--json`, else as `text` prints it.
    pub fn report<R: Serialize>(&self, report: &R, text: fn(&R)) -> Result<(), String> {
        print_report(self.json, report, text)
    }
}

/// Prints `report` as pretty JSON if `json`, else as `text` prints it.
pub fn print_report<R: Serialize>(json: bool, report: &R, text: fn(&R)) -> Result<(), String> {
    if json {
        let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        println!("{json}");
    } else {
        text(report);
    }
    Ok(())
}

/// Cores for the application and the router shard when none are given: the first and the last.
#[derive(Debug, Clone, Copy)]
pub struct DefaultCores {
    pub app: usize,
    pub router: usize,
}

impl DefaultCores {
    pub fn of_this_machine() -> DefaultCores {
        let ids: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .iter()
            .map(|c| c.id)
            .collect();
        DefaultCores {
            app: ids.first().copied().unwrap_or(0),
            router: ids.last().copied().unwrap_or(0),
        }
    }
}

#[derive(Args, Debug)]
pub struct RingArgs {
    #[command(flatten)]
    pub output: Output,
    /// Repetitions; the report shows medians
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub reps: usize,
    /// Timed round trips per repetition
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub samples: u64,
    /// One-way messages per repetition
    #[arg(long, value_name = "N", default_value_t = 20_000_000)]
    pub messages: u64,
    /// Core of the application [default: the first core]
    #[arg(long, value_name = "N")]
    pub app_core: Option<usize>,
    /// Core of the router shard [default: the last core]
    #[arg(long, value_name = "N")]
    pub router_core: Option<usize>,
}

impl RingArgs {
    pub fn options(&self, cores: DefaultCores) -> ring::Options {
        ring::Options {
            reps: self.reps,
            rtt_samples: self.samples,
            messages: self.messages,
            app_core: self.app_core.unwrap_or(cores.app),
            router_core: self.router_core.unwrap_or(cores.router),
        }
    }
}

#[derive(Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub output: Output,
    /// Attached containers
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub containers: usize,
    /// Seconds of measurement
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub seconds: u64,
    /// Core of the router [default: the last core]
    #[arg(long, value_name = "N")]
    pub router_core: Option<usize>,
}

impl IdleArgs {
    pub fn options(&self, cores: DefaultCores) -> idle::Options {
        idle::Options {
            containers: self.containers,
            seconds: self.seconds,
            router_core: self.router_core.unwrap_or(cores.router),
        }
    }
}

#[derive(Args, Debug)]
pub struct TcpArgs {
    #[command(flatten)]
    pub output: Output,
    /// Repetitions; the report shows medians
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub reps: usize,
    /// Seconds of each one-stream throughput measurement
    #[arg(long, value_name = "S", default_value_t = 2.0)]
    pub seconds: f64,
    /// Timed 64-byte round trips per path and repetition
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    pub samples: u64,
    /// Connection setups per path and repetition
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    pub setups: u64,
    /// Also a connection-per-request load (connect, 64-byte request, 64-byte reply, close) for
    /// --seconds at each of these numbers of concurrent clients (1 to 1000), on each path and
    /// through the relay (a client without Freeflow): requests/s, p50/p99 latency [default: none]
    #[arg(long, value_name = "N,N,..", value_delimiter = ',',
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub concurrency: Vec<u16>,
    /// Cluster tag (1 to 8 of a-z 0-9) [default: from the pid]
    #[arg(long, value_name = "T")]
    pub tag: Option<String>,
}

impl TcpArgs {
    pub fn options(&self) -> tcp::Options {
        tcp::Options {
            reps: self.reps,
            seconds: self.seconds,
            rtt_samples: self.samples,
            setups: self.setups,
            concurrency: self.concurrency.iter().map(|&n| usize::from(n)).collect(),
            tag: self.tag.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct RdmaArgs {
    #[command(flatten)]
    pub output: Output,
    /// Simulated hosts: 1 (two QPs of one host) or 2 (one QP on each host)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=2))]
    pub hosts: u8,
    /// Repetitions; the report shows medians
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub reps: usize,
    /// 64-byte messages per message-rate phase [default: 5000000; with --hosts 2: 1000000]
    #[arg(long, value_name = "N")]
    pub messages: Option<u64>,
    /// Timed SEND round trips per repetition [default: 100000; with --hosts 2: 20000]
    #[arg(long, value_name = "N")]
    pub samples: Option<u64>,
    /// 64 KiB RDMA WRITEs of the bandwidth phase [default: 200000; with --hosts 2: 20000]
    #[arg(long, value_name = "N")]
    pub bw_ops: Option<u64>,
    /// rdma_cm connections of the connection-setup phase, one after another [default: 500;
    /// with --hosts 2: 200]
    #[arg(long, value_name = "N")]
    pub cm_connections: Option<u64>,
    /// Core of the measuring program [default: the first core] (one host only)
    #[arg(long, value_name = "N")]
    pub app_core: Option<usize>,
    /// Core of the router [default: the last core] (one host only; with --hosts 2 host 0's
    /// router and program run on the first core, host 1's on the last)
    #[arg(long, value_name = "N")]
    pub router_core: Option<usize>,
    /// With --hosts 2: seconds of the host link's TCP stream
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub tcp_seconds: f64,
    /// With --hosts 2: cluster tag (1 to 8 of a-z 0-9) [default: from the pid]
    #[arg(long, value_name = "T")]
    pub tag: Option<String>,
}

impl RdmaArgs {
    pub fn options(&self, cores: DefaultCores) -> rdma::Options {
        rdma::Options {
            reps: self.reps,
            messages: self.messages.unwrap_or(5_000_000),
            samples: self.samples.unwrap_or(100_000),
            bw_ops: self.bw_ops.unwrap_or(200_000),
            cm_connections: self.cm_connections.unwrap_or(500),
            app_core: self.app_core.unwrap_or(cores.app),
            router_core: self.router_core.unwrap_or(cores.router),
        }
    }

    /// The options of `--hosts 2`: host 0 on the first core, host 1 on the last.
    pub fn hosts_options(&self, cores: DefaultCores) -> rdma_hosts::Options {
        rdma_hosts::Options {
            reps: self.reps,
            messages: self.messages.unwrap_or(1_000_000),
            samples: self.samples.unwrap_or(20_000),
            bw_ops: self.bw_ops.unwrap_or(20_000),
            cm_connections: self.cm_connections.unwrap_or(200),
            tcp_seconds: self.tcp_seconds,
            cores: [cores.app, cores.router],
            tag: self.tag.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub output: Output,
    /// Simulated hosts (2 to 200); the last one is killed
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(2..=200))]
    pub hosts: u16,
    /// Containers spread over the hosts (round robin)
    #[arg(long, value_name = "M", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub containers: u32,
    /// `freeflow container add` commands running at once while registering
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub registrars: u16,
    /// Single changes (one registration, then its removal) timed until every router has seen
    /// them
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub changes: u32,
    /// Seconds of each idle measurement
    #[arg(long, value_name = "S", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle_seconds: u64,
    /// Containers registered on one host in the last phase (0: no such phase)
    #[arg(long, value_name = "N", default_value_t = 3_000,
          value_parser = clap::value_parser!(u32).range(0..=60_000))]
    pub big_registered: u32,
    /// Of which attached, one process each, alternately as verbs and socket shims
    #[arg(long, value_name = "N", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(0..=60_000))]
    pub big_attached: u32,
    /// Cluster tag (1 to 8 of a-z 0-9) [default: from the pid]
    #[arg(long, value_name = "T")]
    pub tag: Option<String>,
}

impl ClusterArgs {
    pub fn options(&self) -> cluster::Options {
        cluster::Options {
            hosts: usize::from(self.hosts),
            containers: self.containers as usize,
            registrars: usize::from(self.registrars),
            changes: self.changes as usize,
            idle_seconds: self.idle_seconds,
            big_registered: self.big_registered as usize,
            big_attached: self.big_attached as usize,
            tag: self.tag.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// The router's runtime directory
    pub dir: PathBuf,
    /// Print the report as JSON instead of a line of text
    #[arg(long)]
    pub json: bool,
    /// Timed round trips
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    pub samples: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Experiment, clap::Error> {
        Cli::try_parse_from(std::iter::once("freeflow-bench").chain(args.iter().copied()))
            .map(|cli| cli.experiment)
    }

    const CORES: DefaultCores = DefaultCores { app: 0, router: 7 };

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_those_of_the_usage_lines() {
        let Ok(Experiment::Ring(a)) = parse(&["ring"]) else {
            panic!("ring")
        };
        let o = a.options(CORES);
        assert_eq!(
            (o.reps, o.rtt_samples, o.messages, o.app_core, o.router_core),
            (5, 200_000, 20_000_000, 0, 7)
        );
        assert!(!a.output.json && !a.output.progress_json);
        let Ok(Experiment::Idle(a)) = parse(&["idle"]) else {
            panic!("idle")
        };
        let o = a.options(CORES);
        assert_eq!((o.containers, o.seconds, o.router_core), (50, 10, 7));
        let Ok(Experiment::Tcp(a)) = parse(&["tcp"]) else {
            panic!("tcp")
        };
        let o = a.options();
        assert_eq!((o.reps, o.rtt_samples, o.setups), (3, 20_000, 1_000));
        assert_eq!((o.seconds, o.tag), (2.0, None));
        assert!(o.concurrency.is_empty());
        let Ok(Experiment::Rdma(a)) = parse(&["rdma"]) else {
            panic!("rdma")
        };
        let o = a.options(CORES);
        assert_eq!(
            (
                o.reps,
                o.messages,
                o.samples,
                o.bw_ops,
                o.app_core,
                o.router_core
            ),
            (3, 5_000_000, 100_000, 200_000, 0, 7)
        );
        let Ok(Experiment::Cluster(a)) = parse(&["cluster"]) else {
            panic!("cluster")
        };
        let o = a.options();
        assert_eq!(
            (
                o.hosts,
                o.containers,
                o.registrars,
                o.changes,
                o.idle_seconds
            ),
            (32, 1_000, 4, 50, 10)
        );
        assert_eq!(
            (o.big_registered, o.big_attached, o.tag),
            (3_000, 1_000, None)
        );
        let Ok(Experiment::Probe(a)) = parse(&["probe", "/freeflow"]) else {
            panic!("probe")
        };
        assert_eq!((a.samples, a.json), (20_000, false));
        let Ok(Experiment::Hold { seconds, .. }) = parse(&["hold", "/freeflow"]) else {
            panic!("hold")
        };
        assert_eq!(seconds, 60);
    }

    #[test]
    fn flags_are_read() {
        let Ok(Experiment::Tcp(a)) = parse(&[
            "tcp",
            "--json",
            "--progress-json",
            "--reps",
            "1",
            "--seconds",
            "0.3",
            "--samples",
            "10000",
            "--setups",
            "500",
            "--tag",
            "dmt1",
            "--concurrency",
            "1,20,400",
        ]) else {
            panic!("tcp")
        };
        assert_eq!(a.options().concurrency, vec![1, 20, 400]);
        assert!(a.output.json && a.output.progress_json);
        let o = a.options();
        assert_eq!(
            (o.reps, o.seconds, o.rtt_samples, o.setups),
            (1, 0.3, 10_000, 500)
        );
        assert_eq!(o.tag.as_deref(), Some("dmt1"));
        let Ok(Experiment::Rdma(a)) = parse(&[
            "rdma",
            "--app-core",
            "1",
            "--router-core",
            "0",
            "--bw-ops",
            "9",
        ]) else {
            panic!("rdma")
        };
        let o = a.options(CORES);
        assert_eq!((o.app_core, o.router_core, o.bw_ops), (1, 0, 9));
        assert_eq!(a.hosts, 1);
        let Ok(Experiment::Rdma(a)) = parse(&["rdma", "--hosts", "2", "--tag", "rh1"]) else {
            panic!("rdma --hosts 2")
        };
        let o = a.hosts_options(CORES);
        assert_eq!(
            (o.messages, o.samples, o.bw_ops, o.cores, o.tcp_seconds),
            (1_000_000, 20_000, 20_000, [0, 7], 1.0)
        );
        assert_eq!(o.tag.as_deref(), Some("rh1"));
        let Ok(Experiment::TcpClient { samples, .. }) =
            parse(&["tcp-client", "10.32.0.4:7003", "0.3", "10000", "500"])
        else {
            panic!("tcp-client")
        };
        assert_eq!(samples, 10_000);
    }

    #[test]
    fn wrong_arguments_are_refused() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["udp"]).is_err());
        assert!(parse(&["ring", "--reps"]).is_err());
        assert!(parse(&["ring", "--reps", "x"]).is_err());
        assert!(parse(&["idle", "--tag", "t"]).is_err());
        assert!(parse(&["probe"]).is_err());
        assert!(parse(&["tcp", "--concurrency", "0"]).is_err());
        assert!(parse(&["rdma", "--hosts", "3"]).is_err());
        assert!(parse(&["tcp", "--concurrency", "1,1001"]).is_err());
        assert!(parse(&["cluster", "--hosts", "1"]).is_err());
        assert!(parse(&["cluster", "--containers", "0"]).is_err());
    }
}
