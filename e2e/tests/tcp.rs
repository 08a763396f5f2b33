//! TCP mode end to end: two simulated hosts, Freeflow up on both with a shared registry, real
//! programs (Python's socket module, unmodified) with libfsocket.so preloaded in the containers.
//! Needs root and a built workspace (`cargo build --workspace`: the shim and the router).

mod common;

use common::{poll, spawn_reading_first_line, terminate, Site, SiteSpec};
use freeflow_testbed as topology;
use std::io::{BufRead, Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

impl Site {
    /// Two hosts; containers web and cache on host 0, db and plain on host 1; Freeflow up on
    /// both; web, cache and db registered (plain is a container Freeflow does not know).
    fn new(prefix: &str) -> Site {
        Site::create_tcp(SiteSpec {
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
        })
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
const SERVER: &str = include_str!("programs/tcp_echo_server.py");

/// A client: connects (blocking or not), reads the server's view of the connection, sends
/// `size` bytes and checks the echo; prints what it saw.
const CLIENT: &str = include_str!("programs/tcp_echo_client.py");

fn start_server(
    site: &Site,
    container: &str,
    connections: usize,
    port: u16,
    v6: bool,
    preload: bool,
) -> Child {
    // Wait for the LISTENING line.
    let (child, mut reader, line) = spawn_reading_first_line(
        site.python(container, SERVER, preload)
            .args([
                connections.to_string(),
                port.to_string(),
                (if v6 { "6" } else { "4" }).to_string(),
            ])
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
    let exited = poll(Duration::from_secs(20), Duration::from_millis(20), || {
        child.try_wait().unwrap()
    });
    if exited.is_none() {
        let _ = child.kill();
        panic!("server did not finish");
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
    let script = include_str!("programs/tcp_hold_one_connection.py");
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
        .in_host(0, &common::FREEFLOW)
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
    // accelerated server. They come over the overlay; the server's accept gets each, with
    // its real address.
    let relayed_before = site.router_counter(1, "tcp_relayed");
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
    // The server waits in a blocking accept, which waits on its overlay listener too and
    // takes each plain client itself; host 1's router rings a doorbell only for a client left
    // waiting past its grace (a loaded machine): never more than one each.
    let relayed = site.router_counter(1, "tcp_relayed") - relayed_before;
    assert!(relayed <= 2, "{relayed} doorbells answered for two clients");
}

/// A client that keeps one connection and makes another after being told to.
const HOLDING_CLIENT: &str = include_str!("programs/tcp_holding_client.py");

/// A server that echoes on every connection it accepts, each in a thread.
const THREADED_ECHO: &str = include_str!("programs/tcp_threaded_echo.py");

/// Starts THREADED_ECHO in `db` with the shim and waits until it listens and the listener is
/// known on the other host.
fn start_echo(site: &Site) -> Child {
    let (server, _, line) =
        spawn_reading_first_line(site.python("db", THREADED_ECHO, true).stderr(Stdio::null()));
    assert!(line.starts_with("LISTENING"), "{line:?}");
    site.wait_listener_known(0, "10.32.0.4", 6100);
    server
}

/// A client without the shim: connects to 10.32.0.4:6100 over the overlay, sends a byte and
/// prints what it reads back, or `NEW_ERROR errno`.
const PLAIN_CONNECT: &str = r#"
import socket
try:
    n = socket.create_connection(("10.32.0.4", 6100), timeout=10)
    n.sendall(b"c"); print("NEW", n.recv(10), flush=True)
except OSError as e:
    print("NEW_ERROR", e.errno, flush=True)
"#;

/// Freeflow stopped on the server's host: the established connection goes on (it is a host
/// socket of the two applications); a new connection fails at once with ECONNREFUSED, instead
/// of hanging: from a client with the shim (its router falls back to the overlay) and from one
/// without. Nothing serves the overlay listener then (the server's shim, which kept it for
/// clients without Freeflow, stops it listening when its router goes).
#[test]
fn connections_outlive_the_router_and_new_ones_fail_clearly() {
    let site = Site::new("td");
    let mut server = start_echo(&site);
    let (mut client, mut out, line) = spawn_reading_first_line(
        site.python("web", HOLDING_CLIENT, true)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    assert_eq!(line.trim(), "CONNECTED");
    let down = site
        .in_host(1, &common::FREEFLOW)
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
    out.read_to_string(&mut rest).unwrap();
    let _ = client.wait();
    let plain = site.python("web", PLAIN_CONNECT, false).output().unwrap();
    let plain = String::from_utf8_lossy(&plain.stdout).into_owned();
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
        plain.contains(&format!("NEW_ERROR {}", libc::ECONNREFUSED)),
        "new connection without the shim: {plain}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// Closes every fd from 3 up (one by one, then with close_range), and dup2()s a file onto every
/// number, between accelerated connections.
const CLOSES_EVERYTHING: &str = include_str!("programs/tcp_closes_everything.py");

/// A program that closes or replaces descriptors it did not open (daemons close every fd from 3
/// up; servers call closefrom or close_range; dup2 onto any number) keeps its acceleration:
/// the shim's router connection survives (close says EBADF, a dup2 onto it moves it away), so
/// no connection falls back, no request of the shim lands in a file the program opened, and
/// nothing aborts.
#[test]
fn the_shims_router_connection_survives_a_program_closing_every_descriptor() {
    let site = Site::new("tx");
    let mut server = start_echo(&site);
    let scratch = site.work.join("scratch");
    let connects_before = site.router_counter(0, "tcp_connects");
    let fallbacks_before = site.router_counter(0, "tcp_fallbacks");
    let out = site
        .python("web", CLOSES_EVERYTHING, true)
        .args(["10.32.0.4", "6100"])
        .arg(&scratch)
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "program failed: {text}");
    for step in [
        "first",
        "close_each",
        "closerange",
        "dup2_everywhere",
        "last",
    ] {
        assert!(text.contains(&format!("OK {step}\n")), "{step}: {text}");
    }
    assert!(
        text.contains("SCRATCH 0\n"),
        "the shim wrote into a file: {text}"
    );
    let connects = site.router_counter(0, "tcp_connects") - connects_before;
    let fallbacks = site.router_counter(0, "tcp_fallbacks") - fallbacks_before;
    assert_eq!((connects, fallbacks), (5, 0), "{text}");
}

/// A daemon that listens on 6200, forks, and whose parent exits; the child holds the listener
/// and never accepts (a server still starting). Prints the child's pid.
const IDLE_DAEMON: &str = r#"
import os, socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 6200)); s.listen(16)
pid = os.fork()
if pid:
    print("CHILD", pid, flush=True)
    os._exit(0)
os.close(1)
time.sleep(30)
"#;

/// A client without the shim: connects to 10.32.0.4:6200 and says whether the connect
/// succeeded (`CONNECTED`) or its errno (`ERROR n`).
const PLAIN_CONNECT_ONLY: &str = r#"
import socket
try:
    socket.create_connection(("10.32.0.4", 6200), timeout=5).close(); print("CONNECTED", flush=True)
except OSError as e:
    print("ERROR", e.errno, flush=True)
"#;

/// Freeflow stopped under a daemon whose only process holding the listener never accepted (the
/// parent that listened exited): the overlay listener the child inherited from the shim stops
/// listening too, so clients without Freeflow are refused instead of being accepted by the
/// kernel and left waiting. The child's watcher starts at fork, not at its first accept.
#[test]
fn a_daemon_that_never_accepted_refuses_plain_clients_once_the_router_stops() {
    let site = Site::new("tw");
    let (mut parent, _, line) =
        spawn_reading_first_line(site.python("db", IDLE_DAEMON, true).stderr(Stdio::null()));
    let _ = parent.wait();
    let child: i32 = line
        .trim()
        .strip_prefix("CHILD ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line:?}"));
    let connect = || {
        let out = site
            .python("web", PLAIN_CONNECT_ONLY, false)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // Before: the kernel takes the client on the overlay listener (the child never accepts).
    let before = connect();
    let down = site
        .in_host(1, &common::FREEFLOW)
        .args(["down", "--dir"])
        .arg(&site.dirs[1])
        .output()
        .unwrap();
    let refused = format!("ERROR {}", libc::ECONNREFUSED);
    let mut after = Vec::new();
    let got = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let said = connect();
        after.push(said.clone());
        (said == refused).then_some(())
    });
    let _ = freeflow_os::signals::send_signal(child, libc::SIGKILL);
    assert!(down.status.success(), "{down:?}");
    assert_eq!(before, "CONNECTED", "the overlay listener listened");
    assert!(got.is_some(), "after the router stopped: {after:?}");
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
    common::assert_success(&out, "iperf3 -s -D");
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
const SEMANTICS_SERVER: &str = include_str!("programs/tcp_semantics_server.py");

/// Stops a program started through `timeout`: SIGTERM (which `timeout` passes on to the
/// program), then SIGKILL if it is still there after two seconds.
fn stop(child: &mut Child) -> std::process::ExitStatus {
    if !terminate(child, Duration::from_secs(2)) {
        let _ = child.kill();
    }
    child.wait().unwrap()
}

/// The client half (in `web`, with the shim).
const SEMANTICS_CLIENT: &str = include_str!("programs/tcp_semantics_client.py");

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
    let connects_before = site.router_counter(0, "tcp_connects");
    let client = site
        .python("web", SEMANTICS_CLIENT, true)
        .arg(&portfile)
        .output()
        .unwrap();
    let client_out = String::from_utf8_lossy(&client.stdout).into_owned();
    let client_err = String::from_utf8_lossy(&client.stderr).into_owned();
    // The server finishes when its accept loops time out (8 s idle).
    poll(Duration::from_secs(30), Duration::from_millis(50), || {
        server.try_wait().unwrap()
    });
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
const EXEC_SERVER: &str = include_str!("programs/tcp_exec_server.py");

/// Accelerated sockets inherited across exec (a listener) and posix_spawn (a connection) keep
/// their overlay addresses, and an inherited listener stays registered with the router.
#[test]
fn sockets_inherited_across_exec_keep_overlay_addresses() {
    let site = Site::new("tx");
    let (mut server, mut reader, mut line) = spawn_reading_first_line(
        site.python("db", EXEC_SERVER, true)
            .stderr(Stdio::inherit()),
    );
    assert!(
        line.starts_with("READY ('10.32.0.4', 7201)")
            || line.starts_with("READY ('0.0.0.0', 7201)"),
        "{line:?}"
    );
    let client = site
        .python("web", include_str!("programs/tcp_exec_client.py"), true)
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
const RETRYING_CLIENT: &str = include_str!("programs/tcp_retrying_client.py");

/// The router killed and restarted by the daemon: the server's shim hands its listener to the
/// new router, so accelerated clients and clients without Freeflow reach it again, without the
/// server doing anything.
#[test]
fn listeners_survive_a_router_restart() {
    let site = Site::new("tr");
    let mut server = start_echo(&site);
    let first = site.python("web", RETRYING_CLIENT, true).output().unwrap();
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("ECHO b'again'"),
        "{first:?}"
    );
    let restarts = |status: &serde_json::Value| status["daemon"]["restarts"].as_u64().unwrap_or(0);
    let restarts_before = restarts(&site.router_status(1));
    let pattern = format!("freeflow-router --dir {}", site.dirs[1].display());
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", &pattern])
        .status()
        .unwrap();
    assert!(killed.success(), "router process found");
    let mut status = serde_json::Value::Null;
    let restarted = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        status = site.router_status(1);
        (restarts(&status) > restarts_before && status["router"]["running"].as_bool() == Some(true))
            .then_some(())
    });
    assert!(restarted.is_some(), "router not restarted: {status}");
    let connects_before = site.router_counter(0, "tcp_connects");
    let (mut accelerated, _, echo) =
        spawn_reading_first_line(&mut site.python("web", RETRYING_CLIENT, true));
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
    let listeners = site.router_counter(1, "tcp_listeners");
    let connects = site.router_counter(0, "tcp_connects") - connects_before;
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
const HOSTILE: &str = include_str!("programs/tcp_hostile.py");

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
            let _ = hostile.stderr.as_mut().unwrap().read_to_string(&mut err);
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
            include_str!("programs/tcp_fake_listener_client.py"),
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
const FORK_STRESS: &str = include_str!("programs/tcp_fork_stress.py");

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
const REUSEPORT_ONE_PROCESS: &str = include_str!("programs/tcp_reuseport_one_process.py");

#[test]
fn reuseport_listeners_of_one_process_share_and_dup2_closes_a_listener() {
    let site = Site::new("tu");
    let (mut server, mut reader, mut line) = spawn_reading_first_line(
        site.python("db", REUSEPORT_ONE_PROCESS, true)
            .stderr(Stdio::piped()),
    );
    assert_eq!(line.trim(), "READY");
    site.wait_listener_known(0, "10.32.0.4", 7301);
    let listeners = site.router_status(1)["router"]["tcp_listeners"].as_u64();
    let client = site
        .python(
            "web",
            include_str!("programs/tcp_reuseport_client.py"),
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
