//! The worker and the reader against the fake source and the in-memory lease table, under
//! `tokio::time::pause`: coordination rules checked in milliseconds, no server.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::fake::{FakeSource, STREAM_ID};
use super::{
    Consumer, Lease, LeaseStore, MemoryLeaseTable, Position, Record, SequenceNumber, ShardId, ShardLane,
    StartingPosition, StreamHealth, StreamReport, StreamSettings, StreamWorker,
};
use crate::lock::lock;
use crate::retry::RetryPolicy;

const LEASE_DURATION: Duration = Duration::from_secs(10);
const TAKE_INTERVAL: Duration = Duration::from_secs(1);

/// Settings for the simulations (and the pacing tests): a 10 s lease, rounds every second.
pub(super) fn settings() -> StreamSettings {
    StreamSettings {
        starting_position: StartingPosition::TrimHorizon,
        batch_size: 100,
        idle_interval: Duration::from_millis(200),
        max_idle_interval: Duration::from_millis(200),
        max_reads_per_second: 5,
        shard_sync_interval: Duration::from_secs(5),
        checkpoint_interval: Duration::from_secs(1),
        lease_duration: LEASE_DURATION,
        lease_take_interval: TAKE_INTERVAL,
        heartbeat_interval: Duration::from_millis(200),
        status_interval: Duration::from_secs(3600),
        retry: RetryPolicy {
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            max_attempts: None,
        },
    }
}

/// Records handed to the consumer, in the order the lanes got them; handled at once.
#[derive(Debug, Default, Clone)]
pub(super) struct Seen(Arc<Mutex<Vec<(ShardId, SequenceNumber)>>>);

impl Seen {
    fn of(&self, shard: &str) -> Vec<SequenceNumber> {
        lock(&self.0)
            .iter()
            .filter(|(id, _)| id.0 == shard)
            .map(|(_, sequence)| sequence.clone())
            .collect()
    }

    /// Records handed over more than once (to one worker or to two).
    pub(super) fn duplicates(&self) -> usize {
        let all = lock(&self.0);
        let distinct: std::collections::HashSet<&(ShardId, SequenceNumber)> = all.iter().collect();
        all.len() - distinct.len()
    }

    pub(super) fn count(&self) -> usize {
        lock(&self.0).len()
    }

    /// Where in the whole order the shard's first and last records came.
    fn span(&self, shard: &str) -> Option<(usize, usize)> {
        let all = lock(&self.0);
        let first = all.iter().position(|(id, _)| id.0 == shard)?;
        let last = all.iter().rposition(|(id, _)| id.0 == shard)?;
        Some((first, last))
    }
}

impl Consumer for Seen {
    type Lane = SeenLane;

    fn open_lane(&self, shard: &ShardId) -> SeenLane {
        SeenLane {
            shard: shard.clone(),
            seen: self.clone(),
            last: None,
        }
    }
}

pub(super) struct SeenLane {
    shard: ShardId,
    seen: Seen,
    last: Option<SequenceNumber>,
}

impl ShardLane for SeenLane {
    async fn submit(&mut self, records: Vec<Record>) {
        let mut seen = lock(&self.seen.0);
        for record in records {
            self.last = Some(record.sequence_number.clone());
            seen.push((self.shard.clone(), record.sequence_number));
        }
    }

    fn handled_through(&self) -> Option<SequenceNumber> {
        self.last.clone()
    }

    async fn drain(&mut self) {}
}

/// One worker of a simulated fleet: its task and its stop.
pub(super) struct Running {
    task: JoinHandle<StreamReport>,
    cancel: CancellationToken,
}

impl Running {
    pub(super) async fn stop(self) -> StreamReport {
        self.cancel.cancel();
        self.task.await.expect("worker task")
    }

    /// Gone without a word (kill -9): nothing released, nothing renewed any more.
    pub(super) fn kill(self) {
        self.task.abort();
    }
}

pub(super) fn start(
    id: &str,
    source: &FakeSource,
    table: &MemoryLeaseTable,
    consumer: &Seen,
    settings: StreamSettings,
) -> Running {
    let worker = StreamWorker::new(
        source.clone(),
        Arc::new(consumer.clone()),
        LeaseStore::new(table.clone(), id),
        settings,
        Arc::new(StreamHealth::default()),
    );
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let task = tokio::spawn(async move { worker.run(stop).await.expect("worker runs") });
    Running { task, cancel }
}

fn owner(table: &MemoryLeaseTable, shard: &str) -> Option<String> {
    table.row(shard).and_then(|row| row.owner)
}

fn owners(table: &MemoryLeaseTable, shards: &[&str]) -> BTreeMap<String, Option<String>> {
    shards.iter().map(|id| ((*id).to_owned(), owner(table, id))).collect()
}

fn held_by(table: &MemoryLeaseTable, shards: &[&str]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for owner in owners(table, shards).into_values().flatten() {
        *counts.entry(owner).or_default() += 1;
    }
    counts
}

fn checkpoint(table: &MemoryLeaseTable, shard: &str) -> Option<Position> {
    table.row(shard).map(|row| row.checkpoint)
}

/// Lets simulated time pass in small steps, so that every timer due in between fires in order.
pub(super) async fn pass(duration: Duration) {
    let step = Duration::from_millis(50);
    let mut left = duration;
    while !left.is_zero() {
        let now = step.min(left);
        tokio::time::sleep(now).await;
        left -= now;
    }
}

/// Passes time until `done` holds, at most `limit`; whether it did.
pub(super) async fn pass_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while !done() {
        if waited >= limit {
            return false;
        }
        tokio::time::sleep(step).await;
        waited += step;
    }
    true
}

/// `AT_TIMESTAMP` on a stream never read: records created before the instant are read but not
/// handed over, every later one is, on open and closed shards alike.
#[tokio::test(start_paused = true)]
async fn at_timestamp_hands_over_only_records_created_from_the_instant_on() {
    let source = FakeSource::with_shards(&["old", "new"]);
    source.put_many("old", 3);
    source.put_many("new", 2);
    std::thread::sleep(Duration::from_millis(5));
    let at = std::time::SystemTime::now();
    std::thread::sleep(Duration::from_millis(5));
    let later_old = source.put_many("old", 2);
    source.split("old", &["child"]);
    let later_new = source.put_many("new", 4);
    let later_child = source.put_many("child", 1);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let mut settings = settings();
    settings.starting_position = StartingPosition::AtTimestamp(at);
    let worker = start("w1", &source, &table, &seen, settings);
    assert!(pass_until(Duration::from_secs(30), || seen.count() == 7).await);
    pass(Duration::from_secs(2)).await;
    worker.stop().await;
    assert_eq!(seen.of("old"), later_old, "the closed shard's later records");
    assert_eq!(seen.of("new"), later_new);
    assert_eq!(seen.of("child"), later_child);
    assert_eq!(seen.count(), 7, "nothing older");
}

#[tokio::test(start_paused = true)]
async fn every_record_reaches_the_consumer_in_shard_order_and_the_end_is_checkpointed() {
    let source = FakeSource::with_shards(&["shard-a", "shard-b"]);
    let written_a = source.put_many("shard-a", 250);
    let written_b = source.put_many("shard-b", 3);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let worker = start("w1", &source, &table, &seen, settings());
    assert!(pass_until(Duration::from_secs(30), || seen.count() == 253).await);
    let report = worker.stop().await;

    assert_eq!(seen.of("shard-a"), written_a, "in order, once each");
    assert_eq!(seen.of("shard-b"), written_b);
    assert_eq!(report.records(), 253);
    for (shard, last) in [("shard-a", &written_a[249]), ("shard-b", &written_b[2])] {
        let row = table.row(shard).expect("row");
        assert_eq!(
            row.checkpoint,
            Position::After(last.clone()),
            "{shard}: the final checkpoint"
        );
        assert_eq!(row.owner, None, "{shard}: released on shutdown");
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_workers_lease_is_taken_after_the_lease_duration_and_read_from_its_checkpoint() {
    let source = FakeSource::with_shards(&["shard-a"]);
    let first = source.put_many("shard-a", 5);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let dead = start("w1", &source, &table, &seen, settings());
    let last = Some(Position::After(first[4].clone()));
    assert!(pass_until(Duration::from_secs(10), || checkpoint(&table, "shard-a") == last).await);
    let standby = start("w2", &source, &table, &seen, settings());
    pass(LEASE_DURATION * 2).await;
    assert_eq!(
        owner(&table, "shard-a").as_deref(),
        Some("w1"),
        "a renewed lease is not taken"
    );

    dead.kill();
    let later = source.put_many("shard-a", 3);
    pass(LEASE_DURATION - Duration::from_secs(1)).await;
    assert_eq!(
        owner(&table, "shard-a").as_deref(),
        Some("w1"),
        "not taken before a lease duration without renewal"
    );
    assert!(pass_until(LEASE_DURATION, || owner(&table, "shard-a").as_deref() == Some("w2")).await);
    assert!(pass_until(Duration::from_secs(5), || seen.count() == 8).await);
    let all: Vec<SequenceNumber> = first.into_iter().chain(later).collect();
    assert_eq!(
        seen.of("shard-a"),
        all,
        "resumed after the checkpoint: nothing skipped, nothing twice"
    );
    standby.stop().await;
}

/// The same for a worker that does not lead: the leader drops it and assigns its shard only once
/// its heartbeats stood still a whole lease duration.
#[tokio::test(start_paused = true)]
async fn a_dead_members_shard_is_assigned_by_the_leader_only_after_the_lease_duration() {
    let shards = ["s0", "s1"];
    let source = FakeSource::with_shards(&shards);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let leader = start("w1", &source, &table, &seen, settings());
    assert!(
        pass_until(Duration::from_secs(5), || held_by(&table, &shards).get("w1")
            == Some(&2))
        .await
    );
    let member = start("w2", &source, &table, &seen, settings());
    assert!(
        pass_until(LEASE_DURATION + TAKE_INTERVAL * 3, || held_by(&table, &shards)
            .get("w2")
            == Some(&1))
        .await
    );
    let shard = *shards
        .iter()
        .find(|shard| owner(&table, shard).as_deref() == Some("w2"))
        .expect("w2 holds one");
    member.kill();
    pass(LEASE_DURATION - Duration::from_secs(1)).await;
    assert_eq!(
        owner(&table, shard).as_deref(),
        Some("w2"),
        "not assigned before a lease duration"
    );
    assert!(table.fleet().beats.contains_key("w2"), "nor dropped from the fleet");
    assert!(
        pass_until(TAKE_INTERVAL * 3, || owner(&table, shard).as_deref() == Some("w1")).await,
        "assigned within a few rounds after it"
    );
    assert!(!table.fleet().beats.contains_key("w2"), "dropped");
    leader.stop().await;
}

#[tokio::test(start_paused = true)]
async fn leadership_moves_only_when_the_leader_is_gone() {
    let source = FakeSource::with_shards(&["s0", "s1", "s2"]);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let first = start("w1", &source, &table, &seen, settings());
    pass(TAKE_INTERVAL).await;
    let others = [
        start("w2", &source, &table, &seen, settings()),
        start("w3", &source, &table, &seen, settings()),
    ];
    pass(LEASE_DURATION * 3).await;
    let fleet = table.fleet();
    assert_eq!(
        (fleet.leader.as_deref(), fleet.term),
        (Some("w1"), 1),
        "one claim, kept"
    );
    first.kill();
    assert!(pass_until(LEASE_DURATION + TAKE_INTERVAL * 3, || table.fleet().term == 2).await);
    let successor = table.fleet().leader.expect("a leader");
    assert_ne!(successor, "w1");
    pass(LEASE_DURATION * 3).await;
    let fleet = table.fleet();
    assert_eq!((fleet.leader, fleet.term), (Some(successor), 2), "and no claim after");
    for worker in others {
        worker.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_worker_gets_its_share_after_a_lease_duration_and_no_lease_moves_twice() {
    let shards = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"];
    let source = FakeSource::with_shards(&shards);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let one = start("w1", &source, &table, &seen, settings());
    assert!(
        pass_until(Duration::from_secs(5), || held_by(&table, &shards).get("w1")
            == Some(&8))
        .await
    );
    let before = owners(&table, &shards);
    let two = start("w2", &source, &table, &seen, settings());
    // A newcomer gets no live lease for a lease duration (a deploy's old task may be about to
    // leave it its shards), then its whole share in one round: one heartbeat for the leader to
    // see it, one round to assign, one for the hand-overs.
    pass(LEASE_DURATION - TAKE_INTERVAL).await;
    assert_eq!(held_by(&table, &shards).get("w2"), None, "not before a lease duration");
    assert!(
        pass_until(TAKE_INTERVAL * 4, || held_by(&table, &shards).get("w2") == Some(&4)).await,
        "{:?}",
        held_by(&table, &shards)
    );
    let settled = owners(&table, &shards);
    let moved = shards
        .iter()
        .filter(|shard| before[**shard] != settled[**shard])
        .count();
    assert_eq!(moved, 4, "exactly the newcomer's share moved");
    pass(LEASE_DURATION * 3).await;
    assert_eq!(owners(&table, &shards), settled, "even shares stay put");
    one.stop().await;
    two.stop().await;
}

const EIGHT_SHARDS: [&str; 8] = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"];

/// Eight shards read by "w1", then shared with "w2" (four handed over), a few rounds settled.
async fn eight_shards_shared_by_two(settings: StreamSettings) -> (MemoryLeaseTable, Running, Running) {
    let shards = EIGHT_SHARDS;
    let source = FakeSource::with_shards(&shards);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let one = start("w1", &source, &table, &seen, settings.clone());
    assert!(
        pass_until(Duration::from_secs(5), || held_by(&table, &shards).get("w1")
            == Some(&8))
        .await
    );
    let two = start("w2", &source, &table, &seen, settings);
    assert!(pass_until(LEASE_DURATION * 2, || held_by(&table, &shards).get("w2") == Some(&4)).await);
    pass(TAKE_INTERVAL * 3).await;
    (table, one, two)
}

#[tokio::test(start_paused = true)]
async fn the_leader_learns_of_finished_hand_overs_within_a_round_not_at_its_next_scan() {
    use super::LeaseTable as _;
    let mut settings = settings();
    settings.shard_sync_interval = Duration::from_secs(60);
    let (table, one, two) = eight_shards_shared_by_two(settings).await;
    let giver = table.assignment("w1").await.expect("assignment");
    assert!(
        giver.give.is_empty(),
        "hand-overs done are off the giver's assignment: {giver:?}"
    );
    let receiver = table.assignment("w2").await.expect("assignment");
    assert_eq!(
        receiver.receive.len(),
        4,
        "the receiver's says where each lease came from: {receiver:?}"
    );
    one.stop().await;
    two.stop().await;
}

/// A new leader starts from the assignments its predecessor wrote: a move it assigned stays on
/// the receiver's assignment, saying where the lease came from, until the shard moves on. (A
/// leader that stepped down used to leave the receiver an assignment rewritten without it, and
/// a hand-over finishing just then went uncounted.)
#[tokio::test(start_paused = true)]
async fn a_new_leader_keeps_where_its_predecessors_moves_came_from() {
    use super::LeaseTable as _;
    let shards = EIGHT_SHARDS;
    let (table, one, two) = eight_shards_shared_by_two(settings()).await;
    let received: Vec<ShardId> = table
        .assignment("w2")
        .await
        .expect("assignment")
        .receive
        .into_keys()
        .collect();
    assert_eq!(received.len(), 4);
    one.stop().await;
    assert!(
        pass_until(LEASE_DURATION * 3, || table.fleet().leader.as_deref() == Some("w2")
            && held_by(&table, &shards).get("w2") == Some(&8))
        .await
    );
    pass(TAKE_INTERVAL * 3).await;
    let after = table.assignment("w2").await.expect("assignment");
    assert_eq!(after.shards.len(), 8, "{after:?}");
    for shard in &received {
        assert_eq!(
            after.receive.get(shard).map(String::as_str),
            Some("w1"),
            "the new leader dropped where {shard} came from: {after:?}"
        );
    }
    two.stop().await;
}

#[tokio::test(start_paused = true)]
async fn leases_released_on_shutdown_are_taken_within_a_round_from_the_final_checkpoint() {
    let shards = ["s0", "s1", "s2"];
    let source = FakeSource::with_shards(&shards);
    for shard in shards {
        source.put_many(shard, 10);
    }
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let leaving = start("w1", &source, &table, &seen, settings());
    let all_checkpointed = || {
        shards
            .iter()
            .all(|shard| matches!(checkpoint(&table, shard), Some(Position::After(_))))
    };
    assert!(pass_until(Duration::from_secs(5), all_checkpointed).await);
    let staying = start("w2", &source, &table, &seen, settings());
    pass(TAKE_INTERVAL / 2).await;
    leaving.stop().await;
    pass(TAKE_INTERVAL * 2).await;
    assert_eq!(
        held_by(&table, &shards).get("w2"),
        Some(&3),
        "taken at once, not after expiry"
    );
    for shard in shards {
        source.put(shard, "after the handoff");
    }
    assert!(pass_until(Duration::from_secs(5), || seen.count() == 33).await);
    assert_eq!(
        seen.of("s0").len(),
        11,
        "the new owner starts after the final checkpoint"
    );
    staying.stop().await;
}

#[tokio::test(start_paused = true)]
async fn children_are_read_only_after_every_parent_ends() {
    let source = FakeSource::with_shards(&["parent-a", "parent-b"]);
    source.put_many("parent-a", 300);
    source.put_many("parent-b", 2);
    source.split("parent-a", &["child-a1", "child-a2"]);
    source.put_many("child-a1", 5);
    source.merge(["child-a2", "parent-b"], "grandchild");
    source.put_many("grandchild", 5);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let mut settings = settings();
    settings.batch_size = 7;
    let worker = start("w1", &source, &table, &seen, settings);
    assert!(pass_until(Duration::from_secs(60), || seen.count() == 312).await);
    worker.stop().await;

    let (_, parent_a_last) = seen.span("parent-a").expect("parent-a read");
    let (_, parent_b_last) = seen.span("parent-b").expect("parent-b read");
    let (child_first, _) = seen.span("child-a1").expect("child read");
    let (grandchild_first, _) = seen.span("grandchild").expect("grandchild read");
    assert!(child_first > parent_a_last, "a child after its parent");
    assert!(grandchild_first > parent_b_last, "a merge after both of its parents");
    for shard in ["parent-a", "parent-b", "child-a2"] {
        assert!(table.row(shard).expect("row").shard_end, "{shard} finished");
    }
}

/// A stream of 250 shards (three pages to list), one read record each, read by one worker that
/// lists it every minute; its DescribeStream calls once everything was read.
async fn listed_rarely(source: &FakeSource, seen: &Seen, table: &MemoryLeaseTable) -> (Running, u64) {
    let names: Vec<String> = (0..250).map(|i| format!("shard-{i:03}")).collect();
    for name in &names {
        source.add_shard(name, &[]);
        source.put(name, "first");
    }
    let mut settings = settings();
    settings.shard_sync_interval = Duration::from_secs(60);
    let worker = start("w1", source, table, seen, settings);
    assert!(pass_until(Duration::from_secs(20), || seen.count() == 250).await);
    (worker, source.describe_calls())
}

#[tokio::test(start_paused = true)]
async fn a_finished_shards_children_are_looked_up_at_once_without_listing_the_stream() {
    let (source, table, seen) = (FakeSource::default(), MemoryLeaseTable::default(), Seen::default());
    let (worker, calls) = listed_rarely(&source, &seen, &table).await;
    source.put("shard-007", "last");
    source.split("shard-007", &["shard-007-a", "shard-007-b"]);
    source.put_many("shard-007-a", 2);
    source.put_many("shard-007-b", 2);
    assert!(
        pass_until(Duration::from_secs(10), || seen.count() == 255).await,
        "the children are read long before the next listing"
    );
    assert_eq!(
        source.describe_calls() - calls,
        1,
        "one lookup of the finished shard's children, no listing"
    );
    worker.stop().await;
}

#[tokio::test(start_paused = true)]
async fn children_a_lookup_does_not_find_are_found_by_listing_at_once() {
    let (source, table, seen) = (FakeSource::default(), MemoryLeaseTable::default(), Seen::default());
    let (worker, calls) = listed_rarely(&source, &seen, &table).await;
    source.leave_children_unanswered();
    source.put("shard-007", "last");
    source.split("shard-007", &["shard-007-a"]);
    source.put_many("shard-007-a", 2);
    assert!(pass_until(Duration::from_secs(10), || seen.count() == 253).await);
    assert_eq!(
        source.describe_calls() - calls,
        4,
        "one lookup, then one listing of three pages"
    );
    pass(Duration::from_secs(30)).await;
    assert_eq!(source.describe_calls() - calls, 4, "each finished shard looked up once");
    worker.stop().await;
}

/// A worker that led once, was cut off, and leads again lists the stream anew: shards another
/// leader found meanwhile are assigned at once, not at its next listing a minute on.
#[tokio::test(start_paused = true)]
async fn a_worker_that_leads_again_lists_the_stream_anew() {
    let source = FakeSource::with_shards(&["parent"]);
    let table = MemoryLeaseTable::default();
    let (seen_one, seen_two) = (Seen::default(), Seen::default());
    let mut settings = settings();
    settings.shard_sync_interval = Duration::from_secs(120);
    let two_table = table.handle();
    let two = start("w2", &source, &two_table, &seen_two, settings.clone());
    source.put("parent", "first");
    assert!(pass_until(Duration::from_secs(5), || seen_two.count() == 1).await);
    let one = start("w1", &source, &table, &seen_one, settings);
    pass(TAKE_INTERVAL * 2).await;
    // w2 (the leader, which has listed) is cut off; a shard appears (found only by listing:
    // it has no parent to look up), and w1 takes over, lists and takes it.
    two_table.cut_off(true);
    source.add_shard("late", &[]);
    assert!(pass_until(LEASE_DURATION * 3, || owner(&table, "late").as_deref() == Some("w1")).await);
    two_table.cut_off(false);
    pass(TAKE_INTERVAL * 3).await;
    // w1 dies: w2 leads again and must know the shard without waiting for its next listing.
    one.kill();
    source.put_many("late", 2);
    assert!(
        pass_until(LEASE_DURATION * 3, || seen_two.of("late").len() >= 2).await,
        "the shard is read once the new leader lists, well before a minute"
    );
    two.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_shard_that_vanishes_finishes_its_lease_and_unblocks_its_children() {
    let source = FakeSource::with_shards(&["old"]);
    source.put_many("old", 3);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let worker = start("w1", &source, &table, &seen, settings());
    assert!(pass_until(Duration::from_secs(5), || seen.count() == 3).await);
    source.split("old", &["new"]);
    source.put_many("new", 2);
    source.remove("old");
    assert!(pass_until(Duration::from_secs(30), || seen.count() == 5).await);
    assert_eq!(seen.of("new").len(), 2);
    assert!(
        table.row("old").is_none_or(|row| row.shard_end),
        "the vanished shard's lease is finished by its reader (then removed), not left to be retired"
    );
    worker.stop().await;
}

#[tokio::test(start_paused = true)]
async fn heartbeats_go_on_while_the_lease_table_scan_is_slow() {
    let shards = ["s0", "s1"];
    let source = FakeSource::with_shards(&shards);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let holder = start("w1", &source, &table, &seen, settings());
    assert!(
        pass_until(Duration::from_secs(5), || held_by(&table, &shards).get("w1")
            == Some(&2))
        .await
    );
    // Every scan now takes longer than a lease lasts; the holder's beats must not wait for one.
    table.set_scan_delay(LEASE_DURATION * 2);
    let rival = start("w2", &source, &table, &seen, settings());
    let beat = |table: &MemoryLeaseTable| table.fleet().beats.get("w1").copied();
    let mut before = beat(&table);
    for _ in 0..6 {
        pass(LEASE_DURATION / 4).await;
        let now = beat(&table);
        assert!(now > before, "beats within every quarter lease duration");
        before = now;
    }
    assert_eq!(held_by(&table, &shards).get("w1"), Some(&2), "never taken as expired");
    rival.kill();
    holder.kill();
}

/// Never two readers of one shard past a lease duration: a worker cut off from the lease table
/// (it still reaches the stream) stops reading a lease duration after its last heartbeat, the
/// successor resumes after the last checkpoint, and the cut-off worker, once it reaches the
/// table again, neither reads on nor takes the shard back.
#[tokio::test(start_paused = true)]
async fn a_worker_cut_off_from_the_lease_table_stops_reading_within_a_lease_duration() {
    let source = FakeSource::with_shards(&["shard-a"]);
    let table = MemoryLeaseTable::default();
    let (cut_seen, other_seen) = (Seen::default(), Seen::default());
    let mut settings = settings();
    // Without the fence only a checkpoint would stop the cut-off reader: make that far away.
    settings.checkpoint_interval = Duration::from_secs(600);
    let cut_table = table.handle();
    let cut = start("w1", &source, &cut_table, &cut_seen, settings.clone());
    source.put_many("shard-a", 3);
    assert!(pass_until(Duration::from_secs(5), || cut_seen.count() == 3).await);
    let other = start("w2", &source, &table, &other_seen, settings);
    pass(TAKE_INTERVAL * 2).await;
    assert_eq!(owner(&table, "shard-a").as_deref(), Some("w1"));

    cut_table.cut_off(true);
    // A record every 100 ms from here on, for three lease durations.
    for _ in 0..10 * 30 {
        source.put("shard-a", "during the cut");
        pass(Duration::from_millis(100)).await;
        if owner(&table, "shard-a").as_deref() == Some("w2") {
            break;
        }
    }
    assert_eq!(
        owner(&table, "shard-a").as_deref(),
        Some("w2"),
        "taken over while cut off"
    );
    let read_by_cut = cut_seen.count();
    for _ in 0..10 * 10 {
        source.put("shard-a", "after the takeover");
        pass(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cut_seen.count(),
        read_by_cut,
        "the cut-off worker had stopped reading before it"
    );
    cut_table.cut_off(false);
    for _ in 0..10 * 10 {
        source.put("shard-a", "after the cut healed");
        pass(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cut_seen.count(),
        read_by_cut,
        "and reads nothing once it reaches the table again"
    );
    assert_eq!(
        owner(&table, "shard-a").as_deref(),
        Some("w2"),
        "nor takes the shard back"
    );
    let last = source.put("shard-a", "last");
    assert!(
        pass_until(Duration::from_secs(5), || other_seen.of("shard-a").last()
            == Some(&last))
        .await,
        "the successor reads on to the end"
    );
    cut.kill();
    other.stop().await;
}

/// A member whose beat lands just as the leader finds it dead: whatever the moment the partition
/// heals, the member never reads a shard after the leader gave it to someone else.
#[tokio::test(start_paused = true)]
async fn a_member_healing_as_it_is_found_dead_never_reads_beside_its_successor() {
    for step in 0..30u64 {
        let source = FakeSource::with_shards(&["s0", "s1"]);
        let table = MemoryLeaseTable::default();
        let (leader_seen, member_seen) = (Seen::default(), Seen::default());
        let mut settings = settings();
        settings.checkpoint_interval = Duration::from_secs(600);
        let leader = start("w1", &source, &table, &leader_seen, settings.clone());
        pass(TAKE_INTERVAL).await;
        let member_table = table.handle();
        let member = start("w2", &source, &member_table, &member_seen, settings);
        assert!(
            pass_until(LEASE_DURATION + TAKE_INTERVAL * 4, || held_by(&table, &["s0", "s1"])
                .get("w2")
                == Some(&1))
            .await
        );
        let shard = if owner(&table, "s0").as_deref() == Some("w2") {
            "s0"
        } else {
            "s1"
        };
        member_table.cut_off(true);
        pass(LEASE_DURATION - Duration::from_millis(500) + Duration::from_millis(50 * step)).await;
        member_table.cut_off(false);
        let mut taken_at = None;
        for _ in 0..10 * 20 {
            source.put(shard, "steady");
            pass(Duration::from_millis(100)).await;
            let owned = owner(&table, shard);
            match (taken_at, owned.as_deref()) {
                (None, Some("w1")) => taken_at = Some(member_seen.of(shard).len()),
                (Some(count), _) => assert!(
                    member_seen.of(shard).len() <= count,
                    "healed at +{} ms: the member read on after the leader took its shard",
                    50 * step
                ),
                _ => {}
            }
        }
        member.kill();
        leader.kill();
    }
}

#[tokio::test(start_paused = true)]
async fn checkpoints_are_written_at_the_interval_not_per_batch() {
    let source = FakeSource::with_shards(&["shard-a"]);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let mut settings = settings();
    settings.checkpoint_interval = Duration::from_secs(2);
    settings.idle_interval = Duration::from_millis(100);
    let worker = start("w1", &source, &table, &seen, settings);
    pass(Duration::from_secs(2)).await;
    let start_counter = table.row("shard-a").expect("row").counter;
    // A record every 100 ms for 20 s: some 200 batches.
    for _ in 0..200 {
        source.put("shard-a", "steady");
        pass(Duration::from_millis(100)).await;
    }
    let writes = table.row("shard-a").expect("row").counter - start_counter;
    // Checkpoints (every 2 s, ten in 20 s) move it; heartbeats go to the fleet row, not here.
    assert!(
        (9..=11).contains(&writes),
        "one checkpoint per interval, no renewals, not one per batch: {writes} writes"
    );
    assert!(seen.count() >= 195, "reading kept pace");
    assert!(pass_until(Duration::from_secs(2), || seen.count() == 200).await);
    let report = worker.stop().await;
    assert_eq!(report.records(), 200);
}

#[tokio::test(start_paused = true)]
async fn throttled_reads_and_expired_iterators_lose_and_repeat_nothing() {
    let source = FakeSource::with_shards(&["shard-a"]);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let worker = start("w1", &source, &table, &seen, settings());
    let mut written = source.put_many("shard-a", 20);
    assert!(pass_until(Duration::from_secs(5), || seen.count() == 20).await);
    source.throttle(5);
    written.extend(source.put_many("shard-a", 20));
    assert!(pass_until(Duration::from_secs(30), || seen.count() == 40).await);
    source.expire_iterators();
    written.extend(source.put_many("shard-a", 20));
    assert!(pass_until(Duration::from_secs(30), || seen.count() == 60).await);
    pass(Duration::from_secs(2)).await;
    assert_eq!(seen.of("shard-a"), written, "each record once, in order");
    worker.stop().await;
}

#[tokio::test(start_paused = true)]
async fn records_trimmed_before_they_were_read_restart_the_shard_at_the_horizon() {
    let source = FakeSource::with_shards(&["shard-a"]);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let written = source.put_many("shard-a", 10);
    table.put(Lease {
        shard: ShardId("shard-a".into()),
        checkpoint: Position::After(written[1].clone()),
        owner: None,
        parents: Vec::new(),
        shard_end: false,
        stream_id: Some(STREAM_ID.into()),
        counter: 3,
    });
    source.trim("shard-a", 6);
    let worker = start("w1", &source, &table, &seen, settings());
    assert!(pass_until(Duration::from_secs(10), || seen.count() == 4).await);
    assert_eq!(seen.of("shard-a"), written[6..].to_vec(), "from the horizon on");
    worker.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_taken_by_another_stops_its_reader_without_a_checkpoint() {
    let source = FakeSource::with_shards(&["shard-a"]);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let worker = start("w1", &source, &table, &seen, settings());
    let first = source.put_many("shard-a", 3);
    let last = Some(Position::After(first[2].clone()));
    assert!(pass_until(Duration::from_secs(5), || checkpoint(&table, "shard-a") == last).await);
    let mut stolen = table.row("shard-a").expect("row");
    stolen.owner = Some("w9".into());
    stolen.counter += 1;
    stolen.checkpoint = Position::TrimHorizon;
    table.put(stolen.clone());
    source.put_many("shard-a", 3);
    pass(Duration::from_secs(5)).await;
    assert_eq!(table.row("shard-a"), Some(stolen), "w1 wrote nothing over w9's lease");
    worker.stop().await;
    assert_eq!(
        owner(&table, "shard-a").as_deref(),
        Some("w9"),
        "nor released it on shutdown"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_shard_costs_one_read_per_idle_interval() {
    let source = FakeSource::with_shards(&["shard-a"]);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let worker = start("w1", &source, &table, &seen, settings());
    pass(Duration::from_secs(2)).await;
    let before = source.reads();
    pass(Duration::from_secs(20)).await;
    let reads = source.reads() - before;
    // idle_interval is 200 ms: 100 reads in 20 s, give or take the round they fall in.
    assert!((95..=101).contains(&reads), "{reads} reads of an idle shard in 20 s");
    worker.stop().await;
}

/// Log lines written while `body` runs (this thread's tasks only: tests run on one thread).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&lock(&self.0))
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_steal_is_logged_once_on_each_side_and_never_as_a_warning() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let shards = ["s0", "s1", "s2", "s3"];
    let source = FakeSource::with_shards(&shards);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let one = start("w1", &source, &table, &seen, settings());
    assert!(
        pass_until(Duration::from_secs(5), || held_by(&table, &shards).get("w1")
            == Some(&4))
        .await
    );
    let two = start("w2", &source, &table, &seen, settings());
    assert!(
        pass_until(LEASE_DURATION + Duration::from_secs(10), || held_by(&table, &shards)
            .get("w2")
            == Some(&2))
        .await
    );
    pass(TAKE_INTERVAL * 3).await;
    one.kill();
    two.kill();

    let lines = captured.lines();
    let warnings: Vec<&String> = lines.iter().filter(|line| line.contains(" WARN ")).collect();
    assert!(warnings.is_empty(), "a steal is routine, not a warning: {warnings:#?}");
    let count = |text: &str| lines.iter().filter(|line| line.contains(text)).count();
    assert_eq!(
        count("reason=\"stolen\" from=\"w1\""),
        2,
        "the taker says so once per lease"
    );
    assert_eq!(count("lease handed over"), 2, "the giver says so once per lease");
    assert_eq!(count("lease taken by another worker"), 0, "a hand-over, not a loss");
}

#[tokio::test(start_paused = true)]
async fn a_quiet_shard_is_read_under_once_a_second_and_a_new_record_still_comes_within_the_max_idle() {
    let source = FakeSource::with_shards(&["shard-a"]);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let mut settings = settings();
    settings.idle_interval = Duration::from_millis(250);
    settings.max_idle_interval = Duration::from_millis(1500);
    let worker = start("w1", &source, &table, &seen, settings);
    pass(super::pacing::QUIET_AFTER + Duration::from_secs(5)).await;
    let before = source.reads();
    pass(Duration::from_secs(60)).await;
    let reads = source.reads() - before;
    assert!(
        (39..=41).contains(&reads),
        "{reads} reads of a quiet shard in 60 s (one per 1.5 s)"
    );

    source.put("shard-a", "after the quiet");
    assert!(
        pass_until(Duration::from_millis(1550), || seen.count() == 1).await,
        "read within the longest idle wait"
    );
    // Records came: reading is fast again at once.
    let before = source.reads();
    source.put("shard-a", "soon after");
    assert!(
        pass_until(Duration::from_millis(300), || seen.count() == 2).await,
        "back to the short wait"
    );
    assert!(source.reads() - before <= 3);
    worker.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_shard_is_read_at_most_max_reads_per_second() {
    let source = FakeSource::with_shards(&["shard-a"]);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let mut settings = settings();
    settings.batch_size = 10;
    let worker = start("w1", &source, &table, &seen, settings);
    pass(Duration::from_secs(1)).await;
    source.put_many("shard-a", 500);
    let before = source.reads();
    pass(Duration::from_secs(4)).await;
    let reads = source.reads() - before;
    assert!((19..=21).contains(&reads), "{reads} reads in 4 s at 5 a second");
    assert!(
        pass_until(Duration::from_secs(20), || seen.count() == 500).await,
        "and everything is read"
    );
    worker.stop().await;
}

/// A consumer that notes, as each batch reaches it, how many reads the source had answered.
#[derive(Clone)]
struct ReadsAtSubmit {
    source: FakeSource,
    noted: Arc<Mutex<Vec<(usize, u64)>>>,
}

impl Consumer for ReadsAtSubmit {
    type Lane = ReadsAtSubmitLane;

    fn open_lane(&self, _shard: &ShardId) -> ReadsAtSubmitLane {
        ReadsAtSubmitLane {
            consumer: self.clone(),
            last: None,
        }
    }
}

struct ReadsAtSubmitLane {
    consumer: ReadsAtSubmit,
    last: Option<SequenceNumber>,
}

impl ShardLane for ReadsAtSubmitLane {
    async fn submit(&mut self, records: Vec<Record>) {
        let reads = self.consumer.source.reads();
        if let Some(last) = records.last() {
            self.last = Some(last.sequence_number.clone());
        }
        lock(&self.consumer.noted).push((records.len(), reads));
    }

    fn handled_through(&self) -> Option<SequenceNumber> {
        self.last.clone()
    }

    async fn drain(&mut self) {}
}

/// Unpaced, the next page is asked for before the lane takes the last one, so that the lane's
/// work (routing, folding) overlaps the read instead of delaying it.
#[tokio::test(start_paused = true)]
async fn the_next_page_is_asked_for_before_the_lane_takes_the_last() {
    let source = FakeSource::with_shards(&["shard-a"]);
    source.put_many("shard-a", 300);
    let consumer = ReadsAtSubmit {
        source: source.clone(),
        noted: Arc::default(),
    };
    let worker = StreamWorker::new(
        source.clone(),
        Arc::new(consumer.clone()),
        LeaseStore::new(MemoryLeaseTable::default(), "w1"),
        StreamSettings {
            // No spacing between reads.
            max_reads_per_second: u32::MAX,
            ..settings()
        },
        Arc::new(StreamHealth::default()),
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(worker.run(cancel.clone()));
    let noted = consumer.noted.clone();
    let handed = || lock(&noted).iter().map(|(records, _)| records).sum::<usize>();
    assert!(pass_until(Duration::from_secs(30), || handed() == 300).await);
    cancel.cancel();
    task.await.expect("worker task").expect("worker runs");
    let pages: Vec<(usize, u64)> = lock(&noted)
        .iter()
        .copied()
        .filter(|(records, _)| *records > 0)
        .collect();
    let reads_before: Vec<u64> = pages.iter().map(|(_, reads)| *reads).collect();
    // Page k (from 1) reaches the lane once read k + 1 was made (the last page's: the empty
    // read at the tip).
    assert_eq!(reads_before.len(), 3, "{pages:?}");
    for (index, reads) in reads_before.iter().enumerate() {
        assert!(
            *reads >= index as u64 + 2,
            "page {}: {reads} reads made: {pages:?}",
            index + 1
        );
    }
}
