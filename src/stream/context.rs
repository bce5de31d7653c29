//! What every part of the worker shares: the source, the lease store, the settings, readiness,
//! and each shard's iterator age.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

/// Iterator age per shard; the exported gauge is the maximum.
#[derive(Debug, Default)]
pub(super) struct ShardAges(Mutex<HashMap<ShardId, f64>>);

impl ShardAges {
    pub(super) fn set(&self, shard: &ShardId, seconds: f64) {
        metrics::gauge!(metric::SHARD_ITERATOR_AGE, "shard" => shard.0.clone()).set(seconds);
        let mut ages = lock(&self.0);
        ages.insert(shard.clone(), seconds);
        metrics::gauge!(metric::ITERATOR_AGE).set(ages.values().copied().fold(0.0, f64::max));
    }

    /// The shard's series stops being set, so it leaves `/metrics` after the gauge idle timeout.
    pub(super) fn remove(&self, shard: &ShardId) {
        lock(&self.0).remove(shard);
        self.publish();
    }

    /// Sets the maximum again (also keeps the gauge from going idle while no shard is read).
    pub(super) fn publish(&self) {
        metrics::gauge!(metric::ITERATOR_AGE).set(self.max());
    }

    /// The oldest lag over the shards read, in seconds.
    pub(super) fn max(&self) -> f64 {
        lock(&self.0).values().copied().fold(0.0, f64::max)
    }
}
