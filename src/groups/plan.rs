//! Deciding what one message changes in its conversation's group rows. Pure: the updater reads
//! rows, this decides, the updater writes the decision in one conditional transaction.
//!
//! Rules, per participant (owner):
//! - the newest row is moved to the message (`sk` = message `sk`, `message` = its text, every
//!   other attribute kept) only if it is strictly older than the message: replays and late
//!   records change nothing, a conversation never moves backwards;
//! - any further rows of the same owner are deleted: one row per participant and group.

use std::collections::BTreeMap;

use aws_sdk_dynamodb::types::AttributeValue;

use super::model::{GroupRow, MessageInserted};
use crate::aws::Item;

/// The writes that bring a conversation up to a message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Writes {
    /// Rows to delete, each only if still stored unchanged.
    pub deletes: Vec<GroupRow>,
    /// Rows to put, each only if its key is free.
    pub puts: Vec<Item>,
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
        // Oldest first; an unparsable sk sorts first (None < Some); ties by sk for determinism.
        owner_rows.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.sk.cmp(&b.sk)));
        let Some((newest, older)) = owner_rows.split_last() else {
            continue;
        };
        writes.deletes.extend(older.iter().map(|row| (*row).clone()));
        if newest.at.is_none_or(|at| at < message.at) {
            let mut moved = newest.item.clone();
            moved.insert("sk".to_owned(), AttributeValue::S(message.sk.clone()));
            moved.insert("message".to_owned(), AttributeValue::S(message.text.clone()));
            writes.deletes.push((*newest).clone());
            writes.puts.push(moved);
        }
    }
    if writes.deletes.is_empty() && writes.puts.is_empty() {
        Decision::Stale
    } else {
        Decision::Write(writes)
    }
}

/// The rows stored once `writes` has been applied to `rows`.
pub fn rows_after(rows: &[GroupRow], writes: &Writes) -> Vec<GroupRow> {
    let deleted = |row: &GroupRow| {
        writes
            .deletes
            .iter()
            .any(|gone| gone.owner == row.owner && gone.sk == row.sk)
    };
    rows.iter()
        .filter(|row| !deleted(row))
        .cloned()
        .chain(writes.puts.iter().cloned().filter_map(GroupRow::from_item))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::timestamp;
    use std::collections::HashMap;

    fn row(owner: &str, other: &str, sk: &str, message: &str) -> GroupRow {
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
            text: text.into(),
            sender_uuid: Some("a".into()),
        }
    }

    fn sks(items: &[Item]) -> Vec<String> {
        items
            .iter()
            .filter_map(|i| crate::groups::model::text(i, "sk").map(str::to_owned))
            .collect()
    }

    #[test]
    fn both_rows_move_to_a_newer_message_keeping_other_attributes() {
        let rows = [
            row("a", "b", "2023-03-20T10:00:00+00:00", "old"),
            row("b", "a", "2023-03-20T10:00:00+00:00", "old"),
        ];
        let Decision::Write(writes) = decide(&rows, &message("2023-03-20T11:00:00+00:00", "new")) else {
            panic!("should write")
        };
        assert_eq!(writes.deletes.len(), 2);
        assert_eq!(sks(&writes.puts), vec!["2023-03-20T11:00:00+00:00"; 2]);
        for put in &writes.puts {
            assert_eq!(put.get("message"), Some(&AttributeValue::S("new".into())));
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
                ("a".to_owned(), "2023-03-20T11:00:00+00:00".to_owned()),
                ("b".to_owned(), "2023-03-20T12:00:00+00:00".to_owned())
            ]
        );
    }

    #[test]
    fn an_older_or_equal_message_changes_nothing() {
        let rows = [
            row("a", "b", "2023-03-20T11:00:00+00:00", "x"),
            row("b", "a", "2023-03-20T11:00:00+00:00", "x"),
        ];
        assert_eq!(
            decide(&rows, &message("2023-03-20T10:59:59+00:00", "late")),
            Decision::Stale
        );
        assert_eq!(
            decide(&rows, &message("2023-03-20T11:00:00", "same instant, other form")),
            Decision::Stale
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
            vec!["2023-03-20T09:00:00"]
        );
        assert!(writes.puts.is_empty());
        // Message newer than a's rows: both of a's rows go, one new row comes.
        let Decision::Write(writes) = decide(&rows, &message("2023-03-20T11:00:00", "m")) else {
            panic!("should write")
        };
        assert_eq!(writes.deletes.len(), 2);
        assert_eq!(sks(&writes.puts), vec!["2023-03-20T11:00:00"]);
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
