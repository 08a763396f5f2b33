//! The connection manager against hostile and ordinary processes, over datagram socket pairs
//! (message boundaries as on the router's SOCK_SEQPACKET connections).

use super::*;
use freeflow_proto::cm::{event, port_space, reject_reason, CmOp, CmRecord, EVENT, REPLY, REQUEST};
use std::os::unix::net::UnixDatagram;

const NO_EVENTS: i16 = libc::POLLIN;

fn container(name: &str, tenant: &str, last: u8) -> ContainerEntry {
    ContainerEntry {
        name: name.into(),
        tenant: tenant.into(),
        ip: Ipv4Addr::new(10, 32, 0, last),
        netns: NetnsId {
            dev: 1,
            ino: u64::from(last),
        },
    }
}

struct Process {
    requests: UnixDatagram,
    requests_id: u32,
    channel: UnixDatagram,
    token: u64,
    seq: u32,
}

struct Bench {
    cm: CmService,
    table: HashMap<NetnsId, ContainerEntry>,
    next: u32,
}

impl Bench {
    fn new() -> Bench {
        let table = [
            container("a", "blue", 2),
            container("b", "blue", 3),
            container("x", "red", 4),
        ]
        .into_iter()
        .map(|c| (c.netns, c))
        .collect();
        Bench {
            cm: CmService::default(),
            table,
            next: 100,
        }
    }

    fn process(&mut self, name: &str) -> Process {
        let c = self
            .table
            .values()
            .find(|c| c.name == name)
            .unwrap()
            .clone();
        let (requests, router_side) = UnixDatagram::pair().unwrap();
        self.next += 1;
        let requests_id = self.next;
        self.cm.adopt(
            requests_id,
            ShimKind::CmRequests,
            router_side.into(),
            c.clone(),
            1,
        );
        let (channel, router_side) = UnixDatagram::pair().unwrap();
        self.next += 1;
        self.cm
            .adopt(self.next, ShimKind::CmChannel, router_side.into(), c, 1);
        channel.set_nonblocking(true).unwrap();
        let mut buf = [0u8; CM_RECORD_LEN];
        let n = channel.recv(&mut buf).unwrap();
        let first = CmRecord::decode(&buf[..n], EVENT).unwrap();
        assert_eq!(first.op, event::CHANNEL_TOKEN);
        Process {
            requests,
            requests_id,
            channel,
            token: first.token,
            seq: 0,
        }
    }

    /// Sends `rec` as `op` from `p` and returns the reply's status and record.
    fn call(&mut self, p: &mut Process, op: CmOp, mut rec: CmRecord) -> (i32, CmRecord) {
        p.seq += 1;
        rec.seq = p.seq;
        rec.op = op as u16;
        p.requests.send(&rec.encode(REQUEST)).unwrap();
        let gone = self.cm.on_ready(p.requests_id, NO_EVENTS, &self.table);
        assert!(gone.is_empty(), "connection dropped: {gone:?}");
        let mut buf = [0u8; CM_RECORD_LEN];
        let n = p.requests.recv(&mut buf).unwrap();
        let reply = CmRecord::decode(&buf[..n], REPLY).unwrap();
        assert_eq!(reply.seq, p.seq);
        (reply.status, reply)
    }

    fn create(&mut self, p: &mut Process) -> u32 {
        self.create_in(p, port_space::TCP)
    }

    /// A new id of port space `ps`.
    fn create_in(&mut self, p: &mut Process, ps: u16) -> u32 {
        let rec = CmRecord {
            token: p.token,
            ps,
            ..CmRecord::default()
        };
        let (status, reply) = self.call(p, CmOp::CreateId, rec);
        assert_eq!(status, 0);
        reply.id
    }
}

fn events(p: &Process) -> Vec<CmRecord> {
    let mut out = Vec::new();
    let mut buf = [0u8; CM_RECORD_LEN];
    for _ in 0..64 {
        match p.channel.recv(&mut buf) {
            Ok(n) => out.push(CmRecord::decode(&buf[..n], EVENT).unwrap()),
            Err(_) => break,
        }
    }
    out
}

fn at(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

fn with_addr(local: Option<SocketAddrV4>, remote: Option<SocketAddrV4>) -> CmRecord {
    CmRecord {
        local: local.unwrap_or(at([0, 0, 0, 0], 0)),
        remote: remote.unwrap_or(at([0, 0, 0, 0], 0)),
        ..CmRecord::default()
    }
}

/// `b` listens on 10.32.0.3:7000; `a` has an id resolved to it (route too). Returns the ids.
fn listening_and_resolved(bench: &mut Bench, a: &mut Process, b: &mut Process) -> (u32, u32) {
    listening_and_resolved_in(bench, a, b, port_space::TCP)
}

/// [`listening_and_resolved`] with ids of port space `ps`.
fn listening_and_resolved_in(
    bench: &mut Bench,
    a: &mut Process,
    b: &mut Process,
    ps: u16,
) -> (u32, u32) {
    let listener = bench.create_in(b, ps);
    let rec = CmRecord {
        id: listener,
        ..with_addr(Some(at([10, 32, 0, 3], 7000)), None)
    };
    assert_eq!(bench.call(b, CmOp::Bind, rec).0, 0);
    let rec = CmRecord {
        id: listener,
        backlog: 1,
        ..CmRecord::default()
    };
    assert_eq!(bench.call(b, CmOp::Listen, rec).0, 0);
    let active = bench.create_in(a, ps);
    let rec = CmRecord {
        id: active,
        ..with_addr(None, Some(at([10, 32, 0, 3], 7000)))
    };
    assert_eq!(bench.call(a, CmOp::ResolveAddr, rec).0, 0);
    let rec = CmRecord::request(CmOp::ResolveRoute, active);
    assert_eq!(bench.call(a, CmOp::ResolveRoute, rec).0, 0);
    let got: Vec<u16> = events(a).iter().map(|e| e.op).collect();
    assert_eq!(got, [event::ADDR_RESOLVED, event::ROUTE_RESOLVED]);
    (listener, active)
}

#[test]
fn a_connection_carries_qp_numbers_and_private_data_both_ways() {
    let mut bench = Bench::new();
    let (mut a, mut b) = (bench.process("a"), bench.process("b"));
    let (listener, active) = listening_and_resolved(&mut bench, &mut a, &mut b);
    let rec = CmRecord {
        id: active,
        qpn: 0x111,
        private_data: b"hello".to_vec(),
        conn: ConnParams {
            responder_resources: 2,
            initiator_depth: 3,
            ..ConnParams::default()
        },
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut a, CmOp::Connect, rec).0, 0);
    let req = events(&b).pop().unwrap();
    assert_eq!(req.op, event::CONNECT_REQUEST);
    assert_eq!((req.other_id, req.qpn), (listener, 0x111));
    assert_eq!(req.private_data, b"hello");
    assert_eq!(req.remote.ip(), &Ipv4Addr::new(10, 32, 0, 2));
    // The passive side sees the initiator's depth as its responder resources.
    assert_eq!(
        (req.conn.responder_resources, req.conn.initiator_depth),
        (3, 2)
    );
    let rec = CmRecord {
        id: req.id,
        qpn: 0x222,
        private_data: b"yes".to_vec(),
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut b, CmOp::Accept, rec).0, 0);
    let resp = events(&a).pop().unwrap();
    assert_eq!((resp.op, resp.qpn), (event::CONNECT_RESPONSE, 0x222));
    assert_eq!(resp.private_data, b"yes");
    let rec = CmRecord::request(CmOp::Establish, active);
    assert_eq!(bench.call(&mut a, CmOp::Establish, rec).0, 0);
    assert_eq!(events(&b).pop().unwrap().op, event::ESTABLISHED);
    assert_eq!(bench.cm.established, 1);
    // Destroying one side disconnects the other.
    let rec = CmRecord::request(CmOp::DestroyId, active);
    assert_eq!(bench.call(&mut a, CmOp::DestroyId, rec).0, 0);
    let last = events(&b).pop().unwrap();
    assert_eq!((last.op, last.id), (event::DISCONNECTED, req.id));
}

#[test]
fn a_passive_side_gone_before_the_establish_completes_then_disconnects_the_connect() {
    let mut bench = Bench::new();
    let (mut a, mut b) = (bench.process("a"), bench.process("b"));
    let (_listener, active) = listening_and_resolved(&mut bench, &mut a, &mut b);
    let rec = CmRecord {
        id: active,
        qpn: 0x111,
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut a, CmOp::Connect, rec).0, 0);
    let req = events(&b).pop().unwrap();
    let rec = CmRecord {
        id: req.id,
        qpn: 0x222,
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut b, CmOp::Accept, rec).0, 0);
    // The server accepts and is gone before the client's Establish.
    let rec = CmRecord::request(CmOp::DestroyId, req.id);
    assert_eq!(bench.call(&mut b, CmOp::DestroyId, rec).0, 0);
    let got: Vec<u16> = events(&a).iter().map(|e| e.op).collect();
    assert_eq!(got, [event::CONNECT_RESPONSE, event::DISCONNECTED]);
    // The Establish is taken (the connection then ends with the event already queued), not
    // refused, and counts no established connection.
    let rec = CmRecord::request(CmOp::Establish, active);
    assert_eq!(bench.call(&mut a, CmOp::Establish, rec).0, 0);
    assert!(events(&a).is_empty());
    assert_eq!(bench.cm.established, 0);
    // Only destroy is left to do.
    let rec = CmRecord::request(CmOp::DestroyId, active);
    assert_eq!(bench.call(&mut a, CmOp::DestroyId, rec).0, 0);
}

#[test]
fn another_containers_ids_and_channels_are_out_of_reach() {
    let mut bench = Bench::new();
    let (mut a, mut b) = (bench.process("a"), bench.process("b"));
    let id = bench.create(&mut a);
    for op in [
        CmOp::Listen,
        CmOp::ResolveRoute,
        CmOp::Disconnect,
        CmOp::DestroyId,
    ] {
        let (status, _) = bench.call(&mut b, op, CmRecord::request(op, id));
        assert_eq!(status, libc::EINVAL, "{op:?} on another container's id");
    }
    // b cannot create ids on a's channel, nor with a made-up token.
    for token in [a.token, 12345] {
        let rec = CmRecord {
            token,
            ps: port_space::TCP,
            ..CmRecord::default()
        };
        assert_eq!(bench.call(&mut b, CmOp::CreateId, rec).0, libc::EINVAL);
    }
    // Nor bind to a's address.
    let mine = bench.create(&mut b);
    let rec = CmRecord {
        id: mine,
        ..with_addr(Some(at([10, 32, 0, 2], 80)), None)
    };
    assert_eq!(bench.call(&mut b, CmOp::Bind, rec).0, libc::EADDRNOTAVAIL);
    // a's id still works.
    let rec = CmRecord {
        id,
        ..with_addr(Some(at([10, 32, 0, 2], 80)), None)
    };
    assert_eq!(bench.call(&mut a, CmOp::Bind, rec).0, 0);
}

#[test]
fn another_tenants_address_is_an_addr_error_like_an_address_nobody_has() {
    let mut bench = Bench::new();
    let mut a = bench.process("a");
    for ip in [[10, 32, 0, 4], [10, 32, 9, 9]] {
        let id = bench.create(&mut a);
        let rec = CmRecord {
            id,
            ..with_addr(None, Some(at(ip, 7000)))
        };
        assert_eq!(bench.call(&mut a, CmOp::ResolveAddr, rec).0, 0);
        let ev = events(&a).pop().unwrap();
        assert_eq!((ev.op, ev.status), (event::ADDR_ERROR, -libc::EHOSTUNREACH));
        let rec = CmRecord::request(CmOp::ResolveRoute, id);
        assert_eq!(bench.call(&mut a, CmOp::ResolveRoute, rec).0, libc::EINVAL);
    }
}

#[test]
fn private_data_limits_backlog_and_missing_listeners() {
    let mut bench = Bench::new();
    let (mut a, mut b) = (bench.process("a"), bench.process("b"));
    let (_, active) = listening_and_resolved(&mut bench, &mut a, &mut b);
    let rec = CmRecord {
        id: active,
        private_data: vec![1; 57],
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut a, CmOp::Connect, rec).0, libc::EINVAL);
    let rec = CmRecord::request(CmOp::Connect, active);
    assert_eq!(bench.call(&mut a, CmOp::Connect, rec).0, 0);
    let req = events(&b).pop().unwrap();
    let rec = CmRecord {
        id: req.id,
        private_data: vec![1; 149],
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut b, CmOp::Reject, rec).0, libc::EINVAL);
    // The backlog (1) is full while that request waits.
    let second = bench.create(&mut a);
    let rec = CmRecord {
        id: second,
        ..with_addr(None, Some(at([10, 32, 0, 3], 7000)))
    };
    bench.call(&mut a, CmOp::ResolveAddr, rec);
    bench.call(
        &mut a,
        CmOp::ResolveRoute,
        CmRecord::request(CmOp::ResolveRoute, second),
    );
    events(&a);
    bench.call(
        &mut a,
        CmOp::Connect,
        CmRecord::request(CmOp::Connect, second),
    );
    let ev = events(&a).pop().unwrap();
    assert_eq!((ev.op, ev.id), (event::UNREACHABLE, second));
    // Rejected with private data.
    let rec = CmRecord {
        id: req.id,
        private_data: b"no".to_vec(),
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut b, CmOp::Reject, rec).0, 0);
    let ev = events(&a).pop().unwrap();
    assert_eq!(
        (ev.op, ev.status, ev.private_data.as_slice()),
        (event::REJECTED, reject_reason::CONSUMER_DEFINED, &b"no"[..])
    );
    // A port nobody listens on.
    let third = bench.create(&mut a);
    let rec = CmRecord {
        id: third,
        ..with_addr(None, Some(at([10, 32, 0, 3], 7001)))
    };
    bench.call(&mut a, CmOp::ResolveAddr, rec);
    bench.call(
        &mut a,
        CmOp::ResolveRoute,
        CmRecord::request(CmOp::ResolveRoute, third),
    );
    events(&a);
    bench.call(
        &mut a,
        CmOp::Connect,
        CmRecord::request(CmOp::Connect, third),
    );
    let ev = events(&a).pop().unwrap();
    assert_eq!(
        (ev.op, ev.status),
        (event::REJECTED, reject_reason::INVALID_SERVICE_ID)
    );
}

#[test]
fn a_malformed_request_drops_that_connection_only() {
    let mut bench = Bench::new();
    let (a, mut b) = (bench.process("a"), bench.process("b"));
    let id = bench.create(&mut b);
    a.requests.send(b"garbage").unwrap();
    let gone = bench.cm.on_ready(a.requests_id, NO_EVENTS, &bench.table);
    assert_eq!(gone, [a.requests_id]);
    let mut bad = CmRecord::request(CmOp::Bind, 1).encode(REQUEST);
    bad[4] = 0xee;
    b.requests.send(&bad).unwrap();
    // b's channel and id survive its own requests connection.
    let gone = bench.cm.on_ready(b.requests_id, NO_EVENTS, &bench.table);
    assert_eq!(gone, [b.requests_id]);
    assert!(bench.cm.ids.contains_key(&id));
    // An event channel carries no requests: writing to it drops it and its ids.
    let channel_id = b.requests_id + 1;
    b.channel
        .send(&CmRecord::request(CmOp::Bind, id).encode(REQUEST))
        .unwrap();
    let gone = bench.cm.on_ready(channel_id, NO_EVENTS, &bench.table);
    assert_eq!(gone, [channel_id]);
    assert!(!bench.cm.ids.contains_key(&id));
}

/// Bench `a` on host 192.168.1.1 knows `r` (10.32.0.9, tenant blue) and `s` (10.32.0.10, tenant
/// red) on host 192.168.1.2.
fn with_peer_host(bench: &mut Bench) -> Ipv4Addr {
    let far = Ipv4Addr::new(192, 168, 1, 2);
    let entry = |last: u8, tenant: &str| freeflow_proto::control::OverlayEntry {
        ip: Ipv4Addr::new(10, 32, 0, last),
        tenant: tenant.into(),
        host_ip: far,
    };
    bench.cm.set_network(NetworkView {
        host_ip: Ipv4Addr::new(192, 168, 1, 1),
        peer_port: 7471,
        hosts: Vec::new(),
        overlay: vec![entry(9, "blue"), entry(10, "red")],
    });
    far
}

fn connect_from(src_last: u8, from_id: u32, port: u16) -> CmPeerMsg {
    CmPeerMsg {
        op: CmOp::Connect as u16,
        src: at([10, 32, 0, src_last], 40000),
        dst: at([10, 32, 0, 3], port),
        ps: port_space::TCP,
        qpn: 0x333,
        private_data: b"hi".to_vec(),
        ..peer_msg(from_id, 0)
    }
}

#[test]
fn a_peer_router_speaks_only_for_its_own_containers_and_connections() {
    let mut bench = Bench::new();
    let far = with_peer_host(&mut bench);
    let (mut a, mut b) = (bench.process("a"), bench.process("b"));
    let (listener, active) = listening_and_resolved(&mut bench, &mut a, &mut b);
    let table = bench.table.clone();
    // A source address that is not one of the peer's containers: ignored, nothing answered.
    bench.cm.on_peer(far, connect_from(2, 7, 7000), &table);
    assert!(events(&b).is_empty());
    assert!(bench.cm.peer_out.is_empty());
    // Another tenant's container of the peer: as an address nobody has (refused).
    bench.cm.on_peer(far, connect_from(10, 8, 7000), &table);
    assert!(events(&b).is_empty());
    let (to, refusal) = bench.cm.peer_out.pop().unwrap();
    assert_eq!(
        (to, refusal.op, refusal.to_id),
        (far, CmOp::Reject as u16, 8)
    );
    assert_eq!(refusal.status, -libc::EHOSTUNREACH);
    // Its own container of our tenant reaches the listener.
    bench.cm.on_peer(far, connect_from(9, 9, 7000), &table);
    let req = events(&b).pop().unwrap();
    assert_eq!(
        (req.op, req.other_id, req.qpn),
        (event::CONNECT_REQUEST, listener, 0x333)
    );
    assert_eq!(req.private_data, b"hi");
    // Steps naming an id that is not connected to the peer are ignored: a's local connect.
    let step = CmPeerMsg {
        op: CmOp::Accept as u16,
        ..peer_msg(1, active)
    };
    bench.cm.on_peer(far, step, &table);
    assert!(events(&a).is_empty());
    // Accepting answers the peer's id.
    let rec = CmRecord {
        id: req.id,
        qpn: 0x444,
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut b, CmOp::Accept, rec).0, 0);
    let (to, accept) = bench.cm.peer_out.pop().unwrap();
    assert_eq!(
        (to, accept.op, accept.to_id, accept.qpn),
        (far, CmOp::Accept as u16, 9, 0x444)
    );
    // The peer's establish, then its disconnect.
    let establish = CmPeerMsg {
        op: CmOp::Establish as u16,
        ..peer_msg(9, req.id)
    };
    bench.cm.on_peer(far, establish, &table);
    assert_eq!(events(&b).pop().unwrap().op, event::ESTABLISHED);
    let bye = CmPeerMsg {
        op: CmOp::Disconnect as u16,
        ..peer_msg(9, req.id)
    };
    bench.cm.on_peer(far, bye, &table);
    assert_eq!(events(&b).pop().unwrap().op, event::DISCONNECTED);
}

#[test]
fn a_lost_peer_router_disconnects_its_connections_and_fails_its_connects() {
    let mut bench = Bench::new();
    let far = with_peer_host(&mut bench);
    let (mut a, mut b) = (bench.process("a"), bench.process("b"));
    let (_listener, local_active) = listening_and_resolved(&mut bench, &mut a, &mut b);
    let table = bench.table.clone();
    // An established connection from the peer's container to b.
    bench.cm.on_peer(far, connect_from(9, 9, 7000), &table);
    let req = events(&b).pop().unwrap();
    assert_eq!(req.op, event::CONNECT_REQUEST);
    let accept = CmRecord {
        id: req.id,
        qpn: 0x444,
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut b, CmOp::Accept, accept).0, 0);
    let establish = CmPeerMsg {
        op: CmOp::Establish as u16,
        ..peer_msg(9, req.id)
    };
    bench.cm.on_peer(far, establish, &table);
    assert_eq!(events(&b).pop().unwrap().op, event::ESTABLISHED);
    // A connect of a's to the peer's container, not answered yet.
    let to_far = bench.create(&mut a);
    let rec = CmRecord {
        id: to_far,
        ..with_addr(None, Some(at([10, 32, 0, 9], 7000)))
    };
    assert_eq!(bench.call(&mut a, CmOp::ResolveAddr, rec).0, 0);
    let rec = CmRecord::request(CmOp::ResolveRoute, to_far);
    assert_eq!(bench.call(&mut a, CmOp::ResolveRoute, rec).0, 0);
    let rec = CmRecord::request(CmOp::Connect, to_far);
    assert_eq!(bench.call(&mut a, CmOp::Connect, rec).0, 0);
    let (to, connect) = bench.cm.peer_out.pop().unwrap();
    assert_eq!((to, connect.op), (far, CmOp::Connect as u16));
    events(&a);
    assert_eq!(bench.cm.far_hosts(), HashSet::from([far]));

    // The peer router goes away: both ids with it end, as with a real CM.
    assert_eq!(bench.cm.on_peer_lost(far), 2);
    let gone = events(&b);
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!((gone[0].op, gone[0].id), (event::DISCONNECTED, req.id));
    let failed = events(&a);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(
        (failed[0].op, failed[0].id, failed[0].status),
        (event::UNREACHABLE, to_far, -libc::ETIMEDOUT)
    );
    assert!(bench.cm.far_hosts().is_empty());
    // What that router said before it went is no longer heard, and a second loss is nothing.
    let bye = CmPeerMsg {
        op: CmOp::Disconnect as u16,
        ..peer_msg(9, req.id)
    };
    bench.cm.on_peer(far, bye, &table);
    assert!(events(&b).is_empty());
    assert_eq!(bench.cm.on_peer_lost(far), 0);
    // The local id (resolved to b on this host) is untouched and still connects.
    let rec = CmRecord::request(CmOp::Connect, local_active);
    assert_eq!(bench.call(&mut a, CmOp::Connect, rec).0, 0);
    assert_eq!(events(&b).pop().unwrap().op, event::CONNECT_REQUEST);
    // The program's own disconnect of the ended connection sends nothing to the lost router.
    bench.cm.peer_out.clear();
    let rec = CmRecord::request(CmOp::Disconnect, req.id);
    bench.call(&mut b, CmOp::Disconnect, rec);
    assert!(bench.cm.peer_out.iter().all(|(h, _)| *h != far));
}

#[test]
fn a_udp_exchange_gives_the_active_side_the_passive_qp_and_leaves_no_connection() {
    let mut bench = Bench::new();
    let (mut a, mut b) = (bench.process("a"), bench.process("b"));
    // RDMA_PS_IPOIB stays refused (no IPoIB multicast groups).
    let rec = CmRecord {
        token: a.token,
        ps: port_space::IPOIB,
        ..CmRecord::default()
    };
    assert_eq!(
        bench.call(&mut a, CmOp::CreateId, rec).0,
        libc::EPROTONOSUPPORT
    );
    let (listener, active) = listening_and_resolved_in(&mut bench, &mut a, &mut b, port_space::UDP);
    // A SIDR request carries up to 180 bytes of private data (56 for a connection).
    let rec = CmRecord {
        id: active,
        private_data: vec![7; 181],
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut a, CmOp::Connect, rec).0, libc::EINVAL);
    let rec = CmRecord {
        id: active,
        qpn: 0x111,
        private_data: vec![7; 180],
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut a, CmOp::Connect, rec).0, 0);
    let req = events(&b).pop().unwrap();
    assert_eq!(
        (req.op, req.other_id, req.qpn),
        (event::CONNECT_REQUEST, listener, 0x111)
    );
    let rec = CmRecord {
        id: req.id,
        qpn: 0x222,
        private_data: vec![9; 137],
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut b, CmOp::Accept, rec).0, libc::EINVAL);
    let rec = CmRecord {
        id: req.id,
        qpn: 0x222,
        private_data: b"ud".to_vec(),
        ..CmRecord::default()
    };
    assert_eq!(bench.call(&mut b, CmOp::Accept, rec).0, 0);
    // The active side: ESTABLISHED with the passive QP; the passive side: nothing.
    let got = events(&a);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].op, got[0].qpn), (event::ESTABLISHED, 0x222));
    assert_eq!(got[0].private_data, b"ud");
    assert!(events(&b).is_empty());
    assert_eq!(bench.cm.established, 0);
    // No connection: nothing to disconnect, and destroying one side tells the other nothing.
    let rec = CmRecord::request(CmOp::Disconnect, active);
    assert_eq!(bench.call(&mut a, CmOp::Disconnect, rec).0, libc::EINVAL);
    let rec = CmRecord::request(CmOp::DestroyId, active);
    assert_eq!(bench.call(&mut a, CmOp::DestroyId, rec).0, 0);
    assert!(events(&b).is_empty());
    let rec = CmRecord::request(CmOp::DestroyId, req.id);
    assert_eq!(bench.call(&mut b, CmOp::DestroyId, rec).0, 0);
    assert!(events(&a).is_empty());
}

/// A resolve of `ip` with a timeout of `timeout_ms`; returns the id.
fn resolve_waiting(bench: &mut Bench, p: &mut Process, ip: [u8; 4], timeout_ms: u32) -> u32 {
    let id = bench.create(p);
    let rec = CmRecord {
        id,
        backlog: timeout_ms,
        ..with_addr(None, Some(at(ip, 7000)))
    };
    assert_eq!(bench.call(p, CmOp::ResolveAddr, rec).0, 0);
    id
}

#[test]
fn an_address_registered_while_a_resolve_waits_resolves() {
    let mut bench = Bench::new();
    let mut a = bench.process("a");
    // 10.32.0.9 is nobody's yet: the id waits (no event), within the program's timeout.
    let id = resolve_waiting(&mut bench, &mut a, [10, 32, 0, 9], 2000);
    assert!(events(&a).is_empty());
    let rec = CmRecord::request(CmOp::ResolveRoute, id);
    assert_eq!(bench.call(&mut a, CmOp::ResolveRoute, rec).0, libc::EINVAL);
    bench.cm.retry_resolves(&bench.table, Instant::now());
    assert!(events(&a).is_empty(), "no news, time not up: still waiting");
    // The daemon's next table has it (a container of a's tenant).
    let late = container("late", "blue", 9);
    bench.table.insert(late.netns, late);
    bench.cm.table_changed();
    bench.cm.retry_resolves(&bench.table, Instant::now());
    let ev = events(&a).pop().unwrap();
    assert_eq!((ev.op, ev.status, ev.id), (event::ADDR_RESOLVED, 0, id));
    assert_eq!(ev.remote, at([10, 32, 0, 9], 7000));
    assert_eq!(bench.cm.resolved_late, 1);
    let rec = CmRecord::request(CmOp::ResolveRoute, id);
    assert_eq!(bench.call(&mut a, CmOp::ResolveRoute, rec).0, 0);
    assert_eq!(bench.cm.next_timeout_ms(Instant::now()), None);
}

#[test]
fn a_resolve_that_waits_in_vain_is_an_addr_error_when_its_time_is_up() {
    let mut bench = Bench::new();
    let mut a = bench.process("a");
    // Another tenant's address and nobody's: both wait, and end alike.
    let other = resolve_waiting(&mut bench, &mut a, [10, 32, 0, 4], 1000);
    let nobody = resolve_waiting(&mut bench, &mut a, [10, 32, 9, 9], 1000);
    let now = Instant::now();
    let wait = bench.cm.next_timeout_ms(now).unwrap();
    assert!((1..=1001).contains(&wait), "{wait}");
    bench.cm.table_changed();
    bench.cm.retry_resolves(&bench.table, now);
    assert!(
        events(&a).is_empty(),
        "another tenant's address never resolves"
    );
    bench
        .cm
        .retry_resolves(&bench.table, now + Duration::from_millis(1001));
    let evs = events(&a);
    assert_eq!(evs.len(), 2);
    for (ev, id) in evs.iter().zip([other, nobody]) {
        assert_eq!(
            (ev.op, ev.status, ev.id),
            (event::ADDR_ERROR, -libc::EHOSTUNREACH, id)
        );
    }
    // Back to Bound: it may resolve again.
    let rec = CmRecord::request(CmOp::ResolveRoute, other);
    assert_eq!(bench.call(&mut a, CmOp::ResolveRoute, rec).0, libc::EINVAL);
    assert_eq!(bench.cm.next_timeout_ms(Instant::now()), None);
}

#[test]
fn resolves_waiting_are_bounded_per_container_and_forgotten_with_their_id() {
    let mut bench = Bench::new();
    let mut a = bench.process("a");
    let first = resolve_waiting(&mut bench, &mut a, [10, 32, 9, 1], 5000);
    for _ in 1..RESOLVING_PER_CONTAINER {
        resolve_waiting(&mut bench, &mut a, [10, 32, 9, 1], 5000);
    }
    assert!(events(&a).is_empty());
    // One more: refused at once.
    let over = resolve_waiting(&mut bench, &mut a, [10, 32, 9, 1], 5000);
    let ev = events(&a).pop().unwrap();
    assert_eq!((ev.op, ev.id), (event::ADDR_ERROR, over));
    // Another container is not held back by a's.
    let mut b = bench.process("b");
    resolve_waiting(&mut bench, &mut b, [10, 32, 9, 1], 5000);
    assert!(events(&b).is_empty());
    // A destroyed id waits no more and gets no event.
    let rec = CmRecord::request(CmOp::DestroyId, first);
    assert_eq!(bench.call(&mut a, CmOp::DestroyId, rec).0, 0);
    bench
        .cm
        .retry_resolves(&bench.table, Instant::now() + Duration::from_secs(6));
    let evs = events(&a);
    assert_eq!(evs.len(), RESOLVING_PER_CONTAINER - 1);
    assert!(evs
        .iter()
        .all(|e| e.op == event::ADDR_ERROR && e.id != first));
    assert_eq!(bench.cm.next_timeout_ms(Instant::now()), None);
}
