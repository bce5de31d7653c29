//! Deciding what one message changes in its conversation's group rows. Pure: the updater reads
//! rows, this decides, the updater writes the decision in one conditional transaction.
//!
//! Rules, per participant (owner), in the one order of [`Position`] (instant, then message
//! uuid):
//! - the newest row is moved to the message (`sk` = the message's instant in canonical form,
//!   `message` = its text, `message_uuid` = its uuid, every other attribute kept) only if it
//!   stands before the message: replays and late records change nothing, a conversation never
//!   moves backwards. A row at the message's own position whose `sk` is not canonical (the app
//!   wrote it at another offset) is moved too, to the canonical form;
//! - any further rows of the same owner are deleted: one row per participant and group.
//!
//! A move whose key does not change (the row already has the canonical `sk`) is a replacement
//! of the row in place, never a delete and a put of one item.

use std::collections::BTreeMap;

use aws_sdk_dynamodb::types::AttributeValue;

use super::model::{GroupRow, MessageInserted, Position, MESSAGE_UUID};
use crate::aws::Item;

/// A row rewritten in place: same key, new attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct Replace {
    /// Replaced only if still stored unchanged.
    pub old: GroupRow,
    pub new: Item,
}

/// The writes that bring a conversation up to a message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Writes {
    /// Rows to delete, each only if still stored unchanged.
    pub deletes: Vec<GroupRow>,
    /// Rows to put, each only if its key is free.
    pub puts: Vec<Item>,
    /// Rows to rewrite under their own key, each only if still stored unchanged.
    pub replaces: Vec<Replace>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.deletes.is_empty() && self.puts.is_empty() && self.replaces.is_empty()
    }

    /// Rows that end up written (put or replaced).
    pub fn written(&self) -> impl Iterator<Item = &Item> {
        self.puts.iter().chain(self.replaces.iter().map(|replace| &replace.new))
    }

    /// Whether `row` is deleted or replaced by these writes.
    pub fn displaces(&self, row: &GroupRow) -> bool {
        self.deletes
            .iter()
            .chain(self.replaces.iter().map(|replace| &replace.old))
            .any(|gone| gone.owner == row.owner && gone.sk == row.sk)
    }

    /// Moves `row` to `new` (same owner): in place when the key is unchanged.
    pub fn move_row(&mut self, row: &GroupRow, new: Item) {
        if super::model::text(&new, "sk") == Some(row.sk.as_str()) {
            self.replaces.push(Replace { old: row.clone(), new });
        } else {
            self.deletes.push(row.clone());
            self.puts.push(new);
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The conversation has no group rows (yet).
    NoRows,
    /// Every row is already at or past the message.
    Stale,
    Write(Writes),
}

impl Decision {
    /// Metric label of the outcome once written.
    pub fn outcome(&self) -> &'static str {
        match self {
            Decision::NoRows => "no_rows",
            Decision::Stale => "stale",
            Decision::Write(_) => "applied",
        }
    }
}

/// Oldest first: by position, then by `sk` so that the order is total.
fn oldest_first(a: &&GroupRow, b: &&GroupRow) -> std::cmp::Ordering {
    a.position().cmp(&b.position()).then_with(|| a.sk.cmp(&b.sk))
}

/// Whether `row` must move to `message`: it stands before it, or at it in a non-canonical form.
fn behind(row: &GroupRow, message: &MessageInserted) -> bool {
    let (row_at, message_at): (Position<'_>, Position<'_>) = (row.position(), message.position());
    row_at < message_at || (row_at == message_at && !row.canonical)
}

/// `row` moved to `message`: every attribute kept but the message's own.
pub fn moved(row: &GroupRow, message: &MessageInserted) -> Item {
    let mut item = row.item.clone();
    item.insert("sk".to_owned(), AttributeValue::S(message.row_sk()));
    item.insert("message".to_owned(), AttributeValue::S(message.text.clone()));
    match &message.message_uuid {
        Some(uuid) => item.insert(MESSAGE_UUID.to_owned(), AttributeValue::S(uuid.clone())),
        None => item.remove(MESSAGE_UUID),
    };
    item
}

pub fn decide(rows: &[GroupRow], message: &MessageInserted) -> Decision {
    if rows.is_empty() {
        return Decision::NoRows;
    }
    let mut by_owner: BTreeMap<&str, Vec<&GroupRow>> = BTreeMap::new();
    for row in rows {
        by_owner.entry(row.owner.as_str()).or_default().push(row);
    }
    let mut writes = Writes::default();
    for owner_rows in by_owner.values_mut() {
        owner_rows.sort_by(oldest_first);
        let Some((newest, older)) = owner_rows.split_last() else {
            continue;
        };
        writes.deletes.extend(older.iter().map(|row| (*row).clone()));
        if behind(newest, message) {
            writes.move_row(newest, moved(newest, message));
        }
    }
    if writes.is_empty() {
        Decision::Stale
    } else {
        Decision::Write(writes)
    }
}

/// The rows stored once `writes` has been applied to `rows`.
pub fn rows_after(rows: &[GroupRow], writes: &Writes) -> Vec<GroupRow> {
    rows.iter()
        .filter(|row| !writes.displaces(row))
        .cloned()
        .chain(writes.written().cloned().filter_map(GroupRow::from_item))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::model::text;
    use crate::groups::timestamp;
    use std::collections::HashMap;

    /// A group row as this worker writes it: canonical `sk`, the message's uuid.
    fn row(owner: &str, other: &str, sk: &str, message: &str) -> GroupRow {
        let mut row = app_row(
            owner,
            other,
            &timestamp::canonical(sk).unwrap_or(sk.to_owned()),
            message,
        );
        row.item
            .insert(MESSAGE_UUID.into(), AttributeValue::S(format!("uuid-of-{message}")));
        GroupRow::from_item(row.item).expect("group row")
    }

    /// A group row as the app writes it: `sk` verbatim, no message uuid.
    fn app_row(owner: &str, other: &str, sk: &str, message: &str) -> GroupRow {
        let item: Item = HashMap::from([
            ("pk".to_owned(), AttributeValue::S(format!("GRP#{owner}"))),
            ("sk".to_owned(), AttributeValue::S(sk.to_owned())),
            ("message_group_uuid".to_owned(), AttributeValue::S("g".into())),
            ("message".to_owned(), AttributeValue::S(message.to_owned())),
            ("user_uuid".to_owned(), AttributeValue::S(other.to_owned())),
            ("custom".to_owned(), AttributeValue::N("7".into())),
        ]);
        GroupRow::from_item(item).expect("group row")
    }

    fn message(sk: &str, text: &str) -> MessageInserted {
        MessageInserted {
            group_uuid: "g".into(),
            sk: sk.into(),
            at: timestamp::parse(sk).expect("timestamp"),
            message_uuid: Some(format!("uuid-of-{text}")),
            text: text.into(),
            sender_uuid: Some("a".into()),
        }
    }

    fn sks<'a>(items: impl IntoIterator<Item = &'a Item>) -> Vec<String> {
        items
            .into_iter()
            .filter_map(|i| text(i, "sk").map(str::to_owned))
            .collect()
    }

    /// The rows after applying `messages` one decision at a time.
    fn apply_each(mut rows: Vec<GroupRow>, messages: &[MessageInserted]) -> Vec<GroupRow> {
        for message in messages {
            if let Decision::Write(writes) = decide(&rows, message) {
                rows = rows_after(&rows, &writes);
            }
        }
        rows.sort_by(|a, b| a.owner.cmp(&b.owner));
        rows
    }

    #[test]
    fn both_rows_move_to_a_newer_message_in_canonical_form_keeping_other_attributes() {
        let rows = [
            row("a", "b", "2023-03-20T10:00:00+00:00", "old"),
            row("b", "a", "2023-03-20T10:00:00+00:00", "old"),
        ];
        let Decision::Write(writes) = decide(&rows, &message("2023-03-20T16:30:00.25+05:30", "new")) else {
            panic!("should write")
        };
        assert_eq!(writes.deletes.len(), 2);
        assert_eq!(sks(&writes.puts), vec!["2023-03-20T11:00:00.250000+00:00"; 2]);
        for put in &writes.puts {
            assert_eq!(put.get("message"), Some(&AttributeValue::S("new".into())));
            assert_eq!(put.get(MESSAGE_UUID), Some(&AttributeValue::S("uuid-of-new".into())));
            assert_eq!(put.get("custom"), Some(&AttributeValue::N("7".into())));
        }
    }

    #[test]
    fn rows_after_a_write_are_the_survivors_and_the_puts() {
        let rows = [
            row("a", "b", "2023-03-20T10:00:00+00:00", "old"),
            row("a", "b", "2023-03-19T10:00:00+00:00", "older duplicate"),
            row("b", "a", "2023-03-20T12:00:00+00:00", "already newer"),
        ];
        let Decision::Write(writes) = decide(&rows, &message("2023-03-20T11:00:00+00:00", "new")) else {
            panic!("should write")
        };
        let mut after: Vec<(String, String)> = rows_after(&rows, &writes)
            .into_iter()
            .map(|row| (row.owner, row.sk))
            .collect();
        after.sort();
        assert_eq!(
            after,
            vec![
                ("a".to_owned(), "2023-03-20T11:00:00.000000+00:00".to_owned()),
                ("b".to_owned(), "2023-03-20T12:00:00.000000+00:00".to_owned())
            ]
        );
    }

    #[test]
    fn an_older_message_or_the_same_one_again_changes_nothing() {
        let rows = [
            row("a", "b", "2023-03-20T11:00:00+00:00", "x"),
            row("b", "a", "2023-03-20T11:00:00+00:00", "x"),
        ];
        assert_eq!(
            decide(&rows, &message("2023-03-20T10:59:59+00:00", "late")),
            Decision::Stale
        );
        assert_eq!(
            decide(&rows, &message("2023-03-20T16:30:00+05:30", "x")),
            Decision::Stale,
            "the message the rows show, in another form"
        );
    }

    #[test]
    fn offsets_are_compared_as_instants() {
        // 16:00 at +05:30 is 10:30 UTC: older than the rows' 11:00 UTC despite sorting later.
        let rows = [row("a", "b", "2023-03-20T11:00:00", "x")];
        assert_eq!(
            decide(&rows, &message("2023-03-20T16:00:00+05:30", "late")),
            Decision::Stale
        );
        assert!(matches!(
            decide(&rows, &message("2023-03-20T17:00:00+05:30", "new")),
            Decision::Write(_)
        ));
    }

    #[test]
    fn ties_at_one_instant_go_to_the_greater_message_uuid_in_any_order() {
        let rows = vec![
            row("a", "b", "2023-03-20T10:00:00Z", "old"),
            row("b", "a", "2023-03-20T10:00:00Z", "old"),
        ];
        // One instant, two forms, two uuids: "uuid-of-m2" > "uuid-of-m1".
        let m1 = message("2023-03-20T11:00:00Z", "m1");
        let m2 = message("2023-03-20T16:30:00+05:30", "m2");
        for order in [[&m1, &m2], [&m2, &m1]] {
            let rows = apply_each(rows.clone(), &[order[0].clone(), order[1].clone()]);
            assert!(
                rows.iter().all(|row| text(&row.item, "message") == Some("m2")),
                "{rows:?}"
            );
            assert_eq!(rows.len(), 2);
        }
        assert!(m2.position() > m1.position());
    }

    #[test]
    fn an_app_written_row_is_made_canonical_by_its_own_message() {
        // The app opened the conversation at +05:30: same instant as the message, other form.
        let rows = [
            app_row("a", "b", "2023-03-20T16:30:00.5+05:30", "hi"),
            app_row("b", "a", "2023-03-20T16:30:00.5+05:30", "hi"),
        ];
        let Decision::Write(writes) = decide(&rows, &message("2023-03-20T16:30:00.5+05:30", "hi")) else {
            panic!("should write")
        };
        assert_eq!(writes.deletes.len(), 2);
        assert_eq!(sks(&writes.puts), vec!["2023-03-20T11:00:00.500000+00:00"; 2]);
        let after = rows_after(&rows, &writes);
        assert_eq!(
            decide(&after, &message("2023-03-20T16:30:00.5+05:30", "hi")),
            Decision::Stale,
            "a replay changes nothing more"
        );
    }

    #[test]
    fn a_move_that_keeps_the_key_is_a_replacement_in_place() {
        // Rows at the instant of "a", and a message at the same instant with a greater uuid.
        let rows = [
            row("a", "b", "2023-03-20T11:00:00Z", "a"),
            row("b", "a", "2023-03-20T11:00:00Z", "a"),
        ];
        let Decision::Write(writes) = decide(&rows, &message("2023-03-20T16:30:00+05:30", "b")) else {
            panic!("should write")
        };
        assert!(writes.deletes.is_empty() && writes.puts.is_empty());
        assert_eq!(writes.replaces.len(), 2);
        assert_eq!(rows_after(&rows, &writes).len(), 2);
    }

    #[test]
    fn an_app_written_canonical_row_needs_no_write_for_its_own_instant() {
        // The app on a UTC clock wrote the rows with the conversation's first message.
        let rows = [
            app_row("a", "b", "2023-03-20T11:00:00.000000+00:00", "hi"),
            app_row("b", "a", "2023-03-20T11:00:00.000000+00:00", "hi"),
        ];
        assert_eq!(
            decide(&rows, &message("2023-03-20T11:00:00.000000+00:00", "hi")),
            Decision::Stale
        );
        // Any message at that instant, whatever its uuid: one answer, in any order.
        assert_eq!(decide(&rows, &message("2023-03-20T11:00:00Z", "zzz")), Decision::Stale);
        assert!(matches!(
            decide(&rows, &message("2023-03-20T11:00:00.000001Z", "later")),
            Decision::Write(_)
        ));
    }

    #[test]
    fn only_the_rows_behind_move() {
        let rows = [
            row("a", "b", "2023-03-20T12:00:00", "ahead"),
            row("b", "a", "2023-03-20T10:00:00", "behind"),
        ];
        let Decision::Write(writes) = decide(&rows, &message("2023-03-20T11:00:00", "m")) else {
            panic!("should write")
        };
        assert_eq!(
            writes.deletes.iter().map(|r| r.owner.as_str()).collect::<Vec<_>>(),
            vec!["b"]
        );
        assert_eq!(writes.puts.len(), 1);
    }

    #[test]
    fn duplicate_rows_of_one_participant_collapse_to_one() {
        let rows = [
            row("a", "b", "2023-03-20T09:00:00", "older"),
            row("a", "b", "2023-03-20T10:00:00", "newer"),
            row("b", "a", "2023-03-20T12:00:00", "ahead"),
        ];
        // Message older than everything: only the duplicate goes.
        let Decision::Write(writes) = decide(&rows, &message("2023-03-20T08:00:00", "m")) else {
            panic!("should write")
        };
        assert_eq!(
            writes.deletes.iter().map(|r| r.sk.as_str()).collect::<Vec<_>>(),
            vec!["2023-03-20T09:00:00.000000+00:00"]
        );
        assert!(writes.puts.is_empty());
        // Message newer than a's rows: both of a's rows go, one new row comes.
        let Decision::Write(writes) = decide(&rows, &message("2023-03-20T11:00:00", "m")) else {
            panic!("should write")
        };
        assert_eq!(writes.deletes.len(), 2);
        assert_eq!(sks(&writes.puts), vec!["2023-03-20T11:00:00.000000+00:00"]);
    }

    #[test]
    fn a_row_with_an_unparsable_sk_is_repaired_by_the_next_message() {
        let rows = [row("a", "b", "garbage", "x")];
        assert!(matches!(
            decide(&rows, &message("2023-03-20T11:00:00", "m")),
            Decision::Write(_)
        ));
    }

    #[test]
    fn no_rows_is_its_own_outcome() {
        assert_eq!(decide(&[], &message("2023-03-20T11:00:00", "m")), Decision::NoRows);
    }
}
