//! The lease table in DynamoDB: one item per shard.
//!
//! Item (`shard_id` is the key): `checkpoint` (a [`Position`] in its stored form), `owner`,
//! `parent_shard_ids`, `shard_end`, `stream_id`, `lease_counter` and `updated_at` (for people
//! reading the table; no worker compares clocks). The fleet row holds `beats` and `epochs` (maps
//! of worker id to number), `leader`, `term`, `changes` and `stream_id`; an assignment row
//! `shards` (a list) and `give` (a map of shard to worker). Every condition of [`LeaseTable`] is a
//! DynamoDB condition expression, so concurrent workers are ordered by DynamoDB itself.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
};

use super::table::{
    is_coordination_key, Assignment, BeatRefused, Fleet, Lease, LeaseTable, OwnedWrite, ASSIGNMENT_PREFIX, FLEET_ROW,
    LEASE_TABLE_KEY,
};
use crate::aws::{self, AwsError};
use crate::stream::error::StreamError;
use crate::stream::position::Position;
use crate::stream::record::ShardId;

/// One DynamoDB table of lease rows.
#[derive(Debug, Clone)]
pub struct DynamoDbLeaseTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoDbLeaseTable {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    fn update(&self, shard: &ShardId) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_TABLE_KEY, AttributeValue::S(shard.0.clone()))
    }
}

impl LeaseTable for DynamoDbLeaseTable {
    /// On-demand capacity.
    async fn ensure(&self) -> Result<bool, StreamError> {
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
        let created = aws::create_table_if_missing(&self.client, &self.table, |request| {
            request
                .key_schema(key)
                .attribute_definitions(attribute)
                .billing_mode(BillingMode::PayPerRequest)
        })
        .await?;
        self.ensure_fleet_row().await?;
        Ok(created)
    }

    async fn load_all(&self) -> Result<HashMap<ShardId, Lease>, StreamError> {
        let items = aws::scan_all(self.client.scan().table_name(&self.table).consistent_read(true)).await?;
        let mut leases = HashMap::new();
        for item in items {
            if text(&item, LEASE_TABLE_KEY).is_some_and(is_coordination_key) {
                continue;
            }
            let lease = decode(&item)?;
            leases.insert(lease.shard.clone(), lease);
        }
        Ok(leases)
    }

    async fn create(&self, lease: &Lease) -> Result<bool, StreamError> {
        let parents = lease.parents.iter().map(|p| AttributeValue::S(p.0.clone())).collect();
        let mut request = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(LEASE_TABLE_KEY, AttributeValue::S(lease.shard.0.clone()))
            .item("checkpoint", AttributeValue::S(lease.checkpoint.encode().into_owned()))
            .item("parent_shard_ids", AttributeValue::L(parents))
            .item("shard_end", AttributeValue::Bool(lease.shard_end))
            .item("lease_counter", AttributeValue::N(lease.counter.to_string()))
            .item("updated_at", now())
            .condition_expression("attribute_not_exists(#key)")
            .expression_attribute_names("#key", LEASE_TABLE_KEY);
        if let Some(stream_id) = &lease.stream_id {
            request = request.item("stream_id", AttributeValue::S(stream_id.clone()));
        }
        if let Some(owner) = &lease.owner {
            request = request.item("owner", AttributeValue::S(owner.clone()));
        }
        match request.send().await {
            Ok(_) => Ok(true),
            Err(error) if is_condition_failure(error.as_service_error()) => Ok(false),
            Err(error) => Err(AwsError::from_sdk("PutItem", &error).into()),
        }
    }

    async fn take(&self, seen: &Lease, owner: &str) -> Result<Option<Lease>, StreamError> {
        let request = self
            .update(&seen.shard)
            .update_expression("SET #owner = :me, updated_at = :now ADD lease_counter :one")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":me", AttributeValue::S(owner.to_owned()))
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
            Err(error) if is_condition_failure(error.as_service_error()) => Ok(None),
            Err(error) => Err(AwsError::from_sdk("UpdateItem", &error).into()),
        }
    }

    async fn write(
        &self,
        shard: &ShardId,
        owner: &str,
        counter: u64,
        write: OwnedWrite<'_>,
    ) -> Result<u64, StreamError> {
        let request = self
            .update(shard)
            .condition_expression("#owner = :me AND lease_counter = :counter")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":me", AttributeValue::S(owner.to_owned()))
            .expression_attribute_values(":counter", AttributeValue::N(counter.to_string()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":now", now())
            .return_values(ReturnValue::UpdatedNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let request = match write {
            OwnedWrite::Checkpoint { position, shard_end } => request
                .update_expression(
                    "SET checkpoint = :checkpoint, shard_end = :end, updated_at = :now ADD lease_counter :one",
                )
                .expression_attribute_values(":checkpoint", AttributeValue::S(position.encode().into_owned()))
                .expression_attribute_values(":end", AttributeValue::Bool(shard_end)),
            OwnedWrite::Release => {
                request.update_expression("REMOVE #owner SET updated_at = :now ADD lease_counter :one")
            }
            OwnedWrite::HandOver { to } => request
                .update_expression("SET #owner = :to, updated_at = :now ADD lease_counter :one")
                .expression_attribute_values(":to", AttributeValue::S(to.to_owned())),
        };
        match request.send().await {
            Ok(output) => Ok(output
                .attributes
                .as_ref()
                .and_then(|item| number(item, "lease_counter"))
                .unwrap_or(counter + 1)),
            Err(error) => match error.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    let now_owner = failed.item().and_then(|item| text(item, "owner")).unwrap_or("nobody");
                    Err(StreamError::LeaseLost {
                        shard: shard.clone(),
                        owner: now_owner.to_owned(),
                    })
                }
                _ => Err(AwsError::from_sdk("UpdateItem", &error).into()),
            },
        }
    }

    async fn delete_finished(&self, shard: &ShardId) -> Result<bool, StreamError> {
        self.delete_if(shard, "shard_end = :value", AttributeValue::Bool(true))
            .await
    }

    async fn retire(&self, seen: &Lease) -> Result<bool, StreamError> {
        let counter = AttributeValue::N(seen.counter.to_string());
        self.delete_if(&seen.shard, "lease_counter = :value", counter).await
    }

    async fn get(&self, shard: &ShardId) -> Result<Option<Lease>, StreamError> {
        match self.get_item(&shard.0).await? {
            Some(item) => decode(&item).map(Some),
            None => Ok(None),
        }
    }

    async fn beat(
        &self,
        worker: &str,
        previous: Option<u64>,
        next: u64,
        leaving: bool,
    ) -> Result<Result<Fleet, BeatRefused>, StreamError> {
        let request = self.update(&ShardId(FLEET_ROW.to_owned()));
        let request = if leaving {
            request
                .update_expression("SET beats.#me = :next ADD leaving :me")
                .expression_attribute_values(":me", AttributeValue::Ss(vec![worker.to_owned()]))
        } else {
            request.update_expression("SET beats.#me = :next")
        };
        let request = request
            .expression_attribute_names("#me", worker)
            .expression_attribute_values(":next", number_value(next))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let request = match previous {
            None => request,
            Some(previous) => request
                .condition_expression("beats.#me = :previous")
                .expression_attribute_values(":previous", number_value(previous)),
        };
        match request.send().await {
            Ok(output) => Ok(Ok(decode_fleet(&output.attributes.unwrap_or_default()))),
            Err(error) => match error.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    let fleet = failed.item().map(decode_fleet).unwrap_or_default();
                    Ok(Err(if fleet.beats.contains_key(worker) {
                        BeatRefused::Twin
                    } else {
                        BeatRefused::Evicted
                    }))
                }
                _ => Err(AwsError::from_sdk("UpdateItem", &error).into()),
            },
        }
    }

    async fn remove_member(&self, worker: &str, seen: u64) -> Result<bool, StreamError> {
        let request = self
            .update(&ShardId(FLEET_ROW.to_owned()))
            .update_expression("REMOVE beats.#w, epochs.#w DELETE leaving :set")
            .condition_expression("beats.#w = :seen")
            .expression_attribute_names("#w", worker)
            .expression_attribute_values(":set", AttributeValue::Ss(vec![worker.to_owned()]))
            .expression_attribute_values(":seen", number_value(seen));
        conditional(request.send().await)
    }

    async fn claim_leadership(&self, me: &str, seen_leader: Option<&str>, seen_term: u64) -> Result<bool, StreamError> {
        let request = self
            .update(&ShardId(FLEET_ROW.to_owned()))
            .update_expression("SET leader = :me, term = :next")
            .expression_attribute_values(":me", AttributeValue::S(me.to_owned()))
            .expression_attribute_values(":next", number_value(seen_term + 1))
            .expression_attribute_values(":term", number_value(seen_term));
        let request = match seen_leader {
            Some(leader) => request
                .condition_expression("leader = :leader AND term = :term")
                .expression_attribute_values(":leader", AttributeValue::S(leader.to_owned())),
            None => request.condition_expression("attribute_not_exists(leader) AND term = :term"),
        };
        conditional(request.send().await)
    }

    async fn resign(&self, me: &str, term: u64) -> Result<(), StreamError> {
        let request = self
            .update(&ShardId(FLEET_ROW.to_owned()))
            .update_expression("REMOVE leader")
            .condition_expression("leader = :me AND term = :term")
            .expression_attribute_values(":me", AttributeValue::S(me.to_owned()))
            .expression_attribute_values(":term", number_value(term));
        conditional(request.send().await).map(|_| ())
    }

    async fn notify(&self, workers: &[String], stream_id: Option<&str>) -> Result<(), StreamError> {
        let mut sets: Vec<String> = Vec::new();
        let mut request = self.update(&ShardId(FLEET_ROW.to_owned()));
        if !workers.is_empty() {
            // Only with a use: DynamoDB refuses values the expression leaves unused.
            request = request
                .expression_attribute_values(":zero", number_value(0))
                .expression_attribute_values(":one", number_value(1));
        }
        for (index, worker) in workers.iter().enumerate() {
            sets.push(format!(
                "epochs.#w{index} = if_not_exists(epochs.#w{index}, :zero) + :one"
            ));
            request = request.expression_attribute_names(format!("#w{index}"), worker);
        }
        if let Some(stream_id) = stream_id {
            sets.push("stream_id = :stream".to_owned());
            request = request.expression_attribute_values(":stream", AttributeValue::S(stream_id.to_owned()));
        }
        if sets.is_empty() {
            return Ok(());
        }
        request
            .update_expression(format!("SET {}", sets.join(", ")))
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("UpdateItem", &error))?;
        Ok(())
    }

    async fn mark_changed(&self) -> Result<(), StreamError> {
        self.update(&ShardId(FLEET_ROW.to_owned()))
            .update_expression("ADD changes :one")
            .expression_attribute_values(":one", number_value(1))
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("UpdateItem", &error))?;
        Ok(())
    }

    async fn put_assignment(&self, worker: &str, assignment: &Assignment) -> Result<(), StreamError> {
        let shards = assignment
            .shards
            .iter()
            .map(|s| AttributeValue::S(s.0.clone()))
            .collect();
        let map = |shards: &std::collections::BTreeMap<ShardId, String>| {
            AttributeValue::M(
                shards
                    .iter()
                    .map(|(shard, worker)| (shard.0.clone(), AttributeValue::S(worker.clone())))
                    .collect(),
            )
        };
        self.client
            .put_item()
            .table_name(&self.table)
            .item(
                LEASE_TABLE_KEY,
                AttributeValue::S(format!("{ASSIGNMENT_PREFIX}{worker}")),
            )
            .item("shards", AttributeValue::L(shards))
            .item("give", map(&assignment.give))
            .item("receive", map(&assignment.receive))
            .item("updated_at", now())
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("PutItem", &error))?;
        Ok(())
    }

    async fn assignment(&self, worker: &str) -> Result<Assignment, StreamError> {
        let Some(item) = self.get_item(&format!("{ASSIGNMENT_PREFIX}{worker}")).await? else {
            return Ok(Assignment::default());
        };
        let shards = match item.get("shards") {
            Some(AttributeValue::L(values)) => values
                .iter()
                .filter_map(|value| value.as_s().ok().map(|id| ShardId(id.clone())))
                .collect(),
            _ => Vec::new(),
        };
        let map = |name: &str| match item.get(name) {
            Some(AttributeValue::M(values)) => values
                .iter()
                .filter_map(|(shard, worker)| worker.as_s().ok().map(|w| (ShardId(shard.clone()), w.clone())))
                .collect(),
            _ => Default::default(),
        };
        Ok(Assignment {
            shards,
            give: map("give"),
            receive: map("receive"),
        })
    }
}

impl DynamoDbLeaseTable {
    /// Adds the fleet row with empty maps unless it exists (a beat sets entries of them).
    async fn ensure_fleet_row(&self) -> Result<(), StreamError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(LEASE_TABLE_KEY, AttributeValue::S(FLEET_ROW.to_owned()))
            .item("beats", AttributeValue::M(HashMap::new()))
            .item("epochs", AttributeValue::M(HashMap::new()))
            .item("term", number_value(0))
            .item("changes", number_value(0))
            .condition_expression("attribute_not_exists(#key)")
            .expression_attribute_names("#key", LEASE_TABLE_KEY)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(error) if is_condition_failure(error.as_service_error()) => Ok(()),
            Err(error) => Err(AwsError::from_sdk("PutItem", &error).into()),
        }
    }

    async fn get_item(&self, key: &str) -> Result<Option<HashMap<String, AttributeValue>>, StreamError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(LEASE_TABLE_KEY, AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("GetItem", &error))?;
        Ok(output.item)
    }

    /// Deletes the shard's row if `condition` (on `:value`) holds; whether it did.
    async fn delete_if(&self, shard: &ShardId, condition: &str, value: AttributeValue) -> Result<bool, StreamError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key(LEASE_TABLE_KEY, AttributeValue::S(shard.0.clone()))
            .condition_expression(condition)
            .expression_attribute_values(":value", value)
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error) if is_condition_failure(error.as_service_error()) => Ok(false),
            Err(error) => Err(AwsError::from_sdk("DeleteItem", &error).into()),
        }
    }
}

/// A failed condition of a write.
fn is_condition_failure<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(error: Option<&E>) -> bool {
    error.and_then(|error| error.code()) == Some("ConditionalCheckFailedException")
}

/// A conditional update's outcome: whether its condition held.
fn conditional<T>(
    result: Result<T, aws_sdk_dynamodb::error::SdkError<UpdateItemError, aws_sdk_dynamodb::config::http::HttpResponse>>,
) -> Result<bool, StreamError> {
    match result {
        Ok(_) => Ok(true),
        Err(error) if is_condition_failure(error.as_service_error()) => Ok(false),
        Err(error) => Err(AwsError::from_sdk("UpdateItem", &error).into()),
    }
}

fn number_value(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn numbers(item: &HashMap<String, AttributeValue>, name: &str) -> std::collections::BTreeMap<String, u64> {
    match item.get(name) {
        Some(AttributeValue::M(values)) => values
            .iter()
            .filter_map(|(key, value)| value.as_n().ok()?.parse().ok().map(|n| (key.clone(), n)))
            .collect(),
        _ => Default::default(),
    }
}

fn decode_fleet(item: &HashMap<String, AttributeValue>) -> Fleet {
    Fleet {
        beats: numbers(item, "beats"),
        leader: text(item, "leader").map(str::to_owned),
        term: number(item, "term").unwrap_or(0),
        epochs: numbers(item, "epochs"),
        changes: number(item, "changes").unwrap_or(0),
        stream_id: text(item, "stream_id").map(str::to_owned),
        leaving: match item.get("leaving") {
            Some(AttributeValue::Ss(names)) => names.iter().cloned().collect(),
            _ => Default::default(),
        },
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
