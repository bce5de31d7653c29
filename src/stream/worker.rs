//! The stream worker: keeps the set of shard readers in step with the stream.
//!
//! A sync loop describes the stream every `shard_sync_interval` (and at once whenever a reader
//! finishes, so a child starts as soon as its parent ends), adds lease rows for new shards,
//! and starts a reader for every shard that lineage allows. On cancel it stops every reader
//! (each drains and checkpoints) and returns what each read.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::poller::{read_shard, ShardAges, ShardContext};
use super::{
    lineage, Consumer, LeaseStore, Position, SequenceNumber, ShardId, StartingPosition, StreamError, StreamHealth,
    StreamSource,
};
use crate::retry::{retry, RetryPolicy, Retryable};
use crate::telemetry::metric;

/// The wait after the first failed shard sync; it doubles with each further failure, up to the
/// sync interval.
const SYNC_RETRY_FIRST: Duration = Duration::from_millis(125);

/// How the stream is read.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub starting_position: StartingPosition,
    /// GetRecords limit (1..=1000 on DynamoDB Streams).
    pub batch_size: i32,
    pub idle_interval: Duration,
    pub shard_sync_interval: Duration,
    pub checkpoint_interval: Duration,
    /// For AWS calls of this layer; reads retry until shutdown, so leave attempts unbounded.
    pub retry: RetryPolicy,
}

/// What one reader of one shard did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReport {
    pub shard: ShardId,
    pub records: u64,
    pub first: Option<SequenceNumber>,
    pub last: Option<SequenceNumber>,
    /// The last checkpoint this reader wrote.
    pub checkpoint: Option<Position>,
    /// The shard was read to its end.
    pub ended: bool,
    /// When the reader started, and when it returned (after its final checkpoint).
    pub started_at: Instant,
    pub finished_at: Instant,
}

impl ShardReport {
    pub(super) fn new(shard: ShardId) -> Self {
        let now = Instant::now();
        Self {
            shard,
            records: 0,
            first: None,
            last: None,
            checkpoint: None,
            ended: false,
            started_at: now,
            finished_at: now,
        }
    }
}

/// What the worker read, reader by reader, in the order they finished.
#[derive(Debug, Clone, Default)]
pub struct StreamReport {
    pub shards: Vec<ShardReport>,
}

impl StreamReport {
    pub fn records(&self) -> u64 {
        self.shards.iter().map(|shard| shard.records).sum()
    }
}

/// Reads every shard of one stream into one consumer.
pub struct StreamWorker<S, C> {
    context: Arc<ShardContext<S>>,
    consumer: Arc<C>,
}

/// Bookkeeping of the running readers.
#[derive(Default)]
struct Readers {
    tasks: JoinSet<Result<ShardReport, StreamError>>,
    shard_of_task: HashMap<tokio::task::Id, ShardId>,
    running: HashSet<ShardId>,
    /// Shards whose reader failed, not restarted before the instant.
    holdoff: HashMap<ShardId, Instant>,
}

impl<S: StreamSource, C: Consumer> StreamWorker<S, C> {
    pub fn new(
        source: S,
        consumer: Arc<C>,
        leases: LeaseStore,
        settings: StreamSettings,
        health: Arc<StreamHealth>,
    ) -> Self {
        let context = ShardContext {
            source,
            leases,
            settings,
            health,
            ages: ShardAges::default(),
        };
        Self {
            context: Arc::new(context),
            consumer,
        }
    }

    /// Runs until `cancel` fires, then stops every reader and returns their reports.
    pub async fn run(self, cancel: CancellationToken) -> Result<StreamReport, StreamError> {
        let leases = &self.context.leases;
        let created = tokio::select! {
            _ = cancel.cancelled() => return Ok(StreamReport::default()),
            created = retry(&self.context.settings.retry, "create_lease_table", || leases.ensure_table()) => created?,
        };
        if created {
            tracing::info!("created the lease table");
        }
        let mut readers = Readers::default();
        let mut report = StreamReport::default();
        let mut failed_syncs: u32 = 0;
        loop {
            let sync_interval = self.context.settings.shard_sync_interval;
            let wait = match self.sync(&mut readers, &cancel).await {
                Ok(()) => {
                    failed_syncs = 0;
                    sync_interval
                }
                Err(error) => {
                    if matches!(error, StreamError::TableNotFound(_) | StreamError::StreamDisabled(_)) {
                        self.context.health.stream_lost();
                    }
                    tracing::warn!(error = %error, retryable = error.is_retryable(), "shard sync failed");
                    // Quick at first (the table may be created any moment), then no more often
                    // than the sync interval, so a missing table does not flood the log.
                    failed_syncs = failed_syncs.saturating_add(1);
                    SYNC_RETRY_FIRST
                        .saturating_mul(1 << failed_syncs.min(8))
                        .min(sync_interval)
                }
            };
            metrics::gauge!(metric::SHARDS_READING).set(readers.running.len() as f64);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                Some(joined) = readers.tasks.join_next_with_id() => self.reader_done(&mut readers, joined, &mut report),
            }
        }
        while let Some(joined) = readers.tasks.join_next_with_id().await {
            self.reader_done(&mut readers, joined, &mut report);
        }
        metrics::gauge!(metric::SHARDS_READING).set(0.0);
        Ok(report)
    }

    /// Lists the shards, adds lease rows for new ones, starts readers where lineage allows.
    async fn sync(&self, readers: &mut Readers, cancel: &CancellationToken) -> Result<(), StreamError> {
        let context = &self.context;
        let described = context.source.describe().await?;
        context.health.stream_found(&described.stream_id);
        let mut leases = context.leases.load_all().await?;
        let fresh_stream = !described.shards.iter().any(|shard| leases.contains_key(&shard.id));
        for shard in &described.shards {
            if leases.contains_key(&shard.id) {
                continue;
            }
            let (checkpoint, shard_end) =
                lineage::initial_lease(shard, fresh_stream, context.settings.starting_position);
            context
                .leases
                .create(&described.stream_id, shard, &checkpoint, shard_end)
                .await?;
            tracing::info!(shard = %shard.id, parents = ?shard.parents, checkpoint = checkpoint.encode(), shard_end, "new shard");
            leases.insert(
                shard.id.clone(),
                super::Lease {
                    shard: shard.id.clone(),
                    checkpoint,
                    owner: None,
                    parents: shard.parents.clone(),
                    shard_end,
                },
            );
        }
        let now = Instant::now();
        readers.holdoff.retain(|_, until| *until > now);
        let ready = lineage::readable(&described.shards, &leases, |id| {
            readers.running.contains(id) || readers.holdoff.contains_key(id)
        });
        for shard in ready {
            let lane = self.consumer.open_lane(&shard.id);
            let reader = read_shard(
                context.clone(),
                described.stream_id.clone(),
                shard.id.clone(),
                lane,
                cancel.child_token(),
            );
            let handle = readers.tasks.spawn(reader);
            readers.shard_of_task.insert(handle.id(), shard.id.clone());
            readers.running.insert(shard.id.clone());
        }
        Ok(())
    }

    fn reader_done(
        &self,
        readers: &mut Readers,
        joined: Result<(tokio::task::Id, Result<ShardReport, StreamError>), tokio::task::JoinError>,
        report: &mut StreamReport,
    ) {
        let task = match &joined {
            Ok((task, _)) => *task,
            Err(error) => error.id(),
        };
        let Some(shard) = readers.shard_of_task.remove(&task) else {
            return;
        };
        readers.running.remove(&shard);
        match joined {
            Ok((_, Ok(shard_report))) => report.shards.push(shard_report),
            Ok((_, Err(error))) => {
                tracing::warn!(shard = %shard, error = %error, "shard reader failed; it restarts from its checkpoint");
                readers.holdoff.insert(shard, Instant::now() + self.holdoff());
            }
            Err(error) => {
                tracing::error!(shard = %shard, error = %error, "shard reader panicked; it restarts from its checkpoint");
                readers.holdoff.insert(shard, Instant::now() + self.holdoff());
            }
        }
    }

    fn holdoff(&self) -> Duration {
        self.context.settings.retry.max_delay.max(Duration::from_secs(1))
    }
}
