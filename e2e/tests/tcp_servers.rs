//! TCP mode under the listener shapes real servers use (issue 11, sections 1 and 2), on two
//! simulated hosts: a v6-only listener beside an AF_INET one on the same port (PostgreSQL's
//! `listen_addresses='*'`), a server that listens, forks and lets its parent exit (nginx's
//! `daemon on`), a dual-stack `[::]` listener, and what getsockname says of wildcard listeners.
//! Each is served to a client with the shim (accelerated) and to one without it (relayed).
//! Python reproductions, then the real servers: nginx and PostgreSQL, unmodified.
//! Needs root, a built workspace, and nginx, postgresql, curl (scripts/test.sh installs them).

mod common;

use common::{poll, spawn_reading_first_line, Site, SiteSpec, VNET};
use freeflow_testbed as topology;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const SERVER: &str = include_str!("programs/tcp_servers_server.py");
const CLIENT: &str = include_str!("programs/tcp_servers_client.py");
const DB_IP: &str = "10.32.0.4";

impl Site {
    /// Two hosts; web on host 0 and db on host 1 (registered, tenant blue), plain on host 1 (a
    /// container Freeflow does not know: its clients come without Freeflow).
    fn new(prefix: &str) -> Site {
        Site::create_tcp(SiteSpec {
            prefix,
            work_prefix: "ff-servers",
            hosts: 2,
            containers: &[
                (0, "web", [10, 32, 0, 2]),
                (1, "db", [10, 32, 0, 4]),
                (1, "plain", [10, 32, 0, 5]),
            ],
            registered: &[("web", "blue"), ("db", "blue")],
            ..SiteSpec::default()
        })
    }

    /// `program ARGS` in `container` as user `user`, with the shim preloaded, bounded by
    /// `timeout 60`.
    fn as_user_with_shim(&self, container: &str, user: &str, program: &str) -> Command {
        let c = self.cluster().container(container).unwrap();
        let mut cmd = topology::command_in(&c.netns, "runuser");
        cmd.args(["-u", user, "--", "env"])
            .arg(format!("FREEFLOW_DIR={}", self.dirs[c.host].display()))
            .arg(format!("VNET_PREFIX={VNET}"))
            .arg(format!("LD_PRELOAD={}", common::shim().display()))
            .args(["timeout", "60", program]);
        cmd
    }

    /// Runs a client program in `container` (with the shim if `preload`); its stdout, which
    /// must be a success.
    fn client(&self, container: &str, preload: bool, program: &[&str]) -> String {
        let out = self
            .shim_env(container, preload)
            .args(["timeout", "30"])
            .args(program)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program:?} in {container} (shim: {preload}): {}\n--- router log\n{}",
            common::describe(&out),
            self.router_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The Python client to db's `port`.
    fn python_client(&self, container: &str, preload: bool, port: u16) -> String {
        let port = port.to_string();
        self.client(container, preload, &["python3", "-c", CLIENT, DB_IP, &port])
    }

    /// Connects accelerated by host 0's router (web's). (A plain client of an accelerated
    /// server is relayed either by db's router's doorbell or, where the server's shim sees it
    /// wait, by the shim itself, which the router does not count: the tests check that it is
    /// served, with its own address.)
    fn connects(&self) -> u64 {
        self.router_counter(0, "tcp_connects")
    }
}

/// Processes to kill when a test ends, however it ends: the servers daemonize, so they are not
/// children of the test. Each is sent SIGKILL with the processes it forked.
struct Reaper(Vec<i32>);

impl Reaper {
    fn add(&mut self, pid: i32) {
        self.0.push(pid);
    }

    /// The pid in the first line of `file`, if there is one yet.
    fn add_from_file(&mut self, file: &Path) {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if let Some(pid) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
            self.add(pid);
        }
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The fields after the command's closing parenthesis: state, then the parent's pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            for child in children_of(pid) {
                let _ = freeflow_os::signals::send_signal(child, libc::SIGKILL);
            }
            let _ = freeflow_os::signals::send_signal(pid, libc::SIGKILL);
        }
    }
}

/// The Python server in db with the shim: `layout` (pair, dual, v4), daemonizing or not, for
/// `connections` clients. Returns the process started, its LISTENING line and a reaper for it
/// (and for the daemon it may have become).
fn start_python_server(
    site: &Site,
    port: u16,
    layout: &str,
    daemon: bool,
    connections: usize,
) -> (Child, String, Reaper) {
    let (child, mut rest, line) = spawn_reading_first_line(
        site.shim_env("db", true)
            .args(["timeout", "60", "python3", "-c", SERVER])
            .args([
                port.to_string().as_str(),
                layout,
                if daemon { "1" } else { "0" },
            ])
            .arg(connections.to_string())
            .stderr(Stdio::piped()),
    );
    let mut reaper = Reaper(vec![child.id() as i32]);
    assert!(
        line.starts_with("LISTENING"),
        "server did not start: {line:?}"
    );
    if let Some(pid) = line.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
        reaper.add(pid);
    }
    std::thread::spawn(move || {
        let mut all = String::new();
        let _ = rest.read_to_string(&mut all);
    });
    // Both routers know the listener (tables travel to peers right after the listen).
    site.wait_listener_known(0, DB_IP, port);
    (child, line, reaper)
}

/// Waits (10 s at most) for `child` to exit.
fn wait_exit(child: &mut Child) {
    let exited = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        child.try_wait().unwrap()
    });
    assert!(exited.is_some(), "the server did not finish");
}

/// Issue 11, section 1, and the getsockname half of section 2: PostgreSQL's layout, 0.0.0.0:P
/// and then [::]:P with IPV6_V6ONLY=1. An IPv4 client, with the shim or without, arrives on the
/// AF_INET listener (the v6-only one is the kernel's alone); a dual-stack [::] listener serves
/// both kinds of client with v4-mapped addresses; wildcard listeners are named as the kernel
/// names them.
#[test]
fn v6_only_and_dual_stack_listeners_serve_ipv4_clients_as_the_kernel_would() {
    let site = Site::new("sv");
    let (mut server, line, _reaper) = start_python_server(&site, 7000, "pair", false, 2);
    let connects = site.connects();
    let out = site.python_client("web", true, 7000);
    assert!(
        out.contains("ARRIVED inet ('10.32.0.2',") && out.contains("CLIENT 10.32.0.2"),
        "a shim client's connection arrives on the AF_INET listener: {out}"
    );
    assert_eq!(site.connects(), connects + 1, "accelerated");
    let out = site.python_client("plain", false, 7000);
    assert!(
        out.contains("ARRIVED inet ('10.32.0.5',"),
        "a plain client's connection arrives on the AF_INET listener: {out}"
    );
    wait_exit(&mut server);
    assert!(
        line.contains("('0.0.0.0', 7000) ('::', 7000, 0, 0)"),
        "getsockname of the wildcard listeners: {line}"
    );

    let (mut server, line, _reaper) = start_python_server(&site, 7001, "dual", false, 2);
    let connects = site.connects();
    let out = site.python_client("web", true, 7001);
    assert!(
        out.contains("ARRIVED inet6 ('::ffff:10.32.0.2',")
            && out.contains("('::ffff:10.32.0.4', 7001, 0, 0)"),
        "v4-mapped addresses on the dual-stack listener: {out}"
    );
    assert_eq!(site.connects(), connects + 1, "accelerated");
    let out = site.python_client("plain", false, 7001);
    assert!(
        out.contains("ARRIVED inet6 ('::ffff:10.32.0.5',")
            && out.contains("('::ffff:10.32.0.4', 7001, 0, 0)"),
        "a plain client on the dual-stack listener: {out}"
    );
    wait_exit(&mut server);
    assert!(line.contains("('::', 7001, 0, 0)"), "getsockname: {line}");
    let log = site.router_log();
    assert!(!log.contains("unusable overlay listener"), "{log}");
}

/// Issue 11, section 2: a classic daemon (listen, fork, the parent exits at once; the middle
/// process, after setsid, forks and exits too; the grandchild serves). Past the router's grace for a
/// listener without holders, both kinds of client are served.
#[test]
fn a_daemonizing_server_serves_clients_with_and_without_freeflow() {
    let site = Site::new("sd");
    let (_, line, _reaper) = start_python_server(&site, 7002, "v4", true, 2);
    // Longer than the router keeps a listener whose holders all left.
    std::thread::sleep(Duration::from_millis(2500));
    let connects = site.connects();
    let out = site.python_client("web", true, 7002);
    assert!(out.contains("ARRIVED inet ('10.32.0.2',"), "{out}");
    assert_eq!(site.connects(), connects + 1, "accelerated");
    let out = site.python_client("plain", false, 7002);
    assert!(out.contains("ARRIVED inet ('10.32.0.5',"), "{out}");
    assert!(line.contains("('0.0.0.0', 7002)"), "getsockname: {line}");
}

/// nginx's configuration, the default shape (daemon on, a master and workers, `listen 80;
/// listen [::]:80;`, the second v6-only by nginx's default), everything in `dir`.
fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nworker_processes 2;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen 80;\n    listen [::]:80;\n\
         location / {{ return 200 \"nginx saw $remote_addr\\n\"; }}\n  }}\n}}\n"
    )
}

/// Issue 11: an unmodified nginx, daemonizing (its default), with an IPv4 and a v6-only
/// listener on port 80, serves curl with the shim (accelerated, seen with its IPv4 overlay
/// address) and curl without it (relayed).
#[test]
fn a_daemonizing_nginx_serves_clients_with_and_without_freeflow() {
    common::require_programs(&["nginx", "curl"], "nginx curl");
    let site = Site::new("sn");
    let dir = site.work.join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&dir)).unwrap();
    let mut reaper = Reaper(Vec::new());
    let out = site
        .shim_env("db", true)
        .args(["timeout", "30", "nginx", "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    reaper.add_from_file(&dir.join("nginx.pid"));
    common::assert_success(&out, "nginx (daemon on)");
    site.wait_listening("db", 80, None);
    std::thread::sleep(Duration::from_millis(2500));
    let url = format!("http://{DB_IP}/");
    let curl = ["curl", "-sS", "--max-time", "10", url.as_str()];
    let connects = site.connects();
    let out = site.client("web", true, &curl);
    assert!(out.contains("nginx saw 10.32.0.2"), "{out}");
    assert!(site.connects() > connects, "accelerated");
    let out = site.client("plain", false, &curl);
    assert!(out.contains("nginx saw 10.32.0.5"), "{out}");
}

/// A PostgreSQL cluster in `work/pg`, made by initdb as the postgres user, trusting every IPv4
/// client (`host all all 0.0.0.0/0 trust`, and nothing for IPv6 beyond the local default).
fn init_postgres(work: &Path) -> PathBuf {
    let pg = work.join("pg");
    std::fs::create_dir_all(&pg).unwrap();
    std::os::unix::fs::chown(&pg, Some(uid_of("postgres")), None).unwrap();
    let data = pg.join("data");
    let out = Command::new("runuser")
        .args([
            "-u", "postgres", "--", "timeout", "120", "initdb", "-A", "trust", "-D",
        ])
        .arg(&data)
        .output()
        .unwrap();
    common::assert_success(&out, "initdb");
    let hba = data.join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).unwrap();
    text.push_str("host all all 0.0.0.0/0 trust\n");
    std::fs::write(&hba, text).unwrap();
    pg
}

/// PostgreSQL's program `name`: Debian keeps initdb and pg_ctl out of PATH, in
/// /usr/lib/postgresql/<version>/bin (the newest version there), else `name` from PATH.
fn pg_bin(name: &str) -> String {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort_by_key(|p| {
        let version = p
            .iter()
            .rev()
            .nth(2)
            .map(|v| v.to_string_lossy().into_owned());
        version.and_then(|v| v.parse::<u32>().ok()).unwrap_or(0)
    });
    found
        .pop()
        .map_or_else(|| name.to_string(), |p| p.display().to_string())
}

fn uid_of(user: &str) -> u32 {
    let out = Command::new("id").args(["-u", user]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Issue 11, section 1: an unmodified PostgreSQL with `listen_addresses='*'` (0.0.0.0:5432 and
/// [::]:5432 v6-only), started with pg_ctl under the shim, accepts remote logins from psql with
/// the shim (accelerated) and without it (relayed); pg_hba's IPv4 rule matches both.
#[test]
fn postgresql_listening_everywhere_accepts_remote_logins() {
    common::require_programs(&["runuser", "psql", &pg_bin("pg_ctl")], "postgresql");
    let site = Site::new("sp");
    let pg = init_postgres(&site.work);
    let data = pg.join("data");
    let mut reaper = Reaper(Vec::new());
    let options = format!("-c listen_addresses='*' -c port=5432 -k {}", pg.display());
    let out: Output = site
        .as_user_with_shim("db", "postgres", &pg_bin("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(pg.join("log"))
        .args(["-w", "-t", "30", "-o", &options, "start"])
        .output()
        .unwrap();
    reaper.add_from_file(&data.join("postmaster.pid"));
    let log = std::fs::read_to_string(pg.join("log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "pg_ctl start: {}\n{log}",
        common::describe(&out)
    );
    site.wait_listener_known(0, DB_IP, 5432);
    let psql = [
        "psql", "-h", DB_IP, "-U", "postgres", "-d", "postgres", "-tAc", "select 1",
    ];
    let connects = site.connects();
    let out = site.client("web", true, &psql);
    assert_eq!(out.trim(), "1", "psql with the shim");
    assert!(site.connects() > connects, "accelerated");
    let out = site.client("plain", false, &psql);
    assert_eq!(out.trim(), "1", "psql without the shim");
    let _ = Command::new("runuser")
        .args(["-u", "postgres", "--", "timeout", "20"])
        .arg(pg_bin("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .args(["-m", "immediate", "-t", "10", "stop"])
        .output();
}
