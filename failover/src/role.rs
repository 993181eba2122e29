//! What the control plane asks of a node: the `RoleControl` seam.
//!
//! The node (datastore, journal, replication) implements [`RoleControl`];
//! the failover driver calls it when the applied cluster state makes this
//! node primary or mirror, when the lease is renewed, and when writes must
//! stop. This crate never touches the datastore itself, so everything here
//! is testable with an in-memory fake.
//!
//! Contract on the node side:
//! - After `lease_valid_until(epoch, t)` the node must not acknowledge a write
//!   of `epoch` once its clock passes `t` (the per-write check that makes the
//!   lease safe); `fence_writes` stops writes at once, whatever the lease.
//! - `fence_writes` is called when the lease was not renewed in time, when
//!   the node stops being primary, and to hold writes for a switchover (held
//!   writes wait; the driver calls `unfence_writes` if the switchover is
//!   abandoned). Its returned LSN must be durable: a switchover target is
//!   promoted right after it.
//! - `become_primary(epoch, first_lsn)`: finish replaying what is durable;
//!   local entries of an *older* epoch at or after `first_lsn` are divergent
//!   and go to `data/rollback/`; new writes are stamped with `epoch`,
//!   continuing after the last entry (which is `first_lsn - 1` on a fresh
//!   promotion). After a restart the driver calls it again for the same
//!   epoch: entries already written in `epoch` are kept. Writes stay refused
//!   until `lease_valid_until` gives a deadline in the future.
//! - `become_mirror(primary, …)`: stop writing, follow `primary` (rejoin
//!   rules of DESIGN §8).

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::state::Member;
use crate::{Epoch, Lsn, NodeId};

/// Where a data node's journal is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Epoch of its last journal entry.
    pub epoch: Epoch,
    /// Last LSN durable in its journal.
    pub flushed_lsn: Lsn,
    /// Last LSN applied to its data file.
    pub applied_lsn: Lsn,
}

/// A role change the node could not carry out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RoleError {
    /// This node holds no data (a witness).
    #[error("this node holds no data")]
    NoData,
    /// The node failed; the message says why.
    #[error("{0}")]
    Failed(String),
}

/// Implemented by the node; called by the failover driver.
pub trait RoleControl: Send + Sync + 'static {
    /// Open for writes as primary of `epoch`, whose first entry is `first_lsn`.
    fn become_primary(
        &self,
        epoch: Epoch,
        first_lsn: Lsn,
    ) -> impl Future<Output = Result<(), RoleError>> + Send;

    /// Stop writing and follow `primary` (reachable at `member`'s addresses).
    fn become_mirror(
        &self,
        primary: &NodeId,
        member: &Member,
        epoch: Epoch,
    ) -> impl Future<Output = Result<(), RoleError>> + Send;

    /// The primary's lease for `epoch` now runs until `until_ms` (this node's
    /// clock, milliseconds since the Unix epoch).
    fn lease_valid_until(&self, epoch: Epoch, until_ms: u64);

    /// Hold new writes (switchover or self-fencing) and return the last LSN
    /// written, durable when this returns.
    fn fence_writes(&self, epoch: Epoch) -> impl Future<Output = Result<Lsn, RoleError>> + Send;

    /// Take writes again after [`RoleControl::fence_writes`].
    fn unfence_writes(&self, epoch: Epoch) -> impl Future<Output = Result<(), RoleError>> + Send;

    /// The node's journal position.
    fn position(&self) -> impl Future<Output = Result<Position, RoleError>> + Send;
}

/// The `RoleControl` of a witness: it holds no data and refuses every role.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoData;

impl RoleControl for NoData {
    async fn become_primary(&self, _: Epoch, _: Lsn) -> Result<(), RoleError> {
        Err(RoleError::NoData)
    }

    async fn become_mirror(&self, _: &NodeId, _: &Member, _: Epoch) -> Result<(), RoleError> {
        Err(RoleError::NoData)
    }

    fn lease_valid_until(&self, _: Epoch, _: u64) {}

    async fn fence_writes(&self, _: Epoch) -> Result<Lsn, RoleError> {
        Err(RoleError::NoData)
    }

    async fn unfence_writes(&self, _: Epoch) -> Result<(), RoleError> {
        Err(RoleError::NoData)
    }

    async fn position(&self) -> Result<Position, RoleError> {
        Err(RoleError::NoData)
    }
}
