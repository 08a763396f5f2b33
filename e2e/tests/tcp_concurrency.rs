//! TCP mode, many threads of one process setting up connections at once: they share the
//! process's one router connection, several requests outstanding on it together; each thread
//! must get its own reply and its own socket, also when replies outrun the process's reader,
//! when the router dies under them and when the process forks meanwhile. Needs root and a
//! built workspace.

mod common;

use common::{spawn_reading_first_line, terminate, Site, SiteSpec};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Stdio};
use std::time::Duration;

/// A server that echoes on every connection it accepts, each in a thread.
const THREADED_ECHO: &str = include_str!("programs/tcp_threaded_echo.py");
/// Threads connecting at once, each checking its own payload.
const CONCURRENT_CONNECTS: &str = include_str!("programs/tcp_concurrent_connects.py");
/// Connect requests sent on one attachment without reading the replies, then read.
const UNREAD_REPLIES: &str = include_str!("programs/tcp_unread_replies.py");
/// Threads with connects outstanding while the router is stopped, killed, or the process forks.
const CONNECTS_OUTSTANDING: &str = include_str!("programs/tcp_connects_outstanding.py");

/// More threads than the shim has requests outstanding on its session (256): the rest wait
/// for a slot.
const THREADS: u64 = 320;

/// Two hosts, web (host 0) and db (host 1) of one tenant, and a threaded echo server on db's
/// port 6100 under the shim, its listener known on host 0.
fn site_with_echo_server(prefix: &str) -> (Site, Child) {
    let site = Site::create_tcp(SiteSpec {
        prefix,
        work_prefix: "ff-tcpk",
        hosts: 2,
        containers: &[(0, "web", [10, 32, 0, 2]), (1, "db", [10, 32, 0, 4])],
        registered: &[("web", "blue"), ("db", "blue")],
        ..SiteSpec::default()
    });
    let mut server_cmd = site.shim_env("db", true);
    // Its accept queue holds every client of a test at once: a connect whose SYN found it full
    // would wait out TCP's retransmits (1, 3, 7, 15 s), which is not what is tested here.
    let echo = THREADED_ECHO.replace("s.listen(8)", "s.listen(512)");
    assert_ne!(echo, THREADED_ECHO);
    server_cmd.args(["timeout", "120", "python3", "-c", &echo]);
    let (mut server, _, line) = spawn_reading_first_line(server_cmd.stderr(Stdio::null()));
    assert!(line.starts_with("LISTENING"), "{line:?}");
    site.wait_listening("db", 6100, Some(&mut server));
    // The listener known on the client's host (announced between routers).
    site.wait_listener_known(0, "10.32.0.4", 6100);
    (site, server)
}

#[test]
fn many_threads_of_one_process_connect_at_once() {
    threads_connect_at_once("tk", &[]);
}

/// As [`many_threads_of_one_process_connect_at_once`], with a signal every half millisecond
/// interrupting the threads' waits for the router (EINTR): each wait goes on, none gives up.
#[test]
fn threads_connecting_at_once_under_a_storm_of_signals() {
    threads_connect_at_once("ts", &["0.0005"]);
}

/// `THREADS` threads of one process in web connect to db's echo server at once (the program's
/// `extra` arguments added): each gets its own connection, all accelerated.
fn threads_connect_at_once(prefix: &str, extra: &[&str]) {
    let (site, mut server) = site_with_echo_server(prefix);
    let connects_before = site.router_counter(0, "tcp_connects");
    let mut client = site.shim_env("web", true);
    // The shim says when a request went unanswered or the session broke.
    client.env("FREEFLOW_DEBUG", "1");
    client.args(["timeout", "60", "python3", "-c", CONCURRENT_CONNECTS]);
    client.args(["10.32.0.4", "6100", &THREADS.to_string()]);
    client.args(extra);
    let out = client.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    terminate(&mut server, Duration::from_secs(2));

    assert!(
        stdout.contains(&format!("CONCURRENT_OK {THREADS}")),
        "client ({}):\n{stdout}\n{stderr}",
        out.status
    );
    if !extra.is_empty() {
        assert!(!stdout.contains("ALARMS 0\n"), "no signal came: {stdout}");
    }
    for gave_up in [
        "did not answer",
        "router unavailable",
        "not accelerated",
        "no room",
    ] {
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

/// Replies the router cannot send at once (the process reads them more slowly than they come)
/// wait in the router until the process reads: none is lost, the attachment is not dropped.
/// (It was: more than a socket buffer of unread replies, about 270, cost the process its
/// attachment, and every thread of it fell back to the overlay at once.)
#[test]
fn replies_the_process_has_not_read_yet_wait_for_it() {
    const REQUESTS: usize = 400;
    let (site, mut server) = site_with_echo_server("tu");
    let sock = site.dirs[0].join("router.sock");
    let mut client = site.shim_env("web", false);
    client.args(["timeout", "60", "python3", "-c", UNREAD_REPLIES]);
    client
        .arg(&sock)
        .args(["10.32.0.4", "6100", &REQUESTS.to_string()]);
    let out = client.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    terminate(&mut server, Duration::from_secs(2));
    let expected = format!("REPLIES {REQUESTS} OK {REQUESTS} DISTINCT {REQUESTS}");
    assert!(
        stdout.contains(&expected),
        "{stdout}\n{}\nrouter log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        site.router_log()
    );
    assert!(!site.router_log().contains("reply failed"));
}

/// The pid of host `host`'s router, from its pid file.
/// The router serves every container's connection setup on its control thread, which must
/// not wait behind the host's other work for CPU: it runs at nice -10, its shards do not, and
/// where the kernel groups CPU time by session (autogroups) the router's session group, which
/// it leads, is at -10 too.
#[test]
fn the_routers_setup_thread_runs_at_a_higher_priority() {
    let (site, mut server) = site_with_echo_server("tn");
    terminate(&mut server, Duration::from_secs(2));
    let pid = router_pid(&site, 0);
    // The nice value is field 19 of a thread's stat, the 17th after the command's ')'.
    let nice_of = |stat: &str| -> i32 {
        let fields = &stat[stat.rfind(')').expect("stat has a command") + 2..];
        fields.split(' ').nth(16).unwrap().parse().unwrap()
    };
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let mut shards = 0;
    for task in tasks {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let expected = match comm.trim() {
            "freeflow-router" => -10,
            c if c.starts_with("ff-shard-") => {
                shards += 1;
                0
            }
            _ => continue,
        };
        assert_eq!(nice_of(&stat), expected, "{}: {stat}", comm.trim());
    }
    assert!(shards > 0, "no shard thread in router {pid}");
    let autogroups = std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
        .is_ok_and(|v| v.trim() == "1");
    let group = std::fs::read_to_string(format!("/proc/{pid}/autogroup")).unwrap_or_default();
    // Without autogroups there is no session group to weigh (the file says nothing useful).
    if autogroups {
        assert!(group.trim_end().ends_with("nice -10"), "{group}");
    }
}

fn router_pid(site: &Site, host: usize) -> i32 {
    let text = std::fs::read_to_string(site.state_dir(host).join("router.pid")).unwrap();
    text.trim().parse().unwrap()
}

fn signal(pid: i32, sig: libc::c_int) {
    freeflow_os::signals::send_signal(pid, sig).unwrap();
}

/// Starts the outstanding-connects program in web with the shim (`threads` threads, `mode`)
/// and waits until it has attached.
fn start_outstanding(site: &Site, threads: u64, mode: &str) -> (Child, BufReader<ChildStdout>) {
    let mut cmd = site.shim_env("web", true);
    cmd.env("FREEFLOW_DEBUG", "1")
        // Long enough that nothing here ends by the timeout: only the router's death or its
        // answers end the waits.
        .env("FREEFLOW_ROUTER_TIMEOUT_MS", "20000")
        .args(["timeout", "60", "python3", "-c", CONNECTS_OUTSTANDING])
        .args(["10.32.0.4", "6100", &threads.to_string(), mode])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped());
    let (child, stdout, line) = spawn_reading_first_line(&mut cmd);
    assert_eq!(line.trim(), "ATTACHED ok");
    (child, stdout)
}

/// Reads lines until one starts with `prefix`; all lines read.
fn read_until(out: &mut BufReader<ChildStdout>, prefix: &str) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("program ended before {prefix:?}: {lines:?}");
        }
        let done = line.starts_with(prefix);
        lines.push(line.trim().to_string());
        if done {
            return lines;
        }
    }
}

/// The router dies (SIGKILL) while threads wait for its answers: every thread is woken at once
/// (not at the timeout, which is long here) and connects over the overlay, as without
/// Freeflow; none hangs. (Not every one of those connections succeeds: the relay that serves
/// clients without Freeflow times some out when 40 arrive at once, with or without the shim;
/// that is the relay's business, not this test's.)
#[test]
fn threads_waiting_on_a_router_that_dies_take_the_normal_path() {
    const WAITERS: u64 = 40;
    let (site, mut server) = site_with_echo_server("tz");
    let (mut client, mut out) = start_outstanding(&site, WAITERS, "wait");
    let router = router_pid(&site, 0);
    signal(router, libc::SIGSTOP);
    client.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    read_until(&mut out, "STARTED");
    // The requests are sent; the router, stopped, reads none.
    std::thread::sleep(Duration::from_millis(500));
    signal(router, libc::SIGKILL);
    let mut lines = read_until(&mut out, "DONE");
    lines.extend(out.lines().map_while(Result::ok));
    terminate(&mut client, Duration::from_secs(5));
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(client.stderr.as_mut().unwrap(), &mut stderr);
    terminate(&mut server, Duration::from_secs(2));
    let done = format!("DONE {WAITERS} OK");
    assert!(
        lines.iter().any(|l| l.starts_with(&done)) && !lines.iter().any(|l| l.starts_with("HUNG")),
        "{lines:?}\n{stderr}"
    );
    assert!(stderr.contains("router unavailable"), "{stderr}");
    assert!(!stderr.contains("did not answer"), "{stderr}");
}

/// The process forks while its threads have requests outstanding: the parent's threads get
/// their answers, the child attaches anew and connects.
#[test]
fn a_fork_while_requests_are_outstanding_leaves_both_processes_working() {
    const WAITERS: u64 = 20;
    let (site, mut server) = site_with_echo_server("tf");
    let (mut client, mut out) = start_outstanding(&site, WAITERS, "fork");
    let router = router_pid(&site, 0);
    signal(router, libc::SIGSTOP);
    client.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let forked = read_until(&mut out, "FORKED");
    signal(router, libc::SIGCONT);
    let mut lines = read_until(&mut out, "CHILD");
    lines.splice(0..0, forked);
    terminate(&mut client, Duration::from_secs(5));
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(client.stderr.as_mut().unwrap(), &mut stderr);
    terminate(&mut server, Duration::from_secs(2));
    assert!(
        lines.contains(&format!("DONE {WAITERS} OK {WAITERS}")),
        "{lines:?}\n{stderr}"
    );
    assert!(
        lines.contains(&"CHILD 0".to_string()),
        "{lines:?}\n{stderr}"
    );
    for gave_up in ["did not answer", "router unavailable"] {
        assert!(!stderr.contains(gave_up), "{gave_up}:\n{stderr}");
    }
}
