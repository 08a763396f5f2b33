//! RDMA mode: Debian's unmodified `ibv_devices`, `ibv_devinfo` and
//! `ibv_rc_pingpong` (ibverbs-utils) load Freeflow's `libibverbs.so.1` from `DIR/verbs`, as
//! installed by `freeflow up`, on two simulated hosts. Registered containers see one device,
//! `ffv0`, with an active port whose GID is their overlay address; an unregistered container sees
//! none. A C program built against the installed headers checks the verbs' return values and
//! errno, through the inline wrappers of `verbs.h` as real programs call them.
//! Needs root, a built workspace (`cargo build --workspace`) and the Debian packages
//! ibverbs-utils and libibverbs-dev (scripts/test.sh installs them).
//!
//! The Site scaffolding is in common/mod.rs.

mod common;

use common::{build_c_probe, describe, Site, SiteSpec};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

impl Site {
    /// Two hosts with Freeflow up (shared registry); containers web (host 0) and db (host 1)
    /// registered, stranger (host 0) not.
    fn new(prefix: &str) -> Site {
        common::require_root("RDMA-mode");
        common::require_built(&["freeflow-router", "libibverbs.so"]);
        common::require_programs(
            &["ibv_devices", "ibv_devinfo", "ibv_rc_pingpong"],
            "ibverbs-utils",
        );
        let site = Site::create(SiteSpec {
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

    fn run(&self, container: &str, program: &str, args: &[&str]) -> Output {
        self.verbs_app(container, program, &[])
            .args(args)
            .output()
            .unwrap()
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
const PROBE: &str = r#"
#include <infiniband/verbs.h>
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; \
    printf("FAIL line %d (errno %d): ", __LINE__, errno); printf(__VA_ARGS__); printf("\n"); } \
    } while (0)

int main(void)
{
    int n = -1;
    struct ibv_device **list = ibv_get_device_list(&n);
    CHECK(list != NULL && n == 1, "device list %p, %d devices", (void *)list, n);
    if (list == NULL || n != 1)
        return 1;
    CHECK(list[1] == NULL, "list not NULL-terminated");
    CHECK(strcmp(ibv_get_device_name(list[0]), "ffv0") == 0, "name %s",
          ibv_get_device_name(list[0]));
    CHECK(ibv_get_device_index(list[0]) == -1, "virtual device has a kernel index");
    struct ibv_context *ctx = ibv_open_device(list[0]);
    /* A context outlives the list it came from. */
    ibv_free_device_list(list);
    CHECK(ctx != NULL, "open: %s", strerror(errno));
    if (ctx == NULL)
        return 1;

    struct ibv_port_attr port;
    CHECK(ibv_query_port(ctx, 1, &port) == 0, "query_port");
    CHECK(port.state == IBV_PORT_ACTIVE && port.link_layer == IBV_LINK_LAYER_ETHERNET &&
          port.lid == 0 && port.gid_tbl_len == 1 && port.pkey_tbl_len == 1 &&
          port.active_mtu == IBV_MTU_1024, "port attributes");
    CHECK(ibv_query_port(ctx, 2, &port) == EINVAL, "port 2 exists");

    struct ibv_device_attr dev;
    CHECK(ibv_query_device(ctx, &dev) == 0 && dev.phys_port_cnt == 1 && dev.max_qp > 0 &&
          dev.max_cqe > 0 && dev.max_sge > 0, "query_device");
    struct ibv_device_attr_ex dev_ex;
    memset(&dev_ex, 0xab, sizeof(dev_ex));
    CHECK(ibv_query_device_ex(ctx, NULL, &dev_ex) == 0, "query_device_ex");
    CHECK(dev_ex.orig_attr.node_guid == dev.node_guid && dev_ex.phys_port_cnt_ex == 1 &&
          dev_ex.comp_mask == 0 && dev_ex.odp_caps.general_caps == 0, "device_attr_ex");
    CHECK(ibv_get_device_guid(ctx->device) == dev.node_guid, "guid");

    union ibv_gid gid;
    char text[INET6_ADDRSTRLEN] = "";
    CHECK(ibv_query_gid(ctx, 1, 0, &gid) == 0, "query_gid");
    inet_ntop(AF_INET6, gid.raw, text, sizeof(text));
    printf("gid %s\n", text);
    errno = 0;
    CHECK(ibv_query_gid(ctx, 1, 1, &gid) == -1 && errno == EINVAL, "GID index 1 exists");
    struct ibv_gid_entry entry, table[4];
    CHECK(ibv_query_gid_ex(ctx, 1, 0, &entry, 0) == 0, "query_gid_ex");
    CHECK(entry.gid_type == IBV_GID_TYPE_ROCE_V2 && entry.port_num == 1 &&
          memcmp(entry.gid.raw, gid.raw, 16) == 0, "gid entry");
    CHECK(ibv_query_gid_table(ctx, table, 4, 0) == 1, "gid table");
    CHECK(ibv_query_gid_ex(ctx, 1, 0, &entry, 1) == EINVAL, "flags accepted");

    __be16 pkey = 0;
    CHECK(ibv_query_pkey(ctx, 1, 0, &pkey) == 0 && pkey == htons(0xffff), "pkey %x", pkey);
    CHECK(ibv_get_pkey_index(ctx, 1, htons(0xffff)) == 0, "pkey index");

    /* Protection domains exist (verbs_mr.rs tests them and memory regions in depth). */
    struct ibv_pd *pd = ibv_alloc_pd(ctx);
    CHECK(pd != NULL && pd->context == ctx && pd->handle != 0, "alloc_pd: %s", strerror(errno));

    /* CQs and channels exist (verbs_rc.rs tests them in depth). */
    struct ibv_comp_channel *channel = ibv_create_comp_channel(ctx);
    CHECK(channel != NULL && channel->fd >= 0, "comp_channel: %s", strerror(errno));
    struct ibv_cq *cq = ibv_create_cq(ctx, 16, NULL, channel, 0);
    CHECK(cq != NULL && cq->cqe >= 16 && cq->channel == channel, "create_cq: %s", strerror(errno));
    CHECK(cq == NULL || ibv_destroy_cq(cq) == 0, "destroy_cq");
    CHECK(channel == NULL || ibv_destroy_comp_channel(channel) == 0, "destroy_comp_channel");

    /* Not implemented yet: clean failures, never a crash or a fake object. */
    struct ibv_cq_init_attr_ex cq_attr = { .cqe = 16 };
    errno = 0;
    CHECK(ibv_create_cq_ex(ctx, &cq_attr) == NULL && errno == EOPNOTSUPP, "create_cq_ex");
    /* SRQs exist (verbs_srq.rs tests them in depth). */
    struct ibv_srq_init_attr srq_attr = { .attr = { .max_wr = 1, .max_sge = 1 } };
    struct ibv_srq *srq = ibv_create_srq(pd, &srq_attr);
    CHECK(srq != NULL && srq_attr.attr.max_wr >= 1, "create_srq: %s", strerror(errno));
    CHECK(srq == NULL || ibv_destroy_srq(srq) == 0, "destroy_srq");
    CHECK(pd == NULL || ibv_dealloc_pd(pd) == 0, "dealloc_pd");
    CHECK(ibv_dealloc_pd(NULL) == EINVAL, "dealloc_pd(NULL)");
    CHECK(strcmp(ibv_wc_status_str(IBV_WC_SUCCESS), "success") == 0, "wc_status_str");
    CHECK(strcmp(ibv_port_state_str(IBV_PORT_ACTIVE), "active") == 0, "port_state_str");

    CHECK(ibv_close_device(ctx) == 0, "close");
    /* A second close is refused without touching the freed context. */
    errno = 0;
    CHECK(ibv_close_device(ctx) == -1 && errno == EINVAL, "double close");
    printf(failures ? "%d checks failed\n" : "checks passed\n", failures);
    return failures != 0;
}
"#;

/// Builds [`PROBE`] against the installed headers and the system's libibverbs (so it imports
/// the verbs with rdma-core's symbol versions, like any Debian binary).
fn build_probe(work: &Path) -> PathBuf {
    build_c_probe(work, "probe", PROBE, &["-Wall"], &["-libverbs"])
}

#[test]
fn unmodified_ibverbs_utils_see_one_device_per_registered_container() {
    let site = Site::new("vb");

    // ibv_devices: one line for ffv0 with the GUID derived from the overlay address.
    let out = site.run("web", "ibv_devices", &[]);
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
        let out = site.run(container, "ibv_devinfo", &["-v"]);
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
    let out = site.run("stranger", "ibv_devinfo", &[]);
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));
    assert_eq!(
        stderr(&out).trim(),
        "No IB devices found",
        "{}",
        describe(&out)
    );
    let out = site.run("stranger", "ibv_devices", &[]);
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

    // ibv_rc_pingpong between two hosts: RDMA goes only between containers of one host so far.
    // Both sides get as far as connecting their QPs, where the router refuses the other host's
    // address (ENETUNREACH), and both exit with their own message: an exit, not a signal, not
    // a hang.
    let server = site
        .verbs_app("db", "ibv_rc_pingpong", &[("FREEFLOW_DEBUG", "1")])
        .args(["-g", "0", "-p", "18520"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening("db", 18520, None);
    let client = site
        .verbs_app("web", "ibv_rc_pingpong", &[("FREEFLOW_DEBUG", "1")])
        .args(["-g", "0", "-p", "18520", "10.32.0.4"])
        .output()
        .unwrap();
    let server = server.wait_with_output().unwrap();
    for (who, out) in [("client", &client), ("server", &server)] {
        assert_eq!(out.status.signal(), None, "{who}: {}", describe(out));
        assert_ne!(out.status.code(), Some(0), "{who}: {}", describe(out));
    }
    // The server connects its QP first (when the client's address arrives) and says why it
    // cannot; the client then finds the exchange broken.
    assert!(
        stderr(&server).contains("registered MR")
            && stderr(&server).contains("created QP")
            && stderr(&server).contains("RDMA between hosts is not implemented yet")
            && stderr(&server).contains("Couldn't connect to remote QP"),
        "{}",
        describe(&server)
    );
    assert!(
        stderr(&client).contains("created QP"),
        "{}",
        describe(&client)
    );

    // The verbs' return values and errno, from C.
    let probe = build_probe(&site.work);
    let out = site.run("web", probe.to_str().unwrap(), &[]);
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
    let out = site.run("stranger", probe.to_str().unwrap(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stdout(&out).contains("0 devices"), "{}", describe(&out));
}
