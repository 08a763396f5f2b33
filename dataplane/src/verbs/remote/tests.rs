//! The connection's framing and buffers over a real loopback TCP connection: frames that arrive
//! in pieces, ACK coalescing, garbage, hellos.

use super::conn::{Conn, ConnState, Next, Stream};
use super::Link;
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
