//! The flow control of one rsocket connection (docs/rsockets.md, "On the wire"), apart from
//! the verbs so that it can be tested alone: which send slots are free, how many receives the
//! peer has posted for us (credits), which received slots hold unread bytes, and how many of
//! our reposted receives the peer has not been told of yet.
//!
//! Every message is a SEND with immediate data carrying the credits it returns (and FIN); data
//! takes a credit only while another stays in reserve, so a credit update or FIN can always go
//! and neither side can be left without credits while the other waits for some.

use std::collections::VecDeque;

/// Receive (and send) slots per side.
pub const SLOTS: u16 = 16;
/// Bytes per slot: the largest message.
pub const SLOT_LEN: usize = 64 * 1024;
/// Immediate data: end of the sender's stream.
const IMM_FIN: u32 = 1 << 31;
/// Immediate data: the payload is an I/O map announcement (crate::riomap), not stream bytes.
const IMM_MAP: u32 = 1 << 30;
/// Immediate data: credits returned (receives reposted since the last message).
const IMM_CREDITS: u32 = 0xffff;

/// The peer broke the protocol (a hostile or broken peer): the connection ends with ECONNRESET.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError(pub &'static str);

/// A message to send: the immediate data to put on it (credits returned, FIN).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Imm(pub u32);

impl Imm {
    fn new(credits: u16, fin: bool) -> Imm {
        Imm(u32::from(credits) | if fin { IMM_FIN } else { 0 })
    }
    pub fn map(self) -> bool {
        self.0 & IMM_MAP != 0
    }
    pub fn credits(self) -> u16 {
        (self.0 & IMM_CREDITS) as u16
    }
    pub fn fin(self) -> bool {
        self.0 & IMM_FIN != 0
    }
}

/// What a received message was.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Arrival {
    /// No payload (credits, FIN): the slot is free, to repost now.
    Empty,
    /// Stream bytes, kept until read.
    Data,
    /// An I/O map announcement in the slot: to apply, then repost the slot.
    Map,
}

/// Bytes received and not read yet: in receive slot `slot`, from `offset`, `len` left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unread {
    slot: u16,
    offset: usize,
    len: usize,
}

/// One connection's flow control.
#[derive(Debug)]
pub struct Flow {
    /// Receives the peer has posted and we have not used.
    credits: u16,
    /// Send slots not in use by a send in flight.
    free_send: Vec<u16>,
    /// Sends posted and not completed (data, credit updates, FIN).
    in_flight: u16,
    unread: VecDeque<Unread>,
    /// Receives reposted since the last message told the peer.
    owed: u16,
    fin_received: bool,
    fin_sent: bool,
}

impl Default for Flow {
    fn default() -> Flow {
        Flow::new()
    }
}

impl Flow {
    /// A new connection: both sides posted all their receives before connecting.
    pub fn new() -> Flow {
        Flow {
            credits: SLOTS,
            free_send: (0..SLOTS).rev().collect(),
            in_flight: 0,
            unread: VecDeque::new(),
            owed: 0,
            fin_received: false,
            fin_sent: false,
        }
    }

    /// Data can go now: a free slot, and a credit beyond the one kept for updates and FIN.
    pub fn can_send_data(&self) -> bool {
        !self.fin_sent && self.credits >= 2 && !self.free_send.is_empty()
    }

    /// Takes a send slot and a credit for data; the message returns every credit owed.
    pub fn take_data_send(&mut self) -> Option<(u16, Imm)> {
        if !self.can_send_data() {
            return None;
        }
        let slot = self.free_send.pop()?;
        self.credits -= 1;
        self.in_flight += 1;
        Some((slot, Imm::new(std::mem::take(&mut self.owed), false)))
    }

    /// Takes a send slot and a credit for a map announcement (as data: the reserve credit
    /// stays for updates and FIN).
    pub fn take_map_send(&mut self) -> Option<(u16, Imm)> {
        let (slot, imm) = self.take_data_send()?;
        Some((slot, Imm(imm.0 | IMM_MAP)))
    }

    /// Takes a send slot for an RDMA WRITE (riowrite): no credit, as a write uses no receive
    /// of the peer's; none after FIN.
    pub fn take_write_slot(&mut self) -> Option<u16> {
        if self.fin_sent {
            return None;
        }
        let slot = self.free_send.pop()?;
        self.in_flight += 1;
        Some(slot)
    }

    /// A credit update is due (half the peer's credits are ours to return) and can go.
    pub fn take_credit_update(&mut self) -> Option<Imm> {
        if self.owed < SLOTS / 2 || self.credits == 0 {
            return None;
        }
        self.credits -= 1;
        self.in_flight += 1;
        Some(Imm::new(std::mem::take(&mut self.owed), false))
    }

    /// FIN, once, when a credit is there (the reserve one at worst).
    pub fn take_fin(&mut self) -> Option<Imm> {
        if self.fin_sent || self.credits == 0 {
            return None;
        }
        self.credits -= 1;
        self.in_flight += 1;
        self.fin_sent = true;
        Some(Imm::new(std::mem::take(&mut self.owed), true))
    }

    /// A send completed; `slot` is the data slot it used, if any.
    pub fn send_done(&mut self, slot: Option<u16>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(s) = slot {
            if s < SLOTS && !self.free_send.contains(&s) {
                self.free_send.push(s);
            }
        }
    }

    pub fn free_slots(&self) -> usize {
        self.free_send.len()
    }

    pub fn sends_in_flight(&self) -> u16 {
        self.in_flight
    }

    pub fn fin_sent(&self) -> bool {
        self.fin_sent
    }

    /// A message arrived in receive `slot` with `len` bytes: what it was.
    pub fn received(&mut self, slot: u16, len: usize, imm: Imm) -> Result<Arrival, ProtocolError> {
        if slot >= SLOTS || len > SLOT_LEN {
            return Err(ProtocolError("a message beyond the receive slots"));
        }
        if self.fin_received {
            return Err(ProtocolError("a message after FIN"));
        }
        let credits = self.credits.saturating_add(imm.credits());
        if credits > SLOTS {
            return Err(ProtocolError("more credits returned than receives exist"));
        }
        self.credits = credits;
        if imm.fin() {
            self.fin_received = true;
        }
        if imm.map() {
            // The caller reads the announcement from the slot, then reposts it.
            return Ok(Arrival::Map);
        }
        if len == 0 {
            return Ok(Arrival::Empty);
        }
        self.unread.push_back(Unread {
            slot,
            offset: 0,
            len,
        });
        Ok(Arrival::Data)
    }

    /// A receive slot was posted again: one more credit owed to the peer.
    pub fn reposted(&mut self) {
        self.owed = self.owed.saturating_add(1).min(SLOTS);
    }

    pub fn readable_bytes(&self) -> usize {
        self.unread.iter().map(|u| u.len).sum()
    }

    /// End of stream: FIN received and everything before it read.
    pub fn at_eof(&self) -> bool {
        self.fin_received && self.unread.is_empty()
    }

    /// Where the next unread bytes are: (slot, offset, length).
    pub fn next_unread(&self) -> Option<(u16, usize, usize)> {
        self.unread.front().map(|u| (u.slot, u.offset, u.len))
    }

    /// The `n`th run of unread bytes (for MSG_PEEK): (slot, offset, length).
    pub fn nth_unread(&self, n: usize) -> Option<(u16, usize, usize)> {
        self.unread.get(n).map(|u| (u.slot, u.offset, u.len))
    }

    /// `n` bytes of the first unread run were read; Some(slot) when that slot is all read (to
    /// repost). `peek`ing callers do not call this.
    pub fn consume(&mut self, n: usize) -> Option<u16> {
        let front = self.unread.front_mut()?;
        let n = n.min(front.len);
        front.offset += n;
        front.len -= n;
        if front.len == 0 {
            let slot = front.slot;
            self.unread.pop_front();
            return Some(slot);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ends joined by a perfect wire: what one sends, the other receives (in order).
    struct Pair {
        a: Flow,
        b: Flow,
        /// (from a?, slot of the sender, len, imm)
        wire: VecDeque<(bool, Option<u16>, usize, Imm)>,
        next_recv: [u16; 2],
    }

    impl Pair {
        fn new() -> Pair {
            Pair {
                a: Flow::new(),
                b: Flow::new(),
                wire: VecDeque::new(),
                next_recv: [0, 0],
            }
        }
        /// Delivers everything on the wire; the receiver reposts empty messages at once.
        fn deliver(&mut self) {
            while let Some((from_a, slot, len, imm)) = self.wire.pop_front() {
                let (tx, rx, r) = match from_a {
                    true => (&mut self.a, &mut self.b, 1),
                    false => (&mut self.b, &mut self.a, 0),
                };
                tx.send_done(slot);
                let recv_slot = self.next_recv[r] % SLOTS;
                self.next_recv[r] += 1;
                if rx.received(recv_slot, len, imm).unwrap() == Arrival::Empty {
                    rx.reposted();
                }
            }
        }
    }

    #[test]
    fn data_keeps_one_credit_in_reserve_for_updates_and_fin() {
        let mut f = Flow::new();
        let mut sent = 0;
        while f.take_data_send().is_some() {
            sent += 1;
        }
        assert_eq!(sent, SLOTS - 1);
        assert!(f.take_fin().is_some(), "the reserve credit carries FIN");
        assert!(f.take_fin().is_none(), "FIN goes once");
        assert!(f.take_data_send().is_none(), "no data after FIN");
    }

    #[test]
    fn a_reader_that_reads_returns_credits_and_the_writer_never_stalls() {
        let mut p = Pair::new();
        let mut total = 0usize;
        // 1000 messages one way; the reader reads everything each round.
        for _ in 0..200 {
            for _ in 0..5 {
                if let Some((slot, imm)) = p.a.take_data_send() {
                    p.wire.push_back((true, Some(slot), 1000, imm));
                    total += 1;
                }
            }
            p.deliver();
            while let Some((_, _, len)) = p.b.next_unread() {
                if p.b.consume(len).is_some() {
                    p.b.reposted();
                }
            }
            if let Some(imm) = p.b.take_credit_update() {
                p.wire.push_back((false, None, 0, imm));
            }
            p.deliver();
        }
        assert_eq!(total, 1000, "the writer was stalled");
        assert!(p.a.credits >= 2 && p.b.credits >= 1);
    }

    #[test]
    fn both_ways_at_once_never_deadlock() {
        let mut p = Pair::new();
        let (mut ab, mut ba) = (0, 0);
        for round in 0..500 {
            if let Some((slot, imm)) = p.a.take_data_send() {
                p.wire.push_back((true, Some(slot), 10, imm));
                ab += 1;
            }
            if let Some((slot, imm)) = p.b.take_data_send() {
                p.wire.push_back((false, Some(slot), 10, imm));
                ba += 1;
            }
            p.deliver();
            // Each reads every other round.
            for f in [&mut p.a, &mut p.b] {
                if round % 2 == 0 {
                    while let Some((_, _, len)) = f.next_unread() {
                        if f.consume(len).is_some() {
                            f.reposted();
                        }
                    }
                }
            }
            for from_a in [true, false] {
                let f = if from_a { &mut p.a } else { &mut p.b };
                if let Some(imm) = f.take_credit_update() {
                    p.wire.push_back((from_a, None, 0, imm));
                }
            }
            p.deliver();
        }
        assert!(ab > 200 && ba > 200, "a->b {ab}, b->a {ba}");
    }

    #[test]
    fn partial_reads_keep_the_slot_until_it_is_all_read() {
        let mut f = Flow::new();
        assert_eq!(f.received(3, 100, Imm(0)), Ok(Arrival::Data));
        assert_eq!(f.readable_bytes(), 100);
        assert_eq!(f.consume(40), None);
        assert_eq!(f.next_unread(), Some((3, 40, 60)));
        assert_eq!(f.consume(60), Some(3));
        assert_eq!(f.readable_bytes(), 0);
    }

    #[test]
    fn fin_is_eof_only_after_the_data_before_it_is_read() {
        let mut f = Flow::new();
        f.received(0, 10, Imm(0)).unwrap();
        assert_eq!(f.received(1, 0, Imm::new(0, true)), Ok(Arrival::Empty));
        assert!(!f.at_eof());
        f.consume(10);
        assert!(f.at_eof());
    }

    #[test]
    fn map_announcements_take_a_credit_and_writes_only_a_slot() {
        let mut f = Flow::new();
        let (_, imm) = f.take_map_send().unwrap();
        assert!(imm.map() && !imm.fin());
        assert_eq!(f.credits, SLOTS - 1);
        let mut g = Flow::new();
        assert_eq!(g.received(0, 32, imm), Ok(Arrival::Map));
        assert_eq!(g.readable_bytes(), 0, "an announcement is not stream data");
        // Writes use send slots only; all of them in flight stop data too.
        let mut writes = 0;
        while f.take_write_slot().is_some() {
            writes += 1;
        }
        assert_eq!(writes, SLOTS - 1);
        assert!(!f.can_send_data());
        assert!(f.take_fin().is_some());
        f.send_done(Some(0));
        assert!(f.take_write_slot().is_none(), "no write after FIN");
    }

    #[test]
    fn a_hostile_peer_is_a_protocol_error() {
        let mut f = Flow::new();
        assert!(f.received(SLOTS, 1, Imm(0)).is_err(), "slot out of range");
        assert!(f.received(0, SLOT_LEN + 1, Imm(0)).is_err(), "too long");
        assert!(
            f.received(0, 0, Imm::new(1, false)).is_err(),
            "credits beyond the receives that exist"
        );
        let mut f = Flow::new();
        f.received(0, 0, Imm::new(0, true)).unwrap();
        assert!(f.received(1, 5, Imm(0)).is_err(), "data after FIN");
    }
}
