//! `freeflow-bench tcp`: TCP between two simulated hosts, three ways in one run: the host link,
//! the overlay (VXLAN), and Freeflow (overlay addresses, host path). Throughput of one stream,
//! request/response round trip, connection setup (connect to first byte) and connections per
//! second. The cluster, the routers and the registrations are made with the public `freeflow`
//! commands; servers and clients are this binary re-executed inside the namespaces.
//!
//! SIGINT, SIGTERM and SIGHUP stop the experiment at the next step (see [`crate::signals`]):
//! whatever it made is removed before the process exits.

use crate::signals::Interrupts;
use crate::stats::median;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Options {
    pub reps: usize,
    pub seconds: f64,
    pub rtt_samples: u64,
    pub setups: u64,
    /// Cluster tag; `None` picks one from the pid. A caller that passes one (`freeflow demo`)
    /// can check afterwards that nothing of it is left, also if this process was killed.
    pub tag: Option<String>,
}

/// Where the experiment keeps the runtime directories and the registry of cluster `tag`.
pub fn work_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("freeflow-bench-tcp-{tag}"))
}

/// One path's numbers for one repetition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    pub gbit_per_sec: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub setup_p50_us: f64,
    pub setup_p99_us: f64,
    /// The connect call alone, within the setup (Freeflow's extra work is all in there).
    #[serde(default)]
    pub connect_p50_us: f64,
    pub conns_per_sec: f64,
}

#[derive(Debug, Serialize)]
pub struct PathReport {
    pub path: &'static str,
    pub median: Sample,
    pub reps: Vec<Sample>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub experiment: &'static str,
    pub repetitions: usize,
    pub stream_seconds: f64,
    pub paths: Vec<PathReport>,
    pub freeflow_vs_host: Ratios,
    pub overlay_vs_host: Ratios,
}

#[derive(Debug, Serialize)]
pub struct Ratios {
    pub throughput: f64,
    pub rtt_p50: f64,
    pub setup_p50: f64,
}

// ---------------------------------------------------------------- server and client roles

/// Server role: every connection starts with one command byte.
/// 'S' stream: read to EOF, answer the byte count (u64). 'E' echo: 64-byte messages back until
/// EOF. 'F' first byte: write one byte at once, then wait for EOF.
pub fn serve(port: u16) -> Result<(), String> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind {port}: {e}"))?;
    println!("READY");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut cmd = [0u8; 1];
            if conn.read_exact(&mut cmd).is_err() {
                return;
            }
            match cmd[0] {
                b'S' => {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut total = 0u64;
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = conn.write_all(&total.to_le_bytes());
                }
                b'E' => {
                    let mut msg = [0u8; 64];
                    while conn.read_exact(&mut msg).is_ok() {
                        if conn.write_all(&msg).is_err() {
                            break;
                        }
                    }
                }
                b'F' => {
                    let _ = conn.write_all(b"!");
                    let mut rest = [0u8; 16];
                    let _ = conn.read(&mut rest);
                }
                _ => {}
            }
        });
    }
    Ok(())
}

/// Client role: runs the three measurements against `addr` and prints a [`Sample`] as JSON.
pub fn client(addr: SocketAddr, seconds: f64, rtt_samples: u64, setups: u64) -> Result<(), String> {
    fn e(what: &'static str) -> impl Fn(std::io::Error) -> String {
        move |err| format!("{what}: {err}")
    }
    // Throughput: one stream for `seconds`.
    let mut s = TcpStream::connect(addr).map_err(e("connect"))?;
    s.write_all(b"S").map_err(e("write"))?;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        s.write_all(&chunk).map_err(e("stream"))?;
        sent += chunk.len() as u64;
    }
    s.shutdown(Shutdown::Write).map_err(e("shutdown"))?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).map_err(e("stream count"))?;
    let elapsed = start.elapsed().as_secs_f64();
    if u64::from_le_bytes(count) != sent {
        return Err(format!(
            "server counted {} of {sent} bytes",
            u64::from_le_bytes(count)
        ));
    }
    // Round trip of 64-byte messages.
    let mut s = TcpStream::connect(addr).map_err(e("connect"))?;
    s.set_nodelay(true).map_err(e("nodelay"))?;
    s.write_all(b"E").map_err(e("write"))?;
    let mut rtt =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|x| x.to_string())?;
    let mut msg = [7u8; 64];
    for i in 0..rtt_samples + rtt_samples / 10 {
        let t = Instant::now();
        s.write_all(&msg).map_err(e("echo write"))?;
        s.read_exact(&mut msg).map_err(e("echo read"))?;
        if i >= rtt_samples / 10 {
            rtt.record(t.elapsed().as_nanos().max(1) as u64)
                .map_err(|x| x.to_string())?;
        }
    }
    drop(s);
    // Setup: connect until the first byte arrives, one connection after another.
    let mut setup =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|x| x.to_string())?;
    let mut connect =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|x| x.to_string())?;
    let start = Instant::now();
    for _ in 0..setups {
        let t = Instant::now();
        let mut c = TcpStream::connect(addr).map_err(e("setup connect"))?;
        connect
            .record(t.elapsed().as_nanos().max(1) as u64)
            .map_err(|x| x.to_string())?;
        c.write_all(b"F").map_err(e("setup write"))?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b).map_err(e("setup read"))?;
        setup
            .record(t.elapsed().as_nanos().max(1) as u64)
            .map_err(|x| x.to_string())?;
    }
    let setup_elapsed = start.elapsed().as_secs_f64();
    let sample = Sample {
        gbit_per_sec: sent as f64 * 8.0 / elapsed / 1e9,
        rtt_p50_us: rtt.value_at_quantile(0.5) as f64 / 1000.0,
        rtt_p99_us: rtt.value_at_quantile(0.99) as f64 / 1000.0,
        setup_p50_us: setup.value_at_quantile(0.5) as f64 / 1000.0,
        setup_p99_us: setup.value_at_quantile(0.99) as f64 / 1000.0,
        connect_p50_us: connect.value_at_quantile(0.5) as f64 / 1000.0,
        conns_per_sec: setups as f64 / setup_elapsed,
    };
    println!(
        "{}",
        serde_json::to_string(&sample).map_err(|x| x.to_string())?
    );
    Ok(())
}

// ---------------------------------------------------------------- orchestration

fn freeflow_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe.with_file_name("freeflow");
    p.exists()
        .then_some(p.clone())
        .ok_or(format!("{} not found: build the workspace", p.display()))
}

/// Runs `cmd` to completion and returns its stdout; a termination signal kills it and ends the
/// experiment.
fn run(cmd: &mut Command, stop: &Interrupts) -> Result<String, String> {
    stop.check()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    // Read both pipes while waiting, so a child that says a lot cannot stall on a full pipe.
    let read_all = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = read_all(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read_all(child.stderr.take().map(|p| Box::new(p) as _));
    let status = stop.wait_child(&mut child);
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status?.success() {
        // A Ctrl-C from the terminal reaches the child too; say why it failed.
        stop.check()?;
        return Err(format!("{cmd:?} failed: {}", stderr.trim()));
    }
    Ok(stdout)
}

fn in_netns(netns: &str, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).arg(program);
    c
}

/// Everything the experiment made; removed on drop (also when a step fails).
struct Bench {
    tag: String,
    work: PathBuf,
    freeflow: PathBuf,
    servers: Vec<Child>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        // The clean-up commands run in their own process group: a second Ctrl-C at the
        // terminal must not kill them half way.
        for h in 0..2 {
            let _ = in_netns(&format!("ff-{}-h{h}", self.tag), &self.freeflow)
                .args(["down", "--dir"])
                .arg(self.work.join(format!("h{h}")))
                .process_group(0)
                .output();
        }
        let _ = Command::new(&self.freeflow)
            .args(["cluster", "down", "--tag", &self.tag])
            .process_group(0)
            .output();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Runs the experiment. It blocks SIGINT, SIGTERM and SIGHUP for the rest of the process's life
/// (call it from the main thread before starting any other); one of them stops it with an error
/// after everything it made is removed.
pub fn run_experiment(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report, String> {
    let stop = Interrupts::block()?;
    let freeflow = freeflow_binary()?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let shim = exe.with_file_name("libfsocket.so");
    if !shim.exists() {
        return Err(format!("{} not found: build the workspace", shim.display()));
    }
    let tag = opts
        .tag
        .clone()
        .unwrap_or_else(|| format!("bt{}", std::process::id() % 100_000));
    // The tag names a directory that is removed; only the cluster tag alphabet may reach it.
    if tag.is_empty()
        || tag.len() > 8
        || !tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!("--tag {tag:?}: 1 to 8 of a-z 0-9"));
    }
    let work = work_dir(&tag);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let mut bench = Bench {
        tag,
        work,
        freeflow,
        servers: Vec::new(),
    };
    let result = measure(&mut bench, &exe, &shim, opts, &stop, progress);
    progress("tcp: removing the two simulated hosts");
    drop(bench);
    result.map_err(|e| match stop.check() {
        Err(_) => format!("{e}; removed everything it made"),
        Ok(()) => e,
    })
}

fn measure(
    bench: &mut Bench,
    exe: &Path,
    shim: &Path,
    opts: &Options,
    stop: &Interrupts,
    progress: &mut dyn FnMut(&str),
) -> Result<Report, String> {
    let tag = bench.tag.clone();
    let work = bench.work.clone();
    let freeflow = bench.freeflow.clone();
    progress("tcp: building two simulated hosts");
    run(
        Command::new(&freeflow).args([
            "cluster",
            "up",
            "--tag",
            &tag,
            "--hosts",
            "2",
            "--container",
            "web:0:10.32.0.2",
            "--container",
            "db:1:10.32.0.4",
        ]),
        stop,
    )?;
    let host = |h: usize| format!("ff-{tag}-h{h}");
    let registry = format!("file:{}", work.join("registry.json").display());
    for h in 0..2 {
        run(
            in_netns(&host(h), &freeflow)
                .args(["up", "--dir"])
                .arg(work.join(format!("h{h}")))
                .args([
                    "--host-ip",
                    &format!("192.168.1.{}", h + 1),
                    "--vnet-prefix",
                    "10.32.0.0/12",
                    "--registry",
                    &registry,
                ]),
            stop,
        )?;
    }
    for (h, name, ip) in [(0, "web", "10.32.0.2"), (1, "db", "10.32.0.4")] {
        run(
            in_netns(&host(h), &freeflow)
                .args(["container", "add", name, "--dir"])
                .arg(work.join(format!("h{h}")))
                .args([
                    "--netns",
                    &format!("/run/netns/ff-{tag}-c-{name}"),
                    "--ip",
                    ip,
                ]),
            stop,
        )?;
    }
    let env = |h: usize, preload: bool| {
        let mut v = vec![
            format!("FREEFLOW_DIR={}", work.join(format!("h{h}")).display()),
            "VNET_PREFIX=10.32.0.0/12".to_string(),
        ];
        if preload {
            v.push(format!("LD_PRELOAD={}", shim.display()));
        }
        v
    };
    // Servers: host link (host 1's namespace), overlay (db without the shim), Freeflow (db with it).
    let servers = [
        (host(1), 7001u16, false),
        (format!("ff-{tag}-c-db"), 7002, false),
        (format!("ff-{tag}-c-db"), 7003, true),
    ];
    for (netns, port, preload) in &servers {
        stop.check()?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "env"])
            .args(env(1, *preload))
            .arg(exe)
            .args(["tcp-server", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut ready = [0u8; 6];
        let started = child
            .stdout
            .as_mut()
            .ok_or("no stdout")?
            .read_exact(&mut ready);
        // Owned by `bench` before anything can fail, so that it is killed on every path.
        bench.servers.push(child);
        if let Err(e) = started {
            stop.check()?;
            return Err(format!("server start: {e}"));
        }
    }
    // Listener tables travel between the routers; give them a moment.
    stop.sleep(Duration::from_millis(1000))?;
    let clients: [(&'static str, String, &str, bool); 3] = [
        ("host", host(0), "192.168.1.2:7001", false),
        (
            "overlay",
            format!("ff-{tag}-c-web"),
            "10.32.0.4:7002",
            false,
        ),
        (
            "freeflow",
            format!("ff-{tag}-c-web"),
            "10.32.0.4:7003",
            true,
        ),
    ];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); 3];
    for rep in 0..opts.reps {
        for (i, (name, netns, addr, preload)) in clients.iter().enumerate() {
            progress(&format!(
                "tcp: repetition {}/{}: {name}",
                rep + 1,
                opts.reps
            ));
            let out = run(
                Command::new("ip")
                    .args(["netns", "exec", netns, "env"])
                    .args(env(0, *preload))
                    .arg(exe)
                    .args([
                        "tcp-client",
                        addr,
                        &opts.seconds.to_string(),
                        &opts.rtt_samples.to_string(),
                        &opts.setups.to_string(),
                    ]),
                stop,
            )?;
            let sample: Sample = serde_json::from_str(out.trim())
                .map_err(|e| format!("{name} client said {out:?}: {e}"))?;
            samples[i].push(sample);
        }
    }
    let med = |v: &[Sample]| Sample {
        gbit_per_sec: median(v.iter().map(|s| s.gbit_per_sec)),
        rtt_p50_us: median(v.iter().map(|s| s.rtt_p50_us)),
        rtt_p99_us: median(v.iter().map(|s| s.rtt_p99_us)),
        setup_p50_us: median(v.iter().map(|s| s.setup_p50_us)),
        setup_p99_us: median(v.iter().map(|s| s.setup_p99_us)),
        connect_p50_us: median(v.iter().map(|s| s.connect_p50_us)),
        conns_per_sec: median(v.iter().map(|s| s.conns_per_sec)),
    };
    let paths: Vec<PathReport> = clients
        .iter()
        .zip(samples)
        .map(|((name, ..), reps)| PathReport {
            path: name,
            median: med(&reps),
            reps,
        })
        .collect();
    let ratios = |p: &Sample, h: &Sample| Ratios {
        throughput: p.gbit_per_sec / h.gbit_per_sec,
        rtt_p50: p.rtt_p50_us / h.rtt_p50_us,
        setup_p50: p.setup_p50_us / h.setup_p50_us,
    };
    Ok(Report {
        experiment: "tcp",
        repetitions: opts.reps,
        stream_seconds: opts.seconds,
        freeflow_vs_host: ratios(&paths[2].median, &paths[0].median),
        overlay_vs_host: ratios(&paths[1].median, &paths[0].median),
        paths,
    })
}
