//! A stream source in memory, for the worker's and the reader's unit tests under
//! `tokio::time::pause`: shards with lineage (splits, merges), records, trimming, shards that
//! vanish, iterators that expire, throttled reads, child lookups (answered as DynamoDB Streams
//! does, or not at all as DynamoDB Local does), and counts of reads and DescribeStream calls.
//!
//! Answers as DynamoDB Streams does: an iterator past trimmed records is `Trimmed`, a shard no
//! longer listed is `ShardGone`, a closed shard read to its end has no next iterator.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::error::StreamError;
use super::position::Position;
use super::record::{EventKind, Item, Record, SequenceNumber, ShardId};
use super::source::{Batch, ShardInfo, StreamShards, StreamSource};
use crate::aws::AwsError;
use crate::lock::lock;

pub const STREAM_ID: &str = "arn:fake/stream";

/// Clones share the stream.
#[derive(Debug, Clone, Default)]
pub struct FakeSource(Arc<Mutex<FakeStream>>);

#[derive(Debug, Default)]
struct FakeStream {
    shards: Vec<FakeShard>,
    next_sequence: u64,
    iterators: HashMap<String, Cursor>,
    next_iterator: u64,
    throttled_reads: u32,
    reads: u64,
    /// DescribeStream calls so far: a listing's pages (100 shards a page) and child lookups.
    describe_calls: u64,
    /// Child lookups answer no shards, as DynamoDB Local does.
    children_unanswered: bool,
}

#[derive(Debug)]
struct FakeShard {
    info: ShardInfo,
    records: Vec<Record>,
    /// Records before this index are trimmed away.
    horizon: usize,
    /// No longer listed, and unknown to iterator requests.
    gone: bool,
}

#[derive(Debug, Clone)]
struct Cursor {
    shard: ShardId,
    offset: usize,
    expired: bool,
}

impl FakeSource {
    /// A stream of open shards without parents.
    pub fn with_shards(ids: &[&str]) -> Self {
        let source = Self::default();
        for id in ids {
            source.add_shard(id, &[]);
        }
        source
    }

    /// Adds an open shard.
    pub fn add_shard(&self, id: &str, parents: &[&str]) {
        lock(&self.0).shards.push(FakeShard {
            info: ShardInfo {
                id: ShardId((*id).to_owned()),
                parents: parents.iter().map(|p| ShardId((*p).to_owned())).collect(),
                closed: false,
            },
            records: Vec::new(),
            horizon: 0,
            gone: false,
        });
    }

    /// Appends a record for `key` to `shard`; its sequence number.
    pub fn put(&self, shard: &str, key: &str) -> SequenceNumber {
        let mut stream = lock(&self.0);
        stream.next_sequence += 1;
        let sequence = SequenceNumber::parse(&format!("{:021}", stream.next_sequence)).expect("digits");
        let keys: Item = [(
            "pk".to_owned(),
            aws_sdk_dynamodb::types::AttributeValue::S(key.to_owned()),
        )]
        .into();
        let record = Record {
            sequence_number: sequence.clone(),
            event: EventKind::Insert,
            keys,
            new_image: None,
            created_at: Some(SystemTime::now()),
        };
        let target = stream.shard_mut(shard);
        assert!(!target.info.closed, "records go to open shards only");
        target.records.push(record);
        sequence
    }

    /// `count` records on `shard`, keys `<shard>-<n>`.
    pub fn put_many(&self, shard: &str, count: usize) -> Vec<SequenceNumber> {
        (0..count).map(|n| self.put(shard, &format!("{shard}-{n}"))).collect()
    }

    /// Closes `parent` and opens `children` of it.
    pub fn split(&self, parent: &str, children: &[&str]) {
        lock(&self.0).shard_mut(parent).info.closed = true;
        for child in children {
            self.add_shard(child, &[parent]);
        }
    }

    /// Closes both parents and opens `child` of them.
    pub fn merge(&self, parents: [&str; 2], child: &str) {
        for parent in parents {
            lock(&self.0).shard_mut(parent).info.closed = true;
        }
        self.add_shard(child, &parents);
    }

    /// Trims the first `count` records of `shard` away.
    pub fn trim(&self, shard: &str, count: usize) {
        lock(&self.0).shard_mut(shard).horizon = count;
    }

    /// The shard leaves the listing; its iterators answer that it does not exist.
    pub fn remove(&self, shard: &str) {
        lock(&self.0).shard_mut(shard).gone = true;
    }

    /// Every iterator handed out so far expires.
    pub fn expire_iterators(&self) {
        for cursor in lock(&self.0).iterators.values_mut() {
            cursor.expired = true;
        }
    }

    /// The next `reads` reads are throttled.
    pub fn throttle(&self, reads: u32) {
        lock(&self.0).throttled_reads = reads;
    }

    /// GetRecords calls so far.
    pub fn reads(&self) -> u64 {
        lock(&self.0).reads
    }

    /// DescribeStream calls so far, counted as DynamoDB Streams would: one per page of 100 shards
    /// in a listing, one per child lookup.
    pub fn describe_calls(&self) -> u64 {
        lock(&self.0).describe_calls
    }

    /// From now on child lookups answer no shards (as DynamoDB Local does).
    pub fn leave_children_unanswered(&self) {
        lock(&self.0).children_unanswered = true;
    }
}

impl FakeStream {
    fn shard_mut(&mut self, id: &str) -> &mut FakeShard {
        self.shards
            .iter_mut()
            .find(|shard| shard.info.id.0 == id)
            .unwrap_or_else(|| panic!("no shard {id}"))
    }

    fn listed(&self, id: &ShardId) -> Option<&FakeShard> {
        self.shards.iter().find(|shard| &shard.info.id == id && !shard.gone)
    }

    fn hand_out(&mut self, shard: ShardId, offset: usize) -> String {
        self.next_iterator += 1;
        let iterator = format!("iterator-{}", self.next_iterator);
        let cursor = Cursor {
            shard,
            offset,
            expired: false,
        };
        self.iterators.insert(iterator.clone(), cursor);
        iterator
    }
}

impl StreamSource for FakeSource {
    async fn describe(&self) -> Result<StreamShards, StreamError> {
        let mut stream = lock(&self.0);
        let shards: Vec<ShardInfo> = stream
            .shards
            .iter()
            .filter(|s| !s.gone)
            .map(|s| s.info.clone())
            .collect();
        stream.describe_calls += shards.len().div_ceil(100).max(1) as u64;
        Ok(StreamShards {
            stream_id: STREAM_ID.to_owned(),
            shards,
        })
    }

    async fn children(&self, _stream_id: &str, shard: &ShardId) -> Result<Option<Vec<ShardInfo>>, StreamError> {
        let mut stream = lock(&self.0);
        stream.describe_calls += 1;
        if stream.children_unanswered {
            return Ok(Some(Vec::new()));
        }
        let children = stream
            .shards
            .iter()
            .filter(|s| !s.gone && s.info.parents.contains(shard))
            .map(|s| s.info.clone())
            .collect();
        Ok(Some(children))
    }

    async fn iterator(&self, _stream_id: &str, shard: &ShardId, position: &Position) -> Result<String, StreamError> {
        let mut stream = lock(&self.0);
        let found = stream
            .listed(shard)
            .ok_or_else(|| StreamError::ShardGone(shard.clone()))?;
        let offset = match position {
            Position::TrimHorizon | Position::LatestAt(_) => found.horizon,
            Position::Latest => found.records.len(),
            Position::After(sequence) => {
                let next = found
                    .records
                    .partition_point(|record| &record.sequence_number <= sequence);
                if next < found.horizon {
                    return Err(StreamError::Trimmed(format!("{sequence} is before the horizon")));
                }
                next
            }
        };
        Ok(stream.hand_out(shard.clone(), offset))
    }

    async fn read(&self, iterator: &str, limit: i32) -> Result<Batch, StreamError> {
        let mut stream = lock(&self.0);
        stream.reads += 1;
        if stream.throttled_reads > 0 {
            stream.throttled_reads -= 1;
            return Err(StreamError::Aws(AwsError {
                operation: "GetRecords",
                code: Some("LimitExceededException".to_owned()),
                message: "throttled".to_owned(),
                retryable: true,
            }));
        }
        // Iterators stay valid until they expire: a failed read may be retried with the same one.
        let cursor = stream
            .iterators
            .get(iterator)
            .cloned()
            .ok_or(StreamError::ExpiredIterator)?;
        if cursor.expired {
            return Err(StreamError::ExpiredIterator);
        }
        let shard = stream
            .listed(&cursor.shard)
            .ok_or_else(|| StreamError::ShardGone(cursor.shard.clone()))?;
        if cursor.offset < shard.horizon {
            return Err(StreamError::Trimmed(format!("{} records trimmed", shard.horizon)));
        }
        let end = (cursor.offset + usize::try_from(limit).unwrap_or(0)).min(shard.records.len());
        let records = shard.records[cursor.offset..end].to_vec();
        let finished = shard.info.closed && end == shard.records.len();
        let next_iterator = (!finished).then(|| stream.hand_out(cursor.shard, end));
        Ok(Batch {
            records,
            next_iterator,
            behind: None,
        })
    }
}
