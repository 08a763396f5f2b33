//! The text each experiment prints without `--json`: a table or a line.

use freeflow_proto::report::{
    ClusterReport, IdleReport, LatencyMs, ProbeReport, RdmaHostsReport, RdmaReport, RingReport,
    TcpPerRequestReport, TcpReport,
};

pub fn ring(r: &RingReport) {
    println!(
        "ring: app on core {}, router shard on core {}, {}-byte slots, batches of {}",
        r.app_core, r.router_core, r.slot_bytes, r.batch
    );
    println!("{:<28}{:>14}", "metric (median of reps)", "value");
    println!("{:<28}{:>11} ns", "round trip p50", r.rtt_p50_ns);
    println!("{:<28}{:>11} ns", "round trip p99", r.rtt_p99_ns);
    println!("{:<28}{:>11} ns", "round trip p99.9", r.rtt_p999_ns);
    println!(
        "{:<28}{:>10.1} M/s",
        "one-way messages",
        r.msgs_per_sec / 1e6
    );
    println!(
        "{:<28}{:>11.1} ns",
        "router CPU per message", r.router_cpu_ns_per_msg
    );
}

pub fn idle(r: &IdleReport) {
    println!(
        "idle: {} attached containers, router used {:.3}% of a core over {:.1} s ({} parks, {} wake-ups)",
        r.attached, r.router_cpu_percent, r.seconds, r.router_parks, r.router_wakeups
    );
}

pub fn rdma(r: &RdmaReport) {
    let m = &r.median;
    println!(
        "rdma: two QPs of one host through the router's software engine; application on core {}, router on core {}; medians of {} repetitions",
        r.app_core, r.router_core, r.repetitions
    );
    println!("{:<34}{:>14}{:>18}", "metric", "value", "router CPU/op");
    println!(
        "{:<34}{:>10.2} M/s{:>15.0} ns",
        "64 B SEND/RECV message rate", m.send_mops, m.router_ns_per_send
    );
    println!(
        "{:<34}{:>10.2} M/s{:>15.0} ns",
        "64 B RDMA WRITE message rate", m.write_mops, m.router_ns_per_write
    );
    println!(
        "{:<34}{:>11.2} us{:>15.0} ns",
        "64 B SEND round trip p50", m.rtt_p50_us, m.router_ns_per_round_trip
    );
    println!(
        "{:<34}{:>11.2} us",
        "64 B SEND round trip p99", m.rtt_p99_us
    );
    println!(
        "{:<34}{:>9.2} GB/s{:>15.0} ns",
        "64 KiB RDMA WRITE bandwidth", m.write_gbytes_per_sec, m.router_ns_per_64k_write
    );
    println!(
        "{:<34}{:>9.2} GB/s",
        "memcpy of 64 KiB, one core", m.memcpy_gbytes_per_sec
    );
    println!(
        "{:<34}{:>11.0} /s{:>15.0} us",
        "rdma_cm connection setup", m.cm_setups_per_sec, m.router_us_per_cm_setup
    );
    println!("RDMA WRITE bandwidth / memcpy: {:.2}", m.write_vs_memcpy);
    println!(
        "rdma_cm connection setup: {} connections one after another, each created, resolved, connected, accepted, disconnected and destroyed",
        r.cm_connections
    );
}

pub fn rdma_hosts(r: &RdmaHostsReport) {
    let m = &r.median;
    println!(
        "rdma --hosts 2: a QP in a container on host 0 to one on host 1, through both routers and the host link; host 0's router and program on core {}, host 1's on core {}; medians of {} repetitions",
        r.router_cores[0], r.router_cores[1], r.repetitions
    );
    println!(
        "{:<34}{:>14}{:>16}{:>16}",
        "metric", "value", "router 0 CPU/op", "router 1 CPU/op"
    );
    let cpu = |f: fn(&freeflow_proto::report::RouterCpuPerOp) -> f64| {
        (f(&m.routers[0]), f(&m.routers[1]))
    };
    let rows = [
        (
            "64 B SEND/RECV message rate",
            m.send_mops,
            "M/s",
            cpu(|c| c.send_ns),
        ),
        (
            "64 B RDMA WRITE message rate",
            m.write_mops,
            "M/s",
            cpu(|c| c.write_ns),
        ),
        (
            "64 B SEND round trip p50",
            m.rtt_p50_us,
            "us",
            cpu(|c| c.round_trip_ns),
        ),
        (
            "64 KiB RDMA WRITE bandwidth",
            m.write_gbytes_per_sec,
            "GB/s",
            cpu(|c| c.write_64k_ns),
        ),
    ];
    for (name, value, unit, (c0, c1)) in rows {
        println!("{name:<34}{value:>9.2} {unit:<4}{c0:>13.0} ns{c1:>13.0} ns");
    }
    let (c0, c1) = cpu(|c| c.cm_setup_us);
    println!(
        "{:<34}{:>9.0} /s  {c0:>13.0} us{c1:>13.0} us",
        "rdma_cm connection setup", m.cm_setups_per_sec
    );
    println!("{:<34}{:>9.2} us", "64 B SEND round trip p99", m.rtt_p99_us);
    println!(
        "{:<34}{:>9.2} us",
        "host link TCP ping-pong p50", m.tcp_rtt_p50_us
    );
    println!(
        "{:<34}{:>9.2} us",
        "host link TCP ping-pong p99", m.tcp_rtt_p99_us
    );
    println!(
        "{:<34}{:>9.2} GB/s",
        "host link one TCP stream", m.tcp_gbytes_per_sec
    );
    let x = &r.ratios;
    println!(
        "round trip p50 / TCP ping-pong p50: {:.2}x (goal <= 1.2); 64 KiB WRITE / TCP stream: {:.2}x (goal >= 0.8); SEND {:.2} M/s (goal >= 1)",
        x.rtt_p50_vs_tcp, x.write_64k_vs_tcp_stream, x.send_mops
    );
}

pub fn probe(r: &ProbeReport) {
    println!(
        "probe: attached as container {} ({}, tenant {}) on shard {}: round trip p50 {} ns, p99 {} ns",
        r.container, r.ip, r.tenant, r.shard, r.rtt_p50_ns, r.rtt_p99_ns
    );
}

pub fn tcp(r: &TcpReport) {
    println!(
        "tcp between two simulated hosts, medians of {} repetitions",
        r.repetitions
    );
    println!(
        "{:<10}{:>12}{:>12}{:>12}{:>13}{:>13}{:>12}{:>12}",
        "path",
        "Gbit/s",
        "rtt p50 us",
        "rtt p99 us",
        "setup p50 us",
        "setup p99 us",
        "connect p50",
        "conns/s"
    );
    for p in &r.paths {
        let m = &p.median;
        println!(
            "{:<10}{:>12.2}{:>12.1}{:>12.1}{:>13.1}{:>13.1}{:>12.1}{:>12.0}",
            p.path.as_str(),
            m.gbit_per_sec,
            m.rtt_p50_us,
            m.rtt_p99_us,
            m.setup_p50_us,
            m.setup_p99_us,
            m.connect_p50_us,
            m.conns_per_sec
        );
    }
    let f = &r.freeflow_vs_host;
    let o = &r.overlay_vs_host;
    println!(
        "freeflow/host: throughput {:.2}x, round trip {:.2}x, setup {:.2}x",
        f.throughput, f.rtt_p50, f.setup_p50
    );
    println!(
        "overlay/host:  throughput {:.2}x, round trip {:.2}x, setup {:.2}x",
        o.throughput, o.rtt_p50, o.setup_p50
    );

    for level in &r.per_request {
        tcp_per_request(level);
    }
}

/// One concurrency of the connection-per-request load.
fn tcp_per_request(r: &TcpPerRequestReport) {
    println!(
        "connection per request, {} concurrent clients, {} s each",
        r.clients, r.seconds
    );
    println!(
        "{:<10}{:>12}{:>14}{:>14}{:>14}{:>14}{:>9}",
        "path", "requests/s", "p50 us", "p99 us", "connect p50", "connect p99", "errors"
    );
    for p in &r.paths {
        let m = &p.median;
        println!(
            "{:<10}{:>12.0}{:>14.1}{:>14.1}{:>14.1}{:>14.1}{:>9}",
            p.path.as_str(),
            m.requests_per_sec,
            m.latency_p50_us,
            m.latency_p99_us,
            m.connect_p50_us,
            m.connect_p99_us,
            m.errors
        );
    }
    for (name, x) in [
        ("freeflow/overlay", &r.freeflow_vs_overlay),
        ("freeflow/host", &r.freeflow_vs_host),
        ("relay/overlay", &r.relay_vs_overlay),
    ] {
        println!(
            "{name:<17} requests/s {:.2}x, p50 {:.2}x, p99 {:.2}x",
            x.requests_per_sec, x.latency_p50, x.latency_p99
        );
    }
}

pub fn cluster(r: &ClusterReport) {
    let lat = |l: &LatencyMs| {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
            l.p50_ms, l.p99_ms, l.max_ms, l.samples
        )
    };
    println!(
        "cluster: {} simulated hosts, {} containers, etcd on tmpfs; routers watched every {} ms",
        r.hosts, r.containers, r.watch_interval_ms
    );
    println!(
        "cold start to every table complete: {:.2} s",
        r.cold_start_s
    );
    let g = &r.registration;
    println!(
        "registration: {} containers, {} at once, {:.1} s: {:.0}/s; one `container add`: {}; every table complete {:.2} s after the last",
        g.containers, g.registrars, g.seconds, g.per_second, lat(&g.latency), g.tables_complete_after_s
    );
    println!(
        "convergence of an add, in every router:    {}",
        lat(&r.convergence_add)
    );
    println!(
        "convergence of a removal, in every router: {}",
        lat(&r.convergence_remove)
    );
    let k = &r.host_kill;
    println!(
        "host {} killed (daemon and router, SIGKILL; {} containers): gone from every router after {:.2} s (lease TTL {:.0} s; goal <= TTL + 3 s)",
        k.host, k.containers_of_host, k.gone_everywhere_s, k.lease_ttl_s
    );
    let e = &r.etcd_restart;
    println!(
        "etcd SIGKILLed, down {:.0} s, restarted from its data: healthy after {:.2} s, a registration after {:.2} s; {} of {} registry entries lost; {} of {} routers equal to the registry",
        e.down_s, e.healthy_after_s, e.registration_after_s, e.lost, e.registry_before, e.routers_equal_to_registry, e.routers
    );
    let i = &r.idle;
    println!(
        "idle, {} hosts over {:.1} s: daemon RSS {} KiB, router RSS {} KiB (means); all routers {:.3}% of a core, all daemons {:.3}%; etcd {:.3}%, {} KiB",
        i.hosts, i.seconds, i.daemon_rss_kib_mean, i.router_rss_kib_mean, i.routers_cpu_percent, i.daemons_cpu_percent, i.etcd_cpu_percent, i.etcd_rss_kib
    );
    if let Some(e) = &r.big_host_error {
        println!("big host: failed: {e}");
    }
    if let Some(b) = &r.big_host {
        println!(
            "big host: {} registered ({:.0}/s; one add {}), {} attached as verbs and {} as socket shims",
            b.registered, b.registration_per_second, lat(&b.registration), b.attached_verbs, b.attached_socket
        );
        println!("  attach: {}", lat(&b.attach));
        println!(
            "  router RSS {} KiB ({} KiB shared memory; {} KiB before the attaches), {:.3}% of a core idle over {:.1} s; daemon {} KiB, {:.3}%",
            b.router_rss_kib, b.router_rss_shmem_kib, b.router_rss_kib_before_attach, b.router_cpu_percent, b.seconds, b.daemon_rss_kib, b.daemon_cpu_percent
        );
    }
}
