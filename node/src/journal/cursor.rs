//! Sequential journal reads with remembered positions.
//!
//! Two readers follow the live journal batch after batch: a replication
//! session shipping it (`cluster::source`) and, on a mirror, the engine's
//! applier (`engine::apply`). Scanning each segment from its start for every
//! batch costs O(segment) per read; instead each read ends with a [`Cursor`]
//! (next LSN, segment file, byte offset), and the next read from that LSN
//! seeks straight there. Without a cursor (a new session) the read finds the
//! segment and skips frames by their headers only.
//!
//! ```text
//! read(from) ─► cursor for `from`? ─yes─► open its segment, seek to its offset
//!                  │no
//!                  └─► list segments ─► last with first_lsn <= from ─► skip headers to `from`
//!           ─► frames (checked: dense LSN, crc) while <= durable and within limits
//!           ─► at a segment's end: the next segment must start at the next LSN
//!           ─► new cursor
//! ```
//!
//! Only frames `<= durable` are read: they are complete and fsynced, while a
//! frame beyond may be half written. Bytes from disk never cause a panic.

use super::format::{
    FRAME_HEADER_LEN, HEADER_LEN, decode_frame, decode_frame_header, is_zero_header,
};
use super::scan::{OwnedFrame, list_segments};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Why a cursor read failed.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    /// `from` is older than the oldest live segment.
    #[error("entries before LSN {oldest} are no longer in the live journal")]
    Unavailable { oldest: u64 },
    /// Reading a segment failed, or it does not hold what it must.
    #[error("{0}")]
    Io(String),
}

/// Where the next read from `next_lsn` starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub next_lsn: u64,
    pub path: PathBuf,
    pub offset: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CursorError + '_ {
    move |e| CursorError::Io(format!("{}: {e}", path.display()))
}

fn corrupt(path: &Path, offset: u64, what: String) -> CursorError {
    CursorError::Io(format!(
        "journal {} at offset {offset}: {what}",
        path.display()
    ))
}

/// Opens the segment holding `lsn` (the last one starting at or before it).
fn locate(journal: &Path, lsn: u64, durable: u64) -> Result<(PathBuf, u64), CursorError> {
    let (segs, _) = list_segments(journal).map_err(|e| CursorError::Io(e.to_string()))?;
    if segs.is_empty() && !journal.is_dir() {
        // Not "entries are no longer here": the whole directory is gone
        // (removed or moved under the running node).
        return Err(CursorError::Io(format!(
            "the journal directory {} is missing",
            journal.display()
        )));
    }
    let first = segs
        .first()
        .map_or(durable.saturating_add(1), |s| s.header.first_lsn);
    if lsn < first {
        return Err(CursorError::Unavailable { oldest: first });
    }
    let seg = segs
        .iter()
        .rev()
        .find(|s| s.header.first_lsn <= lsn)
        .ok_or(CursorError::Unavailable { oldest: first })?;
    Ok((seg.path.clone(), seg.header.first_lsn))
}

/// The segment that starts exactly at `lsn`, if any.
fn next_segment(journal: &Path, lsn: u64) -> Result<Option<PathBuf>, CursorError> {
    let (segs, _) = list_segments(journal).map_err(|e| CursorError::Io(e.to_string()))?;
    Ok(segs
        .into_iter()
        .find(|s| s.header.first_lsn == lsn)
        .map(|s| s.path))
}

struct Open {
    path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
}

fn open_at(path: &Path, offset: u64) -> Result<Open, CursorError> {
    let mut f = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            // Dropped since it was listed: treat as a cursor miss upstream.
            CursorError::Io(format!("{} is gone", path.display()))
        } else {
            io(path)(e)
        }
    })?;
    f.seek(SeekFrom::Start(offset)).map_err(io(path))?;
    Ok(Open {
        path: path.to_owned(),
        reader: BufReader::with_capacity(256 * 1024, f),
        offset,
    })
}

/// How much a read may return: at most `entries` frames and about `bytes`
/// bytes, each frame counted as its length plus `overhead` (what it costs
/// beyond its bytes where it goes, e.g. a network message's framing). At
/// least one frame is returned when one is due.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub entries: usize,
    pub bytes: usize,
    pub overhead: usize,
}

/// Reads frames from `from` within `limits`, never past `durable`.
pub fn read(
    journal: &Path,
    cursor: Option<Cursor>,
    from: u64,
    durable: u64,
    limits: Limits,
) -> Result<(Vec<OwnedFrame>, Option<Cursor>), CursorError> {
    let Limits {
        entries: max_entries,
        bytes: max_bytes,
        overhead,
    } = limits;
    if from > durable || max_entries == 0 || from == 0 {
        return Ok((Vec::new(), cursor));
    }
    let mut seg = match cursor.filter(|c| c.next_lsn == from && c.path.exists()) {
        Some(c) => open_at(&c.path, c.offset)?,
        None => {
            let (path, _) = locate(journal, from, durable)?;
            open_at(&path, HEADER_LEN as u64)?
        }
    };
    let mut out: Vec<OwnedFrame> = Vec::new();
    let mut bytes = 0usize;
    let mut expected: Option<u64> = None;
    let mut head = [0u8; FRAME_HEADER_LEN];
    loop {
        let next = expected.unwrap_or(from);
        if next > durable || out.len() >= max_entries {
            break;
        }
        let at = seg.offset;
        let ended = match seg.reader.read_exact(&mut head) {
            // Zeroed blocks ahead of the writer end a segment like its end
            // of file does.
            Ok(()) => is_zero_header(&head),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => true,
            Err(e) => return Err(io(&seg.path)(e)),
        };
        if ended {
            // This segment ends here; the next one starts at `next`.
            match next_segment(journal, next)? {
                Some(p) if p != seg.path => {
                    seg = open_at(&p, HEADER_LEN as u64)?;
                    continue;
                }
                _ => {
                    return Err(corrupt(
                        &seg.path,
                        at,
                        format!("ends before durable entry {next} and no segment starts there"),
                    ));
                }
            }
        }
        let h = decode_frame_header(&head).map_err(|e| corrupt(&seg.path, at, e.to_string()))?;
        let total = FRAME_HEADER_LEN + h.len as usize;
        if h.lsn < from && expected.is_none() {
            // Before the start: skip the payload unread.
            seg.reader
                .seek_relative(i64::from(h.len))
                .map_err(io(&seg.path))?;
            seg.offset += total as u64;
            continue;
        }
        if h.lsn != next {
            return Err(corrupt(
                &seg.path,
                at,
                format!("expected entry {next}, found {}", h.lsn),
            ));
        }
        let wire = total + overhead;
        if !out.is_empty() && bytes + wire > max_bytes {
            // Leave it for the next read: the cursor points at it.
            seg.offset = at;
            break;
        }
        let mut frame = Vec::with_capacity(total);
        frame.extend_from_slice(&head);
        frame.resize(total, 0);
        seg.reader
            .read_exact(&mut frame[FRAME_HEADER_LEN..])
            .map_err(|e| corrupt(&seg.path, at, format!("short frame: {e}")))?;
        let header = decode_frame(&frame)
            .map_err(|e| corrupt(&seg.path, at, e.to_string()))?
            .header;
        seg.offset += total as u64;
        bytes += wire;
        expected = Some(h.lsn + 1);
        out.push(OwnedFrame {
            header,
            bytes: frame,
        });
    }
    let cursor = Some(Cursor {
        next_lsn: expected.unwrap_or(from),
        path: seg.path,
        offset: seg.offset,
    });
    Ok((out, cursor))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineConfig};
    use crate::model::{SessionId, WriteOp};

    /// Frames counted as on the replication wire (20 bytes of framing).
    fn lim(entries: usize, bytes: usize) -> Limits {
        Limits {
            entries,
            bytes,
            overhead: 20,
        }
    }

    fn put(key: String, n: usize) -> WriteOp {
        WriteOp::Put {
            table: "t".into(),
            key,
            value: format!("\"{}\"", "x".repeat(n)).into_bytes(),
            if_version: None,
        }
    }

    #[test]
    fn cursor_reads_match_the_engine_across_segments_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        rt.block_on(async {
            for i in 0..300usize {
                e.write(SessionId::SYSTEM, vec![put(format!("k{i}"), i % 700)])
                    .await
                    .unwrap();
                if i % 70 == 0 {
                    e.rotate_journal().await.unwrap();
                }
            }
        });
        let durable = e.status().durable_lsn;
        let journal = e.journal_dir();
        let expected: Vec<Vec<u8>> = e
            .read_frames(1, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|f| f.bytes)
            .collect();
        assert_eq!(expected.len() as u64, durable);
        // Sequential batches with cursors, under entry and byte limits.
        for (max_entries, max_bytes) in [(7, 1 << 20), (1000, 3000), (1, 1)] {
            let mut got = Vec::new();
            let mut cursor = None;
            let mut from = 1;
            while from <= durable {
                let (batch, c) =
                    read(&journal, cursor, from, durable, lim(max_entries, max_bytes)).unwrap();
                assert!(!batch.is_empty() && batch.len() <= max_entries);
                let wire: usize = batch.iter().map(|f| f.bytes.len() + 20).sum();
                assert!(batch.len() == 1 || wire <= max_bytes);
                from = batch.last().unwrap().header.lsn + 1;
                assert_eq!(c.as_ref().unwrap().next_lsn, from);
                got.extend(batch.into_iter().map(|f| f.bytes));
                cursor = c;
            }
            assert_eq!(got, expected);
        }
        // A cold start anywhere; past the end nothing.
        for from in [1, 2, 71, 72, 150, durable] {
            let (batch, _) = read(&journal, None, from, durable, lim(3, 1 << 20)).unwrap();
            assert_eq!(batch[0].header.lsn, from);
            assert_eq!(batch[0].bytes, expected[(from - 1) as usize]);
        }
        assert!(
            read(&journal, None, durable + 1, durable, lim(3, 1 << 20))
                .unwrap()
                .0
                .is_empty()
        );
        // Dropped history is reported as unavailable.
        rt.block_on(e.flush()).unwrap();
        let dropped = e.drop_segments_upto(100).unwrap();
        assert!(!dropped.is_empty());
        assert!(matches!(
            read(&journal, None, 1, durable, lim(3, 1 << 20)),
            Err(CursorError::Unavailable { .. })
        ));
    }

    #[test]
    fn a_missing_journal_directory_is_not_reported_as_dropped_entries() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("journal");
        match read(&gone, None, 1, 10, lim(100, 1 << 20)) {
            Err(CursorError::Io(m)) => assert!(m.contains("is missing"), "{m}"),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        // An existing directory without segments: nothing there yet.
        std::fs::create_dir(&gone).unwrap();
        assert!(matches!(
            read(&gone, None, 1, 10, lim(100, 1 << 20)),
            Err(CursorError::Unavailable { oldest: 11 })
        ));
    }

    #[test]
    fn a_damaged_frame_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        rt.block_on(async {
            for i in 0..5usize {
                e.write(SessionId::SYSTEM, vec![put(format!("k{i}"), 10)])
                    .await
                    .unwrap();
            }
        });
        let durable = e.status().durable_lsn;
        let journal = e.journal_dir();
        let (segs, _) = list_segments(&journal).unwrap();
        let path = &segs[0].path;
        let mut bytes = std::fs::read(path).unwrap();
        // The last entry's end (zeroed blocks may follow).
        let n = crate::journal::scan::verify(&journal, None, false)
            .unwrap()
            .last_segment_len as usize;
        bytes[n - 3] ^= 0xff;
        std::fs::write(path, &bytes).unwrap();
        assert!(read(&journal, None, 1, durable, lim(100, 1 << 20)).is_err());
        // Garbage lengths too.
        bytes[HEADER_LEN] = 0xff;
        bytes[HEADER_LEN + 1] = 0xff;
        bytes[HEADER_LEN + 2] = 0xff;
        bytes[HEADER_LEN + 3] = 0x7f;
        std::fs::write(path, &bytes).unwrap();
        assert!(read(&journal, None, 1, durable, lim(100, 1 << 20)).is_err());
    }
}
