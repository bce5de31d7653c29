//! Shard discovery: keeps the lease table's rows in step with the stream's shards.
//!
//! A listing describes the stream, adds a row for every new shard (where it starts:
//! [`lineage::initial_lease`]), deletes rows of finished shards gone from the stream once
//! their children started, and retires unfinished rows of shards trimmed away before they were
//! read to the end (seen unlisted in two listings in a row, one gap counted).
//!
//! Listings are rare (every `shard_sync_interval`, and when a leader starts): new shards are
//! children of shards read to their end, so between listings the children of each newly
//! finished shard are looked up, one call each, and get rows at once. A lookup the source
//! cannot answer, or more finished shards than a listing has pages, means a listing now.
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
use super::source::{ShardInfo, StreamShards, StreamSource};
use crate::retry::Retryable;
use crate::telemetry::metric;

/// The wait after the first failed shard sync; it doubles with each further failure, up to the
/// sync interval.
const SYNC_RETRY_FIRST: Duration = Duration::from_millis(125);

/// Shards in one DescribeStream page: more finished shards than a listing has pages are found
/// by listing.
const DESCRIBE_PAGE: usize = 100;

/// What one run of shard discovery does.
enum Step {
    Nothing,
    List,
    LookUp(Vec<ShardId>),
}

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
    /// Finished shards whose children were looked up (or listed) since: each is looked up once.
    /// Bounded by the lease rows.
    looked_up: HashSet<ShardId>,
}

impl ShardSync {
    pub fn new() -> Self {
        Self {
            stream: None,
            next: Instant::now(),
            failures: 0,
            orphans_seen: HashSet::new(),
            looked_up: HashSet::new(),
        }
    }

    /// Keeps the lease rows (`leases`, as just read) in step with the stream's shards: lists the
    /// stream when a listing is due, else looks up the children of shards read to their end
    /// since (listing after all when the source cannot say). Whether it changed any row.
    pub async fn run<S: StreamSource, T: LeaseTable>(
        &mut self,
        context: &ShardContext<S, T>,
        leases: &HashMap<ShardId, Lease>,
    ) -> bool {
        let result = match self.next_step(leases) {
            Step::Nothing => return false,
            Step::List => self.list(context, leases).await,
            Step::LookUp(finished) => match self.look_up(context, leases, &finished).await {
                Ok(Some(changed)) => Ok(changed),
                Ok(None) => self.list(context, leases).await,
                Err(error) => Err(error),
            },
        };
        match result {
            Ok(changed) => {
                self.failures = 0;
                changed
            }
            Err(error) => {
                self.failed(context, &error);
                false
            }
        }
    }

    /// What this run does: list when a listing is due (or cheaper), else look up the children of
    /// finished shards of the last listing whose children are not known and were not looked up.
    fn next_step(&mut self, leases: &HashMap<ShardId, Lease>) -> Step {
        let Some(stream) = self.stream.as_ref() else {
            return Step::List;
        };
        if Instant::now() >= self.next {
            return Step::List;
        }
        self.looked_up.retain(|shard| leases.contains_key(shard));
        let parents: HashSet<&ShardId> = stream.shards.iter().flat_map(|shard| &shard.parents).collect();
        let finished: Vec<ShardId> = stream
            .shards
            .iter()
            .filter(|shard| leases.get(&shard.id).is_some_and(|lease| lease.shard_end))
            .filter(|shard| !parents.contains(&shard.id) && !self.looked_up.contains(&shard.id))
            .map(|shard| shard.id.clone())
            .collect();
        match finished.len() {
            0 => Step::Nothing,
            n if n > stream.shards.len().div_ceil(DESCRIBE_PAGE) => Step::List,
            _ => Step::LookUp(finished),
        }
    }

    /// Looks up the children of `finished` and adds rows for them: whether it changed any row,
    /// or `None` when a listing must find them instead.
    async fn look_up<S: StreamSource, T: LeaseTable>(
        &mut self,
        context: &ShardContext<S, T>,
        leases: &HashMap<ShardId, Lease>,
        finished: &[ShardId],
    ) -> Result<Option<bool>, StreamError> {
        let Some(stream_id) = self.stream.as_ref().map(|stream| stream.stream_id.clone()) else {
            return Ok(None);
        };
        let mut changed = false;
        for shard in finished {
            let children = context.source.children(&stream_id, shard).await?;
            self.looked_up.insert(shard.clone());
            let Some(children) = children.filter(|children| !children.is_empty()) else {
                return Ok(None);
            };
            for child in children {
                changed |= self.add(context, &stream_id, leases, child).await?;
            }
        }
        Ok(Some(changed))
    }

    /// Adds `shard` (found by a lookup) to the listing, and its row when it has none.
    async fn add<S: StreamSource, T: LeaseTable>(
        &mut self,
        context: &ShardContext<S, T>,
        stream_id: &str,
        leases: &HashMap<ShardId, Lease>,
        shard: ShardInfo,
    ) -> Result<bool, StreamError> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(false);
        };
        if !stream.shards.iter().any(|known| known.id == shard.id) {
            stream.shards.push(shard.clone());
        }
        if leases.contains_key(&shard.id) {
            return Ok(false);
        }
        let (checkpoint, shard_end) = lineage::initial_lease(&shard, false, context.settings.starting_position);
        context.leases.create(stream_id, &shard, &checkpoint, shard_end).await?;
        tracing::info!(shard = %shard.id, parents = ?shard.parents, checkpoint = %checkpoint.encode(), "new shard");
        Ok(true)
    }

    /// Lists the whole stream; every finished shard listed counts as looked up.
    async fn list<S: StreamSource, T: LeaseTable>(
        &mut self,
        context: &ShardContext<S, T>,
        leases: &HashMap<ShardId, Lease>,
    ) -> Result<bool, StreamError> {
        let (described, changed) = self.sync(context, leases).await?;
        self.looked_up = described
            .shards
            .iter()
            .filter(|shard| leases.get(&shard.id).is_some_and(|lease| lease.shard_end))
            .map(|shard| shard.id.clone())
            .collect();
        self.stream = Some(described);
        self.next = Instant::now() + context.settings.shard_sync_interval;
        Ok(changed)
    }

    fn failed<S: StreamSource, T: LeaseTable>(&mut self, context: &ShardContext<S, T>, error: &StreamError) {
        if error.is_stream_missing() {
            context.health.stream_lost();
        }
        tracing::warn!(error = %error, retryable = error.is_retryable(), "shard sync failed");
        // Quick at first (the table may be created any moment), then no more often than the
        // sync interval, so a missing table does not flood the log.
        self.failures = self.failures.saturating_add(1);
        let interval = context.settings.shard_sync_interval;
        let wait = SYNC_RETRY_FIRST.saturating_mul(1 << self.failures.min(8)).min(interval);
        self.next = Instant::now() + wait;
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
