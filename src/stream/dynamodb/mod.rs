//! The DynamoDB Streams source: the table's latest stream, its shards, its records.
//!
//! Paces its DescribeStream calls under the API's limit (10 calls a second per stream), and
//! looks up a finished shard's children with the `CHILD_SHARDS` filter, one call, without listing.
//!
//! Decodes GetRecords pages straight into records (`page`, hooked into the SDK's call by
//! `hook`), skipping what a record does not keep; a page that decoder declines is decoded by the
//! SDK and its attribute values converted into the DynamoDB client's (the two SDK crates each
//! define their own type) by moving, not copying, the record's contents.

mod hook;
mod page;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_dynamodb::types::AttributeValue as TableValue;
use aws_sdk_dynamodbstreams::operation::get_records::GetRecordsError;
use aws_sdk_dynamodbstreams::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_dynamodbstreams::types::{AttributeValue as StreamValue, ShardFilter, ShardFilterType, ShardIteratorType};

use super::error::StreamError;
use super::position::Position;
use super::record::{EventKind, Item, Record, SequenceNumber, ShardId};
use super::source::{Batch, ShardInfo, StreamShards, StreamSource};
use crate::aws::AwsError;
use crate::lock::lock;

/// The least time between two DescribeStream calls of this process: the API allows 10 calls a
/// second per stream, so a listing of 1,000 shards (10 pages) stays at 5 calls a second.
const DESCRIBE_GAP: Duration = Duration::from_millis(200);

/// Reads the latest stream of one DynamoDB table.
#[derive(Debug, Clone)]
pub struct DynamoDbStreamsSource {
    tables: aws_sdk_dynamodb::Client,
    streams: aws_sdk_dynamodbstreams::Client,
    table: String,
    /// When this process may call DescribeStream next (shared by clones).
    next_describe: Arc<Mutex<tokio::time::Instant>>,
    /// The SDK's own GetRecords decoder, behind the fast one.
    decoder: hook::SdkDecoder,
}

impl DynamoDbStreamsSource {
    pub fn new(
        tables: aws_sdk_dynamodb::Client,
        streams: aws_sdk_dynamodbstreams::Client,
        table: impl Into<String>,
    ) -> Self {
        Self {
            tables,
            streams,
            table: table.into(),
            next_describe: Arc::new(Mutex::new(tokio::time::Instant::now())),
            decoder: hook::SdkDecoder::new(),
        }
    }

    /// One DescribeStream page: its shards and where the next page starts.
    async fn describe_page(
        &self,
        stream_arn: &str,
        start_after: Option<String>,
        filter: Option<ShardFilter>,
    ) -> Result<(Vec<ShardInfo>, Option<String>), StreamError> {
        self.describe_slot().await;
        let output = self
            .streams
            .describe_stream()
            .stream_arn(stream_arn)
            .set_exclusive_start_shard_id(start_after)
            .set_shard_filter(filter)
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("DescribeStream", &error))?;
        let Some(description) = output.stream_description else {
            return Err(StreamError::Malformed {
                what: "DescribeStream answer",
                detail: "no StreamDescription".into(),
            });
        };
        let shards = description
            .shards
            .unwrap_or_default()
            .into_iter()
            .filter_map(|shard| {
                Some(ShardInfo {
                    id: ShardId(shard.shard_id?),
                    parents: shard.parent_shard_id.map(ShardId).into_iter().collect(),
                    closed: shard
                        .sequence_number_range
                        .is_some_and(|range| range.ending_sequence_number.is_some()),
                })
            })
            .collect();
        Ok((shards, description.last_evaluated_shard_id))
    }

    /// Waits for this process's next DescribeStream slot (one per [`DESCRIBE_GAP`]).
    async fn describe_slot(&self) {
        let now = tokio::time::Instant::now();
        let slot = {
            let mut next = lock(&self.next_describe);
            let slot = (*next).max(now);
            *next = slot + DESCRIBE_GAP;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    async fn latest_stream_arn(&self) -> Result<String, StreamError> {
        use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
        let output = self
            .tables
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|error| match error.as_service_error() {
                Some(DescribeTableError::ResourceNotFoundException(_)) => {
                    StreamError::TableNotFound(self.table.clone())
                }
                _ => AwsError::from_sdk("DescribeTable", &error).into(),
            })?;
        output
            .table()
            .and_then(|table| table.latest_stream_arn())
            .map(str::to_owned)
            .ok_or_else(|| StreamError::StreamDisabled(self.table.clone()))
    }
}

impl StreamSource for DynamoDbStreamsSource {
    async fn describe(&self) -> Result<StreamShards, StreamError> {
        let stream_arn = self.latest_stream_arn().await?;
        let mut shards = Vec::new();
        let mut start_after: Option<String> = None;
        loop {
            let (page, last) = self.describe_page(&stream_arn, start_after.take(), None).await?;
            shards.extend(page);
            match last {
                Some(last) => start_after = Some(last),
                None => break,
            }
        }
        Ok(StreamShards {
            stream_id: stream_arn,
            shards,
        })
    }

    async fn children(&self, stream_id: &str, shard: &ShardId) -> Result<Option<Vec<ShardInfo>>, StreamError> {
        let filter = ShardFilter::builder()
            .r#type(ShardFilterType::ChildShards)
            .shard_id(&shard.0)
            .build();
        let (children, _) = self.describe_page(stream_id, None, Some(filter)).await?;
        // DynamoDB Local accepts the filter and answers no shards: the caller then lists.
        Ok(Some(
            children
                .into_iter()
                .filter(|child| child.parents.contains(shard))
                .collect(),
        ))
    }

    async fn iterator(&self, stream_id: &str, shard: &ShardId, position: &Position) -> Result<String, StreamError> {
        let request = self
            .streams
            .get_shard_iterator()
            .stream_arn(stream_id)
            .shard_id(&shard.0);
        let request = match position {
            // LATEST resolved to an instant: from the horizon, the reader skips what came before.
            Position::TrimHorizon | Position::LatestAt(_) => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            Position::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            Position::After(sequence) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(sequence.text().as_ref()),
        };
        let output = request.send().await.map_err(|error| match error.as_service_error() {
            Some(GetShardIteratorError::TrimmedDataAccessException(_)) => {
                StreamError::Trimmed(format!("shard {shard} from {}", position.encode()))
            }
            Some(GetShardIteratorError::ResourceNotFoundException(_)) => StreamError::ShardGone(shard.clone()),
            _ => AwsError::from_sdk("GetShardIterator", &error).into(),
        })?;
        output.shard_iterator.ok_or_else(|| StreamError::Malformed {
            what: "GetShardIterator answer",
            detail: format!("no iterator for shard {shard}"),
        })
    }

    async fn read(&self, iterator: &str, limit: i32) -> Result<Batch, StreamError> {
        let request = self.streams.get_records().shard_iterator(iterator).limit(limit);
        let (output, fast) = match self.decoder.interceptor() {
            Some((interceptor, slot)) => (request.customize().interceptor(interceptor).send().await, Some(slot)),
            None => (request.send().await, None),
        };
        let output = output.map_err(|error| match error.as_service_error() {
            Some(GetRecordsError::ExpiredIteratorException(_)) => StreamError::ExpiredIterator,
            Some(GetRecordsError::TrimmedDataAccessException(_)) => StreamError::Trimmed("while reading".into()),
            Some(GetRecordsError::ResourceNotFoundException(_)) => {
                StreamError::ShardGone(ShardId("(being read)".into()))
            }
            _ => AwsError::from_sdk("GetRecords", &error).into(),
        })?;
        // The page is in the slot if the fast decoder took it; in the SDK's output otherwise.
        let (records, next_iterator) = match fast.and_then(|slot| lock(&slot).take()) {
            Some(page) => (page.records, page.next_iterator),
            None => (
                output
                    .records
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(convert_record)
                    .collect(),
                output.next_shard_iterator,
            ),
        };
        Ok(Batch {
            records,
            next_iterator,
            behind: None,
        })
    }
}

/// A DynamoDB Streams record in source-neutral form; `None` for a record without a sequence
/// number, which the service never sends and which could not be checkpointed.
fn convert_record(record: aws_sdk_dynamodbstreams::types::Record) -> Option<Record> {
    let event = record
        .event_name
        .as_ref()
        .map_or(EventKind::Other, |name| EventKind::from_name(name.as_str()));
    let change = record.dynamodb?;
    let sequence_number = SequenceNumber::parse(change.sequence_number.as_deref()?)?;
    Some(Record {
        sequence_number,
        event,
        keys: change.keys.map(convert_item).unwrap_or_default(),
        new_image: change.new_image.map(convert_item),
        created_at: change
            .approximate_creation_date_time
            .and_then(|at| SystemTime::try_from(at).ok()),
    })
}

fn convert_item(item: std::collections::HashMap<String, StreamValue>) -> Item {
    // Sized once: collecting a filtered iterator would grow (and rehash) the map step by step.
    let mut converted = Item::with_capacity(item.len());
    converted.extend(
        item.into_iter()
            .filter_map(|(name, value)| Some((name, convert_value(value)?))),
    );
    converted
}

/// `None` for a value type this SDK version does not know (dropped rather than guessed).
fn convert_value(value: StreamValue) -> Option<TableValue> {
    Some(match value {
        StreamValue::S(text) => TableValue::S(text),
        StreamValue::N(number) => TableValue::N(number),
        StreamValue::B(blob) => TableValue::B(blob),
        StreamValue::Bool(flag) => TableValue::Bool(flag),
        StreamValue::Null(flag) => TableValue::Null(flag),
        StreamValue::Ss(texts) => TableValue::Ss(texts),
        StreamValue::Ns(numbers) => TableValue::Ns(numbers),
        StreamValue::Bs(blobs) => TableValue::Bs(blobs),
        StreamValue::L(values) => TableValue::L(values.into_iter().filter_map(convert_value).collect()),
        StreamValue::M(map) => TableValue::M(convert_item(map)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodbstreams::types::{OperationType, StreamRecord};

    #[test]
    fn records_convert_with_nested_values() {
        let record = aws_sdk_dynamodbstreams::types::Record::builder()
            .event_name(OperationType::Insert)
            .dynamodb(
                StreamRecord::builder()
                    .sequence_number("000000000000000000042")
                    .keys("pk", StreamValue::S("MSG#g".into()))
                    .new_image("pk", StreamValue::S("MSG#g".into()))
                    .new_image(
                        "tags",
                        StreamValue::L(vec![StreamValue::N("1".into()), StreamValue::Bool(true)]),
                    )
                    .build(),
            )
            .build();
        let converted = convert_record(record).expect("converts");
        assert_eq!(converted.event, EventKind::Insert);
        assert_eq!(converted.sequence_number.text(), "000000000000000000042");
        assert_eq!(converted.keys.get("pk"), Some(&TableValue::S("MSG#g".into())));
        let image = converted.new_image.expect("image");
        assert_eq!(
            image.get("tags"),
            Some(&TableValue::L(vec![TableValue::N("1".into()), TableValue::Bool(true)]))
        );
    }

    #[test]
    fn records_without_sequence_numbers_are_dropped() {
        let record = aws_sdk_dynamodbstreams::types::Record::builder()
            .event_name(OperationType::Insert)
            .dynamodb(StreamRecord::builder().build())
            .build();
        assert!(convert_record(record).is_none());
    }
}
