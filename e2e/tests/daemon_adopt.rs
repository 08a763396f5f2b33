//! The router outlives its daemon (issue 10, finding 7): a daemon killed with SIGKILL leaves its
//! router serving (same pid; an established accelerated connection carries data, new
//! connections and new attachments work); `freeflow up` again starts a daemon that adopts that
//! router instead of starting a second one, restarts it when it dies, and `freeflow down` stops
//! both.
//!
//! Needs root and a built workspace (`cargo build --workspace`: the shim and the router).

mod common;

use common::{poll, spawn_reading_first_line, Site, SiteSpec};
use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::time::Duration;

/// A server that echoes on every connection it accepts (port 6100), each in a thread.
const THREADED_ECHO: &str = include_str!("programs/tcp_threaded_echo.py");
/// A client that keeps one connection to 10.32.0.4:6100 and makes another when told to.
const HOLDING_CLIENT: &str = include_str!("programs/tcp_holding_client.py");
/// A new process (so a new attachment) that makes one connection to 10.32.0.4:6100.
const ONE_ECHO: &str = "import socket\n\
c = socket.create_connection((\"10.32.0.4\", 6100), timeout=10)\n\
c.sendall(b\"z\"); print(\"ECHO\", c.recv(10), flush=True)\n";

/// Bound on every wait of this test.
const LIMIT: Duration = Duration::from_secs(20);

fn site() -> Site {
    Site::create_tcp(SiteSpec {
        prefix: "da",
        work_prefix: "ff-adopt",
        hosts: 2,
        containers: &[(0, "web", [10, 32, 0, 2]), (1, "db", [10, 32, 0, 4])],
        registered: &[("web", "blue"), ("db", "blue")],
        ..SiteSpec::default()
    })
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn python(site: &Site, container: &str, script: &str) -> std::process::Command {
    let mut cmd = site.shim_env(container, true);
    cmd.args(["timeout", "60", "python3", "-c", script]);
    cmd
}

/// A new client process in `web`: connects through the router and checks the echo.
fn one_echo(site: &Site, what: &str) {
    let out = python(site, "web", ONE_ECHO).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("ECHO b'z'"),
        "{what}: {}\n{}",
        common::describe(&out),
        site.router_log()
    );
}

fn u64_at(status: &serde_json::Value, a: &str, b: &str) -> Option<u64> {
    status[a][b].as_u64()
}

/// SIGKILLs the daemon of `host` and waits until its lock is free.
fn kill_daemon(site: &Site, host: usize) {
    let status = site.router_status(host);
    let pid = u64_at(&status, "daemon", "pid").expect("daemon pid") as i32;
    freeflow_os::signals::send_signal(pid, libc::SIGKILL).unwrap();
    let gone = poll(LIMIT, Duration::from_millis(20), || {
        (site.router_status(host)["daemon"]["running"] == false).then_some(())
    });
    assert!(gone.is_some(), "daemon {pid} of host {host} still running");
}

fn up_again(site: &Site, host: usize) {
    let out = site
        .in_host(host, &common::FREEFLOW)
        .args(["up", "--dir"])
        .arg(&site.dirs[host])
        .output()
        .unwrap();
    common::assert_success(&out, "freeflow up (again)");
}

fn start_echo(site: &Site) -> Child {
    let (server, _, line) =
        spawn_reading_first_line(python(site, "db", THREADED_ECHO).stderr(Stdio::null()));
    assert!(line.starts_with("LISTENING"), "{line:?}");
    site.wait_listener_known(0, "10.32.0.4", 6100);
    server
}

#[test]
fn the_router_outlives_a_killed_daemon_and_the_next_daemon_adopts_it() {
    let site = site();
    let mut server = start_echo(&site);
    let (mut client, mut client_out, line) = spawn_reading_first_line(
        python(&site, "web", HOLDING_CLIENT)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    assert_eq!(line.trim(), "CONNECTED");
    let routers: Vec<u64> = (0..2)
        .map(|h| u64_at(&site.router_status(h), "router", "pid").expect("router pid"))
        .collect();

    for host in 0..2 {
        kill_daemon(&site, host);
    }
    // Before the fix the routers got SIGTERM (PR_SET_PDEATHSIG) with their daemons.
    std::thread::sleep(Duration::from_millis(300));
    for (host, &pid) in routers.iter().enumerate() {
        assert!(
            alive(pid),
            "router {pid} of host {host} died with its daemon"
        );
        let status = site.router_status(host);
        assert_eq!(u64_at(&status, "router", "pid"), Some(pid), "{status}");
    }
    let connects = site.router_counter(0, "tcp_connects");
    client.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    client_out.read_to_string(&mut rest).unwrap();
    let _ = client.wait();
    assert!(
        rest.contains("AFTER b'b'"),
        "established connection: {rest}"
    );
    assert!(rest.contains("NEW b'c'"), "new connection: {rest}");
    one_echo(&site, "a new attachment without a daemon");
    assert!(site.router_counter(0, "tcp_connects") >= connects + 2);

    // A new daemon adopts the running router: no second router, the same pid.
    for (host, &router) in routers.iter().enumerate() {
        up_again(&site, host);
        let status = site.router_status(host);
        assert_eq!(u64_at(&status, "router", "pid"), Some(router), "{status}");
        assert_eq!(status["daemon"]["router_adopted"], true, "{status}");
        assert_eq!(status["daemon"]["containers_pushed"], 1, "{status}");
        // The new daemon does not know the number of the adopted router's table: it pushes the
        // whole table, not a delta.
        assert_eq!(status["daemon"]["table_pushes_full"], 1, "{status}");
        assert!(status["daemon"]["table_pushes_delta"].is_null(), "{status}");
    }
    one_echo(&site, "after the adoption");

    // The adopted router dies: the daemon sees it (not its child) and starts a new one.
    freeflow_os::signals::send_signal(routers[0] as i32, libc::SIGKILL).unwrap();
    let mut status = serde_json::Value::Null;
    let restarted = poll(LIMIT, Duration::from_millis(50), || {
        status = site.router_status(0);
        let pid = u64_at(&status, "router", "pid");
        (pid.is_some() && pid != Some(routers[0]) && status["daemon"]["containers_pushed"] == 1)
            .then_some(())
    });
    assert!(restarted.is_some(), "not restarted: {status}");
    assert!(
        status["daemon"]["last_exit"]
            .as_str()
            .is_some_and(|x| x.contains("not our child: status unknown")),
        "{status}"
    );
    assert_eq!(status["daemon"]["router_adopted"], false, "{status}");
    // A restarted router has no table: whole again.
    assert_eq!(status["daemon"]["table_pushes_full"], 2, "{status}");
    let new_router = u64_at(&status, "router", "pid").unwrap();
    one_echo(&site, "after the restart of the adopted router");

    for host in 0..2 {
        let out = site
            .in_host(host, &common::FREEFLOW)
            .args(["down", "--dir"])
            .arg(&site.dirs[host])
            .output()
            .unwrap();
        common::assert_success(&out, "freeflow down");
    }
    let _ = server.kill();
    let _ = server.wait();
    for pid in [new_router, routers[1]] {
        let stopped = poll(LIMIT, Duration::from_millis(20), || {
            (!alive(pid)).then_some(())
        });
        assert!(stopped.is_some(), "router {pid} still running after down");
    }
}
