//! Errors of the engine, one enum per family of operation. Each carries a
//! stable snake_case `code()` that the HTTP API and the CLI show to users.
//!
//! "This request failed" (`WriteError`, `ReadError`) is kept apart from "the
//! node cannot start" (`OpenError`).

use crate::model::InvalidInput;
use std::path::PathBuf;
use thiserror::Error;

/// Why a write was refused. Nothing of a refused write is applied.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidInput),
    #[error("version conflict on {table}/{key}: expected version {expected}, found {actual}")]
    VersionConflict {
        table: String,
        key: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "the journal cannot be written ({0}); writes are refused until the node is restarted or a backup succeeds"
    )]
    JournalUnavailable(String),
    #[error("write blocked: {0}")]
    WriteBlocked(String),
    #[error("this node is not the primary")]
    NotPrimary { primary_http: Option<String> },
    /// A primary whose lease lapsed (or that is being replaced): it neither
    /// takes nor acknowledges writes until the cluster confirms it again.
    #[error("{0}")]
    Fenced(String),
    #[error("a transaction cannot mix journaled and unjournaled tables ({0})")]
    MixedJournaling(String),
    #[error("the engine is shutting down")]
    Closed,
    #[error("storage error: {0}")]
    Storage(String),
    #[error("reading the request body failed: {0}")]
    Body(String),
    #[error("replication: {0}")]
    Replication(String),
    #[error("refused entries of epoch {got}: this node has seen epoch {seen} (fenced)")]
    StaleEpoch { got: u64, seen: u64 },
}

impl WriteError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            WriteError::Invalid(InvalidInput::TooLarge { .. }) => "payload_too_large",
            WriteError::Invalid(_) => "invalid_request",
            WriteError::VersionConflict { .. } => "version_conflict",
            WriteError::JournalUnavailable(_) => "journal_unavailable",
            WriteError::WriteBlocked(_) => "write_blocked",
            WriteError::NotPrimary { .. } | WriteError::Fenced(_) => "not_primary",
            WriteError::MixedJournaling(_) => "invalid_request",
            WriteError::Closed => "shutting_down",
            WriteError::Storage(_) => "storage_error",
            WriteError::Body(_) => "invalid_request",
            WriteError::Replication(_) => "replication_error",
            WriteError::StaleEpoch { .. } => "stale_epoch",
        }
    }
}

impl From<super::store::StoreError> for WriteError {
    fn from(e: super::store::StoreError) -> Self {
        WriteError::Storage(e.to_string())
    }
}

impl From<super::store::StoreError> for OpenError {
    fn from(e: super::store::StoreError) -> Self {
        OpenError::Store(e.to_string())
    }
}

/// Why a read failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidInput),
    #[error("storage error: {0}")]
    Storage(String),
}

impl ReadError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ReadError::Invalid(_) => "invalid_request",
            ReadError::Storage(_) => "storage_error",
        }
    }
}

/// Why the node refuses to start. Each message says what was found and what
/// the operator can do about it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another mirrordb process")]
    Locked(PathBuf),
    #[error(
        "journal corrupted in {segment} at byte offset {offset}: {reason}. The entries after this point cannot be trusted. \
         Restore from a backup: {hint}"
    )]
    JournalCorrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
        hint: String,
    },
    #[error(
        "journal segment {segment} belongs to database {found}, but this data file is database {expected}; refusing to integrate another database's journal"
    )]
    ForeignJournal {
        segment: PathBuf,
        expected: String,
        found: String,
    },
    #[error("data file {path} is damaged or missing ({reason}). {hint}")]
    DataFileDamaged {
        path: PathBuf,
        reason: String,
        hint: String,
    },
    #[error(
        "the data file has checkpoint LSN {checkpoint} but the journal ends at LSN {journal_end}: journal files are missing from {dir}"
    )]
    JournalBehindDataFile {
        checkpoint: u64,
        journal_end: u64,
        dir: PathBuf,
    },
    #[error("journal I/O error on {path}: {source}")]
    JournalIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data file error: {0}")]
    Store(String),
}
