//! What is mapped where in this process, from `/proc/self/maps`: memory registration needs to
//! know, for each page of a buffer, whether it is mapped and readable, whether it is private
//! (the library may move it onto its memory file) or shared with something else (it may not),
//! and whether it already is on the library's memory file.

use std::io;

/// One line of `/proc/self/maps`: a mapping of `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `MAP_SHARED` (`s` in the permissions), else private (`p`).
    pub shared: bool,
    /// Offset in the mapped file of `start`.
    pub offset: u64,
    /// Device (major, minor) and inode of the mapped file; (0, 0) and 0 for anonymous memory.
    pub dev: (u32, u32),
    pub inode: u64,
}

impl Vma {
    /// `PROT_*` bits of the mapping.
    pub fn prot(&self) -> i32 {
        let mut prot = libc::PROT_NONE;
        if self.read {
            prot |= libc::PROT_READ;
        }
        if self.write {
            prot |= libc::PROT_WRITE;
        }
        if self.exec {
            prot |= libc::PROT_EXEC;
        }
        prot
    }

    /// True if this maps the file `(dev, inode)` at offsets equal to addresses (the library's
    /// memory file, as registration maps it).
    pub fn is_identity_mapping_of(&self, dev: (u32, u32), inode: u64) -> bool {
        self.shared && self.dev == dev && self.inode == inode && self.offset == self.start
    }
}

/// A line that does not parse (the kernel's format never produces one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected line in /proc/self/maps: {0:?}")]
pub struct ParseError(pub String);

/// A field of a line, as text (the five fields parsed are ASCII in the kernel's format).
fn field<'a>(fields: &mut impl Iterator<Item = &'a [u8]>) -> Option<&'a str> {
    std::str::from_utf8(fields.next()?).ok()
}

/// Parses the first five fields of a line; the sixth, the path, is not read (it may be any
/// bytes, not UTF-8, and even hold spaces or look like more fields).
fn parse_line(line: &[u8]) -> Option<Vma> {
    let mut fields = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let (start, end) = field(&mut fields)?.split_once('-')?;
    let perms = field(&mut fields)?.as_bytes();
    let offset = field(&mut fields)?;
    let (major, minor) = field(&mut fields)?.split_once(':')?;
    let inode = field(&mut fields)?;
    if perms.len() != 4 {
        return None;
    }
    Some(Vma {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode: inode.parse().ok()?,
    })
}

/// Parses the bytes of a maps file.
pub fn parse(text: &[u8]) -> Result<Vec<Vma>, ParseError> {
    text.split(|&b| b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty())
        .map(|l| parse_line(l).ok_or_else(|| ParseError(String::from_utf8_lossy(l).into_owned())))
        .collect()
}

/// This process's mappings, in address order.
pub fn read_self() -> io::Result<Vec<Vma>> {
    use std::io::Read;
    // The file reports size 0, so a plain read_to_end starts with a tiny buffer and needs a
    // dozen reads; the kernel fills as much as it is offered.
    let mut text = Vec::with_capacity(64 * 1024);
    std::fs::File::open("/proc/self/maps")?.read_to_end(&mut text)?;
    parse(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// This process's mappings, read for a registration of `[start, end)`: the kernel writes the
/// maps file a buffer at a time, and another thread's mmap or munmap between two reads can
/// show a gap in a range that was mapped all along; so a read that finds a gap in the range
/// is done once more, and the second read is what counts.
pub fn read_self_for(start: u64, end: u64) -> io::Result<Vec<Vma>> {
    let vmas = read_self()?;
    if pieces(&vmas, start, end).is_ok() {
        return Ok(vmas);
    }
    read_self()
}

/// The parts of `[start, end)` and the mapping each lies in, in order, or the first address of
/// the range that nothing maps.
pub fn pieces(vmas: &[Vma], start: u64, end: u64) -> Result<Vec<(u64, u64, &Vma)>, u64> {
    let mut out = Vec::new();
    let mut at = start;
    for vma in vmas {
        if at >= end {
            break;
        }
        if vma.end <= at {
            continue;
        }
        if vma.start > at {
            return Err(at);
        }
        let piece_end = vma.end.min(end);
        out.push((at, piece_end, vma));
        at = piece_end;
    }
    if at < end {
        return Err(at);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55f3f7f00000-55f3f7fb9000 rw-p 00000000 00:00 0                          [heap]
55f3f7fb9000-55f3f7fba000 rw-s 55f3f7fb9000 00:01 411                    /memfd:freeflow-mr (deleted)
55f3f7fba000-55f3f7fdb000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000021000 r--p 00001000 08:01 1234567                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000021000-7f0000022000 ---p 00000000 00:00 0
7f0000022000-7f0000023000 rw-s 00000000 00:05 99                         /dev/shm/x
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn parses_the_kernels_format() {
        let vmas = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(vmas.len(), 7);
        let memfd = &vmas[1];
        assert_eq!(
            (memfd.start, memfd.end, memfd.shared, memfd.dev, memfd.inode),
            (0x55f3f7fb9000, 0x55f3f7fba000, true, (0, 1), 411)
        );
        assert!(memfd.is_identity_mapping_of((0, 1), 411));
        assert!(!memfd.is_identity_mapping_of((0, 1), 412));
        assert!(!vmas[5].is_identity_mapping_of((0, 5), 99)); // offset 0 at another address
        assert_eq!(vmas[3].prot(), libc::PROT_READ);
        assert_eq!(vmas[3].offset, 0x1000);
        assert_eq!(vmas[3].dev, (8, 1));
        assert_eq!(vmas[4].prot(), libc::PROT_NONE);
        assert_eq!(vmas[0].prot(), libc::PROT_READ | libc::PROT_WRITE);
        assert!(parse(b"nonsense\n").is_err());
        assert!(parse(b"1000-2000 rw-p 0 00:00\n").is_err());
        // A path that is not UTF-8, or that looks like more fields, is not read.
        let odd =
            parse(b"1000-2000 rw-s 00003000 00:01 77 /tmp/\xff\xfe 5000-6000 r--p\n").unwrap();
        assert_eq!(
            (odd[0].start, odd[0].end, odd[0].offset, odd[0].inode),
            (0x1000, 0x2000, 0x3000, 77)
        );
    }

    #[test]
    fn pieces_split_a_range_by_mapping_and_find_gaps() {
        let vmas = parse(SAMPLE.as_bytes()).unwrap();
        let p = pieces(&vmas, 0x55f3f7fb8000, 0x55f3f7fbb000).unwrap();
        let bounds: Vec<(u64, u64)> = p.iter().map(|(a, b, _)| (*a, *b)).collect();
        assert_eq!(
            bounds,
            [
                (0x55f3f7fb8000, 0x55f3f7fb9000),
                (0x55f3f7fb9000, 0x55f3f7fba000),
                (0x55f3f7fba000, 0x55f3f7fbb000)
            ]
        );
        assert_eq!(pieces(&vmas, 0x1000, 0x2000), Err(0x1000));
        assert_eq!(
            pieces(&vmas, 0x55f3f7fda000, 0x55f3f7fdc000).map(|p| p.len()),
            Err(0x55f3f7fdb000)
        );
        assert_eq!(
            pieces(&vmas, 0x7ffc00000000, 0x7ffc00001000).unwrap().len(),
            1
        );
    }

    #[test]
    fn reads_this_process() {
        let vmas = read_self().unwrap();
        let here = &vmas as *const _ as u64; // on the stack
        assert!(vmas
            .iter()
            .any(|v| v.start <= here && here < v.end && v.read && v.write));
        assert!(vmas.windows(2).all(|w| w[0].end <= w[1].start));
    }
}
