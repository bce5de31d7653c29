//! The lease table's in-memory twin: the same rows and the same conditions as DynamoDB, held in
//! one process, for unit tests and simulations of many workers under `tokio::time::pause`.
//!
//! Owns: the rows, and the faults a test injects (a slow scan, a handle cut off from the table).
//! Clones share the rows, so every worker of a simulation sees one table.
//!
//! Must not: differ from [`DynamoDbLeaseTable`](super::dynamodb::DynamoDbLeaseTable) in any
//! rule of [`LeaseTable`]; `tests/it/leases.rs` runs one contract suite against both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::table::{Assignment, BeatRefused, Fleet, Lease, LeaseTable, OwnedWrite};
use crate::aws::AwsError;
use crate::lock::lock;
use crate::stream::error::StreamError;
use crate::stream::record::ShardId;

/// Lease rows in memory; `None` until [`LeaseTable::ensure`] creates the table.
#[derive(Debug, Clone)]
pub struct MemoryLeaseTable {
    rows: Arc<Mutex<Option<HashMap<ShardId, Lease>>>>,
    /// How long every scan takes (simulated time under `tokio::time::pause`).
    scan_delay: Arc<Mutex<Duration>>,
    fleet: Arc<Mutex<Fleet>>,
    assignments: Arc<Mutex<HashMap<String, Assignment>>>,
    usage: Arc<Mutex<Usage>>,
    /// Open unless this handle's process is cut off from the table (every call waits).
    reachable: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for MemoryLeaseTable {
    fn default() -> Self {
        Self {
            rows: Arc::default(),
            scan_delay: Arc::default(),
            fleet: Arc::default(),
            assignments: Arc::default(),
            usage: Arc::default(),
            reachable: Arc::new(tokio::sync::watch::Sender::new(true)),
        }
    }
}

/// What the table was asked to do, in DynamoDB's capacity units (sizes estimated from the rows'
/// attributes as stored), for simulations that report cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub read_units: f64,
    pub write_units: f64,
    pub scans: u64,
}

/// An estimate of a shard row's stored size in bytes (names and values, as DynamoDB counts).
fn row_bytes(lease: &Lease) -> usize {
    let ids: usize = lease.parents.iter().map(|p| p.0.len()).sum();
    60 + lease.shard.0.len()
        + lease.checkpoint.encode().len()
        + lease.owner.as_ref().map_or(0, |o| o.len() + 5)
        + ids
        + lease.stream_id.as_ref().map_or(0, |s| s.len() + 9)
}

fn fleet_bytes(fleet: &Fleet) -> usize {
    let entries: usize = fleet.beats.keys().chain(fleet.epochs.keys()).map(|w| w.len() + 4).sum();
    80 + entries + fleet.leader.as_ref().map_or(0, String::len) + fleet.stream_id.as_ref().map_or(0, String::len)
}

fn units(bytes: usize, unit: usize) -> f64 {
    bytes.div_ceil(unit).max(1) as f64
}

impl MemoryLeaseTable {
    /// Every scan takes `delay` from now on.
    pub fn set_scan_delay(&self, delay: Duration) {
        *lock(&self.scan_delay) = delay;
    }

    /// Another handle on the same rows, which [`Self::cut_off`] can separate from them alone
    /// (one worker of a simulation partitioned from the table).
    pub fn handle(&self) -> Self {
        Self {
            reachable: Arc::new(tokio::sync::watch::Sender::new(true)),
            ..self.clone()
        }
    }

    /// Every call through this handle waits while `cut` (a network partition), then goes on.
    pub fn cut_off(&self, cut: bool) {
        self.reachable.send_replace(!cut);
    }

    async fn reach(&self) {
        let mut open = self.reachable.subscribe();
        // The sender lives as long as `self`: waiting cannot fail.
        let _ = open.wait_for(|open| *open).await;
    }

    /// What was asked of the table so far.
    pub fn usage(&self) -> Usage {
        *lock(&self.usage)
    }

    /// The fleet row as it stands (for assertions).
    pub fn fleet(&self) -> Fleet {
        lock(&self.fleet).clone()
    }

    fn read(&self, bytes: usize, consistent: bool) {
        lock(&self.usage).read_units += units(bytes, 4096) * if consistent { 1.0 } else { 0.5 };
    }

    fn wrote(&self, bytes: usize) {
        lock(&self.usage).write_units += units(bytes, 1024);
    }

    /// The owner of every shard not yet read to its end, as it stands (for assertions).
    pub fn owners(&self) -> HashMap<ShardId, Option<String>> {
        lock(&self.rows)
            .iter()
            .flatten()
            .filter(|(_, row)| !row.shard_end)
            .map(|(shard, row)| (shard.clone(), row.owner.clone()))
            .collect()
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
        self.reach().await;
        let mut rows = lock(&self.rows);
        let created = rows.is_none();
        rows.get_or_insert_with(HashMap::new);
        Ok(created)
    }

    async fn load_all(&self) -> Result<HashMap<ShardId, Lease>, StreamError> {
        self.reach().await;
        let delay = *lock(&self.scan_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let rows = self.with_rows("Scan", |rows| rows.clone())?;
        let bytes: usize = rows.values().map(row_bytes).sum();
        self.read(bytes, true);
        lock(&self.usage).scans += 1;
        Ok(rows)
    }

    async fn create(&self, lease: &Lease) -> Result<bool, StreamError> {
        self.reach().await;
        self.wrote(row_bytes(lease));
        self.with_rows("PutItem", |rows| {
            if rows.contains_key(&lease.shard) {
                return false;
            }
            rows.insert(lease.shard.clone(), lease.clone());
            true
        })
    }

    async fn take(&self, seen: &Lease, owner: &str) -> Result<Option<Lease>, StreamError> {
        self.reach().await;
        self.wrote(row_bytes(seen));
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
        self.reach().await;
        self.wrote(256);
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
                OwnedWrite::Checkpoint { position, shard_end } => {
                    row.checkpoint = position.clone();
                    row.shard_end = shard_end;
                }
                OwnedWrite::Release => row.owner = None,
                OwnedWrite::HandOver { to } => row.owner = Some(to.to_owned()),
            }
            row.counter += 1;
            Ok(row.counter)
        })?
    }

    async fn delete_finished(&self, shard: &ShardId) -> Result<bool, StreamError> {
        self.reach().await;
        self.with_rows("DeleteItem", |rows| {
            let finished = rows.get(shard).is_some_and(|row| row.shard_end);
            if finished {
                rows.remove(shard);
            }
            finished
        })
    }

    async fn get(&self, shard: &ShardId) -> Result<Option<Lease>, StreamError> {
        self.reach().await;
        let row = self.with_rows("GetItem", |rows| rows.get(shard).cloned())?;
        self.read(row.as_ref().map_or(1, row_bytes), true);
        Ok(row)
    }

    async fn beat(
        &self,
        worker: &str,
        previous: Option<u64>,
        next: u64,
        leaving: bool,
    ) -> Result<Result<Fleet, BeatRefused>, StreamError> {
        self.reach().await;
        self.with_rows("UpdateItem", |_| ())?;
        let mut fleet = lock(&self.fleet);
        self.wrote(fleet_bytes(&fleet));
        match (fleet.beats.get(worker), previous) {
            (None, Some(_)) => return Ok(Err(BeatRefused::Evicted)),
            (Some(now), Some(previous)) if *now != previous => return Ok(Err(BeatRefused::Twin)),
            _ => {}
        }
        fleet.beats.insert(worker.to_owned(), next);
        if leaving {
            fleet.leaving.insert(worker.to_owned());
        }
        Ok(Ok(fleet.clone()))
    }

    async fn remove_member(&self, worker: &str, seen: u64) -> Result<bool, StreamError> {
        self.reach().await;
        self.with_rows("UpdateItem", |_| ())?;
        let mut fleet = lock(&self.fleet);
        self.wrote(fleet_bytes(&fleet));
        if fleet.beats.get(worker) != Some(&seen) {
            return Ok(false);
        }
        fleet.beats.remove(worker);
        fleet.epochs.remove(worker);
        fleet.leaving.remove(worker);
        Ok(true)
    }

    async fn claim_leadership(&self, me: &str, seen_leader: Option<&str>, seen_term: u64) -> Result<bool, StreamError> {
        self.reach().await;
        self.with_rows("UpdateItem", |_| ())?;
        let mut fleet = lock(&self.fleet);
        self.wrote(fleet_bytes(&fleet));
        if fleet.leader.as_deref() != seen_leader || fleet.term != seen_term {
            return Ok(false);
        }
        fleet.leader = Some(me.to_owned());
        fleet.term += 1;
        Ok(true)
    }

    async fn resign(&self, me: &str, term: u64) -> Result<(), StreamError> {
        self.reach().await;
        self.with_rows("UpdateItem", |_| ())?;
        let mut fleet = lock(&self.fleet);
        self.wrote(fleet_bytes(&fleet));
        if fleet.leader.as_deref() == Some(me) && fleet.term == term {
            fleet.leader = None;
        }
        Ok(())
    }

    async fn notify(&self, workers: &[String], stream_id: Option<&str>) -> Result<(), StreamError> {
        self.reach().await;
        self.with_rows("UpdateItem", |_| ())?;
        let mut fleet = lock(&self.fleet);
        self.wrote(fleet_bytes(&fleet));
        for worker in workers {
            *fleet.epochs.entry(worker.clone()).or_default() += 1;
        }
        if let Some(stream_id) = stream_id {
            fleet.stream_id = Some(stream_id.to_owned());
        }
        Ok(())
    }

    async fn mark_changed(&self) -> Result<(), StreamError> {
        self.reach().await;
        self.with_rows("UpdateItem", |_| ())?;
        let mut fleet = lock(&self.fleet);
        self.wrote(fleet_bytes(&fleet));
        fleet.changes += 1;
        Ok(())
    }

    async fn put_assignment(&self, worker: &str, assignment: &Assignment) -> Result<(), StreamError> {
        self.reach().await;
        self.with_rows("PutItem", |_| ())?;
        let bytes: usize = assignment
            .shards
            .iter()
            .chain(assignment.give.keys())
            .map(|s| s.0.len() + 3)
            .sum();
        self.wrote(bytes + assignment.give.values().map(String::len).sum::<usize>() + 40);
        lock(&self.assignments).insert(worker.to_owned(), assignment.clone());
        Ok(())
    }

    async fn assignment(&self, worker: &str) -> Result<Assignment, StreamError> {
        self.reach().await;
        self.with_rows("GetItem", |_| ())?;
        let assignment = lock(&self.assignments).get(worker).cloned().unwrap_or_default();
        let bytes: usize = assignment.shards.iter().map(|s| s.0.len() + 3).sum();
        self.read(bytes + 40, true);
        Ok(assignment)
    }

    async fn retire(&self, seen: &Lease) -> Result<bool, StreamError> {
        self.reach().await;
        self.with_rows("DeleteItem", |rows| {
            let unchanged = rows.get(&seen.shard).is_some_and(|row| row.counter == seen.counter);
            if unchanged {
                rows.remove(&seen.shard);
            }
            unchanged
        })
    }
}
