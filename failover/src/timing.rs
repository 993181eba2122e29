//! Timing of the control plane: Raft heartbeats and elections, the primary's
//! lease, and the margin the controller adds before it promotes.
//!
//! The safety argument, in the order things happen when a primary dies or is
//! cut off:
//!
//! ```text
//!  last renewal proposed at t (primary clock) ──► lease expires_at = t + lease_ttl
//!  primary: no renewal committed by t + lease_ttl ──► stops acknowledging (self-fence)
//!  controller: now > expires_at + failover_margin ──► proposes Promote
//! ```
//!
//! The controller compares the expiry (primary's clock) with its own clock, so
//! `failover_margin_ms` must exceed the worst clock difference between nodes
//! (`max_clock_skew_ms`) plus the interval of the driver's self-fencing check
//! (at most `heartbeat_ms`); the node must also check its lease before
//! acknowledging any write. A freshly elected Raft leader acts only once it
//! applied an entry of its own term, and waits one full `lease_ttl_ms` for a
//! primary that still answers it (see the controller).
//!
//! The Raft defaults (heartbeat 50 ms, elections 250–500 ms) are half of
//! DESIGN §8's: openraft 0.9's followers honour a leader lease of
//! `election_max_ms` before they even start an election, so a primary that
//! was also the Raft leader took `election_max + election timeout` (1.5–2 s)
//! to be noticed, and failover missed its 2 s median. With these values
//! that is 0.75–1 s, within the primary's own 1 s lease.
//!
//! openraft 0.9 has no pre-vote (it arrives in 0.10); the driver runs the
//! election timer itself and asks for pre-votes first, so a node that was
//! cut off or restarted cannot force a needless election. The lease
//! (`lease_ttl_ms ≥ election_max_ms`) still rides out a single election.

use serde::{Deserialize, Serialize};

/// Control-plane timings, all in milliseconds. Deserialized from the node's
/// `[cluster.timing]`: missing keys take their defaults, unknown keys are
/// refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timing {
    /// Raft leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized Raft election timeout.
    pub election_min_ms: u64,
    /// Upper bound of the randomized Raft election timeout.
    pub election_max_ms: u64,
    /// How often the primary renews its lease.
    pub lease_renew_ms: u64,
    /// How long a lease lasts after the renewal was proposed.
    pub lease_ttl_ms: u64,
    /// Extra wait after a lease's expiry before the controller promotes.
    pub failover_margin_ms: u64,
    /// Largest clock difference between any two nodes this setup tolerates.
    pub max_clock_skew_ms: u64,
    /// Longest a planned switchover may hold writes before it is abandoned.
    pub switchover_timeout_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: 50,
            election_min_ms: 250,
            election_max_ms: 500,
            lease_renew_ms: 250,
            lease_ttl_ms: 1000,
            failover_margin_ms: 250,
            max_clock_skew_ms: 100,
            switchover_timeout_ms: 5000,
        }
    }
}

/// A timing setting that breaks a safety or liveness rule. Each variant names
/// the configuration keys involved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimingError {
    /// A value that must be positive is 0.
    #[error("{key} must be greater than 0")]
    Zero {
        /// The key.
        key: &'static str,
    },
    /// Followers would start elections between heartbeats.
    #[error(
        "heartbeat_ms ({heartbeat_ms}) must be less than election_min_ms / 3 ({election_min_ms} / 3)"
    )]
    HeartbeatTooSlow {
        /// The heartbeat.
        heartbeat_ms: u64,
        /// The election lower bound.
        election_min_ms: u64,
    },
    /// The election range is empty or inverted.
    #[error("election_min_ms ({min}) must be less than election_max_ms ({max})")]
    ElectionRange {
        /// Lower bound.
        min: u64,
        /// Upper bound.
        max: u64,
    },
    /// Fewer than two renewal attempts fit in a lease.
    #[error("lease_renew_ms ({renew}) must be less than lease_ttl_ms / 2 ({ttl} / 2)")]
    RenewTooSlow {
        /// Renewal interval.
        renew: u64,
        /// Lease length.
        ttl: u64,
    },
    /// One Raft election would fence the primary.
    #[error("lease_ttl_ms ({ttl}) must be at least election_max_ms ({election_max})")]
    LeaseShorterThanElection {
        /// Lease length.
        ttl: u64,
        /// Election upper bound.
        election_max: u64,
    },
    /// Clock skew could let a promotion overtake the old primary's self-fence.
    #[error(
        "failover_margin_ms ({margin}) must be greater than max_clock_skew_ms + heartbeat_ms ({skew} + {heartbeat}) so a fenced primary stops before a promotion"
    )]
    MarginTooSmall {
        /// The margin.
        margin: u64,
        /// The tolerated skew.
        skew: u64,
        /// The heartbeat, which bounds the driver's self-fencing check interval.
        heartbeat: u64,
    },
    /// A switchover could not outlast one change of Raft leader.
    #[error(
        "switchover_timeout_ms ({timeout}) must be at least 2 × lease_ttl_ms ({ttl}) so a new raft leader can finish it"
    )]
    SwitchoverTooShort {
        /// The switchover timeout.
        timeout: u64,
        /// Lease length.
        ttl: u64,
    },
    /// openraft refused the derived configuration.
    #[error("openraft rejected the configuration: {0}")]
    Raft(String),
}

impl Timing {
    /// Checks the rules that make failover safe and elections stable.
    pub fn validate(&self) -> Result<(), TimingError> {
        for (key, v) in [
            ("heartbeat_ms", self.heartbeat_ms),
            ("election_min_ms", self.election_min_ms),
            ("lease_renew_ms", self.lease_renew_ms),
            ("lease_ttl_ms", self.lease_ttl_ms),
            ("failover_margin_ms", self.failover_margin_ms),
        ] {
            if v == 0 {
                return Err(TimingError::Zero { key });
            }
        }
        if self.election_min_ms >= self.election_max_ms {
            return Err(TimingError::ElectionRange {
                min: self.election_min_ms,
                max: self.election_max_ms,
            });
        }
        if self.heartbeat_ms.saturating_mul(3) >= self.election_min_ms {
            return Err(TimingError::HeartbeatTooSlow {
                heartbeat_ms: self.heartbeat_ms,
                election_min_ms: self.election_min_ms,
            });
        }
        if self.lease_renew_ms.saturating_mul(2) >= self.lease_ttl_ms {
            return Err(TimingError::RenewTooSlow {
                renew: self.lease_renew_ms,
                ttl: self.lease_ttl_ms,
            });
        }
        if self.lease_ttl_ms < self.election_max_ms {
            return Err(TimingError::LeaseShorterThanElection {
                ttl: self.lease_ttl_ms,
                election_max: self.election_max_ms,
            });
        }
        if self.switchover_timeout_ms < self.lease_ttl_ms.saturating_mul(2) {
            return Err(TimingError::SwitchoverTooShort {
                timeout: self.switchover_timeout_ms,
                ttl: self.lease_ttl_ms,
            });
        }
        if self.failover_margin_ms <= self.max_clock_skew_ms.saturating_add(self.heartbeat_ms) {
            return Err(TimingError::MarginTooSmall {
                margin: self.failover_margin_ms,
                skew: self.max_clock_skew_ms,
                heartbeat: self.heartbeat_ms,
            });
        }
        Ok(())
    }

    /// The openraft configuration for these timings (validated first).
    ///
    /// Snapshots are taken every [`SNAPSHOT_EVERY_ENTRIES`] entries; the state
    /// is tiny, so this bounds the log mostly filled by lease renewals.
    pub fn raft_config(&self) -> Result<openraft::Config, TimingError> {
        self.validate()?;
        let config = openraft::Config {
            cluster_name: "mirrordb".to_owned(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            install_snapshot_timeout: self.election_min_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_ENTRIES),
            max_in_snapshot_log_to_keep: SNAPSHOT_EVERY_ENTRIES / 5,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| TimingError::Raft(e.to_string()))
    }
}

/// Log entries between two state-machine snapshots.
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 5000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_convert() {
        let t = Timing::default();
        t.validate().unwrap();
        let c = t.raft_config().unwrap();
        assert_eq!(c.heartbeat_interval, 50);
        assert_eq!(c.election_timeout_min, 250);
        assert_eq!(c.election_timeout_max, 500);
    }

    #[test]
    fn each_rule_names_its_keys() {
        let d = Timing::default();
        let cases = [
            (
                Timing {
                    heartbeat_ms: 200,
                    ..d
                },
                "heartbeat_ms",
            ),
            (
                Timing {
                    election_min_ms: 1000,
                    ..d
                },
                "election_max_ms",
            ),
            (
                Timing {
                    lease_renew_ms: 500,
                    ..d
                },
                "lease_renew_ms",
            ),
            (
                Timing {
                    lease_ttl_ms: 400,
                    lease_renew_ms: 100,
                    ..d
                },
                "election_max_ms",
            ),
            (
                Timing {
                    failover_margin_ms: 150,
                    ..d
                },
                "max_clock_skew_ms + heartbeat_ms",
            ),
            (
                Timing {
                    lease_ttl_ms: 0,
                    ..d
                },
                "lease_ttl_ms",
            ),
            (
                Timing {
                    switchover_timeout_ms: 1500,
                    ..d
                },
                "switchover_timeout_ms",
            ),
        ];
        for (t, key) in cases {
            let err = t.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
            assert!(t.raft_config().is_err());
        }
    }

    #[test]
    fn timing_deserializes_with_defaults() {
        let t: Timing = serde_json::from_str(r#"{"lease_ttl_ms": 2000}"#).unwrap();
        assert_eq!(t.lease_ttl_ms, 2000);
        assert_eq!(t.heartbeat_ms, 50);
        let e = serde_json::from_str::<Timing>(r#"{"heartbeat": 20}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat"), "an unknown key is named: {e}");
    }
}
