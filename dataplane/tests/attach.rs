//! The router as a black box: a real freeflow-router process, real network namespaces, real
//! attach connections. Needs root (network namespaces); fails loudly without it.

use freeflow_proto::attach::{attach, AttachError, Hello, Refusal, Session, ShimKind, Welcome};
use freeflow_proto::control::{
    self, ContainerEntry, ControlRequest, ControlResponse, RouterStatus, RouterTable, TableDelta,
};
use freeflow_proto::fdpass;
use freeflow_proto::identity::NetnsId;
use freeflow_proto::msg::{op, MsgHeader, HEADER_LEN};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;

use common::{start_router, wait_until, Router};

const CHILD_DIR_ENV: &str = "FF_TEST_ATTACH_DIR";

fn require_root() {
    common::require_root("these tests build network namespaces and must run as root");
}

impl Router {
    fn start(tag: &str) -> Router {
        require_root();
        start_router(&format!("ff-attach-{tag}-{}", std::process::id()))
    }

    fn try_status(&self) -> Option<RouterStatus> {
        match control::call(
            &common::control_socket(&self.dir),
            &ControlRequest::Status,
            Duration::from_secs(5),
        ) {
            Ok(ControlResponse::Status(s)) => Some(s),
            _ => None,
        }
    }

    fn status(&self) -> RouterStatus {
        self.try_status().expect("router answers status")
    }

    fn register(&self, containers: &[(&str, NetnsId)]) {
        let containers = containers
            .iter()
            .enumerate()
            .map(|(i, (name, netns))| ContainerEntry {
                name: name.to_string(),
                tenant: "t1".into(),
                ip: Ipv4Addr::new(10, 32, 0, 10 + i as u8),
                netns: *netns,
            })
            .collect();
        let r = control::call(
            &common::control_socket(&self.dir),
            &ControlRequest::SetContainers {
                containers,
                network: None,
                generation: None,
            },
            Duration::from_secs(5),
        );
        assert!(
            matches!(r, Ok(ControlResponse::Ok)),
            "set_containers: {r:?}"
        );
    }

    fn wait_attached(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.status().attached.len();
            if got == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} attached, have {got}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A network namespace made for one test, removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("ffat-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }

    fn id(&self) -> NetnsId {
        NetnsId::of_path(&Path::new("/run/netns").join(&self.0)).unwrap()
    }

    /// Runs this test binary's `attach_child` inside the namespace.
    fn run_child(&self, dir: &Path) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "attach_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Sends one request whose header says `opcode`, `cookie` and a body of `len` bytes (which need
/// not be the length of `body`: the hostile tests lie), and returns the reply's header; its
/// body is in `out` after the header.
fn request(
    session: &mut Session,
    out: &mut [u8],
    opcode: u16,
    cookie: u64,
    len: u32,
    body: &[u8],
) -> Result<MsgHeader, String> {
    let header = MsgHeader {
        opcode,
        cookie,
        len,
        ..Default::default()
    };
    session
        .call(header, body, out, Duration::from_secs(5))
        .map_err(|e| e.to_string())
}

fn ping(session: &mut Session, cookie: u64) -> Result<(), String> {
    let mut out = vec![0u8; session.slot_size()];
    let reply = request(
        session,
        &mut out,
        op::PING,
        cookie,
        8,
        &cookie.to_le_bytes(),
    )?;
    if reply.cookie != cookie || out[HEADER_LEN..HEADER_LEN + 8] != cookie.to_le_bytes() {
        return Err(format!("bad reply {reply:?}"));
    }
    Ok(())
}

/// The child half of the namespace tests: attach from wherever we were started, ping, and
/// report the outcome on stdout.
#[test]
#[ignore = "child half of the namespace tests; only runs when re-executed by them"]
fn attach_child() {
    let dir = PathBuf::from(std::env::var(CHILD_DIR_ENV).expect("run by a namespace test"));
    match attach(&dir, ShimKind::Probe, Duration::from_secs(5)) {
        Ok(mut session) => {
            ping(&mut session, 42).unwrap();
            println!(
                "ATTACHED as {} on shard {}",
                session.info().container,
                session.info().shard
            );
        }
        Err(AttachError::Refused { reason, message }) => println!("REFUSED {reason:?}: {message}"),
        Err(e) => println!("ERROR {e}"),
    }
}

#[test]
fn registered_namespace_attaches_and_unregistered_is_refused() {
    let router = Router::start("reg");
    let good = Netns::new("good");
    let stranger = Netns::new("stranger");
    router.register(&[("web", good.id())]);

    let out = good.run_child(&router.dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ATTACHED as web"),
        "registered container must attach: {stdout}\n{}",
        router.log()
    );

    let out = stranger.run_child(&router.dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("REFUSED NotRegistered"),
        "unregistered namespace must be refused: {stdout}"
    );
    assert!(
        stdout.contains("freeflow container add"),
        "the refusal tells the user what to do: {stdout}"
    );

    // The child exited, so its attachment must be gone and its resources freed.
    router.wait_attached(0);
    let status = router.status();
    assert_eq!(status.attaches_accepted, 1);
    assert!(status.attaches_refused >= 1);
}

/// Opens a raw attach connection, sends `bytes` (with `fds`), and returns the router's answer.
fn raw_exchange(dir: &Path, bytes: &[u8], with_fd: bool) -> Option<Welcome> {
    let conn = fdpass::unix_socket(libc::SOCK_SEQPACKET).unwrap();
    fdpass::connect_unix(conn.as_fd(), &dir.join("router.sock")).unwrap();
    fdpass::set_timeouts(conn.as_fd(), Duration::from_secs(5)).unwrap();
    let extra = std::fs::File::open("/dev/null").unwrap();
    let fds = if with_fd { vec![extra.as_fd()] } else { vec![] };
    fdpass::send_with_fds(conn.as_fd(), bytes, &fds).unwrap();
    let mut buf = vec![0u8; 4096];
    let got = fdpass::recv_with_fds(conn.as_fd(), &mut buf, 0).ok()?;
    (got.len > 0).then(|| Welcome::decode(&buf[..got.len]).unwrap())
}

/// A probe's hello with its 16-bit field at `offset` set to `value` (4: the protocol version,
/// 6: the shim kind).
fn hello_with(offset: usize, value: u16) -> Vec<u8> {
    let mut hello = Hello::new(ShimKind::Probe).encode().to_vec();
    hello[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    hello
}

#[test]
fn malformed_handshakes_are_refused_and_others_keep_being_served() {
    let router = Router::start("bad");
    router.register(&[("self", NetnsId::current().unwrap())]);
    let mut good = attach(&router.dir, ShimKind::Probe, Duration::from_secs(5)).unwrap();
    ping(&mut good, 1).unwrap();

    let refused = |w: Option<Welcome>| match w {
        Some(Welcome::Refused { reason, .. }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    // Garbage of the right length.
    assert_eq!(
        refused(raw_exchange(&router.dir, &[0xAB; 16], false)),
        Refusal::Malformed
    );
    ping(&mut good, 2).unwrap();
    // A wrong protocol version.
    let wrong = hello_with(4, 99);
    assert_eq!(
        refused(raw_exchange(&router.dir, &wrong, false)),
        Refusal::VersionMismatch
    );
    ping(&mut good, 3).unwrap();
    // Half a hello (a writer that stopped mid-message).
    let half = &Hello::new(ShimKind::Probe).encode()[..7];
    assert_eq!(
        refused(raw_exchange(&router.dir, half, false)),
        Refusal::Malformed
    );
    // A hello that is too long, and one carrying a file descriptor.
    assert_eq!(
        refused(raw_exchange(&router.dir, &[0u8; 64], false)),
        Refusal::Malformed
    );
    assert_eq!(
        refused(raw_exchange(
            &router.dir,
            &Hello::new(ShimKind::Probe).encode(),
            true
        )),
        Refusal::Malformed
    );
    // An unknown shim kind.
    let kind = hello_with(6, 77);
    assert_eq!(
        refused(raw_exchange(&router.dir, &kind, false)),
        Refusal::Malformed
    );
    ping(&mut good, 4).unwrap();
    // Peers that connect and leave without a word, or connect and say nothing at all.
    for _ in 0..20 {
        let conn = fdpass::unix_socket(libc::SOCK_SEQPACKET).unwrap();
        fdpass::connect_unix(conn.as_fd(), &router.dir.join("router.sock")).unwrap();
    }
    let silent = fdpass::unix_socket(libc::SOCK_SEQPACKET).unwrap();
    fdpass::connect_unix(silent.as_fd(), &router.dir.join("router.sock")).unwrap();
    ping(&mut good, 5).unwrap();
    // A fresh attach still works while the silent peer hangs around.
    let mut second = attach(&router.dir, ShimKind::Probe, Duration::from_secs(5)).unwrap();
    ping(&mut second, 6).unwrap();
    ping(&mut good, 7).unwrap();
    assert_eq!(router.status().attached.len(), 2);
    drop(silent);
}

#[test]
fn hostile_ring_indices_detach_only_the_offender() {
    let router = Router::start("hostile");
    router.register(&[("self", NetnsId::current().unwrap())]);
    let mut victim = attach(&router.dir, ShimKind::Probe, Duration::from_secs(5)).unwrap();
    let evil = attach(&router.dir, ShimKind::Probe, Duration::from_secs(5)).unwrap();
    router.wait_attached(2);
    // The offender claims ten thousand requests in a 1024-slot ring.
    let ring = evil
        .region()
        .ring(freeflow_proto::attach::REQUEST_RING)
        .unwrap();
    ring.control().tail.0.store(10_000, Ordering::Release);
    // Make sure the shard looks (it may be parked): the victim's traffic wakes it.
    ping(&mut victim, 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !evil.router_hung_up() {
        assert!(
            Instant::now() < deadline,
            "router did not detach the offender: {}",
            router.log()
        );
        ping(&mut victim, 2).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    ping(&mut victim, 3).unwrap();
    router.wait_attached(1);
    let status = router.status();
    assert!(status.shards.iter().map(|s| s.protocol_errors).sum::<u64>() >= 1);
    assert!(
        router.log().contains("ring protocol violation"),
        "{}",
        router.log()
    );
}

#[test]
fn unknown_opcodes_and_bad_lengths_get_error_replies() {
    let router = Router::start("ops");
    router.register(&[("self", NetnsId::current().unwrap())]);
    let mut s = attach(&router.dir, ShimKind::Probe, Duration::from_secs(5)).unwrap();
    let mut out = vec![0u8; s.slot_size()];
    let r = request(&mut s, &mut out, 999, 5, 0, &[]).unwrap();
    assert_eq!(
        (r.status, r.cookie),
        (freeflow_proto::msg::status::UNKNOWN_OP, 5)
    );
    // A header that claims a body longer than the slot.
    let r = request(&mut s, &mut out, op::PING, 6, 10_000, &[]).unwrap();
    assert_eq!(
        (r.status, r.cookie),
        (freeflow_proto::msg::status::BAD_LENGTH, 6)
    );
    ping(&mut s, 7).unwrap();
}

#[test]
fn unregistering_a_container_detaches_it() {
    let router = Router::start("unreg");
    router.register(&[("self", NetnsId::current().unwrap())]);
    let s = attach(&router.dir, ShimKind::Probe, Duration::from_secs(5)).unwrap();
    router.wait_attached(1);
    router.register(&[]);
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || s.router_hung_up(),
        || "unregistered container still attached".into(),
    );
    router.wait_attached(0);
    let refused = attach(&router.dir, ShimKind::Probe, Duration::from_secs(5));
    assert!(matches!(
        refused,
        Err(AttachError::Refused {
            reason: Refusal::NotRegistered,
            ..
        })
    ));
}

/// The table the router serves (`ControlRequest::Table`).
fn served_table(router: &Router) -> RouterTable {
    match control::call(
        &common::control_socket(&router.dir),
        &ControlRequest::Table { unless_push: None },
        Duration::from_secs(5),
    ) {
        Ok(ControlResponse::Table(t)) => t,
        other => panic!("table: {other:?}"),
    }
}

fn control_call(router: &Router, request: &ControlRequest) -> ControlResponse {
    control::call(
        &common::control_socket(&router.dir),
        request,
        Duration::from_secs(5),
    )
    .expect("router answers")
}

#[test]
fn a_delta_applies_to_its_base_generation_only_and_detaches_what_it_removes() {
    let router = Router::start("delta");
    let me = NetnsId::current().unwrap();
    let other = Netns::new("delta");
    let entry = |name: &str, ip: u8, netns: NetnsId| ContainerEntry {
        name: name.into(),
        tenant: "t1".into(),
        ip: Ipv4Addr::new(10, 32, 0, ip),
        netns,
    };
    let full = ControlRequest::SetContainers {
        containers: vec![entry("self", 2, me)],
        network: None,
        generation: Some(40),
    };
    assert_eq!(control_call(&router, &full), ControlResponse::Ok);
    let s = attach(&router.dir, ShimKind::Probe, Duration::from_secs(5)).unwrap();
    router.wait_attached(1);

    // Adds a container: applies to 40, the router's generation.
    let add = TableDelta {
        base: 40,
        generation: 41,
        upserted: vec![entry("other", 3, other.id())],
        removed: vec![],
        network: None,
    };
    let pushes = served_table(&router).pushes;
    let r = control_call(&router, &ControlRequest::UpdateContainers(add.clone()));
    assert_eq!(r, ControlResponse::Ok);
    let table = served_table(&router);
    assert_eq!(table.pushes, pushes + 1);
    let names: Vec<&str> = table.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["other", "self"]);
    router.wait_attached(1);

    // The same delta again: its base is no longer the router's table; refused, nothing changes.
    let r = control_call(&router, &ControlRequest::UpdateContainers(add));
    let ControlResponse::Error { message } = r else {
        panic!("a delta on a stale base must be refused: {r:?}");
    };
    assert!(message.contains("generation 40"), "{message}");
    assert_eq!(served_table(&router).containers, table.containers);

    // Removing "self" detaches its attachment.
    let remove = TableDelta {
        base: 41,
        generation: 42,
        upserted: vec![],
        removed: vec![me],
        network: None,
    };
    let r = control_call(&router, &ControlRequest::UpdateContainers(remove));
    assert_eq!(r, ControlResponse::Ok);
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || s.router_hung_up(),
        || "removed container still attached".into(),
    );
    router.wait_attached(0);
    assert_eq!(router.status().registered, 1);

    // A full push without a number (another pusher): no delta applies until a numbered one.
    router.register(&[("self", me)]);
    let after_unnumbered = TableDelta {
        base: 42,
        generation: 43,
        upserted: vec![],
        removed: vec![me],
        network: None,
    };
    let r = control_call(&router, &ControlRequest::UpdateContainers(after_unnumbered));
    assert!(matches!(r, ControlResponse::Error { .. }), "{r:?}");
    assert_eq!(router.status().registered, 1);
}

#[test]
fn sigterm_stops_cleanly_and_tells_the_shims() {
    let mut router = Router::start("term");
    router.register(&[("self", NetnsId::current().unwrap())]);
    let s = attach(&router.dir, ShimKind::Probe, Duration::from_secs(5)).unwrap();
    router.wait_attached(1);
    freeflow_os::signals::send_signal(router.child.id() as i32, libc::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = router.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "router ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "clean exit expected, got {status}");
    assert!(s.router_hung_up());
    assert!(!router.dir.join("router.sock").exists());
    assert!(!common::control_socket(&router.dir).exists());
}

#[test]
fn second_router_for_one_directory_is_refused() {
    let router = Router::start("twice");
    let out = Command::new(env!("CARGO_BIN_EXE_freeflow-router"))
        .arg("--dir")
        .arg(&router.dir)
        .arg("--state-dir")
        .arg(common::state_dir(&router.dir))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another router"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        router.try_status().is_some(),
        "the first router keeps serving"
    );
}

/// A parked router with idle attachments must not burn a core. The bound is loose on purpose
/// (a spinning shard would show ~100%); `freeflow-bench idle` measures the real figure.
#[test]
fn idle_router_parks() {
    let router = Router::start("idle");
    router.register(&[("self", NetnsId::current().unwrap())]);
    let sessions: Vec<_> = (0..5)
        .map(|_| attach(&router.dir, ShimKind::Probe, Duration::from_secs(5)).unwrap())
        .collect();
    router.wait_attached(5);
    std::thread::sleep(Duration::from_millis(300));
    let cpu = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let before = cpu(router.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu(router.child.id()) - before;
    // 2 s at 100 ticks/s is 200 ticks of one core; 50 is a quarter.
    assert!(ticks < 50, "idle router used {ticks} ticks in 2 s");
    assert!(router.status().shards.iter().map(|s| s.parks).sum::<u64>() >= 1);
    drop(sessions);
}
