//! The `[cluster]` configuration section: who this node is among its peers,
//! where its certificates are, which node is primary, and the commit policy.
//!
//! ```toml
//! [cluster]
//! node_id = "n2"
//! certs_dir = "/etc/mirrordb/cluster"   # ca.pem, n2.pem, n2.key
//! failover = true                       # Raft elects the primary (default)
//! # primary = "n1"                      # only with failover = false
//! commit_policy = "quorum:1"            # async | quorum:K | remote_apply:K
//! on_unavailable = "degrade"            # degrade | strict
//!
//! [cluster.timing]                      # all optional, milliseconds
//! lease_ttl_ms = 1000
//!
//! [[cluster.members]]
//! id = "n1"
//! addr = "127.0.0.1:7101"               # QUIC (replication and Raft)
//! http = "http://127.0.0.1:7071"        # HTTP API, for not_primary redirects
//! role = "data"                         # data | witness
//! ```
//!
//! Every key is checked at start-up ([`ClusterSection::validate`]); unknown
//! keys are refused like everywhere else in the file.

use crate::config::{ConfigDuration, ConfigError};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Most members of a cluster.
pub const MAX_MEMBERS: usize = 64;

/// When a write is acknowledged to its client (DESIGN §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommitPolicy {
    /// After the primary's own fsync.
    Async,
    /// After the primary and `k` mirrors have fsynced the entry.
    Quorum(usize),
    /// After `k` mirrors have fsynced **and applied** the entry (a read on
    /// them sees it).
    RemoteApply(usize),
}

impl CommitPolicy {
    /// How many mirrors must confirm (0 for async).
    pub fn mirrors_needed(self) -> usize {
        match self {
            CommitPolicy::Async => 0,
            CommitPolicy::Quorum(k) | CommitPolicy::RemoteApply(k) => k,
        }
    }
}

impl fmt::Display for CommitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommitPolicy::Async => f.write_str("async"),
            CommitPolicy::Quorum(k) => write!(f, "quorum:{k}"),
            CommitPolicy::RemoteApply(k) => write!(f, "remote_apply:{k}"),
        }
    }
}

/// A commit policy string that does not parse.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error(
    "invalid commit policy {0:?}: expected \"async\", \"quorum:K\" or \"remote_apply:K\" with K from 1 to {MAX_MEMBERS}"
)]
pub struct PolicyError(pub String);

impl FromStr for CommitPolicy {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let err = || PolicyError(s.to_owned());
        let k = |n: &str| -> Result<usize, PolicyError> {
            let k: usize = n.parse().map_err(|_| err())?;
            if (1..=MAX_MEMBERS).contains(&k) {
                Ok(k)
            } else {
                Err(err())
            }
        };
        match s.trim().split_once(':') {
            None if s.trim() == "async" => Ok(CommitPolicy::Async),
            None if s.trim() == "quorum" => Ok(CommitPolicy::Quorum(1)),
            None if s.trim() == "remote_apply" => Ok(CommitPolicy::RemoteApply(1)),
            Some(("quorum", n)) => Ok(CommitPolicy::Quorum(k(n)?)),
            Some(("remote_apply", n)) => Ok(CommitPolicy::RemoteApply(k(n)?)),
            _ => Err(err()),
        }
    }
}

impl Serialize for CommitPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CommitPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a primary does when the commit policy's mirrors do not confirm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Writes wait up to `quorum_timeout`, then answer `write_blocked`.
    Strict,
    /// After `degrade_after` without quorum, acknowledge like `async`,
    /// raise a metric and a health flag, and record durably from which LSN.
    Degrade,
}

impl fmt::Display for OnUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnUnavailable::Strict => "strict",
            OnUnavailable::Degrade => "degrade",
        })
    }
}

impl FromStr for OnUnavailable {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(OnUnavailable::Strict),
            "degrade" => Ok(OnUnavailable::Degrade),
            _ => Err(format!(
                "invalid on_unavailable {s:?}: expected \"strict\" or \"degrade\""
            )),
        }
    }
}

/// One `[[cluster.members]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Node id, as in its certificate.
    pub id: String,
    /// Replication (QUIC) address, `host:port`.
    pub addr: String,
    /// HTTP API base URL, e.g. `http://127.0.0.1:7071`.
    pub http: String,
    /// `data` (holds the database) or `witness` (votes, holds no data,
    /// never primary).
    #[serde(default, skip_serializing_if = "MemberRole::is_data")]
    pub role: MemberRole,
    /// Never make this node primary, neither on failover nor by switchover
    /// (a mirror kept for reads or backups).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nofailover: bool,
}

/// What a member is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Holds the database; may be primary.
    #[default]
    Data,
    /// Votes in Raft only.
    Witness,
}

impl MemberRole {
    fn is_data(&self) -> bool {
        *self == MemberRole::Data
    }
}

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's id; must be one of `members`.
    pub node_id: String,
    /// Directory with `ca.pem`, `<node_id>.pem`, `<node_id>.key`.
    pub certs_dir: PathBuf,
    /// Whether the Raft control plane elects the primary and fails over
    /// (default). With `false` the primary is the fixed `primary` key.
    #[serde(default = "default_true")]
    pub failover: bool,
    /// The fixed primary when `failover = false`; not allowed otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Async mode: most entries a mirror may lag behind the primary and
    /// still be promoted automatically (what async may lose, at most).
    #[serde(default = "default_max_lag")]
    pub max_lag_on_failover: u64,
    /// Control-plane timings, `[cluster.timing]` (milliseconds; every key
    /// optional, an unknown one refused).
    #[serde(default)]
    pub timing: mirrordb_failover::Timing,
    /// This node joins a running cluster (`mirrordb cluster add`) instead
    /// of forming one with the other members on first start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// UDP address the QUIC endpoint binds; default: this member's `addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// When writes are acknowledged.
    #[serde(default = "default_policy")]
    pub commit_policy: CommitPolicy,
    /// What happens when the policy's mirrors do not confirm.
    #[serde(default = "default_on_unavailable")]
    pub on_unavailable: OnUnavailable,
    /// `strict`: how long a write waits for its mirrors before `write_blocked`.
    #[serde(default = "default_quorum_timeout")]
    pub quorum_timeout: ConfigDuration,
    /// `degrade`: how long writes wait for their mirrors before the primary
    /// falls back to async. Keep it above the failover lease.
    #[serde(default = "default_degrade_after")]
    pub degrade_after: ConfigDuration,
    /// Every node of the cluster, this one included.
    pub members: Vec<MemberConfig>,
}

fn default_true() -> bool {
    true
}
fn default_max_lag() -> u64 {
    mirrordb_failover::state::DEFAULT_MAX_LAG_ON_FAILOVER
}
fn default_policy() -> CommitPolicy {
    CommitPolicy::Quorum(1)
}
fn default_on_unavailable() -> OnUnavailable {
    OnUnavailable::Degrade
}
pub(crate) fn default_quorum_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(5))
}
pub(crate) fn default_degrade_after() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(2))
}

impl ClusterSection {
    /// The member entry of `id`.
    pub fn member(&self, id: &str) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Whether this node is the fixed primary (`failover = false`).
    pub fn is_primary(&self) -> bool {
        !self.failover && self.primary.as_deref() == Some(self.node_id.as_str())
    }

    /// This node's member entry.
    pub fn me(&self) -> Option<&MemberConfig> {
        self.member(&self.node_id)
    }

    /// Whether this node is a witness.
    pub fn is_witness(&self) -> bool {
        self.me().is_some_and(|m| m.role == MemberRole::Witness)
    }

    /// The data members other than this node.
    pub fn data_peers(&self) -> impl Iterator<Item = &MemberConfig> {
        self.members
            .iter()
            .filter(|m| m.id != self.node_id && m.role == MemberRole::Data)
    }

    /// The commit policy as the control plane records it.
    pub fn state_policy(&self) -> mirrordb_failover::state::CommitPolicy {
        use mirrordb_failover::state as st;
        let mode = match self.commit_policy {
            CommitPolicy::Async => st::CommitMode::Async {
                max_lag_on_failover: self.max_lag_on_failover,
            },
            CommitPolicy::Quorum(k) => st::CommitMode::Quorum {
                k: u32::try_from(k).unwrap_or(u32::MAX),
            },
            CommitPolicy::RemoteApply(k) => st::CommitMode::RemoteApply {
                k: u32::try_from(k).unwrap_or(u32::MAX),
            },
        };
        st::CommitPolicy {
            mode,
            on_unavailable: match self.on_unavailable {
                OnUnavailable::Strict => st::OnUnavailable::Strict,
                OnUnavailable::Degrade => st::OnUnavailable::Degrade,
            },
        }
    }

    /// Cross-key checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.members.is_empty() || self.members.len() > MAX_MEMBERS {
            return bad(format!(
                "cluster.members must list 1..={MAX_MEMBERS} nodes, this one included"
            ));
        }
        for (i, m) in self.members.iter().enumerate() {
            if let Err(e) = mirrordb_replication::certs::validate_node_id(&m.id) {
                return bad(format!("cluster.members[{i}].id: {e}"));
            }
            if self.members[..i].iter().any(|o| o.id == m.id) {
                return bad(format!("cluster.members: {:?} is listed twice", m.id));
            }
            if !m.addr.contains(':')
                || m.addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
                    .is_none()
            {
                return bad(format!(
                    "cluster.members[{i}].addr {:?} must be host:port",
                    m.addr
                ));
            }
            if !(m.http.starts_with("http://") || m.http.starts_with("https://")) {
                return bad(format!(
                    "cluster.members[{i}].http {:?} must be a URL starting with http:// or https://",
                    m.http
                ));
            }
        }
        if self.member(&self.node_id).is_none() {
            return bad(format!(
                "cluster.node_id {:?} is not one of cluster.members",
                self.node_id
            ));
        }
        match (&self.primary, self.failover) {
            (Some(p), false) => match self.member(p) {
                None => {
                    return bad(format!(
                        "cluster.primary {p:?} is not one of cluster.members"
                    ));
                }
                Some(m) if m.role == MemberRole::Witness => {
                    return bad(format!("cluster.primary {p:?} is a witness"));
                }
                Some(_) => {}
            },
            (None, false) => {
                return bad("cluster.primary is required when cluster.failover = false".into());
            }
            (Some(_), true) => {
                return bad(
                    "cluster.primary is only for cluster.failover = false: with failover the cluster elects its primary"
                        .into(),
                );
            }
            (None, true) => {}
        }
        if !self.failover && self.members.iter().any(|m| m.role == MemberRole::Witness) {
            return bad("cluster.members: a witness needs cluster.failover = true".into());
        }
        if let Err(e) = self.timing.validate() {
            return bad(format!("cluster.timing: {e}"));
        }
        let mirrors = self
            .members
            .iter()
            .filter(|m| m.role == MemberRole::Data)
            .count()
            .saturating_sub(1);
        if self.commit_policy.mirrors_needed() > mirrors {
            return bad(format!(
                "cluster.commit_policy {} needs more mirrors than the {mirrors} the cluster has",
                self.commit_policy
            ));
        }
        let qt = self.quorum_timeout.0;
        if qt < Duration::from_millis(1) || qt > Duration::from_secs(3600) {
            return bad("cluster.quorum_timeout must be between 1ms and 1h".into());
        }
        let da = self.degrade_after.0;
        if da < Duration::from_millis(1) || da > Duration::from_secs(3600) {
            return bad("cluster.degrade_after must be between 1ms and 1h".into());
        }
        if let Some(l) = &self.listen
            && l.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(format!("cluster.listen {l:?} must be ip:port"));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print() {
        for s in ["async", "quorum:1", "quorum:3", "remote_apply:2"] {
            assert_eq!(s.parse::<CommitPolicy>().unwrap().to_string(), s);
        }
        assert_eq!(
            "quorum".parse::<CommitPolicy>(),
            Ok(CommitPolicy::Quorum(1))
        );
        for bad in [
            "",
            "sync",
            "quorum:0",
            "quorum:x",
            "remote_apply:",
            "quorum:1000",
        ] {
            assert!(bad.parse::<CommitPolicy>().is_err(), "{bad}");
        }
    }

    /// `docs/config.md` documents every `[cluster]` key.
    #[test]
    fn docs_name_every_cluster_key() {
        let docs_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
        let docs = std::fs::read_to_string(&docs_path).unwrap();
        let section = ClusterSection {
            node_id: "n1".into(),
            certs_dir: "/c".into(),
            failover: true,
            primary: Some("n1".into()),
            max_lag_on_failover: default_max_lag(),
            timing: mirrordb_failover::Timing::default(),
            join: true,
            listen: Some("127.0.0.1:1".into()),
            commit_policy: default_policy(),
            on_unavailable: default_on_unavailable(),
            quorum_timeout: default_quorum_timeout(),
            degrade_after: default_degrade_after(),
            members: vec![MemberConfig {
                id: "n1".into(),
                addr: "127.0.0.1:1".into(),
                http: "http://127.0.0.1:2".into(),
                role: MemberRole::Witness,
                nofailover: true,
            }],
        };
        let value: toml::Table = toml::from_str(&toml::to_string(&section).unwrap()).unwrap();
        for (key, v) in &value {
            let full = format!("`cluster.{key}`");
            assert!(docs.contains(&full), "docs/config.md lacks {full}");
            if let toml::Value::Table(t) = v {
                for k in t.keys() {
                    let full = format!("`cluster.{key}.{k}`");
                    assert!(docs.contains(&full), "docs/config.md lacks {full}");
                }
            }
            if let toml::Value::Array(a) = v {
                for t in a.iter().filter_map(|m| m.as_table()) {
                    for k in t.keys() {
                        let full = format!("`cluster.{key}.{k}`");
                        assert!(docs.contains(&full), "docs/config.md lacks {full}");
                    }
                }
            }
        }
        // Defaults as the docs show them.
        for (key, shown) in [
            ("commit_policy", "`\"quorum:1\"`"),
            ("on_unavailable", "`\"degrade\"`"),
            ("quorum_timeout", "`\"5s\"`"),
            ("degrade_after", "`\"2s\"`"),
        ] {
            let line = docs
                .lines()
                .find(|l| l.starts_with(&format!("| `cluster.{key}`")))
                .unwrap();
            assert!(line.contains(shown), "{key} should show {shown}: {line}");
        }
    }
}
