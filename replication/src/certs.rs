//! The cluster's certificate authority and node certificates (rcgen).
//!
//! `mirrordb cluster init` makes one CA per cluster and one certificate per
//! node, signed by it. A node certificate carries the node id as its **first
//! DNS subject alternative name** (and as the subject's common name), then
//! every host name and IP address the node is reached by. It is valid for
//! both server and client authentication (each node both accepts and dials),
//! for [`CERT_VALIDITY_DAYS`] from the day before it was made.
//!
//! Files, all PEM, in one directory:
//!
//! | file | holds | who needs it |
//! | --- | --- | --- |
//! | `ca.pem` | CA certificate | every node |
//! | `ca.key` | CA private key (mode 0600) | only whoever issues certificates |
//! | `<node>.pem` | node certificate | that node |
//! | `<node>.key` | node private key (mode 0600) | that node |
//!
//! Writing never overwrites an existing file. Reading names the missing or
//! garbled file in its error.

use crate::types::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// How long certificates are valid.
pub const CERT_VALIDITY_DAYS: i64 = 3650;
/// Longest node id: one DNS label.
pub const MAX_NODE_ID_LEN: usize = 63;
/// Most extra host names and addresses in one node certificate.
pub const MAX_HOSTS: usize = 64;
/// Largest PEM file read.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// File name of the CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca.key";

/// Why certificates could not be made, written or read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CertError {
    /// The node id cannot be a DNS name.
    #[error(
        "invalid node id {0:?}: use 1 to {MAX_NODE_ID_LEN} lowercase letters, digits or '-', not starting or ending with '-'"
    )]
    InvalidNodeId(String),
    /// A host name or address is not usable in a certificate.
    #[error("invalid host name {0:?}")]
    InvalidHost(String),
    /// Too many host names.
    #[error("{0} host names, more than {MAX_HOSTS}")]
    TooManyHosts(usize),
    /// rcgen failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file that must exist does not.
    #[error("{} is missing", path.display())]
    Missing { path: PathBuf },
    /// A file exists and will not be overwritten.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    Exists { path: PathBuf },
    /// A file's content is not what it should be.
    #[error("{} is not a valid {what}", path.display())]
    Garbled { path: PathBuf, what: &'static str },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A certificate carries no usable node id.
    #[error("certificate carries no node id (no DNS subject alternative name)")]
    NoNodeId,
}

/// Checks that `id` can be a node id (a single DNS label).
pub fn validate_node_id(id: &str) -> Result<(), CertError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_NODE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidNodeId(id.to_owned()))
    }
}

/// The cluster CA: its certificate and the key that signs node certificates.
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Makes a new CA named after the cluster.
    pub fn generate(cluster_name: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("mirrordb cluster CA {cluster_name}"),
        );
        dn.push(DnType::OrganizationName, "mirrordb");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params);
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let certified = CertifiedIssuer::self_signed(params, key)?;
        let cert_pem = certified.pem();
        // Re-read the issuer from what is written to disk, so a generated
        // and a loaded CA sign identically.
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, KeyPair::from_pem(&key_pem)?)?;
        Ok(ClusterCa {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// Loads a CA from `dir/ca.pem` and `dir/ca.key`, to issue more node
    /// certificates.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_text(&cert_path)?;
        let key_pem = read_text(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| CertError::Garbled {
            path: key_path.clone(),
            what: "private key",
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|_| CertError::Garbled {
            path: cert_path,
            what: "CA certificate",
        })?;
        Ok(ClusterCa {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.pem` and `ca.key` into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        create_dir(dir)?;
        write_new(&dir.join(CA_CERT_FILE), &self.cert_pem, false)?;
        write_new(&dir.join(CA_KEY_FILE), &self.key_pem, true)
    }

    /// Issues a certificate for `node`, reachable at `hosts` (DNS names or
    /// IP addresses, in addition to the node id itself).
    pub fn issue(&self, node: &NodeId, hosts: &[String]) -> Result<NodeCert, CertError> {
        validate_node_id(node.as_str())?;
        if hosts.len() > MAX_HOSTS {
            return Err(CertError::TooManyHosts(hosts.len()));
        }
        let mut names = vec![node.0.clone()];
        for h in hosts {
            if !names.contains(h) {
                names.push(h.clone());
            }
        }
        let mut params = CertificateParams::default();
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(|_| CertError::InvalidHost(name.clone()))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node.as_str());
        dn.push(DnType::OrganizationName, "mirrordb");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeCert {
            node: node.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A node's certificate and private key.
pub struct NodeCert {
    node: NodeId,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl NodeCert {
    /// The node this certificate names.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `<node>.pem` and `<node>.key` into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        create_dir(dir)?;
        write_new(
            &dir.join(format!("{}.pem", self.node)),
            &self.cert_pem,
            false,
        )?;
        write_new(&dir.join(format!("{}.key", self.node)), &self.key_pem, true)
    }
}

/// What a node needs for mutual TLS: who it is, the cluster CA, its
/// certificate chain and its key.
#[derive(Debug)]
pub struct NodeIdentity {
    /// This node's id (checked against its certificate).
    pub node: NodeId,
    /// The cluster CA certificate.
    pub ca: CertificateDer<'static>,
    /// This node's certificate (first) and any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            node: self.node.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl NodeIdentity {
    /// Reads `ca.pem`, `<node>.pem` and `<node>.key` from `dir` and checks
    /// that the certificate names `node`.
    pub fn load(dir: &Path, node: &NodeId) -> Result<Self, CertError> {
        validate_node_id(node.as_str())?;
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(format!("{node}.pem"));
        let key_path = dir.join(format!("{node}.key"));
        let ca = parse_cert(&ca_path, &read_text(&ca_path)?)?;
        let cert = parse_cert(&cert_path, &read_text(&cert_path)?)?;
        let key =
            PrivateKeyDer::from_pem_slice(read_text(&key_path)?.as_bytes()).map_err(|_| {
                CertError::Garbled {
                    path: key_path,
                    what: "private key",
                }
            })?;
        let named = node_id_from_cert(&cert).map_err(|_| CertError::Garbled {
            path: cert_path.clone(),
            what: "node certificate",
        })?;
        if &named != node {
            return Err(CertError::Garbled {
                path: cert_path,
                what: "certificate for this node id",
            });
        }
        Ok(NodeIdentity {
            node: node.clone(),
            ca,
            chain: vec![cert],
            key,
        })
    }

    /// Builds an identity from PEM strings held in memory (tests, `cluster
    /// init` before writing).
    pub fn from_pem(
        node: &NodeId,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, CertError> {
        let mem = PathBuf::from("<memory>");
        let ca = parse_cert(&mem, ca_pem)?;
        let cert = parse_cert(&mem, cert_pem)?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| CertError::Garbled {
                path: mem.clone(),
                what: "private key",
            })?;
        Ok(NodeIdentity {
            node: node.clone(),
            ca,
            chain: vec![cert],
            key,
        })
    }

    /// Builds the identity of a freshly issued certificate.
    pub fn from_issued(ca: &ClusterCa, cert: &NodeCert) -> Result<Self, CertError> {
        Self::from_pem(&cert.node, &ca.cert_pem, &cert.cert_pem, &cert.key_pem)
    }
}

/// The node id a certificate carries: its first DNS subject alternative
/// name. The bytes come from a peer, so this never panics.
pub fn node_id_from_cert(cert: &CertificateDer<'_>) -> Result<NodeId, CertError> {
    let name = der::first_dns_san(cert.as_ref()).ok_or(CertError::NoNodeId)?;
    let name = std::str::from_utf8(name).map_err(|_| CertError::NoNodeId)?;
    validate_node_id(name).map_err(|_| CertError::NoNodeId)?;
    Ok(NodeId(name.to_owned()))
}

fn parse_cert(path: &Path, pem: &str) -> Result<CertificateDer<'static>, CertError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| CertError::Garbled {
        path: path.to_owned(),
        what: "PEM certificate",
    })
}

fn read_text(path: &Path) -> Result<String, CertError> {
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CertError::Missing {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    if meta.len() > MAX_PEM_BYTES {
        return Err(CertError::Garbled {
            path: path.to_owned(),
            what: "PEM file (too large)",
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    String::from_utf8(bytes).map_err(|_| CertError::Garbled {
        path: path.to_owned(),
        what: "PEM file (not text)",
    })
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })
}

fn write_new(path: &Path, text: &str, secret: bool) -> Result<(), CertError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists {
                path: path.to_owned(),
            }
        } else {
            io(e)
        }
    })?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Valid from yesterday (clock skew between nodes) for
/// [`CERT_VALIDITY_DAYS`].
fn set_validity(params: &mut CertificateParams) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let today = i64::try_from(secs / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_from_days(today + CERT_VALIDITY_DAYS);
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

/// Days since 1970-01-01 to a (year, month, day) date (H. Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        i32::try_from(y).unwrap_or(i32::MAX),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
    )
}

/// Just enough DER to find the subject alternative names of a certificate.
mod der {
    const SEQUENCE: u8 = 0x30;
    const EXTENSIONS: u8 = 0xA3;
    const OID: u8 = 0x06;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const DNS_NAME: u8 = 0x82;
    /// 2.5.29.17, subjectAltName.
    const SAN_OID: [u8; 3] = [0x55, 0x1D, 0x11];

    /// Splits one TLV off `b`: (tag, content, rest).
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        if tag & 0x1F == 0x1F {
            return None;
        }
        let (&first, b) = b.split_first()?;
        let (len, b) = if first < 0x80 {
            (first as usize, b)
        } else {
            let n = (first & 0x7F) as usize;
            if n == 0 || n > 4 {
                return None;
            }
            let (len_bytes, b) = (b.get(..n)?, b.get(n..)?);
            let len = len_bytes.iter().fold(0usize, |a, &x| (a << 8) | x as usize);
            (len, b)
        };
        Some((tag, b.get(..len)?, b.get(len..)?))
    }

    fn expect(b: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
        let (tag, content, rest) = tlv(b)?;
        (tag == want).then_some((content, rest))
    }

    pub(super) fn first_dns_san(cert: &[u8]) -> Option<&[u8]> {
        let (cert, _) = expect(cert, SEQUENCE)?;
        let (mut tbs, _) = expect(cert, SEQUENCE)?;
        while !tbs.is_empty() {
            let (tag, content, rest) = tlv(tbs)?;
            tbs = rest;
            if tag != EXTENSIONS {
                continue;
            }
            let (mut exts, _) = expect(content, SEQUENCE)?;
            while !exts.is_empty() {
                let (ext, rest) = expect(exts, SEQUENCE)?;
                exts = rest;
                let (oid, mut ext) = expect(ext, OID)?;
                if oid != SAN_OID {
                    continue;
                }
                if let Some((BOOLEAN, _, rest)) = tlv(ext) {
                    ext = rest;
                }
                let (value, _) = expect(ext, OCTET_STRING)?;
                let (mut names, _) = expect(value, SEQUENCE)?;
                while !names.is_empty() {
                    let (tag, name, rest) = tlv(names)?;
                    if tag == DNS_NAME {
                        return Some(name);
                    }
                    names = rest;
                }
                return None;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn issued_certificate_names_the_node_first() {
        let ca = ClusterCa::generate("test").unwrap();
        let cert = ca
            .issue(
                &NodeId::from("n1"),
                &["db1.example".into(), "127.0.0.1".into()],
            )
            .unwrap();
        let id = NodeIdentity::from_issued(&ca, &cert).unwrap();
        assert_eq!(node_id_from_cert(&id.chain[0]).unwrap(), NodeId::from("n1"));
    }

    #[test]
    fn files_round_trip_and_are_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("test").unwrap();
        ca.write(dir.path()).unwrap();
        let n2 = NodeId::from("n2");
        ca.issue(&n2, &[]).unwrap().write(dir.path()).unwrap();
        let id = NodeIdentity::load(dir.path(), &n2).unwrap();
        assert_eq!(id.node, n2);
        assert!(matches!(
            ca.write(dir.path()),
            Err(CertError::Exists { .. })
        ));
        // A CA loaded from disk issues certificates too.
        let again = ClusterCa::load(dir.path()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        again
            .issue(&NodeId::from("n3"), &[])
            .unwrap()
            .write(dir.path())
            .unwrap();
        NodeIdentity::load(dir.path(), &NodeId::from("n3")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("n2.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
    }

    #[test]
    fn missing_and_garbled_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let n1 = NodeId::from("n1");
        match NodeIdentity::load(dir.path(), &n1) {
            Err(CertError::Missing { path }) => assert!(path.ends_with("ca.pem")),
            other => panic!("{other:?}"),
        }
        let ca = ClusterCa::generate("test").unwrap();
        ca.write(dir.path()).unwrap();
        ca.issue(&n1, &[]).unwrap().write(dir.path()).unwrap();
        std::fs::write(dir.path().join("n1.key"), "not a key").unwrap();
        match NodeIdentity::load(dir.path(), &n1) {
            Err(e @ CertError::Garbled { .. }) => assert!(e.to_string().contains("n1.key")),
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.path().join("ca.pem"), "garbage").unwrap();
        assert!(matches!(
            ClusterCa::load(dir.path()),
            Err(CertError::Garbled { .. })
        ));
        // A certificate for another node under this node's file name.
        ca.issue(&NodeId::from("n9"), &[])
            .unwrap()
            .write(dir.path())
            .unwrap();
        std::fs::copy(dir.path().join("n9.pem"), dir.path().join("n4.pem")).unwrap();
        std::fs::copy(dir.path().join("n9.key"), dir.path().join("n4.key")).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        assert!(matches!(
            NodeIdentity::load(dir.path(), &NodeId::from("n4")),
            Err(CertError::Garbled { .. })
        ));
    }

    #[test]
    fn node_ids_must_be_dns_labels() {
        for bad in ["", "-a", "a-", "N1", "a.b", "a b", &"x".repeat(64)] {
            assert!(validate_node_id(bad).is_err(), "{bad:?}");
        }
        for good in ["n1", "node-2", "a"] {
            validate_node_id(good).unwrap();
        }
        let ca = ClusterCa::generate("test").unwrap();
        assert!(matches!(
            ca.issue(&NodeId::from("Bad Id"), &[]),
            Err(CertError::InvalidNodeId(_))
        ));
    }

    #[test]
    fn dates_convert() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }

    proptest! {
        #[test]
        fn san_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = node_id_from_cert(&CertificateDer::from(bytes));
        }

        #[test]
        fn san_parser_survives_mutated_certificates(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            static CERT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let cert = CERT.get_or_init(|| {
                let ca = ClusterCa::generate("test").unwrap();
                let c = ca.issue(&NodeId::from("n1"), &["h1".into()]).unwrap();
                NodeIdentity::from_issued(&ca, &c).unwrap().chain[0].to_vec()
            });
            let mut bytes = cert.clone();
            for (at, v) in flips {
                let n = bytes.len();
                bytes[at % n] = v;
            }
            bytes.truncate(cut % (cert.len() + 1));
            let _ = node_id_from_cert(&CertificateDer::from(bytes));
        }
    }
}
