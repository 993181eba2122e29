//! Activity analysis over the journal archives *and* the live journal
//! (DESIGN §6): who did what, when, even after backups moved the entries
//! out of `data/journal/`.
//!
//! ```text
//! archives overlapping [from, to] ──decompress──► segment files in a scratch dir
//! live segments ───────────────────hard link (or copy)──► the same dir
//!        ──► crate::activity::query (the one filter and rendering) ──► entries
//! ```
//!
//! The scratch directory is removed when the view is dropped. A live
//! segment wins over an archived copy of the same segment.

use super::format::{self, ArchiveFileReader, FormatError};
use super::manifest::Catalog;
use super::restore::{RestoreError, detect_name};
use crate::activity::{ActivityError, Filter, QueryOutcome};
use crate::journal::scan::{self, segment_name};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why the combined view could not be built or read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ViewError {
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Activity(#[from] ActivityError),
}

/// A directory of segment files covering archives and the live journal.
#[derive(Debug)]
pub struct JournalView {
    dir: PathBuf,
}

impl Drop for JournalView {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl JournalView {
    /// Builds the view in a new directory under `scratch_parent`: archives
    /// of `backup_dir` (if any) that may hold LSNs in `[from, to]`, then the
    /// live segments of `journal_dir`.
    pub fn build(
        backup_dir: Option<&Path>,
        journal_dir: &Path,
        from: u64,
        to: u64,
        scratch_parent: &Path,
    ) -> Result<JournalView, ViewError> {
        let dir = scratch_parent.join(format!("journal-view-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&dir).map_err(format::io_at(&dir))?;
        let view = JournalView { dir };
        // Live segments first: they are the truth for what they hold.
        let (live, _) = scan::list_segments(journal_dir).map_err(RestoreError::from)?;
        for s in &live {
            let name = segment_name(s.header.first_lsn);
            let to_path = view.dir.join(&name);
            if fs::hard_link(&s.path, &to_path).is_err() {
                fs::copy(&s.path, &to_path).map_err(format::io_at(&to_path))?;
            }
        }
        if let Some(bd) = backup_dir.filter(|d| d.is_dir())
            && let Ok(name) = detect_name(bd)
        {
            let c = Catalog::scan(bd, &name)?;
            for a in &c.archives {
                // An archive ends where the next one (or the live journal) starts.
                let first = a.recorded.as_ref().map(|r| r.summary.first_lsn);
                let last = a.recorded.as_ref().map(|r| r.summary.last_lsn);
                if last.is_some_and(|l| l < from) || first.is_some_and(|f| f > to) {
                    continue;
                }
                view.extract(&a.path)?;
            }
        }
        Ok(view)
    }

    /// The directory (segment files named by first LSN).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes the segments of one archive as files, skipping any that exist.
    fn extract(&self, archive: &Path) -> Result<(), ViewError> {
        let finish = |w: Option<(BufWriter<File>, PathBuf)>| -> Result<(), ViewError> {
            if let Some((mut w, p)) = w {
                w.flush().map_err(format::io_at(&p))?;
            }
            Ok(())
        };
        let mut segment: Option<u64> = None;
        let mut out: Option<(BufWriter<File>, PathBuf)> = None;
        for item in ArchiveFileReader::open_file(archive)? {
            let (h, f) = item?;
            if segment != Some(h.first_lsn) {
                finish(out.take())?;
                segment = Some(h.first_lsn);
                let p = self.dir.join(segment_name(h.first_lsn));
                // An existing (live) copy of the segment wins.
                if !p.exists() {
                    let mut w = BufWriter::new(File::create(&p).map_err(format::io_at(&p))?);
                    w.write_all(&h.encode()).map_err(format::io_at(&p))?;
                    out = Some((w, p));
                }
            }
            if let Some((w, p)) = out.as_mut() {
                w.write_all(&f.bytes).map_err(format::io_at(p))?;
            }
        }
        finish(out)
    }
}

/// Activity over the archives of `backup_dir` and the live `journal_dir`,
/// with the same filter and limit as [`crate::activity::query`].
pub fn query(
    backup_dir: Option<&Path>,
    journal_dir: &Path,
    filter: &Filter,
    limit: usize,
    scratch_parent: &Path,
) -> Result<QueryOutcome, ViewError> {
    let view = JournalView::build(
        backup_dir,
        journal_dir,
        filter.from_lsn.unwrap_or(0),
        filter.to_lsn.unwrap_or(u64::MAX),
        scratch_parent,
    )?;
    Ok(crate::activity::query(view.path(), filter, limit)?)
}
