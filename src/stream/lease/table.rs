//! What a lease table is: its row ([`Lease`]) and the conditional operations every
//! implementation must keep exactly ([`LeaseTable`]). The DynamoDB table and its in-memory twin
//! both pass one contract suite (`tests/it/leases.rs`), so the twin cannot drift from
//! DynamoDB's behaviour.
//!
//! The rules every implementation keeps:
//! - `create` adds a row only if none exists for its shard;
//! - `take` succeeds only if the row's counter *and* owner are still as the taker saw them;
//! - every owner's write (renew, checkpoint, release) succeeds only if the row's owner is the
//!   writer and its counter the one the writer last produced, and bumps the counter; a failed
//!   condition answers who owns the row now;
//! - `delete_finished` removes only a finished row, `retire` only a row nobody wrote since seen.

use std::collections::HashMap;
use std::future::Future;

use crate::stream::error::StreamError;
use crate::stream::position::Position;
use crate::stream::record::ShardId;

/// The lease table's partition key.
pub const LEASE_TABLE_KEY: &str = "shard_id";

/// A shard's lease row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub shard: ShardId,
    pub checkpoint: Position,
    pub owner: Option<String>,
    pub parents: Vec<ShardId>,
    pub shard_end: bool,
    /// The stream the shard belongs to (a table's stream changes when it is re-enabled).
    pub stream_id: Option<String>,
    /// Bumped by every write of the owner (take, renew, checkpoint, release); other workers
    /// judge expiry by watching it stand still.
    pub counter: u64,
}

/// What an owner writes to a lease it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnedWrite<'a> {
    /// Only the counter moves: proof that the owner is alive.
    Renew,
    /// How far the shard is handled, and whether it was read to its end.
    Checkpoint { position: &'a Position, shard_end: bool },
    /// The owner gives the lease up (the row keeps its checkpoint, loses its owner).
    Release,
}

/// A store of lease rows with DynamoDB's conditional semantics.
pub trait LeaseTable: Send + Sync + 'static {
    /// Creates the table when missing; whether it did.
    fn ensure(&self) -> impl Future<Output = Result<bool, StreamError>> + Send;
    /// Every row, strongly consistent.
    fn load_all(&self) -> impl Future<Output = Result<HashMap<ShardId, Lease>, StreamError>> + Send;
    /// Adds `lease` (owner none, counter 0) unless its shard has a row; whether it added it.
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<bool, StreamError>> + Send;
    /// Gives `seen`'s row to `owner` if its counter and owner are as seen: the row as it now
    /// stands, or `None` when someone changed it first.
    fn take(&self, seen: &Lease, owner: &str) -> impl Future<Output = Result<Option<Lease>, StreamError>> + Send;
    /// `write` by `owner` holding the lease at `counter`: the new counter, or
    /// [`StreamError::LeaseLost`] naming the owner now (`nobody` for none or no row).
    fn write(
        &self,
        shard: &ShardId,
        owner: &str,
        counter: u64,
        write: OwnedWrite<'_>,
    ) -> impl Future<Output = Result<u64, StreamError>> + Send;
    /// Deletes the row if it is finished; whether it did.
    fn delete_finished(&self, shard: &ShardId) -> impl Future<Output = Result<bool, StreamError>> + Send;
    /// Deletes `seen`'s row if its counter is still as seen; whether it did.
    fn retire(&self, seen: &Lease) -> impl Future<Output = Result<bool, StreamError>> + Send;
}
