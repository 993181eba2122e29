//! Backup paths (DESIGN §2, §5–§6): start a full backup, list sets and
//! history, watch or stop the running backup, create named restore points,
//! and roll back online. Writing paths need the `admin` role.
//!
//! ```text
//! POST   /v1/backups[?wait=true]   202 {"number"} | 200 outcome (wait) | 409 backup_in_progress
//! GET    /v1/backups               destination, pause flag, running backup, sets, archives, history
//! GET    /v1/backups/current       progress (bytes, items, ETA) | 404; ?wait_ms=N answers when it ends
//! DELETE /v1/backups/current       stop it: the run ends with backup_interrupted, partial files removed
//! POST   /v1/restore-points        {"name"} → {"lsn"}
//! POST   /v1/rollback              {"to_lsn"} → one compensating transaction
//! ```

use super::{ApiError, Caller, St, json_ok, read_body};
use crate::backup::format::Checksum;
use crate::backup::log::LineKind;
use crate::backup::restore::BackupHistory;
use crate::backup::{BackupError, Trigger};
use axum::body::Body;
use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Largest body of these paths.
const MAX_BODY_BYTES: usize = 4096;

fn backup_error(e: BackupError) -> ApiError {
    if let BackupError::Engine(w) = e {
        return w.into();
    }
    let status = match &e {
        BackupError::Busy(_) | BackupError::Interrupted => StatusCode::CONFLICT,
        BackupError::DestinationFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        BackupError::DestinationMissing(_)
        | BackupError::DestinationNotADirectory(_)
        | BackupError::DestinationReadOnly { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.code(), e.to_string())
}

/// `POST /v1/backups` query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartQuery {
    #[serde(default)]
    wait: bool,
}

#[derive(Serialize)]
struct Started {
    number: u32,
    status: &'static str,
}

/// `POST /v1/backups[?wait=true]`: starts a full backup (manual: it also
/// resumes automatic backups paused after failures, once it succeeds).
pub async fn start(
    st: St,
    caller: Caller,
    query: Result<Query<StartQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(super::records::query_error)?;
    let svc = st.backups().clone();
    let trigger = Trigger::Manual {
        by: format!("api:{}", caller.identity.token_name),
    };
    if q.wait {
        let out = svc.run(trigger).await.map_err(backup_error)?;
        return Ok(json_ok(&out));
    }
    let number = svc.start(trigger).await.map_err(backup_error)?;
    let mut r = json_ok(&Started {
        number,
        status: "started",
    });
    *r.status_mut() = StatusCode::ACCEPTED;
    r.headers_mut().insert(
        header::LOCATION,
        axum::http::HeaderValue::from_static("/v1/backups/current"),
    );
    Ok(r)
}

#[derive(Serialize)]
struct SetSummary {
    number: u32,
    status: crate::backup::BackupStatus,
    lsn: u64,
    epoch: u64,
    time: String,
    records: u64,
    bytes: u64,
    /// `"blake3"` (or `"sha256"` for a set written before BLAKE3).
    #[serde(flatten)]
    checksum: Checksum,
    dir: String,
    error: Option<String>,
}

#[derive(Serialize)]
struct ArchiveSummary {
    number: u32,
    path: String,
    first_lsn: Option<u64>,
    last_lsn: Option<u64>,
    bytes: Option<u64>,
    #[serde(flatten)]
    checksum: Option<Checksum>,
}

#[derive(Serialize)]
struct Listing {
    destination: String,
    automatic_paused: bool,
    current: Option<crate::backup::Progress>,
    sets: Vec<SetSummary>,
    archives: Vec<ArchiveSummary>,
    incomplete: Vec<String>,
    history: Vec<crate::backup::manifest::HistoryEntry>,
}

/// `GET /v1/backups`: what the destination holds and what happened.
pub async fn list(st: St) -> Result<Response, ApiError> {
    let svc = st.backups().clone();
    let (history, catalog) = tokio::task::spawn_blocking({
        let svc = svc.clone();
        move || svc.list()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(backup_error)?;
    Ok(json_ok(&Listing {
        destination: svc.settings().destination.display().to_string(),
        automatic_paused: svc.automatic_paused(),
        current: svc.current(),
        sets: catalog
            .sets
            .iter()
            .map(|s| SetSummary {
                number: s.manifest.number,
                status: s.manifest.status,
                lsn: s.manifest.lsn,
                epoch: s.manifest.epoch,
                time: s.manifest.time.clone(),
                records: s.manifest.records,
                bytes: s.manifest.snapshot.bytes,
                checksum: s.manifest.snapshot.checksum.clone(),
                dir: s.dir.display().to_string(),
                error: s.manifest.error.clone(),
            })
            .collect(),
        archives: catalog
            .archives
            .iter()
            .map(|a| ArchiveSummary {
                number: a.number,
                path: a.path.display().to_string(),
                first_lsn: a.recorded.as_ref().map(|r| r.summary.first_lsn),
                last_lsn: a.recorded.as_ref().map(|r| r.summary.last_lsn),
                bytes: a.recorded.as_ref().map(|r| r.file.bytes),
                checksum: a.recorded.as_ref().map(|r| r.file.checksum.clone()),
            })
            .collect(),
        incomplete: catalog
            .incomplete
            .iter()
            .map(|(p, why)| format!("{}: {why}", p.display()))
            .collect(),
        history: history.entries,
    }))
}

fn no_backup() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_backup_running",
        "no backup is running",
    )
}

/// Longest `GET /v1/backups/current?wait_ms=` may hold a request.
pub const MAX_WAIT_MS: u64 = 30_000;

/// `GET /v1/backups/current` query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurrentQuery {
    /// Wait up to this long for the running backup to end before answering.
    #[serde(default)]
    wait_ms: u64,
}

/// `GET /v1/backups/current[?wait_ms=N]`: the running backup's progress;
/// with `wait_ms`, answered as soon as the backup ends (404) or after at
/// most N ms (at most 30 s) with its progress then.
pub async fn current(
    st: St,
    query: Result<Query<CurrentQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(super::records::query_error)?;
    let svc = st.backups();
    let progress = if q.wait_ms == 0 {
        svc.current()
    } else {
        svc.wait_current(Duration::from_millis(q.wait_ms.min(MAX_WAIT_MS)))
            .await
    };
    progress.map(|p| json_ok(&p)).ok_or_else(no_backup)
}

#[derive(Serialize)]
struct Stopping {
    number: u32,
    stopping: bool,
}

/// `DELETE /v1/backups/current`: stops the running backup.
pub async fn stop(st: St) -> Result<Response, ApiError> {
    let number = st.backups().stop().ok_or_else(no_backup)?;
    let mut r = json_ok(&Stopping {
        number,
        stopping: true,
    });
    *r.status_mut() = StatusCode::ACCEPTED;
    Ok(r)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestorePointRequest {
    name: String,
}

#[derive(Serialize)]
struct RestorePointAck {
    name: String,
    lsn: u64,
}

fn parse<T: for<'a> Deserialize<'a>>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("bad {what}: {e}")))
}

/// `POST /v1/restore-points {"name"}`: journals a named restore point, a
/// target for `mirrordb restore --until-name`.
pub async fn restore_point(
    st: St,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(&headers, body, MAX_BODY_BYTES, st.inner.body_idle).await?;
    let req: RestorePointRequest = parse(&bytes, "restore point request")?;
    let session = st.session(&caller).await?;
    let ack = st.engine().restore_point(session, &req.name).await?;
    Ok(json_ok(&RestorePointAck {
        name: req.name,
        lsn: ack.lsn,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    to_lsn: u64,
}

/// `POST /v1/rollback {"to_lsn"}`: puts every record touched after `to_lsn`
/// back to its value then, as one journaled compensating transaction. The
/// history comes from the journal archives and the live journal.
pub async fn rollback(
    st: St,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(&headers, body, MAX_BODY_BYTES, st.inner.body_idle).await?;
    let req: RollbackRequest = parse(&bytes, "rollback request")?;
    let session = st.session(&caller).await?;
    let engine = st.engine();
    let history = Arc::new(BackupHistory {
        backup_dir: st.backups().settings().destination.clone(),
        journal_dir: engine.journal_dir(),
    });
    let who = caller.identity.token_name.clone();
    let log = st.backups().log();
    match engine.rollback(session, req.to_lsn, history).await {
        Ok(report) => {
            log.line(LineKind::Info, &rollback_line(&report, &who));
            Ok(json_ok(&report).into_response())
        }
        Err(e) => {
            log.line(
                LineKind::Error,
                &format!("rollback to LSN {} ({who}) failed: {e}", req.to_lsn),
            );
            Err(e.into())
        }
    }
}

/// The Backup Journal's line for a rollback that ran.
fn rollback_line(r: &crate::engine::RollbackReport, who: &str) -> String {
    let mut line = format!(
        "rollback to LSN {} ({who}): {} records restored, {} deleted, {} unchanged",
        r.to_lsn, r.keys_restored, r.keys_deleted, r.keys_unchanged
    );
    if r.lsn > 0 {
        line.push_str(&format!("; compensating transaction at LSN {}", r.lsn));
    } else {
        line.push_str("; nothing to change");
    }
    if !r.blobs_not_rolled_back.is_empty() {
        line.push_str(&format!(
            "; BLOBs written since, not rolled back: {}",
            r.blobs_not_rolled_back.join(", ")
        ));
    }
    line
}
