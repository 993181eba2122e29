//! The HTTP/JSON API of one node (DESIGN §2), on axum.
//!
//! ```text
//! request ─► TraceLayer ─► front: metrics, authorise (bearer token, role), redirect
//!        ─► routing ─► handler: parse + check limits ─► Engine ─► JSON answer / ApiError
//! ```
//!
//! Handlers never trust request bytes: paths, headers, queries and bodies are
//! checked and a bad one is a 4xx JSON error, never a panic. JSON bodies are
//! read with a byte limit and answered 413 past it; BLOB bodies are streamed
//! to the engine (which stages them on disk) and streamed back on reads.
//!
//! Sessions: the identity of a request is (token name or `anonymous`, the
//! peer's IP address, the `X-Mirrordb-Session` header or `default`). The
//! engine keeps the identity → session map, journals `SessionOpen` only for a
//! new identity and closes idle sessions, so the API asks it on every write
//! and never holds a session id the engine may have closed.

pub mod admin;
pub mod auth;
pub mod backups;
pub mod blobs;
pub mod error;
pub mod records;
pub mod status;
pub mod tables;

pub use error::ApiError;

use crate::config::{Config, TokenConfig};
use crate::engine::Engine;
use crate::model::{ClientIdentity, SessionId};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower_http::trace::TraceLayer;

/// Header carrying the client-chosen session name.
pub const SESSION_HEADER: &str = "x-mirrordb-session";
/// Longest accepted session name.
pub const MAX_SESSION_NAME_BYTES: usize = 128;
/// Session name used when the client sends none.
pub const DEFAULT_SESSION_NAME: &str = "default";
/// BLOB uploads in progress at once (each stages up to 1 GiB on disk and
/// holds a file); more wait up to `api.write_timeout`, then `write_blocked`.
pub const MAX_CONCURRENT_BLOB_UPLOADS: usize = 32;
/// Token name of requests when no tokens are configured.
pub const ANONYMOUS: &str = "anonymous";

/// What every handler shares: the engine and the API settings.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<StateInner>,
}

struct StateInner {
    engine: crate::cluster::SharedEngine,
    node_name: String,
    tokens: Vec<TokenConfig>,
    max_body_bytes: usize,
    body_idle: Duration,
    write_timeout: Duration,
    blob_uploads: Arc<tokio::sync::Semaphore>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    backups: crate::backup::BackupService,
    /// The cluster side (set by `serve` once it is up): its commit gate
    /// gives `/health`'s `commit_degraded`, its tracker the mirrors' lag at
    /// each `/metrics` scrape, whenever this node is primary.
    cluster: std::sync::OnceLock<crate::cluster::ClusterNode>,
}

impl ApiState {
    /// Attaches the cluster side. Set once; later calls are ignored.
    pub fn set_cluster(&self, node: crate::cluster::ClusterNode) {
        let _ = self.inner.cluster.set(node);
    }

    /// Whether the commit policy has degraded to async (cluster primaries).
    pub fn commit_degraded(&self) -> bool {
        self.inner
            .cluster
            .get()
            .and_then(|c| c.gate())
            .is_some_and(|g| g.degraded())
    }

    /// The primary's per-mirror acknowledgements, while this node is a
    /// cluster primary.
    pub fn replication_tracker(&self) -> Option<Arc<mirrordb_replication::AckTracker>> {
        self.inner.cluster.get().and_then(|c| c.tracker())
    }

    /// State for a node running `engine` with the `[node]` and `[api]`
    /// settings of `cfg`.
    pub fn new(engine: Engine, cfg: &Config) -> ApiState {
        ApiState::with_shared(crate::cluster::SharedEngine::new(engine), cfg)
    }

    /// State over a replaceable engine handle (a mirror's reseed swaps the
    /// engine; requests then use the new one).
    pub fn with_shared(engine: crate::cluster::SharedEngine, cfg: &Config) -> ApiState {
        // The backup pipeline follows the current engine; its scheduler
        // (if `backup.schedule` is set) runs while this state lives.
        let source = engine.clone();
        let backups = crate::backup::BackupService::with_engine_source(
            Arc::new(move || source.get()),
            cfg.backup.clone(),
        );
        backups.spawn_scheduler();
        ApiState {
            inner: Arc::new(StateInner {
                engine,
                node_name: cfg.node.name.clone(),
                tokens: cfg.api.tokens.clone(),
                max_body_bytes: usize::try_from(cfg.api.max_body_bytes.0).unwrap_or(usize::MAX),
                body_idle: cfg.api.body_idle_timeout.0,
                write_timeout: cfg.api.write_timeout.0,
                blob_uploads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_BLOB_UPLOADS)),
                metrics: crate::metrics::handle(),
                backups,
                cluster: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The engine (the current one: a reseed may replace it).
    pub fn engine(&self) -> Engine {
        self.inner.engine.get()
    }

    /// The node's backup pipeline.
    pub fn backups(&self) -> &crate::backup::BackupService {
        &self.inner.backups
    }

    /// Opens (or reuses) the engine session of a request's identity.
    pub async fn session(&self, caller: &Caller) -> Result<SessionId, ApiError> {
        Ok(self.engine().session(caller.identity.clone()).await?)
    }
}

/// The whole API as a router; serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so sessions know
/// the peer address.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(status::health))
        .route("/metrics", get(status::metrics))
        .route("/v1/status", get(status::status))
        .route("/v1/tables", get(tables::list))
        .route("/v1/tables/{table}", put(tables::set_options))
        .route("/v1/tables/{table}/records", get(records::scan))
        .route(
            "/v1/tables/{table}/records/{*key}",
            get(records::get_record)
                .put(records::put_record)
                .delete(records::delete_record),
        )
        .route(
            "/v1/tables/{table}/blobs/{*key}",
            get(blobs::get_blob)
                .put(blobs::put_blob)
                .delete(blobs::delete_blob),
        )
        .route("/v1/transactions", post(records::transaction))
        .route("/v1/backups", get(backups::list).post(backups::start))
        .route(
            "/v1/backups/current",
            get(backups::current).delete(backups::stop),
        )
        .route("/v1/restore-points", post(backups::restore_point))
        .route("/v1/rollback", post(backups::rollback))
        .route("/v1/journal", get(admin::journal))
        .route("/v1/journal/rotate", post(admin::rotate))
        .route(
            "/v1/lock",
            get(admin::lock_status)
                .post(admin::lock)
                .delete(admin::unlock),
        )
        .route_layer(middleware::from_fn(tag_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Outside routing: unknown paths are refused before they are
        // revealed as unknown.
        .layer(middleware::from_fn_with_state(state.clone(), front))
        // A 5xx is an answer the node chose (not_primary during a failover,
        // journal_unavailable, …), each logged where it is decided; logging
        // every one again at ERROR would flood the log in exactly the
        // moments an operator reads it.
        .layer(
            TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .with_state(state)
}

/// `GET /primary` of a node without `[cluster]`: 200 while it takes writes.
/// A cluster node gets the cluster-aware probes (`/primary`, `/mirror`)
/// from `cluster::http::wrap` instead, so [`router`] itself has none.
pub fn standalone_probes(state: ApiState) -> Router {
    Router::new()
        .route("/primary", get(status::primary))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no such path: {}", req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// The one middleware outside routing (each layer costs every request a
/// clone of the service below it): times the request for the per-route
/// metrics, authorises it (so unknown paths are refused before they are
/// revealed as unknown), and points a `not_primary` redirect at the same
/// path and query on the primary.
async fn front(State(st): State<ApiState>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let target = req.uri().path_and_query().cloned();
    let mut resp = match auth::authorize_request(&st, &mut req) {
        Ok(()) => next.run(req).await,
        Err(refused) => refused.into_response(),
    };
    if resp.status() == StatusCode::TEMPORARY_REDIRECT {
        redirect_to_same_path(&mut resp, target.as_ref().map_or("", |t| t.as_str()));
    }
    let route = resp
        .extensions()
        .get::<RouteLabel>()
        .map_or("unmatched", |r| r.0.as_str());
    crate::metrics::record_http(&method, route, resp.status().as_u16(), start.elapsed());
    resp
}

/// A `not_primary` redirect names the primary's base URL; point it at
/// `target` (the request's path and query) there, so clients that follow
/// redirects just work.
fn redirect_to_same_path(resp: &mut Response, target: &str) {
    let joined = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .map(|base| format!("{}{target}", base.trim_end_matches('/')))
        .and_then(|l| header::HeaderValue::from_str(&l).ok());
    if let Some(l) = joined {
        resp.headers_mut().insert(header::LOCATION, l);
    }
}

/// The route template a request matched, carried out in the response's
/// extensions for [`front`] (which runs outside routing).
#[derive(Clone, Debug)]
struct RouteLabel(MatchedPath);

/// Copies the matched route template into the response.
async fn tag_route(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let mut resp = next.run(req).await;
    if let Some(r) = route {
        resp.extensions_mut().insert(RouteLabel(r));
    }
    resp
}

/// Marks a request that came in on the API's Unix socket
/// (`api.unix_socket`): its session's peer is `unix`.
#[derive(Clone, Copy, Debug)]
pub struct UnixPeer;

/// Who sent a request, as the engine's session identity. Extracted from the
/// authorisation result, the peer address and the session header.
#[derive(Clone, Debug)]
pub struct Caller {
    pub identity: ClientIdentity,
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &ApiState) -> Result<Self, ApiError> {
        let token_name = parts
            .extensions
            .get::<auth::Authorized>()
            .map(|a| a.token_name.clone())
            .unwrap_or_else(|| ANONYMOUS.to_owned());
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .or_else(|| {
                parts
                    .extensions
                    .get::<UnixPeer>()
                    .map(|_| "unix".to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let client_session = match parts.headers.get(SESSION_HEADER) {
            None => DEFAULT_SESSION_NAME.to_owned(),
            Some(v) => {
                let s = v.to_str().ok().filter(|s| {
                    !s.is_empty()
                        && s.len() <= MAX_SESSION_NAME_BYTES
                        && s.bytes().all(|b| b.is_ascii_graphic())
                });
                match s {
                    Some(s) => s.to_owned(),
                    None => {
                        return Err(ApiError::invalid(format!(
                            "{SESSION_HEADER} must be 1..={MAX_SESSION_NAME_BYTES} printable ASCII characters without spaces"
                        )));
                    }
                }
            }
        };
        Ok(Caller {
            identity: ClientIdentity {
                token_name,
                peer,
                client_session,
            },
        })
    }
}

/// Reads a whole body of at most `limit` bytes, refusing early on a
/// `Content-Length` past it and answering 413 the moment it is exceeded;
/// 408 if the client sends nothing for `idle`.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    idle: Duration,
) -> Result<Bytes, ApiError> {
    match content_length(headers)? {
        Some(len) if len > limit as u64 => {
            return Err(ApiError::too_large(Some(len), limit as u64));
        }
        _ => {}
    }
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    loop {
        let next = tokio::time::timeout(idle, stream.next())
            .await
            .map_err(|_| body_timeout(idle))?;
        let Some(chunk) = next else { break };
        let chunk = chunk
            .map_err(|e| ApiError::invalid(format!("reading the request body failed: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::too_large(None, limit as u64));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// 408 `request_timeout`: the body stalled.
pub fn body_timeout(idle: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the request body sent nothing for {}; nothing was written",
            crate::config::format_duration(idle)
        ),
    )
}

/// A body stream that ends with an error once no chunk has arrived for
/// `idle`, and records that it did.
pub struct IdleBody<S> {
    inner: S,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

impl<S> IdleBody<S> {
    /// Wraps `inner`; `timed_out` is set when the deadline passes.
    pub fn new(inner: S, idle: Duration, timed_out: Arc<AtomicBool>) -> Self {
        IdleBody {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            timed_out,
        }
    }
}

impl<S, E> Stream for IdleBody<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    type Item = Result<Bytes, String>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.timed_out.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(item) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(item.map(|r| r.map_err(|e| e.to_string())))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.timed_out.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(format!(
                        "the body sent nothing for {}",
                        crate::config::format_duration(this.idle)
                    ))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// The `Content-Length` header, if present and well formed.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| ApiError::invalid("Content-Length is not a number")),
    }
}

/// A JSON answer with status 200.
pub fn json_ok(value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode the answer: {e}"),
        )
        .into_response(),
    }
}

/// Shared by handlers that take the state only for the engine.
pub(crate) type St = State<ApiState>;
