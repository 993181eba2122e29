//! Simulated-time, simulated-network tests: a primary session and a mirror
//! session driven against each other through in-test queues, every message
//! going through the real wire encoding.

use super::*;
use crate::frame::{self, FramedEntry, Message, RefuseCode};
use crate::types::{Epoch, Lsn, NodeId};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

const DB: [u8; 16] = [9; 16];
const TICK: Duration = Duration::from_millis(1);

/// The primary's journal.
struct Journal {
    entries: Vec<FramedEntry>,
    oldest: Lsn,
    history: Vec<(Epoch, Lsn)>,
    snapshot: Vec<u8>,
}

impl Journal {
    fn new() -> Self {
        Journal {
            entries: Vec::new(),
            oldest: Lsn(1),
            history: vec![(Epoch(1), Lsn(1))],
            snapshot: Vec::new(),
        }
    }

    fn last(&self) -> Lsn {
        self.entries.last().map_or(Lsn::ZERO, |e| e.lsn)
    }

    fn append(&mut self, n: usize, payload_len: usize) {
        let epoch = self.history.last().unwrap().0;
        for _ in 0..n {
            let lsn = self.last().next();
            let payload = vec![(lsn.0 % 251) as u8; payload_len];
            self.entries
                .push(FramedEntry::encode(lsn, epoch, lsn.0, &payload));
        }
    }

    fn view(&self) -> JournalView {
        JournalView {
            db_id: DB,
            last_lsn: self.last(),
            oldest_lsn: self.oldest,
            history: EpochHistory::new(self.history.clone()).unwrap(),
        }
    }

    fn read(&self, from: Lsn, max_entries: usize, max_bytes: usize) -> Vec<FramedEntry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in self.entries.iter().filter(|e| e.lsn >= from) {
            if out.len() == max_entries || (!out.is_empty() && bytes + e.wire_len() > max_bytes) {
                break;
            }
            bytes += e.wire_len();
            out.push(e.clone());
        }
        out
    }
}

/// The mirror's journal: what was appended and what is durable.
#[derive(Default)]
struct Sink {
    entries: Vec<FramedEntry>,
    flushed: Lsn,
    applied: Lsn,
    snapshot: Option<(Lsn, Epoch, Vec<u8>)>,
    receiving: Vec<u8>,
    /// Flushes scheduled by the sink's (simulated) disk.
    pending_flush: VecDeque<(Instant, Lsn)>,
    truncations: Vec<Lsn>,
}

impl Sink {
    fn last(&self) -> (Lsn, Epoch) {
        match (self.entries.last(), &self.snapshot) {
            (Some(e), _) => (e.lsn, e.epoch),
            (None, Some((l, ep, _))) => (*l, *ep),
            (None, None) => (Lsn::ZERO, Epoch(0)),
        }
    }
}

struct Sim {
    t0: Instant,
    now: Instant,
    journal: Journal,
    sink: Sink,
    primary: PrimarySession,
    mirror: MirrorSession,
    pcfg: PrimaryConfig,
    mcfg: MirrorConfig,
    to_mirror: VecDeque<(Instant, Vec<u8>)>,
    to_primary: VecDeque<(Instant, Vec<u8>)>,
    latency: Duration,
    flush_delay: Duration,
    /// The mirror neither reads the network nor flushes.
    mirror_stalled: bool,
    mirror_error: Option<ProtocolError>,
    primary_events: Vec<PrimaryEvent>,
    max_queued_to_mirror: usize,
    node: NodeId,
    fence: Epoch,
    snapshot_pos: usize,
}

impl Sim {
    fn new(journal: Journal, pcfg: PrimaryConfig) -> Self {
        let t0 = Instant::now();
        let mcfg = MirrorConfig {
            ack_interval: Duration::from_millis(50),
            idle_timeout: Duration::from_secs(2),
        };
        let node = NodeId::from("m1");
        let sink = Sink::default();
        let primary = PrimarySession::new(pcfg.clone(), journal.view(), t0);
        let mirror = MirrorSession::new(mcfg.clone(), start(&node, &sink, Epoch(0)), t0);
        Sim {
            t0,
            now: t0,
            journal,
            sink,
            primary,
            mirror,
            pcfg,
            mcfg,
            to_mirror: VecDeque::new(),
            to_primary: VecDeque::new(),
            latency: Duration::from_millis(5),
            flush_delay: Duration::from_millis(2),
            mirror_stalled: false,
            mirror_error: None,
            primary_events: Vec::new(),
            max_queued_to_mirror: 0,
            node,
            fence: Epoch(0),
            snapshot_pos: 0,
        }
    }

    /// Drops both connections and starts fresh sessions from the sink's
    /// durable position, as the driver does after a reconnect.
    fn reconnect(&mut self) {
        self.to_mirror.clear();
        self.to_primary.clear();
        // The driver finishes the sink's outstanding work before dialing again.
        while let Some((_, lsn)) = self.sink.pending_flush.pop_front() {
            self.sink.flushed = self.sink.flushed.max(lsn);
            self.sink.applied = self.sink.flushed;
        }
        self.fence = self.fence.max(self.mirror.highest_epoch());
        self.primary = PrimarySession::new(self.pcfg.clone(), self.journal.view(), self.now);
        self.mirror = MirrorSession::new(
            self.mcfg.clone(),
            start(&self.node, &self.sink, self.fence),
            self.now,
        );
        self.mirror_error = None;
    }

    fn elapsed_ms(&self) -> u128 {
        (self.now - self.t0).as_millis()
    }

    fn step(&mut self) {
        let now = self.now;
        // Primary: journal, reads, timeouts, sends.
        self.primary.handle_journal(self.journal.view());
        if self.primary.poll_timeout().is_some_and(|t| now >= t) {
            self.primary.handle_timeout(now);
        }
        loop {
            while let Some(req) = self.primary.poll_read() {
                match req {
                    ReadRequest::Entries {
                        from_lsn,
                        max_entries,
                        max_bytes,
                    } => {
                        let got = self.journal.read(from_lsn, max_entries, max_bytes);
                        self.primary.handle_entries(got, now).unwrap();
                    }
                    ReadRequest::OpenSnapshot => {
                        let (lsn, epoch) = (
                            self.journal.oldest.0.checked_sub(1).map_or(Lsn::ZERO, Lsn),
                            self.journal.history.last().unwrap().0,
                        );
                        let total = self.journal.snapshot.len() as u64;
                        self.primary
                            .handle_snapshot_opened(lsn, epoch, total, now)
                            .unwrap();
                        self.snapshot_pos = 0;
                    }
                    ReadRequest::SnapshotChunk { max_bytes } => {
                        let end = (self.snapshot_pos + max_bytes).min(self.journal.snapshot.len());
                        let chunk = self.journal.snapshot[self.snapshot_pos..end].to_vec();
                        self.snapshot_pos = end;
                        self.primary.handle_snapshot_chunk(chunk, now).unwrap();
                    }
                }
            }
            let Some(msg) = self.primary.poll_transmit() else {
                break;
            };
            self.to_mirror
                .push_back((now + self.latency, frame::encode(&msg).unwrap()));
        }
        while let Some(ev) = self.primary.poll_event() {
            self.primary_events.push(ev);
        }
        self.max_queued_to_mirror = self
            .max_queued_to_mirror
            .max(self.to_mirror.iter().map(|(_, b)| b.len()).sum::<usize>());

        // Mirror: receive, act on the sink, ack.
        if !self.mirror_stalled && self.mirror_error.is_none() {
            while self.to_mirror.front().is_some_and(|(t, _)| *t <= now) {
                let (_, bytes) = self.to_mirror.pop_front().unwrap();
                let (msg, _) = frame::decode(&bytes).unwrap().unwrap();
                if let Err(e) = self.mirror.handle_message(msg, now) {
                    self.mirror_error = Some(e);
                    break;
                }
            }
            self.run_mirror_actions();
            while self
                .sink
                .pending_flush
                .front()
                .is_some_and(|(t, _)| *t <= now)
            {
                let (_, lsn) = self.sink.pending_flush.pop_front().unwrap();
                self.sink.flushed = lsn;
                self.sink.applied = lsn;
                self.mirror.handle_flushed(lsn);
                self.mirror.handle_applied(lsn);
            }
            if now >= self.mirror.poll_timeout()
                && let Err(e) = self.mirror.handle_timeout(now)
            {
                self.mirror_error = Some(e);
            }
            while let Some(msg) = self.mirror.poll_transmit(now) {
                self.to_primary
                    .push_back((now + self.latency, frame::encode(&msg).unwrap()));
            }
        }

        // Primary receives.
        while self.to_primary.front().is_some_and(|(t, _)| *t <= now) {
            let (_, bytes) = self.to_primary.pop_front().unwrap();
            let (msg, _) = frame::decode(&bytes).unwrap().unwrap();
            let _ = self.primary.handle_message(msg, now);
        }
        self.now += TICK;
    }

    fn run_mirror_actions(&mut self) {
        let now = self.now;
        while let Some(action) = self.mirror.poll_action() {
            match action {
                MirrorAction::Append(entries) => {
                    for e in entries {
                        let (last, _) = self.sink.last();
                        assert_eq!(e.lsn, last.next(), "sink got a duplicate or a gap");
                        self.sink.entries.push(e);
                    }
                    let last = self.sink.last().0;
                    self.sink
                        .pending_flush
                        .push_back((now + self.flush_delay, last));
                }
                MirrorAction::Truncate { fork_lsn } => {
                    self.sink.truncations.push(fork_lsn);
                    self.sink.entries.retain(|e| e.lsn < fork_lsn);
                    let (l, ep) = self.sink.last();
                    self.sink.flushed = l;
                    self.sink.applied = self.sink.applied.min(l);
                    self.mirror.handle_truncated(l, ep, self.sink.applied);
                }
                MirrorAction::AdoptDatabase { db_id } => assert_eq!(db_id, DB),
                MirrorAction::BeginSnapshot { .. } => self.sink.receiving.clear(),
                MirrorAction::SnapshotChunk(b) => self.sink.receiving.extend_from_slice(&b),
                MirrorAction::InstallSnapshot { lsn, epoch } => {
                    self.sink.entries.clear();
                    self.sink.snapshot =
                        Some((lsn, epoch, std::mem::take(&mut self.sink.receiving)));
                    self.sink.flushed = lsn;
                    self.sink.applied = lsn;
                    self.mirror.handle_snapshot_installed(lsn, epoch);
                }
            }
        }
    }

    fn run_until(&mut self, limit_ms: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let deadline = self.now + Duration::from_millis(limit_ms);
        while self.now < deadline {
            self.step();
            if done(self) {
                return true;
            }
        }
        false
    }

    fn caught_up(&self) -> bool {
        self.sink.flushed == self.journal.last() && self.primary.acked().0 == self.journal.last()
    }

    fn assert_identical(&self) {
        let from = self.sink.entries.first().map_or(Lsn(1), |e| e.lsn);
        let want: Vec<_> = self
            .journal
            .entries
            .iter()
            .filter(|e| e.lsn >= from)
            .collect();
        let got: Vec<_> = self.sink.entries.iter().collect();
        assert_eq!(got, want, "mirror journal differs from primary's");
    }
}

fn start(node: &NodeId, sink: &Sink, fence: Epoch) -> MirrorStart {
    let (last_lsn, last_epoch) = sink.last();
    MirrorStart {
        node: node.clone(),
        db_id: if last_lsn == Lsn::ZERO { [0; 16] } else { DB },
        last_lsn,
        last_epoch,
        applied_lsn: sink.applied,
        fence_epoch: fence,
    }
}

/// A random seed, or `MIRRORDB_SEED` to replay a failure.
fn seed() -> u64 {
    let seed = std::env::var("MIRRORDB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "seed = {seed} (replay with MIRRORDB_SEED={seed} cargo test -p mirrordb-replication)"
    );
    seed
}

fn small_batches() -> PrimaryConfig {
    PrimaryConfig {
        max_batch_entries: 8,
        max_batch_bytes: 4096,
        max_in_flight_bytes: 16 * 1024,
        heartbeat_interval: Duration::from_millis(20),
        ack_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(2),
        snapshot_chunk_bytes: 1000,
    }
}

#[test]
fn streams_everything_and_acks_catch_up() {
    let mut j = Journal::new();
    j.append(200, 100);
    let mut sim = Sim::new(j, small_batches());
    assert!(sim.run_until(2000, Sim::caught_up), "did not catch up");
    sim.assert_identical();
    // Live appends keep flowing.
    sim.journal.append(50, 10);
    assert!(sim.run_until(2000, Sim::caught_up));
    sim.assert_identical();
    assert!(sim.mirror_error.is_none());
    assert!(sim.primary_events.iter().any(|e| matches!(
        e,
        PrimaryEvent::Subscribed {
            from_lsn: Lsn(1),
            ..
        }
    )));
}

#[test]
fn connection_loss_mid_batch_resumes_without_duplicates() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut j = Journal::new();
    j.append(500, 64);
    let mut sim = Sim::new(j, small_batches());
    for round in 0..10 {
        let run_ms = rng.random_range(1..40);
        sim.run_until(run_ms, |_| false);
        // Drop the links with frames still in the air.
        sim.reconnect();
        if round % 3 == 0 {
            sim.journal.append(20, 64);
        }
    }
    assert!(
        sim.run_until(5000, Sim::caught_up),
        "seed {seed}: did not catch up"
    );
    sim.assert_identical();
}

#[test]
fn duplicates_after_reconnect_are_skipped() {
    let t = Instant::now();
    let node = NodeId::from("m1");
    let mut m = MirrorSession::new(
        MirrorConfig::default(),
        MirrorStart {
            node,
            db_id: DB,
            last_lsn: Lsn(10),
            last_epoch: Epoch(1),
            applied_lsn: Lsn(10),
            fence_epoch: Epoch(1),
        },
        t,
    );
    assert!(matches!(
        m.poll_transmit(t),
        Some(Message::Subscribe {
            last_lsn: Lsn(10),
            ..
        })
    ));
    m.handle_message(
        Message::Streaming {
            from_lsn: Lsn(11),
            epoch: Epoch(1),
            db_id: DB,
        },
        t,
    )
    .unwrap();
    let entries = (8..=15)
        .map(|l| FramedEntry::encode(Lsn(l), Epoch(1), 0, b"x"))
        .collect();
    m.handle_message(
        Message::Entries {
            entries,
            primary_last_lsn: Lsn(0),
        },
        t,
    )
    .unwrap();
    assert_eq!(m.duplicates(), 3);
    match m.poll_action() {
        Some(MirrorAction::Append(got)) => {
            assert_eq!(got.first().unwrap().lsn, Lsn(11));
            assert_eq!(got.last().unwrap().lsn, Lsn(15));
        }
        other => panic!("expected an append, got {other:?}"),
    }
    // A batch entirely of duplicates appends nothing.
    let again = (12..=15)
        .map(|l| FramedEntry::encode(Lsn(l), Epoch(1), 0, b"x"))
        .collect();
    m.handle_message(
        Message::Entries {
            entries: again,
            primary_last_lsn: Lsn(0),
        },
        t,
    )
    .unwrap();
    assert_eq!(m.poll_action(), None);
    // A gap is an error.
    let gap = vec![FramedEntry::encode(Lsn(17), Epoch(1), 0, b"x")];
    assert_eq!(
        m.handle_message(
            Message::Entries {
                entries: gap,
                primary_last_lsn: Lsn(0)
            },
            t
        ),
        Err(ProtocolError::Gap {
            expected: Lsn(16),
            got: Lsn(17)
        })
    );
}

#[test]
fn stalled_mirror_bounds_primary_buffering_and_times_out() {
    let mut j = Journal::new();
    j.append(2000, 200);
    let cfg = small_batches();
    let window = cfg.max_in_flight_bytes;
    let mut sim = Sim::new(j, cfg);
    // Let the subscription happen, then stall the mirror.
    sim.run_until(20, |s| s.mirror.is_streaming());
    sim.mirror_stalled = true;
    sim.run_until(400, |_| false);
    assert!(
        sim.primary.in_flight_bytes() <= window + frame::MAX_ENTRY_BYTES.min(300),
        "in flight {} > window {window}",
        sim.primary.in_flight_bytes()
    );
    assert!(
        sim.max_queued_to_mirror <= window + 4096,
        "queued {} bytes",
        sim.max_queued_to_mirror
    );
    assert!(!sim.primary.is_closed());
    // No ack progress for ack_timeout closes the session.
    sim.run_until(1000, |s| s.primary.is_closed());
    assert!(sim.primary.is_closed());
    assert!(sim.primary_events.iter().any(|e| matches!(
        e,
        PrimaryEvent::Closed {
            error: ProtocolError::Timeout(_)
        }
    )));
}

#[test]
fn slow_acknowledgements_throttle_but_complete() {
    let mut j = Journal::new();
    j.append(300, 200);
    let cfg = small_batches();
    let window = cfg.max_in_flight_bytes;
    let mut sim = Sim::new(j, cfg);
    sim.flush_delay = Duration::from_millis(150);
    let mut max_in_flight = 0;
    let done = sim.run_until(20_000, |s| {
        max_in_flight = max_in_flight.max(s.primary.in_flight_bytes());
        s.caught_up()
    });
    assert!(done, "did not catch up");
    assert!(max_in_flight <= window + 300);
    sim.assert_identical();
    assert!(!sim.primary.is_closed());
    // Throttled: 300 * ~250 bytes through a 16 KiB window with 150 ms
    // flushes takes several round trips.
    assert!(sim.elapsed_ms() > 400, "took {} ms", sim.elapsed_ms());
}

#[test]
fn heartbeats_flow_while_idle_and_silence_times_out() {
    let mut j = Journal::new();
    j.append(5, 10);
    let mut sim = Sim::new(j, small_batches());
    assert!(sim.run_until(1000, Sim::caught_up));
    // Idle for a while: heartbeats and keep-alive acks keep both alive.
    sim.run_until(5000, |_| false);
    assert!(!sim.primary.is_closed());
    assert!(sim.mirror_error.is_none());
    assert_eq!(sim.mirror.primary_last_lsn(), Lsn(5));
    // The primary goes silent: the mirror gives up after its idle timeout.
    let t = sim.now;
    let mut m = MirrorSession::new(
        MirrorConfig::default(),
        start(&NodeId::from("m1"), &sim.sink, Epoch(1)),
        t,
    );
    assert_eq!(m.handle_timeout(t + Duration::from_millis(10)), Ok(()));
    assert_eq!(
        m.handle_timeout(t + MirrorConfig::default().idle_timeout),
        Err(ProtocolError::Timeout("primary silent"))
    );
}

#[test]
fn epoch_change_is_followed_and_old_primary_is_fenced() {
    let mut j = Journal::new();
    j.append(10, 10);
    let mut sim = Sim::new(j, small_batches());
    assert!(sim.run_until(1000, Sim::caught_up));
    // A new primary (epoch 2) continues the same history from LSN 11.
    let old = Journal {
        entries: sim.journal.entries.clone(),
        oldest: Lsn(1),
        history: sim.journal.history.clone(),
        snapshot: Vec::new(),
    };
    sim.journal.history.push((Epoch(2), Lsn(11)));
    sim.journal.append(10, 10);
    sim.reconnect();
    assert!(sim.run_until(1000, Sim::caught_up));
    sim.assert_identical();
    assert_eq!(sim.sink.last(), (Lsn(20), Epoch(2)));
    assert_eq!(sim.mirror.highest_epoch(), Epoch(2));

    // The deposed primary (still at epoch 1) refuses a mirror that has seen 2.
    let t = sim.now;
    let mut deposed = PrimarySession::new(small_batches(), old.view(), t);
    let sub = Message::Subscribe {
        node: NodeId::from("m1"),
        db_id: DB,
        last_lsn: Lsn(20),
        last_epoch: Epoch(2),
    };
    assert!(matches!(
        deposed.handle_message(sub, t),
        Err(ProtocolError::Refused {
            code: RefuseCode::StalePrimary,
            ..
        })
    ));
    // And a mirror that has seen epoch 2 refuses anything an epoch-1 primary
    // says, even if it got through.
    let mut m = MirrorSession::new(
        MirrorConfig::default(),
        start(&NodeId::from("m1"), &sim.sink, sim.mirror.highest_epoch()),
        t,
    );
    assert_eq!(
        m.handle_message(
            Message::Streaming {
                from_lsn: Lsn(21),
                epoch: Epoch(1),
                db_id: DB
            },
            t
        ),
        Err(ProtocolError::StaleEpoch {
            seen: Epoch(2),
            got: Epoch(1)
        })
    );
    assert!(matches!(
        m.handle_message(
            Message::Heartbeat {
                primary_last_lsn: Lsn(30),
                epoch: Epoch(1)
            },
            t
        ),
        Err(ProtocolError::StaleEpoch { .. })
    ));
}

#[test]
fn entry_epoch_going_backwards_is_rejected() {
    let t = Instant::now();
    let mut m = MirrorSession::new(
        MirrorConfig::default(),
        MirrorStart {
            node: NodeId::from("m1"),
            db_id: DB,
            last_lsn: Lsn(5),
            last_epoch: Epoch(3),
            applied_lsn: Lsn(5),
            fence_epoch: Epoch(3),
        },
        t,
    );
    m.handle_message(
        Message::Streaming {
            from_lsn: Lsn(6),
            epoch: Epoch(3),
            db_id: DB,
        },
        t,
    )
    .unwrap();
    let e = vec![FramedEntry::encode(Lsn(6), Epoch(2), 0, b"old")];
    assert!(matches!(
        m.handle_message(
            Message::Entries {
                entries: e,
                primary_last_lsn: Lsn(0)
            },
            t
        ),
        Err(ProtocolError::EntryEpoch { .. })
    ));
}

#[test]
fn divergent_tail_is_truncated_then_streaming_resumes() {
    // The mirror followed an old primary in epoch 1 up to LSN 15, but the
    // cluster promoted epoch 2 at LSN 11: 11..=15 are a divergent tail.
    let mut j = Journal::new();
    j.append(10, 10);
    j.history.push((Epoch(2), Lsn(11)));
    j.append(10, 10);
    let mut sim = Sim::new(j, small_batches());
    for l in 1..=15u64 {
        let e = if l <= 10 {
            sim.journal.entries[(l - 1) as usize].clone()
        } else {
            FramedEntry::encode(Lsn(l), Epoch(1), 0, b"divergent")
        };
        sim.sink.entries.push(e);
    }
    sim.sink.flushed = Lsn(15);
    sim.sink.applied = Lsn(15);
    sim.reconnect();
    assert!(sim.run_until(2000, Sim::caught_up));
    assert_eq!(sim.sink.truncations, vec![Lsn(11)]);
    sim.assert_identical();
    assert_eq!(sim.sink.last(), (Lsn(20), Epoch(2)));
}

#[test]
fn far_behind_mirror_is_reseeded_from_a_snapshot() {
    let mut j = Journal::new();
    j.append(100, 10);
    // Entries up to 60 were archived away; a snapshot at 60 replaces them.
    j.oldest = Lsn(61);
    j.snapshot = (0..5000u32).map(|i| (i % 253) as u8).collect();
    let mut sim = Sim::new(j, small_batches());
    assert!(sim.run_until(3000, Sim::caught_up), "did not catch up");
    let (lsn, epoch, bytes) = sim.sink.snapshot.clone().unwrap();
    assert_eq!((lsn, epoch), (Lsn(60), Epoch(1)));
    assert_eq!(bytes, sim.journal.snapshot);
    assert_eq!(sim.sink.entries.first().unwrap().lsn, Lsn(61));
    sim.assert_identical();
}

#[test]
fn corrupted_snapshot_is_rejected() {
    let t = Instant::now();
    let mut m = MirrorSession::new(
        MirrorConfig::default(),
        MirrorStart {
            node: NodeId::from("m1"),
            db_id: [0; 16],
            last_lsn: Lsn(0),
            last_epoch: Epoch(0),
            applied_lsn: Lsn(0),
            fence_epoch: Epoch(0),
        },
        t,
    );
    let reseed = Message::NeedsReseed {
        oldest_lsn: Lsn(50),
        primary_last_lsn: Lsn(80),
        db_id: DB,
    };
    m.handle_message(reseed, t).unwrap();
    let begin = Message::SnapshotBegin {
        lsn: Lsn(49),
        epoch: Epoch(1),
        total_bytes: 4,
    };
    m.handle_message(begin, t).unwrap();
    m.handle_message(
        Message::SnapshotChunk {
            bytes: vec![1, 2, 3, 4],
        },
        t,
    )
    .unwrap();
    assert_eq!(
        m.handle_message(Message::SnapshotEnd { checksum: 7 }, t),
        Err(ProtocolError::Snapshot("checksum mismatch"))
    );
}

#[test]
fn subscription_decision_table() {
    let view = JournalView {
        db_id: DB,
        last_lsn: Lsn(100),
        oldest_lsn: Lsn(20),
        history: EpochHistory::new(vec![
            (Epoch(1), Lsn(1)),
            (Epoch(3), Lsn(40)),
            (Epoch(4), Lsn(70)),
        ])
        .unwrap(),
    };
    let d = |db, l, e| decide_subscription(&view, db, Lsn(l), Epoch(e));
    use SubscribeDecision::*;
    assert_eq!(d(DB, 50, 3), Stream { from_lsn: Lsn(51) });
    assert_eq!(d(DB, 100, 4), Stream { from_lsn: Lsn(101) });
    assert_eq!(d(DB, 19, 1), Stream { from_lsn: Lsn(20) });
    assert_eq!(d(DB, 39, 1), Stream { from_lsn: Lsn(40) });
    assert_eq!(d(DB, 45, 1), Diverged { fork_lsn: Lsn(40) });
    assert_eq!(d(DB, 90, 3), Diverged { fork_lsn: Lsn(70) });
    assert_eq!(d(DB, 10, 1), NeedsReseed);
    assert_eq!(d(DB, 0, 0), NeedsReseed);
    assert_eq!(d([0; 16], 0, 0), NeedsReseed);
    assert_eq!(d(DB, 50, 2), NeedsReseed, "epoch not in the history");
    assert_eq!(d(DB, 30, 3), NeedsReseed, "lsn before its epoch began");
    assert!(matches!(
        d(DB, 50, 5),
        Refuse {
            code: RefuseCode::StalePrimary,
            ..
        }
    ));
    assert!(matches!(
        d(DB, 101, 4),
        Refuse {
            code: RefuseCode::MirrorAhead,
            ..
        }
    ));
    assert!(matches!(
        d([1; 16], 50, 3),
        Refuse {
            code: RefuseCode::DatabaseMismatch,
            ..
        }
    ));
    let fresh = JournalView {
        oldest_lsn: Lsn(1),
        ..view.clone()
    };
    assert_eq!(
        decide_subscription(&fresh, [0; 16], Lsn(0), Epoch(0)),
        Stream { from_lsn: Lsn(1) }
    );
    assert!(EpochHistory::new(vec![(Epoch(2), Lsn(5)), (Epoch(1), Lsn(6))]).is_err());
    assert!(EpochHistory::new(vec![(Epoch(1), Lsn(5)), (Epoch(2), Lsn(4))]).is_err());
}

#[test]
fn bad_acks_close_the_session() {
    let t = Instant::now();
    let mut j = Journal::new();
    j.append(3, 1);
    let mut p = PrimarySession::new(PrimaryConfig::default(), j.view(), t);
    p.handle_message(
        Message::Subscribe {
            node: NodeId::from("m1"),
            db_id: DB,
            last_lsn: Lsn(1),
            last_epoch: Epoch(1),
        },
        t,
    )
    .unwrap();
    // Claims an entry never sent.
    assert!(matches!(
        p.handle_message(
            Message::Ack {
                flushed_lsn: Lsn(3),
                applied_lsn: Lsn(1)
            },
            t
        ),
        Err(ProtocolError::BadAck { .. })
    ));
    assert!(p.is_closed());
    let mut sent = Vec::new();
    while let Some(m) = p.poll_transmit() {
        sent.push(m);
    }
    assert!(matches!(
        sent.last(),
        Some(Message::Refused {
            code: RefuseCode::ProtocolViolation,
            ..
        })
    ));
}

#[test]
fn randomized_network_delays_keep_the_journals_identical() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut j = Journal::new();
    j.append(50, 30);
    let mut sim = Sim::new(j, small_batches());
    for _ in 0..30 {
        sim.latency = Duration::from_millis(rng.random_range(0..20));
        sim.flush_delay = Duration::from_millis(rng.random_range(0..30));
        sim.journal
            .append(rng.random_range(0..30), rng.random_range(0..300));
        sim.run_until(rng.random_range(1..60), |_| false);
        if rng.random_bool(0.2) {
            sim.reconnect();
        }
        assert!(
            sim.mirror_error.is_none(),
            "seed {seed}: {:?}",
            sim.mirror_error
        );
    }
    assert!(sim.run_until(20_000, Sim::caught_up), "seed {seed}");
    sim.assert_identical();
}

fn subscribed_primary(j: &Journal, last: u64, epoch: u64, t: Instant) -> PrimarySession {
    let mut p = PrimarySession::new(small_batches(), j.view(), t);
    p.handle_message(
        Message::Subscribe {
            node: NodeId::from("m1"),
            db_id: if last == 0 { [0; 16] } else { DB },
            last_lsn: Lsn(last),
            last_epoch: Epoch(epoch),
        },
        t,
    )
    .unwrap();
    p
}

#[test]
fn a_damaged_or_out_of_order_journal_read_is_never_shipped() {
    let t = Instant::now();
    let mut j = Journal::new();
    j.append(5, 10);
    // Damaged frame.
    let mut p = subscribed_primary(&j, 0, 0, t);
    assert!(matches!(p.poll_transmit(), Some(Message::Streaming { .. })));
    let Some(ReadRequest::Entries { from_lsn, .. }) = p.poll_read() else {
        panic!("expected a read");
    };
    let mut got = j.read(from_lsn, 8, 4096);
    got[2].bytes[40] ^= 0xff;
    assert!(matches!(
        p.handle_entries(got, t),
        Err(ProtocolError::Source(_))
    ));
    assert!(p.is_closed());
    let sent: Vec<_> = std::iter::from_fn(|| p.poll_transmit()).collect();
    assert!(sent.iter().all(|m| !matches!(m, Message::Entries { .. })));
    // Out of order.
    let mut p = subscribed_primary(&j, 0, 0, t);
    p.poll_transmit();
    p.poll_read().unwrap();
    let mut got = j.read(Lsn(1), 8, 4096);
    got.swap(0, 1);
    assert!(p.handle_entries(got, t).is_err());
    // More than asked for.
    let mut p = subscribed_primary(&j, 0, 0, t);
    p.poll_transmit();
    p.poll_read().unwrap();
    assert!(p.handle_entries(j.read(Lsn(1), 100, 1 << 20), t).is_ok());
    let mut cfg_small = small_batches();
    cfg_small.max_batch_entries = 2;
    let mut p = PrimarySession::new(cfg_small, j.view(), t);
    p.handle_message(
        Message::Subscribe {
            node: NodeId::from("m1"),
            db_id: [0; 16],
            last_lsn: Lsn(0),
            last_epoch: Epoch(0),
        },
        t,
    )
    .unwrap();
    p.poll_transmit();
    p.poll_read().unwrap();
    assert!(p.handle_entries(j.read(Lsn(1), 5, 1 << 20), t).is_err());
}

#[test]
fn a_snapshot_that_does_not_reach_the_journal_is_not_sent_or_repeated() {
    let t = Instant::now();
    let mut j = Journal::new();
    j.append(100, 10);
    j.oldest = Lsn(61);
    let mut p = subscribed_primary(&j, 0, 0, t);
    assert!(matches!(
        p.poll_transmit(),
        Some(Message::NeedsReseed { .. })
    ));
    assert_eq!(p.poll_read(), Some(ReadRequest::OpenSnapshot));
    // A snapshot at 40 leaves 41..=60 missing.
    assert!(p.handle_snapshot_opened(Lsn(40), Epoch(1), 10, t).is_err());
    assert!(p.is_closed());

    // A good snapshot, then a resubscription that still needs one: refused
    // rather than looping.
    let mut p = subscribed_primary(&j, 0, 0, t);
    p.poll_transmit();
    p.poll_read();
    p.handle_snapshot_opened(Lsn(60), Epoch(1), 0, t).unwrap();
    let sent: Vec<_> = std::iter::from_fn(|| p.poll_transmit()).collect();
    assert!(matches!(sent.last(), Some(Message::SnapshotEnd { .. })));
    let again = Message::Subscribe {
        node: NodeId::from("m1"),
        db_id: DB,
        last_lsn: Lsn(10),
        last_epoch: Epoch(1),
    };
    assert!(p.handle_message(again, t).is_err());
    assert!(p.is_closed());
}
