//! RDMA mode: Debian's unmodified `ibv_devices` and `ibv_devinfo` (ibverbs-utils) load
//! Freeflow's `libibverbs.so.1` from `DIR/verbs`, as
//! installed by `freeflow up`, on two simulated hosts. Registered containers see one device,
//! `ffv0`, with an active port whose GID is their overlay address; an unregistered container sees
//! none (RDMA between the two hosts: verbs_cross_host.rs). A C program built against the
//! installed headers checks the verbs' return values and errno, through the inline wrappers of
//! `verbs.h` as real programs call them.
//! Needs root, a built workspace (`cargo build --workspace`) and the Debian packages
//! ibverbs-utils and libibverbs-dev (scripts/test.sh installs them).
//!
//! The Site scaffolding is in common/mod.rs.

mod common;

use common::{describe, CProbe, Site, SiteSpec};
use std::process::Output;

impl Site {
    /// Two hosts with Freeflow up (shared registry); containers web (host 0) and db (host 1)
    /// registered, stranger (host 0) not.
    fn new(prefix: &str) -> Site {
        common::require_programs(&["ibv_devices", "ibv_devinfo"], "ibverbs-utils");
        let site = Site::create_verbs(SiteSpec {
            prefix,
            work_prefix: "ff-verbs",
            hosts: 2,
            containers: &[
                (0, "web", [10, 32, 0, 2]),
                (0, "stranger", [10, 32, 0, 3]),
                (1, "db", [10, 32, 0, 4]),
            ],
            registered: &[("web", "blue"), ("db", "blue")],
            verbs_timeout: 30,
            ..SiteSpec::default()
        });
        for dir in &site.dirs {
            assert!(
                dir.join("verbs/libibverbs.so.1").is_file(),
                "freeflow up did not install verbs/libibverbs.so.1"
            );
        }
        site
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Checks made from C against the installed headers, the way rdma-core programs call the verbs
/// (inline wrappers included). Prints one line per failed check and "checks passed" at the end.
/// Built against the installed headers and the system's libibverbs (so it imports the verbs
/// with rdma-core's symbol versions, like any Debian binary).
const PROBE: CProbe = CProbe {
    name: "probe",
    source: include_str!("programs/verbs_device_probe.c"),
    cflags: &["-Wall"],
    libs: &["-libverbs"],
};

#[test]
fn unmodified_ibverbs_utils_see_one_device_per_registered_container() {
    let site = Site::new("vb");

    // ibv_devices: one line for ffv0 with the GUID derived from the overlay address.
    let out = site.run_verbs_app("web", "ibv_devices", &[]);
    assert!(
        out.status.success(),
        "ibv_devices in web: {}",
        describe(&out)
    );
    let devices: Vec<String> = stdout(&out)
        .lines()
        .filter(|l| l.trim_start().starts_with("ffv"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(devices, ["ffv0 024646000a200002"], "{}", describe(&out));

    // ibv_devinfo -v, on both hosts: each container's port GID is its own overlay address.
    for (container, ip) in [("web", "10.32.0.2"), ("db", "10.32.0.4")] {
        let out = site.run_verbs_app(container, "ibv_devinfo", &["-v"]);
        let text = stdout(&out);
        assert!(
            out.status.success(),
            "ibv_devinfo in {container}: {}",
            describe(&out)
        );
        for expected in [
            "hca_id:\tffv0".to_string(),
            "transport:\t\t\tInfiniBand (0)".into(),
            "phys_port_cnt:\t\t\t1".into(),
            "port:\t1".into(),
            "state:\t\t\tPORT_ACTIVE (4)".into(),
            "active_mtu:\t\t1024 (3)".into(),
            "port_lid:\t\t0".into(),
            "link_layer:\t\tEthernet".into(),
            "gid_tbl_len:\t\t1".into(),
            "board_id:\t\t\tFREEFLOW_VIRTUAL".into(),
            format!("GID[  0]:\t\t::ffff:{ip}, RoCE v2"),
        ] {
            assert!(
                text.contains(&expected),
                "ibv_devinfo -v in {container} lacks {expected:?}:\n{}",
                describe(&out)
            );
        }
        assert_eq!(text.matches("hca_id:").count(), 1, "{}", describe(&out));
    }

    // An unregistered container: no device, and nothing said unless asked.
    let out = site.run_verbs_app("stranger", "ibv_devinfo", &[]);
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));
    assert_eq!(
        stderr(&out).trim(),
        "No IB devices found",
        "{}",
        describe(&out)
    );
    let out = site.run_verbs_app("stranger", "ibv_devices", &[]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!stdout(&out).contains("ffv"), "{}", describe(&out));
    let out = site
        .verbs_app("stranger", "ibv_devices", &[("FREEFLOW_DEBUG", "1")])
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("not registered with Freeflow"),
        "FREEFLOW_DEBUG=1 should say why there is no device:\n{}",
        describe(&out)
    );

    // RDMA between the two hosts: tests/verbs_cross_host.rs.

    // The verbs' return values and errno, from C.
    let probe = PROBE.build(&site.work);
    let out = site.run_verbs_app("web", probe.to_str().unwrap(), &[]);
    assert!(
        out.status.success() && stdout(&out).contains("checks passed"),
        "probe in web: {}",
        describe(&out)
    );
    assert!(
        stdout(&out).contains("gid ::ffff:10.32.0.2"),
        "{}",
        describe(&out)
    );
    let out = site.run_verbs_app("stranger", probe.to_str().unwrap(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stdout(&out).contains("0 devices"), "{}", describe(&out));
}
