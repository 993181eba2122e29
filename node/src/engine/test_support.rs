//! Fixtures shared by the engine's test modules.

use super::{Engine, EngineConfig};
use crate::model::WriteOp;
use std::path::Path;
use std::time::Duration;

/// An engine configuration that flushes only when a test asks, so replay
/// paths are exercised.
pub fn cfg(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.flush_interval = Duration::from_secs(3600);
    c
}

/// A two-thread runtime, like the node's.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a test runtime")
}

/// A put without precondition.
pub fn put(table: &str, key: &str, value: &str) -> WriteOp {
    WriteOp::Put {
        table: table.into(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
        if_version: None,
    }
}

/// A put into table `t`.
pub fn tput(key: &str, value: &str) -> WriteOp {
    put("t", key, value)
}

/// A record's value as text, if present.
pub fn value(e: &Engine, table: &str, key: &str) -> Option<String> {
    e.get(table, key)
        .expect("read")
        .map(|r| String::from_utf8(r.value).expect("UTF-8 value"))
}

/// Up to `max` frames of `e` from `from`, as bytes (what a primary ships).
pub fn frames_of(e: &Engine, from: u64, max: usize) -> Vec<Vec<u8>> {
    e.read_frames(from, max, 1 << 20)
        .expect("read frames")
        .into_iter()
        .map(|f| f.bytes)
        .collect()
}
