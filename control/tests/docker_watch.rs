//! The daemon's Docker watcher against a hostile fake engine on a Unix socket (the real engine
//! is e2e/tests/docker.rs): a real daemon and router (`freeflow up --docker SOCKET`) in a
//! simulated host's namespace, containers that are real network namespaces. The engine sends
//! garbage events, an event without an id, and a container whose description is not JSON; the
//! daemon logs and skips them and keeps registering the good ones: at start (reconcile, also
//! removing a stale record of a container that no longer runs), on `start` and `die` events,
//! and again after the event stream breaks (the engine "restarted" without a container). A
//! quiet stream makes the watcher ping the engine; a stopped engine (accepts, never answers)
//! fails the ping and the watcher starts over once it answers again.
//! Needs root and a built workspace (`cargo build --workspace`: the router).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use freeflow_testbed::test_support::{describe, poll, VNET};
use freeflow_testbed::{self as topology, names, Cluster, ClusterSpec};
use serde_json::{json, Value};

const FREEFLOW: &str = env!("CARGO_BIN_EXE_freeflow");
/// Every wait is bounded by this.
const LIMIT: Duration = Duration::from_secs(30);

/// The fake engine's world: what runs, how each container is described, and the open event
/// stream (a channel to its connection's thread; `None` closes the stream).
#[derive(Default)]
struct World {
    running: Vec<String>,
    /// Body of `GET /containers/<id>/json`, by id (raw bytes: may be anything).
    inspect: Vec<(String, Vec<u8>)>,
    events: Option<Sender<Option<String>>>,
    event_streams_opened: usize,
    /// The engine is stopped (SIGSTOP): connections are accepted, nothing is answered.
    frozen: bool,
    pings: usize,
}

type Shared = Arc<Mutex<World>>;

fn serve(listener: UnixListener, world: Shared) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { return };
        let world = world.clone();
        std::thread::spawn(move || answer(conn, &world));
    }
}

fn answer(mut conn: UnixStream, world: &Shared) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    // The rest of the request head.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    let path = request.split(' ').nth(1).unwrap_or("").to_owned();
    // A stopped engine: the request waits (bounded) until it runs again.
    for _ in 0..1200 {
        if !world.lock().unwrap().frozen {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let reply = |conn: &mut UnixStream, status: &str, body: &[u8]| {
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(body);
    };
    if path.starts_with("/events") {
        let (tx, rx): (Sender<Option<String>>, Receiver<Option<String>>) = mpsc::channel();
        {
            let mut w = world.lock().unwrap();
            w.events = Some(tx);
            w.event_streams_opened += 1;
        }
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        while let Ok(Some(line)) = rx.recv() {
            // Each event split over two chunks, as a proxy may cut them.
            let bytes = format!("{line}\n");
            let (a, b) = bytes.as_bytes().split_at(bytes.len() / 2);
            for part in [a, b] {
                let _ = write!(conn, "{:x}\r\n", part.len());
                let _ = conn.write_all(part);
                let _ = conn.write_all(b"\r\n");
            }
        }
        let _ = conn.write_all(b"0\r\n\r\n");
    } else if path == "/_ping" {
        world.lock().unwrap().pings += 1;
        reply(&mut conn, "200 OK", b"OK");
    } else if path == "/containers/json" {
        let list: Vec<Value> = world
            .lock()
            .unwrap()
            .running
            .iter()
            .map(|id| json!({"Id": id}))
            .collect();
        reply(
            &mut conn,
            "200 OK",
            Value::Array(list).to_string().as_bytes(),
        );
    } else if let Some(id) = path
        .strip_prefix("/containers/")
        .and_then(|p| p.strip_suffix("/json"))
    {
        let body = world
            .lock()
            .unwrap()
            .inspect
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, b)| b.clone());
        match body {
            Some(b) => reply(&mut conn, "200 OK", &b),
            None => reply(
                &mut conn,
                "404 Not Found",
                b"{\"message\":\"No such container\"}",
            ),
        }
    } else {
        reply(&mut conn, "404 Not Found", b"{}");
    }
}

fn id(digit: char) -> String {
    digit.to_string().repeat(64)
}

fn described(
    id: &str,
    name: &str,
    dir: &str,
    netns: &Path,
    ip: &str,
    tenant: Option<&str>,
) -> Vec<u8> {
    let labels = match tenant {
        Some(t) => json!({"freeflow.tenant": t}),
        None => json!({}),
    };
    json!({
        "Id": id, "Name": format!("/{name}"),
        "State": {"Running": true, "Pid": 0},
        "Mounts": [{"Type": "bind", "Source": "/somewhere/else", "Destination": dir, "RW": false}],
        "Config": {"Labels": labels},
        "NetworkSettings": {"SandboxKey": netns, "Networks": {"ffnet": {"IPAddress": ip}}}
    })
    .to_string()
    .into_bytes()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run a command");
    assert!(out.status.success(), "{cmd:?}: {}", describe(&out));
    out
}

/// The registry's containers, as `container ls --json` lists them.
fn registered(host: &str, dir: &str) -> Vec<Value> {
    let out =
        run(topology::command_in(host, FREEFLOW).args(["container", "ls", "--json", "--dir", dir]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["containers"].as_array().cloned().unwrap_or_default()
}

fn names_of(list: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = list
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// Waits until the registry holds exactly `want` (sorted names).
#[track_caller]
fn wait_for(host: &str, dir: &str, want: &[&str], log: &Path) {
    let got = poll(LIMIT, Duration::from_millis(100), || {
        let names = names_of(&registered(host, dir));
        (names == want).then_some(())
    });
    assert!(
        got.is_some(),
        "registry never became {want:?}: {:?}\ndaemon log:\n{}",
        names_of(&registered(host, dir)),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

struct Down<'a>(&'a str, &'a str);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = topology::command_in(self.0, FREEFLOW)
            .args(["down", "--dir", self.1])
            .output();
    }
}

#[test]
fn the_watcher_registers_from_a_hostile_engine_and_reconciles() {
    topology::ensure_root().expect("the Docker watcher test must run as root");
    let router = Path::new(FREEFLOW).with_file_name("freeflow-router");
    assert!(router.is_file(), "build the workspace first ({router:?})");
    let tag = topology::fresh_tag("dw");
    let mut cluster = Cluster::create(ClusterSpec::new(tag.clone(), 1)).unwrap();
    let host = cluster.hosts()[0].netns.clone();
    let tmp = tempfile::Builder::new().prefix("ff-dw-").tempdir().unwrap();
    let dir = tmp.path().join("freeflow").to_str().unwrap().to_owned();
    let state = tmp.path().join("state");
    let registry = format!("file:{}/registry.json", tmp.path().display());
    let log = state.join("freeflow.log");
    // Containers: network namespaces (addresses are only what the engine says).
    let mut netns: Vec<PathBuf> = Vec::new();
    for (i, name) in ["one", "two", "bad", "old"].iter().enumerate() {
        let c = cluster
            .add_container(0, name, format!("10.32.9.{}", i + 2).parse().unwrap(), 12)
            .unwrap();
        netns.push(names::netns_path(&c.netns));
    }
    let (one, two, bad) = (id('1'), id('2'), id('3'));

    // A stale record of the watcher's (a container that stopped while no daemon ran).
    let up = |extra: &[&str]| {
        let mut cmd = topology::command_in(&host, FREEFLOW);
        cmd.args(["up", "--dir", &dir, "--state-dir"])
            .arg(&state)
            .args(["--host-ip-prefix", "192.168.1.0/24", "--vnet-prefix", VNET])
            .args(["--registry", &registry])
            .args(extra)
            // Ping the engine after 300 ms without an event instead of 30 s.
            .env("FREEFLOW_DOCKER_QUIET_MS", "300");
        run(&mut cmd);
    };
    up(&[]);
    let _down = Down(&host, &dir);
    run(topology::command_in(&host, FREEFLOW)
        .args([
            "container",
            "add",
            "docker-aaaaaaaaaaaa-old",
            "--dir",
            &dir,
            "--netns",
        ])
        .arg(&netns[3])
        .args(["--ip", "10.32.9.5"]));
    run(topology::command_in(&host, FREEFLOW).args(["down", "--dir", &dir]));

    let world: Shared = Arc::default();
    {
        let mut w = world.lock().unwrap();
        w.running = vec![one.clone()];
        w.inspect = vec![
            (
                one.clone(),
                described(&one, "one", &dir, &netns[0], "10.32.9.2", Some("blue")),
            ),
            (
                two.clone(),
                described(&two, "two", &dir, &netns[1], "10.32.9.3", None),
            ),
            (bad.clone(), b"{\"Id\": [not json".to_vec()),
        ];
    }
    let socket = tmp.path().join("engine.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let served = world.clone();
    std::thread::spawn(move || serve(listener, served));

    up(&["--docker", socket.to_str().unwrap()]);
    // Reconciled: one registered, the stale record gone.
    wait_for(&host, &dir, &["docker-111111111111-one"], &log);
    let listed = registered(&host, &dir);
    assert_eq!(listed[0]["tenant"], "blue");
    assert_eq!(listed[0]["ip"], "10.32.9.2");

    let send = |line: &str| {
        let tx = world
            .lock()
            .unwrap()
            .events
            .clone()
            .expect("an open event stream");
        tx.send(Some(line.to_owned())).unwrap();
    };
    send("this is not JSON");
    send(r#"{"Type":"container","Action":"start"}"#);
    send(&json!({"Type": "container", "Action": "start", "Actor": {"ID": bad}}).to_string());
    send(
        &json!({"Type": "container", "Action": "start", "Actor": {"ID": "../../etc"}}).to_string(),
    );
    world.lock().unwrap().running.push(two.clone());
    send(&json!({"Type": "container", "Action": "start", "Actor": {"ID": two}}).to_string());
    wait_for(
        &host,
        &dir,
        &["docker-111111111111-one", "docker-222222222222-two"],
        &log,
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("malformed event"), "{text}");
    assert!(text.contains("container inspect"), "{text}");

    world.lock().unwrap().running.retain(|i| *i != two);
    send(&json!({"Type": "container", "Action": "die", "Actor": {"ID": two}}).to_string());
    wait_for(&host, &dir, &["docker-111111111111-one"], &log);

    // The engine "restarts" without container one: the stream ends, the watcher reconnects
    // and reconciles.
    world.lock().unwrap().running.clear();
    let tx = world.lock().unwrap().events.take().unwrap();
    tx.send(None).unwrap();
    wait_for(&host, &dir, &[], &log);
    assert!(world.lock().unwrap().event_streams_opened >= 2);
    // The daemon lived through all of it, and its status says what the watcher did.
    let watch = poll(LIMIT, Duration::from_millis(100), || {
        let out =
            run(topology::command_in(&host, FREEFLOW).args(["status", "--json", "--dir", &dir]));
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        let watch = status["daemon"]["docker"].clone();
        (watch["connected"] == true && watch["unregistered"] == 3).then_some(watch)
    })
    .expect("status --json reports the watcher connected again with 3 unregistrations");
    assert_eq!(watch["socket"], socket.to_str().unwrap(), "{watch}");
    assert_eq!(watch["registered"], 2, "{watch}");
    // Garbage, an event without an id, a description that is not JSON, an id "../../etc".
    assert_eq!(watch["malformed"], 4, "{watch}");
    assert!(
        watch["last_error"]
            .as_str()
            .unwrap()
            .contains("event stream ended"),
        "{watch}"
    );
    let text = run(topology::command_in(&host, FREEFLOW).args(["status", "--dir", &dir]));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("docker:     following"), "{text}");

    // A quiet stream is checked with pings; the engine then stops answering (frozen): the
    // watcher notices (status: not connected, the reason) instead of waiting for ever, and
    // follows the engine again once it answers.
    let pings = poll(LIMIT, Duration::from_millis(100), || {
        let n = world.lock().unwrap().pings;
        (n >= 2).then_some(n)
    });
    assert!(
        pings.is_some(),
        "a quiet stream was never checked with a ping"
    );
    let opened = world.lock().unwrap().event_streams_opened;
    world.lock().unwrap().frozen = true;
    let silent = poll(LIMIT, Duration::from_millis(200), || {
        let out =
            run(topology::command_in(&host, FREEFLOW).args(["status", "--json", "--dir", &dir]));
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        let watch = status["daemon"]["docker"].clone();
        (watch["connected"] == false).then_some(watch)
    })
    .expect("status --json reports the watcher disconnected from a stopped engine");
    assert!(
        silent["last_error"]
            .as_str()
            .unwrap()
            .contains("no answer to a ping"),
        "{silent}"
    );
    world.lock().unwrap().frozen = false;
    let resumed = poll(LIMIT, Duration::from_millis(100), || {
        (world.lock().unwrap().event_streams_opened > opened).then_some(())
    });
    assert!(
        resumed.is_some(),
        "the watcher never opened the event stream again after the engine ran again\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
