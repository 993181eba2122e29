//! Crash loop (DESIGN §9, step 4): `mirrordb serve` runs as a child process
//! while writer tasks put single records and multi-record transactions over
//! HTTP; the test SIGKILLs the child at a random moment, restarts it on the
//! same data directory and checks two things:
//!
//! - **durability**: every acknowledged write is there with its value, or a
//!   later write of the same key (acknowledged, or in flight at the kill);
//! - **atomicity**: every transaction is all-or-nothing: the keys of a group,
//!   always written together with one marker value, never disagree.
//!
//! ```text
//! loop kills times:
//!   start child ──► writers (puts, deletes, txns) ──► sleep rand ──► SIGKILL
//!                   + journal rotations every few ms
//!        ▲                                                              │
//!        └──── check every key against the model, fold results in ◄─────┘
//! ```
//!
//! Seeded: `MIRRORDB_SEED=<n>` replays a run's choices (what to write, when
//! to kill); `MIRRORDB_CRASH_KILLS=<n>` sets the number of kills (default
//! 20). The seed and the replay command are printed at the start and on
//! failure; a failing run keeps its data directory and prints its path.

use anyhow::{Context, bail};
use mirrordb_tests::{ChildNode, phase};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Kills per run unless `MIRRORDB_CRASH_KILLS` says otherwise.
const DEFAULT_KILLS: usize = 20;
/// Writers of single records, and keys each owns.
const PUT_WRITERS: usize = 4;
const KEYS_PER_WRITER: usize = 24;
/// Writers of transactions, groups each owns, keys per group.
const TXN_WRITERS: usize = 2;
const GROUPS_PER_WRITER: usize = 6;
const KEYS_PER_GROUP: usize = 4;
/// How long writers run before the kill: a random time in this range.
const RUN_MS: std::ops::Range<u64> = 20..400;
const TABLE: &str = "crash";
/// Flush intervals a round picks from.
const FLUSH_INTERVALS: [&str; 3] = ["1s", "50ms", "5ms"];
/// How often a round rotates the journal (`POST /v1/journal/rotate`): a
/// random interval in this range.
const ROTATE_MS: std::ops::Range<u64> = 5..80;
/// Problems listed in a failure message (all are counted).
const MAX_PROBLEMS_SHOWN: usize = 20;

/// The value a key may have after a crash.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Val {
    Absent,
    /// The unique id written in the record's JSON (`{"id": "..."}`).
    Id(String),
}

/// What the test knows about one key (or one transaction group): the last
/// value that was acknowledged, and the writes that were sent after it
/// without an answer (they may or may not have become durable).
#[derive(Clone, Debug)]
struct Known {
    acked: Val,
    pending: Vec<Val>,
}

impl Known {
    fn new() -> Self {
        Known {
            acked: Val::Absent,
            pending: Vec::new(),
        }
    }

    fn allowed(&self) -> BTreeSet<Val> {
        let mut s: BTreeSet<Val> = self.pending.iter().cloned().collect();
        s.insert(self.acked.clone());
        s
    }
}

/// The model: keys of single writes and groups of transactional writes.
#[derive(Default)]
struct Model {
    keys: BTreeMap<String, Known>,
    groups: BTreeMap<String, Known>,
}

fn group_keys(group: &str) -> Vec<String> {
    (0..KEYS_PER_GROUP)
        .map(|i| format!("{group}-m{i}"))
        .collect()
}

fn value_json(id: &str, rng: &mut StdRng) -> serde_json::Value {
    let pad = "p".repeat(rng.random_range(0..200));
    serde_json::json!({ "id": id, "pad": pad })
}

/// How a writer's round ended.
struct WriterEnd {
    acks: u64,
    /// A 4xx answer: the node refused the request itself, so the test is
    /// sending something wrong.
    refused: Option<String>,
}

/// Whether a write was acknowledged (2xx; with `miss_ok`, 404 too), and if
/// it was refused as a bad request, why. Anything else (no answer, 5xx)
/// leaves the write in doubt: it may still have been applied.
async fn outcome(
    r: Result<reqwest::Response, reqwest::Error>,
    miss_ok: bool,
) -> (bool, Option<String>) {
    let Ok(resp) = r else { return (false, None) };
    let status = resp.status();
    if status.is_success() || (miss_ok && status == reqwest::StatusCode::NOT_FOUND) {
        return (true, None);
    }
    if status.is_client_error() {
        let body = resp.text().await.unwrap_or_default();
        return (false, Some(format!("HTTP {status}: {body}")));
    }
    (false, None)
}

/// One writer of single records: put or delete its own keys, one at a time,
/// until the node stops answering. Returns the writes acknowledged.
async fn put_writer(
    client: reqwest::Client,
    base: String,
    writer: usize,
    round: usize,
    seed: u64,
    model: Arc<Mutex<Model>>,
) -> WriterEnd {
    let mut rng = StdRng::seed_from_u64(seed ^ ((round * 1000 + writer) as u64));
    let (mut seq, mut acks) = (0u64, 0u64);
    loop {
        seq += 1;
        let key = format!("w{writer}-k{}", rng.random_range(0..KEYS_PER_WRITER));
        let url = format!("{base}/v1/tables/{TABLE}/records/{key}");
        let (val, req) = if rng.random_ratio(1, 10) {
            (Val::Absent, client.delete(&url))
        } else {
            let id = format!("r{round}-w{writer}-s{seq}");
            let body = value_json(&id, &mut rng);
            (Val::Id(id), client.put(&url).json(&body))
        };
        lock(&model)
            .keys
            .entry(key.clone())
            .or_insert_with(Known::new)
            .pending
            .push(val.clone());
        // A delete of an absent key answers 404: a definite outcome too.
        let (ok, refused) = outcome(req.send().await, val == Val::Absent).await;
        if ok {
            acks += 1;
            let mut m = lock(&model);
            let k = m.keys.entry(key).or_insert_with(Known::new);
            k.acked = val;
            k.pending.clear();
        } else {
            // The node is gone (or refused): stop until the next round.
            return WriterEnd { acks, refused };
        }
    }
}

/// One writer of transactions: each rewrites every key of one of its groups
/// with one marker, atomically, until the node stops answering. Returns the
/// transactions acknowledged.
async fn txn_writer(
    client: reqwest::Client,
    base: String,
    writer: usize,
    round: usize,
    seed: u64,
    model: Arc<Mutex<Model>>,
) -> WriterEnd {
    let mut rng = StdRng::seed_from_u64(seed ^ ((round * 1000 + 500 + writer) as u64));
    let (mut seq, mut acks) = (0u64, 0u64);
    loop {
        seq += 1;
        let group = format!("t{writer}-g{}", rng.random_range(0..GROUPS_PER_WRITER));
        let marker = format!("r{round}-t{writer}-s{seq}");
        let ops: Vec<serde_json::Value> = group_keys(&group)
            .into_iter()
            .map(|key| {
                serde_json::json!({
                    "op": "put", "table": TABLE, "key": key,
                    "value": value_json(&marker, &mut rng),
                })
            })
            .collect();
        lock(&model)
            .groups
            .entry(group.clone())
            .or_insert_with(Known::new)
            .pending
            .push(Val::Id(marker.clone()));
        let r = client
            .post(format!("{base}/v1/transactions"))
            .json(&serde_json::json!({ "ops": ops }))
            .send()
            .await;
        let (ok, refused) = outcome(r, false).await;
        if ok {
            acks += 1;
            let mut m = lock(&model);
            let g = m.groups.entry(group).or_insert_with(Known::new);
            g.acked = Val::Id(marker);
            g.pending.clear();
        } else {
            return WriterEnd { acks, refused };
        }
    }
}

fn lock(m: &Mutex<Model>) -> std::sync::MutexGuard<'_, Model> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read(client: &reqwest::Client, base: &str, key: &str) -> anyhow::Result<Val> {
    let resp = client
        .get(format!("{base}/v1/tables/{TABLE}/records/{key}"))
        .send()
        .await
        .with_context(|| format!("GET {key}"))?;
    match resp.status() {
        reqwest::StatusCode::NOT_FOUND => Ok(Val::Absent),
        s if s.is_success() => {
            let v: serde_json::Value = resp
                .json()
                .await
                .with_context(|| format!("GET {key} body"))?;
            let id = v["id"]
                .as_str()
                .with_context(|| format!("{key} holds {v}, which has no id"))?;
            Ok(Val::Id(id.to_string()))
        }
        s => bail!(
            "GET {key}: HTTP {s}: {}",
            resp.text().await.unwrap_or_default()
        ),
    }
}

/// Checks every key and group against the model after a restart, then
/// folds what was found into it (an in-flight write that survived is now
/// durable; one that did not is gone for good).
async fn check(
    client: &reqwest::Client,
    base: &str,
    model: &Mutex<Model>,
) -> anyhow::Result<(usize, usize)> {
    let (keys, groups) = {
        let m = lock(model);
        (m.keys.clone(), m.groups.clone())
    };
    let mut problems = Vec::new();
    let mut found_keys = BTreeMap::new();
    for (key, known) in &keys {
        let got = read(client, base, key).await?;
        if !known.allowed().contains(&got) {
            problems.push(format!(
                "key {key}: found {got:?}, but the last acknowledged value is {:?} (in flight: {:?})",
                known.acked, known.pending
            ));
        }
        found_keys.insert(key.clone(), got);
    }
    let mut found_groups = BTreeMap::new();
    for (group, known) in &groups {
        let mut seen = BTreeSet::new();
        for key in group_keys(group) {
            seen.insert(read(client, base, &key).await?);
        }
        if seen.len() != 1 {
            problems.push(format!(
                "transaction group {group} is half-applied: its keys hold {seen:?}"
            ));
            continue;
        }
        let got = seen.into_iter().next().unwrap_or(Val::Absent);
        if !known.allowed().contains(&got) {
            problems.push(format!(
                "transaction group {group}: found {got:?}, but the last acknowledged marker is {:?} (in flight: {:?})",
                known.acked, known.pending
            ));
        }
        found_groups.insert(group.clone(), got);
    }
    if !problems.is_empty() {
        let shown = problems.len().min(MAX_PROBLEMS_SHOWN);
        bail!(
            "{} problem(s), the first {shown}:\n  {}",
            problems.len(),
            problems[..shown].join("\n  ")
        );
    }
    let mut m = lock(model);
    for (key, got) in found_keys {
        m.keys.insert(
            key,
            Known {
                acked: got,
                pending: Vec::new(),
            },
        );
    }
    for (group, got) in found_groups {
        m.groups.insert(
            group,
            Known {
                acked: got,
                pending: Vec::new(),
            },
        );
    }
    Ok((keys.len(), groups.len()))
}

/// Rotates the journal every `every` until the node is gone, so that kills
/// also land around rotations (a closed segment's zeroed blocks are trimmed
/// after the rotation, on another thread: a crash before that leaves zeros
/// that readers stop at and recovery trims). Returns the rotations done.
async fn rotator(client: reqwest::Client, base: String, every: Duration) -> u64 {
    let mut done = 0;
    loop {
        tokio::time::sleep(every).await;
        match client
            .post(format!("{base}/v1/journal/rotate"))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => done += 1,
            // Refused (say, while the node shuts down): try again.
            Ok(_) => {}
            // The node is gone.
            Err(_) => return done,
        }
    }
}

async fn crash_loop(seed: u64, kills: usize, dir: &Path) -> anyhow::Result<()> {
    let data_dir = dir.join("data");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    let model = Arc::new(Mutex::new(Model::default()));
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut acked_puts, mut acked_txns) = (0u64, 0u64);
    let mut rotated = 0u64;
    for round in 0..kills {
        // Some rounds flush the data file often, so kills also land in the
        // middle of a flush, not only between flushes.
        let flush = FLUSH_INTERVALS[rng.random_range(0..FLUSH_INTERVALS.len())];
        let config = dir.join("node.toml");
        std::fs::write(&config, format!("[cache]\nflush_interval = \"{flush}\"\n"))?;
        let config = config.to_str().context("temp path is UTF-8")?.to_string();
        let node = ChildNode::spawn_with(&data_dir, &["--config", &config])
            .with_context(|| format!("round {round}: starting the node"))?;
        let (keys, groups) = check(&client, &node.base, &model)
            .await
            .with_context(|| format!("round {round}: after restart"))?;
        let run_ms = rng.random_range(RUN_MS);
        let rotate_ms = rng.random_range(ROTATE_MS);
        phase(&format!(
            "round {round}: node up at {} (flush every {flush}), {keys} keys and {groups} groups verified; writing for {run_ms} ms, rotating the journal every {rotate_ms} ms, then SIGKILL",
            node.base
        ));
        let rotations = tokio::spawn(rotator(
            client.clone(),
            node.base.clone(),
            Duration::from_millis(rotate_ms),
        ));
        let mut tasks = Vec::new();
        for w in 0..PUT_WRITERS {
            tasks.push(tokio::spawn(put_writer(
                client.clone(),
                node.base.clone(),
                w,
                round,
                seed,
                model.clone(),
            )));
        }
        for w in 0..TXN_WRITERS {
            tasks.push(tokio::spawn(txn_writer(
                client.clone(),
                node.base.clone(),
                w,
                round,
                seed,
                model.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        node.kill().context("killing the node")?;
        rotated += rotations.await.context("the rotating task panicked")?;
        for (i, t) in tasks.into_iter().enumerate() {
            let end = t.await.context("a writer task panicked")?;
            if let Some(why) = end.refused {
                bail!("round {round}: the node refused a test write: {why}");
            }
            if i < PUT_WRITERS {
                acked_puts += end.acks;
            } else {
                acked_txns += end.acks;
            }
        }
    }
    if rotated == 0 {
        bail!("no journal rotation succeeded in {kills} rounds: kills never met one");
    }
    if acked_puts == 0 || acked_txns == 0 {
        bail!(
            "no write of some kind was acknowledged in {kills} rounds ({acked_puts} puts, {acked_txns} transactions): the test checked nothing"
        );
    }
    phase("final restart: every acknowledged write, every transaction whole");
    let node = ChildNode::spawn(&data_dir).context("final start")?;
    let (keys, groups) = check(&client, &node.base, &model)
        .await
        .context("final check")?;
    node.kill()?;
    eprintln!(
        "crash loop passed: {kills} kills; {acked_puts} acknowledged single writes and {acked_txns} acknowledged transactions; {rotated} journal rotations; {keys} keys and {groups} transaction groups verified"
    );
    Ok(())
}

#[test]
fn acknowledged_writes_survive_sigkill_and_transactions_stay_atomic() {
    let seed = mirrordb_tests::seed();
    let kills = std::env::var("MIRRORDB_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_KILLS);
    let replay = format!(
        "MIRRORDB_SEED={seed} MIRRORDB_CRASH_KILLS={kills} cargo test -p mirrordb-tests --test crash_loop -- --nocapture"
    );
    eprintln!("crash loop: seed {seed}, {kills} kills (replay: {replay})");
    let dir = tempfile::Builder::new()
        .prefix("mirrordb-crash-loop")
        .tempdir()
        .expect("temp dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(crash_loop(seed, kills, dir.path())) {
        let kept = dir.keep();
        panic!(
            "crash loop failed (seed {seed}): {e:#}\nreplay: {replay}\ndata directory kept at {}",
            kept.display()
        );
    }
}
