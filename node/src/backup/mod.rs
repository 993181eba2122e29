//! The backup-and-journal pipeline (DESIGN §5–§6): numbered full backup
//! sets taken without freezing writers, journal archives, retention, the
//! scheduler, hooks, the history and the Backup Journal, restore and
//! point-in-time recovery, and verification.
//!
//! ```text
//! BackupService::run ─► Engine::backup_barrier (S) ─► archive segments ≤ S (format.rs)
//!        │                                      └──► stream snapshot ≤ S (format.rs)
//!        └─► manifest.json, backupHistory.json (manifest.rs), Backup Journal (log.rs),
//!            retention (run.rs), hooks; scheduler (schedule.rs) drives it
//! restore::restore_into ─► DataFileBuilder ◄─ set + archives + live journal
//! verify::verify ─► every checksum, LSN continuity, optional scratch restore
//! ```
//!
//! The byte formats are written down in `docs/backup-format.md`; the
//! operator's guide is `docs/backups.md`.

pub mod activity;
pub mod cli;
pub mod format;
pub mod log;
pub mod manifest;
pub mod pace;
pub mod restore;
pub mod run;
pub mod schedule;
pub mod settings;
pub mod verify;

pub use crate::engine::store::SnapshotItem;
pub use manifest::{BackupStatus, Catalog, History, Manifest};
pub use restore::{
    DEFAULT_RESTORE_CACHE_BYTES, ForkPolicy, RestoreError, RestoreOptions, RestorePlan,
    RestoreProgress, RestoreReport, RestoreTarget, Until, plan, restore_into, restore_into_with,
};
pub use run::{BackupError, BackupOutcome, BackupService, Progress, Trigger};
pub use settings::BackupSection;
