//! RDMA mode across hosts: Debian's unmodified `ibv_rc_pingpong` between two registered
//! containers on two simulated hosts, through Freeflow's `libibverbs.so.1`, each host's
//! router and the router-to-router verbs transport on the host link (see
//! docs/verbs-engine.md, "Across hosts"). Polling (`-c`: the received data is validated) and
//! completion events (`-e`), 64 B (inline) to 1 MiB messages. Then a C program, server on one
//! host and client on the other, runs every opcode and every remote error across hosts (RNR
//! with its retries, a QP number not connected to the sender), and a container of another
//! tenant cannot even connect. Debian's unmodified `ibv_srq_pingpong` (16 QPs on one shared
//! receive queue per side) and perftest (`ib_write_bw`, `ib_read_lat`, `ib_send_lat`,
//! `ib_atomic_lat` with fetch-and-add and compare-and-swap) run across hosts too.
//!
//! Needs root, a built workspace (`cargo build --workspace`), ibverbs-utils and
//! libibverbs-dev (scripts/test.sh installs them). The Site scaffolding is in common/mod.rs.

mod common;

use common::{
    assert_pingpong_sides, describe, succeeded_saying, CProbe, LineWatch, Site, SiteSpec,
};
use std::os::unix::process::ExitStatusExt;
use std::process::{Output, Stdio};
use std::time::Duration;

impl Site {
    /// Two hosts with Freeflow up: server (10.32.0.2) on host 1, client (10.32.0.3) on host 0,
    /// both of tenant blue; other (10.32.0.4, tenant red) on host 0.
    fn new(prefix: &str) -> Site {
        common::require_programs(&["ibv_rc_pingpong"], "ibverbs-utils");
        Site::create_verbs(SiteSpec {
            prefix,
            work_prefix: "ff-verbs-xh",
            hosts: 2,
            containers: &[
                (1, "server", [10, 32, 0, 2]),
                (0, "client", [10, 32, 0, 3]),
                (0, "other", [10, 32, 0, 4]),
            ],
            registered: &[("server", "blue"), ("client", "blue"), ("other", "red")],
            verbs_timeout: 60,
            ..SiteSpec::default()
        })
    }
}

/// Checks a pingpong run across hosts (both sides exit 0, report the transfer and both GIDs).
fn assert_pingpong(site: &Site, runs: &(Output, Output), iters: u64, size: u64) {
    for (who, text) in
        assert_pingpong_sides(site, "ibv_rc_pingpong across hosts", runs, iters, size)
    {
        eprintln!("{who}: {}", text.trim_end().replace('\n', "\n    "));
    }
}

#[test]
fn unmodified_ibv_rc_pingpong_runs_between_two_hosts() {
    let site = Site::new("vxp");
    // Small messages (inline data), polling, data validated.
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18530,
        &["-g", "0", "-c", "-s", "64", "-n", "1000"],
    );
    assert_pingpong(&site, &runs, 1000, 64);
    // Completion events.
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18531,
        &["-g", "0", "-c", "-e", "-s", "64", "-n", "500"],
    );
    assert_pingpong(&site, &runs, 500, 64);
    // 1 MiB messages, polling and events.
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18532,
        &["-g", "0", "-c", "-s", "1048576", "-n", "20"],
    );
    assert_pingpong(&site, &runs, 20, 1 << 20);
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18533,
        &["-g", "0", "-c", "-e", "-s", "1048576", "-n", "20"],
    );
    assert_pingpong(&site, &runs, 20, 1 << 20);
    // The work requests went on the routers' transport: a connection between the two hosts'
    // addresses on the verbs port (the peer port, 7471, + 1), nothing dropped.
    let out = site
        .in_host(0, "ss")
        .args(["-tn", "state", "established"])
        .output()
        .unwrap();
    let connections = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        connections.contains("192.168.1.1:") && connections.contains("192.168.1.2:7472"),
        "{connections}"
    );
    let log = site.router_log();
    assert!(!log.contains("verbs: dropped"), "{log}");
}

#[test]
fn another_tenant_on_another_host_is_unreachable() {
    let site = Site::new("vxt");
    // other (tenant red, host 0) names server (tenant blue, host 1): the router refuses the
    // destination at RTR (ENETUNREACH), both programs exit with an error, neither hangs.
    let server = site
        .verbs_app("server", "ibv_rc_pingpong", &[])
        .args(["-g", "0", "-p", "18534"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening("server", 18534, None);
    let client = site
        .verbs_app("other", "ibv_rc_pingpong", &[])
        .args(["-g", "0", "-p", "18534", "10.32.0.2"])
        .output()
        .unwrap();
    let server = server.wait_with_output().unwrap();
    for (who, out) in [("other", &client), ("server", &server)] {
        assert_eq!(out.status.signal(), None, "{who}: {}", describe(out));
        assert_ne!(out.status.code(), Some(0), "{who}: {}", describe(out));
    }
    assert!(
        String::from_utf8_lossy(&server.stderr).contains("Couldn't connect to remote QP"),
        "{}",
        describe(&server)
    );
}

#[test]
fn a_peer_registered_a_moment_ago_on_another_host_is_waited_for_at_rtr() {
    // The client's router has not heard of the server yet when the client moves its QP to RTR
    // (its host's daemon is stopped: the registry's news does not reach that router). A real
    // device would connect; Freeflow's library asks again until the router knows the
    // destination (FREEFLOW_ROUTE_WAIT_MS), instead of failing with ENETUNREACH at once.
    common::require_programs(&["ibv_rc_pingpong"], "ibverbs-utils");
    let site = Site::create_verbs(SiteSpec {
        prefix: "vxw",
        work_prefix: "ff-verbs-xh",
        hosts: 2,
        containers: &[(1, "server", [10, 32, 0, 2]), (0, "client", [10, 32, 0, 3])],
        registered: &[("client", "blue")],
        verbs_timeout: 60,
        ..SiteSpec::default()
    });
    let stopped = site.stop_daemon(0);
    site.register("server", "blue");
    let mut server = site
        .verbs_app("server", "ibv_rc_pingpong", &[])
        .args(["-g", "0", "-c", "-s", "64", "-n", "100", "-p", "18537"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening("server", 18537, Some(&mut server));
    let mut client = site
        .verbs_app(
            "client",
            "ibv_rc_pingpong",
            &[("FREEFLOW_DEBUG", "1"), ("FREEFLOW_ROUTE_WAIT_MS", "30000")],
        )
        .args([
            "-g",
            "0",
            "-c",
            "-s",
            "64",
            "-n",
            "100",
            "-p",
            "18537",
            "10.32.0.2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The client's library says when it starts waiting; only then does its router learn.
    let mut said = LineWatch::new(client.stderr.take().unwrap());
    let waited = said.wait_for(
        "does not know the destination 10.32.0.2 yet",
        Duration::from_secs(30),
    );
    drop(stopped);
    let client = client.wait_with_output().unwrap();
    let client_stderr = said.finish();
    let server = server.wait_with_output().unwrap();
    assert!(
        waited,
        "the client never waited for its router to learn the server: {}\n{client_stderr}",
        describe(&client)
    );
    let client = Output {
        stderr: client_stderr.into_bytes(),
        ..client
    };
    assert_pingpong(&site, &(server, client), 100, 64);
}

/// The two sides of the cross-host checks (tests/programs/verbs_cross_host_probe.c), built
/// against the installed headers and the system's libibverbs.
const PROBE: CProbe = CProbe {
    name: "cross_host_probe",
    source: include_str!("programs/verbs_cross_host_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-libverbs"],
};

#[test]
fn every_opcode_and_remote_error_across_hosts() {
    let site = Site::new("vxo");
    let probe = PROBE.build(&site.work);
    let server = site
        .verbs_app("server", &probe, &[])
        .args(["server", "18535"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening("server", 18535, None);
    let client = site
        .verbs_app("client", &probe, &[])
        .args(["client", "10.32.0.2", "18535"])
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
fn unmodified_perftest_runs_between_two_hosts() {
    common::require_built(&["libfreeflow_providers.so"]);
    let site = Site::new("vxf");
    site.perftest_row("ib_write_bw", &["-x", "0"], 18536, 65536, 500);
    site.perftest_row("ib_read_lat", &["-x", "0"], 18537, 64, 300);
    site.perftest_row("ib_send_lat", &["-x", "0"], 18538, 64, 300);
    // Atomics (fetch-and-add, then compare-and-swap) executed by the server's router on the
    // server's memory, the original value returned across the link.
    site.perftest_row("ib_atomic_lat", &["-x", "0"], 18541, 8, 300);
    site.perftest_row(
        "ib_atomic_lat",
        &["-x", "0", "-A", "CMP_AND_SWAP"],
        18542,
        8,
        300,
    );
}

#[test]
fn unmodified_ibv_srq_pingpong_runs_between_two_hosts() {
    common::require_programs(&["ibv_srq_pingpong"], "ibverbs-utils");
    let site = Site::new("vxs");
    // 16 QPs (the default) on one SRQ per side, polling; then completion events; then 4 QPs
    // with 50 receives posted at a time.
    for (port, args, iters, size) in [
        (18543, vec!["-g", "0", "-n", "1000"], 1000u64, 4096u64),
        (
            18544,
            vec!["-g", "0", "-e", "-n", "300", "-s", "64"],
            300,
            64,
        ),
        (
            18545,
            vec!["-g", "0", "-q", "4", "-r", "50", "-n", "500"],
            500,
            4096,
        ),
    ] {
        let runs = site.pingpong("ibv_srq_pingpong", port, &args);
        let what = format!("ibv_srq_pingpong across hosts {args:?}");
        for (who, text) in assert_pingpong_sides(&site, &what, &runs, iters, size) {
            eprintln!("{who} {args:?}: {}", text.lines().last().unwrap_or(""));
        }
    }
    let log = site.router_log();
    assert!(!log.contains("verbs: dropped"), "{log}");
}

/// A hostile peer on a registered host's address: a connection to host 1's verbs port whose
/// hello is garbage, and one with a good hello (version 3, naming the server's address) and a
/// frame claiming 4 GiB of payload.
const GARBAGE_PEER: &str = r#"
import socket, struct, sys
for hello, frame in [(b"GARBAGE!" * 2, b"x" * 64),
                     (b"FFVR" + struct.pack("<HH", 3, 0) + bytes([192, 168, 1, 1])
                      + bytes([10, 32, 0, 2]),
                      bytes([3, 0, 0, 0]) + struct.pack("<I", 0xFFFFFFFF) + bytes(64))]:
    s = socket.create_connection(("192.168.1.2", 7472), timeout=5)
    s.sendall(hello + frame)
    s.settimeout(5)
    got = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    # A good hello is answered (16 bytes) before the bad frame is read; nothing more.
    print("closed by the router" if len(got) in (0, 16) else "answered")
"#;

#[test]
fn a_killed_peer_router_fails_the_transfer_and_a_garbage_peer_only_its_connection() {
    let site = Site::new("vxk");
    let probe = PROBE.build(&site.work);
    let mut server = site
        .verbs_app("server", &probe, &[])
        .args(["stream-server", "18539"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    site.wait_listening("server", 18539, None);
    let (mut client, mut stdout, first) = common::spawn_reading_first_line(
        site.verbs_app("client", &probe, &[])
            .args(["stream-client", "10.32.0.2", "18539"])
            .stderr(Stdio::piped()),
    );
    assert!(first.starts_with("STREAMING"), "client said {first:?}");

    // Garbage from host 0's address: each connection is dropped, the stream goes on.
    let out = site
        .in_host(0, "python3")
        .args(["-c", GARBAGE_PEER])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.matches("closed by the router").count(),
        2,
        "{}",
        describe(&out)
    );
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.starts_with("STREAMING"), "after the garbage: {line:?}");
    let log = site.router_log();
    assert!(
        log.contains("dropped the connection from the router of 192.168.1.1: bad hello")
            && log.contains("dropped the connection from the router of 192.168.1.1: bad frame"),
        "{log}"
    );

    // The server's router dies under the stream.
    let old = site.router_status(1)["router"]["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill has no memory preconditions; the pid is the router this test started.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = client.wait().unwrap();
    eprintln!("client after the kill: {rest}");
    assert!(
        status.success() && rest.contains("then RETRY_EXC_ERR") && rest.contains("checks passed"),
        "{status}: {rest}\n--- router log\n{}",
        site.router_log()
    );
    let _ = server.kill();
    let _ = server.wait();

    // The daemon restarts the router; new QPs reach it.
    let restarted = common::poll(Duration::from_secs(30), Duration::from_millis(100), || {
        site.router_status(1)["router"]["pid"]
            .as_i64()
            .filter(|p| *p as i32 != old)
    });
    assert!(restarted.is_some(), "{}", site.router_log());
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18540,
        &["-g", "0", "-c", "-s", "64", "-n", "50"],
    );
    assert_pingpong(&site, &runs, 50, 64);
}
