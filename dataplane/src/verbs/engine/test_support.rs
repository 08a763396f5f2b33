//! Setup helpers that the engine's tests (`tests.rs`) and property tests (`prop_tests.rs`)
//! share: opening a context with its memory file, serving a request as a shim would send it,
//! and the attributes of the QP transitions rc_pingpong makes.

use crate::verbs::memory::test_memfd;
use crate::verbs::*;
use freeflow_proto::control::ContainerEntry;
use freeflow_proto::identity::NetnsId;
use freeflow_proto::verbs::access;
use freeflow_proto::verbs::qp::{mask, QpAttr, QpState};
use freeflow_proto::verbs::REQUIRED_SEALS;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// The bytes of a context's memory file that its tests write (from their own base address).
pub(super) const BACKED: u64 = 4 * PAGE_SIZE;
/// Every access flag an MR or QP can be given.
pub(super) const ALL: u32 =
    access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ | access::REMOTE_ATOMIC;

/// The attributes rc_pingpong gives for each transition: to INIT, RTR and RTS.
pub(super) const INIT_MASK: u32 = mask::STATE | mask::PKEY_INDEX | mask::PORT | mask::ACCESS_FLAGS;
pub(super) const RTR_MASK: u32 = mask::STATE
    | mask::AV
    | mask::PATH_MTU
    | mask::DEST_QPN
    | mask::RQ_PSN
    | mask::MAX_DEST_RD_ATOMIC
    | mask::MIN_RNR_TIMER;
pub(super) const RTS_MASK: u32 = mask::STATE
    | mask::TIMEOUT
    | mask::RETRY_CNT
    | mask::RNR_RETRY
    | mask::SQ_PSN
    | mask::MAX_QP_RD_ATOMIC;

/// The steps of the rc_pingpong sequence RESET → INIT → RTR (to `peer_ip`/`peer_qpn`) → RTS:
/// each transition's attribute mask and attributes.
pub(super) fn rc_pingpong_steps(
    peer_ip: [u8; 4],
    peer_qpn: u32,
    rnr_retry: u8,
) -> [(u32, QpAttr); 3] {
    let init = QpAttr {
        qp_state: QpState::Init as u8,
        port_num: 1,
        qp_access_flags: ALL,
        ..QpAttr::default()
    };
    let rtr = QpAttr {
        qp_state: QpState::Rtr as u8,
        path_mtu: 3,
        dest_qp_num: peer_qpn,
        min_rnr_timer: 1,
        max_dest_rd_atomic: 1,
        is_global: 1,
        ah_port_num: 1,
        dgid: gid(peer_ip),
        ..QpAttr::default()
    };
    let rts = QpAttr {
        qp_state: QpState::Rts as u8,
        timeout: 1,
        retry_cnt: 1,
        rnr_retry,
        ..QpAttr::default()
    };
    [(INIT_MASK, init), (RTR_MASK, rtr), (RTS_MASK, rts)]
}

/// Opens context `number` (container `c<number>`, network namespace inode `number`) with a
/// memory file whose [`BACKED`] bytes at `base` hold `fill`; returns that file.
pub(super) fn open_context(
    engine: &mut Engine,
    number: u32,
    ip: [u8; 4],
    tenant: &str,
    base: u64,
    fill: u8,
) -> std::fs::File {
    let id = AttachmentId(number);
    let container = ContainerEntry {
        name: format!("c{number}"),
        tenant: tenant.into(),
        ip: ip.into(),
        netns: NetnsId {
            dev: 0,
            ino: u64::from(number),
        },
    };
    engine.open(id, container);
    let fd = test_memfd(MEMORY_FILE_SIZE, REQUIRED_SEALS);
    let file = std::fs::File::from(fd.try_clone().expect("dup"));
    file.write_all_at(&vec![fill; BACKED as usize], base)
        .expect("memory");
    let msg = MemoryFileMsg {
        size: MEMORY_FILE_SIZE,
        file: freeflow_proto::verbs::OWN_MEMORY_FILE,
    };
    engine.adopt_memory_file(id, msg, fd).expect("memory file");
    file
}

/// Serves request `op` of context `id` received on `conn`: the reply's status and body.
pub(super) fn call(
    engine: &mut Engine,
    id: AttachmentId,
    conn: &OwnedFd,
    op: u16,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut reply = [0u8; MAX_REPLY_BODY];
    let (status, len) = engine.serve(id, conn.as_fd(), op, body, &mut reply);
    (status, reply[..len].to_vec())
}

/// The reply body of a request that must succeed.
pub(super) fn ok<T: Body>(
    engine: &mut Engine,
    id: AttachmentId,
    conn: &OwnedFd,
    op: u16,
    body: &[u8],
) -> T {
    let (status, reply) = call(engine, id, conn, op, body);
    assert_eq!(status, status::OK, "opcode {op:#x}");
    T::decode(&reply).expect("reply body")
}

/// The IPv4-mapped GID of `ip`.
pub(super) fn gid(ip: [u8; 4]) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[10] = 0xff;
    g[11] = 0xff;
    g[12..].copy_from_slice(&ip);
    g
}
