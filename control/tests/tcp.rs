//! TCP mode end to end: two simulated hosts, Freeflow up on both with a shared registry, real
//! programs (Python's socket module, unmodified) with libfsocket.so preloaded in the containers.
//! Needs root and a built workspace (`cargo build --workspace`: the shim and the router).

mod common;

use common::{Site, SiteSpec};
use freeflow_control::topology;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

impl Site {
    /// Two hosts; containers web and cache on host 0, db and plain on host 1; Freeflow up on
    /// both; web, cache and db registered (plain is a container Freeflow does not know).
    fn new(prefix: &str) -> Site {
        common::require_root("TCP-mode");
        common::require_built(&["freeflow-router"]);
        let site = Site::create(SiteSpec {
            prefix,
            work_prefix: "ff-tcp",
            hosts: 2,
            containers: &[
                (0, "web", [10, 32, 0, 2]),
                (0, "cache", [10, 32, 0, 3]),
                (1, "db", [10, 32, 0, 4]),
                (1, "plain", [10, 32, 0, 5]),
            ],
            registered: &[("web", "blue"), ("cache", "blue"), ("db", "blue")],
            ..SiteSpec::default()
        });
        // Let both routers see each other's tables (peer connections come up on first use).
        std::thread::sleep(Duration::from_millis(300));
        site
    }

    /// python3 running `script` in a container, with the shim preloaded if `preload`.
    fn python(&self, container: &str, script: &str, preload: bool) -> Command {
        let mut cmd = self.shim_env(container, preload);
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
    // The text view shows the same counters.
    let text = site
        .in_host(0, env!("CARGO_BIN_EXE_freeflow"))
        .args(["status", "--dir"])
        .arg(&site.dirs[0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("tcp mode:"))
        .unwrap_or_else(|| panic!("no tcp line in: {text}"));
    let connects = status["router"]["tcp_connects"].as_u64().unwrap();
    assert!(
        line.contains(&format!("{connects} connect(s) on the host network")),
        "{line}"
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

    // The reverse: clients without Freeflow (a registered container without the shim on
    // another host, and a container Freeflow does not know on the same host) reaching an
    // accelerated server. They come over the overlay; the server's router hands each to the
    // application at accept, with its real address.
    let relayed_before = site.router_status(1)["router"]["tcp_relayed"]
        .as_u64()
        .unwrap_or(0);
    let server = start_server(&site, "db", 2, 6004, false, true);
    let out = run_client(
        &site,
        "web",
        "10.32.0.4",
        6004,
        1 << 16,
        "nonblocking",
        false,
    );
    assert!(out.contains("ECHO_OK"), "{out}");
    assert!(out.contains("SERVER_SAW ('10.32.0.2',"), "{out}");
    let out = run_client(
        &site,
        "plain",
        "10.32.0.4",
        6004,
        1 << 16,
        "blocking",
        false,
    );
    assert!(out.contains("ECHO_OK"), "{out}");
    assert!(out.contains("SERVER_SAW ('10.32.0.5',"), "{out}");
    wait_exit(server);
    let relayed = site.router_status(1)["router"]["tcp_relayed"]
        .as_u64()
        .unwrap_or(0)
        - relayed_before;
    assert_eq!(relayed, 2, "both clients relayed by host 1's router");
}

/// A client that keeps one connection and makes another after being told to.
const HOLDING_CLIENT: &str = r#"
import socket, sys, errno
c = socket.create_connection(("10.32.0.4", 6100), timeout=10)
c.sendall(b"a"); assert c.recv(10) == b"a"
print("CONNECTED", flush=True)
sys.stdin.readline()
c.sendall(b"b"); print("AFTER", c.recv(10), flush=True)
try:
    n = socket.create_connection(("10.32.0.4", 6100), timeout=10)
    n.sendall(b"c"); print("NEW", n.recv(10), flush=True)
except OSError as e:
    print("NEW_ERROR", e.errno, flush=True)
"#;

/// A server that echoes on every connection it accepts, each in a thread.
const THREADED_ECHO: &str = r#"
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 6100)); s.listen(8); print("LISTENING", flush=True)
def echo(c):
    while True:
        d = c.recv(100)
        if not d: break
        c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// Starts THREADED_ECHO in `db` with the shim and waits until it listens and the listener is
/// known on the other host.
fn start_echo(site: &Site) -> Child {
    use std::io::BufRead;
    let mut server = site
        .python("db", THREADED_ECHO, true)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("LISTENING"), "{line:?}");
    std::thread::sleep(Duration::from_millis(300));
    server
}

/// Freeflow stopped on the server's host: the established connection goes on (it is a host
/// socket of the two applications); a new connection fails at once with ECONNREFUSED (the
/// overlay listener lived in the router), instead of hanging.
#[test]
fn connections_outlive_the_router_and_new_ones_fail_clearly() {
    let site = Site::new("td");
    let mut server = start_echo(&site);
    use std::io::{BufRead, Write};
    let mut line = String::new();
    let mut client = site
        .python("web", HOLDING_CLIENT, true)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(client.stdout.take().unwrap());
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "CONNECTED");
    let down = site
        .in_host(1, env!("CARGO_BIN_EXE_freeflow"))
        .args(["down", "--dir"])
        .arg(&site.dirs[1])
        .output()
        .unwrap();
    assert!(down.status.success(), "{down:?}");
    // Host 0's router notices its peer went away (the peer channel closes).
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    client.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let _ = client.wait();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        rest.contains("AFTER b'b'"),
        "established connection: {rest}"
    );
    assert!(
        rest.contains(&format!("NEW_ERROR {}", libc::ECONNREFUSED)),
        "new connection: {rest}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// iperf3, unmodified, with a daemonized server (it listens, then forks and its parent exits:
/// the listener must survive the hand-over to the child).
#[test]
fn iperf3_runs_accelerated_with_a_daemonized_server() {
    let site = Site::new("ti");
    let mut server = site.shim_env("db", true);
    server.args(["iperf3", "-s", "-D", "-1", "-p", "5201"]);
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
    let before = site.vxlan_tx(0);
    let out = site
        .shim_env("web", true)
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

/// The server half of the socket-semantics battery (in `db`, with the shim). Each part listens on
/// its own port and prints `OK <part>` when its checks pass; `READY` once everything listens.
const SEMANTICS_SERVER: &str = r#"
import socket, sys, os, select, threading, ctypes, signal, errno, fcntl, time
libc = ctypes.CDLL(None, use_errno=True)
portfile = sys.argv[1]
def listener(port, reuseport=False, bind=True):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport: s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if bind: s.bind(("0.0.0.0", port))
    return s
def overlay(addr): return addr[0].startswith("10.32.")
def ok(part): print("OK", part, flush=True)

# epoll registration made before listen; accept4 with SOCK_NONBLOCK|SOCK_CLOEXEC through the C ABI.
ep = select.epoll()
s1 = listener(7101); s1.setblocking(False)
ep.register(s1.fileno(), select.EPOLLIN)
s1.listen(8)
def part_epoll_accept4():
    events = ep.poll(20)
    assert events and events[0][0] == s1.fileno(), events
    fd = libc.accept4(s1.fileno(), None, None, os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, ctypes.get_errno()
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    c = socket.socket(fileno=fd); c.setblocking(True)
    assert overlay(c.getpeername()), c.getpeername()
    # dup, dup2, F_DUPFD_CLOEXEC: every copy reports the overlay peer.
    d1 = os.dup(fd); d2 = os.dup2(fd, 200); d3 = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 300)
    for d in (d1, d2, d3):
        assert socket.socket(fileno=os.dup(d)).getpeername() == c.getpeername(), d
    c.sendall(c.recv(100))
    for d in (d1, d2, d3): os.close(d)
    c.close()
    ok("epoll_accept4_dup")

# Many concurrent clients, each paired with the right peer.
s2 = listener(7102); s2.listen(64)
def part_many():
    def serve(c, peer):
        line = c.makefile("rb").readline().decode().split()
        c.sendall(("%s %d\n" % (line[0], peer[1])).encode()); c.close()
    threads = []
    for _ in range(20):
        c, peer = s2.accept()
        assert overlay(peer), peer
        t = threading.Thread(target=serve, args=(c, peer)); t.start(); threads.append(t)
    for t in threads: t.join()
    ok("many")

# shutdown: the client half-closes; we read to EOF, then answer.
s4 = listener(7104); s4.listen(4)
def part_shutdown():
    c, _ = s4.accept()
    got = b""
    while True:
        chunk = c.recv(65536)
        if not chunk: break
        got += chunk
    c.sendall(b"got %d" % len(got)); c.shutdown(socket.SHUT_WR); c.close()
    ok("shutdown")

# SO_REUSEADDR: close the listener and listen again on the same port at once.
s5 = listener(7105); s5.listen(4)
def part_reuseaddr():
    global s5
    c, _ = s5.accept(); c.sendall(b"first"); c.close(); s5.close()
    s5 = listener(7105); s5.listen(4)
    print("RELISTENED", flush=True)
    c, peer = s5.accept(); assert overlay(peer); c.sendall(b"second"); c.close()
    ok("reuseaddr")

# Port 0: listen without bind; the kernel's port is the overlay port.
s7 = listener(0, bind=False); s7.listen(4)
port7 = s7.getsockname()[1]
assert port7 != 0
def part_port0():
    c, peer = s7.accept(); assert overlay(peer); c.sendall(b"port0"); c.close()
    ok("port0")

s8 = listener(7108); s8.listen(4)

# fork: listen in the parent, accept in two children. Children close the listeners they do not
# serve, as servers do: a listener lives while any process holds it (with or without Freeflow).
s3 = listener(7103); s3.listen(16)
def close_others(keep):
    for other in (s1, s2, s3, s4, s5, s7, s8):
        if other not in keep: other.close()
children = []
for i in range(2):
    pid = os.fork()
    if pid == 0:
        close_others([s3])
        s3.settimeout(8)
        try:
            while True:
                c, peer = s3.accept()
                assert overlay(peer), peer
                c.sendall(("%d %s\n" % (os.getpid(), peer[0])).encode()); c.close()
        except socket.timeout:
            pass
        os._exit(0)
    children.append(pid)

# SO_REUSEPORT: a second process of the container listens on the same port.
s6 = listener(7106, reuseport=True); s6.listen(8)
pid6 = os.fork()
if pid6 == 0:
    close_others([]); s6.close()
    t = listener(7106, reuseport=True); t.listen(8); t.settimeout(8)
    try:
        while True:
            c, _ = t.accept(); c.sendall(b"child"); c.close()
    except socket.timeout:
        pass
    os._exit(0)
children.append(pid6)
def part_reuseport():
    s6.settimeout(8)
    try:
        while True:
            c, _ = s6.accept(); c.sendall(b"parent"); c.close()
    except socket.timeout:
        pass

# EINTR: a blocking accept on an accelerated listener, interrupted by a signal with a handler.
def part_eintr():
    signal.signal(signal.SIGALRM, lambda *a: None)
    signal.siginterrupt(signal.SIGALRM, True)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    rc = libc.accept(s8.fileno(), None, None)
    assert rc == -1 and ctypes.get_errno() == errno.EINTR, (rc, ctypes.get_errno())
    ok("eintr")

with open(portfile + ".tmp", "w") as f: f.write(str(port7))
os.rename(portfile + ".tmp", portfile)
print("READY", flush=True)
part_eintr()
workers = [threading.Thread(target=p) for p in (part_epoll_accept4, part_many, part_shutdown, part_reuseaddr, part_port0, part_reuseport)]
for w in workers: w.start()
for w in workers: w.join()
for pid in children:
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
ok("children")
"#;

/// Stops a program started through `timeout`: SIGTERM (which `timeout` passes on to the
/// program), then SIGKILL if it is still there after two seconds.
fn stop(child: &mut Child) -> std::process::ExitStatus {
    if child.try_wait().unwrap().is_none() {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
    }
    child.wait().unwrap()
}

/// The client half (in `web`, with the shim).
const SEMANTICS_CLIENT: &str = r#"
import socket, sys, os, select, threading, errno, time
db = "10.32.0.4"; portfile = sys.argv[1]
def ok(part): print("OK", part, flush=True)
def expect_overlay(s, port):
    assert s.getpeername() == (db, port), s.getpeername()
    assert s.getsockname()[0] == "10.32.0.2", s.getsockname()

# epoll registration made before connect; non-blocking connect.
s = socket.socket(); s.setblocking(False)
ep = select.epoll(); ep.register(s.fileno(), select.EPOLLOUT)
rc = s.connect_ex((db, 7101))
assert rc in (0, errno.EINPROGRESS), rc
events = ep.poll(10)
assert events and events[0][0] == s.fileno() and events[0][1] & select.EPOLLOUT, events
assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
expect_overlay(s, 7101)
s.setblocking(True); s.sendall(b"ping"); assert s.recv(100) == b"ping"; s.close()
ok("epoll_connect")

# 20 concurrent clients from threads.
errors = []
def one(i):
    try:
        c = socket.create_connection((db, 7102), timeout=10)
        expect_overlay(c, 7102)
        c.sendall(b"%d %d\n" % (i, c.getsockname()[1]))
        idx, seen_port = c.makefile("rb").readline().decode().split()
        assert int(idx) == i and int(seen_port) == c.getsockname()[1], (i, idx, seen_port)
        c.close()
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
ok("many")

# fork-accepting server: every connection answered by a child, with our overlay address.
pids = set()
for _ in range(6):
    c = socket.create_connection((db, 7103), timeout=10)
    pid, peer = c.makefile("rb").readline().decode().split()
    assert peer == "10.32.0.2", peer
    pids.add(pid); c.close()
print("FORK_PIDS", len(pids), flush=True)
ok("fork")

# shutdown(SHUT_WR), then read the answer.
c = socket.create_connection((db, 7104), timeout=10)
c.sendall(b"x" * 1000); c.shutdown(socket.SHUT_WR)
assert c.recv(100) == b"got 1000"; assert c.recv(100) == b""; c.close()
ok("shutdown")

# Re-listened port.
c = socket.create_connection((db, 7105), timeout=10); assert c.recv(10) == b"first"; c.close()
deadline = time.time() + 10
while True:
    try:
        c = socket.create_connection((db, 7105), timeout=10); got = c.recv(10); c.close()
        if got == b"second": break
    except OSError:
        pass
    assert time.time() < deadline, "no second listener"
    time.sleep(0.05)
ok("reuseaddr")

# Port 0.
port7 = int(open(portfile).read())
c = socket.create_connection((db, port7), timeout=10); expect_overlay(c, port7)
assert c.recv(10) == b"port0"; c.close()
ok("port0")

# SO_REUSEPORT: both processes serve the port.
answers = []
for _ in range(8):
    c = socket.create_connection((db, 7106), timeout=10); answers.append(c.recv(10)); c.close()
assert all(a in (b"parent", b"child") for a in answers), answers
print("REUSEPORT", sorted(set(answers)), flush=True)
ok("reuseport")
ok("client_done")
"#;

/// Socket semantics through the shim, across two hosts: epoll registrations made before connect
/// and listen, accept4 flags, dup/dup2/F_DUPFD, many concurrent clients, fork, shutdown,
/// SO_REUSEADDR, SO_REUSEPORT, port 0, EINTR; every connection accelerated.
#[test]
fn socket_semantics_through_the_shim() {
    let site = Site::new("ts");
    let portfile = site.work.join("port0");
    // stderr to a file: a pipe would stay open in a grandchild that outlives a kill.
    let server_err = site.work.join("server.err");
    let mut server = site
        .python("db", SEMANTICS_SERVER, true)
        .arg(&portfile)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&server_err).unwrap())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let stdout = server.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let mut server_lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server_lines.iter().any(|l: &String| l == "READY") {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => server_lines.push(line),
            Err(_) => {
                stop(&mut server);
                panic!(
                    "server not ready: {server_lines:?} {}",
                    std::fs::read_to_string(&server_err).unwrap_or_default()
                );
            }
        }
    }
    let connects_before = site.router_status(0)["router"]["tcp_connects"]
        .as_u64()
        .unwrap_or(0);
    let client = site
        .python("web", SEMANTICS_CLIENT, true)
        .arg(&portfile)
        .output()
        .unwrap();
    let client_out = String::from_utf8_lossy(&client.stdout).into_owned();
    let client_err = String::from_utf8_lossy(&client.stderr).into_owned();
    // The server finishes when its accept loops time out (8 s idle).
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = stop(&mut server);
    let stderr = std::fs::read_to_string(&server_err).unwrap_or_default();
    while let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(200)) {
        server_lines.push(line);
    }
    let report = format!(
        "client:\n{client_out}{client_err}\nserver ({status}):\n{}\n{stderr}",
        server_lines.join("\n")
    );
    for part in [
        "epoll_connect",
        "many",
        "fork",
        "shutdown",
        "reuseaddr",
        "port0",
        "reuseport",
        "client_done",
    ] {
        assert!(
            client_out.contains(&format!("OK {part}\n")),
            "client part {part}: {report}"
        );
    }
    for part in [
        "eintr",
        "epoll_accept4_dup",
        "many",
        "shutdown",
        "reuseaddr",
        "port0",
        "children",
    ] {
        assert!(
            server_lines.contains(&format!("OK {part}")),
            "server part {part}: {report}"
        );
    }
    // Every connection above was set up by the router on the host network: 1 + 20 + 6 + 1 + 2
    // + 1 + 8 = 39, except that a connect made while the re-listened port was not yet known on
    // host 0 takes the overlay (and reaches the new listener there, relayed by host 1's router).
    let status = site.router_status(0);
    let connects = status["router"]["tcp_connects"].as_u64().unwrap_or(0) - connects_before;
    let fallbacks = status["router"]["tcp_fallbacks"].as_u64().unwrap_or(0);
    assert!(
        connects + fallbacks >= 39 && fallbacks <= 2,
        "accelerated connects {connects}, fallbacks {fallbacks}\n{report}"
    );
    // After the first connect to host 1, host 0's router keeps ports claimed ahead for this
    // container: the pairings above were checked with connections made on them too.
    let claimed = status["router"]["tcp_claimed"].as_u64().unwrap_or(0);
    assert!(
        claimed >= 1 && claimed <= connects,
        "connects on claimed ports: {claimed} of {connects}"
    );
}

/// A server that execs itself twice: once holding its accelerated listener (and waiting longer
/// than the router keeps a listener nobody holds), once holding the accepted connection.
const EXEC_SERVER: &str = r#"
import socket, os, sys, time
SRC = open("/proc/self/cmdline", "rb").read().split(b"\0")[2].decode()
def again(*args):
    os.execv(sys.executable, [sys.executable, "-c", SRC] + list(args))
if len(sys.argv) == 1:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7201)); s.listen(4)
    os.set_inheritable(s.fileno(), True)
    again("listener", str(s.fileno()))
elif sys.argv[1] == "listener":
    time.sleep(2.5)
    s = socket.socket(fileno=int(sys.argv[2]))
    print("READY", s.getsockname(), flush=True)
    c, peer = s.accept()
    os.set_inheritable(c.fileno(), True)
    # The connection goes to a program started with posix_spawn (not exec).
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", SRC, "conn", str(c.fileno()), peer[0]], os.environ)
    os.waitpid(pid, 0)
else:
    c = socket.socket(fileno=int(sys.argv[2]))
    print("INHERITED", c.getpeername()[0], c.getsockname()[0], sys.argv[3], flush=True)
    c.sendall(c.recv(100))
"#;

/// Accelerated sockets inherited across exec (a listener) and posix_spawn (a connection) keep
/// their overlay addresses, and an inherited listener stays registered with the router.
#[test]
fn sockets_inherited_across_exec_keep_overlay_addresses() {
    let site = Site::new("tx");
    let mut server = site
        .python("db", EXEC_SERVER, true)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("READY ('10.32.0.4', 7201)")
            || line.starts_with("READY ('0.0.0.0', 7201)"),
        "{line:?}"
    );
    let client = site
        .python(
            "web",
            r#"
import socket
c = socket.create_connection(("10.32.0.4", 7201), timeout=10)
c.sendall(b"over exec"); print("ECHO", c.recv(100), c.getpeername(), flush=True)
"#,
            true,
        )
        .output()
        .unwrap();
    let client_out = String::from_utf8_lossy(&client.stdout).into_owned();
    line.clear();
    reader.read_line(&mut line).unwrap();
    stop(&mut server);
    assert!(
        client_out.contains("ECHO b'over exec' ('10.32.0.4', 7201)"),
        "{client_out} {}",
        String::from_utf8_lossy(&client.stderr)
    );
    assert_eq!(
        line.trim(),
        "INHERITED 10.32.0.2 10.32.0.4 10.32.0.2",
        "after exec the connection reports overlay addresses"
    );
    let status = site.router_status(0);
    assert!(
        status["router"]["tcp_connects"].as_u64().unwrap_or(0) >= 1,
        "the connection was accelerated: {status}"
    );
}

/// Connects to db's echo server on 6100 until it answers (10 s at most); prints the answer.
const RETRYING_CLIENT: &str = r#"
import socket, time
deadline = time.time() + 10
while True:
    try:
        c = socket.create_connection(("10.32.0.4", 6100), timeout=5)
        c.sendall(b"again"); print("ECHO", c.recv(10), flush=True)
        # Held open a moment, for the test to see where it runs.
        time.sleep(1); break
    except OSError as e:
        if time.time() > deadline:
            print("GAVE_UP", e, flush=True); break
        time.sleep(0.05)
"#;

/// The router killed and restarted by the daemon: the server's shim hands its listener to the
/// new router, so accelerated clients and clients without Freeflow reach it again, without the
/// server doing anything.
#[test]
fn listeners_survive_a_router_restart() {
    let site = Site::new("tr");
    let mut server = start_echo(&site);
    use std::io::BufRead;
    let first = site.python("web", RETRYING_CLIENT, true).output().unwrap();
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("ECHO b'again'"),
        "{first:?}"
    );
    let restarts_before = site.router_status(1)["daemon"]["restarts"]
        .as_u64()
        .unwrap_or(0);
    let pattern = format!("freeflow-router --dir {}", site.dirs[1].display());
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", &pattern])
        .status()
        .unwrap();
    assert!(killed.success(), "router process found");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = site.router_status(1);
        if status["daemon"]["restarts"].as_u64().unwrap_or(0) > restarts_before
            && status["router"]["running"].as_bool() == Some(true)
        {
            break;
        }
        assert!(Instant::now() < deadline, "router not restarted: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let connects_before = site.router_status(0)["router"]["tcp_connects"]
        .as_u64()
        .unwrap_or(0);
    let mut accelerated = site
        .python("web", RETRYING_CLIENT, true)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut echo = String::new();
    std::io::BufReader::new(accelerated.stdout.take().unwrap())
        .read_line(&mut echo)
        .unwrap();
    // The connection that answered is a host-network connection between the two hosts.
    let on_host_link = site.host_link_connections(0);
    let _ = accelerated.wait();
    assert!(
        echo.contains("ECHO b'again'"),
        "accelerated client after the restart: {echo}"
    );
    // (Not the routers' own channel on port 7471.)
    assert!(
        on_host_link
            .lines()
            .any(|l| l.contains("192.168.1.2:") && !l.contains(":7471")),
        "the answer came over the host network: {on_host_link}"
    );
    let plain = site
        .python("plain", RETRYING_CLIENT, false)
        .output()
        .unwrap();
    let listeners = site.router_status(1)["router"]["tcp_listeners"]
        .as_u64()
        .unwrap_or(0);
    let connects = site.router_status(0)["router"]["tcp_connects"]
        .as_u64()
        .unwrap_or(0)
        - connects_before;
    stop(&mut server);
    assert!(connects >= 1, "the router set it up");
    assert!(
        String::from_utf8_lossy(&plain.stdout).contains("ECHO b'again'"),
        "client without Freeflow after the restart: {plain:?}"
    );
    assert_eq!(listeners, 1, "the new router knows the listener");
}

/// A hostile program in the registered container `db`, speaking the shim's protocol itself
/// (no shim): it tries to make the router adopt a socket it bound to the host address itself
/// (IP_FREEBIND), to block the router's control thread on an overlay listener it made blocking,
/// to make it spin on one it shut down, and sends garbage. Prints what the router answered.
const HOSTILE: &str = r#"
import socket, struct, sys, os, fcntl, time
sockpath = sys.argv[1]
def attach():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sockpath)
    s.send(b"FFHI" + struct.pack("<HH", 1, 1) + bytes(8))
    welcome = s.recv(4096)
    assert welcome[:4] == b"FFWE" or len(welcome) > 0, welcome
    return s
def request(s, op, port, fds=(), flags=0):
    msg = b"FFSQ" + struct.pack("<HHI", op, flags, 7) + bytes([0, 0, 0, 0]) + struct.pack("<H", port) + bytes(2) + struct.pack("<I", 16) + bytes(8)
    socket.send_fds(s, [msg], list(fds))
    s.settimeout(5)
    data = s.recv(64)
    return struct.unpack("<H", data[4:6])[0], struct.unpack("<i", data[12:16])[0]
def overlay_listener(port):
    o = socket.socket(); o.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    o.bind(("0.0.0.0", port)); o.listen(8); return o

s = attach()
# 1. A socket of our own, bound to the host's address, handed back as "our host listener".
fake = socket.socket()
fake.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
fake.bind(("192.168.1.2", 47999)); fake.listen(8)
o1 = overlay_listener(9001)
status, errno_ = request(s, 6, 9001, [fake.fileno(), o1.fileno()])
print("RELISTEN_FAKE", status, errno_, flush=True)

# 2. An overlay listener made blocking after the router took it, then clients.
o2 = overlay_listener(9002)
status, _ = request(s, 2, 9002, [o2.fileno()])
print("LISTEN", status, flush=True)
flags = fcntl.fcntl(o2.fileno(), fcntl.F_GETFL)
fcntl.fcntl(o2.fileno(), fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
clients = [socket.create_connection(("10.32.0.4", 9002), timeout=2) for _ in range(3)]
print("CLIENTS_CONNECTED", flush=True)

# 3. An overlay listener shut down after the router took it.
o3 = overlay_listener(9003)
status, _ = request(s, 2, 9003, [o3.fileno()])
o3.shutdown(socket.SHUT_RDWR)
print("SHUT", status, flush=True)

# 4. Garbage: the router drops this attachment, nothing else.
g = attach(); g.send(b"garbage!" * 4)
g.settimeout(5)
print("GARBAGE_ANSWER", g.recv(64), flush=True)
sys.stdin.readline()
"#;

/// The router against a hostile container: nothing it does gives it host sockets of its own
/// choosing, blocks or spins the router, or disturbs other containers.
#[test]
fn a_hostile_container_cannot_misuse_or_stall_the_router() {
    let site = Site::new("th");
    let sock = site.dirs[1].join("router.sock");
    let mut hostile = site
        .python("db", HOSTILE, false)
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, Write};
    let mut out = std::io::BufReader::new(hostile.stdout.take().unwrap());
    let mut said = Vec::new();
    while !said
        .iter()
        .any(|l: &String| l.starts_with("GARBAGE_ANSWER"))
    {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            stop(&mut hostile);
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(hostile.stderr.as_mut().unwrap(), &mut err);
            panic!("hostile program ended early: {said:?} {err}");
        }
        said.push(line.trim().to_string());
    }
    // 1: refused with EINVAL (status 2 = error).
    assert!(
        said.contains(&format!("RELISTEN_FAKE 2 {}", libc::EINVAL)),
        "{said:?}"
    );
    assert!(said.contains(&"LISTEN 0".to_string()), "{said:?}");
    assert!(said.contains(&"SHUT 0".to_string()), "{said:?}");
    assert!(
        said.iter().any(|l| l == "GARBAGE_ANSWER b''"),
        "garbage gets the attachment closed: {said:?}"
    );
    // The router still answers, at once, and does not spin.
    let router_pid = {
        let out = Command::new("pgrep")
            .args([
                "-f",
                &format!("freeflow-router --dir {}", site.dirs[1].display()),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let cpu = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{router_pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = cpu();
    let started = Instant::now();
    let status = site.router_status(1);
    assert!(
        status["router"]["running"].as_bool() == Some(true),
        "router answers: {status}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cpu() - before;
    // Clock ticks are 10 ms: a spinning router would use about 100 in this second.
    assert!(ticks < 30, "router used {ticks} ticks in a second");
    // The fake listener was not adopted: web's connect to db:9001 is not accelerated; it
    // takes the overlay (where the hostile program's own socket listens).
    let client = site
        .python(
            "web",
            r#"
import socket
try:
    socket.create_connection(("10.32.0.4", 9001), timeout=5); print("CONNECTED")
except OSError as e:
    print("ERROR", e.errno)
"#,
            true,
        )
        .output()
        .unwrap();
    let _ = hostile.stdin.as_mut().unwrap().write_all(b"\n");
    stop(&mut hostile);
    let host0 = site.router_status(0);
    assert!(!client.stdout.is_empty(), "{client:?}");
    assert_eq!(
        host0["router"]["tcp_connects"].as_u64(),
        Some(0),
        "no accelerated connection to the fake listener: {host0}"
    );
    assert_eq!(
        host0["router"]["tcp_fallbacks"].as_u64(),
        Some(1),
        "{host0}"
    );
}

/// Forks while other threads are inside the shim (epoll instances coming and going, closes,
/// accelerated connects): every child must be able to close a socket and exit.
const FORK_STRESS: &str = r#"
import os, socket, select, threading, time
stop = False
def churn():
    while not stop:
        e = select.epoll(); s = socket.socket(); e.register(s.fileno(), select.EPOLLIN); e.close(); s.close()
def connects():
    while not stop:
        try:
            c = socket.create_connection(("10.32.0.4", 6100), timeout=2); c.close()
        except OSError:
            pass
threads = [threading.Thread(target=churn), threading.Thread(target=churn), threading.Thread(target=connects)]
for t in threads: t.start()
hung = 0
for i in range(100):
    pid = os.fork()
    if pid == 0:
        s = socket.socket(); s.close(); os._exit(0)
    deadline = time.time() + 5
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done: break
        if time.time() > deadline:
            hung += 1; os.kill(pid, 9); os.waitpid(pid, 0); break
        time.sleep(0.001)
stop = True
for t in threads: t.join()
print("HUNG", hung, flush=True)
"#;

#[test]
fn forks_while_threads_use_the_shim_do_not_deadlock_children() {
    let site = Site::new("tf");
    let mut server = start_echo(&site);
    let out = site.python("web", FORK_STRESS, true).output().unwrap();
    stop(&mut server);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "HUNG 0",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two SO_REUSEPORT listeners in one process share the port (closing one leaves the other
/// serving), and dup2 over a listener closes it as close() would.
const REUSEPORT_ONE_PROCESS: &str = r#"
import socket, os
def listener(port, opt):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, opt, 1)
    s.bind(("0.0.0.0", port)); s.listen(8); return s
a = listener(7301, socket.SO_REUSEPORT)
b = listener(7301, socket.SO_REUSEPORT)
b.close()
x = listener(7302, socket.SO_REUSEADDR)
devnull = os.open("/dev/null", os.O_RDONLY)
os.dup2(devnull, x.fileno())
print("READY", flush=True)
a.settimeout(10)
c, peer = a.accept(); c.sendall(b"a"); c.close()
print("SERVED", peer[0], flush=True)
"#;

#[test]
fn reuseport_listeners_of_one_process_share_and_dup2_closes_a_listener() {
    let site = Site::new("tu");
    let mut server = site
        .python("db", REUSEPORT_ONE_PROCESS, true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY");
    std::thread::sleep(Duration::from_millis(300));
    let listeners = site.router_status(1)["router"]["tcp_listeners"].as_u64();
    let client = site
        .python(
            "web",
            r#"
import socket
c = socket.create_connection(("10.32.0.4", 7301), timeout=5)
try:
    print("GOT", c.recv(1))
except OSError as e:
    print("ERROR", e)
"#,
            true,
        )
        .output()
        .unwrap();
    line.clear();
    let _ = reader.read_line(&mut line);
    stop(&mut server);
    assert_eq!(
        String::from_utf8_lossy(&client.stdout).trim(),
        "GOT b'a'",
        "the remaining listener serves"
    );
    assert_eq!(line.trim(), "SERVED 10.32.0.2");
    assert_eq!(listeners, Some(1), "7302 is gone after dup2 over it");
}
