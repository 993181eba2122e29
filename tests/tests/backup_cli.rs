//! The backup commands through the real binary, as an operator types them:
//! `backup --wait`, `backups`, `verify [--restore]`, `restore --dry-run`,
//! `restore --until-lsn`, `rollback --to-lsn`; and `verify` failing on a
//! damaged snapshot.

#![allow(clippy::unwrap_used)]

use mirrordb_tests::{ChildNode, mirrordb_bin, phase};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    let out = Command::new(mirrordb_bin().unwrap())
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "$ mirrordb {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_json(o: &Output) -> Value {
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_back_up_verify_restore_and_roll_back() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dest = tmp.path().join("backups");
    let d = dest.to_str().unwrap();
    let node = ChildNode::spawn_with(&data, &["--backup-dir", d]).unwrap();
    let url = node.base.clone();
    let c = reqwest::Client::new();
    let mut last = 0;
    for i in 0..30 {
        let r: Value = c
            .put(node.url(&format!("/v1/tables/t/records/k{i}")))
            .json(&json!({"i": i}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        last = r["lsn"].as_u64().unwrap();
    }

    phase("mirrordb backup --wait --json");
    let o = run(&["backup", "--wait", "--json", "--url", &url]);
    assert!(o.status.success());
    let v = stdout_json(&o);
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["number"], 1);
    // S, the set's LSN: the backup marker after the last write.
    let s_lsn = v["lsn"].as_u64().unwrap();
    assert!(s_lsn > last);
    let o = run(&["backups", "--json", "--url", &url]);
    assert!(o.status.success());
    assert_eq!(stdout_json(&o)["sets"].as_array().unwrap().len(), 1);

    phase("more writes after the set, then verify --restore");
    c.put(node.url("/v1/tables/t/records/k0"))
        .json(&json!({"changed": true}))
        .send()
        .await
        .unwrap();
    let o = run(&["verify", "--from", d, "--restore"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("verified"));

    phase("restore --dry-run prints the plan and writes nothing");
    let to = tmp.path().join("restored");
    let t = to.to_str().unwrap();
    let jd = data.join("journal");
    let j = jd.to_str().unwrap();
    let l = s_lsn.to_string();
    let o = run(&[
        "restore",
        "--from",
        d,
        "--to",
        t,
        "--journal-dir",
        j,
        "--until-lsn",
        &l,
        "--dry-run",
    ]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("load set 1"));
    assert!(!to.exists());

    phase("a page cache under 1MiB is refused before anything is written");
    let o = run(&["restore", "--from", d, "--to", t, "--cache", "4KiB"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--cache must be at least 1MiB"), "{err}");
    assert!(!to.exists());

    phase("restore to S: the set, and nothing of the change after it");
    let o = run(&[
        "restore",
        "--from",
        d,
        "--to",
        t,
        "--journal-dir",
        j,
        "--until-lsn",
        &l,
        "--cache",
        "16MiB",
        "--json",
    ]);
    assert!(o.status.success());
    let rep = stdout_json(&o);
    assert_eq!(rep["records"], 30, "{rep}");
    assert_eq!(rep["last_lsn"].as_u64(), Some(s_lsn));
    assert_eq!(rep["forked"], true, "later history was left out");

    phase("online rollback through the CLI");
    let o = run(&["rollback", "--to-lsn", &l, "--url", &url, "--json"]);
    assert!(o.status.success());
    assert_eq!(stdout_json(&o)["keys_restored"], 1);
    let v: Value = c
        .get(node.url("/v1/tables/t/records/k0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"i": 0}));
    node.terminate().unwrap();

    phase("a damaged snapshot fails verify and names the file");
    let snap = dest.join("mirrordb[0001].backup/snapshot.zst");
    damage(&snap);
    let o = run(&["verify", "--from", d]);
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("FAIL") && text.contains("snapshot"), "{text}");
}

fn damage(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x55;
    std::fs::write(p, b).unwrap();
}
