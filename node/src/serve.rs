//! Wiring of a running node: configuration → engine → HTTP server, and the
//! orderly way down.
//!
//! ```text
//! Config ──► engine_config ──► open_engine (recovery, blocking thread)
//!                                   │
//!            start: check listen rule, bind TCP (+ the Unix socket),
//!                   serve api::router on both ──► Server
//!                                   │
//! SIGTERM/SIGINT or Server::shutdown: stop accepting, finish requests,
//!                                     remove the socket file,
//!                                     Engine::shutdown (flush, DataFileClose)
//! ```
//!
//! The Unix socket (`api.unix_socket`) serves the same router as TCP;
//! requests there carry [`api::UnixPeer`] instead of a peer address.
//! Tests use the same path: `open_engine` + `start` on `127.0.0.1:0`.

use crate::api::{self, ApiState};
use crate::config::{Config, ConfigError};
use crate::engine::{Engine, EngineConfig, OpenError, WriteError};
use axum::serve::ListenerExt as _;
use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::time::Duration;
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a graceful shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why the node could not start or stop cleanly.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on the Unix socket {}: {source}", path.display())]
    BindUnix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("closing the engine failed: {0}")]
    Close(#[from] WriteError),
    #[error("the engine could not be opened: {0}")]
    Join(String),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::runtime::ClusterError),
}

/// The engine settings a configuration asks for (the real disk).
pub fn engine_config(cfg: &Config) -> EngineConfig {
    let mut e = EngineConfig::new(cfg.node.data_dir.clone());
    e.node_name = cfg.node.name.clone();
    e.flush_interval = cfg.cache.flush_interval.0;
    e.dirty_bytes_max = cfg.cache.dirty_bytes_max.0;
    e.cache_bytes = usize::try_from(cfg.cache.cache_bytes.0).unwrap_or(usize::MAX);
    e.segment_bytes = cfg.journal.segment_bytes.0;
    e.preallocate = cfg.journal.preallocate;
    e.busy_poll = cfg.journal.busy_poll;
    e.auto_restore = cfg.recovery.auto_restore;
    // Automatic restore at start finds the backups here.
    e.backup_dir = Some(cfg.backup.destination.clone());
    e.session_idle = cfg.session.idle_timeout.0;
    e.write_timeout = cfg.api.write_timeout.0;
    if let Some(c) = &cfg.cluster {
        e.role = crate::cluster::runtime::role_at_start(c);
    }
    e
}

/// Opens the engine (runs recovery) on a blocking thread.
pub async fn open_engine(cfg: EngineConfig) -> Result<Engine, ServeError> {
    tokio::task::spawn_blocking(move || {
        // A mirror's reseed a crash interrupted is finished or undone first.
        crate::cluster::sink::recover_swap(&cfg.data_dir).map_err(|source| OpenError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        Engine::open(cfg)
    })
    .await
    .map_err(|e| ServeError::Join(e.to_string()))?
    .map_err(ServeError::from)
}

/// A node serving HTTP.
pub struct Server {
    addr: SocketAddr,
    engine: Engine,
    shared: crate::cluster::SharedEngine,
    cluster: Option<crate::cluster::ClusterNode>,
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Binds `cfg.node.listen` and serves the API for `engine`. Refuses an
/// address beyond loopback when no tokens are configured, whatever the
/// caller checked before.
pub async fn start(cfg: &Config, engine: Engine) -> Result<Server, ServeError> {
    cfg.validate()?;
    let addr = cfg.node.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let unix = match &cfg.api.unix_socket {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    let (shared, cluster) = match &cfg.cluster {
        Some(_) => {
            let c = crate::cluster::ClusterNode::start(cfg, engine.clone()).await?;
            (c.engine().clone(), Some(c))
        }
        None => (crate::cluster::SharedEngine::new(engine.clone()), None),
    };
    let state = ApiState::with_shared(shared.clone(), cfg);
    if let Some(c) = &cluster {
        state.set_cluster(c.clone());
    }
    let mut app = api::router(state.clone());
    match &cluster {
        Some(c) => app = crate::cluster::http::wrap(c.clone(), app, state),
        None => app = app.merge(api::standalone_probes(state)),
    }
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let task = tokio::spawn(async move {
        // Answers are written whole and wait for nothing: no Nagle delay
        // (a response or a streamed body split over segments would
        // otherwise wait for the client's delayed ACK).
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set on a connection");
            }
        });
        let tcp = {
            let signal = signal.clone();
            axum::serve(
                listener,
                app.clone()
                    .into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { signal.cancelled().await })
            .into_future()
        };
        let Some((unix, path)) = unix else {
            return tcp.await;
        };
        let on_socket = axum::serve(
            unix,
            app.layer(axum::Extension(api::UnixPeer))
                .into_make_service(),
        )
        .with_graceful_shutdown(async move { signal.cancelled().await })
        .into_future();
        // Either failing ends both (the node stops on it); both end
        // together at a graceful shutdown.
        let served = tokio::try_join!(tcp, on_socket).map(|_| ());
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove the API's Unix socket");
        }
        served
    });
    tracing::info!(addr = %local, "HTTP API listening");
    if let Some(p) = &cfg.api.unix_socket {
        tracing::info!(path = %p.display(), "HTTP API listening on a Unix socket");
    }
    Ok(Server {
        addr: local,
        engine,
        shared,
        cluster,
        stop,
        task,
    })
}

/// Binds the API's Unix socket at `path`. A socket file left by a node
/// that is gone is replaced; one a live server answers on, or a path that
/// is not a socket, is refused (nothing is deleted but a dead socket).
fn bind_unix(
    path: &std::path::Path,
) -> Result<(tokio::net::UnixListener, std::path::PathBuf), ServeError> {
    use std::os::unix::fs::FileTypeExt as _;
    let fail = |source| ServeError::BindUnix {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(fail(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "a running server answers on it",
                )));
            }
            std::fs::remove_file(path).map_err(fail)?;
        }
        Ok(_) => {
            return Err(fail(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(fail)?;
    Ok((listener, path.to_owned()))
}

impl Server {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The engine this server started with (a mirror's reseed may replace
    /// it: see [`Server::current_engine`]).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine this server runs now.
    pub fn current_engine(&self) -> Engine {
        self.shared.get()
    }

    /// The cluster side, when `[cluster]` is configured.
    pub fn cluster(&self) -> Option<&crate::cluster::ClusterNode> {
        self.cluster.as_ref()
    }

    /// Stops accepting connections, lets in-flight requests finish (up to
    /// [`SHUTDOWN_GRACE`]), then closes the engine cleanly.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.stop.cancel();
        if let Some(c) = &self.cluster {
            c.stop().await;
        }
        let Server { shared, task, .. } = self;
        let engine = shared.get();
        let abort = task.abort_handle();
        match tokio::time::timeout(SHUTDOWN_GRACE, task).await {
            Ok(Ok(Err(e))) => tracing::warn!("HTTP server ended with an error: {e}"),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    "requests still running after {}s; closing anyway",
                    SHUTDOWN_GRACE.as_secs()
                );
                abort.abort();
            }
        }
        engine.shutdown().await?;
        Ok(())
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully. An HTTP
    /// server failure also ends it (after closing the engine).
    pub async fn run_until_signal(mut self) -> Result<(), ServeError> {
        let failed = tokio::select! {
            _ = shutdown_signal() => None,
            r = &mut self.task => Some(match r {
                Ok(Ok(())) => std::io::Error::other("the HTTP server stopped"),
                Ok(Err(e)) => e,
                Err(e) => std::io::Error::other(e.to_string()),
            }),
        };
        match failed {
            None => {
                tracing::info!("signal received: shutting down");
                self.shutdown().await
            }
            Some(e) => {
                if let Some(c) = &self.cluster {
                    c.stop().await;
                }
                let _ = self.shared.get().shutdown().await;
                Err(ServeError::Http(e))
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, ConfigDuration};

    #[test]
    fn engine_config_carries_every_setting() {
        let mut c = Config::default();
        c.node.name = "n9".into();
        c.node.data_dir = "/d".into();
        c.cache.flush_interval = ConfigDuration(Duration::from_millis(250));
        c.cache.dirty_bytes_max = ByteSize(3 << 20);
        c.cache.cache_bytes = ByteSize(5 << 20);
        c.journal.segment_bytes = ByteSize(7 << 20);
        c.journal.preallocate = false;
        c.journal.busy_poll = false;
        c.recovery.auto_restore = true;
        c.session.idle_timeout = ConfigDuration(Duration::from_secs(9));
        c.api.write_timeout = ConfigDuration(Duration::from_millis(1500));
        let e = engine_config(&c);
        assert_eq!(e.data_dir, std::path::PathBuf::from("/d"));
        assert_eq!(e.node_name, "n9");
        assert_eq!(e.flush_interval, Duration::from_millis(250));
        assert_eq!(e.dirty_bytes_max, 3 << 20);
        assert_eq!(e.cache_bytes, 5 << 20);
        assert_eq!(e.segment_bytes, 7 << 20);
        assert!(!e.preallocate);
        assert!(!e.busy_poll);
        assert!(e.auto_restore);
        assert_eq!(e.session_idle, Duration::from_secs(9));
        assert_eq!(e.write_timeout, Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn start_refuses_an_unsafe_listen_address_before_binding() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.node.data_dir = dir.path().to_owned();
        c.node.listen = "0.0.0.0:0".parse().unwrap();
        let engine = open_engine(engine_config(&c)).await.unwrap();
        let err = start(&c, engine.clone()).await.unwrap_err();
        assert!(matches!(err, ServeError::Config(_)), "{err}");
        engine.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_stops_http_and_closes_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.node.data_dir = dir.path().to_owned();
        c.node.listen = "127.0.0.1:0".parse().unwrap();
        let engine = open_engine(engine_config(&c)).await.unwrap();
        let server = start(&c, engine).await.unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        server.shutdown().await.unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        // The data directory is free again: the engine closed.
        let again = open_engine(engine_config(&c)).await.unwrap();
        assert_eq!(
            again.recovery().action,
            crate::engine::RecoveryAction::Opened
        );
        again.shutdown().await.unwrap();
    }

    /// The socket path: a dead socket is replaced; a live one, a regular
    /// file or a directory is refused and left alone.
    #[tokio::test]
    async fn the_unix_socket_replaces_only_a_dead_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");

        let (live, _) = bind_unix(&path).unwrap();
        let err = bind_unix(&path).unwrap_err().to_string();
        assert!(err.contains("a running server answers on it"), "{err}");
        drop(live);
        // The listener is gone, its file is not: replaced.
        assert!(path.exists());
        let (again, _) = bind_unix(&path).unwrap();
        drop(again);

        let file = dir.path().join("notes.txt");
        std::fs::write(&file, b"keep me").unwrap();
        let err = bind_unix(&file).unwrap_err().to_string();
        assert!(err.contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        assert!(bind_unix(dir.path()).is_err());
        assert!(dir.path().is_dir());
    }

    #[test]
    fn the_unix_socket_path_must_fit() {
        let mut c = Config::default();
        c.api.unix_socket = Some("/run/mirrordb/api.sock".into());
        c.validate().unwrap();
        c.api.unix_socket = Some("x".repeat(crate::config::MAX_UNIX_SOCKET_PATH + 1).into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("api.unix_socket"), "{err}");
        c.api.unix_socket = Some("".into());
        assert!(c.validate().is_err());
    }
}
