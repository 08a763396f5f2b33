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

/// The registry's key prefix under the site's etcd (`Site` registers everything under
/// `/freeflow`, layout `v1`).
const ROOT: &str = "/freeflow/v1/";
/// How long a router's table may take to equal etcd again after a change.
const CONVERGE_LIMIT: Duration = Duration::from_secs(30);

fn b64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// POSTs `body` to the site's etcd gateway at `path` (curl in host 0); the parsed answer.
fn etcd_post(site: &Site, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let endpoint = site.etcd.as_ref().unwrap().endpoint();
    let out = site
        .in_host(0, "curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-X",
            "POST",
            "-d",
            &body.to_string(),
        ])
        .arg(format!("http://{endpoint}{path}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What etcd holds, read straight from it: the generation, every container's host address,
/// the number of hosts, and the revision read at.
struct EtcdHolds {
    generation: u64,
    container_hosts: Vec<String>,
    hosts: usize,
    revision: String,
}

fn etcd_holds(site: &Site) -> EtcdHolds {
    use base64::Engine as _;
    let decode = |v: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .unwrap()
    };
    let range = |sub: &str| {
        let end = format!("{ROOT}{}", sub.replace('/', "0"));
        etcd_post(
            site,
            "/v3/kv/range",
            &serde_json::json!({ "key": b64(&format!("{ROOT}{sub}")), "range_end": b64(&end) }),
        )
    };
    let generation = etcd_post(
        site,
        "/v3/kv/range",
        &serde_json::json!({ "key": b64(&format!("{ROOT}generation")) }),
    );
    let containers = range("containers/");
    let hosts = range("hosts/");
    let kvs = |answer: &serde_json::Value| answer["kvs"].as_array().cloned().unwrap_or_default();
    EtcdHolds {
        generation: String::from_utf8(decode(&kvs(&generation)[0]["value"]))
            .unwrap()
            .parse()
            .unwrap(),
        container_hosts: kvs(&containers)
            .iter()
            .map(|kv| {
                let record: serde_json::Value =
                    serde_json::from_slice(&decode(&kv["value"])).unwrap();
                record["host_ip"].as_str().unwrap().to_owned()
            })
            .collect(),
        hosts: kvs(&hosts).len(),
        revision: generation["header"]["revision"]
            .as_str()
            .unwrap()
            .to_owned(),
    }
}

/// Why host `host`'s router table differs from what etcd holds (`None`: it equals it): the
/// generation the pushed table reflects, its overlay addresses and peer hosts (the daemon's
/// status), and the containers the router itself says it serves.
fn table_differs(site: &Site, host: usize) -> Option<String> {
    let etcd = etcd_holds(site);
    let status = site.router_status(host);
    let daemon = &status["daemon"];
    let host_ip = format!("192.168.1.{}", host + 1);
    let mine = etcd
        .container_hosts
        .iter()
        .filter(|h| **h == host_ip)
        .count();
    let table = (
        daemon["registry_generation"].as_u64(),
        daemon["overlay_pushed"].as_u64(),
        daemon["peer_hosts_pushed"].as_u64(),
        status["router"]["registered"].as_u64(),
    );
    let held = (
        Some(etcd.generation),
        Some(etcd.container_hosts.len() as u64),
        Some(etcd.hosts as u64 - 1),
        Some(mine as u64),
    );
    (table != held).then(|| {
        format!(
            "host {host}: table (generation, overlay, peers, registered) {table:?}, etcd {held:?}"
        )
    })
}

/// Waits (bounded) until both hosts' router tables equal etcd; panics with the difference.
fn assert_tables_equal_etcd(site: &Site, when: &str) {
    let mut last = String::new();
    let equal = poll(CONVERGE_LIMIT, Duration::from_millis(200), || {
        match (0..2).find_map(|h| table_differs(site, h)) {
            Some(difference) => {
                last = difference;
                None
            }
            None => Some(()),
        }
    });
    assert!(equal.is_some(), "{when}: {last}");
}

/// Network namespaces made for a test (`ip netns add`), deleted when dropped.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
        }
    }
}

/// `freeflow container add` (or `rm`) on `host`, started, not waited for.
fn container_cmd(site: &Site, host: usize, args: &[&str]) -> Child {
    site.in_host(host, &FREEFLOW)
        .args(["container"])
        .args(args)
        .arg("--dir")
        .arg(&site.dirs[host])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_all(children: Vec<Child>) {
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", common::describe(&out));
    }
}

/// Each daemon follows etcd through its watch: after a burst of concurrent registrations and
/// removals on both hosts, after etcd compacted its history, and after etcd was killed and
/// restarted, each router's table equals what etcd holds (generation, overlay addresses, peers,
/// and the containers the router serves), and the daemons say they started over (resynced).
#[test]
fn router_tables_equal_etcd_through_bursts_compaction_and_restarts() {
    let mut site = Site::create_tcp(SiteSpec {
        prefix: "tw",
        work_prefix: "ff-tcp-etcd-watch",
        hosts: 2,
        containers: &[(0, "web", [10, 32, 0, 2]), (1, "db", [10, 32, 0, 4])],
        registered: &[("web", "blue"), ("db", "blue")],
        etcd_registry: true,
        ..SiteSpec::default()
    });
    assert_tables_equal_etcd(&site, "at the start");
    let tag = topology::fresh_tag("ffw");
    let namespaces = Namespaces((0..32).map(|i| format!("{tag}-{i}")).collect());
    for name in &namespaces.0 {
        let made = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(made.success(), "ip netns add {name}");
    }
    let add = |site: &Site, i: usize| {
        let (name, netns, ip) = (
            format!("burst{i}"),
            format!("/run/netns/{}", namespaces.0[i]),
            format!("10.32.1.{}", i + 1),
        );
        container_cmd(
            site,
            i % 2,
            &[
                "add", &name, "--netns", &netns, "--ip", &ip, "--tenant", "blue",
            ],
        )
    };
    let rm = |site: &Site, i: usize| container_cmd(site, i % 2, &["rm", &format!("burst{i}")]);

    // A burst: 24 registrations at once on both hosts, then every third removed at once.
    wait_all((0..24).map(|i| add(&site, i)).collect());
    wait_all(
        (0..24)
            .filter(|i| i % 3 == 0)
            .map(|i| rm(&site, i))
            .collect(),
    );
    assert_tables_equal_etcd(&site, "after the burst");
    assert_eq!(etcd_holds(&site).container_hosts.len(), 2 + 24 - 8);

    // etcd compacts everything up to now; later changes still reach the tables.
    let revision = etcd_holds(&site).revision;
    let compacted = etcd_post(
        &site,
        "/v3/kv/compaction",
        &serde_json::json!({ "revision": revision, "physical": true }),
    );
    assert!(compacted.get("error").is_none(), "{compacted}");
    wait_all((24..28).map(|i| add(&site, i)).collect());
    assert_tables_equal_etcd(&site, "after the compaction");

    // etcd killed and restarted from its data; changes after it come through.
    site.etcd.as_mut().unwrap().kill();
    std::thread::sleep(Duration::from_secs(1));
    site.etcd.as_mut().unwrap().restart();
    wait_all((28..32).map(|i| add(&site, i)).collect());
    wait_all([1, 2].into_iter().map(|i| rm(&site, i)).collect());
    assert_tables_equal_etcd(&site, "after etcd restarted");
    assert_eq!(etcd_holds(&site).container_hosts.len(), 2 + 32 - 8 - 2);
    for host in 0..2 {
        let status = site.router_status(host);
        let resyncs = status["daemon"]["registry_resyncs"].as_u64();
        assert!(resyncs.is_some_and(|r| r >= 1), "host {host}: {status}");
        // The tables above were reached by deltas after the first whole push.
        let deltas = status["daemon"]["table_pushes_delta"].as_u64();
        assert!(deltas.is_some_and(|d| d >= 1), "host {host}: {status}");
        let whole = status["daemon"]["table_pushes_full"].as_u64();
        assert!(whole.is_some_and(|w| w >= 1), "host {host}: {status}");
    }
}
