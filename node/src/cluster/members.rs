//! `mirrordb cluster add` and `mirrordb cluster remove`: growing and
//! shrinking a running failover cluster.
//!
//! ```text
//! cluster add n4 --addr H:P --http H:P --certs DIR
//!   ├─ DIR/n4.{pem,key} from DIR/ca-private (the cluster CA), DIR/n4.toml from
//!   │  another member's file, with `join = true` and n4 among the members
//!   └─ start n4 ─► it asks the members (POST /v1/cluster/members, forwarded
//!      to the Raft leader) until it is added: learner ─► voter ─► member;
//!      a data node then follows the primary as a mirror (reseeded)
//! cluster remove n4 --url URL ─► DELETE /v1/cluster/members/n4 (the primary
//!   cannot be removed: switch over first)
//! ```
//!
//! The member record itself lives in the Raft state; the `members` lists in
//! the other nodes' files only tell a node whom to ask at start.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use mirrordb_replication::NodeId;
use mirrordb_replication::certs::ClusterCa;

use super::config::{MemberConfig, MemberRole};
use super::init::{CA_PRIVATE_DIR, InitError, host_of, io, write_new};
use crate::config::{Config, Role};

/// `mirrordb cluster add`.
#[derive(Debug, Clone, Args)]
pub struct AddArgs {
    /// The new member's id (`[a-z0-9-]`).
    pub id: String,
    /// Its replication (QUIC) address, `HOST:PORT`, as the others dial it.
    #[arg(long)]
    pub addr: String,
    /// Its HTTP API address, `IP:PORT`.
    #[arg(long)]
    pub http: String,
    /// A witness: votes, holds no data, never promoted.
    #[arg(long)]
    pub witness: bool,
    /// Never promote it automatically.
    #[arg(long)]
    pub nofailover: bool,
    /// The directory `cluster init` wrote (with `ca-private/`).
    #[arg(long)]
    pub certs: PathBuf,
    /// Data directory of the new node (default: next to the others').
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// What `cluster add` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AddReport {
    pub id: String,
    pub config: PathBuf,
    pub cert: PathBuf,
}

/// Writes the new member's certificate and configuration.
pub fn add(a: &AddArgs) -> Result<AddReport, InitError> {
    mirrordb_replication::certs::validate_node_id(&a.id)?;
    let certs = std::fs::canonicalize(&a.certs).map_err(io(&a.certs))?;
    let config_path = certs.join(format!("{}.toml", a.id));
    let planned = ["pem", "key", "toml"].map(|e| certs.join(format!("{}.{e}", a.id)));
    if let Some(p) = planned.iter().find(|p| p.exists()) {
        return Err(InitError::Args(format!(
            "{} exists: {} already has files here",
            p.display(),
            a.id
        )));
    }
    let template = template(&certs)?;
    let mut cfg = Config::load(&template).map_err(|e| InitError::Config(e.to_string()))?;
    let Some(mut section) = cfg.cluster.take() else {
        return Err(InitError::Config(format!(
            "{} has no [cluster] section",
            template.display()
        )));
    };
    if !section.failover {
        return Err(InitError::Args(
            "this cluster has a fixed primary (cluster.failover = false): members cannot be added at run time".into(),
        ));
    }
    if section.members.iter().any(|m| m.id == a.id) {
        return Err(InitError::Args(format!("{} is already a member", a.id)));
    }
    let host = host_of(&a.addr)?;
    let http_host = host_of(&a.http)?;
    let listen: std::net::SocketAddr = a
        .http
        .parse()
        .map_err(|_| InitError::Args(format!("--http {:?} must be IP:PORT", a.http)))?;
    if !listen.ip().is_loopback() && !cfg.api.tokens.iter().any(|t| t.role == Role::Admin) {
        return Err(InitError::Args(
            "the new node listens beyond loopback but the cluster's files hold no admin token"
                .into(),
        ));
    }
    section.members.push(MemberConfig {
        id: a.id.clone(),
        addr: a.addr.clone(),
        http: format!("http://{http_host}:{}", listen.port()),
        role: if a.witness {
            MemberRole::Witness
        } else {
            MemberRole::Data
        },
        nofailover: a.nofailover,
    });
    section.node_id = a.id.clone();
    section.join = true;
    section.listen = None;
    let data_root = cfg.node.data_dir.parent().map(Path::to_owned);
    cfg.node.name = a.id.clone();
    cfg.node.listen = listen;
    cfg.node.data_dir = match (&a.data_dir, &data_root) {
        (Some(d), _) => d.clone(),
        (None, Some(root)) => root.join(format!("data-{}", a.id)),
        (None, None) => PathBuf::from(format!("./data-{}", a.id)),
    };
    if let Some(root) = cfg.backup.destination.parent().map(Path::to_owned) {
        cfg.backup.destination = root.join(format!("backups-{}", a.id));
    }
    cfg.cluster = Some(section);
    cfg.validate()
        .map_err(|e| InitError::Config(e.to_string()))?;
    let text = toml::to_string(&cfg).map_err(|e| InitError::Config(e.to_string()))?;

    let ca = ClusterCa::load(&certs.join(CA_PRIVATE_DIR))?;
    let mut hosts = vec![host];
    for extra in ["localhost", "127.0.0.1"] {
        if !hosts.iter().any(|h| h == extra) {
            hosts.push(extra.to_owned());
        }
    }
    ca.issue(&NodeId(a.id.clone()), &hosts)?.write(&certs)?;
    let header = format!(
        "# mirrordb node {id}, added to a running cluster by `mirrordb cluster add`.\n\
         # Start it with: mirrordb serve --config {path}\n\
         # It asks the members to add it (join = true) and then follows the primary.\n\n",
        id = a.id,
        path = config_path.display(),
    );
    write_new(&config_path, &format!("{header}{text}"))?;
    Ok(AddReport {
        id: a.id.clone(),
        config: config_path,
        cert: certs.join(format!("{}.pem", a.id)),
    })
}

/// A member's file in `certs` to start the new one's from (the first by
/// name that has a `[cluster]` section).
fn template(certs: &Path) -> Result<PathBuf, InitError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(certs)
        .map_err(io(certs))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .find(|p| {
            Config::load(p)
                .map(|c| c.cluster.is_some())
                .unwrap_or(false)
        })
        .ok_or_else(|| {
            InitError::Args(format!(
                "{} holds no member configuration (run mirrordb cluster init first)",
                certs.display()
            ))
        })
}

/// Runs `mirrordb cluster add` and prints what to do next.
pub fn add_cmd(a: &AddArgs) -> ExitCode {
    match add(a) {
        Ok(r) => {
            println!("wrote {} and {}", r.cert.display(), r.config.display());
            println!(
                "start it with: mirrordb serve --config {}\n\
                 it asks the running members to add it, then follows the primary",
                r.config.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mirrordb cluster add: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `mirrordb cluster remove`.
#[derive(Debug, Clone, Args)]
pub struct RemoveArgs {
    /// The member to remove.
    pub id: String,
    /// Any node's base URL (the request is forwarded to the Raft leader).
    #[arg(long, env = "MIRRORDB_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Bearer token (role `admin`).
    #[arg(long, env = "MIRRORDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Runs `mirrordb cluster remove`.
pub async fn remove_cmd(a: RemoveArgs) -> ExitCode {
    let base = a.url.trim_end_matches('/');
    let client = match super::http_client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mirrordb cluster remove: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut req = client
        .delete(format!("{base}/v1/cluster/members/{}", a.id))
        .timeout(std::time::Duration::from_secs(90));
    if let Some(t) = &a.token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => {
            println!("{} removed; stop its process now", a.id);
            ExitCode::SUCCESS
        }
        Ok(r) => {
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            eprintln!(
                "mirrordb cluster remove refused: {}",
                v["error"]["message"].as_str().unwrap_or("(no message)")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("mirrordb cluster remove: {base}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cluster::init::{InitArgs, run};

    fn init(dir: &Path) -> PathBuf {
        let out = dir.join("certs");
        run(&InitArgs {
            nodes: "n1=127.0.0.1:7101,n2=127.0.0.1:7102".into(),
            http: "n1=127.0.0.1:7071,n2=127.0.0.1:7072".into(),
            commit_policy: crate::cluster::config::CommitPolicy::Async,
            on_unavailable: crate::cluster::config::OnUnavailable::Degrade,
            data_root: Some(dir.to_owned()),
            name: "t".into(),
            out: out.clone(),
            json: false,
            if_missing: false,
            tokens: Vec::new(),
            witness: String::new(),
            no_failover: false,
        })
        .unwrap();
        out
    }

    fn args(certs: &Path, id: &str) -> AddArgs {
        AddArgs {
            id: id.into(),
            addr: "127.0.0.1:7103".into(),
            http: "127.0.0.1:7073".into(),
            witness: true,
            nofailover: false,
            certs: certs.to_owned(),
            data_dir: None,
        }
    }

    #[test]
    fn add_writes_a_joining_config_and_a_certificate_of_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let certs = init(dir.path());
        let r = add(&args(&certs, "n3")).unwrap();
        let cfg = Config::load(&r.config).unwrap();
        let c = cfg.cluster.as_ref().unwrap();
        assert_eq!(c.node_id, "n3");
        assert!(c.join);
        assert!(c.is_witness());
        assert_eq!(c.members.len(), 3);
        assert_eq!(
            cfg.node.data_dir,
            std::fs::canonicalize(dir.path()).unwrap().join("data-n3")
        );
        // The certificate loads with the cluster CA.
        mirrordb_replication::certs::NodeIdentity::load(&certs, &NodeId("n3".into())).unwrap();
        // A second time: the files are there, nothing is overwritten.
        assert!(add(&args(&certs, "n3")).is_err());
        // An existing member.
        assert!(add(&args(&certs, "n1")).is_err());
    }

    #[test]
    fn add_refuses_a_bad_id_and_a_directory_without_members() {
        let dir = tempfile::tempdir().unwrap();
        let certs = init(dir.path());
        assert!(add(&args(&certs, "N 4")).is_err());
        let empty = tempfile::tempdir().unwrap();
        assert!(add(&args(empty.path(), "n4")).is_err());
    }
}
