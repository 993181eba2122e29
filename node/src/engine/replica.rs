//! The engine's side of replication: roles, appending a primary's frames on
//! a mirror, and reading frames on the primary for shipping.
//!
//! ```text
//! primary: read_frames(from) ──(replication crate: QUIC)──► mirror: append_frames
//!                                                              │ verify crc, dense LSN,
//!                                                              │ epoch never goes back
//!                                                              ▼
//!                                       same bytes in its journal ─► fsync ─► replay
//! ```
//!
//! A mirror refuses client writes with `not_primary` (naming the primary's
//! HTTP address when known) and accepts frames only from replication. A
//! frame of an older epoch than the mirror has seen is refused (fencing): a
//! deposed primary cannot feed anyone.

use super::error::WriteError;
use super::{Engine, writer::Request};
use crate::journal::format::decode_frame;
use crate::journal::scan::{self, EntryIter, OwnedFrame};
use serde::Serialize;

/// What this node is in its cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// Takes client writes.
    Primary,
    /// Follows a primary; client writes answer `not_primary`.
    Mirror { primary_http: Option<String> },
}

/// A mirror's position after appending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ReplicaPosition {
    /// Last LSN durable in this node's journal.
    pub flushed_lsn: u64,
    /// Last LSN applied to this node's data file.
    pub applied_lsn: u64,
    /// Epoch of the last entry.
    pub epoch: u64,
}

/// Why frames could not be read for shipping.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadFramesError {
    #[error(
        "LSN {from} is no longer in the live journal (it starts at {first_available}); ship from archives or reseed"
    )]
    Compacted { from: u64, first_available: u64 },
    #[error("journal read failed: {0}")]
    Journal(String),
}

impl Engine {
    /// Switches between primary and mirror. Ordered with writes: every write
    /// accepted before the switch is finished first.
    pub async fn set_role(&self, role: Role) -> Result<(), WriteError> {
        self.call(|reply| Request::SetRole { role, reply }).await
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.inner
            .shared
            .role
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Where each epoch starts: `(epoch, first LSN)`, increasing. Kept in
    /// the data file and completed from the journal at start.
    pub fn epoch_history(&self) -> Vec<(u64, u64)> {
        self.inner
            .shared
            .epoch_history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes this node the primary under `epoch` (greater than any it has
    /// seen): finishes what it has, closes a transaction its old primary
    /// died inside (journaled `TxnAbort` in the new epoch), starts a new
    /// segment, records the epoch durably and takes client writes. Answers
    /// `(epoch, first LSN of the epoch)`.
    pub async fn promote(&self, epoch: u64) -> Result<(u64, u64), WriteError> {
        self.call(|reply| Request::Promote { epoch, reply }).await
    }

    /// Holds client writes (they wait, up to their deadline) until
    /// [`Engine::release_writes`], a promotion or a switch to mirror (held
    /// writes then answer `not_primary`). Answers the last LSN, durable: a
    /// switchover target that reaches it holds every acknowledged write.
    pub async fn hold_writes(&self) -> Result<u64, WriteError> {
        self.call(|reply| Request::Hold { on: true, reply }).await
    }

    /// Ends [`Engine::hold_writes`]; held writes go ahead.
    pub async fn release_writes(&self) -> Result<u64, WriteError> {
        self.call(|reply| Request::Hold { on: false, reply }).await
    }

    /// The primary's lease: past `until_ms` (milliseconds since the Unix
    /// epoch, this machine's clock) no client write is taken or
    /// acknowledged. `None` removes the check (a node whose role is not
    /// decided by a lease).
    pub fn set_lease_until(&self, until_ms: Option<u64>) {
        self.inner.shared.lease_until_ms.store(
            until_ms.unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Release,
        );
    }

    /// The lease deadline set by [`Engine::set_lease_until`], if any.
    pub fn lease_until(&self) -> Option<u64> {
        match self
            .inner
            .shared
            .lease_until_ms
            .load(std::sync::atomic::Ordering::Acquire)
        {
            u64::MAX => None,
            t => Some(t),
        }
    }

    /// The last durable `(lsn, epoch)` of this node's journal.
    pub fn position(&self) -> (u64, u64) {
        let s = &self.inner.shared;
        (
            s.durable_lsn.load(std::sync::atomic::Ordering::Acquire),
            s.epoch.load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// On a mirror: appends frames received from the primary, byte for
    /// byte, then fsyncs and applies them. Frames at or below the current
    /// position are skipped (duplicates after a reconnect); a gap, a bad
    /// checksum or an older epoch is refused and nothing of the batch is
    /// written. Answers after the frames are durable and applied.
    pub async fn append_frames(&self, frames: Vec<Vec<u8>>) -> Result<ReplicaPosition, WriteError> {
        for f in &frames {
            decode_frame(f)
                .map_err(|e| WriteError::Replication(format!("bad frame from the primary: {e}")))?;
        }
        self.call(|reply| Request::AppendFrames { frames, reply })
            .await
    }

    /// On the primary: up to `max_entries` frames (and about `max_bytes`)
    /// from `from`, never past the durable end.
    pub fn read_frames(
        &self,
        from: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<OwnedFrame>, ReadFramesError> {
        let durable = self.status().durable_lsn;
        if from > durable || max_entries == 0 {
            return Ok(Vec::new());
        }
        let (segs, _) = scan::list_segments(&self.journal_dir())
            .map_err(|e| ReadFramesError::Journal(e.to_string()))?;
        let first_available = segs
            .first()
            .map(|s| s.header.first_lsn)
            .unwrap_or(durable + 1);
        if from < first_available {
            return Err(ReadFramesError::Compacted {
                from,
                first_available,
            });
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for f in EntryIter::new(segs, from, durable) {
            let f = f.map_err(|e| ReadFramesError::Journal(e.to_string()))?;
            bytes += f.bytes.len();
            out.push(f);
            if out.len() >= max_entries || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }
}
