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

mod balance;
pub mod change;
mod dynamodb;
mod kinesis;
mod lease;
mod lineage;
mod poller;
mod record;
mod settings;
mod worker;

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

pub use dynamodb::DynamoDbStreamsSource;
pub use kinesis::KinesisSource;
pub use lease::{Lease, LeaseStore, LEASE_TABLE_KEY};
pub use record::{EventKind, Item, Record, SequenceNumber, ShardId};
pub use settings::{ShardReport, StreamReport, StreamSettings};
pub use worker::StreamWorker;

use crate::aws::AwsError;
use crate::retry::Retryable;

/// Where reading a shard starts. Stored as a lease's checkpoint: `TRIM_HORIZON`,
/// `LATEST@<instant>`, or the sequence number of the newest fully handled record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    TrimHorizon,
    /// `LATEST` resolved once, to the instant it was asked for: read from the horizon, skipping
    /// records created before the instant. Stored so, a handoff before the first checkpoint
    /// skips nothing that arrived since (a stored `LATEST` would be resolved again, later).
    LatestAt(SystemTime),
    /// `LATEST` as rows written by earlier versions hold it: resolved by the reader that meets
    /// it, which stores the result at once.
    Latest,
    After(SequenceNumber),
}

impl Position {
    pub fn encode(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Position::TrimHorizon => "TRIM_HORIZON".into(),
            Position::LatestAt(at) => {
                let at: chrono::DateTime<chrono::Utc> = (*at).into();
                format!("LATEST@{}", at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).into()
            }
            Position::Latest => "LATEST".into(),
            Position::After(sequence) => sequence.as_str().into(),
        }
    }

    pub fn decode(text: &str) -> Option<Self> {
        match text {
            "TRIM_HORIZON" => Some(Position::TrimHorizon),
            "LATEST" => Some(Position::Latest),
            other => match other.strip_prefix("LATEST@") {
                Some(at) => chrono::DateTime::parse_from_rfc3339(at)
                    .ok()
                    .map(|at| Position::LatestAt(at.with_timezone(&chrono::Utc).into())),
                None => SequenceNumber::parse(other).map(Position::After),
            },
        }
    }

    /// `LATEST` resolved now: the instant is cut to the whole minute, since record creation
    /// times may be (DynamoDB Local truncates them to the minute, DynamoDB to the second), so
    /// that no record made after this call is taken for an earlier one.
    pub fn latest_now() -> Self {
        let now = chrono::Utc::now();
        let minute = chrono::DurationRound::duration_trunc(now, chrono::TimeDelta::minutes(1)).unwrap_or(now);
        Position::LatestAt(minute.into())
    }
}

/// Where a consumer with no checkpoint starts (the `starting_position` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartingPosition {
    TrimHorizon,
    Latest,
}

/// A shard as the source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: ShardId,
    /// One parent after a split or rollover, two after a merge, none for the first shards.
    pub parents: Vec<ShardId>,
    /// The shard has an ending sequence number: no record will be added to it.
    pub closed: bool,
}

/// A stream and all of its shards.
#[derive(Debug, Clone)]
pub struct StreamShards {
    /// The stream's ARN (or name): what iterators are requested against.
    pub stream_id: String,
    pub shards: Vec<ShardInfo>,
}

/// One GetRecords answer.
#[derive(Debug)]
pub struct Batch {
    pub records: Vec<Record>,
    /// `None` once a closed shard has been read to its end.
    pub next_iterator: Option<String>,
    /// How far the reader is behind the shard's tip, when the source says (Kinesis
    /// `MillisBehindLatest`); otherwise the age of the newest record read stands in for it.
    pub behind: Option<std::time::Duration>,
}

/// A stream of change records, read shard by shard.
pub trait StreamSource: Send + Sync + 'static {
    /// Finds the stream and lists every shard (all pages).
    fn describe(&self) -> impl Future<Output = Result<StreamShards, StreamError>> + Send;
    /// An iterator that reads `shard` from `position`.
    fn iterator(
        &self,
        stream_id: &str,
        shard: &ShardId,
        position: &Position,
    ) -> impl Future<Output = Result<String, StreamError>> + Send;
    /// The next records at `iterator`, at most `limit`.
    fn read(&self, iterator: &str, limit: i32) -> impl Future<Output = Result<Batch, StreamError>> + Send;
}

/// What the stream hands its records to.
pub trait Consumer: Send + Sync + 'static {
    type Lane: ShardLane;
    /// A lane for one shard's records; records submitted to it are handled in the lane's
    /// order where the consumer requires order.
    fn open_lane(&self, shard: &ShardId) -> Self::Lane;
}

/// One shard's way into the consumer.
pub trait ShardLane: Send + Sync + 'static {
    /// Takes a batch, in stream order. Waits while the consumer is at its in-flight bound
    /// (backpressure); returns once every record is accepted, not handled.
    fn submit(&mut self, records: Vec<Record>) -> impl Future<Output = ()> + Send;
    /// The newest submitted record such that it and every record submitted before it are
    /// fully handled: the only sequence number a checkpoint may name.
    fn handled_through(&self) -> Option<SequenceNumber>;
    /// Waits until every submitted record is fully handled.
    fn drain(&mut self) -> impl Future<Output = ()> + Send;
}

/// Failures of the stream layer.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("table {0} does not exist (run `cruddur-stream-worker setup`)")]
    TableNotFound(String),
    #[error("table {0} has no stream (enable a stream with NEW_IMAGE)")]
    StreamDisabled(String),
    #[error("stream {0} does not exist")]
    StreamNotFound(String),
    /// The source answers that the shard does not exist (any more): trimmed away after the
    /// retention. Its reader finishes the lease instead of retrying.
    #[error("shard {0} no longer exists")]
    ShardGone(ShardId),
    #[error("shard iterator expired")]
    ExpiredIterator,
    #[error("records were trimmed before they were read: {0}")]
    Trimmed(String),
    #[error("lease on shard {shard} is no longer ours (owner now {owner})")]
    LeaseLost { shard: ShardId, owner: String },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error(transparent)]
    Aws(#[from] AwsError),
}

impl Retryable for StreamError {
    fn is_retryable(&self) -> bool {
        match self {
            // The table or its stream may appear: setup runs beside the worker.
            StreamError::TableNotFound(_) | StreamError::StreamDisabled(_) | StreamError::StreamNotFound(_) => true,
            StreamError::Aws(error) => error.is_retryable(),
            StreamError::ExpiredIterator
            | StreamError::ShardGone(_)
            | StreamError::Trimmed(_)
            | StreamError::LeaseLost { .. }
            | StreamError::Malformed { .. } => false,
        }
    }
}

/// What readiness needs to know: was the stream found, and did a read succeed recently.
#[derive(Debug, Default)]
pub struct StreamHealth {
    stream_id: Mutex<Option<String>>,
    last_read: Mutex<Option<Instant>>,
    /// When the lease table was last read, and whether this worker held leases then.
    last_lease_round: Mutex<Option<(Instant, bool)>>,
}

impl StreamHealth {
    pub(crate) fn stream_found(&self, stream_id: &str) {
        let mut current = lock(&self.stream_id);
        if current.as_deref() != Some(stream_id) {
            tracing::info!(stream = stream_id, "reading stream");
            *current = Some(stream_id.to_owned());
        }
    }

    pub(crate) fn stream_lost(&self) {
        *lock(&self.stream_id) = None;
    }

    pub(crate) fn read_succeeded(&self) {
        *lock(&self.last_read) = Some(Instant::now());
    }

    pub(crate) fn lease_round_succeeded(&self, holding: bool) {
        *lock(&self.last_lease_round) = Some((Instant::now(), holding));
    }

    /// `Ok` when the stream is found and a read succeeded within `max_age`, or, for a worker
    /// standing by with no leases, the lease table was read within `max_age`; otherwise why not.
    pub fn readiness(&self, max_age: Duration) -> Result<(), String> {
        if lock(&self.stream_id).is_none() {
            return Err("stream not found yet".to_owned());
        }
        if let Some((at, false)) = *lock(&self.last_lease_round) {
            if at.elapsed() <= max_age {
                return Ok(());
            }
        }
        match *lock(&self.last_read) {
            None => Err("no successful read yet".to_owned()),
            Some(at) if at.elapsed() > max_age => {
                Err(format!("no successful read for {} ms", at.elapsed().as_millis()))
            }
            Some(_) => Ok(()),
        }
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (plain values only).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_their_stored_form() {
        for text in [
            "TRIM_HORIZON",
            "LATEST",
            "LATEST@2026-12-04T16:50:00.000Z",
            "000000000000000000042",
        ] {
            let position = Position::decode(text).expect("decodes");
            assert_eq!(position.encode(), text);
        }
        assert_eq!(Position::decode("latest"), None);
        assert_eq!(Position::decode("LATEST@yesterday"), None);
        let Position::LatestAt(at) = Position::latest_now() else {
            panic!("resolved")
        };
        let since = at.duration_since(std::time::UNIX_EPOCH).expect("after 1970");
        assert_eq!(since.as_secs() % 60, 0, "cut to the minute");
        assert!(at <= SystemTime::now());
    }

    #[test]
    fn readiness_needs_a_stream_and_a_recent_read() {
        let health = StreamHealth::default();
        assert!(health.readiness(Duration::from_secs(10)).is_err());
        health.stream_found("arn:stream");
        assert!(health.readiness(Duration::from_secs(10)).is_err());
        health.read_succeeded();
        assert!(health.readiness(Duration::from_secs(10)).is_ok());
        std::thread::sleep(Duration::from_millis(5));
        assert!(health.readiness(Duration::from_millis(1)).is_err());
        health.stream_lost();
        assert!(health.readiness(Duration::from_secs(10)).is_err());
    }
}
