//! Bearer-token authorisation (DESIGN §2, "Security").
//!
//! Each request needs a role decided by its method and path
//! ([`required_role`]); the `Authorization: Bearer <token>` header must name
//! a configured token whose role is at least that. Missing or unknown token:
//! 401 `unauthorized`; a token with too small a role: 403 `forbidden`. With no
//! tokens configured every request is allowed, and the configuration refuses
//! to listen beyond loopback (see `config::Config::validate`).
//!
//! Tokens are compared in constant time with respect to their content.

use super::{ApiError, ApiState};
use crate::config::{Role, TokenConfig};
use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Paths anyone may call, even with tokens configured (liveness probes of
/// load balancers and orchestrators cannot send tokens).
pub const PUBLIC_PATHS: &[&str] = &["/health", "/primary", "/mirror"];

/// The outcome of authorisation, put in the request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorized {
    /// The token's name, or `anonymous` without tokens.
    pub token_name: String,
    pub role: Role,
}

/// The role a request needs: reads need `read`; writes of records, BLOBs,
/// tables and transactions need `write`; everything else (backups, journal,
/// rollback, lock, cluster, …) needs `admin`.
pub fn required_role(method: &Method, path: &str) -> Role {
    if method == Method::GET || method == Method::HEAD {
        return Role::Read;
    }
    if path.starts_with("/v1/tables/") || path == "/v1/transactions" {
        return Role::Write;
    }
    Role::Admin
}

/// Compares two byte strings without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Finds the token a bearer secret belongs to, looking at every token.
pub fn find_token<'a>(tokens: &'a [TokenConfig], secret: &str) -> Option<&'a TokenConfig> {
    let mut found = None;
    for t in tokens {
        if constant_time_eq(t.token.as_bytes(), secret.as_bytes()) && found.is_none() {
            found = Some(t);
        }
    }
    found
}

/// Decides whether a request with `authorization` (the header's value) may
/// call `method path`.
pub fn check(
    tokens: &[TokenConfig],
    method: &Method,
    path: &str,
    authorization: Option<&[u8]>,
) -> Result<Authorized, ApiError> {
    if tokens.is_empty() {
        return Ok(Authorized {
            token_name: super::ANONYMOUS.to_owned(),
            role: Role::Admin,
        });
    }
    let Some(raw) = authorization else {
        return Err(ApiError::unauthorized(
            "this node requires a token: send Authorization: Bearer <token>",
        ));
    };
    let secret = std::str::from_utf8(raw)
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be \"Bearer <token>\"")
        })?;
    let Some(token) = find_token(tokens, secret) else {
        return Err(ApiError::unauthorized("unknown token"));
    };
    let need = required_role(method, path);
    if token.role < need {
        return Err(ApiError::forbidden(format!(
            "token {:?} has role {}; {method} {path} needs role {need}",
            token.name, token.role
        )));
    }
    Ok(Authorized {
        token_name: token.name.clone(),
        role: token.role,
    })
}

/// Authorises `req`, putting the [`Authorized`] outcome in its extensions,
/// or answers the 401/403 to send instead.
pub fn authorize_request(st: &ApiState, req: &mut Request) -> Result<(), ApiError> {
    let path = req.uri().path();
    if PUBLIC_PATHS.contains(&path) {
        return Ok(());
    }
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match check(&st.inner.tokens, req.method(), path, auth) {
        Ok(a) => {
            req.extensions_mut().insert(a);
            Ok(())
        }
        Err(e) => {
            tracing::debug!(path, code = e.code, "request refused");
            Err(e)
        }
    }
}

/// Middleware: authorises the request or answers 401/403.
pub async fn authorize(State(st): State<ApiState>, mut req: Request, next: Next) -> Response {
    match authorize_request(&st, &mut req) {
        Ok(()) => next.run(req).await,
        Err(refused) => refused.into_response(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tokens() -> Vec<TokenConfig> {
        vec![
            TokenConfig {
                name: "reader".into(),
                token: "r-0123456789abcdef".into(),
                role: Role::Read,
            },
            TokenConfig {
                name: "ops".into(),
                token: "a-0123456789abcdef".into(),
                role: Role::Admin,
            },
        ]
    }

    #[test]
    fn roles_follow_method_and_path() {
        assert_eq!(required_role(&Method::GET, "/v1/backups"), Role::Read);
        assert_eq!(
            required_role(&Method::PUT, "/v1/tables/t/records/k"),
            Role::Write
        );
        assert_eq!(
            required_role(&Method::POST, "/v1/transactions"),
            Role::Write
        );
        assert_eq!(required_role(&Method::POST, "/v1/backups"), Role::Admin);
        assert_eq!(required_role(&Method::POST, "/v1/rollback"), Role::Admin);
    }

    #[test]
    fn tokens_are_checked() {
        let t = tokens();
        let get = Method::GET;
        let put = Method::PUT;
        let p = "/v1/tables/t/records/k";
        assert_eq!(check(&t, &get, p, None).unwrap_err().code, "unauthorized");
        assert_eq!(
            check(&t, &get, p, Some(b"Bearer nope")).unwrap_err().code,
            "unauthorized"
        );
        assert_eq!(
            check(&t, &get, p, Some(b"Basic r-0123456789abcdef"))
                .unwrap_err()
                .code,
            "unauthorized"
        );
        assert_eq!(
            check(&t, &get, p, Some(b"\xff\xfe")).unwrap_err().code,
            "unauthorized"
        );
        let ok = check(&t, &get, p, Some(b"Bearer r-0123456789abcdef")).unwrap();
        assert_eq!(ok.token_name, "reader");
        let e = check(&t, &put, p, Some(b"Bearer r-0123456789abcdef")).unwrap_err();
        assert_eq!(e.code, "forbidden");
        assert!(e.message.contains("needs role write"), "{}", e.message);
        check(&t, &put, p, Some(b"bearer  a-0123456789abcdef ")).unwrap();
        assert_eq!(check(&[], &put, p, None).unwrap().token_name, "anonymous");
    }
}
