//! Tests of the engine's replication side: a mirror built from a primary's
//! snapshot follows it frame by frame to identical content and identical
//! journal bytes; duplicates are skipped; gaps, bad frames and older epochs
//! are refused; a mirror refuses client writes; backups run on a mirror.

use super::test_support::{cfg, frames_of, rt, tput};
use super::*;
use crate::journal::scan::{self, EntryIter};

fn mirror_cfg(dir: &Path) -> EngineConfig {
    let mut c = cfg(dir);
    c.role = Role::Mirror {
        primary_http: Some("http://primary:7070".into()),
    };
    c
}

/// Seeds a mirror from the primary's snapshot (what reseed does).
fn seed_mirror(primary: &Engine, rt: &tokio::runtime::Runtime, dir: &Path) -> Engine {
    let point = rt.block_on(primary.backup_barrier(0)).unwrap();
    let mut b = DataFileBuilder::create(dir, point.db_id, point.epoch, point.lsn).unwrap();
    point.snapshot.for_each(|i| b.add_item(i)).unwrap();
    b.finish(None).unwrap();
    Engine::open(mirror_cfg(dir)).unwrap()
}

/// Waits until the mirror has applied `lsn`: its applier thread applies
/// after the append has answered.
fn applied(m: &Engine, rt: &tokio::runtime::Runtime, lsn: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = rt.block_on(m.wait_applied(lsn, deadline));
    assert_eq!(r, Ok(lsn), "the mirror never applied up to {lsn}");
}

fn ship(
    primary: &Engine,
    mirror: &Engine,
    rt: &tokio::runtime::Runtime,
    batch: usize,
) -> ReplicaPosition {
    let mut pos = None;
    loop {
        let from = mirror.position().0 + 1;
        let frames = primary.read_frames(from, batch, 1 << 20).unwrap();
        if frames.is_empty() {
            return pos.unwrap_or(ReplicaPosition {
                flushed_lsn: from - 1,
                applied_lsn: from - 1,
                epoch: 0,
            });
        }
        pos = Some(
            rt.block_on(mirror.append_frames(frames.into_iter().map(|f| f.bytes).collect()))
                .unwrap(),
        );
    }
}

#[test]
fn a_mirror_follows_to_identical_content_and_journal_bytes() {
    let (pd, md) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rt = rt();
    let p = Engine::open(cfg(pd.path())).unwrap();
    rt.block_on(async {
        p.write(SessionId::SYSTEM, vec![tput("before-seed", "1")])
            .await
            .unwrap();
    });
    let m = seed_mirror(&p, &rt, md.path());
    assert_eq!(
        m.position().0,
        p.position().0,
        "mirror starts at the seed point"
    );
    rt.block_on(async {
        for i in 0..50 {
            p.write(
                SessionId::SYSTEM,
                vec![tput(&format!("k{i}"), &i.to_string())],
            )
            .await
            .unwrap();
        }
        p.write(
            SessionId::SYSTEM,
            vec![tput("a", "1"), tput("b", "2"), tput("c", "3")],
        )
        .await
        .unwrap();
        let data = vec![7u8; 3 * crate::model::BLOB_CHUNK_BYTES + 5];
        let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from(data))]);
        p.put_blob(SessionId::SYSTEM, "files", "f", body)
            .await
            .unwrap();
    });
    // Small batches split transactions across appends.
    let pos = ship(&p, &m, &rt, 2);
    assert_eq!(pos.flushed_lsn, p.position().0);
    assert!(pos.applied_lsn <= pos.flushed_lsn);
    applied(&m, &rt, pos.flushed_lsn);
    assert_eq!(m.status().applied_lsn, pos.flushed_lsn);
    assert_eq!(*m.applied_lsn_watch().borrow(), pos.flushed_lsn);
    assert_eq!(m.digest().unwrap(), p.digest().unwrap());
    // The mirror's journal holds the primary's frames byte for byte.
    let (ps, _) = scan::list_segments(&p.journal_dir()).unwrap();
    let (ms, _) = scan::list_segments(&m.journal_dir()).unwrap();
    let from = ms[0].header.first_lsn;
    let pf: Vec<_> = EntryIter::new(ps, from, u64::MAX)
        .map(|f| f.unwrap().bytes)
        .collect();
    let mf: Vec<_> = EntryIter::new(ms, from, u64::MAX)
        .map(|f| f.unwrap().bytes)
        .collect();
    assert_eq!(pf, mf);
}

#[test]
fn a_mirror_acknowledges_at_journal_speed_and_applies_behind() {
    let (pd, md) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rt = rt();
    let p = Engine::open(cfg(pd.path())).unwrap();
    let m = seed_mirror(&p, &rt, md.path());
    let seeded = m.status().applied_lsn;
    rt.block_on(async {
        for i in 0..20 {
            p.write(SessionId::SYSTEM, vec![tput(&format!("k{i}"), "1")])
                .await
                .unwrap();
        }
    });
    // Whoever holds the lane holds up applying (the applier, or here the
    // test standing in for a long cache flush): appends still answer.
    let held = super::apply::lock(&m.inner.lane);
    let pos = ship(&p, &m, &rt, 3);
    assert_eq!(pos.flushed_lsn, p.position().0, "durable on the mirror");
    assert_eq!(m.status().applied_lsn, seeded, "nothing applied while held");
    assert!(m.get("t", "k0").unwrap().is_none());
    let waited = rt.block_on(m.wait_applied(pos.flushed_lsn, Instant::now()));
    assert_eq!(waited, Err(seeded));
    drop(held);
    applied(&m, &rt, pos.flushed_lsn);
    assert!(m.get("t", "k19").unwrap().is_some());
    assert_eq!(m.digest().unwrap(), p.digest().unwrap());
    // Closing applies what is left before the final flush.
    let held = super::apply::lock(&m.inner.lane);
    rt.block_on(async {
        p.write(SessionId::SYSTEM, vec![tput("late", "1")])
            .await
            .unwrap();
    });
    ship(&p, &m, &rt, 100);
    drop(held);
    rt.block_on(m.shutdown()).unwrap();
    drop(m);
    let m = Engine::open(mirror_cfg(md.path())).unwrap();
    assert_eq!(m.recovery().replayed_entries, 0, "{:?}", m.recovery());
    assert_eq!(m.status().applied_lsn, p.position().0);
    assert_eq!(m.digest().unwrap(), p.digest().unwrap());
}

#[test]
fn duplicates_are_skipped_and_gaps_bad_frames_and_old_epochs_refused() {
    let (pd, md) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rt = rt();
    let p = Engine::open(cfg(pd.path())).unwrap();
    let m = seed_mirror(&p, &rt, md.path());
    rt.block_on(async {
        for i in 0..5 {
            p.write(SessionId::SYSTEM, vec![tput(&format!("k{i}"), "1")])
                .await
                .unwrap();
        }
    });
    let start = m.position().0 + 1;
    let frames: Vec<Vec<u8>> = frames_of(&p, start, 100);
    rt.block_on(async {
        // Gap: skip the first frame.
        let err = m.append_frames(frames[1..].to_vec()).await.unwrap_err();
        assert_eq!(err.code(), "replication_error", "{err}");
        assert_eq!(m.position().0, start - 1, "nothing of a refused batch is written");
        // Bad checksum.
        let mut bad = frames[0].clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(m.append_frames(vec![bad]).await.is_err());
        // Apply two, then resend all: the duplicates are skipped.
        m.append_frames(frames[..2].to_vec()).await.unwrap();
        let pos = m.append_frames(frames.clone()).await.unwrap();
        assert_eq!(pos.flushed_lsn, p.position().0);
        // A frame of an older epoch than seen is refused (fencing).
        let mut stale = Vec::new();
        crate::journal::format::encode_frame(&mut stale, pos.flushed_lsn + 1, 0, 0, &crate::journal::format::encode_op(&crate::model::Op::TxnAbort));
        let err = m.append_frames(vec![stale]).await.unwrap_err();
        assert_eq!(err.code(), "stale_epoch", "{err}");
        // Clients cannot write to a mirror; the primary takes no frames.
        let err = m.write(SessionId::SYSTEM, vec![tput("x", "1")]).await.unwrap_err();
        assert!(matches!(&err, WriteError::NotPrimary { primary_http: Some(h) } if h == "http://primary:7070"), "{err}");
        assert!(p.append_frames(frames).await.is_err());
    });
    applied(&m, &rt, p.position().0);
    assert_eq!(m.digest().unwrap(), p.digest().unwrap());
}

#[test]
fn a_mirror_restarts_without_writing_and_resumes_inside_a_transaction() {
    let (pd, md) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rt = rt();
    let p = Engine::open(cfg(pd.path())).unwrap();
    let m = seed_mirror(&p, &rt, md.path());
    rt.block_on(async {
        p.write(SessionId::SYSTEM, vec![tput("a", "1"), tput("b", "1")])
            .await
            .unwrap();
    });
    // Ship only the first half of the transaction, then restart the mirror.
    let start = m.position().0 + 1;
    let frames: Vec<Vec<u8>> = frames_of(&p, start, 2);
    rt.block_on(m.append_frames(frames)).unwrap();
    let pos_before = m.position();
    drop(m);
    let m = Engine::open(mirror_cfg(md.path())).unwrap();
    assert_eq!(
        m.position(),
        pos_before,
        "a mirror journals nothing at start"
    );
    assert!(
        m.get("t", "a").unwrap().is_none(),
        "half a transaction is not visible"
    );
    ship(&p, &m, &rt, 100);
    applied(&m, &rt, p.position().0);
    assert_eq!(m.digest().unwrap(), p.digest().unwrap());
}

#[test]
fn backups_run_on_a_mirror_without_touching_its_journal() {
    let (pd, md) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rt = rt();
    let p = Engine::open(cfg(pd.path())).unwrap();
    let m = seed_mirror(&p, &rt, md.path());
    rt.block_on(async {
        p.write(SessionId::SYSTEM, vec![tput("a", "1"), tput("b", "1")])
            .await
            .unwrap();
        p.write(SessionId::SYSTEM, vec![tput("c", "1")])
            .await
            .unwrap();
    });
    let start = m.position().0 + 1;
    let frames: Vec<Vec<u8>> = frames_of(&p, start, 2);
    rt.block_on(m.append_frames(frames)).unwrap();
    // Inside a transaction: the barrier waits for its end.
    let waiting = {
        let m = m.clone();
        rt.spawn(async move { m.backup_barrier(1).await })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiting.is_finished());
    ship(&p, &m, &rt, 100);
    let point = rt.block_on(waiting).unwrap().unwrap();
    assert_eq!(point.lsn, p.position().0);
    assert_eq!(point.snapshot.digest().unwrap(), p.digest().unwrap());
    // The mirror's journal still matches the primary's: shipping goes on.
    rt.block_on(async {
        p.write(SessionId::SYSTEM, vec![tput("d", "1")])
            .await
            .unwrap();
    });
    ship(&p, &m, &rt, 100);
    applied(&m, &rt, p.position().0);
    assert_eq!(m.digest().unwrap(), p.digest().unwrap());
}

#[test]
fn read_frames_reports_compacted_history() {
    let pd = tempfile::tempdir().unwrap();
    let rt = rt();
    let p = Engine::open(cfg(pd.path())).unwrap();
    let point = rt.block_on(async {
        p.write(SessionId::SYSTEM, vec![tput("a", "1")])
            .await
            .unwrap();
        p.backup_barrier(1).await.unwrap()
    });
    rt.block_on(p.flush()).unwrap();
    p.drop_segments_upto(point.lsn).unwrap();
    assert!(matches!(
        p.read_frames(1, 10, 1 << 20),
        Err(ReadFramesError::Compacted { from: 1, .. })
    ));
    assert!(
        p.read_frames(point.lsn + 1, 10, 1 << 20)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_promoted_mirror_writes_in_the_new_epoch_and_closes_a_dead_primarys_transaction() {
    let (pd, md, m2d) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let rt = rt();
    let p = Engine::open(cfg(pd.path())).unwrap();
    let m = seed_mirror(&p, &rt, md.path());
    let m2 = seed_mirror(&p, &rt, m2d.path());
    ship(&p, &m2, &rt, 100);
    rt.block_on(async {
        p.write(SessionId::SYSTEM, vec![tput("acked", "1")])
            .await
            .unwrap();
        p.write(SessionId::SYSTEM, vec![tput("a", "1"), tput("b", "1")])
            .await
            .unwrap();
    });
    // The mirror got the single write and half of the transaction when the
    // primary died.
    let start = m.position().0 + 1;
    let frames: Vec<Vec<u8>> = frames_of(&p, start, 3);
    rt.block_on(m.append_frames(frames)).unwrap();
    let last = m.position().0;
    let (epoch, first) = rt.block_on(m.promote(2)).unwrap();
    assert_eq!((epoch, first), (2, last + 1));
    assert_eq!(m.role(), Role::Primary);
    assert!(rt.block_on(m.promote(2)).is_err(), "an epoch must be new");
    let ack = rt
        .block_on(m.write(SessionId::SYSTEM, vec![tput("new", "1")]))
        .unwrap();
    let f = m.read_frames(ack.lsn, 1, 1 << 20).unwrap().remove(0);
    assert_eq!(f.header.epoch, 2, "writes are stamped with the new epoch");
    assert!(m.get("t", "acked").unwrap().is_some());
    assert!(
        m.get("t", "a").unwrap().is_none(),
        "the dead primary's open transaction is aborted"
    );
    assert_eq!(m.epoch_history().last(), Some(&(2, first)));

    // The other mirror follows the new primary; the deposed primary's
    // entries (epoch 1) are then refused.
    let from = m2.position().0 + 1;
    assert!(from <= first, "m2 is not ahead of the fork");
    let frames: Vec<Vec<u8>> = frames_of(&m, from, 100);
    let pos = rt.block_on(m2.append_frames(frames)).unwrap();
    assert_eq!(pos.epoch, 2);
    applied(&m2, &rt, pos.flushed_lsn);
    assert_eq!(m2.digest().unwrap(), m.digest().unwrap());
    assert_eq!(m2.epoch_history().last(), Some(&(2, first)));
    rt.block_on(async {
        p.write(SessionId::SYSTEM, vec![tput("deposed", "1")])
            .await
            .unwrap();
    });
    let stale: Vec<Vec<u8>> = frames_of(&p, pos.flushed_lsn + 1, 10);
    assert!(!stale.is_empty(), "the deposed primary wrote past the fork");
    let err = rt.block_on(m2.append_frames(stale)).unwrap_err();
    assert_eq!(err.code(), "stale_epoch", "{err}");

    // The epoch and its history survive a restart of the new primary.
    let history = m.epoch_history();
    drop(m);
    let m = Engine::open(cfg(md.path())).unwrap();
    assert_eq!(m.position().1, 2);
    assert_eq!(m.epoch_history(), history);
}

#[test]
fn epoch_history_is_rebuilt_from_the_journal_after_a_crash() {
    let (pd, md) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rt = rt();
    let p = Engine::open(cfg(pd.path())).unwrap();
    let m = seed_mirror(&p, &rt, md.path());
    let (_, first) = rt.block_on(m.promote(5)).unwrap();
    rt.block_on(m.write(SessionId::SYSTEM, vec![tput("x", "1")]))
        .unwrap();
    let history = m.epoch_history();
    // Forget the data file's record: the journal's segment headers and
    // entries still say where epoch 5 starts.
    drop(m);
    let s = store::Store::open(&md.path().join(store::DATA_FILE), 1 << 20).unwrap();
    s.apply(true, |w| -> Result<(), store::StoreError> {
        w.set_epoch_history(&[])
    })
    .unwrap();
    drop(s);
    let m = Engine::open(cfg(md.path())).unwrap();
    assert!(
        m.epoch_history().contains(&(5, first)),
        "{:?} vs {history:?}",
        m.epoch_history()
    );
}

#[test]
fn a_mirror_journals_nothing_at_shutdown_or_after_a_demotion() {
    let (pd, md) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rt = rt();
    let p = Engine::open(cfg(pd.path())).unwrap();
    let m = seed_mirror(&p, &rt, md.path());
    rt.block_on(p.write(SessionId::SYSTEM, vec![tput("a", "1")]))
        .unwrap();
    ship(&p, &m, &rt, 100);
    let before = m.position();
    rt.block_on(m.shutdown()).unwrap();
    drop(m);
    let m = Engine::open(mirror_cfg(md.path())).unwrap();
    assert_eq!(
        m.position(),
        before,
        "clean shutdown of a mirror journals nothing"
    );
    // A primary with an open session, demoted: its idle sessions are not
    // closed in the journal it now shares with its new primary.
    let mut c = cfg(pd.path());
    c.session_idle = Duration::from_millis(50);
    drop(p);
    let p = Engine::open(c).unwrap();
    let id = crate::model::ClientIdentity {
        token_name: "app".into(),
        peer: "127.0.0.1".into(),
        client_session: "s".into(),
    };
    rt.block_on(async {
        let s = p.session(id).await.unwrap();
        p.write(s, vec![tput("b", "1")]).await.unwrap();
        p.set_role(Role::Mirror { primary_http: None })
            .await
            .unwrap();
    });
    let demoted_at = p.position();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        p.position(),
        demoted_at,
        "no SessionClose journaled after the demotion"
    );
}

fn now_ms() -> u64 {
    crate::journal::writer::now_us() / 1000
}

#[test]
fn a_lapsed_lease_refuses_writes_and_a_renewed_one_takes_them_again() {
    let d = tempfile::tempdir().unwrap();
    let rt = rt();
    let p = Engine::open(cfg(d.path())).unwrap();
    rt.block_on(async {
        p.set_lease_until(Some(now_ms() + 60_000));
        p.write(SessionId::SYSTEM, vec![tput("a", "1")])
            .await
            .unwrap();
        p.set_lease_until(Some(now_ms().saturating_sub(1)));
        let before = p.position().0;
        let err = p
            .write(SessionId::SYSTEM, vec![tput("b", "1")])
            .await
            .unwrap_err();
        assert_eq!(err.code(), "not_primary", "{err}");
        assert_eq!(p.position().0, before, "a refused write is not journaled");
        // Reads go on.
        assert!(p.get("t", "a").unwrap().is_some());
        p.set_lease_until(Some(now_ms() + 60_000));
        p.write(SessionId::SYSTEM, vec![tput("b", "1")])
            .await
            .unwrap();
        p.set_lease_until(None);
        assert_eq!(p.lease_until(), None);
        p.write(SessionId::SYSTEM, vec![tput("c", "1")])
            .await
            .unwrap();
        p.shutdown().await.unwrap();
    });
}

#[test]
fn held_writes_wait_and_go_ahead_on_release() {
    let d = tempfile::tempdir().unwrap();
    let rt = rt();
    let p = Engine::open(cfg(d.path())).unwrap();
    rt.block_on(async {
        let ack = p
            .write(SessionId::SYSTEM, vec![tput("a", "1")])
            .await
            .unwrap();
        let held_at = p.hold_writes().await.unwrap();
        assert_eq!(held_at, ack.lsn);
        assert_eq!(p.status().durable_lsn, held_at);
        let p2 = p.clone();
        let waiting =
            tokio::spawn(async move { p2.write(SessionId::SYSTEM, vec![tput("b", "1")]).await });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a held write waits");
        assert_eq!(p.position().0, held_at, "nothing written while held");
        p.release_writes().await.unwrap();
        let b = waiting.await.unwrap().unwrap();
        assert!(b.lsn > held_at);
        p.shutdown().await.unwrap();
    });
}

#[test]
fn held_writes_answer_not_primary_with_the_new_primary_after_a_demotion() {
    let d = tempfile::tempdir().unwrap();
    let rt = rt();
    let p = Engine::open(cfg(d.path())).unwrap();
    rt.block_on(async {
        p.write(SessionId::SYSTEM, vec![tput("a", "1")]).await.unwrap();
        let held_at = p.hold_writes().await.unwrap();
        let p2 = p.clone();
        let waiting =
            tokio::spawn(async move { p2.write(SessionId::SYSTEM, vec![tput("b", "1")]).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        p.set_role(Role::Mirror {
            primary_http: Some("http://n2:7070".into()),
        })
        .await
        .unwrap();
        let err = waiting.await.unwrap().unwrap_err();
        assert!(
            matches!(&err, WriteError::NotPrimary { primary_http: Some(h) } if h == "http://n2:7070"),
            "{err}"
        );
        assert_eq!(p.position().0, held_at);
        p.shutdown().await.unwrap();
    });
}

/// Regression: the durable-LSN watch had no receiver until a primary's
/// replication source subscribed, and `watch::Sender::send` drops the value
/// when nobody listens. A mirror promoted on an idle cluster then served
/// its journal as ending at 0 (the value at open) and refused every
/// mirror's subscription with `MirrorAhead` until its first client write.
#[test]
fn the_durable_lsn_watch_is_current_for_a_late_subscriber_after_promotion() {
    let (pd, md) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rt = rt();
    let p = Engine::open(cfg(pd.path())).unwrap();
    let m = seed_mirror(&p, &rt, md.path());
    rt.block_on(async {
        for i in 0..3 {
            p.write(SessionId::SYSTEM, vec![tput(&format!("k{i}"), "1")])
                .await
                .unwrap();
        }
    });
    assert_eq!(*p.durable_lsn_watch().borrow(), p.position().0);
    ship(&p, &m, &rt, 100);
    let shipped = m.position().0;
    assert!(shipped > 0);
    rt.block_on(m.promote(2)).unwrap();
    // The replication source subscribes only now, with no write since.
    assert_eq!(*m.durable_lsn_watch().borrow(), shipped);
}
