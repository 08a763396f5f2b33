//! freeflow-bench: Freeflow's experiments. Each prints a table, or JSON with `--json`; progress
//! goes to stderr, as text or, with `--progress-json`, as JSON lines. Both formats are the types
//! of `freeflow_proto::report`, which `freeflow demo` reads.
//!
//! No unsafe code: its system calls are `freeflow-os`'s.
#![deny(unsafe_code)]

mod cli;
mod cluster;
mod idle;
mod probe;
mod rdma;
mod rdma_hosts;
mod ring;
mod router;
mod signals;
mod stats;
mod table;
mod tcp;

use clap::Parser;
use cli::{print_report, Cli, DefaultCores, Experiment};
use std::process::ExitCode;

fn run(experiment: Experiment) -> Result<(), String> {
    let cores = DefaultCores::of_this_machine();
    match experiment {
        Experiment::Ring(a) => {
            let r = ring::run(&a.options(cores), &mut |e| a.output.progress(e))?;
            a.output.report(&r, table::ring)
        }
        Experiment::Idle(a) => {
            let r = idle::run(&a.options(cores), &mut |e| a.output.progress(e))?;
            a.output.report(&r, table::idle)
        }
        Experiment::Tcp(a) => {
            let r = tcp::run_experiment(&a.options(), &mut |e| a.output.progress(e))?;
            a.output.report(&r, table::tcp)
        }
        Experiment::Rdma(a) if a.hosts == 2 => {
            let r = rdma_hosts::run(&a.hosts_options(cores), &mut |e| a.output.progress(e))?;
            a.output.report(&r, table::rdma_hosts)
        }
        Experiment::Rdma(a) => {
            let r = rdma::run(&a.options(cores), &mut |e| a.output.progress(e))?;
            a.output.report(&r, table::rdma)
        }
        Experiment::Cluster(a) => {
            let r = cluster::run_experiment(&a.options(), &mut |e| a.output.progress(e))?;
            a.output.report(&r, table::cluster)
        }
        Experiment::ClusterWatch { dir } => cluster::watch(&dir),
        Experiment::ClusterHold { dir, kind } => cluster::hold(&dir, &kind),
        Experiment::Probe(a) => {
            let r = probe::run(&a.dir, a.samples)?;
            print_report(a.json, &r, table::probe)
        }
        Experiment::TcpServer { port } => tcp::serve(port),
        Experiment::TcpClient {
            addr,
            seconds,
            samples,
            setups,
        } => tcp::client(addr, seconds, samples, setups),
        Experiment::TcpRequests {
            addr,
            clients,
            seconds,
        } => tcp::requests(addr, clients, seconds),
        Experiment::Hold { dir, seconds } => idle::hold(&dir, seconds),
    }
}

fn main() -> ExitCode {
    // Wrong arguments: clap prints why (and the usage) and exits with 2.
    let cli = Cli::parse();
    match run(cli.experiment) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("freeflow-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
