//! Raft nodes over the in-memory transport: election, replication of
//! cluster commands, a partitioned leader replaced by the majority,
//! identical applied states after healing, bootstrap and joining, and a
//! joiner that catches up from a snapshot because the log was purged.
//!
//! Replay a run with `MIRRORDB_TEST_SEED=<seed> cargo test -p mirrordb-failover --test raft_cluster`.

// Helpers outside `#[test]` functions: a panic here is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mirrordb_failover::NodeId;
use mirrordb_failover::raft::network::{MemNetwork, NetworkFactory};
use mirrordb_failover::raft::{Raft, RaftNode, store};
use mirrordb_failover::state::{Applied, ClusterCommand, ClusterState, Member, Role, raft_id};
use openraft::ServerState;
use tokio::sync::watch;

mod fixtures;
use fixtures::{WAIT, fast_timing, seed};

struct TestNode {
    id: u64,
    raft: Raft,
    state: watch::Receiver<ClusterState>,
    _dir: tempfile::TempDir,
}

async fn start(net: &MemNetwork, name: &str) -> TestNode {
    start_with(net, name, fast_timing().raft_config().unwrap()).await
}

async fn start_with(net: &MemNetwork, name: &str, config: openraft::Config) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let (log, sm) = store::open(dir.path()).unwrap();
    let state = sm.subscribe();
    let id = raft_id(&NodeId::from(name));
    let config = Arc::new(config);
    let factory = NetworkFactory::new(Arc::new(net.transport(id)));
    let raft = Raft::new(id, config, factory, log, sm).await.unwrap();
    net.register(id, raft.clone());
    TestNode {
        id,
        raft,
        state,
        _dir: dir,
    }
}

/// Waits until `node` has applied exactly `reference` (metrics can lag the
/// state machine, so an applied index alone is not enough to compare).
async fn same_state(node: &TestNode, reference: &ClusterState) {
    let mut rx = node.state.clone();
    if tokio::time::timeout(WAIT, rx.wait_for(|s| s == reference))
        .await
        .is_err()
    {
        panic!(
            "node {} never reached the reference state:\n{:?}\nvs\n{reference:?}",
            node.id,
            *node.state.borrow()
        );
    }
}

fn add(name: &str) -> ClusterCommand {
    ClusterCommand::AddMember {
        node: NodeId::from(name),
        member: Member {
            role: Role::Data,
            raft_addr: format!("{name}:7000"),
            http_addr: format!("{name}:7070"),
            nofailover: false,
        },
    }
}

async fn leader_among(nodes: &[&TestNode], exclude: Option<u64>) -> u64 {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_and_survive_leader_partition() {
    let net = MemNetwork::new(seed());
    let names = ["n1", "n2", "n3"];
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(start(&net, name).await);
    }
    let by_id = |id: u64| nodes.iter().find(|n| n.id == id).unwrap();

    eprintln!("--- initialize the cluster on n1 and wait for a leader");
    let members: BTreeMap<u64, RaftNode> = names
        .iter()
        .map(|n| {
            let node = RaftNode {
                name: NodeId::from(*n),
                raft_addr: format!("{n}:7000"),
            };
            (node.id(), node)
        })
        .collect();
    nodes[0].raft.initialize(members).await.unwrap();
    let all: Vec<&TestNode> = nodes.iter().collect();
    let leader = leader_among(&all, None).await;

    eprintln!("--- replicate cluster commands through leader {leader}");
    for name in names {
        let resp = by_id(leader).raft.client_write(add(name)).await.unwrap();
        assert_eq!(resp.data, Ok(Applied::Ok));
    }
    let dup = by_id(leader).raft.client_write(add("n1")).await.unwrap();
    assert!(
        dup.data.is_err(),
        "a rejected command is answered, not lost"
    );
    let applied = by_id(leader)
        .raft
        .metrics()
        .borrow()
        .last_applied
        .unwrap()
        .index;
    for n in &nodes {
        n.raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(applied), "replicated")
            .await
            .unwrap();
        let mut rx = n.state.clone();
        tokio::time::timeout(WAIT, rx.wait_for(|s| s.members.len() == 3))
            .await
            .unwrap()
            .unwrap();
    }

    eprintln!("--- partition the leader {leader} from the others");
    let others: Vec<u64> = nodes
        .iter()
        .map(|n| n.id)
        .filter(|&i| i != leader)
        .collect();
    net.partition(&[leader], &others);
    let majority: Vec<&TestNode> = others.iter().map(|&i| by_id(i)).collect();
    let new_leader = leader_among(&majority, Some(leader)).await;
    assert_ne!(new_leader, leader);
    by_id(new_leader)
        .raft
        .wait(Some(WAIT))
        .state(ServerState::Leader, "new leader active")
        .await
        .unwrap();

    eprintln!("--- the majority commits; the isolated old leader cannot");
    let resp = by_id(new_leader)
        .raft
        .client_write(ClusterCommand::Promote {
            node: NodeId::from("n2"),
            epoch: mirrordb_failover::Epoch(1),
            first_lsn: mirrordb_failover::Lsn(1),
            now_ms: 1_000,
            lease_ttl_ms: 1_000,
        })
        .await
        .unwrap();
    assert!(matches!(resp.data, Ok(Applied::Promoted { .. })));
    let stale = tokio::time::timeout(
        Duration::from_millis(800),
        by_id(leader).raft.client_write(add("n4")),
    )
    .await;
    assert!(
        !matches!(stale, Ok(Ok(_))),
        "a partitioned leader must not commit: {stale:?}"
    );

    eprintln!("--- heal and check every node applies the same state");
    net.heal();
    let applied = by_id(new_leader)
        .raft
        .metrics()
        .borrow()
        .last_applied
        .unwrap()
        .index;
    for n in &nodes {
        n.raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(applied), "caught up after heal")
            .await
            .unwrap();
    }
    let reference = by_id(new_leader).state.borrow().clone();
    assert_eq!(reference.primary, Some(NodeId::from("n2")));
    assert!(
        !reference.members.contains_key(&NodeId::from("n4")),
        "the write to the isolated leader was never committed"
    );
    for n in &nodes {
        same_state(n, &reference).await;
    }
    for n in &nodes {
        n.raft.shutdown().await.unwrap();
    }
}

fn member(name: &str, role: Role) -> Member {
    Member {
        role,
        raft_addr: format!("{name}:7000"),
        http_addr: format!("{name}:7070"),
        nofailover: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_is_idempotent_and_members_join_and_leave() {
    use mirrordb_failover::membership::{MembershipError, add_member, bootstrap, remove_member};
    use mirrordb_failover::state::Rejected;
    let net = MemNetwork::new(seed());
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "w"] {
        nodes.push(start(&net, name).await);
    }
    let members: BTreeMap<NodeId, Member> =
        [("n1", Role::Data), ("n2", Role::Data), ("w", Role::Witness)]
            .into_iter()
            .map(|(n, r)| (NodeId::from(n), member(n, r)))
            .collect();

    eprintln!("--- bootstrap from n2, twice");
    let t = net.transport(nodes[1].id);
    for _ in 0..2 {
        bootstrap(&nodes[1].raft, nodes[1].id, &t, &members, WAIT)
            .await
            .unwrap();
    }
    for n in &nodes {
        let mut rx = n.state.clone();
        tokio::time::timeout(WAIT, rx.wait_for(|s| s.members == members))
            .await
            .unwrap()
            .unwrap();
    }

    eprintln!("--- n3 joins through the leader");
    nodes.push(start(&net, "n3").await);
    let all: Vec<&TestNode> = nodes.iter().collect();
    let leader_id = leader_among(&all, None).await;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let n3 = NodeId::from("n3");
    add_member(
        &leader.raft,
        leader.id,
        &net.transport(leader.id),
        &n3,
        &member("n3", Role::Data),
        WAIT,
    )
    .await
    .unwrap();
    let joined = &nodes[3];
    let mut rx = joined.state.clone();
    let s = tokio::time::timeout(WAIT, rx.wait_for(|s| s.members.contains_key(&n3)))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(s.members.len(), 4);
    let voters: Vec<u64> = leader
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert!(voters.contains(&joined.id), "n3 is a voter: {voters:?}");

    eprintln!("--- n3 leaves again; n1 cannot be removed while primary");
    let t = net.transport(leader.id);
    leader
        .raft
        .client_write(ClusterCommand::Promote {
            node: NodeId::from("n1"),
            epoch: mirrordb_failover::Epoch(1),
            first_lsn: mirrordb_failover::Lsn(1),
            now_ms: 0,
            lease_ttl_ms: 1000,
        })
        .await
        .unwrap();
    let err = remove_member(&leader.raft, leader.id, &t, &NodeId::from("n1"), WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MembershipError::Rejected(Rejected::RemovePrimary(_))),
        "{err}"
    );
    remove_member(&leader.raft, leader.id, &t, &n3, WAIT)
        .await
        .unwrap();
    let voters: Vec<u64> = leader
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert!(
        !voters.contains(&joined.id),
        "n3 is no longer a voter: {voters:?}"
    );
    assert!(!leader.state.borrow().members.contains_key(&n3));
    for n in &nodes {
        n.raft.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_member_catches_up_from_a_snapshot() {
    use mirrordb_failover::membership::{add_member, bootstrap};
    let net = MemNetwork::new(seed());
    let mut config = fast_timing().raft_config().unwrap();
    config.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(10);
    config.max_in_snapshot_log_to_keep = 0;
    let config = config.validate().unwrap();
    let mut nodes = Vec::new();
    for name in ["n1", "n2"] {
        nodes.push(start_with(&net, name, config.clone()).await);
    }
    let members: BTreeMap<NodeId, Member> = ["n1", "n2"]
        .into_iter()
        .map(|n| (NodeId::from(n), member(n, Role::Data)))
        .collect();
    bootstrap(
        &nodes[0].raft,
        nodes[0].id,
        &net.transport(nodes[0].id),
        &members,
        WAIT,
    )
    .await
    .unwrap();
    let all: Vec<&TestNode> = nodes.iter().collect();
    let leader_id = leader_among(&all, None).await;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();

    eprintln!("--- enough commands for a snapshot and a purged log");
    for i in 0..30 {
        leader
            .raft
            .client_write(ClusterCommand::SetNoFailover {
                node: NodeId::from("n2"),
                nofailover: i % 2 == 0,
            })
            .await
            .unwrap();
    }
    leader
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some() && m.purged.is_some(),
            "snapshot and purge",
        )
        .await
        .unwrap();

    eprintln!("--- n3 joins; the entries it needs are gone, so it gets the snapshot");
    nodes.push(start_with(&net, "n3", config.clone()).await);
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    add_member(
        &leader.raft,
        leader.id,
        &net.transport(leader.id),
        &NodeId::from("n3"),
        &member("n3", Role::Data),
        WAIT,
    )
    .await
    .unwrap();
    let joined = &nodes[2];
    let applied = leader.raft.metrics().borrow().last_applied.unwrap().index;
    let m = joined
        .raft
        .wait(Some(WAIT))
        .applied_index_at_least(Some(applied), "n3 caught up")
        .await
        .unwrap();
    assert!(m.snapshot.is_some(), "n3 installed a snapshot: {m:?}");
    let reference = leader.state.borrow().clone();
    same_state(joined, &reference).await;
    for n in &nodes {
        n.raft.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_log_vote_and_state() {
    let net = MemNetwork::new(seed());
    let names = ["n1", "n2", "n3"];
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(start(&net, name).await);
    }
    let members: BTreeMap<u64, RaftNode> = names
        .iter()
        .map(|n| {
            let node = RaftNode {
                name: NodeId::from(*n),
                raft_addr: format!("{n}:7000"),
            };
            (node.id(), node)
        })
        .collect();
    nodes[0].raft.initialize(members).await.unwrap();
    let all: Vec<&TestNode> = nodes.iter().collect();
    let leader_id = leader_among(&all, None).await;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    for name in names {
        leader.raft.client_write(add(name)).await.unwrap();
    }
    let reference = leader.state.borrow().clone();

    eprintln!("--- stop a follower once it has everything");
    let idx = nodes.iter().position(|n| n.id != leader_id).unwrap();
    let follower = nodes.remove(idx);
    same_state(&follower, &reference).await;
    let before = follower.raft.metrics().borrow().clone();
    net.unregister(follower.id);
    follower.raft.shutdown().await.unwrap();
    let TestNode { id, raft, _dir, .. } = follower;
    drop(raft);

    eprintln!("--- reopen its raft.redb: state, vote and log are on disk");
    // openraft's storage tasks may outlive `shutdown` by a few ms.
    let mut tries = 0;
    let (mut log, sm) = loop {
        match store::open(_dir.path()) {
            Ok(x) => break x,
            Err(store::OpenError::AlreadyOpen { .. }) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(sm.current().state.members.len(), 3);
    assert!(sm.current().last_applied >= before.last_applied);
    use openraft::storage::RaftLogStorage;
    let vote = log.read_vote().await.unwrap().unwrap();
    assert_eq!(vote.leader_id().term, before.current_term);
    let state = sm.subscribe();
    let config = Arc::new(fast_timing().raft_config().unwrap());
    let factory = NetworkFactory::new(Arc::new(net.transport(id)));
    let raft = Raft::new(id, config, factory, log, sm).await.unwrap();
    net.register(id, raft.clone());
    let restarted = TestNode {
        id,
        raft,
        state,
        _dir,
    };

    eprintln!("--- it rejoins and follows new writes");
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    leader.raft.client_write(add("n4")).await.unwrap();
    let applied = leader.raft.metrics().borrow().last_applied.unwrap().index;
    restarted
        .raft
        .wait(Some(WAIT))
        .applied_index_at_least(Some(applied), "restarted node caught up")
        .await
        .unwrap();
    let reference = leader.state.borrow().clone();
    same_state(&restarted, &reference).await;
    restarted.raft.shutdown().await.unwrap();
    for n in &nodes {
        n.raft.shutdown().await.unwrap();
    }
}
