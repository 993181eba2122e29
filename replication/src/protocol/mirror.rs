//! The mirror's side of one replication stream: subscribes from the sink's
//! durable position, checks every entry (fencing, duplicates, gaps, frame
//! checksums) before handing it to the sink, follows `Diverged` and reseed
//! instructions, and acknowledges what the sink reports durable and applied.
//! See the parent module for the rules.

use super::{MAX_SNAPSHOT_BYTES, ProtocolError};
use crate::frame::{FramedEntry, Message};
use crate::types::{Epoch, Lsn, NodeId};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Timings of a mirror session.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// An ack goes out at least this often, as a keep-alive.
    pub ack_interval: Duration,
    /// The longest silence from the primary.
    pub idle_timeout: Duration,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            ack_interval: Duration::from_millis(100),
            idle_timeout: Duration::from_secs(10),
        }
    }
}

/// Where a mirror session starts: the sink's durable state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorStart {
    /// This mirror's node id.
    pub node: NodeId,
    /// Its database id (zeros for an empty mirror that has none yet).
    pub db_id: [u8; 16],
    /// Last durable entry in its journal and that entry's epoch.
    pub last_lsn: Lsn,
    /// Epoch of the entry at `last_lsn`.
    pub last_epoch: Epoch,
    /// Last entry applied to its data file.
    pub applied_lsn: Lsn,
    /// The newest epoch this node knows of (from earlier sessions or the
    /// control plane); a primary speaking for an older one is refused.
    pub fence_epoch: Epoch,
}

/// Work the driver must do on the sink, then report back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MirrorAction {
    /// An empty mirror learned its database id from the primary; record it
    /// before the first append or snapshot.
    AdoptDatabase { db_id: [u8; 16] },
    /// Append these consecutive, checked entries; report with
    /// [`MirrorSession::handle_flushed`] once durable.
    Append(Vec<FramedEntry>),
    /// Drop every entry `>= fork_lsn`; report with
    /// [`MirrorSession::handle_truncated`].
    Truncate { fork_lsn: Lsn },
    /// A snapshot at `(lsn, epoch)` of `total_bytes` starts arriving.
    BeginSnapshot {
        lsn: Lsn,
        epoch: Epoch,
        total_bytes: u64,
    },
    /// The next piece of the snapshot.
    SnapshotChunk(Vec<u8>),
    /// The snapshot is complete and its checksum holds: install it durably
    /// and report with [`MirrorSession::handle_snapshot_installed`].
    InstallSnapshot { lsn: Lsn, epoch: Epoch },
}

#[derive(Clone, Debug)]
enum State {
    Subscribing,
    Streaming,
    Truncating,
    AwaitingSnapshot,
    Snapshot {
        lsn: Lsn,
        epoch: Epoch,
        total: u64,
        received: u64,
        crc: u32,
    },
    Installing,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Subscribing => "subscribing",
            State::Streaming => "streaming",
            State::Truncating => "truncating",
            State::AwaitingSnapshot | State::Snapshot { .. } => "receiving a snapshot",
            State::Installing => "installing a snapshot",
        }
    }
}

/// The mirror's side of one replication stream.
#[derive(Debug)]
pub struct MirrorSession {
    cfg: MirrorConfig,
    node: NodeId,
    db_id: [u8; 16],
    state: State,
    /// Last entry handed to the sink (durable or not) and its epoch.
    received: (Lsn, Epoch),
    flushed: Lsn,
    applied: Lsn,
    /// Newest epoch seen from any primary.
    highest_epoch: Epoch,
    /// Epoch of the primary of this session.
    primary_epoch: Epoch,
    primary_last_lsn: Lsn,
    duplicates: u64,
    ack_due: bool,
    outbox: VecDeque<Message>,
    actions: VecDeque<MirrorAction>,
    last_heard: Instant,
    last_ack: Instant,
}

impl MirrorSession {
    /// A session on a freshly opened stream; its first message is the
    /// `Subscribe`.
    pub fn new(cfg: MirrorConfig, start: MirrorStart, now: Instant) -> Self {
        let mut s = MirrorSession {
            cfg,
            node: start.node,
            db_id: start.db_id,
            state: State::Subscribing,
            received: (start.last_lsn, start.last_epoch),
            flushed: start.last_lsn,
            applied: start.applied_lsn.min(start.last_lsn),
            highest_epoch: start.fence_epoch.max(start.last_epoch),
            primary_epoch: Epoch(0),
            primary_last_lsn: Lsn::ZERO,
            duplicates: 0,
            ack_due: false,
            outbox: VecDeque::new(),
            actions: VecDeque::new(),
            last_heard: now,
            last_ack: now,
        };
        s.subscribe();
        s
    }

    fn subscribe(&mut self) {
        self.state = State::Subscribing;
        self.outbox.push_back(Message::Subscribe {
            node: self.node.clone(),
            db_id: self.db_id,
            last_lsn: self.received.0,
            last_epoch: self.received.1,
        });
    }

    /// The newest epoch seen; carry it into the next session's
    /// [`MirrorStart::fence_epoch`].
    pub fn highest_epoch(&self) -> Epoch {
        self.highest_epoch
    }

    /// Last entry handed to the sink and its epoch.
    pub fn received(&self) -> (Lsn, Epoch) {
        self.received
    }

    /// The primary's last LSN as it last reported it.
    pub fn primary_last_lsn(&self) -> Lsn {
        self.primary_last_lsn
    }

    /// Last entry the sink reported durable, and last applied.
    pub fn acked(&self) -> (Lsn, Lsn) {
        (self.flushed, self.applied.min(self.flushed))
    }

    /// Entries skipped because the mirror already had them.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Whether entries are streaming.
    pub fn is_streaming(&self) -> bool {
        matches!(self.state, State::Streaming)
    }

    fn unexpected(&self, msg: &Message) -> ProtocolError {
        ProtocolError::Unexpected {
            state: self.state.name(),
            message: msg.kind(),
        }
    }

    fn fence(&mut self, epoch: Epoch) -> Result<(), ProtocolError> {
        if epoch < self.highest_epoch {
            return Err(ProtocolError::StaleEpoch {
                seen: self.highest_epoch,
                got: epoch,
            });
        }
        self.highest_epoch = epoch;
        self.primary_epoch = epoch;
        Ok(())
    }

    fn adopt(&mut self, db_id: [u8; 16]) -> Result<(), ProtocolError> {
        if self.db_id == db_id {
            return Ok(());
        }
        if self.db_id != [0; 16] {
            return Err(ProtocolError::BadPosition(
                "primary serves another database".into(),
            ));
        }
        self.db_id = db_id;
        self.actions
            .push_back(MirrorAction::AdoptDatabase { db_id });
        Ok(())
    }

    /// A message arrived from the primary. An error ends the session.
    pub fn handle_message(&mut self, msg: Message, now: Instant) -> Result<(), ProtocolError> {
        self.last_heard = now;
        match (&mut self.state, msg) {
            (_, Message::Refused { code, reason }) => Err(ProtocolError::Refused { code, reason }),
            (
                _,
                Message::Heartbeat {
                    primary_last_lsn,
                    epoch,
                },
            ) => {
                self.fence(epoch)?;
                self.primary_last_lsn = primary_last_lsn;
                Ok(())
            }
            (
                State::Subscribing,
                Message::Streaming {
                    from_lsn,
                    epoch,
                    db_id,
                },
            ) => {
                self.fence(epoch)?;
                self.adopt(db_id)?;
                if from_lsn != self.received.0.next() {
                    return Err(ProtocolError::BadPosition(format!(
                        "primary streams from {from_lsn}, mirror is at {}",
                        self.received.0
                    )));
                }
                self.state = State::Streaming;
                self.ack_due = true;
                Ok(())
            }
            (State::Subscribing, Message::Diverged { fork_lsn, epoch }) => {
                self.fence(epoch)?;
                if fork_lsn == Lsn::ZERO || fork_lsn > self.received.0 {
                    return Err(ProtocolError::BadPosition(format!(
                        "fork at {fork_lsn} but the mirror ends at {}",
                        self.received.0
                    )));
                }
                self.state = State::Truncating;
                self.actions.push_back(MirrorAction::Truncate { fork_lsn });
                Ok(())
            }
            (State::Subscribing, Message::NeedsReseed { db_id, .. }) => {
                self.adopt(db_id)?;
                self.state = State::AwaitingSnapshot;
                Ok(())
            }
            (
                State::AwaitingSnapshot,
                Message::SnapshotBegin {
                    lsn,
                    epoch,
                    total_bytes,
                },
            ) => {
                if total_bytes > MAX_SNAPSHOT_BYTES {
                    return Err(ProtocolError::Snapshot("snapshot larger than the limit"));
                }
                self.state = State::Snapshot {
                    lsn,
                    epoch,
                    total: total_bytes,
                    received: 0,
                    crc: 0,
                };
                self.actions.push_back(MirrorAction::BeginSnapshot {
                    lsn,
                    epoch,
                    total_bytes,
                });
                Ok(())
            }
            (
                State::Snapshot {
                    total,
                    received,
                    crc,
                    ..
                },
                Message::SnapshotChunk { bytes },
            ) => {
                let new_len = *received + bytes.len() as u64;
                if new_len > *total {
                    return Err(ProtocolError::Snapshot("more bytes than announced"));
                }
                *received = new_len;
                *crc = crc32c::crc32c_append(*crc, &bytes);
                self.actions.push_back(MirrorAction::SnapshotChunk(bytes));
                Ok(())
            }
            (
                &mut State::Snapshot {
                    lsn,
                    epoch,
                    total,
                    received,
                    crc,
                },
                Message::SnapshotEnd { checksum },
            ) => {
                if received != total {
                    return Err(ProtocolError::Snapshot("fewer bytes than announced"));
                }
                if crc != checksum {
                    return Err(ProtocolError::Snapshot("checksum mismatch"));
                }
                self.state = State::Installing;
                self.actions
                    .push_back(MirrorAction::InstallSnapshot { lsn, epoch });
                Ok(())
            }
            (
                State::Streaming,
                Message::Entries {
                    entries,
                    primary_last_lsn,
                },
            ) => {
                self.primary_last_lsn = self.primary_last_lsn.max(primary_last_lsn);
                self.on_entries(entries)
            }
            (_, other) => Err(self.unexpected(&other)),
        }
    }

    fn on_entries(&mut self, entries: Vec<FramedEntry>) -> Result<(), ProtocolError> {
        let mut accepted = Vec::with_capacity(entries.len());
        for e in entries {
            e.verify()?;
            if e.lsn <= self.received.0 {
                self.duplicates += 1;
                continue;
            }
            let expected = self.received.0.next();
            if e.lsn != expected {
                return Err(ProtocolError::Gap {
                    expected,
                    got: e.lsn,
                });
            }
            if e.epoch < self.received.1 || e.epoch > self.primary_epoch {
                return Err(ProtocolError::EntryEpoch {
                    lsn: e.lsn,
                    got: e.epoch,
                    min: self.received.1,
                    max: self.primary_epoch,
                });
            }
            self.received = (e.lsn, e.epoch);
            accepted.push(e);
        }
        if !accepted.is_empty() {
            self.actions.push_back(MirrorAction::Append(accepted));
        }
        Ok(())
    }

    /// The sink reports every entry `<= lsn` durable.
    pub fn handle_flushed(&mut self, lsn: Lsn) {
        let lsn = lsn.min(self.received.0);
        if lsn > self.flushed {
            self.flushed = lsn;
            self.ack_due = true;
        }
    }

    /// The sink reports every entry `<= lsn` applied to the data file.
    pub fn handle_applied(&mut self, lsn: Lsn) {
        if lsn > self.applied {
            self.applied = lsn;
            self.ack_due = true;
        }
    }

    /// The sink dropped the diverged tail and now ends at `(last_lsn,
    /// last_epoch)`, with `applied_lsn` applied; the session subscribes
    /// again.
    pub fn handle_truncated(&mut self, last_lsn: Lsn, last_epoch: Epoch, applied_lsn: Lsn) {
        if !matches!(self.state, State::Truncating) {
            return;
        }
        self.received = (last_lsn, last_epoch);
        self.flushed = last_lsn;
        self.applied = applied_lsn.min(last_lsn);
        self.subscribe();
    }

    /// The sink installed the snapshot durably; the session subscribes again
    /// from the snapshot's position.
    pub fn handle_snapshot_installed(&mut self, lsn: Lsn, epoch: Epoch) {
        if !matches!(self.state, State::Installing) {
            return;
        }
        self.received = (lsn, epoch);
        self.flushed = lsn;
        self.applied = lsn;
        self.subscribe();
    }

    /// Time has passed: keep-alive acks and the silence timeout.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ProtocolError> {
        if now >= self.last_heard + self.cfg.idle_timeout {
            return Err(ProtocolError::Timeout("primary silent"));
        }
        if now >= self.last_ack + self.cfg.ack_interval {
            self.ack_due = true;
        }
        Ok(())
    }

    /// When [`Self::handle_timeout`] next needs to run.
    pub fn poll_timeout(&self) -> Instant {
        (self.last_heard + self.cfg.idle_timeout).min(self.last_ack + self.cfg.ack_interval)
    }

    /// The next sink operation to perform.
    pub fn poll_action(&mut self) -> Option<MirrorAction> {
        self.actions.pop_front()
    }

    /// The next message to send to the primary.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Message> {
        if let Some(m) = self.outbox.pop_front() {
            return Some(m);
        }
        if self.ack_due {
            self.ack_due = false;
            self.last_ack = now;
            return Some(Message::Ack {
                flushed_lsn: self.flushed,
                applied_lsn: self.applied.min(self.flushed),
            });
        }
        None
    }
}
