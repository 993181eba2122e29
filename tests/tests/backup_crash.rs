//! Crash during a backup (issue 3): a `mirrordb serve` child process is
//! SIGKILLed at seeded random moments while a backup streams. After each
//! kill: no directory that looks like a set lacks a complete manifest, the
//! node restarts healthy with every acknowledged record, the next backup
//! succeeds and cleans up the leftovers, and the whole destination verifies.
//!
//! Replay a failure with the printed `MIRRORDB_SEED=…`.

#![allow(clippy::unwrap_used)]

use mirrordb::backup::verify::{VerifyOptions, verify};
use mirrordb::backup::{Catalog, RestoreTarget, Until, restore_into};
use mirrordb_tests::{ChildNode, phase, seed, table_records};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// Kill rounds per run.
const ROUNDS: u32 = 4;
/// Records loaded before the first backup (enough that streaming takes a while).
const RECORDS: u32 = 6_000;

fn spawn(data: &Path, dest: &Path) -> ChildNode {
    ChildNode::spawn_with(data, &["--backup-dir", dest.to_str().unwrap()]).unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every directory named like a set has a complete manifest.
fn no_incomplete_set_looks_complete(dest: &Path) {
    if !dest.is_dir() {
        return;
    }
    let c = Catalog::scan(dest, "mirrordb").unwrap();
    assert!(
        c.incomplete.is_empty(),
        "a set directory without a complete manifest: {:?}",
        c.incomplete
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_backup_leaves_no_complete_looking_partial_set() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dest = tmp.path().join("backups");
    let c = reqwest::Client::new();
    let mut node = spawn(&data, &dest);

    phase("load records");
    let pad = "x".repeat(1500);
    for chunk in 0..RECORDS / 500 {
        let ops: Vec<Value> = (0..500)
            .map(|i| {
                json!({"op": "put", "table": "t", "key": format!("k{chunk:03}-{i:03}"),
                       "value": {"pad": pad}})
            })
            .collect();
        let r = c
            .post(node.url("/v1/transactions"))
            .json(&json!({ "ops": ops }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    for round in 0..ROUNDS {
        phase(&format!(
            "round {round}: start a backup, kill the node mid-way"
        ));
        let r = c.post(node.url("/v1/backups")).send().await.unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        let delay = rng.random_range(0..150u64);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let progress = c
            .get(node.url("/v1/backups/current"))
            .send()
            .await
            .ok()
            .map(|r| r.status());
        node.kill().unwrap();
        eprintln!(
            "killed after {delay} ms (progress answered {progress:?}); destination: {:?}",
            names(&dest)
        );
        no_incomplete_set_looks_complete(&dest);

        phase("restart: healthy, every record there");
        node = spawn(&data, &dest);
        let h: Value = c
            .get(node.url("/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(h["journal_available"], true, "{h}");
        let (count, tables) = table_records(&c, &node.url("/v1/tables"), "t")
            .await
            .unwrap();
        assert_eq!(count, Some(RECORDS as u64), "{tables}");
        let list: Value = c
            .get(node.url("/v1/backups"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            list["incomplete"].as_array().is_none_or(|a| a.is_empty()),
            "{list}"
        );

        phase("the next backup succeeds and removes the leftovers");
        let r = c
            .post(node.url("/v1/backups?wait=true"))
            .send()
            .await
            .unwrap();
        let out: Value = r.json().await.unwrap();
        assert_eq!(out["status"], "ok", "{out}");
        let left = names(&dest);
        assert!(
            !left.iter().any(|n| n.starts_with(".tmp-")),
            "leftovers removed: {left:?}"
        );
        let rep = verify(&dest, &VerifyOptions::default()).unwrap();
        assert!(rep.ok, "seed {seed}: {:#?}", rep.checks);
    }

    phase("the newest set restores with every record");
    let n = Catalog::scan(&dest, "mirrordb")
        .unwrap()
        .sets
        .last()
        .unwrap()
        .manifest
        .number;
    let into = tmp.path().join("restored");
    let rep = restore_into(
        &dest,
        &into,
        RestoreTarget {
            set: Some(n),
            until: Until::SetOnly,
        },
        None,
        &|_| {},
    )
    .unwrap();
    assert_eq!(rep.records, RECORDS as u64);
    node.terminate().unwrap();
}
