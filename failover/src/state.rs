//! The replicated cluster state: who is a member, who is primary, in which
//! epoch, under which commit policy, and until when the primary's lease runs.
//!
//! `ClusterState` is the openraft state machine's whole content. It changes
//! only through [`ClusterState::apply`], a pure function of the state, the
//! command and the time carried *inside* the command (the proposer's clock),
//! so every replica that applies the same log reaches the same state. `apply`
//! enforces the invariants listed on [`ClusterState::check_invariants`]; a
//! command that would break one is answered with [`Rejected`] and changes
//! nothing.
//!
//! ```text
//!   AddMember ──► members            Promote{epoch+1} ──► primary, epoch,
//!   RenewLease (primary, epoch) ──► lease       epoch_history, fresh lease
//!   Demote / ReleaseLease ──► lease gone, a Promote may follow
//!   BeginSwitchover ─► SwitchoverFenced{last_lsn} ─► Promote{to, last_lsn+1}
//!                  └─► EndSwitchover (abort: the primary may write again)
//! ```
//!
//! A switchover is recorded here, not only in the controller's memory, so it
//! survives a change of Raft leader, and so that the primary can only resume
//! writing after an `EndSwitchover` was applied, after which the
//! switchover's promotion is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Epoch, Lsn, NodeId};

/// The id openraft uses for a node: a stable 64-bit hash of its name.
///
/// openraft needs a `Copy + Ord` id; mirrordb names nodes by string (the name
/// in their certificate). The mapping is FNV-1a 64 over the UTF-8 name, which
/// is fixed by this crate (not `std`'s randomized hasher), so every node and
/// every release computes the same id. [`ClusterCommand::AddMember`] rejects a
/// name whose id collides with an existing member's.
#[must_use]
pub fn raft_id(node: &NodeId) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    node.as_str().bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// What a member does in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Holds a copy of the database; may be primary or mirror.
    Data,
    /// Votes in Raft but holds no data; never primary, never a failover target.
    Witness,
}

/// One cluster member as recorded in the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Data node or witness.
    pub role: Role,
    /// `host:port` of the node's QUIC endpoint (Raft and journal shipping).
    pub raft_addr: String,
    /// `host:port` of the node's HTTP API (for `not_primary` redirects).
    pub http_addr: String,
    /// When set, the controller never promotes this node automatically.
    pub nofailover: bool,
}

/// The time-bounded right of the primary to take writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The primary that holds it.
    pub holder: NodeId,
    /// The epoch it was granted in.
    pub epoch: Epoch,
    /// Expiry, in milliseconds since the Unix epoch on the proposer's clock.
    pub expires_at_ms: u64,
}

/// Since when the primary acknowledges writes without the quorum it should
/// wait for (commit policy `degrade`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Degraded {
    /// First LSN acknowledged without a quorum.
    pub from_lsn: Lsn,
    /// When the primary fell back, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// The last change of primary, for `GET /v1/cluster` and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastFailover {
    /// The previous primary, if there was one.
    pub from: Option<NodeId>,
    /// The new primary.
    pub to: NodeId,
    /// The epoch it opened.
    pub epoch: Epoch,
    /// When the promotion was proposed, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Time from the old lease's expiry (or release) to the promotion; 0 when
    /// there was no lease.
    pub duration_ms: u64,
}

/// A planned switchover in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverIntent {
    /// The primary handing over.
    pub from: NodeId,
    /// The data node taking over.
    pub to: NodeId,
    /// The epoch of `from`.
    pub epoch: Epoch,
    /// After this time (proposer's clock) the switchover is abandoned.
    pub deadline_ms: u64,
    /// Set by the primary once it holds writes: its last LSN.
    pub last_lsn: Option<Lsn>,
}

/// Default `max_lag_on_failover` for `async` mode, in journal entries.
pub const DEFAULT_MAX_LAG_ON_FAILOVER: u64 = 10_000;

/// When the primary acknowledges a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommitMode {
    /// After the local fsync. A failover may lose up to `max_lag_on_failover`
    /// journal entries (LSNs): candidates further behind the last known
    /// primary position are not promoted.
    Async {
        /// Largest LSN distance to the last known primary position that a
        /// failover candidate may have, in journal entries.
        max_lag_on_failover: u64,
    },
    /// After the primary and `k` mirrors have fsynced the entry.
    Quorum {
        /// Number of mirrors (besides the primary), at least 1.
        k: u32,
    },
    /// After `k` mirrors have applied the entry to their data file.
    RemoteApply {
        /// Number of mirrors (besides the primary), at least 1.
        k: u32,
    },
}

/// What the primary does when its quorum cannot be met.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnUnavailable {
    /// Writes wait, then fail with `write_blocked`.
    Strict,
    /// Fall back to async and raise a health flag ([`ClusterState::degraded`]).
    Degrade,
}

/// Commit mode plus what to do when it cannot be met.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitPolicy {
    /// When a write is acknowledged.
    pub mode: CommitMode,
    /// What happens when the mode cannot be met.
    pub on_unavailable: OnUnavailable,
}

impl Default for CommitPolicy {
    fn default() -> Self {
        CommitPolicy {
            mode: CommitMode::Async {
                max_lag_on_failover: DEFAULT_MAX_LAG_ON_FAILOVER,
            },
            on_unavailable: OnUnavailable::Strict,
        }
    }
}

impl CommitPolicy {
    /// True when a write is acknowledged only once mirrors hold it.
    #[must_use]
    pub fn needs_mirrors(&self) -> bool {
        !matches!(self.mode, CommitMode::Async { .. })
    }
}

/// A commit policy string that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid commit policy {input:?}: {reason}")]
pub struct ParsePolicyError {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for CommitMode {
    type Err = ParsePolicyError;

    /// `async`, `async:<max_lag_entries>`, `quorum:<k>`, `remote_apply:<k>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParsePolicyError {
            input: s.to_owned(),
            reason,
        };
        let (name, arg) = match s.trim().split_once(':') {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (s.trim(), None),
        };
        let k = |arg: Option<&str>| -> Result<u32, ParsePolicyError> {
            let a = arg.ok_or_else(|| err("quorum modes need a count, e.g. quorum:1"))?;
            let k: u32 = a.parse().map_err(|_| err("k must be a positive integer"))?;
            if k == 0 {
                return Err(err("k must be at least 1 (use async for no mirrors)"));
            }
            Ok(k)
        };
        match name {
            "async" => {
                let max_lag_on_failover = match arg {
                    None => DEFAULT_MAX_LAG_ON_FAILOVER,
                    Some(a) => a
                        .parse()
                        .map_err(|_| err("max lag must be a non-negative integer"))?,
                };
                Ok(CommitMode::Async {
                    max_lag_on_failover,
                })
            }
            "quorum" => Ok(CommitMode::Quorum { k: k(arg)? }),
            "remote_apply" => Ok(CommitMode::RemoteApply { k: k(arg)? }),
            _ => Err(err("mode must be async, quorum:<k> or remote_apply:<k>")),
        }
    }
}

impl FromStr for OnUnavailable {
    type Err = ParsePolicyError;

    /// `strict` or `degrade`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "strict" => Ok(OnUnavailable::Strict),
            "degrade" => Ok(OnUnavailable::Degrade),
            _ => Err(ParsePolicyError {
                input: s.to_owned(),
                reason: "on_unavailable must be strict or degrade",
            }),
        }
    }
}

impl CommitPolicy {
    /// Builds a policy from its two configuration strings, e.g.
    /// `("quorum:1", "degrade")`.
    pub fn parse(mode: &str, on_unavailable: &str) -> Result<Self, ParsePolicyError> {
        Ok(CommitPolicy {
            mode: mode.parse()?,
            on_unavailable: on_unavailable.parse()?,
        })
    }
}

impl FromStr for CommitPolicy {
    type Err = ParsePolicyError;

    /// `<mode>` or `<mode>,<on_unavailable>`, e.g. `quorum:2,degrade`; the
    /// default for `on_unavailable` is `strict`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(',') {
            Some((mode, on)) => CommitPolicy::parse(mode, on),
            None => CommitPolicy::parse(s, "strict"),
        }
    }
}

impl fmt::Display for CommitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mode {
            CommitMode::Async {
                max_lag_on_failover,
            } => write!(f, "async:{max_lag_on_failover}")?,
            CommitMode::Quorum { k } => write!(f, "quorum:{k}")?,
            CommitMode::RemoteApply { k } => write!(f, "remote_apply:{k}")?,
        }
        match self.on_unavailable {
            OnUnavailable::Strict => f.write_str(",strict"),
            OnUnavailable::Degrade => f.write_str(",degrade"),
        }
    }
}

/// A change to the cluster state, proposed through Raft.
///
/// Every time value (`*_ms`) is on the proposer's clock, in milliseconds since
/// the Unix epoch; replicas never read their own clock while applying.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClusterCommand {
    /// Record a new member. Rejected if the name (or its raft id) is taken.
    AddMember {
        /// The member's name.
        node: NodeId,
        /// Its role and addresses.
        member: Member,
    },
    /// Forget a member. Rejected for the current primary (switch over first).
    RemoveMember {
        /// The member's name.
        node: NodeId,
    },
    /// Set or clear a member's `nofailover` flag.
    SetNoFailover {
        /// The member's name.
        node: NodeId,
        /// The new value.
        nofailover: bool,
    },
    /// Extend the primary's lease to `now_ms + lease_ttl_ms`. Only the current
    /// primary, in the current epoch. A lease is never shortened.
    RenewLease {
        /// The primary renewing.
        node: NodeId,
        /// The epoch it writes in.
        epoch: Epoch,
        /// The primary's clock when it proposed.
        now_ms: u64,
        /// Lease length.
        lease_ttl_ms: u64,
    },
    /// The primary gives its lease up (it has stopped writing); a promotion
    /// may follow at once.
    ReleaseLease {
        /// The primary releasing.
        node: NodeId,
        /// Its epoch.
        epoch: Epoch,
    },
    /// Make `node` primary of the new `epoch`, whose first entry is
    /// `first_lsn`. Requires `epoch` = current + 1, a data member, and no
    /// valid lease of another node at `now_ms`. Grants `node` a lease until
    /// `now_ms + lease_ttl_ms`.
    Promote {
        /// The new primary.
        node: NodeId,
        /// The new epoch (current + 1).
        epoch: Epoch,
        /// The first LSN the new primary will write.
        first_lsn: Lsn,
        /// The proposer's clock.
        now_ms: u64,
        /// Length of the new primary's first lease.
        lease_ttl_ms: u64,
    },
    /// The primary steps down (planned switchover): no primary, no lease,
    /// same epoch. Only for the current primary in the current epoch.
    Demote {
        /// The primary stepping down.
        node: NodeId,
        /// Its epoch.
        epoch: Epoch,
    },
    /// Change the commit policy.
    SetCommitPolicy {
        /// The new policy.
        policy: CommitPolicy,
    },
    /// The primary declares which mirrors hold every acknowledged write.
    SetSyncSet {
        /// The primary's epoch; a stale primary's declaration is rejected.
        epoch: Epoch,
        /// Data members other than the primary.
        nodes: BTreeSet<NodeId>,
    },
    /// The primary acknowledges writes without a quorum from `from_lsn` on.
    MarkDegraded {
        /// The primary's epoch.
        epoch: Epoch,
        /// First LSN acknowledged without quorum.
        from_lsn: Lsn,
        /// The primary's clock.
        now_ms: u64,
    },
    /// The quorum is back.
    ClearDegraded {
        /// The primary's epoch.
        epoch: Epoch,
    },
    /// Start a planned switchover from the current primary to `to`. The
    /// primary then holds writes and answers with `SwitchoverFenced`.
    BeginSwitchover {
        /// The target, a data member other than the primary.
        to: NodeId,
        /// The primary's epoch.
        epoch: Epoch,
        /// The proposer's clock.
        now_ms: u64,
        /// How long the switchover may take.
        timeout_ms: u64,
    },
    /// The primary holds writes; `last_lsn` is its last entry.
    SwitchoverFenced {
        /// The primary.
        node: NodeId,
        /// Its epoch.
        epoch: Epoch,
        /// Its last LSN.
        last_lsn: Lsn,
    },
    /// Abandon the switchover; the primary may write again once it sees this.
    EndSwitchover {
        /// The primary's epoch.
        epoch: Epoch,
    },
}

/// What an accepted command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The state changed (or the command was an accepted no-op).
    Ok,
    /// The lease now runs until this time.
    LeaseUntil {
        /// Expiry on the proposer's clock.
        expires_at_ms: u64,
    },
    /// A new epoch started.
    Promoted {
        /// The new primary.
        node: NodeId,
        /// The new epoch.
        epoch: Epoch,
    },
}

/// Why a command was refused. The state is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// The node is not a member.
    #[error("{0} is not a member")]
    UnknownMember(NodeId),
    /// The name is already a member.
    #[error("{0} is already a member")]
    MemberExists(NodeId),
    /// Two names map to the same raft id.
    #[error("{node} has the same raft id {id} as {existing}")]
    RaftIdCollision {
        /// The new name.
        node: NodeId,
        /// The existing name.
        existing: NodeId,
        /// The shared id.
        id: u64,
    },
    /// The command must come from the current primary.
    #[error("{node} is not the primary (primary: {primary:?})")]
    NotPrimary {
        /// Who sent it.
        node: NodeId,
        /// The current primary.
        primary: Option<NodeId>,
    },
    /// The command carries another epoch than the one it must.
    #[error("epoch {got} given, {expected} required")]
    WrongEpoch {
        /// The epoch required.
        expected: Epoch,
        /// The epoch in the command.
        got: Epoch,
    },
    /// Witnesses never hold data, so they are never primary or in a sync set.
    #[error("{0} is a witness")]
    Witness(NodeId),
    /// Another node's lease is still valid at the command's time.
    #[error("lease of {holder} valid until {expires_at_ms} ms (now {now_ms} ms)")]
    LeaseValid {
        /// The holder.
        holder: NodeId,
        /// Its expiry.
        expires_at_ms: u64,
        /// The command's time.
        now_ms: u64,
    },
    /// A new epoch may not start before the previous one.
    #[error("first lsn {first_lsn} is before the previous epoch's first lsn {previous}")]
    LsnRegression {
        /// The command's first LSN.
        first_lsn: Lsn,
        /// The previous epoch's first LSN.
        previous: Lsn,
    },
    /// The primary cannot be removed; switch over first.
    #[error("{0} is the primary; switch over before removing it")]
    RemovePrimary(NodeId),
    /// The primary cannot be in its own sync set.
    #[error("the primary {0} cannot be in the sync set")]
    PrimaryInSyncSet(NodeId),
    /// The policy is not allowed.
    #[error("invalid commit policy: {0}")]
    InvalidPolicy(String),
    /// Another switchover is in progress.
    #[error("a switchover to {0} is in progress")]
    SwitchoverInProgress(NodeId),
    /// There is no switchover to act on.
    #[error("no switchover is in progress")]
    NoSwitchover,
    /// The switchover target cannot take over.
    #[error("{0} cannot be a switchover target")]
    BadSwitchoverTarget(NodeId),
}

/// What the state machine returns for each command.
pub type CommandResult = Result<Applied, Rejected>;

/// The whole replicated control-plane state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Every member by name.
    pub members: BTreeMap<NodeId, Member>,
    /// The node allowed to write, if any.
    pub primary: Option<NodeId>,
    /// The current epoch (0 before the first promotion).
    pub epoch: Epoch,
    /// `(epoch, first LSN of that epoch)`, strictly increasing in epoch.
    pub epoch_history: Vec<(Epoch, Lsn)>,
    /// The commit policy every primary follows.
    pub commit_policy: CommitPolicy,
    /// The primary's lease.
    pub lease: Option<Lease>,
    /// Mirrors known to hold every acknowledged write (quorum modes).
    pub sync_set: BTreeSet<NodeId>,
    /// Set while the primary acknowledges without its quorum.
    pub degraded: Option<Degraded>,
    /// The last change of primary.
    pub last_failover: Option<LastFailover>,
    /// A planned switchover in progress.
    pub switchover: Option<SwitchoverIntent>,
}

impl ClusterState {
    /// Applies `cmd`. Pure: the result depends only on `self` and `cmd`.
    pub fn apply(&mut self, cmd: &ClusterCommand) -> CommandResult {
        match cmd {
            ClusterCommand::AddMember { node, member } => self.add_member(node, member),
            ClusterCommand::RemoveMember { node } => {
                if !self.members.contains_key(node) {
                    return Err(Rejected::UnknownMember(node.clone()));
                }
                if self.primary.as_ref() == Some(node) {
                    return Err(Rejected::RemovePrimary(node.clone()));
                }
                self.members.remove(node);
                self.sync_set.remove(node);
                if self.switchover.as_ref().is_some_and(|sw| sw.to == *node) {
                    self.switchover = None;
                }
                Ok(Applied::Ok)
            }
            ClusterCommand::SetNoFailover { node, nofailover } => {
                let m = self
                    .members
                    .get_mut(node)
                    .ok_or_else(|| Rejected::UnknownMember(node.clone()))?;
                m.nofailover = *nofailover;
                Ok(Applied::Ok)
            }
            ClusterCommand::RenewLease {
                node,
                epoch,
                now_ms,
                lease_ttl_ms,
            } => {
                self.require_primary(node, *epoch)?;
                let new_expiry = now_ms.saturating_add(*lease_ttl_ms);
                let expires_at_ms = match &self.lease {
                    Some(l) if l.holder == *node && l.epoch == *epoch => {
                        l.expires_at_ms.max(new_expiry)
                    }
                    _ => new_expiry,
                };
                self.lease = Some(Lease {
                    holder: node.clone(),
                    epoch: *epoch,
                    expires_at_ms,
                });
                Ok(Applied::LeaseUntil { expires_at_ms })
            }
            ClusterCommand::ReleaseLease { node, epoch } => {
                self.require_primary(node, *epoch)?;
                self.lease = None;
                Ok(Applied::Ok)
            }
            ClusterCommand::Promote {
                node,
                epoch,
                first_lsn,
                now_ms,
                lease_ttl_ms,
            } => self.promote(node, *epoch, *first_lsn, *now_ms, *lease_ttl_ms),
            ClusterCommand::Demote { node, epoch } => {
                self.require_primary(node, *epoch)?;
                self.primary = None;
                self.lease = None;
                self.sync_set.clear();
                self.degraded = None;
                self.switchover = None;
                Ok(Applied::Ok)
            }
            ClusterCommand::SetCommitPolicy { policy } => {
                match policy.mode {
                    CommitMode::Quorum { k: 0 } | CommitMode::RemoteApply { k: 0 } => {
                        return Err(Rejected::InvalidPolicy("k must be at least 1".to_owned()));
                    }
                    _ => {}
                }
                self.commit_policy = *policy;
                Ok(Applied::Ok)
            }
            ClusterCommand::SetSyncSet { epoch, nodes } => {
                self.require_epoch(*epoch)?;
                for n in nodes {
                    let m = self
                        .members
                        .get(n)
                        .ok_or_else(|| Rejected::UnknownMember(n.clone()))?;
                    if m.role == Role::Witness {
                        return Err(Rejected::Witness(n.clone()));
                    }
                    if self.primary.as_ref() == Some(n) {
                        return Err(Rejected::PrimaryInSyncSet(n.clone()));
                    }
                }
                self.sync_set = nodes.clone();
                Ok(Applied::Ok)
            }
            ClusterCommand::MarkDegraded {
                epoch,
                from_lsn,
                now_ms,
            } => {
                self.require_epoch(*epoch)?;
                // Keep the earliest point: writes since then lack a quorum.
                if self.degraded.is_none() {
                    self.degraded = Some(Degraded {
                        from_lsn: *from_lsn,
                        at_ms: *now_ms,
                    });
                }
                Ok(Applied::Ok)
            }
            ClusterCommand::ClearDegraded { epoch } => {
                self.require_epoch(*epoch)?;
                self.degraded = None;
                Ok(Applied::Ok)
            }
            ClusterCommand::BeginSwitchover {
                to,
                epoch,
                now_ms,
                timeout_ms,
            } => {
                self.require_epoch(*epoch)?;
                let from = self.primary.clone().ok_or(Rejected::NotPrimary {
                    node: to.clone(),
                    primary: None,
                })?;
                if let Some(sw) = &self.switchover {
                    return Err(Rejected::SwitchoverInProgress(sw.to.clone()));
                }
                match self.members.get(to) {
                    Some(m) if m.role == Role::Data && *to != from => {}
                    Some(_) => return Err(Rejected::BadSwitchoverTarget(to.clone())),
                    None => return Err(Rejected::UnknownMember(to.clone())),
                }
                self.switchover = Some(SwitchoverIntent {
                    from,
                    to: to.clone(),
                    epoch: *epoch,
                    deadline_ms: now_ms.saturating_add(*timeout_ms),
                    last_lsn: None,
                });
                Ok(Applied::Ok)
            }
            ClusterCommand::SwitchoverFenced {
                node,
                epoch,
                last_lsn,
            } => {
                self.require_primary(node, *epoch)?;
                let sw = self.switchover.as_mut().ok_or(Rejected::NoSwitchover)?;
                // The first report counts: the primary held writes from then.
                if sw.last_lsn.is_none() {
                    sw.last_lsn = Some(*last_lsn);
                }
                Ok(Applied::Ok)
            }
            ClusterCommand::EndSwitchover { epoch } => {
                self.require_epoch(*epoch)?;
                if self.switchover.take().is_none() {
                    return Err(Rejected::NoSwitchover);
                }
                Ok(Applied::Ok)
            }
        }
    }

    fn add_member(&mut self, node: &NodeId, member: &Member) -> CommandResult {
        if self.members.contains_key(node) {
            return Err(Rejected::MemberExists(node.clone()));
        }
        let id = raft_id(node);
        if let Some(existing) = self.members.keys().find(|n| raft_id(n) == id) {
            return Err(Rejected::RaftIdCollision {
                node: node.clone(),
                existing: existing.clone(),
                id,
            });
        }
        self.members.insert(node.clone(), member.clone());
        Ok(Applied::Ok)
    }

    fn promote(
        &mut self,
        node: &NodeId,
        epoch: Epoch,
        first_lsn: Lsn,
        now_ms: u64,
        lease_ttl_ms: u64,
    ) -> CommandResult {
        let m = self
            .members
            .get(node)
            .ok_or_else(|| Rejected::UnknownMember(node.clone()))?;
        if m.role == Role::Witness {
            return Err(Rejected::Witness(node.clone()));
        }
        let expected = Epoch(self.epoch.0.saturating_add(1));
        if epoch != expected {
            return Err(Rejected::WrongEpoch {
                expected,
                got: epoch,
            });
        }
        // A switchover whose primary holds writes hands over without waiting
        // for its lease: exactly to its target, right after its last LSN.
        let handover = self.switchover.as_ref().is_some_and(|sw| {
            sw.to == *node && sw.last_lsn.is_some_and(|last| last.next() == first_lsn)
        });
        if let Some(l) = &self.lease
            && !handover
            && l.holder != *node
            && l.expires_at_ms > now_ms
        {
            return Err(Rejected::LeaseValid {
                holder: l.holder.clone(),
                expires_at_ms: l.expires_at_ms,
                now_ms,
            });
        }
        if let Some(&(_, previous)) = self.epoch_history.last()
            && first_lsn < previous
        {
            return Err(Rejected::LsnRegression {
                first_lsn,
                previous,
            });
        }
        let duration_ms = self
            .lease
            .as_ref()
            .map_or(0, |l| now_ms.saturating_sub(l.expires_at_ms));
        self.last_failover = Some(LastFailover {
            from: self.primary.clone(),
            to: node.clone(),
            epoch,
            at_ms: now_ms,
            duration_ms,
        });
        self.primary = Some(node.clone());
        self.epoch = epoch;
        self.epoch_history.push((epoch, first_lsn));
        self.lease = Some(Lease {
            holder: node.clone(),
            epoch,
            expires_at_ms: now_ms.saturating_add(lease_ttl_ms),
        });
        // Which mirrors hold everything is unknown until the new primary says.
        self.sync_set.clear();
        self.degraded = None;
        self.switchover = None;
        Ok(Applied::Promoted {
            node: node.clone(),
            epoch,
        })
    }

    fn require_epoch(&self, epoch: Epoch) -> Result<(), Rejected> {
        if epoch != self.epoch {
            return Err(Rejected::WrongEpoch {
                expected: self.epoch,
                got: epoch,
            });
        }
        Ok(())
    }

    fn require_primary(&self, node: &NodeId, epoch: Epoch) -> Result<(), Rejected> {
        if self.primary.as_ref() != Some(node) {
            return Err(Rejected::NotPrimary {
                node: node.clone(),
                primary: self.primary.clone(),
            });
        }
        self.require_epoch(epoch)
    }

    /// The lease, if it is held by the current primary and valid at `now_ms`.
    #[must_use]
    pub fn valid_lease(&self, now_ms: u64) -> Option<&Lease> {
        self.lease
            .as_ref()
            .filter(|l| Some(&l.holder) == self.primary.as_ref() && l.expires_at_ms > now_ms)
    }

    /// The first LSN of `epoch`, if it is in the history.
    #[must_use]
    pub fn first_lsn_of(&self, epoch: Epoch) -> Option<Lsn> {
        self.epoch_history
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|&(_, l)| l)
    }

    /// Checks every invariant `apply` maintains:
    ///
    /// - the primary is a data member;
    /// - `epoch_history` is strictly increasing in epoch and non-decreasing
    ///   in LSN, and its last epoch is `epoch` (empty only at epoch 0);
    /// - a lease is held by the primary in the current epoch;
    /// - the sync set holds data members only, never the primary;
    /// - a switchover goes from the current primary in the current epoch to
    ///   another data member.
    pub fn check_invariants(&self) -> Result<(), String> {
        if let Some(p) = &self.primary {
            match self.members.get(p) {
                None => return Err(format!("primary {p} is not a member")),
                Some(m) if m.role == Role::Witness => {
                    return Err(format!("primary {p} is a witness"));
                }
                Some(_) => {}
            }
        }
        for w in self.epoch_history.windows(2) {
            if w[0].0 >= w[1].0 {
                return Err(format!("epoch history not increasing: {w:?}"));
            }
            if w[0].1 > w[1].1 {
                return Err(format!("epoch history lsn regresses: {w:?}"));
            }
        }
        match self.epoch_history.last() {
            None if self.epoch != Epoch(0) => {
                return Err(format!("epoch {} without history", self.epoch));
            }
            Some((e, _)) if *e != self.epoch => {
                return Err(format!("history ends at {e}, epoch is {}", self.epoch));
            }
            _ => {}
        }
        if let Some(l) = &self.lease
            && (Some(&l.holder) != self.primary.as_ref() || l.epoch != self.epoch)
        {
            return Err(format!("lease {l:?} not held by the primary in this epoch"));
        }
        for n in &self.sync_set {
            match self.members.get(n) {
                Some(m) if m.role == Role::Data && self.primary.as_ref() != Some(n) => {}
                _ => return Err(format!("{n} may not be in the sync set")),
            }
        }
        if let Some(sw) = &self.switchover {
            if Some(&sw.from) != self.primary.as_ref() || sw.epoch != self.epoch {
                return Err(format!("switchover {sw:?} not from the current primary"));
            }
            match self.members.get(&sw.to) {
                Some(m) if m.role == Role::Data && sw.to != sw.from => {}
                _ => return Err(format!("switchover target {} invalid", sw.to)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> NodeId {
        NodeId::from(s)
    }

    fn member(role: Role) -> Member {
        Member {
            role,
            raft_addr: "127.0.0.1:7000".into(),
            http_addr: "127.0.0.1:7070".into(),
            nofailover: false,
        }
    }

    /// n1, n2 data; w witness.
    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        for (name, role) in [("n1", Role::Data), ("n2", Role::Data), ("w", Role::Witness)] {
            s.apply(&ClusterCommand::AddMember {
                node: n(name),
                member: member(role),
            })
            .unwrap();
        }
        s
    }

    fn promote(node: &str, epoch: u64, first_lsn: u64, now_ms: u64) -> ClusterCommand {
        ClusterCommand::Promote {
            node: n(node),
            epoch: Epoch(epoch),
            first_lsn: Lsn(first_lsn),
            now_ms,
            lease_ttl_ms: 1000,
        }
    }

    #[test]
    fn raft_id_is_fnv1a_and_stable() {
        // FNV-1a 64 test vectors: the mapping must never change.
        assert_eq!(raft_id(&n("")), 0xcbf2_9ce4_8422_2325);
        assert_eq!(raft_id(&n("a")), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(raft_id(&n("n1")), raft_id(&n("n2")));
    }

    #[test]
    fn add_member_rejects_duplicates() {
        let mut s = cluster();
        let err = s
            .apply(&ClusterCommand::AddMember {
                node: n("n1"),
                member: member(Role::Data),
            })
            .unwrap_err();
        assert_eq!(err, Rejected::MemberExists(n("n1")));
    }

    #[test]
    fn remove_member_refuses_primary_and_cleans_sync_set() {
        let mut s = cluster();
        s.apply(&promote("n1", 1, 1, 0)).unwrap();
        s.apply(&ClusterCommand::SetSyncSet {
            epoch: Epoch(1),
            nodes: [n("n2")].into(),
        })
        .unwrap();
        assert_eq!(
            s.apply(&ClusterCommand::RemoveMember { node: n("n1") }),
            Err(Rejected::RemovePrimary(n("n1")))
        );
        s.apply(&ClusterCommand::RemoveMember { node: n("n2") })
            .unwrap();
        assert!(s.sync_set.is_empty());
        assert!(!s.members.contains_key(&n("n2")));
        assert_eq!(
            s.apply(&ClusterCommand::RemoveMember { node: n("n2") }),
            Err(Rejected::UnknownMember(n("n2")))
        );
    }

    #[test]
    fn promote_requires_next_epoch_and_a_data_member() {
        let mut s = cluster();
        assert_eq!(
            s.apply(&promote("n1", 2, 1, 0)),
            Err(Rejected::WrongEpoch {
                expected: Epoch(1),
                got: Epoch(2)
            })
        );
        assert_eq!(
            s.apply(&promote("w", 1, 1, 0)),
            Err(Rejected::Witness(n("w")))
        );
        assert_eq!(
            s.apply(&promote("x", 1, 1, 0)),
            Err(Rejected::UnknownMember(n("x")))
        );
        assert_eq!(
            s.apply(&promote("n1", 1, 1, 100)),
            Ok(Applied::Promoted {
                node: n("n1"),
                epoch: Epoch(1)
            })
        );
        assert_eq!(s.primary, Some(n("n1")));
        assert_eq!(s.epoch_history, vec![(Epoch(1), Lsn(1))]);
        assert_eq!(s.lease.as_ref().unwrap().expires_at_ms, 1100);
        // Same epoch again is refused.
        assert!(matches!(
            s.apply(&promote("n2", 1, 5, 5000)),
            Err(Rejected::WrongEpoch { .. })
        ));
        s.check_invariants().unwrap();
    }

    #[test]
    fn promote_refused_while_another_lease_is_valid() {
        let mut s = cluster();
        s.apply(&promote("n1", 1, 1, 0)).unwrap();
        assert_eq!(
            s.apply(&promote("n2", 2, 10, 999)),
            Err(Rejected::LeaseValid {
                holder: n("n1"),
                expires_at_ms: 1000,
                now_ms: 999
            })
        );
        assert!(s.apply(&promote("n2", 2, 10, 1500)).is_ok());
        let lf = s.last_failover.clone().unwrap();
        assert_eq!(lf.from, Some(n("n1")));
        assert_eq!(lf.to, n("n2"));
        assert_eq!(lf.duration_ms, 500);
        assert_eq!(s.first_lsn_of(Epoch(2)), Some(Lsn(10)));
    }

    #[test]
    fn promote_refuses_lsn_regression() {
        let mut s = cluster();
        s.apply(&promote("n1", 1, 50, 0)).unwrap();
        assert_eq!(
            s.apply(&promote("n2", 2, 49, 5000)),
            Err(Rejected::LsnRegression {
                first_lsn: Lsn(49),
                previous: Lsn(50)
            })
        );
        // An empty epoch: the next one may start at the same LSN.
        s.apply(&promote("n2", 2, 50, 5000)).unwrap();
    }

    #[test]
    fn lease_renewal_only_by_current_primary_in_current_epoch() {
        let mut s = cluster();
        s.apply(&promote("n1", 1, 1, 0)).unwrap();
        let renew = |node: &str, epoch: u64, now_ms: u64| ClusterCommand::RenewLease {
            node: n(node),
            epoch: Epoch(epoch),
            now_ms,
            lease_ttl_ms: 1000,
        };
        assert!(matches!(
            s.apply(&renew("n2", 1, 500)),
            Err(Rejected::NotPrimary { .. })
        ));
        assert!(matches!(
            s.apply(&renew("n1", 0, 500)),
            Err(Rejected::WrongEpoch { .. })
        ));
        assert_eq!(
            s.apply(&renew("n1", 1, 500)),
            Ok(Applied::LeaseUntil {
                expires_at_ms: 1500
            })
        );
        // A renewal with an older clock value never shortens the lease.
        assert_eq!(
            s.apply(&renew("n1", 1, 200)),
            Ok(Applied::LeaseUntil {
                expires_at_ms: 1500
            })
        );
        // After a failover the deposed primary cannot renew.
        s.apply(&promote("n2", 2, 10, 2000)).unwrap();
        assert!(matches!(
            s.apply(&renew("n1", 1, 2100)),
            Err(Rejected::NotPrimary { .. })
        ));
    }

    #[test]
    fn release_and_demote_allow_immediate_promotion() {
        let mut s = cluster();
        s.apply(&promote("n1", 1, 1, 0)).unwrap();
        s.apply(&ClusterCommand::ReleaseLease {
            node: n("n1"),
            epoch: Epoch(1),
        })
        .unwrap();
        assert!(s.lease.is_none());
        assert_eq!(s.primary, Some(n("n1")));
        s.apply(&ClusterCommand::Demote {
            node: n("n1"),
            epoch: Epoch(1),
        })
        .unwrap();
        assert_eq!(s.primary, None);
        assert_eq!(s.epoch, Epoch(1));
        s.apply(&promote("n2", 2, 7, 10)).unwrap();
        assert_eq!(s.primary, Some(n("n2")));
        assert!(matches!(
            s.apply(&ClusterCommand::Demote {
                node: n("n1"),
                epoch: Epoch(2)
            }),
            Err(Rejected::NotPrimary { .. })
        ));
    }

    #[test]
    fn sync_set_checks_epoch_and_members() {
        let mut s = cluster();
        s.apply(&promote("n1", 1, 1, 0)).unwrap();
        let set = |epoch: u64, nodes: &[&str]| ClusterCommand::SetSyncSet {
            epoch: Epoch(epoch),
            nodes: nodes.iter().map(|x| n(x)).collect(),
        };
        assert!(matches!(
            s.apply(&set(0, &["n2"])),
            Err(Rejected::WrongEpoch { .. })
        ));
        assert_eq!(s.apply(&set(1, &["w"])), Err(Rejected::Witness(n("w"))));
        assert_eq!(
            s.apply(&set(1, &["n1"])),
            Err(Rejected::PrimaryInSyncSet(n("n1")))
        );
        s.apply(&set(1, &["n2"])).unwrap();
        assert_eq!(s.sync_set, [n("n2")].into());
        // A promotion resets it: the new primary must declare its own.
        s.apply(&promote("n2", 2, 3, 5000)).unwrap();
        assert!(s.sync_set.is_empty());
    }

    #[test]
    fn degraded_keeps_earliest_point_and_clears() {
        let mut s = cluster();
        s.apply(&promote("n1", 1, 1, 0)).unwrap();
        for (lsn, at) in [(10, 100), (20, 200)] {
            s.apply(&ClusterCommand::MarkDegraded {
                epoch: Epoch(1),
                from_lsn: Lsn(lsn),
                now_ms: at,
            })
            .unwrap();
        }
        assert_eq!(
            s.degraded,
            Some(Degraded {
                from_lsn: Lsn(10),
                at_ms: 100
            })
        );
        assert!(
            s.apply(&ClusterCommand::ClearDegraded { epoch: Epoch(0) })
                .is_err()
        );
        s.apply(&ClusterCommand::ClearDegraded { epoch: Epoch(1) })
            .unwrap();
        assert!(s.degraded.is_none());
    }

    #[test]
    fn switchover_hands_over_without_waiting_for_the_lease() {
        let mut s = cluster();
        s.apply(&promote("n1", 1, 1, 0)).unwrap();
        let begin = ClusterCommand::BeginSwitchover {
            to: n("n2"),
            epoch: Epoch(1),
            now_ms: 100,
            timeout_ms: 5000,
        };
        for (to, err) in [
            ("w", Rejected::BadSwitchoverTarget(n("w"))),
            ("n1", Rejected::BadSwitchoverTarget(n("n1"))),
            ("x", Rejected::UnknownMember(n("x"))),
        ] {
            let mut cmd = begin.clone();
            if let ClusterCommand::BeginSwitchover { to: t, .. } = &mut cmd {
                *t = n(to);
            }
            assert_eq!(s.apply(&cmd), Err(err));
        }
        s.apply(&begin).unwrap();
        assert_eq!(
            s.apply(&begin),
            Err(Rejected::SwitchoverInProgress(n("n2")))
        );
        // Before the primary holds writes, the lease still protects it.
        assert!(matches!(
            s.apply(&promote("n2", 2, 31, 200)),
            Err(Rejected::LeaseValid { .. })
        ));
        assert!(matches!(
            s.apply(&ClusterCommand::SwitchoverFenced {
                node: n("n2"),
                epoch: Epoch(1),
                last_lsn: Lsn(30)
            }),
            Err(Rejected::NotPrimary { .. })
        ));
        s.apply(&ClusterCommand::SwitchoverFenced {
            node: n("n1"),
            epoch: Epoch(1),
            last_lsn: Lsn(30),
        })
        .unwrap();
        // Only the target, only right after the last LSN.
        assert!(s.apply(&promote("n3", 2, 31, 200)).is_err());
        assert!(s.apply(&promote("n2", 2, 35, 200)).is_err());
        s.apply(&promote("n2", 2, 31, 200)).unwrap();
        assert_eq!(s.primary, Some(n("n2")));
        assert!(s.switchover.is_none());
        s.check_invariants().unwrap();
    }

    #[test]
    fn ended_switchover_refuses_its_promotion() {
        let mut s = cluster();
        s.apply(&promote("n1", 1, 1, 0)).unwrap();
        s.apply(&ClusterCommand::BeginSwitchover {
            to: n("n2"),
            epoch: Epoch(1),
            now_ms: 100,
            timeout_ms: 5000,
        })
        .unwrap();
        s.apply(&ClusterCommand::SwitchoverFenced {
            node: n("n1"),
            epoch: Epoch(1),
            last_lsn: Lsn(30),
        })
        .unwrap();
        s.apply(&ClusterCommand::EndSwitchover { epoch: Epoch(1) })
            .unwrap();
        assert_eq!(
            s.apply(&ClusterCommand::EndSwitchover { epoch: Epoch(1) }),
            Err(Rejected::NoSwitchover)
        );
        // The primary may write again: a late promotion must fail.
        assert!(matches!(
            s.apply(&promote("n2", 2, 31, 200)),
            Err(Rejected::LeaseValid { .. })
        ));
        assert_eq!(s.primary, Some(n("n1")));
    }

    #[test]
    fn commit_policy_parses_and_validates() {
        assert_eq!(
            "async".parse::<CommitPolicy>().unwrap(),
            CommitPolicy::default()
        );
        assert_eq!(
            CommitPolicy::parse("quorum:1", "degrade").unwrap(),
            CommitPolicy {
                mode: CommitMode::Quorum { k: 1 },
                on_unavailable: OnUnavailable::Degrade
            }
        );
        let p: CommitPolicy = "remote_apply:2,strict".parse().unwrap();
        assert_eq!(p.mode, CommitMode::RemoteApply { k: 2 });
        assert_eq!(p.to_string(), "remote_apply:2,strict");
        assert_eq!(p.to_string().parse::<CommitPolicy>().unwrap(), p);
        assert_eq!(
            "async:5".parse::<CommitMode>().unwrap(),
            CommitMode::Async {
                max_lag_on_failover: 5
            }
        );
        for bad in ["quorum", "quorum:0", "quorum:x", "sync", "async,lenient"] {
            assert!(bad.parse::<CommitPolicy>().is_err(), "{bad}");
        }
        let mut s = cluster();
        assert!(matches!(
            s.apply(&ClusterCommand::SetCommitPolicy {
                policy: CommitPolicy {
                    mode: CommitMode::Quorum { k: 0 },
                    on_unavailable: OnUnavailable::Strict
                }
            }),
            Err(Rejected::InvalidPolicy(_))
        ));
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<CommitPolicy>(&json).unwrap(), p);
    }

    #[test]
    fn state_round_trips_through_postcard() {
        let mut s = cluster();
        s.apply(&promote("n1", 1, 1, 0)).unwrap();
        let bytes = postcard::to_stdvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<ClusterState>(&bytes).unwrap(), s);
    }

    fn arb_node() -> impl Strategy<Value = NodeId> {
        prop_oneof![Just(n("n1")), Just(n("n2")), Just(n("n3")), Just(n("w"))]
    }

    fn arb_command() -> impl Strategy<Value = ClusterCommand> {
        let epoch = (0u64..6).prop_map(Epoch);
        let lsn = (0u64..100).prop_map(Lsn);
        let now = 0u64..10_000;
        prop_oneof![
            (arb_node(), any::<bool>(), any::<bool>()).prop_map(|(node, witness, nofailover)| {
                ClusterCommand::AddMember {
                    node,
                    member: Member {
                        nofailover,
                        ..member(if witness { Role::Witness } else { Role::Data })
                    },
                }
            }),
            arb_node().prop_map(|node| ClusterCommand::RemoveMember { node }),
            (arb_node(), epoch.clone(), now.clone(), 0u64..2000).prop_map(
                |(node, epoch, now_ms, lease_ttl_ms)| ClusterCommand::RenewLease {
                    node,
                    epoch,
                    now_ms,
                    lease_ttl_ms
                }
            ),
            (arb_node(), epoch.clone())
                .prop_map(|(node, epoch)| ClusterCommand::ReleaseLease { node, epoch }),
            (arb_node(), epoch.clone(), lsn.clone(), now, 0u64..2000).prop_map(
                |(node, epoch, first_lsn, now_ms, lease_ttl_ms)| ClusterCommand::Promote {
                    node,
                    epoch,
                    first_lsn,
                    now_ms,
                    lease_ttl_ms
                }
            ),
            (arb_node(), epoch.clone())
                .prop_map(|(node, epoch)| ClusterCommand::Demote { node, epoch }),
            (
                epoch.clone(),
                proptest::collection::btree_set(arb_node(), 0..3)
            )
                .prop_map(|(epoch, nodes)| ClusterCommand::SetSyncSet { epoch, nodes }),
            (epoch.clone(), lsn).prop_map(|(epoch, from_lsn)| ClusterCommand::MarkDegraded {
                epoch,
                from_lsn,
                now_ms: 0
            }),
            epoch
                .clone()
                .prop_map(|epoch| ClusterCommand::ClearDegraded { epoch }),
            (arb_node(), epoch.clone(), 0u64..10_000).prop_map(|(to, epoch, now_ms)| {
                ClusterCommand::BeginSwitchover {
                    to,
                    epoch,
                    now_ms,
                    timeout_ms: 1000,
                }
            }),
            (arb_node(), epoch.clone(), 0u64..100).prop_map(|(node, epoch, l)| {
                ClusterCommand::SwitchoverFenced {
                    node,
                    epoch,
                    last_lsn: Lsn(l),
                }
            }),
            epoch.prop_map(|epoch| ClusterCommand::EndSwitchover { epoch }),
        ]
    }

    proptest! {
        /// Random command sequences never break an invariant, a rejected
        /// command changes nothing, and the epoch never goes back.
        #[test]
        fn random_commands_keep_invariants(cmds in proptest::collection::vec(arb_command(), 0..80)) {
            let mut s = ClusterState::default();
            for cmd in &cmds {
                let before = s.clone();
                let result = s.apply(cmd);
                if result.is_err() {
                    prop_assert_eq!(&s, &before);
                }
                prop_assert!(s.epoch >= before.epoch);
                if let Err(e) = s.check_invariants() {
                    return Err(TestCaseError::fail(format!("{e} after {cmd:?}")));
                }
            }
        }
    }
}
