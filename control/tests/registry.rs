//! Tests of `freeflow_control::registry` through its public interface, on real files in
//! temporary directories, with real threads and real processes where concurrency matters.

use std::cell::RefCell;
use std::fs;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use freeflow_control::registry::{
    self, ContainerRecord, FileRegistry, HostRecord, Registry, RegistryError, Snapshot,
};

/// Environment variable that turns `registry_worker_child` into a worker: the registry path.
const WORKER_PATH_ENV: &str = "FREEFLOW_REGISTRY_TEST_WORKER_PATH";
/// The worker's number, which selects the records it adds.
const WORKER_ID_ENV: &str = "FREEFLOW_REGISTRY_TEST_WORKER_ID";
/// Records each worker process adds.
const ADDS_PER_PROCESS: usize = 25;
/// Upper bound for anything that waits on other threads or processes.
const DEADLINE: Duration = Duration::from_secs(120);

fn container(worker: usize, i: usize) -> ContainerRecord {
    ContainerRecord {
        name: format!("w{worker}-c{i}"),
        tenant: format!("tenant{}", worker % 3),
        ip: Ipv4Addr::new(10, 32, worker as u8, i as u8 + 1),
        netns: PathBuf::from(format!("/run/netns/ff-w{worker}-c{i}")),
        host_ip: Ipv4Addr::new(192, 168, 100, 1 + (worker % 2) as u8),
    }
}

fn host(n: u8) -> HostRecord {
    HostRecord {
        host_ip: Ipv4Addr::new(192, 168, 100, n),
        peer_port: 7000 + u16::from(n),
        vnet_prefix: format!("10.32.{n}.0/24").parse().unwrap(),
        dir: PathBuf::from(format!("/freeflow/h{n}")),
    }
}

fn file_url(path: &Path) -> String {
    format!("file:{}", path.display())
}

fn open_file(path: &Path) -> Box<dyn Registry> {
    registry::open(&file_url(path)).unwrap()
}

fn add(reg: &dyn Registry, rec: ContainerRecord) -> Result<Snapshot, RegistryError> {
    reg.update(&mut |s| s.add_container(rec.clone()))
}

fn file_bytes(path: &Path) -> Option<Vec<u8>> {
    match fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

/// Every update in these tests adds exactly one container, so a consistent snapshot has as
/// many containers as its generation.
fn assert_consistent(s: &Snapshot) {
    assert_eq!(
        s.containers.len() as u64,
        s.generation,
        "snapshot at generation {} has {} containers",
        s.generation,
        s.containers.len()
    );
}

/// Sets the flag when dropped, so that a panicking writer still stops the reader.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Loads in a loop until `done` is set, checking every snapshot, bounded in count and time.
/// Returns how many loads it did.
fn read_until_done(reg: &dyn Registry, done: &AtomicBool) -> u64 {
    let start = Instant::now();
    let mut last_generation = 0;
    let mut loads = 0;
    while !done.load(Ordering::Acquire) && loads < 2_000_000 && start.elapsed() < DEADLINE {
        let s = reg
            .load()
            .unwrap_or_else(|e| panic!("load {loads} failed: {e}"));
        assert!(s.generation >= last_generation, "generation went backwards");
        assert_consistent(&s);
        last_generation = s.generation;
        loads += 1;
    }
    loads
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.json");
    let reg = open_file(&path);
    assert_eq!(reg.load().unwrap(), Snapshot::default());
    assert!(!path.exists(), "load must not create the file");
    assert_eq!(reg.url(), file_url(&path));

    let written = reg
        .update(&mut |s| {
            s.upsert_host(host(1));
            s.upsert_host(host(2));
            s.add_container(container(0, 0))?;
            s.add_container(container(1, 0))
        })
        .unwrap();
    assert_eq!(written.generation, 1);
    assert_eq!(reg.load().unwrap(), written);
    // A second handle, and the concrete type, see the same.
    assert_eq!(open_file(&path).load().unwrap(), written);
    assert_eq!(FileRegistry::new(&path).unwrap().load().unwrap(), written);

    let s = reg.load().unwrap();
    assert_eq!(s.container("w1-c0"), Some(&container(1, 0)));
    assert_eq!(
        s.container_by_ip(container(0, 0).ip),
        Some(&container(0, 0))
    );
    assert_eq!(s.containers_on(host(1).host_ip).count(), 1);
    assert_eq!(s.host(host(2).host_ip), Some(&host(2)));

    let text = fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("{\n  \"format\": \"freeflow-registry\",\n  \"version\": 1,"),
        "{text}"
    );
    assert!(text.contains("\"vnet_prefix\": \"10.32.1.0/24\""), "{text}");
    assert!(text.contains("\"ip\": \"10.32.0.1\""), "{text}");
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let lock = dir.path().join("registry.json.lock");
    assert_eq!(
        fs::metadata(&lock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let removed = reg
        .update(&mut |s| {
            s.remove_host(host(2).host_ip);
            s.remove_container("w0-c0").map(drop)
        })
        .unwrap();
    assert_eq!(removed.generation, 2);
    assert_eq!(removed.hosts, vec![host(1)]);
    assert_eq!(removed.containers, vec![container(1, 0)]);
    assert_eq!(reg.load().unwrap(), removed);
}

#[test]
fn generation_increments_once_per_update() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open_file(&dir.path().join("r.json"));
    for expected in 1..=5 {
        // Whatever the closure does to the generation, the store decides it.
        let s = reg
            .update(&mut |s| {
                s.generation = 1000;
                Ok(())
            })
            .unwrap();
        assert_eq!(s.generation, expected);
        assert_eq!(reg.load().unwrap().generation, expected);
    }
}

#[test]
fn validation_errors_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    let reg = open_file(&path);
    let base = container(0, 0);
    add(&*reg, base.clone()).unwrap();
    // What the file holds before each rejected update (and so after it).
    let before = RefCell::new(file_bytes(&path).unwrap());

    let with = |f: &dyn Fn(&mut ContainerRecord)| {
        let mut r = container(0, 1);
        f(&mut r);
        r
    };
    let check = |rec: ContainerRecord, ok: &dyn Fn(&RegistryError) -> bool| {
        let err = add(&*reg, rec.clone()).unwrap_err();
        assert!(ok(&err), "{rec:?}: unexpected error {err:?}");
        assert_eq!(
            file_bytes(&path).unwrap(),
            *before.borrow(),
            "{rec:?} changed the file"
        );
        err
    };

    let err = check(
        with(&|r| r.name = base.name.clone()),
        &|e| matches!(e, RegistryError::DuplicateName(n) if *n == base.name),
    );
    assert!(err.to_string().contains("w0-c0"), "{err}");
    let err = check(
        with(&|r| r.ip = base.ip),
        &|e| matches!(e, RegistryError::DuplicateIp { ip, existing, .. } if *ip == base.ip && *existing == base.name),
    );
    assert!(err.to_string().contains("w0-c0"), "{err}");
    let err = check(
        with(&|r| r.netns = base.netns.clone()),
        &|e| matches!(e, RegistryError::DuplicateNetns { existing, .. } if *existing == base.name),
    );
    assert!(err.to_string().contains("w0-c0"), "{err}");

    let long = "n".repeat(64);
    for bad in [
        "",
        "has space",
        "a/b",
        "..",
        ".",
        "ümlaut",
        "tab\t",
        long.as_str(),
    ] {
        check(
            with(&|r| r.name = bad.to_owned()),
            &|e| matches!(e, RegistryError::InvalidName { what: "container name", value } if value == bad),
        );
        check(
            with(&|r| r.tenant = bad.to_owned()),
            &|e| matches!(e, RegistryError::InvalidName { what: "tenant", value } if value == bad),
        );
    }
    // The longest allowed name is fine.
    add(&*reg, with(&|r| r.name = "n".repeat(63))).unwrap();
    *before.borrow_mut() = file_bytes(&path).unwrap();

    for bad in [
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "239.1.2.3",
        "127.0.0.1",
    ] {
        let ip: Ipv4Addr = bad.parse().unwrap();
        check(
            with(&|r| r.ip = ip),
            &|e| matches!(e, RegistryError::InvalidAddress { field: "overlay ip", ip: got, .. } if *got == ip),
        );
    }
    for bad in ["0.0.0.0", "255.255.255.255", "224.0.0.1"] {
        let ip: Ipv4Addr = bad.parse().unwrap();
        check(with(&|r| r.host_ip = ip), &|e| {
            matches!(
                e,
                RegistryError::InvalidAddress {
                    field: "host_ip",
                    ..
                }
            )
        });
    }
    check(with(&|r| r.netns = PathBuf::from("run/netns/x")), &|e| {
        matches!(e, RegistryError::InvalidPath { .. })
    });
    assert_eq!(reg.load().unwrap().generation, 2);
}

#[test]
fn remove_missing_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    let reg = open_file(&path);
    let err = reg
        .update(&mut |s| s.remove_container("ghost").map(drop))
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::NotFound(n) if n == "ghost"),
        "{err}"
    );
    assert!(
        !path.exists(),
        "a failed first update must not create the file"
    );

    add(&*reg, container(0, 0)).unwrap();
    let before = file_bytes(&path).unwrap();
    let err = reg
        .update(&mut |s| s.remove_container("ghost").map(drop))
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)));
    assert_eq!(file_bytes(&path).unwrap(), before);
}

#[test]
fn failing_closure_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    let reg = open_file(&path);
    add(&*reg, container(0, 0)).unwrap();
    let before = file_bytes(&path).unwrap();
    let fingerprint = reg.fingerprint().unwrap();

    // The closure changes plenty and then fails.
    let err = reg
        .update(&mut |s| {
            s.add_container(container(0, 1))?;
            s.upsert_host(host(1));
            s.remove_container("w0-c0")?;
            Err(RegistryError::NotFound("on purpose".into()))
        })
        .unwrap_err();
    assert!(matches!(&err, RegistryError::NotFound(n) if n == "on purpose"));
    assert_eq!(file_bytes(&path).unwrap(), before);
    assert_eq!(reg.load().unwrap().generation, 1);
    assert_eq!(reg.fingerprint().unwrap(), fingerprint);

    // Records pushed past the checks are caught before anything is written.
    let err = reg
        .update(&mut |s| {
            s.containers.push(container(0, 0));
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(err, RegistryError::DuplicateName(_)), "{err}");
    let err = reg
        .update(&mut |s| {
            s.hosts.push(host(1));
            s.hosts.push(host(1));
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(err, RegistryError::DuplicateHost(_)), "{err}");
    assert_eq!(file_bytes(&path).unwrap(), before);

    // No temporary files were left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["r.json", "r.json.lock"], "{names:?}");
}

#[test]
fn missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let reg = open_file(&missing.join("r.json"));
    // Reading a registry that was never written is fine ...
    assert_eq!(reg.load().unwrap(), Snapshot::default());
    // ... but writing does not create directories behind the user's back.
    let err = add(&*reg, container(0, 0)).unwrap_err();
    match &err {
        RegistryError::Io { path, .. } => assert_eq!(path, &missing),
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(err.to_string().contains("no-such-dir"), "{err}");
    assert!(!missing.exists());
}

#[test]
fn threads_lose_no_update() {
    const THREADS: usize = 8;
    const ADDS: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    let barrier = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|w| {
            let path = path.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let reg = open_file(&path);
                barrier.wait();
                for i in 0..ADDS {
                    add(&*reg, container(w, i)).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let s = open_file(&path).load().unwrap();
    assert_eq!(s.generation, (THREADS * ADDS) as u64);
    assert_eq!(s.containers.len(), THREADS * ADDS);
    for w in 0..THREADS {
        for i in 0..ADDS {
            assert_eq!(s.container(&container(w, i).name), Some(&container(w, i)));
        }
    }
}

#[test]
fn readers_never_see_a_partial_file() {
    const WRITERS: usize = 4;
    const ADDS: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    let done = AtomicBool::new(false);
    let loads = thread::scope(|scope| {
        let reader = scope.spawn(|| read_until_done(&*open_file(&path), &done));
        let stop_reader = SetOnDrop(&done);
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let path = &path;
                scope.spawn(move || {
                    let reg = open_file(path);
                    for i in 0..ADDS {
                        add(&*reg, container(w, i)).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        drop(stop_reader);
        reader.join().unwrap()
    });
    assert!(loads > 0);
    let s = open_file(&path).load().unwrap();
    assert_eq!(s.generation, (WRITERS * ADDS) as u64);
    assert_consistent(&s);
}

/// Runs as a worker process when the environment says so (see `processes_lose_no_update`);
/// as an ordinary test it does nothing.
#[test]
fn registry_worker_child() {
    let Ok(path) = std::env::var(WORKER_PATH_ENV) else {
        return;
    };
    let id: usize = std::env::var(WORKER_ID_ENV).unwrap().parse().unwrap();
    // A restrictive umask must not make the registry unreadable to other users.
    // SAFETY: umask only replaces the process's file mode mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    let reg = registry::open(&path).unwrap();
    for i in 0..ADDS_PER_PROCESS {
        add(&*reg, container(id, i)).unwrap();
    }
}

fn spawn_worker(path: &Path, id: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "registry_worker_child",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(WORKER_PATH_ENV, path)
        .env(WORKER_ID_ENV, id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for every child until the deadline; kills the rest if it passes.
fn wait_all(mut children: Vec<Child>) {
    let start = Instant::now();
    let mut failures = Vec::new();
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            if children[i].try_wait().unwrap().is_some() {
                let mut child = children.swap_remove(i);
                // Already reaped by `try_wait`; `wait` returns the saved status.
                let status = child.wait().unwrap();
                if !status.success() {
                    let mut stderr = String::new();
                    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
                    failures.push(format!("{status}: {stderr}"));
                }
            } else {
                i += 1;
            }
        }
        if start.elapsed() > DEADLINE {
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("{} worker processes did not finish in time", children.len());
        }
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        failures.is_empty(),
        "worker processes failed: {failures:#?}"
    );
}

#[test]
fn processes_lose_no_update() {
    const PROCESSES: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    let children: Vec<_> = (0..PROCESSES).map(|id| spawn_worker(&path, id)).collect();
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let reader = scope.spawn(|| read_until_done(&*open_file(&path), &done));
        let stop_reader = SetOnDrop(&done);
        wait_all(children);
        drop(stop_reader);
        reader.join().unwrap();
    });

    let s = open_file(&path).load().unwrap();
    assert_eq!(s.generation, (PROCESSES * ADDS_PER_PROCESS) as u64);
    assert_eq!(s.containers.len(), PROCESSES * ADDS_PER_PROCESS);
    for id in 0..PROCESSES {
        for i in 0..ADDS_PER_PROCESS {
            assert!(s.container(&container(id, i).name).is_some());
        }
    }
    // Written under umask 077, still 0644.
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
}

/// A valid registry file with two containers, as this build writes it.
fn valid_file(dir: &Path) -> Vec<u8> {
    let path = dir.join("valid.json");
    let reg = open_file(&path);
    add(&*reg, container(0, 0)).unwrap();
    add(&*reg, container(0, 1)).unwrap();
    fs::read(&path).unwrap()
}

#[test]
fn corrupt_files_are_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let valid = valid_file(dir.path());
    let valid_text = String::from_utf8(valid.clone()).unwrap();
    let duplicate = valid_text.replace("\"w0-c1\"", "\"w0-c0\"");
    assert_ne!(duplicate, valid_text);
    let wrong_type = valid_text.replacen("\"10.32.0.1\"", "12345", 1);
    assert_ne!(wrong_type, valid_text);

    #[derive(Debug)]
    enum Expect {
        Corrupt { with_position: bool },
        Version,
        Format,
    }
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "truncated",
            valid[..valid.len() / 2].to_vec(),
            Expect::Corrupt {
                with_position: true,
            },
        ),
        (
            "empty",
            Vec::new(),
            Expect::Corrupt {
                with_position: true,
            },
        ),
        (
            "garbage",
            vec![0xff, 0x00, 0x13, 0x37, b'{', 0x80, 0xfe],
            Expect::Corrupt {
                with_position: true,
            },
        ),
        (
            "trailing",
            [valid.as_slice(), b"}"].concat(),
            Expect::Corrupt {
                with_position: true,
            },
        ),
        (
            "wrong type",
            wrong_type.into_bytes(),
            Expect::Corrupt {
                with_position: true,
            },
        ),
        (
            "not an object",
            b"[1, 2, 3]\n".to_vec(),
            Expect::Corrupt {
                with_position: true,
            },
        ),
        (
            "duplicate names",
            duplicate.into_bytes(),
            Expect::Corrupt {
                with_position: false,
            },
        ),
        (
            "newer version",
            valid_text
                .replace("\"version\": 1", "\"version\": 2")
                .into_bytes(),
            Expect::Version,
        ),
        (
            "other format",
            valid_text
                .replace("freeflow-registry", "something-else")
                .into_bytes(),
            Expect::Format,
        ),
    ];

    for (what, bytes, expect) in cases {
        let path = dir.path().join(format!("{}.json", what.replace(' ', "-")));
        fs::write(&path, &bytes).unwrap();
        let reg = open_file(&path);
        let matches = |err: &RegistryError| match (&expect, err) {
            (Expect::Corrupt { with_position }, RegistryError::Corrupt { path: p, detail }) => {
                assert_eq!(p, &path);
                if *with_position {
                    assert!(
                        detail.contains("line") && detail.contains("column"),
                        "{detail}"
                    );
                }
                true
            }
            (Expect::Version, RegistryError::UnsupportedVersion { found: 2, .. }) => true,
            (Expect::Format, RegistryError::UnknownFormat { found, .. }) => {
                found == "something-else"
            }
            _ => false,
        };

        let err = reg.load().unwrap_err();
        assert!(matches(&err), "{what}: load gave {err:?}");
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()),
            "{what}: {message}"
        );
        assert!(message.contains("move"), "{what}: {message}");

        let mut called = false;
        let err = reg
            .update(&mut |s| {
                called = true;
                s.add_container(container(5, 5))
            })
            .unwrap_err();
        assert!(matches(&err), "{what}: update gave {err:?}");
        assert!(!called, "{what}: the closure ran on a corrupt file");
        assert_eq!(file_bytes(&path).unwrap(), bytes, "{what}: file changed");
        assert!(reg.fingerprint().is_ok());
    }
}

#[test]
fn fingerprint_tracks_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    let reg = open_file(&path);
    let other = open_file(&path);

    let missing = reg.fingerprint().unwrap();
    assert_eq!(reg.fingerprint().unwrap(), missing);
    add(&*reg, container(0, 0)).unwrap();
    let mut last = reg.fingerprint().unwrap();
    assert_ne!(last, missing);

    // Nothing changes: equal, from any handle, after loads too.
    reg.load().unwrap();
    assert_eq!(reg.fingerprint().unwrap(), last);
    assert_eq!(other.fingerprint().unwrap(), last);

    // Quick successive updates (within one timestamp tick, inode numbers possibly reused) are
    // all seen, also when the observer skips one.
    for i in 1..40 {
        add(&*other, container(0, i)).unwrap();
        let now = reg.fingerprint().unwrap();
        assert_ne!(now, last, "update {i} not seen");
        if i % 2 == 0 {
            last = now;
            continue;
        }
        other.update(&mut |_| Ok(())).unwrap();
        let after_two = reg.fingerprint().unwrap();
        assert_ne!(after_two, last, "two updates after {i} not seen");
        assert_ne!(after_two, now);
        last = after_two;
    }

    // The hardest case: two updates that leave the size alone. Each rename frees the previous
    // inode, so the file may alternate between two inode numbers, and both can fall within one
    // coarse timestamp tick; an observer that skipped one must still see a change.
    for i in 0..40 {
        let before = reg.fingerprint().unwrap();
        other.update(&mut |_| Ok(())).unwrap();
        other.update(&mut |_| Ok(())).unwrap();
        assert_ne!(reg.fingerprint().unwrap(), before, "round {i}");
    }

    // Removing the file is a change too.
    fs::remove_file(&path).unwrap();
    assert_eq!(reg.fingerprint().unwrap(), missing);
}

#[test]
fn open_urls() {
    // Opening an etcd registry contacts nobody; its URL comes back normalised.
    let etcd = registry::open("etcd://x").unwrap();
    assert_eq!(etcd.url(), "etcd://x:2379/freeflow");
    let err = registry::open("consul://x:8500/ff").unwrap_err();
    assert!(
        matches!(&err, RegistryError::UnsupportedBackend(s) if s == "consul"),
        "{err}"
    );
    assert!(
        err.to_string().contains("file") && err.to_string().contains("etcd://"),
        "{err}"
    );
    assert!(matches!(
        registry::open(""),
        Err(RegistryError::InvalidUrl(_))
    ));

    let dir = tempfile::tempdir().unwrap();
    // A path relative to the current directory, reaching the temporary directory.
    let cwd = std::env::current_dir().unwrap();
    let up = "../".repeat(cwd.components().count() - 1);
    let target = dir.path().strip_prefix("/").unwrap().join("rel.json");
    let relative = format!("{up}{}", target.display());
    for url in [format!("file:{relative}"), relative.clone()] {
        let reg = registry::open(&url).unwrap();
        assert!(reg.url().starts_with("file:/"), "{}", reg.url());
        add(&*reg, container(7, reg.load().unwrap().containers.len())).unwrap();
    }
    let s = open_file(&dir.path().join("rel.json")).load().unwrap();
    assert_eq!(s.generation, 2);

    // The URL of a handle opens the same registry elsewhere.
    let reg = open_file(&dir.path().join("rel.json"));
    assert_eq!(registry::open(&reg.url()).unwrap().load().unwrap(), s);
    let triple = format!("file://{}", dir.path().join("rel.json").display());
    assert_eq!(registry::open(&triple).unwrap().load().unwrap(), s);
}

#[test]
fn stale_temporary_files_are_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    let stale = dir.path().join("r.json.tmp.999999.3");
    let unrelated = dir.path().join("r.json.tmp.notes");
    fs::write(&stale, b"half a regis").unwrap();
    fs::write(&unrelated, b"keep me").unwrap();
    add(&*open_file(&path), container(0, 0)).unwrap();
    assert!(!stale.exists());
    assert!(unrelated.exists());
}

#[test]
fn symlinked_file_is_refused_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.json");
    add(&*open_file(&real), container(0, 0)).unwrap();
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let reg = open_file(&link);
    assert_eq!(reg.load().unwrap().containers.len(), 1);
    let err = add(&*reg, container(0, 1)).unwrap_err();
    assert!(matches!(err, RegistryError::Io { .. }), "{err}");
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

mod model {
    //! The file backend behaves exactly like the in-memory snapshot.

    use super::*;
    use proptest::prelude::*;

    const NAMES: [&str; 6] = ["a", "b", "c", "d", "", "bad name"];
    const TENANTS: [&str; 3] = ["t1", "t2", "no/slash"];
    const IPS: [[u8; 4]; 5] = [
        [10, 32, 0, 1],
        [10, 32, 0, 2],
        [10, 32, 0, 3],
        [10, 32, 1, 1],
        [0, 0, 0, 0],
    ];
    const NETNS: [&str; 4] = ["/run/netns/1", "/run/netns/2", "/run/netns/3", "rel/4"];

    #[derive(Clone, Debug)]
    enum Op {
        Add(ContainerRecord),
        Remove(&'static str),
        UpsertHost(HostRecord),
        RemoveHost(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        let add = (
            0..NAMES.len(),
            0..TENANTS.len(),
            0..IPS.len(),
            0..NETNS.len(),
            1..3u8,
        )
            .prop_map(|(n, t, i, ns, h)| {
                Op::Add(ContainerRecord {
                    name: NAMES[n].to_owned(),
                    tenant: TENANTS[t].to_owned(),
                    ip: Ipv4Addr::from(IPS[i]),
                    netns: PathBuf::from(NETNS[ns]),
                    host_ip: host(h).host_ip,
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

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 40,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn file_backend_matches_in_memory_snapshot(ops in proptest::collection::vec(op(), 0..24)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("r.json");
            let reg = open_file(&path);
            let mut model = Snapshot::default();
            for op in &ops {
                let stored = reg.update(&mut |s| apply(op, s));
                let mut next = model.clone();
                let expected = apply(op, &mut next);
                match (stored, expected) {
                    (Ok(stored), Ok(())) => {
                        next.generation += 1;
                        model = next;
                        prop_assert_eq!(stored, model.clone());
                    }
                    (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                    (stored, expected) => {
                        prop_assert!(false, "{:?}: file gave {:?}, model {:?}", op, stored, expected)
                    }
                }
            }
            prop_assert_eq!(reg.load().unwrap(), model);
        }
    }
}
