//! The data file: a redb database holding the applied state.
//!
//! ```text
//! records      (table, key)     -> version u64 LE | JSON bytes
//! tables       name             -> postcard TableMeta
//! blobs        (table, key)     -> postcard BlobMeta
//! blob_chunks  (blob_id, index) -> up to 1 MiB of bytes
//! meta         name             -> db_id | epoch | checkpoint_lsn | format
//! ```
//!
//! Applied batches are committed with `Durability::None`: visible to readers
//! at once, durable only at the next flush, which is one `Immediate` commit
//! that also records `checkpoint_lsn`, the last LSN whose effects the durable
//! file holds. After a crash redb reopens at the last durable commit and
//! recovery replays the journal from `checkpoint_lsn + 1`.
//!
//! A BLOB's chunks are staged under `blob_id` = the LSN of its `BlobBegin`
//! and become visible only when its transaction commits and links them.

use crate::model::{Record, TableInfo};
use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("records");
const TABLES: TableDefinition<&str, &[u8]> = TableDefinition::new("tables");
const BLOBS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("blobs");
const BLOB_CHUNKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("blob_chunks");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Version of the data file's layout.
pub const DATA_FORMAT: u32 = 1;
/// Name of the data file inside the data directory.
pub const DATA_FILE: &str = "mirrordb.redb";
/// Most compaction passes [`Store::compact`] runs (each one that moves
/// pages is followed by another; a bound keeps a pathological file from
/// looping).
pub const COMPACT_PASSES: u32 = 64;

/// A data-file error: the message of the underlying redb error.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct StoreError(pub String);

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError(e.into().to_string())
    }
}

/// Per-table facts kept in the data file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableMeta {
    pub journaled: bool,
    pub records: u64,
    pub blobs: u64,
}

/// Where a BLOB's bytes are and what version wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    pub blob_id: u64,
    pub size: u64,
    pub version: u64,
}

/// The facts recovery needs from the data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreMeta {
    pub db_id: [u8; 16],
    pub epoch: u64,
    pub checkpoint_lsn: u64,
}

/// The open data file. Cheap to clone; readers and the single writer share it.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

fn decode_meta<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError(format!("undecodable metadata: {e}")))
}

fn u64_from(bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| StoreError("short integer in metadata".into()))?;
    Ok(u64::from_le_bytes(arr))
}

fn split_record(bytes: &[u8]) -> Result<(u64, &[u8]), StoreError> {
    if bytes.len() < 8 {
        return Err(StoreError("short record".into()));
    }
    Ok((u64_from(&bytes[..8])?, &bytes[8..]))
}

impl Store {
    /// Opens an existing data file.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        let db = Database::builder().set_cache_size(cache_bytes).open(path)?;
        Ok(Store {
            db: Arc::new(db),
            path: path.to_owned(),
        })
    }

    /// Creates a new data file for database `db_id` at `epoch`, durably.
    pub fn create(
        path: &Path,
        cache_bytes: usize,
        db_id: [u8; 16],
        epoch: u64,
    ) -> Result<Store, StoreError> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert("db_id", &db_id[..])?;
            meta.insert("epoch", &epoch.to_le_bytes()[..])?;
            meta.insert("checkpoint_lsn", &0u64.to_le_bytes()[..])?;
            meta.insert("format", &DATA_FORMAT.to_le_bytes()[..])?;
            txn.open_table(RECORDS)?;
            txn.open_table(TABLES)?;
            txn.open_table(BLOBS)?;
            txn.open_table(BLOB_CHUNKS)?;
        }
        txn.commit()?;
        Ok(Store {
            db: Arc::new(db),
            path: path.to_owned(),
        })
    }

    /// The data file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the data file takes on disk (its length; 0 if it cannot be
    /// read, which only a metric asks).
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Compacts the data file at `path`, which no process may have open:
    /// redb moves the live pages towards the start of the file and
    /// truncates the free space after them. Refuses a file without
    /// mirrordb's metadata before changing anything. Answers how many
    /// passes moved pages (redb compacts until a pass finds nothing to
    /// move; at most [`COMPACT_PASSES`]).
    pub fn compact(path: &Path, cache_bytes: usize) -> Result<u32, StoreError> {
        let store = Store::open(path, cache_bytes)?;
        store.meta()?;
        let mut db = Arc::into_inner(store.db)
            .ok_or_else(|| StoreError("the data file is still in use".into()))?;
        let mut passes = 0;
        while passes < COMPACT_PASSES && db.compact()? {
            passes += 1;
        }
        Ok(passes)
    }

    /// Reads the database id, epoch and checkpoint.
    pub fn meta(&self) -> Result<StoreMeta, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(META)?;
        let get = |k: &str| -> Result<Vec<u8>, StoreError> {
            t.get(k)?
                .map(|v| v.value().to_vec())
                .ok_or_else(|| StoreError(format!("metadata key {k} missing")))
        };
        let id = get("db_id")?;
        let db_id: [u8; 16] = id
            .as_slice()
            .try_into()
            .map_err(|_| StoreError("bad database id".into()))?;
        Ok(StoreMeta {
            db_id,
            epoch: u64_from(&get("epoch")?)?,
            checkpoint_lsn: u64_from(&get("checkpoint_lsn")?)?,
        })
    }

    /// The epoch history recorded in the data file: `(epoch, first LSN)`.
    pub fn epoch_history(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(META)?;
        match t.get("epoch_history")? {
            Some(v) => decode_meta(v.value()),
            None => Ok(Vec::new()),
        }
    }

    /// A consistent read view.
    pub fn read(&self) -> Result<ReadView, StoreError> {
        Ok(ReadView {
            txn: self.db.begin_read()?,
            _db: self.db.clone(),
        })
    }

    /// Applies a batch in one write transaction with every table opened
    /// once (opening a redb table per operation costs a table-tree update
    /// each time). `durable = false`: visible to readers at once, durable at
    /// the next durable commit; `true`: durable when this returns. If `f`
    /// fails nothing of the batch is committed. Returns `f`'s result and the
    /// bytes applied.
    pub fn apply<R, E: From<StoreError>>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Applier<'_>) -> Result<R, E>,
    ) -> Result<(R, u64), E> {
        self.apply_with(durable, false, f, || Ok(()))
    }

    /// [`Store::apply`] (not durable) whose commit waits for `gate`: the
    /// batch is applied while, for example, its journal entries are still
    /// being synced, and committed only once `gate` says they are durable.
    /// An error from `gate` abandons the transaction: nothing of the batch
    /// reaches the data file. `coalesce` as in [`Store::apply_coalesced`].
    pub fn apply_gated<R, E: From<StoreError>>(
        &self,
        coalesce: bool,
        f: impl FnOnce(&mut Applier<'_>) -> Result<R, E>,
        gate: impl FnOnce() -> Result<(), E>,
    ) -> Result<(R, u64), E> {
        self.apply_with(false, coalesce, f, gate)
    }

    /// [`Store::apply`] for a large batch replayed from the journal or a
    /// backup (recovery, restore, a mirror's catch-up): record writes are
    /// held back and applied at the end of the batch in key order, only the
    /// last one per key.
    /// The result is the same as applying them one by one; the B-tree is
    /// walked in order (its pages stay in the CPU's caches) and a key
    /// written many times in the batch is written once.
    pub fn apply_coalesced<R, E: From<StoreError>>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Applier<'_>) -> Result<R, E>,
    ) -> Result<(R, u64), E> {
        self.apply_with(durable, true, f, || Ok(()))
    }

    fn apply_with<R, E: From<StoreError>>(
        &self,
        durable: bool,
        coalesce: bool,
        f: impl FnOnce(&mut Applier<'_>) -> Result<R, E>,
        gate: impl FnOnce() -> Result<(), E>,
    ) -> Result<(R, u64), E> {
        let mut txn = self.db.begin_write().map_err(StoreError::from)?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(StoreError::from)?;
        let (r, bytes) = {
            let mut a = Applier {
                records: txn.open_table(RECORDS).map_err(StoreError::from)?,
                tables: txn.open_table(TABLES).map_err(StoreError::from)?,
                blobs: txn.open_table(BLOBS).map_err(StoreError::from)?,
                chunks: txn.open_table(BLOB_CHUNKS).map_err(StoreError::from)?,
                meta: txn.open_table(META).map_err(StoreError::from)?,
                table_cache: HashMap::new(),
                bytes: 0,
                held: coalesce.then(Vec::new),
            };
            let r = f(&mut a)?;
            a.apply_held()?;
            a.write_tables()?;
            (r, a.bytes)
        };
        if let Err(e) = gate() {
            txn.abort().map_err(StoreError::from)?;
            return Err(e);
        }
        txn.commit().map_err(StoreError::from)?;
        Ok((r, bytes))
    }
}

/// A consistent, read-only view of the data file (an MVCC snapshot).
pub struct ReadView {
    txn: ReadTransaction,
    // A read transaction does not keep its database open: hold it, so a
    // view (a backup snapshot, a BLOB being streamed) outlives its Store.
    _db: Arc<Database>,
}

/// One page of an ordered scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    pub records: Vec<Record>,
    /// The key to pass as `start_after` for the next page, if there may be one.
    pub next: Option<String>,
}

impl ReadView {
    /// One record.
    pub fn get(&self, table: &str, key: &str) -> Result<Option<Record>, StoreError> {
        let t = self.txn.open_table(RECORDS)?;
        match t.get((table, key))? {
            None => Ok(None),
            Some(v) => {
                let (version, json) = split_record(v.value())?;
                Ok(Some(Record {
                    key: key.to_owned(),
                    version,
                    value: json.to_vec(),
                }))
            }
        }
    }

    /// The version of one record (`0` if absent).
    pub fn version(&self, table: &str, key: &str) -> Result<u64, StoreError> {
        Ok(self.get(table, key)?.map(|r| r.version).unwrap_or(0))
    }

    /// Up to `limit` records of `table` in key order, with keys starting with
    /// `prefix` and greater than `start_after`.
    pub fn scan(
        &self,
        table: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        let t = self.txn.open_table(RECORDS)?;
        let lower = match start_after {
            Some(s) if s >= prefix => s,
            _ => prefix,
        };
        let mut records = Vec::new();
        let mut more = false;
        for item in t.range((table, lower)..)? {
            let (k, v) = item?;
            let (tname, key) = k.value();
            if tname != table || !key.starts_with(prefix) {
                break;
            }
            if start_after == Some(key) {
                continue;
            }
            if records.len() == limit {
                more = true;
                break;
            }
            let (version, json) = split_record(v.value())?;
            records.push(Record {
                key: key.to_owned(),
                version,
                value: json.to_vec(),
            });
        }
        let next = if more {
            records.last().map(|r| r.key.clone())
        } else {
            None
        };
        Ok(ScanPage { records, next })
    }

    /// Every table with its options and counts.
    pub fn tables(&self) -> Result<Vec<TableInfo>, StoreError> {
        let t = self.txn.open_table(TABLES)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let m: TableMeta = decode_meta(v.value())?;
            out.push(TableInfo {
                name: k.value().to_owned(),
                journaled: m.journaled,
                records: m.records,
                blobs: m.blobs,
            });
        }
        Ok(out)
    }

    /// One table's metadata.
    pub fn table(&self, name: &str) -> Result<Option<TableMeta>, StoreError> {
        let t = self.txn.open_table(TABLES)?;
        t.get(name)?.map(|v| decode_meta(v.value())).transpose()
    }

    /// A BLOB's metadata.
    pub fn blob(&self, table: &str, key: &str) -> Result<Option<BlobMeta>, StoreError> {
        let t = self.txn.open_table(BLOBS)?;
        t.get((table, key))?
            .map(|v| decode_meta(v.value()))
            .transpose()
    }

    /// One chunk of a BLOB.
    pub fn blob_chunk(&self, blob_id: u64, index: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.txn.open_table(BLOB_CHUNKS)?;
        Ok(t.get((blob_id, index))?.map(|v| v.value().to_vec()))
    }

    /// Number of records and a digest of every record and BLOB (table, key,
    /// version and bytes), for comparing two nodes or a restore.
    pub fn digest(&self) -> Result<(u64, u32), StoreError> {
        let mut crc = 0u32;
        let mut count = 0u64;
        let t = self.txn.open_table(RECORDS)?;
        for item in t.iter()? {
            let (k, v) = item?;
            let (table, key) = k.value();
            crc = crc32c::crc32c_append(crc, table.as_bytes());
            crc = crc32c::crc32c_append(crc, &[0]);
            crc = crc32c::crc32c_append(crc, key.as_bytes());
            crc = crc32c::crc32c_append(crc, &[0]);
            crc = crc32c::crc32c_append(crc, v.value());
            count += 1;
        }
        let b = self.txn.open_table(BLOBS)?;
        let chunks: ReadOnlyTable<(u64, u32), &[u8]> = self.txn.open_table(BLOB_CHUNKS)?;
        for item in b.iter()? {
            let (k, v) = item?;
            let (table, key) = k.value();
            let m: BlobMeta = decode_meta(v.value())?;
            crc = crc32c::crc32c_append(crc, table.as_bytes());
            crc = crc32c::crc32c_append(crc, key.as_bytes());
            crc = crc32c::crc32c_append(crc, &m.size.to_le_bytes());
            for c in chunks.range((m.blob_id, 0)..=(m.blob_id, u32::MAX))? {
                crc = crc32c::crc32c_append(crc, c?.1.value());
            }
        }
        Ok((count, crc))
    }
}

impl ReadView {
    /// Visits every table, then every record in (table, key) order, then
    /// every BLOB with its chunks: the content of a backup snapshot.
    pub fn export<E>(
        &self,
        mut f: impl FnMut(SnapshotItem) -> Result<(), E>,
    ) -> Result<(), ExportError<E>> {
        let tables = self.txn.open_table(TABLES).map_err(store_err)?;
        for item in tables.iter().map_err(store_err)? {
            let (k, v) = item.map_err(store_err)?;
            let m: TableMeta = decode_meta(v.value()).map_err(ExportError::Store)?;
            f(SnapshotItem::Table {
                name: k.value().to_owned(),
                journaled: m.journaled,
            })
            .map_err(ExportError::Visit)?;
        }
        let records = self.txn.open_table(RECORDS).map_err(store_err)?;
        for item in records.iter().map_err(store_err)? {
            let (k, v) = item.map_err(store_err)?;
            let (table, key) = k.value();
            let (version, json) = split_record(v.value()).map_err(ExportError::Store)?;
            f(SnapshotItem::Record {
                table: table.to_owned(),
                key: key.to_owned(),
                version,
                value: json.to_vec(),
            })
            .map_err(ExportError::Visit)?;
        }
        let blobs = self.txn.open_table(BLOBS).map_err(store_err)?;
        let chunks = self.txn.open_table(BLOB_CHUNKS).map_err(store_err)?;
        for item in blobs.iter().map_err(store_err)? {
            let (k, v) = item.map_err(store_err)?;
            let (table, key) = k.value();
            let m: BlobMeta = decode_meta(v.value()).map_err(ExportError::Store)?;
            f(SnapshotItem::BlobStart {
                table: table.to_owned(),
                key: key.to_owned(),
                version: m.version,
                size: m.size,
            })
            .map_err(ExportError::Visit)?;
            for c in chunks
                .range((m.blob_id, 0)..=(m.blob_id, u32::MAX))
                .map_err(store_err)?
            {
                let c = c.map_err(store_err)?;
                f(SnapshotItem::BlobChunk {
                    bytes: c.1.value().to_vec(),
                })
                .map_err(ExportError::Visit)?;
            }
            f(SnapshotItem::BlobEnd).map_err(ExportError::Visit)?;
        }
        Ok(())
    }

    /// How much a snapshot holds.
    pub fn counts(&self) -> Result<SnapshotCounts, StoreError> {
        let mut c = SnapshotCounts::default();
        for t in self.tables()? {
            c.tables += 1;
            c.records += t.records;
            c.blobs += t.blobs;
        }
        let records = self.txn.open_table(RECORDS)?;
        let chunks = self.txn.open_table(BLOB_CHUNKS)?;
        c.approx_bytes = records.stats()?.stored_bytes() + chunks.stats()?.stored_bytes();
        Ok(c)
    }
}

fn store_err<E: Into<redb::Error>, V>(e: E) -> ExportError<V> {
    ExportError::Store(StoreError::from(e))
}

/// One element of a backup snapshot. BLOBs come as `BlobStart`, their
/// chunks in order, then `BlobEnd`. Encoded with postcard in backup files:
/// variants are only ever appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotItem {
    Table {
        name: String,
        journaled: bool,
    },
    Record {
        table: String,
        key: String,
        version: u64,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    BlobStart {
        table: String,
        key: String,
        version: u64,
        size: u64,
    },
    BlobChunk {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    BlobEnd,
}

/// What a snapshot holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotCounts {
    pub tables: u64,
    pub records: u64,
    pub blobs: u64,
    /// Bytes of stored records and BLOB chunks (for progress estimates).
    pub approx_bytes: u64,
}

/// Why an export stopped: the data file failed, or the visitor did.
#[derive(Debug, Error)]
pub enum ExportError<E> {
    #[error("data file: {0}")]
    Store(StoreError),
    #[error("{0}")]
    Visit(E),
}

/// Applies operations inside one write transaction (see [`Store::apply`]).
/// Table counters are kept in memory and written once at the end.
pub struct Applier<'t> {
    records: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    tables: redb::Table<'t, &'static str, &'static [u8]>,
    blobs: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    chunks: redb::Table<'t, (u64, u32), &'static [u8]>,
    meta: redb::Table<'t, &'static str, &'static [u8]>,
    table_cache: HashMap<String, TableMeta>,
    bytes: u64,
    /// Record writes held back until the end of the batch
    /// ([`Store::apply_coalesced`]); `None`: applied at once.
    held: Option<Vec<HeldWrite>>,
}

/// The indices of `held` sorted by (table, key), writes to one key in
/// their journal order, each with its sort prefix (below).
///
/// Comparing strings dominated this sort (a sixth of a replay's CPU), so
/// each write gets a `u64` that orders like its (table, key): the table's
/// rank among the batch's tables (16 bits), then 6 bytes of the key after
/// the prefix every key of the batch shares ("k0000" of "k0000012345"),
/// zero-padded. Zero is the smallest byte, so the `u64`s never contradict
/// the full order; only writes whose `u64`s tie compare their strings.
fn sort_order(held: &[HeldWrite]) -> Vec<(u64, usize)> {
    let Some(first) = held.first() else {
        return Vec::new();
    };
    let mut shared = first.key.len();
    let mut tables: Vec<&str> = Vec::new();
    for w in held {
        shared = common_prefix(&first.key.as_bytes()[..shared], w.key.as_bytes());
        if tables.last() != Some(&w.table.as_str()) {
            tables.push(&w.table);
        }
    }
    tables.sort_unstable();
    tables.dedup();
    let mut keyed: Vec<(u64, usize)> = held
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let rank = tables
                .binary_search(&w.table.as_str())
                .map_or(u16::MAX, |r| u16::try_from(r).unwrap_or(u16::MAX));
            let mut prefix = [0u8; 8];
            prefix[..2].copy_from_slice(&rank.to_be_bytes());
            let rest = w.key.as_bytes().get(shared..).unwrap_or_default();
            let n = rest.len().min(6);
            prefix[2..2 + n].copy_from_slice(&rest[..n]);
            (u64::from_be_bytes(prefix), i)
        })
        .collect();
    keyed.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| {
                let (x, y) = (&held[a.1], &held[b.1]);
                (x.table.as_str(), x.key.as_str()).cmp(&(y.table.as_str(), y.key.as_str()))
            })
            .then(a.1.cmp(&b.1))
    });
    keyed
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A record write held back by [`Store::apply_coalesced`]: a put
/// (`Some((version, value))`) or a delete (`None`).
struct HeldWrite {
    table: String,
    key: String,
    write: Option<(u64, Vec<u8>)>,
}

impl Applier<'_> {
    fn table_meta(&mut self, table: &str) -> Result<&mut TableMeta, StoreError> {
        if !self.table_cache.contains_key(table) {
            let m = match self.tables.get(table)? {
                Some(v) => decode_meta(v.value())?,
                None => TableMeta {
                    journaled: true,
                    ..TableMeta::default()
                },
            };
            self.table_cache.insert(table.to_owned(), m);
        }
        self.table_cache
            .get_mut(table)
            .ok_or_else(|| StoreError("table metadata vanished".into()))
    }

    /// Bytes applied so far in this batch (for `dirty_bytes_max`).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Creates a table or changes its options.
    pub fn set_table(&mut self, table: &str, journaled: bool) -> Result<(), StoreError> {
        self.table_meta(table)?.journaled = journaled;
        self.bytes += table.len() as u64 + 16;
        Ok(())
    }

    /// Writes a record at `version`.
    pub fn put(
        &mut self,
        table: &str,
        key: &str,
        value: &[u8],
        version: u64,
    ) -> Result<(), StoreError> {
        let mut buf = Vec::with_capacity(8 + value.len());
        buf.extend_from_slice(&version.to_le_bytes());
        buf.extend_from_slice(value);
        let existed = self.records.insert((table, key), buf.as_slice())?.is_some();
        if !existed {
            self.table_meta(table)?.records += 1;
        }
        self.bytes += (table.len() + key.len() + buf.len()) as u64;
        Ok(())
    }

    /// [`Applier::put`] of an owned record: held back when the batch
    /// coalesces, without copying it.
    pub fn put_owned(
        &mut self,
        table: String,
        key: String,
        value: Vec<u8>,
        version: u64,
    ) -> Result<(), StoreError> {
        if self.held.is_none() {
            return self.put(&table, &key, &value, version);
        }
        // A put makes its table known at once, as an unheld one does.
        self.table_meta(&table)?;
        self.bytes += (table.len() + key.len() + 8 + value.len()) as u64;
        self.hold(HeldWrite {
            table,
            key,
            write: Some((version, value)),
        });
        Ok(())
    }

    /// [`Applier::delete`] of an owned key: held back when the batch
    /// coalesces.
    pub fn delete_owned(&mut self, table: String, key: String) -> Result<(), StoreError> {
        if self.held.is_none() {
            return self.delete(&table, &key);
        }
        self.bytes += (table.len() + key.len()) as u64;
        self.hold(HeldWrite {
            table,
            key,
            write: None,
        });
        Ok(())
    }

    fn hold(&mut self, write: HeldWrite) {
        if let Some(held) = &mut self.held {
            held.push(write);
        }
    }

    /// Applies the held-back record writes: the last one per key, in key
    /// order (the order of the records B-tree: table, then key).
    fn apply_held(&mut self) -> Result<(), StoreError> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        let bytes = self.bytes;
        let order = sort_order(&held);
        for (n, &(prefix, i)) in order.iter().enumerate() {
            let w = &held[i];
            let superseded = order.get(n + 1).is_some_and(|&(next_prefix, next)| {
                let next = &held[next];
                next_prefix == prefix && next.table == w.table && next.key == w.key
            });
            if superseded {
                continue;
            }
            match &w.write {
                Some((version, value)) => self.put(&w.table, &w.key, value, *version)?,
                None => self.delete(&w.table, &w.key)?,
            }
        }
        // Counted when they were held.
        self.bytes = bytes;
        Ok(())
    }

    /// Removes a record.
    pub fn delete(&mut self, table: &str, key: &str) -> Result<(), StoreError> {
        let existed = self.records.remove((table, key))?.is_some();
        if existed {
            let m = self.table_meta(table)?;
            m.records = m.records.saturating_sub(1);
        }
        self.bytes += (table.len() + key.len()) as u64;
        Ok(())
    }

    /// Stores one staged chunk of a BLOB (invisible until linked).
    pub fn stage_chunk(
        &mut self,
        blob_id: u64,
        index: u32,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.chunks.insert((blob_id, index), bytes)?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Deletes every chunk of a BLOB id.
    pub fn drop_chunks(&mut self, blob_id: u64) -> Result<(), StoreError> {
        self.chunks
            .retain_in((blob_id, 0)..=(blob_id, u32::MAX), |_, _| false)?;
        Ok(())
    }

    /// Makes staged chunks the BLOB at `(table, key)`, dropping the old one.
    pub fn link_blob(&mut self, table: &str, key: &str, meta: BlobMeta) -> Result<(), StoreError> {
        let enc = postcard::to_stdvec(&meta).map_err(|e| StoreError(e.to_string()))?;
        let old = self
            .blobs
            .insert((table, key), enc.as_slice())?
            .map(|v| decode_meta::<BlobMeta>(v.value()))
            .transpose()?;
        match old {
            Some(o) if o.blob_id != meta.blob_id => self.drop_chunks(o.blob_id)?,
            Some(_) => {}
            None => self.table_meta(table)?.blobs += 1,
        }
        self.bytes += (table.len() + key.len() + 32) as u64;
        Ok(())
    }

    /// Removes a BLOB and its chunks.
    pub fn delete_blob(&mut self, table: &str, key: &str) -> Result<(), StoreError> {
        let old = self
            .blobs
            .remove((table, key))?
            .map(|v| decode_meta::<BlobMeta>(v.value()))
            .transpose()?;
        if let Some(o) = old {
            self.drop_chunks(o.blob_id)?;
            let m = self.table_meta(table)?;
            m.blobs = m.blobs.saturating_sub(1);
        }
        Ok(())
    }

    /// Removes staged chunks that no BLOB links (left by a transaction that
    /// never committed). Returns how many chunks were removed.
    pub fn sweep_orphan_chunks(&mut self) -> Result<u64, StoreError> {
        let mut linked = std::collections::HashSet::new();
        for item in self.blobs.iter()? {
            let m: BlobMeta = decode_meta(item?.1.value())?;
            linked.insert(m.blob_id);
        }
        let mut removed = 0u64;
        self.chunks.retain(|(id, _), _| {
            let keep = linked.contains(&id);
            if !keep {
                removed += 1;
            }
            keep
        })?;
        Ok(removed)
    }

    /// Records the epoch.
    pub fn set_epoch(&mut self, epoch: u64) -> Result<(), StoreError> {
        self.meta.insert("epoch", &epoch.to_le_bytes()[..])?;
        Ok(())
    }

    /// Records the epoch history (`(epoch, first LSN)`, increasing).
    pub fn set_epoch_history(&mut self, history: &[(u64, u64)]) -> Result<(), StoreError> {
        let enc = postcard::to_stdvec(history).map_err(|e| StoreError(e.to_string()))?;
        self.meta.insert("epoch_history", enc.as_slice())?;
        Ok(())
    }

    /// Records that everything up to `lsn` is in the data file; meant for a
    /// durable commit ([`Store::apply`] with `durable = true`).
    pub fn set_checkpoint(&mut self, lsn: u64) -> Result<(), StoreError> {
        self.meta.insert("checkpoint_lsn", &lsn.to_le_bytes()[..])?;
        Ok(())
    }

    fn write_tables(&mut self) -> Result<(), StoreError> {
        for (name, m) in self.table_cache.drain() {
            let enc = postcard::to_stdvec(&m).map_err(|e| StoreError(e.to_string()))?;
            self.tables.insert(name.as_str(), enc.as_slice())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(&dir.path().join(DATA_FILE), 1 << 20, [1; 16], 1).unwrap();
        (dir, s)
    }

    #[test]
    fn put_get_delete_and_counts() {
        let (_d, s) = store();
        s.apply(false, |a| -> Result<_, StoreError> {
            a.set_table("t", true)?;
            a.put("t", "a", b"1", 5)?;
            a.put("t", "b", b"2", 6)?;
            a.put("t", "a", b"3", 7)
        })
        .unwrap();
        let r = s.read().unwrap();
        assert_eq!(r.get("t", "a").unwrap().unwrap().value, b"3");
        assert_eq!(r.version("t", "a").unwrap(), 7);
        assert_eq!(r.version("t", "zz").unwrap(), 0);
        assert_eq!(r.tables().unwrap()[0].records, 2);
        s.apply(false, |a| -> Result<_, StoreError> {
            a.delete("t", "a")?;
            a.delete("t", "missing")
        })
        .unwrap();
        let r = s.read().unwrap();
        assert!(r.get("t", "a").unwrap().is_none());
        assert_eq!(r.tables().unwrap()[0].records, 1);
    }

    #[test]
    fn a_failed_batch_commits_nothing() {
        let (_d, s) = store();
        let r = s.apply(false, |a| -> Result<_, StoreError> {
            a.put("t", "a", b"1", 1)?;
            Err::<(), _>(StoreError("boom".into()))
        });
        assert!(r.is_err());
        assert!(s.read().unwrap().get("t", "a").unwrap().is_none());
    }

    #[test]
    fn scan_pages_by_prefix_and_start_after() {
        let (_d, s) = store();
        s.apply(false, |a| -> Result<_, StoreError> {
            for k in ["a1", "a2", "a3", "b1"] {
                a.put("t", k, b"0", 1)?;
            }
            a.put("u", "a0", b"0", 1)
        })
        .unwrap();
        let r = s.read().unwrap();
        let p = r.scan("t", "a", None, 2).unwrap();
        assert_eq!(
            p.records.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            ["a1", "a2"]
        );
        assert_eq!(p.next.as_deref(), Some("a2"));
        let p = r.scan("t", "a", p.next.as_deref(), 2).unwrap();
        assert_eq!(
            p.records.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            ["a3"]
        );
        assert_eq!(p.next, None);
        let all = r.scan("t", "", None, 100).unwrap();
        assert_eq!(all.records.len(), 4);
    }

    #[test]
    fn blobs_link_replace_and_sweep() {
        let (_d, s) = store();
        s.apply(false, |a| -> Result<_, StoreError> {
            a.stage_chunk(10, 0, b"ab")?;
            a.stage_chunk(10, 1, b"c")?;
            a.link_blob(
                "t",
                "k",
                BlobMeta {
                    blob_id: 10,
                    size: 3,
                    version: 10,
                },
            )?;
            a.stage_chunk(20, 0, b"orphan")
        })
        .unwrap();
        let r = s.read().unwrap();
        let m = r.blob("t", "k").unwrap().unwrap();
        assert_eq!(r.blob_chunk(m.blob_id, 1).unwrap().unwrap(), b"c");
        let (removed, _) = s
            .apply(false, |a| -> Result<_, StoreError> {
                let n = a.sweep_orphan_chunks()?;
                a.stage_chunk(30, 0, b"new")?;
                a.link_blob(
                    "t",
                    "k",
                    BlobMeta {
                        blob_id: 30,
                        size: 3,
                        version: 30,
                    },
                )?;
                Ok(n)
            })
            .unwrap();
        assert_eq!(removed, 1);
        let r = s.read().unwrap();
        assert!(r.blob_chunk(10, 0).unwrap().is_none(), "old chunks dropped");
        assert_eq!(r.tables().unwrap()[0].blobs, 1);
    }

    #[test]
    fn durable_checkpoint_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATA_FILE);
        {
            let s = Store::create(&path, 1 << 20, [2; 16], 3).unwrap();
            s.apply(true, |a| -> Result<_, StoreError> {
                a.put("t", "k", b"1", 1)?;
                a.set_checkpoint(1)
            })
            .unwrap();
        }
        let s = Store::open(&path, 1 << 20).unwrap();
        let m = s.meta().unwrap();
        assert_eq!(
            m,
            StoreMeta {
                db_id: [2; 16],
                epoch: 3,
                checkpoint_lsn: 1
            }
        );
        assert_eq!(s.read().unwrap().digest().unwrap().0, 1);
    }

    /// One record write of the coalescing test: table, key, and a value
    /// (a put) or none (a delete).
    type Write = (u8, u8, Option<u8>);

    fn apply_writes(s: &Store, coalesced: bool, batch: &[Write], first_lsn: u64) {
        let f = |a: &mut Applier<'_>| -> Result<(), StoreError> {
            for (i, &(t, k, v)) in batch.iter().enumerate() {
                let (table, key) = (format!("t{t}"), format!("k{k}"));
                match v {
                    Some(v) => a.put_owned(
                        table,
                        key,
                        vec![v; 1 + v as usize % 5],
                        first_lsn + i as u64,
                    )?,
                    None => a.delete_owned(table, key)?,
                }
            }
            Ok(())
        };
        let result = if coalesced {
            s.apply_coalesced(false, f)
        } else {
            s.apply(false, f)
        };
        result.unwrap();
    }

    /// Every record (table, key, version, value) and every table's count.
    type Contents = (Vec<(String, String, u64, Vec<u8>)>, Vec<(String, u64)>);

    fn contents(s: &Store) -> Contents {
        let r = s.read().unwrap();
        let mut records = Vec::new();
        let mut counts = Vec::new();
        for t in r.tables().unwrap() {
            for rec in r.scan(&t.name, "", None, usize::MAX).unwrap().records {
                records.push((t.name.clone(), rec.key, rec.version, rec.value));
            }
            counts.push((t.name, t.records));
        }
        (records, counts)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Coalesced batches (replay, restore) leave exactly what applying
        /// every write in order leaves: values, versions, table counts.
        #[test]
        fn coalesced_batches_equal_writes_applied_one_by_one(
            batches in proptest::collection::vec(
                proptest::collection::vec(
                    (0u8..2, 0u8..6, proptest::option::weighted(0.7, proptest::prelude::any::<u8>())),
                    0..40,
                ),
                1..4,
            )
        ) {
            let (_a, one_by_one) = store();
            let (_b, coalesced) = store();
            let mut lsn = 1;
            for batch in &batches {
                apply_writes(&one_by_one, false, batch, lsn);
                apply_writes(&coalesced, true, batch, lsn);
                lsn += batch.len() as u64;
            }
            proptest::prop_assert_eq!(contents(&one_by_one), contents(&coalesced));
        }
    }

    proptest::proptest! {
        /// The sort prefixes never reorder writes: the order is the one a
        /// stable sort by (table, key) gives, for any strings.
        #[test]
        fn sort_order_is_a_stable_sort_by_table_and_key(
            writes in proptest::collection::vec(("[ab]{0,2}", "(k0{0,7}[0-9\\x00\\xff]{0,9})|.{0,3}"), 0..60)
        ) {
            let held: Vec<HeldWrite> = writes
                .iter()
                .map(|(t, k)| HeldWrite { table: t.clone(), key: k.clone(), write: None })
                .collect();
            let mut expected: Vec<usize> = (0..held.len()).collect();
            expected.sort_by(|&a, &b| {
                (held[a].table.as_str(), held[a].key.as_str())
                    .cmp(&(held[b].table.as_str(), held[b].key.as_str()))
            });
            let got: Vec<usize> = sort_order(&held).into_iter().map(|(_, i)| i).collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }
}
