//! Queue pair attributes on the wire and the RC state machine: which transitions exist, and which
//! attribute-mask bits each requires and allows, as the kernel's verbs layer checks them for
//! rdma-core (a mask that lacks a required bit or names one the transition does not take is
//! EINVAL). The numbers are rdma-core's (`enum ibv_qp_state`, `enum ibv_qp_attr_mask`, `enum
//! ibv_mtu`), which the shim passes through unchanged; the layout test of the shim compares them
//! with the installed headers.
//!
//! Only reliable-connected QPs exist here. The router decides; the shim keeps a copy of the
//! state it was told, for the checks `ibv_post_send`/`ibv_post_recv` make without a round trip.

use super::{u32_at, Body};

/// `enum ibv_qp_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum QpState {
    Reset = 0,
    Init = 1,
    Rtr = 2,
    Rts = 3,
    Sqd = 4,
    Sqe = 5,
    Err = 6,
}

impl QpState {
    pub fn from_u32(v: u32) -> Option<QpState> {
        use QpState::*;
        [Reset, Init, Rtr, Rts, Sqd, Sqe, Err]
            .into_iter()
            .find(|s| *s as u32 == v)
    }

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

/// `enum ibv_qp_type`: the one type supported.
pub const QPT_RC: u32 = 2;

/// `enum ibv_qp_attr_mask`.
pub mod mask {
    pub const STATE: u32 = 1;
    pub const CUR_STATE: u32 = 1 << 1;
    pub const EN_SQD_ASYNC_NOTIFY: u32 = 1 << 2;
    pub const ACCESS_FLAGS: u32 = 1 << 3;
    pub const PKEY_INDEX: u32 = 1 << 4;
    pub const PORT: u32 = 1 << 5;
    pub const QKEY: u32 = 1 << 6;
    pub const AV: u32 = 1 << 7;
    pub const PATH_MTU: u32 = 1 << 8;
    pub const TIMEOUT: u32 = 1 << 9;
    pub const RETRY_CNT: u32 = 1 << 10;
    pub const RNR_RETRY: u32 = 1 << 11;
    pub const RQ_PSN: u32 = 1 << 12;
    pub const MAX_QP_RD_ATOMIC: u32 = 1 << 13;
    pub const ALT_PATH: u32 = 1 << 14;
    pub const MIN_RNR_TIMER: u32 = 1 << 15;
    pub const SQ_PSN: u32 = 1 << 16;
    pub const MAX_DEST_RD_ATOMIC: u32 = 1 << 17;
    pub const PATH_MIG_STATE: u32 = 1 << 18;
    pub const CAP: u32 = 1 << 19;
    pub const DEST_QPN: u32 = 1 << 20;
    pub const RATE_LIMIT: u32 = 1 << 25;
}

/// `enum ibv_mtu`: 1 (256 bytes) to 5 (4096 bytes).
pub const MTU_MIN: u8 = 1;
pub const MTU_MAX: u8 = 5;

/// The bits a transition of an RC QP requires and the ones it also accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub required: u32,
    pub optional: u32,
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

/// The state a modify of a QP in `current` with `attr_mask` and `attr` leads to, if the state
/// machine allows it with this mask.
pub fn check_transition(
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
    let t = rc_transition(current, next).ok_or(TransitionError::NoTransition {
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

impl QpCap {
    pub const LEN: usize = 20;

    fn write(&self, out: &mut [u8]) {
        for (i, v) in [
            self.max_send_wr,
            self.max_recv_wr,
            self.max_send_sge,
            self.max_recv_sge,
            self.max_inline_data,
        ]
        .into_iter()
        .enumerate()
        {
            out[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    fn read(b: &[u8]) -> QpCap {
        QpCap {
            max_send_wr: u32_at(b, 0),
            max_recv_wr: u32_at(b, 4),
            max_send_sge: u32_at(b, 8),
            max_recv_sge: u32_at(b, 12),
            max_inline_data: u32_at(b, 16),
        }
    }
}

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

impl Body for QpAttr {
    const LEN: usize = 96;
    const NAME: &'static str = "QpAttr";
    fn write(&self, o: &mut [u8]) {
        o.fill(0);
        o[0] = self.qp_state;
        o[1] = self.cur_qp_state;
        o[2] = self.path_mtu;
        o[3] = self.path_mig_state;
        o[4..8].copy_from_slice(&self.qkey.to_le_bytes());
        o[8..12].copy_from_slice(&self.rq_psn.to_le_bytes());
        o[12..16].copy_from_slice(&self.sq_psn.to_le_bytes());
        o[16..20].copy_from_slice(&self.dest_qp_num.to_le_bytes());
        o[20..24].copy_from_slice(&self.qp_access_flags.to_le_bytes());
        o[24..26].copy_from_slice(&self.pkey_index.to_le_bytes());
        o[26] = self.en_sqd_async_notify;
        o[27] = self.sq_draining;
        o[28] = self.max_rd_atomic;
        o[29] = self.max_dest_rd_atomic;
        o[30] = self.min_rnr_timer;
        o[31] = self.port_num;
        o[32] = self.timeout;
        o[33] = self.retry_cnt;
        o[34] = self.rnr_retry;
        o[35] = self.sgid_index;
        o[36..52].copy_from_slice(&self.dgid);
        o[52..56].copy_from_slice(&self.flow_label.to_le_bytes());
        o[56] = self.hop_limit;
        o[57] = self.traffic_class;
        o[58] = self.is_global;
        o[59] = self.sl;
        o[60..62].copy_from_slice(&self.dlid.to_le_bytes());
        o[62] = self.src_path_bits;
        o[63] = self.static_rate;
        o[64] = self.ah_port_num;
        o[68..72].copy_from_slice(&self.rate_limit.to_le_bytes());
        self.cap.write(&mut o[72..92]);
    }
    fn read(b: &[u8]) -> Self {
        let mut dgid = [0u8; 16];
        dgid.copy_from_slice(&b[36..52]);
        QpAttr {
            qp_state: b[0],
            cur_qp_state: b[1],
            path_mtu: b[2],
            path_mig_state: b[3],
            qkey: u32_at(b, 4),
            rq_psn: u32_at(b, 8),
            sq_psn: u32_at(b, 12),
            dest_qp_num: u32_at(b, 16),
            qp_access_flags: u32_at(b, 20),
            pkey_index: u16::from_le_bytes([b[24], b[25]]),
            en_sqd_async_notify: b[26],
            sq_draining: b[27],
            max_rd_atomic: b[28],
            max_dest_rd_atomic: b[29],
            min_rnr_timer: b[30],
            port_num: b[31],
            timeout: b[32],
            retry_cnt: b[33],
            rnr_retry: b[34],
            sgid_index: b[35],
            dgid,
            flow_label: u32_at(b, 52),
            hop_limit: b[56],
            traffic_class: b[57],
            is_global: b[58],
            sl: b[59],
            dlid: u16::from_le_bytes([b[60], b[61]]),
            src_path_bits: b[62],
            static_rate: b[63],
            ah_port_num: b[64],
            rate_limit: u32_at(b, 68),
            cap: QpCap::read(&b[72..92]),
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

impl Body for CreateQp {
    const LEN: usize = 44;
    const NAME: &'static str = "CreateQp";
    fn write(&self, o: &mut [u8]) {
        for (i, v) in [
            self.pd,
            self.send_cq,
            self.recv_cq,
            self.srq,
            self.qp_type,
            self.sq_sig_all,
        ]
        .into_iter()
        .enumerate()
        {
            o[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        self.cap.write(&mut o[24..44]);
    }
    fn read(b: &[u8]) -> Self {
        CreateQp {
            pd: u32_at(b, 0),
            send_cq: u32_at(b, 4),
            recv_cq: u32_at(b, 8),
            srq: u32_at(b, 12),
            qp_type: u32_at(b, 16),
            sq_sig_all: u32_at(b, 20),
            cap: QpCap::read(&b[24..44]),
        }
    }
}

/// Reply to [`super::op::CREATE_QP`]: the handle, the virtual QP number and the capacities the
/// QP really has (at least those asked for). The QP's rings come on the attach connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpCreated {
    pub qp: u32,
    pub qpn: u32,
    pub cap: QpCap,
}

impl Body for QpCreated {
    const LEN: usize = 28;
    const NAME: &'static str = "QpCreated";
    fn write(&self, o: &mut [u8]) {
        o[0..4].copy_from_slice(&self.qp.to_le_bytes());
        o[4..8].copy_from_slice(&self.qpn.to_le_bytes());
        self.cap.write(&mut o[8..28]);
    }
    fn read(b: &[u8]) -> Self {
        QpCreated {
            qp: u32_at(b, 0),
            qpn: u32_at(b, 4),
            cap: QpCap::read(&b[8..28]),
        }
    }
}

/// Body of [`super::op::MODIFY_QP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModifyQp {
    pub qp: u32,
    pub attr_mask: u32,
    pub attr: QpAttr,
}

impl Body for ModifyQp {
    const LEN: usize = 8 + QpAttr::LEN;
    const NAME: &'static str = "ModifyQp";
    fn write(&self, o: &mut [u8]) {
        o[0..4].copy_from_slice(&self.qp.to_le_bytes());
        o[4..8].copy_from_slice(&self.attr_mask.to_le_bytes());
        self.attr.write(&mut o[8..8 + QpAttr::LEN]);
    }
    fn read(b: &[u8]) -> Self {
        ModifyQp {
            qp: u32_at(b, 0),
            attr_mask: u32_at(b, 4),
            attr: QpAttr::read(&b[8..8 + QpAttr::LEN]),
        }
    }
}

/// Reply to [`super::op::QUERY_QP`]: every attribute (with `cap`), and `sq_sig_all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpQueried {
    pub attr: QpAttr,
    pub sq_sig_all: u32,
}

impl Body for QpQueried {
    const LEN: usize = QpAttr::LEN + 4;
    const NAME: &'static str = "QpQueried";
    fn write(&self, o: &mut [u8]) {
        self.attr.write(&mut o[..QpAttr::LEN]);
        o[QpAttr::LEN..QpAttr::LEN + 4].copy_from_slice(&self.sq_sig_all.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        QpQueried {
            attr: QpAttr::read(&b[..QpAttr::LEN]),
            sq_sig_all: u32_at(b, QpAttr::LEN),
        }
    }
}

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
