//! mirrordb node: the datastore, its journal, recovery, and the HTTP API.
//!
//! ```text
//! HTTP API ──► Engine ──► writer thread ──► journal (segments, fdatasync) ──► ack
//!                 │              └────────► data file (redb, flushed with checkpoint_lsn)
//!                 └─► readers: MVCC snapshots of the data file
//! ```

pub mod activity;
pub mod api;
pub mod backup;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod engine;
pub mod http_client;
pub mod journal;
pub mod metrics;
pub mod model;
pub mod serve;
