//! Node status: `GET /health` (liveness, public), `GET /v1/status` (engine
//! positions and the recovery report) and `GET /metrics` (Prometheus text).
//!
//! `/health` answers 200 whenever the process serves HTTP, with the journal's
//! availability and the node's role in the body: a node whose journal failed
//! still serves reads and must not be restarted in a loop by an orchestrator.
//! `/primary` answers 200 only on a node that takes writes (primary role,
//! journal available) and 503 otherwise, for load balancers that route
//! writes. `/mirror?max_lag_ms=` needs replication lag and comes with it.

use super::{ApiState, St, json_ok};
use crate::engine::replica::Role;
use crate::engine::{EngineStatus, RecoveryReport};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Serialize)]
struct Health<'a> {
    status: &'static str,
    node: &'a str,
    version: &'static str,
    #[serde(flatten)]
    role: Role,
    journal_available: bool,
    journal_error: Option<String>,
    last_lsn: u64,
    /// A cluster primary whose commit policy fell back to async
    /// (`on_unavailable = "degrade"`): acknowledged writes may be on no mirror.
    commit_degraded: bool,
}

/// `GET /health`.
pub async fn health(State(st): State<ApiState>) -> Response {
    let s = st.engine().status();
    json_ok(&Health {
        status: "ok",
        node: &st.inner.node_name,
        version: env!("CARGO_PKG_VERSION"),
        role: st.engine().role(),
        journal_available: s.journal_available,
        journal_error: s.journal_error,
        last_lsn: s.last_lsn,
        commit_degraded: st.commit_degraded(),
    })
}

/// `GET /primary` without `[cluster]`: 200 only on a node that takes writes.
pub async fn primary(State(st): State<ApiState>) -> Response {
    let s = st.engine().status();
    let role = st.engine().role();
    let writable = role == Role::Primary && s.journal_available;
    #[derive(Serialize)]
    struct Primary {
        primary: bool,
        #[serde(flatten)]
        role: Role,
        journal_available: bool,
    }
    let mut resp = json_ok(&Primary {
        primary: writable,
        role,
        journal_available: s.journal_available,
    });
    if !writable {
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    resp
}

#[derive(Serialize)]
struct Status<'a> {
    node: &'a str,
    version: &'static str,
    #[serde(flatten)]
    role: Role,
    engine: EngineStatus,
    recovery: &'a RecoveryReport,
}

/// `GET /v1/status`.
pub async fn status(st: St) -> Response {
    let State(st) = st;
    json_ok(&Status {
        node: &st.inner.node_name,
        version: env!("CARGO_PKG_VERSION"),
        role: st.engine().role(),
        engine: st.engine().status(),
        recovery: st.engine().recovery(),
    })
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(st: St) -> Response {
    let State(st) = st;
    if let Some(t) = st.replication_tracker() {
        crate::cluster::runtime::publish_lag_gauges(&t, std::time::Instant::now());
    }
    // Read at each scrape: a recorder installed after the engine opened
    // would miss a value set at open, and a file's length is one stat.
    metrics::gauge!("mirrordb_data_file_bytes").set(st.engine().data_file_bytes() as f64);
    st.backups().publish_metrics();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.inner.metrics.render(),
    )
        .into_response()
}
