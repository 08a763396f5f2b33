//! Measures registrations into an etcd registry with every container on its host's lease
//! against the same without a lease (etcd issue 15993: on 3.4, puts slow down when many keys
//! share one lease). Usage: `etcd_lease_puts HOST:PORT CONTAINERS`; prints the mean time per
//! registration for each block of 250.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Instant;

use freeflow_control::registry::{self, ContainerRecord, HostRecord};

fn main() {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().expect("HOST:PORT");
    let containers: usize = args.next().expect("CONTAINERS").parse().expect("a number");
    let run = std::process::id();
    for (label, with_host) in [("one lease", true), ("no lease", false)] {
        let url = format!("etcd://{endpoint}/measure-{run}-{}", u8::from(with_host));
        let reg = registry::open(&url).unwrap();
        let host_ip = Ipv4Addr::new(192, 168, 1, 1);
        if with_host {
            reg.update(&mut |s| {
                s.upsert_host(HostRecord {
                    host_ip,
                    peer_port: 7000,
                    vnet_prefix: "10.32.0.0/12".parse().unwrap(),
                    dir: PathBuf::from("/freeflow"),
                });
                Ok(())
            })
            .unwrap();
            reg.hold_host(&reg.load().unwrap().hosts[0]).unwrap();
        }
        let mut block = Instant::now();
        let mut line = format!("{label:>9}: ms per registration per 250:");
        for i in 0..containers {
            let rec = ContainerRecord {
                name: format!("c{i}"),
                tenant: "t".into(),
                ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 32, 0, 1)) + i as u32),
                netns: PathBuf::from(format!("/run/netns/c{i}")),
                host_ip,
            };
            reg.update(&mut |s| s.add_container(rec.clone())).unwrap();
            if (i + 1) % 250 == 0 {
                line += &format!(" {:.1}", block.elapsed().as_secs_f64() * 1000.0 / 250.0);
                block = Instant::now();
            }
        }
        let s = reg.load().unwrap();
        assert_eq!(s.containers.len(), containers);
        println!("{line}");
    }
}
