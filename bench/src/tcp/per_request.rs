//! The connection-per-request load of `freeflow-bench tcp --concurrency N,...`: for each number
//! of concurrent clients, the `tcp-requests` role against each path's server (host link,
//! overlay, Freeflow, and a client without Freeflow through the relay), repetition by
//! repetition, so that the paths share whatever the machine does meanwhile.

use super::{run_limited, Bench, Programs};
use crate::signals::{Interrupts, CHILD_PAUSE};
use crate::stats::median;
use freeflow_os::child::Limits;
use freeflow_proto::report::{
    Progress, TcpPerRequestPath, TcpPerRequestRatios, TcpPerRequestReport, TcpPerRequestSample,
    TcpRequestPath,
};
use std::time::Duration;

/// Where each path's client runs, on host 0, what it connects to, and whether it has the shim.
fn client_of(bench: &Bench, path: TcpRequestPath) -> (String, &'static str, bool) {
    match path {
        TcpRequestPath::Host => (bench.host(0), "192.168.1.2:7001", false),
        TcpRequestPath::Overlay => (bench.container("web"), "10.32.0.4:7002", false),
        TcpRequestPath::Freeflow => (bench.container("web"), "10.32.0.4:7003", true),
        TcpRequestPath::Relay => (bench.container("web"), "10.32.0.4:7003", false),
    }
}

/// Time a client role may take beyond its `seconds`: thread starts, the last requests (each
/// bounded by the role's own timeouts), a connect stuck in SYN retries.
const GRACE: Duration = Duration::from_secs(30);

/// Runs the load at each of `concurrency`, `reps` times, for `seconds` each.
pub(super) fn measure(
    bench: &Bench,
    programs: &Programs,
    concurrency: &[usize],
    reps: usize,
    seconds: f64,
    stop: &Interrupts,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Vec<TcpPerRequestReport>, String> {
    let paths = TcpRequestPath::ALL;
    // samples[level][path][rep]
    let mut samples = vec![vec![Vec::new(); paths.len()]; concurrency.len()];
    let limits = Limits {
        run: Some(Duration::from_secs_f64(seconds) + GRACE),
        pause: CHILD_PAUSE,
        ..Limits::DEFAULT
    };
    for rep in 0..reps {
        for (level, &clients) in concurrency.iter().enumerate() {
            for (i, path) in paths.into_iter().enumerate() {
                progress(&Progress::TcpPerRequest {
                    rep: rep + 1,
                    of: reps,
                    clients,
                    path,
                });
                let (netns, addr, preload) = client_of(bench, path);
                let out = run_limited(
                    programs.role_in(&netns, &bench.work, 0, preload).args([
                        "tcp-requests",
                        addr,
                        &clients.to_string(),
                        &seconds.to_string(),
                    ]),
                    stop,
                    &limits,
                )?;
                let sample: TcpPerRequestSample = serde_json::from_str(out.trim())
                    .map_err(|e| format!("{} requests client said {out:?}: {e}", path.as_str()))?;
                samples[level][i].push(sample);
            }
        }
    }
    Ok(concurrency
        .iter()
        .zip(samples)
        .map(|(&clients, by_path)| report(clients, seconds, by_path))
        .collect())
}

/// One concurrency's report: each path's medians and repetitions, and the ratios.
fn report(
    clients: usize,
    seconds: f64,
    by_path: Vec<Vec<TcpPerRequestSample>>,
) -> TcpPerRequestReport {
    let med = |v: &[TcpPerRequestSample]| TcpPerRequestSample {
        requests_per_sec: median(v.iter().map(|s| s.requests_per_sec)),
        latency_p50_us: median(v.iter().map(|s| s.latency_p50_us)),
        latency_p99_us: median(v.iter().map(|s| s.latency_p99_us)),
        connect_p50_us: median(v.iter().map(|s| s.connect_p50_us)),
        connect_p99_us: median(v.iter().map(|s| s.connect_p99_us)),
        errors: v.iter().map(|s| s.errors).sum(),
    };
    let paths: Vec<TcpPerRequestPath> = TcpRequestPath::ALL
        .into_iter()
        .zip(by_path)
        .map(|(path, reps)| TcpPerRequestPath {
            path,
            median: med(&reps),
            reps,
        })
        .collect();
    let of = |p: TcpRequestPath| {
        &paths[TcpRequestPath::ALL
            .iter()
            .position(|&q| q == p)
            .unwrap_or(0)]
        .median
    };
    TcpPerRequestReport {
        clients,
        seconds,
        freeflow_vs_overlay: ratios(of(TcpRequestPath::Freeflow), of(TcpRequestPath::Overlay)),
        freeflow_vs_host: ratios(of(TcpRequestPath::Freeflow), of(TcpRequestPath::Host)),
        relay_vs_overlay: ratios(of(TcpRequestPath::Relay), of(TcpRequestPath::Overlay)),
        paths,
    }
}

fn ratios(p: &TcpPerRequestSample, base: &TcpPerRequestSample) -> TcpPerRequestRatios {
    TcpPerRequestRatios {
        requests_per_sec: p.requests_per_sec / base.requests_per_sec,
        latency_p50: p.latency_p50_us / base.latency_p50_us,
        latency_p99: p.latency_p99_us / base.latency_p99_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rps: f64, p50: f64, errors: u64) -> TcpPerRequestSample {
        TcpPerRequestSample {
            requests_per_sec: rps,
            latency_p50_us: p50,
            latency_p99_us: 2.0 * p50,
            connect_p50_us: p50 / 2.0,
            connect_p99_us: p50,
            errors,
        }
    }

    #[test]
    fn medians_errors_and_ratios() {
        let by_path = vec![
            vec![
                sample(1000.0, 100.0, 0),
                sample(3000.0, 50.0, 0),
                sample(2000.0, 80.0, 1),
            ],
            vec![sample(1000.0, 200.0, 0)],
            vec![sample(500.0, 400.0, 2)],
            vec![sample(250.0, 800.0, 0)],
        ];
        let r = report(20, 1.0, by_path);
        assert_eq!(r.clients, 20);
        let host = &r.paths[0].median;
        assert_eq!(
            (host.requests_per_sec, host.latency_p50_us, host.errors),
            (2000.0, 80.0, 1)
        );
        assert_eq!(r.paths[3].path, TcpRequestPath::Relay);
        assert_eq!(r.freeflow_vs_overlay.requests_per_sec, 0.5);
        assert_eq!(r.freeflow_vs_host.requests_per_sec, 0.25);
        assert_eq!(r.freeflow_vs_host.latency_p50, 5.0);
        assert_eq!(r.relay_vs_overlay.latency_p99, 4.0);
    }
}
