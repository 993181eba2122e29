//! Forming and growing the cluster.
//!
//! A member exists twice: as a Raft voter (openraft membership: id and
//! address, so it votes and receives the log) and as a [`Member`] in the
//! replicated [`ClusterState`](crate::ClusterState) (role, HTTP address,
//! `nofailover`, so the controller may choose it). These helpers keep the
//! two in step.
//!
//! ```text
//!  bootstrap (once, one node):  raft.initialize(all voters) ─► leader ─► AddMember × n
//!  add_member (on the leader):  add_learner (catches up) ─► voter ─► AddMember
//!  remove_member (on the leader): RemoveMember (refused for the primary) ─► voter removed
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::error::{InitializeError, RaftError};

use crate::NodeId;
use crate::raft::network::{ControlReply, RaftTransport, TransportError, propose};
use crate::raft::{Raft, RaftNode};
use crate::state::{ClusterCommand, Member, Rejected, raft_id};

/// Forming or changing the membership failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    /// Two names hash to the same raft id; rename one.
    #[error("{a} and {b} have the same raft id {id}")]
    IdCollision {
        /// One name.
        a: NodeId,
        /// The other.
        b: NodeId,
        /// The id.
        id: u64,
    },
    /// openraft refused.
    #[error("raft: {0}")]
    Raft(String),
    /// No leader emerged, or the leader did not answer, in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The state machine refused the member.
    #[error("rejected: {0}")]
    Rejected(Rejected),
    /// This must run on the leader.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<RaftNode>,
    },
    /// The leader could not be reached.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// The Raft voters for `members`, refusing raft id collisions.
pub fn raft_nodes(
    members: &BTreeMap<NodeId, Member>,
) -> Result<BTreeMap<u64, RaftNode>, MembershipError> {
    let mut nodes: BTreeMap<u64, RaftNode> = BTreeMap::new();
    for (name, m) in members {
        let id = raft_id(name);
        if let Some(other) = nodes.get(&id) {
            return Err(MembershipError::IdCollision {
                a: other.name.clone(),
                b: name.clone(),
                id,
            });
        }
        nodes.insert(
            id,
            RaftNode {
                name: name.clone(),
                raft_addr: m.raft_addr.clone(),
            },
        );
    }
    Ok(nodes)
}

/// Forms a new cluster of `members` from this node (`mirrordb cluster init`):
/// initializes Raft with every member as a voter, waits for a leader and
/// records each member in the cluster state. Safe to run again: an already
/// initialized Raft and already recorded members are accepted.
pub async fn bootstrap<T: RaftTransport>(
    raft: &Raft,
    my_id: u64,
    transport: &T,
    members: &BTreeMap<NodeId, Member>,
    timeout: Duration,
) -> Result<(), MembershipError> {
    let nodes = raft_nodes(members)?;
    match raft.initialize(nodes).await {
        Ok(()) => {}
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
            tracing::info!("raft already initialized; recording members only");
        }
        Err(e) => return Err(MembershipError::Raft(e.to_string())),
    }
    raft.wait(Some(timeout))
        .metrics(|m| m.current_leader.is_some(), "a leader is elected")
        .await
        .map_err(|_| MembershipError::Timeout("no leader elected"))?;
    for (name, member) in members {
        record(raft, my_id, transport, name, member, timeout).await?;
    }
    Ok(())
}

/// Adds `name` to a running cluster. Must run on the Raft leader: the node
/// joins as a learner, becomes a voter once it has caught up, and is then
/// recorded in the cluster state (so the controller only ever considers a
/// node that already holds the control-plane log).
pub async fn add_member<T: RaftTransport>(
    raft: &Raft,
    my_id: u64,
    transport: &T,
    name: &NodeId,
    member: &Member,
    timeout: Duration,
) -> Result<(), MembershipError> {
    let id = raft_id(name);
    let node = RaftNode {
        name: name.clone(),
        raft_addr: member.raft_addr.clone(),
    };
    let not_leader = |e: &RaftError<u64, openraft::error::ClientWriteError<u64, RaftNode>>| {
        e.forward_to_leader().map(|f| MembershipError::NotLeader {
            leader: f.leader_node.clone(),
        })
    };
    let step = async {
        raft.add_learner(id, node, true)
            .await
            .map_err(|e| not_leader(&e).unwrap_or_else(|| MembershipError::Raft(e.to_string())))?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| not_leader(&e).unwrap_or_else(|| MembershipError::Raft(e.to_string())))?;
        Ok::<(), MembershipError>(())
    };
    tokio::time::timeout(timeout, step)
        .await
        .map_err(|_| MembershipError::Timeout("membership change"))??;
    record(raft, my_id, transport, name, member, timeout).await
}

/// Removes `name` from a running cluster. Must run on the Raft leader. The
/// member record goes first, so the controller stops considering the node
/// before it stops voting; the primary cannot be removed (switch over first).
pub async fn remove_member<T: RaftTransport>(
    raft: &Raft,
    my_id: u64,
    transport: &T,
    name: &NodeId,
    timeout: Duration,
) -> Result<(), MembershipError> {
    let cmd = ClusterCommand::RemoveMember { node: name.clone() };
    let reply = tokio::time::timeout(timeout, propose(raft, my_id, transport, cmd, timeout))
        .await
        .map_err(|_| MembershipError::Timeout("RemoveMember not committed"))??;
    match reply {
        ControlReply::Proposed(Ok(_)) | ControlReply::Proposed(Err(Rejected::UnknownMember(_))) => {
        }
        ControlReply::Proposed(Err(e)) => return Err(MembershipError::Rejected(e)),
        ControlReply::NotLeader { leader } => return Err(MembershipError::NotLeader { leader }),
        other => return Err(MembershipError::Raft(format!("unexpected reply {other:?}"))),
    }
    let id = raft_id(name);
    let is_voter = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .any(|v| v == id);
    if is_voter {
        tokio::time::timeout(
            timeout,
            raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false),
        )
        .await
        .map_err(|_| MembershipError::Timeout("membership change"))?
        .map_err(|e| match e.forward_to_leader() {
            Some(f) => MembershipError::NotLeader {
                leader: f.leader_node.clone(),
            },
            None => MembershipError::Raft(e.to_string()),
        })?;
    }
    Ok(())
}

/// Proposes `AddMember`, accepting "already a member".
async fn record<T: RaftTransport>(
    raft: &Raft,
    my_id: u64,
    transport: &T,
    name: &NodeId,
    member: &Member,
    timeout: Duration,
) -> Result<(), MembershipError> {
    let cmd = ClusterCommand::AddMember {
        node: name.clone(),
        member: member.clone(),
    };
    let reply = tokio::time::timeout(timeout, propose(raft, my_id, transport, cmd, timeout))
        .await
        .map_err(|_| MembershipError::Timeout("AddMember not committed"))??;
    match reply {
        ControlReply::Proposed(Ok(_)) | ControlReply::Proposed(Err(Rejected::MemberExists(_))) => {
            Ok(())
        }
        ControlReply::Proposed(Err(e)) => Err(MembershipError::Rejected(e)),
        ControlReply::NotLeader { leader } => Err(MembershipError::NotLeader { leader }),
        other => Err(MembershipError::Raft(format!("unexpected reply {other:?}"))),
    }
}
