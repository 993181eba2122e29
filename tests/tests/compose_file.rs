//! The docker-compose cluster stays valid, without needing Docker: the
//! `init` service's exact arguments (as clap parses them, with the tokens
//! the file passes in the environment) write configurations that every
//! node's exact `serve` arguments accept; each node's fixed IP, published
//! port and certificate paths agree with what `cluster init` wrote; the
//! witness file makes n3 a witness; a second `init` is a no-op (what
//! `docker compose up` relies on). Where Docker is available, `docker
//! compose config -q` checks both files as Compose itself reads them.
//!
//! ```text
//! docker-compose.yml ─► services (a small reader for this file's shape)
//!   init.command + MIRRORDB_INIT_TOKENS ─► Cli::parse ─► cluster init (tempdir)
//!   nX.command ─► Cli::parse ─► Config::resolve (overrides as serve applies them)
//!   nX.ipv4_address / ports ─► == member addr / http, 127.0.0.1:1707X
//! ```
//!
//! The drills themselves (scripts/drills/) need Docker and run from
//! `.ci/run` where it is available.

use mirrordb::cli::{Cli, ClusterCommand, Command};
use mirrordb::cluster::init;
use mirrordb::config::{Config, Overrides};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One service of the compose file, as far as these tests need it.
#[derive(Debug, Default, Clone)]
struct Service {
    command: Vec<String>,
    environment: BTreeMap<String, String>,
    ipv4_address: Option<String>,
    ports: Vec<String>,
    volumes: Vec<String>,
    healthcheck: Vec<String>,
}

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join(name)
}

/// `${VAR:-default}` ─► the default (the file's documented values; the
/// tests must not depend on the caller's environment).
fn substitute_defaults(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let tail = &rest[start + 2..];
        let end = tail
            .find('}')
            .expect("unterminated ${…} in the compose file");
        let expr = &tail[..end];
        let default = expr.split_once(":-").map(|(_, d)| d).unwrap_or("");
        out.push_str(default);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
        .to_owned()
}

/// An inline flow list: `["a", "b"]` or `[a:b, c:d]`.
fn flow_list(s: &str) -> Vec<String> {
    let inner = s
        .trim()
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not a flow list: {s}"));
    inner
        .split(',')
        .map(unquote)
        .filter(|x| !x.is_empty())
        .collect()
}

/// Reads the `services:` of this repository's compose files: two-space
/// service names, four-space keys, either flow lists or `- item` blocks.
/// Anchors (`<<: *node`) are resolved by copying the anchored keys.
fn services(text: &str) -> BTreeMap<String, Service> {
    let text = substitute_defaults(text);
    let mut anchors: BTreeMap<String, Service> = BTreeMap::new();
    let mut out: BTreeMap<String, Service> = BTreeMap::new();
    // (top-level section, name of the current entry, its service)
    let mut section = String::new();
    let mut current: Option<(String, Service, Option<String>)> = None;
    let mut key = String::new();
    let flush = |cur: &mut Option<(String, Service, Option<String>)>,
                 out: &mut BTreeMap<String, Service>,
                 anchors: &mut BTreeMap<String, Service>| {
        if let Some((name, svc, anchor)) = cur.take() {
            match anchor {
                Some(a) => {
                    anchors.insert(a, svc);
                }
                None => {
                    out.insert(name, svc);
                }
            }
        }
    };
    for raw in text.lines() {
        let line = raw.split(" #").next().unwrap_or("");
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let l = line.trim();
        if indent == 0 {
            flush(&mut current, &mut out, &mut anchors);
            if let Some((name, rest)) = l.split_once(':')
                && let Some(anchor) = rest.trim().strip_prefix('&')
            {
                // `x-node: &node`: an anchored block of service keys.
                section = "anchor".into();
                current = Some((name.into(), Service::default(), Some(anchor.into())));
            } else {
                section = l.trim_end_matches(':').to_owned();
            }
            continue;
        }
        if section == "services" && indent == 2 {
            flush(&mut current, &mut out, &mut anchors);
            current = Some((l.trim_end_matches(':').to_owned(), Service::default(), None));
            continue;
        }
        let Some((_, svc, _)) = current.as_mut() else {
            continue;
        };
        let base = if section == "anchor" { 2 } else { 4 };
        if indent == base {
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            key = k.trim().to_owned();
            let v = v.trim();
            if key == "<<" {
                let a = v.trim_start_matches('*');
                let from = anchors.get(a).cloned().expect("anchor defined before use");
                *svc = from;
                continue;
            }
            if v.starts_with('[') {
                let list = flow_list(v);
                match key.as_str() {
                    "command" => svc.command = list,
                    "ports" => svc.ports = list,
                    "volumes" => svc.volumes = list,
                    _ => {}
                }
            }
            continue;
        }
        if indent > base {
            if let Some(item) = l.strip_prefix("- ") {
                match key.as_str() {
                    "command" => svc.command.push(unquote(item)),
                    "volumes" => svc.volumes.push(unquote(item)),
                    "ports" => svc.ports.push(unquote(item)),
                    _ => {}
                }
                continue;
            }
            if key == "environment"
                && let Some((k, v)) = l.split_once(':')
            {
                svc.environment.insert(k.trim().to_owned(), unquote(v));
            }
            if key == "networks"
                && let Some((_, ip)) = l.split_once("ipv4_address:")
            {
                svc.ipv4_address = Some(ip.trim().trim_end_matches('}').trim().to_owned());
            }
            if key == "healthcheck"
                && let Some(t) = l.strip_prefix("test:")
            {
                svc.healthcheck = flow_list(t);
            }
        }
    }
    flush(&mut current, &mut out, &mut anchors);
    out
}

fn read(name: &str) -> String {
    std::fs::read_to_string(repo_file(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Runs the `init` service's command (with `--out` moved into `out`) as
/// the image's entrypoint would, and answers what it wrote.
fn run_init(init: &Service, out: &Path) -> init::InitReport {
    let mut args = vec!["mirrordb".to_owned()];
    let mut it = init.command.iter();
    while let Some(a) = it.next() {
        args.push(a.clone());
        if a == "--out" {
            let container_dir = it.next().expect("--out has a value");
            assert_eq!(
                container_dir, "/certs",
                "nodes read their files from /certs"
            );
            args.push(out.display().to_string());
        }
    }
    // The tokens come from the environment in the file; pass them as flags
    // (the same clap argument) so the test does not touch its own env.
    if let Some(t) = init.environment.get("MIRRORDB_INIT_TOKENS") {
        for tok in t.split(',') {
            args.push("--token".into());
            args.push(tok.to_owned());
        }
    }
    let cli = parse(&args);
    let Command::Cluster(ClusterCommand::Init(a)) = cli.command else {
        panic!("the init service does not run `cluster init`: {args:?}");
    };
    init::run(&a).unwrap_or_else(|e| panic!("cluster init {args:?}: {e}"))
}

/// The command line as `mirrordb` parses it.
fn parse(args: &[String]) -> Cli {
    use clap::Parser;
    Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Checks one compose variant end to end; `witness` names the witness.
fn check_variant(svcs: &BTreeMap<String, Service>, witness: Option<&str>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let init_svc = svcs.get("init").expect("an init service");
    let report = run_init(init_svc, &certs);
    assert!(!report.already_initialised);
    assert_eq!(report.tokens, vec!["app (write)", "ops (admin)"]);

    // A second `up` runs init again: it must succeed and write nothing.
    let again = run_init(init_svc, &certs);
    assert!(
        again.already_initialised,
        "--if-missing keeps init idempotent"
    );

    let nodes: Vec<&String> = svcs.keys().filter(|n| n.starts_with('n')).collect();
    assert_eq!(nodes, ["n1", "n2", "n3"]);
    for (i, name) in nodes.iter().enumerate() {
        let svc = &svcs[*name];
        let cli = parse(
            &std::iter::once("mirrordb".to_owned())
                .chain(svc.command.iter().cloned())
                .collect::<Vec<_>>(),
        );
        let Command::Serve(s) = cli.command else {
            panic!("{name} does not run `serve`");
        };
        let file = s.config.expect("--config");
        assert_eq!(file, PathBuf::from(format!("/certs/{name}.toml")));
        let local = certs.join(format!("{name}.toml"));
        let o = Overrides {
            data_dir: s.data_dir.clone(),
            listen: s.listen,
            backup_dir: s.backup_dir.clone(),
        };
        let cfg = Config::resolve(Some(&local), &o)
            .unwrap_or_else(|e| panic!("{name}: serve would refuse its config: {e}"));
        assert!(
            cfg.node.listen.ip().is_unspecified(),
            "{name}: HTTP must listen on every interface (published port, loopback healthcheck)"
        );
        assert_eq!(cfg.node.data_dir, PathBuf::from("/data/db"));
        assert_eq!(cfg.backup.destination, PathBuf::from("/backups"));
        assert!(!cfg.api.tokens.is_empty());
        let c = cfg.cluster.as_ref().expect("[cluster]");
        assert!(c.failover, "the primary is elected automatically");
        assert_eq!(c.certs_dir, certs, "certs_dir is --out, mounted at /certs");
        // The fixed IP of the container is the member's address, in the
        // certificate, and no host name appears (static glibc: no DNS).
        let ip = svc.ipv4_address.as_deref().expect("a fixed ipv4_address");
        for m in &c.members {
            let host = m.addr.rsplit_once(':').map(|(h, _)| h).unwrap_or("");
            assert!(
                host.parse::<std::net::IpAddr>().is_ok(),
                "{}: not an IP",
                m.addr
            );
            assert!(m.http.starts_with("http://172.28.0."), "{}", m.http);
        }
        let me = c.member(name).expect("member");
        assert_eq!(me.addr, format!("{ip}:7101"));
        assert_eq!(me.http, format!("http://{ip}:7070"));
        assert_eq!(
            me.role == mirrordb::cluster::config::MemberRole::Witness,
            witness == Some(name.as_str()),
            "{name}: witness role"
        );
        assert_eq!(svc.ports, vec![format!("127.0.0.1:{}:7070", 17071 + i)]);
        assert!(
            svc.volumes
                .iter()
                .any(|v| v == "/certs:ro" || v.ends_with(":/certs:ro"))
        );
        assert!(svc.volumes.iter().any(|v| v.ends_with(":/data")));
        assert!(svc.volumes.iter().any(|v| v.ends_with(":/backups")));
        assert_eq!(
            svc.healthcheck,
            [
                "CMD",
                "/mirrordb",
                "healthcheck",
                "--url",
                "http://127.0.0.1:7070",
                "--timeout",
                "2s"
            ]
        );
    }
}

#[test]
fn the_compose_cluster_configs_are_accepted_by_serve() {
    let svcs = services(&read("docker-compose.yml"));
    check_variant(&svcs, None);
}

#[test]
fn the_witness_file_makes_n3_a_witness_with_its_own_volumes() {
    let mut svcs = services(&read("docker-compose.yml"));
    for (name, over) in services(&read("docker-compose.witness.yml")) {
        let s = svcs
            .get_mut(&name)
            .expect("the witness file only overrides");
        if !over.command.is_empty() {
            s.command = over.command;
        }
        // Compose merges volumes by their path in the container.
        for v in over.volumes {
            let target = |x: &String| x.split(':').nth(1).map(str::to_owned);
            s.volumes.retain(|o| target(o) != target(&v));
            s.volumes.push(v);
        }
        assert!(
            s.volumes.iter().all(|v| !v.contains(':') || v.split(':').next().is_some_and(|n| n.ends_with("-w"))),
            "{name}: witness volumes must not be the data variant's: {:?}",
            s.volumes
        );
    }
    check_variant(&svcs, Some("n3"));
}

/// `docker compose config -q` (or docker-compose), only where Docker is.
#[test]
fn compose_itself_accepts_both_files_where_docker_is_available() {
    use std::process::Command as Proc;
    let ok = |cmd: &mut Proc| cmd.output().is_ok_and(|o| o.status.success());
    let base: Vec<&str> = if ok(Proc::new("docker").args(["compose", "version"])) {
        vec!["docker", "compose"]
    } else if ok(Proc::new("docker-compose").arg("version")) {
        vec!["docker-compose"]
    } else {
        eprintln!("SKIPPED: no docker compose here; the other compose tests still ran");
        return;
    };
    let root = repo_file("");
    for files in [
        vec!["docker-compose.yml"],
        vec!["docker-compose.yml", "docker-compose.witness.yml"],
    ] {
        let mut cmd = Proc::new(base[0]);
        cmd.args(&base[1..]).current_dir(&root);
        for f in &files {
            cmd.args(["-f", f]);
        }
        let out = cmd.args(["config", "-q"]).output().expect("run compose");
        assert!(
            out.status.success(),
            "compose config {files:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
