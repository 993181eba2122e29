//! rustls configurations for node-to-node mutual TLS.
//!
//! Both sides use the aws-lc-rs provider explicitly (never the process
//! default, so a second provider linked in by some crate cannot make a
//! builder panic) and TLS 1.3 only. The server side requires a client
//! certificate signed by the cluster CA; the client side presents its own
//! and verifies the server against the same CA and against the node id it
//! dials (the node id is the TLS server name). ALPN names the service.

use crate::certs::NodeIdentity;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use std::sync::Arc;
use thiserror::Error;

/// ALPN of the journal-shipping service.
pub const ALPN_REPLICATION: &[u8] = b"mirrordb-repl/1";
/// ALPN of the raft RPC service (used by the failover crate).
pub const ALPN_RAFT: &[u8] = b"mirrordb-raft/1";

/// Why a TLS configuration could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused a certificate, key or setting.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the rustls configuration.
    #[error("quic tls: {0}")]
    Quic(String),
}

/// The crypto provider used for every node-to-node connection.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(identity: &NodeIdentity) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca.clone())?;
    Ok(Arc::new(roots))
}

/// Server side: presents this node's certificate, requires a client
/// certificate signed by the cluster CA, offers `alpns`.
pub fn server_config(
    identity: &NodeIdentity,
    alpns: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider.clone()).build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// Client side: presents this node's certificate, trusts only the cluster
/// CA, asks for `alpn`.
pub fn client_config(
    identity: &NodeIdentity,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(identity)?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}
