//! `mirrordb compact` through the real binary: refused while the node runs,
//! then, with the node stopped, the data file is compacted after a backup
//! and rewrites, and the restarted node holds every record's last value
//! (that compaction returns the space a backup pinned is shown in
//! `engine::compact`'s tests).

#![allow(clippy::unwrap_used)]

use mirrordb_tests::{ChildNode, phase, run_mirrordb};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_is_refused_while_the_node_runs_and_keeps_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dest = tmp.path().join("backups");
    let d = data.to_str().unwrap();
    let node = ChildNode::spawn_with(&data, &["--backup-dir", dest.to_str().unwrap()]).unwrap();
    let c = reqwest::Client::new();
    let put = |i: u32, round: u32| {
        c.put(node.url(&format!("/v1/tables/t/records/k{i:04}")))
            .json(&json!({"round": round, "pad": "x".repeat(900)}))
            .send()
    };
    for i in 0..500 {
        assert!(put(i, 0).await.unwrap().status().is_success());
    }

    phase("a backup, then every record rewritten three times");
    let (status, out, err) =
        run_mirrordb(&["backup", "--wait", "--json", "--url", &node.base]).unwrap();
    assert!(status.success(), "{out}{err}");
    for round in 1..4 {
        for i in 0..500 {
            assert!(put(i, round).await.unwrap().status().is_success());
        }
    }

    phase("compact while the node runs: refused, nothing changed");
    let (status, out, err) = run_mirrordb(&["compact", "--data-dir", d]).unwrap();
    assert!(!status.success(), "{out}{err}");
    assert!(err.contains("in use"), "{err}");

    phase("node stopped: compact");
    node.terminate().unwrap();
    let (status, out, err) = run_mirrordb(&["compact", "--data-dir", d, "--json"]).unwrap();
    assert!(status.success(), "{out}{err}");
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    let (before, after) = (
        r["bytes_before"].as_u64().unwrap(),
        r["bytes_after"].as_u64().unwrap(),
    );
    assert!(after <= before, "{r}");

    phase("restarted: every record, the last round of each, and writes go on");
    let node = ChildNode::spawn(&data).unwrap();
    for i in 0..500 {
        let v: Value = c
            .get(node.url(&format!("/v1/tables/t/records/k{i:04}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["round"], 3, "k{i:04}: {v}");
    }
    let r = c
        .put(node.url("/v1/tables/t/records/after"))
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}
