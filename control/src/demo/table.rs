//! What the demo prints on stdout: the TCP and RDMA tables and the notes under them.

use std::io::{self, Write};

use freeflow_proto::report::{RdmaHostsReport, RdmaHostsSample, RdmaReport, RdmaSample, TcpReport};

use super::tcp::path_label;

/// The project's RDMA targets (the issue): messages per second per router core, 3x what the
/// original Freeflow reached on real hardware, and the round trip.
const RDMA_TARGET_MOPS: f64 = 4.2;
const ORIGINAL_FREEFLOW_MOPS: f64 = 1.4;
const RDMA_TARGET_RTT_US: f64 = 2.0;

/// `8,123`.
fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The TCP comparison's table and its two-line summary.
pub(super) fn print_tcp_table(report: &TcpReport) {
    let mut out = io::stdout().lock();
    let _ = writeln!(
        out,
        "\nTCP between containers on two simulated hosts (medians of {} repetition{}, {} s \
         streams)",
        report.repetitions,
        if report.repetitions == 1 { "" } else { "s" },
        report.stream_seconds
    );
    let _ = writeln!(
        out,
        "{:<17}{:>14}{:>17}{:>19}{:>15}",
        "path", "throughput", "round trip p50", "connection setup", "connections/s"
    );
    for p in &report.paths {
        let m = &p.median;
        let _ = writeln!(
            out,
            "{:<17}{:>14}{:>17}{:>19}{:>15}",
            path_label(p.path),
            format!("{:.1} Gbit/s", m.gbit_per_sec),
            format!("{:.0} µs", m.rtt_p50_us),
            format!("{:.0} µs", m.setup_p50_us),
            thousands(m.conns_per_sec)
        );
    }
    let o = &report.overlay_vs_host;
    let f = &report.freeflow_vs_host;
    let _ = writeln!(
        out,
        "\nOn the overlay, containers get {:.2}x the host link's throughput and {:.2}x its round \
         trip time.",
        o.throughput, o.rtt_p50
    );
    let _ = writeln!(
        out,
        "With Freeflow, the same containers keep their overlay addresses and get {:.2}x and {:.2}x; \
         opening a connection takes {:.2}x as long as on the host link.",
        f.throughput, f.rtt_p50, f.setup_p50
    );
    let _ = out.flush();
}

/// Width of the notes under a table.
const NOTE_WIDTH: usize = 95;

/// `text` in lines of at most `width` characters, broken between words.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// `1.36x`: a ratio for the comparison column.
fn times(ratio: f64) -> String {
    format!("{ratio:.2}x")
}

/// The RDMA comparison's table, then the notes that say what it compares.
pub(super) fn print_rdma_table(report: &RdmaReport) {
    let mut out = io::stdout().lock();
    let _ = writeln!(
        out,
        "\nRDMA between two QPs on this host, through Freeflow's router: its software verbs \
         engine, no RDMA NIC\n(medians of {} repetition{}; application on core {}, router on \
         core {})",
        report.repetitions,
        if report.repetitions == 1 { "" } else { "s" },
        report.app_core,
        report.router_core
    );
    for line in rdma_rows(&report.median) {
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = writeln!(out);
    for line in wrap(&rdma_notes(), NOTE_WIDTH) {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

/// The RDMA table's heading and six rows: measured, router CPU per operation, compared with.
fn rdma_rows(m: &RdmaSample) -> [String; 7] {
    let row = |what: &str, value: String, cpu: Option<f64>, compared: String| {
        format!(
            "{what:<30}{value:>11}{:>16}   {compared}",
            cpu.map(|ns| format!("{ns:.0} ns")).unwrap_or_default()
        )
    };
    let rate = |what: &str, mops: f64, cpu: f64| {
        let compared = times(mops / RDMA_TARGET_MOPS);
        let target = format!("{compared} the {RDMA_TARGET_MOPS} M/s target");
        row(what, format!("{mops:.2} M/s"), Some(cpu), target)
    };
    let round_trip = |what: &str, us: f64, cpu: Option<f64>| {
        let compared = times(us / RDMA_TARGET_RTT_US);
        let target = format!("{compared} the {RDMA_TARGET_RTT_US} µs target");
        row(what, format!("{us:.2} µs"), cpu, target)
    };
    [
        format!(
            "{:<30}{:>11}{:>16}   {}",
            "", "measured", "router CPU/op", "compared with"
        ),
        rate(
            "64 B SEND/RECV message rate",
            m.send_mops,
            m.router_ns_per_send,
        ),
        rate(
            "64 B RDMA WRITE message rate",
            m.write_mops,
            m.router_ns_per_write,
        ),
        round_trip(
            "64 B SEND round trip p50",
            m.rtt_p50_us,
            Some(m.router_ns_per_round_trip),
        ),
        round_trip("64 B SEND round trip p99", m.rtt_p99_us, None),
        row(
            "64 KiB RDMA WRITE bandwidth",
            format!("{:.1} GB/s", m.write_gbytes_per_sec),
            Some(m.router_ns_per_64k_write),
            format!(
                "{} memcpy on one core ({:.1} GB/s)",
                times(m.write_vs_memcpy),
                m.memcpy_gbytes_per_sec
            ),
        ),
        row(
            "rdma_cm connection setups",
            format!("{:.0} /s", m.cm_setups_per_sec),
            Some(m.router_us_per_cm_setup * 1e3),
            "connect, accept, disconnect, one at a time".into(),
        ),
    ]
}

/// What the RDMA table compares with, and what it measures.
fn rdma_notes() -> String {
    format!(
        "Targets (from the project's issue): {RDMA_TARGET_MOPS} M messages/s per router core, \
         {:.0}x the {ORIGINAL_FREEFLOW_MOPS} M/s the original Freeflow reached on real RDMA \
         hardware; a round trip under {RDMA_TARGET_RTT_US} µs (lower is better). memcpy: one \
         core copying the same 64 KiB buffers in this run, about the most a software copy can \
         move. Router CPU/op: the router's CPU time in a phase divided by its operations (a \
         round trip is two SENDs; the router polls while work is pending, so there it is about \
         the elapsed time). All of this is the router's software engine between two programs \
         on one host: what the router costs, not what an RDMA NIC between two hosts would do.",
        RDMA_TARGET_MOPS / ORIGINAL_FREEFLOW_MOPS
    )
}

/// The cross-host RDMA table (next to the one-host table above it), then what it compares.
pub(super) fn print_rdma_hosts_table(report: &RdmaHostsReport) {
    let mut out = io::stdout().lock();
    let cores = &report.router_cores;
    let _ = writeln!(
        out,
        "\nRDMA between containers on two simulated hosts, through both routers and the host \
         link\n(medians of {} repetition{}; host 0's router and program on core {}, host 1's on \
         core {})",
        report.repetitions,
        if report.repetitions == 1 { "" } else { "s" },
        cores.first().copied().unwrap_or_default(),
        cores.get(1).copied().unwrap_or_default()
    );
    for line in rdma_hosts_rows(&report.median) {
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = writeln!(out);
    let notes = "Goals (from the project's issue), in one run: a round trip at most 1.2x the \
                 host link's own TCP ping-pong, 64 KiB WRITE bandwidth at least 0.8x one TCP \
                 stream on the host link, 1 M SENDs/s with one router core per host. CPU/op: \
                 each router's CPU time in a phase divided by its operations. On a machine with \
                 two cores each host's router shares its core with that host's program.";
    for line in wrap(notes, NOTE_WIDTH) {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

/// The cross-host table's heading and rows: measured, each router's CPU per operation,
/// compared with.
fn rdma_hosts_rows(m: &RdmaHostsSample) -> Vec<String> {
    let cpu = |f: fn(&freeflow_proto::report::RouterCpuPerOp) -> f64| {
        m.routers
            .iter()
            .map(|r| format!("{:.0}", f(r)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let row = |what: &str, value: String, cpu: String, compared: String| {
        format!("{what:<30}{value:>12} {cpu:>18}   {compared}")
    };
    vec![
        row(
            "",
            "measured".into(),
            "CPU/op ns h0/h1".into(),
            "compared with".into(),
        ),
        row(
            "64 B SEND/RECV message rate",
            format!("{:.2} M/s", m.send_mops),
            cpu(|c| c.send_ns),
            format!("{} the 1 M/s goal", times(m.send_mops)),
        ),
        row(
            "64 B RDMA WRITE message rate",
            format!("{:.2} M/s", m.write_mops),
            cpu(|c| c.write_ns),
            String::new(),
        ),
        row(
            "64 B SEND round trip p50",
            format!("{:.1} µs", m.rtt_p50_us),
            cpu(|c| c.round_trip_ns),
            format!(
                "{} TCP ping-pong on the host link ({:.1} µs)",
                times(m.rtt_p50_us / m.tcp_rtt_p50_us),
                m.tcp_rtt_p50_us
            ),
        ),
        row(
            "64 B SEND round trip p99",
            format!("{:.1} µs", m.rtt_p99_us),
            String::new(),
            format!("TCP ping-pong p99 {:.1} µs", m.tcp_rtt_p99_us),
        ),
        row(
            "64 KiB RDMA WRITE bandwidth",
            format!("{:.2} GB/s", m.write_gbytes_per_sec),
            cpu(|c| c.write_64k_ns),
            format!(
                "{} one TCP stream on the host link ({:.2} GB/s)",
                times(m.write_gbytes_per_sec / m.tcp_gbytes_per_sec),
                m.tcp_gbytes_per_sec
            ),
        ),
        row(
            "rdma_cm connection setups",
            format!("{:.0} /s", m.cm_setups_per_sec),
            cpu(|c| c.cm_setup_us * 1e3),
            "connect, accept, disconnect, one at a time".into(),
        ),
    ]
}

/// Says on stdout that the RDMA part did not run, and why.
pub(super) fn print_rdma_skipped(reason: &str) {
    let _ = writeln!(
        io::stdout(),
        "\nRDMA comparison skipped: {reason}; then run `sudo freeflow demo --part rdma`."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(8123.0), "8,123");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn notes_wrap_between_words() {
        assert_eq!(wrap("a bb ccc dd", 6), ["a bb", "ccc dd"]);
        assert_eq!(wrap("abcdefgh ij", 4), ["abcdefgh", "ij"]);
        assert!(wrap("  ", 10).is_empty());
        let text = "word ".repeat(100);
        assert!(wrap(&text, NOTE_WIDTH)
            .iter()
            .all(|l| l.len() <= NOTE_WIDTH));
    }
}
