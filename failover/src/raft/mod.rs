//! The openraft glue: type configuration, durable storage and the network.
//!
//! - [`TypeConfig`]: log entries carry [`ClusterCommand`]s; the state machine
//!   answers a [`CommandResult`] per entry.
//! - Node ids: openraft needs a `u64`; it is [`raft_id`] of the member's
//!   name (FNV-1a 64, fixed by this crate). The name and addresses travel
//!   in [`RaftNode`], so every node can map an id back to a name from the
//!   Raft membership alone.
//! - [`store`]: `raft.redb` in the node's data directory holds the log, the
//!   vote and the state machine (one redb file, every write fsynced).
//! - [`network`]: openraft's network over a small byte transport
//!   ([`network::RaftTransport`]), with an in-memory fault-injecting
//!   implementation for tests.
//! - [`quic`]: the same trait over the node's QUIC endpoint (ALPN
//!   `mirrordb-raft/1`), one bidirectional stream per call with
//!   [`framing`]'s length-prefixed frames, and its receiving side.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::NodeId;
use crate::state::{ClusterCommand, CommandResult, raft_id};

pub mod framing;
pub mod network;
pub mod quic;
pub mod store;

openraft::declare_raft_types!(
    /// openraft type configuration of the mirrordb control plane.
    pub TypeConfig:
        D = ClusterCommand,
        R = CommandResult,
        NodeId = u64,
        Node = RaftNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The openraft handle for this cluster.
pub type Raft = openraft::Raft<TypeConfig>;

/// openraft's node data: the member's name and where its Raft RPCs go.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    /// The member's name (as in its certificate).
    pub name: NodeId,
    /// `host:port` of its QUIC endpoint.
    pub raft_addr: String,
}

impl RaftNode {
    /// The openraft id of this node.
    #[must_use]
    pub fn id(&self) -> u64 {
        raft_id(&self.name)
    }
}

impl fmt::Display for RaftNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.raft_addr)
    }
}
