//! Prometheus metrics of one host, in the text exposition format (version 0.0.4): what
//! `freeflow status` gathers (the daemon's status file, the router's answer on `router.ctl`, the
//! registry) as counters and gauges. `freeflow status --prometheus` prints them once; the daemon
//! started with `freeflow up --metrics ADDR` serves them on `GET /metrics` (`http`).
//!
//! Labels are `shard` (the router's shard index) and `tenant` only, never a container or a
//! connection, so the number of series stays bounded by the shards and tenants. Per tenant: the
//! router's TCP counters (connects on the host network, fallbacks, relayed clients) and what the
//! control plane knows per container (registered, attached), summed by tenant. The router
//! reports no RDMA operation or byte counts yet.

pub mod http;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use freeflow_proto::control::{RouterStatus, ShardStatus, TenantTcpStatus};

use crate::cli::{CliError, StatusReport};
use crate::config::RuntimeDir;
use crate::registry::{self, Snapshot};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What one scrape reads: the status report and, if it could be read, the whole registry.
pub struct Scrape {
    /// What `freeflow status` shows.
    pub status: StatusReport,
    /// The registry (all hosts); `None` when unreadable or without settings.
    pub registry: Option<Snapshot>,
}

impl Scrape {
    /// Reads everything for `dir`, as `freeflow status` does, plus the whole registry.
    pub fn gather(dir: &RuntimeDir) -> Result<Scrape, CliError> {
        let status = StatusReport::gather(dir)?;
        let registry = status
            .config
            .as_ref()
            .and_then(|c| registry::open(&c.registry).and_then(|r| r.load()).ok());
        Ok(Scrape { status, registry })
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        self.daemon(&mut out);
        if let Ok(router) = self.status.router.status() {
            router_metrics(router, &mut out);
            shard_metrics(router, &mut out);
        } else {
            out.gauge(
                "freeflow_router_up",
                "Whether the router answers.",
                [(None, 0.0)],
            );
        }
        self.tenants(&mut out);
        out.text
    }

    fn daemon(&self, out: &mut Exposition) {
        let daemon = &self.status.daemon;
        let counters = &daemon.counters;
        out.gauge(
            "freeflow_daemon_up",
            "Whether the control daemon runs.",
            [(None, flag(daemon.running))],
        );
        out.counter(
            "freeflow_router_restarts_total",
            "Router starts after the first one, by the daemon now running.",
            [(None, counters.restarts as f64)],
        );
        out.counter(
            "freeflow_router_start_failures_total",
            "Router starts that failed (it died or hung before it was ready).",
            [(None, counters.start_failures as f64)],
        );
        if let Some(generation) = counters.registry_generation {
            out.gauge(
                "freeflow_router_table_revision",
                "Registry revision the router's container table reflects.",
                [(None, generation as f64)],
            );
        }
        out.gauge(
            "freeflow_skipped_containers",
            "Containers of this host left out of the router's table (see freeflow status).",
            [(None, counters.skipped.len() as f64)],
        );
        out.gauge(
            "freeflow_registry_up",
            "Whether the registry could be read.",
            [(None, flag(self.registry.is_some()))],
        );
        if let Some(snapshot) = &self.registry {
            out.gauge(
                "freeflow_registry_revision",
                "The registry's revision (one more on every update).",
                [(None, snapshot.generation as f64)],
            );
            out.gauge(
                "freeflow_registry_hosts",
                "Hosts the registry knows.",
                [(None, snapshot.hosts.len() as f64)],
            );
        }
    }

    /// Containers registered (all hosts) and attached here, per tenant.
    fn tenants(&self, out: &mut Exposition) {
        let Some(snapshot) = &self.registry else {
            return;
        };
        let mut registered: BTreeMap<&str, f64> = BTreeMap::new();
        let mut attached: BTreeMap<&str, f64> = BTreeMap::new();
        for c in &snapshot.containers {
            *registered.entry(&c.tenant).or_default() += 1.0;
            // Every known tenant has an attachments series, 0 until one attaches.
            attached.entry(&c.tenant).or_default();
        }
        if let Ok(router) = self.status.router.status() {
            for a in &router.attached {
                if let Some(c) = snapshot.container(&a.container) {
                    *attached.entry(&c.tenant).or_default() += 1.0;
                }
            }
        }
        let by_tenant = |m: BTreeMap<&str, f64>| {
            m.into_iter()
                .map(|(t, v)| (Some(("tenant", t.to_owned())), v))
                .collect::<Vec<_>>()
        };
        out.gauge(
            "freeflow_registry_containers",
            "Containers the registry knows (all hosts), by tenant.",
            by_tenant(registered),
        );
        out.gauge(
            "freeflow_attachments",
            "Shims (socket and verbs) attached to this host's router, by tenant.",
            by_tenant(attached),
        );
    }
}

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

fn router_metrics(router: &RouterStatus, out: &mut Exposition) {
    out.gauge(
        "freeflow_router_up",
        "Whether the router answers.",
        [(None, 1.0)],
    );
    out.gauge(
        "freeflow_router_uptime_seconds",
        "Time since the router started.",
        [(None, router.uptime_ms as f64 / 1000.0)],
    );
    out.gauge(
        "freeflow_router_containers",
        "Containers in the router's table (this host's registered containers).",
        [(None, router.registered as f64)],
    );
    out.counter(
        "freeflow_attaches_accepted_total",
        "Attach requests the router accepted.",
        [(None, router.attaches_accepted as f64)],
    );
    out.counter(
        "freeflow_attaches_refused_total",
        "Attach requests the router refused.",
        [(None, router.attaches_refused as f64)],
    );
    let per_tenant = |value: &dyn Fn(&TenantTcpStatus) -> u64| {
        router
            .tcp_by_tenant
            .iter()
            .map(|t| (Some(("tenant", t.tenant.clone())), value(t) as f64))
            .collect::<Vec<_>>()
    };
    out.counter(
        "freeflow_tcp_host_connects_total",
        "TCP connections set up on the host network, by the connecting container's tenant.",
        per_tenant(&|t| t.connects),
    );
    out.counter(
        "freeflow_tcp_fallbacks_total",
        "TCP connects sent back to the overlay (destination not accelerated), by tenant.",
        per_tenant(&|t| t.fallbacks),
    );
    out.counter(
        "freeflow_tcp_relayed_total",
        "Clients without Freeflow relayed to an accelerated listener, by the listener's tenant.",
        per_tenant(&|t| t.relayed),
    );
    out.counter(
        "freeflow_tcp_claimed_total",
        "TCP connects to other hosts on a host port claimed in advance.",
        [(None, router.tcp_claimed as f64)],
    );
    out.gauge(
        "freeflow_tcp_listeners",
        "Accelerated TCP listeners on this host.",
        [(None, router.tcp_listeners as f64)],
    );
}

fn shard_metrics(router: &RouterStatus, out: &mut Exposition) {
    let per_shard = |value: &dyn Fn(&ShardStatus) -> f64| {
        router
            .shards
            .iter()
            .map(|s| (Some(("shard", s.index.to_string())), value(s)))
            .collect::<Vec<_>>()
    };
    out.gauge(
        "freeflow_shard_attachments",
        "Verbs attachments the shard serves.",
        per_shard(&|s| s.attached as f64),
    );
    out.counter(
        "freeflow_shard_requests_total",
        "Requests the shard took from its attachments' rings.",
        per_shard(&|s| s.requests as f64),
    );
    out.counter(
        "freeflow_shard_parks_total",
        "Times the shard went to sleep after spinning without work.",
        per_shard(&|s| s.parks as f64),
    );
    out.counter(
        "freeflow_shard_wakeups_total",
        "Times the shard woke from sleep (a doorbell, a connection event or a timer).",
        per_shard(&|s| s.wakeups as f64),
    );
    out.counter(
        "freeflow_shard_cpu_seconds_total",
        "CPU time of the shard's thread: serving requests, or spinning before it parks.",
        per_shard(&|s| s.cpu_ns as f64 / 1e9),
    );
    out.counter(
        "freeflow_shard_parked_seconds_total",
        "Time the shard spent parked: asleep until a doorbell, using no CPU.",
        per_shard(&|s| s.parked_ns as f64 / 1e9),
    );
    out.gauge(
        "freeflow_shard_containers",
        "Containers with an attachment on the shard.",
        per_shard(&|s| s.containers as f64),
    );
    out.gauge(
        "freeflow_shard_qps",
        "QPs of the shard's verbs engine.",
        per_shard(&|s| s.qps as f64),
    );
    out.counter(
        "freeflow_shard_verbs_ops_total",
        "Send work requests the shard's verbs engine executed.",
        per_shard(&|s| s.verbs_ops as f64),
    );
    out.counter(
        "freeflow_shard_verbs_bytes_total",
        "Payload bytes of the send work requests the shard's verbs engine executed.",
        per_shard(&|s| s.verbs_bytes as f64),
    );
    out.counter(
        "freeflow_shard_protocol_errors_total",
        "Ring protocol violations by attachments (each detached).",
        per_shard(&|s| s.protocol_errors as f64),
    );
}

/// The exposition being written: one `# HELP` and `# TYPE` per family, then its samples.
#[derive(Default)]
struct Exposition {
    text: String,
}

/// One sample: its label (name, value), if any, and its value.
type Sample = (Option<(&'static str, String)>, f64);

impl Exposition {
    fn counter(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = Sample>) {
        self.family(name, "counter", help, samples);
    }

    fn gauge(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = Sample>) {
        self.family(name, "gauge", help, samples);
    }

    fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = Sample>,
    ) {
        let out = &mut self.text;
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (label, value) in samples {
            match label {
                Some((key, v)) => {
                    let _ = writeln!(out, "{name}{{{key}=\"{}\"}} {value}", escape_label(&v));
                }
                None => {
                    let _ = writeln!(out, "{name} {value}");
                }
            }
        }
    }
}

/// A HELP text with `\` and line feeds escaped, as the format requires.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A label value with `\`, `"` and line feeds escaped.
fn escape_label(value: &str) -> String {
    escape_help(value).replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_type_and_labelled_samples() {
        let mut out = Exposition::default();
        out.counter(
            "x_total",
            "a \\ b\nc",
            [
                (Some(("shard", "0".into())), 3.0),
                (Some(("tenant", "q\"\\\n".into())), 0.5),
            ],
        );
        out.gauge("y", "h", [(None, 1.0)]);
        assert_eq!(
            out.text,
            "# HELP x_total a \\\\ b\\nc\n# TYPE x_total counter\nx_total{shard=\"0\"} 3\n\
             x_total{tenant=\"q\\\"\\\\\\n\"} 0.5\n# HELP y h\n# TYPE y gauge\ny 1\n"
        );
    }
}
