//! The failover control plane on a node (DESIGN §8): openraft over the
//! node's QUIC endpoint, the failover driver, and [`NodeRole`], the node's
//! side of the `RoleControl` seam.
//!
//! ```text
//! start: <data_dir>/raft/raft.redb ─► Raft (QuicTransport out, QuicServer in, ALPN mirrordb-raft/1)
//!        ─► Driver (lease, self-fencing, controller on the Raft leader)
//!        ─► bootstrap task: the lowest-named configured member forms the
//!           cluster once (retrying until a majority answers)
//! driver ─► NodeRole::become_primary ─► stop following, Engine::promote, serve replication
//!        ─► NodeRole::become_mirror  ─► refuse writes, stop serving, follow the new primary
//!                                       (a divergent tail is saved under rollback/ by the
//!                                        replication protocol's Diverged/reseed path)
//!        ─► lease_valid_until ─► Engine::set_lease_until (checked on every write)
//!        ─► fence/unfence     ─► Engine::hold_writes / release_writes
//! watch tick (primary, quorum policies): keep the sync set recorded in the
//!        cluster state: k connected mirrors holding every acknowledged write
//! ```
//!
//! A witness runs the same plane with `NoData`: it votes and keeps the log
//! but never takes a role.

use super::policy::{CommitGate, Recorded, SyncRule};
use super::runtime::{ClusterError, ClusterNode};
use crate::engine::Role;
use mirrordb_failover::driver::{DriverHandle, system_clock};
use mirrordb_failover::membership;
use mirrordb_failover::raft::network::{NetworkFactory, RpcHandler};
use mirrordb_failover::raft::quic::{QuicServer, QuicTransport, raft_membership};
use mirrordb_failover::raft::{Raft, store};
use mirrordb_failover::role::{NoData, Position, RoleControl, RoleError};
use mirrordb_failover::state::{ClusterCommand, ClusterState, Member, Role as MemberKind, raft_id};
use mirrordb_failover::{Driver, Epoch, Lsn, NodeId, Timing};
use mirrordb_replication::AckTracker;
use mirrordb_replication::endpoint::PeerConnection;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long one bootstrap attempt waits for a leader and the members.
const BOOTSTRAP_ATTEMPT: Duration = Duration::from_secs(10);
/// Least time between two sync-set proposals.
const SYNC_PROPOSAL_EVERY: Duration = Duration::from_millis(300);
/// How long a graceful stop waits for the lease hand-over.
const STEP_DOWN_WAIT: Duration = Duration::from_secs(3);

fn now_ms() -> u64 {
    crate::journal::writer::now_us() / 1000
}

/// The node's `RoleControl`: what the failover driver asks of this node.
pub struct NodeRole {
    node: ClusterNode,
    handle: OnceLock<DriverHandle>,
    state: watch::Receiver<ClusterState>,
}

impl NodeRole {
    fn failed(e: impl std::fmt::Display) -> RoleError {
        RoleError::Failed(e.to_string())
    }

    /// The sync-set rule for a primary of `epoch`.
    fn sync_rule(&self, epoch: u64) -> Option<SyncRule> {
        let handle = self.handle.get()?.clone();
        let (tx, rx) = watch::channel(BTreeSet::new());
        let mut states = self.state.clone();
        tokio::spawn(async move {
            loop {
                let set: BTreeSet<mirrordb_replication::NodeId> = {
                    let st = states.borrow_and_update();
                    if st.epoch.0 == epoch {
                        st.sync_set.clone()
                    } else {
                        BTreeSet::new()
                    }
                };
                tx.send_if_modified(|cur| {
                    let changed = *cur != set;
                    *cur = set;
                    changed
                });
                tokio::select! {
                    r = states.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        let mark = handle.clone();
        let clear = handle;
        Some(SyncRule {
            set: rx,
            mark_degraded: Arc::new(move |lsn: Lsn| -> Recorded {
                let h = mark.clone();
                Box::pin(async move {
                    let cmd = ClusterCommand::MarkDegraded {
                        epoch: Epoch(epoch),
                        from_lsn: lsn,
                        now_ms: now_ms(),
                    };
                    match h.propose(cmd).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(rejected)) => Err(rejected.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                })
            }),
            clear_degraded: Arc::new(move || -> Recorded {
                let h = clear.clone();
                Box::pin(async move {
                    match h
                        .propose(ClusterCommand::ClearDegraded {
                            epoch: Epoch(epoch),
                        })
                        .await
                    {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(rejected)) => Err(rejected.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                })
            }),
        })
    }
}

impl RoleControl for NodeRole {
    async fn become_primary(&self, epoch: Epoch, first_lsn: Lsn) -> Result<(), RoleError> {
        let node = &self.node;
        let _t = node.transition().await;
        if node.primary_epoch() == Some(epoch.0) {
            return Ok(());
        }
        node.stop_side().await;
        let engine = node.engine().get();
        // Refused until the driver confirms the lease.
        engine.set_lease_until(Some(0));
        let (_, current) = engine.position();
        if current < epoch.0 {
            let (_, first) = engine.promote(epoch.0).await.map_err(Self::failed)?;
            if first != first_lsn.0 {
                tracing::info!(
                    epoch = epoch.0,
                    planned_first_lsn = first_lsn.0,
                    first_lsn = first,
                    "promoted with every entry this node holds (it received more than it had reported)"
                );
            }
        } else if current == epoch.0 {
            // Primary of this epoch before a restart: keep what it wrote.
            engine.set_role(Role::Primary).await.map_err(Self::failed)?;
        } else {
            return Err(RoleError::Failed(format!(
                "this node's journal is at epoch {current}, newer than {}",
                epoch.0
            )));
        }
        let rule = if node.section().commit_policy.mirrors_needed() > 0 {
            self.sync_rule(epoch.0)
        } else {
            None
        };
        node.start_primary(epoch.0, rule).map_err(Self::failed)?;
        tracing::warn!(node = %node.section().node_id, epoch = epoch.0, "this node is now the PRIMARY");
        Ok(())
    }

    async fn become_mirror(
        &self,
        primary: &NodeId,
        member: &Member,
        epoch: Epoch,
    ) -> Result<(), RoleError> {
        let node = &self.node;
        let _t = node.transition().await;
        if node.following().as_deref() == Some(primary.0.as_str()) {
            return Ok(());
        }
        let engine = node.engine().get();
        engine.set_lease_until(Some(0));
        engine
            .set_role(Role::Mirror {
                primary_http: Some(member.http_addr.clone()),
            })
            .await
            .map_err(Self::failed)?;
        node.stop_side().await;
        node.start_mirror(primary.0.clone(), member.raft_addr.clone(), epoch.0);
        Ok(())
    }

    fn lease_valid_until(&self, epoch: Epoch, until_ms: u64) {
        let engine = self.node.engine().get();
        if engine.position().1 == epoch.0 {
            engine.set_lease_until(Some(until_ms));
        }
    }

    async fn fence_writes(&self, _epoch: Epoch) -> Result<Lsn, RoleError> {
        let engine = self.node.engine().get();
        engine.hold_writes().await.map(Lsn).map_err(Self::failed)
    }

    async fn unfence_writes(&self, _epoch: Epoch) -> Result<(), RoleError> {
        let engine = self.node.engine().get();
        engine
            .release_writes()
            .await
            .map(|_| ())
            .map_err(Self::failed)
    }

    async fn position(&self) -> Result<Position, RoleError> {
        let engine = self.node.engine().get();
        let (flushed, epoch) = engine.position();
        Ok(Position {
            epoch: Epoch(epoch),
            flushed_lsn: Lsn(flushed),
            applied_lsn: Lsn(engine.status().applied_lsn),
        })
    }
}

/// The lease as `GET /v1/cluster` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LeaseView {
    pub holder: String,
    pub epoch: u64,
    /// Milliseconds until it lapses (negative: lapsed that long ago), on
    /// this node's clock.
    pub expires_in_ms: i64,
}

/// A member as the control plane knows it.
#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    pub id: String,
    pub role: &'static str,
    pub http: String,
    pub addr: String,
    pub nofailover: bool,
    /// From the controller's last report (on the Raft leader only).
    pub epoch: Option<u64>,
    pub flushed_lsn: Option<u64>,
    pub applied_lsn: Option<u64>,
    pub reachable: Option<bool>,
    /// Entries behind the primary's last reported LSN.
    pub lag_lsn: Option<u64>,
}

/// The last failover as `GET /v1/cluster` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverRecord {
    pub from: Option<String>,
    pub to: String,
    pub epoch: u64,
    /// When the promotion was proposed (ms since the Unix epoch).
    pub at_ms: u64,
    /// From the old lease's expiry (or release, in a switchover) to the
    /// promotion: the controller's share of the outage.
    pub duration_ms: u64,
}

/// The control plane's part of `GET /v1/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverView {
    pub raft_leader: Option<String>,
    pub raft_term: u64,
    pub controller: String,
    pub epoch: u64,
    pub epoch_history: Vec<(u64, u64)>,
    pub commit_policy: String,
    pub lease: Option<LeaseView>,
    pub sync_set: Vec<String>,
    pub degraded_from_lsn: Option<u64>,
    pub switchover: Option<String>,
    pub last_failover: Option<FailoverRecord>,
    pub members: Vec<MemberView>,
}

struct FInner {
    me: NodeId,
    raft: Raft,
    transport: Arc<QuicTransport>,
    handle: DriverHandle,
    state: watch::Receiver<ClusterState>,
    shutdown: watch::Sender<bool>,
    last_sync_proposal: Mutex<Option<Instant>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    timing: Timing,
}

/// The running control plane of a node (cheap to clone).
#[derive(Clone)]
pub struct Failover {
    inner: Arc<FInner>,
}

impl std::fmt::Debug for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("me", &self.inner.me)
            .finish_non_exhaustive()
    }
}

/// The configured members as the cluster state records them.
pub fn configured_members(section: &super::ClusterSection) -> BTreeMap<NodeId, Member> {
    section
        .members
        .iter()
        .map(|m| {
            (
                NodeId(m.id.clone()),
                Member {
                    role: match m.role {
                        super::config::MemberRole::Data => MemberKind::Data,
                        super::config::MemberRole::Witness => MemberKind::Witness,
                    },
                    raft_addr: m.addr.clone(),
                    http_addr: m.http.clone(),
                    nofailover: m.nofailover,
                },
            )
        })
        .collect()
}

/// What the RPC server and the driver are started from.
struct DriverParts {
    me: NodeId,
    timing: Timing,
    raft: Raft,
    transport: Arc<QuicTransport>,
    states: watch::Receiver<ClusterState>,
    incoming: mpsc::Receiver<PeerConnection>,
    shutdown: watch::Receiver<bool>,
}

fn spawn_driver<R: RoleControl>(
    parts: DriverParts,
    role: Arc<R>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> DriverHandle {
    let DriverParts {
        me,
        timing,
        raft,
        transport,
        states,
        incoming,
        shutdown,
    } = parts;
    let id = raft_id(&me);
    let handler = RpcHandler::new(raft.clone(), id, role.clone());
    let server = QuicServer::new(me.clone(), Arc::new(handler))
        .with_admission(raft_membership(raft.clone()));
    tasks.push(tokio::spawn(server.run(incoming)));
    let (driver, handle) = Driver::new(me, timing, raft, transport, role, states, system_clock());
    tasks.push(tokio::spawn(driver.run(shutdown)));
    handle
}

impl Failover {
    /// Opens the Raft store, starts Raft, the RPC server and the driver,
    /// and (on the lowest-named configured member of a new cluster) forms
    /// the cluster.
    pub async fn start(
        node: ClusterNode,
        incoming: mpsc::Receiver<PeerConnection>,
    ) -> Result<Failover, ClusterError> {
        let section = node.section().clone();
        let me = NodeId(section.node_id.clone());
        let id = raft_id(&me);
        let timing = section.timing;
        let dir = node
            .engine()
            .get()
            .config()
            .data_dir
            .join(super::sink::RAFT_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ClusterError::Raft(format!("{}: {e}", dir.display())))?;
        let (log, sm) = store::open(&dir).map_err(|e| ClusterError::Raft(e.to_string()))?;
        let states = sm.subscribe();
        let config = timing
            .raft_config()
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let transport = Arc::new(QuicTransport::new(node.endpoint().clone()));
        let raft = Raft::new(
            id,
            Arc::new(config),
            NetworkFactory::new(transport.clone()),
            log,
            sm,
        )
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let parts = DriverParts {
            me: me.clone(),
            timing,
            raft: raft.clone(),
            transport: transport.clone(),
            states: states.clone(),
            incoming,
            shutdown: shutdown_rx,
        };
        let handle = if section.is_witness() {
            spawn_driver(parts, Arc::new(NoData), &mut tasks)
        } else {
            let role = Arc::new(NodeRole {
                node: node.clone(),
                handle: OnceLock::new(),
                state: states.clone(),
            });
            let handle = spawn_driver(parts, role.clone(), &mut tasks);
            let _ = role.handle.set(handle.clone());
            handle
        };
        let members = configured_members(&section);
        let founder = section.members.iter().map(|m| m.id.as_str()).min() == Some(me.0.as_str());
        let fresh = states.borrow().members.is_empty();
        if founder && fresh && !section.join {
            let (raft, transport) = (raft.clone(), transport.clone());
            let policy = section.state_policy();
            tasks.push(tokio::spawn(async move {
                form_cluster(raft, id, transport, members, policy).await;
            }));
        }
        if section.join && fresh {
            let own = configured_members(&section).remove(&me);
            if let Some(own) = own {
                tasks.push(tokio::spawn(ask_to_join(
                    node.clone(),
                    me.clone(),
                    own,
                    states.clone(),
                )));
            }
        }
        tracing::info!(node = %me, raft_id = id, witness = section.is_witness(), "failover control plane started");
        Ok(Failover {
            inner: Arc::new(FInner {
                me,
                raft,
                transport,
                handle,
                state: states,
                shutdown,
                last_sync_proposal: Mutex::new(None),
                tasks: Mutex::new(tasks),
                timing,
            }),
        })
    }

    /// The applied cluster state.
    pub fn state(&self) -> ClusterState {
        self.inner.state.borrow().clone()
    }

    /// Waits until the applied state shows a switchover to `target` (or
    /// `target` already primary); false after `timeout`. The controller
    /// accepts a switchover when it proposes it: a leader that loses
    /// leadership before the proposal commits loses the switchover too.
    pub async fn switchover_recorded(&self, target: &NodeId, timeout: Duration) -> bool {
        let mut rx = self.inner.state.clone();
        let recorded = rx.wait_for(|st| {
            st.primary.as_ref() == Some(target)
                || st.switchover.as_ref().is_some_and(|s| &s.to == target)
        });
        matches!(tokio::time::timeout(timeout, recorded).await, Ok(Ok(_)))
    }

    /// The driver's handle (switchover, proposals).
    pub fn handle(&self) -> &DriverHandle {
        &self.inner.handle
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The transport to other members.
    pub fn transport(&self) -> &Arc<QuicTransport> {
        &self.inner.transport
    }

    /// Adds a member (on the Raft leader only): learner, voter once caught
    /// up, then recorded in the cluster state.
    pub async fn add_member(
        &self,
        name: &NodeId,
        member: &Member,
    ) -> Result<(), membership::MembershipError> {
        membership::add_member(
            &self.inner.raft,
            self.raft_id(),
            self.inner.transport.as_ref(),
            name,
            member,
            MEMBERSHIP_TIMEOUT,
        )
        .await
    }

    /// Removes a member (on the Raft leader only; never the primary).
    pub async fn remove_member(&self, name: &NodeId) -> Result<(), membership::MembershipError> {
        membership::remove_member(
            &self.inner.raft,
            self.raft_id(),
            self.inner.transport.as_ref(),
            name,
            MEMBERSHIP_TIMEOUT,
        )
        .await
    }

    /// Control-plane timings.
    pub fn timing(&self) -> Timing {
        self.inner.timing
    }

    /// This node's raft id.
    pub fn raft_id(&self) -> u64 {
        raft_id(&self.inner.me)
    }

    /// The Raft leader's member name and HTTP address, if known.
    pub fn leader(&self) -> Option<(String, Option<String>)> {
        let leader = self.inner.raft.metrics().borrow().current_leader?;
        let st = self.state();
        let name = st
            .members
            .keys()
            .find(|n| raft_id(n) == leader)
            .cloned()
            .or_else(|| {
                self.inner
                    .raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .get_node(&leader)
                    .map(|n| n.name.clone())
            })?;
        let http = st.members.get(&name).map(|m| m.http_addr.clone());
        Some((name.0, http))
    }

    /// Whether this node leads Raft.
    pub fn is_leader(&self) -> bool {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        m.current_leader == Some(m.id)
    }

    /// What `GET /v1/cluster` shows of the control plane.
    pub fn view(&self) -> FailoverView {
        let st = self.state();
        let metrics = self.inner.raft.metrics().borrow().clone();
        let reports = self.inner.handle.reports().borrow().clone();
        let now = now_ms();
        let primary_lsn = st
            .primary
            .as_ref()
            .and_then(|p| reports.get(p))
            .map(|r| r.flushed_lsn.0);
        let members = st
            .members
            .iter()
            .map(|(n, m)| {
                let r = reports.get(n);
                MemberView {
                    id: n.0.clone(),
                    role: match m.role {
                        MemberKind::Witness => "witness",
                        _ if st.primary.as_ref() == Some(n) => "primary",
                        _ => "mirror",
                    },
                    http: m.http_addr.clone(),
                    addr: m.raft_addr.clone(),
                    nofailover: m.nofailover,
                    epoch: r.map(|r| r.epoch.0),
                    flushed_lsn: r.map(|r| r.flushed_lsn.0),
                    applied_lsn: r.map(|r| r.applied_lsn.0),
                    reachable: r.map(|r| r.reachable),
                    lag_lsn: match (primary_lsn, r) {
                        (Some(p), Some(r)) => Some(p.saturating_sub(r.flushed_lsn.0)),
                        _ => None,
                    },
                }
            })
            .collect();
        FailoverView {
            raft_leader: self.leader().map(|(n, _)| n),
            raft_term: metrics.current_term,
            controller: format!("{:?}", *self.inner.handle.status().borrow()),
            epoch: st.epoch.0,
            epoch_history: st.epoch_history.iter().map(|(e, l)| (e.0, l.0)).collect(),
            commit_policy: format!("{:?}", st.commit_policy),
            lease: st.lease.as_ref().map(|l| LeaseView {
                holder: l.holder.0.clone(),
                epoch: l.epoch.0,
                expires_in_ms: i64::try_from(l.expires_at_ms).unwrap_or(i64::MAX)
                    - i64::try_from(now).unwrap_or(i64::MAX),
            }),
            sync_set: st.sync_set.iter().map(|n| n.0.clone()).collect(),
            degraded_from_lsn: st.degraded.as_ref().map(|d| d.from_lsn.0),
            switchover: st
                .switchover
                .as_ref()
                .map(|s| format!("{} -> {} (epoch {})", s.from, s.to, s.epoch.0)),
            last_failover: st.last_failover.as_ref().map(|f| FailoverRecord {
                from: f.from.as_ref().map(|n| n.0.clone()),
                to: f.to.0.clone(),
                epoch: f.epoch.0,
                at_ms: f.at_ms,
                duration_ms: f.duration_ms,
            }),
            members,
        }
    }

    /// Called by the node's watch task: on a primary with a quorum policy,
    /// keeps the sync set recorded in the cluster state to `k` connected
    /// mirrors, each holding every write acknowledged so far. A member
    /// leaves the set only for a replacement that qualifies, so the set
    /// always covers every acknowledged write.
    pub(crate) async fn on_watch_tick(
        &self,
        tracker: Option<&AckTracker>,
        gate: Option<&CommitGate>,
    ) {
        let (Some(tracker), Some(gate)) = (tracker, gate) else {
            return;
        };
        let k = gate.policy().0.mirrors_needed();
        if k == 0 {
            return;
        }
        let st = self.state();
        if st.primary.as_ref() != Some(&self.inner.me) {
            return;
        }
        let acked = gate.acked_lsn();
        let connected = |n: &NodeId| tracker.progress(n).is_some_and(|p| p.connected);
        let mut next: BTreeSet<NodeId> = st
            .sync_set
            .iter()
            .filter(|n| connected(n))
            .take(k)
            .cloned()
            .collect();
        let mut candidates: Vec<(Lsn, NodeId)> = gate
            .mirrors()
            .iter()
            .filter(|n| !next.contains(*n) && st.members.contains_key(*n))
            .filter_map(|n| {
                let p = tracker.progress(n)?;
                (p.connected && p.flushed_lsn >= acked).then(|| (p.flushed_lsn, n.clone()))
            })
            .collect();
        candidates.sort_by(|a, b| b.cmp(a));
        for (_, n) in candidates {
            if next.len() >= k {
                break;
            }
            next.insert(n);
        }
        // Never drop a member without a full replacement: writes wait (or
        // degrade, recorded) instead.
        if next == st.sync_set || next.len() < k.min(gate.mirrors().len()) {
            return;
        }
        {
            let mut last = self
                .inner
                .last_sync_proposal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < SYNC_PROPOSAL_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let cmd = ClusterCommand::SetSyncSet {
            epoch: st.epoch,
            nodes: next.clone(),
        };
        match self.inner.handle.propose(cmd).await {
            Ok(Ok(_)) => {
                tracing::info!(sync_set = ?next, "sync set recorded");
            }
            Ok(Err(r)) => tracing::warn!(rejected = %r, "sync set refused"),
            Err(e) => tracing::warn!(error = %e, "sync set not recorded"),
        }
    }

    /// Graceful stop: a primary gives its lease up first, so a successor is
    /// promoted at once; a Raft leader hands leadership over, so the others
    /// need no election; then the driver and Raft stop.
    pub async fn stop(&self) {
        let _ = tokio::time::timeout(STEP_DOWN_WAIT, self.inner.handle.step_down()).await;
        let _ = tokio::time::timeout(STEP_DOWN_WAIT, self.inner.handle.yield_leadership()).await;
        self.inner.shutdown.send_replace(true);
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
    }
}

/// Forms the cluster from the configured members, retrying until a
/// majority answers.
/// How long adding or removing a member may take on the leader (a new
/// learner must catch up with the control-plane log first).
pub const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);

/// A node started with `join = true`: asks the configured members (any of
/// them forwards to the Raft leader) to add it, until its own state lists
/// it as a member.
async fn ask_to_join(
    node: ClusterNode,
    me: NodeId,
    own: Member,
    mut states: watch::Receiver<ClusterState>,
) {
    let body = serde_json::json!({
        "id": me.0,
        "addr": own.raft_addr,
        "http": own.http_addr,
        "role": match own.role { MemberKind::Witness => "witness", _ => "data" },
        "nofailover": own.nofailover,
    });
    let token = node
        .tokens()
        .iter()
        .find(|t| t.role == crate::config::Role::Admin)
        .map(|t| t.token.clone());
    let client = match super::http_client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(node = %me, error = %e, "cannot ask to join: add this node with POST /v1/cluster/members");
            return;
        }
    };
    let peers: Vec<String> = node
        .section()
        .members
        .iter()
        .filter(|m| m.id != me.0)
        .map(|m| m.http.trim_end_matches('/').to_owned())
        .collect();
    let mut attempt = 0usize;
    loop {
        if states.borrow().members.contains_key(&me) {
            tracing::info!(node = %me, "added to the cluster");
            return;
        }
        if let Some(peer) = peers.get(attempt % peers.len().max(1)) {
            let mut req = client
                .post(format!("{peer}/v1/cluster/members"))
                .timeout(MEMBERSHIP_TIMEOUT + Duration::from_secs(10))
                .json(&body);
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(node = %me, via = %peer, "the cluster accepted this node");
                }
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    tracing::warn!(node = %me, via = %peer, %status, answer = %text, "join refused; retrying");
                }
                Err(e) => {
                    tracing::warn!(node = %me, via = %peer, error = %e, "cannot ask to join; retrying")
                }
            }
        }
        attempt += 1;
        // Wake early when the state lists this node.
        let _ = tokio::time::timeout(Duration::from_secs(2), states.changed()).await;
    }
}

async fn form_cluster(
    raft: Raft,
    id: u64,
    transport: Arc<QuicTransport>,
    members: BTreeMap<NodeId, Member>,
    policy: mirrordb_failover::state::CommitPolicy,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        match membership::bootstrap(&raft, id, &*transport, &members, BOOTSTRAP_ATTEMPT).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "forming the cluster; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    loop {
        let cmd = ClusterCommand::SetCommitPolicy { policy };
        match tokio::time::timeout(
            BOOTSTRAP_ATTEMPT,
            mirrordb_failover::raft::network::propose(
                &raft,
                id,
                &*transport,
                cmd,
                BOOTSTRAP_ATTEMPT,
            ),
        )
        .await
        {
            Ok(Ok(_)) => break,
            Ok(Err(e)) => tracing::warn!(error = %e, "recording the commit policy; retrying"),
            Err(_) => tracing::warn!("recording the commit policy timed out; retrying"),
        }
        tokio::time::sleep(delay).await;
    }
    tracing::info!(members = members.len(), "cluster formed");
}
