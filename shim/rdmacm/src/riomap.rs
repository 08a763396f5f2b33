//! The bookkeeping of riomap/riowrite (docs/rsockets.md, "I/O maps"), apart from the verbs so
//! that it can be tested alone: the maps of ours the peer may write ([`OwnMaps`]: a table of
//! the size the peer allows, announcements waiting to go), and the maps the peer announced to
//! us ([`PeerMaps`]: a table of the size we allow, checked as announcements arrive and at each
//! riowrite).
//!
//! An announcement is a 32-byte record in a message of its own (a SEND with the map bit in its
//! immediate), in order with the stream: `index` (u16), 6 bytes zero, `offset` (u64: where the
//! map begins in the riowrite offsets), `addr` (u64: the mapped memory's address in the
//! announcer's process), `len` (u32; 0 withdraws the entry), `rkey` (u32); little-endian.

/// The largest RDMA_IOMAPSIZE (maps of the peer a socket takes): rdma-core's scale keeps
/// values up to 128 exact.
pub const MAX_IOMAPS: u16 = 128;
/// Bytes of one announcement.
pub const RECORD_LEN: usize = 32;
/// The largest map: the length is 32 bits on the wire (and in an MR's sge).
pub const MAX_MAP_LEN: u64 = u32::MAX as u64;

/// One entry of a map table, as announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    pub index: u16,
    pub offset: u64,
    pub addr: u64,
    /// 0: the entry is withdrawn.
    pub len: u32,
    pub rkey: u32,
}

impl Announce {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut r = [0u8; RECORD_LEN];
        r[0..2].copy_from_slice(&self.index.to_le_bytes());
        r[8..16].copy_from_slice(&self.offset.to_le_bytes());
        r[16..24].copy_from_slice(&self.addr.to_le_bytes());
        r[24..28].copy_from_slice(&self.len.to_le_bytes());
        r[28..32].copy_from_slice(&self.rkey.to_le_bytes());
        r
    }

    /// A record as it came from the peer: any bytes (checked by [`PeerMaps::apply`]).
    pub fn decode(bytes: &[u8]) -> Result<Announce, MapError> {
        if bytes.len() != RECORD_LEN {
            return Err(MapError("a map announcement of the wrong length"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8"));
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4"));
        if bytes[2..8].iter().any(|&b| b != 0) {
            return Err(MapError("a map announcement with reserved bytes set"));
        }
        Ok(Announce {
            index: u16::from_le_bytes([bytes[0], bytes[1]]),
            offset: u64_at(8),
            addr: u64_at(16),
            len: u32_at(24),
            rkey: u32_at(28),
        })
    }
}

/// A broken announcement or a riowrite outside the peer's maps: the reason.
#[derive(Debug, PartialEq, Eq)]
pub struct MapError(pub &'static str);

/// The peer's maps: where our riowrites may go. Sized by our RDMA_IOMAPSIZE (told to the peer
/// at connect): an announcement beyond it, or one whose ranges wrap, is the peer breaking the
/// protocol.
#[derive(Debug, Default)]
pub struct PeerMaps {
    table: Vec<Option<Announce>>,
}

impl PeerMaps {
    pub fn new(size: u16) -> PeerMaps {
        PeerMaps {
            table: vec![None; usize::from(size.min(MAX_IOMAPS))],
        }
    }

    pub fn apply(&mut self, a: Announce) -> Result<(), MapError> {
        let Some(entry) = self.table.get_mut(usize::from(a.index)) else {
            return Err(MapError(
                "a map announcement beyond the RDMA_IOMAPSIZE this side allows",
            ));
        };
        if a.len == 0 {
            *entry = None;
            return Ok(());
        }
        if a.offset.checked_add(u64::from(a.len)).is_none()
            || a.addr.checked_add(u64::from(a.len)).is_none()
        {
            return Err(MapError("a map announcement whose range wraps"));
        }
        *entry = Some(a);
        Ok(())
    }

    /// Where `len` bytes at riowrite offset `offset` go: (remote address, rkey, bytes that fit
    /// in the map that holds `offset`, at most `len`).
    pub fn target(&self, offset: u64, len: usize) -> Result<(u64, u32, usize), MapError> {
        let m = self
            .table
            .iter()
            .flatten()
            .find(|m| offset >= m.offset && offset - m.offset < u64::from(m.len))
            .ok_or(MapError("no map of the peer holds this offset"))?;
        let into = offset - m.offset;
        let room = u64::from(m.len) - into;
        let n = usize::try_from(room).unwrap_or(usize::MAX).min(len);
        Ok((m.addr + into, m.rkey, n))
    }
}

/// One map of ours: the caller's range and its registration (`mr`: what the verbs side needs
/// to deregister it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnMap<M> {
    pub addr: u64,
    pub len: usize,
    pub offset: u64,
    pub mr: M,
    /// The peer's table entry (None: PROT_NONE, registered but not announced).
    pub index: Option<u16>,
}

/// Our maps, and the announcements (maps and withdrawals) not sent yet, in order.
#[derive(Debug)]
pub struct OwnMaps<M> {
    /// The peer's table: entry i holds the map announced at i.
    slots: Vec<Option<OwnMap<M>>>,
    /// PROT_NONE maps (rdma-core registers them without announcing them).
    local: Vec<OwnMap<M>>,
    pending: std::collections::VecDeque<Announce>,
}

impl<M: Copy> OwnMaps<M> {
    /// `peer_size`: the RDMA_IOMAPSIZE the peer told at connect.
    pub fn new(peer_size: u16) -> OwnMaps<M> {
        OwnMaps {
            slots: (0..peer_size.min(MAX_IOMAPS)).map(|_| None).collect(),
            local: Vec::new(),
            pending: Default::default(),
        }
    }

    /// The free entry a writable map would take: None when the peer's table is full (more maps
    /// than its RDMA_IOMAPSIZE: ENOMEM, as rdma-core).
    pub fn free_index(&self) -> Option<u16> {
        self.slots
            .iter()
            .position(Option::is_none)
            .map(|i| i as u16)
    }

    /// Adds a registered map (at `index` from [`OwnMaps::free_index`], or PROT_NONE) and queues
    /// its announcement.
    pub fn add(&mut self, map: OwnMap<M>, rkey: u32) {
        match map.index {
            Some(i) => {
                self.pending.push_back(Announce {
                    index: i,
                    offset: map.offset,
                    addr: map.addr,
                    len: map.len as u32,
                    rkey,
                });
                self.slots[usize::from(i)] = Some(map);
            }
            None => self.local.push(map),
        }
    }

    /// Removes the map of exactly (addr, len), as riounmap names it, and queues the withdrawal
    /// of its entry; None when there is none (EINVAL).
    pub fn remove(&mut self, addr: u64, len: usize) -> Option<OwnMap<M>> {
        let same = |m: &OwnMap<M>| m.addr == addr && m.len == len;
        if let Some(i) = self.local.iter().position(same) {
            return Some(self.local.remove(i));
        }
        let i = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(same))?;
        let map = self.slots[i].take()?;
        self.pending.push_back(Announce {
            index: i as u16,
            offset: 0,
            addr: 0,
            len: 0,
            rkey: 0,
        });
        Some(map)
    }

    /// The next announcement to send (it stays queued until [`OwnMaps::sent`]).
    pub fn next_pending(&self) -> Option<Announce> {
        self.pending.front().copied()
    }

    pub fn sent(&mut self) {
        self.pending.pop_front();
    }

    /// Every map (to deregister at close).
    pub fn drain_all(&mut self) -> Vec<OwnMap<M>> {
        self.pending.clear();
        let mut all: Vec<OwnMap<M>> = self.slots.iter_mut().filter_map(Option::take).collect();
        all.append(&mut self.local);
        all
    }
}

/// RDMA_IOMAPSIZE as rsetsockopt takes it: negative is EINVAL (None); beyond [`MAX_IOMAPS`]
/// is capped.
pub fn iomap_size_option(value: i32) -> Option<u16> {
    (value >= 0).then(|| value.min(i32::from(MAX_IOMAPS)) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(index: Option<u16>, addr: u64, len: usize, offset: u64) -> OwnMap<u8> {
        OwnMap {
            addr,
            len,
            offset,
            mr: 0,
            index,
        }
    }

    #[test]
    fn an_announcement_goes_through_the_wire_format_unchanged() {
        let a = Announce {
            index: 3,
            offset: 0x1122_3344_5566_7788,
            addr: 0x7fff_0000_1000,
            len: 4096,
            rkey: 0xdead_beef,
        };
        assert_eq!(Announce::decode(&a.encode()), Ok(a));
        assert!(Announce::decode(&a.encode()[..31]).is_err(), "short record");
        let mut reserved = a.encode();
        reserved[5] = 1;
        assert!(Announce::decode(&reserved).is_err(), "reserved bytes set");
    }

    #[test]
    fn maps_take_the_peers_entries_until_its_table_is_full() {
        let mut own: OwnMaps<u8> = OwnMaps::new(2);
        for (i, addr) in [(0u16, 0x1000u64), (1, 0x2000)] {
            assert_eq!(own.free_index(), Some(i));
            own.add(map(Some(i), addr, 100, 0), 7);
        }
        assert_eq!(own.free_index(), None, "a third map: ENOMEM");
        // PROT_NONE maps take no entry and announce nothing.
        own.add(map(None, 0x3000, 10, 0), 0);
        assert_eq!(own.next_pending().map(|a| a.index), Some(0));
        own.sent();
        assert_eq!(own.next_pending().map(|a| a.index), Some(1));
        own.sent();
        assert_eq!(own.next_pending(), None);
        // riounmap names the range exactly; its entry is withdrawn, in order, and free again.
        assert!(own.remove(0x1000, 99).is_none(), "a different length");
        assert_eq!(own.remove(0x1000, 100).map(|m| m.index), Some(Some(0)));
        let w = own.next_pending().unwrap();
        assert_eq!((w.index, w.len), (0, 0));
        assert_eq!(own.free_index(), Some(0));
        assert_eq!(own.remove(0x3000, 10).map(|m| m.index), Some(None));
        assert_eq!(own.drain_all().len(), 1);
        let none: OwnMaps<u8> = OwnMaps::new(0);
        assert_eq!(none.free_index(), None, "RDMA_IOMAPSIZE 0 (the default)");
    }

    #[test]
    fn riowrites_go_only_inside_an_announced_map() {
        let mut peer = PeerMaps::new(2);
        assert!(peer.target(0, 1).is_err(), "nothing announced yet");
        peer.apply(Announce {
            index: 1,
            offset: 1000,
            addr: 0x5000,
            len: 100,
            rkey: 9,
        })
        .unwrap();
        assert_eq!(peer.target(1000, 10), Ok((0x5000, 9, 10)));
        assert_eq!(
            peer.target(1050, 500),
            Ok((0x5032, 9, 50)),
            "cut at the end"
        );
        assert!(peer.target(999, 1).is_err(), "before the map");
        assert!(peer.target(1100, 1).is_err(), "just past the map");
        // Withdrawn: writes there fail.
        peer.apply(Announce {
            index: 1,
            offset: 0,
            addr: 0,
            len: 0,
            rkey: 0,
        })
        .unwrap();
        assert!(peer.target(1000, 1).is_err());
    }

    #[test]
    fn hostile_announcements_are_errors() {
        let mut peer = PeerMaps::new(1);
        let ok = Announce {
            index: 0,
            offset: 0,
            addr: 0x1000,
            len: 10,
            rkey: 1,
        };
        assert!(
            peer.apply(Announce { index: 1, ..ok }).is_err(),
            "beyond our RDMA_IOMAPSIZE"
        );
        assert!(
            peer.apply(Announce {
                offset: u64::MAX - 5,
                ..ok
            })
            .is_err(),
            "offsets that wrap"
        );
        assert!(
            peer.apply(Announce {
                addr: u64::MAX - 5,
                ..ok
            })
            .is_err(),
            "addresses that wrap"
        );
        assert!(PeerMaps::new(0).apply(ok).is_err(), "we allowed none");
        // A map at the very top of the offsets still answers without overflow.
        peer.apply(Announce {
            offset: u64::MAX - 10,
            ..ok
        })
        .unwrap();
        assert_eq!(peer.target(u64::MAX - 1, 100), Ok((0x1009, 1, 1)));
    }

    #[test]
    fn the_option_is_bounded() {
        assert_eq!(iomap_size_option(-1), None);
        assert_eq!(iomap_size_option(0), Some(0));
        assert_eq!(iomap_size_option(1), Some(1));
        assert_eq!(iomap_size_option(100_000), Some(MAX_IOMAPS));
    }
}
