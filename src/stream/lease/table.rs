//! What a lease table is: its row ([`Lease`]) and the conditional operations every
//! implementation must keep exactly ([`LeaseTable`]). The DynamoDB table and its in-memory twin
//! both pass one contract suite (`tests/it/leases.rs`), so the twin cannot drift from
//! DynamoDB's behaviour.
//!
//! The rules every implementation keeps:
//! - `create` adds a row only if none exists for its shard;
//! - `take` succeeds only if the row's counter *and* owner are still as the taker saw them;
//! - every owner's write (checkpoint, release, hand-over) succeeds only if the row's owner is the
//!   writer and its counter the one the writer last produced, and bumps the counter; a failed
//!   condition answers who owns the row now;
//! - `delete_finished` removes only a finished row, `retire` only a row nobody wrote since seen.
//!
//! Beside the shard rows, two kinds of coordination rows (keys start with `~`, which no shard
//! id does, and `load_all` leaves them out):
//! - the fleet row ([`Fleet`], key [`FLEET_ROW`]): every worker's heartbeat, the leader and its
//!   term, each worker's assignment epoch, a change counter and the stream being read. A beat
//!   succeeds only if the worker's entry is as it last wrote it (or absent, to join), and
//!   returns the whole row: one small write per worker per beat is all the liveness there is;
//! - one assignment row per worker ([`Assignment`]), written only by the leader.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;

use crate::stream::error::StreamError;
use crate::stream::position::Position;
use crate::stream::record::ShardId;

/// The lease table's partition key.
pub const LEASE_TABLE_KEY: &str = "shard_id";

/// The fleet row's key.
pub const FLEET_ROW: &str = "~fleet";
/// Assignment rows' keys: this prefix and the worker's id.
pub const ASSIGNMENT_PREFIX: &str = "~assigned#";

/// Whether a lease-table key names a coordination row rather than a shard.
pub fn is_coordination_key(key: &str) -> bool {
    key.starts_with('~')
}

/// The fleet row: who is alive, who leads, and what changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    /// Each member's heartbeat value (moves at every beat).
    pub beats: BTreeMap<String, u64>,
    pub leader: Option<String>,
    /// Bumped at every change of leader: a claim names the term it saw.
    pub term: u64,
    /// Bumped by the leader when a member's assignment changes.
    pub epochs: BTreeMap<String, u64>,
    /// Bumped by any worker whose shard finished, so that the leader looks again.
    pub changes: u64,
    /// The stream the leader last described.
    pub stream_id: Option<String>,
    /// Members shutting down: their leases are handed on, none assigned to them.
    pub leaving: BTreeSet<String>,
}

/// A beat that found the worker's entry other than it left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeatRefused {
    /// No entry: the leader evicted this worker (its beats stood still past a lease duration).
    Evicted,
    /// Another value: another live process writes this worker's id.
    Twin,
}

/// What the leader wants of one worker: the shards it reads, and the ones it hands on to whom.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub shards: Vec<ShardId>,
    pub give: BTreeMap<ShardId, String>,
    /// Shards of `shards` that another member hands over, with who.
    pub receive: BTreeMap<ShardId, String>,
}

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
    /// Bumped by every take and every write of the owner (checkpoint, release, hand-over); a
    /// worker of an earlier version renews it, and the leader judges such a lease by watching it
    /// stand still.
    pub counter: u64,
}

/// What an owner writes to a lease it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnedWrite<'a> {
    /// How far the shard is handled, and whether it was read to its end.
    Checkpoint { position: &'a Position, shard_end: bool },
    /// The owner gives the lease up (the row keeps its checkpoint, loses its owner).
    Release,
    /// The owner gives the lease to `to` (the leader's choice), who reads on from its checkpoint.
    HandOver { to: &'a str },
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
    /// One shard's row, strongly consistent.
    fn get(&self, shard: &ShardId) -> impl Future<Output = Result<Option<Lease>, StreamError>> + Send;

    /// `worker`'s heartbeat: its entry set to `next` if it is `previous` (`None`: join, whatever
    /// is there), marked leaving if `leaving`. The fleet row as it now stands, or why the beat
    /// was refused.
    fn beat(
        &self,
        worker: &str,
        previous: Option<u64>,
        next: u64,
        leaving: bool,
    ) -> impl Future<Output = Result<Result<Fleet, BeatRefused>, StreamError>> + Send;
    /// Removes `worker`'s entry (and epoch) if its beat is still `seen`: a member leaving, or the
    /// leader evicting a dead one. Whether it did.
    fn remove_member(&self, worker: &str, seen: u64) -> impl Future<Output = Result<bool, StreamError>> + Send;
    /// Makes `me` the leader if the leader and term are still as seen; whether it did.
    fn claim_leadership(
        &self,
        me: &str,
        seen_leader: Option<&str>,
        seen_term: u64,
    ) -> impl Future<Output = Result<bool, StreamError>> + Send;
    /// Gives up leadership held at `term` (a leader shutting down).
    fn resign(&self, me: &str, term: u64) -> impl Future<Output = Result<(), StreamError>> + Send;
    /// Bumps each worker's epoch (it reads its assignment again) and records the stream read.
    fn notify(
        &self,
        workers: &[String],
        stream_id: Option<&str>,
    ) -> impl Future<Output = Result<(), StreamError>> + Send;
    /// Bumps the change counter: the leader looks at the table again.
    fn mark_changed(&self) -> impl Future<Output = Result<(), StreamError>> + Send;
    /// Replaces `worker`'s assignment.
    fn put_assignment(
        &self,
        worker: &str,
        assignment: &Assignment,
    ) -> impl Future<Output = Result<(), StreamError>> + Send;
    /// `worker`'s assignment, strongly consistent (empty when none was written).
    fn assignment(&self, worker: &str) -> impl Future<Output = Result<Assignment, StreamError>> + Send;
}
