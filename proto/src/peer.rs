//! What routers tell each other about TCP mode: JSON lines on a TCP connection to each host's
//! peer port. A router sends its listener table whenever it changes (and first on every new
//! connection), announces the overlay address of each connection it is about to make to a
//! listener of the receiver, and claims host ports ahead of connects.
//!
//! A message is one line: the JSON object of [`PeerMsg`] (tagged by `"t"`) and `\n`.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// One accelerated listener in a router's table: overlay address `ip:port` listens on host port
/// `host_port` of the router's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerEntry {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub host_port: u16,
}

/// A router-to-router message. `host` is always the sender's host address (a receiver believes
/// a peer only about its own host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum PeerMsg {
    /// The sender's complete listener table (replaces what the receiver had for that host).
    Listeners {
        host: Ipv4Addr,
        entries: Vec<ListenerEntry>,
    },
    /// Host port `host_port` of the sender is the overlay address `ip:port`; it is about to
    /// connect to the receiver's listener on host port `to_port`.
    Conn {
        host: Ipv4Addr,
        host_port: u16,
        ip: Ipv4Addr,
        port: u16,
        #[serde(default)]
        to_port: Option<u16>,
    },
    /// Host ports `ports` of the sender are bound for connects of the overlay address `ip` to
    /// the receiver's listener on host port `to_port` (each port is also its overlay port):
    /// announcements made ahead, so that neither router is on the connect's critical path.
    /// `fresh`: newly bound ports (the listener's processes are told); otherwise said again.
    Claim {
        host: Ipv4Addr,
        ip: Ipv4Addr,
        to_port: u16,
        ports: Vec<u16>,
        fresh: bool,
    },
    /// rdma_cm between hosts: one step of a connection between an id of the sender and one of
    /// the receiver (docs/rdma-cm.md, "Across hosts").
    Cm { host: Ipv4Addr, msg: CmPeerMsg },
    /// Claimed or announced ports given back unused (a claim's pool went, a connect failed).
    Release {
        host: Ipv4Addr,
        ip: Ipv4Addr,
        to_port: u16,
        ports: Vec<u16>,
    },
}

/// One step of an rdma_cm connection between two routers' ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmPeerMsg {
    /// A `freeflow_proto::cm::CmOp`: Connect, Accept, Reject, Establish or Disconnect
    /// (destroying a connected id disconnects).
    pub op: u16,
    /// The sender's id.
    pub from_id: u32,
    /// The receiver's id (0 for a Connect, which makes one).
    pub to_id: u32,
    /// Connect: the active id's address and the listener's.
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
    pub ps: u16,
    pub qpn: u32,
    /// responder resources, initiator depth, flow control, retry count, RNR retry count, SRQ.
    pub conn: [u8; 6],
    /// Reject: the reason (an event status).
    pub status: i32,
    pub private_data: Vec<u8>,
}

/// A line that is not a [`PeerMsg`].
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PeerDecodeError(#[from] serde_json::Error);

impl PeerMsg {
    /// The message as one line, `\n` included.
    pub fn encode_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("peer messages serialise");
        line.push(b'\n');
        line
    }

    /// Decodes one line (its `\n`, if present, is whitespace to the decoder).
    pub fn decode_line(line: &[u8]) -> Result<PeerMsg, PeerDecodeError> {
        Ok(serde_json::from_slice(line)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire format: what routers of an older build send and expect, byte for byte.
    #[test]
    fn peer_messages_are_tagged_json_lines() {
        let host = Ipv4Addr::new(192, 0, 2, 1);
        let ip = Ipv4Addr::new(10, 32, 0, 2);
        let cases = [
            (
                PeerMsg::Listeners {
                    host,
                    entries: vec![ListenerEntry {
                        ip,
                        port: 80,
                        host_port: 40000,
                    }],
                },
                r#"{"t":"listeners","host":"192.0.2.1","entries":[{"ip":"10.32.0.2","port":80,"host_port":40000}]}"#,
            ),
            (
                PeerMsg::Conn {
                    host,
                    host_port: 40001,
                    ip,
                    port: 40001,
                    to_port: None,
                },
                r#"{"t":"conn","host":"192.0.2.1","host_port":40001,"ip":"10.32.0.2","port":40001,"to_port":null}"#,
            ),
            (
                PeerMsg::Claim {
                    host,
                    ip,
                    to_port: 5001,
                    ports: vec![1, 2],
                    fresh: true,
                },
                r#"{"t":"claim","host":"192.0.2.1","ip":"10.32.0.2","to_port":5001,"ports":[1,2],"fresh":true}"#,
            ),
            (
                PeerMsg::Release {
                    host,
                    ip,
                    to_port: 5001,
                    ports: vec![3],
                },
                r#"{"t":"release","host":"192.0.2.1","ip":"10.32.0.2","to_port":5001,"ports":[3]}"#,
            ),
        ];
        for (msg, json) in cases {
            let line = msg.encode_line();
            assert_eq!(line, format!("{json}\n").into_bytes());
            assert_eq!(PeerMsg::decode_line(&line).unwrap(), msg);
        }
        // An older sender's announcement without `to_port`.
        let old = br#"{"t":"conn","host":"192.0.2.1","host_port":1,"ip":"10.32.0.2","port":1}"#;
        assert!(matches!(
            PeerMsg::decode_line(old),
            Ok(PeerMsg::Conn { to_port: None, .. })
        ));
        assert!(PeerMsg::decode_line(b"{\"t\":\"bogus\"}\n").is_err());
    }
}
