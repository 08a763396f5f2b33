//! Unit tests of the TCP service: the peer channel never waits, claims are believed only as
//! far as the registry goes.

use super::claims::{Target, CLAIM_POOL_SIZE, MAX_CLAIM_PORTS};
use super::endpoint::{HostEndpoint, OverlayEndpoint};
use super::listen::LocalListener;
use super::peers::{MAX_PEER_QUEUE, PEER_RETRY_MAX, PEER_RETRY_MIN};
use super::relay::{
    listener_share, Relays, MAX_RELAYS, MAX_RELAYS_PER_CONTAINER, MAX_RELAYS_PER_LISTENER,
};
use super::*;
use crate::sys::{self, Untrusted};
use freeflow_os::poll::{self, PollFd};
use freeflow_proto::control::{NetworkView, PeerHost};
use freeflow_proto::peer::PeerMsg;
use freeflow_proto::sockmsg::SockNotice;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// A TCP service on loopback whose one peer router listens on `port` of loopback.
fn with_peer_on_loopback(port: u16) -> TcpService {
    let mut tcp = TcpService::default();
    tcp.set_network(NetworkView {
        host_ip: Ipv4Addr::LOCALHOST,
        peer_port: 0,
        hosts: vec![PeerHost {
            host_ip: Ipv4Addr::LOCALHOST,
            peer_port: port,
        }],
        overlay: Vec::new(),
    });
    tcp
}

/// A listener on loopback whose accept queue is full (listen backlog 0, nobody accepts):
/// the kernel drops further SYNs, so a connect to it hangs, like one to a host that is down.
fn black_hole() -> (Vec<TcpStream>, OwnedFd, u16) {
    let socket = sys::tcp_socket(false).unwrap();
    sys::bind(&socket, Ipv4Addr::LOCALHOST, 0, false).unwrap();
    sys::listen(&socket, 0).unwrap();
    let port = sys::local_port(&socket).unwrap();
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    // Fill the queue; each bounded.
    let fill = (0..4)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok())
        .collect();
    (fill, socket, port)
}

/// A blocking connect would return only after the peer answered or the timeout passed;
/// here the connect is left under way, for the control loop to watch.
#[test]
fn an_unreachable_peer_does_not_stall_the_control_thread() {
    let (_fill, _hole, port) = black_hole();
    let mut tcp = with_peer_on_loopback(port);
    let mut deferred = Deferred::new();
    tcp.tick(&mut deferred);
    tcp.broadcast_listeners();
    let peer = tcp.peers.outgoing.values().next().unwrap();
    assert!(
        peer.stream.is_none(),
        "not connected: the peer never answers"
    );
    let (connecting, _) = peer.connecting.as_ref().expect("a connect under way");
    assert!(!peer.queue.is_empty(), "our table waits to be sent");
    let polled: Vec<_> = tcp
        .poll_fds()
        .iter()
        .map(|&(fd, events)| (fd.as_raw_fd(), events))
        .collect();
    assert!(polled.contains(&(connecting.as_raw_fd(), libc::POLLOUT)));
    assert!(tcp.next_timeout_ms(Instant::now()).is_some());
}

/// A peer router that accepts our connection but never reads: our writes never wait for
/// it; what it does not take is queued, up to a bound, and then the connection is dropped
/// (to be made anew, starting with our table).
#[test]
fn a_peer_that_does_not_read_never_blocks_our_writes() {
    let peer_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = peer_listener.local_addr().unwrap().port();
    let mut tcp = with_peer_on_loopback(port);
    let mut deferred = Deferred::new();
    tcp.tick(&mut deferred);
    let connecting = {
        let peer = tcp.peers.outgoing.get(&Ipv4Addr::LOCALHOST).unwrap();
        peer.connecting
            .as_ref()
            .expect("connect under way")
            .0
            .as_raw_fd()
    };
    // Loopback connects at once; the kernel accepts into the backlog (nobody calls accept).
    tcp.on_ready(connecting, libc::POLLOUT, &mut deferred);
    let peer = tcp.peers.outgoing.get_mut(&Ipv4Addr::LOCALHOST).unwrap();
    assert!(peer.stream.is_some(), "connected");
    let chunk = vec![b'x'; 256 * 1024];
    let mut queued_at_most = 0;
    for _ in 0..400 {
        peer.write_bytes(Ipv4Addr::LOCALHOST, &chunk);
        if peer.stream.is_none() {
            break;
        }
        queued_at_most = queued_at_most.max(peer.queue.len());
    }
    assert!(
        peer.stream.is_none(),
        "dropped once the queue passed its bound"
    );
    assert!(queued_at_most > 0 && queued_at_most <= MAX_PEER_QUEUE);
    assert!(peer.queue.is_empty());
    drop(peer_listener);
}

/// Claims come from peer routers; each is believed only as far as the registry goes (as a
/// connect's announcement), and told only to the processes holding the listener it names.
/// `client`'s port `port` (claimed or connected from `host`, towards port 5001) given back: the
/// announcement is forgotten here, and the processes told.
fn release(tcp: &mut TcpService, client: Ipv4Addr, port: u16, host: Ipv4Addr, server: Ipv4Addr) {
    tcp.apply(
        host,
        PeerMsg::Release {
            host,
            ip: client,
            to_port: 5001,
            ports: vec![port],
        },
    );
    assert_eq!(
        tcp.lookup_announcement(HostEndpoint::new(host, port), server),
        None
    );
    assert_eq!(
        std::mem::take(&mut tcp.notices),
        vec![(1, SockNotice::forget((host, port)))]
    );
}

#[test]
fn claims_are_announcements_made_ahead_for_one_listener() {
    let host_a = Ipv4Addr::new(192, 0, 2, 1);
    let host_c = Ipv4Addr::new(192, 0, 2, 3);
    let here = Ipv4Addr::LOCALHOST;
    let client = Ipv4Addr::new(10, 32, 0, 2);
    let server = Ipv4Addr::new(10, 32, 0, 4);
    let other = Ipv4Addr::new(10, 32, 0, 5);
    let stranger = Ipv4Addr::new(10, 32, 0, 9);
    let entry = |ip, tenant: &str, host_ip| freeflow_proto::control::OverlayEntry {
        ip,
        tenant: tenant.into(),
        host_ip,
    };
    let mut tcp = TcpService::default();
    tcp.set_network(NetworkView {
        host_ip: here,
        peer_port: 0,
        hosts: Vec::new(),
        overlay: vec![
            entry(client, "blue", host_a),
            entry(server, "blue", here),
            entry(other, "blue", here),
            entry(stranger, "red", here),
        ],
    });
    // Listeners on host ports 5001 (server, process 1), 5002 (other, 2), 5003 (stranger, 3).
    for (ip, owner) in [(server, 1u32), (other, 2), (stranger, 3)] {
        let socket = sys::tcp_socket(false).unwrap();
        tcp.listeners.local.insert(
            OverlayEndpoint::new(ip, 80),
            LocalListener {
                owners: vec![owner],
                accepting: Vec::new(),
                orphaned_at: None,
                host_port: 5000 + owner as u16,
                backlog: 0,
                reuseport: false,
                socket: Untrusted::new(socket),
                overlay: None,
            },
        );
    }
    let claim = |host, ip, to_port, ports: &[u16], fresh| PeerMsg::Claim {
        host,
        ip,
        to_port,
        ports: ports.to_vec(),
        fresh,
    };
    tcp.apply(host_a, claim(host_a, client, 5001, &[40001, 40002], true));
    let told: Vec<(u32, SockNotice)> = std::mem::take(&mut tcp.notices);
    assert_eq!(told.len(), 2, "{told:?}");
    assert!(told.iter().all(|(owner, n)| *owner == 1
        && n.ip == client
        && n.host_ip == host_a
        && n.port == n.host_port));
    assert_eq!(
        tcp.lookup_announcement(HostEndpoint::new(host_a, 40001), server),
        Some(OverlayEndpoint::new(client, 40001))
    );
    // Only the listener it names: not another of the tenant, not another tenant's.
    assert_eq!(
        tcp.lookup_announcement(HostEndpoint::new(host_a, 40001), other),
        None
    );
    assert_eq!(
        tcp.lookup_announcement(HostEndpoint::new(host_a, 40001), stranger),
        None
    );
    // Said again (a refresh): nothing new to tell; newly bound again: told again.
    tcp.apply(host_a, claim(host_a, client, 5001, &[40001], false));
    assert!(tcp.notices.is_empty());
    tcp.apply(host_a, claim(host_a, client, 5001, &[40001], true));
    assert_eq!(tcp.notices.len(), 1);
    tcp.notices.clear();
    // A router speaks only for its own host, and for containers the registry puts there.
    tcp.apply(host_c, claim(host_a, client, 5001, &[40003], true));
    assert_eq!(
        tcp.lookup_announcement(HostEndpoint::new(host_a, 40003), server),
        None
    );
    tcp.apply(host_a, claim(host_a, server, 5001, &[40004], true));
    assert_eq!(
        tcp.lookup_announcement(HostEndpoint::new(host_a, 40004), server),
        None
    );
    assert!(tcp.notices.is_empty(), "{:?}", tcp.notices);
    let many: Vec<u16> = (41000..41000 + MAX_CLAIM_PORTS as u16 + 1).collect();
    tcp.apply(host_a, claim(host_a, client, 5001, &many, true));
    assert_eq!(
        tcp.lookup_announcement(HostEndpoint::new(host_a, 41000), server),
        None
    );
    // Given back: forgotten here and by the processes told.
    release(&mut tcp, client, 40002, host_a, server);
    // A connect's announcement is taken back the same way when the connect failed.
    tcp.apply(
        host_a,
        PeerMsg::Conn {
            host: host_a,
            host_port: 40010,
            ip: client,
            port: 40010,
            to_port: Some(5001),
        },
    );
    assert_eq!(
        tcp.lookup_announcement(HostEndpoint::new(host_a, 40010), server),
        Some(OverlayEndpoint::new(client, 40010))
    );
    tcp.notices.clear();
    release(&mut tcp, client, 40010, host_a, server);
    // The claiming router's connection ended: its unused ports are free on its host now.
    tcp.forget_claims_of(host_a);
    assert_eq!(
        tcp.lookup_announcement(HostEndpoint::new(host_a, 40001), server),
        None
    );
    assert!(tcp
        .notices
        .contains(&(1, SockNotice::forget((host_a, 40001)))));
    assert!(tcp
        .notices
        .iter()
        .all(|(owner, n)| *owner == 1 && n.ip.is_unspecified()));
}

/// Clients without Freeflow wait in one pool for all containers; one container's listeners,
/// however many, take at most their container's share of it, and another container's listener
/// still has its whole room.
#[test]
fn one_containers_listeners_cannot_take_the_whole_relay_pool() {
    // Each doorbell costs a descriptor here, as in the router.
    freeflow_os::process::raise_open_file_limit().unwrap();
    let flooder = Ipv4Addr::new(10, 32, 0, 2);
    let other = Ipv4Addr::new(10, 32, 0, 3);
    let mut relays = Relays::default();
    let mut held_by_flooder = 0;
    // Enough listeners to fill the pool at their own caps, and one more.
    let listeners = (MAX_RELAYS / MAX_RELAYS_PER_LISTENER + 1) as u16;
    for port in 8000..8000 + listeners {
        let listener = OverlayEndpoint::new(flooder, port);
        while relays.room_for(listener, MAX_RELAYS_PER_LISTENER) > 0 {
            assert!(
                held_by_flooder < MAX_RELAYS_PER_CONTAINER,
                "one container's listeners were given room for more than \
                 {MAX_RELAYS_PER_CONTAINER} waiting clients (pool: {MAX_RELAYS})"
            );
            let (_, doorbell) = std::io::pipe().unwrap();
            relays.hold_for_test(listener, doorbell.into());
            held_by_flooder += 1;
        }
    }
    assert_eq!(held_by_flooder, MAX_RELAYS_PER_CONTAINER);
    assert_eq!(
        relays.room_for(OverlayEndpoint::new(other, 8000), MAX_RELAYS_PER_LISTENER),
        MAX_RELAYS_PER_LISTENER
    );
}

/// A peer router that accepts our connection and closes it at once (as one that does not know
/// this host yet refuses it): we reconnect with a growing delay, not at once each time. Counted
/// in attempts over about a second of driving the service as the control loop does; reconnecting
/// at once made hundreds.
#[test]
fn a_peer_that_closes_our_connection_is_retried_with_back_off() {
    let peer_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    peer_listener.set_nonblocking(true).unwrap();
    let port = peer_listener.local_addr().unwrap().port();
    let mut tcp = with_peer_on_loopback(port);
    let mut deferred = Deferred::new();
    let mut accepted = 0;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        while let Ok((conn, _)) = peer_listener.accept() {
            accepted += 1;
            drop(conn);
        }
        let ready: Vec<(i32, i16)> = {
            let tcp_fds = tcp.poll_fds();
            let mut fds: Vec<PollFd<'_>> = tcp_fds
                .iter()
                .map(|&(fd, events)| PollFd::new(fd, events))
                .collect();
            // Short waits, so that the listener above is served soon.
            poll::poll(&mut fds, Some(Duration::from_millis(5))).unwrap();
            tcp_fds
                .iter()
                .zip(&fds)
                .filter(|(_, p)| p.revents() != 0)
                .map(|((fd, _), p)| (fd.as_raw_fd(), p.revents()))
                .collect()
        };
        for (fd, revents) in ready {
            tcp.on_ready(fd, revents, &mut deferred);
        }
        tcp.tick(&mut deferred);
    }
    // 50 ms doubling: attempts at about 0, 50, 150, 350 and 750 ms.
    assert!(
        (1..=10).contains(&accepted),
        "{accepted} connections in a second from a router whose peer closes them"
    );
}

/// The wait before reconnecting doubles up to a cap and no further (a router back after a long
/// outage is reached again within the cap), and starts over when the peer connects to us and
/// speaks (it knows this host now).
#[test]
fn the_wait_before_reconnecting_a_peer_is_capped_and_starts_over() {
    let mut tcp = with_peer_on_loopback(9);
    let peer = tcp.peers.outgoing.get_mut(&Ipv4Addr::LOCALHOST).unwrap();
    let now = Instant::now();
    let waits: Vec<Duration> = (0..30).map(|_| peer.drop_connection(now, true)).collect();
    assert_eq!(
        waits[..3],
        [PEER_RETRY_MIN, PEER_RETRY_MIN * 2, PEER_RETRY_MIN * 4]
    );
    assert!(waits.iter().all(|w| *w <= PEER_RETRY_MAX), "{waits:?}");
    assert_eq!(waits.last(), Some(&PEER_RETRY_MAX));
    assert_eq!(peer.next_try(), now + PEER_RETRY_MAX);
    peer.heard_from(now);
    assert_eq!(peer.next_try(), now, "retried at once");
    assert_eq!(peer.drop_connection(now, true), PEER_RETRY_MIN);
}

/// Waits (5 s at most) until the relay's arrival watch `watch` reports a client, then serves
/// it as the router's loop does.
fn serve_arrival(tcp: &mut TcpService, watch: i32) {
    let watch_fd = tcp
        .relay_poll_fds()
        .find(|fd| fd.as_raw_fd() == watch)
        .expect("the arrival watch is polled");
    assert!(
        readable_within(watch_fd, Duration::from_secs(5)),
        "an arrival"
    );
    tcp.relay_later(watch);
    tcp.relay_readable();
}

/// A service on loopback relaying for one listener of 10.32.0.4:80 whose application asked for
/// `backlog`: its host listener and its overlay listener (both on loopback here).
fn relaying_service(backlog: u32) -> (TcpService, TcpListener, TcpListener, OverlayEndpoint) {
    let mut tcp = TcpService::default();
    tcp.set_network(NetworkView {
        host_ip: Ipv4Addr::LOCALHOST,
        peer_port: 0,
        hosts: Vec::new(),
        overlay: Vec::new(),
    });
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let overlay = TcpListener::bind("127.0.0.1:0").unwrap();
    overlay.set_nonblocking(true).unwrap();
    let key = OverlayEndpoint::new(Ipv4Addr::new(10, 32, 0, 4), 80);
    let listener = LocalListener {
        owners: vec![1],
        accepting: Vec::new(),
        orphaned_at: None,
        host_port: host.local_addr().unwrap().port(),
        backlog,
        reuseport: false,
        socket: Untrusted::new(OwnedFd::from(host.try_clone().unwrap())),
        overlay: Some(Untrusted::new(OwnedFd::from(overlay.try_clone().unwrap()))),
    };
    tcp.listeners.local.insert(key, listener);
    (tcp, host, overlay, key)
}

/// Whether a TCP socket of this namespace is bound to 127.0.0.1:`port` in TIME_WAIT.
fn in_time_wait(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table.lines().any(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"06")
    })
}

/// Waits (bounded) until `fd` is readable.
fn readable_within(fd: BorrowedFd<'_>, wait: Duration) -> bool {
    let mut fds = [PollFd::new(fd, libc::POLLIN)];
    poll::poll(&mut fds, Some(wait)).unwrap() > 0
}

/// Clients without Freeflow stay in the overlay listener's accept queue (the router accepts
/// none) and get one doorbell each, up to the listener's share (its backlog); none is turned
/// away. The application's accept gets the oldest doorbell, and takes a client from the
/// overlay listener itself; the doorbell it closes with a reset is the router's signal to
/// ring again, and it leaves no TIME_WAIT behind (relaying must not use up ports).
#[test]
fn waiting_clients_get_one_doorbell_each_within_the_share_and_answered_ones_ring_again() {
    assert_eq!(listener_share(16), 16);
    assert_eq!(listener_share(0), MAX_RELAYS_PER_LISTENER);
    let (mut tcp, host, overlay, _) = relaying_service(16);
    let mut clients: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(overlay.local_addr().unwrap()).unwrap())
        .collect();
    let polled: Vec<i32> = tcp.relay_poll_fds().map(|fd| fd.as_raw_fd()).collect();
    assert_eq!(polled.len(), 1, "no doorbell yet: the overlay listener");
    tcp.relay_later(polled[0]);
    tcp.relay_readable();
    assert_eq!(tcp.relays.waiting(), 16, "the listener's share");
    assert_eq!(
        crate::sys::accept_queue(overlay.as_fd()).unwrap(),
        Some(20),
        "the router accepted a client"
    );
    let watch = tcp.relays.arrival_watch_fd().expect("the arrival watch");
    let oldest: Vec<i32> = tcp
        .relay_poll_fds()
        .map(|fd| fd.as_raw_fd())
        .filter(|&fd| fd != watch)
        .collect();
    assert_eq!(oldest.len(), 1);
    assert_ne!(oldest[0], polled[0], "doorbells rung: the oldest is polled");
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let err = c.read(&mut [0u8; 1]).expect_err("nothing to read yet");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "a client was turned away: {err}"
        );
    }
    // The application's accept: a doorbell from loopback, then a client of the overlay
    // listener, then the doorbell closes with a reset (as the shim does).
    let (doorbell, from) = host.accept().unwrap();
    let SocketAddr::V4(from) = from else {
        panic!("{from}")
    };
    assert_eq!(*from.ip(), Ipv4Addr::LOCALHOST);
    let (mut conn, _) = overlay.accept().unwrap();
    let doorbell = OwnedFd::from(doorbell);
    crate::sys::set_linger_zero(&doorbell).unwrap();
    drop(doorbell);
    conn.write_all(b"!").unwrap();
    let mut got = [0u8; 1];
    let client = clients
        .iter_mut()
        .find(|c| c.local_addr().unwrap() == conn.peer_addr().unwrap())
        .expect("a waiting client");
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"!");
    let oldest_fd = tcp
        .relay_poll_fds()
        .find(|fd| fd.as_raw_fd() == oldest[0])
        .expect("the oldest doorbell");
    assert!(
        readable_within(oldest_fd, Duration::from_secs(5)),
        "answered: readable"
    );
    tcp.relay_later(oldest[0]);
    tcp.relay_readable();
    assert_eq!(tcp.counters.relayed, 1);
    assert!(!in_time_wait(from.port()), "the doorbell left a TIME_WAIT");
    assert_eq!(
        tcp.relays.waiting(),
        16,
        "19 clients wait, the share is 16: one more doorbell rung"
    );
}

/// A process without its own duplicate of the overlay listener resolves the doorbell it
/// accepted: it gets the overlay listener (its container's only) to accept the client from.
#[test]
fn a_doorbell_resolves_to_the_overlay_listener_for_its_container_only() {
    let (mut tcp, host, overlay, key) = relaying_service(16);
    let _client = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
    let polled: Vec<i32> = tcp.relay_poll_fds().map(|fd| fd.as_raw_fd()).collect();
    tcp.relay_later(polled[0]);
    tcp.relay_readable();
    assert_eq!(tcp.relays.waiting(), 1);
    let (_doorbell, from) = host.accept().unwrap();
    let SocketAddr::V4(from) = from else {
        panic!("{from}")
    };
    let key_of_doorbell = HostEndpoint::new(*from.ip(), from.port());
    let (refused, none) = tcp.resolve_doorbell(key_of_doorbell, Ipv4Addr::new(10, 32, 0, 5), 1);
    assert_eq!(refused.status, SockStatus::Error);
    assert!(none.is_none(), "another container got the listener");
    let (reply, passed) = tcp.resolve_doorbell(key_of_doorbell, key.ip(), 2);
    assert_eq!(reply.status, SockStatus::Ok);
    let passed = passed.expect("the overlay listener");
    let listening = crate::sys::int_opt(passed.as_fd(), libc::SOL_SOCKET, libc::SO_ACCEPTCONN);
    assert_eq!(listening.unwrap(), 1);
    assert_eq!(
        crate::sys::local_addr(passed.as_fd()).unwrap().1,
        overlay.local_addr().unwrap().port()
    );
}

/// A client that comes while its listener has doorbells rung (its overlay listener, readable,
/// is not polled then) gets its doorbell at once, without waiting for an answer: the arrival
/// watch reports it.
#[test]
fn a_client_arriving_while_doorbells_are_rung_gets_one_at_once() {
    let (mut tcp, _host, overlay, _) = relaying_service(16);
    let _first = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
    let polled: Vec<i32> = tcp.relay_poll_fds().map(|fd| fd.as_raw_fd()).collect();
    tcp.relay_later(polled[0]);
    tcp.relay_readable();
    assert_eq!(tcp.relays.waiting(), 1);
    let watch = tcp.relays.arrival_watch_fd().expect("the arrival watch");
    let _second = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
    serve_arrival(&mut tcp, watch);
    assert_eq!(tcp.relays.waiting(), 2, "the second client's doorbell");
}

/// While every waiting client has a doorbell, an answered one does not wake the router (its
/// oldest doorbell is not polled): it is taken, and counted, at the next arrival, or at the
/// next check when no client comes (then nothing is left to check again). A relayed client
/// costs the router one wake-up, not two.
#[test]
fn answered_doorbells_wake_the_router_only_for_clients_without_one() {
    let (mut tcp, host, overlay, key) = relaying_service(16);
    let _first = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
    let polled: Vec<i32> = tcp.relay_poll_fds().map(|fd| fd.as_raw_fd()).collect();
    tcp.relay_later(polled[0]);
    tcp.relay_readable();
    assert_eq!(tcp.relays.waiting(), 1);
    let watch = tcp.relays.arrival_watch_fd().expect("the arrival watch");
    assert!(
        !tcp.relays.polls_oldest(key),
        "every client has its doorbell"
    );
    let polled: Vec<i32> = tcp.relay_poll_fds().map(|fd| fd.as_raw_fd()).collect();
    assert_eq!(polled, vec![watch], "only arrivals wake the router");
    // The application answers (a plain close, as the shim's).
    let (doorbell, _) = host.accept().unwrap();
    let (_conn, _) = overlay.accept().unwrap();
    drop(doorbell);
    let oldest = tcp.relays.oldest_for_test(key).expect("not taken yet");
    assert!(readable_within(oldest, Duration::from_secs(5)), "answered");
    assert_eq!(tcp.counters.relayed, 0, "not looked at yet");
    // The next client: its arrival takes the answered doorbell and rings its own.
    let _second = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
    serve_arrival(&mut tcp, watch);
    assert_eq!(tcp.counters.relayed, 1, "the answered doorbell, counted");
    assert_eq!(tcp.relays.waiting(), 1, "the second client's doorbell");
    // Answered, and no client after it: the next check takes it, and stops checking.
    let (doorbell, _) = host.accept().unwrap();
    let (_conn, _) = overlay.accept().unwrap();
    drop(doorbell);
    let oldest = tcp.relays.oldest_for_test(key).expect("not taken yet");
    assert!(readable_within(oldest, Duration::from_secs(5)), "answered");
    let later = Instant::now() + Duration::from_secs(1);
    assert_eq!(tcp.relays.expire(later, |_| true), vec![(key, 1)]);
    assert_eq!(tcp.relays.waiting(), 0);
    assert_eq!(tcp.relays.next_deadline(), None, "nothing left to check");
}

/// A doorbell answered just before its listener went (a server that exits after its last
/// client) is counted all the same, as is one a status request finds answered.
#[test]
fn doorbells_answered_before_their_listener_went_are_counted() {
    let (mut tcp, host, overlay, key) = relaying_service(16);
    let _first = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
    let polled: Vec<i32> = tcp.relay_poll_fds().map(|fd| fd.as_raw_fd()).collect();
    tcp.relay_later(polled[0]);
    tcp.relay_readable();
    let (doorbell, _) = host.accept().unwrap();
    let _client = overlay.accept().unwrap();
    drop(doorbell);
    let oldest = tcp.relays.oldest_for_test(key).expect("not taken yet");
    assert!(readable_within(oldest, Duration::from_secs(5)), "answered");
    tcp.take_answered_doorbells();
    assert_eq!(tcp.counters.relayed, 1, "a status request counts it");
    assert_eq!(tcp.relays.waiting(), 0);
    let _second = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
    let watch = tcp.relays.arrival_watch_fd().expect("the arrival watch");
    serve_arrival(&mut tcp, watch);
    assert_eq!(tcp.relays.waiting(), 1);
    let (doorbell, _) = host.accept().unwrap();
    let _client = overlay.accept().unwrap();
    drop(doorbell);
    let oldest = tcp.relays.oldest_for_test(key).expect("not taken yet");
    assert!(readable_within(oldest, Duration::from_secs(5)), "answered");
    // The listener goes before the router looked.
    let later = Instant::now() + Duration::from_secs(1);
    assert_eq!(tcp.relays.expire(later, |_| false), vec![(key, 1)]);
    assert_eq!(tcp.relays.waiting(), 0);
}

/// A container that closes its listener and listens on the same port again at once (SO_REUSEADDR,
/// a server reloading) finds the port free when its Unlisten is answered: the router holds no
/// descriptor of the overlay listener any more, in the listener table nor in the arrival watch
/// (its duplicates are closed before the answer, not later on the closer thread). The same when
/// the listener is orphaned (a forked server's last holder closes it) or its process goes.
#[test]
fn a_listener_let_go_of_leaves_its_overlay_port_free_before_the_answer() {
    for how in ["unlisten", "orphan", "detach"] {
        let (mut tcp, _host, overlay, key) = relaying_service(16);
        // A relayed client: the arrival watch now holds a duplicate of the overlay listener.
        let _client = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
        let polled: Vec<i32> = tcp.relay_poll_fds().map(|fd| fd.as_raw_fd()).collect();
        tcp.relay_later(polled[0]);
        tcp.relay_readable();
        assert_eq!(tcp.relays.waiting(), 1, "{how}");
        assert!(tcp.relays.arrival_watch_fd().is_some(), "{how}");
        let container = ContainerEntry {
            name: "web".into(),
            tenant: "t".into(),
            ip: key.ip(),
            netns: freeflow_proto::identity::NetnsId { dev: 0, ino: 1 },
        };
        let caller = Caller {
            attachment: 1,
            container: &container,
        };
        let request = SockRequest {
            op: SockOp::Unlisten,
            flags: if how == "orphan" {
                freeflow_proto::sockmsg::FLAG_ORPHAN
            } else {
                0
            },
            seq: 7,
            ip: key.ip(),
            port: key.port(),
            backlog: 0,
        };
        if how == "detach" {
            tcp.detach(1);
        } else {
            let (reply, _) = tcp.handle(caller, request, Vec::new()).expect("answered");
            assert_eq!(reply.status, SockStatus::Ok, "{how}");
        }
        // The container's own descriptor goes; the port must be free at once.
        let port = overlay.local_addr().unwrap().port();
        drop(overlay);
        let again = sys::tcp_socket(false).unwrap();
        sys::bind(&again, Ipv4Addr::LOCALHOST, port, false)
            .unwrap_or_else(|e| panic!("{how}: port {port} still taken: {e}"));
    }
}

/// Several connects to one listener within one turn of the control loop use up its claim
/// pool before `tick` refills it: the pool is claimed again at once, with one message for
/// the next several connects (not an announcement for each), sent before the socket is
/// handed out.
#[test]
fn a_pool_used_up_within_a_turn_is_claimed_again_in_one_message() {
    let peer_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = peer_listener.local_addr().unwrap().port();
    let mut tcp = with_peer_on_loopback(port);
    let mut deferred = Deferred::new();
    tcp.tick(&mut deferred);
    let connecting = {
        let peer = tcp.peers.outgoing.get(&Ipv4Addr::LOCALHOST).unwrap();
        let (fd, _) = peer.connecting.as_ref().expect("connect under way");
        fd.as_raw_fd()
    };
    tcp.on_ready(connecting, libc::POLLOUT, &mut deferred);
    assert!(tcp.peers.is_up(Ipv4Addr::LOCALHOST), "connected");
    let key = Target {
        container: Ipv4Addr::new(10, 32, 0, 2),
        dst_host: Ipv4Addr::LOCALHOST,
        to_port: 5001,
    };
    assert!(
        tcp.take_claimed(key).is_none(),
        "the first connect makes the pool"
    );
    // No tick between: the pool is empty.
    let taken = tcp.take_claimed(key).expect("claimed at once");
    let (mut peer_end, _) = peer_listener.accept().unwrap();
    peer_end
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut received = Vec::new();
    let mut claims = Vec::new();
    for _ in 0..100 {
        let mut buf = [0u8; 4096];
        let n = peer_end.read(&mut buf).expect("the claim arrives");
        assert!(n > 0, "the connection stays up");
        received.extend_from_slice(&buf[..n]);
        while let Some(end) = received.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = received.drain(..=end).collect();
            if let PeerMsg::Claim { ports, fresh, .. } = PeerMsg::decode_line(&line).unwrap() {
                claims.push((ports, fresh));
            }
        }
        if !claims.is_empty() {
            break;
        }
    }
    assert_eq!(claims.len(), 1, "one claim message");
    let (ports, fresh) = &claims[0];
    assert!(*fresh);
    assert_eq!(ports.len(), CLAIM_POOL_SIZE);
    assert!(
        ports.contains(&taken.port),
        "the socket handed out was claimed"
    );
    for _ in 1..CLAIM_POOL_SIZE {
        let next = tcp.take_claimed(key).expect("the rest of the pool");
        assert!(ports.contains(&next.port));
    }
}

/// Resolves waiting for their announcements are bounded, per process and in all: one past a
/// bound is refused at once (as one that waited its whole time would be), and those waiting
/// keep their turn. A hostile process speaking the protocol itself cannot make the list, and
/// each turn's look at it, grow without end.
#[test]
fn resolves_waiting_for_announcements_are_bounded_per_process_and_in_all() {
    use super::resolve::{MAX_PENDING, MAX_PENDING_PER_PROCESS};
    let (mut tcp, _host, _overlay, key) = relaying_service(16);
    let container = ContainerEntry {
        name: "web".into(),
        tenant: "t".into(),
        ip: key.ip(),
        netns: freeflow_proto::identity::NetnsId { dev: 0, ino: 1 },
    };
    // Host peers nobody announced: each resolve waits.
    let resolve = |tcp: &mut TcpService, attachment: u32, n: u32| {
        let caller = Caller {
            attachment,
            container: &container,
        };
        let request = SockRequest {
            op: SockOp::Resolve,
            flags: 0,
            seq: n,
            ip: Ipv4Addr::new(192, 168, 1, 9),
            port: (n % 60_000) as u16 + 1024,
            backlog: 0,
        };
        tcp.handle(caller, request, Vec::new())
    };
    for n in 0..MAX_PENDING_PER_PROCESS as u32 {
        assert!(resolve(&mut tcp, 1, n).is_none(), "resolve {n} waits");
    }
    let (refused, _) = resolve(&mut tcp, 1, 1000).expect("answered at once");
    assert_eq!(refused.status, SockStatus::Error);
    assert_eq!(refused.errno, libc::ECONNREFUSED);
    assert_eq!(refused.seq, 1000);
    // Other processes still wait, up to the bound of all.
    let mut n = 2000;
    let mut attachment = 2;
    while waiting_resolves(&tcp) < MAX_PENDING {
        let waited = resolve(&mut tcp, attachment, n).is_none();
        assert!(waited, "resolve {n} of process {attachment} waits");
        n += 1;
        if (n - 2000) % MAX_PENDING_PER_PROCESS as u32 == 0 {
            attachment += 1;
        }
    }
    assert_eq!(waiting_resolves(&tcp), MAX_PENDING);
    assert!(
        resolve(&mut tcp, attachment + 1, n).is_some(),
        "the list is full"
    );
    // The waiting ones are answered (refused) at their deadline, as before.
    let mut deferred = Deferred::new();
    let later = Instant::now() + Duration::from_secs(5);
    tcp.answer_pending(&mut deferred, later);
    assert_eq!(deferred.len(), MAX_PENDING);
    assert_eq!(waiting_resolves(&tcp), 0);
}

fn waiting_resolves(tcp: &TcpService) -> usize {
    tcp.announcements.waiting()
}

/// A listener whose process takes its clients without Freeflow itself (its blocking accept
/// waits on the overlay listener too: `Accepts`): an arrival does not ring, and the overlay
/// listener leaves the arrival watch for a grace (no wake-up per client); at the grace's end
/// the router rings only for a client still waiting (a process that stopped accepting must
/// not leave it waiting without bound), and watches again. The process's going ends it.
#[test]
fn a_process_that_accepts_its_plain_clients_itself_gets_doorbells_only_after_a_grace() {
    let (mut tcp, host, overlay, key) = relaying_service(16);
    tcp.relay_readable();
    let watch = tcp.relays.arrival_watch_fd().expect("the arrival watch");
    tcp.listeners.local.get_mut(&key).unwrap().accepting = vec![1];
    let polled: Vec<i32> = tcp.relay_poll_fds().map(|fd| fd.as_raw_fd()).collect();
    assert_eq!(polled, vec![watch], "its overlay listener is not polled");
    // A client the process takes within the grace: no doorbell.
    let _first = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
    serve_arrival(&mut tcp, watch);
    assert_eq!(tcp.relays.waiting(), 0, "no doorbell at the arrival");
    assert!(tcp.relays.in_grace(key));
    let due = tcp.relays.next_deadline().expect("the grace's end");
    let (_conn, _) = overlay.accept().unwrap();
    tcp.relay_grace_over(due);
    assert_eq!(tcp.relays.waiting(), 0, "taken by the process: no doorbell");
    assert!(!tcp.relays.in_grace(key), "watched again");
    // A client the process leaves waiting: one doorbell at the grace's end.
    let _second = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
    serve_arrival(&mut tcp, watch);
    assert_eq!(tcp.relays.waiting(), 0);
    let due = tcp.relays.next_deadline().expect("the grace's end");
    tcp.relay_grace_over(due);
    assert_eq!(tcp.relays.waiting(), 1, "rung for the client left waiting");
    let (_doorbell, from) = host.accept().unwrap();
    let SocketAddr::V4(from) = from else {
        panic!("{from}")
    };
    assert_eq!(*from.ip(), Ipv4Addr::LOCALHOST);
    // A client arriving while that doorbell is rung is left to the process too.
    let _third = TcpStream::connect(overlay.local_addr().unwrap()).unwrap();
    serve_arrival(&mut tcp, watch);
    assert_eq!(tcp.relays.waiting(), 1, "no doorbell at the arrival");
    assert!(tcp.relays.in_grace(key));
    // The process goes: its listener's clients get doorbells at once again.
    tcp.listeners.detach(1, Instant::now());
    assert!(tcp.listeners.local.get(&key).unwrap().accepting.is_empty());
}
