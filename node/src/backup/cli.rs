//! The backup commands of the `mirrordb` binary: `backup` and `backups`
//! talk to a running node over HTTP; `verify`, `restore` and the offline
//! `rollback` read backup directories directly (the node need not run).
//!
//! ```text
//! mirrordb backup [--wait] [--json]   POST /v1/backups, then follow /v1/backups/current
//!                                     (progress bar; Ctrl-C stops the backup: backup_interrupted)
//! mirrordb backups [--json]           GET /v1/backups
//! mirrordb verify --from DIR [--set N] [--restore]
//! mirrordb restore --from DIR --to DIR [--set N|latest] [--until-lsn L | --until-time T | --until-name P]
//!                  [--journal-dir DIR] [--dry-run] [--json]
//! mirrordb rollback --to-lsn L        POST /v1/rollback
//! mirrordb rollback --to-lsn L --offline --from DIR --to DIR [--journal-dir DIR]
//! ```
//!
//! Exit codes: 0 success, 1 failure (the message says why), 2 bad arguments.

use super::restore::{self, RestoreTarget, Until};
use super::verify::{self, VerifyOptions};
use super::{Catalog, RestoreProgress};
use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// How long `backup --wait` lets the node hold each progress request
/// (the node answers at once when the backup ends).
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Longest a single HTTP call may take (a waited-for backup polls instead).
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// How a command reaches a running node.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// The node's base URL.
    #[arg(long, env = "MIRRORDB_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Bearer token (an admin token to start or stop backups and roll back).
    #[arg(long, env = "MIRRORDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `mirrordb backup`.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Follow the backup to its end with a progress bar (Ctrl-C stops it);
    /// the exit code says whether it succeeded.
    #[arg(long)]
    pub wait: bool,
}

/// `mirrordb backups`.
#[derive(Debug, Clone, Args)]
pub struct BackupsArgs {
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `mirrordb verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The backup directory (`backup.destination`).
    #[arg(long, env = "MIRRORDB_BACKUP_DIR", default_value = super::settings::DEFAULT_DESTINATION)]
    pub from: PathBuf,
    /// Only this set and the archives after it (default: every set and
    /// every archive).
    #[arg(long)]
    pub set: Option<u32>,
    /// Also restore the set (or the newest) into a scratch directory and
    /// compare record count and content digest with the manifest.
    #[arg(long)]
    pub restore: bool,
    /// Log the outcome in this data directory's Backup Journal.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the report (every check, with what it found) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Which set to start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetChoice {
    Latest,
    Number(u32),
}

fn parse_set(s: &str) -> Result<SetChoice, String> {
    if s == "latest" {
        return Ok(SetChoice::Latest);
    }
    s.parse::<u32>()
        .ok()
        .filter(|n| *n >= 1)
        .map(SetChoice::Number)
        .ok_or_else(|| format!("--set takes a set number (1, 2, …) or \"latest\", got {s:?}"))
}

/// `mirrordb restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The backup directory.
    #[arg(long)]
    pub from: PathBuf,
    /// The new data directory (must not hold a database).
    #[arg(long)]
    pub to: PathBuf,
    /// Base set: a number or "latest". Without an --until-* option the set
    /// is restored as it was taken; without --set the newest set before the
    /// target is picked and rolled forward.
    #[arg(long, value_parser = parse_set)]
    pub set: Option<SetChoice>,
    /// Roll forward up to and including this LSN (1 or more: LSN 1 is a
    /// database's first entry, its first start, which holds no data).
    #[arg(long, conflicts_with_all = ["until_time", "until_name"],
          value_parser = clap::value_parser!(u64).range(1..))]
    pub until_lsn: Option<u64>,
    /// Roll forward through every entry at or before this time: RFC 3339,
    /// "YYYY-MM-DD HH:MM:SS" (UTC) or YYYY-MM-DD.
    #[arg(long, value_parser = crate::activity::parse_time, conflicts_with = "until_name")]
    pub until_time: Option<u64>,
    /// Roll forward to the last restore point of this name.
    #[arg(long)]
    pub until_name: Option<String>,
    /// Also integrate this live journal directory (the old node's
    /// `data/journal`) after the archives.
    #[arg(long)]
    pub journal_dir: Option<PathBuf>,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Memory for the new data file's page cache while it is built
    /// ("512MiB", "2GiB"; at least 1MiB). Taken only as far as the
    /// database goes; more makes integrating many journal entries into a
    /// large database faster. Default: 1GiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_cache)]
    pub cache: Option<usize>,
    /// Print the plan and the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--cache`: a size of at least 1 MiB, as `cache.cache_bytes` takes.
fn parse_cache(s: &str) -> Result<usize, String> {
    let n = crate::config::parse_size(s).map_err(|e| e.to_string())?;
    if n < 1 << 20 {
        return Err(format!("--cache must be at least 1MiB, got {s:?}"));
    }
    usize::try_from(n).map_err(|_| format!("--cache {s:?} is more than this machine can address"))
}

/// `mirrordb rollback`.
#[derive(Debug, Clone, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Undo everything after this LSN (1 or more: rolling back to LSN 1,
    /// the database's first start, undoes every write).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub to_lsn: u64,
    /// Instead of a compensating transaction on a running node, restore
    /// the state at the LSN into a new directory (--from, --to).
    #[arg(long, requires_all = ["from", "to"])]
    pub offline: bool,
    /// With --offline: the backup directory (`backup.destination`).
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// With --offline: the new data directory to build (empty or missing).
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// With --offline: the old node's journal directory, for entries after
    /// the last archive.
    #[arg(long)]
    pub journal_dir: Option<PathBuf>,
}

fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .context("cannot build the HTTP client")
}

/// One call to the node: (status, JSON body).
async fn call(
    c: &reqwest::Client,
    node: &NodeArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let url = format!("{}{path}", node.url.trim_end_matches('/'));
    let mut req = c.request(method, &url);
    if let Some(t) = &node.token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v))
}

fn error_text(v: &Value) -> String {
    match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        _ => v.to_string(),
    }
}

/// The bar's message for a backup's progress: its phase, and how long
/// compression has waited for writers when it has (a backup that slows
/// itself on purpose says so).
fn progress_message(p: &Value) -> String {
    let phase = p["phase"].as_str().unwrap_or("");
    match p["paced_ms"].as_u64().unwrap_or(0) {
        0 => phase.to_owned(),
        ms => format!(
            "{phase} (waited {:.1} s for writers: backup.max_rate_while_writing)",
            ms as f64 / 1000.0
        ),
    }
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    if let Ok(s) = ProgressStyle::with_template(template) {
        b.set_style(s.progress_chars("=> "));
    }
    b
}

/// `mirrordb backup`.
pub async fn backup(a: BackupArgs) -> anyhow::Result<ExitCode> {
    let c = client()?;
    let (status, v) = call(&c, &a.node, reqwest::Method::POST, "/v1/backups", None).await?;
    if status != 202 {
        eprintln!("mirrordb backup: {}", error_text(&v));
        return Ok(ExitCode::FAILURE);
    }
    let number = v["number"].as_u64().unwrap_or(0);
    if !a.wait {
        if a.node.json {
            println!("{v}");
        } else {
            println!(
                "backup {number} started; follow it with `mirrordb backups` or GET /v1/backups/current"
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let pb = bar(
        0,
        "{spinner} backup {prefix} {msg} [{bar:30}] {bytes}/{total_bytes} {eta}",
    );
    pb.set_prefix(number.to_string());
    let mut interrupted = false;
    // One listener for the whole wait, so a Ctrl-C between polls is not lost.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let progress_path = format!("/v1/backups/current?wait_ms={}", POLL_EVERY.as_millis());
    loop {
        // The node answers as soon as the backup ends, or after POLL_EVERY
        // with its progress: the bar moves and the command returns at once.
        let (s, p) = tokio::select! {
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                pb.set_message("stopping");
                let _ = call(&c, &a.node, reqwest::Method::DELETE, "/v1/backups/current", None).await;
                continue;
            }
            r = call(
                &c,
                &a.node,
                reqwest::Method::GET,
                &progress_path,
                None,
            ) => r?,
        };
        if s == 404 {
            break;
        }
        if s == 200 {
            pb.set_length(p["bytes_total"].as_u64().unwrap_or(0));
            pb.set_position(p["bytes_done"].as_u64().unwrap_or(0));
            if !interrupted {
                pb.set_message(progress_message(&p));
            }
        } else {
            // An error answer comes at once: do not ask again at once.
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
    pb.finish_and_clear();
    // The outcome is in the history.
    let (_, list) = call(&c, &a.node, reqwest::Method::GET, "/v1/backups", None).await?;
    let entry = list["history"]
        .as_array()
        .and_then(|h| {
            h.iter()
                .rev()
                .find(|e| e["number"].as_u64() == Some(number))
        })
        .cloned();
    let Some(e) = entry else {
        // Skipped (only_if_changed) runs leave no history entry.
        if a.node.json {
            println!(
                "{}",
                serde_json::json!({"number": number, "status": "skipped"})
            );
        } else {
            println!("backup {number}: nothing recorded (skipped: no change since the last set?)");
        }
        return Ok(ExitCode::SUCCESS);
    };
    if a.node.json {
        println!("{e}");
    } else {
        println!(
            "backup {number} {}: LSN {}, {} ms{}",
            e["status"].as_str().unwrap_or("?"),
            e["lsn"],
            e["duration_ms"],
            e["error"]
                .as_str()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        );
    }
    Ok(match e["status"].as_str() {
        Some("ok") => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// `mirrordb backups`.
pub async fn backups(a: BackupsArgs) -> anyhow::Result<ExitCode> {
    let c = client()?;
    let (status, v) = call(&c, &a.node, reqwest::Method::GET, "/v1/backups", None).await?;
    if status != 200 {
        eprintln!("mirrordb backups: {}", error_text(&v));
        return Ok(ExitCode::FAILURE);
    }
    if a.node.json {
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", backups_text(&v));
    Ok(ExitCode::SUCCESS)
}

/// What `mirrordb backups` prints: the destination, the sets and the
/// journal archives as tables, failed runs, the running backup.
fn backups_text(v: &Value) -> String {
    use std::fmt::Write;
    let num = |x: &Value| x.as_u64().map_or_else(|| "?".to_owned(), |n| n.to_string());
    let size = |x: &Value| {
        x.as_u64()
            .map_or_else(|| "?".to_owned(), super::run::human_bytes)
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "destination {}{}",
        v["destination"].as_str().unwrap_or("?"),
        if v["automatic_paused"].as_bool() == Some(true) {
            " (automatic backups PAUSED after failures: run a manual backup)"
        } else {
            ""
        }
    );
    let sets = v["sets"].as_array().map(Vec::as_slice).unwrap_or_default();
    if sets.is_empty() {
        let _ = writeln!(out, "no backup sets");
    } else {
        let _ = writeln!(
            out,
            "{:>6}  {:<8} {:>12}  {:<27} {:>10} {:>10}",
            "set", "status", "LSN", "taken", "records", "size"
        );
        for s in sets {
            let _ = writeln!(
                out,
                "{:>6}  {:<8} {:>12}  {:<27} {:>10} {:>10}",
                num(&s["number"]),
                s["status"].as_str().unwrap_or("?"),
                num(&s["lsn"]),
                s["time"].as_str().unwrap_or("?"),
                num(&s["records"]),
                size(&s["bytes"]),
            );
        }
    }
    let archives = v["archives"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !archives.is_empty() {
        let _ = writeln!(out, "{:>7}  {:>25} {:>10}", "archive", "LSNs", "size");
        for a in archives {
            let lsns = format!("{}..={}", num(&a["first_lsn"]), num(&a["last_lsn"]));
            let _ = writeln!(
                out,
                "{:>7}  {:>25} {:>10}",
                num(&a["number"]),
                lsns,
                size(&a["bytes"]),
            );
        }
    }
    for e in v["history"].as_array().into_iter().flatten() {
        if e["status"] != "ok" {
            let _ = writeln!(
                out,
                "history: {} {} {} {}",
                num(&e["number"]),
                e["status"].as_str().unwrap_or("?"),
                e["started"].as_str().unwrap_or("?"),
                e["error"].as_str().unwrap_or("")
            );
        }
    }
    if let Some(cur) = v.get("current").filter(|c| !c.is_null()) {
        let _ = writeln!(
            out,
            "running: backup {} ({}), {} of {}",
            num(&cur["number"]),
            cur["phase"].as_str().unwrap_or("?"),
            size(&cur["bytes_done"]),
            size(&cur["bytes_total"]),
        );
    }
    out
}

/// `mirrordb verify`.
pub async fn verify_cmd(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let opts = VerifyOptions {
        set: a.set,
        restore: a.restore,
        scratch: None,
        log_dir: a.data_dir.as_ref().map(|d| d.join("logs")),
    };
    let from = a.from.clone();
    let rep = tokio::task::spawn_blocking(move || verify::verify(&from, &opts)).await??;
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
    } else {
        for c in &rep.checks {
            println!(
                "{} {}: {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.what,
                c.detail
            );
        }
        println!(
            "{}: {} sets, {} archives checked in {}",
            if rep.ok { "verified" } else { "PROBLEMS FOUND" },
            rep.sets_checked.len(),
            rep.archives_checked.len(),
            a.from.display()
        );
    }
    Ok(if rep.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The target the restore options describe.
pub fn target_of(a: &RestoreArgs) -> anyhow::Result<RestoreTarget> {
    let set = match a.set {
        None => None,
        Some(SetChoice::Number(n)) => Some(n),
        Some(SetChoice::Latest) => {
            let name = restore::detect_name(&a.from)?;
            let c = Catalog::scan(&a.from, &name)?;
            match c.sets.last() {
                Some(s) => Some(s.manifest.number),
                None => bail!("{} holds no complete backup set", a.from.display()),
            }
        }
    };
    let until = match (&a.until_lsn, &a.until_time, &a.until_name) {
        (Some(l), _, _) => Until::Lsn(*l),
        (_, Some(t), _) => Until::TimeUs(*t),
        (_, _, Some(n)) => Until::Name(n.clone()),
        _ if set.is_some() => Until::SetOnly,
        _ => Until::End,
    };
    Ok(RestoreTarget { set, until })
}

fn restore_progress_bar() -> (ProgressBar, impl Fn(RestoreProgress)) {
    let pb = bar(0, "{spinner} {msg} [{bar:30}] {pos}/{len}");
    let p = pb.clone();
    (pb, move |r: RestoreProgress| {
        if r.phase == "snapshot" {
            p.set_length(r.items_total);
            p.set_position(r.items);
            p.set_message("loading the set");
        } else {
            p.set_length(r.entries);
            p.set_position(r.entries);
            p.set_message(format!("integrating the journal, at LSN {}", r.lsn));
        }
    })
}

/// `mirrordb restore`.
pub async fn restore_cmd(a: RestoreArgs) -> anyhow::Result<ExitCode> {
    let target = target_of(&a)?;
    let (from, to, jd) = (a.from.clone(), a.to.clone(), a.journal_dir.clone());
    if a.dry_run {
        let t = target.clone();
        let plan =
            tokio::task::spawn_blocking(move || restore::plan(&from, &t, jd.as_deref())).await??;
        if a.json {
            println!("{}", serde_json::to_string(&plan)?);
        } else {
            print!("{}", plan.describe());
            println!("(dry run: nothing was written)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (pb, progress) = restore_progress_bar();
    let mut opts = restore::RestoreOptions::default();
    if let Some(c) = a.cache {
        opts.cache_bytes = c;
    }
    let rep = tokio::task::spawn_blocking(move || {
        restore::restore_into_with(&from, &to, target, jd.as_deref(), opts, &progress)
    })
    .await?;
    pb.finish_and_clear();
    let rep = rep?;
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
    } else {
        print!("{}", rep.plan.describe());
        println!(
            "restored into {}: {} records, LSN {} epoch {}{}; {} snapshot items, {} journal entries integrated ({} entries/s) in {:.1} s",
            rep.data_dir.display(),
            rep.records,
            rep.last_lsn,
            rep.epoch,
            if rep.forked {
                " (a new epoch: history after the target was left out)"
            } else {
                ""
            },
            rep.snapshot_items,
            rep.entries_integrated,
            rep.entries_per_sec,
            rep.duration_ms as f64 / 1000.0
        );
        println!(
            "start it with: mirrordb serve --data-dir {}",
            rep.data_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `mirrordb rollback`.
pub async fn rollback_cmd(a: RollbackArgs) -> anyhow::Result<ExitCode> {
    if a.offline {
        let (Some(from), Some(to)) = (a.from.clone(), a.to.clone()) else {
            bail!("--offline needs --from and --to");
        };
        return restore_cmd(RestoreArgs {
            from,
            to,
            set: None,
            until_lsn: Some(a.to_lsn),
            until_time: None,
            until_name: None,
            journal_dir: a.journal_dir.clone(),
            dry_run: false,
            cache: None,
            json: a.node.json,
        })
        .await;
    }
    let c = client()?;
    let (status, v) = call(
        &c,
        &a.node,
        reqwest::Method::POST,
        "/v1/rollback",
        Some(serde_json::json!({"to_lsn": a.to_lsn})),
    )
    .await?;
    if status != 200 {
        eprintln!("mirrordb rollback: {}", error_text(&v));
        return Ok(ExitCode::FAILURE);
    }
    if a.node.json {
        println!("{v}");
    } else {
        println!(
            "rolled back to LSN {}: {} records restored, {} deleted, {} unchanged; compensating transaction at LSN {}",
            v["to_lsn"], v["keys_restored"], v["keys_deleted"], v["keys_unchanged"], v["lsn"]
        );
        if let Some(b) = v["blobs_not_rolled_back"]
            .as_array()
            .filter(|b| !b.is_empty())
        {
            println!("BLOBs written after the LSN were not rolled back: {b:?}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backups_table_lines_up_and_lists_archives() {
        let v = serde_json::json!({
            "destination": "/b",
            "automatic_paused": false,
            "current": null,
            "sets": [
                {"number": 9, "status": "ok", "lsn": 20004, "time": "2026-12-07T13:17:44.075762Z",
                 "records": 18113, "bytes": 200844},
                {"number": 10, "status": "partial", "lsn": 1234567, "time": "2026-12-07T13:17:45.395342Z",
                 "records": 5, "bytes": 3}
            ],
            "archives": [{"number": 9, "first_lsn": 20005, "last_lsn": 1234567, "bytes": 363715}],
            "history": [{"number": 11, "status": "failed", "started": "2026-12-07T14:00:00Z",
                         "error": "destination is full"}]
        });
        let text = backups_text(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "destination /b");
        // Every row of a table is as wide as its header, and each value
        // ends where its column's title ends.
        assert_eq!(lines[1].len(), lines[2].len(), "{text}");
        assert_eq!(lines[1].len(), lines[3].len(), "{text}");
        assert_eq!(
            lines[1].find("set").map(|i| i + 3),
            lines[3].find("10").map(|i| i + 2)
        );
        assert_eq!(
            lines[1].find("LSN").map(|i| i + 3),
            lines[3].find("1234567").map(|i| i + 7)
        );
        assert!(lines[2].ends_with("196.1 KiB"), "{text}");
        assert!(lines[3].ends_with("3 B"), "{text}");
        assert_eq!(lines[4].len(), lines[5].len(), "{text}");
        assert!(
            lines[5].contains("20005..=1234567") && lines[5].ends_with("355.2 KiB"),
            "{text}"
        );
        assert_eq!(
            lines[6],
            "history: 11 failed 2026-12-07T14:00:00Z destination is full"
        );
        assert_eq!(lines.len(), 7, "{text}");

        let empty = serde_json::json!({"destination": "/b", "automatic_paused": true, "sets": []});
        assert_eq!(
            backups_text(&empty),
            "destination /b (automatic backups PAUSED after failures: run a manual backup)\nno backup sets\n"
        );
    }

    #[test]
    fn the_progress_message_says_when_compression_waits_for_writers() {
        let p = serde_json::json!({"phase": "snapshot", "paced_ms": 0});
        assert_eq!(progress_message(&p), "snapshot");
        let p = serde_json::json!({"phase": "compressing", "paced_ms": 12_345});
        assert_eq!(
            progress_message(&p),
            "compressing (waited 12.3 s for writers: backup.max_rate_while_writing)"
        );
        // A node too old to report it.
        assert_eq!(progress_message(&serde_json::json!({"phase": "x"})), "x");
    }
}
