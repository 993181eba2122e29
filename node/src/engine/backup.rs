//! The engine's side of the backup pipeline: the backup barrier and its
//! snapshot, journal rotation, restore points, flush-and-lock, building a
//! data directory from a snapshot plus journal (restore, PITR, verify), and
//! online rollback.
//!
//! ```text
//! backup_barrier(n):  writer journals BackupMarker{n} at LSN S ─► fsync ─► apply
//!                     ─► rotate (open segment starts at S+1) ─► MVCC snapshot =
//!                     exactly the operations <= S (writers wait only for these
//!                     steps: a few ms; no flush, the pipeline flushes right
//!                     after, beside the writer)
//! while the snapshot lives: the periodic flush runs 4 x as often
//!                     (OpenSnapshot): redb's non-durable commits then carry
//!                     less freed-page bookkeeping
//! restore:            DataFileBuilder: snapshot items ─► journal frames S+1.. ─► finish
//! rollback(L):        keys touched after L ─► their values at L (restore to L in
//!                     a scratch dir) ─► one journaled compensating transaction
//! ```

use super::error::{OpenError, WriteError};
use super::replay::Replayer;
use super::store::{BlobMeta, DATA_FILE, ReadView, Store};
pub use super::store::{ExportError, SnapshotCounts, SnapshotItem};
use super::{Engine, writer::Request};
use crate::journal::format::decode_op;
use crate::journal::scan::{OwnedFrame, ScanError};
use crate::journal::writer::JournalWriter;
use crate::model::{Op, SessionId, WriteAck, WriteOp};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Entries integrated per data-file transaction while building. Each
/// transaction rewrites every B-tree page it touches, so the byte bound
/// below decides (as in recovery's replay): 20,000 entries of 256-byte
/// values per transaction rewrote most of a large table's leaves each time.
const BUILD_TXN_ITEMS: u64 = 1_000_000;
/// Blob ids given to BLOBs loaded from a snapshot: above every LSN, below
/// the ids of unjournaled BLOBs (`1 << 63 | …`).
const RESTORED_BLOB_IDS: u64 = 1 << 62;

/// A consistent point taken by [`Engine::backup_barrier`].
pub struct BackupPoint {
    /// S: the LSN of the backup marker; the snapshot holds exactly the
    /// operations up to and including it.
    pub lsn: u64,
    pub epoch: u64,
    pub db_id: [u8; 16],
    pub time_us: u64,
    /// Closed live segments holding entries <= S, oldest first.
    pub segments: Vec<PathBuf>,
    pub snapshot: Snapshot,
}

impl std::fmt::Debug for BackupPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupPoint")
            .field("lsn", &self.lsn)
            .field("epoch", &self.epoch)
            .field("segments", &self.segments)
            .finish_non_exhaustive()
    }
}

/// A read-only MVCC view of the data file at a backup barrier.
pub struct Snapshot {
    pub(crate) view: ReadView,
    pub(crate) _open: OpenSnapshot,
}

/// Marks a backup snapshot open: while one is, the periodic cache flush
/// runs [`SNAPSHOT_FLUSH_DIVISOR`] times as often.
///
/// While a reader holds an old commit, redb frees no page that a later
/// commit frees past that reader, and every non-durable commit goes
/// through the freed-page records kept since the last durable one
/// (`free_if_unpersisted` and its bookkeeping: about 27 % of the apply
/// stage's samples during a backup, none without). A durable commit clears
/// those records, so flushing more often while the snapshot lives keeps
/// each commit's share small. The earlier design did the opposite (it held
/// the periodic flush off while a snapshot was open, so that each flush
/// would not make pages durable that the snapshot then pins); on the VM of
/// BENCHMARKS.md run T, writes during a backup kept 0.40–0.42 of their rate
/// that way, 0.48–0.52 with the ordinary flush, and 0.53–0.54 with this
/// one. The cost is space: pages made durable and then rewritten stay
/// pinned until the snapshot ends, so the data file may grow by about the
/// data written during a long backup; that space is reused afterwards.
pub(crate) struct OpenSnapshot {
    shared: Arc<super::Shared>,
}

/// How many times as often the periodic flush runs while a snapshot is open.
pub const SNAPSHOT_FLUSH_DIVISOR: u32 = 4;

impl OpenSnapshot {
    pub(crate) fn new(shared: Arc<super::Shared>) -> OpenSnapshot {
        shared.open_snapshots.fetch_add(1, Ordering::AcqRel);
        OpenSnapshot { shared }
    }
}

impl Drop for OpenSnapshot {
    fn drop(&mut self) {
        self.shared.open_snapshots.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a snapshot could not be read.
pub type SnapshotError<E> = ExportError<E>;

impl Snapshot {
    /// Visits every table, record and BLOB (see [`SnapshotItem`]).
    pub fn for_each<E>(
        &self,
        f: impl FnMut(SnapshotItem) -> Result<(), E>,
    ) -> Result<(), SnapshotError<E>> {
        self.view.export(f)
    }

    /// How much the snapshot holds.
    pub fn counts(&self) -> Result<SnapshotCounts, SnapshotError<std::convert::Infallible>> {
        self.view.counts().map_err(ExportError::Store)
    }

    /// Record count and content digest, as [`Engine::digest`].
    pub fn digest(&self) -> Result<(u64, u32), SnapshotError<std::convert::Infallible>> {
        self.view.digest().map_err(ExportError::Store)
    }
}

/// A journal segment closed by rotation.
#[derive(Clone, Debug, Serialize)]
pub struct RotatedSegment {
    pub closed: PathBuf,
    pub last_lsn: u64,
}

/// The flush-and-lock state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LockStatus {
    pub locked: bool,
    pub owner: Option<String>,
    pub depth: u32,
    pub expires_in_ms: Option<u64>,
}

/// Where rollback finds the history it needs.
pub trait HistorySource: Send + Sync {
    /// Journal frames with `from <= lsn <= to`, in order.
    fn frames(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Box<dyn Iterator<Item = Result<OwnedFrame, ScanError>> + '_>, String>;
    /// Builds, in the empty directory `scratch`, a data directory holding the
    /// state at `lsn` (a point-in-time restore).
    fn restore_to(&self, lsn: u64, scratch: &Path) -> Result<(), String>;
}

/// History from the live journal alone: enough when it still starts at
/// LSN 1 (no backup has archived any of it).
pub struct LiveJournalHistory {
    pub journal_dir: PathBuf,
}

impl HistorySource for LiveJournalHistory {
    fn frames(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Box<dyn Iterator<Item = Result<OwnedFrame, ScanError>> + '_>, String> {
        let (segs, _) =
            crate::journal::scan::list_segments(&self.journal_dir).map_err(|e| e.to_string())?;
        if let Some(first) = segs.first()
            && first.header.first_lsn > from
        {
            return Err(format!(
                "the live journal starts at LSN {}, after {from}: the history is in backup archives",
                first.header.first_lsn
            ));
        }
        Ok(Box::new(crate::journal::scan::EntryIter::new(
            segs, from, to,
        )))
    }

    fn restore_to(&self, lsn: u64, scratch: &Path) -> Result<(), String> {
        let (segs, _) =
            crate::journal::scan::list_segments(&self.journal_dir).map_err(|e| e.to_string())?;
        let first = segs.first().ok_or("the journal is empty")?;
        if first.header.first_lsn != 1 {
            return Err(format!(
                "the live journal starts at LSN {}: restore from backups instead",
                first.header.first_lsn
            ));
        }
        let mut b = DataFileBuilder::create(scratch, first.header.db_id, first.header.epoch, 0)
            .map_err(|e| e.to_string())?;
        for f in crate::journal::scan::EntryIter::new(segs, 1, lsn) {
            b.integrate(&f.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        b.finish(None).map(|_| ()).map_err(|e| e.to_string())
    }
}

/// What an online rollback did.
#[derive(Clone, Debug, Serialize)]
pub struct RollbackReport {
    pub to_lsn: u64,
    /// The journal end when the rollback was planned.
    pub from_lsn: u64,
    /// LSN of the compensating transaction's commit (0 if nothing changed).
    pub lsn: u64,
    pub keys_restored: u64,
    pub keys_deleted: u64,
    pub keys_unchanged: u64,
    /// BLOBs written after `to_lsn` (not rolled back; listed for the operator).
    pub blobs_not_rolled_back: Vec<String>,
}

/// Rollback plans against current versions; a concurrent write to one of the
/// keys makes it plan again, at most this many times.
const ROLLBACK_ATTEMPTS: usize = 3;

impl Engine {
    /// The backup barrier (see the module doc). `number` is the backup's
    /// number, journaled in the marker.
    pub async fn backup_barrier(&self, number: u32) -> Result<BackupPoint, WriteError> {
        self.call(|reply| Request::Barrier { number, reply }).await
    }

    /// Closes the open journal segment and starts a new one. Answers the
    /// closed segment, or `None` if the open segment is still empty.
    pub async fn rotate_journal(&self) -> Result<Option<RotatedSegment>, WriteError> {
        self.call(|reply| Request::Rotate { reply }).await
    }

    /// Deletes closed live segments all of whose entries are <= `upto_lsn`
    /// (once they are archived durably). Never the open segment, never
    /// anything the data file's checkpoint still needs.
    pub fn drop_segments_upto(&self, upto_lsn: u64) -> std::io::Result<Vec<PathBuf>> {
        let dir = self.journal_dir();
        let (segs, _) = crate::journal::scan::list_segments(&dir)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let checkpoint = self.status().checkpoint_lsn;
        let limit = upto_lsn.min(checkpoint);
        let mut dropped = Vec::new();
        // A segment's last LSN is the next segment's first minus one; the
        // last segment (the open one) is never dropped.
        for pair in segs.windows(2) {
            let last_of_this = pair[1].header.first_lsn.saturating_sub(1);
            if last_of_this <= limit {
                std::fs::remove_file(&pair[0].path)?;
                dropped.push(pair[0].path.clone());
            } else {
                break;
            }
        }
        if !dropped.is_empty() {
            std::fs::File::open(&dir)?.sync_all()?;
        }
        Ok(dropped)
    }

    /// Journals a named restore point.
    pub async fn restore_point(
        &self,
        session: SessionId,
        name: &str,
    ) -> Result<WriteAck, WriteError> {
        if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
            return Err(crate::model::InvalidInput::Other(
                "a restore point name is 1..=256 bytes without control characters".into(),
            )
            .into());
        }
        let name = name.to_owned();
        self.call(|reply| Request::RestorePoint {
            session,
            name,
            reply,
        })
        .await
    }

    /// Flush-and-lock: flushes the data file, and holds every new write until
    /// `unlock` (they wait up to their deadline, then `write_blocked`, and are
    /// not applied). Re-entrant per owner; each call renews the lease; the
    /// lock is released by itself when the lease lapses.
    pub async fn lock(&self, owner: &str, lease: Duration) -> Result<LockStatus, WriteError> {
        if owner.is_empty() || owner.len() > 128 {
            return Err(crate::model::InvalidInput::Other(
                "lock owner must be 1..=128 bytes".into(),
            )
            .into());
        }
        let owner = owner.to_owned();
        self.call(|reply| Request::Lock {
            owner,
            lease,
            reply,
        })
        .await
    }

    /// Releases one level of the owner's lock.
    pub async fn unlock(&self, owner: &str) -> Result<LockStatus, WriteError> {
        let owner = owner.to_owned();
        self.call(|reply| Request::Unlock { owner, reply }).await
    }

    /// The lock state.
    pub fn lock_status(&self) -> LockStatus {
        self.inner
            .shared
            .lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Online rollback to `to_lsn` (DESIGN §6): every record touched after
    /// it is put back to its value at `to_lsn` by one journaled compensating
    /// transaction, so history stays readable and mirrors follow.
    pub async fn rollback(
        &self,
        session: SessionId,
        to_lsn: u64,
        history: Arc<dyn HistorySource>,
    ) -> Result<RollbackReport, WriteError> {
        if to_lsn == 0 {
            return Err(crate::model::InvalidInput::Other(
                "to_lsn 0 comes before the database's first entry: roll back to LSN 1 \
                 (the database's first start, which holds no data) to undo every write"
                    .into(),
            )
            .into());
        }
        for attempt in 1..=ROLLBACK_ATTEMPTS {
            let end = self.status().durable_lsn;
            if to_lsn >= end {
                return Err(crate::model::InvalidInput::Other(format!(
                    "nothing to roll back: the journal ends at LSN {end}"
                ))
                .into());
            }
            let this = self.clone();
            let h = history.clone();
            let planned = tokio::task::spawn_blocking(move || this.plan_rollback(to_lsn, end, &*h))
                .await
                .map_err(|e| WriteError::Storage(e.to_string()))??;
            let (ops, mut report) = planned;
            if ops.is_empty() {
                return Ok(report);
            }
            match self
                .call(|reply| Request::Internal {
                    session,
                    ops,
                    reply,
                })
                .await
            {
                Ok(ack) => {
                    report.lsn = ack.lsn;
                    tracing::info!(?report, "rollback applied");
                    return Ok(report);
                }
                Err(WriteError::VersionConflict { .. }) if attempt < ROLLBACK_ATTEMPTS => {
                    tracing::info!(
                        attempt,
                        "a key changed while rollback was planned; planning again"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Err(WriteError::WriteBlocked(
            "rollback kept conflicting with concurrent writes".into(),
        ))
    }

    fn plan_rollback(
        &self,
        to_lsn: u64,
        end: u64,
        history: &dyn HistorySource,
    ) -> Result<(Vec<WriteOp>, RollbackReport), WriteError> {
        let hist = |e: String| WriteError::Storage(format!("rollback history: {e}"));
        let mut touched: BTreeMap<(String, String), ()> = BTreeMap::new();
        let mut blobs = Vec::new();
        for f in history.frames(to_lsn + 1, end).map_err(hist)? {
            let f = f.map_err(|e| hist(e.to_string()))?;
            match decode_op(f.payload()).map_err(|e| hist(e.to_string()))? {
                Op::Put { table, key, .. } | Op::Delete { table, key, .. } => {
                    touched.insert((table, key), ());
                }
                Op::BlobBegin { table, key, .. } | Op::BlobDelete { table, key, .. } => {
                    blobs.push(format!("{table}/{key}"));
                }
                _ => {}
            }
        }
        let scratch = self
            .config()
            .data_dir
            .join("tmp")
            .join(format!("rollback-{}", uuid::Uuid::new_v4().simple()));
        let _cleanup = ScratchDir(scratch.clone());
        history.restore_to(to_lsn, &scratch).map_err(hist)?;
        let past = Store::open(&scratch.join(DATA_FILE), 16 << 20)
            .and_then(|s| s.read())
            .map_err(|e| hist(e.to_string()))?;
        let now = self
            .inner
            .store
            .read()
            .map_err(|e| WriteError::Storage(e.to_string()))?;
        let mut ops = Vec::new();
        let mut report = RollbackReport {
            to_lsn,
            from_lsn: end,
            lsn: 0,
            keys_restored: 0,
            keys_deleted: 0,
            keys_unchanged: 0,
            blobs_not_rolled_back: blobs,
        };
        for (table, key) in touched.into_keys() {
            let then = past.get(&table, &key).map_err(|e| hist(e.to_string()))?;
            let current = now
                .get(&table, &key)
                .map_err(|e| WriteError::Storage(e.to_string()))?;
            let cur_version = current.as_ref().map(|r| r.version).unwrap_or(0);
            match (then, current) {
                (None, None) => report.keys_unchanged += 1,
                (Some(t), Some(c)) if t.value == c.value => report.keys_unchanged += 1,
                (Some(t), _) => {
                    report.keys_restored += 1;
                    ops.push(WriteOp::Put {
                        table,
                        key,
                        value: t.value,
                        if_version: Some(cur_version),
                    });
                }
                (None, Some(_)) => {
                    report.keys_deleted += 1;
                    ops.push(WriteOp::Delete {
                        table,
                        key,
                        if_version: Some(cur_version),
                    });
                }
            }
        }
        Ok((ops, report))
    }
}

struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What [`DataFileBuilder::finish`] produced.
#[derive(Clone, Debug, Serialize)]
pub struct RestoredDataDir {
    /// The last LSN whose effects the data directory holds.
    pub last_lsn: u64,
    pub epoch: u64,
    pub records: u64,
    pub entries_integrated: u64,
}

/// A BLOB being loaded from a snapshot.
struct LoadingBlob {
    table: String,
    key: String,
    version: u64,
    size: u64,
    blob_id: u64,
    index: u32,
}

/// Work waiting to be applied in the builder's next data-file transaction.
enum Work {
    Item(SnapshotItem),
    Entry(u64, Op),
}

/// Builds a data directory from a snapshot and then journal frames: the
/// core of restore, point-in-time recovery and `verify --restore`. Work is
/// buffered and applied in data-file transactions of bounded size.
pub struct DataFileBuilder {
    data_dir: PathBuf,
    store: Store,
    replayer: Replayer,
    db_id: [u8; 16],
    epoch: u64,
    last_lsn: u64,
    pending: Vec<Work>,
    pending_bytes: usize,
    blob: Option<LoadingBlob>,
    next_blob_id: u64,
    entries: u64,
}

impl std::fmt::Debug for DataFileBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataFileBuilder")
            .field("data_dir", &self.data_dir)
            .field("last_lsn", &self.last_lsn)
            .finish_non_exhaustive()
    }
}

/// Bytes of buffered work that force a data-file transaction.
const BUILD_TXN_BYTES: usize = 64 << 20;

/// The data file's page cache while a builder fills it, unless the caller
/// gives one ([`DataFileBuilder::create_with_cache`]); also what an online
/// rollback's scratch restore takes beside the running node's own cache.
pub(crate) const BUILD_CACHE_BYTES: usize = 64 << 20;

fn load_item(
    a: &mut super::store::Applier<'_>,
    blob: &mut Option<LoadingBlob>,
    next_blob_id: &mut u64,
    item: SnapshotItem,
) -> Result<(), OpenError> {
    match item {
        SnapshotItem::Table { name, journaled } => a.set_table(&name, journaled)?,
        SnapshotItem::Record {
            table,
            key,
            version,
            value,
        } => a.put_owned(table, key, value, version)?,
        SnapshotItem::BlobStart {
            table,
            key,
            version,
            size,
        } => {
            *blob = Some(LoadingBlob {
                table,
                key,
                version,
                size,
                blob_id: *next_blob_id,
                index: 0,
            });
            *next_blob_id += 1;
        }
        SnapshotItem::BlobChunk { bytes } => {
            let b = blob.as_mut().ok_or_else(|| {
                OpenError::Store("BLOB chunk outside a BLOB in the snapshot".into())
            })?;
            a.stage_chunk(b.blob_id, b.index, &bytes)?;
            b.index += 1;
        }
        SnapshotItem::BlobEnd => {
            let b = blob.take().ok_or_else(|| {
                OpenError::Store("BLOB end without a BLOB in the snapshot".into())
            })?;
            let meta = BlobMeta {
                blob_id: b.blob_id,
                size: b.size,
                version: b.version,
            };
            a.link_blob(&b.table, &b.key, meta)?;
        }
    }
    Ok(())
}

impl DataFileBuilder {
    /// Creates `data_dir` (which must not hold a data file yet) with an
    /// empty data file for database `db_id`, positioned after `base_lsn`.
    pub fn create(
        data_dir: &Path,
        db_id: [u8; 16],
        epoch: u64,
        base_lsn: u64,
    ) -> Result<Self, OpenError> {
        Self::create_with_cache(data_dir, db_id, epoch, base_lsn, BUILD_CACHE_BYTES)
    }

    /// [`DataFileBuilder::create`] with a page cache of `cache_bytes` for
    /// the data file. Integrating journal entries into a large data file
    /// reads and rewrites pages all over it: a cache that holds more of it
    /// makes that faster (BENCHMARKS.md, "Restore with a larger cache").
    pub fn create_with_cache(
        data_dir: &Path,
        db_id: [u8; 16],
        epoch: u64,
        base_lsn: u64,
        cache_bytes: usize,
    ) -> Result<Self, OpenError> {
        let dd = |source| OpenError::DataDir {
            path: data_dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(data_dir.join("journal")).map_err(dd)?;
        let path = data_dir.join(DATA_FILE);
        if path.exists() {
            return Err(OpenError::DataDir {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a data file already exists here",
                ),
            });
        }
        let store = Store::create(&path, cache_bytes, db_id, epoch)?;
        Ok(DataFileBuilder {
            data_dir: data_dir.to_owned(),
            store,
            replayer: Replayer::after(base_lsn),
            db_id,
            epoch,
            last_lsn: base_lsn,
            pending: Vec::new(),
            pending_bytes: 0,
            blob: None,
            next_blob_id: RESTORED_BLOB_IDS,
            entries: 0,
        })
    }

    fn push(&mut self, work: Work, bytes: usize) -> Result<(), OpenError> {
        self.pending.push(work);
        self.pending_bytes += bytes;
        if self.pending.len() as u64 >= BUILD_TXN_ITEMS || self.pending_bytes >= BUILD_TXN_BYTES {
            self.apply_pending()?;
        }
        Ok(())
    }

    fn apply_pending(&mut self) -> Result<(), OpenError> {
        let work = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let (replayer, blob, next_blob_id) =
            (&mut self.replayer, &mut self.blob, &mut self.next_blob_id);
        self.store
            .apply_coalesced(false, |a| -> Result<(), OpenError> {
                for w in work {
                    match w {
                        Work::Item(item) => load_item(a, blob, next_blob_id, item)?,
                        Work::Entry(lsn, op) => replayer.apply(a, lsn, op)?,
                    }
                }
                Ok(())
            })?;
        Ok(())
    }

    /// Loads one snapshot item.
    pub fn add_item(&mut self, item: SnapshotItem) -> Result<(), OpenError> {
        let bytes = match &item {
            SnapshotItem::Record { value, .. } => value.len() + 64,
            SnapshotItem::BlobChunk { bytes } => bytes.len(),
            _ => 64,
        };
        self.push(Work::Item(item), bytes)
    }

    /// Integrates the next journal frame (LSNs must continue densely).
    pub fn integrate(&mut self, frame: &OwnedFrame) -> Result<(), OpenError> {
        let h = frame.header;
        let corrupt = |reason: String| OpenError::JournalCorrupt {
            segment: PathBuf::from("(journal being integrated)"),
            offset: 0,
            reason,
            hint: "check the backup set and journal archives with `mirrordb verify`".into(),
        };
        if h.lsn != self.last_lsn + 1 {
            return Err(corrupt(format!(
                "LSN gap while integrating: expected {}, found {}",
                self.last_lsn + 1,
                h.lsn
            )));
        }
        if h.epoch < self.epoch {
            return Err(corrupt(format!(
                "epoch goes back from {} to {} at LSN {}",
                self.epoch, h.epoch, h.lsn
            )));
        }
        let op = decode_op(frame.payload())
            .map_err(|e| corrupt(format!("entry {} does not decode: {e}", h.lsn)))?;
        self.epoch = h.epoch;
        self.last_lsn = h.lsn;
        self.entries += 1;
        self.push(Work::Entry(h.lsn, op), frame.bytes.len())
    }

    /// The last integrated LSN and the epoch.
    pub fn position(&self) -> (u64, u64) {
        (self.last_lsn, self.epoch)
    }

    /// The database id.
    pub fn db_id(&self) -> [u8; 16] {
        self.db_id
    }

    /// Finishes: an open transaction at the end is not applied, the data
    /// file is flushed with its checkpoint, and a fresh journal segment is
    /// created after the last complete LSN, stamped `new_epoch` if given.
    pub fn finish(mut self, new_epoch: Option<u64>) -> Result<RestoredDataDir, OpenError> {
        self.apply_pending()?;
        let epoch = new_epoch.unwrap_or(self.epoch).max(self.epoch);
        let replayer = &mut self.replayer;
        let (last, _) = self.store.apply(true, |a| -> Result<u64, OpenError> {
            replayer.abort_open(a)?;
            a.sweep_orphan_chunks()?;
            a.set_epoch(epoch)?;
            let last = replayer.complete_lsn();
            a.set_checkpoint(last)?;
            Ok(last)
        })?;
        let journal_dir = self.data_dir.join("journal");
        JournalWriter::create(
            Arc::new(crate::journal::disk::RealDisk),
            &journal_dir,
            self.db_id,
            epoch,
            last + 1,
            64 << 20,
        )
        .map_err(|source| OpenError::JournalIo {
            path: journal_dir.clone(),
            source,
        })?;
        // The tables' metadata holds the counts; `counts()` would also walk
        // the B-trees for a byte estimate nobody needs here.
        let records = self
            .store
            .read()
            .and_then(|v| v.tables())?
            .iter()
            .map(|t| t.records)
            .sum();
        Ok(RestoredDataDir {
            last_lsn: last,
            epoch,
            records,
            entries_integrated: self.entries,
        })
    }
}
