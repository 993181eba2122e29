//! Records: `PUT/GET/DELETE /v1/tables/{table}/records/{key}`, the paged
//! scan `GET /v1/tables/{table}/records`, and `POST /v1/transactions`.
//!
//! A record's version is the LSN that last wrote it; it is the `ETag` of a
//! read, and a write's precondition comes from `If-Match: "<version>"`,
//! `If-None-Match: *` (must not exist, version 0) or `?if_version=N`. A failed
//! precondition is 409 `version_conflict` and writes nothing.
//!
//! Values are stored byte-exact: a record's body is passed through as it was
//! sent, transaction values are taken as raw JSON text, and scans embed the
//! stored bytes without re-encoding.

use super::{ApiError, Caller, St, json_ok, read_body};
use crate::model::{self, MAX_SCAN_LIMIT, MAX_TXN_OPS, MAX_VALUE_BYTES, WriteAck, WriteOp};
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

/// Records a scan page holds when the client gives no `limit`.
pub const DEFAULT_SCAN_LIMIT: usize = 100;

/// `?if_version=N` on writes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    if_version: Option<u64>,
}

/// `?prefix=&start_after=&limit=` on scans.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanQuery {
    prefix: Option<String>,
    start_after: Option<String>,
    limit: Option<usize>,
}

/// What a single-record write answers.
#[derive(Debug, Serialize)]
struct WriteAnswer {
    lsn: u64,
    version: u64,
}

pub(crate) fn path_error(e: PathRejection) -> ApiError {
    ApiError::invalid(format!("bad path: {}", e.body_text()))
}

pub(crate) fn query_error(e: QueryRejection) -> ApiError {
    ApiError::invalid(format!("bad query: {}", e.body_text()))
}

/// The table and key of a path, checked against the model's rules.
pub(crate) fn table_key(
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, String), ApiError> {
    let Path((table, key)) = p.map_err(path_error)?;
    model::validate_table(&table)?;
    model::validate_key(&key)?;
    Ok((table, key))
}

/// The version in an `ETag`-style header value: `"5"` or `5`.
fn parse_etag(v: &HeaderValue, name: &str) -> Result<u64, ApiError> {
    let s = v
        .to_str()
        .map_err(|_| ApiError::invalid(format!("{name} is not ASCII")))?
        .trim();
    let inner = s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(s);
    inner.parse::<u64>().map_err(|_| {
        ApiError::invalid(format!(
            "{name} must be one record version like \"5\" (weak tags and lists are not supported), got {s:?}"
        ))
    })
}

/// The precondition of a write, from `If-Match`, `If-None-Match: *` and
/// `?if_version=`; they must agree when several are given.
pub(crate) fn precondition(
    headers: &HeaderMap,
    query: Option<u64>,
) -> Result<Option<u64>, ApiError> {
    let mut found: Vec<u64> = Vec::new();
    if let Some(v) = headers.get(header::IF_MATCH) {
        found.push(parse_etag(v, "If-Match")?);
    }
    if let Some(v) = headers.get(header::IF_NONE_MATCH) {
        if v.as_bytes().trim_ascii() != b"*" {
            return Err(ApiError::invalid(
                "on writes If-None-Match supports only \"*\" (the record must not exist)",
            ));
        }
        found.push(0);
    }
    found.extend(query);
    match found.as_slice() {
        [] => Ok(None),
        [first, rest @ ..] if rest.iter().all(|v| v == first) => Ok(Some(*first)),
        _ => Err(ApiError::invalid(
            "If-Match, If-None-Match and ?if_version= disagree",
        )),
    }
}

fn etag(version: u64) -> HeaderValue {
    // Digits and quotes are always a valid header value.
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

fn single_ack(ack: &WriteAck) -> Response {
    let version = ack.versions.first().copied().unwrap_or(ack.lsn);
    let mut resp = json_ok(&WriteAnswer {
        lsn: ack.lsn,
        version,
    });
    resp.headers_mut().insert(header::ETAG, etag(version));
    resp
}

/// `PUT /v1/tables/{table}/records/{key}`: body = the JSON value.
pub async fn put_record(
    st: St,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WriteQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (table, key) = table_key(path)?;
    let Query(q) = query.map_err(query_error)?;
    let if_version = precondition(&headers, q.if_version)?;
    let limit = st.inner.max_body_bytes.min(MAX_VALUE_BYTES);
    let value = read_body(&headers, body, limit, st.inner.body_idle).await?;
    model::validate_json(&value)?;
    let session = st.session(&caller).await?;
    let ack = st
        .engine()
        .write(
            session,
            vec![WriteOp::Put {
                table,
                key,
                value: value.to_vec(),
                if_version,
            }],
        )
        .await?;
    Ok(single_ack(&ack))
}

/// `GET /v1/tables/{table}/records/{key}`: the JSON value, `ETag` = version.
pub async fn get_record(
    st: St,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (table, key) = table_key(path)?;
    let Some(rec) = st.engine().get_async(&table, &key).await? else {
        return Err(ApiError::not_found(format!("no record {table}/{key}")));
    };
    let tag = etag(rec.version);
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes())
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response());
    }
    Ok((
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, tag),
        ],
        rec.value,
    )
        .into_response())
}

/// `DELETE /v1/tables/{table}/records/{key}`.
pub async fn delete_record(
    st: St,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WriteQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (table, key) = table_key(path)?;
    let Query(q) = query.map_err(query_error)?;
    let if_version = precondition(&headers, q.if_version)?;
    let session = st.session(&caller).await?;
    let ack = st
        .engine()
        .write(
            session,
            vec![WriteOp::Delete {
                table,
                key,
                if_version,
            }],
        )
        .await?;
    Ok(single_ack(&ack))
}

/// `GET /v1/tables/{table}/records?prefix=&start_after=&limit=`: one page
/// in key order, `{"records":[{"key","version","value"}],"next":…}`; pass
/// `next` as `start_after` for the following page (`null` at the end).
pub async fn scan(
    st: St,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ScanQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(table) = path.map_err(path_error)?;
    model::validate_table(&table)?;
    let Query(q) = query.map_err(query_error)?;
    let limit = q.limit.unwrap_or(DEFAULT_SCAN_LIMIT);
    if limit == 0 || limit > MAX_SCAN_LIMIT {
        return Err(ApiError::invalid(format!(
            "limit must be 1..={MAX_SCAN_LIMIT}, got {limit}"
        )));
    }
    let prefix = q.prefix.unwrap_or_default();
    let page =
        st.engine()
            .reader_async()
            .await?
            .scan(&table, &prefix, q.start_after.as_deref(), limit)?;
    // Stored values are JSON checked at write time: embed them as they are.
    let mut out = Vec::with_capacity(
        64 + page
            .records
            .iter()
            .map(|r| r.value.len() + r.key.len() + 48)
            .sum::<usize>(),
    );
    out.extend_from_slice(b"{\"records\":[");
    for (i, r) in page.records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"key\":");
        serde_json::to_writer(&mut out, &r.key).map_err(encode_error)?;
        out.extend_from_slice(format!(",\"version\":{},\"value\":", r.version).as_bytes());
        out.extend_from_slice(&r.value);
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"next\":");
    serde_json::to_writer(&mut out, &page.next).map_err(encode_error)?;
    out.push(b'}');
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        out,
    )
        .into_response())
}

fn encode_error(e: serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("cannot encode the answer: {e}"),
    )
}

/// `POST /v1/transactions` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnRequest {
    ops: Vec<TxnOp>,
}

/// One operation of a transaction. `value` is kept as the raw JSON text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnOp {
    op: String,
    table: String,
    key: String,
    #[serde(default, deserialize_with = "raw_some")]
    value: Option<Box<RawValue>>,
    #[serde(default)]
    if_version: Option<u64>,
}

/// `"value": null` is the JSON value null, not a missing value.
fn raw_some<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

#[derive(Debug, Serialize)]
struct TxnAnswer {
    lsn: u64,
    versions: Vec<u64>,
}

/// `POST /v1/transactions`: an atomic batch of puts and deletes. All
/// preconditions hold and everything is written, or nothing is.
pub async fn transaction(
    st: St,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = st.inner.max_body_bytes;
    let bytes = read_body(&headers, body, limit, st.inner.body_idle).await?;
    let req: TxnRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("bad transaction: {e}")))?;
    if req.ops.is_empty() {
        return Err(model::InvalidInput::EmptyTransaction.into());
    }
    if req.ops.len() > MAX_TXN_OPS {
        return Err(model::InvalidInput::TooManyOps(req.ops.len()).into());
    }
    let mut ops = Vec::with_capacity(req.ops.len());
    for (i, op) in req.ops.into_iter().enumerate() {
        let w = match (op.op.as_str(), op.value) {
            ("put", Some(v)) => WriteOp::Put {
                table: op.table,
                key: op.key,
                value: v.get().as_bytes().to_vec(),
                if_version: op.if_version,
            },
            ("put", None) => {
                return Err(ApiError::invalid(format!("ops[{i}]: put needs a value")));
            }
            ("delete", None) => WriteOp::Delete {
                table: op.table,
                key: op.key,
                if_version: op.if_version,
            },
            ("delete", Some(_)) => {
                return Err(ApiError::invalid(format!(
                    "ops[{i}]: delete takes no value"
                )));
            }
            (other, _) => {
                return Err(ApiError::invalid(format!(
                    "ops[{i}]: op must be \"put\" or \"delete\", got {other:?}"
                )));
            }
        };
        w.validate()
            .map_err(|e| ApiError::from(e).prefixed(&format!("ops[{i}]: ")))?;
        ops.push(w);
    }
    let session = st.session(&caller).await?;
    let ack = st.engine().write(session, ops).await?;
    Ok(json_ok(&TxnAnswer {
        lsn: ack.lsn,
        versions: ack.versions,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn h(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn preconditions_come_from_headers_or_query() {
        assert_eq!(precondition(&h(&[]), None).unwrap(), None);
        assert_eq!(
            precondition(&h(&[(header::IF_MATCH, "\"7\"")]), None).unwrap(),
            Some(7)
        );
        assert_eq!(
            precondition(&h(&[(header::IF_MATCH, "7")]), Some(7)).unwrap(),
            Some(7)
        );
        assert_eq!(
            precondition(&h(&[(header::IF_NONE_MATCH, "*")]), None).unwrap(),
            Some(0)
        );
        assert_eq!(precondition(&h(&[]), Some(3)).unwrap(), Some(3));
        for bad in ["W/\"7\"", "*", "\"7\", \"8\"", "x"] {
            assert_eq!(
                precondition(&h(&[(header::IF_MATCH, bad)]), None)
                    .unwrap_err()
                    .code,
                "invalid_request",
                "{bad}"
            );
        }
        assert!(precondition(&h(&[(header::IF_MATCH, "\"7\"")]), Some(8)).is_err());
        assert!(precondition(&h(&[(header::IF_NONE_MATCH, "\"7\"")]), None).is_err());
    }

    #[test]
    fn transaction_values_stay_byte_exact() {
        let req: TxnRequest = serde_json::from_str(
            r#"{"ops":[{"op":"put","table":"t","key":"k","value":{"b":1, "a":12345678901234567890123}},
                       {"op":"put","table":"t","key":"n","value":null}]}"#,
        )
        .unwrap();
        assert_eq!(
            req.ops[0].value.as_ref().unwrap().get(),
            r#"{"b":1, "a":12345678901234567890123}"#
        );
        assert_eq!(req.ops[1].value.as_ref().unwrap().get(), "null");
        assert!(serde_json::from_str::<TxnRequest>(r#"{"ops":[],"x":1}"#).is_err());
    }
}
