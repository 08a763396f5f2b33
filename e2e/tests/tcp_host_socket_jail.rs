//! The host-socket jail end to end: a hostile program (Python under LD_PRELOAD, raw system
//! calls through ctypes) takes host-namespace sockets from Freeflow, an accelerated
//! connection and an accelerated listener, and tries to turn them into a way onto the host
//! network: (a) disconnect a connection (connect with AF_UNSPEC) and connect it to a listener
//! that lives only in the host's namespace; (c) shut down a listener and connect it there
//! likewise; (e) the same with a connection accepted on an accelerated listener; (d) disconnect a connection and listen on its host port, for a client in the
//! host's namespace. Each must fail, and the host-only listener must see no connection.
//! Needs root and a built workspace (`cargo build --workspace`).

mod common;

use common::{spawn_reading_first_line, terminate, Site, SiteSpec};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PROGRAM: &str = include_str!("programs/tcp_jail_escape.py");
const HOST_IP: &str = "192.168.1.1";
/// The host-only listener's port (nothing of Freeflow's).
const HOST_ONLY_PORT: u16 = 47311;
/// The overlay server's port (the hostile listener takes the next one).
const SERVER_PORT: u16 = 9300;

fn site() -> Site {
    Site::create_tcp(SiteSpec {
        prefix: "jl",
        work_prefix: "ff-jail",
        hosts: 1,
        containers: &[(0, "web", [10, 32, 0, 2]), (0, "app", [10, 32, 0, 3])],
        registered: &[("web", "blue"), ("app", "blue")],
        ..SiteSpec::default()
    })
}

/// The test program in `role` in a container (with the shim) or in host 0 (`None`).
fn program(site: &Site, container: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = match container {
        Some(c) => site.shim_env(c, true),
        None => site.in_host(0, "env"),
    };
    // Every program the test starts is bounded in time.
    cmd.args(["timeout", "60", "python3", "-c", PROGRAM])
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

fn start(cmd: &mut Command) -> (Child, std::io::BufReader<std::process::ChildStdout>) {
    let (child, reader, line) = spawn_reading_first_line(cmd);
    assert_eq!(line.trim(), "LISTENING", "did not start");
    (child, reader)
}

/// Reads "<STEP> <value>" lines until `last` (inclusive).
fn read_steps(
    reader: &mut impl BufRead,
    steps: &mut HashMap<String, String>,
    last: &str,
) -> Result<(), String> {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return Err(format!(
                "the hostile program ended before {last}: {steps:?}"
            ));
        }
        let (step, value) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        steps.insert(step.to_string(), value.to_string());
        if step == last {
            return Ok(());
        }
    }
}

/// Whether a client in host 0's namespace gets a connection to `HOST_IP:port` (3 s at most:
/// a dropped SYN is retried, and the wait is what bounds it).
fn host_client_connects(site: &Site, port: &str) -> bool {
    let script = "import socket,sys\n\
        try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print('CONNECTED')\n\
        except OSError as e: print('FAILED', e)";
    let out = site
        .in_host(0, "timeout")
        .args(["20", "python3", "-c", script, HOST_IP, port])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).starts_with("CONNECTED")
}

#[test]
fn handed_host_sockets_cannot_reach_or_serve_the_host_network() {
    let site = site();
    let port = SERVER_PORT.to_string();
    let (mut server, _server_out) = start(&mut program(&site, Some("web"), &["serve", &port]));
    site.wait_listening("web", SERVER_PORT, Some(&mut server));
    let host_port = HOST_ONLY_PORT.to_string();
    let (mut host, mut host_out) = start(&mut program(
        &site,
        None,
        &["host-listen", HOST_IP, &host_port],
    ));

    let mut hostile = program(
        &site,
        Some("app"),
        &[
            "escape",
            "10.32.0.2",
            &port,
            HOST_IP,
            &host_port,
            "10.32.0.3",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut hostile_out = std::io::BufReader::new(hostile.stdout.take().unwrap());
    let mut steps = HashMap::new();
    read_steps(&mut hostile_out, &mut steps, "D_PORT").unwrap();
    let d_reached = host_client_connects(&site, &steps["D_PORT"]);
    writeln!(hostile.stdin.as_mut().unwrap()).unwrap();
    read_steps(&mut hostile_out, &mut steps, "D_ACCEPT").unwrap();
    drop(hostile.stdin.take());
    assert!(terminate(&mut hostile, Duration::from_secs(10)));

    drop(host.stdin.take());
    let mut last = String::new();
    host_out.read_line(&mut last).unwrap();
    let _ = terminate(&mut host, Duration::from_secs(10));
    drop(server.stdin.take());
    let _ = terminate(&mut server, Duration::from_secs(10));

    let eperm = libc::EPERM.to_string();
    // The sockets were Freeflow's host sockets, and worked as the application's.
    for step in ["A", "D"] {
        assert_eq!(steps[&format!("{step}_HELLO")], "True", "{steps:?}");
        let name = &steps[&format!("{step}_SOCKNAME")];
        assert!(name.starts_with(HOST_IP), "not accelerated: {steps:?}");
    }
    assert!(steps["C_SOCKNAME"].starts_with(HOST_IP), "{steps:?}");
    // (a): the disconnect itself is the kernel's; the connect after it is refused, twice.
    assert_eq!(steps["A_DISCONNECT"], "0", "{steps:?}");
    assert_eq!(steps["A_CONNECT"], eperm, "(a) {steps:?}");
    assert_eq!(steps["A_AGAIN"], eperm, "(a) again {steps:?}");
    // (c): a shut-down listener connects nowhere either (EPERM from the jail; Linux 6.18
    // itself answers EINVAL here, before the jail's hook).
    let einprogress = libc::EINPROGRESS.to_string();
    assert!(
        !["0", einprogress.as_str()].contains(&steps["C_CONNECT"].as_str()),
        "(c) {steps:?}"
    );
    // (e): nor does a connection accepted on an accelerated listener (it inherits the
    // listener's mark).
    assert!(steps["E_SOCKNAME"].starts_with(HOST_IP), "{steps:?}");
    assert_eq!(steps["E_DISCONNECT"], "0", "{steps:?}");
    assert_eq!(steps["E_CONNECT"], eperm, "(e) {steps:?}");
    // (d): no client of the host network gets through (the jail drops the SYNs to a listening
    // connection socket; Linux 6.18 itself refuses listen on a disconnected one: see the next
    // test for the rule alone).
    assert!(
        !d_reached,
        "(d) a host client reached the hostile listener: {steps:?}"
    );
    assert_ne!(steps["D_ACCEPT"], "0", "(d) {steps:?}");
    assert_eq!(last.trim(), "HOST_ACCEPTED 0", "{steps:?}");
    // And the router says so.
    assert_eq!(
        site.router_status(0)["router"]["jail_active"].as_bool(),
        Some(true),
        "the jail is not active: {}",
        site.router_log()
    );
}

/// The SYN rule on its own (Linux 6.18 refuses listen on a disconnected connection socket, so
/// the hostile program cannot reach it): a listener in host 0's namespace carrying the
/// connection mark gets no client, and its mark cannot be taken off, even by root.
#[test]
fn connection_marked_listeners_get_no_clients_and_keep_their_mark() {
    let site = site();
    let script = "import socket\n\
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x46460001)\n\
        l.bind(('192.168.1.1', 0)); l.listen(4)\n\
        try:\n socket.create_connection(l.getsockname(), timeout=3); print('CONNECTED')\n\
        except OSError as e: print('REFUSED', e)\n\
        try:\n l.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0); print('UNMARKED')\n\
        except OSError as e: print('KEPT', e.errno)\n\
        plain = socket.socket(); plain.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 7)\n\
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0); print('PLAIN_OK')\n";
    let out = site
        .in_host(0, "timeout")
        .args(["20", "python3", "-c", script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("REFUSED")),
        "{text}"
    );
    let kept = format!("KEPT {}", libc::EPERM);
    assert_eq!(lines.get(1).copied(), Some(kept.as_str()), "{text}");
    // Marks that are not Freeflow's change as before.
    assert_eq!(lines.get(2).copied(), Some("PLAIN_OK"), "{text}");
}
