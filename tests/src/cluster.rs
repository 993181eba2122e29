//! A failover cluster of child `mirrordb serve` processes, made by
//! `mirrordb cluster init` as an operator would, optionally with every QUIC
//! link running through a [`Relay`] that can cut it; and a background
//! [`Writers`] load that records every acknowledged write.
//!
//! ```text
//! ChildCluster::start(opts)   cluster init ─► configs (+ cluster.listen = real port
//!                             behind the relay) ─► N × mirrordb serve --config
//! wait_primary / status       GET /v1/cluster on each running node
//! Writers::start              K tasks: PUT unique keys to whoever says it is
//!                             primary; every 2xx is recorded with node and time
//! missing_on(i, acks)         scans node i: acknowledged writes absent or changed
//! ```

use crate::relay::Relay;
use crate::{ChildNode, phase};
use anyhow::{Context, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::task::JoinHandle;

/// The table the writers write.
pub const TABLE: &str = "t";

/// How a test cluster is made.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of members (`n1`, `n2`, …).
    pub nodes: usize,
    /// `--commit-policy` of `cluster init`.
    pub commit_policy: String,
    /// `--on-unavailable`.
    pub on_unavailable: String,
    /// Members (0-based) that are witnesses.
    pub witnesses: Vec<usize>,
    /// Route QUIC through a [`Relay`] so links can be cut.
    pub relay: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            commit_policy: "quorum:1".into(),
            on_unavailable: "degrade".into(),
            witnesses: Vec::new(),
            relay: false,
        }
    }
}

/// The outcome of one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Put {
    /// Acknowledged at this LSN.
    Acked(u64),
    /// `not_primary` (307 or 503).
    NotPrimary,
    /// Anything else: another status, or no answer.
    Failed(String),
}

/// Child processes of a cluster made by `mirrordb cluster init`.
pub struct ChildCluster {
    pub dir: TempDir,
    pub ids: Vec<String>,
    pub configs: Vec<PathBuf>,
    /// HTTP base URLs (`http://127.0.0.1:port`).
    pub http: Vec<String>,
    pub relay: Option<Relay>,
    nodes: Vec<Option<ChildNode>>,
    client: reqwest::Client,
}

impl Drop for ChildCluster {
    /// Kills the members before `dir` is removed: a member outliving its
    /// data directory logs errors about files that are gone (a journal
    /// "no longer in the live journal"), which read like a bug of the node
    /// in the output of a test that failed for another reason.
    fn drop(&mut self) {
        for n in self.nodes.iter_mut().filter_map(Option::take) {
            let _ = n.kill();
        }
    }
}

/// A free UDP port on loopback (for a member's QUIC endpoint).
pub fn free_udp() -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// A free TCP port on loopback (for a member's HTTP API).
pub fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A client that does not follow redirects (a 307 is `not_primary`).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

impl ChildCluster {
    /// Makes the certificates and configs and starts every member.
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<ChildCluster> {
        let dir = tempfile::tempdir()?;
        let ids: Vec<String> = (1..=opts.nodes).map(|i| format!("n{i}")).collect();
        let reals = (0..opts.nodes)
            .map(|_| free_udp())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let relay = if opts.relay {
            Some(Relay::start(reals.clone()).await?)
        } else {
            None
        };
        let dialed = relay.as_ref().map_or(reals.clone(), |r| r.fronts.clone());
        let http = (0..opts.nodes)
            .map(|_| free_tcp())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let list = |addrs: &[SocketAddr]| {
            ids.iter()
                .zip(addrs)
                .map(|(id, a)| format!("{id}={a}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let witness = opts
            .witnesses
            .iter()
            .map(|&i| ids[i].clone())
            .collect::<Vec<_>>()
            .join(",");
        let certs = dir.path().join("certs");
        let mut args = vec![
            "cluster".to_owned(),
            "init".into(),
            "--nodes".into(),
            list(&dialed),
            "--http".into(),
            list(&http),
            "--commit-policy".into(),
            opts.commit_policy.clone(),
            "--on-unavailable".into(),
            opts.on_unavailable.clone(),
            "--data-root".into(),
            dir.path().display().to_string(),
            "--out".into(),
            certs.display().to_string(),
        ];
        if !witness.is_empty() {
            args.extend(["--witness".into(), witness]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, out, err) = crate::run_mirrordb(&args)?;
        if !status.success() {
            bail!("cluster init failed: {out}{err}");
        }
        let mut configs = Vec::new();
        for (id, real) in ids.iter().zip(&reals) {
            let path = certs.join(format!("{id}.toml"));
            if relay.is_some() {
                // The member binds its real port; the others dial the relay.
                let text = std::fs::read_to_string(&path)?;
                let key = format!("node_id = \"{id}\"\n");
                let text = text.replacen(&key, &format!("{key}listen = \"{real}\"\n"), 1);
                std::fs::write(&path, text)?;
            }
            configs.push(path);
        }
        let mut c = ChildCluster {
            http: http.iter().map(|a| format!("http://{a}")).collect(),
            nodes: ids.iter().map(|_| None).collect(),
            dir,
            ids,
            configs,
            relay,
            client: http_client(),
        };
        for i in 0..opts.nodes {
            c.spawn(i)?;
        }
        Ok(c)
    }

    /// Takes in a member made later by `mirrordb cluster add` (its config
    /// in the same certificate directory); returns its index.
    pub fn adopt(&mut self, id: &str, http: SocketAddr) -> usize {
        let certs = self.configs[0]
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        self.ids.push(id.to_owned());
        self.configs.push(certs.join(format!("{id}.toml")));
        self.http.push(format!("http://{http}"));
        self.nodes.push(None);
        self.ids.len() - 1
    }

    /// The directory `cluster init` wrote.
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// The relay (panics when the cluster was made without one).
    pub fn relay(&self) -> &Relay {
        self.relay
            .as_ref()
            .expect("cluster started with relay: true")
    }

    /// Starts member `i` (again).
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let cfg = self.configs[i].display().to_string();
        let node = ChildNode::spawn_serve(&self.data_dir(i), &["--config", &cfg])
            .with_context(|| format!("starting {}", self.ids[i]))?;
        self.nodes[i] = Some(node);
        Ok(())
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            let _ = n.kill();
        }
    }

    /// SIGTERMs member `i` and waits for its exit.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(n) = self.nodes[i].take() {
            n.terminate()?;
        }
        Ok(())
    }

    /// Whether member `i` runs.
    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].is_some()
    }

    /// Member `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("data-{}", self.ids[i]))
    }

    /// Index of a member id.
    pub fn index(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|x| x == id)
    }

    /// `GET /v1/cluster` on member `i`, if it answers.
    pub async fn status(&self, i: usize) -> Option<Value> {
        if !self.running(i) {
            return None;
        }
        let r = self
            .client
            .get(format!("{}/v1/cluster", self.http[i]))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// Waits until a running member other than `not` says it is primary at
    /// an epoch ≥ `min_epoch`: (index, epoch).
    pub async fn wait_primary(
        &self,
        not: Option<usize>,
        min_epoch: u64,
        timeout: Duration,
    ) -> anyhow::Result<(usize, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            for i in 0..self.ids.len() {
                if Some(i) == not {
                    continue;
                }
                if let Some(s) = self.status(i).await {
                    let epoch = s["epoch"].as_u64().unwrap_or(0);
                    if s["role"] == "primary" && epoch >= min_epoch {
                        return Ok((i, epoch));
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no primary (other than {not:?}, epoch ≥ {min_epoch}) within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until member `i` is a mirror that applied `lsn`.
    pub async fn wait_mirror_at(
        &self,
        i: usize,
        lsn: u64,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            if let Some(s) = self.status(i).await {
                if s["role"] == "mirror" && s["applied_lsn"].as_u64().unwrap_or(0) >= lsn {
                    return Ok(s);
                }
                last = s;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not a mirror at LSN {lsn} within {timeout:?}; last status {last}",
                    self.ids[i]
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One write to member `i`.
    pub async fn put(&self, i: usize, key: &str, value: &Value) -> Put {
        put(&self.client, &self.http[i], key, value).await
    }

    /// Every record of [`TABLE`] on member `i`: key → value.
    pub async fn scan(&self, i: usize) -> anyhow::Result<BTreeMap<String, Value>> {
        let mut out = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            // Keys are `w<digit>-<digits>`: nothing to escape.
            let mut url = format!("{}/v1/tables/{TABLE}/records?limit=10000", self.http[i]);
            if let Some(a) = &after {
                url.push_str(&format!("&start_after={a}"));
            }
            let r = self.client.get(url).send().await?;
            if r.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(out);
            }
            if !r.status().is_success() {
                bail!("scan on {} answered {}", self.ids[i], r.status());
            }
            let page: Value = r.json().await?;
            for rec in page["records"].as_array().into_iter().flatten() {
                if let Some(k) = rec["key"].as_str() {
                    out.insert(k.to_owned(), rec["value"].clone());
                }
            }
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_owned()),
                None => return Ok(out),
            }
        }
    }

    /// Acknowledged writes that member `i` lacks or holds with another
    /// value.
    pub async fn missing_on(&self, i: usize, acks: &[Ack]) -> anyhow::Result<Vec<Ack>> {
        let have = self.scan(i).await?;
        Ok(acks
            .iter()
            .filter(|a| have.get(&a.key) != Some(&a.value))
            .cloned()
            .collect())
    }

    /// Waits until member `i` holds every write of `acks` (by content, not
    /// position: a rejoined node's own old LSNs may be higher than the new
    /// epoch's).
    pub async fn wait_holds(
        &self,
        i: usize,
        acks: &[Ack],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let lacking = self.missing_on(i, acks).await.unwrap_or_default();
            if lacking.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} lacks {} writes, e.g. {:?}",
                    self.ids[i],
                    lacking.len(),
                    lacking.first()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The member ids of `GET /v1/cluster`'s `failover.raft_leader`, asked
    /// of every running member until one knows.
    pub async fn raft_leader(&self) -> Option<usize> {
        for i in 0..self.ids.len() {
            if let Some(s) = self.status(i).await
                && let Some(l) = s["failover"]["raft_leader"].as_str()
            {
                return self.index(l);
            }
        }
        None
    }
}

async fn put(client: &reqwest::Client, base: &str, key: &str, value: &Value) -> Put {
    let r = client
        .put(format!("{base}/v1/tables/{TABLE}/records/{key}"))
        .json(value)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    let r = match r {
        Ok(r) => r,
        Err(e) => return Put::Failed(e.to_string()),
    };
    let status = r.status();
    if status.is_success() {
        let v: Value = r.json().await.unwrap_or(Value::Null);
        return match v["lsn"].as_u64() {
            Some(lsn) => Put::Acked(lsn),
            None => Put::Failed(format!("2xx without an lsn: {v}")),
        };
    }
    if status == reqwest::StatusCode::TEMPORARY_REDIRECT {
        return Put::NotPrimary;
    }
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if v["error"]["code"] == "not_primary" || v["code"] == "not_primary" {
        Put::NotPrimary
    } else {
        Put::Failed(format!("{status}: {v}"))
    }
}

/// One acknowledged write.
#[derive(Clone, Debug)]
pub struct Ack {
    pub key: String,
    pub value: Value,
    /// The member that acknowledged it.
    pub node: usize,
    pub lsn: u64,
    /// When the acknowledgement arrived.
    pub at: Instant,
}

/// Background writers: each writes unique keys to the member that last said
/// it is primary, recording every acknowledgement.
pub struct Writers {
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Writers {
    /// Starts `n` writers against `http` (the members' base URLs).
    pub fn start(http: &[String], n: usize) -> Writers {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..n)
            .map(|w| {
                let http = http.to_vec();
                let acks = acks.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let client = http_client();
                    let mut target = 0usize;
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Every attempt uses a new key: an unacknowledged
                        // write may or may not have landed.
                        seq += 1;
                        let key = format!("w{w}-{seq}");
                        let value = serde_json::json!({"w": w, "seq": seq});
                        match put(&client, &http[target], &key, &value).await {
                            Put::Acked(lsn) => {
                                acks.lock().unwrap_or_else(|p| p.into_inner()).push(Ack {
                                    key,
                                    value,
                                    node: target,
                                    lsn,
                                    at: Instant::now(),
                                });
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Put::NotPrimary | Put::Failed(_) => {
                                target = (target + 1) % http.len();
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Writers { acks, stop, tasks }
    }

    /// The acknowledgements so far.
    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `n` more writes than now have been acknowledged, by a
    /// member other than `not`.
    pub async fn wait_more(
        &self,
        n: usize,
        not: Option<usize>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let count = |acks: &[Ack]| acks.iter().filter(|a| Some(a.node) != not).count();
        let start = count(&self.acks());
        let deadline = Instant::now() + timeout;
        while count(&self.acks()) < start + n {
            if Instant::now() > deadline {
                bail!("fewer than {n} writes acknowledged within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops the writers and returns every acknowledgement.
    pub async fn stop(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        phase(&format!(
            "writers stopped: {} acknowledged writes",
            acks.len()
        ));
        acks
    }
}

/// Files under `dir` (recursively), for assertions on `rollback/`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}
