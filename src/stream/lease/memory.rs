//! The lease table's in-memory twin: the same rows and the same conditions as DynamoDB, held in
//! one process, for unit tests and simulations of many workers under `tokio::time::pause`.
//!
//! Owns: the rows, and the fault a test injects (a slow scan). Clones share
//! the rows, so every worker of a simulation sees one table.
//!
//! Must not: differ from [`DynamoDbLeaseTable`](super::dynamodb::DynamoDbLeaseTable) in any
//! rule of [`LeaseTable`]; `tests/it/leases.rs` runs one contract suite against both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::table::{Lease, LeaseTable, OwnedWrite};
use crate::aws::AwsError;
use crate::lock::lock;
use crate::stream::error::StreamError;
use crate::stream::record::ShardId;

/// Lease rows in memory; `None` until [`LeaseTable::ensure`] creates the table.
#[derive(Debug, Clone, Default)]
pub struct MemoryLeaseTable {
    rows: Arc<Mutex<Option<HashMap<ShardId, Lease>>>>,
    /// How long every scan takes (simulated time under `tokio::time::pause`).
    scan_delay: Arc<Mutex<Duration>>,
}

impl MemoryLeaseTable {
    /// Every scan takes `delay` from now on.
    pub fn set_scan_delay(&self, delay: Duration) {
        *lock(&self.scan_delay) = delay;
    }

    /// One row as it stands (for assertions).
    pub fn row(&self, shard: &str) -> Option<Lease> {
        lock(&self.rows).as_ref()?.get(&ShardId(shard.to_owned())).cloned()
    }

    /// Overwrites or adds a row as is (a test's set-up, or another process's write).
    pub fn put(&self, lease: Lease) {
        lock(&self.rows)
            .get_or_insert_with(HashMap::new)
            .insert(lease.shard.clone(), lease);
    }

    /// Runs `change` on the rows; an error, as DynamoDB's, while the table does not exist.
    fn with_rows<R>(
        &self,
        operation: &'static str,
        change: impl FnOnce(&mut HashMap<ShardId, Lease>) -> R,
    ) -> Result<R, StreamError> {
        let mut rows = lock(&self.rows);
        match rows.as_mut() {
            Some(rows) => Ok(change(rows)),
            None => Err(StreamError::Aws(AwsError {
                operation,
                code: Some("ResourceNotFoundException".to_owned()),
                message: "Requested resource not found".to_owned(),
                retryable: false,
            })),
        }
    }
}

impl LeaseTable for MemoryLeaseTable {
    async fn ensure(&self) -> Result<bool, StreamError> {
        let mut rows = lock(&self.rows);
        let created = rows.is_none();
        rows.get_or_insert_with(HashMap::new);
        Ok(created)
    }

    async fn load_all(&self) -> Result<HashMap<ShardId, Lease>, StreamError> {
        let delay = *lock(&self.scan_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.with_rows("Scan", |rows| rows.clone())
    }

    async fn create(&self, lease: &Lease) -> Result<bool, StreamError> {
        self.with_rows("PutItem", |rows| {
            if rows.contains_key(&lease.shard) {
                return false;
            }
            rows.insert(lease.shard.clone(), lease.clone());
            true
        })
    }

    async fn take(&self, seen: &Lease, owner: &str) -> Result<Option<Lease>, StreamError> {
        self.with_rows("UpdateItem", |rows| {
            let row = rows.get_mut(&seen.shard)?;
            if row.counter != seen.counter || row.owner != seen.owner {
                return None;
            }
            row.owner = Some(owner.to_owned());
            row.counter += 1;
            Some(row.clone())
        })
    }

    async fn write(
        &self,
        shard: &ShardId,
        owner: &str,
        counter: u64,
        write: OwnedWrite<'_>,
    ) -> Result<u64, StreamError> {
        self.with_rows("UpdateItem", |rows| {
            let lost = |row: Option<&Lease>| StreamError::LeaseLost {
                shard: shard.clone(),
                owner: row
                    .and_then(|row| row.owner.clone())
                    .unwrap_or_else(|| "nobody".to_owned()),
            };
            let Some(row) = rows.get_mut(shard) else {
                return Err(lost(None));
            };
            if row.owner.as_deref() != Some(owner) || row.counter != counter {
                return Err(lost(Some(row)));
            }
            match write {
                OwnedWrite::Renew => {}
                OwnedWrite::Checkpoint { position, shard_end } => {
                    row.checkpoint = position.clone();
                    row.shard_end = shard_end;
                }
                OwnedWrite::Release => row.owner = None,
            }
            row.counter += 1;
            Ok(row.counter)
        })?
    }

    async fn delete_finished(&self, shard: &ShardId) -> Result<bool, StreamError> {
        self.with_rows("DeleteItem", |rows| {
            let finished = rows.get(shard).is_some_and(|row| row.shard_end);
            if finished {
                rows.remove(shard);
            }
            finished
        })
    }

    async fn retire(&self, seen: &Lease) -> Result<bool, StreamError> {
        self.with_rows("DeleteItem", |rows| {
            let unchanged = rows.get(&seen.shard).is_some_and(|row| row.counter == seen.counter);
            if unchanged {
                rows.remove(&seen.shard);
            }
            unchanged
        })
    }
}
