//! The single writer thread: group commit.
//!
//! ```text
//!  requests ──► drain a batch ──► check preconditions ──► encode entries
//!        ▲                                                    │
//!        │                        hand over ◄─────────────────┤
//!        │                            │              one write + one fdatasync
//!     acks ◄──────────────────────────┼───────────────── report synced
//!                                     ▼                        │
//!                 apply stage (applies meanwhile) ── commit ◄──┘
//! ```
//!
//! The apply stage ([`super::stage`]) applies a batch while this thread
//! syncs it, and commits it once it is durable.
//!
//! Every write goes through this thread, so LSNs are dense and a
//! transaction's entries are contiguous. A request is acknowledged only
//! after its entries are durable; reads wait until the data file holds
//! every acknowledged write ([`super::visible`]), so a read after an
//! acknowledged write sees it. If a journal write or fdatasync fails the
//! journal becomes unavailable: the failed batch and every later write are
//! refused with `journal_unavailable`, and the error is never retried
//! (DESIGN §3). Reads go on. The data file's write side (applying, the
//! cache flush) is the [`Lane`] of `engine::apply`: the apply stage applies
//! the primary's batches; on a mirror
//! this thread only appends and fsyncs, and the applier thread applies and
//! flushes.

use super::apply::{self, Applier, Lane, Unjournaled};
use super::backup::{BackupPoint, LockStatus, RotatedSegment, Snapshot};
use super::stage::{Batch, Pending, Stage};
use super::store::{Store, StoreError};
use super::visible::Touched;
use super::{Shared, WriteError};
use crate::journal::writer::{JournalWriter, now_us};
use crate::model::{BLOB_CHUNK_BYTES, ClientIdentity, Op, SessionId, WriteAck, WriteOp};
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Most requests taken into one group-commit batch.
pub const MAX_BATCH_REQUESTS: usize = 4096;
/// Journal bytes buffered before they are written out mid-batch.
const WRITE_OUT_BYTES: usize = 4 << 20;
/// Most writes held while the database is locked; past it they are
/// refused at once with `write_blocked`.
pub const MAX_HELD_REQUESTS: usize = 16_384;
/// BLOB bytes staged per data-file transaction.
const BLOB_APPLY_BYTES: u64 = 32 << 20;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, WriteError>>;

/// What the writer thread is asked to do.
pub(crate) enum Request {
    Write {
        session: SessionId,
        ops: Vec<WriteOp>,
        reply: Reply<WriteAck>,
    },
    SetTable {
        session: SessionId,
        table: String,
        journaled: bool,
        reply: Reply<WriteAck>,
    },
    Blob {
        session: SessionId,
        table: String,
        key: String,
        staged: PathBuf,
        size: u64,
        reply: Reply<WriteAck>,
    },
    DeleteBlob {
        session: SessionId,
        table: String,
        key: String,
        reply: Reply<WriteAck>,
    },
    OpenSession {
        identity: ClientIdentity,
        reply: Reply<SessionId>,
    },
    Tick,
    Shutdown {
        reply: Reply<()>,
    },
    Barrier {
        number: u32,
        reply: Reply<BackupPoint>,
    },
    Rotate {
        reply: Reply<Option<RotatedSegment>>,
    },
    RestorePoint {
        session: SessionId,
        name: String,
        reply: Reply<WriteAck>,
    },
    Lock {
        owner: String,
        lease: Duration,
        reply: Reply<LockStatus>,
    },
    Unlock {
        owner: String,
        reply: Reply<LockStatus>,
    },
    SetRole {
        role: super::replica::Role,
        reply: Reply<()>,
    },
    Promote {
        epoch: u64,
        reply: Reply<(u64, u64)>,
    },
    /// Hold (`on`) or release client writes: a switchover's pause. Answers
    /// the last LSN, durable.
    Hold {
        on: bool,
        reply: Reply<u64>,
    },
    /// Frames from the primary (on a mirror).
    AppendFrames {
        frames: Vec<Vec<u8>>,
        reply: Reply<super::replica::ReplicaPosition>,
    },
    /// A write the node makes itself (rollback): no client size limits.
    Internal {
        session: SessionId,
        ops: Vec<WriteOp>,
        reply: Reply<WriteAck>,
    },
}

impl Request {
    /// Whether the request writes the journal (and so waits while the
    /// database is locked).
    fn writes(&self) -> bool {
        matches!(
            self,
            Request::Write { .. }
                | Request::SetTable { .. }
                | Request::Blob { .. }
                | Request::DeleteBlob { .. }
                | Request::OpenSession { .. }
                | Request::Barrier { .. }
                | Request::Rotate { .. }
                | Request::RestorePoint { .. }
                | Request::Internal { .. }
        )
    }

    /// Whether this is a client write, refused on a mirror. (A backup
    /// barrier and a rotation are allowed there: backups may run on mirrors.)
    pub(super) fn is_client_write(&self) -> bool {
        self.writes() && !matches!(self, Request::Barrier { .. } | Request::Rotate { .. })
    }
}

/// A request with the time by which it must be done; past it, a request
/// that has not started is answered `write_blocked` and not applied.
pub(crate) struct Envelope {
    pub req: Request,
    pub deadline: Instant,
}

/// The flush-and-lock holder.
pub(crate) struct LockState {
    owner: String,
    depth: u32,
    lease: Duration,
    expires: Instant,
}

pub(crate) struct Writer {
    pub journal: JournalWriter,
    /// For reads (preconditions); changes go through the lane.
    pub store: Store,
    pub lane: Arc<Mutex<Lane>>,
    pub applier: Applier,
    /// Known tables and whether they are journaled.
    pub tables: HashMap<String, bool>,
    pub shared: Arc<Shared>,
    pub dirty_bytes_max: u64,
    pub session_idle: Duration,
    pub sessions: HashMap<SessionId, Instant>,
    pub unavailable: Option<String>,
    pub unjournaled_blob_seq: u64,
    pub lock: Option<LockState>,
    /// Client writes are held for a switchover (see [`Request::Hold`]).
    pub hold: bool,
    /// Writes waiting for the lock (or the hold) to be released.
    pub held: Vec<Envelope>,
    pub role: super::replica::Role,
    /// Backup barriers on a mirror waiting for a transaction boundary.
    pub waiting_barriers: Vec<(u32, Reply<BackupPoint>)>,
    /// Applies and acknowledges durable batches while the next is fsynced.
    pub stage: Stage,
    /// Versions written by batches the stage has not applied yet:
    /// (table, key) → (version, 0 when deleted; batch number).
    pub inflight: HashMap<(String, String), (u64, u64)>,
    /// How long the idle writer looks for its next request before it
    /// sleeps ([`IDLE_SPIN`], zero with `journal.busy_poll` off).
    pub idle_spin: Duration,
}

/// How long an idle writer keeps looking for the next request before it
/// sleeps.
pub(super) const IDLE_SPIN: Duration = Duration::from_micros(250);

/// How long the idle writer looks for its next request: `configured` on a
/// primary whose last batch held one request (one client writing alone;
/// the engine's own ticks, every 200 ms, are not counted: after a lone
/// tick on an idle node nobody is waiting);
/// nothing after a larger batch, whose clients' next requests are on their
/// way through the runtime's workers, which need the CPU the looking would
/// take (at 32 clients over the Unix socket it cost 5 % of the
/// throughput: BENCHMARKS.md, "Looked for only after a lone request");
/// nothing on a mirror, whose requests are its primary's stream (a writer
/// found awake gains no client anything there, and on a machine shared
/// with other nodes the looking took CPU time from them: "Looked for
/// before sleeping").
fn idle_spin(role: &super::replica::Role, configured: Duration, last_batch: usize) -> Duration {
    match role {
        super::replica::Role::Primary if last_batch == 1 => configured,
        super::replica::Role::Primary | super::replica::Role::Mirror { .. } => Duration::ZERO,
    }
}

/// The requests of a batch that came from outside the writer's own timer.
fn requests_not_ticks(batch: &[Envelope]) -> usize {
    batch
        .iter()
        .filter(|e| !matches!(e.req, Request::Tick))
        .count()
}

/// The next request, `None` once every sender is gone. An idle writer
/// first looks again for a while, yielding its core to anything runnable
/// between looks: a client that writes one request at a time sends its
/// next one a request's round trip after the answer, and a writer found
/// awake saves that request a thread wake-up. `spin` zero: it sleeps at
/// once.
fn next_request(rx: &mut mpsc::Receiver<Envelope>, spin: Duration) -> Option<Envelope> {
    let start = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(env) => return Some(env),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        if start.elapsed() >= spin {
            return rx.blocking_recv();
        }
        std::thread::yield_now();
    }
}

impl Writer {
    /// Runs until shutdown or until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<Envelope>) {
        let mut batch = Vec::with_capacity(256);
        let mut last_batch = 0;
        while let Some(first) =
            next_request(&mut rx, idle_spin(&self.role, self.idle_spin, last_batch))
        {
            batch.push(first);
            while batch.len() < MAX_BATCH_REQUESTS {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            last_batch = requests_not_ticks(&batch);
            let stop = self.process(&mut batch);
            if self.shared.dirty_bytes.load(Ordering::Relaxed) >= self.dirty_bytes_max {
                self.applier.wake();
            }
            if stop {
                self.stage.drain();
                return;
            }
        }
        // Every handle dropped without a shutdown: flush what we have.
        self.stage.drain();
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "data file flush failed");
        }
    }

    /// Handles a batch; returns true on shutdown.
    fn process(&mut self, batch: &mut Vec<Envelope>) -> bool {
        let mut group: Vec<Request> = Vec::new();
        let mut stop = false;
        let now = Instant::now();
        for env in batch.drain(..) {
            if env.req.is_client_write()
                && let super::replica::Role::Mirror { primary_http } = &self.role
            {
                let e = WriteError::NotPrimary {
                    primary_http: primary_http.clone(),
                };
                reply_err(env.req, e);
                continue;
            }
            if env.req.is_client_write() && self.lease_lapsed() {
                reply_err(env.req, fenced("refused"));
                continue;
            }
            if env.req.writes() {
                if env.deadline <= now {
                    reply_err(env.req, blocked());
                    continue;
                }
                if self.lock.is_some() || (self.hold && env.req.is_client_write()) {
                    if self.held.len() >= MAX_HELD_REQUESTS {
                        reply_err(
                            env.req,
                            WriteError::WriteBlocked(format!(
                                "the database is locked and {MAX_HELD_REQUESTS} writes already wait; not applied"
                            )),
                        );
                    } else {
                        self.held.push(env);
                    }
                    continue;
                }
            }
            match env.req {
                Request::Write { .. }
                | Request::SetTable { .. }
                | Request::DeleteBlob { .. }
                | Request::OpenSession { .. }
                | Request::RestorePoint { .. }
                | Request::Internal { .. } => group.push(env.req),
                Request::Tick => {
                    self.commit_group(std::mem::take(&mut group));
                    // Neither needs the data file current (closing
                    // sessions waits for the stage when it has any to
                    // close): a tick waiting for the stage every 200 ms
                    // stopped the writer for as long as a data-file flush
                    // held the stage up.
                    self.close_idle_sessions();
                    self.expire_lock();
                }
                other => {
                    self.commit_group(std::mem::take(&mut group));
                    // Everything below reads or changes the data file, or
                    // needs it current: the batches handed over go first.
                    self.stage.drain();
                    match other {
                        Request::Blob {
                            session,
                            table,
                            key,
                            staged,
                            size,
                            reply,
                        } => {
                            let r = self.write_blob(session, &table, &key, &staged, size);
                            let _ = std::fs::remove_file(&staged);
                            let _ = reply.send(r);
                        }
                        Request::Shutdown { reply } => {
                            let r = self.shutdown();
                            let _ = reply.send(r);
                            for env in self.held.drain(..) {
                                reply_err(env.req, WriteError::Closed);
                            }
                            stop = true;
                        }
                        Request::Barrier { number, reply } => {
                            if self.is_mirror() && self.in_txn() {
                                // The journal ends inside a replicated
                                // transaction: snapshot at its end.
                                self.waiting_barriers.push((number, reply));
                            } else {
                                let r = self.barrier(number);
                                let _ = reply.send(r);
                            }
                        }
                        Request::Rotate { reply } => {
                            let r = self.rotate();
                            let _ = reply.send(r);
                        }
                        Request::Lock {
                            owner,
                            lease,
                            reply,
                        } => {
                            let r = self.take_lock(owner, lease);
                            let _ = reply.send(r);
                        }
                        Request::Unlock { owner, reply } => {
                            let r = self.release_lock(&owner);
                            let _ = reply.send(r);
                        }
                        Request::SetRole { role, reply } => {
                            tracing::info!(?role, "role changed");
                            let follow = matches!(role, super::replica::Role::Mirror { .. });
                            if let Ok(lane) = self.settled() {
                                apply::lock(&lane).follow = follow;
                            }
                            *self.shared.role.lock().unwrap_or_else(|p| p.into_inner()) =
                                role.clone();
                            self.role = role;
                            let _ = reply.send(Ok(()));
                            if self.is_mirror() {
                                // Held writes now answer not_primary with the
                                // new primary's address.
                                self.set_hold(false);
                            }
                        }
                        Request::Promote { epoch, reply } => {
                            let r = self.promote(epoch);
                            let _ = reply.send(r);
                            self.set_hold(false);
                        }
                        Request::Hold { on, reply } => {
                            let r = self.durable_position();
                            let _ = reply.send(r);
                            self.set_hold(on);
                        }
                        Request::AppendFrames { frames, reply } => {
                            let r = self.append_frames(frames);
                            let _ = reply.send(r);
                            if !self.waiting_barriers.is_empty() && !self.in_txn() {
                                for (number, reply) in std::mem::take(&mut self.waiting_barriers) {
                                    let r = self.barrier(number);
                                    let _ = reply.send(r);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        self.commit_group(group);
        stop
    }

    fn journal_error(&mut self) -> Option<WriteError> {
        if self.unavailable.is_none() && self.shared.apply_failed.load(Ordering::Acquire) {
            // The applier stopped: this node's data file falls behind its
            // journal for good, so it takes nothing more.
            let msg = self
                .shared
                .journal_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "applying the journal failed".into());
            self.unavailable = Some(msg);
        }
        self.unavailable
            .as_ref()
            .map(|e| WriteError::JournalUnavailable(e.clone()))
    }

    /// The lane with everything durable applied. A failure is recorded by
    /// the lane ([`Writer::journal_error`] then refuses writes).
    fn settled(&mut self) -> Result<Arc<Mutex<Lane>>, WriteError> {
        let lane = self.lane.clone();
        let r = apply::lock(&lane).catch_up();
        r.map_err(|e| WriteError::Storage(e.to_string()))?;
        Ok(lane)
    }

    /// Whether the applied journal ends inside a transaction.
    fn in_txn(&mut self) -> bool {
        match self.settled() {
            Ok(lane) => apply::lock(&lane).replayer.in_txn(),
            // Nothing more is applied: no transaction will close.
            Err(_) => false,
        }
    }

    fn mark_unavailable(&mut self, what: &str, e: &std::io::Error) {
        let msg = format!(
            "{what} failed on {}: {e}",
            self.journal.segment_path().display()
        );
        tracing::error!(error = %msg, "journal unavailable; refusing writes");
        metrics::gauge!("mirrordb_journal_available").set(0.0);
        self.shared.record_error(msg.clone());
        self.unavailable = Some(msg);
    }

    fn touch(&mut self, session: SessionId) {
        if session != SessionId::SYSTEM {
            self.sessions.insert(session, Instant::now());
        }
    }

    /// Journals, syncs and applies a group of writes with one fdatasync.
    fn commit_group(&mut self, group: Vec<Request>) {
        if group.is_empty() {
            return;
        }
        // The applied count is read before the view opens: a batch it
        // counts is in the view, any later one is still in `inflight`.
        let applied = self.stage.applied();
        self.inflight.retain(|_, (_, seq)| *seq > applied);
        let seq = self.stage.next_seq();
        let view = match self.store.read() {
            Ok(v) => v,
            Err(e) => {
                for r in group {
                    reply_err(r, WriteError::Storage(e.to_string()));
                }
                self.stage.dispatch(Batch::empty(seq));
                return;
            }
        };
        let now = now_us();
        let mut entries: Vec<(u64, Op)> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut unjournaled: Vec<Unjournaled> = Vec::new();
        let mut ops_acked = 0u64;
        for req in group {
            if let Some(e) = self.journal_error() {
                reply_err(req, e);
                continue;
            }
            match req {
                Request::Write {
                    session,
                    ops,
                    reply,
                }
                | Request::Internal {
                    session,
                    ops,
                    reply,
                } => {
                    match self.plan_write(
                        session,
                        ops,
                        &view,
                        seq,
                        &mut entries,
                        &mut unjournaled,
                        now,
                    ) {
                        Ok(ack) => {
                            ops_acked += ack.versions.len() as u64;
                            self.touch(session);
                            pending.push(Pending::Ack(reply, ack));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Request::SetTable {
                    session,
                    table,
                    journaled,
                    reply,
                } => {
                    let op = if self.tables.contains_key(&table) {
                        Op::TableAlter {
                            session,
                            table: table.clone(),
                            journaled,
                        }
                    } else {
                        Op::TableCreate {
                            session,
                            table: table.clone(),
                            journaled,
                        }
                    };
                    let lsn = self.journal.append(&op, now);
                    entries.push((lsn, op));
                    self.tables.insert(table, journaled);
                    pending.push(Pending::Ack(
                        reply,
                        WriteAck {
                            lsn,
                            versions: vec![],
                        },
                    ));
                }
                Request::DeleteBlob {
                    session,
                    table,
                    key,
                    reply,
                } => {
                    let op = Op::BlobDelete {
                        session,
                        table,
                        key,
                    };
                    let lsn = self.journal.append(&op, now);
                    entries.push((lsn, op));
                    pending.push(Pending::Ack(
                        reply,
                        WriteAck {
                            lsn,
                            versions: vec![lsn],
                        },
                    ));
                }
                Request::RestorePoint {
                    session,
                    name,
                    reply,
                } => {
                    let op = Op::RestorePoint { name };
                    let lsn = self.journal.append(&op, now);
                    entries.push((lsn, op));
                    self.touch(session);
                    pending.push(Pending::Ack(
                        reply,
                        WriteAck {
                            lsn,
                            versions: vec![],
                        },
                    ));
                }
                Request::OpenSession { identity, reply } => {
                    let lsn = self.journal.next_lsn();
                    let op = Op::SessionOpen {
                        session: SessionId(lsn),
                        identity,
                    };
                    self.journal.append(&op, now);
                    entries.push((lsn, op));
                    self.touch(SessionId(lsn));
                    pending.push(Pending::Session(reply, SessionId(lsn)));
                }
                other => reply_err(other, WriteError::Storage("misrouted request".into())),
            }
            if self.journal.buffered() > WRITE_OUT_BYTES
                && let Err(e) = self.journal.write_out()
            {
                self.mark_unavailable("journal write", &e);
            }
        }
        drop(view);
        let journaled = !entries.is_empty();
        // A batch that is all journal entries is answered here as soon as
        // it is durable; reads wait for the stage's commit instead
        // ([`super::visible`]). Writes to unjournaled tables are durable
        // only through the data file: their batch is answered by the stage.
        let answer_here = journaled && unjournaled.is_empty();
        let touched = if answer_here {
            Touched::of(&entries)
        } else {
            Touched::default()
        };
        let (pending, early, ops_staged) = if answer_here {
            (Vec::new(), pending, 0)
        } else {
            (pending, Vec::new(), ops_acked)
        };
        // The stage applies the batch while it is written and synced, and
        // commits it once it is reported durable.
        self.stage.hand_over(Batch {
            seq,
            entries,
            unjournaled,
            pending,
            ops: ops_staged,
        });
        if journaled && self.unavailable.is_none() {
            if let Err(e) = self.journal.write_out() {
                self.mark_unavailable("journal write", &e);
            } else {
                let t = Instant::now();
                match self.journal.sync() {
                    Ok(()) => {
                        metrics::histogram!("mirrordb_fsync_seconds")
                            .record(t.elapsed().as_secs_f64());
                        metrics::counter!("mirrordb_write_batches_total").increment(1);
                    }
                    Err(e) => self.mark_unavailable("journal fdatasync", &e),
                }
            }
        }
        if journaled && let Some(msg) = self.unavailable.clone() {
            for p in early {
                p.send_err(WriteError::JournalUnavailable(msg.clone()));
            }
            self.stage.sync_failed(seq, msg);
            return;
        }
        let last = self.journal.last_lsn();
        self.shared.durable_lsn.store(last, Ordering::Release);
        let _ = self.shared.durable_tx.send_replace(last);
        // The stage first: reads wait for its commit, the answers only for
        // this thread.
        self.stage.synced(seq);
        if !early.is_empty() {
            // Before the answers go: from now on a read waits for the
            // stage's commit of this batch.
            self.shared.read_gate.acknowledged(last, &touched);
            super::stage::answer_durable(&self.shared, early, ops_acked);
        }
        self.after_batch();
    }

    /// Decides what a write request journals; checks its preconditions
    /// against the data file plus this batch's earlier writes.
    #[allow(clippy::too_many_arguments)]
    fn plan_write(
        &mut self,
        session: SessionId,
        ops: Vec<WriteOp>,
        view: &super::store::ReadView,
        seq: u64,
        entries: &mut Vec<(u64, Op)>,
        unjournaled: &mut Vec<Unjournaled>,
        now: u64,
    ) -> Result<WriteAck, WriteError> {
        if ops.is_empty() {
            return Err(crate::model::InvalidInput::EmptyTransaction.into());
        }
        let journaled_of = |t: &str| self.tables.get(t).copied().unwrap_or(true);
        let first = journaled_of(ops[0].table());
        if let Some(other) = ops.iter().find(|o| journaled_of(o.table()) != first) {
            return Err(WriteError::MixedJournaling(format!(
                "{} is {}journaled, {} is not",
                ops[0].table(),
                if first { "" } else { "un" },
                other.table()
            )));
        }
        for op in &ops {
            if let Some(expected) = op.if_version() {
                let k = (op.table().to_owned(), op.key().to_owned());
                let actual = match self.inflight.get(&k) {
                    Some((v, _)) => *v,
                    None => view
                        .version(op.table(), op.key())
                        .map_err(|e| WriteError::Storage(e.to_string()))?,
                };
                if actual != expected {
                    return Err(WriteError::VersionConflict {
                        table: k.0,
                        key: k.1,
                        expected,
                        actual,
                    });
                }
            }
        }
        if !first {
            let version = self.journal.last_lsn();
            let mut versions = Vec::with_capacity(ops.len());
            for op in ops {
                let (table, key, value) = match op {
                    WriteOp::Put {
                        table, key, value, ..
                    } => (table, key, Some(value)),
                    WriteOp::Delete { table, key, .. } => (table, key, None),
                };
                self.inflight.insert(
                    (table.clone(), key.clone()),
                    (if value.is_some() { version } else { 0 }, seq),
                );
                versions.push(version);
                unjournaled.push(Unjournaled {
                    table,
                    key,
                    value,
                    version,
                });
            }
            return Ok(WriteAck {
                lsn: version,
                versions,
            });
        }
        for op in &ops {
            if !self.tables.contains_key(op.table()) {
                let create = Op::TableCreate {
                    session,
                    table: op.table().to_owned(),
                    journaled: true,
                };
                let lsn = self.journal.append(&create, now);
                entries.push((lsn, create));
                self.tables.insert(op.table().to_owned(), true);
            }
        }
        let txn = ops.len() > 1;
        if txn {
            let begin = Op::TxnBegin {
                session,
                ops: ops.len() as u32,
            };
            let lsn = self.journal.append(&begin, now);
            entries.push((lsn, begin));
        }
        let mut versions = Vec::with_capacity(ops.len());
        for op in ops {
            let entry = match op {
                WriteOp::Put {
                    table, key, value, ..
                } => Op::Put {
                    session,
                    table,
                    key,
                    value,
                },
                WriteOp::Delete { table, key, .. } => Op::Delete {
                    session,
                    table,
                    key,
                },
            };
            let lsn = self.journal.append(&entry, now);
            if let Some((table, Some(key))) = entry.target() {
                let v = if matches!(entry, Op::Put { .. }) {
                    lsn
                } else {
                    0
                };
                self.inflight
                    .insert((table.to_owned(), key.to_owned()), (v, seq));
            }
            versions.push(lsn);
            entries.push((lsn, entry));
        }
        let mut lsn = self.journal.last_lsn();
        if txn {
            lsn = self.journal.append(&Op::TxnCommit, now);
            entries.push((lsn, Op::TxnCommit));
        }
        Ok(WriteAck { lsn, versions })
    }

    fn apply(
        &mut self,
        entries: Vec<(u64, Op)>,
        unjournaled: Vec<Unjournaled>,
    ) -> Result<(), StoreError> {
        apply::lock(&self.lane).apply(entries, unjournaled)
    }

    fn fail_store(&mut self, e: &StoreError) {
        let msg = format!("data file update failed: {e}");
        tracing::error!(error = %msg, "refusing writes");
        self.shared.record_error(msg.clone());
        self.unavailable = Some(msg);
    }

    fn after_batch(&mut self) {
        // Published after every batch, not only at open: a metrics recorder
        // installed after the engine opened would otherwise never see it.
        metrics::gauge!("mirrordb_journal_available").set(if self.unavailable.is_some() {
            0.0
        } else {
            1.0
        });
        let last = self.journal.last_lsn();
        metrics::gauge!("mirrordb_last_lsn").set(last as f64);
        metrics::gauge!("mirrordb_flush_lag_entries")
            .set(last.saturating_sub(self.shared.checkpoint_lsn.load(Ordering::Relaxed)) as f64);
        metrics::counter!("mirrordb_journal_bytes_total").absolute(self.journal.written_bytes());
        if self.journal.wants_rotation() {
            match self.journal.rotate() {
                Ok(closed) => {
                    tracing::info!(closed = %closed.display(), next_lsn = self.journal.next_lsn(), "journal segment rotated")
                }
                Err(e) => self.mark_unavailable("journal rotation", &e),
            }
        }
    }

    /// Writes one BLOB from its staged file: journaled in 1 MiB chunks inside
    /// a transaction, staged in the data file as it goes (in data-file
    /// transactions of at most 32 MiB), linked at the commit.
    fn write_blob(
        &mut self,
        session: SessionId,
        table: &str,
        key: &str,
        staged: &std::path::Path,
        size: u64,
    ) -> Result<WriteAck, WriteError> {
        if let Some(e) = self.journal_error() {
            return Err(e);
        }
        let mut file = std::fs::File::open(staged).map_err(|e| WriteError::Body(e.to_string()))?;
        let journaled = self.tables.get(table).copied().unwrap_or(true);
        if !journaled {
            return self.write_unjournaled_blob(table, key, &mut file, size);
        }
        let now = now_us();
        let mut io_failure: Option<(&'static str, std::io::Error)> = None;
        let mut blob_lsn = 0;
        let mut begun = false;
        let mut finished = false;
        let mut outcome: Result<(), WriteError> = Ok(());
        let lane = self.lane.clone();
        let mut l = apply::lock(&lane);
        while !finished && outcome.is_ok() {
            let journal = &mut self.journal;
            let Lane {
                store, replayer, ..
            } = &mut *l;
            let tables = &mut self.tables;
            let io_failure = &mut io_failure;
            let file = &mut file;
            let step = store.apply(false, |w| -> Result<(), WriteError> {
                if !begun {
                    begun = true;
                    if !tables.contains_key(table) {
                        let op = Op::TableCreate {
                            session,
                            table: table.to_owned(),
                            journaled: true,
                        };
                        let lsn = journal.append(&op, now);
                        replayer.apply(w, lsn, op)?;
                        tables.insert(table.to_owned(), true);
                    }
                    let begin = Op::TxnBegin { session, ops: 1 };
                    let lsn = journal.append(&begin, now);
                    replayer.apply(w, lsn, begin)?;
                    let bb = Op::BlobBegin {
                        session,
                        table: table.to_owned(),
                        key: key.to_owned(),
                        size,
                    };
                    blob_lsn = journal.append(&bb, now);
                    replayer.apply(w, blob_lsn, bb)?;
                }
                let mut staged_bytes = 0u64;
                while staged_bytes < BLOB_APPLY_BYTES {
                    let mut chunk = vec![0u8; BLOB_CHUNK_BYTES];
                    let n =
                        read_full(file, &mut chunk).map_err(|e| WriteError::Body(e.to_string()))?;
                    if n == 0 {
                        finished = true;
                        break;
                    }
                    chunk.truncate(n);
                    let op = Op::BlobChunk { bytes: chunk };
                    let lsn = journal.append(&op, now);
                    replayer.apply(w, lsn, op)?;
                    staged_bytes += n as u64;
                    if journal.buffered() > WRITE_OUT_BYTES
                        && let Err(e) = journal.write_out()
                    {
                        let msg = e.to_string();
                        *io_failure = Some(("journal write", e));
                        return Err(WriteError::JournalUnavailable(msg));
                    }
                }
                Ok(())
            });
            match step {
                Ok(((), bytes)) => l.dirty_bytes += bytes,
                Err(e) => outcome = Err(e),
            }
        }
        if outcome.is_ok() {
            let lsn = self.journal.append(&Op::TxnCommit, now);
            let t = Instant::now();
            if let Err(e) = self.journal.write_out() {
                io_failure = Some(("journal write", e));
            } else if let Err(e) = self.journal.sync() {
                io_failure = Some(("journal fdatasync", e));
            } else {
                metrics::histogram!("mirrordb_fsync_seconds").record(t.elapsed().as_secs_f64());
                self.shared.durable_lsn.store(lsn, Ordering::Release);
                let _ = self.shared.durable_tx.send_replace(lsn);
                let Lane {
                    store, replayer, ..
                } = &mut *l;
                match store.apply(false, |w| replayer.apply(w, lsn, Op::TxnCommit)) {
                    Ok(((), bytes)) => {
                        l.applied(bytes);
                        drop(l);
                        self.touch(session);
                        metrics::counter!("mirrordb_writes_total").increment(1);
                        self.after_batch();
                        return Ok(WriteAck {
                            lsn,
                            versions: vec![blob_lsn],
                        });
                    }
                    Err(e) => {
                        drop(l);
                        self.fail_store(&e);
                        return Err(WriteError::Storage(e.to_string()));
                    }
                }
            }
        }
        drop(l);
        if let Some((what, e)) = io_failure {
            // The journal is unavailable; restart recovery aborts the open
            // transaction.
            self.mark_unavailable(what, &e);
            return Err(WriteError::JournalUnavailable(e.to_string()));
        }
        let err = match outcome {
            Err(e) => e,
            Ok(()) => WriteError::Storage("BLOB write failed".into()),
        };
        if matches!(err, WriteError::Storage(_)) {
            self.fail_store(&StoreError(err.to_string()));
        } else if begun {
            // The BLOB's transaction is open in the journal: close it, so
            // later entries are never read as part of it.
            if let Err(e) = self.journal_system(vec![Op::TxnAbort]) {
                tracing::error!(error = %e, "could not journal the abort of a failed BLOB write");
            }
        }
        Err(err)
    }

    fn write_unjournaled_blob(
        &mut self,
        table: &str,
        key: &str,
        file: &mut std::fs::File,
        size: u64,
    ) -> Result<WriteAck, WriteError> {
        self.unjournaled_blob_seq += 1;
        let blob_id = self.unjournaled_blob_seq;
        let version = self.journal.last_lsn();
        let mut l = apply::lock(&self.lane);
        let ((), bytes) = l.store.apply(false, |w| -> Result<(), WriteError> {
            let mut index = 0u32;
            loop {
                let mut chunk = vec![0u8; BLOB_CHUNK_BYTES];
                let n = read_full(file, &mut chunk).map_err(|e| WriteError::Body(e.to_string()))?;
                if n == 0 {
                    break;
                }
                w.stage_chunk(blob_id, index, &chunk[..n])?;
                index += 1;
            }
            w.link_blob(
                table,
                key,
                super::store::BlobMeta {
                    blob_id,
                    size,
                    version,
                },
            )?;
            Ok(())
        })?;
        l.applied(bytes);
        Ok(WriteAck {
            lsn: version,
            versions: vec![version],
        })
    }

    /// Applies what is left, then makes the data file durable recording
    /// `checkpoint_lsn`.
    fn flush(&mut self) -> Result<u64, WriteError> {
        let r = apply::lock(&self.lane).flush_current();
        r.map_err(|e| WriteError::Storage(e.to_string()))
    }

    /// Appends and syncs system entries outside a client batch.
    fn journal_system(&mut self, ops: Vec<Op>) -> Result<(), WriteError> {
        if let Some(e) = self.journal_error() {
            return Err(e);
        }
        let now = now_us();
        let mut entries = Vec::new();
        for op in ops {
            let lsn = self.journal.append(&op, now);
            entries.push((lsn, op));
        }
        self.journal
            .write_out()
            .and_then(|()| self.journal.sync())
            .map_err(|e| {
                self.mark_unavailable("journal write", &e);
                WriteError::JournalUnavailable(e.to_string())
            })?;
        let last = self.journal.last_lsn();
        self.shared.durable_lsn.store(last, Ordering::Release);
        let _ = self.shared.durable_tx.send_replace(last);
        self.apply(entries, Vec::new())
            .map_err(|e| WriteError::Storage(e.to_string()))
    }

    fn close_idle_sessions(&mut self) {
        if self.is_mirror() {
            // A mirror journals nothing of its own; sessions of its time as
            // primary end with that role.
            self.sessions.clear();
            return;
        }
        let idle: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, t)| t.elapsed() >= self.session_idle)
            .map(|(s, _)| *s)
            .collect();
        if idle.is_empty() || self.unavailable.is_some() {
            return;
        }
        for s in &idle {
            self.sessions.remove(s);
        }
        // `journal_system` applies on this thread: after the stage's batches.
        self.stage.drain();
        let ops = idle
            .iter()
            .map(|s| Op::SessionClose { session: *s })
            .collect();
        if self.journal_system(ops).is_ok() {
            let mut reg = self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            reg.retain(|_, s| !idle.contains(s));
        }
    }

    /// Appends a primary's frames (already checksum-verified by the caller).
    fn append_frames(
        &mut self,
        frames: Vec<Vec<u8>>,
    ) -> Result<super::replica::ReplicaPosition, WriteError> {
        use crate::journal::format::{decode_frame, decode_op};
        if let Some(e) = self.journal_error() {
            return Err(e);
        }
        if !matches!(self.role, super::replica::Role::Mirror { .. }) {
            return Err(WriteError::Replication(
                "this node is the primary; it does not take replicated entries".into(),
            ));
        }
        // Check the whole batch before writing any of it.
        let mut next = self.journal.next_lsn();
        let mut epoch = self.journal.epoch();
        let mut accepted = Vec::with_capacity(frames.len());
        for bytes in frames {
            let f = decode_frame(&bytes).map_err(|e| WriteError::Replication(e.to_string()))?;
            let h = f.header;
            if h.lsn < next {
                continue; // a duplicate after a reconnect
            }
            if h.lsn != next {
                return Err(WriteError::Replication(format!(
                    "gap in replicated entries: expected LSN {next}, got {}",
                    h.lsn
                )));
            }
            if h.epoch < epoch {
                return Err(WriteError::StaleEpoch {
                    got: h.epoch,
                    seen: epoch,
                });
            }
            // Checked here, applied later (from the journal, by the applier).
            decode_op(f.payload).map_err(|e| WriteError::Replication(e.to_string()))?;
            epoch = h.epoch;
            next += 1;
            accepted.push((h, bytes));
        }
        let appended = accepted.len();
        for (h, bytes) in accepted {
            if h.epoch > self.journal.epoch() {
                // A new epoch starts a new segment, so its header says so.
                self.journal.write_out().map_err(|e| {
                    self.mark_unavailable("journal write", &e);
                    WriteError::JournalUnavailable(e.to_string())
                })?;
                if !self.journal.segment_is_empty() {
                    self.journal
                        .sync()
                        .and_then(|()| self.journal.rotate().map(|_| ()))
                        .map_err(|e| {
                            self.mark_unavailable("journal rotation", &e);
                            WriteError::JournalUnavailable(e.to_string())
                        })?;
                }
                self.journal.set_epoch(h.epoch);
                self.shared.epoch.store(h.epoch, Ordering::Release);
                self.note_epoch(h.epoch, h.lsn);
            }
            self.journal.append_frame(h.lsn, &bytes);
        }
        if appended > 0 {
            self.journal.write_out().map_err(|e| {
                self.mark_unavailable("journal write", &e);
                WriteError::JournalUnavailable(e.to_string())
            })?;
            let t = Instant::now();
            self.journal.sync().map_err(|e| {
                self.mark_unavailable("journal fdatasync", &e);
                WriteError::JournalUnavailable(e.to_string())
            })?;
            metrics::histogram!("mirrordb_fsync_seconds").record(t.elapsed().as_secs_f64());
            let last = self.journal.last_lsn();
            self.shared.durable_lsn.store(last, Ordering::Release);
            let _ = self.shared.durable_tx.send_replace(last);
            // Applied by the applier thread, which reads them back from
            // the journal: this answer does not wait for the data file.
            self.applier.wake();
            self.after_batch();
        }
        Ok(super::replica::ReplicaPosition {
            flushed_lsn: self.journal.last_lsn(),
            applied_lsn: self.shared.applied_lsn.load(Ordering::Acquire),
            epoch: self.journal.epoch(),
        })
    }

    fn is_mirror(&self) -> bool {
        matches!(self.role, super::replica::Role::Mirror { .. })
    }

    /// Records where an epoch starts (persisted with the next data-file
    /// commit; recovery also rebuilds it from the journal).
    fn note_epoch(&mut self, epoch: u64, first_lsn: u64) {
        let mut h = self
            .shared
            .epoch_history
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        super::recovery::merge_epochs(&mut h, &[(epoch, first_lsn)]);
        self.shared
            .epoch_history_dirty
            .store(true, Ordering::Release);
    }

    fn promote(&mut self, epoch: u64) -> Result<(u64, u64), WriteError> {
        if let Some(e) = self.journal_error() {
            return Err(e);
        }
        if epoch <= self.journal.epoch() {
            return Err(WriteError::StaleEpoch {
                got: epoch,
                seen: self.journal.epoch(),
            });
        }
        // Everything replicated is applied, and from here this thread
        // applies what it journals itself.
        let lane = self.settled()?;
        apply::lock(&lane).follow = false;
        let io = |what: &'static str| move |e: std::io::Error| (what, e);
        let rotated = if self.journal.segment_is_empty() {
            Ok(())
        } else {
            self.journal
                .sync()
                .map_err(io("journal fdatasync"))
                .and_then(|()| {
                    self.journal
                        .rotate()
                        .map(|_| ())
                        .map_err(io("journal rotation"))
                })
        };
        if let Err((what, e)) = rotated {
            self.mark_unavailable(what, &e);
            return Err(WriteError::JournalUnavailable(e.to_string()));
        }
        self.journal.set_epoch(epoch);
        self.shared.epoch.store(epoch, Ordering::Release);
        let first_lsn = self.journal.next_lsn();
        self.note_epoch(epoch, first_lsn);
        let old = std::mem::replace(&mut self.role, super::replica::Role::Primary);
        *self.shared.role.lock().unwrap_or_else(|p| p.into_inner()) = super::replica::Role::Primary;
        if self.in_txn() {
            // The old primary died inside a transaction: it was never
            // acknowledged, and this node now says so in the journal.
            self.journal_system(vec![Op::TxnAbort])?;
        }
        // Durable record of the epoch (and a flushed data file) before any
        // write is taken under it.
        self.flush()?;
        tracing::info!(epoch, first_lsn, previous_role = ?old, "promoted to primary");
        Ok((epoch, first_lsn))
    }

    /// The backup barrier: marker, fsync, flush, rotate, snapshot. On a
    /// mirror no marker is journaled (its journal stays identical to the
    /// primary's) and S is the last replicated entry, at a transaction
    /// boundary.
    fn barrier(&mut self, number: u32) -> Result<BackupPoint, WriteError> {
        let started = Instant::now();
        if let Some(e) = self.journal_error() {
            return Err(e);
        }
        if !self.is_mirror() {
            self.journal_system(vec![Op::BackupMarker { number }])?;
        }
        let lsn = self.journal.last_lsn();
        let marked = started.elapsed();
        // Everything <= S applied (a mirror's applier may be behind); no
        // flush: the snapshot is an MVCC view, which sees non-durable
        // commits, and a flush would hold writers for 50-250 ms. The
        // pipeline flushes before it drops the archived segments.
        self.settled()?;
        let applied = started.elapsed();
        let closed = if self.journal.segment_is_empty() {
            self.journal.segment_path().to_owned()
        } else {
            self.journal.rotate().map_err(|e| {
                self.mark_unavailable("journal rotation", &e);
                WriteError::JournalUnavailable(e.to_string())
            })?
        };
        let rotated = started.elapsed();
        let view = self
            .store
            .read()
            .map_err(|e| WriteError::Storage(e.to_string()))?;
        let (segs, _) = crate::journal::scan::list_segments(self.journal.dir())
            .map_err(|e| WriteError::Storage(e.to_string()))?;
        let segments = segs
            .into_iter()
            .filter(|s| s.header.first_lsn <= lsn)
            .map(|s| s.path)
            .collect();
        let took = started.elapsed();
        metrics::histogram!("mirrordb_backup_barrier_seconds").record(took.as_secs_f64());
        // Where the time went (each a time since the start): the marker
        // journaled and synced, the apply stage caught up, the segment
        // closed and the next one created.
        tracing::info!(
            number,
            lsn,
            closed = %closed.display(),
            barrier_us = took.as_micros() as u64,
            marked_us = marked.as_micros() as u64,
            applied_us = applied.as_micros() as u64,
            rotated_us = rotated.as_micros() as u64,
            "backup barrier"
        );
        Ok(BackupPoint {
            lsn,
            epoch: self.journal.epoch(),
            db_id: self.journal.db_id(),
            time_us: now_us(),
            segments,
            snapshot: Snapshot {
                view,
                _open: super::backup::OpenSnapshot::new(self.shared.clone()),
            },
        })
    }

    fn rotate(&mut self) -> Result<Option<RotatedSegment>, WriteError> {
        if let Some(e) = self.journal_error() {
            return Err(e);
        }
        if self.journal.segment_is_empty() {
            return Ok(None);
        }
        let last_lsn = self.journal.last_lsn();
        let closed = self.journal.rotate().map_err(|e| {
            self.mark_unavailable("journal rotation", &e);
            WriteError::JournalUnavailable(e.to_string())
        })?;
        tracing::info!(closed = %closed.display(), last_lsn, "journal rotated on request");
        Ok(Some(RotatedSegment { closed, last_lsn }))
    }

    fn publish_lock(&self) -> LockStatus {
        let st = match &self.lock {
            Some(l) => LockStatus {
                locked: true,
                owner: Some(l.owner.clone()),
                depth: l.depth,
                expires_in_ms: Some(
                    l.expires
                        .saturating_duration_since(Instant::now())
                        .as_millis() as u64,
                ),
            },
            None => LockStatus::default(),
        };
        *self.shared.lock.lock().unwrap_or_else(|p| p.into_inner()) = st.clone();
        st
    }

    fn take_lock(&mut self, owner: String, lease: Duration) -> Result<LockStatus, WriteError> {
        match &mut self.lock {
            Some(l) if l.owner == owner => {
                l.depth += 1;
                l.lease = lease;
                l.expires = Instant::now() + lease;
            }
            Some(l) => {
                return Err(WriteError::WriteBlocked(format!(
                    "the database is locked by {}",
                    l.owner
                )));
            }
            None => {
                // Everything acknowledged is already fsynced in the journal;
                // flushing the data file makes the data directory consistent
                // on its own for an external snapshot.
                self.flush()?;
                tracing::info!(%owner, lease_ms = lease.as_millis() as u64, "database flushed and locked");
                self.lock = Some(LockState {
                    owner,
                    depth: 1,
                    lease,
                    expires: Instant::now() + lease,
                });
            }
        }
        Ok(self.publish_lock())
    }

    fn release_lock(&mut self, owner: &str) -> Result<LockStatus, WriteError> {
        match &mut self.lock {
            Some(l) if l.owner == owner => {
                l.depth -= 1;
                if l.depth == 0 {
                    self.lock = None;
                    tracing::info!(%owner, "database unlocked");
                }
            }
            Some(l) => {
                return Err(WriteError::WriteBlocked(format!(
                    "the lock is held by {}, not {owner}",
                    l.owner
                )));
            }
            None => {}
        }
        let st = self.publish_lock();
        if self.lock.is_none() {
            self.resume_held();
        }
        Ok(st)
    }

    /// Releases a lock whose lease lapsed, and refuses held writes whose
    /// deadline passed.
    fn expire_lock(&mut self) {
        if let Some(l) = &self.lock
            && Instant::now() >= l.expires
        {
            tracing::warn!(owner = %l.owner, lease_ms = l.lease.as_millis() as u64, "lock lease lapsed; unlocking");
            self.lock = None;
            self.publish_lock();
            self.resume_held();
            return;
        }
        if self.lock.is_some() || self.hold {
            let now = Instant::now();
            let (expired, waiting): (Vec<_>, Vec<_>) =
                self.held.drain(..).partition(|e| e.deadline <= now);
            self.held = waiting;
            for env in expired {
                reply_err(env.req, blocked());
            }
            self.publish_lock();
        }
    }

    /// Whether this node's primary lease has run out.
    fn lease_lapsed(&self) -> bool {
        self.shared.lease_lapsed()
    }

    /// The last LSN, made durable first if it is not yet.
    fn durable_position(&mut self) -> Result<u64, WriteError> {
        if let Some(e) = self.journal_error() {
            return Err(e);
        }
        let last = self.journal.last_lsn();
        if self.shared.durable_lsn.load(Ordering::Acquire) < last {
            if let Err(e) = self.journal.write_out().and_then(|()| self.journal.sync()) {
                self.mark_unavailable("journal fdatasync", &e);
                return Err(WriteError::JournalUnavailable(e.to_string()));
            }
            self.shared.durable_lsn.store(last, Ordering::Release);
            let _ = self.shared.durable_tx.send_replace(last);
        }
        Ok(last)
    }

    fn set_hold(&mut self, on: bool) {
        if self.hold == on {
            return;
        }
        self.hold = on;
        tracing::info!(
            held = self.held.len(),
            "client writes {}",
            if on { "held" } else { "released" }
        );
        if !on {
            self.resume_held();
        }
    }

    fn resume_held(&mut self) {
        let mut held = std::mem::take(&mut self.held);
        if !held.is_empty() {
            self.process(&mut held);
        }
    }

    fn shutdown(&mut self) -> Result<(), WriteError> {
        // A mirror journals nothing of its own: its journal must stay the
        // primary's byte for byte, or a restart would resume past an entry
        // of the primary it never received.
        // Nor does a primary whose lease lapsed: its successor may be
        // writing those LSNs already.
        if self.unavailable.is_none() && !self.is_mirror() && !self.lease_lapsed() {
            let mut ops: Vec<Op> = self
                .sessions
                .drain()
                .map(|(s, _)| Op::SessionClose { session: s })
                .collect();
            ops.push(Op::DataFileClose);
            self.journal_system(ops)?;
        }
        self.flush().map(|_| ())
    }
}

fn reply_err(req: Request, e: WriteError) {
    match req {
        Request::Write { reply, .. }
        | Request::SetTable { reply, .. }
        | Request::Blob { reply, .. }
        | Request::DeleteBlob { reply, .. }
        | Request::RestorePoint { reply, .. }
        | Request::Internal { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::Barrier { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::Rotate { reply } => {
            let _ = reply.send(Err(e));
        }
        Request::Lock { reply, .. } | Request::Unlock { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::SetRole { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::Promote { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::Hold { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::AppendFrames { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::OpenSession { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::Shutdown { reply } => {
            let _ = reply.send(Err(e));
        }
        Request::Tick => {}
    }
}

pub(crate) fn fenced(what: &str) -> WriteError {
    WriteError::Fenced(format!(
        "this node's primary lease lapsed: the write was {what}; it takes no writes until the cluster confirms it as primary or names another"
    ))
}

fn blocked() -> WriteError {
    WriteError::WriteBlocked(
        "the write waited past its deadline (database locked or busy); it was not applied".into(),
    )
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod next_request_tests {
    use super::*;

    fn tick() -> Envelope {
        Envelope {
            req: Request::Tick,
            deadline: Instant::now() + Duration::from_secs(60),
        }
    }

    #[test]
    fn only_a_primary_after_a_lone_request_looks_for_its_next_one() {
        use crate::engine::replica::Role;
        assert_eq!(idle_spin(&Role::Primary, IDLE_SPIN, 1), IDLE_SPIN);
        assert_eq!(idle_spin(&Role::Primary, Duration::ZERO, 1), Duration::ZERO);
        // Only the engine's tick (or nothing yet): nobody waits.
        assert_eq!(idle_spin(&Role::Primary, IDLE_SPIN, 0), Duration::ZERO);
        let (reply, _rx) = oneshot::channel();
        let shutdown = Envelope {
            req: Request::Shutdown { reply },
            deadline: Instant::now() + Duration::from_secs(60),
        };
        assert_eq!(requests_not_ticks(&[tick()]), 0);
        assert_eq!(requests_not_ticks(&[tick(), shutdown, tick()]), 1);
        // Several clients: their next requests need the CPU.
        assert_eq!(idle_spin(&Role::Primary, IDLE_SPIN, 2), Duration::ZERO);
        assert_eq!(idle_spin(&Role::Primary, IDLE_SPIN, 32), Duration::ZERO);
        let mirror = Role::Mirror { primary_http: None };
        for last in [0, 1, 32] {
            assert_eq!(idle_spin(&mirror, IDLE_SPIN, last), Duration::ZERO);
        }
    }

    #[test]
    fn a_request_is_taken_whether_it_comes_while_the_writer_looks_or_sleeps() {
        // Busy polling on, and off (`journal.busy_poll = false`).
        for spin in [IDLE_SPIN, Duration::ZERO] {
            let (tx, mut rx) = mpsc::channel(4);
            tx.try_send(tick()).expect("room");
            let got = next_request(&mut rx, spin);
            assert!(matches!(
                got,
                Some(Envelope {
                    req: Request::Tick,
                    ..
                })
            ));
            for wait in [Duration::from_micros(50), IDLE_SPIN * 40] {
                let sender = tx.clone();
                let t = std::thread::spawn(move || {
                    std::thread::sleep(wait);
                    sender.blocking_send(tick()).expect("writer there");
                });
                let got = next_request(&mut rx, spin);
                assert!(
                    matches!(
                        got,
                        Some(Envelope {
                            req: Request::Tick,
                            ..
                        })
                    ),
                    "sent after {wait:?}, {spin:?}"
                );
                t.join().expect("sender thread");
            }
            // Every sender gone while the writer sleeps.
            let t = std::thread::spawn(move || {
                std::thread::sleep(IDLE_SPIN * 40);
                drop(tx);
            });
            assert!(next_request(&mut rx, spin).is_none());
            t.join().expect("sender thread");
        }
    }
}
