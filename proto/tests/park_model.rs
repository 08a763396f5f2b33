//! Exhaustive model of the ring's publish and park/wake protocol: every interleaving of one
//! producer and one consumer, as explicit states, under sequential consistency (what the SeqCst
//! fences between each side's store and load give those pairs). It checks that no reachable
//! state leaves the consumer asleep with a message it never gets, that messages arrive in order,
//! and that the ring never holds more than its capacity. The steps mirror `Producer::push`,
//! `Producer::publish`, `Consumer::pop`, `Consumer::prepare_park` and `Consumer::unpark`.
#![cfg(not(loom))]

use std::collections::HashSet;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct State {
    // shared
    tail: u8,
    head: u8,
    parked: bool,
    bell: u8,
    // producer: next message to send, program counter
    sent: u8,
    p_pc: u8,
    // consumer: messages received (== its local head), program counter
    got: u8,
    c_pc: u8,
}

const P_PUSH: u8 = 0; // reload head; push if room (tail += 1 is the publish)
const P_CHECK: u8 = 1; // after the fence: load parked
const P_CLAIM: u8 = 2; // swap(parked, 0); ring if it was set
const P_DONE: u8 = 3;

const C_POP: u8 = 0; // load tail; pop if a message is there
const C_RELEASE: u8 = 1; // prepare_park: publish head
const C_FLAG: u8 = 2; // prepare_park: parked = 1 (then the fence)
const C_RECHECK: u8 = 3; // prepare_park: load tail
const C_WAIT: u8 = 4; // sleep until the bell has rung
const C_UNPARK: u8 = 5; // swap(parked, 0)
const C_DONE: u8 = 6;

/// Successor states by one atomic step of either side.
fn steps(s: State, capacity: u8, total: u8) -> Vec<State> {
    let mut next = Vec::new();
    // Producer.
    let mut p = s;
    match s.p_pc {
        P_PUSH if s.sent == total => p.p_pc = P_DONE,
        // With no room the producer spins: no state change.
        P_PUSH if s.tail - s.head < capacity => {
            p.tail += 1;
            p.sent += 1;
            p.p_pc = P_CHECK;
        }
        P_CHECK => p.p_pc = if s.parked { P_CLAIM } else { P_PUSH },
        P_CLAIM => {
            if s.parked {
                p.parked = false;
                p.bell = (s.bell + 1).min(2);
            }
            p.p_pc = P_PUSH;
        }
        _ => {}
    }
    if p != s {
        next.push(p);
    }
    // Consumer.
    let mut c = s;
    match s.c_pc {
        C_POP if s.got == total => c.c_pc = C_DONE,
        C_POP => {
            if s.tail > s.got {
                c.got += 1; // popped message number s.got: in order by construction
            } else {
                c.c_pc = C_RELEASE;
            }
        }
        C_RELEASE => {
            c.head = s.got;
            c.c_pc = C_FLAG;
        }
        C_FLAG => {
            c.parked = true;
            c.c_pc = C_RECHECK;
        }
        C_RECHECK => c.c_pc = if s.tail > s.got { C_UNPARK } else { C_WAIT },
        // With no ring of the bell the consumer stays blocked: no state change.
        C_WAIT if s.bell > 0 => {
            c.bell -= 1;
            c.c_pc = C_UNPARK;
        }
        C_UNPARK => {
            c.parked = false;
            c.c_pc = C_POP;
        }
        _ => {}
    }
    if c != s {
        next.push(c);
    }
    next
}

/// Explores every state reachable by `step`; returns how many there were, or the first stuck
/// state.
fn explore(
    step: impl Fn(State, u8, u8) -> Vec<State>,
    capacity: u8,
    total: u8,
) -> Result<usize, State> {
    let start = State {
        tail: 0,
        head: 0,
        parked: false,
        bell: 0,
        sent: 0,
        p_pc: P_PUSH,
        got: 0,
        c_pc: C_POP,
    };
    let mut seen = HashSet::new();
    let mut stack = vec![start];
    while let Some(s) = stack.pop() {
        if !seen.insert(s) {
            continue;
        }
        assert!(s.tail - s.head <= capacity, "ring over capacity in {s:?}");
        assert!(s.got <= s.tail, "consumer ahead of producer in {s:?}");
        let next = step(s, capacity, total);
        let finished = s.c_pc == C_DONE && s.p_pc == P_DONE;
        if next.is_empty() && !finished {
            return Err(s); // nobody can move and the work is not done: a lost wake-up
        }
        stack.extend(next);
    }
    // Every run must be able to finish: the final state is reachable.
    assert!(seen.iter().any(|s| s.c_pc == C_DONE && s.p_pc == P_DONE));
    Ok(seen.len())
}

#[test]
fn no_lost_wakeup_for_any_interleaving() {
    for capacity in [1u8, 2, 4] {
        for total in 1u8..=6 {
            let states = explore(steps, capacity, total)
                .unwrap_or_else(|s| panic!("stuck: {s:?} (capacity {capacity}, {total} messages)"));
            assert!(states > 10);
        }
    }
}

/// The model has teeth: a producer that skips the parked check (no doorbell) gets stuck.
#[test]
fn model_finds_the_bug_without_the_doorbell() {
    fn steps_without_bell(s: State, capacity: u8, total: u8) -> Vec<State> {
        steps(s, capacity, total)
            .into_iter()
            .map(|mut n| {
                if s.p_pc == P_CHECK {
                    n.p_pc = P_PUSH; // never claims, never rings
                }
                n
            })
            .collect()
    }
    let stuck = explore(steps_without_bell, 1, 2).is_err();
    assert!(stuck, "removing the doorbell must be caught");
}
