//! What a stream source is: its shards, one page of records, and the trait every source
//! (DynamoDB Streams, Kinesis, the test fake) implements.

use std::future::Future;

use super::error::StreamError;
use super::position::Position;
use super::record::{Record, ShardId};

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
    /// The children of `shard` (a shard read to its end) as the source lists them, found without
    /// listing the whole stream; `None` when this source cannot look them up (the caller lists
    /// everything instead). An empty list is no answer either: a source may not show a child yet.
    fn children(
        &self,
        stream_id: &str,
        shard: &ShardId,
    ) -> impl Future<Output = Result<Option<Vec<ShardInfo>>, StreamError>> + Send {
        let _ = (stream_id, shard);
        async { Ok(None) }
    }
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
