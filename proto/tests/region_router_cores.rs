//! The router's cores in the region header: announced once by the router, written into every
//! region it creates from then on at bytes 24..32 (a word that was reserved and zero), read back
//! by the shim. A test file of its own: the announcement is process-wide, and the golden-bytes
//! test expects a process that announced nothing.

use freeflow_proto::region::{announce_router_cores, cores_mask, SharedRegion, HEADER_SIZE};
use freeflow_proto::ring::RingGeometry;
use std::io::Read;
use std::os::fd::AsFd;

const GEOMETRY: RingGeometry = RingGeometry {
    slot_size: 64,
    slot_count: 4,
};

#[test]
fn a_region_carries_the_cores_announced_before_it_was_created() {
    let (before, before_fd) = SharedRegion::create("cores-before", &[GEOMETRY]).unwrap();
    assert_eq!(before.router_cores(), 0);
    announce_router_cores(&[0, 3, 70]);
    let (region, fd) = SharedRegion::create("cores", &[GEOMETRY]).unwrap();
    let mut header = vec![0u8; HEADER_SIZE];
    std::fs::File::from(fd.try_clone().unwrap())
        .read_exact(&mut header)
        .unwrap();
    // Cores 0 and 3; core 70 cannot be named in 64 bits and is left out.
    assert_eq!(header[24..32], 0b1001u64.to_le_bytes());
    assert_eq!(region.router_cores(), 0b1001);
    assert_eq!(
        SharedRegion::attach(fd.as_fd()).unwrap().router_cores(),
        0b1001
    );
    // A region created before the announcement keeps its zero: no cores published.
    assert_eq!(
        SharedRegion::attach(before_fd.as_fd())
            .unwrap()
            .router_cores(),
        0
    );
}

#[test]
fn the_mask_names_each_core_below_64() {
    assert_eq!(cores_mask(&[]), 0);
    assert_eq!(cores_mask(&[1]), 2);
    assert_eq!(cores_mask(&[63, 64]), 1 << 63);
}
