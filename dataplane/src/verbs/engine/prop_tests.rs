//! The engine fed arbitrary sequences by one context (the "attacker"): verbs requests with
//! random opcodes and bodies built from handles, keys, QP numbers and addresses it has seen (or
//! garbage), arbitrary WQEs pushed into the rings of its QPs and SRQs, corrupt ring indices,
//! polls, parks and a reattach. Two other contexts (the "victims", a connected pair) are set up
//! first. Properties: nothing panics; no victim is ever reported broken; the victims' memory,
//! CQs and QP states are untouched; and afterwards, with the attacker gone too, the victims'
//! SEND and RDMA WRITE still work.

use super::test_support::{
    call, gid, ok, open_context, rc_pingpong_steps, ALL, BACKED, INIT_MASK, RTR_MASK, RTS_MASK,
};
use crate::verbs::notify::test_seqpacket_pair;
use crate::verbs::*;
use freeflow_proto::fdpass;
use freeflow_proto::region::SharedRegion;
use freeflow_proto::verbs::qp::{mask, CreateQp, ModifyQp, QpAttr, QpCap, QpQueried, QpState};
use freeflow_proto::verbs::srq::{CreateSrq, ModifySrq};
use freeflow_proto::verbs::work::{
    send_flags, wr_opcode, Cqe, RecvWqe, SendWqeHeader, Sge, RECV_WQE_HEADER,
};
use freeflow_proto::verbs::{
    op, wc_status, CqCreated, CreateCq, ObjectHandle, QueueFileKind, QueueFileMsg, ResizeCq,
    MAX_TEST_WRITE, RECV_RING, SEND_RING,
};
use freeflow_proto::{Consumer, Producer};
use proptest::collection::vec;
use proptest::prelude::*;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

const BASE: u64 = 0x7f20_0000_0000;
const VICTIM_IPS: [[u8; 4]; 2] = [[10, 40, 0, 2], [10, 40, 0, 3]];
const ATTACKER_IP: [u8; 4] = [10, 40, 0, 9];

/// The opcodes the attacker picks from (any other number is an arbitrary u16).
const OPS: [u16; 19] = [
    op::ALLOC_PD,
    op::DEALLOC_PD,
    op::REG_MR,
    op::DEREG_MR,
    op::CREATE_COMP_CHANNEL,
    op::DESTROY_COMP_CHANNEL,
    op::CREATE_CQ,
    op::DESTROY_CQ,
    op::CREATE_QP,
    op::MODIFY_QP,
    op::QUERY_QP,
    op::DESTROY_QP,
    op::RESIZE_CQ,
    op::CREATE_SRQ,
    op::MODIFY_SRQ,
    op::QUERY_SRQ,
    op::DESTROY_SRQ,
    op::TEST_READ,
    op::TEST_WRITE,
];

/// The queue files the engine passed on the attach connection since the last call.
fn queue_files(shim: &OwnedFd) -> Vec<(QueueFileMsg, SharedRegion)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 32];
    while let Ok(got) = fdpass::recv_with_fds(shim.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
        let Ok(msg) = QueueFileMsg::decode(&buf[..got.len]) else {
            break;
        };
        if msg.kind == QueueFileKind::Channel {
            continue;
        }
        let fd = got.fds.first().expect("a queue file comes with its fd");
        out.push((msg, SharedRegion::attach(fd.as_fd()).expect("region")));
    }
    out
}

/// One victim: a context with a PD, an MR over its backed pages, a CQ and a QP.
struct Victim {
    id: u32,
    conn: OwnedFd,
    _shim: OwnedFd,
    file: std::fs::File,
    mr: MrCreated,
    cq: Consumer,
    qp: u32,
    qpn: u32,
    sq: Producer,
    rq: Producer,
    _regions: Vec<SharedRegion>,
}

fn victim(engine: &mut Engine, id: u32, ip: [u8; 4]) -> Victim {
    let file = open_context(engine, id, ip, "blue", BASE, 0x5a);
    let (conn, shim) = test_seqpacket_pair();
    let pd = ok::<PdCreated>(engine, AttachmentId(id), &conn, op::ALLOC_PD, &[]).pd;
    let reg = RegMr {
        pd,
        access: ALL,
        addr: BASE,
        length: BACKED,
        iova: BASE,
        file: freeflow_proto::verbs::OWN_MEMORY_FILE,
        file_offset: 0,
    };
    let mr: MrCreated = ok(engine, AttachmentId(id), &conn, op::REG_MR, &reg.to_vec());
    let create_cq = CreateCq {
        cqe: 64,
        channel: 0,
        comp_vector: 0,
        flags: 0,
    };
    let cq: CqCreated = ok(
        engine,
        AttachmentId(id),
        &conn,
        op::CREATE_CQ,
        &create_cq.to_vec(),
    );
    let cap = QpCap {
        max_send_wr: 16,
        max_recv_wr: 16,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    };
    let create_qp = CreateQp {
        pd,
        send_cq: cq.cq,
        recv_cq: cq.cq,
        srq: 0,
        qp_type: freeflow_proto::verbs::qp::QPT_RC,
        sq_sig_all: 1,
        cap,
    };
    let qp: freeflow_proto::verbs::qp::QpCreated = ok(
        engine,
        AttachmentId(id),
        &conn,
        op::CREATE_QP,
        &create_qp.to_vec(),
    );
    let mut files = queue_files(&shim).into_iter();
    let (_, cq_region) = files.next().expect("the CQ's region");
    let (_, qp_region) = files.next().expect("the QP's region");
    Victim {
        id,
        conn,
        _shim: shim,
        file,
        mr,
        cq: Consumer::new(cq_region.ring(0).expect("ring")),
        qp: qp.qp,
        qpn: qp.qpn,
        sq: Producer::new(qp_region.ring(SEND_RING).expect("ring")),
        rq: Producer::new(qp_region.ring(RECV_RING).expect("ring")),
        _regions: vec![cq_region, qp_region],
    }
}

/// The rc_pingpong sequence: RESET → INIT → RTR (to `peer`) → RTS.
fn connect(engine: &mut Engine, v: &Victim, peer_ip: [u8; 4], peer_qpn: u32) {
    for (attr_mask, attr) in rc_pingpong_steps(peer_ip, peer_qpn, 7) {
        let body = ModifyQp {
            qp: v.qp,
            attr_mask,
            attr,
        };
        let (status, _) = call(
            engine,
            AttachmentId(v.id),
            &v.conn,
            op::MODIFY_QP,
            &body.to_vec(),
        );
        assert_eq!(status, status::OK);
    }
}

fn victims(engine: &mut Engine) -> [Victim; 2] {
    let a = victim(engine, 1, VICTIM_IPS[0]);
    let b = victim(engine, 2, VICTIM_IPS[1]);
    connect(engine, &a, VICTIM_IPS[1], b.qpn);
    connect(engine, &b, VICTIM_IPS[0], a.qpn);
    [a, b]
}

fn completions(cq: &mut Consumer) -> Vec<Cqe> {
    let mut out = Vec::new();
    let mut slot = [0u8; 64];
    while cq.pop(&mut slot).expect("the engine's CQ ring") {
        out.push(Cqe::decode(&slot));
    }
    cq.release();
    out
}

fn push_send(sq: &mut Producer, wr_id: u64, opcode: u8, sge: Sge, raddr: u64, rkey: u32) {
    let mut slot = vec![0u8; sq.slot_size()];
    SendWqeHeader {
        wr_id,
        opcode,
        num_sge: 1,
        remote_addr: raddr,
        rkey,
        ..SendWqeHeader::default()
    }
    .write(&mut slot);
    sge.write(&mut slot[SendWqeHeader::LEN..]);
    assert!(sq.push(&slot).expect("push"));
    let _ = sq.publish();
}

/// The victims' state as the attacker must leave it: nothing completed, both QPs in RTS,
/// their memory as it was filled.
fn assert_victims_untouched(engine: &mut Engine, victims: &mut [Victim; 2]) {
    for v in victims.iter_mut() {
        assert_eq!(completions(&mut v.cq), vec![], "victim {} CQ", v.id);
        let handle = ObjectHandle { handle: v.qp }.to_vec();
        let q: QpQueried = ok(engine, AttachmentId(v.id), &v.conn, op::QUERY_QP, &handle);
        assert_eq!(q.attr.qp_state, QpState::Rts as u8, "victim {} QP", v.id);
        let mut mem = vec![0u8; BACKED as usize];
        v.file.read_exact_at(&mut mem, BASE).expect("read");
        assert!(mem.iter().all(|&b| b == 0x5a), "victim {} memory", v.id);
    }
}

/// A SEND from the first victim to the second and an RDMA WRITE back still work.
fn assert_victims_work(engine: &mut Engine, [a, b]: &mut [Victim; 2], round: u64) {
    a.file.write_all_at(b"ping", BASE + 8).expect("write");
    let mut slot = vec![0u8; b.rq.slot_size()];
    RecvWqe::write_header(round, 1, &mut slot);
    let recv = Sge {
        addr: BASE + 64,
        length: 16,
        lkey: b.mr.lkey,
    };
    recv.write(&mut slot[RECV_WQE_HEADER..]);
    assert!(b.rq.push(&slot).expect("push"));
    let _ = b.rq.publish();
    let send = Sge {
        addr: BASE + 8,
        length: 4,
        lkey: a.mr.lkey,
    };
    push_send(&mut a.sq, round, wr_opcode::SEND, send, 0, 0);
    let write = Sge {
        addr: BASE + 64,
        length: 4,
        lkey: b.mr.lkey,
    };
    push_send(
        &mut b.sq,
        round + 1,
        wr_opcode::RDMA_WRITE,
        write,
        BASE + 128,
        a.mr.rkey,
    );
    engine.poll();
    engine.poll();
    let ca: Vec<_> = completions(&mut a.cq)
        .iter()
        .map(|c| (c.wr_id, c.status))
        .collect();
    let cb: Vec<_> = completions(&mut b.cq)
        .iter()
        .map(|c| (c.wr_id, c.status))
        .collect();
    assert_eq!(ca, vec![(round, wc_status::SUCCESS)]);
    assert_eq!(
        cb,
        vec![(round, wc_status::SUCCESS), (round + 1, wc_status::SUCCESS)]
    );
    let mut got = [0u8; 4];
    a.file.read_exact_at(&mut got, BASE + 128).expect("read");
    assert_eq!(&got, b"ping");
    // Put the victims' memory back as it was filled.
    for (v, at) in [(&*a, 8), (&*b, 64), (&*a, 128)] {
        v.file.write_all_at(&[0x5a; 4], BASE + at).expect("write");
    }
}

/// A number of a request or WQE, resolved when it is used.
#[derive(Debug, Clone, Copy)]
enum Num {
    /// What a correct shim would put in this field (the last PD, CQ, key... the attacker got).
    Good,
    /// One of the numbers the attacker has seen (its handles, keys and QP numbers, and the
    /// victims', which a neighbour could learn).
    Known(prop::sample::Index),
    Small(u8),
    /// A boundary value of the device's limits and of the integer types.
    Edge(u8),
    Raw(u32),
}

const EDGES: [u32; 12] = [
    0,
    1,
    u32::MAX,
    u32::MAX - 1,
    1 << 31,
    limits::MAX_QP_WR,
    limits::MAX_QP_WR + 1,
    limits::MAX_CQE,
    limits::MAX_CQE + 1,
    limits::MAX_INLINE_DATA,
    limits::MAX_INLINE_DATA + 1,
    limits::MAX_SGE + 1,
];

const ADDR_EDGES: [u64; 8] = [
    0,
    u64::MAX,
    BASE - 1,
    BASE + BACKED - 1,
    BASE + BACKED,
    MEMORY_FILE_SIZE,
    MEMORY_FILE_SIZE - 1,
    BASE + BACKED - 8,
];

fn num() -> impl Strategy<Value = Num> {
    prop_oneof![
        // Mostly good: a request with one field wrong reaches the check of that field.
        60 => Just(Num::Good),
        2 => any::<prop::sample::Index>().prop_map(Num::Known),
        2 => (0u8..8).prop_map(Num::Small),
        1 => any::<u8>().prop_map(Num::Edge),
        1 => any::<u32>().prop_map(Num::Raw),
    ]
}

/// The numbers a correct shim would use next: the last of each kind the attacker was given.
#[derive(Debug, Clone, Copy, Default)]
struct Recent {
    pd: u32,
    mr: u32,
    lkey: u32,
    rkey: u32,
    channel: u32,
    cq: u32,
    qp: u32,
    qpn: u32,
    srq: u32,
    /// The rkey of the destination of the last QP connected (the victims' are known to the
    /// attacker: a neighbour may learn them).
    remote_rkey: u32,
}

impl Recent {
    /// Learns from the reply to `op`.
    fn learn(&mut self, op: u16, reply: &[u8]) {
        let word = |i: usize| {
            reply
                .get(i * 4..i * 4 + 4)
                .map_or(0, |w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
        };
        match op {
            op::ALLOC_PD => self.pd = word(0),
            op::REG_MR => {
                (self.mr, self.lkey, self.rkey) = (word(0), word(1), word(2));
                self.remote_rkey = self.rkey;
            }
            op::CREATE_COMP_CHANNEL => self.channel = word(0),
            op::CREATE_CQ => self.cq = word(0),
            op::CREATE_QP => (self.qp, self.qpn) = (word(0), word(1)),
            op::CREATE_SRQ => self.srq = word(0),
            _ => {}
        }
    }
}

/// The fields of one request or WQE, taken in order from the generated numbers (good ones once
/// they run out).
struct Fields<'a> {
    nums: std::slice::Iter<'a, Num>,
    known: &'a [u32],
    recent: Recent,
}

impl Fields<'_> {
    fn next(&mut self) -> Num {
        self.nums.next().copied().unwrap_or(Num::Good)
    }

    fn u32(&mut self, good: u32) -> u32 {
        match self.next() {
            Num::Good => good,
            n => self.resolve(n),
        }
    }

    fn resolve(&self, n: Num) -> u32 {
        match n {
            Num::Good | Num::Small(_) => u32::from(n.small()),
            Num::Known(i) => self.known[i.index(self.known.len())],
            Num::Edge(e) => EDGES[usize::from(e) % EDGES.len()],
            Num::Raw(r) => r,
        }
    }

    fn u8(&mut self, good: u8) -> u8 {
        match self.next() {
            Num::Good => good,
            n => self.resolve(n) as u8,
        }
    }

    /// An address: mostly inside (or just outside) the backed pages at [`BASE`].
    fn addr(&mut self, good: u64) -> u64 {
        match self.next() {
            Num::Good => good,
            Num::Known(i) => BASE + (i.index(BACKED as usize) as u64 & !7),
            Num::Small(s) => BASE + u64::from(s) * 512,
            Num::Edge(e) => ADDR_EDGES[usize::from(e) % ADDR_EDGES.len()],
            Num::Raw(r) => BASE + u64::from(r),
        }
    }

    /// An attribute mask: one a transition takes, or anything.
    fn mask(&mut self, good: u32) -> u32 {
        const MASKS: [u32; 6] = [
            mask::STATE,
            INIT_MASK,
            RTR_MASK,
            RTS_MASK,
            mask::CUR_STATE | mask::STATE,
            mask::ACCESS_FLAGS,
        ];
        match self.next() {
            Num::Good => good,
            Num::Small(s) => MASKS[usize::from(s) % MASKS.len()],
            n => self.resolve(n),
        }
    }

    /// A destination: the attacker itself, a victim, an address nobody has, or no IPv4 GID.
    fn gid(&mut self) -> [u8; 16] {
        match self.u32(0) % 5 {
            0 => gid(ATTACKER_IP),
            1 => gid(VICTIM_IPS[0]),
            2 => gid(VICTIM_IPS[1]),
            3 => gid([10, 40, 0, 200]),
            _ => [0xfe; 16],
        }
    }

    fn sge(&mut self) -> Sge {
        Sge {
            addr: self.addr(BASE + 1024),
            length: self.u32(64),
            lkey: self.u32(self.recent.lkey),
        }
    }
}

impl Num {
    fn small(self) -> u8 {
        match self {
            Num::Small(s) => s,
            _ => 0,
        }
    }
}

/// The body of request `op` with its fields from `f` (arbitrary bytes for unknown opcodes).
fn request_body(op: u16, f: &mut Fields<'_>) -> Vec<u8> {
    let r = f.recent;
    let handle = |f: &mut Fields<'_>, good| {
        ObjectHandle {
            handle: f.u32(good),
        }
        .to_vec()
    };
    match op {
        op::ALLOC_PD | op::CREATE_COMP_CHANNEL => Vec::new(),
        op::DEALLOC_PD => handle(f, r.pd),
        op::DEREG_MR => handle(f, r.mr),
        op::DESTROY_COMP_CHANNEL => handle(f, r.channel),
        op::DESTROY_CQ => handle(f, r.cq),
        op::QUERY_QP | op::DESTROY_QP => handle(f, r.qp),
        op::QUERY_SRQ | op::DESTROY_SRQ => handle(f, r.srq),
        op::REG_MR => RegMr {
            pd: f.u32(r.pd),
            access: f.u32(ALL),
            addr: f.addr(BASE),
            length: u64::from(f.u32(BACKED as u32)),
            iova: f.addr(BASE),
            file: freeflow_proto::verbs::OWN_MEMORY_FILE,
            file_offset: 0,
        }
        .to_vec(),
        op::CREATE_CQ => CreateCq {
            cqe: f.u32(16),
            channel: f.u32(0),
            comp_vector: f.u32(0),
            flags: f.u32(0),
        }
        .to_vec(),
        op::RESIZE_CQ => ResizeCq {
            cq: f.u32(r.cq),
            cqe: f.u32(32),
        }
        .to_vec(),
        op::CREATE_QP => CreateQp {
            pd: f.u32(r.pd),
            send_cq: f.u32(r.cq),
            recv_cq: f.u32(r.cq),
            srq: f.u32(0),
            qp_type: f.u32(freeflow_proto::verbs::qp::QPT_RC),
            sq_sig_all: f.u32(1),
            cap: QpCap {
                max_send_wr: f.u32(8),
                max_recv_wr: f.u32(8),
                max_send_sge: f.u32(2),
                max_recv_sge: f.u32(2),
                max_inline_data: f.u32(64),
            },
        }
        .to_vec(),
        op::MODIFY_QP => modify_body(f).to_vec(),
        op::CREATE_SRQ => CreateSrq {
            pd: f.u32(r.pd),
            max_wr: f.u32(8),
            max_sge: f.u32(2),
            srq_limit: f.u32(0),
        }
        .to_vec(),
        op::MODIFY_SRQ => ModifySrq {
            srq: f.u32(r.srq),
            attr_mask: f.u32(2),
            max_wr: f.u32(0),
            srq_limit: f.u32(0),
        }
        .to_vec(),
        op::TEST_READ => TestRead {
            pd: f.u32(r.pd),
            lkey: f.u32(r.lkey),
            addr: f.addr(BASE),
            length: u64::from(f.u32(64)),
        }
        .to_vec(),
        op::TEST_WRITE => {
            let mut out = [0u8; 64];
            let data = vec![0xa5; f.u32(8) as usize % (MAX_TEST_WRITE + 1)];
            let w = TestWrite {
                pd: f.u32(r.pd),
                lkey: f.u32(r.lkey),
                addr: f.addr(BASE),
                data,
            };
            let n = w.encode(&mut out).expect("fits");
            out[..n].to_vec()
        }
        _ => (0..f.u32(8) % 64).map(|_| f.u8(0)).collect(),
    }
}

/// A modify of the attacker's last QP: to a state from `f`, with attributes from `f` (good
/// ones connect it to its own last QP number).
fn modify_body(f: &mut Fields<'_>) -> ModifyQp {
    let r = f.recent;
    let (attr_mask, state) = match f.u32(0) % 4 {
        0 => (INIT_MASK, QpState::Init),
        1 => (RTR_MASK, QpState::Rtr),
        2 => (RTS_MASK, QpState::Rts),
        _ => (mask::STATE, QpState::Err),
    };
    ModifyQp {
        qp: f.u32(r.qp),
        attr_mask: f.mask(attr_mask),
        attr: QpAttr {
            qp_state: f.u8(state as u8),
            cur_qp_state: f.u8(0),
            path_mtu: f.u8(3),
            qp_access_flags: f.u32(ALL),
            dest_qp_num: f.u32(r.qpn),
            dgid: match f.next() {
                Num::Good => gid(ATTACKER_IP),
                _ => f.gid(),
            },
            is_global: f.u8(1),
            ah_port_num: f.u8(1),
            port_num: f.u8(1),
            pkey_index: f.u32(0) as u16,
            min_rnr_timer: f.u8(1),
            timeout: f.u8(1),
            retry_cnt: f.u8(1),
            rnr_retry: f.u8(1),
            max_rd_atomic: f.u8(1),
            max_dest_rd_atomic: f.u8(1),
            sgid_index: f.u8(0),
            ..QpAttr::default()
        },
    }
}

/// A send WQE: a header and scatter/gather entries (or inline bytes) from `f`.
fn send_wqe(f: &mut Fields<'_>, opcode: u8, slot_size: usize) -> Vec<u8> {
    let mut slot = vec![0u8; slot_size];
    let opcode = f.u8(opcode);
    let header = SendWqeHeader {
        wr_id: u64::from(f.u32(7)),
        opcode,
        flags: f.u8(send_flags::SIGNALED as u8) & 0x1f,
        num_sge: (f.u32(1) % 20) as u16,
        imm_data: f.u32(0),
        remote_addr: f.addr(BASE + 2048),
        rkey: f.u32(f.recent.remote_rkey),
        inline_len: f.u32(0),
        compare_add: u64::from(f.u32(1)),
        swap: u64::from(f.u32(2)),
    };
    header.write(&mut slot);
    let room = (slot_size - SendWqeHeader::LEN) / Sge::LEN;
    for i in 0..usize::from(header.num_sge).min(room) {
        f.sge()
            .write(&mut slot[SendWqeHeader::LEN + i * Sge::LEN..]);
    }
    if header.has(send_flags::INLINE) {
        for b in &mut slot[SendWqeHeader::LEN..] {
            *b = 0xc3;
        }
    }
    slot
}

fn recv_wqe(f: &mut Fields<'_>, slot_size: usize) -> Vec<u8> {
    let mut slot = vec![0u8; slot_size];
    let num_sge = f.u32(1) % 20;
    RecvWqe::write_header(u64::from(f.u32(8)), num_sge, &mut slot);
    let room = (slot_size - RECV_WQE_HEADER) / Sge::LEN;
    for i in 0..(num_sge as usize).min(room) {
        f.sge().write(&mut slot[RECV_WQE_HEADER + i * Sge::LEN..]);
    }
    slot
}

#[derive(Debug, Clone)]
enum Action {
    /// A verbs request: one of [`OPS`] (or any opcode), its body built from `nums`, or `raw`.
    Request {
        op: prop::sample::Index,
        any_op: Option<u16>,
        nums: Vec<Num>,
        raw: Option<Vec<u8>>,
    },
    /// A correct shim's setup: a PD, an MR over its memory, a CQ and a QP (with a bit of `nums`
    /// wrong now and then).
    Setup {
        nums: Vec<Num>,
    },
    /// The rc_pingpong sequence on one of the attacker's QPs, to destination `dest`: 0 the QP
    /// itself, 1 and 2 a victim's QP, 3 one from `nums`.
    Connect {
        /// None: the most recent QP.
        qp: Option<prop::sample::Index>,
        dest: u8,
        nums: Vec<Num>,
    },
    /// A WQE pushed (and published) on one of the attacker's send or receive rings (a QP's or
    /// an SRQ's), built from `nums` or `raw`.
    Post {
        send: bool,
        /// None: the most recent ring.
        ring: Option<prop::sample::Index>,
        /// The work request's opcode (7 and 8 are none).
        opcode: u8,
        nums: Vec<Num>,
        raw: Option<Vec<u8>>,
    },
    /// An index of one of the attacker's rings moved by `by`.
    Corrupt {
        ring: prop::sample::Index,
        by: u32,
    },
    Poll,
    Park,
    /// The attacker polls its CQs.
    DrainCqs,
    /// The attacker detaches and attaches again (as a new context with stale numbers).
    Reattach,
}

fn action() -> impl Strategy<Value = Action> {
    let nums = || vec(num(), 0..24);
    let raw = || proptest::option::weighted(0.1, vec(any::<u8>(), 0..300));
    let op = || proptest::option::weighted(0.05, any::<u16>());
    let which = || proptest::option::weighted(0.3, any::<prop::sample::Index>());
    prop_oneof![
        10 => (any::<prop::sample::Index>(), op(), nums(), raw())
            .prop_map(|(op, any_op, nums, raw)| Action::Request { op, any_op, nums, raw }),
        2 => nums().prop_map(|nums| Action::Setup { nums }),
        3 => (which(), 0u8..4, nums()).prop_map(|(qp, dest, nums)| Action::Connect { qp, dest, nums }),
        8 => (any::<bool>(), which(), 0u8..9, nums(), raw())
            .prop_map(|(send, ring, opcode, nums, raw)| Action::Post { send, ring, opcode, nums, raw }),
        1 => (any::<prop::sample::Index>(), any::<u32>()).prop_map(|(ring, by)| Action::Corrupt { ring, by }),
        5 => Just(Action::Poll),
        1 => Just(Action::Park),
        3 => Just(Action::DrainCqs),
        1 => Just(Action::Reattach),
    ]
}

/// The attacker as its shim: the numbers it has seen and the rings it was given.
struct Attacker {
    id: u32,
    tenant: &'static str,
    conn: OwnedFd,
    shim: OwnedFd,
    _file: std::fs::File,
    known: Vec<u32>,
    recent: Recent,
    /// The victims' QPs: IP, QP number and rkey.
    victims: [([u8; 4], u32, u32); 2],
    /// QP handles and numbers, for [`Action::Connect`].
    qps: Vec<(u32, u32)>,
    sends: Vec<Producer>,
    recvs: Vec<Producer>,
    cqs: Vec<Consumer>,
    regions: Vec<SharedRegion>,
}

impl Attacker {
    fn attach(
        engine: &mut Engine,
        id: u32,
        tenant: &'static str,
        known: Vec<u32>,
        victims: [([u8; 4], u32, u32); 2],
    ) -> Attacker {
        let file = open_context(engine, id, ATTACKER_IP, tenant, BASE, 0);
        let (conn, shim) = test_seqpacket_pair();
        Attacker {
            id,
            tenant,
            conn,
            shim,
            _file: file,
            known,
            recent: Recent::default(),
            victims,
            qps: Vec::new(),
            sends: Vec::new(),
            recvs: Vec::new(),
            cqs: Vec::new(),
            regions: Vec::new(),
        }
    }

    fn fields<'a>(&'a self, nums: &'a [Num]) -> Fields<'a> {
        Fields {
            nums: nums.iter(),
            known: &self.known,
            recent: self.recent,
        }
    }

    /// Serves one request and learns the numbers of its reply and the rings it was given.
    fn request(&mut self, engine: &mut Engine, op: u16, body: &[u8]) -> u16 {
        let (status, reply) = call(engine, AttachmentId(self.id), &self.conn, op, body);
        if status == status::OK {
            self.recent.learn(op, &reply);
            if op == op::CREATE_QP {
                self.qps.push((self.recent.qp, self.recent.qpn));
            }
            for word in reply.chunks_exact(4) {
                let n = u32::from_le_bytes(word.try_into().expect("4 bytes"));
                if self.known.len() < 256 && !self.known.contains(&n) {
                    self.known.push(n);
                }
            }
        }
        for (msg, region) in queue_files(&self.shim) {
            let ring = |i| region.ring(i).expect("ring");
            match msg.kind {
                QueueFileKind::Cq => self.cqs.push(Consumer::new(ring(0))),
                QueueFileKind::Qp => {
                    self.sends.push(Producer::new(ring(SEND_RING)));
                    self.recvs.push(Producer::new(ring(RECV_RING)));
                }
                QueueFileKind::Srq => self.recvs.push(Producer::new(ring(0))),
                QueueFileKind::Channel | QueueFileKind::AsyncEvents => {}
            }
            self.regions.push(region);
        }
        status
    }

    /// RESET → INIT → RTR → RTS of QP `qp` (number `qpn`) to destination `dest` (see
    /// [`Action::Connect`]).
    fn connect(&mut self, engine: &mut Engine, (qp, qpn): (u32, u32), dest: u8, nums: &[Num]) {
        let mut f = self.fields(nums);
        let (dgid, dest_qpn, rkey) = match dest {
            0 => (gid(ATTACKER_IP), qpn, self.recent.rkey),
            1 | 2 => {
                let (ip, qpn, rkey) = self.victims[usize::from(dest - 1)];
                (gid(ip), qpn, rkey)
            }
            _ => (f.gid(), f.u32(qpn), f.u32(self.recent.rkey)),
        };
        let dest_qp_num = f.u32(dest_qpn);
        let (retry_cnt, rnr_retry) = (f.u8(1) % 8, f.u8(1) % 8);
        self.recent.remote_rkey = rkey;
        let steps = [
            (mask::STATE, QpState::Reset),
            (INIT_MASK, QpState::Init),
            (RTR_MASK, QpState::Rtr),
            (RTS_MASK, QpState::Rts),
        ];
        for (attr_mask, state) in steps {
            let attr = QpAttr {
                qp_state: state as u8,
                port_num: 1,
                qp_access_flags: ALL,
                path_mtu: 3,
                dest_qp_num,
                min_rnr_timer: 1,
                max_dest_rd_atomic: 1,
                is_global: 1,
                ah_port_num: 1,
                dgid,
                timeout: 1,
                retry_cnt,
                rnr_retry,
                ..QpAttr::default()
            };
            let body = ModifyQp {
                qp,
                attr_mask,
                attr,
            };
            self.request(engine, op::MODIFY_QP, &body.to_vec());
        }
    }

    fn ring_count(&self) -> usize {
        self.sends.len() + self.recvs.len() + self.cqs.len()
    }

    fn corrupt(&self, ring: prop::sample::Index, by: u32) {
        let mut i = ring.index(self.ring_count());
        let control = if i < self.sends.len() {
            &self.sends[i].memory().control().tail.0
        } else if i - self.sends.len() < self.recvs.len() {
            i -= self.sends.len();
            &self.recvs[i].memory().control().tail.0
        } else {
            i -= self.sends.len() + self.recvs.len();
            &self.cqs[i].memory().control().head.0
        };
        control.fetch_add(by, Ordering::Release);
    }

    fn post(
        &mut self,
        send: bool,
        ring: Option<prop::sample::Index>,
        opcode: u8,
        nums: &[Num],
        raw: &Option<Vec<u8>>,
    ) {
        let count = if send {
            self.sends.len()
        } else {
            self.recvs.len()
        };
        if count == 0 {
            return;
        }
        let i = ring.map_or(count - 1, |i| i.index(count));
        let slot_size = if send { &self.sends } else { &self.recvs }[i].slot_size();
        let mut f = self.fields(nums);
        let mut slot = match raw {
            Some(raw) => raw.clone(),
            None if send => send_wqe(&mut f, opcode, slot_size),
            None => recv_wqe(&mut f, slot_size),
        };
        slot.truncate(slot_size);
        let ring = if send {
            &mut self.sends
        } else {
            &mut self.recvs
        };
        // A ring the attacker corrupted refuses pushes: that is its shim's problem.
        if ring[i].push(&slot).is_ok() {
            let _ = ring[i].publish();
        }
    }
}

/// Runs one action of the attacker.
fn run(engine: &mut Engine, attacker: &mut Attacker, action: &Action) {
    match action {
        Action::Request {
            op,
            any_op,
            nums,
            raw,
        } => {
            let op = any_op.unwrap_or(OPS[op.index(OPS.len())]);
            let body = match raw {
                Some(raw) => raw.clone(),
                None => request_body(op, &mut attacker.fields(nums)),
            };
            attacker.request(engine, op, &body);
        }
        Action::Setup { nums } => {
            for op in [op::ALLOC_PD, op::REG_MR, op::CREATE_CQ, op::CREATE_QP] {
                let body = request_body(op, &mut attacker.fields(nums));
                attacker.request(engine, op, &body);
            }
        }
        Action::Connect { qp, dest, nums } if !attacker.qps.is_empty() => {
            let last = attacker.qps.len() - 1;
            let qp = attacker.qps[qp.map_or(last, |i| i.index(last + 1))];
            attacker.connect(engine, qp, *dest, nums);
        }
        Action::Post {
            send,
            ring,
            opcode,
            nums,
            raw,
        } => attacker.post(*send, *ring, *opcode, nums, raw),
        Action::Corrupt { ring, by } if attacker.ring_count() > 0 => attacker.corrupt(*ring, *by),
        Action::Poll => {
            engine.poll();
        }
        Action::Park => {
            let _plan = engine.prepare_park();
            engine.unpark();
        }
        Action::DrainCqs => {
            let mut slot = [0u8; 64];
            for cq in &mut attacker.cqs {
                while let Ok(true) = cq.pop(&mut slot) {}
                cq.release();
            }
        }
        Action::Reattach => {
            engine.close(AttachmentId(attacker.id));
            let known = std::mem::take(&mut attacker.known);
            let (id, tenant, victims) = (attacker.id + 1, attacker.tenant, attacker.victims);
            *attacker = Attacker::attach(engine, id, tenant, known, victims);
        }
        Action::Connect { .. } | Action::Corrupt { .. } => {}
    }
    detach_broken(engine);
}

/// The shard detaches every attachment that broke a ring; only the attacker may have.
fn detach_broken(engine: &mut Engine) {
    for (id, why) in engine.take_broken() {
        assert!(id.0 >= 3, "victim {} reported broken: {why}", id.0);
        engine.close(id);
    }
}

fn check(same_tenant: bool, actions: &[Action]) {
    let mut engine = Engine::new(true);
    let mut victims = victims(&mut engine);
    let mut known = vec![0, 1];
    for v in &victims {
        known.extend([v.qpn, v.qp, v.mr.lkey, v.mr.rkey, v.mr.mr]);
    }
    let tenant = if same_tenant { "blue" } else { "red" };
    let [a, b] = &victims;
    let targets = [
        (VICTIM_IPS[0], a.qpn, a.mr.rkey),
        (VICTIM_IPS[1], b.qpn, b.mr.rkey),
    ];
    let mut attacker = Attacker::attach(&mut engine, 3, tenant, known, targets);
    for action in actions {
        run(&mut engine, &mut attacker, action);
    }
    engine.poll();
    run(&mut engine, &mut attacker, &Action::DrainCqs);
    assert_victims_untouched(&mut engine, &mut victims);
    assert_victims_work(&mut engine, &mut victims, 1000);
    engine.close(AttachmentId(attacker.id));
    assert_victims_work(&mut engine, &mut victims, 2000);
    assert_victims_untouched(&mut engine, &mut victims);
}

proptest! {
    // 256 cases (about two seconds), or $PROPTEST_CASES.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn prop_arbitrary_requests_and_wqes_leave_other_contexts_alone(
        same_tenant in any::<bool>(),
        actions in vec(action(), 1..80),
    ) {
        check(same_tenant, &actions);
    }
}
