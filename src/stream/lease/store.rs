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

    /// An operator's hand on `seen` (the row as just read): takes the lease from whoever holds
    /// it (that reader stops at its next write, without checkpointing), sets its checkpoint to
    /// `checkpoint` when given, and releases it for the fleet to give out again, reading from
    /// the checkpoint. Every step is conditional: `LeaseLost` when the row changed since `seen`
    /// (read it again and retry). Wakes the holder (its epoch) and the leader. The row as it
    /// then stands.
    pub async fn force_release(&self, seen: &Lease, checkpoint: Option<&Position>) -> Result<Lease, StreamError> {
        let lost = || StreamError::LeaseLost {
            shard: seen.shard.clone(),
            owner: "another worker (the row changed while it was read)".into(),
        };
        let taken = self.take(seen).await?.ok_or_else(lost)?;
        let held = HeldLease::new(&taken);
        if let Some(position) = checkpoint {
            held.checkpoint(self, position, taken.shard_end).await?;
        }
        held.release(self).await?;
        // Wake the holder (an idle reader writes nothing, so would not notice) and the leader.
        if let Some(holder) = &seen.owner {
            self.table.notify(std::slice::from_ref(holder), None).await?;
        }
        self.table.mark_changed().await?;
        self.table.get(&seen.shard).await?.ok_or_else(lost)
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

    /// Whether `row` (the lease's row as just read; `None`: gone) was written by someone else
    /// since this worker's last write: its counter moved. `false` while a write of ours is in
    /// flight (its own answer tells).
    pub fn written_by_another(&self, row: Option<&Lease>) -> bool {
        match self.counter.try_lock() {
            Ok(counter) => row.is_none_or(|row| row.counter != *counter),
            Err(_) => false,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::lease::MemoryLeaseTable;
    use crate::stream::record::SequenceNumber;

    fn lease(owner: Option<&str>, checkpoint: &str) -> Lease {
        Lease {
            shard: ShardId("shard-1".into()),
            checkpoint: Position::decode(checkpoint).expect("position"),
            owner: owner.map(str::to_owned),
            parents: Vec::new(),
            shard_end: false,
            stream_id: Some("stream".into()),
            counter: 7,
        }
    }

    /// An operator sets a held lease's checkpoint: the row is free with the new checkpoint, and
    /// the worker that held it can no longer checkpoint (its reader stops).
    #[tokio::test]
    async fn an_operator_resets_a_held_checkpoint_and_the_holder_loses_the_lease() {
        let table = MemoryLeaseTable::default();
        table.put(lease(Some("worker-a"), "000000000000000000500"));
        let worker = LeaseStore::new(table.handle(), "worker-a");
        let held = HeldLease::new(&table.row("shard-1").expect("row"));
        let operator = LeaseStore::new(table.handle(), "operator");

        let seen = table.row("shard-1").expect("row");
        let after = operator
            .force_release(&seen, Some(&Position::TrimHorizon))
            .await
            .expect("forced");
        assert_eq!(after.owner, None, "free for the fleet");
        assert_eq!(after.checkpoint, Position::TrimHorizon);
        assert!(after.counter > seen.counter);
        assert_eq!(table.fleet().epochs.get("worker-a"), Some(&1), "the holder is woken");

        let later = Position::After(SequenceNumber::parse("000000000000000000900").expect("digits"));
        let write = held.checkpoint(&worker, &later, false).await;
        assert!(matches!(write, Err(StreamError::LeaseLost { .. })), "{write:?}");
        assert!(held.lost().is_cancelled(), "the holder's reader stops");
        let idle = HeldLease::new(&seen);
        assert!(
            idle.written_by_another(table.row("shard-1").as_ref()),
            "an idle holder can tell"
        );
        assert!(!HeldLease::new(&after).written_by_another(Some(&after)));
        assert_eq!(table.row("shard-1").expect("row").checkpoint, Position::TrimHorizon);
    }

    /// Released without a new checkpoint, the row keeps its own; a row that changed since it
    /// was read is left alone.
    #[tokio::test]
    async fn a_release_keeps_the_checkpoint_and_refuses_a_stale_read() {
        let table = MemoryLeaseTable::default();
        table.put(lease(Some("worker-a"), "000000000000000000500"));
        let operator = LeaseStore::new(table.handle(), "operator");
        let mut stale = table.row("shard-1").expect("row");
        stale.counter -= 1;
        let refused = operator.force_release(&stale, None).await;
        assert!(matches!(refused, Err(StreamError::LeaseLost { .. })), "{refused:?}");
        assert_eq!(table.row("shard-1").expect("row").owner.as_deref(), Some("worker-a"));

        let seen = table.row("shard-1").expect("row");
        let after = operator.force_release(&seen, None).await.expect("released");
        assert_eq!(after.owner, None);
        assert_eq!(after.checkpoint, seen.checkpoint);
    }
}
