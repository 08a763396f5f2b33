//! Attaching to a router that does not accept (stopped, wedged, or its queue of pending
//! connections filled by someone else) ends within the attach timeout, with an error the shim
//! can fall back on, instead of blocking in connect(2) until the router accepts.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use freeflow_proto::{attach, fdpass, ROUTER_SOCKET};

fn fresh_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ff-attach-timeout-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&dir).expect("create the test directory");
    dir
}

/// Fills the listener's queue of pending connections: non-blocking connects succeed until the
/// queue is full, then fail with EAGAIN. Returns the connections, which must stay open.
fn fill_backlog(path: &std::path::Path) -> Vec<OwnedFd> {
    let mut held = Vec::new();
    for _ in 0..10_000 {
        let sock = fdpass::unix_socket(libc::SOCK_SEQPACKET).expect("socket");
        fdpass::set_nonblocking(sock.as_fd(), true).expect("non-blocking");
        match fdpass::connect_unix(sock.as_fd(), path) {
            Ok(()) => held.push(sock),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return held,
            Err(e) => panic!("filling the backlog: {e}"),
        }
    }
    panic!("the listener's backlog never filled");
}

#[test]
fn attaching_to_a_router_that_does_not_accept_gives_up_within_the_timeout() {
    let dir = fresh_dir();
    let path = dir.join(ROUTER_SOCKET);
    let listener = fdpass::unix_socket(libc::SOCK_SEQPACKET).expect("socket");
    fdpass::bind_listen_unix(listener.as_fd(), &path, 1).expect("listen");
    let _held = fill_backlog(&path);

    let (tx, rx) = mpsc::channel();
    let attach_dir = dir.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        let result = attach::attach_socket(&attach_dir, Duration::from_millis(300));
        let _ = tx.send((result.map(|_| ()), started.elapsed()));
    });
    // Bounded: without the fix, connect(2) blocks until the listener accepts, which it never does.
    let (result, took) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("attach blocked in connect: it must give up after its timeout");
    assert!(
        result.is_err(),
        "attach to a router that never accepts succeeded"
    );
    eprintln!("attach gave up after {took:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
