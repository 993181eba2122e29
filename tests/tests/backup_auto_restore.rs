//! Automatic restore at start (`recovery.auto_restore = true`, DESIGN §4):
//! a node whose data file is deleted restarts from its newest backup set,
//! the archives after it and its live journal, with every acknowledged
//! record, and the Backup Journal says so.

#![allow(clippy::unwrap_used)]

use mirrordb_tests::{ChildNode, phase, table_records};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_data_file_is_restored_from_backups_and_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dest = tmp.path().join("backups");
    let config = tmp.path().join("mirrordb.toml");
    std::fs::write(
        &config,
        format!(
            "[recovery]\nauto_restore = true\n[backup]\ndestination = {:?}\n",
            dest.display().to_string()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let c = reqwest::Client::new();
    let node = ChildNode::spawn_with(&data, &["--config", cfg]).unwrap();
    let put = |node: &ChildNode, k: String, i: u32| {
        c.put(node.url(&format!("/v1/tables/t/records/{k}")))
            .json(&json!({ "i": i }))
            .send()
    };

    phase("records, a backup, more records, a second backup, more records");
    for i in 0..20 {
        assert!(
            put(&node, format!("a{i}"), i)
                .await
                .unwrap()
                .status()
                .is_success()
        );
    }
    let r = c
        .post(node.url("/v1/backups?wait=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for i in 0..20 {
        put(&node, format!("b{i}"), i).await.unwrap();
    }
    let r = c
        .post(node.url("/v1/backups?wait=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for i in 0..20 {
        put(&node, format!("c{i}"), i).await.unwrap();
    }
    let before: Value = c
        .get(node.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    node.terminate().unwrap();

    phase("the data file disappears; the node restores it at start");
    std::fs::remove_file(data.join("mirrordb.redb")).unwrap();
    let node = ChildNode::spawn_with(&data, &["--config", cfg]).unwrap();
    let report = node.recovery_report().unwrap();
    eprintln!("recovery report: {report}");
    let (count, tables) = table_records(&c, &node.url("/v1/tables"), "t")
        .await
        .unwrap();
    assert_eq!(count, Some(60), "{tables}");
    for k in ["a0", "b19", "c19"] {
        let r = c
            .get(node.url(&format!("/v1/tables/t/records/{k}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{k}");
    }
    let after: Value = c
        .get(node.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        after["engine"]["db_id"], before["engine"]["db_id"],
        "the same database"
    );
    let log = std::fs::read_to_string(data.join("logs/Backup Journal[001].txt")).unwrap();
    assert!(log.contains("restore"), "{log}");

    phase("and the next backup continues the numbering");
    let out: Value = c
        .post(node.url("/v1/backups?wait=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(out["number"], 3, "{out}");
    assert_eq!(out["status"], "ok", "{out}");
    node.terminate().unwrap();
}
