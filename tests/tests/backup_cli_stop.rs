//! Ctrl-C in `mirrordb backup --wait` stops the backup on the node: the
//! run ends `interrupted`, nothing partial is left, and the command fails.
//! An `on_start` hook that sleeps keeps the backup running long enough to
//! be stopped, without relying on timing.

#![allow(clippy::unwrap_used)]

use mirrordb::backup::{BackupStatus, History};
use mirrordb_tests::{ChildNode, mirrordb_bin, phase};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_in_backup_wait_interrupts_the_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("backups");
    let config = tmp.path().join("mirrordb.toml");
    std::fs::write(
        &config,
        format!(
            "[backup]\ndestination = {:?}\non_start = \"sleep 3\"\n",
            dest.display().to_string()
        ),
    )
    .unwrap();
    let node = ChildNode::spawn_with(
        &tmp.path().join("data"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let c = reqwest::Client::new();
    c.put(node.url("/v1/tables/t/records/k"))
        .json(&serde_json::json!({"v": 1}))
        .send()
        .await
        .unwrap();

    phase("mirrordb backup --wait, then Ctrl-C while it runs");
    let mut cli = Command::new(mirrordb_bin().unwrap())
        .args(["backup", "--wait", "--url", &node.base])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.get(node.url("/v1/backups/current")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the backup never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give the command time to install its Ctrl-C handler (it polls the
    // node, which it only does after that).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = Command::new("kill")
        .args(["-INT", &cli.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || cli.wait().unwrap())
        .await
        .unwrap();
    assert!(!exit.success(), "an interrupted backup is a failure");

    phase("the history says interrupted; nothing partial is left");
    let h = History::read(&dest).unwrap();
    assert_eq!(
        h.entries.last().map(|e| e.status),
        Some(BackupStatus::Interrupted),
        "{h:?}"
    );
    let left: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left
            .iter()
            .any(|n| n.starts_with(".tmp-") || n.ends_with(".backup")),
        "{left:?}"
    );
    node.terminate().unwrap();
}
