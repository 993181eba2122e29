//! Read-your-writes on the primary: the writer answers a journaled batch as
//! soon as its fdatasync returns, before the apply stage has committed the
//! batch to the data file, so a read first waits until the data file holds
//! every write acknowledged so far.
//!
//! ```text
//! writer:  fdatasync N ─ synced(N) ─ acked_lsn = last LSN of N ─ answer N's clients
//! stage:                      └► commit N ─ applied_lsn ─ wake readers
//! read:    need = acked_lsn ─ applied_lsn ≥ need? ─ read view   (else wait, at most READ_WAIT)
//! ```
//!
//! The wait is short (the stage commits a batch it applied while the
//! fdatasync ran), and none at all when no write is in flight; it lasts a
//! whole data-file flush when one holds the stage up, as a write's answer
//! used to. The HTTP API's reads wait as tasks ([`super::Engine::reader_async`]),
//! so a tokio worker serves other requests meanwhile: blocking the worker
//! cost a 50/50 read/write load at 32 clients up to a fifth of its
//! throughput on 2 cores, the async wait nothing measurable. Answering at
//! the fdatasync takes the stage's wake-up and commit off every write's
//! latency; one client writing alone went from 201–255 µs to 136–183 µs
//! in-process (BENCHMARKS.md, "Answered at the fdatasync"). If the data file fails to take a batch that
//! was acknowledged, the batch stays in the journal (the next start replays
//! it), the node refuses writes, and reads answer `storage_error` instead of
//! a state that misses an acknowledged write.

use super::Shared;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The longest a read waits for the data file to catch up with the
/// acknowledged writes before it answers an error.
pub(crate) const READ_WAIT: Duration = Duration::from_secs(10);

/// How long one wait sleeps before it looks again (a safety net: every
/// publication of the applied LSN wakes the waiters).
const RECHECK: Duration = Duration::from_millis(20);

/// The acknowledged position and the readers waiting for the data file to
/// reach it.
#[derive(Default)]
pub(crate) struct ReadGate {
    /// The last LSN acknowledged to a client before its batch was committed
    /// to the data file.
    acked_lsn: AtomicU64,
    /// Readers waiting now: the stage wakes them only when there are any.
    waiters: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
}

impl ReadGate {
    /// Records that writes up to `lsn` are acknowledged: from now on a read
    /// waits until the data file holds them. Called before the answers go.
    pub fn acknowledged(&self, lsn: u64) {
        self.acked_lsn.fetch_max(lsn, Ordering::AcqRel);
    }

    /// Readers waiting now.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiters.load(Ordering::Relaxed)
    }

    /// Wakes the readers waiting for the applied LSN (called after it was
    /// published, or after applying failed for good).
    pub fn wake(&self) {
        // Pairs with the fence in `wait_visible`: either the reader sees
        // the new applied LSN, or this sees the reader waiting.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.changed.notify_all();
        }
    }
}

impl Shared {
    /// The LSN a read starting now must see: the last one acknowledged.
    pub fn read_point(&self) -> u64 {
        self.read_gate.acked_lsn.load(Ordering::Acquire)
    }

    /// Whether the data file holds everything up to `need`: `Some(Ok)`
    /// yes, `Some(Err)` never (applying failed) or not by `deadline`,
    /// `None` not yet.
    fn visible(&self, need: u64, deadline: Instant) -> Option<Result<(), String>> {
        if self.applied_lsn.load(Ordering::Acquire) >= need {
            return Some(Ok(()));
        }
        if self.apply_failed.load(Ordering::Acquire) {
            return Some(Err(format!(
                "the data file stopped taking writes before it held acknowledged LSN {need} \
                 (they are in the journal; a restart applies them)"
            )));
        }
        if Instant::now() >= deadline {
            return Some(Err(format!(
                "the data file did not reach acknowledged LSN {need} within {} s",
                READ_WAIT.as_secs()
            )));
        }
        None
    }

    /// Waits, blocking the thread, until the data file holds everything up
    /// to `need` (a [`Shared::read_point`]), so a read view opened next
    /// sees it. Answers why not when applying failed for good or did not
    /// get there within [`READ_WAIT`].
    pub fn wait_visible(&self, need: u64) -> Result<(), String> {
        if self.applied_lsn.load(Ordering::Acquire) >= need {
            return Ok(());
        }
        let gate = &self.read_gate;
        gate.waiters.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let deadline = Instant::now() + READ_WAIT;
        let mut guard = gate.lock.lock().unwrap_or_else(|p| p.into_inner());
        let result = loop {
            if let Some(r) = self.visible(need, deadline) {
                break r;
            }
            guard = gate
                .changed
                .wait_timeout(guard, RECHECK)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        };
        drop(guard);
        gate.waiters.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// [`Shared::wait_visible`] for a task: waits without holding up its
    /// thread (a tokio worker goes on with other requests meanwhile).
    pub async fn visible_async(&self, need: u64) -> Result<(), String> {
        if self.applied_lsn.load(Ordering::Acquire) >= need {
            return Ok(());
        }
        // Subscribed before the check: a commit after it marks a change.
        let mut rx = self.applied_tx.subscribe();
        let deadline = Instant::now() + READ_WAIT;
        loop {
            if let Some(r) = self.visible(need, deadline) {
                return r;
            }
            let _ = tokio::time::timeout(RECHECK, rx.changed()).await;
        }
    }
}
