//! The manifest of a backup set (`manifest.json`), the history file of a
//! destination (`backupHistory.json`), and the catalog: what a destination
//! holds, found by reading manifests (numbers come from what is recorded,
//! never from file names alone).
//!
//! ```text
//! destination/
//!   backupHistory.json           one entry per retained set and recent failures
//!   ‹name›[0003].backup/         manifest.json, snapshot.zst, attached/…
//!   ‹name›[0002].journal         journal S2+1 ..= S3, written by backup 3
//!   .tmp-…                       being written; removed by the next backup
//! ```

use super::format::{
    self, ARCHIVE_SUFFIX, ArchiveSummary, Checksum, ChunkInfo, FormatError, MANIFEST_FILE,
    SET_SUFFIX, io_at,
};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Version of `manifest.json`.
pub const MANIFEST_VERSION: u32 = 1;
/// File name of the history in the destination.
pub const HISTORY_FILE: &str = "backupHistory.json";
/// Most entries the history keeps.
pub const MAX_HISTORY_ENTRIES: usize = 200;
/// Largest manifest or history file read (a bound on memory).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// How a backup ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupStatus {
    /// Complete: snapshot, archive and every attached file.
    Ok,
    /// Snapshot and archive complete, but an attached file was missing or
    /// unreadable (4D's behaviour): restorable, with an error to look at.
    Partial,
    Failed,
    Interrupted,
    /// A scheduled time passed while the node was down.
    Missed,
}

impl BackupStatus {
    /// Whether the set holds a restorable snapshot.
    pub fn is_complete(self) -> bool {
        matches!(self, BackupStatus::Ok | BackupStatus::Partial)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackupStatus::Ok => "ok",
            BackupStatus::Partial => "partial",
            BackupStatus::Failed => "failed",
            BackupStatus::Interrupted => "interrupted",
            BackupStatus::Missed => "missed",
        }
    }
}

/// A file of a set or an archive, with its checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the destination.
    pub path: String,
    pub bytes: u64,
    #[serde(flatten)]
    pub checksum: Checksum,
}

/// An attached file copied into the set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedEntry {
    /// Where it was copied from.
    pub source: String,
    /// Relative to the set directory; `None` when it could not be copied.
    pub path: Option<String>,
    pub bytes: u64,
    /// `None` when it could not be copied.
    #[serde(flatten)]
    pub checksum: Option<Checksum>,
    pub error: Option<String>,
}

/// The journal archive written with a set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveEntry {
    /// MMMM: the previous backup's number.
    pub number: u32,
    pub file: FileEntry,
    #[serde(flatten)]
    pub summary: ArchiveSummary,
}

/// `manifest.json`: everything needed to check and restore a set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub tool_version: String,
    pub name: String,
    pub number: u32,
    pub db_id: String,
    /// S: the snapshot holds exactly the operations with LSN ≤ S.
    pub lsn: u64,
    pub epoch: u64,
    /// Time of the barrier, µs since the Unix epoch, and as RFC 3339.
    pub time_us: u64,
    pub time: String,
    pub started: String,
    pub finished: String,
    pub duration_ms: u64,
    pub status: BackupStatus,
    pub error: Option<String>,
    pub records: u64,
    pub tables: u64,
    pub blobs: u64,
    /// Record count and content digest of the snapshot (as `Engine::digest`).
    pub digest_records: u64,
    pub digest: u32,
    pub snapshot: FileEntry,
    pub snapshot_items: u64,
    pub snapshot_raw_bytes: u64,
    pub compression_level: i32,
    pub chunks: Vec<ChunkInfo>,
    pub archive: Option<ArchiveEntry>,
    pub attached: Vec<AttachedEntry>,
}

impl Manifest {
    /// Reads and parses a set's manifest.
    pub fn read(set_dir: &Path) -> Result<Manifest, FormatError> {
        let p = set_dir.join(MANIFEST_FILE);
        let bytes = read_bounded(&p)?;
        serde_json::from_slice(&bytes).map_err(|e| FormatError::Damaged {
            what: p.display().to_string(),
            offset: e.column() as u64,
            reason: format!("manifest does not parse: {e}"),
        })
    }

    /// The database id as bytes.
    pub fn db_id_bytes(&self) -> Option<[u8; 16]> {
        uuid::Uuid::parse_str(&self.db_id)
            .ok()
            .map(|u| *u.as_bytes())
    }
}

fn read_bounded(p: &Path) -> Result<Vec<u8>, FormatError> {
    let len = fs::metadata(p).map_err(io_at(p))?.len();
    if len > MAX_JSON_BYTES {
        return Err(FormatError::Damaged {
            what: p.display().to_string(),
            offset: 0,
            reason: format!("{len} bytes is larger than any file we write"),
        });
    }
    fs::read(p).map_err(io_at(p))
}

/// One line of `backupHistory.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub number: u32,
    pub started: String,
    pub duration_ms: u64,
    pub status: BackupStatus,
    /// `cli`, `api`, `scheduled`, `missed`, …
    pub trigger: String,
    /// For scheduled and missed runs: the due time (RFC 3339).
    #[serde(default)]
    pub scheduled: Option<String>,
    pub lsn: Option<u64>,
    pub error: Option<String>,
    pub files: Vec<FileEntry>,
}

/// `backupHistory.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub db_id: Option<String>,
    /// Automatic backups are paused after the last retry failed, until a
    /// manual backup succeeds (4D 1401).
    #[serde(default)]
    pub automatic_paused: bool,
    /// When a backup skipped by `only_if_changed` last found no data
    /// changed since the newest set (RFC 3339): the backups held every write
    /// then. A skip is no entry (the entries are the retained sets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_skipped: Option<String>,
    pub entries: Vec<HistoryEntry>,
}

impl History {
    /// Reads the destination's history; a missing file is an empty history.
    pub fn read(dest: &Path) -> Result<History, FormatError> {
        let p = dest.join(HISTORY_FILE);
        match fs::metadata(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(History::default()),
            Err(e) => return Err(io_at(&p)(e)),
            Ok(_) => {}
        }
        let bytes = read_bounded(&p)?;
        serde_json::from_slice(&bytes).map_err(|e| FormatError::Damaged {
            what: p.display().to_string(),
            offset: e.column() as u64,
            reason: format!("history does not parse: {e}"),
        })
    }

    /// Writes it atomically.
    pub fn write(&self, dest: &Path) -> Result<(), FormatError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| FormatError::Damaged {
            what: HISTORY_FILE.into(),
            offset: 0,
            reason: e.to_string(),
        })?;
        format::write_atomic(&dest.join(HISTORY_FILE), &bytes)
    }

    /// Adds an entry (replacing a failed or interrupted attempt of the same
    /// number; missed runs stay on record).
    pub fn push(&mut self, e: HistoryEntry) {
        self.entries.retain(|o| {
            o.number != e.number
                || !matches!(o.status, BackupStatus::Failed | BackupStatus::Interrupted)
        });
        self.entries.push(e);
        if self.entries.len() > MAX_HISTORY_ENTRIES {
            let cut = self.entries.len() - MAX_HISTORY_ENTRIES;
            self.entries.drain(..cut);
        }
    }

    /// Highest number of a complete backup recorded.
    pub fn last_number(&self) -> u32 {
        self.entries
            .iter()
            .filter(|e| e.status.is_complete())
            .map(|e| e.number)
            .max()
            .unwrap_or(0)
    }
}

/// A complete set found in the destination.
#[derive(Clone, Debug, PartialEq)]
pub struct SetInfo {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// A journal archive found in the destination.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchiveInfo {
    pub path: PathBuf,
    pub number: u32,
    /// From the manifest of the set that wrote it, when that set is still there.
    pub recorded: Option<ArchiveEntry>,
}

/// What a destination holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    /// Complete sets (a parsable manifest with status ok or partial), by number.
    pub sets: Vec<SetInfo>,
    /// Archives, by number.
    pub archives: Vec<ArchiveInfo>,
    /// Directories that look like sets but have no readable manifest.
    pub incomplete: Vec<(PathBuf, String)>,
    /// Leftovers of interrupted writes.
    pub temp: Vec<PathBuf>,
}

impl Catalog {
    /// Scans `dest` for sets and archives named `name`.
    pub fn scan(dest: &Path, name: &str) -> Result<Catalog, FormatError> {
        let mut c = Catalog::default();
        let rd = fs::read_dir(dest).map_err(io_at(dest))?;
        for ent in rd {
            let ent = ent.map_err(io_at(dest))?;
            let file = ent.file_name().to_string_lossy().into_owned();
            let path = ent.path();
            if file.starts_with(format::TEMP_PREFIX) {
                c.temp.push(path);
            } else if format::parse_numbered(&file, name, SET_SUFFIX).is_some() {
                match Manifest::read(&path) {
                    Ok(m) if m.status.is_complete() => c.sets.push(SetInfo {
                        dir: path,
                        manifest: m,
                    }),
                    Ok(m) => c
                        .incomplete
                        .push((path, format!("status {}", m.status.as_str()))),
                    Err(e) => c.incomplete.push((path, e.to_string())),
                }
            } else if let Some(n) = format::parse_numbered(&file, name, ARCHIVE_SUFFIX) {
                c.archives.push(ArchiveInfo {
                    path,
                    number: n,
                    recorded: None,
                });
            }
        }
        c.sets.sort_by_key(|s| s.manifest.number);
        c.archives.sort_by_key(|a| a.number);
        for a in &mut c.archives {
            a.recorded = c
                .sets
                .iter()
                .filter_map(|s| s.manifest.archive.as_ref())
                .find(|e| e.number == a.number)
                .cloned();
        }
        Ok(c)
    }

    /// The set with this recorded number.
    pub fn set(&self, number: u32) -> Option<&SetInfo> {
        self.sets.iter().find(|s| s.manifest.number == number)
    }

    /// The highest recorded number among complete sets.
    pub fn last_number(&self) -> u32 {
        self.sets
            .iter()
            .map(|s| s.manifest.number)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(number: u32, status: BackupStatus) -> HistoryEntry {
        HistoryEntry {
            number,
            started: "t".into(),
            duration_ms: 1,
            status,
            trigger: "manual".into(),
            scheduled: None,
            lsn: Some(1),
            error: None,
            files: vec![],
        }
    }

    #[test]
    fn checksums_are_named_by_algorithm_and_a_missing_one_is_absent() {
        let copied = AttachedEntry {
            source: "/etc/app.toml".into(),
            path: Some("attached/000-app.toml".into()),
            bytes: 6,
            checksum: Some(Checksum::Blake3("ab".into())),
            error: None,
        };
        let missing = AttachedEntry {
            source: "/etc/missing.key".into(),
            path: None,
            bytes: 0,
            checksum: None,
            error: Some("not found".into()),
        };
        for a in [copied, missing] {
            let json = serde_json::to_value(&a).unwrap();
            assert_eq!(json.get("blake3").is_some(), a.checksum.is_some(), "{json}");
            assert!(json.get("sha256").is_none());
            assert_eq!(serde_json::from_value::<AttachedEntry>(json).unwrap(), a);
        }
        // As sets written before BLAKE3 recorded them.
        let old = serde_json::json!({"path": "p", "bytes": 1, "sha256": "cd"});
        let f: FileEntry = serde_json::from_value(old).unwrap();
        assert_eq!(f.checksum, Checksum::Sha256("cd".into()));
        // A file entry must name its checksum.
        let none = serde_json::json!({"path": "p", "bytes": 1});
        assert!(serde_json::from_value::<FileEntry>(none).is_err());
    }

    #[test]
    fn history_round_trips_and_numbers_by_complete_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::read(dir.path()).unwrap();
        assert_eq!(h.last_number(), 0);
        h.push(entry(1, BackupStatus::Ok));
        h.push(entry(2, BackupStatus::Failed));
        assert_eq!(h.last_number(), 1);
        h.push(entry(2, BackupStatus::Ok));
        assert_eq!(h.entries.len(), 2, "the failed attempt is replaced");
        h.write(dir.path()).unwrap();
        assert_eq!(History::read(dir.path()).unwrap(), h);
        std::fs::write(dir.path().join(HISTORY_FILE), b"{not json").unwrap();
        assert!(History::read(dir.path()).is_err());
    }

    #[test]
    fn catalog_ignores_damaged_sets_and_orders_by_number() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("db[0002].backup")).unwrap();
        std::fs::write(dir.path().join("db[0002].backup/manifest.json"), b"[").unwrap();
        std::fs::write(dir.path().join("db[0001].journal"), b"").unwrap();
        std::fs::write(dir.path().join("db[0000].journal"), b"").unwrap();
        std::fs::write(dir.path().join(".tmp-x"), b"").unwrap();
        std::fs::write(dir.path().join("other[0000].journal"), b"").unwrap();
        let c = Catalog::scan(dir.path(), "db").unwrap();
        assert!(c.sets.is_empty());
        assert_eq!(c.incomplete.len(), 1);
        assert_eq!(
            c.archives.iter().map(|a| a.number).collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(c.temp.len(), 1);
    }
}
