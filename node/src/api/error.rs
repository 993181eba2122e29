//! The API's error answer: `{"error": {"code": "snake_case", "message": "…"}}`
//! with the HTTP status that belongs to the code (DESIGN §2). Engine errors
//! convert here, so every handler answers failures the same way.

use crate::engine::{ReadError, WriteError};
use crate::model::InvalidInput;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A failed request: status, stable code, human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// `Location` for redirects (`not_primary` with a known primary).
    pub location: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            location: None,
        }
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 413 `payload_too_large`.
    pub fn too_large(got: Option<u64>, limit: u64) -> Self {
        let message = match got {
            Some(g) => format!("the body is {g} bytes; the limit is {limit} bytes"),
            None => format!("the body is larger than the limit of {limit} bytes"),
        };
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// The same error with `prefix` before its message (e.g. `ops[3]: `).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.message.insert_str(0, prefix);
        self
    }

    /// The status that belongs to a stable code.
    pub fn status_of(code: &str) -> StatusCode {
        match code {
            "invalid_request" => StatusCode::BAD_REQUEST,
            "unauthorized" => StatusCode::UNAUTHORIZED,
            "forbidden" => StatusCode::FORBIDDEN,
            "not_found" => StatusCode::NOT_FOUND,
            "version_conflict" => StatusCode::CONFLICT,
            "payload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
            "request_timeout" => StatusCode::REQUEST_TIMEOUT,
            "journal_unavailable" | "write_blocked" | "not_primary" | "shutting_down" => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let code = e.code();
        let mut err = ApiError::new(ApiError::status_of(code), code, e.to_string());
        if let WriteError::NotPrimary {
            primary_http: Some(p),
        } = &e
        {
            err.status = StatusCode::TEMPORARY_REDIRECT;
            err.location = Some(p.clone());
            err.message = format!("this node is not the primary; the primary is {p}");
        }
        err
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        let code = e.code();
        ApiError::new(ApiError::status_of(code), code, e.to_string())
    }
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        WriteError::Invalid(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&Body {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        })
        .unwrap_or_else(|_| br#"{"error":{"code":"internal","message":""}}"#.to_vec());
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(loc) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            resp.headers_mut().insert(header::LOCATION, loc);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mirrordb\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_statuses() {
        let e: ApiError = WriteError::VersionConflict {
            table: "t".into(),
            key: "k".into(),
            expected: 1,
            actual: 2,
        }
        .into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::CONFLICT, "version_conflict")
        );
        let e: ApiError = WriteError::Invalid(InvalidInput::TooLarge { got: 2, limit: 1 }).into();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        let e: ApiError = WriteError::JournalUnavailable("x".into()).into();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e: ApiError = WriteError::NotPrimary {
            primary_http: Some("http://p:7070".into()),
        }
        .into();
        assert_eq!(e.status, StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(e.location.as_deref(), Some("http://p:7070"));
        let e: ApiError = WriteError::NotPrimary { primary_http: None }.into();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e: ApiError = ReadError::Storage("disk".into()).into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
