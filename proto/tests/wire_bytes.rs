//! Golden bytes of every fixed layout in proto: the codec may change shape, the bytes on the
//! wire may not.

use freeflow_proto::attach::{Hello, Refusal, ShimKind, Welcome};
use freeflow_proto::msg::MsgHeader;
use freeflow_proto::sockmsg::{SockNotice, SockOp, SockReply, SockRequest, SockStatus};
use freeflow_proto::verbs::qp::{CreateQp, ModifyQp, QpAttr, QpCap, QpCreated, QpQueried};
use freeflow_proto::verbs::srq::{CreateSrq, ModifySrq, SrqAttr, SrqCreated};
use freeflow_proto::verbs::work::{Cqe, RecvWqe, SendWqeHeader, Sge};
use freeflow_proto::verbs::*;
use std::net::Ipv4Addr;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn body<T: Body>(v: T) -> String {
    hex(&v.to_vec())
}

fn qp_attr() -> QpAttr {
    let mut dgid = [0u8; 16];
    for (i, d) in dgid.iter_mut().enumerate() {
        *d = 0xa0 + i as u8;
    }
    QpAttr {
        qp_state: 1,
        cur_qp_state: 2,
        path_mtu: 3,
        path_mig_state: 4,
        qkey: 0x0506_0708,
        rq_psn: 0x090a_0b0c,
        sq_psn: 0x0d0e_0f10,
        dest_qp_num: 0x1112_1314,
        qp_access_flags: 0x1516_1718,
        pkey_index: 0x191a,
        en_sqd_async_notify: 0x1b,
        sq_draining: 0x1c,
        max_rd_atomic: 0x1d,
        max_dest_rd_atomic: 0x1e,
        min_rnr_timer: 0x1f,
        port_num: 0x20,
        timeout: 0x21,
        retry_cnt: 0x22,
        rnr_retry: 0x23,
        dgid,
        flow_label: 0x2425_2627,
        sgid_index: 0x28,
        hop_limit: 0x29,
        traffic_class: 0x2a,
        is_global: 0x2b,
        dlid: 0x2c2d,
        sl: 0x2e,
        src_path_bits: 0x2f,
        static_rate: 0x30,
        ah_port_num: 0x31,
        rate_limit: 0x3233_3435,
        cap: cap(),
    }
}

fn cap() -> QpCap {
    QpCap {
        max_send_wr: 0x4142_4344,
        max_recv_wr: 0x4546_4748,
        max_send_sge: 0x494a_4b4c,
        max_recv_sge: 0x4d4e_4f50,
        max_inline_data: 0x5152_5354,
    }
}

fn all() -> Vec<(&'static str, String)> {
    let a = 0x0102_0304u32;
    let b = 0x0506_0708u32;
    let c = 0x090a_0b0cu32;
    let d = 0x0d0e_0f10u32;
    let x = 0x1112_1314_1516_1718u64;
    let y = 0x191a_1b1c_1d1e_1f20u64;
    let z = 0x2122_2324_2526_2728u64;
    let mut out = vec![
        ("PdCreated", body(PdCreated { pd: a })),
        ("DeallocPd", body(DeallocPd { pd: a })),
        (
            "RegMr",
            body(RegMr {
                pd: a,
                access: b,
                addr: x,
                length: y,
                iova: z,
                file: 0x0201,
                file_offset: x,
            }),
        ),
        (
            "MrCreated",
            body(MrCreated {
                mr: a,
                lkey: b,
                rkey: c,
            }),
        ),
        ("DeregMr", body(DeregMr { mr: a })),
        ("ObjectHandle", body(ObjectHandle { handle: a })),
        (
            "CreateCq",
            body(CreateCq {
                cqe: a,
                channel: b,
                comp_vector: c,
                flags: d,
            }),
        ),
        ("ResizeCq", body(ResizeCq { cq: a, cqe: b })),
        ("CqCreated", body(CqCreated { cq: a, cqe: b })),
        (
            "TestRead",
            body(TestRead {
                pd: a,
                lkey: b,
                addr: x,
                length: y,
            }),
        ),
        ("TestDigest", body(TestDigest { digest: x })),
        (
            "CreateSrq",
            body(CreateSrq {
                pd: a,
                max_wr: b,
                max_sge: c,
                srq_limit: d,
            }),
        ),
        (
            "SrqAttr",
            body(SrqAttr {
                max_wr: a,
                max_sge: b,
                srq_limit: c,
            }),
        ),
        (
            "SrqCreated",
            body(SrqCreated {
                srq: d,
                attr: SrqAttr {
                    max_wr: a,
                    max_sge: b,
                    srq_limit: c,
                },
            }),
        ),
        (
            "ModifySrq",
            body(ModifySrq {
                srq: a,
                attr_mask: b,
                max_wr: c,
                srq_limit: d,
            }),
        ),
        ("QpAttr", body(qp_attr())),
        (
            "CreateQp",
            body(CreateQp {
                pd: a,
                send_cq: b,
                recv_cq: c,
                srq: d,
                qp_type: 2,
                sq_sig_all: 1,
                cap: cap(),
            }),
        ),
        (
            "QpCreated",
            body(QpCreated {
                qp: a,
                qpn: b,
                cap: cap(),
            }),
        ),
        (
            "ModifyQp",
            body(ModifyQp {
                qp: a,
                attr_mask: b,
                attr: qp_attr(),
            }),
        ),
        (
            "QpQueried",
            body(QpQueried {
                attr: qp_attr(),
                sq_sig_all: c,
            }),
        ),
        (
            "QueueFileMsg",
            hex(&QueueFileMsg {
                kind: QueueFileKind::Srq,
                handle: a,
            }
            .encode()),
        ),
        (
            "MemoryFileMsg",
            hex(&MemoryFileMsg {
                size: x,
                file: 0x0201,
            }
            .encode()),
        ),
    ];
    let mut buf = [0u8; 64];
    let w = TestWrite {
        pd: a,
        lkey: b,
        addr: x,
        data: vec![0xee, 0xef, 0xf0],
    };
    let n = w.encode(&mut buf).unwrap();
    out.push(("TestWrite", hex(&buf[..n])));
    let h = SendWqeHeader {
        wr_id: x,
        opcode: 4,
        flags: 0x0b,
        num_sge: 0x0203,
        imm_data: a,
        remote_addr: y,
        rkey: b,
        inline_len: c,
        compare_add: z,
        swap: x ^ y,
    };
    let mut wqe = [0u8; SendWqeHeader::LEN];
    h.write(&mut wqe);
    out.push(("SendWqeHeader", hex(&wqe)));
    let mut sge = [0u8; Sge::LEN];
    Sge {
        addr: x,
        length: a,
        lkey: b,
    }
    .write(&mut sge);
    out.push(("Sge", hex(&sge)));
    let mut recv = [0xffu8; 16];
    RecvWqe::write_header(x, a, &mut recv);
    out.push(("RecvWqe", hex(&recv)));
    let cqe = Cqe {
        wr_id: x,
        status: 1,
        opcode: 128,
        vendor_err: a,
        byte_len: b,
        imm_data: c,
        qp_num: d,
        src_qp: a ^ b,
        wc_flags: 2,
        pkey_index: 0x3132,
        slid: 0x3334,
        sl: 0x35,
        dlid_path_bits: 0x36,
    };
    out.push(("Cqe", hex(&cqe.encode())));
    let mut header = [0u8; 16];
    MsgHeader {
        opcode: 0x8101,
        status: 0x0203,
        len: a,
        cookie: x,
    }
    .encode(&mut header);
    out.push(("MsgHeader", hex(&header)));
    let ip = Ipv4Addr::new(10, 32, 0, 5);
    let host = Ipv4Addr::new(192, 168, 1, 2);
    let request = SockRequest {
        op: SockOp::Relisten,
        flags: 7,
        seq: a,
        ip,
        port: 0x1f90,
        backlog: b,
    };
    out.push(("SockRequest", hex(&request.encode())));
    let reply = SockReply {
        status: SockStatus::Error,
        seq: a,
        errno: -5,
        ip,
        port: 0x9c40,
    };
    out.push(("SockReply", hex(&reply.encode())));
    let notice = SockNotice {
        host_ip: host,
        host_port: 0xa028,
        ip,
        port: 0x1f90,
        sent_ms: c,
    };
    out.push(("SockNotice", hex(&notice.encode())));
    out.push(("Hello", hex(&Hello::new(ShimKind::Verbs).encode())));
    let accepted = Welcome::Accepted {
        shard: 3,
        attachment_id: a,
        ip,
        container: "web".into(),
        tenant: "blue".into(),
    };
    out.push(("WelcomeAccepted", hex(&accepted.encode())));
    let refused = Welcome::Refused {
        reason: Refusal::Busy,
        message: "later".into(),
    };
    out.push(("WelcomeRefused", hex(&refused.encode())));
    out
}

/// The bytes each layout had before the codec was shared (`verbs.rs`, `sockmsg.rs`, `attach.rs`
/// and `msg.rs` wrote them field by field).
const GOLDEN: &[(&str, &str)] = &[
    ("PdCreated", "04030201"),
    ("DeallocPd", "04030201"),
    ("RegMr", "04030201080706051817161514131211201f1e1d1c1b1a19282726252423222101021817161514131211"),
    ("MrCreated", "04030201080706050c0b0a09"),
    ("DeregMr", "04030201"),
    ("ObjectHandle", "04030201"),
    ("CreateCq", "04030201080706050c0b0a09100f0e0d"),
    ("ResizeCq", "0403020108070605"),
    ("CqCreated", "0403020108070605"),
    ("TestRead", "04030201080706051817161514131211201f1e1d1c1b1a19"),
    ("TestDigest", "1817161514131211"),
    ("CreateSrq", "04030201080706050c0b0a09100f0e0d"),
    ("SrqAttr", "04030201080706050c0b0a09"),
    ("SrqCreated", "100f0e0d04030201080706050c0b0a09"),
    ("ModifySrq", "04030201080706050c0b0a09100f0e0d"),
    ("QpAttr", "01020304080706050c0b0a09100f0e0d14131211181716151a191b1c1d1e1f2021222328a0a1a2a3a4a5a6a7a8a9aaabacadaeaf27262524292a2b2e2d2c2f30310000003534333244434241484746454c4b4a49504f4e4d5453525100000000"),
    ("CreateQp", "04030201080706050c0b0a09100f0e0d020000000100000044434241484746454c4b4a49504f4e4d54535251"),
    ("QpCreated", "040302010807060544434241484746454c4b4a49504f4e4d54535251"),
    ("ModifyQp", "040302010807060501020304080706050c0b0a09100f0e0d14131211181716151a191b1c1d1e1f2021222328a0a1a2a3a4a5a6a7a8a9aaabacadaeaf27262524292a2b2e2d2c2f30310000003534333244434241484746454c4b4a49504f4e4d5453525100000000"),
    ("QpQueried", "01020304080706050c0b0a09100f0e0d14131211181716151a191b1c1d1e1f2021222328a0a1a2a3a4a5a6a7a8a9aaabacadaeaf27262524292a2b2e2d2c2f30310000003534333244434241484746454c4b4a49504f4e4d54535251000000000c0b0a09"),
    ("QueueFileMsg", "464651460400000004030201"),
    ("MemoryFileMsg", "46464d46010001021817161514131211"),
    ("TestWrite", "04030201080706051817161514131211eeeff0"),
    ("SendWqeHeader", "1817161514131211040b030204030201201f1e1d1c1b1a19080706050c0b0a0928272625242322213808080808080808"),
    ("Sge", "18171615141312110403020108070605"),
    ("RecvWqe", "18171615141312110403020100000000"),
    ("Cqe", "1817161514131211010000008000000004030201080706050c0b0a09100f0e0d0c040404020000003231343335360000"),
    ("MsgHeader", "01810302040302011817161514131211"),
    ("SockRequest", "4646535106000700040302010a200005901f0000080706050000000000000000"),
    ("SockReply", "464653520200000004030201fbffffff0a200005409c00000000000000000000"),
    ("SockNotice", "4646534ec0a8010228a000000a200005901f00000c0b0a090000000000000000"),
    ("Hello", "46464849010002000000000000000000"),
    ("WelcomeAccepted", "4646574c0100000003000800040302010a200005000000007765620a626c7565"),
    ("WelcomeRefused", "4646574c01000400000005000000000000000000000000006c61746572"),
];

#[test]
fn every_layout_encodes_the_bytes_it_always_did() {
    let got = all();
    assert_eq!(got.len(), GOLDEN.len());
    for ((name, bytes), (golden_name, golden)) in got.iter().zip(GOLDEN) {
        assert_eq!(name, golden_name);
        assert_eq!(bytes, golden, "{name}");
    }
}
