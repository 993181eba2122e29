//! The journal-shipping protocol as plain state machines, without I/O.
//!
//! A [`PrimarySession`] serves one mirror; a [`MirrorSession`] follows one
//! primary. Both take events in (`handle_*`) and give frames and actions out
//! (`poll_*`); time is an argument (`Instant` values chosen by the caller), so
//! tests drive both against each other with a simulated clock and network.
//! The async driver owns sockets, timers and the journal.
//!
//! ```text
//!  mirror                                   primary
//!    │ Subscribe{node, db_id, last_lsn, last_epoch}
//!    ├────────────────────────────────────────►│ decide_subscription()
//!    │◄──── Streaming{from_lsn, epoch} ────────┤   tail consistent, available
//!    │◄──── Entries{..} / Heartbeat ───────────┤   (within the in-flight window)
//!    ├──── Ack{flushed_lsn, applied_lsn} ─────►│   frees window, feeds AckTracker
//!    │                 or
//!    │◄──── Diverged{fork_lsn} ────────────────┤   mirror truncates >= fork_lsn,
//!    ├──── Subscribe (again) ─────────────────►│   then subscribes again
//!    │                 or
//!    │◄──── NeedsReseed, SnapshotBegin, ───────┤   mirror installs the snapshot
//!    │      SnapshotChunk*, SnapshotEnd        │   at S, then subscribes again
//!    │                 or
//!    │◄──── Refused{code, reason} ─────────────┤   stream closes
//! ```
//!
//! # Rules
//!
//! Subscription ([`decide_subscription`]), for a mirror at `(L, E)` against
//! the primary's epoch history (epoch → first LSN), oldest available LSN `O`
//! and last LSN `P`:
//! 1. another database id → `Refused(DatabaseMismatch)` (an empty mirror,
//!    `L = 0`, with a zero id is accepted);
//! 2. `L = 0` → stream from 1 if `O <= 1`, else `NeedsReseed`;
//! 3. `E` newer than the primary's current epoch → `Refused(StalePrimary)`:
//!    the mirror has seen a newer primary, so this one is deposed;
//! 4. `E` absent from the history, or `L` before `E`'s first LSN →
//!    `NeedsReseed` (the fork cannot be located);
//! 5. the history has an epoch after `E` starting at `N <= L` →
//!    `Diverged{fork_lsn: N}`: the mirror's entries `>= N` were written under
//!    `E` after the cluster had moved on; it must drop them;
//! 6. `L > P` → `Refused(MirrorAhead)`;
//! 7. `L + 1 < O` → `NeedsReseed`; otherwise stream from `L + 1`.
//!
//! Primary while streaming: batches hold consecutive entries, at most
//! `max_batch_entries` / `max_batch_bytes` (one oversized entry travels
//! alone). Bytes sent but not covered by a flushed ack are "in flight"; no new
//! read is asked for while they reach `max_in_flight_bytes`, so a stalled
//! mirror costs at most that window (plus one entry). A read is only asked
//! for when the outbox is empty. Acks must not go backwards, claim more than
//! was sent, or have `applied > flushed`. With data in flight and no ack
//! progress for `ack_timeout`, or nothing heard for `idle_timeout`, the
//! session closes. A heartbeat goes out after `heartbeat_interval` of silence.
//!
//! Mirror: the epoch announced by the primary (`Streaming`, `Diverged`,
//! `Heartbeat`) must not be older than the newest epoch the mirror has seen
//! (fencing: a deposed primary cannot feed anyone). Each entry must pass
//! [`FramedEntry::verify`](crate::frame::FramedEntry::verify), have an epoch not above the primary's and not
//! below the epoch of the mirror's previous entry; entries at or below the
//! mirror's position are duplicates and are skipped; an entry beyond the next
//! LSN is a gap (error). Acks report what the sink said is durable/applied;
//! one goes out whenever that changes and at least every
//! `ack_interval` as a keep-alive. Nothing heard for `idle_timeout` closes
//! the session. Any error closes the session; the driver reconnects with a
//! fresh one built from the sink's durable position.

mod mirror;
mod primary;
#[cfg(test)]
mod sim_tests;

pub use mirror::{MirrorAction, MirrorConfig, MirrorSession, MirrorStart};
pub use primary::{PrimaryConfig, PrimaryEvent, PrimarySession, ReadRequest};

use crate::frame::{EntryError, RefuseCode};
use crate::types::{Epoch, Lsn};
use thiserror::Error;

/// Longest epoch history accepted (one entry per promotion).
pub const MAX_EPOCH_HISTORY: usize = 100_000;

/// Largest snapshot a mirror accepts (1 TiB).
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 40;

/// The primary's record of epochs: each epoch with the first LSN written
/// under it, in increasing epoch order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochHistory {
    entries: Vec<(Epoch, Lsn)>,
}

/// Why an epoch history is not well formed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HistoryError {
    /// Epochs must strictly increase and first LSNs must not decrease.
    #[error("epoch history out of order at epoch {0}")]
    OutOfOrder(Epoch),
    /// More than [`MAX_EPOCH_HISTORY`] entries.
    #[error("epoch history has {0} entries, more than the limit")]
    TooLong(usize),
}

impl EpochHistory {
    /// Checks and wraps `(epoch, first_lsn)` pairs.
    pub fn new(entries: Vec<(Epoch, Lsn)>) -> Result<Self, HistoryError> {
        if entries.len() > MAX_EPOCH_HISTORY {
            return Err(HistoryError::TooLong(entries.len()));
        }
        for w in entries.windows(2) {
            if w[1].0 <= w[0].0 || w[1].1 < w[0].1 {
                return Err(HistoryError::OutOfOrder(w[1].0));
            }
        }
        Ok(EpochHistory { entries })
    }

    /// The pairs, oldest first.
    pub fn entries(&self) -> &[(Epoch, Lsn)] {
        &self.entries
    }

    /// The newest epoch (`Epoch(0)` for an empty history).
    pub fn current(&self) -> Epoch {
        self.entries.last().map_or(Epoch(0), |e| e.0)
    }

    /// First LSN written under `epoch`, if the history knows it.
    pub fn first_lsn(&self, epoch: Epoch) -> Option<Lsn> {
        self.entries.iter().find(|e| e.0 == epoch).map(|e| e.1)
    }

    /// The first epoch after `epoch` and its first LSN.
    pub fn next_after(&self, epoch: Epoch) -> Option<(Epoch, Lsn)> {
        self.entries.iter().find(|e| e.0 > epoch).copied()
    }
}

/// What the primary knows of its own journal when a mirror subscribes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalView {
    /// The database id.
    pub db_id: [u8; 16],
    /// Last durable LSN (`Lsn(0)` when empty).
    pub last_lsn: Lsn,
    /// Oldest LSN still readable (`last_lsn + 1` when nothing is readable).
    pub oldest_lsn: Lsn,
    /// Epoch → first LSN.
    pub history: EpochHistory,
}

/// The primary's answer to a `Subscribe`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscribeDecision {
    /// Stream entries from this LSN.
    Stream { from_lsn: Lsn },
    /// The mirror must drop its entries `>= fork_lsn` and subscribe again.
    Diverged { fork_lsn: Lsn },
    /// The mirror needs a snapshot.
    NeedsReseed,
    /// The subscription is refused.
    Refuse { code: RefuseCode, reason: String },
}

/// Applies the subscription rules (see the module doc) to a mirror at
/// `(last_lsn, last_epoch)`.
pub fn decide_subscription(
    view: &JournalView,
    db_id: [u8; 16],
    last_lsn: Lsn,
    last_epoch: Epoch,
) -> SubscribeDecision {
    let empty_mirror = last_lsn == Lsn::ZERO;
    if db_id != view.db_id && !(empty_mirror && db_id == [0; 16]) {
        return SubscribeDecision::Refuse {
            code: RefuseCode::DatabaseMismatch,
            reason: "the mirror holds another database".into(),
        };
    }
    let current = view.history.current();
    if last_epoch > current {
        return SubscribeDecision::Refuse {
            code: RefuseCode::StalePrimary,
            reason: format!("mirror has seen epoch {last_epoch}, this primary is at {current}"),
        };
    }
    if empty_mirror {
        return if view.oldest_lsn <= Lsn(1) {
            SubscribeDecision::Stream { from_lsn: Lsn(1) }
        } else {
            SubscribeDecision::NeedsReseed
        };
    }
    match view.history.first_lsn(last_epoch) {
        Some(first) if last_lsn >= first => {}
        _ => return SubscribeDecision::NeedsReseed,
    }
    if let Some((_, next_first)) = view.history.next_after(last_epoch)
        && last_lsn >= next_first
    {
        return SubscribeDecision::Diverged {
            fork_lsn: next_first,
        };
    }
    if last_lsn > view.last_lsn {
        return SubscribeDecision::Refuse {
            code: RefuseCode::MirrorAhead,
            reason: format!(
                "mirror is at {last_lsn} in epoch {last_epoch}, primary ends at {}",
                view.last_lsn
            ),
        };
    }
    if last_lsn.next() < view.oldest_lsn {
        return SubscribeDecision::NeedsReseed;
    }
    SubscribeDecision::Stream {
        from_lsn: last_lsn.next(),
    }
}

/// Why a session ended. Every error closes the session; the mirror's driver
/// then reconnects with a fresh one.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A message that the current state does not allow.
    #[error("unexpected {message} while {state}")]
    Unexpected {
        state: &'static str,
        message: &'static str,
    },
    /// The primary refused the subscription.
    #[error("refused ({code:?}): {reason}")]
    Refused { code: RefuseCode, reason: String },
    /// The peer speaks for an epoch older than one already seen (fencing).
    #[error("peer speaks for epoch {got}, but epoch {seen} has been seen")]
    StaleEpoch { seen: Epoch, got: Epoch },
    /// An entry's epoch is below its predecessor's or above the primary's.
    #[error("entry {lsn} has epoch {got}, allowed {min}..={max}")]
    EntryEpoch {
        lsn: Lsn,
        got: Epoch,
        min: Epoch,
        max: Epoch,
    },
    /// Entries skipped a position.
    #[error("gap: expected entry {expected}, got {got}")]
    Gap { expected: Lsn, got: Lsn },
    /// An entry's frame is damaged.
    #[error("bad entry: {0}")]
    BadEntry(#[from] EntryError),
    /// An ack that goes backwards, claims unsent entries or applied > flushed.
    #[error("bad ack flushed={flushed} applied={applied} (sent up to {sent}, acked {acked})")]
    BadAck {
        flushed: Lsn,
        applied: Lsn,
        sent: Lsn,
        acked: Lsn,
    },
    /// The primary said something impossible about positions.
    #[error("bad position: {0}")]
    BadPosition(String),
    /// A snapshot's size or checksum does not add up.
    #[error("snapshot: {0}")]
    Snapshot(&'static str),
    /// The peer went quiet.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The local journal source answered a read inconsistently.
    #[error("journal source: {0}")]
    Source(String),
}
