use super::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn entry(name: &str, ino: u64, ip: [u8; 4]) -> ContainerEntry {
    ContainerEntry {
        name: name.into(),
        tenant: "blue".into(),
        ip: ip.into(),
        netns: NetnsId { dev: 4, ino },
    }
}

fn overlay(ip: [u8; 4], host: u8) -> OverlayEntry {
    OverlayEntry {
        ip: ip.into(),
        tenant: "blue".into(),
        host_ip: [192, 0, 2, host].into(),
    }
}

fn view(overlay: Vec<OverlayEntry>) -> NetworkView {
    NetworkView {
        host_ip: [192, 0, 2, 1].into(),
        peer_port: 7000,
        hosts: vec![PeerHost {
            host_ip: [192, 0, 2, 2].into(),
            peer_port: 7000,
        }],
        overlay,
    }
}

#[test]
fn a_delta_names_what_was_added_changed_and_removed() {
    let a = entry("a", 1, [10, 32, 0, 2]);
    let b = entry("b", 2, [10, 32, 0, 3]);
    let b2 = entry("b", 2, [10, 32, 0, 9]);
    let c = entry("c", 3, [10, 32, 0, 4]);
    let old_net = view(vec![overlay([10, 32, 0, 2], 1), overlay([10, 32, 0, 5], 2)]);
    let new_net = view(vec![overlay([10, 32, 0, 2], 1), overlay([10, 32, 0, 6], 2)]);
    let d = TableDelta::between(
        (&[a.clone(), b], Some(&old_net)),
        (&[b2.clone(), c.clone()], Some(&new_net)),
        7,
        8,
    );
    assert_eq!((d.base, d.generation), (7, 8));
    assert_eq!(d.upserted, vec![b2, c]);
    assert_eq!(d.removed, vec![a.netns]);
    let net = d.network.expect("the overlay changed");
    assert_eq!(net.overlay_added, vec![overlay([10, 32, 0, 6], 2)]);
    assert_eq!(net.overlay_removed, vec![overlay([10, 32, 0, 5], 2)]);
    // Nothing changed: nothing to send.
    let one = [a];
    let same = TableDelta::between((&one, Some(&old_net)), (&one, Some(&old_net)), 8, 9);
    assert!(same.is_empty());
}

#[test]
fn a_delta_for_another_generation_is_refused_and_changes_nothing() {
    let mut table = ServedTable::default();
    let a = entry("a", 1, [10, 32, 0, 2]);
    table
        .set_full(vec![a.clone()], Some(view(vec![])), Some(5))
        .unwrap();
    let before = table.clone();
    let delta = TableDelta {
        base: 4,
        generation: 6,
        upserted: vec![entry("b", 2, [10, 32, 0, 3])],
        removed: vec![],
        network: None,
    };
    assert_eq!(
        table.apply(delta),
        Err(DeltaError::Base {
            base: 4,
            have: Some(5)
        })
    );
    assert_eq!(table, before);
    // A table pushed without a number takes no delta at all (another pusher, an old daemon).
    table.set_full(vec![a], None, None).unwrap();
    let delta = TableDelta {
        base: 5,
        generation: 6,
        upserted: vec![],
        removed: vec![],
        network: None,
    };
    assert!(matches!(
        table.apply(delta),
        Err(DeltaError::Base { have: None, .. })
    ));
}

#[test]
fn a_delta_removing_what_is_not_there_is_refused_whole() {
    let mut table = ServedTable::default();
    let a = entry("a", 1, [10, 32, 0, 2]);
    table
        .set_full(vec![a.clone()], Some(view(vec![])), Some(1))
        .unwrap();
    let before = table.clone();
    let missing = TableDelta {
        base: 1,
        generation: 2,
        upserted: vec![entry("b", 2, [10, 32, 0, 3])],
        removed: vec![NetnsId { dev: 4, ino: 99 }],
        network: None,
    };
    assert!(matches!(
        table.apply(missing),
        Err(DeltaError::NoSuchContainer(_))
    ));
    let twice = TableDelta {
        base: 1,
        generation: 2,
        upserted: vec![entry("a2", 1, [10, 32, 0, 3])],
        removed: vec![a.netns],
        network: None,
    };
    assert!(matches!(table.apply(twice), Err(DeltaError::Repeated(_))));
    let no_overlay = TableDelta {
        base: 1,
        generation: 2,
        upserted: vec![],
        removed: vec![],
        network: Some(NetworkDelta {
            host_ip: [192, 0, 2, 1].into(),
            peer_port: 7000,
            hosts: vec![],
            overlay_added: vec![],
            overlay_removed: vec![overlay([10, 32, 0, 2], 1)],
        }),
    };
    assert!(matches!(
        table.apply(no_overlay),
        Err(DeltaError::NoSuchOverlay(_))
    ));
    assert_eq!(table, before);
}

#[test]
fn applying_reports_the_containers_that_went_or_changed() {
    let mut table = ServedTable::default();
    let a = entry("a", 1, [10, 32, 0, 2]);
    let b = entry("b", 2, [10, 32, 0, 3]);
    table
        .set_full(vec![a.clone(), b.clone()], None, Some(1))
        .unwrap();
    let b2 = entry("b-new", 2, [10, 32, 0, 3]);
    let d = TableDelta::between((&[a.clone(), b.clone()], None), (&[b2], None), 1, 2);
    let applied = table.apply(d).unwrap();
    let mut gone: Vec<String> = applied.gone.into_iter().map(|c| c.name).collect();
    gone.sort();
    assert_eq!(gone, ["a", "b"]);
    assert!(applied.containers_changed && !applied.network_changed);
    assert_eq!(table.generation, Some(2));
}

/// A table as the daemon builds it: containers with distinct namespaces (a few names, so that
/// changes and moves happen), and maybe a cluster with repeated overlay entries.
fn snapshot() -> impl Strategy<Value = (Vec<ContainerEntry>, Option<NetworkView>)> {
    let container = (0u64..12, 0u8..4, 0u8..3).prop_map(|(ino, ip, name)| ContainerEntry {
        name: format!("c{name}"),
        tenant: ["blue", "red"][ip as usize % 2].into(),
        ip: [10, 32, 0, ip].into(),
        netns: NetnsId { dev: 4, ino },
    });
    let containers = vec(container, 0..8).prop_map(|mut cs| {
        let mut seen = std::collections::HashSet::new();
        cs.retain(|c| seen.insert(c.netns));
        cs
    });
    let entry = (0u8..6, 0u8..2, 1u8..4).prop_map(|(ip, tenant, host)| OverlayEntry {
        ip: [10, 32, 0, ip].into(),
        tenant: ["blue", "red"][tenant as usize].into(),
        host_ip: [192, 0, 2, host].into(),
    });
    let host = (1u8..4, 7000u16..7002).prop_map(|(h, peer_port)| PeerHost {
        host_ip: [192, 0, 2, h].into(),
        peer_port,
    });
    let network =
        (1u8..3, vec(host, 0..3), vec(entry, 0..10)).prop_map(|(h, hosts, overlay)| NetworkView {
            host_ip: [192, 0, 2, h].into(),
            peer_port: 7000,
            hosts,
            overlay,
        });
    (containers, proptest::option::of(network))
}

/// The table a full push of `snapshots` one after another leaves.
fn full_pushes(snapshots: &[(Vec<ContainerEntry>, Option<NetworkView>)]) -> ServedTable {
    let mut table = ServedTable::default();
    for (containers, network) in snapshots {
        table
            .set_full(containers.clone(), network.clone(), None)
            .unwrap();
    }
    table
}

fn sorted(mut view: NetworkView) -> NetworkView {
    view.overlay.sort();
    view
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A full push of the first snapshot and then the deltas between consecutive ones (each
    /// through JSON, as on the socket) leave the table that full pushes of them all leave.
    #[test]
    fn deltas_of_a_sequence_of_snapshots_equal_the_full_table(
        snapshots in vec(snapshot(), 1..8)
    ) {
        let mut table = ServedTable::default();
        let (first, first_net) = &snapshots[0];
        table.set_full(first.clone(), first_net.clone(), Some(0)).unwrap();
        // What the daemon keeps: the last table it pushed (a table without a cluster keeps the
        // one before, as the router does).
        let mut pushed = (first.clone(), first_net.clone());
        for (generation, (containers, network)) in snapshots.iter().enumerate().skip(1) {
            let generation = generation as u64;
            let delta = TableDelta::between(
                (&pushed.0, pushed.1.as_ref()),
                (containers, network.as_ref()),
                generation - 1,
                generation,
            );
            let line = serde_json::to_string(&delta).unwrap();
            let delta: TableDelta = serde_json::from_str(&line).unwrap();
            table.apply(delta).unwrap();
            pushed = (containers.clone(), network.clone().or(pushed.1));
        }
        let full = full_pushes(&snapshots);
        prop_assert_eq!(&table.containers, &full.containers);
        prop_assert_eq!(table.network_view().map(sorted), full.network_view().map(sorted));
        prop_assert_eq!(table.generation, Some(snapshots.len() as u64 - 1));
    }
}
