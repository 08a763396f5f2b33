//! The simulated cluster, built for real: these tests need root (they create network namespaces)
//! and the Debian packages iproute2 and iputils-ping. They fail, never skip, without them.

use std::net::Ipv4Addr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Command, Stdio};
use std::time::Duration;

use freeflow_testbed::{
    self as topology, fault, fresh_tag, test_support::poll, Cluster, ClusterSpec, ContainerInfo,
    TopologyError, OVERLAY_DEV,
};

/// Fail loudly (not skip) when the environment cannot run these tests.
fn require_root() {
    if let Err(e) = topology::ensure_root() {
        panic!("topology tests must run as root: {e}");
    }
    let ping = Command::new("ping").arg("-V").output();
    assert!(
        ping.is_ok_and(|o| o.status.success()),
        "topology tests need `ping` (Debian package iputils-ping)"
    );
}

fn addr(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A fresh cluster of `hosts` hosts, its tag starting with `prefix`; fails without root.
fn new_cluster(prefix: &str, hosts: usize) -> (String, Cluster) {
    require_root();
    let tag = fresh_tag(prefix);
    let cluster = Cluster::create(ClusterSpec::new(&tag, hosts)).unwrap();
    (tag, cluster)
}

/// Container `name` on host `host` at `ip`/12 (the tests' overlay is 10.32.0.0/12).
fn add(cluster: &mut Cluster, host: usize, name: &str, ip: &str) -> ContainerInfo {
    cluster.add_container(host, name, addr(ip), 12).unwrap()
}

/// The usual pair: `a` (10.32.0.5) on host 0 and `b` (10.32.1.5) on host 1.
fn add_a_and_b(cluster: &mut Cluster) -> (ContainerInfo, ContainerInfo) {
    let a = add(cluster, 0, "a", "10.32.0.5");
    let b = add(cluster, 1, "b", "10.32.1.5");
    (a, b)
}

/// Runs `ip args`; whether it succeeded.
fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().unwrap().success()
}

/// Namespaces of `tag` as `ip netns list` reports them (independent of the library's own
/// reading of /run/netns).
fn netns_listed(tag: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success(), "ip netns list failed");
    let prefix = format!("ff-{tag}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

fn assert_gone(tag: &str) {
    assert_eq!(netns_listed(tag), Vec::<String>::new(), "namespaces left");
    let entries: Vec<String> = topology::list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&format!("ff-{tag}-")))
        .collect();
    assert!(entries.is_empty(), "/run/netns entries left: {entries:?}");
    assert!(!topology::list_tags().unwrap().contains(&tag.to_owned()));
}

/// One `ping -c 1 -W 2` from inside `netns`; bounded by ping's own timeout.
fn ping_once(netns: &str, dst: Ipv4Addr) -> bool {
    topology::command_in(netns, "ping")
        .args(["-c", "1", "-W", "2", &dst.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// A ping that must succeed; up to three tries (the first may wait for ARP across the tunnel).
fn assert_ping(netns: &str, dst: Ipv4Addr) {
    for _ in 0..3 {
        if ping_once(netns, dst) {
            return;
        }
    }
    panic!("ping {dst} from {netns} failed three times");
}

/// Names of the interfaces in `netns`.
fn links_in(netns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "link", "show"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_owned())
        .collect()
}

/// The vx0 TX counter read through sysfs inside the host namespace (`ip netns exec` mounts the
/// namespace's own /sys).
fn vx0_tx_sysfs(netns: &str) -> u64 {
    let out = topology::command_in(netns, "cat")
        .arg(format!(
            "/sys/class/net/{OVERLAY_DEV}/statistics/tx_packets"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "reading tx_packets failed");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn two_hosts_overlay() {
    let (tag, mut cluster) = new_cluster("two", 2);
    assert_eq!(cluster.tag(), tag);
    assert_eq!(cluster.hosts().len(), 2);
    assert!(cluster.switch_netns().is_none());
    let (a, b) = add_a_and_b(&mut cluster);
    assert_eq!(a.netns, format!("ff-{tag}-c-a"));
    assert!(a.netns_path.exists());
    assert_eq!(cluster.containers().len(), 2);
    let (h0, h1) = (cluster.hosts()[0].clone(), cluster.hosts()[1].clone());
    assert_eq!(h0.netns, format!("ff-{tag}-h0"));
    assert_eq!(h0.host_ip, addr("192.168.1.1"));
    assert_eq!(h1.host_ip, addr("192.168.1.2"));
    assert!(h1.netns_path.exists());

    // The VXLAN device is what was asked for.
    let out = Command::new("ip")
        .args(["-n", &h0.netns, "-d", "-j", "link", "show", "dev", "vx0"])
        .output()
        .unwrap();
    let vx: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let info = &vx[0]["linkinfo"]["info_data"];
    assert_eq!(vx[0]["mtu"], 1450);
    assert_eq!(vx[0]["master"], "br0");
    assert_eq!(info["id"], 42);
    assert_eq!(info["port"], 4789);
    assert_eq!(info["local"], "192.168.1.1");
    assert_eq!(info["learning"], true);
    let fdb = Command::new("bridge")
        .args(["-n", &h0.netns, "fdb", "show", "dev", "vx0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&fdb.stdout).contains("00:00:00:00:00:00 dst 192.168.1.2"));
    let mtu = topology::command_in(&a.netns, "cat")
        .arg("/sys/class/net/eth0/mtu")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&mtu.stdout).trim(), "1450");

    // Container to container, across hosts, through VXLAN.
    let tx_before = vx0_tx_sysfs(&h0.netns);
    let rx_before = cluster.overlay_stats(1).unwrap().rx_packets;
    assert_ping(&a.netns, b.ip);
    let tx_after = vx0_tx_sysfs(&h0.netns);
    assert!(tx_after > tx_before, "vx0 tx {tx_before} -> {tx_after}");
    assert_eq!(cluster.overlay_stats(0).unwrap().tx_packets, tx_after);
    assert!(cluster.overlay_stats(1).unwrap().rx_packets > rx_before);
    assert_ping(&b.netns, a.ip);

    // Host to host on the physical link.
    assert_ping(&h0.netns, h1.host_ip);

    // A container has no route to the host link.
    assert!(!ping_once(&a.netns, addr("192.168.1.2")));
    let route = Command::new("ip")
        .args(["-n", &a.netns, "route", "get", "192.168.1.2"])
        .output()
        .unwrap();
    assert!(!route.status.success(), "container has a route to the link");

    // Take vx0 down on host 0: the containers are cut off, proving the overlay is the only path.
    let set = |state: &str| assert!(ip(&["-n", &h0.netns, "link", "set", "vx0", state]));
    set("down");
    assert!(!ping_once(&a.netns, b.ip), "ping crossed without vx0");
    set("up");
    assert_ping(&a.netns, b.ip);

    // describe() names everything.
    let d = cluster.describe();
    assert_eq!(d["tag"], tag.as_str());
    assert_eq!(d["hosts"][1]["netns"], h1.netns.as_str());
    assert_eq!(d["hosts"][1]["host_ip"], "192.168.1.2");
    assert_eq!(d["containers"][0]["ip"], "10.32.0.5");
    assert_eq!(
        d["containers"][1]["netns_path"],
        format!("/run/netns/ff-{tag}-c-b").as_str()
    );

    // Removing a container removes its namespace and the host end of its veth.
    cluster.remove_container("b").unwrap();
    assert!(!b.netns_path.exists());
    assert!(!links_in(&h1.netns).contains(&b.host_veth));
    assert!(!ping_once(&a.netns, b.ip));
    assert!(matches!(
        cluster.remove_container("b"),
        Err(TopologyError::NoSuchContainer(_))
    ));
    // The name and address are free again, on any host: the peers' caches do not send it to
    // where it was.
    let b2 = add(&mut cluster, 0, "b", "10.32.1.5");
    assert_eq!(b2.mac, "02:42:0a:20:01:05");
    assert_ping(&a.netns, b2.ip);
    cluster.remove_container("b").unwrap();
    let b3 = add(&mut cluster, 1, "b", "10.32.1.5");
    assert_ping(&a.netns, b3.ip);
    assert_ping(&b3.netns, a.ip);

    assert_eq!(netns_listed(&tag).len(), 4);
    drop(cluster);
    assert_gone(&tag);
}

#[test]
fn three_hosts_through_switch() {
    let (tag, mut cluster) = new_cluster("sw", 3);
    assert_eq!(
        cluster.switch_netns(),
        Some(format!("ff-{tag}-sw").as_str())
    );
    let ips = ["10.32.0.1", "10.32.0.2", "10.32.0.3"];
    let cs: Vec<_> = (0..3)
        .map(|h| add(&mut cluster, h, &format!("c{h}"), ips[h]))
        .collect();
    for from in &cs {
        for to in &cs {
            if from.name != to.name {
                assert_ping(&from.netns, to.ip);
            }
        }
    }
    let hosts = cluster.hosts().to_vec();
    assert_ping(&hosts[0].netns, hosts[2].host_ip);
    assert!(cluster.overlay_stats(2).unwrap().tx_packets > 0);
    cluster.teardown().unwrap();
    assert_gone(&tag);
}

#[test]
fn one_host_cluster() {
    let (tag, mut cluster) = new_cluster("one", 1);
    let a = add(&mut cluster, 0, "a", "10.32.0.1");
    let b = add(&mut cluster, 0, "b", "10.32.0.2");
    assert_ping(&a.netns, b.ip);
    drop(cluster);
    assert_gone(&tag);
}

#[test]
fn cleanup_on_panic() {
    require_root();
    let tag = fresh_tag("pan");
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut cluster = Cluster::create(ClusterSpec::new(&tag, 2)).unwrap();
        add(&mut cluster, 0, "x", "10.32.0.9");
        assert_eq!(netns_listed(&tag).len(), 3);
        panic!("deliberate panic with a cluster alive");
    }));
    assert!(result.is_err());
    assert_gone(&tag);
}

#[test]
fn two_clusters_coexist() {
    require_root();
    let (t1, t2) = (fresh_tag("co"), fresh_tag("co"));
    assert_ne!(t1, t2);
    let mut c1 = Cluster::create(ClusterSpec::new(&t1, 2)).unwrap();
    let mut c2 = Cluster::create(ClusterSpec::new(&t2, 2)).unwrap();
    // The same container names and addresses in both: they are separate worlds.
    let mut pairs = Vec::new();
    for c in [&mut c1, &mut c2] {
        pairs.push(add_a_and_b(c));
    }
    for (a, b) in &pairs {
        assert_ping(&a.netns, b.ip);
    }
    assert_ne!(pairs[0].0.netns, pairs[1].0.netns);
    let tags = topology::list_tags().unwrap();
    assert!(tags.contains(&t1) && tags.contains(&t2));
    drop(c1);
    assert_gone(&t1);
    // The second one is untouched by the first one's teardown.
    assert_eq!(netns_listed(&t2).len(), 4);
    assert_ping(&pairs[1].0.netns, pairs[1].1.ip);
    drop(c2);
    assert_gone(&t2);
}

#[test]
fn invalid_requests_refused() {
    for bad in ["", "toolong12", "Upper", "a-b", "a_b", "a.b", "é"] {
        match Cluster::create(ClusterSpec::new(bad, 2)) {
            Err(TopologyError::InvalidSpec(msg)) => assert!(msg.contains("tag"), "{msg}"),
            other => panic!("tag {bad:?} not refused: {other:?}"),
        }
        assert!(matches!(
            topology::teardown_tag(bad),
            Err(TopologyError::InvalidSpec(_))
        ));
    }
    for hosts in [0, 254] {
        assert!(matches!(
            Cluster::create(ClusterSpec::new("ok", hosts)),
            Err(TopologyError::InvalidSpec(_))
        ));
    }

    let (tag, mut cluster) = new_cluster("inv", 2);
    add(&mut cluster, 0, "a", "10.32.0.5");
    let refused = [
        cluster.add_container(2, "b", addr("10.32.0.6"), 12),
        cluster.add_container(0, "a", addr("10.32.0.6"), 12),
        cluster.add_container(1, "b", addr("10.32.0.5"), 12),
        cluster.add_container(0, "", addr("10.32.0.6"), 12),
        cluster.add_container(0, "b/c", addr("10.32.0.6"), 12),
        cluster.add_container(0, "b", addr("10.32.0.6"), 0),
        cluster.add_container(0, "b", addr("10.32.0.6"), 33),
    ];
    assert!(matches!(
        refused[0],
        Err(TopologyError::NoSuchHost { index: 2, count: 2 })
    ));
    assert!(matches!(refused[1], Err(TopologyError::Exists(_))));
    assert!(matches!(refused[2], Err(TopologyError::Exists(_))));
    for r in &refused[3..] {
        assert!(matches!(r, Err(TopologyError::InvalidSpec(_))), "{r:?}");
    }
    assert_eq!(cluster.containers().len(), 1);
    assert_eq!(netns_listed(&tag).len(), 3);
    // A tag in use is refused, and the refusal leaves the owner's cluster alone.
    assert!(matches!(
        Cluster::create(ClusterSpec::new(&tag, 2)),
        Err(TopologyError::Exists(_))
    ));
    assert_eq!(netns_listed(&tag).len(), 3);
    drop(cluster);
    assert_gone(&tag);
}

#[test]
fn persist_then_teardown_tag() {
    let (tag, mut cluster) = new_cluster("per", 2);
    let (a, b) = add_a_and_b(&mut cluster);
    let description = cluster.describe();
    let persistent = cluster.persist();
    drop(persistent);
    // Still there after every handle is gone.
    assert_eq!(netns_listed(&tag).len(), 4);
    assert!(topology::list_tags().unwrap().contains(&tag));
    assert_ping(&a.netns, b.ip);

    // The description reads back, refuses foreign names, and re-arms teardown on drop.
    let back = topology::PersistentCluster::from_description(&description).unwrap();
    assert_eq!(back.describe(), description);
    let mut forged = description.clone();
    forged["hosts"][0]["netns"] = "ff-other-h0".into();
    assert!(topology::PersistentCluster::from_description(&forged).is_err());

    assert_eq!(topology::teardown_tag(&tag).unwrap(), 4);
    assert_gone(&tag);
    assert_eq!(topology::teardown_tag(&tag).unwrap(), 0);
    // Tearing down the described cluster again is harmless.
    back.teardown().unwrap();
}

#[test]
fn teardown_half_built() {
    require_root();
    let tag = fresh_tag("half");
    // Leftovers of a run killed during creation: bare namespaces, one veth half configured.
    let h0 = topology::host_netns(&tag, 0);
    let c = topology::container_netns(&tag, "x");
    for ns in [&h0, &c] {
        assert!(ip(&["netns", "add", ns]));
    }
    assert!(ip(&[
        "-n", &c, "link", "add", "eth0", "type", "veth", "peer", "name", "vc0", "netns", &h0
    ]));
    // A leftover namespace blocks the tag.
    assert!(matches!(
        Cluster::create(ClusterSpec::new(&tag, 2)),
        Err(TopologyError::Exists(_))
    ));
    assert_eq!(netns_listed(&tag).len(), 2);
    assert_eq!(topology::teardown_tag(&tag).unwrap(), 2);
    assert_gone(&tag);
    // Now the tag is free.
    Cluster::create(ClusterSpec::new(&tag, 2))
        .unwrap()
        .teardown()
        .unwrap();
    assert_gone(&tag);
}

#[test]
fn failure_part_way_leaves_nothing() {
    require_root();
    // Make each command of `create` fail in turn (3 hosts: the switch path too); every failure
    // must tear down what was built. The loop ends when the injected fault comes too late to hit.
    let mut failures = 0;
    for n in 0..500 {
        let tag = fresh_tag("flt");
        fault::fail_command_after(n);
        let result = Cluster::create(ClusterSpec::new(&tag, 3));
        let pending = fault::clear();
        match result {
            Err(TopologyError::CommandFailed { stderr, .. }) => {
                assert_eq!(stderr, "injected fault");
                assert!(!pending);
                failures += 1;
                assert_gone(&tag);
            }
            Err(e) => panic!("unexpected error with fault at {n}: {e}"),
            Ok(cluster) => {
                // A fault in a best-effort step (the IPv6 sysctl) is absorbed.
                cluster.teardown().unwrap();
                assert_gone(&tag);
                if pending {
                    break;
                }
            }
        }
    }
    assert!(failures > 20, "only {failures} fault points");

    // The same for add_container: the cluster survives, the container leaves no trace.
    let tag = fresh_tag("flc");
    let mut cluster = Cluster::create(ClusterSpec::new(&tag, 2)).unwrap();
    let host_links = links_in(&cluster.hosts()[1].netns);
    let mut failures = 0;
    for n in 0..100 {
        fault::fail_command_after(n);
        let result = cluster.add_container(1, "v", addr("10.32.3.3"), 12);
        let pending = fault::clear();
        match result {
            Err(TopologyError::CommandFailed { .. }) => {
                failures += 1;
                assert!(cluster.containers().is_empty());
                assert_eq!(netns_listed(&tag).len(), 2, "fault at {n}");
                assert_eq!(links_in(&cluster.hosts()[1].netns), host_links);
            }
            Err(e) => panic!("unexpected error with fault at {n}: {e}"),
            Ok(_) => {
                cluster.remove_container("v").unwrap();
                if pending {
                    break;
                }
            }
        }
    }
    assert!(failures >= 5, "only {failures} fault points");
    let v = add(&mut cluster, 1, "v", "10.32.3.3");
    let w = add(&mut cluster, 0, "w", "10.32.3.4");
    assert_ping(&w.netns, v.ip);
    drop(cluster);
    assert_gone(&tag);
}

#[test]
fn teardown_kills_processes_inside() {
    let (tag, mut cluster) = new_cluster("prc", 2);
    let a = add(&mut cluster, 0, "a", "10.32.0.5");
    let mut child = cluster
        .command_in(&a.netns, "sleep")
        .arg("60")
        .spawn()
        .unwrap();
    // Wait (bounded) until the process has entered the namespace.
    let (limit, every) = (Duration::from_secs(5), Duration::from_millis(20));
    let entered = poll(limit, every, || {
        let out = Command::new("ip")
            .args(["netns", "pids", &a.netns])
            .output()
            .unwrap();
        (!out.stdout.is_empty()).then_some(())
    });
    assert!(entered.is_some(), "sleep never entered {}", a.netns);
    cluster.teardown().unwrap();
    assert_gone(&tag);
    if poll(limit, every, || child.try_wait().unwrap()).is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("process inside the container survived teardown");
    }
}
