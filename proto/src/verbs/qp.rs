//! Queue pair attributes on the wire and the RC state machine: which transitions exist, and which
//! attribute-mask bits each requires and allows, as the kernel's verbs layer checks them for
//! rdma-core (a mask that lacks a required bit or names one the transition does not take is
//! EINVAL). The numbers are rdma-core's (`enum ibv_qp_state`, `enum ibv_qp_attr_mask`, `enum
//! ibv_mtu`), which the shim passes through unchanged; the layout test of the shim compares them
//! with the installed headers.
//!
//! Three transports: reliable connected (RC), unreliable connected (UC: RC without
//! acknowledgements, so no RDMA READ, no atomics, no retry attributes) and unreliable datagram
//! (UD: no destination in the QP; each send names an address handle, a QP number and a qkey).
//! Each has its own table of transitions ([`transition`]), as the kernel's `qp_state_table`.
//! The router decides; the shim keeps a copy of the state it was told, for the checks
//! `ibv_post_send`/`ibv_post_recv` make without a round trip.

use crate::codec::{self, sequential_body, wire_enum, Body};

wire_enum! {
    /// `enum ibv_qp_state`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum QpState: u8, from u8, u32; fn from_u32(u32) {
        Reset = 0,
        Init = 1,
        Rtr = 2,
        Rts = 3,
        Sqd = 4,
        Sqe = 5,
        Err = 6,
    }
}

impl QpState {
    /// States in which `ibv_post_recv` is accepted (an ERR QP flushes what is posted).
    pub fn accepts_receives(self) -> bool {
        self != QpState::Reset
    }

    /// States in which `ibv_post_send` is accepted.
    pub fn accepts_sends(self) -> bool {
        matches!(
            self,
            QpState::Rts | QpState::Sqd | QpState::Sqe | QpState::Err
        )
    }
}

/// `enum ibv_qp_type`: reliable connected.
pub const QPT_RC: u32 = 2;
/// `enum ibv_qp_type`: unreliable connected.
pub const QPT_UC: u32 = 3;
/// `enum ibv_qp_type`: unreliable datagram.
pub const QPT_UD: u32 = 4;

/// The transports this device has (`enum ibv_qp_type`, the ones supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QpType {
    Rc,
    Uc,
    Ud,
}

impl QpType {
    /// The type of an `enum ibv_qp_type` number, if this device has it.
    pub fn from_u32(t: u32) -> Option<QpType> {
        match t {
            QPT_RC => Some(QpType::Rc),
            QPT_UC => Some(QpType::Uc),
            QPT_UD => Some(QpType::Ud),
            _ => None,
        }
    }

    /// Its `enum ibv_qp_type` number.
    pub fn number(self) -> u32 {
        match self {
            QpType::Rc => QPT_RC,
            QpType::Uc => QPT_UC,
            QpType::Ud => QPT_UD,
        }
    }

    /// Whether a send work request with `opcode` (`enum ibv_wr_opcode`) exists on this
    /// transport: every one on RC; SEND and RDMA WRITE (with or without immediate) on UC;
    /// SEND (with or without immediate) on UD. A provider refuses the others at post time
    /// (EINVAL).
    pub fn allows(self, opcode: u32) -> bool {
        use super::work::wr_opcode::*;
        let Ok(op) = u8::try_from(opcode) else {
            return false;
        };
        match self {
            QpType::Rc => is_supported(opcode),
            QpType::Uc => matches!(op, SEND | SEND_WITH_IMM | RDMA_WRITE | RDMA_WRITE_WITH_IMM),
            QpType::Ud => matches!(op, SEND | SEND_WITH_IMM),
        }
    }
}

/// The bit of a qkey that marks it privileged: a program without CAP_NET_RAW may not give a
/// QP such a qkey (the kernel's EPERM); in a UD send's `remote_qkey` it means "use the sending
/// QP's own qkey".
pub const PRIVILEGED_QKEY_BIT: u32 = 0x8000_0000;

/// `enum ibv_qp_attr_mask`, as [`AttrMask`] and as `u32` constants.
pub mod mask {
    use crate::codec::wire_flags;

    wire_flags! {
        /// `enum ibv_qp_attr_mask`.
        pub struct AttrMask: u32 {
            const STATE = 1;
            const CUR_STATE = 1 << 1;
            const EN_SQD_ASYNC_NOTIFY = 1 << 2;
            const ACCESS_FLAGS = 1 << 3;
            const PKEY_INDEX = 1 << 4;
            const PORT = 1 << 5;
            const QKEY = 1 << 6;
            const AV = 1 << 7;
            const PATH_MTU = 1 << 8;
            const TIMEOUT = 1 << 9;
            const RETRY_CNT = 1 << 10;
            const RNR_RETRY = 1 << 11;
            const RQ_PSN = 1 << 12;
            const MAX_QP_RD_ATOMIC = 1 << 13;
            const ALT_PATH = 1 << 14;
            const MIN_RNR_TIMER = 1 << 15;
            const SQ_PSN = 1 << 16;
            const MAX_DEST_RD_ATOMIC = 1 << 17;
            const PATH_MIG_STATE = 1 << 18;
            const CAP = 1 << 19;
            const DEST_QPN = 1 << 20;
            const RATE_LIMIT = 1 << 25;
        }
    }
}

pub use mask::AttrMask;

/// `enum ibv_mtu`: 1 (256 bytes) to 5 (4096 bytes).
pub const MTU_MIN: u8 = 1;
pub const MTU_MAX: u8 = 5;

/// The bits a transition of an RC QP requires and the ones it also accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub required: u32,
    pub optional: u32,
}

/// The transitions of a QP of type `qp_type` with the attribute masks the kernel's verbs layer
/// demands for them; None if `from → to` is not a transition.
pub fn transition(qp_type: QpType, from: QpState, to: QpState) -> Option<Transition> {
    match qp_type {
        QpType::Rc => rc_transition(from, to),
        QpType::Uc => uc_transition(from, to),
        QpType::Ud => ud_transition(from, to),
    }
}

/// The UC transitions: RC's without the attributes of acknowledgements, retries, reads and
/// atomics.
pub fn uc_transition(from: QpState, to: QpState) -> Option<Transition> {
    use mask::*;
    use QpState::*;
    let t = |required, optional| Some(Transition { required, optional });
    match (from, to) {
        (_, Reset) | (_, Err) => t(0, 0),
        (Reset, Init) => t(PKEY_INDEX | PORT | ACCESS_FLAGS, 0),
        (Init, Init) => t(0, PKEY_INDEX | PORT | ACCESS_FLAGS),
        (Init, Rtr) => t(
            AV | PATH_MTU | DEST_QPN | RQ_PSN,
            ALT_PATH | ACCESS_FLAGS | PKEY_INDEX,
        ),
        (Rtr, Rts) => t(SQ_PSN, CUR_STATE | ALT_PATH | ACCESS_FLAGS | PATH_MIG_STATE),
        (Rts, Rts) | (Sqd, Rts) => t(0, CUR_STATE | ACCESS_FLAGS | ALT_PATH | PATH_MIG_STATE),
        (Rts, Sqd) => t(0, EN_SQD_ASYNC_NOTIFY),
        (Sqd, Sqd) => t(
            0,
            PKEY_INDEX | AV | ACCESS_FLAGS | ALT_PATH | PATH_MIG_STATE,
        ),
        _ => None,
    }
}

/// The UD transitions: a qkey instead of access flags, no destination, and a send PSN.
pub fn ud_transition(from: QpState, to: QpState) -> Option<Transition> {
    use mask::*;
    use QpState::*;
    let t = |required, optional| Some(Transition { required, optional });
    match (from, to) {
        (_, Reset) | (_, Err) => t(0, 0),
        (Reset, Init) => t(PKEY_INDEX | PORT | QKEY, 0),
        (Init, Init) => t(0, PKEY_INDEX | PORT | QKEY),
        (Init, Rtr) => t(0, PKEY_INDEX | QKEY),
        (Rtr, Rts) => t(SQ_PSN, CUR_STATE | QKEY),
        (Rts, Rts) | (Sqd, Rts) => t(0, CUR_STATE | QKEY),
        (Rts, Sqd) => t(0, EN_SQD_ASYNC_NOTIFY),
        (Sqd, Sqd) => t(0, PKEY_INDEX | QKEY),
        _ => None,
    }
}

/// The RC transitions of the InfiniBand specification, with the attribute masks the kernel's
/// verbs layer demands for them; None if `from → to` is not a transition.
pub fn rc_transition(from: QpState, to: QpState) -> Option<Transition> {
    use mask::*;
    use QpState::*;
    let t = |required, optional| Some(Transition { required, optional });
    match (from, to) {
        (_, Reset) | (_, Err) => t(0, 0),
        (Reset, Init) => t(PKEY_INDEX | PORT | ACCESS_FLAGS, 0),
        (Init, Init) => t(0, PKEY_INDEX | PORT | ACCESS_FLAGS),
        (Init, Rtr) => t(
            AV | PATH_MTU | DEST_QPN | RQ_PSN | MAX_DEST_RD_ATOMIC | MIN_RNR_TIMER,
            ALT_PATH | ACCESS_FLAGS | PKEY_INDEX,
        ),
        (Rtr, Rts) => t(
            SQ_PSN | MAX_QP_RD_ATOMIC | RETRY_CNT | RNR_RETRY | TIMEOUT,
            CUR_STATE | ALT_PATH | ACCESS_FLAGS | MIN_RNR_TIMER | PATH_MIG_STATE,
        ),
        (Rts, Rts) | (Sqd, Rts) => t(
            0,
            CUR_STATE | ACCESS_FLAGS | ALT_PATH | PATH_MIG_STATE | MIN_RNR_TIMER,
        ),
        (Rts, Sqd) => t(0, EN_SQD_ASYNC_NOTIFY),
        (Sqd, Sqd) => t(
            0,
            PKEY_INDEX
                | PORT
                | AV
                | ACCESS_FLAGS
                | ALT_PATH
                | TIMEOUT
                | RETRY_CNT
                | RNR_RETRY
                | MAX_QP_RD_ATOMIC
                | MAX_DEST_RD_ATOMIC
                | MIN_RNR_TIMER
                | PATH_MIG_STATE,
        ),
        _ => None,
    }
}

/// Why a modify was refused by the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("unknown QP state {0}")]
    UnknownState(u32),
    #[error("cur_qp_state {given:?} is not the QP's state {actual:?}")]
    WrongCurrentState { given: QpState, actual: QpState },
    #[error("no transition {from:?} -> {to:?}")]
    NoTransition { from: QpState, to: QpState },
    #[error("{from:?} -> {to:?} requires attribute mask bits {missing:#x}")]
    MissingAttributes {
        from: QpState,
        to: QpState,
        missing: u32,
    },
    #[error("{from:?} -> {to:?} does not take attribute mask bits {extra:#x}")]
    ExtraAttributes {
        from: QpState,
        to: QpState,
        extra: u32,
    },
}

/// The state a modify of an RC QP in `current` with `attr_mask` and `attr` leads to, if the
/// state machine allows it with this mask.
pub fn check_transition(
    current: QpState,
    attr_mask: u32,
    attr: &QpAttr,
) -> Result<QpState, TransitionError> {
    check_transition_of(QpType::Rc, current, attr_mask, attr)
}

/// [`check_transition`] for a QP of type `qp_type`.
pub fn check_transition_of(
    qp_type: QpType,
    current: QpState,
    attr_mask: u32,
    attr: &QpAttr,
) -> Result<QpState, TransitionError> {
    if attr_mask & mask::CUR_STATE != 0 {
        let given = QpState::from_u32(u32::from(attr.cur_qp_state))
            .ok_or(TransitionError::UnknownState(u32::from(attr.cur_qp_state)))?;
        if given != current {
            return Err(TransitionError::WrongCurrentState {
                given,
                actual: current,
            });
        }
    }
    let next = if attr_mask & mask::STATE != 0 {
        QpState::from_u32(u32::from(attr.qp_state))
            .ok_or(TransitionError::UnknownState(u32::from(attr.qp_state)))?
    } else {
        current
    };
    let t = transition(qp_type, current, next).ok_or(TransitionError::NoTransition {
        from: current,
        to: next,
    })?;
    let missing = t.required & !attr_mask;
    if missing != 0 {
        return Err(TransitionError::MissingAttributes {
            from: current,
            to: next,
            missing,
        });
    }
    let extra = attr_mask & !(t.required | t.optional | mask::STATE);
    if extra != 0 {
        return Err(TransitionError::ExtraAttributes {
            from: current,
            to: next,
            extra,
        });
    }
    Ok(next)
}

/// `struct ibv_qp_cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpCap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

sequential_body!(QpCap {
    max_send_wr: u32,
    max_recv_wr: u32,
    max_send_sge: u32,
    max_recv_sge: u32,
    max_inline_data: u32,
});

/// The attributes of `struct ibv_qp_attr` this device knows (its `ah_attr` flattened; the
/// alternate path is not kept: ALT_PATH is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpAttr {
    pub qp_state: u8,
    pub cur_qp_state: u8,
    pub path_mtu: u8,
    pub path_mig_state: u8,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: u32,
    pub pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    /// `ah_attr.grh.dgid`.
    pub dgid: [u8; 16],
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub is_global: u8,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    /// `ah_attr.port_num`.
    pub ah_port_num: u8,
    pub rate_limit: u32,
    pub cap: QpCap,
}

/// Offsets of a [`QpAttr`] on the wire (bytes 65..68 and 92..96 are zero).
mod field {
    use std::ops::Range;
    pub const QP_STATE: Range<usize> = 0..1;
    pub const CUR_QP_STATE: Range<usize> = 1..2;
    pub const PATH_MTU: Range<usize> = 2..3;
    pub const PATH_MIG_STATE: Range<usize> = 3..4;
    pub const QKEY: Range<usize> = 4..8;
    pub const RQ_PSN: Range<usize> = 8..12;
    pub const SQ_PSN: Range<usize> = 12..16;
    pub const DEST_QP_NUM: Range<usize> = 16..20;
    pub const QP_ACCESS_FLAGS: Range<usize> = 20..24;
    pub const PKEY_INDEX: Range<usize> = 24..26;
    pub const EN_SQD_ASYNC_NOTIFY: Range<usize> = 26..27;
    pub const SQ_DRAINING: Range<usize> = 27..28;
    pub const MAX_RD_ATOMIC: Range<usize> = 28..29;
    pub const MAX_DEST_RD_ATOMIC: Range<usize> = 29..30;
    pub const MIN_RNR_TIMER: Range<usize> = 30..31;
    pub const PORT_NUM: Range<usize> = 31..32;
    pub const TIMEOUT: Range<usize> = 32..33;
    pub const RETRY_CNT: Range<usize> = 33..34;
    pub const RNR_RETRY: Range<usize> = 34..35;
    pub const SGID_INDEX: Range<usize> = 35..36;
    pub const DGID: Range<usize> = 36..52;
    pub const FLOW_LABEL: Range<usize> = 52..56;
    pub const HOP_LIMIT: Range<usize> = 56..57;
    pub const TRAFFIC_CLASS: Range<usize> = 57..58;
    pub const IS_GLOBAL: Range<usize> = 58..59;
    pub const SL: Range<usize> = 59..60;
    pub const DLID: Range<usize> = 60..62;
    pub const SRC_PATH_BITS: Range<usize> = 62..63;
    pub const STATIC_RATE: Range<usize> = 63..64;
    pub const AH_PORT_NUM: Range<usize> = 64..65;
    pub const RATE_LIMIT: Range<usize> = 68..72;
    pub const CAP: Range<usize> = 72..92;
}

impl Body for QpAttr {
    const LEN: usize = 96;
    const NAME: &'static str = "QpAttr";
    fn write(&self, o: &mut [u8]) {
        o.fill(0);
        codec::put(o, field::QP_STATE, self.qp_state);
        codec::put(o, field::CUR_QP_STATE, self.cur_qp_state);
        codec::put(o, field::PATH_MTU, self.path_mtu);
        codec::put(o, field::PATH_MIG_STATE, self.path_mig_state);
        codec::put(o, field::QKEY, self.qkey);
        codec::put(o, field::RQ_PSN, self.rq_psn);
        codec::put(o, field::SQ_PSN, self.sq_psn);
        codec::put(o, field::DEST_QP_NUM, self.dest_qp_num);
        codec::put(o, field::QP_ACCESS_FLAGS, self.qp_access_flags);
        codec::put(o, field::PKEY_INDEX, self.pkey_index);
        codec::put(o, field::EN_SQD_ASYNC_NOTIFY, self.en_sqd_async_notify);
        codec::put(o, field::SQ_DRAINING, self.sq_draining);
        codec::put(o, field::MAX_RD_ATOMIC, self.max_rd_atomic);
        codec::put(o, field::MAX_DEST_RD_ATOMIC, self.max_dest_rd_atomic);
        codec::put(o, field::MIN_RNR_TIMER, self.min_rnr_timer);
        codec::put(o, field::PORT_NUM, self.port_num);
        codec::put(o, field::TIMEOUT, self.timeout);
        codec::put(o, field::RETRY_CNT, self.retry_cnt);
        codec::put(o, field::RNR_RETRY, self.rnr_retry);
        codec::put(o, field::SGID_INDEX, self.sgid_index);
        codec::put(o, field::DGID, self.dgid);
        codec::put(o, field::FLOW_LABEL, self.flow_label);
        codec::put(o, field::HOP_LIMIT, self.hop_limit);
        codec::put(o, field::TRAFFIC_CLASS, self.traffic_class);
        codec::put(o, field::IS_GLOBAL, self.is_global);
        codec::put(o, field::SL, self.sl);
        codec::put(o, field::DLID, self.dlid);
        codec::put(o, field::SRC_PATH_BITS, self.src_path_bits);
        codec::put(o, field::STATIC_RATE, self.static_rate);
        codec::put(o, field::AH_PORT_NUM, self.ah_port_num);
        codec::put(o, field::RATE_LIMIT, self.rate_limit);
        codec::put(o, field::CAP, self.cap);
    }
    fn read(b: &[u8]) -> Self {
        QpAttr {
            qp_state: codec::get(b, field::QP_STATE),
            cur_qp_state: codec::get(b, field::CUR_QP_STATE),
            path_mtu: codec::get(b, field::PATH_MTU),
            path_mig_state: codec::get(b, field::PATH_MIG_STATE),
            qkey: codec::get(b, field::QKEY),
            rq_psn: codec::get(b, field::RQ_PSN),
            sq_psn: codec::get(b, field::SQ_PSN),
            dest_qp_num: codec::get(b, field::DEST_QP_NUM),
            qp_access_flags: codec::get(b, field::QP_ACCESS_FLAGS),
            pkey_index: codec::get(b, field::PKEY_INDEX),
            en_sqd_async_notify: codec::get(b, field::EN_SQD_ASYNC_NOTIFY),
            sq_draining: codec::get(b, field::SQ_DRAINING),
            max_rd_atomic: codec::get(b, field::MAX_RD_ATOMIC),
            max_dest_rd_atomic: codec::get(b, field::MAX_DEST_RD_ATOMIC),
            min_rnr_timer: codec::get(b, field::MIN_RNR_TIMER),
            port_num: codec::get(b, field::PORT_NUM),
            timeout: codec::get(b, field::TIMEOUT),
            retry_cnt: codec::get(b, field::RETRY_CNT),
            rnr_retry: codec::get(b, field::RNR_RETRY),
            sgid_index: codec::get(b, field::SGID_INDEX),
            dgid: codec::get(b, field::DGID),
            flow_label: codec::get(b, field::FLOW_LABEL),
            hop_limit: codec::get(b, field::HOP_LIMIT),
            traffic_class: codec::get(b, field::TRAFFIC_CLASS),
            is_global: codec::get(b, field::IS_GLOBAL),
            sl: codec::get(b, field::SL),
            dlid: codec::get(b, field::DLID),
            src_path_bits: codec::get(b, field::SRC_PATH_BITS),
            static_rate: codec::get(b, field::STATIC_RATE),
            ah_port_num: codec::get(b, field::AH_PORT_NUM),
            rate_limit: codec::get(b, field::RATE_LIMIT),
            cap: codec::get(b, field::CAP),
        }
    }
}

/// Body of [`super::op::CREATE_QP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CreateQp {
    pub pd: u32,
    pub send_cq: u32,
    pub recv_cq: u32,
    /// The SRQ the QP takes its receives from (its handle), or 0 for a receive queue of its
    /// own (then `cap.max_recv_*` size it; with an SRQ they are ignored).
    pub srq: u32,
    pub qp_type: u32,
    pub sq_sig_all: u32,
    pub cap: QpCap,
}

sequential_body!(CreateQp {
    pd: u32,
    send_cq: u32,
    recv_cq: u32,
    srq: u32,
    qp_type: u32,
    sq_sig_all: u32,
    cap: QpCap,
});

/// Reply to [`super::op::CREATE_QP`]: the handle, the virtual QP number and the capacities the
/// QP really has (at least those asked for). The QP's rings come on the attach connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpCreated {
    pub qp: u32,
    pub qpn: u32,
    pub cap: QpCap,
}

sequential_body!(QpCreated {
    qp: u32,
    qpn: u32,
    cap: QpCap,
});

/// Body of [`super::op::MODIFY_QP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModifyQp {
    pub qp: u32,
    pub attr_mask: u32,
    pub attr: QpAttr,
}

sequential_body!(ModifyQp {
    qp: u32,
    attr_mask: u32,
    attr: QpAttr,
});

/// Reply to [`super::op::QUERY_QP`]: every attribute (with `cap`), and `sq_sig_all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpQueried {
    pub attr: QpAttr,
    pub sq_sig_all: u32,
}

sequential_body!(QpQueried {
    attr: QpAttr,
    sq_sig_all: u32,
});

#[cfg(test)]
mod tests {
    use super::mask::*;
    use super::*;

    fn attr(state: QpState) -> QpAttr {
        QpAttr {
            qp_state: state as u8,
            ..QpAttr::default()
        }
    }

    #[test]
    fn rc_pingpong_sequence_is_accepted() {
        let init = STATE | PKEY_INDEX | PORT | ACCESS_FLAGS;
        assert_eq!(
            check_transition(QpState::Reset, init, &attr(QpState::Init)),
            Ok(QpState::Init)
        );
        let rtr = STATE | AV | PATH_MTU | DEST_QPN | RQ_PSN | MAX_DEST_RD_ATOMIC | MIN_RNR_TIMER;
        assert_eq!(
            check_transition(QpState::Init, rtr, &attr(QpState::Rtr)),
            Ok(QpState::Rtr)
        );
        let rts = STATE | TIMEOUT | RETRY_CNT | RNR_RETRY | SQ_PSN | MAX_QP_RD_ATOMIC;
        assert_eq!(
            check_transition(QpState::Rtr, rts, &attr(QpState::Rts)),
            Ok(QpState::Rts)
        );
        for from in [
            QpState::Reset,
            QpState::Init,
            QpState::Rtr,
            QpState::Rts,
            QpState::Sqd,
            QpState::Sqe,
            QpState::Err,
        ] {
            assert_eq!(
                check_transition(from, STATE, &attr(QpState::Err)),
                Ok(QpState::Err)
            );
            assert_eq!(
                check_transition(from, STATE, &attr(QpState::Reset)),
                Ok(QpState::Reset)
            );
        }
    }

    #[test]
    fn wrong_masks_and_transitions_are_refused() {
        // A required bit missing.
        assert!(matches!(
            check_transition(QpState::Reset, STATE | PKEY_INDEX | PORT, &attr(QpState::Init)),
            Err(TransitionError::MissingAttributes { missing, .. }) if missing == ACCESS_FLAGS
        ));
        // A bit the transition does not take.
        assert!(matches!(
            check_transition(QpState::Reset, STATE | PKEY_INDEX | PORT | ACCESS_FLAGS | QKEY, &attr(QpState::Init)),
            Err(TransitionError::ExtraAttributes { extra, .. }) if extra == QKEY
        ));
        // Skipping a state.
        assert!(matches!(
            check_transition(QpState::Reset, STATE, &attr(QpState::Rts)),
            Err(TransitionError::NoTransition { .. })
        ));
        assert!(matches!(
            check_transition(QpState::Init, STATE | SQ_PSN, &attr(QpState::Rts)),
            Err(TransitionError::NoTransition { .. })
        ));
        // No STATE bit: a modify within the current state, with its optional bits only.
        assert_eq!(
            check_transition(QpState::Init, ACCESS_FLAGS, &attr(QpState::Reset)),
            Ok(QpState::Init)
        );
        assert!(check_transition(QpState::Rtr, ACCESS_FLAGS, &attr(QpState::Reset)).is_err());
        // An unknown state number.
        let mut bad = attr(QpState::Init);
        bad.qp_state = 9;
        assert_eq!(
            check_transition(QpState::Reset, STATE, &bad),
            Err(TransitionError::UnknownState(9))
        );
        // CUR_STATE must name the real state.
        let mut cur = attr(QpState::Rts);
        cur.cur_qp_state = QpState::Rtr as u8;
        assert!(check_transition(QpState::Rts, STATE | CUR_STATE, &cur).is_err());
        cur.cur_qp_state = QpState::Rts as u8;
        assert_eq!(
            check_transition(QpState::Rts, STATE | CUR_STATE, &cur),
            Ok(QpState::Rts)
        );
    }

    #[test]
    fn uc_and_ud_sequences_follow_their_own_tables() {
        // ibv_uc_pingpong: INIT with access flags, RTR without the RC-only attributes.
        let init = STATE | PKEY_INDEX | PORT | ACCESS_FLAGS;
        assert_eq!(
            check_transition_of(QpType::Uc, QpState::Reset, init, &attr(QpState::Init)),
            Ok(QpState::Init)
        );
        let rtr = STATE | AV | PATH_MTU | DEST_QPN | RQ_PSN;
        assert_eq!(
            check_transition_of(QpType::Uc, QpState::Init, rtr, &attr(QpState::Rtr)),
            Ok(QpState::Rtr)
        );
        // RC's read and RNR attributes are not UC's.
        assert!(matches!(
            check_transition_of(QpType::Uc, QpState::Init, rtr | MAX_DEST_RD_ATOMIC, &attr(QpState::Rtr)),
            Err(TransitionError::ExtraAttributes { extra, .. }) if extra == MAX_DEST_RD_ATOMIC
        ));
        assert_eq!(
            check_transition_of(
                QpType::Uc,
                QpState::Rtr,
                STATE | SQ_PSN,
                &attr(QpState::Rts)
            ),
            Ok(QpState::Rts)
        );
        assert!(check_transition_of(
            QpType::Uc,
            QpState::Rtr,
            STATE | SQ_PSN | TIMEOUT,
            &attr(QpState::Rts)
        )
        .is_err());
        // ibv_ud_pingpong: INIT with a qkey, RTR with nothing, RTS with a PSN.
        let init = STATE | PKEY_INDEX | PORT | QKEY;
        assert_eq!(
            check_transition_of(QpType::Ud, QpState::Reset, init, &attr(QpState::Init)),
            Ok(QpState::Init)
        );
        assert!(matches!(
            check_transition_of(QpType::Ud, QpState::Reset, STATE | PKEY_INDEX | PORT | ACCESS_FLAGS, &attr(QpState::Init)),
            Err(TransitionError::MissingAttributes { missing, .. }) if missing == QKEY
        ));
        assert_eq!(
            check_transition_of(QpType::Ud, QpState::Init, STATE, &attr(QpState::Rtr)),
            Ok(QpState::Rtr)
        );
        assert!(
            check_transition_of(QpType::Ud, QpState::Init, STATE | AV, &attr(QpState::Rtr))
                .is_err()
        );
        assert_eq!(
            check_transition_of(
                QpType::Ud,
                QpState::Rtr,
                STATE | SQ_PSN,
                &attr(QpState::Rts)
            ),
            Ok(QpState::Rts)
        );
    }

    #[test]
    fn each_transport_allows_its_own_operations() {
        use crate::verbs::work::wr_opcode::*;
        for op in 0..=6u8 {
            assert!(QpType::Rc.allows(u32::from(op)));
        }
        assert!(QpType::Uc.allows(u32::from(RDMA_WRITE_WITH_IMM)));
        assert!(!QpType::Uc.allows(u32::from(RDMA_READ)));
        assert!(!QpType::Uc.allows(u32::from(ATOMIC_FETCH_AND_ADD)));
        assert!(QpType::Ud.allows(u32::from(SEND_WITH_IMM)));
        assert!(!QpType::Ud.allows(u32::from(RDMA_WRITE)));
        assert!(!QpType::Ud.allows(7));
        assert_eq!(QpType::from_u32(QPT_UD), Some(QpType::Ud));
        assert_eq!(QpType::from_u32(8), None);
    }

    #[test]
    fn bodies_round_trip() {
        let mut a = QpAttr {
            qp_state: 2,
            cur_qp_state: 1,
            path_mtu: 3,
            path_mig_state: 1,
            qkey: 7,
            rq_psn: 0xabcdef,
            sq_psn: 0x123456,
            dest_qp_num: 0x10203,
            qp_access_flags: 15,
            pkey_index: 0,
            en_sqd_async_notify: 1,
            sq_draining: 0,
            max_rd_atomic: 4,
            max_dest_rd_atomic: 5,
            min_rnr_timer: 12,
            port_num: 1,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            dgid: [0; 16],
            flow_label: 9,
            sgid_index: 0,
            hop_limit: 1,
            traffic_class: 3,
            is_global: 1,
            dlid: 0,
            sl: 2,
            src_path_bits: 0,
            static_rate: 0,
            ah_port_num: 1,
            rate_limit: 100,
            cap: QpCap {
                max_send_wr: 1,
                max_recv_wr: 500,
                max_send_sge: 1,
                max_recv_sge: 2,
                max_inline_data: 64,
            },
        };
        a.dgid[10] = 0xff;
        a.dgid[11] = 0xff;
        a.dgid[12..].copy_from_slice(&[10, 32, 0, 5]);
        let mut buf = [0u8; 256];
        let m = ModifyQp {
            qp: 3,
            attr_mask: 0x1fffff,
            attr: a,
        };
        let n = m.encode(&mut buf);
        assert_eq!(ModifyQp::decode(&buf[..n]).unwrap(), m);
        let q = QpQueried {
            attr: a,
            sq_sig_all: 1,
        };
        let n = q.encode(&mut buf);
        assert_eq!(QpQueried::decode(&buf[..n]).unwrap(), q);
        let c = CreateQp {
            pd: 1,
            send_cq: 2,
            recv_cq: 3,
            srq: 0,
            qp_type: QPT_RC,
            sq_sig_all: 0,
            cap: a.cap,
        };
        let n = c.encode(&mut buf);
        assert_eq!(CreateQp::decode(&buf[..n]).unwrap(), c);
        let r = QpCreated {
            qp: 4,
            qpn: 0xabcdef,
            cap: a.cap,
        };
        let n = r.encode(&mut buf);
        assert_eq!(QpCreated::decode(&buf[..n]).unwrap(), r);
    }
}
