//! RDMA mode, `ibv_resize_cq` and shared receive queues end to end: a C program built against
//! the installed headers (`verbs_srq_probe.c`) runs in a registered container through
//! Freeflow's `libibverbs.so.1` and the router's software engine.
//!
//! Resizing: up and down with completions pending (kept, in order), below the pending count
//! (EINVAL, the CQ unchanged), a poller thread taking completions while another thread posts
//! and resizes (each completion exactly once, in order), and completion channels armed before
//! a resize and notified after it.
//!
//! Shared receive queues: one SRQ feeding two QPs that receive SENDs from two peers (receives
//! taken in posting order, data in the SRQ's buffers), `ibv_post_srq_recv` lists, a full SRQ
//! (ENOMEM), `ibv_query_srq`, `ibv_modify_srq` (arming a limit; its event is in `verbs_async.rs`), EBUSY while QPs
//! use it, `ibv_post_recv` refused on such a QP, RNR on an empty SRQ and the waiting SEND
//! completing once a receive is posted, a QP in ERR leaving the SRQ to the other QP, another
//! context's SRQ refused; and Debian's unmodified `ibv_srq_pingpong` (16 QPs on one SRQ)
//! between two containers, polling and with completion events. Under strace, posting
//! receives to an SRQ (and polling an empty CQ) makes no system call.
//!
//! Needs root, a built workspace (`cargo build --workspace`), ibverbs-utils, libibverbs-dev and
//! strace (scripts/test.sh installs them). The Site scaffolding is in common/mod.rs.

mod common;

use common::{
    assert_pingpong_sides, between_markers, describe, succeeded_saying, CProbe, Site, SiteSpec,
    SERVER_AND_CLIENT,
};
use std::path::Path;
use std::process::Output;

impl Site {
    /// One host with Freeflow up; containers server and client (tenant blue) registered.
    fn new(prefix: &str) -> Site {
        Site::create_verbs(SiteSpec {
            prefix,
            work_prefix: "ff-verbs-srq",
            hosts: 1,
            containers: SERVER_AND_CLIENT,
            registered: &[("server", "blue"), ("client", "blue")],
            verbs_timeout: 90,
            ..SiteSpec::default()
        })
    }
}

/// The C side of the checks (its own file, to be readable and compilable by hand), built
/// against the installed headers and the system's libibverbs.
const PROBE: CProbe = CProbe {
    name: "srq_probe",
    source: include_str!("programs/verbs_srq_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1", "-pthread"],
    libs: &["-libverbs"],
};

fn run_probe(site: &Site, probe: &Path, mode: &str) {
    let out = site.run_verbs_app("client", probe, &[mode]);
    check_probe(site, mode, &out);
}

fn check_probe(site: &Site, mode: &str, out: &Output) {
    eprintln!(
        "{mode}: {}",
        String::from_utf8_lossy(&out.stdout).trim_end()
    );
    assert!(
        succeeded_saying(out, "checks passed"),
        "{mode}: {}\n--- router log\n{}",
        describe(out),
        site.router_log()
    );
}

#[test]
fn resize_cq_keeps_pending_completions_in_order_and_refuses_too_small_sizes() {
    let site = Site::new("vsz");
    let probe = PROBE.build(&site.work);
    run_probe(&site, &probe, "resize");
}

#[test]
fn a_shared_receive_queue_feeds_two_qps_and_reports_its_errors() {
    let site = Site::new("vsq");
    let probe = PROBE.build(&site.work);
    run_probe(&site, &probe, "srq");
}

#[test]
fn posting_to_an_srq_makes_no_system_call() {
    let site = Site::new("vsn");
    let probe = PROBE.build(&site.work);
    // On a core the router does not use: there a poll loop that finds nothing never yields.
    let (out, log) = match site.router_core_and_another() {
        (_, Some(core)) => site.verbs_app_under_strace_on_core("client", &probe, "nosyscall", core),
        (_, None) => site.verbs_app_under_strace("client", &probe, "nosyscall"),
    };
    check_probe(&site, "nosyscall", &out);
    let calls = between_markers(&log, "getppid(");
    assert!(
        calls.is_empty(),
        "system calls while posting to an SRQ: {calls:?}"
    );
}

#[test]
fn unmodified_ibv_srq_pingpong_runs_between_two_containers() {
    let site = Site::new("vsp");
    for (port, args, iters, size) in [
        (18521, vec!["-g", "0", "-n", "1000"], 1000u64, 4096u64),
        (
            18522,
            vec!["-g", "0", "-e", "-n", "300", "-s", "64"],
            300,
            64,
        ),
        (
            18523,
            vec!["-g", "0", "-q", "4", "-r", "50", "-n", "500"],
            500,
            4096,
        ),
    ] {
        let runs = site.pingpong("ibv_srq_pingpong", port, &args);
        // Every QP printed its address: local and remote, with the GIDs of both.
        let what = format!("ibv_srq_pingpong {args:?}");
        for (who, text) in assert_pingpong_sides(&site, &what, &runs, iters, size) {
            eprintln!("{who} {args:?}: {}", text.lines().last().unwrap_or(""));
        }
    }
}
