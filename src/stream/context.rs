//! What every part of the worker shares: the source, the lease store, the settings, readiness,
//! and each shard's iterator age and processing lag.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::time::Instant;

use super::consumer::WaitingSince;
use super::fleet::Fence;
use super::health::StreamHealth;
use super::lease::LeaseStore;
use super::record::ShardId;
use super::settings::StreamSettings;
use crate::lock::lock;
use crate::telemetry::metric;

/// What every shard reader shares.
pub(super) struct ShardContext<S, T> {
    pub source: S,
    pub leases: LeaseStore<T>,
    pub settings: StreamSettings,
    pub health: Arc<StreamHealth>,
    pub ages: ShardAges,
    /// Until when this worker's leases are valid (its heartbeats).
    pub fence: Arc<Fence>,
}

/// Per shard read: its iterator age at the last read, and its processing lag: how long the
/// oldest record read but not yet handled has waited, or, with none waiting, the iterator age
/// plus the time since that read (so a reader that cannot read shows its lag growing too).
/// Published every round whatever the readers are doing, so each shard's series lives as long
/// as its reader; the exported maxima are over the shards read.
#[derive(Default)]
pub(super) struct ShardAges(Mutex<HashMap<ShardId, ShardLag>>);

struct ShardLag {
    iterator_age: f64,
    read_at: Instant,
    waiting_since: Option<WaitingSince>,
}

impl ShardLag {
    fn new() -> Self {
        Self {
            iterator_age: 0.0,
            read_at: Instant::now(),
            waiting_since: None,
        }
    }

    fn processing_lag(&self, now: SystemTime) -> f64 {
        let since_read = self.iterator_age + self.read_at.elapsed().as_secs_f64();
        let waiting = self
            .waiting_since
            .as_ref()
            .and_then(|probe| probe())
            .and_then(|since| now.duration_since(since).ok())
            .map_or(0.0, |age| age.as_secs_f64());
        waiting.max(since_read)
    }
}

impl std::fmt::Debug for ShardAges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardAges")
            .field("shards", &lock(&self.0).len())
            .finish()
    }
}

impl ShardAges {
    /// A reader starts: `waiting_since` probes its lane.
    pub(super) fn watch(&self, shard: &ShardId, waiting_since: WaitingSince) {
        lock(&self.0)
            .entry(shard.clone())
            .or_insert_with(ShardLag::new)
            .waiting_since = Some(waiting_since);
    }

    /// A read answered: the shard is `seconds` behind the tip.
    pub(super) fn set(&self, shard: &ShardId, seconds: f64) {
        metrics::gauge!(metric::SHARD_ITERATOR_AGE, "shard" => shard.0.clone()).set(seconds);
        let mut ages = lock(&self.0);
        let lag = ages.entry(shard.clone()).or_insert_with(ShardLag::new);
        lag.iterator_age = seconds;
        lag.read_at = Instant::now();
        metrics::gauge!(metric::ITERATOR_AGE).set(ages.values().map(|lag| lag.iterator_age).fold(0.0, f64::max));
    }

    /// The shard's series stop being set, so they leave `/metrics` after the gauge idle timeout.
    pub(super) fn remove(&self, shard: &ShardId) {
        lock(&self.0).remove(shard);
        self.publish();
    }

    /// Sets every shard's gauges and the maxima again (every round: the series stay while
    /// the shard is read, and the lag moves even while a reader waits).
    pub(super) fn publish(&self) {
        let now = SystemTime::now();
        let ages = lock(&self.0);
        let (mut oldest, mut most) = (0.0, 0.0);
        for (shard, lag) in ages.iter() {
            let processing = lag.processing_lag(now);
            metrics::gauge!(metric::SHARD_ITERATOR_AGE, "shard" => shard.0.clone()).set(lag.iterator_age);
            metrics::gauge!(metric::SHARD_PROCESSING_LAG, "shard" => shard.0.clone()).set(processing);
            oldest = f64::max(oldest, lag.iterator_age);
            most = f64::max(most, processing);
        }
        metrics::gauge!(metric::ITERATOR_AGE).set(oldest);
        metrics::gauge!(metric::PROCESSING_LAG).set(most);
    }

    /// The oldest iterator age over the shards read, in seconds.
    pub(super) fn max(&self) -> f64 {
        lock(&self.0).values().map(|lag| lag.iterator_age).fold(0.0, f64::max)
    }

    /// The largest processing lag over the shards read, in seconds.
    pub(super) fn max_lag(&self) -> f64 {
        let now = SystemTime::now();
        lock(&self.0)
            .values()
            .map(|lag| lag.processing_lag(now))
            .fold(0.0, f64::max)
    }
}
