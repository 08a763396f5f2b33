//! RDMA mode, the extended verbs API end to end: Debian's unmodified `ibv_rc_pingpong` with the
//! new post API (`-N`: `ibv_create_qp_ex`, `ibv_qp_to_qp_ex`, `ibv_wr_start` / `ibv_wr_send` /
//! `ibv_wr_set_sge` / `ibv_wr_complete`) and with completion timestamps (`-t`:
//! `ibv_query_device_ex`, `ibv_create_cq_ex`, `ibv_start_poll` and the `ibv_wc_read_*`
//! functions), alone, together and with completion events, between two registered containers
//! of one simulated host; then a C probe of every operation of the `ibv_wr_*` API, the poll
//! API's fields, timestamps against the program's own CLOCK_MONOTONIC, and the refusals (XRC,
//! memory windows, wall-clock timestamps, undeclared operations). (perftest 4.5 takes the new
//! API only on devices it knows by vendor part id (ConnectX, BlueField, EFA, HNS), so on ffv0 it
//! posts with `ibv_post_send`, as its `ibv_wr* API: OFF` line says.)
//!
//! Needs root, a built workspace (`cargo build --workspace`), ibverbs-utils and libibverbs-dev
//! (scripts/test.sh installs them). The Site scaffolding is in common/mod.rs.

mod common;

use common::{assert_pingpong_sides, describe, succeeded_saying, CProbe, Site, SiteSpec};
use std::process::Output;

fn site(prefix: &str) -> Site {
    Site::create_verbs(SiteSpec {
        prefix,
        work_prefix: "ff-verbs-ex",
        hosts: 1,
        containers: &[(0, "server", [10, 32, 0, 2]), (0, "client", [10, 32, 0, 3])],
        registered: &[("server", "blue"), ("client", "blue")],
        verbs_timeout: 60,
        ..SiteSpec::default()
    })
}

/// Checks a pingpong run (both sides exit 0 and report their transfer); with `timestamps`,
/// both report the receive completions' clock deltas, which only a CQ with timestamps gives.
fn assert_pingpong(site: &Site, runs: &(Output, Output), iters: u64, size: u64, timestamps: bool) {
    for (who, text) in assert_pingpong_sides(site, "ibv_rc_pingpong", runs, iters, size) {
        if timestamps {
            assert!(
                text.contains("Average receive completion clock cycles = "),
                "{who}: {text}"
            );
            let min = text
                .lines()
                .find_map(|l| l.strip_prefix("Min receive completion clock cycles = "))
                .and_then(|v| v.trim().parse::<u64>().ok());
            // The deltas between consecutive receive completions: real times, never zero
            // (each receive completes after the peer's reply to the one before).
            assert!(min.is_some_and(|m| m > 0), "{who}: {text}");
        }
        eprintln!("{who}: {}", text.trim_end().replace('\n', "\n    "));
    }
}

#[test]
fn unmodified_ibv_rc_pingpong_with_the_new_post_api_and_timestamps() {
    let site = site("vex");
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18531,
        &["-g", "0", "-c", "-N", "-n", "500"],
    );
    assert_pingpong(&site, &runs, 500, 4096, false);
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18532,
        &["-g", "0", "-c", "-t", "-n", "500"],
    );
    assert_pingpong(&site, &runs, 500, 4096, true);
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18533,
        &["-g", "0", "-c", "-N", "-t", "-s", "64", "-n", "1000"],
    );
    assert_pingpong(&site, &runs, 1000, 64, true);
    // Completion events with the new post API. (Not with -t: its event loop treats a CQ
    // found empty after an event as a failure, and an event for a completion that the previous
    // poll already took is what a real device delivers too, since the program re-arms before
    // it polls.)
    let runs = site.pingpong(
        "ibv_rc_pingpong",
        18534,
        &["-g", "0", "-c", "-N", "-e", "-n", "300"],
    );
    assert_pingpong(&site, &runs, 300, 4096, false);
}

/// The C side (its own file, to be readable and compilable by hand), built against the
/// installed headers and the system's libibverbs.
const PROBE: CProbe = CProbe {
    name: "ex_probe",
    source: include_str!("programs/verbs_ex_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-libverbs"],
};

#[test]
fn every_operation_of_the_wr_api_and_the_cq_poll_api() {
    let site = site("vew");
    let probe = PROBE.build(&site.work);
    let out = site.run_verbs_app("client", &probe, &[]);
    assert!(
        succeeded_saying(&out, "checks passed"),
        "{}\n--- router log\n{}",
        describe(&out),
        site.router_log()
    );
}
