//! The verbs table against hostile and careless callers: every handle, key, length and bound a
//! container controls.

use super::memory::test_memfd;
use super::*;
use freeflow_proto::verbs::{access, op, wc_status, REQUIRED_SEALS};
use std::os::unix::fs::FileExt;

/// Where the tests' "process" has its buffers: pages at these virtual addresses are backed.
const BASE: u64 = 0x7f00_0000_0000;
const BACKED: u64 = 16 * PAGE_SIZE;

/// A memory file like a shim's, with pages BASE..BASE+BACKED written: byte i of the file range
/// is `pattern(BASE + i)`. Returns the table (file adopted) and a handle on the file.
fn table_with_memory() -> (VerbsTable, std::fs::File) {
    let fd = test_memfd(MEMORY_FILE_SIZE, REQUIRED_SEALS);
    let file = std::fs::File::from(fd.try_clone().unwrap());
    let bytes: Vec<u8> = (0..BACKED).map(|i| pattern(BASE + i)).collect();
    file.write_all_at(&bytes, BASE).unwrap();
    let mut t = VerbsTable::new(true);
    t.adopt_memory_file(
        MemoryFileMsg {
            size: MEMORY_FILE_SIZE,
            file: freeflow_proto::verbs::OWN_MEMORY_FILE,
        },
        fd,
    )
    .unwrap();
    (t, file)
}

fn pattern(addr: u64) -> u8 {
    (addr.wrapping_mul(31) >> 3) as u8
}

/// A registration of `length` bytes at `addr` (its iova too).
fn region(pd: PdId, addr: u64, length: u64, access: u32) -> RegMr {
    RegMr {
        pd: pd.0,
        access,
        addr,
        length,
        iova: addr,
        file: freeflow_proto::verbs::OWN_MEMORY_FILE,
        file_offset: 0,
    }
}

fn reg(t: &mut VerbsTable, pd: PdId, addr: u64, length: u64, access: u32) -> MrCreated {
    t.reg_mr(&region(pd, addr, length, access)).unwrap()
}

fn read(view: &MemView<'_>) -> Vec<u8> {
    let mut out = vec![0; view.len()];
    view.read_at(0, &mut out).unwrap();
    out
}

const RW: u32 = access::LOCAL_WRITE | access::REMOTE_READ | access::REMOTE_WRITE;

#[test]
fn protection_domains_have_distinct_nonzero_handles_and_free_once() {
    let mut t = VerbsTable::new(false);
    let a = t.alloc_pd().unwrap();
    let b = t.alloc_pd().unwrap();
    assert!(a != PdId(0) && b != PdId(0) && a != b);
    t.dealloc_pd(a).unwrap();
    assert!(matches!(t.dealloc_pd(a), Err(VerbsError::NoSuchPd(_))));
    assert!(matches!(
        t.dealloc_pd(PdId(0)),
        Err(VerbsError::NoSuchPd(0))
    ));
    assert!(matches!(
        t.dealloc_pd(PdId(u32::MAX)),
        Err(VerbsError::NoSuchPd(_))
    ));
    assert_eq!(t.pd_count(), 1);
}

#[test]
fn protection_domains_are_limited() {
    let mut t = VerbsTable::new(false);
    for _ in 0..limits::MAX_PD {
        t.alloc_pd().unwrap();
    }
    let e = t.alloc_pd().unwrap_err();
    assert!(matches!(e, VerbsError::Limit(_)));
    assert_eq!(e.status(), VerbsStatus::NoResources as u16);
}

#[test]
fn registration_checks_every_field() {
    let (mut t, _file) = table_with_memory();
    let pd = t.alloc_pd().unwrap();
    let ok = RegMr {
        pd: pd.0,
        access: access::LOCAL_WRITE,
        addr: BASE + 100,
        length: 200,
        iova: BASE + 100,
        file: freeflow_proto::verbs::OWN_MEMORY_FILE,
        file_offset: 0,
    };
    let cases: Vec<(RegMr, u16)> = vec![
        (RegMr { pd: pd.0 + 1, ..ok }, VerbsStatus::BadHandle as u16),
        (RegMr { pd: 0, ..ok }, VerbsStatus::BadHandle as u16),
        (
            RegMr {
                access: access::REMOTE_WRITE,
                ..ok
            },
            VerbsStatus::Invalid as u16,
        ),
        (
            RegMr {
                access: access::REMOTE_ATOMIC,
                ..ok
            },
            VerbsStatus::Invalid as u16,
        ),
        (
            RegMr {
                access: 1 << 12,
                ..ok
            },
            VerbsStatus::Invalid as u16,
        ),
        (
            RegMr {
                access: access::ON_DEMAND | access::LOCAL_WRITE,
                ..ok
            },
            VerbsStatus::NotSupported as u16,
        ),
        (RegMr { length: 0, ..ok }, VerbsStatus::Invalid as u16),
        (
            RegMr {
                length: limits::MAX_MR_SIZE + 1,
                ..ok
            },
            VerbsStatus::Invalid as u16,
        ),
        (
            RegMr {
                addr: u64::MAX - 10,
                iova: u64::MAX - 10,
                ..ok
            },
            VerbsStatus::Invalid as u16,
        ),
        (
            RegMr {
                iova: u64::MAX - 150,
                ..ok
            },
            VerbsStatus::Invalid as u16,
        ),
        (
            RegMr {
                iova: BASE + 101,
                ..ok
            },
            VerbsStatus::Invalid as u16,
        ),
        // Pages the shim never backed (a hole), and pages beyond the file.
        (
            RegMr {
                addr: BASE + BACKED - 10,
                iova: BASE + BACKED - 10,
                ..ok
            },
            VerbsStatus::Fault as u16,
        ),
        (
            RegMr {
                addr: MEMORY_FILE_SIZE - 10,
                iova: MEMORY_FILE_SIZE - 10,
                ..ok
            },
            VerbsStatus::Fault as u16,
        ),
        (
            RegMr {
                addr: u64::MAX - 4096 * 2,
                iova: u64::MAX - 4096 * 2,
                length: 100,
                ..ok
            },
            VerbsStatus::Fault as u16,
        ),
    ];
    for (r, expected) in cases {
        let e = t.reg_mr(&r).unwrap_err();
        assert_eq!(e.status(), expected, "{r:?}: {e}");
    }
    assert_eq!(t.mr_count(), 0);
    assert!(t.reg_mr(&ok).is_ok());
    // An iova other than the address, with the same page offset (ibv_reg_mr_iova2).
    assert!(t
        .reg_mr(&RegMr {
            iova: 0x1000 + 100,
            ..ok
        })
        .is_ok());
}

#[test]
fn registration_needs_the_memory_file_and_takes_only_one() {
    let mut t = VerbsTable::new(false);
    let pd = t.alloc_pd().unwrap();
    let e = t.reg_mr(&region(pd, BASE, 10, 0)).unwrap_err();
    assert!(matches!(e, VerbsError::NoMemoryFile));
    assert_eq!(e.status(), VerbsStatus::NoMemoryFile as u16);
    let (mut t, _file) = table_with_memory();
    let again = test_memfd(MEMORY_FILE_SIZE, REQUIRED_SEALS);
    assert!(matches!(
        t.adopt_memory_file(
            MemoryFileMsg {
                size: MEMORY_FILE_SIZE,
                file: freeflow_proto::verbs::OWN_MEMORY_FILE,
            },
            again
        ),
        Err(VerbsError::SecondMemoryFile)
    ));
    // An unsealed file is refused.
    let mut t = VerbsTable::new(false);
    assert!(matches!(
        t.adopt_memory_file(
            MemoryFileMsg {
                size: MEMORY_FILE_SIZE,
                file: freeflow_proto::verbs::OWN_MEMORY_FILE,
            },
            test_memfd(MEMORY_FILE_SIZE, 0)
        ),
        Err(VerbsError::Memory(MemoryError::NotSealed { .. }))
    ));
    assert!(!t.has_file(freeflow_proto::verbs::OWN_MEMORY_FILE));
}

#[test]
fn a_pd_with_regions_is_busy_until_they_go() {
    let (mut t, _file) = table_with_memory();
    let pd = t.alloc_pd().unwrap();
    let a = reg(&mut t, pd, BASE + 1, 10, 0);
    let b = reg(&mut t, pd, BASE + 4000, 5000, RW);
    let e = t.dealloc_pd(pd).unwrap_err();
    assert!(matches!(e, VerbsError::PdBusy { mrs: 2, .. }));
    assert_eq!(e.status(), VerbsStatus::Busy as u16);
    t.dereg_mr(a.mr).unwrap();
    assert!(matches!(
        t.dealloc_pd(pd),
        Err(VerbsError::PdBusy { mrs: 1, .. })
    ));
    t.dereg_mr(b.mr).unwrap();
    assert!(matches!(t.dereg_mr(b.mr), Err(VerbsError::NoSuchMr(_))));
    t.dealloc_pd(pd).unwrap();
    assert_eq!(t.mapped_bytes(), 0);
}

#[test]
fn resolve_gives_the_registered_bytes_and_checks_bounds() {
    let (mut t, _file) = table_with_memory();
    let pd = t.alloc_pd().unwrap();
    let addr = BASE + 4000; // unaligned, across a page boundary
    let len = 5000;
    let mr = reg(&mut t, pd, addr, len, RW);
    let l = Key::Local(mr.lkey);
    let whole = t.resolve(pd, l, addr, len, Need::LocalRead).unwrap();
    let expected: Vec<u8> = (addr..addr + len).map(pattern).collect();
    assert_eq!(read(&whole), expected);
    // Exactly at the end is fine; one byte more, before the start or wrapping around is not.
    let tail = t
        .resolve(pd, l, addr + len - 1, 1, Need::LocalRead)
        .unwrap();
    assert_eq!(read(&tail), [pattern(addr + len - 1)]);
    for (a, n, failure) in [
        (addr + len - 1, 2, ResolveFailure::OutOfRange),
        (addr + len, 1, ResolveFailure::OutOfRange),
        (addr - 1, 1, ResolveFailure::OutOfRange),
        (addr - 1, len, ResolveFailure::OutOfRange),
        (0, 1, ResolveFailure::OutOfRange),
        (addr, len + 1, ResolveFailure::OutOfRange),
        (addr, u64::MAX, ResolveFailure::Overflow),
        (u64::MAX, 2, ResolveFailure::Overflow),
        (addr + 1, u64::MAX - addr, ResolveFailure::Overflow),
    ] {
        let e = t.resolve(pd, l, a, n, Need::LocalRead).unwrap_err();
        assert_eq!(e.failure, failure, "{a:#x}+{n:#x}");
        assert_eq!(e.wc_status(), wc_status::LOC_PROT_ERR);
    }
    // Zero length: no memory, any address, but the key still has to be right.
    assert!(t
        .resolve(pd, l, u64::MAX, 0, Need::LocalRead)
        .unwrap()
        .is_empty());
    assert_eq!(
        t.resolve(pd, Key::Local(mr.lkey ^ 1), addr, 0, Need::LocalRead)
            .unwrap_err()
            .failure,
        ResolveFailure::UnknownKey
    );
    // Remote access through the rkey, its errors are remote access errors.
    let r = Key::Remote(mr.rkey);
    assert!(t.resolve(pd, r, addr, len, Need::RemoteWrite).is_ok());
    let e = t
        .resolve(pd, r, addr + len, 8, Need::RemoteRead)
        .unwrap_err();
    assert_eq!(
        (e.failure, e.wc_status()),
        (ResolveFailure::OutOfRange, wc_status::REM_ACCESS_ERR)
    );
}

#[test]
fn keys_must_match_their_kind_pd_and_access() {
    let (mut t, _file) = table_with_memory();
    let pd = t.alloc_pd().unwrap();
    let other_pd = t.alloc_pd().unwrap();
    let read_only = reg(&mut t, pd, BASE, 64, 0);
    let remote_read = reg(&mut t, pd, BASE + 64, 64, access::REMOTE_READ);
    let all = reg(&mut t, pd, BASE + 128, 64, RW | access::REMOTE_ATOMIC);
    assert_ne!(read_only.lkey, read_only.rkey);
    fn check(
        t: &VerbsTable,
        pd: PdId,
        key: Key,
        addr: u64,
        need: Need,
        failure: Option<ResolveFailure>,
    ) {
        let got = t.resolve(pd, key, addr, 8, need).err().map(|e| e.failure);
        assert_eq!(got, failure, "{key:?} {need:?}");
    }
    use Need::*;
    use ResolveFailure::*;
    #[rustfmt::skip]
    let cases = [
        (pd, Key::Local(read_only.lkey), BASE, LocalRead, None),
        (pd, Key::Local(read_only.lkey), BASE, LocalWrite, Some(AccessDenied)),
        (pd, Key::Remote(read_only.rkey), BASE, RemoteRead, Some(AccessDenied)),
        (pd, Key::Remote(remote_read.rkey), BASE + 64, RemoteRead, None),
        (pd, Key::Remote(remote_read.rkey), BASE + 64, RemoteWrite, Some(AccessDenied)),
        (pd, Key::Remote(remote_read.rkey), BASE + 64, RemoteAtomic, Some(AccessDenied)),
        (pd, Key::Remote(all.rkey), BASE + 128, RemoteAtomic, None),
        (pd, Key::Local(all.lkey), BASE + 128, LocalWrite, None),
        // Another protection domain, a local key used remotely and the other way round.
        (other_pd, Key::Local(all.lkey), BASE + 128, LocalRead, Some(WrongPd)),
        (other_pd, Key::Remote(all.rkey), BASE + 128, RemoteRead, Some(WrongPd)),
        (pd, Key::Remote(all.lkey), BASE + 128, RemoteRead, Some(UnknownKey)),
        (pd, Key::Local(all.rkey), BASE + 128, LocalRead, Some(UnknownKey)),
        (pd, Key::Local(all.lkey), BASE + 128, RemoteRead, Some(WrongKeyKind)),
        (pd, Key::Remote(all.rkey), BASE + 128, LocalWrite, Some(WrongKeyKind)),
        // A region's own range, not its neighbour's, even on the same page.
        (pd, Key::Local(read_only.lkey), BASE + 64, LocalRead, Some(OutOfRange)),
    ];
    for (pd, key, addr, need, failure) in cases {
        check(&t, pd, key, addr, need, failure);
    }
    // After deregistration the keys name nothing.
    t.dereg_mr(all.mr).unwrap();
    #[rustfmt::skip]
    let cases = [
        (pd, Key::Local(all.lkey), BASE + 128, LocalRead, Some(UnknownKey)),
        (pd, Key::Remote(all.rkey), BASE + 128, RemoteRead, Some(UnknownKey)),
    ];
    for (pd, key, addr, need, failure) in cases {
        check(&t, pd, key, addr, need, failure);
    }
}

#[test]
fn another_containers_keys_name_nothing_here() {
    let (mut mine, _f1) = table_with_memory();
    let (mut theirs, _f2) = table_with_memory();
    let my_pd = mine.alloc_pd().unwrap();
    let their_pd = theirs.alloc_pd().unwrap();
    // Same handles (each table counts from 1), same addresses: only the keys differ.
    assert_eq!(my_pd, their_pd);
    let mine_mr = reg(&mut mine, my_pd, BASE, 4096, RW);
    let mut their_keys = Vec::new();
    for i in 0..64 {
        let mr = reg(&mut theirs, their_pd, BASE + i * 8, 8, RW);
        their_keys.push(mr.rkey);
        their_keys.push(mr.lkey);
    }
    for key in their_keys {
        if key == mine_mr.lkey || key == mine_mr.rkey {
            continue; // a 2^-31 coincidence: it would name this container's own region
        }
        let e = mine
            .resolve(my_pd, Key::Remote(key), BASE, 8, Need::RemoteWrite)
            .unwrap_err();
        assert_eq!(e.failure, ResolveFailure::UnknownKey);
        assert_eq!(e.wc_status(), wc_status::REM_ACCESS_ERR);
        let e = mine
            .resolve(my_pd, Key::Local(key), BASE, 8, Need::LocalRead)
            .unwrap_err();
        assert_eq!(e.wc_status(), wc_status::LOC_PROT_ERR);
    }
    // Keys are not a counter: consecutive registrations do not give neighbouring keys.
    let a = reg(&mut mine, my_pd, BASE, 8, 0);
    let b = reg(&mut mine, my_pd, BASE, 8, 0);
    assert!(a.lkey.abs_diff(b.lkey) > 1 || a.rkey.abs_diff(b.rkey) > 1);
}

#[test]
fn two_regions_on_one_page_share_it() {
    let (mut t, file) = table_with_memory();
    let pd = t.alloc_pd().unwrap();
    let a = reg(&mut t, pd, BASE + 10, 20, access::LOCAL_WRITE);
    let b = reg(&mut t, pd, BASE + 30, 20, access::LOCAL_WRITE);
    let va = t
        .resolve(pd, Key::Local(a.lkey), BASE + 10, 20, Need::LocalWrite)
        .unwrap();
    va.write_at(15, b"hello").unwrap(); // bytes 25..30: region a only
    let vb = t
        .resolve(pd, Key::Local(b.lkey), BASE + 30, 20, Need::LocalWrite)
        .unwrap();
    vb.write_at(0, b"world").unwrap();
    // Both mappings are the same page of the file (what the application sees).
    let mut page = [0u8; 40];
    file.read_exact_at(&mut page, BASE + 10).unwrap();
    assert_eq!(&page[15..25], b"helloworld");
    let both = t
        .resolve(pd, Key::Local(a.lkey), BASE + 25, 5, Need::LocalRead)
        .unwrap();
    assert_eq!(read(&both), b"hello");
    // The router's copy between two views of one page.
    vb.copy_from(
        &t.resolve(pd, Key::Local(a.lkey), BASE + 10, 20, Need::LocalRead)
            .unwrap(),
    )
    .unwrap();
    file.read_exact_at(&mut page, BASE + 10).unwrap();
    assert_eq!(&page[20..40], &page[0..20]);
}

#[test]
fn iova_regions_resolve_in_their_own_address_space() {
    let (mut t, _file) = table_with_memory();
    let pd = t.alloc_pd().unwrap();
    let addr = BASE + PAGE_SIZE + 123;
    let iova = 0x5000 + 123;
    let mr = t
        .reg_mr(&RegMr {
            pd: pd.0,
            access: 0,
            addr,
            length: 1000,
            iova,
            file: freeflow_proto::verbs::OWN_MEMORY_FILE,
            file_offset: 0,
        })
        .unwrap();
    let v = t
        .resolve(pd, Key::Local(mr.lkey), iova + 10, 3, Need::LocalRead)
        .unwrap();
    assert_eq!(
        read(&v),
        [pattern(addr + 10), pattern(addr + 11), pattern(addr + 12)]
    );
    assert!(t
        .resolve(pd, Key::Local(mr.lkey), addr, 1, Need::LocalRead)
        .is_err());
}

#[test]
fn serve_decodes_requests_and_reports_statuses() {
    let (mut t, file) = table_with_memory();
    let mut reply = [0u8; MAX_REPLY_BODY];
    assert_eq!(
        t.serve(op::ALLOC_PD, &[1], &mut reply).0,
        status::BAD_LENGTH
    );
    let (st, n) = t.serve(op::ALLOC_PD, &[], &mut reply);
    assert_eq!((st, n), (status::OK, PdCreated::LEN));
    let pd = PdCreated::decode(&reply[..n]).unwrap().pd;
    let mut body = [0u8; 64];
    let len = RegMr {
        pd,
        access: access::LOCAL_WRITE,
        addr: BASE + 7,
        length: 100,
        iova: BASE + 7,
        file: freeflow_proto::verbs::OWN_MEMORY_FILE,
        file_offset: 0,
    }
    .encode(&mut body);
    assert_eq!(
        t.serve(op::REG_MR, &body[..len - 1], &mut reply).0,
        status::BAD_LENGTH
    );
    let (st, n) = t.serve(op::REG_MR, &body[..len], &mut reply);
    assert_eq!(st, status::OK);
    let mr = MrCreated::decode(&reply[..n]).unwrap();

    // The test hooks read and write through the router's mapping.
    let len = TestRead {
        pd,
        lkey: mr.lkey,
        addr: BASE + 7,
        length: 100,
    }
    .encode(&mut body);
    let (st, n) = t.serve(op::TEST_READ, &body[..len], &mut reply);
    assert_eq!(st, status::OK);
    let expected: Vec<u8> = (BASE + 7..BASE + 107).map(pattern).collect();
    assert_eq!(
        TestDigest::decode(&reply[..n]).unwrap().digest,
        verbs::Fnv1a::digest(&expected)
    );
    let w = TestWrite {
        pd,
        lkey: mr.lkey,
        addr: BASE + 90,
        data: b"from the router".to_vec(),
    };
    let len = w.encode(&mut body).unwrap();
    assert_eq!(
        t.serve(op::TEST_WRITE, &body[..len], &mut reply).0,
        status::OK
    );
    let mut back = [0u8; 15];
    file.read_exact_at(&mut back, BASE + 90).unwrap();
    assert_eq!(&back, b"from the router");
    // A write that would leave the region is refused and writes nothing.
    let w = TestWrite {
        addr: BASE + 100,
        data: vec![0; 8],
        ..w
    };
    let len = w.encode(&mut body).unwrap();
    assert_eq!(
        t.serve(op::TEST_WRITE, &body[..len], &mut reply).0,
        VerbsStatus::Protection as u16
    );
    file.read_exact_at(&mut back, BASE + 90).unwrap();
    assert_eq!(&back, b"from the router");

    // Deregistration and deallocation through serve.
    let len = DeallocPd { pd }.encode(&mut body);
    assert_eq!(
        t.serve(op::DEALLOC_PD, &body[..len], &mut reply).0,
        VerbsStatus::Busy as u16
    );
    let len = DeregMr { mr: mr.mr }.encode(&mut body);
    assert_eq!(
        t.serve(op::DEREG_MR, &body[..len], &mut reply).0,
        status::OK
    );
    assert_eq!(
        t.serve(op::DEREG_MR, &body[..len], &mut reply).0,
        VerbsStatus::BadHandle as u16
    );
    let len = DeallocPd { pd }.encode(&mut body);
    assert_eq!(
        t.serve(op::DEALLOC_PD, &body[..len], &mut reply).0,
        status::OK
    );
    assert_eq!(t.serve(0x01ee, &[], &mut reply).0, status::UNKNOWN_OP);
}

#[test]
fn test_hooks_are_off_unless_enabled() {
    let (_, _file) = table_with_memory();
    let mut t = VerbsTable::new(false);
    let mut reply = [0u8; MAX_REPLY_BODY];
    let mut body = [0u8; 64];
    let len = TestRead {
        pd: 1,
        lkey: 1,
        addr: 0,
        length: 1,
    }
    .encode(&mut body);
    assert_eq!(
        t.serve(op::TEST_READ, &body[..len], &mut reply).0,
        VerbsStatus::TestHooksOff as u16
    );
    assert_eq!(
        t.serve(op::TEST_WRITE, &body[..16], &mut reply).0,
        VerbsStatus::TestHooksOff as u16
    );
}

#[test]
fn registered_bytes_are_bounded() {
    let (mut t, _file) = table_with_memory();
    let pd = t.alloc_pd().unwrap();
    t.mapped.store(
        limits::MAX_MAPPED_BYTES - PAGE_SIZE,
        std::sync::atomic::Ordering::Relaxed,
    );
    reg(&mut t, pd, BASE, 10, 0);
    let e = t.reg_mr(&region(pd, BASE, 10, 0)).unwrap_err();
    assert!(matches!(e, VerbsError::Limit(_)));
}

/// A further memory file (a memfd the program mapped shared itself): registered by file
/// offset, holes allowed, checked like the own file (sealed, its size), numbered once, and
/// bounded in count.
#[test]
fn further_memory_files_register_by_offset_and_are_checked() {
    use freeflow_proto::verbs::MAX_FURTHER_MEMORY_FILES;
    let (mut t, _own) = table_with_memory();
    let pd = t.alloc_pd().unwrap();
    let size = 64 * 4096u64;
    let fd = test_memfd(size, REQUIRED_SEALS);
    let file = std::fs::File::from(fd.try_clone().unwrap());
    // Pages 4 to 7 written (the shim populates what it registers), the others holes.
    file.write_all_at(&[0u8; 4 * 4096], 4 * 4096).unwrap();
    file.write_all_at(b"further", 5 * 4096 + 10).unwrap();
    let further = |file| MemoryFileMsg { size, file };
    // A registration naming a file not sent yet is refused as the own file's absence is.
    let reg = RegMr {
        file: 3,
        file_offset: 4 * 4096,
        ..region(pd, 0x7000_0000_0000 + 20, 2 * 4096, access::LOCAL_WRITE)
    };
    assert!(matches!(t.reg_mr(&reg), Err(VerbsError::NoMemoryFile)));
    t.adopt_memory_file(further(3), fd).unwrap();
    assert!(t.has_file(3) && !t.has_file(4));
    let mr = t.reg_mr(&reg).unwrap();
    // The region's address maps to file offset 4 pages + 20: "further" is at 1 page - 10 on.
    let view = t
        .resolve(
            pd,
            Key::Local(mr.lkey),
            reg.addr + 4096 - 10,
            7,
            Need::LocalRead,
        )
        .unwrap();
    let mut got = [0u8; 7];
    view.read_at(0, &mut got).unwrap();
    assert_eq!(&got, b"further");
    // Holes are refused: the router's writes would allocate pages the container does not pay.
    let hole = RegMr {
        file_offset: 10 * 4096,
        ..reg
    };
    assert!(matches!(
        t.reg_mr(&hole),
        Err(VerbsError::Memory(MemoryError::NotBacked { .. }))
    ));
    assert!(t.has_file(3), "a region still uses the file");
    // A region without write access is mapped read-only: nothing writes through it.
    let read_only = t.reg_mr(&RegMr { access: 0, ..reg }).unwrap();
    assert!(matches!(
        t.resolve(
            pd,
            Key::Local(read_only.lkey),
            reg.addr,
            8,
            Need::LocalWrite
        ),
        Err(ResolveError {
            failure: ResolveFailure::AccessDenied,
            ..
        })
    ));
    t.dereg_mr(read_only.mr).unwrap();
    // Beyond the file, unaligned offsets, and a file offset for the own file: refused.
    for (file, file_offset, what) in [
        (3, size - 4096, "beyond the file"),
        (3, 100, "unaligned"),
        (freeflow_proto::verbs::OWN_MEMORY_FILE, 4096, "own file"),
    ] {
        let r = RegMr {
            file,
            file_offset,
            ..reg
        };
        let e = t.reg_mr(&r).unwrap_err();
        assert!(
            matches!(e, VerbsError::Memory(_) | VerbsError::Invalid(_)),
            "{what}: {e}"
        );
    }
    // The same number twice, an unsealed file, a size other than the file's: refused.
    let again = test_memfd(size, REQUIRED_SEALS);
    assert!(matches!(
        t.adopt_memory_file(further(3), again),
        Err(VerbsError::SecondMemoryFile)
    ));
    assert!(matches!(
        t.adopt_memory_file(further(4), test_memfd(size, 0)),
        Err(VerbsError::Memory(MemoryError::NotSealed { .. }))
    ));
    // A further file larger than declared has grown (it may): accepted.
    assert!(t
        .adopt_memory_file(
            MemoryFileMsg {
                size: size / 2,
                file: 6
            },
            test_memfd(size, REQUIRED_SEALS)
        )
        .is_ok());
    assert!(matches!(
        t.adopt_memory_file(
            MemoryFileMsg {
                size: size * 2,
                file: 5
            },
            test_memfd(size, REQUIRED_SEALS)
        ),
        Err(VerbsError::Memory(MemoryError::SizeMismatch { .. }))
    ));
    assert!(!t.has_file(4) && !t.has_file(5) && t.has_file(6));
    // At most MAX_FURTHER_MEMORY_FILES per attachment.
    for n in 7..(5 + MAX_FURTHER_MEMORY_FILES as u16) {
        t.adopt_memory_file(further(n), test_memfd(size, REQUIRED_SEALS))
            .unwrap();
    }
    assert!(matches!(
        t.adopt_memory_file(further(999), test_memfd(size, REQUIRED_SEALS)),
        Err(VerbsError::Limit(_))
    ));
    t.dereg_mr(mr.mr).unwrap();
}

/// A zero-copy send whose region is deregistered, and whose container's whole table (its
/// memory file too) goes, while the kernel took only part of it: the pages stay mapped until
/// the last byte went, and the bytes that go are the region's.
#[test]
fn a_region_deregistered_during_a_partial_zero_copy_send_stays_mapped_until_sent() {
    use crate::verbs::remote::{Conn, ConnState, Link, Stream};
    use freeflow_proto::verbs::remote::{FrameHeader, FrameKind, HEADER_LEN};
    use std::io::Read;
    let (mut t, file) = table_with_memory();
    // 1 MiB of the pattern: more than a Unix socket's default send buffer.
    let len = 1u64 << 20;
    let bytes: Vec<u8> = (0..len).map(|i| pattern(BASE + i)).collect();
    file.write_all_at(&bytes, BASE).unwrap();
    let pd = t.alloc_pd().unwrap();
    let mr = reg(&mut t, pd, BASE, len, RW);
    let span = t
        .resolve_shared(pd, Key::Local(mr.lkey), BASE, len, Need::LocalRead)
        .unwrap();
    let (ours, mut other) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let mut conn = Conn::new(Stream::Local(ours), Link::Shard(1), 4, ConnState::Up);
    let mut h = FrameHeader::new(FrameKind::Write);
    h.len = len as u32;
    conn.push_frame_shared(&h, std::iter::once(span));
    conn.flush().unwrap();
    let want = HEADER_LEN + len as usize;
    assert!(conn.tx_pending() > 0, "the whole frame went at once");
    // The region goes, then the container: its table and its memory file.
    t.dereg_mr(mr.mr).unwrap();
    assert!(t
        .resolve(pd, Key::Local(mr.lkey), BASE, len, Need::LocalRead)
        .is_err());
    drop(t);
    drop(file);
    let mut got = Vec::with_capacity(want);
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..100_000 {
        if got.len() == want {
            break;
        }
        conn.flush().unwrap();
        let n = other
            .read(&mut buf[..(want - got.len()).min(64 << 10)])
            .unwrap();
        assert_ne!(n, 0, "the stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), want);
    assert_eq!(&got[..HEADER_LEN], &h.encode()[..]);
    assert!(
        got[HEADER_LEN..] == bytes[..],
        "the bytes sent are not the region's"
    );
    assert_eq!(conn.tx_pending(), 0);
}

/// A deregistered region whose mapping a zero-copy span still holds stays counted in the
/// mapped bytes (a peer that stops reading cannot keep uncounted mappings alive): a new
/// registration past the limit is refused until the span goes.
#[test]
fn a_mapping_held_past_its_dereg_stays_counted() {
    let (mut t, _file) = table_with_memory();
    let pd = t.alloc_pd().unwrap();
    let mr = reg(&mut t, pd, BASE, PAGE_SIZE, RW);
    assert_eq!(t.mapped_bytes(), PAGE_SIZE);
    let span = t
        .resolve_shared(pd, Key::Local(mr.lkey), BASE, 100, Need::LocalRead)
        .unwrap();
    t.dereg_mr(mr.mr).unwrap();
    assert_eq!(t.mapped_bytes(), PAGE_SIZE, "a held mapping went uncounted");
    // The rest of the limit is one page short of another region while the span holds its page.
    t.mapped.fetch_add(
        limits::MAX_MAPPED_BYTES - 2 * PAGE_SIZE,
        std::sync::atomic::Ordering::Relaxed,
    );
    let e = t.reg_mr(&region(pd, BASE, 2 * PAGE_SIZE, RW)).unwrap_err();
    assert!(matches!(e, VerbsError::Limit(_)));
    drop(span);
    assert_eq!(t.mapped_bytes(), limits::MAX_MAPPED_BYTES - 2 * PAGE_SIZE);
    reg(&mut t, pd, BASE, 2 * PAGE_SIZE, RW);
}

/// The device path's second mapping of a region counts in the container's mapped bytes while
/// it lives.
#[cfg(feature = "rdma-hw")]
#[test]
fn a_regions_device_mapping_counts_while_it_lives() {
    let (mut t, _file) = table_with_memory();
    let pd = t.alloc_pd().unwrap();
    let mr = reg(&mut t, pd, BASE, PAGE_SIZE, RW);
    assert_eq!(t.mapped_bytes(), PAGE_SIZE);
    let device = t.map_for_device(mr.mr).unwrap();
    assert_eq!(
        t.mapped_bytes(),
        2 * PAGE_SIZE,
        "the device's mapping went uncounted"
    );
    drop(device);
    assert_eq!(t.mapped_bytes(), PAGE_SIZE);
}
