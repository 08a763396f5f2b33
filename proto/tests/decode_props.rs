//! Stable property tests of every decoder of bytes a container or a peer router controls:
//! decoding arbitrary bytes (random, and valid encodings with bytes changed, cut or added)
//! never panics and what decodes re-encodes to the same bytes or a canonical form (the oracles
//! of the fuzz targets, `fuzz/src/lib.rs`, included here); every message with arbitrary field
//! values survives encode then decode; and the committed fuzz corpus replays cleanly (an input
//! that once crashed a decoder, added to `fuzz/corpus/<target>/`, stays a regression test).

#[path = "../../fuzz/src/lib.rs"]
mod oracles;

use freeflow_proto::attach::{Hello, Refusal, ShimKind, Welcome};
use freeflow_proto::codec::Body;
use freeflow_proto::control::{
    ContainerEntry, ControlRequest, NetworkDelta, NetworkView, OverlayEntry, PeerHost, TableDelta,
};
use freeflow_proto::identity::NetnsId;
use freeflow_proto::msg::{MsgHeader, HEADER_LEN};
use freeflow_proto::peer::{ListenerEntry, PeerMsg};
use freeflow_proto::sockmsg::{FromRouter, SockNotice, SockOp, SockReply, SockRequest, SockStatus};
use freeflow_proto::verbs::qp::{CreateQp, ModifyQp, QpAttr, QpCap, QpCreated, QpQueried};
use freeflow_proto::verbs::remote::{
    split_frame, FrameHeader, FrameKind, Hello as VerbsHello, MAX_PAYLOAD,
};
use freeflow_proto::verbs::srq::{CreateSrq, ModifySrq, SrqAttr, SrqCreated};
use freeflow_proto::verbs::work::{
    send_flags, Cqe, RecvWqe, SendWqe, SendWqeHeader, Sge, MAX_SGE, RECV_WQE_HEADER,
};
use freeflow_proto::verbs::{
    CqCreated, CreateCq, DeallocPd, DeregMr, MemoryFileMsg, MrCreated, ObjectHandle, PdCreated,
    QueueFileKind, QueueFileMsg, RegMr, ResizeCq, TestDigest, TestRead, TestWrite, MAX_TEST_WRITE,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use std::fmt::Debug;
use std::net::Ipv4Addr;
use std::path::PathBuf;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 1000,
        // A failing input belongs in fuzz/corpus/<target>/, which the replay test runs.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A valid encoding of `target`'s family with up to 4 bytes changed, then perhaps cut short or
/// extended: inputs that get past the magic and length checks random bytes fail.
fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    (
        select(oracles::seeds(target)),
        vec((any::<Index>(), any::<u8>()), 0..4),
        prop_oneof![Just(None), any::<Index>().prop_map(Some)],
        vec(any::<u8>(), 0..3),
    )
        .prop_map(|(mut b, changes, cut, extra)| {
            for (at, value) in changes {
                if !b.is_empty() {
                    let i = at.index(b.len());
                    b[i] = value;
                }
            }
            if let Some(cut) = cut {
                b.truncate(cut.index(b.len() + 1));
            }
            b.extend(extra);
            b
        })
}

/// Random bytes, or a mutated valid encoding.
fn input(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..300), mutated(target)]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn hello_and_welcome_decoders_never_panic(b in input("hello")) {
        oracles::hello(&b);
    }

    #[test]
    fn sockmsg_decoders_never_panic(b in input("sockmsg")) {
        oracles::sockmsg(&b);
    }

    #[test]
    fn msg_header_decoder_never_panics(b in input("msg_header")) {
        oracles::msg_header(&b);
    }

    #[test]
    fn verbs_body_decoders_never_panic(b in input("verbs_bodies")) {
        oracles::verbs_bodies(&b);
    }

    #[test]
    fn wqe_decoders_never_panic(b in input("wqe")) {
        oracles::wqe(&b);
    }

    #[test]
    fn peer_msg_decoder_never_panics(b in input("peer_msg")) {
        oracles::peer_msg(&b);
    }

    #[test]
    fn control_decoders_never_panic(b in input("control_request")) {
        oracles::control_request(&b);
    }

    #[test]
    fn verbs_frame_decoders_never_panic(b in input("verbs_frames")) {
        oracles::verbs_frames(&b);
    }
}

#[test]
fn the_fuzz_corpus_replays_cleanly() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, oracle) in oracles::TARGETS {
        let dir = root.join(target);
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        assert!(!files.is_empty(), "{} has no seed", dir.display());
        for f in files {
            let data = std::fs::read(&f).expect("a corpus file");
            oracle(&data);
        }
    }
}

/// Writes the seed corpus of every fuzz target (`cargo test -p freeflow-proto --test
/// decode_props -- --ignored write_seed_corpus`), to be committed.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when the encoders change"]
fn write_seed_corpus() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, _) in oracles::TARGETS {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for (i, seed) in oracles::seeds(target).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed).expect("a seed");
        }
    }
}

// Round trips with arbitrary field values.

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<[u8; 4]>().prop_map(Ipv4Addr::from)
}

fn shim_kind() -> impl Strategy<Value = ShimKind> {
    select(vec![ShimKind::Socket, ShimKind::Verbs, ShimKind::Probe])
}

fn welcome() -> impl Strategy<Value = Welcome> {
    let refusal = select(vec![
        Refusal::VersionMismatch,
        Refusal::NotRegistered,
        Refusal::Malformed,
        Refusal::Busy,
        Refusal::Internal,
        Refusal::ShuttingDown,
    ]);
    prop_oneof![
        (
            any::<u16>(),
            any::<u32>(),
            ipv4(),
            "[^\n]{0,60}",
            "\\PC{0,60}"
        )
            .prop_map(
                |(shard, attachment_id, ip, container, tenant)| Welcome::Accepted {
                    shard,
                    attachment_id,
                    ip,
                    container,
                    tenant,
                }
            ),
        (refusal, "\\PC{0,200}").prop_map(|(reason, message)| Welcome::Refused { reason, message }),
    ]
}

fn sock_request() -> impl Strategy<Value = SockRequest> {
    let op = select(vec![
        SockOp::Connect,
        SockOp::Listen,
        SockOp::Unlisten,
        SockOp::Resolve,
        SockOp::Own,
        SockOp::Relisten,
        SockOp::Accepts,
    ]);
    (
        op,
        any::<u16>(),
        any::<u32>(),
        ipv4(),
        any::<u16>(),
        any::<u32>(),
    )
        .prop_map(|(op, flags, seq, ip, port, backlog)| SockRequest {
            op,
            flags,
            seq,
            ip,
            port,
            backlog,
        })
}

fn sock_reply() -> impl Strategy<Value = SockReply> {
    let status = select(vec![
        SockStatus::Ok,
        SockStatus::Fallback,
        SockStatus::Error,
    ]);
    (status, any::<u32>(), any::<i32>(), ipv4(), any::<u16>()).prop_map(
        |(status, seq, errno, ip, port)| SockReply {
            status,
            seq,
            errno,
            ip,
            port,
        },
    )
}

fn sock_notice() -> impl Strategy<Value = SockNotice> {
    (ipv4(), any::<u16>(), ipv4(), any::<u16>(), any::<u32>()).prop_map(
        |(host_ip, host_port, ip, port, sent_ms)| SockNotice {
            host_ip,
            host_port,
            ip,
            port,
            sent_ms,
        },
    )
}

fn peer_msg() -> impl Strategy<Value = PeerMsg> {
    let entry =
        (ipv4(), any::<u16>(), any::<u16>()).prop_map(|(ip, port, host_port)| ListenerEntry {
            ip,
            port,
            host_port,
        });
    prop_oneof![
        (ipv4(), vec(entry, 0..5)).prop_map(|(host, entries)| PeerMsg::Listeners { host, entries }),
        (
            ipv4(),
            any::<u16>(),
            ipv4(),
            any::<u16>(),
            any::<Option<u16>>()
        )
            .prop_map(|(host, host_port, ip, port, to_port)| PeerMsg::Conn {
                host,
                host_port,
                ip,
                port,
                to_port,
            }),
        (
            ipv4(),
            ipv4(),
            any::<u16>(),
            vec(any::<u16>(), 0..8),
            any::<bool>()
        )
            .prop_map(|(host, ip, to_port, ports, fresh)| PeerMsg::Claim {
                host,
                ip,
                to_port,
                ports,
                fresh,
            }),
        (ipv4(), ipv4(), any::<u16>(), vec(any::<u16>(), 0..8)).prop_map(
            |(host, ip, to_port, ports)| PeerMsg::Release {
                host,
                ip,
                to_port,
                ports,
            }
        ),
    ]
}

fn control_request() -> impl Strategy<Value = ControlRequest> {
    let netns = any::<(u64, u64)>().prop_map(|(dev, ino)| NetnsId { dev, ino });
    let container = ("\\PC{0,20}", "\\PC{0,20}", ipv4(), any::<(u64, u64)>())
        .prop_map(|(name, tenant, ip, (dev, ino))| ContainerEntry {
            name,
            tenant,
            ip,
            netns: NetnsId { dev, ino },
        })
        .boxed();
    let host =
        (ipv4(), any::<u16>()).prop_map(|(host_ip, peer_port)| PeerHost { host_ip, peer_port });
    let overlay = (ipv4(), "\\PC{0,20}", ipv4()).prop_map(|(ip, tenant, host_ip)| OverlayEntry {
        ip,
        tenant,
        host_ip,
    });
    let network = (ipv4(), any::<u16>(), vec(host, 0..3), vec(overlay, 0..3))
        .prop_map(|(host_ip, peer_port, hosts, overlay)| NetworkView {
            host_ip,
            peer_port,
            hosts,
            overlay,
        })
        .boxed();
    prop_oneof![
        Just(ControlRequest::Status),
        Just(ControlRequest::Shutdown),
        (
            vec(container.clone(), 0..4),
            proptest::option::of(network.clone()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(containers, network, generation)| {
                ControlRequest::SetContainers {
                    containers,
                    network,
                    generation,
                }
            }),
        (
            any::<(u64, u64)>(),
            vec(container, 0..4),
            vec(netns.clone(), 0..3),
            proptest::option::of(network),
        )
            .prop_map(|((base, generation), upserted, removed, network)| {
                ControlRequest::UpdateContainers(TableDelta {
                    base,
                    generation,
                    upserted,
                    removed,
                    network: network.map(|n| NetworkDelta {
                        host_ip: n.host_ip,
                        peer_port: n.peer_port,
                        hosts: n.hosts,
                        overlay_removed: n.overlay.iter().rev().cloned().collect(),
                        overlay_added: n.overlay,
                    }),
                })
            }),
    ]
}

/// A fixed-layout body with arbitrary field values (every field of these bodies is a plain
/// integer or byte array, so arbitrary bytes are exactly arbitrary field values) survives
/// encode then decode.
fn body_round_trip<T: Body + PartialEq + Debug>(bytes: &[u8]) {
    let value = T::read(&bytes[..T::LEN]);
    let encoded = value.to_vec();
    assert_eq!(encoded.len(), T::LEN);
    assert_eq!(T::decode(&encoded), Ok(value), "{}", T::NAME);
    assert!(T::decode(&encoded[..T::LEN - 1]).is_err());
}

/// A frame header of any kind with arbitrary field values in the shape its kind allows (a
/// payload length up to the limit for the kinds with data, an acknowledgement only on
/// requests of connected QPs).
fn frame_header() -> impl Strategy<Value = FrameHeader> {
    use FrameKind::*;
    let kind = select(vec![
        Send,
        SendWithImm,
        Write,
        WriteWithImm,
        Read,
        CompareSwap,
        FetchAdd,
        Datagram,
        Ack,
        ReadData,
        AtomicData,
        Nak,
    ]);
    (
        kind,
        any::<(u8, u32, Option<u32>)>(),
        (ipv4(), ipv4()),
        any::<[u32; 6]>(),
        any::<[u64; 3]>(),
    )
        .prop_map(|(kind, (code, len, ack), (src_ip, dst_ip), w, d)| {
            let len = match kind {
                Send | SendWithImm | Write | WriteWithImm | ReadData | Datagram => {
                    len % (MAX_PAYLOAD + 1)
                }
                AtomicData => 8,
                _ => 0,
            };
            let ack = ack.filter(|_| kind.is_request() && kind != Datagram);
            FrameHeader {
                kind,
                code,
                len,
                src_ip,
                dst_ip,
                src_qpn: w[0],
                dst_qpn: w[1],
                seq: w[2],
                rkey: w[3],
                imm: w[4],
                arg: w[5],
                remote_addr: d[0],
                compare_add: d[1],
                swap: d[2],
                ack,
            }
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn verbs_transport_frames_round_trip(
        headers in vec(frame_header(), 1..6), host in ipv4(), dst in ipv4(),
    ) {
        let hello = VerbsHello { host, dst };
        prop_assert_eq!(VerbsHello::decode(&hello.encode()), Ok(hello));
        // A connection's bytes (payloads kept short): split back into the same frames.
        let mut stream = Vec::new();
        let mut sent = Vec::new();
        for mut h in headers {
            if h.len > 64 && h.kind != FrameKind::AtomicData {
                h.len %= 64;
            }
            prop_assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
            stream.extend_from_slice(&h.encode());
            stream.extend((0..h.len).map(|i| i as u8));
            sent.push(h);
        }
        let mut rest = &stream[..];
        for h in sent {
            let (got, payload) = split_frame(rest).expect("decodes").expect("whole");
            prop_assert_eq!(got, h);
            prop_assert_eq!(payload.len(), h.len as usize);
            rest = &rest[payload.end..];
        }
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn hellos_round_trip(kind in shim_kind()) {
        let h = Hello::new(kind);
        prop_assert_eq!(Hello::decode(&h.encode()), Ok((h, kind)));
    }

    #[test]
    fn welcomes_round_trip(w in welcome()) {
        prop_assert_eq!(Welcome::decode(&w.encode()), Ok(w));
    }

    #[test]
    fn sock_messages_round_trip(r in sock_request(), reply in sock_reply(), n in sock_notice()) {
        prop_assert_eq!(SockRequest::decode(&r.encode()), Ok(r));
        prop_assert_eq!(SockReply::decode(&reply.encode()), Ok(reply));
        prop_assert_eq!(FromRouter::decode(&reply.encode()), Ok(FromRouter::Reply(reply)));
        prop_assert_eq!(SockNotice::decode(&n.encode()), Ok(n));
        prop_assert_eq!(FromRouter::decode(&n.encode()), Ok(FromRouter::Notice(n)));
    }

    #[test]
    fn msg_headers_round_trip(
        opcode in any::<u16>(), status in any::<u16>(), len in any::<u32>(), cookie in any::<u64>(),
    ) {
        let h = MsgHeader { opcode, status, len, cookie };
        let mut b = [0u8; HEADER_LEN];
        h.encode(&mut b);
        prop_assert_eq!(MsgHeader::decode(&b), h);
    }

    #[test]
    fn verbs_bodies_round_trip(bytes in vec(any::<u8>(), 128)) {
        body_round_trip::<PdCreated>(&bytes);
        body_round_trip::<DeallocPd>(&bytes);
        body_round_trip::<RegMr>(&bytes);
        body_round_trip::<MrCreated>(&bytes);
        body_round_trip::<DeregMr>(&bytes);
        body_round_trip::<ObjectHandle>(&bytes);
        body_round_trip::<CreateCq>(&bytes);
        body_round_trip::<ResizeCq>(&bytes);
        body_round_trip::<CqCreated>(&bytes);
        body_round_trip::<QpCap>(&bytes);
        body_round_trip::<CreateQp>(&bytes);
        body_round_trip::<QpCreated>(&bytes);
        body_round_trip::<QpAttr>(&bytes);
        body_round_trip::<ModifyQp>(&bytes);
        body_round_trip::<QpQueried>(&bytes);
        body_round_trip::<CreateSrq>(&bytes);
        body_round_trip::<SrqAttr>(&bytes);
        body_round_trip::<SrqCreated>(&bytes);
        body_round_trip::<ModifySrq>(&bytes);
        body_round_trip::<TestRead>(&bytes);
        body_round_trip::<TestDigest>(&bytes);
        body_round_trip::<Sge>(&bytes);
        body_round_trip::<SendWqeHeader>(&bytes);
    }

    #[test]
    fn file_messages_round_trip(
        kind in select(vec![QueueFileKind::Cq, QueueFileKind::Qp, QueueFileKind::Channel, QueueFileKind::Srq]),
        handle in any::<u32>(),
        size in any::<u64>(),
        (pd, lkey, addr) in any::<(u32, u32, u64)>(),
        data in vec(any::<u8>(), 0..=MAX_TEST_WRITE),
    ) {
        let q = QueueFileMsg { kind, handle };
        prop_assert_eq!(QueueFileMsg::decode(&q.encode()), Ok(q));
        let m = MemoryFileMsg { size, file: pd as u16 };
        prop_assert_eq!(MemoryFileMsg::decode(&m.encode()), Ok(m));
        let w = TestWrite { pd, lkey, addr, data };
        let mut out = [0u8; 64];
        let n = w.encode(&mut out).expect("fits");
        prop_assert_eq!(TestWrite::decode(&out[..n]), Ok(w));
    }

    #[test]
    fn send_wqes_round_trip(
        header in vec(any::<u8>(), SendWqeHeader::LEN),
        opcode in 0u8..=6,
        flags in 0u8..=(send_flags::KNOWN as u8),
        sges in vec(any::<(u64, u32, u32)>(), 0..=MAX_SGE as usize),
        inline in vec(any::<u8>(), 0..200),
    ) {
        let mut h = SendWqeHeader::read(&header);
        h.opcode = opcode;
        h.flags = flags;
        let sges: Vec<Sge> = sges.into_iter().map(|(addr, length, lkey)| Sge { addr, length, lkey }).collect();
        let is_inline = h.has(send_flags::INLINE);
        (h.num_sge, h.inline_len) = if is_inline { (0, inline.len() as u32) } else { (sges.len() as u16, 0) };
        let mut slot = vec![0u8; SendWqe::slot_bytes(u32::from(h.num_sge), h.inline_len)];
        h.write(&mut slot);
        if is_inline {
            slot[SendWqeHeader::LEN..].copy_from_slice(&inline);
        } else {
            for (i, s) in sges.iter().enumerate() {
                s.write(&mut slot[SendWqeHeader::LEN + i * Sge::LEN..]);
            }
        }
        let w = SendWqe::decode(&slot, MAX_SGE, h.inline_len).expect("a valid WQE decodes");
        prop_assert_eq!(w.header, h);
        if is_inline {
            prop_assert_eq!(w.inline(&slot), &inline[..]);
        } else {
            prop_assert_eq!(w.sges(&slot).collect::<Vec<_>>(), sges);
        }
    }

    #[test]
    fn recv_wqes_round_trip(
        wr_id in any::<u64>(),
        sges in vec(any::<(u64, u32, u32)>(), 0..=MAX_SGE as usize),
    ) {
        let sges: Vec<Sge> = sges.into_iter().map(|(addr, length, lkey)| Sge { addr, length, lkey }).collect();
        let mut slot = vec![0u8; RecvWqe::slot_bytes(sges.len() as u32)];
        RecvWqe::write_header(wr_id, sges.len() as u32, &mut slot);
        for (i, s) in sges.iter().enumerate() {
            s.write(&mut slot[RECV_WQE_HEADER + i * Sge::LEN..]);
        }
        let w = RecvWqe::decode(&slot, MAX_SGE).expect("a valid WQE decodes");
        prop_assert_eq!((w.wr_id, w.num_sge), (wr_id, sges.len() as u32));
        prop_assert_eq!(w.sges(&slot).collect::<Vec<_>>(), sges);
    }

    #[test]
    fn cqes_round_trip(b in vec(any::<u8>(), Cqe::LEN)) {
        // Every field of a CQE is a plain integer: arbitrary bytes are arbitrary values.
        let c = Cqe::decode(&b);
        prop_assert_eq!(Cqe::decode(&c.encode()), c);
    }

    #[test]
    fn peer_messages_round_trip(m in peer_msg()) {
        let line = m.encode_line();
        prop_assert_eq!(PeerMsg::decode_line(&line).expect("decodes"), m);
    }

    #[test]
    fn control_requests_round_trip(r in control_request()) {
        let mut line = Vec::new();
        freeflow_proto::control::write_line(&mut line, &r).expect("writes");
        let mut reader = std::io::BufReader::new(&line[..]);
        let back: Option<ControlRequest> =
            freeflow_proto::control::read_line(&mut reader).expect("reads");
        prop_assert_eq!(back, Some(r));
    }
}
