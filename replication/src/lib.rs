//! Journal shipping for mirrordb.
//!
//! This crate moves journal entries from a primary to its mirrors over QUIC
//! with mutual TLS. It knows an entry only as framed bytes tagged with its
//! position `(Lsn, Epoch)`; it never decodes the operation inside. The node
//! plugs its journal in through the traits defined here, so this crate stays
//! free of datastore details and is testable with in-memory fakes.
//!
//! ```text
//!  certs ──► tls ──► endpoint (one QUIC endpoint per node; ALPN repl | raft)
//!                        │
//!  storage traits ──► driver (tokio) ──► protocol (I/O-free sessions) ──► frame (wire)
//!                        │
//!                     tracker (per-mirror acks, quorum wait, lag)
//! ```
//!
//! | module | owns |
//! | --- | --- |
//! | [`frame`] | wire frames: length prefix, version byte, postcard [`Message`]s, limits |
//! | [`protocol`] | [`protocol::PrimarySession`] / [`protocol::MirrorSession`] state machines and their rules |
//! | [`storage`] | [`JournalSource`] / [`JournalSink`] and their durability contracts |
//! | [`tracker`] | [`AckTracker`]: flushed/applied per mirror, `wait_for` quorum, lag |
//! | [`driver`] | [`driver::serve_replication`] (primary), [`driver::run_mirror`] (mirror) |
//! | [`certs`] | cluster CA and node certificates, PEM files |
//! | [`tls`] | rustls configurations (aws-lc-rs, TLS 1.3, mTLS) |
//! | [`endpoint`] | [`NodeEndpoint`]: accept and dial with peer identity checks |
//! | [`testing`] | in-memory source and sink, sink conformance check |
//!
//! A node wires it like this: load its [`certs::NodeIdentity`], bind a
//! [`NodeEndpoint`], give `Incoming.replication` to `serve_replication`
//! while primary (and `Incoming.raft` to the failover crate), or run
//! `run_mirror` towards the primary the control plane names while mirror.

pub mod certs;
pub mod driver;
pub mod endpoint;
pub mod frame;
pub mod protocol;
pub mod storage;
pub mod testing;
pub mod tls;
pub mod tracker;
pub mod types;

pub use endpoint::{NodeEndpoint, PeerConnection, Service};
pub use frame::{FramedEntry, Message};
pub use storage::{JournalSink, JournalSource, SinkPosition, Snapshot, StorageError};
pub use tracker::AckTracker;
pub use types::{Epoch, Lsn, NodeId};
