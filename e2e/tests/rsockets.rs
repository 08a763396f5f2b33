//! RDMA mode, rsockets (docs/rsockets.md): Debian's unmodified `rstream` (librdmacm-utils)
//! streams between two containers over Freeflow's `librdmacm.so.1` (RC QPs of ffv0 set up with
//! its rdma_cm), on one host and across two, and so does `riostream` (riomap, riowrite); an
//! unmodified TCP program (iperf3) runs over rsockets with
//! Debian's `librspreload.so`; a peer killed mid-stream, or the router, ends the other
//! side's run (both sides') with an error, not a hang. One test prints rstream's figures over
//! rsockets and over TCP (docs/rsockets.md).
//!
//! Needs root, a built workspace (`cargo build --workspace`), rdmacm-utils and iperf3
//! (scripts/test.sh installs them). The Site scaffolding is in common/mod.rs.

mod common;

use common::{assert_both_succeeded, describe, stdout_text, CProbe, Site, SiteSpec};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

/// Debian's preload library: TCP calls of an unmodified program go to the r* functions of the
/// librdmacm.so.1 on the library path (ours).
const RSPRELOAD: &str = "/usr/lib/x86_64-linux-gnu/rsocket/librspreload.so";

/// One host (server, client, other of another tenant), or two (server on host 0, the others
/// on host 1).
fn site(prefix: &str, hosts: usize) -> Site {
    common::require_programs(&["rstream", "riostream"], "rdmacm-utils");
    let h = hosts - 1;
    let site = Site::create_verbs(SiteSpec {
        prefix,
        work_prefix: "ff-rsockets",
        hosts,
        containers: &[
            (0, "server", [10, 32, 0, 2]),
            (h, "client", [10, 32, 0, 3]),
            (h, "other", [10, 32, 0, 4]),
        ],
        registered: common::BLUE_BLUE_RED,
        verbs_timeout: 90,
        ..SiteSpec::default()
    });
    assert!(
        site.dirs[0].join("verbs/librdmacm.so.1").is_file(),
        "freeflow up did not install verbs/librdmacm.so.1"
    );
    site
}

impl Site {
    /// The server side in container `server`: see [`Site::start_cm_server`].
    fn rs_server(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        listeners: u64,
    ) -> Child {
        self.start_cm_server("server", program, args, env, listeners)
    }

    fn rs_client(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.verbs_app("client", program, env)
            .args(args)
            .output()
            .unwrap()
    }
}

/// rstream's result rows: "name bytes xfers iters total time Gb/sec usec/xfer".
fn rstream_rows(out: &Output) -> Vec<String> {
    stdout_text(out)
        .lines()
        .filter(|l| l.contains("Gb/sec") || l.split_whitespace().count() == 8)
        .map(str::to_owned)
        .collect()
}

/// rstream server and client with `args` (both sides), which must both pass and print at
/// least one result row (the client's rows are returned).
fn rstream(site: &Site, args: &[&str]) -> Vec<String> {
    let mut server_args = vec!["-b", "10.32.0.2"];
    server_args.extend_from_slice(args);
    let mut client_args = vec!["-s", "10.32.0.2"];
    client_args.extend_from_slice(args);
    let listeners = site.router_counter(0, "cm_listeners");
    let server = site.rs_server("rstream", &server_args, &[], listeners + 1);
    let client = site.rs_client("rstream", &client_args, &[("FREEFLOW_DEBUG", "1")]);
    let server = server.wait_with_output().unwrap();
    assert_both_succeeded(site, &format!("rstream {args:?}"), &server, &client);
    let rows = rstream_rows(&client);
    assert!(
        rows.len() >= 2,
        "rstream {args:?}: no result rows: {}",
        describe(&client)
    );
    eprintln!("rstream {args:?}:\n{}", rows.join("\n"));
    rows
}

/// rstream's default mode (nonblocking calls and rpoll), nonblocking and asynchronous with
/// data verification, and blocking with 1 byte and 1 MB transfers.
fn rstream_variants(site: &Site) {
    rstream(site, &["-S", "65536", "-C", "200"]);
    rstream(site, &["-T", "n", "-T", "v", "-S", "100000", "-C", "100"]);
    rstream(site, &["-T", "a", "-T", "v", "-S", "1000", "-C", "500"]);
    rstream(site, &["-T", "b", "-S", "1", "-C", "1000"]);
    // Transfers of many messages each (1 MB, 16 slots of 64 KB), blocking, verified.
    rstream(site, &["-T", "b", "-T", "v", "-S", "1000000", "-C", "20"]);
}

#[test]
fn unmodified_rstream_streams_between_two_containers() {
    let site = site("rss", 1);
    rstream_variants(&site);
    assert!(site.router_counter(0, "cm_established") >= 5);
}

#[test]
fn across_hosts_unmodified_rstream_streams() {
    let site = site("rsx", 2);
    rstream_variants(&site);
}

/// riostream server and client with `args` (both sides), which must both pass and print a
/// result row (the client's rows are returned). riostream riomaps its buffer on both sides
/// (RDMA_IOMAPSIZE 1), riowrites into the peer's, and waits by reading the buffer's last byte
/// until the peer's marker is there (no call into the library): the writes land in its memory.
fn riostream(site: &Site, args: &[&str]) -> Vec<String> {
    let mut server_args = vec!["-b", "10.32.0.2"];
    server_args.extend_from_slice(args);
    let mut client_args = vec!["-s", "10.32.0.2"];
    client_args.extend_from_slice(args);
    let debug = [("FREEFLOW_DEBUG", "1")];
    let listeners = site.router_counter(0, "cm_listeners");
    let server = site.rs_server("riostream", &server_args, &debug, listeners + 1);
    let client = site.rs_client("riostream", &client_args, &debug);
    let server = server.wait_with_output().unwrap();
    assert_both_succeeded(site, &format!("riostream {args:?}"), &server, &client);
    let rows = rstream_rows(&client);
    assert!(
        rows.len() >= 2,
        "riostream {args:?}: no result rows: {}",
        describe(&client)
    );
    // Nothing failed along the way (riostream's exit status does not say every failure).
    for (who, out) in [("server", &server), ("client", &client)] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("riomap") && !err.contains("riowrite") && !err.contains("rsocket peer"),
            "riostream {who} {args:?}: {}",
            describe(out)
        );
    }
    eprintln!("riostream {args:?}:\n{}", rows.join("\n"));
    rows
}

/// riostream's default calls (nonblocking), blocking, and rpoll, with data verification, from
/// 1 byte to transfers of several slots (100000 bytes: two RDMA WRITEs each); `-C` writes per
/// turn (default 1000), `-I` turns (ping-pongs; default 1).
fn riostream_variants(site: &Site) {
    riostream(site, &["-S", "1000", "-C", "100", "-I", "10"]);
    riostream(
        site,
        &["-T", "n", "-T", "v", "-S", "100000", "-C", "20", "-I", "5"],
    );
    riostream(site, &["-T", "b", "-S", "65536", "-C", "50", "-I", "2"]);
    riostream(
        site,
        &["-T", "b", "-T", "v", "-S", "1", "-C", "1", "-I", "200"],
    );
    riostream(
        site,
        &["-T", "a", "-T", "v", "-S", "4096", "-C", "10", "-I", "20"],
    );
}

#[test]
fn unmodified_riostream_riowrites_between_two_containers() {
    let site = site("rsi", 1);
    riostream_variants(&site);
}

#[test]
fn across_hosts_unmodified_riostream_riowrites() {
    let site = site("rsj", 2);
    riostream_variants(&site);
}

/// The C side of the riomap/riowrite edges (its own file, readable and compilable by hand),
/// built against the installed headers and Debian's librdmacm (so it imports the r* functions
/// at rdma-core's versions, like riostream); it runs on Freeflow's library.
const IOMAP_PROBE: CProbe = CProbe {
    name: "rsockets_iomap_probe",
    source: include_str!("programs/rsockets_iomap_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-lrdmacm"],
};

#[test]
fn riomap_and_riowrite_refuse_what_rdma_iomapsize_and_the_maps_do_not_allow() {
    let site = site("rsm", 1);
    let probe = IOMAP_PROBE.build(&site.work);
    let probe = probe.to_str().unwrap();
    let debug = [("FREEFLOW_DEBUG", "1")];
    let server = site.rs_server(probe, &["server", "10.32.0.2", "7480"], &debug, 1);
    let client = site.rs_client(probe, &["client", "10.32.0.2", "7480"], &debug);
    let server = server.wait_with_output().unwrap();
    assert_both_succeeded(&site, "rsockets_iomap_probe", &server, &client);
    for (who, out) in [("server", &server), ("client", &client)] {
        assert!(
            stdout_text(out).contains(&format!("{who} checks passed")),
            "{}",
            describe(out)
        );
    }
    // Each refusal said why (FREEFLOW_DEBUG=1).
    let client_err = String::from_utf8_lossy(&client.stderr);
    assert!(
        client_err.contains("no map of the peer holds this offset"),
        "{}",
        describe(&client)
    );
}

/// iperf3 server and client, each through librspreload, `secs` seconds; returns the client's
/// output (its receiver's rate is checked to be there and positive).
fn iperf3(site: &Site, secs: &str) -> Output {
    common::require_programs(&["iperf3"], "iperf3");
    let preload = [("LD_PRELOAD", RSPRELOAD), ("FREEFLOW_DEBUG", "1")];
    let listeners = site.router_counter(0, "cm_listeners");
    let server = site.rs_server(
        "iperf3",
        &["-s", "-1", "-B", "10.32.0.2", "-p", "5301"],
        &preload,
        listeners + 1,
    );
    let client = site.rs_client(
        "iperf3",
        &["-c", "10.32.0.2", "-p", "5301", "-t", secs, "-f", "m"],
        &preload,
    );
    let server = server.wait_with_output().unwrap();
    assert_both_succeeded(site, "iperf3 over librspreload", &server, &client);
    let receiver = stdout_text(&client)
        .lines()
        .find(|l| l.trim_end().ends_with("receiver"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no receiver line: {}", describe(&client)));
    let rate: f64 = receiver
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1] == "Mbits/sec")
        .and_then(|w| w[0].parse().ok())
        .unwrap_or_else(|| panic!("no rate in {receiver:?}"));
    assert!(rate > 0.0, "{receiver}");
    eprintln!("iperf3 over rsockets: {receiver}");
    // The connections were rsockets: the router counted them (control and data).
    assert!(site.router_counter(0, "cm_established") >= 2);
    client
}

#[test]
fn iperf3_runs_over_rsockets_with_librspreload() {
    let site = site("rsp", 1);
    iperf3(&site, "3");
}

#[test]
fn across_hosts_iperf3_runs_over_rsockets_with_librspreload() {
    let site = site("rsq", 2);
    iperf3(&site, "3");
}

#[test]
fn a_peer_killed_mid_stream_ends_the_other_side_with_an_error_not_a_hang() {
    let site = site("rsk", 1);
    // A long run (10^6 transfers of 64 KB): the client is killed once the connection is up.
    let server = site.rs_server(
        "rstream",
        &["-b", "10.32.0.2", "-S", "65536", "-C", "1000000"],
        &[("FREEFLOW_DEBUG", "1")],
        1,
    );
    let mut client = site
        .verbs_app("client", "rstream", &[])
        .args(["-s", "10.32.0.2", "-S", "65536", "-C", "1000000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(site.wait_for_router_counter(0, "cm_established", 1), 1);
    // Some data moves before the kill.
    std::thread::sleep(Duration::from_millis(500));
    // The child is `timeout`; rstream is its child (killing `timeout` would leave it running).
    let rstream_pid: i32 =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", client.id()))
            .unwrap()
            .split_whitespace()
            .next()
            .expect("timeout has started rstream")
            .parse()
            .unwrap();
    freeflow_os::signals::send_signal(rstream_pid, libc::SIGKILL).unwrap();
    let _ = client.wait();
    // The server's run ends (the site's timeout would KILL it: that is the hang this test
    // catches) with a failure, since its transfers did not complete: its rrecv or rsend fails
    // with ECONNRESET (the peer went without its FIN).
    let server = server.wait_with_output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(
        server.status.signal().is_none()
            && !server.status.success()
            && String::from_utf8_lossy(&server.stderr).contains("Connection reset by peer"),
        "the server did not fail cleanly: {}\n--- router log\n{}",
        describe(&server),
        site.router_log()
    );
}

/// Bandwidth and latency of rstream over rsockets (one host: server and near on host 0;
/// across hosts: server on host 0, client on host 1) against rstream over TCP (`-T s`) between
/// the same hosts' namespaces (loopback on one host, the host link across), in one run. The
/// figures are printed for docs/rsockets.md; no threshold (the machine is shared).
#[test]
fn rstream_figures_against_tcp_in_one_run() {
    common::require_programs(&["rstream"], "rdmacm-utils");
    let site = Site::create_verbs(SiteSpec {
        prefix: "rsf",
        work_prefix: "ff-rsockets-f",
        hosts: 2,
        containers: &[
            (0, "server", [10, 32, 0, 2]),
            (1, "client", [10, 32, 0, 3]),
            (0, "near", [10, 32, 0, 5]),
        ],
        registered: &[("server", "blue"), ("client", "blue"), ("near", "blue")],
        verbs_timeout: 120,
        ..SiteSpec::default()
    });
    let bandwidth = ["-T", "b", "-S", "65536", "-C", "500"];
    let latency = ["-T", "b", "-S", "64", "-C", "1000"];
    // Loopback of host 0, for TCP on one host.
    let lo = site
        .in_host(0, "ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .unwrap();
    assert!(lo.status.success(), "{}", describe(&lo));
    let mut rows = Vec::new();
    for (what, args) in [("bandwidth", &bandwidth[..]), ("latency", &latency[..])] {
        for (label, from) in [("one host", "near"), ("across hosts", "client")] {
            let mut sargs = vec!["-b", "10.32.0.2"];
            sargs.extend_from_slice(args);
            let mut cargs = vec!["-s", "10.32.0.2"];
            cargs.extend_from_slice(args);
            let listeners = site.router_counter(0, "cm_listeners");
            let server = site.rs_server("rstream", &sargs, &[], listeners + 1);
            let client = site
                .verbs_app(from, "rstream", &[])
                .args(&cargs)
                .output()
                .unwrap();
            let server = server.wait_with_output().unwrap();
            assert_both_succeeded(&site, "rstream figures", &server, &client);
            let row = rstream_rows(&client).pop().expect("a result row");
            eprintln!("rsockets {label} {what}: {row}");
            rows.push(format!("rsockets {label} {what}: {row}"));
        }
        for (label, client_host, server_ip) in [
            ("one host", 0, "127.0.0.1"),
            ("across hosts", 1, "192.168.1.1"),
        ] {
            // Not rstream's default port 7471: Freeflow's routers listen on it on the hosts.
            let mut sargs = vec!["-T", "s", "-p", "17471", "-b", server_ip];
            sargs.extend_from_slice(args);
            let mut cargs = vec!["-T", "s", "-p", "17471", "-s", server_ip];
            cargs.extend_from_slice(args);
            let server = site
                .in_host(0, "timeout")
                .args(["-s", "KILL", "120", "rstream"])
                .args(&sargs)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The TCP server listens within moments; the client retries its connect a few
            // times (bounded) until it does.
            let mut client = None;
            for _ in 0..50 {
                let out = site
                    .in_host(client_host, "timeout")
                    .args(["-s", "KILL", "120", "rstream"])
                    .args(&cargs)
                    .output()
                    .unwrap();
                if out.status.success() {
                    client = Some(out);
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let client = client.expect("rstream -T s never connected");
            let server = server.wait_with_output().unwrap();
            assert!(server.status.success(), "{}", describe(&server));
            let row = rstream_rows(&client).pop().expect("a result row");
            eprintln!("TCP {label} {what}: {row}");
            rows.push(format!("TCP {label} {what}: {row}"));
        }
    }
    eprintln!("{}", rows.join("\n"));
    assert_eq!(rows.len(), 8);
}

#[test]
fn a_dead_router_ends_both_sides_with_an_error_not_a_hang() {
    let site = site("rsd", 1);
    let args = ["-T", "b", "-S", "65536", "-C", "1000000"];
    let mut sargs = vec!["-b", "10.32.0.2"];
    sargs.extend_from_slice(&args);
    let server = site.rs_server("rstream", &sargs, &[("FREEFLOW_DEBUG", "1")], 1);
    let mut cargs = vec!["-s", "10.32.0.2"];
    cargs.extend_from_slice(&args);
    let client = site
        .verbs_app("client", "rstream", &[("FREEFLOW_DEBUG", "1")])
        .args(&cargs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(site.wait_for_router_counter(0, "cm_established", 1), 1);
    std::thread::sleep(Duration::from_millis(500));
    let pid: i32 = std::fs::read_to_string(site.state_dir(0).join("router.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    freeflow_os::signals::send_signal(pid, libc::SIGKILL).unwrap();
    // Both runs end with their own error (the site's timeout would KILL a hung one).
    use std::os::unix::process::ExitStatusExt;
    for (who, out) in [
        ("server", server.wait_with_output().unwrap()),
        ("client", client.wait_with_output().unwrap()),
    ] {
        assert!(
            out.status.signal().is_none() && !out.status.success(),
            "{who} did not fail cleanly: {}",
            describe(&out)
        );
    }
}
