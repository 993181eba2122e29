//! Backups and restores against a reference model (issue 3): random writes,
//! transactions, restore points, journal rotations and backups; then
//! restores to random targets (LSN, time, restore point, a set as taken,
//! the end) compared with what the model held at that point. Also: a backup
//! taken while writers never stop holds exactly the operations ≤ S, and a
//! journal of another database is refused.
//!
//! Replay a failure with the printed `MIRRORDB_SEED=…`.

#![allow(clippy::unwrap_used)]

use mirrordb::backup::{
    BackupSection, BackupService, RestoreOptions, RestoreTarget, Trigger, Until, restore_into,
    restore_into_with,
    verify::{VerifyOptions, verify},
};
use mirrordb::engine::{Engine, EngineConfig};
use mirrordb::model::{ClientIdentity, SessionId, WriteOp};
use mirrordb_tests::{phase, seed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

type State = BTreeMap<(String, String), (u64, Vec<u8>)>;

/// One acknowledged change: its LSN and the record's new state.
#[derive(Clone, Debug)]
struct Change {
    lsn: u64,
    table: String,
    key: String,
    value: Option<(u64, Vec<u8>)>,
}

/// BLOB contents at a point: (table, key) → bytes.
type Blobs = BTreeMap<(String, String), Vec<u8>>;

/// One acknowledged BLOB change.
#[derive(Clone, Debug)]
struct BlobChange {
    lsn: u64,
    table: String,
    key: String,
    bytes: Option<Vec<u8>>,
}

fn blobs_at(changes: &[BlobChange], lsn: u64) -> Blobs {
    let mut m = Blobs::new();
    for c in changes.iter().filter(|c| c.lsn <= lsn) {
        match &c.bytes {
            Some(b) => {
                m.insert((c.table.clone(), c.key.clone()), b.clone());
            }
            None => {
                m.remove(&(c.table.clone(), c.key.clone()));
            }
        }
    }
    m
}

/// The BLOBs among `keys` that a data directory holds.
async fn read_blobs(dir: &Path, keys: &[(String, String)]) -> Blobs {
    use futures::StreamExt;
    let e = open(dir).await;
    let mut out = Blobs::new();
    for (t, k) in keys {
        if e.tables().unwrap().iter().all(|x| &x.name != t) {
            continue;
        }
        if let Some(mut s) = e.blob(t, k).unwrap() {
            let mut b = Vec::new();
            while let Some(c) = s.next().await {
                b.extend_from_slice(&c.unwrap());
            }
            out.insert((t.clone(), k.clone()), b);
        }
    }
    e.shutdown().await.unwrap();
    out
}

fn model_at(changes: &[Change], lsn: u64) -> State {
    let mut m = State::new();
    for c in changes.iter().filter(|c| c.lsn <= lsn) {
        match &c.value {
            Some(v) => {
                m.insert((c.table.clone(), c.key.clone()), v.clone());
            }
            None => {
                m.remove(&(c.table.clone(), c.key.clone()));
            }
        }
    }
    m
}

fn engine_config(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    // Small segments, so backups archive several and rotation is exercised.
    c.segment_bytes = 32 << 10;
    c.flush_interval = std::time::Duration::from_millis(50);
    c
}

async fn open(dir: &Path) -> Engine {
    let cfg = engine_config(dir);
    tokio::task::spawn_blocking(move || Engine::open(cfg))
        .await
        .unwrap()
        .unwrap()
}

fn settings(dest: &Path) -> BackupSection {
    BackupSection {
        destination: dest.to_owned(),
        keep_last: 0,
        compression_level: 1,
        ..Default::default()
    }
}

async fn session(e: &Engine) -> SessionId {
    e.session(ClientIdentity {
        token_name: "test".into(),
        peer: "127.0.0.1".into(),
        client_session: "model".into(),
    })
    .await
    .unwrap()
}

/// Every record of a data directory, read through a freshly opened engine
/// (which also proves the restored directory opens).
async fn read_all(dir: &Path) -> State {
    let e = open(dir).await;
    let mut out = State::new();
    for t in e.tables().unwrap() {
        let mut after: Option<String> = None;
        loop {
            let page = e.scan(&t.name, "", after.as_deref(), 1000).unwrap();
            for r in &page.records {
                out.insert(
                    (t.name.clone(), r.key.clone()),
                    (r.version, r.value.clone()),
                );
            }
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
    }
    e.shutdown().await.unwrap();
    out
}

fn describe_diff(want: &State, got: &State) -> String {
    let mut s = String::new();
    for (k, v) in want {
        match got.get(k) {
            None => s.push_str(&format!("missing {k:?} (version {})\n", v.0)),
            Some(g) if g != v => s.push_str(&format!(
                "differs {k:?}: want version {} got {}\n",
                v.0, g.0
            )),
            _ => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        s.push_str(&format!("unexpected {k:?}\n"));
    }
    s
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_based_backups_and_point_in_time_restores() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dest = tmp.path().join("backups");
    let engine = open(&data).await;
    let svc = BackupService::new(engine.clone(), settings(&dest));
    let s = session(&engine).await;

    phase("random writes, transactions, restore points, rotations and backups");
    let mut changes: Vec<Change> = Vec::new();
    let mut blob_changes: Vec<BlobChange> = Vec::new();
    let mut names: Vec<(String, u64)> = Vec::new();
    let mut times: Vec<(u64, u64)> = Vec::new();
    let mut sets: Vec<(u32, u64)> = Vec::new();
    let mut last_lsn = 0u64;
    let tables = ["users", "orders", "t.x-1"];
    let key = |rng: &mut StdRng| format!("k{:03}", rng.random_range(0..40u32));
    let steps = 400;
    for step in 0..steps {
        let roll = rng.random_range(0..100u32);
        if roll < 60 {
            let table = tables[rng.random_range(0..tables.len())].to_string();
            let k = key(&mut rng);
            if rng.random_bool(0.8) {
                let value = format!(
                    "{{\"step\":{step},\"pad\":\"{}\"}}",
                    "x".repeat(rng.random_range(0..400))
                )
                .into_bytes();
                let ack = engine
                    .write(
                        s,
                        vec![WriteOp::Put {
                            table: table.clone(),
                            key: k.clone(),
                            value: value.clone(),
                            if_version: None,
                        }],
                    )
                    .await
                    .unwrap();
                changes.push(Change {
                    lsn: ack.lsn,
                    table,
                    key: k,
                    value: Some((ack.versions[0], value)),
                });
                last_lsn = ack.lsn;
            } else {
                let ack = engine
                    .write(
                        s,
                        vec![WriteOp::Delete {
                            table: table.clone(),
                            key: k.clone(),
                            if_version: None,
                        }],
                    )
                    .await
                    .unwrap();
                changes.push(Change {
                    lsn: ack.lsn,
                    table,
                    key: k,
                    value: None,
                });
                last_lsn = ack.lsn;
            }
        } else if roll < 63 {
            // A BLOB of up to 2.5 MiB (several 1 MiB chunks), or its delete.
            let key = format!("b{}", rng.random_range(0..4u32));
            if rng.random_bool(0.75) {
                let len = rng.random_range(0..(5usize << 19));
                let bytes: Vec<u8> = (0..len).map(|i| (i as u64 ^ seed) as u8).collect();
                let body = futures::stream::iter(
                    bytes
                        .chunks(300_000)
                        .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
                        .collect::<Vec<_>>(),
                );
                let ack = engine.put_blob(s, "files", &key, body).await.unwrap();
                blob_changes.push(BlobChange {
                    lsn: ack.lsn,
                    table: "files".into(),
                    key,
                    bytes: Some(bytes),
                });
                last_lsn = ack.lsn;
            } else {
                let ack = engine.delete_blob(s, "files", &key).await.unwrap();
                blob_changes.push(BlobChange {
                    lsn: ack.lsn,
                    table: "files".into(),
                    key,
                    bytes: None,
                });
                last_lsn = ack.lsn;
            }
        } else if roll < 75 {
            let n = rng.random_range(2..6usize);
            let mut ops = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for i in 0..n {
                let table = tables[rng.random_range(0..tables.len())].to_string();
                let k = key(&mut rng);
                if !seen.insert((table.clone(), k.clone())) {
                    continue;
                }
                if rng.random_bool(0.85) {
                    ops.push(WriteOp::Put {
                        table,
                        key: k,
                        value: format!("{{\"txn\":{step},\"i\":{i}}}").into_bytes(),
                        if_version: None,
                    });
                } else {
                    ops.push(WriteOp::Delete {
                        table,
                        key: k,
                        if_version: None,
                    });
                }
            }
            let ack = engine.write(s, ops.clone()).await.unwrap();
            for (i, op) in ops.into_iter().enumerate() {
                let (table, k, value) = match op {
                    WriteOp::Put {
                        table, key, value, ..
                    } => (table, key, Some((ack.versions[i], value))),
                    WriteOp::Delete { table, key, .. } => (table, key, None),
                };
                changes.push(Change {
                    lsn: ack.lsn,
                    table,
                    key: k,
                    value,
                });
            }
            last_lsn = ack.lsn;
        } else if roll < 80 {
            let name = format!("point-{step}");
            let ack = engine.restore_point(s, &name).await.unwrap();
            names.push((name, ack.lsn));
            last_lsn = ack.lsn;
        } else if roll < 85 {
            engine.rotate_journal().await.unwrap();
        } else if roll < 89 {
            let out = svc
                .run(Trigger::Manual { by: "test".into() })
                .await
                .unwrap();
            let lsn = out.lsn.unwrap();
            eprintln!("step {step}: backup {} at LSN {lsn}", out.number);
            sets.push((out.number, lsn));
            last_lsn = lsn;
        } else {
            // A time between two writes: everything acknowledged so far
            // is at or before it, everything later is after it.
            let t = now_us();
            while now_us() <= t {
                std::hint::spin_loop();
            }
            times.push((t, last_lsn));
        }
    }
    assert!(!sets.is_empty() || steps < 50, "the run took backups");
    if sets.is_empty() {
        let out = svc
            .run(Trigger::Manual { by: "test".into() })
            .await
            .unwrap();
        sets.push((out.number, out.lsn.unwrap()));
    }
    let end = engine.status().durable_lsn;

    phase("verify every set and the archive chain");
    let rep = verify(&dest, &VerifyOptions::default()).unwrap();
    assert!(rep.ok, "verify found problems: {:#?}", rep.checks);

    phase("restore to random targets and compare with the model");
    let mut targets: Vec<(RestoreTarget, u64, String)> =
        vec![(RestoreTarget::latest(), end, "latest".into())];
    for _ in 0..4 {
        let l = rng.random_range(1..=end);
        targets.push((
            RestoreTarget {
                set: None,
                until: Until::Lsn(l),
            },
            l,
            format!("lsn {l}"),
        ));
    }
    for _ in 0..3 {
        if let Some((t, lsn)) = times.get(rng.random_range(0..times.len().max(1))).copied() {
            targets.push((
                RestoreTarget {
                    set: None,
                    until: Until::TimeUs(t),
                },
                lsn,
                format!("time {t}"),
            ));
        }
    }
    for _ in 0..2 {
        if let Some((n, lsn)) = names.get(rng.random_range(0..names.len().max(1))).cloned() {
            // The last restore point of that name counts.
            let lsn = names
                .iter()
                .filter(|(m, _)| *m == n)
                .map(|x| x.1)
                .max()
                .unwrap_or(lsn);
            targets.push((
                RestoreTarget {
                    set: None,
                    until: Until::Name(n.clone()),
                },
                lsn,
                format!("name {n}"),
            ));
        }
    }
    // Before the first set: no base, the history from LSN 1 in archive [0000].
    if sets[0].1 > 1 {
        let l = rng.random_range(1..sets[0].1);
        targets.push((
            RestoreTarget {
                set: None,
                until: Until::Lsn(l),
            },
            l,
            format!("lsn {l}, before the first set"),
        ));
    }
    let (n, lsn) = sets[rng.random_range(0..sets.len())];
    targets.push((
        RestoreTarget {
            set: Some(n),
            until: Until::SetOnly,
        },
        lsn,
        format!("set {n} as taken"),
    ));
    for (i, (target, lsn, what)) in targets.into_iter().enumerate() {
        // Every other restore with the smallest page cache `--cache`
        // takes, so the data file is built while redb evicts all the time.
        let mut opts = RestoreOptions::default();
        if i % 2 == 1 {
            opts.cache_bytes = 1 << 20;
        }
        eprintln!(
            "restore {i}: {what} (model at LSN {lsn}; cache {} MiB)",
            opts.cache_bytes >> 20
        );
        let into = tmp.path().join(format!("restored-{i}"));
        let rep = restore_into_with(
            &dest,
            &into,
            target,
            Some(&engine.journal_dir()),
            opts,
            &|_| {},
        )
        .unwrap_or_else(|e| panic!("restore {what} failed: {e} (seed {seed})"));
        let want = model_at(&changes, lsn);
        let got = read_all(&into).await;
        assert!(
            want == got,
            "restore {what}: content differs from the model (seed {seed}):\n{}\nplan: {}",
            describe_diff(&want, &got),
            rep.plan.describe()
        );
        let want_blobs = blobs_at(&blob_changes, lsn);
        let keys: Vec<(String, String)> =
            (0..4).map(|i| ("files".into(), format!("b{i}"))).collect();
        let got_blobs = read_blobs(&into, &keys).await;
        assert!(
            want_blobs == got_blobs,
            "restore {what}: BLOBs differ (seed {seed}): want {:?}, got {:?}",
            want_blobs
                .iter()
                .map(|(k, v)| (k, v.len()))
                .collect::<Vec<_>>(),
            got_blobs
                .iter()
                .map(|(k, v)| (k, v.len()))
                .collect::<Vec<_>>()
        );
    }
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_does_not_freeze_writers_and_holds_exactly_the_ops_up_to_s() {
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dest = tmp.path().join("backups");
    let engine = open(&data).await;
    let svc = BackupService::new(engine.clone(), settings(&dest));
    let s = session(&engine).await;

    phase("a dataset large enough that streaming it takes a while");
    let pad = "p".repeat(900);
    for chunk in 0..40u32 {
        let ops = (0..500u32)
            .map(|i| WriteOp::Put {
                table: "bulk".into(),
                key: format!("b{chunk:03}-{i:04}"),
                value: format!("{{\"pad\":\"{pad}\"}}").into_bytes(),
                if_version: None,
            })
            .collect();
        engine.write(s, ops).await.unwrap();
    }

    phase("writers run continuously while a backup is taken");
    let stop = Arc::new(AtomicBool::new(false));
    let backup_done = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicU64::new(0));
    let acks = Arc::new(std::sync::Mutex::new(Vec::<Change>::new()));
    let mut writers = Vec::new();
    for w in 0..2u32 {
        let (e, stop, acks) = (engine.clone(), stop.clone(), acks.clone());
        let (done, during) = (backup_done.clone(), during.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let key = format!("w{w}-{}", i % 50);
                let value = format!("{{\"i\":{i}}}").into_bytes();
                let ack = e
                    .write(
                        s,
                        vec![WriteOp::Put {
                            table: "live".into(),
                            key: key.clone(),
                            value: value.clone(),
                            if_version: None,
                        }],
                    )
                    .await
                    .expect("writes never fail during a backup");
                if !done.load(Ordering::Acquire) {
                    during.fetch_add(1, Ordering::Relaxed);
                }
                acks.lock().unwrap().push(Change {
                    lsn: ack.lsn,
                    table: "live".into(),
                    key,
                    value: Some((ack.versions[0], value)),
                });
                i += 1;
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let out = svc
        .run(Trigger::Manual { by: "test".into() })
        .await
        .unwrap();
    backup_done.store(true, Ordering::Release);
    let s_lsn = out.lsn.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    stop.store(true, Ordering::Release);
    for w in writers {
        w.await.unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    let after_s = acks.iter().filter(|c| c.lsn > s_lsn).count();
    eprintln!(
        "backup {} at S = {s_lsn}: {} writes acknowledged while it ran, {after_s} after S in all",
        out.number,
        during.load(Ordering::Relaxed)
    );
    assert!(after_s > 0, "writes went on after the barrier");

    phase("the set holds exactly the operations up to S");
    let into = tmp.path().join("restored");
    restore_into(
        &dest,
        &into,
        RestoreTarget {
            set: Some(out.number),
            until: Until::SetOnly,
        },
        None,
        &|_| {},
    )
    .unwrap();
    let got = read_all(&into).await;
    let want_live = model_at(&acks, s_lsn);
    let got_live: State = got
        .iter()
        .filter(|((t, _), _)| t == "live")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(
        want_live == got_live,
        "seed {seed}: {}",
        describe_diff(&want_live, &got_live)
    );
    assert_eq!(
        got.keys().filter(|(t, _)| t == "bulk").count(),
        20_000,
        "every bulk record"
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_journal_of_another_database() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let dest = tmp.path().join("backups");
    let ea = open(&a).await;
    let eb = open(&b).await;
    let sa = session(&ea).await;
    ea.write(
        sa,
        vec![WriteOp::Put {
            table: "t".into(),
            key: "k".into(),
            value: b"1".to_vec(),
            if_version: None,
        }],
    )
    .await
    .unwrap();
    BackupService::new(ea.clone(), settings(&dest))
        .run(Trigger::Manual { by: "test".into() })
        .await
        .unwrap();
    phase("restoring with the live journal of database B is refused");
    let e = restore_into(
        &dest,
        &tmp.path().join("r"),
        RestoreTarget::latest(),
        Some(&eb.journal_dir()),
        &|_| {},
    )
    .unwrap_err();
    assert_eq!(e.code(), "foreign_database", "{e}");
    phase("and so is an archive of database B among A's sets");
    let dest_b = tmp.path().join("backups-b");
    BackupService::new(eb.clone(), settings(&dest_b))
        .run(Trigger::Manual { by: "test".into() })
        .await
        .unwrap();
    std::fs::copy(
        dest_b.join("mirrordb[0000].journal"),
        dest.join("mirrordb[0001].journal"),
    )
    .unwrap();
    let e = restore_into(
        &dest,
        &tmp.path().join("r2"),
        RestoreTarget::latest(),
        None,
        &|_| {},
    )
    .unwrap_err();
    assert_eq!(e.code(), "foreign_database", "{e}");
    ea.shutdown().await.unwrap();
    eb.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_checks_every_archive_and_with_a_set_only_those_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("backups");
    let e = open(&tmp.path().join("data")).await;
    let s = session(&e).await;
    let svc = BackupService::new(e.clone(), settings(&dest));
    for round in 0..2 {
        for i in 0..50 {
            e.write(
                s,
                vec![WriteOp::Put {
                    table: "t".into(),
                    key: format!("k{i}"),
                    value: format!("{round}").into_bytes(),
                    if_version: None,
                }],
            )
            .await
            .unwrap();
        }
        svc.run(Trigger::Manual { by: "test".into() })
            .await
            .unwrap();
    }
    e.shutdown().await.unwrap();
    let rep = verify(&dest, &VerifyOptions::default()).unwrap();
    assert!(rep.ok, "{:#?}", rep.checks);
    assert_eq!(rep.sets_checked, [1, 2]);
    assert_eq!(rep.archives_checked, [0, 1], "the history before set 1 too");

    phase("a damaged archive 0 fails verify; verify --set 1 does not read it");
    let a0 = dest.join("mirrordb[0000].journal");
    let mut b = std::fs::read(&a0).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x55;
    std::fs::write(&a0, b).unwrap();
    let rep = verify(&dest, &VerifyOptions::default()).unwrap();
    assert!(!rep.ok);
    let failed = rep.failed();
    assert!(
        failed.len() == 1 && failed[0].starts_with("archive 0 "),
        "{failed:?}"
    );
    let rep = verify(
        &dest,
        &VerifyOptions {
            set: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(rep.ok, "{:#?}", rep.checks);
    assert_eq!(rep.archives_checked, [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_backups_the_live_journal_alone_serves_restore_and_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let none = tmp.path().join("no-backups-here");
    let engine = open(&data).await;
    let s = session(&engine).await;
    let put = |k: &str, v: &str| WriteOp::Put {
        table: "t".into(),
        key: k.into(),
        value: v.as_bytes().to_vec(),
        if_version: None,
    };
    let l = engine
        .write(s, vec![put("a", "1"), put("b", "2")])
        .await
        .unwrap()
        .lsn;
    engine.write(s, vec![put("a", "3")]).await.unwrap();
    engine.write(s, vec![put("c", "4")]).await.unwrap();

    phase("point-in-time restore from the journal alone");
    let into = tmp.path().join("restored");
    restore_into(
        &none,
        &into,
        RestoreTarget {
            set: None,
            until: Until::Lsn(l),
        },
        Some(&engine.journal_dir()),
        &|_| {},
    )
    .unwrap();
    let got = read_all(&into).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[&("t".to_string(), "a".to_string())].1, b"1");

    phase("online rollback with the journal as history");
    let history = std::sync::Arc::new(mirrordb::backup::restore::BackupHistory {
        backup_dir: none.clone(),
        journal_dir: engine.journal_dir(),
    });
    let rep = engine.rollback(s, l, history.clone()).await.unwrap();
    assert_eq!((rep.keys_restored, rep.keys_deleted), (1, 1), "{rep:?}");
    assert_eq!(engine.get("t", "a").unwrap().unwrap().value, b"1");
    assert!(engine.get("t", "c").unwrap().is_none());

    phase("LSN 0 is refused; LSN 1, the first start, undoes every write");
    let e = restore_into(
        &none,
        &tmp.path().join("at-zero"),
        RestoreTarget {
            set: None,
            until: Until::Lsn(0),
        },
        Some(&engine.journal_dir()),
        &|_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("earliest target is LSN 1"), "{e}");
    let e = engine.rollback(s, 0, history.clone()).await.unwrap_err();
    assert_eq!(e.code(), "invalid_request", "{e}");
    engine.rollback(s, 1, history).await.unwrap();
    assert!(engine.get("t", "a").unwrap().is_none());
    assert!(engine.get("t", "b").unwrap().is_none());
    engine.shutdown().await.unwrap();
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Replaces every `"blake3": h` in `v` by `"sha256": sums[h]`.
fn to_sha256(v: &mut serde_json::Value, sums: &BTreeMap<String, String>) -> usize {
    let mut n = 0;
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::String(h)) = m.remove("blake3") {
                let sha = sums
                    .get(&h)
                    .unwrap_or_else(|| panic!("no file hashes to {h}"));
                m.insert("sha256".into(), sha.clone().into());
                n += 1;
            }
            for x in m.values_mut() {
                n += to_sha256(x, sums);
            }
        }
        serde_json::Value::Array(a) => {
            for x in a {
                n += to_sha256(x, sums);
            }
        }
        _ => {}
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_recorded_with_sha256_before_blake3_still_verify_and_restore() {
    use mirrordb::backup::format::{HashKind, checksum_file};
    let tmp = tempfile::tempdir().unwrap();
    let (a, dest) = (tmp.path().join("a"), tmp.path().join("backups"));
    let attached = tmp.path().join("settings.txt");
    std::fs::write(&attached, b"kept with every set").unwrap();
    let e = open(&a).await;
    let s = session(&e).await;
    let svc = BackupService::new(
        e.clone(),
        BackupSection {
            attached_files: vec![attached],
            ..settings(&dest)
        },
    );
    for round in 0..2 {
        for i in 0..200 {
            let ops = vec![WriteOp::Put {
                table: "t".into(),
                key: format!("k{i}"),
                value: format!("{{\"round\":{round},\"i\":{i}}}").into_bytes(),
                if_version: None,
            }];
            e.write(s, ops).await.unwrap();
        }
        svc.run(Trigger::Manual { by: "test".into() })
            .await
            .unwrap();
    }
    let want = e.digest().unwrap();
    assert_eq!(want.0, 200);
    e.shutdown().await.unwrap();

    phase("every recorded checksum rewritten as the SHA-256 of its file");
    let mut files = Vec::new();
    files_under(&dest, &mut files);
    let mut sums = BTreeMap::new();
    for f in &files {
        let (_, b3) = checksum_file(f, HashKind::Blake3).unwrap();
        let (_, sha) = checksum_file(f, HashKind::Sha256).unwrap();
        sums.insert(b3.hex().to_owned(), sha.hex().to_owned());
    }
    let mut rewritten = 0;
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|x| x == "json"))
    {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        rewritten += to_sha256(&mut v, &sums);
        std::fs::write(f, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
    // Two sets: snapshot, archive file and summary, attached file each;
    // the history lists files too.
    assert!(rewritten >= 8, "only {rewritten} checksums rewritten");

    phase("verify and restore read and check them");
    let rep = verify(&dest, &VerifyOptions::default()).unwrap();
    assert!(rep.ok, "verify found problems: {:#?}", rep.checks);
    let r = tmp.path().join("restored");
    restore_into(&dest, &r, RestoreTarget::latest(), None, &|_| {}).unwrap();
    let restored = open(&r).await;
    assert_eq!(restored.digest().unwrap(), want, "restored records differ");
    restored.shutdown().await.unwrap();

    phase("a wrong SHA-256 is found");
    let m = dest.join("mirrordb[0002].backup").join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    let wrong = "0".repeat(64);
    v["snapshot"]["sha256"] = wrong.clone().into();
    std::fs::write(&m, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let rep = verify(&dest, &VerifyOptions::default()).unwrap();
    assert!(!rep.ok, "a wrong SHA-256 passed verify");
    let e = restore_into(
        &dest,
        &tmp.path().join("r2"),
        RestoreTarget::latest(),
        None,
        &|_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains(&format!("sha256:{wrong}")), "{e}");
}
