//! Commit policies on the primary (DESIGN §7): after the engine made a
//! write durable locally, [`CommitGate::wait`] holds the client's answer
//! until the policy is met.
//!
//! ```text
//! async            ──► answer at once
//! quorum:k         ──► AckTracker::wait_for(k mirrors flushed >= lsn)
//! remote_apply:k   ──► the same, then k mirrors applied >= lsn
//! not met in time  ──► strict:  write_blocked after quorum_timeout (the write
//!                               is durable on the primary and may still replicate)
//!                      degrade: after degrade_after, record durably "degraded
//!                               from LSN L" (state file, fsynced), then answer;
//!                               later writes answer at once until k mirrors
//!                               have caught up again
//! ```
//!
//! The durable record ([`DEGRADE_FILE`] in the data directory) lists every
//! interval in which writes were acknowledged without their mirrors, so the
//! failover controller can keep a mirror that may miss one of them from
//! being promoted.

use super::config::{CommitPolicy, OnUnavailable};
use mirrordb_replication::{AckTracker, Lsn, NodeId};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// File in the data directory recording degraded intervals.
pub const DEGRADE_FILE: &str = "commit-degraded.json";
/// Most intervals kept in the degrade record (the oldest are dropped).
pub const MAX_DEGRADE_INTERVALS: usize = 1000;

/// One interval in which writes were acknowledged without their mirrors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DegradedInterval {
    /// First LSN acknowledged without quorum.
    pub from_lsn: u64,
    /// Last durable LSN when quorum was back (`None`: still degraded).
    pub to_lsn: Option<u64>,
    /// When it started / ended, RFC 3339.
    pub since: String,
    pub until: Option<String>,
    /// The policy that could not be met.
    pub policy: String,
}

/// The durable record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DegradeRecord {
    pub intervals: Vec<DegradedInterval>,
}

impl DegradeRecord {
    /// The open interval, if degraded now.
    pub fn current(&self) -> Option<&DegradedInterval> {
        self.intervals.last().filter(|i| i.to_lsn.is_none())
    }
}

/// Why a write's answer could not be given under the policy.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitError {
    /// `strict`: the mirrors did not confirm in time.
    #[error(
        "write blocked: only {reached} of {needed} mirrors confirmed LSN {lsn} within {waited_ms} ms \
         (commit policy {policy}, strict); the write is durable on the primary and may still reach the mirrors"
    )]
    Blocked {
        lsn: u64,
        needed: usize,
        reached: usize,
        waited_ms: u128,
        policy: CommitPolicy,
    },
    /// The degrade record could not be written: the write is not answered
    /// as committed.
    #[error("cannot record the fall back to async durably: {0}")]
    Record(String),
}

#[derive(Debug)]
struct State {
    policy: CommitPolicy,
    on_unavailable: OnUnavailable,
    record: DegradeRecord,
}

/// The primary's commit gate.
#[derive(Debug)]
pub struct CommitGate {
    tracker: Arc<AckTracker>,
    mirrors: Vec<NodeId>,
    /// With automatic failover: which mirrors count, and how a degrade is
    /// recorded in the cluster state.
    sync: Option<SyncRule>,
    /// Highest LSN acknowledged under the policy (a mirror joining the
    /// sync set must hold it).
    acked: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
    /// Serialises writes of the record file.
    file: Mutex<PathBuf>,
    quorum_timeout: Duration,
    degrade_after: Duration,
    /// The durable LSN at the previous recovery check.
    sampled: Mutex<Option<Lsn>>,
}

/// A future answering whether the cluster state recorded something.
pub type Recorded = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// The quorum rule under automatic failover (DESIGN §8). Only members of
/// the **sync set** recorded in the cluster state count towards `k`, so the
/// controller knows which mirrors hold every acknowledged write; and before
/// the primary acknowledges a write without them (`degrade`) it records
/// that in the cluster state, so the controller stops relying on the set.
#[derive(Clone)]
pub struct SyncRule {
    /// The committed sync set.
    pub set: tokio::sync::watch::Receiver<std::collections::BTreeSet<NodeId>>,
    /// Proposes `MarkDegraded{from_lsn}`; `Ok` once committed.
    pub mark_degraded: Arc<dyn Fn(Lsn) -> Recorded + Send + Sync>,
    /// Proposes `ClearDegraded` (best effort).
    pub clear_degraded: Arc<dyn Fn() -> Recorded + Send + Sync>,
}

impl std::fmt::Debug for SyncRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncRule")
            .field("set", &*self.set.borrow())
            .finish_non_exhaustive()
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn write_record(path: &Path, rec: &DegradeRecord) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads the degrade record of a data directory (empty if none).
pub fn read_record(data_dir: &Path) -> Result<DegradeRecord, String> {
    let path = data_dir.join(DEGRADE_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DegradeRecord::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

impl CommitGate {
    /// A gate for a primary whose mirrors are `mirrors`; the degrade record
    /// lives in `data_dir`.
    pub fn new(
        tracker: Arc<AckTracker>,
        mirrors: Vec<NodeId>,
        policy: CommitPolicy,
        on_unavailable: OnUnavailable,
        quorum_timeout: Duration,
        degrade_after: Duration,
        data_dir: &Path,
    ) -> Result<Self, String> {
        let record = read_record(data_dir)?;
        if let Some(cur) = record.current() {
            tracing::warn!(
                from_lsn = cur.from_lsn,
                "starting degraded: writes are acknowledged without their mirrors until they catch up"
            );
        }
        metrics::gauge!("mirrordb_commit_degraded").set(if record.current().is_some() {
            1.0
        } else {
            0.0
        });
        Ok(CommitGate {
            tracker,
            mirrors,
            sync: None,
            acked: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(State {
                policy,
                on_unavailable,
                record,
            }),
            file: Mutex::new(data_dir.join(DEGRADE_FILE)),
            quorum_timeout,
            degrade_after,
            sampled: Mutex::new(None),
        })
    }

    /// Counts only the sync set's mirrors and records degrades in the
    /// cluster state (automatic failover).
    #[must_use]
    pub fn with_sync_rule(mut self, rule: SyncRule) -> Self {
        self.sync = Some(rule);
        self
    }

    /// Highest LSN acknowledged under a quorum policy so far.
    pub fn acked_lsn(&self) -> Lsn {
        Lsn(self.acked.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The mirrors of this primary.
    pub fn mirrors(&self) -> &[NodeId] {
        &self.mirrors
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The policy in force.
    pub fn policy(&self) -> (CommitPolicy, OnUnavailable) {
        let s = self.lock();
        (s.policy, s.on_unavailable)
    }

    /// Changes the policy at run time (not written to the config file).
    pub fn set_policy(
        &self,
        policy: CommitPolicy,
        on_unavailable: OnUnavailable,
    ) -> Result<(), String> {
        if policy.mirrors_needed() > self.mirrors.len() {
            return Err(format!(
                "commit policy {policy} needs more mirrors than the {} the cluster has",
                self.mirrors.len()
            ));
        }
        let mut s = self.lock();
        tracing::info!(from = %s.policy, to = %policy, on_unavailable = %on_unavailable, "commit policy changed");
        s.policy = policy;
        s.on_unavailable = on_unavailable;
        Ok(())
    }

    /// The degrade record.
    pub fn record(&self) -> DegradeRecord {
        self.lock().record.clone()
    }

    /// Whether the primary acknowledges without its mirrors now.
    pub fn degraded(&self) -> bool {
        self.lock().record.current().is_some()
    }

    fn applied_count(&self, lsn: Lsn) -> usize {
        self.mirrors
            .iter()
            .filter(|m| {
                self.tracker
                    .progress(m)
                    .is_some_and(|p| p.applied_lsn >= lsn)
            })
            .count()
    }

    async fn wait_met(
        &self,
        policy: CommitPolicy,
        lsn: Lsn,
        deadline: Instant,
    ) -> Result<(), usize> {
        let k = policy.mirrors_needed();
        let applied = matches!(policy, CommitPolicy::RemoteApply(_));
        if let Some(rule) = &self.sync {
            let mut set = rule.set.clone();
            let mut changed = self.tracker.subscribe();
            loop {
                changed.borrow_and_update();
                let members = set.borrow_and_update().clone();
                let reached = self.tracker.count_in(&members, lsn, applied);
                if reached >= k {
                    return Ok(());
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return Err(reached) },
                    r = set.changed() => if r.is_err() { return Err(reached) },
                    () = tokio::time::sleep_until(deadline.into()) => return Err(reached),
                }
            }
        }
        let r = if applied {
            self.tracker.wait_for_applied(k, lsn, deadline).await
        } else {
            self.tracker.wait_for(k, lsn, deadline).await
        };
        r.map_err(|t| t.reached)
    }

    fn note_acked(&self, lsn: Lsn) {
        self.acked
            .fetch_max(lsn.0, std::sync::atomic::Ordering::AcqRel);
    }

    /// Waits until the write at `lsn` (durable on the primary) may be
    /// acknowledged under the policy.
    pub async fn wait(&self, lsn: Lsn) -> Result<(), CommitError> {
        let (policy, on_unavailable, degraded) = {
            let s = self.lock();
            (s.policy, s.on_unavailable, s.record.current().is_some())
        };
        if policy.mirrors_needed() == 0 || lsn == Lsn::ZERO {
            return Ok(());
        }
        if degraded && on_unavailable == OnUnavailable::Degrade {
            metrics::counter!("mirrordb_commit_degraded_acks_total").increment(1);
            return Ok(());
        }
        let start = Instant::now();
        let limit = match on_unavailable {
            OnUnavailable::Strict => self.quorum_timeout,
            OnUnavailable::Degrade => self.degrade_after,
        };
        match self.wait_met(policy, lsn, start + limit).await {
            Ok(()) => {
                self.note_acked(lsn);
                Ok(())
            }
            Err(reached) => match on_unavailable {
                OnUnavailable::Strict => {
                    metrics::counter!("mirrordb_commit_blocked_total").increment(1);
                    Err(CommitError::Blocked {
                        lsn: lsn.0,
                        needed: policy.mirrors_needed(),
                        reached,
                        waited_ms: start.elapsed().as_millis(),
                        policy,
                    })
                }
                OnUnavailable::Degrade => {
                    if let Some(rule) = &self.sync
                        && !self.degraded()
                    {
                        // The controller must know before anything is
                        // acknowledged without the sync set.
                        (rule.mark_degraded)(lsn).await.map_err(|e| {
                            CommitError::Record(format!(
                                "cannot record the degrade in the cluster state: {e}"
                            ))
                        })?;
                    }
                    self.degrade(lsn, policy, reached)?;
                    self.note_acked(lsn);
                    metrics::counter!("mirrordb_commit_degraded_acks_total").increment(1);
                    Ok(())
                }
            },
        }
    }

    /// Records durably that writes from `lsn` on are acknowledged without
    /// their mirrors.
    fn degrade(&self, lsn: Lsn, policy: CommitPolicy, reached: usize) -> Result<(), CommitError> {
        let path = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut rec = self.lock().record.clone();
        match rec.intervals.last_mut() {
            Some(cur) if cur.to_lsn.is_none() => {
                if lsn.0 >= cur.from_lsn {
                    return Ok(());
                }
                cur.from_lsn = lsn.0;
            }
            _ => {
                rec.intervals.push(DegradedInterval {
                    from_lsn: lsn.0,
                    to_lsn: None,
                    since: now_rfc3339(),
                    until: None,
                    policy: policy.to_string(),
                });
                if rec.intervals.len() > MAX_DEGRADE_INTERVALS {
                    rec.intervals.remove(0);
                }
            }
        }
        write_record(&path, &rec).map_err(|e| CommitError::Record(e.to_string()))?;
        let was = self.lock().record.current().is_some();
        self.lock().record = rec;
        if !was {
            tracing::error!(
                from_lsn = lsn.0,
                reached,
                needed = policy.mirrors_needed(),
                policy = %policy,
                "commit policy cannot be met: DEGRADED to async; writes are acknowledged on the primary alone (recorded in {})",
                path.display()
            );
        }
        metrics::gauge!("mirrordb_commit_degraded").set(1.0);
        Ok(())
    }

    /// Leaves degraded mode when the policy's mirrors have caught up with
    /// where the primary was at the previous check (under a steady load
    /// they are never exactly at the current end). Called periodically with
    /// the durable LSN; the interval is closed at the current one, a
    /// conservative end: later writes wait for the policy again.
    pub fn check_recovered(&self, durable: Lsn) {
        let target = self
            .sampled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(durable)
            .unwrap_or(durable)
            .min(durable);
        let (policy, degraded) = {
            let s = self.lock();
            (s.policy, s.record.current().is_some())
        };
        if !degraded {
            return;
        }
        let k = policy.mirrors_needed();
        let reached = match &self.sync {
            Some(rule) => {
                let set = rule.set.borrow().clone();
                self.tracker
                    .count_in(&set, target, matches!(policy, CommitPolicy::RemoteApply(_)))
            }
            None if matches!(policy, CommitPolicy::RemoteApply(_)) => self.applied_count(target),
            None => self.tracker.count_flushed(target),
        };
        if reached < k {
            return;
        }
        if let Some(rule) = &self.sync {
            let clear = (rule.clear_degraded)();
            tokio::spawn(async move {
                if let Err(e) = clear.await {
                    tracing::warn!(error = %e, "cannot record the end of the degrade in the cluster state");
                }
            });
        }
        let path = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut rec = self.lock().record.clone();
        if let Some(cur) = rec.intervals.last_mut() {
            cur.to_lsn = Some(durable.0);
            cur.until = Some(now_rfc3339());
        }
        if let Err(e) = write_record(&path, &rec) {
            tracing::warn!(error = %e, "cannot record the end of degraded mode; staying degraded");
            return;
        }
        self.lock().record = rec;
        metrics::gauge!("mirrordb_commit_degraded").set(0.0);
        tracing::warn!(at_lsn = durable.0, policy = %policy, "mirrors caught up: commit policy is met again");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gate(dir: &Path, on: OnUnavailable) -> (Arc<AckTracker>, CommitGate) {
        let tr = Arc::new(AckTracker::new());
        let g = CommitGate::new(
            tr.clone(),
            vec![NodeId::from("n2"), NodeId::from("n3")],
            CommitPolicy::Quorum(1),
            on,
            Duration::from_millis(50),
            Duration::from_millis(50),
            dir,
        )
        .unwrap();
        (tr, g)
    }

    #[tokio::test]
    async fn strict_blocks_and_degrade_records_durably() {
        let t = tempfile::tempdir().unwrap();
        let (tr, g) = gate(t.path(), OnUnavailable::Strict);
        let e = g.wait(Lsn(5)).await.unwrap_err();
        assert!(
            matches!(
                e,
                CommitError::Blocked {
                    reached: 0,
                    needed: 1,
                    ..
                }
            ),
            "{e}"
        );
        tr.record(&NodeId::from("n2"), Lsn(5), Lsn(5), Instant::now());
        g.wait(Lsn(5)).await.unwrap();

        let (tr, g) = gate(t.path(), OnUnavailable::Degrade);
        g.wait(Lsn(7)).await.unwrap();
        assert!(g.degraded());
        let rec = read_record(t.path()).unwrap();
        assert_eq!(rec.current().unwrap().from_lsn, 7);
        // A lower LSN that also timed out moves the start back.
        g.degrade(Lsn(6), CommitPolicy::Quorum(1), 0).unwrap();
        assert_eq!(
            read_record(t.path()).unwrap().current().unwrap().from_lsn,
            6
        );
        // Degraded: answers at once.
        g.wait(Lsn(100)).await.unwrap();
        g.check_recovered(Lsn(100));
        assert!(g.degraded());
        tr.record(&NodeId::from("n3"), Lsn(100), Lsn(100), Instant::now());
        g.check_recovered(Lsn(100));
        assert!(!g.degraded());
        let rec = read_record(t.path()).unwrap();
        assert_eq!(rec.intervals.len(), 1);
        assert_eq!(rec.intervals[0].to_lsn, Some(100));
        // A restart reads the record back.
        let (_, g2) = gate(t.path(), OnUnavailable::Degrade);
        assert!(!g2.degraded());
        assert_eq!(g2.record(), rec);
    }

    #[tokio::test]
    async fn degraded_mode_ends_under_a_steady_load() {
        let t = tempfile::tempdir().unwrap();
        let (tr, g) = gate(t.path(), OnUnavailable::Degrade);
        g.wait(Lsn(10)).await.unwrap();
        assert!(g.degraded());
        // The primary moves on between checks; the mirror follows a little
        // behind, never at the current end.
        let n2 = NodeId::from("n2");
        g.check_recovered(Lsn(50));
        tr.record(&n2, Lsn(40), Lsn(40), Instant::now());
        g.check_recovered(Lsn(60));
        assert!(g.degraded(), "40 is behind the previous sample 50");
        tr.record(&n2, Lsn(65), Lsn(65), Instant::now());
        g.check_recovered(Lsn(70));
        assert!(!g.degraded(), "65 covers the previous sample 60");
        assert_eq!(
            g.record().intervals[0].to_lsn,
            Some(70),
            "closed at the current end, conservatively"
        );
    }
}
