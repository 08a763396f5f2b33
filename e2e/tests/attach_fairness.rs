//! Attach fairness (hardening issue, findings 3 and 8): processes of one registered container and
//! of an unregistered namespace hold hundreds of silent connections to `router.sock` (never a
//! hello, each one replaced as soon as the router drops it), and meanwhile another container
//! attaches as before: 10 unmodified `ibv_devices` (RDMA mode) find their device and 10 Python
//! clients through `libfsocket.so` get accelerated connections (the router's `tcp_connects`
//! counter). The flood fills only its own sources' shares of the router's pending handshakes.
//! The router's log stays bounded under the flood: repeated lines are rate-limited.
//! Needs root, a built workspace, python3 and ibverbs-utils.
//!
//! The Site scaffolding is in common/mod.rs.

mod common;

use common::{describe, spawn_reading_first_line, Site, SiteSpec};
use std::io::{BufReader, Read};
use std::process::{Child, ChildStdout, Stdio};
use std::time::{Duration, Instant};

/// Holds N silent connections to the attach socket, replacing each one the router drops.
const FLOOD: &str = include_str!("programs/attach_flood.py");
const SERVER: &str = include_str!("programs/tcp_echo_server.py");
const CLIENT: &str = include_str!("programs/tcp_echo_client.py");

/// Connections each flooding process holds: more than the 256 handshakes the router used to
/// allow in progress in all.
const FLOOD_CONNECTIONS: usize = 300;
/// Attaches of each kind the victim makes per round.
const ATTACHES: usize = 10;
const ECHO_PORT: u16 = 5000;

/// One host: web (the victim) and db (its echo server) of tenant blue, flood of tenant red,
/// all registered; stranger not registered.
fn site() -> Site {
    common::require_programs(&["ibv_devices"], "ibverbs-utils");
    common::require_programs(&["python3"], "python3");
    Site::create_verbs(SiteSpec {
        prefix: "af",
        work_prefix: "ff-fair",
        hosts: 1,
        containers: &[
            (0, "web", [10, 32, 0, 2]),
            (0, "db", [10, 32, 0, 3]),
            (0, "flood", [10, 32, 0, 4]),
            (0, "stranger", [10, 32, 0, 5]),
        ],
        registered: &[("web", "blue"), ("db", "blue"), ("flood", "red")],
        verbs_timeout: 30,
        ..SiteSpec::default()
    })
}

/// A flooding process in `container`, holding [`FLOOD_CONNECTIONS`] connections.
struct Flood {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Flood {
    fn start(site: &Site, container: &str) -> Flood {
        let socket = site.dirs[0].join("router.sock");
        let (child, stdout, line) = spawn_reading_first_line(
            site.shim_env(container, false)
                .args(["timeout", "-s", "KILL", "180", "python3", "-c", FLOOD])
                .arg(&socket)
                .arg(FLOOD_CONNECTIONS.to_string())
                .stdin(Stdio::piped()),
        );
        assert_eq!(
            line.trim(),
            format!("HOLDING {FLOOD_CONNECTIONS}"),
            "the flood in {container} did not start"
        );
        Flood { child, stdout }
    }

    /// Stops the flood; how many connections it replaced (the router dropped) meanwhile.
    fn stop(mut self) -> String {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        let _ = self.child.wait();
        rest.trim().to_string()
    }
}

/// What one round of the victim's attaches gave.
#[derive(Default)]
struct Round {
    rdma: Vec<Duration>,
    socket: Vec<Duration>,
    failures: Vec<String>,
}

impl Round {
    fn summary(&self, name: &str) -> String {
        fn ms(times: &[Duration]) -> String {
            let mut sorted: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            sorted.sort_by(f64::total_cmp);
            match (sorted.get(sorted.len() / 2), sorted.last()) {
                (Some(median), Some(max)) => format!("median {median:.1} ms, max {max:.1} ms"),
                _ => "none".into(),
            }
        }
        format!(
            "{name}: ibv_devices {}; socket-shim client {}",
            ms(&self.rdma),
            ms(&self.socket)
        )
    }
}

/// [`ATTACHES`] runs of `ibv_devices` in web, then as many accelerated echo clients from web to
/// db's server; every one must attach (checked by what it printed and the router's counters).
fn victim_round(site: &Site) -> Round {
    let mut round = Round::default();
    for i in 0..ATTACHES {
        let started = Instant::now();
        let out = site.run_verbs_app("web", "ibv_devices", &[]);
        round.rdma.push(started.elapsed());
        if !(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ffv0")) {
            round
                .failures
                .push(format!("ibv_devices #{i}: {}", describe(&out)));
        }
    }
    let connects_before = site.router_counter(0, "tcp_connects");
    for i in 0..ATTACHES {
        let started = Instant::now();
        let out = site
            .shim_env("web", true)
            .args(["timeout", "-s", "KILL", "60", "python3", "-c", CLIENT])
            .args(["10.32.0.3", &ECHO_PORT.to_string(), "4096", "blocking"])
            .output()
            .unwrap();
        round.socket.push(started.elapsed());
        if !(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ECHO_OK")) {
            round
                .failures
                .push(format!("echo client #{i}: {}", describe(&out)));
        }
    }
    let accelerated = site.router_counter(0, "tcp_connects") - connects_before;
    if accelerated < ATTACHES as u64 {
        round.failures.push(format!(
            "only {accelerated} of {ATTACHES} socket-shim clients were accelerated \
             (the others fell back to the overlay)"
        ));
    }
    round
}

/// The lines of the router's log that report refused or dropped attach connections.
fn refusal_lines(site: &Site) -> usize {
    site.router_log()
        .lines()
        .filter(|l| l.contains("refused attach") || l.contains("sent no hello"))
        .count()
}

#[test]
fn a_flood_of_silent_connections_does_not_block_another_containers_attach() {
    let site = site();
    // db's accelerated echo server, for both rounds' clients.
    let (mut server, mut server_out, line) = spawn_reading_first_line(
        site.shim_env("db", true)
            .args(["timeout", "-s", "KILL", "240", "python3", "-c", SERVER])
            .args([&(2 * ATTACHES).to_string(), &ECHO_PORT.to_string(), "4"])
            .stderr(Stdio::piped()),
    );
    assert!(line.starts_with("LISTENING"), "server: {line:?}");

    let quiet = victim_round(&site);
    assert!(
        quiet.failures.is_empty(),
        "without a flood: {:#?}\n--- router log\n{}",
        quiet.failures,
        site.router_log()
    );

    let log_before = refusal_lines(&site);
    let flood_started = Instant::now();
    let floods = [
        Flood::start(&site, "flood"),
        Flood::start(&site, "stranger"),
    ];
    // Let the floods fill whatever they can fill.
    std::thread::sleep(Duration::from_millis(500));
    let flooded = victim_round(&site);
    let flood_time = flood_started.elapsed();
    let replaced: Vec<String> = floods.into_iter().map(Flood::stop).collect();
    let refusals = refusal_lines(&site) - log_before;

    eprintln!("{}", quiet.summary("without a flood"));
    eprintln!("{}", flooded.summary("during the flood"));
    eprintln!(
        "floods (registered, unregistered): {replaced:?} over {:.1} s; {refusals} refusal lines logged",
        flood_time.as_secs_f64()
    );
    assert!(
        flooded.failures.is_empty(),
        "during the flood: {:#?}\n--- router log (tail)\n{}",
        flooded.failures,
        tail(&site.router_log(), 40)
    );
    // Finding 8: the refusals are rate-limited. At most 20 lines per source and call site
    // per 10 s window; two sources, three call sites (refused, evicted, expired) is a generous
    // bound per window.
    let windows = flood_time.as_secs() / 10 + 2;
    assert!(
        refusals as u64 <= 6 * 20 * windows,
        "{refusals} refusal lines in {:.1} s\n{}",
        flood_time.as_secs_f64(),
        tail(&site.router_log(), 40)
    );

    let mut rest = String::new();
    let _ = server_out.read_to_string(&mut rest);
    let _ = server.wait();
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
