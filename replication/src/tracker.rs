//! The primary's record of each mirror's progress: flushed and applied LSN,
//! when they were reached, lag in LSNs and milliseconds, and
//! [`AckTracker::wait_for`] for quorum commit ("k mirrors have fsynced
//! `lsn`").
//!
//! Lag in milliseconds is "how long has this mirror been missing an entry
//! that is durable on the primary": the primary notes when each LSN became
//! durable ([`AckTracker::note_durable`], kept for the last
//! [`MAX_DURABLE_SAMPLES`] advances), and a mirror at `flushed` lags by
//! `now - (when the first LSN > flushed became durable)`, or 0 when caught up.
//!
//! Each acknowledgement that raises a mirror's flushed LSN also yields the
//! *acknowledgement lag* of the group commits it covers: from the moment the
//! primary made them durable to the moment the mirror's report that it made
//! them durable arrived ([`AckTracker::on_ack_lag`]; the node turns these into
//! the `mirrordb_replication_ack_lag_seconds` histogram).

use crate::types::{Lsn, NodeId};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::watch;

/// How many durable-LSN advances are remembered for lag in milliseconds.
pub const MAX_DURABLE_SAMPLES: usize = 4096;
/// Most mirrors tracked.
pub const MAX_TRACKED_MIRRORS: usize = 256;

/// One mirror's acknowledged progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorProgress {
    /// Last LSN the mirror reported durable.
    pub flushed_lsn: Lsn,
    /// Last LSN the mirror reported applied.
    pub applied_lsn: Lsn,
    /// When `flushed_lsn` was last raised.
    pub flushed_at: Instant,
    /// When `applied_lsn` was last raised.
    pub applied_at: Instant,
    /// Whether a replication session with it is open.
    pub connected: bool,
}

/// One mirror's lag behind the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorLag {
    /// The mirror.
    pub node: NodeId,
    /// Whether a session is open.
    pub connected: bool,
    /// Entries durable on the primary but not on the mirror.
    pub flush_lag_lsn: u64,
    /// Entries durable on the primary but not applied on the mirror.
    pub apply_lag_lsn: u64,
    /// How long the mirror has been missing a durable entry.
    pub flush_lag: Duration,
    /// How long the mirror has been missing an applied entry.
    pub apply_lag: Duration,
}

/// `wait_for` reached its deadline.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("only {reached} of {needed} mirrors flushed {lsn} before the deadline")]
pub struct QuorumTimeout {
    /// The LSN waited for.
    pub lsn: Lsn,
    /// Mirrors needed.
    pub needed: usize,
    /// Mirrors that had it.
    pub reached: usize,
}

#[derive(Clone, Copy, Debug)]
enum Reached {
    Flushed,
    Applied,
}

#[derive(Debug, Default)]
struct Inner {
    mirrors: BTreeMap<NodeId, MirrorProgress>,
    durable: VecDeque<(Lsn, Instant)>,
    last_durable: Lsn,
}

/// Receives `(mirror, acknowledgement lag)` samples.
pub type AckLagObserver = Box<dyn Fn(&NodeId, Duration) + Send + Sync>;

/// Per-mirror progress, shared by the replication sessions and the commit
/// path.
pub struct AckTracker {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    ack_lag: std::sync::OnceLock<AckLagObserver>,
}

impl std::fmt::Debug for AckTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckTracker")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Default for AckTracker {
    fn default() -> Self {
        AckTracker {
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
            ack_lag: std::sync::OnceLock::new(),
        }
    }
}

impl AckTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain numbers behind; they
        // are still meaningful, so poisoning is ignored.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the receiver of acknowledgement-lag samples (once; later calls
    /// are ignored): for every group commit a raised flushed LSN covers,
    /// `at - (when the primary made it durable)`.
    pub fn on_ack_lag(&self, observer: AckLagObserver) {
        let _ = self.ack_lag.set(observer);
    }

    /// A mirror reported `(flushed, applied)` at `at`. Values never go
    /// backwards here (a resubscription after truncation resets with
    /// [`Self::reset`]).
    pub fn record(&self, node: &NodeId, flushed: Lsn, applied: Lsn, at: Instant) {
        {
            let mut inner = self.lock();
            if !inner.mirrors.contains_key(node) && inner.mirrors.len() >= MAX_TRACKED_MIRRORS {
                return;
            }
            let p = inner
                .mirrors
                .entry(node.clone())
                .or_insert_with(|| MirrorProgress {
                    flushed_lsn: Lsn::ZERO,
                    applied_lsn: Lsn::ZERO,
                    flushed_at: at,
                    applied_at: at,
                    connected: true,
                });
            let raised_from = (flushed > p.flushed_lsn).then_some(p.flushed_lsn);
            if flushed > p.flushed_lsn {
                p.flushed_lsn = flushed;
                p.flushed_at = at;
            }
            if applied > p.applied_lsn {
                p.applied_lsn = applied;
                p.applied_at = at;
            }
            p.connected = true;
            if let (Some(from), Some(observe)) = (raised_from, self.ack_lag.get()) {
                for lag in ack_lags(&inner.durable, from, flushed, at) {
                    observe(node, lag);
                }
            }
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// A mirror subscribed at `(flushed, applied)` (possibly lower than
    /// before, after a truncation or a reseed).
    pub fn reset(&self, node: &NodeId, flushed: Lsn, applied: Lsn, at: Instant) {
        self.lock().mirrors.remove(node);
        self.record(node, flushed, applied, at);
    }

    /// A mirror's session opened or closed.
    pub fn set_connected(&self, node: &NodeId, connected: bool) {
        if let Some(p) = self.lock().mirrors.get_mut(node) {
            p.connected = connected;
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// The primary made every entry `<= lsn` durable at `at`.
    pub fn note_durable(&self, lsn: Lsn, at: Instant) {
        let mut inner = self.lock();
        if lsn <= inner.last_durable {
            return;
        }
        inner.last_durable = lsn;
        if inner.durable.len() == MAX_DURABLE_SAMPLES {
            inner.durable.pop_front();
        }
        inner.durable.push_back((lsn, at));
    }

    /// A mirror's progress.
    pub fn progress(&self, node: &NodeId) -> Option<MirrorProgress> {
        self.lock().mirrors.get(node).cloned()
    }

    /// How many mirrors have flushed `lsn` or beyond.
    pub fn count_flushed(&self, lsn: Lsn) -> usize {
        self.count(lsn, Reached::Flushed)
    }

    fn count(&self, lsn: Lsn, what: Reached) -> usize {
        self.lock()
            .mirrors
            .values()
            .filter(|p| match what {
                Reached::Flushed => p.flushed_lsn >= lsn,
                Reached::Applied => p.applied_lsn >= lsn,
            })
            .count()
    }

    /// How many of `set` have flushed (or, with `applied`, applied) `lsn`.
    pub fn count_in(
        &self,
        set: &std::collections::BTreeSet<NodeId>,
        lsn: Lsn,
        applied: bool,
    ) -> usize {
        let inner = self.lock();
        set.iter()
            .filter_map(|n| inner.mirrors.get(n))
            .filter(|p| {
                if applied {
                    p.applied_lsn >= lsn
                } else {
                    p.flushed_lsn >= lsn
                }
            })
            .count()
    }

    /// Changes whenever a mirror reports or (dis)connects.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until `k` mirrors have flushed (fsynced) `lsn`, or `deadline`:
    /// the `quorum` commit policy.
    pub async fn wait_for(
        &self,
        k: usize,
        lsn: Lsn,
        deadline: Instant,
    ) -> Result<(), QuorumTimeout> {
        self.wait(k, lsn, deadline, Reached::Flushed).await
    }

    /// Waits until `k` mirrors have applied `lsn`, or `deadline`: the
    /// `remote_apply` commit policy.
    pub async fn wait_for_applied(
        &self,
        k: usize,
        lsn: Lsn,
        deadline: Instant,
    ) -> Result<(), QuorumTimeout> {
        self.wait(k, lsn, deadline, Reached::Applied).await
    }

    async fn wait(
        &self,
        k: usize,
        lsn: Lsn,
        deadline: Instant,
        what: Reached,
    ) -> Result<(), QuorumTimeout> {
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let reached = self.count(lsn, what);
            if reached >= k {
                return Ok(());
            }
            let timeout = QuorumTimeout {
                lsn,
                needed: k,
                reached,
            };
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`, so it cannot close while we
                // borrow `self`; treat it like the deadline anyway.
                Ok(Err(_)) | Err(_) => return Err(timeout),
            }
        }
    }

    /// Every mirror's lag at `now`.
    pub fn lag(&self, now: Instant) -> Vec<MirrorLag> {
        let inner = self.lock();
        let since = |pos: Lsn| -> Duration {
            if pos >= inner.last_durable {
                return Duration::ZERO;
            }
            let first_missing = inner
                .durable
                .iter()
                .find(|(l, _)| *l > pos)
                .or(inner.durable.front());
            first_missing.map_or(Duration::ZERO, |(_, t)| now.saturating_duration_since(*t))
        };
        inner
            .mirrors
            .iter()
            .map(|(node, p)| MirrorLag {
                node: node.clone(),
                connected: p.connected,
                flush_lag_lsn: inner.last_durable.0.saturating_sub(p.flushed_lsn.0),
                apply_lag_lsn: inner.last_durable.0.saturating_sub(p.applied_lsn.0),
                flush_lag: since(p.flushed_lsn),
                apply_lag: since(p.applied_lsn),
            })
            .collect()
    }
}

/// The lags of the group commits that overlap `(from, to]`: a commit
/// recorded as `(lsn, t)` covers the LSNs after the previous one up to
/// `lsn`, all durable on the primary at `t`.
fn ack_lags(
    durable: &VecDeque<(Lsn, Instant)>,
    from: Lsn,
    to: Lsn,
    at: Instant,
) -> impl Iterator<Item = Duration> + '_ {
    let mut previous = Lsn::ZERO;
    durable.iter().filter_map(move |&(lsn, t)| {
        let covers = lsn > from && previous < to;
        previous = lsn;
        covers.then(|| at.saturating_duration_since(t))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn lag_in_lsns_and_time() {
        let t = Instant::now();
        let tr = AckTracker::new();
        tr.note_durable(Lsn(10), t);
        tr.note_durable(Lsn(20), t + Duration::from_millis(100));
        tr.record(&NodeId::from("a"), Lsn(20), Lsn(15), t);
        tr.record(&NodeId::from("b"), Lsn(12), Lsn(12), t);
        let lag = tr.lag(t + Duration::from_millis(250));
        assert_eq!(lag[0].node.as_str(), "a");
        assert_eq!((lag[0].flush_lag_lsn, lag[0].apply_lag_lsn), (0, 5));
        assert_eq!(lag[0].flush_lag, Duration::ZERO);
        assert_eq!(lag[0].apply_lag, Duration::from_millis(150));
        assert_eq!(lag[1].flush_lag_lsn, 8);
        assert_eq!(lag[1].flush_lag, Duration::from_millis(150));
        // Acks never go backwards.
        tr.record(&NodeId::from("a"), Lsn(3), Lsn(3), t);
        assert_eq!(
            tr.progress(&NodeId::from("a")).unwrap().flushed_lsn,
            Lsn(20)
        );
        tr.reset(&NodeId::from("a"), Lsn(3), Lsn(3), t);
        assert_eq!(tr.progress(&NodeId::from("a")).unwrap().flushed_lsn, Lsn(3));
    }

    #[tokio::test]
    async fn wait_for_quorum_and_deadline() {
        let tr = Arc::new(AckTracker::new());
        let now = Instant::now();
        assert_eq!(tr.wait_for(0, Lsn(5), now).await, Ok(()));
        let err = tr
            .wait_for(1, Lsn(5), now + Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!((err.needed, err.reached), (1, 0));

        let waiter = {
            let tr = tr.clone();
            tokio::spawn(async move {
                tr.wait_for(2, Lsn(5), Instant::now() + Duration::from_secs(5))
                    .await
            })
        };
        tr.record(&NodeId::from("a"), Lsn(5), Lsn(5), Instant::now());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        tr.record(&NodeId::from("b"), Lsn(7), Lsn(1), Instant::now());
        assert_eq!(waiter.await.unwrap(), Ok(()));
        // Applied lags behind flushed on b.
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(tr.wait_for_applied(2, Lsn(5), soon).await.is_err());
        tr.record(&NodeId::from("b"), Lsn(7), Lsn(6), Instant::now());
        assert_eq!(tr.wait_for_applied(2, Lsn(5), Instant::now()).await, Ok(()));
    }

    #[test]
    fn each_acknowledgement_reports_the_lag_of_the_commits_it_covers() {
        let tr = AckTracker::new();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        tr.on_ack_lag(Box::new(move |n, d| {
            sink.lock().unwrap().push((n.to_string(), d.as_millis()))
        }));
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        // Group commits: 1..=3 durable at 0 ms, 4..=9 at 10 ms, 10 at 30 ms.
        tr.note_durable(Lsn(3), ms(0));
        tr.note_durable(Lsn(9), ms(10));
        tr.note_durable(Lsn(10), ms(30));
        let a = NodeId::from("a");
        // First report: from 0 to 5 covers the first two commits.
        tr.record(&a, Lsn(5), Lsn(5), ms(12));
        // Then 5 to 10: the rest of the second commit and the third.
        tr.record(&a, Lsn(10), Lsn(10), ms(35));
        // No raise, no sample.
        tr.record(&a, Lsn(10), Lsn(10), ms(40));
        let got = seen.lock().unwrap().clone();
        let want: Vec<(String, u128)> = [12, 2, 25, 5]
            .iter()
            .map(|&m| ("a".to_owned(), m))
            .collect();
        assert_eq!(got, want);
    }
}
