//! The connection manager (rdma_cm) of RDMA mode, served by the control thread: ids, listeners
//! per (tenant, address, port space, port), address and route resolution for overlay
//! addresses, and the connect / accept / reject / establish / disconnect exchange between two
//! ids, carrying QP numbers, connection parameters and private data. It never touches a QP:
//! each side's librdmacm moves its own QP through INIT, RTR and RTS with the verbs (as
//! rdma-core's librdmacm does), and the verbs engine connects the two QPs from the GID and QP
//! number the CM carried.
//!
//! Everything a process sends is untrusted: every request names an id that must belong to the
//! caller's container, addresses are checked against the caller's tenant (an address outside
//! it resolves to ADDR_ERROR, the same answer as an address nobody has, so that a container
//! cannot learn another tenant's addresses), private data is bounded per message, a container
//! holds at most [`IDS_PER_CONTAINER`] ids, a listener at most its backlog of requests
//! waiting, and a process that does not read its events or replies is dropped once
//! [`MAX_OUTBOX`] pile up (never a blocked router).

use freeflow_proto::attach::ShimKind;
use freeflow_proto::cm::{
    event, port_space, private_data_limit, reject_reason, CmOp, CmRecord, ConnParams,
    CM_RECORD_LEN, EVENT, REPLY, REQUEST,
};
use freeflow_proto::control::{ContainerEntry, NetworkView};
use freeflow_proto::fdpass;
use freeflow_proto::identity::NetnsId;
use freeflow_proto::peer::CmPeerMsg;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// Ids one container may hold at once (across all its processes and channels).
pub const IDS_PER_CONTAINER: usize = 4096;
/// Records kept for a connection that has no room for them; beyond, the process is not reading
/// and its connection is dropped (a channel's ids with it).
pub const MAX_OUTBOX: usize = 4096;
/// Requests of one process served per readiness of its connection at most.
const REQUESTS_PER_WAKE: usize = 64;
/// Largest listen backlog (a larger one is cut to it, as the kernel does with somaxconn).
pub const MAX_BACKLOG: u32 = 1024;
/// The longest an address resolution waits for the cluster's news (the program's
/// `rdma_resolve_addr` timeout, at most this).
const MAX_RESOLVE_WAIT: Duration = Duration::from_secs(10);
/// Resolutions one container may have waiting at once; past that, an address this router does
/// not know is an ADDR_ERROR at once.
const RESOLVING_PER_CONTAINER: usize = 64;
/// Backlog of a listen that asks for 0.
const DEFAULT_BACKLOG: u32 = 128;
/// Ports the router picks for ids bound to port 0 (Linux's default ephemeral range).
const EPHEMERAL: std::ops::RangeInclusive<u16> = 32768..=60999;

/// A port of one port space on one address of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PortKey {
    tenant: String,
    ip: Ipv4Addr,
    ps: u16,
    port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Bound,
    Listening,
    /// Active side: the address is not known to this router yet; waiting (within the
    /// program's timeout) for the daemon's next table.
    Resolving,
    AddrResolved,
    RouteResolved,
    /// Active side: connect sent, waiting for accept or reject.
    Connecting,
    /// Passive side: connection request delivered, waiting for accept or reject.
    Requested,
    /// Passive side: accepted, waiting for the active side's Establish.
    Accepted,
    /// Active side: CONNECT_RESPONSE delivered, waiting for its Establish.
    Responded,
    Established,
    Disconnected,
    /// Rejected, refused or failed: only destroy is left.
    Closed,
    /// RDMA_PS_UDP: the exchange that gave the active side the passive side's QP number
    /// (InfiniBand's SIDR) is done. There is no connection: nothing to disconnect, and
    /// destroying either side tells the other nothing.
    Datagram,
}

/// Whether ids of port space `ps` exchange UD QP numbers (SIDR) rather than connect.
fn is_datagram(ps: u16) -> bool {
    ps == port_space::UDP
}

/// The most private data a connect (or, with `accept`, an accept) of port space `ps` carries.
fn private_data_limit_of(ps: u16, accept: bool) -> usize {
    match (is_datagram(ps), accept) {
        (true, false) => private_data_limit::UD_CONNECT,
        (true, true) => private_data_limit::UD_ACCEPT,
        (false, false) => private_data_limit::CONNECT,
        (false, true) => private_data_limit::ACCEPT,
    }
}

#[derive(Debug)]
struct CmId {
    /// The event channel's connection.
    channel: u32,
    container: String,
    tenant: String,
    own_ip: Ipv4Addr,
    ps: u16,
    state: State,
    /// Bound address (its ip as the application gave it: 0 for any) and port.
    local: Option<SocketAddrV4>,
    remote: Option<SocketAddrV4>,
    /// The other side of a connection, on this host.
    peer: Option<u32>,
    /// The other side of a connection on another host: its router's host and its id there (0
    /// until it answers a connect).
    far: Option<(Ipv4Addr, u32)>,
    /// Passive side: the listener whose backlog this request counts in, until accepted,
    /// rejected or destroyed.
    listener: Option<u32>,
    backlog: u32,
    waiting: u32,
}

impl CmId {
    fn bound_key(&self) -> Option<PortKey> {
        self.local.map(|local| PortKey {
            tenant: self.tenant.clone(),
            ip: self.own_ip,
            ps: self.ps,
            port: local.port(),
        })
    }
}

struct Conn {
    fd: OwnedFd,
    kind: ShimKind,
    container: ContainerEntry,
    pid: i32,
    /// A channel's token.
    token: u64,
    /// Records that did not fit yet, in order.
    outbox: VecDeque<[u8; CM_RECORD_LEN]>,
    /// A channel's ids.
    ids: HashSet<u32>,
}

/// The connection manager's state.
#[derive(Default)]
pub struct CmService {
    conns: HashMap<u32, Conn>,
    tokens: HashMap<u64, u32>,
    ids: HashMap<u32, CmId>,
    /// Every bound id by its port (a port is bound once).
    bound: HashMap<PortKey, u32>,
    listeners: HashSet<u32>,
    per_container: HashMap<String, usize>,
    next_id: u32,
    next_port: u16,
    /// Connections established since the start (status).
    pub established: u64,
    /// Address resolutions that waited for a table and then resolved (status).
    pub resolved_late: u64,
    /// Connections to drop after the current step (a send failed).
    doomed: Vec<u32>,
    /// The cluster (other hosts' containers and their tenants), for connections across hosts.
    network: Option<NetworkView>,
    /// Ids in [`State::Resolving`]: the address asked for and until when to wait.
    resolving: Vec<(u32, SocketAddrV4, Instant)>,
    /// The daemon pushed a table since the resolving ids were last looked at.
    table_news: bool,
    /// Steps for other hosts' routers, to send (the control thread carries them on the peer
    /// connections).
    pub peer_out: Vec<(Ipv4Addr, CmPeerMsg)>,
}

/// Who asks: a registered container's process, on its requests connection.
pub struct Caller<'a> {
    pub container: &'a ContainerEntry,
}

type Reply = Result<CmRecord, i32>;

impl CmService {
    pub fn set_network(&mut self, network: NetworkView) {
        self.network = Some(network);
    }

    /// Where `ip` of `tenant` lives: `Some(None)` on this host, `Some(Some(host))` on another
    /// registered host; None if no container of `tenant` has it.
    fn locate(
        &self,
        table: &HashMap<NetnsId, ContainerEntry>,
        tenant: &str,
        ip: Ipv4Addr,
    ) -> Option<Option<Ipv4Addr>> {
        if Self::find_container(table, tenant, ip).is_some() {
            return Some(None);
        }
        let net = self.network.as_ref()?;
        net.overlay
            .iter()
            .find(|e| e.ip == ip && e.tenant == tenant && e.host_ip != net.host_ip)
            .map(|e| Some(e.host_ip))
    }

    /// Listeners now (status).
    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    /// Takes over an accepted connection of `kind` (one of the CM kinds). A channel is sent
    /// its token at once.
    pub fn adopt(
        &mut self,
        id: u32,
        kind: ShimKind,
        fd: OwnedFd,
        container: ContainerEntry,
        pid: i32,
    ) {
        let mut conn = Conn {
            fd,
            kind,
            container,
            pid,
            token: 0,
            outbox: VecDeque::new(),
            ids: HashSet::new(),
        };
        if kind == ShimKind::CmChannel {
            let token = loop {
                let t = random_token();
                if t != 0 && !self.tokens.contains_key(&t) {
                    break t;
                }
            };
            conn.token = token;
            self.tokens.insert(token, id);
            let mut rec = CmRecord::event(event::CHANNEL_TOKEN, 0, 0);
            rec.token = token;
            conn.outbox.push_back(rec.encode(EVENT));
        }
        self.conns.insert(id, conn);
        self.flush(id);
        self.finish_doomed();
    }

    /// Descriptors to poll, with their events: readable (requests, a hang-up), or writable
    /// when records wait for room.
    pub fn poll_fds(&self) -> Vec<(u32, BorrowedFd<'_>, i16)> {
        self.conns
            .iter()
            .map(|(&id, c)| {
                let events = match c.outbox.is_empty() {
                    true => libc::POLLIN,
                    false => libc::POLLIN | libc::POLLOUT,
                };
                (id, c.fd.as_fd(), events)
            })
            .collect()
    }

    /// Serves connection `id` after poll said `revents`; `table` is the host's containers.
    /// Returns the connections that are gone (for the attachment table).
    pub fn on_ready(
        &mut self,
        id: u32,
        revents: i16,
        table: &HashMap<NetnsId, ContainerEntry>,
    ) -> Vec<u32> {
        if revents & libc::POLLOUT != 0 {
            self.flush(id);
        }
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            for _ in 0..REQUESTS_PER_WAKE {
                if !self.serve_one(id, table) {
                    break;
                }
            }
        }
        self.finish_doomed()
    }

    /// Drops connection `id` (its container was unregistered).
    pub fn detach(&mut self, id: u32, why: &str) -> Vec<u32> {
        self.doom(id, why);
        self.finish_doomed()
    }

    fn doom(&mut self, id: u32, why: &str) {
        if let Some(c) = self.conns.get(&id) {
            log::info!(
                "detached {id} ({} of container {}, pid {}): {why}",
                c.kind.name(),
                c.container.name,
                c.pid
            );
            self.doomed.push(id);
        }
    }

    /// Drops the doomed connections (a channel's ids destroyed, their peers told).
    fn finish_doomed(&mut self) -> Vec<u32> {
        let mut gone = Vec::new();
        while let Some(id) = self.doomed.pop() {
            let Some(conn) = self.conns.remove(&id) else {
                continue;
            };
            self.tokens.remove(&conn.token);
            for cm_id in conn.ids {
                self.destroy(cm_id);
            }
            gone.push(id);
        }
        gone
    }

    /// Reads and serves one record of connection `id`; false when there is nothing more.
    fn serve_one(&mut self, id: u32, table: &HashMap<NetnsId, ContainerEntry>) -> bool {
        let Some(conn) = self.conns.get(&id) else {
            return false;
        };
        // One reply outstanding at most: no request is read while replies wait for room.
        if !conn.outbox.is_empty() && conn.kind == ShimKind::CmRequests {
            return false;
        }
        let mut buf = [0u8; CM_RECORD_LEN + 1];
        let got = match fdpass::recv_with_fds(conn.fd.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                self.doom(id, &format!("connection error: {e}"));
                return false;
            }
        };
        if got.len == 0 && got.fds.is_empty() {
            self.doom(id, "process went away");
            return false;
        }
        if conn.kind == ShimKind::CmChannel {
            self.doom(id, "an event channel carries no requests");
            return false;
        }
        if got.truncated || !got.fds.is_empty() {
            self.doom(id, "request carried fds or was truncated");
            return false;
        }
        let request = match CmRecord::decode(&buf[..got.len], REQUEST) {
            Ok(r) => r,
            Err(e) => {
                self.doom(id, &format!("malformed request: {e}"));
                return false;
            }
        };
        let container = conn.container.clone();
        let seq = request.seq;
        let op = request.op;
        let mut reply = match self.handle(
            &Caller {
                container: &container,
            },
            request,
            table,
        ) {
            Ok(rec) => rec,
            Err(errno) => {
                log::info!(
                    target: &format!("cm refused {}", container.name),
                    "rdma_cm: request {op} of container {} refused: {}",
                    container.name,
                    io::Error::from_raw_os_error(errno)
                );
                CmRecord {
                    status: errno,
                    ..CmRecord::default()
                }
            }
        };
        reply.seq = seq;
        reply.op = op;
        self.send(id, reply.encode(REPLY));
        true
    }

    /// Queues a record on connection `conn` and sends what has room.
    fn send(&mut self, conn: u32, record: [u8; CM_RECORD_LEN]) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.outbox.len() >= MAX_OUTBOX {
            return self.doom(conn, "does not read its events");
        }
        c.outbox.push_back(record);
        self.flush(conn);
    }

    fn flush(&mut self, conn: u32) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        while let Some(rec) = c.outbox.front() {
            match fdpass::try_send_with_fds(c.fd.as_fd(), rec, &[]) {
                Ok(_) => drop(c.outbox.pop_front()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return self.doom(conn, &format!("send failed: {e}")),
            }
        }
    }

    /// Sends an event on `id`'s channel.
    fn emit(&mut self, id: u32, mut rec: CmRecord) {
        let Some(cm) = self.ids.get(&id) else {
            return;
        };
        rec.id = id;
        rec.ps = cm.ps;
        if rec.local.port() == 0 {
            if let Some(local) = cm.local {
                rec.local = local;
            }
        }
        if rec.remote.port() == 0 {
            if let Some(remote) = cm.remote {
                rec.remote = remote;
            }
        }
        let channel = cm.channel;
        self.send(channel, rec.encode(EVENT));
    }

    /// The id `id` if the caller's container holds it.
    fn owned(&self, caller: &Caller<'_>, id: u32) -> Result<&CmId, i32> {
        match self.ids.get(&id) {
            Some(cm) if cm.container == caller.container.name => Ok(cm),
            _ => Err(libc::EINVAL),
        }
    }

    fn handle(
        &mut self,
        caller: &Caller<'_>,
        req: CmRecord,
        table: &HashMap<NetnsId, ContainerEntry>,
    ) -> Reply {
        let Some(op) = req.cm_op() else {
            return Err(libc::EINVAL);
        };
        if op != CmOp::CreateId {
            self.owned(caller, req.id)?;
        }
        match op {
            CmOp::CreateId => self.create_id(caller, &req),
            CmOp::DestroyId => {
                self.destroy(req.id);
                Ok(CmRecord::default())
            }
            CmOp::Bind => self.bind(req.id, req.local),
            CmOp::Listen => self.listen(req.id, req.backlog),
            CmOp::ResolveAddr => {
                self.resolve_addr(req.id, req.local, req.remote, req.backlog, table)
            }
            CmOp::ResolveRoute => self.resolve_route(req.id),
            CmOp::Connect => self.connect(req.id, &req, table),
            CmOp::Accept => self.accept(req.id, &req),
            CmOp::Reject => self.reject(req.id, &req),
            CmOp::Establish => self.establish(req.id),
            CmOp::Disconnect => self.disconnect(req.id),
        }
    }

    fn create_id(&mut self, caller: &Caller<'_>, req: &CmRecord) -> Reply {
        let channel = match self.tokens.get(&req.token) {
            Some(&ch) if self.conns[&ch].container.name == caller.container.name => ch,
            _ => return Err(libc::EINVAL),
        };
        if !matches!(req.ps, port_space::TCP | port_space::IB | port_space::UDP) {
            // RDMA_PS_IPOIB: its QPs join IPoIB's multicast groups, which Freeflow has not.
            return Err(libc::EPROTONOSUPPORT);
        }
        let held = self
            .per_container
            .entry(caller.container.name.clone())
            .or_default();
        if *held >= IDS_PER_CONTAINER {
            return Err(libc::ENOMEM);
        }
        *held += 1;
        let id = loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.ids.contains_key(&self.next_id) {
                break self.next_id;
            }
        };
        self.ids.insert(
            id,
            CmId {
                channel,
                container: caller.container.name.clone(),
                tenant: caller.container.tenant.clone(),
                own_ip: caller.container.ip,
                ps: req.ps,
                state: State::Idle,
                local: None,
                remote: None,
                peer: None,
                far: None,
                listener: None,
                backlog: 0,
                waiting: 0,
            },
        );
        if let Some(conn) = self.conns.get_mut(&channel) {
            conn.ids.insert(id);
        }
        Ok(CmRecord {
            id,
            ..CmRecord::default()
        })
    }

    /// Binds `id` to `local` (address 0 or the container's own; port 0: an ephemeral one).
    fn bind_port(&mut self, id: u32, local: SocketAddrV4) -> Result<SocketAddrV4, i32> {
        let cm = &self.ids[&id];
        if !local.ip().is_unspecified() && *local.ip() != cm.own_ip {
            return Err(libc::EADDRNOTAVAIL);
        }
        let mut key = PortKey {
            tenant: cm.tenant.clone(),
            ip: cm.own_ip,
            ps: cm.ps,
            port: local.port(),
        };
        if key.port == 0 {
            let span = u32::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
            let found = (0..span).find_map(|_| {
                let next = self.next_port.wrapping_add(1);
                self.next_port = match EPHEMERAL.contains(&next) {
                    true => next,
                    false => *EPHEMERAL.start(),
                };
                key.port = self.next_port;
                (!self.bound.contains_key(&key)).then_some(self.next_port)
            });
            found.ok_or(libc::EADDRINUSE)?;
        } else if self.bound.contains_key(&key) {
            return Err(libc::EADDRINUSE);
        }
        let bound = SocketAddrV4::new(*local.ip(), key.port);
        self.bound.insert(key, id);
        let cm = self.ids.get_mut(&id).expect("checked");
        cm.local = Some(bound);
        cm.state = State::Bound;
        Ok(bound)
    }

    fn bind(&mut self, id: u32, local: SocketAddrV4) -> Reply {
        if self.ids[&id].state != State::Idle {
            return Err(libc::EINVAL);
        }
        let local = self.bind_port(id, local)?;
        Ok(CmRecord {
            local,
            ..CmRecord::default()
        })
    }

    fn listen(&mut self, id: u32, backlog: u32) -> Reply {
        let state = self.ids[&id].state;
        match state {
            State::Idle => {
                self.bind_port(id, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
            }
            State::Bound | State::Listening => {}
            _ => return Err(libc::EINVAL),
        }
        let cm = self.ids.get_mut(&id).expect("checked");
        cm.state = State::Listening;
        cm.backlog = match backlog {
            0 => DEFAULT_BACKLOG,
            b => b.min(MAX_BACKLOG),
        };
        self.listeners.insert(id);
        Ok(CmRecord {
            local: cm.local.expect("bound"),
            ..CmRecord::default()
        })
    }

    /// The registered container of this host at `ip` in `tenant`, if any.
    fn find_container<'t>(
        table: &'t HashMap<NetnsId, ContainerEntry>,
        tenant: &str,
        ip: Ipv4Addr,
    ) -> Option<&'t ContainerEntry> {
        table.values().find(|c| c.ip == ip && c.tenant == tenant)
    }

    fn resolve_addr(
        &mut self,
        id: u32,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        timeout_ms: u32,
        table: &HashMap<NetnsId, ContainerEntry>,
    ) -> Reply {
        if remote.ip().is_unspecified() {
            return Err(libc::EINVAL);
        }
        match self.ids[&id].state {
            State::Idle => {
                self.bind_port(id, SocketAddrV4::new(*local.ip(), 0))?;
            }
            State::Bound | State::AddrResolved | State::RouteResolved => {}
            _ => return Err(libc::EINVAL),
        }
        let cm = self.ids.get_mut(&id).expect("checked");
        let bound = cm.local.expect("bound");
        let (tenant, container) = (cm.tenant.clone(), cm.container.clone());
        if self.locate(table, &tenant, *remote.ip()).is_some() {
            self.address_resolved(id, remote);
        } else {
            // Unknown or another tenant's (one answer for both): a container registered on
            // another host a moment ago may not have reached this router yet, so the id
            // waits for the daemon's news within the program's timeout (`backlog` carries
            // it), as a real CM's resolution waits for ARP.
            let wait = Duration::from_millis(u64::from(timeout_ms)).min(MAX_RESOLVE_WAIT);
            let waiting = self
                .resolving
                .iter()
                .filter(|(r, _, _)| self.ids.get(r).is_some_and(|c| c.container == container))
                .count();
            if wait.is_zero() || waiting >= RESOLVING_PER_CONTAINER {
                self.address_error(id, remote);
            } else {
                log::info!(
                    target: &format!("cm waits {container}"),
                    "rdma_cm: container {container} resolves {}, not known here yet: waits up \
                     to {} ms for the registry's news",
                    remote.ip(),
                    wait.as_millis()
                );
                self.ids.get_mut(&id).expect("checked").state = State::Resolving;
                self.resolving.push((id, remote, Instant::now() + wait));
            }
        }
        Ok(CmRecord {
            local: bound,
            ..CmRecord::default()
        })
    }

    fn address_resolved(&mut self, id: u32, remote: SocketAddrV4) {
        let Some(cm) = self.ids.get_mut(&id) else {
            return;
        };
        cm.remote = Some(remote);
        cm.state = State::AddrResolved;
        self.emit(id, CmRecord::event(event::ADDR_RESOLVED, id, 0));
    }

    fn address_error(&mut self, id: u32, remote: SocketAddrV4) {
        let Some(cm) = self.ids.get_mut(&id) else {
            return;
        };
        log::info!(
            target: &format!("cm unresolved {}", cm.container),
            "rdma_cm: container {} resolved {} outside its tenant {}: ADDR_ERROR",
            cm.container,
            remote.ip(),
            cm.tenant
        );
        cm.state = State::Bound;
        let mut ev = CmRecord::event(event::ADDR_ERROR, id, -libc::EHOSTUNREACH);
        ev.remote = remote;
        self.emit(id, ev);
    }

    /// The daemon pushed a table: resolving ids look again at their next turn.
    pub fn table_changed(&mut self) {
        self.table_news = !self.resolving.is_empty();
    }

    /// Ids waiting for an address: resolved if the table now has it (looked at only after a
    /// push), ADDR_ERROR once their time is up. Cheap when nothing waits.
    pub fn retry_resolves(&mut self, table: &HashMap<NetnsId, ContainerEntry>, now: Instant) {
        if self.resolving.is_empty() {
            return;
        }
        let news = std::mem::take(&mut self.table_news);
        if !news && self.resolving.iter().all(|&(_, _, until)| until > now) {
            return;
        }
        for (id, remote, until) in std::mem::take(&mut self.resolving) {
            let Some(cm) = self.ids.get(&id) else {
                continue; // destroyed meanwhile
            };
            if cm.state != State::Resolving {
                continue;
            }
            let tenant = cm.tenant.clone();
            if news && self.locate(table, &tenant, *remote.ip()).is_some() {
                self.resolved_late += 1;
                self.address_resolved(id, remote);
            } else if until <= now {
                self.address_error(id, remote);
            } else {
                self.resolving.push((id, remote, until));
            }
        }
    }

    /// Milliseconds until the first resolving id's time is up, if any waits.
    pub fn next_timeout_ms(&self, now: Instant) -> Option<i32> {
        self.resolving
            .iter()
            .map(|&(_, _, until)| until.saturating_duration_since(now).as_millis() as i32 + 1)
            .min()
    }

    fn resolve_route(&mut self, id: u32) -> Reply {
        let cm = self.ids.get_mut(&id).expect("checked");
        if !matches!(cm.state, State::AddrResolved | State::RouteResolved) {
            return Err(libc::EINVAL);
        }
        cm.state = State::RouteResolved;
        self.emit(id, CmRecord::event(event::ROUTE_RESOLVED, id, 0));
        Ok(CmRecord::default())
    }

    fn connect(
        &mut self,
        id: u32,
        req: &CmRecord,
        table: &HashMap<NetnsId, ContainerEntry>,
    ) -> Reply {
        let cm = &self.ids[&id];
        if req.private_data.len() > private_data_limit_of(cm.ps, false) {
            return Err(libc::EINVAL);
        }
        if cm.state != State::RouteResolved {
            return Err(libc::EINVAL);
        }
        let remote = cm.remote.expect("resolved");
        let local = cm.local.expect("bound");
        let own_ip = cm.own_ip;
        // The table may have changed since the resolve.
        let place = self.locate(table, &cm.tenant, *remote.ip());
        let Some(place) = place else {
            self.ids.get_mut(&id).expect("checked").state = State::Closed;
            self.emit(
                id,
                CmRecord::event(event::UNREACHABLE, id, -libc::EHOSTUNREACH),
            );
            return Ok(CmRecord::default());
        };
        if let Some(host) = place {
            let msg = CmPeerMsg {
                op: CmOp::Connect as u16,
                from_id: id,
                to_id: 0,
                src: SocketAddrV4::new(own_ip, local.port()),
                dst: remote,
                ps: cm.ps,
                qpn: req.qpn,
                conn: conn_bytes(req.conn),
                status: 0,
                private_data: req.private_data.clone(),
            };
            self.peer_out.push((host, msg));
            let active = self.ids.get_mut(&id).expect("checked");
            active.state = State::Connecting;
            active.far = Some((host, 0));
            return Ok(CmRecord::default());
        }
        let key = PortKey {
            tenant: cm.tenant.clone(),
            ip: *remote.ip(),
            ps: cm.ps,
            port: remote.port(),
        };
        let listener = self
            .bound
            .get(&key)
            .copied()
            .filter(|l| self.listeners.contains(l));
        let Some(lid) = listener else {
            self.ids.get_mut(&id).expect("checked").state = State::Closed;
            let ev = CmRecord::event(event::REJECTED, id, reject_reason::INVALID_SERVICE_ID);
            self.emit(id, ev);
            return Ok(CmRecord::default());
        };
        let l = &self.ids[&lid];
        if l.waiting >= l.backlog {
            self.ids.get_mut(&id).expect("checked").state = State::Closed;
            self.emit(
                id,
                CmRecord::event(event::UNREACHABLE, id, -libc::ETIMEDOUT),
            );
            return Ok(CmRecord::default());
        }
        let held = self.per_container.entry(l.container.clone()).or_default();
        if *held >= IDS_PER_CONTAINER {
            self.ids.get_mut(&id).expect("checked").state = State::Closed;
            let ev = CmRecord::event(event::REJECTED, id, reject_reason::CONSUMER_DEFINED);
            self.emit(id, ev);
            return Ok(CmRecord::default());
        }
        *held += 1;
        let child = loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.ids.contains_key(&self.next_id) {
                break self.next_id;
            }
        };
        let passive_local = SocketAddrV4::new(l.own_ip, remote.port());
        let active_addr = SocketAddrV4::new(own_ip, local.port());
        let child_id = CmId {
            channel: l.channel,
            container: l.container.clone(),
            tenant: l.tenant.clone(),
            own_ip: l.own_ip,
            ps: l.ps,
            state: State::Requested,
            local: Some(passive_local),
            remote: Some(active_addr),
            peer: Some(id),
            far: None,
            listener: Some(lid),
            backlog: 0,
            waiting: 0,
        };
        if let Some(conn) = self.conns.get_mut(&l.channel) {
            conn.ids.insert(child);
        }
        self.ids.insert(child, child_id);
        self.ids.get_mut(&lid).expect("listener").waiting += 1;
        let active = self.ids.get_mut(&id).expect("checked");
        active.state = State::Connecting;
        active.peer = Some(child);
        // The passive side sees the active side's resources from its own point of view.
        let mut ev = CmRecord::event(event::CONNECT_REQUEST, child, 0);
        ev.other_id = lid;
        ev.qpn = req.qpn;
        ev.conn = swapped(req.conn);
        ev.private_data = req.private_data.clone();
        self.emit(child, ev);
        Ok(CmRecord::default())
    }

    /// Ends a passive id's count in its listener's backlog.
    fn leave_backlog(&mut self, id: u32) {
        let Some(lid) = self.ids.get_mut(&id).and_then(|c| c.listener.take()) else {
            return;
        };
        if let Some(l) = self.ids.get_mut(&lid) {
            l.waiting = l.waiting.saturating_sub(1);
        }
    }

    fn accept(&mut self, id: u32, req: &CmRecord) -> Reply {
        let cm = &self.ids[&id];
        if req.private_data.len() > private_data_limit_of(cm.ps, true) {
            return Err(libc::EINVAL);
        }
        if cm.state != State::Requested {
            return Err(libc::EINVAL);
        }
        let peer = cm.peer;
        let datagram = is_datagram(cm.ps);
        self.leave_backlog(id);
        if let Some((host, active)) = self.ids[&id].far {
            let passive = self.ids.get_mut(&id).expect("checked");
            if datagram {
                // Nothing follows a UD answer: the id forgets the other side.
                passive.state = State::Datagram;
                passive.far = None;
            } else {
                passive.state = State::Accepted;
            }
            let msg = CmPeerMsg {
                op: CmOp::Accept as u16,
                qpn: req.qpn,
                conn: conn_bytes(req.conn),
                private_data: req.private_data.clone(),
                ..peer_msg(id, active)
            };
            self.peer_out.push((host, msg));
            return Ok(CmRecord::default());
        }
        let peer = peer.filter(|p| {
            self.ids
                .get(p)
                .is_some_and(|a| a.state == State::Connecting && a.peer == Some(id))
        });
        let Some(active) = peer else {
            // The active side went away in between.
            self.ids.get_mut(&id).expect("checked").state = State::Closed;
            self.emit(
                id,
                CmRecord::event(event::CONNECT_ERROR, id, -libc::ECONNRESET),
            );
            return Ok(CmRecord::default());
        };
        if datagram {
            // The active side learns the passive QP (ESTABLISHED with the UD parameters, as
            // after a SIDR reply); the two ids are unlinked.
            for (side, state) in [(id, State::Datagram), (active, State::Datagram)] {
                let cm = self.ids.get_mut(&side).expect("both sides");
                cm.state = state;
                cm.peer = None;
            }
            let mut ev = CmRecord::event(event::ESTABLISHED, active, 0);
            ev.qpn = req.qpn;
            ev.private_data = req.private_data.clone();
            self.emit(active, ev);
            return Ok(CmRecord::default());
        }
        self.ids.get_mut(&id).expect("checked").state = State::Accepted;
        self.ids.get_mut(&active).expect("peer").state = State::Responded;
        let mut ev = CmRecord::event(event::CONNECT_RESPONSE, active, 0);
        ev.qpn = req.qpn;
        ev.conn = swapped(req.conn);
        ev.private_data = req.private_data.clone();
        self.emit(active, ev);
        Ok(CmRecord::default())
    }

    fn reject(&mut self, id: u32, req: &CmRecord) -> Reply {
        if req.private_data.len() > private_data_limit::REJECT {
            return Err(libc::EINVAL);
        }
        let cm = &self.ids[&id];
        if cm.state != State::Requested {
            return Err(libc::EINVAL);
        }
        let peer = cm.peer;
        self.leave_backlog(id);
        let cm = self.ids.get_mut(&id).expect("checked");
        cm.state = State::Closed;
        cm.peer = None;
        if let Some((host, active)) = cm.far.take() {
            let msg = CmPeerMsg {
                op: CmOp::Reject as u16,
                status: reject_reason::CONSUMER_DEFINED,
                private_data: req.private_data.clone(),
                ..peer_msg(id, active)
            };
            self.peer_out.push((host, msg));
            return Ok(CmRecord::default());
        }
        if let Some(active) = peer.filter(|p| self.ids.get(p).is_some_and(|a| a.peer == Some(id))) {
            let a = self.ids.get_mut(&active).expect("peer");
            a.state = State::Closed;
            a.peer = None;
            let mut ev = CmRecord::event(event::REJECTED, active, reject_reason::CONSUMER_DEFINED);
            ev.private_data = req.private_data.clone();
            self.emit(active, ev);
        }
        Ok(CmRecord::default())
    }

    fn establish(&mut self, id: u32) -> Reply {
        let cm = &self.ids[&id];
        // The passive side went away between its accept and this Establish (a server that
        // accepts and exits at once, or its router lost): the id already has its DISCONNECTED
        // event, behind the CONNECT_RESPONSE. As with a real CM, whose RTU goes out regardless,
        // the connection completes and then ends; refusing made the program's connect fail
        // with EINVAL. Nothing changes here: the id stays disconnected.
        if cm.state == State::Disconnected {
            return Ok(CmRecord::default());
        }
        if cm.state != State::Responded {
            return Err(libc::EINVAL);
        }
        let peer = cm.peer;
        let far = cm.far;
        self.ids.get_mut(&id).expect("checked").state = State::Established;
        if let Some((host, passive)) = far {
            let msg = CmPeerMsg {
                op: CmOp::Establish as u16,
                ..peer_msg(id, passive)
            };
            self.peer_out.push((host, msg));
            return Ok(CmRecord::default());
        }
        match peer.filter(|p| self.ids.get(p).is_some_and(|c| c.state == State::Accepted)) {
            Some(passive) => {
                self.ids.get_mut(&passive).expect("peer").state = State::Established;
                self.established += 1;
                self.emit(passive, CmRecord::event(event::ESTABLISHED, passive, 0));
                Ok(CmRecord::default())
            }
            None => {
                // The passive side went away after accepting: the connection is down.
                self.ids.get_mut(&id).expect("checked").state = State::Disconnected;
                self.emit(id, CmRecord::event(event::DISCONNECTED, id, 0));
                Ok(CmRecord::default())
            }
        }
    }

    fn disconnect(&mut self, id: u32) -> Reply {
        let cm = &self.ids[&id];
        match cm.state {
            State::Established | State::Accepted | State::Responded => {}
            State::Disconnected => return Ok(CmRecord::default()),
            _ => return Err(libc::EINVAL),
        }
        let peer = cm.peer;
        if let Some((host, other)) = cm.far {
            let msg = CmPeerMsg {
                op: CmOp::Disconnect as u16,
                ..peer_msg(id, other)
            };
            self.peer_out.push((host, msg));
        }
        self.ids.get_mut(&id).expect("checked").state = State::Disconnected;
        self.emit(id, CmRecord::event(event::DISCONNECTED, id, 0));
        if let Some(p) = peer {
            self.peer_lost(p, id);
        }
        Ok(CmRecord::default())
    }

    /// `peer`'s connection to `gone` ended (disconnect or destroy): it gets the event its
    /// state calls for.
    fn peer_lost(&mut self, peer: u32, gone: u32) {
        let Some(p) = self.ids.get_mut(&peer) else {
            return;
        };
        if p.peer != Some(gone) {
            return;
        }
        let (next, ev) = match p.state {
            State::Established | State::Accepted | State::Responded => (
                State::Disconnected,
                CmRecord::event(event::DISCONNECTED, peer, 0),
            ),
            State::Connecting => (
                State::Closed,
                CmRecord::event(event::REJECTED, peer, reject_reason::CONSUMER_DEFINED),
            ),
            // A request not answered yet: its accept will fail (CONNECT_ERROR).
            State::Requested => {
                p.peer = None;
                return;
            }
            _ => return,
        };
        p.state = next;
        self.emit(peer, ev);
    }

    /// Destroys `id`: its port, its listener, its count in a backlog; the peer is told.
    fn destroy(&mut self, id: u32) {
        self.leave_backlog(id);
        let Some(cm) = self.ids.remove(&id) else {
            return;
        };
        if let Some(key) = cm.bound_key() {
            if self.bound.get(&key) == Some(&id) {
                self.bound.remove(&key);
            }
        }
        self.listeners.remove(&id);
        if let Some(n) = self.per_container.get_mut(&cm.container) {
            *n = n.saturating_sub(1);
        }
        if let Some(conn) = self.conns.get_mut(&cm.channel) {
            conn.ids.remove(&id);
        }
        if let Some((host, other)) = cm.far {
            if !matches!(cm.state, State::Disconnected | State::Closed) {
                let msg = CmPeerMsg {
                    op: CmOp::Disconnect as u16,
                    ..peer_msg(id, other)
                };
                self.peer_out.push((host, msg));
            }
        }
        if let Some(peer) = cm.peer {
            if cm.state != State::Disconnected {
                // An id destroyed while connected or connecting disconnects or rejects.
                self.peer_lost(peer, id);
            } else if let Some(p) = self.ids.get_mut(&peer) {
                if p.peer == Some(id) {
                    p.peer = None;
                }
            }
        }
    }
}

impl CmService {
    /// A step of a connection from `host`'s router. A peer speaks for its own host only: the
    /// connect's source must be a container registered on `host`, and every other step must
    /// name an id whose other side is on `host`.
    /// Hosts whose routers hold the other side of one of our ids.
    pub fn far_hosts(&self) -> HashSet<Ipv4Addr> {
        self.ids
            .values()
            .filter_map(|c| c.far.map(|(host, _)| host))
            .collect()
    }

    /// `host`'s router went away (its peer connection closed): every id connected with it ends
    /// as with a real CM whose peer stops answering. Connected ids get DISCONNECTED, a connect
    /// in progress UNREACHABLE (-ETIMEDOUT), and a request not accepted yet loses its other side
    /// (its accept fails). Returns how many ids it ended.
    pub fn on_peer_lost(&mut self, host: Ipv4Addr) -> usize {
        let ids: Vec<u32> = self
            .ids
            .iter()
            .filter(|(_, c)| c.far.is_some_and(|(h, _)| h == host))
            .map(|(&id, _)| id)
            .collect();
        for &id in &ids {
            let cm = self.ids.get_mut(&id).expect("listed above");
            cm.far = None;
            let ev = match cm.state {
                State::Established | State::Accepted | State::Responded => {
                    cm.state = State::Disconnected;
                    CmRecord::event(event::DISCONNECTED, id, 0)
                }
                State::Connecting => {
                    cm.state = State::Closed;
                    CmRecord::event(event::UNREACHABLE, id, -libc::ETIMEDOUT)
                }
                _ => continue,
            };
            self.emit(id, ev);
        }
        if !ids.is_empty() {
            log::warn!(
                "rdma_cm: router {host} went away; ended {} ids connected with it",
                ids.len()
            );
        }
        ids.len()
    }

    pub fn on_peer(
        &mut self,
        host: Ipv4Addr,
        msg: CmPeerMsg,
        table: &HashMap<NetnsId, ContainerEntry>,
    ) {
        let op = CmOp::try_from(msg.op).ok();
        if op == Some(CmOp::Connect) {
            return self.peer_connect(host, msg, table);
        }
        let target = match msg.to_id {
            0 => self
                .ids
                .iter()
                .find(|(_, c)| c.far == Some((host, msg.from_id)))
                .map(|(&k, _)| k),
            to => Some(to).filter(|t| {
                self.ids
                    .get(t)
                    .is_some_and(|c| c.far.is_some_and(|(h, _)| h == host))
            }),
        };
        let Some(id) = target else {
            log::info!(
                target: &format!("cm peer {host}"),
                "rdma_cm: router {host} named id {} that is not connected to it",
                msg.to_id
            );
            return;
        };
        let cm = self.ids.get_mut(&id).expect("found");
        let from_ok = cm
            .far
            .is_some_and(|(_, other)| other == msg.from_id || other == 0);
        match (op, cm.state) {
            (Some(CmOp::Accept), State::Connecting) if is_datagram(cm.ps) => {
                // A UD answer from the other host: ESTABLISHED with the passive QP, and no
                // connection left between the routers.
                cm.far = None;
                cm.state = State::Datagram;
                let mut ev = CmRecord::event(event::ESTABLISHED, id, 0);
                ev.qpn = msg.qpn;
                ev.private_data = msg.private_data;
                self.emit(id, ev);
            }
            (Some(CmOp::Accept), State::Connecting) => {
                cm.far = Some((host, msg.from_id));
                cm.state = State::Responded;
                let mut ev = CmRecord::event(event::CONNECT_RESPONSE, id, 0);
                ev.qpn = msg.qpn;
                ev.conn = swapped(conn_from(msg.conn));
                ev.private_data = msg.private_data;
                self.emit(id, ev);
            }
            (Some(CmOp::Reject), State::Connecting) => {
                cm.state = State::Closed;
                cm.far = None;
                let kind = match msg.status < 0 {
                    true => event::UNREACHABLE,
                    false => event::REJECTED,
                };
                let mut ev = CmRecord::event(kind, id, msg.status);
                ev.private_data = msg.private_data;
                self.emit(id, ev);
            }
            (Some(CmOp::Establish), State::Accepted) if from_ok => {
                cm.state = State::Established;
                self.established += 1;
                self.emit(id, CmRecord::event(event::ESTABLISHED, id, 0));
            }
            (Some(CmOp::Disconnect), state) if from_ok => {
                let (next, ev) = match state {
                    State::Established | State::Accepted | State::Responded => (
                        State::Disconnected,
                        CmRecord::event(event::DISCONNECTED, id, 0),
                    ),
                    State::Connecting => (
                        State::Closed,
                        CmRecord::event(event::REJECTED, id, reject_reason::CONSUMER_DEFINED),
                    ),
                    _ => {
                        // A request not answered yet: its accept fails (CONNECT_ERROR).
                        cm.far = None;
                        return;
                    }
                };
                cm.state = next;
                self.emit(id, ev);
            }
            _ => {}
        }
    }

    /// A connect from another host: to a listener of ours, for a source of that host.
    fn peer_connect(
        &mut self,
        host: Ipv4Addr,
        msg: CmPeerMsg,
        table: &HashMap<NetnsId, ContainerEntry>,
    ) {
        let refuse = |status: i32| {
            (
                host,
                CmPeerMsg {
                    op: CmOp::Reject as u16,
                    status,
                    ..peer_msg(0, msg.from_id)
                },
            )
        };
        let tenant = self.network.as_ref().and_then(|n| {
            n.overlay
                .iter()
                .find(|e| e.ip == *msg.src.ip() && e.host_ip == host)
                .map(|e| e.tenant.clone())
        });
        let Some(tenant) = tenant else {
            log::info!(
                target: &format!("cm peer {host}"),
                "rdma_cm: router {host} connected from {}, which is not one of its containers",
                msg.src
            );
            return;
        };
        if Self::find_container(table, &tenant, *msg.dst.ip()).is_none()
            || msg.private_data.len() > private_data_limit_of(msg.ps, false)
        {
            let r = refuse(-libc::EHOSTUNREACH);
            return self.peer_out.push(r);
        }
        let key = PortKey {
            tenant,
            ip: *msg.dst.ip(),
            ps: msg.ps,
            port: msg.dst.port(),
        };
        let listener = self
            .bound
            .get(&key)
            .copied()
            .filter(|l| self.listeners.contains(l));
        let Some(lid) = listener else {
            let r = refuse(reject_reason::INVALID_SERVICE_ID);
            return self.peer_out.push(r);
        };
        let l = &self.ids[&lid];
        if l.waiting >= l.backlog {
            let r = refuse(-libc::ETIMEDOUT);
            return self.peer_out.push(r);
        }
        let held = self.per_container.entry(l.container.clone()).or_default();
        if *held >= IDS_PER_CONTAINER {
            let r = refuse(reject_reason::CONSUMER_DEFINED);
            return self.peer_out.push(r);
        }
        *held += 1;
        let child = loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.ids.contains_key(&self.next_id) {
                break self.next_id;
            }
        };
        let child_id = CmId {
            channel: l.channel,
            container: l.container.clone(),
            tenant: l.tenant.clone(),
            own_ip: l.own_ip,
            ps: l.ps,
            state: State::Requested,
            local: Some(SocketAddrV4::new(l.own_ip, msg.dst.port())),
            remote: Some(msg.src),
            peer: None,
            far: Some((host, msg.from_id)),
            listener: Some(lid),
            backlog: 0,
            waiting: 0,
        };
        if let Some(conn) = self.conns.get_mut(&l.channel) {
            conn.ids.insert(child);
        }
        self.ids.insert(child, child_id);
        self.ids.get_mut(&lid).expect("listener").waiting += 1;
        let mut ev = CmRecord::event(event::CONNECT_REQUEST, child, 0);
        ev.other_id = lid;
        ev.qpn = msg.qpn;
        ev.conn = swapped(conn_from(msg.conn));
        ev.private_data = msg.private_data;
        self.emit(child, ev);
    }
}

/// A step from our id `from` to the other router's id `to`, the rest empty.
fn peer_msg(from: u32, to: u32) -> CmPeerMsg {
    CmPeerMsg {
        op: 0,
        from_id: from,
        to_id: to,
        src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        dst: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        ps: 0,
        qpn: 0,
        conn: [0; 6],
        status: 0,
        private_data: Vec::new(),
    }
}

fn conn_bytes(c: ConnParams) -> [u8; 6] {
    [
        c.responder_resources,
        c.initiator_depth,
        c.flow_control,
        c.retry_count,
        c.rnr_retry_count,
        c.srq,
    ]
}

fn conn_from(b: [u8; 6]) -> ConnParams {
    ConnParams {
        responder_resources: b[0],
        initiator_depth: b[1],
        flow_control: b[2],
        retry_count: b[3],
        rnr_retry_count: b[4],
        srq: b[5],
    }
}

/// Connection parameters as the other side sees them: what one side offers as initiator the
/// other has as responder.
fn swapped(c: ConnParams) -> ConnParams {
    ConnParams {
        responder_resources: c.initiator_depth,
        initiator_depth: c.responder_resources,
        ..c
    }
}

/// A channel's token: 64 bits from the kernel's random source.
fn random_token() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        // Tokens only stop another process of the same container from guessing; the
        // container check is the boundary. A clock value still differs per channel.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return now.as_nanos() as u64;
    }
    u64::from_ne_bytes(b)
}

#[cfg(test)]
mod tests;
