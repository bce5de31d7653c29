//! One worker's hands on the lease table: [`LeaseStore`] writes as this worker (its id is the
//! owner of every take and write) and notices a twin using the same id; [`HeldLease`] orders the
//! writes to one lease this worker holds.
//!
//! Invariant: every write after taking a lease (checkpoint, release, hand-over) is conditional
//! on the owner *and* the counter the writer last saw, and bumps the counter. A worker that lost
//! its lease (assigned to another after its heartbeats stood still) can therefore not move its
//! checkpoint: its write fails and it stops reading the shard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dynamodb::DynamoDbLeaseTable;
use super::table::{Lease, LeaseTable, OwnedWrite};
use crate::lock::lock;
use crate::stream::error::StreamError;
use crate::stream::position::Position;
use crate::stream::record::ShardId;
use crate::stream::source::ShardInfo;
use crate::telemetry::metric;

/// Reads and writes lease rows on behalf of one worker.
#[derive(Debug)]
pub struct LeaseStore<T = DynamoDbLeaseTable> {
    table: Arc<T>,
    owner: String,
    /// When a lease write last found the row written by another live process under this
    /// worker's own id (shared by every clone).
    twin_seen: Arc<Mutex<Option<Instant>>>,
}

impl<T> Clone for LeaseStore<T> {
    fn clone(&self) -> Self {
        Self {
            table: self.table.clone(),
            owner: self.owner.clone(),
            twin_seen: self.twin_seen.clone(),
        }
    }
}

impl LeaseStore<DynamoDbLeaseTable> {
    /// The lease table `table` in DynamoDB, written as `owner`.
    pub fn dynamodb(client: aws_sdk_dynamodb::Client, table: impl Into<String>, owner: impl Into<String>) -> Self {
        Self::new(DynamoDbLeaseTable::new(client, table), owner)
    }
}

impl<T: LeaseTable> LeaseStore<T> {
    pub fn new(table: T, owner: impl Into<String>) -> Self {
        Self {
            table: Arc::new(table),
            owner: owner.into(),
            twin_seen: Arc::default(),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The table itself, for the fleet's coordination rows.
    pub fn table(&self) -> &T {
        &self.table
    }

    /// A write of ours found the lease written by someone with our own worker id: another live
    /// task was given the same `WORKER_ID`. Reported loudly (at most once a minute).
    pub(crate) fn twin_found(&self, shard: Option<&ShardId>) {
        let now = Instant::now();
        let previous = lock(&self.twin_seen).replace(now);
        metrics::counter!(metric::DUPLICATE_WORKER_ID).increment(1);
        if previous.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60)) {
            tracing::error!(
                worker_id = %self.owner,
                shard = ?shard.map(|s| s.0.as_str()),
                "another live worker uses this worker id: give every task its own WORKER_ID (or leave it unset); \
                 until then this worker leaves that worker's leases alone"
            );
        }
    }

    /// Creates the lease table when missing. Returns whether it created it.
    pub async fn ensure_table(&self) -> Result<bool, StreamError> {
        self.table.ensure().await
    }

    /// Every lease row (strongly consistent).
    pub async fn load_all(&self) -> Result<HashMap<ShardId, Lease>, StreamError> {
        self.table.load_all().await
    }

    /// Adds the row for a newly discovered shard; leaves an existing row alone.
    pub async fn create(
        &self,
        stream_id: &str,
        shard: &ShardInfo,
        checkpoint: &Position,
        shard_end: bool,
    ) -> Result<(), StreamError> {
        let lease = Lease {
            shard: shard.id.clone(),
            checkpoint: checkpoint.clone(),
            owner: None,
            parents: shard.parents.clone(),
            shard_end,
            stream_id: Some(stream_id.to_owned()),
            counter: 0,
        };
        self.table.create(&lease).await.map(|_| ())
    }

    /// Takes `seen` (a row as this worker last read it) if nobody changed it since: returns the
    /// row as it now stands, or `None` when another worker got there first.
    pub async fn take(&self, seen: &Lease) -> Result<Option<Lease>, StreamError> {
        self.table.take(seen, &self.owner).await
    }

    /// Deletes the row of a shard that is finished and gone from the stream.
    pub async fn delete(&self, shard: &ShardId) -> Result<(), StreamError> {
        self.table.delete_finished(shard).await.map(|_| ())
    }

    /// Deletes the row of an unfinished shard gone from the stream, only if nobody wrote it since
    /// it was seen (its counter unchanged). `Ok(false)` when someone did.
    pub async fn retire(&self, seen: &Lease) -> Result<bool, StreamError> {
        self.table.retire(seen).await
    }

    async fn write(&self, shard: &ShardId, counter: u64, write: OwnedWrite<'_>) -> Result<u64, StreamError> {
        self.table.write(shard, &self.owner, counter, write).await
    }
}

/// A lease this worker holds, shared by the worker and the shard's reader. Writes go
/// through it one at a time so that each uses the counter the previous one produced; a write
/// that finds the lease gone cancels `lost`, which stops the shard's reader.
#[derive(Debug)]
pub struct HeldLease {
    pub shard: ShardId,
    counter: tokio::sync::Mutex<u64>,
    lost: CancellationToken,
}

impl HeldLease {
    pub fn new(lease: &Lease) -> Self {
        Self {
            shard: lease.shard.clone(),
            counter: tokio::sync::Mutex::new(lease.counter),
            lost: CancellationToken::new(),
        }
    }

    /// Cancelled once the lease is known to be someone else's.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Records that the lease is someone else's now (seen in the table, before any write of
    /// ours failed): stops the shard's reader without a final checkpoint.
    pub fn mark_lost(&self) {
        if !self.lost.is_cancelled() {
            metrics::counter!(metric::LEASE_LOST).increment(1);
            // Routine (a steal to balance, or a takeover after this worker was paused): counted,
            // logged once, nothing for an operator to do.
            tracing::info!(shard = %self.shard, "lease taken by another worker; stopping the shard");
            self.lost.cancel();
        }
    }

    /// Records how far the shard is handled.
    pub async fn checkpoint<T: LeaseTable>(
        &self,
        store: &LeaseStore<T>,
        position: &Position,
        shard_end: bool,
    ) -> Result<(), StreamError> {
        self.write(store, OwnedWrite::Checkpoint { position, shard_end }).await
    }

    /// Gives the lease to `to`, who reads on from its checkpoint.
    pub async fn hand_over<T: LeaseTable>(&self, store: &LeaseStore<T>, to: &str) -> Result<(), StreamError> {
        self.write(store, OwnedWrite::HandOver { to }).await
    }

    /// Gives the lease up so that another worker takes it at once, not after expiry.
    pub async fn release<T: LeaseTable>(&self, store: &LeaseStore<T>) -> Result<(), StreamError> {
        self.write(store, OwnedWrite::Release).await
    }

    async fn write<T: LeaseTable>(&self, store: &LeaseStore<T>, write: OwnedWrite<'_>) -> Result<(), StreamError> {
        // Once the lease is gone the write's own condition rejects it: no local shortcut needed.
        let mut counter = self.counter.lock().await;
        match store.write(&self.shard, *counter, write).await {
            Ok(next) => {
                *counter = next;
                Ok(())
            }
            Err(error @ StreamError::LeaseLost { .. }) => {
                // Still "ours" by name, yet not written by us: a twin with our worker id.
                if matches!(&error, StreamError::LeaseLost { owner, .. } if owner == store.owner()) {
                    store.twin_found(Some(&self.shard));
                }
                self.mark_lost();
                Err(error)
            }
            Err(error) => Err(error),
        }
    }
}
