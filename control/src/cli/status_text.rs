//! The text form of `freeflow status`: a [`StatusReport`] as aligned lines for a person, one
//! function per block (settings, daemon, router, counters, containers, attached shims).

use std::time::Duration;

use freeflow_proto::control::RouterStatus;

use super::output::print_table;
use super::status::{DaemonReport, StatusReport};
use crate::daemon::DaemonCounters;
use crate::supervise::{format_duration, format_unix_ms, unix_ms_now};

/// Prints `report` on stdout.
pub(super) fn print(report: &StatusReport) {
    print_settings(report);
    print_daemon(&report.daemon);
    print_router(report);
    if report.daemon.reported() {
        print_daemon_counters(&report.daemon.counters);
    }
    if let Ok(router) = report.router.status() {
        print_router_counters(router);
    }
    print_containers(report);
    if let Ok(router) = report.router.status() {
        print_attached(router);
    }
}

/// How long ago a time in ms since the epoch was.
fn ms_ago(ms: u64) -> Duration {
    Duration::from_millis(unix_ms_now().saturating_sub(ms))
}

/// The directory, and the host and registry of its settings (or why there are none).
fn print_settings(report: &StatusReport) {
    out!("freeflow in {}", report.dir.display());
    match &report.config {
        Some(c) => {
            out!(
                "  host:       {} (overlay {}, peer port {})",
                c.host_ip,
                c.vnet_prefix,
                c.peer_port
            );
            out!("  registry:   {}", c.registry);
        }
        None => out!(
            "  config:     {}",
            report.config_error.as_deref().unwrap_or("missing")
        ),
    }
}

/// Whether the daemon runs, its pid, uptime and state.
fn print_daemon(daemon: &DaemonReport) {
    if !daemon.running {
        out!("  daemon:     not running");
        return;
    }
    out!(
        "  daemon:     running, pid {}{}",
        daemon.pid.map(|p| p.to_string()).unwrap_or("?".into()),
        match (&daemon.state, daemon.started_unix_ms) {
            (Some(state), Some(started)) => {
                format!(", up {}, {state}", format_duration(ms_ago(started)))
            }
            _ => String::new(),
        }
    );
}

/// Whether the router runs: pid, uptime and version, or why not and when the next start is.
fn print_router(report: &StatusReport) {
    match report.router.status() {
        Ok(rs) => out!(
            "  router:     running, pid {}, up {}, version {}{}",
            rs.pid,
            format_duration(Duration::from_millis(rs.uptime_ms)),
            rs.version,
            if report.daemon.counters.router_adopted {
                ", adopted by this daemon (an earlier one started it)"
            } else {
                ""
            }
        ),
        Err(e) => out!(
            "  router:     not running ({e}){}",
            report
                .daemon
                .counters
                .next_restart_unix_ms
                .map(|t| format!(", next start at {}", format_unix_ms(t)))
                .unwrap_or_default()
        ),
    }
}

/// The daemon's restarts, its last push of the table, skipped containers, its last error.
fn print_daemon_counters(d: &DaemonCounters) {
    out!(
        "  restarts:   {}{}{}",
        d.restarts,
        if d.start_failures > 0 {
            format!(" ({} failed)", d.start_failures)
        } else {
            String::new()
        },
        match (&d.last_exit, d.last_exit_unix_ms) {
            (Some(why), Some(at)) => format!(
                "; last exit: {why}, {} ago ({})",
                format_duration(ms_ago(at)),
                format_unix_ms(at)
            ),
            _ => String::new(),
        }
    );
    match (d.containers_pushed, d.last_push_unix_ms) {
        (Some(n), Some(at)) => out!(
            "  table:      {n} container(s) pushed {} ago (registry generation {})",
            format_duration(ms_ago(at)),
            d.registry_generation.unwrap_or(0)
        ),
        _ => out!("  table:      not pushed to the current router yet"),
    }
    for skipped in &d.skipped {
        out!("  skipped:    {}: {}", skipped.name, skipped.reason);
    }
    if let Some(e) = &d.last_error {
        out!("  error:      {e}");
    }
    if let Some(w) = &d.docker {
        out!(
            "  docker:     {} {} for {} ({}); {} registered, {} unregistered, {} refused, {} \
             malformed",
            if w.connected {
                "following"
            } else {
                "not connected to"
            },
            w.socket,
            format_duration(ms_ago(w.since_unix_ms)),
            format_unix_ms(w.since_unix_ms),
            w.registered,
            w.unregistered,
            w.refused,
            w.malformed
        );
        if let Some(e) = &w.last_error {
            out!("  docker error: {e}");
        }
    }
}

/// The router's attach and TCP-mode counters, and one line per shard.
fn print_router_counters(rs: &RouterStatus) {
    out!(
        "  attaches:   {} accepted, {} refused",
        rs.attaches_accepted,
        rs.attaches_refused
    );
    out!(
        "  tcp mode:   {} listener(s), {} connect(s) on the host network ({} on claimed ports), {} sent to the overlay, {} client(s) without Freeflow relayed",
        rs.tcp_listeners,
        rs.tcp_connects,
        rs.tcp_claimed,
        rs.tcp_fallbacks,
        rs.tcp_relayed
    );
    let jail = if rs.jail_active {
        "active"
    } else {
        "NOT active (see the router log)"
    };
    out!("  jail:       {jail}");
    for shard in &rs.shards {
        out!(
            "  shard {}:    core {}, {} attached, {} requests, {} wakeups, {} parks, {} protocol errors",
            shard.index,
            shard
                .core
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            shard.attached,
            shard.requests,
            shard.wakeups,
            shard.parks,
            shard.protocol_errors
        );
        out!(
            "              {} containers, {} QPs, {} verbs ops, {} bytes, busy {:.3} s",
            shard.containers,
            shard.qps,
            shard.verbs_ops,
            shard.verbs_bytes,
            shard.cpu_ns as f64 / 1e9
        );
    }
}

/// How many of this host's containers the registry and the router have, and their table.
fn print_containers(report: &StatusReport) {
    if let (Some(problem), Some(error)) = (report.registry.problem, &report.registry.error) {
        out!("containers of this host: unknown: the registry is {problem}: {error}");
    } else if report.config.is_some() {
        out!(
            "containers of this host: {} in the registry{}",
            report.containers.len(),
            match report.router.status() {
                Ok(rs) => format!(", {} registered with the router", rs.registered),
                Err(_) => String::new(),
            }
        );
    }
    if report.containers.is_empty() {
        return;
    }
    let rows = report.containers.iter().map(|c| {
        vec![
            c.name.clone(),
            c.tenant.clone(),
            c.ip.to_string(),
            c.netns.display().to_string(),
        ]
    });
    print_table(&["NAME", "TENANT", "IP", "NETNS"], rows, "  ");
}

/// The shims attached to the router.
fn print_attached(rs: &RouterStatus) {
    out!("attached shims: {}", rs.attached.len());
    if rs.attached.is_empty() {
        return;
    }
    let rows = rs.attached.iter().map(|a| {
        vec![
            a.id.to_string(),
            a.container.clone(),
            a.pid.to_string(),
            a.shard.map_or_else(|| "-".into(), |s| s.to_string()),
            a.kind.clone(),
        ]
    });
    print_table(&["ID", "CONTAINER", "PID", "SHARD", "KIND"], rows, "  ");
}
