//! Node status: `GET /health` (liveness, public), `GET /v1/status` (engine
//! positions and the recovery report) and `GET /metrics` (Prometheus text).
//!
//! `/health` answers 200 whenever the process serves HTTP, with the journal's
//! availability in the body: a node whose journal failed still serves reads
//! and must not be restarted in a loop by an orchestrator. `/primary` and
//! `/mirror` (role-aware probes) come with replication.

use super::{ApiState, St, json_ok};
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
    journal_available: bool,
    journal_error: Option<String>,
    last_lsn: u64,
}

/// `GET /health`.
pub async fn health(State(st): State<ApiState>) -> Response {
    let s = st.engine().status();
    json_ok(&Health {
        status: "ok",
        node: &st.inner.node_name,
        version: env!("CARGO_PKG_VERSION"),
        journal_available: s.journal_available,
        journal_error: s.journal_error,
        last_lsn: s.last_lsn,
    })
}

#[derive(Serialize)]
struct Status<'a> {
    node: &'a str,
    version: &'static str,
    engine: EngineStatus,
    recovery: &'a RecoveryReport,
}

/// `GET /v1/status`.
pub async fn status(st: St) -> Response {
    let State(st) = st;
    json_ok(&Status {
        node: &st.inner.node_name,
        version: env!("CARGO_PKG_VERSION"),
        engine: st.engine().status(),
        recovery: st.engine().recovery(),
    })
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(st: St) -> Response {
    let State(st) = st;
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.inner.metrics.render(),
    )
        .into_response()
}
