//! RDMA mode, reliable connections end to end: Debian's unmodified `ibv_rc_pingpong` between
//! two registered containers of one simulated host, through Freeflow's `libibverbs.so.1` and
//! the router's software engine; polling (`-c`: the data is validated) and completion events
//! (`-e`). Then a C program built against the installed headers checks the verbs one by one:
//! CQs, completion channels (poll(2) on the channel fd), the QP state machine and its attribute
//! masks, every opcode, inline data, unsignaled sends, scatter/gather lists, and the errors
//! (LOC_PROT_ERR, REM_ACCESS_ERR, RNR, WR_FLUSH_ERR, RETRY_EXC_ERR, ENETUNREACH, EINVAL).
//!
//! Under strace, polling an empty CQ and posting receives make no system call on a core the
//! router does not use (on the router's core, a poll loop that finds nothing yields the core
//! now and then, and does nothing else), and posting a list of sends at most one (the doorbell
//! of a parked router). Containers cannot use each
//! other's QP numbers or keys, and one that writes garbage into its queue is detached alone.
//!
//! Needs root, a built workspace (`cargo build --workspace`), ibverbs-utils, libibverbs-dev and
//! strace (scripts/test.sh installs them). The Site scaffolding is in common/mod.rs.

mod common;

use common::{
    assert_pingpong_sides, between_markers, describe, succeeded_saying, CProbe, Site, SiteSpec,
};
use std::process::Output;

impl Site {
    /// One host with Freeflow up; containers server, client (tenant blue) and other (tenant red)
    /// registered.
    fn new(prefix: &str) -> Site {
        Site::create_verbs(SiteSpec {
            prefix,
            work_prefix: "ff-verbs-rc",
            hosts: 1,
            containers: common::SERVER_CLIENT_OTHER,
            registered: common::BLUE_BLUE_RED,
            verbs_timeout: 60,
            ..SiteSpec::default()
        })
    }
}

/// Runs `ibv_rc_pingpong ARGS` as server in `server` and as client (naming the server's
/// overlay address) in `client`; returns both outputs.
fn pingpong(site: &Site, port: u16, args: &[&str]) -> (Output, Output) {
    site.pingpong("ibv_rc_pingpong", port, args)
}

/// Checks a pingpong run: both sides exit 0, report their transfer, and show the GIDs of both
/// containers (their overlay addresses).
fn assert_pingpong(site: &Site, runs: &(Output, Output), iters: u64, size: u64) {
    for (who, text) in assert_pingpong_sides(site, "ibv_rc_pingpong", runs, iters, size) {
        assert!(text.contains("local address:  LID 0x0000"), "{who}: {text}");
        eprintln!("{who}: {}", text.trim_end().replace('\n', "\n    "));
    }
}

#[test]
fn unmodified_ibv_rc_pingpong_runs_between_two_containers() {
    let site = Site::new("vrc");
    // Polling, with the received data validated, at the default size (4 KiB: through the
    // registered buffer, not inline).
    let runs = pingpong(&site, 18515, &["-g", "0", "-c", "-n", "1000"]);
    assert_pingpong(&site, &runs, 1000, 4096);
    // Completion events: the program sleeps in ibv_get_cq_event on the channel's fd.
    let runs = pingpong(&site, 18516, &["-g", "0", "-c", "-e", "-n", "500"]);
    assert_pingpong(&site, &runs, 500, 4096);
    // Small messages (inline data) and several sizes.
    let runs = pingpong(&site, 18517, &["-g", "0", "-c", "-s", "64", "-n", "2000"]);
    assert_pingpong(&site, &runs, 2000, 64);
    let runs = pingpong(
        &site,
        18518,
        &["-g", "0", "-c", "-e", "-s", "100000", "-n", "50"],
    );
    assert_pingpong(&site, &runs, 50, 100000);
}

/// The C side of the checks below (its own file, to be readable and compilable by hand), built
/// against the installed headers and the system's libibverbs (so it imports the verbs with
/// rdma-core's symbol versions, like any Debian binary).
const PROBE: CProbe = CProbe {
    name: "qp_probe",
    source: include_str!("programs/verbs_rc_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-libverbs"],
};

#[test]
fn every_verb_and_every_error_as_rdma_core_reports_them() {
    let site = Site::new("vrq");
    let probe = PROBE.build(&site.work);
    let out = site.run_verbs_app("client", &probe, &["checks", "10.32.0.4"]);
    assert!(
        succeeded_saying(&out, "checks passed"),
        "{}\n--- router log\n{}",
        describe(&out),
        site.router_log()
    );
}

#[test]
fn polling_and_posting_make_no_system_call() {
    let site = Site::new("vrs");
    let probe = PROBE.build(&site.work);
    let (router, elsewhere) = site.router_core_and_another();
    let run_on = |core: usize, mode: &str| {
        let (out, log) = site.verbs_app_under_strace_on_core("client", &probe, mode, core);
        assert!(
            succeeded_saying(&out, "checks passed"),
            "on core {core}: {}",
            describe(&out)
        );
        log
    };
    // Polling on a core the router does not use (when there is one).
    if let Some(elsewhere) = elsewhere {
        let log = run_on(elsewhere, "nosyscall");
        // 100,000 empty polls and 32 receives posted: not one system call.
        let polls = between_markers(&log, "getppid(");
        assert!(polls.is_empty(), "system calls while polling: {polls:?}");
        // 32 sends posted in one list: at most the doorbell, if the router's shard was parked.
        let sends = between_markers(&log, "getpgrp(");
        eprintln!(
            "on core {elsewhere}: 100000 empty polls and 32 posted receives: {} system calls; \
             32 posted sends: {} ({sends:?})",
            polls.len(),
            sends.len()
        );
        assert!(
            sends.is_empty() || (sends.len() == 1 && sends[0].starts_with("write(")),
            "system calls while posting sends: {sends:?}"
        );
    }
    // On the router's core, the empty polls give the core up now and then (sched_yield), and
    // make no other system call. Only the polls run there: the routers of the tests running
    // alongside share that core, and each yield puts the prober behind them (EEVDF), so the
    // bounded waits of the full mode could run out there.
    let log = run_on(router, "emptypolls");
    let polls = between_markers(&log, "getppid(");
    eprintln!(
        "on the router's core {router}: 100000 empty polls: {} system calls",
        polls.len()
    );
    assert!(
        !polls.is_empty() && polls.iter().all(|l| l.starts_with("sched_yield(")),
        "on the router's core, polls should only yield: {:?}",
        &polls[..polls.len().min(5)]
    );
}

#[test]
fn containers_cannot_reach_each_others_queues_or_memory() {
    let site = Site::new("vri");
    let probe = PROBE.build(&site.work);
    // server holds a QP and a region and says their numbers; client guesses with them.
    let holder = site.hold("server", &probe);
    let numbers = holder.numbers();
    assert_eq!(numbers.len(), 4, "holder said {:?}", holder.first_line);
    let guess = [&["guess", "10.32.0.2"][..], &numbers].concat();
    let out = site.run_verbs_app("client", &probe, &guess);
    assert!(
        succeeded_saying(&out, "checks passed"),
        "guess: {}",
        describe(&out)
    );
    // A container that writes garbage into its queue is detached; nobody else is.
    let out = site.run_verbs_app("other", &probe, &["hostile"]);
    assert!(
        succeeded_saying(&out, "checks passed"),
        "hostile: {}\n--- router log\n{}",
        describe(&out),
        site.router_log()
    );
    assert!(
        site.router_log()
            .contains("verbs queue protocol violation: ring index out of bounds"),
        "{}",
        site.router_log()
    );
    let held = holder.finish();
    assert!(
        succeeded_saying(&held, "checks passed"),
        "holder: {}",
        describe(&held)
    );
    // And the two containers still talk.
    let runs = pingpong(&site, 18519, &["-g", "0", "-c", "-n", "20"]);
    assert_pingpong(&site, &runs, 20, 4096);
}
