//! Connects served on the shards. The control thread reads a process's requests, checks them
//! and takes a host socket bound to an announced or claimed port ([`super::connect`]); the
//! kernel's connect, which runs both ends' SYN handling on the calling thread (about half of a
//! connect's CPU), and the reply with the socket go to a shard, each process's to one shard, so
//! that the host's connects are no longer served one after the other by one thread. Replies are
//! numbered, so the process takes them from either thread. What a shard cannot finish (a
//! refused connect: its port's announcement or claim must be taken back; a reply that does not
//! fit in the process's connection: it waits in order with the others) goes back to the
//! control thread ([`SetupReturns`]).

use super::connect::{ConnectJob, ConnectOutcome, FailedConnect};
use crossbeam_queue::ArrayQueue;
use freeflow_proto::doorbell::EventFd;
use freeflow_proto::fdpass;
use freeflow_proto::sockmsg::SockReply;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// Connects given back to the control thread at most at once; beyond, a shard drops one (its
/// process's request times out and takes the overlay, as with a router that does not answer).
const RETURNS_CAPACITY: usize = 4096;

/// A connect for a shard: the job, the process's session connection (a reference: the control
/// thread may drop the session meanwhile; a reply sent to a process that went away fails and
/// is dropped), and the way back.
pub struct ShardConnect {
    pub job: ConnectJob,
    pub conn: Arc<OwnedFd>,
    pub returns: Arc<SetupReturns>,
}

/// What a shard gives back to the control thread.
pub enum SetupReturn {
    /// The reply did not fit in process `attachment`'s connection: it waits in the control
    /// thread's outbox for that process, in order.
    Unsent {
        attachment: u32,
        reply: SockReply,
        socket: OwnedFd,
    },
    /// The kernel refused the connect (see [`super::TcpService::connect_failed`]).
    Failed(FailedConnect),
}

/// The shards' way back to the control thread: a queue, and a doorbell the control thread
/// polls.
pub struct SetupReturns {
    queue: ArrayQueue<SetupReturn>,
    pub bell: EventFd,
}

impl SetupReturns {
    pub fn new() -> io::Result<SetupReturns> {
        Ok(SetupReturns {
            queue: ArrayQueue::new(RETURNS_CAPACITY),
            bell: EventFd::new()?,
        })
    }

    /// Queues `item` and wakes the control thread; false if the queue was full (`item` is
    /// dropped).
    fn give_back(&self, item: SetupReturn) -> bool {
        if self.queue.push(item).is_err() {
            return false;
        }
        if let Err(e) = self.bell.ring() {
            log::warn!("tcp: waking the control thread: {e}");
        }
        true
    }

    /// The next item given back, if any (the control thread's side).
    pub fn take(&self) -> Option<SetupReturn> {
        self.queue.pop()
    }
}

/// How a shard's connect ended, for its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardConnected {
    /// Connecting, and the reply with the socket sent.
    Answered,
    /// Given back to the control thread.
    Returned,
    /// Dropped: the process went away, or the way back was full.
    Dropped,
}

impl ShardConnect {
    /// Runs the connect and answers the process, or gives the rest back.
    pub fn serve(self) -> ShardConnected {
        let ShardConnect { job, conn, returns } = self;
        let item = match job.run() {
            ConnectOutcome::Connected {
                attachment,
                reply,
                socket,
            } => {
                match fdpass::try_send_with_fds(conn.as_fd(), &reply.encode(), &[socket.as_fd()]) {
                    Ok(_) => return ShardConnected::Answered,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => SetupReturn::Unsent {
                        attachment,
                        reply,
                        socket,
                    },
                    // The process went away: its session's end tells the control thread.
                    Err(_) => return ShardConnected::Dropped,
                }
            }
            ConnectOutcome::Failed(failed) => SetupReturn::Failed(failed),
        };
        match returns.give_back(item) {
            true => ShardConnected::Returned,
            false => {
                log::warn!(
                    target: "tcp connect returns full",
                    "tcp: a shard's connect could not be given back (queue full); its process \
                     takes the overlay after its timeout"
                );
                ShardConnected::Dropped
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::claims::Target;
    use super::super::endpoint::HostEndpoint;
    use super::super::ports::BoundSocket;
    use super::super::{Setup, TcpService};
    use super::*;
    use crate::sys;
    use freeflow_proto::control::{NetworkView, PeerHost};
    use freeflow_proto::sockmsg::SockStatus;
    use std::net::{Ipv4Addr, TcpListener};
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    const CONTAINER: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 2);

    /// A connect job from a fresh loopback socket to `listener`.
    fn job(listener: HostEndpoint, seq: u32, claimed: bool) -> (ConnectJob, u16) {
        let socket = sys::tcp_socket(false).unwrap();
        sys::bind(&socket, Ipv4Addr::LOCALHOST, 0, false).unwrap();
        let port = sys::local_port(&socket).unwrap();
        let job = ConnectJob {
            attachment: 3,
            seq,
            key: Target {
                container: CONTAINER,
                dst_host: listener.ip(),
                to_port: listener.port(),
            },
            listener,
            bound: BoundSocket { socket, port },
            v6: false,
            claimed,
            tenant: "t".into(),
        };
        (job, port)
    }

    /// The process's end and the router's (shared, as a shard holds it).
    fn session() -> (UnixDatagram, Arc<OwnedFd>) {
        let (process, router) = UnixDatagram::pair().unwrap();
        process
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (process, Arc::new(OwnedFd::from(router)))
    }

    fn receive(process: &UnixDatagram) -> (SockReply, Vec<OwnedFd>) {
        let mut buf = [0u8; 64];
        let got = fdpass::recv_with_fds(process.as_fd(), &mut buf, 0).expect("a reply");
        (SockReply::decode(&buf[..got.len]).unwrap(), got.fds)
    }

    /// A shard's connect answers the process itself: the reply names the container's overlay
    /// address and the bound port, and the socket that comes with it is the one connected to
    /// the listener (its accepted peer is that port).
    #[test]
    fn a_shard_answers_a_connect_on_the_process_connection_with_the_connecting_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = HostEndpoint::new(Ipv4Addr::LOCALHOST, listener.local_addr().unwrap().port());
        let (process, conn) = session();
        let (job, port) = job(at, 41, true);
        let returns = Arc::new(SetupReturns::new().unwrap());
        let served = ShardConnect {
            job,
            conn,
            returns: returns.clone(),
        }
        .serve();
        assert_eq!(served, ShardConnected::Answered);
        let (reply, fds) = receive(&process);
        assert_eq!((reply.status, reply.seq), (SockStatus::Ok, 41));
        assert_eq!((reply.ip, reply.port), (CONTAINER, port));
        assert_eq!(fds.len(), 1, "the socket comes with the reply");
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer.port(), port);
        assert_eq!(sys::local_port(&fds[0]).unwrap(), port);
        assert!(returns.take().is_none(), "nothing given back");
    }

    /// A reply that does not fit in the process's connection is not dropped: it goes back to
    /// the control thread (which keeps it in the process's outbox), and its doorbell rings.
    #[test]
    fn a_reply_that_does_not_fit_goes_back_to_the_control_thread_with_its_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = HostEndpoint::new(Ipv4Addr::LOCALHOST, listener.local_addr().unwrap().port());
        let (_process, conn) = session();
        // Fill the process's side, bounded.
        let filler = SockReply::fallback(1).encode();
        let full = (0..100_000).any(|_| {
            fdpass::try_send_with_fds(conn.as_fd(), &filler, &[])
                .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        });
        assert!(full, "the connection filled up");
        let returns = Arc::new(SetupReturns::new().unwrap());
        let (job, port) = job(at, 42, true);
        let served = ShardConnect {
            job,
            conn,
            returns: returns.clone(),
        }
        .serve();
        assert_eq!(served, ShardConnected::Returned);
        assert!(returns.bell.drain() > 0, "the control thread is woken");
        match returns.take() {
            Some(SetupReturn::Unsent {
                attachment,
                reply,
                socket,
            }) => {
                assert_eq!((attachment, reply.seq, reply.port), (3, 42, port));
                assert_eq!(sys::local_port(&socket).unwrap(), port);
            }
            _ => panic!("the unsent reply comes back"),
        }
    }

    /// A connect the kernel refuses goes back to the control thread, which answers with the
    /// error, counts no connect, and takes the port's announcement back.
    #[test]
    fn a_refused_connect_is_answered_by_the_control_thread_with_the_kernel_error() {
        let mut tcp = TcpService::default();
        tcp.set_network(NetworkView {
            host_ip: Ipv4Addr::LOCALHOST,
            peer_port: 0,
            hosts: vec![PeerHost {
                host_ip: Ipv4Addr::LOCALHOST,
                peer_port: 1,
            }],
            overlay: Vec::new(),
        });
        // The broadcast address: the kernel refuses the connect at once (ENETUNREACH).
        let unreachable = HostEndpoint::new(Ipv4Addr::BROADCAST, 80);
        let (job, _) = job(unreachable, 43, false);
        tcp.counters.connected("t", false);
        let (process, conn) = session();
        let returns = Arc::new(SetupReturns::new().unwrap());
        let served = ShardConnect {
            job,
            conn,
            returns: returns.clone(),
        }
        .serve();
        assert_eq!(served, ShardConnected::Returned);
        let Some(SetupReturn::Failed(failed)) = returns.take() else {
            panic!("the refused connect comes back");
        };
        assert_eq!(failed.attachment, 3);
        let Setup::Reply((reply, socket)) = tcp.connect_failed(failed) else {
            panic!("answered at once");
        };
        assert_eq!((reply.status, reply.seq), (SockStatus::Error, 43));
        assert_eq!(reply.errno, libc::ENETUNREACH);
        assert!(socket.is_none());
        assert_eq!(tcp.counters.connects, 0, "the connect is not counted");
        assert_eq!(tcp.counters.by_tenant["t"].connects, 0);
        process.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(
            process.recv(&mut buf).is_err(),
            "the shard sent the process nothing"
        );
    }
}
