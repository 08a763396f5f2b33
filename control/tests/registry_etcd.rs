//! The registry contract on both backends (a file, and a real etcd started by the test), and
//! what only the etcd backend promises: create-if-absent claims between hosts, records that
//! disappear with the daemon that held them, clear errors while etcd is down, and nothing lost
//! when etcd is killed and restarted from its data directory.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use freeflow_control::registry::{
    self, ContainerRecord, HostRecord, Registry, RegistryError, Snapshot, LEASE_TTL,
};
use freeflow_testbed::etcd::EtcdServer;

/// Environment variables that turn `holder_child` into a process holding a host: the registry
/// URL and the host number.
const HOLDER_URL_ENV: &str = "FREEFLOW_REGISTRY_TEST_HOLDER_URL";
const HOLDER_HOST_ENV: &str = "FREEFLOW_REGISTRY_TEST_HOLDER_HOST";
/// Set (to anything): the holder also follows the registry with a watch, as a daemon does.
const HOLDER_WATCH_ENV: &str = "FREEFLOW_REGISTRY_TEST_HOLDER_WATCH";
/// What the holder prints once it holds its host.
const HOLDER_READY: &str = "freeflow-test-holder-ready";
/// Containers the holder registers on its host.
const HOLDER_CONTAINERS: usize = 20;
/// Slack on top of the lease's time to live for etcd to expire it and for us to see it.
const EXPIRY_SLACK: Duration = Duration::from_secs(5);
/// Upper bound for anything that waits on other threads or processes.
const DEADLINE: Duration = Duration::from_secs(120);

fn container(worker: usize, i: usize, host: u8) -> ContainerRecord {
    ContainerRecord {
        name: format!("w{worker}-c{i}"),
        tenant: format!("tenant{}", worker % 3),
        ip: Ipv4Addr::new(10, 32, worker as u8, i as u8 + 1),
        netns: PathBuf::from(format!("/run/netns/ff-w{worker}-c{i}")),
        host_ip: host_ip(host),
    }
}

fn host_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, n)
}

fn host(n: u8) -> HostRecord {
    HostRecord {
        host_ip: host_ip(n),
        peer_port: 7000 + u16::from(n),
        vnet_prefix: format!("10.32.{n}.0/24").parse().unwrap(),
        dir: PathBuf::from(format!("/freeflow/h{n}")),
    }
}

/// Registers `rec` the way `container add` does ([`Registry::add_container`]); the generation.
fn add(reg: &dyn Registry, rec: ContainerRecord) -> Result<u64, RegistryError> {
    reg.add_container(&rec)
}

fn add_host(reg: &dyn Registry, rec: HostRecord) -> Result<Snapshot, RegistryError> {
    reg.update(&mut |s| {
        s.upsert_host(rec.clone());
        Ok(())
    })
}

/// A real etcd with its data in a temporary directory, for one test.
struct TestEtcd {
    server: EtcdServer,
    _dir: tempfile::TempDir,
}

impl TestEtcd {
    fn start() -> TestEtcd {
        let dir = tempfile::tempdir().unwrap();
        TestEtcd {
            server: EtcdServer::start(dir.path()),
            _dir: dir,
        }
    }
}

/// A fresh, empty registry URL of each backend: a file in `dir`, a new prefix on `etcd`.
fn fresh_urls(dir: &tempfile::TempDir, etcd: &TestEtcd) -> Vec<String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    vec![
        format!("file:{}/r{n}.json", dir.path().display()),
        etcd.server.url(&format!("/t{n}")),
    ]
}

/// Polls `check` until it holds or `limit` passes; returns whether it held.
fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

mod contract {
    //! What every backend promises, checked on each.

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn concurrent_writers_lose_no_update() {
        const WRITERS: usize = 4;
        const ADDS: usize = 15;
        let dir = tempfile::tempdir().unwrap();
        let etcd = TestEtcd::start();
        for url in fresh_urls(&dir, &etcd) {
            let barrier = Barrier::new(WRITERS);
            thread::scope(|scope| {
                for w in 0..WRITERS {
                    let (url, barrier) = (&url, &barrier);
                    scope.spawn(move || {
                        // A handle of its own, as another process would have.
                        let reg = registry::open(url).unwrap();
                        barrier.wait();
                        for i in 0..ADDS {
                            add(&*reg, container(w, i, 1)).unwrap();
                        }
                    });
                }
            });
            let s = registry::open(&url).unwrap().load().unwrap();
            assert_eq!(s.generation, (WRITERS * ADDS) as u64, "{url}");
            assert_eq!(s.containers.len(), WRITERS * ADDS, "{url}");
        }
    }

    #[test]
    fn fingerprint_tracks_changes() {
        let dir = tempfile::tempdir().unwrap();
        let etcd = TestEtcd::start();
        for url in fresh_urls(&dir, &etcd) {
            let reg = registry::open(&url).unwrap();
            let other = registry::open(&url).unwrap();
            let empty = reg.fingerprint().unwrap();
            assert_eq!(reg.fingerprint().unwrap(), empty, "{url}");
            let mut last = empty.clone();
            for i in 0..10 {
                add(&*other, container(0, i, 1)).unwrap();
                let now = reg.fingerprint().unwrap();
                assert_ne!(now, last, "{url}: add {i} not seen");
                reg.load().unwrap();
                assert_eq!(reg.fingerprint().unwrap(), now, "{url}");
                last = now;
            }
            // A removal, and a removal plus an addition that keeps the count.
            other
                .update(&mut |s| s.remove_container("w0-c3").map(drop))
                .unwrap();
            let now = reg.fingerprint().unwrap();
            assert_ne!(now, last, "{url}: removal not seen");
            last = now;
            other
                .update(&mut |s| {
                    s.remove_container("w0-c4")?;
                    s.add_container(container(1, 0, 1))
                })
                .unwrap();
            assert_ne!(reg.fingerprint().unwrap(), last, "{url}: swap not seen");
        }
    }

    #[test]
    fn failed_updates_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let etcd = TestEtcd::start();
        for url in fresh_urls(&dir, &etcd) {
            let reg = registry::open(&url).unwrap();
            add(&*reg, container(0, 0, 1)).unwrap();
            let before = reg.load().unwrap();
            let print = reg.fingerprint().unwrap();
            let mut dup = container(0, 1, 1);
            dup.ip = before.containers[0].ip;
            assert!(
                matches!(add(&*reg, dup), Err(RegistryError::DuplicateIp { .. })),
                "{url}"
            );
            let err = reg
                .update(&mut |s| {
                    s.containers.push(container(0, 0, 1));
                    Ok(())
                })
                .unwrap_err();
            assert!(
                matches!(err, RegistryError::DuplicateName(_)),
                "{url}: {err}"
            );
            assert_eq!(reg.load().unwrap(), before, "{url}");
            assert_eq!(reg.fingerprint().unwrap(), print, "{url}");
        }
    }

    /// `add_container` (the way `container add` registers) refuses what `update` with
    /// `Snapshot::add_container` refuses, with the same errors and without a change, and stores
    /// an accepted record at the next generation with its host's lease, as `update` would.
    #[test]
    fn one_container_adds_match_updates() {
        let dir = tempfile::tempdir().unwrap();
        let etcd = TestEtcd::start();
        for url in fresh_urls(&dir, &etcd) {
            let reg = registry::open(&url).unwrap();
            add_host(&*reg, host(1)).unwrap();
            let generation = add(&*reg, container(0, 0, 1)).unwrap();
            let before = reg.load().unwrap();
            assert_eq!(before.generation, generation, "{url}");
            assert_eq!(before.containers, vec![container(0, 0, 1)], "{url}");
            let mut same_name = container(0, 1, 1);
            same_name.name = container(0, 0, 1).name;
            let mut same_ip = container(0, 1, 1);
            same_ip.ip = container(0, 0, 1).ip;
            let mut same_netns = container(0, 1, 1);
            same_netns.netns = container(0, 0, 1).netns;
            let mut bad_name = container(0, 1, 1);
            bad_name.name = "bad name".to_owned();
            for rec in [same_name, same_ip, same_netns, bad_name] {
                let by_update = reg
                    .update(&mut |s| s.add_container(rec.clone()))
                    .unwrap_err()
                    .to_string();
                let by_add = add(&*reg, rec.clone()).unwrap_err().to_string();
                assert_eq!(by_add, by_update, "{url}: {rec:?}");
            }
            assert_eq!(reg.load().unwrap(), before, "{url}");
            let generation = add(&*reg, container(0, 1, 1)).unwrap();
            let after = reg.load().unwrap();
            assert_eq!(after.generation, generation, "{url}");
            assert_eq!(generation, before.generation + 1, "{url}");
            let mut expected = before.clone();
            expected.add_container(container(0, 1, 1)).unwrap();
            expected.generation = generation;
            assert_eq!(after, expected, "{url}");
        }
    }

    /// `remove_container` (the way `container rm` unregisters) refuses an unknown name without
    /// a change, and otherwise stores what `update` with `Snapshot::remove_container` would, at
    /// the next generation: the name, the address and the namespace are free again.
    #[test]
    fn one_container_removals_match_updates() {
        let dir = tempfile::tempdir().unwrap();
        let etcd = TestEtcd::start();
        for url in fresh_urls(&dir, &etcd) {
            let reg = registry::open(&url).unwrap();
            add_host(&*reg, host(1)).unwrap();
            add(&*reg, container(0, 0, 1)).unwrap();
            add(&*reg, container(0, 1, 1)).unwrap();
            let before = reg.load().unwrap();
            let by_update = reg
                .update(&mut |s| s.remove_container("nobody").map(drop))
                .unwrap_err()
                .to_string();
            let by_remove = reg.remove_container("nobody").unwrap_err().to_string();
            assert_eq!(by_remove, by_update, "{url}");
            assert_eq!(reg.load().unwrap(), before, "{url}");
            let (removed, generation) = reg.remove_container(&container(0, 0, 1).name).unwrap();
            assert_eq!(removed, container(0, 0, 1), "{url}");
            assert_eq!(generation, before.generation + 1, "{url}");
            let mut expected = before.clone();
            expected.remove_container(&removed.name).unwrap();
            expected.generation = generation;
            assert_eq!(reg.load().unwrap(), expected, "{url}");
            // Its address and namespace are free: another name takes both.
            let mut again = container(0, 2, 1);
            again.ip = removed.ip;
            again.netns = removed.netns.clone();
            add(&*reg, again.clone()).unwrap();
            assert!(reg.load().unwrap().containers.contains(&again), "{url}");
            assert!(matches!(
                reg.remove_container(&removed.name),
                Err(RegistryError::NotFound(_))
            ));
        }
    }

    const NAMES: [&str; 5] = ["a", "b", "c", "", "bad name"];
    const IPS: [[u8; 4]; 4] = [[10, 32, 0, 1], [10, 32, 0, 2], [10, 32, 1, 1], [0, 0, 0, 0]];
    const NETNS: [&str; 3] = ["/run/netns/1", "/run/netns/2", "rel/3"];

    #[derive(Clone, Debug)]
    enum Op {
        Add(ContainerRecord),
        Remove(&'static str),
        UpsertHost(HostRecord),
        RemoveHost(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        let add =
            (0..NAMES.len(), 0..IPS.len(), 0..NETNS.len(), 1..3u8).prop_map(|(n, i, ns, h)| {
                Op::Add(ContainerRecord {
                    name: NAMES[n].to_owned(),
                    tenant: "t1".to_owned(),
                    ip: Ipv4Addr::from(IPS[i]),
                    netns: PathBuf::from(NETNS[ns]),
                    host_ip: host_ip(h),
                })
            });
        prop_oneof![
            4 => add,
            2 => (0..NAMES.len()).prop_map(|n| Op::Remove(NAMES[n])),
            1 => (1..3u8, 7000..7003u16).prop_map(|(h, port)| Op::UpsertHost(HostRecord {
                peer_port: port,
                ..host(h)
            })),
            1 => (1..3u8).prop_map(Op::RemoveHost),
        ]
    }

    fn apply(op: &Op, s: &mut Snapshot) -> Result<(), RegistryError> {
        match op {
            Op::Add(rec) => s.add_container(rec.clone()),
            Op::Remove(name) => s.remove_container(name).map(drop),
            Op::UpsertHost(rec) => {
                s.upsert_host(rec.clone());
                Ok(())
            }
            Op::RemoveHost(n) => {
                s.remove_host(host(*n).host_ip);
                Ok(())
            }
        }
    }

    /// The proptest cases share one etcd (each case under its own prefix).
    fn model_etcd() -> &'static Mutex<Option<TestEtcd>> {
        static ETCD: Mutex<Option<TestEtcd>> = Mutex::new(None);
        &ETCD
    }

    #[test]
    fn backends_match_in_memory_snapshot() {
        // Started and dropped by this test's thread (proptest runs the cases on it).
        *model_etcd().lock().unwrap() = Some(TestEtcd::start());
        model_cases();
        *model_etcd().lock().unwrap() = None;
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 16,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Both backends behave exactly like the in-memory snapshot (order of records included).
        fn model_cases(ops in proptest::collection::vec(op(), 0..20)) {
            let dir = tempfile::tempdir().unwrap();
            let urls = {
                let etcd = model_etcd().lock().unwrap();
                fresh_urls(&dir, etcd.as_ref().unwrap())
            };
            for url in urls {
                let reg = registry::open(&url).unwrap();
                let mut model = Snapshot::default();
                for op in &ops {
                    // Removals the way `container rm` makes them.
                    let stored = match op {
                        Op::Remove(name) => reg.remove_container(name).and_then(|_| reg.load()),
                        _ => reg.update(&mut |s| apply(op, s)),
                    };
                    let mut next = model.clone();
                    let expected = apply(op, &mut next);
                    match (stored, expected) {
                        (Ok(stored), Ok(())) => {
                            next.generation += 1;
                            model = next;
                            prop_assert_eq!(stored, model.clone());
                        }
                        (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                        (stored, expected) => prop_assert!(
                            false, "{}: {:?}: stored {:?}, model {:?}", url, op, stored, expected
                        ),
                    }
                }
                prop_assert_eq!(reg.load().unwrap(), model);
            }
        }
    }
}

/// Two hosts (two handles, as two machines' daemons would have) claim one overlay address, or
/// one container name, at the same moment: exactly one wins, the other gets the duplicate error.
#[test]
fn racing_hosts_never_share_an_ip_or_a_name() {
    const ROUNDS: usize = 10;
    let etcd = TestEtcd::start();
    let url = etcd.server.url("/race");
    let a = registry::open(&url).unwrap();
    let b = registry::open(&url).unwrap();
    for round in 0..ROUNDS {
        let mut rec_a = container(1, round, 1);
        let mut rec_b = container(2, round, 2);
        if round % 2 == 0 {
            rec_b.ip = rec_a.ip;
        } else {
            rec_b.name = rec_a.name.clone();
        }
        rec_a.netns = PathBuf::from(format!("/run/netns/a{round}"));
        let barrier = Barrier::new(2);
        let (ra, rb) = thread::scope(|scope| {
            let ta = scope.spawn(|| {
                barrier.wait();
                add(&*a, rec_a.clone())
            });
            let tb = scope.spawn(|| {
                barrier.wait();
                add(&*b, rec_b.clone())
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let loser = match (&ra, &rb) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
            _ => panic!("round {round}: both or neither won: {ra:?} / {rb:?}"),
        };
        assert!(
            matches!(
                loser,
                RegistryError::DuplicateIp { .. } | RegistryError::DuplicateName(_)
            ),
            "round {round}: {loser}"
        );
    }
    let s = a.load().unwrap();
    assert_eq!(s.containers.len(), ROUNDS);
    s.validate().unwrap();
}

/// The body of the holder process (run by `records_go_with_the_process_holding_them`): registers
/// its host and containers, holds the host, says it is ready and waits to be killed.
#[test]
fn holder_child() {
    let (Ok(url), Ok(n)) = (
        std::env::var(HOLDER_URL_ENV),
        std::env::var(HOLDER_HOST_ENV),
    ) else {
        return;
    };
    let n: u8 = n.parse().unwrap();
    let reg = registry::open(&url).unwrap();
    // With a watch (a daemon's way), the keeper learns what the host serves from it: the
    // containers are registered after the hold, so that the watch sees them held.
    let watch = std::env::var_os(HOLDER_WATCH_ENV).map(|_| reg.watch().unwrap());
    add_host(&*reg, host(n)).unwrap();
    if watch.is_none() {
        for i in 0..HOLDER_CONTAINERS {
            add(&*reg, container(n as usize, i, n)).unwrap();
        }
    }
    reg.hold_host(&host(n)).unwrap();
    if watch.is_some() {
        for i in 0..HOLDER_CONTAINERS {
            add(&*reg, container(n as usize, i, n)).unwrap();
        }
    }
    println!("{HOLDER_READY}");
    // Bounded: the parent kills us long before.
    thread::sleep(DEADLINE);
}

fn spawn_holder(url: &str, n: u8) -> Child {
    spawn_holder_with(url, n, false)
}

/// [`spawn_holder`], with a watch on the registry too if `watch`.
fn spawn_holder_with(url: &str, n: u8, watch: bool) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    if watch {
        command.env(HOLDER_WATCH_ENV, "1");
    }
    let mut child = command
        .args(["--exact", "holder_child", "--test-threads=1", "--nocapture"])
        .env(HOLDER_URL_ENV, url)
        .env(HOLDER_HOST_ENV, n.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The harness prints its own text around ours. The child ends within DEADLINE.
    let ready = lines.any(|line| line.is_ok_and(|l| l.contains(HOLDER_READY)));
    assert!(ready, "the holder process did not get ready");
    child
}

/// A host whose holding process is killed disappears, with its containers, within the lease's
/// time to live plus slack; a host still held stays, however long it lives past the TTL.
#[test]
fn records_go_with_the_process_holding_them() {
    let etcd = TestEtcd::start();
    let url = etcd.server.url("/liveness");
    let reg = registry::open(&url).unwrap();
    let mut doomed = spawn_holder(&url, 1);
    let mut survivor = spawn_holder(&url, 2);
    let ttl = Duration::from_secs(LEASE_TTL);

    // Past the TTL while both live: the renewals work.
    thread::sleep(ttl + EXPIRY_SLACK);
    let s = reg.load().unwrap();
    assert_eq!(s.hosts.len(), 2, "{s:?}");
    assert_eq!(s.containers.len(), 2 * HOLDER_CONTAINERS);

    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let gone = wait_until(ttl + EXPIRY_SLACK, || {
        let s = reg.load().unwrap();
        s.host(host_ip(1)).is_none() && s.containers_on(host_ip(1)).count() == 0
    });
    assert!(gone, "host 1 still registered: {:?}", reg.load().unwrap());
    let s = reg.load().unwrap();
    assert!(s.host(host_ip(2)).is_some());
    assert_eq!(s.containers_on(host_ip(2)).count(), HOLDER_CONTAINERS);
    // The addresses of the dead host are free again.
    add(&*reg, container(1, 0, 2)).unwrap();

    survivor.kill().unwrap();
    survivor.wait().unwrap();
}

/// A lease that expires while its holder lives (here revoked by hand; in life, a partition or a
/// stall longer than the TTL): the holder writes its host record again, and the containers it
/// served with it, on a new lease.
#[test]
fn a_lost_lease_costs_no_registration() {
    lost_lease_written_back(false);
}

/// The same with the holder following the registry with a watch, as a daemon does: the keeper
/// then knows what its host serves from the watch, without reading the registry.
#[test]
fn a_lost_lease_costs_no_registration_with_a_watch() {
    lost_lease_written_back(true);
}

fn lost_lease_written_back(watch: bool) {
    let etcd = TestEtcd::start();
    let url = etcd.server.url("/relost");
    let reg = registry::open(&url).unwrap();
    let mut holder = spawn_holder_with(&url, 3, watch);
    // The keeper has looked at what the host serves once its first renewal went through.
    thread::sleep(Duration::from_secs(LEASE_TTL / 2));
    let key = format!("/relost/v1/hosts/{}", host_ip(3));
    let range = raw_post(
        &etcd,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64(&key)),
    );
    let lease = range["kvs"][0]["lease"]
        .as_str()
        .expect("the host record has a lease")
        .to_owned();
    raw_post(&etcd, "/v3/lease/revoke", &format!(r#"{{"ID":"{lease}"}}"#));
    let s = reg.load().unwrap();
    assert!(s.host(host_ip(3)).is_none(), "{s:?}");
    assert_eq!(s.containers_on(host_ip(3)).count(), 0);
    let back = wait_until(Duration::from_secs(LEASE_TTL) + EXPIRY_SLACK, || {
        let s = reg.load().unwrap();
        s.host(host_ip(3)).is_some() && s.containers_on(host_ip(3)).count() == HOLDER_CONTAINERS
    });
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(back, "not written back: {:?}", reg.load().unwrap());
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// POSTs `body` to etcd's JSON gateway at `path` (with curl); the parsed answer.
fn raw_post(etcd: &TestEtcd, path: &str, body: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-X", "POST", "-d", body])
        .arg(format!("http://{}{path}", etcd.server.endpoint()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// With etcd down every operation fails with a clear error (and returns); when etcd comes back
/// from its data directory, everything is still there, held leases included, even when etcd was
/// away for longer than the leases' time to live.
#[test]
fn etcd_down_and_restarted_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = EtcdServer::start(dir.path());
    let url = server.url("/restart");
    let reg = registry::open(&url).unwrap();
    add_host(&*reg, host(1)).unwrap();
    for i in 0..30 {
        add(&*reg, container(1, i, 1)).unwrap();
    }
    reg.hold_host(&host(1)).unwrap();
    let before = reg.load().unwrap();

    // Killed and restarted at once: nothing lost.
    server.restart();
    assert_eq!(reg.load().unwrap(), before);

    server.kill();
    for err in [
        reg.load().unwrap_err(),
        add(&*reg, container(2, 0, 1)).unwrap_err(),
        reg.fingerprint().unwrap_err(),
    ] {
        assert!(
            matches!(err, RegistryError::EtcdUnreachable { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&server.endpoint()), "{err}");
    }
    // Away for longer than a lease lives: the keeper says it cannot renew.
    thread::sleep(Duration::from_secs(LEASE_TTL) + Duration::from_secs(2));
    let problem = reg.liveness_problem();
    assert!(
        problem
            .as_deref()
            .is_some_and(|p| p.contains("no endpoint answered")),
        "{problem:?}"
    );
    server.restart();
    assert_eq!(reg.load().unwrap(), before, "{}", server.log_text());
    // Still held a lease's lifetime later: the keeper renewed it after the return.
    thread::sleep(Duration::from_secs(LEASE_TTL) + EXPIRY_SLACK);
    assert_eq!(reg.load().unwrap(), before);
    assert_eq!(reg.liveness_problem(), None);
    add(&*reg, container(2, 0, 1)).unwrap();
}

/// A backend URL that names nothing listening fails fast with the endpoint in the message; one
/// endpoint down out of two is no error.
#[test]
fn endpoints_fail_over() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let reg = registry::open(&format!("etcd://127.0.0.1:{dead_port}/x")).unwrap();
    let err = reg.load().unwrap_err();
    assert!(
        matches!(err, RegistryError::EtcdUnreachable { .. })
            && err.to_string().contains(&dead_port.to_string()),
        "{err}"
    );
    let etcd = TestEtcd::start();
    let both = format!(
        "etcd://127.0.0.1:{dead_port},{}/failover",
        etcd.server.endpoint()
    );
    let reg = registry::open(&both).unwrap();
    add(&*reg, container(0, 0, 1)).unwrap();
    assert_eq!(reg.load().unwrap().containers.len(), 1);
}

/// Puts `value` at `key` straight into etcd (with curl, through the JSON gateway), the way a
/// tool or a buggy writer could.
fn raw_put(etcd: &TestEtcd, key: &str, value: &str) {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let body = format!(r#"{{"key":"{}","value":"{}"}}"#, b64(key), b64(value));
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-X", "POST", "-d", &body])
        .arg(format!("http://{}/v3/kv/put", etcd.server.endpoint()))
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("revision"),
        "{out:?}"
    );
}

/// Records under the prefix that cannot be parsed, or that contradict each other, are reported
/// with the key, and no update is made on top of them; keys of a later layout are left alone.
#[test]
fn corrupt_keys_are_reported_and_left_alone() {
    freeflow_testbed::test_support::require_programs(&["curl"], "curl");
    let etcd = TestEtcd::start();
    let url = etcd.server.url("/corrupt");
    let reg = registry::open(&url).unwrap();
    add(&*reg, container(0, 0, 1)).unwrap();
    // A key this layout does not know is not ours: ignored, kept.
    raw_put(&etcd, "/corrupt/v1/later/x", "something");
    add(&*reg, container(0, 1, 1)).unwrap();

    let cases = [
        ("/corrupt/v1/containers/w0-c9", "{not json"),
        (
            "/corrupt/v1/containers/w0-c9",
            // Valid, but under another container's name.
            r#"{"name":"w0-c0","tenant":"t","ip":"10.32.9.9","netns":"/run/netns/x","host_ip":"192.168.100.1"}"#,
        ),
        (
            "/corrupt/v1/containers/w0-c9",
            // Valid, under its own name, but with w0-c0's overlay address.
            r#"{"name":"w0-c9","tenant":"t","ip":"10.32.0.1","netns":"/run/netns/x","host_ip":"192.168.100.1"}"#,
        ),
        ("/corrupt/v1/generation", "many"),
    ];
    for (key, value) in cases {
        raw_put(&etcd, key, value);
        let err = reg.load().unwrap_err();
        assert!(
            matches!(&err, RegistryError::EtcdCorrupt { .. }) && err.is_corrupt(),
            "{value}: {err:?}"
        );
        assert!(err.to_string().contains("/corrupt/v1/"), "{err}");
        let mut called = false;
        let err = reg
            .update(&mut |s| {
                called = true;
                s.add_container(container(0, 5, 1))
            })
            .unwrap_err();
        assert!(matches!(err, RegistryError::EtcdCorrupt { .. }), "{err:?}");
        assert!(!called, "{value}: the closure ran on a corrupt registry");
        // Repaired by hand: usable again.
        let repair = if key.ends_with("generation") {
            "2"
        } else {
            r#"{"name":"w0-c9","tenant":"t","ip":"10.32.9.9","netns":"/run/netns/x9","host_ip":"192.168.100.1"}"#
        };
        raw_put(&etcd, key, repair);
        reg.load().unwrap();
    }
    add(&*reg, container(0, 5, 1)).unwrap();
    let s = reg.load().unwrap();
    assert_eq!(s.containers.len(), 4, "{s:?}");
}

/// Takes what `watch` pushes until its newest snapshot equals what `reg` reads from etcd
/// (bounded by [`DEADLINE`]); returns that snapshot, or panics with both sides.
fn watched_until_equal(
    watch: &registry::RegistryWatch,
    reg: &dyn Registry,
    seen: &mut Option<Snapshot>,
    when: &str,
) -> Snapshot {
    let equal = wait_until(DEADLINE, || {
        while let Some(news) = watch.take() {
            if let Ok(snapshot) = news {
                *seen = Some(snapshot);
            }
        }
        seen.is_some() && seen.as_ref() == reg.load().ok().as_ref()
    });
    assert!(
        equal,
        "{when}: the watch holds {seen:?}\nbut etcd holds {:?}",
        reg.load()
    );
    seen.clone().unwrap()
}

/// One watch follows etcd: its snapshot equals a full read after a burst of concurrent
/// changes (adds and removals from several writers), after etcd compacted its history, and after
/// etcd was killed (the watch reports the error) and restarted (it starts over from a full read).
/// The file backend has no watch (its users poll the fingerprint).
#[test]
fn watch_equals_etcd_after_bursts_compaction_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let file = registry::open(&format!("file:{}/r.json", dir.path().display())).unwrap();
    assert!(file.watch().unwrap().is_none());

    let mut server = EtcdServer::start(dir.path());
    let url = server.url("/watched");
    let reg = registry::open(&url).unwrap();
    add_host(&*reg, host(1)).unwrap();
    let watch = reg.watch().unwrap().expect("the etcd registry has a watch");
    let mut seen = None;
    watched_until_equal(&watch, &*reg, &mut seen, "at the start");

    // A burst: four writers, each adding 25 containers and removing every third again.
    const WRITERS: usize = 4;
    const EACH: usize = 25;
    thread::scope(|scope| {
        for worker in 0..WRITERS {
            let url = url.clone();
            scope.spawn(move || {
                let reg = registry::open(&url).unwrap();
                for i in 0..EACH {
                    add(&*reg, container(worker, i, 1)).unwrap();
                    if i % 3 == 2 {
                        let name = container(worker, i - 1, 1).name;
                        reg.update(&mut |s| s.remove_container(&name).map(drop))
                            .unwrap();
                    }
                }
            });
        }
    });
    let after_burst = watched_until_equal(&watch, &*reg, &mut seen, "after the burst");
    assert_eq!(after_burst.containers.len(), WRITERS * (EACH - EACH / 3));

    // Compaction of everything up to now, then more changes the watch must still see.
    let endpoint = server.endpoint();
    let range = post_to(
        &endpoint,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64("x")),
    );
    let revision = range["header"]["revision"].as_str().unwrap().to_owned();
    let compacted = post_to(
        &endpoint,
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{revision}","physical":true}}"#),
    );
    assert!(compacted.get("error").is_none(), "{compacted}");
    for i in 0..10 {
        add(&*reg, container(WRITERS, i, 1)).unwrap();
    }
    let after_compaction = watched_until_equal(&watch, &*reg, &mut seen, "after the compaction");
    assert_eq!(
        after_compaction.containers.len(),
        after_burst.containers.len() + 10
    );

    // etcd killed: the watch says so (and keeps nothing stale: it reports the error).
    let resyncs = watch.resyncs();
    server.kill();
    let reported = wait_until(DEADLINE, || {
        matches!(
            watch.take(),
            Some(Err(RegistryError::EtcdUnreachable { .. }))
        )
    });
    assert!(reported, "the watch did not report etcd's absence");
    server.restart();
    for i in 10..20 {
        add(&*reg, container(WRITERS, i, 1)).unwrap();
    }
    let after_restart = watched_until_equal(&watch, &*reg, &mut seen, "after etcd restarted");
    assert_eq!(
        after_restart.containers.len(),
        after_burst.containers.len() + 20
    );
    assert!(watch.resyncs() > resyncs, "no resync after the restart");

    // Restarted again at once, with a removal made while the watch reconnects.
    server.restart();
    reg.update(&mut |s| s.remove_container("w0-c0").map(drop))
        .unwrap();
    let last = watched_until_equal(&watch, &*reg, &mut seen, "after a second restart");
    assert!(last.container("w0-c0").is_none());
}

/// POSTs `body` to the etcd gateway at `endpoint` (with curl); the parsed answer.
fn post_to(endpoint: &str, path: &str, body: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-X", "POST", "-d", body])
        .arg(format!("http://{endpoint}{path}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}
