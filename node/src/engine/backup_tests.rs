//! Tests of the engine's backup side: the barrier's snapshot holds exactly
//! the operations up to S while writes go on, a data directory rebuilt from
//! the snapshot plus the journal matches the original, rotation, dropping
//! archived segments, flush-and-lock, restore points and online rollback.

use super::test_support::{cfg, rt, tput, value};
use super::*;
use crate::journal::scan::{self, EntryIter};
use crate::model::{Op, WriteOp};
use std::collections::BTreeMap;

/// Rebuilds a data directory from a snapshot plus the live journal after S.
fn rebuild(point: &BackupPoint, journal_dir: &Path, to: &Path, until: u64) -> RestoredDataDir {
    let mut b = DataFileBuilder::create(to, point.db_id, point.epoch, point.lsn).unwrap();
    point.snapshot.for_each(|item| b.add_item(item)).unwrap();
    let (segs, _) = scan::list_segments(journal_dir).unwrap();
    for f in EntryIter::new(segs, point.lsn + 1, until) {
        b.integrate(&f.unwrap()).unwrap();
    }
    b.finish(None).unwrap()
}

#[test]
fn barrier_snapshot_holds_exactly_the_operations_up_to_s_while_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let point = rt.block_on(async {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for c in 0..4 {
            let (e, acked, stop) = (e.clone(), acked.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("c{c}-{i}");
                    let ack = e
                        .write(SessionId::SYSTEM, vec![tput(&key, &i.to_string())])
                        .await
                        .unwrap();
                    acked.lock().unwrap().insert(key, ack.versions[0]);
                    i += 1;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let point = e.backup_barrier(1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        point
    });
    let acked = acked.lock().unwrap().clone();
    let before: Vec<_> = acked.iter().filter(|(_, v)| **v < point.lsn).collect();
    let after: Vec<_> = acked.iter().filter(|(_, v)| **v > point.lsn).collect();
    assert!(
        !before.is_empty() && !after.is_empty(),
        "writes on both sides of S"
    );
    let mut in_snapshot = BTreeMap::new();
    point
        .snapshot
        .for_each(|item| {
            if let SnapshotItem::Record { key, version, .. } = item {
                in_snapshot.insert(key, version);
            }
            Ok::<(), ()>(())
        })
        .unwrap();
    for (k, v) in &before {
        assert_eq!(
            in_snapshot.get(*k),
            Some(*v),
            "acknowledged before S but missing: {k}"
        );
    }
    for (k, _) in &after {
        assert!(
            !in_snapshot.contains_key(*k),
            "written after S but in the snapshot: {k}"
        );
    }
    assert!(in_snapshot.values().all(|v| *v < point.lsn));

    // Snapshot + journal after S rebuilds the same content.
    let restored = tempfile::tempdir().unwrap();
    let end = e.status().durable_lsn;
    let r = rebuild(&point, &e.journal_dir(), &restored.path().join("data"), end);
    assert_eq!(r.last_lsn, end);
    let original = e.digest().unwrap();
    drop(e);
    let e2 = Engine::open(cfg(&restored.path().join("data"))).unwrap();
    assert_eq!(e2.digest().unwrap(), original);
    // The restored node journals on from the next LSN.
    rt.block_on(async {
        let ack = e2
            .write(SessionId::SYSTEM, vec![tput("new", "1")])
            .await
            .unwrap();
        assert!(ack.lsn > end);
    });
}

#[test]
fn barrier_rotates_and_archived_segments_can_be_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let e = Engine::open(cfg(dir.path())).unwrap();
        let point = rt.block_on(async {
            for i in 0..20 {
                e.write(SessionId::SYSTEM, vec![tput(&format!("k{i}"), "1")])
                    .await
                    .unwrap();
            }
            e.backup_barrier(1).await.unwrap()
        });
        assert_eq!(point.segments.len(), 1);
        // The barrier does not flush (writers would wait for it); the
        // pipeline flushes before it drops what it archived.
        let checkpoint = rt.block_on(e.flush()).unwrap();
        assert_eq!(checkpoint, point.lsn);
        assert_eq!(e.status().checkpoint_lsn, point.lsn);
        let dropped = e.drop_segments_upto(point.lsn).unwrap();
        assert_eq!(dropped, point.segments);
        rt.block_on(async {
            e.write(SessionId::SYSTEM, vec![tput("after", "1")])
                .await
                .unwrap();
            // Rotation on request, and none when the segment is empty.
            assert!(e.rotate_journal().await.unwrap().is_some());
            assert!(e.rotate_journal().await.unwrap().is_none());
        });
    }
    // A restart works with the journal starting after S.
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert_eq!(e.get("t", "k19").unwrap().unwrap().value, b"1");
    assert_eq!(e.get("t", "after").unwrap().unwrap().value, b"1");
}

/// Waits until the checkpoint reaches `lsn` (the applier flushes on its own).
async fn checkpoint_reaches(e: &Engine, lsn: u64) {
    let start = std::time::Instant::now();
    while e.status().checkpoint_lsn < lsn {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no flush reached {lsn}: {:?}",
            e.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn periodic_flushes_go_on_while_a_backup_snapshot_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut c = cfg(dir.path());
    c.flush_interval = Duration::from_millis(20);
    let e = Engine::open(c).unwrap();
    rt.block_on(async {
        let first = e
            .write(SessionId::SYSTEM, vec![tput("a", "1")])
            .await
            .unwrap();
        checkpoint_reaches(&e, first.lsn).await;
        let point = e.backup_barrier(1).await.unwrap();
        // The pipeline's forced flush, right after the barrier.
        assert!(e.flush().await.unwrap() >= point.lsn);
        let later = e
            .write(SessionId::SYSTEM, vec![tput("b", "2")])
            .await
            .unwrap();
        // Made durable by a periodic flush while the snapshot is still
        // open, and the snapshot still holds only what was there at S.
        checkpoint_reaches(&e, later.lsn).await;
        assert_eq!(value(&e, "t", "b").as_deref(), Some("2"), "writes go on");
        let mut keys = Vec::new();
        point
            .snapshot
            .for_each(|item| {
                if let SnapshotItem::Record { key, .. } = item {
                    keys.push(key);
                }
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(
            keys,
            vec!["a".to_string()],
            "the snapshot is the state at S"
        );
        drop(point);
    });
}

#[test]
fn point_in_time_inside_a_transaction_stops_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let ack = rt.block_on(async {
        e.write(SessionId::SYSTEM, vec![tput("solo", "1")])
            .await
            .unwrap();
        e.write(SessionId::SYSTEM, vec![tput("a", "1"), tput("b", "1")])
            .await
            .unwrap()
    });
    let (segs, _) = scan::list_segments(&e.journal_dir()).unwrap();
    let first = segs[0].header;
    let to = tempfile::tempdir().unwrap();
    let mut b = DataFileBuilder::create(to.path(), first.db_id, first.epoch, 0).unwrap();
    // Up to the first put of the transaction: its commit is missing.
    for f in EntryIter::new(segs, 1, ack.versions[0]) {
        b.integrate(&f.unwrap()).unwrap();
    }
    let r = b.finish(Some(first.epoch + 1)).unwrap();
    assert!(r.last_lsn < ack.versions[0]);
    assert_eq!(r.epoch, first.epoch + 1);
    drop(e);
    let e = Engine::open(cfg(to.path())).unwrap();
    assert!(e.get("t", "solo").unwrap().is_some());
    assert!(e.get("t", "a").unwrap().is_none());
    assert_eq!(e.status().epoch, first.epoch + 1);
}

#[test]
fn builder_refuses_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    rt.block_on(async {
        e.write(SessionId::SYSTEM, vec![tput("a", "1")])
            .await
            .unwrap();
    });
    let (segs, _) = scan::list_segments(&e.journal_dir()).unwrap();
    let to = tempfile::tempdir().unwrap();
    let mut b = DataFileBuilder::create(to.path(), segs[0].header.db_id, 1, 0).unwrap();
    let mut frames = EntryIter::new(segs, 1, u64::MAX);
    let _skip = frames.next();
    let err = b.integrate(&frames.next().unwrap().unwrap()).unwrap_err();
    assert!(err.to_string().contains("LSN gap"), "{err}");
}

#[test]
fn lock_holds_writes_until_unlock_and_refuses_them_past_their_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut c = cfg(dir.path());
    c.write_timeout = Duration::from_millis(400);
    let e = Engine::open(c).unwrap();
    rt.block_on(async {
        e.write(SessionId::SYSTEM, vec![tput("before", "1")])
            .await
            .unwrap();
        let st = e.lock("ops", Duration::from_secs(30)).await.unwrap();
        assert!(st.locked && st.depth == 1);
        assert_eq!(
            e.status().checkpoint_lsn,
            e.status().durable_lsn,
            "lock flushes"
        );
        // Re-entrant for the owner, refused for another.
        assert_eq!(
            e.lock("ops", Duration::from_secs(30)).await.unwrap().depth,
            2
        );
        assert_eq!(
            e.lock("other", Duration::from_secs(30))
                .await
                .unwrap_err()
                .code(),
            "write_blocked"
        );
        // A held write past its deadline is refused and not applied.
        let err = e
            .write(SessionId::SYSTEM, vec![tput("blocked", "1")])
            .await
            .unwrap_err();
        assert_eq!(err.code(), "write_blocked");
        assert!(err.to_string().contains("not applied"), "{err}");
        // A held write completes after the unlock.
        let waiting = {
            let e = e.clone();
            tokio::spawn(async move { e.write(SessionId::SYSTEM, vec![tput("held", "1")]).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "write held while locked");
        assert!(
            e.unlock("ops").await.unwrap().locked,
            "depth 2 -> 1 still locked"
        );
        let st = e.unlock("ops").await.unwrap();
        assert!(!st.locked);
        waiting.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(450)).await;
    });
    assert!(
        e.get("t", "blocked").unwrap().is_none(),
        "refused write never applied"
    );
    assert!(e.get("t", "held").unwrap().is_some());
    assert!(!e.lock_status().locked);
}

#[test]
fn lock_is_released_when_its_lease_lapses() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    rt.block_on(async {
        e.lock("crashed-tool", Duration::from_millis(150))
            .await
            .unwrap();
        // This write is held, then proceeds once the lease lapses.
        e.write(SessionId::SYSTEM, vec![tput("k", "1")])
            .await
            .unwrap();
    });
    assert!(!e.lock_status().locked);
}

#[test]
fn restore_points_are_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let ack = rt.block_on(async {
        e.restore_point(SessionId::SYSTEM, "before-migration")
            .await
            .unwrap()
    });
    let (segs, _) = scan::list_segments(&e.journal_dir()).unwrap();
    let f = EntryIter::new(segs, ack.lsn, ack.lsn)
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        crate::journal::format::decode_op(f.payload()).unwrap(),
        Op::RestorePoint {
            name: "before-migration".into()
        }
    );
    assert!(rt.block_on(e.restore_point(SessionId::SYSTEM, "")).is_err());
}

#[test]
fn rollback_puts_every_touched_key_back_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let history: Arc<dyn HistorySource> = Arc::new(LiveJournalHistory {
        journal_dir: e.journal_dir(),
    });
    rt.block_on(async {
        e.write(
            SessionId::SYSTEM,
            vec![
                tput("kept", "1"),
                tput("changed", "\"old\""),
                tput("deleted", "\"old\""),
            ],
        )
        .await
        .unwrap();
        let l = e.status().durable_lsn;
        e.write(SessionId::SYSTEM, vec![tput("changed", "\"new\"")])
            .await
            .unwrap();
        e.write(
            SessionId::SYSTEM,
            vec![WriteOp::Delete {
                table: "t".into(),
                key: "deleted".into(),
                if_version: None,
            }],
        )
        .await
        .unwrap();
        e.write(SessionId::SYSTEM, vec![tput("created", "\"new\"")])
            .await
            .unwrap();
        e.write(SessionId::SYSTEM, vec![tput("flipped", "\"x\"")])
            .await
            .unwrap();
        e.write(
            SessionId::SYSTEM,
            vec![WriteOp::Delete {
                table: "t".into(),
                key: "flipped".into(),
                if_version: None,
            }],
        )
        .await
        .unwrap();
        let before = e.status().durable_lsn;
        let r = e
            .rollback(SessionId::SYSTEM, l, history.clone())
            .await
            .unwrap();
        assert_eq!(
            (r.keys_restored, r.keys_deleted, r.keys_unchanged),
            (2, 1, 1)
        );
        assert!(r.lsn > before, "the rollback is journaled forward");
        let v = |k: &str| {
            e.get("t", k)
                .unwrap()
                .map(|r| String::from_utf8(r.value).unwrap())
        };
        assert_eq!(v("changed").as_deref(), Some("\"old\""));
        assert_eq!(v("deleted").as_deref(), Some("\"old\""));
        assert_eq!(v("created"), None);
        assert_eq!(v("kept").as_deref(), Some("1"));
        // One transaction: TxnBegin .. TxnCommit after `before`.
        let (segs, _) = scan::list_segments(&e.journal_dir()).unwrap();
        let ops: Vec<Op> = EntryIter::new(segs, before + 1, u64::MAX)
            .map(|f| crate::journal::format::decode_op(f.unwrap().payload()).unwrap())
            .collect();
        assert!(
            matches!(ops.first(), Some(Op::TxnBegin { ops: 3, .. })),
            "{ops:?}"
        );
        assert!(matches!(ops.last(), Some(Op::TxnCommit)));
        // Nothing left to undo: rolling back to the end is refused.
        let end = e.status().durable_lsn;
        assert!(e.rollback(SessionId::SYSTEM, end, history).await.is_err());
    });
}

/// Recovery row 5 with backups: a missing data file whose journal no longer
/// starts at LSN 1 is restored from the newest backup set (plus archives) up
/// to the live journal, which recovery then replays; the Backup Journal says
/// so. Without auto_restore the node refuses and names the backups.
#[test]
fn a_lost_data_file_is_restored_from_backups_and_the_live_journal() {
    use crate::backup::run::{BackupService, Trigger};
    use crate::backup::settings::BackupSection;
    let dir = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut c = cfg(dir.path());
    c.backup_dir = Some(backups.path().to_owned());
    let expected = {
        let e = Engine::open(c.clone()).unwrap();
        let service = BackupService::new(
            e.clone(),
            BackupSection {
                destination: backups.path().to_owned(),
                ..BackupSection::default()
            },
        );
        rt.block_on(async {
            for i in 0..30 {
                e.write(SessionId::SYSTEM, vec![tput(&format!("before-{i}"), "1")])
                    .await
                    .unwrap();
            }
            service
                .run(Trigger::Manual { by: "test".into() })
                .await
                .unwrap();
            for i in 0..30 {
                e.write(SessionId::SYSTEM, vec![tput(&format!("after-{i}"), "2")])
                    .await
                    .unwrap();
            }
            e.shutdown().await.unwrap();
        });
        e.digest().unwrap()
    };
    let (segs, _) = scan::list_segments(&dir.path().join("journal")).unwrap();
    assert!(
        segs[0].header.first_lsn > 1,
        "the backup archived the journal's start"
    );
    std::fs::remove_file(dir.path().join(store::DATA_FILE)).unwrap();

    let err = Engine::open(c.clone()).unwrap_err();
    assert!(err.to_string().contains("Backups exist"), "{err}");

    c.auto_restore = true;
    let e = Engine::open(c).unwrap();
    assert_eq!(e.recovery().action, RecoveryAction::RestoredFromBackup);
    assert!(
        e.recovery().replayed_entries > 0,
        "the live journal was replayed"
    );
    assert_eq!(e.digest().unwrap(), expected);
    let log: String = std::fs::read_dir(dir.path().join("logs"))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    assert!(log.contains("automatic restore"), "{log}");
}
