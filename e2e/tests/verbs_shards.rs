//! RDMA mode with two router shards (`freeflow up --cores 0,1`): a container's verbs
//! attachments go to the shard its overlay address picks (`shard_of`: the address modulo the
//! number of shards), so 10.32.0.2 is served by shard 0 and 10.32.0.3 by shard 1. Two QPs on
//! different shards of one router connect through the socket pairs between the shards (the
//! frames of the router-to-router transport); across hosts, the accepting shard hands a
//! connection to the shard serving the container its hello names. Debian's unmodified
//! `ibv_rc_pingpong` and the every-opcode C probe run between containers on different
//! shards, on one host and across two hosts; status shows which shard did the work. A router
//! with two shards killed (then stopped) under cross-host WRITE streams from both shards of
//! the other router: every stream fails with RETRY_EXC_ERR then WR_FLUSH_ERR, and once the
//! daemon restarted it, new QPs on both shards of both routers run every opcode.
//!
//! Needs root, a built workspace, ibverbs-utils and libibverbs-dev (scripts/test.sh installs
//! them). The Site scaffolding is in common/mod.rs.

mod common;

use common::{assert_pingpong_sides, describe, succeeded_saying, CProbe, Site, SiteSpec};
use std::process::{Output, Stdio};
use std::time::Duration;

/// Two shards on every host; server 10.32.0.2 (shard 0) on host `server_host`, client
/// 10.32.0.3 (shard 1) on host 0, both of tenant blue.
fn two_shard_site(prefix: &str, hosts: usize, server_host: usize) -> Site {
    common::require_programs(&["ibv_rc_pingpong"], "ibverbs-utils");
    Site::create_verbs(SiteSpec {
        prefix,
        work_prefix: "ff-verbs-shards",
        hosts,
        containers: &[
            (server_host, "server", [10, 32, 0, 2]),
            (0, "client", [10, 32, 0, 3]),
        ],
        registered: &[("server", "blue"), ("client", "blue")],
        up_args: &["--cores", "0,1"],
        verbs_timeout: 60,
        ..SiteSpec::default()
    })
}

fn assert_pingpong(site: &Site, what: &str, runs: &(Output, Output), iters: u64, size: u64) {
    for (who, text) in assert_pingpong_sides(site, what, runs, iters, size) {
        eprintln!("{who}: {}", text.trim_end().replace('\n', "\n    "));
    }
}

/// The verbs operations each shard of host `host`'s router executed, from `freeflow status
/// --json`.
fn ops_by_shard(site: &Site, host: usize) -> Vec<u64> {
    let status = site.router_status(host);
    let shards = status["router"]["shards"]
        .as_array()
        .unwrap_or_else(|| panic!("no shards in the status of host {host}: {status}"));
    shards
        .iter()
        .map(|s| s["verbs_ops"].as_u64().expect("verbs_ops"))
        .collect()
}

/// Asserts the routers' logs attached `container` on shard `shard` (and on no other).
fn assert_attached_on(site: &Site, container: &str, shard: usize) {
    let log = site.router_log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("container {container} ")) && l.contains(" as verbs "))
        .collect();
    assert!(!lines.is_empty(), "{container} never attached:\n{log}");
    for line in lines {
        assert!(line.ends_with(&format!("on shard {shard}")), "{line}");
    }
}

const PROBE: CProbe = CProbe {
    name: "cross_host_probe",
    source: include_str!("programs/verbs_cross_host_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-libverbs"],
};

/// The every-opcode and remote-error checks of `programs/verbs_cross_host_probe.c`, server in
/// `server`, client in `client`.
fn run_probe(site: &Site, port: u16) {
    run_probe_between(site, ("server", "10.32.0.2"), "client", port);
}

/// [`run_probe`] between any two containers: `server` is (name, overlay address).
fn run_probe_between(site: &Site, (server, server_ip): (&str, &str), client: &str, port: u16) {
    let probe = PROBE.build(&site.work);
    let server_run = site
        .verbs_app(server, &probe, &[])
        .args(["server", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening(server, port, None);
    let client_out = site
        .verbs_app(client, &probe, &[])
        .args(["client", server_ip, &port.to_string()])
        .output()
        .unwrap();
    let server_out = server_run.wait_with_output().unwrap();
    for (who, out) in [(client, &client_out), (server, &server_out)] {
        assert!(
            succeeded_saying(out, "checks passed"),
            "{who}: {}\n--- router log\n{}",
            describe(out),
            site.router_log()
        );
    }
}

#[test]
fn qps_on_two_shards_of_one_router_run_pingpong_and_every_opcode() {
    let site = two_shard_site("vsh", 1, 0);
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18540,
        &["-g", "0", "-c", "-s", "64", "-n", "1000"],
    );
    assert_pingpong(&site, "ibv_rc_pingpong across shards", &runs, 1000, 64);
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18541,
        &["-g", "0", "-c", "-e", "-s", "100000", "-n", "50"],
    );
    assert_pingpong(&site, "ibv_rc_pingpong -e across shards", &runs, 50, 100000);
    assert_attached_on(&site, "server", 0);
    assert_attached_on(&site, "client", 1);
    // Each shard executed its own container's sends: at least the pingpong's iterations.
    let ops = ops_by_shard(&site, 0);
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert!(
        ops.iter().all(|&n| n >= 1000),
        "verbs ops by shard: {ops:?}"
    );
    run_probe(&site, 18542);
    let log = site.router_log();
    assert!(!log.contains("verbs: dropped"), "{log}");
}

#[test]
fn qps_on_different_shards_of_two_routers_run_pingpong_and_every_opcode() {
    // The server (10.32.0.2) on host 1 is served by its router's shard 0, the client
    // (10.32.0.3) on host 0 by shard 1: shard 1 of host 0 connects to host 1 itself.
    let site = two_shard_site("vsx", 2, 1);
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18543,
        &["-g", "0", "-c", "-s", "64", "-n", "1000"],
    );
    assert_pingpong(&site, "ibv_rc_pingpong across hosts", &runs, 1000, 64);
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18544,
        &["-g", "0", "-c", "-e", "-s", "1048576", "-n", "20"],
    );
    assert_pingpong(&site, "ibv_rc_pingpong -e across hosts", &runs, 20, 1 << 20);
    run_probe(&site, 18545);
    let (client_host, server_host) = (ops_by_shard(&site, 0), ops_by_shard(&site, 1));
    assert!(
        client_host[1] >= 1000 && client_host[0] == 0,
        "host 0: {client_host:?}"
    );
    assert!(
        server_host[0] >= 1000 && server_host[1] == 0,
        "host 1: {server_host:?}"
    );
}

/// Two hosts with two shards each, a pair of containers per shard: on host 1, server
/// (10.32.0.2, on shard 0) and server2 (10.32.0.5, on shard 1); on host 0, client (10.32.0.3,
/// on shard 1) and client2 (10.32.0.4, on shard 0), all of tenant blue. client talks to
/// server and client2 to server2, so every shard of both routers has a QP of a cross-host
/// pair.
fn four_container_site(prefix: &str) -> Site {
    Site::create_verbs(SiteSpec {
        prefix,
        work_prefix: "ff-verbs-shards",
        hosts: 2,
        containers: &[
            (1, "server", [10, 32, 0, 2]),
            (1, "server2", [10, 32, 0, 5]),
            (0, "client", [10, 32, 0, 3]),
            (0, "client2", [10, 32, 0, 4]),
        ],
        registered: &[
            ("server", "blue"),
            ("server2", "blue"),
            ("client", "blue"),
            ("client2", "blue"),
        ],
        up_args: &["--cores", "0,1"],
        verbs_timeout: 90,
        ..SiteSpec::default()
    })
}

/// The (server, its overlay address, client) pairs of [`four_container_site`].
const PAIRS: [(&str, &str, &str); 2] = [
    ("server", "10.32.0.2", "client"),
    ("server2", "10.32.0.5", "client2"),
];

#[test]
fn a_two_shard_router_killed_under_cross_host_traffic_fails_both_shards_qps_and_serves_again() {
    let site = four_container_site("vsk");
    let probe = PROBE.build(&site.work);
    // A kill (the kernel resets every connection) and a clean stop (the router closes them),
    // each restarted by the daemon.
    for (round, (signal, name)) in [(libc::SIGKILL, "SIGKILL"), (libc::SIGTERM, "SIGTERM")]
        .into_iter()
        .enumerate()
    {
        let base = 18550 + 10 * round as u16;
        // WRITE streams from both shards of host 0 to both shards of host 1.
        let mut servers = Vec::new();
        let mut clients = Vec::new();
        for (k, (server, server_ip, client)) in PAIRS.into_iter().enumerate() {
            let port = (base + k as u16).to_string();
            let run = site
                .verbs_app(server, &probe, &[])
                .args(["stream-server", &port])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            servers.push(run);
            site.wait_listening(server, base + k as u16, None);
            let (run, stdout, first) = common::spawn_reading_first_line(
                site.verbs_app(client, &probe, &[])
                    .args(["stream-client", server_ip, &port])
                    .stderr(Stdio::piped()),
            );
            assert!(
                first.starts_with("STREAMING"),
                "{name}: {client} said {first:?}\n--- router log\n{}",
                site.router_log()
            );
            clients.push((client, run, stdout));
        }
        // Both shards of host 0 carry a stream, and both of host 1 serve one.
        let (requesters, responders) = (ops_by_shard(&site, 0), ops_by_shard(&site, 1));
        assert!(
            requesters.len() == 2 && requesters.iter().all(|&n| n > 0),
            "{name}: host 0's verbs ops by shard: {requesters:?}"
        );
        assert_eq!(responders.len(), 2, "{name}: host 1: {responders:?}");

        let old = site.router_status(1)["router"]["pid"].as_i64().unwrap() as i32;
        // SAFETY: kill has no memory preconditions; the pid is host 1's router, which this
        // test's site started.
        assert_eq!(unsafe { libc::kill(old, signal) }, 0);
        // Each stream's first failure is RETRY_EXC_ERR, every WRITE behind it flushed: the
        // probe checks it and exits (its loop and the site's timeout bound the wait).
        for (client, mut run, mut stdout) in clients {
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
            let status = run.wait().unwrap();
            eprintln!("{name}: {client} after the stop: {}", rest.trim_end());
            assert!(
                status.success()
                    && rest.contains("then RETRY_EXC_ERR")
                    && rest.contains("checks passed"),
                "{name}: {client}: {status}: {rest}\n--- router log\n{}",
                site.router_log()
            );
        }
        for mut run in servers {
            let _ = run.kill();
            let _ = run.wait();
        }

        // The daemon restarts the router; new QPs on both shards of both routers reach it.
        let restarted = common::poll(Duration::from_secs(30), Duration::from_millis(100), || {
            site.router_status(1)["router"]["pid"]
                .as_i64()
                .filter(|p| *p as i32 != old)
        });
        assert!(restarted.is_some(), "{name}: {}", site.router_log());
        for (k, (server, server_ip, client)) in PAIRS.into_iter().enumerate() {
            run_probe_between(&site, (server, server_ip), client, base + 5 + k as u16);
        }
    }
    // Each container's contexts were served by the shard its address picks, before and
    // after the restarts.
    for (container, shard) in [("server", 0), ("server2", 1), ("client", 1), ("client2", 0)] {
        assert_attached_on(&site, container, shard);
    }
}
