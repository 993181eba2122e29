//! The backup pipeline over HTTP and as an operator meets it: backups
//! through the API (waited for and in the background), the listing and
//! history, roles, restore points and online rollback; retention by
//! recorded number; the failure cases (missing or read-only destination, a
//! failing `on_start` hook, `on_finish` seeing the status, a stopped backup
//! leaving nothing behind); `only_if_changed`; attached files.

#![allow(clippy::unwrap_used)]

use mirrordb::backup::format::checksum_file;
use mirrordb::backup::{BackupSection, BackupService, BackupStatus, History, Trigger};
use mirrordb::config::{Config, Role, TokenConfig};
use mirrordb::engine::{Engine, EngineConfig};
use mirrordb::model::{ClientIdentity, WriteOp};
use mirrordb::serve;
use mirrordb_tests::{ADMIN_TOKEN, READ_TOKEN, phase};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;

async fn open(dir: &Path) -> Engine {
    let mut cfg = EngineConfig::new(dir);
    cfg.segment_bytes = 32 << 10;
    tokio::task::spawn_blocking(move || Engine::open(cfg))
        .await
        .unwrap()
        .unwrap()
}

fn section(dest: &Path) -> BackupSection {
    BackupSection {
        destination: dest.to_owned(),
        compression_level: 1,
        ..Default::default()
    }
}

async fn put(e: &Engine, n: u32) -> u64 {
    let s = e
        .session(ClientIdentity {
            token_name: "t".into(),
            peer: "local".into(),
            client_session: "s".into(),
        })
        .await
        .unwrap();
    let ops = (0..n)
        .map(|i| WriteOp::Put {
            table: "t".into(),
            key: format!("k{i:05}"),
            value: format!("{{\"i\":{i}}}").into_bytes(),
            if_version: None,
        })
        .collect();
    e.write(s, ops).await.unwrap().lsn
}

fn manual() -> Trigger {
    Trigger::Manual { by: "test".into() }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The node's /metrics text.
async fn scrape(c: &reqwest::Client, url: &str) -> String {
    c.get(url)
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// One sample of a /metrics text (`name` with its labels, if any).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_restore_points_and_rollback_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("backups");
    let mut config = Config::default();
    config.node.name = "test".into();
    config.node.data_dir = tmp.path().join("data");
    config.node.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.backup = section(&dest);
    let t = |name: &str, token: &str, role| TokenConfig {
        name: name.into(),
        token: token.into(),
        role,
    };
    config.api.tokens = vec![
        t("reader", READ_TOKEN, Role::Read),
        t("admin", ADMIN_TOKEN, Role::Admin),
    ];
    config.validate().unwrap();
    let engine = serve::open_engine(serve::engine_config(&config))
        .await
        .unwrap();
    let server = serve::start(&config, engine).await.unwrap();
    let base = server.base_url();
    let c = reqwest::Client::new();
    let url = |p: &str| format!("{base}{p}");

    phase("before any backup, the last success is at time 0 (an age alert fires)");
    let text = scrape(&c, &url("/metrics")).await;
    assert_eq!(
        metric(&text, "mirrordb_backup_last_success_timestamp_seconds"),
        0.0
    );

    phase("write records, then a backup that the request waits for");
    for i in 0..20 {
        let r = c
            .put(url(&format!("/v1/tables/t/records/k{i}")))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"i": i}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let r = c
        .post(url("/v1/backups"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "the read role cannot start a backup");
    let r = c
        .post(url("/v1/backups?wait=true"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["number"], 1, "{out}");
    assert_eq!(out["status"], "ok", "{out}");

    phase("a background backup, followed until it is done");
    let r = c
        .post(url("/v1/backups"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let started: Value = r.json().await.unwrap();
    assert_eq!(started["number"], 2);
    // A waiting request is answered when the backup ends: 404 and the
    // history already holds the set (30 s is far longer than the backup).
    let r = c
        .get(url("/v1/backups/current?wait_ms=30000"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "still running after the wait?");
    let r = c
        .get(url("/v1/backups/current?wait=1"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "an unknown parameter is refused");
    loop {
        let r = c
            .get(url("/v1/backups/current"))
            .bearer_auth(READ_TOKEN)
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], "no_backup_running");
            break;
        }
        assert_eq!(r.status(), 200);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let list: Value = c
        .get(url("/v1/backups"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sets: Vec<u64> = list["sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["number"].as_u64().unwrap())
        .collect();
    assert_eq!(sets, [1, 2], "{list}");
    assert_eq!(list["history"].as_array().unwrap().len(), 2, "{list}");
    assert!(
        dest.join("mirrordb[0000].journal").is_file()
            && dest.join("mirrordb[0001].journal").is_file()
    );
    phase("activity analysis still shows the writes that backups archived");
    let act: Value = c
        .get(url("/v1/journal?table=t&limit=1000"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let puts = act["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == "put")
        .count();
    assert_eq!(puts, 20, "{act}");
    let r = c
        .delete(url("/v1/backups/current"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "nothing to stop");

    phase("/metrics tells when the last backup succeeded");
    let text = scrape(&c, &url("/metrics")).await;
    let metric = |name: &str| metric(&text, name);
    assert!(metric("mirrordb_backups_total{status=\"ok\"}") >= 2.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = metric("mirrordb_backup_last_success_timestamp_seconds");
    assert!(last <= now + 1.0 && last > now - 600.0, "{last} vs {now}");
    assert!(metric("mirrordb_backup_last_success_bytes") > 0.0);
    assert_eq!(
        metric("mirrordb_backup_last_covered_timestamp_seconds"),
        last,
        "no skip: covered by the last success"
    );
    assert_eq!(metric("mirrordb_backup_running"), 0.0);
    assert_eq!(metric("mirrordb_backup_automatic_paused"), 0.0);

    phase("a restore point, a mistake, and an online rollback to the point");
    let rp: Value = c
        .post(url("/v1/restore-points"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "before-mistake"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rp_lsn = rp["lsn"].as_u64().unwrap();
    c.put(url("/v1/tables/t/records/k3"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"oops": true}))
        .send()
        .await
        .unwrap();
    c.delete(url("/v1/tables/t/records/k4"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    c.put(url("/v1/tables/t/records/new"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"new": true}))
        .send()
        .await
        .unwrap();
    let r = c
        .post(url("/v1/rollback"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"to_lsn": rp_lsn}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let report: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["keys_restored"], 2, "{report}");
    assert_eq!(report["keys_deleted"], 1, "{report}");
    let get = |k: &str| {
        c.get(url(&format!("/v1/tables/t/records/{k}")))
            .bearer_auth(READ_TOKEN)
            .send()
    };
    let v: Value = get("k3").await.unwrap().json().await.unwrap();
    assert_eq!(v, json!({"i": 3}));
    assert_eq!(get("k4").await.unwrap().status(), 200);
    assert_eq!(get("new").await.unwrap().status(), 404);

    phase("the Backup Journal records the rollback, and a refused one");
    let r = c
        .post(url("/v1/rollback"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"to_lsn": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let log =
        std::fs::read_to_string(tmp.path().join("data/logs/Backup Journal[001].txt")).unwrap();
    let want = format!(
        "rollback to LSN {rp_lsn} (admin): 2 records restored, 1 deleted, 0 unchanged; \
         compensating transaction at LSN {}",
        report["lsn"]
    );
    assert!(log.contains(&want), "{want}\n{log}");
    assert!(log.contains("rollback to LSN 0 (admin) failed: "), "{log}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_last_sets_by_number_and_deletes_after_success_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("backups");
    let e = open(&tmp.path().join("data")).await;
    let cfg = BackupSection {
        keep_last: 2,
        ..section(&dest)
    };
    let svc = BackupService::new(e.clone(), cfg.clone());

    phase("fewer sets than keep_last: nothing is deleted");
    put(&e, 10).await;
    let out = svc.run(manual()).await.unwrap();
    assert!(out.deleted.is_empty());
    put(&e, 10).await;
    svc.run(manual()).await.unwrap();
    assert_eq!(
        names(&dest),
        [
            "backupHistory.json",
            "mirrordb[0000].journal",
            "mirrordb[0001].backup",
            "mirrordb[0001].journal",
            "mirrordb[0002].backup"
        ]
    );

    phase("a third set: set 1 and the archives only it needs go");
    put(&e, 10).await;
    let out = svc.run(manual()).await.unwrap();
    assert_eq!(out.number, 3);
    assert_eq!(
        out.deleted.len(),
        3,
        "set 1, archives 0 and 1: {:?}",
        out.deleted
    );
    assert_eq!(
        names(&dest),
        [
            "backupHistory.json",
            "mirrordb[0002].backup",
            "mirrordb[0002].journal",
            "mirrordb[0003].backup"
        ]
    );
    let h = History::read(&dest).unwrap();
    assert_eq!(
        h.entries.iter().map(|e| e.number).collect::<Vec<_>>(),
        [2, 3],
        "as many history entries as retained sets"
    );
    // Each entry names the files its backup wrote, with their checksums.
    let files = &h.entries[1].files;
    assert_eq!(
        files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        [
            "mirrordb[0002].journal",
            "mirrordb[0003].backup/snapshot.zst"
        ],
        "{files:?}"
    );
    for f in files {
        let p = dest.join(&f.path);
        let (bytes, sum) = checksum_file(&p, f.checksum.kind()).unwrap();
        assert_eq!((bytes, &sum), (f.bytes, &f.checksum), "{}", f.path);
    }

    phase("a failed backup deletes nothing");
    let failing = BackupService::new(
        e.clone(),
        BackupSection {
            on_start: "exit 3".into(),
            ..cfg.clone()
        },
    );
    put(&e, 10).await;
    let err = failing.run(manual()).await.unwrap_err();
    assert_eq!(err.code(), "hook_failed", "{err}");
    assert_eq!(
        names(&dest),
        [
            "backupHistory.json",
            "mirrordb[0002].backup",
            "mirrordb[0002].journal",
            "mirrordb[0003].backup"
        ]
    );
    let h = History::read(&dest).unwrap();
    assert_eq!(h.entries.last().unwrap().status, BackupStatus::Failed);
    assert_eq!(h.entries.last().unwrap().number, 4);

    phase("a set removed by hand: numbering follows the record, retention the sets left");
    std::fs::remove_dir_all(dest.join("mirrordb[0003].backup")).unwrap();
    let out = svc.run(manual()).await.unwrap();
    assert_eq!(out.number, 4, "the history recorded 3");
    assert!(out.deleted.is_empty(), "sets 2 and 4 are the last two");
    assert!(dest.join("mirrordb[0002].backup").is_dir());
    assert!(dest.join("mirrordb[0004].backup").is_dir());
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_failures_hooks_stop_and_only_if_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open(&tmp.path().join("data")).await;
    put(&e, 50).await;

    phase("a missing destination that may not be created");
    let missing = tmp.path().join("not-mounted");
    let svc = BackupService::new(
        e.clone(),
        BackupSection {
            create_destination: false,
            ..section(&missing)
        },
    );
    let err = svc.run(manual()).await.unwrap_err();
    assert_eq!(err.code(), "destination_missing", "{err}");
    assert!(!missing.exists());

    phase("a destination that is a file");
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let err = BackupService::new(e.clone(), section(&file))
        .run(manual())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "destination_missing", "{err}");
    assert!(
        err.to_string().contains("is a file, not a directory"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");

    phase("a destination that cannot be written");
    // /sys refuses new files even to root.
    let svc = BackupService::new(e.clone(), section(Path::new("/sys")));
    let err = svc.run(manual()).await.unwrap_err();
    assert_eq!(err.code(), "destination_read_only", "{err}");

    phase("on_finish sees the status; attached files, one missing (partial)");
    let dest = tmp.path().join("backups");
    let report = tmp.path().join("hook.txt");
    let attached = tmp.path().join("app.toml");
    std::fs::write(&attached, "x = 1\n").unwrap();
    let svc = BackupService::new(
        e.clone(),
        BackupSection {
            on_finish: format!(
                "echo \"$MIRRORDB_BACKUP_NUMBER $MIRRORDB_BACKUP_STATUS\" >> '{}'",
                report.display()
            ),
            attached_files: vec![attached.clone(), tmp.path().join("missing.key")],
            ..section(&dest)
        },
    );
    let out = svc.run(manual()).await.unwrap();
    assert_eq!(out.status, BackupStatus::Partial);
    assert!(out.error.as_deref().unwrap().contains("missing.key"));
    assert_eq!(std::fs::read_to_string(&report).unwrap(), "1 partial\n");
    assert!(
        dest.join("mirrordb[0001].backup/attached/000-app.toml")
            .is_file()
    );

    phase("only_if_changed skips a backup when no data changed");
    let svc = BackupService::new(
        e.clone(),
        BackupSection {
            only_if_changed: true,
            ..section(&dest)
        },
    );
    assert_eq!(
        svc.last_covered_unix_s(),
        None,
        "set 1 is partial: no backup has ended ok yet"
    );
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        - 1.0;
    let out = svc.run(manual()).await.unwrap();
    assert!(out.skipped, "nothing changed since set 1");
    // The skip says the newest set still holds every write: the age an
    // operator alerts on starts again.
    let covered = svc.last_covered_unix_s().expect("a skip covers");
    assert!(covered >= before, "{covered} < {before}");
    // The history keeps it: a restarted node does not forget the skip.
    let restarted = BackupService::new(e.clone(), section(&dest));
    let kept = restarted
        .last_covered_unix_s()
        .expect("kept in the history");
    assert!((kept - covered).abs() < 0.002, "{kept} vs {covered}");
    assert_eq!(
        History::read(&dest).unwrap().entries.len(),
        1,
        "a skip is no history entry"
    );
    put(&e, 1).await;
    let out = svc.run(manual()).await.unwrap();
    assert!(!out.skipped);
    assert_eq!(out.number, 2);

    phase("a stopped backup ends interrupted and leaves nothing behind");
    put(&e, 2000).await;
    let svc = BackupService::new(e.clone(), section(&dest));
    let run = tokio::spawn({
        let svc = svc.clone();
        async move { svc.run(manual()).await }
    });
    // Stop it as soon as it is running (it may also finish first).
    while !run.is_finished() && svc.stop().is_none() {
        tokio::task::yield_now().await;
    }
    let r = run.await.unwrap();
    match &r {
        Err(e) => assert_eq!(e.code(), "backup_interrupted", "{e}"),
        Ok(out) => eprintln!("the backup finished before the stop: {}", out.number),
    }
    let left = names(&dest);
    assert!(
        !left.iter().any(|n| n.starts_with(".tmp-")),
        "partial files removed: {left:?}"
    );
    if r.is_err() {
        assert!(!dest.join("mirrordb[0003].backup").exists());
        let h = History::read(&dest).unwrap();
        assert_eq!(h.entries.last().unwrap().status, BackupStatus::Interrupted);
        // The next backup takes the number the interrupted one did not use.
        assert_eq!(svc.run(manual()).await.unwrap().number, 3);
    }
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_analysis_reads_archives_and_the_live_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("backups");
    let e = open(&tmp.path().join("data")).await;
    let svc = BackupService::new(e.clone(), section(&dest));
    let before = put(&e, 3).await;
    svc.run(manual()).await.unwrap();
    put(&e, 2).await;
    svc.run(manual()).await.unwrap();
    let after = put(&e, 1).await;

    phase("the live journal alone no longer holds the first writes");
    let filter = mirrordb::activity::Filter {
        table: Some("t".into()),
        ..Default::default()
    };
    let live = mirrordb::activity::query(&e.journal_dir(), &filter, 1000).unwrap();
    assert!(live.entries.iter().all(|x| x.lsn > before));
    // ... and says where it starts.
    let note = live.head_note.unwrap_or_default();
    assert!(
        note.contains("starts at LSN") && note.contains("entries 1..="),
        "{note}"
    );

    phase("archives and live journal together hold every put, in LSN order");
    let all =
        mirrordb::backup::activity::query(Some(&dest), &e.journal_dir(), &filter, 1000, tmp.path())
            .unwrap();
    let puts: Vec<u64> = all
        .entries
        .iter()
        .filter(|x| x.op == "put")
        .map(|x| x.lsn)
        .collect();
    assert_eq!(puts.len(), 6, "{:?}", all.entries);
    assert_eq!(all.head_note, None, "the archives reach back to LSN 1");
    assert!(puts.windows(2).all(|w| w[0] < w[1]));
    assert!(puts.contains(&after));
    assert!(puts.iter().any(|l| *l <= before));
    // A range inside the first archive only.
    let early = mirrordb::backup::activity::query(
        Some(&dest),
        &e.journal_dir(),
        &mirrordb::activity::Filter {
            to_lsn: Some(before),
            ..filter.clone()
        },
        1000,
        tmp.path(),
    )
    .unwrap();
    assert_eq!(early.entries.iter().filter(|x| x.op == "put").count(), 3);
    assert!(
        !std::fs::read_dir(tmp.path()).unwrap().any(|d| d
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("journal-view-")),
        "scratch views are removed"
    );
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_times_missed_while_down_are_recorded_as_failed() {
    use mirrordb::backup::manifest::HistoryEntry;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("backups");
    std::fs::create_dir_all(&dest).unwrap();
    let data = tmp.path().join("data");
    let e = open(&data).await;

    phase("the last scheduled backup ran five hours ago; the node was down since");
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let five_hours_ago = mirrordb::activity::format_time_us(now_us - 5 * 3600 * 1_000_000);
    let mut h = History::default();
    h.push(HistoryEntry {
        number: 1,
        started: five_hours_ago.clone(),
        duration_ms: 1,
        status: BackupStatus::Ok,
        trigger: "scheduled".into(),
        scheduled: Some(five_hours_ago),
        lsn: Some(1),
        error: None,
        files: vec![],
    });
    h.write(&dest).unwrap();
    let svc = BackupService::new(
        e.clone(),
        BackupSection {
            schedule: vec!["every 1h".into()],
            ..section(&dest)
        },
    );
    let task = svc.spawn_scheduler().expect("a schedule is configured");

    phase("at start, every hourly time in between is recorded as missed");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let missed = loop {
        let h = History::read(&dest).unwrap();
        let m = h
            .entries
            .iter()
            .filter(|x| x.status == BackupStatus::Missed)
            .count();
        if m > 0 || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!((4..=5).contains(&missed), "{missed} missed runs recorded");
    let log = std::fs::read_to_string(data.join("logs/Backup Journal[001].txt")).unwrap();
    assert!(log.contains("missed"), "{log}");
    task.abort();
    e.shutdown().await.unwrap();
}
