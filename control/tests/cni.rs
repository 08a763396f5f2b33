//! The CNI plugin end to end: a real daemon and router (`freeflow up`) in a simulated host's
//! network namespace, and containers made by a CNI chain of Debian's reference plugins (bridge
//! with host-local IPAM, from containernetworking-plugins in /usr/lib/cni) followed by
//! `freeflow-cni`, driven by a small chain runner written here (cnitool is not packaged) the
//! way the CNI specification says a runtime drives a configuration list: ADD in order with each
//! plugin's result as the next one's prevResult, CHECK and DEL with the chain's result, DEL in
//! reverse order. A TCP connect through the shim between two containers of the chain is
//! accelerated (the router counts it for the client's tenant). Needs root, a built workspace
//! (`cargo build --workspace`: router and shim), python3 and containernetworking-plugins
//! (scripts/test.sh installs them); without them the test fails saying so.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use freeflow_control::os;
use freeflow_testbed::test_support::{self, describe, run_within, succeed_within, VNET};
use freeflow_testbed::{self as topology, names, Cluster, ClusterSpec};
use serde_json::{json, Value};

/// The binaries under test.
const FREEFLOW: &str = env!("CARGO_BIN_EXE_freeflow");
const FREEFLOW_CNI: &str = env!("CARGO_BIN_EXE_freeflow-cni");
/// Where Debian's containernetworking-plugins puts bridge and host-local.
const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";
/// The bridge's subnet: inside the daemon's overlay prefix (VNET, 10.32.0.0/12).
const SUBNET: &str = "10.33.0.0/24";
/// Debian's python (a python earlier on the PATH may be another build).
const PYTHON: &str = "/usr/bin/python3";
/// Every wait on a process is bounded by this.
const PROCESS_LIMIT: Duration = Duration::from_secs(30);
/// Echo server: one connection, prints the peer's address.
const SERVER: &str = "import socket\n\
    srv = socket.socket()\n\
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
    srv.bind(('0.0.0.0', 7000))\n\
    srv.listen(4)\n\
    srv.settimeout(20)\n\
    print('LISTENING', flush=True)\n\
    conn, peer = srv.accept()\n\
    conn.settimeout(20)\n\
    conn.sendall(b'echo:' + conn.recv(100))\n\
    print('PEER', peer[0], flush=True)\n";
/// Client of SERVER at argv[1].
const CLIENT: &str = "import socket, sys\n\
    s = socket.create_connection((sys.argv[1], 7000), timeout=20)\n\
    s.sendall(b'hello')\n\
    print(s.recv(100).decode(), flush=True)\n";

/// Stops the daemon and router of `dir` when dropped, also when the test fails.
struct Up<'a> {
    netns: &'a str,
    dir: &'a str,
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        let _ = run(topology::command_in(self.netns, FREEFLOW).args(["down", "--dir", self.dir]));
    }
}

/// A network namespace made with `ip netns add`, deleted when dropped.
struct Netns(String);

impl Netns {
    fn create(name: String) -> Netns {
        succeed(Command::new("ip").args(["netns", "add", &name]));
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        names::netns_path(&self.0)
    }

    fn delete(&self) {
        succeed(Command::new("ip").args(["netns", "del", &self.0]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.path().exists() {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
}

/// Runs `cmd` (stdin closed) within PROCESS_LIMIT, else kills it and fails.
fn run(cmd: &mut Command) -> Output {
    run_within(cmd, b"", PROCESS_LIMIT)
}

fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    run_within(cmd, input, PROCESS_LIMIT)
}

#[track_caller]
fn succeed(cmd: &mut Command) -> String {
    succeed_within(cmd, PROCESS_LIMIT)
}

/// One attachment, as a runtime describes it in the environment.
#[derive(Clone)]
struct Attachment {
    container_id: String,
    netns: PathBuf,
    args: String,
}

/// A CNI configuration list and what a runtime needs to run it, inside the host namespace.
struct Chain {
    host: String,
    list: Value,
    /// Where `freeflow up --cni-bin-dir` installed freeflow-cni.
    cni_bin_dir: PathBuf,
}

impl Chain {
    /// Runs plugin `conf` (one entry of the list) for `command`, with `prev` as prevResult.
    fn invoke(
        &self,
        conf: &Value,
        command: &str,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Output {
        let mut conf = conf.clone();
        let fields = conf.as_object_mut().expect("plugin entry is an object");
        fields.insert("cniVersion".into(), self.list["cniVersion"].clone());
        fields.insert("name".into(), self.list["name"].clone());
        if let Some(prev) = prev {
            fields.insert("prevResult".into(), prev.clone());
        }
        let plugin_type = conf["type"].as_str().expect("plugin type").to_owned();
        run_with_input(
            topology::command_in(&self.host, &self.plugin_path(&plugin_type))
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", &att.container_id)
                .env("CNI_NETNS", &att.netns)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_ARGS", &att.args)
                .env("CNI_PATH", self.cni_path()),
            conf.to_string().as_bytes(),
        )
    }

    fn plugins(&self) -> &[Value] {
        self.list["plugins"].as_array().expect("plugins")
    }

    /// ADD through the whole chain; the last plugin's result (and each plugin's, in order).
    fn add(&self, att: &Attachment) -> Vec<Value> {
        let mut results: Vec<Value> = Vec::new();
        for conf in self.plugins() {
            let out = self.invoke(conf, "ADD", att, results.last());
            assert!(out.status.success(), "ADD {conf}: {}", describe(&out));
            results.push(serde_json::from_slice(&out.stdout).expect("ADD prints a result"));
        }
        results
    }

    /// CHECK (in order) or DEL (in reverse order) with the chain's result; each plugin's output.
    fn each(&self, command: &str, att: &Attachment, result: &Value) -> Vec<Output> {
        let mut plugins: Vec<&Value> = self.plugins().iter().collect();
        if command == "DEL" {
            plugins.reverse();
        }
        plugins
            .into_iter()
            .map(|conf| self.invoke(conf, command, att, Some(result)))
            .collect()
    }

    /// A plugin's executable: freeflow-cni as installed, the others Debian's.
    fn plugin_path(&self, plugin_type: &str) -> String {
        if plugin_type == "freeflow-cni" {
            self.cni_bin_dir.join("freeflow-cni").display().to_string()
        } else {
            format!("{CNI_PLUGIN_DIR}/{plugin_type}")
        }
    }

    fn cni_path(&self) -> String {
        format!("{CNI_PLUGIN_DIR}:{}", self.cni_bin_dir.display())
    }

    /// The freeflow-cni entry of the list.
    fn freeflow(&self) -> &Value {
        &self.plugins()[1]
    }
}

/// `listed` without the container of address `ip`.
fn without_ip(listed: &[Value], ip: &str) -> Vec<Value> {
    listed.iter().filter(|c| c["ip"] != ip).cloned().collect()
}

/// `freeflow container ls --json`'s containers.
fn containers(host: &str, dir: &str) -> Vec<Value> {
    let out = succeed(topology::command_in(host, FREEFLOW).args([
        "container",
        "ls",
        "--json",
        "--dir",
        dir,
    ]));
    let ls: Value = serde_json::from_str(&out).expect("ls --json");
    ls["containers"].as_array().cloned().unwrap_or_default()
}

fn router_status(host: &str, dir: &str) -> Value {
    let out = run(topology::command_in(host, FREEFLOW).args(["status", "--json", "--dir", dir]));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The IPv4 address of a chain result (its first `ips` entry), without the prefix length.
fn result_ip(result: &Value) -> String {
    let address = result["ips"][0]["address"].as_str().expect("an address");
    address.split('/').next().unwrap().to_owned()
}

/// Starts `python3 -c script args` in `netns` with the socket shim preloaded.
fn python_with_shim(netns: &str, dir: &str, script: &str, args: &[&str]) -> Command {
    let shim = Path::new(FREEFLOW).with_file_name("libfsocket.so");
    let mut cmd = topology::command_in(netns, "env");
    cmd.arg(format!("FREEFLOW_DIR={dir}"))
        .arg(format!("VNET_PREFIX={VNET}"))
        .arg(format!("LD_PRELOAD={}", shim.display()))
        .args([PYTHON, "-c", script])
        .args(args);
    cmd
}

/// The lines `child` prints, on a channel (so that reading can be bounded).
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

#[test]
fn a_chain_of_bridge_and_freeflow_cni_registers_accelerates_and_unregisters() {
    topology::ensure_root().expect("the CNI test must run as root");
    for plugin in ["bridge", "host-local"] {
        assert!(
            Path::new(CNI_PLUGIN_DIR).join(plugin).is_file(),
            "{CNI_PLUGIN_DIR}/{plugin} missing: apt-get install containernetworking-plugins \
             (scripts/test.sh does)"
        );
    }
    let router = Path::new(FREEFLOW).with_file_name("freeflow-router");
    assert!(router.is_file(), "build the workspace first ({router:?})");
    let tag = topology::fresh_tag("cni");
    let cluster =
        Cluster::create(ClusterSpec::new(tag.clone(), 1)).expect("build the simulated cluster");
    let host = cluster.hosts()[0].netns.clone();
    let tmp = tempfile::Builder::new()
        .prefix("ff-cni-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("freeflow").to_str().unwrap().to_owned();
    let registry = format!("file:{}/registry.json", tmp.path().display());
    let cni_bin_dir = tmp.path().join("opt-cni-bin");
    succeed(topology::command_in(&host, FREEFLOW).args([
        "up",
        "--dir",
        &dir,
        "--host-ip-prefix",
        "192.168.1.0/24",
        "--vnet-prefix",
        VNET,
        "--registry",
        &registry,
        "--cni-bin-dir",
        cni_bin_dir.to_str().unwrap(),
    ]));
    let _up = Up {
        netns: &host,
        dir: &dir,
    };
    let installed = cni_bin_dir.join("freeflow-cni");
    assert_eq!(
        std::fs::read(&installed).ok(),
        std::fs::read(FREEFLOW_CNI).ok(),
        "up --cni-bin-dir installs the plugin"
    );
    let chain = Chain {
        cni_bin_dir,
        host: host.clone(),
        list: json!({
            "cniVersion": "1.0.0",
            "name": "ffnet",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "ffcni0",
                    "isGateway": true,
                    "ipam": {
                        "type": "host-local",
                        "subnet": SUBNET,
                        "dataDir": tmp.path().join("ipam"),
                    },
                },
                {"type": "freeflow-cni", "tenant": "blue", "freeflowDir": dir},
            ],
        }),
    };
    let ns_a = Netns::create(names::container_netns(&tag, "a"));
    let ns_b = Netns::create(names::container_netns(&tag, "b"));
    let ns_c = Netns::create(names::container_netns(&tag, "c"));
    // A short ID (registered as cni-ID.eth0) with no CNI_ARGS: tenant "blue" from the config;
    // a Kubernetes-like 64-character ID with the pod's namespace "blue" in CNI_ARGS; and c,
    // whose pod namespace "shop" wins over the config's "blue".
    let a = Attachment {
        container_id: format!("{tag}-a"),
        netns: ns_a.path(),
        args: String::new(),
    };
    let b = Attachment {
        container_id: "0123456789abcdef".repeat(4),
        netns: ns_b.path(),
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=blue;K8S_POD_NAME=db-0".to_owned(),
    };
    let c = Attachment {
        container_id: format!("{tag}-c"),
        netns: ns_c.path(),
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0".to_owned(),
    };
    let results_a = chain.add(&a);
    let results_b = chain.add(&b);
    let results_c = chain.add(&c);
    for results in [&results_a, &results_b, &results_c] {
        assert_eq!(
            results[1], results[0],
            "freeflow-cni passes prevResult through"
        );
    }
    let ip_of = |results: &[Value]| result_ip(&results[1]);
    let (ip_a, ip_b, ip_c) = (ip_of(&results_a), ip_of(&results_b), ip_of(&results_c));
    assert!(ip_a.starts_with("10.33.0.") && ip_b.starts_with("10.33.0."));

    let listed = containers(&host, &dir);
    let entry = |ip: &str| {
        listed
            .iter()
            .find(|c| c["ip"] == ip)
            .unwrap_or_else(|| panic!("{ip} is not registered: {listed:?}"))
            .clone()
    };
    let (entry_a, entry_b, entry_c) = (entry(&ip_a), entry(&ip_b), entry(&ip_c));
    assert_eq!(entry_a["name"], format!("cni-{tag}-a.eth0"), "{entry_a}");
    assert_eq!(entry_a["tenant"], "blue", "{entry_a}");
    assert_eq!(entry_a["netns"], ns_a.path().to_str().unwrap(), "{entry_a}");
    assert_eq!(entry_a["this_host"], true, "{entry_a}");
    assert_eq!(entry_b["tenant"], "blue", "{entry_b}");
    assert_eq!(entry_c["tenant"], "shop", "{entry_c}");
    let name_b = entry_b["name"].as_str().unwrap().to_owned();
    // Too long for cni-ID.eth0: the ID's first 30 characters and a hash of ID and interface.
    assert!(
        name_b.starts_with(&format!("cni-{}-", &b.container_id[..30])),
        "{name_b}"
    );
    for out in chain.each("DEL", &c, &results_c[1]) {
        assert!(out.status.success(), "DEL c: {}", describe(&out));
    }

    // CHECK passes through the whole chain for a registered container; freeflow-cni's fails
    // when the tenant CNI_ARGS now names differs from the registered one.
    for out in chain.each("CHECK", &a, &results_a[1]) {
        assert!(out.status.success(), "CHECK: {}", describe(&out));
    }
    let moved = Attachment {
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop".to_owned(),
        ..a.clone()
    };
    let out = chain.invoke(chain.freeflow(), "CHECK", &moved, Some(&results_a[1]));
    let error = cni_error(&out);
    assert_eq!(error["code"], 104, "{}", describe(&out));
    assert!(
        error["details"].as_str().unwrap().contains("tenant"),
        "{error}"
    );
    // A repeated ADD (a runtime's retry) succeeds and changes nothing.
    let out = chain.invoke(chain.freeflow(), "ADD", &a, Some(&results_a[0]));
    assert!(out.status.success(), "repeated ADD: {}", describe(&out));
    assert_eq!(containers(&host, &dir), without_ip(&listed, &ip_c));

    accelerated_connect(&host, &dir, &ns_a.0, &ns_b.0, &ip_a, &ip_b);

    // DEL (freeflow-cni, then bridge) unregisters a; a second DEL succeeds too.
    for round in ["DEL", "repeated DEL"] {
        for out in chain.each("DEL", &a, &results_a[1]) {
            assert!(out.status.success(), "{round}: {}", describe(&out));
        }
        assert!(
            containers(&host, &dir)
                .iter()
                .all(|c| c["ip"] != ip_a.as_str()),
            "{round} left {ip_a} registered"
        );
    }
    // CHECK now fails: a is no longer registered.
    let out = chain.invoke(chain.freeflow(), "CHECK", &a, Some(&results_a[1]));
    assert!(!out.status.success(), "CHECK after DEL: {}", describe(&out));
    assert_eq!(cni_error(&out)["code"], 104, "{}", describe(&out));

    // DEL after the container's namespace is gone still unregisters b.
    ns_b.delete();
    let out = chain.invoke(chain.freeflow(), "DEL", &b, Some(&results_b[1]));
    assert!(
        out.status.success(),
        "DEL without netns: {}",
        describe(&out)
    );
    assert!(
        containers(&host, &dir).is_empty(),
        "{:?}",
        containers(&host, &dir)
    );
    let _ = chain.invoke(&chain.plugins()[0], "DEL", &b, Some(&results_b[1]));

    refusals(&chain, &a, &dir);
}

/// A TCP connect through the shim from a to b's server: it works, the server sees a's overlay
/// address, and the router counted it as a host-network connect for a's tenant (blue).
fn accelerated_connect(host: &str, dir: &str, ns_a: &str, ns_b: &str, ip_a: &str, ip_b: &str) {
    let connects_before = router_status(host, dir)["router"]["tcp_connects"]
        .as_u64()
        .unwrap_or(0);
    let mut server = python_with_shim(ns_b, dir, SERVER, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server");
    let server_pid = server.id() as i32;
    let lines = lines_of(&mut server);
    let first = lines.recv_timeout(PROCESS_LIMIT);
    if first.as_deref() != Ok("LISTENING") {
        let _ = os::send_signal(server_pid, libc::SIGKILL);
        panic!("the server did not start: {first:?}");
    }
    // The router knows the listener (the shim registers it as it listens).
    let listening = test_support::poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let st = router_status(host, dir);
        (st["router"]["tcp_listeners"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    assert!(listening.is_some(), "{}", router_status(host, dir));
    let out = run(&mut python_with_shim(ns_a, dir, CLIENT, &[ip_b]));
    let peer = lines.recv_timeout(PROCESS_LIMIT);
    let _ = os::send_signal(server_pid, libc::SIGKILL);
    let _ = server.wait();
    assert!(out.status.success(), "client: {}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "echo:hello");
    assert_eq!(
        peer,
        Ok(format!("PEER {ip_a}")),
        "the server sees a's overlay address"
    );
    let status = router_status(host, dir);
    let router = &status["router"];
    assert!(
        router["tcp_connects"].as_u64().unwrap_or(0) > connects_before,
        "the connect was not accelerated: {status}"
    );
    assert_eq!(router["tcp_fallbacks"], 0, "{status}");
    let blue = router["tcp_by_tenant"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tenant"] == "blue"))
        .unwrap_or_else(|| panic!("no TCP counters for tenant blue: {status}"));
    assert!(blue["connects"].as_u64().unwrap_or(0) >= 1, "{status}");
}

/// The CNI error object a failed plugin printed on stdout.
#[track_caller]
fn cni_error(out: &Output) -> Value {
    let error: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no CNI error object ({e}): {}", describe(out)));
    assert!(
        error["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{error}"
    );
    assert!(error["cniVersion"].is_string(), "{error}");
    error
}

/// VERSION, and the errors: malformed stdin, an address outside the overlay prefix, Freeflow
/// not set up, no prevResult.
fn refusals(chain: &Chain, a: &Attachment, dir: &str) {
    let version = |stdin: &str| {
        run_with_input(
            Command::new(chain.plugin_path("freeflow-cni")).env("CNI_COMMAND", "VERSION"),
            stdin.as_bytes(),
        )
    };
    let out = version(r#"{"cniVersion":"1.0.0"}"#);
    assert!(out.status.success(), "{}", describe(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("VERSION prints JSON");
    assert_eq!(answer["cniVersion"], "1.0.0", "{answer}");
    let supported = answer["supportedVersions"].as_array().expect("a list");
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(supported.iter().any(|s| s == v), "{v} missing: {answer}");
    }

    let out = run_with_input(
        topology::command_in(&chain.host, &chain.plugin_path("freeflow-cni"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "x")
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", chain.cni_path()),
        b"{\"cniVersion\": \"1.0.0\", \"name\": ",
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert_eq!(cni_error(&out)["code"], 6, "{}", describe(&out));

    let outside = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": a.netns}],
        "ips": [{"address": "10.99.0.5/24", "interface": 0}],
    });
    let out = chain.invoke(chain.freeflow(), "ADD", a, Some(&outside));
    assert!(!out.status.success(), "{}", describe(&out));
    let error = cni_error(&out);
    assert_eq!(error["code"], 101, "{error}");
    assert!(
        error["details"].as_str().unwrap().contains("10.99.0.5")
            && error["details"].as_str().unwrap().contains(VNET),
        "{error}"
    );

    let inside = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.33.0.77/24"}]});
    let mut not_set_up = chain.freeflow().clone();
    not_set_up["freeflowDir"] = json!(format!("{dir}-never-up"));
    let out = chain.invoke(&not_set_up, "ADD", a, Some(&inside));
    assert_eq!(cni_error(&out)["code"], 100, "{}", describe(&out));
    // DEL must succeed there all the same.
    let out = chain.invoke(&not_set_up, "DEL", a, None);
    assert!(out.status.success(), "{}", describe(&out));

    let out = chain.invoke(chain.freeflow(), "ADD", a, None);
    assert_eq!(cni_error(&out)["code"], 7, "{}", describe(&out));

    // STATUS and GC (CNI 1.1): STATUS is unavailable (50) only where Freeflow is not set up.
    let v11 = |conf: &Value| {
        let mut list = chain.list.clone();
        list["cniVersion"] = json!("1.1.0");
        Chain {
            host: chain.host.clone(),
            list,
            cni_bin_dir: chain.cni_bin_dir.clone(),
        }
        .invoke(conf, "STATUS", a, None)
    };
    let out = v11(chain.freeflow());
    assert!(out.status.success(), "STATUS: {}", describe(&out));
    assert_eq!(cni_error(&v11(&not_set_up))["code"], 50);
    let out = chain.invoke(chain.freeflow(), "STATUS", a, None);
    assert_eq!(
        cni_error(&out)["code"],
        1,
        "STATUS needs 1.1.0: {}",
        describe(&out)
    );
}
