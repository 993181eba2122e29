//! Engine tests: one per row of the recovery decision table (see
//! `recovery.rs`), the journal-unavailable faults injected through
//! `FaultyDisk`, and the write paths (transactions, preconditions, BLOBs,
//! unjournaled tables, sessions).

use super::test_support::{cfg, put, rt, value};
use super::*;
use crate::journal::disk::FaultyDisk;
use crate::journal::scan;
use crate::model::{ClientIdentity, WriteOp};
use std::io::Write;

/// Simulates SIGKILL: copies the data directory as the OS holds it (page
/// cache included, process memory lost) while the engine is idle, then drops
/// the engine. Recovery runs on the copy. (Dropping alone is no crash: redb
/// makes pending non-durable commits durable when a database is dropped.)
fn crash(e: Engine, dir: &Path) {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir, copy.path());
    drop(e); // joins the writer thread
    std::fs::remove_dir_all(dir).unwrap();
    copy_dir(copy.path(), dir);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for ent in std::fs::read_dir(from).unwrap() {
        let ent = ent.unwrap();
        let target = to.join(ent.file_name());
        if ent.file_type().unwrap().is_dir() {
            copy_dir(&ent.path(), &target);
        } else {
            std::fs::copy(ent.path(), target).unwrap();
        }
    }
}

fn last_segment(dir: &Path) -> PathBuf {
    let (segs, _) = scan::list_segments(&dir.join("journal")).unwrap();
    segs.last().unwrap().path.clone()
}

/// Where the last segment's entries end (zeroed blocks may follow them).
fn entries_end(dir: &Path) -> u64 {
    scan::verify(&dir.join("journal"), None, false)
        .unwrap()
        .last_segment_len
}

#[test]
fn writes_are_read_back_with_versions() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert_eq!(e.recovery().action, RecoveryAction::Created);
    rt.block_on(async {
        let ack = e
            .write(SessionId::SYSTEM, vec![put("t", "a", "1")])
            .await
            .unwrap();
        let rec = e.get("t", "a").unwrap().unwrap();
        assert_eq!(rec.version, ack.versions[0]);
        assert_eq!(rec.value, b"1");
        let ack2 = e
            .write(SessionId::SYSTEM, vec![put("t", "a", "2")])
            .await
            .unwrap();
        assert!(ack2.lsn > ack.lsn);
        e.write(
            SessionId::SYSTEM,
            vec![WriteOp::Delete {
                table: "t".into(),
                key: "a".into(),
                if_version: None,
            }],
        )
        .await
        .unwrap();
        assert_eq!(value(&e, "t", "a"), None);
        let tables = e.tables().unwrap();
        assert_eq!(tables.len(), 1);
        assert!(tables[0].journaled);
        e.shutdown().await.unwrap();
    });
}

#[test]
fn transactions_are_atomic_and_preconditions_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    rt.block_on(async {
        let ack = e
            .write(
                SessionId::SYSTEM,
                vec![put("t", "a", "1"), put("t", "b", "1")],
            )
            .await
            .unwrap();
        assert_eq!(ack.versions.len(), 2);
        let va = ack.versions[0];
        // A failed precondition on the second op: the first is not written.
        let err = e
            .write(
                SessionId::SYSTEM,
                vec![
                    put("t", "a", "2"),
                    WriteOp::Put {
                        table: "t".into(),
                        key: "b".into(),
                        value: b"2".to_vec(),
                        if_version: Some(999),
                    },
                ],
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "version_conflict");
        assert_eq!(value(&e, "t", "a").as_deref(), Some("1"));
        // Correct precondition succeeds; if_version 0 means "absent".
        e.write(
            SessionId::SYSTEM,
            vec![WriteOp::Put {
                table: "t".into(),
                key: "a".into(),
                value: b"3".to_vec(),
                if_version: Some(va),
            }],
        )
        .await
        .unwrap();
        e.write(
            SessionId::SYSTEM,
            vec![WriteOp::Put {
                table: "t".into(),
                key: "new".into(),
                value: b"1".to_vec(),
                if_version: Some(0),
            }],
        )
        .await
        .unwrap();
        let err = e
            .write(
                SessionId::SYSTEM,
                vec![WriteOp::Put {
                    table: "t".into(),
                    key: "new".into(),
                    value: b"1".to_vec(),
                    if_version: Some(0),
                }],
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "version_conflict");
        // Limits.
        let err = e
            .write(SessionId::SYSTEM, vec![put("bad table", "k", "1")])
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        let err = e
            .write(SessionId::SYSTEM, vec![put("t", "k", "{not json")])
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        let big = format!("\"{}\"", "x".repeat(model::MAX_VALUE_BYTES));
        let err = e
            .write(SessionId::SYSTEM, vec![put("t", "k", &big)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), "payload_too_large");
    });
}

#[test]
fn concurrent_writers_share_fsyncs_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..16 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    e.write(
                        SessionId::SYSTEM,
                        vec![put("t", &format!("c{c}-{i}"), &i.to_string())],
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(e.digest().unwrap().0, 800);
    let st = e.status();
    assert_eq!(st.durable_lsn, st.applied_lsn);
}

#[test]
fn blobs_stream_in_and_out_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let data: Vec<u8> = (0..(3 * model::BLOB_CHUNK_BYTES + 12345))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    {
        let e = Engine::open(cfg(dir.path())).unwrap();
        rt.block_on(async {
            let chunks: Vec<Result<Bytes, std::io::Error>> = data
                .chunks(100_000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            e.put_blob(
                SessionId::SYSTEM,
                "files",
                "f1",
                futures::stream::iter(chunks),
            )
            .await
            .unwrap();
        });
        crash(e, dir.path());
    }
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert_eq!(e.recovery().action, RecoveryAction::Replayed);
    rt.block_on(async {
        let mut s = e.blob("files", "f1").unwrap().unwrap();
        assert_eq!(s.size, data.len() as u64);
        let mut got = Vec::new();
        while let Some(c) = s.next().await {
            got.extend_from_slice(&c.unwrap());
        }
        assert!(got == data, "BLOB bytes differ after replay");
        e.delete_blob(SessionId::SYSTEM, "files", "f1")
            .await
            .unwrap();
        assert!(e.blob("files", "f1").unwrap().is_none());
    });
}

#[test]
fn unjournaled_tables_skip_the_journal_and_survive_only_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let e = Engine::open(cfg(dir.path())).unwrap();
        rt.block_on(async {
            e.set_table(
                SessionId::SYSTEM,
                "cache",
                TableOptions { journaled: false },
            )
            .await
            .unwrap();
            let before = e.status().durable_lsn;
            e.write(SessionId::SYSTEM, vec![put("cache", "flushed", "1")])
                .await
                .unwrap();
            assert_eq!(
                e.status().durable_lsn,
                before,
                "no journal entry for unjournaled writes"
            );
            e.flush().await.unwrap();
            e.write(SessionId::SYSTEM, vec![put("cache", "lost", "1")])
                .await
                .unwrap();
            let err = e
                .write(
                    SessionId::SYSTEM,
                    vec![put("cache", "x", "1"), put("t", "y", "1")],
                )
                .await
                .unwrap_err();
            assert!(matches!(err, WriteError::MixedJournaling(_)));
        });
        crash(e, dir.path());
    }
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert_eq!(value(&e, "cache", "flushed").as_deref(), Some("1"));
    assert_eq!(value(&e, "cache", "lost"), None);
    assert!(
        !e.tables()
            .unwrap()
            .iter()
            .find(|t| t.name == "cache")
            .unwrap()
            .journaled
    );
}

#[test]
fn sessions_are_journaled_once_per_identity() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let id = ClientIdentity {
        token_name: "app".into(),
        peer: "127.0.0.1:5000".into(),
        client_session: "s1".into(),
    };
    rt.block_on(async {
        let s1 = e.session(id.clone()).await.unwrap();
        let s2 = e.session(id.clone()).await.unwrap();
        assert_eq!(s1, s2);
        e.write(s1, vec![put("t", "k", "1")]).await.unwrap();
        e.shutdown().await.unwrap();
    });
    let (segs, _) = scan::list_segments(&dir.path().join("journal")).unwrap();
    let ops: Vec<Op> = scan::EntryIter::new(segs, 1, u64::MAX)
        .map(|f| crate::journal::format::decode_op(f.unwrap().payload()).unwrap())
        .collect();
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Op::SessionOpen { .. }))
            .count(),
        1
    );
    assert!(
        ops.iter()
            .any(|o| matches!(o, Op::Put { session, .. } if session.0 > 0))
    );
    assert!(ops.iter().any(|o| matches!(o, Op::SessionClose { .. })));
    assert!(matches!(ops.last(), Some(Op::DataFileClose)));
    assert!(matches!(ops.first(), Some(Op::DataFileOpen { .. })));
}

use crate::model::Op;

// ---- Recovery decision table: one test per row. ----

/// Row 1: data file opens, checkpoint = journal end, journal intact → open.
#[test]
fn recovery_row1_clean_shutdown_opens_without_replay() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let e = Engine::open(cfg(dir.path())).unwrap();
        rt.block_on(async {
            e.write(SessionId::SYSTEM, vec![put("t", "a", "1")])
                .await
                .unwrap();
            e.shutdown().await.unwrap();
        });
    }
    let e = Engine::open(cfg(dir.path())).unwrap();
    let r = e.recovery();
    assert_eq!(r.action, RecoveryAction::Opened);
    assert_eq!(r.replayed_entries, 0);
    assert_eq!(r.checkpoint_lsn, r.journal_last_lsn);
    assert_eq!(value(&e, "t", "a").as_deref(), Some("1"));
}

/// Row 2: data file behind the journal → replay (checkpoint, end].
#[test]
fn recovery_row2_crash_replays_after_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let e = Engine::open(cfg(dir.path())).unwrap();
        rt.block_on(async {
            e.write(SessionId::SYSTEM, vec![put("t", "before", "1")])
                .await
                .unwrap();
            e.flush().await.unwrap();
            for i in 0..100 {
                e.write(
                    SessionId::SYSTEM,
                    vec![put("t", &format!("k{i}"), &i.to_string())],
                )
                .await
                .unwrap();
            }
            e.write(
                SessionId::SYSTEM,
                vec![put("t", "x", "1"), put("t", "y", "1")],
            )
            .await
            .unwrap();
        });
        crash(e, dir.path());
    }
    let e = Engine::open(cfg(dir.path())).unwrap();
    let r = e.recovery();
    assert_eq!(r.action, RecoveryAction::Replayed);
    assert!(r.replayed_entries >= 104, "replayed {}", r.replayed_entries);
    assert_eq!(value(&e, "t", "k99").as_deref(), Some("99"));
    assert_eq!(value(&e, "t", "y").as_deref(), Some("1"));
    assert_eq!(e.digest().unwrap().0, 103);
}

/// Row 3: torn tail in the last segment → cut, replay; and a transaction
/// whose commit was torn away is never applied.
#[test]
fn recovery_row3_torn_tail_is_cut_and_open_txn_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let seg;
    let good_len;
    {
        let e = Engine::open(cfg(dir.path())).unwrap();
        rt.block_on(async {
            e.write(SessionId::SYSTEM, vec![put("t", "acked", "1")])
                .await
                .unwrap();
        });
        seg = last_segment(dir.path());
        good_len = entries_end(dir.path());
        rt.block_on(async {
            e.write(
                SessionId::SYSTEM,
                vec![put("t", "a", "1"), put("t", "b", "1")],
            )
            .await
            .unwrap();
        });
        crash(e, dir.path());
    }
    // Tear the transaction: keep TxnBegin and the first put, and half of the
    // second put (its commit never made it).
    let full = std::fs::read(&seg).unwrap();
    let txn_bytes = &full[good_len as usize..];
    let mut cut_at = 0;
    let mut frames = 0;
    while frames < 2 {
        let f = crate::journal::format::decode_frame(&txn_bytes[cut_at..]).unwrap();
        cut_at += f.frame_len();
        frames += 1;
    }
    let torn_len = good_len as usize + cut_at + 20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(torn_len as u64)
        .unwrap();

    let e = Engine::open(cfg(dir.path())).unwrap();
    let r = e.recovery().clone();
    let cut = r.tail_cut.expect("tail cut reported");
    assert_eq!(cut.offset, (good_len as usize + cut_at) as u64);
    assert_eq!(cut.bytes_removed, 20);
    assert!(
        r.aborted_txn_lsn.is_some(),
        "open transaction closed with TxnAbort"
    );
    assert_eq!(value(&e, "t", "acked").as_deref(), Some("1"));
    assert_eq!(
        value(&e, "t", "a"),
        None,
        "half a transaction is never applied"
    );
    assert_eq!(value(&e, "t", "b"), None);
    // The journal goes on densely after the cut.
    rt.block_on(async {
        e.write(SessionId::SYSTEM, vec![put("t", "after", "1")])
            .await
            .unwrap();
    });
    let st = scan::verify(&dir.path().join("journal"), None, false).unwrap();
    assert!(st.cut.is_none());
}

/// Row 3 (bad CRC variant): a flipped byte in the last frame → cut.
#[test]
fn recovery_row3_bad_crc_in_last_frame_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let e = Engine::open(cfg(dir.path())).unwrap();
        rt.block_on(async {
            e.write(SessionId::SYSTEM, vec![put("t", "a", "1")])
                .await
                .unwrap();
            e.write(SessionId::SYSTEM, vec![put("t", "b", "1")])
                .await
                .unwrap();
        });
        crash(e, dir.path());
    }
    let seg = last_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = entries_end(dir.path()) as usize;
    bytes[n - 2] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert!(e.recovery().tail_cut.is_some());
    assert_eq!(value(&e, "t", "a").as_deref(), Some("1"));
    assert_eq!(value(&e, "t", "b"), None);
}

/// Row 4: bad CRC before the tail → refuse, naming segment and offset.
#[test]
fn recovery_row4_corruption_before_tail_refuses_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let seg;
    let offset;
    {
        let e = Engine::open(cfg(dir.path())).unwrap();
        seg = last_segment(dir.path());
        rt.block_on(async {
            e.write(SessionId::SYSTEM, vec![put("t", "a", "1")])
                .await
                .unwrap();
        });
        offset = entries_end(dir.path());
        rt.block_on(async {
            e.write(SessionId::SYSTEM, vec![put("t", "b", "1")])
                .await
                .unwrap();
            e.write(SessionId::SYSTEM, vec![put("t", "c", "1")])
                .await
                .unwrap();
        });
        crash(e, dir.path());
    }
    let mut bytes = std::fs::read(&seg).unwrap();
    // A payload byte of the middle frame (b); frame c after it stays valid.
    bytes[offset as usize + 34] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let err = Engine::open(cfg(dir.path())).unwrap_err();
    match &err {
        OpenError::JournalCorrupt {
            segment,
            offset: at,
            ..
        } => {
            assert_eq!(segment, &seg);
            assert_eq!(*at, offset);
        }
        other => panic!("expected JournalCorrupt, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("mirrordb restore"),
        "message suggests restore: {msg}"
    );
    assert!(msg.contains(&offset.to_string()));
}

/// Row 4 (gap variant): a missing segment in the middle → refuse.
#[test]
fn recovery_row4_lsn_gap_between_segments_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut c = cfg(dir.path());
    c.segment_bytes = 300;
    {
        let e = Engine::open(c.clone()).unwrap();
        rt.block_on(async {
            for i in 0..30 {
                e.write(SessionId::SYSTEM, vec![put("t", &format!("k{i}"), "1")])
                    .await
                    .unwrap();
            }
        });
        crash(e, dir.path());
    }
    let (segs, _) = scan::list_segments(&dir.path().join("journal")).unwrap();
    assert!(segs.len() >= 4);
    std::fs::remove_file(&segs[2].path).unwrap();
    let err = Engine::open(c).unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::JournalCorrupt { .. } | OpenError::JournalBehindDataFile { .. }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("LSN") || err.to_string().contains("missing"),
        "{err}"
    );
}

/// Row 5: data file missing/damaged → refuse with the command, or rebuild
/// from the journal with auto_restore.
#[test]
fn recovery_row5_missing_or_damaged_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let e = Engine::open(cfg(dir.path())).unwrap();
        rt.block_on(async {
            e.write(
                SessionId::SYSTEM,
                vec![put("t", "a", "1"), put("t", "b", "2")],
            )
            .await
            .unwrap();
            e.shutdown().await.unwrap();
        });
    }
    let data = dir.path().join(store::DATA_FILE);
    // Damaged: overwrite the file's start.
    let mut f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    f.write_all(&[0xAB; 4096]).unwrap();
    drop(f);
    let err = Engine::open(cfg(dir.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, OpenError::DataFileDamaged { .. }), "{msg}");
    assert!(
        msg.contains("auto_restore") && msg.contains("mirrordb restore"),
        "{msg}"
    );
    let mut c = cfg(dir.path());
    c.auto_restore = true;
    let e = Engine::open(c.clone()).unwrap();
    assert_eq!(e.recovery().action, RecoveryAction::RebuiltFromJournal);
    assert!(
        e.recovery()
            .damaged_file_moved_to
            .as_ref()
            .unwrap()
            .exists()
    );
    assert_eq!(value(&e, "t", "b").as_deref(), Some("2"));
    rt.block_on(async { e.shutdown().await.unwrap() });
    drop(e);
    // Missing.
    std::fs::remove_file(&data).unwrap();
    assert!(matches!(
        Engine::open(cfg(dir.path())).unwrap_err(),
        OpenError::DataFileDamaged { .. }
    ));
    let e = Engine::open(c).unwrap();
    assert_eq!(e.recovery().action, RecoveryAction::RebuiltFromJournal);
    assert_eq!(value(&e, "t", "a").as_deref(), Some("1"));
}

/// Row 6: a journal of another database id → refuse.
#[test]
fn recovery_row6_foreign_journal_refuses() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let rt = rt();
    for d in [a.path(), b.path()] {
        let e = Engine::open(cfg(d)).unwrap();
        rt.block_on(async {
            e.write(SessionId::SYSTEM, vec![put("t", "k", "1")])
                .await
                .unwrap();
            e.shutdown().await.unwrap();
        });
    }
    std::fs::remove_dir_all(a.path().join("journal")).unwrap();
    copy_dir(&b.path().join("journal"), &a.path().join("journal"));
    let err = Engine::open(cfg(a.path())).unwrap_err();
    assert!(matches!(err, OpenError::ForeignJournal { .. }), "{err}");
    assert!(err.to_string().contains("another database"));
}

/// Extra row: journal files missing behind the data file → refuse.
#[test]
fn recovery_journal_missing_behind_checkpoint_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let e = Engine::open(cfg(dir.path())).unwrap();
        rt.block_on(async {
            e.write(SessionId::SYSTEM, vec![put("t", "k", "1")])
                .await
                .unwrap();
            e.shutdown().await.unwrap();
        });
    }
    std::fs::remove_dir_all(dir.path().join("journal")).unwrap();
    let err = Engine::open(cfg(dir.path())).unwrap_err();
    assert!(
        matches!(err, OpenError::JournalBehindDataFile { .. }),
        "{err}"
    );
}

/// Every row above has a test: this list is checked against the table in
/// recovery.rs so a new row cannot be added without a test.
#[test]
fn every_decision_table_row_has_a_test() {
    let table = include_str!("recovery.rs");
    let rows = table
        .lines()
        .filter(|l| {
            l.starts_with("//! | ") && !l.contains("---") && !l.contains("data file | journal")
        })
        .count();
    let tests = [
        "recovery_row1_clean_shutdown_opens_without_replay",
        "recovery_row2_crash_replays_after_checkpoint",
        "recovery_row3_torn_tail_is_cut_and_open_txn_aborted",
        "recovery_row4_corruption_before_tail_refuses_with_location",
        "recovery_row5_missing_or_damaged_data_file",
        "recovery_row6_foreign_journal_refuses",
        "recovery_journal_missing_behind_checkpoint_refuses",
    ];
    assert_eq!(rows, tests.len(), "decision table rows vs tests");
    let src = include_str!("tests.rs");
    for t in tests {
        assert!(src.contains(&format!("fn {t}()")), "missing test {t}");
    }
}

// ---- Journal unavailable: injected faults. ----

fn faulty(dir: &Path) -> (EngineConfig, FaultyDisk) {
    let disk = FaultyDisk::new();
    let mut c = cfg(dir);
    c.disk = Arc::new(disk.clone());
    (c, disk)
}

fn assert_unavailable_then_recovers(fault: impl FnOnce(&FaultyDisk)) {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let (c, disk) = faulty(dir.path());
    {
        let e = Engine::open(c).unwrap();
        rt.block_on(async {
            e.write(SessionId::SYSTEM, vec![put("t", "acked", "1")])
                .await
                .unwrap();
            fault(&disk);
            let err = e
                .write(SessionId::SYSTEM, vec![put("t", "failed", "1")])
                .await
                .unwrap_err();
            assert_eq!(err.code(), "journal_unavailable", "{err}");
            // Never retried: later writes are refused too, even though the
            // fault was one-shot.
            let err = e
                .write(SessionId::SYSTEM, vec![put("t", "later", "1")])
                .await
                .unwrap_err();
            assert_eq!(err.code(), "journal_unavailable");
            // Reads go on.
            assert_eq!(value(&e, "t", "acked").as_deref(), Some("1"));
            let st = e.status();
            assert!(!st.journal_available);
            assert!(st.journal_error.is_some());
        });
        crash(e, dir.path());
    }
    // A restart recovers: acknowledged data present, refused writes absent
    // or (for a failed fsync whose bytes did reach the file) at most
    // present as unacknowledged entries, never half a transaction.
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert_eq!(value(&e, "t", "acked").as_deref(), Some("1"));
    assert_eq!(value(&e, "t", "later"), None);
    rt.block_on(async {
        e.write(SessionId::SYSTEM, vec![put("t", "again", "1")])
            .await
            .unwrap();
    });
}

#[test]
fn failed_fsync_makes_journal_unavailable() {
    assert_unavailable_then_recovers(|d| d.plan(|p| p.fail_next_sync = true));
}

#[test]
fn torn_write_makes_journal_unavailable() {
    assert_unavailable_then_recovers(|d| d.plan(|p| p.tear_next_write_at = Some(10)));
}

#[test]
fn disk_full_makes_journal_unavailable() {
    assert_unavailable_then_recovers(|d| d.plan(|p| p.space_left = Some(5)));
}

#[test]
fn second_process_on_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _e = Engine::open(cfg(dir.path())).unwrap();
    assert!(matches!(
        Engine::open(cfg(dir.path())).unwrap_err(),
        OpenError::Locked(_)
    ));
}

#[test]
fn shutting_down_twice_succeeds_and_later_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    rt.block_on(async {
        e.shutdown().await.unwrap();
        e.shutdown().await.unwrap();
        let err = e
            .write(SessionId::SYSTEM, vec![put("t", "k", "1")])
            .await
            .unwrap_err();
        assert_eq!(err.code(), "shutting_down");
    });
}

#[test]
fn concurrent_first_writes_of_one_client_open_one_session() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let id = ClientIdentity {
        token_name: "app".into(),
        peer: "127.0.0.1".into(),
        client_session: "s".into(),
    };
    let ids = rt.block_on(async {
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (e, id) = (e.clone(), id.clone());
                tokio::spawn(async move { e.session(id).await.unwrap() })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        ids
    });
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    let (segs, _) = scan::list_segments(&dir.path().join("journal")).unwrap();
    let opens = scan::EntryIter::new(segs, 1, u64::MAX)
        .map(|f| crate::journal::format::decode_op(f.unwrap().payload()).unwrap())
        .filter(|o| matches!(o, Op::SessionOpen { .. }))
        .count();
    assert_eq!(opens, 1);
}

/// Compare-and-set increments from many clients at once: the apply stage
/// applies one batch while the writer checks the next batch's
/// preconditions, which must see the versions of batches not yet applied.
/// A precondition checked against the data file alone would let two
/// increments from the same version both succeed, and the counter would
/// end below the number of acknowledged increments.
#[test]
fn preconditions_see_batches_the_apply_stage_has_not_applied_yet() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    const CLIENTS: usize = 16;
    const INCREMENTS: u64 = 60;
    let acked = rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0u64;
                while done < INCREMENTS {
                    // Plain writes beside the increments keep requests
                    // queued behind each batch, so batches are handed over.
                    e.write(SessionId::SYSTEM, vec![put("load", &format!("{c}"), "1")])
                        .await
                        .unwrap();
                    let (version, n) = match e.get("t", "counter").unwrap() {
                        Some(r) => (
                            r.version,
                            std::str::from_utf8(&r.value)
                                .unwrap()
                                .parse::<u64>()
                                .unwrap(),
                        ),
                        None => (0, 0),
                    };
                    let r = e
                        .write(
                            SessionId::SYSTEM,
                            vec![WriteOp::Put {
                                table: "t".into(),
                                key: "counter".into(),
                                value: (n + 1).to_string().into_bytes(),
                                if_version: Some(version),
                            }],
                        )
                        .await;
                    match r {
                        Ok(_) => done += 1,
                        Err(err) => assert_eq!(err.code(), "version_conflict", "{err}"),
                    }
                }
                done
            }));
        }
        let mut acked = 0;
        for t in tasks {
            acked += t.await.unwrap();
        }
        acked
    });
    assert_eq!(acked, CLIENTS as u64 * INCREMENTS);
    assert_eq!(value(&e, "t", "counter"), Some(acked.to_string()));
    // The journal replays to the same count.
    crash(e, dir.path());
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert_eq!(value(&e, "t", "counter"), Some(acked.to_string()));
}

/// A journaled write is answered once its fdatasync returns, before the
/// apply stage commits it to the data file, and a read waits for that
/// commit: the test holds the data file's lane (so the stage cannot
/// commit), gets its write acknowledged, and starts a read, which must
/// wait for the lane and then see the write.
#[test]
fn writes_are_answered_at_their_fsync_and_reads_wait_for_the_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    rt.block_on(e.write(SessionId::SYSTEM, vec![put("t", "k", "1")]))
        .unwrap();
    let lane = e.inner.lane.clone();
    let guard = apply::lock(&lane);
    let acked = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(30),
            e.write(SessionId::SYSTEM, vec![put("t", "k", "2")]),
        )
        .await
    });
    let acked = acked.expect("the write waited for the data file, not only for its fsync");
    acked.unwrap();
    let reader = {
        let e = e.clone();
        std::thread::spawn(move || value(&e, "t", "k"))
    };
    let t0 = Instant::now();
    while e.inner.shared.read_gate.waiting() == 0 {
        assert!(
            !reader.is_finished(),
            "the read did not wait for the acknowledged write: {:?}",
            reader.join()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the read never waited"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(guard);
    assert_eq!(reader.join().unwrap().as_deref(), Some("2"));
    assert_eq!(value(&e, "t", "k").as_deref(), Some("2"));
}

/// A read of one record waits only for the acknowledged batches that wrote
/// it (or changed more than records), not for every write in flight: with
/// the lane held (the stage cannot commit), a read of a record the pending
/// write did not touch answers at once, while a read of the written record
/// and a scan wait. A batch that creates a table holds up every record
/// read.
#[test]
fn a_record_read_waits_only_for_acknowledged_writes_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    rt.block_on(e.write(
        SessionId::SYSTEM,
        vec![put("t", "written", "1"), put("t", "other", "7")],
    ))
    .unwrap();
    fn in_thread(
        e: &Engine,
        f: impl FnOnce(&Engine) -> Option<String> + Send + 'static,
    ) -> std::sync::mpsc::Receiver<Option<String>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let e = e.clone();
        std::thread::spawn(move || {
            let _ = tx.send(f(&e));
        });
        rx
    }
    let answered = |rx: &std::sync::mpsc::Receiver<Option<String>>| {
        rx.recv_timeout(Duration::from_millis(300)).ok()
    };
    let guard = apply::lock(&e.inner.lane);
    rt.block_on(e.write(SessionId::SYSTEM, vec![put("t", "written", "2")]))
        .unwrap();

    // Answered while the pending write is held back (given all the time
    // a loaded machine may need: only the reads that must wait are timed).
    let other = in_thread(&e, |e| value(e, "t", "other"));
    assert_eq!(
        other.recv_timeout(Duration::from_secs(30)).ok(),
        Some(Some("7".into())),
        "a read of a record no pending write touched waited"
    );
    let written = in_thread(&e, |e| value(e, "t", "written"));
    let scanned = in_thread(&e, |e| {
        let page = e.scan("t", "", None, 10).unwrap();
        Some(page.records.len().to_string() + &String::from_utf8_lossy(&page.records[1].value))
    });
    assert_eq!(
        answered(&written),
        None,
        "the written record was read before its commit"
    );
    assert_eq!(
        answered(&scanned),
        None,
        "a scan did not wait for the pending write"
    );
    drop(guard);
    let wait = Duration::from_secs(30);
    assert_eq!(written.recv_timeout(wait).unwrap().as_deref(), Some("2"));
    assert_eq!(scanned.recv_timeout(wait).unwrap().as_deref(), Some("22"));

    // A write that creates a table: every record read waits for it.
    let guard = apply::lock(&e.inner.lane);
    rt.block_on(e.write(SessionId::SYSTEM, vec![put("new", "k", "1")]))
        .unwrap();
    let other = in_thread(&e, |e| value(e, "t", "other"));
    assert_eq!(
        answered(&other),
        None,
        "a record read did not wait for a new table"
    );
    drop(guard);
    assert_eq!(other.recv_timeout(wait).unwrap().as_deref(), Some("7"));
    assert_eq!(value(&e, "new", "k").as_deref(), Some("1"));
}

/// The API's reads wait for the data file the same way but without
/// holding up their thread: on a one-thread runtime, a timer fires while a
/// read waits for an acknowledged write the stage cannot commit yet (the
/// test holds the lane), and the read then sees the write.
#[test]
fn async_reads_wait_for_the_data_file_without_blocking_their_thread() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let writes = rt();
    writes
        .block_on(e.write(SessionId::SYSTEM, vec![put("t", "k", "1")]))
        .unwrap();
    let lane = e.inner.lane.clone();
    let guard = apply::lock(&lane);
    writes
        .block_on(e.write(SessionId::SYSTEM, vec![put("t", "k", "2")]))
        .unwrap();
    let one_thread = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let read = one_thread.block_on(async {
        let reader = {
            let e = e.clone();
            tokio::spawn(async move {
                let r = e.reader_async().await?;
                r.get("t", "k")
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !reader.is_finished(),
            "the read answered before the data file held the acknowledged write: {:?}",
            reader.await
        );
        drop(guard);
        reader.await.unwrap()
    });
    let rec = read.unwrap().expect("the acknowledged write is read");
    assert_eq!(rec.value, b"2".to_vec());
}

/// When the data file fails to take a batch that was already acknowledged
/// (it is durable in the journal), nothing more is applied or accepted,
/// reads of what the batch wrote (and scans) answer an error rather than a
/// state without the acknowledged write, reads of other records go on,
/// and the next start replays it. The test holds the lane while the write
/// is acknowledged, fails it, and lets go.
#[test]
fn an_acknowledged_write_the_data_file_failed_to_take_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    rt.block_on(e.write(SessionId::SYSTEM, vec![put("t", "before", "1")]))
        .unwrap();
    let lane = e.inner.lane.clone();
    let mut guard = apply::lock(&lane);
    rt.block_on(e.write(SessionId::SYSTEM, vec![put("t", "acked", "1")]))
        .unwrap();
    guard.fail(store::StoreError("injected apply failure".into()));
    drop(guard);
    let err = e.get("t", "acked").unwrap_err();
    assert_eq!(err.code(), "storage_error", "{err}");
    assert!(err.to_string().contains("a restart applies them"), "{err}");
    let err = e.scan("t", "", None, 10).unwrap_err();
    assert_eq!(err.code(), "storage_error", "{err}");
    assert_eq!(value(&e, "t", "before").as_deref(), Some("1"));
    let later = rt
        .block_on(e.write(SessionId::SYSTEM, vec![put("t", "later", "1")]))
        .unwrap_err();
    assert!(
        matches!(later.code(), "storage_error" | "journal_unavailable"),
        "{later}"
    );
    crash(e, dir.path());
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert_eq!(value(&e, "t", "acked").as_deref(), Some("1"));
    assert_eq!(value(&e, "t", "before").as_deref(), Some("1"));
    assert_eq!(value(&e, "t", "later"), None);
}

/// A batch that holds writes to an unjournaled table is answered by the
/// apply stage after its commit (the data file is those writes' only
/// copy): when the data file fails to take it, it is refused, and so is
/// every batch behind it, and none is applied. Driven on a stage of its own
/// over an idle engine's lane, failed while the stage waits for it.
#[test]
fn nothing_is_acknowledged_or_applied_after_an_unjournaled_batch_fails_to_apply() {
    use super::apply::Unjournaled;
    use super::stage::{Batch, Pending, Stage};
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    rt.block_on(async {
        e.set_table(SessionId::SYSTEM, "u", TableOptions { journaled: false })
            .await
            .unwrap();
        e.write(SessionId::SYSTEM, vec![put("u", "before", "1")])
            .await
            .unwrap();
    });
    let mut stage = Stage::start(e.inner.lane.clone(), e.inner.shared.clone()).unwrap();
    let batch = |stage: &mut Stage, key: &str| {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let batch = Batch {
            seq: stage.next_seq(),
            entries: Vec::new(),
            unjournaled: vec![Unjournaled {
                table: "u".into(),
                key: key.into(),
                value: Some(b"1".to_vec()),
                version: 1,
            }],
            pending: vec![Pending::Ack(
                reply,
                WriteAck {
                    lsn: 1,
                    versions: vec![1],
                },
            )],
            ops: 1,
        };
        (batch, rx)
    };
    let mut guard = apply::lock(&e.inner.lane);
    let (first, ack1) = batch(&mut stage, "failed");
    stage.dispatch(first);
    let (second, ack2) = batch(&mut stage, "behind");
    stage.dispatch(second);
    guard.fail(store::StoreError("injected apply failure".into()));
    drop(guard);
    for ack in [ack1, ack2] {
        let err = rt.block_on(ack).unwrap().unwrap_err();
        assert_eq!(err.code(), "storage_error", "{err}");
    }
    stage.drain();
    let view = e.inner.store.read().unwrap();
    assert!(
        view.get("u", "failed").unwrap().is_none(),
        "a failed batch was applied"
    );
    assert!(
        view.get("u", "behind").unwrap().is_none(),
        "a batch behind it was applied"
    );
    assert!(view.get("u", "before").unwrap().is_some());
}

/// Batches that queue up while the stage is busy share a data-file
/// transaction only once they are durable: a batch answered at its
/// fdatasync must not be abandoned with a later batch whose sync failed
/// (the node would then never show a write it acknowledged). The test
/// holds the lane so that three batches queue up, reports the first two
/// durable and the third lost, and lets go.
#[test]
fn a_failed_sync_never_takes_an_earlier_answered_batch_with_it() {
    use super::stage::{Batch, Stage};
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let mut stage = Stage::start(e.inner.lane.clone(), e.inner.shared.clone()).unwrap();
    let next = e.inner.shared.durable_lsn.load(Ordering::Acquire) + 1;
    // Answered by the writer at its fdatasync: nothing for the stage to send.
    let batch = |stage: &mut Stage, lsn: u64, key: &str| Batch {
        seq: stage.next_seq(),
        entries: vec![(
            lsn,
            Op::Put {
                session: SessionId::SYSTEM,
                table: "t".into(),
                key: key.into(),
                value: b"1".to_vec(),
            },
        )],
        unjournaled: Vec::new(),
        pending: Vec::new(),
        ops: 1,
    };
    let guard = apply::lock(&e.inner.lane);
    let seqs: Vec<u64> = ["first", "answered", "lost"]
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let b = batch(&mut stage, next + i as u64, key);
            let seq = b.seq;
            stage.hand_over(b);
            seq
        })
        .collect();
    stage.synced(seqs[1]);
    stage.sync_failed(seqs[2], "injected fdatasync failure".into());
    drop(guard);
    stage.drain();
    let view = e.inner.store.read().unwrap();
    assert!(view.get("t", "first").unwrap().is_some());
    assert!(
        view.get("t", "answered").unwrap().is_some(),
        "a durable batch was abandoned with the lost one behind it"
    );
    assert!(view.get("t", "lost").unwrap().is_none());
    drop(view);
    drop(stage);
}

/// Writes are answered while the data file is held up (as by a long
/// flush): the writer neither waits for the apply stage after a few
/// batches nor at its periodic tick, which used to wait for the stage
/// every 200 ms. The test holds the lane for a second of writes.
#[test]
fn writes_are_answered_while_the_data_file_is_held_up() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    rt.block_on(e.write(SessionId::SYSTEM, vec![put("t", "k", "0")]))
        .unwrap();
    let guard = apply::lock(&e.inner.lane);
    let t0 = Instant::now();
    let mut i = 0;
    while t0.elapsed() < Duration::from_secs(1) {
        i += 1;
        let w = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                e.write(SessionId::SYSTEM, vec![put("t", &format!("k{i}"), "1")]),
            )
            .await
        });
        w.unwrap_or_else(|_| panic!("write {i} waited for the held data file"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(guard);
    assert!(i >= 10, "{i} writes");
    for j in 1..=i {
        assert_eq!(value(&e, "t", &format!("k{j}")).as_deref(), Some("1"));
    }
}

/// The apply stage may fall behind the journal by up to `QUEUE_BYTES`, so
/// a data-file flush holding it up does not stop the writer at once; past
/// that the writer waits for it. The test holds the lane (as a flush does)
/// and hands over a hundred small batches (all go in at once), then two of
/// half the budget each: the first goes in at once, the second only after
/// the lane is let go.
#[test]
fn the_writer_waits_for_the_apply_stage_only_past_its_byte_budget() {
    use super::stage::{Batch, QUEUE_BYTES, Stage};
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let mut stage = Stage::start(e.inner.lane.clone(), e.inner.shared.clone()).unwrap();
    let next = e.inner.shared.durable_lsn.load(Ordering::Acquire) + 1;
    let batch = |stage: &mut Stage, lsn: u64, key: &str, bytes: usize| Batch {
        seq: stage.next_seq(),
        entries: vec![(
            lsn,
            Op::Put {
                session: SessionId::SYSTEM,
                table: "t".into(),
                key: key.into(),
                value: vec![b'1'; bytes],
            },
        )],
        unjournaled: Vec::new(),
        pending: Vec::new(),
        ops: 1,
    };
    let guard = apply::lock(&e.inner.lane);
    let (tx, rx) = std::sync::mpsc::channel();
    let driver = std::thread::spawn(move || {
        // Many small batches queue up behind the held lane.
        for i in 0..100 {
            let b = batch(&mut stage, next + i, &format!("small{i}"), 100);
            let seq = b.seq;
            stage.hand_over(b);
            stage.synced(seq);
        }
        tx.send("small").unwrap();
        let b = batch(&mut stage, next + 100, "first", QUEUE_BYTES / 2);
        let seq = b.seq;
        stage.hand_over(b);
        stage.synced(seq);
        tx.send("first").unwrap();
        let b = batch(&mut stage, next + 101, "second", QUEUE_BYTES / 2);
        let seq = b.seq;
        stage.hand_over(b);
        tx.send("second").unwrap();
        stage.synced(seq);
        stage.drain();
        assert_eq!(stage.queued(), (0, 0));
        drop(stage);
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)),
        Ok("small"),
        "small batches waited for the held lane"
    );
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok("first"));
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the second batch went past the byte budget while the first waited"
    );
    drop(guard);
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok("second"));
    driver.join().unwrap();
    let view = e.inner.store.read().unwrap();
    assert!(view.get("t", "small99").unwrap().is_some());
    assert!(view.get("t", "first").unwrap().is_some());
    assert!(view.get("t", "second").unwrap().is_some());
}

/// A batch refused because the journal failed still counts for the apply
/// stage: the next request that waits for the stage (here the shutdown,
/// with no write in between) must not wait for that batch for ever.
#[test]
fn shutdown_right_after_a_failed_fsync_completes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let (c, disk) = faulty(dir.path());
    let e = Engine::open(c).unwrap();
    let done = rt.block_on(async {
        e.write(SessionId::SYSTEM, vec![put("t", "acked", "1")])
            .await
            .unwrap();
        disk.plan(|p| p.fail_next_sync = true);
        let err = e
            .write(SessionId::SYSTEM, vec![put("t", "failed", "1")])
            .await
            .unwrap_err();
        assert_eq!(err.code(), "journal_unavailable", "{err}");
        tokio::time::timeout(Duration::from_secs(30), e.shutdown())
            .await
            .is_ok()
    });
    if !done {
        // Dropping it would join the hung writer thread.
        std::mem::forget(e);
        panic!("shutdown hung after the failed batch");
    }
}

/// The apply stage's side of a batch handed over before its fdatasync: it
/// is applied at once but committed (visible to readers) and acknowledged
/// only when the writer reports it durable; a reported sync failure
/// abandons it, answers `journal_unavailable`, and the lane takes nothing
/// more. Driven on a stage of its own over an idle engine's lane, so the
/// order of events is the test's, not the scheduler's.
#[test]
fn a_batch_handed_over_before_its_fsync_shows_only_once_durable() {
    use super::stage::{Batch, Pending, Stage};
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let mut stage = Stage::start(e.inner.lane.clone(), e.inner.shared.clone()).unwrap();
    let next = e.inner.shared.durable_lsn.load(Ordering::Acquire) + 1;
    let batch = |stage: &mut Stage, lsn: u64, key: &str| {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let batch = Batch {
            seq: stage.next_seq(),
            entries: vec![(
                lsn,
                Op::Put {
                    session: SessionId::SYSTEM,
                    table: "t".into(),
                    key: key.into(),
                    value: b"\"v\"".to_vec(),
                },
            )],
            unjournaled: Vec::new(),
            pending: vec![Pending::Ack(
                reply,
                WriteAck {
                    lsn,
                    versions: vec![lsn],
                },
            )],
            ops: 1,
        };
        (batch, rx)
    };

    let (b1, mut ack1) = batch(&mut stage, next, "synced");
    let seq1 = b1.seq;
    stage.hand_over(b1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        value(&e, "t", "synced"),
        None,
        "visible before it was durable"
    );
    assert!(
        ack1.try_recv().is_err(),
        "acknowledged before it was durable"
    );
    stage.synced(seq1);
    rt.block_on(ack1).unwrap().unwrap();
    assert_eq!(value(&e, "t", "synced").as_deref(), Some("\"v\""));

    let (b2, ack2) = batch(&mut stage, next + 1, "lost");
    let seq2 = b2.seq;
    stage.hand_over(b2);
    std::thread::sleep(Duration::from_millis(50));
    stage.sync_failed(seq2, "injected fdatasync failure".into());
    let err = rt.block_on(ack2).unwrap().unwrap_err();
    assert_eq!(err.code(), "journal_unavailable", "{err}");
    assert_eq!(
        value(&e, "t", "lost"),
        None,
        "an abandoned batch was applied"
    );
    // A flush would record this checkpoint: never past what is committed.
    assert_eq!(apply::lock(&e.inner.lane).replayer.complete_lsn(), next);

    // Nothing after it is applied either, even once reported durable.
    let (b3, ack3) = batch(&mut stage, next + 2, "after");
    let seq3 = b3.seq;
    stage.hand_over(b3);
    stage.synced(seq3);
    assert!(rt.block_on(ack3).unwrap().is_err());
    assert_eq!(value(&e, "t", "after"), None);
    stage.drain();
    drop(stage);
    // The data file now holds entries the journal does not: it is not
    // opened again.
    drop(e);
}

/// A batch that is not committed while a transaction is open across
/// batches (a mirror's case) rewinds the replayer to before that
/// transaction: nothing of it is visible, a checkpoint there is safe, and
/// reading the journal again from the rewind point applies it whole.
#[test]
fn an_uncommitted_batch_rewinds_the_replayer_to_its_last_complete_point() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let n = e.inner.shared.durable_lsn.load(Ordering::Acquire) + 1;
    let put = |key: &str| Op::Put {
        session: SessionId::SYSTEM,
        table: "t".into(),
        key: key.into(),
        value: b"\"v\"".to_vec(),
    };
    let begin = || Op::TxnBegin {
        session: SessionId::SYSTEM,
        ops: 2,
    };
    let mut lane = apply::lock(&e.inner.lane);
    lane.apply(vec![(n, begin()), (n + 1, put("k1"))], Vec::new())
        .unwrap();
    assert!(lane.replayer.in_txn());
    assert_eq!(lane.replayer.complete_lsn(), n - 1);

    let failed = lane.apply_gated(
        vec![(n + 2, put("k2")), (n + 3, Op::TxnCommit)],
        Vec::new(),
        || Err(store::StoreError("injected: not durable".into())),
    );
    assert!(failed.is_err());
    assert!(!lane.replayer.in_txn(), "the open transaction was kept");
    assert_eq!(lane.replayer.complete_lsn(), n - 1);
    assert_eq!(lane.replayer.last_lsn(), n - 1, "not rewound to re-read");
    drop(lane);
    assert_eq!(value(&e, "t", "k1"), None);
    assert_eq!(value(&e, "t", "k2"), None);

    let mut lane = apply::lock(&e.inner.lane);
    lane.apply(
        vec![
            (n, begin()),
            (n + 1, put("k1")),
            (n + 2, put("k2")),
            (n + 3, Op::TxnCommit),
        ],
        Vec::new(),
    )
    .unwrap();
    assert_eq!(lane.replayer.complete_lsn(), n + 3);
    drop(lane);
    assert_eq!(value(&e, "t", "k1").as_deref(), Some("\"v\""));
    assert_eq!(value(&e, "t", "k2").as_deref(), Some("\"v\""));
    // The data file holds entries the journal does not: not opened again.
    drop(e);
}

#[test]
fn a_call_gets_its_answer_whether_it_comes_while_it_looks_or_sleeps() {
    rt().block_on(async {
        let calls = AtomicUsize::new(0);
        // Busy polling on, and off (`journal.busy_poll = false`).
        for spin in [ANSWER_SPIN, Duration::ZERO] {
            for wait in [Duration::ZERO, Duration::from_micros(50), ANSWER_SPIN * 20] {
                let (reply, rx) = oneshot::channel::<Result<u64, WriteError>>();
                let t = std::thread::spawn(move || {
                    std::thread::sleep(wait);
                    let _ = reply.send(Ok(7));
                });
                let _counted = CallCount::enter(&calls);
                let got = answer(rx, &calls, spin).await;
                assert_eq!(got.expect("answered"), 7, "after {wait:?}, {spin:?}");
                t.join().expect("writer thread");
            }
            // No answer at all: the writer dropped the reply.
            for wait in [Duration::from_micros(50), ANSWER_SPIN * 20] {
                let (reply, rx) = oneshot::channel::<Result<u64, WriteError>>();
                let t = std::thread::spawn(move || {
                    std::thread::sleep(wait);
                    drop(reply);
                });
                let _counted = CallCount::enter(&calls);
                let got = answer(rx, &calls, spin).await;
                assert!(matches!(got, Err(WriteError::Closed)), "{spin:?}");
                t.join().expect("writer thread");
            }
        }
        // With another call waiting it sleeps at once and still gets it.
        let _other = CallCount::enter(&calls);
        let (reply, rx) = oneshot::channel::<Result<u64, WriteError>>();
        let _counted = CallCount::enter(&calls);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            let _ = reply.send(Ok(9));
        });
        let got = answer(rx, &calls, ANSWER_SPIN).await;
        assert_eq!(got.expect("answered"), 9);
        t.join().expect("writer thread");
    });
}

#[test]
fn a_call_given_up_is_no_longer_counted() {
    rt().block_on(async {
        let calls = AtomicUsize::new(0);
        let (_reply, rx) = oneshot::channel::<Result<u64, WriteError>>();
        let waiting = async {
            let _counted = CallCount::enter(&calls);
            answer(rx, &calls, ANSWER_SPIN).await
        };
        let r = tokio::time::timeout(Duration::from_millis(5), waiting).await;
        assert!(r.is_err(), "no answer was sent");
        assert_eq!(calls.load(Ordering::Relaxed), 0);
    });
}

#[test]
fn a_lone_write_and_many_at_once_are_all_answered_and_leave_no_call_counted() {
    for busy_poll in [true, false] {
        lone_and_many_writes(busy_poll);
    }
}

fn lone_and_many_writes(busy_poll: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cfg(dir.path());
    c.busy_poll = busy_poll;
    let e = Engine::open(c).expect("open");
    rt().block_on(async {
        e.write(SessionId::SYSTEM, vec![put("t", "lone", "1")])
            .await
            .expect("lone write");
        let mut tasks = Vec::new();
        for i in 0..64 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                e.write(SessionId::SYSTEM, vec![put("t", &format!("k{i}"), "2")])
                    .await
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("write");
        }
        assert_eq!(e.inner.calls.load(Ordering::Relaxed), 0);
        assert_eq!(value(&e, "t", "lone").as_deref(), Some("1"));
        assert_eq!(value(&e, "t", "k63").as_deref(), Some("2"));
        e.shutdown().await.expect("shutdown");
    });
}

#[test]
fn only_a_clients_write_looks_for_its_answer() {
    let (reply, _rx) = oneshot::channel();
    let write = Request::Write {
        session: SessionId::SYSTEM,
        ops: vec![put("t", "k", "1")],
        reply,
    };
    assert_eq!(answer_spin(true, &write), ANSWER_SPIN);
    assert_eq!(answer_spin(false, &write), Duration::ZERO);
    let (reply, _rx) = oneshot::channel();
    let append = Request::AppendFrames {
        frames: Vec::new(),
        reply,
    };
    assert_eq!(answer_spin(true, &append), Duration::ZERO);
    let (reply, _rx) = oneshot::channel();
    let barrier = Request::Barrier { number: 1, reply };
    assert_eq!(answer_spin(true, &barrier), Duration::ZERO);
}
