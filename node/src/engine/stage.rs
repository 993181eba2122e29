//! The primary's apply stage: it applies a group-commit batch to the data
//! file while the writer thread fdatasyncs that batch's journal entries,
//! and commits it once they are durable.
//!
//! ```text
//! writer thread:  plan N ─ hand N over ─ write + fdatasync N ─ synced(N), ack N ─ plan N+1 ─ hand N+1 over ─ …
//! apply stage:                 apply N ─────── wait ────────── commit N    apply N+1 ─ …
//! ```
//!
//! The writer answers a batch of journal entries itself once they are
//! durable, and reads wait for the stage's commit ([`super::visible`]);
//! the stage answers a batch that also writes an unjournaled table (the
//! data file is that write's only copy) once it is durable *and* applied.
//! The stage's data-file transaction commits (becomes visible to
//! readers) only after the writer reports the batch's entries durable
//! ([`Stage::synced`]), and is abandoned, its clients answered
//! `journal_unavailable`, if the journal write or sync failed
//! ([`Stage::sync_failed`]): no reader sees a write the journal could
//! lose. What overlaps is the disk's time (the fdatasync) with the CPU's
//! (the B-tree changes), which took the apply off the clients' latency:
//! in-process writes at 32 clients went from 56,000–65,000 to
//! 61,000–86,000/s in interleaved pairs (BENCHMARKS.md).
//! Batches are applied in the order they were journaled; up to
//! [`QUEUE_BYTES`] of them wait for the stage (so a data-file flush that
//! holds it up does not hold up the writer), and those that queued up
//! while it was busy and are already reported durable go into one
//! data-file transaction together
//! (never one that is not yet: its failed sync would abandon the batches
//! before it, which may have been answered).
//!
//! Preconditions (`if_version`) of a batch are checked before the batches
//! ahead of it are applied, so the writer keeps the versions its
//! unapplied batches wrote (`Writer::inflight`) and drops them once
//! [`Stage::applied`] passes their batch; it reads the applied count
//! before it opens its read view, so a batch either shows in the view or
//! is still in `inflight`.
//!
//! Every batch goes through the stage, one client writing alone too. The
//! writer applying a batch itself when nothing waited behind it (as an
//! earlier version meant to, but through a wrong idleness check never
//! did) measured 64,500 against 82,500–87,100 in-process writes/s at 32
//! clients (a writer applying is a writer not collecting the next batch)
//! and gained one client 2–4 % in-process, nothing over HTTP. Anything
//! that needs the data file current (a barrier, a BLOB, a flush, a lock,
//! a promotion, shutdown) first waits for the stage to empty
//! ([`Stage::drain`]).
//!
//! The stage's thread runs at `SCHED_BATCH` (its nice value unchanged), so
//! being woken by the writer never preempts the writer on its way to the
//! fdatasync: the stage takes the other core, or waits its turn.

use super::Shared;
use super::apply::{self, Lane, Unjournaled};
use super::error::WriteError;
use super::store::StoreError;
use super::writer::Reply;
use crate::model::{Op, SessionId, WriteAck};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Most batches handed over and not yet finished by the stage.
const QUEUE: usize = 4096;
/// Most bytes of records in batches handed over and not yet finished (a
/// batch larger than this alone still goes through, after the rest).
pub(crate) const QUEUE_BYTES: usize = 64 << 20;

/// A reply waiting for its batch to become durable (and, when the stage
/// answers it, applied).
pub(crate) enum Pending {
    Ack(Reply<WriteAck>, WriteAck),
    Session(Reply<SessionId>, SessionId),
}

impl Pending {
    fn send_ok(self) {
        match self {
            Pending::Ack(r, a) => {
                let _ = r.send(Ok(a));
            }
            Pending::Session(r, s) => {
                let _ = r.send(Ok(s));
            }
        }
    }

    pub fn send_err(self, e: WriteError) {
        match self {
            Pending::Ack(r, _) => {
                let _ = r.send(Err(e));
            }
            Pending::Session(r, _) => {
                let _ = r.send(Err(e));
            }
        }
    }
}

/// A durable group-commit batch: what to apply and whom to answer.
pub(crate) struct Batch {
    /// Numbers batches in journal order, from 1.
    pub seq: u64,
    pub entries: Vec<(u64, Op)>,
    pub unjournaled: Vec<Unjournaled>,
    pub pending: Vec<Pending>,
    /// Operations acknowledged by this batch (for the write counter).
    pub ops: u64,
}

impl Batch {
    /// A batch with nothing to apply or answer: keeps the numbering whole
    /// when a numbered batch is refused before it reaches the stage
    /// (otherwise [`Stage::drain`] would wait for it for ever).
    pub fn empty(seq: u64) -> Batch {
        Batch {
            seq,
            entries: Vec::new(),
            unjournaled: Vec::new(),
            pending: Vec::new(),
            ops: 0,
        }
    }

    /// About how much memory the batch holds: its records' bytes plus a
    /// little per entry.
    fn bytes(&self) -> usize {
        const PER_ENTRY: usize = 64;
        let entries: usize = self
            .entries
            .iter()
            .map(|(_, op)| match op {
                Op::Put {
                    table, key, value, ..
                } => PER_ENTRY + table.len() + key.len() + value.len(),
                _ => PER_ENTRY,
            })
            .sum();
        let unjournaled: usize = self
            .unjournaled
            .iter()
            .map(|u| PER_ENTRY + u.table.len() + u.key.len() + u.value.as_ref().map_or(0, Vec::len))
            .sum();
        entries + unjournaled
    }

    /// Appends a later batch: its entries, writes and replies follow ours.
    fn merge(&mut self, later: Batch) {
        self.seq = later.seq;
        self.entries.extend(later.entries);
        self.unjournaled.extend(later.unjournaled);
        self.pending.extend(later.pending);
        self.ops += later.ops;
    }
}

/// The last batch finished, and a condition to wait for the next.
struct Progress {
    done: Mutex<u64>,
    changed: Condvar,
}

impl Progress {
    fn get(&self) -> u64 {
        *self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, seq: u64) {
        let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *d = (*d).max(seq);
        self.changed.notify_all();
    }
}

/// What the writer reported of the batches' journal entries: durable up
/// to a batch number, or lost from one on.
#[derive(Default)]
struct SyncState {
    synced: u64,
    failed: Option<(u64, String)>,
}

/// The writer's reports and a condition to wait for the next.
#[derive(Default)]
struct Synced {
    state: Mutex<SyncState>,
    changed: Condvar,
}

impl Synced {
    fn update(&self, f: impl FnOnce(&mut SyncState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_all();
    }

    /// The last batch reported durable (every batch before it is too).
    fn durable(&self) -> u64 {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.failed.is_some() { 0 } else { s.synced }
    }

    /// Waits until batch `seq`'s entries are durable; the error is why they
    /// never will be.
    fn wait(&self, seq: u64) -> Result<(), String> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // A failure first: a batch at or after it is lost even if a
            // later report (an empty batch) moved `synced` past it.
            if let Some((from, msg)) = &s.failed
                && *from <= seq
            {
                return Err(msg.clone());
            }
            if s.synced >= seq {
                return Ok(());
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The apply stage's thread and the writer's view of it.
pub(crate) struct Stage {
    tx: Option<SyncSender<Batch>>,
    thread: Option<JoinHandle<()>>,
    progress: Arc<Progress>,
    synced: Arc<Synced>,
    /// Batches handed over while the stage's thread was gone, waiting for
    /// their sync to be reported.
    here: Vec<Batch>,
    lane: Arc<Mutex<Lane>>,
    shared: Arc<Shared>,
    /// The last batch numbered.
    last: u64,
    /// Batches handed over and not known finished, with their
    /// [`Batch::bytes`], oldest first; and the sum of those.
    queued: std::collections::VecDeque<(u64, usize)>,
    queued_bytes: usize,
}

impl Stage {
    /// Starts the stage's thread over `lane`.
    pub fn start(lane: Arc<Mutex<Lane>>, shared: Arc<Shared>) -> std::io::Result<Stage> {
        let progress = Arc::new(Progress {
            done: Mutex::new(0),
            changed: Condvar::new(),
        });
        let synced = Arc::new(Synced::default());
        let (tx, rx) = sync_channel::<Batch>(QUEUE);
        let thread = {
            let (lane, shared, progress, synced) = (
                lane.clone(),
                shared.clone(),
                progress.clone(),
                synced.clone(),
            );
            std::thread::Builder::new()
                .name("mirrordb-apply".into())
                .spawn(move || {
                    no_wakeup_preemption();
                    let mut held: Option<Batch> = None;
                    loop {
                        let mut group = match held.take() {
                            Some(b) => b,
                            None => match rx.recv() {
                                Ok(b) => b,
                                Err(_) => break,
                            },
                        };
                        // Batches that queued up while the last was applied
                        // go into one data-file transaction, those already
                        // reported durable only: a sync that fails abandons
                        // the whole transaction, and a batch answered at its
                        // fdatasync must not go with it.
                        let durable = synced.durable();
                        while let Ok(next) = rx.try_recv() {
                            if next.seq > durable {
                                held = Some(next);
                                break;
                            }
                            group.merge(next);
                        }
                        let seq = group.seq;
                        finish(&lane, &shared, group, &synced);
                        progress.set(seq);
                    }
                })?
        };
        Ok(Stage {
            tx: Some(tx),
            thread: Some(thread),
            progress,
            synced,
            here: Vec::new(),
            lane,
            shared,
            last: 0,
            queued: std::collections::VecDeque::new(),
            queued_bytes: 0,
        })
    }

    /// Numbers a new batch.
    pub fn next_seq(&mut self) -> u64 {
        self.last += 1;
        self.last
    }

    /// The last batch applied (or refused) and answered: every batch up to
    /// it is in the data file, or will never be.
    pub fn applied(&self) -> u64 {
        self.progress.get()
    }

    /// Applies and answers `batch`, whose entries are durable (or which
    /// has none), after the batches ahead of it.
    pub fn dispatch(&mut self, batch: Batch) {
        let seq = batch.seq;
        self.hand_over(batch);
        self.synced(seq);
    }

    /// Gives `batch` to the stage's thread before its entries are durable:
    /// it is applied at once and committed after [`Stage::synced`] for its
    /// number (or abandoned after [`Stage::sync_failed`]). Every batch
    /// handed over must get one of the two.
    ///
    /// The stage may fall behind the journal by up to [`QUEUE_BYTES`]
    /// (and [`QUEUE`] batches); past that this waits. A data-file flush
    /// holds the stage up for as long as it takes (hundreds of
    /// milliseconds while a backup reads the file), and the writer goes on
    /// journaling and answering meanwhile: with a queue of 4 batches it
    /// stopped within a few milliseconds of every flush.
    pub fn hand_over(&mut self, batch: Batch) {
        if self.tx.is_some() {
            let bytes = batch.bytes();
            self.make_room(bytes);
            self.queued.push_back((batch.seq, bytes));
            self.queued_bytes += bytes;
        }
        let Some(tx) = &self.tx else {
            self.here.push(batch);
            return;
        };
        if let Err(e) = tx.send(batch) {
            // The thread is gone (it never stops before the writer does,
            // unless it panicked): apply here, in order, after the rest.
            self.tx = None;
            self.drain();
            self.here.push(e.0);
        }
    }

    /// Applies the batches handed over while the stage's thread was gone
    /// (`here`), now that their sync is reported.
    fn finish_here(&mut self) {
        for batch in std::mem::take(&mut self.here) {
            let seq = batch.seq;
            finish(&self.lane, &self.shared, batch, &self.synced);
            self.progress.set(seq);
        }
    }

    /// Reports batch `seq`'s entries (and every earlier batch's) durable.
    pub fn synced(&mut self, seq: u64) {
        self.synced.update(|s| s.synced = s.synced.max(seq));
        self.finish_here();
    }

    /// Reports that batch `seq`'s entries may be lost (a journal write or
    /// fdatasync failed): it and every later batch are abandoned and their
    /// clients answered with `why`.
    pub fn sync_failed(&mut self, seq: u64, why: String) {
        self.synced.update(|s| {
            if s.failed.is_none() {
                s.failed = Some((seq, why));
            }
        });
        self.finish_here();
    }

    /// Waits until `bytes` more fit in the queue ([`QUEUE_BYTES`]), or it
    /// is empty. Every batch queued has had its sync reported (the writer
    /// reports one before it plans the next), so the stage can finish
    /// them all.
    fn make_room(&mut self, bytes: usize) {
        loop {
            let done = self.progress.get();
            while let Some(&(seq, b)) = self.queued.front()
                && seq <= done
            {
                self.queued.pop_front();
                self.queued_bytes -= b;
            }
            if self.queued_bytes == 0 || self.queued_bytes + bytes <= QUEUE_BYTES {
                return;
            }
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return;
            }
            let d = self.progress.done.lock().unwrap_or_else(|p| p.into_inner());
            if *d == done {
                let _ = self
                    .progress
                    .changed
                    .wait_timeout(d, std::time::Duration::from_millis(100));
            }
        }
    }

    /// Batches handed over and not known finished, and their bytes.
    #[cfg(test)]
    pub fn queued(&mut self) -> (usize, usize) {
        self.make_room(0);
        (self.queued.len(), self.queued_bytes)
    }

    /// Waits until every batch handed over is finished.
    pub fn drain(&self) {
        let mut d = self.progress.done.lock().unwrap_or_else(|p| p.into_inner());
        while *d < self.last {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                // A stage that panicked finishes nothing more (its batches'
                // clients see their replies dropped).
                return;
            }
            d = self
                .progress
                .changed
                .wait_timeout(d, std::time::Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // A batch handed over whose sync was never reported (the writer is
        // unwinding) must not keep the thread waiting.
        self.synced.update(|s| {
            if s.failed.is_none() {
                s.failed = Some((s.synced + 1, "the writer stopped".into()));
            }
        });
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Applies a durable batch in one data-file transaction and answers its
/// requests. Nothing is applied after a batch that failed to apply: the
/// data file would miss that batch's entries, so later ones are refused
/// too (the journal holds them; recovery applies them at the next start).
fn finish(lane: &Mutex<Lane>, shared: &Shared, batch: Batch, synced: &Synced) {
    let Batch {
        seq,
        entries,
        unjournaled,
        pending,
        ops,
    } = batch;
    let mut lost = None;
    let applied = {
        let mut l = apply::lock(lane);
        match &l.failed {
            Some(e) => Err(StoreError(e.clone())),
            None => {
                let gate = || {
                    synced.wait(seq).map_err(|why| {
                        lost = Some(why.clone());
                        StoreError(why)
                    })
                };
                match l.apply_gated(entries, unjournaled, gate) {
                    Ok(()) => Ok(()),
                    // Abandoned, not failed: the lane takes nothing more,
                    // without recording a data-file failure.
                    Err(e) if lost.is_some() => {
                        l.failed
                            .get_or_insert_with(|| format!("a batch was not applied: {e}"));
                        Err(e)
                    }
                    Err(e) => Err(l.fail(e)),
                }
            }
        }
    };
    if let Some(why) = lost {
        for p in pending {
            p.send_err(WriteError::JournalUnavailable(why.clone()));
        }
        return;
    }
    if let Err(e) = applied {
        for p in pending {
            p.send_err(WriteError::Storage(format!(
                "the write is journaled but the data file could not be updated: {e}"
            )));
        }
        return;
    }
    answer_durable(shared, pending, ops);
}

/// Answers the requests of a batch that is durable (and, for the stage's
/// batches, applied), counting its `ops`: unless the lease ran out
/// meanwhile, when another node may be primary already and this node
/// acknowledges nothing.
pub(crate) fn answer_durable(shared: &Shared, pending: Vec<Pending>, ops: u64) {
    if shared.lease_lapsed() {
        for p in pending {
            p.send_err(super::writer::fenced(
                "written locally but not acknowledged",
            ));
        }
        return;
    }
    metrics::counter!("mirrordb_writes_total").increment(ops);
    for p in pending {
        p.send_ok();
    }
}

/// Runs the calling thread at `SCHED_BATCH`, keeping its nice value. The
/// writer wakes the stage just before its own write and fdatasync, and a
/// woken normal thread may preempt the thread that woke it: the stage then
/// applies the batch *before* the fsync it was meant to overlap, on the
/// writer's CPU, adding its CPU time to the write's latency. A batch
/// thread never preempts on wake-up; it takes an idle CPU, or the next
/// turn (one client writing alone: p50 over the Unix socket 298–333 µs
/// against 333–352 µs, BENCHMARKS.md run R). Best effort: a failure is
/// logged and the thread stays as it was.
fn no_wakeup_preemption() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
            set_thread_priority_and_policy, thread_native_id,
        };
        let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
        let nice = rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        // The crate takes a portable 0..=99 priority and maps it to a nice
        // value: find the one that maps to the thread's own.
        let same = nice.ok().and_then(|nice| {
            (0..=99u8)
                .filter_map(|p| ThreadPriorityValue::try_from(p).ok())
                .map(ThreadPriority::Crossplatform)
                .find(|p| p.to_posix(policy).ok() == Some(nice))
        });
        let Some(priority) = same else {
            tracing::debug!(
                "the apply stage keeps its scheduling policy: its nice value is not mapped"
            );
            return;
        };
        if let Err(e) = set_thread_priority_and_policy(thread_native_id(), priority, policy) {
            tracing::warn!(error = %e, "cannot run the apply stage at SCHED_BATCH");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn the_stage_thread_runs_at_sched_batch_with_its_nice_value() {
        use thread_priority::{NormalThreadSchedulePolicy, ThreadSchedulePolicy};
        let batch = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
        let before = thread_priority::thread_schedule_policy().unwrap();
        assert_ne!(before, batch, "the test runs at an ordinary policy");
        let nice = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let (nice_before, policy, nice_after) = std::thread::spawn(move || {
            let nice_before = nice();
            super::no_wakeup_preemption();
            let policy = thread_priority::thread_schedule_policy().unwrap();
            (nice_before, policy, nice())
        })
        .join()
        .unwrap();
        assert_eq!(policy, batch, "the stage runs at SCHED_BATCH");
        assert_eq!(nice_after, nice_before, "and keeps its nice value");
        assert_eq!(thread_priority::thread_schedule_policy().unwrap(), before);
    }
}
