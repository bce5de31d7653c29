//! The Kinesis Data Streams source: a table streamed into Kinesis ("Kinesis Data Streams for
//! DynamoDB"), whose records' data is the DynamoDB change record as JSON (`eventName`,
//! `dynamodb.Keys`, `dynamodb.NewImage`, `dynamodb.ApproximateCreationDateTime` in epoch
//! milliseconds).
//!
//! Shards split (one parent) and merge (two parents: `ParentShardId` and
//! `AdjacentParentShardId`); lineage is the stream worker's business. Requests name the stream
//! by name, which every implementation accepts.

use std::time::{Duration, SystemTime};

use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_kinesis::operation::list_shards::ListShardsError;
use aws_sdk_kinesis::types::ShardIteratorType;
use serde_json::Value as Json;

use super::change;
use super::error::StreamError;
use super::position::Position;
use super::record::{EventKind, Item, Record, SequenceNumber, ShardId};
use super::source::{Batch, ShardInfo, StreamShards, StreamSource};
use crate::aws::AwsError;

/// Reads one Kinesis data stream of DynamoDB change records.
#[derive(Debug, Clone)]
pub struct KinesisSource {
    client: aws_sdk_kinesis::Client,
    stream_name: String,
}

impl KinesisSource {
    pub fn new(client: aws_sdk_kinesis::Client, stream_name: impl Into<String>) -> Self {
        Self {
            client,
            stream_name: stream_name.into(),
        }
    }
}

impl StreamSource for KinesisSource {
    async fn describe(&self) -> Result<StreamShards, StreamError> {
        let mut shards = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            // The first page names the stream; later pages only carry the token (the API
            // rejects both together).
            let request = match next_token.take() {
                Some(token) => self.client.list_shards().next_token(token),
                None => self.client.list_shards().stream_name(&self.stream_name),
            };
            let output = request.send().await.map_err(|error| match error.as_service_error() {
                Some(ListShardsError::ResourceNotFoundException(_)) => {
                    StreamError::StreamNotFound(self.stream_name.clone())
                }
                _ => AwsError::from_sdk("ListShards", &error).into(),
            })?;
            for shard in output.shards.unwrap_or_default() {
                shards.push(ShardInfo {
                    id: ShardId(shard.shard_id),
                    parents: [shard.parent_shard_id, shard.adjacent_parent_shard_id]
                        .into_iter()
                        .flatten()
                        .map(ShardId)
                        .collect(),
                    closed: shard
                        .sequence_number_range
                        .is_some_and(|range| range.ending_sequence_number.is_some()),
                });
            }
            match output.next_token {
                Some(token) if !token.is_empty() => next_token = Some(token),
                _ => break,
            }
        }
        Ok(StreamShards {
            stream_id: self.stream_name.clone(),
            shards,
        })
    }

    async fn iterator(&self, stream_id: &str, shard: &ShardId, position: &Position) -> Result<String, StreamError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(stream_id)
            .shard_id(&shard.0);
        let request = match position {
            // LATEST resolved to an instant: from the horizon, the reader skips what came before.
            Position::TrimHorizon | Position::LatestAt(_) => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            Position::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            Position::After(sequence) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence.text().as_ref()),
        };
        let output = request.send().await.map_err(|error| match error.as_service_error() {
            // The stream exists (the shard sync found it): the shard is what is missing.
            Some(GetShardIteratorError::ResourceNotFoundException(_)) => StreamError::ShardGone(shard.clone()),
            _ => AwsError::from_sdk("GetShardIterator", &error).into(),
        })?;
        output.shard_iterator.ok_or_else(|| StreamError::Malformed {
            what: "GetShardIterator answer",
            detail: format!("no iterator for shard {shard}"),
        })
    }

    async fn read(&self, iterator: &str, limit: i32) -> Result<Batch, StreamError> {
        let output = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await
            .map_err(|error| match error.as_service_error() {
                Some(GetRecordsError::ExpiredIteratorException(_)) => StreamError::ExpiredIterator,
                _ => AwsError::from_sdk("GetRecords", &error).into(),
            })?;
        let records = output.records.into_iter().filter_map(convert_record).collect();
        let behind = output
            .millis_behind_latest
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis);
        Ok(Batch {
            records,
            next_iterator: output.next_shard_iterator,
            behind,
        })
    }
}

/// A Kinesis record carrying a DynamoDB change record. Data that is not such a record becomes an
/// `Other` event (ignored and counted downstream) and is logged with its sequence number.
fn convert_record(record: aws_sdk_kinesis::types::Record) -> Option<Record> {
    let sequence_number = SequenceNumber::parse(&record.sequence_number)?;
    let arrived = record
        .approximate_arrival_timestamp
        .and_then(|at| SystemTime::try_from(at).ok());
    let change: Json = match serde_json::from_slice(record.data.as_ref()) {
        Ok(change) => change,
        Err(error) => {
            tracing::warn!(sequence = %sequence_number, error = %error, "Kinesis record is not a DynamoDB change record");
            return Some(Record {
                sequence_number,
                event: EventKind::Other,
                keys: Item::new(),
                new_image: None,
                created_at: arrived,
            });
        }
    };
    Some(change::from_json(sequence_number, &change, arrived))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinesis_record(data: &str) -> aws_sdk_kinesis::types::Record {
        aws_sdk_kinesis::types::Record::builder()
            .sequence_number("49590338271490256608559692538361571095921575989136588898")
            .data(aws_sdk_kinesis::primitives::Blob::new(data))
            .partition_key("MSG#g")
            .build()
            .expect("record")
    }

    #[test]
    fn data_that_is_not_a_change_record_becomes_an_other_event() {
        let record = convert_record(kinesis_record("not json")).expect("kept, to be counted");
        assert_eq!(record.event, EventKind::Other);
        let record = convert_record(kinesis_record(
            r#"{"eventName":"REMOVE","dynamodb":{"Keys":{"pk":{"S":"MSG#g"}}}}"#,
        ))
        .expect("converts");
        assert_eq!(record.event, EventKind::Remove);
        assert!(record.new_image.is_none());
    }
}
