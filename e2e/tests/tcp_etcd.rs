//! Two simulated hosts whose daemons share a registry on etcd (a real etcd, run by the test in
//! host 0's namespace): a TCP connection between their containers is accelerated, and when host
//! 1's daemon is killed, host 0's router drops that host (and its container's address) once the
//! lease expires. Needs root and a built workspace (the shim and the router).

mod common;

use common::{poll, spawn_reading_first_line, Site, SiteSpec, FREEFLOW};
use freeflow_testbed as topology;
use std::io::Read;
use std::process::{Child, Stdio};
use std::time::Duration;

/// The etcd registry's lease time to live (freeflow_control::registry::LEASE_TTL), in seconds.
const LEASE_TTL: u64 = 10;
/// Slack on top of the lease's time to live for etcd to expire it and the daemon to notice.
const EXPIRY_SLACK: Duration = Duration::from_secs(5);

const SERVER: &str = include_str!("programs/tcp_echo_server.py");
const CLIENT: &str = include_str!("programs/tcp_echo_client.py");

fn python(site: &Site, container: &str, script: &str) -> std::process::Command {
    let mut cmd = site.shim_env(container, true);
    cmd.args(["timeout", "60", "python3", "-c", script]);
    cmd
}

fn start_server(site: &Site, container: &str, port: u16) -> Child {
    let (child, mut reader, line) = spawn_reading_first_line(
        python(site, container, SERVER)
            .args(["1", &port.to_string(), "4"])
            .stderr(Stdio::piped()),
    );
    assert!(
        line.starts_with("LISTENING"),
        "server did not start: {line:?}"
    );
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
    });
    child
}

fn vxlan_tx(site: &Site, host: usize) -> u64 {
    topology::link_stats(&site.cluster().hosts()[host].netns, "vx0")
        .unwrap()
        .tx_packets
}

/// The registry as host `host` sees it, through `freeflow container ls --json`.
fn registered(site: &Site, host: usize) -> String {
    let out = site
        .in_host(host, &FREEFLOW)
        .args(["container", "ls", "--json", "--dir"])
        .arg(&site.dirs[host])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn daemons_on_etcd_accelerate_and_forget_a_dead_host() {
    let site = Site::create_tcp(SiteSpec {
        prefix: "te",
        work_prefix: "ff-tcp-etcd",
        hosts: 2,
        containers: &[(0, "web", [10, 32, 0, 2]), (1, "db", [10, 32, 0, 4])],
        registered: &[("web", "blue"), ("db", "blue")],
        etcd_registry: true,
        ..SiteSpec::default()
    });
    assert!(site.registry.starts_with("etcd://"), "{}", site.registry);
    let listed = registered(&site, 1);
    assert!(
        listed.contains("\"web\"") && listed.contains("\"db\""),
        "{listed}"
    );

    // Across hosts, accelerated: the bytes go over the host link, not VXLAN.
    let server = start_server(&site, "db", 5000);
    let before = vxlan_tx(&site, 0);
    let out = python(&site, "web", CLIENT)
        .args(["10.32.0.4", "5000", &(1 << 20).to_string(), "blocking"])
        .output()
        .unwrap();
    let text = common::describe(&out);
    assert!(out.status.success() && text.contains("ECHO_OK"), "{text}");
    assert!(text.contains("SERVER_SAW ('10.32.0.2',"), "{text}");
    let sent = vxlan_tx(&site, 0) - before;
    assert!(sent < 50, "data went through VXLAN: {sent} packets");
    let mut server = server;
    let _ = server.wait();
    let status = site.router_status(0);
    assert!(
        status["router"]["tcp_connects"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );

    // Host 1's daemon dies (its router keeps running): its lease is no longer renewed, and
    // host 0's router gets a table without host 1 once etcd expires it.
    let pid_file = site.state_dir(1).join("freeflow.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let log0 = site.state_dir(0).join("freeflow.log");
    let forgotten = poll(
        Duration::from_secs(LEASE_TTL) + EXPIRY_SLACK,
        Duration::from_millis(100),
        || {
            let log = std::fs::read_to_string(&log0).unwrap_or_default();
            let last = log.lines().rev().find(|l| l.contains("router table:"))?;
            last.contains("1 overlay address(es), 0 peer host(s)")
                .then_some(())
        },
    );
    assert!(
        forgotten.is_some(),
        "host 0's router still has host 1:\n{}",
        std::fs::read_to_string(&log0).unwrap_or_default()
    );
    let listed = registered(&site, 0);
    assert!(
        listed.contains("\"web\"") && !listed.contains("\"db\""),
        "{listed}"
    );
}
