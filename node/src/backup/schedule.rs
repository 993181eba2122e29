//! The backup scheduler, without I/O: schedules parsed from the config, the
//! next due time, missed runs, retries and the pause after the last failed
//! attempt. Time is passed in; the async driver in `run.rs` owns the clock.
//!
//! ```text
//! start(now, last scheduled attempt, paused) ──► Missed{t} for every due time
//!                                                 in between (node was down)
//! poll(now) ──► Run{t, attempt}   when a due time or a retry time has come
//! finished(now, ok) ──► ok: next due time | failed: retry after `retry_after`,
//!                       after `max_attempts` failures: paused
//! resume() (a manual backup succeeded) ──► automatic backups go on
//! ```
//!
//! Schedules (times are UTC):
//! `every 6h` (at multiples of 6 hours since 1970-01-01T00:00Z),
//! `daily at 02:30`, `weekly on mon,thu at 02:30`, `monthly on 1 at 03:00`
//! (a day past the month's end means its last day).

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use std::fmt;
use std::str::FromStr;

/// Most missed runs reported at start (older ones are summarised).
pub const MAX_MISSED_REPORTED: usize = 16;

/// One schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    EveryHours(u32),
    Daily(NaiveTime),
    Weekly(Vec<Weekday>, NaiveTime),
    Monthly(u32, NaiveTime),
}

fn parse_hhmm(s: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(s, "%H:%M").map_err(|_| format!("{s:?} is not a time HH:MM"))
}

fn parse_weekday(s: &str) -> Result<Weekday, String> {
    Weekday::from_str(s).map_err(|_| format!("{s:?} is not a day of the week (mon, tue, …)"))
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Schedule, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let bad = || {
            format!(
                "invalid schedule {s:?}: expected \"every 6h\", \"daily at 02:30\", \"weekly on mon,thu at 02:30\" or \"monthly on 1 at 03:00\""
            )
        };
        match words.as_slice() {
            ["every", n] => {
                let h: u32 = n
                    .strip_suffix('h')
                    .and_then(|d| d.parse().ok())
                    .ok_or_else(bad)?;
                if !(1..=24 * 31).contains(&h) {
                    return Err(format!("{s:?}: every N hours needs 1 <= N <= 744"));
                }
                Ok(Schedule::EveryHours(h))
            }
            ["daily", "at", t] => Ok(Schedule::Daily(parse_hhmm(t)?)),
            ["weekly", "on", days, "at", t] => {
                let mut ds = Vec::new();
                for d in days.split(',') {
                    let d = parse_weekday(d)?;
                    if !ds.contains(&d) {
                        ds.push(d);
                    }
                }
                Ok(Schedule::Weekly(ds, parse_hhmm(t)?))
            }
            ["monthly", "on", day, "at", t] => {
                let d: u32 = day.parse().map_err(|_| bad())?;
                if !(1..=31).contains(&d) {
                    return Err(format!("{s:?}: the day of the month must be 1..=31"));
                }
                Ok(Schedule::Monthly(d, parse_hhmm(t)?))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = |t: &NaiveTime| t.format("%H:%M").to_string();
        match self {
            Schedule::EveryHours(h) => write!(f, "every {h}h"),
            Schedule::Daily(x) => write!(f, "daily at {}", t(x)),
            Schedule::Weekly(days, x) => {
                let d: Vec<String> = days
                    .iter()
                    .map(|d| d.to_string().to_ascii_lowercase())
                    .collect();
                write!(f, "weekly on {} at {}", d.join(","), t(x))
            }
            Schedule::Monthly(d, x) => write!(f, "monthly on {d} at {}", t(x)),
        }
    }
}

fn at(date: NaiveDate, t: NaiveTime) -> DateTime<Utc> {
    Utc.from_utc_datetime(&date.and_time(t))
}

fn last_day_of_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    NaiveDate::from_ymd_opt(ny, nm, 1)
        .and_then(|d| d.pred_opt())
        .map(|d| d.day())
        .unwrap_or(28)
}

impl Schedule {
    /// The first due time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Schedule::EveryHours(h) => {
                let step = i64::from(*h) * 3600;
                let s = t.timestamp();
                let next = (s.div_euclid(step) + 1) * step;
                Utc.timestamp_opt(next, 0)
                    .single()
                    .unwrap_or(t + Duration::hours(1))
            }
            Schedule::Daily(x) => {
                let today = at(t.date_naive(), *x);
                if today > t {
                    today
                } else {
                    today + Duration::days(1)
                }
            }
            Schedule::Weekly(days, x) => (0..=7)
                .map(|i| at(t.date_naive() + Duration::days(i), *x))
                .find(|c| *c > t && days.contains(&c.weekday()))
                .unwrap_or(t + Duration::days(7)),
            Schedule::Monthly(d, x) => {
                let (mut y, mut m) = (t.year(), t.month());
                for _ in 0..3 {
                    let day = (*d).min(last_day_of_month(y, m));
                    if let Some(date) = NaiveDate::from_ymd_opt(y, m, day) {
                        let c = at(date, *x);
                        if c > t {
                            return c;
                        }
                    }
                    if m == 12 {
                        y += 1;
                        m = 1;
                    } else {
                        m += 1;
                    }
                }
                t + Duration::days(31)
            }
        }
    }
}

/// What the scheduler asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a scheduled backup (attempt 1) or a retry (2..).
    Run {
        scheduled: DateTime<Utc>,
        attempt: u32,
    },
}

/// A scheduled time that passed while the node was down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missed {
    pub scheduled: DateTime<Utc>,
}

/// The scheduler's state.
#[derive(Clone, Debug)]
pub struct Scheduler {
    schedules: Vec<Schedule>,
    retry_after: Duration,
    max_attempts: u32,
    next_due: Option<DateTime<Utc>>,
    /// The run in progress or being retried: its due time and attempt.
    current: Option<(DateTime<Utc>, u32)>,
    retry_at: Option<DateTime<Utc>>,
    running: bool,
    paused: bool,
}

impl Scheduler {
    pub fn new(
        schedules: Vec<Schedule>,
        retry_after: std::time::Duration,
        max_attempts: u32,
    ) -> Self {
        Scheduler {
            schedules,
            retry_after: Duration::from_std(retry_after).unwrap_or(Duration::minutes(5)),
            max_attempts: max_attempts.max(1),
            next_due: None,
            current: None,
            retry_at: None,
            running: false,
            paused: false,
        }
    }

    fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedules.iter().map(|s| s.next_after(t)).min()
    }

    /// Starts at `now`. `last_attempt` is the due time of the last scheduled
    /// (or missed) backup recorded; every due time after it and before
    /// `now` was missed. Returns the missed times, newest last, at most
    /// [`MAX_MISSED_REPORTED`].
    pub fn start(
        &mut self,
        now: DateTime<Utc>,
        last_attempt: Option<DateTime<Utc>>,
        paused: bool,
    ) -> Vec<Missed> {
        self.paused = paused;
        let mut missed = Vec::new();
        if let Some(last) = last_attempt {
            let mut t = last;
            while let Some(n) = self.next_after(t) {
                if n > now {
                    break;
                }
                missed.push(Missed { scheduled: n });
                t = n;
                if missed.len() > 10_000 {
                    break;
                }
            }
        }
        if missed.len() > MAX_MISSED_REPORTED {
            missed.drain(..missed.len() - MAX_MISSED_REPORTED);
        }
        self.next_due = self.next_after(now);
        missed
    }

    /// Whether automatic backups are paused.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The next time the driver should call [`poll`](Self::poll).
    pub fn next_wakeup(&self) -> Option<DateTime<Utc>> {
        if self.running {
            return None;
        }
        match (self.retry_at, self.next_due) {
            (Some(r), Some(n)) => Some(r.min(n)),
            (r, n) => r.or(n),
        }
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: DateTime<Utc>) -> Option<Action> {
        if self.running {
            return None;
        }
        if let Some(r) = self.retry_at
            && r <= now
        {
            self.retry_at = None;
            if let Some((scheduled, attempt)) = self.current {
                let attempt = attempt + 1;
                self.current = Some((scheduled, attempt));
                self.running = true;
                return Some(Action::Run { scheduled, attempt });
            }
        }
        let due = self.next_due?;
        if due > now {
            return None;
        }
        // Skip due times the node slept through while running (a suspended
        // VM): run once for the latest.
        let mut scheduled = due;
        while let Some(n) = self.next_after(scheduled) {
            if n > now {
                break;
            }
            scheduled = n;
        }
        self.next_due = self.next_after(now);
        if self.paused {
            return None;
        }
        self.retry_at = None;
        self.current = Some((scheduled, 1));
        self.running = true;
        Some(Action::Run {
            scheduled,
            attempt: 1,
        })
    }

    /// The run that `poll` started ended at `now`. Returns `true` when this
    /// failure was the last attempt and automatic backups are now paused.
    pub fn finished(&mut self, now: DateTime<Utc>, ok: bool) -> bool {
        self.running = false;
        if ok {
            self.current = None;
            self.retry_at = None;
            return false;
        }
        let attempt = self.current.map(|c| c.1).unwrap_or(self.max_attempts);
        if attempt >= self.max_attempts {
            self.current = None;
            self.retry_at = None;
            self.paused = true;
            return true;
        }
        self.retry_at = Some(now + self.retry_after);
        false
    }

    /// A manual backup succeeded: automatic backups go on.
    pub fn resume(&mut self) {
        self.paused = false;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_errs_and_due_times_move_forward(
            text in "\\PC{0,40}",
            h in 1u32..=744, hh in 0u32..24, mm in 0u32..60, day in 1u32..=31,
            secs in 0i64..4_000_000_000,
        ) {
            let _ = text.parse::<Schedule>();
            let t = Utc.timestamp_opt(secs, 0).single().unwrap();
            let at = NaiveTime::from_hms_opt(hh, mm, 0).unwrap();
            for s in [
                Schedule::EveryHours(h),
                Schedule::Daily(at),
                Schedule::Weekly(vec![Weekday::Sun, Weekday::Wed], at),
                Schedule::Monthly(day, at),
            ] {
                let n = s.next_after(t);
                proptest::prop_assert!(n > t, "{s} after {t} gave {n}");
                proptest::prop_assert!(n - t <= Duration::days(32), "{s} after {t} gave {n}");
                proptest::prop_assert_eq!(s.to_string().parse::<Schedule>().unwrap(), s);
            }
        }
    }

    #[test]
    fn schedules_parse_and_print() {
        for s in [
            "every 6h",
            "daily at 02:30",
            "weekly on mon,thu at 02:30",
            "monthly on 31 at 03:00",
        ] {
            assert_eq!(s.parse::<Schedule>().unwrap().to_string(), s);
        }
        for bad in [
            "",
            "every",
            "every 0h",
            "every 6",
            "daily 02:30",
            "daily at 25:00",
            "weekly on xyz at 01:00",
            "monthly on 32 at 01:00",
        ] {
            assert!(bad.parse::<Schedule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn next_due_times() {
        let s: Schedule = "every 6h".parse().unwrap();
        assert_eq!(
            s.next_after(t("2026-11-25T05:59:00Z")),
            t("2026-11-25T06:00:00Z")
        );
        assert_eq!(
            s.next_after(t("2026-11-25T06:00:00Z")),
            t("2026-11-25T12:00:00Z")
        );
        let s: Schedule = "daily at 02:30".parse().unwrap();
        assert_eq!(
            s.next_after(t("2026-11-25T02:00:00Z")),
            t("2026-11-25T02:30:00Z")
        );
        assert_eq!(
            s.next_after(t("2026-11-25T02:30:00Z")),
            t("2026-11-26T02:30:00Z")
        );
        // 2026-11-25 is a Wednesday.
        let s: Schedule = "weekly on mon,thu at 01:00".parse().unwrap();
        assert_eq!(
            s.next_after(t("2026-11-25T12:00:00Z")),
            t("2026-11-26T01:00:00Z")
        );
        assert_eq!(
            s.next_after(t("2026-11-26T01:00:00Z")),
            t("2026-11-30T01:00:00Z")
        );
        let s: Schedule = "monthly on 31 at 03:00".parse().unwrap();
        assert_eq!(
            s.next_after(t("2026-11-25T00:00:00Z")),
            t("2026-11-30T03:00:00Z")
        );
        assert_eq!(
            s.next_after(t("2026-11-30T03:00:00Z")),
            t("2026-12-31T03:00:00Z")
        );
        assert_eq!(
            s.next_after(t("2027-01-31T04:00:00Z")),
            t("2027-02-28T03:00:00Z")
        );
    }

    #[test]
    fn runs_retries_and_pauses() {
        let mut s = Scheduler::new(
            vec!["daily at 02:00".parse().unwrap()],
            std::time::Duration::from_secs(600),
            2,
        );
        assert!(s.start(t("2026-11-25T01:00:00Z"), None, false).is_empty());
        assert_eq!(s.poll(t("2026-11-25T01:59:00Z")), None);
        assert_eq!(
            s.poll(t("2026-11-25T02:00:01Z")),
            Some(Action::Run {
                scheduled: t("2026-11-25T02:00:00Z"),
                attempt: 1
            })
        );
        assert_eq!(s.poll(t("2026-11-25T02:00:02Z")), None, "one at a time");
        assert!(!s.finished(t("2026-11-25T02:01:00Z"), false));
        assert_eq!(s.next_wakeup(), Some(t("2026-11-25T02:11:00Z")));
        assert_eq!(s.poll(t("2026-11-25T02:05:00Z")), None);
        assert_eq!(
            s.poll(t("2026-11-25T02:11:00Z")),
            Some(Action::Run {
                scheduled: t("2026-11-25T02:00:00Z"),
                attempt: 2
            })
        );
        assert!(s.finished(t("2026-11-25T02:12:00Z"), false), "last attempt");
        assert!(s.paused());
        assert_eq!(s.poll(t("2026-11-26T02:00:00Z")), None, "paused");
        s.resume();
        assert!(matches!(
            s.poll(t("2026-11-27T02:00:00Z")),
            Some(Action::Run { attempt: 1, .. })
        ));
        s.finished(t("2026-11-27T02:01:00Z"), true);
        assert_eq!(s.next_wakeup(), Some(t("2026-11-28T02:00:00Z")));
    }

    #[test]
    fn missed_runs_are_reported_at_start() {
        let mut s = Scheduler::new(
            vec!["daily at 02:00".parse().unwrap()],
            std::time::Duration::from_secs(60),
            3,
        );
        let missed = s.start(
            t("2026-11-28T03:00:00Z"),
            Some(t("2026-11-25T02:00:00Z")),
            false,
        );
        assert_eq!(
            missed.iter().map(|m| m.scheduled).collect::<Vec<_>>(),
            [
                t("2026-11-26T02:00:00Z"),
                t("2026-11-27T02:00:00Z"),
                t("2026-11-28T02:00:00Z")
            ]
        );
        assert_eq!(s.next_wakeup(), Some(t("2026-11-29T02:00:00Z")));
        // Nothing missed when the last attempt is recent.
        let mut s2 = Scheduler::new(
            vec![Schedule::EveryHours(1)],
            std::time::Duration::from_secs(60),
            1,
        );
        assert!(
            s2.start(
                t("2026-11-25T01:30:00Z"),
                Some(t("2026-11-25T01:00:00Z")),
                false
            )
            .is_empty()
        );
    }
}
