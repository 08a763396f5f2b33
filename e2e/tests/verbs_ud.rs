//! RDMA mode, unreliable transports end to end: Debian's unmodified `ibv_ud_pingpong` and
//! `ibv_uc_pingpong` between two registered containers of one simulated host (several sizes,
//! polling and completion events), perftest over UD and UC (`ib_send_lat -c UD`,
//! `ib_send_bw -c UD`, `ib_write_bw -c UC`), and a C probe (`programs/verbs_ud_probe.c`) for
//! what the programs do not show: address handles, qkeys (a wrong one is dropped, a privileged
//! one is EPERM), the GRH area in front of each UD receive and the completion's fields,
//! `ibv_init_ah_from_wc`, the MTU limit, the operations each transport refuses, UC's silent
//! drops, and a UD send to another tenant's QP number, which delivers nothing.
//!
//! Needs root, a built workspace (`cargo build --workspace`), ibverbs-utils, perftest and
//! libibverbs-dev (scripts/test.sh installs them). The Site scaffolding is in common/mod.rs.

mod common;

use common::{assert_pingpong_sides, describe, succeeded_saying, CProbe, Site, SiteSpec};
use std::process::Output;

impl Site {
    /// One host with Freeflow up; containers server, client (tenant blue) and other (tenant red)
    /// registered.
    fn new(prefix: &str) -> Site {
        Site::create_verbs(SiteSpec {
            prefix,
            work_prefix: "ff-verbs-ud",
            hosts: 1,
            containers: common::SERVER_CLIENT_OTHER,
            registered: common::BLUE_BLUE_RED,
            verbs_timeout: 60,
            ..SiteSpec::default()
        })
    }

    /// The same containers on two hosts: client on host 0; server and other on host 1.
    fn two_hosts(prefix: &str) -> Site {
        Site::create_verbs(SiteSpec {
            prefix,
            work_prefix: "ff-verbs-udx",
            hosts: 2,
            containers: &[
                (1, "server", [10, 32, 0, 2]),
                (0, "client", [10, 32, 0, 3]),
                (1, "other", [10, 32, 0, 4]),
            ],
            registered: &[("server", "blue"), ("client", "blue"), ("other", "red")],
            verbs_timeout: 60,
            ..SiteSpec::default()
        })
    }
}

/// Checks a pingpong run of `program` (both sides exit 0, report the transfer and both GIDs).
fn assert_pingpong(site: &Site, program: &str, runs: &(Output, Output), iters: u64, size: u64) {
    for (who, text) in assert_pingpong_sides(site, program, runs, iters, size) {
        eprintln!(
            "{program} {who}: {}",
            text.trim_end().replace('\n', "\n    ")
        );
    }
}

#[test]
fn unmodified_ibv_ud_pingpong_runs_between_two_containers() {
    let site = Site::new("vud");
    // The port's MTU (1024) is the largest UD message; receives are 40 bytes longer (GRH).
    let runs = site.pingpong("ibv_ud_pingpong", 18531, &["-g", "0", "-c", "-s", "1024"]);
    assert_pingpong(&site, "ibv_ud_pingpong", &runs, 1000, 1024);
    let runs = site.pingpong(
        "ibv_ud_pingpong",
        18532,
        &["-g", "0", "-c", "-e", "-s", "512", "-n", "500"],
    );
    assert_pingpong(&site, "ibv_ud_pingpong", &runs, 500, 512);
    let runs = site.pingpong(
        "ibv_ud_pingpong",
        18533,
        &["-g", "0", "-c", "-s", "1", "-n", "2000"],
    );
    assert_pingpong(&site, "ibv_ud_pingpong", &runs, 2000, 1);
    // Beyond the MTU the program refuses by itself, from the port's attributes.
    let out = site.run_verbs_app("server", "ibv_ud_pingpong", &["-g", "0", "-s", "2048"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("larger than port MTU (1024)"),
        "{}",
        describe(&out)
    );
}

#[test]
fn unmodified_ibv_uc_pingpong_runs_between_two_containers() {
    let site = Site::new("vuc");
    let runs = site.pingpong("ibv_uc_pingpong", 18541, &["-g", "0", "-c", "-n", "1000"]);
    assert_pingpong(&site, "ibv_uc_pingpong", &runs, 1000, 4096);
    let runs = site.pingpong(
        "ibv_uc_pingpong",
        18542,
        &["-g", "0", "-c", "-e", "-n", "500"],
    );
    assert_pingpong(&site, "ibv_uc_pingpong", &runs, 500, 4096);
    let runs = site.pingpong(
        "ibv_uc_pingpong",
        18543,
        &["-g", "0", "-c", "-s", "64", "-n", "2000"],
    );
    assert_pingpong(&site, "ibv_uc_pingpong", &runs, 2000, 64);
    let runs = site.pingpong(
        "ibv_uc_pingpong",
        18544,
        &["-g", "0", "-c", "-e", "-s", "100000", "-n", "50"],
    );
    assert_pingpong(&site, "ibv_uc_pingpong", &runs, 50, 100000);
}

#[test]
fn unmodified_perftest_runs_over_ud_and_uc() {
    let site = Site::new("vup");
    site.perftest_row("ib_send_lat", &["-c", "UD"], 18551, 64, 1000);
    // A datagram that finds no receive posted is dropped (as on the wire), and the receiving
    // side would wait for it for ever: the bandwidth tests send no more messages than the
    // receiver posts receives before the start (its rx_depth, 512).
    site.perftest_row("ib_send_bw", &["-c", "UD"], 18552, 1024, 500);
    site.perftest_row("ib_write_bw", &["-c", "UC"], 18553, 65536, 1000);
    site.perftest_row("ib_send_bw", &["-c", "UC"], 18554, 4096, 500);
}

/// The C side of the checks below, built against the installed headers and the system's
/// libibverbs.
const PROBE: CProbe = CProbe {
    name: "ud_probe",
    source: include_str!("programs/verbs_ud_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-libverbs"],
};

#[test]
fn address_handles_qkeys_grh_errors_and_tenant_isolation() {
    probe_checks(&Site::new("vuq"));
}

#[test]
fn ud_crosses_hosts_through_the_routers_and_still_reaches_no_other_tenant() {
    let site = Site::two_hosts("vux");
    // The other tenant and the server are on the other host: their datagrams go router to
    // router, and that router makes the checks.
    probe_checks(&site);
    let runs = site.pingpong("ibv_ud_pingpong", 18561, &["-g", "0", "-c", "-s", "1024"]);
    assert_pingpong(&site, "ibv_ud_pingpong across hosts", &runs, 1000, 1024);
    let runs = site.pingpong(
        "ibv_ud_pingpong",
        18562,
        &["-g", "0", "-c", "-e", "-s", "100", "-n", "300"],
    );
    assert_pingpong(&site, "ibv_ud_pingpong across hosts", &runs, 300, 100);
    // UC across hosts rides the RC transport (acknowledged underneath).
    let runs = site.pingpong("ibv_uc_pingpong", 18563, &["-g", "0", "-c", "-n", "300"]);
    assert_pingpong(&site, "ibv_uc_pingpong across hosts", &runs, 300, 4096);
}

/// The probe's checks from client, with a UD QP held by other (tenant red) and one by server
/// (the client's tenant).
fn probe_checks(site: &Site) {
    let probe = PROBE.build(&site.work);
    // A UD QP of another tenant, and one of the client's own tenant, each with receives posted.
    let red = site.hold("other", &probe);
    let blue = site.hold("server", &probe);
    let (red_qpn, blue_qpn) = (red.first_line.trim(), blue.first_line.trim());
    assert!(
        red_qpn.parse::<u32>().is_ok() && blue_qpn.parse::<u32>().is_ok(),
        "holders said {red_qpn:?} and {blue_qpn:?}"
    );
    let out = site.run_verbs_app(
        "client",
        &probe,
        &["checks", "10.32.0.4", red_qpn, "10.32.0.2", blue_qpn],
    );
    assert!(
        succeeded_saying(&out, "checks passed"),
        "{}\n--- router log\n{}",
        describe(&out),
        site.router_log()
    );
    // The client's sends completed before it exited, and a datagram is delivered before its
    // send completes: what the holders have now is all they will get.
    let red = red.finish();
    let red_text = String::from_utf8_lossy(&red.stdout);
    assert!(
        succeeded_saying(&red, "checks passed") && red_text.contains("received 0"),
        "the other tenant's QP got something: {}",
        describe(&red)
    );
    let blue = blue.finish();
    let blue_text = String::from_utf8_lossy(&blue.stdout);
    eprintln!(
        "client: {}",
        String::from_utf8_lossy(&out.stdout).trim_end()
    );
    eprintln!("other (red): {}", red_text.trim_end());
    eprintln!("server (blue): {}", blue_text.trim_end());
    assert!(
        succeeded_saying(&blue, "checks passed")
            && blue_text.contains("received 1")
            && blue_text.contains("datagram success from 10.32.0.3 to 10.32.0.2, 72 bytes"),
        "the server's QP: {}",
        describe(&blue)
    );
}
