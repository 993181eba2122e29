//! Restore and point-in-time recovery (DESIGN §6): build a data directory
//! from a backup set and the journal that followed it.
//!
//! ```text
//! plan:    catalog of the backup dir ─► target (latest | set N | LSN | time | restore point)
//!          ─► base = newest complete set at or before the target (or none: from LSN 1)
//!          ─► archives numbered ≥ base, then the live journal (optional)
//! restore: DataFileBuilder(base S) ◄─ snapshot items (chunk CRCs, file checksum, digest)
//!          ◄─ frames S+1 .. target from archives, then the live journal (dense LSNs,
//!             one database id) ─► finish (a new epoch when history after the
//!             target is left out, so the restored database forks cleanly)
//! ```
//!
//! `--set N` without an `--until-*` restores the set as it was at its S;
//! with neither, the newest set is rolled forward through every archive and
//! the live journal given.

use super::format::{
    self, ArchiveReader, Checksum, FormatError, HashKind, SNAPSHOT_FILE, SnapshotReader,
};
use super::log::{BackupLog, LineKind};
use super::manifest::{Catalog, Manifest, SetInfo};
use super::run::Digest;
use crate::engine::OpenError;
use crate::engine::backup::{DataFileBuilder, HistorySource, RestoredDataDir};
use crate::journal::format::HEADER_LEN;
use crate::journal::scan::{self, EntryIter, OwnedFrame, ScanError, db_id_string};
use crate::model::Op;
use serde::Serialize;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;
use thiserror::Error;

/// Progress callbacks happen at most every this many items or entries.
const PROGRESS_EVERY: u64 = 10_000;

/// How far to roll forward.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Until {
    /// Everything available.
    End,
    /// Only the base set, as it was at its S.
    SetOnly,
    /// Up to and including this LSN.
    Lsn(u64),
    /// Every entry with a time ≤ this (µs since the Unix epoch).
    TimeUs(u64),
    /// Up to and including the last restore point of this name.
    Name(String),
}

/// What to restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestoreTarget {
    /// The base set; `None` picks the newest set before the target.
    pub set: Option<u32>,
    pub until: Until,
}

impl RestoreTarget {
    /// The newest set rolled forward through everything available.
    pub fn latest() -> RestoreTarget {
        RestoreTarget {
            set: None,
            until: Until::End,
        }
    }

    fn describe(&self) -> String {
        let u = match &self.until {
            Until::End => "the end of the journal".to_string(),
            Until::SetOnly => "the set's own LSN".to_string(),
            Until::Lsn(l) => format!("LSN {l}"),
            Until::TimeUs(t) => crate::activity::format_time_us(*t),
            Until::Name(n) => format!("restore point {n:?}"),
        };
        match self.set {
            Some(n) => format!("set {n}, up to {u}"),
            None => format!("up to {u}"),
        }
    }
}

/// Progress of a restore.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreProgress {
    /// `snapshot` or `journal`.
    pub phase: &'static str,
    pub items: u64,
    pub items_total: u64,
    pub entries: u64,
    pub lsn: u64,
}

/// Why a restore could not be done.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RestoreError {
    #[error("{0} holds no backup sets or journal archives")]
    NoBackups(PathBuf),
    #[error("{dir} holds backups of several names ({names}); keep one name per directory")]
    Ambiguous { dir: PathBuf, names: String },
    #[error("there is no complete backup set number {0}")]
    NoSuchSet(u32),
    #[error("set {set} was taken at LSN {set_lsn}, after the target LSN {target}")]
    SetAfterTarget { set: u32, set_lsn: u64, target: u64 },
    #[error("no backup set is old enough for {0}, and the journal does not reach back to LSN 1")]
    NoBase(String),
    #[error("no restore point named {0:?} in the archives or the journal")]
    NameNotFound(String),
    #[error(
        "{what} belongs to database {found}, but the base set is database {expected}; refusing to mix databases"
    )]
    Foreign {
        what: String,
        expected: String,
        found: String,
    },
    #[error("{what}: checksum mismatch (recorded {expected}, found {found})")]
    Checksum {
        what: String,
        expected: String,
        found: String,
    },
    #[error("the history ends at LSN {end}, before the target LSN {target}")]
    TargetBeyondEnd { end: u64, target: u64 },
    #[error(
        "LSN 0 comes before a database's first entry: the earliest target is LSN 1 (its first start, which holds no data)"
    )]
    BeforeFirstEntry,
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("{0}")]
    Journal(#[from] ScanError),
    #[error("building the data directory failed: {0}")]
    Build(#[from] OpenError),
    #[error(
        "{path} already holds a journal; restore into an empty directory (move the old journal aside first)"
    )]
    NotEmpty { path: PathBuf },
}

impl RestoreError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            RestoreError::Foreign { .. } => "foreign_database",
            RestoreError::Checksum { .. } | RestoreError::Format(_) | RestoreError::Journal(_) => {
                "backup_damaged"
            }
            RestoreError::NoBackups(_)
            | RestoreError::NoSuchSet(_)
            | RestoreError::NoBase(_)
            | RestoreError::NameNotFound(_) => "not_found",
            _ => "restore_failed",
        }
    }
}

/// The base of a plan.
#[derive(Clone, Debug, Serialize)]
pub struct PlanBase {
    pub number: u32,
    pub lsn: u64,
    pub epoch: u64,
    pub time: String,
    pub dir: PathBuf,
    pub records: u64,
    pub snapshot_bytes: u64,
}

/// An archive a plan reads.
#[derive(Clone, Debug, Serialize)]
pub struct PlanArchive {
    pub number: u32,
    pub path: PathBuf,
    pub first_lsn: u64,
    /// Known when the set that wrote it is still there.
    pub last_lsn: Option<u64>,
    pub bytes: u64,
    #[serde(skip)]
    checksum: Option<Checksum>,
}

/// The live journal a plan reads.
#[derive(Clone, Debug, Serialize)]
pub struct PlanLive {
    pub dir: PathBuf,
    pub first_lsn: u64,
    pub last_lsn: u64,
}

/// What a restore will do (`--dry-run` prints it).
#[derive(Clone, Debug, Serialize)]
pub struct RestorePlan {
    pub backup_dir: PathBuf,
    pub name: String,
    pub db_id: String,
    pub target: RestoreTarget,
    pub target_description: String,
    /// The LSN the target resolves to, when known before reading (LSN,
    /// restore point, set only).
    pub target_lsn: Option<u64>,
    pub base: Option<PlanBase>,
    pub archives: Vec<PlanArchive>,
    pub live: Option<PlanLive>,
    /// Journal after the target exists (in archives or the live journal
    /// left out of the plan): the restore forks history.
    pub later_history: bool,
}

impl RestorePlan {
    /// A readable multi-line description.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "restore plan for database {} from {} ({}):\n",
            self.db_id,
            self.backup_dir.display(),
            self.target_description
        );
        match &self.base {
            Some(b) => s.push_str(&format!(
                "  1. load set {} ({}): LSN {}, taken {}, {} records, {}\n",
                b.number,
                b.dir.display(),
                b.lsn,
                b.time,
                b.records,
                super::run::human_bytes(b.snapshot_bytes)
            )),
            None => s.push_str("  1. no base set: start from an empty database at LSN 1\n"),
        }
        let mut step = 2;
        for a in &self.archives {
            s.push_str(&format!(
                "  {step}. integrate archive {} ({}): LSN {}..{}\n",
                a.number,
                a.path.display(),
                a.first_lsn,
                a.last_lsn
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "?".into())
            ));
            step += 1;
        }
        if let Some(l) = &self.live {
            s.push_str(&format!(
                "  {step}. integrate the journal in {}: LSN {}..{}\n",
                l.dir.display(),
                l.first_lsn,
                l.last_lsn
            ));
            step += 1;
        }
        let resolved = match (&self.target.until, self.target_lsn) {
            (Until::Name(_), Some(l)) => format!(" (LSN {l})"),
            _ => String::new(),
        };
        s.push_str(&format!(
            "  {step}. stop {}{resolved}\n",
            self.target_description
        ));
        s
    }
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub plan: RestorePlan,
    pub data_dir: PathBuf,
    pub last_lsn: u64,
    pub epoch: u64,
    pub records: u64,
    pub snapshot_items: u64,
    pub entries_integrated: u64,
    /// Whether entries after the target exist (the restore forked history).
    pub forked: bool,
    pub duration_ms: u64,
    pub entries_per_sec: u64,
}

/// Finds the one backup name used in `dir`.
pub fn detect_name(dir: &Path) -> Result<String, RestoreError> {
    if !dir.is_dir() {
        return Err(RestoreError::NoBackups(dir.to_owned()));
    }
    let rd = std::fs::read_dir(dir).map_err(format::io_at(dir))?;
    let mut names = std::collections::BTreeSet::new();
    for e in rd.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        if f.starts_with(format::TEMP_PREFIX) {
            continue;
        }
        for suffix in [format::SET_SUFFIX, format::ARCHIVE_SUFFIX] {
            if let Some(stem) = f.strip_suffix(suffix)
                && let Some(open) = stem.rfind('[')
                && format::parse_numbered(&f, &stem[..open], suffix).is_some()
            {
                names.insert(stem[..open].to_string());
            }
        }
    }
    match names.len() {
        0 => Err(RestoreError::NoBackups(dir.to_owned())),
        1 => Ok(names.into_iter().next().unwrap_or_default()),
        _ => Err(RestoreError::Ambiguous {
            dir: dir.to_owned(),
            names: names.into_iter().collect::<Vec<_>>().join(", "),
        }),
    }
}

/// Reads the first segment header of an archive (cheap: one block).
fn archive_head(path: &Path) -> Result<crate::journal::format::SegmentHeader, RestoreError> {
    let f = File::open(path).map_err(format::io_at(path))?;
    let mut dec = zstd::Decoder::new(f).map_err(format::io_at(path))?;
    let mut b = [0u8; HEADER_LEN];
    let mut n = 0;
    while n < HEADER_LEN {
        match dec.read(&mut b[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => {
                return Err(FormatError::Damaged {
                    what: path.display().to_string(),
                    offset: 0,
                    reason: e.to_string(),
                }
                .into());
            }
        }
    }
    crate::journal::format::SegmentHeader::decode(&b[..n]).map_err(|e| {
        FormatError::Damaged {
            what: path.display().to_string(),
            offset: 0,
            reason: format!("bad segment header: {e}"),
        }
        .into()
    })
}

/// A source of frames: archives, then the live journal.
#[derive(Clone, Debug)]
enum Source {
    Archive(PlanArchive),
    Live(PlanLive),
}

/// Frames of a chain of sources, in LSN order, each LSN once, every
/// archive's database id checked and its checksum checked when it is read to
/// the end.
struct ChainFrames {
    sources: VecDeque<Source>,
    current: Option<Box<dyn Iterator<Item = Result<OwnedFrame, RestoreError>>>>,
    db_id: [u8; 16],
    last: u64,
}

struct ArchiveFrames {
    reader: Option<ArchiveReader<format::HashedDecoder>>,
    what: String,
    checksum: Option<Checksum>,
    db_id: [u8; 16],
}

impl Iterator for ArchiveFrames {
    type Item = Result<OwnedFrame, RestoreError>;
    fn next(&mut self) -> Option<Self::Item> {
        let r = self.reader.as_mut()?;
        match r.next_frame() {
            Ok(Some((h, f))) => {
                if h.db_id != self.db_id {
                    self.reader = None;
                    return Some(Err(RestoreError::Foreign {
                        what: self.what.clone(),
                        expected: db_id_string(&self.db_id),
                        found: db_id_string(&h.db_id),
                    }));
                }
                Some(Ok(f))
            }
            Ok(None) => {
                let reader = self.reader.take()?;
                let want = self.checksum.take()?;
                let hashed = format::finish_hashed(reader.into_inner())
                    .map_err(|e| format::io_at(Path::new(&self.what))(e));
                match hashed {
                    Ok((_, got)) if got == want => None,
                    Ok((_, got)) => Some(Err(RestoreError::Checksum {
                        what: self.what.clone(),
                        expected: want.to_string(),
                        found: got.to_string(),
                    })),
                    Err(e) => Some(Err(e.into())),
                }
            }
            Err(e) => {
                self.reader = None;
                Some(Err(e.into()))
            }
        }
    }
}

impl ChainFrames {
    fn new(sources: Vec<Source>, db_id: [u8; 16], after: u64) -> ChainFrames {
        ChainFrames {
            sources: sources.into(),
            current: None,
            db_id,
            last: after,
        }
    }

    fn open(
        &self,
        s: Source,
    ) -> Result<Box<dyn Iterator<Item = Result<OwnedFrame, RestoreError>>>, RestoreError> {
        match s {
            Source::Archive(a) => {
                let kind = a.checksum.as_ref().map_or(HashKind::Blake3, Checksum::kind);
                let dec = format::open_hashed(&a.path, kind)?;
                Ok(Box::new(ArchiveFrames {
                    reader: Some(ArchiveReader::new(dec, &a.path.display().to_string())),
                    what: a.path.display().to_string(),
                    checksum: a.checksum,
                    db_id: self.db_id,
                }))
            }
            Source::Live(l) => {
                let state = scan::verify(&l.dir, Some(self.db_id), false)?;
                let from = self.last + 1;
                Ok(Box::new(
                    EntryIter::new(state.segments, from, state.last_lsn)
                        .map(|r| r.map_err(RestoreError::from)),
                ))
            }
        }
    }
}

impl Iterator for ChainFrames {
    type Item = Result<OwnedFrame, RestoreError>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                let s = self.sources.pop_front()?;
                match self.open(s) {
                    Ok(it) => self.current = Some(it),
                    Err(e) => {
                        self.sources.clear();
                        return Some(Err(e));
                    }
                }
            }
            let it = self.current.as_mut()?;
            match it.next() {
                None => {
                    self.current = None;
                }
                Some(Err(e)) => {
                    self.sources.clear();
                    self.current = None;
                    return Some(Err(e));
                }
                Some(Ok(f)) => {
                    if f.header.lsn <= self.last {
                        continue;
                    }
                    self.last = f.header.lsn;
                    return Some(Ok(f));
                }
            }
        }
    }
}

/// Finds the LSN of the last restore point named `name` in the sources.
fn find_restore_point(
    sources: &[Source],
    db_id: [u8; 16],
    name: &str,
) -> Result<u64, RestoreError> {
    let mut found = None;
    for f in ChainFrames::new(sources.to_vec(), db_id, 0) {
        let f = f?;
        if let Ok(Op::RestorePoint { name: n }) = crate::journal::format::decode_op(f.payload())
            && n == name
        {
            found = Some(f.header.lsn);
        }
    }
    found.ok_or_else(|| RestoreError::NameNotFound(name.to_owned()))
}

fn plan_base(s: &SetInfo) -> PlanBase {
    PlanBase {
        number: s.manifest.number,
        lsn: s.manifest.lsn,
        epoch: s.manifest.epoch,
        time: s.manifest.time.clone(),
        dir: s.dir.clone(),
        records: s.manifest.records,
        snapshot_bytes: s.manifest.snapshot.bytes,
    }
}

/// Plans a restore without changing anything (`--dry-run`).
pub fn plan(
    backup_dir: &Path,
    target: &RestoreTarget,
    journal_dir: Option<&Path>,
) -> Result<RestorePlan, RestoreError> {
    // No backups but a journal: the journal alone (it must start at LSN 1).
    let (name, catalog) = match detect_name(backup_dir) {
        Ok(name) => {
            let c = Catalog::scan(backup_dir, &name)?;
            (name, c)
        }
        Err(RestoreError::NoBackups(_)) if journal_dir.is_some() => {
            (String::new(), Catalog::default())
        }
        Err(e) => return Err(e),
    };
    // The database: the newest set's, else the first archive's, else the live journal's.
    let live_segments = match journal_dir {
        Some(d) => scan::list_segments(d)?.0,
        None => Vec::new(),
    };
    let db_id: [u8; 16] = if let Some(s) = catalog.sets.last() {
        s.manifest
            .db_id_bytes()
            .ok_or_else(|| FormatError::Damaged {
                what: s.dir.join(format::MANIFEST_FILE).display().to_string(),
                offset: 0,
                reason: "bad database id".into(),
            })?
    } else if let Some(a) = catalog.archives.first() {
        archive_head(&a.path)?.db_id
    } else if let Some(s) = live_segments.first() {
        s.header.db_id
    } else {
        return Err(RestoreError::NoBackups(backup_dir.to_owned()));
    };
    let foreign = |what: String, found: [u8; 16]| RestoreError::Foreign {
        what,
        expected: db_id_string(&db_id),
        found: db_id_string(&found),
    };
    for s in &catalog.sets {
        if s.manifest.db_id_bytes() != Some(db_id) {
            return Err(RestoreError::Foreign {
                what: s.dir.display().to_string(),
                expected: db_id_string(&db_id),
                found: s.manifest.db_id.clone(),
            });
        }
    }
    // Every archive, with its first LSN (read from its head).
    let mut archives = Vec::new();
    for a in &catalog.archives {
        let head = archive_head(&a.path)?;
        if head.db_id != db_id {
            return Err(foreign(a.path.display().to_string(), head.db_id));
        }
        let bytes = std::fs::metadata(&a.path).map(|m| m.len()).unwrap_or(0);
        archives.push(PlanArchive {
            number: a.number,
            path: a.path.clone(),
            first_lsn: head.first_lsn,
            last_lsn: a.recorded.as_ref().map(|r| r.summary.last_lsn),
            bytes,
            checksum: a.recorded.as_ref().map(|r| r.file.checksum.clone()),
        });
    }
    let live = match journal_dir {
        Some(d) if !live_segments.is_empty() => {
            for s in &live_segments {
                if s.header.db_id != db_id {
                    return Err(foreign(s.path.display().to_string(), s.header.db_id));
                }
            }
            let state = scan::verify(d, Some(db_id), false)?;
            Some(PlanLive {
                dir: d.to_owned(),
                first_lsn: state.first_lsn.max(live_segments[0].header.first_lsn),
                last_lsn: state.last_lsn,
            })
        }
        _ => None,
    };
    let all_sources = |from_number: Option<u32>| -> Vec<Source> {
        let mut v: Vec<Source> = archives
            .iter()
            .filter(|a| from_number.is_none_or(|n| a.number >= n))
            .cloned()
            .map(Source::Archive)
            .collect();
        if let Some(l) = &live {
            v.push(Source::Live(l.clone()));
        }
        v
    };
    if target.until == Until::Lsn(0) {
        return Err(RestoreError::BeforeFirstEntry);
    }
    // Resolve the target LSN where it can be known up front.
    let target_lsn = match &target.until {
        Until::Lsn(l) => Some(*l),
        Until::Name(n) => Some(find_restore_point(&all_sources(None), db_id, n)?),
        _ => None,
    };
    let base_set: Option<&SetInfo> = match target.set {
        Some(n) => {
            let s = catalog.set(n).ok_or(RestoreError::NoSuchSet(n))?;
            if let Some(l) = target_lsn
                && s.manifest.lsn > l
            {
                return Err(RestoreError::SetAfterTarget {
                    set: n,
                    set_lsn: s.manifest.lsn,
                    target: l,
                });
            }
            Some(s)
        }
        None => match (&target.until, target_lsn) {
            (_, Some(l)) => catalog.sets.iter().rev().find(|s| s.manifest.lsn <= l),
            (Until::TimeUs(t), _) => catalog.sets.iter().rev().find(|s| s.manifest.time_us <= *t),
            _ => catalog.sets.last(),
        },
    };
    let base = base_set.map(plan_base);
    let from = base.as_ref().map(|b| b.number).unwrap_or(0);
    let (sources, target_lsn, later_history) = if target.until == Until::SetOnly {
        let later = !all_sources(Some(from)).is_empty();
        (Vec::new(), base.as_ref().map(|b| b.lsn), later)
    } else {
        let mut s = all_sources(Some(from));
        let before = s.len();
        // Sources that start after the target are not needed.
        if let Some(l) = target_lsn {
            s.retain(|x| match x {
                Source::Archive(a) => a.first_lsn <= l,
                Source::Live(v) => v.first_lsn <= l,
            });
        }
        let later = s.len() < before;
        (s, target_lsn, later)
    };
    // Without a base, the history must start at LSN 1.
    if base.is_none() {
        let first = sources.first().map(|s| match s {
            Source::Archive(a) => a.first_lsn,
            Source::Live(l) => l.first_lsn,
        });
        if first != Some(1) {
            return Err(RestoreError::NoBase(target.describe()));
        }
    }
    let (archives, live): (Vec<PlanArchive>, Option<PlanLive>) = {
        let mut a = Vec::new();
        let mut l = None;
        for s in sources {
            match s {
                Source::Archive(x) => a.push(x),
                Source::Live(x) => l = Some(x),
            }
        }
        (a, l)
    };
    Ok(RestorePlan {
        backup_dir: backup_dir.to_owned(),
        name,
        db_id: db_id_string(&db_id),
        target_description: target.describe(),
        target: target.clone(),
        target_lsn,
        base,
        archives,
        live,
        later_history,
    })
}

/// Whether a restore that leaves later history out starts a new epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForkPolicy {
    /// A new epoch when entries after the target were seen (point-in-time
    /// restores: the restored database is a new branch of history).
    #[default]
    Auto,
    /// Keep the epoch: the caller continues the same history (automatic
    /// restore at start, which then replays the live journal after the target).
    Never,
}

/// The page cache a restore gives the data file it builds, unless told
/// otherwise (`mirrordb restore --cache`): integrating journal entries
/// into a large data file reads and rewrites pages all over it, and a
/// restore of a 1 GiB set plus 930,000 entries took 28–32 s with 64 MiB,
/// 25–26 s with 512 MiB and 21 s with 2 GiB on a 2-core VM (BENCHMARKS.md,
/// "Restore with a larger cache"). The cache fills only as far as the data
/// file goes, so a small database never takes it all.
pub const DEFAULT_RESTORE_CACHE_BYTES: usize = 1 << 30;

/// How a restore runs, beside what it restores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreOptions {
    pub fork: ForkPolicy,
    /// Page cache of the data file being built, in bytes.
    pub cache_bytes: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            fork: ForkPolicy::Auto,
            cache_bytes: DEFAULT_RESTORE_CACHE_BYTES,
        }
    }
}

/// Restores into `data_dir` (which must not hold a data file or journal):
/// plan, load the base set, integrate up to the target, finish. Logs one
/// line in `data_dir/logs/Backup Journal[…].txt`.
pub fn restore_into(
    backup_dir: &Path,
    data_dir: &Path,
    target: RestoreTarget,
    journal_dir: Option<&Path>,
    progress: &dyn Fn(RestoreProgress),
) -> Result<RestoreReport, RestoreError> {
    restore_into_with(
        backup_dir,
        data_dir,
        target,
        journal_dir,
        RestoreOptions::default(),
        progress,
    )
}

/// [`restore_into`] with explicit [`RestoreOptions`].
pub fn restore_into_with(
    backup_dir: &Path,
    data_dir: &Path,
    target: RestoreTarget,
    journal_dir: Option<&Path>,
    opts: RestoreOptions,
    progress: &dyn Fn(RestoreProgress),
) -> Result<RestoreReport, RestoreError> {
    let log = BackupLog::new(&data_dir.join("logs"), true);
    log.line(
        LineKind::Start,
        &format!(
            "restore started from {} into {} ({})",
            backup_dir.display(),
            data_dir.display(),
            target.describe()
        ),
    );
    let r = restore_inner(backup_dir, data_dir, target, journal_dir, opts, progress);
    match &r {
        Ok(rep) => log.line(
            LineKind::Info,
            &format!(
                "restore ok: base set {}, {} snapshot items, {} journal entries integrated ({} entries/s), now at LSN {} epoch {}{}",
                rep.plan
                    .base
                    .as_ref()
                    .map(|b| b.number.to_string())
                    .unwrap_or_else(|| "none".into()),
                rep.snapshot_items,
                rep.entries_integrated,
                rep.entries_per_sec,
                rep.last_lsn,
                rep.epoch,
                if rep.forked { " (history forked)" } else { "" }
            ),
        ),
        Err(e) => log.line(LineKind::Error, &format!("restore failed: {e}")),
    }
    r
}

fn restore_inner(
    backup_dir: &Path,
    data_dir: &Path,
    target: RestoreTarget,
    journal_dir: Option<&Path>,
    opts: RestoreOptions,
    progress: &dyn Fn(RestoreProgress),
) -> Result<RestoreReport, RestoreError> {
    let t0 = Instant::now();
    let plan = plan(backup_dir, &target, journal_dir)?;
    let jdir = data_dir.join("journal");
    if !scan::list_segments(&jdir)?.0.is_empty() {
        return Err(RestoreError::NotEmpty { path: jdir });
    }
    let db_id = uuid::Uuid::parse_str(&plan.db_id)
        .map(|u| *u.as_bytes())
        .unwrap_or([0; 16]);
    let (base_lsn, epoch) = match &plan.base {
        Some(b) => (b.lsn, b.epoch),
        None => (0, first_epoch(&plan)?),
    };
    let mut builder =
        DataFileBuilder::create_with_cache(data_dir, db_id, epoch, base_lsn, opts.cache_bytes)?;
    let mut snapshot_items = 0u64;
    if let Some(b) = &plan.base {
        snapshot_items = load_set(&mut builder, &b.dir, progress)?;
    }
    // Roll forward.
    let mut sources: Vec<Source> = plan.archives.iter().cloned().map(Source::Archive).collect();
    if let Some(l) = &plan.live {
        sources.push(Source::Live(l.clone()));
    }
    let mut entries = 0u64;
    let mut forked = false;
    let t_int = Instant::now();
    if target.until != Until::SetOnly {
        for f in ChainFrames::new(sources, db_id, base_lsn) {
            let f = f?;
            let stop = match (&target.until, plan.target_lsn) {
                (_, Some(l)) => f.header.lsn > l,
                (Until::TimeUs(t), _) => f.header.time_us > *t,
                _ => false,
            };
            if stop {
                forked = true;
                break;
            }
            builder.integrate(&f)?;
            entries += 1;
            if entries.is_multiple_of(PROGRESS_EVERY) {
                progress(RestoreProgress {
                    phase: "journal",
                    items: snapshot_items,
                    items_total: snapshot_items,
                    entries,
                    lsn: f.header.lsn,
                });
            }
        }
    }
    // Leaving out what followed the target forks history.
    forked |= plan.later_history;
    let (pos, ep) = builder.position();
    if let Some(l) = plan.target_lsn
        && target.until != Until::SetOnly
        && pos < l
    {
        return Err(RestoreError::TargetBeyondEnd {
            end: pos,
            target: l,
        });
    }
    progress(RestoreProgress {
        phase: "journal",
        items: snapshot_items,
        items_total: snapshot_items,
        entries,
        lsn: pos,
    });
    if opts.fork == ForkPolicy::Never {
        forked = false;
    }
    let new_epoch = forked.then_some(ep + 1);
    let done: RestoredDataDir = builder.finish(new_epoch)?;
    let secs = t_int.elapsed().as_secs_f64();
    Ok(RestoreReport {
        data_dir: data_dir.to_owned(),
        last_lsn: done.last_lsn,
        epoch: done.epoch,
        records: done.records,
        snapshot_items,
        entries_integrated: entries,
        forked,
        duration_ms: t0.elapsed().as_millis() as u64,
        entries_per_sec: if secs > 0.0 {
            (entries as f64 / secs) as u64
        } else {
            0
        },
        plan,
    })
}

fn first_epoch(plan: &RestorePlan) -> Result<u64, RestoreError> {
    if let Some(a) = plan.archives.first() {
        return Ok(archive_head(&a.path)?.epoch);
    }
    if let Some(l) = &plan.live {
        let (segs, _) = scan::list_segments(&l.dir)?;
        return Ok(segs.first().map(|s| s.header.epoch).unwrap_or(1));
    }
    Ok(1)
}

/// Loads a set's snapshot into `builder`, checking chunk CRCs against the
/// manifest, the file's checksum and the content digest. Answers the items loaded.
pub(crate) fn load_set(
    builder: &mut DataFileBuilder,
    set_dir: &Path,
    progress: &dyn Fn(RestoreProgress),
) -> Result<u64, RestoreError> {
    let m = Manifest::read(set_dir)?;
    let path = set_dir.join(SNAPSHOT_FILE);
    let what = path.display().to_string();
    let dec = format::open_hashed(&path, m.snapshot.checksum.kind())?;
    let mut r = SnapshotReader::new(dec, &what)?.expect_chunks(m.chunks.clone());
    let h = r.header();
    if Some(h.db_id) != m.db_id_bytes() || h.lsn != m.lsn {
        return Err(FormatError::Damaged {
            what,
            offset: 0,
            reason: format!(
                "the snapshot says database {} LSN {}, the manifest {} LSN {}",
                db_id_string(&h.db_id),
                h.lsn,
                m.db_id,
                m.lsn
            ),
        }
        .into());
    }
    let mut digest = Digest::default();
    let mut n = 0u64;
    while let Some(item) = r.next_item()? {
        digest.add(&item);
        builder.add_item(item)?;
        n += 1;
        if n.is_multiple_of(PROGRESS_EVERY) {
            progress(RestoreProgress {
                phase: "snapshot",
                items: n,
                items_total: m.snapshot_items,
                entries: 0,
                lsn: m.lsn,
            });
        }
    }
    let (_, sum) = format::finish_hashed(r.into_inner()).map_err(format::io_at(&path))?;
    if sum != m.snapshot.checksum {
        return Err(RestoreError::Checksum {
            what,
            expected: m.snapshot.checksum.to_string(),
            found: sum.to_string(),
        });
    }
    if digest.records != m.digest_records || digest.crc != m.digest {
        return Err(RestoreError::Checksum {
            what: format!("{what} (content digest)"),
            expected: format!("{} records / {:#010x}", m.digest_records, m.digest),
            found: format!("{} records / {:#010x}", digest.records, digest.crc),
        });
    }
    Ok(n)
}

/// History for online rollback and activity: the archives of a backup
/// directory followed by the live journal.
#[derive(Clone, Debug)]
pub struct BackupHistory {
    pub backup_dir: PathBuf,
    pub journal_dir: PathBuf,
}

impl HistorySource for BackupHistory {
    fn frames(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Box<dyn Iterator<Item = Result<OwnedFrame, ScanError>> + '_>, String> {
        // Every archive, then the live journal; the chain skips what is
        // before `from`.
        let (archives, live, db) = {
            let name = detect_name(&self.backup_dir).ok();
            let mut archives = Vec::new();
            let mut db = None;
            if let Some(name) = name
                && let Ok(c) = Catalog::scan(&self.backup_dir, &name)
            {
                for a in &c.archives {
                    let head = archive_head(&a.path).map_err(|e| e.to_string())?;
                    db.get_or_insert(head.db_id);
                    archives.push(Source::Archive(PlanArchive {
                        number: a.number,
                        path: a.path.clone(),
                        first_lsn: head.first_lsn,
                        last_lsn: None,
                        bytes: 0,
                        checksum: a.recorded.as_ref().map(|r| r.file.checksum.clone()),
                    }));
                }
            }
            let (segs, _) = scan::list_segments(&self.journal_dir).map_err(|e| e.to_string())?;
            let db = db.or_else(|| segs.first().map(|s| s.header.db_id));
            let live = segs.first().map(|s| {
                Source::Live(PlanLive {
                    dir: self.journal_dir.clone(),
                    first_lsn: s.header.first_lsn,
                    last_lsn: u64::MAX,
                })
            });
            (archives, live, db)
        };
        let db = db.ok_or("no journal history")?;
        let mut sources = archives;
        sources.extend(live);
        let chain = ChainFrames::new(sources, db, from.saturating_sub(1));
        let mut expected = from;
        Ok(Box::new(
            chain
                .take_while(move |r| r.as_ref().map(|f| f.header.lsn <= to).unwrap_or(true))
                .map(move |r| {
                    let f = r.map_err(|e| ScanError::Corrupt {
                        path: PathBuf::from("(backup history)"),
                        offset: 0,
                        reason: e.to_string(),
                    })?;
                    if f.header.lsn != expected {
                        return Err(ScanError::Corrupt {
                            path: PathBuf::from("(backup history)"),
                            offset: 0,
                            reason: format!(
                                "history is missing LSN {expected} (found {})",
                                f.header.lsn
                            ),
                        });
                    }
                    expected += 1;
                    Ok(f)
                }),
        ))
    }

    fn restore_to(&self, lsn: u64, scratch: &Path) -> Result<(), String> {
        // This runs inside a serving node (online rollback): its scratch
        // data file gets a small cache beside the node's own, not the
        // offline restore's default.
        let opts = RestoreOptions {
            cache_bytes: crate::engine::backup::BUILD_CACHE_BYTES,
            ..RestoreOptions::default()
        };
        restore_into_with(
            &self.backup_dir,
            scratch,
            RestoreTarget {
                set: None,
                until: Until::Lsn(lsn),
            },
            Some(&self.journal_dir),
            opts,
            &|_| {},
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }
}
