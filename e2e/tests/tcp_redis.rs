//! TCP mode with a real server and real clients: redis-server in container db (host 1) and
//! redis-benchmark / redis-cli in containers web and cache (host 0), all with libfsocket.so
//! preloaded, on two simulated hosts with Freeflow up on both.
//! Needs root, a built workspace (`cargo build --workspace`: the shim and the router) and the
//! Debian packages redis-server and redis-tools (scripts/test.sh installs them).
//!
//! The Site scaffolding is in common/mod.rs.

mod common;

use common::{Site, SiteSpec};
use freeflow_testbed as topology;
use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DB_IP: &str = "10.32.0.4";
const REDIS_PORT: u16 = 6379;
/// Requests per benchmark test; four tests run.
const REQUESTS: u64 = 20_000;

impl Site {
    /// Two hosts; containers web and cache on host 0, db on host 1, all registered with
    /// Freeflow (tenant blue), Freeflow up on both hosts with a shared registry.
    fn new(prefix: &str) -> Site {
        common::require_programs(
            &["redis-server", "redis-benchmark", "redis-cli"],
            "redis-server redis-tools",
        );
        Site::create_tcp(SiteSpec {
            prefix,
            work_prefix: "ff-redis",
            hosts: 2,
            containers: &[
                (0, "web", [10, 32, 0, 2]),
                (0, "cache", [10, 32, 0, 3]),
                (1, "db", [10, 32, 0, 4]),
            ],
            registered: &[("web", "blue"), ("cache", "blue"), ("db", "blue")],
            ..SiteSpec::default()
        })
    }

    /// `program` in a container with the shim preloaded. FREEFLOW_DEBUG passes through from
    /// the test's environment.
    fn app(&self, container: &str, program: &str) -> Command {
        let mut cmd = self.shim_env(container, true);
        cmd.arg(program);
        cmd
    }

    /// redis-cli in a container through the shim, bounded in time, run to completion.
    fn redis_cli(&self, container: &str, args: &[&str]) -> Output {
        self.app(container, "timeout")
            .args([
                "20",
                "redis-cli",
                "-h",
                DB_IP,
                "-p",
                &REDIS_PORT.to_string(),
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ss -Htn[p] <filter>` in a namespace: one line per socket, no header.
    fn ss(&self, netns: &str, args: &[&str]) -> String {
        let out = topology::command_in(netns, "ss")
            .arg("-H")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ss {args:?} in {netns} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn host_ns(&self, host: usize) -> String {
        self.cluster().hosts()[host].netns.clone()
    }

    fn link(&self, host: usize, dev: &str) -> topology::LinkStats {
        topology::link_stats(&self.cluster().hosts()[host].netns, dev).unwrap()
    }
}

/// A long-lived child (redis-server, a connected redis-cli) killed when the guard goes, also
/// when the test panics: namespaces are deleted by Site's drop, but processes inside them would
/// live on. Declared after the Site, so it is dropped first.
struct Guard {
    child: Child,
    what: &'static str,
}

impl Guard {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        // SIGTERM first so redis-server exits through its own shutdown; SIGKILL if it has not
        // gone within 5 s.
        if common::terminate(&mut self.child, Duration::from_secs(5)) {
            return;
        }
        eprintln!("{} ignored SIGTERM; killing it", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sockets (from `ss -H` output with a state filter: Recv-Q Send-Q Local Peer [Process]) as
/// (local, peer, rest of the line).
fn sockets(ss: &str) -> Vec<(String, String, String)> {
    ss.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| (f[2].to_string(), f[3].to_string(), f[4..].join(" ")))
        })
        .collect()
}

/// Asserts that redis-cli printed `expected` (and nothing else but white space).
fn assert_reply(out: &Output, expected: &str) {
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        expected,
        "{}",
        text(out)
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn redis_server_and_clients_run_accelerated() {
    let site = Site::new("tr");
    let db_ns = site.cluster().container("db").unwrap().netns.clone();
    let web_ns = site.cluster().container("web").unwrap().netns.clone();
    let log_path = site.work.join("redis-server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let redis_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut server = Guard {
        child: site
            .app("db", "redis-server")
            .args(["--port", &REDIS_PORT.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--bind", "0.0.0.0"])
            .arg("--dir")
            .arg(&site.work)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start redis-server"),
        what: "redis-server",
    };

    // Ready once a PING through the shim answers. Until redis-server listens, the shim falls
    // back to the overlay and the connect is refused.
    let mut last = String::new();
    let ready = common::poll(Duration::from_secs(20), Duration::from_millis(50), || {
        let out = site.redis_cli("web", &["ping"]);
        last = text(&out);
        last.contains("PONG").then_some(())
    });
    assert!(
        ready.is_some(),
        "redis-server did not answer; last redis-cli ping:\n{last}\nserver log:\n{}",
        redis_log()
    );
    // That PING may have gone over the overlay (before host 0's router knew the listener):
    // the clients below must be accelerated.
    site.wait_listener_known(0, DB_IP, REDIS_PORT);

    // redis-server's listening socket is a host-network socket on host 1 (the router made it,
    // the shim put it under redis-server's fd), so `ss -p` in host 1 shows it owned by
    // redis-server's pid. (Whether the container also listens on the overlay is not checked:
    // serving non-accelerated clients would need an overlay listener too.)
    let listeners = site.ss(&site.host_ns(1), &["-tlnp"]);
    let owner = format!("pid={},", server.pid());
    let host_port: u16 = listeners
        .lines()
        .find(|l| l.contains(&owner))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|local| local.strip_prefix("192.168.1.2:"))
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no host-network listener of redis-server (pid {}) on 192.168.1.2 in host 1:\n{listeners}",
                server.pid()
            )
        });

    // Values round-trip: a short one, and 1 MiB (set from web through stdin with -x, read
    // back from cache), which crosses in many segments in each direction.
    let out = site.redis_cli("web", &["set", "k", "v"]);
    assert_reply(&out, "OK");
    let out = site.redis_cli("web", &["get", "k"]);
    assert_reply(&out, "v");
    let big: String = (0..1 << 20)
        .map(|i: u32| char::from(b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26))
        .collect();
    let big_file = site.work.join("big.txt");
    std::fs::write(&big_file, &big).unwrap();
    let out = site
        .app("web", "timeout")
        .args(["20", "redis-cli", "-h", DB_IP, "-x", "set", "big"])
        .stdin(std::fs::File::open(&big_file).unwrap())
        .output()
        .unwrap();
    assert_reply(&out, "OK");
    let out = site.redis_cli("cache", &["get", "big"]);
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.trim_end_matches('\n') == big,
        "1 MiB value came back as {} bytes: {}",
        got.len(),
        String::from_utf8_lossy(&out.stderr)
    );

    // The benchmark: the overlay would carry at least one VXLAN packet per request each way;
    // through Freeflow the bytes go over host sockets and VXLAN sees (almost) nothing.
    let vx_before = [site.link(0, "vx0"), site.link(1, "vx0")];
    let eth_before = site.link(0, "eth0");
    let started = Instant::now();
    let out = site
        .app("web", "timeout")
        .args(["120", "redis-benchmark", "-h", DB_IP, "-p"])
        .arg(REDIS_PORT.to_string())
        .args(["-n", &REQUESTS.to_string(), "-c", "10"])
        .args(["-t", "set,get,incr,lpush", "--csv"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let vx_after = [site.link(0, "vx0"), site.link(1, "vx0")];
    let eth_after = site.link(0, "eth0");
    assert!(
        out.status.success(),
        "redis-benchmark failed ({}):\n{}\nserver log:\n{}",
        out.status,
        text(&out),
        redis_log()
    );
    let csv = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("redis-benchmark through Freeflow ({elapsed:.1?}):\n{csv}");
    for test in ["SET", "GET", "INCR", "LPUSH"] {
        let rps: f64 = csv
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(',').map(|x| x.trim_matches('"')).collect();
                (f.first() == Some(&test)).then(|| f.get(1)?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no {test} rate in the benchmark output:\n{}", text(&out)));
        assert!(rps > 0.0, "{test}: {rps} requests/s\n{csv}");
    }
    let vx_packets: u64 = (0..2)
        .map(|h| {
            (vx_after[h].tx_packets - vx_before[h].tx_packets)
                + (vx_after[h].rx_packets - vx_before[h].rx_packets)
        })
        .sum();
    let eth_bytes =
        (eth_after.tx_bytes - eth_before.tx_bytes) + (eth_after.rx_bytes - eth_before.rx_bytes);
    let eth_packets = (eth_after.tx_packets - eth_before.tx_packets)
        + (eth_after.rx_packets - eth_before.rx_packets);
    println!(
        "during the benchmark: host 0 link {eth_packets} packets / {eth_bytes} bytes, \
         VXLAN (both hosts, both directions) {vx_packets} packets"
    );
    // 4 x 20000 requests, each at least one segment out and one back.
    assert!(
        eth_packets >= 4 * REQUESTS,
        "the benchmark's traffic did not cross host 0's link: {eth_packets} packets"
    );
    assert!(
        vx_packets < 50,
        "benchmark data went through VXLAN: {vx_packets} packets (link: {eth_packets})"
    );

    // A connection kept open: redis-cli pinging every 100 ms on one connection for up to 30 s.
    let mut holder = Guard {
        child: site
            .app("web", "redis-cli")
            .args(["-h", DB_IP, "-p", &REDIS_PORT.to_string()])
            .args(["-r", "300", "-i", "0.1", "ping"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        what: "redis-cli (holder)",
    };
    let (tx, rx) = mpsc::channel();
    let holder_out = holder.child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(holder_out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(10));
    assert_eq!(
        first.as_deref().map(str::trim),
        Ok("PONG"),
        "the holding redis-cli did not get a PONG"
    );

    // On host 1: established connections between redis-server's host port on 192.168.1.2 and
    // host 0's address, at least the holder's.
    let host1 = sockets(&site.ss(&site.host_ns(1), &["-tnp", "state", "established"]));
    let to_server: Vec<_> = host1
        .iter()
        .filter(|(local, _, _)| *local == format!("192.168.1.2:{host_port}"))
        .collect();
    assert!(
        !to_server.is_empty()
            && to_server
                .iter()
                .all(|(_, peer, proc)| peer.starts_with("192.168.1.1:") && proc.contains(&owner)),
        "host 1 has no redis-server connection on 192.168.1.2:{host_port} from 192.168.1.1:\n{host1:#?}"
    );
    // On host 0: the holder's socket, owned by redis-cli, to that host port.
    let holder_owner = format!("pid={},", holder.pid());
    let host0 = sockets(&site.ss(&site.host_ns(0), &["-tnp", "state", "established"]));
    assert!(
        host0
            .iter()
            .any(|(local, peer, proc)| local.starts_with("192.168.1.1:")
                && *peer == format!("192.168.1.2:{host_port}")
                && proc.contains(&holder_owner)),
        "the holding redis-cli (pid {}) has no host-network connection on host 0:\n{host0:#?}",
        holder.pid()
    );
    // Neither container has an overlay connection.
    for ns in [&db_ns, &web_ns] {
        let overlay = site.ss(ns, &["-tn", "state", "established"]);
        assert!(
            overlay.trim().is_empty(),
            "overlay connections in {ns}:\n{overlay}"
        );
    }

    // Applications see overlay addresses: redis-server lists the holder (web) and the asking
    // client (cache) by their overlay addresses, on its overlay address and port.
    let out = site.redis_cli("cache", &["client", "list"]);
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("CLIENT LIST:\n{list}");
    let field = |line: &str, key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .map(str::to_string)
    };
    let addrs: Vec<String> = list.lines().filter_map(|l| field(l, "addr=")).collect();
    assert!(
        addrs.iter().any(|a| a.starts_with("10.32.0.2:"))
            && addrs.iter().any(|a| a.starts_with("10.32.0.3:")),
        "CLIENT LIST does not show web's and cache's overlay addresses:\n{}",
        text(&out)
    );
    for line in list.lines() {
        assert_eq!(
            field(line, "laddr=").as_deref(),
            Some(format!("{DB_IP}:{REDIS_PORT}").as_str()),
            "redis-server's side of a connection is not its overlay address: {line}"
        );
        let addr = field(line, "addr=").unwrap_or_default();
        assert!(
            addr.starts_with("10.32.0.2:") || addr.starts_with("10.32.0.3:"),
            "a client shows up by a non-overlay address: {line}"
        );
    }
    holder.stop();

    let status = site.router_status(0);
    println!("host 0 router: {}", status["router"]);
    // redis-server must still be running: nothing above may have crashed it.
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "redis-server exited:\n{}",
        redis_log()
    );
    server.stop();
}
