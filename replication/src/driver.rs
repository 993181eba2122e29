//! The thin tokio + quinn driver around the protocol state machines.
//!
//! ```text
//! primary:  Incoming.replication ──► serve_replication ──► one task per
//!           connection: accept a stream, PrimarySession, JournalSource reads,
//!           AckTracker updates
//! mirror:   run_mirror ──► dial the primary ──► open a stream ──► MirrorSession,
//!           JournalSink writes, acks ──► on any failure: back off, redial
//! ```
//!
//! The driver owns sockets, timers and the journal traits; every decision
//! is the session's. Each stream reads its peer's frames in a separate task
//! (frame reads are not cancel-safe) into a queue of depth
//! [`INBOX_DEPTH`]. Every write has a deadline, so a peer that stops reading
//! cannot hold a session forever.

use crate::FramedEntry;
use crate::endpoint::{
    CLOSE_PROTOCOL, CLOSE_SHUTDOWN, EndpointError, NodeEndpoint, PeerConnection, Service,
    recv_message, send_message,
};
use crate::frame::{Message, RefuseCode};
use crate::protocol::{
    JournalView, MirrorAction, MirrorConfig, MirrorSession, MirrorStart, PrimaryConfig,
    PrimaryEvent, PrimarySession, ReadRequest,
};
use crate::storage::{JournalSink, JournalSource, Snapshot, StorageError};
use crate::tracker::AckTracker;
use crate::types::{Epoch, Lsn, NodeId};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Frames read ahead from a peer before the reader waits.
pub const INBOX_DEPTH: usize = 16;
/// Longest time one frame write may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most concurrent replication sessions a primary serves.
pub const MAX_SESSIONS: usize = 64;
/// How long a closing session waits for the peer to read its last frames.
pub const LINGER: Duration = Duration::from_secs(1);

/// Why a session ended.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DriverError {
    /// Transport failure.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The protocol ended the session.
    #[error("protocol: {0}")]
    Protocol(#[from] crate::protocol::ProtocolError),
    /// The journal failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A write took longer than [`WRITE_TIMEOUT`].
    #[error("peer stopped reading")]
    WriteTimeout,
    /// The peer closed the stream.
    #[error("peer closed the stream")]
    PeerClosed,
    /// The peer claimed another identity than its certificate's.
    #[error("peer {cert} subscribed as {claimed}")]
    IdentityMismatch { cert: NodeId, claimed: NodeId },
}

fn spawn_reader(mut recv: quinn::RecvStream) -> mpsc::Receiver<Result<Message, EndpointError>> {
    let (tx, rx) = mpsc::channel(INBOX_DEPTH);
    tokio::spawn(async move {
        loop {
            let item = match recv_message(&mut recv).await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => return,
                Err(e) => Err(e),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    rx
}

async fn send(stream: &mut quinn::SendStream, msg: &Message) -> Result<(), DriverError> {
    match tokio::time::timeout(WRITE_TIMEOUT, send_message(stream, msg)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(DriverError::WriteTimeout),
    }
}

fn view<S: JournalSource>(source: &S, durable: Lsn) -> JournalView {
    JournalView {
        db_id: source.db_id(),
        last_lsn: durable,
        oldest_lsn: source.oldest_lsn(),
        history: source.epoch_history(),
    }
}

/// Open sessions per mirror.
#[derive(Debug, Default)]
struct LiveSessions(std::sync::Mutex<std::collections::HashMap<NodeId, usize>>);

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<NodeId, usize>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn enter(&self, node: &NodeId) {
        *self.lock().entry(node.clone()).or_insert(0) += 1;
    }

    /// Returns whether this was the node's last session.
    fn leave(&self, node: &NodeId) -> bool {
        let mut live = self.lock();
        let n = live.entry(node.clone()).or_insert(1);
        *n = n.saturating_sub(1);
        let last = *n == 0;
        if last {
            live.remove(node);
        }
        last
    }
}

/// Serves mirrors' subscriptions on accepted `mirrordb-repl/1` connections
/// until `incoming` closes or `shutdown` turns true (or its sender is
/// dropped). Progress goes to `tracker`.
///
/// On shutdown every open session is closed at once: a primary that steps
/// down must stop feeding mirrors immediately, not when they time out.
pub async fn serve_replication<S: JournalSource>(
    mut incoming: mpsc::Receiver<PeerConnection>,
    source: Arc<S>,
    tracker: Arc<AckTracker>,
    cfg: PrimaryConfig,
    shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS));
    // Sessions per mirror: a mirror that reconnects before its old session
    // has timed out is still connected when the old one ends.
    let live = Arc::new(LiveSessions::default());
    // Feed the tracker's clock for lag in milliseconds.
    let mut durable = source.durable_lsn();
    let tracker_clock = tracker.clone();
    let clock = tokio::spawn(async move {
        loop {
            let lsn = *durable.borrow_and_update();
            tracker_clock.note_durable(lsn, Instant::now());
            if durable.changed().await.is_err() {
                return;
            }
        }
    });
    let mut stop = shutdown.clone();
    loop {
        let pc = tokio::select! {
            pc = incoming.recv() => match pc {
                Some(pc) => pc,
                None => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(peer = %pc.node, "refusing replication session: too many sessions");
            pc.connection
                .close(crate::endpoint::CLOSE_BUSY.into(), b"busy");
            continue;
        };
        let (source, tracker, cfg, live) =
            (source.clone(), tracker.clone(), cfg.clone(), live.clone());
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let node = pc.node.clone();
            live.enter(&node);
            let connection = pc.connection.clone();
            let outcome = tokio::select! {
                r = serve_connection(pc, source, tracker.clone(), cfg) => r,
                _ = stop.wait_for(|s| *s) => {
                    info!(peer = %node, "closing replication session: primary stopping");
                    connection.close(CLOSE_SHUTDOWN.into(), b"primary stopping");
                    Ok(())
                }
            };
            match outcome {
                Ok(()) => debug!(peer = %node, "replication session ended"),
                Err(e) => {
                    warn!(peer = %node, error = %e, "replication session failed");
                    connection.close(CLOSE_PROTOCOL.into(), b"session failed");
                }
            }
            if live.leave(&node) {
                tracker.set_connected(&node, false);
            }
            drop(permit);
        });
    }
    clock.abort();
}

async fn serve_connection<S: JournalSource>(
    pc: PeerConnection,
    source: Arc<S>,
    tracker: Arc<AckTracker>,
    cfg: PrimaryConfig,
) -> Result<(), DriverError> {
    let (mut out, recv) = pc
        .connection
        .accept_bi()
        .await
        .map_err(EndpointError::from)?;
    let mut inbox = spawn_reader(recv);
    let mut durable = source.durable_lsn();
    let now = Instant::now();
    let mut session = PrimarySession::new(cfg, view(&*source, *durable.borrow_and_update()), now);
    let mut snapshot: Option<Snapshot> = None;
    loop {
        // Perform reads and flush the outbox until the session has nothing
        // more to do right now.
        loop {
            let mut busy = false;
            if let Some(req) = session.poll_read() {
                busy = true;
                do_read(&mut session, &*source, &mut snapshot, req).await;
            }
            while let Some(msg) = session.poll_transmit() {
                busy = true;
                send(&mut out, &msg).await?;
            }
            if !busy {
                break;
            }
        }
        while let Some(ev) = session.poll_event() {
            match ev {
                PrimaryEvent::Subscribed { node, from_lsn } => {
                    info!(peer = %node, from = %from_lsn, "mirror subscribed");
                    // Its journal is durable up to from - 1; applied is
                    // unknown until its first ack, which follows at once.
                    let before = Lsn(from_lsn.0.saturating_sub(1));
                    tracker.reset(&node, before, Lsn::ZERO, Instant::now());
                }
                PrimaryEvent::Acked {
                    flushed_lsn,
                    applied_lsn,
                    at,
                } => tracker.record(&pc.node, flushed_lsn, applied_lsn, at),
                PrimaryEvent::Closed { error } => {
                    // Let the mirror read the last frames (a `Refused`
                    // carries the reason) before the connection goes.
                    let _ = out.finish();
                    let _ = tokio::time::timeout(LINGER, pc.connection.closed()).await;
                    return Err(error.into());
                }
            }
        }
        let deadline = session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + WRITE_TIMEOUT);
        tokio::select! {
            msg = inbox.recv() => match msg {
                Some(Ok(msg)) => {
                    if let Message::Subscribe { node, .. } = &msg
                        && node != &pc.node
                    {
                        let refuse = Message::Refused {
                            code: RefuseCode::ProtocolViolation,
                            reason: format!("certificate says {}", pc.node),
                        };
                        let _ = send(&mut out, &refuse).await;
                        return Err(DriverError::IdentityMismatch {
                            cert: pc.node.clone(),
                            claimed: node.clone(),
                        });
                    }
                    // An error is also reported as a Closed event, handled above.
                    let _ = session.handle_message(msg, Instant::now());
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            changed = durable.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let lsn = *durable.borrow_and_update();
                session.handle_journal(view(&*source, lsn));
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                session.handle_timeout(Instant::now());
            }
        }
    }
}

async fn do_read<S: JournalSource>(
    session: &mut PrimarySession,
    source: &S,
    snapshot: &mut Option<Snapshot>,
    req: ReadRequest,
) {
    let now = Instant::now;
    match req {
        ReadRequest::Entries {
            from_lsn,
            max_entries,
            max_bytes,
        } => match source.read(from_lsn, max_entries, max_bytes).await {
            Ok(entries) => {
                let _ = session.handle_entries(entries, now());
            }
            Err(e) => session.handle_read_failed(e.to_string()),
        },
        ReadRequest::OpenSnapshot => match source.open_snapshot().await {
            Ok(s) => {
                // Taking a snapshot may itself journal (a barrier marker at
                // its LSN): refresh the session's view of the journal first,
                // or it would refuse a snapshot newer than what it saw.
                let durable = *source.durable_lsn().borrow();
                session.handle_journal(view(source, durable));
                let _ = session.handle_snapshot_opened(s.lsn, s.epoch, s.total_bytes, now());
                *snapshot = Some(s);
            }
            Err(e) => session.handle_read_failed(e.to_string()),
        },
        ReadRequest::SnapshotChunk { max_bytes } => {
            let Some(s) = snapshot.as_mut() else {
                session.handle_read_failed("no open snapshot".into());
                return;
            };
            let mut buf = vec![0u8; max_bytes];
            let mut filled = 0;
            while filled < max_bytes {
                match s.reader.read(&mut buf[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        session.handle_read_failed(format!("snapshot read: {e}"));
                        return;
                    }
                }
            }
            buf.truncate(filled);
            let _ = session.handle_snapshot_chunk(buf, now());
        }
    }
}

/// Where the primary is, as the control plane says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryAddr {
    /// The primary's node id (checked against its certificate).
    pub node: NodeId,
    /// Its replication address.
    pub addr: SocketAddr,
}

/// Options of [`run_mirror`].
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// Session timings.
    pub session: MirrorConfig,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// The newest epoch known from the control plane; primaries of older
    /// epochs are refused.
    pub fence_epoch: Epoch,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            session: MirrorConfig::default(),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            fence_epoch: Epoch(0),
        }
    }
}

/// What a running mirror knows of its own progress, for health checks
/// (`/mirror?max_lag_ms=`) and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorStatus {
    /// Whether a replication session is streaming.
    pub streaming: bool,
    /// The primary followed (or being dialed).
    pub primary: Option<NodeId>,
    /// Last entry durable on this mirror.
    pub flushed_lsn: Lsn,
    /// Last entry applied on this mirror.
    pub applied_lsn: Lsn,
    /// The primary's last durable LSN as last reported.
    pub primary_last_lsn: Lsn,
    /// The newest epoch seen.
    pub highest_epoch: Epoch,
    /// Last time this mirror had flushed everything the primary had
    /// reported.
    pub caught_up_at: Option<Instant>,
}

impl MirrorStatus {
    /// How far behind the primary this mirror is in time: zero when caught
    /// up, the time since it last was otherwise, `None` if it never was.
    pub fn lag(&self, now: Instant) -> Option<Duration> {
        if self.streaming && self.flushed_lsn >= self.primary_last_lsn {
            return Some(Duration::ZERO);
        }
        self.caught_up_at.map(|t| now.saturating_duration_since(t))
    }
}

fn publish(status: &watch::Sender<MirrorStatus>, session: &MirrorSession, streaming: bool) {
    let (flushed, applied) = session.acked();
    let primary_last = session.primary_last_lsn();
    status.send_modify(|s| {
        s.streaming = streaming;
        s.flushed_lsn = flushed;
        s.applied_lsn = applied;
        s.primary_last_lsn = s.primary_last_lsn.max(primary_last);
        s.highest_epoch = s.highest_epoch.max(session.highest_epoch());
        if streaming && flushed >= s.primary_last_lsn {
            s.caught_up_at = Some(Instant::now());
        }
    });
}

/// Why [`run_mirror`] stopped.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MirrorStopped {
    /// The mirror's journal failed; the node must stop.
    #[error("mirror journal failed: {0}")]
    Fatal(StorageError),
}

/// Follows the primary named by `primary` (redialing whenever it changes or
/// a session ends, with capped exponential backoff) and writes what it
/// sends to `sink`, until `shutdown` turns true (or either channel's sender
/// is dropped). Progress is published on `status`. Returns the sink, or the
/// fatal error that stopped it.
pub async fn run_mirror<K: JournalSink>(
    endpoint: NodeEndpoint,
    mut sink: K,
    mut primary: watch::Receiver<Option<PrimaryAddr>>,
    mut shutdown: watch::Receiver<bool>,
    opts: MirrorOptions,
    status: watch::Sender<MirrorStatus>,
) -> Result<K, MirrorStopped> {
    let mut backoff = opts.backoff_min;
    let mut fence = opts.fence_epoch;
    loop {
        // A dropped control channel means stop, too.
        if *shutdown.borrow_and_update()
            || shutdown.has_changed().is_err()
            || primary.has_changed().is_err()
        {
            return Ok(sink);
        }
        let target = primary.borrow_and_update().clone();
        let Some(target) = target else {
            tokio::select! {
                _ = primary.changed() => continue,
                _ = shutdown.changed() => continue,
            }
        };
        let started = Instant::now();
        status.send_modify(|s| s.primary = Some(target.node.clone()));
        let outcome = tokio::select! {
            r = mirror_session(&endpoint, &mut sink, &target, &opts.session, &mut fence, &status) => r,
            _ = primary.changed() => Ok(()),
            _ = shutdown.changed() => Ok(()),
        };
        status.send_modify(|s| s.streaming = false);
        match outcome {
            Ok(()) => {}
            Err(DriverError::Storage(e @ StorageError::Fatal(_))) => {
                warn!(primary = %target.node, error = %e, "mirror journal failed; stopping replication");
                return Err(MirrorStopped::Fatal(e));
            }
            Err(e) => warn!(primary = %target.node, error = %e, "replication session ended"),
        }
        // A session that lasted is not a failing one: start backoff over.
        if started.elapsed() > opts.backoff_max {
            backoff = opts.backoff_min;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {}
        }
        backoff = (backoff * 2).min(opts.backoff_max);
    }
}

async fn mirror_session<K: JournalSink>(
    endpoint: &NodeEndpoint,
    sink: &mut K,
    target: &PrimaryAddr,
    cfg: &MirrorConfig,
    fence: &mut Epoch,
    status: &watch::Sender<MirrorStatus>,
) -> Result<(), DriverError> {
    let pc = endpoint
        .connect(target.addr, &target.node, Service::Replication)
        .await?;
    let (mut out, recv) = pc.connection.open_bi().await.map_err(EndpointError::from)?;
    let mut inbox = spawn_reader(recv);
    let pos = sink.position();
    let mut applied = sink.applied_lsn();
    let mut applied_open = true;
    let mut session = MirrorSession::new(
        cfg.clone(),
        MirrorStart {
            node: endpoint.node().clone(),
            db_id: pos.db_id,
            last_lsn: pos.last_lsn,
            last_epoch: pos.last_epoch,
            applied_lsn: pos.applied_lsn,
            fence_epoch: *fence,
        },
        Instant::now(),
    );
    info!(primary = %target.node, from = %pos.last_lsn, "subscribing");
    let result = async {
        loop {
            // Batches that arrived while the sink was busy are appended
            // together: one write and one fsync for all of them (group
            // commit on the mirror), so a mirror that falls behind a busy
            // primary catches up instead of paying an fsync per batch.
            let mut merged: Vec<FramedEntry> = Vec::new();
            let mut merged_bytes = 0usize;
            while let Some(action) = session.poll_action() {
                let MirrorAction::Append(entries) = action else {
                    append_merged(&mut session, sink, &mut merged).await?;
                    merged_bytes = 0;
                    run_action(&mut session, sink, action).await?;
                    continue;
                };
                if merged.len() + entries.len() > MAX_MERGED_ENTRIES
                    || merged_bytes >= MAX_MERGED_BYTES
                {
                    append_merged(&mut session, sink, &mut merged).await?;
                    merged_bytes = 0;
                }
                merged_bytes += entries.iter().map(|e| e.bytes.len()).sum::<usize>();
                merged.extend(entries);
            }
            append_merged(&mut session, sink, &mut merged).await?;
            while let Some(msg) = session.poll_transmit(Instant::now()) {
                send(&mut out, &msg).await?;
            }
            *fence = (*fence).max(session.highest_epoch());
            publish(status, &session, session.is_streaming());
            let deadline = session.poll_timeout();
            tokio::select! {
                msg = inbox.recv() => match msg {
                    Some(Ok(msg)) => {
                        session.handle_message(msg, Instant::now())?;
                        // And whatever else has arrived meanwhile.
                        for _ in 0..INBOX_DEPTH {
                            match inbox.try_recv() {
                                Ok(Ok(msg)) => session.handle_message(msg, Instant::now())?,
                                Ok(Err(e)) => return Err(e.into()),
                                Err(_) => break,
                            }
                        }
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(DriverError::PeerClosed),
                },
                changed = applied.changed(), if applied_open => {
                    if changed.is_ok() {
                        let lsn = *applied.borrow_and_update();
                        session.handle_applied(lsn);
                    } else {
                        applied_open = false;
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    session.handle_timeout(Instant::now())?;
                }
            }
        }
    }
    .await;
    *fence = (*fence).max(session.highest_epoch());
    pc.connection.close(CLOSE_PROTOCOL.into(), b"session ended");
    result
}

/// Most entries the mirror appends (and fsyncs) at once.
const MAX_MERGED_ENTRIES: usize = 16 * 1024;
/// About the most bytes the mirror appends at once (one batch more may go).
const MAX_MERGED_BYTES: usize = 16 * 1024 * 1024;

async fn append_merged<K: JournalSink>(
    session: &mut MirrorSession,
    sink: &mut K,
    merged: &mut Vec<FramedEntry>,
) -> Result<(), DriverError> {
    if merged.is_empty() {
        return Ok(());
    }
    let flushed = sink.append(std::mem::take(merged)).await?;
    session.handle_flushed(flushed);
    Ok(())
}

async fn run_action<K: JournalSink>(
    session: &mut MirrorSession,
    sink: &mut K,
    action: MirrorAction,
) -> Result<(), DriverError> {
    match action {
        MirrorAction::AdoptDatabase { db_id } => sink.adopt_db_id(db_id).await?,
        MirrorAction::Append(entries) => {
            let flushed = sink.append(entries).await?;
            session.handle_flushed(flushed);
        }
        MirrorAction::Truncate { fork_lsn } => {
            let keep = Lsn(fork_lsn.0.saturating_sub(1));
            warn!(fork = %fork_lsn, "dropping divergent tail");
            let pos = sink.truncate_after(keep).await?;
            session.handle_truncated(pos.last_lsn, pos.last_epoch, pos.applied_lsn);
        }
        MirrorAction::BeginSnapshot {
            lsn,
            epoch,
            total_bytes,
        } => {
            info!(lsn = %lsn, bytes = total_bytes, "receiving a snapshot");
            sink.begin_snapshot(lsn, epoch, total_bytes).await?;
        }
        MirrorAction::SnapshotChunk(bytes) => sink.snapshot_chunk(bytes).await?,
        MirrorAction::InstallSnapshot { lsn, epoch } => {
            let pos = sink.install_snapshot().await?;
            if (pos.last_lsn, pos.last_epoch) != (lsn, epoch) {
                return Err(StorageError::Fatal(format!(
                    "installed snapshot reports {}/{} instead of {lsn}/{epoch}",
                    pos.last_lsn, pos.last_epoch
                ))
                .into());
            }
            session.handle_snapshot_installed(lsn, epoch);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{ClusterCa, NodeIdentity};
    use crate::endpoint::{EndpointOptions, Incoming};
    use crate::testing::{MemorySink, MemorySource};
    use std::sync::Mutex;

    const DB: [u8; 16] = [4; 16];

    fn identity(ca: &ClusterCa, node: &str) -> NodeIdentity {
        let cert = ca
            .issue(&NodeId::from(node), &["127.0.0.1".into()])
            .unwrap();
        NodeIdentity::from_issued(ca, &cert).unwrap()
    }

    fn bind(id: &NodeIdentity) -> (NodeEndpoint, Incoming) {
        NodeEndpoint::bind(
            id,
            "127.0.0.1:0".parse().unwrap(),
            EndpointOptions::default(),
        )
        .unwrap()
    }

    fn small() -> PrimaryConfig {
        PrimaryConfig {
            max_batch_entries: 16,
            max_batch_bytes: 16 * 1024,
            max_in_flight_bytes: 64 * 1024,
            heartbeat_interval: Duration::from_millis(50),
            ack_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            snapshot_chunk_bytes: 4096,
        }
    }

    fn fast_mirror() -> MirrorOptions {
        MirrorOptions {
            session: MirrorConfig {
                ack_interval: Duration::from_millis(20),
                idle_timeout: Duration::from_secs(5),
            },
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            fence_epoch: Epoch(0),
        }
    }

    struct Primary {
        source: Arc<MemorySource>,
        tracker: Arc<AckTracker>,
        addr: PrimaryAddr,
        /// Every accepted replication connection, so a test can cut them.
        conns: Arc<Mutex<Vec<quinn::Connection>>>,
        stop: watch::Sender<bool>,
        _endpoint: NodeEndpoint,
    }

    fn start_primary(ca: &ClusterCa) -> Primary {
        let (endpoint, mut incoming) = bind(&identity(ca, "n1"));
        let source = Arc::new(MemorySource::new(DB));
        let tracker = Arc::new(AckTracker::new());
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel(8);
        let seen = conns.clone();
        tokio::spawn(async move {
            while let Some(pc) = incoming.replication.recv().await {
                seen.lock().unwrap().push(pc.connection.clone());
                if tx.send(pc).await.is_err() {
                    return;
                }
            }
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(serve_replication(
            rx,
            source.clone(),
            tracker.clone(),
            small(),
            stop_rx,
        ));
        Primary {
            source,
            tracker,
            stop,
            addr: PrimaryAddr {
                node: NodeId::from("n1"),
                addr: endpoint.local_addr().unwrap(),
            },
            conns,
            _endpoint: endpoint,
        }
    }

    struct Mirror {
        sink: MemorySink,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<Result<MemorySink, MirrorStopped>>,
        status: watch::Receiver<MirrorStatus>,
        _primary: watch::Sender<Option<PrimaryAddr>>,
    }

    fn start_mirror(id: &NodeIdentity, primary: &PrimaryAddr) -> Mirror {
        start_mirror_with(id, primary, MemorySink::new())
    }

    fn start_mirror_with(id: &NodeIdentity, primary: &PrimaryAddr, sink: MemorySink) -> Mirror {
        let (endpoint, _incoming) = bind(id);
        let (stop, stop_rx) = watch::channel(false);
        let (ptx, prx) = watch::channel(Some(primary.clone()));
        let (status, status_rx) = watch::channel(MirrorStatus::default());
        let task = tokio::spawn(run_mirror(
            endpoint,
            sink.clone(),
            prx,
            stop_rx,
            fast_mirror(),
            status,
        ));
        Mirror {
            sink,
            stop,
            task,
            status: status_rx,
            _primary: ptx,
        }
    }

    async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_mirrors_receive_identical_entries_while_the_primary_appends() {
        let ca = ClusterCa::generate("t").unwrap();
        let p = start_primary(&ca);
        for i in 0..50u32 {
            p.source.append(&i.to_le_bytes());
        }
        let m2 = start_mirror(&identity(&ca, "n2"), &p.addr);
        let m3 = start_mirror(&identity(&ca, "n3"), &p.addr);
        // Phase: live appends while both mirrors stream.
        for i in 50..400u32 {
            p.source
                .append(&vec![(i % 256) as u8; (i as usize * 37) % 3000]);
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let last = p.source.last_lsn();
        // Phase: quorum of both mirrors reaches the last LSN.
        p.tracker
            .wait_for(2, last, Instant::now() + Duration::from_secs(20))
            .await
            .unwrap();
        for m in [&m2, &m3] {
            assert_eq!(m.sink.entries(), p.source.entries());
        }
        let lag = p.tracker.lag(Instant::now());
        assert_eq!(lag.len(), 2);
        for m in [&m2, &m3] {
            let mut st = m.status.clone();
            let st = st
                .wait_for(|s| s.streaming && s.flushed_lsn == last)
                .await
                .unwrap()
                .clone();
            assert_eq!(st.primary, Some(NodeId::from("n1")));
            assert_eq!(st.lag(Instant::now()), Some(Duration::ZERO));
        }
        assert!(lag.iter().all(|l| l.flush_lag_lsn == 0 && l.connected));
        for m in [m2, m3] {
            m.stop.send_replace(true);
            let sink = m.task.await.unwrap().unwrap();
            assert_eq!(sink.entries().len(), 400);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_connection_resumes_without_duplicates() {
        let ca = ClusterCa::generate("t").unwrap();
        let p = start_primary(&ca);
        const N: u32 = 30_000;
        for i in 0..N {
            p.source.append(&vec![(i % 256) as u8; 700]);
        }
        let m = start_mirror(&identity(&ca, "n2"), &p.addr);
        // Phase: cut the connection while entries are streaming, twice.
        for round in 1..=2 {
            let seen = m.sink.entries().len();
            wait_until("progress", Duration::from_secs(20), || {
                m.sink.entries().len() > seen + 200
            })
            .await;
            for c in p.conns.lock().unwrap().drain(..) {
                c.close(99u32.into(), b"test cuts the link");
            }
            let at_cut = m.sink.entries().len();
            eprintln!("round {round}: cut at {at_cut} entries");
            assert!(at_cut < N as usize, "finished before the cut");
            p.source.append(b"after a cut");
        }
        // Phase: it resumes and catches up, every entry exactly once (the
        // memory sink refuses duplicates as a fatal error).
        let last = p.source.last_lsn();
        wait_until("catch-up", Duration::from_secs(30), || {
            m.sink.entries().last().map(|e| e.lsn) == Some(last)
        })
        .await;
        assert!(!m.task.is_finished(), "mirror stopped: {:?}", m.task);
        assert_eq!(m.sink.entries(), p.source.entries());
        assert!(!p.conns.lock().unwrap().is_empty(), "no reconnect happened");
        m.stop.send_replace(true);
        m.task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mirror_with_a_foreign_certificate_gets_nothing() {
        let ca = ClusterCa::generate("t").unwrap();
        let intruder_ca = ClusterCa::generate("intruder").unwrap();
        let p = start_primary(&ca);
        for i in 0..20u32 {
            p.source.append(&i.to_le_bytes());
        }
        let m = start_mirror(&identity(&intruder_ca, "n2"), &p.addr);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(m.sink.entries().is_empty());
        assert!(p.conns.lock().unwrap().is_empty());
        assert!(p.tracker.lag(Instant::now()).is_empty());
        m.stop.send_replace(true);
        let sink = m.task.await.unwrap().unwrap();
        assert!(sink.entries().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deposed_primary_cannot_feed_a_mirror_that_knows_a_newer_epoch() {
        let ca = ClusterCa::generate("t").unwrap();
        let p = start_primary(&ca);
        for i in 0..20u32 {
            p.source.append(&i.to_le_bytes());
        }
        let (endpoint, _incoming) = bind(&identity(&ca, "n2"));
        let sink = MemorySink::new();
        let (stop, stop_rx) = watch::channel(false);
        let (_ptx, prx) = watch::channel(Some(p.addr.clone()));
        let (status, mut status_rx) = watch::channel(MirrorStatus::default());
        let opts = MirrorOptions {
            fence_epoch: Epoch(5),
            ..fast_mirror()
        };
        let task = tokio::spawn(run_mirror(
            endpoint,
            sink.clone(),
            prx,
            stop_rx,
            opts,
            status,
        ));
        // It dials (the connection is accepted) but never takes an entry.
        wait_until("a dial", Duration::from_secs(10), || {
            !p.conns.lock().unwrap().is_empty()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(sink.entries().is_empty());
        assert!(!status_rx.borrow_and_update().streaming);
        stop.send_replace(true);
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stepping_down_primary_stops_feeding_at_once() {
        let ca = ClusterCa::generate("t").unwrap();
        let p = start_primary(&ca);
        for i in 0..20u32 {
            p.source.append(&i.to_le_bytes());
        }
        let m = start_mirror(&identity(&ca, "n2"), &p.addr);
        p.tracker
            .wait_for(1, Lsn(20), Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        // Phase: the primary steps down; what it writes afterwards never
        // reaches the mirror.
        p.stop.send_replace(true);
        let mut status = m.status.clone();
        tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| !s.streaming))
            .await
            .unwrap()
            .unwrap();
        for i in 20..30u32 {
            p.source.append(&i.to_le_bytes());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(m.sink.entries().len(), 20);
        m.stop.send_replace(true);
        m.task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_mirror_journal_stops_the_mirror() {
        let ca = ClusterCa::generate("t").unwrap();
        let p = start_primary(&ca);
        for i in 0..20u32 {
            p.source.append(&i.to_le_bytes());
        }
        let m = start_mirror(&identity(&ca, "n2"), &p.addr);
        p.tracker
            .wait_for(1, Lsn(20), Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        m.sink
            .fail_next_append(StorageError::Fatal("fsync failed".into()));
        p.source.append(b"doomed");
        let stopped = tokio::time::timeout(Duration::from_secs(10), m.task)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(stopped, Err(MirrorStopped::Fatal(_))));
        assert_eq!(m.sink.entries().len(), 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_mirror_is_reseeded_then_streams() {
        let ca = ClusterCa::generate("t").unwrap();
        let p = start_primary(&ca);
        for i in 0..100u32 {
            p.source.append(&i.to_le_bytes());
        }
        let image: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        p.source.trim_through(Lsn(60), image.clone());
        let m = start_mirror(&identity(&ca, "n2"), &p.addr);
        for i in 100..150u32 {
            p.source.append(&i.to_le_bytes());
        }
        let last = p.source.last_lsn();
        p.tracker
            .wait_for(1, last, Instant::now() + Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(m.sink.snapshot(), Some((Lsn(60), Epoch(1), image)));
        assert_eq!(m.sink.entries(), p.source.entries());
        m.stop.send_replace(true);
        m.task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_divergent_mirror_truncates_and_follows_the_new_epoch() {
        let ca = ClusterCa::generate("t").unwrap();
        let p = start_primary(&ca);
        for i in 0..10u32 {
            p.source.append(&i.to_le_bytes());
        }
        // The mirror followed a deposed primary: 11..=14 in epoch 1.
        let mut mirror_entries = p.source.entries();
        for l in 11..=14u64 {
            mirror_entries.push(crate::FramedEntry::encode(Lsn(l), Epoch(1), 0, b"lost"));
        }
        p.source.new_epoch();
        for i in 10..20u32 {
            p.source.append(&i.to_le_bytes());
        }
        let id = identity(&ca, "n2");
        let m = {
            let sink = MemorySink::new();
            sink.preload(DB, mirror_entries);
            start_mirror_with(&id, &p.addr, sink)
        };
        let last = p.source.last_lsn();
        p.tracker
            .wait_for(1, last, Instant::now() + Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(m.sink.truncations(), vec![Lsn(10)]);
        assert_eq!(m.sink.entries(), p.source.entries());
        m.stop.send_replace(true);
        m.task.await.unwrap().unwrap();
    }
}
