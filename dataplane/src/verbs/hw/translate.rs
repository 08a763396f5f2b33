//! What the hardware backend's shard does to each work request and completion: the
//! container's virtual names (keys, addresses in its own address space, QP numbers, overlay
//! GIDs) become the device's, checked against that container's own tables first, so that a
//! hostile container can name only what it owns (and, through a connected QP, what the peer
//! it connected to registered for remote access). The device checks again (real keys against
//! real PDs); this layer makes sure a forged virtual name never even reaches it as another
//! tenant's real key.
//!
//! Pure bookkeeping, no device calls: `sys` posts what this produces.

use super::sys::{SendOpcode, Sge as RealSge};
use crate::verbs::NumberMap;
use freeflow_proto::verbs::wc_status;
use freeflow_proto::verbs::work::{send_flags, Cqe, SendWqe, Sge, WrOpcode, MAX_SGE};
use freeflow_proto::verbs::AccessFlags;
use std::net::Ipv4Addr;

/// A container's memory region as the device registered it: the container's view (PD handle,
/// iova range, access) and the device's (the router's mapping of the same pages, real keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MrEntry {
    pub pd: u32,
    pub access: AccessFlags,
    pub iova: u64,
    pub length: u64,
    /// The router's address of the region's first byte (its mapping of the container's
    /// memory file: what was registered with the device, no copy).
    pub real_addr: u64,
    pub real_lkey: u32,
    pub real_rkey: u32,
}

/// One container's regions, by their virtual keys.
#[derive(Debug, Default)]
pub struct KeyTable {
    lkeys: NumberMap<u32, MrEntry>,
    rkeys: NumberMap<u32, MrEntry>,
}

/// Why a key did not translate (the completion status follows from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFault {
    #[error("no region of this container has the key")]
    UnknownKey,
    #[error("the region is in another protection domain")]
    WrongPd,
    #[error("the range leaves the region")]
    OutOfRange,
    #[error("the region does not grant the access")]
    AccessDenied,
}

impl KeyTable {
    pub fn insert(&mut self, lkey: u32, rkey: u32, mr: MrEntry) {
        self.lkeys.insert(lkey, mr);
        self.rkeys.insert(rkey, mr);
    }

    /// A region of another host's container, known by its rkey only (what its router
    /// answered).
    pub fn insert_remote(&mut self, rkey: u32, mr: MrEntry) {
        self.rkeys.insert(rkey, mr);
    }

    pub fn has_rkey(&self, rkey: u32) -> bool {
        self.rkeys.contains_key(&rkey)
    }

    pub fn remove(&mut self, lkey: u32, rkey: u32) {
        self.lkeys.remove(&lkey);
        self.rkeys.remove(&rkey);
    }

    fn check(
        mr: Option<&MrEntry>,
        pd: u32,
        addr: u64,
        len: u64,
        need: AccessFlags,
    ) -> Result<MrEntry, KeyFault> {
        let mr = *mr.ok_or(KeyFault::UnknownKey)?;
        if mr.pd != pd {
            return Err(KeyFault::WrongPd);
        }
        if !mr.access.contains(need) {
            return Err(KeyFault::AccessDenied);
        }
        let end = addr.checked_add(len).ok_or(KeyFault::OutOfRange)?;
        if addr < mr.iova || end > mr.iova.saturating_add(mr.length) {
            return Err(KeyFault::OutOfRange);
        }
        Ok(mr)
    }

    /// A local scatter/gather entry of protection domain `pd` in the device's terms.
    pub fn local(&self, pd: u32, sge: Sge, write: bool) -> Result<RealSge, KeyFault> {
        let need = if write {
            AccessFlags::LOCAL_WRITE
        } else {
            AccessFlags::empty()
        };
        let mr = Self::check(
            self.lkeys.get(&sge.lkey),
            pd,
            sge.addr,
            u64::from(sge.length),
            need,
        )?;
        Ok(RealSge {
            addr: mr.real_addr + (sge.addr - mr.iova),
            length: sge.length,
            lkey: mr.real_lkey,
        })
    }

    /// A remote range under `rkey` (of this table's container, the responder) in the device's
    /// terms: its real address and real rkey.
    pub fn remote(
        &self,
        pd: u32,
        rkey: u32,
        addr: u64,
        len: u64,
        need: AccessFlags,
    ) -> Result<(u64, u32), KeyFault> {
        let mr = Self::check(self.rkeys.get(&rkey), pd, addr, len, need)?;
        Ok((mr.real_addr + (addr - mr.iova), mr.real_rkey))
    }
}

/// A send work request ready for the device (no allocation: this runs for every WQE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealSend {
    pub opcode: SendOpcode,
    sges: [RealSge; MAX_SGE as usize],
    num_sge: usize,
    pub signaled: bool,
    pub fence: bool,
    /// The payload is the WQE's inline data (in the slot), for the device to copy at post.
    pub inline: bool,
}

impl RealSend {
    /// Its scatter/gather entries in the device's terms.
    pub fn sges(&self) -> &[RealSge] {
        &self.sges[..self.num_sge]
    }
}

/// Translates a container's send WQE (decoded from `slot`) on a QP of protection domain `pd`
/// whose connected peer's regions are `peer` in domain `peer_pd` (on one host both tables are
/// the router's). A failure is the completion status the container sees (LOC_PROT_ERR for its
/// own keys, REM_ACCESS_ERR for the peer's, LOC_QP_OP_ERR for what the backend does not
/// carry): nothing is posted.
pub fn translate_send(
    wqe: &SendWqe,
    slot: &[u8],
    own: (&KeyTable, u32),
    peer: (&KeyTable, u32),
    sq_sig_all: bool,
) -> Result<RealSend, u32> {
    let h = &wqe.header;
    let op = WrOpcode::try_from(h.opcode).map_err(|_| wc_status::LOC_QP_OP_ERR)?;
    let (own_table, own_pd) = own;
    let atomic = matches!(op, WrOpcode::AtomicCmpAndSwp | WrOpcode::AtomicFetchAndAdd);
    // A READ and an atomic write into the requester's own list (the data read, the old value).
    let write_locally = op == WrOpcode::RdmaRead || atomic;
    let mut sges = [RealSge::default(); MAX_SGE as usize];
    let mut num_sge = 0;
    let mut total = 0u64;
    // Inline data lives in the router's copy of the slot, not in registered memory: the
    // device copies it at post time (IBV_SEND_INLINE), so it needs no key. A READ has nothing
    // to send inline.
    let inline = h.has(send_flags::INLINE);
    if inline {
        if write_locally {
            return Err(wc_status::LOC_QP_OP_ERR);
        }
        total = u64::from(h.inline_len);
    } else {
        // The decoder bounds the count by the QP's max_send_sge (at most MAX_SGE); `zip`
        // keeps to the array regardless.
        for (out, s) in sges.iter_mut().zip(wqe.sges(slot)) {
            *out = own_table
                .local(own_pd, s, write_locally)
                .map_err(|_| wc_status::LOC_PROT_ERR)?;
            total += u64::from(s.length);
            num_sge += 1;
        }
        if num_sge != usize::from(h.num_sge) {
            return Err(wc_status::LOC_QP_OP_ERR);
        }
    }
    let (peer_table, peer_pd) = peer;
    // An atomic reaches one 64-bit word whatever the local list's length (the device checks
    // that list and the word's alignment, as the software engine does).
    let remote_len = if atomic { 8 } else { total };
    let remote = |need| {
        peer_table
            .remote(peer_pd, h.rkey, h.remote_addr, remote_len, need)
            .map_err(|_| wc_status::REM_ACCESS_ERR)
    };
    let opcode = match op {
        WrOpcode::Send => SendOpcode::Send,
        WrOpcode::SendWithImm => SendOpcode::SendImm { imm: h.imm_data },
        WrOpcode::RdmaWriteWithImm => {
            let (remote_addr, rkey) = remote(AccessFlags::REMOTE_WRITE)?;
            SendOpcode::WriteImm {
                remote_addr,
                rkey,
                imm: h.imm_data,
            }
        }
        WrOpcode::RdmaWrite => {
            let (remote_addr, rkey) = remote(AccessFlags::REMOTE_WRITE)?;
            SendOpcode::Write { remote_addr, rkey }
        }
        WrOpcode::RdmaRead => {
            let (remote_addr, rkey) = remote(AccessFlags::REMOTE_READ)?;
            SendOpcode::Read { remote_addr, rkey }
        }
        WrOpcode::AtomicCmpAndSwp => {
            let (remote_addr, rkey) = remote(AccessFlags::REMOTE_ATOMIC)?;
            SendOpcode::CompareSwap {
                remote_addr,
                rkey,
                compare: h.compare_add,
                swap: h.swap,
            }
        }
        WrOpcode::AtomicFetchAndAdd => {
            let (remote_addr, rkey) = remote(AccessFlags::REMOTE_ATOMIC)?;
            SendOpcode::FetchAdd {
                remote_addr,
                rkey,
                add: h.compare_add,
            }
        }
    };
    Ok(RealSend {
        opcode,
        sges,
        num_sge,
        signaled: sq_sig_all || h.has(send_flags::SIGNALED),
        fence: h.has(send_flags::FENCE),
        inline,
    })
}

/// A device completion as the container sees it: its QP's virtual number, and the source
/// QP's virtual number (the device's are the router's business).
pub fn translate_completion(c: &super::sys::Completion, virtual_qpn: u32, virtual_src: u32) -> Cqe {
    Cqe {
        wr_id: c.wr_id,
        status: c.status,
        opcode: c.opcode,
        vendor_err: 0,
        byte_len: c.byte_len,
        imm_data: c.imm_data,
        qp_num: virtual_qpn,
        src_qp: virtual_src,
        wc_flags: c.wc_flags,
        ..Cqe::default()
    }
}

/// Where a virtual QP lives on the device, and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpPlace {
    pub real_qpn: u32,
    /// The overlay address of the container that owns it.
    pub ip: Ipv4Addr,
    /// Its tenant, as the engine numbers tenants.
    pub tenant: u32,
}

/// The device's QPs by virtual number (one host: every QP of this router), and back.
#[derive(Debug, Default)]
pub struct QpDirectory {
    by_virtual: NumberMap<u32, QpPlace>,
    by_real: NumberMap<u32, u32>,
}

/// Why a QP cannot connect where it asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectFault {
    #[error("no QP {0:#x} on this device")]
    NoSuchQp(u32),
    #[error("QP {0:#x} belongs to another container or tenant")]
    NotThere(u32),
}

impl QpDirectory {
    pub fn insert(&mut self, virtual_qpn: u32, place: QpPlace) {
        self.by_virtual.insert(virtual_qpn, place);
        self.by_real.insert(place.real_qpn, virtual_qpn);
    }

    pub fn remove(&mut self, virtual_qpn: u32) {
        if let Some(p) = self.by_virtual.remove(&virtual_qpn) {
            self.by_real.remove(&p.real_qpn);
        }
    }

    /// The virtual number of the device's QP `real_qpn` (for completions' `src_qp`).
    pub fn virtual_of(&self, real_qpn: u32) -> Option<u32> {
        self.by_real.get(&real_qpn).copied()
    }

    /// At RTR: the real QP number a QP of `tenant` reaches when it names virtual QP `qpn` at
    /// overlay address `ip` (from its GID). Only a QP of that very container and of the same
    /// tenant: a forged number reaches nothing.
    pub fn destination(&self, tenant: u32, ip: Ipv4Addr, qpn: u32) -> Result<u32, ConnectFault> {
        let p = self
            .by_virtual
            .get(&qpn)
            .ok_or(ConnectFault::NoSuchQp(qpn))?;
        if p.ip != ip || p.tenant != tenant {
            return Err(ConnectFault::NotThere(qpn));
        }
        Ok(p.real_qpn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freeflow_proto::verbs::work::SendWqeHeader;

    fn mr(pd: u32, access: AccessFlags) -> MrEntry {
        MrEntry {
            pd,
            access,
            iova: 0x7000_0000,
            length: 8192,
            real_addr: 0x5555_0000_1000,
            real_lkey: 0xaaaa,
            real_rkey: 0xbbbb,
        }
    }

    /// A send WQE slot with one SGE.
    fn slot(opcode: WrOpcode, sge: Sge, rkey: u32, remote_addr: u64, flags: u32) -> Vec<u8> {
        let header = SendWqeHeader {
            wr_id: 42,
            opcode: opcode as u8,
            flags: flags as u8,
            num_sge: 1,
            rkey,
            remote_addr,
            ..SendWqeHeader::default()
        };
        let mut out = vec![0u8; SendWqe::slot_bytes(1, 0)];
        header.write(&mut out);
        sge.write(&mut out[SendWqeHeader::LEN..]);
        out
    }

    fn decode(s: &[u8]) -> SendWqe {
        SendWqe::decode(s, 1, 0).unwrap()
    }

    #[test]
    fn local_and_remote_keys_become_the_devices_with_the_router_address() {
        let rw = AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_READ;
        let mut a = KeyTable::default();
        a.insert(11, 12, mr(1, rw));
        let mut b = KeyTable::default();
        b.insert(
            21,
            22,
            MrEntry {
                real_addr: 0x6666_0000_0000,
                real_lkey: 0xcccc,
                real_rkey: 0xdddd,
                ..mr(2, rw)
            },
        );
        let sge = Sge {
            addr: 0x7000_0010,
            length: 100,
            lkey: 11,
        };
        let s = slot(
            WrOpcode::RdmaWrite,
            sge,
            22,
            0x7000_0100,
            send_flags::SIGNALED,
        );
        let real = translate_send(&decode(&s), &s, (&a, 1), (&b, 2), false).unwrap();
        assert_eq!(
            real.sges(),
            [RealSge {
                addr: 0x5555_0000_1010,
                length: 100,
                lkey: 0xaaaa
            }]
        );
        assert_eq!(
            real.opcode,
            SendOpcode::Write {
                remote_addr: 0x6666_0000_0100,
                rkey: 0xdddd
            }
        );
        assert!(real.signaled && !real.fence);
    }

    #[test]
    fn forged_keys_and_ranges_fail_before_the_device_sees_them() {
        let rw = AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE;
        let mut a = KeyTable::default();
        a.insert(11, 12, mr(1, rw));
        let mut b = KeyTable::default();
        b.insert(21, 22, mr(2, AccessFlags::LOCAL_WRITE));
        let mut other_tenant = KeyTable::default();
        other_tenant.insert(31, 32, mr(3, rw));
        let good = Sge {
            addr: 0x7000_0000,
            length: 64,
            lkey: 11,
        };
        let run = |sge, op, rkey, addr, own: (&KeyTable, u32)| {
            let s = slot(op, sge, rkey, addr, 0);
            translate_send(&decode(&s), &s, own, (&b, 2), false)
        };
        // Another container's lkey (or the peer's), a wrong PD, a range past the region.
        let foreign = Sge { lkey: 31, ..good };
        assert_eq!(
            run(foreign, WrOpcode::Send, 0, 0, (&a, 1)),
            Err(wc_status::LOC_PROT_ERR)
        );
        assert_eq!(
            run(good, WrOpcode::Send, 0, 0, (&a, 9)),
            Err(wc_status::LOC_PROT_ERR)
        );
        let long = Sge {
            length: 8193,
            ..good
        };
        assert_eq!(
            run(long, WrOpcode::Send, 0, 0, (&a, 1)),
            Err(wc_status::LOC_PROT_ERR)
        );
        // An rkey of a third container (not the connected peer), and the peer's own rkey
        // without remote write access.
        assert_eq!(
            run(good, WrOpcode::RdmaWrite, 32, 0x7000_0000, (&a, 1)),
            Err(wc_status::REM_ACCESS_ERR)
        );
        assert_eq!(
            run(good, WrOpcode::RdmaWrite, 22, 0x7000_0000, (&a, 1)),
            Err(wc_status::REM_ACCESS_ERR)
        );
        // A READ writes locally: a region without LOCAL_WRITE cannot be its target.
        let mut ro = KeyTable::default();
        ro.insert(41, 42, mr(1, AccessFlags::REMOTE_READ));
        let ro_sge = Sge { lkey: 41, ..good };
        assert_eq!(
            run(ro_sge, WrOpcode::RdmaRead, 22, 0x7000_0000, (&ro, 1)),
            Err(wc_status::LOC_PROT_ERR)
        );
        // An atomic needs REMOTE_ATOMIC on the peer's region and writes locally (the old
        // value); an inline READ has no meaning.
        let s = slot(WrOpcode::AtomicFetchAndAdd, good, 22, 0x7000_0000, 0);
        assert_eq!(
            translate_send(&decode(&s), &s, (&a, 1), (&b, 2), false),
            Err(wc_status::REM_ACCESS_ERR)
        );
        let mut atomic_peer = KeyTable::default();
        atomic_peer.insert(21, 22, mr(2, AccessFlags::REMOTE_ATOMIC));
        let s = slot(WrOpcode::AtomicCmpAndSwp, ro_sge, 22, 0x7000_0008, 0);
        assert_eq!(
            translate_send(&decode(&s), &s, (&ro, 1), (&atomic_peer, 2), false),
            Err(wc_status::LOC_PROT_ERR)
        );
        let mut s = slot(WrOpcode::AtomicCmpAndSwp, good, 22, 0x7000_0008, 0);
        let mut header = SendWqeHeader::read(&s);
        header.compare_add = 5;
        header.swap = 9;
        header.write(&mut s);
        let real = translate_send(&decode(&s), &s, (&a, 1), (&atomic_peer, 2), false).unwrap();
        assert_eq!(
            real.opcode,
            SendOpcode::CompareSwap {
                remote_addr: 0x5555_0000_1008,
                rkey: 0xbbbb,
                compare: 5,
                swap: 9,
            }
        );
        // The word must lie in the region (the last 8 bytes do, one byte further does not).
        let s = slot(
            WrOpcode::AtomicFetchAndAdd,
            good,
            22,
            0x7000_0000 + 8192 - 8,
            0,
        );
        assert!(translate_send(&decode(&s), &s, (&a, 1), (&atomic_peer, 2), false).is_ok());
        let s = slot(
            WrOpcode::AtomicFetchAndAdd,
            good,
            22,
            0x7000_0000 + 8192 - 7,
            0,
        );
        assert_eq!(
            translate_send(&decode(&s), &s, (&a, 1), (&atomic_peer, 2), false),
            Err(wc_status::REM_ACCESS_ERR)
        );
        let s = slot(WrOpcode::RdmaRead, good, 22, 0x7000_0000, 0);
        let mut wqe = decode(&s);
        wqe.header.flags = send_flags::INLINE as u8;
        assert_eq!(
            translate_send(&wqe, &s, (&a, 1), (&b, 2), false),
            Err(wc_status::LOC_QP_OP_ERR)
        );
    }

    #[test]
    fn immediate_data_and_inline_sends_translate_for_the_device() {
        let rw = AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE;
        let mut a = KeyTable::default();
        a.insert(11, 12, mr(1, rw));
        let mut b = KeyTable::default();
        b.insert(21, 22, mr(2, rw));
        let sge = Sge {
            addr: 0x7000_0000,
            length: 64,
            lkey: 11,
        };
        // WRITE_WITH_IMM: the peer's key and the immediate data as the WQE carries it.
        let mut s = slot(WrOpcode::RdmaWriteWithImm, sge, 22, 0x7000_0040, 0);
        let mut header = SendWqeHeader::read(&s);
        header.imm_data = 0x1234_5678;
        header.write(&mut s);
        let real = translate_send(&decode(&s), &s, (&a, 1), (&b, 2), true).unwrap();
        assert_eq!(
            real.opcode,
            SendOpcode::WriteImm {
                remote_addr: 0x5555_0000_1040,
                rkey: 0xbbbb,
                imm: 0x1234_5678
            }
        );
        assert!(real.signaled, "sq_sig_all signals every WQE");
        // SEND_WITH_IMM needs no remote key.
        let s = slot(WrOpcode::SendWithImm, sge, 0, 0, 0);
        let real = translate_send(&decode(&s), &s, (&a, 1), (&b, 2), false).unwrap();
        assert_eq!(real.opcode, SendOpcode::SendImm { imm: 0 });
        assert!(!real.signaled);
        // An inline SEND names no key: nothing to translate, the device copies the bytes.
        let header = SendWqeHeader {
            wr_id: 9,
            opcode: WrOpcode::Send as u8,
            flags: (send_flags::INLINE | send_flags::SIGNALED) as u8,
            inline_len: 40,
            ..SendWqeHeader::default()
        };
        let mut s = vec![0u8; SendWqe::slot_bytes(0, 40)];
        header.write(&mut s);
        let wqe = SendWqe::decode(&s, 1, 64).unwrap();
        let real = translate_send(&wqe, &s, (&KeyTable::default(), 1), (&b, 2), false).unwrap();
        assert!(real.inline && real.sges().is_empty() && real.opcode == SendOpcode::Send);
        // An inline WRITE still needs the peer's key, for the inline length.
        let header = SendWqeHeader {
            opcode: WrOpcode::RdmaWrite as u8,
            rkey: 22,
            remote_addr: 0x7000_0000 + 8192 - 40,
            ..header
        };
        header.write(&mut s);
        let wqe = SendWqe::decode(&s, 1, 64).unwrap();
        assert!(translate_send(&wqe, &s, (&a, 1), (&b, 2), false).is_ok());
        let header = SendWqeHeader {
            remote_addr: 0x7000_0000 + 8192 - 39,
            ..header
        };
        header.write(&mut s);
        let wqe = SendWqe::decode(&s, 1, 64).unwrap();
        assert_eq!(
            translate_send(&wqe, &s, (&a, 1), (&b, 2), false),
            Err(wc_status::REM_ACCESS_ERR)
        );
    }

    #[test]
    fn a_qp_connects_only_to_its_own_tenants_qp_at_the_named_address() {
        let mut d = QpDirectory::default();
        let ip = Ipv4Addr::new(10, 32, 0, 2);
        d.insert(
            0x1234,
            QpPlace {
                real_qpn: 0x99,
                ip,
                tenant: 1,
            },
        );
        assert_eq!(d.destination(1, ip, 0x1234), Ok(0x99));
        assert_eq!(
            d.destination(2, ip, 0x1234),
            Err(ConnectFault::NotThere(0x1234))
        );
        assert_eq!(
            d.destination(1, Ipv4Addr::new(10, 32, 0, 3), 0x1234),
            Err(ConnectFault::NotThere(0x1234))
        );
        assert_eq!(
            d.destination(1, ip, 0x99),
            Err(ConnectFault::NoSuchQp(0x99))
        );
        assert_eq!(d.virtual_of(0x99), Some(0x1234));
        d.remove(0x1234);
        assert_eq!(d.virtual_of(0x99), None);
    }

    #[test]
    fn completions_carry_virtual_qp_numbers() {
        let c = super::super::sys::Completion {
            wr_id: 7,
            status: 0,
            opcode: 128,
            byte_len: 64,
            qp_num: 0x99,
            src_qp: 0x98,
            vendor_err: 3,
            ..Default::default()
        };
        let cqe = translate_completion(&c, 0x1234, 0x1233);
        assert_eq!(
            (
                cqe.wr_id,
                cqe.qp_num,
                cqe.src_qp,
                cqe.byte_len,
                cqe.vendor_err
            ),
            (7, 0x1234, 0x1233, 64, 0)
        );
    }
}
