//! Shard discovery: keeps the lease table's rows in step with the stream's shards.
//!
//! One sync describes the stream, adds a row for every new shard (where it starts:
//! [`lineage::initial_lease`]), deletes rows of finished shards gone from the stream once
//! their children started, and retires unfinished rows of shards trimmed away before they were
//! read to the end (seen unlisted in two syncs in a row, one gap counted).
//!
//! Run by the leader only (one lister for the fleet), on the leases it just read.
//!
//! Must not: take, renew or read anything; that is the leader's and the readers' work.
//! A failed sync is retried quickly at first, then no more often than the sync interval.
//!
//! [`lineage::initial_lease`]: super::lineage::initial_lease

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::context::ShardContext;
use super::error::StreamError;
use super::lease::{Lease, LeaseTable};
use super::lineage;
use super::record::ShardId;
use super::source::{StreamShards, StreamSource};
use crate::retry::Retryable;
use crate::telemetry::metric;

/// The wait after the first failed shard sync; it doubles with each further failure, up to the
/// sync interval.
const SYNC_RETRY_FIRST: Duration = Duration::from_millis(125);

/// What shard discovery remembers between syncs.
#[derive(Debug)]
pub(super) struct ShardSync {
    /// The stream as last described.
    pub stream: Option<StreamShards>,
    /// When the next sync is due.
    pub next: Instant,
    failures: u32,
    /// Unfinished rows of shards the last sync did not list: retired when the next one does
    /// not list them either (a row another worker made for a shard newer than our listing is
    /// listed by then).
    orphans_seen: HashSet<ShardId>,
}

impl ShardSync {
    pub fn new() -> Self {
        Self {
            stream: None,
            next: Instant::now(),
            failures: 0,
            orphans_seen: HashSet::new(),
        }
    }

    /// Describes the stream and keeps the lease rows (`leases`, as just read) in step with its
    /// shards. Whether it changed any row.
    pub async fn run<S: StreamSource, T: LeaseTable>(
        &mut self,
        context: &ShardContext<S, T>,
        leases: &HashMap<ShardId, Lease>,
    ) -> bool {
        let interval = context.settings.shard_sync_interval;
        match self.sync(context, leases).await {
            Ok((described, changed)) => {
                self.stream = Some(described);
                self.failures = 0;
                self.next = Instant::now() + interval;
                changed
            }
            Err(error) => {
                if error.is_stream_missing() {
                    context.health.stream_lost();
                }
                tracing::warn!(error = %error, retryable = error.is_retryable(), "shard sync failed");
                // Quick at first (the table may be created any moment), then no more often
                // than the sync interval, so a missing table does not flood the log.
                self.failures = self.failures.saturating_add(1);
                let wait = SYNC_RETRY_FIRST.saturating_mul(1 << self.failures.min(8)).min(interval);
                self.next = Instant::now() + wait;
                false
            }
        }
    }

    async fn sync<S: StreamSource, T: LeaseTable>(
        &mut self,
        context: &ShardContext<S, T>,
        leases: &HashMap<ShardId, Lease>,
    ) -> Result<(StreamShards, bool), StreamError> {
        let described = context.source.describe().await?;
        context.health.stream_found(&described.stream_id);
        let mut changed = false;
        // Rows of this stream, even of shards long gone, mean it was read before: new shards
        // then start at the horizon whatever `starting_position` says.
        let fresh_stream = lineage::is_fresh(&described.stream_id, leases);
        changed |= self.retire_orphans(context, &described, leases).await?;
        for shard in described.shards.iter().filter(|shard| !leases.contains_key(&shard.id)) {
            let (checkpoint, shard_end) =
                lineage::initial_lease(shard, fresh_stream, context.settings.starting_position);
            context
                .leases
                .create(&described.stream_id, shard, &checkpoint, shard_end)
                .await?;
            changed = true;
            tracing::info!(shard = %shard.id, parents = ?shard.parents, checkpoint = %checkpoint.encode(), shard_end, "new shard");
        }
        for shard in lineage::removable(&described.shards, leases) {
            context.leases.delete(shard).await?;
            changed = true;
            tracing::info!(shard = %shard, "removed the lease of a finished shard gone from the stream");
        }
        Ok((described, changed))
    }

    /// Unfinished rows of shards trimmed away before they were read to the end (this consumer was
    /// down past the retention): the records in between are lost to the stream. Counted and
    /// logged once, with what to do, and the rows retired so that they stop waiting forever.
    async fn retire_orphans<S: StreamSource, T: LeaseTable>(
        &mut self,
        context: &ShardContext<S, T>,
        described: &StreamShards,
        leases: &HashMap<ShardId, Lease>,
    ) -> Result<bool, StreamError> {
        let orphans = lineage::orphans(&described.stream_id, &described.shards, leases);
        let (confirmed, new): (Vec<&Lease>, Vec<&Lease>) = orphans
            .into_iter()
            .partition(|lease| self.orphans_seen.contains(&lease.shard));
        self.orphans_seen = new.iter().map(|lease| lease.shard.clone()).collect();
        let mut retired = Vec::new();
        for lease in confirmed {
            if context.leases.retire(lease).await? {
                retired.push(lease.shard.0.as_str());
            }
        }
        let changed = !retired.is_empty();
        if changed {
            metrics::counter!(metric::STREAM_GAPS).increment(1);
            tracing::error!(
                shards = ?retired,
                "shards were trimmed from the stream before this worker read them to the end (down longer than \
                 the stream's retention); their leases are retired and reading goes on from the oldest record \
                 kept. Conversations may be stale: run `cruddur-stream-worker reconcile`"
            );
        }
        Ok(changed)
    }
}
