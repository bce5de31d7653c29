//! The Kinesis Data Streams source: a table streamed into Kinesis ("Kinesis Data Streams for
//! DynamoDB"), whose records' data is the DynamoDB change record as JSON (`eventName`,
//! `dynamodb.Keys`, `dynamodb.NewImage`, `dynamodb.ApproximateCreationDateTime` in epoch
//! milliseconds).
//!
//! Shards split (one parent) and merge (two parents: `ParentShardId` and
//! `AdjacentParentShardId`); lineage is the stream worker's business. Requests name the stream
//! by name, which every implementation accepts.

use std::time::{Duration, SystemTime};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_kinesis::operation::list_shards::ListShardsError;
use aws_sdk_kinesis::types::ShardIteratorType;
use base64::Engine as _;
use serde_json::Value as Json;

use super::{
    Batch, EventKind, Item, Position, Record, SequenceNumber, ShardId, ShardInfo, StreamError, StreamShards,
    StreamSource,
};
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
            Position::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            Position::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            Position::After(sequence) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence.as_str()),
        };
        let output = request.send().await.map_err(|error| match error.as_service_error() {
            Some(GetShardIteratorError::ResourceNotFoundException(_)) => {
                StreamError::StreamNotFound(stream_id.to_owned())
            }
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
    let change_record = &change["dynamodb"];
    let created_at = change_record["ApproximateCreationDateTime"]
        .as_u64()
        .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
        .or(arrived);
    Some(Record {
        sequence_number,
        event: change["eventName"]
            .as_str()
            .map_or(EventKind::Other, EventKind::from_name),
        keys: item_from_json(&change_record["Keys"]).unwrap_or_default(),
        new_image: item_from_json(&change_record["NewImage"]),
        created_at,
    })
}

/// A DynamoDB-JSON map (`{"name": {"S": "..."}, ...}`); `None` when it is not a map.
fn item_from_json(value: &Json) -> Option<Item> {
    let map = value.as_object()?;
    Some(
        map.iter()
            .filter_map(|(name, value)| Some((name.clone(), value_from_json(value)?)))
            .collect(),
    )
}

/// One DynamoDB-JSON value; `None` for a shape that is not one.
fn value_from_json(value: &Json) -> Option<AttributeValue> {
    let (kind, inner) = value.as_object()?.iter().next()?;
    let strings = |inner: &Json| -> Option<Vec<String>> {
        inner
            .as_array()?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let blob = |inner: &Json| -> Option<Blob> {
        base64::engine::general_purpose::STANDARD
            .decode(inner.as_str()?)
            .ok()
            .map(Blob::new)
    };
    Some(match kind.as_str() {
        "S" => AttributeValue::S(inner.as_str()?.to_owned()),
        "N" => AttributeValue::N(inner.as_str()?.to_owned()),
        "BOOL" => AttributeValue::Bool(inner.as_bool()?),
        "NULL" => AttributeValue::Null(inner.as_bool()?),
        "SS" => AttributeValue::Ss(strings(inner)?),
        "NS" => AttributeValue::Ns(strings(inner)?),
        "B" => AttributeValue::B(blob(inner)?),
        "BS" => AttributeValue::Bs(inner.as_array()?.iter().map(blob).collect::<Option<_>>()?),
        "L" => AttributeValue::L(inner.as_array()?.iter().map(value_from_json).collect::<Option<_>>()?),
        "M" => AttributeValue::M(item_from_json(inner)?),
        _ => return None,
    })
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
    fn change_records_decode_from_dynamodb_json() {
        let data = r#"{"eventName":"INSERT","tableName":"cruddur-messages","dynamodb":{
            "ApproximateCreationDateTime":1700000000000,
            "Keys":{"pk":{"S":"MSG#g"},"sk":{"S":"2023-01-01T00:00:00"}},
            "NewImage":{"pk":{"S":"MSG#g"},"n":{"N":"4"},"ok":{"BOOL":true},"tags":{"SS":["a"]},
                        "raw":{"B":"aGk="},"list":{"L":[{"NULL":true},{"M":{"x":{"S":"y"}}}]}}}}"#;
        let record = convert_record(kinesis_record(data)).expect("converts");
        assert_eq!(record.event, EventKind::Insert);
        assert_eq!(record.keys.get("pk"), Some(&AttributeValue::S("MSG#g".into())));
        let image = record.new_image.expect("image");
        assert_eq!(image.get("n"), Some(&AttributeValue::N("4".into())));
        assert_eq!(image.get("ok"), Some(&AttributeValue::Bool(true)));
        assert_eq!(image.get("tags"), Some(&AttributeValue::Ss(vec!["a".into()])));
        assert_eq!(image.get("raw"), Some(&AttributeValue::B(Blob::new("hi"))));
        let nested = AttributeValue::M(Item::from([("x".to_owned(), AttributeValue::S("y".into()))]));
        assert_eq!(
            image.get("list"),
            Some(&AttributeValue::L(vec![AttributeValue::Null(true), nested]))
        );
        assert_eq!(
            record.created_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000))
        );
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
