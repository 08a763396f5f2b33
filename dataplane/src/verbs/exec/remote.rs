//! The requester's side of RDMA between hosts: a send WQE of a QP whose destination is on
//! another host becomes a request frame on the connection to that host's router, and waits in
//! the QP's in-flight queue for the response, which completes it (in order: an ACK of a
//! request acknowledges every earlier one of the QP).
//!
//! A QP has at most [`QP_INFLIGHT_MAX`] requests and [`QP_INFLIGHT_BYTES`] in flight (a larger
//! message goes alone) and at most `max_rd_atomic` READs and atomics, so one QP cannot fill
//! the connection for the others. A NAK that asks for a retry (RNR, a destination not ready, a
//! full CQ) sends every request from the refused one again after the timer, counting
//! `rnr_retry` or `retry_cnt`; a fatal NAK completes its request with the remote error. A
//! request that went on a connection that broke, or that got no answer within the QP's
//! timeout × (retry_cnt + 1), completes with IBV_WC_RETRY_EXC_ERR; the QP is then in the error
//! state and the flush completes the rest.

use super::copy::{copy, resolve_list, resolve_shared_list, Source, Views};
use super::{pending_of, Outcome};
use crate::verbs::engine::{ack_timeout, rnr_timer, Context, Engine, Fault, Route, Wait};
use crate::verbs::engine::{Qp, CQ_FULL_RETRY};
use crate::verbs::ids::{ObjectKey, QpId};
use crate::verbs::remote::{
    Conn, InFlight, Link, Next, OutConn, OutKey, RemoteQp, Resend, QP_INFLIGHT_BYTES,
    QP_INFLIGHT_MAX, SILENCE_FLOOR, ZERO_COPY_MIN,
};
use crate::verbs::send_op::SendOp;
use crate::verbs::Need;
use crate::verbs::SharedSpan;
use freeflow_proto::verbs::qp::QpState;
use freeflow_proto::verbs::remote::{nak, seq_before, FrameHeader, FrameKind, MAX_PAYLOAD};
use freeflow_proto::verbs::work::{send_flags, Cqe, SendWqe, MAX_SGE};
use freeflow_proto::verbs::{limits, wc_status};
use std::net::Ipv4Addr;
use std::time::Instant;

/// Whether a response was taken, or must wait (no room in the send CQ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    Done,
    Blocked,
}

/// The frame kind of an operation.
fn kind_of(op: SendOp) -> FrameKind {
    match op {
        SendOp::Send => FrameKind::Send,
        SendOp::SendWithImm => FrameKind::SendWithImm,
        SendOp::Write => FrameKind::Write,
        SendOp::WriteWithImm => FrameKind::WriteWithImm,
        SendOp::Read => FrameKind::Read,
        SendOp::CompareSwap => FrameKind::CompareSwap,
        SendOp::FetchAdd => FrameKind::FetchAdd,
    }
}

/// What a request is, for one QP: the WQE, its slot copy, and where it goes.
struct Request<'a> {
    wqe: &'a SendWqe,
    op: SendOp,
    slot: &'a [u8],
    dst_ip: Ipv4Addr,
    dst_qpn: u32,
    seq: u32,
    /// An ACK of the destination QP's requests riding on this one.
    ack: Option<u32>,
}

/// Builds the request frame of `r` (a WQE of `qp`, owned by `ctx`) onto `conn`, after the
/// local checks. Returns the payload bytes it stands for, or the status of a local error
/// (nothing queued then).
fn frame_request(ctx: &Context, qp: &Qp, r: &Request<'_>, conn: &mut Conn) -> Result<u64, u32> {
    let h = r.wqe.header;
    let inline = h.has(send_flags::INLINE);
    let reads_back = r.op == SendOp::Read || r.op.is_atomic();
    if inline && reads_back {
        return Err(wc_status::LOC_QP_OP_ERR);
    }
    let zero_copy = !inline
        && matches!(
            r.op,
            SendOp::Send | SendOp::SendWithImm | SendOp::Write | SendOp::WriteWithImm
        )
        && estimate(r.wqe, r.op, r.slot) >= ZERO_COPY_MIN;
    if zero_copy {
        return frame_shared(ctx, qp, r, conn);
    }
    let mut local: Views<'_> = [const { None }; MAX_SGE as usize];
    let total = if inline {
        r.wqe.inline(r.slot).len() as u64
    } else {
        resolve_list(
            &ctx.table,
            qp.pd,
            r.wqe.sges(r.slot),
            r.op.local_need(),
            &mut local,
        )
        .map_err(|()| wc_status::LOC_PROT_ERR)?
    };
    if total > limits::MAX_MSG_SZ || total > u64::from(MAX_PAYLOAD) {
        return Err(wc_status::LOC_LEN_ERR);
    }
    if r.op.is_atomic() && local[0].as_ref().is_none_or(|v| v.len() < 8) {
        return Err(wc_status::LOC_LEN_ERR);
    }
    let mut f = request_header(ctx, qp, r);
    if r.op == SendOp::Read {
        f.arg = total as u32;
    } else if !r.op.is_atomic() {
        f.len = total as u32;
    }
    conn.push_frame(&f, |buf| {
        if inline {
            buf.copy_from_slice(r.wqe.inline(r.slot));
            return Ok::<(), u32>(());
        }
        let mut at = 0;
        for v in local.iter().flatten() {
            let n = v.len().min(buf.len() - at);
            v.read_at(0, &mut buf[at..at + n])
                .map_err(|_| wc_status::LOC_PROT_ERR)?;
            at += n;
        }
        Ok(())
    })?;
    Ok(if r.op.is_atomic() { 8 } else { total })
}

/// As [`frame_request`] for a SEND or WRITE of at least [`ZERO_COPY_MIN`] bytes from
/// registered memory: the payload is not copied, the connection sends it straight from the
/// container's regions (which stay mapped until it went, whatever the container does
/// meanwhile).
fn frame_shared(ctx: &Context, qp: &Qp, r: &Request<'_>, conn: &mut Conn) -> Result<u64, u32> {
    let mut spans: [Option<SharedSpan>; MAX_SGE as usize] = [const { None }; MAX_SGE as usize];
    let total = resolve_shared_list(
        &ctx.table,
        qp.pd,
        r.wqe.sges(r.slot),
        r.op.local_need(),
        &mut spans,
    )
    .map_err(|()| wc_status::LOC_PROT_ERR)?;
    if total > limits::MAX_MSG_SZ || total > u64::from(MAX_PAYLOAD) {
        return Err(wc_status::LOC_LEN_ERR);
    }
    let mut f = request_header(ctx, qp, r);
    f.len = total as u32;
    conn.push_frame_shared(&f, spans.into_iter().flatten());
    Ok(total)
}

/// The header of request `r` of `qp` (owned by `ctx`), without its lengths.
fn request_header(ctx: &Context, qp: &Qp, r: &Request<'_>) -> FrameHeader {
    let h = r.wqe.header;
    let mut f = FrameHeader::new(kind_of(r.op));
    f.src_ip = ctx.container.ip;
    f.dst_ip = r.dst_ip;
    f.src_qpn = qp.qpn;
    f.dst_qpn = r.dst_qpn;
    f.seq = r.seq;
    f.ack = r.ack;
    f.rkey = h.rkey;
    f.imm = h.imm_data;
    f.remote_addr = h.remote_addr;
    f.compare_add = h.compare_add;
    f.swap = h.swap;
    f
}

/// The payload bytes a WQE stands for, from its list's lengths (before resolving it).
pub(super) fn estimate(wqe: &SendWqe, op: SendOp, slot: &[u8]) -> u64 {
    if op.is_atomic() {
        8
    } else if wqe.header.has(send_flags::INLINE) {
        wqe.inline(slot).len() as u64
    } else {
        wqe.sges(slot).map(|s| u64::from(s.length)).sum()
    }
}

impl Engine {
    /// One attempt at the pending WQE of the QP at `index`, whose destination is QP `dst_qpn`
    /// of `dst_ip` on `host`: sends its request if the QP and the connection have room.
    pub(super) fn execute_remote(
        &mut self,
        index: QpId,
        (link, dst_ip, dst_qpn): (Link, Ipv4Addr, u32),
        now: &mut Option<Instant>,
    ) -> Result<Outcome, Fault> {
        let t = *now.get_or_insert_with(Instant::now);
        let qp = self.qps.entry_mut(index)?;
        let p = *pending_of(&mut qp.pending, index)?;
        let rq = remote_of(&mut qp.remote, index)?;
        let reads_back = p.op == SendOp::Read || p.op.is_atomic();
        let est = estimate(&p.wqe, p.op, &qp.sq_slot);
        let full = rq.resend.is_some()
            || rq.inflight.len() >= QP_INFLIGHT_MAX.min(qp.cap.max_send_wr.max(1) as usize)
            || (rq.inflight_bytes > 0 && rq.inflight_bytes + est > QP_INFLIGHT_BYTES)
            || (reads_back && rq.reads >= u32::from(qp.attr.max_rd_atomic.max(1)))
            || (p.wqe.header.has(send_flags::FENCE) && rq.reads > 0);
        if full {
            return self.wait_remote(index);
        }
        let conn = match self.remote.out_conn(link, dst_ip, t) {
            OutConn::Up(c) if !c.tx_full() => c,
            OutConn::Up(_) | OutConn::Connecting => return self.wait_remote(index),
            OutConn::Down => return self.transport_wait(index, now),
        };
        let qp = self.qps.entry(index)?;
        let ctx = super::ops::context_in(&self.contexts, qp.owner)?;
        let seq = qp.remote.as_ref().map_or(0, |r| r.next_seq);
        // The ACK this QP holds for its peer's requests rides on this request.
        let carried = self
            .held_acks
            .iter()
            .position(|a| a.qp == index && a.ack.dst_qpn == dst_qpn && a.ack.dst_ip == dst_ip);
        let request = Request {
            wqe: &p.wqe,
            op: p.op,
            slot: &qp.sq_slot,
            dst_ip,
            dst_qpn,
            seq,
            ack: carried.map(|i| self.held_acks[i].ack.seq),
        };
        let token = conn.token;
        let bytes = match frame_request(ctx, qp, &request, conn) {
            Ok(bytes) => bytes,
            // A local error completes in order: after what is in flight.
            Err(status) if qp.remote.as_ref().is_none_or(|r| r.inflight.is_empty()) => {
                return self.fail_pending(index, status)
            }
            Err(_) => return self.wait_remote(index),
        };
        let acked = carried.map(|i| self.held_acks.swap_remove(i).ack.seq);
        let qp = self.qps.entry_mut(index)?;
        let rq = remote_of(&mut qp.remote, index)?;
        if acked.is_some() {
            rq.acked_ahead = acked;
        }
        let signaled = qp.sq_sig_all || p.wqe.header.has(send_flags::SIGNALED);
        let mut slot = rq.spare.pop().unwrap_or_default();
        slot.clear();
        slot.extend_from_slice(&qp.sq_slot);
        rq.inflight.push_back(InFlight {
            wqe: p.wqe,
            op: p.op,
            seq,
            slot,
            bytes,
            signaled,
            sent_at: t,
            conn: token,
        });
        rq.signaled += u32::from(signaled);
        rq.next_seq = seq.wrapping_add(1);
        rq.inflight_bytes += bytes;
        rq.reads += u32::from(reads_back);
        qp.pending = None;
        Ok(Outcome::Done)
    }

    /// The pending WQE waits for the transport (an answer, room on the connection, the
    /// connect): a socket wakes the shard.
    fn wait_remote(&mut self, index: QpId) -> Result<Outcome, Fault> {
        let qp = self.qps.entry_mut(index)?;
        pending_of(&mut qp.pending, index)?.wait = Wait::Remote;
        Ok(Outcome::Waiting)
    }

    /// Before the QP at `index` (with a destination on another host) takes new work: fails
    /// the oldest request in flight if its connection broke or its answer is overdue, and
    /// sends the refused requests again when their timer is up.
    pub(super) fn tick_remote(
        &mut self,
        index: QpId,
        now: &mut Option<Instant>,
    ) -> Result<(), Fault> {
        let qp = self.qps.entry(index)?;
        let (Some(Route::Remote { link, ip, .. }), Some(rq)) = (qp.route, qp.remote.as_deref())
        else {
            return Ok(());
        };
        let Some(front) = rq.inflight.front() else {
            return Ok(());
        };
        let t = *now.get_or_insert_with(Instant::now);
        let conn = self.remote.out_token(link, ip);
        let lost = rq
            .inflight
            .iter()
            .any(|f| Some(f.conn) != conn.map(|c| c.0));
        // No answer, and nothing at all heard on the connection, for the QP's budget.
        let heard = conn.map_or(front.sent_at, |c| c.1.max(front.sent_at));
        let overdue =
            rq.resend.is_none() && silence_budget(qp).is_some_and(|budget| t >= heard + budget);
        match rq.resend {
            _ if (lost && rq.resend.is_none()) || overdue => {
                self.complete_front(index, wc_status::RETRY_EXC_ERR, 0)?;
            }
            Some(Resend { at }) if t >= at => self.resend(index, (link, ip), t)?,
            _ => {}
        }
        Ok(())
    }

    /// Sends every request in flight of the QP at `index` again (the responder dropped them
    /// from the refused one on), on the connection over `link` to `dst`.
    fn resend(
        &mut self,
        index: QpId,
        (link, dst): (Link, Ipv4Addr),
        t: Instant,
    ) -> Result<(), Fault> {
        let conn = match self.remote.out_conn(link, dst, t) {
            OutConn::Up(c) => c,
            OutConn::Connecting => return Ok(()),
            OutConn::Down => {
                return self
                    .complete_front(index, wc_status::RETRY_EXC_ERR, 0)
                    .map(drop)
            }
        };
        let token = conn.token;
        let qp = self.qps.entry(index)?;
        let Some(Route::Remote { ip, qpn, .. }) = qp.route else {
            return Ok(());
        };
        let ctx = super::ops::context_in(&self.contexts, qp.owner)?;
        let rq = qp.remote.as_deref().ok_or(Fault::Missing {
            what: "transport state of queue pair",
            index: index.index(),
        })?;
        let mut failed = None;
        for f in &rq.inflight {
            let request = Request {
                wqe: &f.wqe,
                op: f.op,
                slot: &f.slot,
                dst_ip: ip,
                dst_qpn: qpn,
                seq: f.seq,
                ack: None,
            };
            if let Err(status) = frame_request(ctx, qp, &request, conn) {
                failed = Some(status);
                break;
            }
        }
        let qp = self.qps.entry_mut(index)?;
        let rq = remote_of(&mut qp.remote, index)?;
        rq.resend = None;
        for f in rq.inflight.iter_mut() {
            f.sent_at = t;
            f.conn = token;
        }
        if let Some(status) = failed {
            // Its memory went meanwhile: the rest was not sent again, and the QP fails.
            self.complete_front(index, status, 0)?;
        }
        Ok(())
    }

    /// Completes the oldest request in flight of the QP at `index` with `status` (and
    /// `byte_len`); an error moves the QP to the error state. Ok(false): no room in its send
    /// CQ for the completion (nothing changed).
    fn complete_front(&mut self, index: QpId, status: u32, byte_len: u32) -> Result<bool, Fault> {
        let qp = self.qps.entry_mut(index)?;
        let (send_cq, qpn) = (qp.send_cq, qp.qpn);
        let rq = remote_of(&mut qp.remote, index)?;
        let Some(front) = rq.inflight.front() else {
            return Ok(true);
        };
        let signaled = front.signaled;
        let failed = status != wc_status::SUCCESS;
        if (signaled || failed) && !self.room(send_cq, 1) {
            return Ok(false);
        }
        let qp = self.qps.entry_mut(index)?;
        let rq = remote_of(&mut qp.remote, index)?;
        let Some(f) = rq.inflight.pop_front() else {
            return Ok(true);
        };
        rq.inflight_bytes -= f.bytes;
        rq.reads -= u32::from(f.op == SendOp::Read || f.op.is_atomic());
        rq.signaled -= u32::from(f.signaled);
        if rq.spare.len() < 64 {
            rq.spare.push(f.slot);
        }
        if failed {
            qp.state = QpState::Err;
        } else {
            rq.rnr_left = None;
            rq.retry_left = None;
        }
        if signaled || failed {
            let cqe = Cqe {
                wr_id: f.wqe.header.wr_id,
                status,
                opcode: f.op.wc_opcode(),
                qp_num: qpn,
                byte_len,
                ..Cqe::default()
            };
            self.push_cqe(send_cq, &cqe);
        }
        Ok(true)
    }

    /// An ACK that rode on request `h` from the other end of `link`: our QP `h.dst_qpn`'s
    /// requests up to `seq` are acknowledged, as by an ACK frame from there. False: no room in
    /// the send CQ for their completions (the request waits with it).
    pub(super) fn take_carried_ack(
        &mut self,
        link: Link,
        h: &FrameHeader,
        seq: u32,
        now: Instant,
    ) -> bool {
        let mut ack = FrameHeader::new(FrameKind::Ack);
        ack.src_ip = h.src_ip;
        ack.dst_ip = h.dst_ip;
        ack.src_qpn = h.src_qpn;
        ack.dst_qpn = h.dst_qpn;
        ack.seq = seq;
        match self.on_response(link, &ack, &[], now) {
            Ok(taken) => taken == Taken::Done,
            Err((index, fault)) => {
                self.fault_qp(index, fault);
                true
            }
        }
    }

    /// Handles the responses that came on our connections.
    pub(super) fn take_responses(&mut self, now: Instant) -> usize {
        let mut work = 0;
        // Most passes find nothing: no list of hosts is made for them.
        if !self.remote.out.values().any(Conn::has_frame) {
            return 0;
        }
        let keys: Vec<OutKey> = self.remote.out.keys().copied().collect();
        for key in keys {
            while let Some(c) = self.remote.out.get_mut(&key) {
                let (h, range) = match c.next() {
                    Ok(Next::Frame(h, range)) if !h.kind.is_request() => (h, range),
                    Ok(Next::Frame(..)) => {
                        self.remote.close_out(key, "a request on a response stream");
                        break;
                    }
                    Ok(Next::Nothing) => break,
                    Err(e) => {
                        self.remote.close_out(key, &format!("bad frame: {e}"));
                        break;
                    }
                };
                let rx = std::mem::take(&mut c.rx);
                let taken = self
                    .on_response(key.0, &h, &rx[range.clone()], now)
                    .unwrap_or_else(|(index, fault)| {
                        self.fault_qp(index, fault);
                        Taken::Done
                    });
                let Some(c) = self.remote.out.get_mut(&key) else {
                    break;
                };
                c.rx = rx;
                if taken == Taken::Blocked {
                    break;
                }
                c.consume(range.end);
                work += 1;
            }
        }
        work
    }

    /// One response from the other end of `link`: completes the requests it answers.
    fn on_response(
        &mut self,
        link: Link,
        h: &FrameHeader,
        payload: &[u8],
        now: Instant,
    ) -> Result<Taken, (QpId, Fault)> {
        let Some(index) = self.qp_by_number(h.dst_qpn) else {
            return Ok(Taken::Done);
        };
        let fault = |f| (index, f);
        let Some(qp) = self.qps.get(index) else {
            return Ok(Taken::Done);
        };
        let expected = Route::Remote {
            link,
            ip: h.src_ip,
            qpn: h.src_qpn,
        };
        // Only the router of the QP's destination answers for it; a QP that left RTS had its
        // requests flushed.
        if qp.broken || qp.state != QpState::Rts || qp.route != Some(expected) {
            return Ok(Taken::Done);
        }
        // A NAK that asks for a retry says nothing about earlier requests (the responder
        // refuses every request of a QP that is not ready): only the oldest one's counts, and
        // only once.
        if h.kind == FrameKind::Nak && matches!(h.code, nak::RNR | nak::NOT_READY | nak::BUSY) {
            let rq = qp.remote.as_deref();
            let oldest = rq.and_then(|r| r.inflight.front()).map(|f| f.seq);
            if oldest != Some(h.seq) || rq.is_some_and(|r| r.resend.is_some()) {
                return Ok(Taken::Done);
            }
        }
        // Everything before the answered request was executed.
        loop {
            let qp = self.qps.entry(index).map_err(fault)?;
            let front = qp.remote.as_ref().and_then(|r| r.inflight.front());
            match front {
                Some(f) if seq_before(f.seq, h.seq) => {
                    let len = if f.op.is_atomic() { 8 } else { f.bytes as u32 };
                    if !self
                        .complete_front(index, wc_status::SUCCESS, len)
                        .map_err(fault)?
                    {
                        return Ok(Taken::Blocked);
                    }
                }
                Some(f) if f.seq == h.seq => break,
                _ => return Ok(Taken::Done),
            }
        }
        self.answer_front(index, h, payload, now).map_err(fault)
    }

    /// The response `h` (with `payload`) to the oldest request in flight of the QP at `index`.
    fn answer_front(
        &mut self,
        index: QpId,
        h: &FrameHeader,
        payload: &[u8],
        now: Instant,
    ) -> Result<Taken, Fault> {
        let done = |ok: bool| if ok { Taken::Done } else { Taken::Blocked };
        let status = match h.kind {
            FrameKind::Ack => wc_status::SUCCESS,
            FrameKind::ReadData | FrameKind::AtomicData => {
                self.land_data(index, h.kind, payload)?
            }
            FrameKind::Nak => return self.on_nak(index, h, now),
            _ => return Ok(Taken::Done),
        };
        let qp = self.qps.entry(index)?;
        let len = qp
            .remote
            .as_ref()
            .and_then(|r| r.inflight.front())
            .map_or(0, |f| if f.op.is_atomic() { 8 } else { f.bytes as u32 });
        Ok(done(self.complete_front(index, status, len)?))
    }

    /// Writes the data of a READ response (or an atomic's original value) into the local
    /// list of the oldest request in flight; the status of its completion.
    fn land_data(&mut self, index: QpId, kind: FrameKind, payload: &[u8]) -> Result<u32, Fault> {
        let qp = self.qps.entry(index)?;
        let ctx = super::ops::context_in(&self.contexts, qp.owner)?;
        let Some(f) = qp.remote.as_ref().and_then(|r| r.inflight.front()) else {
            return Ok(wc_status::SUCCESS);
        };
        let expected = if kind == FrameKind::AtomicData {
            8
        } else {
            f.bytes
        };
        let wanted = (f.op == SendOp::Read && kind == FrameKind::ReadData)
            || (f.op.is_atomic() && kind == FrameKind::AtomicData);
        if !wanted || payload.len() as u64 != expected {
            return Ok(wc_status::BAD_RESP_ERR);
        }
        let mut local: Views<'_> = [const { None }; MAX_SGE as usize];
        if resolve_list(
            &ctx.table,
            qp.pd,
            f.wqe.sges(&f.slot),
            Need::LocalWrite,
            &mut local,
        )
        .is_err()
        {
            return Ok(wc_status::LOC_PROT_ERR);
        }
        if kind == FrameKind::AtomicData {
            let Some(Some(first)) = local.first() else {
                return Ok(wc_status::LOC_LEN_ERR);
            };
            first.slice(0, 8)?.write_at(0, payload)?;
        } else {
            copy(&local, Source::Bytes(payload), expected)?;
        }
        Ok(wc_status::SUCCESS)
    }

    /// A NAK of the oldest request in flight: a retry after the timer it calls for (counted
    /// against `rnr_retry` or `retry_cnt`), or the remote error.
    fn on_nak(&mut self, index: QpId, h: &FrameHeader, now: Instant) -> Result<Taken, Fault> {
        let fatal = match h.code {
            nak::REM_ACCESS => Some(wc_status::REM_ACCESS_ERR),
            nak::REM_INV_REQ => Some(wc_status::REM_INV_REQ_ERR),
            nak::REM_OP => Some(wc_status::REM_OP_ERR),
            nak::RNR | nak::NOT_READY | nak::BUSY => None,
            _ => Some(wc_status::BAD_RESP_ERR),
        };
        if let Some(status) = fatal {
            let ok = self.complete_front(index, status, 0)?;
            return Ok(if ok { Taken::Done } else { Taken::Blocked });
        }
        let qp = self.qps.entry_mut(index)?;
        let (rnr_retry, retry_cnt, timeout) =
            (qp.attr.rnr_retry, qp.attr.retry_cnt, qp.attr.timeout);
        let rq = remote_of(&mut qp.remote, index)?;
        let (left, infinite, period, exceeded) = match h.code {
            nak::RNR => (
                &mut rq.rnr_left,
                rnr_retry == 7,
                rnr_timer(h.arg as u8),
                wc_status::RNR_RETRY_EXC_ERR,
            ),
            nak::NOT_READY => (
                &mut rq.retry_left,
                timeout == 0,
                ack_timeout(timeout).unwrap_or(CQ_FULL_RETRY),
                wc_status::RETRY_EXC_ERR,
            ),
            _ => {
                rq.resend = Some(Resend {
                    at: now + CQ_FULL_RETRY,
                });
                return Ok(Taken::Done);
            }
        };
        let start = if exceeded == wc_status::RNR_RETRY_EXC_ERR {
            rnr_retry
        } else {
            retry_cnt
        };
        let n = left.get_or_insert(start);
        if !infinite {
            if *n == 0 {
                let ok = self.complete_front(index, exceeded, 0)?;
                return Ok(if ok { Taken::Done } else { Taken::Blocked });
            }
            *n -= 1;
        }
        rq.resend = Some(Resend { at: now + period });
        Ok(Taken::Done)
    }
}

/// How long the connection of a QP's requests may stay silent before they fail: its timeout ×
/// (retry_cnt + 1), at least [`SILENCE_FLOOR`]; None with the infinite timeout (0).
pub(in crate::verbs) fn silence_budget(qp: &Qp) -> Option<std::time::Duration> {
    let period = ack_timeout(qp.attr.timeout)?;
    Some((period * (u32::from(qp.attr.retry_cnt) + 1)).max(SILENCE_FLOOR))
}

/// The transport state of a QP with a destination on another host (set at RTR).
fn remote_of(remote: &mut Option<Box<RemoteQp>>, index: QpId) -> Result<&mut RemoteQp, Fault> {
    remote.as_deref_mut().ok_or(Fault::Missing {
        what: "transport state of queue pair",
        index: index.index(),
    })
}
