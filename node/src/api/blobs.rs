//! BLOBs: `PUT/GET/DELETE /v1/tables/{table}/blobs/{key}`, binary values up
//! to 1 GiB, streamed both ways.
//!
//! ```text
//! PUT  body chunks ──► Engine::put_blob (staged on disk, journaled in 1 MiB chunks)
//! GET  Engine::blob ──► chunks read from one snapshot ──► response body
//! ```
//!
//! Neither direction holds a whole BLOB in memory. A `Content-Length` past
//! the limit is refused before any byte is read.

use super::MAX_CONCURRENT_BLOB_UPLOADS;
use super::records::{precondition, table_key};
use super::{ApiError, Caller, IdleBody, St, body_timeout, content_length, json_ok};
use crate::engine::WriteError;
use crate::model::MAX_BLOB_BYTES;
use axum::body::Body;
use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Serialize)]
struct BlobAnswer {
    lsn: u64,
    version: u64,
    size: Option<u64>,
}

/// BLOB writes take no preconditions yet: refuse them instead of ignoring.
fn no_precondition(headers: &HeaderMap) -> Result<(), ApiError> {
    match precondition(headers, None)? {
        None => Ok(()),
        Some(_) => Err(ApiError::invalid(
            "BLOB writes do not support If-Match / If-None-Match",
        )),
    }
}

/// `PUT /v1/tables/{table}/blobs/{key}`: the body is the BLOB's bytes.
pub async fn put_blob(
    st: St,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (table, key) = table_key(path)?;
    no_precondition(&headers)?;
    let declared = content_length(&headers)?;
    if let Some(len) = declared.filter(|l| *l > MAX_BLOB_BYTES) {
        return Err(ApiError::too_large(Some(len), MAX_BLOB_BYTES));
    }
    let _permit = tokio::time::timeout(
        st.inner.write_timeout,
        st.inner.blob_uploads.clone().acquire_owned(),
    )
    .await
    .map_err(|_| {
        ApiError::from(WriteError::WriteBlocked(format!(
            "{MAX_CONCURRENT_BLOB_UPLOADS} BLOB uploads are in progress; none finished within {}",
            crate::config::format_duration(st.inner.write_timeout)
        )))
    })?
    .map_err(|_| ApiError::from(WriteError::Closed))?;
    let session = st.session(&caller).await?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let timed_out = Arc::new(AtomicBool::new(false));
    let stream = body.into_data_stream().inspect(move |chunk| {
        if let Ok(c) = chunk {
            counter.fetch_add(c.len() as u64, Ordering::Relaxed);
        }
    });
    let stream = IdleBody::new(stream, st.inner.body_idle, timed_out.clone());
    let ack = match st.engine().put_blob(session, &table, &key, stream).await {
        Ok(a) => a,
        Err(_) if timed_out.load(Ordering::Relaxed) => {
            return Err(body_timeout(st.inner.body_idle));
        }
        Err(e) => return Err(e.into()),
    };
    let version = ack.versions.first().copied().unwrap_or(ack.lsn);
    let mut resp = json_ok(&BlobAnswer {
        lsn: ack.lsn,
        version,
        size: Some(received.load(Ordering::Relaxed)),
    });
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

/// `GET /v1/tables/{table}/blobs/{key}`: the bytes, streamed, with
/// `Content-Length` and `ETag` = version.
pub async fn get_blob(
    st: St,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (table, key) = table_key(path)?;
    let Some(blob) = st.engine().reader_async().await?.blob(&table, &key)? else {
        return Err(ApiError::not_found(format!("no BLOB {table}/{key}")));
    };
    let size = blob.size;
    let tag = HeaderValue::from_str(&format!("\"{}\"", blob.version))
        .unwrap_or(HeaderValue::from_static("\"0\""));
    Ok((
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(size)),
            (header::ETAG, tag),
        ],
        Body::from_stream(blob),
    )
        .into_response())
}

/// `DELETE /v1/tables/{table}/blobs/{key}`.
pub async fn delete_blob(
    st: St,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (table, key) = table_key(path)?;
    no_precondition(&headers)?;
    let session = st.session(&caller).await?;
    let ack = st.engine().delete_blob(session, &table, &key).await?;
    Ok(json_ok(&BlobAnswer {
        lsn: ack.lsn,
        version: ack.versions.first().copied().unwrap_or(ack.lsn),
        size: None,
    }))
}
