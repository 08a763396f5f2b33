//! Model check of the ring's publish and park/wake protocol with loom:
//! `RUSTFLAGS="--cfg loom" cargo test -p freeflow-proto --test loom_ring --release`.
//! Every slot is a loom cell, so a slot read not ordered after its write (or a write racing a
//! read) fails the model; a lost wake-up leaves the consumer blocked forever, which loom reports
//! as a deadlock.
#![cfg(loom)]

use freeflow_proto::{Consumer, Producer, RingGeometry, RingMemory, Wake};
use loom::sync::{Arc, Condvar, Mutex};

/// The doorbell as an eventfd behaves: `ring` sets a count that a later `wait` consumes, so a
/// ring before the wait is not lost. (loom's own `Notify` reports false deadlocks:
/// tokio-rs/loom#301, so the model uses a mutex and a condition variable.)
#[derive(Default)]
struct Bell {
    rung: Mutex<bool>,
    cond: Condvar,
}

impl Bell {
    fn ring(&self) {
        *self.rung.lock().unwrap() = true;
        self.cond.notify_one();
    }

    fn wait(&self) {
        let mut rung = self.rung.lock().unwrap();
        while !*rung {
            rung = self.cond.wait(rung).unwrap();
        }
        *rung = false;
    }
}

/// Producer sends `n` numbered messages through a ring of `slots` slots; the consumer parks
/// whenever it finds the ring empty. The Notify stands in for the eventfd/futex doorbell: a
/// notify before wait is remembered, like an eventfd count or a futex word already changed.
fn run(slots: u32, n: u8) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(move || {
        let mem = RingMemory::new_model(RingGeometry {
            slot_size: 64,
            slot_count: slots,
        });
        let bell = Arc::new(Bell::default());
        let mut producer = Producer::new(mem.clone());
        let mut consumer = Consumer::new(mem);
        let producer_bell = bell.clone();
        let sender = loom::thread::spawn(move || {
            for i in 0..n {
                while !producer.push(&[i, !i]).unwrap() {
                    loom::thread::yield_now();
                }
                if producer.publish() == Wake::Needed {
                    producer_bell.ring();
                }
            }
        });
        let mut out = [0u8; 2];
        let mut expected = 0u8;
        while expected < n {
            if consumer.pop(&mut out).unwrap() {
                assert_eq!(out, [expected, !expected], "message out of order or torn");
                expected += 1;
                continue;
            }
            if consumer.prepare_park().unwrap() {
                bell.wait();
                consumer.unpark();
            }
        }
        sender.join().unwrap();
    });
}

#[test]
fn park_wake_never_loses_a_message() {
    run(4, 2);
}

// A one-slot ring (producer waiting for space behind a parking consumer) is covered by the
// explicit-state model in `park_model.rs`: loom 0.7 reports a lost wake-up for it in an
// execution that C++'s seq_cst fence rules forbid (each side's post-fence load would have to
// miss the other's pre-fence store), the same pattern its own litmus tests accept.
