//! Offline compaction of the data file (`mirrordb compact`).
//!
//! The data file is a copy-on-write B-tree: every commit writes new pages
//! and frees the ones it replaced. A page freed while an older read view
//! is open cannot be reused until that view closes, and a backup holds
//! one for as long as it streams its snapshot. Under a steady write load
//! the file therefore grows during a backup by the pages rewritten
//! meanwhile, and redb reuses that space afterwards but does not give it
//! back to the filesystem. Compaction does: with the node stopped, it
//! moves the live pages to the front and truncates the rest. The journal
//! is not touched; the next start recovers from the same checkpoint.

use super::error::OpenError;
use super::lock_data_dir;
use super::store::{DATA_FILE, Store};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a compaction did.
#[derive(Clone, Debug, Serialize)]
pub struct CompactReport {
    pub data_file: PathBuf,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Passes that moved pages (0: nothing could be returned).
    pub passes: u32,
    pub seconds: f64,
}

/// Compacts the data file of `data_dir`. Refuses while a node (or any
/// other mirrordb process) has the directory open, and refuses a
/// directory without a data file rather than creating one.
pub fn compact_data_dir(data_dir: &Path, cache_bytes: usize) -> Result<CompactReport, OpenError> {
    let data_file = data_dir.join(DATA_FILE);
    let missing = |what: &str| OpenError::DataDir {
        path: data_dir.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, what.to_owned()),
    };
    if !data_dir.is_dir() {
        return Err(missing("no such directory"));
    }
    if !data_file.is_file() {
        return Err(missing("it holds no data file (mirrordb.redb)"));
    }
    let _lock = lock_data_dir(data_dir)?;
    let size = |p: &Path| {
        std::fs::metadata(p).map_err(|source| OpenError::DataDir {
            path: p.to_owned(),
            source,
        })
    };
    let bytes_before = size(&data_file)?.len();
    let t = Instant::now();
    let passes = Store::compact(&data_file, cache_bytes)
        .map_err(|e| OpenError::Store(format!("compacting {}: {e}", data_file.display())))?;
    let bytes_after = size(&data_file)?.len();
    Ok(CompactReport {
        data_file,
        bytes_before,
        bytes_after,
        passes,
        seconds: t.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_support::{cfg, rt, tput};
    use crate::engine::{Engine, EngineConfig};
    use crate::model::SessionId;

    const CACHE: usize = 16 << 20;

    /// Writes `rounds` rewrites of `keys` records (1 KiB values) while a
    /// backup's snapshot is open, so the file grows.
    fn grow_under_a_snapshot(e: &Engine, keys: u32, rounds: u32) {
        let rt = rt();
        rt.block_on(async {
            let point = e.backup_barrier(1).await.expect("barrier");
            for round in 0..rounds {
                for chunk in (0..keys).collect::<Vec<_>>().chunks(50) {
                    let ops = chunk
                        .iter()
                        .map(|k| {
                            tput(
                                &format!("k{k:06}"),
                                &format!("\"{round:04}{}\"", "x".repeat(1020)),
                            )
                        })
                        .collect();
                    e.write(SessionId::SYSTEM, ops).await.expect("write");
                }
                e.flush().await.expect("flush");
            }
            drop(point);
        });
    }

    #[test]
    fn compaction_returns_the_space_a_snapshot_pinned_and_keeps_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let c: EngineConfig = cfg(dir.path());
        let e = Engine::open(c.clone()).unwrap();
        grow_under_a_snapshot(&e, 2_000, 12);
        let digest = e.digest().unwrap();
        assert_eq!(digest.0, 2_000);
        drop(e);

        let r = compact_data_dir(dir.path(), CACHE).unwrap();
        assert!(r.passes > 0, "{r:?}");
        assert!(
            r.bytes_after * 2 < r.bytes_before,
            "the file should shrink to well under half: {r:?}"
        );

        let e = Engine::open(c).unwrap();
        assert_eq!(e.digest().unwrap(), digest, "same records after compaction");
        let rt = rt();
        rt.block_on(e.write(SessionId::SYSTEM, vec![tput("after", "1")]))
            .expect("writes go on after compaction");
    }

    #[test]
    fn compaction_is_refused_while_a_node_has_the_directory_open() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(cfg(dir.path())).unwrap();
        let err = compact_data_dir(dir.path(), CACHE).unwrap_err();
        assert!(matches!(err, OpenError::Locked(_)), "{err}");
        drop(e);
        compact_data_dir(dir.path(), CACHE).expect("compacts once the node is gone");
    }

    #[test]
    fn a_directory_without_a_data_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let err = compact_data_dir(dir.path(), CACHE).unwrap_err();
        assert!(err.to_string().contains("no data file"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let err = compact_data_dir(&dir.path().join("nope"), CACHE).unwrap_err();
        assert!(err.to_string().contains("no such directory"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_data_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DATA_FILE), b"not a database at all").unwrap();
        let err = compact_data_dir(dir.path(), CACHE).unwrap_err();
        assert!(matches!(err, OpenError::Store(_)), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join(DATA_FILE)).unwrap(),
            b"not a database at all"
        );
    }
}
