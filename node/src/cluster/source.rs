//! [`EngineSource`]: the primary's journal as the replication crate reads it.
//!
//! ```text
//! epoch_history  ◄── Engine::epoch_history (durable), else segment headers; cached briefly
//! oldest_lsn     ◄── first LSN of the oldest live segment
//! durable_lsn    ◄── Engine::durable_lsn_watch (u64) forwarded as Lsn
//! read           ◄── journal::cursor::read on a blocking thread: sequential, from a remembered
//!                    cursor (segment, offset) instead of a scan from the segment start
//! open_snapshot  ◄── backup barrier at S ─► MVCC snapshot ─► temp file of
//!                    [header][u32 len | postcard SnapshotItem]* ─► streamed
//! ```
//!
//! **Snapshots are prepared, then served.** A request takes the barrier
//! (which journals a marker at S; the driver refreshes the session's view of
//! the journal before it checks the snapshot), writes the file and serves
//! it. A prepared snapshot is reused for any mirror while the journal still
//! continues after it and it is younger than [`SNAPSHOT_REUSE`]. The file
//! lives in `tmp/`, which the engine empties at start.

use super::SharedEngine;
use crate::engine::Engine;
use crate::journal::cursor;
use mirrordb_replication::protocol::EpochHistory;
use mirrordb_replication::{Epoch, FramedEntry, JournalSource, Lsn, Snapshot, StorageError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Magic at the start of a reseed snapshot stream.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"MDBSNAP1";
/// Snapshot stream header: magic, db id, LSN, epoch.
pub const SNAPSHOT_HEADER_BYTES: usize = 8 + 16 + 8 + 8;
/// Largest encoded snapshot item accepted when reading one back (a record
/// of 16 MiB or a BLOB chunk, with room for names).
pub const MAX_SNAPSHOT_ITEM_BYTES: usize = 17 * 1024 * 1024;
/// How long the epoch history and oldest LSN read from the segment headers
/// are reused before the journal directory is listed again.
const VIEW_CACHE: Duration = Duration::from_millis(100);
/// How long a prepared snapshot is served to mirrors that need a reseed.
pub const SNAPSHOT_REUSE: Duration = Duration::from_secs(300);

struct Prepared {
    lsn: u64,
    epoch: u64,
    total_bytes: u64,
    path: PathBuf,
    at: Instant,
}

#[derive(Clone)]
struct View {
    at: Instant,
    history: EpochHistory,
    oldest: Lsn,
}

/// `JournalSource` over the primary's engine.
pub struct EngineSource {
    engine: SharedEngine,
    db_id: [u8; 16],
    durable: watch::Receiver<Lsn>,
    view: Mutex<Option<View>>,
    prepared: tokio::sync::Mutex<Option<Prepared>>,
    cursors: Mutex<Vec<cursor::Cursor>>,
}

/// Read positions remembered (one per streaming mirror, roughly).
const MAX_CURSORS: usize = 16;

impl std::fmt::Debug for EngineSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineSource").finish_non_exhaustive()
    }
}

/// The database id of an engine, as bytes.
pub fn db_id_bytes(engine: &Engine) -> [u8; 16] {
    uuid::Uuid::parse_str(&engine.status().db_id)
        .map(|u| *u.as_bytes())
        .unwrap_or([0; 16])
}

impl EngineSource {
    /// A source over `engine`. Must run inside a tokio runtime (a task
    /// forwards the durable LSN).
    pub fn new(engine: SharedEngine) -> Self {
        let e = engine.get();
        let mut rx = e.durable_lsn_watch();
        let (tx, durable) = watch::channel(Lsn(*rx.borrow_and_update()));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let lsn = Lsn(*rx.borrow_and_update());
                        tx.send_if_modified(|v| {
                            let newer = lsn > *v;
                            if newer {
                                *v = lsn;
                            }
                            newer
                        });
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        EngineSource {
            db_id: db_id_bytes(&e),
            engine,
            durable,
            view: Mutex::new(None),
            prepared: tokio::sync::Mutex::new(None),
            cursors: Mutex::new(Vec::new()),
        }
    }

    fn view(&self) -> View {
        let mut cached = self
            .view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = cached.as_ref()
            && v.at.elapsed() < VIEW_CACHE
        {
            return v.clone();
        }
        let engine = self.engine.get();
        let v = read_view(
            &engine.journal_dir(),
            engine.position(),
            &engine.epoch_history(),
        );
        *cached = Some(v.clone());
        v
    }
}

fn read_view(journal_dir: &Path, (durable, epoch): (u64, u64), known: &[(u64, u64)]) -> View {
    // The engine's durable history (kept in the data file) survives dropped
    // segments; segment headers stand in when it is empty.
    let mut pairs: Vec<(Epoch, Lsn)> = known.iter().map(|&(e, l)| (Epoch(e), Lsn(l))).collect();
    let from_headers = pairs.is_empty();
    let mut oldest = Lsn(durable.saturating_add(1));
    if let Ok((segs, _)) = crate::journal::scan::list_segments(journal_dir) {
        if let Some(first) = segs.first() {
            oldest = Lsn(first.header.first_lsn.min(durable.saturating_add(1)));
        }
        for s in segs.iter().filter(|_| from_headers) {
            let e = Epoch(s.header.epoch);
            if pairs.last().is_none_or(|(last, _)| e > *last) {
                pairs.push((e, Lsn(s.header.first_lsn)));
            }
        }
    }
    if pairs.last().is_none_or(|(last, _)| Epoch(epoch) > *last) {
        pairs.push((Epoch(epoch), Lsn(durable.saturating_add(1))));
    }
    let history = EpochHistory::new(pairs).unwrap_or_default();
    View {
        at: Instant::now(),
        history,
        oldest,
    }
}

impl JournalSource for EngineSource {
    fn db_id(&self) -> [u8; 16] {
        self.db_id
    }

    fn epoch_history(&self) -> EpochHistory {
        self.view().history
    }

    fn oldest_lsn(&self) -> Lsn {
        self.view().oldest
    }

    fn durable_lsn(&self) -> watch::Receiver<Lsn> {
        self.durable.clone()
    }

    async fn read(
        &self,
        from: Lsn,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<FramedEntry>, StorageError> {
        let engine = self.engine.get();
        let durable = engine.status().durable_lsn;
        let journal = engine.journal_dir();
        let cursor = {
            let mut cs = self
                .cursors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            cs.iter()
                .position(|c| c.next_lsn == from.0)
                .map(|i| cs.swap_remove(i))
        };
        let (entries, cursor) = tokio::task::spawn_blocking(move || {
            let limits = cursor::Limits {
                entries: max_entries,
                bytes: max_bytes,
                overhead: FramedEntry::WIRE_OVERHEAD,
            };
            cursor::read(&journal, cursor, from.0, durable, limits)
                .map(|(frames, c)| {
                    let entries = frames
                        .into_iter()
                        .map(|f| FramedEntry {
                            lsn: Lsn(f.header.lsn),
                            epoch: Epoch(f.header.epoch),
                            bytes: f.bytes,
                        })
                        .collect::<Vec<_>>();
                    (entries, c)
                })
                .map_err(|e| match e {
                    cursor::CursorError::Unavailable { oldest } => StorageError::Unavailable {
                        oldest: Lsn(oldest),
                    },
                    cursor::CursorError::Io(m) => StorageError::Io(m),
                })
        })
        .await
        .map_err(|e| StorageError::Io(format!("journal read task: {e}")))?
        .inspect_err(|e| {
            if matches!(e, StorageError::Unavailable { .. }) {
                // The view may have been cached before segments were dropped.
                *self
                    .view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            }
        })?;
        if let Some(c) = cursor {
            let mut cs = self
                .cursors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if cs.len() >= MAX_CURSORS {
                cs.remove(0);
            }
            cs.push(c);
        }
        Ok(entries)
    }

    async fn open_snapshot(&self) -> Result<Snapshot, StorageError> {
        let mut prepared = self.prepared.lock().await;
        *self
            .view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        let oldest = self.oldest_lsn();
        let durable = Lsn(self.engine.get().status().durable_lsn);
        if let Some(p) = prepared.as_ref() {
            let usable =
                p.lsn + 1 >= oldest.0 && Lsn(p.lsn) <= durable && p.at.elapsed() < SNAPSHOT_REUSE;
            if usable {
                match tokio::fs::File::open(&p.path).await {
                    Ok(file) => {
                        tracing::info!(
                            lsn = p.lsn,
                            bytes = p.total_bytes,
                            "serving a prepared snapshot for a reseed"
                        );
                        return Ok(Snapshot {
                            lsn: Lsn(p.lsn),
                            epoch: Epoch(p.epoch),
                            total_bytes: p.total_bytes,
                            reader: Box::new(file),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "prepared snapshot is gone; taking a new one")
                    }
                }
            }
        }
        if let Some(old) = prepared.take() {
            let _ = tokio::fs::remove_file(&old.path).await;
        }
        let engine = self.engine.get();
        let point = engine
            .backup_barrier(0)
            .await
            .map_err(|e| StorageError::Io(format!("snapshot barrier: {e}")))?;
        let (lsn, epoch, db_id) = (point.lsn, point.epoch, point.db_id);
        let path = engine
            .config()
            .data_dir
            .join("tmp")
            .join(format!("reseed-{}.snap", uuid::Uuid::new_v4().simple()));
        let p = path.clone();
        let written = tokio::task::spawn_blocking(move || {
            write_snapshot(&p, db_id, lsn, epoch, &point.snapshot)
        })
        .await
        .map_err(|e| StorageError::Io(format!("snapshot task: {e}")));
        let total_bytes = match written {
            Ok(Ok(n)) => n,
            Ok(Err(e)) | Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        tracing::info!(
            lsn,
            epoch,
            bytes = total_bytes,
            "snapshot for a reseed is prepared"
        );
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| StorageError::Io(format!("{}: {e}", path.display())))?;
        *prepared = Some(Prepared {
            lsn,
            epoch,
            total_bytes,
            path,
            at: Instant::now(),
        });
        Ok(Snapshot {
            lsn: Lsn(lsn),
            epoch: Epoch(epoch),
            total_bytes,
            reader: Box::new(file),
        })
    }
}

/// Writes a snapshot stream to `path`; answers its length.
pub fn write_snapshot(
    path: &PathBuf,
    db_id: [u8; 16],
    lsn: u64,
    epoch: u64,
    snapshot: &crate::engine::Snapshot,
) -> Result<u64, StorageError> {
    let io = |e: std::io::Error| StorageError::Io(format!("{}: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    let mut header = Vec::with_capacity(SNAPSHOT_HEADER_BYTES);
    header.extend_from_slice(SNAPSHOT_MAGIC);
    header.extend_from_slice(&db_id);
    header.extend_from_slice(&lsn.to_le_bytes());
    header.extend_from_slice(&epoch.to_le_bytes());
    w.write_all(&header).map_err(io)?;
    let mut total = header.len() as u64;
    snapshot
        .for_each(|item| -> Result<(), std::io::Error> {
            let buf = postcard::to_stdvec(&item).map_err(std::io::Error::other)?;
            let len = u32::try_from(buf.len()).map_err(std::io::Error::other)?;
            w.write_all(&len.to_le_bytes())?;
            w.write_all(&buf)?;
            total += 4 + buf.len() as u64;
            Ok(())
        })
        .map_err(|e| StorageError::Io(format!("snapshot export: {e}")))?;
    w.flush().map_err(io)?;
    Ok(total)
}
