//! Recovery at start: the decision table of DESIGN §4.
//!
//! | data file | journal | action |
//! | --- | --- | --- |
//! | opens, checkpoint = journal end | intact | open |
//! | opens, checkpoint < journal end | intact | replay (checkpoint, end] |
//! | opens | torn or bad-CRC tail in the last segment | cut the tail, replay |
//! | opens | bad CRC before the tail, or an LSN gap | refuse, naming segment and offset |
//! | damaged or missing | journal complete from LSN 1, or backups + journals | `auto_restore = true`: rebuild from the journal, or restore the newest backup, integrate the archives and replay the live journal (logged in the Backup Journal); otherwise refuse with the command to run |
//! | any | journal of another database id | refuse |
//! | opens | journal ends before the checkpoint, or starts after it | refuse: journal files are missing |
//!
//! Each row has its own test in `engine::tests`. After replay an open
//! transaction at the end of the journal (never acknowledged) is closed with
//! a journaled `TxnAbort`, staged BLOB chunks nobody links are swept, a
//! `DataFileOpen` entry is journaled, and the data file is flushed so the
//! next start has nothing to replay.

use super::replay::Replayer;
use super::store::{DATA_FILE, Store};
use super::{EngineConfig, OpenError};
use crate::journal::format::decode_op;
use crate::journal::scan::{self, EntryIter, JournalState, ScanError, db_id_string};
use crate::journal::writer::{JournalWriter, now_us};
use crate::model::Op;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Entries applied per data-file transaction during replay. Each
/// transaction rewrites every B-tree page it touches once, so larger ones
/// replay faster (measured: 20k → 100k entries per transaction took replay
/// from about 170k to 255k entries/s). Record writes are coalesced too
/// ([`Store::apply_coalesced`]: sorted, the last per key). With both, the
/// byte bound below decides (about 220k entries of 256-byte values):
/// coalescing and that size each took about 15 % off the replay.
const REPLAY_TXN_ENTRIES: u64 = 1_000_000;
/// Journal bytes applied per data-file transaction during replay.
const REPLAY_TXN_BYTES: usize = 64 << 20;

/// Which row of the decision table recovery took.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryAction {
    /// No data file and no journal: a new database.
    Created,
    /// The data file was up to date with the journal.
    Opened,
    /// Journal entries after the checkpoint were replayed.
    Replayed,
    /// The data file was missing or damaged and rebuilt from the journal.
    RebuiltFromJournal,
    /// The data file was missing or damaged and restored from the newest
    /// backup set and the journal archives; the live journal was replayed.
    RestoredFromBackup,
}

/// What recovery found and did; printed at start and served by the API.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryReport {
    pub action: RecoveryAction,
    pub db_id: String,
    pub epoch: u64,
    pub checkpoint_lsn: u64,
    pub journal_first_lsn: u64,
    pub journal_last_lsn: u64,
    pub replayed_entries: u64,
    pub replay_ms: u64,
    pub tail_cut: Option<TailCutReport>,
    pub aborted_txn_lsn: Option<u64>,
    pub orphan_chunks_removed: u64,
    pub damaged_file_moved_to: Option<PathBuf>,
}

/// A torn tail that was cut.
#[derive(Clone, Debug, Serialize)]
pub struct TailCutReport {
    pub segment: PathBuf,
    pub offset: u64,
    pub bytes_removed: u64,
    pub reason: String,
}

pub(crate) struct Recovered {
    pub epoch_history: Vec<(u64, u64)>,
    pub store: Store,
    pub journal: JournalWriter,
    pub replayer: Replayer,
    pub tables: HashMap<String, bool>,
    pub report: RecoveryReport,
    pub checkpoint_lsn: u64,
}

fn restore_hint(data_dir: &Path) -> String {
    format!(
        "restore from your backups with `mirrordb restore --from <backup dir> --to {}` (or move the data directory aside and re-seed this node from a mirror)",
        data_dir.display()
    )
}

fn scan_err(e: ScanError, data_dir: &Path) -> OpenError {
    match e {
        ScanError::Io { path, source } => OpenError::JournalIo { path, source },
        ScanError::Corrupt {
            path,
            offset,
            reason,
        } => OpenError::JournalCorrupt {
            segment: path,
            offset,
            reason,
            hint: restore_hint(data_dir),
        },
        ScanError::Foreign {
            path,
            expected,
            found,
        } => OpenError::ForeignJournal {
            segment: path,
            expected,
            found,
        },
    }
}

/// Runs the decision table for `cfg.data_dir`.
pub(crate) fn recover(cfg: &EngineConfig) -> Result<Recovered, OpenError> {
    let data_dir = &cfg.data_dir;
    let journal_dir = data_dir.join("journal");
    let data_path = data_dir.join(DATA_FILE);
    let t0 = Instant::now();

    let (store, state, mut action, moved) = match open_store(&data_path, cfg.cache_bytes) {
        StoreOpen::Opened(store) => {
            let meta = store.meta().map_err(|e| OpenError::Store(e.to_string()))?;
            let state = scan::verify(&journal_dir, Some(meta.db_id), true)
                .map_err(|e| scan_err(e, data_dir))?;
            (store, state, RecoveryAction::Opened, None)
        }
        StoreOpen::Missing => {
            let state =
                scan::verify(&journal_dir, None, true).map_err(|e| scan_err(e, data_dir))?;
            if state.segments.is_empty() && !has_backups(cfg) {
                let db_id = *uuid::Uuid::new_v4().as_bytes();
                let store = Store::create(&data_path, cfg.cache_bytes, db_id, 1)
                    .map_err(|e| OpenError::Store(e.to_string()))?;
                (store, state, RecoveryAction::Created, None)
            } else {
                let (store, action) =
                    rebuild_base(cfg, &data_path, &state, "the data file is missing", None)?;
                (store, state, action, None)
            }
        }
        StoreOpen::Damaged(reason) => {
            let state =
                scan::verify(&journal_dir, None, true).map_err(|e| scan_err(e, data_dir))?;
            let moved = data_path.with_extension(format!("redb.damaged-{}", now_us() / 1_000_000));
            let (store, action) = rebuild_base(cfg, &data_path, &state, &reason, Some(&moved))?;
            (store, state, action, Some(moved))
        }
    };

    let meta = store.meta().map_err(|e| OpenError::Store(e.to_string()))?;
    let checkpoint = meta.checkpoint_lsn;
    if state.segments.is_empty() && checkpoint > 0 {
        return Err(OpenError::JournalBehindDataFile {
            checkpoint,
            journal_end: 0,
            dir: journal_dir,
        });
    }
    if !state.segments.is_empty() {
        let first_seg_lsn = state.segments[0].header.first_lsn;
        if state.last_lsn < checkpoint || first_seg_lsn > checkpoint + 1 {
            return Err(OpenError::JournalBehindDataFile {
                checkpoint,
                journal_end: state.last_lsn,
                dir: journal_dir,
            });
        }
    }

    // Replay (checkpoint, end].
    let mut replayer = Replayer::after(checkpoint);
    let mut replayed = 0u64;
    if state.last_lsn > checkpoint {
        if action == RecoveryAction::Opened {
            action = RecoveryAction::Replayed;
        }
        let mut frames = EntryIter::new(state.segments.clone(), checkpoint + 1, state.last_lsn);
        let mut done = false;
        while !done {
            store.apply_coalesced(false, |w| -> Result<(), OpenError> {
                let mut bytes = 0usize;
                for _ in 0..REPLAY_TXN_ENTRIES {
                    if bytes >= REPLAY_TXN_BYTES {
                        break;
                    }
                    let Some(frame) = frames.next() else {
                        done = true;
                        return Ok(());
                    };
                    let frame = frame.map_err(|e| scan_err(e, data_dir))?;
                    bytes += frame.bytes.len();
                    let op = decode_op(frame.payload()).map_err(|e| OpenError::JournalCorrupt {
                        segment: journal_dir.clone(),
                        offset: 0,
                        reason: format!("entry {} does not decode: {e}", frame.header.lsn),
                        hint: restore_hint(data_dir),
                    })?;
                    replayer.apply(w, frame.header.lsn, op)?;
                    replayed += 1;
                }
                Ok(())
            })?;
        }
    }
    let replay_ms = t0.elapsed().as_millis() as u64;

    let epoch = meta.epoch.max(state.last_epoch).max(1);
    // The data file's record of epochs, completed with what the journal
    // shows (a crash may have lost the record of a recent change).
    let mut epoch_history = store.epoch_history()?;
    merge_epochs(&mut epoch_history, &state.epochs);
    if epoch_history.is_empty() {
        epoch_history.push((epoch, checkpoint + 1));
    }
    let mut journal = open_journal(cfg, &journal_dir, &state, meta.db_id, epoch, checkpoint)?;

    // Close a transaction the journal ends inside, sweep orphans, mark the
    // open. A mirror writes nothing of its own: the rest of an open
    // transaction will come from its primary.
    let mut closing = Vec::new();
    let mut aborted_txn_lsn = None;
    if cfg.role == super::replica::Role::Primary {
        if replayer.in_txn() {
            let lsn = journal.append(&Op::TxnAbort, now_us());
            closing.push((lsn, Op::TxnAbort));
            aborted_txn_lsn = Some(lsn);
        }
        let open_op = Op::DataFileOpen {
            node: cfg.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let lsn = journal.append(&open_op, now_us());
        closing.push((lsn, open_op));
        journal
            .write_out()
            .and_then(|()| journal.sync())
            .map_err(|source| OpenError::JournalIo {
                path: journal.segment_path().to_owned(),
                source,
            })?;
    }
    let (orphans, _) = store.apply(true, |w| -> Result<u64, OpenError> {
        for (lsn, op) in closing {
            replayer.apply(w, lsn, op)?;
        }
        // (A mirror inside a replicated BLOB transaction keeps its staged chunks.)
        let orphans = if replayer.in_txn() {
            0
        } else {
            w.sweep_orphan_chunks()?
        };
        w.set_epoch(epoch)?;
        w.set_epoch_history(&epoch_history)?;
        w.set_checkpoint(replayer.complete_lsn())?;
        Ok(orphans)
    })?;
    let new_checkpoint = replayer.complete_lsn();

    let view = store.read().map_err(|e| OpenError::Store(e.to_string()))?;
    let tables = view
        .tables()
        .map_err(|e| OpenError::Store(e.to_string()))?
        .into_iter()
        .map(|t| (t.name, t.journaled))
        .collect();

    let report = RecoveryReport {
        action,
        db_id: db_id_string(&meta.db_id),
        epoch,
        checkpoint_lsn: checkpoint,
        journal_first_lsn: state.first_lsn,
        journal_last_lsn: state.last_lsn,
        replayed_entries: replayed,
        replay_ms,
        tail_cut: state.cut.clone().map(|c| TailCutReport {
            segment: c.path,
            offset: c.offset,
            bytes_removed: c.bytes_removed,
            reason: c.reason,
        }),
        aborted_txn_lsn,
        orphan_chunks_removed: orphans,
        damaged_file_moved_to: moved,
    };
    Ok(Recovered {
        epoch_history,
        store,
        journal,
        replayer,
        tables,
        report,
        checkpoint_lsn: new_checkpoint,
    })
}

/// Adds the epochs of `seen` that `history` lacks, keeping it ordered by
/// epoch with the earliest first LSN for each.
pub(crate) fn merge_epochs(history: &mut Vec<(u64, u64)>, seen: &[(u64, u64)]) {
    for &(epoch, lsn) in seen {
        match history.iter_mut().find(|(e, _)| *e == epoch) {
            Some(entry) => entry.1 = entry.1.min(lsn),
            None => history.push((epoch, lsn)),
        }
    }
    history.sort_unstable();
}

enum StoreOpen {
    Opened(Store),
    Missing,
    Damaged(String),
}

fn open_store(path: &Path, cache_bytes: usize) -> StoreOpen {
    if !path.exists() {
        return StoreOpen::Missing;
    }
    match Store::open(path, cache_bytes) {
        Ok(s) => match s.meta() {
            Ok(_) => StoreOpen::Opened(s),
            Err(e) => StoreOpen::Damaged(format!("metadata unreadable: {e}")),
        },
        Err(e) => StoreOpen::Damaged(e.to_string()),
    }
}

fn has_backups(cfg: &EngineConfig) -> bool {
    cfg.backup_dir
        .as_deref()
        .is_some_and(|d| crate::backup::restore::detect_name(d).is_ok())
}

/// Rebuilds a missing or damaged data file, if `auto_restore` allows it:
/// from the journal alone when it still starts at LSN 1, otherwise from the
/// newest backup set and its archives up to where the live journal starts
/// (recovery then replays the live journal as usual). Without
/// `auto_restore` it refuses with the command to run.
fn rebuild_base(
    cfg: &EngineConfig,
    data_path: &Path,
    state: &JournalState,
    reason: &str,
    move_damaged_to: Option<&Path>,
) -> Result<(Store, RecoveryAction), OpenError> {
    let complete = state.segments.first().map(|s| s.header.first_lsn) == Some(1);
    let backups = has_backups(cfg);
    if !cfg.auto_restore || !(complete || backups) {
        let hint = if complete {
            format!(
                "The journal holds the whole history (from LSN 1 to {}): set `recovery.auto_restore = true` to rebuild the data file from it, or {}",
                state.last_lsn,
                restore_hint(&cfg.data_dir)
            )
        } else if backups {
            format!(
                "Backups exist in {}: set `recovery.auto_restore = true` to restore from them automatically, or {}",
                cfg.backup_dir
                    .as_deref()
                    .unwrap_or(Path::new("?"))
                    .display(),
                restore_hint(&cfg.data_dir)
            )
        } else {
            format!(
                "The journal starts at LSN {} and no backups were found, so it cannot rebuild the data file alone: {}",
                state.first_lsn,
                restore_hint(&cfg.data_dir)
            )
        };
        return Err(OpenError::DataFileDamaged {
            path: data_path.to_owned(),
            reason: reason.to_owned(),
            hint,
        });
    }
    if let Some(to) = move_damaged_to {
        std::fs::rename(data_path, to).map_err(|source| OpenError::DataDir {
            path: data_path.to_owned(),
            source,
        })?;
        tracing::warn!(moved_to = %to.display(), "damaged data file moved aside");
    }
    if complete {
        let first = &state.segments[0].header;
        tracing::warn!(reason, db_id = %db_id_string(&first.db_id), "rebuilding the data file from the journal (recovery.auto_restore)");
        let store = Store::create(data_path, cfg.cache_bytes, first.db_id, first.epoch)?;
        return Ok((store, RecoveryAction::RebuiltFromJournal));
    }
    restore_from_backups(cfg, data_path, state, reason)
}

/// Restores the data file from backups into a scratch directory, up to the
/// LSN before the live journal's first entry, and moves it into place; the
/// live journal stays where it is and is replayed by recovery.
fn restore_from_backups(
    cfg: &EngineConfig,
    data_path: &Path,
    state: &JournalState,
    reason: &str,
) -> Result<(Store, RecoveryAction), OpenError> {
    use crate::backup::log::{BackupLog, LineKind};
    use crate::backup::restore::{
        ForkPolicy, RestoreOptions, RestoreTarget, Until, restore_into_with,
    };
    let backup_dir = cfg.backup_dir.clone().unwrap_or_default();
    let log = BackupLog::new(&cfg.data_dir.join("logs"), true);
    let until = match state.segments.first() {
        Some(s) => Until::Lsn(s.header.first_lsn.saturating_sub(1)),
        None => Until::End,
    };
    log.line(
        LineKind::Start,
        &format!(
            "automatic restore at start: the data file is damaged or missing ({reason}); restoring from {} up to {until:?}, then replaying the live journal",
            backup_dir.display()
        ),
    );
    tracing::warn!(reason, backups = %backup_dir.display(), ?until, "restoring the data file from backups (recovery.auto_restore)");
    let scratch = cfg
        .data_dir
        .join("tmp")
        .join(format!("auto-restore-{}", uuid::Uuid::new_v4().simple()));
    let fail = |msg: String| {
        let _ = std::fs::remove_dir_all(&scratch);
        log.line(LineKind::Error, &format!("automatic restore failed: {msg}"));
        OpenError::DataFileDamaged {
            path: data_path.to_owned(),
            reason: reason.to_owned(),
            hint: format!(
                "the automatic restore from {} failed: {msg}",
                backup_dir.display()
            ),
        }
    };
    let target = RestoreTarget { set: None, until };
    let report = restore_into_with(
        &backup_dir,
        &scratch,
        target,
        None,
        RestoreOptions {
            // The same history continues: the live journal is replayed next.
            fork: ForkPolicy::Never,
            // The node's own memory budget for its data file.
            cache_bytes: cfg.cache_bytes,
        },
        &|_| {},
    )
    .map_err(|e| fail(e.to_string()))?;
    if let Some(first) = state.segments.first()
        && report.last_lsn + 1 != first.header.first_lsn
    {
        return Err(fail(format!(
            "the backups reach LSN {} but the live journal starts at {}: entries are missing between them",
            report.last_lsn, first.header.first_lsn
        )));
    }
    let io = |source| OpenError::DataDir {
        path: data_path.to_owned(),
        source,
    };
    std::fs::rename(scratch.join(DATA_FILE), data_path).map_err(io)?;
    if state.segments.is_empty() {
        // No live journal: the restored one (starting after the backups)
        // becomes it.
        let journal = cfg.data_dir.join("journal");
        let _ = std::fs::remove_dir(&journal);
        std::fs::rename(scratch.join("journal"), &journal).map_err(io)?;
    }
    std::fs::File::open(&cfg.data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    let _ = std::fs::remove_dir_all(&scratch);
    log.line(
        LineKind::Info,
        &format!(
            "automatic restore finished: {} records, {} journal entries integrated, data file at LSN {}; replaying the live journal",
            report.records, report.entries_integrated, report.last_lsn
        ),
    );
    let store = Store::open(data_path, cfg.cache_bytes)?;
    Ok((store, RecoveryAction::RestoredFromBackup))
}

fn open_journal(
    cfg: &EngineConfig,
    journal_dir: &Path,
    state: &JournalState,
    db_id: [u8; 16],
    epoch: u64,
    checkpoint: u64,
) -> Result<JournalWriter, OpenError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| OpenError::JournalIo { path, source }
    };
    let mut w = match state.segments.last() {
        Some(last) => {
            let mut w = JournalWriter::resume(
                cfg.disk.clone(),
                journal_dir,
                &last.path,
                state.last_segment_len,
                db_id,
                epoch,
                state.last_lsn,
                cfg.segment_bytes,
            )
            .map_err(io(&last.path))?;
            if w.wants_rotation() || last.header.epoch < epoch {
                w.rotate().map_err(io(journal_dir))?;
            }
            w
        }
        None => JournalWriter::create(
            cfg.disk.clone(),
            journal_dir,
            db_id,
            epoch,
            checkpoint + 1,
            cfg.segment_bytes,
        )
        .map_err(io(journal_dir))?,
    };
    if cfg.preallocate {
        w.preallocate().map_err(io(w.segment_path()))?;
    }
    Ok(w)
}
