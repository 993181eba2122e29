//! Shared fixtures for mirrordb's integration tests: starting nodes in
//! process and as child processes, HTTP helpers, and seeded randomness that
//! prints its seed.
//!
//! ```text
//! TestNode::start()        engine in a tempdir + HTTP server on 127.0.0.1:0, same process
//! ChildNode::spawn(dir)    the `mirrordb` binary as a child process (kill -9 / SIGTERM / restart)
//! mirrordb_bin()           where that binary is, building it first if needed
//! seed()                   MIRRORDB_SEED or a random seed, printed with the replay command
//! cluster::ChildCluster    `cluster init` + N child members, optionally behind relay::Relay
//! ```
//!
//! **Finding the binary.** Cargo's `CARGO_BIN_EXE_<name>` exists only for
//! the package that defines the binary, so `mirrordb_bin` looks for it next
//! to the running test executable: `<target>/<profile>/deps/<test>` →
//! `<target>/<profile>/mirrordb`, where `<target>` is therefore also right
//! when `CARGO_TARGET_DIR` is set. Once per test process it runs
//! `cargo build -p mirrordb --bin mirrordb` into that same target directory
//! (a no-op when fresh), so a test never runs a stale binary. Set
//! `MIRRORDB_BIN=/path/to/mirrordb` to use a given binary and skip the build.

pub mod cluster;
pub mod relay;

use anyhow::{Context, bail};
use mirrordb::config::{Config, Role, TokenConfig};
use mirrordb::engine::{Engine, EngineConfig};
use mirrordb::journal::disk::Disk;
use mirrordb::serve::{self, Server};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a child node may take to print its listen address.
pub const CHILD_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child node may take to exit after SIGTERM.
pub const CHILD_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Tokens of [`NodeOptions::with_role_tokens`]: one per role.
pub const READ_TOKEN: &str = "read-token-0123456789";
pub const WRITE_TOKEN: &str = "write-token-0123456789";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// Logs a test phase, so a failing test's output says where it was.
pub fn phase(msg: &str) {
    eprintln!("--- {msg}");
}

/// The seed of a test's randomness: `MIRRORDB_SEED` if set, else random.
/// Printed with the way to replay it.
pub fn seed() -> u64 {
    let seed = std::env::var("MIRRORDB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed}: replay with MIRRORDB_SEED={seed}");
    seed
}

/// A change to a test node's configuration.
pub type ConfigHook = Arc<dyn Fn(&mut Config) + Send + Sync>;

/// Settings of an in-process test node.
#[derive(Clone, Default)]
pub struct NodeOptions {
    /// API tokens; empty = no authentication.
    pub tokens: Vec<TokenConfig>,
    /// `api.max_body_bytes`, if not the default.
    pub max_body_bytes: Option<u64>,
    /// `api.body_idle_timeout`, if not the default.
    pub body_idle_timeout: Option<Duration>,
    /// `api.write_timeout`, if not the default.
    pub write_timeout: Option<Duration>,
    /// The disk the journal writes through (fault injection).
    pub disk: Option<Arc<dyn Disk>>,
    /// Use this data directory instead of a new temporary one.
    pub data_dir: Option<PathBuf>,
    /// Last word on the configuration (sections other tests need, such as
    /// `[backup]` or `[cluster]`), applied after the fields above.
    pub configure: Option<ConfigHook>,
}

impl NodeOptions {
    /// Three tokens, `reader`, `writer` and `admin`, one per role.
    pub fn with_role_tokens(mut self) -> Self {
        let t = |name: &str, token: &str, role| TokenConfig {
            name: name.into(),
            token: token.into(),
            role,
        };
        self.tokens = vec![
            t("reader", READ_TOKEN, Role::Read),
            t("writer", WRITE_TOKEN, Role::Write),
            t("admin", ADMIN_TOKEN, Role::Admin),
        ];
        self
    }
}

/// An engine and its HTTP server in this process, on `127.0.0.1:<free port>`.
pub struct TestNode {
    /// Keeps a temporary data directory alive (None with `data_dir` given).
    pub tmp: Option<TempDir>,
    pub data_dir: PathBuf,
    pub config: Config,
    /// The address the server bound.
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    server: Option<Server>,
}

impl TestNode {
    /// A node with default settings and no tokens.
    pub async fn start() -> TestNode {
        TestNode::start_with(NodeOptions::default()).await
    }

    /// A node with `opts`. Panics (it is a fixture) if it cannot start.
    pub async fn start_with(opts: NodeOptions) -> TestNode {
        let (tmp, data_dir) = match opts.data_dir.clone() {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("temporary directory");
                let d = t.path().to_owned();
                (Some(t), d)
            }
        };
        let mut config = Config::default();
        config.node.name = "test".into();
        config.node.data_dir = data_dir.clone();
        config.node.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.api.tokens = opts.tokens.clone();
        if let Some(m) = opts.max_body_bytes {
            config.api.max_body_bytes.0 = m;
        }
        if let Some(b) = opts.body_idle_timeout {
            config.api.body_idle_timeout.0 = b;
        }
        if let Some(w) = opts.write_timeout {
            config.api.write_timeout.0 = w;
        }
        if let Some(f) = &opts.configure {
            f(&mut config);
        }
        config.validate().expect("test config is valid");
        let mut ecfg: EngineConfig = serve::engine_config(&config);
        if let Some(d) = opts.disk.clone() {
            ecfg.disk = d;
        }
        let engine = serve::open_engine(ecfg).await.expect("engine opens");
        let server = serve::start(&config, engine).await.expect("server starts");
        let base = server.base_url();
        TestNode {
            tmp,
            data_dir,
            config,
            addr: server.local_addr(),
            base,
            client: reqwest::Client::new(),
            server: Some(server),
        }
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The engine behind the server.
    pub fn engine(&self) -> &Engine {
        self.server.as_ref().expect("node is running").engine()
    }

    /// Graceful stop (HTTP first, then the engine); gives back the
    /// temporary directory so the data can be reopened.
    pub async fn stop(mut self) -> Option<TempDir> {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("clean shutdown");
        }
        self.tmp.take()
    }
}

/// The `mirrordb` binary (see the module docs), built once per process.
pub fn mirrordb_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_and_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn locate_and_build() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MIRRORDB_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("MIRRORDB_BIN={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("current test executable")?;
    // <target>/<profile>/deps/<test-exe>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable is not in <target>/<profile>/deps")?;
    let target_dir = profile_dir
        .parent()
        .context("no target directory above the profile directory")?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", "mirrordb", "--bin", "mirrordb"])
        .env("CARGO_TARGET_DIR", target_dir);
    if release {
        cmd.arg("--release");
    }
    eprintln!(
        "building the mirrordb binary into {} (set MIRRORDB_BIN to skip)",
        target_dir.display()
    );
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p mirrordb --bin mirrordb failed: {status}");
    }
    let bin = profile_dir.join(format!("mirrordb{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!("built, but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// The `mirrordb` binary running `serve` as a child process.
pub struct ChildNode {
    child: Child,
    pub addr: SocketAddr,
    pub base: String,
    pub data_dir: PathBuf,
    /// Lines the child printed on stdout (recovery report, …), as JSON.
    pub stdout: Arc<Mutex<Vec<String>>>,
}

/// How a child's log lines are labelled: the data directory's name and its
/// parent's (`.tmpAbC123/data-n2`), which tells apart the nodes of two
/// cluster tests running at once.
fn log_label(data_dir: &Path) -> String {
    let name = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
    };
    match (name(data_dir.parent()), name(Some(data_dir))) {
        (Some(parent), Some(dir)) => format!("{parent}/{dir}"),
        (None, Some(dir)) => dir,
        _ => "node".into(),
    }
}

/// Copies a child's log lines to this process's stderr, each prefixed
/// with `[label]` ([`log_label`]): the
/// children of a cluster test, and of two tests running at once, write to
/// the same terminal. Written straight to stderr, not through the test
/// harness's capture, so the lines appear as they happen.
fn forward_log(from: impl std::io::Read, label: &str) {
    use std::io::Write;
    for line in BufReader::new(from).lines().map_while(Result::ok) {
        let _ = writeln!(std::io::stderr().lock(), "[{label}] {line}");
    }
}

impl ChildNode {
    /// `mirrordb serve --data-dir <data_dir> --listen 127.0.0.1:0 --json`;
    /// waits until it prints its address. Logs go to this process's stderr
    /// (`RUST_LOG`, default `warn`), each line prefixed with a label naming
    /// the node (see `forward_log`).
    pub fn spawn(data_dir: &Path) -> anyhow::Result<ChildNode> {
        ChildNode::spawn_with(data_dir, &[])
    }

    /// Like [`ChildNode::spawn`], with more arguments after `serve` (for
    /// example `["--config", path]`).
    pub fn spawn_with(data_dir: &Path, extra: &[&str]) -> anyhow::Result<ChildNode> {
        let dir = data_dir
            .to_str()
            .context("data directory path is not UTF-8")?;
        let mut args = vec!["--data-dir", dir, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        ChildNode::spawn_serve(data_dir, &args)
    }

    /// `mirrordb serve --json <args>` and nothing else: for a node whose
    /// config file sets its data directory and listen address (a cluster
    /// member, whose peers know its address). `data_dir` is only recorded.
    pub fn spawn_serve(data_dir: &Path, args: &[&str]) -> anyhow::Result<ChildNode> {
        let bin = mirrordb_bin()?;
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--json")
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let out = child.stdout.take().context("child stdout")?;
        let err = child.stderr.take().context("child stderr")?;
        let label = log_label(data_dir);
        std::thread::spawn(move || forward_log(err, &label));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        let seen = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let addr = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .filter(|v| v["event"] == "listening")
                    .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()));
                if let Some(a) = addr {
                    let _ = tx.send(a);
                }
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let deadline = Instant::now() + CHILD_START_TIMEOUT;
        let addr = loop {
            if let Ok(a) = rx.recv_timeout(Duration::from_millis(50)) {
                break a;
            }
            if let Some(status) = child.try_wait()? {
                bail!("mirrordb serve exited before listening: {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("mirrordb serve did not listen within {CHILD_START_TIMEOUT:?}");
            }
        };
        Ok(ChildNode {
            child,
            addr,
            base: format!("http://{addr}"),
            data_dir: data_dir.to_owned(),
            stdout: lines,
        })
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The recovery report the child printed at start.
    pub fn recovery_report(&self) -> Option<serde_json::Value> {
        self.stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "recovery")
            .map(|v| v["report"].clone())
    }

    /// SIGKILL, as a crash: no flush, no clean close.
    pub fn kill(mut self) -> anyhow::Result<ExitStatus> {
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL after the timeout).
    pub fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
        let deadline = Instant::now() + CHILD_STOP_TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("mirrordb did not exit within {CHILD_STOP_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the `mirrordb` binary with `args` to completion: (exit status,
/// stdout, stderr).
pub fn run_mirrordb(args: &[&str]) -> anyhow::Result<(ExitStatus, String, String)> {
    let out = Command::new(mirrordb_bin()?)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The record count of table `table` in a node's `GET /v1/tables` (at
/// `url`), or `None` when it is not listed; with the listing itself, for an
/// assertion's message.
pub async fn table_records(
    client: &reqwest::Client,
    url: &str,
    table: &str,
) -> anyhow::Result<(Option<u64>, serde_json::Value)> {
    let tables: serde_json::Value = client.get(url).send().await?.json().await?;
    let count = tables
        .as_array()
        .or_else(|| tables["tables"].as_array())
        .and_then(|a| a.iter().find(|t| t["name"] == table))
        .map(|t| t["records"].as_u64().unwrap_or(0));
    Ok((count, tables))
}

/// Sends raw bytes over a new TCP connection and reads the answer until the
/// server closes it, a complete JSON answer has arrived, or `timeout`
/// passes; for requests a well-behaved HTTP client will not send (a
/// `Content-Length` that lies, hand-made chunked bodies, broken headers).
pub async fn raw_http(
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut buf = Vec::new();
    let exchange = async {
        // The server may answer (and stop reading) before the whole request
        // is written: a failed write is not the test's failure.
        let _ = s.write_all(request).await;
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(timeout, exchange).await;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
