//! `mirrordb verify`: re-reads backup sets and the journal archive chain and
//! checks every checksum and the LSN continuity; with `--restore` it also
//! restores a set into a scratch directory and compares the record count
//! and content digest with the manifest.
//!
//! ```text
//! for each chosen set: manifest ─► snapshot (chunk CRCs vs manifest, checksum, digest)
//!                      ─► attached files (checksum)
//! chain: archive M ─► checksum and every frame CRC in one pass, dense LSNs, one database id;
//!        archive M starts at or before S(M)+1 and archive M+1 continues it
//! --restore: restore set N (set only) into scratch ─► count + digest == manifest
//! ```

use super::format::{self, ArchiveReader, Checksum, HashKind};
use super::log::{BackupLog, LineKind};
use super::manifest::Catalog;
use super::restore::{self, RestoreTarget, Until};
use crate::engine::store::{DATA_FILE, Store};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What verification found about one file or step.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// The outcome of `verify`.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub backup_dir: PathBuf,
    pub sets_checked: Vec<u32>,
    pub archives_checked: Vec<u32>,
    pub checks: Vec<Check>,
    pub ok: bool,
}

impl VerifyReport {
    /// What each failed check was about (empty when all passed).
    pub fn failed(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.what.as_str())
            .collect()
    }

    fn push(&mut self, what: String, r: Result<String, String>) {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.ok &= ok;
        self.checks.push(Check { what, ok, detail });
    }
}

/// Options of `verify`.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Only this set (and the archives after it); default: every set and
    /// every archive.
    pub set: Option<u32>,
    /// Also restore (the chosen set, or the newest) into a scratch directory.
    pub restore: bool,
    /// Where the scratch restore goes (a temporary directory if `None`).
    pub scratch: Option<PathBuf>,
    /// Write the outcome to this data directory's Backup Journal.
    pub log_dir: Option<PathBuf>,
}

/// Verifies `backup_dir`. Damage is reported in the checks, never as a
/// panic; `Err` only when the directory cannot be read at all.
pub fn verify(
    backup_dir: &Path,
    opts: &VerifyOptions,
) -> Result<VerifyReport, restore::RestoreError> {
    let name = restore::detect_name(backup_dir)?;
    let catalog = Catalog::scan(backup_dir, &name)?;
    let mut rep = VerifyReport {
        backup_dir: backup_dir.to_owned(),
        sets_checked: vec![],
        archives_checked: vec![],
        checks: vec![],
        ok: true,
    };
    for (dir, why) in &catalog.incomplete {
        rep.push(
            dir.display().to_string(),
            Err(format!("not a complete set: {why}")),
        );
    }
    let sets: Vec<_> = catalog
        .sets
        .iter()
        .filter(|s| opts.set.is_none_or(|n| s.manifest.number == n))
        .collect();
    if let Some(n) = opts.set
        && sets.is_empty()
    {
        return Err(restore::RestoreError::NoSuchSet(n));
    }
    for s in &sets {
        let m = &s.manifest;
        rep.sets_checked.push(m.number);
        let scratch = ScratchDir::new()?;
        // Loading into a throw-away builder checks chunks, checksum and digest.
        let r = (|| -> Result<String, String> {
            let mut b = crate::engine::backup::DataFileBuilder::create(
                &scratch.path().join("d"),
                m.db_id_bytes().ok_or("bad database id in the manifest")?,
                m.epoch,
                m.lsn,
            )
            .map_err(|e| e.to_string())?;
            let n = restore::load_set(&mut b, &s.dir, &|_| {}).map_err(|e| e.to_string())?;
            Ok(format!(
                "{n} items, {} records, {} ok",
                m.digest_records, m.snapshot.checksum
            ))
        })();
        rep.push(format!("set {} snapshot", m.number), r);
        for a in &m.attached {
            let what = format!("set {} attached {}", m.number, a.source);
            let r = match (&a.path, &a.checksum) {
                (Some(p), Some(want)) => {
                    check_file(&s.dir.join(p), want).map(|()| format!("{want} ok"))
                }
                _ => Ok(format!(
                    "not in the set (partial backup): {}",
                    a.error.clone().unwrap_or_default()
                )),
            };
            rep.push(what, r);
        }
    }
    // The archive chain: all of it (archive 0 holds the history before the
    // first set, which a restore to an earlier point needs), or with
    // `--set N` the archives that roll set N forward.
    let from = opts.set.unwrap_or(0);
    let mut prev_last: Option<u64> = None;
    for a in catalog.archives.iter().filter(|a| a.number >= from) {
        rep.archives_checked.push(a.number);
        let r = check_archive(&a.path, a.recorded.as_ref().map(|r| &r.file.checksum));
        let what = format!("archive {} ({})", a.number, a.path.display());
        match r {
            Ok((first, last, entries)) => {
                let mut problems = Vec::new();
                if let Some(set) = catalog.set(a.number)
                    && first > set.manifest.lsn + 1
                {
                    problems.push(format!(
                        "starts at LSN {first}, but set {} ends at {}: entries are missing",
                        a.number, set.manifest.lsn
                    ));
                }
                if let Some(p) = prev_last
                    && first > p + 1
                {
                    problems.push(format!(
                        "LSN gap: the previous archive ends at {p}, this one starts at {first}"
                    ));
                }
                if let Some(next) = catalog.set(a.number + 1)
                    && last != next.manifest.lsn
                {
                    problems.push(format!(
                        "ends at LSN {last}, but set {} was taken at {}",
                        a.number + 1,
                        next.manifest.lsn
                    ));
                }
                prev_last = Some(last);
                let detail = format!("LSN {first}..={last}, {entries} entries");
                rep.push(
                    what,
                    if problems.is_empty() {
                        Ok(detail)
                    } else {
                        Err(format!("{detail}: {}", problems.join("; ")))
                    },
                );
            }
            Err(e) => {
                prev_last = None;
                rep.push(what, Err(e));
            }
        }
    }
    if opts.restore {
        let set = opts
            .set
            .or_else(|| catalog.sets.last().map(|s| s.manifest.number));
        if let Some(n) = set
            && let Some(s) = catalog.set(n)
        {
            let tmp;
            let scratch = match &opts.scratch {
                Some(p) => p.clone(),
                None => {
                    tmp = ScratchDir::new()?;
                    tmp.path().join("restore")
                }
            };
            let r = restore::restore_into(
                backup_dir,
                &scratch,
                RestoreTarget {
                    set: Some(n),
                    until: Until::SetOnly,
                },
                None,
                &|_| {},
            )
            .map_err(|e| e.to_string())
            .and_then(|_| {
                let store = Store::open(&scratch.join(DATA_FILE), 16 << 20)
                    .map_err(|e| e.to_string())?;
                let (count, digest) = store
                    .read()
                    .and_then(|v| v.digest())
                    .map_err(|e| e.to_string())?;
                let m = &s.manifest;
                if count == m.digest_records && digest == m.digest {
                    Ok(format!(
                        "restored into {}: {count} records, digest {digest:#010x} as recorded",
                        scratch.display()
                    ))
                } else {
                    Err(format!(
                        "restored {count} records with digest {digest:#010x}; the manifest records {} / {:#010x}",
                        m.digest_records, m.digest
                    ))
                }
            });
            rep.push(format!("set {n} restore"), r);
        }
    }
    if let Some(d) = &opts.log_dir {
        let log = BackupLog::new(d, true);
        let failed = rep.failed();
        if failed.is_empty() {
            log.line(
                LineKind::Info,
                &format!(
                    "verify ok: {} sets, {} archives in {}",
                    rep.sets_checked.len(),
                    rep.archives_checked.len(),
                    backup_dir.display()
                ),
            );
        } else {
            log.line(
                LineKind::Error,
                &format!(
                    "verify found problems in {}: {}",
                    backup_dir.display(),
                    failed.join(", ")
                ),
            );
        }
    }
    Ok(rep)
}

/// Hashes a file with the algorithm of its recorded checksum and compares.
fn check_file(path: &Path, want: &Checksum) -> Result<(), String> {
    let (_, got) = format::checksum_file(path, want.kind()).map_err(|e| e.to_string())?;
    if &got != want {
        return Err(format!("{got}, recorded {want}"));
    }
    Ok(())
}

/// Reads an archive to its end in one pass, hashing the compressed bytes as
/// they are decoded: (first LSN, last LSN, entries). A checksum that differs
/// from the record is reported first (it says the file changed), then a
/// damaged frame.
fn check_archive(path: &Path, want: Option<&Checksum>) -> Result<(u64, u64, u64), String> {
    let kind = want.map_or(HashKind::Blake3, Checksum::kind);
    let dec = format::open_hashed(path, kind).map_err(|e| e.to_string())?;
    let mut r = ArchiveReader::new(dec, &path.display().to_string());
    let (mut first, mut last, mut n) = (0u64, 0u64, 0u64);
    let frames = loop {
        match r.next_frame() {
            Ok(Some((_, f))) => {
                if n == 0 {
                    first = f.header.lsn;
                }
                last = f.header.lsn;
                n += 1;
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        }
    };
    if let Some(want) = want {
        // The decoder may stop short of the end (damage, or a frame it could
        // not read): the hasher reads whatever is left of the file.
        let (_, got) = format::finish_hashed(r.into_inner())
            .map_err(|e| format::io_at(path)(e).to_string())?;
        if &got != want {
            return Err(format!("{got}, recorded {want}"));
        }
    }
    frames.map(|()| (first, last, n))
}

/// A directory under the system's temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<ScratchDir, restore::RestoreError> {
        let p =
            std::env::temp_dir().join(format!("mirrordb-verify-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p).map_err(format::io_at(&p))?;
        Ok(ScratchDir(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backup::format::ArchiveWriter;
    use crate::backup::format::tests::segment_bytes;

    /// An archive of LSNs 1..=40 and its recorded checksum.
    fn archive(dir: &Path) -> (PathBuf, Checksum) {
        let seg = dir.join("1.journal");
        std::fs::write(&seg, segment_bytes([7; 16], 1, 40)).unwrap();
        let a = dir.join("a.journal");
        let mut w = ArchiveWriter::create(&a, [7; 16], 3).unwrap();
        w.add_segment(&seg, u64::MAX).unwrap();
        (a, w.finish().unwrap().checksum)
    }

    #[test]
    fn an_archive_is_checked_in_one_pass_checksum_first() {
        let dir = tempfile::tempdir().unwrap();
        let (a, sum) = archive(dir.path());
        assert_eq!(check_archive(&a, Some(&sum)).unwrap(), (1, 40, 40));
        assert_eq!(check_archive(&a, None).unwrap(), (1, 40, 40));

        // Intact frames but another checksum on record: the file changed.
        let other = format::checksum_file(&dir.path().join("1.journal"), sum.kind())
            .unwrap()
            .1;
        let e = check_archive(&a, Some(&other)).unwrap_err();
        assert!(e.contains("recorded"), "{e}");

        // A damaged byte: the checksum says so, even though decoding stops
        // early; without a record, the damaged frame does.
        let mut b = std::fs::read(&a).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x55;
        std::fs::write(&a, &b).unwrap();
        let e = check_archive(&a, Some(&sum)).unwrap_err();
        assert!(e.contains(&format!("recorded {sum}")), "{e}");
        assert!(check_archive(&a, None).is_err());

        // Cut short: the same.
        std::fs::write(&a, &b[..mid]).unwrap();
        let e = check_archive(&a, Some(&sum)).unwrap_err();
        assert!(e.contains(&format!("recorded {sum}")), "{e}");
        assert!(check_archive(&a, None).is_err());
    }
}
