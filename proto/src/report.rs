//! What `freeflow-bench` tells the programs that run it (`freeflow demo`): the JSON report each
//! experiment prints on stdout with `--json`, and the progress events it writes to stderr with
//! `--progress-json`, one JSON object per line.
//!
//! Both sides use these types, so a field renamed here is renamed for both. The reports' field
//! names are also read by people and scripts: keep them as they are.

use serde::{Deserialize, Serialize};
use std::fmt;

// ---------------------------------------------------------------- progress

/// One step of an experiment. `freeflow-bench --progress-json` writes each as one line of JSON
/// on stderr ([`Progress::to_line`]); without the flag it writes the [`fmt::Display`] text, for a
/// person, after `[freeflow-bench] `.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "progress", rename_all = "snake_case")]
pub enum Progress {
    /// `ring`: repetition `rep` of `of` starts.
    RingRepetition { rep: usize, of: usize },
    /// `idle`: the holders of `containers` namespaces are being attached.
    IdleAttaching { containers: usize },
    /// `idle`: the router's CPU time is measured for `seconds`.
    IdleMeasuring { seconds: u64 },
    /// `tcp`: the two simulated hosts, their routers and servers are being built.
    TcpBuilding,
    /// `tcp`: repetition `rep` of `of` measures `path`.
    TcpRepetition {
        rep: usize,
        of: usize,
        path: TcpPath,
    },
    /// `tcp`: repetition `rep` of `of` of the connection-per-request load with `clients`
    /// concurrent clients on `path`.
    TcpPerRequest {
        rep: usize,
        of: usize,
        clients: usize,
        path: TcpRequestPath,
    },
    /// `tcp`: everything the experiment made is being removed.
    TcpRemoving,
    /// `rdma`: a private router starts on `router_core`, the measuring program is built.
    RdmaStarting { router_core: usize },
    /// `rdma`: repetition `rep` of `of` starts.
    RdmaRepetition { rep: usize, of: usize },
    /// `rdma`: the router stops and the namespace is removed.
    RdmaStopping,
    /// `rdma --hosts 2`: two simulated hosts are built, host h's router on `router_cores[h]`.
    RdmaHostsBuilding { router_cores: Vec<usize> },
    /// `rdma --hosts 2`: repetition `rep` of `of` starts (RDMA phases, then the host link's TCP).
    RdmaHostsRepetition { rep: usize, of: usize },
    /// `rdma --hosts 2`: everything the experiment made is being removed.
    RdmaHostsRemoving,
    /// `cluster`: a step starts (what it does, in words).
    Cluster { step: String },
}

impl Progress {
    /// The event as one line of JSON (no newline).
    pub fn to_line(&self) -> String {
        // A derived Serialize of plain fields into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The event on `line`, or `None` if the line is not one (an error message, a child's
    /// output).
    pub fn from_line(line: &str) -> Option<Progress> {
        serde_json::from_str(line.trim()).ok()
    }
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Progress::RingRepetition { rep, of } => write!(f, "ring: repetition {rep}/{of}"),
            Progress::IdleAttaching { containers } => {
                write!(f, "idle: attaching {containers} containers")
            }
            Progress::IdleMeasuring { seconds } => {
                write!(f, "idle: measuring router CPU for {seconds} s")
            }
            Progress::TcpBuilding => f.write_str("tcp: building two simulated hosts"),
            Progress::TcpRepetition { rep, of, path } => {
                write!(f, "tcp: repetition {rep}/{of}: {}", path.as_str())
            }
            Progress::TcpPerRequest {
                rep,
                of,
                clients,
                path,
            } => write!(
                f,
                "tcp: repetition {rep}/{of}: connection per request, {clients} clients: {}",
                path.as_str()
            ),
            Progress::TcpRemoving => f.write_str("tcp: removing the two simulated hosts"),
            Progress::RdmaStarting { router_core } => write!(
                f,
                "rdma: starting a private router on core {router_core} and building the \
                 measuring program"
            ),
            Progress::RdmaRepetition { rep, of } => write!(f, "rdma: repetition {rep} of {of}"),
            Progress::RdmaStopping => {
                f.write_str("rdma: stopping the router and removing its namespace")
            }
            Progress::RdmaHostsBuilding { router_cores } => write!(
                f,
                "rdma --hosts 2: building two simulated hosts, routers on cores {router_cores:?}, \
                 and the measuring program"
            ),
            Progress::RdmaHostsRepetition { rep, of } => {
                write!(f, "rdma --hosts 2: repetition {rep} of {of}")
            }
            Progress::RdmaHostsRemoving => {
                f.write_str("rdma --hosts 2: removing the two simulated hosts")
            }
            Progress::Cluster { step } => write!(f, "cluster: {step}"),
        }
    }
}

// ---------------------------------------------------------------- cluster

/// A distribution of durations, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyMs {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// `freeflow-bench cluster`: registering the containers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterRegistration {
    pub containers: usize,
    /// `freeflow container add` commands running at once.
    pub registrars: usize,
    pub seconds: f64,
    pub per_second: f64,
    /// One `freeflow container add` (process start to exit, including its wait for the local
    /// daemon's pickup).
    pub latency: LatencyMs,
    /// From the last registration's end until every router held every container.
    pub tables_complete_after_s: f64,
}

/// `freeflow-bench cluster`: a host's daemon and router killed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterHostKill {
    pub host: usize,
    pub containers_of_host: usize,
    pub lease_ttl_s: f64,
    /// From the SIGKILLs until no other router knew the host or any of its containers.
    pub gone_everywhere_s: f64,
}

/// `freeflow-bench cluster`: etcd killed (SIGKILL) and started again from its data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterEtcdRestart {
    pub down_s: f64,
    /// From the start of the new etcd until it answered its health check.
    pub healthy_after_s: f64,
    /// From the start of the new etcd until a new registration succeeded.
    pub registration_after_s: f64,
    pub registry_before: usize,
    /// Registry entries of before that are missing after.
    pub lost: usize,
    /// Routers whose table (overlay addresses and peer hosts) after the restart equals the
    /// registry's (the new container included).
    pub routers_equal_to_registry: usize,
    pub routers: usize,
}

/// `freeflow-bench cluster`: what an idle host costs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterIdle {
    pub seconds: f64,
    pub hosts: usize,
    pub daemon_rss_kib_mean: u64,
    pub router_rss_kib_mean: u64,
    /// All routers together, in % of one core.
    pub routers_cpu_percent: f64,
    /// All daemons together, in % of one core.
    pub daemons_cpu_percent: f64,
    pub etcd_cpu_percent: f64,
    pub etcd_rss_kib: u64,
}

/// `freeflow-bench cluster`: one host with many containers, some attached.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterBigHost {
    pub registered: usize,
    pub registration: LatencyMs,
    pub registration_per_second: f64,
    pub attached_verbs: usize,
    pub attached_socket: usize,
    /// One attach (connect to welcome, rings mapped), timed by the attaching process.
    pub attach: LatencyMs,
    pub router_rss_kib: u64,
    /// Of which shared memory (the rings' pages the router touched).
    pub router_rss_shmem_kib: u64,
    pub router_rss_kib_before_attach: u64,
    pub router_cpu_percent: f64,
    pub daemon_cpu_percent: f64,
    pub daemon_rss_kib: u64,
    pub seconds: f64,
}

/// `freeflow-bench cluster --json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterReport {
    pub experiment: String,
    pub hosts: usize,
    pub containers: usize,
    /// How often the watchers ask each router for its table (the resolution of every time
    /// below that ends when routers have seen something).
    pub watch_interval_ms: u64,
    /// From the first `freeflow up` until every router knew every other host.
    pub cold_start_s: f64,
    pub registration: ClusterRegistration,
    /// From the start of one `freeflow container add` until the address was in every router.
    pub convergence_add: LatencyMs,
    /// From the start of one `freeflow container rm` until the address was gone from every
    /// router.
    pub convergence_remove: LatencyMs,
    pub host_kill: ClusterHostKill,
    pub etcd_restart: ClusterEtcdRestart,
    pub idle: ClusterIdle,
    pub big_host: Option<ClusterBigHost>,
    /// Why the big host's phase failed (the other phases' figures stand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub big_host_error: Option<String>,
    pub note: String,
}

// ---------------------------------------------------------------- ring, idle, probe

/// One repetition of `freeflow-bench ring`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RingRep {
    pub rtt_p50_ns: u64,
    pub rtt_p99_ns: u64,
    pub rtt_p999_ns: u64,
    pub msgs_per_sec: f64,
    pub router_cpu_ns_per_msg: f64,
}

/// `freeflow-bench ring --json`: medians over the repetitions, then each repetition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RingReport {
    pub experiment: String,
    pub app_core: usize,
    pub router_core: usize,
    pub repetitions: usize,
    pub rtt_samples_per_rep: u64,
    pub messages_per_rep: u64,
    pub batch: usize,
    pub slot_bytes: usize,
    pub rtt_p50_ns: u64,
    pub rtt_p99_ns: u64,
    pub rtt_p999_ns: u64,
    pub msgs_per_sec: f64,
    pub router_cpu_ns_per_msg: f64,
    pub reps: Vec<RingRep>,
    pub note: String,
}

/// `freeflow-bench idle --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleReport {
    pub experiment: String,
    pub containers: usize,
    pub attached: usize,
    pub seconds: f64,
    pub router_cpu_percent: f64,
    pub router_core: usize,
    pub router_parks: u64,
    pub router_wakeups: u64,
}

/// `freeflow-bench probe DIR --json`: one container's attachment and its round trips.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeReport {
    pub experiment: String,
    pub container: String,
    pub tenant: String,
    pub ip: String,
    pub shard: u16,
    pub samples: u64,
    pub rtt_p50_ns: u64,
    pub rtt_p99_ns: u64,
}

// ---------------------------------------------------------------- tcp

/// The three ways `freeflow-bench tcp` compares; in JSON `"host"`, `"overlay"`, `"freeflow"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcpPath {
    /// The host link between the two hosts' own namespaces.
    Host,
    /// Container to container over the VXLAN overlay.
    Overlay,
    /// Container to container with Freeflow (overlay addresses, host path).
    Freeflow,
}

impl TcpPath {
    /// Every path, in the order of the report.
    pub const ALL: [TcpPath; 3] = [TcpPath::Host, TcpPath::Overlay, TcpPath::Freeflow];

    /// The name in JSON and in the bench's own output.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpPath::Host => "host",
            TcpPath::Overlay => "overlay",
            TcpPath::Freeflow => "freeflow",
        }
    }
}

/// One path's numbers for one repetition (also what the client role prints).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TcpSample {
    pub gbit_per_sec: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub setup_p50_us: f64,
    pub setup_p99_us: f64,
    /// The connect call alone, within the setup (Freeflow's extra work is all in there).
    #[serde(default)]
    pub connect_p50_us: f64,
    pub conns_per_sec: f64,
}

/// One path: the medians over the repetitions, then each repetition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpPathReport {
    pub path: TcpPath,
    pub median: TcpSample,
    pub reps: Vec<TcpSample>,
}

/// A path's medians divided by the host link's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpRatios {
    pub throughput: f64,
    pub rtt_p50: f64,
    pub setup_p50: f64,
}

/// `freeflow-bench tcp --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpReport {
    pub experiment: String,
    pub repetitions: usize,
    pub stream_seconds: f64,
    pub paths: Vec<TcpPathReport>,
    pub freeflow_vs_host: TcpRatios,
    pub overlay_vs_host: TcpRatios,
    /// The connection-per-request load, one entry per number of concurrent clients; empty (and
    /// left out of the JSON) unless asked for with `--concurrency`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_request: Vec<TcpPerRequestReport>,
}

/// The ways the connection-per-request load compares: the three of [`TcpPath`], and a client
/// without Freeflow against the Freeflow server (served through the router's relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcpRequestPath {
    Host,
    Overlay,
    Freeflow,
    /// A client without the shim, the server with it.
    Relay,
}

impl TcpRequestPath {
    /// Every path, in the order of the report.
    pub const ALL: [TcpRequestPath; 4] = [
        TcpRequestPath::Host,
        TcpRequestPath::Overlay,
        TcpRequestPath::Freeflow,
        TcpRequestPath::Relay,
    ];

    /// The name in JSON and in the bench's own output.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpRequestPath::Host => "host",
            TcpRequestPath::Overlay => "overlay",
            TcpRequestPath::Freeflow => "freeflow",
            TcpRequestPath::Relay => "relay",
        }
    }
}

/// One repetition of the connection-per-request load on one path (also what the client role
/// prints): each request is connect, a 64-byte request, a 64-byte reply, and the server's close.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TcpPerRequestSample {
    /// Requests answered within the measured time, per second.
    pub requests_per_sec: f64,
    /// From the connect call to the reply's last byte.
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    /// The connect call alone, within the latency (the shim's and the router's setup work,
    /// and any wait for them, is all in there).
    #[serde(default)]
    pub connect_p50_us: f64,
    #[serde(default)]
    pub connect_p99_us: f64,
    /// Requests that failed (connect refused or reset, a short reply, a timeout).
    pub errors: u64,
}

/// One path of the connection-per-request load: the medians, then each repetition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpPerRequestPath {
    pub path: TcpRequestPath,
    pub median: TcpPerRequestSample,
    pub reps: Vec<TcpPerRequestSample>,
}

/// Medians of one path divided by another's: requests per second, p50 and p99 latency.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpPerRequestRatios {
    pub requests_per_sec: f64,
    pub latency_p50: f64,
    pub latency_p99: f64,
}

/// The connection-per-request load at one number of concurrent clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpPerRequestReport {
    pub clients: usize,
    pub seconds: f64,
    pub paths: Vec<TcpPerRequestPath>,
    pub freeflow_vs_overlay: TcpPerRequestRatios,
    pub freeflow_vs_host: TcpPerRequestRatios,
    pub relay_vs_overlay: TcpPerRequestRatios,
}

// ---------------------------------------------------------------- rdma

/// One repetition of `freeflow-bench rdma`, or the medians over them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RdmaSample {
    pub send_mops: f64,
    pub write_mops: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub write_gbytes_per_sec: f64,
    pub memcpy_gbytes_per_sec: f64,
    pub write_vs_memcpy: f64,
    pub router_ns_per_send: f64,
    pub router_ns_per_write: f64,
    pub router_ns_per_round_trip: f64,
    pub router_ns_per_64k_write: f64,
    /// rdma_cm connections set up and torn down per second, one after another (create id,
    /// resolve, QP, connect, accept, established, disconnect, destroy).
    #[serde(default)]
    pub cm_setups_per_sec: f64,
    #[serde(default)]
    pub router_us_per_cm_setup: f64,
}

/// `freeflow-bench rdma --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RdmaReport {
    pub experiment: String,
    pub repetitions: usize,
    pub app_core: usize,
    pub router_core: usize,
    pub messages: u64,
    pub rtt_samples: u64,
    pub bw_ops: u64,
    #[serde(default)]
    pub cm_connections: u64,
    pub median: RdmaSample,
    pub reps: Vec<RdmaSample>,
}

/// One router's CPU time per operation in each phase of `freeflow-bench rdma --hosts 2`, in ns.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RouterCpuPerOp {
    pub send_ns: f64,
    pub write_ns: f64,
    pub round_trip_ns: f64,
    pub write_64k_ns: f64,
    /// Per rdma_cm connection set up and torn down, in µs.
    #[serde(default)]
    pub cm_setup_us: f64,
}

/// One repetition of `freeflow-bench rdma --hosts 2`, or the medians over them: RDMA from a
/// container on host 0 to one on host 1, and the host link's own TCP floor in the same run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RdmaHostsSample {
    pub send_mops: f64,
    pub write_mops: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub write_gbytes_per_sec: f64,
    /// rdma_cm connections from host 0 to host 1 set up and torn down per second, one after
    /// another.
    #[serde(default)]
    pub cm_setups_per_sec: f64,
    /// 64-byte TCP ping-pong between the two hosts' namespaces.
    pub tcp_rtt_p50_us: f64,
    pub tcp_rtt_p99_us: f64,
    /// One TCP stream between the two hosts' namespaces.
    pub tcp_gbytes_per_sec: f64,
    /// Host 0's router, then host 1's.
    pub routers: Vec<RouterCpuPerOp>,
}

/// What issue 12's done-means compare, from the medians.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RdmaHostsRatios {
    /// RDMA round trip p50 / TCP ping-pong p50 on the host link (goal: <= 1.2).
    pub rtt_p50_vs_tcp: f64,
    /// 64 KiB RDMA WRITE bandwidth / one TCP stream on the host link (goal: >= 0.8).
    pub write_64k_vs_tcp_stream: f64,
    /// 64-byte SEND message rate, millions per second (goal: >= 1).
    pub send_mops: f64,
}

/// `freeflow-bench rdma --hosts 2 --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RdmaHostsReport {
    pub experiment: String,
    pub hosts: usize,
    pub repetitions: usize,
    /// Host h's router runs on `router_cores[h]`, its program on `app_cores[h]`.
    pub router_cores: Vec<usize>,
    pub app_cores: Vec<usize>,
    pub messages: u64,
    pub rtt_samples: u64,
    pub bw_ops: u64,
    #[serde(default)]
    pub cm_connections: u64,
    pub tcp_stream_seconds: f64,
    pub ratios: RdmaHostsRatios,
    pub median: RdmaHostsSample,
    pub reps: Vec<RdmaHostsSample>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_round_trip() {
        let events = [
            Progress::RingRepetition { rep: 1, of: 5 },
            Progress::IdleAttaching { containers: 50 },
            Progress::IdleMeasuring { seconds: 10 },
            Progress::TcpBuilding,
            Progress::TcpRepetition {
                rep: 2,
                of: 3,
                path: TcpPath::Overlay,
            },
            Progress::TcpPerRequest {
                rep: 1,
                of: 3,
                clients: 400,
                path: TcpRequestPath::Relay,
            },
            Progress::TcpRemoving,
            Progress::RdmaStarting { router_core: 1 },
            Progress::RdmaRepetition { rep: 1, of: 3 },
            Progress::RdmaStopping,
            Progress::RdmaHostsBuilding {
                router_cores: vec![0, 1],
            },
            Progress::RdmaHostsRepetition { rep: 1, of: 3 },
            Progress::RdmaHostsRemoving,
        ];
        for event in events {
            let line = event.to_line();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(Progress::from_line(&line), Some(event), "{line}");
        }
        assert_eq!(
            Progress::TcpRepetition {
                rep: 2,
                of: 3,
                path: TcpPath::Freeflow
            }
            .to_line(),
            r#"{"progress":"tcp_repetition","rep":2,"of":3,"path":"freeflow"}"#
        );
        assert_eq!(Progress::from_line("freeflow-bench: boom"), None);
        assert_eq!(Progress::from_line("{\"progress\":\"unknown\"}"), None);
    }

    #[test]
    fn progress_text_is_the_human_line() {
        assert_eq!(
            Progress::TcpRepetition {
                rep: 1,
                of: 3,
                path: TcpPath::Host
            }
            .to_string(),
            "tcp: repetition 1/3: host"
        );
        assert_eq!(
            Progress::RdmaRepetition { rep: 2, of: 3 }.to_string(),
            "rdma: repetition 2 of 3"
        );
    }

    #[test]
    fn tcp_paths_are_lowercase_names() {
        for path in TcpPath::ALL {
            assert_eq!(
                serde_json::to_string(&path).unwrap(),
                format!("\"{}\"", path.as_str())
            );
        }
    }

    #[test]
    fn request_paths_are_lowercase_names() {
        for path in TcpRequestPath::ALL {
            assert_eq!(
                serde_json::to_string(&path).unwrap(),
                format!("\"{}\"", path.as_str())
            );
        }
    }

    #[test]
    fn a_tcp_report_without_the_per_request_load_reads_and_writes_as_before() {
        let ratios = TcpRatios {
            throughput: 1.0,
            rtt_p50: 1.0,
            setup_p50: 1.0,
        };
        let report = TcpReport {
            experiment: "tcp".into(),
            repetitions: 1,
            stream_seconds: 1.0,
            paths: Vec::new(),
            freeflow_vs_host: ratios.clone(),
            overlay_vs_host: ratios,
            per_request: Vec::new(),
        };
        let json = serde_json::to_string(&report).unwrap();
        assert!(!json.contains("per_request"), "{json}");
        let back: TcpReport = serde_json::from_str(&json).unwrap();
        assert!(back.per_request.is_empty());
    }
}
