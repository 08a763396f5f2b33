//! `freeflow-bench ring`: a request through a shared-memory ring to a router shard and back.

use crate::router::{cpu_time, PrivateRouter};
use crate::stats::median;
use freeflow_proto::attach::{attach, Session, ShimKind};
use freeflow_proto::control::ContainerEntry;
use freeflow_proto::identity::NetnsId;
use freeflow_proto::msg::{op, status, MsgHeader, HEADER_LEN, REPLY};
use freeflow_proto::report::{Progress, RingRep, RingReport};
use hdrhistogram::Histogram;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

pub struct Options {
    pub reps: usize,
    pub rtt_samples: u64,
    pub messages: u64,
    pub app_core: usize,
    pub router_core: usize,
}

const BATCH: usize = 32;
/// Longest a request may wait for its reply.
const TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(opts: &Options, progress: &mut dyn FnMut(&Progress)) -> Result<RingReport, String> {
    let router = PrivateRouter::start("ring", &opts.router_core.to_string())?;
    let netns = NetnsId::current().map_err(|e| e.to_string())?;
    router.set_containers(vec![ContainerEntry {
        name: "bench".into(),
        tenant: "bench".into(),
        ip: Ipv4Addr::new(10, 255, 255, 254),
        netns,
    }])?;
    if !core_affinity::set_for_current(core_affinity::CoreId { id: opts.app_core }) {
        return Err(format!(
            "cannot pin the benchmark to core {}",
            opts.app_core
        ));
    }
    let mut session = attach(router.dir(), ShimKind::Probe, TIMEOUT).map_err(|e| e.to_string())?;
    let slot = session.slot_size();
    let mut out = vec![0u8; slot];
    let mut reps = Vec::new();
    for rep in 0..opts.reps {
        progress(&Progress::RingRepetition {
            rep: rep + 1,
            of: opts.reps,
        });
        let hist = round_trips(&mut session, opts.rtt_samples, &mut out)?;
        let (elapsed, cpu) = one_way(&mut session, &router, opts.messages, &mut out)?;
        reps.push(RingRep {
            rtt_p50_ns: hist.value_at_quantile(0.5),
            rtt_p99_ns: hist.value_at_quantile(0.99),
            rtt_p999_ns: hist.value_at_quantile(0.999),
            msgs_per_sec: opts.messages as f64 / elapsed.as_secs_f64(),
            router_cpu_ns_per_msg: cpu.as_nanos() as f64 / opts.messages as f64,
        });
    }
    Ok(report(opts, slot, reps))
}

/// Round trips: a tenth of `samples` (and a thousand) to warm up, then `samples` timed ones.
fn round_trips(
    session: &mut Session,
    samples: u64,
    out: &mut [u8],
) -> Result<Histogram<u64>, String> {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    for i in 0..samples / 10 + 1000 {
        ping(session, i, out)?;
    }
    for i in 0..samples {
        let start = Instant::now();
        ping(session, i, out)?;
        hist.record(start.elapsed().as_nanos().max(1) as u64)
            .map_err(|e| e.to_string())?;
    }
    Ok(hist)
}

/// One-way throughput: `messages` NOPs published in batches, then a FLUSH that returns the
/// count. Returns the time it took and the router's CPU time meanwhile.
fn one_way(
    session: &mut Session,
    router: &PrivateRouter,
    messages: u64,
    out: &mut [u8],
) -> Result<(Duration, Duration), String> {
    let cpu_before = cpu_time(router.pid())?;
    let start = Instant::now();
    let mut sent = 0u64;
    let nop = MsgHeader {
        opcode: op::NOP,
        ..Default::default()
    };
    while sent < messages {
        let free = session.free_slots().map_err(|e| e.to_string())? as u64;
        let n = free.min(BATCH as u64).min(messages - sent);
        for _ in 0..n {
            if !session.push(nop, &[]).map_err(|e| e.to_string())? {
                return Err("ring reported room and then none".into());
            }
        }
        sent += n;
        session.flush().map_err(|e| e.to_string())?;
        if n == 0 {
            std::hint::spin_loop();
        }
    }
    let flush = MsgHeader {
        opcode: op::FLUSH,
        cookie: 7,
        ..Default::default()
    };
    let reply = session
        .call(flush, &[], out, TIMEOUT)
        .map_err(|e| e.to_string())?;
    let elapsed = start.elapsed();
    let cpu = cpu_time(router.pid())?.saturating_sub(cpu_before);
    let counted = u64::from_le_bytes(out[HEADER_LEN..HEADER_LEN + 8].try_into().expect("8 bytes"));
    if reply.status != status::OK || counted != messages {
        return Err(format!(
            "router counted {counted} of {messages} messages (status {})",
            reply.status
        ));
    }
    Ok((elapsed, cpu))
}

/// The report: medians over the repetitions, then each of them.
fn report(opts: &Options, slot_bytes: usize, reps: Vec<RingRep>) -> RingReport {
    RingReport {
        experiment: "ring".into(),
        app_core: opts.app_core,
        router_core: opts.router_core,
        repetitions: opts.reps,
        rtt_samples_per_rep: opts.rtt_samples,
        messages_per_rep: opts.messages,
        batch: BATCH,
        slot_bytes,
        rtt_p50_ns: median(reps.iter().map(|r| r.rtt_p50_ns as f64)) as u64,
        rtt_p99_ns: median(reps.iter().map(|r| r.rtt_p99_ns as f64)) as u64,
        rtt_p999_ns: median(reps.iter().map(|r| r.rtt_p999_ns as f64)) as u64,
        msgs_per_sec: median(reps.iter().map(|r| r.msgs_per_sec)),
        router_cpu_ns_per_msg: median(reps.iter().map(|r| r.router_cpu_ns_per_msg)),
        reps,
        note: "round trip includes two clock reads (~40 ns); medians over repetitions; router CPU from /proc at 10 ms resolution".into(),
    }
}

fn ping(session: &mut Session, cookie: u64, out: &mut [u8]) -> Result<(), String> {
    let header = MsgHeader {
        opcode: op::PING,
        cookie,
        len: 8,
        ..Default::default()
    };
    let reply = session
        .call(header, &cookie.to_le_bytes(), out, TIMEOUT)
        .map_err(|e| e.to_string())?;
    if reply.opcode != op::PING | REPLY
        || reply.cookie != cookie
        || out[HEADER_LEN..HEADER_LEN + 8] != cookie.to_le_bytes()
    {
        return Err(format!("wrong reply {reply:?}"));
    }
    Ok(())
}
