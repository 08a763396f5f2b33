//! The router's hardware backend (dataplane feature `rdma-hw`, rdma-core's libibverbs through
//! rdma-sys), tested against a NIC made of a Freeflow router: router S runs the software
//! engine; a freeflow-router built with the feature (H) runs in a namespace registered as a
//! container `nic` of S, with S's `DIR/verbs` on its library path, so the device it opens is
//! S's `ffv0` and every verb it makes goes through exactly the calls it would make on mlx5 or
//! rxe.
//!
//! - `--rdma-probe`: H opens `ffv0`, connects two RC QPs of its own through it, moves SENDs,
//!   RDMA WRITEs and READs of several sizes (checked byte for byte), and a forged rkey fails
//!   with REM_ACCESS_ERR and writes nothing; memory H maps shared from a sealed memfd (as it
//!   maps its containers' memory files) registers on `ffv0` and carries SENDs and WRITEs.
//! - `freeflow up --rdma-device ffv0` brings H up as a daemon-supervised router that holds the
//!   device (its log names the device and its GID, the nic container's overlay address); a
//!   device that is not there fails `up` with an error naming it.
//! - A namespace S does not know (not registered) reaches no device: H fails with an error,
//!   within a bound, and S serves on.
//! - The default router build refuses `--rdma-device` (it neither links nor loads libibverbs).
//! - Across hosts: two hosts, each with its S and an H in a container of that S; containers of
//!   H1 and H2 connect through the device (H1 asks H2 for the real QP number and GID at RTR)
//!   and run `ibv_rc_pingpong` and the pair probe over S1 <-> S2.
//!
//! Needs root, a built workspace and the feature build of the router:
//! `CARGO_TARGET_DIR=target/rdma-hw cargo build -p freeflow-dataplane --features rdma-hw`
//! (scripts/test.sh does it; `FREEFLOW_HW_ROUTER` names another binary).

mod common;

use common::{assert_success, target_dir, CProbe, Site, SiteSpec, FREEFLOW};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The router built with the `rdma-hw` feature.
fn hw_router() -> PathBuf {
    let path = std::env::var_os("FREEFLOW_HW_ROUTER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let profile = target_dir();
            let profile_name = profile.file_name().unwrap().to_owned();
            profile
                .parent()
                .unwrap()
                .join("rdma-hw")
                .join(profile_name)
                .join("freeflow-router")
        });
    assert!(
        path.is_file(),
        "{} missing: build the hardware backend first (CARGO_TARGET_DIR=target/rdma-hw cargo \
         build -p freeflow-dataplane --features rdma-hw), or set FREEFLOW_HW_ROUTER",
        path.display()
    );
    path
}

/// One host with router S; containers `nic` (10.32.0.9, where router H runs) and `stranger`
/// (10.32.0.10, never registered), `nic` of tenant infra; and H's application containers in
/// H's overlay 10.64.0.0/12 (registered with H by the tests that use them, never with S).
fn site(prefix: &str) -> Site {
    Site::create_verbs(SiteSpec {
        prefix,
        work_prefix: "ff-verbs-nic",
        hosts: 1,
        containers: &[
            (0, "nic", [10, 32, 0, 9]),
            (0, "stranger", [10, 32, 0, 10]),
            (0, "hserver", [10, 64, 0, 2]),
            (0, "hclient", [10, 64, 0, 3]),
            (0, "hother", [10, 64, 0, 4]),
        ],
        registered: &[("nic", "infra")],
        verbs_timeout: 60,
        ..SiteSpec::default()
    })
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn hardware_backend_drives_the_nested_device_end_to_end() {
    let site = site("vnic");
    let router = hw_router();
    let out = site.run_verbs_app(
        "nic",
        &router,
        &["--rdma-device", "ffv0", "--rdma-probe", "--rdma-bench"],
    );
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("rdma probe ok: device ffv0")
            && said.contains("of 5 sizes checked")
            && said.contains("forged rkey was refused"),
        "{said}"
    );
    eprintln!("{said}");
    assert!(
        said.contains("rdma probe: translation ") && said.contains(" ns per send WQE"),
        "{said}"
    );
    // One container work request through the backend's path: a memory file made as a
    // container's shim makes it, mapped by the engine's MemoryFile, its regions registered on
    // ffv0, a ring-encoded RDMA WRITE translated (virtual keys and addresses to the device's)
    // and posted, the completion translated back; a forged virtual rkey stops in translation.
    assert!(
        said.contains("rdma probe: a container's RDMA WRITE (5000 bytes")
            && said.contains("completed on virtual QP 0x11")
            && said.contains("forged virtual rkey refused before the device"),
        "{said}"
    );
    // H registers shared mappings of a memory file, as it maps its containers' memory files:
    // S's library hands that file to S as a further memory file, and S moves a SEND from it,
    // an RDMA WRITE into a region from the middle of it (seen through another mapping) and a
    // SEND from that region (checked byte for byte by the probe).
    assert!(
        said.contains("zero-copy registration of shared memory-file pages works"),
        "{said}"
    );
    // `auto` finds the same device (its only port is active).
    let out = site.run_verbs_app("nic", &router, &["--rdma-device", "auto", "--rdma-probe"]);
    assert!(
        text(&out).contains("rdma probe ok: device ffv0"),
        "{}",
        text(&out)
    );
    // A namespace router S does not know reaches no device: an error, not a hang (the run is
    // bounded by the site's timeout, which would kill it with SIGKILL).
    let out = site.run_verbs_app(
        "stranger",
        &router,
        &["--rdma-device", "ffv0", "--rdma-probe"],
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("--rdma-device ffv0"), "{said}");
    // S serves on: the registered one still probes.
    let out = site.run_verbs_app("nic", &router, &["--rdma-device", "ffv0", "--rdma-probe"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Runs `freeflow down` for router H's directory when dropped (the site's own drop brings S
/// down afterwards).
struct Down<'a> {
    site: &'a Site,
    /// The container router H runs in.
    nic: &'static str,
    dir: PathBuf,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = self
            .site
            .verbs_app(self.nic, &*FREEFLOW, &[])
            .args(["down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

/// `freeflow ARGS` in the nic container, with S's verbs library and H's router binary; a
/// registry per DIR (each H is a host of its own).
fn freeflow_in_nic(site: &Site, args: &[&str], dir: &std::path::Path) -> Output {
    let registry = site.work.join(format!(
        "{}-registry.json",
        dir.file_name().unwrap().to_string_lossy()
    ));
    freeflow_in(site, ("nic", "10.32.0.9"), &registry, args, dir)
}

/// `freeflow ARGS --dir DIR --host-ip IP ...` in container `nic` (router H's namespace, at
/// `ip` in S's overlay), with its S's verbs library and H's router binary, on the file
/// registry `registry` (H routers sharing one are hosts of one cluster).
fn freeflow_in(
    site: &Site,
    (nic, ip): (&str, &str),
    registry: &std::path::Path,
    args: &[&str],
    dir: &std::path::Path,
) -> Output {
    let c = site.cluster().container(nic).unwrap().clone();
    let s_dir = &site.dirs[c.host];
    // No `timeout` wrapper: `up` starts a daemon that must outlive it. `up` itself is bounded
    // (it waits for the daemon's readiness for a few seconds at most).
    freeflow_testbed::command_in(&c.netns, "env")
        .arg(format!("FREEFLOW_DIR={}", s_dir.display()))
        .arg(format!("LD_LIBRARY_PATH={}", s_dir.join("verbs").display()))
        .arg(format!("FREEFLOW_ROUTER={}", hw_router().display()))
        .arg(&*FREEFLOW)
        .args(args)
        .arg("--dir")
        .arg(dir)
        .args([
            "--host-ip",
            ip,
            "--vnet-prefix",
            "10.64.0.0/12",
            "--registry",
        ])
        .arg(format!("file:{}", registry.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn freeflow_up_hands_the_device_to_a_supervised_router() {
    let site = site("vnicup");
    let h_dir = site.work.join("H");
    let _down = Down {
        site: &site,
        nic: "nic",
        dir: h_dir.clone(),
    };
    let out = freeflow_in_nic(&site, &["up", "--rdma-device", "ffv0"], &h_dir);
    assert_success(&out, "freeflow up --rdma-device ffv0 (router H)");
    let state = freeflow_proto::paths::state_dir(&h_dir);
    let log = std::fs::read_to_string(state.join("router.log")).unwrap();
    assert!(
        log.contains("RDMA device ffv0 port 1 active") && log.contains("::ffff:10.32.0.9"),
        "{log}"
    );
    let config = std::fs::read_to_string(state.join("config.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(parsed["rdma_device"], "ffv0", "{config}");

    // A device that is not there: `up` fails, and says which device and what there is.
    let bad_dir = site.work.join("H2");
    let _down_bad = Down {
        site: &site,
        nic: "nic",
        dir: bad_dir.clone(),
    };
    let out = freeflow_in_nic(&site, &["up", "--rdma-device", "mlx5_9"], &bad_dir);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    let bad_log =
        std::fs::read_to_string(freeflow_proto::paths::state_dir(&bad_dir).join("router.log"))
            .unwrap_or_default();
    assert!(
        format!("{said}{bad_log}").contains("no RDMA device mlx5_9"),
        "{said}\n{bad_log}"
    );
}

#[test]
fn the_default_router_build_refuses_an_rdma_device() {
    let out = Command::new(target_dir().join("freeflow-router"))
        .args(["--rdma-device", "rxe0", "--dir"])
        .arg(std::env::temp_dir().join("ff-nic-default-refuses"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("built without the rdma-hw feature"), "{said}");
    // And it does not load libibverbs (no dynamic dependency on it).
    let ldd = Command::new("ldd")
        .arg(target_dir().join("freeflow-router"))
        .output()
        .unwrap();
    assert!(ldd.status.success(), "{}", text(&ldd));
    assert!(
        !String::from_utf8_lossy(&ldd.stdout).contains("libibverbs"),
        "{}",
        text(&ldd)
    );
}

/// `program ARGS` in container `name` as an application of router H (H's `DIR/verbs`),
/// killed after 60 s.
fn h_app(site: &Site, h_dir: &std::path::Path, name: &str, program: &str) -> Command {
    let c = site.cluster().container(name).unwrap().clone();
    let mut cmd = freeflow_testbed::command_in(&c.netns, "env");
    cmd.arg(format!("FREEFLOW_DIR={}", h_dir.display()))
        .arg(format!("LD_LIBRARY_PATH={}", h_dir.join("verbs").display()))
        .args(["timeout", "-s", "KILL", "60", program])
        .stdin(Stdio::null());
    cmd
}

/// `ibv_rc_pingpong -p PORT ARGS` as server in `server` and client (naming 10.64.0.2) in
/// `client`, both applications of router H.
fn h_pingpong(
    site: &Site,
    h_dir: &std::path::Path,
    (server, client): (&str, &str),
    port: u16,
    args: &[&str],
) -> (Output, Output) {
    h_pingpong_between(site, (server, h_dir), (client, h_dir), port, args)
}

/// [`h_pingpong`] with the server (at 10.64.0.2) and the client each an application of its
/// own router H (its DIR).
fn h_pingpong_between(
    site: &Site,
    (server, server_dir): (&str, &std::path::Path),
    (client, client_dir): (&str, &std::path::Path),
    port: u16,
    args: &[&str],
) -> (Output, Output) {
    let port_arg = port.to_string();
    let mut server_child = h_app(site, server_dir, server, "ibv_rc_pingpong")
        .args(["-p", &port_arg])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening(server, port, Some(&mut server_child));
    let client_out = h_app(site, client_dir, client, "ibv_rc_pingpong")
        .args(["-p", &port_arg])
        .args(args)
        .arg("10.64.0.2")
        .output()
        .unwrap();
    if !client_out.status.success() {
        // A client that failed leaves the server waiting for it: end it now.
        let _ = server_child.kill();
    }
    (server_child.wait_with_output().unwrap(), client_out)
}

/// The every-opcode probe of the device path (`programs/verbs_nic_probe.c`).
const NIC_PROBE: CProbe = CProbe {
    name: "verbs_nic_probe",
    source: include_str!("programs/verbs_nic_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-libverbs"],
};

/// The send work requests a router's software engines executed (all shards), from its
/// `freeflow status --json`; the router must have answered (shards listed).
fn engine_ops(status: &serde_json::Value) -> u64 {
    let shards = status["router"]["shards"]
        .as_array()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| panic!("no shards in the status: {status}"));
    shards
        .iter()
        .map(|s| s["verbs_ops"].as_u64().expect("verbs_ops"))
        .sum()
}

/// `freeflow status --json` of router H (run in `nic`, H's network namespace).
fn h_status(site: &Site, h_dir: &std::path::Path) -> serde_json::Value {
    h_status_in(site, "nic", h_dir)
}

/// `freeflow status --json` of the router H that runs in container `nic`.
fn h_status_in(site: &Site, nic: &str, h_dir: &std::path::Path) -> serde_json::Value {
    let out = site
        .verbs_app(nic, &*FREEFLOW, &[])
        .args(["status", "--json", "--dir"])
        .arg(h_dir)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("H's status: {e}: {}", text(&out)))
}

/// The nested topology the hardware backend's tests run in: router H (the `rdma-hw` build,
/// holding S's `ffv0`) is itself a container of S, and its own application containers (H's
/// overlay, registered with H only) run Debian's unmodified `ibv_rc_pingpong -g 0` through H's
/// `DIR/verbs`, at a few sizes, polling and with completion events (`-e`), and the
/// every-opcode probe. Their QPs are device QPs: S's software engine executes every work
/// request (its count of executed sends grows by at least the pingpongs' messages), H's
/// executes none. A forged rkey fails with REM_ACCESS_ERR (probe); a container of another
/// tenant of H cannot connect (RTR refused).
#[test]
fn containers_of_the_nested_router_run_ibv_rc_pingpong() {
    let site = site("vnicpp");
    let h_dir = site.work.join("H");
    let _down = Down {
        site: &site,
        nic: "nic",
        dir: h_dir.clone(),
    };
    let out = freeflow_in_nic(&site, &["up", "--rdma-device", "ffv0"], &h_dir);
    assert_success(&out, "freeflow up --rdma-device ffv0 (router H)");
    for (name, ip, tenant) in [
        ("hserver", "10.64.0.2", "blue"),
        ("hclient", "10.64.0.3", "blue"),
        ("hother", "10.64.0.4", "red"),
    ] {
        let c = site.cluster().container(name).unwrap().clone();
        let out = site
            .verbs_app("nic", &*FREEFLOW, &[])
            .args(["container", "add", name, "--dir"])
            .arg(&h_dir)
            .arg("--netns")
            .arg(&c.netns_path)
            .args(["--ip", ip, "--tenant", tenant])
            .output()
            .unwrap();
        assert_success(&out, &format!("container add {name} (router H)"));
    }
    let s_before = engine_ops(&site.router_status(0));
    let mut messages = 0;
    for (port, size, iters, events) in [
        (18611, "64", 500, false),
        (18612, "4096", 300, false),
        (18613, "100000", 30, false),
        (18615, "64", 300, true),
        (18616, "100000", 30, true),
    ] {
        let iters_arg = iters.to_string();
        let mut args = vec!["-g", "0", "-c", "-s", size, "-n", &iters_arg];
        if events {
            args.push("-e");
        }
        let runs = h_pingpong(&site, &h_dir, ("hserver", "hclient"), port, &args);
        for (who, out) in [("server", &runs.0), ("client", &runs.1)] {
            let said = text(out);
            assert!(
                out.status.success(),
                "{who} (size {size}, -e {events}): {said}"
            );
            assert!(
                said.contains(&format!("{iters} iters in"))
                    && said.contains("GID ::ffff:10.64.0.2")
                    && said.contains("GID ::ffff:10.64.0.3"),
                "{who} (size {size}, -e {events}): {said}"
            );
        }
        // Each iteration is a SEND each way.
        messages += 2 * iters;
    }
    // Every opcode the device path carries (atomics too), byte for byte; a forged rkey.
    let probe = NIC_PROBE.build(&site.work);
    let out = h_app(&site, &h_dir, "hserver", probe.to_str().unwrap())
        .arg("10.64.0.2")
        .output()
        .unwrap();
    let said = text(&out);
    assert!(
        out.status.success() && said.contains("checks passed"),
        "{said}"
    );
    // What the device path does not carry is refused at the verb, not run by H's software
    // engine: a UD QP, an SRQ (the programs fail before they listen).
    for (program, what) in [
        ("ibv_ud_pingpong", "Couldn't create QP"),
        ("ibv_srq_pingpong", "Couldn't create SRQ"),
    ] {
        let out = h_app(&site, &h_dir, "hserver", program)
            .args(["-g", "0", "-p", "18617"])
            .output()
            .unwrap();
        let said = text(&out);
        assert!(
            !out.status.success() && said.contains(what),
            "{program}: {said}"
        );
    }
    // The traffic crossed the "NIC": S's engine executed the sends (the pingpongs' and the
    // probe's, besides H's own), H's software engine none.
    let s_after = engine_ops(&site.router_status(0));
    assert!(
        s_after - s_before >= messages,
        "S executed {} sends, the pingpongs alone sent {messages}",
        s_after - s_before
    );
    let h = h_status(&site, &h_dir);
    assert_eq!(
        engine_ops(&h),
        0,
        "H's software engine ran work requests: {h}"
    );
    eprintln!(
        "S's engine executed {} sends during the run",
        s_after - s_before
    );
    // Tenant red's container and blue's server exchange QP numbers over TCP, but blue's QP
    // cannot connect to red's (RTR fails: another tenant is unreachable), so the server gives
    // up and the client gets nothing.
    let runs = h_pingpong(&site, &h_dir, ("hserver", "hother"), 18614, &["-g", "0"]);
    let (server, client) = (text(&runs.0), text(&runs.1));
    assert!(!runs.0.status.success(), "{server}");
    assert!(server.contains("Failed to modify QP to RTR"), "{server}");
    assert!(!runs.1.status.success(), "{client}");
    assert!(!client.contains("iters in"), "{client}");
}

/// `tool -d ffv0 -p PORT -s 64 -n ITERS` as server and client (naming `ip`) both in
/// `container`, through `app` (S's or H's library); returns the client's t_typical in
/// microseconds (perftest's table: `#bytes #iterations t_min t_max t_typical ...`).
fn perftest_typical_us(
    site: &Site,
    app: &dyn Fn() -> Command,
    (container, ip): (&str, &str),
    tool: &str,
    port: u16,
) -> f64 {
    perftest_typical_us_between(site, (app, container), (app, ip), tool, port)
}

/// [`perftest_typical_us`] with the server in `server_container` (through `server_app`) and
/// the client through `client_app`, naming the server's `server_ip`.
fn perftest_typical_us_between(
    site: &Site,
    (server_app, container): (&dyn Fn() -> Command, &str),
    (client_app, ip): (&dyn Fn() -> Command, &str),
    tool: &str,
    port: u16,
) -> f64 {
    let port_arg = port.to_string();
    let args = ["-d", "ffv0", "-p", &port_arg, "-s", "64", "-n", "1000"];
    let mut server = server_app()
        .arg(tool)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening(container, port, Some(&mut server));
    let client = client_app().arg(tool).args(args).arg(ip).output().unwrap();
    if !client.status.success() {
        let _ = server.kill();
    }
    let server = server.wait_with_output().unwrap();
    assert!(server.status.success(), "{tool} server: {}", text(&server));
    assert!(client.status.success(), "{tool} client: {}", text(&client));
    let out = String::from_utf8_lossy(&client.stdout).into_owned();
    let mut lines = out.lines();
    lines
        .find(|l| l.trim_start().starts_with("#bytes"))
        .unwrap_or_else(|| panic!("{tool}: no result table: {out}"));
    let row: Vec<&str> = lines
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("{tool}: no result row: {out}"))
        .split_whitespace()
        .collect();
    assert_eq!(row.first(), Some(&"64"), "{tool}: {out}");
    let typical: f64 = row
        .get(4)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{tool}: no t_typical: {out}"));
    assert!(typical.is_finite() && typical > 0.0, "{tool}: {out}");
    typical
}

/// What router H adds to an operation: Debian's unmodified perftest `ib_send_lat` and
/// `ib_write_lat` (64 B, server and client in one container) on S's device directly (container
/// `nic`) and through H's device path (container `hserver`), alternately, three runs each;
/// prints the medians and the difference per operation (half a round trip: a latency test's
/// t_typical is one way). No threshold: the numbers go to the README.
#[test]
fn perftest_latency_on_the_device_directly_and_through_the_nested_router() {
    let site = site("vnicbench");
    let h_dir = site.work.join("H");
    let _down = Down {
        site: &site,
        nic: "nic",
        dir: h_dir.clone(),
    };
    // H's shard on core 0, S's on the last core (its default): two routers spinning on one
    // core would take turns by the scheduler's time slices.
    let out = freeflow_in_nic(
        &site,
        &["up", "--rdma-device", "ffv0", "--cores", "0"],
        &h_dir,
    );
    assert_success(&out, "freeflow up --rdma-device ffv0 (router H)");
    let c = site.cluster().container("hserver").unwrap().clone();
    let out = site
        .verbs_app("nic", &*FREEFLOW, &[])
        .args(["container", "add", "hserver", "--dir"])
        .arg(&h_dir)
        .arg("--netns")
        .arg(&c.netns_path)
        .args(["--ip", "10.64.0.2", "--tenant", "blue"])
        .output()
        .unwrap();
    assert_success(&out, "container add hserver (router H)");
    let direct = || {
        let mut cmd = site.verbs_app("nic", "env", &[]);
        cmd.stdin(Stdio::null());
        cmd
    };
    let through_h = || {
        let c = site.cluster().container("hserver").unwrap().clone();
        let mut cmd = freeflow_testbed::command_in(&c.netns, "env");
        cmd.arg(format!("FREEFLOW_DIR={}", h_dir.display()))
            .arg(format!("LD_LIBRARY_PATH={}", h_dir.join("verbs").display()))
            .args(["timeout", "-s", "KILL", "60"])
            .stdin(Stdio::null());
        cmd
    };
    let mut port = 18700;
    for tool in ["ib_send_lat", "ib_write_lat"] {
        let (mut s, mut h) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            port += 1;
            s.push(perftest_typical_us(
                &site,
                &direct,
                ("nic", "10.32.0.9"),
                tool,
                port,
            ));
            port += 1;
            h.push(perftest_typical_us(
                &site,
                &through_h,
                ("hserver", "10.64.0.2"),
                tool,
                port,
            ));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[1]
        };
        let (s_med, h_med) = (median(&mut s), median(&mut h));
        eprintln!(
            "{tool} 64 B t_typical (medians of 3): on S's ffv0 directly {s_med:.2} us, through \
             H's device path {h_med:.2} us: H adds {:.0} ns per operation (runs: S {s:?}, H \
             {h:?})",
            (h_med - s_med) * 1000.0
        );
    }
}

/// The cross-host probe of the device path (`programs/verbs_nic_pair_probe.c`).
const NIC_PAIR_PROBE: CProbe = CProbe {
    name: "verbs_nic_pair_probe",
    source: include_str!("programs/verbs_nic_pair_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-libverbs"],
};

/// `freeflow container add NAME` with router H (DIR `h_dir`, running in container `nic`).
fn h_container_add(
    site: &Site,
    nic: &str,
    h_dir: &std::path::Path,
    (name, ip, tenant): (&str, &str, &str),
) {
    let c = site.cluster().container(name).unwrap().clone();
    let out = site
        .verbs_app(nic, &*FREEFLOW, &[])
        .args(["container", "add", name, "--dir"])
        .arg(h_dir)
        .arg("--netns")
        .arg(&c.netns_path)
        .args(["--ip", ip, "--tenant", tenant])
        .output()
        .unwrap();
    assert_success(&out, &format!("container add {name} (router H in {nic})"));
}

/// Waits (20 s at most) until every H router (its container, its DIR) serves the shared
/// registry's generation: `container add` waits only for its own host's daemon, and an RTR
/// toward a container the asking router does not know yet fails as unreachable.
fn wait_h_routers_serve_the_registry(site: &Site, routers: &[(&str, &std::path::Path)]) {
    let (nic, dir) = routers[0];
    let out = site
        .verbs_app(nic, &*FREEFLOW, &[])
        .args(["container", "ls", "--json", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert_success(&out, "container ls --json (router H)");
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let generation = listing["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in `container ls --json`: {listing}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for &(nic, dir) in routers {
        loop {
            let status = h_status_in(site, nic, dir);
            if status["daemon"]["registry_generation"]
                .as_u64()
                .is_some_and(|g| g >= generation)
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "router H in {nic} does not serve registry generation {generation} after 20 s: \
                 {status}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Whether host `host`'s namespace has an established TCP connection with `peer` (the other
/// host's `ip:port`), from `ss`.
fn host_connected_to(site: &Site, host: usize, peer: &str) -> bool {
    let out = site
        .in_host(host, "ss")
        .args(["-Htn", "state", "established"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ss: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w == peer)
}

/// The nested topology on two hosts: each host has its router S (the two-host site: together
/// the "fabric") and router H (the `rdma-hw` build, `freeflow up --rdma-device ffv0 H_ARGS`)
/// in a namespace registered with its S as container `nic1` (10.32.0.9, host 0) or `nic2`
/// (10.32.0.11, host 1), each H driving its own S's `ffv0`. The two H routers share a
/// registry: they are the two hosts of H's cluster, with H's containers `hclient` (blue, on
/// H1) and `hserver` (blue, on H2) registered; `hother` (10.64.0.4, host 0) is there to be
/// registered by a test. Both H routers are brought down when it drops (before the site).
struct TwoHosts {
    site: Site,
    h1: PathBuf,
    h2: PathBuf,
}

impl TwoHosts {
    fn up(prefix: &str, h_args: &[&str]) -> TwoHosts {
        let site = Site::create_verbs(SiteSpec {
            prefix,
            work_prefix: "ff-verbs-nic",
            hosts: 2,
            containers: &[
                (0, "nic1", [10, 32, 0, 9]),
                (1, "nic2", [10, 32, 0, 11]),
                (0, "hclient", [10, 64, 0, 3]),
                (0, "hother", [10, 64, 0, 4]),
                (1, "hserver", [10, 64, 0, 2]),
            ],
            registered: &[("nic1", "infra"), ("nic2", "infra")],
            verbs_timeout: 60,
            ..SiteSpec::default()
        });
        let (h1, h2) = (site.work.join("H1"), site.work.join("H2"));
        let hosts = TwoHosts { site, h1, h2 };
        let registry = hosts.site.work.join("H-registry.json");
        let mut args = vec!["up", "--rdma-device", "ffv0"];
        args.extend_from_slice(h_args);
        for (nic, ip, dir) in [
            ("nic1", "10.32.0.9", &hosts.h1),
            ("nic2", "10.32.0.11", &hosts.h2),
        ] {
            let out = freeflow_in(&hosts.site, (nic, ip), &registry, &args, dir);
            assert_success(
                &out,
                &format!("freeflow up --rdma-device ffv0 (router H in {nic})"),
            );
        }
        h_container_add(
            &hosts.site,
            "nic1",
            &hosts.h1,
            ("hclient", "10.64.0.3", "blue"),
        );
        h_container_add(
            &hosts.site,
            "nic2",
            &hosts.h2,
            ("hserver", "10.64.0.2", "blue"),
        );
        wait_h_routers_serve_the_registry(&hosts.site, &[("nic1", &hosts.h1), ("nic2", &hosts.h2)]);
        hosts
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        drop(Down {
            site: &self.site,
            nic: "nic1",
            dir: self.h1.clone(),
        });
        drop(Down {
            site: &self.site,
            nic: "nic2",
            dir: self.h2.clone(),
        });
    }
}

/// Two hosts, each with router S (software engine: together the "fabric", the usual two-host
/// site) and router H (the `rdma-hw` build) in a namespace registered with its S as container
/// `nic1` (10.32.0.9, host 0) or `nic2` (10.32.0.11, host 1), each H driving its S's `ffv0`.
/// The two H routers share a registry: they are the two hosts of H's cluster. H1's containers
/// `hclient` (blue) and `hother` (red) and H2's `hserver` (blue) run Debian's unmodified
/// `ibv_rc_pingpong -g 0` between hosts (64 B and 100 KB, polling and `-e`) and the pair
/// probe (every carried opcode byte for byte, a forged rkey). Their QPs are device QPs: at RTR
/// H1 asks H2 for the real QP number and GID behind hserver's virtual QP (H2 checks the
/// tenant), and the device connects to them; S1 and S2 execute every work request and their
/// routers hold a verbs connection to each other (the traffic crossed the fabric), the H
/// routers' software engines execute none. Red's QP cannot connect to blue's server (RTR
/// refused), and with H2 gone an RTR toward its container fails with an error, not a hang.
#[test]
fn containers_of_nested_routers_on_two_hosts_connect_through_the_device() {
    let hosts = TwoHosts::up("vnicx", &[]);
    let (site, h1, h2) = (&hosts.site, &hosts.h1, &hosts.h2);
    h_container_add(site, "nic1", h1, ("hother", "10.64.0.4", "red"));
    wait_h_routers_serve_the_registry(site, &[("nic1", h1), ("nic2", h2)]);

    let s_before = [
        engine_ops(&site.router_status(0)),
        engine_ops(&site.router_status(1)),
    ];
    let mut each_way = 0;
    for (port, size, iters, events) in [
        (18631, "64", 300, false),
        (18632, "100000", 20, false),
        (18633, "64", 200, true),
        (18634, "100000", 20, true),
    ] {
        let iters_arg = iters.to_string();
        let mut args = vec!["-g", "0", "-c", "-s", size, "-n", &iters_arg];
        if events {
            args.push("-e");
        }
        let runs = h_pingpong_between(site, ("hserver", h2), ("hclient", h1), port, &args);
        for (who, out) in [("server", &runs.0), ("client", &runs.1)] {
            let said = text(out);
            assert!(
                out.status.success(),
                "{who} (size {size}, -e {events}): {said}"
            );
            assert!(
                said.contains(&format!("{iters} iters in"))
                    && said.contains("GID ::ffff:10.64.0.2")
                    && said.contains("GID ::ffff:10.64.0.3"),
                "{who} (size {size}, -e {events}): {said}"
            );
        }
        each_way += iters;
    }

    // Every carried opcode between the hosts, byte for byte; a forged rkey stops at H1.
    let probe = NIC_PAIR_PROBE.build(&site.work);
    let mut server = h_app(site, h2, "hserver", probe.to_str().unwrap())
        .args(["server", "18640"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening("hserver", 18640, Some(&mut server));
    let client = h_app(site, h1, "hclient", probe.to_str().unwrap())
        .args(["client", "10.64.0.2", "18640"])
        .output()
        .unwrap();
    if !client.status.success() {
        let _ = server.kill();
    }
    let server = server.wait_with_output().unwrap();
    for (who, out) in [("probe server", &server), ("probe client", &client)] {
        assert!(
            out.status.success() && text(out).contains("checks passed"),
            "{who}: {}",
            text(out)
        );
    }

    // The fabric carried it: S1 executed hclient's sends, S2 hserver's, and S1 and S2 hold a
    // verbs connection (S's verbs port is the peer port 7471 + 1); H's engines ran none.
    let s_after = [
        engine_ops(&site.router_status(0)),
        engine_ops(&site.router_status(1)),
    ];
    for host in 0..2 {
        assert!(
            s_after[host] - s_before[host] >= each_way,
            "S{} executed {} sends, its side of the pingpongs alone sent {each_way}",
            host + 1,
            s_after[host] - s_before[host]
        );
    }
    assert!(
        host_connected_to(site, 0, "192.168.1.2:7472")
            || host_connected_to(site, 1, "192.168.1.1:7472"),
        "no verbs connection between S1 and S2"
    );
    for (nic, dir) in [("nic1", h1), ("nic2", h2)] {
        let status = h_status_in(site, nic, dir);
        assert_eq!(
            engine_ops(&status),
            0,
            "H's software engine in {nic} ran work requests: {status}"
        );
    }
    eprintln!(
        "S1 and S2 executed {} and {} sends",
        s_after[0] - s_before[0],
        s_after[1] - s_before[1]
    );

    // Red's container cannot connect to blue's server on the other host: RTR refused (the
    // server's, first: it connects before it answers), nothing exchanged.
    let runs = h_pingpong_between(site, ("hserver", h2), ("hother", h1), 18635, &["-g", "0"]);
    let (server, client) = (text(&runs.0), text(&runs.1));
    assert!(!runs.0.status.success(), "{server}");
    assert!(server.contains("Failed to modify QP to RTR"), "{server}");
    assert!(!runs.1.status.success(), "{client}");
    assert!(!client.contains("iters in"), "{client}");

    // H2 gone (its daemon and router stopped, its host still registered): an RTR toward its
    // container's QP fails at H1 (no answer on H2's device port) with an error, not a hang.
    let mut server = h_app(site, h2, "hserver", probe.to_str().unwrap())
        .args(["server", "18641"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening("hserver", 18641, Some(&mut server));
    let out = site
        .verbs_app("nic2", &*FREEFLOW, &[])
        .args(["down", "--dir"])
        .arg(h2)
        .output()
        .unwrap();
    assert_success(&out, "freeflow down (router H in nic2)");
    let client = h_app(site, h1, "hclient", probe.to_str().unwrap())
        .args(["connect", "10.64.0.2", "18641"])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let said = text(&client);
    assert!(client.status.success(), "{said}");
    assert!(said.contains("RTR failed: "), "{said}");
    eprintln!("with H2 down: {}", said.trim());
}

/// `env FREEFLOW_DIR=DIR LD_LIBRARY_PATH=DIR/verbs timeout -s KILL 60` in container `name`:
/// a program after it runs as an application of the router whose DIR is `dir`.
fn app_env(site: &Site, dir: &std::path::Path, name: &str) -> Command {
    let c = site.cluster().container(name).unwrap().clone();
    let mut cmd = freeflow_testbed::command_in(&c.netns, "env");
    cmd.arg(format!("FREEFLOW_DIR={}", dir.display()))
        .arg(format!("LD_LIBRARY_PATH={}", dir.join("verbs").display()))
        .args(["timeout", "-s", "KILL", "60"])
        .stdin(Stdio::null());
    cmd
}

/// What the H routers add to an operation across hosts: Debian's unmodified perftest
/// `ib_send_lat` and `ib_write_lat` (64 B, 1000 iterations), server on host 1 and client on
/// host 0, on S's `ffv0` directly (containers `nic2` and `nic1`, S1 <-> S2) and through both
/// H routers' device paths (`hserver` and `hclient`, H1 -> S1 <-> S2 <- H2), alternately,
/// three runs each; prints the medians, the difference per operation (t_typical is one way)
/// and the load average before and after. No threshold: the numbers go to the README.
#[test]
fn perftest_latency_across_hosts_directly_and_through_the_nested_routers() {
    // The H routers' shards on core 0, the S routers' on the last core (their default).
    let hosts = TwoHosts::up("vnicxbench", &["--cores", "0"]);
    let (site, h1, h2) = (&hosts.site, &hosts.h1, &hosts.h2);
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_before = load();
    let s_server = || app_env(site, &site.dirs[1], "nic2");
    let s_client = || app_env(site, &site.dirs[0], "nic1");
    let h_server = || app_env(site, h2, "hserver");
    let h_client = || app_env(site, h1, "hclient");
    let mut port = 18720;
    for tool in ["ib_send_lat", "ib_write_lat"] {
        let (mut s, mut h) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            port += 1;
            s.push(perftest_typical_us_between(
                site,
                (&s_server, "nic2"),
                (&s_client, "10.32.0.11"),
                tool,
                port,
            ));
            port += 1;
            h.push(perftest_typical_us_between(
                site,
                (&h_server, "hserver"),
                (&h_client, "10.64.0.2"),
                tool,
                port,
            ));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[1]
        };
        let (s_med, h_med) = (median(&mut s), median(&mut h));
        eprintln!(
            "across hosts, {tool} 64 B t_typical (medians of 3): S1<->S2 directly {s_med:.2} \
             us, through H1 and H2's device paths {h_med:.2} us: the H routers add {:.0} ns \
             per operation (runs: S {s:?}, H {h:?})",
            (h_med - s_med) * 1000.0
        );
    }
    eprintln!(
        "load average before: {}, after: {}",
        load_before.trim(),
        load().trim()
    );
}
