//! The stream worker: keeps this worker's share of the shards read, in step with the stream and
//! with the other workers sharing the lease table.
//!
//! One task, two duties:
//! - shard sync (every `shard_sync_interval`, and at once when a reader finishes, so a child
//!   starts as soon as its parent ends): describe the stream, add lease rows for new shards,
//!   delete rows of finished shards that are gone from the stream once their children started;
//! - lease round (every `lease_take_interval`): read the lease table, take free leases and steal
//!   to even out shares ([`balance`]), start a reader for every held lease whose parents are
//!   done, and let readers of lost leases stop.
//!
//! Held leases are renewed (every third of `lease_duration`) by a task of their own, so that a
//! slow or failing lease-table scan or DescribeStream never holds a renewal back.
//!
//! On cancel, readers stop, drain and checkpoint while renewals go on; then every held lease is
//! released, so another worker takes it within one of its rounds instead of after expiry.
//!
//! [`balance`]: super::balance

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::balance::{self, Observations, TakeReason};
use super::lease::HeldLease;
use super::poller::{read_shard, ShardAges, ShardContext};
use super::settings::{ShardReport, StreamReport, StreamSettings};
use super::{lineage, Consumer, Lease, LeaseStore, ShardId, StreamError, StreamHealth, StreamShards, StreamSource};
use crate::retry::{retry, Retryable};
use crate::telemetry::metric;

/// The wait after the first failed shard sync; it doubles with each further failure, up to the
/// sync interval.
const SYNC_RETRY_FIRST: Duration = Duration::from_millis(125);

/// Shard states as the `stream_worker_shards{state}` gauge reports them.
const SHARD_STATES: [&str; 5] = ["reading", "owned_elsewhere", "free", "blocked", "finished"];

/// Reads this worker's share of one stream into one consumer.
pub struct StreamWorker<S, C> {
    context: Arc<ShardContext<S>>,
    consumer: Arc<C>,
}

/// The worker's own bookkeeping.
struct State {
    tasks: JoinSet<Result<ShardReport, StreamError>>,
    shard_of_task: HashMap<tokio::task::Id, ShardId>,
    /// Running readers and the token that stops each.
    readers: HashMap<ShardId, CancellationToken>,
    held: HashMap<ShardId, Arc<HeldLease>>,
    /// Shards whose reader failed, not restarted before the instant.
    holdoff: HashMap<ShardId, Instant>,
    /// The stream as last described.
    stream: Option<StreamShards>,
    /// Unfinished rows of shards the last sync did not list: retired when the next one does
    /// not list them either (a row another worker made for a shard newer than our listing is
    /// listed by then).
    orphans_seen: HashSet<ShardId>,
    observations: Observations,
    next_sync: Instant,
    failed_syncs: u32,
    last_status: Instant,
    report: StreamReport,
    /// What the renewal task renews: the held leases as of the last change.
    renewing: watch::Sender<Vec<Arc<HeldLease>>>,
}

impl State {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            tasks: JoinSet::new(),
            shard_of_task: HashMap::new(),
            readers: HashMap::new(),
            held: HashMap::new(),
            holdoff: HashMap::new(),
            stream: None,
            orphans_seen: HashSet::new(),
            observations: Observations::default(),
            next_sync: now,
            failed_syncs: 0,
            last_status: now,
            report: StreamReport::default(),
            renewing: watch::Sender::new(Vec::new()),
        }
    }

    /// Hands the held leases to the renewal task.
    fn share_held(&self) {
        self.renewing.send_replace(self.held.values().cloned().collect());
    }
}

/// Renews `held` every `interval` until `stop` fires. A lease found lost is marked so (its
/// reader stops); other failures are retried at the next tick.
async fn renew_loop(
    leases: LeaseStore,
    held: watch::Receiver<Vec<Arc<HeldLease>>>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while stop.run_until_cancelled(every.tick()).await.is_some() {
        let current: Vec<Arc<HeldLease>> = held.borrow().clone();
        for lease in current.iter().filter(|lease| !lease.lost().is_cancelled()) {
            match stop.run_until_cancelled(lease.renew(&leases)).await {
                None => return,
                Some(Err(error)) if !matches!(error, StreamError::LeaseLost { .. }) => {
                    tracing::warn!(shard = %lease.shard, error = %error, "lease renewal failed; retrying next round");
                }
                Some(_) => {}
            }
        }
    }
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

    /// Runs until `cancel` fires, then stops every reader, releases every lease, and returns
    /// what each reader read.
    pub async fn run(self, cancel: CancellationToken) -> Result<StreamReport, StreamError> {
        let leases = &self.context.leases;
        let created = tokio::select! {
            _ = cancel.cancelled() => return Ok(StreamReport::default()),
            created = retry(&self.context.settings.retry, "create_lease_table", || leases.ensure_table()) => created?,
        };
        if created {
            tracing::info!("created the lease table");
        }
        let mut state = State::new();
        let renewals_stop = CancellationToken::new();
        let renewals = tokio::spawn(renew_loop(
            self.context.leases.clone(),
            state.renewing.subscribe(),
            self.context.settings.renew_interval(),
            renewals_stop.clone(),
        ));
        loop {
            if Instant::now() >= state.next_sync {
                self.sync_shards(&mut state).await;
            }
            if let Err(error) = self.lease_round(&mut state).await {
                tracing::warn!(error = %error, "lease round failed");
            }
            state.share_held();
            // Set every round, stream found or not, so that they never go idle.
            metrics::gauge!(metric::LEASES_HELD).set(state.held.len() as f64);
            metrics::gauge!(metric::SHARDS_READING).set(state.readers.len() as f64);
            self.context.ages.publish();
            if state.last_status.elapsed() >= self.context.settings.status_interval {
                state.last_status = Instant::now();
                tracing::info!(
                    iterator_age_seconds = self.context.ages.max(),
                    leases_held = state.held.len(),
                    shards_reading = state.readers.len(),
                    "status"
                );
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(self.context.settings.lease_take_interval) => {}
                Some(joined) = state.tasks.join_next_with_id() => {
                    self.reader_done(&mut state, joined);
                    state.share_held();
                    // A finished shard may unblock its children: look at once.
                    state.next_sync = Instant::now();
                }
            }
        }
        self.shut_down(&mut state, renewals_stop, renewals).await;
        Ok(state.report)
    }

    /// Stops every reader (each drains and checkpoints) while renewals go on, then stops the
    /// renewals and releases.
    async fn shut_down(&self, state: &mut State, renewals_stop: CancellationToken, renewals: JoinHandle<()>) {
        for stop in state.readers.values() {
            stop.cancel();
        }
        while let Some(joined) = state.tasks.join_next_with_id().await {
            self.reader_done(state, joined);
            state.share_held();
        }
        renewals_stop.cancel();
        if let Err(error) = renewals.await {
            tracing::warn!(error = %error, "the lease renewal task failed");
        }
        state.held.retain(|_, held| !held.lost().is_cancelled());
        for held in state.held.values() {
            match held.release(&self.context.leases).await {
                Ok(()) => tracing::info!(shard = %held.shard, "lease released"),
                Err(error) => {
                    tracing::warn!(shard = %held.shard, error = %error, "could not release the lease; it will expire")
                }
            }
        }
        state.held.clear();
        metrics::gauge!(metric::LEASES_HELD).set(0.0);
        metrics::gauge!(metric::SHARDS_READING).set(0.0);
    }

    /// Describes the stream and keeps the lease rows in step with its shards.
    async fn sync_shards(&self, state: &mut State) {
        let sync_interval = self.context.settings.shard_sync_interval;
        match self.try_sync_shards(&mut state.orphans_seen).await {
            Ok(described) => {
                state.stream = Some(described);
                state.failed_syncs = 0;
                state.next_sync = Instant::now() + sync_interval;
            }
            Err(error) => {
                if matches!(
                    error,
                    StreamError::TableNotFound(_) | StreamError::StreamDisabled(_) | StreamError::StreamNotFound(_)
                ) {
                    self.context.health.stream_lost();
                }
                tracing::warn!(error = %error, retryable = error.is_retryable(), "shard sync failed");
                // Quick at first (the table may be created any moment), then no more often
                // than the sync interval, so a missing table does not flood the log.
                state.failed_syncs = state.failed_syncs.saturating_add(1);
                let wait = SYNC_RETRY_FIRST
                    .saturating_mul(1 << state.failed_syncs.min(8))
                    .min(sync_interval);
                state.next_sync = Instant::now() + wait;
            }
        }
    }

    async fn try_sync_shards(&self, orphans_seen: &mut HashSet<ShardId>) -> Result<StreamShards, StreamError> {
        let context = &self.context;
        let described = context.source.describe().await?;
        context.health.stream_found(&described.stream_id);
        let leases = context.leases.load_all().await?;
        // Rows of this stream, even of shards long gone, mean it was read before: new shards
        // then start at the horizon whatever `starting_position` says.
        let fresh_stream = lineage::is_fresh(&described.stream_id, &leases);
        self.retire_orphans(&described, &leases, orphans_seen).await?;
        for shard in described.shards.iter().filter(|shard| !leases.contains_key(&shard.id)) {
            let (checkpoint, shard_end) =
                lineage::initial_lease(shard, fresh_stream, context.settings.starting_position);
            context
                .leases
                .create(&described.stream_id, shard, &checkpoint, shard_end)
                .await?;
            tracing::info!(shard = %shard.id, parents = ?shard.parents, checkpoint = %checkpoint.encode(), shard_end, "new shard");
        }
        for shard in lineage::removable(&described.shards, &leases) {
            context.leases.delete(shard).await?;
            tracing::info!(shard = %shard, "removed the lease of a finished shard gone from the stream");
        }
        Ok(described)
    }

    /// Unfinished rows of shards trimmed away before they were read to the end (this consumer was
    /// down past the retention): the records in between are lost to the stream. Counted and
    /// logged once, with what to do, and the rows retired so that they stop waiting forever.
    async fn retire_orphans(
        &self,
        described: &StreamShards,
        leases: &HashMap<ShardId, Lease>,
        seen: &mut HashSet<ShardId>,
    ) -> Result<(), StreamError> {
        let orphans = lineage::orphans(&described.stream_id, &described.shards, leases);
        let (confirmed, new): (Vec<&Lease>, Vec<&Lease>) =
            orphans.into_iter().partition(|lease| seen.contains(&lease.shard));
        *seen = new.iter().map(|lease| lease.shard.clone()).collect();
        let mut retired = Vec::new();
        for lease in confirmed {
            if self.context.leases.retire(lease).await? {
                retired.push(lease.shard.0.as_str());
            }
        }
        if !retired.is_empty() {
            metrics::counter!(metric::STREAM_GAPS).increment(1);
            tracing::error!(
                shards = ?retired,
                "shards were trimmed from the stream before this worker read them to the end (down longer than \
                 the stream's retention); their leases are retired and reading goes on from the oldest record \
                 kept. Conversations may be stale: run `cruddur-stream-worker reconcile`"
            );
        }
        Ok(())
    }

    /// Renews, takes, steals, and starts readers.
    async fn lease_round(&self, state: &mut State) -> Result<(), StreamError> {
        let Some(stream) = state.stream.clone() else {
            return Ok(());
        };
        let context = &self.context;
        let me = context.leases.owner().to_owned();
        let mut leases = context.leases.load_all().await?;
        let now = Instant::now();
        state.observations.observe(&leases, now);
        // A lease the table gives to someone else is lost, even before a write finds out.
        for held in state.held.values() {
            if leases
                .get(&held.shard)
                .is_none_or(|lease| lease.owner.as_deref() != Some(me.as_str()))
            {
                held.mark_lost();
            }
        }
        state.held.retain(|_, held| !held.lost().is_cancelled());

        let readable_ids: HashSet<ShardId> = lineage::readable(&stream.shards, &leases, |_| false)
            .into_iter()
            .map(|shard| shard.id.clone())
            .collect();
        // Rows under our own id that we do not hold: a restart's, taken back at once, unless a
        // live twin with our id was seen lately and the row is still renewed (then it is the
        // twin's, and taking it would only start a tug of war).
        let duration = context.settings.lease_duration;
        let twin = context.leases.twin_seen_within(duration * 6);
        let mut to_take: Vec<(ShardId, TakeReason)> = leases
            .values()
            .filter(|lease| {
                lease.owner.as_deref() == Some(me.as_str())
                    && !state.held.contains_key(&lease.shard)
                    && readable_ids.contains(&lease.shard)
                    && (!twin || state.observations.is_free(lease, now, duration))
            })
            .map(|lease| (lease.shard.clone(), TakeReason::New))
            .collect();
        let mut readable: Vec<&Lease> = readable_ids.iter().filter_map(|id| leases.get(id)).collect();
        readable.sort_by(|a, b| a.shard.cmp(&b.shard));
        to_take.extend(balance::choose(
            &me,
            &readable,
            &state.observations,
            now,
            context.settings.lease_duration,
            context.settings.max_steals_per_round,
        ));
        for (shard, reason) in to_take {
            let Some(seen) = leases.get(&shard) else { continue };
            match context.leases.take(seen).await {
                Ok(Some(taken)) => {
                    if reason != TakeReason::New {
                        metrics::counter!(metric::LEASE_TAKEOVERS, "reason" => reason.label()).increment(1);
                    }
                    tracing::info!(shard = %shard, reason = reason.label(), from = ?seen.owner, "lease taken");
                    state.held.insert(shard.clone(), Arc::new(HeldLease::new(&taken)));
                    leases.insert(shard, taken);
                }
                Ok(None) => tracing::debug!(shard = %shard, "another worker took the lease first"),
                Err(error) => tracing::warn!(shard = %shard, error = %error, "could not take the lease"),
            }
        }

        state.holdoff.retain(|_, until| *until > now);
        for (shard, held) in &state.held {
            if state.readers.contains_key(shard) || state.holdoff.contains_key(shard) {
                continue;
            }
            let Some(lease) = leases.get(shard).filter(|lease| !lease.shard_end) else {
                continue;
            };
            let stop = held.lost().child_token();
            let stream_id = lease.stream_id.clone().unwrap_or_else(|| stream.stream_id.clone());
            let lane = self.consumer.open_lane(shard);
            let reader = read_shard(
                context.clone(),
                stream_id,
                lease.clone(),
                held.clone(),
                lane,
                stop.clone(),
            );
            let handle = state.tasks.spawn(reader);
            state.shard_of_task.insert(handle.id(), shard.clone());
            state.readers.insert(shard.clone(), stop);
        }
        self.publish(state, &stream, &leases, &readable_ids, now);
        Ok(())
    }

    fn publish(
        &self,
        state: &State,
        stream: &StreamShards,
        leases: &HashMap<ShardId, Lease>,
        readable: &HashSet<ShardId>,
        now: Instant,
    ) {
        let mut counts: HashMap<&str, usize> = SHARD_STATES.iter().map(|state| (*state, 0)).collect();
        for shard in &stream.shards {
            let Some(lease) = leases.get(&shard.id) else { continue };
            let shard_state = if lease.shard_end {
                "finished"
            } else if !readable.contains(&shard.id) {
                "blocked"
            } else if state.held.contains_key(&shard.id) {
                "reading"
            } else if state
                .observations
                .is_free(lease, now, self.context.settings.lease_duration)
            {
                "free"
            } else {
                "owned_elsewhere"
            };
            *counts.entry(shard_state).or_default() += 1;
        }
        for (shard_state, count) in counts {
            metrics::gauge!(metric::SHARDS, "state" => shard_state).set(count as f64);
        }

        self.context.health.lease_round_succeeded(!state.held.is_empty());
    }

    fn reader_done(
        &self,
        state: &mut State,
        joined: Result<(tokio::task::Id, Result<ShardReport, StreamError>), tokio::task::JoinError>,
    ) {
        let task = match &joined {
            Ok((task, _)) => *task,
            Err(error) => error.id(),
        };
        let Some(shard) = state.shard_of_task.remove(&task) else {
            return;
        };
        state.readers.remove(&shard);
        match joined {
            Ok((_, Ok(report))) => {
                if report.ended {
                    state.held.remove(&shard);
                }
                state.report.shards.push(report);
            }
            Ok((_, Err(StreamError::LeaseLost { .. }))) => {
                state.held.remove(&shard);
            }
            Ok((_, Err(error))) => {
                tracing::warn!(shard = %shard, error = %error, "shard reader failed; it restarts from its checkpoint");
                state.holdoff.insert(shard, Instant::now() + self.holdoff());
            }
            Err(error) => {
                tracing::error!(shard = %shard, error = %error, "shard reader panicked; it restarts from its checkpoint");
                state.holdoff.insert(shard, Instant::now() + self.holdoff());
            }
        }
    }

    fn holdoff(&self) -> Duration {
        self.context.settings.retry.max_delay.max(Duration::from_secs(1))
    }
}
