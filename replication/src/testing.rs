//! In-memory [`JournalSource`] and [`JournalSink`] for tests, here and in
//! other crates. Both are cheap handles (`Clone` shares the state), so a test
//! can hand one to a driver and keep another to append or inspect.
//!
//! They keep the traits' contracts (an append is "durable" when it returns,
//! LSNs are dense, epochs never go backwards) and check what they are given:
//! a broken contract is reported as [`StorageError::Fatal`].

use crate::frame::FramedEntry;
use crate::protocol::EpochHistory;
use crate::storage::{JournalSink, JournalSource, SinkPosition, Snapshot, StorageError};
use crate::types::{Epoch, Lsn};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::watch;

#[derive(Debug, Default)]
struct SourceState {
    entries: Vec<FramedEntry>,
    history: Vec<(Epoch, Lsn)>,
    oldest: Lsn,
    snapshot: Option<(Lsn, Epoch, Vec<u8>)>,
}

/// A primary's journal in memory.
#[derive(Clone, Debug)]
pub struct MemorySource {
    db_id: [u8; 16],
    state: Arc<Mutex<SourceState>>,
    durable: Arc<watch::Sender<Lsn>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemorySource {
    /// An empty journal in epoch 1.
    pub fn new(db_id: [u8; 16]) -> Self {
        MemorySource {
            db_id,
            state: Arc::new(Mutex::new(SourceState {
                history: vec![(Epoch(1), Lsn(1))],
                oldest: Lsn(1),
                ..Default::default()
            })),
            durable: Arc::new(watch::channel(Lsn::ZERO).0),
        }
    }

    /// Appends one entry in the current epoch and makes it durable.
    pub fn append(&self, payload: &[u8]) -> Lsn {
        let lsn = {
            let mut s = lock(&self.state);
            let lsn = s.entries.last().map_or(s.oldest, |e| e.lsn.next());
            let epoch = s.history.last().map_or(Epoch(0), |h| h.0);
            s.entries
                .push(FramedEntry::encode(lsn, epoch, lsn.0, payload));
            lsn
        };
        self.durable.send_replace(lsn);
        lsn
    }

    /// A new epoch starts at the next LSN (a promotion).
    pub fn new_epoch(&self) -> Epoch {
        let mut s = lock(&self.state);
        let next = s.entries.last().map_or(s.oldest, |e| e.lsn.next());
        let epoch = Epoch(s.history.last().map_or(1, |h| h.0.0 + 1));
        s.history.push((epoch, next));
        epoch
    }

    /// Drops entries `<= lsn` (archived away) and keeps a snapshot of them.
    pub fn trim_through(&self, lsn: Lsn, snapshot: Vec<u8>) {
        let mut s = lock(&self.state);
        let epoch = s
            .entries
            .iter()
            .find(|e| e.lsn == lsn)
            .map_or(Epoch(1), |e| e.epoch);
        s.entries.retain(|e| e.lsn > lsn);
        s.oldest = lsn.next();
        s.snapshot = Some((lsn, epoch, snapshot));
    }

    /// A copy of every entry still held.
    pub fn entries(&self) -> Vec<FramedEntry> {
        lock(&self.state).entries.clone()
    }

    /// The last LSN.
    pub fn last_lsn(&self) -> Lsn {
        *self.durable.borrow()
    }
}

impl JournalSource for MemorySource {
    fn db_id(&self) -> [u8; 16] {
        self.db_id
    }

    fn epoch_history(&self) -> EpochHistory {
        EpochHistory::new(lock(&self.state).history.clone()).unwrap_or_default()
    }

    fn oldest_lsn(&self) -> Lsn {
        lock(&self.state).oldest
    }

    fn durable_lsn(&self) -> watch::Receiver<Lsn> {
        self.durable.subscribe()
    }

    async fn read(
        &self,
        from: Lsn,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<FramedEntry>, StorageError> {
        let s = lock(&self.state);
        if from < s.oldest {
            return Err(StorageError::Unavailable { oldest: s.oldest });
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in s.entries.iter().filter(|e| e.lsn >= from) {
            if out.len() >= max_entries || (!out.is_empty() && bytes + e.wire_len() > max_bytes) {
                break;
            }
            bytes += e.wire_len();
            out.push(e.clone());
        }
        Ok(out)
    }

    async fn open_snapshot(&self) -> Result<Snapshot, StorageError> {
        let s = lock(&self.state);
        let (lsn, epoch, bytes) = s
            .snapshot
            .clone()
            .unwrap_or((Lsn::ZERO, Epoch(0), Vec::new()));
        Ok(Snapshot {
            lsn,
            epoch,
            total_bytes: bytes.len() as u64,
            reader: Box::new(std::io::Cursor::new(bytes)),
        })
    }
}

#[derive(Debug, Default)]
struct SinkState {
    db_id: [u8; 16],
    entries: Vec<FramedEntry>,
    base: (Lsn, Epoch),
    snapshot: Option<(Lsn, Epoch, Vec<u8>)>,
    receiving: Option<(Lsn, Epoch, Vec<u8>)>,
    appends: u64,
    truncations: Vec<Lsn>,
    fail_next_append: Option<StorageError>,
}

impl SinkState {
    fn last(&self) -> (Lsn, Epoch) {
        self.entries.last().map_or(self.base, |e| (e.lsn, e.epoch))
    }
}

/// A mirror's journal in memory; entries count as applied as soon as they
/// are appended.
#[derive(Clone, Debug)]
pub struct MemorySink {
    state: Arc<Mutex<SinkState>>,
    applied: Arc<watch::Sender<Lsn>>,
}

impl Default for MemorySink {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySink {
    /// An empty mirror.
    pub fn new() -> Self {
        MemorySink {
            state: Arc::new(Mutex::new(SinkState::default())),
            applied: Arc::new(watch::channel(Lsn::ZERO).0),
        }
    }

    /// A copy of the entries held.
    pub fn entries(&self) -> Vec<FramedEntry> {
        lock(&self.state).entries.clone()
    }

    /// The installed snapshot, if any: `(lsn, epoch, bytes)`.
    pub fn snapshot(&self) -> Option<(Lsn, Epoch, Vec<u8>)> {
        lock(&self.state).snapshot.clone()
    }

    /// Makes the next `append` fail with `error` and write nothing (an
    /// fsync failure, a full disk).
    pub fn fail_next_append(&self, error: StorageError) {
        lock(&self.state).fail_next_append = Some(error);
    }

    /// Every `truncate_after` argument so far.
    pub fn truncations(&self) -> Vec<Lsn> {
        lock(&self.state).truncations.clone()
    }

    /// Writes entries directly (to set up a divergent mirror in tests).
    pub fn preload(&self, db_id: [u8; 16], entries: Vec<FramedEntry>) {
        let mut s = lock(&self.state);
        s.db_id = db_id;
        s.entries = entries;
        let last = s.last().0;
        drop(s);
        self.applied.send_replace(last);
    }
}

impl JournalSink for MemorySink {
    fn position(&self) -> SinkPosition {
        let s = lock(&self.state);
        let (last_lsn, last_epoch) = s.last();
        SinkPosition {
            db_id: s.db_id,
            last_lsn,
            last_epoch,
            applied_lsn: (*self.applied.borrow()).min(last_lsn),
        }
    }

    async fn adopt_db_id(&mut self, db_id: [u8; 16]) -> Result<(), StorageError> {
        let mut s = lock(&self.state);
        if s.db_id != [0; 16] && s.db_id != db_id {
            return Err(StorageError::Fatal("database id already set".into()));
        }
        s.db_id = db_id;
        Ok(())
    }

    async fn append(&mut self, entries: Vec<FramedEntry>) -> Result<Lsn, StorageError> {
        let last = {
            let mut s = lock(&self.state);
            if let Some(e) = s.fail_next_append.take() {
                return Err(e);
            }
            for e in entries {
                let (last, epoch) = s.last();
                if e.lsn != last.next() || e.epoch < epoch {
                    return Err(StorageError::Fatal(format!(
                        "append of {}/{} after {last}/{epoch}",
                        e.lsn, e.epoch
                    )));
                }
                s.entries.push(e);
            }
            s.appends += 1;
            s.last().0
        };
        self.applied.send_replace(last);
        Ok(last)
    }

    fn applied_lsn(&self) -> watch::Receiver<Lsn> {
        self.applied.subscribe()
    }

    async fn truncate_after(&mut self, keep_lsn: Lsn) -> Result<SinkPosition, StorageError> {
        {
            let mut s = lock(&self.state);
            s.truncations.push(keep_lsn);
            s.entries.retain(|e| e.lsn <= keep_lsn);
        }
        self.applied.send_modify(|a| *a = (*a).min(keep_lsn));
        Ok(self.position())
    }

    async fn begin_snapshot(
        &mut self,
        lsn: Lsn,
        epoch: Epoch,
        _total_bytes: u64,
    ) -> Result<(), StorageError> {
        lock(&self.state).receiving = Some((lsn, epoch, Vec::new()));
        Ok(())
    }

    async fn snapshot_chunk(&mut self, bytes: Vec<u8>) -> Result<(), StorageError> {
        match &mut lock(&self.state).receiving {
            Some((_, _, buf)) => {
                buf.extend_from_slice(&bytes);
                Ok(())
            }
            None => Err(StorageError::Fatal("snapshot chunk without begin".into())),
        }
    }

    async fn install_snapshot(&mut self) -> Result<SinkPosition, StorageError> {
        let lsn = {
            let mut s = lock(&self.state);
            let Some((lsn, epoch, bytes)) = s.receiving.take() else {
                return Err(StorageError::Fatal("install without a snapshot".into()));
            };
            s.entries.clear();
            s.base = (lsn, epoch);
            s.snapshot = Some((lsn, epoch, bytes));
            lsn
        };
        self.applied.send_replace(lsn);
        Ok(self.position())
    }
}

/// A conformance check for any [`JournalSink`]: runs the trait's contract
/// (positions, dense appends, epochs, truncation, snapshot install) against
/// fresh sinks made by `new_sink`, which must each start empty. Panics with
/// a message naming the broken rule. The node runs it against its own sink.
pub async fn check_sink_contract<K: JournalSink>(mut new_sink: impl FnMut() -> K) {
    const DB: [u8; 16] = [0x5a; 16];
    let entry = |l: u64, e: u64, p: &[u8]| FramedEntry::encode(Lsn(l), Epoch(e), l, p);
    let run = |entries: std::ops::RangeInclusive<u64>, e: u64| {
        entries
            .map(move |l| entry(l, e, b"conformance"))
            .collect::<Vec<_>>()
    };

    // An empty sink is at zero.
    let mut sink = new_sink();
    let pos = sink.position();
    assert_eq!(
        (pos.last_lsn, pos.last_epoch, pos.applied_lsn),
        (Lsn::ZERO, Epoch(0), Lsn::ZERO),
        "a new sink must be empty"
    );
    assert_eq!(pos.db_id, [0; 16], "a new sink has no database id");

    // Adopt an id, append durably, report the flushed LSN.
    if let Err(e) = sink.adopt_db_id(DB).await {
        panic!("adopt_db_id failed: {e}");
    }
    assert_eq!(
        sink.position().db_id,
        DB,
        "adopted id must show in position"
    );
    match sink.append(run(1..=5, 1)).await {
        Ok(l) => assert_eq!(l, Lsn(5), "append must return the last durable LSN"),
        Err(e) => panic!("append failed: {e}"),
    }
    match sink.append(run(6..=8, 2)).await {
        Ok(l) => assert_eq!(l, Lsn(8)),
        Err(e) => panic!("append in a newer epoch failed: {e}"),
    }
    let pos = sink.position();
    assert_eq!((pos.last_lsn, pos.last_epoch), (Lsn(8), Epoch(2)));
    assert!(pos.applied_lsn <= pos.last_lsn, "applied beyond durable");
    assert!(
        *sink.applied_lsn().borrow() <= Lsn(8),
        "applied beyond durable"
    );

    // Truncate a divergent tail, then append a different one.
    let pos = match sink.truncate_after(Lsn(6)).await {
        Ok(p) => p,
        Err(e) => panic!("truncate_after failed: {e}"),
    };
    assert_eq!(
        (pos.last_lsn, pos.last_epoch),
        (Lsn(6), Epoch(2)),
        "truncate_after must report the new end"
    );
    assert!(pos.applied_lsn <= Lsn(6), "applied must be rewound");
    assert_eq!(
        sink.position(),
        pos,
        "position must match truncate's answer"
    );
    match sink.append(vec![entry(7, 3, b"new tail")]).await {
        Ok(l) => assert_eq!(l, Lsn(7)),
        Err(e) => panic!("append after truncation failed: {e}"),
    }
    assert_eq!(sink.position().last_epoch, Epoch(3));

    // A snapshot replaces everything and the journal continues after it.
    let mut sink = new_sink();
    if let Err(e) = sink.adopt_db_id(DB).await {
        panic!("adopt_db_id failed: {e}");
    }
    let image: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let steps = async {
        sink.begin_snapshot(Lsn(100), Epoch(4), image.len() as u64)
            .await?;
        for chunk in image.chunks(4096) {
            sink.snapshot_chunk(chunk.to_vec()).await?;
        }
        sink.install_snapshot().await
    };
    let pos = match steps.await {
        Ok(p) => p,
        Err(e) => panic!("snapshot install failed: {e}"),
    };
    assert_eq!(
        (pos.last_lsn, pos.last_epoch, pos.applied_lsn),
        (Lsn(100), Epoch(4), Lsn(100)),
        "an installed snapshot is the new position, fully applied"
    );
    match sink.append(vec![entry(101, 4, b"after snapshot")]).await {
        Ok(l) => assert_eq!(l, Lsn(101)),
        Err(e) => panic!("append after a snapshot failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_sink_meets_the_sink_contract() {
        check_sink_contract(MemorySink::new).await;
    }

    #[tokio::test]
    async fn memory_sink_refuses_gaps_and_epoch_regressions() {
        let mut sink = MemorySink::new();
        let e = |l, ep| FramedEntry::encode(Lsn(l), Epoch(ep), 0, b"x");
        sink.append(vec![e(1, 2)]).await.unwrap();
        assert!(matches!(
            sink.append(vec![e(3, 2)]).await,
            Err(StorageError::Fatal(_))
        ));
        assert!(matches!(
            sink.append(vec![e(2, 1)]).await,
            Err(StorageError::Fatal(_))
        ));
    }

    #[tokio::test]
    async fn memory_source_reads_within_limits() {
        let src = MemorySource::new([1; 16]);
        for i in 0..10u8 {
            src.append(&[i; 100]);
        }
        let got = src.read(Lsn(3), 4, 1 << 20).await.unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].lsn, Lsn(3));
        let got = src.read(Lsn(3), 100, 10).await.unwrap();
        assert_eq!(got.len(), 1, "at least one entry even over the byte limit");
        src.trim_through(Lsn(5), vec![1, 2, 3]);
        assert_eq!(
            src.read(Lsn(2), 1, 1).await,
            Err(StorageError::Unavailable { oldest: Lsn(6) })
        );
        assert_eq!(src.oldest_lsn(), Lsn(6));
        let e = src.new_epoch();
        assert_eq!(src.epoch_history().entries().last(), Some(&(e, Lsn(11))));
    }
}
