//! The control thread's answers on `router.ctl` (root in the router's own network namespace
//! only): the container table the daemon pushes, the router's status, shutdown, and the test
//! panics of debug builds.

use super::{ControlThread, CONTROL_TIMEOUT};
use crate::shard::ShardCommand;
use freeflow_proto::control::{
    self as ctl, AttachedStatus, ContainerEntry, ControlRequest, ControlResponse, RouterStatus,
    RouterTable, ShardStatus, TenantTcpStatus,
};
use std::collections::HashSet;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl ControlThread {
    /// Serves one control connection. Returns true if it asked for shutdown.
    pub(super) fn serve_control(&mut self) -> io::Result<bool> {
        let (stream, _) = match self.control_listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => {
                log::warn!("accept on router.ctl: {e}");
                return Ok(false);
            }
        };
        // Dropped unanswered: neither the table nor the status is anyone else's business.
        if !crate::control_peer::admit(&stream) {
            return Ok(false);
        }
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(CONTROL_TIMEOUT))?;
        stream.set_write_timeout(Some(CONTROL_TIMEOUT))?;
        let mut reader = io::BufReader::new(&stream);
        let request: Option<ControlRequest> = match ctl::read_line(&mut reader) {
            Ok(r) => r,
            Err(e) => {
                let mut w = &stream;
                let _ = ctl::write_line(
                    &mut w,
                    &ControlResponse::Error {
                        message: e.to_string(),
                    },
                );
                return Ok(false);
            }
        };
        let Some(request) = request else {
            return Ok(false);
        };
        let (response, shutdown) = match request {
            ControlRequest::SetContainers {
                containers,
                network,
                generation,
            } => {
                let response = match self.served.set_full(containers, network, generation) {
                    Ok(gone) => {
                        self.table_changed(&gone, true, true);
                        ControlResponse::Ok
                    }
                    Err(message) => ControlResponse::Error { message },
                };
                (response, false)
            }
            ControlRequest::UpdateContainers(delta) => {
                let response = match self.served.apply(delta) {
                    Ok(applied) => {
                        self.table_changed(
                            &applied.gone,
                            applied.containers_changed,
                            applied.network_changed,
                        );
                        ControlResponse::Ok
                    }
                    // The daemon sends the full table next: not worth a warning.
                    Err(e) => ControlResponse::Error {
                        message: e.to_string(),
                    },
                };
                (response, false)
            }
            ControlRequest::Status => (ControlResponse::Status(self.status()), false),
            ControlRequest::Table { unless_push } => (self.table(unless_push), false),
            ControlRequest::Shutdown => (ControlResponse::Ok, true),
            ControlRequest::TestPanic { shard } => (self.test_panic(shard), false),
        };
        let mut w = &stream;
        let _ = ctl::write_line(&mut w, &response);
        Ok(shutdown)
    }

    /// `ControlRequest::TestPanic`: panics the control thread (`None`) or asks shard `shard`
    /// to panic.
    #[cfg(debug_assertions)]
    fn test_panic(&self, shard: Option<usize>) -> ControlResponse {
        let Some(index) = shard else {
            panic!("test panic of the control thread (requested on router.ctl)");
        };
        let message = match self
            .shards
            .get(index)
            .map(|s| s.send(ShardCommand::TestPanic))
        {
            Some(Ok(())) => return ControlResponse::Ok,
            Some(Err(_)) => "the shard's inbox is full",
            None => "no such shard",
        };
        ControlResponse::Error {
            message: message.into(),
        }
    }

    /// A release build has no test panics.
    #[cfg(not(debug_assertions))]
    fn test_panic(&self, _shard: Option<usize>) -> ControlResponse {
        ControlResponse::Error {
            message: "test panics exist only in debug builds of the router".into(),
        }
    }

    /// Passes an accepted push on: detaches the attachments of containers that went or
    /// changed (`gone`), and gives the shards, the connection manager and the TCP service what
    /// changed of the containers and of the cluster.
    fn table_changed(&mut self, gone: &[ContainerEntry], containers: bool, network: bool) {
        self.pushes += 1;
        self.cm.table_changed();
        if !gone.is_empty() {
            let names: HashSet<&str> = gone.iter().map(|c| c.name.as_str()).collect();
            let stale: Vec<(u32, Option<usize>)> = match self.attached.lock() {
                Ok(attached) => attached
                    .values()
                    .filter(|a| names.contains(a.container.as_str()))
                    .map(|a| (a.id, a.shard))
                    .collect(),
                Err(_) => Vec::new(),
            };
            for (id, shard) in stale {
                match shard.and_then(|s| self.shards.get(s)) {
                    Some(shard) => {
                        let _ = shard.send(ShardCommand::Detach(id));
                    }
                    None => self.drop_socket_shim(id, "container unregistered or changed"),
                }
            }
        }
        if containers {
            log::info!(
                "serving {} registered container(s)",
                self.served.containers.len()
            );
            // Every shard's verbs engine learns which containers are this host's (QPs between
            // containers that different shards serve).
            let local: Arc<Vec<(std::net::Ipv4Addr, String)>> = Arc::new(
                self.served
                    .containers
                    .values()
                    .map(|c| (c.ip, c.tenant.clone()))
                    .collect(),
            );
            for shard in &self.shards {
                if shard.send(ShardCommand::Containers(local.clone())).is_err() {
                    log::warn!("shard {}: inbox full; containers not updated", shard.index);
                }
            }
        }
        let Some(view) = network.then(|| self.served.network_view()).flatten() else {
            return;
        };
        // Every shard's verbs engine reaches other hosts' routers.
        for shard in &self.shards {
            let _ = shard.send(ShardCommand::Network(Box::new(view.clone())));
        }
        self.cm.set_network(view.clone());
        self.tcp.set_network(view);
    }

    /// `ControlRequest::Table`: the table, or only its number if the caller has it already.
    fn table(&self, unless_push: Option<u64>) -> ControlResponse {
        if unless_push == Some(self.pushes) {
            return ControlResponse::TableUnchanged {
                pushes: self.pushes,
            };
        }
        ControlResponse::Table(RouterTable {
            pushes: self.pushes,
            containers: self.served.container_list(),
            network: self.served.network_view(),
        })
    }

    fn status(&mut self) -> RouterStatus {
        // Doorbells answered since the last client came are counted when next looked at: look
        // now, so that `tcp_relayed` counts every client the applications have taken.
        self.tcp.take_answered_doorbells();
        let mut attached: Vec<AttachedStatus> = self
            .attached
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        attached.sort_by_key(|a| a.id);
        RouterStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            shards: self
                .shards
                .iter()
                .map(|s| ShardStatus {
                    index: s.index,
                    core: s.core,
                    attached: s.stats.attached.load(Ordering::Relaxed),
                    requests: s.stats.requests.load(Ordering::Relaxed),
                    wakeups: s.stats.wakeups.load(Ordering::Relaxed),
                    parks: s.stats.parks.load(Ordering::Relaxed),
                    protocol_errors: s.stats.protocol_errors.load(Ordering::Relaxed),
                    parked_ns: s.stats.parked_ns.load(Ordering::Relaxed),
                    cpu_ns: thread_cpu_ns(s.stats.tid.load(Ordering::Relaxed)),
                    containers: s.stats.containers.load(Ordering::Relaxed),
                    qps: s.stats.qps.load(Ordering::Relaxed),
                    verbs_ops: s.stats.verbs_ops.load(Ordering::Relaxed),
                    verbs_bytes: s.stats.verbs_bytes.load(Ordering::Relaxed),
                })
                .collect(),
            registered: self.served.containers.len(),
            attached,
            attaches_accepted: self.accepted,
            attaches_refused: self.refused,
            tcp_listeners: self.tcp.listeners(),
            tcp_connects: self.tcp.counters.connects,
            tcp_fallbacks: self.tcp.counters.fallbacks,
            tcp_relayed: self.tcp.counters.relayed,
            tcp_claimed: self.tcp.counters.claimed,
            tcp_remote_listeners: self.tcp.remote_listeners(),
            tcp_by_tenant: self
                .tcp
                .counters
                .by_tenant
                .iter()
                .map(|(tenant, c)| TenantTcpStatus {
                    tenant: tenant.clone(),
                    connects: c.connects,
                    fallbacks: c.fallbacks,
                    relayed: c.relayed,
                })
                .collect(),
            cm_listeners: self.cm.listener_count(),
            cm_established: self.cm.established,
            cm_resolved_late: self.cm.resolved_late,
            jail_active: crate::jail::active(),
        }
    }
}

/// CPU time of this process's thread `tid` in ns (the first field of its schedstat), 0 if
/// unknown: a shard's time serving or spinning, as opposed to parked.
fn thread_cpu_ns(tid: u32) -> u64 {
    if tid == 0 {
        return 0;
    }
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
