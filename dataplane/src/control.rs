//! The router's control thread: accepts shims on `router.sock` and runs the attach handshake,
//! answers the control socket `router.ctl` (its requests: `requests`), and turns SIGTERM into a
//! clean shutdown. It blocks in poll(2) and never touches a shard's rings: shards get work
//! through their inboxes.

use crate::admission::{self, Pending, PendingHandshakes, Source};
use crate::attachment::Attachment;
use crate::cm::CmService;
use crate::shard::{AttachedTable, ShardCommand, ShardHandle};
use crate::sys;
use crate::tcp::{
    Caller, ConnectJob, Deferred, Setup, SetupReturn, SetupReturns, ShardConnect, TcpService,
};
use freeflow_os::poll::{self, PollFd};
use freeflow_os::signals;
use freeflow_proto::attach::{Hello, HelloError, Refusal, ShimKind, Welcome, HELLO_LEN};
use freeflow_proto::control::{AttachedStatus, ContainerEntry, ServedTable};
use freeflow_proto::fdpass;
use freeflow_proto::identity::NetnsId;
use freeflow_proto::sockmsg::{SockNotice, SockOp, SockReply, SockRequest, SOCKMSG_LEN};
use freeflow_proto::RingGeometry;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod requests;

/// How long one control-socket exchange may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests of one socket shim served per readiness of its connection at most.
const SHIM_REQUESTS_PER_WAKE: usize = 64;
/// Replies kept for a socket shim whose connection is full, at most: one from serving (no
/// request is read while any waits) and the deferred answers of its resolves. Beyond, the
/// process is not reading its replies and is dropped.
const MAX_OUTBOX: usize = 1024;

/// A socket shim (TCP mode): served by this thread, not by a shard, because its requests are
/// connection setup with sockets passed back, not ring traffic.
struct SocketShim {
    /// Shared with the shards serving its connects (they send those replies).
    conn: Arc<OwnedFd>,
    container: ContainerEntry,
    pid: i32,
    /// Notices to this process are being skipped (it does not read them); it was told to
    /// forget what it knew.
    notice_gap: bool,
    /// The size of the router's send buffer on `conn` (read once at attach: the router never
    /// changes it, and the process cannot), for [`notice_step`].
    send_capacity: Option<usize>,
    /// Replies that did not fit in its connection, in order: sent when it has room; until then
    /// its requests are not read (its threads wait, the router does not).
    outbox: VecDeque<(SockReply, Option<OwnedFd>)>,
}

/// What to do with a notice for a process whose connection holds `unread` of `capacity` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoticeStep {
    Send,
    /// Tell it to forget everything and skip notices from now on: a skipped notice may be
    /// the one that overrides what it was told earlier (host ports are reused).
    ForgetAllAndSkip,
    Skip,
}

/// Notices are an optimisation; replies must always have room. A process that does not read
/// its notices is skipped from 3/8 of its socket buffer until it has read down to 1/8.
fn notice_step(gap: bool, unread: usize, capacity: usize) -> NoticeStep {
    match (gap, unread) {
        (false, u) if u < capacity / 8 * 3 => NoticeStep::Send,
        (false, _) => NoticeStep::ForgetAllAndSkip,
        (true, u) if u < capacity / 8 => NoticeStep::Send,
        (true, _) => NoticeStep::Skip,
    }
}

pub struct ControlThread {
    pub attach_listener: OwnedFd,
    pub control_listener: std::os::unix::net::UnixListener,
    pub signals: OwnedFd,
    pub shards: Vec<ShardHandle>,
    pub attached: AttachedTable,
    pub geometry: RingGeometry,
    pub started: Instant,
    /// The containers and the cluster the daemon pushed (full tables and deltas).
    served: ServedTable,
    /// Table pushes accepted since the start.
    pushes: u64,
    /// Handshakes in progress, each source within its share (see crate::admission).
    pending: PendingHandshakes,
    socket_shims: HashMap<u32, SocketShim>,
    tcp: TcpService,
    /// Connects the shards give back (crate::tcp::dispatch); `None` when connects are served
    /// on this thread (the default: see [`connects_on_shards`]), or if its doorbell could not
    /// be made.
    setup_returns: Option<Arc<SetupReturns>>,
    /// Shards handed connects since their doorbell last rang: rung once per turn, after the
    /// turn's requests (a batch per ring).
    shards_to_ring: Vec<bool>,
    /// The shard the next connect goes to (round robin).
    next_connect_shard: usize,
    /// The connection manager (rdma_cm) and its processes' connections.
    cm: CmService,
    next_id: u32,
    accepted: u64,
    refused: u64,
    /// After activity, the loop polls without sleeping for this long: connection setup is a
    /// burst of requests, and waking a sleeping thread costs more than the work.
    spin: Duration,
    last_activity: Instant,
}

impl ControlThread {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        attach_listener: OwnedFd,
        control_listener: std::os::unix::net::UnixListener,
        signals: OwnedFd,
        shards: Vec<ShardHandle>,
        attached: AttachedTable,
        geometry: RingGeometry,
        spin: Duration,
    ) -> ControlThread {
        ControlThread {
            attach_listener,
            control_listener,
            signals,
            shards,
            attached,
            geometry,
            started: Instant::now(),
            served: ServedTable::default(),
            pushes: 0,
            pending: PendingHandshakes::default(),
            socket_shims: HashMap::new(),
            tcp: TcpService::default(),
            setup_returns: match connects_on_shards() {
                false => None,
                true => match SetupReturns::new() {
                    Ok(returns) => Some(Arc::new(returns)),
                    Err(e) => {
                        log::warn!("tcp: connects served on the control thread (no doorbell: {e})");
                        None
                    }
                },
            },
            shards_to_ring: Vec::new(),
            next_connect_shard: 0,
            cm: CmService::default(),
            next_id: 1,
            accepted: 0,
            refused: 0,
            spin,
            last_activity: Instant::now(),
        }
    }

    /// Waits for readiness of the control loop's descriptors, in this order: the signalfd, the
    /// attach and control listeners, pending handshakes, the socket shims of `shim_ids`, then
    /// the TCP service's descriptors. Returns the revents of each (all 0 if a signal interrupted
    /// the wait) and the TCP service's descriptors, in order.
    fn wait_ready(
        &self,
        shim_ids: &[u32],
        timeout: Option<Duration>,
    ) -> io::Result<(Vec<i16>, Vec<RawFd>, Vec<u32>)> {
        let tcp_fds = self.tcp.poll_fds();
        let cm_fds = self.cm.poll_fds();
        let readable = [
            self.signals.as_fd(),
            self.attach_listener.as_fd(),
            self.control_listener.as_fd(),
        ]
        .into_iter()
        .chain(self.pending.conns())
        .map(|fd| PollFd::new(fd, libc::POLLIN));
        // A shim with replies waiting is woken by room for them, not by its requests.
        let shims = shim_ids.iter().map(|id| {
            let shim = &self.socket_shims[id];
            let events = match shim.outbox.is_empty() {
                true => libc::POLLIN,
                false => libc::POLLOUT,
            };
            PollFd::new(shim.conn.as_fd(), events)
        });
        let mut fds: Vec<PollFd<'_>> = readable
            .chain(shims)
            .chain(tcp_fds.iter().map(|&(fd, events)| PollFd::new(fd, events)))
            .chain(
                cm_fds
                    .iter()
                    .map(|&(_, fd, events)| PollFd::new(fd, events)),
            )
            .chain(
                self.setup_returns
                    .iter()
                    .map(|r| PollFd::new(r.bell.as_fd(), libc::POLLIN)),
            )
            .collect();
        let revents = match poll::poll(&mut fds, timeout) {
            Ok(_) => fds.iter().map(PollFd::revents).collect(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => vec![0; fds.len()],
            Err(e) => return Err(e),
        };
        Ok((
            revents,
            tcp_fds.iter().map(|(fd, _)| fd.as_raw_fd()).collect(),
            cm_fds.iter().map(|&(id, _, _)| id).collect(),
        ))
    }

    /// Serves until a termination signal or a shutdown request.
    pub fn run(&mut self) -> io::Result<()> {
        sys::raise_fd_limit();
        loop {
            let now = Instant::now();
            self.expire_pending(now);
            let timeout = self
                .pending
                .next_deadline()
                .map(|d| d.saturating_duration_since(now))
                .into_iter()
                .chain(crate::log::tick())
                .map(|d| d.as_millis() as i32 + 1)
                .chain(self.tcp.next_timeout_ms(now))
                .chain(self.cm.next_timeout_ms(now))
                .min()
                .unwrap_or(-1);
            let timeout = if now.duration_since(self.last_activity) < self.spin {
                0
            } else {
                timeout
            };
            let shim_ids: Vec<u32> = self.socket_shims.keys().copied().collect();
            let shims_at = 3 + self.pending.len();
            let tcp_at = shims_at + shim_ids.len();
            let timeout = u64::try_from(timeout).ok().map(Duration::from_millis);
            let (revents, tcp_fds, cm_conns) = self.wait_ready(&shim_ids, timeout)?;
            let cm_at = tcp_at + tcp_fds.len();
            if revents.iter().any(|&r| r != 0) {
                self.last_activity = Instant::now();
            }
            // Peer routers first (announcements that pending resolves wait for), then the
            // socket shims' requests, then deferred answers.
            let mut deferred = Deferred::new();
            for (i, &fd) in tcp_fds.iter().enumerate() {
                if revents[tcp_at + i] != 0 {
                    self.tcp.on_ready(fd, revents[tcp_at + i], &mut deferred);
                }
            }
            for (i, &id) in shim_ids.iter().enumerate() {
                if revents[shims_at + i] != 0 {
                    self.serve_socket_shim(id);
                }
            }
            self.ring_shards();
            if revents.get(cm_at + cm_conns.len()).is_some_and(|&r| r != 0) {
                self.take_setup_returns();
            }
            for (i, &id) in cm_conns.iter().enumerate() {
                if revents[cm_at + i] != 0 {
                    let gone = self
                        .cm
                        .on_ready(id, revents[cm_at + i], &self.served.containers);
                    self.forget_attached(&gone);
                }
            }
            // rdma_cm steps from other hosts' routers, then ours for them.
            for (host, msg) in std::mem::take(&mut self.tcp.cm_inbox) {
                self.cm.on_peer(host, msg, &self.served.containers);
            }
            for (host, msg) in std::mem::take(&mut self.cm.peer_out) {
                self.tcp.send_cm(host, msg);
            }
            self.end_cm_of_lost_peers();
            // Notices first: a listener's process may be about to accept.
            self.send_notices();
            self.tcp.tick(&mut deferred);
            for (id, reply) in deferred {
                self.reply_socket_shim(id, reply, None);
            }
            self.send_notices();
            if revents[0] != 0 {
                if let Ok(Some(sig)) = signals::read_one(self.signals.as_fd()) {
                    log::info!("signal {sig}, shutting down");
                    return Ok(());
                }
            }
            // Handshakes first (indices shift as they are removed: walk backwards).
            for i in (0..self.pending.len()).rev() {
                if revents[3 + i] != 0 {
                    let pending = self.pending.take(i);
                    self.handshake(pending);
                }
            }
            if revents[1] != 0 {
                self.accept_shims();
            }
            if revents[2] != 0 && self.serve_control()? {
                log::info!("shutdown requested");
                return Ok(());
            }
            // After the daemon's pushes: addresses that ids wait for may be known now.
            self.cm
                .retry_resolves(&self.served.containers, Instant::now());
        }
    }

    fn expire_pending(&mut self, now: Instant) {
        let mut expired: HashMap<Source, usize> = HashMap::new();
        for pending in self.pending.expire(now) {
            *expired.entry(pending.source).or_default() += 1;
        }
        for (source, n) in expired {
            self.refused += n as u64;
            let from = self.describe(source);
            log::warn!(
                target: &format!("no hello from {source}"),
                "dropped {n} connection(s) from {from} that sent no hello in time"
            );
        }
    }

    /// Who `source` is, for the log: the container's name if it is still registered.
    fn describe(&self, source: Source) -> String {
        match source {
            Source::Registered(ns) => match self.served.containers.get(&ns) {
                Some(c) => format!("container {}", c.name),
                None => format!("{source} (unregistered since)"),
            },
            Source::Unregistered => source.to_string(),
        }
    }

    fn accept_shims(&mut self) {
        // Accept everything waiting, bounded so a flood cannot starve the rest of the loop.
        for _ in 0..64 {
            match fdpass::accept_unix(self.attach_listener.as_fd()) {
                Ok(conn) => self.admit(conn),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("accept on router.sock: {e}");
                    return;
                }
            }
        }
    }

    /// Identifies the caller of a new connection (the kernel knows it from the connect on) and
    /// runs its handshake, which waits among its source's pending ones if the hello has not
    /// come yet. An unregistered caller is not refused before its hello: the refusal would
    /// make the shim's hello fail (EPIPE) and it would never read why.
    fn admit(&mut self, conn: OwnedFd) {
        let (pid, netns) = match identify(&conn) {
            Ok(who) => who,
            Err(message) => {
                return self.refuse(&conn, Source::Unregistered, Refusal::Internal, message)
            }
        };
        let source = match self.served.containers.contains_key(&netns) {
            true => Source::Registered(netns),
            false => Source::Unregistered,
        };
        self.handshake(Pending {
            conn,
            source,
            pid,
            netns,
            deadline: Instant::now() + admission::HELLO_DEADLINE,
        });
    }

    /// Refuses an attach. Logged rate-limited per source and reason (crate::log), so a flood
    /// neither grows the log nor hides other sources' refusals.
    fn refuse(&mut self, conn: &OwnedFd, source: Source, reason: Refusal, message: String) {
        self.refused += 1;
        log::warn!(
            target: &format!("refused {source} {reason:?}"),
            "refused attach from {} ({reason:?}): {message}",
            self.describe(source)
        );
        let _ = fdpass::send_with_fds(
            conn.as_fd(),
            &Welcome::Refused { reason, message }.encode(),
            &[],
        );
    }

    /// Runs the attach handshake on a connection whose hello is (or may be) waiting: checks
    /// the hello and who sent it, then hands the shim to this thread (socket shims) or a shard.
    fn handshake(&mut self, pending: Pending) {
        let source = pending.source;
        let Some((conn, kind, pid, netns)) = self.receive_hello(pending) else {
            return;
        };
        let Some(container) = self.served.containers.get(&netns).cloned() else {
            let message = format!(
                "pid {pid} is in network namespace net:[{}], which no registered container uses; \
                 register it with `freeflow container add`",
                netns.ino
            );
            return self.refuse(&conn, source, Refusal::NotRegistered, message);
        };
        if let Err(held) = admission::attachment_room(&self.attached, &container.name) {
            let message = format!(
                "container {} holds {held} attachments, the most one container may hold",
                container.name
            );
            return self.refuse(&conn, source, Refusal::Busy, message);
        }
        if kind == ShimKind::Socket {
            return self.adopt_socket_shim(conn, container, pid);
        }
        if matches!(kind, ShimKind::CmRequests | ShimKind::CmChannel) {
            return self.adopt_cm(conn, container, pid, kind);
        }
        self.attach_to_shard(conn, container, pid, kind);
    }

    /// Reads and checks the hello. `None` when the connection is done with (refused, gone) or
    /// back among its source's pending ones (its hello has not come yet).
    fn receive_hello(&mut self, pending: Pending) -> Option<(OwnedFd, ShimKind, i32, NetnsId)> {
        let mut buf = [0u8; HELLO_LEN + 1];
        let got = match fdpass::recv_with_fds(pending.conn.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Room for it is made in its own source's share only.
                if let Some(oldest) = self.pending.admit(pending) {
                    let message = "too many attaches in progress from here; dropped the oldest, \
                                   which sent no hello yet"
                        .into();
                    self.refuse(&oldest.conn, oldest.source, Refusal::Busy, message);
                }
                return None;
            }
            Err(_) => return None,
        };
        let Pending {
            conn,
            source,
            pid,
            netns,
            ..
        } = pending;
        if got.len == 0 && got.fds.is_empty() {
            return None; // the peer left mid-handshake
        }
        if !got.fds.is_empty() || got.truncated {
            let message = "hello must be 16 bytes and carry no fds".into();
            self.refuse(&conn, source, Refusal::Malformed, message);
            return None;
        }
        match Hello::decode(&buf[..got.len]) {
            Ok((_, kind)) => Some((conn, kind, pid, netns)),
            Err(e @ HelloError::Version { .. }) => {
                self.refuse(&conn, source, Refusal::VersionMismatch, e.to_string());
                None
            }
            Err(e) => {
                self.refuse(&conn, source, Refusal::Malformed, e.to_string());
                None
            }
        }
    }

    /// Creates the attachment's region, welcomes the shim with it and hands the attachment to
    /// a shard.
    fn attach_to_shard(
        &mut self,
        conn: OwnedFd,
        container: ContainerEntry,
        pid: i32,
        kind: ShimKind,
    ) {
        // A container's verbs attachments (all its contexts) go to the shard its address
        // picks: a function of the address alone, so that every shard finds the one serving a
        // QP's destination from its GID (crate::verbs::shard_of), with no table to share or
        // keep in step, and a container's contexts stay together. Others go to the least
        // loaded.
        let least_loaded = self
            .shards
            .iter()
            .min_by_key(|s| s.stats.attached.load(Ordering::Relaxed));
        let Some(shard) = (if kind == ShimKind::Verbs {
            self.shards
                .get(crate::verbs::shard_of(container.ip, self.shards.len()))
        } else {
            least_loaded
        }) else {
            let source = Source::Registered(container.netns);
            return self.refuse(
                &conn,
                source,
                Refusal::Internal,
                "router has no shards".into(),
            );
        };
        let (shard_index, bell) = (shard.index, shard.bell.clone());
        let id = self.allocate_id();
        let (attachment, memfd) =
            match Attachment::create(id, container.clone(), pid, kind, conn, self.geometry) {
                Ok(pair) => pair,
                Err(e) => {
                    // The connection moved into the failed call and is closed: the shim sees EOF.
                    self.refused += 1;
                    log::warn!("cannot create region for {}: {e}", container.name);
                    return;
                }
            };
        let welcome = Welcome::Accepted {
            shard: shard_index as u16,
            attachment_id: id,
            ip: container.ip,
            container: container.name.clone(),
            tenant: container.tenant.clone(),
        };
        if let Err(e) = fdpass::send_with_fds(
            attachment.conn.as_fd(),
            &welcome.encode(),
            &[memfd.as_fd(), bell.as_fd()],
        ) {
            log::warn!("welcome to pid {pid} failed: {e}");
            return;
        }
        drop(memfd);
        self.record_attached(id, &container, pid, Some(shard_index), kind.name());
        self.adopt_on_shard(shard_index, attachment, &container, pid, kind);
    }

    /// Hands a welcomed attachment to shard `shard_index`.
    fn adopt_on_shard(
        &mut self,
        shard_index: usize,
        attachment: Attachment,
        container: &ContainerEntry,
        pid: i32,
        kind: ShimKind,
    ) {
        let id = attachment.id;
        if self.shards[shard_index]
            .send(ShardCommand::Adopt(Box::new(attachment)))
            .is_err()
        {
            log::warn!("shard {shard_index} inbox full; dropping attachment {id}");
            if let Ok(mut table) = self.attached.lock() {
                table.remove(&id);
            }
            return;
        }
        self.accepted += 1;
        log::info!(
            "attached {id}: container {} (tenant {}, {}) pid {pid} as {} on shard {shard_index}",
            container.name,
            container.tenant,
            container.ip,
            kind.name()
        );
    }

    /// A fresh attachment id (never 0, wrapping).
    fn allocate_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Makes an attachment visible to `status` (and to the detach of unregistered containers).
    fn record_attached(
        &self,
        id: u32,
        container: &ContainerEntry,
        pid: i32,
        shard: Option<usize>,
        kind: &str,
    ) {
        if let Ok(mut table) = self.attached.lock() {
            let container = container.name.clone();
            table.insert(
                id,
                AttachedStatus {
                    id,
                    container,
                    pid,
                    shard,
                    kind: kind.into(),
                },
            );
        }
    }

    fn adopt_socket_shim(&mut self, conn: OwnedFd, container: ContainerEntry, pid: i32) {
        let id = self.allocate_id();
        let welcome = Welcome::Accepted {
            shard: u16::MAX,
            attachment_id: id,
            ip: container.ip,
            container: container.name.clone(),
            tenant: container.tenant.clone(),
        };
        if let Err(e) = fdpass::send_with_fds(conn.as_fd(), &welcome.encode(), &[]) {
            log::warn!("welcome to pid {pid} failed: {e}");
            return;
        }
        self.record_attached(id, &container, pid, None, ShimKind::Socket.name());
        self.accepted += 1;
        let send_capacity = sys::send_capacity(conn.as_fd()).ok();
        self.socket_shims.insert(
            id,
            SocketShim {
                conn: Arc::new(conn),
                container,
                pid,
                notice_gap: false,
                send_capacity,
                outbox: VecDeque::new(),
            },
        );
    }

    /// A connection of the connection manager (librdmacm): served by this thread, like socket
    /// shims (crate::cm).
    fn adopt_cm(&mut self, conn: OwnedFd, container: ContainerEntry, pid: i32, kind: ShimKind) {
        let id = self.allocate_id();
        let welcome = Welcome::Accepted {
            shard: u16::MAX,
            attachment_id: id,
            ip: container.ip,
            container: container.name.clone(),
            tenant: container.tenant.clone(),
        };
        if let Err(e) = fdpass::send_with_fds(conn.as_fd(), &welcome.encode(), &[]) {
            log::warn!("welcome to pid {pid} failed: {e}");
            return;
        }
        self.record_attached(id, &container, pid, None, kind.name());
        self.accepted += 1;
        self.cm.adopt(id, kind, conn, container, pid);
    }

    /// Removes attachments that are gone from the status table.
    /// Ends the rdma_cm connections with hosts whose peer connection is down: their router
    /// went away, or restarted and forgot them, and steps for them are dropped while the
    /// connection is down (TcpService::send_cm), so waiting would be a hang.
    fn end_cm_of_lost_peers(&mut self) {
        for host in self.cm.far_hosts() {
            if !self.tcp.peer_up(host) {
                self.cm.on_peer_lost(host);
            }
        }
    }

    fn forget_attached(&self, gone: &[u32]) {
        if gone.is_empty() {
            return;
        }
        if let Ok(mut table) = self.attached.lock() {
            for id in gone {
                table.remove(id);
            }
        }
    }

    fn drop_socket_shim(&mut self, id: u32, why: &str) {
        let gone = self.cm.detach(id, why);
        self.forget_attached(&gone);
        if let Some(shim) = self.socket_shims.remove(&id) {
            log::info!(
                "detached {id} (socket shim of container {}, pid {}): {why}",
                shim.container.name,
                shim.pid
            );
        }
        self.tcp.detach(id);
        if let Ok(mut table) = self.attached.lock() {
            table.remove(&id);
        }
    }

    /// Serves the requests waiting on socket shim `id`'s connection: several threads of a
    /// process may each have one outstanding. Bounded per readiness, so one process cannot keep
    /// the others waiting.
    fn serve_socket_shim(&mut self, id: u32) {
        if !self.flush_outbox(id) {
            return;
        }
        for _ in 0..SHIM_REQUESTS_PER_WAKE {
            if !self.serve_socket_request(id) {
                return;
            }
            // A reply did not fit: no more requests until the process has read it.
            if self
                .socket_shims
                .get(&id)
                .is_some_and(|s| !s.outbox.is_empty())
            {
                return;
            }
        }
    }

    /// Sends the replies waiting for room in socket shim `id`'s connection; true when none is
    /// left.
    fn flush_outbox(&mut self, id: u32) -> bool {
        let Some(shim) = self.socket_shims.get_mut(&id) else {
            return false;
        };
        let failed = loop {
            let Some((reply, socket)) = shim.outbox.front() else {
                return true;
            };
            let fds: Vec<_> = socket.iter().map(|s| s.as_fd()).collect();
            match fdpass::try_send_with_fds(shim.conn.as_fd(), &reply.encode(), &fds) {
                Ok(_) => drop(shim.outbox.pop_front()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => break e,
            }
        };
        self.drop_socket_shim(id, &format!("reply failed: {failed}"));
        false
    }

    /// Serves one request of socket shim `id`; false if none was waiting or the shim is gone.
    fn serve_socket_request(&mut self, id: u32) -> bool {
        let Some(shim) = self.socket_shims.get(&id) else {
            return false;
        };
        let mut buf = [0u8; SOCKMSG_LEN + 1];
        let got = match fdpass::recv_with_fds(shim.conn.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => {
                self.drop_socket_shim(id, "connection error");
                return false;
            }
        };
        if got.len == 0 && got.fds.is_empty() {
            self.drop_socket_shim(id, "process went away");
            return false;
        }
        let request = match SockRequest::decode(&buf[..got.len]) {
            Ok(r) => r,
            Err(e) => {
                self.drop_socket_shim(id, &format!("malformed request: {e}"));
                return false;
            }
        };
        // Only a listen carries a descriptor (the application's overlay listener), a relisten
        // two (host listener, overlay listener).
        let fds_allowed = match request.op {
            SockOp::Listen => 1,
            SockOp::Relisten => 2,
            _ => 0,
        };
        if got.truncated || got.fds.len() > fds_allowed {
            self.drop_socket_shim(id, "request carried fds or was truncated");
            return false;
        }
        let passed = got.fds.into_iter().map(sys::Untrusted::new).collect();
        // Borrowed, not cloned: the table of shims and the TCP service are separate fields.
        let served = self.tcp.serve(
            Caller {
                attachment: id,
                container: &shim.container,
            },
            request,
            passed,
        );
        self.answer(id, served);
        true
    }

    /// Answers socket shim `id` with what serving its request came to.
    fn answer(&mut self, id: u32, served: Setup) {
        match served {
            Setup::Reply((reply, socket)) => self.reply_socket_shim(id, reply, socket),
            Setup::Connect(job) => self.hand_connect(job),
            Setup::Deferred => {}
        }
    }

    /// Hands a connect's kernel work and reply to the next shard in turn (a process with many
    /// threads connecting, such as a server's client pool, is served on every core; its
    /// replies are numbered), or, without shards or room in the shard's inbox, does it here.
    fn hand_connect(&mut self, job: ConnectJob) {
        let id = job.attachment;
        let Some(shim) = self.socket_shims.get(&id) else {
            return;
        };
        let job = match (&self.setup_returns, self.shards.len()) {
            (None, _) | (_, 0) => job,
            (Some(returns), n) => {
                let index = self.next_connect_shard % n;
                self.next_connect_shard = (index + 1) % n;
                let connect = ShardConnect {
                    job,
                    conn: shim.conn.clone(),
                    returns: returns.clone(),
                };
                match self.shards[index]
                    .inbox
                    .push(ShardCommand::Connect(Box::new(connect)))
                {
                    Ok(()) => {
                        self.shards_to_ring.resize(n, false);
                        self.shards_to_ring[index] = true;
                        return;
                    }
                    Err(ShardCommand::Connect(connect)) => connect.job,
                    Err(_) => unreachable!("the inbox gives back what was pushed"),
                }
            }
        };
        let (reply, socket) = self.tcp.run_inline(job);
        self.reply_socket_shim(id, reply, socket);
    }

    /// Rings the doorbells of the shards handed connects this turn.
    fn ring_shards(&mut self) {
        for (index, due) in self.shards_to_ring.iter_mut().enumerate() {
            if std::mem::take(due) {
                if let Err(e) = self.shards[index].bell.ring() {
                    log::warn!("shard {index} doorbell: {e}");
                }
            }
        }
    }

    /// Finishes the connects the shards gave back: replies that did not fit join their
    /// process's outbox; refused connects give their port back and are answered (or tried
    /// again from a new port).
    fn take_setup_returns(&mut self) {
        let Some(returns) = self.setup_returns.clone() else {
            return;
        };
        returns.bell.drain();
        // Bounded: shards may give back more meanwhile; the doorbell rang for those.
        for _ in 0..4096 {
            let Some(item) = returns.take() else {
                break;
            };
            match item {
                SetupReturn::Unsent {
                    attachment,
                    reply,
                    socket,
                } => self.reply_socket_shim(attachment, reply, Some(socket)),
                SetupReturn::Failed(failed) => {
                    let id = failed.attachment;
                    let served = self.tcp.connect_failed(failed);
                    self.answer(id, served);
                }
            }
        }
        self.ring_shards();
    }

    /// Sends a reply, or keeps it until the process has room (its threads may have many
    /// requests outstanding, and the replies come faster than one reader takes them in).
    /// Never blocks: a process that does not read is not served until it does, and is dropped
    /// if its kept replies pile up.
    fn reply_socket_shim(&mut self, id: u32, reply: SockReply, socket: Option<OwnedFd>) {
        let Some(shim) = self.socket_shims.get_mut(&id) else {
            return;
        };
        if shim.outbox.is_empty() {
            let fds: Vec<_> = socket.iter().map(|s| s.as_fd()).collect();
            match fdpass::try_send_with_fds(shim.conn.as_fd(), &reply.encode(), &fds) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return self.drop_socket_shim(id, &format!("reply failed: {e}")),
            }
        }
        if shim.outbox.len() >= MAX_OUTBOX {
            return self.drop_socket_shim(id, "does not read its replies");
        }
        shim.outbox.push_back((reply, socket));
    }

    /// Sends the notices the TCP service queued. A notice is an optimisation (accept does a
    /// Resolve without it), so it is skipped rather than let a process that is slow to read
    /// them fill its socket (see [`notice_step`]): the rest is room for replies.
    fn send_notices(&mut self) {
        for (id, notice) in std::mem::take(&mut self.tcp.notices) {
            let Some(shim) = self.socket_shims.get_mut(&id) else {
                continue;
            };
            let unread = sys::unsent_bytes(shim.conn.as_fd());
            let step = match (unread, shim.send_capacity) {
                (Ok(unread), Some(capacity)) => notice_step(shim.notice_gap, unread, capacity),
                _ => NoticeStep::Skip,
            };
            // Stamped now: the process trusts it for a while after this, not after it reads it.
            let send = |mut n: SockNotice| {
                n.sent_ms = freeflow_proto::clock::monotonic_ms();
                fdpass::try_send_with_fds(shim.conn.as_fd(), &n.encode(), &[]).is_ok()
            };
            match step {
                NoticeStep::Send => {
                    shim.notice_gap = false;
                    if !send(notice) {
                        shim.notice_gap = true;
                        send(SockNotice::forget_all());
                    }
                }
                NoticeStep::ForgetAllAndSkip => {
                    shim.notice_gap = true;
                    send(SockNotice::forget_all());
                }
                NoticeStep::Skip => {}
            }
        }
    }
}

/// Whether connects' kernel work and replies go to the shards (`FREEFLOW_CONNECTS_ON_SHARDS=1`;
/// default: this thread does them). Not the default: measured on a loaded 2-core machine
/// (docs/tcp-setup.md), handing them to the router's one shard (pinned to one core) made a
/// connect wait for that core, and added a wake-up per batch, for requests per second within
/// the noise.
fn connects_on_shards() -> bool {
    std::env::var("FREEFLOW_CONNECTS_ON_SHARDS").is_ok_and(|v| v.trim() == "1")
}

/// The pid that connected `conn` and its network namespace, from the kernel (SO_PEERCRED, then
/// /proc/PID/ns/net); the reason as the refusal's message when either cannot be read.
fn identify(conn: &OwnedFd) -> Result<(i32, NetnsId), String> {
    let pid = fdpass::peer_credentials(conn.as_fd())
        .map_err(|e| format!("cannot identify the caller: {e}"))?
        .pid;
    let netns = NetnsId::of_peer(conn.as_fd(), pid)
        .map_err(|e| format!("cannot read the network namespace of pid {pid}: {e}"))?;
    Ok((pid, netns))
}

#[cfg(test)]
mod tests {
    use super::{notice_step, NoticeStep};

    #[test]
    fn a_process_that_does_not_read_its_notices_is_told_to_forget_then_skipped() {
        let cap = 8000;
        assert_eq!(notice_step(false, 0, cap), NoticeStep::Send);
        assert_eq!(notice_step(false, 2999, cap), NoticeStep::Send);
        assert_eq!(notice_step(false, 3000, cap), NoticeStep::ForgetAllAndSkip);
        // Skipped until it has read down to 1/8, so the forget comes before any gap.
        assert_eq!(notice_step(true, 2000, cap), NoticeStep::Skip);
        assert_eq!(notice_step(true, 999, cap), NoticeStep::Send);
        // Never beyond half: replies keep their room.
        assert_ne!(notice_step(false, cap / 2, cap), NoticeStep::Send);
    }
}
