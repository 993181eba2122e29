//! A lean HTTP/1.1 client for the node's own tools: one keep-alive
//! connection per caller, over TCP or the node's Unix socket (`--url
//! unix:PATH`), driven by hyper's connection API inside the caller's task.
//! `mirrordb bench` runs one per load client; `mirrordb healthcheck` one.
//!
//! A load generator shares the machine with the node it measures, so every
//! microsecond of CPU it spends per request is taken from the node. A
//! general-purpose client (reqwest) parses the URL, consults its pool and
//! hands each request to a separate connection task; this one keeps the
//! parsed target, precomputed headers and its connection in the client task
//! and polls the connection only while a request is in flight. `pgbench`, the
//! PostgreSQL peer in `bench/run.sh`, is equally lean, so the comparison stays
//! fair. A connection the server closed while it sat idle is replaced before
//! it is used; one that breaks during a request fails that request (the
//! bench counts it as an error) and is reopened for the next.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::task::Poll;
use std::time::Duration;
use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

/// What a client connects to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Addr {
    /// `host:port`.
    Tcp(String),
    /// The node's `api.unix_socket`.
    Unix(PathBuf),
}

/// Where a bench client sends its requests: parsed once, shared by value.
#[derive(Clone, Debug)]
pub struct HttpTarget {
    addr: Addr,
    /// The `Host` header.
    host: HeaderValue,
    /// Path prefix of the base URL, without a trailing slash ("" for none).
    prefix: String,
    /// `Authorization: Bearer …`, when a token was given.
    auth: Option<HeaderValue>,
}

impl HttpTarget {
    /// Parses a base URL such as `http://127.0.0.1:7070`, or `unix:PATH`
    /// for a node's `api.unix_socket`. Only plain `http://` is accepted
    /// over TCP: the node's API does not serve TLS.
    pub fn parse(base: &str, token: Option<&str>) -> Result<HttpTarget, String> {
        let auth = match token {
            Some(t) => Some(
                HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| "--token holds characters a header cannot carry".to_owned())?,
            ),
            None => None,
        };
        if let Some(path) = base.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("--url {base:?} names no socket path"));
            }
            return Ok(HttpTarget {
                addr: Addr::Unix(PathBuf::from(path)),
                host: HeaderValue::from_static("localhost"),
                prefix: String::new(),
                auth,
            });
        }
        let uri: Uri = base
            .parse()
            .map_err(|e| format!("--url {base:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "--url {base:?}: scheme {other:?} is not supported; the node serves plain http://"
                ));
            }
            None => return Err(format!("--url {base:?} needs a scheme, e.g. http://{base}")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("--url {base:?} names no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host();
        let addr = Addr::Tcp(format!("{host}:{port}"));
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("--url {base:?}: bad host: {e}"))?;
        Ok(HttpTarget {
            addr,
            host,
            prefix: uri.path().trim_end_matches('/').to_owned(),
            auth,
        })
    }

    /// The full path of `path` (which starts with `/`) under the base URL.
    pub fn path(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }
}

/// A TCP or a Unix-domain stream.
type Stream = Either<TcpStream, UnixStream>;

/// One open HTTP/1.1 connection.
struct Link {
    sender: SendRequest<Full<Bytes>>,
    conn: Connection<TokioIo<Stream>, Full<Bytes>>,
}

/// One client's connection to the node, reopened after a failure.
pub struct HttpConn {
    target: HttpTarget,
    timeout: Duration,
    link: Option<Link>,
}

impl HttpConn {
    /// A client of `target`; connects on its first request.
    pub fn new(target: HttpTarget, timeout: Duration) -> HttpConn {
        HttpConn {
            target,
            timeout,
            link: None,
        }
    }

    /// The target this client talks to.
    pub fn target(&self) -> &HttpTarget {
        &self.target
    }

    /// Sends one request (`path` as from [`HttpTarget::path`]) and reads the
    /// whole answer. `Err` is a transport failure or the timeout; any status
    /// is `Ok`, for the caller to judge.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        json_body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.target.host.clone());
        if let Some(a) = &self.target.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        let body = match json_body {
            Some(b) => {
                req = req.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                b
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("building the request for {path}: {e}"))?;
        let timeout = self.timeout;
        let outcome = tokio::time::timeout(timeout, self.exchange(req)).await;
        let outcome = match outcome {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        if outcome.is_err() {
            // Whatever state the connection is in, it is not one to reuse.
            self.link = None;
        }
        outcome
    }

    async fn exchange(&mut self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String> {
        let mut kept = self.link.take();
        if let Some(link) = kept.as_mut()
            && futures::poll!(&mut link.conn).is_ready()
        {
            // The server closed the connection while it sat idle: replace
            // it rather than fail a request that was never sent.
            kept = None;
        }
        let link = match kept {
            Some(link) => link,
            None => connect(&self.target.addr).await?,
        };
        let Link { sender, conn } = self.link.insert(link);
        let (outcome, closed) = {
            let answer = async {
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>((status, body))
            };
            let mut answer = std::pin::pin!(answer);
            // The connection makes progress only while polled: poll it
            // beside the exchange, in this task, instead of in a task of
            // its own.
            tokio::select! {
                biased;
                r = &mut answer => (r.map_err(|e| e.to_string()), false),
                r = conn => {
                    let outcome = match r {
                        // The server closed the connection: the answer may
                        // have arrived whole before it did, or not at all
                        // (then nothing more will come: do not wait).
                        Ok(()) => match futures::poll!(&mut answer) {
                            Poll::Ready(r) => r.map_err(|e| e.to_string()),
                            Poll::Pending => Err("the server closed the connection".to_owned()),
                        },
                        Err(e) => Err(e.to_string()),
                    };
                    (outcome, true)
                }
            }
        };
        if closed {
            // A finished connection is never polled again.
            self.link = None;
        }
        outcome
    }
}

async fn connect(addr: &Addr) -> Result<Link, String> {
    let stream = match addr {
        Addr::Tcp(addr) => {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connecting to {addr}: {e}"))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("setting TCP_NODELAY on {addr}: {e}"))?;
            Either::Left(stream)
        }
        Addr::Unix(path) => Either::Right(
            UnixStream::connect(path)
                .await
                .map_err(|e| format!("connecting to {}: {e}", path.display()))?,
        ),
    };
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    Ok(Link { sender, conn })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_base_urls_and_refuses_what_it_cannot_reach() {
        let t = HttpTarget::parse("http://127.0.0.1:7070/", Some("s3cret")).expect("valid");
        assert_eq!(t.addr, Addr::Tcp("127.0.0.1:7070".into()));
        assert_eq!(t.host, "127.0.0.1:7070");
        assert_eq!(t.path("/health"), "/health");
        assert_eq!(
            t.auth.as_ref().map(|a| a.as_bytes()),
            Some(&b"Bearer s3cret"[..])
        );

        let t = HttpTarget::parse("http://db.example/base", None).expect("valid");
        assert_eq!(t.addr, Addr::Tcp("db.example:80".into()));
        assert_eq!(t.path("/v1/tables"), "/base/v1/tables");
        assert!(t.auth.is_none());

        let t = HttpTarget::parse("unix:/run/mirrordb/api.sock", None).expect("valid");
        assert_eq!(t.addr, Addr::Unix("/run/mirrordb/api.sock".into()));
        assert_eq!(t.path("/health"), "/health");

        for bad in [
            "https://127.0.0.1:7070",
            "127.0.0.1:7070",
            "http://",
            "not a url",
            "unix:",
        ] {
            assert!(HttpTarget::parse(bad, None).is_err(), "{bad} was accepted");
        }
        assert!(HttpTarget::parse("http://h:1", Some("bad\ntoken")).is_err());
    }

    /// Against a real server: the first connection is dropped unanswered
    /// (an error, not a panic or a hang), the client reconnects by itself,
    /// and one keep-alive connection then serves whole answers in turn.
    #[tokio::test]
    async fn talks_to_a_server_and_reconnects_after_a_dropped_connection() {
        use axum::routing::put;
        let app = axum::Router::new().route(
            "/p/echo",
            put(|headers: axum::http::HeaderMap, body: Bytes| async move {
                let auth = headers
                    .get(AUTHORIZATION)
                    .map(|v| v.to_str().unwrap_or("?").to_owned())
                    .unwrap_or_default();
                (StatusCode::CREATED, format!("{auth}|{}", body.len()))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (first, _) = listener.accept().await?;
            drop(first);
            axum::serve(listener, app).await
        });

        let target = HttpTarget::parse(&format!("http://{addr}/p"), Some("t")).expect("target");
        let mut c = HttpConn::new(target, Duration::from_secs(10));
        let path = c.target().path("/echo");
        let dropped = c.request(Method::PUT, &path, None).await;
        assert!(
            dropped.is_err(),
            "a dropped connection answered {dropped:?}"
        );
        for n in [0usize, 3, 70_000] {
            let (status, body) = c
                .request(Method::PUT, &path, Some(Bytes::from(vec![b'x'; n])))
                .await
                .expect("answer");
            assert_eq!(status, StatusCode::CREATED);
            assert_eq!(body, format!("Bearer t|{n}"));
        }
        let (status, _) = c
            .request(Method::GET, &c.target().path("/missing"), None)
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::NOT_FOUND);
        server.abort();
    }

    /// A server that answers once per connection and then closes it, as
    /// one with a short keep-alive timeout does: the client notices the
    /// closed idle connection and sends its next request on a new one
    /// instead of failing it.
    #[tokio::test]
    async fn replaces_a_connection_the_server_closed_while_idle() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let mut accepted = 0u32;
            loop {
                let (mut s, _) = listener.accept().await?;
                accepted += 1;
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await?;
                // Closed after the answer, while the client waits.
                tokio::time::sleep(Duration::from_millis(20)).await;
                s.shutdown().await?;
                if accepted == 3 {
                    return Ok::<u32, std::io::Error>(accepted);
                }
            }
        });
        let target = HttpTarget::parse(&format!("http://{addr}"), None).expect("target");
        let mut c = HttpConn::new(target, Duration::from_secs(10));
        for i in 0..3 {
            let r = c.request(Method::GET, "/x", None).await;
            assert_eq!(r.map(|a| a.0), Ok(StatusCode::NO_CONTENT), "request {i}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(server.await.expect("server task").expect("server io"), 3);
    }
}
