//! `freeflow-bench probe DIR`: attach as the container this process runs in and time round
//! trips through its router, as a shim would see them (no pinning: it runs where the app runs).

use freeflow_proto::attach::{attach, ShimKind};
use freeflow_proto::msg::{op, MsgHeader, HEADER_LEN};
use freeflow_proto::report::ProbeReport;
use hdrhistogram::Histogram;
use std::path::Path;
use std::time::{Duration, Instant};

pub fn run(dir: &Path, samples: u64) -> Result<ProbeReport, String> {
    let mut session =
        attach(dir, ShimKind::Probe, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; session.slot_size()];
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    for i in 0..samples + samples / 10 {
        let start = Instant::now();
        let h = MsgHeader {
            opcode: op::PING,
            cookie: i,
            len: 8,
            ..Default::default()
        };
        let reply = session
            .call(h, &i.to_le_bytes(), &mut out, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        if reply.cookie != i || out[HEADER_LEN..HEADER_LEN + 8] != i.to_le_bytes() {
            return Err(format!("wrong reply {reply:?}"));
        }
        if i >= samples / 10 {
            hist.record(start.elapsed().as_nanos().max(1) as u64)
                .map_err(|e| e.to_string())?;
        }
    }
    let info = session.info().clone();
    Ok(ProbeReport {
        experiment: "probe".into(),
        container: info.container,
        tenant: info.tenant,
        ip: info.ip.to_string(),
        shard: info.shard,
        samples,
        rtt_p50_ns: hist.value_at_quantile(0.5),
        rtt_p99_ns: hist.value_at_quantile(0.99),
    })
}
