//! The primary's side of one replication stream: answers a subscription,
//! streams entries in bounded batches within an in-flight window, sends
//! heartbeats, tracks the mirror's acks and notices when it stops answering.
//! See the parent module for the rules.

use super::{JournalView, ProtocolError, SubscribeDecision, decide_subscription};
use crate::frame::{FramedEntry, MAX_BATCH_ENTRIES, MAX_SNAPSHOT_CHUNK_BYTES, Message, RefuseCode};
use crate::types::{Epoch, Lsn, NodeId};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most entry bytes asked for in one batch, whatever the configuration says,
/// so a batch of several entries always fits in a frame (one entry alone may
/// be larger, up to the entry limit).
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Limits and timings of a primary session.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// Most entries in one batch (capped at [`MAX_BATCH_ENTRIES`]).
    pub max_batch_entries: usize,
    /// Most entry bytes in one batch (one larger entry travels alone).
    pub max_batch_bytes: usize,
    /// Most bytes sent and not yet acknowledged as flushed.
    pub max_in_flight_bytes: usize,
    /// A heartbeat goes out after this much silence.
    pub heartbeat_interval: Duration,
    /// With data in flight, the longest wait for ack progress.
    pub ack_timeout: Duration,
    /// The longest silence from the mirror.
    pub idle_timeout: Duration,
    /// Size of snapshot chunks (capped at [`MAX_SNAPSHOT_CHUNK_BYTES`]).
    pub snapshot_chunk_bytes: usize,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        PrimaryConfig {
            max_batch_entries: 1024,
            max_batch_bytes: 1024 * 1024,
            max_in_flight_bytes: 16 * 1024 * 1024,
            heartbeat_interval: Duration::from_millis(100),
            ack_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            snapshot_chunk_bytes: 256 * 1024,
        }
    }
}

/// A read the driver must perform on the journal and report back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadRequest {
    /// Read consecutive entries from `from_lsn`: at most `max_entries`, at
    /// most `max_bytes` (but at least one entry if any is available);
    /// report with [`PrimarySession::handle_entries`].
    Entries {
        from_lsn: Lsn,
        max_entries: usize,
        max_bytes: usize,
    },
    /// Open a snapshot; report with [`PrimarySession::handle_snapshot_opened`].
    OpenSnapshot,
    /// Read the next snapshot piece, at most `max_bytes`; report with
    /// [`PrimarySession::handle_snapshot_chunk`].
    SnapshotChunk { max_bytes: usize },
}

/// Something the driver (and the ack tracker) should know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrimaryEvent {
    /// The mirror subscribed and streaming starts at `from_lsn`.
    Subscribed { node: NodeId, from_lsn: Lsn },
    /// The mirror reported progress.
    Acked {
        flushed_lsn: Lsn,
        applied_lsn: Lsn,
        at: Instant,
    },
    /// The session ended; the driver closes the stream after sending what
    /// [`PrimarySession::poll_transmit`] still gives.
    Closed { error: ProtocolError },
}

#[derive(Clone, Debug)]
enum State {
    AwaitingSubscribe,
    Streaming,
    SnapshotOpening,
    Snapshot { remaining: u64, crc: u32 },
    Closed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::AwaitingSubscribe => "awaiting subscribe",
            State::Streaming => "streaming",
            State::SnapshotOpening | State::Snapshot { .. } => "sending a snapshot",
            State::Closed => "closed",
        }
    }
}

/// The primary's side of one replication stream.
#[derive(Debug)]
pub struct PrimarySession {
    cfg: PrimaryConfig,
    view: JournalView,
    state: State,
    node: Option<NodeId>,
    /// Next entry to read.
    next_lsn: Lsn,
    /// Highest entry sent in this subscription.
    sent_lsn: Lsn,
    flushed_lsn: Lsn,
    applied_lsn: Lsn,
    /// Sent batches not yet covered by a flushed ack: (last lsn, bytes).
    in_flight: VecDeque<(Lsn, usize)>,
    in_flight_bytes: usize,
    /// The read handed to the driver and not yet answered.
    pending: Option<ReadRequest>,
    /// Reseeds offered in this session (a second one means the snapshot
    /// does not reach the journal; offering it again would loop).
    reseeds: u32,
    outbox: VecDeque<Message>,
    events: VecDeque<PrimaryEvent>,
    last_heard: Instant,
    last_sent: Instant,
    waiting_ack_since: Instant,
}

impl PrimarySession {
    /// A session for a freshly accepted stream.
    pub fn new(cfg: PrimaryConfig, view: JournalView, now: Instant) -> Self {
        PrimarySession {
            cfg,
            view,
            state: State::AwaitingSubscribe,
            node: None,
            next_lsn: Lsn(1),
            sent_lsn: Lsn::ZERO,
            flushed_lsn: Lsn::ZERO,
            applied_lsn: Lsn::ZERO,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            pending: None,
            reseeds: 0,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            last_heard: now,
            last_sent: now,
            waiting_ack_since: now,
        }
    }

    /// The subscribed mirror, once known.
    pub fn node(&self) -> Option<&NodeId> {
        self.node.as_ref()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Bytes sent and not yet acknowledged as flushed.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// The mirror's last acknowledged `(flushed, applied)` positions.
    pub fn acked(&self) -> (Lsn, Lsn) {
        (self.flushed_lsn, self.applied_lsn)
    }

    /// The journal moved on (new durable entries, a trimmed start, a new
    /// epoch in the history).
    pub fn handle_journal(&mut self, view: JournalView) {
        self.view = view;
    }

    /// A message arrived from the mirror.
    pub fn handle_message(&mut self, msg: Message, now: Instant) -> Result<(), ProtocolError> {
        if self.is_closed() {
            return Ok(());
        }
        self.last_heard = now;
        let result = match msg {
            Message::Subscribe {
                node,
                db_id,
                last_lsn,
                last_epoch,
            } => self.on_subscribe(node, db_id, last_lsn, last_epoch, now),
            Message::Ack {
                flushed_lsn,
                applied_lsn,
            } => self.on_ack(flushed_lsn, applied_lsn, now),
            other => Err(ProtocolError::Unexpected {
                state: self.state.name(),
                message: other.kind(),
            }),
        };
        if let Err(e) = &result {
            let code = match e {
                ProtocolError::Refused { code, .. } => *code,
                _ => RefuseCode::ProtocolViolation,
            };
            self.outbox.push_back(Message::Refused {
                code,
                reason: truncate_reason(e.to_string()),
            });
            self.close(e.clone());
        }
        result
    }

    fn on_subscribe(
        &mut self,
        node: NodeId,
        db_id: [u8; 16],
        last_lsn: Lsn,
        last_epoch: Epoch,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        if !matches!(self.state, State::AwaitingSubscribe) {
            return Err(ProtocolError::Unexpected {
                state: self.state.name(),
                message: "subscribe",
            });
        }
        self.node = Some(node.clone());
        match decide_subscription(&self.view, db_id, last_lsn, last_epoch) {
            SubscribeDecision::Stream { from_lsn } => {
                self.state = State::Streaming;
                self.next_lsn = from_lsn;
                self.sent_lsn = last_lsn;
                self.flushed_lsn = last_lsn;
                self.applied_lsn = Lsn::ZERO;
                self.in_flight.clear();
                self.in_flight_bytes = 0;
                self.push(
                    Message::Streaming {
                        from_lsn,
                        epoch: self.view.history.current(),
                        db_id: self.view.db_id,
                    },
                    now,
                );
                self.events
                    .push_back(PrimaryEvent::Subscribed { node, from_lsn });
                Ok(())
            }
            SubscribeDecision::Diverged { fork_lsn } => {
                self.push(
                    Message::Diverged {
                        fork_lsn,
                        epoch: self.view.history.current(),
                    },
                    now,
                );
                Ok(())
            }
            SubscribeDecision::NeedsReseed => {
                self.reseeds += 1;
                if self.reseeds > 1 {
                    return Err(ProtocolError::Source(
                        "the snapshot sent does not reach the journal; not reseeding again".into(),
                    ));
                }
                self.push(
                    Message::NeedsReseed {
                        oldest_lsn: self.view.oldest_lsn,
                        primary_last_lsn: self.view.last_lsn,
                        db_id: self.view.db_id,
                    },
                    now,
                );
                self.state = State::SnapshotOpening;
                Ok(())
            }
            SubscribeDecision::Refuse { code, reason } => {
                Err(ProtocolError::Refused { code, reason })
            }
        }
    }

    fn on_ack(&mut self, flushed: Lsn, applied: Lsn, now: Instant) -> Result<(), ProtocolError> {
        if !matches!(self.state, State::Streaming) {
            // Keep-alive while a snapshot or a resubscription is under way.
            return Ok(());
        }
        if flushed < self.flushed_lsn
            || flushed > self.sent_lsn
            || applied > flushed
            || applied < self.applied_lsn
        {
            return Err(ProtocolError::BadAck {
                flushed,
                applied,
                sent: self.sent_lsn,
                acked: self.flushed_lsn,
            });
        }
        let progressed = flushed > self.flushed_lsn || applied > self.applied_lsn;
        if flushed > self.flushed_lsn {
            self.waiting_ack_since = now;
        }
        self.flushed_lsn = flushed;
        self.applied_lsn = applied;
        while let Some(&(last, bytes)) = self.in_flight.front() {
            if last > flushed {
                break;
            }
            self.in_flight.pop_front();
            self.in_flight_bytes -= bytes;
        }
        if progressed {
            self.events.push_back(PrimaryEvent::Acked {
                flushed_lsn: flushed,
                applied_lsn: applied,
                at: now,
            });
        }
        Ok(())
    }

    /// The read asked by [`Self::poll_read`], for entries, has completed.
    pub fn handle_entries(
        &mut self,
        entries: Vec<FramedEntry>,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        let pending = self.pending.take();
        if !matches!(self.state, State::Streaming) {
            return Ok(());
        }
        let Some(ReadRequest::Entries {
            max_entries,
            max_bytes,
            ..
        }) = pending
        else {
            return self.source_failed("entries arrived that were not asked for".into());
        };
        if entries.len() > max_entries {
            return self.source_failed(format!(
                "read returned {} entries, asked at most {max_entries}",
                entries.len()
            ));
        }
        let mut expected = self.next_lsn;
        let mut bytes = 0;
        for e in &entries {
            if e.lsn != expected {
                return self.source_failed(format!(
                    "read returned entry {}, expected {expected}",
                    e.lsn
                ));
            }
            // Never ship a damaged frame: check it right after reading.
            if let Err(err) = e.verify() {
                return self.source_failed(format!("journal entry is damaged: {err}"));
            }
            expected = expected.next();
            bytes += e.wire_len();
        }
        if entries.len() > 1 && bytes > max_bytes {
            return self.source_failed(format!(
                "read returned {bytes} bytes, asked at most {max_bytes}"
            ));
        }
        let Some(last) = entries.last().map(|e| e.lsn) else {
            return Ok(());
        };
        if self.in_flight.is_empty() {
            self.waiting_ack_since = now;
        }
        self.in_flight.push_back((last, bytes));
        self.in_flight_bytes += bytes;
        self.next_lsn = expected;
        self.sent_lsn = last;
        self.push(
            Message::Entries {
                entries,
                primary_last_lsn: self.view.last_lsn,
            },
            now,
        );
        Ok(())
    }

    /// The snapshot asked by [`Self::poll_read`] is open: it holds exactly
    /// the entries `<= lsn` and is `total_bytes` long.
    pub fn handle_snapshot_opened(
        &mut self,
        lsn: Lsn,
        epoch: Epoch,
        total_bytes: u64,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        self.pending = None;
        if !matches!(self.state, State::SnapshotOpening) {
            return Ok(());
        }
        if lsn.next() < self.view.oldest_lsn || lsn > self.view.last_lsn {
            return self.source_failed(format!(
                "snapshot at {lsn} does not meet the journal ({}..={})",
                self.view.oldest_lsn, self.view.last_lsn
            ));
        }
        if total_bytes > super::MAX_SNAPSHOT_BYTES {
            return self
                .source_failed(format!("snapshot of {total_bytes} bytes is over the limit"));
        }
        self.push(
            Message::SnapshotBegin {
                lsn,
                epoch,
                total_bytes,
            },
            now,
        );
        self.state = State::Snapshot {
            remaining: total_bytes,
            crc: 0,
        };
        self.finish_snapshot_if_done(now);
        Ok(())
    }

    /// The next piece of the snapshot has been read.
    pub fn handle_snapshot_chunk(
        &mut self,
        bytes: Vec<u8>,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        self.pending = None;
        let State::Snapshot { remaining, crc } = &mut self.state else {
            return Ok(());
        };
        let len = bytes.len() as u64;
        if bytes.is_empty() || len > *remaining || bytes.len() > MAX_SNAPSHOT_CHUNK_BYTES {
            let err = ProtocolError::Source(format!(
                "snapshot read gave {len} bytes with {remaining} remaining"
            ));
            self.close(err.clone());
            return Err(err);
        }
        *remaining -= len;
        *crc = crc32c::crc32c_append(*crc, &bytes);
        self.push(Message::SnapshotChunk { bytes }, now);
        self.finish_snapshot_if_done(now);
        Ok(())
    }

    fn finish_snapshot_if_done(&mut self, now: Instant) {
        if let State::Snapshot { remaining: 0, crc } = self.state {
            self.push(Message::SnapshotEnd { checksum: crc }, now);
            self.state = State::AwaitingSubscribe;
        }
    }

    /// The driver's journal read failed (for example the entries were
    /// trimmed meanwhile): the session closes and the mirror will
    /// resubscribe.
    pub fn handle_read_failed(&mut self, reason: String) {
        self.pending = None;
        let err = ProtocolError::Source(reason);
        self.outbox.push_back(Message::Refused {
            code: RefuseCode::Other,
            reason: truncate_reason(err.to_string()),
        });
        self.close(err);
    }

    /// Time has passed: heartbeats and timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if now >= self.last_heard + self.cfg.idle_timeout {
            self.close(ProtocolError::Timeout("mirror silent"));
            return;
        }
        if !self.in_flight.is_empty() && now >= self.waiting_ack_since + self.cfg.ack_timeout {
            self.close(ProtocolError::Timeout("no ack progress"));
            return;
        }
        if now >= self.last_sent + self.cfg.heartbeat_interval && self.outbox.is_empty() {
            self.push(
                Message::Heartbeat {
                    primary_last_lsn: self.view.last_lsn,
                    epoch: self.view.history.current(),
                },
                now,
            );
        }
    }

    /// When [`Self::handle_timeout`] next needs to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let mut t = (self.last_heard + self.cfg.idle_timeout)
            .min(self.last_sent + self.cfg.heartbeat_interval);
        if !self.in_flight.is_empty() {
            t = t.min(self.waiting_ack_since + self.cfg.ack_timeout);
        }
        Some(t)
    }

    /// The next read the driver should perform, if any. Only one read is
    /// outstanding at a time, and only while the outbox is empty.
    pub fn poll_read(&mut self) -> Option<ReadRequest> {
        if self.pending.is_some() || !self.outbox.is_empty() {
            return None;
        }
        let req = match self.state {
            State::Streaming => {
                if self.next_lsn > self.view.last_lsn
                    || self.in_flight_bytes >= self.cfg.max_in_flight_bytes
                {
                    return None;
                }
                ReadRequest::Entries {
                    from_lsn: self.next_lsn,
                    max_entries: self.cfg.max_batch_entries.clamp(1, MAX_BATCH_ENTRIES),
                    max_bytes: self
                        .cfg
                        .max_batch_bytes
                        .min(MAX_BATCH_BYTES)
                        .min(self.cfg.max_in_flight_bytes - self.in_flight_bytes)
                        .max(1),
                }
            }
            State::SnapshotOpening => ReadRequest::OpenSnapshot,
            State::Snapshot { remaining, .. } => ReadRequest::SnapshotChunk {
                max_bytes: usize::try_from(remaining).unwrap_or(usize::MAX).min(
                    self.cfg
                        .snapshot_chunk_bytes
                        .clamp(1, MAX_SNAPSHOT_CHUNK_BYTES),
                ),
            },
            State::AwaitingSubscribe | State::Closed => return None,
        };
        self.pending = Some(req.clone());
        Some(req)
    }

    /// The next message to send to the mirror.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.outbox.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<PrimaryEvent> {
        self.events.pop_front()
    }

    fn source_failed(&mut self, reason: String) -> Result<(), ProtocolError> {
        let err = ProtocolError::Source(reason.clone());
        self.handle_read_failed(reason);
        Err(err)
    }

    fn push(&mut self, msg: Message, now: Instant) {
        self.last_sent = now;
        self.outbox.push_back(msg);
    }

    fn close(&mut self, error: ProtocolError) {
        if !self.is_closed() {
            self.state = State::Closed;
            self.events.push_back(PrimaryEvent::Closed { error });
        }
    }
}

fn truncate_reason(mut s: String) -> String {
    let max = crate::frame::MAX_REASON_BYTES;
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}
