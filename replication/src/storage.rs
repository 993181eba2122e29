//! The seams between replication and the node's journal: [`JournalSource`]
//! (primary side, read-only) and [`JournalSink`] (mirror side, writes).
//!
//! Each method states its **durability contract**: what must be true when it
//! returns. "Written" (in the OS cache) and "durable" (fsynced) are different
//! positions; replication only ever reports durable ones, because a primary
//! in `quorum` mode acknowledges a client's write on the strength of a
//! mirror's `flushed_lsn`.
//!
//! Errors are split the way the node must act on them: a
//! [`StorageError::Fatal`] (an fsync failed, the journal is unusable) stops
//! replication and must stop the node's writes; anything else ends the
//! current session and is retried.

use crate::frame::FramedEntry;
use crate::protocol::EpochHistory;
use crate::types::{Epoch, Lsn};
use std::future::Future;
use thiserror::Error;
use tokio::sync::watch;

/// Why a journal operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageError {
    /// The entries asked for are no longer available (trimmed or archived
    /// beyond reach); the mirror will be told to reseed.
    #[error("entries before {oldest} are no longer available")]
    Unavailable { oldest: Lsn },
    /// A transient failure; the session ends and is retried.
    #[error("journal i/o: {0}")]
    Io(String),
    /// The journal cannot go on (an fsync failed, data is damaged). The node
    /// must stop replicating and refuse writes.
    #[error("journal failed: {0}")]
    Fatal(String),
}

/// A point-in-time image of the database for reseeding a mirror.
pub struct Snapshot {
    /// The snapshot holds exactly the entries `<= lsn`.
    pub lsn: Lsn,
    /// The epoch of the entry at `lsn`.
    pub epoch: Epoch,
    /// Exact length of `reader`'s content.
    pub total_bytes: u64,
    /// The snapshot's bytes (opaque to replication).
    pub reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("lsn", &self.lsn)
            .field("epoch", &self.epoch)
            .field("total_bytes", &self.total_bytes)
            .finish_non_exhaustive()
    }
}

/// The primary's journal, as replication reads it.
pub trait JournalSource: Send + Sync + 'static {
    /// The database id.
    fn db_id(&self) -> [u8; 16];

    /// Epoch → first LSN, as committed in the control plane. Must include
    /// the epoch of every entry `read` can return.
    fn epoch_history(&self) -> EpochHistory;

    /// The oldest LSN `read` can still return (live journal or archives);
    /// `durable_lsn + 1` when nothing is readable.
    fn oldest_lsn(&self) -> Lsn;

    /// The last durable LSN, updated as group commits complete.
    ///
    /// Durability contract: a value is published only after every entry
    /// `<=` it is fsynced in the primary's journal. Values never decrease.
    fn durable_lsn(&self) -> watch::Receiver<Lsn>;

    /// Reads consecutive entries starting at `from`: at most `max_entries`
    /// and at most `max_bytes` of frames, but at least one entry when
    /// `from <= durable_lsn`.
    ///
    /// Durability contract: returns only durable entries (`<= durable_lsn`),
    /// byte-for-byte as on disk. `Unavailable` if `from < oldest_lsn`.
    fn read(
        &self,
        from: Lsn,
        max_entries: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<FramedEntry>, StorageError>> + Send;

    /// Opens a snapshot for a mirror that cannot be served from the journal.
    ///
    /// Durability contract: the snapshot contains exactly the durable
    /// entries `<= lsn`, and `lsn + 1 >= oldest_lsn` at the time it is
    /// returned, so the mirror can continue from the journal after it.
    fn open_snapshot(&self) -> impl Future<Output = Result<Snapshot, StorageError>> + Send;
}

/// A mirror's durable state, where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkPosition {
    /// Database id; zeros for an empty mirror that has not adopted one.
    pub db_id: [u8; 16],
    /// Last durable entry in the mirror's journal (or the snapshot's LSN).
    pub last_lsn: Lsn,
    /// Epoch of that entry.
    pub last_epoch: Epoch,
    /// Last entry applied to the data file (`<= last_lsn`).
    pub applied_lsn: Lsn,
}

/// The mirror's journal, as replication writes it. The driver calls one
/// method at a time and waits for it.
pub trait JournalSink: Send + 'static {
    /// The durable position.
    ///
    /// Durability contract: describes only what survives a crash now.
    fn position(&self) -> SinkPosition;

    /// An empty mirror learned its database id.
    ///
    /// Durability contract: the id is durable before this returns, and
    /// before any entry or snapshot is written.
    fn adopt_db_id(
        &mut self,
        db_id: [u8; 16],
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Appends consecutive entries, the first one at `position().last_lsn
    /// + 1`, byte-for-byte (same LSNs, epochs and frames as the primary's).
    ///
    /// Durability contract: the entries are written **and fsynced** before
    /// this returns; returns the new last durable LSN, which is then
    /// acknowledged to the primary as `flushed_lsn`. Applying them to the
    /// data file may happen later (see [`Self::applied_lsn`]).
    fn append(
        &mut self,
        entries: Vec<FramedEntry>,
    ) -> impl Future<Output = Result<Lsn, StorageError>> + Send;

    /// The last entry applied to the data file, updated as replay proceeds.
    /// Values never exceed the durable last LSN.
    fn applied_lsn(&self) -> watch::Receiver<Lsn>;

    /// Drops every entry after `keep_lsn` (a divergent tail: the primary
    /// said `Diverged{fork_lsn}` and `keep_lsn = fork_lsn - 1`). The node
    /// saves the dropped tail (e.g. to `data/rollback/`) before dropping it.
    ///
    /// Durability contract: when this returns, the journal durably ends at
    /// `<= keep_lsn` and the data file reflects no entry `> keep_lsn`
    /// (rewound, or marked for reseed); returns the new position.
    fn truncate_after(
        &mut self,
        keep_lsn: Lsn,
    ) -> impl Future<Output = Result<SinkPosition, StorageError>> + Send;

    /// A snapshot at `(lsn, epoch)` of `total_bytes` starts arriving.
    /// Nothing of the current state may be destroyed yet.
    fn begin_snapshot(
        &mut self,
        lsn: Lsn,
        epoch: Epoch,
        total_bytes: u64,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// The next piece of the snapshot (e.g. written to a temporary file).
    fn snapshot_chunk(
        &mut self,
        bytes: Vec<u8>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// All snapshot bytes arrived and their checksum holds: install it.
    ///
    /// Durability contract: when this returns, the snapshot has durably
    /// replaced the data file, the journal is empty and continues at
    /// `lsn + 1`, and `position()` is `(lsn, epoch)` with `applied_lsn =
    /// lsn`. A crash before it returns leaves the previous state or the new
    /// one, never a mix.
    fn install_snapshot(
        &mut self,
    ) -> impl Future<Output = Result<SinkPosition, StorageError>> + Send;
}
