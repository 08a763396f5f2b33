//! RDMA mode, perftest: Debian's unmodified `ib_write_lat`, `ib_send_bw` (and `ib_send_lat`,
//! `ib_write_bw`, `ib_read_lat`) between two registered containers of one simulated host,
//! through Freeflow's `libibverbs.so.1` and the router's software engine, exchanging their QP
//! information over TCP (perftest's default, not rdma_cm).
//!
//! perftest links rdma-core's `librdmacm.so.1` (immediate binding: it needs the kernel-structure
//! converters `ibv_copy_*_from_kern`) and the hardware providers `libmlx5.so.1` and
//! `libefa.so.1`, which `freeflow up` replaces in DIR/verbs by stand-ins that claim no device.
//! The tools must exit 0 and print their result table; the numbers are reported, not judged
//! (no timing thresholds).
//!
//! Needs root, a built workspace (`cargo build --workspace`) and perftest (scripts/test.sh
//! installs it). The Site scaffolding is in common/mod.rs.

mod common;

use common::{describe, Site, SiteSpec, SERVER_AND_CLIENT};
use std::path::Path;

impl Site {
    /// One host with Freeflow up; containers server and client (tenant blue) registered.
    fn new(prefix: &str) -> Site {
        common::require_built(&["libfreeflow_providers.so"]);
        Site::create_verbs(SiteSpec {
            prefix,
            work_prefix: "ff-verbs-perftest",
            hosts: 1,
            containers: SERVER_AND_CLIENT,
            registered: &[("server", "blue"), ("client", "blue")],
            verbs_timeout: 60,
            ..SiteSpec::default()
        })
    }
}

/// Which table a tool prints.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `#bytes #iterations t_min t_max t_typical t_avg ...` in microseconds.
    Latency,
    /// `#bytes #iterations BW_peak BW_average MsgRate` in MB/s and Mpps.
    Bandwidth,
}

/// The numbers of a result table's data row.
#[derive(Debug)]
struct Row {
    bytes: u64,
    iterations: u64,
    /// Latency: (t_typical, t_avg) in us; bandwidth: (BW average in MB/s, MsgRate in Mpps).
    values: (f64, f64),
}

/// Finds the result table in `text` (the line after the `#bytes` header) and parses it.
fn parse_table(text: &str, kind: Kind) -> Option<Row> {
    let mut lines = text.lines();
    let header = lines.find(|l| l.trim_start().starts_with("#bytes"))?;
    let expected = match kind {
        Kind::Latency => ["t_typical[usec]", "t_avg[usec]"],
        Kind::Bandwidth => ["BW average[MB/sec]", "MsgRate[Mpps]"],
    };
    if !expected.iter().all(|c| header.contains(c)) {
        return None;
    }
    let row = lines.find(|l| !l.trim().is_empty())?;
    let fields: Vec<&str> = row.split_whitespace().collect();
    let (a, b) = match kind {
        Kind::Latency => (4, 5),
        Kind::Bandwidth => (3, 4),
    };
    let number = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some(Row {
        bytes: fields.first()?.parse().ok()?,
        iterations: fields.get(1)?.parse().ok()?,
        values: (number(a)?, number(b)?),
    })
}

/// Runs perftest's `tool ARGS` as server in `server` and as client (naming the server's overlay
/// address) in `client`, checks that both exit 0 and that the client prints its result table
/// for `size`-byte messages, and returns the client's row.
fn perftest(site: &Site, tool: &str, kind: Kind, port: u16, size: u64, iters: u64) -> Row {
    let port_arg = port.to_string();
    let size_arg = size.to_string();
    let iters_arg = iters.to_string();
    let args = [
        "-d", "ffv0", "-p", &port_arg, "-s", &size_arg, "-n", &iters_arg,
    ];
    let (server, client) = site.verbs_server_and_client(Path::new(tool), port, &args);
    for (who, out) in [("server", &server), ("client", &client)] {
        assert!(
            out.status.success(),
            "{tool} {who}: {}\n--- router log\n{}",
            describe(out),
            site.router_log()
        );
    }
    let text = String::from_utf8_lossy(&client.stdout);
    let row = parse_table(&text, kind)
        .unwrap_or_else(|| panic!("{tool}: no result table\n{}", describe(&client)));
    eprintln!(
        "{tool} client:\n    {}",
        text.trim_end().replace('\n', "\n    ")
    );
    assert_eq!(
        (row.bytes, row.iterations),
        (size, iters),
        "{tool}: {row:?}"
    );
    let (a, b) = row.values;
    assert!(
        a.is_finite() && a > 0.0 && b.is_finite() && b > 0.0,
        "{tool}: {row:?}"
    );
    row
}

#[test]
fn unmodified_ib_write_lat_and_ib_send_bw_run_between_two_containers() {
    let site = Site::new("vpf");
    for standin in ["libmlx5.so.1", "libefa.so.1"] {
        assert!(
            site.dirs[0].join("verbs").join(standin).is_file(),
            "freeflow up did not install the provider stand-in {standin}"
        );
    }
    let lat = perftest(&site, "ib_write_lat", Kind::Latency, 18601, 64, 1000);
    let bw = perftest(&site, "ib_send_bw", Kind::Bandwidth, 18602, 65536, 1000);
    eprintln!(
        "ib_write_lat 64 B: t_typical {} us, t_avg {} us; ib_send_bw 64 KiB: {} MB/s, {} Mpps",
        lat.values.0, lat.values.1, bw.values.0, bw.values.1
    );
}

#[test]
fn unmodified_ib_send_lat_ib_write_bw_and_ib_read_lat_run_between_two_containers() {
    let site = Site::new("vpg");
    perftest(&site, "ib_send_lat", Kind::Latency, 18611, 64, 1000);
    perftest(&site, "ib_write_bw", Kind::Bandwidth, 18612, 65536, 1000);
    perftest(&site, "ib_read_lat", Kind::Latency, 18613, 64, 1000);
}

#[test]
fn result_tables_parse() {
    let lat = " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] \n 64      1000          1.50           20.09        1.70              1.93             0.71            5.20                    20.09  \n";
    let row = parse_table(lat, Kind::Latency).unwrap();
    assert_eq!(
        (row.bytes, row.iterations, row.values),
        (64, 1000, (1.70, 1.93))
    );
    let bw = " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n 65536      1000             2917.48            2911.66\t\t   0.046587\n";
    let row = parse_table(bw, Kind::Bandwidth).unwrap();
    assert_eq!((row.bytes, row.values), (65536, (2911.66, 0.046587)));
    assert!(parse_table(lat, Kind::Bandwidth).is_none());
}
