//! The stream worker: keeps this worker's share of the shards read, in step with the stream and
//! with the other workers sharing the lease table.
//!
//! Every worker is a member of the fleet: a task of its own beats in the fleet row
//! ([`beat_loop`]) every `heartbeat_interval`, which is all the liveness there is (no renewal
//! per lease). Every `lease_take_interval` the worker runs one round:
//! - [`lead`] if it is the leader, or claims leadership when the leader's beats stood still a
//!   lease duration (or nobody leads);
//! - [`follow`]: reads its assignment when the leader bumped its epoch; stops readers of shards
//!   assigned away and hands each to the member named (after its final checkpoint); acquires
//!   the shards assigned to it once their rows name it (a hand-over it waits for is polled);
//! - starts readers for held leases.
//!
//! On cancel the worker marks itself leaving: the leader hands its shards to others, one by one
//! as each reader drains and checkpoints, so a shard's reading stops only for the hand-over.
//! With nobody to hand to (or past `4 × heartbeat_interval`) the rest are released.
//!
//! [`beat_loop`]: super::fleet::beat_loop
//! [`lead`]: super::leader::lead
//! [`follow`]: StreamWorker::follow

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::balance::TakeReason;
use super::consumer::Consumer;
use super::context::{ShardAges, ShardContext};
use super::error::StreamError;
use super::fleet::{beat_loop, Beating, FleetView};
use super::health::StreamHealth;
use super::leader::{self, Leadership};
use super::lease::{Assignment, DynamoDbLeaseTable, Fleet, HeldLease, Lease, LeaseStore, LeaseTable};
use super::reader::read_shard;
use super::record::ShardId;
use super::settings::{ShardReport, StreamReport, StreamSettings};
use super::source::StreamSource;
use super::sync::ShardSync;
use crate::lock::lock;
use crate::retry::retry;
use crate::telemetry::{emf, metric};

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
    /// Each held lease's row as acquired (where its reader starts).
    rows: HashMap<ShardId, Lease>,
    /// Held shards assigned away: their readers stop, then the lease goes to the member named
    /// (released when none is).
    giving: HashMap<ShardId, Option<String>>,
    /// Shards whose reader failed, not restarted before the instant.
    holdoff: HashMap<ShardId, Instant>,
    /// Shards of the assignment received from another member and counted as such (once each,
    /// however often the reader restarts).
    received: HashSet<ShardId>,
    /// Leases handed over since the leader was last told (it is, once nothing is left to give).
    handed_over: bool,
    assignment: Assignment,
    /// This worker's epoch when its assignment was last read, and when.
    epoch_read: Option<(u64, Instant)>,
    leadership: Option<Leadership>,
    sync: ShardSync,
    last_status: Instant,
    report: StreamReport,
    /// The held leases, for the beat task (which gives them all up when the fence lapses).
    sharing: watch::Sender<Vec<Arc<HeldLease>>>,
    view: Arc<Mutex<FleetView>>,
    beat_now: Arc<Notify>,
    joined: Arc<Notify>,
}

impl State {
    fn new() -> Self {
        Self {
            tasks: JoinSet::new(),
            shard_of_task: HashMap::new(),
            readers: HashMap::new(),
            held: HashMap::new(),
            rows: HashMap::new(),
            giving: HashMap::new(),
            holdoff: HashMap::new(),
            received: HashSet::new(),
            handed_over: false,
            assignment: Assignment::default(),
            epoch_read: None,
            leadership: None,
            sync: ShardSync::new(),
            last_status: Instant::now(),
            report: StreamReport::default(),
            sharing: watch::Sender::new(Vec::new()),
            view: Arc::default(),
            beat_now: Arc::default(),
            joined: Arc::default(),
        }
    }

    /// Hands the held leases to the beat task.
    fn share_held(&self) {
        self.sharing.send_replace(self.held.values().cloned().collect());
    }

    /// Forgets a lease this worker no longer holds.
    fn drop_lease(&mut self, shard: &ShardId) {
        self.held.remove(shard);
        self.rows.remove(shard);
        self.giving.remove(shard);
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
            fence: Arc::default(),
        };
        Self {
            context: Arc::new(context),
            consumer,
        }
    }

    /// Runs until `cancel` fires, then hands over or releases every lease, and returns what
    /// each reader read.
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
        let beats_stop = CancellationToken::new();
        let beats = tokio::spawn(beat_loop(self.beating(&state), beats_stop.clone()));
        // The first round waits for the first beat (the fleet row), not a whole round.
        tokio::select! {
            _ = cancel.cancelled() => {}
            () = state.joined.notified() => {}
            _ = tokio::time::sleep(self.context.settings.heartbeat_interval * 2) => {}
        }
        loop {
            self.round(&mut state).await;
            self.report_status(&mut state);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(self.context.settings.lease_take_interval) => {}
                Some(joined) = state.tasks.join_next_with_id() => self.reader_done(&mut state, joined).await,
            }
        }
        self.shut_down(&mut state, beats_stop, beats).await;
        Ok(state.report)
    }

    fn beating(&self, state: &State) -> Beating<T> {
        let settings = &self.context.settings;
        Beating {
            leases: self.context.leases.clone(),
            view: state.view.clone(),
            fence: self.context.fence.clone(),
            held: state.sharing.subscribe(),
            interval: settings.heartbeat_interval,
            lease_duration: settings.lease_duration,
            now: state.beat_now.clone(),
            joined: state.joined.clone(),
        }
    }

    /// One round: lead (or claim), follow the assignment, start readers. Nothing while the
    /// fence is down (not yet joined, or lapsed).
    async fn round(&self, state: &mut State) {
        let fleet = lock(&state.view).fleet.clone();
        let Some(fleet) = fleet.filter(|_| self.context.fence.valid()) else {
            state.leadership = None;
            leader::publish_nothing();
            return;
        };
        if state.leadership.is_none() {
            if let Some(id) = &fleet.stream_id {
                self.context.health.stream_found(id);
            }
        }
        if let Err(error) = self.lead_or_claim(state, &fleet).await {
            tracing::warn!(error = %error, "leader round failed");
        }
        if let Err(error) = self.follow(state, &fleet).await {
            tracing::warn!(error = %error, "could not read this worker's assignment");
        }
        self.tell_hand_overs(state).await;
        state.share_held();
        self.start_readers(state, &fleet);
        self.context.health.lease_round_succeeded(!state.held.is_empty());
    }

    /// Leads if this worker holds the fleet's current term; claims leadership when nobody leads
    /// or the leader's beats stood still a lease duration.
    async fn lead_or_claim(&self, state: &mut State, fleet: &Fleet) -> Result<(), StreamError> {
        let me = self.context.leases.owner();
        // A claim won in an earlier round counts until a beat shows the row naming someone else.
        let claimed = state
            .leadership
            .as_ref()
            .is_some_and(|lead| lead.term == fleet.term + 1);
        let leading = claimed
            || (fleet.leader.as_deref() == Some(me)
                && state.leadership.as_ref().is_some_and(|lead| lead.term == fleet.term));
        if !leading {
            if state.leadership.take().is_some() {
                tracing::info!("no longer leading the fleet");
            }
            leader::publish_nothing();
            let leaving = lock(&state.view).leaving;
            if leaving || !self.leader_gone(state, fleet) {
                return Ok(());
            }
            let table = self.context.leases.table();
            if !table.claim_leadership(me, fleet.leader.as_deref(), fleet.term).await? {
                return Ok(());
            }
            tracing::info!(term = fleet.term + 1, "leading the fleet");
            state.leadership = Some(Leadership::new(fleet.term + 1));
            // Another leader may have found shards since this worker last listed.
            state.sync = ShardSync::new();
            state.beat_now.notify_one();
        }
        let Some(lead) = state.leadership.as_mut() else {
            return Ok(());
        };
        let view = lock(&state.view).snapshot();
        leader::lead(&self.context, lead, &mut state.sync, fleet, &view).await
    }

    fn leader_gone(&self, state: &State, fleet: &Fleet) -> bool {
        let Some(leader) = fleet.leader.as_deref() else {
            return true;
        };
        let view = lock(&state.view);
        !fleet.beats.contains_key(leader) || !view.alive(leader, Instant::now(), self.context.settings.lease_duration)
    }

    /// Follows this worker's assignment: reads it when its epoch moved, gives away what is no
    /// longer assigned, acquires what is.
    async fn follow(&self, state: &mut State, fleet: &Fleet) -> Result<(), StreamError> {
        let me = self.context.leases.owner();
        let epoch = fleet.epochs.get(me).copied().unwrap_or(0);
        let leaving = lock(&state.view).leaving;
        let stale = state.epoch_read.is_none_or(|(read, at)| {
            read != epoch || leaving || at.elapsed() >= self.context.settings.shard_sync_interval
        });
        if stale {
            let woken = state.epoch_read.is_some_and(|(read, _)| read != epoch);
            state.assignment = self.context.leases.table().assignment(me).await?;
            let assigned: HashSet<&ShardId> = state.assignment.shards.iter().collect();
            state.received.retain(|shard| assigned.contains(shard));
            state.epoch_read = Some((epoch, Instant::now()));
            if woken {
                self.notice_taken_leases(state).await?;
            }
        }
        self.give_away(state).await;
        let now = Instant::now();
        state.holdoff.retain(|_, until| *until > now);
        let wanted: Vec<ShardId> = state
            .assignment
            .shards
            .iter()
            .filter(|shard| !state.held.contains_key(*shard) && !state.holdoff.contains_key(*shard))
            .cloned()
            .collect();
        for shard in &wanted {
            self.acquire(state, shard, fleet).await?;
        }
        Ok(())
    }

    /// Stops the readers of held leases whose rows someone else wrote since (an operator's
    /// `release-lease` or `set-checkpoint`): an idle reader writes nothing, so it would not
    /// notice. Checked when the leader wakes this worker, which it does when it sees such a row.
    /// The shard, still assigned here, is taken again from its row's checkpoint.
    async fn notice_taken_leases(&self, state: &State) -> Result<(), StreamError> {
        if state.held.is_empty() {
            return Ok(());
        }
        let rows = self.context.leases.load_all().await?;
        for (shard, held) in &state.held {
            if held.written_by_another(rows.get(shard)) {
                held.mark_lost();
            }
        }
        Ok(())
    }

    /// Stops the readers of held shards no longer assigned here; a held shard without a reader
    /// is handed over at once.
    async fn give_away(&self, state: &mut State) {
        let assigned: HashSet<&ShardId> = state.assignment.shards.iter().collect();
        let going: Vec<ShardId> = state
            .held
            .keys()
            .filter(|shard| !assigned.contains(shard) && !state.giving.contains_key(*shard))
            .cloned()
            .collect();
        for shard in going {
            let to = state.assignment.give.get(&shard).cloned();
            state.giving.insert(shard.clone(), to);
            match state.readers.get(&shard) {
                Some(stop) => stop.cancel(),
                None => self.hand_over(state, &shard).await,
            }
        }
    }

    /// Once every lease assigned away is handed over, tells the leader (one write), so that its
    /// copy of the table and the assignments settle at its next round, not at its next scan.
    async fn tell_hand_overs(&self, state: &mut State) {
        if !state.handed_over || !state.giving.is_empty() {
            return;
        }
        match self.context.leases.table().mark_changed().await {
            Ok(()) => state.handed_over = false,
            Err(error) => {
                tracing::debug!(error = %error, "could not tell the leader of hand-overs; it sees them at its next scan")
            }
        }
    }

    /// Takes up `shard` if its row names this worker; otherwise waits for the hand-over.
    async fn acquire(&self, state: &mut State, shard: &ShardId, fleet: &Fleet) -> Result<(), StreamError> {
        let me = self.context.leases.owner();
        let Some(row) = self.context.leases.table().get(shard).await? else {
            return Ok(());
        };
        if row.owner.as_deref() != Some(me) {
            return Ok(());
        }
        if row.shard_end {
            return Ok(());
        }
        let from = state.assignment.receive.get(shard).filter(|from| from.as_str() != me);
        if let Some(from) = from.filter(|_| state.received.insert(shard.clone())) {
            let reason = if fleet.beats.contains_key(from) && !fleet.leaving.contains(from) {
                TakeReason::Stolen
            } else {
                TakeReason::Released
            };
            metrics::counter!(metric::LEASE_TAKEOVERS, "reason" => reason.label()).increment(1);
            tracing::info!(shard = %shard, reason = reason.label(), from = from.as_str(), "lease taken");
        }
        state.held.insert(shard.clone(), Arc::new(HeldLease::new(&row)));
        state.rows.insert(shard.clone(), row);
        Ok(())
    }

    /// Gives a held lease whose reader has stopped to the member its assignment names (or
    /// releases it).
    async fn hand_over(&self, state: &mut State, shard: &ShardId) {
        let Some(held) = state.held.get(shard).cloned() else {
            return;
        };
        let to = state.giving.get(shard).cloned().flatten();
        state.drop_lease(shard);
        if held.lost().is_cancelled() {
            return;
        }
        let leases = &self.context.leases;
        let result = match &to {
            Some(to) => held.hand_over(leases, to).await,
            None => held.release(leases).await,
        };
        match result {
            Ok(()) => {
                state.handed_over = true;
                tracing::info!(shard = %shard, to = to.as_deref().unwrap_or("nobody"), "lease handed over");
            }
            Err(error) => {
                tracing::warn!(shard = %shard, error = %error, "could not hand the lease over; it will expire")
            }
        }
    }

    /// Starts a reader for every held, unfinished lease without one that is not being given.
    fn start_readers(&self, state: &mut State, fleet: &Fleet) {
        let starting: Vec<ShardId> = state
            .held
            .keys()
            .filter(|shard| !state.readers.contains_key(*shard) && !state.giving.contains_key(*shard))
            .cloned()
            .collect();
        for shard in starting {
            let (Some(held), Some(lease)) = (state.held.get(&shard).cloned(), state.rows.get(&shard).cloned()) else {
                continue;
            };
            if held.lost().is_cancelled() {
                state.drop_lease(&shard);
                continue;
            }
            let stop = held.lost().child_token();
            let Some(stream_id) = lease.stream_id.clone().or_else(|| fleet.stream_id.clone()) else {
                continue;
            };
            let lane = self.consumer.open_lane(&shard);
            let reader = read_shard(self.context.clone(), stream_id, lease, held, lane, stop.clone());
            let handle = state.tasks.spawn(reader);
            state.shard_of_task.insert(handle.id(), shard.clone());
            state.readers.insert(shard, stop);
        }
    }

    /// Gauges every round and the status line every `status_interval`.
    fn report_status(&self, state: &mut State) {
        metrics::gauge!(metric::LEASES_HELD).set(state.held.len() as f64);
        metrics::gauge!(metric::SHARDS_READING).set(state.readers.len() as f64);
        self.context.ages.publish();
        if state.last_status.elapsed() >= self.context.settings.status_interval {
            state.last_status = Instant::now();
            emf::write(&emf::Status {
                processing_lag_seconds: self.context.ages.max_lag(),
                iterator_age_seconds: self.context.ages.max(),
                leases_held: state.held.len(),
                shards_reading: state.readers.len(),
                leading: state.leadership.is_some(),
            });
        }
    }

    /// Marks this worker leaving and keeps running rounds while the leader hands its shards on
    /// (each reader drains and checkpoints first); then releases what is left, resigns and
    /// leaves the fleet.
    async fn shut_down(&self, state: &mut State, beats_stop: CancellationToken, beats: JoinHandle<()>) {
        lock(&state.view).leaving = true;
        state.beat_now.notify_one();
        let deadline = Instant::now() + self.context.settings.heartbeat_interval * 4;
        while !state.held.is_empty() && Instant::now() < deadline && self.others_alive(state) {
            self.round(state).await;
            tokio::select! {
                _ = tokio::time::sleep(self.context.settings.lease_take_interval) => {}
                Some(joined) = state.tasks.join_next_with_id() => self.reader_done(state, joined).await,
            }
        }
        for (shard, stop) in &state.readers {
            state.giving.entry(shard.clone()).or_insert(None);
            stop.cancel();
        }
        while let Some(joined) = state.tasks.join_next_with_id().await {
            self.reader_done(state, joined).await;
        }
        let rest: Vec<ShardId> = state.held.keys().cloned().collect();
        for shard in rest {
            state.giving.entry(shard.clone()).or_insert(None);
            self.hand_over(state, &shard).await;
        }
        // Beats stop first: a beat racing the removal would move the entry it names.
        beats_stop.cancel();
        if let Err(error) = beats.await {
            tracing::warn!(error = %error, "the heartbeat task failed");
        }
        self.leave(state).await;
        metrics::gauge!(metric::LEASES_HELD).set(0.0);
        metrics::gauge!(metric::SHARDS_READING).set(0.0);
    }

    /// Whether another member could take this worker's shards.
    fn others_alive(&self, state: &State) -> bool {
        let me = self.context.leases.owner();
        let view = lock(&state.view);
        let Some(fleet) = &view.fleet else { return false };
        let duration = self.context.settings.lease_duration;
        fleet.beats.keys().any(|worker| {
            worker != me && !fleet.leaving.contains(worker) && view.alive(worker, Instant::now(), duration)
        })
    }

    /// Resigns leadership and removes this worker's entry from the fleet row.
    async fn leave(&self, state: &mut State) {
        let table = self.context.leases.table();
        let me = self.context.leases.owner();
        if let Some(lead) = state.leadership.take() {
            if let Err(error) = table.resign(me, lead.term).await {
                tracing::warn!(error = %error, "could not resign leadership; another worker leads after a lease duration");
            }
        }
        let own_beat = lock(&state.view).own_beat;
        if let Some(beat) = own_beat {
            if let Err(error) = table.remove_member(me, beat).await {
                tracing::warn!(error = %error, "could not leave the fleet; the leader drops this worker after a lease duration");
            }
        }
    }

    /// A reader ended: a finished shard tells the leader (its children may start); a shard
    /// being given away is handed over; a failed one is dropped and acquired again after a pause
    /// (from its row as it then stands).
    async fn reader_done(
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
                let ended = report.ended;
                state.report.shards.push(report);
                if ended {
                    state.drop_lease(&shard);
                    if let Err(error) = self.context.leases.table().mark_changed().await {
                        tracing::warn!(error = %error, "could not tell the leader a shard finished; it sees it at its next scan");
                    }
                } else if state.giving.contains_key(&shard) {
                    self.hand_over(state, &shard).await;
                }
            }
            Ok((_, Err(StreamError::LeaseLost { .. }))) => state.drop_lease(&shard),
            Ok((_, Err(error))) => {
                tracing::warn!(shard = %shard, error = %error, "shard reader failed; it restarts from its checkpoint");
                self.after_failure(state, &shard).await;
            }
            Err(error) => {
                tracing::error!(shard = %shard, error = %error, "shard reader panicked; it restarts from its checkpoint");
                self.after_failure(state, &shard).await;
            }
        }
        state.share_held();
    }

    async fn after_failure(&self, state: &mut State, shard: &ShardId) {
        if state.giving.contains_key(shard) {
            self.hand_over(state, shard).await;
            return;
        }
        state.drop_lease(shard);
        state.holdoff.insert(shard.clone(), Instant::now() + self.holdoff());
    }

    fn holdoff(&self) -> Duration {
        self.context.settings.retry.max_delay.max(Duration::from_secs(1))
    }
}
