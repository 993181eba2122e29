//! Appending to the journal: the open segment, a buffer of encoded frames,
//! one write and one fdatasync per group-commit batch, and segment rotation.
//!
//! With [`JournalWriter::preallocate`], a background thread keeps zeroed
//! blocks ahead of the writer ([`super::prealloc`]) and, after a rotation,
//! trims the closed segment to its entries.
//!
//! Contract: `append_*` only buffers and assigns the next dense LSN;
//! `write_out` hands the buffer to the OS (written); `sync` makes everything
//! written durable. The caller acknowledges nothing before `sync` returns
//! `Ok`, and after any error it must stop using the writer (the journal is
//! then unavailable; restart recovery decides what the file holds).

use super::disk::{Disk, JournalFile};
use super::format::{self, HEADER_LEN, SegmentHeader};
use super::prealloc::Preallocator;
use super::scan::segment_name;
use crate::model::Op;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Writes the journal's open segment.
pub struct JournalWriter {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    file: Box<dyn JournalFile>,
    seg_path: PathBuf,
    seg_len: u64,
    db_id: [u8; 16],
    epoch: u64,
    next_lsn: u64,
    buf: Vec<u8>,
    segment_bytes: u64,
    written_bytes: u64,
    prealloc: Option<Preallocator>,
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl JournalWriter {
    /// Creates a new segment whose first entry will be `first_lsn`, durably
    /// (file and directory entry synced), and returns a writer on it.
    pub fn create(
        disk: Arc<dyn Disk>,
        dir: &Path,
        db_id: [u8; 16],
        epoch: u64,
        first_lsn: u64,
        segment_bytes: u64,
    ) -> io::Result<JournalWriter> {
        let (file, seg_path) = create_segment(&*disk, dir, db_id, epoch, first_lsn)?;
        Ok(JournalWriter {
            disk,
            dir: dir.to_owned(),
            file,
            seg_path,
            seg_len: HEADER_LEN as u64,
            db_id,
            epoch,
            next_lsn: first_lsn,
            buf: Vec::with_capacity(1 << 20),
            segment_bytes,
            written_bytes: 0,
            prealloc: None,
        })
    }

    /// Continues an existing segment that verification left `seg_len` bytes
    /// long, whose last entry is `last_lsn`.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        disk: Arc<dyn Disk>,
        dir: &Path,
        seg_path: &Path,
        seg_len: u64,
        db_id: [u8; 16],
        epoch: u64,
        last_lsn: u64,
        segment_bytes: u64,
    ) -> io::Result<JournalWriter> {
        let file = disk.open_at(seg_path, seg_len)?;
        Ok(JournalWriter {
            disk,
            dir: dir.to_owned(),
            file,
            seg_path: seg_path.to_owned(),
            seg_len,
            db_id,
            epoch,
            next_lsn: last_lsn + 1,
            buf: Vec::with_capacity(1 << 20),
            segment_bytes,
            written_bytes: 0,
            prealloc: None,
        })
    }

    /// From now on keeps zeroed blocks ahead of the writer, up to the
    /// segment size, so that a group commit's fdatasync writes no metadata
    /// ([`super::prealloc`]). Starts a thread; does nothing if running.
    pub fn preallocate(&mut self) -> io::Result<()> {
        if self.prealloc.is_none() {
            let file_len = std::fs::metadata(&self.seg_path)?.len();
            self.prealloc = Some(Preallocator::start(
                &self.seg_path,
                self.seg_len,
                file_len,
                self.segment_bytes,
            )?);
        }
        Ok(())
    }

    /// The LSN the next entry gets.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// The LSN of the last entry appended (buffered or not).
    pub fn last_lsn(&self) -> u64 {
        self.next_lsn - 1
    }

    /// The epoch stamped on new entries.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The database id in every segment header.
    pub fn db_id(&self) -> [u8; 16] {
        self.db_id
    }

    /// The open segment's path.
    pub fn segment_path(&self) -> &Path {
        &self.seg_path
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes handed to the OS since the writer was opened.
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes
    }

    /// Buffered bytes not yet written.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Buffers an operation as the next entry; returns its LSN.
    pub fn append(&mut self, op: &Op, time_us: u64) -> u64 {
        let payload = format::encode_op(op);
        self.append_payload(&payload, time_us)
    }

    /// Buffers an already-encoded payload as the next entry; returns its LSN.
    pub fn append_payload(&mut self, payload: &[u8], time_us: u64) -> u64 {
        let lsn = self.next_lsn;
        format::encode_frame(&mut self.buf, lsn, self.epoch, time_us, payload);
        self.next_lsn += 1;
        lsn
    }

    /// Buffers an entry frame received from a primary, byte for byte. The
    /// caller has verified the frame and that `lsn` is the next LSN.
    pub fn append_frame(&mut self, lsn: u64, frame: &[u8]) {
        debug_assert_eq!(lsn, self.next_lsn, "replicated frames arrive densely");
        self.buf.extend_from_slice(frame);
        self.next_lsn = lsn + 1;
    }

    /// Writes the buffered frames to the segment (not yet durable).
    pub fn write_out(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let end = self.seg_len + self.buf.len() as u64;
        let (file, buf) = (&mut self.file, &self.buf);
        match &self.prealloc {
            Some(p) => p.write(end, || file.write_all(buf))?,
            None => file.write_all(buf)?,
        }
        self.seg_len = end;
        self.written_bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Makes everything written durable (one fdatasync).
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Whether the open segment holds no entry yet.
    pub fn segment_is_empty(&self) -> bool {
        self.seg_len == HEADER_LEN as u64 && self.buf.is_empty()
    }

    /// Whether the open segment has reached its size limit.
    pub fn wants_rotation(&self) -> bool {
        self.seg_len >= self.segment_bytes
    }

    /// Closes the open segment and starts a new one at the next LSN. The
    /// buffer must be empty (written and synced). Returns the closed path.
    pub fn rotate(&mut self) -> io::Result<PathBuf> {
        debug_assert!(self.buf.is_empty(), "rotate after write_out and sync");
        if let Some(p) = &self.prealloc {
            // Its zeroed blocks are trimmed by the preallocating thread,
            // off the writer's path.
            p.close_segment(self.seg_len);
        }
        self.file.sync_data()?;
        let (file, path) = create_segment(
            &*self.disk,
            &self.dir,
            self.db_id,
            self.epoch,
            self.next_lsn,
        )?;
        let closed = std::mem::replace(&mut self.seg_path, path);
        self.file = file;
        self.seg_len = HEADER_LEN as u64;
        if let Some(p) = &self.prealloc {
            p.open_segment(&self.seg_path, self.seg_len);
        }
        Ok(closed)
    }

    /// Changes the epoch stamped on entries from now on.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }
}

fn create_segment(
    disk: &dyn Disk,
    dir: &Path,
    db_id: [u8; 16],
    epoch: u64,
    first_lsn: u64,
) -> io::Result<(Box<dyn JournalFile>, PathBuf)> {
    let path = dir.join(segment_name(first_lsn));
    let header = SegmentHeader {
        db_id,
        epoch,
        first_lsn,
        created_us: now_us(),
    };
    let mut file = disk.create(&path)?;
    file.write_all(&header.encode())?;
    file.sync_data()?;
    disk.sync_dir(dir)?;
    Ok((file, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::disk::RealDisk;
    use crate::journal::scan::{EntryIter, verify};
    use crate::model::SessionId;

    fn op(i: u64) -> Op {
        Op::Put {
            session: SessionId(1),
            table: "t".into(),
            key: format!("k{i}"),
            value: b"1".to_vec(),
        }
    }

    #[test]
    fn appends_rotate_and_read_back_densely() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            JournalWriter::create(Arc::new(RealDisk), dir.path(), [3; 16], 1, 1, 200).unwrap();
        for i in 1..=10 {
            assert_eq!(w.append(&op(i), i), i);
            w.write_out().unwrap();
            w.sync().unwrap();
            if w.wants_rotation() {
                w.rotate().unwrap();
            }
        }
        let st = verify(dir.path(), Some([3; 16]), false).unwrap();
        assert!(st.segments.len() > 1, "small segment size forces rotation");
        assert_eq!((st.first_lsn, st.last_lsn, st.entries), (1, 10, 10));
        let lsns: Vec<u64> = EntryIter::new(st.segments, 4, 8)
            .map(|f| f.unwrap().header.lsn)
            .collect();
        assert_eq!(lsns, vec![4, 5, 6, 7, 8]);
    }

    /// Resumes the last segment of `dir` where verification left it.
    fn resume_last(disk: Arc<dyn Disk>, dir: &Path, epoch: u64, seg_bytes: u64) -> JournalWriter {
        let st = verify(dir, None, false).unwrap();
        let last = st.segments.last().unwrap().path.clone();
        JournalWriter::resume(
            disk,
            dir,
            &last,
            st.last_segment_len,
            [3; 16],
            epoch,
            st.last_lsn,
            seg_bytes,
        )
        .unwrap()
    }

    /// Waits until the open segment's file is longer than its entries.
    fn wait_for_zeros(w: &JournalWriter) {
        let start = std::time::Instant::now();
        while std::fs::metadata(w.segment_path()).unwrap().len() <= w.seg_len {
            assert!(start.elapsed() < std::time::Duration::from_secs(20));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn preallocated_segments_end_at_their_entries_when_closed_and_resume_over_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let disk: Arc<dyn Disk> = Arc::new(RealDisk);
        let seg_bytes = 4096;
        let mut w =
            JournalWriter::create(disk.clone(), dir.path(), [3; 16], 1, 1, seg_bytes).unwrap();
        w.preallocate().unwrap();
        let mut lsn = 0;
        let mut closed = Vec::new();
        while closed.len() < 3 {
            lsn += 1;
            w.append(&op(lsn), lsn);
            w.write_out().unwrap();
            w.sync().unwrap();
            if lsn % 7 == 0 {
                wait_for_zeros(&w);
            }
            if w.wants_rotation() {
                let len = w.seg_len;
                let path = w.rotate().unwrap();
                closed.push((path, len));
            }
        }
        lsn += 1;
        w.append(&op(lsn), lsn);
        w.write_out().unwrap();
        w.sync().unwrap();
        wait_for_zeros(&w);
        let entries_end = w.seg_len;
        // Dropped, the writer's thread has trimmed every closed segment
        // (before the verify below, which would trim them itself).
        drop(w);
        for (path, len) in &closed {
            let found = std::fs::metadata(path).unwrap().len();
            assert_eq!(found, *len, "{} trimmed to its entries", path.display());
        }
        let st = verify(dir.path(), Some([3; 16]), true).unwrap();
        assert_eq!((st.last_lsn, st.entries, st.cut.clone()), (lsn, lsn, None));
        assert_eq!(st.last_segment_len, entries_end);
        let last = st.segments.last().unwrap().path.clone();
        assert_eq!(
            std::fs::metadata(&last).unwrap().len(),
            seg_bytes,
            "the open segment keeps its zeros up to the segment size"
        );
        // Resume over the zeros: the next entry lands right after the last.
        let mut w = resume_last(disk, dir.path(), 1, seg_bytes);
        w.preallocate().unwrap();
        w.append(&op(lsn + 1), lsn + 1);
        w.write_out().unwrap();
        w.sync().unwrap();
        drop(w);
        let st = verify(dir.path(), Some([3; 16]), false).unwrap();
        assert_eq!((st.last_lsn, st.cut), (lsn + 1, None));
        let all: Vec<u64> = EntryIter::new(st.segments, 1, u64::MAX)
            .map(|f| f.unwrap().header.lsn)
            .collect();
        assert_eq!(all, (1..=lsn + 1).collect::<Vec<_>>());
    }

    #[test]
    fn resume_continues_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let disk: Arc<dyn Disk> = Arc::new(RealDisk);
        let mut w =
            JournalWriter::create(disk.clone(), dir.path(), [3; 16], 2, 1, 1 << 20).unwrap();
        w.append(&op(1), 1);
        w.write_out().unwrap();
        w.sync().unwrap();
        let mut w = resume_last(disk, dir.path(), 2, 1 << 20);
        assert_eq!(w.append(&op(2), 2), 2);
        w.write_out().unwrap();
        w.sync().unwrap();
        let st = verify(dir.path(), None, false).unwrap();
        assert_eq!((st.last_lsn, st.last_epoch), (2, 2));
    }
}
