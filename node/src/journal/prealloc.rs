//! Zeroed blocks kept ahead of the journal's writer, so that a group
//! commit's fdatasync only writes data.
//!
//! An fdatasync after an append must also write the inode (the file grew,
//! and every few appends a block was allocated); over blocks that already
//! hold written zeros it writes the data alone. On ext4 that is about a
//! third less per durable write (`bench/run.sh` measures both). PostgreSQL
//! zero-fills its WAL segments for the same reason. `fallocate` would not
//! do: its unwritten extents need a metadata commit on their first write.
//!
//! A background thread ("mirrordb-journal-prealloc") writes zeros past the
//! writer's end and fdatasyncs them, a few MiB ahead, never beyond the
//! segment's size limit. The writer and the thread write the same file at
//! different offsets, each through its own handle; one mutex orders their
//! writes, so zeros never land on a frame:
//!
//! ```text
//!   header | frames ... | zeros (zeroed_end) ........ | (not yet allocated)
//!                       ^ written_end                 ^ zeroed_end
//! writer:  writes at written_end under the lock, may pass zeroed_end
//! thread:  writes zeros at max(zeroed_end, written_end) under the lock
//! ```
//!
//! Correctness never depends on the thread: the writer's own fdatasync makes
//! its frames and whatever metadata they need durable. Readers treat an
//! all-zero frame header as the end of a segment ([`crate::journal::scan`]).
//! After a rotation the thread also truncates the closed segment to its
//! frames, off the writer's path: on ext4 freeing the zeroed blocks took
//! 2–3 ms, most of a backup barrier, and no write was answered meanwhile.
//! A crash before the trim leaves a closed segment ending in zeros, which
//! readers stop at and recovery trims. A failure to preallocate is logged
//! once and preallocation stops for that segment; the journal goes on
//! appending.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Zeros kept ahead of the writer once a top-up starts.
const WINDOW: u64 = 8 << 20;
/// A top-up starts when fewer zeroed bytes than this are left ahead.
const LOW_WATER: u64 = 4 << 20;
/// Bytes of zeros per write (the lock is held for one such write).
const CHUNK: u64 = 1 << 20;

/// Where the open segment stands.
#[derive(Debug)]
struct State {
    path: PathBuf,
    /// Changes with every segment, so the thread reopens its handle.
    generation: u64,
    /// End of the writer's frames.
    written_end: u64,
    /// End of the file as the two writers left it (zeros or frames).
    zeroed_end: u64,
    /// Never preallocate beyond this offset (the segment size limit).
    limit: u64,
    /// No segment to extend (between a rotation's two halves, or failed).
    parked: bool,
    /// The segment a rotation is closing: trimmed once the next one is
    /// open, so that the trim's metadata commit does not delay the
    /// rotation's own fsyncs.
    closing: Option<Trim>,
    /// Closed segments to cut back to their frames.
    trims: Vec<Trim>,
    stop: bool,
}

/// A closed segment whose zeros after its frames are still to be removed.
#[derive(Debug)]
struct Trim {
    path: PathBuf,
    /// Opened at the rotation: whatever later happens to the path (the
    /// segment archived and removed), the trim reaches this file only.
    file: File,
    /// Where its frames end.
    len: u64,
}

impl State {
    fn wants_more(&self, ahead: u64) -> bool {
        !self.parked
            && self.zeroed_end < self.limit
            && self.zeroed_end.saturating_sub(self.written_end) < ahead
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The journal writer's side of the preallocating thread.
pub struct Preallocator {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Preallocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preallocator")
            .field("state", &*self.shared.lock())
            .finish()
    }
}

impl Preallocator {
    /// Starts preallocating `path`, whose frames end at `written_end` and
    /// whose file is `file_len` bytes long, up to `limit`.
    pub fn start(
        path: &Path,
        written_end: u64,
        file_len: u64,
        limit: u64,
    ) -> io::Result<Preallocator> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                path: path.to_owned(),
                generation: 0,
                written_end,
                zeroed_end: file_len.max(written_end),
                limit,
                parked: false,
                closing: None,
                trims: Vec::new(),
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mirrordb-journal-prealloc".into())
            .spawn(move || run(&s))?;
        Ok(Preallocator {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs the writer's write `f`, which writes `[written_end, new_end)`,
    /// so that no zeros can land on it, and wakes the thread if the zeros
    /// ahead run low.
    pub fn write<T>(&self, new_end: u64, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let mut st = self.shared.lock();
        let out = f();
        if out.is_ok() {
            st.written_end = new_end;
            st.zeroed_end = st.zeroed_end.max(new_end);
        } else {
            // The file's tail is unknown now: leave it alone.
            st.parked = true;
        }
        let wake = st.wants_more(LOW_WATER);
        drop(st);
        if wake {
            self.shared.wake.notify_one();
        }
        out
    }

    /// First half of a rotation: stops extending the open segment, whose
    /// frames end at `len`, to have the thread truncate it there after the
    /// second half (no zeros are being written once this returns). If the
    /// segment cannot be opened for that, it keeps its zeros: readers stop
    /// at them and the next start trims them.
    pub fn close_segment(&self, len: u64) {
        let mut st = self.shared.lock();
        st.parked = true;
        match OpenOptions::new().write(true).open(&st.path) {
            Ok(file) => {
                let path = st.path.clone();
                st.closing = Some(Trim { path, file, len });
            }
            Err(e) => tracing::warn!(
                path = %st.path.display(),
                error = %e,
                "could not open the closed journal segment to trim its zeroed blocks; the next start trims them"
            ),
        }
    }

    /// Second half of a rotation: preallocates the new segment `path`
    /// (same size limit) and trims the closed one.
    pub fn open_segment(&self, path: &Path, written_end: u64) {
        let mut st = self.shared.lock();
        if let Some(t) = st.closing.take() {
            st.trims.push(t);
        }
        st.path = path.to_owned();
        st.generation += 1;
        st.written_end = written_end;
        st.zeroed_end = written_end;
        st.parked = false;
        drop(st);
        self.shared.wake.notify_one();
    }
}

impl Drop for Preallocator {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            // At most one chunk and one fdatasync are in flight.
            let _ = t.join();
        }
    }
}

/// The thread: waits until the zeros ahead run low, tops them up to
/// [`WINDOW`] chunk by chunk, then fdatasyncs them; then trims the
/// segments closed meanwhile (those still waiting when it stops, too).
fn run(shared: &Shared) {
    let mut file: Option<(u64, File)> = None;
    loop {
        let mut st = shared.lock();
        while !st.stop && st.trims.is_empty() && !st.wants_more(LOW_WATER) {
            st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.stop {
            let mut trims = std::mem::take(&mut st.trims);
            trims.extend(st.closing.take());
            drop(st);
            trim(trims);
            return;
        }
        let mut wrote = false;
        while !st.stop && st.wants_more(WINDOW) {
            if file.as_ref().is_none_or(|(g, _)| *g != st.generation) {
                match OpenOptions::new().write(true).open(&st.path) {
                    Ok(f) => file = Some((st.generation, f)),
                    Err(e) => {
                        give_up(&mut st, "open", &e);
                        break;
                    }
                }
            }
            let Some((_, f)) = file.as_ref() else { break };
            let at = st.zeroed_end;
            let len = CHUNK.min(st.limit - at);
            if let Err(e) = write_zeros(f, at, len) {
                give_up(&mut st, "write zeros to", &e);
                break;
            }
            st.zeroed_end = at + len;
            wrote = true;
            // Let the writer in between chunks.
            drop(st);
            st = shared.lock();
        }
        let generation = st.generation;
        drop(st);
        if wrote
            && let Some((g, f)) = file.as_ref()
            && let Err(e) = f.sync_data()
        {
            let mut st = shared.lock();
            if *g == generation {
                give_up(&mut st, "sync zeros of", &e);
            }
        }
        let trims = std::mem::take(&mut shared.lock().trims);
        trim(trims);
    }
}

/// Truncates closed segments to their frames, durably; never makes one
/// longer (a file already at or under its frames' end is left alone). A
/// failure costs nothing but the space: the zeros stay, and the next start
/// trims them.
fn trim(trims: Vec<Trim>) {
    for t in trims {
        let cut = |f: &File| -> io::Result<()> {
            if f.metadata()?.len() > t.len {
                f.set_len(t.len)?;
                f.sync_all()?;
            }
            Ok(())
        };
        if let Err(e) = cut(&t.file) {
            tracing::warn!(
                path = %t.path.display(),
                error = %e,
                "could not trim the zeroed blocks of a closed journal segment; the next start trims them"
            );
        }
    }
}

fn write_zeros(f: &File, at: u64, len: u64) -> io::Result<()> {
    static ZEROS: [u8; CHUNK as usize] = [0; CHUNK as usize];
    let len = usize::try_from(len).unwrap_or(ZEROS.len()).min(ZEROS.len());
    f.write_all_at(&ZEROS[..len], at)
}

fn give_up(st: &mut State, what: &str, e: &io::Error) {
    tracing::warn!(
        path = %st.path.display(),
        error = %e,
        "could not {what} the journal segment to preallocate it; it grows by appending until the next rotation"
    );
    st.parked = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_for(p: &Preallocator, cond: impl Fn(&State) -> bool) {
        let start = Instant::now();
        while !cond(&p.shared.lock()) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "preallocation did not get there: {p:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn zeros_stay_ahead_of_the_writer_and_never_cover_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        std::fs::write(&path, b"head").unwrap();
        let limit = 14 << 20;
        let p = Preallocator::start(&path, 4, 4, limit).unwrap();
        wait_for(&p, |s| s.zeroed_end >= 4 + WINDOW);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let mut end = 4u64;
        let mut written = Vec::new();
        // Write past the window so the thread has to top up behind us.
        for i in 0u32..300 {
            let frame = vec![(i % 251) as u8 | 1; 40_000];
            let new_end = end + frame.len() as u64;
            p.write(new_end, || f.write_all_at(&frame, end)).unwrap();
            written.push((end, frame));
            end = new_end;
        }
        wait_for(&p, |s| s.zeroed_end == limit);
        drop(p);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            bytes.len() as u64,
            limit,
            "zeroed up to the limit, no further"
        );
        for (at, frame) in &written {
            let at = *at as usize;
            assert_eq!(
                &bytes[at..at + frame.len()],
                &frame[..],
                "frame at {at} intact"
            );
        }
        assert!(bytes[end as usize..].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_closed_segment_is_left_alone_and_the_next_one_preallocated() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"aaaa").unwrap();
        std::fs::write(&b, b"bbbb").unwrap();
        let p = Preallocator::start(&a, 4, 4, 3 << 20).unwrap();
        wait_for(&p, |s| s.zeroed_end == 3 << 20);
        p.close_segment(4);
        p.open_segment(&b, 4);
        wait_for(&p, |s| s.zeroed_end == 3 << 20);
        wait_for(&p, |_| std::fs::metadata(&a).unwrap().len() == 4);
        drop(p);
        assert_eq!(std::fs::read(&a).unwrap(), b"aaaa", "trimmed to its frames");
        assert_eq!(std::fs::metadata(&b).unwrap().len(), 3 << 20);
    }

    #[test]
    fn a_trim_never_makes_a_segment_longer() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"aaaa").unwrap();
        std::fs::write(&b, b"bbbb").unwrap();
        // Nothing zeroed yet (limit = its length) and a frames' end past the
        // file's: shortened by someone else meanwhile, say.
        let p = Preallocator::start(&a, 4, 4, 4).unwrap();
        p.close_segment(64);
        p.open_segment(&b, 4);
        // Dropped, the thread has done every trim asked of it.
        drop(p);
        assert_eq!(std::fs::read(&a).unwrap(), b"aaaa");
    }

    #[test]
    fn a_failed_write_stops_preallocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        std::fs::write(&path, b"head").unwrap();
        let p = Preallocator::start(&path, 4, 4, 4).unwrap();
        let err = p
            .write(10, || -> io::Result<()> { Err(io::Error::other("torn")) })
            .unwrap_err();
        assert_eq!(err.to_string(), "torn");
        assert!(p.shared.lock().parked);
        assert!(!p.shared.lock().wants_more(WINDOW));
    }
}
