//! Durable Raft storage in one redb file, `raft.redb`, in the node's data
//! directory.
//!
//! Why redb and one file: the workspace already depends on redb for the data
//! file; its commits are atomic and, with `Durability::Immediate`, fsynced
//! before `commit` returns, so "written" and "durable" are the same position
//! and there is no file-format or torn-write handling of our own to get
//! wrong. The control-plane log is small (lease renewals every 250 ms,
//! compacted by snapshots), so one fsync per append is affordable.
//!
//! Layout (format version [`FORMAT_VERSION`], postcard values):
//!
//! ```text
//!  table raft_log : u64 index -> Entry<TypeConfig>
//!  table raft_meta: "format"      -> u32
//!                   "vote"        -> Vote<u64>
//!                   "committed"   -> Option<LogId<u64>>
//!                   "last_purged" -> Option<LogId<u64>>
//!                   "sm"          -> StoredStateMachine (applied state)
//!                   "snapshot"    -> StoredSnapshot (meta + bytes)
//! ```
//!
//! Durability contract: `save_vote` returns after the vote is fsynced;
//! `append` commits (fsync) and only then calls the flush callback; `apply`
//! persists the new state machine before returning, so a restart never
//! re-applies entries; snapshots are written before they are reported.
//! Bytes read back are decoded with typed errors, never a panic.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{RaftNode, TypeConfig};
use crate::state::{ClusterState, CommandResult};

/// Version of the layout above; a file with another version is refused.
pub const FORMAT_VERSION: u32 = 1;

/// The file name inside the data directory.
pub const FILE_NAME: &str = "raft.redb";

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const KEY_FORMAT: &str = "format";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";
const KEY_SM: &str = "sm";
const KEY_SNAPSHOT: &str = "snapshot";

type SErr = StorageError<u64>;

/// Opening the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// redb could not open or initialize the file.
    #[error("cannot open {path}: {source}")]
    Redb {
        /// The file.
        path: String,
        /// What redb said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another handle (this process) still has the file open, e.g. a Raft
    /// that was shut down a moment ago: its storage tasks end shortly after
    /// `Raft::shutdown` returns. Retrying briefly is fine.
    #[error("{path} is still open")]
    AlreadyOpen {
        /// The file.
        path: String,
    },
    /// The file was written by another format version.
    #[error("{path} has format version {found}, this build reads {FORMAT_VERSION}")]
    Format {
        /// The file.
        path: String,
        /// The version found.
        found: u32,
    },
    /// The stored state machine cannot be decoded.
    #[error("{path}: stored state machine is unreadable: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// The decoder's message.
        reason: String,
    },
}

/// The state machine as persisted: everything `applied_state` answers plus
/// the cluster state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredStateMachine {
    /// Last applied log id.
    pub last_applied: Option<LogId<u64>>,
    /// Last applied membership.
    pub last_membership: StoredMembership<u64, RaftNode>,
    /// The cluster state.
    pub state: ClusterState,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, RaftNode>,
    data: Vec<u8>,
}

/// Opens (or creates) `dir/raft.redb` and returns the log store and the
/// state machine that share it.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), OpenError> {
    let path = dir.join(FILE_NAME);
    let shown = path.display().to_string();
    let redb_err = |e: Box<dyn std::error::Error + Send + Sync>| OpenError::Redb {
        path: shown.clone(),
        source: e,
    };
    let db = Database::create(&path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => OpenError::AlreadyOpen {
            path: shown.clone(),
        },
        e => redb_err(e.into()),
    })?;
    // Create the tables and stamp (or check) the format version.
    let txn = db.begin_write().map_err(|e| redb_err(e.into()))?;
    {
        txn.open_table(LOG).map_err(|e| redb_err(e.into()))?;
        let mut meta = txn.open_table(META).map_err(|e| redb_err(e.into()))?;
        let found = meta
            .get(KEY_FORMAT)
            .map_err(|e| redb_err(e.into()))?
            .map(|v| postcard::from_bytes::<u32>(v.value()));
        match found {
            None => {
                let v = postcard::to_stdvec(&FORMAT_VERSION).map_err(|e| redb_err(e.into()))?;
                meta.insert(KEY_FORMAT, v.as_slice())
                    .map_err(|e| redb_err(e.into()))?;
            }
            Some(Ok(FORMAT_VERSION)) => {}
            Some(Ok(found)) => {
                return Err(OpenError::Format {
                    path: shown.clone(),
                    found,
                });
            }
            Some(Err(e)) => {
                return Err(OpenError::Corrupt {
                    path: shown.clone(),
                    reason: format!("format version: {e}"),
                });
            }
        }
    }
    txn.commit().map_err(|e| redb_err(e.into()))?;
    let db = Arc::new(db);
    let sm: StoredStateMachine = read_meta(&db, KEY_SM)
        .map_err(|e| OpenError::Corrupt {
            path: shown.clone(),
            reason: e.to_string(),
        })?
        .unwrap_or_default();
    let (tx, _) = watch::channel(sm.state.clone());
    Ok((
        LogStore { db: db.clone() },
        StateMachineStore {
            db,
            sm,
            state_tx: Arc::new(tx),
        },
    ))
}

// openraft's trait methods return this error type; boxing here gains nothing.
#[allow(clippy::result_large_err)]
fn read_meta<T: DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, SErr> {
    let rerr = |e: &dyn std::error::Error| -> SErr {
        StorageIOError::read(&AnyErr(format!("read {key}: {e}"))).into()
    };
    let txn = db.begin_read().map_err(|e| rerr(&e))?;
    let table = txn.open_table(META).map_err(|e| rerr(&e))?;
    let Some(v) = table.get(key).map_err(|e| rerr(&e))? else {
        return Ok(None);
    };
    postcard::from_bytes(v.value())
        .map(Some)
        .map_err(|e| StorageIOError::read(&AnyErr(format!("decode {key}: {e}"))).into())
}

/// Writes `values` into the meta table in one fsynced commit.
fn write_meta(db: &Database, values: &[(&str, Vec<u8>)]) -> Result<(), std::io::Error> {
    let txn = db.begin_write().map_err(std::io::Error::other)?;
    {
        let mut meta = txn.open_table(META).map_err(std::io::Error::other)?;
        for (k, v) in values {
            meta.insert(*k, v.as_slice())
                .map_err(std::io::Error::other)?;
        }
    }
    txn.commit().map_err(std::io::Error::other)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, std::io::Error> {
    postcard::to_stdvec(v).map_err(std::io::Error::other)
}

/// A plain message error, so redb's and postcard's errors become openraft's
/// `AnyError` without depending on `anyerror` directly.
#[derive(Debug)]
struct AnyErr(String);

impl std::fmt::Display for AnyErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AnyErr {}

fn io_write(e: std::io::Error) -> SErr {
    StorageIOError::write(&e).into()
}

/// The Raft log and vote, backed by `raft.redb`. Cloning shares the file.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    #[allow(clippy::result_large_err)] // openraft's error type, see read_meta
    fn last_log_id(&self) -> Result<Option<LogId<u64>>, SErr> {
        let rerr = |e: &dyn std::error::Error| -> SErr {
            StorageIOError::read_logs(&AnyErr(e.to_string())).into()
        };
        let txn = self.db.begin_read().map_err(|e| rerr(&e))?;
        let table = txn.open_table(LOG).map_err(|e| rerr(&e))?;
        match table.last().map_err(|e| rerr(&e))? {
            None => Ok(None),
            Some((_, v)) => {
                let e: Entry<TypeConfig> = postcard::from_bytes(v.value())
                    .map_err(|e| rerr(&AnyErr(format!("decode last entry: {e}"))))?;
                Ok(Some(e.log_id))
            }
        }
    }

    fn write_log<F>(&self, f: F) -> Result<(), std::io::Error>
    where
        F: FnOnce(&mut redb::Table<'_, u64, &[u8]>) -> Result<(), std::io::Error>,
    {
        let txn = self.db.begin_write().map_err(std::io::Error::other)?;
        {
            let mut table = txn.open_table(LOG).map_err(std::io::Error::other)?;
            f(&mut table)?;
        }
        txn.commit().map_err(std::io::Error::other)
    }
}

fn remove_range(
    table: &mut redb::Table<'_, u64, &[u8]>,
    range: impl RangeBounds<u64>,
) -> Result<(), std::io::Error> {
    let keys: Vec<u64> = table
        .range::<u64>((range.start_bound().cloned(), range.end_bound().cloned()))
        .map_err(std::io::Error::other)?
        .map(|r| r.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()
        .map_err(std::io::Error::other)?;
    for k in keys {
        table.remove(k).map_err(std::io::Error::other)?;
    }
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let rerr = |e: &dyn std::error::Error| -> SErr {
            StorageIOError::read_logs(&AnyErr(e.to_string())).into()
        };
        let txn = self.db.begin_read().map_err(|e| rerr(&e))?;
        let table = txn.open_table(LOG).map_err(|e| rerr(&e))?;
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        let mut out = Vec::new();
        for item in table.range::<u64>(bounds).map_err(|e| rerr(&e))? {
            let (k, v) = item.map_err(|e| rerr(&e))?;
            let entry: Entry<TypeConfig> = postcard::from_bytes(v.value())
                .map_err(|e| rerr(&AnyErr(format!("decode entry {}: {e}", k.value()))))?;
            if entry.log_id.index != k.value() {
                return Err(rerr(&AnyErr(format!(
                    "entry stored at {} claims index {}",
                    k.value(),
                    entry.log_id.index
                ))));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged_log_id: Option<LogId<u64>> =
            read_meta(&self.db, KEY_LAST_PURGED)?.flatten();
        let last_log_id = self.last_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), SErr> {
        let bytes = encode(vote).map_err(|e| SErr::from(StorageIOError::write_vote(&e)))?;
        write_meta(&self.db, &[(KEY_VOTE, bytes)])
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, SErr> {
        read_meta(&self.db, KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), SErr> {
        let bytes = encode(&committed).map_err(io_write)?;
        write_meta(&self.db, &[(KEY_COMMITTED, bytes)]).map_err(io_write)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, SErr> {
        Ok(read_meta::<Option<LogId<u64>>>(&self.db, KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let result = self.write_log(|table| {
            for entry in entries {
                let bytes = encode(&entry)?;
                table
                    .insert(entry.log_id.index, bytes.as_slice())
                    .map_err(std::io::Error::other)?;
            }
            Ok(())
        });
        match result {
            // The commit above is fsynced: the entries are durable now.
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(&e).into();
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        self.write_log(|table| remove_range(table, log_id.index..))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        let run = || -> Result<(), std::io::Error> {
            let txn = self.db.begin_write().map_err(std::io::Error::other)?;
            {
                let mut meta = txn.open_table(META).map_err(std::io::Error::other)?;
                meta.insert(KEY_LAST_PURGED, encode(&Some(log_id))?.as_slice())
                    .map_err(std::io::Error::other)?;
                let mut table = txn.open_table(LOG).map_err(std::io::Error::other)?;
                remove_range(&mut table, ..=log_id.index)?;
            }
            txn.commit().map_err(std::io::Error::other)
        };
        run().map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// The state machine ([`ClusterState`]) and its snapshots, backed by the
/// same `raft.redb`.
#[derive(Debug)]
pub struct StateMachineStore {
    db: Arc<Database>,
    sm: StoredStateMachine,
    state_tx: Arc<watch::Sender<ClusterState>>,
}

impl StateMachineStore {
    /// A receiver that sees every applied [`ClusterState`] (the driver and
    /// the node watch it).
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<ClusterState> {
        self.state_tx.subscribe()
    }

    /// The state machine as currently applied.
    #[must_use]
    pub fn current(&self) -> &StoredStateMachine {
        &self.sm
    }

    fn persist(&self, snapshot: Option<&StoredSnapshot>) -> Result<(), std::io::Error> {
        let mut values = vec![(KEY_SM, encode(&self.sm)?)];
        if let Some(s) = snapshot {
            values.push((KEY_SNAPSHOT, encode(s)?));
        }
        write_meta(&self.db, &values)
    }
}

/// Builds a snapshot from a copy of the state machine taken when openraft
/// asked for the builder.
#[derive(Debug)]
pub struct SnapshotBuilder {
    db: Arc<Database>,
    sm: StoredStateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let data =
            encode(&self.sm).map_err(|e| SErr::from(StorageIOError::write_snapshot(None, &e)))?;
        let snapshot_id = match &self.sm.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, data.len()),
            None => format!("none-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: self.sm.last_applied,
            last_membership: self.sm.last_membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let bytes = encode(&stored)
            .map_err(|e| SErr::from(StorageIOError::write_snapshot(Some(meta.signature()), &e)))?;
        write_meta(&self.db, &[(KEY_SNAPSHOT, bytes)])
            .map_err(|e| SErr::from(StorageIOError::write_snapshot(Some(meta.signature()), &e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, RaftNode>), SErr> {
        Ok((self.sm.last_applied, self.sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        for entry in entries {
            self.sm.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => Ok(crate::state::Applied::Ok),
                EntryPayload::Normal(cmd) => {
                    let r = self.sm.state.apply(&cmd);
                    if let Err(e) = &r {
                        tracing::debug!(log_id = %entry.log_id, %e, "command rejected");
                    }
                    r
                }
                EntryPayload::Membership(m) => {
                    self.sm.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(crate::state::Applied::Ok)
                }
            };
            replies.push(reply);
        }
        self.persist(None)
            .map_err(|e| SErr::from(StorageIOError::write_state_machine(&e)))?;
        self.state_tx.send_replace(self.sm.state.clone());
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            sm: self.sm.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, RaftNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let read_err = |msg: String| -> SErr {
            StorageIOError::read_snapshot(Some(meta.signature()), &AnyErr(msg)).into()
        };
        let sm: StoredStateMachine =
            postcard::from_bytes(&data).map_err(|e| read_err(format!("decode snapshot: {e}")))?;
        if sm.last_applied != meta.last_log_id {
            return Err(read_err(format!(
                "snapshot data ends at {:?}, meta says {:?}",
                sm.last_applied, meta.last_log_id
            )));
        }
        self.sm = sm;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.persist(Some(&stored))
            .map_err(|e| SErr::from(StorageIOError::write_snapshot(Some(meta.signature()), &e)))?;
        self.state_tx.send_replace(self.sm.state.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let stored: Option<StoredSnapshot> = read_meta(&self.db, KEY_SNAPSHOT)?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;
    use crate::state::{ClusterCommand, Member, Rejected, Role};
    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let (log, sm) = open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn passes_openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }

    fn command_entry(term: u64, index: u64, cmd: ClusterCommand) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    fn add(name: &str) -> ClusterCommand {
        ClusterCommand::AddMember {
            node: NodeId::from(name),
            member: Member {
                role: Role::Data,
                raft_addr: format!("{name}:7000"),
                http_addr: format!("{name}:7070"),
                nofailover: false,
            },
        }
    }

    #[tokio::test]
    async fn vote_log_and_state_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new(3, 7);
        {
            let (mut log, mut sm) = open(dir.path()).unwrap();
            let mut rx = sm.subscribe();
            log.save_vote(&vote).await.unwrap();
            let entries = vec![
                command_entry(3, 1, add("n1")),
                command_entry(3, 2, add("n1")), // rejected: duplicate
                command_entry(3, 3, add("n2")),
            ];
            log.blocking_append(entries.clone()).await.unwrap();
            let replies = sm.apply(entries).await.unwrap();
            assert!(replies[0].is_ok());
            assert_eq!(replies[1], Err(Rejected::MemberExists(NodeId::from("n1"))));
            assert!(rx.has_changed().unwrap());
            assert_eq!(rx.borrow_and_update().members.len(), 2);
        }
        let (mut log, mut sm) = open(dir.path()).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
        assert_eq!(log.try_get_log_entries(1..3).await.unwrap().len(), 2);
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(3));
        assert_eq!(sm.current().state.members.len(), 2);
        assert_eq!(sm.subscribe().borrow().members.len(), 2);
    }

    #[tokio::test]
    async fn garbage_on_disk_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path()).unwrap();
        log.write_log(|t| {
            t.insert(1, [0xff_u8, 0xff, 0xff].as_slice())
                .map_err(std::io::Error::other)?;
            Ok(())
        })
        .unwrap();
        assert!(log.try_get_log_entries(..).await.is_err());
        assert!(log.get_log_state().await.is_err());
        write_meta(&log.db, &[(KEY_VOTE, vec![0xff; 3])]).unwrap();
        assert!(log.read_vote().await.is_err());
        write_meta(&log.db, &[(KEY_SM, vec![0xff; 3])]).unwrap();
        drop(log);
        assert!(matches!(open(dir.path()), Err(OpenError::Corrupt { .. })));
    }

    #[tokio::test]
    async fn other_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path()).unwrap();
        write_meta(
            &log.db,
            &[(KEY_FORMAT, postcard::to_stdvec(&99u32).unwrap())],
        )
        .unwrap();
        drop(log);
        assert!(matches!(
            open(dir.path()),
            Err(OpenError::Format { found: 99, .. })
        ));
    }

    #[tokio::test]
    async fn snapshot_with_mismatched_meta_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut sm) = open(dir.path()).unwrap();
        sm.apply(vec![command_entry(1, 1, add("n1"))])
            .await
            .unwrap();
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let mut meta = snap.meta.clone();
        meta.last_log_id = Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), 9));
        let dir2 = tempfile::tempdir().unwrap();
        let (_, mut other) = open(dir2.path()).unwrap();
        assert!(other.install_snapshot(&meta, snap.snapshot).await.is_err());
        let garbage = Box::new(Cursor::new(vec![0xff; 4]));
        assert!(other.install_snapshot(&snap.meta, garbage).await.is_err());
        assert_eq!(other.current().state, ClusterState::default());
    }

    proptest::proptest! {
        /// Arbitrary bytes where a stored value is expected give an error,
        /// never a panic.
        #[test]
        fn arbitrary_stored_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = postcard::from_bytes::<Entry<TypeConfig>>(&bytes);
            let _ = postcard::from_bytes::<StoredStateMachine>(&bytes);
            let _ = postcard::from_bytes::<StoredSnapshot>(&bytes);
            let _ = postcard::from_bytes::<Vote<u64>>(&bytes);
            let _ = postcard::from_bytes::<Option<LogId<u64>>>(&bytes);
        }
    }
}
