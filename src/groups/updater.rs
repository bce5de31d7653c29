//! The group-summary updater: brings a conversation's group rows up to a message.
//!
//! Read, decide ([`super::plan`]), write one transaction whose every step is conditional: each
//! old row is deleted only if still stored unchanged, each new row is put only if its key is
//! free. A crash leaves either the old rows or the new ones, never neither and never both; a
//! lost race (a condition failed) re-reads and re-decides.
//!
//! Reads: first the rows this updater itself last wrote for the conversation, when it still
//! remembers them (no read at all: in steady state it is their only writer). Then the GSI (one
//! cheap query). The index is eventually consistent, so when it does not show every
//! participant that its rows name, and after any lost race, the rows are read from the table
//! itself with strongly consistent queries through the sender's partition. Remembered rows are
//! only a guess: every write is conditional on the rows being stored exactly so, and a lost race
//! forgets them and reads again.

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem};

use super::model::{self, GroupRow, MessageInserted, GROUP_INDEX, GROUP_PREFIX};
use super::plan::{self, Decision, Writes};
use crate::aws::{self, AwsError};
use crate::dispatch::{Handler, Route};
use crate::retry::Retryable;
use crate::stream::Record;
use crate::telemetry::metric;

/// Lost races in a row before the update is handed back to the retry policy (with backoff).
const MAX_RACES: u32 = 4;

/// Conversations whose rows are remembered, at most; an arbitrary one is forgotten beyond.
const REMEMBERED_CONVERSATIONS: usize = 2048;

/// Rows carrying more text than this are not remembered (bounds memory at a few MB).
const REMEMBERED_TEXT_BYTES: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("group rows kept changing under the update ({MAX_RACES} lost races)")]
    Contended,
    #[error("transaction rejected: {0}")]
    Rejected(String),
}

impl Retryable for UpdateError {
    fn is_retryable(&self) -> bool {
        match self {
            UpdateError::Aws(error) => error.is_retryable(),
            UpdateError::Contended => true,
            UpdateError::Rejected(_) => false,
        }
    }
}

/// Why a transaction did not commit.
enum WriteFailure {
    /// A condition failed: someone else changed the rows first.
    LostRace,
    Error(UpdateError),
}

/// Keeps group rows of one messages table current.
#[derive(Debug, Clone)]
pub struct GroupSummaryUpdater {
    client: aws_sdk_dynamodb::Client,
    table: String,
    /// Per conversation, its rows as this updater last wrote or read them.
    remembered: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<GroupRow>>>>,
}

impl GroupSummaryUpdater {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            remembered: Default::default(),
        }
    }

    fn recall(&self, group: &str) -> Option<Vec<GroupRow>> {
        crate::stream::lock(&self.remembered).get(group).cloned()
    }

    fn remember(&self, group: &str, rows: Vec<GroupRow>) {
        let small = rows
            .iter()
            .all(|row| model::text(&row.item, "message").is_none_or(|text| text.len() <= REMEMBERED_TEXT_BYTES));
        let mut remembered = crate::stream::lock(&self.remembered);
        if !small || rows.is_empty() {
            remembered.remove(group);
            return;
        }
        if remembered.len() >= REMEMBERED_CONVERSATIONS && !remembered.contains_key(group) {
            if let Some(evicted) = remembered.keys().next().cloned() {
                remembered.remove(&evicted);
            }
        }
        remembered.insert(group.to_owned(), rows);
    }

    fn forget(&self, group: &str) {
        crate::stream::lock(&self.remembered).remove(group);
    }

    pub(crate) fn client(&self) -> &aws_sdk_dynamodb::Client {
        &self.client
    }

    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    /// Writes `writes` in one conditional transaction: `Ok(false)` when a condition failed
    /// (someone changed the rows first).
    pub(crate) async fn write_or_lose(&self, writes: Writes) -> Result<bool, UpdateError> {
        match self.write(writes).await {
            Ok(()) => Ok(true),
            Err(WriteFailure::LostRace) => Ok(false),
            Err(WriteFailure::Error(error)) => Err(error),
        }
    }

    /// Brings the message's conversation up to it; returns the outcome label.
    pub async fn apply(&self, message: &MessageInserted) -> Result<&'static str, UpdateError> {
        let group = message.group_uuid.as_str();
        let mut consistent = false;
        for _ in 0..MAX_RACES {
            let recalled = if consistent { None } else { self.recall(group) };
            let from_memory = recalled.is_some();
            let rows = match recalled {
                Some(rows) => rows,
                None => self.load_rows(message, consistent).await?,
            };
            let decision = plan::decide(&rows, message);
            let outcome = decision.outcome();
            let Decision::Write(writes) = decision else {
                if !from_memory {
                    self.remember(group, rows);
                }
                return Ok(outcome);
            };
            let after = plan::rows_after(&rows, &writes);
            match self.write(writes).await {
                Ok(()) => {
                    self.remember(group, after);
                    return Ok(outcome);
                }
                Err(WriteFailure::LostRace) => {
                    self.forget(group);
                    metrics::counter!(metric::GROUP_UPDATE_RACES).increment(1);
                    consistent = true;
                }
                Err(WriteFailure::Error(error)) => {
                    self.forget(group);
                    return Err(error);
                }
            }
        }
        Err(UpdateError::Contended)
    }

    async fn load_rows(&self, message: &MessageInserted, consistent: bool) -> Result<Vec<GroupRow>, UpdateError> {
        let group = &message.group_uuid;
        if !consistent {
            let indexed = self.rows_from_index(group).await?;
            if shows_every_participant(&indexed, message.sender_uuid.as_deref()) {
                return Ok(indexed);
            }
        }
        // The index may lag or have lost a race: read through the sender's own partition.
        if let Some(sender) = message.sender_uuid.as_deref() {
            let rows = self.rows_through(sender, group).await?;
            if !rows.is_empty() {
                return Ok(rows);
            }
        }
        // No sender, or the sender has no row in this group: the index is the only way left.
        self.rows_from_index(group).await
    }

    async fn rows_from_index(&self, group_uuid: &str) -> Result<Vec<GroupRow>, UpdateError> {
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(GROUP_INDEX)
            .key_condition_expression("message_group_uuid = :group")
            .expression_attribute_values(":group", AttributeValue::S(group_uuid.to_owned()));
        query_group_rows(query).await
    }

    /// The sender's rows of the group and those of every participant they name, read strongly
    /// consistently from the table.
    async fn rows_through(&self, sender: &str, group_uuid: &str) -> Result<Vec<GroupRow>, UpdateError> {
        let mut rows = self.rows_of_owner(sender, group_uuid).await?;
        let mut read = vec![sender.to_owned()];
        let named: Vec<String> = rows
            .iter()
            .filter_map(GroupRow::other_user)
            .map(str::to_owned)
            .collect();
        for other in named {
            if !read.contains(&other) {
                rows.extend(self.rows_of_owner(&other, group_uuid).await?);
                read.push(other);
            }
        }
        Ok(rows)
    }

    pub(crate) async fn rows_of_owner(&self, owner: &str, group_uuid: &str) -> Result<Vec<GroupRow>, UpdateError> {
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .consistent_read(true)
            .key_condition_expression("pk = :pk")
            .filter_expression("message_group_uuid = :group")
            .expression_attribute_values(":pk", AttributeValue::S(format!("{GROUP_PREFIX}{owner}")))
            .expression_attribute_values(":group", AttributeValue::S(group_uuid.to_owned()));
        query_group_rows(query).await
    }

    async fn write(&self, writes: Writes) -> Result<(), WriteFailure> {
        let build_error = |error| WriteFailure::Error(AwsError::invalid_request("TransactWriteItems", error).into());
        let mut items = Vec::with_capacity(writes.deletes.len() + writes.puts.len());
        for row in writes.deletes {
            items.push(
                TransactWriteItem::builder()
                    .delete(unchanged_delete(&self.table, row).map_err(build_error)?)
                    .build(),
            );
        }
        for item in writes.puts {
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(build_error)?;
            items.push(TransactWriteItem::builder().put(put).build());
        }
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        let Err(error) = result else { return Ok(()) };
        if let Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) = error.as_service_error() {
            let codes: Vec<&str> = cancelled
                .cancellation_reasons()
                .iter()
                .filter_map(|r| r.code())
                .collect();
            if codes.contains(&"ConditionalCheckFailed") {
                return Err(WriteFailure::LostRace);
            }
            let transient = [
                "TransactionConflict",
                "ThrottlingError",
                "ProvisionedThroughputExceeded",
                "RequestLimitExceeded",
            ];
            if !codes.iter().any(|code| transient.contains(code)) {
                return Err(WriteFailure::Error(UpdateError::Rejected(codes.join(", "))));
            }
            let mut classified = AwsError::from_sdk("TransactWriteItems", &error);
            classified.retryable = true;
            return Err(WriteFailure::Error(classified.into()));
        }
        Err(WriteFailure::Error(
            AwsError::from_sdk("TransactWriteItems", &error).into(),
        ))
    }
}

async fn query_group_rows(
    query: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
) -> Result<Vec<GroupRow>, UpdateError> {
    let items = aws::query_all(query).await?;
    Ok(items.into_iter().filter_map(GroupRow::from_item).collect())
}

/// Does the index show a row for every participant it names (and for the sender)?
fn shows_every_participant(rows: &[GroupRow], sender: Option<&str>) -> bool {
    if rows.is_empty() {
        return false;
    }
    let has_row = |user: &str| rows.iter().any(|row| row.owner == user);
    rows.iter().filter_map(GroupRow::other_user).all(has_row) && sender.is_none_or(has_row)
}

/// Deletes `row` only if it is still stored with exactly the attributes that were read.
fn unchanged_delete(table: &str, row: GroupRow) -> Result<Delete, aws_sdk_dynamodb::error::BuildError> {
    let mut condition = String::from("attribute_exists(pk)");
    let mut builder = Delete::builder().table_name(table);
    let mut index = 0;
    for (name, value) in row.item {
        if name == "pk" || name == "sk" {
            builder = builder.key(name, value);
            continue;
        }
        condition.push_str(&format!(" AND #a{index} = :v{index}"));
        builder = builder
            .expression_attribute_names(format!("#a{index}"), name)
            .expression_attribute_values(format!(":v{index}"), value);
        index += 1;
    }
    builder.condition_expression(condition).build()
}

impl Handler for GroupSummaryUpdater {
    type Event = MessageInserted;
    type Error = UpdateError;

    fn route(&self, record: &Record) -> Route<MessageInserted> {
        model::route(record)
    }

    fn supersedes(&self, candidate: &MessageInserted, current: &MessageInserted) -> bool {
        candidate.at >= current.at
    }

    async fn handle(&self, message: &MessageInserted) -> Result<(), UpdateError> {
        let outcome = self.apply(message).await?;
        metrics::counter!(metric::GROUP_UPDATES, "outcome" => outcome).increment(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::Item;
    use std::collections::HashMap;

    fn row(owner: &str, other: &str) -> GroupRow {
        let item: Item = HashMap::from([
            ("pk".to_owned(), AttributeValue::S(format!("GRP#{owner}"))),
            ("sk".to_owned(), AttributeValue::S("2023-03-20T10:00:00".into())),
            ("user_uuid".to_owned(), AttributeValue::S(other.to_owned())),
            ("message".to_owned(), AttributeValue::S("x".into())),
        ]);
        GroupRow::from_item(item).expect("row")
    }

    #[test]
    fn the_index_is_trusted_only_when_it_shows_everyone() {
        assert!(shows_every_participant(&[row("a", "b"), row("b", "a")], Some("a")));
        assert!(
            !shows_every_participant(&[row("a", "b")], Some("a")),
            "b's row is missing"
        );
        assert!(
            !shows_every_participant(&[row("b", "a"), row("a", "b")], Some("c")),
            "sender has no row"
        );
        assert!(shows_every_participant(&[row("a", "a")], Some("a")), "a note to self");
        assert!(!shows_every_participant(&[], Some("a")));
    }

    #[test]
    fn deletes_are_conditional_on_every_attribute() {
        let delete = unchanged_delete("t", row("a", "b")).expect("builds");
        let condition = delete.condition_expression().unwrap_or_default();
        assert!(condition.starts_with("attribute_exists(pk)"));
        assert_eq!(condition.matches(" AND ").count(), 2, "user_uuid and message");
        assert_eq!(delete.key().len(), 2);
    }
}
