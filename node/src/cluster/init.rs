//! `mirrordb cluster init`: a cluster CA, one certificate per node, and a
//! ready configuration file per node.
//!
//! ```text
//! --nodes n1=HOST:PORT,n2=…  ──► ClusterCa::generate ──► DIR/ca-private/{ca.pem,ca.key}
//!                                                    ──► DIR/ca.pem
//!                            ──► issue(node, [HOST]) ──► DIR/<node>.pem, DIR/<node>.key
//! --http n1=ADDR,…           ──► DIR/<node>.toml ([node] + [cluster], certs_dir = DIR)
//! ```
//!
//! The CA key stays in `DIR/ca-private/`, which no node configuration
//! refers to: copy the node files to their machines and keep that directory
//! offline. Nothing existing is ever overwritten.

use super::config::{ClusterSection, CommitPolicy, MemberConfig, OnUnavailable};
use crate::config::{Config, Role, TokenConfig};
use mirrordb_replication::NodeId;
use mirrordb_replication::certs::{CA_CERT_FILE, CertError, ClusterCa, validate_node_id};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Subdirectory of the output holding the CA key (never referenced by node
/// configurations).
pub const CA_PRIVATE_DIR: &str = "ca-private";

/// `mirrordb cluster init` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Members and their replication (QUIC) addresses: `n1=HOST:PORT,n2=…`.
    /// With failover the cluster elects its primary (on a fresh cluster the
    /// lowest name); with `--no-failover` the first one listed is primary.
    #[arg(long, required = true)]
    pub nodes: String,
    /// Members that are witnesses (vote, hold no data): `n3` or `n3,n4`.
    #[arg(long, default_value = "")]
    pub witness: String,
    /// A fixed primary (the first of `--nodes`) and no automatic failover.
    #[arg(long)]
    pub no_failover: bool,
    /// HTTP API addresses: `n1=IP:PORT,n2=…` (every node).
    #[arg(long, required = true)]
    pub http: String,
    /// `async`, `quorum:K` or `remote_apply:K`.
    #[arg(long, default_value = "quorum:1")]
    pub commit_policy: CommitPolicy,
    /// `degrade` or `strict`.
    #[arg(long, default_value = "degrade")]
    pub on_unavailable: OnUnavailable,
    /// Directory under which each node's data directory `data-<node>` is
    /// placed; default: relative `./data-<node>` (from where the node runs).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Name of the cluster, in the CA certificate.
    #[arg(long, default_value = "mirrordb")]
    pub name: String,
    /// Output directory (created; existing files are never overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
    /// Succeed without writing anything when every file this would write
    /// already exists (an init container run on every `docker compose up`);
    /// a partial set is still refused.
    #[arg(long)]
    pub if_missing: bool,
    /// API tokens to write into every node file instead of generated ones:
    /// `NAME:ROLE:SECRET` (ROLE `read`, `write` or `admin`), repeatable or
    /// comma-separated in the environment variable.
    #[arg(
        long = "token",
        value_name = "NAME:ROLE:SECRET",
        env = "MIRRORDB_INIT_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub tokens: Vec<String>,
}

/// Why `cluster init` failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum InitError {
    #[error("{0}")]
    Args(String),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generated configuration is invalid: {0}")]
    Config(String),
}

/// What `cluster init` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitReport {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub nodes: Vec<InitNode>,
    /// Generated API tokens (only when some HTTP address is beyond
    /// loopback): `(name, role)`; the secrets are in the node files.
    pub tokens: Vec<String>,
    /// `--if-missing` found every file in place and wrote nothing.
    pub already_initialised: bool,
}

/// One node's files.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitNode {
    pub id: String,
    /// The fixed primary (`--no-failover` only).
    pub primary: bool,
    pub witness: bool,
    pub config: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub http: String,
    pub addr: String,
}

fn pairs(flag: &str, s: &str) -> Result<Vec<(String, String)>, InitError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((id, addr)) = part.split_once('=') else {
            return Err(InitError::Args(format!(
                "--{flag}: {part:?} must be NODE=HOST:PORT"
            )));
        };
        let (id, addr) = (id.trim().to_owned(), addr.trim().to_owned());
        validate_node_id(&id)?;
        if out.iter().any(|(o, _)| *o == id) {
            return Err(InitError::Args(format!("--{flag}: {id} is listed twice")));
        }
        out.push((id, addr));
    }
    if out.is_empty() {
        return Err(InitError::Args(format!("--{flag} lists no node")));
    }
    Ok(out)
}

pub(crate) fn host_of(addr: &str) -> Result<String, InitError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| InitError::Args(format!("{addr:?} must be HOST:PORT")))?;
    port.parse::<u16>()
        .map_err(|_| InitError::Args(format!("{addr:?}: bad port")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(InitError::Args(format!("{addr:?}: missing host")));
    }
    Ok(host.to_owned())
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitError + '_ {
    move |source| InitError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a new file readable by its owner only (node configurations may
/// hold API tokens).
pub(crate) fn write_new(path: &Path, text: &str) -> Result<(), InitError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Parses `--token NAME:ROLE:SECRET` (the name and secret are checked with
/// the rest of the generated configuration).
fn parse_token(s: &str) -> Result<TokenConfig, InitError> {
    let mut parts = s.trim().splitn(3, ':');
    let (Some(name), Some(role), Some(token)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(InitError::Args(
            "--token must be NAME:ROLE:SECRET (ROLE read, write or admin)".into(),
        ));
    };
    let role = match role {
        "read" => Role::Read,
        "write" => Role::Write,
        "admin" => Role::Admin,
        other => {
            return Err(InitError::Args(format!(
                "--token {name}: role {other:?} must be read, write or admin"
            )));
        }
    };
    Ok(TokenConfig {
        name: name.to_owned(),
        token: token.to_owned(),
        role,
    })
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
        .collect()
}

/// Runs `cluster init`.
pub fn run(a: &InitArgs) -> Result<InitReport, InitError> {
    let nodes = pairs("nodes", &a.nodes)?;
    let http = pairs("http", &a.http)?;
    for (id, addr) in &nodes {
        host_of(addr)?;
        if !http.iter().any(|(h, _)| h == id) {
            return Err(InitError::Args(format!("--http gives no address for {id}")));
        }
    }
    for (id, _) in &http {
        if !nodes.iter().any(|(n, _)| n == id) {
            return Err(InitError::Args(format!(
                "--http names {id}, which --nodes does not list"
            )));
        }
    }
    let mut listens = Vec::new();
    let mut need_tokens = false;
    for (id, _) in &nodes {
        let addr = &http
            .iter()
            .find(|(h, _)| h == id)
            .map(|(_, a)| a.clone())
            .unwrap_or_default();
        let host = host_of(addr)?;
        let port: u16 = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(7070);
        // An IP address is listened on as given; a host name means "reached
        // by that name", so listen on every interface (with tokens).
        let listen = match addr.parse::<SocketAddr>() {
            Ok(sa) => sa,
            Err(_) => SocketAddr::from(([0, 0, 0, 0], port)),
        };
        if !listen.ip().is_loopback() {
            need_tokens = true;
        }
        listens.push((id.clone(), listen, format!("http://{host}:{port}")));
    }
    let members: Vec<MemberConfig> = nodes
        .iter()
        .zip(&listens)
        .map(|((id, addr), (_, _, url))| MemberConfig {
            id: id.clone(),
            addr: addr.clone(),
            http: url.clone(),
            role: super::config::MemberRole::Data,
            nofailover: false,
        })
        .collect();
    let given: Vec<TokenConfig> = a
        .tokens
        .iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| parse_token(t))
        .collect::<Result<_, _>>()?;
    let tokens = if !given.is_empty() {
        given
    } else if need_tokens {
        vec![
            TokenConfig {
                name: "app".into(),
                token: random_token(),
                role: Role::Write,
            },
            TokenConfig {
                name: "ops".into(),
                token: random_token(),
                role: Role::Admin,
            },
        ]
    } else {
        Vec::new()
    };

    std::fs::create_dir_all(&a.out).map_err(io(&a.out))?;
    let out = std::fs::canonicalize(&a.out).map_err(io(&a.out))?;
    // Refuse before writing anything if a file is in the way.
    let mut planned = vec![out.join(CA_CERT_FILE), out.join(CA_PRIVATE_DIR)];
    for (id, _) in &nodes {
        for ext in ["pem", "key", "toml"] {
            planned.push(out.join(format!("{id}.{ext}")));
        }
    }
    if a.if_missing && planned.iter().all(|p| p.exists()) {
        return Ok(InitReport {
            ca_cert: out.join(CA_CERT_FILE),
            ca_key: out
                .join(CA_PRIVATE_DIR)
                .join(mirrordb_replication::certs::CA_KEY_FILE),
            nodes: Vec::new(),
            tokens: Vec::new(),
            already_initialised: true,
        });
    }
    if let Some(p) = planned.iter().find(|p| p.exists()) {
        return Err(CertError::Exists { path: p.clone() }.into());
    }

    let primary = nodes[0].0.clone();
    let witnesses: Vec<String> = a
        .witness
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect();
    for w in &witnesses {
        if !nodes.iter().any(|(n, _)| n == w) {
            return Err(InitError::Args(format!(
                "--witness names {w}, which --nodes does not list"
            )));
        }
    }
    if a.no_failover && !witnesses.is_empty() {
        return Err(InitError::Args(
            "--witness needs failover (drop --no-failover)".into(),
        ));
    }
    let members: Vec<MemberConfig> = members
        .into_iter()
        .map(|mut m| {
            if witnesses.contains(&m.id) {
                m.role = super::config::MemberRole::Witness;
            }
            m
        })
        .collect();
    let mut configs = Vec::new();
    for ((id, _), (_, listen, _)) in nodes.iter().zip(&listens) {
        let mut cfg = Config::default();
        cfg.node.name = id.clone();
        cfg.node.data_dir = match &a.data_root {
            Some(root) => root.join(format!("data-{id}")),
            None => PathBuf::from(format!("./data-{id}")),
        };
        cfg.node.listen = *listen;
        // One backup destination per node: nodes started side by side must
        // not write the same sets.
        cfg.backup.destination = match &a.data_root {
            Some(root) => root.join(format!("backups-{id}")),
            None => PathBuf::from(format!("./backups-{id}")),
        };
        cfg.api.tokens = tokens.clone();
        cfg.cluster = Some(ClusterSection {
            node_id: id.clone(),
            certs_dir: out.clone(),
            failover: !a.no_failover,
            primary: a.no_failover.then(|| primary.clone()),
            max_lag_on_failover: mirrordb_failover::state::DEFAULT_MAX_LAG_ON_FAILOVER,
            timing: mirrordb_failover::Timing::default(),
            join: false,
            listen: None,
            commit_policy: a.commit_policy,
            on_unavailable: a.on_unavailable,
            quorum_timeout: super::config::default_quorum_timeout(),
            degrade_after: super::config::default_degrade_after(),
            members: members.clone(),
        });
        cfg.validate()
            .map_err(|e| InitError::Config(e.to_string()))?;
        let text = toml::to_string(&cfg).map_err(|e| InitError::Config(e.to_string()))?;
        configs.push((id.clone(), text));
    }

    let ca = ClusterCa::generate(&a.name)?;
    let private = out.join(CA_PRIVATE_DIR);
    ca.write(&private)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&private))?;
    }
    write_new(&out.join(CA_CERT_FILE), ca.cert_pem())?;
    let mut report = InitReport {
        ca_cert: out.join(CA_CERT_FILE),
        ca_key: private.join(mirrordb_replication::certs::CA_KEY_FILE),
        nodes: Vec::new(),
        tokens: tokens
            .iter()
            .map(|t| format!("{} ({})", t.name, t.role))
            .collect(),
        already_initialised: false,
    };
    for (((id, addr), (_, _, url)), (_, text)) in nodes.iter().zip(&listens).zip(&configs) {
        let host = host_of(addr)?;
        let mut hosts = vec![host];
        for extra in ["localhost", "127.0.0.1"] {
            if !hosts.iter().any(|h| h == extra) {
                hosts.push(extra.to_owned());
            }
        }
        let cert = ca.issue(&NodeId(id.clone()), &hosts)?;
        cert.write(&out)?;
        let config = out.join(format!("{id}.toml"));
        let header = format!(
            "# mirrordb node {id} of a {n}-node cluster, written by `mirrordb cluster init`.\n\
             # Start it with: mirrordb serve --config {path}\n\n",
            n = nodes.len(),
            path = config.display(),
        );
        write_new(&config, &format!("{header}{text}"))?;
        report.nodes.push(InitNode {
            id: id.clone(),
            primary: a.no_failover && *id == primary,
            witness: witnesses.contains(id),
            config,
            cert: out.join(format!("{id}.pem")),
            key: out.join(format!("{id}.key")),
            http: url.clone(),
            addr: addr.clone(),
        });
    }
    Ok(report)
}

/// Prints a report for people (or JSON).
pub fn print(r: &InitReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    if r.already_initialised {
        println!(
            "already initialised: every file is in place beside {}; nothing written (--if-missing)",
            r.ca_cert.display()
        );
        return;
    }
    println!("cluster CA certificate: {}", r.ca_cert.display());
    println!(
        "cluster CA key:         {} (keep it offline; no node needs it)",
        r.ca_key.display()
    );
    for n in &r.nodes {
        println!(
            "{} ({}): mirrordb serve --config {}   [replication {}, HTTP {}]",
            n.id,
            if n.primary {
                "primary"
            } else if n.witness {
                "witness"
            } else if r.nodes.iter().any(|o| o.primary) {
                "mirror"
            } else {
                "data node; the cluster elects its primary"
            },
            n.config.display(),
            n.addr,
            n.http
        );
    }
    if !r.tokens.is_empty() {
        println!(
            "API tokens in every node file: {}; the secrets are in the .toml files",
            r.tokens.join(", ")
        );
    }
}

/// `mirrordb cluster status` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The node's base URL.
    #[arg(long, env = "MIRRORDB_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Bearer token (role `read` or more).
    #[arg(long, env = "MIRRORDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the node's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `cluster status`: prints a node's `GET /v1/cluster`.
pub async fn status(a: StatusArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let url = format!("{}/v1/cluster", a.url.trim_end_matches('/'));
    let client = match super::http_client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mirrordb cluster status: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut req = client.get(&url);
    if let Some(t) = &a.token {
        req = req.bearer_auth(t);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "mirrordb cluster status: {url}: {:#}",
                anyhow::Error::from(e)
            );
            return ExitCode::FAILURE;
        }
    };
    let status = resp.status();
    let ok = status.is_success();
    let body = resp.text().await.unwrap_or_default();
    if a.json {
        println!("{body}");
    }
    if !ok {
        if !a.json {
            let why = if status == reqwest::StatusCode::NOT_FOUND {
                standalone(&a.url)
            } else {
                serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                    .unwrap_or(body)
            };
            eprintln!("mirrordb cluster status: {why}");
        }
        return ExitCode::FAILURE;
    }
    if a.json {
        return ExitCode::SUCCESS;
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let s = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    println!(
        "node {} ({}), epoch {}, last LSN {}, applied {}; primary {}",
        s(&v["node"]),
        s(&v["role"]),
        v["epoch"],
        v["last_lsn"],
        v["applied_lsn"],
        s(&v["primary"])
    );
    if let Some(p) = v["commit_policy"].as_str() {
        println!(
            "commit policy {p} ({}){}",
            s(&v["on_unavailable"]),
            if v["commit_degraded"].as_bool() == Some(true) {
                ": DEGRADED (acknowledging without mirrors)"
            } else {
                ""
            }
        );
    }
    for m in v["mirrors"].as_array().into_iter().flatten() {
        println!(
            "  mirror {}: {} flushed {} applied {}, lag {} entries / {} ms (apply {} / {} ms)",
            s(&m["node"]),
            if m["connected"].as_bool() == Some(true) {
                "connected,"
            } else {
                "DISCONNECTED,"
            },
            m["flushed_lsn"],
            m["applied_lsn"],
            m["flush_lag_lsn"],
            m["flush_lag_ms"],
            m["apply_lag_lsn"],
            m["apply_lag_ms"]
        );
    }
    if let Some(f) = v.get("failover").filter(|f| !f.is_null()) {
        println!(
            "failover: raft leader {} (term {}), controller {}",
            s(&f["raft_leader"]),
            f["raft_term"],
            s(&f["controller"])
        );
        if let Some(l) = f.get("lease").filter(|l| !l.is_null()) {
            let left = l["expires_in_ms"].as_i64().unwrap_or(0);
            println!(
                "  lease: {} epoch {}, {}",
                s(&l["holder"]),
                l["epoch"],
                if left >= 0 {
                    format!("valid for {left} ms")
                } else {
                    format!("LAPSED {} ms ago", -left)
                }
            );
        }
        if let Some(lf) = f.get("last_failover").filter(|l| !l.is_null()) {
            println!(
                "  last failover: {} -> {} (epoch {}), promoted {} ms after the old lease lapsed",
                s(&lf["from"]),
                s(&lf["to"]),
                lf["epoch"],
                lf["duration_ms"]
            );
        }
        for m in f["members"].as_array().into_iter().flatten() {
            println!(
                "  member {} ({}{}): {} flushed {} lag {} [{}]",
                s(&m["id"]),
                s(&m["role"]),
                if m["nofailover"].as_bool() == Some(true) {
                    ", nofailover"
                } else {
                    ""
                },
                s(&m["http"]),
                s(&m["flushed_lsn"]),
                s(&m["lag_lsn"]),
                match m["reachable"].as_bool() {
                    Some(true) => "reachable",
                    Some(false) => "UNREACHABLE",
                    None => "no report here; ask the Raft leader",
                }
            );
        }
    }
    if let Some(f) = v.get("following").filter(|f| !f.is_null()) {
        println!(
            "  following {}: {}, flushed {} applied {}, primary at {}, lag {} ms",
            s(&f["primary"]),
            if f["streaming"].as_bool() == Some(true) {
                "streaming"
            } else {
                "NOT streaming"
            },
            f["flushed_lsn"],
            f["applied_lsn"],
            f["primary_last_lsn"],
            s(&f["lag_ms"])
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(out: &Path) -> InitArgs {
        InitArgs {
            nodes: "n1=127.0.0.1:7101,n2=127.0.0.1:7102,n3=127.0.0.1:7103".into(),
            http: "n1=127.0.0.1:7071,n2=127.0.0.1:7072,n3=127.0.0.1:7073".into(),
            commit_policy: CommitPolicy::Quorum(1),
            on_unavailable: OnUnavailable::Degrade,
            witness: String::new(),
            no_failover: false,
            data_root: None,
            name: "test".into(),
            out: out.to_owned(),
            json: false,
            if_missing: false,
            tokens: Vec::new(),
        }
    }

    #[test]
    fn init_writes_loadable_certificates_and_configs_without_the_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cluster");
        let r = run(&args(&out)).unwrap();
        assert_eq!(r.nodes.len(), 3);
        assert!(r.nodes.iter().all(|n| !n.primary), "the cluster elects");
        assert!(out.join("ca.pem").exists());
        assert!(!out.join("ca.key").exists(), "the CA key is kept apart");
        assert!(out.join(CA_PRIVATE_DIR).join("ca.key").exists());
        for n in ["n1", "n2", "n3"] {
            let cfg = Config::load(&out.join(format!("{n}.toml"))).unwrap();
            cfg.validate().unwrap();
            let c = cfg.cluster.as_ref().unwrap();
            assert_eq!(c.node_id, n);
            assert!(c.failover);
            assert_eq!(c.primary, None);
            assert_eq!(cfg.node.data_dir, PathBuf::from(format!("./data-{n}")));
            assert_eq!(
                cfg.backup.destination,
                PathBuf::from(format!("./backups-{n}"))
            );
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(out.join(format!("{n}.toml")))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o077, 0, "configs may hold tokens: owner only");
            }
            let text = std::fs::read_to_string(out.join(format!("{n}.toml"))).unwrap();
            assert!(
                !text.contains("ca.key") && !text.contains(CA_PRIVATE_DIR),
                "{text}"
            );
            mirrordb_replication::certs::NodeIdentity::load(&c.certs_dir, &NodeId(n.into()))
                .unwrap();
        }
        // Nothing is overwritten.
        let e = run(&args(&out)).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
    }

    #[test]
    fn bad_arguments_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.http = "n1=127.0.0.1:7071".into();
        assert!(run(&a).unwrap_err().to_string().contains("n2"));
        let mut a = args(dir.path());
        a.nodes = "N1=127.0.0.1:1".into();
        assert!(run(&a).is_err());
        let mut a = args(dir.path());
        a.commit_policy = CommitPolicy::Quorum(3);
        assert!(run(&a).unwrap_err().to_string().contains("mirrors"));
        let mut a = args(dir.path());
        a.witness = "n9".into();
        assert!(run(&a).unwrap_err().to_string().contains("n9"));
        let mut a = args(dir.path());
        a.witness = "n3".into();
        a.no_failover = true;
        assert!(run(&a).unwrap_err().to_string().contains("failover"));
        // Two data nodes and a witness: quorum:2 needs more mirrors.
        let mut a = args(dir.path());
        a.witness = "n3".into();
        a.commit_policy = CommitPolicy::Quorum(2);
        assert!(run(&a).unwrap_err().to_string().contains("mirrors"));
    }

    #[test]
    fn if_missing_makes_a_second_init_a_no_op_but_refuses_a_partial_set() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cluster");
        let mut a = args(&out);
        a.if_missing = true;
        let first = run(&a).unwrap();
        assert!(!first.already_initialised);
        let ca = std::fs::read(out.join("ca.pem")).unwrap();
        let second = run(&a).unwrap();
        assert!(
            second.already_initialised,
            "every file exists: nothing to do"
        );
        assert_eq!(
            std::fs::read(out.join("ca.pem")).unwrap(),
            ca,
            "not rewritten"
        );
        // Without the flag a second init is still an error.
        a.if_missing = false;
        assert!(run(&a).unwrap_err().to_string().contains("already exists"));
        // A partial set (a node file lost) is never papered over.
        std::fs::remove_file(out.join("n2.toml")).unwrap();
        a.if_missing = true;
        assert!(run(&a).unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    fn given_tokens_replace_the_generated_ones_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(&dir.path().join("a"));
        a.http = "n1=10.0.0.1:7070,n2=10.0.0.2:7070,n3=10.0.0.3:7070".into();
        a.tokens = vec![
            "app:write:app-secret-0123456789abcdef".into(),
            "ops:admin:ops-secret-0123456789abcdef".into(),
        ];
        let r = run(&a).unwrap();
        assert_eq!(r.tokens, vec!["app (write)", "ops (admin)"]);
        let cfg = Config::load(&r.nodes[1].config).unwrap();
        assert_eq!(cfg.api.tokens.len(), 2);
        assert_eq!(cfg.api.tokens[1].token, "ops-secret-0123456789abcdef");
        assert_eq!(cfg.api.tokens[1].role, Role::Admin);
        for bad in [
            "app:write",
            "app:root:app-secret-0123456789abcdef",
            "app:write:short",
        ] {
            let mut a = args(&dir.path().join("b"));
            a.tokens = vec![bad.into()];
            assert!(run(&a).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn no_failover_fixes_the_first_node_as_primary_and_witnesses_are_marked() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(&dir.path().join("a"));
        a.no_failover = true;
        let r = run(&a).unwrap();
        assert!(r.nodes[0].primary && !r.nodes[1].primary);
        let cfg = Config::load(&r.nodes[1].config).unwrap();
        let c = cfg.cluster.unwrap();
        assert!(!c.failover);
        assert_eq!(c.primary.as_deref(), Some("n1"));
        let mut a = args(&dir.path().join("b"));
        a.witness = "n3".into();
        let r = run(&a).unwrap();
        assert!(r.nodes[2].witness && !r.nodes[0].witness);
        let c = Config::load(&r.nodes[0].config).unwrap().cluster.unwrap();
        assert_eq!(
            c.member("n3").unwrap().role,
            crate::cluster::config::MemberRole::Witness
        );
    }
}

/// `mirrordb switchover` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SwitchoverArgs {
    /// The node to promote (default: the best caught-up mirror).
    #[arg(long)]
    pub to: Option<String>,
    /// Any node's base URL (the request is forwarded to the Raft leader).
    #[arg(long, env = "MIRRORDB_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Bearer token (role `admin`).
    #[arg(long, env = "MIRRORDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How long to keep asking while the switchover cannot start yet, and
    /// then to wait for the new primary (seconds; 0: ask once, do not wait).
    #[arg(long, default_value_t = 30)]
    pub wait: u64,
}

/// How long `mirrordb switchover` waits to see an accepted switchover in
/// the cluster state before it asks again (the Raft leader that accepted it
/// may have lost leadership before the request was committed).
const SWITCHOVER_RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// What one `POST /v1/cluster/switchover` came to.
enum Asked {
    /// Accepted: the target, and the Raft leader that took it.
    Started(String, String),
    /// One is under way already: ours, when we asked before and that
    /// request did get through after all.
    InProgress(String),
    /// Refused for now (503): may pass by itself.
    NotYet(String),
    /// Refused (`refused: why`) or no answer (`: why`): the command ends.
    Failed(String),
}

async fn ask_switchover(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    body: &serde_json::Value,
) -> Asked {
    let mut req = client
        .post(format!("{base}/v1/cluster/switchover"))
        .json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            return Asked::Failed(format!(
                "failed: cannot reach {base}: {:#}",
                anyhow::Error::from(e)
            ));
        }
    };
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    if status.is_success() {
        let s = |k: &str| v[k].as_str().unwrap_or("?").to_owned();
        return Asked::Started(s("target"), s("leader"));
    }
    let why = v["error"]["message"]
        .as_str()
        .unwrap_or("(no message)")
        .to_owned();
    match (status, v["error"]["code"].as_str()) {
        (reqwest::StatusCode::NOT_FOUND, _) => {
            Asked::Failed(format!("refused: {}", standalone(base)))
        }
        (_, Some("switchover_in_progress")) => Asked::InProgress(why),
        (reqwest::StatusCode::SERVICE_UNAVAILABLE, _) => Asked::NotYet(why),
        _ => Asked::Failed(format!("refused: {why}")),
    }
}

/// Why a node answered 404 to a cluster path: it runs alone.
fn standalone(url: &str) -> String {
    format!(
        "{} runs standalone: it has no [cluster] section in its config, so there are no \
         members, mirrors or failover to show or switch (see `mirrordb cluster init`)",
        url.trim_end_matches('/')
    )
}

/// Runs `mirrordb switchover`: starts a planned switchover and waits until
/// the target is primary.
///
/// A refusal that may pass by itself (503: Raft leadership moved, a failover
/// is under way, the target missed its last reports) is asked again until
/// `--wait` runs out, saying why; any other refusal ends the command at
/// once. An accepted switchover that never shows in the cluster state (the
/// leader that took it lost leadership before committing it) is asked for
/// again. One the controller ended without promoting the target (past its
/// deadline) ends the command with that news instead of a timeout.
pub async fn switchover(a: SwitchoverArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    use std::time::{Duration, Instant};
    let base = a.url.trim_end_matches('/').to_owned();
    let client = match super::http_client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mirrordb switchover: {e}");
            return ExitCode::FAILURE;
        }
    };
    let token = a.token.as_deref();
    let body = serde_json::json!({ "to": a.to });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.wait);
    let mut said = String::new();
    let mut target = a.to.clone();
    let mut accepted = false;
    loop {
        match ask_switchover(&client, &base, token, &body).await {
            Asked::Started(t, leader) => {
                println!("switchover to {t} started (run by the Raft leader {leader})");
                target = Some(t);
                accepted = true;
            }
            Asked::InProgress(_) if accepted => {}
            Asked::InProgress(why) => {
                eprintln!("mirrordb switchover refused: {why}");
                return ExitCode::FAILURE;
            }
            Asked::NotYet(why) => {
                if Instant::now() >= deadline {
                    eprintln!("mirrordb switchover refused: {why}");
                    return ExitCode::FAILURE;
                }
                if why != said {
                    eprintln!("mirrordb switchover: not yet: {why}");
                    said = why;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            Asked::Failed(why) => {
                eprintln!("mirrordb switchover {why}");
                return ExitCode::FAILURE;
            }
        }
        if a.wait == 0 {
            return ExitCode::SUCCESS;
        }
        match wait_switchover(&client, &base, token, target.as_deref(), started, deadline).await {
            Waited::Done => return ExitCode::SUCCESS,
            Waited::Failed => return ExitCode::FAILURE,
            Waited::NotRecorded => {
                eprintln!(
                    "mirrordb switchover: the cluster did not record the switchover (Raft leadership moved?); asking again"
                );
            }
        }
    }
}

enum Waited {
    Done,
    Failed,
    /// Not seen under way within [`SWITCHOVER_RECORD_WAIT`], time left.
    NotRecorded,
}

/// Polls `GET /v1/cluster` until `target` (any node, when not known) is
/// primary, the switchover ended without it, or the deadline.
async fn wait_switchover(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    target: Option<&str>,
    started: std::time::Instant,
    deadline: std::time::Instant,
) -> Waited {
    use std::time::{Duration, Instant};
    let asked = Instant::now();
    let mut seen_running = false;
    // The switchover seen ended without the target primary: allow a
    // moment for the polled node's own view of the primary to follow.
    let mut ended_at: Option<Instant> = None;
    let name = target.unwrap_or("the target");
    while Instant::now() < deadline {
        let mut req = client.get(format!("{base}/v1/cluster"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Ok(r) = req.send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            if target.is_some() && v["primary"].as_str() == target {
                println!(
                    "{name} is primary (epoch {}) after {} ms",
                    v["failover"]["epoch"],
                    started.elapsed().as_millis()
                );
                return Waited::Done;
            }
            if v["failover"]["switchover"].is_null() {
                if seen_running
                    && ended_at.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(1)
                {
                    eprintln!(
                        "mirrordb switchover: the switchover to {name} ended without promoting it; {} is primary (controller: {})",
                        v["primary"].as_str().unwrap_or("no node"),
                        v["failover"]["controller"].as_str().unwrap_or("?")
                    );
                    return Waited::Failed;
                }
                if !seen_running && asked.elapsed() > SWITCHOVER_RECORD_WAIT {
                    return Waited::NotRecorded;
                }
            } else {
                seen_running = true;
                ended_at = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wait = deadline.saturating_duration_since(started).as_secs();
    eprintln!("mirrordb switchover: {name} is not primary after {wait} s");
    Waited::Failed
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod switchover_tests {
    //! `mirrordb switchover` against a scripted stand-in for the cluster's
    //! HTTP API: what it retries, what ends it.
    use super::*;
    use axum::Json;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    use serde_json::{Value, json};
    use std::process::ExitCode;
    use std::sync::{Arc, Mutex};

    /// What the stand-in answers: the n-th POST, and the n-th GET since the
    /// last accepted POST.
    type Script = dyn Fn(usize, usize) -> (StatusCode, Value) + Send + Sync;

    #[derive(Default)]
    struct Counts {
        posts: usize,
        gets_since_accept: usize,
    }

    async fn serve(
        post_answer: Arc<Script>,
        get_answer: Arc<Script>,
    ) -> (String, Arc<Mutex<Counts>>) {
        let counts = Arc::new(Mutex::new(Counts::default()));
        let (c1, c2) = (counts.clone(), counts.clone());
        let app = axum::Router::new()
            .route(
                "/v1/cluster/switchover",
                post(move || {
                    let (c, f) = (c1.clone(), post_answer.clone());
                    async move {
                        let mut c = c.lock().unwrap();
                        c.posts += 1;
                        let (status, body) = f(c.posts, 0);
                        if status.is_success() {
                            c.gets_since_accept = 0;
                        }
                        (status, Json(body)).into_response()
                    }
                }),
            )
            .route(
                "/v1/cluster",
                get(move || {
                    let (c, f) = (c2.clone(), get_answer.clone());
                    async move {
                        let mut c = c.lock().unwrap();
                        c.gets_since_accept += 1;
                        let (status, body) = f(c.posts, c.gets_since_accept);
                        (status, Json(body)).into_response()
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, counts)
    }

    fn args(url: &str) -> SwitchoverArgs {
        SwitchoverArgs {
            to: Some("n2".into()),
            url: url.into(),
            token: None,
            wait: 20,
        }
    }

    fn refusal(status: StatusCode, code: &str) -> (StatusCode, Value) {
        (
            status,
            json!({"error": {"code": code, "message": format!("{code} (scripted)")}}),
        )
    }

    fn accepted() -> (StatusCode, Value) {
        (StatusCode::OK, json!({"target": "n2", "leader": "n1"}))
    }

    fn cluster(primary: &str, switchover: bool) -> (StatusCode, Value) {
        let sw = switchover.then_some("n1 -> n2 (epoch 1)");
        (
            StatusCode::OK,
            json!({"primary": primary, "failover": {"switchover": sw, "epoch": 2, "controller": "scripted"}}),
        )
    }

    #[tokio::test]
    async fn refusals_that_pass_by_themselves_are_asked_again() {
        let (url, counts) = serve(
            Arc::new(|n, _| {
                if n <= 2 {
                    refusal(StatusCode::SERVICE_UNAVAILABLE, "switchover_unavailable")
                } else {
                    accepted()
                }
            }),
            Arc::new(|_, g| cluster(if g > 2 { "n2" } else { "n1" }, g <= 2)),
        )
        .await;
        assert_eq!(switchover(args(&url)).await, ExitCode::SUCCESS);
        assert_eq!(counts.lock().unwrap().posts, 3);
    }

    #[tokio::test]
    async fn a_refusal_that_will_not_pass_ends_it_at_once() {
        let (url, counts) = serve(
            Arc::new(|_, _| refusal(StatusCode::CONFLICT, "switchover_refused")),
            Arc::new(|_, _| cluster("n1", false)),
        )
        .await;
        assert_eq!(switchover(args(&url)).await, ExitCode::FAILURE);
        assert_eq!(counts.lock().unwrap().posts, 1);
        // Nor does it take over a switchover someone else runs.
        let (url, counts) = serve(
            Arc::new(|_, _| refusal(StatusCode::CONFLICT, "switchover_in_progress")),
            Arc::new(|_, _| cluster("n1", true)),
        )
        .await;
        assert_eq!(switchover(args(&url)).await, ExitCode::FAILURE);
        assert_eq!(counts.lock().unwrap().posts, 1);
    }

    #[tokio::test]
    async fn an_accepted_switchover_the_cluster_never_recorded_is_asked_again() {
        // The first acceptance is lost (no switchover shows, n1 stays
        // primary); the second goes through.
        let (url, counts) = serve(
            Arc::new(|_, _| accepted()),
            Arc::new(|posts, g| match posts {
                1 => cluster("n1", false),
                _ => cluster(if g > 1 { "n2" } else { "n1" }, g <= 1),
            }),
        )
        .await;
        assert_eq!(switchover(args(&url)).await, ExitCode::SUCCESS);
        assert_eq!(counts.lock().unwrap().posts, 2);
    }

    #[tokio::test]
    async fn a_switchover_the_cluster_gave_up_ends_it_without_waiting_it_out() {
        let (url, counts) = serve(
            Arc::new(|_, _| accepted()),
            // Under way for a while, then over with n1 still primary.
            Arc::new(|_, g| cluster("n1", g <= 3)),
        )
        .await;
        let t = std::time::Instant::now();
        assert_eq!(switchover(args(&url)).await, ExitCode::FAILURE);
        assert_eq!(counts.lock().unwrap().posts, 1);
        assert!(t.elapsed() < std::time::Duration::from_secs(20));
    }
}
