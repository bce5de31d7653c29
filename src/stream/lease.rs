//! The lease table: one row per shard, holding who reads it and how far it is handled.
//!
//! Row (`shard_id` is the key): `checkpoint` (`TRIM_HORIZON`, `LATEST`, or the sequence number
//! of the newest fully handled record), `owner` (the worker id reading it), `parent_shard_ids`,
//! `shard_end` (the shard was read to its end and everything in it handled), `stream_id`,
//! `lease_counter` (bumped by every write of the owner) and `updated_at`.
//!
//! Invariant: every write after taking a lease (renew, checkpoint, release) is conditional on
//! the owner *and* the counter the writer last saw, and bumps the counter. A worker that lost
//! its lease (expired and taken, or stolen) can therefore neither renew it nor move its
//! checkpoint: its write fails and it stops reading the shard.

use std::collections::HashMap;
use std::sync::Arc;

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
    /// The stream the shard belongs to (a table's stream changes when it is re-enabled).
    pub stream_id: Option<String>,
    /// Bumped by every write of the owner (take, renew, checkpoint, release); other workers
    /// judge expiry by watching it stand still.
    pub counter: u64,
}

/// Reads and writes lease rows on behalf of one worker.
#[derive(Debug, Clone)]
pub struct LeaseStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    owner: String,
    /// When a lease write last found the row written by another live process under this
    /// worker's own id (shared by every clone).
    twin_seen: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl LeaseStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>, owner: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            owner: owner.into(),
            twin_seen: Arc::default(),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// A write of ours found the lease written by someone with our own worker id: another live
    /// task was given the same `WORKER_ID`. Reported loudly (at most once a minute).
    fn twin_found(&self, shard: &ShardId) {
        let now = std::time::Instant::now();
        let previous = super::lock(&self.twin_seen).replace(now);
        metrics::counter!(crate::telemetry::metric::DUPLICATE_WORKER_ID).increment(1);
        if previous.is_none_or(|at| now.duration_since(at) >= std::time::Duration::from_secs(60)) {
            tracing::error!(
                worker_id = %self.owner,
                shard = %shard,
                "another live worker uses this worker id: give every task its own WORKER_ID (or leave it unset); \
                 until then this worker leaves that worker's leases alone"
            );
        }
    }

    /// Whether another live task with this worker id was seen within `window`.
    pub fn twin_seen_within(&self, window: std::time::Duration) -> bool {
        super::lock(&self.twin_seen).is_some_and(|at| at.elapsed() < window)
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
            .item("checkpoint", AttributeValue::S(checkpoint.encode().into_owned()))
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

    /// Takes `seen` (a row as this worker last read it) if nobody changed it since: returns the
    /// row as it now stands, or `None` when another worker got there first.
    pub async fn take(&self, seen: &Lease) -> Result<Option<Lease>, StreamError> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_TABLE_KEY, AttributeValue::S(seen.shard.0.clone()))
            .update_expression("SET #owner = :me, updated_at = :now ADD lease_counter :one")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":me", AttributeValue::S(self.owner.clone()))
            .expression_attribute_values(":now", now())
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":counter", AttributeValue::N(seen.counter.to_string()))
            .return_values(ReturnValue::AllNew);
        let request = match &seen.owner {
            Some(owner) => request
                .condition_expression("lease_counter = :counter AND #owner = :owner")
                .expression_attribute_values(":owner", AttributeValue::S(owner.clone())),
            None => request.condition_expression("lease_counter = :counter AND attribute_not_exists(#owner)"),
        };
        match request.send().await {
            Ok(output) => Ok(Some(decode(&output.attributes.unwrap_or_default())?)),
            Err(error)
                if matches!(
                    error.as_service_error(),
                    Some(UpdateItemError::ConditionalCheckFailedException(_))
                ) =>
            {
                Ok(None)
            }
            Err(error) => Err(AwsError::from_sdk("UpdateItem", &error).into()),
        }
    }

    /// Proves this worker still reads the shard; returns the new counter.
    pub async fn renew(&self, shard: &ShardId, counter: u64) -> Result<u64, StreamError> {
        self.owned_write(shard, counter, "SET updated_at = :now", |request| request)
            .await
    }

    /// Records how far the shard is handled; returns the new counter.
    pub async fn checkpoint(
        &self,
        shard: &ShardId,
        counter: u64,
        position: &Position,
        shard_end: bool,
    ) -> Result<u64, StreamError> {
        self.owned_write(
            shard,
            counter,
            "SET checkpoint = :checkpoint, shard_end = :end, updated_at = :now",
            |request| {
                request
                    .expression_attribute_values(":checkpoint", AttributeValue::S(position.encode().into_owned()))
                    .expression_attribute_values(":end", AttributeValue::Bool(shard_end))
            },
        )
        .await
    }

    /// Gives the lease up so that another worker takes it at once, not after expiry.
    pub async fn release(&self, shard: &ShardId, counter: u64) -> Result<(), StreamError> {
        self.owned_write(shard, counter, "REMOVE #owner SET updated_at = :now", |request| request)
            .await
            .map(|_| ())
    }

    /// Deletes the row of a shard that is finished and gone from the stream.
    pub async fn delete(&self, shard: &ShardId) -> Result<(), StreamError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key(LEASE_TABLE_KEY, AttributeValue::S(shard.0.clone()))
            .condition_expression("shard_end = :true")
            .expression_attribute_values(":true", AttributeValue::Bool(true))
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("DeleteItem", &error))?;
        Ok(())
    }

    /// Deletes the row of an unfinished shard gone from the stream, only if nobody wrote it since
    /// it was seen (its counter unchanged). `Ok(false)` when someone did.
    pub async fn retire(&self, seen: &Lease) -> Result<bool, StreamError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key(LEASE_TABLE_KEY, AttributeValue::S(seen.shard.0.clone()))
            .condition_expression("lease_counter = :seen")
            .expression_attribute_values(":seen", AttributeValue::N(seen.counter.to_string()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(error) => Err(AwsError::from_sdk("DeleteItem", &error).into()),
        }
    }

    /// An update of a lease this worker holds at `counter`: conditional on both, bumps the
    /// counter; a failed condition means the lease is lost.
    async fn owned_write(
        &self,
        shard: &ShardId,
        counter: u64,
        update: &str,
        values: impl FnOnce(
            aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
        ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
    ) -> Result<u64, StreamError> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_TABLE_KEY, AttributeValue::S(shard.0.clone()))
            .update_expression(format!("{update} ADD lease_counter :one"))
            .condition_expression("#owner = :me AND lease_counter = :counter")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":me", AttributeValue::S(self.owner.clone()))
            .expression_attribute_values(":counter", AttributeValue::N(counter.to_string()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":now", now())
            .return_values(ReturnValue::UpdatedNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        match values(request).send().await {
            Ok(output) => Ok(output
                .attributes
                .as_ref()
                .and_then(|item| number(item, "lease_counter"))
                .unwrap_or(counter + 1)),
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

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    match item.get(name) {
        Some(AttributeValue::N(value)) => value.parse().ok(),
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
        counter: number(item, "lease_counter").unwrap_or(0),
        stream_id: text(item, "stream_id").map(str::to_owned),
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
            ("lease_counter".to_owned(), AttributeValue::N("12".into())),
        ]);
        let lease = decode(&item).expect("decodes");
        assert_eq!(lease.counter, 12);
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

/// A lease this worker holds, shared by the renewal loop and the shard's reader. Writes go
/// through it one at a time so that each uses the counter the previous one produced; a write
/// that finds the lease gone cancels `lost`, which stops the shard's reader.
#[derive(Debug)]
pub struct HeldLease {
    pub shard: ShardId,
    counter: tokio::sync::Mutex<u64>,
    lost: tokio_util::sync::CancellationToken,
}

impl HeldLease {
    pub fn new(lease: &Lease) -> Self {
        Self {
            shard: lease.shard.clone(),
            counter: tokio::sync::Mutex::new(lease.counter),
            lost: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Cancelled once the lease is known to be someone else's.
    pub fn lost(&self) -> &tokio_util::sync::CancellationToken {
        &self.lost
    }

    /// Records that the lease is someone else's now (seen in the table, before any write of
    /// ours failed): stops the shard's reader without a final checkpoint.
    pub fn mark_lost(&self) {
        if !self.lost.is_cancelled() {
            metrics::counter!(crate::telemetry::metric::LEASE_LOST).increment(1);
            tracing::warn!(shard = %self.shard, "lease taken by another worker; stopping the shard");
            self.lost.cancel();
        }
    }

    pub async fn renew(&self, store: &LeaseStore) -> Result<(), StreamError> {
        self.write(store, |counter| store.renew(&self.shard, counter)).await
    }

    pub async fn checkpoint(
        &self,
        store: &LeaseStore,
        position: &Position,
        shard_end: bool,
    ) -> Result<(), StreamError> {
        self.write(store, |counter| {
            store.checkpoint(&self.shard, counter, position, shard_end)
        })
        .await
    }

    pub async fn release(&self, store: &LeaseStore) -> Result<(), StreamError> {
        self.write(store, |counter| async move {
            store.release(&self.shard, counter).await.map(|()| counter)
        })
        .await
    }

    async fn write<F, Fut>(&self, store: &LeaseStore, write: F) -> Result<(), StreamError>
    where
        F: FnOnce(u64) -> Fut,
        Fut: std::future::Future<Output = Result<u64, StreamError>>,
    {
        // Once the lease is gone the write's own condition rejects it: no local shortcut needed.
        let mut counter = self.counter.lock().await;
        match write(*counter).await {
            Ok(next) => {
                *counter = next;
                Ok(())
            }
            Err(error @ StreamError::LeaseLost { .. }) => {
                // Still "ours" by name, yet not written by us: a twin with our worker id.
                if matches!(&error, StreamError::LeaseLost { owner, .. } if owner == store.owner()) {
                    store.twin_found(&self.shard);
                }
                self.mark_lost();
                Err(error)
            }
            Err(error) => Err(error),
        }
    }
}
