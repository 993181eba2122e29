//! The small disk interface the journal writes through, so tests can fail an
//! fsync, tear a write or fill the disk (DESIGN §9, STYLE 3).
//!
//! Contract: `write_all` returning `Ok` means the bytes are in the OS cache
//! only ("written"); they are durable only after `sync_data` returns `Ok`
//! ("durable"). After any error from either, the journal must treat the file's
//! tail as unknown: it never retries an fsync and never acknowledges anything
//! written since the last successful `sync_data`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A journal file open for writing at a position that each write advances
/// (not `O_APPEND`: the segment may hold zeroed blocks past that position,
/// see [`crate::journal::prealloc`]).
pub trait JournalFile: Send {
    /// Writes `buf` at the current position (written, not durable).
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes everything written so far durable (fdatasync).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Truncates or extends the file to `len` bytes (not durable until the
    /// next `sync_data`).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// Opens journal files and syncs directories.
pub trait Disk: Send + Sync {
    /// Creates a new file (fails if it exists), positioned at its start.
    fn create(&self, path: &Path) -> io::Result<Box<dyn JournalFile>>;
    /// Opens an existing file positioned at byte `offset`.
    fn open_at(&self, path: &Path, offset: u64) -> io::Result<Box<dyn JournalFile>>;
    /// Makes a directory's entries (created or renamed files) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// The real disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealDisk;

struct RealFile(File);

impl JournalFile for RealFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().create_new(true).write(true).open(path)
}

fn open_at(path: &Path, offset: u64) -> io::Result<File> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    Ok(f)
}

impl Disk for RealDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn JournalFile>> {
        Ok(Box::new(RealFile(create_new(path)?)))
    }
    fn open_at(&self, path: &Path, offset: u64) -> io::Result<Box<dyn JournalFile>> {
        Ok(Box::new(RealFile(open_at(path, offset)?)))
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
}

/// What the fault-injecting disk should do next. Each fault fires once.
#[derive(Debug, Default, Clone)]
pub struct FaultPlan {
    /// The next `sync_data` fails with EIO.
    pub fail_next_sync: bool,
    /// The next write stores only its first `n` bytes, then fails with EIO.
    pub tear_next_write_at: Option<usize>,
    /// Writes may store this many more bytes in total; past that they store
    /// what fits and fail with ENOSPC.
    pub space_left: Option<u64>,
}

/// A disk that does real I/O but injects the faults of a shared [`FaultPlan`].
#[derive(Debug, Default, Clone)]
pub struct FaultyDisk {
    plan: Arc<Mutex<FaultPlan>>,
}

impl FaultyDisk {
    /// A disk with no faults planned yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Changes the plan; faults apply from the next call on.
    pub fn plan(&self, f: impl FnOnce(&mut FaultPlan)) {
        let mut p = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
    }
}

struct FaultyFile {
    inner: File,
    plan: Arc<Mutex<FaultPlan>>,
}

impl JournalFile for FaultyFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = plan.tear_next_write_at.take() {
            self.inner.write_all(&buf[..at.min(buf.len())])?;
            return Err(io::Error::other("injected torn write"));
        }
        if let Some(left) = plan.space_left {
            if (buf.len() as u64) > left {
                let fits = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                self.inner.write_all(&buf[..fits])?;
                plan.space_left = Some(0);
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            plan.space_left = Some(left - buf.len() as u64);
        }
        self.inner.write_all(buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        if plan.fail_next_sync {
            plan.fail_next_sync = false;
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        self.inner.sync_data()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

impl Disk for FaultyDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn JournalFile>> {
        Ok(Box::new(FaultyFile {
            inner: create_new(path)?,
            plan: self.plan.clone(),
        }))
    }
    fn open_at(&self, path: &Path, offset: u64) -> io::Result<Box<dyn JournalFile>> {
        Ok(Box::new(FaultyFile {
            inner: open_at(path, offset)?,
            plan: self.plan.clone(),
        }))
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        RealDisk.sync_dir(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faulty_disk_tears_fails_sync_and_fills() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FaultyDisk::new();
        let path = dir.path().join("f");
        let mut f = disk.create(&path).unwrap();
        f.write_all(b"hello").unwrap();
        disk.plan(|p| p.tear_next_write_at = Some(2));
        assert!(f.write_all(b"world").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"hellowo");
        disk.plan(|p| p.fail_next_sync = true);
        assert!(f.sync_data().is_err());
        assert!(f.sync_data().is_ok(), "a planned fault fires once");
        disk.plan(|p| p.space_left = Some(3));
        let err = f.write_all(b"12345").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28));
        assert_eq!(std::fs::read(&path).unwrap(), b"hellowo123");
    }

    #[test]
    fn open_at_writes_over_what_follows_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 16]).unwrap();
        for disk in [&RealDisk as &dyn Disk, &FaultyDisk::new()] {
            let mut f = disk.open_at(&path, 4).unwrap();
            f.write_all(b"ab").unwrap();
            f.write_all(b"cd").unwrap();
            f.sync_data().unwrap();
            assert_eq!(&std::fs::read(&path).unwrap()[..10], b"\0\0\0\0abcd\0\0");
            f.set_len(6).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"\0\0\0\0ab");
            std::fs::write(&path, [0u8; 16]).unwrap();
        }
    }
}
