//! Turning journal entries into data-file changes. The same code applies
//! entries at recovery, in the live writer after each fsync, and (later) on
//! mirrors, so the three can never disagree.
//!
//! Transaction framing: operations between `TxnBegin` and `TxnCommit` are
//! held back and applied together at the commit; a `TxnAbort`, or the end of
//! the journal while a transaction is open, discards them. BLOB chunks are
//! the exception: they are staged in the data file as they arrive (so a
//! 1 GiB BLOB is never held in memory) and stay invisible until the commit
//! links them; a discarded transaction drops its staged chunks.

use super::store::{Applier, BlobMeta, StoreError};
use crate::model::Op;

/// A BLOB whose chunks are being staged.
#[derive(Debug)]
struct PendingBlob {
    blob_id: u64,
    table: String,
    key: String,
    size: u64,
    next_index: u32,
    received: u64,
}

#[derive(Debug, Default)]
struct PendingTxn {
    begin_lsn: u64,
    ops: Vec<(u64, Op)>,
    blob: Option<PendingBlob>,
}

/// Applies entries in LSN order, holding back open transactions.
#[derive(Debug, Default)]
pub struct Replayer {
    pending: Option<PendingTxn>,
    /// Last LSN whose effects are fully applied (no open transaction before it).
    complete_lsn: u64,
    last_lsn: u64,
}

impl Replayer {
    /// A replayer positioned after `lsn`.
    pub fn after(lsn: u64) -> Replayer {
        Replayer {
            pending: None,
            complete_lsn: lsn,
            last_lsn: lsn,
        }
    }

    /// Whether a transaction is open.
    pub fn in_txn(&self) -> bool {
        self.pending.is_some()
    }

    /// The last LSN all of whose effects are applied: a checkpoint may be
    /// recorded here (never inside an open transaction).
    pub fn complete_lsn(&self) -> u64 {
        self.complete_lsn
    }

    /// The last LSN seen.
    pub fn last_lsn(&self) -> u64 {
        self.last_lsn
    }

    /// Applies one entry.
    pub fn apply(&mut self, w: &mut Applier<'_>, lsn: u64, op: Op) -> Result<(), StoreError> {
        self.last_lsn = lsn;
        match op {
            Op::TxnBegin { .. } => {
                if let Some(old) = self.pending.take() {
                    tracing::warn!(
                        begin_lsn = old.begin_lsn,
                        lsn,
                        "transaction without commit or abort, discarded"
                    );
                    discard(w, old)?;
                }
                self.pending = Some(PendingTxn {
                    begin_lsn: lsn,
                    ..PendingTxn::default()
                });
            }
            Op::TxnCommit => {
                if let Some(txn) = self.pending.take() {
                    for (op_lsn, op) in txn.ops {
                        apply_one(w, op_lsn, op)?;
                    }
                    if let Some(b) = txn.blob {
                        w.link_blob(
                            &b.table,
                            &b.key,
                            BlobMeta {
                                blob_id: b.blob_id,
                                size: b.received,
                                version: b.blob_id,
                            },
                        )?;
                    }
                }
                self.complete_lsn = lsn;
            }
            Op::TxnAbort => {
                if let Some(txn) = self.pending.take() {
                    discard(w, txn)?;
                }
                self.complete_lsn = lsn;
            }
            Op::BlobBegin {
                table, key, size, ..
            } => {
                let blob = PendingBlob {
                    blob_id: lsn,
                    table,
                    key,
                    size,
                    next_index: 0,
                    received: 0,
                };
                match self.pending.as_mut() {
                    Some(t) => t.blob = Some(blob),
                    None => tracing::warn!(lsn, "BLOB outside a transaction ignored"),
                }
            }
            Op::BlobChunk { bytes } => {
                if let Some(b) = self.pending.as_mut().and_then(|t| t.blob.as_mut()) {
                    w.stage_chunk(b.blob_id, b.next_index, &bytes)?;
                    b.next_index += 1;
                    b.received += bytes.len() as u64;
                    if b.received > b.size {
                        tracing::warn!(lsn, "BLOB chunks exceed the announced size");
                    }
                }
            }
            other => match self.pending.as_mut() {
                Some(t) => t.ops.push((lsn, other)),
                None => {
                    apply_one(w, lsn, other)?;
                    self.complete_lsn = lsn;
                }
            },
        }
        Ok(())
    }

    /// Discards an open transaction (end of the journal reached inside it).
    /// Returns its `TxnBegin` LSN if there was one.
    pub fn abort_open(&mut self, w: &mut Applier<'_>) -> Result<Option<u64>, StoreError> {
        match self.pending.take() {
            Some(txn) => {
                let begin = txn.begin_lsn;
                discard(w, txn)?;
                Ok(Some(begin))
            }
            None => Ok(None),
        }
    }

    /// Marks `lsn` as applied without an operation (an entry whose effects
    /// live elsewhere, such as a write to an unjournaled table).
    pub fn skip_to(&mut self, lsn: u64) {
        self.last_lsn = lsn;
        if self.pending.is_none() {
            self.complete_lsn = lsn;
        }
    }
}

fn discard(w: &mut Applier<'_>, txn: PendingTxn) -> Result<(), StoreError> {
    if let Some(b) = txn.blob {
        w.drop_chunks(b.blob_id)?;
    }
    Ok(())
}

fn apply_one(w: &mut Applier<'_>, lsn: u64, op: Op) -> Result<(), StoreError> {
    match op {
        Op::Put {
            table, key, value, ..
        } => w.put_owned(table, key, value, lsn),
        Op::Delete { table, key, .. } => w.delete_owned(table, key),
        Op::TableCreate {
            table, journaled, ..
        }
        | Op::TableAlter {
            table, journaled, ..
        } => w.set_table(&table, journaled),
        Op::BlobDelete { table, key, .. } => w.delete_blob(&table, &key),
        Op::DataFileOpen { .. }
        | Op::DataFileClose
        | Op::SessionOpen { .. }
        | Op::SessionClose { .. }
        | Op::BackupMarker { .. }
        | Op::RestorePoint { .. }
        | Op::TxnBegin { .. }
        | Op::TxnCommit
        | Op::TxnAbort
        | Op::BlobBegin { .. }
        | Op::BlobChunk { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::store::{DATA_FILE, Store, StoreError};
    use crate::model::SessionId;

    fn put(k: &str, v: &str) -> Op {
        Op::Put {
            session: SessionId(1),
            table: "t".into(),
            key: k.into(),
            value: v.as_bytes().to_vec(),
        }
    }

    #[test]
    fn committed_txn_applies_and_open_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(&dir.path().join(DATA_FILE), 1 << 20, [0; 16], 1).unwrap();
        let mut r = Replayer::after(0);
        s.apply(false, |w| -> Result<_, StoreError> {
            r.apply(w, 1, put("solo", "1"))?;
            r.apply(
                w,
                2,
                Op::TxnBegin {
                    session: SessionId(1),
                    ops: 2,
                },
            )?;
            r.apply(w, 3, put("a", "1"))?;
            r.apply(w, 4, put("b", "1"))?;
            assert_eq!(r.complete_lsn(), 1, "checkpoint never inside a txn");
            r.apply(w, 5, Op::TxnCommit)?;
            assert_eq!(r.complete_lsn(), 5);
            r.apply(
                w,
                6,
                Op::TxnBegin {
                    session: SessionId(1),
                    ops: 1,
                },
            )?;
            r.apply(w, 7, put("c", "1"))?;
            assert_eq!(r.abort_open(w)?, Some(6));
            Ok(())
        })
        .unwrap();
        let v = s.read().unwrap();
        assert_eq!(v.version("t", "solo").unwrap(), 1);
        assert_eq!(v.version("t", "a").unwrap(), 3);
        assert_eq!(v.version("t", "b").unwrap(), 4);
        assert!(v.get("t", "c").unwrap().is_none());
    }

    #[test]
    fn aborted_blob_leaves_no_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(&dir.path().join(DATA_FILE), 1 << 20, [0; 16], 1).unwrap();
        let mut r = Replayer::after(0);
        let begin = |key: &str| Op::BlobBegin {
            session: SessionId(1),
            table: "t".into(),
            key: key.into(),
            size: 4,
        };
        s.apply(false, |w| -> Result<_, StoreError> {
            r.apply(
                w,
                1,
                Op::TxnBegin {
                    session: SessionId(1),
                    ops: 1,
                },
            )?;
            r.apply(w, 2, begin("b"))?;
            r.apply(
                w,
                3,
                Op::BlobChunk {
                    bytes: b"ab".to_vec(),
                },
            )?;
            r.apply(w, 4, Op::TxnAbort)?;
            r.apply(
                w,
                5,
                Op::TxnBegin {
                    session: SessionId(1),
                    ops: 1,
                },
            )?;
            r.apply(w, 6, begin("b"))?;
            r.apply(
                w,
                7,
                Op::BlobChunk {
                    bytes: b"wxyz".to_vec(),
                },
            )?;
            r.apply(w, 8, Op::TxnCommit)
        })
        .unwrap();
        let v = s.read().unwrap();
        assert!(v.blob_chunk(2, 0).unwrap().is_none());
        let m = v.blob("t", "b").unwrap().unwrap();
        assert_eq!((m.blob_id, m.size), (6, 4));
        assert_eq!(v.blob_chunk(6, 0).unwrap().unwrap(), b"wxyz");
    }
}
