//! The async driver: wires the [`Controller`], openraft and the node's
//! [`RoleControl`] together. One driver runs on every node.
//!
//! ```text
//!            ┌──────────── every tick (≤ heartbeat_ms) ────────────┐
//!  agent:    applied state ─► become_primary / become_mirror / fence
//!  (data     primary: RenewLease every lease_renew_ms (to the leader)
//!   nodes)   primary: no renewal committed for lease_ttl ─► fence_writes
//!            primary: switchover in the state ─► hold writes, SwitchoverFenced;
//!                     past its deadline ─► EndSwitchover; ended ─► unfence
//!  controller (acts only on the Raft leader):
//!            positions of data nodes ─► Controller ─► actions:
//!            Propose ─► raft.client_write; FenceWrites ─► peer's RoleControl
//! ```
//!
//! Lease arithmetic stays on the primary's own clock: a renewal proposed at
//! `t` gives a local deadline `t + lease_ttl_ms`, whenever it commits. The
//! state machine orders a renewal and a promotion, so a committed renewal
//! proves no promotion happened and the primary may unfence.
//!
//! Slow node operations (`become_primary`, `fence_writes`) run inline: the
//! driver does nothing else meanwhile, which is what we want while the
//! node's role is changing. Network calls and proposals run in spawned tasks
//! whose results come back as events, so an unreachable leader never stalls
//! the self-fencing check.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::controller::{Action, Controller, ControllerConfig, Report, Status, SwitchoverError};
use crate::raft::network::{ControlReply, ControlRequest, RaftTransport, call_control, propose};
use crate::raft::{Raft, RaftNode};
use crate::role::RoleControl;
use crate::state::{Applied, ClusterCommand, ClusterState, CommandResult, Member, Role, raft_id};
use crate::timing::Timing;
use crate::{Epoch, Lsn, NodeId};

/// The voter a primary that leads Raft hands leadership to: one whose
/// replicated log reaches the leader's last entry, preferring a witness (it is
/// never promoted, so it keeps leading across failovers), then a data node
/// outside the sync set (a failover in `quorum` mode promotes the sync set),
/// then the sync set, the primary last (when a leader that is not the
/// primary yields on shutdown); the lowest name among equals.
fn handoff_target<'a>(
    me: u64,
    last_log_index: Option<u64>,
    matched: &BTreeMap<u64, Option<openraft::LogId<u64>>>,
    voters: impl Iterator<Item = (u64, &'a RaftNode)>,
    state: &ClusterState,
) -> Option<RaftNode> {
    let last = last_log_index?;
    voters
        .filter(|(id, _)| *id != me)
        .filter(|(id, _)| {
            matched
                .get(id)
                .is_some_and(|m| m.is_some_and(|l| l.index >= last))
        })
        .filter_map(|(_, node)| {
            let member = state.members.get(&node.name)?;
            let rank = match member.role {
                Role::Witness => 0,
                Role::Data if state.primary.as_ref() == Some(&node.name) => 3,
                Role::Data if !state.sync_set.contains(&node.name) => 1,
                Role::Data => 2,
            };
            Some((rank, node))
        })
        .min_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)))
        .map(|(_, node)| node.clone())
}

/// On the Raft leader `id`: `None` when a hand-off of leadership cannot
/// work here (more than three voters: the candidate wins with its own vote
/// and the leader's, a majority only among at most three; with more, the
/// others still honour this leader's lease, the attempt fails and costs an
/// election), else the voter to hand it to, if one is caught up.
fn leader_handoff(
    m: &openraft::RaftMetrics<u64, RaftNode>,
    id: u64,
    state: &ClusterState,
) -> Option<Option<RaftNode>> {
    let membership = m.membership_config.membership();
    if membership.voter_ids().count() > 3 {
        return None;
    }
    Some(m.replication.as_ref().and_then(|matched| {
        let voters = membership
            .voter_ids()
            .filter_map(|v| membership.get_node(&v).map(|n| (v, n)));
        handoff_target(id, m.last_log_index, matched, voters, state)
    }))
}

/// See [`DriverHandle::yield_leadership`].
async fn yield_leadership<T: RaftTransport>(
    raft: &Raft,
    id: u64,
    transport: &T,
    state_rx: &watch::Receiver<ClusterState>,
    timing: &Timing,
) -> bool {
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(2 * timing.election_max_ms + timing.lease_ttl_ms);
    let mut asked: Option<tokio::time::Instant> = None;
    loop {
        let target = {
            let m = raft.metrics();
            let m = m.borrow();
            // Done once another node is known to lead (not merely once this
            // one stopped: a failed attempt also ends its term).
            if m.current_leader.is_some_and(|l| l != id) && m.state != openraft::ServerState::Leader
            {
                return true;
            }
            if m.state != openraft::ServerState::Leader {
                None
            } else {
                let state = state_rx.borrow().clone();
                match leader_handoff(&m, id, &state) {
                    Some(target) => target,
                    None => return false,
                }
            }
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        let due = asked.is_none_or(|t| now - t >= Duration::from_millis(timing.election_min_ms));
        if let (true, Some(target)) = (due, target) {
            asked = Some(now);
            tracing::info!(to = %target.name, "stopping: handing Raft leadership over first");
            let timeout = Duration::from_millis(timing.heartbeat_ms.saturating_mul(2));
            let _ = call_control(transport, &target, ControlRequest::Campaign, timeout).await;
        }
        tokio::time::sleep(Duration::from_millis(timing.heartbeat_ms.max(1))).await;
    }
}

/// Most lease renewals in flight at once (see `lease_duties`).
const MAX_RENEWALS_INFLIGHT: usize = 4;

/// The time source: milliseconds since the Unix epoch. Tests inject skew.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
#[must_use]
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    })
}

/// Queue depth of the driver's internal event and command channels.
const CHANNEL_DEPTH: usize = 256;

/// Requests to a running driver.
#[derive(Debug)]
enum Command {
    Switchover(
        Option<NodeId>,
        oneshot::Sender<Result<NodeId, SwitchoverError>>,
    ),
    Propose(
        ClusterCommand,
        oneshot::Sender<Result<CommandResult, DriverError>>,
    ),
    StepDown(oneshot::Sender<Result<(), DriverError>>),
    YieldLeadership(oneshot::Sender<bool>),
}

/// Results of spawned work, back into the driver loop.
#[derive(Debug)]
enum Event {
    Renewed {
        epoch: Epoch,
        proposed_at_ms: u64,
        reply: Result<ControlReply, String>,
    },
    Report(Report),
    ReportsDone,
    /// A pre-vote round ended: `granted` of the `others` other voters would
    /// vote for this node.
    PreVoted {
        granted: usize,
        others: usize,
    },
}

/// What this node currently does, as far as the driver has told it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Acting {
    Idle,
    Primary(Epoch),
    Mirror(NodeId, Epoch),
}

/// The driver's outside handle: switchover requests and status.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    reports: watch::Receiver<BTreeMap<NodeId, Report>>,
}

/// Why a handle request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The driver has stopped.
    #[error("the failover driver is not running")]
    Stopped,
    /// The controller refused.
    #[error(transparent)]
    Switchover(#[from] SwitchoverError),
    /// The proposal did not reach a leader or was not committed in time.
    #[error("proposal failed: {0}")]
    Proposal(String),
}

impl DriverHandle {
    /// Starts a planned switchover (only on the Raft leader's driver).
    pub async fn switchover(&self, target: Option<NodeId>) -> Result<NodeId, DriverError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Switchover(target, tx))
            .await
            .map_err(|_| DriverError::Stopped)?;
        Ok(rx.await.map_err(|_| DriverError::Stopped)??)
    }

    /// Proposes `cmd` (forwarded to the Raft leader) and returns how the
    /// state machine answered. For what the node itself decides:
    /// `SetSyncSet`, `MarkDegraded`/`ClearDegraded`, `SetCommitPolicy`,
    /// `SetNoFailover`.
    pub async fn propose(&self, cmd: ClusterCommand) -> Result<CommandResult, DriverError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Propose(cmd, tx))
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// Graceful shutdown of a primary: stop writing, stop renewing and give
    /// the lease up, so the controller promotes a successor at once instead
    /// of after `lease_ttl_ms + failover_margin_ms`. A no-op on a node that
    /// is not primary. The node stays fenced until it is told a new role.
    pub async fn step_down(&self) -> Result<(), DriverError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::StepDown(tx))
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// Before a graceful stop: if this node leads Raft, asks a caught-up
    /// voter (not the primary, if another will do) to take over, and waits
    /// until it has, so the stop costs the cluster no election (during which
    /// the primary could not renew its lease). `true` when this node no
    /// longer leads; `false` when no voter took over in time (or with more
    /// than three voters, where the hand-off cannot win).
    pub async fn yield_leadership(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::YieldLeadership(tx))
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// The controller's status on this node.
    #[must_use]
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The last position report of every data node, as collected by this
    /// node's controller (fresh only while this node is the Raft leader;
    /// `GET /v1/cluster` can show lag from it).
    #[must_use]
    pub fn reports(&self) -> watch::Receiver<BTreeMap<NodeId, Report>> {
        self.reports.clone()
    }
}

/// The failover driver of one node.
pub struct Driver<T, R> {
    name: NodeId,
    id: u64,
    timing: Timing,
    raft: Raft,
    transport: Arc<T>,
    role: Arc<R>,
    state_rx: watch::Receiver<ClusterState>,
    clock: Clock,
    controller: Controller,
    status_tx: watch::Sender<Status>,
    reports_tx: watch::Sender<BTreeMap<NodeId, Report>>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    commands_rx: mpsc::Receiver<Command>,
    /// Controller proposals, executed one after the other (a switchover's
    /// Demote must apply before its Promote).
    proposals_tx: Option<mpsc::Sender<ClusterCommand>>,
    acting: Acting,
    lease_until_ms: u64,
    /// Lease renewals proposed and not answered yet.
    renewals_inflight: usize,
    last_renew_ms: u64,
    self_fenced: bool,
    /// Writes held for a switchover, with the last LSN written.
    holding: Option<Lsn>,
    /// Stepped down as primary of this epoch: no becoming primary again, no
    /// renewal, no unfencing, until the state names another primary.
    stepped_down: Option<Epoch>,
    last_switchover_proposal_ms: u64,
    reports_inflight: bool,
    last_reports_ms: u64,
    /// The Raft term this node has led since, and since when (its clock).
    leading_since: Option<(u64, u64)>,
    /// When this node, as primary, last asked a voter to take Raft leadership.
    last_handoff_ms: u64,
    /// The vote's (committed, last modified) as last seen: when it changes,
    /// a leader was heard from (or a vote cast) and the timer restarts.
    seen_vote: Option<(bool, Option<tokio::time::Instant>)>,
    /// When to ask the other voters for a pre-vote, if no leader is heard.
    next_election: Option<tokio::time::Instant>,
    prevote_inflight: bool,
    /// When this driver started, and whether its applied state has since
    /// been confirmed current (see `state_is_current`).
    started: tokio::time::Instant,
    state_confirmed: bool,
}

impl<T, R> std::fmt::Debug for Driver<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("name", &self.name)
            .field("acting", &self.acting)
            .field("lease_until_ms", &self.lease_until_ms)
            .field("self_fenced", &self.self_fenced)
            .finish_non_exhaustive()
    }
}

impl<T: RaftTransport, R: RoleControl> Driver<T, R> {
    /// A driver for node `name`. `state_rx` is the state machine's
    /// [`subscribe`](crate::raft::store::StateMachineStore::subscribe).
    pub fn new(
        name: NodeId,
        timing: Timing,
        raft: Raft,
        transport: Arc<T>,
        role: Arc<R>,
        state_rx: watch::Receiver<ClusterState>,
        clock: Clock,
    ) -> (Self, DriverHandle) {
        let (events_tx, events_rx) = mpsc::channel(CHANNEL_DEPTH);
        let (commands_tx, commands_rx) = mpsc::channel(CHANNEL_DEPTH);
        let (status_tx, status) = watch::channel(Status::NotLeader);
        let (reports_tx, reports) = watch::channel(BTreeMap::new());
        let controller = Controller::new(ControllerConfig::from(&timing)).with_me(name.clone());
        let driver = Driver {
            id: raft_id(&name),
            name,
            timing,
            raft,
            transport,
            role,
            state_rx,
            clock,
            controller,
            status_tx,
            reports_tx,
            events_tx,
            events_rx,
            commands_rx,
            proposals_tx: None,
            acting: Acting::Idle,
            lease_until_ms: 0,
            renewals_inflight: 0,
            last_renew_ms: 0,
            self_fenced: false,
            holding: None,
            stepped_down: None,
            last_switchover_proposal_ms: 0,
            reports_inflight: false,
            last_reports_ms: 0,
            leading_since: None,
            last_handoff_ms: 0,
            seen_vote: None,
            next_election: None,
            prevote_inflight: false,
            started: tokio::time::Instant::now(),
            state_confirmed: false,
        };
        (
            driver,
            DriverHandle {
                commands: commands_tx,
                status,
                reports,
            },
        )
    }

    /// Runs until `shutdown` becomes true (or its sender is dropped).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // Elections are started here, after a pre-vote (election_duties).
        self.raft.runtime_config().elect(false);
        let (proposals_tx, mut proposals_rx) = mpsc::channel::<ClusterCommand>(CHANNEL_DEPTH);
        self.proposals_tx = Some(proposals_tx);
        let (raft, transport, id) = (self.raft.clone(), self.transport.clone(), self.id);
        let deadline = Duration::from_millis(self.timing.lease_ttl_ms);
        let proposer = tokio::spawn(async move {
            while let Some(cmd) = proposals_rx.recv().await {
                let r =
                    tokio::time::timeout(deadline, propose(&raft, id, &*transport, cmd, deadline))
                        .await;
                tracing::info!(result = ?r, "controller proposal");
            }
        });
        let tick_ms = self
            .timing
            .heartbeat_ms
            .min(self.timing.lease_renew_ms / 2)
            .max(1);
        let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.on_tick().await,
                Some(ev) = self.events_rx.recv() => self.on_event(ev).await,
                Some(cmd) = self.commands_rx.recv() => self.on_command(cmd).await,
                changed = self.state_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let state = self.state_rx.borrow_and_update().clone();
                    self.controller.handle_state(&state);
                    self.follow_state(&state).await;
                }
                res = shutdown.changed() => {
                    if res.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        proposer.abort();
        tracing::info!(node = %self.name, "failover driver stopped");
    }

    fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Switchover(target, reply) => {
                let now = self.now_ms();
                let result = self.controller.handle_switchover(target, now);
                let _ = reply.send(result);
                self.run_actions().await;
            }
            Command::StepDown(reply) => {
                let state = self.state_rx.borrow().clone();
                if state.primary.as_ref() != Some(&self.name) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                let epoch = state.epoch;
                if self.acting == Acting::Primary(epoch)
                    && let Err(e) = self.role.fence_writes(epoch).await
                {
                    let _ = reply.send(Err(DriverError::Proposal(e.to_string())));
                    return;
                }
                self.self_fenced = true;
                self.stepped_down = Some(epoch);
                tracing::info!(node = %self.name, %epoch, "stepping down: releasing the lease");
                let cmd = ClusterCommand::ReleaseLease {
                    node: self.name.clone(),
                    epoch,
                };
                self.spawn_reply(cmd, reply, |r| match r {
                    Ok(_) => Ok(()),
                    Err(e) => Err(DriverError::Proposal(e.to_string())),
                });
            }
            Command::YieldLeadership(reply) => {
                let (raft, transport, state_rx, timing, id) = (
                    self.raft.clone(),
                    self.transport.clone(),
                    self.state_rx.clone(),
                    self.timing,
                    self.id,
                );
                tokio::spawn(async move {
                    let moved = yield_leadership(&raft, id, &*transport, &state_rx, &timing).await;
                    let _ = reply.send(moved);
                });
            }
            Command::Propose(cmd, reply) => {
                self.spawn_reply(cmd, reply, Ok);
            }
        }
    }

    async fn on_tick(&mut self) {
        let now = self.now_ms();
        let state = self.state_rx.borrow().clone();
        self.follow_state(&state).await;
        self.lease_duties(now).await;
        self.leadership_duties(&state, now);
        self.election_duties(&state).await;

        let (is_leader, term) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            // A leader acts only once it applied an entry of its own term:
            // then its state holds every lease renewal committed before it.
            let caught_up = m
                .last_applied
                .is_some_and(|l| l.leader_id.term == m.current_term);
            (
                m.current_leader == Some(self.id) && caught_up,
                m.current_term,
            )
        };
        self.controller.handle_leadership(is_leader, term, now);
        if !is_leader {
            // A follower's controller emits nothing, so publish this here.
            self.status_tx.send_if_modified(|s| {
                let changed = *s != Status::NotLeader;
                *s = Status::NotLeader;
                changed
            });
        }
        if is_leader
            && !self.reports_inflight
            && now.saturating_sub(self.last_reports_ms) >= self.timing.heartbeat_ms
        {
            self.gather_reports(&state, now);
        }
        self.controller.handle_tick(now);
        self.run_actions().await;
    }

    /// Makes the node's role match the applied state.
    async fn follow_state(&mut self, state: &ClusterState) {
        if !matches!(
            state.members.get(&self.name).map(|m| m.role),
            Some(Role::Data)
        ) {
            return;
        }
        match &state.primary {
            Some(p) if *p == self.name => {
                if self.stepped_down == Some(state.epoch) {
                    return;
                }
                if self.acting == Acting::Primary(state.epoch) {
                    self.switchover_duties(state).await;
                    return;
                }
                if !self.state_is_current().await {
                    return;
                }
                let first_lsn = state.first_lsn_of(state.epoch).unwrap_or(Lsn(1));
                match self.role.become_primary(state.epoch, first_lsn).await {
                    Ok(()) => {
                        tracing::info!(node = %self.name, epoch = %state.epoch, %first_lsn, "became primary");
                        self.acting = Acting::Primary(state.epoch);
                        self.self_fenced = false;
                        self.holding = None;
                        self.stepped_down = None;
                        // The grant from Promote is on the proposer's clock;
                        // renew at once to get a deadline on ours.
                        self.lease_until_ms = state
                            .lease
                            .as_ref()
                            .filter(|l| l.holder == self.name && l.epoch == state.epoch)
                            .map_or(0, |l| l.expires_at_ms);
                        self.role
                            .lease_valid_until(state.epoch, self.lease_until_ms);
                        self.last_renew_ms = 0;
                    }
                    Err(e) => {
                        tracing::error!(node = %self.name, %e, "cannot become primary; will retry")
                    }
                }
            }
            Some(p) => {
                let want = Acting::Mirror(p.clone(), state.epoch);
                if self.acting == want {
                    return;
                }
                self.stop_writing_if_primary().await;
                let Some(member) = state.members.get(p) else {
                    return;
                };
                match self.role.become_mirror(p, member, state.epoch).await {
                    Ok(()) => {
                        tracing::info!(node = %self.name, primary = %p, epoch = %state.epoch, "following");
                        self.acting = want;
                    }
                    Err(e) => {
                        tracing::error!(node = %self.name, %e, "cannot become mirror; will retry")
                    }
                }
            }
            None => {
                self.stop_writing_if_primary().await;
            }
        }
    }

    /// Whether the applied state can be trusted to name this node primary.
    /// A node that restarts reads its state from disk, and a deposed primary
    /// would find itself named there (and take the primary side, fenced,
    /// until the leader's newer entries arrived). So after a start the state
    /// counts once this node leads Raft, or has heard from a leader since
    /// the start and applied everything that leader said was committed; or,
    /// failing both, after two leases (a node that cannot reach a leader
    /// cannot renew a lease either, so it would stay fenced anyway).
    async fn state_is_current(&mut self) -> bool {
        if self.state_confirmed {
            return true;
        }
        let (leads, applied) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (
                m.current_leader == Some(self.id) && m.state == openraft::ServerState::Leader,
                m.last_applied.map(|l| l.index),
            )
        };
        let started = self.started;
        let heard = self
            .raft
            .with_raft_state(move |st| {
                let heard = st.vote_ref().is_committed()
                    && st.vote_last_modified().is_some_and(|t| t > started);
                (heard, st.committed.map(|c| c.index))
            })
            .await;
        let caught_up = matches!(heard, Ok((true, committed)) if applied >= committed);
        let waited = started.elapsed() >= Duration::from_millis(2 * self.timing.lease_ttl_ms);
        if leads || caught_up || waited || heard.is_err() {
            self.state_confirmed = true;
        }
        self.state_confirmed
    }

    async fn stop_writing_if_primary(&mut self) {
        if let Acting::Primary(epoch) = self.acting {
            if !self.self_fenced {
                if let Err(e) = self.role.fence_writes(epoch).await {
                    tracing::error!(node = %self.name, %e, "fencing after demotion failed");
                }
                self.self_fenced = true;
            }
            self.holding = None;
            self.stepped_down = None;
            self.acting = Acting::Idle;
        }
    }

    /// The primary's part of a switchover recorded in the applied state:
    /// hold writes and record the last LSN; write again only once the
    /// switchover has been ended (then its promotion can no longer apply).
    async fn switchover_duties(&mut self, state: &ClusterState) {
        let now = self.now_ms();
        let mine = state
            .switchover
            .as_ref()
            .filter(|sw| sw.from == self.name && sw.epoch == state.epoch);
        match (mine, self.holding) {
            (Some(sw), None) => match self.role.fence_writes(sw.epoch).await {
                Ok(last_lsn) => {
                    tracing::info!(node = %self.name, to = %sw.to, %last_lsn, "holding writes for a switchover");
                    self.self_fenced = true;
                    self.holding = Some(last_lsn);
                    self.last_switchover_proposal_ms = 0;
                }
                Err(e) => tracing::error!(node = %self.name, %e, "cannot hold writes; will retry"),
            },
            (Some(sw), Some(last_lsn)) => {
                let due = now.saturating_sub(self.last_switchover_proposal_ms)
                    >= self.timing.lease_renew_ms;
                let cmd = if now > sw.deadline_ms {
                    // Whoever runs the controller is gone or stuck: end it.
                    Some(ClusterCommand::EndSwitchover { epoch: sw.epoch })
                } else if sw.last_lsn.is_none() {
                    Some(ClusterCommand::SwitchoverFenced {
                        node: self.name.clone(),
                        epoch: sw.epoch,
                        last_lsn,
                    })
                } else {
                    None
                };
                if let (true, Some(cmd)) = (due, cmd) {
                    self.last_switchover_proposal_ms = now;
                    self.spawn_proposal(cmd);
                }
            }
            (None, Some(_)) => {
                self.holding = None;
                // Ended: no switchover promotion can apply any more. Write
                // again if the lease is known valid, else after the next
                // committed renewal.
                if now < self.lease_until_ms && self.stepped_down.is_none() {
                    match self.role.unfence_writes(state.epoch).await {
                        Ok(()) => self.self_fenced = false,
                        Err(e) => tracing::error!(node = %self.name, %e, "unfence failed"),
                    }
                }
            }
            (None, None) => {}
        }
    }

    /// Proposes `cmd` in the background and answers `reply` with `map` of
    /// the state machine's result.
    fn spawn_reply<V: Send + 'static>(
        &self,
        cmd: ClusterCommand,
        reply: oneshot::Sender<Result<V, DriverError>>,
        map: impl FnOnce(CommandResult) -> Result<V, DriverError> + Send + 'static,
    ) {
        let (raft, transport, id) = (self.raft.clone(), self.transport.clone(), self.id);
        let deadline = Duration::from_millis(self.timing.lease_ttl_ms);
        tokio::spawn(async move {
            let r = tokio::time::timeout(deadline, propose(&raft, id, &*transport, cmd, deadline))
                .await;
            let result = match r {
                Err(_) => Err(DriverError::Proposal("not committed in time".into())),
                Ok(Err(e)) => Err(DriverError::Proposal(e.to_string())),
                Ok(Ok(ControlReply::Proposed(result))) => map(result),
                Ok(Ok(other)) => Err(DriverError::Proposal(format!("{other:?}"))),
            };
            let _ = reply.send(result);
        });
    }

    /// Proposes `cmd` in the background, logging the outcome.
    fn spawn_proposal(&self, cmd: ClusterCommand) {
        let (raft, transport, id) = (self.raft.clone(), self.transport.clone(), self.id);
        let deadline = Duration::from_millis(self.timing.lease_ttl_ms);
        tokio::spawn(async move {
            let r = tokio::time::timeout(deadline, propose(&raft, id, &*transport, cmd, deadline))
                .await;
            tracing::debug!(result = ?r, "proposal");
        });
    }

    /// Lease renewal and self-fencing of the primary.
    async fn lease_duties(&mut self, now: u64) {
        let Acting::Primary(epoch) = self.acting else {
            return;
        };
        // One renewal every lease_renew_ms; but one that hangs (sent to a
        // Raft leader that just died) must not hold the next back until it
        // times out: past two heartbeats another goes, to whoever leads now.
        let since = now.saturating_sub(self.last_renew_ms);
        let due = match self.renewals_inflight {
            0 => since >= self.timing.lease_renew_ms,
            n if n < MAX_RENEWALS_INFLIGHT => {
                since >= self.timing.lease_renew_ms.min(2 * self.timing.heartbeat_ms)
            }
            _ => false,
        };
        if due && self.stepped_down.is_none() {
            self.renewals_inflight += 1;
            self.last_renew_ms = now;
            let cmd = ClusterCommand::RenewLease {
                node: self.name.clone(),
                epoch,
                now_ms: now,
                lease_ttl_ms: self.timing.lease_ttl_ms,
            };
            let (raft, transport, tx, id) = (
                self.raft.clone(),
                self.transport.clone(),
                self.events_tx.clone(),
                self.id,
            );
            let deadline = Duration::from_millis(self.timing.lease_ttl_ms);
            tokio::spawn(async move {
                let reply =
                    tokio::time::timeout(deadline, propose(&raft, id, &*transport, cmd, deadline))
                        .await
                        .map_err(|_| "renewal timed out".to_owned())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                let _ = tx
                    .send(Event::Renewed {
                        epoch,
                        proposed_at_ms: now,
                        reply,
                    })
                    .await;
            });
        }
        if now >= self.lease_until_ms && !self.self_fenced {
            tracing::warn!(node = %self.name, %epoch, lease_until_ms = self.lease_until_ms, "lease not renewed in time: fencing writes");
            if let Err(e) = self.role.fence_writes(epoch).await {
                tracing::error!(node = %self.name, %e, "self-fencing failed");
            }
            self.self_fenced = true;
        }
    }

    /// Keeps the Raft leader off the primary.
    ///
    /// A primary that also leads Raft takes both down when it dies, and
    /// openraft 0.9's followers then wait out their leader lease
    /// (`election_max_ms`) and an election timeout before a new leader's
    /// controller can even start: that was the slow tail of failover
    /// (2.2–3.4 s against 1.2–1.7 s with a surviving leader). openraft 0.9
    /// has no leadership transfer, but a leader grants a newer candidate's
    /// vote once `election_max_ms` have passed since its own election (its
    /// lease check is on its own vote, which heartbeats do not refresh), and
    /// a candidate with the leader's vote and its own holds a majority of
    /// three (so this is done with at most three voters). So once it has led that long, the primary asks a voter whose
    /// log matches its own to campaign — right after one of its lease
    /// renewals committed, so no entry of its own races the vote request.
    /// If the attempt fails (a write slipped in), the term still moves on,
    /// Raft elects someone within an election timeout, and the lease
    /// (`lease_ttl_ms ≥ election_max_ms`) rides that out; no attempt repeats
    /// within a lease.
    fn leadership_duties(&mut self, state: &ClusterState, now: u64) {
        let (leader_term, target) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            if m.current_leader != Some(self.id) || m.state != openraft::ServerState::Leader {
                self.leading_since = None;
                return;
            }
            let Some(target) = leader_handoff(&m, self.id, state) else {
                return;
            };
            (m.current_term, target)
        };
        let since = match self.leading_since {
            Some((term, since)) if term == leader_term => since,
            _ => {
                self.leading_since = Some((leader_term, now));
                return;
            }
        };
        let ready = self.acting == Acting::Primary(state.epoch)
            && state.primary.as_ref() == Some(&self.name)
            && !self.self_fenced
            && self.holding.is_none()
            && self.stepped_down.is_none()
            && state.switchover.is_none()
            // The voters' view of this leader's own vote has aged past the
            // lease, so this leader will grant the candidate its vote.
            && now.saturating_sub(since) > self.timing.election_max_ms + self.timing.heartbeat_ms
            && now.saturating_sub(self.last_handoff_ms) >= self.timing.lease_ttl_ms
            // A renewal was proposed and committed moments ago: the next one
            // is not due for a while.
            && self.renewals_inflight == 0
            && now.saturating_sub(self.last_renew_ms) < self.timing.lease_renew_ms / 2;
        let Some(target) = target.filter(|_| ready) else {
            return;
        };
        self.last_handoff_ms = now;
        tracing::info!(node = %self.name, to = %target.name, term = leader_term, "handing Raft leadership to a caught-up voter: the primary should not also lead Raft");
        let transport = self.transport.clone();
        let timeout = Duration::from_millis(self.timing.heartbeat_ms.saturating_mul(2));
        tokio::spawn(async move {
            match call_control(&*transport, &target, ControlRequest::Campaign, timeout).await {
                Ok(ControlReply::Campaigning) => {}
                other => {
                    tracing::info!(to = %target.name, ?other, "leadership handoff not started")
                }
            }
        });
    }

    /// Starts Raft elections, after a pre-vote, in place of openraft's own
    /// timer (disabled in [`Driver::run`]).
    ///
    /// openraft 0.9 has no pre-vote: a node that was cut off or restarted
    /// and missed the leader's heartbeats for its election timeout raised
    /// its term, and the higher term deposed a healthy leader when the node
    /// came back. The cluster then had no leader for an election or two,
    /// long enough that the primary could not renew its lease and fenced
    /// itself: the failover drill saw a healthy primary stop writing in about
    /// one restart of two. Now the node first asks the other voters whether
    /// they would vote ([`ControlRequest::PreVote`], refused by a leader and
    /// by anyone who heard a leader within the lease) and elects only with a
    /// majority. The timer runs from the last change of this node's vote
    /// (every heartbeat refreshes it): the leader lease plus a random spread
    /// when that vote is a leader's, else a random election timeout.
    ///
    /// A voter the member records do not name yet (a node half-way through
    /// joining: a Raft voter before its `AddMember` is committed) never
    /// campaigns. Once it won an election during a storm: the join's
    /// membership change failed on the deposed leader, and the others could
    /// not forward the join to a leader whose HTTP address no record held,
    /// so the join stalled for as long as the new node led.
    async fn election_duties(&mut self, state: &ClusterState) {
        if self.prevote_inflight {
            return;
        }
        let recorded = state.members.is_empty() || state.members.contains_key(&self.name);
        let others: Vec<RaftNode> = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let voter = membership.voter_ids().any(|id| id == self.id);
            if m.state == openraft::ServerState::Leader || !voter || !recorded {
                self.next_election = None;
                self.seen_vote = None;
                return;
            }
            membership
                .voter_ids()
                .filter(|id| *id != self.id)
                .filter_map(|id| membership.get_node(&id).cloned())
                .collect()
        };
        let Ok(vote) = self.vote_seen().await else {
            return;
        };
        let now = tokio::time::Instant::now();
        if self.seen_vote != Some(vote) || self.next_election.is_none() {
            self.seen_vote = Some(vote);
            // After a leader's last word: its lease (the others refuse to
            // vote before it ends), then a random spread of
            // `election_max - election_min` so two followers rarely run at
            // once. After a vote of this node's own (or an election that
            // failed): a whole random election timeout, as Raft says.
            let (committed, modified) = vote;
            let (min, max) = (self.timing.election_min_ms, self.timing.election_max_ms);
            let wait = if committed {
                max + rand::random_range(0..=max.saturating_sub(min))
            } else {
                self.election_timeout_ms()
            };
            self.next_election = Some(modified.unwrap_or(now) + Duration::from_millis(wait));
        }
        if self.next_election.is_some_and(|at| now < at) {
            return;
        }
        self.next_election = Some(now + Duration::from_millis(self.election_timeout_ms()));
        self.prevote_inflight = true;
        let (transport, tx) = (self.transport.clone(), self.events_tx.clone());
        let timeout = Duration::from_millis(self.timing.heartbeat_ms.saturating_mul(2));
        tokio::spawn(async move {
            let asks = others.iter().map(|node| {
                let transport = transport.clone();
                async move {
                    matches!(
                        call_control(&*transport, node, ControlRequest::PreVote, timeout).await,
                        Ok(ControlReply::PreVote { granted: true })
                    )
                }
            });
            let granted = futures::future::join_all(asks)
                .await
                .into_iter()
                .filter(|g| *g)
                .count();
            let _ = tx
                .send(Event::PreVoted {
                    granted,
                    others: others.len(),
                })
                .await;
        });
    }

    /// This node's vote: whether it is committed (a leader's) and when it
    /// last changed (every heartbeat from that leader refreshes it).
    async fn vote_seen(
        &self,
    ) -> Result<(bool, Option<tokio::time::Instant>), openraft::error::Fatal<u64>> {
        self.raft
            .with_raft_state(|st| (st.vote_ref().is_committed(), st.vote_last_modified()))
            .await
    }

    /// A random election timeout in `[election_min_ms, election_max_ms]`.
    fn election_timeout_ms(&self) -> u64 {
        let (min, max) = (self.timing.election_min_ms, self.timing.election_max_ms);
        rand::random_range(min..=max.max(min))
    }

    async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Renewed {
                epoch,
                proposed_at_ms,
                reply,
            } => {
                self.renewals_inflight = self.renewals_inflight.saturating_sub(1);
                match reply {
                    Ok(ControlReply::Proposed(Ok(Applied::LeaseUntil { .. })))
                        if self.acting == Acting::Primary(epoch) =>
                    {
                        let until = proposed_at_ms.saturating_add(self.timing.lease_ttl_ms);
                        self.lease_until_ms = self.lease_until_ms.max(until);
                        self.role.lease_valid_until(epoch, self.lease_until_ms);
                        if self.self_fenced
                            && self.holding.is_none()
                            && self.stepped_down.is_none()
                            && self.now_ms() < self.lease_until_ms
                        {
                            // Committed renewal: no promotion can have happened.
                            match self.role.unfence_writes(epoch).await {
                                Ok(()) => self.self_fenced = false,
                                Err(e) => tracing::error!(node = %self.name, %e, "unfence failed"),
                            }
                        }
                    }
                    other => {
                        tracing::debug!(node = %self.name, ?other, "lease renewal not applied")
                    }
                }
            }
            Event::PreVoted { granted, others } => {
                self.prevote_inflight = false;
                // With its own vote, a majority of all voters.
                // Not if a leader was heard from while the round ran.
                let unchanged = self
                    .vote_seen()
                    .await
                    .is_ok_and(|vote| self.seen_vote == Some(vote));
                if unchanged && (granted + 1) * 2 > others + 1 {
                    tracing::info!(node = %self.name, granted, voters = others + 1, "no Raft leader heard and a majority would vote: starting an election");
                    if let Err(e) = self.raft.trigger().elect().await {
                        tracing::warn!(node = %self.name, %e, "cannot start an election");
                    }
                } else {
                    tracing::debug!(node = %self.name, granted, voters = others + 1, "no Raft leader heard, but no majority would vote: not starting an election");
                }
            }
            Event::Report(r) => self.controller.handle_report(r),
            Event::ReportsDone => {
                self.reports_inflight = false;
                self.reports_tx
                    .send_replace(self.controller.reports().clone());
                let now = self.now_ms();
                self.controller.handle_tick(now);
                self.run_actions().await;
            }
        }
    }

    /// Asks every data member for its position, in parallel.
    fn gather_reports(&mut self, state: &ClusterState, now: u64) {
        self.reports_inflight = true;
        self.last_reports_ms = now;
        let timeout = Duration::from_millis(self.timing.heartbeat_ms.saturating_mul(2));
        let targets: Vec<(NodeId, Member)> = state
            .members
            .iter()
            .filter(|(_, m)| m.role == Role::Data)
            .map(|(n, m)| (n.clone(), m.clone()))
            .collect();
        let (transport, role, tx, me, clock) = (
            self.transport.clone(),
            self.role.clone(),
            self.events_tx.clone(),
            self.name.clone(),
            self.clock.clone(),
        );
        tokio::spawn(async move {
            let calls = targets.into_iter().map(|(name, member)| {
                let (transport, role, me) = (transport.clone(), role.clone(), me.clone());
                async move {
                    let position = if name == me {
                        role.position().await.map_err(|e| e.to_string())
                    } else {
                        let node = RaftNode {
                            name: name.clone(),
                            raft_addr: member.raft_addr.clone(),
                        };
                        match call_control(&*transport, &node, ControlRequest::Position, timeout)
                            .await
                        {
                            Ok(ControlReply::Position(p)) => Ok(p),
                            Ok(other) => Err(format!("{other:?}")),
                            Err(e) => Err(e.to_string()),
                        }
                    };
                    (name, position)
                }
            });
            for (name, position) in futures::future::join_all(calls).await {
                let at_ms = clock();
                let report = match position {
                    Ok(p) => Report {
                        node: name,
                        epoch: p.epoch,
                        flushed_lsn: p.flushed_lsn,
                        applied_lsn: p.applied_lsn,
                        reachable: true,
                        at_ms,
                    },
                    Err(_) => Report {
                        node: name,
                        epoch: Epoch(0),
                        flushed_lsn: Lsn::ZERO,
                        applied_lsn: Lsn::ZERO,
                        reachable: false,
                        at_ms,
                    },
                };
                let _ = tx.send(Event::Report(report)).await;
            }
            let _ = tx.send(Event::ReportsDone).await;
        });
    }

    async fn run_actions(&mut self) {
        while let Some(action) = self.controller.poll_action() {
            match action {
                Action::Propose(cmd) => {
                    let sent = match &self.proposals_tx {
                        Some(tx) => tx.try_send(cmd).is_ok(),
                        None => false,
                    };
                    if !sent {
                        // The controller re-proposes after retry_after_ms.
                        tracing::warn!(node = %self.name, "proposal queue full; dropped");
                    }
                }
                Action::Status(s) => {
                    tracing::info!(node = %self.name, status = %s, "failover status");
                    self.status_tx.send_replace(s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> (u64, RaftNode) {
        let name = NodeId::from(name);
        (
            raft_id(&name),
            RaftNode {
                raft_addr: format!("{name}:7000"),
                name,
            },
        )
    }

    fn state(members: &[(&str, Role)], sync_set: &[&str]) -> ClusterState {
        let mut s = ClusterState::default();
        for (name, role) in members {
            s.members.insert(
                NodeId::from(*name),
                Member {
                    role: *role,
                    raft_addr: format!("{name}:7000"),
                    http_addr: format!("{name}:7070"),
                    nofailover: false,
                },
            );
        }
        s.sync_set = sync_set.iter().map(|n| NodeId::from(*n)).collect();
        s
    }

    fn at(index: u64) -> Option<openraft::LogId<u64>> {
        Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 0),
            index,
        ))
    }

    /// Runs `handoff_target` for leader `n1` at last index 10 with these
    /// followers' matched indexes, returning the chosen name.
    fn pick(followers: &[(&str, Option<u64>)], s: &ClusterState) -> Option<String> {
        let voters: Vec<(u64, RaftNode)> = std::iter::once("n1")
            .chain(followers.iter().map(|(n, _)| *n))
            .map(node)
            .collect();
        let matched: BTreeMap<u64, Option<openraft::LogId<u64>>> = followers
            .iter()
            .map(|(n, m)| (node(n).0, m.and_then(at)))
            .collect();
        handoff_target(
            node("n1").0,
            Some(10),
            &matched,
            voters.iter().map(|(id, n)| (*id, n)),
            s,
        )
        .map(|n| n.name.to_string())
    }

    #[test]
    fn handoff_goes_only_to_a_caught_up_voter() {
        let s = state(
            &[("n1", Role::Data), ("n2", Role::Data), ("n3", Role::Data)],
            &[],
        );
        assert_eq!(pick(&[("n2", Some(9)), ("n3", None)], &s), None);
        assert_eq!(
            pick(&[("n2", Some(9)), ("n3", Some(10))], &s).as_deref(),
            Some("n3")
        );
        assert_eq!(
            pick(&[("n2", Some(10)), ("n3", Some(10))], &s).as_deref(),
            Some("n2")
        );
    }

    #[test]
    fn handoff_prefers_a_witness_then_a_node_outside_the_sync_set() {
        let s = state(
            &[
                ("n1", Role::Data),
                ("n2", Role::Data),
                ("n3", Role::Data),
                ("w1", Role::Witness),
            ],
            &["n2"],
        );
        let all = [("n2", Some(10)), ("n3", Some(10)), ("w1", Some(10))];
        assert_eq!(pick(&all, &s).as_deref(), Some("w1"));
        assert_eq!(pick(&all[..2], &s).as_deref(), Some("n3"));
        assert_eq!(pick(&all[..1], &s).as_deref(), Some("n2"));
    }

    #[test]
    fn a_yielding_leader_hands_over_to_the_primary_only_as_a_last_resort() {
        let mut s = state(
            &[("n1", Role::Data), ("n2", Role::Data), ("n3", Role::Data)],
            &["n3"],
        );
        s.primary = Some(NodeId::from("n2"));
        let all = [("n2", Some(10)), ("n3", Some(10))];
        assert_eq!(pick(&all, &s).as_deref(), Some("n3"));
        assert_eq!(pick(&all[..1], &s).as_deref(), Some("n2"));
    }

    #[test]
    fn handoff_skips_voters_the_state_does_not_know() {
        let s = state(&[("n1", Role::Data)], &[]);
        assert_eq!(pick(&[("n2", Some(10))], &s), None);
    }
}
