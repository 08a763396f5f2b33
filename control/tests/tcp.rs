//! TCP mode end to end: two simulated hosts, Freeflow up on both with a shared registry, real
//! programs (Python's socket module, unmodified) with libfsocket.so preloaded in the containers.
//! Needs root and a built workspace (`cargo build --workspace`: the shim and the router).

use freeflow_control::topology::{self, Cluster, ClusterSpec};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const VNET: &str = "10.32.0.0/12";

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_freeflow"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn shim() -> PathBuf {
    let p = target_dir().join("libfsocket.so");
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace` first",
        p.display()
    );
    p
}

struct Site {
    cluster: Option<Cluster>,
    dirs: Vec<PathBuf>,
    work: PathBuf,
}

impl Site {
    /// Two hosts; containers web and cache on host 0, db and plain on host 1; Freeflow up on
    /// both; web, cache and db registered (plain is a container Freeflow does not know).
    fn new(prefix: &str) -> Site {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "TCP-mode tests build network namespaces: run as root"
        );
        assert!(
            target_dir().join("freeflow-router").exists(),
            "build the workspace first (freeflow-router missing)"
        );
        let tag = topology::fresh_tag(prefix);
        let mut cluster = Cluster::create(ClusterSpec::new(&tag, 2)).unwrap();
        for (host, name, ip) in [
            (0, "web", [10, 32, 0, 2]),
            (0, "cache", [10, 32, 0, 3]),
            (1, "db", [10, 32, 0, 4]),
            (1, "plain", [10, 32, 0, 5]),
        ] {
            cluster
                .add_container(host, name, Ipv4Addr::from(ip), 12)
                .unwrap();
        }
        let work = std::env::temp_dir().join(format!("ff-tcp-{tag}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let mut site = Site {
            cluster: Some(cluster),
            dirs: Vec::new(),
            work: work.clone(),
        };
        for h in 0..2 {
            let dir = work.join(format!("h{h}"));
            let out = site
                .in_host(h, env!("CARGO_BIN_EXE_freeflow"))
                .args(["up", "--dir"])
                .arg(&dir)
                .args([
                    "--host-ip",
                    &format!("192.168.1.{}", h + 1),
                    "--vnet-prefix",
                    VNET,
                    "--registry",
                ])
                .arg(format!("file:{}", work.join("registry.json").display()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "freeflow up: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            site.dirs.push(dir);
        }
        for (host, name) in [(0, "web"), (0, "cache"), (1, "db")] {
            let netns = site
                .cluster()
                .containers()
                .iter()
                .find(|c| c.name == name)
                .unwrap()
                .netns_path
                .clone();
            let ip = site.container_ip(name);
            let out = site
                .in_host(host, env!("CARGO_BIN_EXE_freeflow"))
                .args(["container", "add", name, "--dir"])
                .arg(&site.dirs[host])
                .arg("--netns")
                .arg(&netns)
                .args(["--ip", &ip.to_string(), "--tenant", "blue"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "container add {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Let both routers see each other's tables (peer connections come up on first use).
        std::thread::sleep(Duration::from_millis(300));
        site
    }

    fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().unwrap()
    }

    fn container_ip(&self, name: &str) -> Ipv4Addr {
        self.cluster()
            .containers()
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .ip
    }

    fn in_host(&self, host: usize, program: &str) -> Command {
        self.cluster()
            .command_in(&self.cluster().hosts()[host].netns, program)
    }

    fn host_of(&self, container: &str) -> usize {
        self.cluster()
            .containers()
            .iter()
            .find(|c| c.name == container)
            .unwrap()
            .host
    }

    /// python3 running `script` in a container, with the shim preloaded unless `plain`.
    fn python(&self, container: &str, script: &str, preload: bool) -> Command {
        let netns = self
            .cluster()
            .containers()
            .iter()
            .find(|c| c.name == container)
            .unwrap()
            .netns
            .clone();
        let mut cmd = topology::command_in(&netns, "env");
        cmd.arg(format!(
            "FREEFLOW_DIR={}",
            self.dirs[self.host_of(container)].display()
        ));
        cmd.arg(format!("VNET_PREFIX={VNET}"));
        if preload {
            cmd.arg(format!("LD_PRELOAD={}", shim().display()));
        }
        // Every program the tests start is bounded in time.
        cmd.args(["timeout", "60", "python3", "-c", script]);
        cmd
    }

    fn host_link_connections(&self, host: usize) -> String {
        let out = self
            .in_host(host, "ss")
            .args(["-tn", "state", "established"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn vxlan_tx(&self, host: usize) -> u64 {
        topology::link_stats(&self.cluster().hosts()[host].netns, "vx0")
            .unwrap()
            .tx_packets
    }

    fn router_status(&self, host: usize) -> serde_json::Value {
        let out = self
            .in_host(host, env!("CARGO_BIN_EXE_freeflow"))
            .args(["status", "--json", "--dir"])
            .arg(&self.dirs[host])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for (h, dir) in self.dirs.iter().enumerate() {
            let _ = self
                .in_host(h, env!("CARGO_BIN_EXE_freeflow"))
                .args(["down", "--dir"])
                .arg(dir)
                .output();
        }
        drop(self.cluster.take());
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// An echo server: accepts `n` connections; for each, sends back the peer address it sees and
/// echoes everything until the client shuts down its side.
const SERVER: &str = r#"
import socket, sys
n = int(sys.argv[1]); port = int(sys.argv[2]); family = socket.AF_INET6 if sys.argv[3] == "6" else socket.AF_INET
srv = socket.socket(family, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port)); srv.listen(16)
print("LISTENING", srv.getsockname(), flush=True)
for _ in range(n):
    conn, peer = srv.accept()
    conn.sendall((repr((peer[0], peer[1], conn.getpeername()[0], conn.getsockname()[0])) + "\n").encode())
    while True:
        data = conn.recv(65536)
        if not data: break
        conn.sendall(data)
    conn.close()
"#;

/// A client: connects (blocking or not), reads the server's view of the connection, sends
/// `size` bytes and checks the echo; prints what it saw.
const CLIENT: &str = r#"
import socket, sys, select, errno
ip, port, size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
family = socket.AF_INET6 if ":" in ip else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if mode == "nonblocking":
    s.setblocking(False)
    rc = s.connect_ex((ip, port))
    print("CONNECT_EX", rc, flush=True)
    assert rc in (0, errno.EINPROGRESS), rc
    _, w, _ = select.select([], [s], [], 10)
    assert w, "connect did not complete"
    print("SO_ERROR", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), flush=True)
    s.setblocking(True)
else:
    try:
        s.connect((ip, port))
    except OSError as e:
        print("CONNECT_ERROR", e.errno, flush=True); sys.exit(0)
f = s.makefile("rb")
print("SERVER_SAW", f.readline().decode().strip(), flush=True)
print("CLIENT_SOCKNAME", s.getsockname()[0], "PEERNAME", s.getpeername()[0], s.getpeername()[1], flush=True)
payload = bytes(range(256)) * (size // 256)
# Send from a thread while reading the echo: an echo server blocks once both directions'
# buffers are full if the client only reads after sending everything.
import threading
def send():
    s.sendall(payload); s.shutdown(socket.SHUT_WR)
sender = threading.Thread(target=send); sender.start()
got = b""
while len(got) < len(payload):
    chunk = f.read(min(65536, len(payload) - len(got)))
    if not chunk: break
    got += chunk
sender.join()
print("ECHO_OK" if got == payload else "ECHO_BAD %d" % len(got), flush=True)
"#;

fn start_server(
    site: &Site,
    container: &str,
    connections: usize,
    port: u16,
    v6: bool,
    preload: bool,
) -> Child {
    let mut child = site
        .python(container, SERVER, preload)
        .args([
            connections.to_string(),
            port.to_string(),
            (if v6 { "6" } else { "4" }).to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the LISTENING line.
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let mut reader = std::io::BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("LISTENING"),
        "server did not start: {line:?}"
    );
    child.stdout = None;
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    });
    child
}

fn run_client(
    site: &Site,
    container: &str,
    ip: &str,
    port: u16,
    size: usize,
    mode: &str,
    preload: bool,
) -> String {
    let out: Output = site
        .python(container, CLIENT, preload)
        .args([ip, &port.to_string(), &size.to_string(), mode])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "client failed:\n{text}");
    text
}

fn wait_exit(mut child: Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("server did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn accelerated_connections_use_the_host_network_and_keep_overlay_addresses() {
    let site = Site::new("tc");
    // Across hosts: web (host 0) to db (host 1), blocking connect, 4 MB echoed.
    let server = start_server(&site, "db", 2, 5000, false, true);
    let vxlan_before = site.vxlan_tx(0);
    let out = run_client(&site, "web", "10.32.0.4", 5000, 4 << 20, "blocking", true);
    let vxlan_after = site.vxlan_tx(0);
    assert!(out.contains("ECHO_OK"), "{out}");
    assert!(
        out.contains("SERVER_SAW ('10.32.0.2',"),
        "the server sees the client's overlay address: {out}"
    );
    assert!(
        out.contains("'10.32.0.2', '10.32.0.4')"),
        "server's getpeername/getsockname are overlay addresses: {out}"
    );
    assert!(
        out.contains("CLIENT_SOCKNAME 10.32.0.2 PEERNAME 10.32.0.4 5000"),
        "{out}"
    );
    // 4 MB over the overlay would be thousands of VXLAN packets; the host path sends none
    // (a few ARP or neighbour packets may pass).
    assert!(
        vxlan_after - vxlan_before < 50,
        "data went through VXLAN: {} packets",
        vxlan_after - vxlan_before
    );

    // Non-blocking connect: EINPROGRESS, then writable with SO_ERROR 0, as the kernel does it.
    let out = run_client(
        &site,
        "web",
        "10.32.0.4",
        5000,
        1 << 16,
        "nonblocking",
        true,
    );
    assert!(out.contains("CONNECT_EX 115"), "{out}");
    assert!(out.contains("SO_ERROR 0"), "{out}");
    assert!(out.contains("ECHO_OK"), "{out}");
    wait_exit(server);

    // While a connection is open, `ss` in the host namespaces shows it between host addresses.
    let server = start_server(&site, "db", 1, 5001, false, true);
    let script = r#"
import socket, time
s = socket.create_connection(("10.32.0.4", 5001)); s.makefile("rb").readline()
print("UP", flush=True); time.sleep(1.5); s.close()
"#;
    let mut holder = site
        .python("web", script, true)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let ss = site.host_link_connections(0);
    assert!(
        ss.contains("192.168.1.1:") && ss.contains("192.168.1.2:"),
        "no host-network connection in host 0:\n{ss}"
    );
    let _ = holder.wait();
    wait_exit(server);

    let status = site.router_status(0);
    assert!(
        status["router"]["tcp_connects"].as_u64().unwrap_or(0) >= 3,
        "router counters: {status}"
    );
}

#[test]
fn same_host_ipv6_sockets_refusal_and_mix_and_match() {
    let site = Site::new("tm");
    // Same host: cache (host 0) serves web (host 0), the server socket is AF_INET6.
    let server = start_server(&site, "cache", 1, 6000, true, true);
    let out = run_client(
        &site,
        "web",
        "::ffff:10.32.0.3",
        6000,
        1 << 20,
        "blocking",
        true,
    );
    assert!(out.contains("ECHO_OK"), "{out}");
    assert!(
        out.contains("SERVER_SAW ('::ffff:10.32.0.2',"),
        "v4-mapped overlay peer on an AF_INET6 listener: {out}"
    );
    wait_exit(server);

    // Nothing listens: ECONNREFUSED, as without Freeflow.
    let out = run_client(&site, "web", "10.32.0.4", 6999, 16, "blocking", true);
    assert!(out.contains("CONNECT_ERROR 111"), "{out}");

    // An accelerated client and a server in a container Freeflow does not know: the overlay.
    let server = start_server(&site, "plain", 1, 6001, false, false);
    let out = run_client(&site, "web", "10.32.0.5", 6001, 1 << 16, "blocking", true);
    assert!(out.contains("ECHO_OK"), "{out}");
    assert!(out.contains("SERVER_SAW ('10.32.0.2',"), "{out}");
    wait_exit(server);

    // A registered container's server without the shim: the accelerated client falls back.
    let server = start_server(&site, "db", 1, 6002, false, false);
    let out = run_client(&site, "web", "10.32.0.4", 6002, 1 << 16, "blocking", true);
    assert!(out.contains("ECHO_OK"), "{out}");
    wait_exit(server);

    // A client without the shim reaching a plain server: untouched.
    let server = start_server(&site, "plain", 1, 6003, false, false);
    let out = run_client(&site, "web", "10.32.0.5", 6003, 1 << 16, "blocking", false);
    assert!(out.contains("ECHO_OK"), "{out}");
    wait_exit(server);
}

/// iperf3, unmodified, with a daemonized server (it listens, then forks and its parent exits:
/// the listener must survive the hand-over to the child).
#[test]
fn iperf3_runs_accelerated_with_a_daemonized_server() {
    let site = Site::new("ti");
    let db = site
        .cluster()
        .containers()
        .iter()
        .find(|c| c.name == "db")
        .unwrap()
        .netns
        .clone();
    let mut server = topology::command_in(&db, "env");
    server
        .arg(format!("FREEFLOW_DIR={}", site.dirs[1].display()))
        .arg(format!("VNET_PREFIX={VNET}"))
        .arg(format!("LD_PRELOAD={}", shim().display()))
        .args(["iperf3", "-s", "-D", "-1", "-p", "5201"]);
    let out = server
        .output()
        .expect("iperf3 is installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "iperf3 -s -D: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Longer than the router's grace for a listener whose owner left: the child must have
    // claimed it.
    std::thread::sleep(Duration::from_millis(2500));
    let web = site
        .cluster()
        .containers()
        .iter()
        .find(|c| c.name == "web")
        .unwrap()
        .netns
        .clone();
    let before = site.vxlan_tx(0);
    let out = topology::command_in(&web, "env")
        .arg(format!("FREEFLOW_DIR={}", site.dirs[0].display()))
        .arg(format!("VNET_PREFIX={VNET}"))
        .arg(format!("LD_PRELOAD={}", shim().display()))
        .args([
            "timeout",
            "30",
            "iperf3",
            "-c",
            "10.32.0.4",
            "-p",
            "5201",
            "-t",
            "1",
            "-J",
        ])
        .output()
        .unwrap();
    let after = site.vxlan_tx(0);
    assert!(
        out.status.success(),
        "iperf3 -c: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    println!(
        "iperf3 through Freeflow: {:.1} Gbit/s, {} VXLAN packets",
        bps / 1e9,
        after - before
    );
    assert!(bps > 0.0, "{report}");
    assert!(
        after - before < 50,
        "iperf3 data went through VXLAN: {} packets",
        after - before
    );
    assert_eq!(
        report["start"]["connected"][0]["remote_host"].as_str(),
        Some("10.32.0.4")
    );
}
