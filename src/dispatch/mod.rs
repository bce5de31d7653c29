//! Fan-out of a shard's records to a handler: ordered per key, concurrent across keys,
//! bounded in flight, with a watermark per shard for checkpoints.
//!
//! Owns: routing each record (the handler names its key, or why it needs no work), coalescing
//! records of one batch with the same key into one update (the handler picks the survivor),
//! running updates for one key strictly one after another in stream order while different keys
//! run concurrently, retrying failed updates through [`crate::retry`] (bounded by attempts and
//! record age), and sending what fails for good to the dead-letter destination.
//!
//! Invariants:
//! - Per key, an update starts only after the previous update for that key (from any batch or
//!   shard lane) has finished.
//! - At most `max_in_flight` updates exist at once; `submit` waits for room (backpressure, no
//!   unbounded queue).
//! - At most `max_pending_records` (plus one batch) records of a lane wait for the watermark,
//!   and one update folds in at most `max_folded_records`: behind an update that cannot finish,
//!   `submit` waits instead of queueing every later record.
//! - Read-ahead: a batch submitted as one that more follow (`submit_ahead`: the shard is behind)
//!   is folded into the lane's held updates, which start at the next `submit` or `drain`, or as
//!   soon as the held updates of every lane together pass `read_ahead_bytes` (one shared budget,
//!   estimated from the records kept) or the lane's pending bound. Raw batches are never kept.
//! - A record counts as handled (for the watermark) only once the update that covers it has
//!   succeeded, or has failed for good *and* its dead letter is stored; ignored records are
//!   handled at once. A dead letter that cannot be stored for now is retried until it is (the
//!   shard waits), never skipped; one that can be stored nowhere (a permanent destination
//!   error) fails the dispatcher, and the worker stops with that error.
//!
//! Must not: know the records' meaning (that is the handler's) or write checkpoints (that is
//! the stream's, which asks the lane for its watermark).

mod watermark;

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use watermark::{Ticket, Watermark};

use crate::deadletter::{Covered, DeadLetter, DeadLetterDestination};
use crate::lock::lock;
use crate::retry::{retry, retry_until, RetryPolicy, Retryable};
use crate::stream::{Consumer, Record, RecordKeys, SequenceNumber, ShardId, ShardLane, WaitingSince};
use crate::telemetry::{metric, Tally};

/// What a record means to the handler.
#[derive(Debug)]
pub enum Route<E> {
    /// Needs no work; the reason is a metric label.
    Ignore(&'static str),
    /// Cannot be handled, ever (it does not decode): dead-lettered under the reason (a metric
    /// label) with the detail.
    Reject { reason: &'static str, detail: String },
    /// An update for `key`.
    Apply { key: String, event: E },
}

/// The work behind the fan-out.
pub trait Handler: Send + Sync + 'static {
    type Event: Send + Sync + 'static;
    type Error: Display + Retryable + Send + Sync + 'static;

    fn route(&self, record: &Record) -> Route<Self::Event>;

    /// Whether `candidate`, later in the stream than `current` for the same key, should be the
    /// one update the batch makes for that key. Applying the survivor alone must leave the
    /// same state as applying both in stream order.
    fn supersedes(&self, candidate: &Self::Event, current: &Self::Event) -> bool;

    /// Applies one update. Must be idempotent: after a crash it runs again.
    fn handle(&self, event: &Self::Event) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// A record from a dead letter made whole again where the letter kept only its keys (it was
    /// too large for the destination); `None` when there is nothing left to replay (the item is
    /// gone). By default, the record as it is.
    fn restore(&self, record: Record) -> impl Future<Output = Result<Option<Record>, Self::Error>> + Send {
        async move { Ok(Some(record)) }
    }
}

/// How much may run or wait at once, and how long a failing update is retried (the
/// `[dispatch]` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchLimits {
    pub max_in_flight: usize,
    /// Per lane: records submitted and not yet passed by the watermark before `submit` waits.
    pub max_pending_records: usize,
    /// Records one update may cover; later records of its key make the next update.
    pub max_folded_records: usize,
    /// Bytes (estimated) of updates every lane together may hold back while their shards are
    /// behind, folding the next pages into them before they start.
    pub read_ahead_bytes: usize,
    /// A failing update is not retried once its oldest record is older than this.
    pub max_record_age: Option<Duration>,
}

/// The limits, how failures retry, and where what fails for good goes.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub limits: DispatchLimits,
    /// Retries of a failed update (its attempts bound included).
    pub retry: RetryPolicy,
    pub dead_letters: DeadLetterDestination,
    /// Written into dead letters.
    pub worker_id: String,
}

/// Dead-letter reasons for updates that failed (rejected records use the handler's reason).
pub mod reason {
    /// The handler's error said another attempt cannot help.
    pub const PERMANENT_ERROR: &str = "permanent_error";
    /// `retry_max_attempts` ran out.
    pub const RETRIES_EXHAUSTED: &str = "retries_exhausted";
    /// The record passed `max_record_age_seconds` while failing.
    pub const RECORD_TOO_OLD: &str = "record_too_old";

    pub(super) fn of(gave_up: crate::retry::GaveUp) -> &'static str {
        match gave_up {
            crate::retry::GaveUp::Permanent => PERMANENT_ERROR,
            crate::retry::GaveUp::Attempts => RETRIES_EXHAUSTED,
            crate::retry::GaveUp::Deadline => RECORD_TOO_OLD,
        }
    }
}

/// The consumer side of the stream: open one lane per shard.
pub struct Dispatcher<H: Handler> {
    shared: Arc<Shared<H>>,
}

struct Shared<H: Handler> {
    handler: Arc<H>,
    settings: DispatchSettings,
    /// Dead-letter writes: never out of attempts.
    dead_letter_retry: RetryPolicy,
    permits: Arc<Semaphore>,
    /// The read-ahead budget in KiB, shared by every lane: what held-back updates may take.
    budget: Arc<Semaphore>,
    /// Per key, the newest update: what the next one awaits, and the update itself while it
    /// still waits for its turn (so that later records of its lane can join it).
    tails: Mutex<HashMap<String, Tail<H::Event>>>,
    next_unit: AtomicU64,
    tracker: TaskTracker,
    /// Fires when a dead letter could not be stored anywhere: the worker must stop.
    failed: CancellationToken,
    failure: Mutex<Option<String>>,
}

impl<H: Handler> Dispatcher<H> {
    pub fn new(handler: Arc<H>, settings: DispatchSettings) -> Self {
        let permits = Arc::new(Semaphore::new(settings.limits.max_in_flight.max(1)));
        let budget = Arc::new(Semaphore::new(kib(settings.limits.read_ahead_bytes)));
        let dead_letter_retry = RetryPolicy {
            max_attempts: None,
            ..settings.retry.clone()
        };
        Self {
            shared: Arc::new(Shared {
                handler,
                settings,
                dead_letter_retry,
                permits,
                budget,
                tails: Mutex::new(HashMap::new()),
                next_unit: AtomicU64::new(0),
                tracker: TaskTracker::new(),
                failed: CancellationToken::new(),
                failure: Mutex::new(None),
            }),
        }
    }

    /// Updates running or waiting for their key's turn now.
    pub fn in_flight(&self) -> usize {
        self.shared
            .settings
            .limits
            .max_in_flight
            .max(1)
            .saturating_sub(self.shared.permits.available_permits())
    }

    /// Fires when a record that failed for good could not be dead-lettered: nothing may pass
    /// it, so the worker must stop (lanes stop taking records and stop waiting to drain).
    pub fn failed(&self) -> CancellationToken {
        self.shared.failed.clone()
    }

    /// Why the dispatcher failed, once it has.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failure).clone()
    }

    /// Waits until every update ever submitted has finished.
    pub async fn wait_idle(&self) {
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
        self.shared.tracker.reopen();
    }
}

impl<H: Handler> Consumer for Dispatcher<H> {
    type Lane = DispatchLane<H>;

    fn open_lane(&self, shard: &ShardId) -> DispatchLane<H> {
        DispatchLane {
            shard: shard.clone(),
            shared: self.shared.clone(),
            progress: Arc::new(LaneProgress {
                watermark: Mutex::new(Watermark::default()),
                moved: Notify::new(),
            }),
            held: Held::default(),
        }
    }
}

/// One shard's lane.
pub struct DispatchLane<H: Handler> {
    shard: ShardId,
    shared: Arc<Shared<H>>,
    progress: Arc<LaneProgress>,
    /// Updates held back while the shard is behind.
    held: Held<H::Event>,
}

/// A lane's updates held back while its shard is behind, in stream order, and the share of
/// the read-ahead budget they take.
struct Held<E> {
    units: Vec<Unit<E>>,
    /// Per key, the index of its newest held unit.
    of_key: HashMap<String, usize>,
    /// The budget taken (KiB), returned when the units go.
    taken: Option<OwnedSemaphorePermit>,
    /// Bytes estimated not yet covered by `taken` (under one KiB).
    bytes: usize,
}

impl<E> Default for Held<E> {
    fn default() -> Self {
        Self {
            units: Vec::new(),
            of_key: HashMap::new(),
            taken: None,
            bytes: 0,
        }
    }
}

/// Whole KiB in `bytes`, as semaphore permits (at least one, at most the semaphore's maximum).
fn kib(bytes: usize) -> usize {
    (bytes / 1024).clamp(1, Semaphore::MAX_PERMITS)
}

struct LaneProgress {
    watermark: Mutex<Watermark>,
    /// Fires whenever the watermark moves (and so when it has drained).
    moved: Notify,
}

impl LaneProgress {
    fn complete(&self, tickets: &[Ticket]) {
        let mut watermark = lock(&self.watermark);
        let before = watermark.pending();
        for ticket in tickets {
            watermark.complete(*ticket);
        }
        if watermark.pending() < before {
            self.moved.notify_waiters();
        }
    }

    /// Waits until fewer than `bound` records are pending, or until `failed` fires (then
    /// nothing more will move).
    async fn wait_below(&self, bound: usize, failed: &CancellationToken) {
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if lock(&self.watermark).pending() < bound.max(1) || failed.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = moved => {}
                _ = failed.cancelled() => return,
            }
        }
    }
}

/// The newest update of a key.
struct Tail<E> {
    id: u64,
    /// Fires (by being dropped) when the update has finished.
    finished: oneshot::Receiver<()>,
    /// The update until its task takes it to run; and whose lane it belongs to.
    waiting: Arc<Mutex<Option<Unit<E>>>>,
    lane: Arc<LaneProgress>,
}

/// One update: the surviving event for a key, and every record it covers.
struct Unit<E> {
    key: String,
    event: E,
    tickets: Vec<Ticket>,
    /// The surviving record: what a dead letter keeps.
    record: Record,
    /// The other records it covers, folded into it: their keys, for dead letters.
    folded: Vec<RecordKeys>,
    /// Creation time of its oldest record, where the record-age limit counts from.
    oldest: Option<SystemTime>,
}

impl<E> Unit<E> {
    /// About the bytes of memory the unit holds (its records; the event is counted as the
    /// surviving record's image, which it is made from).
    fn approx_bytes(&self) -> usize {
        2 * self.record.approx_bytes()
            + self.folded.iter().map(RecordKeys::approx_bytes).sum::<usize>()
            + self.tickets.len() * std::mem::size_of::<Ticket>()
    }

    /// Takes in `later`, an update for the same key later in the stream: one update then
    /// covers both, with the event `supersedes` picks. Returns the bytes of the record it
    /// folded (kept by its keys).
    fn absorb(&mut self, later: Unit<E>, supersedes: impl Fn(&E, &E) -> bool) -> usize {
        self.tickets.extend(later.tickets);
        self.oldest = earliest(self.oldest, later.oldest);
        let folded = if supersedes(&later.event, &self.event) {
            self.event = later.event;
            std::mem::replace(&mut self.record, later.record)
        } else {
            later.record
        };
        let folded = RecordKeys::of(folded);
        let bytes = folded.approx_bytes();
        self.folded.push(folded);
        self.folded.extend(later.folded);
        bytes
    }
}

/// A record the handler rejected, on its way to the dead-letter destination.
struct Rejected {
    letter: DeadLetter,
    reason: &'static str,
    ticket: Ticket,
}

impl<H: Handler> Shared<H> {
    /// Stores a dead letter, retrying while the destination is unreachable (the shard waits),
    /// then counts it. A permanent failure (too large, access denied, no such queue) means the
    /// letter can be stored nowhere: the dispatcher is failed (see [`Dispatcher::failure`])
    /// and `false` returned; the caller must not mark the record handled.
    async fn dead_letter(&self, letter: &DeadLetter, reason: &'static str) -> bool {
        let destination = &self.settings.dead_letters;
        match retry(&self.dead_letter_retry, "write_dead_letter", || {
            destination.write(letter)
        })
        .await
        {
            Ok(()) => {
                metrics::counter!(metric::DEAD_LETTERS, "reason" => reason).increment(1);
                true
            }
            Err(error) => {
                let failure = format!(
                    "the dead letter of shard {} record {} cannot be stored in {}: {error}",
                    letter.shard,
                    letter.sequence_number,
                    destination.describe()
                );
                tracing::error!(error = %failure, "stopping: a record that failed for good cannot be dead-lettered");
                lock(&self.failure).get_or_insert(failure);
                self.failed.cancel();
                false
            }
        }
    }
}

impl<H: Handler> DispatchLane<H> {
    /// Routes a batch into one unit per key (in order of each key's first record), the
    /// rejected records, and the tickets of records that need no update.
    fn plan(&self, records: Vec<Record>) -> (Vec<Unit<H::Event>>, Vec<Rejected>, Vec<Ticket>) {
        let handler = &self.shared.handler;
        let mut units: Vec<Unit<H::Event>> = Vec::new();
        let mut unit_of_key: HashMap<String, usize> = HashMap::new();
        let mut rejected = Vec::new();
        let mut done_now = Vec::new();
        let mut ignored = Tally::default();
        let mut coalesced = 0;
        let mut watermark = lock(&self.progress.watermark);
        for record in records {
            let ticket = watermark.push(record.sequence_number.clone(), record.created_at);
            match handler.route(&record) {
                Route::Ignore(reason) => {
                    ignored.add(reason, 1);
                    done_now.push(ticket);
                }
                Route::Reject { reason, detail } => {
                    tracing::error!(shard = %self.shard, sequence = %record.sequence_number, reason, detail, "record cannot be handled; dead-lettering it");
                    let letter =
                        DeadLetter::new(&self.shard, &record, reason, detail, 0, &self.shared.settings.worker_id);
                    rejected.push(Rejected { letter, reason, ticket });
                }
                Route::Apply { key, event } => {
                    let unit = Unit {
                        key,
                        event,
                        tickets: vec![ticket],
                        oldest: record.created_at,
                        record,
                        folded: Vec::new(),
                    };
                    let full =
                        |index: usize| units[index].tickets.len() >= self.shared.settings.limits.max_folded_records;
                    match unit_of_key.get(&unit.key).copied().filter(|&index| !full(index)) {
                        Some(index) => {
                            coalesced += 1;
                            units[index].absorb(unit, |a, b| handler.supersedes(a, b));
                        }
                        None => {
                            unit_of_key.insert(unit.key.clone(), units.len());
                            units.push(unit);
                        }
                    }
                }
            }
        }
        drop(watermark);
        for (reason, count) in ignored.into_counts() {
            metrics::counter!(metric::RECORDS_IGNORED, "reason" => reason).increment(count);
        }
        if coalesced > 0 {
            metrics::counter!(metric::RECORDS_COALESCED).increment(coalesced);
        }
        (units, rejected, done_now)
    }

    /// Stores a rejected record's dead letter, then marks it handled; holds `permit` meanwhile.
    fn spawn_rejected(&self, rejected: Rejected, permit: Option<OwnedSemaphorePermit>) {
        let shared = self.shared.clone();
        let progress = self.progress.clone();
        self.shared.tracker.spawn(async move {
            let _permit = permit;
            if shared.dead_letter(&rejected.letter, rejected.reason).await {
                progress.complete(&[rejected.ticket]);
            }
        });
    }

    /// Folds `unit` into its key's newest update when that one belongs to this lane and still
    /// waits for its turn: under a backlog, one update per key then covers many batches.
    /// Hands the unit back when it cannot.
    fn join_waiting(&self, unit: Unit<H::Event>) -> Option<Unit<H::Event>> {
        let tails = lock(&self.shared.tails);
        let Some(tail) = tails.get(&unit.key) else {
            return Some(unit);
        };
        if !Arc::ptr_eq(&tail.lane, &self.progress) {
            return Some(unit);
        }
        let mut waiting = lock(&tail.waiting);
        let Some(queued) = waiting.as_mut() else {
            return Some(unit);
        };
        if queued.tickets.len() + unit.tickets.len() > self.shared.settings.limits.max_folded_records {
            // Full: the unit becomes the key's next update (and needs a permit of its own).
            return Some(unit);
        }
        metrics::counter!(metric::RECORDS_COALESCED).increment(unit.tickets.len() as u64);
        let handler = &self.shared.handler;
        queued.absorb(unit, |a, b| handler.supersedes(a, b));
        None
    }

    /// Starts one unit after the key's previous one; holds `permit` until it finishes.
    fn spawn(&self, unit: Unit<H::Event>, permit: Option<OwnedSemaphorePermit>) {
        let shared = self.shared.clone();
        let progress = self.progress.clone();
        let shard = self.shard.clone();
        let id = shared.next_unit.fetch_add(1, Ordering::Relaxed);
        let key = unit.key.clone();
        let (finished, finished_signal) = oneshot::channel::<()>();
        let waiting = Arc::new(Mutex::new(Some(unit)));
        let tail = Tail {
            id,
            finished: finished_signal,
            waiting: waiting.clone(),
            lane: self.progress.clone(),
        };
        let previous = lock(&shared.tails).insert(key.clone(), tail).map(|tail| tail.finished);
        let tracker = shared.tracker.clone();
        tracker.spawn(async move {
            let _permit = permit;
            metrics::gauge!(metric::IN_FLIGHT).increment(1.0);
            if let Some(previous) = previous {
                // Err means the previous unit's task is gone (it finished or panicked): go on.
                let _ = previous.await;
            }
            // From here on nothing joins it: it runs as it is.
            let Some(unit) = lock(&waiting).take() else {
                // Only this task takes it; nothing to run if it is gone.
                metrics::gauge!(metric::IN_FLIGHT).decrement(1.0);
                return;
            };
            let started = Instant::now();
            let handler = &shared.handler;
            let settings = &shared.settings;
            let deadline = settings.limits.max_record_age.zip(unit.oldest).map(|(age, oldest)| oldest + age);
            let result = retry_until(&settings.retry, "handle_update", deadline, || handler.handle(&unit.event)).await;
            metrics::histogram!(metric::GROUP_UPDATE_DURATION).record(started.elapsed().as_secs_f64());
            if let Err(failure) = result {
                let reason = reason::of(failure.gave_up);
                let error = failure.error.to_string();
                tracing::error!(shard = %shard, sequence = %unit.record.sequence_number, key = %unit.key, reason, attempts = failure.attempts, error, "update failed for good; dead-lettering it");
                let mut letter = DeadLetter::new(&shard, &unit.record, reason, error, failure.attempts, &settings.worker_id);
                letter.covers = unit.folded.iter().map(Covered::new).collect();
                if shared.dead_letter(&letter, reason).await {
                    progress.complete(&unit.tickets);
                }
            } else {
                progress.complete(&unit.tickets);
            }
            drop(finished);
            let mut tails = lock(&shared.tails);
            if tails.get(&key).is_some_and(|tail| tail.id == id) {
                tails.remove(&key);
            }
            drop(tails);
            metrics::gauge!(metric::IN_FLIGHT).decrement(1.0);
        });
    }
}

impl<H: Handler> DispatchLane<H> {
    /// Plans `records` and holds their updates back, each folded into the held update of its key
    /// when there is one; rejected records go at once. Returns whether the held updates must go
    /// now (over the budget), or `None` when the worker stops (nothing was taken).
    async fn hold(&mut self, records: Vec<Record>) -> Option<bool> {
        let shared = self.shared.clone();
        let failed = &shared.failed;
        let bound = self.shared.settings.limits.max_pending_records;
        if lock(&self.progress.watermark).pending() >= bound.max(1) {
            // Held records count as pending: they must go before waiting for room.
            self.release().await;
        }
        self.progress.wait_below(bound, failed).await;
        if failed.is_cancelled() {
            // The worker stops: nothing more is taken (none of it is checkpointed either).
            return None;
        }
        let (units, rejected, done_now) = self.plan(records);
        self.progress.complete(&done_now);
        let mut over_budget = false;
        for unit in units {
            over_budget |= !self.keep(unit);
        }
        // The semaphore is never closed; were it, running unbounded beats losing work.
        for rejected in rejected {
            let permit = self.shared.permits.clone().acquire_owned().await.ok();
            self.spawn_rejected(rejected, permit);
        }
        Some(over_budget)
    }

    /// Adds `unit` to the held updates and takes its size from the shared budget; `false` when
    /// the budget has no more room.
    fn keep(&mut self, unit: Unit<H::Event>) -> bool {
        let held = &mut self.held;
        let max_folded = self.shared.settings.limits.max_folded_records;
        let index = held
            .of_key
            .get(&unit.key)
            .copied()
            .filter(|&index| held.units[index].tickets.len() + unit.tickets.len() <= max_folded);
        match index {
            Some(index) => {
                // Its tickets and the folded records it brings, and one more record kept by
                // its keys.
                held.bytes += unit.approx_bytes() - 2 * unit.record.approx_bytes();
                metrics::counter!(metric::RECORDS_COALESCED).increment(unit.tickets.len() as u64);
                let handler = &self.shared.handler;
                held.bytes += held.units[index].absorb(unit, |a, b| handler.supersedes(a, b));
            }
            None => {
                held.bytes += unit.approx_bytes();
                held.of_key.insert(unit.key.clone(), held.units.len());
                held.units.push(unit);
            }
        }
        let whole = u32::try_from(held.bytes / 1024).unwrap_or(u32::MAX);
        if whole == 0 {
            return true;
        }
        match self.shared.budget.clone().try_acquire_many_owned(whole) {
            Ok(permit) => {
                held.bytes -= whole as usize * 1024;
                match held.taken.as_mut() {
                    Some(taken) => taken.merge(permit),
                    None => held.taken = Some(permit),
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Starts every held update (each after its key's previous one), giving its share of the
    /// budget back.
    async fn release(&mut self) {
        let held = std::mem::take(&mut self.held);
        for unit in held.units {
            let Some(unit) = self.join_waiting(unit) else {
                continue;
            };
            let permit = self.shared.permits.clone().acquire_owned().await.ok();
            self.spawn(unit, permit);
        }
    }
}

impl<H: Handler> ShardLane for DispatchLane<H> {
    async fn submit(&mut self, records: Vec<Record>) {
        if self.hold(records).await.is_some() {
            self.release().await;
        }
    }

    async fn submit_ahead(&mut self, records: Vec<Record>) {
        if self.shared.settings.limits.read_ahead_bytes == 0 {
            return self.submit(records).await;
        }
        if self.hold(records).await == Some(true) {
            self.release().await;
        }
    }

    fn handled_through(&self) -> Option<SequenceNumber> {
        lock(&self.progress.watermark).handled_through().cloned()
    }

    fn waiting_since(&self) -> WaitingSince {
        let progress = self.progress.clone();
        Arc::new(move || lock(&progress.watermark).waiting_since())
    }

    async fn drain(&mut self) {
        if !self.shared.failed.is_cancelled() {
            self.release().await;
        }
        self.progress.wait_below(1, &self.shared.failed).await;
    }
}

fn earliest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Replays one dead letter through the handler (for `redrive`): `Ok` with what happened
/// (`applied`, or the reason it needs no work any more), or the letter back, updated, when it
/// fails again. No record-age limit applies: an operator asked for it.
pub async fn replay<H: Handler>(
    handler: &H,
    policy: &RetryPolicy,
    letter: DeadLetter,
) -> Result<&'static str, DeadLetter> {
    let record = match letter.record() {
        Ok(record) => record,
        Err(error) => return Err(letter.failed_again("unreadable", error.to_string(), 0)),
    };
    let outcome = match replay_record(handler, policy, record).await {
        Ok(outcome) => outcome,
        Err((reason, error, attempts)) => return Err(letter.failed_again(reason, error, attempts)),
    };
    // The records it covers (older messages of the conversation), from their keys.
    for covered in letter.covers.iter().filter_map(Covered::record) {
        if let Err((reason, error, attempts)) = replay_record(handler, policy, covered).await {
            return Err(letter.failed_again(reason, error, attempts));
        }
    }
    Ok(outcome)
}

/// One record of a letter, restored by the handler where only its keys were kept: what
/// happened, or why it failed (reason, error, attempts).
async fn replay_record<H: Handler>(
    handler: &H,
    policy: &RetryPolicy,
    record: Record,
) -> Result<&'static str, (&'static str, String, u32)> {
    let restored = retry_until(policy, "redrive_restore", None, || handler.restore(record.clone())).await;
    let record = match restored {
        Ok(Some(record)) => record,
        Ok(None) => return Ok("gone"),
        Err(failure) => return Err((reason::of(failure.gave_up), failure.error.to_string(), failure.attempts)),
    };
    match handler.route(&record) {
        Route::Ignore(reason) => Ok(reason),
        Route::Reject { reason, detail } => Err((reason, detail, 0)),
        Route::Apply { event, .. } => match retry_until(policy, "redrive", None, || handler.handle(&event)).await {
            Ok(()) => Ok("applied"),
            Err(failure) => Err((reason::of(failure.gave_up), failure.error.to_string(), failure.attempts)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{EventKind, Item};
    use aws_sdk_dynamodb::types::AttributeValue;
    use std::collections::HashSet;
    use std::time::Duration;

    /// Records keyed by attribute `k` with value `v`; `v` = 0 is ignored, `v` = 999 rejected.
    struct Recorder {
        applied: Mutex<Vec<(String, u32)>>,
        active: Mutex<HashSet<String>>,
        gate: Semaphore,
        delays: HashMap<String, u64>,
    }

    impl Recorder {
        fn new(gate_open: bool, delays: &[(&str, u64)]) -> Arc<Self> {
            Arc::new(Self {
                applied: Mutex::new(Vec::new()),
                active: Mutex::new(HashSet::new()),
                gate: Semaphore::new(if gate_open { 1_000 } else { 0 }),
                delays: delays.iter().map(|(k, d)| ((*k).to_owned(), *d)).collect(),
            })
        }
        fn applied(&self) -> Vec<(String, u32)> {
            lock(&self.applied).clone()
        }
    }

    /// Values 990-998 fail: 998 and 997 permanently, the others transiently.
    #[derive(Debug)]
    struct Broken(u32);
    impl Display for Broken {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "broken {}", self.0)
        }
    }
    impl Retryable for Broken {
        fn is_retryable(&self) -> bool {
            self.0 < 997
        }
    }

    impl Handler for Recorder {
        type Event = (String, u32);
        type Error = Broken;

        fn route(&self, record: &Record) -> Route<(String, u32)> {
            let image = record.new_image.as_ref().expect("test records have images");
            let (Some(AttributeValue::S(key)), Some(AttributeValue::N(value))) = (image.get("k"), image.get("v"))
            else {
                panic!("test record without k and v");
            };
            match value.parse::<u32>().expect("number") {
                0 => Route::Ignore("zero"),
                999 => Route::Reject {
                    reason: "poison",
                    detail: "999".into(),
                },
                value => Route::Apply {
                    key: key.clone(),
                    event: (key.clone(), value),
                },
            }
        }

        fn supersedes(&self, candidate: &(String, u32), current: &(String, u32)) -> bool {
            candidate.1 >= current.1
        }

        async fn handle(&self, event: &(String, u32)) -> Result<(), Broken> {
            if (990..999).contains(&event.1) {
                return Err(Broken(event.1));
            }
            assert!(
                lock(&self.active).insert(event.0.clone()),
                "two updates for {} at once",
                event.0
            );
            let permit = self.gate.acquire().await.expect("gate open");
            permit.forget();
            if let Some(delay) = self.delays.get(&event.0) {
                tokio::time::sleep(Duration::from_millis(*delay)).await;
            }
            lock(&self.applied).push(event.clone());
            lock(&self.active).remove(&event.0);
            Ok(())
        }
    }

    fn record(sequence: u32, key: &str, value: u32) -> Record {
        let image: Item = HashMap::from([
            ("k".to_owned(), AttributeValue::S(key.to_owned())),
            ("v".to_owned(), AttributeValue::N(value.to_string())),
        ]);
        Record {
            sequence_number: SequenceNumber::parse(&format!("{sequence:021}")).expect("digits"),
            event: EventKind::Insert,
            keys: Item::new(),
            new_image: Some(image),
            created_at: None,
        }
    }

    fn settings(max_in_flight: usize, dead_letters: DeadLetterDestination) -> DispatchSettings {
        DispatchSettings {
            limits: DispatchLimits {
                max_in_flight,
                max_pending_records: 100_000,
                max_folded_records: 100_000,
                read_ahead_bytes: 1 << 30,
                max_record_age: None,
            },
            retry: RetryPolicy {
                base_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(1),
                max_attempts: Some(1),
            },
            dead_letters,
            worker_id: "test".into(),
        }
    }

    fn scratch_file() -> std::path::PathBuf {
        std::env::temp_dir()
            .join(format!("dispatch-test-{}", fastrand::u64(..)))
            .join("dead-letters.jsonl")
    }

    fn letters(path: &std::path::Path) -> Vec<DeadLetter> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a dead letter"))
            .collect()
    }

    fn dispatcher(handler: Arc<Recorder>, max_in_flight: usize) -> Dispatcher<Recorder> {
        let path = scratch_file();
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        Dispatcher::new(handler, settings(max_in_flight, DeadLetterDestination::File(path)))
    }

    fn through(lane: &DispatchLane<Recorder>) -> Option<String> {
        lane.handled_through()
            .map(|s| s.text().trim_start_matches('0').to_owned())
    }

    #[tokio::test]
    async fn what_fails_for_good_is_dead_lettered_once_and_passed() {
        let handler = Recorder::new(true, &[]);
        let path = scratch_file();
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        let dispatcher = Dispatcher::new(handler.clone(), settings(8, DeadLetterDestination::File(path.clone())));
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        lane.submit(vec![
            record(1, "a", 1),
            record(2, "b", 999),
            record(3, "c", 998),
            record(4, "c", 5),
            record(5, "d", 990),
            record(6, "a", 2),
        ])
        .await;
        lane.drain().await;
        assert_eq!(through(&lane).as_deref(), Some("6"), "the shard moves on");
        let mut applied = handler.applied();
        applied.sort();
        assert_eq!(applied, vec![("a".to_owned(), 2)]);
        let mut letters = letters(&path);
        letters.sort_by(|a, b| a.sequence_number.cmp(&b.sequence_number));
        let summary: Vec<(String, &str, u32, Vec<String>)> = letters
            .iter()
            .map(|l| {
                let covers = l
                    .covers
                    .iter()
                    .map(|c| c.sequence_number().trim_start_matches('0').to_owned())
                    .collect();
                (
                    l.sequence_number.trim_start_matches('0').to_owned(),
                    l.reason.as_str(),
                    l.attempts,
                    covers,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("2".to_owned(), "poison", 0, vec![]),
                ("3".to_owned(), reason::PERMANENT_ERROR, 1, vec!["4".to_owned()]),
                ("5".to_owned(), reason::RETRIES_EXHAUSTED, 1, vec![]),
            ]
        );
        assert_eq!(letters[1].error, "broken 998");
        let replayable = letters[1].record().expect("record");
        assert_eq!(replayable.new_image, record(3, "c", 998).new_image);
    }

    #[tokio::test]
    async fn a_failing_update_stops_retrying_once_its_record_is_too_old() {
        let handler = Recorder::new(true, &[]);
        let path = scratch_file();
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        let mut settings = settings(8, DeadLetterDestination::File(path.clone()));
        settings.retry.max_attempts = None;
        settings.limits.max_record_age = Some(Duration::from_millis(200));
        let dispatcher = Dispatcher::new(handler.clone(), settings);
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        let mut old = record(1, "a", 991);
        old.created_at = Some(SystemTime::now() - Duration::from_millis(100));
        lane.submit(vec![old]).await;
        tokio::time::timeout(Duration::from_secs(10), lane.drain())
            .await
            .expect("gives up after the age limit, not never");
        let letters = letters(&path);
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].reason, reason::RECORD_TOO_OLD);
        assert!(
            letters[0].attempts > 1,
            "retried while young enough: {}",
            letters[0].attempts
        );
    }

    #[tokio::test]
    async fn the_watermark_waits_for_a_dead_letter_that_cannot_be_stored() {
        let handler = Recorder::new(true, &[]);
        let path = scratch_file();
        let dispatcher = Dispatcher::new(handler.clone(), settings(8, DeadLetterDestination::File(path.clone())));
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        lane.submit(vec![record(1, "a", 1), record(2, "b", 999), record(3, "c", 1)])
            .await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while handler.applied().len() < 2 || through(&lane).is_none() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the good records are applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            through(&lane).as_deref(),
            Some("1"),
            "not past the record with no dead letter"
        );
        std::fs::create_dir_all(path.parent().expect("dir")).expect("the destination comes back");
        tokio::time::timeout(Duration::from_secs(5), lane.drain())
            .await
            .expect("proceeds once the destination is back");
        assert_eq!(through(&lane).as_deref(), Some("3"));
        assert_eq!(letters(&path).len(), 1, "written once");
    }

    #[tokio::test]
    async fn a_replay_applies_or_hands_the_letter_back() {
        let handler = Recorder::new(true, &[]);
        let policy = settings(1, DeadLetterDestination::File(scratch_file())).retry;
        let shard = ShardId("s".into());
        let letter = |value| DeadLetter::new(&shard, &record(1, "a", value), "x", "e".into(), 2, "w");
        assert_eq!(replay(handler.as_ref(), &policy, letter(4)).await, Ok("applied"));
        assert_eq!(replay(handler.as_ref(), &policy, letter(0)).await, Ok("zero"));
        let again = replay(handler.as_ref(), &policy, letter(998))
            .await
            .expect_err("fails again");
        assert_eq!((again.reason.as_str(), again.attempts), (reason::PERMANENT_ERROR, 3));
        assert_eq!(handler.applied(), vec![("a".to_owned(), 4)]);
    }

    #[tokio::test]
    async fn a_batch_makes_one_update_per_key_with_the_survivor() {
        let handler = Recorder::new(true, &[]);
        let dispatcher = dispatcher(handler.clone(), 8);
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        let batch = vec![
            record(1, "a", 1),
            record(2, "b", 5),
            record(3, "a", 3),
            record(4, "a", 2),
            record(5, "c", 0),
            record(6, "d", 999),
        ];
        lane.submit(batch).await;
        lane.drain().await;
        let mut applied = handler.applied();
        applied.sort();
        assert_eq!(applied, vec![("a".to_owned(), 3), ("b".to_owned(), 5)]);
        assert_eq!(
            lane.handled_through().map(|s| s.to_string()),
            Some(format!("{:021}", 6))
        );
    }

    #[tokio::test]
    async fn updates_for_one_key_run_in_stream_order_across_batches() {
        // Later updates are faster: without per-key ordering they would finish first. Each on a
        // lane of its own (as after a shard split), so that none joins another.
        let handler = Recorder::new(true, &[("a", 5)]);
        let dispatcher = dispatcher(handler.clone(), 8);
        let mut lanes = Vec::new();
        for (sequence, value) in [(1, 30), (2, 10), (3, 20)] {
            let mut lane = dispatcher.open_lane(&ShardId(format!("s{sequence}")));
            lane.submit(vec![record(sequence, "a", value)]).await;
            lanes.push(lane);
        }
        for lane in &mut lanes {
            lane.drain().await;
        }
        let values: Vec<u32> = handler.applied().into_iter().map(|(_, v)| v).collect();
        assert_eq!(values, vec![30, 10, 20]);
    }

    #[tokio::test]
    async fn later_batches_join_an_update_still_waiting_for_its_turn() {
        let handler = Recorder::new(false, &[]);
        let dispatcher = dispatcher(handler.clone(), 8);
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        lane.submit(vec![record(1, "a", 1)]).await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while !lock(&handler.active).contains("a") {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("record 1's update starts");
        // Record 1's update now runs (blocked on the gate); 2 waits for it; 3 and 4 join 2.
        for (sequence, value) in [(2, 5), (3, 7), (4, 6)] {
            lane.submit(vec![record(sequence, "a", value)]).await;
        }
        assert_eq!(dispatcher.in_flight(), 2, "two updates, not four");
        handler.gate.add_permits(2);
        lane.drain().await;
        assert_eq!(handler.applied(), vec![("a".to_owned(), 1), ("a".to_owned(), 7)]);
        assert_eq!(through(&lane).as_deref(), Some("4"));
    }

    #[tokio::test]
    async fn the_watermark_waits_for_a_slow_key() {
        let handler = Recorder::new(false, &[]);
        let dispatcher = dispatcher(handler.clone(), 8);
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        lane.submit(vec![
            record(1, "slow", 1),
            record(2, "fast", 1),
            record(3, "ignored", 0),
        ])
        .await;
        assert_eq!(lane.handled_through(), None, "nothing has run yet");
        handler.gate.add_permits(1);
        // Whichever key took the permit, the other is blocked; the watermark cannot pass record 1
        // unless record 1 is the one that finished.
        tokio::time::timeout(Duration::from_secs(5), async {
            while handler.applied().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("one update finishes");
        let finished = handler.applied()[0].0.clone();
        let through = lane.handled_through().map(|s| s.to_string());
        if finished == "slow" {
            assert_eq!(through, Some(format!("{:021}", 1)));
        } else {
            assert_eq!(through, None, "record 2 finished but record 1 did not");
        }
        handler.gate.add_permits(1);
        lane.drain().await;
        assert_eq!(
            lane.handled_through().map(|s| s.to_string()),
            Some(format!("{:021}", 3))
        );
    }

    #[tokio::test]
    async fn submit_waits_when_the_in_flight_bound_is_reached() {
        let handler = Recorder::new(false, &[]);
        let dispatcher = dispatcher(handler.clone(), 2);
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        let submitted = Arc::new(AtomicU64::new(0));
        let counter = submitted.clone();
        let task = tokio::spawn(async move {
            lane.submit(vec![record(1, "a", 1), record(2, "b", 1), record(3, "c", 1)])
                .await;
            counter.store(1, Ordering::SeqCst);
            lane
        });
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(submitted.load(Ordering::SeqCst), 0, "third update must wait for room");
        handler.gate.add_permits(3);
        let mut lane = task.await.expect("submit finishes");
        lane.drain().await;
        assert_eq!(handler.applied().len(), 3);
    }

    fn page(from: u32, keys: &[&str], value: u32) -> Vec<Record> {
        keys.iter()
            .enumerate()
            .map(|(n, key)| record(from + n as u32, key, value))
            .collect()
    }

    /// Full pages (a backlog) are held and folded: one update per key for the whole backlog,
    /// with each key's newest value, written only once a page that is not full comes.
    #[tokio::test]
    async fn full_pages_are_held_and_folded_until_the_tip() {
        let handler = Recorder::new(true, &[]);
        let dispatcher = dispatcher(handler.clone(), 8);
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        lane.submit_ahead(page(1, &["a", "b"], 1)).await;
        lane.submit_ahead(page(3, &["b", "a"], 2)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            handler.applied().is_empty(),
            "nothing written while the shard is behind"
        );
        assert_eq!(through(&lane), None);
        lane.submit(page(5, &["c"], 3)).await;
        lane.drain().await;
        let mut applied = handler.applied();
        applied.sort();
        assert_eq!(applied, vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 3)]);
        assert_eq!(through(&lane).as_deref(), Some("5"));
    }

    /// Held updates of every lane share one budget: past it, a lane lets its updates go.
    #[tokio::test]
    async fn the_read_ahead_budget_is_shared_by_every_lane() {
        let handler = Recorder::new(true, &[]);
        let path = scratch_file();
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        let mut settings = settings(64, DeadLetterDestination::File(path));
        let one = record(1, "k0", 1);
        let unit_bytes = 2 * one.approx_bytes() + std::mem::size_of::<Ticket>();
        settings.limits.read_ahead_bytes = 9 * unit_bytes;
        let dispatcher = Dispatcher::new(handler.clone(), settings);
        let mut first = dispatcher.open_lane(&ShardId("s1".into()));
        let mut second = dispatcher.open_lane(&ShardId("s2".into()));
        let keys: Vec<String> = (0..6).map(|n| format!("k{n}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        first.submit_ahead(page(1, &keys, 1)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(handler.applied().is_empty(), "six updates fit in a budget of nine");
        let others: Vec<String> = (0..6).map(|n| format!("other{n}")).collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        second.submit_ahead(page(1, &others, 1)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let applied = handler.applied();
        assert_eq!(
            applied.len(),
            6,
            "the lane that found the budget spent let its six go: {applied:?}"
        );
        assert!(applied.iter().all(|(key, _)| key.starts_with("other")));
        first.drain().await;
        assert_eq!(handler.applied().len(), 12);
    }

    /// Held records count against the pending bound: at it, the lane lets them go instead of
    /// waiting for itself.
    #[tokio::test]
    async fn held_updates_go_when_the_pending_bound_is_reached() {
        let handler = Recorder::new(true, &[]);
        let path = scratch_file();
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        let mut settings = settings(64, DeadLetterDestination::File(path));
        settings.limits.max_pending_records = 4;
        let dispatcher = Dispatcher::new(handler.clone(), settings);
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        let submitted = tokio::time::timeout(Duration::from_secs(5), async {
            for round in 0..5 {
                lane.submit_ahead(page(1 + round * 3, &["a", "b", "c"], round + 1))
                    .await;
            }
        })
        .await;
        assert!(submitted.is_ok(), "the lane never waits for records it holds itself");
        assert!(!handler.applied().is_empty());
        lane.drain().await;
        assert!(handler.applied().contains(&("a".into(), 5)));
    }

    /// A hot conversation in a backlog: 5,000 of its messages among 5,000 others over ten full
    /// pages make one update for it, with its newest message.
    #[tokio::test]
    async fn a_hot_conversation_in_a_backlog_makes_one_update() {
        let handler = Recorder::new(true, &[]);
        handler.gate.add_permits(100_000);
        let dispatcher = dispatcher(handler.clone(), 64);
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        for page in 0..10u32 {
            let records: Vec<Record> = (0..1_000u32)
                .map(|n| {
                    let sequence = page * 1_000 + n + 1;
                    // Values 990-999 fail or are rejected: keep clear of them.
                    if n % 2 == 0 {
                        record(sequence, "hot", sequence + 1_000)
                    } else {
                        record(sequence, &format!("k{sequence}"), 1)
                    }
                })
                .collect();
            if page < 9 {
                lane.submit_ahead(records).await;
            } else {
                lane.submit(records).await;
            }
        }
        lane.drain().await;
        let applied = handler.applied();
        let hot: Vec<&(String, u32)> = applied.iter().filter(|(key, _)| key == "hot").collect();
        assert_eq!(hot, vec![&("hot".to_owned(), 10_999)], "one update, the newest message");
        assert_eq!(applied.len(), 5_001);
        assert_eq!(through(&lane).as_deref(), Some("10000"));
    }

    /// 20,000 conversations with one message each, in full pages: what the lane holds stays
    /// within the budget (plus the page that reached it), and every one is written.
    #[tokio::test]
    async fn twenty_thousand_distinct_conversations_stay_within_the_budget() {
        let handler = Recorder::new(true, &[]);
        handler.gate.add_permits(100_000);
        let path = scratch_file();
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        let mut settings = settings(64, DeadLetterDestination::File(path));
        let budget = 1 << 20;
        settings.limits.read_ahead_bytes = budget;
        let dispatcher = Dispatcher::new(handler.clone(), settings);
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        let mut most = 0;
        for page in 0..20u32 {
            let records: Vec<Record> = (0..1_000u32)
                .map(|n| {
                    let sequence = page * 1_000 + n + 1;
                    record(sequence, &format!("conversation-{sequence}"), 1)
                })
                .collect();
            let page_bytes: usize = records.iter().map(|r| 2 * r.approx_bytes() + 8).sum();
            lane.submit_ahead(records).await;
            let held: usize = lane.held.units.iter().map(Unit::approx_bytes).sum();
            assert!(held <= budget + page_bytes, "held {held} bytes, budget {budget}");
            most = most.max(held);
        }
        assert!(most > budget / 2, "it did hold a backlog: {most}");
        lane.submit(Vec::new()).await;
        lane.drain().await;
        assert_eq!(handler.applied().len(), 20_000);
        assert_eq!(
            dispatcher.shared.budget.available_permits(),
            kib(budget),
            "the budget is whole again"
        );
    }

    /// One update that cannot finish (an hour-long handler) and 100 batches of 1 000 records
    /// behind it: the lane takes records only up to its pending bound, and the stuck key's later
    /// records make updates of at most `max_folded_records` each, then the reader waits.
    #[tokio::test]
    async fn a_stuck_update_bounds_what_the_lane_takes_behind_it() {
        let handler = Recorder::new(true, &[("stuck", 3_600_000)]);
        handler.gate.add_permits(1_000_000);
        let path = scratch_file();
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        let mut settings = settings(64, DeadLetterDestination::File(path));
        settings.limits.max_pending_records = 5_000;
        settings.limits.max_folded_records = 20;
        let dispatcher = Arc::new(Dispatcher::new(handler.clone(), settings));
        let mut lane = dispatcher.open_lane(&ShardId("s".into()));
        let taken = Arc::new(AtomicU64::new(0));
        let counter = taken.clone();
        let reader = tokio::spawn(async move {
            let mut sequence = 0;
            for _ in 0..100 {
                let batch = (0..1_000)
                    .map(|n| {
                        sequence += 1;
                        // Every 100th record, the stuck conversation again.
                        let key = if n % 100 == 0 {
                            "stuck".to_owned()
                        } else {
                            format!("k{sequence}")
                        };
                        record(sequence, &key, 1)
                    })
                    .collect();
                lane.submit(batch).await;
                counter.fetch_add(1_000, Ordering::SeqCst);
            }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let accepted = taken.load(Ordering::SeqCst);
        assert!(accepted <= 5_000, "the lane took {accepted} records behind a stuck one");
        assert!(accepted >= 5_000, "it took records up to the bound: {accepted}");
        assert!(!reader.is_finished(), "the reader waits");
        // 50 records of the stuck key behind the running one: at most 20 per waiting update.
        let in_flight = dispatcher.in_flight();
        assert!((3..=5).contains(&in_flight), "updates in flight: {in_flight}");
        reader.abort();
    }
}
