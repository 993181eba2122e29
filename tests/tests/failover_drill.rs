//! Repeated failovers through the `mirrordb drill` and `mirrordb demo`
//! commands: a three-node loopback cluster whose primary is killed with
//! SIGKILL under write load, five times in a row in quorum mode. Every
//! acknowledged write must be on the new primary after each failover, and
//! the old primary must come back as a caught-up mirror holding them all.
//! Timings are benchmarks (BENCHMARKS.md), never asserted here.
//!
//! ```text
//! mirrordb drill --count 5 --json ─► 5 × (write, SIGKILL primary, first ack
//!                                      elsewhere, check every ack, rejoin)
//!                                 ─► JSON: per-drill figures + summary
//! mirrordb demo                   ─► one narrated round, exit 0
//! ```

use mirrordb_tests::{phase, run_mirrordb};

#[test]
fn five_failovers_in_a_row_lose_no_acknowledged_write_and_the_old_primary_rejoins() {
    phase("running mirrordb drill --count 5 --json (quorum:1, the default policy)");
    let (status, stdout, stderr) =
        run_mirrordb(&["drill", "--count", "5", "--json"]).expect("mirrordb drill runs");
    eprintln!("{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("drill printed no JSON ({e}):\n{stdout}"));

    phase("every drill failed over to a new primary and the killed node rejoined");
    let drills = doc["drills"].as_array().expect("drills");
    assert_eq!(drills.len(), 5, "drills run: {doc:#}");
    for d in drills {
        assert!(d["error"].is_null(), "drill failed: {d:#}");
        assert!(d["failover_ms"].is_u64(), "no failover: {d:#}");
        assert!(d["rejoin_ms"].is_u64(), "no rejoin: {d:#}");
        assert_ne!(d["new_primary"], d["killed"], "{d:#}");
        assert!(
            d["acked"].as_u64().unwrap_or(0) > 0,
            "nothing written: {d:#}"
        );
    }

    phase("no acknowledged write was lost, on the new primaries or the rejoined nodes");
    let summary = &doc["summary"];
    assert_eq!(summary["completed"], 5, "{summary:#}");
    assert_eq!(summary["lost"], 0, "{doc:#}");
    assert_eq!(summary["rejoin_missing"], 0, "{doc:#}");
    assert_eq!(summary["verdict"]["no_loss"], true, "{summary:#}");
    assert!(status.success(), "drill exited {status}");
}

#[test]
fn the_demo_runs_one_narrated_failover_and_exits_0() {
    phase("running mirrordb demo");
    let (status, stdout, stderr) = run_mirrordb(&["demo"]).expect("mirrordb demo runs");
    eprintln!("{stdout}\n{stderr}");
    assert!(status.success(), "demo exited {status}");
    for step in [
        "cluster formed",
        "killing",
        "promoted",
        "rejoined as a mirror",
    ] {
        assert!(stdout.contains(step), "the demo never said {step:?}");
    }
}
