//! The responder's side of RDMA between hosts: requests that other hosts' routers send to this
//! router's QPs, executed against this router's own tables with the checks of one host.
//!
//! A request is admitted only if its source address is a registered container of the host the
//! connection comes from (the kernel's address of the peer), the destination QP is in RTR or
//! RTS, connected back to exactly that source QP, and owned by a container of the source's
//! tenant; anything else is answered NOT_READY (the requester retries, then reports
//! IBV_WC_RETRY_EXC_ERR, as a forged QP number does on one host). Requests of a QP execute in
//! sequence order; one out of sequence (after a refused one) is dropped unanswered, the
//! requester sends it again. Errors are the ones of one host: the responder's completion and
//! error state where the specification has them, and a NAK with the requester's status.

use super::copy::{copy, resolve_list, Source, Views};
use super::{NoReceive, Peer};
use crate::verbs::engine::{Context, Engine, Fault, Route};
use crate::verbs::ids::AttachmentId;
use crate::verbs::ids::QpId;
use crate::verbs::remote::{ConnState, HeldAck, Link, Next, ZERO_COPY_MIN};
use crate::verbs::{Key, MemView, Need, NumberMap};
use freeflow_proto::verbs::qp::QpState;
use freeflow_proto::verbs::remote::{nak, FrameHeader, FrameKind, MAX_PAYLOAD};
use freeflow_proto::verbs::work::{wc_flags, wc_opcode, Cqe, MAX_SGE};
use freeflow_proto::verbs::{wc_status, AccessFlags};
use std::time::Instant;

/// What the responder answers a request with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Executed (a READ's or atomic's data response was queued already).
    Done,
    Ack,
    /// Not executed: retry (RNR with its timer, NOT_READY, BUSY).
    Retry(u8, u32),
    /// Failed: the requester's error; the responder's QP goes to the error state.
    Fatal(u8),
}

impl Engine {
    /// Executes the requests that came on incoming connections, as far as each connection has
    /// room for the responses.
    pub(super) fn serve_incoming(&mut self, now: Instant) -> usize {
        let mut work = 0;
        let mut i = 0;
        while i < self.remote.incoming.len() {
            let closed = loop {
                let c = &mut self.remote.incoming[i];
                if c.state != ConnState::Up || c.tx_full() {
                    break false;
                }
                if let Some((h, revoked)) = c.landed() {
                    let from = c.link;
                    if let Some(seq) = h.ack {
                        if !self.take_carried_ack(from, &h, seq, now) {
                            break false;
                        }
                    }
                    self.remote.incoming[i].take_landed();
                    self.on_landed(i, &h, revoked, now);
                    work += 1;
                    continue;
                }
                if c.landing() {
                    break false;
                }
                let (h, range) = match c.next() {
                    Ok(Next::Frame(h, range)) if h.kind.is_request() => (h, range),
                    Ok(Next::Nothing) => {
                        self.try_land(i);
                        break false;
                    }
                    Ok(Next::Frame(..)) => {
                        self.remote
                            .close_incoming(i, "a response on a request stream");
                        break true;
                    }
                    Err(e) => {
                        self.remote.close_incoming(i, &format!("bad frame: {e}"));
                        break true;
                    }
                };
                // An ACK riding on the request is taken first (it answers earlier requests
                // of ours); with no room in our send CQ for its completions, the request
                // waits in the buffer too.
                let from = c.link;
                if let Some(seq) = h.ack {
                    if !self.take_carried_ack(from, &h, seq, now) {
                        break false;
                    }
                }
                let c = &mut self.remote.incoming[i];
                let rx = std::mem::take(&mut c.rx);
                self.on_request(i, &h, &rx[range.clone()], now);
                let c = &mut self.remote.incoming[i];
                c.rx = rx;
                c.consume(range.end);
                work += 1;
            };
            if !closed {
                i += 1;
            }
        }
        work
    }

    /// One request on incoming connection `conn`.
    fn on_request(&mut self, conn: usize, h: &FrameHeader, payload: &[u8], now: Instant) {
        let from = self.remote.incoming[conn].link;
        if h.kind == FrameKind::Datagram {
            return self.on_datagram(from, h, payload);
        }
        let Some(peer) = self.admit(from, h) else {
            return self.answer(conn, h, FrameKind::Nak, nak::NOT_READY, 0);
        };
        let Some(rq) = self.qps.get(peer.index).and_then(|q| q.remote.as_deref()) else {
            return self.answer(conn, h, FrameKind::Nak, nak::NOT_READY, 0);
        };
        if rq.expected != h.seq {
            return; // after a refused request: it comes again
        }
        let contexts = std::mem::take(&mut self.contexts);
        let answer = self.execute_request(&contexts, conn, h, payload, &peer);
        self.contexts = contexts;
        self.flush_events();
        let answer = answer.unwrap_or_else(|fault| {
            self.fault_qp(peer.index, fault);
            Answer::Retry(nak::NOT_READY, 0)
        });
        let advance = |e: &mut Engine| {
            if let Some(rq) = e
                .qps
                .get_mut(peer.index)
                .and_then(|q| q.remote.as_deref_mut())
            {
                rq.expected = rq.expected.wrapping_add(1);
            }
        };
        match answer {
            Answer::Done => advance(self),
            Answer::Ack => {
                advance(self);
                self.hold_ack(conn, h, peer.index, now);
            }
            Answer::Retry(code, arg) => self.answer(conn, h, FrameKind::Nak, code, arg),
            Answer::Fatal(code) => {
                advance(self);
                if let Some(p) = self.qps.get_mut(peer.index) {
                    p.state = QpState::Err;
                }
                self.answer(conn, h, FrameKind::Nak, code, 0);
            }
        }
    }

    /// If the next frame on incoming connection `conn` is a large WRITE (at least
    /// `remote::ZERO_COPY_MIN`) whose header came without all its payload, and its checks pass
    /// now (the QP admits it, it is the next in sequence, the key grants a remote write of the
    /// whole range): the rest of its payload is received straight into the target
    /// (`Conn::land`). Otherwise it stays on the ordinary path: buffered whole, then executed,
    /// or answered with its error and dropped.
    fn try_land(&mut self, conn: usize) {
        let c = &self.remote.incoming[conn];
        let Some(h) = c.partial_head() else {
            return;
        };
        if h.kind != FrameKind::Write || u64::from(h.len) < ZERO_COPY_MIN {
            return;
        }
        let Some(peer) = self.landing_granted(c.link, &h) else {
            return;
        };
        let Some(ctx) = self.contexts.get(&peer.owner) else {
            return;
        };
        let Ok(span) = ctx.table.resolve_shared(
            peer.pd,
            Key::Remote(h.rkey),
            h.remote_addr,
            u64::from(h.len),
            Need::RemoteWrite,
        ) else {
            return;
        };
        if let Err(e) = self.remote.incoming[conn].land(span) {
            // A span of the frame's length from a resolved key: a bug here, not the peer's.
            debug_assert!(false, "landing a checked WRITE: {e}");
        }
    }

    /// The QP a WRITE from `from`'s router may land in now: admitted, next in sequence, its
    /// key granting a remote write of the whole range.
    fn landing_granted(&self, from: Link, h: &FrameHeader) -> Option<Peer> {
        let peer = self.admit(from, h)?;
        let in_sequence = self
            .qps
            .get(peer.index)
            .and_then(|q| q.remote.as_deref())
            .is_some_and(|rq| rq.expected == h.seq);
        (in_sequence && self.grants_write(&peer, h)).then_some(peer)
    }

    /// Whether `peer`'s QP and the region `h`'s key names let `h`'s payload be written there.
    fn grants_write(&self, peer: &Peer, h: &FrameHeader) -> bool {
        peer.access.contains(AccessFlags::REMOTE_WRITE)
            && self.contexts.get(&peer.owner).is_some_and(|ctx| {
                ctx.table
                    .resolve(
                        peer.pd,
                        Key::Remote(h.rkey),
                        h.remote_addr,
                        u64::from(h.len),
                        Need::RemoteWrite,
                    )
                    .is_ok()
            })
    }

    /// Revokes the landings that are no longer granted (the region was deregistered, the QP
    /// left RTR/RTS or went, the container detached): nothing more of their payload is
    /// written into the container's memory. Runs before every read of the connections, in the
    /// thread that serves the container's requests, so nothing lands once a dereg, destroy,
    /// modify or detach was answered (as rdma-core promises for a device).
    pub(super) fn revoke_landings(&mut self) {
        for i in 0..self.remote.incoming.len() {
            let c = &self.remote.incoming[i];
            let Some(h) = c.landing_into_target() else {
                continue;
            };
            if self.landing_granted(c.link, &h).is_none() {
                self.remote.incoming[i].revoke_landing();
            }
        }
    }

    /// A WRITE whose payload came (`try_land`): executed as `on_request` would, with the
    /// checks again (the QP or the region may have changed while the payload came). A
    /// `revoked` one (`revoke_landings`: part of its payload was dropped) is answered as a
    /// refused one, REM_ACCESS, if its QP still admits it.
    fn on_landed(&mut self, conn: usize, h: &FrameHeader, revoked: bool, now: Instant) {
        let from = self.remote.incoming[conn].link;
        let Some(peer) = self.admit(from, h) else {
            return self.answer(conn, h, FrameKind::Nak, nak::NOT_READY, 0);
        };
        let Some(rq) = self
            .qps
            .get_mut(peer.index)
            .and_then(|q| q.remote.as_deref_mut())
        else {
            return self.answer(conn, h, FrameKind::Nak, nak::NOT_READY, 0);
        };
        if rq.expected != h.seq {
            return;
        }
        rq.expected = rq.expected.wrapping_add(1);
        let still_granted = !revoked && self.grants_write(&peer, h);
        if still_granted {
            self.hold_ack(conn, h, peer.index, now);
        } else {
            if let Some(p) = self.qps.get_mut(peer.index) {
                p.state = QpState::Err;
            }
            self.answer(conn, h, FrameKind::Nak, nak::REM_ACCESS, 0);
        }
    }

    /// The QP a request from `from`'s router is for, if it accepts it (see the module's
    /// documentation).
    fn admit(&self, from: Link, h: &FrameHeader) -> Option<Peer> {
        let source_tenant = self.remote.source_tenant(h.src_ip, from)?;
        let index = self.qp_by_number(h.dst_qpn)?;
        let p = self.qps.get(index)?;
        let back = Route::Remote {
            link: from,
            ip: h.src_ip,
            qpn: h.src_qpn,
        };
        if p.broken || !matches!(p.state, QpState::Rtr | QpState::Rts) || p.route != Some(back) {
            return None;
        }
        let ctx = self.contexts.get(&p.owner)?;
        if ctx.container.ip != h.dst_ip || ctx.container.tenant != source_tenant {
            return None;
        }
        let recv_pd = match p.srq {
            Some(i) => self.srqs.get(i)?.pd,
            None => p.pd,
        };
        Some(Peer {
            index,
            owner: p.owner,
            pd: p.pd,
            qpn: p.qpn,
            recv_cq: p.recv_cq,
            srq: p.srq,
            recv_pd,
            access: AccessFlags::from_bits_retain(p.attr.qp_access_flags),
            min_rnr_timer: p.attr.min_rnr_timer,
        })
    }

    /// Queues a response without payload to request `req` on incoming connection `conn`.
    fn answer(&mut self, conn: usize, req: &FrameHeader, kind: FrameKind, code: u8, arg: u32) {
        let h = response_to(req, kind, code, arg, 0);
        if kind == FrameKind::Nak {
            self.ack_before_nak(conn, req);
        }
        let c = &mut self.remote.incoming[conn];
        if kind == FrameKind::Ack {
            c.push_ack(&h);
        } else {
            let _ = c.push_frame(&h, |_| Ok::<(), ()>(()));
        }
    }

    /// Holds the ACK of request `req` (on incoming connection `conn`, for the QP at `index`)
    /// to ride on that QP's next request the other way, up to the engine's `ack_hold`
    /// (`remote::ACK_HOLD`); a later ACK of
    /// the same QP replaces it (it acknowledges every earlier request).
    fn hold_ack(&mut self, conn: usize, req: &FrameHeader, index: QpId, now: Instant) {
        let ack = response_to(req, FrameKind::Ack, 0, 0, 0);
        let token = self.remote.incoming[conn].token;
        match self.held_acks.iter_mut().find(|a| a.qp == index) {
            Some(held) if held.conn == token => held.ack = ack,
            // Held for another connection (a reconnect): that one goes now.
            Some(held) => {
                let due = now + self.ack_hold;
                let old = std::mem::replace(
                    held,
                    HeldAck {
                        qp: index,
                        conn: token,
                        ack,
                        due,
                    },
                );
                if let Some(c) = self.remote.incoming_by_token(old.conn) {
                    c.push_ack(&old.ack);
                }
            }
            None => self.held_acks.push(HeldAck {
                qp: index,
                conn: token,
                ack,
                due: now + self.ack_hold,
            }),
        }
    }

    /// Sends the held ACKs that are due, or whose connection has other frames to send now
    /// (then it costs nothing), alone.
    pub(in crate::verbs) fn release_held_acks(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.held_acks.len() {
            let held = self.held_acks[i];
            let Some(c) = self.remote.incoming_by_token(held.conn) else {
                self.held_acks.swap_remove(i);
                continue;
            };
            if now < held.due && c.tx_pending() == 0 {
                i += 1;
                continue;
            }
            c.push_ack(&held.ack);
            self.held_acks.swap_remove(i);
            if let Some(rq) = self
                .qps
                .get_mut(held.qp)
                .and_then(|q| q.remote.as_deref_mut())
            {
                rq.acked_ahead = None;
            }
        }
    }

    /// Before a NAK to request `req` on incoming connection `conn`: the ACK of the QP's
    /// earlier requests goes first, held or already sent riding on a request (on the other
    /// connection, which the NAK could overtake), so the requester never reads the NAK with
    /// those still unanswered.
    fn ack_before_nak(&mut self, conn: usize, req: &FrameHeader) {
        let Some(index) = self.qp_by_number(req.dst_qpn) else {
            return;
        };
        let (token, link) = (
            self.remote.incoming[conn].token,
            self.remote.incoming[conn].link,
        );
        let back = Route::Remote {
            link,
            ip: req.src_ip,
            qpn: req.src_qpn,
        };
        if self.qps.get(index).is_none_or(|q| q.route != Some(back)) {
            return; // not the QP's peer: nothing of it to acknowledge there
        }
        let mut ack = None;
        if let Some(at) = self
            .held_acks
            .iter()
            .position(|a| a.qp == index && a.conn == token)
        {
            ack = Some(self.held_acks.swap_remove(at).ack);
        }
        if let Some(rq) = self
            .qps
            .get_mut(index)
            .and_then(|q| q.remote.as_deref_mut())
        {
            if let (None, Some(seq)) = (ack, rq.acked_ahead) {
                let mut h = response_to(req, FrameKind::Ack, 0, 0, 0);
                h.seq = seq;
                ack = Some(h);
            }
            rq.acked_ahead = None;
        }
        if let Some(ack) = ack {
            self.remote.incoming[conn].push_ack(&ack);
        }
    }

    /// Carries out request `h` for `peer` with the tables `contexts`.
    fn execute_request(
        &mut self,
        contexts: &NumberMap<AttachmentId, Context>,
        conn: usize,
        h: &FrameHeader,
        payload: &[u8],
        peer: &Peer,
    ) -> Result<Answer, Fault> {
        let table = &super::ops::context_in(contexts, peer.owner)?.table;
        let target = |len: u64, need: Need| {
            table
                .resolve(peer.pd, Key::Remote(h.rkey), h.remote_addr, len, need)
                .ok()
        };
        match h.kind {
            FrameKind::Send | FrameKind::SendWithImm => {
                let imm = (h.kind == FrameKind::SendWithImm).then_some(h.imm);
                self.receive_message(contexts, h, payload, peer, imm)
            }
            FrameKind::Write | FrameKind::WriteWithImm => {
                let view = match payload.len() {
                    0 => None,
                    n => target(n as u64, Need::RemoteWrite),
                };
                self.remote_write(h, payload, peer, view)
            }
            FrameKind::Read => {
                // Its data comes back in one ReadData frame, which the requester decodes only
                // up to MAX_PAYLOAD (a peer's 4 GiB READ is refused before anything is read).
                if h.arg > MAX_PAYLOAD {
                    return Ok(Answer::Fatal(nak::REM_INV_REQ));
                }
                if !peer.access.contains(AccessFlags::REMOTE_READ) {
                    return Ok(Answer::Fatal(nak::REM_ACCESS));
                }
                let len = u64::from(h.arg);
                let view = match len {
                    0 => None,
                    _ => match target(len, Need::RemoteRead) {
                        Some(v) => Some(v),
                        None => return Ok(Answer::Fatal(nak::REM_ACCESS)),
                    },
                };
                let r = response_to(h, FrameKind::ReadData, 0, 0, h.arg);
                if len >= ZERO_COPY_MIN {
                    // Checked above: the same checks cannot fail now.
                    let Ok(span) = table.resolve_shared(
                        peer.pd,
                        Key::Remote(h.rkey),
                        h.remote_addr,
                        len,
                        Need::RemoteRead,
                    ) else {
                        return Ok(Answer::Fatal(nak::REM_ACCESS));
                    };
                    let c = &mut self.remote.incoming[conn];
                    c.push_frame_shared(&r, std::iter::once(span));
                    return Ok(Answer::Done);
                }
                let c = &mut self.remote.incoming[conn];
                c.push_frame(&r, |buf| view.map_or(Ok(()), |v| v.read_at(0, buf)))?;
                Ok(Answer::Done)
            }
            FrameKind::CompareSwap | FrameKind::FetchAdd => {
                if !h.remote_addr.is_multiple_of(8) {
                    return Ok(Answer::Fatal(nak::REM_INV_REQ));
                }
                if !peer.access.contains(AccessFlags::REMOTE_ATOMIC) {
                    return Ok(Answer::Fatal(nak::REM_ACCESS));
                }
                let Some(word) = target(8, Need::RemoteAtomic) else {
                    return Ok(Answer::Fatal(nak::REM_ACCESS));
                };
                let old = if h.kind == FrameKind::CompareSwap {
                    word.compare_swap_u64(h.compare_add, h.swap)
                } else {
                    word.fetch_add_u64(h.compare_add)
                };
                let Ok(old) = old else {
                    return Ok(Answer::Fatal(nak::REM_INV_REQ));
                };
                let r = response_to(h, FrameKind::AtomicData, 0, 0, 8);
                let c = &mut self.remote.incoming[conn];
                let _ = c.push_frame(&r, |buf| {
                    buf.copy_from_slice(&old.to_ne_bytes());
                    Ok::<(), ()>(())
                });
                Ok(Answer::Done)
            }
            _ => Ok(Answer::Fatal(nak::REM_INV_REQ)),
        }
    }

    /// RDMA WRITE (with immediate data: it consumes a receive after the data is written) of
    /// `payload` into `view`, the memory the request's key names (None: a bad key or an empty
    /// message).
    fn remote_write(
        &mut self,
        h: &FrameHeader,
        payload: &[u8],
        peer: &Peer,
        view: Option<MemView<'_>>,
    ) -> Result<Answer, Fault> {
        if !peer.access.contains(AccessFlags::REMOTE_WRITE)
            || (view.is_none() && !payload.is_empty())
        {
            return Ok(Answer::Fatal(nak::REM_ACCESS));
        }
        if h.kind == FrameKind::WriteWithImm {
            if let Some(not_ready) = self.receive_room(peer) {
                return Ok(not_ready);
            }
        }
        if let Some(v) = view {
            v.write_at(0, payload)?;
        }
        if h.kind == FrameKind::Write {
            return Ok(Answer::Ack);
        }
        let Ok(recv) = self.take_receive(peer) else {
            return Ok(self.bad_remote_receive(peer, h));
        };
        let cqe = Cqe {
            wr_id: recv.wr_id,
            opcode: wc_opcode::RECV_RDMA_WITH_IMM,
            byte_len: payload.len() as u32,
            imm_data: h.imm,
            wc_flags: wc_flags::WITH_IMM,
            qp_num: peer.qpn,
            src_qp: h.src_qpn,
            ..Cqe::default()
        };
        self.push_cqe(peer.recv_cq, &cqe);
        Ok(Answer::Ack)
    }

    /// Whether `peer` can take a message that consumes a receive now: None if so, else the
    /// retry to answer (RNR with its timer, BUSY for a full CQ, NOT_READY for a broken ring).
    fn receive_room(&mut self, peer: &Peer) -> Option<Answer> {
        match self.receive_ready(peer) {
            Ok(()) => {}
            Err(NoReceive::Rnr) => {
                return Some(Answer::Retry(nak::RNR, u32::from(peer.min_rnr_timer)))
            }
            Err(NoReceive::Broken | NoReceive::Fault(_)) => {
                return Some(Answer::Retry(nak::NOT_READY, 0))
            }
        }
        (!self.room(peer.recv_cq, 1)).then_some(Answer::Retry(nak::BUSY, 0))
    }

    /// The receive WQE `peer`'s ring held was malformed: LOC_QP_OP_ERR for it, REM_OP_ERR for
    /// the requester.
    fn bad_remote_receive(&mut self, peer: &Peer, h: &FrameHeader) -> Answer {
        let cqe = Cqe {
            wr_id: self.receive_wr_id(peer),
            status: wc_status::LOC_QP_OP_ERR,
            opcode: wc_opcode::RECV,
            qp_num: peer.qpn,
            src_qp: h.src_qpn,
            ..Cqe::default()
        };
        self.push_cqe(peer.recv_cq, &cqe);
        Answer::Fatal(nak::REM_OP)
    }

    /// SEND (with immediate data `imm`): the payload goes into `peer`'s next receive.
    fn receive_message(
        &mut self,
        contexts: &NumberMap<AttachmentId, Context>,
        h: &FrameHeader,
        payload: &[u8],
        peer: &Peer,
        imm: Option<u32>,
    ) -> Result<Answer, Fault> {
        if let Some(not_ready) = self.receive_room(peer) {
            return Ok(not_ready);
        }
        let Ok(recv) = self.take_receive(peer) else {
            return Ok(self.bad_remote_receive(peer, h));
        };
        let rbase = Cqe {
            wr_id: recv.wr_id,
            opcode: wc_opcode::RECV,
            qp_num: peer.qpn,
            src_qp: h.src_qpn,
            ..Cqe::default()
        };
        let table = &super::ops::context_in(contexts, peer.owner)?.table;
        let mut dst: Views<'_> = [const { None }; MAX_SGE as usize];
        let rq_slot = &self.qps.entry(peer.index)?.rq_slot;
        let resolved = resolve_list(
            table,
            peer.recv_pd,
            recv.sges(rq_slot),
            Need::LocalWrite,
            &mut dst,
        );
        let (status, answer) = match resolved {
            Err(()) => (wc_status::LOC_PROT_ERR, Answer::Fatal(nak::REM_OP)),
            Ok(room) if room < payload.len() as u64 => {
                (wc_status::LOC_LEN_ERR, Answer::Fatal(nak::REM_INV_REQ))
            }
            Ok(_) => {
                copy(&dst, Source::Bytes(payload), payload.len() as u64)?;
                (wc_status::SUCCESS, Answer::Ack)
            }
        };
        let cqe = Cqe {
            status,
            byte_len: if status == wc_status::SUCCESS {
                payload.len() as u32
            } else {
                0
            },
            imm_data: imm.unwrap_or(0),
            wc_flags: if imm.is_some() { wc_flags::WITH_IMM } else { 0 },
            ..rbase
        };
        self.push_cqe(peer.recv_cq, &cqe);
        Ok(answer)
    }
}

/// The response of `kind` to request `req`, with `len` bytes of payload to follow.
fn response_to(req: &FrameHeader, kind: FrameKind, code: u8, arg: u32, len: u32) -> FrameHeader {
    let mut h = FrameHeader::new(kind);
    h.code = code;
    h.arg = arg;
    h.len = len;
    h.src_ip = req.dst_ip;
    h.dst_ip = req.src_ip;
    h.src_qpn = req.dst_qpn;
    h.dst_qpn = req.src_qpn;
    h.seq = req.seq;
    h
}
