//! The library's objects behind the C structures: event channels ([`Channel`], whose `fd` is
//! its router connection), ids ([`Id`]) and events ([`Event`]), how an event from the router
//! becomes the program's `rdma_cm_event` (a connection request makes the new id; a connect
//! response moves the QP to RTR and RTS and completes the connection), and the QP attributes
//! `rdma_init_qp_attr` reports, which are the ones this library applies.
//!
//! Each C structure is the first field of its Rust object (`repr(C)`), so the pointer the
//! program holds is the object's. Live channels and ids are recorded by address, so a pointer
//! that is not one of ours is refused (EINVAL), not followed.
#![allow(unsafe_code)]

use crate::abi::*;
use crate::ibv::{self, Device};
use crate::router::{self, RouterError};
use freeflow_proto::cm::{event as ev, port_space, CmOp, CmRecord, ConnParams, MAX_PRIVATE_DATA};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::c_int;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The resolve timeout of librdmacm's own calls that take none (rdma_create_ep, and rsockets'
/// connect), in milliseconds, as rdma-core's library uses.
pub const DEFAULT_RESOLVE_TIMEOUT_MS: u32 = 2000;

/// How long a synchronous call (an id without channel) waits for its event.
const SYNC_WAIT: Duration = Duration::from_secs(30);

/// A failure for the program: errno, and why (printed with FREEFLOW_DEBUG=1).
#[derive(Debug)]
pub struct Fail {
    pub errno: i32,
    pub why: String,
}

impl Fail {
    pub fn new(errno: i32, why: impl Into<String>) -> Fail {
        Fail {
            errno,
            why: why.into(),
        }
    }
}

impl From<RouterError> for Fail {
    fn from(e: RouterError) -> Fail {
        Fail::new(e.errno, e.why)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An event channel.
#[repr(C)]
pub struct Channel {
    pub c: RdmaEventChannel,
    conn: OwnedFd,
    token: u64,
    /// Ids whose events come here, by the router's id.
    ids: Mutex<HashMap<u32, usize>>,
    /// Events taken off the connection while a synchronous call waited for another.
    stash: Mutex<VecDeque<EventBox>>,
}

/// An event handed out (owned by the program until it acks it).
#[repr(C)]
pub struct Event {
    pub c: RdmaCmEvent,
    data: [u8; MAX_PRIVATE_DATA],
}

/// An [`Event`] kept in a stash.
pub struct EventBox(pub Box<Event>);
// SAFETY: an event's pointers name ids, which are used under the channel's lock only.
unsafe impl Send for EventBox {}

/// What an id knows beyond its C structure.
#[derive(Default)]
struct IdState {
    local: Option<SocketAddrV4>,
    remote: Option<SocketAddrV4>,
    peer_qpn: u32,
    /// This side's parameters: RTR takes `responder_resources`, RTS `initiator_depth` and the
    /// retry counts.
    conn: ConnParams,
    /// CQs and channels this library made for the QP (destroyed with it).
    own_cqs: bool,
    /// A passive endpoint's QP attributes, for each request `rdma_get_request` returns.
    ep_qp: Option<(IbvQpInitAttr, usize)>,
    /// An active id with a connect response delivered and no QP: `rdma_accept` or
    /// `rdma_establish` completes it.
    responded: bool,
}

/// An rdma_cm id.
#[repr(C)]
pub struct Id {
    pub c: RdmaCmId,
    router_id: u32,
    channel: Arc<Channel>,
    /// No channel of the program's: calls wait for their own events.
    sync: bool,
    st: Mutex<IdState>,
}

static CHANNELS: Mutex<Vec<(usize, Arc<Channel>)>> = Mutex::new(Vec::new());
static IDS: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

fn record_id(p: *mut Id) {
    lock(&IDS)
        .get_or_insert_with(HashSet::new)
        .insert(p as usize);
}

fn forget_id(p: *mut Id) -> bool {
    lock(&IDS).as_mut().is_some_and(|s| s.remove(&(p as usize)))
}

/// The id at `p`, if it is a live one of ours.
pub fn id<'a>(p: *mut RdmaCmId) -> Result<&'a mut Id, Fail> {
    let known = lock(&IDS)
        .as_ref()
        .is_some_and(|s| s.contains(&(p as usize)));
    if !known {
        return Err(Fail::new(libc::EINVAL, "not an rdma_cm id of this library"));
    }
    // SAFETY: recorded ids are live `Id`s (removed before they are freed), and `c` is their
    // first field; the program promises not to destroy an id while using it.
    Ok(unsafe { &mut *(p.cast::<Id>()) })
}

/// The channel at `p`, if it is a live one of ours.
pub fn channel(p: *mut RdmaEventChannel) -> Result<Arc<Channel>, Fail> {
    lock(&CHANNELS)
        .iter()
        .find(|(a, _)| *a == p as usize)
        .map(|(_, c)| c.clone())
        .ok_or_else(|| Fail::new(libc::EINVAL, "not an event channel of this library"))
}

/// A new channel (attached to the router).
pub fn create_channel(recorded: bool) -> Result<Arc<Channel>, Fail> {
    let (conn, token) = router::open_channel()?;
    let ch = Arc::new(Channel {
        c: RdmaEventChannel {
            fd: conn.as_raw_fd(),
        },
        conn,
        token,
        ids: Mutex::new(HashMap::new()),
        stash: Mutex::new(VecDeque::new()),
    });
    if recorded {
        let p = Arc::as_ptr(&ch) as usize;
        lock(&CHANNELS).push((p, ch.clone()));
    }
    Ok(ch)
}

/// Forgets a channel of the program's; it closes when its last id is gone.
pub fn destroy_channel(p: *mut RdmaEventChannel) -> Result<(), Fail> {
    let mut all = lock(&CHANNELS);
    let at = all
        .iter()
        .position(|(a, _)| *a == p as usize)
        .ok_or_else(|| Fail::new(libc::EINVAL, "not an event channel of this library"))?;
    if !lock(&all[at].1.ids).is_empty() {
        return Err(Fail::new(libc::EBUSY, "the channel still has ids"));
    }
    all.swap_remove(at);
    Ok(())
}

fn zeroed_id() -> RdmaCmId {
    // SAFETY: RdmaCmId is plain data (pointers, integers, sockaddr_storage): all zeros is a
    // valid value, the one rdma-core starts from.
    unsafe { std::mem::zeroed() }
}

fn new_event() -> Box<Event> {
    Box::new(Event {
        // SAFETY: RdmaCmEvent is plain data; all zeros is valid.
        c: unsafe { std::mem::zeroed() },
        data: [0; MAX_PRIVATE_DATA],
    })
}

/// `sin` of `a` written into `out` (a sockaddr_storage).
fn put_sockaddr(out: &mut libc::sockaddr_storage, a: SocketAddrV4) {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
    unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
}

/// The GID of an overlay address (IPv4-mapped, as the verbs device reports it).
pub fn gid_of(ip: Ipv4Addr) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[10] = 0xff;
    g[11] = 0xff;
    g[12..].copy_from_slice(&ip.octets());
    g
}

/// A sockaddr from the program: AF_INET, or AF_INET6 that is unspecified or IPv4-mapped.
pub fn read_sockaddr(p: *const libc::sockaddr) -> Result<Option<SocketAddrV4>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the program passes a sockaddr of at least its family's size.
    let family = c_int::from(unsafe { (*p).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: AF_INET: a sockaddr_in.
            let sin = unsafe { std::ptr::read_unaligned(p.cast::<libc::sockaddr_in>()) };
            Ok(Some(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: AF_INET6: a sockaddr_in6.
            let sin6 = unsafe { std::ptr::read_unaligned(p.cast::<libc::sockaddr_in6>()) };
            let v6 = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let ip = match v6.to_ipv4_mapped() {
                Some(ip) => ip,
                None if v6.is_unspecified() => Ipv4Addr::UNSPECIFIED,
                None => {
                    return Err(Fail::new(
                        libc::EAFNOSUPPORT,
                        "Freeflow's overlay addresses are IPv4",
                    ))
                }
            };
            Ok(Some(SocketAddrV4::new(ip, u16::from_be(sin6.sin6_port))))
        }
        0 => Ok(None),
        _ => Err(Fail::new(
            libc::EAFNOSUPPORT,
            "address family not supported",
        )),
    }
}

/// Whether ids of port space `ps` are RDMA_PS_UDP's: UD QPs, whose "connect" only learns the
/// passive side's QP number (InfiniBand's SIDR) and whose "accept" only answers it.
pub fn is_datagram_ps(ps: c_int) -> bool {
    ps == c_int::from(port_space::UDP)
}

/// The address vector towards `ip` (its GID `::ffff:ip`, port 1), as an RDMA_PS_UDP event's
/// `ah_attr` carries it for `ibv_create_ah`.
fn ah_attr_to(ip: Ipv4Addr) -> IbvAhAttr {
    IbvAhAttr {
        grh: IbvGlobalRoute {
            dgid: IbvGid { raw: gid_of(ip) },
            sgid_index: 0,
            hop_limit: 64,
            ..IbvGlobalRoute::default()
        },
        is_global: 1,
        port_num: 1,
        ..IbvAhAttr::default()
    }
}

/// Fills `event`'s `param.ud` (RDMA_PS_UDP): its private data (already in `event.data`), the
/// address vector towards `remote`, the other side's QP number and the qkey.
fn set_ud_param(event: &mut Event, len: usize, remote: Option<SocketAddrV4>, qpn: u32) {
    let private_data = match len {
        0 => std::ptr::null(),
        _ => event.data.as_ptr().cast(),
    };
    event.c.param.ud = RdmaUdParam {
        private_data,
        private_data_len: len as u8,
        ah_attr: remote.map_or_else(IbvAhAttr::default, |r| ah_attr_to(*r.ip())),
        qp_num: qpn,
        qkey: RDMA_UDP_QKEY,
    };
}

impl Id {
    /// An RDMA_PS_UDP id.
    pub fn is_datagram(&self) -> bool {
        is_datagram_ps(self.c.ps)
    }

    /// A new id on `channel` (sync: a private channel).
    pub fn create(
        channel: Option<Arc<Channel>>,
        context: Ptr,
        ps: c_int,
        qp_type: c_int,
    ) -> Result<*mut Id, Fail> {
        let (channel, sync) = match channel {
            Some(ch) => (ch, false),
            None => (create_channel(false)?, true),
        };
        let ps_wire = u16::try_from(ps).map_err(|_| Fail::new(libc::EINVAL, "bad port space"))?;
        let reply = router::call(
            CmOp::CreateId,
            CmRecord {
                token: channel.token,
                ps: ps_wire,
                ..CmRecord::default()
            },
        )?;
        let mut c = zeroed_id();
        c.channel = Arc::as_ptr(&channel) as *mut RdmaEventChannel;
        c.context = context;
        c.ps = ps;
        c.qp_type = qp_type;
        let id = Box::into_raw(Box::new(Id {
            c,
            router_id: reply.id,
            channel: channel.clone(),
            sync,
            st: Mutex::new(IdState::default()),
        }));
        lock(&channel.ids).insert(reply.id, id as usize);
        record_id(id);
        Ok(id)
    }

    /// Destroys the id at `p`: at the router, then here.
    pub fn destroy(p: *mut Id) -> Result<(), Fail> {
        if !forget_id(p) {
            return Err(Fail::new(libc::EINVAL, "not an rdma_cm id of this library"));
        }
        // SAFETY: recorded until just now: a live Id made by Box::into_raw in `create` or
        // `deliver`; nothing else frees it.
        let id = unsafe { Box::from_raw(p) };
        lock(&id.channel.ids).remove(&id.router_id);
        // Events set aside for it go with it (they would name a freed id).
        lock(&id.channel.stash).retain(|e| e.0.c.id != p.cast::<RdmaCmId>());
        if !id.c.event.is_null() {
            // SAFETY: an event of ours kept for a synchronous id.
            drop(unsafe { Box::from_raw(id.c.event.cast::<Event>()) });
        }
        let done = router::call(
            CmOp::DestroyId,
            CmRecord::request(CmOp::DestroyId, id.router_id),
        );
        done.map(|_| ()).map_err(Fail::from)
    }

    fn state(&self) -> MutexGuard<'_, IdState> {
        lock(&self.st)
    }

    pub fn is_sync(&self) -> bool {
        self.sync
    }

    /// The id has a device: the process's context and PD, port 1, its own GID.
    fn take_device(&mut self, dev: Device, own: Ipv4Addr) {
        self.c.verbs = dev.context;
        if self.c.pd.is_null() {
            self.c.pd = dev.pd;
        }
        self.c.port_num = 1;
        self.c.route.addr.ib.sgid = gid_of(own);
        self.c.route.addr.ib.pkey = 0xffff;
    }

    fn set_local(&mut self, local: SocketAddrV4) {
        put_sockaddr(&mut self.c.route.addr.src, local);
        self.state().local = Some(local);
    }

    fn set_remote(&mut self, remote: SocketAddrV4) {
        put_sockaddr(&mut self.c.route.addr.dst, remote);
        self.c.route.addr.ib.dgid = gid_of(*remote.ip());
        self.state().remote = Some(remote);
    }

    pub fn bind(&mut self, local: SocketAddrV4) -> Result<(), Fail> {
        let mut req = CmRecord::request(CmOp::Bind, self.router_id);
        req.local = local;
        let reply = router::call(CmOp::Bind, req)?;
        self.set_local(reply.local);
        if !reply.local.ip().is_unspecified() {
            let dev = ibv::device().map_err(|why| Fail::new(libc::ENODEV, why))?;
            self.take_device(dev, *reply.local.ip());
        }
        Ok(())
    }

    pub fn listen(&mut self, backlog: c_int) -> Result<(), Fail> {
        let mut req = CmRecord::request(CmOp::Listen, self.router_id);
        req.backlog = u32::try_from(backlog).unwrap_or(0);
        let reply = router::call(CmOp::Listen, req)?;
        self.set_local(reply.local);
        Ok(())
    }

    pub fn resolve_addr(
        &mut self,
        src: Option<SocketAddrV4>,
        dst: SocketAddrV4,
        timeout_ms: u32,
    ) -> Result<(), Fail> {
        let mut req = CmRecord::request(CmOp::ResolveAddr, self.router_id);
        req.local = src.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        req.remote = dst;
        // How long the router may wait for an address it does not know yet.
        req.backlog = timeout_ms;
        let reply = router::call(CmOp::ResolveAddr, req)?;
        self.set_local(reply.local);
        self.wait_if_sync(ev::ADDR_RESOLVED)
    }

    pub fn resolve_route(&mut self) -> Result<(), Fail> {
        let req = CmRecord::request(CmOp::ResolveRoute, self.router_id);
        router::call(CmOp::ResolveRoute, req)?;
        self.wait_if_sync(ev::ROUTE_RESOLVED)
    }

    pub fn connect(&mut self, param: Option<&RdmaConnParam>) -> Result<(), Fail> {
        let mut req = CmRecord::request(CmOp::Connect, self.router_id);
        if let Some(p) = param {
            req.conn = conn_params(p);
            req.private_data = private_data(p)?;
            req.qpn = p.qp_num;
        } else {
            req.conn = ConnParams {
                retry_count: 7,
                rnr_retry_count: 7,
                ..ConnParams::default()
            };
        }
        if !self.c.qp.is_null() {
            // SAFETY: the program's QP, created through rdma_create_qp or set by it.
            req.qpn = unsafe { (*self.c.qp).qp_num };
        }
        self.state().conn = req.conn;
        router::call(CmOp::Connect, req)?;
        self.wait_if_sync(ev::ESTABLISHED)
    }

    pub fn accept(&mut self, param: Option<&RdmaConnParam>) -> Result<(), Fail> {
        if std::mem::take(&mut self.state().responded) {
            return self.establish();
        }
        let mut req = CmRecord::request(CmOp::Accept, self.router_id);
        {
            let mut st = self.state();
            if let Some(p) = param {
                let mine = conn_params(p);
                st.conn.responder_resources = mine.responder_resources;
                st.conn.initiator_depth = mine.initiator_depth;
                st.conn.rnr_retry_count = mine.rnr_retry_count;
                req.private_data = private_data(p)?;
                req.qpn = p.qp_num;
            }
            req.conn = st.conn;
        }
        if !self.c.qp.is_null() {
            if !self.is_datagram() {
                // A UD QP is ready since rdma_create_qp.
                self.modify(qp_state::RTR)?;
                self.modify(qp_state::RTS)?;
            }
            // SAFETY: the id's live QP.
            req.qpn = unsafe { (*self.c.qp).qp_num };
        }
        router::call(CmOp::Accept, req)?;
        if self.is_datagram() {
            // The answer is all: no event follows on the passive side.
            return Ok(());
        }
        self.wait_if_sync(ev::ESTABLISHED)
    }

    pub fn reject(&mut self, data: Vec<u8>) -> Result<(), Fail> {
        let mut req = CmRecord::request(CmOp::Reject, self.router_id);
        req.private_data = data;
        router::call(CmOp::Reject, req)?;
        Ok(())
    }

    pub fn establish(&mut self) -> Result<(), Fail> {
        let req = CmRecord::request(CmOp::Establish, self.router_id);
        router::call(CmOp::Establish, req)?;
        Ok(())
    }

    pub fn disconnect(&mut self) -> Result<(), Fail> {
        if !self.c.qp.is_null() {
            // The QP stops here whatever the router says (as librdmacm moves it to ERR).
            let _ = self.modify(qp_state::ERR);
        }
        let req = CmRecord::request(CmOp::Disconnect, self.router_id);
        router::call(CmOp::Disconnect, req)?;
        Ok(())
    }

    /// Waits, for a synchronous id, for its event `wanted`; another event for it is the
    /// failure its status says.
    fn wait_if_sync(&mut self, wanted: u16) -> Result<(), Fail> {
        if !self.sync {
            return Ok(());
        }
        let event = wait_for(&self.channel, self.router_id, None)?;
        let (kind, status) = (event.c.event, event.c.status);
        drop(event);
        if kind == c_int::from(wanted) {
            return Ok(());
        }
        let errno = match (u16::try_from(kind).unwrap_or(u16::MAX), status) {
            (ev::REJECTED, _) => libc::ECONNREFUSED,
            (_, s) if s < 0 => -s,
            _ => libc::EIO,
        };
        Err(Fail::new(
            errno,
            format!(
                "waited for {} and got {} (status {status})",
                event_name(wanted),
                event_name(kind as u16)
            ),
        ))
    }

    /// The QP attributes of `state` as this library applies them (rdma_init_qp_attr).
    pub fn qp_attr(&self, state: u32) -> Result<(IbvQpAttr, c_int), Fail> {
        let st = self.state();
        let mut a = IbvQpAttr {
            qp_state: state,
            ..IbvQpAttr::default()
        };
        let own_qpn = match self.c.qp.is_null() {
            true => 0,
            // SAFETY: the id's live QP.
            false => unsafe { (*self.c.qp).qp_num },
        };
        use mask::*;
        if self.is_datagram() {
            // As rdma_init_qp_attr for a UD QP: the qkey at INIT, nothing at RTR, the send
            // PSN at RTS.
            let m = match state {
                qp_state::INIT => {
                    a.pkey_index = 0;
                    a.port_num = 1;
                    a.qkey = RDMA_UDP_QKEY;
                    STATE | PKEY_INDEX | PORT | QKEY
                }
                qp_state::RTR => STATE,
                qp_state::RTS => {
                    a.sq_psn = psn(own_qpn);
                    STATE | SQ_PSN
                }
                _ => {
                    return Err(Fail::new(
                        libc::EINVAL,
                        "rdma_init_qp_attr: INIT, RTR or RTS only",
                    ))
                }
            };
            return Ok((a, m));
        }
        let m = match state {
            qp_state::INIT => {
                a.pkey_index = 0;
                a.port_num = 1;
                a.qp_access_flags =
                    IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;
                STATE | PKEY_INDEX | PORT | ACCESS_FLAGS
            }
            qp_state::RTR => {
                let remote = st
                    .remote
                    .ok_or_else(|| Fail::new(libc::EINVAL, "the id has no peer yet"))?;
                a.path_mtu = IBV_MTU_1024;
                a.dest_qp_num = st.peer_qpn;
                a.rq_psn = psn(st.peer_qpn);
                a.max_dest_rd_atomic = st.conn.responder_resources.min(16);
                a.min_rnr_timer = 12;
                a.ah_attr = IbvAhAttr {
                    grh: IbvGlobalRoute {
                        dgid: IbvGid {
                            raw: gid_of(*remote.ip()),
                        },
                        sgid_index: 0,
                        hop_limit: 64,
                        ..IbvGlobalRoute::default()
                    },
                    is_global: 1,
                    port_num: 1,
                    ..IbvAhAttr::default()
                };
                STATE | AV | PATH_MTU | DEST_QPN | RQ_PSN | MAX_DEST_RD_ATOMIC | MIN_RNR_TIMER
            }
            qp_state::RTS => {
                a.timeout = 14;
                a.retry_cnt = st.conn.retry_count.min(7);
                a.rnr_retry = st.conn.rnr_retry_count.min(7);
                a.sq_psn = psn(own_qpn);
                a.max_rd_atomic = st.conn.initiator_depth.min(16);
                STATE | TIMEOUT | RETRY_CNT | RNR_RETRY | SQ_PSN | MAX_QP_RD_ATOMIC
            }
            _ => {
                return Err(Fail::new(
                    libc::EINVAL,
                    "rdma_init_qp_attr: INIT, RTR or RTS only",
                ))
            }
        };
        Ok((a, m))
    }

    /// Moves the id's QP to `state` with [`Id::qp_attr`] (ERR with the state alone).
    pub fn modify(&mut self, state: u32) -> Result<(), Fail> {
        let v = ibv::verbs().map_err(|m| Fail::new(libc::ENOSYS, m.0))?;
        let (mut a, m) = match state {
            qp_state::ERR => (
                IbvQpAttr {
                    qp_state: state,
                    ..IbvQpAttr::default()
                },
                mask::STATE,
            ),
            s => self.qp_attr(s)?,
        };
        // SAFETY: the id's live QP and an attribute structure of the verbs' layout.
        let rc = unsafe { (v.modify_qp)(self.c.qp.cast(), &mut a, m) };
        match rc {
            0 => Ok(()),
            e => Err(Fail::new(
                e,
                format!("ibv_modify_qp to state {state} failed"),
            )),
        }
    }

    /// rdma_create_qp: CQs (and completion channels) of its own where the attributes name
    /// none, the QP on `pd` (the id's PD if NULL), moved to INIT.
    pub fn create_qp(&mut self, pd: Ptr, attr: &mut IbvQpInitAttr) -> Result<(), Fail> {
        let v = ibv::verbs().map_err(|m| Fail::new(libc::ENOSYS, m.0))?;
        let pd = if pd.is_null() { self.c.pd } else { pd };
        if pd.is_null() || self.c.verbs.is_null() {
            return Err(Fail::new(
                libc::EINVAL,
                "the id has no device yet (bind or resolve it first)",
            ));
        }
        let me = (self as *mut Id).cast::<std::ffi::c_void>();
        let mut made = false;
        if attr.recv_cq.is_null() || attr.send_cq.is_null() {
            let verbs = self.c.verbs;
            let make = |depth: u32| -> Result<(Ptr, Ptr), Fail> {
                // SAFETY: the id's live context.
                let chan = unsafe { (v.create_comp_channel)(verbs) };
                if chan.is_null() {
                    return Err(Fail::new(errno(), "ibv_create_comp_channel failed"));
                }
                let cqe = c_int::try_from(depth.max(1)).unwrap_or(c_int::MAX);
                // SAFETY: live context and channel; the CQ's context is the id, as librdmacm's.
                let cq = unsafe { (v.create_cq)(verbs, cqe, me, chan, 0) };
                if cq.is_null() {
                    let e = errno();
                    // SAFETY: the channel just made, unused.
                    unsafe { (v.destroy_comp_channel)(chan) };
                    return Err(Fail::new(e, "ibv_create_cq failed"));
                }
                Ok((cq, chan))
            };
            let (recv_cq, recv_chan) = make(attr.cap.max_recv_wr)?;
            self.c.recv_cq = recv_cq;
            self.c.recv_cq_channel = recv_chan;
            match make(attr.cap.max_send_wr) {
                Ok((cq, chan)) => {
                    self.c.send_cq = cq;
                    self.c.send_cq_channel = chan;
                }
                Err(e) => {
                    self_destroy_cqs(v, &mut self.c);
                    return Err(e);
                }
            }
            made = true;
            if attr.recv_cq.is_null() {
                attr.recv_cq = self.c.recv_cq;
            }
            if attr.send_cq.is_null() {
                attr.send_cq = self.c.send_cq;
            }
        }
        // SAFETY: a live PD and the program's attribute structure.
        let qp = unsafe { (v.create_qp)(pd, attr) };
        if qp.is_null() {
            let e = errno();
            if made {
                self_destroy_cqs(v, &mut self.c);
            }
            return Err(Fail::new(e, "ibv_create_qp failed"));
        }
        self.c.qp = qp.cast();
        // A UD QP goes on to RTS at once, as librdmacm's: it needs nothing from the other side.
        let ready = match self.is_datagram() {
            true => self
                .modify(qp_state::INIT)
                .and_then(|()| self.modify(qp_state::RTR))
                .and_then(|()| self.modify(qp_state::RTS)),
            false => self.modify(qp_state::INIT),
        };
        if let Err(e) = ready {
            // SAFETY: the QP just made.
            unsafe { (v.destroy_qp)(qp) };
            self.c.qp = std::ptr::null_mut();
            if made {
                self_destroy_cqs(v, &mut self.c);
            }
            return Err(e);
        }
        if made {
            self.state().own_cqs = true;
        }
        Ok(())
    }

    pub fn destroy_qp(&mut self) {
        let Ok(v) = ibv::verbs() else {
            return;
        };
        if !self.c.qp.is_null() {
            // SAFETY: the id's live QP.
            unsafe { (v.destroy_qp)(self.c.qp.cast()) };
            self.c.qp = std::ptr::null_mut();
        }
        if std::mem::take(&mut self.state().own_cqs) {
            self_destroy_cqs(v, &mut self.c);
        }
    }

    pub fn set_ep_qp(&mut self, attr: IbvQpInitAttr, pd: Ptr) {
        self.state().ep_qp = Some((attr, pd as usize));
    }

    pub fn ep_qp(&self) -> Option<(IbvQpInitAttr, Ptr)> {
        self.state().ep_qp.map(|(a, pd)| (a, pd as Ptr))
    }

    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    pub fn router_id(&self) -> u32 {
        self.router_id
    }

    pub fn src_port(&self) -> u16 {
        self.state().local.map_or(0, |a| a.port())
    }

    pub fn dst_port(&self) -> u16 {
        self.state().remote.map_or(0, |a| a.port())
    }
}

fn self_destroy_cqs(v: &ibv::Verbs, c: &mut RdmaCmId) {
    for (cq, chan) in [
        (&mut c.send_cq, &mut c.send_cq_channel),
        (&mut c.recv_cq, &mut c.recv_cq_channel),
    ] {
        if !cq.is_null() {
            // SAFETY: a CQ this library made for the id.
            unsafe { (v.destroy_cq)(*cq) };
            *cq = std::ptr::null_mut();
        }
        if !chan.is_null() {
            // SAFETY: its completion channel, after the CQ that used it.
            unsafe { (v.destroy_comp_channel)(*chan) };
            *chan = std::ptr::null_mut();
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .filter(|&e| e != 0)
        .unwrap_or(libc::EIO)
}

/// Both sides' starting packet sequence numbers follow from their QP numbers, so neither
/// has to travel.
fn psn(qpn: u32) -> u32 {
    qpn & 0xff_ffff
}

fn conn_params(p: &RdmaConnParam) -> ConnParams {
    ConnParams {
        responder_resources: p.responder_resources,
        initiator_depth: p.initiator_depth,
        flow_control: p.flow_control,
        retry_count: p.retry_count,
        rnr_retry_count: p.rnr_retry_count,
        srq: p.srq,
    }
}

fn private_data(p: &RdmaConnParam) -> Result<Vec<u8>, Fail> {
    if p.private_data.is_null() || p.private_data_len == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the program passes private_data_len readable bytes.
    let s = unsafe {
        std::slice::from_raw_parts(p.private_data.cast::<u8>(), usize::from(p.private_data_len))
    };
    Ok(s.to_vec())
}

/// Takes the next event of `ch` for the program: from the stash, else from the router (as the
/// descriptor's blocking mode says, or at most `timeout`).
pub fn get_event(ch: &Arc<Channel>, timeout: Option<Duration>) -> Result<Box<Event>, Fail> {
    loop {
        if let Some(e) = lock(&ch.stash).pop_front() {
            return Ok(e.0);
        }
        let rec = router::next_event(ch.conn.as_fd(), timeout)?;
        if let Some(event) = deliver(ch, rec) {
            return Ok(event);
        }
    }
}

/// Waits for the next event of `router_id` on `ch` (for a synchronous call), setting the
/// others aside for later. `kind`: only that event counts (others of the id are set aside too).
pub fn wait_for(ch: &Arc<Channel>, router_id: u32, kind: Option<u16>) -> Result<Box<Event>, Fail> {
    let matches = |event: &Event| -> bool {
        let of = |p: *mut RdmaCmId| {
            // SAFETY: an event's ids are live: an id is destroyed by the program, which does not
            // destroy one while a call on it (or its listener) waits.
            !p.is_null() && unsafe { (*p.cast::<Id>()).router_id } == router_id
        };
        match kind {
            // A connection request is an event of the listener (its new id is the event's).
            Some(ev::CONNECT_REQUEST) => {
                event.c.event == c_int::from(ev::CONNECT_REQUEST) && of(event.c.listen_id)
            }
            Some(k) => event.c.event == c_int::from(k) && of(event.c.id),
            None => of(event.c.id),
        }
    };
    {
        let mut stash = lock(&ch.stash);
        if let Some(at) = stash.iter().position(|e| matches(&e.0)) {
            return Ok(stash.remove(at).expect("found").0);
        }
    }
    let deadline = std::time::Instant::now() + SYNC_WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(Fail::new(
                libc::ETIMEDOUT,
                "no event from the router in time",
            ));
        }
        let rec = router::next_event(ch.conn.as_fd(), Some(left))?;
        let Some(event) = deliver(ch, rec) else {
            continue;
        };
        if matches(&event) {
            return Ok(event);
        }
        lock(&ch.stash).push_back(EventBox(event));
    }
}

/// Turns a record of the router into the program's event; None when there is nothing to
/// deliver (an id destroyed since, the channel's token).
fn deliver(ch: &Arc<Channel>, rec: CmRecord) -> Option<Box<Event>> {
    let ids = lock(&ch.ids);
    let mut event = new_event();
    let len = rec.private_data.len().min(MAX_PRIVATE_DATA);
    event.data[..len].copy_from_slice(&rec.private_data[..len]);
    event.c.event = c_int::from(rec.op);
    event.c.status = rec.status;
    let mut param = RdmaConnParam {
        private_data: std::ptr::null(),
        private_data_len: len as u8,
        responder_resources: rec.conn.responder_resources,
        initiator_depth: rec.conn.initiator_depth,
        flow_control: rec.conn.flow_control,
        retry_count: rec.conn.retry_count,
        rnr_retry_count: rec.conn.rnr_retry_count,
        srq: rec.conn.srq,
        qp_num: rec.qpn,
    };
    if len > 0 {
        param.private_data = event.data.as_ptr().cast();
    }
    event.c.param.conn = param;
    match rec.op {
        ev::CONNECT_REQUEST => {
            let Some(&listen) = ids.get(&rec.other_id) else {
                drop(ids);
                // The listener is gone: the request is refused with it.
                let _ = router::call(CmOp::DestroyId, CmRecord::request(CmOp::DestroyId, rec.id));
                return None;
            };
            // SAFETY: ids on the channel's table are live until removed under this lock.
            let listen = unsafe { &mut *(listen as *mut Id) };
            let dev = match ibv::device() {
                Ok(d) => d,
                Err(why) => {
                    crate::debug(format_args!("connection request refused: {why}"));
                    drop(ids);
                    let _ = router::call(CmOp::Reject, CmRecord::request(CmOp::Reject, rec.id));
                    let _ =
                        router::call(CmOp::DestroyId, CmRecord::request(CmOp::DestroyId, rec.id));
                    return None;
                }
            };
            let mut c = zeroed_id();
            c.channel = listen.c.channel;
            c.context = listen.c.context;
            c.ps = listen.c.ps;
            c.qp_type = listen.c.qp_type;
            let mut child = Box::new(Id {
                c,
                router_id: rec.id,
                channel: ch.clone(),
                sync: listen.sync,
                st: Mutex::new(IdState {
                    peer_qpn: rec.qpn,
                    conn: rec.conn,
                    ..IdState::default()
                }),
            });
            child.take_device(dev, *rec.local.ip());
            child.set_local(rec.local);
            child.set_remote(rec.remote);
            if child.is_datagram() {
                set_ud_param(&mut event, len, Some(rec.remote), rec.qpn);
            }
            let child = Box::into_raw(child);
            record_id(child);
            drop(ids);
            lock(&ch.ids).insert(rec.id, child as usize);
            event.c.id = child.cast();
            event.c.listen_id = (listen as *mut Id).cast();
            Some(event)
        }
        ev::CHANNEL_TOKEN => None,
        _ => {
            let &p = ids.get(&rec.id)?;
            // SAFETY: as above.
            let id = unsafe { &mut *(p as *mut Id) };
            event.c.id = p as *mut RdmaCmId;
            match rec.op {
                ev::ADDR_RESOLVED => match ibv::device() {
                    Ok(dev) => {
                        let own = id.state().local.map_or(Ipv4Addr::UNSPECIFIED, |a| *a.ip());
                        let own = if own.is_unspecified() {
                            *rec.local.ip()
                        } else {
                            own
                        };
                        id.take_device(dev, own);
                        id.set_remote(rec.remote);
                    }
                    Err(why) => {
                        crate::debug(format_args!("address resolution: {why}"));
                        event.c.event = c_int::from(ev::ADDR_ERROR);
                        event.c.status = -libc::ENODEV;
                    }
                },
                ev::ADDR_ERROR => {
                    crate::debug(format_args!(
                        "{} is not an address of this container's tenant on this host \
                         (status {}: {})",
                        rec.remote.ip(),
                        rec.status,
                        std::io::Error::from_raw_os_error(-rec.status)
                    ));
                }
                // RDMA_PS_UDP's answer: the passive QP, for the program's address handle.
                ev::ESTABLISHED if id.is_datagram() => {
                    id.state().peer_qpn = rec.qpn;
                    let remote = id.state().remote;
                    set_ud_param(&mut event, len, remote, rec.qpn);
                }
                ev::CONNECT_RESPONSE => {
                    id.state().peer_qpn = rec.qpn;
                    if id.c.qp.is_null() {
                        id.state().responded = true;
                    } else {
                        let done = id
                            .modify(qp_state::RTR)
                            .and_then(|()| id.modify(qp_state::RTS))
                            .and_then(|()| id.establish());
                        match done {
                            Ok(()) => event.c.event = c_int::from(ev::ESTABLISHED),
                            Err(e) => {
                                crate::debug(format_args!("completing a connection: {}", e.why));
                                event.c.event = c_int::from(ev::CONNECT_ERROR);
                                event.c.status = -e.errno;
                            }
                        }
                    }
                }
                _ => {}
            }
            Some(event)
        }
    }
}

/// Frees an event the program acked.
pub fn ack(p: *mut RdmaCmEvent) {
    if !p.is_null() {
        // SAFETY: an event this library handed out (Box::into_raw of an Event); the program
        // acks each once.
        drop(unsafe { Box::from_raw(p.cast::<Event>()) });
    }
}

/// `rdma_event_str`.
pub fn event_name(kind: u16) -> &'static str {
    match kind {
        0 => "RDMA_CM_EVENT_ADDR_RESOLVED",
        1 => "RDMA_CM_EVENT_ADDR_ERROR",
        2 => "RDMA_CM_EVENT_ROUTE_RESOLVED",
        3 => "RDMA_CM_EVENT_ROUTE_ERROR",
        4 => "RDMA_CM_EVENT_CONNECT_REQUEST",
        5 => "RDMA_CM_EVENT_CONNECT_RESPONSE",
        6 => "RDMA_CM_EVENT_CONNECT_ERROR",
        7 => "RDMA_CM_EVENT_UNREACHABLE",
        8 => "RDMA_CM_EVENT_REJECTED",
        9 => "RDMA_CM_EVENT_ESTABLISHED",
        10 => "RDMA_CM_EVENT_DISCONNECTED",
        11 => "RDMA_CM_EVENT_DEVICE_REMOVAL",
        12 => "RDMA_CM_EVENT_MULTICAST_JOIN",
        13 => "RDMA_CM_EVENT_MULTICAST_ERROR",
        14 => "RDMA_CM_EVENT_ADDR_CHANGE",
        15 => "RDMA_CM_EVENT_TIMEWAIT_EXIT",
        _ => "UNKNOWN EVENT",
    }
}
