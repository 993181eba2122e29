//! The data model every layer shares: table names, record keys, the limits of
//! DESIGN §2, the operations written to the journal, and the shapes of
//! records returned to readers.
//!
//! Names and keys are validated here, once, so the journal, the data file and
//! the HTTP API agree on what is legal.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest record key, in bytes (DESIGN §2).
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest table name, in bytes.
pub const MAX_TABLE_NAME_BYTES: usize = 128;
/// Largest JSON value of a record (DESIGN §2).
pub const MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;
/// Largest BLOB (DESIGN §2).
pub const MAX_BLOB_BYTES: u64 = 1024 * 1024 * 1024;
/// BLOBs are journaled and stored in chunks of this size, so no layer ever
/// holds a whole BLOB in memory.
pub const BLOB_CHUNK_BYTES: usize = 1024 * 1024;
/// Most operations in one transaction.
pub const MAX_TXN_OPS: usize = 10_000;
/// Largest total of values in one transaction.
pub const MAX_TXN_BYTES: usize = 64 * 1024 * 1024;
/// Most records one scan page returns.
pub const MAX_SCAN_LIMIT: usize = 10_000;

/// Why a name, key or value was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidInput {
    #[error("table name must be 1..={MAX_TABLE_NAME_BYTES} bytes of [A-Za-z0-9_.-], got {0:?}")]
    TableName(String),
    #[error("record key must be 1..={MAX_KEY_BYTES} bytes of UTF-8 without control characters")]
    Key,
    #[error("value is {got} bytes; the limit is {limit} bytes")]
    TooLarge { got: u64, limit: u64 },
    #[error("value is not valid JSON: {0}")]
    NotJson(String),
    #[error("transaction has {0} operations; the limit is {MAX_TXN_OPS}")]
    TooManyOps(usize),
    #[error("transaction is empty")]
    EmptyTransaction,
    #[error("{0}")]
    Other(String),
}

/// Checks a table name: 1..=128 bytes of ASCII letters, digits, `_`, `.`, `-`.
pub fn validate_table(name: &str) -> Result<(), InvalidInput> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TABLE_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidInput::TableName(name.chars().take(64).collect()))
    }
}

/// Checks a record key: 1..=1024 bytes of UTF-8 with no control characters.
pub fn validate_key(key: &str) -> Result<(), InvalidInput> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
        Err(InvalidInput::Key)
    } else {
        Ok(())
    }
}

/// Checks that `value` is one JSON document within the size limit.
pub fn validate_json(value: &[u8]) -> Result<(), InvalidInput> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(InvalidInput::TooLarge {
            got: value.len() as u64,
            limit: MAX_VALUE_BYTES as u64,
        });
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(value)
        .map(|_| ())
        .map_err(|e| InvalidInput::NotJson(e.to_string()))
}

/// A session number, assigned by the node when a client identity first
/// writes; `SessionId(0)` is the node itself (recovery, flush, rollback).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct SessionId(pub u64);

impl SessionId {
    /// The node's own session: operations it does on its own behalf.
    pub const SYSTEM: SessionId = SessionId(0);
}

/// Who is writing: the identity a session is opened for (DESIGN §2,
/// "sessions"). The client chooses `client_session`; the node adds the token
/// name and the peer address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientIdentity {
    pub token_name: String,
    pub peer: String,
    pub client_session: String,
}

/// One operation as written in the journal (the payload of an entry).
///
/// The encoding is postcard; variants are only ever appended, never
/// reordered, because the variant index is part of the on-disk format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// The node opened the data file (written at every start).
    DataFileOpen {
        node: String,
        version: String,
    },
    /// The node closed the data file cleanly.
    DataFileClose,
    SessionOpen {
        session: SessionId,
        identity: ClientIdentity,
    },
    SessionClose {
        session: SessionId,
    },
    TableCreate {
        session: SessionId,
        table: String,
        journaled: bool,
    },
    TableAlter {
        session: SessionId,
        table: String,
        journaled: bool,
    },
    Put {
        session: SessionId,
        table: String,
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        session: SessionId,
        table: String,
        key: String,
    },
    /// Start of a BLOB write; its chunks follow, then `TxnCommit`.
    BlobBegin {
        session: SessionId,
        table: String,
        key: String,
        size: u64,
    },
    BlobChunk {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    BlobDelete {
        session: SessionId,
        table: String,
        key: String,
    },
    /// Start of a transaction of `ops` operations; nothing in it is applied
    /// until its `TxnCommit`.
    TxnBegin {
        session: SessionId,
        ops: u32,
    },
    TxnCommit,
    TxnAbort,
    /// A full backup's barrier (issue 3).
    BackupMarker {
        number: u32,
    },
    /// A named restore point.
    RestorePoint {
        name: String,
    },
}

impl Op {
    /// The session that did this operation, where the operation names one.
    pub fn session(&self) -> Option<SessionId> {
        match self {
            Op::SessionOpen { session, .. }
            | Op::SessionClose { session }
            | Op::TableCreate { session, .. }
            | Op::TableAlter { session, .. }
            | Op::Put { session, .. }
            | Op::Delete { session, .. }
            | Op::BlobBegin { session, .. }
            | Op::BlobDelete { session, .. }
            | Op::TxnBegin { session, .. } => Some(*session),
            _ => None,
        }
    }

    /// The `(table, key)` this operation touches, if any.
    pub fn target(&self) -> Option<(&str, Option<&str>)> {
        match self {
            Op::TableCreate { table, .. } | Op::TableAlter { table, .. } => {
                Some((table.as_str(), None))
            }
            Op::Put { table, key, .. }
            | Op::Delete { table, key, .. }
            | Op::BlobBegin { table, key, .. }
            | Op::BlobDelete { table, key, .. } => Some((table.as_str(), Some(key.as_str()))),
            _ => None,
        }
    }

    /// A short name for activity listings (`put`, `txn_begin`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::DataFileOpen { .. } => "datafile_open",
            Op::DataFileClose => "datafile_close",
            Op::SessionOpen { .. } => "session_open",
            Op::SessionClose { .. } => "session_close",
            Op::TableCreate { .. } => "table_create",
            Op::TableAlter { .. } => "table_alter",
            Op::Put { .. } => "put",
            Op::Delete { .. } => "delete",
            Op::BlobBegin { .. } => "blob_begin",
            Op::BlobChunk { .. } => "blob_chunk",
            Op::BlobDelete { .. } => "blob_delete",
            Op::TxnBegin { .. } => "txn_begin",
            Op::TxnCommit => "txn_commit",
            Op::TxnAbort => "txn_abort",
            Op::BackupMarker { .. } => "backup_marker",
            Op::RestorePoint { .. } => "restore_point",
        }
    }
}

/// A record as read back: its JSON bytes and its version (the LSN that last
/// wrote it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub version: u64,
    pub value: Vec<u8>,
}

/// What the node knows about a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    pub name: String,
    pub journaled: bool,
    pub records: u64,
    pub blobs: u64,
}

/// Options an operator may set on a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableOptions {
    pub journaled: bool,
}

/// One write inside a transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteOp {
    Put {
        table: String,
        key: String,
        value: Vec<u8>,
        if_version: Option<u64>,
    },
    Delete {
        table: String,
        key: String,
        if_version: Option<u64>,
    },
}

impl WriteOp {
    /// The table this operation writes.
    pub fn table(&self) -> &str {
        match self {
            WriteOp::Put { table, .. } | WriteOp::Delete { table, .. } => table,
        }
    }

    /// The key this operation writes.
    pub fn key(&self) -> &str {
        match self {
            WriteOp::Put { key, .. } | WriteOp::Delete { key, .. } => key,
        }
    }

    /// The precondition, if any: `Some(0)` means "must not exist".
    pub fn if_version(&self) -> Option<u64> {
        match self {
            WriteOp::Put { if_version, .. } | WriteOp::Delete { if_version, .. } => *if_version,
        }
    }

    /// Checks names, key and value against the limits.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        validate_table(self.table())?;
        validate_key(self.key())?;
        if let WriteOp::Put { value, .. } = self {
            validate_json(value)?;
        }
        Ok(())
    }
}

/// What a successful write answers: the LSN that made it durable and the
/// version of each record written, in request order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WriteAck {
    pub lsn: u64,
    pub versions: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_checked() {
        assert!(validate_table("users").is_ok());
        assert!(validate_table("a.b-c_1").is_ok());
        assert!(validate_table("").is_err());
        assert!(validate_table("has space").is_err());
        assert!(validate_table(&"x".repeat(MAX_TABLE_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("k").is_ok());
        assert!(validate_key("ключ/🙂").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("a\nb").is_err());
        assert!(validate_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(validate_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
    }

    #[test]
    fn values_must_be_json_within_limit() {
        assert!(validate_json(br#"{"a":1}"#).is_ok());
        assert!(matches!(validate_json(b"{"), Err(InvalidInput::NotJson(_))));
        let big = vec![b' '; MAX_VALUE_BYTES + 1];
        assert!(matches!(
            validate_json(&big),
            Err(InvalidInput::TooLarge { .. })
        ));
    }

    #[test]
    fn ops_report_session_and_target() {
        let op = Op::Put {
            session: SessionId(7),
            table: "t".into(),
            key: "k".into(),
            value: b"1".to_vec(),
        };
        assert_eq!(op.session(), Some(SessionId(7)));
        assert_eq!(op.target(), Some(("t", Some("k"))));
        assert_eq!(op.kind(), "put");
        assert_eq!(Op::TxnCommit.session(), None);
    }
}
