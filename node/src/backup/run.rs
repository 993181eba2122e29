//! Backup orchestration: one full backup from the barrier to retention, the
//! progress it reports, stopping it, the hooks around it, and the async
//! driver of the scheduler.
//!
//! ```text
//! run(trigger)
//!   ├─ destination ready? (missing / read-only / full → clear error), stale .tmp-* removed
//!   ├─ number = 1 + highest recorded complete number (history, manifests)
//!   ├─ only_if_changed: no data entry after the last set's S → skipped
//!   ├─ on_start hook (non-zero exit cancels)
//!   ├─ Engine::backup_barrier(number) → S, closed segments ≤ S, snapshot (writes go on)
//!   ├─ Engine::flush beside the writer: the snapshot then pins no newer page; checkpoint ≥ S
//!   ├─ stream snapshot → .tmp dir/snapshot.zst (under writes, chunks the compressor has
//!   │  no room for wait in a spool), release the snapshot, wait for compression
//!   ├─ archive segments ≤ S → .tmp file → fsync → ‹name›[number-1].journal
//!   ├─ attached files, manifest.json, fsync every file and the dir
//!   │  → rename to ‹name›[number].backup → fsync destination
//!   ├─ backupHistory.json, then Engine::drop_segments_upto(S)
//!   ├─ retention (after success only): keep_last sets and the archives they need
//!   └─ on_finish hook (status in env), Backup Journal line
//! ```
//!
//! A crash at any point leaves at most `.tmp-*` entries (removed by the next
//! backup) and live segments that are archived again next time: no set ever
//! looks complete without being complete.

use super::SnapshotItem;
use super::format::{
    self, ATTACHED_DIR, ArchiveWriter, FormatError, MANIFEST_FILE, SNAPSHOT_FILE, SnapshotHeader,
    SnapshotWriter, TEMP_PREFIX, io_at,
};
use super::log::{BackupLog, LineKind};
use super::manifest::{
    ArchiveEntry, AttachedEntry, BackupStatus, Catalog, FileEntry, History, HistoryEntry, Manifest,
};
use super::pace::Pace;
use super::schedule::{Action, Scheduler};
use super::settings::{BackupPriority, BackupSection};
use crate::engine::{Engine, WriteError};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Longest a scheduler sleep lasts before it looks at the clock again.
const SCHEDULER_MAX_SLEEP: Duration = Duration::from_secs(30);
/// Bytes of hook output kept for the log.
const HOOK_OUTPUT_BYTES: usize = 2048;

/// Why a backup did not complete.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackupError {
    #[error("backup destination {0} does not exist (is the disk mounted?)")]
    DestinationMissing(PathBuf),
    #[error("backup destination {0} is a file, not a directory")]
    DestinationNotADirectory(PathBuf),
    #[error("backup destination {path} is full: {source}")]
    DestinationFull { path: PathBuf, source: io::Error },
    #[error("backup destination {path} is read-only or not writable: {source}")]
    DestinationReadOnly { path: PathBuf, source: io::Error },
    #[error("a backup is already running (number {0})")]
    Busy(u32),
    #[error("the backup was interrupted; its partial files were removed")]
    Interrupted,
    #[error("the on_start hook failed, backup cancelled: {0}")]
    HookFailed(String),
    #[error("backup numbers are exhausted (highest is {max})", max = format::MAX_NUMBER)]
    NumbersExhausted,
    #[error("the engine refused the backup barrier: {0}")]
    Engine(#[from] WriteError),
    #[error("reading the snapshot failed: {0}")]
    Snapshot(String),
    #[error(transparent)]
    Format(FormatError),
    #[error("backup task failed: {0}")]
    Internal(String),
}

impl BackupError {
    /// The stable error code (API and CLI).
    pub fn code(&self) -> &'static str {
        match self {
            BackupError::DestinationMissing(_) | BackupError::DestinationNotADirectory(_) => {
                "destination_missing"
            }
            BackupError::DestinationFull { .. } => "destination_full",
            BackupError::DestinationReadOnly { .. } => "destination_read_only",
            BackupError::Busy(_) => "backup_in_progress",
            BackupError::Interrupted => "backup_interrupted",
            BackupError::HookFailed(_) => "hook_failed",
            BackupError::NumbersExhausted => "backup_failed",
            BackupError::Engine(e) => e.code(),
            BackupError::Snapshot(_) | BackupError::Format(_) | BackupError::Internal(_) => {
                "backup_failed"
            }
        }
    }
}

/// Maps an I/O error in the destination to the error an operator can act on.
fn dest_error(dest: &Path, e: FormatError) -> BackupError {
    if let FormatError::Io { path, source } = &e {
        let raw = source.raw_os_error();
        let kind = source.kind();
        if kind == io::ErrorKind::StorageFull || raw == Some(28) || raw == Some(122) {
            return BackupError::DestinationFull {
                path: dest.to_owned(),
                source: io::Error::new(kind, source.to_string()),
            };
        }
        if kind == io::ErrorKind::ReadOnlyFilesystem
            || kind == io::ErrorKind::PermissionDenied
            || raw == Some(30)
        {
            return BackupError::DestinationReadOnly {
                path: path.clone(),
                source: io::Error::new(kind, source.to_string()),
            };
        }
        if kind == io::ErrorKind::NotFound && !dest.is_dir() {
            return BackupError::DestinationMissing(dest.to_owned());
        }
    }
    BackupError::Format(e)
}

/// Who started a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Trigger {
    /// `mirrordb backup` or any explicit request (counts as manual).
    Manual { by: String },
    /// The scheduler.
    Scheduled { scheduled: String, attempt: u32 },
}

impl Trigger {
    fn name(&self) -> String {
        match self {
            Trigger::Manual { by } => by.clone(),
            Trigger::Scheduled { .. } => "scheduled".into(),
        }
    }
    fn is_manual(&self) -> bool {
        matches!(self, Trigger::Manual { .. })
    }
}

/// A backup in progress, as `GET /v1/backups/current` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub number: u32,
    pub trigger: Trigger,
    /// `preparing`, `barrier`, `snapshot`, `compressing`, `archiving`,
    /// `attached`, `finishing`.
    pub phase: &'static str,
    pub started: String,
    pub elapsed_ms: u64,
    pub lsn: Option<u64>,
    pub items_done: u64,
    pub items_total: u64,
    /// Uncompressed bytes streamed so far and the estimate of the total.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Compressed bytes written to the destination so far.
    pub bytes_written: u64,
    /// How long compression has waited for writers so far
    /// (`backup.max_rate_while_writing`): while it grows, the backup is
    /// slowed on purpose, so that clients keep their speed.
    pub paced_ms: u64,
    pub eta_ms: Option<u64>,
    pub stopping: bool,
}

/// How a backup ended.
#[derive(Clone, Debug, Serialize)]
pub struct BackupOutcome {
    pub number: u32,
    pub status: BackupStatus,
    /// `true` when `only_if_changed` found nothing new (no set written).
    pub skipped: bool,
    pub lsn: Option<u64>,
    pub set_dir: Option<PathBuf>,
    pub archive: Option<PathBuf>,
    pub duration_ms: u64,
    pub bytes_written: u64,
    pub records: u64,
    pub error: Option<String>,
    /// Sets and archives retention deleted.
    pub deleted: Vec<PathBuf>,
    /// The files written, as the history records them: the journal
    /// archive (if any), then the snapshot.
    pub files: Vec<FileEntry>,
}

struct Running {
    progress: Progress,
    t0: Instant,
    cancel: Arc<AtomicBool>,
}

/// Where the service finds the engine: a mirror's reseed may replace it.
pub type EngineSource = Arc<dyn Fn() -> Engine + Send + Sync>;

struct Inner {
    engine: EngineSource,
    cfg: BackupSection,
    log: BackupLog,
    running: Mutex<Option<Running>>,
    paused: Mutex<bool>,
    /// The last backup that ended `ok` (from the history at start), for
    /// the metrics.
    last_ok: Mutex<Option<LastOk>>,
    /// When a backup skipped by `only_if_changed` last found the newest
    /// set still holding every write (Unix seconds; kept in the history as
    /// `last_skipped`, so a restart does not forget it).
    last_skip: Mutex<Option<f64>>,
    resume: Arc<tokio::sync::Notify>,
    /// Woken when a backup gives up the slot ([`BackupService::wait_current`]).
    ended: tokio::sync::Notify,
}

/// The last backup that ended `ok`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LastOk {
    /// When it ended, in seconds since the Unix epoch.
    ended_unix_s: f64,
    duration_s: f64,
    /// Bytes of the files it wrote (set and archive).
    bytes: u64,
}

/// A time as the seconds since the Unix epoch that the gauges report
/// (millisecond precision, as the history records it).
fn unix_s<Tz: chrono::TimeZone>(t: &DateTime<Tz>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

impl LastOk {
    /// The newest `ok` entry of a history.
    fn from_history(h: &History) -> Option<LastOk> {
        h.entries
            .iter()
            .filter(|e| e.status == BackupStatus::Ok)
            .max_by_key(|e| e.number)
            .and_then(LastOk::from_entry)
    }

    /// What a history entry says (whatever its status).
    fn from_entry(e: &HistoryEntry) -> Option<LastOk> {
        let started = DateTime::parse_from_rfc3339(&e.started).ok()?;
        let duration_s = e.duration_ms as f64 / 1000.0;
        Some(LastOk {
            ended_unix_s: unix_s(&started) + duration_s,
            duration_s,
            bytes: e.files.iter().map(|f| f.bytes).sum(),
        })
    }
}

/// The backup pipeline of one node. Cheap to clone.
#[derive(Clone)]
pub struct BackupService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BackupService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupService")
            .field("destination", &self.inner.cfg.destination)
            .finish_non_exhaustive()
    }
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Growth of the data file below which a backup says nothing about it.
const GROWTH_NOTED_BYTES: u64 = 64 << 20;

/// The line that tells an operator the data file grew by at least
/// [`GROWTH_NOTED_BYTES`] and a tenth while backup `number` ran: pages the
/// load rewrote while the snapshot was open could not be reused (see
/// `engine::compact`).
fn growth_line(number: u32, before: u64, after: u64) -> Option<String> {
    let grown = after.checked_sub(before)?;
    if before == 0 || grown < GROWTH_NOTED_BYTES || grown < before / 10 {
        return None;
    }
    Some(format!(
        "backup {number}: the data file grew from {} to {} while the backup ran \
         (pages rewritten while its snapshot was open cannot be reused until it closes); \
         the space is reused from now on, and `mirrordb compact` returns it with the node stopped",
        human_bytes(before),
        human_bytes(after)
    ))
}

/// Human size.
pub fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Stops the current backup when dropped unfinished (the caller went away:
/// Ctrl-C in the CLI, a dropped request), so partial files are removed.
struct RunningGuard<'a> {
    inner: &'a Inner,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut r = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(run) = r.take() {
            run.cancel.store(true, Ordering::Release);
        }
        drop(r);
        self.inner.ended.notify_waiters();
    }
}

impl BackupService {
    /// The service for `engine` with `[backup]` settings; the Backup Journal
    /// goes to `data_dir/logs`.
    pub fn new(engine: Engine, cfg: BackupSection) -> BackupService {
        BackupService::with_engine_source(Arc::new(move || engine.clone()), cfg)
    }

    /// The service over an engine that may be replaced (see [`EngineSource`]).
    pub fn with_engine_source(engine: EngineSource, cfg: BackupSection) -> BackupService {
        let logs = engine().config().data_dir.join("logs");
        let log = BackupLog::new(&logs, cfg.verbose);
        let history = History::read(&cfg.destination).ok();
        let paused = history.as_ref().is_some_and(|h| h.automatic_paused);
        let last_ok = history.as_ref().and_then(LastOk::from_history);
        let last_skip = history
            .as_ref()
            .and_then(|h| h.last_skipped.as_deref())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| unix_s(&t));
        BackupService {
            inner: Arc::new(Inner {
                engine,
                cfg,
                log,
                running: Mutex::new(None),
                paused: Mutex::new(paused),
                last_ok: Mutex::new(last_ok),
                last_skip: Mutex::new(last_skip),
                resume: Arc::new(tokio::sync::Notify::new()),
                ended: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &BackupSection {
        &self.inner.cfg
    }

    /// The engine (the current one).
    pub fn engine(&self) -> Engine {
        (self.inner.engine)()
    }

    /// The Backup Journal.
    pub fn log(&self) -> &BackupLog {
        &self.inner.log
    }

    /// Sets the backup gauges of `/metrics` (at each scrape): the last
    /// successful backup's end, duration and size, whether automatic
    /// backups are paused, whether one is running.
    pub fn publish_metrics(&self) {
        let last = *self.inner.last_ok.lock().unwrap_or_else(|p| p.into_inner());
        // 0 until a backup succeeds: an alert on its age then fires rather
        // than finding no series.
        let (ended, duration, bytes) = last.map_or((0.0, 0.0, 0.0), |l| {
            (l.ended_unix_s, l.duration_s, l.bytes as f64)
        });
        metrics::gauge!("mirrordb_backup_last_success_timestamp_seconds").set(ended);
        metrics::gauge!("mirrordb_backup_last_success_duration_seconds").set(duration);
        metrics::gauge!("mirrordb_backup_last_success_bytes").set(bytes);
        metrics::gauge!("mirrordb_backup_last_covered_timestamp_seconds")
            .set(self.last_covered_unix_s().unwrap_or(0.0));
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        metrics::gauge!("mirrordb_backup_automatic_paused").set(flag(self.automatic_paused()));
        let running = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        metrics::gauge!("mirrordb_backup_running").set(flag(running));
    }

    /// When the backups were last known to hold every write (Unix
    /// seconds): the end of the last backup that ended `ok`, or of a later
    /// one that `only_if_changed` skipped because nothing had changed since
    /// the newest set. The age an operator alerts on: unlike the last
    /// success, it does not grow on an idle database whose scheduled
    /// backups are all skipped.
    pub fn last_covered_unix_s(&self) -> Option<f64> {
        let ok = self
            .inner
            .last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|l| l.ended_unix_s);
        let skip = *self
            .inner
            .last_skip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        ok.into_iter().chain(skip).reduce(f64::max)
    }

    /// Writes `backupHistory.json` for backup `number`; a failure is an
    /// error line in the Backup Journal, not the backup's failure.
    fn write_history(&self, history: &History, dest: &Path, number: u32) {
        if let Err(e) = history.write(dest) {
            self.inner.log.line(
                LineKind::Error,
                &format!("backup {number}: cannot write the history: {e}"),
            );
        }
    }

    /// Whether automatic backups are paused after failures.
    pub fn automatic_paused(&self) -> bool {
        *self.inner.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backup in progress.
    pub fn current(&self) -> Option<Progress> {
        let r = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        r.as_ref().map(|run| {
            let mut p = run.progress.clone();
            p.elapsed_ms = run.t0.elapsed().as_millis() as u64;
            p.stopping = run.cancel.load(Ordering::Acquire);
            if p.bytes_done > 0 && p.bytes_total > p.bytes_done {
                let rate = p.bytes_done as f64 / p.elapsed_ms.max(1) as f64;
                p.eta_ms = Some(((p.bytes_total - p.bytes_done) as f64 / rate) as u64);
            }
            p
        })
    }

    /// The backup in progress after waiting up to `max` for it to end:
    /// `None` as soon as no backup runs, so a follower learns of the end at
    /// once instead of at its next poll.
    pub async fn wait_current(&self, max: Duration) -> Option<Progress> {
        let ended = self.inner.ended.notified();
        tokio::pin!(ended);
        // Registered before the check: an end between the two still wakes it.
        ended.as_mut().enable();
        self.current()?;
        let _ = tokio::time::timeout(max, ended).await;
        self.current()
    }

    /// Asks the backup in progress to stop; answers its number.
    pub fn stop(&self) -> Option<u32> {
        let r = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        r.as_ref().map(|run| {
            run.cancel.store(true, Ordering::Release);
            run.progress.number
        })
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        let mut r = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(run) = r.as_mut() {
            f(&mut run.progress);
        }
    }

    /// The destination's history and what it holds.
    pub fn list(&self) -> Result<(History, Catalog), BackupError> {
        let dest = &self.inner.cfg.destination;
        if !dest.is_dir() {
            return Ok((History::default(), Catalog::default()));
        }
        let h = History::read(dest).map_err(BackupError::Format)?;
        let c = Catalog::scan(dest, &self.inner.cfg.name).map_err(BackupError::Format)?;
        Ok((h, c))
    }

    /// Starts a backup in the background; answers its number at once.
    pub async fn start(&self, trigger: Trigger) -> Result<u32, BackupError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.run_inner(trigger, Some(tx)).await;
        });
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(BackupError::Internal("the backup task ended early".into())),
        }
    }

    /// Runs a backup to its end. Dropping the future stops the backup and
    /// removes its partial files.
    pub async fn run(&self, trigger: Trigger) -> Result<BackupOutcome, BackupError> {
        self.run_inner(trigger, None).await
    }

    async fn run_inner(
        &self,
        trigger: Trigger,
        started: Option<tokio::sync::oneshot::Sender<Result<u32, BackupError>>>,
    ) -> Result<BackupOutcome, BackupError> {
        let inner = &*self.inner;
        let cfg = &inner.cfg;
        let dest = cfg.destination.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let started_at = now_rfc3339();
        // Claim the single backup slot.
        {
            let mut r = inner.running.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(run) = r.as_ref() {
                let e = BackupError::Busy(run.progress.number);
                if let Some(tx) = started {
                    let _ = tx.send(Err(BackupError::Busy(run.progress.number)));
                }
                return Err(e);
            }
            *r = Some(Running {
                progress: Progress {
                    number: 0,
                    trigger: trigger.clone(),
                    phase: "preparing",
                    started: started_at.clone(),
                    elapsed_ms: 0,
                    lsn: None,
                    items_done: 0,
                    items_total: 0,
                    bytes_done: 0,
                    bytes_total: 0,
                    bytes_written: 0,
                    paced_ms: 0,
                    eta_ms: None,
                    stopping: false,
                },
                t0,
                cancel: cancel.clone(),
            });
        }
        let _guard = RunningGuard { inner };
        let prepared = self.prepare(&dest).await;
        let (number, mut history) = match prepared {
            Ok(x) => x,
            Err(e) => {
                inner.log.line(
                    LineKind::Error,
                    &format!("backup failed before it started ({}): {e}", trigger.name()),
                );
                // The caller of `start` gets the error itself (with its code).
                if let Some(tx) = started {
                    let msg = e.to_string();
                    let _ = tx.send(Err(e));
                    return Err(BackupError::Internal(msg));
                }
                return Err(e);
            }
        };
        self.update(|p| p.number = number);
        if let Some(tx) = started {
            let _ = tx.send(Ok(number));
        }
        // only_if_changed.
        if cfg.only_if_changed
            && let Some(last) = self.last_set_lsn()
            && !self.changed_since(last)
        {
            inner.log.line(
                LineKind::Info,
                &format!("backup {number} skipped: no data changed since LSN {last}"),
            );
            metrics::counter!("mirrordb_backups_total", "status" => "skipped").increment(1);
            let now = Utc::now();
            *inner.last_skip.lock().unwrap_or_else(|p| p.into_inner()) = Some(unix_s(&now));
            history.last_skipped = Some(now.to_rfc3339_opts(SecondsFormat::Millis, true));
            self.write_history(&history, &dest, number);
            return Ok(BackupOutcome {
                number,
                status: BackupStatus::Ok,
                skipped: true,
                lsn: Some(last),
                set_dir: None,
                archive: None,
                duration_ms: t0.elapsed().as_millis() as u64,
                bytes_written: 0,
                records: 0,
                error: None,
                deleted: Vec::new(),
                files: Vec::new(),
            });
        }
        inner.log.line(
            LineKind::Start,
            &format!(
                "backup {number} started ({}) to {}",
                trigger.name(),
                dest.display()
            ),
        );
        let file_before = self.engine().data_file_bytes();
        let result = match self.hook_start(number).await {
            Err(e) => Err(e),
            Ok(()) => self.backup(number, &dest, cancel.clone()).await,
        };
        let growth = growth_line(number, file_before, self.engine().data_file_bytes());
        let duration_ms = t0.elapsed().as_millis() as u64;
        let scheduled = match &trigger {
            Trigger::Scheduled { scheduled, .. } => Some(scheduled.clone()),
            Trigger::Manual { .. } => None,
        };
        let mut outcome = result.map(|mut out| {
            out.duration_ms = duration_ms;
            out
        });
        let (status, lsn, error, files) = match &outcome {
            Ok(out) => (out.status, out.lsn, out.error.clone(), out.files.clone()),
            Err(e) => (
                if matches!(e, BackupError::Interrupted) {
                    BackupStatus::Interrupted
                } else {
                    BackupStatus::Failed
                },
                None,
                Some(e.to_string()),
                vec![],
            ),
        };
        metrics::counter!("mirrordb_backups_total", "status" => status.as_str()).increment(1);
        let entry = HistoryEntry {
            number,
            started: started_at.clone(),
            duration_ms,
            status,
            trigger: trigger.name(),
            scheduled,
            lsn,
            error,
            files,
        };
        if status == BackupStatus::Ok {
            *inner.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = LastOk::from_entry(&entry);
        }
        history.push(entry);
        if let Ok(out) = &mut outcome {
            // A manual backup that ran resumes paused automatic ones.
            if trigger.is_manual() {
                history.automatic_paused = false;
                *inner.paused.lock().unwrap_or_else(|p| p.into_inner()) = false;
                inner.resume.notify_waiters();
            }
            // Retention after success only, then the history records what
            // is left.
            if out.status == BackupStatus::Ok {
                match self.retention(&dest, &mut history) {
                    Ok(d) => out.deleted = d,
                    Err(e) => inner.log.line(
                        LineKind::Error,
                        &format!("backup {number}: retention failed: {e}"),
                    ),
                }
            }
        }
        self.write_history(&history, &dest, number);
        match &outcome {
            Ok(out) => {
                let kind = if out.status == BackupStatus::Ok {
                    LineKind::Info
                } else {
                    LineKind::Error
                };
                inner.log.line(
                    kind,
                    &format!(
                        "backup {number} {}: LSN {}, {} records, {} written in {:.1} s, {}{}",
                        out.status.as_str(),
                        out.lsn.unwrap_or(0),
                        out.records,
                        human_bytes(out.bytes_written),
                        duration_ms as f64 / 1000.0,
                        out.set_dir
                            .as_ref()
                            .map(|d| d.display().to_string())
                            .unwrap_or_default(),
                        out.error
                            .as_ref()
                            .map(|e| format!(" (error: {e})"))
                            .unwrap_or_default()
                    ),
                );
                for d in &out.deleted {
                    inner.log.line(
                        LineKind::Info,
                        &format!("backup {number}: retention deleted {}", d.display()),
                    );
                }
            }
            Err(e) => inner.log.line(
                LineKind::Error,
                &format!("backup {number} {}: {e}", e.code()),
            ),
        }
        if let Some(line) = growth {
            tracing::warn!("{line}");
            inner.log.line(LineKind::Info, &line);
        }
        self.hook_finish(number, &outcome).await;
        outcome
    }

    /// Checks the destination, removes leftovers, picks the number.
    async fn prepare(&self, dest: &Path) -> Result<(u32, History), BackupError> {
        let cfg = &self.inner.cfg;
        if dest.exists() && !dest.is_dir() {
            return Err(BackupError::DestinationNotADirectory(dest.to_owned()));
        }
        if !dest.is_dir() {
            if !cfg.create_destination {
                return Err(BackupError::DestinationMissing(dest.to_owned()));
            }
            fs::create_dir_all(dest)
                .map_err(|e| {
                    dest_error(
                        dest,
                        FormatError::Io {
                            path: dest.to_owned(),
                            source: e,
                        },
                    )
                })
                .and_then(|()| {
                    if dest.is_dir() {
                        Ok(())
                    } else {
                        Err(BackupError::DestinationMissing(dest.to_owned()))
                    }
                })?;
        }
        // Probe: a destination we cannot write is an error before the barrier.
        let probe = dest.join(format!("{TEMP_PREFIX}probe-{}", std::process::id()));
        let probed = fs::File::create(&probe)
            .and_then(|f| f.sync_all())
            .and_then(|()| fs::remove_file(&probe));
        if let Err(e) = probed {
            let _ = fs::remove_file(&probe);
            return Err(dest_error(dest, io_at(&probe)(e)));
        }
        let catalog = Catalog::scan(dest, &cfg.name).map_err(|e| dest_error(dest, e))?;
        for t in &catalog.temp {
            let r = if t.is_dir() {
                fs::remove_dir_all(t)
            } else {
                fs::remove_file(t)
            };
            if let Err(e) = r {
                return Err(dest_error(dest, io_at(t)(e)));
            }
            self.inner.log.line(
                LineKind::Info,
                &format!("removed {} left by an interrupted backup", t.display()),
            );
        }
        // A history that does not parse is kept aside, never silently lost.
        let history = match History::read(dest) {
            Ok(h) => h,
            Err(FormatError::Damaged { what, reason, .. }) => {
                let aside = dest.join(format!(
                    "{}.damaged-{}",
                    super::manifest::HISTORY_FILE,
                    Utc::now().timestamp()
                ));
                let _ = fs::rename(dest.join(super::manifest::HISTORY_FILE), &aside);
                self.inner.log.line(
                    LineKind::Error,
                    &format!(
                        "{what}: {reason}; moved to {} and started afresh",
                        aside.display()
                    ),
                );
                History::default()
            }
            Err(e) => return Err(dest_error(dest, e)),
        };
        let number = history.last_number().max(catalog.last_number()) + 1;
        if number > format::MAX_NUMBER {
            return Err(BackupError::NumbersExhausted);
        }
        Ok((number, history))
    }

    fn last_set_lsn(&self) -> Option<u64> {
        let (_, c) = self.list().ok()?;
        c.sets.last().map(|s| s.manifest.lsn)
    }

    /// Whether any data-changing entry follows `lsn` in the live journal.
    fn changed_since(&self, lsn: u64) -> bool {
        use crate::journal::scan;
        use crate::model::Op;
        let end = self.engine().status().durable_lsn;
        if end <= lsn {
            return false;
        }
        let Ok((segs, _)) = scan::list_segments(&self.engine().journal_dir()) else {
            return true;
        };
        if segs.first().is_none_or(|s| s.header.first_lsn > lsn + 1) {
            return true;
        }
        for f in scan::EntryIter::new(segs, lsn + 1, end) {
            let Ok(f) = f else { return true };
            match crate::journal::format::decode_op(f.payload()) {
                Ok(
                    Op::DataFileOpen { .. }
                    | Op::DataFileClose
                    | Op::SessionOpen { .. }
                    | Op::SessionClose { .. }
                    | Op::BackupMarker { .. }
                    | Op::RestorePoint { .. },
                ) => {}
                _ => return true,
            }
        }
        false
    }

    /// The backup proper: barrier, archive, snapshot, attached files,
    /// manifest, rename, drop of archived segments.
    async fn backup(
        &self,
        number: u32,
        dest: &Path,
        cancel: Arc<AtomicBool>,
    ) -> Result<BackupOutcome, BackupError> {
        let inner = &*self.inner;
        let cfg = inner.cfg.clone();
        if cancel.load(Ordering::Acquire) {
            // Stopped while the on_start hook ran: not even a barrier.
            return Err(BackupError::Interrupted);
        }
        self.update(|p| p.phase = "barrier");
        let point = self.engine().backup_barrier(number).await?;
        let lsn = point.lsn;
        // A durable commit right behind the snapshot, beside the writer
        // (which waits only if it applies meanwhile, as at any periodic
        // flush). Until then the snapshot reads a non-durable commit, and
        // while a reader holds one of those, redb reuses no page that a
        // later commit frees: every write pays for it as long as the backup
        // runs (a snapshot held 6-10 s under 32 writers, nothing read:
        // 0.69 of the write rate without one; 0.83-0.87 with this flush).
        // It also puts the checkpoint past S, so the archived segments can
        // be dropped at the end. After it the periodic flush runs more
        // often until the snapshot is dropped (`OpenSnapshot`, taken by
        // the barrier).
        if let Err(e) = self.engine().flush().await {
            tracing::warn!(error = %e, "flush after the backup barrier");
        }
        // Progress totals from cheap estimates: the tables' counters and the
        // data file's size (an exact count would walk the whole file once more).
        let engine = self.engine();
        let items_total = engine
            .tables()
            .map(|ts| ts.iter().map(|t| 1 + t.records + t.blobs).sum::<u64>())
            .unwrap_or(0);
        let bytes_total = engine.data_file_bytes();
        self.update(|p| {
            p.lsn = Some(lsn);
            p.items_total = items_total;
            p.bytes_total = bytes_total;
        });
        let this = self.clone();
        let dest2 = dest.to_owned();
        let cancel2 = cancel.clone();
        // A thread of its own (not the blocking pool, whose threads are
        // reused): its lowered priority must end with it.
        let (done, result) = tokio::sync::oneshot::channel();
        let priority = cfg.priority;
        let spawned = std::thread::Builder::new()
            .name("mirrordb-backup".into())
            .spawn(move || {
                lower_priority(priority);
                let _ = done.send(this.write_set(number, &dest2, point, &cfg, &cancel2));
            });
        let written = match spawned {
            Ok(_) => match result.await {
                Ok(r) => r,
                Err(_) => Err(BackupError::Internal(
                    "the backup thread ended without a result".into(),
                )),
            },
            Err(e) => Err(BackupError::Internal(format!(
                "cannot start the backup thread: {e}"
            ))),
        };
        let (set_dir, archive, manifest) = written?;
        // Archived durably: the live segments ≤ S can go (the flush after
        // the barrier put the data file's checkpoint past S).
        match self.engine().drop_segments_upto(lsn) {
            Ok(dropped) => {
                for d in dropped {
                    tracing::debug!(segment = %d.display(), "archived segment dropped");
                }
            }
            Err(e) => inner.log.line(
                LineKind::Error,
                &format!("backup {number}: archived journal segments could not be removed: {e}"),
            ),
        }
        Ok(BackupOutcome {
            number,
            status: manifest.status,
            skipped: false,
            lsn: Some(lsn),
            set_dir: Some(set_dir),
            archive,
            duration_ms: 0,
            bytes_written: manifest.snapshot.bytes
                + manifest.archive.as_ref().map(|a| a.file.bytes).unwrap_or(0),
            records: manifest.records,
            error: manifest.error.clone(),
            deleted: Vec::new(),
            files: manifest
                .archive
                .iter()
                .map(|a| a.file.clone())
                .chain([manifest.snapshot.clone()])
                .collect(),
        })
    }

    /// The pace of the backup's compression: `backup.max_rate_while_writing`
    /// while the node's applied LSN moves, ending its waits once stopped.
    /// Its waits are added to `paced` (µs), which the progress shows.
    fn pace(&self, cfg: &BackupSection, cancel: &Arc<AtomicBool>, paced: &Arc<AtomicU64>) -> Pace {
        let applied = self.engine().applied_lsn_watch();
        Pace::new(
            cfg.max_rate_while_writing.0,
            Box::new(move || *applied.borrow()),
            Some(cancel.clone()),
        )
        .counting_into(paced.clone())
    }

    /// Blocking part of a backup. Everything goes to `.tmp-*` names first;
    /// on any error they are removed.
    fn write_set(
        &self,
        number: u32,
        dest: &Path,
        point: crate::engine::backup::BackupPoint,
        cfg: &BackupSection,
        cancel: &Arc<AtomicBool>,
    ) -> Result<(PathBuf, Option<PathBuf>, Manifest), BackupError> {
        let pid = std::process::id();
        let set_name = format::set_dir_name(&cfg.name, number);
        let tmp_dir = dest.join(format!("{TEMP_PREFIX}{set_name}-{pid}"));
        let archive_name = format::archive_name(&cfg.name, number - 1);
        let tmp_archive = dest.join(format!("{TEMP_PREFIX}{archive_name}-{pid}"));
        let cleanup = TempCleanup(vec![tmp_dir.clone(), tmp_archive.clone()]);
        let derr = |e: FormatError| dest_error(dest, e);
        let stopped = || cancel.load(Ordering::Acquire);
        let t_start = Utc::now();

        // 1. The snapshot, streamed while writes go on.
        self.update(|p| p.phase = "snapshot");
        fs::create_dir(&tmp_dir).map_err(|e| derr(io_at(&tmp_dir)(e)))?;
        let snap_path = tmp_dir.join(SNAPSHOT_FILE);
        let header = SnapshotHeader {
            db_id: point.db_id,
            lsn: point.lsn,
            epoch: point.epoch,
        };
        // The snapshot pins every page the load rewrites while it is open
        // (see the barrier's flush): while writes go on, chunks the
        // compressor has no room for wait in a spool rather than hold the
        // snapshot open (on an idle node, nothing is pinned and this
        // thread waits for the compressor).
        let applied = self.engine().applied_lsn_watch();
        let since = point.lsn;
        let spill: format::Spill = Box::new(move || *applied.borrow() > since);
        // µs compression waited for writers, snapshot and archive together.
        let paced = Arc::new(AtomicU64::new(0));
        let paced_ms = || paced.load(Ordering::Relaxed) / 1000;
        let mut w = SnapshotWriter::create_with(
            &snap_path,
            header,
            cfg.compression_level,
            Some(spill),
            self.pace(cfg, cancel, &paced),
        )
        .map_err(derr)?;
        let mut digest = Digest::default();
        let (mut tables, mut blobs) = (0u64, 0u64);
        let mut raw = 0u64;
        let mut last_update = Instant::now();
        let opened = Instant::now();
        let visit = point.snapshot.for_each(|item: SnapshotItem| {
            if stopped() {
                return Err(BackupError::Interrupted);
            }
            match &item {
                SnapshotItem::Table { .. } => tables += 1,
                SnapshotItem::BlobStart { .. } => blobs += 1,
                _ => {}
            }
            raw += item_bytes(&item);
            digest.add(&item);
            w.add(&item).map_err(derr)?;
            if last_update.elapsed() > Duration::from_millis(100) {
                last_update = Instant::now();
                let (items, written) = (w.items(), w.file_bytes());
                self.update(|p| {
                    p.items_done = items;
                    p.bytes_done = raw;
                    p.bytes_written = written;
                    p.paced_ms = paced_ms();
                });
            }
            Ok(())
        });
        match visit {
            Ok(()) => {}
            Err(crate::engine::backup::ExportError::Visit(e)) => return Err(e),
            Err(e) => return Err(BackupError::Snapshot(e.to_string())),
        }
        if stopped() {
            return Err(BackupError::Interrupted);
        }
        drop(point.snapshot);
        tracing::info!(
            number,
            seconds = opened.elapsed().as_secs_f64(),
            spooled_bytes = w.spooled_bytes(),
            compressed_by_reader = w.compressed_here(),
            "backup snapshot read and released"
        );
        self.update(|p| p.phase = "compressing");
        while !w.wait_compressed(Duration::from_millis(100)) {
            if stopped() {
                return Err(BackupError::Interrupted);
            }
            let written = w.file_bytes();
            self.update(|p| {
                p.bytes_written = written;
                p.paced_ms = paced_ms();
            });
        }
        let snap = w.finish().map_err(derr)?;
        self.update(|p| {
            p.items_done = snap.items;
            p.bytes_done = raw.max(p.bytes_total);
            p.bytes_written = snap.file_bytes;
        });

        // 2. The journal archive of the segments ≤ S.
        self.update(|p| p.phase = "archiving");
        let mut archive_entry = None;
        let mut archive_path = None;
        if !point.segments.is_empty() {
            let mut w = ArchiveWriter::create_paced(
                &tmp_archive,
                point.db_id,
                cfg.compression_level,
                self.pace(cfg, cancel, &paced),
            )
            .map_err(derr)?;
            for seg in &point.segments {
                if stopped() {
                    return Err(BackupError::Interrupted);
                }
                w.add_segment(seg, point.lsn).map_err(derr)?;
                self.update(|p| p.paced_ms = paced_ms());
            }
            let summary = w.finish().map_err(derr)?;
            let final_path = dest.join(&archive_name);
            fs::rename(&tmp_archive, &final_path).map_err(|e| derr(io_at(&final_path)(e)))?;
            format::sync_dir(dest).map_err(derr)?;
            archive_entry = Some(ArchiveEntry {
                number: number - 1,
                file: FileEntry {
                    path: archive_name.clone(),
                    bytes: summary.file_bytes,
                    checksum: summary.checksum.clone(),
                },
                summary,
            });
            archive_path = Some(final_path);
        }
        if paced_ms() > 0 {
            tracing::info!(
                number,
                seconds = paced_ms() as f64 / 1000.0,
                snapshot_seconds = snap.paced.as_secs_f64(),
                "backup compression waited for writers (backup.max_rate_while_writing)"
            );
        }

        self.update(|p| p.phase = "attached");

        // 3. Attached files: a missing one makes the backup partial.
        let mut attached = Vec::new();
        let mut errors = Vec::new();
        if !cfg.attached_files.is_empty() {
            let adir = tmp_dir.join(ATTACHED_DIR);
            fs::create_dir(&adir).map_err(|e| derr(io_at(&adir)(e)))?;
            for (i, src) in cfg.attached_files.iter().enumerate() {
                if stopped() {
                    return Err(BackupError::Interrupted);
                }
                let base = src
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "file".into());
                let rel = format!("{ATTACHED_DIR}/{i:03}-{base}");
                match copy_synced(src, &tmp_dir.join(&rel)) {
                    Ok(()) => {
                        let (bytes, sum) =
                            format::checksum_file(&tmp_dir.join(&rel), format::HashKind::Blake3)
                                .map_err(derr)?;
                        attached.push(AttachedEntry {
                            source: src.display().to_string(),
                            path: Some(rel),
                            bytes,
                            checksum: Some(sum),
                            error: None,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound || !is_dest_error(&e) => {
                        let msg = format!("attached file {}: {e}", src.display());
                        errors.push(msg.clone());
                        let _ = fs::remove_file(tmp_dir.join(&rel));
                        attached.push(AttachedEntry {
                            source: src.display().to_string(),
                            path: None,
                            bytes: 0,
                            checksum: None,
                            error: Some(msg),
                        });
                    }
                    Err(e) => return Err(derr(io_at(&tmp_dir)(e))),
                }
            }
            format::sync_dir(&adir).map_err(derr)?;
        }

        // 4. Manifest, then the rename that makes the set exist.
        self.update(|p| p.phase = "finishing");
        let t_end = Utc::now();
        let status = if errors.is_empty() {
            BackupStatus::Ok
        } else {
            BackupStatus::Partial
        };
        let manifest = Manifest {
            format: super::manifest::MANIFEST_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").into(),
            name: cfg.name.clone(),
            number,
            db_id: crate::journal::scan::db_id_string(&point.db_id),
            lsn: point.lsn,
            epoch: point.epoch,
            time_us: point.time_us,
            time: crate::activity::format_time_us(point.time_us),
            started: t_start.to_rfc3339_opts(SecondsFormat::Millis, true),
            finished: t_end.to_rfc3339_opts(SecondsFormat::Millis, true),
            duration_ms: (t_end - t_start).num_milliseconds().max(0) as u64,
            status,
            error: if errors.is_empty() {
                None
            } else {
                Some(errors.join("; "))
            },
            records: digest.records,
            tables,
            blobs,
            digest_records: digest.records,
            digest: digest.crc,
            snapshot: FileEntry {
                path: format!("{set_name}/{SNAPSHOT_FILE}"),
                bytes: snap.file_bytes,
                checksum: snap.checksum.clone(),
            },
            snapshot_items: snap.items,
            snapshot_raw_bytes: snap.raw_bytes,
            compression_level: cfg.compression_level,
            chunks: snap.chunks,
            archive: archive_entry,
            attached,
        };
        let mbytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| BackupError::Internal(e.to_string()))?;
        {
            use std::io::Write;
            let mp = tmp_dir.join(MANIFEST_FILE);
            let mut f = fs::File::create(&mp).map_err(|e| derr(io_at(&mp)(e)))?;
            f.write_all(&mbytes).map_err(|e| derr(io_at(&mp)(e)))?;
            f.sync_all().map_err(|e| derr(io_at(&mp)(e)))?;
        }
        format::sync_dir(&tmp_dir).map_err(derr)?;
        if stopped() {
            return Err(BackupError::Interrupted);
        }
        let final_dir = dest.join(&set_name);
        if final_dir.exists() {
            // Only an incomplete set can carry a number above the last
            // complete one; keep it aside rather than delete it.
            let aside = dest.join(format!("{set_name}.incomplete-{}", Utc::now().timestamp()));
            fs::rename(&final_dir, &aside).map_err(|e| derr(io_at(&final_dir)(e)))?;
        }
        fs::rename(&tmp_dir, &final_dir).map_err(|e| derr(io_at(&final_dir)(e)))?;
        format::sync_dir(dest).map_err(derr)?;
        std::mem::forget(cleanup);
        Ok((final_dir, archive_path, manifest))
    }

    /// Deletes sets beyond `keep_last` and the archives only they need.
    fn retention(&self, dest: &Path, history: &mut History) -> Result<Vec<PathBuf>, BackupError> {
        let cfg = &self.inner.cfg;
        let catalog = Catalog::scan(dest, &cfg.name).map_err(BackupError::Format)?;
        let numbers: Vec<u32> = catalog.sets.iter().map(|s| s.manifest.number).collect();
        let archives: Vec<u32> = catalog.archives.iter().map(|a| a.number).collect();
        let plan = plan_retention(&numbers, &archives, cfg.keep_last);
        let mut deleted = Vec::new();
        for n in &plan.delete_sets {
            if let Some(s) = catalog.set(*n) {
                fs::remove_dir_all(&s.dir).map_err(|e| BackupError::Format(io_at(&s.dir)(e)))?;
                deleted.push(s.dir.clone());
            }
        }
        for n in &plan.delete_archives {
            for a in catalog.archives.iter().filter(|a| a.number == *n) {
                fs::remove_file(&a.path).map_err(|e| BackupError::Format(io_at(&a.path)(e)))?;
                deleted.push(a.path.clone());
            }
        }
        if !deleted.is_empty() {
            format::sync_dir(dest).map_err(BackupError::Format)?;
        }
        if let Some(oldest) = plan.oldest_kept {
            history.entries.retain(|e| e.number >= oldest);
        }
        Ok(deleted)
    }

    async fn hook_start(&self, number: u32) -> Result<(), BackupError> {
        let cmd = self.inner.cfg.on_start.trim();
        if cmd.is_empty() {
            return Ok(());
        }
        let env = vec![
            ("MIRRORDB_BACKUP_NUMBER".to_string(), number.to_string()),
            (
                "MIRRORDB_BACKUP_DESTINATION".to_string(),
                self.inner.cfg.destination.display().to_string(),
            ),
            ("MIRRORDB_BACKUP_EVENT".to_string(), "start".to_string()),
        ];
        match run_hook(cmd, &env, self.inner.cfg.hook_timeout.0).await {
            Ok(()) => Ok(()),
            Err(e) => Err(BackupError::HookFailed(e)),
        }
    }

    async fn hook_finish(&self, number: u32, outcome: &Result<BackupOutcome, BackupError>) {
        let cmd = self.inner.cfg.on_finish.trim();
        if cmd.is_empty() {
            return;
        }
        let (status, error, lsn, set) = match outcome {
            Ok(o) => (
                if o.skipped {
                    "skipped"
                } else {
                    o.status.as_str()
                },
                o.error.clone().unwrap_or_default(),
                o.lsn.map(|l| l.to_string()).unwrap_or_default(),
                o.set_dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
            ),
            Err(e) => (
                if matches!(e, BackupError::Interrupted) {
                    "interrupted"
                } else {
                    "failed"
                },
                e.to_string(),
                String::new(),
                String::new(),
            ),
        };
        let env = vec![
            ("MIRRORDB_BACKUP_NUMBER".to_string(), number.to_string()),
            (
                "MIRRORDB_BACKUP_DESTINATION".to_string(),
                self.inner.cfg.destination.display().to_string(),
            ),
            ("MIRRORDB_BACKUP_EVENT".to_string(), "finish".to_string()),
            ("MIRRORDB_BACKUP_STATUS".to_string(), status.to_string()),
            ("MIRRORDB_BACKUP_ERROR".to_string(), error),
            ("MIRRORDB_BACKUP_LSN".to_string(), lsn),
            ("MIRRORDB_BACKUP_SET".to_string(), set),
        ];
        if let Err(e) = run_hook(cmd, &env, self.inner.cfg.hook_timeout.0).await {
            self.inner.log.line(
                LineKind::Error,
                &format!("backup {number}: on_finish hook failed: {e}"),
            );
        }
    }

    /// Starts the scheduler task when schedules are configured. It stops
    /// when the engine shuts down (its backups then fail) or the handle is
    /// aborted.
    pub fn spawn_scheduler(&self) -> Option<tokio::task::JoinHandle<()>> {
        let schedules = self.inner.cfg.schedules().ok()?;
        if schedules.is_empty() {
            return None;
        }
        tokio::runtime::Handle::try_current().ok()?;
        let sched = Scheduler::new(
            schedules,
            self.inner.cfg.retry_after.0,
            self.inner.cfg.max_attempts,
        );
        // The task holds the service weakly: it ends once the node drops it.
        let weak = Arc::downgrade(&self.inner);
        Some(tokio::spawn(async move {
            scheduler_loop(weak, sched).await;
        }))
    }
}

async fn scheduler_loop(weak: std::sync::Weak<Inner>, mut sched: Scheduler) {
    let upgrade = || weak.upgrade().map(|inner| BackupService { inner });
    let Some(this) = upgrade() else { return };
    {
        let inner = &*this.inner;
        let dest = inner.cfg.destination.clone();
        let history = History::read(&dest).unwrap_or_default();
        let last = history
            .entries
            .iter()
            .filter_map(|e| e.scheduled.as_deref())
            .filter_map(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
            .max();
        let missed = sched.start(Utc::now(), last, history.automatic_paused);
        if !missed.is_empty() {
            let mut h = history;
            for m in &missed {
                let when = m.scheduled.to_rfc3339_opts(SecondsFormat::Secs, true);
                inner.log.line(
                    LineKind::Error,
                    &format!("scheduled backup of {when} missed: the node was not running"),
                );
                metrics::counter!("mirrordb_backups_total", "status" => "missed").increment(1);
                h.push(HistoryEntry {
                    number: h.last_number() + 1,
                    started: when.clone(),
                    duration_ms: 0,
                    status: BackupStatus::Missed,
                    trigger: "scheduled".into(),
                    scheduled: Some(when),
                    lsn: None,
                    error: Some("missed: the node was not running at the scheduled time".into()),
                    files: vec![],
                });
            }
            if dest.is_dir()
                && let Err(e) = h.write(&dest)
            {
                tracing::warn!("cannot record missed backups: {e}");
            }
        }
    }
    drop(this);
    loop {
        let Some(this) = upgrade() else { return };
        let inner = &*this.inner;
        let dest = inner.cfg.destination.clone();
        {
            if sched.paused() && !this.automatic_paused() {
                sched.resume();
            }
            let now = Utc::now();
            if let Some(Action::Run { scheduled, attempt }) = sched.poll(now) {
                let trigger = Trigger::Scheduled {
                    scheduled: scheduled.to_rfc3339_opts(SecondsFormat::Secs, true),
                    attempt,
                };
                let r = this.run(trigger).await;
                let ok = match &r {
                    Ok(_) => true,
                    Err(BackupError::Busy(_)) => true,
                    Err(e) => {
                        tracing::warn!(attempt, "scheduled backup failed: {e}");
                        false
                    }
                };
                if matches!(r, Err(BackupError::Engine(WriteError::Closed))) {
                    return;
                }
                if sched.finished(Utc::now(), ok) {
                    *inner.paused.lock().unwrap_or_else(|p| p.into_inner()) = true;
                    let mut h = History::read(&dest).unwrap_or_default();
                    h.automatic_paused = true;
                    let _ = h.write(&dest);
                    inner.log.line(
                        LineKind::Error,
                        &format!(
                            "automatic backups paused after {} failed attempts; run a manual backup to resume them",
                            inner.cfg.max_attempts
                        ),
                    );
                }
                continue;
            }
            let wait = sched
                .next_wakeup()
                .map(|t| (t - now).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(SCHEDULER_MAX_SLEEP)
                .min(SCHEDULER_MAX_SLEEP);
            let notify = inner.resume.clone();
            drop(this);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = notify.notified() => {}
            }
        }
    }
}

/// Removes temporary files of a backup that did not finish.
struct TempCleanup(Vec<PathBuf>);

impl Drop for TempCleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            if p.is_dir() {
                let _ = fs::remove_dir_all(p);
            } else {
                let _ = fs::remove_file(p);
            }
        }
        if let Some(parent) = self.0.first().and_then(|p| p.parent()) {
            let _ = format::sync_dir(parent);
        }
    }
}

/// Lowers the calling thread's scheduling priority (`backup.priority`;
/// Linux: a thread's policy and nice value are its own, and threads it
/// starts, the compressor among them, inherit them). Best effort: a
/// failure is logged.
fn lower_priority(priority: BackupPriority) {
    #[cfg(target_os = "linux")]
    match priority {
        BackupPriority::Idle => {
            use thread_priority::{
                NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
                set_thread_priority_and_policy, thread_native_id,
            };
            if let Err(e) = set_thread_priority_and_policy(
                thread_native_id(),
                ThreadPriority::Min,
                ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
            ) {
                tracing::warn!(error = %e, "cannot run the backup thread at SCHED_IDLE");
            }
        }
        BackupPriority::Nice(n) if n > 0 => {
            let tid = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(tid), n) {
                tracing::warn!(nice = n, error = %e, "cannot lower the backup thread's priority");
            }
        }
        BackupPriority::Nice(_) => {}
    }
    #[cfg(not(target_os = "linux"))]
    let _ = priority;
}

fn is_dest_error(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.raw_os_error() == Some(28)
        || e.raw_os_error() == Some(30)
        || e.kind() == io::ErrorKind::ReadOnlyFilesystem
}

/// Copies a file and fsyncs the copy. A failure to read the source is an
/// error of kind other than a destination error.
fn copy_synced(src: &Path, dst: &Path) -> io::Result<()> {
    let mut from = fs::File::open(src)?;
    if from.metadata()?.is_dir() {
        return Err(io::Error::other("is a directory, not a file"));
    }
    let mut to = fs::File::create(dst)?;
    io::copy(&mut from, &mut to)?;
    to.sync_all()
}

/// Approximate uncompressed size of an item (progress only).
fn item_bytes(item: &SnapshotItem) -> u64 {
    match item {
        SnapshotItem::Table { name, .. } => name.len() as u64,
        SnapshotItem::Record {
            table, key, value, ..
        } => (table.len() + key.len() + value.len() + 8) as u64,
        SnapshotItem::BlobStart { table, key, .. } => (table.len() + key.len() + 16) as u64,
        SnapshotItem::BlobChunk { bytes } => bytes.len() as u64,
        SnapshotItem::BlobEnd => 0,
    }
}

/// The content digest of a snapshot, computed while it streams. It follows
/// `ReadView::digest` of the data file (records in key order: table, 0,
/// key, 0, version LE, value; then BLOBs: table, key, size LE, chunks), so a
/// restored data file's `Engine::digest` must equal it.
#[derive(Default, Debug, Clone, Copy)]
pub struct Digest {
    pub records: u64,
    pub crc: u32,
}

impl Digest {
    pub fn add(&mut self, item: &SnapshotItem) {
        let c = &mut self.crc;
        match item {
            SnapshotItem::Table { .. } | SnapshotItem::BlobEnd => {}
            SnapshotItem::Record {
                table,
                key,
                version,
                value,
            } => {
                *c = crc32c::crc32c_append(*c, table.as_bytes());
                *c = crc32c::crc32c_append(*c, &[0]);
                *c = crc32c::crc32c_append(*c, key.as_bytes());
                *c = crc32c::crc32c_append(*c, &[0]);
                *c = crc32c::crc32c_append(*c, &version.to_le_bytes());
                *c = crc32c::crc32c_append(*c, value);
                self.records += 1;
            }
            SnapshotItem::BlobStart {
                table, key, size, ..
            } => {
                *c = crc32c::crc32c_append(*c, table.as_bytes());
                *c = crc32c::crc32c_append(*c, key.as_bytes());
                *c = crc32c::crc32c_append(*c, &size.to_le_bytes());
            }
            SnapshotItem::BlobChunk { bytes } => {
                *c = crc32c::crc32c_append(*c, bytes);
            }
        }
    }
}

/// Runs a hook with `sh -c`, the given environment and a time limit.
async fn run_hook(cmd: &str, env: &[(String, String)], timeout: Duration) -> Result<(), String> {
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c.spawn().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "{cmd:?} did not finish within {} s and was killed",
            timeout.as_secs()
        )),
        Ok(Err(e)) => Err(format!("{cmd:?}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
            if text.trim().is_empty() {
                text = String::from_utf8_lossy(&out.stdout).into_owned();
            }
            text.truncate(HOOK_OUTPUT_BYTES);
            Err(format!(
                "{cmd:?} exited with {}: {}",
                out.status,
                text.trim()
            ))
        }
    }
}

/// What retention deletes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    pub delete_sets: Vec<u32>,
    pub delete_archives: Vec<u32>,
    pub oldest_kept: Option<u32>,
}

/// Keeps the newest `keep_last` sets (by recorded number; 0 keeps all) and
/// every archive a kept set needs to roll forward: archive M holds the
/// journal from set M's S onward, so archives numbered ≥ the oldest kept set
/// stay. Nothing is deleted when there are no more than `keep_last` sets.
pub fn plan_retention(sets: &[u32], archives: &[u32], keep_last: u32) -> RetentionPlan {
    let mut sorted = sets.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if keep_last == 0 || sorted.is_empty() {
        return RetentionPlan {
            oldest_kept: sorted.first().copied(),
            ..Default::default()
        };
    }
    if sorted.len() <= keep_last as usize {
        // Nothing to delete: archive [0000] then still holds the history
        // from LSN 1, for a point-in-time restore before the first set.
        return RetentionPlan {
            oldest_kept: sorted.first().copied(),
            ..Default::default()
        };
    }
    let keep = keep_last as usize;
    let kept = &sorted[sorted.len() - keep..];
    let oldest = kept[0];
    RetentionPlan {
        delete_sets: sorted[..sorted.len() - keep].to_vec(),
        delete_archives: archives.iter().copied().filter(|a| *a < oldest).collect(),
        oldest_kept: Some(oldest),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_last_success_comes_from_the_newest_ok_entry() {
        let entry = |number, status, started: &str, duration_ms, bytes: &[u64]| HistoryEntry {
            number,
            started: started.into(),
            duration_ms,
            status,
            trigger: "api".into(),
            scheduled: None,
            lsn: Some(1),
            error: None,
            files: bytes
                .iter()
                .map(|&b| FileEntry {
                    path: "f".into(),
                    bytes: b,
                    checksum: format::Checksum::Blake3("00".into()),
                })
                .collect(),
        };
        let mut h = History::default();
        assert_eq!(LastOk::from_history(&h), None);
        h.entries = vec![
            entry(
                3,
                BackupStatus::Ok,
                "2026-12-07T10:00:00.000Z",
                2_500,
                &[100, 20],
            ),
            entry(4, BackupStatus::Failed, "2026-12-07T11:00:00Z", 10, &[]),
            entry(2, BackupStatus::Ok, "2026-12-07T09:00:00Z", 1_000, &[7]),
            entry(
                5,
                BackupStatus::Partial,
                "2026-12-07T12:00:00Z",
                1_000,
                &[9],
            ),
        ];
        let l = LastOk::from_history(&h).unwrap();
        // 2026-12-07T10:00:00Z is 1796637600 s after the epoch.
        assert_eq!(l.ended_unix_s, 1_796_637_600.0 + 2.5);
        assert_eq!((l.duration_s, l.bytes), (2.5, 120));
        h.entries[0].started = "yesterday".into();
        assert_eq!(
            LastOk::from_history(&h),
            None,
            "an unreadable time is no time"
        );
    }

    #[test]
    fn a_backup_notes_only_a_real_growth_of_the_data_file() {
        let mib = |n: u64| n << 20;
        assert_eq!(growth_line(1, mib(1088), mib(1088)), None);
        assert_eq!(growth_line(1, mib(1088), mib(1000)), None, "shrunk");
        assert_eq!(growth_line(1, mib(1088), mib(1140)), None, "under 64 MiB");
        assert_eq!(
            growth_line(1, mib(8192), mib(8192 + 500)),
            None,
            "under a tenth"
        );
        assert_eq!(growth_line(1, 0, mib(512)), None, "no file before");
        let line = growth_line(7, mib(1088), mib(4096)).expect("noted");
        assert!(
            line.starts_with("backup 7: the data file grew from 1.1 GiB to 4.0 GiB"),
            "{line}"
        );
        assert!(line.contains("mirrordb compact"), "{line}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_backup_thread_runs_at_the_configured_priority_and_others_do_not() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let (inside, other) = std::thread::spawn(move || {
            lower_priority(BackupPriority::Nice(before + 5));
            let inside =
                rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
            let other = std::thread::spawn(|| {
                rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
            })
            .join()
            .unwrap();
            (inside, other)
        })
        .join()
        .unwrap();
        assert_eq!(inside, before + 5, "the backup thread is lowered");
        // Threads it starts (the compressor) inherit it; the rest of the
        // process keeps its priority.
        assert_eq!(other, before + 5);
        let here = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        assert_eq!(here, before);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_idle_backup_thread_and_its_compressor_run_at_sched_idle_and_others_do_not() {
        use thread_priority::{NormalThreadSchedulePolicy, ThreadSchedulePolicy};
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        let before = thread_priority::thread_schedule_policy().unwrap();
        assert_ne!(before, idle, "the test runs at an ordinary policy");
        let (inside, child) = std::thread::spawn(move || {
            lower_priority(BackupPriority::Idle);
            let inside = thread_priority::thread_schedule_policy().unwrap();
            let child = std::thread::spawn(|| thread_priority::thread_schedule_policy().unwrap())
                .join()
                .unwrap();
            (inside, child)
        })
        .join()
        .unwrap();
        assert_eq!(inside, idle, "the backup thread runs at SCHED_IDLE");
        assert_eq!(child, idle, "threads it starts inherit it");
        assert_eq!(thread_priority::thread_schedule_policy().unwrap(), before);
    }

    #[test]
    fn retention_keeps_last_sets_and_their_archives() {
        // Fewer sets than keep_last: nothing goes.
        assert_eq!(
            plan_retention(&[1, 2], &[0, 1], 3),
            RetentionPlan {
                delete_sets: vec![],
                delete_archives: vec![],
                oldest_kept: Some(1)
            }
        );
        let p = plan_retention(&[1, 2, 3, 4, 5], &[0, 1, 2, 3, 4], 3);
        assert_eq!(p.delete_sets, [1, 2]);
        assert_eq!(p.delete_archives, [0, 1, 2]);
        // A set removed by hand (3): the newest three are 4, 5, 6; every
        // archive from 4 on stays, older ones only served deleted sets.
        let p = plan_retention(&[1, 2, 4, 5, 6], &[0, 1, 2, 3, 4, 5], 3);
        assert_eq!(p.delete_sets, [1, 2]);
        assert_eq!(p.delete_archives, [0, 1, 2, 3]);
        assert_eq!(
            plan_retention(&[], &[0], 3).delete_archives,
            Vec::<u32>::new()
        );
        assert!(
            plan_retention(&[1, 2, 3], &[0, 1, 2], 0)
                .delete_sets
                .is_empty()
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
