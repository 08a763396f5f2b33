//! RDMA mode, asynchronous events end to end: a C probe (`programs/verbs_async_probe.c`) in a
//! registered container arms an SRQ limit with `ibv_modify_srq` and gets
//! IBV_EVENT_SRQ_LIMIT_REACHED through a pollable, non-blocking `async_fd` when the SENDs of a
//! connected QP pair take the SRQ's receives below it, once; and IBV_EVENT_QP_LAST_WQE_REACHED
//! when the QP on the SRQ is moved to ERR. (IBV_EVENT_DEVICE_FATAL, seen by
//! Debian's unmodified `ibv_asyncwatch`, is in `verbs_faults.rs`.)
//!
//! Needs root, a built workspace (`cargo build --workspace`), libibverbs-dev. The Site
//! scaffolding is in common/mod.rs.

mod common;

use common::{describe, succeeded_saying, CProbe, Site, SiteSpec, SERVER_AND_CLIENT};

const PROBE: CProbe = CProbe {
    name: "async_probe",
    source: include_str!("programs/verbs_async_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-libverbs"],
};

#[test]
fn srq_limit_reached_once_and_last_wqe_reached_on_err() {
    let site = Site::create_verbs(SiteSpec {
        prefix: "vas",
        work_prefix: "ff-verbs-async",
        hosts: 1,
        containers: SERVER_AND_CLIENT,
        registered: &[("server", "blue"), ("client", "blue")],
        verbs_timeout: 90,
        ..SiteSpec::default()
    });
    let probe = PROBE.build(&site.work);
    let out = site.run_verbs_app("client", &probe, &["srq_limit"]);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
    assert!(
        succeeded_saying(&out, "async checks passed"),
        "{}\n--- router log\n{}",
        describe(&out),
        site.router_log()
    );
}
