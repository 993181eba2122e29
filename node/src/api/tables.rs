//! Tables: `GET /v1/tables` lists them with their options and counts,
//! `PUT /v1/tables/{table}` with `{"journaled": bool}` creates a table or
//! changes its options (DESIGN §2: an unjournaled table survives only up to
//! the last flush and is not replicated).

use super::records::{path_error, query_error};
use super::{ApiError, Caller, St, json_ok, read_body};
use crate::model::{self, TableInfo, TableOptions};
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::{Deserialize, Serialize};

/// Largest table-options body.
pub const MAX_OPTIONS_BYTES: usize = 64 * 1024;

#[derive(Debug, Serialize)]
struct TableList {
    tables: Vec<TableInfo>,
}

#[derive(Debug, Serialize)]
struct OptionsAnswer {
    lsn: u64,
    table: String,
    journaled: bool,
}

/// `GET /v1/tables` takes no query parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoQuery {}

/// `GET /v1/tables`.
pub async fn list(
    st: St,
    query: Result<Query<NoQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    query.map_err(query_error)?;
    let tables = st.engine().reader_async().await?.tables()?;
    Ok(json_ok(&TableList { tables }))
}

/// `PUT /v1/tables/{table}` with `{"journaled": bool}`.
pub async fn set_options(
    st: St,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(table) = path.map_err(path_error)?;
    model::validate_table(&table)?;
    let bytes = read_body(&headers, body, MAX_OPTIONS_BYTES, st.inner.body_idle).await?;
    let opts: TableOptions = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("bad table options: {e}")))?;
    let journaled = opts.journaled;
    let session = st.session(&caller).await?;
    let ack = st.engine().set_table(session, &table, opts).await?;
    Ok(json_ok(&OptionsAnswer {
        lsn: ack.lsn,
        table,
        journaled,
    }))
}
