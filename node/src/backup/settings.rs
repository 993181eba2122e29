//! `[backup]` in the node's TOML file (DESIGN §5): where sets go, how many
//! are kept, compression, attached files, retries, hooks and schedules.
//! `config.rs` embeds this section; `docs/config.md` documents every key.

use super::schedule::Schedule;
use crate::config::{ByteSize, ConfigDuration, ConfigError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Default destination, relative to the working directory.
pub const DEFAULT_DESTINATION: &str = "./mirrordb-backups";
/// Most sets `keep_last` may ask for.
pub const MAX_KEEP_LAST: u32 = 1000;
/// Most attached files.
pub const MAX_ATTACHED: usize = 256;
/// Most schedules.
pub const MAX_SCHEDULES: usize = 32;
/// Most attempts of one scheduled backup.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
/// `backup.max_rate_while_writing` by default, bytes per second.
pub const DEFAULT_RATE_WHILE_WRITING: u64 = 32 << 20;
/// The lowest limit `backup.max_rate_while_writing` may set (a chunk of
/// the snapshot then waits at most about a second).
pub const MIN_RATE_WHILE_WRITING: u64 = 1 << 20;

/// `backup.priority`: the scheduling class of the backup's threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PriorityValue", into = "PriorityValue")]
pub enum BackupPriority {
    /// Linux `SCHED_IDLE`: CPU time nothing else wants. On a machine whose
    /// cores are busy around the clock a backup then crawls; a nice value
    /// guarantees it a share.
    Idle,
    /// A nice value, 0..=19 (checked by [`BackupSection::validate`]).
    Nice(i32),
}

/// How `backup.priority` is written in TOML: `"idle"` or an integer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum PriorityValue {
    Nice(i64),
    Word(String),
}

/// The error for a `backup.priority` that is neither.
fn bad_priority(got: impl std::fmt::Display) -> String {
    format!("backup.priority must be \"idle\" or a nice value 0..=19, got {got}")
}

impl TryFrom<PriorityValue> for BackupPriority {
    type Error = String;
    fn try_from(v: PriorityValue) -> Result<Self, String> {
        match v {
            PriorityValue::Word(w) if w == "idle" => Ok(BackupPriority::Idle),
            PriorityValue::Word(w) => Err(bad_priority(format!("{w:?}"))),
            PriorityValue::Nice(n) => i32::try_from(n)
                .map(BackupPriority::Nice)
                .map_err(|_| bad_priority(n)),
        }
    }
}

impl From<BackupPriority> for PriorityValue {
    fn from(p: BackupPriority) -> Self {
        match p {
            BackupPriority::Idle => PriorityValue::Word("idle".into()),
            BackupPriority::Nice(n) => PriorityValue::Nice(n.into()),
        }
    }
}

/// `[backup]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupSection {
    /// Directory that receives sets, journal archives and
    /// `backupHistory.json` (another disk is recommended).
    pub destination: PathBuf,
    /// Create the destination if it does not exist. Set it to false when the
    /// destination is a mount point, so an unmounted disk is an error
    /// instead of a directory on the system disk.
    pub create_destination: bool,
    /// Base name of sets and archives: `‹name›[0001].backup`.
    pub name: String,
    /// Sets kept after a successful backup (older ones, and the journal
    /// archives only they need, are deleted). 0 keeps everything.
    pub keep_last: u32,
    /// Skip a backup (automatic or manual) when no data changed since the last one.
    pub only_if_changed: bool,
    /// zstd level of snapshots and archives (1..=19). 1 is the default:
    /// measured here about 4× faster than 3 for a similar size on record
    /// data, so backups take less CPU from writers on small machines.
    pub compression_level: i32,
    /// CPU priority of the threads that read the snapshot, compress it and
    /// write the set: `"idle"` (the default; Linux `SCHED_IDLE`: they run
    /// only on CPU time no other thread of the machine wants) or a nice
    /// value 0..=19 (0: like every other thread). Ignored off Linux.
    pub priority: BackupPriority,
    /// While clients write (the journal grew in the last half second), the
    /// backup compresses at most this many bytes of records per second;
    /// what the snapshot reader gets ahead waits in the spool, so the
    /// snapshot is released as early as before. At full speed while nothing
    /// is written. `0` never limits it. At least 1 MiB.
    pub max_rate_while_writing: ByteSize,
    /// Files copied into every set (`attached/`); a missing one makes the
    /// backup `partial`, with an error.
    pub attached_files: Vec<PathBuf>,
    /// A failed scheduled backup is tried again after this long.
    pub retry_after: ConfigDuration,
    /// Attempts of one scheduled backup; after the last failure automatic
    /// backups pause until a manual backup succeeds.
    pub max_attempts: u32,
    /// Shell command run before a backup; a non-zero exit cancels it.
    pub on_start: String,
    /// Shell command run after a backup, with its outcome in
    /// `MIRRORDB_BACKUP_STATUS` and friends.
    pub on_finish: String,
    /// Hooks are killed after this long (and count as failed).
    pub hook_timeout: ConfigDuration,
    /// Schedules: `"every 6h"`, `"daily at 02:30"`,
    /// `"weekly on mon,thu at 02:30"`, `"monthly on 1 at 03:00"` (UTC). One
    /// schedule may be written as a string instead of an array of one.
    #[serde(deserialize_with = "one_or_many")]
    pub schedule: Vec<String>,
    /// Backup Journal: every line (true) or only start times and errors.
    pub verbose: bool,
}

impl Default for BackupSection {
    fn default() -> Self {
        BackupSection {
            destination: PathBuf::from(DEFAULT_DESTINATION),
            create_destination: true,
            name: "mirrordb".into(),
            keep_last: 3,
            only_if_changed: false,
            compression_level: 1,
            priority: BackupPriority::Idle,
            max_rate_while_writing: ByteSize(DEFAULT_RATE_WHILE_WRITING),
            attached_files: Vec::new(),
            retry_after: ConfigDuration(Duration::from_secs(300)),
            max_attempts: 3,
            on_start: String::new(),
            on_finish: String::new(),
            hook_timeout: ConfigDuration(Duration::from_secs(300)),
            schedule: Vec::new(),
            verbose: true,
        }
    }
}

impl BackupSection {
    /// The parsed schedules.
    pub fn schedules(&self) -> Result<Vec<Schedule>, ConfigError> {
        self.schedule
            .iter()
            .map(|s| {
                s.parse::<Schedule>()
                    .map_err(|e| ConfigError::Invalid(format!("backup.schedule: {e}")))
            })
            .collect()
    }

    /// Range checks, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.destination.as_os_str().is_empty() {
            return bad("backup.destination must not be empty".into());
        }
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.- ".contains(&b))
            && !self.name.starts_with('.');
        if !name_ok {
            return bad(format!(
                "backup.name {:?} must be 1..=64 characters of [A-Za-z0-9_.- ], not starting with '.'",
                self.name
            ));
        }
        if self.keep_last > MAX_KEEP_LAST {
            return bad(format!("backup.keep_last must be at most {MAX_KEEP_LAST}"));
        }
        if !(1..=19).contains(&self.compression_level) {
            return bad(format!(
                "backup.compression_level must be 1..=19, got {}",
                self.compression_level
            ));
        }
        if let BackupPriority::Nice(n) = self.priority
            && !(0..=19).contains(&n)
        {
            return bad(bad_priority(n));
        }
        let rate = self.max_rate_while_writing.0;
        if rate != 0 && rate < MIN_RATE_WHILE_WRITING {
            return bad(format!(
                "backup.max_rate_while_writing must be 0 (no limit) or at least 1MiB, got {rate} bytes"
            ));
        }
        if self.attached_files.len() > MAX_ATTACHED {
            return bad(format!(
                "backup.attached_files: at most {MAX_ATTACHED} files"
            ));
        }
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return bad(format!(
                "backup.max_attempts must be 1..={MAX_ATTEMPTS_LIMIT}, got {}",
                self.max_attempts
            ));
        }
        if self.retry_after.0 < Duration::from_secs(1) {
            return bad("backup.retry_after must be at least 1s".into());
        }
        if self.hook_timeout.0 < Duration::from_secs(1) {
            return bad("backup.hook_timeout must be at least 1s".into());
        }
        if self.schedule.len() > MAX_SCHEDULES {
            return bad(format!(
                "backup.schedule: at most {MAX_SCHEDULES} schedules"
            ));
        }
        self.schedules().map(|_| ())
    }
}

/// A string or an array of strings, as an array.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a schedule string or an array of them")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(vec![v.to_owned()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_schedule_may_be_a_string() {
        let parse = |t: &str| toml::from_str::<BackupSection>(t);
        assert_eq!(
            parse("schedule = \"daily at 02:30\"").unwrap().schedule,
            ["daily at 02:30"]
        );
        assert_eq!(
            parse("schedule = [\"every 6h\", \"daily at 02:30\"]")
                .unwrap()
                .schedule,
            ["every 6h", "daily at 02:30"]
        );
        assert!(parse("").unwrap().schedule.is_empty());
        let e = parse("schedule = 5").unwrap_err().to_string();
        assert!(e.contains("a schedule string or an array of them"), "{e}");
        let e = parse("schedule = [5]").unwrap_err().to_string();
        assert!(e.contains("expected a string"), "{e}");
    }

    #[test]
    fn defaults_are_valid_and_bad_values_name_the_key() {
        BackupSection::default().validate().unwrap();
        let mut b = BackupSection {
            compression_level: 0,
            ..Default::default()
        };
        assert!(
            b.validate()
                .unwrap_err()
                .to_string()
                .contains("compression_level")
        );
        b.compression_level = 3;
        b.schedule = vec!["daily at 2".into()];
        assert!(
            b.validate()
                .unwrap_err()
                .to_string()
                .contains("backup.schedule")
        );
        b.schedule = vec!["daily at 02:00".into(), "every 6h".into()];
        assert_eq!(b.schedules().unwrap().len(), 2);
        b.name = "../x".into();
        assert!(
            b.validate()
                .unwrap_err()
                .to_string()
                .contains("backup.name")
        );
        b.name = "mirrordb".into();
        for (rate, ok) in [(0, true), (1 << 20, true), (1 << 30, true), (1000, false)] {
            b.max_rate_while_writing = ByteSize(rate);
            let r = b.validate();
            assert_eq!(r.is_ok(), ok, "rate {rate}: {r:?}");
            if let Err(e) = r {
                assert!(
                    e.to_string().contains("backup.max_rate_while_writing"),
                    "{e}"
                );
            }
        }
        b.max_rate_while_writing = ByteSize(DEFAULT_RATE_WHILE_WRITING);
        let parsed: BackupSection = toml::from_str("max_rate_while_writing = \"64MiB\"").unwrap();
        assert_eq!(parsed.max_rate_while_writing, ByteSize(64 << 20));
        let parsed: BackupSection = toml::from_str("max_rate_while_writing = 0").unwrap();
        assert_eq!(parsed.max_rate_while_writing, ByteSize(0));
        for (nice, ok) in [(0, true), (19, true), (20, false), (-1, false)] {
            b.priority = BackupPriority::Nice(nice);
            let r = b.validate();
            assert_eq!(r.is_ok(), ok, "nice {nice}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("backup.priority"), "{e}");
            }
        }
    }

    #[test]
    fn priority_is_idle_or_a_nice_value() {
        let parse = |t: &str| toml::from_str::<BackupSection>(t);
        assert_eq!(
            parse("").unwrap().priority,
            BackupPriority::Idle,
            "the default"
        );
        assert_eq!(
            parse("priority = \"idle\"").unwrap().priority,
            BackupPriority::Idle
        );
        assert_eq!(
            parse("priority = 7").unwrap().priority,
            BackupPriority::Nice(7)
        );
        for bad in [
            "priority = \"fast\"",
            "priority = 99999999999",
            "priority = 1.5",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("priority"), "{bad}: {e}");
        }
        // Written back the way it is read.
        let b = BackupSection {
            priority: BackupPriority::Nice(3),
            ..Default::default()
        };
        let text = toml::to_string(&b).unwrap();
        assert_eq!(parse(&text).unwrap().priority, BackupPriority::Nice(3));
    }
}
