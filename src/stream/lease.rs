//! The lease table: one row per shard, holding who reads it and how far it is handled.
//!
//! Row (`shard_id` is the key): `checkpoint` (`TRIM_HORIZON`, `LATEST`, or the sequence number
//! of the newest fully handled record), `owner` (the worker id reading it), `parent_shard_ids`,
//! `shard_end` (the shard was read to its end and everything in it handled), `stream_id`,
//! `lease_counter` (bumped on every claim) and `updated_at`.
//!
//! Invariant: a checkpoint is written only by the lease's owner (the write is conditional), so
//! a worker that lost a shard cannot move its checkpoint. Lease expiry, renewal and balancing
//! across several workers build on these rows.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
};

use super::{Position, ShardId, ShardInfo, StreamError};
use crate::aws::{self, AwsError};

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
}

/// Reads and writes lease rows on behalf of one worker.
#[derive(Debug, Clone)]
pub struct LeaseStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    owner: String,
}

impl LeaseStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>, owner: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            owner: owner.into(),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Creates the lease table when missing (on-demand capacity). Returns whether it created it.
    pub async fn ensure_table(&self) -> Result<bool, AwsError> {
        let key = KeySchemaElement::builder()
            .attribute_name(LEASE_TABLE_KEY)
            .key_type(KeyType::Hash)
            .build()
            .map_err(|e| AwsError::invalid_request("CreateTable", e))?;
        let attribute = AttributeDefinition::builder()
            .attribute_name(LEASE_TABLE_KEY)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| AwsError::invalid_request("CreateTable", e))?;
        aws::create_table_if_missing(&self.client, &self.table, |request| {
            request
                .key_schema(key)
                .attribute_definitions(attribute)
                .billing_mode(BillingMode::PayPerRequest)
        })
        .await
    }

    /// Every lease row (strongly consistent).
    pub async fn load_all(&self) -> Result<HashMap<ShardId, Lease>, StreamError> {
        let items = aws::scan_all(self.client.scan().table_name(&self.table).consistent_read(true)).await?;
        let mut leases = HashMap::new();
        for item in items {
            let lease = decode(&item)?;
            leases.insert(lease.shard.clone(), lease);
        }
        Ok(leases)
    }

    /// Adds the row for a newly discovered shard; leaves an existing row alone.
    pub async fn create(
        &self,
        stream_id: &str,
        shard: &ShardInfo,
        checkpoint: &Position,
        shard_end: bool,
    ) -> Result<(), StreamError> {
        let parents = shard.parents.iter().map(|p| AttributeValue::S(p.0.clone())).collect();
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(LEASE_TABLE_KEY, AttributeValue::S(shard.id.0.clone()))
            .item("stream_id", AttributeValue::S(stream_id.to_owned()))
            .item("checkpoint", AttributeValue::S(checkpoint.encode().to_owned()))
            .item("parent_shard_ids", AttributeValue::L(parents))
            .item("shard_end", AttributeValue::Bool(shard_end))
            .item("lease_counter", AttributeValue::N("0".into()))
            .item("updated_at", now())
            .condition_expression("attribute_not_exists(#key)")
            .expression_attribute_names("#key", LEASE_TABLE_KEY)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(error)
                if matches!(
                    error.as_service_error(),
                    Some(PutItemError::ConditionalCheckFailedException(_))
                ) =>
            {
                Ok(())
            }
            Err(error) => Err(AwsError::from_sdk("PutItem", &error).into()),
        }
    }

    /// Makes this worker the shard's owner and returns the row as it now stands.
    pub async fn claim(&self, shard: &ShardId) -> Result<Lease, StreamError> {
        let output = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_TABLE_KEY, AttributeValue::S(shard.0.clone()))
            .update_expression("SET #owner = :me, updated_at = :now ADD lease_counter :one")
            .condition_expression("attribute_exists(#key)")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#key", LEASE_TABLE_KEY)
            .expression_attribute_values(":me", AttributeValue::S(self.owner.clone()))
            .expression_attribute_values(":now", now())
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("UpdateItem", &error))?;
        let item = output.attributes.unwrap_or_default();
        decode(&item)
    }

    /// Records how far the shard is handled; only while this worker owns the lease.
    pub async fn checkpoint(&self, shard: &ShardId, position: &Position, shard_end: bool) -> Result<(), StreamError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_TABLE_KEY, AttributeValue::S(shard.0.clone()))
            .update_expression("SET checkpoint = :checkpoint, shard_end = :end, updated_at = :now")
            .condition_expression("#owner = :me")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":me", AttributeValue::S(self.owner.clone()))
            .expression_attribute_values(":checkpoint", AttributeValue::S(position.encode().to_owned()))
            .expression_attribute_values(":end", AttributeValue::Bool(shard_end))
            .expression_attribute_values(":now", now())
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(error) => match error.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    let owner = failed.item().and_then(|item| text(item, "owner")).unwrap_or("nobody");
                    Err(StreamError::LeaseLost {
                        shard: shard.clone(),
                        owner: owner.to_owned(),
                    })
                }
                _ => Err(AwsError::from_sdk("UpdateItem", &error).into()),
            },
        }
    }
}

fn now() -> AttributeValue {
    AttributeValue::S(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn text<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(value)) => Some(value),
        _ => None,
    }
}

fn decode(item: &HashMap<String, AttributeValue>) -> Result<Lease, StreamError> {
    let malformed = |detail: String| StreamError::Malformed {
        what: "lease row",
        detail,
    };
    let shard = text(item, LEASE_TABLE_KEY).ok_or_else(|| malformed(format!("no {LEASE_TABLE_KEY}")))?;
    let checkpoint = match text(item, "checkpoint") {
        None => Position::TrimHorizon,
        Some(stored) => {
            Position::decode(stored).ok_or_else(|| malformed(format!("shard {shard}: bad checkpoint {stored:?}")))?
        }
    };
    let parents = match item.get("parent_shard_ids") {
        Some(AttributeValue::L(values)) => values
            .iter()
            .filter_map(|value| match value {
                AttributeValue::S(id) => Some(ShardId(id.clone())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Lease {
        shard: ShardId(shard.to_owned()),
        checkpoint,
        owner: text(item, "owner").map(str::to_owned),
        parents,
        shard_end: matches!(item.get("shard_end"), Some(AttributeValue::Bool(true))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_rows_decode() {
        let item = HashMap::from([
            (LEASE_TABLE_KEY.to_owned(), AttributeValue::S("shard-2".into())),
            ("checkpoint".to_owned(), AttributeValue::S("00042".into())),
            ("owner".to_owned(), AttributeValue::S("w1".into())),
            (
                "parent_shard_ids".to_owned(),
                AttributeValue::L(vec![AttributeValue::S("shard-1".into())]),
            ),
            ("shard_end".to_owned(), AttributeValue::Bool(true)),
        ]);
        let lease = decode(&item).expect("decodes");
        assert_eq!(lease.shard, ShardId("shard-2".into()));
        assert_eq!(lease.checkpoint.encode(), "00042");
        assert_eq!(lease.owner.as_deref(), Some("w1"));
        assert_eq!(lease.parents, vec![ShardId("shard-1".into())]);
        assert!(lease.shard_end);
    }

    #[test]
    fn a_bad_checkpoint_is_an_error_not_a_restart_from_scratch() {
        let item = HashMap::from([
            (LEASE_TABLE_KEY.to_owned(), AttributeValue::S("shard-2".into())),
            ("checkpoint".to_owned(), AttributeValue::S("garbage".into())),
        ]);
        assert!(decode(&item).is_err());
    }
}
