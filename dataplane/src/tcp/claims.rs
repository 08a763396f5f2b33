//! Claims: host sockets bound ahead for one container's connects to one listener of another
//! host, their ports announced to that host's router in advance, so that neither router is on
//! the connect's critical path.

use super::ports::{BoundSocket, HostPorts};
use super::TcpService;
use freeflow_proto::peer::PeerMsg;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Host sockets bound ahead for one container's connects to one listener of another host,
/// their ports claimed to that host's router in advance (see [`ClaimPool`]): refilled to this
/// many...
pub(super) const CLAIM_POOL_SIZE: usize = 6;
/// ...when fewer than this many are left (one claim message per several connects).
const CLAIM_POOL_LOW: usize = 2;
/// Listeners one container keeps pools for (the most recently used).
const POOLS_PER_CONTAINER: usize = 4;
/// A pool not used for this long is given back.
const CLAIM_POOL_IDLE: Duration = Duration::from_secs(60);
/// Claims are said again this often, well within
/// [`ANNOUNCEMENT_TTL`](super::resolve::ANNOUNCEMENT_TTL).
const CLAIM_REFRESH: Duration = Duration::from_secs(30);
/// How often pools are checked for being given back.
const POOL_SWEEP: Duration = Duration::from_secs(1);
/// Sockets in all pools at most (each holds a host port).
const MAX_CLAIMED: usize = 1024;
/// Ports one claim or release message may name.
pub(super) const MAX_CLAIM_PORTS: usize = 64;

/// A container's connects to the listener on host port `to_port` of `dst_host`: what an
/// announcement or a claim names, and the key of a claim pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Target {
    /// The connecting container's overlay address.
    pub container: Ipv4Addr,
    pub dst_host: Ipv4Addr,
    pub to_port: u16,
}

/// One container's pool of claimed host sockets for one listener of another host. A connect
/// there takes one if the connection to that host's router is up (then the claims reached it:
/// a reconnection sends them all again) and sends nothing: the peer router has recorded the
/// claim as it records a connect's announcement, and told the listener's processes, so their
/// accept needs no round trip either. The ports stay bound by this router until used, so no
/// one else can connect from them meanwhile.
struct ClaimPool {
    sockets: Vec<BoundSocket>,
    used_at: Instant,
    claimed_at: Instant,
}

impl ClaimPool {
    fn ports(&self) -> Vec<u16> {
        self.sockets.iter().map(|s| s.port).collect()
    }
}

#[derive(Default)]
pub(super) struct Claims {
    /// Claimed sockets by container (overlay address), for connects to other hosts.
    pools: HashMap<Target, ClaimPool>,
    /// Claimed ports whose socket closed unused (its connect failed), to give back.
    unused: Vec<(Target, u16)>,
    swept_at: Option<Instant>,
}

impl Claims {
    /// Drops every pool (bound to an address this host no longer has).
    pub fn clear(&mut self) {
        self.pools.clear();
    }

    /// Port `port` of pool `key` closed unused; it is given back on the next tick.
    pub fn unused(&mut self, key: Target, port: u16) {
        self.unused.push((key, port));
    }

    /// Claim messages of every pool for `dst_host` (sent first on a new connection to it).
    pub fn claim_lines(&self, host_ip: Ipv4Addr, dst_host: Ipv4Addr) -> Vec<u8> {
        let mut lines = Vec::new();
        for (&key, pool) in self.pools.iter().filter(|(k, _)| k.dst_host == dst_host) {
            for msg in claim_messages(host_ip, key, &pool.ports(), true) {
                lines.extend(msg.encode_line());
            }
        }
        lines
    }

    /// Refills the pools that ran low and says the claims again when due; the messages to
    /// send, by destination host.
    fn refill(
        &mut self,
        ports: &mut HostPorts,
        host_ip: Ipv4Addr,
        now: Instant,
    ) -> Vec<(Ipv4Addr, PeerMsg)> {
        let mut messages = Vec::new();
        let claimed: usize = self.pools.values().map(|p| p.sockets.len()).sum();
        let mut room = MAX_CLAIMED.saturating_sub(claimed);
        for (&key, pool) in self.pools.iter_mut() {
            let mut fresh = Vec::new();
            if pool.sockets.len() < CLAIM_POOL_LOW {
                while pool.sockets.len() < CLAIM_POOL_SIZE && room > 0 {
                    match ports.bind(host_ip, false) {
                        Ok(bound) => {
                            fresh.push(bound.port);
                            pool.sockets.push(bound);
                            room -= 1;
                        }
                        Err(_) => break,
                    }
                }
            }
            if now.duration_since(pool.claimed_at) >= CLAIM_REFRESH {
                pool.claimed_at = now;
                let again: Vec<u16> = pool
                    .ports()
                    .into_iter()
                    .filter(|p| !fresh.contains(p))
                    .collect();
                messages.extend(
                    claim_messages(host_ip, key, &again, false)
                        .into_iter()
                        .map(|m| (key.dst_host, m)),
                );
            }
            messages.extend(
                claim_messages(host_ip, key, &fresh, true)
                    .into_iter()
                    .map(|m| (key.dst_host, m)),
            );
        }
        messages
    }
}

fn claim_messages(host_ip: Ipv4Addr, key: Target, ports: &[u16], fresh: bool) -> Vec<PeerMsg> {
    ports
        .chunks(MAX_CLAIM_PORTS)
        .map(|chunk| PeerMsg::Claim {
            host: host_ip,
            ip: key.container,
            to_port: key.to_port,
            ports: chunk.to_vec(),
            fresh,
        })
        .collect()
}

impl TcpService {
    /// A socket of the pool `key`, if its claims are known at the destination (the connection
    /// to that host's router is up). The first connect to a listener makes its pool (filled by
    /// `tick`, after the reply; a pool used up before then is filled at once, see
    /// [`Self::refill_pool_now`]); a container keeps pools for a few listeners.
    pub(super) fn take_claimed(&mut self, key: Target) -> Option<BoundSocket> {
        let now = Instant::now();
        if !self.claims.pools.contains_key(&key) {
            let mine: Vec<(Target, Instant)> = self
                .claims
                .pools
                .iter()
                .filter(|(k, _)| k.container == key.container)
                .map(|(k, p)| (*k, p.used_at))
                .collect();
            if mine.len() >= POOLS_PER_CONTAINER {
                if let Some(&(oldest, _)) = mine.iter().min_by_key(|(_, at)| *at) {
                    self.release_pool(oldest);
                }
            }
            let pool = ClaimPool {
                sockets: Vec::new(),
                used_at: now,
                claimed_at: now,
            };
            self.claims.pools.insert(key, pool);
            return None;
        }
        if !self.peers.is_up(key.dst_host) {
            self.claims.pools.get_mut(&key).expect("present").used_at = now;
            return None;
        }
        let pool = self.claims.pools.get_mut(&key).expect("present");
        pool.used_at = now;
        if pool.sockets.is_empty() {
            // Used up within this turn of the loop (several connects at once): claimed
            // again here, so that one claim message goes for the next several connects
            // instead of an announcement for each, and before this connect's SYN.
            self.refill_pool_now(key);
        }
        let pool = self.claims.pools.get_mut(&key).expect("present");
        pool.sockets.pop()
    }

    /// Fills pool `key` (empty) to [`CLAIM_POOL_SIZE`] within [`MAX_CLAIMED`], and sends its
    /// host one claim naming the new ports.
    fn refill_pool_now(&mut self, key: Target) {
        let Some(host_ip) = self.registry.host_ip() else {
            return;
        };
        let claimed: usize = self.claims.pools.values().map(|p| p.sockets.len()).sum();
        let room = MAX_CLAIMED.saturating_sub(claimed).min(CLAIM_POOL_SIZE);
        let pool = self.claims.pools.get_mut(&key).expect("present");
        let mut fresh = Vec::with_capacity(room);
        while pool.sockets.len() < room {
            match self.ports.take(host_ip, false) {
                Ok(bound) => {
                    fresh.push(bound.port);
                    pool.sockets.push(bound);
                }
                Err(_) => break,
            }
        }
        for msg in claim_messages(host_ip, key, &fresh, true) {
            self.send_to(key.dst_host, &msg);
        }
    }

    /// Removes pool `key`, telling its host that the ports are given back.
    fn release_pool(&mut self, key: Target) {
        let Some(pool) = self.claims.pools.remove(&key) else {
            return;
        };
        self.send_release(key, &pool.ports());
    }

    /// Tells `key`'s host that its ports `ports` are given back.
    pub(super) fn send_release(&mut self, key: Target, ports: &[u16]) {
        let Some(host_ip) = self.registry.host_ip() else {
            return;
        };
        for chunk in ports.chunks(MAX_CLAIM_PORTS) {
            let msg = PeerMsg::Release {
                host: host_ip,
                ip: key.container,
                to_port: key.to_port,
                ports: chunk.to_vec(),
            };
            self.send_to(key.dst_host, &msg);
        }
    }

    /// Refills the pools that ran low, says the claims again when due, and gives back the
    /// pools that were not used for a while or whose container or listener went away.
    pub(super) fn refill_pools(&mut self, host_ip: Ipv4Addr, now: Instant) {
        for (key, port) in std::mem::take(&mut self.claims.unused) {
            self.send_release(key, &[port]);
        }
        // The sweep for pools to give back runs once a second, not on every turn of the loop.
        if self
            .claims
            .swept_at
            .is_none_or(|at| now.duration_since(at) >= POOL_SWEEP)
        {
            self.claims.swept_at = Some(now);
            for key in self.pools_to_give_back(host_ip, now) {
                self.release_pool(key);
            }
        }
        let messages = self.claims.refill(&mut self.ports, host_ip, now);
        for (host, msg) in messages {
            self.send_to(host, &msg);
        }
    }

    /// The pools not used for a while, or whose container or listener went away.
    fn pools_to_give_back(&self, host_ip: Ipv4Addr, now: Instant) -> Vec<Target> {
        let listening: HashSet<(Ipv4Addr, u16)> = self.listeners.remote_host_ports();
        self.claims
            .pools
            .iter()
            .filter(|(key, pool)| {
                let registered = self
                    .registry
                    .placement(key.container)
                    .is_some_and(|p| p.host == host_ip);
                now.duration_since(pool.used_at) >= CLAIM_POOL_IDLE
                    || !registered
                    || !listening.contains(&(key.dst_host, key.to_port))
            })
            .map(|(key, _)| *key)
            .collect()
    }
}
