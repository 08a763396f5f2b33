//! The connection's framing and buffers over a real loopback TCP connection: frames that arrive
//! in pieces, ACK coalescing, garbage, hellos; and two routers' transports on loopback
//! addresses: one connection per destination shard.

use super::conn::{Conn, ConnState, Next, Stream};
use super::{Link, OutConn, OutDest, SiblingLink, Transport};
use freeflow_proto::control::{NetworkView, OverlayEntry, PeerHost};
use freeflow_proto::verbs::remote::{FrameHeader, FrameKind, Hello, HEADER_LEN};
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};

/// Our side as a [`Conn`] (non-blocking) and the other side as a plain blocking stream.
fn pair(state: ConnState) -> (Conn, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (ours, _) = listener.accept().unwrap();
    ours.set_nonblocking(true).unwrap();
    let link = Link::Host(Ipv4Addr::LOCALHOST);
    (Conn::new(Stream::Tcp(ours), link, 2, state), other)
}

/// Reads until the receive buffer holds something complete (bounded).
fn fill_until(conn: &mut Conn, complete: impl Fn(&Conn) -> bool) {
    for _ in 0..1000 {
        conn.readable = true;
        conn.fill().unwrap();
        if complete(conn) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("nothing complete arrived");
}

fn ack(qpn: u32, seq: u32) -> FrameHeader {
    let mut h = FrameHeader::new(FrameKind::Ack);
    h.dst_qpn = qpn;
    h.seq = seq;
    h
}

#[test]
fn a_frame_that_arrives_in_pieces_is_whole_only_at_its_end() {
    let (mut conn, mut other) = pair(ConnState::Up);
    let mut h = FrameHeader::new(FrameKind::Write);
    h.len = 1000;
    h.seq = 7;
    let mut bytes = h.encode().to_vec();
    bytes.extend((0..1000).map(|i| i as u8));
    other.write_all(&bytes[..HEADER_LEN + 10]).unwrap();
    fill_until(&mut conn, |c| c.received().len() >= HEADER_LEN + 10);
    assert!(matches!(conn.next(), Ok(Next::Nothing)));
    other.write_all(&bytes[HEADER_LEN + 10..]).unwrap();
    fill_until(&mut conn, Conn::has_frame);
    let Ok(Next::Frame(got, range)) = conn.next() else {
        panic!("no frame");
    };
    assert_eq!(got, h);
    assert_eq!(&conn.rx[range.clone()], &bytes[HEADER_LEN..]);
    conn.consume(range.end);
    assert!(matches!(conn.next(), Ok(Next::Nothing)));
}

#[test]
fn acks_of_one_qp_coalesce_until_sent() {
    let (mut conn, mut other) = pair(ConnState::Up);
    conn.push_ack(&ack(5, 1));
    conn.push_ack(&ack(5, 2));
    conn.push_ack(&ack(6, 9));
    conn.push_ack(&ack(5, 3));
    conn.push_ack(&ack(5, 4));
    assert_eq!(conn.tx_pending(), 3 * HEADER_LEN);
    conn.flush().unwrap();
    // Sent: a later ACK is a frame of its own.
    conn.push_ack(&ack(5, 5));
    conn.flush().unwrap();
    let mut got = vec![0u8; 4 * HEADER_LEN];
    std::io::Read::read_exact(&mut other, &mut got).unwrap();
    let seqs: Vec<(u32, u32)> = got
        .chunks(HEADER_LEN)
        .map(|b| FrameHeader::decode(b.try_into().unwrap()).unwrap())
        .map(|h| (h.dst_qpn, h.seq))
        .collect();
    assert_eq!(seqs, [(5, 2), (6, 9), (5, 4), (5, 5)]);
}

#[test]
fn garbage_does_not_decode_and_a_hello_must_name_the_peer() {
    let (mut conn, mut other) = pair(ConnState::Up);
    other.write_all(&[0xee; HEADER_LEN]).unwrap();
    fill_until(&mut conn, |c| c.received().len() >= HEADER_LEN);
    assert!(conn.next().is_err());
    assert!(conn.has_frame(), "a bad header is something to act on");

    let (mut conn, mut other) = pair(ConnState::AwaitHello);
    let wrong = Hello {
        host: Ipv4Addr::new(192, 0, 2, 9),
        dst: Ipv4Addr::new(10, 0, 0, 2),
    };
    other.write_all(&wrong.encode()).unwrap();
    fill_until(&mut conn, |c| c.received().len() >= 16);
    assert!(conn.take_hello().is_err());

    let (mut conn, mut other) = pair(ConnState::AwaitHello);
    let right = Hello {
        host: Ipv4Addr::LOCALHOST,
        dst: Ipv4Addr::new(10, 0, 0, 2),
    };
    other.write_all(&right.encode()).unwrap();
    fill_until(&mut conn, |c| c.received().len() >= 16);
    assert_eq!(conn.take_hello(), Ok(true));
    assert_eq!(conn.state, ConnState::Up);
    assert_eq!(
        conn.dst,
        Ipv4Addr::new(10, 0, 0, 2),
        "the hello names the destination"
    );
}

/// The receive buffer keeps its room between reads: what an earlier, larger frame left
/// beyond the received bytes must never read as the start of the next frame.
#[test]
fn bytes_of_a_consumed_frame_never_complete_the_next_one() {
    let (mut conn, mut other) = pair(ConnState::Up);
    let mut big = FrameHeader::new(FrameKind::Write);
    big.len = 4000;
    let mut bytes = big.encode().to_vec();
    bytes.extend((0..4000).map(|i| i as u8));
    other.write_all(&bytes).unwrap();
    fill_until(&mut conn, Conn::has_frame);
    let Ok(Next::Frame(_, range)) = conn.next() else {
        panic!("no frame");
    };
    conn.consume(range.end);
    // The next frame's header, only half of it sent: nothing is complete yet.
    let small = ack(3, 11).encode();
    other.write_all(&small[..HEADER_LEN / 2]).unwrap();
    fill_until(&mut conn, |c| c.received().len() >= HEADER_LEN / 2);
    assert!(matches!(conn.next(), Ok(Next::Nothing)));
    other.write_all(&small[HEADER_LEN / 2..]).unwrap();
    fill_until(&mut conn, Conn::has_frame);
    let Ok(Next::Frame(got, range)) = conn.next() else {
        panic!("no frame");
    };
    assert_eq!((got.dst_qpn, got.seq, range.len()), (3, 11, 0));
}

/// The cluster as every router sees it: host A (127.0.0.1) and host B (127.0.0.2), both with
/// peer port `port`; containers 10.32.0.2, .3 and .4 on B (tenant blue).
fn view(me: Ipv4Addr, port: u16) -> NetworkView {
    let (a, b) = (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2));
    NetworkView {
        host_ip: me,
        peer_port: port,
        hosts: [a, b]
            .map(|host_ip| PeerHost {
                host_ip,
                peer_port: port,
            })
            .to_vec(),
        overlay: [2, 3, 4]
            .map(|last| OverlayEntry {
                ip: Ipv4Addr::new(10, 32, 0, last),
                tenant: "blue".into(),
                host_ip: b,
            })
            .to_vec(),
    }
}

/// Host A's router (one shard, 127.0.0.1) and host B's (two shards, 127.0.0.2, linked by
/// their socket pairs), each with the cluster's view.
fn two_routers() -> (Transport, Vec<Transport>) {
    let b_ip = Ipv4Addr::new(127, 0, 0, 2);
    // A free verbs port on B's address (the peer port is one below it).
    let port = TcpListener::bind((b_ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        - 1;
    let mut a = Transport::default();
    a.set_shard(0, 1, Vec::new());
    a.set_network(&view(Ipv4Addr::LOCALHOST, port));
    let b = SiblingLink::mesh(2)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, links)| {
            let mut t = Transport::default();
            t.set_shard(i, 2, links);
            t.set_network(&view(b_ip, port));
            t
        })
        .collect();
    (a, b)
}

const HOST_B: Link = Link::Host(Ipv4Addr::new(127, 0, 0, 2));

fn overlay(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 32, 0, last)
}

/// One round of both routers' sockets (what their shards' passes do with them), B's shard 0
/// handing connections to shard 1 as the control thread would.
fn pump_both(a: &mut Transport, b: &mut [Transport]) {
    let now = std::time::Instant::now();
    a.flush_all();
    for t in b.iter_mut() {
        t.poll_now();
        t.pump(now);
    }
    for (shard, conn) in b[0].take_handoff() {
        assert_eq!(shard, 1, "only shard 1 is another shard");
        b[1].adopt_incoming(conn);
    }
    for t in b.iter_mut() {
        t.flush_all();
    }
    a.poll_now();
    a.pump(now);
}

/// Pumps both routers until A's connection for `dst` is up (bounded).
fn until_up(a: &mut Transport, b: &mut [Transport], dst: Ipv4Addr) {
    for _ in 0..2000 {
        if matches!(
            a.out_conn(HOST_B, dst, std::time::Instant::now()),
            OutConn::Up(_)
        ) {
            return;
        }
        pump_both(a, b);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("no connection to {dst} came up");
}

/// The keys of A's connections, sorted.
fn keys(a: &Transport) -> Vec<OutDest> {
    let mut k: Vec<OutDest> = a.out.keys().map(|(_, dest)| *dest).collect();
    k.sort_by_key(|dest| format!("{dest:?}"));
    k
}

/// The destinations named by the hellos of B's shard's connections from A.
fn from_a(t: &Transport) -> Vec<Ipv4Addr> {
    let mut d: Vec<Ipv4Addr> = t
        .incoming
        .iter()
        .filter(|c| c.link == Link::Host(Ipv4Addr::LOCALHOST))
        .map(|c| c.dst)
        .collect();
    d.sort();
    d
}

/// Host A's router (one shard) opens one connection per shard of host B's router (two
/// shards) that its QPs send to, not one per container: the answer to the first hello says
/// B has two shards and which one serves the connection; a destination on that shard reuses
/// it, one on the other shard gets its own, which B's shard 0 hands to shard 1.
#[test]
fn a_requester_keeps_one_connection_per_destination_shard() {
    let (mut a, mut b) = two_routers();
    // 10.32.0.2 is served by B's shard 0: the connection opened for it is shard 0's.
    until_up(&mut a, &mut b, overlay(2));
    assert_eq!(keys(&a), [OutDest::Shard(0)]);
    assert_eq!(a.peer_shards.get(&Ipv4Addr::new(127, 0, 0, 2)), Some(&2));
    // 10.32.0.4, also shard 0's: the same connection, no new one.
    until_up(&mut a, &mut b, overlay(4));
    assert_eq!(keys(&a), [OutDest::Shard(0)]);
    // 10.32.0.3 is shard 1's: a second connection, which B's shard 1 serves.
    until_up(&mut a, &mut b, overlay(3));
    assert_eq!(keys(&a), [OutDest::Shard(0), OutDest::Shard(1)]);
    assert_eq!(from_a(&b[0]), [overlay(2)]);
    assert_eq!(from_a(&b[1]), [overlay(3)]);
}

/// Before any answer, a connection per destination container: two whose answers name the
/// same shard do not collide; the first takes the shard's key, the other keeps its
/// container's (and that container's requests keep using it).
#[test]
fn connections_opened_before_the_first_answer_keep_their_destinations() {
    let (mut a, mut b) = two_routers();
    let now = std::time::Instant::now();
    for dst in [overlay(2), overlay(4)] {
        assert!(matches!(a.out_conn(HOST_B, dst, now), OutConn::Connecting));
    }
    assert_eq!(
        keys(&a),
        [
            OutDest::Container(overlay(2)),
            OutDest::Container(overlay(4))
        ]
    );
    until_up(&mut a, &mut b, overlay(2));
    until_up(&mut a, &mut b, overlay(4));
    assert_eq!(a.out.len(), 2);
    let token_of = |a: &Transport, dst| a.out_token(HOST_B, dst).expect("up").0;
    assert_ne!(token_of(&a, overlay(2)), token_of(&a, overlay(4)));
    // Whichever answer came first holds shard 0's key; both destinations are shard 0's.
    let shard_0 = a.out[&(HOST_B, OutDest::Shard(0))].dst;
    let other = if shard_0 == overlay(2) {
        overlay(4)
    } else {
        overlay(2)
    };
    assert!(a.out.contains_key(&(HOST_B, OutDest::Container(other))));
    assert_eq!(from_a(&b[0]), [overlay(2), overlay(4)]);
}

/// A connection over one end of a Unix socket pair (non-blocking; the kernel's default send
/// buffer, a few hundred KiB) and the other end, blocking.
fn local_pair() -> (Conn, std::os::unix::net::UnixStream) {
    let (ours, other) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    (
        Conn::new(Stream::Local(ours), Link::Shard(1), 4, ConnState::Up),
        other,
    )
}

/// Flushes `conn` while reading `other` in chunks of at most `chunk` bytes, until `want` bytes
/// came (bounded in passes); returns them.
fn drain_through(
    conn: &mut Conn,
    other: &mut std::os::unix::net::UnixStream,
    want: usize,
    chunk: usize,
) -> Vec<u8> {
    use std::io::Read;
    let mut got = Vec::with_capacity(want);
    let mut buf = vec![0u8; chunk];
    for _ in 0..100_000 {
        if got.len() == want {
            break;
        }
        conn.flush().unwrap();
        let n = other.read(&mut buf[..chunk.min(want - got.len())]).unwrap();
        assert_ne!(n, 0, "the stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), want, "not everything came in the passes allowed");
    got
}

/// Payloads sent straight from registered memory keep their place in the stream between
/// frames of the send buffer, through sends the kernel takes only in part.
#[test]
fn zero_copy_payloads_keep_their_place_through_partial_sends() {
    use crate::verbs::memory::{Mapping, SharedSpan};
    use std::sync::Arc;
    let (mut conn, mut other) = local_pair();
    let mapping = Arc::new(Mapping::anonymous(1 << 20));
    let pattern: Vec<u8> = (0..1 << 20).map(|i: u32| ((i * 7) >> 5) as u8).collect();
    mapping
        .view(0, 1 << 20)
        .unwrap()
        .write_at(0, &pattern)
        .unwrap();
    // An ACK, a frame with two pinned pieces (600 KiB and 300 KiB: beyond the socket's
    // buffer), an ACK of another QP, a copied frame, and a second pinned frame.
    conn.push_ack(&ack(5, 1));
    let mut write = FrameHeader::new(FrameKind::Write);
    write.len = 900 << 10;
    let spans = [
        SharedSpan::new(&mapping, 0, 600 << 10).unwrap(),
        SharedSpan::new(&mapping, 100 << 10, 300 << 10).unwrap(),
    ];
    conn.push_frame_shared(&write, spans.into_iter());
    conn.push_ack(&ack(6, 2));
    let mut send = FrameHeader::new(FrameKind::Send);
    send.len = 10;
    conn.push_frame(&send, |buf| {
        buf.copy_from_slice(b"0123456789");
        Ok::<(), ()>(())
    })
    .unwrap();
    let mut second = FrameHeader::new(FrameKind::Write);
    second.len = 20 << 10;
    conn.push_frame_shared(
        &second,
        std::iter::once(SharedSpan::new(&mapping, 5, 20 << 10).unwrap()),
    );
    let mut expected = ack(5, 1).encode().to_vec();
    expected.extend_from_slice(&write.encode());
    expected.extend_from_slice(&pattern[..600 << 10]);
    expected.extend_from_slice(&pattern[100 << 10..400 << 10]);
    expected.extend_from_slice(&ack(6, 2).encode());
    expected.extend_from_slice(&send.encode());
    expected.extend_from_slice(b"0123456789");
    expected.extend_from_slice(&second.encode());
    expected.extend_from_slice(&pattern[5..5 + (20 << 10)]);
    assert_eq!(conn.tx_pending(), expected.len());
    // The first flush stops short: the peer reads nothing yet.
    conn.flush().unwrap();
    let left = conn.tx_pending();
    assert!(
        left > 0 && left < expected.len(),
        "{left} of {}",
        expected.len()
    );
    // Reads of odd sizes make the kernel take odd pieces: inside a header, inside a span.
    let got = drain_through(&mut conn, &mut other, expected.len(), 4099);
    assert!(got == expected, "the stream differs from the frames queued");
    assert_eq!(conn.tx_pending(), 0);
}

/// An ACK queued behind a pinned payload coalesces with a later one only while nothing of it
/// went: the stream keeps one ACK frame with the later sequence number.
#[test]
fn an_ack_behind_a_pinned_payload_still_coalesces() {
    use crate::verbs::memory::{Mapping, SharedSpan};
    use std::sync::Arc;
    let (mut conn, mut other) = local_pair();
    let mapping = Arc::new(Mapping::anonymous(64 << 10));
    let mut write = FrameHeader::new(FrameKind::Write);
    write.len = 64 << 10;
    conn.push_frame_shared(
        &write,
        std::iter::once(SharedSpan::new(&mapping, 0, 64 << 10).unwrap()),
    );
    conn.push_ack(&ack(5, 1));
    conn.push_ack(&ack(5, 2));
    let want = 2 * HEADER_LEN + (64 << 10);
    assert_eq!(conn.tx_pending(), want);
    let got = drain_through(&mut conn, &mut other, want, 64 << 10);
    assert_eq!(&got[want - HEADER_LEN..], &ack(5, 2).encode()[..]);
}

/// A payload received straight into its target through reads of odd sizes: the frames behind
/// it, whose bytes came with its last piece, are parsed from the buffer after it.
#[test]
fn a_landed_payload_fills_its_target_and_the_next_frames_follow() {
    use crate::verbs::memory::{Mapping, SharedSpan};
    use std::sync::Arc;
    let (ours, mut other) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let mut conn = Conn::new(Stream::Local(ours), Link::Shard(1), 4, ConnState::Up);
    let mapping = Arc::new(Mapping::anonymous(256 << 10));
    let len = 100_000;
    let mut h = FrameHeader::new(FrameKind::Write);
    h.len = len as u32;
    let payload: Vec<u8> = (0..len).map(|i| ((i * 3) >> 1) as u8).collect();
    other.write_all(&h.encode()).unwrap();
    other.write_all(&payload[..100]).unwrap();
    fill_until(&mut conn, |c| c.received().len() >= HEADER_LEN + 100);
    assert_eq!(conn.partial_head(), Some(h));
    conn.land(SharedSpan::new(&mapping, 1000, len).unwrap())
        .unwrap();
    assert!(conn.landing() && conn.landed().is_none());
    // The rest, an ACK and a SEND with its payload, in pieces the kernel hands over as they come.
    let mut send = FrameHeader::new(FrameKind::Send);
    send.len = 3;
    let mut rest = payload[100..].to_vec();
    rest.extend_from_slice(&ack(9, 4).encode());
    rest.extend_from_slice(&send.encode());
    rest.extend_from_slice(b"abc");
    for piece in rest.chunks(7001) {
        other.write_all(piece).unwrap();
        conn.readable = true;
        conn.fill().unwrap();
    }
    fill_until(&mut conn, |c| c.landed().is_some());
    assert_eq!(conn.landed(), Some((h, false)));
    let mut target = vec![0u8; len];
    mapping
        .view(1000, len)
        .unwrap()
        .read_at(0, &mut target)
        .unwrap();
    assert!(target == payload, "the target is not the payload");
    conn.take_landed();
    fill_until(&mut conn, |c| c.received().len() >= 2 * HEADER_LEN + 3);
    let Ok(Next::Frame(got, range)) = conn.next() else {
        panic!("no ACK after the landed frame");
    };
    assert_eq!(got, ack(9, 4));
    conn.consume(range.end);
    let Ok(Next::Frame(got, range)) = conn.next() else {
        panic!("no SEND after the ACK");
    };
    assert_eq!((got, &conn.rx[range]), (send, &b"abc"[..]));
}

/// More pinned payloads than one gathered send takes (`MAX_PIECES`): a send that stops early
/// ends its last piece of the send buffer where the next pinned payload goes, so the frames
/// behind it are not sent in that payload's place.
#[test]
fn more_pinned_payloads_than_one_send_takes_keep_their_place() {
    use crate::verbs::memory::{Mapping, SharedSpan};
    use std::sync::Arc;
    let (mut conn, mut other) = local_pair();
    let mapping = Arc::new(Mapping::anonymous(64 << 10));
    let pattern: Vec<u8> = (0..64 << 10).map(|i: u32| ((i * 13) >> 3) as u8).collect();
    mapping
        .view(0, 64 << 10)
        .unwrap()
        .write_at(0, &pattern)
        .unwrap();
    let mut expected = Vec::new();
    // One frame with two spans (3 pieces), then one-span frames (2 pieces each): the send
    // stops at 63 pieces, between a frame's header and its payload.
    let mut first = FrameHeader::new(FrameKind::Write);
    first.len = 3000;
    conn.push_frame_shared(
        &first,
        [
            SharedSpan::new(&mapping, 0, 1000).unwrap(),
            SharedSpan::new(&mapping, 5000, 2000).unwrap(),
        ]
        .into_iter(),
    );
    expected.extend_from_slice(&first.encode());
    expected.extend_from_slice(&pattern[..1000]);
    expected.extend_from_slice(&pattern[5000..7000]);
    for i in 0..40usize {
        let mut h = FrameHeader::new(FrameKind::Write);
        h.len = 500 + i as u32;
        h.seq = i as u32;
        let off = 1000 * i;
        conn.push_frame_shared(
            &h,
            std::iter::once(SharedSpan::new(&mapping, off, 500 + i).unwrap()),
        );
        expected.extend_from_slice(&h.encode());
        expected.extend_from_slice(&pattern[off..off + 500 + i]);
    }
    conn.push_ack(&ack(7, 3));
    expected.extend_from_slice(&ack(7, 3).encode());
    assert_eq!(conn.tx_pending(), expected.len());
    let got = drain_through(&mut conn, &mut other, expected.len(), 64 << 10);
    assert!(got == expected, "the stream differs from the frames queued");
    assert_eq!(conn.tx_pending(), 0);
}
