//! The fleet at the size users run, in one process: 1,000 shards and 20 workers on the in-memory
//! lease table and the fake source, under simulated time. Joins, an idle spell, a rolling deploy,
//! a kill and a resharding, each checked for fencing (no record handed to two workers where
//! nothing crashed), balance and moves, and the lease table's cost in capacity units.
//!
//! The figures are printed (`cargo nextest run simulation --no-capture`) and asserted against
//! the goals of issue 15.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::fake::FakeSource;
use super::lease::memory::Usage;
use super::record::ShardId;
use super::tests::{pass, pass_until, settings, start, Running, Seen};
use super::{MemoryLeaseTable, StreamSettings};

const SHARDS: usize = 1_000;
const WORKERS: usize = 20;
const LEASE_DURATION: Duration = Duration::from_secs(8);

/// The defaults of `config/default.toml` where they shape coordination.
fn fleet_settings() -> StreamSettings {
    let mut settings = settings();
    settings.heartbeat_interval = Duration::from_secs(1);
    settings.lease_take_interval = Duration::from_millis(500);
    settings.lease_duration = LEASE_DURATION;
    settings.shard_sync_interval = Duration::from_secs(60);
    settings.checkpoint_interval = Duration::from_secs(1);
    settings.idle_interval = Duration::from_millis(250);
    settings.max_idle_interval = Duration::from_millis(1500);
    settings
}

/// Who owned each shard, and how often each changed hands, sampled every 100 ms.
#[derive(Default)]
struct Ledger {
    last: HashMap<ShardId, String>,
    moves: HashMap<ShardId, u32>,
}

impl Ledger {
    fn observe(&mut self, table: &MemoryLeaseTable) {
        for (shard, owner) in table.owners() {
            let Some(owner) = owner else { continue };
            if let Some(before) = self.last.insert(shard.clone(), owner.clone()) {
                if before != owner {
                    *self.moves.entry(shard).or_default() += 1;
                }
            }
        }
    }

    fn total(&self) -> u32 {
        self.moves.values().sum()
    }

    fn most(&self) -> u32 {
        self.moves.values().copied().max().unwrap_or(0)
    }

    fn reset(&mut self) {
        self.moves.clear();
    }

    /// Lets `duration` pass, sampling as it goes.
    async fn watch(&mut self, table: &MemoryLeaseTable, duration: Duration) {
        let step = Duration::from_millis(100);
        let mut left = duration;
        while !left.is_zero() {
            pass(step.min(left)).await;
            left = left.saturating_sub(step);
            self.observe(table);
        }
    }

    /// Samples until every shard is held and shares are within one among `workers`, at most
    /// `limit`; how long it took.
    async fn until_balanced(
        &mut self,
        table: &MemoryLeaseTable,
        shards: usize,
        workers: usize,
        limit: Duration,
    ) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit {
            self.watch(table, Duration::from_millis(100)).await;
            if balanced(table, shards, workers) {
                return Some(started.elapsed());
            }
        }
        None
    }
}

fn shares(table: &MemoryLeaseTable) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for owner in table.owners().into_values().flatten() {
        *counts.entry(owner).or_default() += 1;
    }
    counts
}

/// Every shard still read (`shards` of them) held, and shares within one among `workers`.
fn balanced(table: &MemoryLeaseTable, shards: usize, workers: usize) -> bool {
    let owners = table.owners();
    let counts = shares(table);
    owners.len() == shards
        && owners.values().all(Option::is_some)
        && counts.len() == workers
        && counts
            .values()
            .max()
            .zip(counts.values().min())
            .is_some_and(|(max, min)| max - min <= 1)
}

fn per_second(before: Usage, after: Usage, seconds: f64) -> (f64, f64) {
    (
        (after.read_units - before.read_units) / seconds,
        (after.write_units - before.write_units) / seconds,
    )
}

#[tokio::test(start_paused = true)]
async fn a_thousand_shards_and_twenty_workers() {
    let names: Vec<String> = (0..SHARDS).map(|i| format!("shardId-{i:012}")).collect();
    let ids: Vec<&str> = names.iter().map(String::as_str).collect();
    let source = FakeSource::with_shards(&ids);
    let (table, seen) = (MemoryLeaseTable::default(), Seen::default());
    let mut ledger = Ledger::default();

    // Twenty tasks start together.
    let mut fleet: Vec<(String, Running)> = (0..WORKERS)
        .map(|i| {
            let id = format!("old-{i:02}");
            let running = start(&id, &source, &table, &seen, fleet_settings());
            (id, running)
        })
        .collect();
    let took = ledger
        .until_balanced(&table, SHARDS, WORKERS, Duration::from_secs(60))
        .await;
    println!("start: balanced after {took:?}, {} moves", ledger.total());
    // Workers the first leader did not see yet are newcomers: their share comes a lease duration on.
    assert!(
        took.is_some_and(|took| took <= LEASE_DURATION + Duration::from_secs(5)),
        "balanced: {:?}",
        shares(&table)
    );

    // Idle: what the lease table costs.
    ledger.watch(&table, Duration::from_secs(30)).await;
    let (before, calls) = (table.usage(), source.describe_calls());
    ledger.watch(&table, Duration::from_secs(120)).await;
    let (reads, writes) = per_second(before, table.usage(), 120.0);
    let describes = (source.describe_calls() - calls) as f64 / 120.0;
    println!(
        "idle, 20 workers x 1,000 shards: {reads:.2} read units/s, {writes:.2} write units/s, \
         {describes:.2} DescribeStream calls/s"
    );
    assert!(
        describes < 1.0,
        "the fleet under 1 DescribeStream call/s idle: {describes:.2}"
    );
    assert!(reads <= 10.0, "lease-table reads at most 10 units/s idle: {reads:.2}");
    assert!(
        writes <= WORKERS as f64,
        "at most one write unit per worker per second idle: {writes:.2}"
    );

    // One record per shard, then a rolling deploy: a new task starts, the old one is stopped.
    for id in &ids {
        source.put(id, "before the deploy");
    }
    ledger.watch(&table, Duration::from_secs(5)).await;
    ledger.reset();
    let (deploy_started, calls) = (Instant::now(), source.describe_calls());
    for i in 0..WORKERS {
        let id = format!("new-{i:02}");
        let running = start(&id, &source, &table, &seen, fleet_settings());
        fleet.push((id, running));
        ledger.watch(&table, Duration::from_secs(3)).await;
        let (_, old) = fleet.remove(0);
        old.stop().await;
        ledger.observe(&table);
    }
    let took = ledger
        .until_balanced(&table, SHARDS, WORKERS, Duration::from_secs(60))
        .await;
    let twice = ledger.moves.values().filter(|moves| **moves > 1).count();
    let describes = (source.describe_calls() - calls) as f64 / deploy_started.elapsed().as_secs_f64();
    println!("rolling deploy: {describes:.2} DescribeStream calls/s");
    assert!(
        describes < 1.0,
        "the fleet under 1 DescribeStream call/s through a deploy: {describes:.2}"
    );
    println!(
        "rolling deploy of 20: {:?} then balanced after {took:?}; {} moves for {SHARDS} shards (minimum {SHARDS}), \
         {twice} shards moved more than once, at most {} times",
        deploy_started.elapsed(),
        ledger.total(),
        ledger.most()
    );
    assert!(took.is_some(), "balanced after the deploy: {:?}", shares(&table));
    assert!(
        f64::from(ledger.total()) <= 1.1 * SHARDS as f64,
        "moves at most 1.1 x the minimum (each old task's shards once)"
    );
    assert_eq!(twice, 0, "no lease moves twice in a rolling deploy");
    for id in &ids {
        source.put(id, "after the deploy");
    }
    assert!(pass_until(Duration::from_secs(30), || seen.count() >= 2 * SHARDS).await);
    assert_eq!(
        seen.duplicates(),
        0,
        "no record handed to two workers through joins and hand-overs"
    );

    // A kill: its shards go to the others after the lease duration, nothing else moves.
    ledger.reset();
    let (victim, running) = fleet.remove(WORKERS / 2);
    let held = shares(&table).get(&victim).copied().unwrap_or(0);
    running.kill();
    let took = ledger
        .until_balanced(&table, SHARDS, WORKERS - 1, LEASE_DURATION * 3)
        .await;
    println!(
        "kill -9 of one worker holding {held}: balanced again after {took:?}, {} moves",
        ledger.total()
    );
    assert!(
        took.is_some_and(|took| took <= Duration::from_secs(10)),
        "failover within 10 s at the default settings"
    );
    assert_eq!(ledger.total() as usize, held, "only the dead worker's shards moved");

    // Records the dead worker read but did not checkpoint are read again (at least once).
    ledger.watch(&table, Duration::from_secs(10)).await;
    let after_kill = seen.duplicates();
    println!("records read again after the kill: {after_kill}");

    // Resharding: ten shards split in two; children are read after their parents, by someone.
    let parents: Vec<&str> = ids.iter().take(10).copied().collect();
    let children: Vec<String> = parents
        .iter()
        .flat_map(|p| [format!("{p}-a"), format!("{p}-b")])
        .collect();
    for parent in &parents {
        source.put(parent, "last of the parent");
        let [a, b] = [format!("{parent}-a"), format!("{parent}-b")];
        source.split(parent, &[a.as_str(), b.as_str()]);
        source.put(&a, "first of a child");
        source.put(&b, "first of a child");
    }
    let reading = SHARDS - parents.len() + children.len();
    let calls = source.describe_calls();
    let took = ledger
        .until_balanced(&table, reading, WORKERS - 1, Duration::from_secs(60))
        .await;
    let describes = source.describe_calls() - calls;
    println!("split of 10 shards: {reading} shards balanced again after {took:?}, {describes} DescribeStream calls");
    assert!(
        describes <= 20,
        "children found by lookups, not listings: {describes} calls"
    );
    assert!(took.is_some(), "children assigned: {:?}", shares(&table));
    let handed = 2 * SHARDS + 10 + children.len();
    assert!(pass_until(Duration::from_secs(30), || seen.count() >= handed).await);
    assert_eq!(seen.duplicates(), after_kill, "nothing handed twice through the split");

    for (_, running) in fleet {
        running.stop().await;
    }
}
