//! The failover controller: decides when and whom to promote. No I/O.
//!
//! It runs on every node but acts only while its node is the Raft leader. The
//! driver feeds it events (`handle_*`: the applied [`ClusterState`], Raft
//! leadership, reports from data nodes, clock ticks, switchover requests) and
//! executes what [`Controller::poll_action`] returns. Time is always an
//! argument (`now_ms`, milliseconds since the Unix epoch), so tests run it on
//! simulated time.
//!
//! Failover (DESIGN §8):
//!
//! ```text
//!  leader, own-term entry applied, for ≥ settle (lease_ttl; 3 heartbeats
//!  when the primary does not answer the leader) ─┐
//!  lease.expires_at + margin < now ─┼─► best candidate ─► Propose(Promote{c, epoch+1, c.flushed+1})
//!  candidate: reachable data node, not nofailover, not the lapsed primary,
//!             async: lag ≤ max_lag_on_failover; quorum: member of sync_set
//!  best: highest (epoch, flushed_lsn), then lowest name
//! ```
//!
//! Switchover (planned, zero loss), recorded in the replicated state so that
//! it survives a change of Raft leader:
//!
//! ```text
//!  Propose(BeginSwitchover{to}) ─► (primary's driver holds writes)
//!   ─► SwitchoverFenced{last_lsn} applied ─► target.flushed ≥ last_lsn
//!   ─► Propose(Promote{to, epoch+1, last_lsn+1})  (no lease wait: handover)
//!  past the deadline ─► Propose(EndSwitchover) ─► the primary writes again
//! ```
//!
//! Choices the design left open:
//! - A primary whose lease lapsed is never its own successor while it is still
//!   recorded as primary: it could not renew, so it is not trusted to write.
//! - In a quorum mode that has degraded to async (`degraded` is set) the sync
//!   set no longer covers every acknowledged write; candidates are then chosen
//!   like in async mode with [`DEFAULT_MAX_LAG_ON_FAILOVER`].
//! - A candidate whose `flushed_lsn + 1` is before the current epoch's first
//!   LSN is skipped (its promotion would make the epoch history go back).
//! - The promoted node's `first_lsn` is its reported `flushed_lsn + 1`; entries
//!   it holds beyond that are the node's to save to `data/rollback/`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use crate::state::{ClusterCommand, ClusterState, CommitMode, DEFAULT_MAX_LAG_ON_FAILOVER, Role};
use crate::timing::Timing;
use crate::{Epoch, Lsn, NodeId};

/// Controller settings, all in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Lease length.
    pub lease_ttl_ms: u64,
    /// How long a new leader waits before it may promote while the
    /// primary still answers: a live primary whose renewals failed during
    /// the change of Raft leader gets this long to renew with the new one.
    pub settle_ms: u64,
    /// How long a new leader gathers position reports before it may
    /// promote when the primary does not answer it (dead or cut off): it
    /// then picks among fresh reports, not the first one.
    pub gather_ms: u64,
    /// Extra wait after a lease's expiry.
    pub failover_margin_ms: u64,
    /// A report older than this counts as unreachable.
    pub report_max_age_ms: u64,
    /// Time before a proposed promotion that has not shown up in the applied
    /// state is proposed again.
    pub retry_after_ms: u64,
    /// A switchover that has not reached its promotion by then is aborted.
    pub switchover_timeout_ms: u64,
}

impl From<&Timing> for ControllerConfig {
    fn from(t: &Timing) -> Self {
        ControllerConfig {
            lease_ttl_ms: t.lease_ttl_ms,
            // A live primary whose renewals failed while Raft changed
            // leaders gets one lease to renew with the new leader before it
            // is replaced (shorter settles made leader changes depose
            // healthy primaries in the driver tests).
            settle_ms: t.lease_ttl_ms,
            gather_ms: t.heartbeat_ms.saturating_mul(3),
            failover_margin_ms: t.failover_margin_ms,
            report_max_age_ms: t.lease_ttl_ms,
            retry_after_ms: t.lease_ttl_ms,
            switchover_timeout_ms: t.switchover_timeout_ms,
        }
    }
}

/// What a data node says about itself (or what the driver learned when it
/// could not reach it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The reporting node.
    pub node: NodeId,
    /// The epoch of its last journal entry.
    pub epoch: Epoch,
    /// Last LSN durable in its journal.
    pub flushed_lsn: Lsn,
    /// Last LSN applied to its data file.
    pub applied_lsn: Lsn,
    /// Whether the driver could reach it.
    pub reachable: bool,
    /// When the report was taken.
    pub at_ms: u64,
}

/// Why no node is promoted although the primary is gone: the cluster is
/// read-only until this changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadOnlyReason {
    /// Quorum mode: no reachable member of the sync set.
    NoSyncCandidate,
    /// Async mode: every reachable candidate lags more than allowed.
    LagTooLarge {
        /// The limit, in journal entries.
        max_lag: u64,
        /// The best candidate's lag.
        best_lag: u64,
    },
    /// No reachable data node may fail over at all.
    NoCandidate,
}

impl fmt::Display for ReadOnlyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadOnlyReason::NoSyncCandidate => {
                f.write_str("read-only: no reachable node holds every acknowledged write")
            }
            ReadOnlyReason::LagTooLarge { max_lag, best_lag } => write!(
                f,
                "read-only: the best reachable node lags {best_lag} entries, more than max_lag_on_failover {max_lag}"
            ),
            ReadOnlyReason::NoCandidate => {
                f.write_str("read-only: no reachable data node is allowed to fail over")
            }
        }
    }
}

/// What the controller thinks of the cluster, for `GET /v1/cluster` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// This node is not the Raft leader; another node's controller acts.
    NotLeader,
    /// Just became leader: gathers reports before it may promote.
    WaitingForLease {
        /// When it may act.
        until_ms: u64,
    },
    /// The primary holds a valid lease.
    Healthy {
        /// The primary.
        primary: NodeId,
        /// Its epoch.
        epoch: Epoch,
    },
    /// A promotion was proposed.
    Promoting {
        /// The candidate.
        node: NodeId,
        /// The new epoch.
        epoch: Epoch,
    },
    /// No primary and no node may be promoted.
    ReadOnly(ReadOnlyReason),
    /// A planned switchover is under way.
    Switchover {
        /// Its target.
        target: NodeId,
        /// Where it is.
        phase: SwitchoverPhase,
    },
    /// A switchover passed its deadline; it is being ended and the primary
    /// will write again.
    SwitchoverAborted {
        /// Its target.
        target: NodeId,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::NotLeader => f.write_str("not the raft leader"),
            Status::WaitingForLease { until_ms } => {
                write!(f, "new raft leader: gathering reports until {until_ms} ms")
            }
            Status::Healthy { primary, epoch } => {
                write!(f, "primary {primary} in epoch {epoch} holds its lease")
            }
            Status::Promoting { node, epoch } => write!(f, "promoting {node} to epoch {epoch}"),
            Status::ReadOnly(r) => r.fmt(f),
            Status::Switchover { target, phase } => {
                write!(f, "switchover to {target}: {phase:?}")
            }
            Status::SwitchoverAborted { target, reason } => {
                write!(f, "switchover to {target} aborted: {reason}")
            }
        }
    }
}

/// The steps of a planned switchover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchoverPhase {
    /// Waiting for the primary to hold writes and record its last LSN.
    Fencing,
    /// Waiting for the target to flush up to the primary's last LSN.
    CatchingUp {
        /// The primary's last LSN.
        last_lsn: Lsn,
    },
    /// The promotion was proposed; waiting for it to apply.
    Promoting,
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Propose this command through Raft (`client_write`), in order.
    Propose(ClusterCommand),
    /// The status changed (log it, expose it).
    Status(Status),
}

/// Why a switchover request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SwitchoverError {
    /// Only the Raft leader runs switchovers.
    #[error("this node is not the raft leader")]
    NotLeader,
    /// One switchover at a time.
    #[error("a switchover is already in progress")]
    InProgress,
    /// There is no primary with a valid lease to hand over from.
    #[error("there is no primary holding a valid lease")]
    NoPrimary,
    /// The target cannot take over.
    #[error("{node} cannot become primary: {reason}")]
    BadTarget {
        /// The target.
        node: NodeId,
        /// Why not.
        reason: &'static str,
    },
    /// The target has not answered the leader's position requests lately
    /// (it may be down, or busy for a moment).
    #[error("{node} cannot become primary right now: it has not answered lately")]
    TargetUnreachable {
        /// The target.
        node: NodeId,
    },
    /// No target was given and no node qualifies.
    #[error("no reachable data node can take over")]
    NoCandidate,
}

impl SwitchoverError {
    /// Whether the same request may succeed in a moment without anyone
    /// changing anything: Raft leadership moved, a failover is under way,
    /// or the target (or every candidate) missed its last reports. A
    /// client retries these; the others need the request or the cluster
    /// changed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SwitchoverError::NotLeader
                | SwitchoverError::NoPrimary
                | SwitchoverError::TargetUnreachable { .. }
                | SwitchoverError::NoCandidate
        )
    }
}

/// The failover controller state machine.
#[derive(Debug)]
pub struct Controller {
    config: ControllerConfig,
    me: Option<NodeId>,
    is_leader: bool,
    term: u64,
    leader_since_ms: u64,
    state: Option<ClusterState>,
    reports: BTreeMap<NodeId, Report>,
    /// Highest flushed LSN any node reported in the current epoch.
    known_lsn: Lsn,
    /// A proposed promotion: (new epoch, proposed at).
    inflight: Option<(Epoch, u64)>,
    /// A proposed BeginSwitchover or EndSwitchover: (epoch, proposed at).
    switchover_inflight: Option<(Epoch, u64)>,
    status: Status,
    actions: VecDeque<Action>,
}

impl Controller {
    /// A controller that is not leader and knows nothing yet.
    #[must_use]
    pub fn new(config: ControllerConfig) -> Self {
        Controller {
            config,
            is_leader: false,
            term: 0,
            leader_since_ms: 0,
            state: None,
            reports: BTreeMap::new(),
            known_lsn: Lsn::ZERO,
            inflight: None,
            switchover_inflight: None,
            status: Status::NotLeader,
            actions: VecDeque::new(),
            me: None,
        }
    }

    /// The node this controller runs on (it prefers others as primary).
    #[must_use]
    pub fn with_me(mut self, me: NodeId) -> Self {
        self.me = Some(me);
        self
    }

    /// The current status.
    #[must_use]
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// The last report of every node.
    #[must_use]
    pub fn reports(&self) -> &BTreeMap<NodeId, Report> {
        &self.reports
    }

    /// The next thing to do, if any. Always `None` when not leader.
    pub fn poll_action(&mut self) -> Option<Action> {
        if !self.is_leader {
            self.actions.clear();
            return None;
        }
        self.actions.pop_front()
    }

    /// Raft leadership changed (or was confirmed) at `now_ms`.
    ///
    /// `is_leader` may be true only once the leader has applied an entry of
    /// its own `term` (openraft commits a blank one on election): only then
    /// does its state hold every lease renewal an earlier leader committed,
    /// so a lease it sees as lapsed has lapsed.
    pub fn handle_leadership(&mut self, is_leader: bool, term: u64, now_ms: u64) {
        if is_leader && (!self.is_leader || term != self.term) {
            self.leader_since_ms = now_ms;
            self.inflight = None;
            self.switchover_inflight = None;
        }
        if !is_leader {
            self.actions.clear();
            self.inflight = None;
            self.switchover_inflight = None;
            self.status = Status::NotLeader;
        }
        self.is_leader = is_leader;
        self.term = term;
    }

    /// The applied cluster state changed.
    pub fn handle_state(&mut self, state: &ClusterState) {
        let new_epoch = self.state.as_ref().is_none_or(|s| s.epoch != state.epoch);
        if new_epoch {
            self.known_lsn = Lsn::ZERO;
        }
        if let Some((epoch, _)) = self.inflight
            && state.epoch >= epoch
        {
            self.inflight = None;
        }
        let switchover_changed = self
            .state
            .as_ref()
            .is_none_or(|s| s.switchover.is_some() != state.switchover.is_some());
        if switchover_changed {
            self.switchover_inflight = None;
        }
        self.state = Some(state.clone());
    }

    /// A data node reported its position (or the driver found it unreachable).
    pub fn handle_report(&mut self, report: Report) {
        if let Some(s) = &self.state
            && report.epoch == s.epoch
        {
            self.known_lsn = self.known_lsn.max(report.flushed_lsn);
        }
        self.reports.insert(report.node.clone(), report);
    }

    /// Starts a planned switchover to `target`, or to the best candidate.
    /// Returns the chosen target.
    pub fn handle_switchover(
        &mut self,
        target: Option<NodeId>,
        now_ms: u64,
    ) -> Result<NodeId, SwitchoverError> {
        if !self.is_leader {
            return Err(SwitchoverError::NotLeader);
        }
        let state = self.state.as_ref().ok_or(SwitchoverError::NoPrimary)?;
        let proposed_recently = self
            .switchover_inflight
            .is_some_and(|(_, at)| now_ms < at.saturating_add(self.config.retry_after_ms));
        if state.switchover.is_some() || proposed_recently {
            return Err(SwitchoverError::InProgress);
        }
        let primary = state.primary.clone().ok_or(SwitchoverError::NoPrimary)?;
        if state.valid_lease(now_ms).is_none() {
            return Err(SwitchoverError::NoPrimary);
        }
        let me = self.me.clone();
        let target = match target {
            Some(t) => {
                let bad = |reason| SwitchoverError::BadTarget {
                    node: t.clone(),
                    reason,
                };
                let m = state.members.get(&t).ok_or_else(|| bad("not a member"))?;
                if m.role == Role::Witness {
                    return Err(bad("it is a witness"));
                }
                if t == primary {
                    return Err(bad("it is already primary"));
                }
                if m.nofailover {
                    return Err(bad("it is marked nofailover"));
                }
                if !self.is_fresh(&t, now_ms) {
                    return Err(SwitchoverError::TargetUnreachable { node: t });
                }
                t
            }
            None => self
                .eligible(state, Some(&primary), now_ms)
                .into_iter()
                .max_by(|a, b| rank(a, me.as_ref(), state).cmp(&rank(b, me.as_ref(), state)))
                .map(|r| r.node.clone())
                .ok_or(SwitchoverError::NoCandidate)?,
        };
        let epoch = state.epoch;
        self.actions
            .push_back(Action::Propose(ClusterCommand::BeginSwitchover {
                to: target.clone(),
                epoch,
                now_ms,
                timeout_ms: self.config.switchover_timeout_ms,
            }));
        self.switchover_inflight = Some((epoch, now_ms));
        self.set_status(Status::Switchover {
            target: target.clone(),
            phase: SwitchoverPhase::Fencing,
        });
        Ok(target)
    }

    /// Time passed: re-evaluate.
    pub fn handle_tick(&mut self, now_ms: u64) {
        if !self.is_leader {
            return;
        }
        let Some(state) = self.state.clone() else {
            return;
        };
        // A primary this leader could not reach itself is not going to renew:
        // only gather reports. One that answers gets the whole settle.
        let primary_gone = state.primary.as_ref().is_none_or(|p| {
            self.reports
                .get(p)
                .is_some_and(|r| !r.reachable && r.at_ms >= self.leader_since_ms)
        });
        let wait_ms = if primary_gone {
            self.config.gather_ms
        } else {
            self.config.settle_ms
        };
        let until_ms = self.leader_since_ms.saturating_add(wait_ms);
        if now_ms < until_ms {
            self.set_status(Status::WaitingForLease { until_ms });
            return;
        }
        // The lease counts as valid until `failover_margin_ms` past its expiry.
        let lease_ok = state
            .valid_lease(now_ms.saturating_sub(self.config.failover_margin_ms))
            .is_some();
        if state.switchover.is_some() && lease_ok {
            self.drive_switchover(&state, now_ms);
            return;
        }
        // (A switchover whose primary died: its lease lapses, fail over.)
        if let Some((epoch, at_ms)) = self.inflight {
            if now_ms < at_ms.saturating_add(self.config.retry_after_ms) {
                return;
            }
            tracing::warn!(%epoch, "promotion not applied in time; re-evaluating");
            self.inflight = None;
        }
        if let (Some(primary), true) = (&state.primary, lease_ok) {
            self.set_status(Status::Healthy {
                primary: primary.clone(),
                epoch: state.epoch,
            });
            return;
        }
        // No primary, or its lease lapsed more than the margin ago.
        match self.choose(&state, now_ms) {
            Ok(report) => {
                let epoch = Epoch(state.epoch.0.saturating_add(1));
                let node = report.node.clone();
                let first_lsn = report.flushed_lsn.next();
                tracing::info!(%node, %epoch, %first_lsn, "proposing promotion");
                self.actions
                    .push_back(Action::Propose(ClusterCommand::Promote {
                        node: node.clone(),
                        epoch,
                        first_lsn,
                        now_ms,
                        lease_ttl_ms: self.config.lease_ttl_ms,
                    }));
                self.inflight = Some((epoch, now_ms));
                self.set_status(Status::Promoting { node, epoch });
            }
            Err(reason) => self.set_status(Status::ReadOnly(reason)),
        }
    }

    fn drive_switchover(&mut self, state: &ClusterState, now_ms: u64) {
        let Some(sw) = state.switchover.clone() else {
            return;
        };
        let waiting = |at: u64| now_ms < at.saturating_add(self.config.retry_after_ms);
        if now_ms > sw.deadline_ms {
            if !self.switchover_inflight.is_some_and(|(_, at)| waiting(at)) {
                self.actions
                    .push_back(Action::Propose(ClusterCommand::EndSwitchover {
                        epoch: sw.epoch,
                    }));
                self.switchover_inflight = Some((sw.epoch, now_ms));
            }
            self.set_status(Status::SwitchoverAborted {
                target: sw.to,
                reason: format!("not done by its deadline {} ms", sw.deadline_ms),
            });
            return;
        }
        let Some(last_lsn) = sw.last_lsn else {
            self.set_status(Status::Switchover {
                target: sw.to,
                phase: SwitchoverPhase::Fencing,
            });
            return;
        };
        let caught_up = self.is_fresh(&sw.to, now_ms)
            && self
                .reports
                .get(&sw.to)
                .is_some_and(|r| r.flushed_lsn >= last_lsn);
        if !caught_up {
            self.set_status(Status::Switchover {
                target: sw.to,
                phase: SwitchoverPhase::CatchingUp { last_lsn },
            });
            return;
        }
        if self.inflight.is_some_and(|(_, at)| waiting(at)) {
            return;
        }
        let epoch = Epoch(sw.epoch.0.saturating_add(1));
        self.actions
            .push_back(Action::Propose(ClusterCommand::Promote {
                node: sw.to.clone(),
                epoch,
                first_lsn: last_lsn.next(),
                now_ms,
                lease_ttl_ms: self.config.lease_ttl_ms,
            }));
        self.inflight = Some((epoch, now_ms));
        self.set_status(Status::Switchover {
            target: sw.to,
            phase: SwitchoverPhase::Promoting,
        });
    }

    fn is_fresh(&self, node: &NodeId, now_ms: u64) -> bool {
        self.reports.get(node).is_some_and(|r| {
            r.reachable && now_ms.saturating_sub(r.at_ms) <= self.config.report_max_age_ms
        })
    }

    /// Reachable data nodes allowed to fail over, except `exclude`.
    fn eligible(
        &self,
        state: &ClusterState,
        exclude: Option<&NodeId>,
        now_ms: u64,
    ) -> Vec<&Report> {
        let epoch_start = state.epoch_history.last().map_or(Lsn::ZERO, |&(_, l)| l);
        state
            .members
            .iter()
            .filter(|(n, m)| m.role == Role::Data && !m.nofailover && Some(*n) != exclude)
            .filter(|(n, _)| self.is_fresh(n, now_ms))
            .filter_map(|(n, _)| self.reports.get(n))
            // A fresh cluster's nodes start their journals at epoch 1.
            .filter(|r| {
                (r.epoch <= state.epoch || state.epoch_history.is_empty())
                    && r.flushed_lsn.next() >= epoch_start
            })
            .collect()
    }

    fn choose(&self, state: &ClusterState, now_ms: u64) -> Result<Report, ReadOnlyReason> {
        let lapsed = state.primary.as_ref();
        let me = self.me.clone();
        let eligible = self.eligible(state, lapsed, now_ms);
        let max_lag = match state.commit_policy.mode {
            // No primary ever: nothing was acknowledged, any node will do.
            _ if state.epoch_history.is_empty() => Some(u64::MAX),
            CommitMode::Async {
                max_lag_on_failover,
            } => Some(max_lag_on_failover),
            CommitMode::Quorum { .. } | CommitMode::RemoteApply { .. } => {
                if state.degraded.is_some() {
                    Some(DEFAULT_MAX_LAG_ON_FAILOVER)
                } else {
                    None
                }
            }
        };
        let best = match max_lag {
            None => eligible
                .into_iter()
                .filter(|r| state.sync_set.contains(&r.node))
                .max_by(|a, b| rank(a, me.as_ref(), state).cmp(&rank(b, me.as_ref(), state)))
                .ok_or(ReadOnlyReason::NoSyncCandidate)?,
            Some(max_lag) => {
                let best = eligible
                    .into_iter()
                    .max_by(|a, b| rank(a, me.as_ref(), state).cmp(&rank(b, me.as_ref(), state)))
                    .ok_or(ReadOnlyReason::NoCandidate)?;
                let known = if best.epoch == state.epoch {
                    self.known_lsn
                } else {
                    // The best node is still in an older epoch: measure the
                    // lag to what the current epoch's primary was known at.
                    self.known_lsn.max(
                        state
                            .epoch_history
                            .last()
                            .map_or(Lsn::ZERO, |&(_, l)| Lsn(l.0.saturating_sub(1))),
                    )
                };
                let best_lag = known.0.saturating_sub(best.flushed_lsn.0);
                if best_lag > max_lag {
                    return Err(ReadOnlyReason::LagTooLarge { max_lag, best_lag });
                }
                best
            }
        };
        Ok(best.clone())
    }

    fn set_status(&mut self, status: Status) {
        if self.status != status {
            tracing::info!(%status, "failover controller");
            self.status = status.clone();
            self.actions.push_back(Action::Status(status));
        }
    }
}

/// Candidate order: highest (epoch, flushed_lsn), then the lowest name.
/// How a candidate ranks: highest `(epoch, flushed_lsn)`; among equals a
/// node other than `leader` (this controller's own node) once the cluster
/// has had a primary, so that the Raft leader and the primary tend to be
/// different nodes: a primary's death then costs no Raft election (openraft
/// 0.9's followers wait a leader lease and an election timeout first,
/// which made such failovers about a second slower); then the lowest name.
fn rank<'a>(
    r: &'a Report,
    leader: Option<&NodeId>,
    state: &ClusterState,
) -> (Epoch, Lsn, bool, std::cmp::Reverse<&'a NodeId>) {
    let spread = !state.epoch_history.is_empty() && leader.is_some_and(|l| *l != r.node);
    (r.epoch, r.flushed_lsn, spread, std::cmp::Reverse(&r.node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{CommitPolicy, Member, OnUnavailable};

    const TTL: u64 = 1000;
    const MARGIN: u64 = 250;
    const SETTLE: u64 = 300;

    fn n(s: &str) -> NodeId {
        NodeId::from(s)
    }

    fn config() -> ControllerConfig {
        ControllerConfig {
            lease_ttl_ms: TTL,
            settle_ms: TTL,
            gather_ms: SETTLE,
            failover_margin_ms: MARGIN,
            report_max_age_ms: 1000,
            retry_after_ms: 1000,
            switchover_timeout_ms: 5000,
        }
    }

    /// n1 primary of epoch 1 (lease until 1000 + 1000), n2, n3 data, w witness.
    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (name, role) in [
            ("n1", Role::Data),
            ("n2", Role::Data),
            ("n3", Role::Data),
            ("w", Role::Witness),
        ] {
            s.apply(&ClusterCommand::AddMember {
                node: n(name),
                member: Member {
                    role,
                    raft_addr: format!("{name}:7000"),
                    http_addr: format!("{name}:7070"),
                    nofailover: false,
                },
            })
            .unwrap();
        }
        s.apply(&ClusterCommand::Promote {
            node: n("n1"),
            epoch: Epoch(1),
            first_lsn: Lsn(1),
            now_ms: 1000,
            lease_ttl_ms: TTL,
        })
        .unwrap();
        s
    }

    fn report(node: &str, epoch: u64, flushed: u64, at_ms: u64) -> Report {
        Report {
            node: n(node),
            epoch: Epoch(epoch),
            flushed_lsn: Lsn(flushed),
            applied_lsn: Lsn(flushed),
            reachable: true,
            at_ms,
        }
    }

    /// A controller that has led since t=0 and knows `state`.
    fn leader(state: &ClusterState) -> Controller {
        let mut c = Controller::new(config());
        c.handle_leadership(true, 1, 0);
        c.handle_state(state);
        c
    }

    fn drain(c: &mut Controller) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn proposals(c: &mut Controller) -> Vec<ClusterCommand> {
        drain(c)
            .into_iter()
            .filter_map(|a| match a {
                Action::Propose(cmd) => Some(cmd),
                _ => None,
            })
            .collect()
    }

    fn promoted(cmds: &[ClusterCommand]) -> Option<(NodeId, Epoch, Lsn)> {
        cmds.iter().find_map(|c| match c {
            ClusterCommand::Promote {
                node,
                epoch,
                first_lsn,
                ..
            } => Some((node.clone(), *epoch, *first_lsn)),
            _ => None,
        })
    }

    /// Expiry of n1's lease is 2000; promotion allowed after 2000 + MARGIN.
    const AFTER_LAPSE: u64 = 2000 + MARGIN + 1;

    #[test]
    fn no_action_while_lease_is_valid() {
        let s = state();
        let mut c = leader(&s);
        c.handle_report(report("n2", 1, 10, 1900));
        for now in [1500, 1999, 2000, 2000 + MARGIN - 1] {
            c.handle_tick(now);
            assert!(proposals(&mut c).is_empty(), "at {now}");
        }
        assert_eq!(
            c.status(),
            &Status::Healthy {
                primary: n("n1"),
                epoch: Epoch(1)
            }
        );
    }

    #[test]
    fn lease_expiry_promotes_best_candidate() {
        let s = state();
        let mut c = leader(&s);
        c.handle_report(report("n1", 1, 50, 1900));
        c.handle_report(report("n2", 1, 48, 2200));
        c.handle_report(report("n3", 1, 49, 2200));
        c.handle_tick(AFTER_LAPSE);
        let cmds = proposals(&mut c);
        assert_eq!(promoted(&cmds), Some((n("n3"), Epoch(2), Lsn(50))));
        assert_eq!(
            c.status(),
            &Status::Promoting {
                node: n("n3"),
                epoch: Epoch(2)
            }
        );
        // The promotion commits with a state the replicas accept.
        let mut applied = s.clone();
        applied.apply(&cmds[0]).unwrap();
        applied.check_invariants().unwrap();
    }

    #[test]
    fn candidate_order_is_epoch_then_flushed_lsn_then_name() {
        let mut s = state();
        // Epoch 2 started at lsn 40 with n1 again.
        s.apply(&ClusterCommand::Promote {
            node: n("n1"),
            epoch: Epoch(2),
            first_lsn: Lsn(40),
            now_ms: 3000,
            lease_ttl_ms: TTL,
        })
        .unwrap();
        let mut c = leader(&s);
        // n2 has more entries but of the old epoch (a divergent tail); n3 is
        // in the current epoch.
        c.handle_report(report("n2", 1, 45, 4000));
        c.handle_report(report("n3", 2, 41, 4000));
        c.handle_tick(4000 + MARGIN + 1);
        assert_eq!(
            promoted(&proposals(&mut c)),
            Some((n("n3"), Epoch(3), Lsn(42)))
        );

        // Equal positions: the lowest name wins, deterministically.
        let mut c = leader(&state());
        c.handle_report(report("n3", 1, 7, 2200));
        c.handle_report(report("n2", 1, 7, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n2"));

        // Equal positions, the leader runs on n2: the other node is chosen,
        // so that the next primary's death costs no Raft election.
        let mut c = Controller::new(config()).with_me(n("n2"));
        c.handle_leadership(true, 1, 0);
        c.handle_state(&state());
        c.handle_report(report("n3", 1, 7, 2200));
        c.handle_report(report("n2", 1, 7, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n3"));
        // …but never at the price of entries.
        let mut c = Controller::new(config()).with_me(n("n2"));
        c.handle_leadership(true, 1, 0);
        c.handle_state(&state());
        c.handle_report(report("n3", 1, 6, 2200));
        c.handle_report(report("n2", 1, 7, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n2"));
    }

    #[test]
    fn nofailover_node_is_skipped() {
        let mut s = state();
        s.apply(&ClusterCommand::SetNoFailover {
            node: n("n3"),
            nofailover: true,
        })
        .unwrap();
        let mut c = leader(&s);
        c.handle_report(report("n2", 1, 40, 2200));
        c.handle_report(report("n3", 1, 50, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n2"));
    }

    #[test]
    fn unreachable_and_stale_reports_are_skipped() {
        let mut c = leader(&state());
        c.handle_report(Report {
            reachable: false,
            ..report("n3", 1, 50, 2200)
        });
        c.handle_report(report("n2", 1, 49, 500)); // too old at AFTER_LAPSE
        c.handle_tick(AFTER_LAPSE);
        assert!(proposals(&mut c).is_empty());
        assert_eq!(c.status(), &Status::ReadOnly(ReadOnlyReason::NoCandidate));
        c.handle_report(report("n2", 1, 49, AFTER_LAPSE));
        c.handle_tick(AFTER_LAPSE + 1);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n2"));
    }

    #[test]
    fn async_mode_respects_max_lag_on_failover() {
        let mut s = state();
        s.apply(&ClusterCommand::SetCommitPolicy {
            policy: CommitPolicy::parse("async:10", "strict").unwrap(),
        })
        .unwrap();
        let mut c = leader(&s);
        c.handle_report(report("n1", 1, 100, 1900)); // last known primary position
        c.handle_report(report("n2", 1, 85, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert!(proposals(&mut c).is_empty());
        assert_eq!(
            c.status(),
            &Status::ReadOnly(ReadOnlyReason::LagTooLarge {
                max_lag: 10,
                best_lag: 15
            })
        );
        // n2 catches up to within the limit (it keeps replaying what it got).
        c.handle_report(report("n2", 1, 90, AFTER_LAPSE));
        c.handle_tick(AFTER_LAPSE + 1);
        assert_eq!(
            promoted(&proposals(&mut c)),
            Some((n("n2"), Epoch(2), Lsn(91)))
        );
    }

    fn quorum_state() -> ClusterState {
        let mut s = state();
        s.apply(&ClusterCommand::SetCommitPolicy {
            policy: CommitPolicy::parse("quorum:1", "strict").unwrap(),
        })
        .unwrap();
        s.apply(&ClusterCommand::SetSyncSet {
            epoch: Epoch(1),
            nodes: [n("n2")].into(),
        })
        .unwrap();
        s
    }

    #[test]
    fn quorum_mode_promotes_only_from_sync_set() {
        let mut c = leader(&quorum_state());
        // n3 is further ahead but not known to hold every acknowledged write.
        c.handle_report(report("n2", 1, 40, 2200));
        c.handle_report(report("n3", 1, 60, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n2"));
    }

    #[test]
    fn quorum_mode_stays_read_only_without_reachable_sync_member() {
        let mut c = leader(&quorum_state());
        c.handle_report(Report {
            reachable: false,
            ..report("n2", 1, 40, 2200)
        });
        c.handle_report(report("n3", 1, 60, 2200));
        c.handle_tick(AFTER_LAPSE);
        let actions = drain(&mut c);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Propose(_))),
            "{actions:?}"
        );
        assert_eq!(
            c.status().to_string(),
            "read-only: no reachable node holds every acknowledged write"
        );
        assert!(actions.contains(&Action::Status(Status::ReadOnly(
            ReadOnlyReason::NoSyncCandidate
        ))));
    }

    #[test]
    fn the_first_primary_of_a_quorum_cluster_needs_no_sync_set() {
        let mut s = ClusterState::default();
        for name in ["n1", "n2", "n3"] {
            s.apply(&ClusterCommand::AddMember {
                node: n(name),
                member: Member {
                    role: Role::Data,
                    raft_addr: format!("{name}:7000"),
                    http_addr: format!("{name}:7070"),
                    nofailover: false,
                },
            })
            .unwrap();
        }
        s.apply(&ClusterCommand::SetCommitPolicy {
            policy: CommitPolicy::parse("quorum:1", "strict").unwrap(),
        })
        .unwrap();
        let mut c = leader(&s);
        // Fresh journals are at epoch 1 while the cluster's is 0.
        for name in ["n1", "n2", "n3"] {
            c.handle_report(report(name, 1, 0, 2200));
        }
        c.handle_tick(AFTER_LAPSE);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n1"));
    }

    #[test]
    fn degraded_quorum_mode_falls_back_to_async_choice() {
        let mut s = quorum_state();
        s.apply(&ClusterCommand::MarkDegraded {
            epoch: Epoch(1),
            from_lsn: Lsn(30),
            now_ms: 1500,
        })
        .unwrap();
        s.policy_on_unavailable_is(OnUnavailable::Degrade);
        let mut c = leader(&s);
        c.handle_report(Report {
            reachable: false,
            ..report("n2", 1, 40, 2200)
        });
        c.handle_report(report("n3", 1, 60, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n3"));
    }

    impl ClusterState {
        fn policy_on_unavailable_is(&mut self, on: OnUnavailable) {
            let mut policy = self.commit_policy;
            policy.on_unavailable = on;
            self.apply(&ClusterCommand::SetCommitPolicy { policy })
                .unwrap();
        }
    }

    #[test]
    fn new_leader_gathers_reports_before_it_promotes() {
        let s = state();
        let mut c = Controller::new(config());
        c.handle_state(&s);
        c.handle_report(report("n2", 1, 10, 5000));
        // Elected long after the lease lapsed, and the primary does not
        // answer: it only hears from every reachable node first, so that it
        // does not promote the first to answer.
        c.handle_leadership(true, 7, 5000);
        c.handle_report(Report {
            reachable: false,
            ..report("n1", 1, 10, 5000)
        });
        c.handle_tick(5000);
        c.handle_tick(5000 + SETTLE - 1);
        assert!(proposals(&mut c).is_empty());
        assert_eq!(
            c.status(),
            &Status::WaitingForLease {
                until_ms: 5000 + SETTLE
            }
        );
        c.handle_report(report("n2", 1, 10, 5000 + SETTLE));
        c.handle_tick(5000 + SETTLE);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n2"));
    }

    #[test]
    fn new_leader_gives_a_primary_that_answers_a_lease_to_renew() {
        let s = state();
        let mut c = Controller::new(config());
        c.handle_state(&s);
        // The lapsed primary answered the new leader (or was not asked
        // yet): its renewals may only have failed during the election.
        c.handle_leadership(true, 7, 5000);
        c.handle_report(report("n1", 1, 10, 5000));
        c.handle_report(report("n2", 1, 10, 5000));
        c.handle_tick(5000 + SETTLE);
        c.handle_tick(5000 + TTL - 1);
        assert!(proposals(&mut c).is_empty());
        assert_eq!(
            c.status(),
            &Status::WaitingForLease {
                until_ms: 5000 + TTL
            }
        );
        c.handle_report(report("n2", 1, 10, 5000 + TTL));
        c.handle_tick(5000 + TTL);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n2"));
    }

    #[test]
    fn non_leader_emits_nothing_and_loses_queued_actions() {
        let s = state();
        let mut c = Controller::new(config());
        c.handle_state(&s);
        c.handle_report(report("n2", 1, 10, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert!(c.poll_action().is_none());

        let mut c = leader(&s);
        c.handle_report(report("n2", 1, 10, 2200));
        c.handle_tick(AFTER_LAPSE);
        c.handle_leadership(false, 2, AFTER_LAPSE);
        assert!(c.poll_action().is_none());
        assert_eq!(c.status(), &Status::NotLeader);
        assert_eq!(
            c.handle_switchover(None, AFTER_LAPSE),
            Err(SwitchoverError::NotLeader)
        );
    }

    #[test]
    fn witness_is_never_promoted() {
        // The controller may run on the witness (it can be Raft leader); it
        // promotes a data node, never a witness however far ahead it claims.
        let mut c = leader(&state());
        c.handle_report(report("w", 1, 1000, 2200));
        c.handle_report(report("n2", 1, 5, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n2"));
    }

    #[test]
    fn lapsed_primary_is_not_its_own_successor() {
        let mut c = leader(&state());
        c.handle_report(report("n1", 1, 100, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert!(proposals(&mut c).is_empty());
        assert_eq!(c.status(), &Status::ReadOnly(ReadOnlyReason::NoCandidate));
    }

    #[test]
    fn first_promotion_of_a_new_cluster() {
        let mut s = state();
        s = ClusterState {
            primary: None,
            lease: None,
            epoch: Epoch(0),
            epoch_history: vec![],
            last_failover: None,
            ..s
        };
        let mut c = leader(&s);
        for node in ["n1", "n2", "n3"] {
            c.handle_report(report(node, 0, 0, TTL));
        }
        c.handle_tick(TTL);
        assert_eq!(
            promoted(&proposals(&mut c)),
            Some((n("n1"), Epoch(1), Lsn(1)))
        );
    }

    #[test]
    fn inflight_promotion_is_not_reproposed_until_retry() {
        let s = state();
        let mut c = leader(&s);
        c.handle_report(report("n2", 1, 10, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert_eq!(proposals(&mut c).len(), 1);
        c.handle_tick(AFTER_LAPSE + 500);
        assert!(proposals(&mut c).is_empty());
        // Not applied within retry_after_ms (e.g. the write was lost).
        c.handle_report(report("n2", 1, 10, AFTER_LAPSE + 900));
        c.handle_tick(AFTER_LAPSE + 1000);
        assert_eq!(proposals(&mut c).len(), 1);
        // Applied: back to healthy with the new primary.
        let mut s2 = s.clone();
        s2.apply(&ClusterCommand::Promote {
            node: n("n2"),
            epoch: Epoch(2),
            first_lsn: Lsn(11),
            now_ms: AFTER_LAPSE + 1000,
            lease_ttl_ms: TTL,
        })
        .unwrap();
        c.handle_state(&s2);
        c.handle_tick(AFTER_LAPSE + 1100);
        assert!(proposals(&mut c).is_empty());
        assert_eq!(
            c.status(),
            &Status::Healthy {
                primary: n("n2"),
                epoch: Epoch(2)
            }
        );
    }

    /// Applies `cmds` to `s` and feeds the result to `c`.
    fn commit(c: &mut Controller, s: &mut ClusterState, cmds: &[ClusterCommand]) {
        for cmd in cmds {
            s.apply(cmd).unwrap();
        }
        c.handle_state(s);
    }

    fn fenced(last_lsn: u64) -> ClusterCommand {
        ClusterCommand::SwitchoverFenced {
            node: n("n1"),
            epoch: Epoch(1),
            last_lsn: Lsn(last_lsn),
        }
    }

    #[test]
    fn switchover_records_intent_waits_for_catch_up_then_hands_over() {
        let mut s = state();
        let mut c = leader(&s);
        c.handle_report(report("n2", 1, 90, 1500));
        c.handle_report(report("n3", 1, 95, 1500));
        assert_eq!(c.handle_switchover(None, 1500), Ok(n("n3")));
        assert_eq!(
            c.handle_switchover(None, 1500),
            Err(SwitchoverError::InProgress)
        );
        let cmds = proposals(&mut c);
        assert_eq!(
            cmds,
            vec![ClusterCommand::BeginSwitchover {
                to: n("n3"),
                epoch: Epoch(1),
                now_ms: 1500,
                timeout_ms: 5000
            }]
        );
        commit(&mut c, &mut s, &cmds);
        c.handle_tick(1550);
        assert_eq!(
            c.status(),
            &Status::Switchover {
                target: n("n3"),
                phase: SwitchoverPhase::Fencing
            }
        );
        // The primary's driver holds writes and records its last LSN.
        commit(&mut c, &mut s, &[fenced(100)]);
        c.handle_tick(1600);
        assert!(proposals(&mut c).is_empty(), "target not caught up yet");
        c.handle_report(report("n3", 1, 100, 1650));
        c.handle_tick(1700);
        let cmds = proposals(&mut c);
        assert_eq!(promoted(&cmds), Some((n("n3"), Epoch(2), Lsn(101))));
        // The lease is still valid: the handover needs no wait.
        commit(&mut c, &mut s, &cmds);
        s.check_invariants().unwrap();
        assert_eq!(s.primary, Some(n("n3")));
        assert!(s.switchover.is_none());
    }

    #[test]
    fn switchover_target_checks() {
        let s = state();
        let mut c = leader(&s);
        c.handle_report(report("n2", 1, 90, 1500));
        for (target, reason) in [("w", "it is a witness"), ("n1", "it is already primary")] {
            let e = c.handle_switchover(Some(n(target)), 1500).unwrap_err();
            assert_eq!(
                e,
                SwitchoverError::BadTarget {
                    node: n(target),
                    reason
                }
            );
            assert!(!e.is_transient(), "{e}");
        }
        // No report from n3: refused for now, and a client may retry.
        let e = c.handle_switchover(Some(n("n3")), 1500).unwrap_err();
        assert_eq!(e, SwitchoverError::TargetUnreachable { node: n("n3") });
        assert!(e.is_transient());
        assert_eq!(c.handle_switchover(Some(n("n2")), 1500), Ok(n("n2")));
    }

    #[test]
    fn switchover_past_its_deadline_is_ended() {
        let mut s = state();
        let mut c = leader(&s);
        c.handle_report(report("n2", 1, 90, 1500));
        c.handle_switchover(Some(n("n2")), 1500).unwrap();
        let cmds = proposals(&mut c);
        commit(&mut c, &mut s, &cmds);
        commit(&mut c, &mut s, &[fenced(100)]);
        // The primary keeps renewing its lease while it holds writes.
        commit(
            &mut c,
            &mut s,
            &[ClusterCommand::RenewLease {
                node: n("n1"),
                epoch: Epoch(1),
                now_ms: 6000,
                lease_ttl_ms: TTL,
            }],
        );
        c.handle_report(report("n2", 1, 95, 6400));
        c.handle_tick(1500 + 5001);
        assert_eq!(
            proposals(&mut c),
            vec![ClusterCommand::EndSwitchover { epoch: Epoch(1) }]
        );
        assert!(matches!(c.status(), Status::SwitchoverAborted { .. }));
        // Not proposed twice while the first is on its way.
        c.handle_tick(1500 + 5100);
        assert!(proposals(&mut c).is_empty());
    }

    #[test]
    fn switchover_survives_a_change_of_leader() {
        let mut s = state();
        let mut c = leader(&s);
        c.handle_report(report("n2", 1, 90, 1500));
        c.handle_switchover(Some(n("n2")), 1500).unwrap();
        let cmds = proposals(&mut c);
        commit(&mut c, &mut s, &cmds);
        commit(&mut c, &mut s, &[fenced(100)]);
        // A new leader knows the switchover from the applied state alone,
        // and finishes it after its lease wait.
        let mut next = Controller::new(config());
        next.handle_state(&s);
        next.handle_leadership(true, 2, 1700);
        commit(
            &mut next,
            &mut s,
            &[ClusterCommand::RenewLease {
                node: n("n1"),
                epoch: Epoch(1),
                now_ms: 2600,
                lease_ttl_ms: TTL,
            }],
        );
        next.handle_report(report("n2", 1, 100, 2700));
        next.handle_tick(2700);
        assert_eq!(
            promoted(&proposals(&mut next)),
            Some((n("n2"), Epoch(2), Lsn(101)))
        );
    }

    #[test]
    fn primary_death_during_switchover_turns_into_failover() {
        let mut s = state();
        let mut c = leader(&s);
        c.handle_report(report("n2", 1, 90, 1500));
        c.handle_switchover(Some(n("n2")), 1500).unwrap();
        let cmds = proposals(&mut c);
        commit(&mut c, &mut s, &cmds);
        // No fence record, no renewal: the lease lapses.
        c.handle_report(report("n2", 1, 90, 2200));
        c.handle_tick(AFTER_LAPSE);
        assert_eq!(promoted(&proposals(&mut c)).unwrap().0, n("n2"));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Ev {
            Tick(u64),
            Report(usize, u64, u64, bool),
            Leadership(bool),
            Renew,
            Apply(bool),
        }

        const NODES: [&str; 4] = ["n1", "n2", "n3", "w"];

        fn ev() -> impl Strategy<Value = Ev> {
            prop_oneof![
                3 => (0u64..600).prop_map(Ev::Tick),
                4 => (0usize..4, 0u64..3, 0u64..60, proptest::bool::weighted(0.8))
                    .prop_map(|(i, e, l, r)| Ev::Report(i, e, l, r)),
                1 => proptest::bool::weighted(0.7).prop_map(Ev::Leadership),
                1 => Just(Ev::Renew),
                2 => any::<bool>().prop_map(Ev::Apply),
            ]
        }

        proptest! {
            /// Whatever happens, a promotion the controller proposes is one
            /// the rules allow and the state machine accepts.
            #[test]
            fn proposed_promotions_are_always_allowed(
                quorum in any::<bool>(),
                n3_nofailover in any::<bool>(),
                events in proptest::collection::vec(ev(), 0..120),
            ) {
                let mut s = state();
                if quorum {
                    s.apply(&ClusterCommand::SetCommitPolicy {
                        policy: CommitPolicy::parse("quorum:1", "strict").unwrap(),
                    }).unwrap();
                    s.apply(&ClusterCommand::SetSyncSet {
                        epoch: Epoch(1),
                        nodes: [n("n2")].into(),
                    }).unwrap();
                } else {
                    s.apply(&ClusterCommand::SetCommitPolicy {
                        policy: CommitPolicy::parse("async:10", "strict").unwrap(),
                    }).unwrap();
                }
                s.apply(&ClusterCommand::SetNoFailover { node: n("n3"), nofailover: n3_nofailover }).unwrap();
                let mut c = Controller::new(config());
                c.handle_state(&s);
                let mut now = 1000u64;
                let mut leader_since: Option<u64> = Some(now);
                let mut term = 1;
                c.handle_leadership(true, term, now);
                let mut pending: Vec<ClusterCommand> = Vec::new();
                for e in events {
                    match e {
                        Ev::Tick(d) => {
                            now += d;
                            c.handle_tick(now);
                        }
                        Ev::Report(i, epoch, lsn, reachable) => c.handle_report(Report {
                            reachable,
                            ..report(NODES[i], epoch, lsn, now)
                        }),
                        Ev::Leadership(l) => {
                            if l != leader_since.is_some() {
                                term += 1;
                                leader_since = l.then_some(now);
                            }
                            c.handle_leadership(l, term, now);
                        }
                        Ev::Renew => {
                            if let Some(p) = s.primary.clone() {
                                let _ = s.apply(&ClusterCommand::RenewLease {
                                    node: p, epoch: s.epoch, now_ms: now, lease_ttl_ms: TTL,
                                });
                                c.handle_state(&s);
                            }
                        }
                        Ev::Apply(apply) => {
                            for cmd in pending.drain(..) {
                                // May be rejected now: the state moved on since
                                // (e.g. the primary renewed in between).
                                if apply {
                                    let _ = s.apply(&cmd);
                                }
                            }
                            c.handle_state(&s);
                        }
                    }
                    while let Some(a) = c.poll_action() {
                        let since = leader_since.expect("only a leader emits");
                        if let Action::Propose(cmd @ ClusterCommand::Promote { .. }) = &a {
                            let ClusterCommand::Promote { node, .. } = cmd else { unreachable!() };
                            prop_assert!(now >= since + SETTLE, "promoted {}ms after election", now - since);
                            let m = &s.members[node];
                            prop_assert_eq!(m.role, Role::Data);
                            prop_assert!(!m.nofailover);
                            prop_assert!(s.primary.as_ref() != Some(node));
                            prop_assert!(s.valid_lease(now - MARGIN).is_none(), "lease still valid at {}", now);
                            if quorum && s.degraded.is_none() && s.epoch == Epoch(1) {
                                prop_assert!(s.sync_set.contains(node));
                            }
                            let r = &c.reports()[node];
                            prop_assert!(r.reachable && now - r.at_ms <= 1000);
                            prop_assert!(s.clone().apply(cmd).is_ok(), "state machine rejects {:?}", cmd);
                            pending.push(cmd.clone());
                        }
                    }
                }
            }
        }
    }
}
