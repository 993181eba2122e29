//! The node's side of replication (DESIGN §7): the `[cluster]` section,
//! `mirrordb cluster init`, the adapters that plug the engine into the
//! replication crate, and the runtime that serves or follows a primary.
//!
//! ```text
//!              primary                                  mirror
//!  Engine ──► EngineSource ──► serve_replication   run_mirror ──► EngineSink ──► Engine
//!    ▲            (source.rs)      │  QUIC, mTLS  ▲       (sink.rs: append, reseed swap)
//!    │                             └──────────────┘               │
//!  SharedEngine ◄── HTTP API (reads on both; writes on the primary, waiting on the
//!                   commit policy: policy.rs; mirror reads honour min_lsn: http.rs)
//! ```
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | `[cluster]` keys, [`CommitPolicy`], [`OnUnavailable`] |
//! | [`control`] | the failover control plane: Raft, the driver, the node's `RoleControl` |
//! | [`init`] | `mirrordb cluster init`: CA, node certificates, node configs |
//! | [`source`] | [`EngineSource`]: `JournalSource` over an engine |
//! | [`sink`] | [`EngineSink`]: `JournalSink` over a swappable engine; reseed by directory swap |
//! | [`policy`] | commit policies, the quorum wait, the durable degrade record |
//! | [`runtime`] | [`ClusterNode`]: endpoint, replication tasks, status, metrics |
//! | [`http`] | `/primary`, `/mirror`, `/v1/cluster`, commit-policy route, the write/read gate |

pub mod config;
pub mod control;
pub mod http;
pub mod init;
pub mod members;
pub mod policy;
pub mod runtime;
pub mod sink;
pub mod source;

pub use config::{ClusterSection, CommitPolicy, MemberConfig, OnUnavailable};
pub use runtime::ClusterNode;
pub use sink::EngineSink;
pub use source::EngineSource;

use crate::engine::Engine;
use std::sync::{Arc, RwLock};

/// The engine a node currently runs, replaceable as a whole (a mirror's
/// reseed opens a new engine on a new data directory). The HTTP API, the
/// replication sink and the status routes all read it through this handle,
/// so reads keep working across a reseed.
#[derive(Clone, Debug)]
pub struct SharedEngine(Arc<RwLock<Engine>>);

impl SharedEngine {
    /// A handle holding `engine`.
    pub fn new(engine: Engine) -> Self {
        SharedEngine(Arc::new(RwLock::new(engine)))
    }

    /// The current engine (a cheap clone of the handle).
    pub fn get(&self) -> Engine {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the engine; answers the previous one.
    pub fn replace(&self, engine: Engine) -> Engine {
        let mut g = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *g, engine)
    }
}

/// An HTTP client for the node's own calls to other nodes and for the CLI.
/// `reqwest::Client::new()` panics when its TLS backend cannot start (for
/// example no CA certificates in a `FROM scratch` image), even for
/// `http://` URLs; this says why instead.
pub(crate) fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .build()
        .map_err(|e| format!("cannot start an HTTP client (are CA certificates installed?): {e}"))
}
