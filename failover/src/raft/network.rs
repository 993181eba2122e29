//! Raft RPCs over a byte transport.
//!
//! openraft talks to peers through [`RaftNetworkFactory`]; this module
//! implements it once, generic over [`RaftTransport`]: "send these bytes to
//! that node and give me its answer". [`super::quic::QuicTransport`] implements
//! it over the QUIC endpoint (ALPN `mirrordb-raft/1`, mutual TLS); tests use
//! [`MemNetwork`], an in-memory transport with per-pair fault injection.
//!
//! ```text
//!  openraft ──► Connection::append_entries ──► RpcEnvelope{target, request}
//!     ──► postcard ──► RaftTransport::call ──► (peer) RpcHandler::handle(bytes)
//!     ──► Raft::append_entries ──► RpcReply ──► postcard ──► back
//! ```
//!
//! The same transport carries the control plane's own requests
//! ([`ControlRequest`]: forward a proposal to the leader, ask a node for its
//! journal position), so one connection per peer serves both;
//! [`RpcHandler`] answers both on the receiving side. Everything else a node
//! must do (hold writes, change role) it learns from the applied state.
//!
//! Error mapping: a transport failure (no route, connection lost, timeout)
//! is `RPCError::Unreachable`, so openraft backs off; an error returned by
//! the peer's Raft is `RPCError::RemoteError`; an undecodable reply is
//! `RPCError::Network`. The envelope names the intended target id, and
//! [`RpcHandler`] refuses a request meant for another node (a stale address
//! must not make a node answer in someone else's name).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::{Raft, RaftNode, TypeConfig};
use crate::role::{NoData, Position, RoleControl, RoleError};
use crate::state::{ClusterCommand, CommandResult};

/// Largest request or reply a transport carries, in bytes. Snapshot chunks
/// (openraft's `snapshot_max_chunk_size`, 3 MiB by default) fit well below.
pub const MAX_RPC_BYTES: usize = 16 * 1024 * 1024;

/// A transport failure. All of them mean "the peer could not be reached".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// No connection (refused, partitioned, address unknown).
    #[error("{0} is unreachable: {1}")]
    Unreachable(String, String),
    /// No answer within the deadline.
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    /// The message exceeds [`MAX_RPC_BYTES`].
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The peer could not handle the request (wrong node, undecodable).
    #[error("peer refused the request: {0}")]
    Refused(String),
}

/// Sends one Raft RPC's bytes to a node and returns its reply bytes.
///
/// Implementations connect lazily (openraft creates clients infallibly) and
/// must give up after `timeout`. On the receiving side they hand the bytes
/// to the node's [`RpcService`] (an [`RpcHandler`]) and send back what it
/// returns.
pub trait RaftTransport: Send + Sync + 'static {
    /// One request/response exchange with `target`.
    fn call(
        &self,
        target: &RaftNode,
        request: Vec<u8>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + Send;
}

/// A Raft request on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    /// Log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Elections.
    Vote(VoteRequest<u64>),
    /// A snapshot chunk.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A control-plane request (not Raft itself).
    Control(ControlRequest),
}

/// Control-plane requests between drivers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Propose a command (sent to the Raft leader).
    Propose(ClusterCommand),
    /// Report your journal position.
    Position,
    /// Start a Raft election now: the primary hands Raft leadership to a
    /// caught-up voter so that losing the primary never also costs an
    /// election (see the driver's leadership duties).
    Campaign,
    /// Would you vote in an election now? Asked before a node starts one
    /// (openraft 0.9 has no pre-vote; see the driver's election duties).
    PreVote,
}

/// Answers to [`ControlRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    /// The proposal was committed and applied with this result.
    Proposed(CommandResult),
    /// This node is not the leader; try `leader`.
    NotLeader {
        /// The leader as this node knows it.
        leader: Option<RaftNode>,
    },
    /// The node's position.
    Position(Position),
    /// The node started an election (or already leads).
    Campaigning,
    /// Answer to [`ControlRequest::PreVote`]: `false` when this node leads
    /// or heard from a leader within the leader lease.
    PreVote {
        /// Whether a real vote request now could be granted.
        granted: bool,
    },
    /// The node could not do it.
    Failed(RoleError),
}

/// A request with the raft id it is meant for.
#[derive(Debug, Serialize, Deserialize)]
pub struct RpcEnvelope {
    /// The intended receiver's raft id.
    pub target: u64,
    /// The request.
    pub request: RaftRequest,
}

/// A Raft reply on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcReply {
    /// Answer to [`RaftRequest::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// Answer to [`RaftRequest::Vote`].
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// Answer to [`RaftRequest::InstallSnapshot`].
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// Answer to [`RaftRequest::Control`].
    Control(ControlReply),
}

/// The receiving side of a node: answers Raft RPCs and control requests.
///
/// Object-safe so a transport can hold the handlers of nodes of different
/// kinds (`RpcHandler<Node>`, `RpcHandler<NoData>` for a witness).
pub trait RpcService: Send + Sync + 'static {
    /// Handles one request's bytes and returns the reply's bytes. Bytes come
    /// from the network: anything undecodable, too large or meant for another
    /// node is a [`TransportError::Refused`], never a panic.
    fn serve<'a>(
        &'a self,
        request: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, TransportError>> + Send + 'a>>;
}

/// Serves the local Raft and, on data nodes, the local [`RoleControl`].
pub struct RpcHandler<R> {
    raft: Raft,
    local_id: u64,
    role: std::sync::Arc<R>,
}

impl<R> std::fmt::Debug for RpcHandler<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcHandler")
            .field("local_id", &self.local_id)
            .finish_non_exhaustive()
    }
}

impl RpcHandler<NoData> {
    /// A handler for a node without data (a witness, or Raft-only tests).
    #[must_use]
    pub fn raft_only(raft: Raft, local_id: u64) -> Self {
        RpcHandler {
            raft,
            local_id,
            role: std::sync::Arc::new(NoData),
        }
    }
}

impl<R: RoleControl> RpcHandler<R> {
    /// A handler for the node `local_id` running `raft` with `role`.
    pub fn new(raft: Raft, local_id: u64, role: std::sync::Arc<R>) -> Self {
        RpcHandler {
            raft,
            local_id,
            role,
        }
    }

    /// Handles one request's bytes; see [`RpcService::serve`].
    pub async fn handle(&self, request: &[u8]) -> Result<Vec<u8>, TransportError> {
        let envelope = decode_request(request)?;
        if envelope.target != self.local_id {
            return Err(TransportError::Refused(format!(
                "request for raft id {} reached {}",
                envelope.target, self.local_id
            )));
        }
        let raft = &self.raft;
        let reply = match envelope.request {
            RaftRequest::AppendEntries(rpc) => {
                RpcReply::AppendEntries(raft.append_entries(rpc).await)
            }
            RaftRequest::Vote(rpc) => RpcReply::Vote(raft.vote(rpc).await),
            RaftRequest::InstallSnapshot(rpc) => {
                RpcReply::InstallSnapshot(raft.install_snapshot(rpc).await)
            }
            RaftRequest::Control(req) => RpcReply::Control(self.control(req).await),
        };
        postcard::to_stdvec(&reply)
            .map_err(|e| TransportError::Refused(format!("encode reply: {e}")))
    }

    async fn control(&self, req: ControlRequest) -> ControlReply {
        match req {
            ControlRequest::Propose(cmd) => propose_local(&self.raft, cmd).await,
            ControlRequest::Position => match self.role.position().await {
                Ok(p) => ControlReply::Position(p),
                Err(e) => ControlReply::Failed(e),
            },
            ControlRequest::PreVote => pre_vote(&self.raft, self.local_id).await,
            ControlRequest::Campaign => match self.raft.trigger().elect().await {
                Ok(()) => ControlReply::Campaigning,
                Err(e) => ControlReply::Failed(RoleError::Failed(e.to_string())),
            },
        }
    }
}

impl<R: RoleControl> RpcService for RpcHandler<R> {
    fn serve<'a>(
        &'a self,
        request: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, TransportError>> + Send + 'a>> {
        Box::pin(self.handle(request))
    }
}

/// Answers a pre-vote: granted unless this node leads Raft or heard from a
/// leader within the leader lease (`election_timeout_max`), the test
/// openraft itself applies before it grants a real vote, but asked without
/// anyone raising their term. So a node that was cut off or restarted, and
/// whose election timer ran out meanwhile, cannot depose a healthy leader
/// (which would stall lease renewals and fence a healthy primary).
pub async fn pre_vote(raft: &Raft, local_id: u64) -> ControlReply {
    let leads = {
        let m = raft.metrics();
        let m = m.borrow();
        m.current_leader == Some(local_id) && m.state == openraft::ServerState::Leader
    };
    if leads {
        return ControlReply::PreVote { granted: false };
    }
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    let heard = raft
        .with_raft_state(move |st| {
            st.vote_ref().is_committed()
                && st
                    .vote_last_modified()
                    .is_some_and(|t| t.elapsed() <= lease)
        })
        .await;
    match heard {
        Ok(heard) => ControlReply::PreVote { granted: !heard },
        Err(e) => ControlReply::Failed(RoleError::Failed(e.to_string())),
    }
}

/// Proposes `cmd` through the local Raft; answers `NotLeader` when this node
/// is not the leader.
pub async fn propose_local(raft: &Raft, cmd: ClusterCommand) -> ControlReply {
    match raft.client_write(cmd).await {
        Ok(resp) => ControlReply::Proposed(resp.data),
        Err(e) => match e.forward_to_leader() {
            Some(f) => ControlReply::NotLeader {
                leader: f.leader_node.clone(),
            },
            None => ControlReply::Failed(RoleError::Failed(e.to_string())),
        },
    }
}

/// Proposes `cmd`: locally when this node leads, else forwarded to the
/// leader over `transport` (following one `NotLeader` redirect). Each
/// network call gives up after `timeout`; a local proposal waits for the
/// commit, so callers bound the whole call themselves.
pub async fn propose<T: RaftTransport>(
    raft: &Raft,
    my_id: u64,
    transport: &T,
    cmd: ClusterCommand,
    timeout: Duration,
) -> Result<ControlReply, TransportError> {
    let leader = {
        let m = raft.metrics();
        let m = m.borrow();
        m.current_leader.and_then(|id| {
            if id == my_id {
                None
            } else {
                m.membership_config.membership().get_node(&id).cloned()
            }
        })
    };
    let leader = match leader {
        None => match propose_local(raft, cmd.clone()).await {
            ControlReply::NotLeader { leader: Some(l) } => l,
            reply => return Ok(reply),
        },
        Some(l) => l,
    };
    match call_control(
        transport,
        &leader,
        ControlRequest::Propose(cmd.clone()),
        timeout,
    )
    .await
    {
        Ok(ControlReply::NotLeader { leader: Some(l) }) if l != leader => {
            call_control(transport, &l, ControlRequest::Propose(cmd), timeout).await
        }
        r => r,
    }
}

/// Sends a control request to `target` over `transport`.
pub async fn call_control<T: RaftTransport>(
    transport: &T,
    target: &RaftNode,
    request: ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, TransportError> {
    let envelope = RpcEnvelope {
        target: target.id(),
        request: RaftRequest::Control(request),
    };
    let bytes = postcard::to_stdvec(&envelope)
        .map_err(|e| TransportError::Refused(format!("encode request: {e}")))?;
    let reply = transport.call(target, bytes, timeout).await?;
    match postcard::from_bytes(&reply) {
        Ok(RpcReply::Control(r)) => Ok(r),
        Ok(_) => Err(TransportError::Refused("wrong reply kind".into())),
        Err(e) => Err(TransportError::Refused(format!("undecodable reply: {e}"))),
    }
}

/// Decodes a request envelope received from the network.
pub fn decode_request(bytes: &[u8]) -> Result<RpcEnvelope, TransportError> {
    if bytes.len() > MAX_RPC_BYTES {
        return Err(TransportError::TooLarge(bytes.len()));
    }
    postcard::from_bytes(bytes)
        .map_err(|e| TransportError::Refused(format!("undecodable request: {e}")))
}

/// openraft's network factory over a [`RaftTransport`].
#[derive(Debug)]
pub struct NetworkFactory<T> {
    transport: Arc<T>,
}

impl<T> NetworkFactory<T> {
    /// A factory whose connections all use `transport`.
    pub fn new(transport: Arc<T>) -> Self {
        NetworkFactory { transport }
    }
}

impl<T> Clone for NetworkFactory<T> {
    fn clone(&self) -> Self {
        NetworkFactory {
            transport: self.transport.clone(),
        }
    }
}

impl<T: RaftTransport> RaftNetworkFactory<TypeConfig> for NetworkFactory<T> {
    type Network = Connection<T>;

    async fn new_client(&mut self, target: u64, node: &RaftNode) -> Self::Network {
        Connection {
            transport: self.transport.clone(),
            target,
            node: node.clone(),
        }
    }
}

/// A (lazy) connection to one peer.
#[derive(Debug)]
pub struct Connection<T> {
    transport: Arc<T>,
    target: u64,
    node: RaftNode,
}

type RpcResult<R, E = RaftError<u64>> = Result<R, RPCError<u64, RaftNode, E>>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DecodeError(String);

impl<T: RaftTransport> Connection<T> {
    async fn call<E: std::error::Error>(
        &self,
        request: RaftRequest,
        option: &RPCOption,
    ) -> Result<RpcReply, RPCError<u64, RaftNode, E>> {
        let envelope = RpcEnvelope {
            target: self.target,
            request,
        };
        let bytes = postcard::to_stdvec(&envelope)
            .map_err(|e| RPCError::Network(NetworkError::new(&DecodeError(e.to_string()))))?;
        if bytes.len() > MAX_RPC_BYTES {
            return Err(RPCError::Unreachable(Unreachable::new(
                &TransportError::TooLarge(bytes.len()),
            )));
        }
        let reply = self
            .transport
            .call(&self.node, bytes, option.hard_ttl())
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        postcard::from_bytes(&reply).map_err(|e| {
            RPCError::Network(NetworkError::new(&DecodeError(format!(
                "undecodable reply from {}: {e}",
                self.node
            ))))
        })
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<u64, RaftNode, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }

    fn mismatch<E: std::error::Error>(&self) -> RPCError<u64, RaftNode, E> {
        RPCError::Network(NetworkError::new(&DecodeError(format!(
            "{} answered with the wrong reply kind",
            self.node
        ))))
    }
}

impl<T: RaftTransport> RaftNetwork<TypeConfig> for Connection<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        match self.call(RaftRequest::AppendEntries(rpc), &option).await? {
            RpcReply::AppendEntries(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.mismatch()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> {
        match self
            .call(RaftRequest::InstallSnapshot(rpc), &option)
            .await?
        {
            RpcReply::InstallSnapshot(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.mismatch()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>> {
        match self.call(RaftRequest::Vote(rpc), &option).await? {
            RpcReply::Vote(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.mismatch()),
        }
    }
}

/// An in-memory network of Raft nodes with fault injection, for tests (and
/// for other crates' tests: it is public).
///
/// Faults are per ordered pair `(from, to)`: a blocked pair fails every call
/// as unreachable; a pair with a drop rate fails that share of calls, chosen
/// by a generator seeded in [`MemNetwork::new`] so a failing run can be
/// replayed.
#[derive(Clone, Debug)]
pub struct MemNetwork {
    inner: Arc<Mutex<MemInner>>,
}

struct MemInner {
    nodes: BTreeMap<u64, Arc<dyn RpcService>>,
    blocked: BTreeSet<(u64, u64)>,
    drop_per_mille: BTreeMap<(u64, u64), u32>,
    rng: u64,
}

impl MemNetwork {
    /// An empty network whose random drops derive from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        MemNetwork {
            inner: Arc::new(Mutex::new(MemInner {
                nodes: BTreeMap::new(),
                blocked: BTreeSet::new(),
                drop_per_mille: BTreeMap::new(),
                rng: seed,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        // A panic while holding this lock can only come from a test that
        // already failed; keep going with the data as it is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `raft` (id `id`) reachable, answering Raft RPCs only.
    pub fn register(&self, id: u64, raft: Raft) {
        self.register_service(id, Arc::new(RpcHandler::raft_only(raft, id)));
    }

    /// Makes node `id` reachable through `service`.
    pub fn register_service(&self, id: u64, service: Arc<dyn RpcService>) {
        self.lock().nodes.insert(id, service);
    }

    /// Removes a node, as if its process died.
    pub fn unregister(&self, id: u64) {
        self.lock().nodes.remove(&id);
    }

    /// The transport a node with id `from` uses.
    #[must_use]
    pub fn transport(&self, from: u64) -> MemTransport {
        MemTransport {
            net: self.clone(),
            from,
        }
    }

    /// Blocks (or unblocks) calls from `from` to `to`.
    pub fn set_blocked(&self, from: u64, to: u64, blocked: bool) {
        let mut inner = self.lock();
        if blocked {
            inner.blocked.insert((from, to));
        } else {
            inner.blocked.remove(&(from, to));
        }
    }

    /// Cuts every link between the two groups, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        for &x in a {
            for &y in b {
                self.set_blocked(x, y, true);
                self.set_blocked(y, x, true);
            }
        }
    }

    /// Drops `per_mille`/1000 of the calls from `from` to `to`.
    pub fn set_drop_rate(&self, from: u64, to: u64, per_mille: u32) {
        self.lock()
            .drop_per_mille
            .insert((from, to), per_mille.min(1000));
    }

    /// Removes every fault.
    pub fn heal(&self) {
        let mut inner = self.lock();
        inner.blocked.clear();
        inner.drop_per_mille.clear();
    }
}

impl std::fmt::Debug for MemInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemInner")
            .field("nodes", &self.nodes.keys().collect::<Vec<_>>())
            .field("blocked", &self.blocked)
            .field("drop_per_mille", &self.drop_per_mille)
            .finish_non_exhaustive()
    }
}

impl MemInner {
    /// splitmix64: deterministic from the seed, no dependency.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// One node's view of a [`MemNetwork`].
#[derive(Clone, Debug)]
pub struct MemTransport {
    net: MemNetwork,
    from: u64,
}

impl RaftTransport for MemTransport {
    async fn call(
        &self,
        target: &RaftNode,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let to = target.id();
        let unreachable = |why: &str| TransportError::Unreachable(target.to_string(), why.into());
        let service = {
            let mut inner = self.net.lock();
            if inner.blocked.contains(&(self.from, to)) {
                return Err(unreachable("partitioned"));
            }
            if let Some(&p) = inner.drop_per_mille.get(&(self.from, to))
                && inner.next_random() % 1000 < u64::from(p)
            {
                return Err(unreachable("dropped"));
            }
            inner
                .nodes
                .get(&to)
                .cloned()
                .ok_or_else(|| unreachable("not running"))?
        };
        let reply = tokio::time::timeout(timeout, service.serve(&request))
            .await
            .map_err(|_| TransportError::Timeout(target.to_string(), timeout))??;
        // The reply travels back over the same link.
        if self.net.lock().blocked.contains(&(to, self.from)) {
            return Err(unreachable("partitioned on the way back"));
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;
    use openraft::{CommittedLeaderId, LogId, Vote};
    use proptest::prelude::*;

    /// A transport that answers every call with a fixed outcome.
    struct Fixed(Result<Vec<u8>, TransportError>);

    impl RaftTransport for Fixed {
        async fn call(
            &self,
            _target: &RaftNode,
            _request: Vec<u8>,
            _timeout: Duration,
        ) -> Result<Vec<u8>, TransportError> {
            self.0.clone()
        }
    }

    fn node() -> RaftNode {
        RaftNode {
            name: NodeId::from("n2"),
            raft_addr: "n2:7000".into(),
        }
    }

    async fn vote_via(
        transport: Fixed,
    ) -> Result<VoteResponse<u64>, RPCError<u64, RaftNode, RaftError<u64>>> {
        let mut factory = NetworkFactory::new(Arc::new(transport));
        let mut conn = factory.new_client(node().id(), &node()).await;
        let req = VoteRequest::new(
            Vote::new(2, 1),
            Some(LogId::new(CommittedLeaderId::new(1, 1), 5)),
        );
        conn.vote(req, RPCOption::new(Duration::from_millis(100)))
            .await
    }

    #[tokio::test]
    async fn transport_failure_is_unreachable() {
        let err = vote_via(Fixed(Err(TransportError::Unreachable(
            "n2".into(),
            "down".into(),
        ))))
        .await
        .unwrap_err();
        assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
    }

    #[tokio::test]
    async fn garbage_reply_is_a_network_error() {
        let err = vote_via(Fixed(Ok(vec![0xff, 0xff, 0xff])))
            .await
            .unwrap_err();
        assert!(matches!(err, RPCError::Network(_)), "{err:?}");
    }

    #[tokio::test]
    async fn wrong_reply_kind_is_a_network_error() {
        let reply = RpcReply::AppendEntries(Ok(AppendEntriesResponse::Success));
        let err = vote_via(Fixed(Ok(postcard::to_stdvec(&reply).unwrap())))
            .await
            .unwrap_err();
        assert!(matches!(err, RPCError::Network(_)), "{err:?}");
    }

    #[tokio::test]
    async fn remote_error_is_passed_through_and_success_decodes() {
        let ok = RpcReply::Vote(Ok(VoteResponse {
            vote: Vote::new(2, 1),
            vote_granted: true,
            last_log_id: None,
        }));
        let resp = vote_via(Fixed(Ok(postcard::to_stdvec(&ok).unwrap())))
            .await
            .unwrap();
        assert!(resp.vote_granted);
        let remote = RpcReply::Vote(Err(RaftError::Fatal(openraft::error::Fatal::Stopped)));
        let err = vote_via(Fixed(Ok(postcard::to_stdvec(&remote).unwrap())))
            .await
            .unwrap_err();
        assert!(matches!(err, RPCError::RemoteError(_)), "{err:?}");
    }

    #[test]
    fn request_envelope_round_trips() {
        let env = RpcEnvelope {
            target: 7,
            request: RaftRequest::Vote(VoteRequest::new(Vote::new(3, 7), None)),
        };
        let bytes = postcard::to_stdvec(&env).unwrap();
        let back = decode_request(&bytes).unwrap();
        assert_eq!(back.target, 7);
        assert!(matches!(back.request, RaftRequest::Vote(_)));
    }

    #[test]
    fn oversized_request_is_refused() {
        let big = vec![0u8; MAX_RPC_BYTES + 1];
        assert_eq!(
            decode_request(&big).unwrap_err(),
            TransportError::TooLarge(MAX_RPC_BYTES + 1)
        );
    }

    proptest! {
        /// Arbitrary bytes from the network give an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
            let _ = postcard::from_bytes::<RpcReply>(&bytes);
        }
    }
}
