//! Unit tests of the verbs bodies, messages, flags and statuses.

use super::*;
use crate::msg::HEADER_LEN;

fn round_trip<T: Body + PartialEq + std::fmt::Debug>(value: T) {
    let mut buf = [0xeeu8; 64];
    let n = value.encode(&mut buf);
    assert_eq!(n, T::LEN);
    assert_eq!(T::decode(&buf[..n]).unwrap(), value);
    // One byte short or long is refused, whatever the bytes are.
    assert!(
        matches!(
            T::decode(&buf[..n.saturating_sub(1)]),
            Err(DecodeError::Length { .. })
        ) || n == 0
    );
    assert!(matches!(
        T::decode(&buf[..n + 1]),
        Err(DecodeError::Length { .. })
    ));
}

#[test]
fn bodies_round_trip_and_decode_only_at_their_length() {
    round_trip(PdCreated { pd: 7 });
    round_trip(DeallocPd { pd: u32::MAX });
    round_trip(RegMr {
        pd: 1,
        access: access::LOCAL_WRITE | access::REMOTE_READ,
        addr: 0x7fff_1234_5678,
        length: u64::MAX,
        iova: 3,
        file: OWN_MEMORY_FILE,
        file_offset: 0,
    });
    round_trip(MrCreated {
        mr: 9,
        lkey: 0xdead_beef,
        rkey: 0x1234_5678,
    });
    round_trip(DeregMr { mr: 0 });
    round_trip(TestRead {
        pd: 2,
        lkey: 3,
        addr: u64::MAX,
        length: 1 << 40,
    });
    round_trip(TestDigest { digest: 42 });
}

#[test]
fn every_request_fits_the_smallest_slot() {
    for len in [
        RegMr::LEN,
        DeallocPd::LEN,
        DeregMr::LEN,
        TestRead::LEN,
        TestWrite::FIXED_LEN + MAX_TEST_WRITE,
        MrCreated::LEN,
        TestDigest::LEN,
    ] {
        assert!(HEADER_LEN + len <= 64, "{len}");
    }
}

#[test]
fn queue_bodies_round_trip_and_fit_a_verbs_slot() {
    round_trip(ObjectHandle { handle: 77 });
    round_trip(CreateCq {
        cqe: 500,
        channel: 3,
        comp_vector: 0,
        flags: cq::cq_flags::TIMESTAMPS,
    });
    round_trip(CqCreated { cq: 1, cqe: 512 });
    round_trip(ResizeCq { cq: 2, cqe: 70 });
    for len in [
        qp::ModifyQp::LEN,
        qp::QpQueried::LEN,
        qp::CreateQp::LEN,
        qp::QpCreated::LEN,
        MAX_REPLY_BODY,
    ] {
        assert!(HEADER_LEN + len <= MIN_SLOT_SIZE as usize, "{len}");
    }
    let m = QueueFileMsg {
        kind: QueueFileKind::Qp,
        handle: 9,
    };
    let b = m.encode();
    assert_eq!(QueueFileMsg::decode(&b), Ok(m));
    let mut bad = b;
    bad[4] = 7;
    assert!(QueueFileMsg::decode(&bad).is_err());
    assert!(QueueFileMsg::decode(&b[..11]).is_err());
    let mut bad = b;
    bad[1] = 0;
    assert!(QueueFileMsg::decode(&bad).is_err());
}

#[test]
fn test_write_bounds_its_data() {
    let w = TestWrite {
        pd: 1,
        lkey: 2,
        addr: 3,
        data: vec![7; MAX_TEST_WRITE],
    };
    let mut buf = [0u8; 64];
    let n = w.encode(&mut buf).unwrap();
    assert_eq!(TestWrite::decode(&buf[..n]).unwrap(), w);
    assert!(TestWrite::decode(&buf[..TestWrite::FIXED_LEN - 1]).is_err());
    let empty = TestWrite::decode(&buf[..TestWrite::FIXED_LEN]).unwrap();
    assert!(empty.data.is_empty());
    let long = TestWrite {
        data: vec![0; MAX_TEST_WRITE + 1],
        ..w
    };
    assert!(long.encode(&mut [0u8; 128]).is_none());
    assert!(TestWrite::decode(&[0u8; 128][..TestWrite::FIXED_LEN + MAX_TEST_WRITE + 1]).is_err());
}

#[test]
fn access_flags_are_checked_as_rdma_core_reports_them() {
    use access::*;
    assert_eq!(check_mr_access(0), Ok(0));
    assert_eq!(check_mr_access(LOCAL_WRITE), Ok(LOCAL_WRITE));
    assert_eq!(
        check_mr_access(LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ | REMOTE_ATOMIC),
        Ok(LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ | REMOTE_ATOMIC)
    );
    assert_eq!(check_mr_access(REMOTE_READ), Ok(REMOTE_READ));
    assert_eq!(
        check_mr_access(REMOTE_WRITE),
        Err(AccessFlagsError::RemoteWriteNeedsLocalWrite)
    );
    assert_eq!(
        check_mr_access(REMOTE_ATOMIC | REMOTE_READ),
        Err(AccessFlagsError::RemoteWriteNeedsLocalWrite)
    );
    assert_eq!(
        check_mr_access(1 << 8),
        Err(AccessFlagsError::Unknown(1 << 8))
    );
    assert_eq!(
        check_mr_access(LOCAL_WRITE | 1 << 31),
        Err(AccessFlagsError::Unknown(1 << 31))
    );
    // Relaxed ordering (the first optional flag) is dropped, not refused.
    assert_eq!(check_mr_access(LOCAL_WRITE | 1 << 20), Ok(LOCAL_WRITE));
    assert_eq!(
        check_mr_access(LOCAL_WRITE | ON_DEMAND),
        Err(AccessFlagsError::NotSupported(ON_DEMAND))
    );
    assert_eq!(check_mr_access(MW_BIND | HUGETLB), Ok(MW_BIND | HUGETLB));
}

#[test]
fn memory_file_message_is_checked() {
    let m = MemoryFileMsg {
        size: MEMORY_FILE_SIZE,
        file: OWN_MEMORY_FILE,
    };
    let b = m.encode();
    assert_eq!(MemoryFileMsg::decode(&b), Ok(m));
    assert!(MemoryFileMsg::decode(&b[..15]).is_err());
    let mut bad = b;
    bad[0] = b'X';
    assert!(MemoryFileMsg::decode(&bad).is_err());
    let mut bad = b;
    bad[4] = 9;
    assert!(MemoryFileMsg::decode(&bad).is_err());
    // Bytes 6..8 number the file.
    let mut further = b;
    further[6] = 3;
    assert_eq!(
        MemoryFileMsg::decode(&further),
        Ok(MemoryFileMsg { file: 3, ..m })
    );
}

#[test]
fn statuses_round_trip_and_opcodes_are_in_range() {
    for v in 0..64u16 {
        if let Some(s) = VerbsStatus::from_u16(v) {
            assert_eq!(s as u16, v);
        }
    }
    assert_eq!(VerbsStatus::from_u16(16), Some(VerbsStatus::Invalid));
    assert_eq!(VerbsStatus::from_u16(0), None);
    for o in [
        op::ALLOC_PD,
        op::DEALLOC_PD,
        op::REG_MR,
        op::DEREG_MR,
        op::TEST_READ,
        op::TEST_WRITE,
        op::CREATE_COMP_CHANNEL,
        op::DESTROY_COMP_CHANNEL,
        op::CREATE_CQ,
        op::DESTROY_CQ,
        op::CREATE_QP,
        op::MODIFY_QP,
        op::QUERY_QP,
        op::DESTROY_QP,
        op::RESIZE_CQ,
        op::CREATE_SRQ,
        op::MODIFY_SRQ,
        op::QUERY_SRQ,
        op::DESTROY_SRQ,
    ] {
        assert!(op::is_verbs(o));
    }
    assert!(!op::is_verbs(crate::msg::op::PING));
}

#[test]
fn fnv1a_known_values() {
    assert_eq!(Fnv1a::digest(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(Fnv1a::digest(b"a"), 0xaf63_dc4c_8601_ec8c);
    let mut h = Fnv1a::default();
    h.update(b"foo");
    h.update(b"bar");
    assert_eq!(h.0, Fnv1a::digest(b"foobar"));
    assert_eq!(Fnv1a::digest(b"foobar"), 0x85944171f73967e8);
}
