//! Ring behaviour in one process: ordering, capacity, batching, hostile indices, and a model
//! comparison under random operation sequences.
#![cfg(not(loom))]

use freeflow_proto::region::Mapping;
use freeflow_proto::ring::RING_CONTROL_SIZE;
use freeflow_proto::{Consumer, Producer, RingError, RingGeometry, RingMemory, Wake};
use proptest::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn geometry(slot_size: u32, slot_count: u32) -> RingGeometry {
    RingGeometry {
        slot_size,
        slot_count,
    }
}

fn ring(slot_size: u32, slot_count: u32) -> (Producer, Consumer) {
    let geometry = geometry(slot_size, slot_count);
    let mapping =
        Arc::new(Mapping::anonymous_shared(geometry.byte_len().next_multiple_of(4096)).unwrap());
    let mem = RingMemory::new(mapping, 0, geometry).unwrap();
    (Producer::new(mem.clone()), Consumer::new(mem))
}

#[test]
fn messages_arrive_in_order_only_after_publish() {
    let (mut p, mut c) = ring(64, 8);
    let mut out = [0u8; 64];
    assert!(p.push(b"one").unwrap());
    assert!(p.push(b"two").unwrap());
    assert!(
        !c.pop(&mut out).unwrap(),
        "unpublished message must not be visible"
    );
    assert_eq!(p.publish(), Wake::NotNeeded);
    assert!(c.pop(&mut out).unwrap());
    assert_eq!(&out[..3], b"one");
    assert!(c.pop(&mut out).unwrap());
    assert_eq!(&out[..3], b"two");
    assert!(!c.pop(&mut out).unwrap());
}

#[test]
fn full_ring_refuses_until_consumer_releases() {
    let (mut p, mut c) = ring(64, 4);
    for i in 0..4u8 {
        assert!(p.push(&[i]).unwrap());
    }
    assert!(
        !p.push(&[9]).unwrap(),
        "fifth push into a 4-slot ring must fail"
    );
    let _ = p.publish();
    let mut out = [0u8; 64];
    assert!(c.pop(&mut out).unwrap());
    assert!(
        !p.push(&[9]).unwrap(),
        "a popped but unreleased slot is still the consumer's"
    );
    c.release();
    assert!(p.push(&[9]).unwrap());
}

#[test]
fn too_long_message_is_an_error_not_a_truncation() {
    let (mut p, _c) = ring(64, 4);
    assert_eq!(
        p.push(&[0u8; 65]),
        Err(RingError::TooLong {
            len: 65,
            slot_size: 64
        })
    );
}

#[test]
fn geometry_is_validated() {
    assert!(geometry(64, 3).validate().is_err());
    assert!(geometry(100, 4).validate().is_err());
    assert!(geometry(32, 4).validate().is_err());
    assert!(geometry(64, 0).validate().is_err());
    assert!(geometry(128, 1024).validate().is_ok());
    assert_eq!(RING_CONTROL_SIZE, 384);
}

#[test]
fn consumer_rejects_a_tail_beyond_capacity() {
    let (p, mut c) = ring(64, 4);
    // A hostile producer writes a tail that claims more messages than slots exist.
    p.memory().control().tail.0.store(5, Ordering::Release);
    let mut out = [0u8; 64];
    assert_eq!(
        c.pop(&mut out),
        Err(RingError::CorruptIndex {
            head: 0,
            tail: 5,
            capacity: 4
        })
    );
    // Wrapped-around garbage too.
    p.memory()
        .control()
        .tail
        .0
        .store(u32::MAX, Ordering::Release);
    assert!(matches!(c.available(), Err(RingError::CorruptIndex { .. })));
}

#[test]
fn producer_rejects_a_head_ahead_of_its_tail() {
    let (mut p, c) = ring(64, 4);
    for _ in 0..4 {
        assert!(p.push(b"x").unwrap());
    }
    // A hostile consumer claims to have read slots that were never written.
    c.memory().control().head.0.store(7, Ordering::Release);
    assert!(matches!(p.push(b"y"), Err(RingError::CorruptIndex { .. })));
}

#[test]
fn indices_wrap_around_u32() {
    let geometry = geometry(64, 4);
    let mapping = Arc::new(Mapping::anonymous_shared(4096).unwrap());
    let mem = RingMemory::new(mapping, 0, geometry).unwrap();
    let start = u32::MAX - 5;
    mem.control().tail.0.store(start, Ordering::Relaxed);
    mem.control().head.0.store(start, Ordering::Relaxed);
    let (mut p, mut c) = (Producer::new(mem.clone()), Consumer::new(mem));
    let mut out = [0u8; 64];
    for i in 0..40u32 {
        assert!(p.push(&i.to_le_bytes()).unwrap());
        let _ = p.publish();
        assert!(c.pop(&mut out).unwrap());
        assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()), i);
        c.release();
    }
}

#[test]
fn park_flag_makes_the_next_publish_ask_for_a_wake_exactly_once() {
    let (mut p, mut c) = ring(64, 4);
    assert!(c.prepare_park().unwrap(), "empty ring: may park");
    assert!(c.is_parked());
    assert!(p.push(b"a").unwrap());
    assert_eq!(p.publish(), Wake::Needed);
    assert!(!c.is_parked(), "the producer claimed the wake-up");
    assert!(p.push(b"b").unwrap());
    assert_eq!(p.publish(), Wake::NotNeeded, "one wake per park");
    // A consumer that finds data while preparing to park does not park.
    assert!(!c.prepare_park().unwrap());
    assert!(!c.is_parked());
}

#[test]
fn ring_must_fit_its_mapping() {
    let mapping = Arc::new(Mapping::anonymous_shared(4096).unwrap());
    let big = geometry(64, 64);
    assert!(RingMemory::new(mapping.clone(), 0, big).is_err());
    let small = geometry(64, 4);
    assert!(
        RingMemory::new(mapping.clone(), 64, small).is_err(),
        "unaligned offset"
    );
    assert!(RingMemory::new(mapping, 128, small).is_ok());
}

#[derive(Debug, Clone)]
enum Op {
    Push(Vec<u8>),
    Publish,
    Pop,
    Release,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..=64).prop_map(Op::Push),
        1 => Just(Op::Publish),
        3 => Just(Op::Pop),
        1 => Just(Op::Release),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    /// Any sequence of operations behaves like a queue whose visibility follows publish and
    /// whose free space follows release.
    #[test]
    fn ring_matches_a_queue_model(ops in proptest::collection::vec(op(), 1..200), count_exp in 0u32..4) {
        let count = 1u32 << count_exp;
        let (mut p, mut c) = ring(64, count);
        let mut pushed: VecDeque<Vec<u8>> = VecDeque::new();   // pushed, not yet published
        let mut visible: VecDeque<Vec<u8>> = VecDeque::new();  // published, not yet popped
        let mut held = 0u32;                                    // popped, not yet released
        let mut out = [0u8; 64];
        for op in ops {
            match op {
                Op::Push(m) => {
                    let room = (count as usize) - pushed.len() - visible.len() - held as usize;
                    let ok = p.push(&m).unwrap();
                    prop_assert_eq!(ok, room > 0);
                    if ok { pushed.push_back(m); }
                }
                Op::Publish => { let _ = p.publish(); visible.extend(pushed.drain(..)); }
                Op::Pop => {
                    let got = c.pop(&mut out).unwrap();
                    match visible.pop_front() {
                        Some(m) => { prop_assert!(got); prop_assert_eq!(&out[..m.len()], &m[..]); held += 1; }
                        None => prop_assert!(!got),
                    }
                }
                Op::Release => { c.release(); held = 0; }
            }
        }
    }
}

#[test]
fn a_producer_reads_back_what_the_consumer_has_not_taken() {
    let (mut p, mut c) = ring(64, 8);
    for i in 0..5u8 {
        assert!(p.push(&[i]).unwrap());
    }
    let _ = p.publish();
    assert!(p.push(&[5]).unwrap());
    let mut out = [0u8; 64];
    assert!(c.pop(&mut out).unwrap() && c.pop(&mut out).unwrap());
    // Popped but not released: still counted, as the head the producer sees has not moved.
    assert_eq!(p.unconsumed().unwrap(), 6);
    c.release();
    // Published or not, every message after the consumer's head.
    assert_eq!(p.unconsumed().unwrap(), 4);
    let mut got = Vec::new();
    for n in 0..4 {
        assert!(p.read_unconsumed(n, &mut out));
        got.push(out[0]);
    }
    assert_eq!(got, vec![2, 3, 4, 5]);
    assert!(!p.read_unconsumed(4, &mut out));
    // A head beyond the tail is refused.
    c.memory().control().head.0.store(1000, Ordering::Release);
    assert!(matches!(
        p.unconsumed(),
        Err(RingError::CorruptIndex { .. })
    ));
}

#[test]
fn a_wake_up_request_is_seen_and_can_be_raised_by_the_producer() {
    let (mut p, c) = ring(64, 8);
    assert!(!p.consumer_parked());
    c.request_wake();
    assert!(p.consumer_parked());
    c.unpark();
    p.raise_parked();
    assert!(c.is_parked() && p.consumer_parked());
    assert!(p.push(b"x").unwrap());
    assert_eq!(p.publish(), Wake::Needed);
    assert!(!p.consumer_parked());
}
