//! The data-file side of the engine: applying journal entries, and the
//! cache flush.
//!
//! ```text
//! primary: writer thread ── fsync ──► apply stage (engine::stage):
//!                                      Lane::apply(entries) ──► ack
//!
//! mirror:  writer thread ── append + fsync ──► ack flushed_lsn (at journal speed)
//!                                │ wake
//!                                ▼
//!          applier thread ── Lane::catch_up: read the durable journal from
//!                            the last applied LSN (journal::cursor) ──► apply
//!                            ──► publish applied_lsn
//!
//! both:    applier thread ── every tick: Lane::maybe_flush (one durable
//!                            redb commit recording checkpoint_lsn)
//! ```
//!
//! [`Lane`] holds the data file's write side: the store, the [`Replayer`]
//! and the flush state. Whoever changes the data file holds the lane's
//! mutex. On the primary each batch is applied by the apply stage during
//! its fsync and committed right after it, and a read waits for the
//! commits of the writes acknowledged before it ([`super::visible`]), so
//! an acknowledged write is visible to the next read. On
//! a mirror the writer only appends and fsyncs replicated entries; the
//! applier thread follows the durable journal and applies it, so neither a
//! slow apply nor a 50–100 ms flush delays the mirror's acknowledgement.
//! Before anything that needs the applied state to be current (a promotion,
//! a backup barrier, a flush, a lock) the writer applies what is left itself
//! ([`Lane::catch_up`] under the same mutex).
//!
//! The periodic flush also runs on the applier thread on both roles: the
//! primary's writer keeps writing and fsyncing the journal while the data
//! file is flushed, and waits only when it next applies.

use super::Shared;
use super::replay::Replayer;
use super::store::{Store, StoreError};
use crate::journal::cursor::{self, Cursor, Limits};
use crate::journal::format::decode_op;
use crate::model::Op;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most entries applied in one data-file transaction while following the
/// journal (the lane is released between them).
const CATCH_UP_ENTRIES: usize = 16 * 1024;
/// About the most journal bytes read for one such transaction.
const CATCH_UP_BYTES: usize = 16 << 20;
/// How often the applier looks whether a flush is due.
const TICK: Duration = Duration::from_millis(50);

/// A write to an unjournaled table, applied without a journal entry.
pub(crate) struct Unjournaled {
    pub table: String,
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub version: u64,
}

/// The data file's write side.
pub(crate) struct Lane {
    pub store: Store,
    pub replayer: Replayer,
    /// Apply what the journal holds beyond the replayer (a mirror). Off on
    /// the primary, whose writer applies every batch itself.
    pub follow: bool,
    pub dirty_bytes: u64,
    pub last_flush: Instant,
    pub flush_interval: Duration,
    pub dirty_bytes_max: u64,
    /// Why applying stopped, once it has: nothing is applied after.
    pub failed: Option<String>,
    cursor: Option<Cursor>,
    journal_dir: PathBuf,
    shared: Arc<Shared>,
}

/// Locks a lane; a panic elsewhere never makes it unusable.
pub(crate) fn lock(lane: &Mutex<Lane>) -> MutexGuard<'_, Lane> {
    lane.lock().unwrap_or_else(|p| p.into_inner())
}

impl Lane {
    pub fn new(
        store: Store,
        replayer: Replayer,
        journal_dir: PathBuf,
        shared: Arc<Shared>,
        flush_interval: Duration,
        dirty_bytes_max: u64,
    ) -> Lane {
        Lane {
            store,
            replayer,
            follow: false,
            dirty_bytes: 0,
            last_flush: Instant::now(),
            flush_interval,
            dirty_bytes_max,
            failed: None,
            cursor: None,
            journal_dir,
            shared,
        }
    }

    /// Applies entries the caller has made durable, and unjournaled writes,
    /// in one data-file transaction.
    pub fn apply(
        &mut self,
        entries: Vec<(u64, Op)>,
        unjournaled: Vec<Unjournaled>,
    ) -> Result<(), StoreError> {
        self.apply_gated(entries, unjournaled, || Ok(()))
    }

    /// [`Lane::apply`] of journal entries alone, their record writes
    /// coalesced ([`Store::apply_coalesced`]: sorted by key, the last per
    /// key): a mirror catching up, like recovery, applies only what the
    /// journal holds, so no unjournaled write has to keep its place.
    fn apply_journal(&mut self, entries: Vec<(u64, Op)>) -> Result<(), StoreError> {
        self.apply_batch(entries, Vec::new(), true, || Ok(()))
    }

    /// [`Lane::apply`] of entries that may not be durable yet: the
    /// transaction commits only once `gate` says they are; when `gate`
    /// fails nothing is committed. Either way a batch that is not committed
    /// rewinds the replayer to its last complete point (an open transaction
    /// is dropped, to be read again from its start), so a later flush never
    /// records a checkpoint past what the data file holds and a later
    /// catch-up re-reads what was lost.
    pub fn apply_gated(
        &mut self,
        entries: Vec<(u64, Op)>,
        unjournaled: Vec<Unjournaled>,
        gate: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.apply_batch(entries, unjournaled, false, gate)
    }

    fn apply_batch(
        &mut self,
        entries: Vec<(u64, Op)>,
        unjournaled: Vec<Unjournaled>,
        coalesce: bool,
        gate: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if entries.is_empty() && unjournaled.is_empty() {
            return gate();
        }
        // Where to rewind to if this batch is not committed: its last
        // complete point, as a restart from a checkpoint there would. Cheap
        // where a copy of the replayer is not: on a mirror a replicated
        // transaction may be open across many batches, holding its ops.
        let rewind_to = self.replayer.complete_lsn();
        let replayer = &mut self.replayer;
        let applied = self.store.apply_gated(
            coalesce,
            |w| -> Result<(), StoreError> {
                for (lsn, op) in entries {
                    replayer.apply(w, lsn, op)?;
                }
                for u in unjournaled {
                    match u.value {
                        Some(v) => w.put(&u.table, &u.key, &v, u.version)?,
                        None => w.delete(&u.table, &u.key)?,
                    }
                }
                Ok(())
            },
            gate,
        );
        match applied {
            Ok(((), bytes)) => {
                self.applied(bytes);
                Ok(())
            }
            Err(e) => {
                self.replayer = Replayer::after(rewind_to);
                Err(e)
            }
        }
    }

    /// Publishes what a committed data-file transaction applied.
    pub fn applied(&mut self, bytes: u64) {
        self.dirty_bytes += bytes;
        let applied = self.replayer.complete_lsn();
        self.shared.applied_lsn.store(applied, Ordering::Release);
        self.shared.applied_tx.send_if_modified(|v| {
            let changed = *v != applied;
            *v = applied;
            changed
        });
        self.shared.read_gate.wake();
        self.shared
            .dirty_bytes
            .store(self.dirty_bytes, Ordering::Relaxed);
    }

    /// Applies the durable journal beyond the replayer, at most `max`
    /// entries in one data-file transaction. Returns whether more is left.
    fn catch_up_step(&mut self, max: usize) -> Result<bool, StoreError> {
        if let Some(e) = &self.failed {
            return Err(StoreError(e.clone()));
        }
        if !self.follow {
            // The primary's writer applies each batch itself, after its
            // fsync: reading the journal here could apply one twice.
            return Ok(false);
        }
        let durable = self.shared.durable_lsn.load(Ordering::Acquire);
        let from = self.replayer.last_lsn() + 1;
        if from > durable {
            return Ok(false);
        }
        let limits = Limits {
            entries: max,
            bytes: CATCH_UP_BYTES,
            overhead: 0,
        };
        let (frames, cursor) =
            cursor::read(&self.journal_dir, self.cursor.take(), from, durable, limits)
                .map_err(|e| StoreError(format!("reading the journal to apply it: {e}")))?;
        self.cursor = cursor;
        let Some(last) = frames.last().map(|f| f.header.lsn) else {
            return Err(StoreError(format!(
                "the journal holds no entry {from} although {durable} is durable"
            )));
        };
        let mut entries = Vec::with_capacity(frames.len());
        for f in &frames {
            let op = decode_op(f.payload())
                .map_err(|e| StoreError(format!("journal entry {}: {e}", f.header.lsn)))?;
            entries.push((f.header.lsn, op));
        }
        drop(frames);
        self.apply_journal(entries)?;
        Ok(last < durable)
    }

    /// On a mirror, applies everything durable in the journal that is not
    /// applied yet (on the primary everything durable is applied already).
    /// A failure stops applying for good (the node needs a restart, whose
    /// recovery replays from the checkpoint).
    pub fn catch_up(&mut self) -> Result<(), StoreError> {
        loop {
            match self.catch_up_step(CATCH_UP_ENTRIES) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    pub fn fail(&mut self, e: StoreError) -> StoreError {
        if self.failed.is_none() {
            let msg = format!("applying the journal to the data file failed: {e}");
            tracing::error!(error = %msg, "data file no longer updated; refusing writes");
            self.shared.record_error(msg.clone());
            self.failed = Some(msg);
            self.shared.apply_failed.store(true, Ordering::Release);
            self.shared.read_gate.wake();
        }
        e
    }

    /// Durable commit of the data file recording `checkpoint_lsn` (and the
    /// epoch history when it changed). Answers the checkpoint.
    pub fn flush(&mut self) -> Result<u64, StoreError> {
        let checkpoint = self.replayer.complete_lsn();
        let t = Instant::now();
        let dirty_history = self
            .shared
            .epoch_history_dirty
            .swap(false, Ordering::AcqRel);
        let history = dirty_history.then(|| {
            self.shared
                .epoch_history
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        });
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let done = self.store.apply(true, |w| -> Result<(), StoreError> {
            if let Some(h) = &history {
                w.set_epoch(epoch)?;
                w.set_epoch_history(h)?;
            }
            w.set_checkpoint(checkpoint)
        });
        if let Err(e) = done {
            if dirty_history {
                self.shared
                    .epoch_history_dirty
                    .store(true, Ordering::Release);
            }
            return Err(e);
        }
        metrics::histogram!("mirrordb_flush_seconds").record(t.elapsed().as_secs_f64());
        metrics::gauge!("mirrordb_checkpoint_lsn").set(checkpoint as f64);
        self.shared
            .checkpoint_lsn
            .store(checkpoint, Ordering::Release);
        self.dirty_bytes = 0;
        self.shared.dirty_bytes.store(0, Ordering::Relaxed);
        self.last_flush = Instant::now();
        Ok(checkpoint)
    }

    /// Applies what is left ([`Lane::catch_up`]), then flushes.
    pub fn flush_current(&mut self) -> Result<u64, StoreError> {
        self.catch_up()?;
        self.flush()
    }

    /// Flushes when something is unflushed and the interval has passed, the
    /// dirty bytes reached their bound, or `force`; while a backup snapshot
    /// is open the interval is shorter ([`super::backup::OpenSnapshot`]).
    pub fn maybe_flush(&mut self, force: bool) {
        let behind =
            self.replayer.complete_lsn() > self.shared.checkpoint_lsn.load(Ordering::Relaxed);
        let history = self.shared.epoch_history_dirty.load(Ordering::Acquire);
        if !(behind || history || self.dirty_bytes > 0) {
            return;
        }
        let snapshot_open = self.shared.open_snapshots.load(Ordering::Acquire) > 0;
        let due = force
            || self.dirty_bytes >= self.dirty_bytes_max
            || self.last_flush.elapsed() >= flush_interval(self.flush_interval, snapshot_open);
        if due && let Err(e) = self.flush() {
            tracing::error!(error = %e, "data file flush failed");
        }
    }
}

/// The periodic flush's interval: the configured one, or a quarter of it
/// while a backup snapshot is open ([`super::backup::OpenSnapshot`]).
fn flush_interval(configured: Duration, snapshot_open: bool) -> Duration {
    if snapshot_open {
        configured / super::backup::SNAPSHOT_FLUSH_DIVISOR
    } else {
        configured
    }
}

/// The applier thread's handle, owned by the writer: dropping it stops the
/// thread and waits for it (the data file is closed once both are gone).
pub(crate) struct Applier {
    wake: Option<SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Applier {
    /// Starts the applier thread over `lane`.
    pub fn start(lane: Arc<Mutex<Lane>>) -> std::io::Result<Applier> {
        let (wake, rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("mirrordb-applier".into())
            .spawn(move || run(&lane, &rx))?;
        Ok(Applier {
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Asks the applier to look for work now (wake-ups coalesce).
    pub fn wake(&self) {
        if let Some(w) = &self.wake {
            match w.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
            }
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.wake.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(lane: &Mutex<Lane>, wake: &Receiver<()>) {
    let mut more = false;
    loop {
        if !more {
            match wake.recv_timeout(TICK) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let mut l = lock(lane);
        more = false;
        if l.follow && l.failed.is_none() {
            match l.catch_up_step(CATCH_UP_ENTRIES) {
                Ok(m) => more = m,
                Err(e) => {
                    l.fail(e);
                }
            }
        }
        if l.failed.is_none() {
            l.maybe_flush(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_periodic_flush_runs_four_times_as_often_while_a_snapshot_is_open() {
        let configured = Duration::from_secs(1);
        assert_eq!(flush_interval(configured, false), configured);
        assert_eq!(flush_interval(configured, true), Duration::from_millis(250));
    }
}
