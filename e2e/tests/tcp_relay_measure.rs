//! A measurement, not a check (ignored; run by hand, on a release build): an unmodified nginx
//! (daemon on, two workers, default events) on one simulated host, served to a plain client
//! (`ab`, a new connection per request) in a container of the other host, through the relay
//! (nginx under the shim) and over the plain overlay (the same configuration without the
//! shim), at 10, 50 and 400 connections; with the server host's router CPU (utime + stime)
//! and wake-ups (voluntary context switches of all its threads) per request.
//! `cargo test --release -p freeflow-e2e --test tcp_relay_measure -- --ignored --nocapture`
//! (`FF_MEASURE_SECONDS`, default 4). Needs root, nginx and ab (apache2-utils).

mod common;

use common::{Site, SiteSpec};
use std::path::{Path, PathBuf};
use std::time::Duration;

const DB_IP: &str = "10.32.0.4";

fn nginx_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nworker_processes 2;\n\
         events {{ worker_connections 2048; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen {port};\n\
         location / {{ return 200 \"nginx saw $remote_addr\\n\"; }}\n  }}\n}}\n"
    )
}

struct Nginx(PathBuf);

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.0.join("nginx.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = freeflow_os::signals::send_signal(pid, libc::SIGTERM);
            std::thread::sleep(Duration::from_millis(500));
            let _ = freeflow_os::signals::send_signal(pid, libc::SIGKILL);
        }
    }
}

fn start_nginx(site: &Site, name: &str, port: u16, shim: bool) -> Nginx {
    let dir = site.work.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&dir, port)).unwrap();
    let out = site
        .shim_env("db", shim)
        .args(["timeout", "30", "nginx", "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    common::assert_success(&out, "nginx");
    site.wait_listening("db", port, None);
    Nginx(dir)
}

/// CPU time (µs) and voluntary context switches (all threads) of process `pid`.
fn cpu_and_wakeups(pid: i32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after the command's ')'.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        switches += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    (ticks * 1_000_000 / hz, switches)
}

/// The figure after `label` in ab's report.
fn ab_figure(report: &str, label: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
#[ignore = "a measurement, run by hand on a release build"]
fn measure_nginx_through_the_relay_and_over_the_overlay() {
    common::require_programs(&["nginx", "ab"], "nginx apache2-utils");
    let seconds: u64 = std::env::var("FF_MEASURE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let site = Site::create_tcp(SiteSpec {
        prefix: "rm",
        work_prefix: "ff-relay-measure",
        hosts: 2,
        containers: &[(0, "web", [10, 32, 0, 2]), (1, "db", [10, 32, 0, 4])],
        registered: &[("web", "blue"), ("db", "blue")],
        ..SiteSpec::default()
    });
    let _relayed = start_nginx(&site, "relay", 80, true);
    let _plain = start_nginx(&site, "overlay", 8080, false);
    // Past the daemonizing parent's orphan grace: the workers hold the listener.
    std::thread::sleep(Duration::from_millis(2500));
    let router: i32 = std::fs::read_to_string(site.state_dir(1).join("router.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for concurrency in [10, 50, 400] {
        for (path, port) in [("relay", 80), ("overlay", 8080)] {
            let (cpu0, wake0) = cpu_and_wakeups(router);
            let relayed0 = site.router_counter(1, "tcp_relayed");
            let out = site
                .shim_env("web", false)
                .args(["timeout", "120", "ab", "-r", "-s", "20", "-n", "10000000"])
                .args(["-t", &seconds.to_string(), "-c", &concurrency.to_string()])
                .arg(format!("http://{DB_IP}:{port}/"))
                .output()
                .unwrap();
            let (cpu1, wake1) = cpu_and_wakeups(router);
            let rung = site.router_counter(1, "tcp_relayed") - relayed0;
            let report = String::from_utf8_lossy(&out.stdout);
            let done = ab_figure(&report, "Complete requests:");
            let failed = ab_figure(&report, "Failed requests:");
            let rate = ab_figure(&report, "Requests per second:");
            println!(
                "MEASURE {path} c={concurrency} rps={rate:.0} complete={done} failed={failed} \
                 router_cpu_us_per_req={:.1} router_wakeups_per_req={:.3} doorbells={rung} \
                 load={}",
                (cpu1 - cpu0) as f64 / done,
                (wake1 - wake0) as f64 / done,
                std::fs::read_to_string("/proc/loadavg")
                    .unwrap_or_default()
                    .split_whitespace()
                    .next()
                    .unwrap_or("?")
            );
            if !out.status.success() {
                println!("ab: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
}
