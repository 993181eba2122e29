//! Cluster tests over real QUIC on loopback, with in-process nodes: each
//! node is an engine + HTTP server + `ClusterNode` started from the config
//! files `mirrordb cluster init` writes, exactly as `mirrordb serve` does.
//!
//! ```text
//! cluster(n, policy) ─► cluster init into a tempdir (free UDP/TCP ports)
//!                    ─► start(i): serve::open_engine + serve::start
//! writes over HTTP to the primary ─► wait until every mirror applied the
//! primary's last LSN ─► compare Engine::digest()
//! ```
//!
//! Nothing here asserts a duration: waits have generous limits and fail
//! with a message naming what did not happen.

use mirrordb::cluster::init::{InitArgs, run as init};
use mirrordb::cluster::{CommitPolicy, OnUnavailable};
use mirrordb::config::Config;
use mirrordb::engine::Engine;
use mirrordb::serve::{self, Server};
use mirrordb_tests::{phase, seed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Longest wait for replication to converge.
const CONVERGE: Duration = Duration::from_secs(60);

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free UDP port")
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free TCP port")
}

/// A cluster's files and its running nodes.
struct Cluster {
    dir: TempDir,
    ids: Vec<String>,
    configs: Vec<Config>,
    servers: Vec<Option<Server>>,
    client: reqwest::Client,
}

fn init_cluster(
    out: &Path,
    n: usize,
    policy: CommitPolicy,
    on: OnUnavailable,
) -> (Vec<String>, Vec<Config>) {
    let ids: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let nodes = ids
        .iter()
        .map(|id| format!("{id}=127.0.0.1:{}", free_udp_port()))
        .collect::<Vec<_>>()
        .join(",");
    let http = ids
        .iter()
        .map(|id| format!("{id}=127.0.0.1:{}", free_tcp_port()))
        .collect::<Vec<_>>()
        .join(",");
    let args = InitArgs {
        nodes,
        http,
        commit_policy: policy,
        on_unavailable: on,
        data_root: Some(out.to_owned()),
        name: "test".into(),
        out: out.join("certs"),
        json: false,
        if_missing: false,
        tokens: Vec::new(),
        witness: String::new(),
        no_failover: true,
    };
    let report = init(&args).expect("cluster init");
    let configs = report
        .nodes
        .iter()
        .map(|n| {
            let mut c = Config::load(&n.config).expect("generated config loads");
            // Flush often so restarts replay little; keep degrade quick.
            c.cache.flush_interval.0 = Duration::from_millis(200);
            if let Some(cl) = c.cluster.as_mut() {
                cl.degrade_after.0 = Duration::from_millis(300);
                cl.quorum_timeout.0 = Duration::from_millis(500);
            }
            c.validate().expect("valid");
            c
        })
        .collect();
    (ids, configs)
}

/// Starts a node as `mirrordb serve` does. An in-process restart may find
/// its UDP port still held by the previous endpoint while its connections
/// drain, so binding is retried for a while.
async fn start_server(cfg: &Config) -> Server {
    start_server_on(cfg, None).await
}

/// [`start_server`] with the journal writing through `disk`.
async fn start_server_on(
    cfg: &Config,
    disk: Option<std::sync::Arc<dyn mirrordb::journal::disk::Disk>>,
) -> Server {
    if std::env::var_os("RUST_LOG").is_some() {
        mirrordb::cli::init_tracing();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ecfg = serve::engine_config(cfg);
        if let Some(d) = &disk {
            ecfg.disk = d.clone();
        }
        let engine = serve::open_engine(ecfg).await.expect("engine opens");
        match serve::start(cfg, engine.clone()).await {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline && e.to_string().contains("in use") => {
                engine.shutdown().await.expect("close");
                drop(engine);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("node starts: {e}"),
        }
    }
}

impl Cluster {
    async fn new(n: usize, policy: CommitPolicy, on: OnUnavailable) -> Cluster {
        Cluster::new_with(n, policy, on, |_| {}).await
    }

    /// A cluster whose configs `tweak` changes before the nodes start.
    async fn new_with(
        n: usize,
        policy: CommitPolicy,
        on: OnUnavailable,
        tweak: impl Fn(&mut Config),
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ids, mut configs) = init_cluster(dir.path(), n, policy, on);
        for c in &mut configs {
            tweak(c);
            c.validate().expect("valid");
        }
        let mut c = Cluster {
            dir,
            ids,
            configs,
            servers: Vec::new(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
        };
        for i in 0..n {
            let s = start_server(&c.configs[i]).await;
            c.servers.push(Some(s));
        }
        c
    }

    fn server(&self, i: usize) -> &Server {
        self.servers[i].as_ref().expect("node is running")
    }

    fn engine(&self, i: usize) -> Engine {
        self.server(i).current_engine()
    }

    /// The engine handle that follows a mirror's reseed.
    fn shared(&self, i: usize) -> mirrordb::cluster::SharedEngine {
        self.server(i)
            .cluster()
            .expect("cluster node")
            .engine()
            .clone()
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("{}{path}", self.server(i).base_url())
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.configs[i].node.data_dir.clone()
    }

    async fn stop(&mut self, i: usize) {
        if let Some(s) = self.servers[i].take() {
            s.shutdown().await.expect("clean shutdown");
        }
    }

    async fn restart(&mut self, i: usize) {
        assert!(self.servers[i].is_none());
        let s = start_server(&self.configs[i]).await;
        self.servers[i] = Some(s);
    }

    async fn restart_on(
        &mut self,
        i: usize,
        disk: std::sync::Arc<dyn mirrordb::journal::disk::Disk>,
    ) {
        assert!(self.servers[i].is_none());
        let s = start_server_on(&self.configs[i], Some(disk)).await;
        self.servers[i] = Some(s);
    }

    async fn put(&self, i: usize, key: &str, value: &serde_json::Value) -> reqwest::Response {
        self.client
            .put(self.url(i, &format!("/v1/tables/t/records/{key}")))
            .json(value)
            .send()
            .await
            .expect("request")
    }

    /// Waits until every running mirror applied the primary's last LSN.
    async fn converge(&self) -> u64 {
        let last = self.engine(0).status().durable_lsn;
        let deadline = Instant::now() + CONVERGE;
        for i in 1..self.servers.len() {
            if self.servers[i].is_none() {
                continue;
            }
            loop {
                let applied = self.engine(i).status().applied_lsn;
                if applied >= last {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} applied only {applied} of {last} within {CONVERGE:?}",
                    self.ids[i]
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        last
    }

    fn assert_identical(&self) {
        let d0 = self.engine(0).digest().expect("digest");
        for i in 1..self.servers.len() {
            if self.servers[i].is_none() {
                continue;
            }
            let di = self.engine(i).digest().expect("digest");
            assert_eq!(
                di, d0,
                "{} differs from the primary (records, digest)",
                self.ids[i]
            );
        }
    }

    async fn shutdown(mut self) {
        for i in (0..self.servers.len()).rev() {
            self.stop(i).await;
        }
        drop(self.dir);
    }
}

/// Writes `n` records with `writers` concurrent clients; answers the acked
/// LSNs.
async fn write_load(c: &Cluster, rng: &mut StdRng, writers: usize, n: usize) -> Vec<u64> {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = c.client.clone();
        let base = c.server(0).base_url();
        let wseed: u64 = rng.random();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(wseed);
            let mut lsns = Vec::new();
            for i in 0..n / writers {
                let key = format!("k{}", rng.random_range(0..200u32));
                let resp = if rng.random_range(0..10u32) == 0 {
                    client
                        .delete(format!("{base}/v1/tables/t/records/{key}"))
                        .send()
                        .await
                        .expect("delete")
                } else {
                    client
                        .put(format!("{base}/v1/tables/t/records/{key}"))
                        .json(&serde_json::json!({"w": w, "i": i, "pad": "x".repeat(rng.random_range(0..300))}))
                        .send()
                        .await
                        .expect("put")
                };
                let status = resp.status();
                if status.as_u16() == 404 {
                    continue; // deleting a missing key
                }
                assert!(status.is_success(), "write answered {status}");
                let v: serde_json::Value = resp.json().await.expect("json");
                lsns.push(v["lsn"].as_u64().expect("lsn"));
            }
            lsns
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_and_two_mirrors_reach_identical_content_under_concurrent_writes() {
    let mut rng = StdRng::seed_from_u64(seed());
    let c = Cluster::new(3, CommitPolicy::Quorum(1), OnUnavailable::Degrade).await;

    phase("concurrent writes on the primary while both mirrors stream");
    let acked = write_load(&c, &mut rng, 8, 400).await;
    assert!(!acked.is_empty());
    let txn = c
        .client
        .post(c.url(0, "/v1/transactions"))
        .json(&serde_json::json!({"ops": [
            {"op": "put", "table": "t", "key": "a", "value": 1},
            {"op": "put", "table": "u", "key": "b", "value": [1, 2]}
        ]}))
        .send()
        .await
        .expect("txn");
    assert!(txn.status().is_success(), "{}", txn.status());

    phase("every mirror applies the primary's last LSN; contents are identical");
    let last = c.converge().await;
    c.assert_identical();

    phase("mirrors serve reads, with min_lsn");
    let r = c
        .client
        .get(c.url(1, &format!("/v1/tables/t/records/a?min_lsn={last}")))
        .send()
        .await
        .expect("read");
    assert_eq!(r.status(), 200);
    let beyond = c
        .client
        .get(c.url(
            2,
            &format!("/v1/tables/t/records/a?min_lsn={}&wait_ms=50", last + 1000),
        ))
        .send()
        .await
        .expect("read");
    assert_eq!(beyond.status(), 503);
    let body: serde_json::Value = beyond.json().await.expect("json");
    assert_eq!(body["error"]["code"], "lsn_not_reached");

    phase("a write on a mirror is redirected to the same path on the primary");
    let r = c.put(1, "x", &serde_json::json!(1)).await;
    assert_eq!(r.status(), 307);
    let loc = r.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    assert_eq!(loc, c.url(0, "/v1/tables/t/records/x"));

    phase("role probes and the cluster view");
    let get = |i: usize, p: &str| c.client.get(c.url(i, p)).send();
    assert_eq!(get(0, "/primary").await.expect("probe").status(), 200);
    assert_eq!(get(1, "/primary").await.expect("probe").status(), 503);
    assert_eq!(get(0, "/mirror").await.expect("probe").status(), 503);
    assert_eq!(
        get(1, "/mirror?max_lag_ms=60000")
            .await
            .expect("probe")
            .status(),
        200
    );
    let view: serde_json::Value = get(0, "/v1/cluster")
        .await
        .expect("cluster")
        .json()
        .await
        .expect("json");
    assert_eq!(view["role"], "primary");
    assert_eq!(view["commit_policy"], "quorum:1");
    let mirrors = view["mirrors"].as_array().expect("mirrors");
    assert_eq!(mirrors.len(), 2);
    for m in mirrors {
        assert_eq!(m["connected"], true, "{m}");
        for k in [
            "flush_lag_lsn",
            "apply_lag_lsn",
            "flush_lag_ms",
            "apply_lag_ms",
        ] {
            assert!(m[k].is_u64(), "{k} in {m}");
        }
    }
    let metrics = get(0, "/metrics")
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("mirrordb_replication_flush_lag_entries"),
        "lag gauges in /metrics"
    );
    c.shutdown().await;
}

/// Concurrent writers check, at each acknowledgement, that both mirrors
/// already have the write durably (`quorum`) or applied (`remote_apply`).
async fn every_ack_is_on_both_mirrors(policy: CommitPolicy) {
    let mut rng = StdRng::seed_from_u64(seed());
    let c = Cluster::new(3, policy, OnUnavailable::Strict).await;
    let applied = matches!(policy, CommitPolicy::RemoteApply(_));
    phase("concurrent writers check both mirrors at each acknowledgement");
    let mut tasks = Vec::new();
    for w in 0..6u32 {
        let client = c.client.clone();
        let base = c.server(0).base_url();
        let mirrors = [c.shared(1), c.shared(2)];
        let wseed: u64 = rng.random();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(wseed);
            for i in 0..40u32 {
                let key = format!("w{w}-{}", rng.random_range(0..50u32));
                let resp = client
                    .put(format!("{base}/v1/tables/q/records/{key}"))
                    .json(&serde_json::json!({"i": i}))
                    .send()
                    .await
                    .expect("put");
                assert!(
                    resp.status().is_success(),
                    "{} {}",
                    resp.status(),
                    resp.text().await.unwrap_or_default()
                );
                let v: serde_json::Value = resp.json().await.expect("json");
                let lsn = v["lsn"].as_u64().expect("lsn");
                for (n, m) in mirrors.iter().enumerate() {
                    let e = m.get();
                    let (what, at) = if applied {
                        ("applied", e.status().applied_lsn)
                    } else {
                        ("durable", e.position().0)
                    };
                    assert!(
                        at >= lsn,
                        "write at LSN {lsn} acknowledged while mirror n{} had only {at} {what}",
                        n + 2
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    c.converge().await;
    c.assert_identical();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_quorum_mode_every_acknowledged_write_is_on_k_mirrors_when_acknowledged() {
    every_ack_is_on_both_mirrors(CommitPolicy::Quorum(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_remote_apply_mode_every_acknowledged_write_is_applied_on_k_mirrors() {
    every_ack_is_on_both_mirrors(CommitPolicy::RemoteApply(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_mirror_blocks_strict_writes_and_degrades_the_others_durably() {
    let mut c = Cluster::new(2, CommitPolicy::Quorum(1), OnUnavailable::Strict).await;
    c.put(0, "before", &serde_json::json!(1)).await;
    c.converge().await;

    phase("strict: with the only mirror gone, a write answers write_blocked");
    c.stop(1).await;
    let r = c.put(0, "strict", &serde_json::json!(1)).await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "write_blocked", "{body}");

    phase("switch to degrade at run time: the write is acknowledged and recorded");
    let r = c
        .client
        .put(c.url(0, "/v1/cluster/commit-policy"))
        .json(&serde_json::json!({"commit_policy": "quorum:1", "on_unavailable": "degrade"}))
        .send()
        .await
        .expect("policy");
    assert_eq!(r.status(), 200);
    let r = c.put(0, "degraded", &serde_json::json!(1)).await;
    assert!(r.status().is_success(), "{}", r.status());
    let lsn = r.json::<serde_json::Value>().await.expect("json")["lsn"]
        .as_u64()
        .expect("lsn");
    let view: serde_json::Value = c
        .client
        .get(c.url(0, "/v1/cluster"))
        .send()
        .await
        .expect("view")
        .json()
        .await
        .expect("json");
    assert_eq!(view["commit_degraded"], true, "{view}");
    let health: serde_json::Value = c
        .client
        .get(c.url(0, "/health"))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(health["commit_degraded"], true, "the health flag: {health}");
    let record = mirrordb::cluster::policy::read_record(&c.data_dir(0)).expect("record");
    let from = record.current().expect("open interval").from_lsn;
    assert!(
        from <= lsn,
        "degraded from {from}, after the write at {lsn}"
    );

    phase("the mirror comes back, catches up, and the primary leaves degraded mode");
    c.restart(1).await;
    c.converge().await;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let rec = mirrordb::cluster::policy::read_record(&c.data_dir(0)).expect("record");
        if rec.current().is_none() {
            assert!(rec.intervals[0].to_lsn.is_some());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still degraded after the mirror caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.assert_identical();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_mirror_resumes_from_its_own_journal_and_a_restarted_primary_is_followed_again()
{
    let mut rng = StdRng::seed_from_u64(seed());
    let mut c = Cluster::new(3, CommitPolicy::Quorum(1), OnUnavailable::Degrade).await;
    write_load(&c, &mut rng, 4, 100).await;
    c.converge().await;

    phase("stop a mirror, write on, restart it: it resumes, no reseed");
    c.stop(2).await;
    write_load(&c, &mut rng, 4, 100).await;
    c.restart(2).await;
    c.converge().await;
    c.assert_identical();
    let journal = c.data_dir(2).join("journal");
    let first = std::fs::read_dir(&journal)
        .expect("journal dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".journal"))
        .min()
        .expect("a segment");
    assert_eq!(
        first, "00000000000000000001.journal",
        "the mirror's journal still starts at LSN 1: it was not reseeded"
    );

    phase("restart the primary; both mirrors follow it again");
    c.stop(0).await;
    c.restart(0).await;
    write_load(&c, &mut rng, 4, 100).await;
    c.converge().await;
    c.assert_identical();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_too_far_behind_is_reseeded_automatically() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut c = Cluster::new(2, CommitPolicy::Async, OnUnavailable::Degrade).await;
    write_load(&c, &mut rng, 2, 50).await;
    c.converge().await;

    phase("the mirror stops; the primary writes on and drops the history it missed");
    c.stop(1).await;
    write_load(&c, &mut rng, 2, 200).await;
    let p = c.engine(0);
    p.rotate_journal().await.expect("rotate");
    p.flush().await.expect("flush");
    let dropped = p
        .drop_segments_upto(p.status().durable_lsn)
        .expect("drop segments");
    assert!(!dropped.is_empty(), "history was dropped");
    write_load(&c, &mut rng, 2, 50).await;

    phase("the mirror restarts, is reseeded from a snapshot, then streams; reads go on throughout");
    c.restart(1).await;
    let reader = {
        let client = c.client.clone();
        let url = c.url(1, "/v1/tables/t/records?limit=10");
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..200 {
                let s = client.get(&url).send().await.expect("read").status();
                statuses.push(s.as_u16());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            statuses
        })
    };
    c.converge().await;
    c.assert_identical();
    let statuses = reader.await.expect("reader");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "reads failed across the reseed: {statuses:?}"
    );
    assert!(
        !c.data_dir(1).join("rollback").exists(),
        "a mirror that was merely behind keeps nothing aside"
    );
    write_load(&c, &mut rng, 2, 50).await;
    c.converge().await;
    c.assert_identical();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_with_a_certificate_from_a_foreign_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, configs) = init_cluster(
        &dir.path().join("real"),
        2,
        CommitPolicy::Async,
        OnUnavailable::Degrade,
    );
    // Same node names and addresses, another CA.
    let foreign_dir = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign_dir).expect("dir");
    let foreign = InitArgs {
        nodes: configs[0]
            .cluster
            .as_ref()
            .expect("cluster")
            .members
            .iter()
            .map(|m| format!("{}={}", m.id, m.addr))
            .collect::<Vec<_>>()
            .join(","),
        http: format!(
            "n1=127.0.0.1:{},n2=127.0.0.1:{}",
            free_tcp_port(),
            free_tcp_port()
        ),
        commit_policy: CommitPolicy::Async,
        on_unavailable: OnUnavailable::Degrade,
        data_root: Some(foreign_dir.clone()),
        name: "intruder".into(),
        out: foreign_dir.join("certs"),
        json: false,
        if_missing: false,
        tokens: Vec::new(),
        witness: String::new(),
        no_failover: true,
    };
    let report = init(&foreign).expect("foreign init");
    let mut intruder_cfg = Config::load(&report.nodes[1].config).expect("config");
    // It dials the real primary.
    if let Some(cl) = intruder_cfg.cluster.as_mut() {
        cl.members = configs[1]
            .cluster
            .as_ref()
            .expect("cluster")
            .members
            .clone();
    }

    let primary = start_server(&configs[0]).await;
    let client = reqwest::Client::new();
    for i in 0..20 {
        let r = client
            .put(format!("{}/v1/tables/t/records/k{i}", primary.base_url()))
            .json(&serde_json::json!(i))
            .send()
            .await
            .expect("put");
        assert!(r.status().is_success());
    }
    phase("the intruder dials for a while and receives nothing");
    let intruder = start_server(&intruder_cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        intruder.current_engine().position().0,
        0,
        "the intruder received entries"
    );
    let view: serde_json::Value = client
        .get(format!("{}/v1/cluster", primary.base_url()))
        .send()
        .await
        .expect("view")
        .json()
        .await
        .expect("json");
    assert_eq!(view["mirrors"][0]["connected"], false, "{view}");
    intruder.shutdown().await.expect("stop");
    primary.shutdown().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposed_primary_saves_its_divergent_tail_and_follows_the_new_primary() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut c = Cluster::new(2, CommitPolicy::Async, OnUnavailable::Degrade).await;
    write_load(&c, &mut rng, 2, 40).await;
    c.converge().await;

    phase("the mirror stops; the old primary writes entries nobody else has");
    c.stop(1).await;
    for i in 0..5 {
        c.put(0, &format!("lost-{i}"), &serde_json::json!(i)).await;
    }
    let old_last = c.engine(0).status().durable_lsn;
    c.stop(0).await;

    phase("n2 is promoted to epoch 2 (as failover would) and writes");
    let mut n2_cfg = serve::engine_config(&c.configs[1]);
    n2_cfg.role = mirrordb::engine::Role::Mirror { primary_http: None };
    let n2 = serve::open_engine(n2_cfg).await.expect("open n2");
    let (epoch, fork) = n2.promote(2).await.expect("promote");
    assert_eq!(epoch, 2);
    assert!(
        fork <= old_last,
        "the old primary's tail overlaps the new epoch"
    );
    n2.shutdown().await.expect("close n2");
    drop(n2);
    for cfg in &mut c.configs {
        cfg.cluster.as_mut().expect("cluster").primary = Some("n2".into());
    }
    c.restart(1).await;
    for i in 0..5 {
        let r = c.put(1, &format!("new-{i}"), &serde_json::json!(i)).await;
        assert!(r.status().is_success(), "{}", r.status());
    }

    phase("the old primary restarts as a mirror of n2: its tail is saved, then it follows");
    c.restart(0).await;
    let last = c.engine(1).status().durable_lsn;
    let deadline = Instant::now() + CONVERGE;
    while c.engine(0).status().applied_lsn < last || c.engine(0).position().1 < 2 {
        assert!(Instant::now() < deadline, "n1 did not follow n2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        c.engine(0).digest().expect("digest"),
        c.engine(1).digest().expect("digest")
    );
    assert!(c.engine(0).get("t", "lost-4").expect("get").is_none());
    let saved: Vec<_> = std::fs::read_dir(c.data_dir(0).join("rollback"))
        .expect("rollback/ exists")
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(saved.len(), 1, "one saved tail");
    let saved_name = saved[0].file_name();
    let bytes = std::fs::metadata(saved[0].path()).expect("file").len();
    assert!(bytes > 0, "the saved tail holds the divergent frames");

    phase("a later reseed of n1 keeps the saved tail");
    c.stop(0).await;
    for i in 0..20 {
        c.put(1, &format!("more-{i}"), &serde_json::json!(i)).await;
    }
    let p = c.engine(1);
    p.rotate_journal().await.expect("rotate");
    p.flush().await.expect("flush");
    assert!(
        !p.drop_segments_upto(p.status().durable_lsn)
            .expect("drop")
            .is_empty()
    );
    c.put(1, "after-drop", &serde_json::json!(1)).await;
    c.restart(0).await;
    let last = c.engine(1).status().durable_lsn;
    let deadline = Instant::now() + CONVERGE;
    while c.engine(0).status().applied_lsn < last {
        assert!(Instant::now() < deadline, "n1 was not reseeded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        c.engine(0).digest().expect("digest"),
        c.engine(1).digest().expect("digest")
    );
    assert!(
        c.data_dir(0).join("rollback").join(&saved_name).exists(),
        "the saved tail survived the reseed"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_whose_disk_fails_stops_acknowledging_and_the_strict_primary_blocks() {
    let mut c = Cluster::new(2, CommitPolicy::Quorum(1), OnUnavailable::Strict).await;
    assert!(
        c.put(0, "a", &serde_json::json!(1))
            .await
            .status()
            .is_success()
    );
    c.converge().await;

    phase("the mirror restarts on a disk that will fail an fsync");
    c.stop(1).await;
    let disk = mirrordb::journal::disk::FaultyDisk::new();
    c.restart_on(1, std::sync::Arc::new(disk.clone())).await;
    assert!(
        c.put(0, "b", &serde_json::json!(2))
            .await
            .status()
            .is_success()
    );
    c.converge().await;

    phase("its next fsync fails: it stops acknowledging; the strict primary blocks writes");
    disk.plan(|p| p.fail_next_sync = true);
    let r = c.put(0, "c", &serde_json::json!(3)).await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "write_blocked", "{body}");
    assert!(
        !c.engine(1).status().journal_available,
        "the mirror's journal is marked unavailable"
    );

    phase("the failed mirror still serves reads but is not a healthy mirror");
    let get = |p: String| c.client.get(p).send();
    let r = get(c.url(1, "/v1/tables/t/records/b")).await.expect("read");
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let r = get(c.url(1, "/mirror")).await.expect("probe");
        if r.status() == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "/mirror still answers 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_routes_need_tokens_except_the_probes() {
    use mirrordb::config::{Role, TokenConfig};
    let token = |name: &str, secret: &str, role| TokenConfig {
        name: name.into(),
        token: secret.into(),
        role,
    };
    let c = Cluster::new_with(2, CommitPolicy::Async, OnUnavailable::Degrade, |cfg| {
        cfg.api.tokens = vec![
            token("reader", "reader-secret-0123456789", Role::Read),
            token("ops", "ops-secret-0123456789abc", Role::Admin),
        ];
    })
    .await;
    let get = |p: &str| c.client.get(c.url(0, p));
    assert_eq!(get("/primary").send().await.expect("probe").status(), 200);
    assert_eq!(get("/v1/cluster").send().await.expect("view").status(), 401);
    let r = get("/v1/cluster")
        .bearer_auth("reader-secret-0123456789")
        .send()
        .await
        .expect("view");
    assert_eq!(r.status(), 200);
    let put = |secret: &'static str| {
        c.client
            .put(c.url(0, "/v1/cluster/commit-policy"))
            .bearer_auth(secret)
            .json(&serde_json::json!({"commit_policy": "quorum:1"}))
            .send()
    };
    assert_eq!(
        put("reader-secret-0123456789").await.expect("put").status(),
        403
    );
    assert_eq!(
        put("ops-secret-0123456789abc").await.expect("put").status(),
        200
    );
    // A write on a mirror is authorised before it is redirected.
    let w = |secret: Option<&'static str>| {
        let mut r = c
            .client
            .put(c.url(1, "/v1/tables/t/records/a"))
            .json(&serde_json::json!(1));
        if let Some(s) = secret {
            r = r.bearer_auth(s);
        }
        r.send()
    };
    assert_eq!(w(None).await.expect("put").status(), 401);
    assert_eq!(
        w(Some("reader-secret-0123456789"))
            .await
            .expect("put")
            .status(),
        403
    );
    let r = w(Some("ops-secret-0123456789abc")).await.expect("put");
    assert_eq!(r.status(), 307);
    assert_eq!(
        r.headers()["location"].to_str().expect("location"),
        c.url(0, "/v1/tables/t/records/a")
    );
    // A read with min_lsn is authorised before it waits.
    let r = c
        .client
        .get(c.url(1, "/v1/tables/t/records/a?min_lsn=999999&wait_ms=60000"))
        .send()
        .await
        .expect("read");
    assert_eq!(r.status(), 401);
    // Too large a policy is refused with nothing changed.
    let r = c
        .client
        .put(c.url(0, "/v1/cluster/commit-policy"))
        .bearer_auth("ops-secret-0123456789abc")
        .json(&serde_json::json!({"commit_policy": "quorum:2"}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 400);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backups_run_on_the_primary_and_on_a_mirror_while_mirrors_replicate() {
    let mut rng = StdRng::seed_from_u64(seed());
    let c = Cluster::new(2, CommitPolicy::Quorum(1), OnUnavailable::Degrade).await;
    write_load(&c, &mut rng, 2, 60).await;

    phase("a backup on the primary while writes go on");
    let load = {
        let client = c.client.clone();
        let base = c.server(0).base_url();
        tokio::spawn(async move {
            for i in 0..100 {
                let r = client
                    .put(format!("{base}/v1/tables/t/records/during-{i}"))
                    .json(&serde_json::json!(i))
                    .send()
                    .await
                    .expect("put");
                assert!(r.status().is_success(), "{}", r.status());
            }
        })
    };
    let r = c
        .client
        .post(c.url(0, "/v1/backups?wait=true"))
        .send()
        .await
        .expect("backup");
    let status = r.status();
    let body = r.text().await.expect("body");
    assert!(
        status.is_success(),
        "backup on the primary: {status} {body}"
    );
    load.await.expect("writer");
    c.converge().await;
    c.assert_identical();

    phase("a backup on the mirror, which journals nothing of its own");
    let before = c.engine(1).position();
    let r = c
        .client
        .post(c.url(1, "/v1/backups?wait=true"))
        .send()
        .await
        .expect("backup");
    let status = r.status();
    let body = r.text().await.expect("body");
    assert!(status.is_success(), "backup on the mirror: {status} {body}");
    assert_eq!(
        c.engine(1).position(),
        before,
        "the mirror's journal is unchanged"
    );
    write_load(&c, &mut rng, 2, 40).await;
    c.converge().await;
    c.assert_identical();
    c.shutdown().await;
}
