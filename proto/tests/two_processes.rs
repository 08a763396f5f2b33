//! A ring between two real processes: this test binary re-executes itself as the echo side,
//! handing over the sealed memfd by inheritance, as the router hands it over by SCM_RIGHTS.
#![cfg(not(loom))]

use freeflow_proto::doorbell::{futex_wait, futex_wake};
use freeflow_proto::region::SharedRegion;
use freeflow_proto::{Consumer, Producer, RingGeometry, Wake};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::Command;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "FF_TEST_RING_CHILD_FD";
const MESSAGES: u64 = 200_000;

fn park_until_data(c: &mut Consumer, deadline: Instant) -> bool {
    loop {
        if c.available().unwrap() > 0 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        if c.prepare_park().unwrap() {
            futex_wait(
                &c.memory().control().parked.0,
                1,
                Some(Duration::from_millis(20)),
            );
            c.unpark();
        }
    }
}

/// Echo side: the child half of `echo_across_processes`, which runs it with `--ignored`.
#[test]
#[ignore = "child half of echo_across_processes; only runs when re-executed by it"]
fn echo_child() {
    let fd = std::env::var(CHILD_ENV).expect("run by echo_across_processes");
    let fd: i32 = fd.parse().unwrap();
    // SAFETY: the parent cleared CLOEXEC on this fd and keeps it open; we only borrow it.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let region = SharedRegion::attach(fd).unwrap();
    let mut requests = Consumer::new(region.ring(0).unwrap());
    let mut replies = Producer::new(region.ring(1).unwrap());
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut echoed = 0u64;
    while echoed < MESSAGES {
        assert!(
            park_until_data(&mut requests, deadline),
            "child timed out at {echoed}"
        );
        while requests.pop(&mut buf).unwrap() {
            while !replies.push(&buf).unwrap() {
                if replies.publish() == Wake::Needed {
                    futex_wake(&replies.memory().control().parked.0, 1);
                }
                std::hint::spin_loop();
            }
            echoed += 1;
        }
        requests.release();
        if replies.publish() == Wake::Needed {
            futex_wake(&replies.memory().control().parked.0, 1);
        }
    }
}

#[test]
fn echo_across_processes() {
    let geometry = RingGeometry {
        slot_size: 64,
        slot_count: 256,
    };
    let (region, fd) = SharedRegion::create("ff-test", &[geometry, geometry]).unwrap();
    // SAFETY: clears CLOEXEC on an fd we own so the child inherits it.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "echo_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, fd.as_raw_fd().to_string())
        .spawn()
        .unwrap();
    let mut requests = Producer::new(region.ring(0).unwrap());
    let mut replies = Consumer::new(region.ring(1).unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut sent, mut received) = (0u64, 0u64);
    let mut buf = [0u8; 64];
    while received < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "timed out: sent {sent}, received {received}"
        );
        // Send in bursts of up to 32, then collect; sometimes pause so the child parks.
        let burst = (sent % 7 + 1).min(MESSAGES - sent);
        for _ in 0..burst {
            let mut msg = [0u8; 64];
            msg[..8].copy_from_slice(&sent.to_le_bytes());
            msg[8..16].copy_from_slice(&(sent.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
            if !requests.push(&msg).unwrap() {
                break;
            }
            sent += 1;
        }
        if requests.publish() == Wake::Needed {
            futex_wake(&requests.memory().control().parked.0, 1);
        }
        if sent % 10_000 == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        while received < sent {
            if !replies.pop(&mut buf).unwrap() {
                assert!(
                    park_until_data(&mut replies, deadline),
                    "timed out waiting for echo {received}"
                );
                continue;
            }
            let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
            let check = u64::from_le_bytes(buf[8..16].try_into().unwrap());
            assert_eq!(n, received, "replies out of order");
            assert_eq!(
                check,
                n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                "corrupted payload"
            );
            received += 1;
        }
        replies.release();
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "echo child failed: {status}");
}
