//! Reading the journal back: listing segments, verifying every frame, cutting
//! a torn tail, and iterating entries from a given LSN.
//!
//! Verification walks every frame of every segment and checks the segment
//! header (magic, version, checksum, database id), each frame's checksum, that
//! LSNs are dense across segments and that epochs never go back. What happens
//! on a bad frame depends on where it is:
//!
//! ```text
//! bad frame in the last segment, nothing valid after it  -> torn tail: cut it
//! bad frame with a valid later frame, or in an older one -> corruption: refuse
//! LSN gap or epoch going back anywhere                    -> corruption: refuse
//! ```
//!
//! A tail can only be torn if it was never acknowledged: acknowledgements
//! follow a successful fdatasync, and nothing is written after a failed one.

use super::format::{self, FRAME_HEADER_LEN, FrameError, FrameHeader, HEADER_LEN, SegmentHeader};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// File name suffix of journal segments.
pub const SEGMENT_SUFFIX: &str = ".journal";

/// The file name of the segment whose first entry is `first_lsn`.
pub fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}{SEGMENT_SUFFIX}")
}

/// A segment found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFile {
    pub path: PathBuf,
    pub header: SegmentHeader,
}

/// Why the journal cannot be read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ScanError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path} belongs to database {found}, expected {expected}")]
    Foreign {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ScanError + '_ {
    move |source| ScanError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Formats a database id the way operators see it (a UUID).
pub fn db_id_string(id: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*id).to_string()
}

/// Lists the segments in `dir`, ordered by first LSN. A last segment whose
/// header is incomplete (a crash while creating it, before any entry could
/// be written) is reported in the second value, not listed.
pub fn list_segments(dir: &Path) -> Result<(Vec<SegmentFile>, Option<PathBuf>), ScanError> {
    let mut found = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for ent in rd {
        let ent = ent.map_err(io_err(dir))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        let Ok(first_lsn) = stem.parse::<u64>() else {
            continue;
        };
        found.push((first_lsn, ent.path()));
    }
    found.sort();
    let mut segments = Vec::with_capacity(found.len());
    let mut torn_header = None;
    let count = found.len();
    for (i, (first_lsn, path)) in found.into_iter().enumerate() {
        let mut f = File::open(&path).map_err(io_err(&path))?;
        let mut buf = [0u8; HEADER_LEN];
        let n = read_up_to(&mut f, &mut buf).map_err(io_err(&path))?;
        let header = match SegmentHeader::decode(&buf[..n]) {
            Ok(h) => h,
            Err(e) => {
                if i + 1 == count && (n < HEADER_LEN || matches!(e, FrameError::Crc { .. })) {
                    torn_header = Some(path);
                    continue;
                }
                return Err(ScanError::Corrupt {
                    path,
                    offset: 0,
                    reason: format!("bad segment header: {e}"),
                });
            }
        };
        if header.first_lsn != first_lsn {
            return Err(ScanError::Corrupt {
                path,
                offset: 40,
                reason: format!(
                    "header says first LSN {} but the file is named for {first_lsn}",
                    header.first_lsn
                ),
            });
        }
        segments.push(SegmentFile { path, header });
    }
    Ok((segments, torn_header))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The verified state of a journal directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalState {
    pub segments: Vec<SegmentFile>,
    /// LSN of the last valid entry (`0` if there is none).
    pub last_lsn: u64,
    /// Epoch of the last valid entry, or of the last segment if it is empty.
    pub last_epoch: u64,
    /// Byte length of the valid part of the last segment.
    pub last_segment_len: u64,
    /// LSN of the first entry still on disk (`0` if none).
    pub first_lsn: u64,
    /// If a torn tail was cut: where, how many bytes, and why.
    pub cut: Option<TailCut>,
    /// Entries verified.
    pub entries: u64,
    /// Where each epoch starts in this journal: `(epoch, first LSN)`, from
    /// segment headers and entries, in increasing order.
    pub epochs: Vec<(u64, u64)>,
}

/// A torn tail that verification removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailCut {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes_removed: u64,
    pub reason: String,
}

/// Verifies every segment in `dir` (see the module doc). With `repair`, a
/// torn tail in the last segment is truncated away (and synced) and a
/// last segment with a torn header is removed; without it they are only
/// reported. `expect_db` rejects segments of another database.
pub fn verify(
    dir: &Path,
    expect_db: Option<[u8; 16]>,
    repair: bool,
) -> Result<JournalState, ScanError> {
    let (segments, torn_header) = list_segments(dir)?;
    let mut cut = None;
    if let Some(p) = torn_header {
        let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        if repair {
            fs::remove_file(&p).map_err(io_err(&p))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        }
        cut = Some(TailCut {
            path: p,
            offset: 0,
            bytes_removed: len,
            reason: "segment header incomplete (crash while creating the segment)".into(),
        });
    }
    let mut state = JournalState {
        segments: segments.clone(),
        last_lsn: 0,
        last_epoch: 0,
        last_segment_len: 0,
        first_lsn: segments.first().map(|s| s.header.first_lsn).unwrap_or(0),
        cut,
        entries: 0,
        epochs: Vec::new(),
    };
    let count = segments.len();
    // Without an expected id, every segment must match the first one.
    let expect_db = expect_db.or_else(|| segments.first().map(|s| s.header.db_id));
    for (i, seg) in segments.iter().enumerate() {
        if let Some(db) = expect_db
            && seg.header.db_id != db
        {
            return Err(ScanError::Foreign {
                path: seg.path.clone(),
                expected: db_id_string(&db),
                found: db_id_string(&seg.header.db_id),
            });
        }
        if i > 0 && seg.header.first_lsn != state.last_lsn + 1 {
            return Err(ScanError::Corrupt {
                path: seg.path.clone(),
                offset: 40,
                reason: format!(
                    "LSN gap: previous segment ends at {} but this one starts at {}",
                    state.last_lsn, seg.header.first_lsn
                ),
            });
        }
        if seg.header.epoch < state.last_epoch {
            return Err(ScanError::Corrupt {
                path: seg.path.clone(),
                offset: 32,
                reason: format!(
                    "epoch goes back from {} to {}",
                    state.last_epoch, seg.header.epoch
                ),
            });
        }
        note_epoch(&mut state.epochs, seg.header.epoch, seg.header.first_lsn);
        state.last_epoch = seg.header.epoch;
        let is_last = i + 1 == count;
        let mut reader = SegmentReader::open(seg)?;
        let mut expected = seg.header.first_lsn;
        let bad = loop {
            let at = reader.offset;
            match reader.next_frame() {
                Ok(None) if at < reader.file_len && !zeros_from(&seg.path, at)? => {
                    break Some((at, "a zeroed entry header with data after it".to_string()));
                }
                Ok(None) => break None,
                Ok(Some(frame)) => {
                    let h = frame.header;
                    if h.lsn != expected || h.epoch < state.last_epoch {
                        return Err(ScanError::Corrupt {
                            path: seg.path.clone(),
                            offset: at,
                            reason: if h.lsn != expected {
                                format!("LSN gap: expected {expected}, found {}", h.lsn)
                            } else {
                                format!("epoch goes back from {} to {}", state.last_epoch, h.epoch)
                            },
                        });
                    }
                    expected += 1;
                    state.last_lsn = h.lsn;
                    note_epoch(&mut state.epochs, h.epoch, h.lsn);
                    state.last_epoch = h.epoch;
                    state.entries += 1;
                }
                Err(ReadFrameError::Io(e)) => return Err(io_err(&seg.path)(e)),
                Err(ReadFrameError::Bad(e)) => break Some((reader.offset, e.to_string())),
            }
        };
        let file_len = reader.file_len;
        if let Some((at, reason)) = bad {
            if !is_last || valid_frame_after(&seg.path, at, expected)? {
                return Err(ScanError::Corrupt {
                    path: seg.path.clone(),
                    offset: at,
                    reason: format!("{reason}, and valid entries follow it"),
                });
            }
            if repair {
                truncate(&seg.path, at)?;
            }
            state.cut = Some(TailCut {
                path: seg.path.clone(),
                offset: at,
                bytes_removed: file_len - at,
                reason,
            });
        } else if !is_last && reader.offset < file_len && repair {
            // Zeroed blocks after a closed segment's entries: a crash came
            // before rotation trimmed them. Nothing is lost by trimming now.
            truncate(&seg.path, reader.offset)?;
        }
        // The last segment keeps its zeroed blocks: the writer resumes over
        // them at `last_segment_len`.
        if state.first_lsn == 0 && state.entries > 0 {
            state.first_lsn = seg.header.first_lsn;
        }
        if is_last {
            state.last_segment_len = reader.offset;
        }
        if expected == seg.header.first_lsn && i + 1 < count {
            // An empty segment that is not the last one: the next must start
            // at the same LSN, which the gap check above enforces.
            state.last_lsn = seg.header.first_lsn - 1;
        }
    }
    if state.entries == 0 {
        state.first_lsn = 0;
        if let Some(last) = state.segments.last() {
            state.last_lsn = last.header.first_lsn.saturating_sub(1);
        }
    }
    Ok(state)
}

/// Truncates a segment to `len` bytes, durably.
fn truncate(path: &Path, len: u64) -> Result<(), ScanError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(len).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Whether everything from `at` to the end of the file is zero.
fn zeros_from(path: &Path, at: u64) -> Result<bool, ScanError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(at)).map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = read_up_to(&mut f, &mut buf).map_err(io_err(path))?;
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
        if n < buf.len() {
            return Ok(true);
        }
    }
}

/// Records that `epoch` starts at `lsn` if it is newer than the last one.
fn note_epoch(epochs: &mut Vec<(u64, u64)>, epoch: u64, lsn: u64) {
    if epochs.last().is_none_or(|(e, _)| epoch > *e) {
        epochs.push((epoch, lsn));
    }
}

/// Whether any frame with a valid checksum and an LSN after `expected` starts
/// anywhere after `bad_at` in the file: if so the bad frame is not a torn tail.
fn valid_frame_after(path: &Path, bad_at: u64, expected: u64) -> Result<bool, ScanError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(bad_at + 1)).map_err(io_err(path))?;
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).map_err(io_err(path))?;
    let max_lsn = expected.saturating_add(rest.len() as u64 / FRAME_HEADER_LEN as u64 + 1);
    for i in 0..rest.len().saturating_sub(FRAME_HEADER_LEN - 1) {
        let Ok(h) = format::decode_frame_header(&rest[i..]) else {
            continue;
        };
        if h.lsn < expected || h.lsn > max_lsn {
            continue;
        }
        if format::decode_frame(&rest[i..]).is_ok() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum ReadFrameError {
    Io(io::Error),
    Bad(FrameError),
}

/// An owned, verified entry frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedFrame {
    pub header: FrameHeader,
    /// The whole frame as on disk (header and payload).
    pub bytes: Vec<u8>,
}

impl OwnedFrame {
    /// The payload (the encoded operation).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[FRAME_HEADER_LEN..]
    }
}

/// Reads the frames of one segment in order.
pub struct SegmentReader {
    reader: BufReader<File>,
    offset: u64,
    file_len: u64,
}

impl SegmentReader {
    /// Opens a segment positioned at its first frame.
    pub fn open(seg: &SegmentFile) -> Result<SegmentReader, ScanError> {
        let f = File::open(&seg.path).map_err(io_err(&seg.path))?;
        let file_len = f.metadata().map_err(io_err(&seg.path))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, f);
        reader
            .seek(SeekFrom::Start(HEADER_LEN as u64))
            .map_err(io_err(&seg.path))?;
        Ok(SegmentReader {
            reader,
            offset: HEADER_LEN as u64,
            file_len,
        })
    }

    /// Byte offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next verified frame, `None` at a clean end of file or at an
    /// all-zero frame header (zeroed blocks the writer has not reached).
    pub fn next_frame(&mut self) -> Result<Option<OwnedFrame>, ReadFrameError> {
        if self.offset >= self.file_len {
            return Ok(None);
        }
        let mut head = [0u8; FRAME_HEADER_LEN];
        let n = read_up_to(&mut self.reader, &mut head).map_err(ReadFrameError::Io)?;
        if n < FRAME_HEADER_LEN {
            return Err(ReadFrameError::Bad(FrameError::Short {
                need: FRAME_HEADER_LEN,
                have: n,
            }));
        }
        if format::is_zero_header(&head) {
            // Zeroed blocks ahead of the writer: the entries end here.
            // (`verify` checks that nothing but zeros follows.)
            return Ok(None);
        }
        let h = format::decode_frame_header(&head).map_err(ReadFrameError::Bad)?;
        let total = FRAME_HEADER_LEN + h.len as usize;
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&head);
        bytes.resize(total, 0);
        let got = read_up_to(&mut self.reader, &mut bytes[FRAME_HEADER_LEN..])
            .map_err(ReadFrameError::Io)?;
        if got < h.len as usize {
            return Err(ReadFrameError::Bad(FrameError::Short {
                need: total,
                have: FRAME_HEADER_LEN + got,
            }));
        }
        let frame = format::decode_frame(&bytes).map_err(ReadFrameError::Bad)?;
        let header = frame.header;
        self.offset += total as u64;
        Ok(Some(OwnedFrame { header, bytes }))
    }
}

/// Iterates verified frames across segments, starting at a given LSN. Used by
/// replay, activity analysis and replication. It expects a journal that
/// [`verify`] accepted; anything unexpected is an error, never a panic.
pub struct EntryIter {
    segments: Vec<SegmentFile>,
    next_segment: usize,
    current: Option<SegmentReader>,
    from_lsn: u64,
    /// Stop before this LSN is exceeded (inclusive bound).
    to_lsn: u64,
    expected: Option<u64>,
}

impl EntryIter {
    /// Entries with `from_lsn <= lsn <= to_lsn`.
    pub fn new(segments: Vec<SegmentFile>, from_lsn: u64, to_lsn: u64) -> EntryIter {
        // Start at the last segment whose first LSN is <= from_lsn.
        let start = segments
            .iter()
            .rposition(|s| s.header.first_lsn <= from_lsn)
            .unwrap_or(0);
        EntryIter {
            segments,
            next_segment: start,
            current: None,
            from_lsn,
            to_lsn,
            expected: None,
        }
    }

    fn current_path(&self) -> PathBuf {
        self.next_segment
            .checked_sub(1)
            .and_then(|i| self.segments.get(i))
            .map(|s| s.path.clone())
            .unwrap_or_default()
    }
}

impl Iterator for EntryIter {
    type Item = Result<OwnedFrame, ScanError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.expected.is_some_and(|e| e > self.to_lsn) {
                // Done: never read past the bound, where a live journal may
                // hold a frame that is still being written.
                return None;
            }
            if self.current.is_none() {
                let seg = self.segments.get(self.next_segment)?;
                self.next_segment += 1;
                match SegmentReader::open(seg) {
                    Ok(r) => self.current = Some(r),
                    Err(e) => return Some(Err(e)),
                }
            }
            let reader = self.current.as_mut()?;
            let at = reader.offset();
            match reader.next_frame() {
                Ok(None) => {
                    self.current = None;
                    continue;
                }
                Ok(Some(frame)) => {
                    let lsn = frame.header.lsn;
                    if let Some(exp) = self.expected
                        && lsn != exp
                    {
                        return Some(Err(ScanError::Corrupt {
                            path: self.current_path(),
                            offset: at,
                            reason: format!("LSN gap: expected {exp}, found {lsn}"),
                        }));
                    }
                    self.expected = Some(lsn + 1);
                    if lsn > self.to_lsn {
                        self.segments.clear();
                        self.current = None;
                        return None;
                    }
                    if lsn < self.from_lsn {
                        continue;
                    }
                    return Some(Ok(frame));
                }
                Err(ReadFrameError::Io(e)) => {
                    return Some(Err(ScanError::Io {
                        path: self.current_path(),
                        source: e,
                    }));
                }
                Err(ReadFrameError::Bad(e)) => {
                    return Some(Err(ScanError::Corrupt {
                        path: self.current_path(),
                        offset: at,
                        reason: e.to_string(),
                    }));
                }
            }
        }
    }
}

/// Reads concatenated segment files (header, frames, header, frames, …) from
/// any reader: journal archives are such streams (e.g. zstd-compressed).
/// A segment header is recognised by its magic: no valid frame can start
/// with it, because its first four bytes read as a length far beyond the
/// frame limit. Items are `(header of the current segment, frame)`.
pub struct SegmentStreamReader<R: Read> {
    reader: R,
    current: Option<SegmentHeader>,
    offset: u64,
    done: bool,
}

impl<R: Read> SegmentStreamReader<R> {
    /// A reader positioned at the first segment header.
    pub fn new(reader: R) -> Self {
        SegmentStreamReader {
            reader,
            current: None,
            offset: 0,
            done: false,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn corrupt(&self, reason: String) -> ScanError {
        ScanError::Corrupt {
            path: PathBuf::from("(journal stream)"),
            offset: self.offset,
            reason,
        }
    }

    fn next_item(&mut self) -> Result<Option<(SegmentHeader, OwnedFrame)>, ScanError> {
        loop {
            let mut head = [0u8; FRAME_HEADER_LEN];
            let n = read_up_to(&mut self.reader, &mut head[..8])
                .map_err(|e| self.corrupt(e.to_string()))?;
            if n == 0 {
                return Ok(None);
            }
            if n < 8 {
                return Err(self.corrupt(format!("stream ends inside a frame ({n} bytes)")));
            }
            if head[..8] == format::SEGMENT_MAGIC {
                let mut hb = [0u8; HEADER_LEN];
                hb[..8].copy_from_slice(&head[..8]);
                let got = read_up_to(&mut self.reader, &mut hb[8..])
                    .map_err(|e| self.corrupt(e.to_string()))?;
                if got < HEADER_LEN - 8 {
                    return Err(self.corrupt("stream ends inside a segment header".into()));
                }
                let h = SegmentHeader::decode(&hb)
                    .map_err(|e| self.corrupt(format!("bad segment header: {e}")))?;
                self.offset += HEADER_LEN as u64;
                self.current = Some(h);
                continue;
            }
            let Some(seg) = self.current else {
                return Err(self.corrupt("stream does not start with a segment header".into()));
            };
            let got = read_up_to(&mut self.reader, &mut head[8..])
                .map_err(|e| self.corrupt(e.to_string()))?;
            if got < FRAME_HEADER_LEN - 8 {
                return Err(self.corrupt("stream ends inside a frame header".into()));
            }
            let h = format::decode_frame_header(&head).map_err(|e| self.corrupt(e.to_string()))?;
            let total = FRAME_HEADER_LEN + h.len as usize;
            let mut bytes = Vec::with_capacity(total);
            bytes.extend_from_slice(&head);
            bytes.resize(total, 0);
            let got = read_up_to(&mut self.reader, &mut bytes[FRAME_HEADER_LEN..])
                .map_err(|e| self.corrupt(e.to_string()))?;
            if got < h.len as usize {
                return Err(self.corrupt("stream ends inside a frame".into()));
            }
            format::decode_frame(&bytes).map_err(|e| self.corrupt(e.to_string()))?;
            self.offset += total as u64;
            return Ok(Some((seg, OwnedFrame { header: h, bytes })));
        }
    }
}

impl<R: Read> Iterator for SegmentStreamReader<R> {
    type Item = Result<(SegmentHeader, OwnedFrame), ScanError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_item() {
            Ok(Some(x)) => Some(Ok(x)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// A segment of database `[9; 16]`, epoch 1: `n` entries from `first`,
/// each with `payload`.
#[cfg(test)]
fn segment_bytes(first: u64, n: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = format::SegmentHeader {
        db_id: [9; 16],
        epoch: 1,
        first_lsn: first,
        created_us: 0,
    }
    .encode()
    .to_vec();
    for lsn in first..first + n {
        format::encode_frame(&mut b, lsn, 1, 0, payload);
    }
    b
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use proptest::prelude::*;

    fn segment(first: u64, n: u64) -> Vec<u8> {
        segment_bytes(first, n, b"x")
    }

    #[test]
    fn reads_concatenated_segments() {
        let mut s = segment(1, 3);
        s.extend(segment(4, 2));
        s.extend(segment(6, 0));
        let lsns: Vec<u64> = SegmentStreamReader::new(&s[..])
            .map(|r| r.unwrap().1.header.lsn)
            .collect();
        assert_eq!(lsns, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let s = segment(1, 3);
        let items: Vec<_> = SegmentStreamReader::new(&s[..s.len() - 3]).collect();
        assert!(items.last().unwrap().is_err());
        assert!(
            SegmentStreamReader::new(&b"not a journal at all"[..])
                .next()
                .unwrap()
                .is_err()
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            for item in SegmentStreamReader::new(&bytes[..]) {
                let _ = item;
            }
            let mut with_header = segment(1, 0);
            with_header.extend_from_slice(&bytes);
            for item in SegmentStreamReader::new(&with_header[..]) {
                let _ = item;
            }
        }
    }
}

#[cfg(test)]
mod zero_tail_tests {
    use super::*;
    use crate::journal::format::encode_frame;

    /// Writes a segment of `n` entries from `first`, then `tail`.
    fn write_segment(dir: &Path, first: u64, n: u64, tail: &[u8]) -> (PathBuf, u64) {
        let mut b = segment_bytes(first, n, b"payload");
        let end = b.len() as u64;
        b.extend_from_slice(tail);
        let path = dir.join(segment_name(first));
        fs::write(&path, &b).unwrap();
        (path, end)
    }

    fn len(p: &Path) -> u64 {
        fs::metadata(p).unwrap().len()
    }

    #[test]
    fn zeros_after_the_last_entry_are_kept_and_end_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (p, end) = write_segment(dir.path(), 1, 5, &[0; 10_000]);
        let st = verify(dir.path(), None, true).unwrap();
        assert_eq!((st.last_lsn, st.entries, st.cut), (5, 5, None));
        assert_eq!(st.last_segment_len, end);
        assert_eq!(len(&p), end + 10_000, "the writer resumes over them");
        let lsns: Vec<u64> = EntryIter::new(st.segments, 1, u64::MAX)
            .map(|f| f.unwrap().header.lsn)
            .collect();
        assert_eq!(lsns, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn zeros_with_anything_after_them_are_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut tail = vec![0u8; 10_000];
        tail[9_000] = 7;
        let (p, end) = write_segment(dir.path(), 1, 5, &tail);
        let st = verify(dir.path(), None, false).unwrap();
        let cut = st.cut.expect("reported");
        assert_eq!((cut.offset, cut.bytes_removed), (end, 10_000));
        assert!(cut.reason.contains("zeroed entry header"), "{}", cut.reason);
        assert_eq!(len(&p), end + 10_000, "only reported without repair");
        let st = verify(dir.path(), None, true).unwrap();
        assert_eq!((st.last_lsn, st.last_segment_len), (5, end));
        assert_eq!(len(&p), end, "cut: nothing stale is left to resume over");
    }

    #[test]
    fn a_valid_entry_after_zeros_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut tail = vec![0u8; 4096];
        encode_frame(&mut tail, 6, 1, 0, b"payload");
        write_segment(dir.path(), 1, 5, &tail);
        let err = verify(dir.path(), None, true).unwrap_err();
        assert!(
            matches!(&err, ScanError::Corrupt { reason, .. } if reason.contains("valid entries follow")),
            "{err}"
        );
    }

    #[test]
    fn a_closed_segment_ending_in_zeros_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let (first, end) = write_segment(dir.path(), 1, 5, &[0; 3000]);
        let (last, last_end) = write_segment(dir.path(), 6, 2, &[0; 3000]);
        let st = verify(dir.path(), None, false).unwrap();
        assert_eq!((st.last_lsn, st.cut.clone()), (7, None));
        assert_eq!(len(&first), end + 3000, "untouched without repair");
        let st = verify(dir.path(), None, true).unwrap();
        assert_eq!((st.last_lsn, st.entries, st.cut), (7, 7, None));
        assert_eq!(len(&first), end);
        assert_eq!(len(&last), last_end + 3000);
    }
}
