//! The hardware backend (cargo feature `rdma-hw`): the router opens an RDMA device through
//! rdma-core's libibverbs (rdma-sys's bindings) instead of executing verbs in its software
//! engine. `sys` is the only unsafe code (owning wrappers of PDs, MRs, CQs and QPs, typed
//! errors); this module chooses the device (`--rdma-device NAME|auto`), describes it, and
//! checks it end to end ([`Nic::probe`]: two RC QPs of the router's own, connected to each
//! other through the device, carry a SEND, an RDMA WRITE and an RDMA READ, and a forged rkey
//! fails with a remote access error; [`Nic::probe_container_path`]: one container work request
//! from its memory file through translation to the device and back; [`Nic::probe_zero_copy`]:
//! shared mappings of a memory file register and carry data).
//!
//! `translate` is the bookkeeping of the containers' side: virtual keys, addresses and QP
//! numbers to the device's, checked against the container's own tables (unit-tested); `path`
//! makes the containers' PDs, MRs, CQs and RC QPs on the device and runs their rings there
//! (docs/verbs-engine.md, "The hardware backend").

pub mod exchange;
pub mod path;
#[allow(unsafe_code)]
pub mod sys;
pub mod translate;

use freeflow_proto::verbs::wc_status;
use freeflow_proto::verbs::work::Cqe;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use sys::{
    Completion, Cq, Destination, Device, Mr, NicError, OwnBuffer, Pd, Qp, QpCaps, SendOpcode,
    SendRequest, Sge, SharedFileBuffer,
};

/// The one port the backend uses.
pub const PORT: u8 = 1;
/// The GID index of the port's address (RoCE v2 with an IPv4-mapped GID on rxe; Freeflow's own
/// device has only this one).
pub const GID_INDEX: u8 = 0;

/// `enum ibv_access_flags` bits.
mod access {
    pub const LOCAL_WRITE: u32 = 1;
    pub const REMOTE_WRITE: u32 = 2;
    pub const REMOTE_READ: u32 = 4;
}

/// Which device `--rdma-device` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first device with an active port 1.
    Auto,
    Named(String),
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Result<DeviceChoice, String> {
        match s {
            "" => Err("an empty --rdma-device".into()),
            "auto" => Ok(DeviceChoice::Auto),
            name if name.len() > 64 || name.contains(['/', '\0']) => {
                Err(format!("--rdma-device {name:?}: not a device name"))
            }
            name => Ok(DeviceChoice::Named(name.to_owned())),
        }
    }
}

/// An opened device with an active port (each shard's engine holds a clone: the context is
/// thread-safe, the objects each engine makes are its own).
#[derive(Debug, Clone)]
pub struct Nic {
    pub device: Arc<Device>,
    pub port: sys::PortInfo,
    pub gid: [u8; 16],
    /// What this router's device QPs and regions are, for other hosts' routers, and the
    /// asking side (`exchange`).
    pub exchange: Arc<exchange::Exchange>,
}

/// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`, RoCE v2's form).
pub fn gid_ipv4(gid: &[u8; 16]) -> Option<Ipv4Addr> {
    (gid[..10].iter().all(|b| *b == 0) && gid[10] == 0xff && gid[11] == 0xff)
        .then(|| Ipv4Addr::new(gid[12], gid[13], gid[14], gid[15]))
}

fn gid_text(gid: &[u8; 16]) -> String {
    match gid_ipv4(gid) {
        Some(ip) => format!("::ffff:{ip}"),
        None => std::net::Ipv6Addr::from(*gid).to_string(),
    }
}

/// What [`Nic::probe`] measured.
#[derive(Debug, Clone, Copy)]
pub struct ProbeReport {
    pub qpns: (u32, u32),
    pub sizes_checked: usize,
}

/// What the probe measured, in nanoseconds per operation (medians of [`COST_RUNS`] runs).
#[derive(Debug, Clone, Copy)]
pub struct Costs {
    /// Translating one container send WQE (one SGE, RDMA WRITE: a local and a remote key)
    /// into the device's terms: what the backend adds to each post, on this CPU.
    pub translate_send_ns: f64,
    /// Translating one device completion back (virtual QP numbers).
    pub translate_completion_ns: f64,
    /// A 64-byte SEND through the device, from post to its completion (one at a time).
    pub device_send_ns: f64,
}

/// Runs of each measurement; the median is reported.
const COST_RUNS: usize = 5;
/// Operations per run of a translation measurement.
const TRANSLATIONS_PER_RUN: u32 = 200_000;
/// SENDs per run of the device measurement.
const SENDS_PER_RUN: u32 = 200;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Whether the device registers memory as the backend holds the containers' (a shared mapping
/// of a memory file, written through another mapping), and carries it without a copy.
#[derive(Debug)]
pub enum ZeroCopy {
    /// Registered, and a SEND from it carried the bytes written through the other mapping.
    Works,
    /// The device refused the registration (Freeflow's own device does: its library
    /// registers only private pages it can move onto its own memory file).
    Refused(NicError),
}

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Nic(#[from] NicError),
    #[error("{what}: expected status {expected}, the device said {got:?}")]
    Status {
        what: &'static str,
        expected: u32,
        got: Completion,
    },
    #[error("{0}: no completion within 10 s")]
    Timeout(&'static str),
    #[error("{what}: the bytes that arrived differ from the bytes sent (size {size})")]
    Corrupt { what: &'static str, size: usize },
}

/// The probe's QP pair and buffers.
struct Loop {
    pd: Arc<Pd>,
    cq: Arc<Cq>,
    a: Qp,
    b: Qp,
    src: Arc<OwnBuffer>,
    dst: Arc<OwnBuffer>,
    src_mr: Mr,
    dst_mr: Mr,
}

/// How long the probe waits for one completion.
const PROBE_WAIT: Duration = Duration::from_secs(10);
/// Bytes of each probe buffer.
const PROBE_BUFFER: usize = 1 << 20;

impl Nic {
    /// Opens the device `choice` names and reads its port 1 and GID index 0; the port must be
    /// active.
    pub fn open(choice: &DeviceChoice) -> Result<Nic, NicError> {
        let device = match choice {
            DeviceChoice::Auto => Device::open(None)?,
            DeviceChoice::Named(name) => Device::open(Some(name))?,
        };
        let port = device.query_port(PORT)?;
        if !port.active {
            return Err(NicError::Invalid("port 1 of the device is not active"));
        }
        let gid = device.query_gid(PORT, i32::from(GID_INDEX))?;
        Ok(Nic {
            device,
            port,
            gid,
            exchange: exchange::Exchange::new(gid),
        })
    }

    /// One line for the router's log.
    pub fn describe(&self) -> String {
        format!(
            "RDMA device {} port {PORT} active (mtu enum {}, lid {}, {} GIDs), GID {}: {}",
            self.device.name(),
            self.port.active_mtu,
            self.port.lid,
            self.port.gid_table_len,
            GID_INDEX,
            gid_text(&self.gid)
        )
    }

    fn connect_loop(&self) -> Result<Loop, NicError> {
        let pd = self.device.alloc_pd()?;
        let cq = self.device.create_cq(64)?;
        let caps = QpCaps {
            max_send_wr: 16,
            max_recv_wr: 16,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        let a = Qp::create_rc(&pd, &cq, &cq, caps)?;
        let b = Qp::create_rc(&pd, &cq, &cq, caps)?;
        let rights = access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ;
        for (qp, peer) in [(&a, &b), (&b, &a)] {
            qp.to_init(PORT, rights)?;
            qp.to_rtr(&Destination {
                qpn: peer.qpn,
                gid: self.gid,
                lid: self.port.lid,
                rq_psn: 0,
                mtu: self.port.active_mtu,
                sgid_index: GID_INDEX,
                port: PORT,
                min_rnr_timer: 12,
                max_dest_rd_atomic: 1,
            })?;
            qp.to_rts(0, 14, 7, 7, 1)?;
        }
        let src = Arc::new(OwnBuffer::new(PROBE_BUFFER)?);
        let dst = Arc::new(OwnBuffer::new(PROBE_BUFFER)?);
        let src_mr = Mr::register(&pd, src.clone(), rights)?;
        let dst_mr = Mr::register(&pd, dst.clone(), rights)?;
        Ok(Loop {
            pd,
            cq,
            a,
            b,
            src,
            dst,
            src_mr,
            dst_mr,
        })
    }

    /// Checks the device end to end with objects of the router's own: two RC QPs connected to
    /// each other through it carry SENDs of `sizes` (into posted receives), RDMA WRITEs and
    /// READs of the same sizes, each checked byte for byte; then an RDMA WRITE naming an rkey
    /// the device never gave completes with IBV_WC_REM_ACCESS_ERR and changes nothing.
    pub fn probe(&self, sizes: &[usize]) -> Result<ProbeReport, ProbeError> {
        let l = self.connect_loop()?;
        let sge = |mr: &Mr, len: usize| Sge {
            addr: mr.addr,
            length: len as u32,
            lkey: mr.lkey,
        };
        let mut checked = 0;
        for (round, &size) in sizes.iter().enumerate() {
            let size = size.clamp(1, PROBE_BUFFER);
            let pattern: Vec<u8> = (0..size)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(round as u8 + 1))
                .collect();
            // SEND into a posted receive.
            l.src.write(0, &pattern)?;
            l.dst.write(0, &vec![0; size])?;
            l.b.post_recv(1, &[sge(&l.dst_mr, size)])?;
            l.a.post_send(&SendRequest {
                wr_id: 2,
                opcode: SendOpcode::Send,
                sges: &[sge(&l.src_mr, size)],
                signaled: true,
                fence: false,
                inline: false,
            })?;
            expect(&l.cq, 2, wc_status::SUCCESS, "SEND")?;
            check_bytes(&l.dst, &pattern, "SEND")?;
            // RDMA WRITE, then READ back into the source.
            l.dst.write(0, &vec![0; size])?;
            l.a.post_send(&SendRequest {
                wr_id: 3,
                opcode: SendOpcode::Write {
                    remote_addr: l.dst_mr.addr,
                    rkey: l.dst_mr.rkey,
                },
                sges: &[sge(&l.src_mr, size)],
                signaled: true,
                fence: false,
                inline: false,
            })?;
            expect(&l.cq, 1, wc_status::SUCCESS, "RDMA WRITE")?;
            check_bytes(&l.dst, &pattern, "RDMA WRITE")?;
            l.src.write(0, &vec![0; size])?;
            l.a.post_send(&SendRequest {
                wr_id: 4,
                opcode: SendOpcode::Read {
                    remote_addr: l.dst_mr.addr,
                    rkey: l.dst_mr.rkey,
                },
                sges: &[sge(&l.src_mr, size)],
                signaled: true,
                fence: false,
                inline: false,
            })?;
            expect(&l.cq, 1, wc_status::SUCCESS, "RDMA READ")?;
            check_bytes(&l.src, &pattern, "RDMA READ")?;
            checked += 1;
        }
        // A forged rkey: one the device did not give for this region.
        let forged = l.dst_mr.rkey ^ 0x00a5_5a00;
        l.dst.write(0, &[0x11; 64])?;
        l.src.write(0, &[0x22; 64])?;
        l.a.post_send(&SendRequest {
            wr_id: 5,
            opcode: SendOpcode::Write {
                remote_addr: l.dst_mr.addr,
                rkey: forged,
            },
            sges: &[sge(&l.src_mr, 64)],
            signaled: true,
            fence: false,
            inline: false,
        })?;
        expect(
            &l.cq,
            1,
            wc_status::REM_ACCESS_ERR,
            "RDMA WRITE, forged rkey",
        )?;
        check_bytes(&l.dst, &[0x11; 64], "RDMA WRITE, forged rkey")?;
        Ok(ProbeReport {
            qpns: (l.a.qpn, l.b.qpn),
            sizes_checked: checked,
        })
    }

    /// Measures the translation's cost and a SEND through the device ([`Costs`]).
    pub fn measure(&self) -> Result<Costs, ProbeError> {
        use freeflow_proto::verbs::work::{send_flags, SendWqe, SendWqeHeader, Sge as VSge};
        use freeflow_proto::verbs::AccessFlags;
        let mr = translate::MrEntry {
            pd: 1,
            access: AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE,
            iova: 0x7000_0000,
            length: 1 << 20,
            real_addr: 0x5555_0000_0000,
            real_lkey: 0x100,
            real_rkey: 0x200,
        };
        let mut table = translate::KeyTable::default();
        // A table of a realistic size: the lookups are hash lookups.
        for k in 0..256u32 {
            table.insert(1000 + 2 * k, 1001 + 2 * k, mr);
        }
        let header = SendWqeHeader {
            wr_id: 1,
            opcode: freeflow_proto::verbs::work::WrOpcode::RdmaWrite as u8,
            flags: send_flags::SIGNALED as u8,
            num_sge: 1,
            rkey: 1001,
            remote_addr: 0x7000_1000,
            ..SendWqeHeader::default()
        };
        let mut slot = vec![0u8; SendWqe::slot_bytes(1, 0)];
        header.write(&mut slot);
        VSge {
            addr: 0x7000_0040,
            length: 64,
            lkey: 1000,
        }
        .write(&mut slot[SendWqeHeader::LEN..]);
        let wqe = SendWqe::decode(&slot, 1, 0)
            .map_err(|_| NicError::Invalid("the measurement's WQE does not decode"))?;
        let per_op = |start: Instant, n: u32| start.elapsed().as_nanos() as f64 / f64::from(n);
        let mut sends = Vec::new();
        let mut completions = Vec::new();
        let wc = Completion {
            wr_id: 1,
            qp_num: 0x99,
            byte_len: 64,
            ..Completion::default()
        };
        for _ in 0..COST_RUNS {
            let start = Instant::now();
            for _ in 0..TRANSLATIONS_PER_RUN {
                let r = translate::translate_send(
                    std::hint::black_box(&wqe),
                    &slot,
                    (&table, 1),
                    (&table, 1),
                    false,
                );
                std::hint::black_box(r).map_err(|_| NicError::Invalid("translation failed"))?;
            }
            sends.push(per_op(start, TRANSLATIONS_PER_RUN));
            let start = Instant::now();
            for _ in 0..TRANSLATIONS_PER_RUN {
                std::hint::black_box(translate::translate_completion(
                    std::hint::black_box(&wc),
                    0x1234,
                    0x1235,
                ));
            }
            completions.push(per_op(start, TRANSLATIONS_PER_RUN));
        }
        let l = self.connect_loop()?;
        let mut device = Vec::new();
        for _ in 0..COST_RUNS {
            let start = Instant::now();
            for _ in 0..SENDS_PER_RUN {
                l.b.post_recv(
                    1,
                    &[Sge {
                        addr: l.dst_mr.addr,
                        length: 64,
                        lkey: l.dst_mr.lkey,
                    }],
                )?;
                l.a.post_send(&SendRequest {
                    wr_id: 2,
                    opcode: SendOpcode::Send,
                    sges: &[Sge {
                        addr: l.src_mr.addr,
                        length: 64,
                        lkey: l.src_mr.lkey,
                    }],
                    signaled: true,
                    fence: false,
                    inline: false,
                })?;
                expect(&l.cq, 2, wc_status::SUCCESS, "measured SEND")?;
            }
            device.push(per_op(start, SENDS_PER_RUN));
        }
        Ok(Costs {
            translate_send_ns: median(sends),
            translate_completion_ns: median(completions),
            device_send_ns: median(device),
        })
    }

    /// Registers a shared mapping of a memory file, as the backend registers a container's
    /// memory (the router's mapping of the container's memory file), writes a pattern through
    /// a second mapping of the file (the container's view), SENDs from the registered one and
    /// checks what arrives.
    pub fn probe_zero_copy(&self) -> Result<ZeroCopy, ProbeError> {
        let l = self.connect_loop()?;
        let shared = Arc::new(SharedFileBuffer::new(PROBE_BUFFER)?);
        let rights = access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ;
        let mr = match Mr::register(&l.pd, shared.clone(), rights) {
            Ok(mr) => mr,
            Err(e) => return Ok(ZeroCopy::Refused(e)),
        };
        let container_view = shared.second_view()?;
        let pattern: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        container_view.write(0, &pattern)?;
        l.dst.write(0, &[0; 4096])?;
        l.b.post_recv(
            1,
            &[Sge {
                addr: l.dst_mr.addr,
                length: 4096,
                lkey: l.dst_mr.lkey,
            }],
        )?;
        l.a.post_send(&SendRequest {
            wr_id: 2,
            opcode: SendOpcode::Send,
            sges: &[Sge {
                addr: mr.addr,
                length: 4096,
                lkey: mr.lkey,
            }],
            signaled: true,
            fence: false,
            inline: false,
        })?;
        expect(&l.cq, 2, wc_status::SUCCESS, "SEND from shared memory")?;
        check_bytes(&l.dst, &pattern, "SEND from shared memory")?;
        // One region's pages from the middle of the file, as the backend maps a container's
        // region: an RDMA WRITE into it arrives at that file offset (seen through the other
        // mapping), and a SEND from it carries what is there.
        const REGION_OFFSET: usize = 5 * 4096;
        const REGION_LEN: usize = 3 * 4096;
        let region = Arc::new(shared.view_at(REGION_OFFSET, REGION_LEN)?);
        let region_mr = Mr::register(&l.pd, region.clone(), rights).map_err(ProbeError::Nic)?;
        let written: Vec<u8> = (0..REGION_LEN).map(|i| (i % 241) as u8 ^ 0x5a).collect();
        l.src.write(0, &written)?;
        l.a.post_send(&SendRequest {
            wr_id: 3,
            opcode: SendOpcode::Write {
                remote_addr: region_mr.addr,
                rkey: region_mr.rkey,
            },
            sges: &[Sge {
                addr: l.src_mr.addr,
                length: REGION_LEN as u32,
                lkey: l.src_mr.lkey,
            }],
            signaled: true,
            fence: false,
            inline: false,
        })?;
        expect(
            &l.cq,
            1,
            wc_status::SUCCESS,
            "RDMA WRITE into a file region",
        )?;
        let mut seen = vec![0u8; REGION_LEN];
        container_view.read(REGION_OFFSET, &mut seen)?;
        if seen != written {
            return Err(ProbeError::Corrupt {
                what: "RDMA WRITE into a file region",
                size: REGION_LEN,
            });
        }
        let tail: Vec<u8> = (0..64).map(|i| 200 - i as u8).collect();
        container_view.write(REGION_OFFSET + REGION_LEN - 64, &tail)?;
        l.b.post_recv(
            4,
            &[Sge {
                addr: l.dst_mr.addr,
                length: 64,
                lkey: l.dst_mr.lkey,
            }],
        )?;
        l.a.post_send(&SendRequest {
            wr_id: 5,
            opcode: SendOpcode::Send,
            sges: &[Sge {
                addr: region_mr.addr + (REGION_LEN - 64) as u64,
                length: 64,
                lkey: region_mr.lkey,
            }],
            signaled: true,
            fence: false,
            inline: false,
        })?;
        expect(&l.cq, 2, wc_status::SUCCESS, "SEND from a file region")?;
        check_bytes(&l.dst, &tail, "SEND from a file region")?;
        Ok(ZeroCopy::Works)
    }
}

/// What [`Nic::probe_container_path`] saw.
#[derive(Debug, Clone, Copy)]
pub struct ContainerPathReport {
    /// The completion of the translated RDMA WRITE, in the container's terms.
    pub completion: Cqe,
    /// Bytes written, checked in the memory file.
    pub bytes: usize,
}

/// A container's virtual names in [`Nic::probe_container_path`].
mod probe_container {
    /// The container's protection domain, QP number and its peer's (virtual).
    pub const PD: u32 = 1;
    pub const QPN: u32 = 0x11;
    pub const PEER_QPN: u32 = 0x12;
    /// Its regions: virtual addresses in its memory file (file offset = address), keys.
    pub const SRC: u64 = 0x7f12_3456_7000 + 96;
    pub const DST: u64 = 0x7f12_3456_f000 + 40;
    pub const LEN: usize = 5000;
    pub const SRC_KEYS: (u32, u32) = (0x101, 0x102);
    pub const DST_KEYS: (u32, u32) = (0x201, 0x202);
}

impl Nic {
    /// The container path end to end, for one work request: a memory file made as a
    /// container's shim makes it (sealed, the whole address space, pages at their virtual
    /// addresses), adopted and mapped by the engine's own `MemoryFile`; two of its regions
    /// registered on the device from the router's mappings; a container's RDMA WRITE WQE (as
    /// its ring carries it: virtual keys and addresses) translated by `translate` and posted;
    /// the device's completion translated back to the container's QP number; the bytes
    /// checked in the memory file (the container's view). A WQE naming an rkey the container
    /// does not have fails in translation, before the device.
    pub fn probe_container_path(&self) -> Result<ContainerPathReport, ProbeError> {
        use crate::verbs::MemoryFile;
        use freeflow_proto::verbs::work::{send_flags, SendWqe, SendWqeHeader, WrOpcode};
        use freeflow_proto::verbs::{AccessFlags, MEMORY_FILE_SIZE, PAGE_SIZE, REQUIRED_SEALS};
        use probe_container as c;
        use std::os::unix::fs::FileExt;
        use translate::{translate_completion, translate_send, KeyTable, MrEntry};
        let os = |verb| move |source| NicError::Call { verb, source };
        let fd = freeflow_os::memfd::sized(c"ff-nic-container", MEMORY_FILE_SIZE, REQUIRED_SEALS)
            .map_err(os("memfd_create"))?;
        let file = std::fs::File::from(fd.try_clone().map_err(os("dup"))?);
        let pattern: Vec<u8> = (0..c::LEN).map(|i| (i % 239) as u8 ^ 0xa5).collect();
        let page = |a: u64| a - a % PAGE_SIZE;
        let pages_end = |a: u64| (a + c::LEN as u64).next_multiple_of(PAGE_SIZE);
        // The shim's moves write every page of a registered region into the file.
        for (start, fill) in [(c::SRC, &pattern[..]), (c::DST, &vec![0u8; c::LEN][..])] {
            file.write_all_at(
                &vec![0u8; (pages_end(start) - page(start)) as usize],
                page(start),
            )
            .and_then(|()| file.write_all_at(fill, start))
            .map_err(os("pwrite"))?;
        }
        let memory = MemoryFile::adopt(fd, MEMORY_FILE_SIZE, MEMORY_FILE_SIZE)
            .map_err(|_| NicError::Invalid("the engine refused the container's memory file"))?;
        let l = self.connect_loop()?;
        let rights = access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ;
        let access =
            AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_READ;
        let mut keys = KeyTable::default();
        let mut regions = Vec::new();
        for (start, (lkey, rkey)) in [(c::SRC, c::SRC_KEYS), (c::DST, c::DST_KEYS)] {
            let mapping = memory
                .map(page(start), pages_end(start) - page(start), true)
                .map_err(|_| NicError::Invalid("the engine could not map the region"))?;
            let mr = Mr::register(&l.pd, Arc::new(mapping), rights)?;
            keys.insert(
                lkey,
                rkey,
                MrEntry {
                    pd: c::PD,
                    access,
                    iova: start,
                    length: c::LEN as u64,
                    real_addr: mr.addr + start % PAGE_SIZE,
                    real_lkey: mr.lkey,
                    real_rkey: mr.rkey,
                },
            );
            regions.push(mr);
        }
        let wqe_slot = |rkey: u32| {
            let header = SendWqeHeader {
                wr_id: 0xc0ffee,
                opcode: WrOpcode::RdmaWrite as u8,
                flags: send_flags::SIGNALED as u8,
                num_sge: 1,
                rkey,
                remote_addr: c::DST,
                ..SendWqeHeader::default()
            };
            let mut slot = vec![0u8; SendWqe::slot_bytes(1, 0)];
            header.write(&mut slot);
            freeflow_proto::verbs::work::Sge {
                addr: c::SRC,
                length: c::LEN as u32,
                lkey: c::SRC_KEYS.0,
            }
            .write(&mut slot[SendWqeHeader::LEN..]);
            slot
        };
        let translate = |slot: &[u8]| {
            let wqe = SendWqe::decode(slot, 1, 0)
                .map_err(|_| NicError::Invalid("the probe's WQE did not decode"))?;
            Ok::<_, NicError>(translate_send(
                &wqe,
                slot,
                (&keys, c::PD),
                (&keys, c::PD),
                false,
            ))
        };
        // A key the container never registered: refused before the device.
        if translate(&wqe_slot(0xdead))? != Err(wc_status::REM_ACCESS_ERR) {
            return Err(ProbeError::Corrupt {
                what: "a forged virtual rkey was not refused in translation",
                size: 0,
            });
        }
        let slot = wqe_slot(c::DST_KEYS.1);
        let real = translate(&slot)?.map_err(|status| ProbeError::Status {
            what: "translating the container's RDMA WRITE",
            expected: wc_status::SUCCESS,
            got: Completion {
                status,
                ..Completion::default()
            },
        })?;
        l.a.post_send(&SendRequest {
            wr_id: 0xc0ffee,
            opcode: real.opcode,
            sges: real.sges(),
            signaled: real.signaled,
            fence: real.fence,
            inline: real.inline,
        })?;
        let completion = wait_one(&l.cq, "the container's translated RDMA WRITE")?;
        let cqe = translate_completion(&completion, c::QPN, c::PEER_QPN);
        if cqe.status != wc_status::SUCCESS || cqe.wr_id != 0xc0ffee {
            return Err(ProbeError::Status {
                what: "the container's translated RDMA WRITE",
                expected: wc_status::SUCCESS,
                got: completion,
            });
        }
        let mut seen = vec![0u8; c::LEN];
        file.read_exact_at(&mut seen, c::DST).map_err(os("pread"))?;
        if seen != pattern {
            return Err(ProbeError::Corrupt {
                what: "the container's translated RDMA WRITE",
                size: c::LEN,
            });
        }
        Ok(ContainerPathReport {
            completion: cqe,
            bytes: c::LEN,
        })
    }
}

/// Waits (bounded) for one completion on `cq`.
fn wait_one(cq: &Cq, what: &'static str) -> Result<Completion, ProbeError> {
    let deadline = Instant::now() + PROBE_WAIT;
    let mut batch = [Completion::default(); 1];
    loop {
        if cq.poll(&mut batch)? == 1 {
            return Ok(batch[0]);
        }
        if Instant::now() > deadline {
            return Err(ProbeError::Timeout(what));
        }
        std::thread::yield_now();
    }
}

/// Waits (bounded) for `count` completions on `cq`, each with `status`.
fn expect(cq: &Cq, count: usize, status: u32, what: &'static str) -> Result<(), ProbeError> {
    let deadline = Instant::now() + PROBE_WAIT;
    let mut seen = 0;
    let mut batch = [Completion::default(); 4];
    while seen < count {
        let n = cq.poll(&mut batch)?;
        for c in &batch[..n] {
            if c.status != status {
                return Err(ProbeError::Status {
                    what,
                    expected: status,
                    got: *c,
                });
            }
        }
        seen += n;
        if n == 0 {
            if Instant::now() > deadline {
                return Err(ProbeError::Timeout(what));
            }
            std::thread::yield_now();
        }
    }
    Ok(())
}

fn check_bytes(buf: &OwnBuffer, want: &[u8], what: &'static str) -> Result<(), ProbeError> {
    let mut got = vec![0; want.len()];
    buf.read(0, &mut got)?;
    if got != want {
        return Err(ProbeError::Corrupt {
            what,
            size: want.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choice_parses_auto_and_names_and_refuses_paths() {
        assert_eq!(DeviceChoice::parse("auto"), Ok(DeviceChoice::Auto));
        assert_eq!(
            DeviceChoice::parse("rxe0"),
            Ok(DeviceChoice::Named("rxe0".into()))
        );
        assert!(DeviceChoice::parse("").is_err());
        assert!(DeviceChoice::parse("../x").is_err());
    }

    #[test]
    fn an_absent_device_is_an_error_not_a_crash() {
        // Whatever devices this machine has, none is called this.
        let err = Nic::open(&DeviceChoice::Named("ff-no-such-device".into())).unwrap_err();
        assert!(
            matches!(err, NicError::NoDevice { .. } | NicError::Call { .. }),
            "{err}"
        );
    }

    #[test]
    fn ipv4_mapped_gids_read_as_addresses() {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[10, 32, 0, 9]);
        assert_eq!(gid_ipv4(&gid), Some(Ipv4Addr::new(10, 32, 0, 9)));
        assert_eq!(gid_text(&gid), "::ffff:10.32.0.9");
        gid[0] = 0xfe;
        assert_eq!(gid_ipv4(&gid), None);
    }
}
