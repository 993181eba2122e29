//! A UDP relay between cluster members that can cut any directed link: the
//! fault-injecting network of the failover tests.
//!
//! Every member is dialed at its *front* address (the `addr` every config
//! lists); the member itself binds its *real* address (`cluster.listen`).
//! The relay knows which member sends from which real address (a QUIC
//! endpoint sends everything from the one socket it binds), so it can tell
//! the link a datagram travels on and drop it when that link is cut.
//!
//! ```text
//! n1 real ──► front(n2) ─[n1→n2 cut?]─► upstream(n1,n2) ──► n2 real
//! n1 real ◄── front(n2) ◄─[n2→n1 cut?]─ upstream(n1,n2) ◄── n2 real
//! ```
//!
//! One upstream socket per (source, destination) keeps the sources apart on
//! the destination's side, so its answers find their way back.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

type Cuts = Arc<Mutex<HashSet<(usize, usize)>>>;

/// The relay; dropping it stops every forwarding task.
pub struct Relay {
    /// Where member `i` is dialed.
    pub fronts: Vec<SocketAddr>,
    cuts: Cuts,
    tasks: Vec<JoinHandle<()>>,
}

fn is_cut(cuts: &Cuts, from: usize, to: usize) -> bool {
    cuts.lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&(from, to))
}

impl Relay {
    /// Binds one front socket per member (`reals[i]` is where member `i`
    /// really listens) and starts forwarding. Must run inside a tokio
    /// runtime.
    pub async fn start(reals: Vec<SocketAddr>) -> std::io::Result<Relay> {
        let cuts: Cuts = Arc::default();
        let mut fronts = Vec::new();
        let mut tasks = Vec::new();
        for to in 0..reals.len() {
            let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
            fronts.push(front.local_addr()?);
            tasks.push(tokio::spawn(forward(
                front,
                to,
                reals.clone(),
                cuts.clone(),
            )));
        }
        Ok(Relay {
            fronts,
            cuts,
            tasks,
        })
    }

    /// Drops what `from` sends to `to` from now on.
    pub fn cut(&self, from: usize, to: usize) {
        self.cuts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((from, to));
    }

    /// Cuts every link to and from `node`.
    pub fn isolate(&self, node: usize) {
        for other in 0..self.fronts.len() {
            if other != node {
                self.cut(node, other);
                self.cut(other, node);
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.cuts.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Forwards what arrives at `front` (member `to`'s dialed address).
async fn forward(front: Arc<UdpSocket>, to: usize, reals: Vec<SocketAddr>, cuts: Cuts) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut children = Vec::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, src)) = front.recv_from(&mut buf).await else {
            break;
        };
        // A datagram from an address that is no member's (nothing else
        // should dial) travels on no cuttable link.
        let from = reals.iter().position(|r| *r == src);
        if from.is_some_and(|f| is_cut(&cuts, f, to)) {
            continue;
        }
        let up = match upstreams.get(&src) {
            Some(u) => u.clone(),
            None => {
                let Ok(sock) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                let sock = Arc::new(sock);
                upstreams.insert(src, sock.clone());
                children.push(AbortOnDrop(tokio::spawn(back(
                    sock.clone(),
                    front.clone(),
                    src,
                    from,
                    to,
                    cuts.clone(),
                ))));
                sock
            }
        };
        let _ = up.send_to(&buf[..n], reals[to]).await;
    }
}

/// Carries member `to`'s answers back to `client` (member `from`).
async fn back(
    up: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    from: Option<usize>,
    to: usize,
    cuts: Cuts,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, _)) = up.recv_from(&mut buf).await else {
            break;
        };
        if from.is_some_and(|f| is_cut(&cuts, to, f)) {
            continue;
        }
        let _ = front.send_to(&buf[..n], client).await;
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
