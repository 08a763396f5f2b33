//! Clients without Freeflow under load (issue 11, section 3's relay): an unmodified nginx under
//! the shim (daemonizing, its default) on one simulated host, and a plain client (no shim) in a
//! container of the other host opening a new connection per request, 400 at once, in rounds
//! one after another. The router rings nginx's host listener once per plain client waiting on
//! its overlay listener, and the shim accepts the client from that listener (see
//! docs/tcp-setup.md, "Clients without Freeflow"); every request must be served, in every
//! round, and the router must turn none away. Also: a server that closed the shim's duplicate
//! of its overlay listener serves plain clients too; a server whose blocking accept took its
//! plain clients itself and then waits where the shim does not see it gets the next by
//! doorbell; servers that wait in epoll (nginx's workers), select (sets sized for nfds too) or
//! poll take their plain clients themselves, with no doorbell; an EPOLLONESHOT listener whose
//! epoll data another fd shares serves every client.
//! Needs root, a built workspace, and nginx (scripts/test.sh installs it).

mod common;

use common::{LineWatch, Site, SiteSpec};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const CLIENT: &str = include_str!("programs/tcp_relay_load_client.py");
const DB_IP: &str = "10.32.0.4";
/// Clients at once, and requests each makes (a new connection each).
const CONNECTIONS: usize = 400;
const REQUESTS_EACH: usize = 10;
/// Load rounds one after another: what a round leaves behind must not hurt the next.
const ROUNDS: usize = 3;

/// Two hosts; web on host 0, db on host 1 (both registered, tenant blue).
fn site(prefix: &str) -> Site {
    site_with(prefix, &[])
}

/// As [`site`], with the routers' environment `up_env`.
fn site_with(prefix: &str, up_env: &[(&str, &str)]) -> Site {
    Site::create_tcp(SiteSpec {
        prefix,
        work_prefix: "ff-relay-load",
        hosts: 2,
        containers: &[(0, "web", [10, 32, 0, 2]), (1, "db", [10, 32, 0, 4])],
        registered: &[("web", "blue"), ("db", "blue")],
        up_env,
        ..SiteSpec::default()
    })
}

/// Routers that leave the plain clients of a process that takes them itself to it for a
/// minute before they ring (the default is 20 ms): a doorbell answered in a test on such a
/// site is one for a client the server's shim did not take, whatever the machine's load. (A
/// client left to wait the whole minute fails the test by its own timeout.)
const LONG_GRACE: &[(&str, &str)] = &[("FREEFLOW_ACCEPT_GRACE_MS", "60000")];

/// nginx's configuration in `dir`: its defaults (daemon on, backlog 511) but for the paths,
/// two workers and enough connections per worker for the load.
fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nworker_processes 2;\n\
         events {{ worker_connections 2048; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen 80;\n\
         location / {{ return 200 \"nginx saw $remote_addr\\n\"; }}\n  }}\n}}\n"
    )
}

/// Starts nginx (daemon on, FREEFLOW_DEBUG) under the shim in container db of `site`, in
/// `site.work/nginx`, and waits until its two workers' shims told the router that their epoll
/// instances take the listener's clients (nginx sends the daemon's stderr to its error log).
fn start_nginx_watching_in_epoll(site: &Site) -> (Nginx, PathBuf) {
    let dir = site.work.join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&dir)).unwrap();
    let out = site
        .shim_env("db", true)
        .arg("FREEFLOW_DEBUG=1")
        .args(["timeout", "30", "nginx", "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    let nginx = Nginx(dir.clone());
    common::assert_success(&out, "nginx (daemon on)");
    site.wait_listening("db", 80, None);
    let log = dir.join("error.log");
    assert!(
        wait_for_lines(&log, "10.32.0.4:80: this process takes its clients", 2),
        "nginx's two workers did not tell the router:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (nginx, dir)
}

/// Kills the daemonized nginx (master and workers) when the test ends, however it ends.
struct Nginx(PathBuf);

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.0.join("nginx.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SIGTERM: nginx's fast shutdown; the master stops its workers.
            let _ = freeflow_os::signals::send_signal(pid, libc::SIGTERM);
            std::thread::sleep(Duration::from_millis(500));
            let _ = freeflow_os::signals::send_signal(pid, libc::SIGKILL);
        }
    }
}

#[test]
fn nginx_serves_400_plain_clients_at_once_through_the_relay_round_after_round() {
    common::require_programs(&["nginx", "python3"], "nginx python3");
    let site = site("rl");
    let dir = site.work.join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&dir)).unwrap();
    let out = site
        .shim_env("db", true)
        .args(["timeout", "30", "nginx", "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    let _nginx = Nginx(dir.clone());
    common::assert_success(&out, "nginx (daemon on)");
    site.wait_listening("db", 80, None);
    // Past the daemonizing parent's orphan grace: the workers hold the listener.
    std::thread::sleep(Duration::from_millis(2500));
    let expect = "nginx saw 10.32.0.2";
    for round in 1..=ROUNDS {
        let relayed = site.router_counter(1, "tcp_relayed");
        let started = Instant::now();
        let out = site
            .shim_env("web", false)
            .args(["timeout", "120", "python3", "-c", CLIENT, DB_IP, "80"])
            .args([CONNECTIONS.to_string(), REQUESTS_EACH.to_string()])
            .arg(expect)
            .output()
            .unwrap();
        common::assert_success(&out, "the load client");
        let said = String::from_utf8_lossy(&out.stdout);
        let all = CONNECTIONS * REQUESTS_EACH;
        // For the record only (the machine is shared: no timing is asserted).
        let took = started.elapsed();
        eprintln!(
            "round {round}: {all} requests in {took:.2?} ({:.0}/s), python3 client included",
            all as f64 / took.as_secs_f64()
        );
        assert!(
            said.starts_with(&format!("SERVED {all} ERRORS 0\n")),
            "round {round}: {said}\n--- router log\n{}",
            site.router_log()
        );
        // nginx's workers wait in epoll, which watches the overlay listener too: they take
        // their plain clients themselves; the router rings only for clients left waiting past
        // its grace (20 ms here: at 400 at once, some are). For the record.
        let rung = site.router_counter(1, "tcp_relayed") - relayed;
        eprintln!("round {round}: {rung} doorbells answered for {all} plain clients");
    }
    let log = site.router_log();
    assert!(
        !log.contains("turned away"),
        "the router turned clients away:\n{log}"
    );
}

/// Starts python3 `script` under the shim in container db of `site`, with FREEFLOW_DEBUG and
/// both outputs piped, killed by `timeout` after `seconds`.
fn spawn_debug_server(site: &Site, script: &str, seconds: &str) -> Child {
    site.shim_env("db", true)
        .arg("FREEFLOW_DEBUG=1")
        .args(["timeout", seconds, "python3", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (at most 20 s) until `file` holds `count` lines containing `needle`.
fn wait_for_lines(file: &Path, needle: &str, count: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nginx's workers wait in epoll (each its own instance, the listener registered with
/// EPOLLEXCLUSIVE), then accept without blocking: their instances watch the overlay listener
/// beside the host listener, so they take their plain clients themselves, and the router,
/// told so, rings no doorbell; every client gets its own address.
#[test]
fn nginx_workers_waiting_in_epoll_take_plain_clients_without_doorbells() {
    common::require_programs(&["nginx", "python3"], "nginx python3");
    let site = site_with("re", LONG_GRACE);
    let (_nginx, _) = start_nginx_watching_in_epoll(&site);
    let relayed = site.router_counter(1, "tcp_relayed");
    let (connections, each) = (50, 4);
    let out = site
        .shim_env("web", false)
        .args(["timeout", "120", "python3", "-c", CLIENT, DB_IP, "80"])
        .args([connections.to_string(), each.to_string()])
        .arg("nginx saw 10.32.0.2")
        .output()
        .unwrap();
    common::assert_success(&out, "the load client");
    let all = connections * each;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with(&format!("SERVED {all} ERRORS 0\n")),
        "{said}\n--- router log\n{}",
        site.router_log()
    );
    assert_eq!(
        site.router_counter(1, "tcp_relayed") - relayed,
        0,
        "doorbells answered for plain clients of nginx's epoll workers"
    );
}

/// Serves plain clients on 0.0.0.0:7320 waiting as event loops do: three with select (the
/// first with Python's, which passes full-size sets; the others with the C library's select
/// called through ctypes, with sets sized for nfds as older programs allocate them, a guard
/// word after each, checked unchanged), then three with poll, each followed by a non-blocking
/// accept on the listener. Says READY once listening; each client gets the address accept gave.
const EVENT_LOOP_SERVER: &str = r#"
import ctypes, select, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7320)); s.listen(16); s.setblocking(False)
print("READY", flush=True)
GUARD = 0x5a5a5a5a5a5a5a5a
class Timeval(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]
def narrow_select(fd):
    # Read and except sets with the listener, an empty write set: one word each (fd < 64).
    read, write, exc = [(ctypes.c_uint64 * 2)(bit, GUARD) for bit in (1 << fd, 0, 1 << fd)]
    rc = libc.select(fd + 1, read, write, exc, ctypes.byref(Timeval(30, 0)))
    got = [list(read), list(write), list(exc)]
    if rc != 1 or got != [[1 << fd, GUARD], [0, GUARD], [0, GUARD]]:
        print("NARROW SELECT", rc, ctypes.get_errno(), got, flush=True); sys.exit(1)
def serve():
    c, peer = s.accept()
    c.setblocking(True); c.recv(100); c.sendall(("PEER %s" % peer[0]).encode()); c.close()
assert s.fileno() < 64
if not select.select([s], [], [], 30)[0]:
    print("SELECT NOT WOKEN", flush=True); sys.exit(1)
serve()
for _ in range(2):
    narrow_select(s.fileno())
    serve()
print("SELECT DONE", flush=True)
p = select.poll(); p.register(s, select.POLLIN)
for _ in range(3):
    if not p.poll(30000):
        print("POLL NOT WOKEN", flush=True); sys.exit(1)
    serve()
p.unregister(s)
print("POLL DONE", flush=True)
"#;

/// A plain client (no shim, `preload` false) or an accelerated one of `port` on the db
/// container: what the server answered.
fn client_of(site: &Site, port: u16, preload: bool, what: &str) -> String {
    let out = site
        .shim_env("web", preload)
        .args(["timeout", "40", "python3", "-c"])
        .arg(format!(
            "import socket; c = socket.create_connection(('{DB_IP}', {port}), timeout=35); \
             c.sendall(b'x'); print(c.recv(100).decode())"
        ))
        .output()
        .unwrap();
    common::assert_success(&out, what);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A server waiting in select, then poll (PostgreSQL's postmaster waits in select or epoll,
/// many event loops in poll; older programs size their fd sets for nfds) takes its plain
/// clients itself: the shim's select and poll report the overlay listener's clients as the
/// listener's, and touch no word past the application's sets; the router rings no doorbell
/// for them.
#[test]
fn select_and_poll_servers_take_plain_clients_without_doorbells() {
    common::require_programs(&["python3"], "python3");
    let site = site_with("rp", LONG_GRACE);
    let mut server = spawn_debug_server(&site, EVENT_LOOP_SERVER, "90");
    let mut said = LineWatch::new(server.stderr.take().unwrap());
    // Its first select tells the router, before any client comes.
    assert!(
        said.wait_for(
            "7320: this process takes its clients without Freeflow",
            Duration::from_secs(20)
        ),
        "the server's shim did not tell the router: {:?}",
        said.seen()
    );
    let relayed = site.router_counter(1, "tcp_relayed");
    for i in 0..6 {
        let what = format!("plain client {i}");
        assert_eq!(
            client_of(&site, 7320, false, &what),
            "PEER 10.32.0.2",
            "{what}"
        );
    }
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut server.stdout.take().unwrap(), &mut printed).unwrap();
    let status = server.wait().unwrap();
    assert_eq!(
        printed,
        "READY\nSELECT DONE\nPOLL DONE\n",
        "{status}: {:?}",
        said.finish()
    );
    assert!(status.success());
    assert_eq!(
        site.router_counter(1, "tcp_relayed") - relayed,
        0,
        "doorbells answered for plain clients of a select/poll server"
    );
}

/// An event loop on 0.0.0.0:7321 with one handler for every fd (epoll data 0 for all, through
/// ctypes: Python's own epoll sets the data to the fd): the listener registered with
/// EPOLLONESHOT (re-armed after each accept, and checked to report nothing before), a pipe
/// beside it. The pipe's event comes first, before any client, and must not disarm the
/// listener; then four clients are served. Says READY after the pipe's event.
const ONESHOT_SHARED_DATA_SERVER: &str = r#"
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
class Event(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]
EPOLLIN, EPOLLONESHOT, ADD, MOD = 0x1, 1 << 30, 1, 3
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7321)); s.listen(16); s.setblocking(False)
ep = libc.epoll_create1(0)
def ctl(op, fd, events):
    if libc.epoll_ctl(ep, op, fd, ctypes.byref(Event(events, 0))) != 0:
        print("EPOLL_CTL errno", ctypes.get_errno(), flush=True); sys.exit(1)
ready = (Event * 8)()
def wait(ms):
    n = libc.epoll_wait(ep, ready, 8, ms)
    if n < 0:
        print("EPOLL_WAIT errno", ctypes.get_errno(), flush=True); sys.exit(1)
    return n
ctl(ADD, s.fileno(), EPOLLIN | EPOLLONESHOT)
r, w = os.pipe(); ctl(ADD, r, EPOLLIN)
os.write(w, b"x")
if wait(30000) != 1:
    print("PIPE NOT REPORTED", flush=True); sys.exit(1)
os.read(r, 1)
print("READY", flush=True)
served = 0
for _ in range(40):
    if wait(30000) == 0:
        print("EPOLL NOT WOKEN", flush=True); sys.exit(1)
    if wait(0):
        print("ONESHOT REPORTED TWICE", flush=True); sys.exit(1)
    try:
        c, peer = s.accept()
    except BlockingIOError:
        ctl(MOD, s.fileno(), EPOLLIN | EPOLLONESHOT); continue
    c.setblocking(True); c.recv(100); c.sendall(("PEER %s" % peer[0]).encode()); c.close()
    ctl(MOD, s.fileno(), EPOLLIN | EPOLLONESHOT)
    served += 1
    if served == 4:
        break
print("SERVED", served, flush=True)
"#;

/// An EPOLLONESHOT listener whose epoll data another fd shares (one handler for every fd):
/// that fd's event does not disarm it, and every client is served, plain and accelerated.
/// The shim does not mirror an EPOLLONESHOT registration (docs/tcp-setup.md): such a server's
/// plain clients come by doorbell.
#[test]
fn an_oneshot_epoll_listener_sharing_its_data_with_another_fd_serves_every_client() {
    common::require_programs(&["python3"], "python3");
    let site = site("ro");
    let mut server = site
        .shim_env("db", true)
        .args(["timeout", "90", "python3", "-c", ONESHOT_SHARED_DATA_SERVER])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = LineWatch::new(server.stdout.take().unwrap());
    assert!(
        said.wait_for("READY", Duration::from_secs(20)),
        "the server did not start: {:?}",
        said.seen()
    );
    site.wait_listening("db", 7321, Some(&mut server));
    let relayed = site.router_counter(1, "tcp_relayed");
    for (i, preload) in [false, true, false, true].into_iter().enumerate() {
        let what = format!("client {i} (shim: {preload})");
        assert_eq!(
            client_of(&site, 7321, preload, &what),
            "PEER 10.32.0.2",
            "{what}"
        );
    }
    let status = server.wait().unwrap();
    assert_eq!(said.finish(), "READY\nSERVED 4\n", "{status}");
    assert!(status.success());
    assert!(
        site.router_counter(1, "tcp_relayed") - relayed >= 2,
        "the plain clients came by doorbell"
    );
}

/// Listens on 0.0.0.0:7301, then closes the other fds listening on port 7301 (it did not open
/// them), then answers three clients with the address accept gave for each.
const FD_CLOSING_SERVER: &str = r#"
import socket, os, stat
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7301)); s.listen(16)
for fd in range(s.fileno() + 1, 1024):
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode): continue
    except OSError:
        continue
    probe = socket.socket(fileno=os.dup(fd))
    try:
        mine = probe.family == socket.AF_INET and probe.getsockname()[1] == 7301
    except Exception:
        mine = False
    probe.close()
    if mine:
        print("CLOSED", fd, flush=True); os.close(fd)
for _ in range(3):
    c, peer = s.accept()
    c.recv(100); c.sendall(("PEER %s" % peer[0]).encode()); c.close()
print("DONE", flush=True)
"#;

/// A server that closes the fds it does not know (the shim's own duplicate of its overlay
/// listener among them, which the shim then forgets): at the first doorbell its shim gets the
/// overlay listener from the router, once, and plain clients are served with their own
/// addresses.
#[test]
fn a_server_that_closed_the_shims_overlay_listener_serves_plain_clients() {
    common::require_programs(&["python3"], "python3");
    let site = site("rx");
    let mut server = spawn_debug_server(&site, FD_CLOSING_SERVER, "60");
    site.wait_listening("db", 7301, Some(&mut server));
    let relayed = site.router_counter(1, "tcp_relayed");
    for _ in 0..3 {
        let out = site
            .shim_env("web", false)
            .args(["timeout", "20", "python3", "-c"])
            .arg(format!(
                "import socket; c = socket.create_connection(('{DB_IP}', 7301), timeout=10); \
                 c.sendall(b'x'); print(c.recv(100).decode())"
            ))
            .output()
            .unwrap();
        common::assert_success(&out, "a plain client");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "PEER 10.32.0.2"
        );
    }
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut server.stdout.take().unwrap(), &mut printed).unwrap();
    assert!(printed.starts_with("CLOSED "), "{printed}");
    assert!(printed.ends_with("DONE\n"), "{printed}");
    let status = server.wait().unwrap();
    let mut said = String::new();
    std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut said).unwrap();
    assert!(status.success(), "{status}: {said}");
    assert_eq!(
        said.matches("overlay listener of 10.32.0.4:7301 from the router")
            .count(),
        1,
        "the server's shim asked the router once:\n{said}"
    );
    // The first client came by doorbell (the server's shim had no overlay listener); with it
    // fetched, the server's blocking accept waits on it too and takes the next ones itself
    // (a doorbell is rung only for a client left waiting past the router's grace).
    let rung = site.router_counter(1, "tcp_relayed") - relayed;
    assert!((1..=3).contains(&rung), "{rung} doorbells answered");
    assert_eq!(
        said.matches("7301: this process takes its clients without Freeflow")
            .count(),
        1,
        "the server's shim told the router once:\n{said}"
    );
}

/// Waits in a blocking accept for its first client on 0.0.0.0:7310, then only in a ppoll made
/// as a raw system call (a process that stopped waiting anywhere the shim sees: busy, or
/// waiting through io_uring or its own system calls): its second client can reach it only by
/// the router's doorbell, which makes the host listener ready.
const ACCEPT_THEN_SELECT_SERVER: &str = r#"
import ctypes, os, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7310)); s.listen(16)
def serve(c, peer):
    c.recv(100); c.sendall(("PEER %s" % peer[0]).encode()); c.close()
serve(*s.accept())
print("FIRST", flush=True)
class PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]
class TimeSpec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]
SYS_PPOLL = {"x86_64": 271, "aarch64": 73}[os.uname().machine]
libc = ctypes.CDLL(None, use_errno=True)
waited = PollFd(s.fileno(), 1, 0)
n = libc.syscall(SYS_PPOLL, ctypes.byref(waited), 1, ctypes.byref(TimeSpec(30, 0)), None, 8)
if n != 1:
    print("NOT WOKEN", n, ctypes.get_errno(), flush=True); sys.exit(1)
serve(*s.accept())
print("DONE", flush=True)
"#;

/// A process whose blocking accept took its plain clients itself (so the router leaves its
/// clients to it) and that then stops waiting in accept still gets its next plain client:
/// the router rings a doorbell for a client left waiting past its grace, and the server's
/// select wakes for it. No client waits without bound.
#[test]
fn a_plain_client_of_a_process_that_stopped_accepting_gets_a_doorbell_after_the_grace() {
    common::require_programs(&["python3"], "python3");
    let site = site("rg");
    let mut server = spawn_debug_server(&site, ACCEPT_THEN_SELECT_SERVER, "60");
    let mut said = LineWatch::new(server.stderr.take().unwrap());
    // No client exists yet, so its first accept waits, and its shim tells the router so.
    assert!(
        said.wait_for(
            "7310: this process takes its clients without Freeflow",
            Duration::from_secs(20)
        ),
        "the server's shim did not tell the router: {:?}",
        said.seen()
    );
    let relayed = site.router_counter(1, "tcp_relayed");
    let plain_client = || {
        let out = site
            .shim_env("web", false)
            .args(["timeout", "40", "python3", "-c"])
            .arg(format!(
                "import socket; c = socket.create_connection(('{DB_IP}', 7310), timeout=35); \
                 c.sendall(b'x'); print(c.recv(100).decode())"
            ))
            .output()
            .unwrap();
        common::assert_success(&out, "a plain client");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        plain_client(),
        "PEER 10.32.0.2",
        "taken by the blocking accept"
    );
    assert_eq!(plain_client(), "PEER 10.32.0.2", "woken by a doorbell");
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut server.stdout.take().unwrap(), &mut printed).unwrap();
    assert_eq!(printed, "FIRST\nDONE\n");
    assert!(server.wait().unwrap().success());
    assert!(
        site.router_counter(1, "tcp_relayed") > relayed,
        "the second client came by doorbell"
    );
}

/// A forking server's accept, as C calls it (through ctypes, so the shim's accept is the one
/// called and EINTR reaches the program instead of Python's retry): SIGCHLD has a handler
/// with SA_RESTART, so a child's exit must not end the accept.
const SA_RESTART_SERVER: &str = r#"
import ctypes, os, signal, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.signal(signal.SIGCHLD, lambda *a: None)
signal.siginterrupt(signal.SIGCHLD, False)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7311)); s.listen(16)
child = os.fork()
if child == 0:
    time.sleep(0.5); os._exit(0)
print("CHILD", child, flush=True)
fd = libc.accept(s.fileno(), None, None)
if fd < 0:
    print("ACCEPT FAILED errno", ctypes.get_errno(), flush=True); sys.exit(1)
c = socket.socket(fileno=fd); c.recv(100); c.sendall(b"OK"); c.close()
print("DONE", flush=True)
"#;

/// A signal whose handler has SA_RESTART (a forking server reaping its children) does not end
/// a blocking accept that the shim waits in for plain clients, as the kernel would restart
/// its own accept: the server gets the client that comes after the signal.
#[test]
fn a_restarting_signal_does_not_end_the_shims_blocking_accept() {
    common::require_programs(&["python3"], "python3");
    let site = site("rs");
    let mut server = site
        .shim_env("db", true)
        .args(["timeout", "60", "python3", "-c", SA_RESTART_SERVER])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    let child: u32 = first
        .strip_prefix("CHILD ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the server said {first:?}"));
    // The child is a zombie once it exited, and SIGCHLD was sent before that.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server's child never exited: {stat}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let client = site
        .shim_env("web", false)
        .args(["timeout", "40", "python3", "-c"])
        .arg(format!(
            "import socket; c = socket.create_connection(('{DB_IP}', 7311), timeout=35); \
             c.sendall(b'x'); print(c.recv(100).decode())"
        ))
        .output()
        .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = server.wait().unwrap();
    assert!(
        status.success() && rest == "DONE\n",
        "server: {status} {rest:?}"
    );
    common::assert_success(&client, "a plain client");
    assert_eq!(String::from_utf8_lossy(&client.stdout).trim(), "OK");
}

/// The processes whose parent is `parent`.
fn children_of(parent: i32) -> Vec<i32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The fields after the command's ')': state, then the parent's pid.
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}

/// Whether an epoll instance of process `pid` watches two fds with the same data: a listener
/// and the shim's overlay listener beside it (nginx gives each fd its own data otherwise).
fn watches_an_overlay_listener(pid: i32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        let is_epoll = std::fs::read_link(fd.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:[eventpoll]");
        if !is_epoll {
            return false;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let data: Vec<&str> = info
            .lines()
            .filter(|l| l.starts_with("tfd:"))
            .filter_map(|l| l.split("data:").nth(1)?.split_whitespace().next())
            .collect();
        data.iter()
            .enumerate()
            .any(|(i, d)| data[i + 1..].contains(d))
    })
}

/// Waits (at most 20 s) until `check` holds for every one of `pids`.
fn wait_all(pids: &[i32], check: impl Fn(i32) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if pids.iter().all(|&pid| check(pid)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// While no router serves nginx's listener (the router died and is not restarted yet), the
/// shim's overlay listener stops listening, and the workers' epoll instances stop watching it
/// (its hang-up would wake a level-triggered instance without end); once the restarted router
/// takes the listener back, they watch it again and take their plain clients themselves.
#[test]
fn nginx_workers_stop_watching_a_dead_overlay_listener_and_watch_it_again_after_a_restart() {
    common::require_programs(&["nginx", "python3"], "nginx python3");
    let site = site_with("rw", LONG_GRACE);
    let (_nginx, dir) = start_nginx_watching_in_epoll(&site);
    let master: i32 = std::fs::read_to_string(dir.join("nginx.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let workers = children_of(master);
    assert_eq!(workers.len(), 2, "nginx's workers: {workers:?}");
    assert!(
        wait_all(&workers, watches_an_overlay_listener),
        "the workers' epoll instances watch the overlay listener"
    );
    // The router dies while its daemon cannot restart it.
    let router: i32 = std::fs::read_to_string(site.state_dir(1).join("router.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    {
        let _stopped = site.stop_daemon(1);
        freeflow_os::signals::send_signal(router, libc::SIGKILL).unwrap();
        assert!(
            wait_all(&workers, |pid| !watches_an_overlay_listener(pid)),
            "a worker's epoll instance still watches the overlay listener with no router"
        );
    }
    // The daemon restarts the router; the workers' shims hand the listener to it.
    assert!(
        wait_all(&workers, watches_an_overlay_listener),
        "the workers' epoll instances watch the overlay listener again"
    );
    site.wait_listener_known(0, DB_IP, 80);
    let relayed = site.router_counter(1, "tcp_relayed");
    let out = site
        .shim_env("web", false)
        .args(["timeout", "120", "python3", "-c", CLIENT, DB_IP, "80"])
        .args(["10", "3"])
        .arg("nginx saw 10.32.0.2")
        .output()
        .unwrap();
    common::assert_success(&out, "the load client");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("SERVED 30 ERRORS 0\n"),
        "{said}\n--- router log\n{}",
        site.router_log()
    );
    assert_eq!(
        site.router_counter(1, "tcp_relayed") - relayed,
        0,
        "doorbells answered after the restart"
    );
}
