//! `mirrordb demo` and `mirrordb drill`: a three-node cluster on loopback,
//! run as child processes of this very binary, whose primary is killed with
//! SIGKILL under write load. `demo` runs one round and tells a person what
//! happens; `drill` runs many and measures failover time and
//! acknowledged-write loss (issue 5's benchmark).
//!
//! ```text
//! Harness::start   cluster::init::run (CA, certs, nX.toml; free loopback ports)
//!                  ─► 3 × `mirrordb serve --config DIR/certs/nX.toml` (logs DIR/nX.log)
//!                  ─► poll GET /v1/cluster: one primary, two streaming mirrors
//! round            writers: unique keys to the primary, every acknowledged
//!                  (key, value, lsn) recorded; a refusal or error ─► new key
//!                  ─► SIGKILL the primary (t0)
//!                  ─► first write acknowledged by another node = failover time
//!                  ─► ~1 s more writes ─► stop ─► scan the new primary: every
//!                     acknowledged write present with its value and LSN
//!                  ─► restart the killed node ─► role mirror, applied LSN ≥ the
//!                     primary's, holds every acknowledged write = rejoin time
//! ```
//!
//! The harness owns its children: they are killed on every exit path
//! (normal end, error, Ctrl-C or SIGTERM, and a panic through
//! `kill_on_drop`). The directory is removed at the end unless `--keep` is
//! given or a round failed (then its logs are kept and their path printed).

use crate::cluster::config::{CommitPolicy, OnUnavailable};
use crate::cluster::init::{InitArgs, run as cluster_init};
use anyhow::{Context, anyhow, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The members of the cluster the harness runs.
const NODE_IDS: [&str; 3] = ["n1", "n2", "n3"];
/// Table the writers write to.
const TABLE: &str = "drill";
/// How long the cluster may take to form (a debug build on 2 cores is slow).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a round waits for a write acknowledged by a new primary.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a restarted node may take to rejoin and catch up.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of one write.
const WRITE_HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one status or scan request.
const STATUS_HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of a scan page.
const SCAN_HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the nodes' `/v1/cluster` is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Pause of a writer after a refused or failed write.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Writes run this long (ms, drawn from the seeded range) before the kill.
const WARMUP_MS: std::ops::Range<u64> = 1000..2000;
/// Writes go on this long after the first acknowledgement by the new primary.
const AFTER_FAILOVER: Duration = Duration::from_secs(1);
/// Records per scan page (the API's limit).
const SCAN_PAGE: usize = 10_000;
/// Most acknowledged writes kept for checking (a memory limit).
const MAX_ACKED: usize = 5_000_000;
/// Most drills one run may ask for.
const MAX_DRILLS: u32 = 1000;
/// Lines of a node's log shown when it dies unexpectedly.
const LOG_TAIL_LINES: usize = 15;
/// How long cleanup waits for a killed child to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Targets of issue 5's benchmark.
pub const TARGET_MEDIAN_MS: u64 = 2000;
pub const TARGET_MAX_MS: u64 = 3000;

/// What `demo` and `drill` share.
#[derive(Debug, Clone, clap::Args)]
pub struct HarnessArgs {
    /// Directory for certificates, data and logs; must be empty or absent
    /// (default: a new directory under the system's temporary directory).
    /// Removed at the end unless --keep.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the directory (data, certificates, node logs) at the end.
    #[arg(long)]
    pub keep: bool,
    /// `async`, `quorum:K` or `remote_apply:K` (K ≤ 2).
    #[arg(long, default_value = "quorum:1")]
    pub commit_policy: CommitPolicy,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub writers: u32,
    /// Seed of the moments of the kills (random if absent; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// `RUST_LOG` of the nodes, whose logs go to DIR/nX.log.
    #[arg(long, default_value = "info")]
    pub node_log: String,
}

/// `mirrordb drill`.
#[derive(Debug, Clone, clap::Args)]
pub struct DrillArgs {
    #[command(flatten)]
    pub harness: HarnessArgs,
    /// Number of drills (kill the primary, measure, rejoin).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_DRILLS)))]
    pub count: u32,
    /// Print one JSON document (per-drill figures and the summary) on
    /// stdout; progress goes to stderr.
    #[arg(long)]
    pub json: bool,
}

/// `mirrordb demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub harness: HarnessArgs,
}

// ---------------------------------------------------------------------------
// Statistics

/// Failover times of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub count: usize,
    pub min_ms: u64,
    /// The middle value; the mean of the two middle values for an even count.
    pub median_ms: u64,
    /// Nearest rank: the smallest value at or above 90% of the values.
    pub p90_ms: u64,
    pub max_ms: u64,
}

impl Stats {
    /// `None` for no values.
    pub fn of(values: &[u64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_unstable();
        let n = v.len();
        let median_ms = if n % 2 == 1 {
            v[n / 2]
        } else {
            // No overflow: the mean of two u64 without adding them.
            v[n / 2 - 1] / 2 + v[n / 2] / 2 + (v[n / 2 - 1] % 2 + v[n / 2] % 2) / 2
        };
        // Rank ceil(0.9 n), 1-based.
        let rank = (n * 9).div_ceil(10).max(1);
        Some(Stats {
            count: n,
            min_ms: v[0],
            median_ms,
            p90_ms: v[rank - 1],
            max_ms: v[n - 1],
        })
    }
}

/// Whether a run met its targets.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub median_met: bool,
    pub max_met: bool,
    /// `None` in `async` mode, which may lose acknowledged writes by design.
    pub no_loss: Option<bool>,
    /// Every drill ended with a failover and a rejoin.
    pub all_completed: bool,
}

/// The summary of a drill run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub drills: usize,
    pub completed: usize,
    pub failover: Option<Stats>,
    pub rejoin: Option<Stats>,
    pub acked: u64,
    pub lost: u64,
    pub rejoin_missing: u64,
    pub verdict: Verdict,
}

/// Computes the summary of `drills` under `policy`.
pub fn summarize(drills: &[DrillReport], policy: CommitPolicy) -> Summary {
    let failovers: Vec<u64> = drills.iter().filter_map(|d| d.failover_ms).collect();
    let rejoins: Vec<u64> = drills.iter().filter_map(|d| d.rejoin_ms).collect();
    let failover = Stats::of(&failovers);
    let lost: u64 = drills.iter().map(|d| d.lost).sum();
    let completed = drills
        .iter()
        .filter(|d| d.failover_ms.is_some() && d.rejoin_ms.is_some())
        .count();
    Summary {
        drills: drills.len(),
        completed,
        rejoin: Stats::of(&rejoins),
        acked: drills.last().map_or(0, |d| d.acked_total),
        lost,
        rejoin_missing: drills.iter().map(|d| d.rejoin_missing).sum(),
        verdict: Verdict {
            median_met: failover
                .as_ref()
                .is_some_and(|s| s.median_ms <= TARGET_MEDIAN_MS),
            max_met: failover.as_ref().is_some_and(|s| s.max_ms <= TARGET_MAX_MS),
            no_loss: (policy.mirrors_needed() > 0).then_some(lost == 0),
            all_completed: completed == drills.len(),
        },
        failover,
    }
}

// ---------------------------------------------------------------------------
// Child processes

/// One member: its files and, while it runs, its process.
struct Node {
    id: String,
    config: PathBuf,
    /// HTTP base URL, as the cluster names it in `Location` headers.
    http: String,
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Node {
    fn spawn(&mut self, exe: &Path, node_log: &str) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = log.try_clone().context("duplicating the log file")?;
        let child = tokio::process::Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", node_log)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} serve for {}", exe.display(), self.id))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL and reap.
    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(REAP_TIMEOUT, c.wait()).await;
        }
    }

    /// An error if the process ended by itself (with its log's tail).
    fn check_alive(&mut self) -> anyhow::Result<()> {
        let Some(c) = self.child.as_mut() else {
            return Ok(());
        };
        if let Ok(Some(status)) = c.try_wait() {
            self.child = None;
            bail!(
                "node {} exited by itself ({status}); last lines of {}:\n{}",
                self.id,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }
}

fn log_tail(path: &Path) -> String {
    let Ok(f) = std::fs::File::open(path) else {
        return "(no log)".into();
    };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[from..].join("\n")
}

/// Free loopback ports: `n` for UDP (QUIC) and `n` for TCP (HTTP), all
/// held open together so none repeats, then released.
fn free_ports(n: usize) -> std::io::Result<(Vec<u16>, Vec<u16>)> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for _ in 0..n {
        udp.push(std::net::UdpSocket::bind("127.0.0.1:0")?);
        tcp.push(std::net::TcpListener::bind("127.0.0.1:0")?);
    }
    let u = udp
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let t = tcp
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((u, t))
}

// ---------------------------------------------------------------------------
// The nodes' view

#[derive(Clone, Debug, Deserialize)]
struct NodeView {
    role: String,
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    last_lsn: u64,
    #[serde(default)]
    applied_lsn: u64,
    #[serde(default)]
    primary: Option<String>,
    #[serde(default)]
    commit_degraded: bool,
    #[serde(default)]
    following: Option<FollowView>,
    #[serde(default)]
    failover: Option<FailoverView>,
}

#[derive(Clone, Debug, Deserialize)]
struct FollowView {
    #[serde(default)]
    primary: Option<String>,
    #[serde(default)]
    streaming: bool,
}

#[derive(Clone, Debug, Deserialize)]
struct FailoverView {
    #[serde(default)]
    last_failover: Option<LastFailover>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
struct LastFailover {
    from: Option<String>,
    to: String,
    epoch: u64,
    duration_ms: u64,
}

async fn view(client: &reqwest::Client, base: &str) -> Option<NodeView> {
    let r = client
        .get(format!("{base}/v1/cluster"))
        .timeout(STATUS_HTTP_TIMEOUT)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// The node that says it is primary (the highest epoch if several do).
fn primary_of(views: &[Option<NodeView>]) -> Option<(usize, u64)> {
    views
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.as_ref().map(|v| (i, v)))
        .filter(|(_, v)| v.role == "primary")
        .max_by_key(|(_, v)| v.epoch)
        .map(|(i, v)| (i, v.epoch))
}

async fn views(client: &reqwest::Client, urls: &[String]) -> Vec<Option<NodeView>> {
    futures::future::join_all(urls.iter().map(|u| view(client, u))).await
}

// ---------------------------------------------------------------------------
// Writers

/// One acknowledged write.
#[derive(Clone, Debug)]
struct Ack {
    key: String,
    value: serde_json::Value,
    lsn: u64,
    node: usize,
    at: Instant,
}

#[derive(Clone, Copy, Debug, Default)]
struct WriterStats {
    refused: u64,
    failed: u64,
}

/// Follows the primary: polls every node's `/v1/cluster` and publishes the
/// one that says it is primary.
fn spawn_router(
    client: reqwest::Client,
    urls: Arc<Vec<String>>,
    start: Option<usize>,
) -> (watch::Receiver<Option<usize>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(start);
    let task = tokio::spawn(async move {
        loop {
            let vs = views(&client, &urls).await;
            if let Some((i, _)) = primary_of(&vs) {
                tx.send_if_modified(|cur| {
                    let changed = *cur != Some(i);
                    *cur = Some(i);
                    changed
                });
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    });
    (rx, task)
}

struct WriterCtx {
    client: reqwest::Client,
    urls: Arc<Vec<String>>,
    target: watch::Receiver<Option<usize>>,
    stop: watch::Receiver<bool>,
    acks: mpsc::UnboundedSender<Ack>,
    round: u32,
    writer: u32,
}

/// Writes unique keys until told to stop. A refused or failed write is
/// never retried under its key (it may or may not have landed): the next
/// attempt takes a new key. A 307 sends the next attempt to `Location`.
async fn writer(ctx: WriterCtx) -> WriterStats {
    let mut stats = WriterStats::default();
    let mut seq: u64 = 0;
    let mut redirect: Option<usize> = None;
    loop {
        if *ctx.stop.borrow() {
            return stats;
        }
        let Some(node) = redirect.take().or(*ctx.target.borrow()) else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        seq += 1;
        let key = format!("r{:04}-w{:02}-{seq:09}", ctx.round, ctx.writer);
        let value = serde_json::json!({"round": ctx.round, "writer": ctx.writer, "seq": seq});
        let url = format!("{}/v1/tables/{TABLE}/records/{key}", ctx.urls[node]);
        let sent = ctx
            .client
            .put(&url)
            .timeout(WRITE_HTTP_TIMEOUT)
            .json(&value)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                #[derive(Deserialize)]
                struct Answer {
                    lsn: u64,
                }
                match r.json::<Answer>().await {
                    Ok(a) => {
                        let ack = Ack {
                            key,
                            value,
                            lsn: a.lsn,
                            node,
                            at: Instant::now(),
                        };
                        if ctx.acks.send(ack).is_err() {
                            return stats;
                        }
                    }
                    // Not an acknowledgement we can check: count it failed.
                    Err(_) => stats.failed += 1,
                }
            }
            Ok(r) if r.status() == reqwest::StatusCode::TEMPORARY_REDIRECT => {
                stats.refused += 1;
                redirect = r
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| ctx.urls.iter().position(|u| l.starts_with(u.as_str())))
                    .filter(|&i| i != node);
                if redirect.is_none() {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
            Ok(_) => {
                stats.refused += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(_) => {
                stats.failed += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The harness

/// What one round measured.
#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    pub drill: u32,
    pub killed: String,
    pub killed_epoch: u64,
    pub new_primary: Option<String>,
    /// SIGKILL of the primary to the first write acknowledged by another node.
    pub failover_ms: Option<u64>,
    /// The cluster's own figure (`last_failover.duration_ms` of `/v1/cluster`).
    pub cluster_failover_ms: Option<u64>,
    /// Writes acknowledged in this round, before the kill, and since the
    /// start of the run.
    pub acked: u64,
    pub acked_before_kill: u64,
    pub acked_total: u64,
    /// Writes refused (`not_primary`, `write_blocked`, …) or failed (no
    /// answer) in this round; never counted as acknowledged.
    pub refused: u64,
    pub failed: u64,
    /// Acknowledged writes (of every round so far) missing on the new
    /// primary or holding another value or version; counted once each.
    pub lost: u64,
    /// Examples of lost keys (at most 10).
    pub lost_keys: Vec<String>,
    /// Restart of the killed node to its rejoin as a caught-up mirror.
    pub rejoin_ms: Option<u64>,
    /// Acknowledged writes missing on the rejoined node, other than those
    /// already counted lost.
    pub rejoin_missing: u64,
    pub commit_degraded: bool,
    /// Why the round did not complete.
    pub error: Option<String>,
}

/// How the harness speaks: `demo` narrates on stdout; `drill` prints its
/// progress on stderr only when asked.
struct Out {
    start: Instant,
    narrate: bool,
}

impl Out {
    fn step(&self, msg: &str) {
        if self.narrate {
            let t = self.start.elapsed().as_secs_f64();
            println!("[{t:6.1}s] {msg}");
        }
    }
}

struct Harness {
    dir: PathBuf,
    /// Remove `dir` when dropped.
    remove: bool,
    exe: PathBuf,
    node_log: String,
    policy: CommitPolicy,
    writers: u32,
    nodes: Vec<Node>,
    urls: Arc<Vec<String>>,
    client: reqwest::Client,
    /// Every acknowledged write so far, by key.
    acked: BTreeMap<String, Ack>,
    /// Keys already counted lost.
    lost: std::collections::BTreeSet<String>,
    rng: StdRng,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut() {
                let _ = c.start_kill();
            }
        }
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Harness {
    /// Writes the cluster's files and starts the three nodes (without
    /// waiting for them).
    fn create(a: &HarnessArgs, seed: u64) -> anyhow::Result<Harness> {
        if a.commit_policy.mirrors_needed() > NODE_IDS.len() - 1 {
            bail!(
                "--commit-policy {}: this cluster has {} mirrors",
                a.commit_policy,
                NODE_IDS.len() - 1
            );
        }
        let (dir, owned) = match &a.dir {
            Some(d) => {
                if d.exists()
                    && std::fs::read_dir(d)
                        .with_context(|| format!("reading {}", d.display()))?
                        .next()
                        .is_some()
                {
                    bail!("--dir {} is not empty", d.display());
                }
                (d.clone(), !a.keep)
            }
            None => (
                std::env::temp_dir().join(format!("mirrordb-drill-{}", uuid::Uuid::new_v4())),
                !a.keep,
            ),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = std::fs::canonicalize(&dir).context("resolving the directory")?;
        let exe = std::env::current_exe().context("locating this mirrordb binary")?;
        let (quic, http) = free_ports(NODE_IDS.len()).context("finding free ports")?;
        let list = |ports: &[u16]| {
            NODE_IDS
                .iter()
                .zip(ports)
                .map(|(id, p)| format!("{id}=127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let init = InitArgs {
            nodes: list(&quic),
            witness: String::new(),
            no_failover: false,
            http: list(&http),
            commit_policy: a.commit_policy,
            on_unavailable: OnUnavailable::Degrade,
            data_root: Some(dir.clone()),
            name: "mirrordb-drill".into(),
            out: dir.join("certs"),
            json: false,
            if_missing: false,
            tokens: Vec::new(),
        };
        let report = cluster_init(&init).context("cluster init")?;
        let mut nodes = Vec::new();
        for n in report.nodes {
            nodes.push(Node {
                log: dir.join(format!("{}.log", n.id)),
                id: n.id,
                config: n.config,
                http: n.http,
                child: None,
            });
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(STATUS_HTTP_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        let urls = Arc::new(nodes.iter().map(|n| n.http.clone()).collect());
        Ok(Harness {
            dir,
            remove: owned,
            exe,
            node_log: a.node_log.clone(),
            policy: a.commit_policy,
            writers: a.writers,
            nodes,
            urls,
            client,
            acked: BTreeMap::new(),
            lost: std::collections::BTreeSet::new(),
            rng: StdRng::seed_from_u64(seed),
        })
    }

    fn start_all(&mut self) -> anyhow::Result<()> {
        for n in &mut self.nodes {
            n.spawn(&self.exe, &self.node_log)?;
        }
        Ok(())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for n in &mut self.nodes {
            n.check_alive()?;
        }
        Ok(())
    }

    /// Waits until one node is primary and the others stream from it.
    async fn wait_formed(&mut self) -> anyhow::Result<(usize, u64)> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive()?;
            let vs = views(&self.client, &self.urls).await;
            if let Some((p, epoch)) = primary_of(&vs) {
                let mirrors_ok = vs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != p)
                    .all(|(_, v)| {
                        v.as_ref().is_some_and(|v| {
                            v.role == "mirror" && v.following.as_ref().is_some_and(|f| f.streaming)
                        })
                    });
                if mirrors_ok {
                    return Ok((p, epoch));
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the cluster did not form within {START_TIMEOUT:?}: {}",
                    describe(&self.nodes, &vs)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// One round: write, kill the primary, measure, check, rejoin.
    async fn round(&mut self, drill: u32, out: &Out) -> anyhow::Result<DrillReport> {
        let (p, epoch) = self.wait_formed().await?;
        let killed = self.nodes[p].id.clone();
        let mut report = DrillReport {
            drill,
            killed: killed.clone(),
            killed_epoch: epoch,
            new_primary: None,
            failover_ms: None,
            cluster_failover_ms: None,
            acked: 0,
            acked_before_kill: 0,
            acked_total: 0,
            refused: 0,
            failed: 0,
            lost: 0,
            lost_keys: Vec::new(),
            rejoin_ms: None,
            rejoin_missing: 0,
            commit_degraded: false,
            error: None,
        };
        let others: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.id != killed)
            .map(|n| n.id.as_str())
            .collect();
        out.step(&format!(
            "cluster formed: {killed} is primary (epoch {epoch}); {} follow it as mirrors",
            others.join(" and ")
        ));

        // Writers.
        let (target, router) = spawn_router(self.client.clone(), self.urls.clone(), Some(p));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
        let mut writers = Vec::new();
        for w in 0..self.writers {
            writers.push(tokio::spawn(writer(WriterCtx {
                client: self.client.clone(),
                urls: self.urls.clone(),
                target: target.clone(),
                stop: stop_rx.clone(),
                acks: ack_tx.clone(),
                round: drill,
                writer: w,
            })));
        }
        drop(ack_tx);
        out.step(&format!(
            "writing: {} clients write new keys to {killed} and record every acknowledged write (commit policy {})",
            self.writers, self.policy
        ));
        let mut acks: Vec<Ack> = Vec::new();
        let warmup = Duration::from_millis(self.rng.random_range(WARMUP_MS));
        collect_until(&mut ack_rx, &mut acks, Instant::now() + warmup).await;

        // The kill.
        out.step(&format!(
            "{} writes acknowledged by {killed} so far; killing {killed} with SIGKILL",
            acks.len()
        ));
        let t0 = Instant::now();
        if let Some(c) = self.nodes[p].child.as_mut() {
            c.start_kill().context("SIGKILL to the primary")?;
        }
        let first = wait_first_ack(&mut ack_rx, &mut acks, p, t0).await;
        self.nodes[p].kill().await;
        match first {
            Some((node, at)) => {
                let ms = millis(at.duration_since(t0));
                report.failover_ms = Some(ms);
                report.new_primary = Some(self.nodes[node].id.clone());
                out.step(&format!(
                    "{} promoted: its first acknowledged write came {ms} ms after the kill",
                    self.nodes[node].id
                ));
                collect_until(&mut ack_rx, &mut acks, Instant::now() + AFTER_FAILOVER).await;
            }
            None => {
                report.error = Some(format!(
                    "no write was acknowledged by another node within {FAILOVER_TIMEOUT:?} of the kill"
                ));
            }
        }
        stop_tx.send_replace(true);
        for w in writers {
            if let Ok(s) = w.await {
                report.refused += s.refused;
                report.failed += s.failed;
            }
        }
        while let Some(a) = ack_rx.recv().await {
            acks.push(a);
        }
        router.abort();
        report.acked = acks.len() as u64;
        report.acked_before_kill = acks.iter().filter(|a| a.at < t0).count() as u64;
        let by_new = report.new_primary.as_ref().map_or(0, |np| {
            acks.iter().filter(|a| self.nodes[a.node].id == *np).count()
        });
        for a in acks {
            if self.acked.len() >= MAX_ACKED {
                break;
            }
            self.acked.insert(a.key.clone(), a);
        }
        report.acked_total = self.acked.len() as u64;
        if report.error.is_some() {
            let vs = views(&self.client, &self.urls).await;
            let what = describe(&self.nodes, &vs);
            report.error = report.error.map(|e| format!("{e}; nodes: {what}"));
            return Ok(report);
        }
        out.step(&format!(
            "writes stopped: {} acknowledged in this round ({} by {killed}, {by_new} by {}); {} refused or unanswered, retried under new keys",
            report.acked,
            report.acked_before_kill,
            report.new_primary.as_deref().unwrap_or("?"),
            report.refused + report.failed
        ));

        // Every acknowledged write on the new primary.
        let np = self
            .nodes
            .iter()
            .position(|n| Some(&n.id) == report.new_primary.as_ref())
            .context("the new primary is a member")?;
        let missing = self.check_node(np).await?;
        let mut new_lost: Vec<String> = missing
            .into_iter()
            .filter(|k| !self.lost.contains(k))
            .collect();
        report.lost = new_lost.len() as u64;
        new_lost.truncate(10);
        report.lost_keys = new_lost.clone();
        self.lost.extend(new_lost);
        if let Some(v) = view(&self.client, &self.urls[np]).await {
            report.commit_degraded = v.commit_degraded;
            report.cluster_failover_ms = v
                .failover
                .and_then(|f| f.last_failover)
                .map(|l| l.duration_ms);
        }
        if report.lost == 0 {
            out.step(&format!(
                "every acknowledged write of the run ({}) is on {} with its value and LSN",
                report.acked_total, self.nodes[np].id
            ));
        } else {
            out.step(&format!(
                "LOST: {} acknowledged writes are missing on {} or hold another value (e.g. {})",
                report.lost,
                self.nodes[np].id,
                report.lost_keys.join(", ")
            ));
        }

        // Rejoin.
        out.step(&format!("restarting {killed} on its old data directory"));
        let t1 = Instant::now();
        self.nodes[p].spawn(&self.exe, &self.node_log)?;
        match self.wait_rejoined(p, np).await {
            Ok(()) => {
                let ms = millis(t1.elapsed());
                report.rejoin_ms = Some(ms);
                // Writes already counted lost (async mode) are missing
                // everywhere; count only what the rejoined node lacks
                // beyond them.
                let missing = self.check_node(p).await?;
                report.rejoin_missing =
                    missing.iter().filter(|k| !self.lost.contains(*k)).count() as u64;
                let holds = if report.rejoin_missing == 0 {
                    "every acknowledged write the new primary holds".to_owned()
                } else {
                    format!(
                        "but LACKS {} acknowledged writes the new primary holds",
                        report.rejoin_missing
                    )
                };
                out.step(&format!(
                    "{killed} rejoined as a mirror of {} and caught up in {ms} ms; it holds {holds}",
                    self.nodes[np].id
                ));
            }
            Err(e) => report.error = Some(format!("{e:#}")),
        }
        if let Some(ms) = report.cluster_failover_ms {
            out.step(&format!(
                "the cluster's own record: failover {killed} → {} in {ms} ms",
                self.nodes[np].id
            ));
        }
        Ok(report)
    }

    /// Keys of acknowledged writes missing on node `i` or holding another
    /// value or version there.
    async fn check_node(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let held = scan(&self.client, &self.urls[i]).await?;
        Ok(self
            .acked
            .values()
            .filter(|a| {
                held.get(&a.key)
                    .is_none_or(|(version, value)| *version != a.lsn || *value != a.value)
            })
            .map(|a| a.key.clone())
            .collect())
    }

    /// Waits until node `i` is a streaming mirror that applied everything
    /// the primary `p` holds.
    async fn wait_rejoined(&mut self, i: usize, p: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + REJOIN_TIMEOUT;
        loop {
            self.nodes[i].check_alive()?;
            let (me, primary) = tokio::join!(
                view(&self.client, &self.urls[i]),
                view(&self.client, &self.urls[p])
            );
            if let (Some(me), Some(primary)) = (&me, &primary) {
                let streaming = me.following.as_ref().is_some_and(|f| {
                    f.streaming && f.primary.as_deref() == Some(self.nodes[p].id.as_str())
                });
                if me.role == "mirror" && streaming && me.applied_lsn >= primary.last_lsn {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let vs = views(&self.client, &self.urls).await;
                bail!(
                    "{} did not rejoin within {REJOIN_TIMEOUT:?}: {}",
                    self.nodes[i].id,
                    describe(&self.nodes, &vs)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Kills every child and waits for them; the directory is removed when
    /// the harness is dropped unless `keep`.
    async fn stop(&mut self, keep: bool) {
        for n in &mut self.nodes {
            n.kill().await;
        }
        if keep {
            self.remove = false;
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One line per node: role, epoch, LSNs, what it follows.
fn describe(nodes: &[Node], vs: &[Option<NodeView>]) -> String {
    nodes
        .iter()
        .zip(vs)
        .map(|(n, v)| match v {
            None => format!("{}: no answer", n.id),
            Some(v) => format!(
                "{}: {} epoch {} last_lsn {} applied_lsn {} primary {:?} streaming {:?}",
                n.id,
                v.role,
                v.epoch,
                v.last_lsn,
                v.applied_lsn,
                v.primary,
                v.following.as_ref().map(|f| f.streaming)
            ),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

async fn collect_until(rx: &mut mpsc::UnboundedReceiver<Ack>, acks: &mut Vec<Ack>, until: Instant) {
    while let Ok(Some(a)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
        acks.push(a);
    }
}

/// Collects acknowledgements until one comes from a node other than
/// `killed`; answers that node and when its answer arrived.
async fn wait_first_ack(
    rx: &mut mpsc::UnboundedReceiver<Ack>,
    acks: &mut Vec<Ack>,
    killed: usize,
    t0: Instant,
) -> Option<(usize, Instant)> {
    let deadline = t0 + FAILOVER_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(a)) => {
                let found = (a.node != killed && a.at >= t0).then_some((a.node, a.at));
                acks.push(a);
                if found.is_some() {
                    return found;
                }
            }
            _ => return None,
        }
    }
}

/// Every record of the drill table on the node at `base`: key → (version,
/// value).
async fn scan(
    client: &reqwest::Client,
    base: &str,
) -> anyhow::Result<HashMap<String, (u64, serde_json::Value)>> {
    #[derive(Deserialize)]
    struct Record {
        key: String,
        version: u64,
        value: serde_json::Value,
    }
    #[derive(Deserialize)]
    struct Page {
        records: Vec<Record>,
        next: Option<String>,
    }
    let mut out = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/tables/{TABLE}/records?limit={SCAN_PAGE}");
        if let Some(a) = &after {
            url.push_str("&start_after=");
            url.push_str(&crate::cli::percent_encode(a));
        }
        let r = client
            .get(&url)
            .timeout(SCAN_HTTP_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("scanning {base}"))?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(out);
        }
        if !r.status().is_success() {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            bail!("scanning {base}: {status}: {body}");
        }
        let page: Page = r
            .json()
            .await
            .with_context(|| format!("scanning {base}: bad answer"))?;
        for rec in page.records {
            out.insert(rec.key, (rec.version, rec.value));
        }
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM, naming which.
async fn interrupted() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            if r.is_err() {
                std::future::pending::<()>().await;
            }
            "interrupted (Ctrl-C)"
        }
        () = term => "terminated (SIGTERM)",
    }
}

fn seed_of(a: &HarnessArgs) -> u64 {
    a.seed.unwrap_or_else(rand::random)
}

// ---------------------------------------------------------------------------
// The commands

/// `mirrordb demo`.
pub async fn demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let seed = seed_of(&a.harness);
    let out = Out {
        start: Instant::now(),
        narrate: true,
    };
    let mut h = Harness::create(&a.harness, seed)?;
    println!(
        "mirrordb demo: three nodes on loopback, commit policy {}, in {} (seed {seed})",
        a.harness.commit_policy,
        h.dir.display()
    );
    println!(
        "certificates and node configurations: {}; node logs: {}/n1.log … n3.log",
        h.dir.join("certs").display(),
        h.dir.display()
    );
    let mut interrupted_by = None;
    let result = tokio::select! {
        r = async {
            h.start_all()?;
            out.step("started n1, n2 and n3 (mirrordb serve --config certs/nX.toml); waiting for them to elect a primary");
            h.round(1, &out).await
        } => r,
        why = interrupted() => {
            interrupted_by = Some(why);
            Err(anyhow!(why))
        }
    };
    // A failure keeps the directory for its node logs; an interruption
    // does not (unless --keep).
    let (ok, keep) = match &result {
        Ok(r) => {
            let ok = r.error.is_none() && r.lost == 0 && r.rejoin_missing == 0;
            if let Some(e) = &r.error {
                println!("FAILED: {e}");
            }
            (ok, a.harness.keep || !ok)
        }
        Err(e) => {
            println!("FAILED: {e:#}");
            (false, a.harness.keep || interrupted_by.is_none())
        }
    };
    h.stop(keep).await;
    if ok {
        println!(
            "done: the primary died, a mirror took over without losing an acknowledged write, and the old primary came back as a mirror"
        );
    }
    if keep {
        println!("kept {} (node logs nX.log)", h.dir.display());
    } else {
        println!("stopped the nodes; removing {}", h.dir.display());
    }
    drop(h);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The JSON document of `drill --json`.
#[derive(Debug, Serialize)]
struct DrillOutput<'a> {
    commit_policy: String,
    writers: u32,
    seed: u64,
    target_median_ms: u64,
    target_max_ms: u64,
    drills: &'a [DrillReport],
    summary: Summary,
    /// Set when the run stopped early (interrupted, an error).
    stopped: Option<String>,
}

/// `mirrordb drill`.
pub async fn drill(a: DrillArgs) -> anyhow::Result<ExitCode> {
    let seed = seed_of(&a.harness);
    let policy = a.harness.commit_policy;
    let progress = |msg: &str| {
        if a.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    };
    let mut h = Harness::create(&a.harness, seed)?;
    progress(&format!(
        "mirrordb drill: {} drills on three loopback nodes, commit policy {policy}, {} writers, seed {seed} (replay: --seed {seed}), in {}",
        a.count,
        a.harness.writers,
        h.dir.display()
    ));
    let out = Out {
        start: Instant::now(),
        narrate: false,
    };
    let mut drills: Vec<DrillReport> = Vec::new();
    let mut was_interrupted = false;
    let stopped: Option<String> = tokio::select! {
        r = async {
            h.start_all()?;
            for n in 1..=a.count {
                let r = h.round(n, &out).await?;
                progress(&drill_line(&r, a.count));
                let end = r.error.is_some();
                drills.push(r);
                if end {
                    break;
                }
            }
            anyhow::Ok(())
        } => r.err().map(|e| format!("{e:#}")),
        why = interrupted() => {
            was_interrupted = true;
            Some(why.to_owned())
        }
    };
    let summary = summarize(&drills, policy);
    let failed = stopped.is_some()
        || summary.verdict.no_loss == Some(false)
        || summary.rejoin_missing > 0
        || !summary.verdict.all_completed
        || drills.len() < a.count as usize;
    // A failure keeps the directory for its node logs; an interruption
    // does not (unless --keep).
    let keep = a.harness.keep || (failed && !was_interrupted);
    h.stop(keep).await;
    if a.json {
        let doc = DrillOutput {
            commit_policy: policy.to_string(),
            writers: a.harness.writers,
            seed,
            target_median_ms: TARGET_MEDIAN_MS,
            target_max_ms: TARGET_MAX_MS,
            drills: &drills,
            summary,
            stopped: stopped.clone(),
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_summary(&summary, policy);
    }
    if let Some(s) = &stopped {
        eprintln!("mirrordb drill: stopped: {s}");
    }
    if keep {
        eprintln!("kept {} (node logs nX.log)", h.dir.display());
    }
    drop(h);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn drill_line(r: &DrillReport, count: u32) -> String {
    let failover = match (&r.new_primary, r.failover_ms) {
        (Some(np), Some(ms)) => format!("{np} acknowledged after {ms:>5} ms"),
        _ => "NO NEW PRIMARY".to_owned(),
    };
    let rejoin = match r.rejoin_ms {
        Some(ms) => format!("{} rejoined in {ms} ms", r.killed),
        None => format!("{} did NOT rejoin", r.killed),
    };
    let mut line = format!(
        "drill {:>3}/{count}: killed {} (epoch {}) -> {failover}; acked {} (total {}), lost {}; {rejoin}",
        r.drill, r.killed, r.killed_epoch, r.acked, r.acked_total, r.lost
    );
    if r.rejoin_missing > 0 {
        line.push_str(&format!(
            "; the rejoined node misses {} acknowledged writes",
            r.rejoin_missing
        ));
    }
    if let Some(e) = &r.error {
        line.push_str(&format!("\n  error: {e}"));
    }
    line
}

fn print_summary(s: &Summary, policy: CommitPolicy) {
    let met = |b: bool| if b { "met" } else { "MISSED" };
    match &s.failover {
        Some(f) => println!(
            "failover over {} drills: median {} ms, p90 {} ms, max {} ms (min {} ms)",
            f.count, f.median_ms, f.p90_ms, f.max_ms, f.min_ms
        ),
        None => println!("failover: no drill completed"),
    }
    if let Some(r) = &s.rejoin {
        println!(
            "rejoin of the killed node: median {} ms, max {} ms",
            r.median_ms, r.max_ms
        );
    }
    println!(
        "acknowledged writes: {}, lost: {} (commit policy {policy}){}",
        s.acked,
        s.lost,
        if s.rejoin_missing > 0 {
            format!(", missing on rejoined nodes: {}", s.rejoin_missing)
        } else {
            String::new()
        }
    );
    let loss = match s.verdict.no_loss {
        Some(b) => met(b).to_owned(),
        None => "not promised in async mode".to_owned(),
    };
    println!(
        "verdict: median ≤ {TARGET_MEDIAN_MS} ms: {} · max ≤ {TARGET_MAX_MS} ms: {} · no acknowledged write lost: {loss} · {}/{} drills completed",
        met(s.verdict.median_met),
        met(s.verdict.max_met),
        s.completed,
        s.drills
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_median_p90_and_max() {
        assert_eq!(Stats::of(&[]), None);
        let one = Stats::of(&[1500]).unwrap();
        assert_eq!(
            (one.min_ms, one.median_ms, one.p90_ms, one.max_ms),
            (1500, 1500, 1500, 1500)
        );
        // Odd count: the middle value, whatever the input order.
        let s = Stats::of(&[3000, 1000, 2000]).unwrap();
        assert_eq!(
            (s.median_ms, s.p90_ms, s.max_ms, s.min_ms),
            (2000, 3000, 3000, 1000)
        );
        // Even count: the mean of the two middle values.
        let s = Stats::of(&[1000, 1200, 1400, 5000]).unwrap();
        assert_eq!(s.median_ms, 1300);
        // 20 values 100..=2000: p90 is the 18th (nearest rank).
        let v: Vec<u64> = (1..=20).map(|i| i * 100).collect();
        let s = Stats::of(&v).unwrap();
        assert_eq!((s.median_ms, s.p90_ms, s.max_ms), (1050, 1800, 2000));
        // Ten values: p90 is the 9th.
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(Stats::of(&v).unwrap().p90_ms, 9);
        // No overflow near u64::MAX.
        let s = Stats::of(&[u64::MAX, u64::MAX]).unwrap();
        assert_eq!(s.median_ms, u64::MAX);
    }

    fn report(n: u32, failover: Option<u64>, lost: u64, total: u64) -> DrillReport {
        DrillReport {
            drill: n,
            killed: "n1".into(),
            killed_epoch: 1,
            new_primary: failover.map(|_| "n2".into()),
            failover_ms: failover,
            cluster_failover_ms: None,
            acked: 10,
            acked_before_kill: 5,
            acked_total: total,
            refused: 0,
            failed: 0,
            lost,
            lost_keys: Vec::new(),
            rejoin_ms: failover.map(|_| 900),
            rejoin_missing: 0,
            commit_degraded: false,
            error: None,
        }
    }

    #[test]
    fn the_verdict_follows_the_targets_and_the_policy() {
        let quorum: CommitPolicy = "quorum:1".parse().unwrap();
        let ok = [
            report(1, Some(1800), 0, 10),
            report(2, Some(2900), 0, 20),
            report(3, Some(1500), 0, 30),
        ];
        let s = summarize(&ok, quorum);
        assert_eq!(s.acked, 30);
        assert!(s.verdict.median_met && s.verdict.max_met && s.verdict.all_completed);
        assert_eq!(s.verdict.no_loss, Some(true));

        let slow = [report(1, Some(2100), 0, 10), report(2, Some(3100), 0, 20)];
        let s = summarize(&slow, quorum);
        assert!(!s.verdict.median_met && !s.verdict.max_met);

        let lossy = [report(1, Some(1000), 2, 10)];
        assert_eq!(summarize(&lossy, quorum).verdict.no_loss, Some(false));
        // Async promises nothing about loss: no verdict on it.
        let s = summarize(&lossy, "async".parse().unwrap());
        assert_eq!((s.lost, s.verdict.no_loss), (2, None));

        let failed = [report(1, Some(1000), 0, 10), report(2, None, 0, 10)];
        let s = summarize(&failed, quorum);
        assert_eq!((s.completed, s.verdict.all_completed), (1, false));
        assert_eq!(s.failover.unwrap().count, 1);
    }
}
