//! Journal shipping for mirrordb.
//!
//! This crate moves journal entries from a primary to its mirrors over QUIC
//! with mutual TLS. It knows an entry only as framed bytes tagged with its
//! position `(Lsn, Epoch)`; it never decodes the operation inside. The node
//! plugs its journal in through the traits defined here, so this crate stays
//! free of datastore details and is testable with in-memory fakes.

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

pub use frame::{FramedEntry, Message};
pub use types::{Epoch, Lsn, NodeId};
