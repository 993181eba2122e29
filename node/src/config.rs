//! The node's configuration: one TOML file, its defaults, the command-line
//! overrides merged over it, and the checks that refuse a bad file at start-up
//! with a message naming the key.
//!
//! ```text
//! mirrordb.toml ──► Config::parse (unknown key / bad value = error naming it)
//!                      │
//!   --data-dir, --listen ──► Config::apply_overrides
//!                      │
//!                      └─► Config::validate (cross-key rules: tokens vs. listen, ranges)
//! ```
//!
//! Every section is `deny_unknown_fields`, so a typo is an error, never a
//! silently ignored setting. Durations are strings with a unit (`"250ms"`,
//! `"1s"`, `"1m30s"`, `"2h"`), sizes are strings with a unit (`"64MiB"`,
//! `"1GB"`) or plain integers of bytes. `docs/config.md` documents every key;
//! a test checks that it names every key [`Config::default`] has.
//! `[backup]` is defined in `crate::backup::settings`.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./mirrordb-data";
/// Default HTTP listen address (DESIGN §2).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Largest configurable JSON request body.
pub const MAX_BODY_BYTES_LIMIT: u64 = 1024 * 1024 * 1024;
/// Smallest configurable JSON request body.
pub const MIN_BODY_BYTES: u64 = 1024;
/// Longest accepted write timeout.
pub const MAX_WRITE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most API tokens a config may hold.
pub const MAX_TOKENS: usize = 1024;
/// Shortest accepted API token, in bytes.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Why the configuration was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A duration written as a string with units, e.g. `"250ms"`, `"1m30s"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigDuration(pub Duration);

/// A size in bytes written as `"64MiB"`, `"1GB"`, `"512"` or an integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// Why a duration string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "invalid duration {0:?}: expected numbers with units ms, s, m, h or d, like \"250ms\", \"1s\", \"1m30s\", \"2h\""
)]
pub struct DurationError(pub String);

/// Why a size string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "invalid size {0:?}: expected a number of bytes with an optional unit B, KB, MB, GB, TB, KiB, MiB, GiB or TiB, like \"64MiB\""
)]
pub struct SizeError(pub String);

/// Parses `"250ms"`, `"1s"`, `"1m30s"`, `"2h"`, `"1d"`: one or more
/// `<integer><unit>` groups.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_owned());
    let text = s.trim();
    if text.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
            "d" => Duration::from_secs(n.checked_mul(86_400).ok_or_else(err)?),
            _ => return Err(err()),
        };
        total = total.checked_add(part).ok_or_else(err)?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it, using the largest
/// unit that divides it exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    for (unit, secs) in [("d", 86_400u128), ("h", 3600), ("m", 60)] {
        if s.is_multiple_of(secs) {
            return format!("{}{unit}", s / secs);
        }
    }
    format!("{s}s")
}

/// Parses `"64MiB"`, `"1GB"`, `"512"`, `"512B"` (units are case-insensitive;
/// `KiB` = 1024, `KB` = 1000).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_owned());
    let text = s.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(err());
    }
    let n: u64 = text[..digits].parse().map_err(|_| err())?;
    let unit = text[digits..].trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "tb" => 1000 * 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// Formats a size the way [`parse_size`] reads it, using the largest binary
/// unit that divides it exactly.
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("TiB", 40u32), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        let m = 1u64 << shift;
        if n != 0 && n.is_multiple_of(m) {
            return format!("{}{unit}", n / m);
        }
    }
    format!("{n}B")
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConfigDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string with a unit, like \"250ms\", \"1s\" or \"2h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ConfigDuration, E> {
                parse_duration(v).map(ConfigDuration).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size like \"64MiB\" or an integer number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size must not be negative, got {v}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a bearer token may do (DESIGN §2, "Security"). Ordered: each role can
/// do everything the roles before it can.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GET paths: records, blobs, tables, status, metrics.
    Read,
    /// Read, plus record, blob, table and transaction writes.
    Write,
    /// Everything, including administrative paths (backups, rollback, lock…).
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        })
    }
}

/// `[node]`: who this node is and where it keeps its data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// The node's name, journaled at every start and shown in status.
    pub name: String,
    /// Directory holding the data file and the journal.
    pub data_dir: PathBuf,
    /// HTTP API listen address.
    pub listen: SocketAddr,
}

/// The machine's host name, or `"mirrordb"` when unknown.
fn default_node_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "mirrordb".to_owned())
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            name: default_node_name(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: default_listen(),
        }
    }
}

/// `[journal]`: segment files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSection {
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: ByteSize,
    /// Keep zeroed blocks ahead of the writer (up to the segment size), so
    /// that a group commit's fdatasync writes no file metadata.
    pub preallocate: bool,
    /// On a primary, the idle writer and a client's write waiting alone
    /// for its answer look again for a few hundred microseconds before
    /// they sleep.
    pub busy_poll: bool,
}

impl Default for JournalSection {
    fn default() -> Self {
        JournalSection {
            segment_bytes: ByteSize(64 << 20),
            preallocate: true,
            busy_poll: true,
        }
    }
}

/// `[cache]`: the applied-but-not-flushed working set (DESIGN §4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// The cache is flushed to the data file at least this often.
    pub flush_interval: ConfigDuration,
    /// The cache is flushed early when this many bytes are unflushed.
    pub dirty_bytes_max: ByteSize,
    /// Page cache of the data file.
    pub cache_bytes: ByteSize,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            flush_interval: ConfigDuration(Duration::from_secs(1)),
            dirty_bytes_max: ByteSize(64 << 20),
            cache_bytes: ByteSize(256 << 20),
        }
    }
}

/// `[recovery]`: what the node may do on its own at start (DESIGN §4).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoverySection {
    /// Restore the newest backup by itself when the data file is damaged.
    pub auto_restore: bool,
}

/// One `[[api.tokens]]` entry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs and journaled as the session's identity.
    pub name: String,
    /// The secret, sent as `Authorization: Bearer <token>`.
    pub token: String,
    /// What the token may do.
    pub role: Role,
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("role", &self.role)
            .finish()
    }
}

/// `[api]`: the HTTP API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// A write that has not been acknowledged after this long is answered
    /// `write_blocked` (it may still be applied afterwards).
    pub write_timeout: ConfigDuration,
    /// Largest JSON request body (a record or a transaction). Records are
    /// further limited to 16 MiB and transactions to 64 MiB of values.
    pub max_body_bytes: ByteSize,
    /// A request body that sends no bytes for this long is abandoned
    /// (408 `request_timeout`), so a stalled client cannot hold a write open.
    pub body_idle_timeout: ConfigDuration,
    /// Bearer tokens. Empty: no authentication, loopback only.
    pub tokens: Vec<TokenConfig>,
    /// Also serve the API on this Unix-domain socket (a local client's
    /// cheaper way in, as PostgreSQL offers). Unset: TCP only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<PathBuf>,
}

/// Longest path a Unix-domain socket address holds (`sun_path`, less the
/// terminating NUL).
pub const MAX_UNIX_SOCKET_PATH: usize = 107;

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            write_timeout: ConfigDuration(Duration::from_secs(5)),
            max_body_bytes: ByteSize(crate::model::MAX_TXN_BYTES as u64),
            body_idle_timeout: ConfigDuration(Duration::from_secs(30)),
            tokens: Vec::new(),
            unix_socket: None,
        }
    }
}

/// `[session]`: client sessions (DESIGN §2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSection {
    /// A session with no operation for this long is closed (and journaled as
    /// closed).
    pub idle_timeout: ConfigDuration,
}

impl Default for SessionSection {
    fn default() -> Self {
        SessionSection {
            idle_timeout: ConfigDuration(Duration::from_secs(60)),
        }
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeSection,
    pub journal: JournalSection,
    pub cache: CacheSection,
    pub recovery: RecoverySection,
    pub api: ApiSection,
    pub session: SessionSection,
    /// `[cluster]`: replication peers and commit policy (absent: a single
    /// node). Documented in `docs/config.md`; see `crate::cluster::config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterSection>,
    /// `[backup]`: sets, archives, retention, schedules (see `crate::backup::settings`).
    pub backup: crate::backup::BackupSection,
}

/// Command-line settings that take precedence over the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    /// `mirrordb serve --backup-dir`: overrides `backup.destination`.
    pub backup_dir: Option<PathBuf>,
}

impl Config {
    /// Parses TOML text; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })
    }

    /// Reads and parses a config file (not yet validated).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// The file (or the defaults without one), the overrides merged over it,
    /// validated: what `mirrordb serve` runs with.
    pub fn resolve(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        cfg.apply_overrides(overrides);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Puts command-line settings over the file's.
    pub fn apply_overrides(&mut self, o: &Overrides) {
        if let Some(d) = &o.data_dir {
            self.node.data_dir = d.clone();
        }
        if let Some(l) = o.listen {
            self.node.listen = l;
        }
        if let Some(b) = &o.backup_dir {
            self.backup.destination = b.clone();
        }
    }

    /// The rules that span keys or bound values. Run after the overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.node.name.trim().is_empty() || self.node.name.len() > 128 {
            return bad("node.name must be 1..=128 bytes".into());
        }
        if self.node.data_dir.as_os_str().is_empty() {
            return bad("node.data_dir must not be empty".into());
        }
        let seg = self.journal.segment_bytes.0;
        if !(1 << 20..=1 << 40).contains(&seg) {
            return bad(format!(
                "journal.segment_bytes must be between 1MiB and 1TiB, got {}",
                format_size(seg)
            ));
        }
        let fi = self.cache.flush_interval.0;
        if fi < Duration::from_millis(1) || fi > Duration::from_secs(3600) {
            return bad(format!(
                "cache.flush_interval must be between 1ms and 1h, got {}",
                format_duration(fi)
            ));
        }
        if self.cache.dirty_bytes_max.0 < 1 << 20 {
            return bad("cache.dirty_bytes_max must be at least 1MiB".into());
        }
        if self.cache.cache_bytes.0 < 1 << 20 || usize::try_from(self.cache.cache_bytes.0).is_err()
        {
            return bad("cache.cache_bytes must be at least 1MiB and fit in memory".into());
        }
        let wt = self.api.write_timeout.0;
        if wt < Duration::from_millis(1) || wt > MAX_WRITE_TIMEOUT {
            return bad(format!(
                "api.write_timeout must be between 1ms and 1h, got {}",
                format_duration(wt)
            ));
        }
        let mb = self.api.max_body_bytes.0;
        if !(MIN_BODY_BYTES..=MAX_BODY_BYTES_LIMIT).contains(&mb) {
            return bad(format!(
                "api.max_body_bytes must be between 1KiB and 1GiB, got {}",
                format_size(mb)
            ));
        }
        let bi = self.api.body_idle_timeout.0;
        if bi < Duration::from_millis(10) || bi > MAX_WRITE_TIMEOUT {
            return bad(format!(
                "api.body_idle_timeout must be between 10ms and 1h, got {}",
                format_duration(bi)
            ));
        }
        if let Some(p) = &self.api.unix_socket {
            let len = p.as_os_str().len();
            if len == 0 || len > MAX_UNIX_SOCKET_PATH {
                return bad(format!(
                    "api.unix_socket must be a path of 1..={MAX_UNIX_SOCKET_PATH} bytes, got {len}: {}",
                    p.display()
                ));
            }
        }
        if self.session.idle_timeout.0 < Duration::from_secs(1) {
            return bad("session.idle_timeout must be at least 1s".into());
        }
        self.validate_tokens()?;
        self.backup.validate()?;
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        if self.api.tokens.is_empty() && !self.node.listen.ip().is_loopback() {
            return bad(format!(
                "refusing to listen on {} without authentication: no [[api.tokens]] are configured. \
                 Add tokens to the config file, or listen on a loopback address such as 127.0.0.1:{}",
                self.node.listen,
                self.node.listen.port()
            ));
        }
        Ok(())
    }

    fn validate_tokens(&self) -> Result<(), ConfigError> {
        let tokens = &self.api.tokens;
        if tokens.len() > MAX_TOKENS {
            return Err(ConfigError::Invalid(format!(
                "at most {MAX_TOKENS} [[api.tokens]] are allowed"
            )));
        }
        for (i, t) in tokens.iter().enumerate() {
            let name_ok = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !name_ok {
                return Err(ConfigError::Invalid(format!(
                    "api.tokens[{i}].name {:?} must be 1..=64 characters of [A-Za-z0-9_.-]",
                    t.name
                )));
            }
            if t.token.len() < MIN_TOKEN_BYTES
                || t.token.len() > 4096
                || !t.token.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ConfigError::Invalid(format!(
                    "api.tokens[{i}] ({}): token must be {MIN_TOKEN_BYTES}..=4096 printable ASCII characters without spaces",
                    t.name
                )));
            }
            if tokens[..i].iter().any(|o| o.name == t.name) {
                return Err(ConfigError::Invalid(format!(
                    "api.tokens: the name {:?} is used twice",
                    t.name
                )));
            }
            if tokens[..i].iter().any(|o| o.token == t.token) {
                return Err(ConfigError::Invalid(format!(
                    "api.tokens: tokens {:?} and {:?} have the same secret",
                    tokens[..i]
                        .iter()
                        .find(|o| o.token == t.token)
                        .map(|o| o.name.as_str())
                        .unwrap_or_default(),
                    t.name
                )));
            }
        }
        Ok(())
    }

    /// The defaults as a TOML document (the node name left as the host name).
    pub fn defaults_toml() -> String {
        toml::to_string(&Config::default()).unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "1",
            "s",
            "1 s",
            "1x",
            "-1s",
            "1.5s",
            "99999999999999999999s",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.to_string().contains("invalid duration"), "{bad}: {e}");
        }
        for d in ["250ms", "1s", "1m", "90s", "2h", "1d", "0s"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn sizes_parse_and_format() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64mib"), Ok(64 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        for bad in ["", "MiB", "1 XB", "-1MiB", "1.5MiB", "99999999999TiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        for s in ["64MiB", "1GiB", "1000B", "3KiB"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.node.data_dir, PathBuf::from("./mirrordb-data"));
        assert_eq!(c.node.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.cache.flush_interval.0, Duration::from_secs(1));
        assert_eq!(c.cache.dirty_bytes_max.0, 64 << 20);
        assert_eq!(c.api.write_timeout.0, Duration::from_secs(5));
        c.validate().unwrap();
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
            [node]
            name = "n1"
            data_dir = "/var/lib/mirrordb"
            listen = "0.0.0.0:7070"
            [journal]
            segment_bytes = "16MiB"
            preallocate = false
            busy_poll = false
            [cache]
            flush_interval = "250ms"
            dirty_bytes_max = 1048576
            cache_bytes = "1GiB"
            [recovery]
            auto_restore = true
            [api]
            write_timeout = "2s"
            max_body_bytes = "32MiB"
            [[api.tokens]]
            name = "app"
            token = "0123456789abcdef0123"
            role = "write"
            [[api.tokens]]
            name = "ops"
            token = "fedcba9876543210fedc"
            role = "admin"
            [session]
            idle_timeout = "2h"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.node.name, "n1");
        assert_eq!(c.journal.segment_bytes.0, 16 << 20);
        assert!(!c.journal.preallocate);
        assert!(!c.journal.busy_poll);
        assert_eq!(c.cache.flush_interval.0, Duration::from_millis(250));
        assert_eq!(c.cache.dirty_bytes_max.0, 1 << 20);
        assert!(c.recovery.auto_restore);
        assert_eq!(c.api.tokens[1].role, Role::Admin);
        assert_eq!(c.session.idle_timeout.0, Duration::from_secs(7200));
        // The secret never shows in Debug output (logs).
        assert!(!format!("{c:?}").contains("0123456789abcdef0123"));
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let e = parse("[cache]\nflush_intervall = \"1s\"\n").unwrap_err();
        let m = e.to_string();
        assert!(m.contains("flush_intervall"), "{m}");
        assert!(m.contains("test.toml"), "{m}");
        let e = parse("[nodes]\nname = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("nodes"), "{e}");
        let e = parse(
            "[[api.tokens]]\nname=\"a\"\ntoken=\"0123456789abcdef\"\nrole=\"read\"\nextra=1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        let e = parse("[cache]\nflush_interval = \"1 sec\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("flush_interval") && e.contains("invalid duration"),
            "{e}"
        );
        let e = parse("[cache]\nflush_interval = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("flush_interval") && e.contains("duration"),
            "{e}"
        );
        let e = parse("[journal]\nsegment_bytes = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("segment_bytes") && e.contains("invalid size"),
            "{e}"
        );
        let e = parse("[node]\nlisten = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
        let e = parse("[[api.tokens]]\nname=\"a\"\ntoken=\"0123456789abcdef\"\nrole=\"root\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("root") && e.contains("role"), "{e}");
    }

    #[test]
    fn validation_rejects_out_of_range_values() {
        let mut c = Config::default();
        c.journal.segment_bytes = ByteSize(10);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("journal.segment_bytes")
        );
        let mut c = Config::default();
        c.api.write_timeout = ConfigDuration(Duration::ZERO);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("api.write_timeout")
        );
        let mut c = Config::default();
        c.api.tokens = vec![TokenConfig {
            name: "a".into(),
            token: "short".into(),
            role: Role::Read,
        }];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("token must be")
        );
        let t = TokenConfig {
            name: "a".into(),
            token: "0123456789abcdef".into(),
            role: Role::Read,
        };
        let mut c = Config::default();
        c.api.tokens = vec![
            t.clone(),
            TokenConfig {
                name: "b".into(),
                ..t.clone()
            },
        ];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("same secret")
        );
        c.api.tokens = vec![t.clone(), t];
        assert!(c.validate().unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn listening_beyond_loopback_needs_tokens() {
        let mut c = Config::default();
        c.apply_overrides(&Overrides {
            data_dir: None,
            listen: Some("0.0.0.0:7070".parse().unwrap()),
            backup_dir: None,
        });
        let m = c.validate().unwrap_err().to_string();
        assert!(m.contains("refusing to listen on 0.0.0.0:7070"), "{m}");
        c.node.listen = "[::1]:7070".parse().unwrap();
        c.validate().unwrap();
        c.node.listen = "0.0.0.0:7070".parse().unwrap();
        c.api.tokens.push(TokenConfig {
            name: "app".into(),
            token: "0123456789abcdef".into(),
            role: Role::Write,
        });
        c.validate().unwrap();
    }

    #[test]
    fn overrides_take_precedence_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "[node]\ndata_dir = \"/from/file\"\nlisten = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let c = Config::resolve(Some(&path), &Overrides::default()).unwrap();
        assert_eq!(c.node.data_dir, PathBuf::from("/from/file"));
        let c = Config::resolve(
            Some(&path),
            &Overrides {
                data_dir: Some("/from/flag".into()),
                listen: Some("127.0.0.1:2".parse().unwrap()),
                backup_dir: None,
            },
        )
        .unwrap();
        assert_eq!(c.node.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.node.listen.port(), 2);
        let e = Config::resolve(
            Some(&dir.path().join("missing.toml")),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = Config::defaults_toml();
        let back = parse(&text).unwrap();
        assert_eq!(back, Config::default());
    }

    /// `docs/config.md` documents every key the defaults have, with its
    /// default value.
    #[test]
    fn docs_name_every_key_and_default() {
        let docs_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
        let docs = std::fs::read_to_string(&docs_path).unwrap();
        let value: toml::Table = toml::from_str(&Config::defaults_toml()).unwrap();
        for (section, body) in &value {
            let toml::Value::Table(keys) = body else {
                panic!("{section} is not a table");
            };
            for (key, default) in keys {
                let full = format!("`{section}.{key}`");
                assert!(docs.contains(&full), "docs/config.md lacks {full}");
                if section == "node" && key == "name" {
                    continue; // the host name
                }
                let shown = match default {
                    toml::Value::String(s) => format!("`\"{s}\"`"),
                    toml::Value::Array(a) if a.is_empty() => "none".to_owned(),
                    other => format!("`{other}`"),
                };
                let line = docs.lines().find(|l| l.contains(&full)).unwrap();
                assert!(
                    line.contains(&shown),
                    "docs/config.md: {full} should show default {shown}: {line}"
                );
            }
        }
        for key in [
            "`api.tokens.name`",
            "`api.tokens.token`",
            "`api.tokens.role`",
        ] {
            assert!(docs.contains(key), "docs/config.md lacks {key}");
        }
    }
}
