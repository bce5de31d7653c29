//! The stream worker: keeps this worker's share of the shards read, in step with the stream and
//! with the other workers sharing the lease table.
//!
//! One task, two duties:
//! - shard sync ([`ShardSync`], every `shard_sync_interval`, and at once when a reader finishes,
//!   so a child starts as soon as its parent ends);
//! - the lease round (every `lease_take_interval`), in four named steps: [`observe`] the table
//!   (a lease given to someone else is lost at once), [`take`] our own rows back and free or
//!   stolen leases ([`balance`]), [`start_readers`] for held leases whose parents are done, and
//!   [`publish`] what the round saw.
//!
//! Held leases are renewed (every third of `lease_duration`) by a task of their own
//! ([`renew_loop`]), so that a slow or failing lease-table scan or DescribeStream never holds a
//! renewal back.
//!
//! On cancel, readers stop, drain and checkpoint while renewals go on; then every held lease is
//! released, so another worker takes it within one of its rounds instead of after expiry.
//!
//! [`ShardSync`]: super::sync::ShardSync
//! [`balance`]: super::balance
//! [`observe`]: StreamWorker::observe
//! [`take`]: StreamWorker::take
//! [`start_readers`]: StreamWorker::start_readers
//! [`publish`]: StreamWorker::publish

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::balance::{self, Observations, TakeReason};
use super::consumer::Consumer;
use super::context::{ShardAges, ShardContext};
use super::error::StreamError;
use super::health::StreamHealth;
use super::lease::{DynamoDbLeaseTable, HeldLease, Lease, LeaseStore, LeaseTable};
use super::lineage;
use super::reader::read_shard;
use super::record::ShardId;
use super::settings::{ShardReport, StreamReport, StreamSettings};
use super::source::{StreamShards, StreamSource};
use super::sync::ShardSync;
use crate::retry::retry;
use crate::telemetry::metric;

/// Shard states as the `stream_worker_shards{state}` gauge reports them.
const SHARD_STATES: [&str; 5] = ["reading", "owned_elsewhere", "free", "blocked", "finished"];

/// Reads this worker's share of one stream into one consumer.
pub struct StreamWorker<S, C, T = DynamoDbLeaseTable> {
    context: Arc<ShardContext<S, T>>,
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
    sync: ShardSync,
    observations: Observations,
    last_status: Instant,
    report: StreamReport,
    /// What the renewal task renews: the held leases as of the last change.
    renewing: watch::Sender<Vec<Arc<HeldLease>>>,
}

impl State {
    fn new() -> Self {
        Self {
            tasks: JoinSet::new(),
            shard_of_task: HashMap::new(),
            readers: HashMap::new(),
            held: HashMap::new(),
            holdoff: HashMap::new(),
            sync: ShardSync::new(),
            observations: Observations::default(),
            last_status: Instant::now(),
            report: StreamReport::default(),
            renewing: watch::Sender::new(Vec::new()),
        }
    }

    /// Hands the held leases to the renewal task.
    fn share_held(&self) {
        self.renewing.send_replace(self.held.values().cloned().collect());
    }
}

/// What one lease round read of the table, for its later steps.
struct RoundView {
    stream: StreamShards,
    leases: HashMap<ShardId, Lease>,
    /// Shards whose parents are all done (finished or gone): the ones that may be read.
    readable: HashSet<ShardId>,
    now: Instant,
}

/// Renews `held` every `interval` until `stop` fires. A lease found lost is marked so (its
/// reader stops); other failures are retried at the next tick.
async fn renew_loop<T: LeaseTable>(
    leases: LeaseStore<T>,
    held: watch::Receiver<Vec<Arc<HeldLease>>>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while stop.run_until_cancelled(every.tick()).await.is_some() {
        if held.has_changed().is_err() {
            // The worker is gone without shutting down (its task was dropped): so are its leases.
            return;
        }
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

impl<S: StreamSource, C: Consumer, T: LeaseTable> StreamWorker<S, C, T> {
    pub fn new(
        source: S,
        consumer: Arc<C>,
        leases: LeaseStore<T>,
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
            state.sync.run_if_due(&self.context).await;
            if let Err(error) = self.lease_round(&mut state).await {
                tracing::warn!(error = %error, "lease round failed");
            }
            state.share_held();
            self.report_status(&mut state);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(self.context.settings.lease_take_interval) => {}
                Some(joined) = state.tasks.join_next_with_id() => {
                    self.reader_done(&mut state, joined);
                    state.share_held();
                    // A finished shard may unblock its children: look at once.
                    state.sync.next = Instant::now();
                }
            }
        }
        self.shut_down(&mut state, renewals_stop, renewals).await;
        Ok(state.report)
    }

    /// Gauges every round (stream found or not, so that they never go idle) and the status line
    /// every `status_interval`.
    fn report_status(&self, state: &mut State) {
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

    /// One lease round: observe, take, start readers, publish.
    async fn lease_round(&self, state: &mut State) -> Result<(), StreamError> {
        let Some(stream) = state.sync.stream.clone() else {
            return Ok(());
        };
        let mut view = self.observe(state, stream).await?;
        self.take(state, &mut view).await;
        self.start_readers(state, &view);
        self.publish(state, &view);
        Ok(())
    }

    /// Reads the lease table and notes what moved; a lease the table gives to someone else is
    /// lost, even before a write of ours finds out.
    async fn observe(&self, state: &mut State, stream: StreamShards) -> Result<RoundView, StreamError> {
        let me = self.context.leases.owner();
        let leases = self.context.leases.load_all().await?;
        let now = Instant::now();
        state.observations.observe(&leases, now);
        for held in state.held.values() {
            if leases
                .get(&held.shard)
                .is_none_or(|lease| lease.owner.as_deref() != Some(me))
            {
                held.mark_lost();
            }
        }
        state.held.retain(|_, held| !held.lost().is_cancelled());
        let readable = lineage::readable(&stream.shards, &leases, |_| false)
            .into_iter()
            .map(|shard| shard.id.clone())
            .collect();
        Ok(RoundView {
            stream,
            leases,
            readable,
            now,
        })
    }

    /// Takes back our own rows, then free leases and steals ([`balance::choose`]).
    async fn take(&self, state: &mut State, view: &mut RoundView) {
        let mut to_take = self.own_rows_to_take(state, view);
        let mut readable: Vec<&Lease> = view.readable.iter().filter_map(|id| view.leases.get(id)).collect();
        readable.sort_by(|a, b| a.shard.cmp(&b.shard));
        let settings = &self.context.settings;
        to_take.extend(balance::choose(
            self.context.leases.owner(),
            &readable,
            &state.observations,
            view.now,
            settings.lease_duration,
            settings.max_steals_per_round,
        ));
        for (shard, reason) in to_take {
            let Some(seen) = view.leases.get(&shard) else { continue };
            match self.context.leases.take(seen).await {
                Ok(Some(taken)) => {
                    if reason != TakeReason::New {
                        metrics::counter!(metric::LEASE_TAKEOVERS, "reason" => reason.label()).increment(1);
                    }
                    let from = seen.owner.as_deref().unwrap_or("nobody");
                    tracing::info!(shard = %shard, reason = reason.label(), from, "lease taken");
                    state.held.insert(shard.clone(), Arc::new(HeldLease::new(&taken)));
                    view.leases.insert(shard, taken);
                }
                Ok(None) => tracing::debug!(shard = %shard, "another worker took the lease first"),
                Err(error) => tracing::warn!(shard = %shard, error = %error, "could not take the lease"),
            }
        }
    }

    /// Rows under our own id that we do not hold: a restart's, taken back at once, unless a
    /// live twin with our id was seen lately and the row is still renewed (then it is the
    /// twin's, and taking it would only start a tug of war).
    fn own_rows_to_take(&self, state: &State, view: &RoundView) -> Vec<(ShardId, TakeReason)> {
        let me = self.context.leases.owner();
        let duration = self.context.settings.lease_duration;
        let twin = self.context.leases.twin_seen_within(duration * 6);
        view.leases
            .values()
            .filter(|lease| {
                lease.owner.as_deref() == Some(me)
                    && !state.held.contains_key(&lease.shard)
                    && view.readable.contains(&lease.shard)
                    && (!twin || state.observations.is_free(lease, view.now, duration))
            })
            .map(|lease| (lease.shard.clone(), TakeReason::New))
            .collect()
    }

    /// Starts a reader for every held, unfinished lease without one (and not held off after a
    /// failure).
    fn start_readers(&self, state: &mut State, view: &RoundView) {
        state.holdoff.retain(|_, until| *until > view.now);
        for (shard, held) in &state.held {
            if state.readers.contains_key(shard) || state.holdoff.contains_key(shard) {
                continue;
            }
            let Some(lease) = view.leases.get(shard).filter(|lease| !lease.shard_end) else {
                continue;
            };
            let stop = held.lost().child_token();
            let stream_id = lease.stream_id.clone().unwrap_or_else(|| view.stream.stream_id.clone());
            let lane = self.consumer.open_lane(shard);
            let reader = read_shard(
                self.context.clone(),
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
    }

    /// Shard states by the round's view, and readiness.
    fn publish(&self, state: &State, view: &RoundView) {
        let mut counts: HashMap<&str, usize> = SHARD_STATES.iter().map(|state| (*state, 0)).collect();
        for shard in &view.stream.shards {
            let Some(lease) = view.leases.get(&shard.id) else {
                continue;
            };
            let shard_state = if lease.shard_end {
                "finished"
            } else if !view.readable.contains(&shard.id) {
                "blocked"
            } else if state.held.contains_key(&shard.id) {
                "reading"
            } else if state
                .observations
                .is_free(lease, view.now, self.context.settings.lease_duration)
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
