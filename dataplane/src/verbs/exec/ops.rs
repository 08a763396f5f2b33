//! The operations of send work requests, one function each: SEND, RDMA WRITE (both with or
//! without immediate data), RDMA READ and the atomics. [`Engine::move_data`] checks what every
//! operation shares (the local scatter/gather list, the message's length) once, then calls the
//! operation's function with a [`Transfer`].

use super::copy::{copy, resolve_list, Source, Views};
use super::{Effects, NoReceive, Peer};
use crate::verbs::engine::{Context, Engine, Fault, Pending};
use crate::verbs::ids::{AttachmentId, QpId};
use crate::verbs::send_op::SendOp;
use crate::verbs::{Key, MemView, Need, NumberMap, VerbsTable};
use freeflow_proto::verbs::work::{send_flags, wc_flags, wc_opcode, Cqe, SendWqe, MAX_SGE};
use freeflow_proto::verbs::{limits, wc_status, AccessFlags};

/// One send WQE being carried out: what each operation needs, checked as far as the local
/// side goes (its scatter/gather list resolved, its length within the limit).
struct Transfer<'w, 'a> {
    wqe: &'w SendWqe,
    /// The sender's copy of the WQE (its inline data).
    slot: &'w [u8],
    peer: &'w Peer,
    /// The requester's QP number (the responder's completions name it).
    qpn: u32,
    inline: bool,
    /// The requester's memory (none with inline data).
    local: Views<'a>,
    /// The message's length.
    total: u64,
    /// The responder's table.
    remote: &'a VerbsTable,
    /// The requester's completion, but for its status and length.
    base: Cqe,
    signaled: bool,
}

impl<'a> Transfer<'_, 'a> {
    /// The request fails at the requester (the responder sees nothing).
    fn fail(&self, status: u32) -> Effects {
        Effects {
            sender: Some(Cqe {
                status,
                ..self.base
            }),
            sender_error: true,
            ..Effects::default()
        }
    }

    /// The responder refused the request: both QPs go to the error state.
    fn remote_fail(&self, status: u32) -> Effects {
        Effects {
            sender: Some(Cqe {
                status,
                ..self.base
            }),
            sender_error: true,
            receiver: None,
            receiver_error: true,
        }
    }

    /// The requester's completion of a success, if it asked for one.
    fn ok(&self, byte_len: u64) -> Option<Cqe> {
        self.signaled.then_some(Cqe {
            byte_len: byte_len as u32,
            ..self.base
        })
    }

    /// Copies the message (inline data or the requester's memory) into `dst`.
    fn copy_to(&self, dst: &[Option<MemView<'_>>]) -> Result<(), Fault> {
        if self.inline {
            copy(dst, Source::Bytes(self.wqe.inline(self.slot)), self.total)
        } else {
            copy(dst, Source::Views(&self.local), self.total)
        }
    }

    /// The responder's remote memory of `len` bytes the WQE names, if its key grants `need`.
    fn target(&self, len: u64, need: Need) -> Result<MemView<'a>, ()> {
        let h = self.wqe.header;
        self.remote
            .resolve(self.peer.pd, Key::Remote(h.rkey), h.remote_addr, len, need)
            .map_err(|_| ())
    }
}

impl Engine {
    /// The receive WQE the responder's ring held was malformed: LOC_QP_OP_ERR for it, and
    /// REM_OP_ERR for the requester.
    fn bad_receive(&self, t: &Transfer<'_, '_>) -> Effects {
        let rcqe = Cqe {
            wr_id: self.receive_wr_id(t.peer),
            status: wc_status::LOC_QP_OP_ERR,
            opcode: wc_opcode::RECV,
            qp_num: t.peer.qpn,
            src_qp: t.qpn,
            ..Cqe::default()
        };
        Effects {
            receiver: Some(rcqe),
            ..t.remote_fail(wc_status::REM_OP_ERR)
        }
    }

    /// Moves the data of one WQE and says what completes. `slot` is the sender's copy of the
    /// WQE (inline data). The checks that refuse a message before it reaches the responder
    /// (local keys, then remote keys) come before the one for a posted receive, as on the wire.
    pub(super) fn move_data(
        &mut self,
        index: QpId,
        peer: &Peer,
        pending: &Pending,
        slot: &[u8],
    ) -> Result<Effects, NoReceive> {
        // The tables are read while the operations change queues of the engine.
        let contexts = std::mem::take(&mut self.contexts);
        let moved = self.transfer(&contexts, index, peer, pending, slot);
        self.contexts = contexts;
        self.flush_events();
        moved
    }

    /// [`Engine::move_data`] with the contexts taken out of the engine: checks the local side,
    /// then carries out the operation.
    fn transfer(
        &mut self,
        contexts: &NumberMap<AttachmentId, Context>,
        index: QpId,
        peer: &Peer,
        pending: &Pending,
        slot: &[u8],
    ) -> Result<Effects, NoReceive> {
        let (wqe, op) = (&pending.wqe, pending.op);
        let h = wqe.header;
        let qp = self.qps.entry(index)?;
        let (owner, pd, qpn) = (qp.owner, qp.pd, qp.qpn);
        let mut t = Transfer {
            wqe,
            slot,
            peer,
            qpn,
            inline: h.has(send_flags::INLINE),
            local: [const { None }; MAX_SGE as usize],
            total: 0,
            remote: &context_in(contexts, peer.owner)?.table,
            base: Cqe {
                wr_id: h.wr_id,
                opcode: op.wc_opcode(),
                qp_num: qpn,
                ..Cqe::default()
            },
            signaled: qp.sq_sig_all || h.has(send_flags::SIGNALED),
        };
        if t.inline && (op.is_atomic() || op == SendOp::Read) {
            return Ok(t.fail(wc_status::LOC_QP_OP_ERR));
        }
        let local_table = &context_in(contexts, owner)?.table;
        t.total = if t.inline {
            wqe.inline(slot).len() as u64
        } else {
            let sges = wqe.sges(slot);
            match resolve_list(local_table, pd, sges, op.local_need(), &mut t.local) {
                Ok(total) => total,
                Err(()) => return Ok(t.fail(wc_status::LOC_PROT_ERR)),
            }
        };
        if t.total > limits::MAX_MSG_SZ {
            return Ok(t.fail(wc_status::LOC_LEN_ERR));
        }
        match op {
            SendOp::Send => self.send(&t, None),
            SendOp::SendWithImm => self.send(&t, Some(h.imm_data)),
            SendOp::Write => self.write(&t, None),
            SendOp::WriteWithImm => self.write(&t, Some(h.imm_data)),
            SendOp::Read => Ok(read(&t)?),
            SendOp::CompareSwap | SendOp::FetchAdd => Ok(atomic(&t, op)?),
        }
    }

    /// SEND (with immediate data `imm`): the message goes into the responder's next receive.
    /// The receive is taken after the local checks that would refuse the message without
    /// consuming one.
    fn send(&mut self, t: &Transfer<'_, '_>, imm: Option<u32>) -> Result<Effects, NoReceive> {
        let peer = t.peer;
        self.receive_ready(peer)?;
        let Ok(recv) = self.take_receive(peer) else {
            return Ok(self.bad_receive(t));
        };
        let rbase = Cqe {
            wr_id: recv.wr_id,
            opcode: wc_opcode::RECV,
            qp_num: peer.qpn,
            src_qp: t.qpn,
            ..Cqe::default()
        };
        let mut dst: Views<'_> = [const { None }; MAX_SGE as usize];
        let rq_slot = &self.qps.entry(peer.index)?.rq_slot;
        let sges = recv.sges(rq_slot);
        let Ok(room) = resolve_list(t.remote, peer.recv_pd, sges, Need::LocalWrite, &mut dst)
        else {
            return Ok(Effects {
                receiver: Some(Cqe {
                    status: wc_status::LOC_PROT_ERR,
                    ..rbase
                }),
                ..t.remote_fail(wc_status::REM_OP_ERR)
            });
        };
        if room < t.total {
            return Ok(Effects {
                receiver: Some(Cqe {
                    status: wc_status::LOC_LEN_ERR,
                    ..rbase
                }),
                ..t.remote_fail(wc_status::REM_INV_REQ_ERR)
            });
        }
        t.copy_to(&dst)?;
        Ok(Effects {
            sender: t.ok(t.total),
            receiver: Some(Cqe {
                byte_len: t.total as u32,
                imm_data: imm.unwrap_or(0),
                wc_flags: if imm.is_some() { wc_flags::WITH_IMM } else { 0 },
                ..rbase
            }),
            ..Effects::default()
        })
    }

    /// RDMA WRITE (with immediate data `imm`, which consumes a receive of the responder after
    /// the data is written).
    fn write(&mut self, t: &Transfer<'_, '_>, imm: Option<u32>) -> Result<Effects, NoReceive> {
        let peer = t.peer;
        if !peer.access.contains(AccessFlags::REMOTE_WRITE) {
            return Ok(t.remote_fail(wc_status::REM_ACCESS_ERR));
        }
        let target = if t.total > 0 {
            match t.target(t.total, Need::RemoteWrite) {
                Ok(v) => Some(v),
                Err(()) => return Ok(t.remote_fail(wc_status::REM_ACCESS_ERR)),
            }
        } else {
            None
        };
        if imm.is_some() {
            self.receive_ready(peer)?;
        }
        t.copy_to(&[target])?;
        let receiver = match imm {
            None => None,
            Some(imm_data) => match self.take_receive(peer) {
                Ok(recv) => Some(Cqe {
                    wr_id: recv.wr_id,
                    opcode: wc_opcode::RECV_RDMA_WITH_IMM,
                    byte_len: t.total as u32,
                    imm_data,
                    wc_flags: wc_flags::WITH_IMM,
                    qp_num: peer.qpn,
                    src_qp: t.qpn,
                    ..Cqe::default()
                }),
                Err(()) => return Ok(self.bad_receive(t)),
            },
        };
        Ok(Effects {
            sender: t.ok(t.total),
            receiver,
            ..Effects::default()
        })
    }
}

/// RDMA READ: the responder's memory into the requester's scatter list.
fn read(t: &Transfer<'_, '_>) -> Result<Effects, Fault> {
    if !t.peer.access.contains(AccessFlags::REMOTE_READ) {
        return Ok(t.remote_fail(wc_status::REM_ACCESS_ERR));
    }
    if t.total > 0 {
        let Ok(from) = t.target(t.total, Need::RemoteRead) else {
            return Ok(t.remote_fail(wc_status::REM_ACCESS_ERR));
        };
        copy(&t.local, Source::Views(&[Some(from)]), t.total)?;
    }
    Ok(Effects {
        sender: t.ok(t.total),
        ..Effects::default()
    })
}

/// The context of `owner` in `contexts`, which a QP of it promises.
pub(super) fn context_in(
    contexts: &NumberMap<AttachmentId, Context>,
    owner: AttachmentId,
) -> Result<&Context, Fault> {
    contexts.get(&owner).ok_or(Fault::Missing {
        what: "context",
        index: owner.0 as usize,
    })
}

/// An atomic (`op`: compare-and-swap or fetch-and-add) on the responder's aligned 64-bit word;
/// the old value goes into the first 8 bytes of the requester's list.
fn atomic(t: &Transfer<'_, '_>, op: SendOp) -> Result<Effects, Fault> {
    let h = t.wqe.header;
    let Some(Some(result)) = t.local.first() else {
        return Ok(t.fail(wc_status::LOC_LEN_ERR));
    };
    let Ok(result) = result.slice(0, 8) else {
        return Ok(t.fail(wc_status::LOC_LEN_ERR));
    };
    if !h.remote_addr.is_multiple_of(8) {
        return Ok(t.remote_fail(wc_status::REM_INV_REQ_ERR));
    }
    if !t.peer.access.contains(AccessFlags::REMOTE_ATOMIC) {
        return Ok(t.remote_fail(wc_status::REM_ACCESS_ERR));
    }
    let Ok(word) = t.target(8, Need::RemoteAtomic) else {
        return Ok(t.remote_fail(wc_status::REM_ACCESS_ERR));
    };
    let old = if op == SendOp::CompareSwap {
        word.compare_swap_u64(h.compare_add, h.swap)
    } else {
        word.fetch_add_u64(h.compare_add)
    };
    let Ok(old) = old else {
        return Ok(t.remote_fail(wc_status::REM_INV_REQ_ERR));
    };
    result.write_at(0, &old.to_ne_bytes())?;
    Ok(Effects {
        sender: t.ok(8),
        ..Effects::default()
    })
}
