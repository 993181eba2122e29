//! [`ClusterNode`]: what a node with a `[cluster]` section runs beside its
//! HTTP API.
//!
//! ```text
//! start: load certs ─► bind NodeEndpoint (members only) ─┬─ primary: serve_replication(EngineSource)
//!                                                        │           + CommitGate + recovery check
//!                                                        └─ mirror:  run_mirror(EngineSink) towards
//!                                                                    the configured primary
//! watch task (every WATCH_INTERVAL): log connection changes with the peer's
//! node id, publish lag gauges, leave degraded mode when mirrors caught up
//! stop: stop the mirror loop, close the endpoint, end the tasks
//! ```

use super::SharedEngine;
use super::config::ClusterSection;
use super::policy::CommitGate;
use super::sink::EngineSink;
use super::source::EngineSource;
use crate::config::{Config, TokenConfig};
use crate::engine::{Engine, Role};
use mirrordb_replication::certs::{CertError, NodeIdentity};
use mirrordb_replication::driver::{
    MirrorOptions, MirrorStatus, PrimaryAddr, run_mirror, serve_replication,
};
use mirrordb_replication::endpoint::{
    CLOSE_REFUSED, EndpointError, EndpointOptions, PeerConnection,
};
use mirrordb_replication::protocol::PrimaryConfig;
use mirrordb_replication::{AckTracker, Lsn, NodeEndpoint, NodeId};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How often connection states are compared, gauges published and the
/// degraded mode re-checked.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Sets the per-mirror lag gauges from the tracker. Called by the watch task
/// and again whenever `/metrics` is scraped, so a scrape never misses a
/// mirror that connected since the last watch tick.
pub fn publish_lag_gauges(tracker: &AckTracker, now: Instant) {
    for l in tracker.lag(now) {
        let labels = [("mirror", l.node.to_string())];
        metrics::gauge!("mirrordb_replication_connected", &labels).set(if l.connected {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("mirrordb_replication_flush_lag_entries", &labels)
            .set(l.flush_lag_lsn as f64);
        metrics::gauge!("mirrordb_replication_apply_lag_entries", &labels)
            .set(l.apply_lag_lsn as f64);
        metrics::gauge!("mirrordb_replication_flush_lag_seconds", &labels)
            .set(l.flush_lag.as_secs_f64());
        metrics::gauge!("mirrordb_replication_apply_lag_seconds", &labels)
            .set(l.apply_lag.as_secs_f64());
    }
}
/// How long a read with `min_lsn` waits by default for the mirror to apply it.
pub const DEFAULT_READ_WAIT: Duration = Duration::from_secs(5);
/// Longest `wait_ms` a read may ask for.
pub const MAX_READ_WAIT: Duration = Duration::from_secs(60);
/// How long stopping waits for the mirror loop to finish its step.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why the cluster side of a node could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error("cluster certificates: {0}")]
    Cert(#[from] CertError),
    #[error("cluster endpoint: {0}")]
    Endpoint(#[from] EndpointError),
    #[error("cannot resolve {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("commit policy state: {0}")]
    Gate(String),
    #[error("the node has no [cluster] section")]
    NotConfigured,
    #[error("failover control plane: {0}")]
    Raft(String),
}

pub(crate) async fn resolve(addr: &str) -> Result<SocketAddr, ClusterError> {
    let err = |reason: String| ClusterError::Resolve {
        addr: addr.to_owned(),
        reason,
    };
    let mut it = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| err(e.to_string()))?;
    it.next().ok_or_else(|| err("no address".into()))
}

/// What the node does in its cluster right now. Changed only by
/// [`ClusterNode::serve_as_primary`] and [`ClusterNode::follow`] (or at
/// start in a fixed-primary cluster).
enum Side {
    /// No role yet (failover: before the control plane names one), or a
    /// witness. Writes are refused, reads served.
    Idle,
    Primary {
        epoch: u64,
        tracker: Arc<AckTracker>,
        gate: Arc<CommitGate>,
        shutdown: watch::Sender<bool>,
    },
    Mirror {
        primary: String,
        status: watch::Receiver<MirrorStatus>,
        stop: watch::Sender<bool>,
        task: Option<JoinHandle<()>>,
        resolver: JoinHandle<()>,
    },
}

struct Inner {
    section: ClusterSection,
    tokens: Vec<TokenConfig>,
    engine: SharedEngine,
    endpoint: NodeEndpoint,
    quic_addr: SocketAddr,
    side: Mutex<Side>,
    /// Serialises role changes.
    transition: tokio::sync::Mutex<()>,
    /// Where accepted replication subscriptions go while this node is
    /// primary (`None`: refused).
    route: Mutex<Option<mpsc::Sender<PeerConnection>>>,
    /// The failover control plane, when `cluster.failover` is on.
    failover: std::sync::OnceLock<super::control::Failover>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The cluster side of a running node (cheap to clone).
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("node", &self.inner.section.node_id)
            .finish_non_exhaustive()
    }
}

/// One mirror as the primary sees it.
#[derive(Clone, Debug, Serialize)]
pub struct MirrorView {
    pub node: String,
    pub connected: bool,
    pub flushed_lsn: u64,
    pub applied_lsn: u64,
    pub write_lag_lsn: u64,
    pub flush_lag_lsn: u64,
    pub apply_lag_lsn: u64,
    pub write_lag_ms: u64,
    pub flush_lag_ms: u64,
    pub apply_lag_ms: u64,
}

/// This node following its primary.
#[derive(Clone, Debug, Serialize)]
pub struct FollowView {
    pub primary: Option<String>,
    pub streaming: bool,
    pub flushed_lsn: u64,
    pub applied_lsn: u64,
    pub primary_last_lsn: u64,
    pub highest_epoch: u64,
    /// `None` if it never caught up since start.
    pub lag_ms: Option<u64>,
}

/// `GET /v1/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub node: String,
    /// `primary`, `mirror`, `witness` or `starting`.
    pub role: &'static str,
    pub epoch: u64,
    pub last_lsn: u64,
    pub applied_lsn: u64,
    pub primary: Option<String>,
    pub primary_http: Option<String>,
    pub replication_addr: String,
    pub members: Vec<super::MemberConfig>,
    pub commit_policy: Option<String>,
    pub on_unavailable: Option<String>,
    pub commit_degraded: bool,
    pub degraded_intervals: Vec<super::policy::DegradedInterval>,
    pub mirrors: Vec<MirrorView>,
    pub following: Option<FollowView>,
    /// The control plane's view (`None` with `failover = false`).
    pub failover: Option<super::control::FailoverView>,
}

/// The role a node with this section opens its engine with: the fixed
/// primary takes writes; everyone else refuses them until told otherwise.
pub fn role_at_start(c: &ClusterSection) -> Role {
    if c.is_primary() {
        Role::Primary
    } else {
        Role::Mirror {
            primary_http: c
                .primary
                .as_deref()
                .and_then(|p| c.member(p))
                .map(|m| m.http.clone()),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ClusterNode {
    /// Starts the cluster side of the node for `engine`, which must have
    /// been opened with [`role_at_start`]'s role.
    pub async fn start(cfg: &Config, engine: Engine) -> Result<ClusterNode, ClusterError> {
        let section = cfg.cluster.clone().ok_or(ClusterError::NotConfigured)?;
        let me = NodeId(section.node_id.clone());
        let identity = NodeIdentity::load(&section.certs_dir, &me)?;
        let own = section.me().ok_or(ClusterError::NotConfigured)?.clone();
        let bind = match &section.listen {
            Some(l) => resolve(l).await?,
            None => resolve(&own.addr).await?,
        };
        // With failover, members join at run time: any peer certified by
        // the cluster CA may connect, and Raft admits only its members.
        let members: Option<Vec<NodeId>> = (!section.failover).then(|| {
            section
                .members
                .iter()
                .map(|m| NodeId(m.id.clone()))
                .collect()
        });
        let (endpoint, incoming) =
            NodeEndpoint::bind(&identity, bind, EndpointOptions { members })?;
        let quic_addr = endpoint.local_addr().unwrap_or(bind);
        let shared = SharedEngine::new(engine.clone());
        let node = ClusterNode {
            inner: Arc::new(Inner {
                section: section.clone(),
                tokens: cfg.api.tokens.clone(),
                engine: shared,
                endpoint,
                quic_addr,
                side: Mutex::new(Side::Idle),
                transition: tokio::sync::Mutex::new(()),
                route: Mutex::new(None),
                failover: std::sync::OnceLock::new(),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        // Replication subscriptions go to the current primary side.
        let router = node.clone();
        let mut repl = incoming.replication;
        node.tasks().push(tokio::spawn(async move {
            while let Some(pc) = repl.recv().await {
                let to = router.route().clone();
                match to {
                    Some(tx) => {
                        if let Err(e) = tx.try_send(pc) {
                            let pc = match e {
                                mpsc::error::TrySendError::Full(pc)
                                | mpsc::error::TrySendError::Closed(pc) => pc,
                            };
                            pc.connection.close(CLOSE_REFUSED.into(), b"busy");
                        }
                    }
                    None => {
                        tracing::debug!(peer = %pc.node, "refusing a replication subscription: not the primary");
                        pc.connection.close(CLOSE_REFUSED.into(), b"not the primary");
                    }
                }
            }
        }));
        if section.failover {
            let f = super::control::Failover::start(node.clone(), incoming.raft).await?;
            let _ = node.inner.failover.set(f);
        } else {
            // A fixed primary: refuse Raft peers, take the configured role.
            let mut raft = incoming.raft;
            node.tasks().push(tokio::spawn(async move {
                while let Some(pc) = raft.recv().await {
                    pc.connection
                        .close(CLOSE_REFUSED.into(), b"failover is off on this node");
                }
            }));
            let _t = node.inner.transition.lock().await;
            if section.is_primary() {
                node.start_primary(engine.position().1, None)?;
            } else if let Some(p) = section.primary.as_deref().and_then(|p| section.member(p)) {
                node.start_mirror(p.id.clone(), p.addr.clone(), 0);
            }
        }
        let watcher = node.clone();
        let w = tokio::spawn(async move { watcher.watch().await });
        node.tasks().push(w);
        Ok(node)
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn side(&self) -> std::sync::MutexGuard<'_, Side> {
        self.inner
            .side
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn route(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<PeerConnection>>> {
        self.inner
            .route
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts serving replication as primary of `epoch` (transition lock
    /// held by the caller; the side is `Idle`).
    pub(crate) fn start_primary(
        &self,
        epoch: u64,
        sync: Option<super::policy::SyncRule>,
    ) -> Result<(), ClusterError> {
        let section = &self.inner.section;
        let engine = self.inner.engine.get();
        let tracker = Arc::new(AckTracker::new());
        tracker.on_ack_lag(Box::new(|mirror, lag| {
            metrics::histogram!(crate::metrics::REPLICATION_ACK_LAG_SECONDS, "mirror" => mirror.0.clone())
                .record(lag.as_secs_f64());
        }));
        let mirrors: Vec<NodeId> = section.data_peers().map(|m| NodeId(m.id.clone())).collect();
        let mut gate = CommitGate::new(
            tracker.clone(),
            mirrors,
            section.commit_policy,
            section.on_unavailable,
            section.quorum_timeout.0,
            section.degrade_after.0,
            &engine.config().data_dir,
        )
        .map_err(ClusterError::Gate)?;
        if let Some(rule) = sync {
            gate = gate.with_sync_rule(rule);
        }
        let source = Arc::new(EngineSource::new(self.inner.engine.clone()));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(serve_replication(
            rx,
            source,
            tracker.clone(),
            PrimaryConfig::default(),
            shutdown_rx,
        ));
        self.tasks().push(task);
        *self.route() = Some(tx);
        tracing::info!(node = %section.node_id, epoch, addr = %self.inner.quic_addr, policy = %section.commit_policy, on_unavailable = %section.on_unavailable, "serving replication as primary");
        *self.side() = Side::Primary {
            epoch,
            tracker,
            gate: Arc::new(gate),
            shutdown,
        };
        Ok(())
    }

    /// Starts following `primary` at `addr` (transition lock held by the
    /// caller; the side is `Idle`). Primaries of epochs before
    /// `fence_epoch` are refused.
    pub(crate) fn start_mirror(&self, primary: String, addr: String, fence_epoch: u64) {
        let (ptx, prx) = watch::channel(None);
        let target = NodeId(primary.clone());
        let resolver = tokio::spawn(async move {
            // Resolve (and keep trying: a name may not exist yet).
            let mut delay = Duration::from_millis(100);
            loop {
                match resolve(&addr).await {
                    Ok(addr) => {
                        ptx.send_replace(Some(PrimaryAddr {
                            node: target.clone(),
                            addr,
                        }));
                        // Hold the sender: dropping it stops the mirror.
                        ptx.closed().await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot resolve the primary yet");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        let (stop, stop_rx) = watch::channel(false);
        let (status_tx, status) = watch::channel(MirrorStatus::default());
        let sink = EngineSink::new(self.inner.engine.clone());
        let ep = self.inner.endpoint.clone();
        let mut opts = MirrorOptions {
            fence_epoch: mirrordb_replication::Epoch(fence_epoch),
            ..MirrorOptions::default()
        };
        if self.inner.section.failover {
            // A new primary is up within seconds: look for it often.
            opts.backoff_max = Duration::from_millis(500);
        }
        let task = tokio::spawn(async move {
            match run_mirror(ep, sink, prx, stop_rx, opts, status_tx).await {
                Ok(_) => tracing::info!("replication stopped"),
                Err(e) => {
                    tracing::error!(error = %e, "replication stopped: the mirror's journal failed; this node no longer follows its primary")
                }
            }
        });
        tracing::info!(node = %self.inner.section.node_id, addr = %self.inner.quic_addr, primary = %primary, "following the primary as a mirror");
        *self.side() = Side::Mirror {
            primary,
            status,
            stop,
            task: Some(task),
            resolver,
        };
    }

    /// Stops whatever the node does (transition lock held by the caller);
    /// it is `Idle` afterwards.
    pub(crate) async fn stop_side(&self) {
        let old = std::mem::replace(&mut *self.side(), Side::Idle);
        match old {
            Side::Idle => {}
            Side::Primary { shutdown, .. } => {
                *self.route() = None;
                shutdown.send_replace(true);
            }
            Side::Mirror {
                stop,
                task,
                resolver,
                ..
            } => {
                stop.send_replace(true);
                if let Some(t) = task {
                    let abort = t.abort_handle();
                    if tokio::time::timeout(STOP_GRACE, t).await.is_err() {
                        tracing::warn!("replication did not stop in time; abandoning it");
                        abort.abort();
                    }
                }
                resolver.abort();
            }
        }
    }

    /// Serialises role changes.
    pub(crate) async fn transition(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.transition.lock().await
    }

    /// The epoch this node is primary of, if it is.
    pub(crate) fn primary_epoch(&self) -> Option<u64> {
        match &*self.side() {
            Side::Primary { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    /// The primary this node follows, if it is a mirror.
    pub(crate) fn following(&self) -> Option<String> {
        match &*self.side() {
            Side::Mirror { primary, .. } => Some(primary.clone()),
            _ => None,
        }
    }

    /// The QUIC endpoint (replication and Raft).
    pub(crate) fn endpoint(&self) -> &NodeEndpoint {
        &self.inner.endpoint
    }

    /// The failover control plane, when on.
    pub fn failover(&self) -> Option<&super::control::Failover> {
        self.inner.failover.get()
    }

    /// The engine handle the API must use.
    pub fn engine(&self) -> &SharedEngine {
        &self.inner.engine
    }

    /// The `[cluster]` section.
    pub fn section(&self) -> &ClusterSection {
        &self.inner.section
    }

    /// API tokens (for routes added by the cluster).
    pub fn tokens(&self) -> &[TokenConfig] {
        &self.inner.tokens
    }

    /// The bound QUIC address.
    pub fn replication_addr(&self) -> SocketAddr {
        self.inner.quic_addr
    }

    /// Whether this node serves as primary.
    pub fn is_primary(&self) -> bool {
        matches!(&*self.side(), Side::Primary { .. })
    }

    /// The primary's commit gate.
    pub fn gate(&self) -> Option<Arc<CommitGate>> {
        match &*self.side() {
            Side::Primary { gate, .. } => Some(gate.clone()),
            _ => None,
        }
    }

    /// The primary's per-mirror acknowledgements.
    pub fn tracker(&self) -> Option<Arc<AckTracker>> {
        match &*self.side() {
            Side::Primary { tracker, .. } => Some(tracker.clone()),
            _ => None,
        }
    }

    /// The mirror's replication status.
    pub fn mirror_status(&self) -> Option<MirrorStatus> {
        match &*self.side() {
            Side::Mirror { status, .. } => Some(status.borrow().clone()),
            _ => None,
        }
    }

    /// The primary's id, as far as this node knows.
    pub fn primary_id(&self) -> Option<String> {
        if let Some(f) = self.failover() {
            return f.state().primary.map(|p| p.0);
        }
        self.inner.section.primary.clone()
    }

    /// The primary's HTTP base URL.
    pub fn primary_http(&self) -> Option<String> {
        if let Some(f) = self.failover() {
            let st = f.state();
            return st
                .primary
                .as_ref()
                .and_then(|p| st.members.get(p))
                .map(|m| m.http_addr.clone());
        }
        let s = &self.inner.section;
        s.primary
            .as_deref()
            .and_then(|p| s.member(p))
            .map(|m| m.http.clone())
    }

    /// Waits until the data file has applied `lsn`, up to `deadline`;
    /// answers the applied LSN reached.
    pub async fn wait_applied(&self, lsn: u64, deadline: Instant) -> Result<u64, u64> {
        loop {
            // Re-read the engine each round: a reseed may replace it.
            let engine = self.inner.engine.get();
            let step = deadline.min(Instant::now() + Duration::from_millis(50));
            match engine.wait_applied(lsn, step).await {
                Ok(applied) => return Ok(applied),
                Err(applied) if Instant::now() >= deadline => return Err(applied),
                Err(_) => {}
            }
        }
    }

    /// Everything `GET /v1/cluster` shows.
    pub fn status(&self) -> ClusterStatus {
        let engine = self.inner.engine.get();
        let st = engine.status();
        let s = &self.inner.section;
        let now = Instant::now();
        let mut out = ClusterStatus {
            node: s.node_id.clone(),
            role: match &*self.side() {
                Side::Primary { .. } => "primary",
                Side::Mirror { .. } => "mirror",
                Side::Idle if s.is_witness() => "witness",
                Side::Idle => "starting",
            },
            epoch: st.epoch,
            last_lsn: st.last_lsn,
            applied_lsn: st.applied_lsn,
            primary: self.primary_id(),
            primary_http: self.primary_http(),
            replication_addr: self.inner.quic_addr.to_string(),
            members: s.members.clone(),
            commit_policy: None,
            on_unavailable: None,
            commit_degraded: false,
            degraded_intervals: Vec::new(),
            mirrors: Vec::new(),
            following: None,
            failover: self.failover().map(|f| f.view()),
        };
        let (tracker, gate, mirror) = match &*self.side() {
            Side::Primary { tracker, gate, .. } => {
                (Some(tracker.clone()), Some(gate.clone()), None)
            }
            Side::Mirror { status, .. } => (None, None, Some(status.borrow().clone())),
            Side::Idle => (None, None, None),
        };
        match (tracker, gate, mirror) {
            (Some(tracker), Some(gate), _) => {
                let (p, o) = gate.policy();
                out.commit_policy = Some(p.to_string());
                out.on_unavailable = Some(o.to_string());
                out.commit_degraded = gate.degraded();
                out.degraded_intervals = gate.record().intervals;
                let lag = tracker.lag(now);
                for m in s.data_peers() {
                    let id = NodeId(m.id.clone());
                    let p = tracker.progress(&id);
                    let l = lag.iter().find(|l| l.node == id);
                    let last = st.durable_lsn;
                    let view = match (p, l) {
                        (Some(p), Some(l)) => MirrorView {
                            node: m.id.clone(),
                            connected: l.connected,
                            flushed_lsn: p.flushed_lsn.0,
                            applied_lsn: p.applied_lsn.0,
                            // Entries are written and fsynced in one step
                            // on a mirror: write lag is flush lag.
                            write_lag_lsn: l.flush_lag_lsn,
                            flush_lag_lsn: l.flush_lag_lsn,
                            apply_lag_lsn: l.apply_lag_lsn,
                            write_lag_ms: ms(l.flush_lag),
                            flush_lag_ms: ms(l.flush_lag),
                            apply_lag_ms: ms(l.apply_lag),
                        },
                        _ => MirrorView {
                            node: m.id.clone(),
                            connected: false,
                            flushed_lsn: 0,
                            applied_lsn: 0,
                            write_lag_lsn: last,
                            flush_lag_lsn: last,
                            apply_lag_lsn: last,
                            write_lag_ms: 0,
                            flush_lag_ms: 0,
                            apply_lag_ms: 0,
                        },
                    };
                    out.mirrors.push(view);
                }
            }
            (_, _, Some(m)) => {
                out.following = Some(FollowView {
                    primary: m.primary.as_ref().map(|p| p.to_string()),
                    streaming: m.streaming,
                    flushed_lsn: m.flushed_lsn.0,
                    applied_lsn: m.applied_lsn.0,
                    primary_last_lsn: m.primary_last_lsn.0,
                    highest_epoch: m.highest_epoch.0,
                    lag_ms: m.lag(now).map(ms),
                });
            }
            _ => {}
        }
        out
    }

    async fn watch(self) {
        let mut connected: BTreeMap<String, bool> = BTreeMap::new();
        let mut streaming = false;
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let now = Instant::now();
            let (tracker, gate, mirror) = match &*self.side() {
                Side::Primary { tracker, gate, .. } => {
                    (Some(tracker.clone()), Some(gate.clone()), None)
                }
                Side::Mirror { status, .. } => (None, None, Some(status.borrow().clone())),
                Side::Idle => (None, None, None),
            };
            if let Some(f) = self.failover() {
                f.on_watch_tick(tracker.as_deref(), gate.as_deref()).await;
            }
            match (tracker, gate, mirror) {
                (Some(tracker), Some(gate), _) => {
                    let durable = self.inner.engine.get().status().durable_lsn;
                    gate.check_recovered(Lsn(durable));
                    for l in tracker.lag(now) {
                        let id = l.node.to_string();
                        let was = connected.insert(id.clone(), l.connected);
                        if was != Some(l.connected) {
                            if l.connected {
                                tracing::info!(peer = %id, flushed_lsn = durable.saturating_sub(l.flush_lag_lsn), "mirror connected");
                            } else {
                                tracing::warn!(peer = %id, "mirror disconnected");
                            }
                        }
                    }
                    publish_lag_gauges(&tracker, now);
                }
                (_, _, Some(m)) => {
                    if m.streaming != streaming {
                        streaming = m.streaming;
                        let peer = m
                            .primary
                            .as_ref()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        if streaming {
                            tracing::info!(peer = %peer, flushed_lsn = %m.flushed_lsn, "streaming from the primary");
                        } else {
                            tracing::warn!(peer = %peer, flushed_lsn = %m.flushed_lsn, "lost the primary; reconnecting");
                        }
                    }
                    metrics::gauge!("mirrordb_mirror_streaming").set(if m.streaming {
                        1.0
                    } else {
                        0.0
                    });
                    metrics::gauge!("mirrordb_mirror_applied_lsn").set(m.applied_lsn.0 as f64);
                    metrics::gauge!("mirrordb_mirror_lag_entries")
                        .set(m.primary_last_lsn.0.saturating_sub(m.flushed_lsn.0) as f64);
                    if let Some(lag) = m.lag(now) {
                        metrics::gauge!("mirrordb_mirror_lag_seconds").set(lag.as_secs_f64());
                    }
                }
                _ => {}
            }
        }
    }

    /// Stops the control plane and replication and closes the endpoint.
    /// The engine stays open (the server closes it).
    pub async fn stop(&self) {
        if let Some(f) = self.failover() {
            f.stop().await;
        }
        {
            let _t = self.transition().await;
            self.stop_side().await;
        }
        self.inner.endpoint.close();
        for t in self.tasks().drain(..) {
            t.abort();
        }
    }
}
