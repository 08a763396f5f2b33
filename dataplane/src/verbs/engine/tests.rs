//! The engine with two contexts in one process: each "shim" side is played by the test with the
//! same proto types a shim uses (queue files from a socket pair, rings mapped from them).

use super::test_support::{
    call, gid, ok, open_context, rc_pingpong_steps, ALL, BACKED, INIT_MASK, RTR_MASK,
};
use crate::verbs::notify::test_seqpacket_pair;
use crate::verbs::remote::{Link, OutDest, SiblingLink};
use crate::verbs::*;
use freeflow_proto::control::ContainerEntry;
use freeflow_proto::fdpass;
use freeflow_proto::identity::NetnsId;
use freeflow_proto::region::SharedRegion;
use freeflow_proto::verbs::qp::{mask, CreateQp, ModifyQp, QpAttr, QpCap, QpCreated, QpState};
use freeflow_proto::verbs::work::{
    send_flags, wc_opcode, wr_opcode, Cqe, RecvWqe, SendWqeHeader, Sge, RECV_WQE_HEADER,
};
use freeflow_proto::verbs::AsyncEventRecord;
use freeflow_proto::verbs::{
    op, wc_status, CqCreated, CreateCq, ObjectHandle, PdCreated, QueueFileKind, QueueFileMsg,
};
use freeflow_proto::{Consumer, Producer};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;

const BASE: u64 = 0x7f10_0000_0000;
/// One context as its shim sees it.
struct Side {
    id: AttachmentId,
    ip: [u8; 4],
    conn: OwnedFd,
    /// The shim's end of the attach connection.
    shim: OwnedFd,
    file: std::fs::File,
    pd: u32,
    mr: MrCreated,
    cq: u32,
    cq_ring: Consumer,
    qp: u32,
    qpn: u32,
    sq: Producer,
    rq: Producer,
    _regions: Vec<SharedRegion>,
}

/// The status of one request of `side`.
fn status_of(engine: &mut Engine, side: &Side, op: u16, body: &[u8]) -> u16 {
    call(engine, side.id, &side.conn, op, body).0
}

/// The queue file the engine passed on the connection for `handle`, mapped.
fn queue_file(shim: &OwnedFd, kind: QueueFileKind, handle: u32) -> SharedRegion {
    let mut buf = [0u8; 32];
    let got = fdpass::recv_with_fds(shim.as_fd(), &mut buf, libc::MSG_DONTWAIT).unwrap();
    let msg = QueueFileMsg::decode(&buf[..got.len]).unwrap();
    assert_eq!((msg.kind, msg.handle), (kind, handle));
    SharedRegion::attach(got.fds[0].as_fd()).unwrap()
}

fn side(engine: &mut Engine, number: u32, ip: [u8; 4], tenant: &str, cqe: u32) -> Side {
    typed_side(
        engine,
        (number, ip, tenant, cqe),
        freeflow_proto::verbs::qp::QPT_RC,
    )
}

/// [`side`] with a QP of `qp_type` (`enum ibv_qp_type`).
fn typed_side(
    engine: &mut Engine,
    (number, ip, tenant, cqe): (u32, [u8; 4], &str, u32),
    qp_type: u32,
) -> Side {
    let id = AttachmentId(number);
    let file = open_context(engine, number, ip, tenant, BASE, 0);
    let (conn, shim) = test_seqpacket_pair();
    let pd = ok::<PdCreated>(engine, id, &conn, op::ALLOC_PD, &[]).pd;
    let mr: MrCreated = ok(
        engine,
        id,
        &conn,
        op::REG_MR,
        &RegMr {
            pd,
            access: ALL,
            addr: BASE,
            length: BACKED,
            iova: BASE,
            file: freeflow_proto::verbs::OWN_MEMORY_FILE,
            file_offset: 0,
        }
        .to_vec(),
    );
    let cq: CqCreated = ok(
        engine,
        id,
        &conn,
        op::CREATE_CQ,
        &CreateCq {
            cqe,
            channel: 0,
            comp_vector: 0,
            flags: 0,
        }
        .to_vec(),
    );
    let cq_region = queue_file(&shim, QueueFileKind::Cq, cq.cq);
    let cq_ring = Consumer::new(cq_region.ring(0).unwrap());
    let qp: QpCreated = ok(
        engine,
        id,
        &conn,
        op::CREATE_QP,
        &CreateQp {
            pd,
            send_cq: cq.cq,
            recv_cq: cq.cq,
            srq: 0,
            qp_type,
            sq_sig_all: 0,
            cap: QpCap {
                max_send_wr: 64,
                max_recv_wr: 64,
                max_send_sge: 2,
                max_recv_sge: 2,
                max_inline_data: 0,
            },
        }
        .to_vec(),
    );
    let qp_region = queue_file(&shim, QueueFileKind::Qp, qp.qp);
    let sq = Producer::new(qp_region.ring(freeflow_proto::verbs::SEND_RING).unwrap());
    let rq = Producer::new(qp_region.ring(freeflow_proto::verbs::RECV_RING).unwrap());
    Side {
        id,
        ip,
        conn,
        shim,
        file,
        pd,
        mr,
        cq: cq.cq,
        cq_ring,
        qp: qp.qp,
        qpn: qp.qpn,
        sq,
        rq,
        _regions: vec![cq_region, qp_region],
    }
}

fn modify(engine: &mut Engine, s: &Side, attr_mask: u32, attr: QpAttr) -> u16 {
    let body = ModifyQp {
        qp: s.qp,
        attr_mask,
        attr,
    }
    .to_vec();
    status_of(engine, s, op::MODIFY_QP, &body)
}

/// RESET → INIT → RTR (to `peer_ip`/`peer_qpn`) → RTS, as rc_pingpong does it.
fn connect(engine: &mut Engine, s: &Side, peer_ip: [u8; 4], peer_qpn: u32, rnr_retry: u8) {
    for (m, attr) in rc_pingpong_steps(peer_ip, peer_qpn, rnr_retry) {
        assert_eq!(modify(engine, s, m, attr), status::OK);
    }
}

fn post_send(s: &mut Side, wr_id: u64, opcode: u8, sges: &[Sge], raddr: u64, rkey: u32) {
    let mut slot = vec![0u8; s.sq.slot_size()];
    SendWqeHeader {
        wr_id,
        opcode,
        flags: send_flags::SIGNALED as u8,
        num_sge: sges.len() as u16,
        remote_addr: raddr,
        rkey,
        ..SendWqeHeader::default()
    }
    .write(&mut slot);
    for (i, sge) in sges.iter().enumerate() {
        sge.write(&mut slot[SendWqeHeader::LEN + i * Sge::LEN..]);
    }
    assert!(s.sq.push(&slot).unwrap());
    let _ = s.sq.publish();
}

fn post_recv(s: &mut Side, wr_id: u64, sge: Sge) {
    let mut slot = vec![0u8; s.rq.slot_size()];
    RecvWqe::write_header(wr_id, 1, &mut slot);
    sge.write(&mut slot[RECV_WQE_HEADER..]);
    assert!(s.rq.push(&slot).unwrap());
    let _ = s.rq.publish();
}

/// The new completions of `s`, each as (wr_id, status, qp_num).
fn outcomes(s: &mut Side) -> Vec<(u64, u32, u32)> {
    completions(s)
        .iter()
        .map(|c| (c.wr_id, c.status, c.qp_num))
        .collect()
}

fn completions(s: &mut Side) -> Vec<Cqe> {
    let mut out = Vec::new();
    let mut slot = [0u8; 64];
    while s.cq_ring.pop(&mut slot).unwrap() {
        out.push(Cqe::decode(&slot));
    }
    s.cq_ring.release();
    out
}

fn sge(lkey: u32, offset: u64, length: u32) -> Sge {
    Sge {
        addr: BASE + offset,
        length,
        lkey,
    }
}

fn pair(engine: &mut Engine) -> (Side, Side) {
    pair_with_cqs_of(engine, 64)
}

/// Two containers of one tenant, their QPs connected to each other, each CQ of `cqe` entries.
fn pair_with_cqs_of(engine: &mut Engine, cqe: u32) -> (Side, Side) {
    let a = side(engine, 1, [10, 32, 0, 2], "blue", cqe);
    let b = side(engine, 2, [10, 32, 0, 3], "blue", cqe);
    connect(engine, &a, b.ip, b.qpn, 7);
    connect(engine, &b, a.ip, a.qpn, 7);
    (a, b)
}

#[test]
fn send_and_write_copy_between_two_containers_memory() {
    let mut engine = Engine::new(false);
    let (mut a, mut b) = pair(&mut engine);
    let (ak, bk) = (a.mr.lkey, b.mr.lkey);
    a.file
        .write_all_at(b"hello from a, in two pieces", BASE + 100)
        .unwrap();
    post_recv(&mut b, 7, sge(bk, 2000, 100));
    post_send(
        &mut a,
        8,
        wr_opcode::SEND,
        &[sge(ak, 100, 11), sge(ak, 111, 16)],
        0,
        0,
    );
    engine.poll();
    let (ca, cb) = (completions(&mut a), completions(&mut b));
    assert_eq!(ca.len(), 1);
    assert_eq!(
        (ca[0].wr_id, ca[0].status, ca[0].opcode),
        (8, 0, wc_opcode::SEND)
    );
    assert_eq!(cb.len(), 1);
    assert_eq!(
        (
            cb[0].wr_id,
            cb[0].status,
            cb[0].byte_len,
            cb[0].qp_num,
            cb[0].src_qp
        ),
        (7, 0, 27, b.qpn, a.qpn)
    );
    let mut got = [0u8; 27];
    b.file.read_exact_at(&mut got, BASE + 2000).unwrap();
    assert_eq!(&got, b"hello from a, in two pieces");

    // RDMA WRITE with b's rkey lands in b's memory; a READ brings it back elsewhere in a.
    post_send(
        &mut a,
        9,
        wr_opcode::RDMA_WRITE,
        &[sge(ak, 100, 5)],
        BASE + 3000,
        b.mr.rkey,
    );
    post_send(
        &mut a,
        10,
        wr_opcode::RDMA_READ,
        &[sge(ak, 500, 5)],
        BASE + 3000,
        b.mr.rkey,
    );
    engine.poll();
    let ca = completions(&mut a);
    assert_eq!(
        ca.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        vec![(9, 0), (10, 0)]
    );
    let mut got = [0u8; 5];
    a.file.read_exact_at(&mut got, BASE + 500).unwrap();
    assert_eq!(&got, b"hello");
    assert!(completions(&mut b).is_empty());
}

#[test]
fn bad_keys_fail_the_work_request_and_flush_the_queue() {
    let mut engine = Engine::new(false);
    let (mut a, b) = pair(&mut engine);
    let (ak, bk, a_rkey) = (a.mr.lkey, b.mr.lkey, a.mr.rkey);
    // b's lkey is nothing in a's table.
    let foreign = sge(bk, 0, 8);
    post_recv(&mut a, 1, sge(ak, 0, 8));
    post_send(&mut a, 2, wr_opcode::SEND, &[foreign], 0, 0);
    post_send(&mut a, 3, wr_opcode::SEND, &[sge(ak, 0, 8)], 0, 0);
    engine.poll();
    engine.poll();
    let ca = completions(&mut a);
    let statuses: Vec<(u64, u32)> = ca.iter().map(|c| (c.wr_id, c.status)).collect();
    assert_eq!(statuses[0], (2, wc_status::LOC_PROT_ERR), "{statuses:?}");
    assert!(
        statuses.contains(&(3, wc_status::WR_FLUSH_ERR)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&(1, wc_status::WR_FLUSH_ERR)),
        "{statuses:?}"
    );
    // a's own rkey is nothing in b's table: REM_ACCESS_ERR, and both QPs go to ERR.
    connect_again(&mut engine, &a, &b);
    post_send(
        &mut a,
        4,
        wr_opcode::RDMA_WRITE,
        &[sge(ak, 0, 8)],
        BASE,
        a_rkey,
    );
    engine.poll();
    let ca = completions(&mut a);
    assert_eq!((ca[0].wr_id, ca[0].status), (4, wc_status::REM_ACCESS_ERR));
    let q: freeflow_proto::verbs::qp::QpQueried = ok(
        &mut engine,
        b.id,
        &b.conn,
        op::QUERY_QP,
        &ObjectHandle { handle: b.qp }.to_vec(),
    );
    assert_eq!(q.attr.qp_state, QpState::Err as u8);
}

fn connect_again(engine: &mut Engine, a: &Side, b: &Side) {
    for s in [a, b] {
        let reset = QpAttr {
            qp_state: QpState::Reset as u8,
            ..QpAttr::default()
        };
        assert_eq!(modify(engine, s, mask::STATE, reset), status::OK);
    }
    connect(engine, a, b.ip, b.qpn, 7);
    connect(engine, b, a.ip, a.qpn, 7);
}

#[test]
fn modify_checks_masks_and_destinations() {
    let mut engine = Engine::new(false);
    let a = side(&mut engine, 1, [10, 32, 0, 2], "blue", 16);
    let _red = side(&mut engine, 2, [10, 32, 0, 9], "red", 16);
    let init = QpAttr {
        qp_state: QpState::Init as u8,
        port_num: 1,
        ..QpAttr::default()
    };
    // A missing required bit, an extra bit, port 2: EINVAL; nothing changes.
    assert_eq!(
        modify(&mut engine, &a, mask::STATE | mask::PORT, init),
        VerbsStatus::Invalid as u16
    );
    let full = INIT_MASK;
    assert_eq!(
        modify(&mut engine, &a, full | mask::QKEY, init),
        VerbsStatus::Invalid as u16
    );
    let port2 = QpAttr {
        port_num: 2,
        ..init
    };
    assert_eq!(
        modify(&mut engine, &a, full, port2),
        VerbsStatus::Invalid as u16
    );
    assert_eq!(modify(&mut engine, &a, full, init), status::OK);
    // RTR towards another tenant's container, or an address nobody has: ENETUNREACH.
    let rtr = |ip| QpAttr {
        qp_state: QpState::Rtr as u8,
        path_mtu: 3,
        is_global: 1,
        dgid: gid(ip),
        dest_qp_num: 5,
        ..QpAttr::default()
    };
    let m = RTR_MASK;
    for ip in [[10, 32, 0, 9], [10, 32, 7, 7]] {
        assert_eq!(
            modify(&mut engine, &a, m, rtr(ip)),
            VerbsStatus::Unreachable as u16
        );
    }
    assert_eq!(modify(&mut engine, &a, m, rtr(a.ip)), status::OK);
    // Handles are per context: the same number in another context names that context's own
    // QP (still in RESET), never a's (now in RTR); a number it does not have is EINVAL.
    let (st, reply) = call(
        &mut engine,
        AttachmentId(2),
        &a.conn,
        op::QUERY_QP,
        &ObjectHandle { handle: a.qp }.to_vec(),
    );
    assert_eq!(st, status::OK);
    let q = freeflow_proto::verbs::qp::QpQueried::decode(&reply).unwrap();
    assert_eq!(q.attr.qp_state, QpState::Reset as u8);
    let (st, _) = call(
        &mut engine,
        AttachmentId(2),
        &a.conn,
        op::QUERY_QP,
        &ObjectHandle { handle: a.qp + 1 }.to_vec(),
    );
    assert_eq!(st, VerbsStatus::BadHandle as u16);
}

#[test]
fn a_full_cq_holds_the_queue_back_without_losing_completions() {
    let mut engine = Engine::new(false);
    let (mut a, mut b) = pair_with_cqs_of(&mut engine, 16);
    let ak = a.mr.lkey;
    for i in 0..40 {
        post_send(
            &mut a,
            i,
            wr_opcode::RDMA_WRITE,
            &[sge(ak, 0, 8)],
            BASE,
            b.mr.rkey,
        );
    }
    let mut seen = Vec::new();
    for _ in 0..10 {
        engine.poll();
        engine.poll();
        let c = completions(&mut a);
        assert!(c.len() <= 16, "{} completions in a 16-entry CQ", c.len());
        seen.extend(c.iter().map(|c| (c.wr_id, c.status)));
    }
    assert_eq!(seen, (0..40).map(|i| (i, 0)).collect::<Vec<_>>());
    let _ = &mut b;
}

#[test]
fn a_corrupt_ring_breaks_only_its_owner() {
    let mut engine = Engine::new(false);
    let (a, mut b) = pair(&mut engine);
    corrupt_tail(&a.sq);
    engine.poll();
    let broken = take_only_broken(&mut engine, a.id);
    assert!(
        broken[0].1.contains("ring index out of bounds"),
        "{broken:?}"
    );
    // b is unharmed: a QP of its own, connected to itself, still works.
    self_loop_works(&mut engine, &mut b);
    let _ = (&a.shim, &b.cq, &b.pd);
}

/// Moves a ring's tail a million slots on (the shim's side breaking the ring protocol).
fn corrupt_tail(ring: &Producer) {
    let tail = &ring.memory().control().tail.0;
    tail.store(
        tail.load(std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1_000_000),
        std::sync::atomic::Ordering::Release,
    );
}

/// The engine's broken attachments, which must be `id` alone; closes it.
fn take_only_broken(engine: &mut Engine, id: AttachmentId) -> Vec<(AttachmentId, String)> {
    let broken = engine.take_broken();
    assert_eq!(broken.len(), 1, "{broken:?}");
    assert_eq!(broken[0].0, id);
    engine.close(id);
    broken
}

/// `s`'s QP, connected to itself again, receives what it sends.
fn self_loop_works(engine: &mut Engine, s: &mut Side) {
    let k = s.mr.lkey;
    connect_again_self(engine, s);
    post_recv(s, 1, sge(k, 0, 8));
    post_send(s, 2, wr_opcode::SEND, &[sge(k, 8, 8)], 0, 0);
    engine.poll();
    let cb = completions(s);
    assert_eq!(cb.len(), 2, "{cb:?}");
    assert!(cb.iter().all(|c| c.status == 0));
}

fn connect_again_self(engine: &mut Engine, s: &Side) {
    let reset = QpAttr {
        qp_state: QpState::Reset as u8,
        ..QpAttr::default()
    };
    assert_eq!(modify(engine, s, mask::STATE, reset), status::OK);
    connect(engine, s, s.ip, s.qpn, 7);
}

/// `ibv_resize_cq` as the shim does it: the request, then the new ring from the connection.
fn resize(engine: &mut Engine, s: &mut Side, cqe: u32) -> Result<u32, u16> {
    let body = freeflow_proto::verbs::ResizeCq { cq: s.cq, cqe }.to_vec();
    let (st, reply) = call(engine, s.id, &s.conn, op::RESIZE_CQ, &body);
    if st != status::OK {
        // A refused resize passes no file.
        let mut buf = [0u8; 32];
        assert!(fdpass::recv_with_fds(s.shim.as_fd(), &mut buf, libc::MSG_DONTWAIT).is_err());
        return Err(st);
    }
    let created = CqCreated::decode(&reply).unwrap();
    assert_eq!(created.cq, s.cq);
    let region = queue_file(&s.shim, QueueFileKind::Cq, s.cq);
    s.cq_ring = Consumer::new(region.ring(0).unwrap());
    s._regions.push(region);
    Ok(created.cqe)
}

fn write_ids(s: &mut Side, peer: &Side, ids: std::ops::Range<u64>) {
    let k = s.mr.lkey;
    for i in ids {
        post_send(
            s,
            i,
            wr_opcode::RDMA_WRITE,
            &[sge(k, 0, 8)],
            BASE,
            peer.mr.rkey,
        );
    }
}

#[test]
fn resizing_a_cq_keeps_its_pending_completions_in_order() {
    let mut engine = Engine::new(false);
    let (mut a, b) = pair_with_cqs_of(&mut engine, 16);
    write_ids(&mut a, &b, 0..10);
    engine.poll();
    // Two polled, eight pending.
    let mut slot = [0u8; 64];
    for want in 0..2 {
        assert!(a.cq_ring.pop(&mut slot).unwrap());
        assert_eq!(Cqe::decode(&slot).wr_id, want);
    }
    a.cq_ring.release();
    // Below the pending count, zero and beyond max_cqe: EINVAL, the CQ unchanged.
    for cqe in [7, 0, limits::MAX_CQE + 1] {
        assert_eq!(
            resize(&mut engine, &mut a, cqe),
            Err(VerbsStatus::Invalid as u16)
        );
    }
    // Down to exactly the pending count (granted: the smallest ring).
    assert_eq!(resize(&mut engine, &mut a, 8), Ok(16));
    // Completions produced after the resize come after the old ones, in the new ring.
    write_ids(&mut a, &b, 10..14);
    engine.poll();
    let ids: Vec<u64> = completions(&mut a).iter().map(|c| c.wr_id).collect();
    assert_eq!(ids, (2..14).collect::<Vec<_>>());
    // Up: a larger ring holds more than the old one could.
    assert_eq!(resize(&mut engine, &mut a, 100), Ok(128));
    for batch in [14..64, 64..114] {
        write_ids(&mut a, &b, batch);
        for _ in 0..4 {
            engine.poll();
        }
    }
    let got = completions(&mut a);
    assert_eq!(got.len(), 100);
    assert!(got
        .iter()
        .zip(14..)
        .all(|(c, i)| c.wr_id == i && c.status == 0));
    // Another context's handle names nothing here.
    let (st, _) = call(
        &mut engine,
        b.id,
        &b.conn,
        op::RESIZE_CQ,
        &freeflow_proto::verbs::ResizeCq {
            cq: a.cq + 100,
            cqe: 16,
        }
        .to_vec(),
    );
    assert_eq!(st, VerbsStatus::BadHandle as u16);
}

#[test]
fn a_resize_counts_the_completions_of_sends_posted_before_it() {
    let mut engine = Engine::new(false);
    let (mut a, b) = pair_with_cqs_of(&mut engine, 16);
    // Posted, no pass of the shard in between: the resize itself executes them first, as
    // the program's order says (rdma-core's test_resize_cq posts, then shrinks).
    write_ids(&mut a, &b, 0..10);
    assert_eq!(
        resize(&mut engine, &mut a, 9),
        Err(VerbsStatus::Invalid as u16)
    );
    assert_eq!(resize(&mut engine, &mut a, 10), Ok(16));
    let ids: Vec<u64> = completions(&mut a).iter().map(|c| c.wr_id).collect();
    assert_eq!(ids, (0..10).collect::<Vec<_>>());
}

#[test]
fn no_completion_is_lost_when_a_full_cq_is_resized_meanwhile() {
    let mut engine = Engine::new(false);
    let (mut a, b) = pair_with_cqs_of(&mut engine, 16);
    // 60 writes into a 16-entry CQ: the QP waits for room; resizes in between, some up, some
    // down, with completions pending each time.
    write_ids(&mut a, &b, 0..60);
    let mut seen = Vec::new();
    let mut slot = [0u8; 64];
    for (round, cqe) in [16u32, 40, 16, 64, 20, 16]
        .into_iter()
        .cycle()
        .take(40)
        .enumerate()
    {
        engine.poll();
        // Take a few, leave the rest pending.
        for _ in 0..(round % 5) {
            if a.cq_ring.pop(&mut slot).unwrap() {
                seen.push(Cqe::decode(&slot).wr_id);
            }
        }
        a.cq_ring.release();
        match resize(&mut engine, &mut a, cqe) {
            Ok(granted) => assert!(granted >= cqe),
            Err(st) => assert_eq!(st, VerbsStatus::Invalid as u16),
        }
        if seen.len() == 60 {
            break;
        }
    }
    for _ in 0..10 {
        engine.poll();
        seen.extend(completions(&mut a).iter().map(|c| c.wr_id));
    }
    assert_eq!(seen, (0..60).collect::<Vec<_>>());
}

#[test]
fn a_request_for_notification_survives_a_resize() {
    let mut engine = Engine::new(false);
    let (mut a, b) = pair_with_cqs_of(&mut engine, 16);
    // Not armed: the new ring is not either.
    assert_eq!(resize(&mut engine, &mut a, 32), Ok(32));
    assert!(!a.cq_ring.is_parked());
    // Armed (ibv_req_notify_cq) and not fired: the arm moves to the new ring, and the next
    // completion claims it there.
    a.cq_ring.request_wake();
    assert_eq!(resize(&mut engine, &mut a, 64), Ok(64));
    assert!(a.cq_ring.is_parked());
    write_ids(&mut a, &b, 0..1);
    engine.poll();
    assert!(!a.cq_ring.is_parked(), "the completion claimed the wake-up");
    assert_eq!(completions(&mut a).len(), 1);
}

// ---- shared receive queues ----------------------------------------------------------------

use freeflow_proto::verbs::srq::{self as srq_wire, CreateSrq, ModifySrq, SrqAttr, SrqCreated};

/// An SRQ of `s`'s context, in PD `pd`, with the shim's producing end of its ring.
fn create_srq(engine: &mut Engine, s: &mut Side, pd: u32, max_wr: u32) -> (u32, Producer) {
    let created: SrqCreated = ok(
        engine,
        s.id,
        &s.conn,
        op::CREATE_SRQ,
        &CreateSrq {
            pd,
            max_wr,
            max_sge: 2,
            srq_limit: 0,
        }
        .to_vec(),
    );
    assert!(created.attr.max_wr >= max_wr && created.attr.max_sge >= 2);
    let region = queue_file(&s.shim, QueueFileKind::Srq, created.srq);
    let ring = Producer::new(region.ring(0).unwrap());
    s._regions.push(region);
    (created.srq, ring)
}

/// A QP of `s`'s context on its CQ taking its receives from SRQ `srq`: (handle, number).
fn create_srq_qp(engine: &mut Engine, s: &mut Side, srq: u32) -> (u32, u32) {
    let body = CreateQp {
        pd: s.pd,
        send_cq: s.cq,
        recv_cq: s.cq,
        srq,
        qp_type: freeflow_proto::verbs::qp::QPT_RC,
        sq_sig_all: 0,
        cap: QpCap {
            max_send_wr: 16,
            max_recv_wr: 16,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        },
    }
    .to_vec();
    let (st, reply) = call(engine, s.id, &s.conn, op::CREATE_QP, &body);
    assert_eq!(st, status::OK);
    let qp = QpCreated::decode(&reply).unwrap();
    // With an SRQ the QP has no receive capacity of its own (rdma-core reports 0).
    assert_eq!((qp.cap.max_recv_wr, qp.cap.max_recv_sge), (0, 0));
    s._regions
        .push(queue_file(&s.shim, QueueFileKind::Qp, qp.qp));
    (qp.qp, qp.qpn)
}

/// `s` with its QP handle replaced (the helpers above modify `s.qp`).
fn as_qp(s: &Side, qp: u32) -> Side {
    let (conn, shim) = (s.conn.try_clone().unwrap(), s.shim.try_clone().unwrap());
    Side {
        id: s.id,
        ip: s.ip,
        conn,
        shim,
        file: s.file.try_clone().unwrap(),
        pd: s.pd,
        mr: s.mr,
        cq: s.cq,
        cq_ring: Consumer::new(s.cq_ring.memory().clone()),
        qp,
        qpn: 0,
        sq: Producer::new(s.sq.memory().clone()),
        rq: Producer::new(s.rq.memory().clone()),
        _regions: Vec::new(),
    }
}

fn push_recv(ring: &mut Producer, wr_id: u64, sge: Sge) {
    let mut slot = vec![0u8; ring.slot_size()];
    RecvWqe::write_header(wr_id, 1, &mut slot);
    sge.write(&mut slot[RECV_WQE_HEADER..]);
    assert!(ring.push(&slot).unwrap());
    let _ = ring.publish();
}

/// Senders a and b, and r whose two QPs r1 (connected to a) and r2 (to b) share one SRQ.
struct SrqSite {
    a: Side,
    b: Side,
    r: Side,
    srq: u32,
    srq_ring: Producer,
    r1: (u32, u32),
    r2: (u32, u32),
}

fn srq_site(engine: &mut Engine, rnr_retry: u8) -> SrqSite {
    let a = side(engine, 1, [10, 32, 0, 2], "blue", 64);
    let b = side(engine, 2, [10, 32, 0, 3], "blue", 64);
    let mut r = side(engine, 3, [10, 32, 0, 4], "blue", 64);
    let pd = r.pd;
    let (srq, srq_ring) = create_srq(engine, &mut r, pd, 8);
    let r1 = create_srq_qp(engine, &mut r, srq);
    let r2 = create_srq_qp(engine, &mut r, srq);
    connect(engine, &a, r.ip, r1.1, rnr_retry);
    connect(engine, &as_qp(&r, r1.0), a.ip, a.qpn, rnr_retry);
    connect(engine, &b, r.ip, r2.1, rnr_retry);
    connect(engine, &as_qp(&r, r2.0), b.ip, b.qpn, rnr_retry);
    SrqSite {
        a,
        b,
        r,
        srq,
        srq_ring,
        r1,
        r2,
    }
}

fn send(s: &mut Side, wr_id: u64, offset: u64, len: u32) {
    let k = s.mr.lkey;
    post_send(s, wr_id, wr_opcode::SEND, &[sge(k, offset, len)], 0, 0);
}

#[test]
fn an_srq_feeds_two_qps_in_post_order() {
    let mut engine = Engine::new(false);
    let mut t = srq_site(&mut engine, 7);
    let rk = t.r.mr.lkey;
    t.a.file.write_all_at(b"from a", BASE).unwrap();
    t.b.file.write_all_at(b"from b", BASE).unwrap();
    for i in 0..4 {
        push_recv(&mut t.srq_ring, 10 + i, sge(rk, 1000 + i * 100, 100));
    }
    send(&mut t.a, 1, 0, 6);
    engine.poll();
    send(&mut t.b, 2, 0, 6);
    engine.poll();
    send(&mut t.a, 3, 0, 6);
    engine.poll();
    let got: Vec<(u64, u32, u32, u32)> = completions(&mut t.r)
        .iter()
        .map(|c| (c.wr_id, c.status, c.qp_num, c.byte_len))
        .collect();
    // Receives are taken in the order they were posted, whichever QP the message came to.
    assert_eq!(
        got,
        vec![(10, 0, t.r1.1, 6), (11, 0, t.r2.1, 6), (12, 0, t.r1.1, 6)]
    );
    let mut data = [0u8; 6];
    for (offset, want) in [(1000, b"from a"), (1100, b"from b"), (1200, b"from a")] {
        t.r.file.read_exact_at(&mut data, BASE + offset).unwrap();
        assert_eq!(&data, want);
    }
    assert_eq!(completions(&mut t.a).len(), 2);
    assert_eq!(completions(&mut t.b).len(), 1);

    // One receive left: the next SEND takes it, the one after finds the SRQ empty and waits
    // (RNR, rnr_retry 7: for ever) until a receive is posted.
    send(&mut t.b, 4, 0, 6);
    engine.poll();
    send(&mut t.a, 5, 0, 6);
    for _ in 0..3 {
        engine.poll();
    }
    let got: Vec<u64> = completions(&mut t.r).iter().map(|c| c.wr_id).collect();
    assert_eq!(got, vec![13]);
    assert_eq!(completions(&mut t.a).len(), 0, "a's SEND waits in RNR");
    let plan = engine.prepare_park();
    assert!(!plan.busy && plan.deadline.is_some());
    // The SRQ's ring is flagged: posting to it rings the doorbell.
    let mut slot = vec![0u8; t.srq_ring.slot_size()];
    RecvWqe::write_header(14, 1, &mut slot);
    sge(rk, 2000, 100).write(&mut slot[RECV_WQE_HEADER..]);
    assert!(t.srq_ring.push(&slot).unwrap());
    assert_eq!(t.srq_ring.publish(), freeflow_proto::Wake::Needed);
    engine.unpark();
    engine.poll();
    let got: Vec<(u64, u32)> = completions(&mut t.r)
        .iter()
        .map(|c| (c.wr_id, c.qp_num))
        .collect();
    assert_eq!(got, vec![(14, t.r1.1)]);
    let ca = completions(&mut t.a);
    assert_eq!((ca[0].wr_id, ca[0].status), (5, 0));
}

#[test]
fn an_empty_srq_is_receiver_not_ready() {
    let mut engine = Engine::new(false);
    let mut t = srq_site(&mut engine, 0);
    send(&mut t.a, 1, 0, 6);
    engine.poll();
    let ca = completions(&mut t.a);
    assert_eq!(
        (ca[0].wr_id, ca[0].status),
        (1, wc_status::RNR_RETRY_EXC_ERR)
    );
    assert!(completions(&mut t.r).is_empty());
}

#[test]
fn a_qp_in_error_leaves_the_srq_to_the_others() {
    let mut engine = Engine::new(false);
    let mut t = srq_site(&mut engine, 7);
    let rk = t.r.mr.lkey;
    push_recv(&mut t.srq_ring, 20, sge(rk, 0, 64));
    push_recv(&mut t.srq_ring, 21, sge(rk, 64, 64));
    // r1 to ERR: nothing of the SRQ is flushed.
    let err = QpAttr {
        qp_state: QpState::Err as u8,
        ..QpAttr::default()
    };
    assert_eq!(
        modify(&mut engine, &as_qp(&t.r, t.r1.0), mask::STATE, err),
        status::OK
    );
    for _ in 0..3 {
        engine.poll();
    }
    assert!(
        completions(&mut t.r).is_empty(),
        "a QP going to ERR flushed SRQ receives"
    );
    // r2 still gets them, in order.
    send(&mut t.b, 1, 0, 8);
    send(&mut t.b, 2, 0, 8);
    engine.poll();
    let got = outcomes(&mut t.r);
    assert_eq!(got, vec![(20, 0, t.r2.1), (21, 0, t.r2.1)]);
    // A bad key in an SRQ receive: LOC_PROT_ERR for the QP that took it (which goes to ERR),
    // REM_OP_ERR at the sender.
    push_recv(&mut t.srq_ring, 22, sge(rk ^ 0x55, 0, 64));
    push_recv(&mut t.srq_ring, 23, sge(rk, 0, 64));
    send(&mut t.b, 3, 0, 8);
    engine.poll();
    let got = outcomes(&mut t.r);
    assert_eq!(got, vec![(22, wc_status::LOC_PROT_ERR, t.r2.1)]);
    let cb: Vec<(u64, u32)> = completions(&mut t.b)
        .iter()
        .map(|c| (c.wr_id, c.status))
        .collect();
    assert_eq!(cb.last(), Some(&(3, wc_status::REM_OP_ERR)));
    // Both of r's QPs are in ERR now, and receive 23 is still queued in the SRQ, unflushed.
    for _ in 0..3 {
        engine.poll();
    }
    assert!(completions(&mut t.r).is_empty());
    let _ = t.srq;
}

#[test]
fn srq_receives_use_the_srqs_protection_domain() {
    let mut engine = Engine::new(false);
    let a = side(&mut engine, 1, [10, 32, 0, 2], "blue", 64);
    let mut r = side(&mut engine, 3, [10, 32, 0, 4], "blue", 64);
    // The SRQ in a second PD, where r's region (in its first PD) is no key.
    let pd2 = ok::<PdCreated>(&mut engine, r.id, &r.conn, op::ALLOC_PD, &[]).pd;
    let (srq, mut ring) = create_srq(&mut engine, &mut r, pd2, 4);
    let r1 = create_srq_qp(&mut engine, &mut r, srq);
    connect(&mut engine, &a, r.ip, r1.1, 7);
    connect(&mut engine, &as_qp(&r, r1.0), a.ip, a.qpn, 7);
    let mut a = a;
    push_recv(&mut ring, 1, sge(r.mr.lkey, 0, 64));
    send(&mut a, 2, 0, 8);
    engine.poll();
    let got: Vec<(u64, u32)> = completions(&mut r)
        .iter()
        .map(|c| (c.wr_id, c.status))
        .collect();
    assert_eq!(got, vec![(1, wc_status::LOC_PROT_ERR)]);
}

#[test]
fn an_armed_srq_limit_raises_one_event_when_the_posted_receives_drop_below_it() {
    let mut engine = Engine::new(false);
    let mut t = srq_site(&mut engine, 7);
    // The context's event pipe: its read end comes on the attach connection; only once.
    let r = &t.r;
    assert_eq!(
        status_of(&mut engine, r, op::CREATE_ASYNC_EVENTS, &[]),
        status::OK
    );
    let mut buf = [0u8; 32];
    let got = fdpass::recv_with_fds(r.shim.as_fd(), &mut buf, libc::MSG_DONTWAIT).unwrap();
    let msg = QueueFileMsg::decode(&buf[..got.len]).unwrap();
    assert_eq!((msg.kind, msg.handle), (QueueFileKind::AsyncEvents, 0));
    let events = std::fs::File::from(got.fds.into_iter().next().unwrap());
    assert_eq!(
        status_of(&mut engine, r, op::CREATE_ASYNC_EVENTS, &[]),
        VerbsStatus::Invalid as u16
    );
    let pending = |events: &std::fs::File| {
        let mut fd = [freeflow_os::poll::PollFd::new(events.as_fd(), libc::POLLIN)];
        freeflow_os::poll::poll(&mut fd, Some(std::time::Duration::ZERO)).unwrap();
        fd[0].revents() != 0
    };
    let rk = t.r.mr.lkey;
    for i in 0..4 {
        push_recv(&mut t.srq_ring, 10 + i, sge(rk, 1000 + i * 100, 100));
    }
    let arm = ModifySrq {
        srq: t.srq,
        attr_mask: srq_wire::mask::LIMIT,
        max_wr: 0,
        srq_limit: 3,
    }
    .to_vec();
    assert_eq!(
        status_of(&mut engine, &t.r, op::MODIFY_SRQ, &arm),
        status::OK
    );
    // 3 left: not below the limit.
    send(&mut t.a, 1, 0, 6);
    engine.poll();
    assert!(!pending(&events));
    // 2 left: the event, and the limit is disarmed.
    send(&mut t.b, 2, 0, 6);
    engine.poll();
    assert!(pending(&events), "no event after the limit was crossed");
    let mut record = [0u8; 16];
    let n = std::io::Read::read(&mut &events, &mut record).unwrap();
    assert_eq!(
        AsyncEventRecord::decode(&record[..n]).unwrap(),
        AsyncEventRecord {
            event_type: freeflow_proto::verbs::async_event::event_type::SRQ_LIMIT_REACHED,
            handle: t.srq
        }
    );
    let attr: SrqAttr = ok(
        &mut engine,
        t.r.id,
        &t.r.conn,
        op::QUERY_SRQ,
        &ObjectHandle { handle: t.srq }.to_vec(),
    );
    assert_eq!(attr.srq_limit, 0);
    // One shot: the next receive taken raises nothing.
    send(&mut t.a, 3, 0, 6);
    engine.poll();
    assert!(!pending(&events));
    assert_eq!(completions(&mut t.r).len(), 3);
}

#[test]
fn srq_verbs_check_handles_limits_and_users() {
    let mut engine = Engine::new(false);
    let mut t = srq_site(&mut engine, 7);
    let r = &t.r;
    let h = |handle| ObjectHandle { handle }.to_vec();
    // Query.
    let attr: SrqAttr = ok(&mut engine, r.id, &r.conn, op::QUERY_SRQ, &h(t.srq));
    assert_eq!((attr.max_wr, attr.srq_limit), (16, 0));
    // Modify: limits 0 and 4 accepted (query shows the armed one); a limit above max_wr,
    // resizing and unknown bits are EINVAL.
    let m = |attr_mask, max_wr, srq_limit| {
        ModifySrq {
            srq: t.srq,
            attr_mask,
            max_wr,
            srq_limit,
        }
        .to_vec()
    };
    for (body, want) in [
        (m(srq_wire::mask::LIMIT, 0, 0), status::OK),
        (m(srq_wire::mask::LIMIT, 0, 4), status::OK),
        (m(srq_wire::mask::LIMIT, 0, 17), VerbsStatus::Invalid as u16),
        (
            m(srq_wire::mask::MAX_WR, 32, 0),
            VerbsStatus::Invalid as u16,
        ),
        (m(1 << 5, 0, 0), VerbsStatus::Invalid as u16),
    ] {
        assert_eq!(status_of(&mut engine, r, op::MODIFY_SRQ, &body), want);
    }
    // Creation limits.
    for (max_wr, max_sge) in [
        (0, 1),
        (limits::MAX_SRQ_WR + 1, 1),
        (4, limits::MAX_SRQ_SGE + 1),
    ] {
        let body = CreateSrq {
            pd: r.pd,
            max_wr,
            max_sge,
            srq_limit: 0,
        }
        .to_vec();
        assert_eq!(
            status_of(&mut engine, r, op::CREATE_SRQ, &body),
            VerbsStatus::Invalid as u16
        );
    }
    // Another context's SRQ handle is nothing there: for a query, and for a QP.
    let a = &t.a;
    assert_eq!(
        status_of(&mut engine, a, op::QUERY_SRQ, &h(t.srq)),
        VerbsStatus::BadHandle as u16
    );
    let body = CreateQp {
        pd: a.pd,
        send_cq: a.cq,
        recv_cq: a.cq,
        srq: t.srq,
        qp_type: freeflow_proto::verbs::qp::QPT_RC,
        ..CreateQp::default()
    }
    .to_vec();
    assert_eq!(
        status_of(&mut engine, a, op::CREATE_QP, &body),
        VerbsStatus::BadHandle as u16
    );
    // Busy while QPs use it, and its PD while it exists; in this order.
    let r = &t.r;
    let pd = DeallocPd { pd: r.pd }.to_vec();
    for (opcode, body, want) in [
        (op::DESTROY_SRQ, h(t.srq), VerbsStatus::Busy as u16),
        (op::DESTROY_QP, h(t.r1.0), status::OK),
        (op::DESTROY_QP, h(t.r2.0), status::OK),
        (op::DESTROY_QP, h(r.qp), status::OK),
        (op::DEALLOC_PD, pd, VerbsStatus::Busy as u16),
        (op::DESTROY_SRQ, h(t.srq), status::OK),
        (op::DESTROY_SRQ, h(t.srq), VerbsStatus::BadHandle as u16),
    ] {
        assert_eq!(
            status_of(&mut engine, r, opcode, &body),
            want,
            "opcode {opcode:#x}"
        );
    }
    let _ = &mut t.srq_ring;
}

#[test]
fn a_corrupt_srq_ring_breaks_only_its_owner() {
    let mut engine = Engine::new(false);
    let mut t = srq_site(&mut engine, 7);
    corrupt_tail(&t.srq_ring);
    send(&mut t.a, 1, 0, 8);
    engine.poll();
    take_only_broken(&mut engine, t.r.id);
    // a and b still work: b to itself.
    let _ = (&t.a, &t.srq);
    self_loop_works(&mut engine, &mut t.b);
}

/// The engine's index of `s`'s QP.
fn qp_index(engine: &Engine, s: &Side) -> crate::verbs::ids::QpId {
    engine.contexts[&s.id].qps[&s.qp]
}

/// A request that finds the engine's own tables in disagreement (a QP its context names is not
/// in the engine's table: a bug, simulated here) gets an error reply and ends its attachment
/// alone; before, the shard panicked ("tables agree") and took every container with it.
#[test]
fn a_request_finding_the_tables_in_disagreement_ends_only_its_attachment() {
    let mut engine = Engine::new(false);
    let (a, mut b) = pair(&mut engine);
    let index = qp_index(&engine, &a);
    engine.qps.remove(index);
    let handle = ObjectHandle { handle: a.qp };
    for request in [op::QUERY_QP, op::DESTROY_QP] {
        let status = status_of(&mut engine, &a, request, &handle.to_vec());
        assert_eq!(status, VerbsStatus::Invalid as u16, "opcode {request:#x}");
    }
    let broken = take_only_broken(&mut engine, a.id);
    assert!(
        broken[0].1.contains("verbs engine fault: no queue pair"),
        "{broken:?}"
    );
    self_loop_works(&mut engine, &mut b);
    let _ = (&a.shim, &b.cq, &b.pd);
}

/// The data path's passes over a QP that is not there do nothing (there is no owner left to
/// end); before, they panicked ("caller checked").
#[test]
fn passes_over_a_vanished_qp_do_nothing() {
    let mut engine = Engine::new(false);
    let (a, mut b) = pair(&mut engine);
    let index = qp_index(&engine, &a);
    engine.qps.remove(index);
    assert_eq!(engine.run_send_queue(index, &mut None), 0);
    assert_eq!(engine.flush(index, &mut None), 0);
    assert!(engine.take_broken().is_empty());
    self_loop_works(&mut engine, &mut b);
    let _ = (&a.shim, &b.cq, &b.pd);
}

/// A context of the container whose network namespace is `netns`, with nothing in it yet: its
/// id and the router's end of its attach connection (the shim's end is returned too, to keep
/// the queue files passed on it).
fn bare_context(engine: &mut Engine, number: u32, netns: u64) -> (AttachmentId, OwnedFd, OwnedFd) {
    let id = AttachmentId(number);
    engine.open(
        id,
        ContainerEntry {
            name: format!("n{netns}"),
            tenant: "blue".into(),
            ip: [10, 32, 1, netns as u8].into(),
            netns: NetnsId { dev: 0, ino: netns },
        },
    );
    let (conn, shim) = test_seqpacket_pair();
    (id, conn, shim)
}

/// `ibv_create_comp_channel` on context `id`: its handle, or the reply's status.
fn new_channel(engine: &mut Engine, id: AttachmentId, conn: &OwnedFd) -> Result<u32, u16> {
    match call(engine, id, conn, op::CREATE_COMP_CHANNEL, &[]) {
        (status::OK, reply) => Ok(ObjectHandle::decode(&reply).unwrap().handle),
        (status, _) => Err(status),
    }
}

/// `ibv_create_cq` of 16 entries on context `id` (on completion channel `channel`, 0 for
/// none): its handle, or the reply's status.
fn new_cq(engine: &mut Engine, id: AttachmentId, conn: &OwnedFd, channel: u32) -> Result<u32, u16> {
    let body = CreateCq {
        cqe: 16,
        channel,
        comp_vector: 0,
        flags: 0,
    };
    match call(engine, id, conn, op::CREATE_CQ, &body.to_vec()) {
        (status::OK, reply) => Ok(CqCreated::decode(&reply).unwrap().cq),
        (status, _) => Err(status),
    }
}

const NO_RESOURCES: Result<u32, u16> = Err(VerbsStatus::NoResources as u16);

/// Container A's two contexts share one budget of descriptors and mappings: once their
/// channels and CQs hold it all, A's next creation fails with the resource error (ENOMEM from
/// the shim) while container B creates channels and CQs as if A did nothing; what A destroys
/// or closes is A's again.
#[test]
fn channels_and_cqs_of_one_container_draw_on_its_own_budget_only() {
    const BUDGET: usize = 8;
    let mut engine = Engine::with_budget(false, BUDGET);
    let (a1, a1_conn, _a1_shim) = bare_context(&mut engine, 1, 100);
    let (a2, a2_conn, _a2_shim) = bare_context(&mut engine, 2, 100);
    let (b, b_conn, _b_shim) = bare_context(&mut engine, 3, 200);
    let mut a1_channels = Vec::new();
    for _ in 0..4 {
        a1_channels.push(new_channel(&mut engine, a1, &a1_conn).unwrap());
    }
    let a1_cq = new_cq(&mut engine, a1, &a1_conn, a1_channels[0]).unwrap();
    for _ in 0..2 {
        new_channel(&mut engine, a2, &a2_conn).unwrap();
    }
    new_cq(&mut engine, a2, &a2_conn, 0).unwrap();
    // A holds its 8 units, over two contexts (each far below the per-context limits).
    assert_eq!(new_channel(&mut engine, a1, &a1_conn), NO_RESOURCES);
    assert_eq!(new_channel(&mut engine, a2, &a2_conn), NO_RESOURCES);
    assert_eq!(new_cq(&mut engine, a2, &a2_conn, 0), NO_RESOURCES);
    // B is untouched: its whole budget is there.
    let b_channel = new_channel(&mut engine, b, &b_conn).unwrap();
    for _ in 0..BUDGET / 2 - 1 {
        new_channel(&mut engine, b, &b_conn).unwrap();
    }
    for _ in 0..BUDGET / 2 {
        new_cq(&mut engine, b, &b_conn, b_channel).unwrap();
    }
    assert_eq!(new_cq(&mut engine, b, &b_conn, 0), NO_RESOURCES);
    // A destroys a channel: a unit for A again (not for B).
    let destroy = ObjectHandle {
        handle: a1_channels[3],
    };
    assert_eq!(
        call(
            &mut engine,
            a1,
            &a1_conn,
            op::DESTROY_COMP_CHANNEL,
            &destroy.to_vec()
        )
        .0,
        status::OK
    );
    assert_eq!(new_channel(&mut engine, b, &b_conn), NO_RESOURCES);
    new_cq(&mut engine, a2, &a2_conn, 0).unwrap();
    assert_eq!(new_channel(&mut engine, a1, &a1_conn), NO_RESOURCES);
    // A context that closes gives back all it held (3 channels and a CQ).
    let _ = a1_cq;
    engine.close(a1);
    for _ in 0..4 {
        new_channel(&mut engine, a2, &a2_conn).unwrap();
    }
    assert_eq!(new_channel(&mut engine, a2, &a2_conn), NO_RESOURCES);
}

/// Memory files, memory regions, QPs and SRQs count too: a container whose objects hold its
/// budget cannot add one of any kind, another container builds its own as before, and a
/// deregistered region is a unit back.
#[test]
fn every_descriptor_and_mapping_of_a_container_counts() {
    // A side holds 4 units: its memory file, a region, a CQ and a QP.
    let mut engine = Engine::with_budget(false, 6);
    let mut a = side(&mut engine, 1, [10, 32, 0, 2], "blue", 16);
    let pd = a.pd;
    create_srq(&mut engine, &mut a, pd, 16);
    let reg = RegMr {
        pd: a.pd,
        access: ALL,
        addr: BASE,
        length: PAGE_SIZE,
        iova: BASE,
        file: freeflow_proto::verbs::OWN_MEMORY_FILE,
        file_offset: 0,
    }
    .to_vec();
    let second: MrCreated = ok(&mut engine, a.id, &a.conn, op::REG_MR, &reg);
    let no_resources = VerbsStatus::NoResources as u16;
    assert_eq!(status_of(&mut engine, &a, op::REG_MR, &reg), no_resources);
    assert_eq!(new_cq(&mut engine, a.id, &a.conn, 0), NO_RESOURCES);
    let srq = CreateSrq {
        pd: a.pd,
        max_wr: 16,
        max_sge: 1,
        srq_limit: 0,
    };
    assert_eq!(
        status_of(&mut engine, &a, op::CREATE_SRQ, &srq.to_vec()),
        no_resources
    );
    let qp = CreateQp {
        pd: a.pd,
        send_cq: a.cq,
        recv_cq: a.cq,
        srq: 0,
        qp_type: freeflow_proto::verbs::qp::QPT_RC,
        sq_sig_all: 0,
        cap: QpCap {
            max_send_wr: 16,
            max_recv_wr: 16,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        },
    };
    assert_eq!(
        status_of(&mut engine, &a, op::CREATE_QP, &qp.to_vec()),
        no_resources
    );
    // Another container of the same tenant: its memory file, region, CQ and QP, and more.
    let mut b = side(&mut engine, 2, [10, 32, 0, 3], "blue", 16);
    let pd = b.pd;
    create_srq(&mut engine, &mut b, pd, 16);
    new_channel(&mut engine, b.id, &b.conn).unwrap();
    // A gives a region back: that unit is A's again.
    let dereg = DeregMr { mr: second.mr }.to_vec();
    assert_eq!(status_of(&mut engine, &a, op::DEREG_MR, &dereg), status::OK);
    new_channel(&mut engine, a.id, &a.conn).unwrap();
    assert_eq!(new_channel(&mut engine, a.id, &a.conn), NO_RESOURCES);
}

/// The budget is a sixteenth of the smaller of the router's open-file and mapping limits,
/// within its floor and ceiling.
#[test]
fn the_budget_is_a_share_of_the_routers_limits() {
    use super::budget::{budget_for, BUDGET_CEILING, BUDGET_FLOOR};
    assert_eq!(budget_for(20_000, 65_530), 1250);
    assert_eq!(budget_for(1 << 20, 65_530), 4095);
    assert_eq!(budget_for(1024, 65_530), BUDGET_FLOOR);
    assert_eq!(budget_for(0, 0), BUDGET_FLOOR);
    assert_eq!(budget_for(1 << 20, 1 << 30), BUDGET_CEILING);
    assert_eq!(budget_for(u64::MAX, u64::MAX), BUDGET_CEILING);
}

/// A UD side of tenant `tenant` in RTS with qkey `qkey`.
fn ud_side(engine: &mut Engine, number: u32, ip: [u8; 4], tenant: &str, qkey: u32) -> Side {
    let s = typed_side(
        engine,
        (number, ip, tenant, 64),
        freeflow_proto::verbs::qp::QPT_UD,
    );
    let init = QpAttr {
        qp_state: QpState::Init as u8,
        port_num: 1,
        qkey,
        ..QpAttr::default()
    };
    let steps = [
        (
            mask::STATE | mask::PKEY_INDEX | mask::PORT | mask::QKEY,
            init,
        ),
        (
            mask::STATE,
            QpAttr {
                qp_state: QpState::Rtr as u8,
                ..QpAttr::default()
            },
        ),
        (
            mask::STATE | mask::SQ_PSN,
            QpAttr {
                qp_state: QpState::Rts as u8,
                ..QpAttr::default()
            },
        ),
    ];
    for (m, attr) in steps {
        assert_eq!(modify(engine, &s, m, attr), status::OK);
    }
    s
}

/// An address handle of `s` to `ip` (hop limit 9), or the refusal's status.
fn create_ah(engine: &mut Engine, s: &Side, ip: [u8; 4]) -> Result<u32, u16> {
    let body = freeflow_proto::verbs::ah::CreateAh {
        pd: s.pd,
        dgid: gid(ip),
        hop_limit: 9,
        is_global: 1,
        port_num: 1,
        ..Default::default()
    }
    .to_vec();
    match call(engine, s.id, &s.conn, op::CREATE_AH, &body) {
        (status::OK, reply) => Ok(ObjectHandle::decode(&reply).unwrap().handle),
        (refused, _) => Err(refused),
    }
}

/// A signaled UD SEND of `len` bytes at offset 0 of `s`'s region.
fn post_ud(s: &mut Side, wr_id: u64, dest: freeflow_proto::verbs::work::UdDest, len: u32) {
    let mut slot = vec![0u8; s.sq.slot_size()];
    let mut h = SendWqeHeader {
        wr_id,
        opcode: wr_opcode::SEND,
        flags: send_flags::SIGNALED as u8,
        num_sge: 1,
        ..SendWqeHeader::default()
    };
    dest.put(&mut h);
    h.write(&mut slot);
    sge(s.mr.lkey, 0, len).write(&mut slot[SendWqeHeader::LEN..]);
    assert!(s.sq.push(&slot).unwrap());
    let _ = s.sq.publish();
}

#[test]
fn ud_datagrams_land_behind_the_grh_and_reach_no_other_tenant() {
    use freeflow_proto::verbs::grh;
    use freeflow_proto::verbs::work::{wc_flags, UdDest, GRH_LEN};
    let mut engine = Engine::new(false);
    let mut a = ud_side(&mut engine, 1, [10, 32, 0, 2], "blue", 7);
    let mut b = ud_side(&mut engine, 2, [10, 32, 0, 3], "blue", 7);
    let mut c = ud_side(&mut engine, 3, [10, 32, 0, 4], "red", 7);
    a.file.write_all_at(b"datagram", BASE).unwrap();
    let to_b = create_ah(&mut engine, &a, b.ip).unwrap();
    assert_eq!(
        create_ah(&mut engine, &a, c.ip),
        Err(VerbsStatus::Unreachable as u16)
    );
    let (bk, ck) = (b.mr.lkey, c.mr.lkey);
    post_recv(&mut b, 1, sge(bk, 1000, 1064));
    post_recv(&mut c, 2, sge(ck, 1000, 1064));
    let dest = |ah, remote_qpn, remote_qkey| UdDest {
        ah,
        remote_qpn,
        remote_qkey,
    };
    // To b: the GRH area, then the message.
    post_ud(&mut a, 10, dest(to_b, b.qpn, 7), 8);
    // c's QP number behind b's address, and a wrong qkey for b: dropped, sent all the same.
    post_ud(&mut a, 11, dest(to_b, c.qpn, 7), 8);
    post_ud(&mut a, 12, dest(to_b, b.qpn, 8), 8);
    engine.poll();
    assert_eq!(
        outcomes(&mut a),
        vec![(10, 0, a.qpn), (11, 0, a.qpn), (12, 0, a.qpn)]
    );
    assert!(completions(&mut c).is_empty());
    let got = completions(&mut b);
    assert_eq!(got.len(), 1);
    let r = got[0];
    assert_eq!(
        (r.wr_id, r.status, r.byte_len, r.src_qp, r.qp_num),
        (1, 0, GRH_LEN as u32 + 8, a.qpn, b.qpn)
    );
    assert_eq!(r.wc_flags & wc_flags::GRH, wc_flags::GRH);
    let mut area = [0u8; GRH_LEN + 8];
    b.file.read_exact_at(&mut area, BASE + 1000).unwrap();
    assert_eq!(&area[GRH_LEN..], b"datagram");
    let info = grh::parse(area[..GRH_LEN].try_into().unwrap()).unwrap();
    assert_eq!((info.sgid, info.dgid), (gid(a.ip), gid(b.ip)));
    assert_eq!(area[20 + 8], 9, "the hop limit is the TTL");
    // A handle a does not have, and a message beyond the MTU: the sender's errors.
    post_ud(&mut a, 13, dest(to_b + 100, b.qpn, 7), 8);
    engine.poll();
    assert_eq!(
        outcomes(&mut a),
        vec![(13, wc_status::LOC_QP_OP_ERR, a.qpn)]
    );
    let mut d = ud_side(&mut engine, 4, [10, 32, 0, 5], "blue", 7);
    let to_b = create_ah(&mut engine, &d, b.ip).unwrap();
    post_ud(&mut d, 14, dest(to_b, b.qpn, 7), 1025);
    engine.poll();
    assert_eq!(outcomes(&mut d), vec![(14, wc_status::LOC_LEN_ERR, d.qpn)]);
    assert!(completions(&mut b).is_empty());
}

#[test]
fn uc_drops_what_its_responder_does_not_take() {
    let mut engine = Engine::new(false);
    let qpt = freeflow_proto::verbs::qp::QPT_UC;
    let mut a = typed_side(&mut engine, (1, [10, 32, 0, 2], "blue", 64), qpt);
    let mut b = typed_side(&mut engine, (2, [10, 32, 0, 3], "blue", 64), qpt);
    for (s, peer) in [(&a, &b), (&b, &a)] {
        let [(_, init), (_, rtr), (_, rts)] = rc_pingpong_steps(peer.ip, peer.qpn, 0);
        let rtr_mask = mask::STATE | mask::AV | mask::PATH_MTU | mask::DEST_QPN | mask::RQ_PSN;
        assert_eq!(modify(&mut engine, s, INIT_MASK, init), status::OK);
        // RC's RTR attributes are not UC's.
        assert_ne!(modify(&mut engine, s, RTR_MASK, rtr), status::OK);
        assert_eq!(modify(&mut engine, s, rtr_mask, rtr), status::OK);
        assert_eq!(
            modify(&mut engine, s, mask::STATE | mask::SQ_PSN, rts),
            status::OK
        );
    }
    // No receive posted, a bad rkey: the sender completes, nothing arrives, nobody fails.
    let ak = a.mr.lkey;
    post_send(&mut a, 1, wr_opcode::SEND, &[sge(ak, 0, 8)], 0, 0);
    post_send(
        &mut a,
        2,
        wr_opcode::RDMA_WRITE,
        &[sge(ak, 0, 8)],
        BASE,
        b.mr.rkey ^ 1,
    );
    // A READ is not UC's: a malformed request, the QP's error.
    post_send(
        &mut a,
        3,
        wr_opcode::RDMA_READ,
        &[sge(ak, 0, 8)],
        BASE,
        b.mr.rkey,
    );
    engine.poll();
    assert_eq!(
        outcomes(&mut a),
        vec![
            (1, 0, a.qpn),
            (2, 0, a.qpn),
            (3, wc_status::LOC_QP_OP_ERR, a.qpn)
        ]
    );
    assert!(completions(&mut b).is_empty());
    let q: freeflow_proto::verbs::qp::QpQueried = ok(
        &mut engine,
        b.id,
        &b.conn,
        op::QUERY_QP,
        &ObjectHandle { handle: b.qp }.to_vec(),
    );
    assert_eq!(q.attr.qp_state, QpState::Rts as u8);
}

/// Two engines as two shards of one router, linked by their socket pairs, each knowing the
/// host's containers: 10.32.0.2 (shard 0 serves it) and 10.32.0.3 (shard 1), tenant blue, and
/// 10.32.0.5 (shard 1), tenant red.
fn two_shards() -> (Engine, Engine) {
    let (e0, e1, _) = two_shards_tapped();
    (e0, e1)
}

/// [`two_shards`], and a second descriptor of shard 1's end of the socket pair that carries
/// its requests to shard 0 (what the test writes there reads, at shard 0, as shard 1's).
fn two_shards_tapped() -> (Engine, Engine, std::os::unix::net::UnixStream) {
    let links = SiblingLink::mesh(2).expect("socket pairs");
    let tap = links[1][0].out.try_clone().expect("a second descriptor");
    let mut links = links.into_iter();
    let local = [
        ([10, 32, 0, 2].into(), "blue".to_string()),
        ([10, 32, 0, 3].into(), "blue".to_string()),
        ([10, 32, 0, 5].into(), "red".to_string()),
    ];
    let mut engines = [0, 1].map(|i| {
        let mut e = Engine::new(false);
        e.set_shard(i, 2, links.next().expect("links"));
        e.set_local(local.iter().cloned());
        e
    });
    assert_eq!(shard_of([10, 32, 0, 2].into(), 2), 0);
    assert_eq!(shard_of([10, 32, 0, 3].into(), 2), 1);
    let [e0, e1] = std::mem::replace(&mut engines, [Engine::new(false), Engine::new(false)]);
    (e0, e1, tap)
}

/// Runs both engines' passes until `done` says so (bounded in passes and time).
fn run_shards(e0: &mut Engine, e1: &mut Engine, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for _ in 0..100_000 {
        e0.poll();
        e1.poll();
        // What the shard's io_uring reports: which sockets are readable or writable.
        e0.transport().poll_now();
        e1.transport().poll_now();
        if done() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no progress in 10 s");
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    panic!("no progress in 100000 passes");
}

fn post_atomic(
    s: &mut Side,
    wr_id: u64,
    opcode: u8,
    local: Sge,
    raddr: u64,
    rkey: u32,
    args: (u64, u64),
) {
    let mut slot = vec![0u8; s.sq.slot_size()];
    SendWqeHeader {
        wr_id,
        opcode,
        flags: send_flags::SIGNALED as u8,
        num_sge: 1,
        remote_addr: raddr,
        rkey,
        compare_add: args.0,
        swap: args.1,
        ..SendWqeHeader::default()
    }
    .write(&mut slot);
    local.write(&mut slot[SendWqeHeader::LEN..]);
    assert!(s.sq.push(&slot).unwrap());
    let _ = s.sq.publish();
}

/// A QP of a container at 10.32.0.2 on shard 0 (attachment `number`) and one at 10.32.0.3 on
/// shard 1 (`number + 1`), both of tenant blue, connected to each other.
fn pair_across_shards(e0: &mut Engine, e1: &mut Engine, number: u32) -> (Side, Side) {
    let a = side(e0, number, [10, 32, 0, 2], "blue", 64);
    let b = side(e1, number + 1, [10, 32, 0, 3], "blue", 64);
    connect(e0, &a, b.ip, b.qpn, 7);
    connect(e1, &b, a.ip, a.qpn, 7);
    (a, b)
}

/// A completion the program has not taken says so once (to a shard serving QPs through the
/// transport); taken ones, or none, say nothing; an engine without a transport never keeps
/// the list.
#[test]
fn completions_left_in_their_ring_are_reported_once() {
    let (mut e0, mut e1) = two_shards();
    let (mut a, mut b) = pair_across_shards(&mut e0, &mut e1, 1);
    let (ak, bk) = (a.mr.lkey, b.mr.lkey);
    assert!(!e1.completions_waiting());
    post_recv(&mut b, 1, sge(bk, 0, 64));
    post_send(&mut a, 2, wr_opcode::SEND, &[sge(ak, 0, 8)], 0, 0);
    // Until a's SEND completed (its ACK came back): b's receive completed before it.
    run_shards(&mut e0, &mut e1, || a.cq_ring.available().unwrap() > 0);
    assert!(e0.completions_waiting());
    assert!(e1.completions_waiting());
    // Reported once: the same untaken completions do not say it again.
    assert!(!e0.completions_waiting());
    assert!(!e1.completions_waiting());
    // New completions while the programs took nothing since: they are not polling, which
    // says nothing of the core (one tenant must not make its shard park early for all).
    post_recv(&mut b, 7, sge(bk, 0, 64));
    post_send(&mut a, 8, wr_opcode::SEND, &[sge(ak, 0, 8)], 0, 0);
    run_shards(&mut e0, &mut e1, || a.cq_ring.available_now().unwrap() > 1);
    assert!(!e0.completions_waiting());
    assert!(!e1.completions_waiting());
    assert_eq!(outcomes(&mut a), vec![(2, 0, a.qpn), (8, 0, a.qpn)]);
    assert_eq!(outcomes(&mut b).len(), 2);
    // Polling again, then behind again: said again.
    post_recv(&mut b, 9, sge(bk, 0, 64));
    post_send(&mut a, 10, wr_opcode::SEND, &[sge(ak, 0, 8)], 0, 0);
    run_shards(&mut e0, &mut e1, || a.cq_ring.available().unwrap() > 0);
    assert!(e0.completions_waiting());
    assert!(e1.completions_waiting());
    assert_eq!(outcomes(&mut a), vec![(10, 0, a.qpn)]);
    assert_eq!(outcomes(&mut b).len(), 1);
    // Taken before the shard asks: nothing waits.
    post_recv(&mut b, 3, sge(bk, 0, 64));
    post_send(&mut a, 4, wr_opcode::SEND, &[sge(ak, 0, 8)], 0, 0);
    let mut got = (0, 0);
    run_shards(&mut e0, &mut e1, || {
        got.0 += outcomes(&mut a).len();
        got.1 += outcomes(&mut b).len();
        got == (1, 1)
    });
    assert!(!e0.completions_waiting());
    assert!(!e1.completions_waiting());

    // One host, no transport: nothing is kept, nothing is said.
    let mut engine = Engine::new(false);
    let (mut c, mut d) = pair(&mut engine);
    let (ck, dk) = (c.mr.lkey, d.mr.lkey);
    post_recv(&mut d, 5, sge(dk, 0, 64));
    post_send(&mut c, 6, wr_opcode::SEND, &[sge(ck, 0, 8)], 0, 0);
    engine.poll();
    assert!(!engine.completions_waiting());
    assert!(engine.published.is_empty());
    assert_eq!(outcomes(&mut c).len(), 1);
}

#[test]
fn qps_on_two_shards_connect_and_run_every_opcode() {
    let (mut e0, mut e1) = two_shards();
    let (mut a, mut b) = pair_across_shards(&mut e0, &mut e1, 1);
    let (ak, bk) = (a.mr.lkey, b.mr.lkey);
    a.file
        .write_all_at(b"across the shards", BASE + 100)
        .unwrap();
    b.file
        .write_all_at(&40u64.to_ne_bytes(), BASE + 4000)
        .unwrap();

    // SEND and SEND with immediate into b's receives.
    post_recv(&mut b, 70, sge(bk, 2000, 100));
    post_recv(&mut b, 71, sge(bk, 2100, 100));
    post_send(&mut a, 1, wr_opcode::SEND, &[sge(ak, 100, 17)], 0, 0);
    post_send(
        &mut a,
        2,
        wr_opcode::SEND_WITH_IMM,
        &[sge(ak, 100, 6)],
        0,
        0,
    );
    // WRITE, WRITE with immediate (takes a receive), READ back, compare-and-swap, fetch-and-add.
    post_recv(&mut b, 72, sge(bk, 2200, 0));
    post_send(
        &mut a,
        3,
        wr_opcode::RDMA_WRITE,
        &[sge(ak, 100, 17)],
        BASE + 3000,
        b.mr.rkey,
    );
    post_send(
        &mut a,
        4,
        wr_opcode::RDMA_WRITE_WITH_IMM,
        &[sge(ak, 100, 3)],
        BASE + 3100,
        b.mr.rkey,
    );
    post_send(
        &mut a,
        5,
        wr_opcode::RDMA_READ,
        &[sge(ak, 600, 17)],
        BASE + 3000,
        b.mr.rkey,
    );
    post_atomic(
        &mut a,
        6,
        wr_opcode::ATOMIC_CMP_AND_SWP,
        sge(ak, 800, 8),
        BASE + 4000,
        b.mr.rkey,
        (40, 50),
    );
    post_atomic(
        &mut a,
        7,
        wr_opcode::ATOMIC_FETCH_AND_ADD,
        sge(ak, 808, 8),
        BASE + 4000,
        b.mr.rkey,
        (5, 0),
    );

    let (mut ca, mut cb) = (Vec::new(), Vec::new());
    run_shards(&mut e0, &mut e1, || {
        ca.extend(completions(&mut a));
        cb.extend(completions(&mut b));
        ca.len() >= 7 && cb.len() >= 3
    });
    assert_eq!(
        ca.iter()
            .map(|c| (c.wr_id, c.status, c.opcode))
            .collect::<Vec<_>>(),
        vec![
            (1, 0, wc_opcode::SEND),
            (2, 0, wc_opcode::SEND),
            (3, 0, wc_opcode::RDMA_WRITE),
            (4, 0, wc_opcode::RDMA_WRITE),
            (5, 0, wc_opcode::RDMA_READ),
            (6, 0, wc_opcode::COMP_SWAP),
            (7, 0, wc_opcode::FETCH_ADD),
        ]
    );
    assert_eq!(
        cb.iter()
            .map(|c| (c.wr_id, c.status, c.byte_len, c.src_qp))
            .collect::<Vec<_>>(),
        vec![(70, 0, 17, a.qpn), (71, 0, 6, a.qpn), (72, 0, 3, a.qpn)]
    );
    assert_eq!(cb[2].opcode, wc_opcode::RECV_RDMA_WITH_IMM);
    let read = |f: &std::fs::File, at: u64, n: usize| {
        let mut got = vec![0u8; n];
        f.read_exact_at(&mut got, BASE + at).unwrap();
        got
    };
    assert_eq!(read(&b.file, 2000, 17), b"across the shards");
    assert_eq!(read(&b.file, 3000, 17), b"across the shards");
    assert_eq!(read(&a.file, 600, 17), b"across the shards");
    // CAS saw 40 and wrote 50; FETCH_ADD saw 50 and left 55.
    assert_eq!(read(&a.file, 800, 8), 40u64.to_ne_bytes());
    assert_eq!(read(&a.file, 808, 8), 50u64.to_ne_bytes());
    assert_eq!(read(&b.file, 4000, 8), 55u64.to_ne_bytes());
    let (counters, qps) = e0.counters();
    assert_eq!((counters.ops, qps), (7, 1));
}

#[test]
fn across_shards_a_bad_key_is_a_remote_error_and_other_tenants_are_unreachable() {
    let (mut e0, mut e1) = two_shards();
    let mut a = side(&mut e0, 1, [10, 32, 0, 2], "blue", 64);
    let b = side(&mut e1, 2, [10, 32, 0, 3], "blue", 64);
    let red = side(&mut e1, 3, [10, 32, 0, 5], "red", 64);
    // A blue QP cannot be pointed at a red container on the other shard.
    let [_, (m, rtr), _] = rc_pingpong_steps(red.ip, red.qpn, 7);
    let [(im, init), ..] = rc_pingpong_steps(red.ip, red.qpn, 7);
    assert_eq!(modify(&mut e0, &a, im, init), status::OK);
    assert_ne!(modify(&mut e0, &a, m, rtr), status::OK);
    assert_eq!(
        modify(
            &mut e0,
            &a,
            mask::STATE,
            QpAttr {
                qp_state: QpState::Reset as u8,
                ..QpAttr::default()
            }
        ),
        status::OK
    );
    connect(&mut e0, &a, b.ip, b.qpn, 7);
    connect(&mut e1, &b, a.ip, a.qpn, 7);
    let ak = a.mr.lkey;
    post_send(
        &mut a,
        1,
        wr_opcode::RDMA_WRITE,
        &[sge(ak, 100, 8)],
        BASE + 3000,
        b.mr.rkey ^ 1,
    );
    let mut ca = Vec::new();
    run_shards(&mut e0, &mut e1, || {
        ca.extend(completions(&mut a));
        !ca.is_empty()
    });
    assert_eq!((ca[0].wr_id, ca[0].status), (1, wc_status::REM_ACCESS_ERR));
}

/// Garbage on the socket pair that carries shard 1's requests to shard 0 (a frame that does
/// not decode): shard 0 drops that connection only, shard 1 sees it close, and a QP of shard
/// 1 sending to shard 0 fails with RETRY_EXC_ERR (its WRs behind flushed) instead of waiting;
/// the other direction's pair still carries QPs of shard 0 to shard 1, and both engines go on.
#[test]
fn garbage_on_a_shard_pair_drops_that_pair_only() {
    use std::io::Write;
    let (mut e0, mut e1, mut tap) = two_shards_tapped();
    // a (shard 0) and b (shard 1) connected; c (shard 0) and d (shard 1) connected.
    let (mut a, mut b) = pair_across_shards(&mut e0, &mut e1, 1);
    let (mut c, mut d) = pair_across_shards(&mut e0, &mut e1, 3);
    let (ak, bk, ck, dk) = (a.mr.lkey, b.mr.lkey, c.mr.lkey, d.mr.lkey);
    // Both pairs work both ways first.
    post_recv(&mut a, 10, sge(ak, 2000, 64));
    post_send(&mut b, 11, wr_opcode::SEND, &[sge(bk, 100, 16)], 0, 0);
    let mut got = Vec::new();
    run_shards(&mut e0, &mut e1, || {
        got.extend(outcomes(&mut a));
        got.extend(outcomes(&mut b));
        got.len() >= 2
    });
    got.sort_unstable();
    assert_eq!(got, vec![(10, 0, a.qpn), (11, 0, b.qpn)]);
    let incoming_from_shard_1 = |e: &mut Engine| {
        e.transport()
            .incoming
            .iter()
            .filter(|c| c.link == Link::Shard(1))
            .count()
    };
    assert_eq!(incoming_from_shard_1(&mut e0), 1);

    // A header of an unknown kind, as if shard 1 had sent it.
    tap.write_all(&[0xee; freeflow_proto::verbs::remote::HEADER_LEN])
        .expect("the socket pair takes it");
    drop(tap);
    let out_to_shard_0 = (Link::Shard(0), OutDest::Any);
    // Shard 0 drops the connection the garbage came on; shard 1 sees its end close.
    let mut dropped = false;
    for _ in 0..1000 {
        e0.poll();
        e1.poll();
        e0.transport().poll_now();
        e1.transport().poll_now();
        dropped = incoming_from_shard_1(&mut e0) == 0
            && !e1.transport().out.contains_key(&out_to_shard_0);
        if dropped {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(dropped, "the garbage's connection is still there");

    // b's requests have no way to shard 0 now: its SEND fails (the QP's retry budget), the WR
    // behind it is flushed.
    post_send(&mut b, 12, wr_opcode::SEND, &[sge(bk, 100, 16)], 0, 0);
    post_send(&mut b, 13, wr_opcode::SEND, &[sge(bk, 100, 16)], 0, 0);
    let mut failed = Vec::new();
    run_shards(&mut e0, &mut e1, || {
        failed.extend(outcomes(&mut b));
        failed.len() >= 2
    });
    assert_eq!(
        failed,
        vec![
            (12, wc_status::RETRY_EXC_ERR, b.qpn),
            (13, wc_status::WR_FLUSH_ERR, b.qpn)
        ]
    );
    // Shard 0's requests to shard 1 go on the other pair, untouched: c's SEND and WRITE land.
    c.file.write_all_at(b"still carried", BASE + 100).unwrap();
    post_recv(&mut d, 20, sge(dk, 2000, 64));
    post_send(&mut c, 21, wr_opcode::SEND, &[sge(ck, 100, 13)], 0, 0);
    post_send(
        &mut c,
        22,
        wr_opcode::RDMA_WRITE,
        &[sge(ck, 100, 13)],
        BASE + 3000,
        d.mr.rkey,
    );
    let (mut cc, mut cd) = (Vec::new(), Vec::new());
    run_shards(&mut e0, &mut e1, || {
        cc.extend(outcomes(&mut c));
        cd.extend(outcomes(&mut d));
        cc.len() >= 2 && !cd.is_empty()
    });
    assert_eq!(cc, vec![(21, 0, c.qpn), (22, 0, c.qpn)]);
    assert_eq!(cd, vec![(20, 0, d.qpn)]);
    let mut landed = [0u8; 13];
    d.file.read_exact_at(&mut landed, BASE + 3000).unwrap();
    assert_eq!(&landed, b"still carried");
}

/// The ACK of a request rides on the reply: with ACKs held for ever, the requester's SEND
/// completes only when the responder's reply SEND arrives, and with it; held for no time, the
/// ACK goes alone at once.
#[test]
fn a_reply_across_shards_carries_the_ack_of_the_request_it_answers() {
    let (mut e0, mut e1) = two_shards();
    e1.ack_hold = std::time::Duration::from_secs(3600);
    e0.ack_hold = std::time::Duration::from_secs(3600);
    let (mut a, mut b) = pair_across_shards(&mut e0, &mut e1, 1);
    let (ak, bk) = (a.mr.lkey, b.mr.lkey);
    post_recv(&mut a, 80, sge(ak, 2000, 64));
    post_recv(&mut b, 90, sge(bk, 2000, 64));
    post_send(&mut a, 1, wr_opcode::SEND, &[sge(ak, 100, 16)], 0, 0);
    let mut cb = Vec::new();
    run_shards(&mut e0, &mut e1, || {
        cb.extend(completions(&mut b));
        !cb.is_empty()
    });
    assert_eq!((cb[0].wr_id, cb[0].status), (90, 0));
    // The request executed; its ACK is held: a's SEND has not completed, after any number of
    // passes.
    for _ in 0..50 {
        e1.poll();
        e0.poll();
        e0.transport().poll_now();
        e1.transport().poll_now();
    }
    assert_eq!(e1.held_acks.len(), 1);
    assert!(completions(&mut a).is_empty());
    // The reply carries it: a's SEND completes with the reply's receive. a holds nothing: the
    // ACK of the reply goes alone at once, and b's SEND completes.
    e0.ack_hold = std::time::Duration::ZERO;
    post_send(&mut b, 2, wr_opcode::SEND, &[sge(bk, 100, 16)], 0, 0);
    let (mut ca, mut cb) = (Vec::new(), Vec::new());
    run_shards(&mut e0, &mut e1, || {
        ca.extend(completions(&mut a));
        cb.extend(completions(&mut b));
        ca.len() >= 2 && !cb.is_empty()
    });
    let mut got: Vec<(u64, u32)> = ca.iter().map(|c| (c.wr_id, c.status)).collect();
    got.sort_unstable();
    assert_eq!(got, vec![(1, 0), (80, 0)]);
    assert_eq!((cb[0].wr_id, cb[0].status), (2, 0));
    assert!(e0.held_acks.is_empty() && e1.held_acks.is_empty());
}

/// A sealed further memory file of `pages` pages, every page written (as the shim populates
/// the range it registers).
fn further_file(pages: u64) -> OwnedFd {
    let fd =
        crate::verbs::memory::test_memfd(pages * PAGE_SIZE, freeflow_proto::verbs::REQUIRED_SEALS);
    std::fs::File::from(fd.try_clone().unwrap())
        .write_all_at(&vec![3u8; (pages * PAGE_SIZE) as usize], 0)
        .unwrap();
    fd
}

/// A registration in a further file that fails before the table sees it (the container's
/// budget is used up) lets the file go with its unit, as any failed registration does: the
/// shim forgets the file, and a program that retries sends it again under the same number.
#[test]
fn a_registration_the_budget_refuses_lets_its_further_file_go() {
    // A side holds 4 units; its further file takes the fifth and last.
    let mut engine = Engine::with_budget(false, 5);
    let a = side(&mut engine, 1, [10, 32, 0, 2], "blue", 16);
    let msg = MemoryFileMsg {
        size: 4 * PAGE_SIZE,
        file: 7,
    };
    engine
        .adopt_memory_file(a.id, msg, further_file(4))
        .unwrap();
    let reg = RegMr {
        pd: a.pd,
        access: ALL,
        addr: BASE,
        length: PAGE_SIZE,
        iova: BASE,
        file: 7,
        file_offset: 0,
    }
    .to_vec();
    let no_resources = VerbsStatus::NoResources as u16;
    assert_eq!(status_of(&mut engine, &a, op::REG_MR, &reg), no_resources);
    assert!(!engine.contexts[&a.id].table.has_file(7));
    // Its unit came back: the file comes again (same number), and then a region cannot.
    engine
        .adopt_memory_file(a.id, msg, further_file(4))
        .unwrap();
    assert!(engine.contexts[&a.id].table.has_file(7));
    assert_eq!(status_of(&mut engine, &a, op::REG_MR, &reg), no_resources);
    assert!(!engine.contexts[&a.id].table.has_file(7));
    assert_eq!(new_channel(&mut engine, a.id, &a.conn).map(|_| ()), Ok(()));
}

/// The limit on mapped bytes is the container's: what one context maps is not there for the
/// container's other contexts (another container's are not affected).
#[test]
fn mapped_bytes_are_limited_per_container() {
    let mut engine = Engine::with_budget(false, 64);
    let (a1, a1_conn, _a1_shim) = bare_context(&mut engine, 1, 100);
    let (a2, a2_conn, _a2_shim) = bare_context(&mut engine, 2, 100);
    let (b, b_conn, _b_shim) = bare_context(&mut engine, 3, 200);
    let msg = MemoryFileMsg {
        size: 4 * PAGE_SIZE,
        file: 1,
    };
    let mut pds = Vec::new();
    for (id, conn) in [(a2, &a2_conn), (b, &b_conn)] {
        engine.adopt_memory_file(id, msg, further_file(4)).unwrap();
        pds.push(ok::<PdCreated>(&mut engine, id, conn, op::ALLOC_PD, &[]).pd);
    }
    // A's first context has all but three pages mapped (as if: the bytes are only counted).
    engine.contexts[&a1].table.mapped.store(
        freeflow_proto::verbs::limits::MAX_MAPPED_BYTES - 3 * PAGE_SIZE,
        std::sync::atomic::Ordering::Relaxed,
    );
    let _ = a1_conn;
    let reg = |pd, pages| {
        RegMr {
            pd,
            access: ALL,
            addr: BASE,
            length: pages * PAGE_SIZE,
            iova: BASE,
            file: 1,
            file_offset: 0,
        }
        .to_vec()
    };
    let limit = VerbsStatus::NoResources as u16;
    assert_eq!(
        call(&mut engine, a2, &a2_conn, op::REG_MR, &reg(pds[0], 4)).0,
        limit
    );
    // B maps its four pages; A's second context the three left.
    ok::<MrCreated>(&mut engine, b, &b_conn, op::REG_MR, &reg(pds[1], 4));
    engine.adopt_memory_file(a2, msg, further_file(4)).unwrap();
    ok::<MrCreated>(&mut engine, a2, &a2_conn, op::REG_MR, &reg(pds[0], 3));
}

/// Registers `len` bytes at BASE + `offset` of `s`'s memory file, written with `byte(i)` first,
/// in `s`'s protection domain with every access.
fn big_region(
    engine: &mut Engine,
    s: &Side,
    offset: u64,
    len: u64,
    byte: impl Fn(u64) -> u8,
) -> MrCreated {
    let bytes: Vec<u8> = (0..len).map(byte).collect();
    s.file.write_all_at(&bytes, BASE + offset).unwrap();
    ok(
        engine,
        s.id,
        &s.conn,
        op::REG_MR,
        &RegMr {
            pd: s.pd,
            access: ALL,
            addr: BASE + offset,
            length: len,
            iova: BASE + offset,
            file: freeflow_proto::verbs::OWN_MEMORY_FILE,
            file_offset: 0,
        }
        .to_vec(),
    )
}

/// Payloads above the zero-copy threshold (`remote::ZERO_COPY_MIN`), larger than the socket
/// pair's buffer, go straight from registered memory: a SEND, a WRITE and a READ's data land
/// whole and in order, and a WRITE with a bad key is still REM_ACCESS_ERR on its own WR.
#[test]
fn across_shards_large_payloads_go_from_registered_memory() {
    let (mut e0, mut e1) = two_shards();
    let (mut a, mut b) = pair_across_shards(&mut e0, &mut e1, 1);
    const AT: u64 = 1 << 20;
    const LEN: u64 = 256 << 10;
    let pa = |i: u64| (i.wrapping_mul(13) >> 4) as u8;
    let pb = |i: u64| (i.wrapping_mul(7) >> 3) as u8 ^ 0x5a;
    let am = big_region(&mut e0, &a, AT, LEN, pa);
    let bm = big_region(&mut e1, &b, AT, LEN, pb);
    post_recv(&mut b, 80, sge(bm.lkey, AT, 64 << 10));
    post_send(
        &mut a,
        1,
        wr_opcode::SEND,
        &[sge(am.lkey, AT, 64 << 10)],
        0,
        0,
    );
    post_send(
        &mut a,
        2,
        wr_opcode::RDMA_WRITE,
        &[
            sge(am.lkey, AT + (64 << 10), 100 << 10),
            sge(am.lkey, AT + (164 << 10), 28 << 10),
        ],
        BASE + AT + (64 << 10),
        bm.rkey,
    );
    post_send(
        &mut a,
        3,
        wr_opcode::RDMA_READ,
        &[sge(am.lkey, AT + (192 << 10), 64 << 10)],
        BASE + AT + (192 << 10),
        bm.rkey,
    );
    post_send(
        &mut a,
        4,
        wr_opcode::RDMA_WRITE,
        &[sge(am.lkey, AT, 32 << 10)],
        BASE + AT,
        bm.rkey ^ 1,
    );
    let (mut ca, mut cb) = (Vec::new(), Vec::new());
    run_shards(&mut e0, &mut e1, || {
        ca.extend(completions(&mut a));
        cb.extend(completions(&mut b));
        ca.len() >= 4 && !cb.is_empty()
    });
    assert_eq!(
        ca.iter()
            .map(|c| (c.wr_id, c.status, c.byte_len))
            .collect::<Vec<_>>(),
        vec![
            (1, wc_status::SUCCESS, 64 << 10),
            (2, wc_status::SUCCESS, 128 << 10),
            (3, wc_status::SUCCESS, 64 << 10),
            (4, wc_status::REM_ACCESS_ERR, 0),
        ]
    );
    assert_eq!(
        cb.iter()
            .map(|c| (c.wr_id, c.status, c.byte_len))
            .collect::<Vec<_>>(),
        vec![(80, wc_status::SUCCESS, 64 << 10)]
    );
    let read = |f: &std::fs::File| {
        let mut got = vec![0u8; LEN as usize];
        f.read_exact_at(&mut got, BASE + AT).unwrap();
        got
    };
    let (ga, gb) = (read(&a.file), read(&b.file));
    let want_b: Vec<u8> = (0..LEN)
        .map(|i| if i < 192 << 10 { pa(i) } else { pb(i) })
        .collect();
    assert!(
        gb == want_b,
        "b's region is not the SEND's and WRITE's bytes"
    );
    let want_a: Vec<u8> = (0..LEN)
        .map(|i| if i < 192 << 10 { pa(i) } else { pb(i) })
        .collect();
    assert!(ga == want_a, "a's region is not the READ's bytes");
}

/// The responder receives a large WRITE whose header came first straight into its target
/// (checked at the header), and a WRITE whose header fails its check has its payload read and
/// dropped with REM_ACCESS_ERR: the stream stays in step (another QP pair's SEND on the same
/// connection still arrives). The frames are written by the test on shard 1's socket, in
/// pieces, with passes between them.
/// Frames written by hand onto the connection from shard 1 to shard 0 (`tap`), for QP a (shard
/// 0, a 64 KiB region at `AT` in `am`) from its peer b (shard 1); c and d are another QP pair
/// on the same connection. One real SEND has made the connection.
struct LandingBench {
    e0: Engine,
    e1: Engine,
    tap: std::os::unix::net::UnixStream,
    a: Side,
    b: Side,
    c: Side,
    d: Side,
    am: MrCreated,
    a_index: crate::verbs::ids::QpId,
    /// The sequence number a expects next.
    seq: u32,
}

impl LandingBench {
    const AT: u64 = 1 << 20;
    const LEN: usize = 64 << 10;

    fn new() -> LandingBench {
        let (mut e0, mut e1, tap) = two_shards_tapped();
        let (mut a, mut b) = pair_across_shards(&mut e0, &mut e1, 1);
        let (c, d) = pair_across_shards(&mut e0, &mut e1, 3);
        let am = big_region(&mut e0, &a, Self::AT, Self::LEN as u64, |_| 0);
        let (ak, bk) = (a.mr.lkey, b.mr.lkey);
        post_recv(&mut a, 10, sge(ak, 2000, 64));
        post_send(&mut b, 11, wr_opcode::SEND, &[sge(bk, 100, 16)], 0, 0);
        let mut got = Vec::new();
        run_shards(&mut e0, &mut e1, || {
            got.extend(outcomes(&mut a));
            got.extend(outcomes(&mut b));
            got.len() >= 2
        });
        let a_index = e0.qp_by_number(a.qpn).unwrap();
        let mut bench = LandingBench {
            e0,
            e1,
            tap,
            a,
            b,
            c,
            d,
            am,
            a_index,
            seq: 0,
        };
        bench.seq = bench.expected();
        bench
    }

    /// The sequence number a's QP expects next.
    fn expected(&self) -> u32 {
        let qp = self.e0.qps.get(self.a_index).unwrap();
        qp.remote.as_ref().unwrap().expected
    }

    /// Whether a payload is being received straight into its target on the tapped connection.
    fn landing(&mut self) -> bool {
        self.e0
            .transport()
            .incoming
            .iter()
            .any(|c| c.link == Link::Shard(1) && c.landing())
    }

    /// `n` passes of shard 0.
    fn passes(&mut self, n: usize) {
        for _ in 0..n {
            self.e0.poll();
            self.e0.transport().poll_now();
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Writes `bytes` onto the connection.
    fn send(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.tap, bytes).unwrap();
    }

    /// The header of a WRITE from b to a's region, number `seq`, with `rkey`.
    fn write_header(&self, seq: u32, rkey: u32) -> Vec<u8> {
        use freeflow_proto::verbs::remote::{FrameHeader, FrameKind};
        let mut h = FrameHeader::new(FrameKind::Write);
        (h.src_ip, h.dst_ip) = (self.b.ip.into(), self.a.ip.into());
        (h.src_qpn, h.dst_qpn) = (self.b.qpn, self.a.qpn);
        (h.seq, h.rkey, h.remote_addr, h.len) = (seq, rkey, BASE + Self::AT, Self::LEN as u32);
        h.encode().to_vec()
    }

    /// Runs shard 0 until a payload lands (bounded); fails if none does.
    fn wait_for_landing(&mut self) {
        for _ in 0..1000 {
            self.passes(1);
            if self.landing() {
                return;
            }
        }
        panic!("the checked WRITE is not received into its target");
    }

    /// Runs shard 0 until a's QP expects `seq` (bounded); fails if it does not.
    fn wait_until_expected(&mut self, seq: u32, what: &str) {
        for _ in 0..1000 {
            self.passes(1);
            if self.expected() == seq {
                return;
            }
        }
        assert_eq!(self.expected(), seq, "{what}");
    }

    /// a's region as it is now.
    fn region(&self) -> Vec<u8> {
        let mut now = vec![0u8; Self::LEN];
        self.a
            .file
            .read_exact_at(&mut now, BASE + Self::AT)
            .unwrap();
        now
    }

    /// c and d's SEND on the same connection arrives whole: the stream is in step.
    fn other_pair_still_talks(&mut self) {
        let (ck, dk) = (self.c.mr.lkey, self.d.mr.lkey);
        post_recv(&mut self.c, 20, sge(ck, 2000, 64));
        post_send(&mut self.d, 21, wr_opcode::SEND, &[sge(dk, 100, 16)], 0, 0);
        let (c, d) = (&mut self.c, &mut self.d);
        let mut got = Vec::new();
        run_shards(&mut self.e0, &mut self.e1, || {
            got.extend(outcomes(c));
            got.extend(outcomes(d));
            got.len() >= 2
        });
        got.sort_unstable();
        assert_eq!(got, vec![(20, 0, self.c.qpn), (21, 0, self.d.qpn)]);
    }
}

#[test]
fn a_large_write_lands_in_its_target_and_a_refused_one_is_drained() {
    let mut t = LandingBench::new();
    let seq = t.seq;
    let payload: Vec<u8> = (0..LandingBench::LEN)
        .map(|i| ((i * 11) >> 2) as u8)
        .collect();
    // The header and 1000 bytes: the rest lands straight in a's region.
    t.send(&t.write_header(seq, t.am.rkey));
    t.send(&payload[..1000]);
    t.wait_for_landing();
    for piece in payload[1000..].chunks(20_000) {
        t.send(piece);
        t.passes(3);
    }
    // A WRITE with a bad key: its header alone is refused a landing, its payload drained.
    t.send(&t.write_header(seq.wrapping_add(1), t.am.rkey ^ 1));
    t.passes(5);
    assert!(!t.landing(), "a refused header must not land");
    assert_eq!(
        t.expected(),
        seq.wrapping_add(1),
        "the landed WRITE executed"
    );
    t.send(&payload);
    t.wait_until_expected(seq.wrapping_add(2), "the refused WRITE was not answered");
    assert_eq!(t.e0.qps.get(t.a_index).unwrap().state, QpState::Err);
    assert!(
        t.region() == payload,
        "a's region is not the landed payload"
    );
    t.other_pair_still_talks();
}

/// A READ longer than a frame's payload may be (`MAX_PAYLOAD`) is an invalid request, even
/// from a region that large: the responder answers NAK REM_INV_REQ instead of reading it (a
/// ReadData frame the requester could not decode, or an allocation of up to 4 GiB).
#[test]
fn a_read_longer_than_a_frame_is_an_invalid_request() {
    use freeflow_proto::verbs::remote::{nak, FrameHeader, FrameKind, HEADER_LEN, MAX_PAYLOAD};
    use std::io::{Read, Write};
    let (mut e0, mut e1, mut tap) = two_shards_tapped();
    let (mut a, mut b) = pair_across_shards(&mut e0, &mut e1, 1);
    let (ak, bk) = (a.mr.lkey, b.mr.lkey);
    const AT: u64 = 1 << 20;
    let len = u64::from(MAX_PAYLOAD) + 4096;
    let am = big_region(&mut e0, &a, AT, len, |_| 0);
    // One real SEND makes the connection from shard 1 to shard 0.
    post_recv(&mut a, 10, sge(ak, 2000, 64));
    post_send(&mut b, 11, wr_opcode::SEND, &[sge(bk, 100, 16)], 0, 0);
    let mut got = Vec::new();
    run_shards(&mut e0, &mut e1, || {
        got.extend(outcomes(&mut a));
        got.extend(outcomes(&mut b));
        got.len() >= 2
    });
    let seq = e0
        .qps
        .get(e0.qp_by_number(a.qpn).unwrap())
        .unwrap()
        .remote
        .as_ref()
        .unwrap()
        .expected;
    let mut h = FrameHeader::new(FrameKind::Read);
    (h.src_ip, h.dst_ip) = (b.ip.into(), a.ip.into());
    (h.src_qpn, h.dst_qpn) = (b.qpn, a.qpn);
    (h.seq, h.rkey, h.remote_addr, h.arg) = (seq, am.rkey, BASE + AT, MAX_PAYLOAD + 1);
    tap.write_all(&h.encode()).unwrap();
    // Shard 1 is not run: the answer is read from its socket here.
    let mut answer = Vec::new();
    let mut buf = [0u8; HEADER_LEN];
    for _ in 0..2000 {
        e0.poll();
        e0.transport().poll_now();
        match tap.read(&mut buf[..HEADER_LEN - answer.len()]) {
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_micros(200))
            }
            Err(e) => panic!("{e}"),
        }
        if answer.len() == HEADER_LEN {
            break;
        }
    }
    let r =
        FrameHeader::decode(answer.first_chunk::<HEADER_LEN>().expect("no answer came")).unwrap();
    assert_eq!(
        (r.kind, r.code, r.seq, r.len),
        (FrameKind::Nak, nak::REM_INV_REQ, seq, 0)
    );
}

/// A region deregistered while a WRITE's payload is being received into it: what comes after
/// the dereg is read and dropped, not written into the container's memory (nothing lands after
/// ibv_dereg_mr returns), the WRITE is answered REM_ACCESS (the QP goes to the error state)
/// and the stream stays in step.
#[test]
fn a_dereg_mid_landing_stops_the_payload_at_the_target() {
    const BEFORE: usize = 21_000;
    let mut t = LandingBench::new();
    let seq = t.seq;
    let payload: Vec<u8> = (0..LandingBench::LEN)
        .map(|i| ((i * 11) >> 2) as u8 | 1)
        .collect();
    t.send(&t.write_header(seq, t.am.rkey));
    t.send(&payload[..1000]);
    t.wait_for_landing();
    t.send(&payload[1000..BEFORE]);
    for _ in 0..1000 {
        t.passes(1);
        if t.region()[..BEFORE] == payload[..BEFORE] {
            break;
        }
    }
    assert!(
        t.region()[..BEFORE] == payload[..BEFORE],
        "the first pieces did not land"
    );
    // The region goes; the rest of the payload, then c and d's SEND on the same connection.
    let dereg = DeregMr { mr: t.am.mr }.to_vec();
    assert_eq!(status_of(&mut t.e0, &t.a, op::DEREG_MR, &dereg), status::OK);
    for piece in payload[BEFORE..].chunks(20_000) {
        t.send(piece);
        t.passes(3);
    }
    t.wait_until_expected(seq.wrapping_add(1), "the WRITE was not answered");
    assert_eq!(t.e0.qps.get(t.a_index).unwrap().state, QpState::Err);
    let now = t.region();
    assert!(now[..BEFORE] == payload[..BEFORE]);
    assert!(
        now[BEFORE..].iter().all(|&x| x == 0),
        "bytes landed after the dereg"
    );
    t.other_pair_still_talks();
}
