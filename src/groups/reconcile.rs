//! `reconcile`: rebuilds every conversation's group rows from its message rows, for when the
//! stream cannot (data trimmed before it was read, a worker down past the retention, rows
//! damaged by hand).
//!
//! One consistent scan surveys the table: per conversation, its newest message (by instant),
//! its group rows, and everyone the rows and messages name. [`repair`] then decides, purely, what
//! brings the conversation to one row per participant at its newest message: stale rows move
//! (through [`plan::decide`], the updater's own rule), duplicate rows go, a missing row is
//! created naming the other participant, and every row whose `sk` is not in the canonical form
//! ([`timestamp::canonical`]) is rewritten to it (rows the app wrote at its writer's offset,
//! rows from before this worker wrote canonical keys). The writes are the updater's conditional transaction,
//! so running beside the worker is safe: if either changed the rows first, the other's
//! conditions fail and it re-reads (here: that conversation, strongly consistently).
//!
//! Must not: move a row backwards (a row newer than every message stays), or guess a
//! participant it cannot name (such conversations are reported, not written).

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};

use super::model::{text, GroupRow, MessageInserted, Position, GROUP_PREFIX, MESSAGE_PREFIX, MESSAGE_UUID};
use super::plan::{self, Decision, Writes};
use super::timestamp;
use super::updater::{GroupSummaryUpdater, UpdateError};
use crate::aws::{self, Item};
use crate::retry::{retry, RetryPolicy};

/// Lost races on one conversation before reconcile reports it and moves on.
const MAX_RACES: u32 = 4;

/// What the rows say about a person: their uuid is the key, these are optional.
#[derive(Debug, Clone, Default, PartialEq)]
struct Identity {
    display_name: Option<String>,
    handle: Option<String>,
}

impl Identity {
    fn from_item(item: &Item) -> Self {
        Self {
            display_name: text(item, "user_display_name").map(str::to_owned),
            handle: text(item, "user_handle").map(str::to_owned),
        }
    }

    fn merge(&mut self, other: Identity) {
        if self.display_name.is_none() {
            self.display_name = other.display_name;
        }
        if self.handle.is_none() {
            self.handle = other.handle;
        }
    }
}

/// The newest message of a conversation.
#[derive(Debug, Clone, PartialEq)]
struct Newest {
    sk: String,
    at: DateTime<Utc>,
    message_uuid: Option<String>,
    text: String,
    sender: Option<String>,
}

impl Newest {
    fn position(&self) -> Position<'_> {
        Position::of_message(self.at, self.message_uuid.as_deref())
    }
}

/// One conversation as the table shows it.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    pub group_uuid: String,
    newest: Option<Newest>,
    rows: Vec<GroupRow>,
    people: BTreeMap<String, Identity>,
}

impl Conversation {
    fn person(&mut self, uuid: &str, identity: Identity) {
        self.people.entry(uuid.to_owned()).or_default().merge(identity);
    }
}

/// Every conversation found so far, built item by item.
#[derive(Debug, Default)]
pub struct Survey {
    pub conversations: BTreeMap<String, Conversation>,
    /// Items looked at.
    pub items: u64,
    /// Message and group rows that could not be read (no group, an unparsable `sk`, ...).
    pub unreadable: u64,
}

impl Survey {
    pub fn add(&mut self, item: &Item) {
        self.items += 1;
        let Some(pk) = text(item, "pk") else {
            return;
        };
        if pk.starts_with(MESSAGE_PREFIX) {
            if !self.add_message(item, pk) {
                self.unreadable += 1;
            }
        } else if pk.starts_with(GROUP_PREFIX) && !self.add_group_row(item) {
            self.unreadable += 1;
        }
    }

    fn conversation(&mut self, group_uuid: &str) -> &mut Conversation {
        self.conversations
            .entry(group_uuid.to_owned())
            .or_insert_with(|| Conversation {
                group_uuid: group_uuid.to_owned(),
                ..Conversation::default()
            })
    }

    fn add_message(&mut self, item: &Item, pk: &str) -> bool {
        let group_uuid = pk.trim_start_matches(MESSAGE_PREFIX);
        let (Some(sk), Some(message)) = (text(item, "sk"), text(item, "message")) else {
            return false;
        };
        let Some(at) = timestamp::parse(sk) else {
            return false;
        };
        if group_uuid.trim().is_empty() {
            return false;
        }
        let sender = text(item, "user_uuid").map(str::to_owned);
        let conversation = self.conversation(group_uuid);
        if let Some(sender) = &sender {
            conversation.person(sender, Identity::from_item(item));
        }
        let candidate = Newest {
            sk: sk.to_owned(),
            at,
            message_uuid: text(item, MESSAGE_UUID).map(str::to_owned),
            text: message.to_owned(),
            sender,
        };
        // The updater's order; at equal positions the raw `sk` decides, so a scan's page order
        // cannot change the survivor.
        let newer = conversation.newest.as_ref().is_none_or(|newest| {
            (candidate.position(), candidate.sk.as_str()) > (newest.position(), newest.sk.as_str())
        });
        if newer {
            conversation.newest = Some(candidate);
        }
        true
    }

    fn add_group_row(&mut self, item: &Item) -> bool {
        let Some(group_uuid) = text(item, "message_group_uuid").map(str::to_owned) else {
            return false;
        };
        let Some(row) = GroupRow::from_item(item.clone()) else {
            return false;
        };
        let conversation = self.conversation(&group_uuid);
        conversation.person(&row.owner.clone(), Identity::default());
        if let Some(other) = row.other_user() {
            conversation.person(other, Identity::from_item(item));
        }
        conversation.rows.push(row);
        true
    }
}

/// What one conversation needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Repair {
    pub writes: Writes,
    /// Rows moved up to the newest message.
    pub moved: usize,
    /// Rows created for participants who had none.
    pub created: usize,
    /// Extra rows of a participant, deleted.
    pub duplicates: usize,
    /// Rows rewritten only to put their `sk` in the canonical form.
    pub normalized: usize,
    /// Why part of the conversation could not be repaired, if so.
    pub problem: Option<String>,
}

impl Repair {
    fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// Decides what brings `conversation` to one row per participant at its newest message.
pub fn repair(conversation: &Conversation) -> Repair {
    let mut repair = Repair::default();
    let Some(newest) = &conversation.newest else {
        if !conversation.rows.is_empty() {
            repair.problem = Some("group rows but no message rows: left as they are".into());
        }
        return repair;
    };
    let message = MessageInserted {
        group_uuid: conversation.group_uuid.clone(),
        sk: newest.sk.clone(),
        at: newest.at,
        message_uuid: newest.message_uuid.clone(),
        text: newest.text.clone(),
        sender_uuid: newest.sender.clone(),
    };
    if let Decision::Write(writes) = plan::decide(&conversation.rows, &message) {
        // A row already at the newest message's instant only changes form (and learns the
        // message's uuid): normalized, not moved.
        let newest_of = |pk: Option<&str>| {
            conversation
                .rows
                .iter()
                .filter(|row| text(&row.item, "pk") == pk)
                .map(GroupRow::position)
                .max()
                .and_then(|position| position.at)
        };
        for item in writes.written() {
            if newest_of(text(item, "pk")) == Some(newest.at) {
                repair.normalized += 1;
            } else {
                repair.moved += 1;
            }
        }
        repair.duplicates = writes.deletes.len() - writes.puts.len();
        repair.writes = writes;
    }
    normalize_survivors(conversation, &mut repair);
    let owners: BTreeSet<&str> = conversation.rows.iter().map(|row| row.owner.as_str()).collect();
    let participants: Vec<&String> = conversation.people.keys().collect();
    let missing: Vec<&String> = participants
        .iter()
        .copied()
        .filter(|person| !owners.contains(person.as_str()))
        .collect();
    if missing.is_empty() {
        return repair;
    }
    if participants.len() != 2 {
        repair.problem = Some(format!(
            "{} participant(s) known, so the other one of {} cannot be told: not created",
            participants.len(),
            missing.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
        ));
        return repair;
    }
    for owner in missing {
        let Some(other) = participants.iter().find(|person| **person != owner) else {
            continue;
        };
        let identity = &conversation.people[*other];
        let mut item = Item::from([
            ("pk".to_owned(), AttributeValue::S(format!("{GROUP_PREFIX}{owner}"))),
            ("sk".to_owned(), AttributeValue::S(message.row_sk())),
            (
                "message_group_uuid".to_owned(),
                AttributeValue::S(conversation.group_uuid.clone()),
            ),
            ("message".to_owned(), AttributeValue::S(newest.text.clone())),
            ("user_uuid".to_owned(), AttributeValue::S((*other).clone())),
        ]);
        if let Some(uuid) = &newest.message_uuid {
            item.insert(MESSAGE_UUID.into(), AttributeValue::S(uuid.clone()));
        }
        if let Some(name) = &identity.display_name {
            item.insert("user_display_name".into(), AttributeValue::S(name.clone()));
        }
        if let Some(handle) = &identity.handle {
            item.insert("user_handle".into(), AttributeValue::S(handle.clone()));
        }
        repair.writes.puts.push(item);
        repair.created += 1;
    }
    repair
}

/// Rows that stay where they are (ahead of every message, or already at the newest) but whose
/// `sk` is not in the canonical form move to it, every attribute kept.
fn normalize_survivors(conversation: &Conversation, repair: &mut Repair) {
    let mut normalized = Vec::new();
    for row in conversation
        .rows
        .iter()
        .filter(|row| !row.canonical && !repair.writes.displaces(row))
    {
        let Some(canonical) = row.at.map(timestamp::format) else {
            continue;
        };
        let mut item = row.item.clone();
        item.insert("sk".to_owned(), AttributeValue::S(canonical));
        normalized.push((row.clone(), item));
    }
    for (row, item) in normalized {
        repair.writes.move_row(&row, item);
        repair.normalized += 1;
    }
}

/// What a reconcile run found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub items: u64,
    pub conversations: usize,
    pub repaired: usize,
    pub moved: usize,
    pub created: usize,
    pub duplicates: usize,
    pub normalized: usize,
    pub problems: usize,
}

/// Progress and per-conversation results, for the command line.
pub trait Observer {
    /// After each scanned page.
    fn scanned(&mut self, items: u64);
    /// After each conversation that needed (or would need) changes, or has a problem.
    fn repaired(&mut self, group_uuid: &str, repair: &Repair);
    /// After each conversation checked, `done` of `total`.
    fn checked(&mut self, done: usize, total: usize);
}

/// Surveys the table and repairs every conversation (only reports, with `dry_run`).
pub async fn reconcile(
    updater: &GroupSummaryUpdater,
    policy: &RetryPolicy,
    dry_run: bool,
    observer: &mut impl Observer,
) -> Result<Totals, UpdateError> {
    let mut survey = Survey::default();
    let scan = updater
        .client()
        .scan()
        .table_name(updater.table())
        .consistent_read(true);
    aws::scan_pages(scan, policy, |page| {
        for item in &page {
            survey.add(item);
        }
        observer.scanned(survey.items);
    })
    .await?;
    let mut totals = Totals {
        items: survey.items,
        conversations: survey.conversations.len(),
        ..Totals::default()
    };
    let total = survey.conversations.len();
    for (done, mut conversation) in survey.conversations.into_values().enumerate() {
        let mut outcome = repair(&conversation);
        if !dry_run {
            let mut races = 0;
            while !outcome.is_empty() {
                let writes = outcome.writes.clone();
                match retry(policy, "reconcile_write", || updater.write_or_lose(writes.clone())).await? {
                    true => break,
                    false if races + 1 >= MAX_RACES => {
                        outcome.problem = Some(format!("rows kept changing ({MAX_RACES} lost races): run again"));
                        outcome.writes = Writes::default();
                        break;
                    }
                    false => {
                        // Someone (the worker) changed the rows: read this conversation afresh.
                        races += 1;
                        conversation = reread(updater, policy, &conversation).await?;
                        outcome = repair(&conversation);
                    }
                }
            }
        }
        if !outcome.is_empty() || outcome.problem.is_some() {
            if !outcome.is_empty() {
                totals.repaired += 1;
                totals.moved += outcome.moved;
                totals.created += outcome.created;
                totals.duplicates += outcome.duplicates;
                totals.normalized += outcome.normalized;
            }
            if outcome.problem.is_some() {
                totals.problems += 1;
            }
            observer.repaired(&conversation.group_uuid, &outcome);
        }
        observer.checked(done + 1, total);
    }
    Ok(totals)
}

/// One conversation read again, strongly consistently: its message partition and the rows
/// of everyone it names.
async fn reread(
    updater: &GroupSummaryUpdater,
    policy: &RetryPolicy,
    conversation: &Conversation,
) -> Result<Conversation, UpdateError> {
    let group = &conversation.group_uuid;
    let mut survey = Survey::default();
    let messages = updater
        .client()
        .query()
        .table_name(updater.table())
        .consistent_read(true)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S(format!("{MESSAGE_PREFIX}{group}")));
    for item in retry(policy, "reconcile_read", || aws::query_all(messages.clone())).await? {
        survey.add(&item);
    }
    for person in conversation.people.keys() {
        let rows = retry(policy, "reconcile_read", || updater.rows_of_owner(person, group)).await?;
        for row in rows {
            survey.add(&row.item);
        }
    }
    let mut fresh = survey.conversations.remove(group).unwrap_or_else(|| Conversation {
        group_uuid: group.clone(),
        ..Conversation::default()
    });
    // People named only by rows that are gone are still participants.
    for (person, identity) in &conversation.people {
        fresh.person(person, identity.clone());
    }
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(value: &str) -> AttributeValue {
        AttributeValue::S(value.to_owned())
    }

    fn message(group: &str, sk: &str, text: &str, sender: &str) -> Item {
        Item::from([
            ("pk".into(), s(&format!("MSG#{group}"))),
            ("sk".into(), s(sk)),
            ("message".into(), s(text)),
            (MESSAGE_UUID.into(), s(&format!("uuid-of-{text}"))),
            ("user_uuid".into(), s(sender)),
            ("user_handle".into(), s(&format!("h-{sender}"))),
            ("user_display_name".into(), s(&format!("D {sender}"))),
        ])
    }

    /// A row as the worker writes it: canonical `sk`, the message's uuid.
    fn row(group: &str, owner: &str, other: &str, sk: &str, text: &str) -> Item {
        let mut item = app_row(
            group,
            owner,
            other,
            &timestamp::canonical(sk).unwrap_or(sk.to_owned()),
            text,
        );
        item.insert(MESSAGE_UUID.into(), s(&format!("uuid-of-{text}")));
        item
    }

    /// A row as the app writes it: `sk` verbatim, no message uuid.
    fn app_row(group: &str, owner: &str, other: &str, sk: &str, text: &str) -> Item {
        Item::from([
            ("pk".into(), s(&format!("GRP#{owner}"))),
            ("sk".into(), s(sk)),
            ("message_group_uuid".into(), s(group)),
            ("message".into(), s(text)),
            ("user_uuid".into(), s(other)),
            ("user_handle".into(), s(&format!("h-{other}"))),
            ("user_display_name".into(), s(&format!("D {other}"))),
        ])
    }

    fn survey(items: &[Item]) -> Survey {
        let mut survey = Survey::default();
        for item in items {
            survey.add(item);
        }
        survey
    }

    fn repair_of(items: &[Item]) -> Repair {
        repair(&survey(items).conversations["g"])
    }

    #[test]
    fn a_correct_conversation_needs_nothing() {
        let fixed = repair_of(&[
            message("g", "2023-01-01T00:00:00", "one", "a"),
            message("g", "2023-01-02T00:00:00", "two", "b"),
            row("g", "a", "b", "2023-01-02T00:00:00", "two"),
            row("g", "b", "a", "2023-01-02T00:00:00", "two"),
        ]);
        assert_eq!(fixed, Repair::default());
    }

    #[test]
    fn the_newest_message_is_chosen_by_instant() {
        let survey = survey(&[
            message("g", "2023-01-01T12:00:00+05:00", "earlier instant", "a"),
            message("g", "2023-01-01T08:00:00+00:00", "later instant", "a"),
        ]);
        assert_eq!(
            survey.conversations["g"].newest.as_ref().map(|n| n.text.as_str()),
            Some("later instant")
        );
    }

    #[test]
    fn stale_missing_and_duplicate_rows_are_repaired() {
        let fixed = repair_of(&[
            message("g", "2023-01-02T00:00:00", "two", "a"),
            row("g", "a", "b", "2023-01-01T00:00:00", "one"),
            row("g", "a", "b", "2022-12-31T00:00:00", "zero"),
        ]);
        assert_eq!((fixed.moved, fixed.created, fixed.duplicates), (1, 1, 1));
        let created = fixed
            .writes
            .puts
            .iter()
            .find(|item| text(item, "pk") == Some("GRP#b"))
            .expect("b's row is created");
        assert_eq!(text(created, "sk"), Some("2023-01-02T00:00:00.000000+00:00"));
        assert_eq!(text(created, "message"), Some("two"));
        assert_eq!(text(created, MESSAGE_UUID), Some("uuid-of-two"));
        assert_eq!(text(created, "user_uuid"), Some("a"));
        assert_eq!(
            text(created, "user_handle"),
            Some("h-a"),
            "a's identity from a's message"
        );
        assert_eq!(fixed.writes.deletes.len(), 2, "the stale row and the duplicate");
        assert!(fixed.problem.is_none());
    }

    #[test]
    fn rows_ahead_of_every_message_stay() {
        let fixed = repair_of(&[
            message("g", "2023-01-01T00:00:00", "one", "a"),
            row("g", "a", "b", "2023-01-05T00:00:00", "deleted message"),
            row("g", "b", "a", "2023-01-05T00:00:00", "deleted message"),
        ]);
        assert_eq!(fixed, Repair::default());
    }

    #[test]
    fn rows_in_other_forms_are_normalized_wherever_they_stand() {
        let fixed = repair_of(&[
            message("g", "2023-01-01T00:00:00", "one", "a"),
            // Ahead of every message, at the writer's offset: stays ahead, in canonical form.
            app_row("g", "a", "b", "2023-01-05T05:30:00+05:30", "deleted message"),
            // Canonical already: untouched.
            row("g", "b", "a", "2023-01-05T00:00:00", "deleted message"),
        ]);
        assert_eq!((fixed.moved, fixed.normalized), (0, 1));
        assert_eq!(fixed.writes.deletes.len(), 1);
        assert_eq!(
            fixed
                .writes
                .puts
                .iter()
                .map(|item| text(item, "sk"))
                .collect::<Vec<_>>(),
            vec![Some("2023-01-05T00:00:00.000000+00:00")]
        );
        assert_eq!(fixed.writes.puts[0].get("message"), Some(&s("deleted message")));
    }

    #[test]
    fn the_newest_of_messages_at_one_instant_is_the_greater_uuid_in_any_order() {
        let one = message("g", "2023-01-01T12:00:00Z", "m1", "a");
        let two = message("g", "2023-01-01T17:30:00+05:30", "m2", "b");
        for items in [[one.clone(), two.clone()], [two.clone(), one.clone()]] {
            let survey = survey(&items);
            assert_eq!(
                survey.conversations["g"].newest.as_ref().map(|n| n.text.as_str()),
                Some("m2")
            );
        }
    }

    #[test]
    fn an_unknown_other_participant_is_reported_not_guessed() {
        let fixed = repair_of(&[message("g", "2023-01-01T00:00:00", "hello?", "a")]);
        assert!(fixed.writes.puts.is_empty());
        assert!(fixed.problem.is_some());
        let orphan = repair_of(&[row("g", "a", "b", "2023-01-01T00:00:00", "x")]);
        assert!(orphan.problem.is_some() && orphan.writes.puts.is_empty());
    }

    #[test]
    fn unreadable_rows_are_counted() {
        let mut bad = message("g", "yesterday", "x", "a");
        let survey = survey(&[bad.clone(), {
            bad.remove("message");
            bad
        }]);
        assert_eq!(survey.unreadable, 2);
    }
}
