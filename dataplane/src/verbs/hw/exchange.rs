//! Across hosts, the device path connects a container's QP to a QP of a container of another
//! host's router: the device needs the real QP number behind the destination's virtual one,
//! and the GID of the device it lives on; an RDMA WRITE or READ needs the real rkey and address
//! behind the destination container's virtual rkey. Only the destination's router knows them,
//! so the asking router asks it (as MasQ translates at connection setup): one
//! [`DeviceQuery`] on a TCP connection to its device port (the peer port +
//! [`DEVICE_PORT_OFFSET`]), one [`DeviceAnswer`] back.
//!
//! [`Exchange`] is shared by the router's shards: each shard's device path enters its device
//! QPs and regions as it makes them (by the owner's overlay address and virtual number), a
//! thread of the router answers the queries from them, and a shard asks another host's
//! router at RTR (and at a WRITE or READ whose virtual rkey it has not asked about yet on that
//! QP). Asking blocks the shard for one exchange, bounded as a whole by [`ASK_DEADLINE`]
//! (connect, query and answer together; each step waits only for the time left): a peer
//! router that is down, slow or garbled fails the RTR with an error, never a hang. A host
//! whose router did not answer in time or answered garbage (or a QP's GID that is not its
//! host's) is not asked again for [`DOWN_FOR`] (its asks fail at once): a tenant that keeps
//! connecting toward such a host cannot keep its shard blocked.
//!
//! The answering thread serves each connection on a thread of its own (at most
//! [`MAX_ANSWERING`] at once), each bounded by [`ANSWER_DEADLINE`]: a process of a registered
//! host that holds a connection open and idle delays no other asker.
//!
//! The answering router believes only what its own view of the cluster says: the connection
//! must come from a registered host's address, the source container must be one of that host's
//! (the daemon's table), and the destination QP must belong to a container of the source's
//! tenant; another tenant's QP and a QP that does not exist get the same answer
//! ([`DeviceStatus::NotFound`]). A key is answered only in the PD of the named QP.

use freeflow_proto::control::NetworkView;
use freeflow_proto::verbs::device::{
    DeviceAnswer, DeviceQuery, DeviceStatus, QueryKind, ANSWER_LEN, DEVICE_PORT_OFFSET, QUERY_LEN,
};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest one ask may block its shard: connect, write the query and read the answer
/// together (routers of one cluster answer in well under a millisecond; this leaves room for
/// a loaded host, not for a peer that trickles).
pub const ASK_DEADLINE: Duration = Duration::from_millis(200);
/// The longest the answering side gives one connection, from accept to the answer written.
pub const ANSWER_DEADLINE: Duration = Duration::from_millis(100);
/// Connections answered at once; more are closed unanswered (the asker marks the host down).
pub const MAX_ANSWERING: usize = 16;
/// How long a host whose router did not answer is taken for down.
pub const DOWN_FOR: Duration = Duration::from_secs(3);

/// A device QP others may connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExportedQp {
    real_qpn: u32,
    tenant: String,
    pd: u32,
}

/// A device region others may reach with its virtual rkey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportedKey {
    pub pd: u32,
    pub access: u32,
    pub iova: u64,
    pub length: u64,
    pub real_addr: u64,
    pub real_rkey: u32,
}

#[derive(Debug, Default)]
struct ExchangeState {
    /// By (owner's overlay address, virtual QP number).
    qps: HashMap<(Ipv4Addr, u32), ExportedQp>,
    /// By (owner's overlay address, virtual rkey).
    keys: HashMap<(Ipv4Addr, u32), ExportedKey>,
    /// Registered overlay addresses of other hosts: (host, tenant).
    overlay: HashMap<Ipv4Addr, (Ipv4Addr, String)>,
    /// Other hosts' routers: their peer ports.
    hosts: HashMap<Ipv4Addr, u16>,
    /// Where this router answers (set once it listens).
    listening: Option<SocketAddrV4>,
    /// Hosts whose router did not answer, until when they are not asked.
    down_until: HashMap<Ipv4Addr, Instant>,
}

/// Why asking another router failed.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("host {0} is not a registered host")]
    UnknownHost(Ipv4Addr),
    #[error("the router of {host} did not answer on its device port {port}: {source}")]
    Io {
        host: Ipv4Addr,
        port: u16,
        source: io::Error,
    },
    #[error("the router of {0} answered with something that is not a device answer")]
    Garbled(Ipv4Addr),
    #[error("the router of {0} answered a GID that is not its host's device's")]
    WrongGid(Ipv4Addr),
    #[error("the router of {0} did not answer a moment ago (not asked again yet)")]
    RecentlyDown(Ipv4Addr),
}

/// The device QPs and regions of this router's containers, the cluster's view, and the
/// asking side.
#[derive(Debug)]
pub struct Exchange {
    state: Mutex<ExchangeState>,
    /// The device's GID (what an answer about a QP tells).
    gid: [u8; 16],
}

impl Exchange {
    pub fn new(gid: [u8; 16]) -> Arc<Exchange> {
        Arc::new(Exchange {
            state: Mutex::new(ExchangeState::default()),
            gid,
        })
    }

    fn state(&self) -> MutexGuard<'_, ExchangeState> {
        // The state is plain maps, consistent after any panic: take it back.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn export_qp(&self, owner: Ipv4Addr, qpn: u32, real_qpn: u32, tenant: &str, pd: u32) {
        self.state().qps.insert(
            (owner, qpn),
            ExportedQp {
                real_qpn,
                tenant: tenant.to_owned(),
                pd,
            },
        );
    }

    pub fn withdraw_qp(&self, owner: Ipv4Addr, qpn: u32) {
        self.state().qps.remove(&(owner, qpn));
    }

    pub fn export_key(&self, owner: Ipv4Addr, rkey: u32, key: ExportedKey) {
        self.state().keys.insert((owner, rkey), key);
    }

    pub fn withdraw_key(&self, owner: Ipv4Addr, rkey: u32) {
        self.state().keys.remove(&(owner, rkey));
    }

    /// Follows a new view of the cluster; the first one (or one that moves this host's
    /// address or port) starts the thread that answers other routers.
    pub fn follow(self: &Arc<Self>, network: &NetworkView) {
        let port = network.peer_port.wrapping_add(DEVICE_PORT_OFFSET);
        let addr = SocketAddrV4::new(network.host_ip, port);
        let start = {
            let mut s = self.state();
            s.hosts = network
                .hosts
                .iter()
                .filter(|h| h.host_ip != network.host_ip)
                .map(|h| (h.host_ip, h.peer_port))
                .collect();
            s.overlay = network
                .overlay
                .iter()
                .filter(|e| e.host_ip != network.host_ip)
                .map(|e| (e.ip, (e.host_ip, e.tenant.clone())))
                .collect();
            let start = s.listening != Some(addr);
            if start {
                s.listening = Some(addr);
            }
            start
        };
        if !start {
            return;
        }
        match TcpListener::bind(addr) {
            Ok(listener) => {
                let me = Arc::clone(self);
                let spawned = std::thread::Builder::new()
                    .name("ff-device-x".into())
                    .spawn(move || {
                        // Started from a shard thread (at its view of the cluster): not the
                        // shard's core alone, it answers wherever the kernel finds room.
                        if let Err(e) = crate::sys::unpin_current_thread() {
                            log::warn!("RDMA device path: the device exchange stays pinned: {e}");
                        }
                        me.serve(listener, addr)
                    });
                if let Err(e) = spawned {
                    log::warn!("RDMA device path: cannot start the device exchange: {e}");
                }
            }
            Err(e) => {
                // Tried again with the next view.
                self.state().listening = None;
                log::warn!(
                    "RDMA device path: cannot listen for other routers' device queries on \
                     {addr}: {e} (QPs of other hosts cannot connect to this host's)"
                )
            }
        }
    }

    /// Answers queries on `listener` while it is where this router answers, each connection
    /// on a thread of its own (at most [`MAX_ANSWERING`] at once).
    fn serve(self: Arc<Self>, listener: TcpListener, addr: SocketAddrV4) {
        log::info!("RDMA device path: answering other routers' device queries on {addr}");
        let answering = Arc::new(AtomicUsize::new(0));
        for stream in listener.incoming() {
            if self.state().listening != Some(addr) {
                return;
            }
            let Ok(stream) = stream else {
                continue;
            };
            let accepted = Instant::now();
            if answering.fetch_add(1, Ordering::AcqRel) >= MAX_ANSWERING {
                answering.fetch_sub(1, Ordering::AcqRel);
                log::info!(
                    "RDMA device path: {MAX_ANSWERING} device queries already being answered: \
                     one closed unanswered"
                );
                continue;
            }
            let me = Arc::clone(&self);
            let count = Arc::clone(&answering);
            let spawned = std::thread::Builder::new()
                .name("ff-device-q".into())
                .spawn(move || {
                    let mut stream = stream;
                    if let Err(e) = me.answer_one(&mut stream, accepted + ANSWER_DEADLINE) {
                        log::info!("RDMA device path: a device query failed: {e}");
                    }
                    count.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                answering.fetch_sub(1, Ordering::AcqRel);
                log::warn!("RDMA device path: cannot answer a device query: {e}");
            }
        }
    }

    fn answer_one(&self, stream: &mut TcpStream, deadline: Instant) -> io::Result<()> {
        let from = match stream.peer_addr()? {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(ip) => ip,
                None => return Ok(()),
            },
        };
        let answer = if self.state().hosts.contains_key(&from) {
            let mut b = [0u8; QUERY_LEN];
            read_exact_by(stream, &mut b, deadline)?;
            match DeviceQuery::decode(&b) {
                Ok(q) => self.answer(from, &q),
                Err(e) => {
                    log::info!("RDMA device path: a device query from {from}: {e}");
                    return Ok(());
                }
            }
        } else {
            // Not a router of the cluster: nothing read, nothing told.
            DeviceAnswer::empty(DeviceStatus::Refused)
        };
        write_all_by(stream, &answer.encode(), deadline)
    }

    /// The answer to `q`, asked by the router of host `from`.
    pub fn answer(&self, from: Ipv4Addr, q: &DeviceQuery) -> DeviceAnswer {
        let s = self.state();
        let tenant = match s.overlay.get(&q.src_ip) {
            Some((host, tenant)) if *host == from => tenant,
            _ => return DeviceAnswer::empty(DeviceStatus::Refused),
        };
        let Some(qp) = s
            .qps
            .get(&(q.dst_ip, q.dst_qpn))
            .filter(|qp| qp.tenant == *tenant)
        else {
            return DeviceAnswer::empty(DeviceStatus::NotFound);
        };
        match q.kind {
            QueryKind::Qp => DeviceAnswer {
                real_qpn: qp.real_qpn,
                gid: self.gid,
                ..DeviceAnswer::empty(DeviceStatus::Found)
            },
            QueryKind::Key => match s.keys.get(&(q.dst_ip, q.rkey)).filter(|k| k.pd == qp.pd) {
                Some(k) => DeviceAnswer {
                    real_rkey: k.real_rkey,
                    iova: k.iova,
                    length: k.length,
                    real_addr: k.real_addr,
                    access: k.access,
                    ..DeviceAnswer::empty(DeviceStatus::Found)
                },
                None => DeviceAnswer::empty(DeviceStatus::NotFound),
            },
        }
    }

    /// Asks the router of `host` (blocking, bounded by [`ASK_DEADLINE`] as a whole); a router
    /// that does not answer in time, answers garbage or, about a QP, a GID other than its
    /// host's IPv4-mapped one, is not asked again for [`DOWN_FOR`].
    pub fn ask(&self, host: Ipv4Addr, q: &DeviceQuery) -> Result<DeviceAnswer, AskError> {
        let peer_port = {
            let mut s = self.state();
            let port = *s.hosts.get(&host).ok_or(AskError::UnknownHost(host))?;
            match s.down_until.get(&host) {
                Some(until) if Instant::now() < *until => return Err(AskError::RecentlyDown(host)),
                Some(_) => {
                    s.down_until.remove(&host);
                }
                None => {}
            }
            port
        };
        let asked = self
            .ask_once(host, peer_port, q, Instant::now() + ASK_DEADLINE)
            .and_then(|a| self.check_answer(host, q, a));
        if asked.is_err() {
            self.state()
                .down_until
                .insert(host, Instant::now() + DOWN_FOR);
        }
        asked
    }

    /// A QP's answer must name the device of the host asked: RoCE v2's IPv4-mapped GID of
    /// that host's address (what a device bound to it has), never this host's own device.
    fn check_answer(
        &self,
        host: Ipv4Addr,
        q: &DeviceQuery,
        answer: DeviceAnswer,
    ) -> Result<DeviceAnswer, AskError> {
        if q.kind == QueryKind::Qp
            && answer.status == DeviceStatus::Found
            && (answer.gid != ipv4_mapped_gid(host) || answer.gid == self.gid)
        {
            return Err(AskError::WrongGid(host));
        }
        Ok(answer)
    }

    fn ask_once(
        &self,
        host: Ipv4Addr,
        peer_port: u16,
        q: &DeviceQuery,
        deadline: Instant,
    ) -> Result<DeviceAnswer, AskError> {
        let port = peer_port.wrapping_add(DEVICE_PORT_OFFSET);
        let io_error = |source| AskError::Io { host, port, source };
        let addr = SocketAddr::new(IpAddr::V4(host), port);
        let mut stream = time_left(deadline)
            .and_then(|left| TcpStream::connect_timeout(&addr, left))
            .map_err(io_error)?;
        stream.set_nodelay(true).map_err(io_error)?;
        write_all_by(&mut stream, &q.encode(), deadline).map_err(io_error)?;
        let mut b = [0u8; ANSWER_LEN];
        read_exact_by(&mut stream, &mut b, deadline).map_err(io_error)?;
        DeviceAnswer::decode(&b).map_err(|_| AskError::Garbled(host))
    }
}

/// RoCE v2's GID of an IPv4 address: `::ffff:a.b.c.d`.
pub fn ipv4_mapped_gid(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

/// What is left until `deadline`; a timeout error once it has passed.
fn time_left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the exchange's deadline passed",
        ));
    }
    Ok(left)
}

/// Whether an error of a socket with a timeout is that timeout.
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Fills `buf` from `stream` by `deadline`: each read waits only for the time left, so a
/// peer trickling one byte at a time gets no more than the whole deadline.
fn read_exact_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        stream.set_read_timeout(Some(time_left(deadline)?))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => time_left(deadline).map(drop)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` to `stream` by `deadline` (each write waits only for the time left).
fn write_all_by(stream: &mut TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut written = 0;
    while written < buf.len() {
        stream.set_write_timeout(Some(time_left(deadline)?))?;
        match stream.write(&buf[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => time_left(deadline).map(drop)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use freeflow_proto::control::{OverlayEntry, PeerHost};

    const HOST1: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
    const HOST2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 3);
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 2);
    const RED: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 4);

    fn view(me: Ipv4Addr, other: Ipv4Addr, port: u16) -> NetworkView {
        NetworkView {
            host_ip: me,
            peer_port: port,
            hosts: vec![
                PeerHost {
                    host_ip: HOST1,
                    peer_port: port,
                },
                PeerHost {
                    host_ip: HOST2,
                    peer_port: port,
                },
            ],
            overlay: vec![
                OverlayEntry {
                    ip: CLIENT,
                    tenant: "blue".into(),
                    host_ip: other,
                },
                OverlayEntry {
                    ip: RED,
                    tenant: "red".into(),
                    host_ip: other,
                },
                OverlayEntry {
                    ip: SERVER,
                    tenant: "blue".into(),
                    host_ip: me,
                },
            ],
        }
    }

    fn query(kind: QueryKind, src_ip: Ipv4Addr, dst_qpn: u32, rkey: u32) -> DeviceQuery {
        DeviceQuery {
            kind,
            src_ip,
            dst_ip: SERVER,
            dst_qpn,
            rkey,
        }
    }

    /// The answering side's checks, without sockets: the source must be the asking host's
    /// container, the QP its tenant's, the key in the QP's PD.
    #[test]
    fn answers_only_about_the_askers_tenant() {
        let x = Exchange::new([7; 16]);
        {
            let mut s = x.state();
            let v = view(HOST2, HOST1, 0);
            s.hosts = v.hosts.iter().map(|h| (h.host_ip, h.peer_port)).collect();
            s.overlay = v
                .overlay
                .iter()
                .filter(|e| e.host_ip != HOST2)
                .map(|e| (e.ip, (e.host_ip, e.tenant.clone())))
                .collect();
        }
        x.export_qp(SERVER, 0x11, 0x99, "blue", 1);
        let key = ExportedKey {
            pd: 1,
            access: 2,
            iova: 0x1000,
            length: 4096,
            real_addr: 0x5000,
            real_rkey: 0xabc,
        };
        x.export_key(SERVER, 0x77, key);
        x.export_key(SERVER, 0x78, ExportedKey { pd: 2, ..key });
        let a = x.answer(HOST1, &query(QueryKind::Qp, CLIENT, 0x11, 0));
        assert_eq!(
            (a.status, a.real_qpn, a.gid),
            (DeviceStatus::Found, 0x99, [7; 16])
        );
        // Another tenant's asker learns nothing: the same answer as for no QP at all.
        let red = x.answer(HOST1, &query(QueryKind::Qp, RED, 0x11, 0));
        let none = x.answer(HOST1, &query(QueryKind::Qp, CLIENT, 0x12, 0));
        assert_eq!(red, DeviceAnswer::empty(DeviceStatus::NotFound));
        assert_eq!(none, red);
        // A host speaking for a container that is not its own.
        let forged = x.answer(HOST2, &query(QueryKind::Qp, CLIENT, 0x11, 0));
        assert_eq!(forged, DeviceAnswer::empty(DeviceStatus::Refused));
        let k = x.answer(HOST1, &query(QueryKind::Key, CLIENT, 0x11, 0x77));
        assert_eq!(
            (
                k.status,
                k.real_rkey,
                k.iova,
                k.length,
                k.real_addr,
                k.access
            ),
            (DeviceStatus::Found, 0xabc, 0x1000, 4096, 0x5000, 2)
        );
        // A key in another PD than the QP's, a key that is not there, a red asker.
        for (src, rkey) in [(CLIENT, 0x78), (CLIENT, 0x79), (RED, 0x77)] {
            let k = x.answer(HOST1, &query(QueryKind::Key, src, 0x11, rkey));
            assert_eq!(k, DeviceAnswer::empty(DeviceStatus::NotFound));
        }
        x.withdraw_qp(SERVER, 0x11);
        let gone = x.answer(HOST1, &query(QueryKind::Qp, CLIENT, 0x11, 0));
        assert_eq!(gone.status, DeviceStatus::NotFound);
        x.withdraw_key(SERVER, 0x77);
        assert!(!x.state().keys.contains_key(&(SERVER, 0x77)));
    }

    /// Two exchanges on loopback addresses: a query crosses a real socket; a host with no
    /// router listening fails within the bound.
    #[test]
    fn a_query_crosses_to_the_other_router_and_a_silent_one_fails() {
        let port = {
            // A free port pair: the device port is the peer port + 2.
            let l = TcpListener::bind("127.0.0.2:0").unwrap();
            l.local_addr()
                .unwrap()
                .port()
                .saturating_sub(DEVICE_PORT_OFFSET)
        };
        let server = Exchange::new(ipv4_mapped_gid(HOST2));
        server.follow(&view(HOST2, HOST1, port));
        server.export_qp(SERVER, 0x11, 0x42, "blue", 1);
        let client = Exchange::new([8; 16]);
        client.state().hosts = [(HOST2, port)].into();
        let q = query(QueryKind::Qp, CLIENT, 0x11, 0);
        // The listener thread starts asynchronously: a bounded wait for it.
        let mut answer = None;
        for _ in 0..100 {
            match client.ask(HOST2, &q) {
                Ok(a) => {
                    answer = Some(a);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let a = answer.expect("no answer from the exchange on 127.0.0.2");
        assert_eq!(
            (a.status, a.real_qpn, a.gid),
            (DeviceStatus::Found, 0x42, ipv4_mapped_gid(HOST2))
        );
        // An address that is not a registered host.
        assert!(matches!(
            client.ask(Ipv4Addr::new(127, 0, 0, 3), &q),
            Err(AskError::UnknownHost(_))
        ));
        // A registered host whose router is not there: refused at connect, an error; asked
        // again at once, it is not connected to (taken for down a while).
        client.state().hosts.insert(HOST1, port.wrapping_add(7));
        assert!(matches!(client.ask(HOST1, &q), Err(AskError::Io { .. })));
        assert!(matches!(
            client.ask(HOST1, &q),
            Err(AskError::RecentlyDown(HOST1))
        ));
        // Once that time is over (made so here), it is asked again.
        client
            .state()
            .down_until
            .insert(HOST1, Instant::now() - Duration::from_millis(1));
        assert!(matches!(client.ask(HOST1, &q), Err(AskError::Io { .. })));
    }

    /// A router on `ip` whose device port is listening, and the peer port to register it by.
    fn fake_router(ip: Ipv4Addr) -> (TcpListener, u16) {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener, port.wrapping_sub(DEVICE_PORT_OFFSET))
    }

    /// A peer that sends a valid answer one byte at a time, each byte well within the time
    /// one read may wait, costs the asker one deadline for the whole answer: the asker gives
    /// up before the answer is complete, and takes the host for down.
    #[test]
    fn a_trickling_answer_ends_at_the_ask_deadline() {
        let host = Ipv4Addr::new(127, 0, 0, 3);
        let (listener, peer_port) = fake_router(host);
        let answer = DeviceAnswer {
            real_qpn: 0x42,
            gid: ipv4_mapped_gid(host),
            ..DeviceAnswer::empty(DeviceStatus::Found)
        }
        .encode();
        let peer = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut q = [0u8; QUERY_LEN];
            stream.read_exact(&mut q).unwrap();
            // Bytes sent before the asker closed; the asker closing makes a write fail (a
            // bounded count of writes in all).
            let mut sent = 0;
            for byte in answer {
                std::thread::sleep(ASK_DEADLINE / 4);
                if stream
                    .write_all(&[byte])
                    .and_then(|_| stream.flush())
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            sent
        });
        let client = Exchange::new(ipv4_mapped_gid(HOST1));
        client.state().hosts = [(host, peer_port)].into();
        let q = query(QueryKind::Qp, CLIENT, 0x11, 0);
        match client.ask(host, &q) {
            Err(AskError::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::TimedOut, "{source}")
            }
            other => panic!("a trickled answer was taken: {other:?}"),
        }
        assert!(matches!(
            client.ask(host, &q),
            Err(AskError::RecentlyDown(h)) if h == host
        ));
        let sent = peer.join().unwrap();
        assert!(
            sent < ANSWER_LEN,
            "the asker waited for the whole trickled answer ({sent} bytes)"
        );
    }

    /// A garbled answer, and an answer about a QP whose GID is not the asked host's (another
    /// host's, or this host's own), fail the ask and take the host for down.
    #[test]
    fn a_garbled_answer_or_a_foreign_gid_takes_the_host_for_down() {
        let host = Ipv4Addr::new(127, 0, 0, 4);
        let mine = ipv4_mapped_gid(HOST1);
        let found = |gid| {
            DeviceAnswer {
                real_qpn: 0x42,
                gid,
                ..DeviceAnswer::empty(DeviceStatus::Found)
            }
            .encode()
        };
        let answers = [
            [0x5a; ANSWER_LEN],
            found(ipv4_mapped_gid(HOST2)),
            found(mine),
            found(ipv4_mapped_gid(host)),
        ];
        let (listener, peer_port) = fake_router(host);
        let peer = std::thread::spawn(move || {
            for answer in answers {
                let (mut stream, _) = listener.accept().unwrap();
                let mut q = [0u8; QUERY_LEN];
                stream.read_exact(&mut q).unwrap();
                stream.write_all(&answer).unwrap();
            }
        });
        let client = Exchange::new(mine);
        client.state().hosts = [(host, peer_port)].into();
        let q = query(QueryKind::Qp, CLIENT, 0x11, 0);
        let mut results = Vec::new();
        for _ in &answers {
            let result = client.ask(host, &q);
            if result.is_err() {
                assert!(matches!(
                    client.ask(host, &q),
                    Err(AskError::RecentlyDown(h)) if h == host
                ));
                client.state().down_until.clear();
            }
            results.push(result);
        }
        peer.join().unwrap();
        assert!(matches!(results[0], Err(AskError::Garbled(h)) if h == host));
        assert!(matches!(results[1], Err(AskError::WrongGid(h)) if h == host));
        assert!(matches!(results[2], Err(AskError::WrongGid(h)) if h == host));
        let a = results
            .pop()
            .unwrap()
            .expect("the host's own GID is refused");
        assert_eq!((a.real_qpn, a.gid), (0x42, ipv4_mapped_gid(host)));
    }

    /// Processes of a registered host holding connections to the device port open and idle
    /// (more of them than fit in one ask's deadline one after another) delay no other asker,
    /// and the answering side closes them.
    #[test]
    fn idle_connections_delay_no_other_asker() {
        let port = {
            let l = TcpListener::bind("127.0.0.5:0").unwrap();
            l.local_addr()
                .unwrap()
                .port()
                .wrapping_sub(DEVICE_PORT_OFFSET)
        };
        let here = Ipv4Addr::new(127, 0, 0, 5);
        let mut v = view(here, HOST1, port);
        v.hosts.push(PeerHost {
            host_ip: here,
            peer_port: port,
        });
        let server = Exchange::new(ipv4_mapped_gid(here));
        server.follow(&v);
        server.export_qp(SERVER, 0x11, 0x42, "blue", 1);
        let device_port = SocketAddr::from((here, port.wrapping_add(DEVICE_PORT_OFFSET)));
        let idle_count = (ASK_DEADLINE.as_millis() / ANSWER_DEADLINE.as_millis()) as usize + 3;
        let idle: Vec<TcpStream> = (0..idle_count)
            .map(|_| TcpStream::connect(device_port).unwrap())
            .collect();
        let client = Exchange::new(ipv4_mapped_gid(HOST1));
        client.state().hosts = [(here, port)].into();
        let a = client
            .ask(here, &query(QueryKind::Qp, CLIENT, 0x11, 0))
            .expect("an asker behind idle connections got no answer");
        assert_eq!((a.status, a.real_qpn), (DeviceStatus::Found, 0x42));
        for mut stream in idle {
            // Closed by the answering side (a bounded wait: the test's, not the router's).
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut b = [0u8; 1];
            match stream.read(&mut b) {
                Ok(0) => {}
                Ok(_) => panic!("an idle connection got an answer"),
                Err(e) => assert!(!timed_out(&e), "an idle connection stays open: {e}"),
            }
        }
    }
}
