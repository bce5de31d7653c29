//! The group-summary updater: brings a conversation's group rows up to a message.
//!
//! Read, decide ([`super::plan`]), write one transaction whose every step is conditional: each
//! old row is deleted only if still stored unchanged, each new row is put only if its key is
//! free. A crash leaves either the old rows or the new ones, never neither and never both; a
//! lost race (a condition failed) re-reads and re-decides. The transaction may share its
//! `TransactWriteItems` call with other conversations' ([`crate::aws::transact`]) when the calls
//! allowed in flight are busy; it still commits or fails alone.
//!
//! Reads: first the rows remembered for the conversation ([`super::memory`]: what this updater
//! last wrote, or what the stream showed written), when they show every participant. They may
//! only settle that nothing needs doing (a replay, a late record: no read at all). A write is
//! always built from rows read just before it, because its conditions can only check the
//! attributes it knows: an attribute the app added to a row since it was remembered (seen by
//! another worker's shard) would otherwise be dropped by the move. Remembered rows that need a
//! move are read again by key (strongly consistently, in a BatchGetItem shared with the other
//! conversations read at that moment: [`crate::aws::reads`]); the window between that
//! read and the conditional write is the only one left. Rows are read from the GSI (one cheap
//! query) for a conversation not remembered; the index is eventually consistent, so
//! when it does not show every participant that its rows name, for a remembered conversation,
//! and after any lost race, they are read from the table itself with strongly consistent
//! queries through the sender's partition.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem};

use super::memory::RowMemory;
use super::model::{self, GroupRow, MessageInserted, GROUP_INDEX, GROUP_PREFIX};
use super::plan::{self, Decision, Replace, Writes};
use crate::aws::reads::ReadCombiner;
use crate::aws::transact::{ActionSet, Commit, CommitError, TransactionCombiner};
use crate::aws::{self, AwsError};
use crate::dispatch::{Handler, Route};
use crate::retry::Retryable;
use crate::stream::Record;
use crate::telemetry::metric;

/// Lost races in a row before the update is handed back to the retry policy (with backoff).
const MAX_RACES: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("group rows kept changing under the update ({MAX_RACES} lost races)")]
    Contended,
    #[error("transaction rejected: {0}")]
    Rejected(String),
    /// The row key a move needs belongs to another conversation of the same user (two
    /// conversations whose messages share one instant): no retry can free it.
    #[error("group row key {key} is held by conversation {holder}")]
    KeyHeld { key: String, holder: String },
}

impl Retryable for UpdateError {
    fn is_retryable(&self) -> bool {
        match self {
            UpdateError::Aws(error) => error.is_retryable(),
            UpdateError::Contended => true,
            UpdateError::Rejected(_) | UpdateError::KeyHeld { .. } => false,
        }
    }
}

/// Why a transaction did not commit.
enum WriteFailure {
    /// A condition failed: someone else changed the rows first.
    LostRace,
    Error(UpdateError),
}

/// `TransactWriteItems` calls in flight at once unless set otherwise (`max_write_calls`).
pub const DEFAULT_WRITE_CALLS: usize = 4;
/// `BatchGetItem` calls in flight at once unless set otherwise (`max_read_calls`).
pub const DEFAULT_READ_CALLS: usize = 4;

/// The updater's own settings (the `[groups]` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupsSettings {
    /// `TransactWriteItems` calls in flight at once; updates waiting for one share it.
    pub max_write_calls: usize,
    /// `BatchGetItem` calls in flight at once; updates whose rows are read while they are all
    /// busy share the next one.
    pub max_read_calls: usize,
}

/// Keeps group rows of one messages table current.
#[derive(Debug, Clone)]
pub struct GroupSummaryUpdater {
    client: aws_sdk_dynamodb::Client,
    table: String,
    /// Per conversation, its rows as last written, read or seen in the stream: a guess.
    memory: Arc<RowMemory>,
    /// Updates waiting for a call share the next one.
    transactions: TransactionCombiner,
    /// Updates reading their rows by key while the calls are busy share the next read.
    reads: ReadCombiner,
}

impl GroupSummaryUpdater {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        let table = table.into();
        Self {
            transactions: TransactionCombiner::new(client.clone(), DEFAULT_WRITE_CALLS),
            reads: ReadCombiner::new(client.clone(), table.clone(), DEFAULT_READ_CALLS),
            client,
            table,
            memory: Default::default(),
        }
    }

    /// The updater as its settings say.
    pub fn with_settings(mut self, settings: &GroupsSettings) -> Self {
        self.reads = ReadCombiner::new(self.client.clone(), self.table.clone(), settings.max_read_calls);
        self.with_write_calls(settings.max_write_calls)
    }

    /// At most `calls` `TransactWriteItems` calls in flight; updates that wait share one.
    pub fn with_write_calls(mut self, calls: usize) -> Self {
        self.transactions = TransactionCombiner::new(self.client.clone(), calls);
        self
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
    ///
    /// Remembered rows may only say that nothing needs doing: a write is built from rows read
    /// strongly consistently, since its conditions can only check the attributes it knows (an
    /// attribute another writer added since would otherwise be dropped by the move).
    pub async fn apply(&self, message: &MessageInserted) -> Result<&'static str, UpdateError> {
        let group = message.group_uuid.as_str();
        let mut fresh = None;
        let mut consistent = false;
        if let Some(rows) = self.memory.recall(group, message.sender_uuid.as_deref()) {
            let decision = plan::decide(&rows, message);
            if !matches!(decision, Decision::Write(_)) {
                count_lookup("memory");
                return Ok(decision.outcome());
            }
            // The rows are known to exist: read them again by key, strongly consistently.
            fresh = self.rows_by_key(&rows).await?;
            consistent = fresh.is_none();
        }
        for _ in 0..MAX_RACES {
            let rows = match fresh.take() {
                Some(rows) => rows,
                None => self.load_rows(message, consistent).await?,
            };
            let decision = plan::decide(&rows, message);
            let outcome = decision.outcome();
            let Decision::Write(writes) = decision else {
                self.memory.remember(group, rows);
                return Ok(outcome);
            };
            let after = plan::rows_after(&rows, &writes);
            match self.write(writes).await {
                Ok(()) => {
                    self.memory.remember(group, after);
                    return Ok(outcome);
                }
                Err(WriteFailure::LostRace) => {
                    self.memory.forget(group);
                    metrics::counter!(metric::GROUP_UPDATE_RACES).increment(1);
                    consistent = true;
                }
                Err(WriteFailure::Error(error)) => {
                    self.memory.forget(group);
                    return Err(error);
                }
            }
        }
        Err(UpdateError::Contended)
    }

    async fn load_rows(&self, message: &MessageInserted, consistent: bool) -> Result<Vec<GroupRow>, UpdateError> {
        let group = &message.group_uuid;
        if !consistent {
            count_lookup("index");
            let indexed = self.rows_from_index(group).await?;
            if model::shows_every_participant(&indexed, message.sender_uuid.as_deref()) {
                return Ok(indexed);
            }
        }
        count_lookup("table");
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

    /// `rows` as stored now, read by key strongly consistently in one call; `None` when any of
    /// them is gone (someone moved it) or was not read, for a full read instead.
    async fn rows_by_key(&self, rows: &[GroupRow]) -> Result<Option<Vec<GroupRow>>, UpdateError> {
        let keys: Vec<aws::Item> = rows
            .iter()
            .map(|row| {
                row.item
                    .iter()
                    .filter(|(name, _)| *name == "pk" || *name == "sk")
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect()
            })
            .collect();
        count_lookup("key");
        let fetched = self.reads.get(keys).await?;
        let found: Vec<GroupRow> = fetched.items.into_iter().filter_map(GroupRow::from_item).collect();
        Ok((fetched.complete && found.len() == rows.len()).then_some(found))
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

    /// One conversation's writes as one all-or-nothing set, committed alone or in a call
    /// shared with other conversations' (the combiner keeps each set's outcome its own).
    async fn write(&self, writes: Writes) -> Result<(), WriteFailure> {
        let build_error = |error| WriteFailure::Error(AwsError::invalid_request("TransactWriteItems", error).into());
        let mut actions = Vec::with_capacity(writes.deletes.len() + writes.puts.len() + writes.replaces.len());
        let mut touched = Vec::with_capacity(actions.capacity());
        for row in writes.deletes {
            touched.push(item_name(&row.item));
            actions.push(
                TransactWriteItem::builder()
                    .delete(unchanged_delete(&self.table, row).map_err(build_error)?)
                    .build(),
            );
        }
        for Replace { old, new } in writes.replaces {
            touched.push(item_name(&new));
            actions.push(
                TransactWriteItem::builder()
                    .put(unchanged_replace(&self.table, old, new).map_err(build_error)?)
                    .build(),
            );
        }
        let first_put = actions.len();
        let mut ours = Vec::with_capacity(writes.puts.len());
        for item in writes.puts {
            touched.push(item_name(&item));
            ours.push(model::text(&item, "message_group_uuid").map(str::to_owned));
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk)")
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .build()
                .map_err(build_error)?;
            actions.push(TransactWriteItem::builder().put(put).build());
        }
        match self.transactions.commit(ActionSet::new(actions, touched)).await {
            Ok(Commit::Committed) => Ok(()),
            Ok(Commit::ConditionFailed(stored)) => {
                let held = stored.iter().skip(first_put).zip(&ours).find_map(|(stored, ours)| {
                    let stored = stored.as_ref()?;
                    let holder = model::text(stored, "message_group_uuid").unwrap_or("(none)");
                    (Some(holder) != ours.as_deref()).then(|| UpdateError::KeyHeld {
                        key: item_name(stored).replace('\u{0}', " "),
                        holder: holder.to_owned(),
                    })
                });
                Err(held.map_or(WriteFailure::LostRace, WriteFailure::Error))
            }
            Err(CommitError::Aws(error)) => Err(WriteFailure::Error(error.into())),
            Err(CommitError::Rejected(codes)) => Err(WriteFailure::Error(UpdateError::Rejected(codes))),
        }
    }
}

/// A group row's key as one string (all rows are in one table): what the combiner needs to
/// keep two actions on one item out of one call.
fn item_name(item: &aws::Item) -> String {
    let part = |name: &str| {
        item.get(name)
            .and_then(|value| value.as_s().ok())
            .map_or("", String::as_str)
    };
    format!("{}\u{0}{}", part("pk"), part("sk"))
}

/// Where an update found its conversation's rows: memory, index or table.
fn count_lookup(source: &'static str) {
    metrics::counter!(metric::GROUP_ROW_LOOKUPS, "source" => source).increment(1);
}

async fn query_group_rows(
    query: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
) -> Result<Vec<GroupRow>, UpdateError> {
    let items = aws::query_all(query).await?;
    Ok(items.into_iter().filter_map(GroupRow::from_item).collect())
}

/// The condition "`row` is still stored with exactly the attributes that were read": the
/// expression, its names and its values.
type Unchanged = (String, HashMap<String, String>, HashMap<String, AttributeValue>);

fn unchanged(row: GroupRow) -> Unchanged {
    let mut condition = String::from("attribute_exists(pk)");
    let (mut names, mut values) = (HashMap::new(), HashMap::new());
    for (index, (name, value)) in row
        .item
        .into_iter()
        .filter(|(name, _)| name != "pk" && name != "sk")
        .enumerate()
    {
        condition.push_str(&format!(" AND #a{index} = :v{index}"));
        names.insert(format!("#a{index}"), name);
        values.insert(format!(":v{index}"), value);
    }
    (condition, names, values)
}

/// Deletes `row` only if it is still stored with exactly the attributes that were read.
fn unchanged_delete(table: &str, row: GroupRow) -> Result<Delete, aws_sdk_dynamodb::error::BuildError> {
    let key = [("pk", row.item.get("pk")), ("sk", row.item.get("sk"))];
    let mut builder = Delete::builder().table_name(table);
    for (name, value) in key {
        builder = builder.key(name, value.cloned().unwrap_or(AttributeValue::S(String::new())));
    }
    let (condition, names, values) = unchanged(row);
    builder
        .condition_expression(condition)
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values(Some(values))
        .build()
}

/// Puts `new` over `old` (same key) only if `old` is still stored exactly as read.
fn unchanged_replace(table: &str, old: GroupRow, new: aws::Item) -> Result<Put, aws_sdk_dynamodb::error::BuildError> {
    let (condition, names, values) = unchanged(old);
    Put::builder()
        .table_name(table)
        .set_item(Some(new))
        .condition_expression(condition)
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values(Some(values))
        .build()
}

impl Handler for GroupSummaryUpdater {
    type Event = MessageInserted;
    type Error = UpdateError;

    /// Also learns the group rows the stream shows written, so that most updates need no read.
    fn route(&self, record: &Record) -> Route<MessageInserted> {
        if let Some(row) = model::group_row_written(record) {
            self.memory.learn(row);
        }
        model::route(record)
    }

    /// The one order of [`model::Position`]: at equal positions the earlier record stays,
    /// as [`plan::decide`] leaves a row at the message's own position.
    fn supersedes(&self, candidate: &MessageInserted, current: &MessageInserted) -> bool {
        candidate.position() > current.position()
    }

    async fn handle(&self, message: &MessageInserted) -> Result<(), UpdateError> {
        let outcome = self.apply(message).await?;
        metrics::counter!(metric::GROUP_UPDATES, "outcome" => outcome).increment(1);
        Ok(())
    }

    /// A dead letter that kept only an inserted row's keys: the row as stored now (strongly
    /// consistent); `None` when it was deleted since.
    async fn restore(&self, mut record: Record) -> Result<Option<Record>, UpdateError> {
        if record.new_image.is_some() || record.event != crate::stream::EventKind::Insert {
            return Ok(Some(record));
        }
        let item = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(record.keys.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("GetItem", &error))?
            .item;
        Ok(item.map(|item| {
            record.new_image = Some(item);
            record
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::timestamp;

    fn offline_updater() -> GroupSummaryUpdater {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .build();
        GroupSummaryUpdater::new(aws_sdk_dynamodb::Client::from_conf(config), "t")
    }

    fn message(sk: &str, uuid: &str) -> MessageInserted {
        MessageInserted {
            group_uuid: "g".into(),
            sk: sk.into(),
            at: timestamp::parse(sk).expect("timestamp"),
            message_uuid: Some(uuid.into()),
            text: format!("text of {uuid}"),
            sender_uuid: Some("a".into()),
        }
    }

    /// Two messages at one instant (11:00Z and 16:30+05:30): the survivor coalescing picks in
    /// one batch is the one that two batches leave, in either stream order.
    #[test]
    fn coalescing_and_updating_agree_on_ties() {
        let updater = offline_updater();
        let rows = vec![
            model::test_row("a", "b", "2023-03-20T10:00:00Z"),
            model::test_row("b", "a", "2023-03-20T10:00:00Z"),
        ];
        let (one, two) = (
            message("2023-03-20T11:00:00Z", "u-1"),
            message("2023-03-20T16:30:00+05:30", "u-2"),
        );
        for (first, second) in [(&one, &two), (&two, &one)] {
            let coalesced = if updater.supersedes(second, first) {
                second
            } else {
                first
            };
            let mut applied = rows.clone();
            for message in [first, second] {
                if let Decision::Write(writes) = plan::decide(&applied, message) {
                    applied = plan::rows_after(&applied, &writes);
                }
            }
            let shown: Vec<_> = applied.iter().map(|row| model::text(&row.item, "message")).collect();
            assert_eq!(shown, vec![Some(coalesced.text.as_str()); 2]);
            assert_eq!(coalesced.text, "text of u-2", "instant, then message uuid");
        }
        let same = message("2023-03-20T11:00:00Z", "u-1");
        assert!(
            !updater.supersedes(&same, &one),
            "a replay of one message keeps the first"
        );
    }

    #[test]
    fn deletes_are_conditional_on_every_attribute() {
        let delete = unchanged_delete("t", model::test_row("a", "b", "2023-03-20T10:00:00")).expect("builds");
        let condition = delete.condition_expression().unwrap_or_default();
        assert!(condition.starts_with("attribute_exists(pk)"));
        assert_eq!(
            condition.matches(" AND ").count(),
            3,
            "message_group_uuid, user_uuid and message"
        );
        assert_eq!(delete.key().len(), 2);
    }
}
