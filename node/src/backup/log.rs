//! The Backup Journal: `data/logs/Backup Journal[001].txt`, one readable
//! line per backup, restore, integration and verify (4D's backup journal).
//!
//! ```text
//! 2026-11-25T02:30:00Z backup 12 started (scheduled)
//! 2026-11-25T02:30:04Z backup 12 ok: LSN 88123, 1.2 GiB -> 310 MiB in 4.1 s, /backups/mirrordb[0012].backup
//! ```
//!
//! With `verbose = false` only start lines and errors are written. A file
//! past [`ROTATE_BYTES`] is closed and the next number opened; after
//! [`MAX_FILES`] the numbering wraps to 001 (the oldest file is replaced).
//! Writing the log never fails the operation it describes: errors are
//! traced and dropped.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A log file is rotated past this size.
pub const ROTATE_BYTES: u64 = 10 * 1000 * 1000;
/// Highest file number before wrapping to 1.
pub const MAX_FILES: u32 = 999;

/// Whether a line is a start line, an error, or detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    Start,
    Error,
    Info,
}

/// The log of one data directory.
#[derive(Debug)]
pub struct BackupLog {
    dir: PathBuf,
    verbose: bool,
    lock: Mutex<()>,
}

/// The file name of log number `n`.
pub fn file_name(n: u32) -> String {
    format!("Backup Journal[{n:03}].txt")
}

fn parse_number(name: &str) -> Option<u32> {
    let d = name
        .strip_prefix("Backup Journal[")?
        .strip_suffix("].txt")?;
    if d.len() != 3 {
        return None;
    }
    d.parse().ok().filter(|n| (1..=MAX_FILES).contains(n))
}

impl BackupLog {
    /// The log in `logs_dir` (normally `data/logs`).
    pub fn new(logs_dir: &Path, verbose: bool) -> BackupLog {
        BackupLog {
            dir: logs_dir.to_owned(),
            verbose,
            lock: Mutex::new(()),
        }
    }

    /// The file currently written: the most recently modified one.
    pub fn current(&self) -> (u32, PathBuf) {
        // Ties of modification time (coarse clocks) go to a file with room
        // left, so a wrapped 001 is never mistaken for finished.
        let mut best: Option<(std::time::SystemTime, bool, u32)> = None;
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let Some(n) = parse_number(&e.file_name().to_string_lossy()) else {
                    continue;
                };
                let meta = e.metadata().ok();
                let m = meta
                    .as_ref()
                    .and_then(|m| m.modified().ok())
                    .unwrap_or(std::time::UNIX_EPOCH);
                let room = meta.is_some_and(|m| m.len() < ROTATE_BYTES / 2);
                let key = (m, room, n);
                if best.is_none_or(|b| key > b) {
                    best = Some(key);
                }
            }
        }
        let n = best.map(|b| b.2).unwrap_or(1);
        (n, self.dir.join(file_name(n)))
    }

    /// Appends one line (with the current UTC time in front).
    pub fn line(&self, kind: LineKind, text: &str) {
        if !self.verbose && kind == LineKind::Info {
            return;
        }
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let one_line: String = text
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
            .collect();
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = self.append(&format!("{now} {one_line}\n")) {
            tracing::warn!(dir = %self.dir.display(), "cannot write the Backup Journal: {e}");
        }
    }

    fn append(&self, line: &str) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let (mut n, mut path) = self.current();
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len + line.len() as u64 > ROTATE_BYTES && len > 0 {
            n = if n >= MAX_FILES { 1 } else { n + 1 };
            path = self.dir.join(file_name(n));
            // Wrapping replaces the oldest file.
            let _ = fs::remove_file(&path);
        }
        let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
        f.write_all(line.as_bytes())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn terse_log_keeps_starts_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let log = BackupLog::new(dir.path(), false);
        log.line(LineKind::Start, "backup 1 started");
        log.line(LineKind::Info, "backup 1 ok");
        log.line(LineKind::Error, "backup 2 failed:\nno space");
        let text = std::fs::read_to_string(dir.path().join(file_name(1))).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("backup 2 failed: no space"));
    }

    #[test]
    fn rotates_and_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let log = BackupLog::new(dir.path(), true);
        // A nearly full file 999 rotates to 001.
        let big = vec![b'x'; (ROTATE_BYTES - 10) as usize];
        std::fs::write(dir.path().join(file_name(999)), &big).unwrap();
        log.line(LineKind::Info, "this line does not fit");
        assert_eq!(log.current().0, 1);
        assert!(
            std::fs::read_to_string(dir.path().join(file_name(1)))
                .unwrap()
                .contains("does not fit")
        );
        log.line(LineKind::Info, "next");
        assert_eq!(log.current().0, 1);
    }
}
