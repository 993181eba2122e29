//! [`RaftTransport`] over the node's mutual-TLS QUIC endpoint (ALPN
//! `mirrordb-raft/1`, [`Service::Raft`]).
//!
//! Each call is one bidirectional stream carrying one request frame and one
//! reply frame ([`framing`](super::framing)). The dialing side keeps one
//! connection per peer and redials lazily once it is closed; a dial runs in
//! its own task, so a caller's short deadline (openraft gives heartbeats
//! `heartbeat_ms`) never cancels a handshake half-way, and at most one dial
//! per peer is in flight.
//!
//! ```text
//!  dialer:   QuicTransport::call ──► cached connection (or one dial task)
//!              ──► open_bi ──► write_frame(request), finish ──► read_frame(reply)
//!  acceptor: Incoming.raft ──► PeerConnection{node (from its certificate)}
//!              ──► accept_bi (≤ MAX_CONCURRENT_RPCS in flight)
//!              ──► admit(peer)? ──► read_frame ──► sender claim = peer? ──► RpcService::serve
//!              ──► write_frame(reply) | reset(REFUSED)
//! ```
//!
//! Checks on the receiving side, besides what the endpoint already did (CA,
//! node id in the certificate, its static member list): the peer must pass
//! the admission check ([`QuicServer::with_admission`], e.g.
//! [`raft_membership`]); a Raft request's vote must name the peer itself (a
//! node cannot speak as another node's leader or candidate); and the
//! [`RpcHandler`](super::network::RpcHandler) refuses requests whose envelope
//! names another target id. A refused request gets its stream reset with
//! [`STREAM_REFUSED`]; the caller sees a transport error, which openraft
//! treats as `Unreachable`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mirrordb_replication::endpoint::{NodeEndpoint, PeerConnection, Service};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, warn};

use super::framing::{read_frame, write_frame};
use super::network::{RaftRequest, RaftTransport, RpcService, TransportError, decode_request};
use super::{Raft, RaftNode};
use crate::NodeId;
use crate::state::raft_id;

/// Longest time one dial (resolve + QUIC/TLS handshake) may take; it runs in
/// the background, independent of the caller's deadline.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Most requests served at once by one [`QuicServer`], over all peers.
/// Further streams wait (QUIC flow control holds the peers back).
pub const MAX_CONCURRENT_RPCS: usize = 64;
/// Longest time the receiving side spends on one stream: reading the
/// request, handling it, writing the reply.
pub const SERVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Stream reset code: the receiver refused the request.
pub const STREAM_REFUSED: u32 = 1;
/// A cached connection on which calls time out and nothing has answered
/// for this long is closed, and the next call dials again. A peer that was
/// killed and restarted on the same address never answers on the old
/// connection (its stateless resets carry another key), and QUIC would
/// notice only at the idle timeout (10 s): until then the leader's
/// heartbeats to the restarted node were lost and it disrupted the cluster
/// with elections of ever higher terms.
pub const STALE_AFTER: Duration = Duration::from_secs(1);
/// Close code of a connection given up as stale.
const CLOSE_STALE: u32 = 2;

/// Whether a peer (authenticated by its certificate) may send requests.
pub type Admission = Arc<dyn Fn(&NodeId) -> bool + Send + Sync>;

/// Admits peers in the Raft membership `raft` knows (voters and learners),
/// and every certified peer while it knows none (a node waiting to be
/// bootstrapped or joined must hear from the leader first).
///
/// Caveat: a node whose log is far behind judges by its old membership, so
/// it refuses a leader that joined after that; pair it with the endpoint's
/// static member list, or keep a lagging node's log within reach.
#[must_use]
pub fn raft_membership(raft: Raft) -> Admission {
    let metrics = raft.metrics();
    Arc::new(move |peer: &NodeId| {
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let mut nodes = membership.nodes().peekable();
        if nodes.peek().is_none() {
            return true;
        }
        nodes.any(|(id, node)| *id == raft_id(peer) && node.name == *peer)
    })
}

/// A dialed connection, or the dial in flight.
enum Slot {
    Ready {
        addr: String,
        connection: quinn::Connection,
        /// When a reply last arrived on it (or it was dialed).
        answered: Arc<Mutex<Instant>>,
    },
    Dialing(watch::Receiver<Option<Result<quinn::Connection, TransportError>>>),
}

/// The dialing side: a [`RaftTransport`] over a [`NodeEndpoint`].
pub struct QuicTransport {
    endpoint: NodeEndpoint,
    peers: Arc<Mutex<HashMap<NodeId, Slot>>>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("node", self.endpoint.node())
            .finish_non_exhaustive()
    }
}

fn unreachable(target: &RaftNode, why: impl std::fmt::Display) -> TransportError {
    TransportError::Unreachable(target.to_string(), why.to_string())
}

impl QuicTransport {
    /// Calls go out through `endpoint` (which keeps accepting as before).
    #[must_use]
    pub fn new(endpoint: NodeEndpoint) -> Self {
        QuicTransport {
            endpoint,
            peers: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn lock(
        peers: &Mutex<HashMap<NodeId, Slot>>,
    ) -> std::sync::MutexGuard<'_, HashMap<NodeId, Slot>> {
        // Nothing panics while holding this lock; if something did, the map
        // is still a valid cache.
        peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached connection to `target`, or the dial that will give one.
    fn connection_or_dial(
        &self,
        target: &RaftNode,
    ) -> Result<quinn::Connection, watch::Receiver<Option<Result<quinn::Connection, TransportError>>>>
    {
        let mut peers = Self::lock(&self.peers);
        match peers.get(&target.name) {
            Some(Slot::Ready {
                addr, connection, ..
            }) if *addr == target.raft_addr && connection.close_reason().is_none() => {
                return Ok(connection.clone());
            }
            Some(Slot::Dialing(rx)) => return Err(rx.clone()),
            _ => {}
        }
        let (tx, rx) = watch::channel(None);
        peers.insert(target.name.clone(), Slot::Dialing(rx.clone()));
        let (endpoint, peers, target) = (self.endpoint.clone(), self.peers.clone(), target.clone());
        tokio::spawn(async move {
            let result = match tokio::time::timeout(DIAL_TIMEOUT, dial(&endpoint, &target)).await {
                Ok(r) => r,
                Err(_) => Err(unreachable(&target, "dial timed out")),
            };
            {
                let mut peers = Self::lock(&peers);
                match &result {
                    Ok(connection) => {
                        peers.insert(
                            target.name.clone(),
                            Slot::Ready {
                                addr: target.raft_addr.clone(),
                                connection: connection.clone(),
                                answered: Arc::new(Mutex::new(Instant::now())),
                            },
                        );
                    }
                    Err(e) => {
                        debug!(peer = %target, error = %e, "raft dial failed");
                        peers.remove(&target.name);
                    }
                }
            }
            // Nobody may be waiting any more; that is fine.
            let _ = tx.send(Some(result));
        });
        Err(rx)
    }

    async fn connection(&self, target: &RaftNode) -> Result<quinn::Connection, TransportError> {
        match self.connection_or_dial(target) {
            Ok(c) => Ok(c),
            Err(mut rx) => match rx.wait_for(Option::is_some).await {
                Ok(r) => r
                    .clone()
                    .unwrap_or_else(|| Err(unreachable(target, "dial vanished"))),
                Err(_) => Err(unreachable(target, "dial task ended")),
            },
        }
    }

    /// Forgets `connection` if it is still the cached one for `target`.
    fn forget(&self, target: &RaftNode, connection: &quinn::Connection) {
        let mut peers = Self::lock(&self.peers);
        if let Some(Slot::Ready { connection: c, .. }) = peers.get(&target.name)
            && c.stable_id() == connection.stable_id()
        {
            peers.remove(&target.name);
        }
    }

    /// Notes a reply on `connection` (when it is the cached one), or, after
    /// a timeout, closes and forgets it once it has been silent for
    /// [`STALE_AFTER`].
    fn after_call(&self, target: &RaftNode, connection: &quinn::Connection, replied: bool) {
        let mut peers = Self::lock(&self.peers);
        let Some(Slot::Ready {
            connection: c,
            answered,
            ..
        }) = peers.get(&target.name)
        else {
            return;
        };
        if c.stable_id() != connection.stable_id() {
            return;
        }
        let mut answered = answered.lock().unwrap_or_else(|p| p.into_inner());
        if replied {
            *answered = Instant::now();
        } else if answered.elapsed() >= STALE_AFTER {
            debug!(peer = %target, silent_ms = answered.elapsed().as_millis(), "raft connection silent; redialing");
            drop(answered);
            connection.close(CLOSE_STALE.into(), b"no answer");
            peers.remove(&target.name);
        }
    }

    async fn exchange(
        &self,
        target: &RaftNode,
        connection: &quinn::Connection,
        request: &[u8],
    ) -> Result<Vec<u8>, TransportError> {
        let (mut send, mut recv) = match connection.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.forget(target, connection);
                return Err(unreachable(target, e));
            }
        };
        let name = |e: TransportError| match e {
            TransportError::Unreachable(_, why) => unreachable(target, why),
            other => other,
        };
        write_frame(&mut send, request).await.map_err(name)?;
        // The peer reads exactly one frame; finishing only says so early.
        let _ = send.finish();
        let reply = read_frame(&mut recv).await.map_err(name);
        if reply.is_err() && connection.close_reason().is_some() {
            self.forget(target, connection);
        }
        reply
    }
}

async fn dial(
    endpoint: &NodeEndpoint,
    target: &RaftNode,
) -> Result<quinn::Connection, TransportError> {
    let addr: SocketAddr = match target.raft_addr.parse() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(target.raft_addr.as_str())
            .await
            .map_err(|e| unreachable(target, format!("resolve: {e}")))?
            .next()
            .ok_or_else(|| unreachable(target, "resolves to no address"))?,
    };
    endpoint
        .connect(addr, &target.name, Service::Raft)
        .await
        .map(|pc| pc.connection)
        .map_err(|e| unreachable(target, e))
}

impl RaftTransport for QuicTransport {
    async fn call(
        &self,
        target: &RaftNode,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let connection = tokio::time::timeout_at(deadline, self.connection(target))
            .await
            .map_err(|_| TransportError::Timeout(target.to_string(), timeout))??;
        match tokio::time::timeout_at(deadline, self.exchange(target, &connection, &request)).await
        {
            Ok(reply) => {
                if reply.is_ok() {
                    self.after_call(target, &connection, true);
                }
                reply
            }
            Err(_) => {
                self.after_call(target, &connection, false);
                Err(TransportError::Timeout(target.to_string(), timeout))
            }
        }
    }
}

/// The receiving side: serves Raft connections accepted by the endpoint
/// with the node's [`RpcService`].
pub struct QuicServer {
    local: NodeId,
    service: Arc<dyn RpcService>,
    admission: Admission,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for QuicServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicServer")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl QuicServer {
    /// Serves requests for node `local` with `service`, admitting every peer
    /// the endpoint accepted (see [`QuicServer::with_admission`]).
    #[must_use]
    pub fn new(local: NodeId, service: Arc<dyn RpcService>) -> Self {
        QuicServer {
            local,
            service,
            admission: Arc::new(|_: &NodeId| true),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_RPCS)),
        }
    }

    /// Only peers for which `admission` holds are served, checked per
    /// request (membership changes take effect on open connections).
    #[must_use]
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = admission;
        self
    }

    /// Serves every connection from `incoming` (the endpoint's
    /// `Incoming.raft`) until it closes. Spawn it:
    /// `tokio::spawn(server.run(incoming.raft))`.
    pub async fn run(self, mut incoming: mpsc::Receiver<PeerConnection>) {
        let this = Arc::new(self);
        while let Some(pc) = incoming.recv().await {
            if pc.service != Service::Raft {
                warn!(node = %this.local, peer = %pc.node, "not a raft connection; closed");
                pc.connection.close(STREAM_REFUSED.into(), b"not raft");
                continue;
            }
            tokio::spawn(this.clone().serve_connection(pc));
        }
    }

    async fn serve_connection(self: Arc<Self>, pc: PeerConnection) {
        loop {
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                return;
            };
            let (send, recv) = match pc.connection.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(node = %self.local, peer = %pc.node, error = %e, "raft connection ended");
                    return;
                }
            };
            let this = self.clone();
            let peer = pc.node.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut send = send;
                let served =
                    tokio::time::timeout(SERVE_TIMEOUT, this.serve_stream(&peer, &mut send, recv))
                        .await
                        .unwrap_or_else(|_| {
                            Err(TransportError::Timeout(peer.to_string(), SERVE_TIMEOUT))
                        });
                if let Err(e) = served {
                    debug!(node = %this.local, %peer, error = %e, "raft request refused");
                    let _ = send.reset(STREAM_REFUSED.into());
                }
            });
        }
    }

    async fn serve_stream(
        &self,
        peer: &NodeId,
        send: &mut quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), TransportError> {
        // Before reading: a refused peer makes us allocate nothing.
        if !(self.admission)(peer) {
            warn!(node = %self.local, %peer, "raft request from a non-member refused");
            return Err(TransportError::Refused(format!("{peer} is not a member")));
        }
        let request = read_frame(&mut recv).await?;
        check_sender(peer, &request)?;
        let reply = self.service.serve(&request).await?;
        write_frame(send, &reply).await?;
        let _ = send.finish();
        Ok(())
    }
}

/// A Raft request's vote names its sender (the leader or the candidate);
/// it must be the authenticated peer.
fn check_sender(peer: &NodeId, request: &[u8]) -> Result<(), TransportError> {
    let envelope = decode_request(request)?;
    let claimed = match &envelope.request {
        RaftRequest::AppendEntries(r) => r.vote.leader_id().voted_for(),
        RaftRequest::Vote(r) => r.vote.leader_id().voted_for(),
        RaftRequest::InstallSnapshot(r) => r.vote.leader_id().voted_for(),
        RaftRequest::Control(_) => None,
    };
    match claimed {
        Some(id) if id != raft_id(peer) => Err(TransportError::Refused(format!(
            "{peer} sent a request in the name of raft id {id}"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::Vote;
    use openraft::raft::VoteRequest;
    use proptest::prelude::*;

    use super::super::network::{ControlRequest, RpcEnvelope};

    fn vote_from(candidate: u64) -> Vec<u8> {
        let env = RpcEnvelope {
            target: 1,
            request: RaftRequest::Vote(VoteRequest::new(Vote::new(1, candidate), None)),
        };
        postcard::to_stdvec(&env).expect("encodes")
    }

    #[test]
    fn a_vote_in_the_peers_own_name_passes_and_another_name_is_refused() {
        let n2 = NodeId::from("n2");
        assert_eq!(check_sender(&n2, &vote_from(raft_id(&n2))), Ok(()));
        let other = raft_id(&NodeId::from("n3"));
        assert!(matches!(
            check_sender(&n2, &vote_from(other)),
            Err(TransportError::Refused(_))
        ));
        let control = RpcEnvelope {
            target: 1,
            request: RaftRequest::Control(ControlRequest::Position),
        };
        let bytes = postcard::to_stdvec(&control).expect("encodes");
        assert_eq!(check_sender(&n2, &bytes), Ok(()));
    }

    proptest! {
        /// Arbitrary request bytes give an error or a verdict, never a panic.
        #[test]
        fn arbitrary_request_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = check_sender(&NodeId::from("n2"), &bytes);
        }
    }
}
