//! [`EngineSink`]: a mirror's journal as the replication crate writes it,
//! over a swappable engine ([`SharedEngine`]).
//!
//! ```text
//! append           ──► Engine::append_frames (verify, write, fdatasync, apply)
//! adopt_db_id      ──► empty mirror: build an empty data dir of that database, swap
//! begin/chunk      ──► stage the snapshot stream in <data_dir>/tmp/
//! install_snapshot ──► build <data_dir>.reseed-new from it (DataFileBuilder)
//!                      ──► swap ──► reopen as a mirror
//! truncate_after   ──► save the divergent tail to <data_dir>/rollback/, then
//!                      rewind by reseed (an empty data dir of the same database)
//!
//! swap: old engine shut down ─► rename D → D.reseed-old ─► rename D.reseed-new → D
//!       ─► fsync parent ─► open D as a mirror ─► SharedEngine::replace ─► remove D.reseed-old
//! ```
//!
//! `rollback/` is carried over by every swap, so saved tails survive later
//! reseeds. A snapshot installed over a mirror that is ahead of it or in another
//! epoch (a fork the primary could not locate) keeps the replaced journal
//! under `rollback/replaced-<time>-journal/`: entries are never dropped
//! silently. A mirror that is merely behind keeps nothing.
//!
//! A crash at any point of the swap leaves the old state or the new one:
//! [`recover_swap`] (run before the engine opens) finishes or undoes it.

use super::SharedEngine;
use super::source::{MAX_SNAPSHOT_ITEM_BYTES, SNAPSHOT_HEADER_BYTES, SNAPSHOT_MAGIC, db_id_bytes};
use crate::engine::{DataFileBuilder, Engine, EngineConfig, SnapshotItem, WriteError};
use crate::journal::scan::{EntryIter, list_segments};
use mirrordb_replication::{Epoch, FramedEntry, JournalSink, Lsn, SinkPosition, StorageError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

/// Suffix of a data directory being built by a reseed.
pub const NEW_SUFFIX: &str = "reseed-new";
/// Suffix of the data directory a reseed replaced, until it is removed.
pub const OLD_SUFFIX: &str = "reseed-old";
/// Directory (inside the data directory) where divergent tails are saved.
pub const ROLLBACK_DIR: &str = "rollback";
/// Directory (inside the data directory) of the failover control plane's
/// Raft log, vote and state.
pub const RAFT_DIR: &str = "raft";

/// What belongs to the node rather than to its copy of the database, and so
/// survives every reseed: saved tails and the Raft store. (The Raft store
/// stays open across the swap: a rename keeps the open file.)
const CARRIED: [&str; 2] = [ROLLBACK_DIR, RAFT_DIR];

/// Moves the [`CARRIED`] directories of `old` into `dir` unless `dir` has a
/// non-empty one already.
fn carry_over(old: &Path, dir: &Path) -> std::io::Result<()> {
    let mut moved = false;
    for name in CARRIED {
        let from = old.join(name);
        if !from.exists() {
            continue;
        }
        let to = dir.join(name);
        if to.exists() {
            if std::fs::read_dir(&to)?.next().is_some() {
                continue;
            }
            std::fs::remove_dir(&to)?;
        }
        std::fs::rename(&from, &to)?;
        moved = true;
    }
    if moved {
        fsync_dir(dir)?;
    }
    Ok(())
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

fn parent(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Finishes or undoes a directory swap a crash interrupted. Run before the
/// engine opens `data_dir`.
///
/// | `D` | `D.reseed-new` | `D.reseed-old` | meaning | action |
/// | --- | --- | --- | --- | --- |
/// | yes | yes | – | build not swapped in | remove new |
/// | no | yes | yes | crash between the renames | rename new → D |
/// | yes | – | yes | swap done, old not removed | carry `rollback/` and `raft/` over, remove old |
pub fn recover_swap(data_dir: &Path) -> std::io::Result<()> {
    let new = sibling(data_dir, NEW_SUFFIX);
    let old = sibling(data_dir, OLD_SUFFIX);
    if !data_dir.exists() && new.exists() && old.exists() {
        tracing::warn!(dir = %data_dir.display(), "finishing a reseed a crash interrupted");
        std::fs::rename(&new, data_dir)?;
        fsync_dir(&parent(data_dir))?;
    }
    if data_dir.exists() && new.exists() {
        tracing::warn!(dir = %new.display(), "removing an unfinished reseed build");
        std::fs::remove_dir_all(&new)?;
    }
    if data_dir.exists() && old.exists() {
        // A crash may have come before saved tails and the Raft store were
        // carried over: they are the node's, never the reseed's to drop.
        carry_over(&old, data_dir)?;
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

struct Staging {
    lsn: Lsn,
    epoch: Epoch,
    total: u64,
    written: u64,
    path: PathBuf,
    file: tokio::fs::File,
}

/// Epoch of a data directory rewound to empty: the one a new database
/// starts in (`engine::recovery`), at or below every entry's.
const REWOUND_EPOCH: u64 = 1;

/// `JournalSink` over a mirror's engine.
pub struct EngineSink {
    engine: SharedEngine,
    cfg: EngineConfig,
    applied: Arc<watch::Sender<Lsn>>,
    /// The task passing the current engine's applied LSN on.
    forwarder: Option<tokio::task::AbortHandle>,
    staging: Option<Staging>,
}

impl std::fmt::Debug for EngineSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineSink")
            .field("data_dir", &self.cfg.data_dir)
            .finish_non_exhaustive()
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |e| StorageError::Io(format!("{what}: {e}"))
}

impl EngineSink {
    /// A sink over `engine`, which must have been opened as a mirror; a
    /// swapped-in engine is opened with the same configuration.
    pub fn new(engine: SharedEngine) -> Self {
        let e = engine.get();
        let cfg = e.config().clone();
        let (applied, _) = watch::channel(Lsn(e.status().applied_lsn));
        let applied = Arc::new(applied);
        let forwarder = forward_applied(&e, &applied);
        EngineSink {
            engine,
            cfg,
            applied,
            forwarder,
            staging: None,
        }
    }

    /// The handle this sink writes through.
    pub fn engine(&self) -> &SharedEngine {
        &self.engine
    }

    fn publish_applied(&self) {
        let lsn = Lsn(self.engine.get().status().applied_lsn);
        self.applied.send_replace(lsn);
    }

    /// Shuts the current engine down, swaps `new_dir` in for the data
    /// directory, and opens it as the current engine.
    async fn swap_in(&mut self, new_dir: PathBuf, keep_journal: bool) -> Result<(), StorageError> {
        // The old engine's applied LSN says nothing about the new one.
        if let Some(f) = self.forwarder.take() {
            f.abort();
        }
        let old_engine = self.engine.get();
        if let Err(e) = old_engine.shutdown().await {
            tracing::warn!(error = %e, "closing the replaced engine");
        }
        drop(old_engine);
        let cfg = self.cfg.clone();
        let opened = tokio::task::spawn_blocking(move || -> Result<Engine, StorageError> {
            let dir = cfg.data_dir.clone();
            let old = sibling(&dir, OLD_SUFFIX);
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(io_err("remove an old reseed leftover"))?;
            }
            std::fs::rename(&dir, &old).map_err(io_err("move the old data directory aside"))?;
            std::fs::rename(&new_dir, &dir).map_err(io_err("move the new data directory in"))?;
            fsync_dir(&parent(&dir)).map_err(io_err("fsync the parent directory"))?;
            carry_over(&old, &dir).map_err(io_err("carry rollback/ and raft/ over"))?;
            if keep_journal {
                // Entries the primary may not have: never dropped silently.
                let saved = dir.join(ROLLBACK_DIR).join(format!(
                    "replaced-{}-journal",
                    chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
                ));
                std::fs::create_dir_all(dir.join(ROLLBACK_DIR))
                    .and_then(|()| std::fs::rename(old.join("journal"), &saved))
                    .and_then(|()| fsync_dir(&dir.join(ROLLBACK_DIR)))
                    .map_err(io_err("keep the replaced journal"))?;
                tracing::warn!(path = %saved.display(), "the replaced data directory's journal may hold entries the primary lacks; kept");
            }
            let engine = Engine::open(cfg)
                .map_err(|e| StorageError::Fatal(format!("reopening after reseed: {e}")))?;
            if let Err(e) = std::fs::remove_dir_all(&old) {
                tracing::warn!(dir = %old.display(), error = %e, "cannot remove the replaced data directory");
            }
            Ok(engine)
        })
        .await
        .map_err(|e| StorageError::Fatal(format!("swap task: {e}")))??;
        self.forwarder = forward_applied(&opened, &self.applied);
        self.engine.replace(opened);
        self.publish_applied();
        Ok(())
    }

    /// Builds an empty data directory of database `db_id` beside the
    /// current one and swaps it in.
    async fn reset_to_empty(&mut self, db_id: [u8; 16], epoch: u64) -> Result<(), StorageError> {
        let new_dir = sibling(&self.cfg.data_dir, NEW_SUFFIX);
        let nd = new_dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            if nd.exists() {
                std::fs::remove_dir_all(&nd).map_err(io_err("remove an unfinished build"))?;
            }
            let b = DataFileBuilder::create(&nd, db_id, epoch, 0)
                .map_err(|e| StorageError::Io(format!("build an empty data directory: {e}")))?;
            b.finish(None)
                .map_err(|e| StorageError::Io(format!("build an empty data directory: {e}")))?;
            Ok(())
        })
        .await
        .map_err(|e| StorageError::Io(format!("build task: {e}")))??;
        self.swap_in(new_dir, false).await
    }
}

/// Raises the published applied LSN to `lsn`; never lowers it (a reading
/// taken earlier must not overwrite a later one before the session saw it).
fn raise(tx: &watch::Sender<Lsn>, lsn: Lsn) {
    tx.send_if_modified(|v| {
        let raised = lsn > *v;
        if raised {
            *v = lsn;
        }
        raised
    });
}

/// Passes the engine's applied LSN on to the replication session (which
/// reports it to the primary): a mirror applies after it acknowledges
/// `flushed_lsn`, so `applied_lsn` moves on its own. Ends with the engine
/// or the sink, or when aborted (the sink swaps engines).
fn forward_applied(
    engine: &Engine,
    to: &Arc<watch::Sender<Lsn>>,
) -> Option<tokio::task::AbortHandle> {
    let rt = tokio::runtime::Handle::try_current().ok()?;
    let mut rx = engine.applied_lsn_watch();
    let to = Arc::downgrade(to);
    let task = rt.spawn(async move {
        loop {
            let lsn = Lsn(*rx.borrow_and_update());
            match to.upgrade() {
                Some(tx) => raise(&tx, lsn),
                None => return,
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    Some(task.abort_handle())
}

fn map_write(e: WriteError) -> StorageError {
    match e {
        WriteError::JournalUnavailable(m) => StorageError::Fatal(m),
        other => StorageError::Io(other.to_string()),
    }
}

impl JournalSink for EngineSink {
    fn position(&self) -> SinkPosition {
        let e = self.engine.get();
        let (lsn, epoch) = e.position();
        let status = e.status();
        SinkPosition {
            // An empty mirror has not adopted a database yet.
            db_id: if lsn == 0 { [0; 16] } else { db_id_bytes(&e) },
            last_lsn: Lsn(lsn),
            // An empty journal holds no entry, hence no epoch. The engine's
            // epoch survives a rewind to empty (truncate_after) and a
            // restart; reporting it here made the session refuse the
            // primary's first entries, of older epochs, for ever.
            last_epoch: Epoch(if lsn == 0 { 0 } else { epoch }),
            applied_lsn: Lsn(status.applied_lsn.min(lsn)),
        }
    }

    async fn adopt_db_id(&mut self, db_id: [u8; 16]) -> Result<(), StorageError> {
        let e = self.engine.get();
        if db_id_bytes(&e) == db_id {
            return Ok(());
        }
        if e.position().0 != 0 {
            return Err(StorageError::Fatal(
                "asked to adopt a database id while holding entries of another database".into(),
            ));
        }
        let epoch = e.position().1;
        drop(e);
        tracing::info!(db_id = %uuid::Uuid::from_bytes(db_id), "empty mirror adopts the primary's database id");
        self.reset_to_empty(db_id, epoch).await
    }

    async fn append(&mut self, entries: Vec<FramedEntry>) -> Result<Lsn, StorageError> {
        let e = self.engine.get();
        let frames = entries.into_iter().map(|f| f.bytes).collect();
        let pos = e.append_frames(frames).await.map_err(map_write)?;
        raise(&self.applied, Lsn(pos.applied_lsn));
        Ok(Lsn(pos.flushed_lsn))
    }

    fn applied_lsn(&self) -> watch::Receiver<Lsn> {
        self.applied.subscribe()
    }

    async fn truncate_after(&mut self, keep_lsn: Lsn) -> Result<SinkPosition, StorageError> {
        let e = self.engine.get();
        let last = e.position().0;
        if last > keep_lsn.0 {
            let journal = e.journal_dir();
            let dir = self.cfg.data_dir.join(ROLLBACK_DIR);
            let saved = tokio::task::spawn_blocking(move || {
                save_tail(&journal, &dir, keep_lsn.0 + 1, last)
            })
            .await
            .map_err(|e| StorageError::Io(format!("save task: {e}")))??;
            tracing::warn!(
                entries = saved.1,
                from = keep_lsn.0 + 1,
                to = last,
                path = %saved.0.display(),
                "saved the divergent journal tail before rewinding; the mirror will be reseeded"
            );
        }
        let db_id = db_id_bytes(&e);
        drop(e);
        // Rewind by reseed: an empty data directory of the same database
        // (the swap carries rollback/ over), at the epoch every database
        // starts in. It replays the primary's journal from LSN 1, through
        // every epoch: created at the current epoch, it refused entry 1 as
        // stale (`stale_epoch`) for ever. Fencing a deposed primary is the
        // session's job (its fence epoch comes from the control plane).
        self.reset_to_empty(db_id, REWOUND_EPOCH).await?;
        Ok(self.position())
    }

    async fn begin_snapshot(
        &mut self,
        lsn: Lsn,
        epoch: Epoch,
        total_bytes: u64,
    ) -> Result<(), StorageError> {
        if let Some(old) = self.staging.take() {
            let _ = tokio::fs::remove_file(&old.path).await;
        }
        let tmp = self.cfg.data_dir.join("tmp");
        tokio::fs::create_dir_all(&tmp)
            .await
            .map_err(io_err("create tmp/"))?;
        let path = tmp.join(format!("reseed-{}.part", uuid::Uuid::new_v4().simple()));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(io_err("create the snapshot staging file"))?;
        self.staging = Some(Staging {
            lsn,
            epoch,
            total: total_bytes,
            written: 0,
            path,
            file,
        });
        Ok(())
    }

    async fn snapshot_chunk(&mut self, bytes: Vec<u8>) -> Result<(), StorageError> {
        let s = self
            .staging
            .as_mut()
            .ok_or_else(|| StorageError::Io("snapshot chunk without a snapshot".into()))?;
        s.written += bytes.len() as u64;
        if s.written > s.total {
            return Err(StorageError::Io(format!(
                "snapshot longer than announced ({} > {})",
                s.written, s.total
            )));
        }
        s.file
            .write_all(&bytes)
            .await
            .map_err(io_err("write the snapshot staging file"))
    }

    async fn install_snapshot(&mut self) -> Result<SinkPosition, StorageError> {
        let mut s = self
            .staging
            .take()
            .ok_or_else(|| StorageError::Io("install without a snapshot".into()))?;
        s.file.flush().await.map_err(io_err("flush the snapshot"))?;
        s.file
            .sync_all()
            .await
            .map_err(io_err("fsync the snapshot"))?;
        drop(s.file);
        let staged = s.path.clone();
        if s.written != s.total {
            let _ = tokio::fs::remove_file(&staged).await;
            return Err(StorageError::Io(format!(
                "snapshot has {} bytes, {} announced",
                s.written, s.total
            )));
        }
        let new_dir = sibling(&self.cfg.data_dir, NEW_SUFFIX);
        let nd = new_dir.clone();
        let (lsn, epoch) = (s.lsn, s.epoch);
        let st = staged.clone();
        let built = tokio::task::spawn_blocking(move || build_from_snapshot(&st, &nd, lsn, epoch))
            .await
            .map_err(|e| StorageError::Io(format!("build task: {e}")));
        let _ = std::fs::remove_file(&staged);
        let records = built??;
        // A mirror ahead of the snapshot, or in another epoch, may hold
        // entries the primary lacks (a fork it could not locate): keep its
        // journal under rollback/ instead of deleting it.
        let (old_lsn, old_epoch) = self.engine.get().position();
        let keep = old_lsn > 0 && (old_lsn > lsn.0 || old_epoch != epoch.0);
        self.swap_in(new_dir, keep).await?;
        let pos = self.position();
        tracing::info!(lsn = %lsn, epoch = %epoch, records, "reseeded from the primary's snapshot");
        Ok(pos)
    }
}

/// Saves the frames `from..=to` of a journal to a new file in `dir`;
/// answers the file and the number of entries.
fn save_tail(
    journal: &Path,
    dir: &Path,
    from: u64,
    to: u64,
) -> Result<(PathBuf, u64), StorageError> {
    std::fs::create_dir_all(dir).map_err(io_err("create rollback/"))?;
    let (segs, _) = list_segments(journal).map_err(|e| StorageError::Io(e.to_string()))?;
    let path = dir.join(format!(
        "diverged-{from:020}-{to:020}-{}.frames",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    let mut f = std::fs::File::create(&path).map_err(io_err("create the rollback file"))?;
    let mut n = 0u64;
    for frame in EntryIter::new(segs, from, to) {
        let frame = frame.map_err(|e| StorageError::Io(format!("reading the tail: {e}")))?;
        f.write_all(&frame.bytes)
            .map_err(io_err("write the rollback file"))?;
        n += 1;
    }
    f.sync_all().map_err(io_err("fsync the rollback file"))?;
    fsync_dir(dir).map_err(io_err("fsync rollback/"))?;
    Ok((path, n))
}

/// Builds a data directory at `new_dir` from a staged snapshot stream;
/// answers the number of records.
pub fn build_from_snapshot(
    staged: &Path,
    new_dir: &Path,
    lsn: Lsn,
    epoch: Epoch,
) -> Result<u64, StorageError> {
    let bad = |m: String| StorageError::Io(format!("snapshot stream: {m}"));
    if new_dir.exists() {
        std::fs::remove_dir_all(new_dir).map_err(io_err("remove an unfinished build"))?;
    }
    let file = std::fs::File::open(staged).map_err(io_err("open the staged snapshot"))?;
    let mut r = std::io::BufReader::new(file);
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    r.read_exact(&mut header)
        .map_err(|e| bad(format!("header: {e}")))?;
    if &header[..8] != SNAPSHOT_MAGIC {
        return Err(bad("not a mirrordb snapshot".into()));
    }
    let mut db_id = [0u8; 16];
    db_id.copy_from_slice(&header[8..24]);
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&header[24..32]);
    let h_lsn = u64::from_le_bytes(n8);
    n8.copy_from_slice(&header[32..40]);
    let h_epoch = u64::from_le_bytes(n8);
    if (h_lsn, h_epoch) != (lsn.0, epoch.0) {
        return Err(bad(format!(
            "header says {h_lsn}/{h_epoch}, the primary announced {lsn}/{epoch}"
        )));
    }
    let build = |e: crate::engine::OpenError| StorageError::Io(format!("building: {e}"));
    let mut b = DataFileBuilder::create(new_dir, db_id, epoch.0, lsn.0).map_err(build)?;
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(bad(e.to_string())),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_SNAPSHOT_ITEM_BYTES {
            return Err(bad(format!("item of {len} bytes is over the limit")));
        }
        buf.resize(len, 0);
        r.read_exact(&mut buf)
            .map_err(|e| bad(format!("truncated item: {e}")))?;
        let item: SnapshotItem =
            postcard::from_bytes(&buf).map_err(|e| bad(format!("item does not decode: {e}")))?;
        b.add_item(item).map_err(build)?;
    }
    let done = b.finish(None).map_err(build)?;
    if (done.last_lsn, done.epoch) != (lsn.0, epoch.0) {
        return Err(StorageError::Io(format!(
            "built data directory ends at {}/{}, expected {lsn}/{epoch}",
            done.last_lsn, done.epoch
        )));
    }
    fsync_dir(new_dir).map_err(io_err("fsync the new data directory"))?;
    Ok(done.records)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn recover_swap_finishes_or_undoes_an_interrupted_swap() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        let (new, old) = (sibling(&d, NEW_SUFFIX), sibling(&d, OLD_SUFFIX));
        // Crash between the renames: the new directory is taken.
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("x"), b"new").unwrap();
        std::fs::create_dir_all(&old).unwrap();
        recover_swap(&d).unwrap();
        assert_eq!(std::fs::read(d.join("x")).unwrap(), b"new");
        assert!(!new.exists() && !old.exists());
        // A build that never got swapped in is dropped.
        std::fs::create_dir_all(&new).unwrap();
        recover_swap(&d).unwrap();
        assert!(!new.exists());
        assert_eq!(std::fs::read(d.join("x")).unwrap(), b"new");
    }

    #[test]
    fn a_swap_interrupted_before_the_carry_over_keeps_saved_tails_and_the_raft_store() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        let old = sibling(&d, OLD_SUFFIX);
        // Both renames done, nothing carried over yet.
        std::fs::create_dir_all(d.join(ROLLBACK_DIR)).unwrap();
        for name in [ROLLBACK_DIR, RAFT_DIR] {
            std::fs::create_dir_all(old.join(name)).unwrap();
            std::fs::write(old.join(name).join("f"), name).unwrap();
        }
        recover_swap(&d).unwrap();
        assert!(!old.exists());
        for name in [ROLLBACK_DIR, RAFT_DIR] {
            assert_eq!(
                std::fs::read(d.join(name).join("f")).unwrap(),
                name.as_bytes()
            );
        }
        // A second run finds nothing to do.
        recover_swap(&d).unwrap();
        assert_eq!(std::fs::read(d.join(RAFT_DIR).join("f")).unwrap(), b"raft");
    }

    /// Regression: a mirror rewound to empty after a failover (its tail
    /// diverged) kept the newer epoch as the epoch of "its last entry", so
    /// it refused entry 1 (epoch 1) from the new primary and never caught
    /// up ("entry 1 has epoch 1, allowed 3..=4").
    #[test]
    fn an_empty_mirror_reports_no_epoch_even_after_a_rewind_in_a_newer_epoch() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        DataFileBuilder::create(&d, [7; 16], 3, 0)
            .unwrap()
            .finish(None)
            .unwrap();
        let mut cfg = EngineConfig::new(&d);
        cfg.role = crate::engine::Role::Mirror { primary_http: None };
        let engine = Engine::open(cfg).unwrap();
        assert_eq!(engine.position(), (0, 3));
        let sink = EngineSink::new(SharedEngine::new(engine));
        let pos = sink.position();
        assert_eq!((pos.last_lsn, pos.last_epoch), (Lsn(0), Epoch(0)));
    }

    /// Regression: a mirror in epoch 2 whose tail diverged was rewound to an
    /// empty directory created at epoch 2, and then refused the primary's
    /// entry 1 (epoch 1) as stale for ever (found by `mirrordb drill`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mirror_rewound_to_empty_replays_the_primary_through_every_epoch() {
        use crate::model::{SessionId, WriteOp};
        let (pd, md) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let put = |k: &str| WriteOp::Put {
            table: "t".into(),
            key: k.into(),
            value: b"1".to_vec(),
            if_version: None,
        };
        let p = Engine::open(EngineConfig::new(pd.path())).unwrap();
        p.write(SessionId::SYSTEM, vec![put("a")]).await.unwrap();
        p.promote(2).await.unwrap();
        p.write(SessionId::SYSTEM, vec![put("b")]).await.unwrap();
        let frames = |from: u64| -> Vec<FramedEntry> {
            p.read_frames(from, 1000, 1 << 20)
                .unwrap()
                .into_iter()
                .map(|f| FramedEntry {
                    lsn: Lsn(f.header.lsn),
                    epoch: Epoch(f.header.epoch),
                    bytes: f.bytes,
                })
                .collect()
        };
        let d = md.path().join("data");
        DataFileBuilder::create(&d, db_id_bytes(&p), 1, 0)
            .unwrap()
            .finish(None)
            .unwrap();
        let mut cfg = EngineConfig::new(&d);
        cfg.role = crate::engine::Role::Mirror { primary_http: None };
        let mut sink = EngineSink::new(SharedEngine::new(Engine::open(cfg).unwrap()));
        let end = sink.append(frames(1)).await.unwrap();
        assert_eq!(sink.engine().get().position(), (end.0, 2));

        let pos = sink.truncate_after(Lsn(0)).await.unwrap();
        assert_eq!((pos.last_lsn, pos.last_epoch), (Lsn(0), Epoch(0)));
        let again = sink.append(frames(1)).await.unwrap();
        assert_eq!(again, end, "the rewound mirror replays every epoch");
        assert_eq!(sink.engine().get().position(), (end.0, 2));
        assert!(d.join(ROLLBACK_DIR).read_dir().unwrap().next().is_some());
    }

    #[test]
    fn a_garbled_snapshot_stream_is_an_error_not_a_panic() {
        let t = tempfile::tempdir().unwrap();
        let staged = t.path().join("s");
        for bytes in [
            Vec::new(),
            b"MDBSNAP1".to_vec(),
            [b"MDBSNAP1".as_slice(), &[0u8; 32], &[255, 255, 255, 255]].concat(),
            [b"MDBSNAP1".as_slice(), &[0u8; 32], &[3, 0, 0, 0, 9, 9, 9]].concat(),
        ] {
            std::fs::write(&staged, &bytes).unwrap();
            assert!(build_from_snapshot(&staged, &t.path().join("n"), Lsn(0), Epoch(0)).is_err());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Snapshot bytes come from the network: any stream, valid header
        /// or not, gives an error or a data directory, never a panic.
        #[test]
        fn arbitrary_snapshot_streams_never_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            with_header in proptest::prelude::any::<bool>(),
        ) {
            let t = tempfile::tempdir().unwrap();
            let staged = t.path().join("s");
            let mut bytes = Vec::new();
            if with_header {
                bytes.extend_from_slice(SNAPSHOT_MAGIC);
                bytes.extend_from_slice(&[7u8; 16]);
                bytes.extend_from_slice(&5u64.to_le_bytes());
                bytes.extend_from_slice(&1u64.to_le_bytes());
            }
            bytes.extend_from_slice(&body);
            std::fs::write(&staged, &bytes).unwrap();
            let _ = build_from_snapshot(&staged, &t.path().join("n"), Lsn(5), Epoch(1));
        }
    }
}
