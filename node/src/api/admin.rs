//! Operator paths of one node: activity analysis (`GET /v1/journal`, over
//! the backup destination's journal archives and the live journal), journal
//! rotation (`POST /v1/journal/rotate`, 4D's "New log file") and
//! flush-and-lock (`POST/DELETE/GET /v1/lock`, for external snapshots).
//! Writing paths here need the `admin` role (see `auth::required_role`).
//!
//! A lock belongs to an owner: the name given in the body or query, else the
//! caller's token name. While it is held every new write waits, then answers
//! `write_blocked` and is not applied; the lock lapses by itself after its
//! lease unless renewed by another `POST`.

use super::records::query_error;
use super::{ApiError, Caller, St, json_ok, read_body};
use crate::activity::{ActivityError, JournalQuery};
use crate::config::parse_duration;
use axum::body::Body;
use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Lease of a lock when the request names none.
pub const DEFAULT_LOCK_LEASE: Duration = Duration::from_secs(60);
/// Longest lock lease.
pub const MAX_LOCK_LEASE: Duration = Duration::from_secs(3600);
/// Largest lock request body.
const MAX_LOCK_BODY_BYTES: usize = 4096;

/// `GET /v1/journal?from_lsn=&to_lsn=&since=&until=&table=&key=&session=&limit=`:
/// the journaled operations (never their values) with who did them.
pub async fn journal(
    st: St,
    query: Result<Query<JournalQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let (mut filter, limit) = q.filter().map_err(activity_error)?;
    // Only what is durable: never show an entry that may yet be cut.
    let durable = st.engine().status().durable_lsn;
    filter.to_lsn = Some(filter.to_lsn.map_or(durable, |t| t.min(durable)));
    let dir = st.engine().journal_dir();
    // The journal archives of the backup destination come first: entries
    // that backups moved out of the live journal stay visible.
    let backups = st.backups().settings().destination.clone();
    let scratch = st.engine().config().data_dir.join("tmp");
    let outcome = tokio::task::spawn_blocking(move || {
        crate::backup::activity::query(Some(&backups), &dir, &filter, limit, &scratch)
    })
    .await
    .map_err(|e| storage(format!("activity scan stopped: {e}")))?
    .map_err(|e| match e {
        crate::backup::activity::ViewError::Activity(a) => activity_error(a),
        other => storage(other.to_string()),
    })?;
    Ok(json_ok(&outcome))
}

fn activity_error(e: ActivityError) -> ApiError {
    match e {
        ActivityError::InvalidFilter(m) => ApiError::invalid(m),
        other => storage(other.to_string()),
    }
}

fn storage(message: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", message)
}

#[derive(Debug, Serialize)]
struct Rotated {
    /// The segment closed, or null when the open one was still empty.
    closed: Option<String>,
    last_lsn: Option<u64>,
}

/// `POST /v1/journal/rotate`: closes the open journal segment and starts a
/// new one.
pub async fn rotate(st: St) -> Result<Response, ApiError> {
    let r = st.engine().rotate_journal().await?;
    Ok(json_ok(&Rotated {
        closed: r.as_ref().map(|s| s.closed.display().to_string()),
        last_lsn: r.map(|s| s.last_lsn),
    }))
}

/// `POST /v1/lock` body (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockRequest {
    owner: Option<String>,
    /// Like `"30s"`; default 60 s, at most 1 h.
    lease: Option<String>,
}

/// `DELETE /v1/lock?owner=`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlockQuery {
    owner: Option<String>,
}

/// `POST /v1/lock`: flush the data file and hold new writes.
pub async fn lock(
    st: St,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(&headers, body, MAX_LOCK_BODY_BYTES, st.inner.body_idle).await?;
    let req: LockRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        LockRequest::default()
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("bad lock request: {e}")))?
    };
    let lease = match req.lease.as_deref() {
        None => DEFAULT_LOCK_LEASE,
        Some(s) => parse_duration(s).map_err(|e| ApiError::invalid(e.to_string()))?,
    };
    if lease.is_zero() || lease > MAX_LOCK_LEASE {
        return Err(ApiError::invalid("lease must be between 1ms and 1h"));
    }
    let owner = req
        .owner
        .unwrap_or_else(|| caller.identity.token_name.clone());
    let status = st.engine().lock(&owner, lease).await?;
    Ok(json_ok(&status))
}

/// `DELETE /v1/lock?owner=`: release one level of the owner's lock.
pub async fn unlock(
    st: St,
    caller: Caller,
    query: Result<Query<UnlockQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let owner = q.owner.unwrap_or(caller.identity.token_name);
    let status = st.engine().unlock(&owner).await?;
    Ok(json_ok(&status))
}

/// `GET /v1/lock`: is the node locked, by whom, until when.
pub async fn lock_status(st: St) -> Response {
    json_ok(&st.engine().lock_status())
}
