//! Failover cluster tests: real `mirrordb serve` child processes formed by
//! `mirrordb cluster init`, their QUIC links running through a relay that
//! can cut them, under a write load that records every acknowledgement.
//!
//! ```text
//! partition the primary ─► it fences itself, a mirror is promoted, the two
//!   never acknowledge in overlapping time ─► heal ─► it rejoins as a mirror;
//!   async: its divergent tail is saved under rollback/; quorum: nothing lost
//! partition the mirror that leads Raft ─► Raft elects another leader, the
//!   primary writes on in the same epoch ─► heal ─► the mirror catches up
//! switchover ─► target promoted, old primary a mirror, nothing lost
//!   ─► kill the Raft leader (not the primary) ─► writes go on, nothing lost
//! cluster add n4 ─► started, it joins and follows as a mirror ─► cluster
//!   remove n4 (the primary cannot be removed) ─► nothing lost
//! witness ─► kill the primary of 2 data nodes + witness ─► the other data
//!   node is promoted, the witness never is; the old primary rejoins
//! ```
//!
//! Repeated SIGKILLs of the primary under load are `mirrordb drill`'s job,
//! tested in `drill.rs`.

use mirrordb_tests::cluster::{
    Ack, ChildCluster, ClusterOptions, Put, Writers, files_under, free_tcp, free_udp,
};
use mirrordb_tests::{phase, run_mirrordb};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(90);

fn acked_by(acks: &[Ack], node: usize) -> Vec<&Ack> {
    acks.iter().filter(|a| a.node == node).collect()
}

async fn partition_the_primary(policy: &str) {
    let mut c = ChildCluster::start(ClusterOptions {
        commit_policy: policy.into(),
        relay: true,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let (p, epoch) = c.wait_primary(None, 1, LONG).await.expect("a primary");
    phase(&format!("{} is primary in epoch {epoch}; writes", c.ids[p]));
    let writers = Writers::start(&c.http, 3);
    writers.wait_more(50, None, LONG).await.expect("writes");

    phase("cut the primary off from every member");
    c.relay().isolate(p);
    let (q, new_epoch) = c
        .wait_primary(Some(p), epoch + 1, LONG)
        .await
        .expect("a mirror takes over");
    phase(&format!("{} promoted in epoch {new_epoch}", c.ids[q]));
    writers
        .wait_more(30, Some(p), LONG)
        .await
        .expect("writes on the new primary");
    assert!(
        !matches!(
            c.put(p, "probe", &serde_json::json!(1)).await,
            Put::Acked(_)
        ),
        "the cut-off primary still takes writes"
    );
    let old = c.status(p).await.expect("the old primary answers HTTP");
    let old_last = old["last_lsn"].as_u64().expect("last_lsn");
    let new_status = c.status(q).await.expect("new primary status");
    let first_new = new_status["failover"]["epoch_history"]
        .as_array()
        .and_then(|h| h.last())
        .and_then(|e| e[1].as_u64())
        .expect("epoch history");
    eprintln!("old primary's last LSN {old_last}; epoch {new_epoch} starts at {first_new}");

    phase("heal: the old primary rejoins as a mirror");
    c.relay().heal();
    let latest = writers
        .acks()
        .iter()
        .filter(|a| a.node != p)
        .map(|a| a.lsn)
        .max()
        .unwrap_or(0);
    c.wait_mirror_at(p, latest, LONG)
        .await
        .expect("old primary follows");
    writers.wait_more(20, Some(p), LONG).await.expect("writes");
    let acks = writers.stop().await;

    phase("no overlap: the old primary's last ack precedes the new one's first");
    let cut_acks_old = acked_by(&acks, p);
    let first_q = acked_by(&acks, q)
        .iter()
        .map(|a| a.at)
        .min()
        .expect("the new primary acknowledged");
    if let Some(last_p) = cut_acks_old.iter().map(|a| a.at).max() {
        assert!(
            last_p < first_q,
            "two primaries acknowledged writes at the same time"
        );
    }

    phase("every acknowledged write is on the new primary, or saved");
    let missing = c.missing_on(q, &acks).await.expect("scan");
    for m in &missing {
        assert_eq!(m.node, p, "lost a write of the new primary: {m:?}");
        assert!(
            m.lsn >= first_new,
            "lost a write the new epoch should hold: {m:?}"
        );
    }
    let saved = files_under(&c.data_dir(p).join("rollback"));
    if policy.starts_with("quorum") {
        assert!(missing.is_empty(), "quorum lost writes: {missing:?}");
    } else {
        eprintln!(
            "async: {} acknowledged writes of the cut-off primary were not replicated",
            missing.len()
        );
    }
    if old_last >= first_new {
        assert!(
            !saved.is_empty(),
            "the old primary's divergent tail ({first_new}..={old_last}) was not saved"
        );
    }
    // Its own old LSNs may be higher than the new epoch's: wait for the
    // content, not a position.
    let new_writes: Vec<Ack> = acked_by(&acks, q).into_iter().cloned().collect();
    c.wait_holds(p, &new_writes, LONG)
        .await
        .expect("the rejoined node holds the new writes");
    for i in 0..c.ids.len() {
        c.stop(i).expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_partitioned_primary_fences_itself_and_saves_its_tail_on_rejoin() {
    partition_the_primary("async").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_partitioned_primary_loses_no_acknowledged_write() {
    partition_the_primary("quorum:1").await;
}

/// The longest time between two acknowledgements in `acks` (any node).
/// A cut-off mirror costs no failover. The mirror cut off here is the one
/// that leads Raft (a primary hands Raft leadership to another voter), so
/// the other two elect a new leader while the primary keeps its lease or
/// renews it again right after; writes go on in the same epoch, and after
/// the heal the mirror catches up without forcing an election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_mirror_costs_no_failover() {
    let mut c = ChildCluster::start(ClusterOptions {
        relay: true,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let (p, epoch) = c.wait_primary(None, 1, LONG).await.expect("a primary");
    let writers = Writers::start(&c.http, 3);
    writers.wait_more(50, None, LONG).await.expect("writes");

    phase("wait until a mirror leads Raft");
    let deadline = Instant::now() + LONG;
    let m = loop {
        match c.raft_leader().await {
            Some(l) if l != p => break l,
            other => assert!(
                Instant::now() < deadline,
                "the primary {} kept leading Raft ({other:?})",
                c.ids[p]
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    phase(&format!(
        "cut off the mirror {} (Raft leader); primary {} writes on",
        c.ids[m], c.ids[p]
    ));
    c.relay().isolate(m);
    writers
        .wait_more(100, None, LONG)
        .await
        .expect("writes go on");
    let before_heal = c.status(p).await.expect("primary status");
    assert_eq!(before_heal["role"], "primary", "{before_heal}");
    assert_eq!(
        before_heal["epoch"].as_u64(),
        Some(epoch),
        "a failover happened"
    );

    phase("heal: the mirror catches up; still no failover");
    c.relay().heal();
    writers.wait_more(50, None, LONG).await.expect("writes");
    let latest = writers.acks().iter().map(|a| a.lsn).max().unwrap_or(0);
    c.wait_mirror_at(m, latest, LONG)
        .await
        .expect("the cut-off mirror catches up");
    let acks = writers.stop().await;
    let after = c.status(p).await.expect("primary status");
    assert_eq!(after["role"], "primary", "{after}");
    assert_eq!(after["epoch"].as_u64(), Some(epoch), "a failover happened");
    let missing = c.missing_on(p, &acks).await.expect("scan");
    assert!(missing.is_empty(), "lost acknowledged writes: {missing:?}");
    c.wait_holds(m, &acks, LONG)
        .await
        .expect("the mirror holds every write");
    for i in 0..c.ids.len() {
        c.stop(i).expect("clean stop");
    }
}

fn longest_pause(acks: &[Ack]) -> Duration {
    let mut at: Vec<Instant> = acks.iter().map(|a| a.at).collect();
    at.sort();
    at.windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default()
}

async fn switchover(c: &ChildCluster, from: usize, to: usize) {
    let args = [
        "switchover".to_owned(),
        "--to".into(),
        c.ids[to].clone(),
        "--url".into(),
        c.http[from].clone(),
    ];
    let (status, out, err) = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_mirrordb(&a)
    })
    .await
    .expect("join")
    .expect("mirrordb switchover runs");
    assert!(status.success(), "switchover failed: {out}{err}");
    // Also what it retried and why (stderr), when it did.
    eprintln!("{err}{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_then_killing_the_raft_leader_loses_nothing() {
    let mut c = ChildCluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    let (mut p, mut epoch) = c.wait_primary(None, 1, LONG).await.expect("a primary");
    let writers = Writers::start(&c.http, 3);
    writers.wait_more(50, None, LONG).await.expect("writes");

    // Switch over to a node that is neither the primary nor the Raft
    // leader, until the two differ (the leader may move meanwhile).
    let mut leader = c.raft_leader().await.expect("a raft leader");
    for round in 0..3 {
        let target = (0..c.ids.len())
            .find(|&i| i != p && i != leader)
            .expect("a third node");
        phase(&format!(
            "switchover {} -> {} (raft leader {}), round {round}",
            c.ids[p], c.ids[target], c.ids[leader]
        ));
        let before = writers.acks().len();
        switchover(&c, p, target).await;
        let (now, e) = c
            .wait_primary(Some(p), epoch + 1, LONG)
            .await
            .expect("the target is primary");
        assert_eq!(now, target, "switchover promoted another node");
        c.wait_mirror_at(p, 0, LONG)
            .await
            .expect("old primary is a mirror");
        writers.wait_more(30, None, LONG).await.expect("writes");
        eprintln!(
            "longest write pause around the switchover: {:?}",
            longest_pause(&writers.acks()[before.saturating_sub(1)..])
        );
        (p, epoch) = (now, e);
        leader = c.raft_leader().await.expect("a raft leader");
        if leader != p {
            break;
        }
    }
    assert_ne!(leader, p, "the Raft leader kept following the primary");

    phase(&format!(
        "SIGKILL the Raft leader {} (primary {})",
        c.ids[leader], c.ids[p]
    ));
    let before_kill = writers.acks().len();
    c.kill(leader);
    writers
        .wait_more(50, Some(leader), LONG)
        .await
        .expect("writes go on without the old leader");
    // A new Raft leader is elected within about a second; look past it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!(
        "longest write pause around the Raft leader's death: {:?}",
        longest_pause(&writers.acks()[before_kill.saturating_sub(1)..])
    );
    let (now, e) = c
        .wait_primary(Some(leader), epoch, LONG)
        .await
        .expect("a primary");
    eprintln!(
        "after the leader's death: primary {} in epoch {e} (was {} in {epoch})",
        c.ids[now], c.ids[p]
    );

    phase("restart the old leader: it follows as a mirror");
    c.spawn(leader).expect("restart");
    let latest = writers.acks().iter().map(|a| a.lsn).max().unwrap_or(0);
    c.wait_mirror_at(leader, latest, LONG)
        .await
        .expect("rejoined");
    let acks = writers.stop().await;
    let (now, _) = c.wait_primary(None, e, LONG).await.expect("a primary");
    let missing = c.missing_on(now, &acks).await.expect("scan");
    assert!(missing.is_empty(), "lost acknowledged writes: {missing:?}");
    for i in 0..c.ids.len() {
        c.stop(i).expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_data_nodes_and_a_witness_survive_the_loss_of_the_primary() {
    let mut c = ChildCluster::start(ClusterOptions {
        witnesses: vec![2],
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let (p, epoch) = c.wait_primary(None, 1, LONG).await.expect("a primary");
    assert_ne!(p, 2, "the witness became primary");
    let w = c.status(2).await.expect("witness status");
    assert_eq!(w["role"], "witness", "{w}");
    let writers = Writers::start(&c.http, 3);
    writers.wait_more(50, None, LONG).await.expect("writes");

    phase(&format!("SIGKILL the primary {}", c.ids[p]));
    c.kill(p);
    let (q, _) = c
        .wait_primary(Some(p), epoch + 1, LONG)
        .await
        .expect("the other data node takes over");
    assert_ne!(q, 2, "the witness was promoted");
    writers
        .wait_more(30, Some(p), LONG)
        .await
        .expect("writes on the new primary");

    phase("restart the old primary: it rejoins as a mirror");
    c.spawn(p).expect("restart");
    let latest = writers.acks().iter().map(|a| a.lsn).max().unwrap_or(0);
    c.wait_mirror_at(p, latest, LONG).await.expect("rejoined");
    let acks = writers.stop().await;
    let missing = c.missing_on(q, &acks).await.expect("scan");
    assert!(missing.is_empty(), "lost acknowledged writes: {missing:?}");
    for i in 0..c.ids.len() {
        c.stop(i).expect("clean stop");
    }
}

async fn cli(args: Vec<String>) -> (bool, String) {
    let (status, out, err) = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_mirrordb(&a)
    })
    .await
    .expect("join")
    .expect("mirrordb runs");
    (status.success(), format!("{out}{err}"))
}

fn members(status: &serde_json::Value) -> Vec<String> {
    status["failover"]["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_is_added_and_removed_at_run_time() {
    let mut c = ChildCluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    let (p, _) = c.wait_primary(None, 1, LONG).await.expect("a primary");
    let writers = Writers::start(&c.http, 2);
    writers.wait_more(30, None, LONG).await.expect("writes");

    phase("mirrordb cluster add n4, then start it: it joins by itself");
    let (quic, http) = (free_udp().expect("port"), free_tcp().expect("port"));
    let (ok, out) = cli(vec![
        "cluster".into(),
        "add".into(),
        "n4".into(),
        "--addr".into(),
        quic.to_string(),
        "--http".into(),
        http.to_string(),
        "--certs".into(),
        c.certs_dir().display().to_string(),
    ])
    .await;
    assert!(ok, "cluster add failed: {out}");
    let n4 = c.adopt("n4", http);
    c.spawn(n4).expect("n4 starts");
    writers.wait_more(30, None, LONG).await.expect("writes");
    let latest = writers.acks().iter().map(|a| a.lsn).max().unwrap_or(0);
    c.wait_mirror_at(n4, latest, LONG)
        .await
        .expect("n4 follows the primary");
    let s = c.status(p).await.expect("status");
    assert!(members(&s).contains(&"n4".to_owned()), "{s}");

    phase("the primary cannot be removed");
    let (ok, out) = cli(vec![
        "cluster".into(),
        "remove".into(),
        c.ids[p].clone(),
        "--url".into(),
        c.http[p].clone(),
    ])
    .await;
    assert!(!ok, "removing the primary succeeded: {out}");

    phase("mirrordb cluster remove n4");
    let (ok, out) = cli(vec![
        "cluster".into(),
        "remove".into(),
        "n4".into(),
        "--url".into(),
        c.http[p].clone(),
    ])
    .await;
    assert!(ok, "cluster remove failed: {out}");
    let s = c.status(p).await.expect("status");
    assert!(!members(&s).contains(&"n4".to_owned()), "{s}");
    c.stop(n4).expect("n4 stops");
    writers
        .wait_more(30, Some(n4), LONG)
        .await
        .expect("writes go on");
    let acks = writers.stop().await;
    let (now, _) = c.wait_primary(None, 1, LONG).await.expect("a primary");
    let missing = c.missing_on(now, &acks).await.expect("scan");
    assert!(missing.is_empty(), "lost acknowledged writes: {missing:?}");
    for i in 0..c.ids.len() {
        c.stop(i).expect("clean stop");
    }
}
