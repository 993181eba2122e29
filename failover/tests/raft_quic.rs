//! Raft nodes over the QUIC transport with real certificates: each node is a
//! `NodeEndpoint` on 127.0.0.1:0 with a certificate from one cluster CA; they
//! elect a leader, replicate cluster commands and apply the same state; a
//! leader whose endpoint closes is replaced by the other two; a node with a
//! certificate from another CA cannot take part; the receiving side refuses
//! requests for another node, in another node's name, or from a non-member;
//! a peer restarted on the same address is redialed, also when it was cut
//! off without a word (SIGKILL); `bootstrap` and a
//! follower's forwarded proposal (control requests) work over QUIC.
//!
//! The only randomness of its own is the seed choosing which node
//! initializes the group (openraft's election timers are its own); nothing
//! here asserts timings. Replay with
//! `MIRRORDB_TEST_SEED=<seed> cargo test -p mirrordb-failover --test raft_quic`.

// Helpers outside `#[test]` functions: a panic here is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use mirrordb_failover::NodeId;
use mirrordb_failover::raft::network::{
    ControlRequest, NetworkFactory, RaftRequest, RaftTransport, RpcEnvelope, RpcHandler, RpcReply,
    RpcService, TransportError,
};
use mirrordb_failover::raft::quic::{QuicServer, QuicTransport, raft_membership};
use mirrordb_failover::raft::{Raft, RaftNode, store};
use mirrordb_failover::state::{Applied, ClusterCommand, ClusterState, Member, Role, raft_id};
use mirrordb_replication::certs::{ClusterCa, NodeIdentity};
use mirrordb_replication::endpoint::{EndpointOptions, NodeEndpoint};
use openraft::raft::VoteRequest;
use openraft::{ServerState, Vote};
use tokio::sync::watch;

mod fixtures;
use fixtures::{WAIT, fast_timing, seed};

struct QuicNode {
    name: NodeId,
    id: u64,
    raft: Raft,
    state: watch::Receiver<ClusterState>,
    endpoint: NodeEndpoint,
    transport: Arc<QuicTransport>,
    _dir: tempfile::TempDir,
}

impl QuicNode {
    fn raft_node(&self) -> RaftNode {
        RaftNode {
            name: self.name.clone(),
            raft_addr: self.endpoint.local_addr().unwrap().to_string(),
        }
    }
}

fn identity(ca: &ClusterCa, name: &str) -> NodeIdentity {
    let cert = ca
        .issue(&NodeId::from(name), &["127.0.0.1".into()])
        .unwrap();
    NodeIdentity::from_issued(ca, &cert).unwrap()
}

/// A node with its endpoint, Raft, and the receiving side running; it
/// admits the members of its Raft membership.
async fn start(ca: &ClusterCa, name: &str) -> QuicNode {
    let dir = tempfile::tempdir().unwrap();
    let (log, sm) = store::open(dir.path()).unwrap();
    let state = sm.subscribe();
    let name = NodeId::from(name);
    let id = raft_id(&name);
    let (endpoint, incoming) = NodeEndpoint::bind(
        &identity(ca, name.as_str()),
        "127.0.0.1:0".parse().unwrap(),
        EndpointOptions::default(),
    )
    .unwrap();
    let transport = Arc::new(QuicTransport::new(endpoint.clone()));
    let config = Arc::new(fast_timing().raft_config().unwrap());
    let factory = NetworkFactory::new(transport.clone());
    let raft = Raft::new(id, config, factory, log, sm).await.unwrap();
    let server = QuicServer::new(
        name.clone(),
        Arc::new(RpcHandler::raft_only(raft.clone(), id)),
    )
    .with_admission(raft_membership(raft.clone()));
    tokio::spawn(server.run(incoming.raft));
    QuicNode {
        name,
        id,
        raft,
        state,
        endpoint,
        transport,
        _dir: dir,
    }
}

fn add(node: &QuicNode) -> ClusterCommand {
    ClusterCommand::AddMember {
        node: node.name.clone(),
        member: Member {
            role: Role::Data,
            raft_addr: node.raft_node().raft_addr,
            http_addr: format!("{}:7070", node.name),
            nofailover: false,
        },
    }
}

fn voters(nodes: &[&QuicNode]) -> BTreeMap<u64, RaftNode> {
    nodes.iter().map(|n| (n.id, n.raft_node())).collect()
}

async fn leader_among(nodes: &[&QuicNode], exclude: Option<u64>) -> u64 {
    let ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
    let m = nodes[0]
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| {
                m.current_leader
                    .is_some_and(|l| Some(l) != exclude && ids.contains(&l))
            },
            "a leader is elected",
        )
        .await
        .unwrap();
    m.current_leader.unwrap()
}

async fn same_state(node: &QuicNode, reference: &ClusterState) {
    let mut rx = node.state.clone();
    if tokio::time::timeout(WAIT, rx.wait_for(|s| s == reference))
        .await
        .is_err()
    {
        panic!(
            "node {} never reached the reference state:\n{:?}\nvs\n{reference:?}",
            node.name,
            *node.state.borrow()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_quic_elect_replicate_and_replace_a_closed_leader() {
    let ca = ClusterCa::generate("quic-test").unwrap();
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        nodes.push(start(&ca, name).await);
    }
    let by_id = |id: u64| nodes.iter().find(|n| n.id == id).unwrap();
    let all: Vec<&QuicNode> = nodes.iter().collect();

    // The seed picks the node that initializes the group.
    let first = (seed() % 3) as usize;
    eprintln!(
        "--- initialize on {} with the three endpoints' addresses; wait for a leader",
        nodes[first].name
    );
    nodes[first].raft.initialize(voters(&all)).await.unwrap();
    let leader = leader_among(&all, None).await;

    eprintln!("--- replicate cluster commands through leader {leader}");
    for n in &nodes {
        let resp = by_id(leader).raft.client_write(add(n)).await.unwrap();
        assert_eq!(resp.data, Ok(Applied::Ok));
    }
    let reference = by_id(leader).state.borrow().clone();
    assert_eq!(reference.members.len(), 3);
    for n in &nodes {
        same_state(n, &reference).await;
    }

    eprintln!("--- close the leader's endpoint; the other two elect a new leader");
    by_id(leader).endpoint.close();
    let others: Vec<&QuicNode> = nodes.iter().filter(|n| n.id != leader).collect();
    let new_leader = leader_among(&others, Some(leader)).await;
    assert_ne!(new_leader, leader);
    by_id(new_leader)
        .raft
        .wait(Some(WAIT))
        .state(ServerState::Leader, "new leader active")
        .await
        .unwrap();

    eprintln!("--- the new leader {new_leader} commits; both survivors apply the same state");
    let resp = by_id(new_leader)
        .raft
        .client_write(ClusterCommand::Promote {
            node: by_id(new_leader).name.clone(),
            epoch: mirrordb_failover::Epoch(1),
            first_lsn: mirrordb_failover::Lsn(1),
            now_ms: 1_000,
            lease_ttl_ms: 1_000,
        })
        .await
        .unwrap();
    assert!(matches!(resp.data, Ok(Applied::Promoted { .. })));
    let reference = by_id(new_leader).state.borrow().clone();
    assert_eq!(reference.primary.as_ref(), Some(&by_id(new_leader).name));
    for n in &others {
        same_state(n, &reference).await;
    }
    for n in &nodes {
        n.raft.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_from_another_ca_cannot_take_part() {
    let ca = ClusterCa::generate("quic-test").unwrap();
    let foreign = ClusterCa::generate("intruder").unwrap();
    let n1 = start(&ca, "n1").await;
    let n2 = start(&ca, "n2").await;
    // The intruder even uses a member's name.
    let n3 = start(&foreign, "n3").await;

    eprintln!("--- n1 initializes with n3 as a voter; n1 and n2 still form a majority");
    n1.raft.initialize(voters(&[&n1, &n2, &n3])).await.unwrap();
    let leader_id = leader_among(&[&n1, &n2], None).await;
    let leader = if leader_id == n1.id { &n1 } else { &n2 };
    for n in [&n1, &n2, &n3] {
        leader.raft.client_write(add(n)).await.unwrap();
    }
    let reference = leader.state.borrow().clone();
    same_state(&n1, &reference).await;
    same_state(&n2, &reference).await;

    eprintln!("--- the intruder received nothing: no log, no membership, no state");
    let m = n3.raft.metrics().borrow().clone();
    assert_eq!(m.last_log_index, None, "{m:?}");
    assert_eq!(*n3.state.borrow(), ClusterState::default());

    eprintln!("--- and its own calls fail at the handshake");
    let envelope = RpcEnvelope {
        target: n1.id,
        request: RaftRequest::Vote(VoteRequest::new(Vote::new(99, n3.id), None)),
    };
    let err = n3
        .transport
        .call(
            &n1.raft_node(),
            postcard::to_stdvec(&envelope).unwrap(),
            WAIT,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Unreachable(..)), "{err}");
    assert!(n1.raft.metrics().borrow().current_term < 99);
    for n in [&n1, &n2, &n3] {
        n.raft.shutdown().await.unwrap();
    }
}

/// Sends `envelope` from `from` to `to` and decodes the reply.
async fn call(
    from: &QuicNode,
    to: &QuicNode,
    envelope: &RpcEnvelope,
) -> Result<RpcReply, TransportError> {
    let bytes = postcard::to_stdvec(envelope).unwrap();
    let reply = from.transport.call(&to.raft_node(), bytes, WAIT).await?;
    Ok(postcard::from_bytes(&reply).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_refuses_wrong_targets_impersonation_and_non_members() {
    let ca = ClusterCa::generate("quic-test").unwrap();
    let n1 = start(&ca, "n1").await;
    let n2 = start(&ca, "n2").await;
    let n9 = start(&ca, "n9").await;
    let vote = |target: u64, candidate: u64| RpcEnvelope {
        target,
        request: RaftRequest::Vote(VoteRequest::new(Vote::new(1, candidate), None)),
    };

    eprintln!("--- n1 and n2 form a group; n9 has a valid certificate but is no member");
    n1.raft.initialize(voters(&[&n1, &n2])).await.unwrap();
    leader_among(&[&n1, &n2], None).await;

    eprintln!("--- a vote request in the sender's own name is answered");
    let reply = call(&n2, &n1, &vote(n1.id, n2.id)).await.unwrap();
    assert!(matches!(reply, RpcReply::Vote(Ok(_))), "{reply:?}");

    eprintln!("--- a request addressed to another raft id is refused");
    let err = call(&n2, &n1, &vote(n9.id, n2.id)).await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable(..)), "{err}");

    eprintln!("--- a request in another node's name is refused");
    let err = call(&n2, &n1, &vote(n1.id, n9.id)).await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable(..)), "{err}");

    eprintln!("--- a certified non-member is refused, even in its own name");
    let err = call(&n9, &n1, &vote(n1.id, n9.id)).await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable(..)), "{err}");
    let reply = call(&n2, &n1, &vote(n1.id, n2.id)).await.unwrap();
    assert!(matches!(reply, RpcReply::Vote(Ok(_))), "{reply:?}");

    eprintln!("--- the connection survives refusals: n2 and n1 keep replicating");
    let leader_id = leader_among(&[&n1, &n2], None).await;
    let leader = if leader_id == n1.id { &n1 } else { &n2 };
    leader.raft.client_write(add(&n1)).await.unwrap();
    let reference = leader.state.borrow().clone();
    same_state(&n1, &reference).await;
    same_state(&n2, &reference).await;
    for n in [&n1, &n2, &n9] {
        n.raft.shutdown().await.unwrap();
    }
}

/// Answers every request with its own bytes.
struct Echo;

impl RpcService for Echo {
    fn serve<'a>(
        &'a self,
        request: &'a [u8],
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<u8>, TransportError>> + Send + 'a>,
    > {
        Box::pin(async move { Ok(request.to_vec()) })
    }
}

/// Binds `name`'s endpoint at `addr` and serves it with [`Echo`].
fn echo_server(
    ca: &ClusterCa,
    name: &str,
    addr: std::net::SocketAddr,
) -> std::io::Result<NodeEndpoint> {
    let (endpoint, incoming) =
        match NodeEndpoint::bind(&identity(ca, name), addr, EndpointOptions::default()) {
            Ok(x) => x,
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        };
    tokio::spawn(QuicServer::new(NodeId::from(name), Arc::new(Echo)).run(incoming.raft));
    Ok(endpoint)
}

/// A UDP relay on its own address that forwards to a backend which can be
/// swapped: swapping cuts the old backend off without a packet, as when a
/// peer is killed with SIGKILL and restarted on the same address.
async fn relay(
    backend: std::net::SocketAddr,
) -> (std::net::SocketAddr, watch::Sender<std::net::SocketAddr>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (tx, rx) = watch::channel(backend);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut client = None;
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let backend = *rx.borrow();
            let to = if from == backend {
                client
            } else if Some(from) == client || client.is_none() {
                client = Some(from);
                Some(backend)
            } else {
                // A cut-off backend answering: dropped.
                None
            };
            if let Some(to) = to {
                let _ = socket.send_to(&buf[..n], to).await;
            }
        }
    });
    (addr, tx)
}

/// Regression: a peer killed and restarted on the same address never
/// answers on the old connection, and QUIC noticed only at its idle timeout
/// (10 s); the Raft leader's heartbeats to a restarted node were lost that
/// long (found by `mirrordb drill`). Now a connection silent for
/// `STALE_AFTER` while calls time out is closed and redialed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_replaced_peer_is_redialed_well_before_the_idle_timeout() {
    let ca = ClusterCa::generate("quic-test").unwrap();
    let (n1, _n1_incoming) = NodeEndpoint::bind(
        &identity(&ca, "n1"),
        "127.0.0.1:0".parse().unwrap(),
        EndpointOptions::default(),
    )
    .unwrap();
    let transport = QuicTransport::new(n1);
    let old = echo_server(&ca, "n2", "127.0.0.1:0".parse().unwrap()).unwrap();
    let (addr, backend) = relay(old.local_addr().unwrap()).await;
    let target = RaftNode {
        name: NodeId::from("n2"),
        raft_addr: addr.to_string(),
    };
    let request = postcard::to_stdvec(&RpcEnvelope {
        target: raft_id(&NodeId::from("n2")),
        request: RaftRequest::Control(ControlRequest::Position),
    })
    .unwrap();
    let short = std::time::Duration::from_millis(100);

    eprintln!("--- a first call dials n2 through the relay and caches the connection");
    let reply = transport
        .call(&target, request.clone(), WAIT)
        .await
        .unwrap();
    assert_eq!(reply, request);

    eprintln!("--- n2 is replaced without a word: the old connection goes silent");
    let new = echo_server(&ca, "n2", "127.0.0.1:0".parse().unwrap()).unwrap();
    backend.send_replace(new.local_addr().unwrap());
    let cut = tokio::time::Instant::now();

    eprintln!("--- calls with heartbeat deadlines time out, then one redials and is answered");
    let limit = mirrordb_replication::endpoint::IDLE_TIMEOUT / 2;
    loop {
        match transport.call(&target, request.clone(), short).await {
            Ok(reply) => {
                assert_eq!(reply, request);
                break;
            }
            Err(e) => {
                assert!(
                    cut.elapsed() < limit,
                    "still no answer {:?} after the replacement: {e}",
                    cut.elapsed()
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_is_redialed_on_a_later_call() {
    let ca = ClusterCa::generate("quic-test").unwrap();
    let (n1, _n1_incoming) = NodeEndpoint::bind(
        &identity(&ca, "n1"),
        "127.0.0.1:0".parse().unwrap(),
        EndpointOptions::default(),
    )
    .unwrap();
    let transport = QuicTransport::new(n1);
    let n2 = echo_server(&ca, "n2", "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = n2.local_addr().unwrap();
    let target = RaftNode {
        name: NodeId::from("n2"),
        raft_addr: addr.to_string(),
    };
    let request = postcard::to_stdvec(&RpcEnvelope {
        target: raft_id(&NodeId::from("n2")),
        request: RaftRequest::Control(ControlRequest::Position),
    })
    .unwrap();

    eprintln!("--- a first call dials n2 and caches the connection");
    let reply = transport
        .call(&target, request.clone(), WAIT)
        .await
        .unwrap();
    assert_eq!(reply, request);

    eprintln!("--- n2 restarts on the same address: the cached connection is closed");
    n2.close();
    drop(n2);
    let deadline = tokio::time::Instant::now() + WAIT;
    let _n2 = loop {
        // The old socket is released once its endpoint has drained.
        match echo_server(&ca, "n2", addr) {
            Ok(e) => break e,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("rebind {addr}: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("rebind {addr}: {e}"),
        }
    };

    eprintln!("--- later calls redial and are answered again");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match transport.call(&target, request.clone(), WAIT).await {
            Ok(reply) => {
                assert_eq!(reply, request);
                break;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("call after restart: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("never redialed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_over_quic_and_a_follower_forwards_a_proposal_to_the_leader() {
    use mirrordb_failover::membership::bootstrap;
    use mirrordb_failover::raft::network::{ControlReply, propose};
    let ca = ClusterCa::generate("quic-test").unwrap();
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        nodes.push(start(&ca, name).await);
    }
    let members: BTreeMap<NodeId, Member> = nodes
        .iter()
        .map(|n| match add(n) {
            ClusterCommand::AddMember { node, member } => (node, member),
            _ => unreachable!("add builds AddMember"),
        })
        .collect();

    eprintln!("--- bootstrap from n2 (members are recorded through the leader over QUIC)");
    bootstrap(
        &nodes[1].raft,
        nodes[1].id,
        &*nodes[1].transport,
        &members,
        WAIT,
    )
    .await
    .unwrap();
    for n in &nodes {
        let mut rx = n.state.clone();
        tokio::time::timeout(WAIT, rx.wait_for(|s| s.members == members))
            .await
            .unwrap()
            .unwrap();
    }

    eprintln!("--- a follower's proposal travels to the leader as a control request");
    let all: Vec<&QuicNode> = nodes.iter().collect();
    let leader = leader_among(&all, None).await;
    let follower = nodes.iter().find(|n| n.id != leader).unwrap();
    let cmd = ClusterCommand::SetNoFailover {
        node: NodeId::from("n3"),
        nofailover: true,
    };
    let reply = propose(&follower.raft, follower.id, &*follower.transport, cmd, WAIT)
        .await
        .unwrap();
    assert!(matches!(reply, ControlReply::Proposed(Ok(_))), "{reply:?}");
    let mut rx = follower.state.clone();
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|s| {
            s.members
                .get(&NodeId::from("n3"))
                .is_some_and(|m| m.nofailover)
        }),
    )
    .await
    .unwrap()
    .unwrap();
    for n in &nodes {
        n.raft.shutdown().await.unwrap();
    }
}
