//! Activity analysis (DESIGN §6): who did what, when, to which records, read
//! back from journal segments. This module owns the filter, the entry shape
//! shown to operators (`mirrordb journal show`, `GET /v1/journal`) and the
//! table / JSON renderings.
//!
//! ```text
//! list_segments ──► EntryIter(from..=to) ──► time filter (frame header)
//!        ──► decode_op ──► table / key / session filter ──► ActivityEntry
//!        ──► second pass: SessionOpen entries of sessions opened before the
//!            range (a SessionId is the LSN of its SessionOpen) ──► identities
//! ```
//!
//! A journal that is being appended is read safely: callers that know the
//! durable end pass it as `to_lsn`; without it, a bad or short frame in the
//! *last* segment is taken as the end of what has been written so far and
//! reported in [`QueryOutcome::tail_note`], never as an error. A bad frame in
//! any earlier segment is corruption and is an error. Nothing read from disk
//! can cause a panic.

use crate::journal::format::{self, FrameError};
use crate::journal::scan::{self, EntryIter, ScanError, SegmentFile};
use crate::model::{ClientIdentity, Op, SessionId};
use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Most entries one [`query`] returns when the caller gives no limit.
pub const DEFAULT_QUERY_LIMIT: usize = 1_000;
/// Most entries one [`query`] may return at all (a bound on memory: an entry
/// holds names and keys, never values).
pub const MAX_QUERY_LIMIT: usize = 1_000_000;
/// Rows buffered before the table rendering computes column widths.
const TABLE_PAGE_ROWS: usize = 1_000;
/// Widest table and key columns in the human table; longer names are cut.
const TABLE_COL_MAX: usize = 24;
const KEY_COL_MAX: usize = 40;
const WHO_COL_MAX: usize = 48;

/// Which entries to show. Every field narrows the result; `None` means "any".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// First LSN to show (inclusive).
    pub from_lsn: Option<u64>,
    /// Last LSN to show (inclusive). Callers reading a live journal pass
    /// `min(requested, durable_lsn)` here.
    pub to_lsn: Option<u64>,
    /// Earliest entry time, microseconds since the Unix epoch (inclusive).
    pub since_us: Option<u64>,
    /// Latest entry time, microseconds since the Unix epoch (inclusive).
    pub until_us: Option<u64>,
    /// Only operations on this table.
    pub table: Option<String>,
    /// Only operations on this key; a trailing `*` matches a prefix.
    pub key: Option<String>,
    /// Only operations of this session.
    pub session: Option<SessionId>,
}

impl Filter {
    fn key_matches(&self, key: Option<&str>) -> bool {
        match (&self.key, key) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(want), Some(k)) => match want.strip_suffix('*') {
                Some(prefix) => k.starts_with(prefix),
                None => k == want,
            },
        }
    }
}

/// One journal entry as shown to operators: the operation's kind and target,
/// never its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActivityEntry {
    pub lsn: u64,
    /// Entry time, RFC 3339 UTC with microseconds.
    pub time: String,
    pub time_us: u64,
    pub epoch: u64,
    /// The session that did the operation. Entries inside a transaction or
    /// BLOB write that carry no session themselves (`txn_commit`,
    /// `blob_chunk`) are attributed to the session that began it.
    pub session: Option<u64>,
    /// Who the session belongs to, when its `session_open` entry is on disk.
    pub identity: Option<ClientIdentity>,
    /// `put`, `delete`, `txn_begin`, … (see [`Op::kind`]).
    pub op: &'static str,
    pub table: Option<String>,
    pub key: Option<String>,
    /// Bytes of the value written (`put`, `blob_begin`, `blob_chunk`).
    pub size: Option<u64>,
    /// Anything else worth a glance: a restore point's name, a backup
    /// number, a transaction's operation count, a table's journaling flag.
    pub detail: Option<String>,
}

/// What a query found (serialised as the answer of `GET /v1/journal`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueryOutcome {
    pub entries: Vec<ActivityEntry>,
    /// True when the limit cut the result short.
    pub truncated: bool,
    /// Set when the scan stopped at a short or damaged frame at the end of
    /// the last segment (a write in progress, or a torn tail that recovery
    /// will cut): where, and why.
    pub tail_note: Option<String>,
    /// Set when the journal read starts after the first LSN asked for
    /// (`from_lsn`, or LSN 1): where it starts, so that an empty or short
    /// answer is not taken for "nothing happened".
    pub head_note: Option<String>,
}

/// What a scan says besides its entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanNotes {
    /// See [`QueryOutcome::tail_note`].
    pub tail: Option<String>,
    /// See [`QueryOutcome::head_note`].
    pub head: Option<String>,
}

/// The head note for a journal whose first entry is `first` when the
/// entries `from..=to` were asked for.
fn head_note(first: Option<u64>, from: Option<u64>, to: Option<u64>) -> Option<String> {
    let first = first?;
    let from = from.unwrap_or(1).max(1);
    let missing_to = first.saturating_sub(1).min(to.unwrap_or(u64::MAX));
    (first > from).then(|| {
        format!(
            "the journal read here starts at LSN {first}: entries {from}..={missing_to} are \
             not in it (a backup moves the entries it archived out of the live journal; \
             retention deletes archives that only older sets needed)"
        )
    })
}

/// Why activity could not be read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ActivityError {
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("entry {lsn} has a valid checksum but its operation does not decode: {source}")]
    Decode { lsn: u64, source: FrameError },
    #[error("invalid filter: {0}")]
    InvalidFilter(String),
}

/// The query string of `GET /v1/journal?from_lsn=&to_lsn=&since=&until=&table=&key=&session=&limit=`
/// (DESIGN §2); times take the forms of [`parse_time`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalQuery {
    pub from_lsn: Option<u64>,
    pub to_lsn: Option<u64>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub table: Option<String>,
    pub key: Option<String>,
    pub session: Option<u64>,
    /// Default [`DEFAULT_QUERY_LIMIT`], at most [`MAX_QUERY_LIMIT`].
    pub limit: Option<usize>,
}

impl JournalQuery {
    /// The filter and limit this query asks for. A caller serving a live
    /// journal should then cap `to_lsn` at the durable LSN.
    pub fn filter(&self) -> Result<(Filter, usize), ActivityError> {
        let time = |s: &Option<String>| {
            s.as_deref()
                .map(parse_time)
                .transpose()
                .map_err(ActivityError::InvalidFilter)
        };
        let filter = Filter {
            from_lsn: self.from_lsn,
            to_lsn: self.to_lsn,
            since_us: time(&self.since)?,
            until_us: time(&self.until)?,
            table: self.table.clone(),
            key: self.key.clone(),
            session: self.session.map(SessionId),
        };
        let limit = self.limit.unwrap_or(DEFAULT_QUERY_LIMIT);
        if limit == 0 || limit > MAX_QUERY_LIMIT {
            return Err(ActivityError::InvalidFilter(format!(
                "limit must be 1..={MAX_QUERY_LIMIT}"
            )));
        }
        Ok((filter, limit))
    }
}

/// Reads the activity in `journal_dir` that matches `filter`, in LSN order,
/// at most `limit` entries (capped at [`MAX_QUERY_LIMIT`]).
pub fn query(
    journal_dir: &Path,
    filter: &Filter,
    limit: usize,
) -> Result<QueryOutcome, ActivityError> {
    let limit = limit.min(MAX_QUERY_LIMIT);
    let mut out = QueryOutcome::default();
    let notes = scan_dir(journal_dir, filter, |e| {
        if out.entries.len() >= limit {
            out.truncated = true;
            return Ok(false);
        }
        out.entries.push(e);
        Ok(true)
    })?;
    out.tail_note = notes.tail;
    out.head_note = notes.head;
    Ok(out)
}

/// Scans `journal_dir` and hands each matching entry to `sink`, which answers
/// whether to go on. Returns the head and tail notes (see [`QueryOutcome`]).
///
/// Identities of sessions opened before the scanned range are resolved by a
/// second, narrow pass, so entries reach `sink` in pages of
/// [`TABLE_PAGE_ROWS`] once their identities are known.
pub fn scan_dir(
    journal_dir: &Path,
    filter: &Filter,
    mut sink: impl FnMut(ActivityEntry) -> Result<bool, ActivityError>,
) -> Result<ScanNotes, ActivityError> {
    if let (Some(a), Some(b)) = (filter.from_lsn, filter.to_lsn)
        && a > b
    {
        return Err(ActivityError::InvalidFilter(format!(
            "from_lsn {a} is after to_lsn {b}"
        )));
    }
    if let (Some(a), Some(b)) = (filter.since_us, filter.until_us)
        && a > b
    {
        return Err(ActivityError::InvalidFilter(
            "since is after until".to_string(),
        ));
    }
    let (segments, _torn_header) = scan::list_segments(journal_dir)?;
    let head = head_note(
        segments.first().map(|s| s.header.first_lsn),
        filter.from_lsn,
        filter.to_lsn,
    );
    let mut reader = ActivityReader::new(segments.clone(), filter);
    let mut identities: HashMap<u64, ClientIdentity> = HashMap::new();
    let mut page: Vec<ActivityEntry> = Vec::new();
    loop {
        let more = reader.next_entry(&mut identities)?;
        let done = more.is_none();
        if let Some(e) = more {
            page.push(e);
        }
        if page.len() >= TABLE_PAGE_ROWS || (done && !page.is_empty()) {
            resolve_identities(&segments, &mut page, &mut identities, reader.tail_segment())?;
            for e in page.drain(..) {
                if !sink(e)? {
                    return Ok(ScanNotes {
                        tail: reader.tail_note.take(),
                        head,
                    });
                }
            }
        }
        if done {
            return Ok(ScanNotes {
                tail: reader.tail_note.take(),
                head,
            });
        }
    }
}

/// Walks the journal and yields matching entries with the identities known
/// so far (sessions opened inside the scanned range).
struct ActivityReader<'f> {
    iter: EntryIter,
    filter: &'f Filter,
    last_segment: Option<PathBuf>,
    /// Session of the transaction or BLOB write in progress, for entries
    /// that carry none.
    group_session: Option<SessionId>,
    tail_note: Option<String>,
}

impl<'f> ActivityReader<'f> {
    fn new(segments: Vec<SegmentFile>, filter: &'f Filter) -> Self {
        let last_segment = segments.last().map(|s| s.path.clone());
        let from = filter.from_lsn.unwrap_or(0);
        let to = filter.to_lsn.unwrap_or(u64::MAX);
        // Read from the start of the segment that holds `from`: the entries
        // before it (already read from disk anyway) say which session a
        // transaction in progress belongs to, and who opened sessions.
        let segment_start = segments
            .iter()
            .rev()
            .map(|s| s.header.first_lsn)
            .find(|&first| first <= from)
            .unwrap_or(0);
        ActivityReader {
            iter: EntryIter::new(segments, segment_start, to),
            filter,
            last_segment,
            group_session: None,
            tail_note: None,
        }
    }

    fn tail_segment(&self) -> Option<&Path> {
        self.last_segment.as_deref()
    }

    fn next_entry(
        &mut self,
        identities: &mut HashMap<u64, ClientIdentity>,
    ) -> Result<Option<ActivityEntry>, ActivityError> {
        loop {
            let frame = match self.iter.next() {
                None => return Ok(None),
                Some(Ok(f)) => f,
                Some(Err(ScanError::Corrupt {
                    path,
                    offset,
                    reason,
                })) if Some(&path) == self.last_segment.as_ref() => {
                    // The end of the last segment: a frame being written
                    // right now, or a torn tail recovery will cut.
                    self.tail_note = Some(format!(
                        "stopped at {} offset {offset}: {reason} (end of the written journal, or a torn tail)",
                        path.display()
                    ));
                    return Ok(None);
                }
                Some(Err(e)) => return Err(e.into()),
            };
            let h = frame.header;
            let op = format::decode_op(frame.payload())
                .map_err(|source| ActivityError::Decode { lsn: h.lsn, source })?;
            let session = match &op {
                Op::TxnBegin { session, .. } | Op::BlobBegin { session, .. } => {
                    self.group_session = Some(*session);
                    Some(*session)
                }
                Op::TxnCommit | Op::TxnAbort => self.group_session.take(),
                Op::BlobChunk { .. } => self.group_session,
                other => other.session(),
            };
            if let Op::SessionOpen { session, identity } = &op {
                identities.insert(session.0, identity.clone());
            }
            if self.filter.from_lsn.is_some_and(|f| h.lsn < f) {
                continue;
            }
            if self.filter.since_us.is_some_and(|s| h.time_us < s)
                || self.filter.until_us.is_some_and(|u| h.time_us > u)
            {
                continue;
            }
            if self.filter.session.is_some_and(|s| session != Some(s)) {
                continue;
            }
            let target = op.target();
            if let Some(t) = &self.filter.table
                && target.map(|(table, _)| table) != Some(t.as_str())
            {
                continue;
            }
            if !self.filter.key_matches(target.and_then(|(_, k)| k)) {
                continue;
            }
            let identity = session.and_then(|s| identities.get(&s.0).cloned());
            return Ok(Some(ActivityEntry {
                lsn: h.lsn,
                time: format_time_us(h.time_us),
                time_us: h.time_us,
                epoch: h.epoch,
                session: session.map(|s| s.0),
                identity,
                op: op.kind(),
                table: target.map(|(t, _)| t.to_string()),
                key: target.and_then(|(_, k)| k).map(str::to_string),
                size: value_size(&op),
                detail: detail(&op),
            }));
        }
    }
}

/// Fills in the identities of sessions opened before the scanned range by
/// reading their `session_open` entries (a session's id is that entry's LSN).
fn resolve_identities(
    segments: &[SegmentFile],
    page: &mut [ActivityEntry],
    identities: &mut HashMap<u64, ClientIdentity>,
    last_segment: Option<&Path>,
) -> Result<(), ActivityError> {
    let wanted: BTreeSet<u64> = page
        .iter()
        .filter(|e| e.identity.is_none())
        .filter_map(|e| e.session)
        .filter(|s| *s != SessionId::SYSTEM.0 && !identities.contains_key(s))
        .collect();
    if let (Some(&lo), Some(&hi)) = (wanted.first(), wanted.last()) {
        // Only the wanted LSNs are decoded; the rest is a checksum walk.
        for frame in EntryIter::new(segments.to_vec(), lo, hi) {
            let frame = match frame {
                Ok(f) => f,
                Err(ScanError::Corrupt { path, .. }) if Some(path.as_path()) == last_segment => {
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if !wanted.contains(&frame.header.lsn) {
                continue;
            }
            // A session id that does not point at a session_open entry
            // (pruned segments, or a damaged reference) stays unresolved.
            if let Ok(Op::SessionOpen { session, identity }) = format::decode_op(frame.payload()) {
                identities.insert(session.0, identity);
            }
        }
    }
    for e in page.iter_mut() {
        if e.identity.is_none()
            && let Some(s) = e.session
        {
            e.identity = identities.get(&s).cloned();
        }
    }
    Ok(())
}

fn value_size(op: &Op) -> Option<u64> {
    match op {
        Op::Put { value, .. } => Some(value.len() as u64),
        Op::BlobBegin { size, .. } => Some(*size),
        Op::BlobChunk { bytes } => Some(bytes.len() as u64),
        _ => None,
    }
}

fn detail(op: &Op) -> Option<String> {
    match op {
        Op::DataFileOpen { node, version } => Some(format!("node={node} version={version}")),
        Op::TableCreate { journaled, .. } | Op::TableAlter { journaled, .. } => {
            Some(format!("journaled={journaled}"))
        }
        Op::TxnBegin { ops, .. } => Some(format!("ops={ops}")),
        Op::BackupMarker { number } => Some(format!("backup={number}")),
        Op::RestorePoint { name } => Some(format!("name={name}")),
        _ => None,
    }
}

/// Formats microseconds since the Unix epoch as RFC 3339 UTC.
pub fn format_time_us(time_us: u64) -> String {
    i64::try_from(time_us)
        .ok()
        .and_then(|us| Utc.timestamp_micros(us).single())
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_else(|| format!("@{time_us}us"))
}

/// Parses a time given on the command line or in a query string: RFC 3339
/// (`2026-11-25T10:00:00Z`, any offset), `YYYY-MM-DD HH:MM:SS` or
/// `YYYY-MM-DDTHH:MM:SS` (UTC), or a date `YYYY-MM-DD` (UTC midnight).
/// Returns microseconds since the Unix epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let t: DateTime<Utc> = if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        t.with_timezone(&Utc)
    } else if let Some(t) = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
    {
        t.and_utc()
    } else if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        d.and_hms_opt(0, 0, 0)
            .ok_or_else(|| format!("bad date {s:?}"))?
            .and_utc()
    } else {
        return Err(format!(
            "cannot parse time {s:?}: use RFC 3339 (2026-11-25T10:00:00Z), \"YYYY-MM-DD HH:MM:SS\" (UTC) or YYYY-MM-DD"
        ));
    };
    u64::try_from(t.timestamp_micros()).map_err(|_| format!("time {s:?} is before 1970"))
}

/// `mirrordb journal show`: list journal activity.
#[derive(Clone, Debug, clap::Args)]
pub struct JournalShowArgs {
    /// The node's data directory; the journal is its `journal/` folder.
    #[arg(long, env = "MIRRORDB_DATA_DIR", default_value = crate::config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Read this journal directory instead (an archive, a copy).
    #[arg(long)]
    pub journal_dir: Option<PathBuf>,
    /// First LSN to show (inclusive).
    #[arg(long)]
    pub from_lsn: Option<u64>,
    /// Last LSN to show (inclusive).
    #[arg(long)]
    pub to_lsn: Option<u64>,
    /// Earliest time: RFC 3339, "YYYY-MM-DD HH:MM:SS" (UTC) or YYYY-MM-DD.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<u64>,
    /// Latest time (inclusive), same forms as --since.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<u64>,
    /// Only operations on this table.
    #[arg(long)]
    pub table: Option<String>,
    /// Only operations on this key; a trailing `*` matches a prefix.
    #[arg(long)]
    pub key: Option<String>,
    /// Only operations of this session number.
    #[arg(long)]
    pub session: Option<u64>,
    /// Stop after this many entries (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// JSON lines, one entry per line (with --array: one JSON array).
    #[arg(long)]
    pub json: bool,
    /// With --json, print one JSON array instead of JSON lines.
    #[arg(long, requires = "json")]
    pub array: bool,
    /// Also read the journal archives of this backup destination, so
    /// entries that backups moved out of the live journal are shown.
    #[arg(long)]
    pub backups: Option<PathBuf>,
}

impl JournalShowArgs {
    /// The filter these arguments describe.
    pub fn filter(&self) -> Filter {
        Filter {
            from_lsn: self.from_lsn,
            to_lsn: self.to_lsn,
            since_us: self.since,
            until_us: self.until,
            table: self.table.clone(),
            key: self.key.clone(),
            session: self.session.map(SessionId),
        }
    }

    /// The journal directory these arguments name.
    pub fn journal_dir(&self) -> PathBuf {
        self.journal_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("journal"))
    }
}

/// Runs `mirrordb journal show`, writing to stdout (notes go to stderr).
pub fn run_show(args: JournalShowArgs) -> anyhow::Result<()> {
    let live = args.journal_dir();
    if !live.is_dir() && args.backups.is_none() {
        anyhow::bail!("no journal directory at {}", live.display());
    }
    // With --backups: a scratch view of the archived segments plus the live
    // ones (removed when `view` is dropped), read like a live journal.
    let view = match &args.backups {
        Some(b) => Some(crate::backup::activity::JournalView::build(
            Some(b),
            &live,
            args.from_lsn.unwrap_or(0),
            args.to_lsn.unwrap_or(u64::MAX),
            &std::env::temp_dir(),
        )?),
        None => None,
    };
    let dir = view.as_ref().map_or(live, |v| v.path().to_path_buf());
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let (shown, truncated, notes) = show(&dir, &args, &mut out)?;
    out.flush()?;
    drop(out);
    if let Some(note) = notes.head {
        let hint = if args.backups.is_none() {
            " (add --backups DIR to read a backup destination's archives)"
        } else {
            ""
        };
        eprintln!("note: {note}{hint}");
    }
    if let Some(note) = notes.tail {
        eprintln!("note: {note}");
    }
    if truncated {
        let entries = if shown == 1 { "entry" } else { "entries" };
        eprintln!("note: stopped after {shown} {entries} (--limit)");
    }
    Ok(())
}

/// Renders the matching entries to `out`; returns (entries shown, whether
/// the limit cut the output, the notes).
fn show(
    dir: &Path,
    args: &JournalShowArgs,
    out: &mut impl Write,
) -> anyhow::Result<(usize, bool, ScanNotes)> {
    let limit = if args.limit == 0 {
        usize::MAX
    } else {
        args.limit
    };
    let mut shown = 0usize;
    let mut truncated = false;
    let mut page: Vec<ActivityEntry> = Vec::new();
    let mut io_error: Option<io::Error> = None;
    let mut first = true;
    if args.json && args.array {
        out.write_all(b"[")?;
    }
    let notes = scan_dir(dir, &args.filter(), |e| {
        if shown >= limit {
            truncated = true;
            return Ok(false);
        }
        shown += 1;
        let r = if args.json {
            let sep = if args.array && !first { "," } else { "" };
            first = false;
            serde_json::to_string(&e)
                .map_err(io::Error::other)
                .and_then(|s| {
                    if args.array {
                        write!(out, "{sep}\n{s}")
                    } else {
                        writeln!(out, "{s}")
                    }
                })
        } else {
            page.push(e);
            if page.len() >= TABLE_PAGE_ROWS {
                let r = write_table(out, &page, shown == page.len());
                page.clear();
                r
            } else {
                Ok(())
            }
        };
        match r {
            Ok(()) => Ok(true),
            Err(err) => {
                io_error = Some(err);
                Ok(false)
            }
        }
    })?;
    if let Some(e) = io_error {
        if e.kind() == io::ErrorKind::BrokenPipe {
            return Ok((shown, truncated, notes));
        }
        return Err(e.into());
    }
    if args.json {
        if args.array {
            out.write_all(b"\n]\n")?;
        }
    } else if !page.is_empty() || shown == 0 {
        write_table(out, &page, shown == page.len())?;
    }
    Ok((shown, truncated, notes))
}

/// Who did it, in one column: `12 alice@10.0.0.5:41000/web-1`.
fn who(e: &ActivityEntry) -> String {
    match (e.session, &e.identity) {
        (None, _) => "-".to_string(),
        (Some(0), _) => "0 system".to_string(),
        (Some(s), Some(id)) => format!("{s} {}@{}/{}", id.token_name, id.peer, id.client_session),
        (Some(s), None) => s.to_string(),
    }
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Writes one page of rows as an aligned table (header on the first page).
fn write_table(out: &mut impl Write, rows: &[ActivityEntry], header: bool) -> io::Result<()> {
    struct Row {
        lsn: String,
        time: String,
        epoch: String,
        who: String,
        op: &'static str,
        table: String,
        key: String,
        size: String,
        detail: String,
    }
    let rows: Vec<Row> = rows
        .iter()
        .map(|e| Row {
            lsn: e.lsn.to_string(),
            time: e.time.clone(),
            epoch: e.epoch.to_string(),
            who: cut(&who(e), WHO_COL_MAX),
            op: e.op,
            table: cut(e.table.as_deref().unwrap_or("-"), TABLE_COL_MAX),
            key: cut(e.key.as_deref().unwrap_or("-"), KEY_COL_MAX),
            size: e.size.map_or_else(|| "-".to_string(), |s| s.to_string()),
            detail: e.detail.clone().unwrap_or_default(),
        })
        .collect();
    let w = |title: &str, f: &dyn Fn(&Row) -> usize| {
        rows.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let (wl, wt, we, ww, wo, wtab, wk, ws) = (
        w("LSN", &|r| r.lsn.len()),
        w("TIME", &|r| r.time.len()),
        w("EPOCH", &|r| r.epoch.len()),
        w("SESSION", &|r| r.who.chars().count()),
        w("OP", &|r| r.op.len()),
        w("TABLE", &|r| r.table.chars().count()),
        w("KEY", &|r| r.key.chars().count()),
        w("SIZE", &|r| r.size.len()),
    );
    if header {
        writeln!(
            out,
            "{:>wl$}  {:<wt$}  {:>we$}  {:<ww$}  {:<wo$}  {:<wtab$}  {:<wk$}  {:>ws$}  DETAIL",
            "LSN", "TIME", "EPOCH", "SESSION", "OP", "TABLE", "KEY", "SIZE"
        )?;
    }
    for r in &rows {
        let line = format!(
            "{:>wl$}  {:<wt$}  {:>we$}  {:<ww$}  {:<wo$}  {:<wtab$}  {:<wk$}  {:>ws$}  {}",
            r.lsn, r.time, r.epoch, r.who, r.op, r.table, r.key, r.size, r.detail
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::format::{SegmentHeader, encode_frame, encode_op};
    use std::fs;

    const T0: u64 = 1_764_000_000_000_000; // 2025-11-24T16:00:00Z

    fn ident(name: &str) -> ClientIdentity {
        ClientIdentity {
            token_name: name.into(),
            peer: "127.0.0.1:5000".into(),
            client_session: format!("{name}-s"),
        }
    }

    fn put(session: u64, table: &str, key: &str) -> Op {
        Op::Put {
            session: SessionId(session),
            table: table.into(),
            key: key.into(),
            value: br#"{"v":1}"#.to_vec(),
        }
    }

    /// Writes `ops` as entries 1..=n, one entry per second from `T0`, split
    /// into segments that start at the LSNs in `splits`.
    fn write_journal(dir: &Path, ops: &[Op], splits: &[u64]) {
        fs::create_dir_all(dir).expect("mkdir");
        let mut starts = vec![1u64];
        starts.extend_from_slice(splits);
        for (i, &first) in starts.iter().enumerate() {
            let end = starts.get(i + 1).copied().unwrap_or(ops.len() as u64 + 1);
            let mut buf = SegmentHeader {
                db_id: [9; 16],
                epoch: 1,
                first_lsn: first,
                created_us: T0,
            }
            .encode()
            .to_vec();
            for lsn in first..end {
                let op = &ops[(lsn - 1) as usize];
                encode_frame(&mut buf, lsn, 1, T0 + (lsn - 1) * 1_000_000, &encode_op(op));
            }
            fs::write(dir.join(scan::segment_name(first)), buf).expect("write segment");
        }
    }

    /// 1 datafile_open, 2 session_open(alice), 3 put users/a, 4 session_open(bob),
    /// 5 txn_begin(bob), 6 put users/b, 7 put orders/o1, 8 txn_commit,
    /// 9 delete users/a (alice), 10 restore_point, 11 put users/ab (alice),
    /// 12 session_close(alice)
    fn sample() -> Vec<Op> {
        vec![
            Op::DataFileOpen {
                node: "n1".into(),
                version: "0.1.0".into(),
            },
            Op::SessionOpen {
                session: SessionId(2),
                identity: ident("alice"),
            },
            put(2, "users", "a"),
            Op::SessionOpen {
                session: SessionId(4),
                identity: ident("bob"),
            },
            Op::TxnBegin {
                session: SessionId(4),
                ops: 2,
            },
            put(4, "users", "b"),
            put(4, "orders", "o1"),
            Op::TxnCommit,
            Op::Delete {
                session: SessionId(2),
                table: "users".into(),
                key: "a".into(),
            },
            Op::RestorePoint {
                name: "before-import".into(),
            },
            put(2, "users", "ab"),
            Op::SessionClose {
                session: SessionId(2),
            },
        ]
    }

    fn lsns(dir: &Path, f: &Filter) -> Vec<u64> {
        query(dir, f, 100)
            .expect("query")
            .entries
            .iter()
            .map(|e| e.lsn)
            .collect()
    }

    fn journal() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("journal");
        write_journal(&dir, &sample(), &[5, 9]);
        (tmp, dir)
    }

    #[test]
    fn no_filter_lists_everything_across_segments() {
        let (_t, dir) = journal();
        let out = query(&dir, &Filter::default(), 100).expect("query");
        assert_eq!(out.entries.len(), 12);
        assert!(!out.truncated);
        assert_eq!(out.tail_note, None);
        let e = &out.entries[2];
        assert_eq!(e.op, "put");
        assert_eq!(e.table.as_deref(), Some("users"));
        assert_eq!(e.key.as_deref(), Some("a"));
        assert_eq!(e.size, Some(7));
        assert_eq!(e.epoch, 1);
        assert_eq!(e.time, "2025-11-24T16:00:02.000000Z");
        assert_eq!(e.identity, Some(ident("alice")));
        assert_eq!(out.entries[9].detail.as_deref(), Some("name=before-import"));
    }

    #[test]
    fn lsn_range_filters() {
        let (_t, dir) = journal();
        let f = Filter {
            from_lsn: Some(4),
            to_lsn: Some(9),
            ..Filter::default()
        };
        assert_eq!(lsns(&dir, &f), vec![4, 5, 6, 7, 8, 9]);
        let f = Filter {
            from_lsn: Some(11),
            ..Filter::default()
        };
        assert_eq!(lsns(&dir, &f), vec![11, 12]);
        let bad = Filter {
            from_lsn: Some(5),
            to_lsn: Some(4),
            ..Filter::default()
        };
        assert!(matches!(
            query(&dir, &bad, 10),
            Err(ActivityError::InvalidFilter(_))
        ));
    }

    #[test]
    fn time_range_filters() {
        let (_t, dir) = journal();
        // Entry n is at T0 + (n-1) s.
        let f = Filter {
            since_us: Some(T0 + 2_000_000),
            until_us: Some(T0 + 4_500_000),
            ..Filter::default()
        };
        assert_eq!(lsns(&dir, &f), vec![3, 4, 5]);
    }

    #[test]
    fn table_and_key_filters() {
        let (_t, dir) = journal();
        let f = Filter {
            table: Some("users".into()),
            ..Filter::default()
        };
        assert_eq!(lsns(&dir, &f), vec![3, 6, 9, 11]);
        let f = Filter {
            table: Some("users".into()),
            key: Some("a".into()),
            ..Filter::default()
        };
        assert_eq!(lsns(&dir, &f), vec![3, 9]);
        let f = Filter {
            key: Some("a*".into()),
            ..Filter::default()
        };
        assert_eq!(lsns(&dir, &f), vec![3, 9, 11]);
        let f = Filter {
            table: Some("orders".into()),
            ..Filter::default()
        };
        assert_eq!(lsns(&dir, &f), vec![7]);
    }

    #[test]
    fn session_filter_follows_transactions() {
        let (_t, dir) = journal();
        let f = Filter {
            session: Some(SessionId(4)),
            ..Filter::default()
        };
        // session_open, txn_begin, two puts and the commit (which carries no
        // session itself).
        assert_eq!(lsns(&dir, &f), vec![4, 5, 6, 7, 8]);
        let f = Filter {
            session: Some(SessionId(2)),
            ..Filter::default()
        };
        assert_eq!(lsns(&dir, &f), vec![2, 3, 9, 11, 12]);
    }

    #[test]
    fn identities_resolve_for_sessions_opened_before_the_range() {
        let (_t, dir) = journal();
        let f = Filter {
            from_lsn: Some(9),
            ..Filter::default()
        };
        let out = query(&dir, &f, 100).expect("query");
        let by_lsn: HashMap<u64, &ActivityEntry> = out.entries.iter().map(|e| (e.lsn, e)).collect();
        assert_eq!(by_lsn[&9].identity, Some(ident("alice")));
        assert_eq!(by_lsn[&11].identity, Some(ident("alice")));
        assert_eq!(by_lsn[&10].identity, None);
        let f = Filter {
            from_lsn: Some(6),
            to_lsn: Some(8),
            ..Filter::default()
        };
        let out = query(&dir, &f, 100).expect("query");
        assert!(out.entries.iter().all(|e| e.identity == Some(ident("bob"))));
    }

    #[test]
    fn limit_truncates() {
        let (_t, dir) = journal();
        let out = query(&dir, &Filter::default(), 3).expect("query");
        assert_eq!(
            out.entries.iter().map(|e| e.lsn).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(out.truncated);
    }

    #[test]
    fn partial_last_frame_is_the_end_not_an_error() {
        let (_t, dir) = journal();
        let last = dir.join(scan::segment_name(9));
        let mut bytes = fs::read(&last).expect("read");
        let mut extra = Vec::new();
        encode_frame(
            &mut extra,
            13,
            1,
            T0 + 12_000_000,
            &encode_op(&put(2, "users", "z")),
        );
        // Every cut of the 13th frame, from one byte to all but one.
        for keep in 1..extra.len() {
            let mut b = bytes.clone();
            b.extend_from_slice(&extra[..keep]);
            fs::write(&last, &b).expect("write");
            let out = query(&dir, &Filter::default(), 100).expect("query");
            assert_eq!(out.entries.len(), 12, "cut at {keep}");
            assert!(out.tail_note.is_some());
        }
        bytes.extend_from_slice(&extra);
        fs::write(&last, &bytes).expect("write");
        let out = query(&dir, &Filter::default(), 100).expect("query");
        assert_eq!(out.entries.len(), 13);
        assert_eq!(out.tail_note, None);
    }

    #[test]
    fn damage_in_an_older_segment_is_an_error() {
        let (_t, dir) = journal();
        let first = dir.join(scan::segment_name(1));
        let mut bytes = fs::read(&first).expect("read");
        let n = bytes.len();
        bytes[n - 2] ^= 0xff;
        fs::write(&first, &bytes).expect("write");
        assert!(matches!(
            query(&dir, &Filter::default(), 100),
            Err(ActivityError::Scan(ScanError::Corrupt { .. }))
        ));
    }

    #[test]
    fn garbage_payload_with_valid_crc_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("journal");
        fs::create_dir_all(&dir).expect("mkdir");
        let mut buf = SegmentHeader {
            db_id: [1; 16],
            epoch: 1,
            first_lsn: 1,
            created_us: 0,
        }
        .encode()
        .to_vec();
        encode_frame(&mut buf, 1, 1, 0, &[0xff, 0xff, 0xff, 0xff, 0x0f]);
        fs::write(dir.join(scan::segment_name(1)), buf).expect("write");
        assert!(matches!(
            query(&dir, &Filter::default(), 10),
            Err(ActivityError::Decode { lsn: 1, .. })
        ));
    }

    #[test]
    fn missing_or_empty_journal_is_empty() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = query(&tmp.path().join("nope"), &Filter::default(), 10).expect("query");
        assert!(out.entries.is_empty());
    }

    #[test]
    fn http_query_strings_become_filters() {
        let q: JournalQuery = serde_json::from_value(serde_json::json!({
            "from_lsn": 3, "since": "2025-11-24T16:00:00Z", "table": "users", "session": 2, "limit": 5
        }))
        .expect("query");
        let (f, limit) = q.filter().expect("filter");
        assert_eq!(limit, 5);
        assert_eq!(f.since_us, Some(T0));
        assert_eq!(f.session, Some(SessionId(2)));
        let (_, limit) = JournalQuery::default().filter().expect("filter");
        assert_eq!(limit, DEFAULT_QUERY_LIMIT);
        let bad_time = JournalQuery {
            until: Some("noon".into()),
            ..JournalQuery::default()
        };
        assert!(bad_time.filter().is_err());
        let bad_limit = JournalQuery {
            limit: Some(0),
            ..JournalQuery::default()
        };
        assert!(bad_limit.filter().is_err());
        assert!(serde_json::from_value::<JournalQuery>(serde_json::json!({"tabel": "x"})).is_err());
    }

    #[test]
    fn times_parse_in_every_documented_form() {
        assert_eq!(parse_time("2025-11-24T16:00:00Z"), Ok(T0));
        assert_eq!(parse_time("2025-11-24T17:00:00+01:00"), Ok(T0));
        assert_eq!(parse_time("2025-11-24 16:00:00"), Ok(T0));
        assert_eq!(parse_time("2025-11-24T16:00:00.5"), Ok(T0 + 500_000));
        assert_eq!(parse_time("2025-11-24"), Ok(T0 - 16 * 3_600_000_000));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("1969-12-31").is_err());
        assert_eq!(format_time_us(T0), "2025-11-24T16:00:00.000000Z");
    }

    #[test]
    fn a_journal_that_starts_late_says_where() {
        let n = head_note(Some(40006), None, None).unwrap();
        assert!(
            n.starts_with(
                "the journal read here starts at LSN 40006: entries 1..=40005 are not in it"
            ),
            "{n}"
        );
        let n = head_note(Some(40006), Some(100), None).unwrap();
        assert!(n.contains("entries 100..=40005 "), "{n}");
        // Only what was asked for is said to be missing.
        let n = head_note(Some(40006), Some(100), Some(200)).unwrap();
        assert!(n.contains("entries 100..=200 "), "{n}");
        assert_eq!(head_note(Some(1), None, None), None);
        assert_eq!(head_note(Some(1), Some(0), None), None);
        assert_eq!(head_note(Some(100), Some(150), None), None);
        assert_eq!(head_note(None, Some(5), None), None);
    }

    #[test]
    fn show_renders_table_and_json() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            show: JournalShowArgs,
        }
        let (tmp, dir) = journal();
        let data = tmp.path().to_str().expect("utf-8 path");
        let cli = Cli::try_parse_from([
            "x",
            "--data-dir",
            data,
            "--table",
            "users",
            "--since",
            "2025-11-24T16:00:02Z",
        ])
        .expect("parse");
        assert_eq!(cli.show.journal_dir(), dir);
        let mut out = Vec::new();
        let (n, truncated, _) = show(&dir, &cli.show, &mut out).expect("show");
        assert_eq!((n, truncated), (4, false));
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("LSN"));
        assert!(
            lines[1].contains("2 alice@127.0.0.1:5000/alice-s"),
            "{text}"
        );
        // Aligned: the OP column starts at the same place in every row.
        let col = lines[0].find("OP").expect("OP column");
        assert!(
            lines[1..]
                .iter()
                .all(|l| l[col..].starts_with("put") || l[col..].starts_with("delete"))
        );

        let cli = Cli::try_parse_from(["x", "--data-dir", data, "--json", "--limit", "2"])
            .expect("parse");
        let mut out = Vec::new();
        let (n, truncated, _) = show(&dir, &cli.show, &mut out).expect("show");
        assert_eq!((n, truncated), (2, true));
        let text = String::from_utf8(out).expect("utf-8");
        let v: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1]["op"], "session_open");
        assert_eq!(v[1]["identity"]["token_name"], "alice");

        let cli =
            Cli::try_parse_from(["x", "--data-dir", data, "--json", "--array"]).expect("parse");
        let mut out = Vec::new();
        show(&dir, &cli.show, &mut out).expect("show");
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out).expect("json array");
        assert_eq!(v.len(), 12);
        assert!(Cli::try_parse_from(["x", "--array"]).is_err());
        assert!(Cli::try_parse_from(["x", "--since", "soon"]).is_err());
    }
}
