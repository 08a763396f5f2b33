//! RDMA mode with two router shards (`freeflow up --cores 0,1`): a container's verbs
//! attachments go to the shard its overlay address picks (`shard_of`: the address modulo the
//! number of shards), so 10.32.0.2 is served by shard 0 and 10.32.0.3 by shard 1. Two QPs on
//! different shards of one router connect through the socket pairs between the shards (the
//! frames of the router-to-router transport); across hosts, the accepting shard hands a
//! connection to the shard serving the container its hello names. Debian's unmodified
//! `ibv_rc_pingpong` and the every-opcode C probe run between containers on different
//! shards, on one host and across two hosts; status shows which shard did the work.
//!
//! Needs root, a built workspace, ibverbs-utils and libibverbs-dev (scripts/test.sh installs
//! them). The Site scaffolding is in common/mod.rs.

mod common;

use common::{assert_pingpong_sides, describe, succeeded_saying, CProbe, Site, SiteSpec};
use std::process::{Output, Stdio};

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

/// Asserts the router log of host 0 attached `container` on shard `shard` (and on no other).
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
    let probe = PROBE.build(&site.work);
    let server = site
        .verbs_app("server", &probe, &[])
        .args(["server", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening("server", port, None);
    let client = site
        .verbs_app("client", &probe, &[])
        .args(["client", "10.32.0.2", &port.to_string()])
        .output()
        .unwrap();
    let server = server.wait_with_output().unwrap();
    for (who, out) in [("client", &client), ("server", &server)] {
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
