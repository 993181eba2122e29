//! Prometheus metrics: the process-wide recorder, the descriptions of every
//! metric the node emits, and the HTTP request metrics the API records.
//!
//! The `metrics` crate allows one global recorder per process. [`handle`]
//! installs it the first time it is called and hands the same handle to every
//! later caller, so several servers in one process (the integration tests)
//! share it. If something else installed a recorder first, `/metrics` renders
//! an empty registry and a warning is logged, instead of failing start-up.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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
        "mirrordb_flush_lag_entries",
        "Journal entries applied but not yet flushed to the data file."
    );
    describe_gauge!(
        "mirrordb_journal_available",
        "1 while the journal can be written, 0 after a journal I/O error."
    );
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

/// Records one answered HTTP request.
pub fn record_http(method: &str, route: &str, status: u16, elapsed: Duration) {
    metrics::counter!(
        HTTP_REQUESTS_TOTAL,
        "method" => method.to_owned(),
        "route" => route.to_owned(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!(
        HTTP_REQUEST_SECONDS,
        "method" => method.to_owned(),
        "route" => route.to_owned()
    )
    .record(elapsed.as_secs_f64());
}
