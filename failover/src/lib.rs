//! The mirrordb control plane.
//!
//! A small openraft group decides which node is primary, hands out epochs and
//! holds the primary's lease. The failover controller that runs on the Raft
//! leader is a plain state machine (events in, actions out, time passed in);
//! a thin async driver wires it to openraft and to the node through the
//! [`RoleControl`] trait defined here.
//!
//! Map of the crate:
//!
//! | module | owns |
//! | --- | --- |
//! | [`state`] | [`ClusterState`], [`ClusterCommand`], the pure `apply` and its invariants, [`CommitPolicy`] |
//! | [`controller`] | the I/O-free failover [`Controller`]: candidate choice, promotion, switchover |
//! | [`timing`] | [`Timing`] with the safety rules, and the openraft `Config` |
//! | [`raft`] | openraft types ([`raft::TypeConfig`], node ids), `raft.redb` storage, the network over [`raft::network::RaftTransport`] |
//! | [`role`] | [`RoleControl`]: what the node implements |
//! | [`driver`] | the async [`Driver`]: lease renewal, self-fencing, running the controller |
//! | [`membership`] | bootstrap and joining: Raft voters and recorded members together |
//!
//! How a node uses it:
//!
//! ```text
//!  let (log, sm) = raft::store::open(data_dir)?;          // raft.redb
//!  let states = sm.subscribe();                            // applied ClusterState
//!  let raft = Raft::new(raft_id(&me), timing.raft_config()?, NetworkFactory::new(quic), log, sm).await?;
//!  endpoint serves ALPN mirrordb-raft/1 with RpcHandler::new(raft.clone(), raft_id(&me), node)
//!  membership::bootstrap(..)  // `cluster init`, once
//!  let (driver, handle) = Driver::new(me, timing, raft, quic, node, states, system_clock());
//!  tokio::spawn(driver.run(shutdown));                     // handle.switchover(..), handle.status()
//! ```

pub mod controller;
pub mod driver;
pub mod membership;
pub mod raft;
pub mod role;
pub mod state;
pub mod timing;

pub use controller::{Action, Controller, ControllerConfig, Report, Status};
pub use driver::{Driver, DriverHandle};
pub use mirrordb_replication::{Epoch, Lsn, NodeId};
pub use role::{Position, RoleControl, RoleError};
pub use state::{
    ClusterCommand, ClusterState, CommitMode, CommitPolicy, Member, OnUnavailable, Rejected, Role,
};
pub use timing::{Timing, TimingError};
