//! One QUIC endpoint per node, with mutual TLS, that both accepts and dials.
//!
//! ```text
//!  NodeEndpoint::bind ──► accept task ──► handshake (mTLS, ALPN)
//!                                      ──► peer node id from its certificate
//!                                      ──► member check (if a list is given)
//!                                      ──► Incoming.replication | Incoming.raft
//!  NodeEndpoint::connect(addr, expected node, alpn)
//!     ──► handshake with server name = expected node id (rustls checks the SAN)
//!     ──► peer node id from its certificate must equal the expected one
//! ```
//!
//! Accepted connections are handed out per ALPN on bounded queues
//! ([`ACCEPT_QUEUE_DEPTH`]); a connection that does not fit, fails its
//! handshake within [`HANDSHAKE_TIMEOUT`], is not from a cluster member, or
//! whose certificate carries no node id is closed with a logged reason.
//! [`send_message`] / [`recv_message`] move [`Message`] frames over QUIC
//! streams with the limits of the `frame` module.

use crate::certs::{NodeIdentity, node_id_from_cert};
use crate::frame::{self, FrameError, LEN_PREFIX_BYTES, Message};
use crate::tls::{self, ALPN_RAFT, ALPN_REPLICATION, TlsError};
use crate::types::NodeId;
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Accepted connections waiting per ALPN before new ones are refused.
pub const ACCEPT_QUEUE_DEPTH: usize = 64;
/// Most handshakes in progress at once; further connection attempts are
/// refused until some finish.
pub const MAX_PENDING_HANDSHAKES: usize = 128;
/// Longest time a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no traffic for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive interval, well under [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Most concurrent bidirectional streams a peer may open.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;

/// QUIC close code: the peer is not acceptable (identity or membership).
pub const CLOSE_REFUSED: u32 = 1;
/// QUIC close code: too many pending connections.
pub const CLOSE_BUSY: u32 = 2;
/// QUIC close code: orderly shutdown.
pub const CLOSE_SHUTDOWN: u32 = 3;
/// QUIC close code: the protocol on this connection failed.
pub const CLOSE_PROTOCOL: u32 = 4;

/// The service a connection is for, chosen by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// Journal shipping, `mirrordb-repl/1`.
    Replication,
    /// Raft RPC, `mirrordb-raft/1`.
    Raft,
}

impl Service {
    /// The ALPN bytes.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Service::Replication => ALPN_REPLICATION,
            Service::Raft => ALPN_RAFT,
        }
    }

    fn from_alpn(alpn: &[u8]) -> Option<Service> {
        match alpn {
            a if a == ALPN_REPLICATION => Some(Service::Replication),
            a if a == ALPN_RAFT => Some(Service::Raft),
            _ => None,
        }
    }
}

/// An authenticated connection to another cluster node.
#[derive(Clone, Debug)]
pub struct PeerConnection {
    /// The peer's node id, taken from its verified certificate.
    pub node: NodeId,
    /// The service negotiated by ALPN.
    pub service: Service,
    /// The QUIC connection.
    pub connection: quinn::Connection,
}

/// Connections accepted by a [`NodeEndpoint`], per service.
#[derive(Debug)]
pub struct Incoming {
    /// `mirrordb-repl/1` connections.
    pub replication: mpsc::Receiver<PeerConnection>,
    /// `mirrordb-raft/1` connections.
    pub raft: mpsc::Receiver<PeerConnection>,
}

/// Errors of binding, dialing and stream I/O.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The dial could not start.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The handshake took longer than [`HANDSHAKE_TIMEOUT`].
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The peer's certificate names another node than the one dialed.
    #[error("dialed {expected} but the peer's certificate says {got}")]
    PeerMismatch { expected: NodeId, got: NodeId },
    /// The peer presented no usable certificate.
    #[error("peer has no usable certificate")]
    NoPeerIdentity,
    /// Writing to a stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The peer sent an invalid frame.
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
}

/// Options of a node endpoint.
#[derive(Clone, Debug, Default)]
pub struct EndpointOptions {
    /// When set, only these nodes may connect.
    pub members: Option<Vec<NodeId>>,
}

/// A node's QUIC endpoint: accepts and dials with mutual TLS.
#[derive(Clone, Debug)]
pub struct NodeEndpoint {
    node: NodeId,
    endpoint: quinn::Endpoint,
    replication_client: quinn::ClientConfig,
    raft_client: quinn::ClientConfig,
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    t.max_concurrent_bidi_streams(MAX_CONCURRENT_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

fn quic_client(identity: &NodeIdentity, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = QuicClientConfig::try_from(tls::client_config(identity, alpn)?)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

impl NodeEndpoint {
    /// Binds `addr` (port 0 picks one) and starts accepting. Must run inside
    /// a tokio runtime.
    pub fn bind(
        identity: &NodeIdentity,
        addr: SocketAddr,
        options: EndpointOptions,
    ) -> Result<(NodeEndpoint, Incoming), EndpointError> {
        let server_tls = tls::server_config(identity, &[ALPN_REPLICATION, ALPN_RAFT])?;
        let crypto =
            QuicServerConfig::try_from(server_tls).map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport());
        let endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|source| EndpointError::Bind { addr, source })?;
        let (repl_tx, repl_rx) = mpsc::channel(ACCEPT_QUEUE_DEPTH);
        let (raft_tx, raft_rx) = mpsc::channel(ACCEPT_QUEUE_DEPTH);
        tokio::spawn(accept_loop(
            endpoint.clone(),
            identity.node.clone(),
            options.members,
            repl_tx,
            raft_tx,
        ));
        Ok((
            NodeEndpoint {
                node: identity.node.clone(),
                endpoint,
                replication_client: quic_client(identity, ALPN_REPLICATION)?,
                raft_client: quic_client(identity, ALPN_RAFT)?,
            },
            Incoming {
                replication: repl_rx,
                raft: raft_rx,
            },
        ))
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Dials `expected` at `addr` for `service`. The handshake verifies the
    /// peer's certificate against the cluster CA and the node id; a peer
    /// whose certificate names another node is refused.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: &NodeId,
        service: Service,
    ) -> Result<PeerConnection, EndpointError> {
        let cfg = match service {
            Service::Replication => self.replication_client.clone(),
            Service::Raft => self.raft_client.clone(),
        };
        let connecting = self.endpoint.connect_with(cfg, addr, expected.as_str())?;
        let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(peer = %expected, %addr, error = %e, "dial refused: handshake failed");
                return Err(e.into());
            }
            Err(_) => return Err(EndpointError::HandshakeTimeout),
        };
        let got = match peer_node_id(&connection) {
            Some(id) => id,
            None => {
                warn!(peer = %expected, %addr, "dial refused: peer has no node id");
                connection.close(CLOSE_REFUSED.into(), b"no node id");
                return Err(EndpointError::NoPeerIdentity);
            }
        };
        if &got != expected {
            warn!(expected = %expected, got = %got, %addr, "dial refused: node id mismatch");
            connection.close(CLOSE_REFUSED.into(), b"node id mismatch");
            return Err(EndpointError::PeerMismatch {
                expected: expected.clone(),
                got,
            });
        }
        Ok(PeerConnection {
            node: got,
            service,
            connection,
        })
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.endpoint
            .close(CLOSE_SHUTDOWN.into(), b"endpoint closed");
    }
}

/// The node id in a connection's verified peer certificate.
pub fn peer_node_id(connection: &quinn::Connection) -> Option<NodeId> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    node_id_from_cert(chain.first()?).ok()
}

fn negotiated_service(connection: &quinn::Connection) -> Option<Service> {
    let data = connection.handshake_data()?;
    let data = data.downcast::<HandshakeData>().ok()?;
    Service::from_alpn(data.protocol.as_deref()?)
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    me: NodeId,
    members: Option<Vec<NodeId>>,
    repl: mpsc::Sender<PeerConnection>,
    raft: mpsc::Sender<PeerConnection>,
) {
    let members = members.map(Arc::new);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            warn!(node = %me, remote = %incoming.remote_address(), "refused connection: too many handshakes in progress");
            incoming.refuse();
            continue;
        };
        let (members, repl, raft, me) = (members.clone(), repl.clone(), raft.clone(), me.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    warn!(node = %me, %remote, error = %e, "refused connection: handshake failed");
                    return;
                }
                Err(_) => {
                    warn!(node = %me, %remote, "refused connection: handshake timed out");
                    return;
                }
            };
            let refuse = |why: &'static str| {
                warn!(node = %me, %remote, reason = why, "refused connection");
                connection.close(CLOSE_REFUSED.into(), why.as_bytes());
            };
            let Some(peer) = peer_node_id(&connection) else {
                return refuse("peer certificate carries no node id");
            };
            if let Some(members) = &members
                && !members.contains(&peer)
            {
                warn!(node = %me, %remote, %peer, "refused connection: not a cluster member");
                connection.close(CLOSE_REFUSED.into(), b"not a cluster member");
                return;
            }
            let Some(service) = negotiated_service(&connection) else {
                return refuse("no known ALPN");
            };
            let tx = match service {
                Service::Replication => repl,
                Service::Raft => raft,
            };
            debug!(node = %me, %remote, %peer, ?service, "accepted connection");
            let pc = PeerConnection {
                node: peer,
                service,
                connection: connection.clone(),
            };
            if let Err(e) = tx.try_send(pc) {
                let why: &[u8] = match e {
                    mpsc::error::TrySendError::Full(_) => b"busy",
                    mpsc::error::TrySendError::Closed(_) => b"service not running",
                };
                warn!(node = %me, %remote, ?service, "refused connection: {}", String::from_utf8_lossy(why));
                connection.close(CLOSE_BUSY.into(), why);
            }
        });
    }
}

/// Writes one message as a frame on `send`.
pub async fn send_message(
    send: &mut quinn::SendStream,
    msg: &Message,
) -> Result<(), EndpointError> {
    let bytes = frame::encode(msg)?;
    send.write_all(&bytes).await?;
    Ok(())
}

/// Reads one message from `recv`; `Ok(None)` when the peer finished the
/// stream cleanly between frames.
pub async fn recv_message(recv: &mut quinn::RecvStream) -> Result<Option<Message>, EndpointError> {
    let mut prefix = [0u8; LEN_PREFIX_BYTES];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::decode_len(prefix)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(Some(frame::decode_body(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::ClusterCa;
    use crate::types::{Epoch, Lsn};

    fn identity(ca: &ClusterCa, node: &str) -> NodeIdentity {
        let cert = ca
            .issue(&NodeId::from(node), &["127.0.0.1".into()])
            .unwrap();
        NodeIdentity::from_issued(ca, &cert).unwrap()
    }

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn ping() -> Message {
        Message::Heartbeat {
            primary_last_lsn: Lsn(7),
            epoch: Epoch(1),
        }
    }

    #[tokio::test]
    async fn two_nodes_connect_and_exchange_a_frame() {
        let ca = ClusterCa::generate("t").unwrap();
        let (a, _a_in) =
            NodeEndpoint::bind(&identity(&ca, "n1"), loopback(), Default::default()).unwrap();
        let opts = EndpointOptions {
            members: Some(vec![NodeId::from("n1"), NodeId::from("n2")]),
        };
        let (b, mut b_in) = NodeEndpoint::bind(&identity(&ca, "n2"), loopback(), opts).unwrap();
        let b_addr = b.local_addr().unwrap();

        let client = a
            .connect(b_addr, &NodeId::from("n2"), Service::Replication)
            .await
            .unwrap();
        assert_eq!(client.node, NodeId::from("n2"));
        let (mut send, mut recv) = client.connection.open_bi().await.unwrap();
        send_message(&mut send, &ping()).await.unwrap();

        let server = b_in.replication.recv().await.unwrap();
        assert_eq!(server.node, NodeId::from("n1"));
        assert_eq!(server.service, Service::Replication);
        let (mut s_send, mut s_recv) = server.connection.accept_bi().await.unwrap();
        assert_eq!(recv_message(&mut s_recv).await.unwrap(), Some(ping()));
        send_message(&mut s_send, &ping()).await.unwrap();
        s_send.finish().unwrap();
        assert_eq!(recv_message(&mut recv).await.unwrap(), Some(ping()));
        assert_eq!(recv_message(&mut recv).await.unwrap(), None);

        // The raft ALPN lands on its own queue.
        let raft = a
            .connect(b_addr, &NodeId::from("n2"), Service::Raft)
            .await
            .unwrap();
        let got = b_in.raft.recv().await.unwrap();
        assert_eq!((got.node.as_str(), got.service), ("n1", Service::Raft));
        drop(raft);
    }

    #[tokio::test]
    async fn a_node_of_another_ca_is_refused() {
        let ca = ClusterCa::generate("t").unwrap();
        let other = ClusterCa::generate("intruder").unwrap();
        let (b, mut b_in) =
            NodeEndpoint::bind(&identity(&ca, "n2"), loopback(), Default::default()).unwrap();
        let (x, _x_in) =
            NodeEndpoint::bind(&identity(&other, "n1"), loopback(), Default::default()).unwrap();
        let b_addr = b.local_addr().unwrap();
        // The intruder does not trust n2's CA either, so the dial fails; and
        // n2 never hands a connection out.
        assert!(
            x.connect(b_addr, &NodeId::from("n2"), Service::Replication)
                .await
                .is_err()
        );
        // n2 dialing the intruder refuses it too.
        let x_addr = x.local_addr().unwrap();
        assert!(
            b.connect(x_addr, &NodeId::from("n1"), Service::Replication)
                .await
                .is_err()
        );
        let waited =
            tokio::time::timeout(Duration::from_millis(300), b_in.replication.recv()).await;
        assert!(waited.is_err(), "a foreign node got through");
    }

    #[tokio::test]
    async fn a_client_without_certificate_is_refused() {
        let ca = ClusterCa::generate("t").unwrap();
        let id = identity(&ca, "n2");
        let (b, mut b_in) = NodeEndpoint::bind(&id, loopback(), Default::default()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(id.ca.clone()).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_REPLICATION.to_vec()];
        let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        let client = quinn::Endpoint::client(loopback()).unwrap();
        let outcome = async {
            let conn = client
                .connect_with(cfg, b.local_addr().unwrap(), "n2")?
                .await?;
            // TLS 1.3: the server judges the client's certificate after the
            // client thinks the handshake is done; using the connection fails.
            let (mut send, mut recv) = conn.open_bi().await?;
            send_message(&mut send, &ping()).await?;
            recv_message(&mut recv).await
        }
        .await;
        assert!(outcome.is_err(), "anonymous client was served: {outcome:?}");
        let waited =
            tokio::time::timeout(Duration::from_millis(300), b_in.replication.recv()).await;
        assert!(waited.is_err(), "an anonymous client got through");
    }

    #[tokio::test]
    async fn a_node_id_mismatch_is_refused() {
        let ca = ClusterCa::generate("t").unwrap();
        let (a, _a_in) =
            NodeEndpoint::bind(&identity(&ca, "n1"), loopback(), Default::default()).unwrap();
        let (b, _b_in) =
            NodeEndpoint::bind(&identity(&ca, "n2"), loopback(), Default::default()).unwrap();
        // Dialing n3 but n2 answers: refused.
        let err = a
            .connect(
                b.local_addr().unwrap(),
                &NodeId::from("n3"),
                Service::Replication,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                EndpointError::Connection(_) | EndpointError::PeerMismatch { .. }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_certificate_that_only_lists_the_name_as_a_host_is_refused() {
        // n2's certificate also lists "n3" as a host name: TLS name checks
        // pass for "n3", but the node id (first SAN) is n2.
        let ca = ClusterCa::generate("t").unwrap();
        let cert = ca
            .issue(&NodeId::from("n2"), &["n3".into(), "127.0.0.1".into()])
            .unwrap();
        let n2 = NodeIdentity::from_issued(&ca, &cert).unwrap();
        let (a, _a_in) =
            NodeEndpoint::bind(&identity(&ca, "n1"), loopback(), Default::default()).unwrap();
        let (b, _b_in) = NodeEndpoint::bind(&n2, loopback(), Default::default()).unwrap();
        let err = a
            .connect(
                b.local_addr().unwrap(),
                &NodeId::from("n3"),
                Service::Replication,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, EndpointError::PeerMismatch { ref got, .. } if got.as_str() == "n2"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_non_member_is_refused_by_the_acceptor() {
        let ca = ClusterCa::generate("t").unwrap();
        let opts = EndpointOptions {
            members: Some(vec![NodeId::from("n1"), NodeId::from("n2")]),
        };
        let (b, mut b_in) = NodeEndpoint::bind(&identity(&ca, "n2"), loopback(), opts).unwrap();
        let (c, _c_in) =
            NodeEndpoint::bind(&identity(&ca, "n9"), loopback(), Default::default()).unwrap();
        let outcome = async {
            let pc = c
                .connect(
                    b.local_addr().unwrap(),
                    &NodeId::from("n2"),
                    Service::Replication,
                )
                .await?;
            let (mut send, mut recv) = pc.connection.open_bi().await?;
            send_message(&mut send, &ping()).await?;
            recv_message(&mut recv).await
        }
        .await;
        assert!(outcome.is_err(), "non-member was served: {outcome:?}");
        let waited =
            tokio::time::timeout(Duration::from_millis(300), b_in.replication.recv()).await;
        assert!(waited.is_err(), "a non-member got through");
    }
}
