//! The engine: recovery at open, the single writer with group commit, the
//! data file and the read paths.
//!
//! ```text
//! Engine::write ──mpsc──► writer thread (writer.rs) ──► journal + data file
//! Engine::get/scan ─────► MVCC read view of the data file (store.rs)
//! Engine::open ─────────► recovery.rs (decision table), then starts the writer
//! ```
//!
//! An `Engine` is a cheap handle (`Clone`); the writer thread stops when
//! `shutdown` is called or when the last handle is dropped.

mod apply;
pub mod backup;
pub mod compact;
pub mod error;
pub mod recovery;
pub mod replay;
pub mod replica;
mod stage;
pub mod store;
mod visible;
mod writer;

pub use backup::{
    BackupPoint, DataFileBuilder, HistorySource, LiveJournalHistory, LockStatus, RestoredDataDir,
    RollbackReport, RotatedSegment, Snapshot, SnapshotCounts, SnapshotError, SnapshotItem,
};
pub use error::{OpenError, ReadError, WriteError};
pub use recovery::{RecoveryAction, RecoveryReport};
pub use replica::{ReadFramesError, ReplicaPosition, Role};
pub use store::ScanPage;

use crate::journal::disk::{Disk, RealDisk};
use crate::model::{
    self, ClientIdentity, InvalidInput, MAX_BLOB_BYTES, MAX_TXN_BYTES, Record, SessionId,
    TableInfo, TableOptions, WriteAck, WriteOp,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Serialize;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::Store;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use writer::{Envelope, Request, Writer};

/// Depth of the writer's request queue; senders wait when it is full.
const REQUEST_QUEUE_DEPTH: usize = 16_384;
/// How much longer than a request's deadline a caller waits for the writer.
const WRITER_GRACE: Duration = Duration::from_secs(2);
/// How long a client's write, the only call waiting on the writer, looks
/// for its answer before it sleeps (see [`answer`]).
const ANSWER_SPIN: Duration = Duration::from_micros(400);

/// How the engine is set up. `new` gives the documented defaults.
#[derive(Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    pub node_name: String,
    pub flush_interval: Duration,
    pub dirty_bytes_max: u64,
    pub cache_bytes: usize,
    pub segment_bytes: u64,
    /// Keep zeroed blocks ahead of the journal writer (`journal.preallocate`).
    pub preallocate: bool,
    /// Look again before sleeping: a primary's idle writer for its next
    /// request, a client's lone write for its answer (`journal.busy_poll`).
    pub busy_poll: bool,
    pub auto_restore: bool,
    pub session_idle: Duration,
    pub write_timeout: Duration,
    pub disk: Arc<dyn Disk>,
    /// The role at start. A mirror journals nothing of its own (not even at
    /// recovery): its journal is byte-identical to its primary's.
    pub role: replica::Role,
    /// Where backup sets and journal archives are, for the automatic restore
    /// of a damaged or missing data file (`recovery.auto_restore`).
    pub backup_dir: Option<PathBuf>,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("data_dir", &self.data_dir)
            .field("node_name", &self.node_name)
            .field("flush_interval", &self.flush_interval)
            .field("dirty_bytes_max", &self.dirty_bytes_max)
            .field("cache_bytes", &self.cache_bytes)
            .field("segment_bytes", &self.segment_bytes)
            .field("preallocate", &self.preallocate)
            .field("busy_poll", &self.busy_poll)
            .field("auto_restore", &self.auto_restore)
            .finish_non_exhaustive()
    }
}

impl EngineConfig {
    /// Defaults: flush every 1 s or past 64 MiB dirty, 256 MiB cache,
    /// 64 MiB preallocated segments, busy polling, no auto-restore,
    /// sessions idle after 60 s, writes time out after 5 s, the real disk.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            node_name: "n1".into(),
            flush_interval: Duration::from_secs(1),
            dirty_bytes_max: 64 << 20,
            cache_bytes: 256 << 20,
            segment_bytes: 64 << 20,
            preallocate: true,
            busy_poll: true,
            auto_restore: false,
            session_idle: Duration::from_secs(60),
            write_timeout: Duration::from_secs(5),
            disk: Arc::new(RealDisk),
            role: replica::Role::Primary,
            backup_dir: None,
        }
    }
}

/// State the writer publishes for readers and status.
pub(crate) struct Shared {
    pub durable_lsn: AtomicU64,
    pub applied_lsn: AtomicU64,
    /// `applied_lsn`, for those who wait for it.
    pub applied_tx: watch::Sender<u64>,
    /// Applying stopped (the message is in `journal_error`).
    pub apply_failed: AtomicBool,
    /// The epoch history changed since the last flush.
    pub epoch_history_dirty: AtomicBool,
    pub checkpoint_lsn: AtomicU64,
    pub dirty_bytes: AtomicU64,
    pub journal_error: Mutex<Option<String>>,
    pub durable_tx: watch::Sender<u64>,
    pub epoch_history: Mutex<Vec<(u64, u64)>>,
    pub role: Mutex<replica::Role>,
    pub epoch: AtomicU64,
    /// The primary's lease deadline (ms since the Unix epoch); `u64::MAX`
    /// when no lease applies (a standalone node or a statically configured
    /// primary). Past it no client write is taken or acknowledged.
    pub lease_until_ms: AtomicU64,
    pub lock: Mutex<backup::LockStatus>,
    pub sessions: Mutex<HashMap<ClientIdentity, SessionId>>,
    /// Backup snapshots open now: the periodic flush runs more often while
    /// there are any ([`backup::OpenSnapshot`]).
    pub open_snapshots: AtomicUsize,
    /// Writes acknowledged before the data file held them, and the reads
    /// waiting for it to ([`visible`]).
    pub read_gate: visible::ReadGate,
}

impl Shared {
    /// Whether this node's primary lease has run out.
    pub fn lease_lapsed(&self) -> bool {
        let until = self.lease_until_ms.load(Ordering::Acquire);
        until != u64::MAX && crate::journal::writer::now_us() / 1000 >= until
    }

    /// Records why the node refuses writes (shown by `status()`).
    pub fn record_error(&self, msg: String) {
        *self.journal_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
    }
}

/// A snapshot of the engine's positions and health.
#[derive(Clone, Debug, Serialize)]
pub struct EngineStatus {
    pub db_id: String,
    pub epoch: u64,
    pub last_lsn: u64,
    pub durable_lsn: u64,
    pub applied_lsn: u64,
    pub checkpoint_lsn: u64,
    pub journal_available: bool,
    pub journal_error: Option<String>,
    pub dirty_bytes: u64,
}

struct Inner {
    tx: mpsc::Sender<Envelope>,
    store: Store,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    report: RecoveryReport,
    db_id: String,
    /// Held while a new session is opened (see [`Engine::session`]).
    session_opening: tokio::sync::Mutex<()>,
    /// Calls waiting on the writer (see [`Engine::call`]).
    calls: AtomicUsize,
    /// The data file's write side (flushes are made on it directly).
    lane: Arc<Mutex<apply::Lane>>,
    // Declared after `tx`: fields drop in order, so the channel is closed
    // first and the writer can finish before it is joined.
    writer: WriterThread,
    _lock: File,
}

/// Counts a call waiting on the writer for as long as it waits, also when
/// its future is dropped.
struct CallCount<'a>(&'a AtomicUsize);

impl<'a> CallCount<'a> {
    fn enter(calls: &'a AtomicUsize) -> Self {
        calls.fetch_add(1, Ordering::Relaxed);
        CallCount(calls)
    }
}

impl Drop for CallCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a call looks for its answer before it sleeps: only a client's
/// write looks (with `journal.busy_poll` on). A mirror's appends of its
/// primary's stream, barriers and the like gain no client anything from
/// it, and a mirror's looking took CPU time from the other nodes of a
/// cluster sharing its machine (BENCHMARKS.md, "Looked for before
/// sleeping").
fn answer_spin(busy_poll: bool, req: &Request) -> Duration {
    if busy_poll && req.is_client_write() {
        ANSWER_SPIN
    } else {
        Duration::ZERO
    }
}

/// The writer's answer to one call. While it is the only call waiting, the
/// caller looks for the answer between the runtime's other work (its task
/// yields, so other tasks and I/O still run) for up to `spin` (see
/// [`answer_spin`]) before it sleeps: a lone client's write is answered
/// about one fdatasync after it was sent, and an answer found by a task
/// still running saves the thread wake-up that would carry it. With more
/// calls waiting it sleeps at once, and the runtime's threads stay free
/// for them.
async fn answer<T>(
    mut rx: oneshot::Receiver<Result<T, WriteError>>,
    calls: &AtomicUsize,
    spin: Duration,
) -> Result<T, WriteError> {
    let start = Instant::now();
    while calls.load(Ordering::Relaxed) == 1 && start.elapsed() < spin {
        match rx.try_recv() {
            Ok(r) => return r,
            Err(oneshot::error::TryRecvError::Closed) => return Err(WriteError::Closed),
            Err(oneshot::error::TryRecvError::Empty) => tokio::task::yield_now().await,
        }
    }
    rx.await.map_err(|_| WriteError::Closed)?
}

/// Joins the writer thread when the last handle goes away, so the data file
/// is closed (and the directory free to reopen) once `Engine` is dropped.
struct WriterThread(Mutex<Option<std::thread::JoinHandle<()>>>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        let handle = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// A handle to an open database.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.inner.cfg.data_dir)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock_data_dir(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| OpenError::DataDir {
            path: path.clone(),
            source,
        })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(source)) => Err(OpenError::DataDir { path, source }),
    }
}

impl Engine {
    /// Opens (or creates) the database in `cfg.data_dir`: runs recovery,
    /// then starts the writer thread. Blocking.
    pub fn open(cfg: EngineConfig) -> Result<Engine, OpenError> {
        let dd = |path: &Path| {
            let path = path.to_owned();
            move |source| OpenError::DataDir { path, source }
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(dd(&cfg.data_dir))?;
        let lock = lock_data_dir(&cfg.data_dir)?;
        for sub in ["journal", "tmp", "logs"] {
            let p = cfg.data_dir.join(sub);
            std::fs::create_dir_all(&p).map_err(dd(&p))?;
        }
        // Staged BLOB bodies of a previous run are never needed again.
        if let Ok(rd) = std::fs::read_dir(cfg.data_dir.join("tmp")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let rec = recovery::recover(&cfg)?;
        tracing::info!(report = ?rec.report, "recovery finished");
        let last = rec.journal.last_lsn();
        let (durable_tx, _) = watch::channel(last);
        let (applied_tx, _) = watch::channel(rec.replayer.complete_lsn());
        let shared = Arc::new(Shared {
            durable_lsn: AtomicU64::new(last),
            applied_lsn: AtomicU64::new(rec.replayer.complete_lsn()),
            applied_tx,
            apply_failed: AtomicBool::new(false),
            epoch_history_dirty: AtomicBool::new(false),
            checkpoint_lsn: AtomicU64::new(rec.checkpoint_lsn),
            dirty_bytes: AtomicU64::new(0),
            journal_error: Mutex::new(None),
            durable_tx,
            sessions: Mutex::new(HashMap::new()),
            lock: Mutex::new(backup::LockStatus::default()),
            lease_until_ms: AtomicU64::new(u64::MAX),
            role: Mutex::new(cfg.role.clone()),
            epoch_history: Mutex::new(rec.epoch_history.clone()),
            epoch: AtomicU64::new(rec.journal.epoch()),
            open_snapshots: AtomicUsize::new(0),
            read_gate: visible::ReadGate::default(),
        });
        metrics::gauge!("mirrordb_journal_available").set(1.0);
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE_DEPTH);
        let db_id = rec.report.db_id.clone();
        let mut lane = apply::Lane::new(
            rec.store.clone(),
            rec.replayer,
            cfg.data_dir.join("journal"),
            shared.clone(),
            cfg.flush_interval,
            cfg.dirty_bytes_max,
        );
        lane.follow = matches!(cfg.role, replica::Role::Mirror { .. });
        let lane = Arc::new(Mutex::new(lane));
        let applier = apply::Applier::start(lane.clone()).map_err(|source| OpenError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let stage = stage::Stage::start(lane.clone(), shared.clone()).map_err(|source| {
            OpenError::DataDir {
                path: cfg.data_dir.clone(),
                source,
            }
        })?;
        let engine_lane = lane.clone();
        let writer = Writer {
            journal: rec.journal,
            store: rec.store.clone(),
            lane,
            applier,
            tables: rec.tables,
            shared: shared.clone(),
            dirty_bytes_max: cfg.dirty_bytes_max,
            session_idle: cfg.session_idle,
            sessions: HashMap::new(),
            unavailable: None,
            lock: None,
            hold: false,
            held: Vec::new(),
            role: cfg.role.clone(),
            waiting_barriers: Vec::new(),
            stage,
            inflight: HashMap::new(),
            idle_spin: if cfg.busy_poll {
                writer::IDLE_SPIN
            } else {
                Duration::ZERO
            },
            unjournaled_blob_seq: (1u64 << 63) | (crate::journal::writer::now_us() << 8),
        };
        let handle = std::thread::Builder::new()
            .name("mirrordb-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| OpenError::DataDir {
                path: cfg.data_dir.clone(),
                source,
            })?;
        start_ticker(
            tx.downgrade(),
            cfg.flush_interval
                .min(cfg.session_idle)
                .min(Duration::from_millis(200)),
        );
        Ok(Engine {
            inner: Arc::new(Inner {
                tx,
                store: rec.store,
                shared,
                report: rec.report,
                db_id,
                cfg,
                session_opening: tokio::sync::Mutex::new(()),
                calls: AtomicUsize::new(0),
                lane: engine_lane,
                writer: WriterThread(Mutex::new(Some(handle))),
                _lock: lock,
            }),
        })
    }

    /// What recovery did at open.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// The configuration the engine was opened with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// The journal directory.
    pub fn journal_dir(&self) -> PathBuf {
        self.inner.cfg.data_dir.join("journal")
    }

    /// A receiver of the durable LSN, updated after every fdatasync.
    pub fn durable_lsn_watch(&self) -> watch::Receiver<u64> {
        self.inner.shared.durable_tx.subscribe()
    }

    /// A receiver of the applied LSN (`EngineStatus::applied_lsn`). On a
    /// mirror it trails the durable LSN: entries are applied after they are
    /// acknowledged as flushed.
    pub fn applied_lsn_watch(&self) -> watch::Receiver<u64> {
        self.inner.shared.applied_tx.subscribe()
    }

    /// Waits until everything up to `lsn` is applied (visible to reads), or
    /// `deadline`. Answers the applied LSN: `Ok` once it reached `lsn`,
    /// `Err` at the deadline.
    pub async fn wait_applied(&self, lsn: u64, deadline: Instant) -> Result<u64, u64> {
        let mut rx = self.applied_lsn_watch();
        let reached = tokio::time::timeout_at(deadline.into(), rx.wait_for(|a| *a >= lsn)).await;
        let applied = self.inner.shared.applied_lsn.load(Ordering::Acquire);
        match reached {
            Ok(Ok(_)) => Ok(applied),
            _ if applied >= lsn => Ok(applied),
            _ => Err(applied),
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(writer::Reply<T>) -> Request,
    ) -> Result<T, WriteError> {
        let (reply, rx) = oneshot::channel();
        let timeout = self.inner.cfg.write_timeout;
        // Far enough to mean "no deadline" without overflowing Instant.
        let budget = if timeout.is_zero() {
            Duration::from_secs(86_400 * 365)
        } else {
            timeout
        };
        let env = Envelope {
            req: make(reply),
            deadline: Instant::now() + budget,
        };
        let spin = answer_spin(self.inner.cfg.busy_poll, &env.req);
        let fut = async {
            let _counted = CallCount::enter(&self.inner.calls);
            self.inner
                .tx
                .send(env)
                .await
                .map_err(|_| WriteError::Closed)?;
            answer(rx, &self.inner.calls, spin).await
        };
        // The writer answers `write_blocked` itself (not applied) when a
        // request waits past its deadline; this outer bound only catches a
        // writer stuck in I/O, where the outcome is unknown.
        match tokio::time::timeout(budget + WRITER_GRACE, fut).await {
            Ok(r) => r,
            Err(_) => Err(WriteError::WriteBlocked(format!(
                "the writer did not answer within {} ms; the write may still be applied",
                (budget + WRITER_GRACE).as_millis()
            ))),
        }
    }

    /// The session for a client identity, journaling `SessionOpen` the first
    /// time it is seen.
    pub async fn session(&self, identity: ClientIdentity) -> Result<SessionId, WriteError> {
        let known = |e: &Engine| {
            e.inner
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&identity)
                .copied()
        };
        if let Some(s) = known(self) {
            return Ok(s);
        }
        // Opening is serialised, and the identity looked up again under the
        // lock, so concurrent first writes of one client open one session.
        let _opening = self.inner.session_opening.lock().await;
        if let Some(s) = known(self) {
            return Ok(s);
        }
        let id = identity.clone();
        let s = self
            .call(|reply| Request::OpenSession {
                identity: id,
                reply,
            })
            .await?;
        self.inner
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(identity, s);
        Ok(s)
    }

    /// Writes records: one operation is a single write, more are one atomic
    /// transaction. Answers after the entries are durable; a read that
    /// starts after the answer sees them (it waits for the data file).
    pub async fn write(
        &self,
        session: SessionId,
        ops: Vec<WriteOp>,
    ) -> Result<WriteAck, WriteError> {
        if ops.len() > model::MAX_TXN_OPS {
            return Err(InvalidInput::TooManyOps(ops.len()).into());
        }
        let mut total = 0usize;
        for op in &ops {
            op.validate()?;
            if let WriteOp::Put { value, .. } = op {
                total += value.len();
            }
        }
        if total > MAX_TXN_BYTES {
            return Err(InvalidInput::TooLarge {
                got: total as u64,
                limit: MAX_TXN_BYTES as u64,
            }
            .into());
        }
        self.call(|reply| Request::Write {
            session,
            ops,
            reply,
        })
        .await
    }

    /// Creates a table or changes its options.
    pub async fn set_table(
        &self,
        session: SessionId,
        table: &str,
        opts: TableOptions,
    ) -> Result<WriteAck, WriteError> {
        model::validate_table(table)?;
        let table = table.to_owned();
        self.call(|reply| Request::SetTable {
            session,
            table,
            journaled: opts.journaled,
            reply,
        })
        .await
    }

    /// Stores a BLOB from a stream of bytes. The body is staged in the data
    /// directory's `tmp/` (never held whole in memory), then journaled in
    /// chunks by the writer.
    pub async fn put_blob<S, E>(
        &self,
        session: SessionId,
        table: &str,
        key: &str,
        mut body: S,
    ) -> Result<WriteAck, WriteError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        model::validate_table(table)?;
        model::validate_key(key)?;
        let staged = self
            .inner
            .cfg
            .data_dir
            .join("tmp")
            .join(format!("blob-{}", uuid::Uuid::new_v4().simple()));
        let guard = StagedFile(staged.clone());
        let mut file = tokio::fs::File::create(&staged)
            .await
            .map_err(|e| WriteError::Storage(e.to_string()))?;
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| WriteError::Body(e.to_string()))?;
            size += chunk.len() as u64;
            if size > MAX_BLOB_BYTES {
                return Err(InvalidInput::TooLarge {
                    got: size,
                    limit: MAX_BLOB_BYTES,
                }
                .into());
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| WriteError::Storage(e.to_string()))?;
        }
        file.flush()
            .await
            .map_err(|e| WriteError::Storage(e.to_string()))?;
        drop(file);
        let (table, key) = (table.to_owned(), key.to_owned());
        let r = self
            .call(|reply| Request::Blob {
                session,
                table,
                key,
                staged: staged.clone(),
                size,
                reply,
            })
            .await;
        drop(guard);
        r
    }

    /// Deletes a BLOB.
    pub async fn delete_blob(
        &self,
        session: SessionId,
        table: &str,
        key: &str,
    ) -> Result<WriteAck, WriteError> {
        model::validate_table(table)?;
        model::validate_key(key)?;
        let (table, key) = (table.to_owned(), key.to_owned());
        self.call(|reply| Request::DeleteBlob {
            session,
            table,
            key,
            reply,
        })
        .await
    }

    /// A reader that sees every write acknowledged before this call: it
    /// waits, blocking the thread, until the data file holds them (no wait
    /// when no write is in flight; see [`visible`]).
    pub fn reader(&self) -> Result<Reader, ReadError> {
        let shared = &self.inner.shared;
        shared
            .wait_visible(shared.read_point())
            .map_err(ReadError::Storage)?;
        self.open_reader()
    }

    /// [`Engine::reader`] for a task: waits without holding up its thread.
    pub async fn reader_async(&self) -> Result<Reader, ReadError> {
        let shared = &self.inner.shared;
        shared
            .visible_async(shared.read_point())
            .await
            .map_err(ReadError::Storage)?;
        self.open_reader()
    }

    fn open_reader(&self) -> Result<Reader, ReadError> {
        let view = self
            .inner
            .store
            .read()
            .map_err(|e| ReadError::Storage(e.to_string()))?;
        Ok(Reader { view })
    }

    /// One record, if present ([`Reader::get`]), with every acknowledged
    /// write to it. It waits only for the batches in flight that wrote
    /// this record (or one sharing its slot, [`visible`]), not for all of
    /// them as [`Engine::reader`] does, so a read of a record nobody is
    /// writing answers at once under a write load.
    pub fn get(&self, table: &str, key: &str) -> Result<Option<Record>, ReadError> {
        let shared = &self.inner.shared;
        shared
            .wait_visible(shared.record_read_point(table, key))
            .map_err(ReadError::Storage)?;
        self.open_reader()?.get(table, key)
    }

    /// [`Engine::get`] for a task: waits without holding up its thread.
    pub async fn get_async(&self, table: &str, key: &str) -> Result<Option<Record>, ReadError> {
        let shared = &self.inner.shared;
        shared
            .visible_async(shared.record_read_point(table, key))
            .await
            .map_err(ReadError::Storage)?;
        self.open_reader()?.get(table, key)
    }

    /// An ordered page of records ([`Reader::scan`]).
    pub fn scan(
        &self,
        table: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, ReadError> {
        self.reader()?.scan(table, prefix, start_after, limit)
    }

    /// Every table ([`Reader::tables`]).
    pub fn tables(&self) -> Result<Vec<TableInfo>, ReadError> {
        self.reader()?.tables()
    }

    /// A BLOB as a stream of chunks ([`Reader::blob`]).
    pub fn blob(&self, table: &str, key: &str) -> Result<Option<BlobStream>, ReadError> {
        self.reader()?.blob(table, key)
    }

    /// Number of records and a digest of the whole content.
    pub fn digest(&self) -> Result<(u64, u32), ReadError> {
        self.reader()?.digest()
    }

    /// Bytes the data file takes on disk (0 if its length cannot be read).
    pub fn data_file_bytes(&self) -> u64 {
        self.inner.store.file_bytes()
    }

    /// Positions and health.
    pub fn status(&self) -> EngineStatus {
        let s = &self.inner.shared;
        let durable = s.durable_lsn.load(Ordering::Acquire);
        let err = s
            .journal_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        EngineStatus {
            db_id: self.inner.db_id.clone(),
            epoch: s.epoch.load(Ordering::Acquire),
            last_lsn: durable,
            durable_lsn: durable,
            applied_lsn: s.applied_lsn.load(Ordering::Acquire),
            checkpoint_lsn: s.checkpoint_lsn.load(Ordering::Acquire),
            journal_available: err.is_none(),
            journal_error: err,
            dirty_bytes: s.dirty_bytes.load(Ordering::Relaxed),
        }
    }

    /// Flushes the data file now; answers the new checkpoint LSN.
    pub async fn flush(&self) -> Result<u64, WriteError> {
        // Not through the writer thread: it goes on journaling meanwhile
        // and waits only when it next applies.
        let lane = self.inner.lane.clone();
        tokio::task::spawn_blocking(move || apply::lock(&lane).flush_current())
            .await
            .map_err(|e| WriteError::Storage(format!("flush task: {e}")))?
            .map_err(|e| WriteError::Storage(e.to_string()))
    }

    /// Closes cleanly: closes sessions, journals `DataFileClose`, flushes,
    /// and stops the writer. Later writes answer `shutting_down`.
    pub async fn shutdown(&self) -> Result<(), WriteError> {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .inner
            .tx
            .send(Envelope {
                req: Request::Shutdown { reply },
                deadline: Instant::now() + Duration::from_secs(3600),
            })
            .await;
        // A writer that is already gone was shut down before: closing a
        // closed engine succeeds (a reseed swap closes the old engine, and
        // the server may close it again at its own shutdown).
        let r = match sent {
            Ok(()) => rx.await.unwrap_or(Ok(())),
            Err(_) => Ok(()),
        };
        let handle = self
            .inner
            .writer
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            match tokio::task::spawn_blocking(move || h.join()).await {
                Ok(Ok(())) => {}
                _ => return Err(WriteError::Storage("the writer thread panicked".into())),
            }
        }
        r
    }
}

/// Removes a staged BLOB body when dropped (request failed or finished).
struct StagedFile(PathBuf);

impl Drop for StagedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn start_ticker(tx: mpsc::WeakSender<Envelope>, every: Duration) {
    let every = every.max(Duration::from_millis(10));
    let _ = std::thread::Builder::new()
        .name("mirrordb-ticker".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(tx) = tx.upgrade() else { return };
                // A full queue means the writer is busy and will flush anyway.
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Envelope {
                    req: Request::Tick,
                    deadline: Instant::now() + every,
                }) {
                    return;
                }
            }
        });
}

/// A BLOB being read: its size and version, and its bytes as a stream.
pub struct BlobStream {
    pub size: u64,
    pub version: u64,
    rx: mpsc::Receiver<Result<Bytes, ReadError>>,
}

impl Stream for BlobStream {
    type Item = Result<Bytes, ReadError>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// A consistent read view of the data file that holds every write
/// acknowledged before it was opened ([`Engine::reader`]).
pub struct Reader {
    view: store::ReadView,
}

impl Reader {
    /// One record, if present.
    pub fn get(&self, table: &str, key: &str) -> Result<Option<Record>, ReadError> {
        model::validate_table(table)?;
        model::validate_key(key)?;
        self.view
            .get(table, key)
            .map_err(|e| ReadError::Storage(e.to_string()))
    }

    /// An ordered page of records (see [`store::ReadView::scan`]).
    pub fn scan(
        &self,
        table: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, ReadError> {
        model::validate_table(table)?;
        let limit = limit.clamp(1, model::MAX_SCAN_LIMIT);
        self.view
            .scan(table, prefix, start_after, limit)
            .map_err(|e| ReadError::Storage(e.to_string()))
    }

    /// Every table.
    pub fn tables(&self) -> Result<Vec<TableInfo>, ReadError> {
        self.view
            .tables()
            .map_err(|e| ReadError::Storage(e.to_string()))
    }

    /// A BLOB as a stream of chunks, read from one consistent snapshot.
    pub fn blob(self, table: &str, key: &str) -> Result<Option<BlobStream>, ReadError> {
        model::validate_table(table)?;
        model::validate_key(key)?;
        let view = self.view;
        let Some(meta) = view
            .blob(table, key)
            .map_err(|e| ReadError::Storage(e.to_string()))?
        else {
            return Ok(None);
        };
        let (tx, rx) = mpsc::channel::<Result<Bytes, ReadError>>(4);
        std::thread::Builder::new()
            .name("mirrordb-blob-read".into())
            .spawn(move || {
                let mut index = 0u32;
                loop {
                    match view.blob_chunk(meta.blob_id, index) {
                        Ok(Some(c)) => {
                            if tx.blocking_send(Ok(Bytes::from(c))).is_err() {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(ReadError::Storage(e.to_string())));
                            return;
                        }
                    }
                    index += 1;
                }
            })
            .map_err(|e| ReadError::Storage(e.to_string()))?;
        Ok(Some(BlobStream {
            size: meta.size,
            version: meta.version,
            rx,
        }))
    }

    /// Number of records and a digest of the whole content.
    pub fn digest(&self) -> Result<(u64, u32), ReadError> {
        self.view
            .digest()
            .map_err(|e| ReadError::Storage(e.to_string()))
    }
}

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod backup_tests;

#[cfg(test)]
mod replica_tests;
