//! How often one shard is read: no more than `max_reads_per_second` GetRecords calls (every page
//! of a read-ahead counts), and after an empty read a wait of `idle_interval` that, once the
//! shard has gone [`QUIET_AFTER`] without a record, doubles with each further empty read up to
//! `max_idle_interval`; the first record read ends the quiet spell, and reading goes on at once.
//!
//! Why: Kinesis allows 5 GetRecords a second per shard, shared by every consumer; DynamoDB
//! Streams bills every call. An idle shard then costs under one read a second, while a busy one
//! is read as fast as its records come.
//!
//! Pure bookkeeping over `tokio::time`, so it is tested under `tokio::time::pause`.

use std::time::Duration;

use tokio::time::Instant;

use super::settings::StreamSettings;

/// How long a shard must go without a record before its wait starts to grow. A shard with
/// traffic (whose reads often come back empty between records, and whose records may become
/// visible in bursts) keeps the short wait, and with it its latency; an idle one backs off.
pub(super) const QUIET_AFTER: Duration = Duration::from_secs(10);

/// One shard reader's pace.
#[derive(Debug)]
pub(super) struct Pacer {
    idle: Duration,
    max_idle: Duration,
    /// The least time between two reads.
    spacing: Duration,
    /// Doublings of the wait so far in this quiet spell.
    doublings: u32,
    /// When a record was last read (or reading started).
    last_record: Instant,
    last_read: Option<Instant>,
}

impl Pacer {
    pub fn new(settings: &StreamSettings) -> Self {
        Self {
            idle: settings.idle_interval,
            max_idle: settings.max_idle_interval.max(settings.idle_interval),
            spacing: Duration::from_secs(1) / settings.max_reads_per_second.max(1),
            doublings: 0,
            last_record: Instant::now(),
            last_read: None,
        }
    }

    /// When the next read of the shard may start; the read is counted as made then (so that a
    /// caller that waits for it keeps the pace, retries included).
    pub fn reserve_read(&mut self) -> Instant {
        let now = Instant::now();
        let at = self.last_read.map_or(now, |last| (last + self.spacing).max(now));
        self.last_read = Some(at);
        at
    }

    /// How long to wait after a read before the next: nothing after records; `idle_interval`
    /// after an empty read; once no record came for [`QUIET_AFTER`], twice the last wait, at
    /// most `max_idle_interval`.
    pub fn after_read(&mut self, got_records: bool) -> Duration {
        let now = Instant::now();
        if got_records {
            self.last_record = now;
            self.doublings = 0;
            return Duration::ZERO;
        }
        if now.duration_since(self.last_record) < QUIET_AFTER {
            return self.idle;
        }
        self.doublings = (self.doublings + 1).min(16);
        self.idle.saturating_mul(1 << self.doublings).min(self.max_idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(idle_ms: u64, max_idle_ms: u64, reads_per_second: u32) -> Pacer {
        let mut settings = crate::stream::tests::settings();
        settings.idle_interval = Duration::from_millis(idle_ms);
        settings.max_idle_interval = Duration::from_millis(max_idle_ms);
        settings.max_reads_per_second = reads_per_second;
        Pacer::new(&settings)
    }

    #[tokio::test(start_paused = true)]
    async fn a_shard_quiet_for_a_while_is_read_less_and_less_often_until_records_come() {
        let mut pace = pacer(250, 1500, 5);
        let mut waits = Vec::new();
        for _ in 0..48 {
            let wait = pace.after_read(false);
            waits.push(wait.as_millis() as u64);
            tokio::time::sleep(wait).await;
        }
        // Ten seconds of 250 ms waits (40 reads), then doubling to the maximum.
        assert!(waits[..40].iter().all(|wait| *wait == 250), "{waits:?}");
        assert_eq!(waits[40..45], [500, 1000, 1500, 1500, 1500]);
        assert_eq!(pace.after_read(true), Duration::ZERO, "records: read on at once");
        assert_eq!(
            pace.after_read(false),
            Duration::from_millis(250),
            "and the short wait again"
        );
        tokio::time::sleep(QUIET_AFTER).await;
        assert_eq!(
            pace.after_read(false),
            Duration::from_millis(500),
            "the next quiet spell backs off from the start again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reads_of_a_shard_never_exceed_the_rate() {
        let mut pace = pacer(250, 1500, 5);
        let start = Instant::now();
        for _ in 0..11 {
            tokio::time::sleep_until(pace.reserve_read()).await;
        }
        // Eleven reads: ten gaps of at least 200 ms.
        assert!(start.elapsed() >= Duration::from_secs(2), "{:?}", start.elapsed());
        assert!(start.elapsed() < Duration::from_millis(2050));
    }
}
