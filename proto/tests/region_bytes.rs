//! Golden bytes of the shared region's 256-byte header, as the router writes it and the shim
//! reads it: the code that lays it out may change shape, the bytes in the memfd may not.

use freeflow_proto::region::{SharedRegion, HEADER_SIZE};
use freeflow_proto::ring::RingGeometry;
use std::io::Read;
use std::os::fd::AsFd;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Three rings of different shapes, so that every ring entry's three fields differ.
fn rings() -> [RingGeometry; 3] {
    [
        RingGeometry {
            slot_size: 64,
            slot_count: 4,
        },
        RingGeometry {
            slot_size: 192,
            slot_count: 16,
        },
        RingGeometry {
            slot_size: 4096,
            slot_count: 2,
        },
    ]
}

/// The header as it always was: magic, version 1, 3 rings, the region's size (0x4000), then at
/// 32 one entry of 16 bytes per ring (offset, slot size, slot count; each ring
/// after a 384-byte control block, 128-byte aligned), zeros to 256
/// (`_` separates fields).
const GOLDEN: &str = concat!(
    "46465245474e0001",                   // magic "FFREGN\0\x01"
    "01000000",                           // version
    "03000000",                           // ring count
    "0040000000000000",                   // region size
    "0000000000000000",                   // router cores: none announced
    "0001000000000000_40000000_04000000", // ring 0: at 256, 64 B x 4
    "8003000000000000_c0000000_10000000", // ring 1: at 896, 192 B x 16
    "0011000000000000_00100000_02000000", // ring 2: at 4352, 4 KiB x 2
);

#[test]
fn the_region_header_has_the_bytes_it_always_had() {
    let (region, fd) = SharedRegion::create("golden", &rings()).unwrap();
    let mut header = vec![0u8; HEADER_SIZE];
    std::fs::File::from(fd.try_clone().unwrap())
        .read_exact(&mut header)
        .unwrap();
    let golden = format!("{:0<512}", GOLDEN.replace('_', ""));
    assert_eq!(hex(&header), golden);
    assert_eq!(region.ring_count(), 3);
    // And the shim reads it back.
    let attached = SharedRegion::attach(fd.as_fd()).unwrap();
    assert_eq!(attached.ring_count(), 3);
    assert_eq!(attached.byte_len(), region.byte_len());
}
