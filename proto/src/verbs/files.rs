//! The messages that travel with a file (SCM_RIGHTS) on a verbs shim's attach connection: the
//! router's [`QueueFileMsg`] (a queue's region or a channel's pipe) and the shim's
//! [`MemoryFileMsg`] (its memory file).

use crate::codec::{self, expect_magic, wire_enum, DecodeError};

wire_enum! {
    /// What a [`QueueFileMsg`] carries.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum QueueFileKind: u16, from u16 {
        /// A CQ's region: one ring of CQEs (router to shim).
        Cq = 1,
        /// A QP's region: the send ring and the receive ring (shim to router).
        Qp = 2,
        /// A completion channel: the read end of the pipe the router writes notified CQ handles
        /// to, 4 bytes (little-endian) each.
        Channel = 3,
        /// A shared receive queue's region: one ring of receive WQEs (shim to router).
        Srq = 4,
        /// A context's asynchronous events: the read end of the pipe the router writes
        /// [`super::AsyncEventRecord`]s to.
        AsyncEvents = 5,
    }
}

/// The message the router sends on the attach connection, with one fd (SCM_RIGHTS), right
/// before the reply to a request that creates a CQ, QP, SRQ or completion channel (or resizes
/// a CQ). Sent without blocking: a shim that does not read its connection gets a refusal, not
/// a stuck router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFileMsg {
    pub kind: QueueFileKind,
    pub handle: u32,
}

const QUEUE_FILE_MAGIC: [u8; 4] = *b"FFQF";

/// Offsets of a [`QueueFileMsg`] (bytes 6 and 7 are zero).
mod queue_file_field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const KIND: Range<usize> = 4..6;
    pub const HANDLE: Range<usize> = 8..12;
}

impl QueueFileMsg {
    pub const LEN: usize = 12;

    pub fn encode(&self) -> [u8; Self::LEN] {
        use queue_file_field as field;
        let mut b = [0u8; Self::LEN];
        codec::put(&mut b, field::MAGIC, QUEUE_FILE_MAGIC);
        codec::put(&mut b, field::KIND, self.kind as u16);
        codec::put(&mut b, field::HANDLE, self.handle);
        b
    }

    pub fn decode(b: &[u8]) -> Result<QueueFileMsg, DecodeError> {
        use queue_file_field as field;
        codec::exact("QueueFileMsg", b, Self::LEN)?;
        expect_magic("QueueFileMsg", b, field::MAGIC, &QUEUE_FILE_MAGIC)?;
        Ok(QueueFileMsg {
            kind: QueueFileKind::try_from(codec::get::<u16>(b, field::KIND))?,
            handle: codec::get(b, field::HANDLE),
        })
    }
}

/// The message a verbs shim sends on its attach connection, with a memory file attached by
/// SCM_RIGHTS, before the first registration on that attachment that uses the file: its own
/// memory file (number [`super::OWN_MEMORY_FILE`]), or a further one (a memfd the program
/// mapped shared itself, such as a router's mapping of its containers' memory), numbered by
/// the shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFileMsg {
    /// The file's size as the shim saw it; the router checks it against the file.
    pub size: u64,
    /// The number [`super::RegMr::file`] names the file by.
    pub file: u16,
}

const MEMORY_FILE_MAGIC: [u8; 4] = *b"FFMF";
/// Version of [`MemoryFileMsg`].
pub const MEMORY_FILE_VERSION: u16 = 1;

/// Offsets of a [`MemoryFileMsg`].
mod memory_file_field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: Range<usize> = 4..6;
    pub const FILE: Range<usize> = 6..8;
    pub const SIZE: Range<usize> = 8..16;
}

impl MemoryFileMsg {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        use memory_file_field as field;
        let mut b = [0u8; Self::LEN];
        codec::put(&mut b, field::MAGIC, MEMORY_FILE_MAGIC);
        codec::put(&mut b, field::VERSION, MEMORY_FILE_VERSION);
        codec::put(&mut b, field::FILE, self.file);
        codec::put(&mut b, field::SIZE, self.size);
        b
    }

    pub fn decode(b: &[u8]) -> Result<MemoryFileMsg, DecodeError> {
        use memory_file_field as field;
        let invalid = |why| DecodeError::Invalid {
            what: "MemoryFileMsg",
            why,
        };
        codec::exact("MemoryFileMsg", b, Self::LEN)?;
        expect_magic("MemoryFileMsg", b, field::MAGIC, &MEMORY_FILE_MAGIC)?;
        if codec::get::<u16>(b, field::VERSION) != MEMORY_FILE_VERSION {
            return Err(invalid("unknown version"));
        }
        Ok(MemoryFileMsg {
            size: codec::get(b, field::SIZE),
            file: codec::get(b, field::FILE),
        })
    }
}
