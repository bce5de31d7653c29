//! What the stream layer is told and what it tells back: the settings of reading and sharing
//! a stream ([`StreamSettings`]) and the report of what each shard's reader read
//! ([`ShardReport`], [`StreamReport`]).
//!
//! Plain data, shared by the worker and the per-shard reader: it imports nothing of theirs, so
//! neither has to import the other for it.

use std::time::Duration;

use tokio::time::Instant;

use super::position::{Position, StartingPosition};
use super::record::{SequenceNumber, ShardId};
use crate::retry::RetryPolicy;

/// How the stream is read and shared.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub starting_position: StartingPosition,
    /// GetRecords limit (1..=1000 on DynamoDB Streams).
    pub batch_size: i32,
    /// The first wait after an empty read; it doubles with each further one, up to
    /// `max_idle_interval` ([`super::pacing`]).
    pub idle_interval: Duration,
    pub max_idle_interval: Duration,
    /// GetRecords calls per shard a second, at most (Kinesis allows 5, shared by all consumers).
    pub max_reads_per_second: u32,
    pub shard_sync_interval: Duration,
    pub checkpoint_interval: Duration,
    /// A worker whose heartbeats stand still this long is dropped and its leases assigned
    /// again; a worker stops reading this long after its last successful heartbeat was sent.
    pub lease_duration: Duration,
    /// How often each worker runs a round (the leader assigns, every worker follows its
    /// assignment and picks up hand-overs).
    pub lease_take_interval: Duration,
    /// How often each worker writes its heartbeat (one small write, the fleet's only liveness).
    pub heartbeat_interval: Duration,
    /// How often a status line (iterator age, leases, shards) is logged: a log-based metric
    /// source where Prometheus is not scraped (CloudWatch Logs metric filters).
    pub status_interval: Duration,
    /// For AWS calls of this layer; reads retry until shutdown, so leave attempts unbounded.
    pub retry: RetryPolicy,
}

/// What one reader of one shard did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReport {
    pub shard: ShardId,
    pub records: u64,
    pub first: Option<SequenceNumber>,
    pub last: Option<SequenceNumber>,
    /// The last checkpoint this reader wrote.
    pub checkpoint: Option<Position>,
    /// The shard was read to its end.
    pub ended: bool,
    /// When the reader started, and when it returned (after its final checkpoint).
    pub started_at: Instant,
    pub finished_at: Instant,
}

impl ShardReport {
    pub(super) fn new(shard: ShardId) -> Self {
        let now = Instant::now();
        Self {
            shard,
            records: 0,
            first: None,
            last: None,
            checkpoint: None,
            ended: false,
            started_at: now,
            finished_at: now,
        }
    }
}

/// What the worker read, reader by reader, in the order they finished.
#[derive(Debug, Clone, Default)]
pub struct StreamReport {
    pub shards: Vec<ShardReport>,
}

impl StreamReport {
    pub fn records(&self) -> u64 {
        self.shards.iter().map(|shard| shard.records).sum()
    }
}
