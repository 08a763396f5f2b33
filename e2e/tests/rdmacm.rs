//! RDMA mode, rdma_cm: Debian's unmodified programs of rdmacm-utils (rping, ucmatose,
//! rdma_server/rdma_client, cmtime; udaddy over RDMA_PS_UDP) connect between two registered containers of one simulated
//! host through Freeflow's `librdmacm.so.1` (installed by `freeflow up` into `DIR/verbs`), the
//! router's connection manager and Freeflow's `libibverbs.so.1`. A container of another tenant
//! cannot resolve, hence cannot connect to, the server's address. Across hosts, a router that goes
//! away disconnects the other host's side. Every function of Debian's
//! `librdmacm.so.1` exists in ours at its version.
//!
//! Needs root, a built workspace (`cargo build --workspace`) and rdmacm-utils (scripts/test.sh
//! installs it). The Site scaffolding is in common/mod.rs.

mod common;

use common::{
    assert_both_succeeded, describe, stdout_text, succeeded_saying, target_dir, CProbe, Site,
    SiteSpec,
};
use std::collections::BTreeSet;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

impl Site {
    /// One host with Freeflow up; containers server, client (tenant blue) and other (tenant red)
    /// registered.
    fn new(prefix: &str) -> Site {
        common::require_programs(
            &["rping", "ucmatose", "rdma_server", "cmtime", "udaddy"],
            "rdmacm-utils",
        );
        let site = Site::create_verbs(SiteSpec {
            prefix,
            work_prefix: "ff-rdmacm",
            hosts: 1,
            containers: common::SERVER_CLIENT_OTHER,
            registered: common::BLUE_BLUE_RED,
            verbs_timeout: 60,
            ..SiteSpec::default()
        });
        assert!(
            site.dirs[0].join("verbs/librdmacm.so.1").is_file(),
            "freeflow up did not install verbs/librdmacm.so.1"
        );
        site
    }

    /// The server side in container `server`: see [`Site::start_cm_server`].
    fn cm_server(&self, program: &str, args: &[&str], listeners: u64) -> Child {
        self.start_cm_server("server", program, args, &[], listeners)
    }

    /// `server` (program, arguments) in container server, once it listens, then `client` in
    /// container client to completion; both must exit 0 (`what` names the run). Returns
    /// their outputs.
    fn cm_pair(
        &self,
        what: &str,
        server: (&str, &[&str]),
        client: (&str, &[&str]),
    ) -> (Output, Output) {
        let running = self.cm_server(server.0, server.1, 1);
        let client = self.cm_client("client", client.0, client.1);
        let server = running.wait_with_output().unwrap();
        assert_both_succeeded(self, what, &server, &client);
        (server, client)
    }

    /// `program ARGS` in `container` to completion.
    fn cm_client(&self, container: &str, program: &str, args: &[&str]) -> Output {
        self.verbs_app(container, program, &[("FREEFLOW_DEBUG", "1")])
            .args(args)
            .output()
            .unwrap()
    }
}

#[test]
fn every_function_of_debians_librdmacm_exists_at_its_version() {
    common::require_programs(&["objdump"], "binutils");
    let debian = "/usr/lib/x86_64-linux-gnu/librdmacm.so.1";
    assert!(
        std::path::Path::new(debian).is_file(),
        "{debian} missing: install librdmacm1 (scripts/test.sh does)"
    );
    let ours = target_dir().join("librdmacm.so");
    assert!(
        ours.is_file(),
        "build the workspace first: {} missing",
        ours.display()
    );
    // "NAME@VERSION" of every defined function.
    let functions = |lib: &std::path::Path| -> BTreeSet<String> {
        let out = std::process::Command::new("objdump")
            .arg("-T")
            .arg(lib)
            .output()
            .unwrap();
        assert!(out.status.success(), "objdump -T {}", lib.display());
        stdout_text(&out)
            .lines()
            .filter(|l| l.contains(" DF ") && !l.contains("*UND*"))
            .filter_map(|l| {
                let mut words = l.split_whitespace().rev();
                let name = words.next()?;
                let version = words.next()?.trim_matches(|c| c == '(' || c == ')');
                Some(format!("{name}@{version}"))
            })
            .collect()
    };
    let wanted = functions(std::path::Path::new(debian));
    let have = functions(&ours);
    assert!(
        wanted.len() >= 68,
        "Debian's library lists {} functions",
        wanted.len()
    );
    let missing: Vec<_> = wanted.difference(&have).collect();
    assert!(missing.is_empty(), "missing from ours: {missing:?}");
    let soname = std::process::Command::new("objdump")
        .arg("-p")
        .arg(&ours)
        .output()
        .unwrap();
    assert!(
        stdout_text(&soname).contains("SONAME               librdmacm.so.1"),
        "{}",
        stdout_text(&soname)
    );
}

#[test]
fn unmodified_rping_sends_reads_and_writes_between_two_containers() {
    let site = Site::new("cmr");
    let (server, client) = site.cm_pair(
        "rping",
        (
            "rping",
            &["-s", "-a", "10.32.0.2", "-p", "7174", "-v", "-C", "100"],
        ),
        (
            "rping",
            &["-c", "-a", "10.32.0.2", "-p", "7174", "-v", "-C", "100"],
        ),
    );
    // -v prints each ping's data, which the server has read from the client (RDMA READ) and
    // the client has had written back (RDMA WRITE), then checked.
    let pings = stdout_text(&client)
        .lines()
        .filter(|l| l.starts_with("ping data: rdma-ping-"))
        .count();
    assert_eq!(pings, 100, "client: {}", describe(&client));
    let served = stdout_text(&server)
        .lines()
        .filter(|l| l.starts_with("server ping data: rdma-ping-"))
        .count();
    assert_eq!(served, 100, "server: {}", describe(&server));
    assert!(site.router_counter(0, "cm_established") >= 1);
}

#[test]
fn unmodified_ucmatose_runs_several_connections() {
    let site = Site::new("cmu");
    let (server, client) = site.cm_pair(
        "ucmatose",
        ("ucmatose", &["-b", "10.32.0.2", "-c", "4", "-C", "20"]),
        ("ucmatose", &["-s", "10.32.0.2", "-c", "4", "-C", "20"]),
    );
    for (who, out) in [("server", &server), ("client", &client)] {
        assert!(
            stdout_text(out).contains("test complete"),
            "{who}: {}",
            describe(out)
        );
    }
    assert_eq!(site.router_counter(0, "cm_established"), 4);
}

#[test]
fn unmodified_udaddy_exchanges_datagrams_over_rdma_ps_udp() {
    let site = Site::new("cmd");
    // Two UD "connections" (the client learns each server QP's number and qkey from its
    // ESTABLISHED event), 10 datagrams of 100 bytes each way on each: the server answers from
    // the address in each first datagram's GRH (ibv_create_ah_from_wc).
    let (server, client) = site.cm_pair(
        "udaddy",
        ("udaddy", &["-b", "10.32.0.2", "-c", "2", "-C", "10"]),
        ("udaddy", &["-s", "10.32.0.2", "-c", "2", "-C", "10"]),
    );
    for (who, out) in [("server", &server), ("client", &client)] {
        let t = stdout_text(out);
        assert!(
            t.contains("data transfers complete") && t.contains("return status 0"),
            "{who}: {}",
            describe(out)
        );
    }
    // No connection was established: UD ids only exchange QP numbers.
    assert_eq!(site.router_counter(0, "cm_established"), 0);
}

#[test]
fn unmodified_rdma_server_and_rdma_client_use_synchronous_ids() {
    let site = Site::new("cms");
    let (server, client) = site.cm_pair(
        "rdma_server/rdma_client",
        ("rdma_server", &["-s", "10.32.0.2", "-p", "7471"]),
        ("rdma_client", &["-s", "10.32.0.2", "-p", "7471"]),
    );
    assert!(
        stdout_text(&server).contains("rdma_server: end 0"),
        "{}",
        describe(&server)
    );
    assert!(
        stdout_text(&client).contains("rdma_client: end 0"),
        "{}",
        describe(&client)
    );
}

#[test]
fn unmodified_cmtime_connects_and_disconnects_many_ids() {
    let site = Site::new("cmt");
    // Debian's cmtime server serves until it is stopped.
    let mut server = site.cm_server("cmtime", &["-b", "10.32.0.2", "-c", "50"], 1);
    let client = site.cm_client("client", "cmtime", &["-s", "10.32.0.2", "-c", "50"]);
    assert!(
        server.try_wait().unwrap().is_none(),
        "the cmtime server stopped during the run"
    );
    assert!(common::terminate(&mut server, Duration::from_secs(5)));
    let server = server.wait_with_output().unwrap();
    assert!(
        client.status.success(),
        "cmtime client: {}\n--- server: {}\n--- router log\n{}",
        describe(&client),
        describe(&server),
        site.router_log()
    );
    // The client's table names each step it timed, through the disconnect.
    for step in [
        "resolve addr",
        "resolve route",
        "create qp",
        "connect",
        "disconnect",
        "destroy",
    ] {
        assert!(
            stdout_text(&client).contains(step),
            "{step}: {}",
            describe(&client)
        );
    }
    assert_eq!(site.router_counter(0, "cm_established"), 50);
    // The timings, for the log (no threshold: the machine is shared).
    eprintln!("cmtime client:\n{}", stdout_text(&client));
}

#[test]
fn a_container_of_another_tenant_cannot_resolve_nor_connect() {
    let site = Site::new("cmx");
    let server = site.cm_server(
        "rping",
        &["-s", "-a", "10.32.0.2", "-p", "7175", "-C", "1"],
        1,
    );
    let out = site.cm_client(
        "other",
        "rping",
        &["-c", "-a", "10.32.0.2", "-p", "7175", "-C", "1", "-v"],
    );
    assert!(
        !out.status.success(),
        "rping from another tenant: {}",
        describe(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RDMA_CM_EVENT_ADDR_ERROR"),
        "no ADDR_ERROR: {}",
        describe(&out)
    );
    assert!(
        err.contains("not an address of this container's tenant"),
        "no FREEFLOW_DEBUG reason: {}",
        describe(&out)
    );
    assert_eq!(site.router_counter(0, "cm_established"), 0);
    // The server is still there for its own tenant: a client of blue connects.
    let ok = site.cm_client(
        "client",
        "rping",
        &["-c", "-a", "10.32.0.2", "-p", "7175", "-C", "1"],
    );
    // The server serves this one client, then exits (bounded by the site's verbs timeout).
    let server = server.wait_with_output().unwrap();
    assert_both_succeeded(&site, "rping after the refusal", &server, &ok);
}

/// The C side of the checks below (its own file, to be readable and compilable by hand), built
/// against the installed headers and Debian's librdmacm and libibverbs (so it imports the
/// functions at rdma-core's versions, like any Debian binary).
const PROBE: CProbe = CProbe {
    name: "rdmacm_probe",
    source: include_str!("programs/rdmacm_probe.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-lrdmacm", "-libverbs"],
};

#[test]
fn the_event_channel_polls_and_every_exchange_and_error_is_rdma_cms() {
    let site = Site::new("cmp");
    let probe = PROBE.build(&site.work);
    let out = site
        .verbs_app("client", &probe, &[])
        .args(["10.32.0.2", "10.32.0.4"])
        .output()
        .unwrap();
    assert!(
        succeeded_saying(&out, "checks passed"),
        "{}\n--- router log\n{}",
        describe(&out),
        site.router_log()
    );
}

/// Two hosts: server (10.32.0.2) on host 0; client (10.32.0.3, same tenant) and other
/// (10.32.0.4, another tenant) on host 1.
fn two_hosts(prefix: &str) -> Site {
    common::require_programs(&["rping", "ucmatose", "udaddy"], "rdmacm-utils");
    Site::create_verbs(SiteSpec {
        prefix,
        work_prefix: "ff-rdmacm-x",
        hosts: 2,
        containers: &[
            (0, "server", [10, 32, 0, 2]),
            (1, "client", [10, 32, 0, 3]),
            (1, "other", [10, 32, 0, 4]),
        ],
        registered: &[("server", "blue"), ("client", "blue"), ("other", "red")],
        verbs_timeout: 60,
        ..SiteSpec::default()
    })
}

#[test]
fn across_hosts_rping_and_ucmatose_connect_and_another_tenant_cannot() {
    let site = two_hosts("cmh");
    // The routers carry the CM's steps on their peer connections, the RDMA on the verbs port.
    let (_, client) = site.cm_pair(
        "rping across hosts",
        (
            "rping",
            &["-s", "-a", "10.32.0.2", "-p", "7176", "-v", "-C", "50"],
        ),
        (
            "rping",
            &["-c", "-a", "10.32.0.2", "-p", "7176", "-v", "-C", "50"],
        ),
    );
    let pings = stdout_text(&client)
        .lines()
        .filter(|l| l.starts_with("ping data: rdma-ping-"))
        .count();
    assert_eq!(pings, 50, "client: {}", describe(&client));
    assert_eq!(site.router_counter(0, "cm_established"), 1);

    site.cm_pair(
        "ucmatose across hosts",
        ("ucmatose", &["-b", "10.32.0.2", "-c", "3", "-C", "10"]),
        ("ucmatose", &["-s", "10.32.0.2", "-c", "3", "-C", "10"]),
    );
    assert_eq!(site.router_counter(0, "cm_established"), 4);

    // Another tenant on the client's host: the server's address does not resolve.
    let out = site.cm_client(
        "other",
        "rping",
        &["-c", "-a", "10.32.0.2", "-p", "7177", "-C", "1"],
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("RDMA_CM_EVENT_ADDR_ERROR"),
        "{}",
        describe(&out)
    );
}

#[test]
fn across_hosts_an_address_registered_a_moment_ago_resolves_once_the_router_hears_of_it() {
    // The client's router has not heard of the server's container (its host's daemon is
    // stopped) when rping resolves the server's address: the resolution waits, within rping's
    // 2 s timeout, and succeeds when the daemon's next table comes, as a real CM waits for ARP.
    common::require_programs(&["rping"], "rdmacm-utils");
    let site = Site::create_verbs(SiteSpec {
        prefix: "cmw",
        work_prefix: "ff-rdmacm-x",
        hosts: 2,
        containers: &[(0, "server", [10, 32, 0, 2]), (1, "client", [10, 32, 0, 3])],
        registered: &[("client", "blue")],
        verbs_timeout: 60,
        ..SiteSpec::default()
    });
    let stopped = site.stop_daemon(1);
    site.register("server", "blue");
    let server = site.cm_server(
        "rping",
        &["-s", "-a", "10.32.0.2", "-p", "7178", "-v", "-C", "10"],
        1,
    );
    let client = site
        .verbs_app("client", "rping", &[])
        .args(["-c", "-a", "10.32.0.2", "-p", "7178", "-v", "-C", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The client's router says when the resolution starts waiting; only then does it learn.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !site
        .router_log()
        .contains("resolves 10.32.0.2, not known here yet")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the client's resolution never waited: {}",
            site.router_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stopped);
    let client = client.wait_with_output().unwrap();
    let server = server.wait_with_output().unwrap();
    assert_both_succeeded(
        &site,
        "rping to a container registered late",
        &server,
        &client,
    );
    let pings = stdout_text(&client)
        .lines()
        .filter(|l| l.starts_with("ping data: rdma-ping-"))
        .count();
    assert_eq!(pings, 10, "client: {}", describe(&client));
    assert_eq!(site.router_counter(1, "cm_resolved_late"), 1);
}

const PEER_LOSS: CProbe = CProbe {
    name: "rdmacm_peer_loss",
    source: include_str!("programs/rdmacm_peer_loss.c"),
    cflags: &["-Wall", "-Werror", "-O1"],
    libs: &["-lrdmacm", "-libverbs"],
};

#[test]
fn across_hosts_udaddy_exchanges_datagrams() {
    let site = two_hosts("cmg");
    // The routers carry the UD exchange (connect, the passive QP's answer) on their peer
    // connections, the datagrams on the verbs port.
    let (server, client) = site.cm_pair(
        "udaddy across hosts",
        ("udaddy", &["-b", "10.32.0.2", "-c", "2", "-C", "10"]),
        ("udaddy", &["-s", "10.32.0.2", "-c", "2", "-C", "10"]),
    );
    for (who, out) in [("server", &server), ("client", &client)] {
        let t = stdout_text(out);
        assert!(
            t.contains("data transfers complete") && t.contains("return status 0"),
            "{who}: {}",
            describe(out)
        );
    }
}

#[test]
fn across_hosts_a_lost_peer_router_disconnects_the_other_side() {
    let site = two_hosts("cml");
    let probe = PEER_LOSS.build(&site.work);
    // rping's server accepts and waits for the client's first message, which never comes.
    let mut server = site.cm_server("rping", &["-s", "-a", "10.32.0.2", "-p", "7178"], 1);
    let client = site
        .verbs_app("client", &probe, &[("FREEFLOW_DEBUG", "1")])
        .args(["10.32.0.2", "7178"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the server's router (host 0) counts the connection, it goes away.
    assert_eq!(site.wait_for_router_counter(0, "cm_established", 1), 1);
    let pid: i32 = std::fs::read_to_string(site.state_dir(0).join("router.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    freeflow_os::signals::send_signal(pid, libc::SIGKILL).unwrap();
    let client = client.wait_with_output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        client.status.success()
            && stdout_text(&client).contains("event RDMA_CM_EVENT_DISCONNECTED"),
        "{}\n--- router log\n{}",
        describe(&client),
        site.router_log()
    );
}
