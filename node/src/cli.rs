//! The `mirrordb` command line (clap derive): one variant of [`Command`] per
//! subcommand, dispatched by [`run`]. Exit codes: 0 success, 1 failure,
//! 2 unusable configuration or arguments.
//!
//! `serve` logs to stderr (filter with `RUST_LOG`, default `info`) and writes
//! machine-readable lines to stdout: the recovery report and the address it
//! listens on (`mirrordb listening on http://…`, or JSON with `--json`), so a
//! supervising process (tests, scripts) can wait for it.

use crate::config::{Config, Overrides, parse_duration};
use crate::engine::RecoveryReport;
use crate::serve::{self, ServeError};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Exit code for an unusable configuration.
pub const EXIT_CONFIG: u8 = 2;

/// mirrordb: a journaled record database for deployments that run 24/7.
#[derive(Debug, Parser)]
#[command(name = "mirrordb", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open the database (recovering it if needed) and serve the HTTP API.
    Serve(ServeArgs),
    /// Exit 0 if and only if a node's /health answers 200 (Docker healthchecks).
    Healthcheck(HealthcheckArgs),
    /// Print the default configuration, or check a configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Measure throughput and latency against a node.
    Bench(crate::bench::BenchArgs),
    /// Read the journal: who did what, when (activity analysis).
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Cluster set-up and state: `cluster init` makes certificates and node
    /// configurations; `cluster status` shows a node's view.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Planned switchover: hold writes, let the target catch up, promote
    /// it, demote the old primary (no acknowledged write is lost).
    Switchover(crate::cluster::init::SwitchoverArgs),
    /// Flush the data file and hold new writes (for an external snapshot)
    /// until `unlock` or the lease lapses.
    Lock(LockArgs),
    /// Release one level of a `lock`.
    Unlock(UnlockArgs),
    /// Start a full backup on a running node (--wait: follow it with a
    /// progress bar; Ctrl-C stops it).
    Backup(crate::backup::cli::BackupArgs),
    /// List a node's backup sets, archives and history.
    Backups(crate::backup::cli::BackupsArgs),
    /// Check every checksum of backup sets and the journal archive chain
    /// (--restore: also restore into a scratch directory and compare).
    Verify(crate::backup::cli::VerifyArgs),
    /// Restore a backup set into a new data directory, rolled forward to
    /// a point in time (--dry-run prints the plan).
    Restore(crate::backup::cli::RestoreArgs),
    /// Undo everything after an LSN: online (one compensating transaction)
    /// or --offline (restore to the LSN into a new directory).
    Rollback(crate::backup::cli::RollbackArgs),
    /// Return the space a data file grew by (during backups under load) to
    /// the filesystem. The node must be stopped.
    Compact(CompactArgs),
    /// Start a three-node cluster on loopback, kill its primary under
    /// writes, and tell step by step how a mirror takes over and the old
    /// primary rejoins.
    Demo(crate::demo::DemoArgs),
    /// Failover drills on a three-node loopback cluster: kill the primary
    /// under writes N times; print failover times and acknowledged-write loss.
    Drill(crate::demo::DrillArgs),
    // More subcommands go here, one variant each, plus one arm in `run`:
    // switchover.
}

/// `mirrordb cluster …`.
#[derive(Debug, Clone, Subcommand)]
pub enum ClusterCommand {
    /// Make a cluster CA, one certificate per node and ready node configs.
    Init(crate::cluster::init::InitArgs),
    /// Show a node's view of the cluster (GET /v1/cluster).
    Status(crate::cluster::init::StatusArgs),
    /// Make a new member's certificate and config; started, it joins by itself.
    Add(crate::cluster::members::AddArgs),
    /// Remove a member from the running cluster (not the primary).
    Remove(crate::cluster::members::RemoveArgs),
}

/// `mirrordb journal …`.
#[derive(Debug, Clone, Subcommand)]
pub enum JournalCommand {
    /// List journal entries filtered by LSN, time, table, key or session.
    Show(crate::activity::JournalShowArgs),
    /// Close the open journal segment and start a new one (on a running node).
    Rotate(NodeClientArgs),
}

/// How a command reaches a running node's HTTP API.
#[derive(Debug, Clone, Args)]
pub struct NodeClientArgs {
    /// The node's base URL.
    #[arg(long, env = "MIRRORDB_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Bearer token (an admin token for lock, unlock and rotate).
    #[arg(long, env = "MIRRORDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the node's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `mirrordb lock`.
#[derive(Debug, Clone, Args)]
pub struct LockArgs {
    #[command(flatten)]
    pub node: NodeClientArgs,
    /// Lock owner (default: the token's name).
    #[arg(long)]
    pub owner: Option<String>,
    /// The lock lapses by itself after this long unless renewed: 30s, 5m…
    #[arg(long, default_value = "60s")]
    pub lease: String,
}

/// `mirrordb unlock`.
#[derive(Debug, Clone, Args)]
pub struct UnlockArgs {
    #[command(flatten)]
    pub node: NodeClientArgs,
    /// Lock owner (default: the token's name).
    #[arg(long)]
    pub owner: Option<String>,
}

/// `mirrordb serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); without it the defaults are used.
    #[arg(long, short, env = "MIRRORDB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory; overrides `node.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// HTTP listen address; overrides `node.listen` (port 0 picks a free one).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Print the recovery report and the listen address as JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Backup destination; overrides `backup.destination`.
    #[arg(long)]
    pub backup_dir: Option<PathBuf>,
}

/// `mirrordb compact`.
#[derive(Debug, Clone, Args)]
pub struct CompactArgs {
    /// Configuration file (TOML) of the stopped node.
    #[arg(long, short, env = "MIRRORDB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory; overrides `node.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `mirrordb healthcheck`.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The node's base URL (plain `http://`), or `unix:PATH` for the node's
    /// `api.unix_socket`.
    #[arg(long, env = "MIRRORDB_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// The path probed under the URL: `/health` (the node is up), or on a
    /// cluster node `/primary` (a writable primary) or `/mirror` (a mirror
    /// within its lag). A URL with a `#fragment` probes the URL's own path,
    /// as a browser would send it.
    #[arg(long, default_value = "/health")]
    pub path: String,
    /// Bearer token (not needed for /health, sent if given).
    #[arg(long, env = "MIRRORDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Give up after this long: 500ms, 3s, …
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print the node's health answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `mirrordb config …`.
#[derive(Debug, Clone, Subcommand)]
pub enum ConfigCommand {
    /// Print every key with its default value, as a TOML file.
    Defaults,
    /// Load a file, apply the overrides, validate, print the result.
    Check {
        /// The TOML file to check (without it: the defaults and overrides).
        #[arg(long, short, env = "MIRRORDB_CONFIG")]
        config: Option<PathBuf>,
        /// Override `node.data_dir`, as `serve --data-dir` does.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override `node.listen`, as `serve --listen` does.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Print the resolved configuration as JSON (tokens redacted).
        #[arg(long)]
        json: bool,
    },
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(a) => Ok(serve_cmd(a).await),
        Command::Healthcheck(a) => Ok(healthcheck(a).await),
        Command::Config(c) => Ok(config_cmd(c)),
        Command::Bench(a) => crate::bench::run(a).await.map(|()| ExitCode::SUCCESS),
        Command::Cluster(ClusterCommand::Init(a)) => match crate::cluster::init::run(&a) {
            Ok(r) => {
                crate::cluster::init::print(&r, a.json);
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("mirrordb cluster init: {e}");
                Ok(ExitCode::from(EXIT_CONFIG))
            }
        },
        Command::Cluster(ClusterCommand::Status(a)) => Ok(crate::cluster::init::status(a).await),
        Command::Cluster(ClusterCommand::Add(a)) => Ok(crate::cluster::members::add_cmd(&a)),
        Command::Cluster(ClusterCommand::Remove(a)) => {
            Ok(crate::cluster::members::remove_cmd(a).await)
        }
        Command::Switchover(a) => Ok(crate::cluster::init::switchover(a).await),
        Command::Lock(a) => {
            let mut body = serde_json::json!({ "lease": a.lease });
            if let Some(o) = &a.owner {
                body["owner"] = o.clone().into();
            }
            Ok(node_call(
                &a.node,
                reqwest::Method::POST,
                "/v1/lock",
                Some(body),
                lock_text,
            )
            .await)
        }
        Command::Unlock(a) => {
            let path = match &a.owner {
                Some(o) => format!("/v1/lock?owner={}", percent_encode(o)),
                None => "/v1/lock".to_owned(),
            };
            Ok(node_call(&a.node, reqwest::Method::DELETE, &path, None, lock_text).await)
        }
        Command::Journal(JournalCommand::Rotate(a)) => Ok(node_call(
            &a,
            reqwest::Method::POST,
            "/v1/journal/rotate",
            None,
            rotate_text,
        )
        .await),
        Command::Backup(a) => crate::backup::cli::backup(a).await,
        Command::Backups(a) => crate::backup::cli::backups(a).await,
        Command::Verify(a) => crate::backup::cli::verify_cmd(a).await,
        Command::Restore(a) => crate::backup::cli::restore_cmd(a).await,
        Command::Rollback(a) => crate::backup::cli::rollback_cmd(a).await,
        Command::Compact(a) => Ok(compact_cmd(a).await),
        Command::Demo(a) => crate::demo::demo(a).await,
        Command::Drill(a) => crate::demo::drill(a).await,
        Command::Journal(JournalCommand::Show(a)) => {
            tokio::task::spawn_blocking(move || crate::activity::run_show(a)).await??;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn overrides(data_dir: Option<PathBuf>, listen: Option<SocketAddr>) -> Overrides {
    Overrides {
        data_dir,
        listen,
        backup_dir: None,
    }
}

async fn serve_cmd(a: ServeArgs) -> ExitCode {
    let mut o = overrides(a.data_dir, a.listen);
    o.backup_dir = a.backup_dir;
    let cfg = match Config::resolve(a.config.as_deref(), &o) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mirrordb: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing::info!(
        node = %cfg.node.name,
        data_dir = %cfg.node.data_dir.display(),
        listen = %cfg.node.listen,
        tokens = cfg.api.tokens.len(),
        "starting mirrordb {}",
        env!("CARGO_PKG_VERSION")
    );
    let engine = match serve::open_engine(serve::engine_config(&cfg)).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("mirrordb: cannot open the database: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_recovery(engine.recovery(), a.json);
    let server = match serve::start(&cfg, engine.clone()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mirrordb: {e}");
            let _ = engine.shutdown().await;
            return ExitCode::from(match e {
                ServeError::Config(_) => EXIT_CONFIG,
                _ => 1,
            });
        }
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({"event": "listening", "addr": server.local_addr().to_string()})
        );
    } else {
        println!("mirrordb listening on {}", server.base_url());
    }
    match server.run_until_signal().await {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mirrordb: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_recovery(r: &RecoveryReport, json: bool) {
    if json {
        let v = serde_json::json!({"event": "recovery", "report": r});
        println!("{v}");
        return;
    }
    let action = serde_json::to_value(r.action)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{:?}", r.action));
    println!(
        "recovery: {action}: database {} epoch {}, checkpoint LSN {}, journal LSN {}..={}, replayed {} entries in {} ms",
        r.db_id,
        r.epoch,
        r.checkpoint_lsn,
        r.journal_first_lsn,
        r.journal_last_lsn,
        r.replayed_entries,
        r.replay_ms
    );
    if let Some(t) = &r.tail_cut {
        println!(
            "recovery: cut a torn journal tail in {} at offset {} ({} bytes, never acknowledged)",
            t.segment.display(),
            t.offset,
            t.bytes_removed
        );
    }
    if let Some(lsn) = r.aborted_txn_lsn {
        println!("recovery: discarded an unfinished transaction begun at LSN {lsn}");
    }
    if let Some(p) = &r.damaged_file_moved_to {
        println!(
            "recovery: the damaged data file was moved to {}",
            p.display()
        );
    }
}

/// Percent-encodes a query value.
pub(crate) fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// How long a command waits for a node's answer.
const NODE_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Calls a node's API and prints the answer: JSON with `--json`, else one
/// line. Exit 0 on a 2xx answer.
/// What `mirrordb lock` and `unlock` print without `--json`.
fn lock_text(v: &serde_json::Value) -> Option<String> {
    if !v["locked"].as_bool()? {
        return Some("unlocked: writes go through".into());
    }
    let lease = v["expires_in_ms"]
        .as_u64()
        .map(|ms| {
            format!(
                "; the lease lapses in {:.1} s unless renewed",
                ms as f64 / 1000.0
            )
        })
        .unwrap_or_default();
    Some(format!(
        "locked by {} (depth {}: as many unlocks release it){lease}; writes wait",
        v["owner"].as_str().unwrap_or("?"),
        v["depth"].as_u64().unwrap_or(1),
    ))
}

/// What `mirrordb journal rotate` prints without `--json`.
fn rotate_text(v: &serde_json::Value) -> Option<String> {
    Some(match (v["closed"].as_str(), v["last_lsn"].as_u64()) {
        (Some(closed), Some(lsn)) => format!("closed {closed} (last LSN {lsn})"),
        _ => "nothing to rotate: the open segment holds no entry".into(),
    })
}

/// Calls the node; prints its answer through `render` (the JSON itself
/// with `--json`, or when `render` cannot read it).
async fn node_call(
    a: &NodeClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
    render: fn(&serde_json::Value) -> Option<String>,
) -> ExitCode {
    let url = format!("{}{path}", a.url.trim_end_matches('/'));
    let client = match reqwest::Client::builder()
        .timeout(NODE_CALL_TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mirrordb: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut req = client.request(method.clone(), &url);
    if let Some(t) = &a.token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            // The error and its causes ("connection refused" is a cause).
            eprintln!("mirrordb: {method} {url}: {:#}", anyhow::Error::from(e));
            return ExitCode::FAILURE;
        }
    };
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if a.json {
        println!("{text}");
    }
    if status.is_success() {
        if !a.json {
            let human = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| render(&v));
            println!("{}", human.unwrap_or(text));
        }
        ExitCode::SUCCESS
    } else {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        eprintln!("mirrordb: {method} {url} answered {status}: {message}");
        ExitCode::FAILURE
    }
}

async fn healthcheck(a: HealthcheckArgs) -> ExitCode {
    // A fragment is never sent, and it swallows the path appended after it:
    // `http://host:7070/primary#` probes /primary.
    let (base, probe) = match a.url.split_once('#') {
        Some((base, _)) => (base, ""),
        None => (a.url.as_str(), a.path.as_str()),
    };
    let url = format!("{}{probe}", base.trim_end_matches('/'));
    let unhealthy = |e: &str| {
        if a.json {
            println!("{}", serde_json::json!({"error": e}));
        } else {
            eprintln!("unhealthy: {url}: {e}");
        }
        ExitCode::FAILURE
    };
    if !probe.is_empty() && !probe.starts_with('/') {
        return unhealthy(&format!("--path {probe:?} must start with /"));
    }
    let target = match crate::http_client::HttpTarget::parse(base, a.token.as_deref()) {
        Ok(t) => t,
        Err(e) => return unhealthy(&e),
    };
    let mut path = target.path(probe);
    if path.is_empty() {
        path.push('/');
    }
    let mut conn = crate::http_client::HttpConn::new(target, a.timeout);
    match conn.request(hyper::Method::GET, &path, None).await {
        Ok((status, body)) => {
            let body = String::from_utf8_lossy(&body);
            if a.json {
                println!("{body}");
            } else if status.is_success() {
                println!("ok: {url}");
            } else {
                println!("unhealthy: {url} answered {status}: {body}");
            }
            if status == hyper::StatusCode::OK {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => unhealthy(&e),
    }
}

async fn compact_cmd(a: CompactArgs) -> ExitCode {
    let cfg = match Config::resolve(a.config.as_deref(), &overrides(a.data_dir, None)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mirrordb: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let dir = cfg.node.data_dir.clone();
    // The cache size fits in memory: `Config::validate` checked it.
    let cache = usize::try_from(cfg.cache.cache_bytes.0).unwrap_or(usize::MAX);
    if !a.json {
        eprintln!("compacting {} (the node must be stopped)…", dir.display());
    }
    let done =
        tokio::task::spawn_blocking(move || crate::engine::compact::compact_data_dir(&dir, cache))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
    let r = match done {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mirrordb compact: {e}");
            return ExitCode::FAILURE;
        }
    };
    if a.json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    } else {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        println!(
            "{}: {:.1} MiB -> {:.1} MiB ({:.1} MiB returned, {} pass(es), {:.1} s)",
            r.data_file.display(),
            mib(r.bytes_before),
            mib(r.bytes_after),
            mib(r.bytes_before.saturating_sub(r.bytes_after)),
            r.passes,
            r.seconds
        );
    }
    ExitCode::SUCCESS
}

fn config_cmd(c: ConfigCommand) -> ExitCode {
    match c {
        ConfigCommand::Defaults => {
            print!("{}", Config::defaults_toml());
            ExitCode::SUCCESS
        }
        ConfigCommand::Check {
            config,
            data_dir,
            listen,
            json,
        } => match Config::resolve(config.as_deref(), &overrides(data_dir, listen)) {
            Ok(mut cfg) => {
                for t in &mut cfg.api.tokens {
                    t.token = "<redacted>".into();
                }
                if json {
                    println!("{}", serde_json::to_string(&cfg).unwrap_or_default());
                } else {
                    print!("{}", toml::to_string(&cfg).unwrap_or_default());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mirrordb: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn lock_and_rotate_answers_read_as_sentences() {
        use serde_json::json;
        let held = json!({"locked": true, "owner": "ops", "depth": 2, "expires_in_ms": 59_500});
        assert_eq!(
            lock_text(&held).as_deref(),
            Some(
                "locked by ops (depth 2: as many unlocks release it); the lease lapses in 59.5 s \
                 unless renewed; writes wait"
            )
        );
        let free = json!({"locked": false, "owner": null, "depth": 0, "expires_in_ms": null});
        assert_eq!(
            lock_text(&free).as_deref(),
            Some("unlocked: writes go through")
        );
        // Not a lock status: the JSON is printed as it came.
        assert_eq!(lock_text(&json!({"x": 1})), None);
        assert_eq!(
            rotate_text(&json!({"closed": "/d/journal/00000001.journal", "last_lsn": 42}))
                .as_deref(),
            Some("closed /d/journal/00000001.journal (last LSN 42)")
        );
        assert_eq!(
            rotate_text(&json!({"closed": null, "last_lsn": null})).as_deref(),
            Some("nothing to rotate: the open segment holds no entry")
        );
    }
}
