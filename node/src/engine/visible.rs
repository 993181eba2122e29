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
//! in-process (BENCHMARKS.md, "Answered at the fdatasync"). If the data
//! file fails to take a batch that was acknowledged, the batch stays in the
//! journal (the next start replays it), the node refuses writes, and reads
//! of what it wrote answer `storage_error` instead of a state that misses
//! an acknowledged write.
//!
//! A read of one record ([`Shared::record_read_point`]) waits for less: the
//! writer also records the batch's LSN in a slot per record it wrote (a
//! hash of table and key into [`KEY_SLOTS`] slots; records that share a
//! slot share the highest LSN, which can only make a read wait longer) and
//! in one slot for batches that changed more than records. Such a read
//! waits for its own slot and that one, so under a write load it usually
//! waits for nothing and never for a flush it does not need: at 32 clients
//! of a 50/50 load, read p99.9 went from 52–87 ms to 8–11 ms.

use super::Shared;
use crate::model::Op;
use std::hash::Hasher as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The longest a read waits for the data file to catch up with the
/// acknowledged writes before it answers an error.
pub(crate) const READ_WAIT: Duration = Duration::from_secs(10);

/// How long one wait sleeps before it looks again (a safety net: every
/// publication of the applied LSN wakes the waiters).
const RECHECK: Duration = Duration::from_millis(20);

/// Slots of the per-record acknowledged LSN (a power of two).
const KEY_SLOTS: usize = 1 << 13;

/// The acknowledged position and the readers waiting for the data file to
/// reach it.
pub(crate) struct ReadGate {
    /// The last LSN acknowledged to a client before its batch was committed
    /// to the data file.
    acked_lsn: AtomicU64,
    /// The same per record, by a hash of table and key: the last LSN of a
    /// batch that wrote a record of the slot. A slot that several records
    /// share holds the highest, so a read of one of them may wait for
    /// another's commit, never miss its own.
    keys: Box<[AtomicU64]>,
    /// The last LSN of an acknowledged batch that changed more than records
    /// (a table, a BLOB, a session): a read of one record waits for it too.
    others: AtomicU64,
    /// Readers waiting now: the stage wakes them only when there are any.
    waiters: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Default for ReadGate {
    fn default() -> Self {
        ReadGate {
            acked_lsn: AtomicU64::new(0),
            keys: (0..KEY_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            others: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }
}

/// The slot of a record in [`ReadGate`]'s per-record LSNs.
fn key_slot(table: &str, key: &str) -> usize {
    // Fixed keys: the slots only need to agree within this process.
    let mut h = std::hash::DefaultHasher::new();
    h.write(table.as_bytes());
    // Never part of UTF-8: table "ab" + key "c" and "a" + "bc" differ.
    h.write_u8(0xff);
    h.write(key.as_bytes());
    (h.finish() as usize) & (KEY_SLOTS - 1)
}

/// What a batch of journal entries changes, as the read gate needs it: the
/// slots of the records it writes, and whether it changes anything else.
#[derive(Default)]
pub(crate) struct Touched {
    slots: Vec<usize>,
    others: bool,
}

impl Touched {
    /// Computed before the entries go to the apply stage.
    pub fn of(entries: &[(u64, Op)]) -> Touched {
        let mut t = Touched::default();
        for (_, op) in entries {
            match op {
                Op::Put { table, key, .. } | Op::Delete { table, key, .. } => {
                    t.slots.push(key_slot(table, key));
                }
                // A transaction's framing changes nothing a read sees.
                Op::TxnBegin { .. } | Op::TxnCommit | Op::TxnAbort => {}
                _ => t.others = true,
            }
        }
        t
    }
}

impl ReadGate {
    /// Records that the batch `touched`, which ends at `lsn`, is
    /// acknowledged: from now on a read of what it changed waits until the
    /// data file holds it. Called before the answers go.
    pub fn acknowledged(&self, lsn: u64, touched: &Touched) {
        for &slot in &touched.slots {
            self.keys[slot].fetch_max(lsn, Ordering::AcqRel);
        }
        if touched.others {
            self.others.fetch_max(lsn, Ordering::AcqRel);
        }
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

    /// The LSN a read of one record starting now must see: the last
    /// acknowledged batch that wrote it (or a record sharing its slot), or
    /// that changed more than records. Usually already applied, so the
    /// read does not wait for the batches in flight.
    pub fn record_read_point(&self, table: &str, key: &str) -> u64 {
        let gate = &self.read_gate;
        let own = gate.keys[key_slot(table, key)].load(Ordering::Acquire);
        own.max(gate.others.load(Ordering::Acquire))
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
