//! The router's verbs tables as a black box: a real freeflow-router process, a real verbs
//! attachment (this test process, registered by its own network namespace), requests on the
//! rings and the memory file on the attach connection, including the hostile variants of each.
//! Needs root (the router reads the network namespace of its callers); fails loudly without it.

mod common;

use common::{fresh_dir, router_cores, wait_until};
use freeflow_proto::attach::{attach, Session, ShimKind};
use freeflow_proto::control::{self, ContainerEntry, ControlRequest, ControlResponse};
use freeflow_proto::fdpass;
use freeflow_proto::identity::NetnsId;
use freeflow_proto::msg::{op, status, MsgHeader, HEADER_LEN};
use freeflow_proto::verbs::{
    self, access, Body, DeallocPd, DeregMr, Fnv1a, MemoryFileMsg, MrCreated, PdCreated, RegMr,
    TestDigest, TestRead, TestWrite, VerbsStatus, MEMORY_FILE_SIZE, REQUIRED_SEALS,
};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

/// Where the pretend process keeps its registered pages (only the file's offsets matter to the
/// router).
const BASE: u64 = 0x7f12_3456_0000;

struct Router {
    dir: PathBuf,
    child: Child,
}

impl Router {
    /// Starts a router, with the test hooks if `hooks`, and registers this process's network
    /// namespace as container "self".
    fn start(tag: &str, hooks: bool) -> Router {
        common::require_root("run these tests as root");
        let dir = fresh_dir(&format!("ff-verbs-{tag}-{}", std::process::id()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_freeflow-router"));
        command
            .arg("--dir")
            .arg(&dir)
            .arg("--state-dir")
            .arg(common::state_dir(&dir))
            .args(["--cores", &router_cores().to_string()])
            .env_remove("FREEFLOW_TEST_HOOKS")
            .stderr(std::fs::File::create(dir.join("router.log")).unwrap());
        if hooks {
            command.env("FREEFLOW_TEST_HOOKS", "1");
        }
        let router = Router {
            child: command.spawn().unwrap(),
            dir,
        };
        let registered = || {
            let r = control::call(
                &common::control_socket(&router.dir),
                &ControlRequest::SetContainers {
                    containers: vec![ContainerEntry {
                        name: "self".into(),
                        tenant: "t1".into(),
                        ip: Ipv4Addr::new(10, 32, 0, 9),
                        netns: NetnsId::current().unwrap(),
                    }],
                    network: None,
                    generation: None,
                },
                Duration::from_secs(5),
            );
            matches!(r, Ok(ControlResponse::Ok))
        };
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(10),
            registered,
            || format!("router did not start: {}", router.log()),
        );
        router
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("router.log")).unwrap_or_default()
    }

    fn attach(&self, kind: ShimKind) -> Session {
        attach(&self.dir, kind, Duration::from_secs(5)).unwrap()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One request, its reply's status and body.
fn call(session: &mut Session, opcode: u16, body: &[u8]) -> (u16, Vec<u8>) {
    let mut out = vec![0u8; session.slot_size()];
    let header = MsgHeader {
        opcode,
        cookie: 77,
        len: body.len() as u32,
        ..Default::default()
    };
    let reply = session
        .call(header, body, &mut out, Duration::from_secs(5))
        .unwrap();
    assert_eq!(reply.cookie, 77);
    let end = HEADER_LEN + reply.len as usize;
    (reply.status, out[HEADER_LEN..end].to_vec())
}

fn encoded<T: Body>(value: &T) -> Vec<u8> {
    let mut b = vec![0u8; T::LEN];
    value.encode(&mut b);
    b
}

/// A memfd of `size` bytes carrying `seals`.
fn memfd(size: u64, seals: i32) -> std::fs::File {
    let fd =
        freeflow_os::memfd::sized(c"ff-test", size, seals).expect("memfd_create, ftruncate, seals");
    std::fs::File::from(fd)
}

fn send_memory_file(session: &Session, size: u64, fds: &[&dyn AsFd]) {
    let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    fdpass::send_with_fds(
        session.connection().as_fd(),
        &MemoryFileMsg {
            size,
            file: freeflow_proto::verbs::OWN_MEMORY_FILE,
        }
        .encode(),
        &fds,
    )
    .unwrap();
}

fn ping(session: &mut Session) -> bool {
    let mut out = vec![0u8; session.slot_size()];
    let header = MsgHeader {
        opcode: op::PING,
        len: 0,
        ..Default::default()
    };
    session
        .call(header, &[], &mut out, Duration::from_secs(5))
        .is_ok()
}

fn wait_hung_up(session: &Session, router: &Router, what: &str) {
    wait_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        || session.router_hung_up(),
        || format!("{what}: the router kept the attachment\n{}", router.log()),
    );
}

#[test]
fn protection_domains_and_regions_over_the_rings() {
    let router = Router::start("pdmr", true);
    let mut s = router.attach(ShimKind::Verbs);

    let (st, body) = call(&mut s, verbs::op::ALLOC_PD, &[]);
    assert_eq!(st, status::OK);
    let pd = PdCreated::decode(&body).unwrap().pd;
    assert_eq!(
        call(&mut s, verbs::op::ALLOC_PD, &[0]).0,
        status::BAD_LENGTH
    );

    let reg = RegMr {
        pd,
        access: access::LOCAL_WRITE | access::REMOTE_READ,
        addr: BASE + 1000,
        length: 6000,
        iova: BASE + 1000,
        file: freeflow_proto::verbs::OWN_MEMORY_FILE,
        file_offset: 0,
    };
    // Before the memory file: refused, and the attachment stays.
    assert_eq!(
        call(&mut s, verbs::op::REG_MR, &encoded(&reg)).0,
        VerbsStatus::NoMemoryFile as u16
    );

    let file = memfd(MEMORY_FILE_SIZE, REQUIRED_SEALS);
    let pages: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 5) as u8).collect();
    file.write_all_at(&pages, BASE).unwrap();
    send_memory_file(&s, MEMORY_FILE_SIZE, &[&file]);
    let (st, body) = call(&mut s, verbs::op::REG_MR, &encoded(&reg));
    assert_eq!(st, status::OK, "{}", router.log());
    let mr = MrCreated::decode(&body).unwrap();
    assert!(mr.mr != 0 && mr.lkey != mr.rkey);

    // The router reads the bytes of the file through its own mapping...
    let read = TestRead {
        pd,
        lkey: mr.lkey,
        addr: BASE + 1000,
        length: 6000,
    };
    let (st, body) = call(&mut s, verbs::op::TEST_READ, &encoded(&read));
    assert_eq!(st, status::OK);
    assert_eq!(
        TestDigest::decode(&body).unwrap().digest,
        Fnv1a::digest(&pages[1000..7000])
    );
    // ... and sees what is written afterwards (by the "application", into the file) ...
    file.write_all_at(b"later", BASE + 4096).unwrap();
    let mut expected = pages.clone();
    expected[4096..4101].copy_from_slice(b"later");
    let (_, body) = call(&mut s, verbs::op::TEST_READ, &encoded(&read));
    assert_eq!(
        TestDigest::decode(&body).unwrap().digest,
        Fnv1a::digest(&expected[1000..7000])
    );
    // ... and its writes land in the file.
    let write = TestWrite {
        pd,
        lkey: mr.lkey,
        addr: BASE + 6990,
        data: b"0123456789".to_vec(),
    };
    let mut wbody = vec![0u8; 64];
    let n = write.encode(&mut wbody).unwrap();
    assert_eq!(
        call(&mut s, verbs::op::TEST_WRITE, &wbody[..n]).0,
        status::OK
    );
    let mut back = [0u8; 12];
    file.read_exact_at(&mut back, BASE + 6989).unwrap();
    assert_eq!(
        &back,
        &[
            pages[6989],
            b'0',
            b'1',
            b'2',
            b'3',
            b'4',
            b'5',
            b'6',
            b'7',
            b'8',
            b'9',
            pages[7000]
        ]
    );

    // Wrong key, range beyond the region, integer overflow: protection errors.
    for bad in [
        TestRead {
            lkey: mr.rkey,
            ..read
        },
        TestRead {
            lkey: mr.lkey ^ 0x8000_0000,
            ..read
        },
        TestRead {
            length: 6001,
            ..read
        },
        TestRead {
            addr: BASE + 999,
            ..read
        },
        TestRead {
            addr: u64::MAX - 10,
            length: 20,
            ..read
        },
        TestRead { pd: pd + 1, ..read },
    ] {
        assert_eq!(
            call(&mut s, verbs::op::TEST_READ, &encoded(&bad)).0,
            VerbsStatus::Protection as u16,
            "{bad:?}"
        );
    }
    // Invalid registrations.
    for (bad, expected) in [
        (
            RegMr {
                access: access::REMOTE_WRITE,
                ..reg
            },
            VerbsStatus::Invalid,
        ),
        (RegMr { length: 0, ..reg }, VerbsStatus::Invalid),
        (RegMr { pd: 0, ..reg }, VerbsStatus::BadHandle),
        (
            RegMr {
                addr: BASE + 8192,
                iova: BASE + 8192,
                ..reg
            },
            VerbsStatus::Fault,
        ),
    ] {
        assert_eq!(
            call(&mut s, verbs::op::REG_MR, &encoded(&bad)).0,
            expected as u16,
            "{bad:?}"
        );
    }
    assert_eq!(
        call(&mut s, verbs::op::REG_MR, &[1, 2, 3]).0,
        status::BAD_LENGTH
    );

    // Teardown in the wrong order, then the right one.
    let dealloc = encoded(&DeallocPd { pd });
    assert_eq!(
        call(&mut s, verbs::op::DEALLOC_PD, &dealloc).0,
        VerbsStatus::Busy as u16
    );
    let dereg = encoded(&DeregMr { mr: mr.mr });
    assert_eq!(call(&mut s, verbs::op::DEREG_MR, &dereg).0, status::OK);
    assert_eq!(
        call(&mut s, verbs::op::DEREG_MR, &dereg).0,
        VerbsStatus::BadHandle as u16
    );
    assert_eq!(
        call(&mut s, verbs::op::TEST_READ, &encoded(&read)).0,
        VerbsStatus::Protection as u16
    );
    assert_eq!(call(&mut s, verbs::op::DEALLOC_PD, &dealloc).0, status::OK);
    assert!(ping(&mut s), "the attachment survived every refusal");
}

#[test]
fn hostile_memory_files_cost_only_their_own_attachment() {
    let router = Router::start("hostile", false);
    let mut good = router.attach(ShimKind::Verbs);
    assert!(ping(&mut good));
    let sealed = memfd(MEMORY_FILE_SIZE, REQUIRED_SEALS);
    let unsealed = memfd(MEMORY_FILE_SIZE, 0);
    let shrinkable = memfd(MEMORY_FILE_SIZE, libc::F_SEAL_GROW | libc::F_SEAL_SEAL);
    let null = std::fs::File::open("/dev/null").unwrap();

    type Misbehaviour<'a> = Box<dyn Fn(&Session) + 'a>;
    let cases: Vec<(&str, Misbehaviour)> = vec![
        (
            "unsealed memfd",
            Box::new(|s| send_memory_file(s, MEMORY_FILE_SIZE, &[&unsealed])),
        ),
        (
            "memfd that may shrink",
            Box::new(|s| send_memory_file(s, MEMORY_FILE_SIZE, &[&shrinkable])),
        ),
        (
            "size that is not the file's",
            Box::new(|s| send_memory_file(s, 4096, &[&sealed])),
        ),
        (
            "not a memfd",
            Box::new(|s| send_memory_file(s, 0, &[&null])),
        ),
        (
            "no fd",
            Box::new(|s| send_memory_file(s, MEMORY_FILE_SIZE, &[])),
        ),
        (
            "two fds",
            Box::new(|s| send_memory_file(s, MEMORY_FILE_SIZE, &[&sealed, &sealed])),
        ),
        (
            "garbage",
            Box::new(|s| {
                fdpass::send_with_fds(s.connection().as_fd(), b"FFMFxxxxxxxxxxxxxxxx", &[])
                    .unwrap();
            }),
        ),
        (
            "a second memory file",
            Box::new(|s| {
                send_memory_file(s, MEMORY_FILE_SIZE, &[&sealed]);
                send_memory_file(s, MEMORY_FILE_SIZE, &[&sealed]);
            }),
        ),
    ];
    for (what, misbehave) in cases {
        let s = router.attach(ShimKind::Verbs);
        misbehave(&s);
        wait_hung_up(&s, &router, what);
        assert!(
            ping(&mut good),
            "{what}: the well-behaved attachment suffered"
        );
    }
    // A memory file is a verbs shim's message only.
    let probe = router.attach(ShimKind::Probe);
    send_memory_file(&probe, MEMORY_FILE_SIZE, &[&sealed]);
    wait_hung_up(&probe, &router, "memory file from a probe");
    // Verbs requests from a shim that is not the verbs shim are unknown to it.
    let mut probe = router.attach(ShimKind::Probe);
    assert_eq!(
        call(&mut probe, verbs::op::ALLOC_PD, &[]).0,
        status::UNKNOWN_OP
    );

    // The good attachment still works, and test hooks are off in this router.
    send_memory_file(&good, MEMORY_FILE_SIZE, &[&sealed]);
    let (st, body) = call(&mut good, verbs::op::ALLOC_PD, &[]);
    assert_eq!(st, status::OK);
    let pd = PdCreated::decode(&body).unwrap().pd;
    sealed.write_all_at(&[1u8; 4096], BASE).unwrap();
    let reg = RegMr {
        pd,
        access: 0,
        addr: BASE,
        length: 4096,
        iova: BASE,
        file: freeflow_proto::verbs::OWN_MEMORY_FILE,
        file_offset: 0,
    };
    let (st, body) = call(&mut good, verbs::op::REG_MR, &encoded(&reg));
    assert_eq!(st, status::OK, "{}", router.log());
    let mr = MrCreated::decode(&body).unwrap();
    let read = TestRead {
        pd,
        lkey: mr.lkey,
        addr: BASE,
        length: 8,
    };
    assert_eq!(
        call(&mut good, verbs::op::TEST_READ, &encoded(&read)).0,
        VerbsStatus::TestHooksOff as u16
    );
    let log = router.log();
    assert!(log.contains("memory file refused"), "{log}");
}

fn send_further_file(session: &Session, number: u16, size: u64, file: &std::fs::File) {
    fdpass::send_with_fds(
        session.connection().as_fd(),
        &MemoryFileMsg { size, file: number }.encode(),
        &[file.as_fd()],
    )
    .unwrap();
}

/// A further memory file (a memfd the program mapped shared itself, as a router on a Freeflow
/// device maps its containers' files) over the attach connection: a region registers by file
/// number and offset and the router reads the file's bytes there; the file goes with its last
/// region (a registration naming it then finds none, and the same number may come again);
/// an unsealed further file, or a number already in use, ends only that attachment.
#[test]
fn further_memory_files_over_the_attach_connection() {
    let router = Router::start("further", true);
    let mut s = router.attach(ShimKind::Verbs);
    let (st, body) = call(&mut s, verbs::op::ALLOC_PD, &[]);
    assert_eq!(st, status::OK);
    let pd = PdCreated::decode(&body).unwrap().pd;
    let size = 32 * 4096u64;
    let file = memfd(size, REQUIRED_SEALS);
    let bytes: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 7 + 1) as u8).collect();
    file.write_all_at(&bytes, 10 * 4096).unwrap();
    // The region's address (the program's mapping) is not its file offset.
    let addr = 0x7000_0000_0000u64 + 300;
    let reg = RegMr {
        pd,
        access: access::LOCAL_WRITE,
        addr,
        length: 8000,
        iova: addr,
        file: 7,
        file_offset: 10 * 4096,
    };
    let read = TestRead {
        pd,
        lkey: 0,
        addr: addr + 100,
        length: 7000,
    };
    for round in 0..2 {
        send_further_file(&s, 7, size, &file);
        let (st, body) = call(&mut s, verbs::op::REG_MR, &encoded(&reg));
        assert_eq!(st, status::OK, "round {round}: {}", router.log());
        let mr = MrCreated::decode(&body).unwrap();
        let (st, body) = call(
            &mut s,
            verbs::op::TEST_READ,
            &encoded(&TestRead {
                lkey: mr.lkey,
                ..read
            }),
        );
        assert_eq!(st, status::OK);
        assert_eq!(
            TestDigest::decode(&body).unwrap().digest,
            Fnv1a::digest(&bytes[400..7400])
        );
        let dereg = DeregMr { mr: mr.mr };
        assert_eq!(
            call(&mut s, verbs::op::DEREG_MR, &encoded(&dereg)).0,
            status::OK
        );
        // The file went with its last region.
        assert_eq!(
            call(&mut s, verbs::op::REG_MR, &encoded(&reg)).0,
            VerbsStatus::NoMemoryFile as u16
        );
    }
    // A file grown since the shim read its size (a further file is sealed only against
    // shrinking) is taken; a region over pages nobody wrote (holes, which the router's writes
    // would allocate at its own cost) is refused with an error, and the attachment goes on.
    send_further_file(&s, 8, size / 2, &file);
    let grown = RegMr { file: 8, ..reg };
    let (st, body) = call(&mut s, verbs::op::REG_MR, &encoded(&grown));
    assert_eq!(st, status::OK, "{}", router.log());
    let mr = MrCreated::decode(&body).unwrap();
    let hole = RegMr {
        file_offset: 20 * 4096,
        ..grown
    };
    assert_ne!(
        call(&mut s, verbs::op::REG_MR, &encoded(&hole)).0,
        status::OK
    );
    assert!(ping(&mut s));
    let dereg = DeregMr { mr: mr.mr };
    assert_eq!(
        call(&mut s, verbs::op::DEREG_MR, &encoded(&dereg)).0,
        status::OK
    );

    let unsealed = memfd(size, 0);
    type Misbehaviour<'a> = Box<dyn Fn(&Session) + 'a>;
    let cases: [(&str, Misbehaviour); 2] = [
        (
            "unsealed further file",
            Box::new(|s| send_further_file(s, 3, size, &unsealed)),
        ),
        (
            "a further file number in use",
            Box::new(|s| {
                send_further_file(s, 3, size, &file);
                send_further_file(s, 3, size, &file);
            }),
        ),
    ];
    for (what, misbehave) in cases {
        let hostile = router.attach(ShimKind::Verbs);
        misbehave(&hostile);
        wait_hung_up(&hostile, &router, what);
        assert!(ping(&mut s), "{what}: the well-behaved attachment suffered");
    }
}
