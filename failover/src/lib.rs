//! The mirrordb control plane.
//!
//! A small openraft group decides which node is primary, hands out epochs and
//! holds the primary's lease. The failover controller that runs on the Raft
//! leader is a plain state machine (events in, actions out, time passed in);
//! a thin async driver wires it to openraft and to the node through the
//! `RoleControl` trait defined here.

pub use mirrordb_replication::{Epoch, Lsn, NodeId};

pub mod controller;
pub mod driver;
pub mod membership;
pub mod raft;
pub mod role;
pub mod state;
pub mod timing;

pub use controller::{Action, Controller, ControllerConfig, Report, Status};
pub use state::{
    ClusterCommand, ClusterState, CommitMode, CommitPolicy, Member, OnUnavailable, Rejected, Role,
};
pub use timing::{Timing, TimingError};
