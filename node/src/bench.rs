//! `mirrordb bench`: a load generator for durable writes and reads, and a
//! probe of the machine's fdatasync latency to compare them with.
//!
//! ```text
//!            ┌─ client 0 ─┐  op = mix.pick(rng)      ┌─ HTTP (keep-alive, one
//! counter ──►│   …        │──────────────────────────►│  connection per client)
//! (count or  └─ client N ─┘  latency sample per op   └─ or the Engine in-process
//!  deadline)        │
//!                   └──► per-kind samples ──► merge ──► ops/s, p50 … max
//! ```
//!
//! Each client runs one operation at a time, so `clients` is the number of
//! writes in flight; group commit turns them into one fdatasync per batch.
//! Randomness (op choice, keys) is seeded; the seed is printed so a run's
//! access pattern can be repeated. The figures are what the client saw:
//! for HTTP they include the request round trip. The clients run as tasks
//! on load threads of their own (one per core, each a single-threaded
//! runtime), so the generator adds no thread hand-off of its own to a
//! sample.

use crate::engine::{Engine, EngineConfig};
use crate::http_client::{HttpConn, HttpTarget};
use crate::model::{ClientIdentity, SessionId, WriteOp};
use anyhow::{Context, anyhow, bail};
use hyper::Method;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Most clients one run may start.
pub const MAX_CLIENTS: usize = 4_096;
/// Largest value a run may write.
pub const MAX_BENCH_VALUE_BYTES: usize = 1 << 20;
/// Most latency samples kept per client and kind (4 bytes each); past it,
/// operations are still counted but no longer sampled.
pub const MAX_SAMPLES_PER_CLIENT: usize = 4_000_000;
/// Most fdatasync calls one probe makes.
pub const MAX_PROBE_COUNT: usize = 1_000_000;
/// Deadline of one HTTP request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of one fdatasync probe write.
const PROBE_WRITE_BYTES: usize = 4096;

/// What one operation of the mix does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Put one record (`PUT /v1/tables/{t}/records/{k}`).
    Write,
    /// Read one record (`GET`, a miss counts as a read).
    Read,
    /// Delete one record.
    Delete,
    /// A transaction of `--txn-size` puts (`POST /v1/transactions`).
    Txn,
}

impl OpKind {
    const ALL: [OpKind; 4] = [OpKind::Write, OpKind::Read, OpKind::Delete, OpKind::Txn];

    fn name(self) -> &'static str {
        match self {
            OpKind::Write => "write",
            OpKind::Read => "read",
            OpKind::Delete => "delete",
            OpKind::Txn => "txn",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Weights of each operation kind, e.g. `write=80,read=20`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: Vec<(OpKind, u32)>,
    total: u32,
}

impl Mix {
    /// Parses `kind=weight[,kind=weight…]`; kinds are write, read, delete,
    /// txn; weights are relative (they need not add up to 100).
    pub fn parse(s: &str) -> Result<Mix, String> {
        let mut weights: Vec<(OpKind, u32)> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, w) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected kind=weight, e.g. write=80"))?;
            let kind = OpKind::ALL
                .into_iter()
                .find(|o| o.name() == k.trim())
                .ok_or_else(|| format!("unknown kind {k:?}: use write, read, delete or txn"))?;
            let w: u32 = w
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: weight must be a whole number"))?;
            if w > 1_000_000 {
                return Err(format!("{part:?}: weight is larger than 1000000"));
            }
            if weights.iter().any(|(o, _)| *o == kind) {
                return Err(format!("{kind} is given twice"));
            }
            if w > 0 {
                weights.push((kind, w));
            }
        }
        let total = weights.iter().map(|(_, w)| *w).sum();
        if total == 0 {
            return Err("the mix has no operation with a weight above 0".into());
        }
        Ok(Mix { weights, total })
    }

    /// Picks a kind for a uniform draw in `0..total`.
    fn pick_at(&self, mut x: u32) -> OpKind {
        for (k, w) in &self.weights {
            if x < *w {
                return *k;
            }
            x -= *w;
        }
        // x < total always lands above; the last kind is the safe answer.
        self.weights.last().map_or(OpKind::Write, |(k, _)| *k)
    }

    fn pick(&self, rng: &mut impl Rng) -> OpKind {
        self.pick_at(rng.random_range(0..self.total))
    }

    /// The kinds in this mix, in a fixed order.
    pub fn kinds(&self) -> Vec<OpKind> {
        let mut k: Vec<OpKind> = self.weights.iter().map(|(k, _)| *k).collect();
        k.sort();
        k
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .weights
            .iter()
            .map(|(k, w)| format!("{k}={w}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Parses `500ms`, `10s`, `2m`, `1h` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 10s, 500ms, 2m"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use ms, s, m, h)")),
    };
    if !(secs.is_finite() && secs > 0.0 && secs <= 7.0 * 86_400.0) {
        return Err(format!("{s:?}: must be above 0 and at most 7 days"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_clients(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_CLIENTS).contains(&n) => Ok(n),
        _ => Err(format!("clients must be 1..={MAX_CLIENTS}")),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 10_000_000.0 => Ok(r),
        _ => Err(format!(
            "`{s}`: expected operations per second, > 0 and ≤ 10000000"
        )),
    }
}

fn parse_value_bytes(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (2..=MAX_BENCH_VALUE_BYTES).contains(&n) => Ok(n),
        _ => Err(format!("value bytes must be 2..={MAX_BENCH_VALUE_BYTES}")),
    }
}

/// `mirrordb bench`: load a node (over HTTP or in-process) and report
/// throughput and latency; or probe the disk's fdatasync latency.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// The node's HTTP address (plain `http://`, or `unix:PATH` for the
    /// node's `api.unix_socket`; redirects are not followed, so writes
    /// need the primary's address: a mirror's `not_primary` answers count
    /// as failed operations).
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Bearer token for the HTTP API.
    #[arg(long, env = "MIRRORDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Concurrent clients, each with one operation in flight.
    #[arg(long, default_value = "32", value_parser = parse_clients)]
    pub clients: usize,
    /// Total operations (default: run for --duration, or 10 s).
    #[arg(long, conflicts_with = "duration")]
    pub count: Option<u64>,
    /// How long to run: 500ms, 10s, 2m, 1h.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Size of each value: a JSON object padded to exactly this many bytes.
    #[arg(long, default_value = "256", value_parser = parse_value_bytes)]
    pub value_bytes: usize,
    /// Pad values with pseudo-random letters and digits (about 6 bits per
    /// byte, so compression saves about a quarter) instead of one repeated
    /// letter (which compresses to almost nothing): for backup benchmarks.
    #[arg(long)]
    pub random_values: bool,
    /// Operation mix, e.g. write=100 or write=80,read=20 (kinds: write,
    /// read, delete, txn).
    #[arg(long, default_value = "write=100", value_parser = Mix::parse)]
    pub mix: Mix,
    /// Key space: keys are drawn uniformly from this many keys.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Puts per transaction for the `txn` kind.
    #[arg(long, default_value_t = 4)]
    pub txn_size: usize,
    /// Table to write.
    #[arg(long, default_value = "bench")]
    pub table: String,
    /// Pace the run at this many operations per second in all (open loop:
    /// each operation has its due time; default: as fast as the clients go).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Seed of the access pattern (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object instead of the human report.
    #[arg(long)]
    pub json: bool,
    /// Drive the engine directly in this process (no HTTP) on --data-dir.
    #[arg(long, requires = "data_dir")]
    pub in_process: bool,
    /// Data directory for --in-process and --fsync-probe.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// With --in-process: the engine's flush interval.
    #[arg(long, value_parser = parse_duration)]
    pub flush_interval: Option<Duration>,
    /// With --in-process: flush the cache past this many dirty bytes.
    #[arg(long, requires = "in_process")]
    pub dirty_bytes_max: Option<u64>,
    /// With --in-process: append to the journal without zeroed blocks
    /// ahead of the writer (`journal.preallocate = false`), to compare.
    #[arg(long, requires = "in_process")]
    pub no_preallocate: bool,
    /// With --in-process: end the process without a clean shutdown, as a
    /// crash would, so the next open replays the journal (for measuring
    /// recovery; the journal stays durable).
    #[arg(long, requires = "in_process")]
    pub exit_without_shutdown: bool,
    /// Measure this disk's fdatasync latency on --data-dir (4 KiB write +
    /// fdatasync, --probe-count times, appending and over a preallocated
    /// file) instead of running a load.
    #[arg(long, conflicts_with = "in_process")]
    pub fsync_probe: bool,
    /// Number of fdatasync calls of the probe.
    #[arg(long, default_value_t = 1000)]
    pub probe_count: usize,
}

/// Latency percentiles of one set of samples, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub samples: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// The nearest-rank percentile `p` (0 < p ≤ 100) of sorted samples: the
/// smallest sample such that at least p% of samples are ≤ it.
pub fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let n = sorted.len();
    // Integer arithmetic in thousandths of a percent, so 99.9% of 1000 is
    // rank 999 exactly (floating point would give 999.0000000000001).
    let milli = (p.clamp(0.0, 100.0) * 1000.0).round() as u128;
    let rank = (milli * n as u128).div_ceil(100_000) as usize;
    let idx = rank.clamp(1, n) - 1;
    u64::from(sorted[idx])
}

impl Percentiles {
    /// Sorts `samples` and summarises them.
    pub fn from_samples(samples: &mut [u32]) -> Percentiles {
        samples.sort_unstable();
        let sum: u64 = samples.iter().map(|&s| u64::from(s)).sum();
        Percentiles {
            samples: samples.len() as u64,
            mean_us: if samples.is_empty() {
                0.0
            } else {
                sum as f64 / samples.len() as f64
            },
            p50_us: percentile(samples, 50.0),
            p90_us: percentile(samples, 90.0),
            p99_us: percentile(samples, 99.0),
            p999_us: percentile(samples, 99.9),
            max_us: samples.last().map_or(0, |&m| u64::from(m)),
        }
    }
}

/// Figures of one operation kind.
#[derive(Clone, Debug, Serialize)]
pub struct KindReport {
    pub ops: u64,
    pub errors: u64,
    pub ops_per_s: f64,
    pub latency: Percentiles,
}

/// The result of a load run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub mode: &'static str,
    pub target: String,
    pub clients: usize,
    pub value_bytes: usize,
    pub mix: String,
    pub keys: u64,
    pub seed: u64,
    pub elapsed_s: f64,
    pub ops: u64,
    pub errors: u64,
    pub ops_per_s: f64,
    /// Records written per second (a transaction counts its puts).
    pub records_written_per_s: f64,
    pub kinds: BTreeMap<OpKind, KindReport>,
    pub first_error: Option<String>,
    /// With --in-process: what recovery did when the engine opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery: Option<serde_json::Value>,
    /// Against a cluster's primary: each mirror's acknowledgement lag
    /// during the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replication: Vec<AckLagReport>,
}

/// One mirror's acknowledgement lag during a run: from a group commit's
/// fsync on the primary to the mirror's report that it fsynced it, read from
/// the primary's `mirrordb_replication_ack_lag_seconds` histogram before and
/// after the run. Percentiles are bucket upper bounds: "at most".
#[derive(Clone, Debug, Serialize)]
pub struct AckLagReport {
    pub mirror: String,
    pub samples: u64,
    pub p50_ms_at_most: f64,
    pub p99_ms_at_most: f64,
    pub p999_ms_at_most: f64,
}

/// Cumulative bucket counts of the Prometheus histogram `name` in the text
/// exposition `text`, by the value of `label`: value → `[(le, count)]`
/// sorted by `le` (`+Inf` last). Lines that do not parse are skipped.
fn histogram_buckets(text: &str, name: &str, label: &str) -> BTreeMap<String, Vec<(f64, u64)>> {
    let prefix = format!("{name}_bucket{{");
    let mut out: BTreeMap<String, Vec<(f64, u64)>> = BTreeMap::new();
    for line in text.lines() {
        let Some((labels, value)) = line
            .strip_prefix(&prefix)
            .and_then(|rest| rest.rsplit_once("} "))
        else {
            continue;
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        let (mut key, mut le) = (None, None);
        for pair in labels.split(',') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            let v = v.trim_matches('"');
            if k == label {
                key = Some(v.to_owned());
            } else if k == "le" {
                le = if v == "+Inf" {
                    Some(f64::INFINITY)
                } else {
                    v.parse::<f64>().ok()
                };
            }
        }
        if let (Some(key), Some(le)) = (key, le) {
            out.entry(key).or_default().push((le, count as u64));
        }
    }
    for buckets in out.values_mut() {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The upper bound of the bucket holding percentile `p` of cumulative
/// `buckets` (the last bucket's count is the total).
fn bucket_percentile(buckets: &[(f64, u64)], p: f64) -> f64 {
    let total = buckets.last().map_or(0, |b| b.1);
    let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
    buckets
        .iter()
        .find(|(_, c)| *c >= rank)
        .map_or(f64::INFINITY, |(le, _)| *le)
}

/// Per mirror, the samples recorded between two scrapes and their
/// percentiles.
fn ack_lag_between(before: &str, after: &str) -> Vec<AckLagReport> {
    let name = crate::metrics::REPLICATION_ACK_LAG_SECONDS;
    let old = histogram_buckets(before, name, "mirror");
    histogram_buckets(after, name, "mirror")
        .into_iter()
        .filter_map(|(mirror, now)| {
            let was = old.get(&mirror);
            let diff: Vec<(f64, u64)> = now
                .iter()
                .map(|&(le, c)| {
                    let prev = was
                        .and_then(|w| w.iter().find(|(l, _)| *l == le))
                        .map_or(0, |x| x.1);
                    (le, c.saturating_sub(prev))
                })
                .collect();
            let samples = diff.last().map_or(0, |b| b.1);
            (samples > 0).then(|| AckLagReport {
                mirror,
                samples,
                p50_ms_at_most: bucket_percentile(&diff, 50.0) * 1000.0,
                p99_ms_at_most: bucket_percentile(&diff, 99.0) * 1000.0,
                p999_ms_at_most: bucket_percentile(&diff, 99.9) * 1000.0,
            })
        })
        .collect()
}

/// The result of an fdatasync probe.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub mode: &'static str,
    pub dir: PathBuf,
    pub write_bytes: usize,
    /// Appending writes (the file grows): the journal's pattern today.
    pub latency: Percentiles,
    /// Overwrites of a preallocated, synced file.
    pub preallocated: Percentiles,
}

/// Runs `mirrordb bench` with the given arguments.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.fsync_probe {
        let dir = args.data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
        let count = args.probe_count.clamp(1, MAX_PROBE_COUNT);
        let report = tokio::task::spawn_blocking(move || fsync_probe(&dir, count))
            .await
            .context("fsync probe task")??;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_probe(&report);
        }
        return Ok(());
    }
    if args.txn_size == 0 || args.txn_size > crate::model::MAX_TXN_OPS {
        bail!("--txn-size must be 1..={}", crate::model::MAX_TXN_OPS);
    }
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    crate::model::validate_table(&args.table)?;
    let report = if args.in_process {
        run_in_process(&args).await?
    } else {
        run_http(&args).await?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if report.errors > 0 {
        bail!(
            "{} of {} operations failed; first error: {}",
            report.errors,
            report.ops + report.errors,
            report.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

/// Where operations go.
#[derive(Clone)]
enum Target {
    Http(HttpTarget),
    Engine(Engine),
}

/// One client's connection to the target.
enum Conn {
    Http(Box<HttpConn>),
    Engine { engine: Engine, session: SessionId },
}

impl Conn {
    async fn open(target: &Target, client_no: usize) -> anyhow::Result<Conn> {
        Ok(match target {
            Target::Http(target) => {
                Conn::Http(Box::new(HttpConn::new(target.clone(), HTTP_TIMEOUT)))
            }
            Target::Engine(engine) => {
                let session = engine
                    .session(ClientIdentity {
                        token_name: "bench".into(),
                        peer: "in-process".into(),
                        client_session: format!("bench-{client_no}"),
                    })
                    .await
                    .map_err(|e| anyhow!("opening a session: {e}"))?;
                Conn::Engine {
                    engine: engine.clone(),
                    session,
                }
            }
        })
    }

    /// Runs one operation; `Err` is a failed operation (counted, not fatal).
    async fn exec(&mut self, op: &Planned, table: &str) -> Result<(), String> {
        match self {
            Conn::Http(conn) => {
                let record = |k: &str| conn.target().path(&record_path(table, k));
                let (method, path, body) = match op {
                    Planned::Write(k, v) => (Method::PUT, record(k), Some(v.clone().into())),
                    Planned::Read(k) => (Method::GET, record(k), None),
                    Planned::Delete(k) => (Method::DELETE, record(k), None),
                    Planned::Txn(items) => {
                        let ops: Vec<serde_json::Value> = items
                            .iter()
                            .map(|(k, v)| {
                                let value: serde_json::Value =
                                    serde_json::from_slice(v).unwrap_or(serde_json::Value::Null);
                                serde_json::json!({"op": "put", "table": table, "key": k, "value": value})
                            })
                            .collect();
                        let body = serde_json::to_vec(&serde_json::json!({ "ops": ops }))
                            .map_err(|e| e.to_string())?;
                        (
                            Method::POST,
                            conn.target().path("/v1/transactions"),
                            Some(body.into()),
                        )
                    }
                };
                let (status, body) = conn.request(method, &path, body).await?;
                let miss_ok = matches!(op, Planned::Read(_) | Planned::Delete(_))
                    && status == hyper::StatusCode::NOT_FOUND;
                if status.is_success() || miss_ok {
                    Ok(())
                } else {
                    Err(format!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(300)])
                    ))
                }
            }
            Conn::Engine { engine, session } => match op {
                Planned::Write(k, v) => engine
                    .write(
                        *session,
                        vec![WriteOp::Put {
                            table: table.into(),
                            key: k.clone(),
                            value: v.clone(),
                            if_version: None,
                        }],
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Planned::Read(k) => engine
                    .get_async(table, k)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Planned::Delete(k) => engine
                    .write(
                        *session,
                        vec![WriteOp::Delete {
                            table: table.into(),
                            key: k.clone(),
                            if_version: None,
                        }],
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Planned::Txn(items) => engine
                    .write(
                        *session,
                        items
                            .iter()
                            .map(|(k, v)| WriteOp::Put {
                                table: table.into(),
                                key: k.clone(),
                                value: v.clone(),
                                if_version: None,
                            })
                            .collect(),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            },
        }
    }
}

fn record_path(table: &str, key: &str) -> String {
    // Bench keys are `k` + digits: nothing to escape.
    format!("/v1/tables/{table}/records/{key}")
}

/// An operation with its key(s) and value(s) chosen.
enum Planned {
    Write(String, Vec<u8>),
    Read(String),
    Delete(String),
    Txn(Vec<(String, Vec<u8>)>),
}

/// A JSON object of exactly `size` bytes (at least the size of the object
/// without padding, which is about 30 bytes): `{"c":3,"n":17,"pad":"xx…"}`.
pub fn make_value(client: usize, seq: u64, size: usize) -> Vec<u8> {
    make_value_padded(client, seq, size, false)
}

/// [`make_value`], padded with pseudo-random letters and digits when
/// `random` (deterministic: derived from `client` and `seq`).
pub fn make_value_padded(client: usize, seq: u64, size: usize, random: bool) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let head = format!(r#"{{"c":{client},"n":{seq},"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let mut v = Vec::with_capacity(head.len() + pad + 2);
    v.extend_from_slice(head.as_bytes());
    if random {
        // Ten letters from each random u64.
        let mut rng =
            StdRng::seed_from_u64((client as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq);
        while v.len() < head.len() + pad {
            let z: u64 = rng.random();
            for i in 0..10 {
                if v.len() == head.len() + pad {
                    break;
                }
                v.push(ALPHABET[((z >> (i * 6)) & 63) as usize]);
            }
        }
    } else {
        v.resize(head.len() + pad, b'x');
    }
    v.extend_from_slice(b"\"}");
    v
}

fn key_name(n: u64) -> String {
    format!("k{n:010}")
}

/// Samples and counts of one client.
#[derive(Default)]
struct ClientStats {
    samples: BTreeMap<OpKind, Vec<u32>>,
    ops: BTreeMap<OpKind, u64>,
    errors: BTreeMap<OpKind, u64>,
    records_written: u64,
    first_error: Option<String>,
}

/// The shared stop condition.
struct Budget {
    count: Option<u64>,
    start: Instant,
    deadline: Instant,
    /// Operations per second in all, if paced.
    rate: Option<f64>,
    issued: AtomicU64,
    stop: AtomicBool,
}

impl Budget {
    /// Claims one more operation: `None` when the run is over, else when it
    /// is due (`None` inside: at once).
    fn claim(&self) -> Option<Option<Instant>> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let due = self
            .rate
            .map(|r| self.start + Duration::from_secs_f64(n as f64 / r));
        match self.count {
            Some(c) if n >= c => None,
            Some(_) => Some(due),
            None if Instant::now() >= self.deadline => None,
            None if due.is_some_and(|d| d >= self.deadline) => None,
            None => Some(due),
        }
    }
}

/// Threads that run the load clients: one per core, at most one per client.
fn load_threads(clients: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    clients.clamp(1, cores)
}

/// One load thread: its share of the clients as tasks of a runtime of its
/// own, so a client's request, its response and its next request stay on
/// one thread. On a multi-threaded runtime each response woke a second
/// worker to run the task that then sent the next request, a cross-thread
/// wake-up inside the load generator that was counted in every latency
/// sample (a single-threaded client such as `pgbench` pays none).
fn run_load_thread(
    clients: Vec<(usize, Conn)>,
    seed: u64,
    args: Arc<BenchArgs>,
    budget: Arc<Budget>,
    progress: indicatif::ProgressBar,
) -> anyhow::Result<Vec<(usize, ClientStats)>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a load thread's runtime")?;
    runtime.block_on(async move {
        let mut tasks = Vec::with_capacity(clients.len());
        for (i, conn) in clients {
            let task = client_loop(
                conn,
                i,
                seed,
                args.clone(),
                budget.clone(),
                progress.clone(),
            );
            tasks.push((i, tokio::spawn(task)));
        }
        let mut all = Vec::with_capacity(tasks.len());
        for (i, t) in tasks {
            all.push((i, t.await.context("a bench client panicked")?));
        }
        Ok(all)
    })
}

async fn client_loop(
    mut conn: Conn,
    client_no: usize,
    seed: u64,
    args: Arc<BenchArgs>,
    budget: Arc<Budget>,
    progress: indicatif::ProgressBar,
) -> ClientStats {
    let mut rng =
        StdRng::seed_from_u64(seed ^ (client_no as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut stats = ClientStats::default();
    let mut seq = 0u64;
    while let Some(due) = budget.claim() {
        if let Some(due) = due {
            tokio::time::sleep_until(due.into()).await;
        }
        let kind = args.mix.pick(&mut rng);
        let mut key = || key_name(rng.random_range(0..args.keys));
        let op = match kind {
            OpKind::Write => {
                seq += 1;
                Planned::Write(
                    key(),
                    make_value_padded(client_no, seq, args.value_bytes, args.random_values),
                )
            }
            OpKind::Read => Planned::Read(key()),
            OpKind::Delete => Planned::Delete(key()),
            OpKind::Txn => Planned::Txn(
                (0..args.txn_size)
                    .map(|_| {
                        seq += 1;
                        (
                            key(),
                            make_value_padded(client_no, seq, args.value_bytes, args.random_values),
                        )
                    })
                    .collect(),
            ),
        };
        let start = Instant::now();
        let r = conn.exec(&op, &args.table).await;
        let us = u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX);
        match r {
            Ok(()) => {
                *stats.ops.entry(kind).or_default() += 1;
                stats.records_written += match &op {
                    Planned::Write(..) => 1,
                    Planned::Txn(items) => items.len() as u64,
                    _ => 0,
                };
                let s = stats.samples.entry(kind).or_default();
                if s.len() < MAX_SAMPLES_PER_CLIENT {
                    s.push(us);
                }
            }
            Err(e) => {
                *stats.errors.entry(kind).or_default() += 1;
                if stats.first_error.is_none() {
                    stats.first_error = Some(format!("{kind}: {e}"));
                }
                // A dead target fails fast; don't spin through the budget
                // producing nothing but errors.
                if stats.errors.values().sum::<u64>() >= 1000 {
                    budget.stop.store(true, Ordering::Relaxed);
                }
            }
        }
        progress.inc(1);
    }
    stats
}

async fn drive(
    target: Target,
    args: &BenchArgs,
    mode: &'static str,
    target_name: String,
) -> anyhow::Result<BenchReport> {
    let seed = args.seed.unwrap_or_else(rand::random);
    if !args.json {
        eprintln!(
            "mirrordb bench: {mode} {target_name}, {} clients, {}-byte values, mix {}, {} keys, seed {seed}",
            args.clients, args.value_bytes, args.mix, args.keys
        );
    }
    let duration = args.duration.unwrap_or(Duration::from_secs(10));
    let mut conns = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        conns.push(Conn::open(&target, i).await?);
    }
    let progress = match args.count {
        Some(c) if !args.json => indicatif::ProgressBar::new(c),
        None if !args.json => indicatif::ProgressBar::new_spinner(),
        _ => indicatif::ProgressBar::hidden(),
    };
    let shared = Arc::new(args.clone());
    let start = Instant::now();
    let budget = Arc::new(Budget {
        count: args.count,
        start,
        deadline: start + duration,
        rate: args.rate,
        issued: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let threads = load_threads(args.clients);
    let mut groups: Vec<Vec<(usize, Conn)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, conn) in conns.into_iter().enumerate() {
        groups[i % threads].push((i, conn));
    }
    let mut handles = Vec::with_capacity(threads);
    for (t, group) in groups.into_iter().enumerate() {
        let (args, budget, progress) = (shared.clone(), budget.clone(), progress.clone());
        let handle = std::thread::Builder::new()
            .name(format!("mirrordb-load-{t}"))
            .spawn(move || run_load_thread(group, seed, args, budget, progress))
            .context("starting a load thread")?;
        handles.push(handle);
    }
    let mut all = tokio::task::spawn_blocking(move || {
        let mut all = Vec::with_capacity(handles.len());
        for h in handles {
            match h.join() {
                Ok(stats) => all.extend(stats?),
                Err(_) => bail!("a bench load thread panicked"),
            }
        }
        all.sort_by_key(|(i, _)| *i);
        Ok(all.into_iter().map(|(_, s)| s).collect::<Vec<_>>())
    })
    .await
    .context("the load threads' joiner")??;
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    progress.finish_and_clear();

    let mut kinds = BTreeMap::new();
    let mut first_error = None;
    let mut records_written = 0;
    for kind in OpKind::ALL {
        let mut samples: Vec<u32> = Vec::new();
        let (mut ops, mut errors) = (0u64, 0u64);
        for s in &mut all {
            if let Some(v) = s.samples.remove(&kind) {
                samples.extend(v);
            }
            ops += s.ops.get(&kind).copied().unwrap_or(0);
            errors += s.errors.get(&kind).copied().unwrap_or(0);
        }
        if ops + errors == 0 {
            continue;
        }
        kinds.insert(
            kind,
            KindReport {
                ops,
                errors,
                ops_per_s: ops as f64 / elapsed,
                latency: Percentiles::from_samples(&mut samples),
            },
        );
    }
    for s in &mut all {
        records_written += s.records_written;
        if first_error.is_none() {
            first_error = s.first_error.take();
        }
    }
    let ops: u64 = kinds.values().map(|k| k.ops).sum();
    let errors: u64 = kinds.values().map(|k| k.errors).sum();
    Ok(BenchReport {
        mode,
        target: target_name,
        clients: args.clients,
        value_bytes: args.value_bytes,
        mix: args.mix.to_string(),
        keys: args.keys,
        seed,
        elapsed_s: elapsed,
        ops,
        errors,
        ops_per_s: ops as f64 / elapsed,
        records_written_per_s: records_written as f64 / elapsed,
        kinds,
        first_error,
        recovery: None,
        replication: Vec::new(),
    })
}

async fn run_http(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let base = args.url.trim_end_matches('/').to_string();
    let http = HttpTarget::parse(&base, args.token.as_deref()).map_err(|e| anyhow!(e))?;
    // Fail early and clearly when nothing listens.
    let mut probe = HttpConn::new(http.clone(), Duration::from_secs(5));
    probe
        .request(Method::GET, &http.path("/health"), None)
        .await
        .map_err(|e| anyhow!("cannot reach {base}/health: is `mirrordb serve` running? {e}"))?;
    let mut scrape = async || match probe
        .request(Method::GET, &http.path("/metrics"), None)
        .await
    {
        Ok((status, body)) if status.is_success() => String::from_utf8_lossy(&body).into_owned(),
        _ => String::new(),
    };
    let before = scrape().await;
    let mut report = drive(Target::Http(http.clone()), args, "http", base.clone()).await?;
    report.replication = ack_lag_between(&before, &scrape().await);
    Ok(report)
}

async fn run_in_process(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let dir = args
        .data_dir
        .clone()
        .ok_or_else(|| anyhow!("--in-process needs --data-dir"))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cfg = EngineConfig::new(&dir);
    cfg.node_name = "bench".into();
    if let Some(f) = args.flush_interval {
        cfg.flush_interval = f;
    }
    if let Some(d) = args.dirty_bytes_max {
        cfg.dirty_bytes_max = d;
    }
    cfg.preallocate = !args.no_preallocate;
    let open_start = Instant::now();
    let engine = tokio::task::spawn_blocking(move || Engine::open(cfg))
        .await
        .context("engine open task")?
        .map_err(|e| anyhow!("opening the engine on {}: {e}", dir.display()))?;
    let open_s = open_start.elapsed().as_secs_f64();
    let rec = engine.recovery().clone();
    let entries_per_s = if rec.replay_ms > 0 {
        rec.replayed_entries as f64 * 1000.0 / rec.replay_ms as f64
    } else {
        0.0
    };
    let mut recovery = serde_json::to_value(&rec)?;
    if let Some(o) = recovery.as_object_mut() {
        o.insert("open_s".into(), open_s.into());
        o.insert("replay_entries_per_s".into(), entries_per_s.into());
    }
    if !args.json {
        eprintln!(
            "engine opened in {open_s:.3} s: replayed {} entries in {} ms ({entries_per_s:.0} entries/s)",
            rec.replayed_entries, rec.replay_ms
        );
    }
    let target_name = engine.journal_dir().display().to_string();
    let result = if args.count == Some(0) {
        None
    } else {
        Some(
            drive(
                Target::Engine(engine.clone()),
                args,
                "in_process",
                target_name.clone(),
            )
            .await,
        )
    };
    if args.exit_without_shutdown {
        // Leave as a crash would: the journal is durable, the data file may
        // lag it; the next open replays the difference.
        if let Some(Ok(mut report)) = result {
            report.recovery = Some(recovery);
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            std::io::stdout().flush()?;
        }
        std::process::exit(0);
    }
    engine
        .shutdown()
        .await
        .map_err(|e| anyhow!("engine shutdown: {e}"))?;
    match result {
        Some(r) => {
            let mut report = r?;
            report.recovery = Some(recovery);
            Ok(report)
        }
        None => Ok(BenchReport {
            mode: "in_process",
            target: target_name,
            clients: 0,
            value_bytes: args.value_bytes,
            mix: args.mix.to_string(),
            keys: args.keys,
            seed: 0,
            elapsed_s: 0.0,
            ops: 0,
            errors: 0,
            ops_per_s: 0.0,
            records_written_per_s: 0.0,
            kinds: BTreeMap::new(),
            first_error: None,
            recovery: Some(recovery),
            replication: Vec::new(),
        }),
    }
}

/// Measures fdatasync on a scratch file in `dir`, `count` times each way,
/// then removes the file:
///
/// - **append**: write 4 KiB at the end of the file, then fdatasync (the
///   file grows, so the filesystem also commits the new size and blocks;
///   this is what an append-only journal without preallocation pays);
/// - **preallocated**: the same writes over a file that was written full of
///   zeros and synced first (only data goes to the disk; the floor for a
///   journal that preallocates its segments).
pub fn fsync_probe(dir: &Path, count: usize) -> anyhow::Result<ProbeReport> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!(".mirrordb-fsync-probe-{}", std::process::id()));
    let run = |preallocate: bool| -> anyhow::Result<Vec<u32>> {
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        if preallocate {
            let zeros = vec![0u8; PROBE_WRITE_BYTES];
            for _ in 0..count {
                f.write_all(&zeros)?;
            }
            f.sync_all()?;
            f.seek(std::io::SeekFrom::Start(0))?;
        }
        let block = vec![0xA5u8; PROBE_WRITE_BYTES];
        let mut samples = Vec::with_capacity(count);
        for _ in 0..count {
            let start = Instant::now();
            f.write_all(&block)?;
            f.sync_data()?;
            samples.push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
        }
        Ok(samples)
    };
    let append = run(false);
    let _ = std::fs::remove_file(&path);
    let preallocated = append.and_then(|a| Ok((a, run(true)?)));
    let _ = std::fs::remove_file(&path);
    let (mut append, mut preallocated) = preallocated?;
    Ok(ProbeReport {
        mode: "fsync_probe",
        dir: dir.to_owned(),
        write_bytes: PROBE_WRITE_BYTES,
        latency: Percentiles::from_samples(&mut append),
        preallocated: Percentiles::from_samples(&mut preallocated),
    })
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn print_probe(r: &ProbeReport) {
    println!(
        "fdatasync probe on {} ({} x {} B write + fdatasync, each way)",
        r.dir.display(),
        r.latency.samples,
        r.write_bytes
    );
    for (name, l) in [("append", &r.latency), ("preallocated", &r.preallocated)] {
        println!(
            "{name:<13} latency ms: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.3}",
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us),
            l.mean_us / 1000.0
        );
    }
}

fn print_report(r: &BenchReport) {
    println!(
        "{} ops in {:.2} s: {:.0} ops/s, {:.0} records written/s, {} errors (seed {})",
        r.ops, r.elapsed_s, r.ops_per_s, r.records_written_per_s, r.errors, r.seed
    );
    println!(
        "{:<7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}  (latency in ms)",
        "kind", "ops", "ops/s", "p50", "p90", "p99", "p99.9", "max"
    );
    for (k, v) in &r.kinds {
        let l = &v.latency;
        println!(
            "{:<7} {:>10} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9}",
            k.name(),
            v.ops,
            v.ops_per_s,
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us)
        );
    }
    for m in &r.replication {
        let at_most = |v: f64| {
            if v.is_finite() {
                format!("≤ {v} ms")
            } else {
                "> 10 s".to_owned()
            }
        };
        println!(
            "replication to {}: {} group commits acknowledged; primary fsync → mirror fsync acknowledged: p50 {}, p99 {}, p99.9 {}",
            m.mirror,
            m.samples,
            at_most(m.p50_ms_at_most),
            at_most(m.p99_ms_at_most),
            at_most(m.p999_ms_at_most)
        );
    }
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut v = vec!["bench"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.bench)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let a = parse(&[]).expect("defaults parse");
        assert_eq!(a.url, "http://127.0.0.1:7070");
        assert_eq!(a.clients, 32);
        assert_eq!(a.value_bytes, 256);
        assert_eq!(a.mix, Mix::parse("write=100").expect("mix"));
        assert_eq!(a.count, None);
        assert!(!a.in_process && !a.fsync_probe && !a.json);
    }

    #[test]
    fn arguments_are_checked() {
        let a = parse(&[
            "--clients",
            "4",
            "--count",
            "1000",
            "--mix",
            "write=80,read=20",
            "--value-bytes",
            "1024",
            "--json",
        ])
        .expect("parse");
        assert_eq!((a.clients, a.count, a.value_bytes), (4, Some(1000), 1024));
        assert_eq!(a.mix.kinds(), vec![OpKind::Write, OpKind::Read]);
        assert!(parse(&["--clients", "0"]).is_err());
        assert!(parse(&["--count", "5", "--duration", "5s"]).is_err());
        assert!(parse(&["--in-process"]).is_err(), "needs --data-dir");
        assert!(parse(&["--in-process", "--data-dir", "d"]).is_ok());
        assert!(parse(&["--fsync-probe", "--in-process", "--data-dir", "d"]).is_err());
        assert!(parse(&["--value-bytes", "0"]).is_err());
        assert!(parse(&["--exit-without-shutdown"]).is_err());
        let a = parse(&["--duration", "2m"]).expect("parse");
        assert_eq!(a.duration, Some(Duration::from_secs(120)));
    }

    #[test]
    fn mixes_parse_and_reject_nonsense() {
        let m = Mix::parse("write=80, read=20").expect("mix");
        assert_eq!(m.total, 100);
        assert_eq!(m.to_string(), "write=80,read=20");
        assert_eq!(
            Mix::parse("txn=1,delete=3").expect("mix").kinds(),
            vec![OpKind::Delete, OpKind::Txn]
        );
        assert!(Mix::parse("").is_err());
        assert!(Mix::parse("write=0").is_err());
        assert!(Mix::parse("write").is_err());
        assert!(Mix::parse("scan=10").is_err());
        assert!(Mix::parse("write=10,write=5").is_err());
        assert!(Mix::parse("write=-1").is_err());
        assert!(Mix::parse("write=1.5").is_err());
        // A zero weight is allowed next to others and simply drops out.
        assert_eq!(
            Mix::parse("write=1,read=0").expect("mix").kinds(),
            vec![OpKind::Write]
        );
    }

    #[test]
    fn mix_picks_follow_the_weights_exactly() {
        let m = Mix::parse("write=80,read=20").expect("mix");
        let picks: Vec<OpKind> = (0..100).map(|x| m.pick_at(x)).collect();
        assert_eq!(picks.iter().filter(|k| **k == OpKind::Write).count(), 80);
        assert_eq!(picks.iter().filter(|k| **k == OpKind::Read).count(), 20);
        let mut rng = StdRng::seed_from_u64(7);
        let single = Mix::parse("txn=3").expect("mix");
        assert!((0..1000).all(|_| single.pick(&mut rng) == OpKind::Txn));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10d").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut v: Vec<u32> = (1..=1000).rev().collect();
        let p = Percentiles::from_samples(&mut v);
        assert_eq!(p.samples, 1000);
        assert_eq!(p.p50_us, 500);
        assert_eq!(p.p90_us, 900);
        assert_eq!(p.p99_us, 990);
        assert_eq!(p.p999_us, 999);
        assert_eq!(p.max_us, 1000);
        assert!((p.mean_us - 500.5).abs() < 1e-9);

        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 0.1), 7);
        assert_eq!(percentile(&[7], 100.0), 7);
        // Two samples: the median is the lower one, p99 the upper one.
        assert_eq!(percentile(&[1, 9], 50.0), 1);
        assert_eq!(percentile(&[1, 9], 99.0), 9);
        let mut ten: Vec<u32> = (1..=10).collect();
        let p = Percentiles::from_samples(&mut ten);
        assert_eq!((p.p50_us, p.p90_us, p.p99_us, p.max_us), (5, 9, 10, 10));
        let empty = Percentiles::from_samples(&mut []);
        assert_eq!(empty, Percentiles::default());
    }

    #[test]
    fn values_are_json_of_the_exact_size() {
        for size in [30usize, 64, 256, 1000, 4096] {
            let v = make_value(31, 123_456, size);
            assert_eq!(v.len(), size, "size {size}");
            crate::model::validate_json(&v).expect("valid JSON");
        }
        // Below the minimum the object is just unpadded.
        let v = make_value(1, 1, 2);
        crate::model::validate_json(&v).expect("valid JSON");
        for size in [30usize, 64, 256, 4096] {
            let v = make_value_padded(7, 99, size, true);
            assert_eq!(v.len(), size, "size {size}");
            crate::model::validate_json(&v).expect("valid JSON");
            assert_eq!(v, make_value_padded(7, 99, size, true), "deterministic");
        }
        let a = make_value_padded(1, 1, 4096, true);
        let b = make_value_padded(1, 2, 4096, true);
        assert_ne!(a, b);
        let distinct = a.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(
            distinct > 50,
            "random padding uses the alphabet: {distinct}"
        );
    }

    #[test]
    fn budget_by_count_hands_out_exactly_count() {
        let b = Budget {
            count: Some(5),
            start: Instant::now(),
            deadline: Instant::now(),
            rate: None,
            issued: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        };
        assert_eq!((0..10).filter(|_| b.claim().is_some()).count(), 5);
    }

    #[test]
    fn a_paced_budget_spaces_due_times_by_the_rate() {
        let start = Instant::now();
        let b = Budget {
            count: None,
            start,
            deadline: start + Duration::from_secs(1),
            rate: Some(4.0),
            issued: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        };
        let dues: Vec<Duration> = std::iter::from_fn(|| b.claim())
            .map(|d| d.expect("paced") - start)
            .collect();
        let ms: Vec<u128> = dues.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            vec![0, 250, 500, 750],
            "one second at 4/s, none due past the deadline"
        );
    }

    #[test]
    fn fsync_probe_measures_and_cleans_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let r = fsync_probe(tmp.path(), 5).expect("probe");
        assert_eq!(r.latency.samples, 5);
        assert_eq!(r.preallocated.samples, 5);
        assert!(r.latency.p50_us <= r.latency.max_us);
        assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 0);
    }

    /// 200 operations of every kind by 4 clients over 50 keys.
    const MIXED_LOAD: &[&str] = &[
        "--clients",
        "4",
        "--count",
        "200",
        "--mix",
        "write=5,read=3,delete=1,txn=1",
        "--keys",
        "50",
        "--json",
    ];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_process_run_writes_reads_and_transacts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_str().expect("utf-8");
        let a = parse(
            &[
                &["--in-process", "--data-dir", dir, "--seed", "42"],
                MIXED_LOAD,
            ]
            .concat(),
        )
        .expect("parse");
        let r = run_in_process(&a).await.expect("bench run");
        assert_eq!(r.ops + r.errors, 200);
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        assert_eq!(r.seed, 42);
        assert!(r.kinds.contains_key(&OpKind::Write));
        // Reopening finds the data: a clean shutdown leaves nothing to replay.
        let again = parse(&["--in-process", "--data-dir", dir, "--count", "0"]).expect("parse");
        let r = run_in_process(&again).await.expect("reopen");
        assert_eq!(r.ops, 0);
        assert!(r.recovery.is_some());
    }

    /// The HTTP client against a real node, over TCP and over the node's
    /// Unix socket: every kind of operation succeeds through the API with a
    /// bearer token, and the wrong token is counted as failed operations,
    /// not a crash. The socket file goes away with the node.
    #[tokio::test]
    async fn http_run_writes_reads_and_transacts_against_a_node() {
        use crate::config::{Config, Role, TokenConfig};
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.node.name = "bench-test".into();
        config.node.data_dir = tmp.path().to_owned();
        config.node.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.api.tokens = vec![TokenConfig {
            name: "bencher".into(),
            token: "bench-token-0123456789".into(),
            role: Role::Write,
        }];
        let socket = tmp.path().join("api.sock");
        config.api.unix_socket = Some(socket.clone());
        config.validate().expect("valid config");
        let engine = crate::serve::open_engine(crate::serve::engine_config(&config))
            .await
            .expect("engine opens");
        let server = crate::serve::start(&config, engine)
            .await
            .expect("server starts");
        let unix = format!("unix:{}", socket.display());
        for url in [server.base_url(), unix] {
            let bench = |token: &'static str| {
                parse(
                    &[
                        &["--url", &url, "--token", token, "--seed", "7"],
                        MIXED_LOAD,
                    ]
                    .concat(),
                )
                .expect("parse")
            };
            let r = run_http(&bench("bench-token-0123456789"))
                .await
                .expect("bench run");
            assert_eq!(r.ops + r.errors, 200, "{url}");
            assert_eq!(r.errors, 0, "{url}: {:?}", r.first_error);
            assert_eq!(r.kinds.len(), 4, "{:?}", r.kinds.keys().collect::<Vec<_>>());
            assert_eq!(r.target, url);

            let r = run_http(&bench("wrong-token-0123456789"))
                .await
                .expect("bench run");
            assert_eq!(r.ops, 0, "{url}");
            assert_eq!(r.errors, 200, "{url}");
            let e = r.first_error.unwrap_or_default();
            assert!(e.contains("401"), "{url}: {e}");
        }
        let written = server
            .engine()
            .scan("bench", "", None, 1_000)
            .expect("scan")
            .records
            .len();
        assert!(written > 0, "the writes did not reach the node");
        assert!(socket.exists());
        server.shutdown().await.expect("clean shutdown");
        assert!(!socket.exists(), "the Unix socket outlived the node");
    }

    #[test]
    fn ack_lag_percentiles_come_from_the_histogram_difference() {
        let scrape = |n1: [u64; 4], n3: [u64; 4]| {
            let mut t = String::from("# HELP x\nmirrordb_fsync_seconds_bucket{le=\"0.001\"} 7\n");
            for (m, c) in [("n1", n1), ("n3", n3)] {
                for (le, v) in ["0.001", "0.005", "0.01", "+Inf"].iter().zip(c) {
                    t.push_str(&format!(
                        "mirrordb_replication_ack_lag_seconds_bucket{{mirror=\"{m}\",le=\"{le}\"}} {v}\n"
                    ));
                }
            }
            t
        };
        let before = scrape([10, 10, 10, 10], [0, 0, 0, 0]);
        // n1: 100 new samples, 90 ≤ 1 ms, 99 ≤ 5 ms, all ≤ 10 ms.
        // n3: 1 sample above 10 ms. n1's old samples do not count.
        let after = scrape([100, 109, 110, 110], [0, 0, 0, 1]);
        let r = ack_lag_between(&before, &after);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].mirror.as_str(), r[0].samples), ("n1", 100));
        assert_eq!(r[0].p50_ms_at_most, 1.0);
        assert_eq!(r[0].p99_ms_at_most, 5.0);
        assert_eq!(r[0].p999_ms_at_most, 10.0);
        assert_eq!((r[1].mirror.as_str(), r[1].samples), ("n3", 1));
        assert!(r[1].p99_ms_at_most.is_infinite());
        assert!(ack_lag_between("", "garbage{le=\"x\"} y\n").is_empty());
    }
}
