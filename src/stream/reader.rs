//! One shard's reader: acquire an iterator from the lease's checkpoint, read, hand records to
//! the consumer's lane, checkpoint what the lane reports handled.
//!
//! Invariants: one reader per shard (the worker starts at most one); records reach the lane in
//! shard order; a checkpoint never names a record the lane has not reported handled; on stop,
//! the reader drains its lane and writes a final checkpoint before it returns.
//!
//! Polling: after a batch with records the shard is read again at once, while that batch is
//! handed over (at most one page read ahead of the lane; a full page is handed over as one that
//! more follow, so the lane may fold the backlog before it writes); after an empty one the reader waits as
//! [`Pacer`] says (from `idle_interval` up to `max_idle_interval` while the shard stays quiet),
//! and no shard is read more than `max_reads_per_second` times a second.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::consumer::ShardLane;
use super::context::ShardContext;
use super::error::StreamError;
use super::lease::{HeldLease, Lease, LeaseTable};
use super::pacing::Pacer;
use super::position::Position;
use super::record::{Record, ShardId};
use super::settings::ShardReport;
use super::source::{Batch, StreamSource};
use crate::lock::lock;
use crate::retry::retry;
use crate::telemetry::{metric, Tally};

/// Reads the shard of `lease` until it ends, fails, or `stop` fires. `stop` fires on shutdown
/// and when the lease is lost (a child of [`HeldLease::lost`]); only in the first case is a final
/// checkpoint written.
pub(super) async fn read_shard<S: StreamSource, T: LeaseTable, L: ShardLane>(
    context: Arc<ShardContext<S, T>>,
    stream_id: String,
    lease: Lease,
    held: Arc<HeldLease>,
    lane: L,
    stop: CancellationToken,
) -> Result<ShardReport, StreamError> {
    tracing::info!(shard = %lease.shard, checkpoint = %lease.checkpoint.encode(), "reading shard");
    let mut reader = ShardReader {
        report: ShardReport::new(lease.shard.clone()),
        context: &context,
        stream_id: &stream_id,
        shard: lease.shard,
        held,
        lane,
        written: lease.checkpoint,
        last_write: Instant::now(),
        pace: Mutex::new(Pacer::new(&context.settings)),
    };
    context.ages.watch(&reader.shard, reader.lane.waiting_since());
    let result = reader.run(&stop).await;
    context.ages.remove(&reader.shard);
    match result {
        Ok(()) => {
            reader.report.finished_at = Instant::now();
            Ok(reader.report)
        }
        // A lost lease was logged once where it was found lost.
        Err(error @ StreamError::LeaseLost { .. }) => Err(error),
        Err(error) => {
            tracing::warn!(shard = %reader.shard, error = %error, "shard reader stopped");
            Err(error)
        }
    }
}

impl<S: StreamSource, T: LeaseTable> ShardContext<S, T> {
    /// One GetRecords call (each attempt waits for the shard's pace). A full page means the shard
    /// is behind: the lane may then hold its records back to fold them with the next pages'
    /// ([`ShardLane::submit_ahead`]).
    async fn read_page(&self, iterator: &str, pace: &Mutex<Pacer>) -> Result<Batch, StreamError> {
        retry(&self.settings.retry, "get_records", || async {
            let at = lock(pace).reserve_read();
            tokio::time::sleep_until(at).await;
            let started = Instant::now();
            let result = self.source.read(iterator, self.settings.batch_size).await;
            let seconds = started.elapsed().as_secs_f64();
            metrics::histogram!(metric::GETRECORDS_DURATION).record(seconds);
            if let Ok(page) = &result {
                tracing::debug!(records = page.records.len(), seconds, "page read");
            }
            result
        })
        .await
    }

    /// A read that gives way to `cancel` (`None`): abandoning a read is harmless, nothing of it
    /// has been handed over.
    async fn read_unless(
        &self,
        iterator: &str,
        pace: &Mutex<Pacer>,
        cancel: &CancellationToken,
    ) -> Option<Result<Batch, StreamError>> {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            read = self.read_page(iterator, pace) => Some(read),
        }
    }
}

/// What handing a batch over left to do.
enum Handed {
    /// Go on reading, with the read made ahead while the batch was handed over, if any.
    ReadOn(Option<Result<Batch, StreamError>>),
    /// The shard was read to its end and its lease finished.
    Ended,
}

struct ShardReader<'a, S, T, L> {
    context: &'a ShardContext<S, T>,
    stream_id: &'a str,
    shard: ShardId,
    held: Arc<HeldLease>,
    lane: L,
    /// The checkpoint as last written (or as claimed).
    written: Position,
    last_write: Instant,
    /// How often the shard may be read (shared with the read made ahead).
    pace: Mutex<Pacer>,
    report: ShardReport,
}

impl<S: StreamSource, T: LeaseTable, L: ShardLane> ShardReader<'_, S, T, L> {
    async fn run(&mut self, cancel: &CancellationToken) -> Result<(), StreamError> {
        if self.written == Position::Latest {
            self.resolve_latest().await?;
        }
        let start = self.written.clone();
        // Records made before `LATEST` was resolved are read but not handed over.
        let skip_before = match start {
            Position::LatestAt(at) => Some(at),
            _ => None,
        };
        let mut iterator = match self.acquire_unless(&start, cancel).await {
            Some(Ok(iterator)) => iterator,
            Some(Err(StreamError::ShardGone(_))) => return self.finish_gone().await,
            Some(Err(error)) => return Err(error),
            None => return self.finish(false).await,
        };
        // The next read, started while the previous batch was handed over.
        let mut read_ahead: Option<Result<Batch, StreamError>> = None;
        while !cancel.is_cancelled() {
            let read = match read_ahead.take() {
                Some(read) => read,
                None => match self.context.read_unless(&iterator, &self.pace, cancel).await {
                    Some(read) => read,
                    None => break,
                },
            };
            match read {
                Ok(batch) => match self.hand_over(batch, skip_before, &mut iterator, cancel).await? {
                    Handed::ReadOn(next_read) => read_ahead = next_read,
                    Handed::Ended => return Ok(()),
                },
                Err(StreamError::ExpiredIterator) => {
                    // Drain first: the checkpoint then names the last record read, so resuming
                    // after it neither skips nor repeats anything.
                    tracing::info!(shard = %self.shard, "iterator expired; resuming from the checkpoint");
                    self.finish(false).await?;
                    let resume = self.written.clone();
                    iterator = match self.acquire(&resume).await {
                        Err(StreamError::ShardGone(_)) => return self.finish_gone().await,
                        other => other?,
                    };
                }
                Err(StreamError::ShardGone(_)) => return self.finish_gone().await,
                Err(StreamError::Trimmed(detail)) => {
                    self.finish(false).await?;
                    iterator = self.restart_after_gap(&detail).await?;
                }
                Err(error) => {
                    if let Err(final_error) = self.finish(false).await {
                        tracing::warn!(shard = %self.shard, error = %final_error, "final checkpoint failed");
                    }
                    return Err(error);
                }
            }
        }
        self.finish(false).await
    }

    /// Hands one batch to the lane (reading the next page meanwhile when records came), then
    /// checkpoints when due; after an empty read, waits as the shard's pace says.
    async fn hand_over(
        &mut self,
        mut batch: Batch,
        skip_before: Option<SystemTime>,
        iterator: &mut String,
        cancel: &CancellationToken,
    ) -> Result<Handed, StreamError> {
        if !self.context.fence.valid() {
            // Heartbeats lapsed (a pause, a partition): the shard may be someone else's by now.
            self.held.mark_lost();
            return Err(StreamError::LeaseLost {
                shard: self.shard.clone(),
                owner: "unknown (heartbeats lapsed)".into(),
            });
        }
        self.context.health.read_succeeded();
        let read_any = !batch.records.is_empty();
        self.observe(&batch.records, batch.behind);
        if let Some(cutoff) = skip_before {
            batch
                .records
                .retain(|record| record.created_at.is_none_or(|at| at >= cutoff));
        }
        let got_records = !batch.records.is_empty();
        let Some(next) = batch.next_iterator else {
            if got_records {
                self.lane.submit(batch.records).await;
            }
            tracing::info!(shard = %self.shard, "shard read to its end");
            self.finish(true).await?;
            self.report.ended = true;
            return Ok(Handed::Ended);
        };
        *iterator = next;
        let mut read_ahead = None;
        if got_records {
            // Records came, so more may follow at once: read on while the lane takes these (it
            // may wait for room), rather than one after the other.
            let context = self.context;
            let full = batch.records.len() >= usize::try_from(context.settings.batch_size).unwrap_or(usize::MAX);
            let submit = async {
                if full {
                    self.lane.submit_ahead(batch.records).await;
                } else {
                    self.lane.submit(batch.records).await;
                }
            };
            // The read first: its request goes out before the lane's work (routing, folding)
            // takes the thread, so that the two overlap.
            let (next_read, ()) = tokio::join!(biased; context.read_unless(iterator, &self.pace, cancel), submit);
            read_ahead = next_read;
        } else {
            // At the tip: whatever the lane held back for folding goes now.
            self.lane.submit(Vec::new()).await;
        }
        self.save(false, false).await?;
        let idle = lock(&self.pace).after_read(read_any);
        if !idle.is_zero() {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(idle) => {}
            }
        }
        Ok(Handed::ReadOn(read_ahead))
    }

    /// A `LATEST` checkpoint (as earlier versions stored it) resolved to an instant and stored
    /// at once, so that a handoff from here on skips nothing.
    async fn resolve_latest(&mut self) -> Result<(), StreamError> {
        let resolved = Position::latest_now();
        let (leases, held) = (&self.context.leases, &self.held);
        retry(&self.context.settings.retry, "checkpoint", || {
            held.checkpoint(leases, &resolved, false)
        })
        .await?;
        tracing::info!(shard = %self.shard, checkpoint = %resolved.encode(), "LATEST resolved");
        self.written = resolved;
        Ok(())
    }

    /// [`Self::acquire`], giving way to `cancel` (`None`): an iterator not yet had is nothing lost.
    async fn acquire_unless(
        &mut self,
        position: &Position,
        cancel: &CancellationToken,
    ) -> Option<Result<String, StreamError>> {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            acquired = self.acquire(position) => Some(acquired),
        }
    }

    /// The shard is gone from the stream before it was read to its end: whatever it held past
    /// the checkpoint expired unread. Counted as a gap; the lease is finished so that its
    /// children go on and the row is cleaned up like any finished shard's.
    async fn finish_gone(&mut self) -> Result<(), StreamError> {
        metrics::counter!(metric::STREAM_GAPS).increment(1);
        tracing::error!(
            shard = %self.shard,
            checkpoint = %self.written.encode(),
            "shard no longer exists (trimmed after the retention) before it was read to its end; its lease is \
             finished. Conversations may be stale: run `cruddur-stream-worker reconcile`"
        );
        self.finish(true).await?;
        self.report.ended = true;
        Ok(())
    }

    /// An iterator at `position`; a position already trimmed away restarts at the horizon.
    async fn acquire(&mut self, position: &Position) -> Result<String, StreamError> {
        let source = &self.context.source;
        let policy = &self.context.settings.retry;
        match retry(policy, "get_shard_iterator", || {
            source.iterator(self.stream_id, &self.shard, position)
        })
        .await
        {
            Err(StreamError::Trimmed(detail)) => self.restart_after_gap(&detail).await,
            other => other,
        }
    }

    /// Whether a trimmed answer can mean lost records: only when reading resumed after a
    /// checkpoint or after records this reader read. From TRIM_HORIZON (or LATEST) with nothing
    /// read yet there is nothing before the horizon to lose (DynamoDB Local answers so for the
    /// first read of an empty shard).
    fn may_have_lost(&self) -> bool {
        matches!(self.written, Position::After(_)) || self.report.records > 0
    }

    async fn restart_after_gap(&mut self, detail: &str) -> Result<String, StreamError> {
        if self.may_have_lost() {
            metrics::counter!(metric::STREAM_GAPS).increment(1);
            tracing::error!(
                shard = %self.shard,
                detail,
                "records were trimmed from the stream before this worker read them; \
                 restarting at TRIM_HORIZON. Conversations may be stale: run `cruddur-stream-worker reconcile`"
            );
        } else {
            tracing::debug!(shard = %self.shard, detail, "horizon moved before the first read; reading from it again");
        }
        let source = &self.context.source;
        retry(&self.context.settings.retry, "get_shard_iterator", || {
            source.iterator(self.stream_id, &self.shard, &Position::TrimHorizon)
        })
        .await
    }

    fn observe(&mut self, records: &[Record], behind: Option<std::time::Duration>) {
        let mut received = Tally::default();
        for record in records {
            received.add(record.event.label(), 1);
        }
        for (label, count) in received.into_counts() {
            metrics::counter!(metric::RECORDS_RECEIVED, "event" => label).increment(count);
        }
        let newest_record_age = || {
            records
                .last()
                .and_then(|record| record.created_at)
                .and_then(|created| SystemTime::now().duration_since(created).ok())
        };
        let age = behind.or_else(newest_record_age).map_or(0.0, |age| age.as_secs_f64());
        self.context.ages.set(&self.shard, age);
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            self.report.records += records.len() as u64;
            self.report.first.get_or_insert_with(|| first.sequence_number.clone());
            self.report.last = Some(last.sequence_number.clone());
        }
    }

    /// Waits for everything handed over, then checkpoints it. With the lease lost, neither: what
    /// was handed over may finish (updates are idempotent), but its checkpoint is the new
    /// owner's to write.
    async fn finish(&mut self, shard_end: bool) -> Result<(), StreamError> {
        if self.held.lost().is_cancelled() {
            return Err(StreamError::LeaseLost {
                shard: self.shard.clone(),
                owner: "another worker".into(),
            });
        }
        self.lane.drain().await;
        self.save(true, shard_end).await
    }

    /// Writes the lane's watermark as the checkpoint when it moved and `checkpoint_interval`
    /// has passed (or `force`); a shard end is always written.
    async fn save(&mut self, force: bool, shard_end: bool) -> Result<(), StreamError> {
        let target = self
            .lane
            .handled_through()
            .map_or_else(|| self.written.clone(), Position::After);
        if !shard_end
            && (target == self.written
                || (!force && self.last_write.elapsed() < self.context.settings.checkpoint_interval))
        {
            return Ok(());
        }
        let (leases, held) = (&self.context.leases, &self.held);
        retry(&self.context.settings.retry, "checkpoint", || {
            held.checkpoint(leases, &target, shard_end)
        })
        .await?;
        metrics::counter!(metric::CHECKPOINTS).increment(1);
        tracing::debug!(shard = %self.shard, checkpoint = %target.encode(), shard_end, "checkpoint written");
        self.report.checkpoint = Some(target.clone());
        self.written = target;
        self.last_write = Instant::now();
        Ok(())
    }
}
