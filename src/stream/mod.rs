//! Reading a stream of DynamoDB change records: sources, shard lineage, polling, checkpoints.
//!
//! Owns: discovering shards, reading each one with exactly one reader (parents to their end
//! before any child starts), handing records in shard order to a [`Consumer`], and writing
//! per-shard checkpoints to the lease table.
//!
//! Invariants:
//! - At-least-once: a checkpoint names the newest record such that it *and every earlier
//!   record of the shard* has been fully handled ([`ShardLane::handled_through`]). A restart
//!   resumes after it, so what was in flight is read again, never skipped.
//! - Order: records of one shard reach the consumer in sequence-number order, and a child
//!   shard's records only after all of its parents' records.
//!
//! Must not: know what the records mean. This layer imports neither `dispatch` nor `groups`;
//! its consumer implements the traits defined here.
//!
//! Rooms, from the ground up (each imports only rooms listed before it):
//! - [`record`], [`position`], [`error`]: the records, where reading starts, what fails;
//! - [`source`] and its implementations [`DynamoDbStreamsSource`], [`KinesisSource`];
//!   [`consumer`]: what records are handed to;
//! - [`lease`]: the lease table (DynamoDB and an in-memory twin) and the leases a worker holds;
//! - `lineage`, `balance`: pure rules (which shard may be read, who reads what);
//! - `settings`, `health`, `context`: what the worker's parts share;
//! - `fleet` (heartbeats, the fence), `reader` (one shard), `sync` (shard discovery), `leader`
//!   (assignment), `worker` (the round, hand-overs, shutdown), the only room that knows them all.

mod balance;
pub mod change;
pub mod consumer;
mod context;
mod dynamodb;
pub mod error;
mod fleet;
mod health;
mod kinesis;
mod leader;
pub mod lease;
mod lineage;
mod pacing;
pub mod position;
mod reader;
pub mod record;
mod settings;
pub mod source;
mod sync;
mod worker;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod simulation;
#[cfg(test)]
mod tests;

pub use change::RecordKeys;
pub use consumer::{Consumer, ShardLane, WaitingSince};
pub use dynamodb::DynamoDbStreamsSource;
pub use error::StreamError;
pub use health::StreamHealth;
pub use kinesis::KinesisSource;
pub use lease::{DynamoDbLeaseTable, Lease, LeaseStore, LeaseTable, MemoryLeaseTable, LEASE_TABLE_KEY};
pub use position::{Position, StartingPosition};
pub use record::{EventKind, Item, Record, SequenceNumber, ShardId};
pub use settings::{ShardReport, StreamReport, StreamSettings};
pub use source::{Batch, ShardInfo, StreamShards, StreamSource};
pub use worker::StreamWorker;
