//! Prometheus metrics: the process-wide recorder, the descriptions of every
//! metric the node emits, and the HTTP request metrics the API records.
//!
//! The `metrics` crate allows one global recorder per process. [`handle`]
//! installs it the first time it is called and hands the same handle to every
//! later caller, so several servers in one process (the integration tests)
//! share it. If something else installed a recorder first, `/metrics` renders
//! an empty registry and a warning is logged, instead of failing start-up.

use axum::http::Method;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// How often histogram buckets are drained (the exporter's "upkeep").
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Buckets (seconds) for latency histograms: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// HTTP requests answered, by method, route and status.
pub const HTTP_REQUESTS_TOTAL: &str = "mirrordb_http_requests_total";
/// HTTP request latency, by method and route.
pub const HTTP_REQUEST_SECONDS: &str = "mirrordb_http_request_seconds";
/// On a primary, per mirror: from a group commit's fsync on the primary to
/// the arrival of the mirror's report that it fsynced it too.
pub const REPLICATION_ACK_LAG_SECONDS: &str = "mirrordb_replication_ack_lag_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus handle, installing the recorder on first use.
pub fn handle() -> PrometheusHandle {
    HANDLE.get_or_init(install).clone()
}

fn builder() -> PrometheusBuilder {
    let b = PrometheusBuilder::new();
    match b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("metrics: histogram buckets refused ({e}); using summaries");
            PrometheusBuilder::new()
        }
    }
}

fn install() -> PrometheusHandle {
    let handle = match builder().install_recorder() {
        Ok(h) => {
            describe();
            h
        }
        Err(e) => {
            tracing::warn!(
                "metrics: another recorder is already installed ({e}); /metrics will be empty"
            );
            builder().build_recorder().handle()
        }
    };
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("mirrordb-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("metrics: cannot start the upkeep thread: {e}");
    }
    handle
}

/// Help texts for every metric the node emits.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "mirrordb_writes_total",
        "Record, BLOB and table operations acknowledged."
    );
    describe_counter!(
        "mirrordb_write_batches_total",
        "Group commits (one fdatasync each)."
    );
    describe_counter!(
        "mirrordb_journal_bytes_total",
        Unit::Bytes,
        "Bytes written to the journal."
    );
    describe_histogram!(
        "mirrordb_fsync_seconds",
        Unit::Seconds,
        "Duration of journal fdatasync calls."
    );
    describe_histogram!(
        "mirrordb_flush_seconds",
        Unit::Seconds,
        "Duration of cache flushes to the data file."
    );
    describe_histogram!(
        REPLICATION_ACK_LAG_SECONDS,
        Unit::Seconds,
        "Primary only, per mirror: from a group commit's fsync on the primary to the mirror's acknowledgement that it fsynced it."
    );
    describe_gauge!("mirrordb_last_lsn", "Last durable LSN of the journal.");
    describe_gauge!(
        "mirrordb_checkpoint_lsn",
        "Last LSN whose effects are durable in the data file."
    );
    describe_gauge!(
        "mirrordb_data_file_bytes",
        Unit::Bytes,
        "Length of the data file, read at each scrape (it grows, and stays grown, while a backup snapshot pins old pages; `mirrordb compact` returns the space)."
    );
    describe_gauge!(
        "mirrordb_flush_lag_entries",
        "Journal entries applied but not yet flushed to the data file."
    );
    describe_gauge!(
        "mirrordb_journal_available",
        "1 while the journal can be written, 0 after a journal I/O error."
    );
    describe_counter!(
        "mirrordb_backups_total",
        "Backups that ended since the node started, by status: ok, partial, failed, interrupted, skipped (only_if_changed), missed (a scheduled time the node was down for)."
    );
    describe_gauge!(
        "mirrordb_backup_last_success_timestamp_seconds",
        Unit::Seconds,
        "When the last backup that ended ok ended (Unix time; from backupHistory.json at start; 0 before the first). Alert on time() minus this."
    );
    describe_gauge!(
        "mirrordb_backup_last_success_duration_seconds",
        Unit::Seconds,
        "How long the last backup that ended ok took."
    );
    describe_gauge!(
        "mirrordb_backup_last_success_bytes",
        Unit::Bytes,
        "Bytes the last backup that ended ok wrote (its set and journal archive)."
    );
    describe_gauge!(
        "mirrordb_backup_last_covered_timestamp_seconds",
        Unit::Seconds,
        "When the backups were last known to hold every write: the end of the last ok backup, or of a later one skipped by only_if_changed because no data had changed (Unix time; 0 before either). Alert on time() minus this."
    );
    describe_gauge!(
        "mirrordb_backup_automatic_paused",
        "1 while automatic backups are paused after failed attempts (a manual backup resumes them)."
    );
    describe_gauge!("mirrordb_backup_running", "1 while a backup runs.");
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests answered, by method, route and status."
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "HTTP request latency until the response head, by method and route."
    );
}

/// The label of a request method: the standard methods by name, any other
/// `other`, so clients choosing methods cannot grow the registry.
fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "PUT" => "PUT",
        "POST" => "POST",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// The HTTP metrics' handles of one route: (method, status, request
/// counter, latency histogram).
type RouteHandles = Vec<(&'static str, u16, Counter, Histogram)>;

thread_local! {
    /// Handles already registered, by route: the recorder is process-wide
    /// and never replaced, so a handle stays valid, and a request then
    /// costs no label allocation nor registry lookup.
    static HTTP_HANDLES: RefCell<HashMap<String, RouteHandles>> = RefCell::new(HashMap::new());
}

/// Records one answered HTTP request.
pub fn record_http(method: &Method, route: &str, status: u16, elapsed: Duration) {
    let method = method_label(method);
    HTTP_HANDLES.with_borrow_mut(|cache| {
        if let Some(handles) = cache.get_mut(route) {
            record_in(handles, method, route, status, elapsed);
        } else {
            let mut handles = RouteHandles::new();
            record_in(&mut handles, method, route, status, elapsed);
            cache.insert(route.to_owned(), handles);
        }
    });
}

/// Records one request in its route's handles, registering the (method,
/// status) pair on its first use.
fn record_in(
    handles: &mut RouteHandles,
    method: &'static str,
    route: &str,
    status: u16,
    elapsed: Duration,
) {
    let at = match handles.iter().position(|h| h.0 == method && h.1 == status) {
        Some(at) => at,
        None => {
            handles.push((
                method,
                status,
                metrics::counter!(
                    HTTP_REQUESTS_TOTAL,
                    "method" => method,
                    "route" => route.to_owned(),
                    "status" => status.to_string()
                ),
                metrics::histogram!(
                    HTTP_REQUEST_SECONDS,
                    "method" => method,
                    "route" => route.to_owned()
                ),
            ));
            handles.len() - 1
        }
    };
    let (_, _, requests, latency) = &handles[at];
    requests.increment(1);
    latency.record(elapsed.as_secs_f64());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn http_requests_are_counted_per_method_route_and_status_with_bounded_methods() {
        let h = handle();
        let route = "/test/metrics/{id}";
        let odd = Method::from_bytes(b"FROBNICATE").unwrap();
        for _ in 0..3 {
            record_http(&Method::PUT, route, 200, Duration::from_micros(300));
        }
        record_http(&Method::PUT, route, 409, Duration::from_micros(300));
        record_http(&odd, route, 405, Duration::from_micros(300));
        let text = h.render();
        let count = |labels: &str| {
            text.lines()
                .find(|l| l.starts_with(HTTP_REQUESTS_TOTAL) && l.contains(labels))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
        };
        assert_eq!(
            count(r#"method="PUT",route="/test/metrics/{id}",status="200""#),
            Some(3),
            "{text}"
        );
        assert_eq!(
            count(r#"method="PUT",route="/test/metrics/{id}",status="409""#),
            Some(1),
            "{text}"
        );
        assert_eq!(
            count(r#"method="other",route="/test/metrics/{id}",status="405""#),
            Some(1),
            "{text}"
        );
        assert!(!text.contains("FROBNICATE"), "{text}");
    }
}
