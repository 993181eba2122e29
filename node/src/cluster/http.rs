//! The cluster's HTTP surface, added around the node's API router:
//!
//! | path | does |
//! | --- | --- |
//! | `GET /primary` | 200 only on a writable primary (public probe) |
//! | `GET /mirror?max_lag_ms=` | 200 only on a mirror within that lag (public probe) |
//! | `GET /v1/cluster` | members, role, positions, per-mirror lag, commit policy |
//! | `PUT /v1/cluster/commit-policy` | `{"commit_policy": "quorum:1", "on_unavailable"?: "strict"}` (admin) |
//! | `POST /v1/cluster/switchover` | `{"to"?: "n2"}` (admin): planned switchover, run by the Raft leader (forwarded there) |
//! | `POST /v1/cluster/members` | `{"id","addr","http","role"?,"nofailover"?}` (admin): add a member (forwarded to the Raft leader; waits until it caught up with the control plane) |
//! | `DELETE /v1/cluster/members/{id}` | (admin): remove a member (not the primary) |
//!
//! and [`gate`], a middleware on the data paths (`/v1/tables…`,
//! `/v1/transactions`):
//!
//! ```text
//! read  ─► strip min_lsn / max_lag_ms / wait_ms ─► authorise ─► too stale? 503 stale_read
//!       ─► wait until applied >= min_lsn (or 503 lsn_not_reached) ─► handler
//! write ─► on a mirror: authorise ─► 307 not_primary, Location = primary + path
//!       ─► handler ─► 307 not_primary: Location = primary + path
//!                 ─► 2xx on the primary: CommitGate::wait(lsn of the answer)
//!                    ─► the answer, or 503 write_blocked (strict)
//! ```

use super::config::{CommitPolicy, OnUnavailable};
use super::runtime::{ClusterNode, DEFAULT_READ_WAIT, MAX_READ_WAIT};
use crate::api::{ApiError, ApiState, auth, json_ok};
use crate::engine::Role;
use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use mirrordb_failover::controller::SwitchoverError;
use mirrordb_failover::driver::DriverError;
use mirrordb_replication::Lsn;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Largest write answer the gate reads to find its LSN.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Largest commit-policy request body.
const MAX_POLICY_BODY: usize = 4096;

/// Adds the cluster routes and the gate to the node's API router.
pub fn wrap(node: ClusterNode, api: Router, api_state: ApiState) -> Router {
    let protected = Router::new()
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/commit-policy", put(set_commit_policy))
        .route("/v1/cluster/switchover", post(switchover))
        .route("/v1/cluster/members", post(add_member))
        .route(
            "/v1/cluster/members/{id}",
            axum::routing::delete(remove_member),
        )
        .layer(middleware::from_fn_with_state(api_state, auth::authorize))
        .with_state(node.clone());
    let public = Router::new()
        .route("/primary", get(primary))
        .route("/mirror", get(mirror))
        .with_state(node.clone());
    // The cluster's routes win (the API has a role-only `/primary`); every
    // other request goes to the node's API router as it is.
    Router::new()
        .merge(protected)
        .merge(public)
        .fallback_service(api)
        .layer(middleware::from_fn_with_state(node, gate))
}

fn is_data_path(path: &str) -> bool {
    path.starts_with("/v1/tables") || path == "/v1/transactions"
}

/// Read-consistency parameters taken off a data read's query string.
#[derive(Debug, Default, PartialEq, Eq)]
struct ReadParams {
    min_lsn: Option<u64>,
    max_lag_ms: Option<u64>,
    wait_ms: Option<u64>,
}

/// Splits our parameters off a query string; answers them and the rest.
fn split_query(query: Option<&str>) -> Result<(ReadParams, String), ApiError> {
    let mut p = ReadParams::default();
    let mut rest = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let num = || {
            v.parse::<u64>().map_err(|_| {
                ApiError::invalid(format!("{k} must be a non-negative integer, got {v:?}"))
            })
        };
        match k {
            "min_lsn" => p.min_lsn = Some(num()?),
            "max_lag_ms" => p.max_lag_ms = Some(num()?),
            "wait_ms" => p.wait_ms = Some(num()?),
            _ => rest.push(pair),
        }
    }
    Ok((p, rest.join("&")))
}

fn with_query(uri: &Uri, query: &str) -> Option<Uri> {
    let pq = if query.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{query}", uri.path())
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

fn unavailable(code: &'static str, message: String) -> Response {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message).into_response()
}

/// The middleware described in the module doc.
pub async fn gate(State(node): State<ClusterNode>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if !is_data_path(&path) {
        return next.run(req).await;
    }
    let method = req.method().clone();
    if method == Method::GET || method == Method::HEAD {
        let (params, rest) = match split_query(req.uri().query()) {
            Ok(x) => x,
            Err(e) => return e.into_response(),
        };
        if params == ReadParams::default() {
            return next.run(req).await;
        }
        // Authorise before waiting, so nobody unauthorised can hold a
        // request open.
        let authz = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if let Err(e) = auth::check(node.tokens(), &method, &path, authz) {
            return e.into_response();
        }
        if let Some(uri) = with_query(req.uri(), &rest) {
            *req.uri_mut() = uri;
        }
        if let (Some(max), Some(st)) = (params.max_lag_ms, node.mirror_status()) {
            let lag = st.lag(Instant::now());
            let ok = lag.is_some_and(|l| l <= Duration::from_millis(max));
            if !ok {
                let shown = lag.map_or("unknown (never caught up)".to_owned(), |l| {
                    format!("{} ms", l.as_millis())
                });
                return unavailable(
                    "stale_read",
                    format!(
                        "this mirror lags by {shown}, more than max_lag_ms={max}; read from the primary or another mirror"
                    ),
                );
            }
        }
        if let Some(min) = params.min_lsn {
            let wait = params
                .wait_ms
                .map_or(DEFAULT_READ_WAIT, Duration::from_millis)
                .min(MAX_READ_WAIT);
            if let Err(reached) = node.wait_applied(min, Instant::now() + wait).await {
                return unavailable(
                    "lsn_not_reached",
                    format!(
                        "this node has applied up to LSN {reached}, not {min}, after waiting {} ms",
                        wait.as_millis()
                    ),
                );
            }
        }
        return next.run(req).await;
    }
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or(path.clone(), |pq| pq.as_str().to_owned());
    if let Role::Mirror { primary_http } = node.engine().get().role() {
        // Refuse before the handler: no body is read (a BLOB would be
        // staged first), and a reseed swapping the engine cannot turn the
        // answer into `shutting_down`. Authorisation still comes first.
        let authz = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if let Err(e) = auth::check(node.tokens(), &method, &path, authz) {
            return e.into_response();
        }
        let e = crate::engine::WriteError::NotPrimary { primary_http };
        return redirect_to_path(ApiError::from(e).into_response(), &path_and_query);
    }
    let resp = next.run(req).await;
    if resp.status() == StatusCode::TEMPORARY_REDIRECT {
        return redirect_to_path(resp, &path_and_query);
    }
    if !resp.status().is_success() {
        return resp;
    }
    let Some(gate) = node.gate() else {
        return resp;
    };
    if gate.policy().0.mirrors_needed() == 0 {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_ANSWER_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("reading the write's answer: {e}"),
            )
            .into_response();
        }
    };
    #[derive(Deserialize)]
    struct Answer {
        lsn: u64,
    }
    // Every write answer names its LSN; if one did not, wait for
    // everything durable now, which includes it.
    let lsn = serde_json::from_slice::<Answer>(&bytes)
        .map(|a| a.lsn)
        .unwrap_or_else(|_| node.engine().get().status().durable_lsn);
    match gate.wait(Lsn(lsn)).await {
        Ok(()) => Response::from_parts(parts, Body::from(bytes)),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "write_blocked",
            e.to_string(),
        )
        .into_response(),
    }
}

/// `not_primary` answers name the primary's base URL; point them at the
/// same path there.
fn redirect_to_path(mut resp: Response, path_and_query: &str) -> Response {
    let loc = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim_end_matches('/').to_owned());
    if let Some(base) = loc
        && !base.contains("/v1/")
        && let Ok(v) = HeaderValue::from_str(&format!("{base}{path_and_query}"))
    {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[derive(Serialize)]
struct Probe {
    node: String,
    role: &'static str,
    ok: bool,
    reason: Option<String>,
    last_lsn: u64,
    applied_lsn: u64,
    lag_ms: Option<u64>,
    commit_degraded: bool,
}

fn probe(ok: bool, body: &Probe) -> Response {
    let mut r = json_ok(body);
    if !ok {
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    r
}

/// Why `GET /primary` answers 503, or `None` when the node takes writes:
/// the primary role, a writable journal, and a lease (when failover sets
/// one) that has not lapsed. A primary cut off from the cluster keeps its
/// role until Raft demotes it, but refuses writes once its lease lapsed;
/// the probe must say so, or a load balancer keeps sending it writes.
fn primary_refusal(
    is_primary: bool,
    journal_available: bool,
    lease_until_ms: Option<u64>,
    now_ms: u64,
) -> Option<String> {
    if !is_primary {
        Some("this node is a mirror".to_owned())
    } else if !journal_available {
        Some("the journal cannot be written".to_owned())
    } else if lease_until_ms.is_some_and(|until| now_ms >= until) {
        Some("this node's primary lease lapsed (it cannot reach the cluster): it refuses writes until the cluster confirms it as primary or names another".to_owned())
    } else {
        None
    }
}

/// `GET /primary`.
pub async fn primary(State(node): State<ClusterNode>) -> Response {
    let engine = node.engine().get();
    let st = engine.status();
    let is_primary = matches!(engine.role(), Role::Primary);
    let now_ms = crate::journal::writer::now_us() / 1000;
    let reason = primary_refusal(
        is_primary,
        st.journal_available,
        engine.lease_until(),
        now_ms,
    );
    let ok = reason.is_none();
    probe(
        ok,
        &Probe {
            node: node.section().node_id.clone(),
            role: if is_primary { "primary" } else { "mirror" },
            ok,
            reason,
            last_lsn: st.last_lsn,
            applied_lsn: st.applied_lsn,
            lag_ms: None,
            commit_degraded: node.gate().is_some_and(|g| g.degraded()),
        },
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorQuery {
    max_lag_ms: Option<u64>,
}

/// `GET /mirror?max_lag_ms=`.
pub async fn mirror(
    State(node): State<ClusterNode>,
    q: Result<Query<MirrorQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return ApiError::invalid(e.body_text()).into_response(),
    };
    let engine = node.engine().get();
    let st = engine.status();
    let status = node.mirror_status();
    let lag = status.as_ref().and_then(|s| s.lag(Instant::now()));
    let reason = match (&status, q.max_lag_ms) {
        (None, _) => Some("this node is the primary".to_owned()),
        (Some(s), None) if !s.streaming => Some("not streaming from the primary".to_owned()),
        (Some(_), Some(max)) => match lag {
            Some(l) if l <= Duration::from_millis(max) => None,
            Some(l) => Some(format!("lags by {} ms, more than {max}", l.as_millis())),
            None => Some("has not caught up with the primary since it started".to_owned()),
        },
        _ => None,
    };
    let ok = reason.is_none();
    probe(
        ok,
        &Probe {
            node: node.section().node_id.clone(),
            role: if status.is_some() {
                "mirror"
            } else {
                "primary"
            },
            ok,
            reason,
            last_lsn: st.last_lsn,
            applied_lsn: st.applied_lsn,
            lag_ms: lag.map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX)),
            commit_degraded: false,
        },
    )
}

/// `GET /v1/cluster`.
pub async fn cluster_status(State(node): State<ClusterNode>) -> Response {
    json_ok(&node.status())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    commit_policy: CommitPolicy,
    on_unavailable: Option<OnUnavailable>,
}

/// `PUT /v1/cluster/commit-policy`.
pub async fn set_commit_policy(State(node): State<ClusterNode>, body: Body) -> Response {
    let Some(gate) = node.gate() else {
        let e = crate::engine::WriteError::NotPrimary {
            primary_http: node.primary_http(),
        };
        let resp = ApiError::from(e).into_response();
        return redirect_to_path(resp, "/v1/cluster/commit-policy");
    };
    let bytes = match axum::body::to_bytes(body, MAX_POLICY_BODY).await {
        Ok(b) => b,
        Err(_) => return ApiError::too_large(None, MAX_POLICY_BODY as u64).into_response(),
    };
    let b: PolicyBody = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => return ApiError::invalid(format!("bad body: {e}")).into_response(),
    };
    let on = b.on_unavailable.unwrap_or(gate.policy().1);
    if let Err(m) = gate.set_policy(b.commit_policy, on) {
        return ApiError::invalid(m).into_response();
    }
    if let Some(f) = node.failover() {
        // The controller chooses candidates by the recorded policy.
        let mut section = node.section().clone();
        section.commit_policy = b.commit_policy;
        section.on_unavailable = on;
        let cmd = mirrordb_failover::state::ClusterCommand::SetCommitPolicy {
            policy: section.state_policy(),
        };
        match f.handle().propose(cmd).await {
            Ok(Ok(_)) => {}
            Ok(Err(r)) => return ApiError::invalid(r.to_string()).into_response(),
            Err(e) => {
                return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("the policy applies on this primary but could not be recorded in the cluster state: {e}")).into_response();
            }
        }
    }
    json_ok(&node.status())
}

/// Most bytes of a switchover request body.
const MAX_SWITCHOVER_BODY: usize = 1024;
/// How long a forwarded control request may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchoverBody {
    to: Option<String>,
}

/// The answer to a switchover request.
#[derive(Debug, Serialize)]
struct SwitchoverAnswer {
    /// The node being promoted.
    target: String,
    /// The Raft leader that runs it.
    leader: String,
}

/// Sends a control request on to the Raft leader's HTTP API.
async fn forward_to_leader(
    leader_http: &str,
    method: reqwest::Method,
    path: &str,
    authz: Option<HeaderValue>,
    body: bytes::Bytes,
) -> Response {
    let url = format!("{}{path}", leader_http.trim_end_matches('/'));
    let client = match super::http_client() {
        Ok(c) => c,
        Err(e) => return unavailable("unavailable", e),
    };
    // Adding a member waits for it to catch up with the control-plane log.
    let timeout = if path.starts_with("/v1/cluster/members") {
        super::control::MEMBERSHIP_TIMEOUT + FORWARD_TIMEOUT
    } else {
        FORWARD_TIMEOUT
    };
    let mut req = client
        .request(method, &url)
        .timeout(timeout)
        .header(FORWARDED_HEADER, "1")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(a) = authz {
        req = req.header(header::AUTHORIZATION, a);
    }
    match req.send().await {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            match r.bytes().await {
                Ok(b) => (status, [(header::CONTENT_TYPE, "application/json")], b).into_response(),
                Err(e) => unavailable(
                    "unavailable",
                    format!("the Raft leader at {leader_http} answered incompletely: {e}"),
                ),
            }
        }
        Err(e) => unavailable(
            "unavailable",
            format!("cannot reach the Raft leader at {leader_http}: {e}"),
        ),
    }
}

/// How long `POST /v1/cluster/switchover` waits for the switchover it
/// started to be committed before it answers.
const SWITCHOVER_RECORD_WAIT: Duration = Duration::from_secs(2);

/// `POST /v1/cluster/switchover`.
pub async fn switchover(State(node): State<ClusterNode>, req: Request) -> Response {
    let Some(f) = node.failover() else {
        return failover_off();
    };
    let authz = req.headers().get(header::AUTHORIZATION).cloned();
    let forwarded = req.headers().contains_key(FORWARDED_HEADER);
    let bytes = match axum::body::to_bytes(req.into_body(), MAX_SWITCHOVER_BODY).await {
        Ok(b) => b,
        Err(_) => return ApiError::too_large(None, MAX_SWITCHOVER_BODY as u64).into_response(),
    };
    let body: SwitchoverBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        SwitchoverBody::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => return ApiError::invalid(format!("bad body: {e}")).into_response(),
        }
    };
    if let Some(r) = leader_elsewhere(
        f,
        forwarded,
        reqwest::Method::POST,
        "/v1/cluster/switchover",
        authz,
        bytes,
    )
    .await
    {
        return r;
    }
    let target = body.to.map(mirrordb_failover::NodeId);
    match f.handle().switchover(target).await {
        // Answered once the switchover is in the replicated state, so that
        // "started" means recorded.
        Ok(t) if f.switchover_recorded(&t, SWITCHOVER_RECORD_WAIT).await => {
            json_ok(&SwitchoverAnswer {
                target: t.0,
                leader: node.section().node_id.clone(),
            })
        }
        Ok(t) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "switchover_unavailable",
            format!(
                "the switchover to {t} was accepted but not recorded within {} ms (Raft leadership moved?); retry in a moment",
                SWITCHOVER_RECORD_WAIT.as_millis()
            ),
        )
        .into_response(),
        // Leadership moved, a failover runs, or the target missed its last
        // reports: the same request may succeed in a moment.
        Err(DriverError::Switchover(e)) if e.is_transient() => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "switchover_unavailable",
            format!("{e}; retry in a moment"),
        )
        .into_response(),
        Err(DriverError::Switchover(e @ SwitchoverError::InProgress)) => ApiError::new(
            StatusCode::CONFLICT,
            "switchover_in_progress",
            e.to_string(),
        )
        .into_response(),
        Err(e) => {
            ApiError::new(StatusCode::CONFLICT, "switchover_refused", e.to_string()).into_response()
        }
    }
}

/// `None` on the Raft leader; elsewhere the leader's answer to the same
/// request (forwarded once), or why there is none.
async fn leader_elsewhere(
    f: &super::control::Failover,
    forwarded: bool,
    method: reqwest::Method,
    path: &str,
    authz: Option<HeaderValue>,
    bytes: bytes::Bytes,
) -> Option<Response> {
    if f.is_leader() {
        return None;
    }
    let Some((leader, Some(http))) = f.leader() else {
        return Some(unavailable(
            "no_leader",
            "no Raft leader is known right now; retry in a second".to_owned(),
        ));
    };
    if forwarded {
        return Some(unavailable(
            "no_leader",
            format!("{leader} is not the Raft leader any more; retry"),
        ));
    }
    Some(forward_to_leader(&http, method, path, authz, bytes).await)
}

fn failover_off() -> Response {
    ApiError::new(
        StatusCode::CONFLICT,
        "failover_off",
        "this cluster has a fixed primary (cluster.failover = false): change cluster.primary and restart instead".to_owned(),
    )
    .into_response()
}

/// Most bytes of a member request body.
const MAX_MEMBER_BODY: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberBody {
    id: String,
    addr: String,
    http: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    nofailover: bool,
}

fn membership_error(e: mirrordb_failover::membership::MembershipError) -> Response {
    use mirrordb_failover::membership::MembershipError as E;
    match e {
        E::Rejected(r) => {
            ApiError::new(StatusCode::CONFLICT, "membership_refused", r.to_string()).into_response()
        }
        E::NotLeader { .. } => unavailable("no_leader", e.to_string()),
        other => unavailable("unavailable", other.to_string()),
    }
}

/// `POST /v1/cluster/members` `{"id","addr","http","role"?,"nofailover"?}`.
pub async fn add_member(State(node): State<ClusterNode>, req: Request) -> Response {
    let Some(f) = node.failover() else {
        return failover_off();
    };
    let authz = req.headers().get(header::AUTHORIZATION).cloned();
    let forwarded = req.headers().contains_key(FORWARDED_HEADER);
    let bytes = match axum::body::to_bytes(req.into_body(), MAX_MEMBER_BODY).await {
        Ok(b) => b,
        Err(_) => return ApiError::too_large(None, MAX_MEMBER_BODY as u64).into_response(),
    };
    let body: MemberBody = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => return ApiError::invalid(format!("bad body: {e}")).into_response(),
    };
    if let Err(e) = mirrordb_replication::certs::validate_node_id(&body.id) {
        return ApiError::invalid(e.to_string()).into_response();
    }
    let role = match body.role.as_deref() {
        None | Some("data") => mirrordb_failover::state::Role::Data,
        Some("witness") => mirrordb_failover::state::Role::Witness,
        Some(other) => {
            return ApiError::invalid(format!("role {other:?}: expected \"data\" or \"witness\""))
                .into_response();
        }
    };
    if let Some(r) = leader_elsewhere(
        f,
        forwarded,
        reqwest::Method::POST,
        "/v1/cluster/members",
        authz,
        bytes,
    )
    .await
    {
        return r;
    }
    let name = mirrordb_failover::NodeId(body.id.clone());
    let member = mirrordb_failover::state::Member {
        role,
        raft_addr: body.addr,
        http_addr: body.http,
        nofailover: body.nofailover,
    };
    tracing::info!(node = %name, "adding a member");
    match f.add_member(&name, &member).await {
        Ok(()) => json_ok(&serde_json::json!({ "added": body.id })),
        Err(e) => membership_error(e),
    }
}

/// `DELETE /v1/cluster/members/{id}`.
pub async fn remove_member(
    State(node): State<ClusterNode>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let Some(f) = node.failover() else {
        return failover_off();
    };
    let authz = req.headers().get(header::AUTHORIZATION).cloned();
    let forwarded = req.headers().contains_key(FORWARDED_HEADER);
    if let Err(e) = mirrordb_replication::certs::validate_node_id(&id) {
        return ApiError::invalid(e.to_string()).into_response();
    }
    let path = format!("/v1/cluster/members/{id}");
    if let Some(r) = leader_elsewhere(
        f,
        forwarded,
        reqwest::Method::DELETE,
        &path,
        authz,
        bytes::Bytes::new(),
    )
    .await
    {
        return r;
    }
    let name = mirrordb_failover::NodeId(id.clone());
    tracing::info!(node = %name, "removing a member");
    match f.remove_member(&name).await {
        Ok(()) => json_ok(&serde_json::json!({ "removed": id })),
        Err(e) => membership_error(e),
    }
}

/// Marks a request forwarded once (no forwarding loops).
const FORWARDED_HEADER: &str = "x-mirrordb-forwarded";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn primary_probe_refuses_a_primary_whose_lease_lapsed() {
        // A primary cut off from the cluster: role still primary, lease over.
        let r = primary_refusal(true, true, Some(1_000), 1_000).unwrap();
        assert!(r.contains("lease lapsed"), "{r}");
        assert_eq!(primary_refusal(true, true, Some(1_001), 1_000), None);
        assert_eq!(
            primary_refusal(true, true, None, 1_000),
            None,
            "no failover: no lease"
        );
        assert!(
            primary_refusal(false, true, None, 0)
                .unwrap()
                .contains("mirror")
        );
        assert!(
            primary_refusal(true, false, None, 0)
                .unwrap()
                .contains("journal")
        );
    }

    #[test]
    fn read_params_are_split_off_the_query() {
        let (p, rest) = split_query(Some("prefix=a&min_lsn=7&limit=3&max_lag_ms=100")).unwrap();
        assert_eq!(p.min_lsn, Some(7));
        assert_eq!(p.max_lag_ms, Some(100));
        assert_eq!(rest, "prefix=a&limit=3");
        assert!(split_query(Some("min_lsn=-1")).is_err());
        assert_eq!(split_query(None).unwrap().1, "");
    }
}
