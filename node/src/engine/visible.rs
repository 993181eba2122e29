//! Read-your-writes on the primary: the writer answers a journaled batch as
//! soon as its fdatasync returns, before the apply stage has committed the
//! batch to the data file, so a read first waits until the data file holds
//! every write acknowledged so far.
//!
//! ```text
//! writer:  fdatasync N ─ acked_lsn = last LSN of N ─ answer N's clients ─ synced(N)
//! stage:                                                 commit N ─ applied_lsn ─ wake readers
//! read:    need = acked_lsn ─ applied_lsn ≥ need? ─ read view   (else wait, at most READ_WAIT)
//! ```
//!
//! The wait is short (the stage commits a batch it applied while the
//! fdatasync ran), and none at all when no write is in flight. Answering at
//! the fdatasync takes the stage's wake-up and commit off every write's
//! latency; one client writing alone went from 201–224 µs to 157–175 µs
//! in-process (BENCHMARKS.md). If the data file fails to take a batch that
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
    /// Waits until every write acknowledged so far is in the data file, so
    /// a read view opened next sees it. Answers why not when applying
    /// failed for good or did not get there within [`READ_WAIT`].
    pub fn wait_visible(&self) -> Result<(), String> {
        let gate = &self.read_gate;
        let need = gate.acked_lsn.load(Ordering::Acquire);
        if self.applied_lsn.load(Ordering::Acquire) >= need {
            return Ok(());
        }
        gate.waiters.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let deadline = Instant::now() + READ_WAIT;
        let mut guard = gate.lock.lock().unwrap_or_else(|p| p.into_inner());
        let result = loop {
            if self.applied_lsn.load(Ordering::Acquire) >= need {
                break Ok(());
            }
            if self.apply_failed.load(Ordering::Acquire) {
                break Err(format!(
                    "the data file stopped taking writes before it held acknowledged LSN {need} \
                     (they are in the journal; a restart applies them)"
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(format!(
                    "the data file did not reach acknowledged LSN {need} within {} s",
                    READ_WAIT.as_secs()
                ));
            }
            guard = gate
                .changed
                .wait_timeout(guard, RECHECK.min(deadline - now))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        };
        drop(guard);
        gate.waiters.fetch_sub(1, Ordering::Relaxed);
        result
    }
}
