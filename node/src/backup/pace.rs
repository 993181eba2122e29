//! Pacing of a backup's compression while clients write
//! (`backup.max_rate_while_writing`).
//!
//! On two cores a backup's CPU is the writers' CPU, whatever its
//! scheduling class: a `SCHED_IDLE` busy loop beside 32 writing clients
//! cost them 27–35 % on the VM of BENCHMARKS.md's "Paced while clients
//! write". The snapshot is read at full speed (what waits goes to the
//! spool, so the snapshot and the pages it pins are released early), and
//! compression, the costly part, is what waits: while the journal has grown
//! in the last [`BUSY_WINDOW`], each chunk starts no sooner than the bytes
//! before it allow at the configured rate; while nothing is written it runs
//! at full speed, so a backup of an idle node takes no longer.
//!
//! ```text
//! position moved within BUSY_WINDOW?  no  → go now (no debt is kept)
//!                                     yes → start = max(next, now); next = start + bytes / rate; sleep until start
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long after the journal last grew the node still counts as written to.
pub const BUSY_WINDOW: Duration = Duration::from_millis(500);
/// Shorter waits are not slept but carried to the next call (a sleep costs
/// more than that, and small items would otherwise never wait).
const MIN_SLEEP: Duration = Duration::from_millis(1);
/// A long wait is slept in slices of this, looking at the stop flag between.
const SLICE: Duration = Duration::from_millis(50);
/// Bytes gathered before the clock and the position are read again (the
/// journal archive calls [`Pace::wait`] once per frame of a few hundred bytes).
const STEP: usize = 64 << 10;

/// The node's position (its applied LSN): when it moves, clients write.
pub type Position = Box<dyn Fn() -> u64 + Send>;

/// Spaces the bytes given to [`Pace::wait`] at most `rate` per second while
/// the [`Position`] moves.
pub struct Pace {
    /// Bytes per second; 0: never waits.
    rate: u64,
    position: Option<Position>,
    /// The position last seen, and until when it counts as moving.
    seen: u64,
    busy_until: Option<Instant>,
    /// When the next bytes may start.
    next: Instant,
    stop: Option<Arc<AtomicBool>>,
    waited: Duration,
    /// Where the waits are added up too, in µs, for the backup's progress
    /// (the snapshot's and the archive's paces share one).
    shared: Option<Arc<AtomicU64>>,
    /// Bytes given to [`Pace::wait`] and not yet counted ([`STEP`]).
    gathered: usize,
}

impl Pace {
    /// A pace that never waits.
    pub fn off() -> Pace {
        Pace {
            rate: 0,
            position: None,
            seen: 0,
            busy_until: None,
            next: Instant::now(),
            stop: None,
            waited: Duration::ZERO,
            shared: None,
            gathered: 0,
        }
    }

    /// Adds every wait to `total` (µs) as well, as it ends.
    pub fn counting_into(mut self, total: Arc<AtomicU64>) -> Pace {
        self.shared = Some(total);
        self
    }

    /// At most `rate` bytes per second while `position` moves (`rate` 0:
    /// never waits). A wait ends early once `stop` is set.
    pub fn new(rate: u64, position: Position, stop: Option<Arc<AtomicBool>>) -> Pace {
        let seen = position();
        Pace {
            rate,
            position: Some(position),
            seen,
            stop,
            ..Pace::off()
        }
    }

    /// How long `bytes` must wait at `now`; records them as started then.
    fn delay(&mut self, bytes: usize, now: Instant) -> Duration {
        let Some(position) = &self.position else {
            return Duration::ZERO;
        };
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let p = position();
        if p != self.seen {
            self.seen = p;
            self.busy_until = Some(now + BUSY_WINDOW);
        }
        if self.busy_until.is_none_or(|t| now >= t) {
            // Idle: full speed, and no debt from a busy spell before.
            self.next = now;
            return Duration::ZERO;
        }
        let start = self.next.max(now);
        self.next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        start - now
    }

    /// Waits until `bytes` may be processed. Bytes are counted [`STEP`] at a
    /// time: smaller calls add up first.
    pub fn wait(&mut self, bytes: usize) {
        self.gathered += bytes;
        if self.gathered < STEP {
            return;
        }
        let bytes = std::mem::take(&mut self.gathered);
        let d = self.delay(bytes, Instant::now());
        if d < MIN_SLEEP {
            return;
        }
        let began = Instant::now();
        let end = began + d;
        loop {
            if self
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Acquire))
            {
                break;
            }
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(SLICE));
        }
        let waited = began.elapsed();
        self.waited += waited;
        if let Some(total) = &self.shared {
            total.fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// The time spent waiting so far.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn pace(rate: u64) -> (Pace, Arc<AtomicU64>) {
        let lsn = Arc::new(AtomicU64::new(10));
        let l = lsn.clone();
        (
            Pace::new(rate, Box::new(move || l.load(Ordering::Relaxed)), None),
            lsn,
        )
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn waits_add_up_in_a_shared_total() {
        let total = Arc::new(AtomicU64::new(0));
        let (p, lsn) = pace(64 * MIB as u64);
        let mut p = p.counting_into(total.clone());
        let l = lsn.clone();
        let mut q = Pace::new(
            64 * MIB as u64,
            Box::new(move || l.load(Ordering::Relaxed)),
            None,
        )
        .counting_into(total.clone());
        lsn.store(11, Ordering::Relaxed);
        // The second MiB of each waits ~16 ms at 64 MiB/s.
        for pace in [&mut p, &mut q] {
            pace.wait(MIB);
            pace.wait(MIB);
        }
        let waited = (p.waited() + q.waited()).as_micros() as u64;
        let shared = total.load(Ordering::Relaxed);
        assert!(p.waited() > Duration::ZERO && q.waited() > Duration::ZERO);
        // Each wait is added in whole µs.
        assert!(
            shared <= waited && shared + 2 >= waited,
            "{shared} µs of {waited}"
        );
    }

    #[test]
    fn an_idle_node_is_never_waited_for() {
        let (mut p, _) = pace(MIB as u64);
        let t = Instant::now();
        for i in 0..100 {
            assert_eq!(p.delay(MIB, t + Duration::from_millis(i)), Duration::ZERO);
        }
    }

    #[test]
    fn while_the_position_moves_bytes_are_spaced_at_the_rate() {
        let (mut p, lsn) = pace(4 * MIB as u64);
        let t = Instant::now();
        lsn.store(11, Ordering::Relaxed);
        // Four 1 MiB chunks at 4 MiB/s: each starts 250 ms after the one before.
        let waits: Vec<_> = (0..4).map(|_| p.delay(MIB, t)).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(waits, vec![ms(0), ms(250), ms(500), ms(750)]);
        // Time that passed counts: a chunk due at 1 s asked at 1.1 s goes at once.
        lsn.store(12, Ordering::Relaxed);
        assert_eq!(p.delay(MIB, t + ms(1100)), Duration::ZERO);
        assert_eq!(p.delay(MIB, t + ms(1100)), ms(250));
    }

    #[test]
    fn once_writes_stop_the_backup_goes_at_full_speed_without_debt() {
        let (mut p, lsn) = pace(MIB as u64);
        let t = Instant::now();
        lsn.store(11, Ordering::Relaxed);
        assert_eq!(p.delay(MIB, t), Duration::ZERO);
        assert_eq!(p.delay(MIB, t), Duration::from_secs(1));
        // Nothing written for longer than the window: no wait, and the
        // second owed is forgotten.
        let later = t + BUSY_WINDOW + Duration::from_millis(1);
        assert_eq!(p.delay(MIB, later), Duration::ZERO);
        assert_eq!(p.delay(MIB, later), Duration::ZERO);
        // Writes again: paced again, from now.
        lsn.store(12, Ordering::Relaxed);
        assert_eq!(p.delay(MIB, later), Duration::ZERO);
        assert_eq!(p.delay(MIB, later), Duration::from_secs(1));
    }

    #[test]
    fn rate_zero_and_off_never_wait() {
        let (mut p, lsn) = pace(0);
        lsn.store(11, Ordering::Relaxed);
        let t = Instant::now();
        assert_eq!(p.delay(MIB, t), Duration::ZERO);
        assert_eq!(p.delay(MIB, t), Duration::ZERO);
        let mut off = Pace::off();
        assert_eq!(off.delay(MIB, t), Duration::ZERO);
        off.wait(MIB);
        assert_eq!(off.waited(), Duration::ZERO);
    }

    #[test]
    fn small_waits_are_carried_and_a_stop_ends_a_wait() {
        let (mut p, lsn) = pace(MIB as u64);
        lsn.store(11, Ordering::Relaxed);
        // 100 bytes at 1 MiB/s is ~95 µs: gathered and carried, not slept.
        p.wait(100);
        p.wait(100);
        assert_eq!(p.waited(), Duration::ZERO);
        // A wait of many seconds returns at once once stopped.
        let stop = Arc::new(AtomicBool::new(true));
        let l = lsn.clone();
        let mut p = Pace::new(
            MIB as u64,
            Box::new(move || l.load(Ordering::Relaxed)),
            Some(stop),
        );
        lsn.store(12, Ordering::Relaxed);
        let t = Instant::now();
        p.wait(MIB);
        p.wait(100 * MIB);
        assert!(t.elapsed() < Duration::from_secs(5));
        // What was waited is what was slept, not the 100 s planned.
        assert!(p.waited() < Duration::from_secs(5), "{:?}", p.waited());
    }
}
