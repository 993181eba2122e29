//! Cluster tests with child processes: the files `mirrordb cluster init`
//! writes start real `mirrordb serve --config` nodes as they are; nodes are
//! killed with SIGKILL at a seeded random moment under writes and restarted.
//!
//! ```text
//! mirrordb cluster init ─► 3 × mirrordb serve --config nX.toml (children)
//! writes ─► SIGKILL a mirror mid-stream ─► writes ─► restart it
//!        ─► SIGKILL the primary ─► restart it ─► writes
//! SIGTERM all ─► open each data directory ─► identical digests; the mirror
//! resumed from its own journal (no reseed)
//! ```

use mirrordb::engine::{Engine, EngineConfig, Role};
use mirrordb_tests::{ChildNode, phase, run_mirrordb, seed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};

const CONVERGE: Duration = Duration::from_secs(90);

fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("port")
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("port")
    }
}

fn spawn(dir: &Path, id: &str) -> ChildNode {
    let cfg = dir.join("certs").join(format!("{id}.toml"));
    ChildNode::spawn_with(
        &dir.join(format!("data-{id}")),
        &["--config", cfg.to_str().expect("utf-8 path")],
    )
    .expect("node starts")
}

async fn write(client: &reqwest::Client, node: &ChildNode, key: &str, v: u64) -> u64 {
    let r = client
        .put(node.url(&format!("/v1/tables/t/records/{key}")))
        .json(&serde_json::json!({"v": v}))
        .send()
        .await
        .expect("put");
    assert!(r.status().is_success(), "write answered {}", r.status());
    r.json::<serde_json::Value>().await.expect("json")["lsn"]
        .as_u64()
        .expect("lsn")
}

async fn applied(client: &reqwest::Client, node: &ChildNode) -> u64 {
    let v: serde_json::Value = client
        .get(node.url("/v1/cluster"))
        .send()
        .await
        .expect("cluster")
        .json()
        .await
        .expect("json");
    v["applied_lsn"].as_u64().unwrap_or(0)
}

async fn wait_applied(client: &reqwest::Client, node: &ChildNode, lsn: u64, what: &str) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let a = applied(client, node).await;
        if a >= lsn {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} applied only {a} of {lsn}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn digest(dir: &Path) -> (u64, u32) {
    let mut cfg = EngineConfig::new(dir);
    // Opened as a mirror: nothing is journaled by looking.
    cfg.role = Role::Mirror { primary_http: None };
    let e = Engine::open(cfg).expect("open data dir");
    e.digest().expect("digest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mirror_and_primary_resume_and_every_node_ends_identical() {
    let mut rng = StdRng::seed_from_u64(seed());
    let dir = tempfile::tempdir().expect("tempdir");
    phase("mirrordb cluster init writes certificates and node configs");
    let nodes = (1..=3)
        .map(|i| format!("n{i}=127.0.0.1:{}", free_port(true)))
        .collect::<Vec<_>>()
        .join(",");
    let http = (1..=3)
        .map(|i| format!("n{i}=127.0.0.1:{}", free_port(false)))
        .collect::<Vec<_>>()
        .join(",");
    let out = dir.path().join("certs");
    let (status, stdout, stderr) = run_mirrordb(&[
        "cluster",
        "init",
        "--nodes",
        &nodes,
        "--http",
        &http,
        "--out",
        out.to_str().expect("utf-8"),
        "--no-failover",
    ])
    .expect("cluster init runs");
    assert!(status.success(), "cluster init failed: {stdout}{stderr}");
    assert!(!out.join("ca.key").exists(), "the CA key is kept apart");

    phase("start the primary and two mirrors from the generated files");
    let mut n1 = spawn(dir.path(), "n1");
    let n2 = spawn(dir.path(), "n2");
    let n3 = spawn(dir.path(), "n3");
    let client = reqwest::Client::new();

    phase("writes; SIGKILL a mirror at a random moment");
    let kill_at = rng.random_range(20..120u64);
    eprintln!("killing n2 after {kill_at} writes");
    let mut last = 0;
    let mut n2 = Some(n2);
    for i in 0..200u64 {
        last = write(&client, &n1, &format!("k{}", rng.random_range(0..60u32)), i).await;
        if i == kill_at
            && let Some(n) = n2.take()
        {
            n.kill().expect("kill n2");
        }
    }
    phase("restart the mirror: it resumes from its own journal");
    let n2 = spawn(dir.path(), "n2");
    wait_applied(&client, &n2, last, "n2").await;
    wait_applied(&client, &n3, last, "n3").await;

    phase("SIGKILL the primary, restart it, write on");
    n1.kill().expect("kill n1");
    n1 = spawn(dir.path(), "n1");
    for i in 0..50u64 {
        last = write(&client, &n1, &format!("after-{i}"), i).await;
    }
    wait_applied(&client, &n2, last, "n2").await;
    wait_applied(&client, &n3, last, "n3").await;

    phase("mirrordb cluster status shows both mirrors connected");
    let (status, stdout, stderr) =
        run_mirrordb(&["cluster", "status", "--url", &n1.base]).expect("cluster status runs");
    assert!(status.success(), "{stdout}{stderr}");
    for m in ["n2", "n3"] {
        assert!(
            stdout.contains(&format!("mirror {m}: connected")),
            "{stdout}"
        );
    }

    phase("stop everything; the three data directories hold the same content");
    for n in [n2, n3, n1] {
        n.terminate().expect("SIGTERM");
    }
    let d1 = digest(&dir.path().join("data-n1"));
    assert_eq!(digest(&dir.path().join("data-n2")), d1, "n2 differs");
    assert_eq!(digest(&dir.path().join("data-n3")), d1, "n3 differs");
    let first_segment = std::fs::read_dir(dir.path().join("data-n2").join("journal"))
        .expect("journal")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".journal"))
        .min()
        .expect("segment");
    assert_eq!(
        first_segment, "00000000000000000001.journal",
        "n2 was not reseeded"
    );
}
