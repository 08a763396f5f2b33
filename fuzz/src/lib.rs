//! The oracles of the fuzz targets: one function per family of decoders of bytes that a
//! container or a peer router controls. Each decodes its input with every decoder of the
//! family and checks that nothing panics and that what decodes re-encodes to the same bytes,
//! or, for layouts with reserved bytes or lossy text, to a canonical form that decodes equal.
//!
//! Two drivers run these same functions: the libFuzzer targets of this crate (nightly,
//! `cargo fuzz run <target>`) and, on stable, `proto/tests/decode_props.rs`, which includes
//! this file as a module, feeds it proptest's inputs and replays the committed corpus
//! (`fuzz/corpus/<target>/`), so a crashing input added there stays a regression test.
//!
//! Only `freeflow_proto` and `serde_json` are used, so that the file compiles in both crates.

use freeflow_proto::attach::{Hello, Welcome, HELLO_LEN};
use freeflow_proto::codec::Body;
use freeflow_proto::control::{self, ControlRequest, ControlResponse};
use freeflow_proto::msg::{self, MsgHeader, HEADER_LEN};
use freeflow_proto::peer::PeerMsg;
use freeflow_proto::sockmsg::{FromRouter, SockNotice, SockReply, SockRequest};
use freeflow_proto::verbs::device::{self, DeviceAnswer, DeviceQuery};
use freeflow_proto::verbs::qp::{
    check_transition, CreateQp, ModifyQp, QpAttr, QpCap, QpCreated, QpQueried, QpState,
};
use freeflow_proto::verbs::remote::{
    self as frames, nak, split_frame, FrameHeader, FrameKind, MAX_PAYLOAD,
};
use freeflow_proto::verbs::srq::{CreateSrq, ModifySrq, SrqAttr, SrqCreated};
use freeflow_proto::verbs::work::{
    send_flags, Cqe, RecvWqe, SendWqe, SendWqeHeader, Sge, RECV_WQE_HEADER,
};
use freeflow_proto::verbs::{
    check_mr_access, CqCreated, CreateCq, DeallocPd, DeregMr, MemoryFileMsg, MrCreated,
    ObjectHandle, PdCreated, QueueFileMsg, RegMr, ResizeCq, TestDigest, TestRead, TestWrite,
    VerbsOp,
};
use std::fmt::Debug;

/// The oracle of a fuzz target.
pub type Oracle = fn(&[u8]);

/// The fuzz targets, by name (each is also a directory of `fuzz/corpus/`), with their oracle.
pub const TARGETS: &[(&str, Oracle)] = &[
    ("hello", hello),
    ("sockmsg", sockmsg),
    ("msg_header", msg_header),
    ("verbs_bodies", verbs_bodies),
    ("wqe", wqe),
    ("peer_msg", peer_msg),
    ("control_request", control_request),
    ("verbs_frames", verbs_frames),
];

/// The attach handshake: the shim's [`Hello`] (read by the router) and the router's
/// [`Welcome`] (read by the shim).
pub fn hello(data: &[u8]) {
    if let Ok((h, kind)) = Hello::decode(data) {
        let canonical = h.encode();
        assert_eq!(Hello::decode(&canonical), Ok((h, kind)));
        // Only the reserved tail may differ from the input.
        assert_eq!(canonical[..8], data[..8]);
        assert_eq!(data.len(), HELLO_LEN);
    }
    if let Ok(w) = Welcome::decode(data) {
        let canonical = w.encode();
        let again = Welcome::decode(&canonical).expect("a welcome re-encodes decodably");
        // Text that was not UTF-8 decodes lossily, and may then no longer fit.
        let text_is_utf8 = std::str::from_utf8(&data[24.min(data.len())..]).is_ok();
        if text_is_utf8 {
            assert_eq!(again, w);
        }
    }
}

/// TCP-mode setup messages on the attach connection: requests (read by the router), replies
/// and notices (read by the shim).
pub fn sockmsg(data: &[u8]) {
    if let Ok(r) = SockRequest::decode(data) {
        canonical_fixed(data, &r.encode(), SockRequest::decode, &r);
    }
    if let Ok(r) = SockReply::decode(data) {
        canonical_fixed(data, &r.encode(), SockReply::decode, &r);
    }
    if let Ok(n) = SockNotice::decode(data) {
        canonical_fixed(data, &n.encode(), SockNotice::decode, &n);
        let _ = n.meaning();
    }
    match FromRouter::decode(data) {
        Ok(FromRouter::Reply(r)) => assert_eq!(SockReply::decode(data), Ok(r)),
        Ok(FromRouter::Notice(n)) => assert_eq!(SockNotice::decode(data), Ok(n)),
        Err(_) => {}
    }
}

/// Checks that `canonical`, the re-encoding of `value` decoded from `data`, has the input's
/// length and magic, decodes to `value`, and is its own canonical form.
fn canonical_fixed<T: PartialEq + Debug, E: Debug>(
    data: &[u8],
    canonical: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, E>,
    value: &T,
) {
    assert_eq!(canonical.len(), data.len());
    assert_eq!(canonical[..4], data[..4], "magic");
    assert_eq!(&decode(canonical).expect("canonical form decodes"), value);
}

/// A ring slot: the message header and the bounds of its body (read by the router from every
/// request slot).
pub fn msg_header(data: &[u8]) {
    if data.len() < HEADER_LEN {
        // The ring's slots are at least 64 bytes: a header is never read from fewer than 16.
        return;
    }
    let h = MsgHeader::decode(data);
    let mut again = [0u8; HEADER_LEN];
    h.encode(&mut again);
    assert_eq!(again[..], data[..HEADER_LEN]);
    match h.body(data) {
        Some(body) => {
            assert_eq!(body.len(), h.len as usize);
            assert!(HEADER_LEN + body.len() <= data.len());
        }
        None => assert!(HEADER_LEN as u64 + u64::from(h.len) > data.len() as u64),
    }
    let _ = msg::op::MsgOp::try_from(h.opcode);
    let _ = msg::status::MsgStatus::try_from(h.status);
    if freeflow_proto::verbs::op::is_verbs(h.opcode) {
        let _ = VerbsOp::try_from(h.opcode);
    }
}

/// The body types of verbs requests and replies, and the messages that travel with a file,
/// in the order [`verbs_bodies`] selects them by its input's first byte.
const BODY_KINDS: u8 = 26;

/// Verbs bodies: the first byte picks the type, the rest is the body.
pub fn verbs_bodies(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % BODY_KINDS {
        0 => {
            exact::<PdCreated>(body);
        }
        1 => {
            exact::<DeallocPd>(body);
        }
        2 => {
            if let Some(r) = exact::<RegMr>(body) {
                let _ = check_mr_access(r.access);
            }
        }
        3 => {
            exact::<MrCreated>(body);
        }
        4 => {
            exact::<DeregMr>(body);
        }
        5 => {
            exact::<ObjectHandle>(body);
        }
        6 => {
            exact::<CreateCq>(body);
        }
        7 => {
            exact::<ResizeCq>(body);
        }
        8 => {
            exact::<CqCreated>(body);
        }
        9 => {
            exact::<QpCap>(body);
        }
        10 => {
            exact::<CreateQp>(body);
        }
        11 => {
            exact::<QpCreated>(body);
        }
        12 => {
            if let Some(m) = canonical::<ModifyQp>(body) {
                transitions(m.attr_mask, &m.attr);
            }
        }
        13 => {
            if let Some(a) = canonical::<QpAttr>(body) {
                transitions(u32::MAX, &a);
            }
        }
        14 => {
            canonical::<QpQueried>(body);
        }
        15 => {
            exact::<CreateSrq>(body);
        }
        16 => {
            exact::<SrqAttr>(body);
        }
        17 => {
            exact::<SrqCreated>(body);
        }
        18 => {
            exact::<ModifySrq>(body);
        }
        19 => {
            exact::<TestRead>(body);
        }
        20 => {
            exact::<TestDigest>(body);
        }
        21 => test_write(body),
        22 => {
            if let Ok(m) = QueueFileMsg::decode(body) {
                canonical_fixed(body, &m.encode(), QueueFileMsg::decode, &m);
            }
        }
        23 => {
            if let Ok(m) = MemoryFileMsg::decode(body) {
                // No reserved byte goes unchecked: the encoding is exact.
                assert_eq!(m.encode()[..], body[..]);
            }
        }
        24 => {
            exact::<Sge>(body);
        }
        _ => {
            exact::<SendWqeHeader>(body);
        }
    }
}

/// A body without reserved bytes: decodes only at its length, and re-encodes to its input.
fn exact<T: Body + PartialEq + Debug>(body: &[u8]) -> Option<T> {
    let v = T::decode(body).ok()?;
    assert_eq!(body.len(), T::LEN);
    assert_eq!(v.to_vec(), body, "{v:?} re-encodes to its bytes");
    Some(v)
}

/// A body with reserved bytes: its re-encoding decodes equal and is its own re-encoding.
fn canonical<T: Body + PartialEq + Debug>(body: &[u8]) -> Option<T> {
    let v = T::decode(body).ok()?;
    let again = v.to_vec();
    assert_eq!(again.len(), body.len());
    assert_eq!(T::decode(&again).as_ref(), Ok(&v));
    assert_eq!(T::decode(&again).expect("decodes").to_vec(), again);
    Some(v)
}

/// The QP state machine on attributes a container chose, from every state.
fn transitions(attr_mask: u32, attr: &QpAttr) {
    for s in 0..=6u32 {
        let state = QpState::from_u32(s).expect("a state");
        let _ = check_transition(state, attr_mask, attr);
    }
}

fn test_write(body: &[u8]) {
    if let Ok(w) = TestWrite::decode(body) {
        let mut out = [0u8; 128];
        let n = w.encode(&mut out).expect("a decoded test write re-encodes");
        assert_eq!(out[..n], body[..]);
    }
}

/// Work requests in a QP's or SRQ's rings (read by the router) and completions (read by the
/// shim). The first four bytes are the QP's capacities (`max_sge`, `max_inline`), the rest is
/// the slot.
pub fn wqe(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let max_sge = u32::from(data[0]);
    let max_inline = u32::from(u16::from_le_bytes([data[1], data[2]]));
    let _flags = data[3];
    let slot = &data[4..];
    if let Ok(w) = SendWqe::decode(slot, max_sge, max_inline) {
        let mut again = [0u8; SendWqeHeader::LEN];
        w.header.write(&mut again);
        assert_eq!(again[..], slot[..SendWqeHeader::LEN]);
        let sges = w.sges(slot).count();
        let inline = w.inline(slot);
        if w.header.has(send_flags::INLINE) {
            assert_eq!(inline.len(), w.header.inline_len as usize);
            assert!(inline.len() <= max_inline as usize);
        } else {
            assert_eq!(sges, usize::from(w.header.num_sge));
            assert!(sges <= max_sge as usize);
        }
    }
    if let Ok(w) = RecvWqe::decode(slot, max_sge) {
        assert!(w.num_sge <= max_sge);
        assert!(RecvWqe::slot_bytes(w.num_sge) <= slot.len());
        assert_eq!(w.sges(slot).count(), w.num_sge as usize);
        // The canonical form: the header rewritten (its reserved word zero), the entries kept.
        let mut again = slot.to_vec();
        RecvWqe::write_header(w.wr_id, w.num_sge, &mut again);
        assert_eq!(again[..12], slot[..12]);
        assert_eq!(RecvWqe::decode(&again, max_sge), Ok(w));
        assert!(w.sges(&again).eq(w.sges(slot)));
    }
    if slot.len() >= Cqe::LEN {
        let c = Cqe::decode(slot);
        let again = c.encode();
        // Bytes 46 and 47 are `struct ibv_wc`'s padding.
        assert_eq!(again[..46], slot[..46]);
        assert_eq!(Cqe::decode(&again), c);
    }
}

/// A line from a peer router.
pub fn peer_msg(data: &[u8]) {
    if let Ok(m) = PeerMsg::decode_line(data) {
        let line = m.encode_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(
            PeerMsg::decode_line(&line).expect("re-encoded line decodes"),
            m
        );
    }
}

/// A line on the router's control socket: requests (read by the router), responses (read by
/// the control process), through the line reader both use.
pub fn control_request(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<ControlRequest>(data) {
        let line = serde_json::to_vec(&r).expect("requests serialise");
        let again: ControlRequest = serde_json::from_slice(&line).expect("re-encoded decodes");
        assert_eq!(again, r);
    }
    if let Ok(r) = serde_json::from_slice::<ControlResponse>(data) {
        let line = serde_json::to_vec(&r).expect("responses serialise");
        let again: ControlResponse = serde_json::from_slice(&line).expect("re-encoded decodes");
        assert_eq!(again, r);
    }
    let mut reader = std::io::BufReader::new(data);
    while let Ok(Some(r)) = control::read_line::<ControlRequest>(&mut reader) {
        let mut out = Vec::new();
        control::write_line(&mut out, &r).expect("writes to a vector");
        let mut back = std::io::BufReader::new(&out[..]);
        let again = control::read_line::<ControlRequest>(&mut back).expect("reads back");
        assert_eq!(again, Some(r));
    }
}

/// What routers send each other for RDMA between hosts and between shards (read by a router
/// from every peer router's connection): the first 16 bytes as a [`frames::Hello`], the first
/// 72 as a [`FrameHeader`], and the whole input as a connection's bytes: the hello (or the
/// [`frames::HelloAnswer`], the same magic and version) if it decodes, then frames split off one after another ([`split_frame`], the receiver's own
/// framing) until one is incomplete or does not decode. Also the device path's exchange between
/// routers (`verbs::device`): the first 32 bytes as a [`DeviceQuery`], the first 64 as a
/// [`DeviceAnswer`].
pub fn verbs_frames(data: &[u8]) {
    device_exchange(data);
    let hello = data
        .first_chunk::<{ frames::HELLO_LEN }>()
        .and_then(|b| frames::Hello::decode(b).ok().map(|h| (b, h)));
    if let Some((b, h)) = hello {
        let again = h.encode();
        assert_eq!(frames::Hello::decode(&again), Ok(h));
        // Bytes 6..8 are reserved: the rest re-encodes exactly.
        assert_eq!((&again[..6], &again[8..]), (&b[..6], &b[8..]));
    }
    if let Some(b) = data.first_chunk::<{ frames::ANSWER_LEN }>() {
        if let Ok(a) = frames::HelloAnswer::decode(b) {
            assert!(a.shard < a.shards);
            let again = a.encode();
            assert_eq!(frames::HelloAnswer::decode(&again), Ok(a));
            assert_eq!((&again[..6], &again[8..12]), (&b[..6], &b[8..12]));
        }
    }
    if let Some(b) = data.first_chunk::<{ frames::HEADER_LEN }>() {
        frame_header(b);
    }
    let mut rest = if hello.is_some() {
        &data[frames::HELLO_LEN..]
    } else {
        data
    };
    // Each frame split off takes at least a header: at most len / 72 + 1 rounds.
    for _ in 0..=data.len() / frames::HEADER_LEN {
        let header = rest.first_chunk::<{ frames::HEADER_LEN }>();
        match split_frame(rest) {
            Ok(Some((h, payload))) => {
                assert_eq!(header.map(FrameHeader::decode), Some(Ok(h)));
                assert_eq!(payload.start, frames::HEADER_LEN);
                assert_eq!(payload.len(), h.len as usize);
                rest = &rest[payload.end..];
            }
            Ok(None) => {
                // Incomplete: no header yet, or a header whose payload has not all come.
                let short = header.map(FrameHeader::decode);
                assert!(
                    short.is_none()
                        || short.is_some_and(|h| h
                            .is_ok_and(|h| { frames::HEADER_LEN + h.len as usize > rest.len() })),
                    "split_frame waits for a complete frame"
                );
                return;
            }
            Err(e) => {
                assert_eq!(header.map(FrameHeader::decode), Some(Err(e)));
                return;
            }
        }
    }
    panic!("split_frame took a frame without consuming a header");
}

/// A device query or answer re-encodes to its bytes but for the reserved ones (query 24..32,
/// answer 60..64).
fn device_exchange(data: &[u8]) {
    if let Some(b) = data.first_chunk::<{ device::QUERY_LEN }>() {
        if let Ok(q) = DeviceQuery::decode(b) {
            let again = q.encode();
            assert_eq!(DeviceQuery::decode(&again), Ok(q));
            assert_eq!(&again[..24], &b[..24]);
        }
    }
    if let Some(b) = data.first_chunk::<{ device::ANSWER_LEN }>() {
        if let Ok(a) = DeviceAnswer::decode(b) {
            let again = a.encode();
            assert_eq!(DeviceAnswer::decode(&again), Ok(a));
            assert_eq!(&again[..60], &b[..60]);
        }
    }
}

/// A frame header: decodes only in a shape its kind allows, and re-encodes to its bytes but
/// for the reserved ones (3, 68..72, and the acknowledgement's 64..68 when none rides).
fn frame_header(b: &[u8; frames::HEADER_LEN]) {
    let Ok(h) = FrameHeader::decode(b) else {
        return;
    };
    let again = h.encode();
    assert_eq!(FrameHeader::decode(&again), Ok(h));
    let mut canonical = *b;
    canonical[3] = 0;
    canonical[68..72].fill(0);
    if h.ack.is_none() {
        canonical[64..68].fill(0);
    }
    assert_eq!(again, canonical);
    match h.kind {
        FrameKind::Send
        | FrameKind::SendWithImm
        | FrameKind::Write
        | FrameKind::WriteWithImm
        | FrameKind::ReadData
        | FrameKind::Datagram => assert!(h.len <= MAX_PAYLOAD),
        FrameKind::AtomicData => assert_eq!(h.len, 8),
        FrameKind::Read
        | FrameKind::CompareSwap
        | FrameKind::FetchAdd
        | FrameKind::Ack
        | FrameKind::Nak => assert_eq!(h.len, 0),
    }
    if h.ack.is_some() {
        assert!(h.kind.is_request() && h.kind != FrameKind::Datagram);
    }
}

/// Valid encodings of every message of `target`'s family, made by the encoders: the seed
/// corpus (`fuzz/corpus/<target>/seed-*`, written by the ignored test `write_seed_corpus` of
/// `proto/tests/decode_props.rs`) and the inputs proptest mutates.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "hello" => hello_seeds(),
        "sockmsg" => sockmsg_seeds(),
        "msg_header" => msg_header_seeds(),
        "verbs_bodies" => verbs_body_seeds(),
        "wqe" => wqe_seeds(),
        "peer_msg" => peer_msg_seeds(),
        "control_request" => control_seeds(),
        "verbs_frames" => verbs_frame_seeds(),
        _ => panic!("no fuzz target {target}"),
    }
}

fn hello_seeds() -> Vec<Vec<u8>> {
    use freeflow_proto::attach::{Refusal, ShimKind};
    let mut out: Vec<Vec<u8>> = [ShimKind::Socket, ShimKind::Verbs, ShimKind::Probe]
        .into_iter()
        .map(|k| Hello::new(k).encode().to_vec())
        .collect();
    out.push(
        Welcome::Accepted {
            shard: 1,
            attachment_id: 7,
            ip: [10, 32, 0, 2].into(),
            container: "web-1".into(),
            tenant: "blue".into(),
        }
        .encode(),
    );
    out.push(
        Welcome::Refused {
            reason: Refusal::NotRegistered,
            message: "not registered".into(),
        }
        .encode(),
    );
    out
}

fn sockmsg_seeds() -> Vec<Vec<u8>> {
    use freeflow_proto::sockmsg::{SockOp, SockStatus, FLAG_INET6, FLAG_REUSEPORT};
    let ip = [10, 32, 0, 5].into();
    let request = |op, flags| SockRequest {
        op,
        flags,
        seq: 9,
        ip,
        port: 80,
        backlog: 128,
    };
    vec![
        request(SockOp::Connect, FLAG_INET6).encode().to_vec(),
        request(SockOp::Listen, FLAG_REUSEPORT).encode().to_vec(),
        request(SockOp::Resolve, 0).encode().to_vec(),
        request(SockOp::Relisten, 0).encode().to_vec(),
        SockReply {
            status: SockStatus::Ok,
            seq: 9,
            errno: 0,
            ip,
            port: 40000,
        }
        .encode()
        .to_vec(),
        SockReply::error(3, 111).encode().to_vec(),
        SockNotice {
            host_ip: [192, 168, 1, 2].into(),
            host_port: 41000,
            ip,
            port: 41000,
            sent_ms: 123,
        }
        .encode()
        .to_vec(),
        SockNotice::forget_all().encode().to_vec(),
        request(SockOp::Accepts, 0).encode().to_vec(),
    ]
}

fn msg_header_seeds() -> Vec<Vec<u8>> {
    let slot = |opcode: u16, status: u16, body: &[u8], slot_len: usize| {
        let mut b = vec![0u8; slot_len.max(HEADER_LEN + body.len())];
        MsgHeader {
            opcode,
            status,
            len: body.len() as u32,
            cookie: 0x1234_5678_9abc_def0,
        }
        .encode(&mut b);
        b[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(body);
        b
    };
    vec![
        slot(msg::op::PING, 0, b"ping", 64),
        slot(msg::op::FLUSH, 0, &[], 64),
        slot(freeflow_proto::verbs::op::REG_MR, 0, &[1; RegMr::LEN], 256),
        slot(msg::op::PING | msg::REPLY, 2, &[], 16),
    ]
}

fn verbs_body_seeds() -> Vec<Vec<u8>> {
    use freeflow_proto::verbs::{access, QueueFileKind};
    let with_kind = |kind: u8, body: Vec<u8>| [vec![kind], body].concat();
    let attr = QpAttr {
        qp_state: QpState::Rtr as u8,
        path_mtu: 3,
        dest_qp_num: 0x11,
        min_rnr_timer: 1,
        max_dest_rd_atomic: 1,
        is_global: 1,
        ah_port_num: 1,
        dgid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 32, 0, 3],
        ..QpAttr::default()
    };
    let cap = QpCap {
        max_send_wr: 64,
        max_recv_wr: 64,
        max_send_sge: 2,
        max_recv_sge: 2,
        max_inline_data: 64,
    };
    vec![
        with_kind(1, DeallocPd { pd: 1 }.to_vec()),
        with_kind(
            2,
            RegMr {
                pd: 1,
                access: access::LOCAL_WRITE | access::REMOTE_WRITE,
                addr: 0x7f10_0000_0000,
                length: 16384,
                iova: 0x7f10_0000_0000,
                file: freeflow_proto::verbs::OWN_MEMORY_FILE,
                file_offset: 0,
            }
            .to_vec(),
        ),
        with_kind(
            6,
            CreateCq {
                cqe: 64,
                channel: 0,
                comp_vector: 0,
                flags: 0,
            }
            .to_vec(),
        ),
        with_kind(
            10,
            CreateQp {
                pd: 1,
                send_cq: 1,
                recv_cq: 1,
                srq: 0,
                qp_type: freeflow_proto::verbs::qp::QPT_RC,
                sq_sig_all: 0,
                cap,
            }
            .to_vec(),
        ),
        with_kind(
            12,
            ModifyQp {
                qp: 2,
                attr_mask: 0x3_9181,
                attr,
            }
            .to_vec(),
        ),
        with_kind(
            15,
            CreateSrq {
                pd: 1,
                max_wr: 32,
                max_sge: 2,
                srq_limit: 0,
            }
            .to_vec(),
        ),
        with_kind(
            18,
            ModifySrq {
                srq: 3,
                attr_mask: 2,
                max_wr: 0,
                srq_limit: 4,
            }
            .to_vec(),
        ),
        with_kind(
            19,
            TestRead {
                pd: 1,
                lkey: 5,
                addr: 0x1000,
                length: 64,
            }
            .to_vec(),
        ),
        with_kind(
            22,
            QueueFileMsg {
                kind: QueueFileKind::Qp,
                handle: 2,
            }
            .encode()
            .to_vec(),
        ),
        with_kind(
            23,
            MemoryFileMsg {
                size: 1 << 47,
                file: 0,
            }
            .encode()
            .to_vec(),
        ),
    ]
}

fn wqe_seeds() -> Vec<Vec<u8>> {
    use freeflow_proto::verbs::work::wr_opcode;
    let caps = [2u8, 64, 0, 0];
    let sge = Sge {
        addr: 0x7f10_0000_0100,
        length: 64,
        lkey: 5,
    };
    let send = |opcode: u8, flags: u32, sges: &[Sge], inline: &[u8]| {
        let mut slot = vec![0u8; 128];
        SendWqeHeader {
            wr_id: 77,
            opcode,
            flags: flags as u8,
            num_sge: sges.len() as u16,
            imm_data: 0x0102_0304,
            remote_addr: 0x7f10_0000_2000,
            rkey: 6,
            inline_len: inline.len() as u32,
            compare_add: 1,
            swap: 2,
        }
        .write(&mut slot);
        for (i, s) in sges.iter().enumerate() {
            s.write(&mut slot[SendWqeHeader::LEN + i * Sge::LEN..]);
        }
        slot[SendWqeHeader::LEN..SendWqeHeader::LEN + inline.len()].copy_from_slice(inline);
        [&caps[..], &slot].concat()
    };
    let mut recv = vec![0u8; 64];
    RecvWqe::write_header(5, 2, &mut recv);
    sge.write(&mut recv[RECV_WQE_HEADER..]);
    sge.write(&mut recv[RECV_WQE_HEADER + Sge::LEN..]);
    vec![
        send(wr_opcode::SEND, send_flags::SIGNALED, &[sge, sge], &[]),
        send(wr_opcode::RDMA_WRITE, 0, &[sge], &[]),
        send(wr_opcode::SEND_WITH_IMM, send_flags::INLINE, &[], b"hello"),
        send(
            wr_opcode::ATOMIC_CMP_AND_SWP,
            send_flags::FENCE,
            &[sge],
            &[],
        ),
        [&caps[..], &recv].concat(),
    ]
}

fn peer_msg_seeds() -> Vec<Vec<u8>> {
    use freeflow_proto::peer::ListenerEntry;
    let host = [192, 0, 2, 1].into();
    let ip = [10, 32, 0, 2].into();
    [
        PeerMsg::Listeners {
            host,
            entries: vec![ListenerEntry {
                ip,
                port: 80,
                host_port: 40000,
            }],
        },
        PeerMsg::Conn {
            host,
            host_port: 40001,
            ip,
            port: 40001,
            to_port: Some(5001),
        },
        PeerMsg::Claim {
            host,
            ip,
            to_port: 5001,
            ports: vec![1, 2],
            fresh: true,
        },
        PeerMsg::Release {
            host,
            ip,
            to_port: 5001,
            ports: vec![3],
        },
    ]
    .iter()
    .map(PeerMsg::encode_line)
    .collect()
}

fn control_seeds() -> Vec<Vec<u8>> {
    use freeflow_proto::control::{
        ContainerEntry, NetworkDelta, NetworkView, OverlayEntry, PeerHost, TableDelta,
    };
    use freeflow_proto::identity::NetnsId;
    let line = |r: &ControlRequest| {
        let mut out = Vec::new();
        control::write_line(&mut out, r).expect("writes to a vector");
        out
    };
    let set = ControlRequest::SetContainers {
        containers: vec![ContainerEntry {
            name: "web-1".into(),
            tenant: "blue".into(),
            ip: [10, 32, 0, 2].into(),
            netns: NetnsId { dev: 4, ino: 4026 },
        }],
        network: Some(NetworkView {
            host_ip: [192, 0, 2, 1].into(),
            peer_port: 7000,
            hosts: vec![PeerHost {
                host_ip: [192, 0, 2, 2].into(),
                peer_port: 7000,
            }],
            overlay: vec![OverlayEntry {
                ip: [10, 32, 0, 2].into(),
                tenant: "blue".into(),
                host_ip: [192, 0, 2, 1].into(),
            }],
        }),
        generation: Some(7),
    };
    let update = ControlRequest::UpdateContainers(TableDelta {
        base: 7,
        generation: 8,
        upserted: vec![],
        removed: vec![NetnsId { dev: 4, ino: 4026 }],
        network: Some(NetworkDelta {
            host_ip: [192, 0, 2, 1].into(),
            peer_port: 7000,
            hosts: vec![],
            overlay_added: vec![],
            overlay_removed: vec![OverlayEntry {
                ip: [10, 32, 0, 2].into(),
                tenant: "blue".into(),
                host_ip: [192, 0, 2, 1].into(),
            }],
        }),
    });
    vec![
        line(&set),
        line(&update),
        line(&ControlRequest::Status),
        [
            line(&ControlRequest::Shutdown),
            line(&ControlRequest::Status),
        ]
        .concat(),
        b"{\"result\":\"error\",\"message\":\"no\"}\n".to_vec(),
    ]
}

/// A requester's connection (its hello, then requests of every kind, some carrying an
/// acknowledgement) and a responder's (the answer to the hello, then responses), whole, and
/// single headers.
fn verbs_frame_seeds() -> Vec<Vec<u8>> {
    let frame = |kind: FrameKind, payload: &[u8], edit: &dyn Fn(&mut FrameHeader)| {
        let mut h = FrameHeader::new(kind);
        h.len = payload.len() as u32;
        h.src_ip = [10, 32, 0, 3].into();
        h.dst_ip = [10, 32, 0, 2].into();
        h.src_qpn = 0x11_2233;
        h.dst_qpn = 0x44_5566;
        h.seq = 0xffff_fffe;
        edit(&mut h);
        [&h.encode()[..], payload].concat()
    };
    let none = |_: &mut FrameHeader| {};
    let hello = frames::Hello {
        host: [192, 168, 1, 1].into(),
        dst: [10, 32, 0, 2].into(),
    }
    .encode();
    let requests = [
        hello.to_vec(),
        frame(FrameKind::Send, b"sixteen bytes!!!", &|h| h.ack = Some(9)),
        frame(FrameKind::SendWithImm, b"imm", &|h| h.imm = 0x0102_0304),
        frame(FrameKind::Write, &[7; 100], &|h| {
            h.rkey = 0xdead_beef;
            h.remote_addr = 0x7f10_0000_2000;
        }),
        frame(FrameKind::WriteWithImm, b"", &none),
        frame(FrameKind::Read, b"", &|h| h.arg = 4096),
        frame(FrameKind::CompareSwap, b"", &|h| {
            h.compare_add = 40;
            h.swap = 50;
            h.ack = Some(0);
        }),
        frame(FrameKind::FetchAdd, b"", &|h| h.compare_add = 5),
        frame(FrameKind::Datagram, b"datagram", &|h| {
            h.code = 1;
            h.arg = 0x03_4005;
        }),
    ]
    .concat();
    let responses = [
        frames::HelloAnswer {
            shard: 1,
            shards: 2,
        }
        .encode()
        .to_vec(),
        frame(FrameKind::Ack, b"", &none),
        frame(FrameKind::ReadData, &[1; 17], &none),
        frame(FrameKind::AtomicData, &40u64.to_ne_bytes(), &none),
        frame(FrameKind::Nak, b"", &|h| {
            h.code = nak::RNR;
            h.arg = 14;
        }),
        frame(FrameKind::Nak, b"", &|h| h.code = nak::REM_ACCESS),
    ]
    .concat();
    let query = DeviceQuery {
        kind: device::QueryKind::Key,
        src_ip: [10, 64, 0, 3].into(),
        dst_ip: [10, 64, 0, 2].into(),
        dst_qpn: 0x11_2233,
        rkey: 0xdead_beef,
    };
    let mut gid = [0u8; 16];
    gid[10..].copy_from_slice(&[0xff, 0xff, 10, 32, 0, 11]);
    let answer = DeviceAnswer {
        real_qpn: 0x42,
        real_rkey: 0x0102_0304,
        gid,
        iova: 0x7f00_0000_1000,
        length: 65536,
        real_addr: 0x5555_0000_2000,
        access: 7,
        ..DeviceAnswer::empty(device::DeviceStatus::Found)
    };
    vec![
        requests,
        responses,
        hello.to_vec(),
        frame(FrameKind::Write, &[0; 3], &|h| h.ack = Some(u32::MAX)),
        query.encode().to_vec(),
        answer.encode().to_vec(),
        DeviceAnswer::empty(device::DeviceStatus::NotFound)
            .encode()
            .to_vec(),
    ]
}
