//! TCP mode, many threads of one process setting up connections at once: they share the
//! process's one router connection, several requests outstanding on it together; each thread
//! must get its own reply and its own socket. Needs root and a built workspace.

mod common;

use common::{spawn_reading_first_line, terminate, Site, SiteSpec};
use std::process::Stdio;
use std::time::Duration;

/// A server that echoes on every connection it accepts, each in a thread.
const THREADED_ECHO: &str = include_str!("programs/tcp_threaded_echo.py");
/// Threads connecting at once, each checking its own payload.
const CONCURRENT_CONNECTS: &str = include_str!("programs/tcp_concurrent_connects.py");

const THREADS: u64 = 50;

#[test]
fn many_threads_of_one_process_connect_at_once() {
    let site = Site::create_tcp(SiteSpec {
        prefix: "tk",
        work_prefix: "ff-tcpk",
        hosts: 2,
        containers: &[(0, "web", [10, 32, 0, 2]), (1, "db", [10, 32, 0, 4])],
        registered: &[("web", "blue"), ("db", "blue")],
        ..SiteSpec::default()
    });
    let mut server_cmd = site.shim_env("db", true);
    server_cmd.args(["timeout", "120", "python3", "-c", THREADED_ECHO]);
    let (mut server, _, line) = spawn_reading_first_line(server_cmd.stderr(Stdio::null()));
    assert!(line.starts_with("LISTENING"), "{line:?}");
    site.wait_listening("db", 6100, Some(&mut server));
    // The listener known on the client's host (announced between routers).
    std::thread::sleep(Duration::from_millis(300));

    let connects_before = site.router_counter(0, "tcp_connects");
    let mut client = site.shim_env("web", true);
    // The shim says when a request went unanswered or the session broke.
    client.env("FREEFLOW_DEBUG", "1");
    client.args(["timeout", "60", "python3", "-c", CONCURRENT_CONNECTS]);
    client.args(["10.32.0.4", "6100", &THREADS.to_string()]);
    let out = client.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    terminate(&mut server, Duration::from_secs(2));

    assert!(
        stdout.contains(&format!("CONCURRENT_OK {THREADS}")),
        "client ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for gave_up in ["did not answer", "router unavailable", "not accelerated"] {
        assert!(!stderr.contains(gave_up), "{gave_up}:\n{stderr}");
    }
    // Every connection was set up by the router (on the host link), none fell back to the
    // overlay because a reply went missing or came too late.
    let connects = site.router_counter(0, "tcp_connects") - connects_before;
    let fallbacks = site.router_counter(0, "tcp_fallbacks");
    assert!(
        connects >= THREADS && fallbacks == 0,
        "accelerated connects {connects} of {THREADS}, fallbacks {fallbacks}\n{stderr}"
    );
}
