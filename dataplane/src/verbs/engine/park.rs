//! Parking: what the shard may sleep on and until when. Before parking, the engine raises the
//! parked flag of every ring whose next post needs it (so the poster rings the shard's
//! doorbell) and names the earliest retry timer; after waking it lowers them. The timers are
//! the RC ones: the responder's RNR timer, the local ACK timeout, and the retry of a QP held
//! back by a full CQ.

use super::{Engine, Route, Wait};
use crate::verbs::ids::AttachmentId;
use freeflow_proto::verbs::qp::QpState;
use freeflow_proto::RingError;
use std::time::{Duration, Instant};

/// How often a QP held back by a full CQ retries.
pub(in crate::verbs) const CQ_FULL_RETRY: Duration = Duration::from_millis(1);

/// What the shard should do about parking.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParkPlan {
    /// A queue has work: do not park.
    pub busy: bool,
    /// Wake up by then (a retry timer), even if nothing rings.
    pub deadline: Option<Instant>,
}

impl ParkPlan {
    /// Wakes up by `deadline` at the latest.
    fn wake_by(&mut self, deadline: Instant) {
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
    }
}

/// The RNR NAK timer of the InfiniBand specification (encoded 0..=31), in nanoseconds.
pub(in crate::verbs) fn rnr_timer(code: u8) -> Duration {
    const MICROS_X100: [u64; 32] = [
        65536, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
        1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152,
    ];
    Duration::from_micros(MICROS_X100[usize::from(code & 31)] * 10)
}

/// The local ACK timeout (4.096 µs × 2^timeout); 0 means infinite, which retries every
/// millisecond here without ever giving up.
pub(in crate::verbs) fn ack_timeout(code: u8) -> Option<Duration> {
    if code == 0 {
        return None;
    }
    Some(Duration::from_nanos(4096u64 << code.min(31)))
}

impl Engine {
    /// Raises the parked flag on every queue the engine would act on when something is posted:
    /// the send rings of QPs in RTS that are not waiting, both rings of QPs in the error state,
    /// and the receive rings of responders a SEND waits on (RNR). Other receive rings stay
    /// unflagged: a posted receive needs no action until a SEND arrives. Waits (RNR and
    /// transport timers, full CQs) set the deadline of the park.
    pub fn prepare_park(&mut self) -> ParkPlan {
        let mut plan = ParkPlan::default();
        let mut broken = Vec::new();
        let mut rnr_peers = Vec::new();
        for qp in self.qps.iter_mut() {
            if qp.broken {
                continue;
            }
            let result = match (qp.state, &qp.pending, qp.held) {
                (QpState::Rts, None, _) => qp.sq.prepare_park(),
                (QpState::Rts | QpState::Err, _, Some(held)) => {
                    plan.wake_by(held);
                    continue;
                }
                (QpState::Rts, Some(p), None) => {
                    let deadline = match p.wait {
                        Wait::Ready => {
                            plan.busy = true;
                            continue;
                        }
                        Wait::Rnr { deadline, .. } => {
                            if let Some(Route::Local { qpn, .. }) = qp.route {
                                rnr_peers.push(qpn);
                            }
                            deadline
                        }
                        Wait::Transport { deadline, .. } => deadline,
                        // A socket of the transport wakes the shard.
                        Wait::Remote => continue,
                    };
                    plan.wake_by(deadline);
                    continue;
                }
                // An SRQ is not the QP's to flush: only its own receive ring.
                (QpState::Err, None, None) if qp.srq.is_some() => qp.sq.prepare_park(),
                (QpState::Err, None, None) => qp
                    .sq
                    .prepare_park()
                    .and_then(|idle| Ok(idle && qp.rq.prepare_park()?)),
                (QpState::Err, Some(_), None) => Ok(false),
                _ => continue,
            };
            match result {
                Ok(true) => {}
                Ok(false) => plan.busy = true,
                Err(e) => {
                    qp.broken = true;
                    broken.push((qp.owner, e));
                }
            }
        }
        #[cfg(feature = "rdma-hw")]
        self.device_park(&mut plan, &mut broken);
        self.flag_rnr_peers(&rnr_peers, &mut plan, &mut broken);
        self.remote_park(&mut plan);
        for (owner, e) in broken {
            self.break_owner(owner, e);
        }
        plan
    }

    /// The transport's part: busy while it holds bytes to parse, awake by its connects' and its
    /// QPs' deadlines (a refused request's retry, an answer overdue).
    fn remote_park(&self, plan: &mut ParkPlan) {
        if !self.remote.active() {
            return;
        }
        plan.busy |= self.remote.busy();
        if self.remote.stalled() {
            plan.wake_by(Instant::now() + CQ_FULL_RETRY);
        }
        if let Some(d) = self.remote.deadline() {
            plan.wake_by(d);
        }
        for held in &self.held_acks {
            plan.wake_by(held.due);
        }
        for qp in self.qps.iter() {
            let Some(rq) = qp.remote.as_deref() else {
                continue;
            };
            if let Some(r) = rq.resend {
                plan.wake_by(r.at);
            } else if let (Some(f), Some(budget)) =
                (rq.inflight.front(), crate::verbs::exec::silence_budget(qp))
            {
                plan.wake_by(f.sent_at + budget);
            }
        }
    }

    /// A SEND waiting for a receive retries at once when the responder posts one, instead of
    /// sleeping out its RNR timer: the responder's receive ring rings the doorbell too.
    fn flag_rnr_peers(
        &mut self,
        rnr_peers: &[u32],
        plan: &mut ParkPlan,
        broken: &mut Vec<(AttachmentId, RingError)>,
    ) {
        for &qpn in rnr_peers {
            let Some(&index) = self.qpns.get(&qpn) else {
                continue;
            };
            let Some(peer) = self.qps.get_mut(index).filter(|q| !q.broken) else {
                continue;
            };
            let result = match peer.srq {
                None => peer.rq.prepare_park().map_err(|e| {
                    peer.broken = true;
                    (peer.owner, e)
                }),
                // The receive comes from the SRQ: its ring rings the doorbell.
                Some(i) => match self.srqs.get_mut(i).filter(|q| !q.broken) {
                    None => continue,
                    Some(q) => q.ring.prepare_park().map_err(|e| {
                        q.broken = true;
                        (q.owner, e)
                    }),
                },
            };
            match result {
                Ok(true) => {}
                Ok(false) => plan.busy = true,
                Err(owner_error) => broken.push(owner_error),
            }
        }
    }

    /// The device path's part: a receive posted to a device QP must reach the device at once
    /// (its receive ring rings the doorbell too); the device's CQs are armed, so that their
    /// completion channel wakes the shard (without a channel they are polled every
    /// [`CQ_FULL_RETRY`] while the device has QPs).
    #[cfg(feature = "rdma-hw")]
    fn device_park(&mut self, plan: &mut ParkPlan, broken: &mut Vec<(AttachmentId, RingError)>) {
        let (moved, wake) = self.device_arm(Instant::now() + CQ_FULL_RETRY);
        plan.busy |= moved;
        if let Some(wake) = wake {
            plan.wake_by(wake);
        }
        if !self.device.as_deref().is_some_and(|d| d.has_qps()) {
            return;
        }
        for qp in self.qps.iter_mut() {
            if qp.broken || !matches!(qp.state, QpState::Init | QpState::Rtr | QpState::Rts) {
                continue;
            }
            match qp.rq.prepare_park() {
                Ok(true) => {}
                Ok(false) => plan.busy = true,
                Err(e) => {
                    qp.broken = true;
                    broken.push((qp.owner, e));
                }
            }
        }
    }

    /// Lowers every parked flag after the shard woke.
    pub fn unpark(&self) {
        for qp in self.qps.iter() {
            qp.sq.unpark();
            qp.rq.unpark();
        }
        for srq in self.srqs.iter() {
            srq.ring.unpark();
        }
    }
}
