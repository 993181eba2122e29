//! Byte formats of the backup pipeline: the snapshot stream of a backup set
//! and the journal archive, plus the names of sets and archives and the
//! atomic-write helpers every file of the destination goes through.
//! `docs/backup-format.md` is the prose version of this module.
//!
//! ```text
//! snapshot.zst = zstd( header chunk* end trailer )
//!   header  = magic "MDBSNAP1" | version u32 | db_id [16] | lsn u64 | epoch u64 | crc32c u32   (48 bytes)
//!   chunk   = payload_len u32 | items u32 | crc32c u32 | payload        (crc over len, items, payload)
//!   payload = (item_len u32 | postcard SnapshotItem)*
//!   end     = payload_len 0 | items 0 | crc32c u32 (of the 8 zero bytes)
//!   trailer = total_items u64 | chunks u64 | crc32c u32
//!
//! ‹name›[MMMM].journal = zstd( segment file bytes, oldest first )
//!   each segment = its 64-byte header and its frames, exactly as in data/journal/
//! ```
//!
//! Readers check every checksum, bound every length before allocating, and
//! return [`FormatError`] on any damage: bytes from disk never panic.

use super::SnapshotItem;
use super::pace::Pace;
use crate::journal::format::{
    self as jformat, FRAME_HEADER_LEN, FrameError, HEADER_LEN, MAX_PAYLOAD_BYTES, SEGMENT_MAGIC,
    SegmentHeader,
};
use crate::journal::scan::OwnedFrame;
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Magic bytes at the start of a decompressed snapshot stream.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"MDBSNAP1";
/// Version of the snapshot stream layout.
pub const SNAPSHOT_VERSION: u32 = 1;
/// Length of the snapshot stream header.
pub const SNAPSHOT_HEADER_LEN: usize = 48;
/// A chunk is closed once its payload passes this many bytes.
pub const CHUNK_TARGET_BYTES: usize = 1 << 20;
/// Largest single encoded item: a maximal record plus its names.
pub const MAX_ITEM_BYTES: usize = MAX_PAYLOAD_BYTES + 64 * 1024;
/// Largest chunk payload a reader accepts (one maximal item always fits).
pub const MAX_CHUNK_BYTES: usize = CHUNK_TARGET_BYTES + MAX_ITEM_BYTES + 4;
/// Most items one chunk may claim.
pub const MAX_CHUNK_ITEMS: u32 = 1 << 24;
/// File name of the snapshot inside a set.
pub const SNAPSHOT_FILE: &str = "snapshot.zst";
/// File name of the manifest inside a set.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Directory of attached files inside a set.
pub const ATTACHED_DIR: &str = "attached";
/// Suffix of a backup set directory.
pub const SET_SUFFIX: &str = ".backup";
/// Suffix of a journal archive.
pub const ARCHIVE_SUFFIX: &str = ".journal";
/// Prefix of everything being written (removed at the next backup).
pub const TEMP_PREFIX: &str = ".tmp-";
/// Highest set number (four digits in names).
pub const MAX_NUMBER: u32 = 9999;

/// Why backup bytes could not be read or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{what} is damaged at byte {offset}: {reason}")]
    Damaged {
        what: String,
        offset: u64,
        reason: String,
    },
    #[error("{what} belongs to database {found}, expected {expected}")]
    Foreign {
        what: String,
        expected: String,
        found: String,
    },
}

impl FormatError {
    fn damaged(what: &str, offset: u64, reason: impl Into<String>) -> FormatError {
        FormatError::Damaged {
            what: what.to_owned(),
            offset,
            reason: reason.into(),
        }
    }
}

/// Wraps an `io::Error` with the path it concerns.
pub fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FormatError + '_ {
    move |source| FormatError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------- names

/// `‹name›[0007].backup`.
pub fn set_dir_name(name: &str, number: u32) -> String {
    format!("{name}[{number:04}]{SET_SUFFIX}")
}

/// `‹name›[0006].journal`.
pub fn archive_name(name: &str, number: u32) -> String {
    format!("{name}[{number:04}]{ARCHIVE_SUFFIX}")
}

/// Parses `‹name›[NNNN]‹suffix›` into its number when `name` matches.
pub fn parse_numbered(file: &str, name: &str, suffix: &str) -> Option<u32> {
    let rest = file.strip_prefix(name)?.strip_prefix('[')?;
    let digits = rest.strip_suffix(suffix)?.strip_suffix(']')?;
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

// ------------------------------------------------------- hashing writers

/// Bytes of one block: a [`SetPipe`] hands its thread whole blocks, and a
/// [`SetFile`] writes each with one direct write.
const DIRECT_BLOCK: usize = 1 << 20;
/// Alignment of direct writes (buffer address, length and file offset).
const DIRECT_ALIGN: usize = 4096;

/// A [`DIRECT_BLOCK`]-sized buffer whose window starts on a
/// [`DIRECT_ALIGN`] boundary, as `O_DIRECT` wants it.
pub struct Block {
    buf: Vec<u8>,
    /// Start of the aligned window in `buf`.
    start: usize,
    /// Bytes in the window.
    len: usize,
}

impl Block {
    fn new() -> Block {
        let buf = vec![0u8; DIRECT_BLOCK + DIRECT_ALIGN];
        // `align_offset` of a byte pointer is always below the alignment;
        // `min` keeps the window inside the buffer whatever it answers.
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Block { buf, start, len: 0 }
    }

    /// The bytes held.
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    /// Copies as much of `data` as fits; answers how much.
    fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(DIRECT_BLOCK - self.len);
        let at = self.start + self.len;
        self.buf[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    fn is_full(&self) -> bool {
        self.len == DIRECT_BLOCK
    }

    /// Whether the window may go to an `O_DIRECT` write as it is.
    fn is_aligned(&self) -> bool {
        self.is_full() && (self.buf.as_ptr() as usize + self.start).is_multiple_of(DIRECT_ALIGN)
    }
}

/// A file of a backup set (snapshot, journal archive), written with
/// `O_DIRECT` where the system allows it: the set's bytes go to the disk
/// without being copied into the page cache first. Measured under load,
/// that copy was half the compressor's CPU, taken from writers on a small
/// machine; the set is not read again soon, so caching it helps nobody.
/// Whole aligned blocks are written directly, straight from the
/// [`Block`]; anything else (the last, partial block) through an ordinary
/// descriptor at the end of what the direct writes left. Where `O_DIRECT`
/// is refused (tmpfs, other systems) it is an ordinary buffered file.
pub struct SetFile {
    file: File,
    path: PathBuf,
    direct: bool,
}

impl SetFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> io::Result<SetFile> {
        let (file, direct) = match open_direct(path) {
            Some(f) => (f, true),
            None => (File::create(path)?, false),
        };
        Ok(SetFile {
            file,
            path: path.to_owned(),
            direct,
        })
    }

    /// Appends a block's bytes.
    fn write_block(&mut self, block: &Block) -> io::Result<()> {
        if self.direct && !block.is_aligned() {
            // From here on an ordinary descriptor, at the end of what the
            // direct writes left.
            let mut f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
            f.seek(io::SeekFrom::End(0))?;
            self.file = f;
            self.direct = false;
        }
        self.file.write_all(block.bytes())
    }

    /// The file, ready to be fsynced.
    pub fn finish(self) -> File {
        self.file
    }
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// Blocks queued for a [`SetPipe`]'s thread.
const PIPE_QUEUE: usize = 4;

/// The compressed bytes of a set file, handed in [`Block`]s to a thread of
/// its own that hashes them (BLAKE3) and writes them (a [`SetFile`]) from
/// the same buffer; written blocks come back for reuse. Hashing on the
/// compressing thread was a quarter of its time, and that thread bounds
/// how fast a backup of an idle node goes (measured: 2.2 s for a 1 GiB
/// data file, the compressor busy throughout, the reader waiting on it).
pub struct SetPipe {
    tx: Option<SyncSender<Block>>,
    /// Blocks the thread has written, to be filled again.
    spare: Receiver<Block>,
    block: Block,
    bytes: u64,
    thread: Option<JoinHandle<io::Result<(File, Checksum)>>>,
}

impl SetPipe {
    /// Creates (truncates) `path` and starts the writing thread.
    pub fn create(path: &Path) -> io::Result<SetPipe> {
        let mut file = SetFile::create(path)?;
        let (tx, rx) = sync_channel::<Block>(PIPE_QUEUE);
        let (back, spare) = sync_channel::<Block>(PIPE_QUEUE + 2);
        let thread = std::thread::Builder::new()
            .name("mirrordb-backup-write".into())
            .spawn(move || -> io::Result<(File, Checksum)> {
                let mut hasher = FileHasher::new(HashKind::Blake3);
                for mut block in rx {
                    hasher.update(block.bytes());
                    file.write_block(&block)?;
                    block.len = 0;
                    // The pipe may be gone or have enough spares.
                    let _ = back.try_send(block);
                }
                Ok((file.finish(), hasher.finish()))
            })?;
        Ok(SetPipe {
            tx: Some(tx),
            spare,
            block: Block::new(),
            bytes: 0,
            thread: Some(thread),
        })
    }

    /// Bytes written into the pipe so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn send(&mut self) -> io::Result<()> {
        if self.block.len == 0 {
            return Ok(());
        }
        let next = self.spare.try_recv().unwrap_or_else(|_| Block::new());
        let block = std::mem::replace(&mut self.block, next);
        if self.tx.as_ref().is_some_and(|tx| tx.send(block).is_ok()) {
            return Ok(());
        }
        // The thread stopped early: its error says why.
        Err(self.end().err().unwrap_or_else(stopped))
    }

    /// Closes the queue and waits for the thread: the file and its hash,
    /// or why the thread stopped.
    fn end(&mut self) -> io::Result<(File, Checksum)> {
        self.tx = None;
        match self.thread.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("the set's writing thread panicked")),
            None => Err(stopped()),
        }
    }

    /// Writes what is left; answers the file (ready to be fsynced), the
    /// byte count and the checksum of the bytes.
    pub fn finish(mut self) -> io::Result<(File, u64, Checksum)> {
        self.send()?;
        let (f, sum) = self.end()?;
        Ok((f, self.bytes, sum))
    }
}

impl Write for SetPipe {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.block.fill(rest);
            rest = &rest[n..];
            if self.block.is_full() {
                self.send()?;
            }
        }
        self.bytes += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Blocks go whole; the rest waits for `finish`.
        Ok(())
    }
}

fn stopped() -> io::Error {
    io::Error::other("the set's writing thread stopped")
}

impl Drop for SetPipe {
    fn drop(&mut self) {
        // An abandoned pipe (error, stop) lets its thread end.
        let _ = self.end();
    }
}

/// Which hash a [`Checksum`] is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashKind {
    Blake3,
    Sha256,
}

/// A file's recorded checksum, named in JSON by its algorithm:
/// `"blake3": "‹hex›"` for every file this version writes (`b3sum` prints
/// the same), `"sha256": "‹hex›"` in sets written before it, which are
/// still read and checked. BLAKE3 replaced SHA-256 because hashing the
/// compressed set was an eighth of an idle backup's CPU time on a 2-core
/// machine (SHA-256 at 1.8 GB/s with the CPU's SHA extensions, BLAKE3 at
/// 4.5 GB/s on the same core; BENCHMARKS.md).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checksum {
    Blake3(String),
    Sha256(String),
}

impl Checksum {
    pub fn kind(&self) -> HashKind {
        match self {
            Checksum::Blake3(_) => HashKind::Blake3,
            Checksum::Sha256(_) => HashKind::Sha256,
        }
    }

    /// The lower-case hex digest.
    pub fn hex(&self) -> &str {
        match self {
            Checksum::Blake3(h) | Checksum::Sha256(h) => h,
        }
    }
}

impl std::fmt::Display for Checksum {
    /// `blake3:‹hex›` or `sha256:‹hex›`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.kind() {
            HashKind::Blake3 => "blake3",
            HashKind::Sha256 => "sha256",
        };
        write!(f, "{name}:{}", self.hex())
    }
}

/// An incremental hash of either kind.
pub enum FileHasher {
    Blake3(Box<blake3::Hasher>),
    Sha256(Sha256),
}

impl FileHasher {
    pub fn new(kind: HashKind) -> FileHasher {
        match kind {
            HashKind::Blake3 => FileHasher::Blake3(Box::new(blake3::Hasher::new())),
            HashKind::Sha256 => FileHasher::Sha256(Sha256::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            FileHasher::Blake3(h) => {
                h.update(data);
            }
            FileHasher::Sha256(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Checksum {
        match self {
            FileHasher::Blake3(h) => Checksum::Blake3(h.finalize().to_hex().to_string()),
            FileHasher::Sha256(h) => Checksum::Sha256(hex(&h.finalize())),
        }
    }
}

/// A reader that hashes what passes through it.
pub struct HashingReader<R: Read> {
    inner: R,
    hasher: FileHasher,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    /// Hashes with `kind`: the kind of the checksum it is to be compared
    /// with.
    pub fn new(inner: R, kind: HashKind) -> Self {
        HashingReader {
            inner,
            hasher: FileHasher::new(kind),
            bytes: 0,
        }
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reads whatever is left, then answers the byte count and checksum.
    pub fn finish(mut self) -> io::Result<(u64, Checksum)> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.read(&mut buf)?;
            if n == 0 {
                break;
            }
        }
        Ok((self.bytes, self.hasher.finish()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The size and checksum (of `kind`) of a file.
pub fn checksum_file(path: &Path, kind: HashKind) -> Result<(u64, Checksum), FormatError> {
    let mut f = File::open(path).map_err(io_at(path))?;
    let mut h = FileHasher::new(kind);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io_at(path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finish()))
}

// ------------------------------------------------------- durable writes

/// fsyncs a directory, so renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), FormatError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync,
/// rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FormatError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!("{TEMP_PREFIX}{name}-{}", std::process::id()));
    {
        let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
        f.write_all(bytes).map_err(io_at(&tmp))?;
        f.sync_all().map_err(io_at(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_at(path))?;
    sync_dir(dir)
}

// ------------------------------------------------------------ snapshot

/// The header of a snapshot stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub db_id: [u8; 16],
    /// S: the snapshot holds exactly the operations with LSN ≤ S.
    pub lsn: u64,
    pub epoch: u64,
}

impl SnapshotHeader {
    pub fn encode(&self) -> [u8; SNAPSHOT_HEADER_LEN] {
        let mut b = [0u8; SNAPSHOT_HEADER_LEN];
        b[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
        b[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        b[12..28].copy_from_slice(&self.db_id);
        b[28..36].copy_from_slice(&self.lsn.to_le_bytes());
        b[36..44].copy_from_slice(&self.epoch.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SnapshotHeader, String> {
        if b.len() < SNAPSHOT_HEADER_LEN {
            return Err(format!("header is {} bytes, need 48", b.len()));
        }
        if b[0..8] != SNAPSHOT_MAGIC {
            return Err("bad magic: not a mirrordb snapshot".into());
        }
        let version = le_u32(&b[8..12]);
        if version != SNAPSHOT_VERSION {
            return Err(format!("unsupported snapshot version {version}"));
        }
        let stored = le_u32(&b[44..48]);
        let computed = crc32c::crc32c(&b[0..44]);
        if stored != computed {
            return Err(format!(
                "header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let mut db_id = [0u8; 16];
        db_id.copy_from_slice(&b[12..28]);
        Ok(SnapshotHeader {
            db_id,
            lsn: le_u64(&b[28..36]),
            epoch: le_u64(&b[36..44]),
        })
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// One chunk as recorded in the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkInfo {
    pub items: u32,
    /// Uncompressed payload bytes.
    pub bytes: u32,
    pub crc32c: u32,
}

/// What a finished snapshot file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub items: u64,
    /// Uncompressed bytes of all chunk payloads.
    pub raw_bytes: u64,
    /// Bytes of the compressed file.
    pub file_bytes: u64,
    pub checksum: Checksum,
    pub chunks: Vec<ChunkInfo>,
    /// How long compression waited for writers ([`Pace`]).
    pub paced: Duration,
}

/// Chunks queued between the encoding thread and the compressing thread.
const COMPRESS_QUEUE_CHUNKS: usize = 4;
/// Frames the encoding thread compressed itself that may wait, beside the
/// queued chunks, for the compressing thread to write them.
const COMPRESSED_QUEUE_FRAMES: usize = 4;
/// Bytes reserved at the start of a chunk buffer for its header.
const CHUNK_HEAD_LEN: usize = 12;

/// What the compressing thread hands back: its compressor, the pipe, the
/// chunks' manifest entries and how long it waited for writers.
type Compressing = (
    zstd::bulk::Compressor<'static>,
    SetPipe,
    Vec<ChunkInfo>,
    Duration,
);

/// Asked by a [`SnapshotWriter`] whose compressor is behind: `true` puts
/// the chunk in the spool instead of waiting.
pub type Spill = Box<dyn Fn() -> bool + Send>;

/// A chunk of `items` items on its way to the compressing thread (which
/// fills in its header): in memory, or in the spool at `offset`; or a
/// chunk the encoding thread sealed and compressed itself, as `frame`, of
/// `len` bytes before compression.
enum Work {
    Chunk {
        buf: Vec<u8>,
        items: u32,
    },
    Compressed {
        frame: Vec<u8>,
        info: ChunkInfo,
        len: usize,
    },
    Spooled {
        spool: Arc<File>,
        offset: u64,
        len: usize,
        items: u32,
    },
}

/// Where [`SnapshotWriter::wait_for_room`] sends the next chunk.
enum Room {
    /// To the compressing thread, in memory.
    Queue,
    /// To the spool.
    Spool,
    /// Compressed on the caller's thread.
    Here,
}

/// Fills in a chunk buffer's header (its payload follows the header's
/// space) and answers its manifest entry.
fn seal_chunk(buf: &mut [u8], items: u32) -> ChunkInfo {
    let (head, info) = chunk_head(&buf[CHUNK_HEAD_LEN..], items);
    buf[..CHUNK_HEAD_LEN].copy_from_slice(&head);
    info
}

/// Writes a snapshot stream, compressed, into a file. Items are encoded
/// into chunks by the caller's thread; compression and writing run on a
/// thread of their own, so reading the data file and compressing overlap.
///
/// Each chunk (its header and payload, built in one buffer) is compressed
/// as a zstd frame of its own, in one call over the whole buffer: the
/// streaming encoder copied every byte into its window first and then
/// matched through its slower split-window path (together a fifth of the
/// compressing thread's samples). The file is still one zstd stream —
/// frames concatenate — so readers and `zstd -d` see the same bytes.
///
/// When [`COMPRESS_QUEUE_CHUNKS`] chunks already wait for the compressor
/// and the [`Spill`] given to [`SnapshotWriter::create_with`] says so,
/// the next chunk goes to a spool instead: an unnamed file beside the
/// snapshot file (gone when the writer is, a crash included), read back by
/// the compressing thread in its turn. The caller then reads its snapshot
/// as fast as it can and can release it long before compression ends; the
/// file written is the same.
///
/// Otherwise (an idle node, where nothing is pinned by waiting) the
/// caller's thread compresses that chunk itself rather than sleep, and
/// hands the frame over in its place in the queue: compression is the
/// slower half, so both cores then share it. The frame is the one the
/// compressing thread would have made (same level, one call over the same
/// bytes), so the file is the same either way.
pub struct SnapshotWriter {
    tx: Option<Sender<Work>>,
    /// Chunk buffers the compressor is done with, to be filled again.
    spare: Receiver<Vec<u8>>,
    /// Spare buffers taken while waiting for the compressor.
    kept: Vec<Vec<u8>>,
    /// Chunks sent to the compressing thread, and how many it has written.
    sent: u64,
    taken: Arc<AtomicU64>,
    /// Set when the writer is dropped unfinished: the thread stops at its
    /// next chunk instead of compressing what is queued.
    abandoned: Arc<AtomicBool>,
    /// In-memory chunks sent and not yet compressed.
    queued: Arc<AtomicUsize>,
    compressor: Option<JoinHandle<io::Result<Compressing>>>,
    written: Arc<AtomicU64>,
    path: PathBuf,
    spill: Option<Spill>,
    /// In-memory chunks allowed to wait ([`COMPRESS_QUEUE_CHUNKS`]).
    queue_limit: usize,
    /// Chunks compressed by the caller's thread beyond `queue_limit`
    /// ([`COMPRESSED_QUEUE_FRAMES`]; 0: it never compresses).
    frame_limit: usize,
    /// The caller's thread's compressor, made when first needed, and the
    /// level both use.
    own: Option<zstd::bulk::Compressor<'static>>,
    level: i32,
    /// Chunks compressed on the caller's thread so far.
    compressed_here: u64,
    /// Where the spool is made: beside the snapshot file.
    spool_dir: PathBuf,
    spool: Option<Arc<File>>,
    spooled: u64,
    /// The chunk being built: [`CHUNK_HEAD_LEN`] bytes for its header,
    /// then its payload.
    payload: Vec<u8>,
    items_in_chunk: u32,
    items: u64,
    raw_bytes: u64,
}

/// Compresses `src` as one zstd frame and writes it.
fn write_frame(
    zc: &mut zstd::bulk::Compressor<'static>,
    out: &mut Vec<u8>,
    pipe: &mut SetPipe,
    src: &[u8],
) -> io::Result<()> {
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(src.len()));
    zc.compress_to_buffer(src, out)?;
    pipe.write_all(out)
}

/// A buffer for a chunk (its header, [`CHUNK_TARGET_BYTES`] and the item
/// that crosses it, when items are small) or for a chunk's frame: buffers
/// serve as both, so that none has to grow.
fn chunk_buffer() -> Vec<u8> {
    let mut v = Vec::with_capacity(zstd::zstd_safe::compress_bound(
        CHUNK_HEAD_LEN + CHUNK_TARGET_BYTES + 8192,
    ));
    v.resize(CHUNK_HEAD_LEN, 0);
    v
}

/// Returns a spooled range's memory (its page cache) once it is read:
/// the spool is never read twice, and its pages need never reach the disk.
#[cfg(target_os = "linux")]
fn release_spooled(spool: &File, offset: u64, len: usize) {
    use rustix::fs::{FallocateFlags, fallocate};
    // Only memory is at stake: a file system without hole punching
    // keeps the pages until the spool is closed.
    let _ = fallocate(
        spool,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len as u64,
    );
}

#[cfg(not(target_os = "linux"))]
fn release_spooled(_spool: &File, _offset: u64, _len: usize) {}

impl SnapshotWriter {
    /// Creates `path` and writes the header.
    pub fn create(
        path: &Path,
        header: SnapshotHeader,
        level: i32,
    ) -> Result<SnapshotWriter, FormatError> {
        SnapshotWriter::create_with(path, header, level, None, Pace::off())
    }

    /// [`SnapshotWriter::create`] with a [`Spill`] (chunks the compressor
    /// has no room for go to the spool whenever it says so) and a [`Pace`]
    /// for the compressing thread (each chunk waits for it).
    pub fn create_with(
        path: &Path,
        header: SnapshotHeader,
        level: i32,
        spill: Option<Spill>,
        mut pace: Pace,
    ) -> Result<SnapshotWriter, FormatError> {
        let mut pipe = SetPipe::create(path).map_err(io_at(path))?;
        let mut zc = zstd::bulk::Compressor::new(level).map_err(io_at(path))?;
        let mut out = Vec::new();
        write_frame(&mut zc, &mut out, &mut pipe, &header.encode()).map_err(io_at(path))?;
        let (tx, rx) = channel::<Work>();
        let (back, spare) =
            sync_channel::<Vec<u8>>(COMPRESS_QUEUE_CHUNKS + COMPRESSED_QUEUE_FRAMES + 2);
        let queued = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(AtomicU64::new(pipe.bytes()));
        let (q2, w2) = (queued.clone(), written.clone());
        let taken = Arc::new(AtomicU64::new(0));
        let abandoned = Arc::new(AtomicBool::new(false));
        let (t2, a2) = (taken.clone(), abandoned.clone());
        let compressor = std::thread::Builder::new()
            .name("mirrordb-backup-zstd".into())
            .spawn(move || -> io::Result<Compressing> {
                use Ordering::Relaxed;
                use std::os::unix::fs::FileExt;
                let mut read_back = Vec::new();
                let mut chunks = Vec::new();
                for work in rx {
                    if a2.load(Relaxed) {
                        return Err(io::Error::other("the snapshot writer was abandoned"));
                    }
                    pace.wait(match &work {
                        Work::Chunk { buf, .. } => buf.len(),
                        Work::Spooled { len, .. } | Work::Compressed { len, .. } => *len,
                    });
                    match work {
                        Work::Chunk { mut buf, items } => {
                            chunks.push(seal_chunk(&mut buf, items));
                            write_frame(&mut zc, &mut out, &mut pipe, &buf)?;
                            buf.truncate(CHUNK_HEAD_LEN);
                            q2.fetch_sub(1, Relaxed);
                            let _ = back.try_send(buf);
                        }
                        Work::Spooled {
                            spool,
                            offset,
                            len,
                            items,
                        } => {
                            read_back.resize(len, 0);
                            spool.read_exact_at(&mut read_back, offset)?;
                            release_spooled(&spool, offset, len);
                            chunks.push(seal_chunk(&mut read_back, items));
                            write_frame(&mut zc, &mut out, &mut pipe, &read_back)?;
                        }
                        Work::Compressed {
                            mut frame, info, ..
                        } => {
                            chunks.push(info);
                            pipe.write_all(&frame)?;
                            q2.fetch_sub(1, Relaxed);
                            frame.clear();
                            frame.resize(CHUNK_HEAD_LEN, 0);
                            let _ = back.try_send(frame);
                        }
                    }
                    w2.store(pipe.bytes(), Relaxed);
                    t2.fetch_add(1, Relaxed);
                }
                Ok((zc, pipe, chunks, pace.waited()))
            })
            .map_err(io_at(path))?;
        Ok(SnapshotWriter {
            tx: Some(tx),
            spare,
            kept: Vec::new(),
            sent: 0,
            taken,
            abandoned,
            queued,
            compressor: Some(compressor),
            written,
            path: path.to_owned(),
            spill,
            queue_limit: COMPRESS_QUEUE_CHUNKS,
            frame_limit: COMPRESSED_QUEUE_FRAMES,
            own: None,
            level,
            compressed_here: 0,
            spool_dir: path.parent().unwrap_or(Path::new(".")).to_owned(),
            spool: None,
            spooled: 0,
            payload: chunk_buffer(),
            items_in_chunk: 0,
            items: 0,
            raw_bytes: 0,
        })
    }

    /// Compressed bytes written to the file so far.
    pub fn file_bytes(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Bytes of chunks that went to the spool so far.
    pub fn spooled_bytes(&self) -> u64 {
        self.spooled
    }

    /// Chunks the caller's thread compressed itself so far.
    pub fn compressed_here(&self) -> u64 {
        self.compressed_here
    }

    /// Items added so far.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// Appends one item.
    pub fn add(&mut self, item: &SnapshotItem) -> Result<(), FormatError> {
        let at = self.payload.len();
        self.payload.extend_from_slice(&[0u8; 4]);
        postcard::to_extend(item, std::mem::take(&mut self.payload))
            .map(|v| self.payload = v)
            .map_err(|e| FormatError::damaged("snapshot item", self.items, e.to_string()))?;
        let len = self.payload.len() - at - 4;
        if len > MAX_ITEM_BYTES {
            return Err(FormatError::damaged(
                "snapshot item",
                self.items,
                format!("item of {len} bytes exceeds the limit of {MAX_ITEM_BYTES}"),
            ));
        }
        self.payload[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
        self.items_in_chunk += 1;
        self.items += 1;
        if self.payload.len() - CHUNK_HEAD_LEN >= CHUNK_TARGET_BYTES {
            self.flush_chunk()?;
        }
        Ok(())
    }

    /// The compressing thread's result (its error, if it failed).
    fn join(&mut self) -> Result<Compressing, FormatError> {
        self.tx = None;
        let handle = self.compressor.take().ok_or_else(|| {
            FormatError::damaged(
                &self.path.display().to_string(),
                0,
                "writer already finished",
            )
        })?;
        match handle.join() {
            Ok(r) => r.map_err(io_at(&self.path)),
            Err(_) => Err(FormatError::damaged(
                &self.path.display().to_string(),
                0,
                "the compressing thread panicked",
            )),
        }
    }

    fn flush_chunk(&mut self) -> Result<(), FormatError> {
        if self.items_in_chunk == 0 {
            return Ok(());
        }
        let items = self.items_in_chunk;
        self.raw_bytes += (self.payload.len() - CHUNK_HEAD_LEN) as u64;
        self.items_in_chunk = 0;
        let work = match self.wait_for_room()? {
            Room::Queue => self.in_memory(items),
            Room::Here => self.compress_here(items)?,
            Room::Spool => match self.spool_chunk(items) {
                Ok(work) => {
                    self.payload.truncate(CHUNK_HEAD_LEN);
                    work
                }
                Err(e) => {
                    // A spool is a help, not a need (a destination with room
                    // for the set may have none for it): wait instead.
                    tracing::warn!(error = %e, "backup spool unusable; the snapshot's reader waits for the compressor");
                    self.spill = None;
                    self.queue_limit = self.queue_limit.max(1);
                    match self.wait_for_room()? {
                        Room::Here => self.compress_here(items)?,
                        _ => self.in_memory(items),
                    }
                }
            },
        };
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.send(work).is_ok())
            .unwrap_or(false);
        if !sent {
            return Err(self.compressor_stopped());
        }
        self.sent += 1;
        Ok(())
    }

    /// A buffer the compressor gave back, or a new one.
    fn spare_buffer(&mut self) -> Vec<u8> {
        self.kept
            .pop()
            .or_else(|| self.spare.try_recv().ok())
            .unwrap_or_else(chunk_buffer)
    }

    /// The chunk being built, handed over in memory (counted as queued);
    /// the next one starts in a spare buffer.
    fn in_memory(&mut self, items: u32) -> Work {
        let next = self.spare_buffer();
        self.queued.fetch_add(1, Ordering::Relaxed);
        Work::Chunk {
            buf: std::mem::replace(&mut self.payload, next),
            items,
        }
    }

    /// The chunk being built, sealed and compressed on this thread (counted
    /// as queued until written); its buffer starts the next chunk.
    fn compress_here(&mut self, items: u32) -> Result<Work, FormatError> {
        let info = seal_chunk(&mut self.payload, items);
        let mut frame = self.spare_buffer();
        let zc = match &mut self.own {
            Some(zc) => zc,
            None => self
                .own
                .insert(zstd::bulk::Compressor::new(self.level).map_err(io_at(&self.path))?),
        };
        frame.clear();
        frame.reserve(zstd::zstd_safe::compress_bound(self.payload.len()));
        zc.compress_to_buffer(&self.payload, &mut frame)
            .map_err(io_at(&self.path))?;
        let len = self.payload.len();
        self.payload.truncate(CHUNK_HEAD_LEN);
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.compressed_here += 1;
        Ok(Work::Compressed { frame, info, len })
    }

    /// Waits up to `limit` for the compressing thread to have written
    /// every chunk added so far; answers whether it has. (The caller of a
    /// writer whose chunks went to the spool can report progress and
    /// honour a stop while compression catches up.)
    pub fn wait_compressed(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            let done = self.taken.load(Ordering::Relaxed) >= self.sent;
            if done || self.compressor.as_ref().is_none_or(|h| h.is_finished()) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the compressor has room for one more chunk in memory,
    /// unless the spill option says to spool it, or this thread can
    /// compress it while the compressor is behind (see [`SnapshotWriter`]).
    fn wait_for_room(&mut self) -> Result<Room, FormatError> {
        use Ordering::Relaxed;
        loop {
            let queued = self.queued.load(Relaxed);
            if queued < self.queue_limit {
                return Ok(Room::Queue);
            }
            if self.spill.as_ref().is_some_and(|spill| spill()) {
                return Ok(Room::Spool);
            }
            if queued < self.queue_limit + self.frame_limit {
                return Ok(Room::Here);
            }
            // A returned buffer means one chunk fewer in the queue; the
            // timeout covers a buffer the compressor could not return.
            match self.spare.recv_timeout(Duration::from_millis(20)) {
                Ok(buf) => self.kept.push(buf),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.compressor_stopped());
                }
            }
        }
    }

    /// Appends the chunk being built to the spool (created the first time)
    /// and answers where it is.
    fn spool_chunk(&mut self, items: u32) -> Result<Work, FormatError> {
        use std::os::unix::fs::FileExt;
        let dir = &self.spool_dir;
        let spool = match &self.spool {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(tempfile::tempfile_in(dir).map_err(io_at(dir))?);
                self.spool = Some(s.clone());
                s
            }
        };
        let offset = self.spooled;
        spool
            .write_all_at(&self.payload, offset)
            .map_err(io_at(dir))?;
        self.spooled += self.payload.len() as u64;
        Ok(Work::Spooled {
            spool,
            offset,
            len: self.payload.len(),
            items,
        })
    }

    /// The compressing thread stopped early: its error says why.
    fn compressor_stopped(&mut self) -> FormatError {
        match self.join() {
            Err(e) => e,
            Ok(_) => FormatError::damaged(
                &self.path.display().to_string(),
                0,
                "the compressing thread stopped",
            ),
        }
    }

    /// Writes the end marker and trailer, finishes compression and fsyncs.
    pub fn finish(mut self) -> Result<SnapshotSummary, FormatError> {
        self.flush_chunk()?;
        let path = self.path.clone();
        let (mut zc, mut pipe, chunks, paced) = self.join()?;
        let mut tail = Vec::with_capacity(CHUNK_HEAD_LEN + 20);
        write_chunk(&mut tail, &[], 0).map_err(io_at(&path))?;
        let mut trailer = [0u8; 20];
        trailer[0..8].copy_from_slice(&self.items.to_le_bytes());
        trailer[8..16].copy_from_slice(&(chunks.len() as u64).to_le_bytes());
        let crc = crc32c::crc32c(&trailer[0..16]);
        trailer[16..20].copy_from_slice(&crc.to_le_bytes());
        tail.extend_from_slice(&trailer);
        write_frame(&mut zc, &mut Vec::new(), &mut pipe, &tail).map_err(io_at(&path))?;
        let (f, file_bytes, checksum) = pipe.finish().map_err(io_at(&path))?;
        f.sync_all().map_err(io_at(&path))?;
        Ok(SnapshotSummary {
            items: self.items,
            raw_bytes: self.raw_bytes,
            file_bytes,
            checksum,
            chunks,
            paced,
        })
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        // An abandoned writer (error, stop) lets its thread end, without
        // compressing what was queued.
        self.abandoned.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(h) = self.compressor.take() {
            let _ = h.join();
        }
    }
}

/// A chunk's 12-byte header and its manifest entry.
fn chunk_head(payload: &[u8], items: u32) -> ([u8; 12], ChunkInfo) {
    let mut head = [0u8; 12];
    head[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[4..8].copy_from_slice(&items.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[0..8]), payload);
    head[8..12].copy_from_slice(&crc.to_le_bytes());
    (
        head,
        ChunkInfo {
            items,
            bytes: payload.len() as u32,
            crc32c: crc,
        },
    )
}

fn write_chunk(w: &mut impl Write, payload: &[u8], items: u32) -> io::Result<ChunkInfo> {
    let (head, info) = chunk_head(payload, items);
    w.write_all(&head)?;
    w.write_all(payload)?;
    Ok(info)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
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

/// Reads a decompressed snapshot stream item by item, verifying each chunk
/// (and, when given, each chunk against the manifest's list).
pub struct SnapshotReader<R: Read> {
    r: R,
    what: String,
    header: SnapshotHeader,
    offset: u64,
    payload: Vec<u8>,
    pos: usize,
    left_in_chunk: u32,
    chunks_read: u64,
    items: u64,
    expect: Option<Vec<ChunkInfo>>,
    done: bool,
}

/// A snapshot file opened for reading (zstd-decoded).
pub type SnapshotFileReader = SnapshotReader<zstd::Decoder<'static, BufReader<File>>>;

impl SnapshotFileReader {
    /// Opens a compressed snapshot file.
    pub fn open_file(path: &Path) -> Result<SnapshotFileReader, FormatError> {
        let f = File::open(path).map_err(io_at(path))?;
        let dec = zstd::Decoder::new(f).map_err(io_at(path))?;
        SnapshotReader::new(dec, &path.display().to_string())
    }
}

impl<R: Read> SnapshotReader<R> {
    /// Reads and checks the header of an uncompressed stream.
    pub fn new(mut r: R, what: &str) -> Result<SnapshotReader<R>, FormatError> {
        let mut h = [0u8; SNAPSHOT_HEADER_LEN];
        let n =
            read_full(&mut r, &mut h).map_err(|e| FormatError::damaged(what, 0, e.to_string()))?;
        let header = SnapshotHeader::decode(&h[..n])
            .map_err(|reason| FormatError::damaged(what, 0, reason))?;
        Ok(SnapshotReader {
            r,
            what: what.to_owned(),
            header,
            offset: SNAPSHOT_HEADER_LEN as u64,
            payload: Vec::new(),
            pos: 0,
            left_in_chunk: 0,
            chunks_read: 0,
            items: 0,
            expect: None,
            done: false,
        })
    }

    /// Also checks every chunk against the manifest's list.
    pub fn expect_chunks(mut self, chunks: Vec<ChunkInfo>) -> Self {
        self.expect = Some(chunks);
        self
    }

    pub fn header(&self) -> SnapshotHeader {
        self.header
    }

    /// The underlying reader (after the end, to finish a checksum).
    pub fn into_inner(self) -> R {
        self.r
    }

    /// Items returned so far.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// Uncompressed bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn bad(&self, reason: impl Into<String>) -> FormatError {
        FormatError::damaged(&self.what, self.offset, reason)
    }

    fn read_exact_or_bad(&mut self, buf: &mut [u8], what: &str) -> Result<(), FormatError> {
        let n = read_full(&mut self.r, buf).map_err(|e| self.bad(e.to_string()))?;
        if n < buf.len() {
            return Err(self.bad(format!("stream ends inside {what}")));
        }
        self.offset += n as u64;
        Ok(())
    }

    /// Loads the next chunk; `false` at the verified end of the stream.
    fn next_chunk(&mut self) -> Result<bool, FormatError> {
        let mut head = [0u8; 12];
        self.read_exact_or_bad(&mut head, "a chunk header")?;
        let len = le_u32(&head[0..4]) as usize;
        let items = le_u32(&head[4..8]);
        let stored = le_u32(&head[8..12]);
        if len > MAX_CHUNK_BYTES || items > MAX_CHUNK_ITEMS {
            return Err(self.bad(format!(
                "chunk of {len} bytes / {items} items is out of bounds"
            )));
        }
        self.payload.clear();
        self.payload.resize(len, 0);
        let mut payload = std::mem::take(&mut self.payload);
        let r = self.read_exact_or_bad(&mut payload, "a chunk");
        self.payload = payload;
        r?;
        let computed = crc32c::crc32c_append(crc32c::crc32c(&head[0..8]), &self.payload);
        if stored != computed {
            return Err(self.bad(format!(
                "chunk {} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})",
                self.chunks_read
            )));
        }
        if len == 0 && items == 0 {
            return self.read_trailer().map(|()| false);
        }
        if let Some(expect) = &self.expect {
            let want = expect.get(self.chunks_read as usize).copied();
            let got = ChunkInfo {
                items,
                bytes: len as u32,
                crc32c: computed,
            };
            if want != Some(got) {
                return Err(self.bad(format!(
                    "chunk {} does not match the manifest ({want:?} recorded, {got:?} found)",
                    self.chunks_read
                )));
            }
        }
        self.chunks_read += 1;
        self.pos = 0;
        self.left_in_chunk = items;
        Ok(true)
    }

    fn read_trailer(&mut self) -> Result<(), FormatError> {
        let mut t = [0u8; 20];
        self.read_exact_or_bad(&mut t, "the trailer")?;
        if crc32c::crc32c(&t[0..16]) != le_u32(&t[16..20]) {
            return Err(self.bad("trailer checksum mismatch"));
        }
        let (items, chunks) = (le_u64(&t[0..8]), le_u64(&t[8..16]));
        if items != self.items || chunks != self.chunks_read {
            return Err(self.bad(format!(
                "trailer says {items} items in {chunks} chunks, read {} in {}",
                self.items, self.chunks_read
            )));
        }
        if let Some(expect) = &self.expect
            && expect.len() as u64 != chunks
        {
            return Err(self.bad(format!(
                "the manifest lists {} chunks, the file has {chunks}",
                expect.len()
            )));
        }
        let mut extra = [0u8; 1];
        if read_full(&mut self.r, &mut extra).map_err(|e| self.bad(e.to_string()))? != 0 {
            return Err(self.bad("bytes after the trailer"));
        }
        self.done = true;
        Ok(())
    }

    /// The next item, `None` after the verified end.
    pub fn next_item(&mut self) -> Result<Option<SnapshotItem>, FormatError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.left_in_chunk == 0 {
                if self.pos != self.payload.len() {
                    return Err(self.bad("chunk has bytes after its last item"));
                }
                if !self.next_chunk()? {
                    return Ok(None);
                }
                continue;
            }
            let rest = &self.payload[self.pos..];
            if rest.len() < 4 {
                return Err(self.bad("chunk ends inside an item length"));
            }
            let len = le_u32(rest) as usize;
            if len > rest.len() - 4 {
                return Err(self.bad(format!("item of {len} bytes overruns its chunk")));
            }
            let item: SnapshotItem = postcard::from_bytes(&rest[4..4 + len])
                .map_err(|e| self.bad(format!("item does not decode: {e}")))?;
            self.pos += 4 + len;
            self.left_in_chunk -= 1;
            self.items += 1;
            return Ok(Some(item));
        }
    }
}

// ------------------------------------------------------ journal archive

/// What an archive holds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArchiveSummary {
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub entries: u64,
    pub segments: u32,
    pub raw_bytes: u64,
    pub file_bytes: u64,
    #[serde(flatten)]
    pub checksum: Checksum,
}

/// Writes closed journal segments, verified frame by frame, into one
/// compressed archive file.
pub struct ArchiveWriter {
    enc: zstd::Encoder<'static, SetPipe>,
    path: PathBuf,
    db_id: [u8; 16],
    first_lsn: u64,
    last_lsn: u64,
    entries: u64,
    segments: u32,
    raw_bytes: u64,
    pace: Pace,
}

impl ArchiveWriter {
    pub fn create(path: &Path, db_id: [u8; 16], level: i32) -> Result<ArchiveWriter, FormatError> {
        ArchiveWriter::create_paced(path, db_id, level, Pace::off())
    }

    /// [`ArchiveWriter::create`] whose frames wait for `pace` before they
    /// are compressed.
    pub fn create_paced(
        path: &Path,
        db_id: [u8; 16],
        level: i32,
        pace: Pace,
    ) -> Result<ArchiveWriter, FormatError> {
        let pipe = SetPipe::create(path).map_err(io_at(path))?;
        let enc = zstd::Encoder::new(pipe, level).map_err(io_at(path))?;
        Ok(ArchiveWriter {
            enc,
            path: path.to_owned(),
            db_id,
            first_lsn: 0,
            last_lsn: 0,
            entries: 0,
            segments: 0,
            raw_bytes: 0,
            pace,
        })
    }

    /// Appends a closed segment, entries up to `upto_lsn` only; every frame
    /// is checked as it is copied, and LSNs must continue densely.
    pub fn add_segment(&mut self, seg: &Path, upto_lsn: u64) -> Result<(), FormatError> {
        let what = seg.display().to_string();
        let f = File::open(seg).map_err(io_at(seg))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut hb = [0u8; HEADER_LEN];
        let n = read_full(&mut r, &mut hb).map_err(io_at(seg))?;
        let header = SegmentHeader::decode(&hb[..n])
            .map_err(|e| FormatError::damaged(&what, 0, e.to_string()))?;
        if header.db_id != self.db_id {
            return Err(FormatError::Foreign {
                what,
                expected: crate::journal::scan::db_id_string(&self.db_id),
                found: crate::journal::scan::db_id_string(&header.db_id),
            });
        }
        if self.entries > 0 && header.first_lsn != self.last_lsn + 1 {
            return Err(FormatError::damaged(
                &what,
                40,
                format!(
                    "LSN gap: archive ends at {} but this segment starts at {}",
                    self.last_lsn, header.first_lsn
                ),
            ));
        }
        self.enc.write_all(&hb).map_err(io_at(&self.path))?;
        self.raw_bytes += HEADER_LEN as u64;
        self.segments += 1;
        let mut offset = HEADER_LEN as u64;
        let mut expected = header.first_lsn;
        let mut buf = Vec::new();
        loop {
            let mut head = [0u8; FRAME_HEADER_LEN];
            let k = read_full(&mut r, &mut head).map_err(io_at(seg))?;
            if k == 0 || jformat::is_zero_header(&head[..k]) {
                // The end, or zeroed blocks the writer never reached.
                break;
            }
            let fh = jformat::decode_frame_header(&head[..k])
                .map_err(|e| FormatError::damaged(&what, offset, e.to_string()))?;
            if fh.lsn > upto_lsn {
                break;
            }
            buf.clear();
            buf.extend_from_slice(&head);
            buf.resize(FRAME_HEADER_LEN + fh.len as usize, 0);
            let got = read_full(&mut r, &mut buf[FRAME_HEADER_LEN..]).map_err(io_at(seg))?;
            if got < fh.len as usize {
                return Err(FormatError::damaged(
                    &what,
                    offset,
                    "segment ends inside a frame",
                ));
            }
            jformat::decode_frame(&buf)
                .map_err(|e| FormatError::damaged(&what, offset, e.to_string()))?;
            if fh.lsn != expected {
                return Err(FormatError::damaged(
                    &what,
                    offset,
                    format!("LSN gap: expected {expected}, found {}", fh.lsn),
                ));
            }
            self.pace.wait(buf.len());
            self.enc.write_all(&buf).map_err(io_at(&self.path))?;
            if self.entries == 0 {
                self.first_lsn = fh.lsn;
            }
            self.entries += 1;
            self.last_lsn = fh.lsn;
            expected += 1;
            offset += buf.len() as u64;
            self.raw_bytes += buf.len() as u64;
        }
        if self.entries == 0 {
            // An empty segment still says where the chain stands.
            self.last_lsn = header.first_lsn.saturating_sub(1);
        }
        Ok(())
    }

    /// Compressed bytes so far.
    pub fn file_bytes(&self) -> u64 {
        self.enc.get_ref().bytes()
    }

    /// Finishes compression and fsyncs the file.
    pub fn finish(self) -> Result<ArchiveSummary, FormatError> {
        let path = self.path.clone();
        let pipe = self.enc.finish().map_err(io_at(&path))?;
        let (f, file_bytes, checksum) = pipe.finish().map_err(io_at(&path))?;
        f.sync_all().map_err(io_at(&path))?;
        Ok(ArchiveSummary {
            first_lsn: self.first_lsn,
            last_lsn: self.last_lsn,
            entries: self.entries,
            segments: self.segments,
            raw_bytes: self.raw_bytes,
            file_bytes,
            checksum,
        })
    }
}

/// Reads an archive (or any concatenation of segment files) as verified
/// frames: segment headers checked, frame checksums checked, LSNs dense,
/// epochs never going back, one database id throughout.
pub struct ArchiveReader<R: Read> {
    r: R,
    what: String,
    offset: u64,
    header: Option<SegmentHeader>,
    db_id: Option<[u8; 16]>,
    next_lsn: Option<u64>,
    last_epoch: u64,
    failed: bool,
}

/// A set file opened for decoding while its compressed bytes are hashed:
/// restore and verify check a file's checksum in the pass that reads it.
pub type HashedDecoder = zstd::Decoder<'static, BufReader<HashingReader<File>>>;

/// Opens `path` for decoding, hashing what is read with `kind` (the kind
/// of the checksum it is to be compared with).
pub fn open_hashed(path: &Path, kind: HashKind) -> Result<HashedDecoder, FormatError> {
    let f = File::open(path).map_err(io_at(path))?;
    zstd::Decoder::new(HashingReader::new(f, kind)).map_err(io_at(path))
}

/// Reads whatever the decoder left of the file (all of it after damage
/// stopped decoding) and answers the file's size and checksum.
pub fn finish_hashed(dec: HashedDecoder) -> io::Result<(u64, Checksum)> {
    dec.finish().into_inner().finish()
}

/// An archive file opened for reading (zstd-decoded).
pub type ArchiveFileReader = ArchiveReader<zstd::Decoder<'static, BufReader<File>>>;

impl ArchiveFileReader {
    pub fn open_file(path: &Path) -> Result<ArchiveFileReader, FormatError> {
        let f = File::open(path).map_err(io_at(path))?;
        let dec = zstd::Decoder::new(f).map_err(io_at(path))?;
        Ok(ArchiveReader::new(dec, &path.display().to_string()))
    }
}

impl<R: Read> ArchiveReader<R> {
    pub fn new(r: R, what: &str) -> ArchiveReader<R> {
        ArchiveReader {
            r,
            what: what.to_owned(),
            offset: 0,
            header: None,
            db_id: None,
            next_lsn: None,
            last_epoch: 0,
            failed: false,
        }
    }

    /// The underlying reader (after the end, to finish a checksum).
    pub fn into_inner(self) -> R {
        self.r
    }

    /// The database the archive belongs to (after the first header).
    pub fn db_id(&self) -> Option<[u8; 16]> {
        self.db_id
    }

    fn bad(&mut self, at: u64, reason: impl Into<String>) -> FormatError {
        self.failed = true;
        FormatError::damaged(&self.what, at, reason)
    }

    /// The next frame with the header of its segment; `None` at a clean end.
    pub fn next_frame(&mut self) -> Result<Option<(SegmentHeader, OwnedFrame)>, FormatError> {
        loop {
            if self.failed {
                return Ok(None);
            }
            let at = self.offset;
            let mut head = [0u8; FRAME_HEADER_LEN];
            let n = match read_full(&mut self.r, &mut head[..8]) {
                Ok(n) => n,
                Err(e) => return Err(self.bad(at, e.to_string())),
            };
            if n == 0 {
                if self.header.is_none() {
                    return Err(self.bad(at, "archive holds no segment"));
                }
                return Ok(None);
            }
            if n < 8 {
                return Err(self.bad(at, "archive ends inside a frame"));
            }
            if head[..8] == SEGMENT_MAGIC {
                let mut hb = [0u8; HEADER_LEN];
                hb[..8].copy_from_slice(&head[..8]);
                let k = read_full(&mut self.r, &mut hb[8..])
                    .map_err(|e| self.bad(at, e.to_string()))?;
                self.offset += 8 + k as u64;
                let h = match SegmentHeader::decode(&hb[..8 + k]) {
                    Ok(h) => h,
                    Err(e) => return Err(self.bad(at, format!("bad segment header: {e}"))),
                };
                if let Some(db) = self.db_id
                    && db != h.db_id
                {
                    self.failed = true;
                    return Err(FormatError::Foreign {
                        what: self.what.clone(),
                        expected: crate::journal::scan::db_id_string(&db),
                        found: crate::journal::scan::db_id_string(&h.db_id),
                    });
                }
                if let Some(next) = self.next_lsn
                    && h.first_lsn != next
                {
                    return Err(self.bad(
                        at,
                        format!(
                            "LSN gap: expected a segment starting at {next}, found {}",
                            h.first_lsn
                        ),
                    ));
                }
                if h.epoch < self.last_epoch {
                    return Err(self.bad(at, "epoch goes back"));
                }
                self.db_id = Some(h.db_id);
                self.next_lsn = Some(h.first_lsn);
                self.last_epoch = h.epoch;
                self.header = Some(h);
                continue;
            }
            let Some(seg) = self.header else {
                return Err(self.bad(at, "archive does not start with a segment header"));
            };
            let k =
                read_full(&mut self.r, &mut head[8..]).map_err(|e| self.bad(at, e.to_string()))?;
            if k < FRAME_HEADER_LEN - 8 {
                return Err(self.bad(at, "archive ends inside a frame header"));
            }
            let fh = match jformat::decode_frame_header(&head) {
                Ok(h) => h,
                Err(e) => return Err(self.bad(at, e.to_string())),
            };
            let total = FRAME_HEADER_LEN + fh.len as usize;
            let mut bytes = Vec::with_capacity(total);
            bytes.extend_from_slice(&head);
            bytes.resize(total, 0);
            let got = read_full(&mut self.r, &mut bytes[FRAME_HEADER_LEN..])
                .map_err(|e| self.bad(at, e.to_string()))?;
            if got < fh.len as usize {
                return Err(self.bad(at, "archive ends inside a frame"));
            }
            if let Err(e) = jformat::decode_frame(&bytes) {
                let e: FrameError = e;
                return Err(self.bad(at, e.to_string()));
            }
            if Some(fh.lsn) != self.next_lsn {
                let want = self.next_lsn.unwrap_or(0);
                return Err(self.bad(at, format!("LSN gap: expected {want}, found {}", fh.lsn)));
            }
            if fh.epoch < self.last_epoch {
                return Err(self.bad(at, "epoch goes back"));
            }
            self.last_epoch = fh.epoch;
            self.next_lsn = Some(fh.lsn + 1);
            self.offset += total as u64;
            return Ok(Some((seg, OwnedFrame { header: fh, bytes })));
        }
    }
}

impl<R: Read> Iterator for ArchiveReader<R> {
    type Item = Result<(SegmentHeader, OwnedFrame), FormatError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_frame().transpose()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes `data` in pieces of uneven sizes, as zstd does: each piece
    /// `(previous * factor) % modulus + 1` bytes.
    fn write_unevenly(w: &mut impl Write, data: &[u8], factor: usize, modulus: usize) {
        let mut at = 0;
        let mut step = 1;
        while at < data.len() {
            let end = (at + step).min(data.len());
            w.write_all(&data[at..end]).unwrap();
            at = end;
            step = step * factor % modulus + 1;
        }
    }

    #[test]
    fn a_set_file_holds_exactly_what_was_written_direct_or_not() {
        let dir = tempfile::tempdir().unwrap();
        // Whole blocks, a block and a bit, less than a block, nothing, and
        // a partial block between whole ones.
        for (n, sizes) in [
            (0usize, vec![DIRECT_BLOCK, DIRECT_BLOCK]),
            (1, vec![DIRECT_BLOCK, 12_345]),
            (2, vec![4_000]),
            (3, vec![0]),
            (4, vec![DIRECT_BLOCK, 100, DIRECT_BLOCK]),
        ] {
            let path = dir.path().join(format!("f{n}"));
            let mut f = SetFile::create(&path).unwrap();
            let mut all = Vec::new();
            for (i, size) in sizes.into_iter().enumerate() {
                let data: Vec<u8> = (0..size).map(|j| (j * 7 + n + i) as u8).collect();
                let mut b = Block::new();
                assert_eq!(b.fill(&data), size);
                f.write_block(&b).unwrap();
                all.extend_from_slice(&data);
            }
            f.finish().sync_all().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), all, "file {n}");
        }
    }

    #[test]
    fn checksums_of_both_kinds_are_computed_and_named_in_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        // The published test vectors of "abc".
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let b3 = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85";
        assert_eq!(
            checksum_file(&p, HashKind::Sha256).unwrap(),
            (3, Checksum::Sha256(sha.into()))
        );
        assert_eq!(
            checksum_file(&p, HashKind::Blake3).unwrap(),
            (3, Checksum::Blake3(b3.into()))
        );
        let r = HashingReader::new(&b"abc"[..], HashKind::Sha256);
        assert_eq!(r.finish().unwrap(), (3, Checksum::Sha256(sha.into())));
        assert_eq!(
            Checksum::Blake3(b3.into()).to_string(),
            format!("blake3:{b3}")
        );
        // In JSON the algorithm is the key, so a file recorded before
        // BLAKE3 (`"sha256"`) still reads back as what it is.
        let a = ArchiveSummary {
            first_lsn: 1,
            last_lsn: 2,
            entries: 2,
            segments: 1,
            raw_bytes: 10,
            file_bytes: 5,
            checksum: Checksum::Blake3(b3.into()),
        };
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["blake3"], b3);
        assert_eq!(serde_json::from_value::<ArchiveSummary>(json).unwrap(), a);
        let old = serde_json::json!({"first_lsn": 1, "last_lsn": 2, "entries": 2,
            "segments": 1, "raw_bytes": 10, "file_bytes": 5, "sha256": sha});
        let old: ArchiveSummary = serde_json::from_value(old).unwrap();
        assert_eq!(old.checksum, Checksum::Sha256(sha.into()));
    }

    #[test]
    fn a_set_pipe_writes_and_hashes_exactly_what_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        for (n, total) in [
            (0usize, 7 * DIRECT_BLOCK + 1),
            (1, DIRECT_BLOCK),
            (2, 10),
            (3, 0),
        ] {
            let path = dir.path().join(format!("p{n}"));
            let data: Vec<u8> = (0..total).map(|i| (i * 13 + n) as u8).collect();
            let mut p = SetPipe::create(&path).unwrap();
            write_unevenly(&mut p, &data, 5, 1_500_007);
            assert_eq!(p.bytes(), total as u64);
            let (file, bytes, sum) = p.finish().unwrap();
            file.sync_all().unwrap();
            assert_eq!(bytes, total as u64);
            let want = Checksum::Blake3(blake3::hash(&data).to_hex().to_string());
            assert_eq!(sum, want, "pipe {n}");
            assert_eq!(std::fs::read(&path).unwrap(), data, "pipe {n}");
        }
        // A destination that cannot be created is an error at once.
        assert!(SetPipe::create(&dir.path().join("missing/dir/f")).is_err());
    }

    fn items() -> Vec<SnapshotItem> {
        let mut v = vec![SnapshotItem::Table {
            name: "t".into(),
            journaled: true,
        }];
        for i in 0..5000u64 {
            v.push(SnapshotItem::Record {
                table: "t".into(),
                key: format!("k{i:05}"),
                version: i + 1,
                value: format!("{{\"v\":{i},\"pad\":\"{}\"}}", "x".repeat(300)).into_bytes(),
            });
        }
        v.push(SnapshotItem::BlobStart {
            table: "t".into(),
            key: "b".into(),
            version: 9,
            size: 3,
        });
        v.push(SnapshotItem::BlobChunk {
            bytes: b"abc".to_vec(),
        });
        v.push(SnapshotItem::BlobEnd);
        v
    }

    fn header() -> SnapshotHeader {
        SnapshotHeader {
            db_id: [7; 16],
            lsn: 42,
            epoch: 2,
        }
    }

    fn write_snapshot(dir: &Path) -> (PathBuf, SnapshotSummary) {
        let p = dir.join(SNAPSHOT_FILE);
        let mut w = SnapshotWriter::create(&p, header(), 3).unwrap();
        for it in items() {
            w.add(&it).unwrap();
        }
        let s = w.finish().unwrap();
        (p, s)
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(set_dir_name("mirrordb", 7), "mirrordb[0007].backup");
        assert_eq!(archive_name("db", 0), "db[0000].journal");
        assert_eq!(
            parse_numbered("db[0012].backup", "db", SET_SUFFIX),
            Some(12)
        );
        assert_eq!(parse_numbered("db[12].backup", "db", SET_SUFFIX), None);
        assert_eq!(parse_numbered("dbx[0012].backup", "db", SET_SUFFIX), None);
        assert_eq!(parse_numbered("db[0012].journal", "db", SET_SUFFIX), None);
    }

    /// The snapshot file a writer produced when chunks went through the
    /// spool: `spill` and `queue_limit` as the writer gets them.
    fn write_spilling(dir: &Path, spill: Spill, queue_limit: usize) -> (Vec<u8>, SnapshotSummary) {
        let p = dir.join("spilled.zst");
        let mut w = SnapshotWriter::create_with(&p, header(), 3, Some(spill), Pace::off()).unwrap();
        w.queue_limit = queue_limit;
        for it in items() {
            w.add(&it).unwrap();
        }
        let spooled = w.spooled_bytes();
        // Everything added so far gets compressed without `finish`.
        while !w.wait_compressed(Duration::from_secs(1)) {}
        assert!(w.file_bytes() > SNAPSHOT_HEADER_LEN as u64 / 2);
        let s = w.finish().unwrap();
        if queue_limit == 0 {
            // Every chunk so far, header space included (the last one goes
            // at `finish`).
            let before_last: u64 = s.chunks[..s.chunks.len() - 1]
                .iter()
                .map(|c| u64::from(c.bytes) + CHUNK_HEAD_LEN as u64)
                .sum();
            assert_eq!(spooled, before_last, "every chunk spooled");
        }
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        (bytes, s)
    }

    #[test]
    fn a_writer_whose_spool_cannot_be_made_waits_for_the_compressor_instead() {
        let dir = tempfile::tempdir().unwrap();
        let (p, plain) = write_snapshot(dir.path());
        let want = std::fs::read(&p).unwrap();
        let q = dir.path().join("second.zst");
        let mut w =
            SnapshotWriter::create_with(&q, header(), 3, Some(Box::new(|| true)), Pace::off())
                .unwrap();
        // Every chunk would go to the spool, which cannot be made.
        w.queue_limit = 0;
        w.spool_dir = dir.path().join("missing");
        for it in items() {
            w.add(&it).unwrap();
        }
        assert_eq!(w.spooled_bytes(), 0);
        assert!(w.spill.is_none(), "spilling turned off");
        let s = w.finish().unwrap();
        assert_eq!(s, plain);
        assert!(std::fs::read(&q).unwrap() == want, "file differs");
    }

    #[test]
    fn a_snapshot_written_through_the_spool_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let (p, plain) = write_snapshot(dir.path());
        let want = std::fs::read(&p).unwrap();
        // Every chunk through the spool.
        let (got, s) = write_spilling(dir.path(), Box::new(|| true), 0);
        assert_eq!(s, plain);
        assert!(got == want, "spooled file differs");
        // Chunks in memory and in the spool, interleaved.
        let flip = AtomicBool::new(false);
        let spill: Spill = Box::new(move || !flip.fetch_xor(true, Ordering::Relaxed));
        let (got, s) = write_spilling(dir.path(), spill, 1);
        assert_eq!(s, plain);
        assert!(got == want, "interleaved file differs");
        // The spool has no name: nothing is left beside the snapshot.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(SNAPSHOT_FILE)]);
    }

    #[test]
    fn chunks_compressed_on_the_callers_thread_make_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let (p, plain) = write_snapshot(dir.path());
        let want = std::fs::read(&p).unwrap();
        // No queue: every chunk is compressed where it was encoded.
        let (got, s, here) = write_with_limits(dir.path(), 0, COMPRESSED_QUEUE_FRAMES);
        assert_eq!(s, plain);
        assert!(got == want, "file differs");
        assert_eq!(
            here,
            plain.chunks.len() as u64,
            "every chunk compressed here"
        );
        // No room for frames: the caller waits for the compressor.
        let (got, s, here) = write_with_limits(dir.path(), 1, 0);
        assert_eq!((s, here), (plain, 0));
        assert!(got == want, "file differs");
    }

    /// The snapshot file of a writer with no spill and the given queue
    /// limits, its summary, and how many chunks it compressed itself.
    fn write_with_limits(
        dir: &Path,
        queue_limit: usize,
        frame_limit: usize,
    ) -> (Vec<u8>, SnapshotSummary, u64) {
        let p = dir.join("limited.zst");
        let mut w = SnapshotWriter::create(&p, header(), 3).unwrap();
        (w.queue_limit, w.frame_limit) = (queue_limit, frame_limit);
        for it in items() {
            w.add(&it).unwrap();
        }
        // The last chunk is handed over by `finish`.
        w.flush_chunk().unwrap();
        let here = w.compressed_here();
        let s = w.finish().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        (bytes, s, here)
    }

    /// A pace whose position moves at every look: clients always write.
    fn always_busy(rate: u64) -> Pace {
        let lsn = AtomicU64::new(0);
        Pace::new(
            rate,
            Box::new(move || lsn.fetch_add(1, Ordering::Relaxed)),
            None,
        )
    }

    #[test]
    fn a_paced_snapshot_and_archive_are_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let (p, plain) = write_snapshot(dir.path());
        let want = std::fs::read(&p).unwrap();
        let q = dir.path().join("paced.zst");
        // About 1.7 MB of items at 8 MiB/s while clients write: it waits.
        let mut w =
            SnapshotWriter::create_with(&q, header(), 3, None, always_busy(8 << 20)).unwrap();
        for it in items() {
            w.add(&it).unwrap();
        }
        let s = w.finish().unwrap();
        assert!(s.paced > Duration::ZERO, "the compressor never waited");
        assert_eq!(
            SnapshotSummary {
                paced: Duration::ZERO,
                ..s
            },
            plain
        );
        assert!(std::fs::read(&q).unwrap() == want, "paced file differs");

        let seg = dir.path().join("1.journal");
        std::fs::write(&seg, segment_bytes([1; 16], 1, 200)).unwrap();
        let archive = |name: &str, pace: Pace| {
            let a = dir.path().join(name);
            let mut w = ArchiveWriter::create_paced(&a, [1; 16], 3, pace).unwrap();
            w.add_segment(&seg, u64::MAX).unwrap();
            (w.finish().unwrap(), std::fs::read(&a).unwrap())
        };
        assert_eq!(
            archive("plain.journal", Pace::off()),
            archive("paced.journal", always_busy(1 << 20))
        );
    }

    #[test]
    fn snapshot_round_trips_with_manifest_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (p, s) = write_snapshot(dir.path());
        assert_eq!(s.items, items().len() as u64);
        assert!(s.chunks.len() > 1, "several chunks: {}", s.chunks.len());
        assert_eq!(
            checksum_file(&p, HashKind::Blake3).unwrap(),
            (s.file_bytes, s.checksum.clone())
        );
        let mut r = SnapshotFileReader::open_file(&p)
            .unwrap()
            .expect_chunks(s.chunks.clone());
        assert_eq!(r.header(), header());
        let mut got = Vec::new();
        while let Some(it) = r.next_item().unwrap() {
            got.push(it);
        }
        assert_eq!(got, items());
        // A manifest that disagrees is noticed.
        let mut wrong = s.chunks.clone();
        wrong[0].crc32c ^= 1;
        let mut r = SnapshotFileReader::open_file(&p)
            .unwrap()
            .expect_chunks(wrong);
        assert!(r.next_item().is_err());
    }

    #[test]
    fn damaged_snapshot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("raw");
        // Uncompressed stream, so flips hit chunk bytes directly.
        let mut raw = Vec::new();
        raw.extend_from_slice(&header().encode());
        let mut payload = Vec::new();
        for it in items().iter().take(20) {
            let e = postcard::to_stdvec(it).unwrap();
            payload.extend_from_slice(&(e.len() as u32).to_le_bytes());
            payload.extend_from_slice(&e);
        }
        write_chunk(&mut raw, &payload, 20).unwrap();
        write_chunk(&mut raw, &[], 0).unwrap();
        let mut t = [0u8; 20];
        t[0..8].copy_from_slice(&20u64.to_le_bytes());
        t[8..16].copy_from_slice(&1u64.to_le_bytes());
        let c = crc32c::crc32c(&t[..16]);
        t[16..].copy_from_slice(&c.to_le_bytes());
        raw.extend_from_slice(&t);
        std::fs::write(&p, &raw).unwrap();
        let read_all = |b: &[u8]| -> Result<u64, FormatError> {
            let mut r = SnapshotReader::new(b, "t")?;
            while r.next_item()?.is_some() {}
            Ok(r.items())
        };
        assert_eq!(read_all(&raw).unwrap(), 20);
        for i in (0..raw.len()).step_by(7) {
            let mut b = raw.clone();
            b[i] ^= 0x10;
            assert!(read_all(&b).is_err(), "flip at {i} went unnoticed");
        }
        for cut in (0..raw.len()).step_by(11) {
            assert!(
                read_all(&raw[..cut]).is_err(),
                "cut at {cut} went unnoticed"
            );
        }
    }

    /// A journal segment of database `db` holding `n` restore points from
    /// LSN `first`.
    pub(in crate::backup) fn segment_bytes(db: [u8; 16], first: u64, n: u64) -> Vec<u8> {
        let mut b = SegmentHeader {
            db_id: db,
            epoch: 1,
            first_lsn: first,
            created_us: 1,
        }
        .encode()
        .to_vec();
        for lsn in first..first + n {
            let op = crate::model::Op::RestorePoint {
                name: format!("p{lsn}"),
            };
            jformat::encode_frame(&mut b, lsn, 1, lsn * 10, &jformat::encode_op(&op));
        }
        b
    }

    #[test]
    fn archive_round_trips_and_checks_continuity() {
        let dir = tempfile::tempdir().unwrap();
        let s1 = dir.path().join("1.journal");
        let s2 = dir.path().join("2.journal");
        std::fs::write(&s1, segment_bytes([1; 16], 1, 10)).unwrap();
        std::fs::write(&s2, segment_bytes([1; 16], 11, 10)).unwrap();
        let a = dir.path().join("a.journal");
        let mut w = ArchiveWriter::create(&a, [1; 16], 3).unwrap();
        w.add_segment(&s1, u64::MAX).unwrap();
        w.add_segment(&s2, 15).unwrap();
        let s = w.finish().unwrap();
        assert_eq!(
            (s.first_lsn, s.last_lsn, s.entries, s.segments),
            (1, 15, 15, 2)
        );
        assert_eq!(checksum_file(&a, HashKind::Blake3).unwrap().1, s.checksum);
        let lsns: Vec<u64> = ArchiveFileReader::open_file(&a)
            .unwrap()
            .map(|r| r.unwrap().1.header.lsn)
            .collect();
        assert_eq!(lsns, (1..=15).collect::<Vec<_>>());
        // A gap between segments and a foreign segment are refused.
        let mut w = ArchiveWriter::create(&a, [1; 16], 3).unwrap();
        w.add_segment(&s2, u64::MAX).unwrap();
        assert!(w.add_segment(&s1, u64::MAX).is_err());
        let mut w = ArchiveWriter::create(&a, [2; 16], 3).unwrap();
        assert!(matches!(
            w.add_segment(&s1, u64::MAX),
            Err(FormatError::Foreign { .. })
        ));
        // Raw concatenation with a gap is refused by the reader.
        let mut raw = segment_bytes([1; 16], 1, 3);
        raw.extend(segment_bytes([1; 16], 5, 3));
        let r: Result<Vec<_>, _> = ArchiveReader::new(&raw[..], "x").collect();
        assert!(r.is_err());
    }

    proptest! {
        #[test]
        fn snapshot_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Ok(mut r) = SnapshotReader::new(&bytes[..], "p") {
                while let Ok(Some(_)) = r.next_item() {}
            }
            let mut with_header = header().encode().to_vec();
            with_header.extend_from_slice(&bytes);
            if let Ok(mut r) = SnapshotReader::new(&with_header[..], "p") {
                while let Ok(Some(_)) = r.next_item() {}
            }
            if let Ok(dec) = zstd::Decoder::new(&bytes[..])
                && let Ok(mut r) = SnapshotReader::new(dec, "p")
            {
                while let Ok(Some(_)) = r.next_item() {}
            }
        }

        #[test]
        fn archive_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            for r in ArchiveReader::new(&bytes[..], "p") {
                if r.is_err() { break; }
            }
            let mut seg = segment_bytes([3; 16], 1, 2);
            seg.extend_from_slice(&bytes);
            for r in ArchiveReader::new(&seg[..], "p") {
                if r.is_err() { break; }
            }
        }

        #[test]
        fn flipped_archive_bytes_are_detected(at in 0usize..400, bit in 0u8..8) {
            let raw = segment_bytes([3; 16], 1, 4);
            let at = at % raw.len();
            let mut b = raw.clone();
            b[at] ^= 1 << bit;
            let r: Result<Vec<_>, _> = ArchiveReader::new(&b[..], "p").collect();
            prop_assert!(r.is_err(), "flip at byte {} bit {} went unnoticed", at, bit);
        }
    }
}
