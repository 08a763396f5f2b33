//! RDMA mode, protection domains and memory regions, end to end: a C program built against the
//! installed headers runs in registered containers with `LD_LIBRARY_PATH=DIR/verbs` and checks
//! `ibv_alloc_pd`, `ibv_reg_mr` (and its iova variants), `ibv_dereg_mr` and `ibv_dealloc_pd` as
//! rdma-core programs call them, and that the router really works on the program's own memory:
//! the registered pages move onto the process's memory file (without losing a byte of the
//! buffer or of its neighbours on the same pages), and the router, through the test hooks
//! (`freeflow_test_mr_read`/`_write`, served because this test starts Freeflow with
//! `FREEFLOW_TEST_HOOKS=1`), reads what the program wrote and writes what the program then reads.
//! A second container tries the first one's keys and gets errors.
//!
//! Needs root, a built workspace (`cargo build --workspace`) and libibverbs-dev (scripts/test.sh
//! installs it). The Site scaffolding is in common/mod.rs.

mod common;

use common::{describe, succeeded_saying, CProbe, Site, SiteSpec};

impl Site {
    /// One host with Freeflow up (test hooks on) and containers web and peer registered.
    fn new(prefix: &str) -> Site {
        Site::create_verbs(SiteSpec {
            prefix,
            work_prefix: "ff-verbs-mr",
            hosts: 1,
            containers: &[(0, "web", [10, 32, 0, 2]), (0, "peer", [10, 32, 0, 3])],
            registered: &[("web", "blue"), ("peer", "blue")],
            up_env: &[("FREEFLOW_TEST_HOOKS", "1")],
            verbs_timeout: 30,
            ..SiteSpec::default()
        })
    }
}

/// The C side. `mr_probe checks`: every check of one container; `mr_probe hold`: registers a
/// region, prints its keys, keeps it until stdin closes; `mr_probe guess LKEY RKEY`: tries
/// another container's keys through the router.
const MR_PROBE: CProbe = CProbe {
    name: "mr_probe",
    source: include_str!("programs/verbs_mr_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-libverbs", "-ldl"],
};

#[test]
fn memory_regions_share_the_programs_own_memory_with_the_router() {
    let site = Site::new("vm");
    let probe = MR_PROBE.build(&site.work);

    let out = site.run_verbs_app("web", &probe, &["checks"]);
    assert!(
        succeeded_saying(&out, "checks passed"),
        "mr_probe checks in web: {}\nrouter log:\n{}",
        describe(&out),
        site.router_log()
    );

    // web holds a region; peer (same host, same tenant) tries its keys.
    let holder = site.hold("web", &probe);
    let keys = holder.numbers();
    assert!(
        keys.len() == 4 && keys[0] == "keys",
        "holder said {:?}; router log:\n{}",
        holder.first_line,
        site.router_log()
    );
    let out = site.run_verbs_app("peer", &probe, &["guess", keys[1], keys[2], keys[3]]);
    assert!(
        succeeded_saying(&out, "guesses refused"),
        "mr_probe guess in peer: {}",
        describe(&out)
    );
    // The holder's region is untouched and still works.
    let held = holder.finish();
    let (status, rest) = (held.status, String::from_utf8_lossy(&held.stdout));
    assert!(
        status.success() && rest.contains("held"),
        "holder: {status:?} {rest}"
    );
}
