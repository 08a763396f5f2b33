//! freeflow-bench: Freeflow's experiments. Each prints a table, or JSON with `--json`.
//!
//! No unsafe code: its system calls are `freeflow-os`'s.
#![deny(unsafe_code)]

mod idle;
mod probe;
mod rdma;
mod ring;
mod router;
mod signals;
mod stats;
mod tcp;

use std::process::ExitCode;

const USAGE: &str = "usage: freeflow-bench <experiment> [options]

experiments:
  ring [--json] [--reps N] [--samples N] [--messages N] [--app-core N] [--router-core N]
      round trip of a request through a shared-memory ring to a router shard and back
      (p50/p99/p99.9), and one-way throughput of batched messages
  idle [--json] [--containers N] [--seconds N] [--router-core N]      (root)
      router CPU with N attached containers that do nothing
  tcp [--json] [--reps N] [--seconds S] [--samples N] [--setups N] [--tag T]      (root)
      two simulated hosts: host link vs overlay vs Freeflow, side by side: one-stream
      throughput, 64-byte round trip, connection setup (connect to first byte), connections/s;
      the cluster's namespaces are ff-T-* (T: 1 to 8 of a-z 0-9); Ctrl-C removes everything
  rdma [--json] [--reps N] [--messages N] [--samples N] [--bw-ops N] [--app-core N] [--router-core N]      (root)
      two QPs of one host through the router's software engine: 64-byte SEND/RECV and
      RDMA WRITE message rate, SEND round trip (p50/p99), 64 KiB RDMA WRITE bandwidth against
      memcpy on the application's core, router CPU per operation (needs cc and libibverbs-dev);
      Ctrl-C removes everything
  probe DIR [--json] [--samples N]
      attach to the router serving DIR from this process's network namespace (a registered
      container) and time round trips through it; a refusal is printed with the router's reason";

fn cores() -> (usize, usize) {
    let ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|c| c.id)
        .collect();
    let first = ids.first().copied().unwrap_or(0);
    let last = ids.last().copied().unwrap_or(0);
    (first, last)
}

struct Args {
    json: bool,
    values: std::collections::HashMap<String, String>,
}

impl Args {
    fn parse(args: &[String], allowed: &[&str]) -> Result<Args, String> {
        let mut json = false;
        let mut values = std::collections::HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--json" {
                json = true;
            } else if let Some(name) = a.strip_prefix("--").filter(|n| allowed.contains(n)) {
                let v = it.next().ok_or(format!("--{name} needs a value"))?;
                values.insert(name.to_string(), v.clone());
            } else {
                return Err(format!("unknown argument {a:?}\n{USAGE}"));
            }
        }
        Ok(Args { json, values })
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.values.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{name}: bad value {v:?}")),
        }
    }
}

fn run() -> Result<(), String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(experiment) = argv.first() else {
        return Err(USAGE.into());
    };
    let rest = &argv[1..];
    let (app_default, router_default) = cores();
    let mut progress = |msg: &str| eprintln!("[freeflow-bench] {msg}");
    match experiment.as_str() {
        "ring" => {
            let a = Args::parse(
                rest,
                &["reps", "samples", "messages", "app-core", "router-core"],
            )?;
            let opts = ring::Options {
                reps: a.get("reps", 5)?,
                rtt_samples: a.get("samples", 200_000)?,
                messages: a.get("messages", 20_000_000)?,
                app_core: a.get("app-core", app_default)?,
                router_core: a.get("router-core", router_default)?,
            };
            let r = ring::run(&opts, &mut progress)?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "ring: app on core {}, router shard on core {}, {}-byte slots, batches of {}",
                    r.app_core, r.router_core, r.slot_bytes, r.batch
                );
                println!("{:<28}{:>14}", "metric (median of reps)", "value");
                println!("{:<28}{:>11} ns", "round trip p50", r.rtt_p50_ns);
                println!("{:<28}{:>11} ns", "round trip p99", r.rtt_p99_ns);
                println!("{:<28}{:>11} ns", "round trip p99.9", r.rtt_p999_ns);
                println!(
                    "{:<28}{:>10.1} M/s",
                    "one-way messages",
                    r.msgs_per_sec / 1e6
                );
                println!(
                    "{:<28}{:>11.1} ns",
                    "router CPU per message", r.router_cpu_ns_per_msg
                );
            }
        }
        "idle" => {
            let a = Args::parse(rest, &["containers", "seconds", "router-core"])?;
            let opts = idle::Options {
                containers: a.get("containers", 50)?,
                seconds: a.get("seconds", 10)?,
                router_core: a.get("router-core", router_default)?,
            };
            let r = idle::run(&opts, &mut progress)?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "idle: {} attached containers, router used {:.3}% of a core over {:.1} s ({} parks, {} wake-ups)",
                    r.attached, r.router_cpu_percent, r.seconds, r.router_parks, r.router_wakeups
                );
            }
        }
        "rdma" => {
            let a = Args::parse(
                rest,
                &[
                    "reps",
                    "messages",
                    "samples",
                    "bw-ops",
                    "app-core",
                    "router-core",
                ],
            )?;
            let opts = rdma::Options {
                reps: a.get("reps", 3)?,
                messages: a.get("messages", 5_000_000)?,
                samples: a.get("samples", 100_000)?,
                bw_ops: a.get("bw-ops", 200_000)?,
                app_core: a.get("app-core", app_default)?,
                router_core: a.get("router-core", router_default)?,
            };
            let r = rdma::run(&opts, &mut progress)?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
                );
            } else {
                let m = &r.median;
                println!(
                    "rdma: two QPs of one host through the router's software engine; application on core {}, router on core {}; medians of {} repetitions",
                    r.app_core, r.router_core, r.repetitions
                );
                println!("{:<34}{:>14}{:>18}", "metric", "value", "router CPU/op");
                println!(
                    "{:<34}{:>10.2} M/s{:>15.0} ns",
                    "64 B SEND/RECV message rate", m.send_mops, m.router_ns_per_send
                );
                println!(
                    "{:<34}{:>10.2} M/s{:>15.0} ns",
                    "64 B RDMA WRITE message rate", m.write_mops, m.router_ns_per_write
                );
                println!(
                    "{:<34}{:>11.2} us{:>15.0} ns",
                    "64 B SEND round trip p50", m.rtt_p50_us, m.router_ns_per_round_trip
                );
                println!(
                    "{:<34}{:>11.2} us",
                    "64 B SEND round trip p99", m.rtt_p99_us
                );
                println!(
                    "{:<34}{:>9.2} GB/s{:>15.0} ns",
                    "64 KiB RDMA WRITE bandwidth",
                    m.write_gbytes_per_sec,
                    m.router_ns_per_64k_write
                );
                println!(
                    "{:<34}{:>9.2} GB/s",
                    "memcpy of 64 KiB, one core", m.memcpy_gbytes_per_sec
                );
                println!("RDMA WRITE bandwidth / memcpy: {:.2}", m.write_vs_memcpy);
            }
        }
        "probe" => {
            let dir = rest.first().ok_or("probe DIR")?;
            let a = Args::parse(&rest[1..], &["samples"])?;
            let r = probe::run(std::path::Path::new(dir), a.get("samples", 20_000)?)?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "probe: attached as container {} ({}, tenant {}) on shard {}: round trip p50 {} ns, p99 {} ns",
                    r.container, r.ip, r.tenant, r.shard, r.rtt_p50_ns, r.rtt_p99_ns
                );
            }
        }
        "tcp" => {
            let a = Args::parse(rest, &["reps", "seconds", "samples", "setups", "tag"])?;
            let opts = tcp::Options {
                reps: a.get("reps", 3)?,
                seconds: a.get("seconds", 2.0)?,
                rtt_samples: a.get("samples", 20_000)?,
                setups: a.get("setups", 1_000)?,
                tag: a.values.get("tag").cloned(),
            };
            let r = tcp::run_experiment(&opts, &mut progress)?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "tcp between two simulated hosts, medians of {} repetitions",
                    r.repetitions
                );
                println!(
                    "{:<10}{:>12}{:>12}{:>12}{:>13}{:>13}{:>12}{:>12}",
                    "path",
                    "Gbit/s",
                    "rtt p50 us",
                    "rtt p99 us",
                    "setup p50 us",
                    "setup p99 us",
                    "connect p50",
                    "conns/s"
                );
                for p in &r.paths {
                    let m = &p.median;
                    println!(
                        "{:<10}{:>12.2}{:>12.1}{:>12.1}{:>13.1}{:>13.1}{:>12.1}{:>12.0}",
                        p.path,
                        m.gbit_per_sec,
                        m.rtt_p50_us,
                        m.rtt_p99_us,
                        m.setup_p50_us,
                        m.setup_p99_us,
                        m.connect_p50_us,
                        m.conns_per_sec
                    );
                }
                let f = &r.freeflow_vs_host;
                let o = &r.overlay_vs_host;
                println!(
                    "freeflow/host: throughput {:.2}x, round trip {:.2}x, setup {:.2}x",
                    f.throughput, f.rtt_p50, f.setup_p50
                );
                println!(
                    "overlay/host:  throughput {:.2}x, round trip {:.2}x, setup {:.2}x",
                    o.throughput, o.rtt_p50, o.setup_p50
                );
            }
        }
        "tcp-server" => {
            let port = rest
                .first()
                .and_then(|p| p.parse().ok())
                .ok_or("tcp-server PORT")?;
            tcp::serve(port)?;
        }
        "tcp-client" => {
            let usage = "tcp-client ADDR SECONDS SAMPLES SETUPS";
            let addr = rest.first().and_then(|a| a.parse().ok()).ok_or(usage)?;
            let num = |i: usize| rest.get(i).and_then(|v| v.parse::<f64>().ok()).ok_or(usage);
            tcp::client(addr, num(1)?, num(2)? as u64, num(3)? as u64)?;
        }
        "hold" => {
            let dir = rest.first().ok_or("hold DIR SECONDS")?;
            let seconds = rest.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
            idle::hold(std::path::Path::new(dir), seconds)?;
        }
        "-h" | "--help" | "help" => println!("{USAGE}"),
        other => return Err(format!("unknown experiment {other:?}\n{USAGE}")),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("freeflow-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
