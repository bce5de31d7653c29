//! What the updater remembers of each conversation's group rows, so that an update can skip
//! reading them.
//!
//! Two sources keep it: the rows the updater itself wrote or read (the transaction's outcome),
//! and the group rows the stream shows written (the app creating a conversation, this worker's
//! own earlier writes, another worker's). Either is only a guess: every write the updater makes
//! is conditional on the rows being stored exactly as remembered, and a lost race forgets the
//! conversation and reads it again. What a guess must never be is incomplete, since a
//! conversation's rows that the guess leaves out would not be moved; so rows are recalled only
//! when they show a row for every participant they name and for the sender.
//!
//! Stream records can be older than what is remembered (the stream lags the updater's own
//! writes, and a restarted reader replays from its checkpoint): a row seen in the stream never
//! replaces a newer row of the same owner.
//!
//! Bounded: at most [`CONVERSATIONS`] conversations, rows with at most [`TEXT_BYTES`] of text
//! (a few MB at most); beyond, an arbitrary conversation is forgotten.

use std::collections::HashMap;
use std::sync::Mutex;

use super::model::{self, GroupRow};
use crate::lock::lock;

/// Conversations remembered, at most.
pub const CONVERSATIONS: usize = 2048;

/// Rows carrying more text than this are not remembered.
pub const TEXT_BYTES: usize = 2048;

#[derive(Debug, Default)]
pub struct RowMemory {
    conversations: Mutex<HashMap<String, Vec<GroupRow>>>,
}

fn small(row: &GroupRow) -> bool {
    model::text(&row.item, "message").is_none_or(|text| text.len() <= TEXT_BYTES)
}

/// Oldest first, the way [`super::plan::decide`] orders an owner's rows.
fn newer(a: &GroupRow, b: &GroupRow) -> bool {
    (a.at, &a.sk) > (b.at, &b.sk)
}

impl RowMemory {
    /// The conversation's rows, when they are remembered and stand for the whole conversation.
    pub fn recall(&self, group: &str, sender: Option<&str>) -> Option<Vec<GroupRow>> {
        let conversations = lock(&self.conversations);
        let rows = conversations.get(group)?;
        model::shows_every_participant(rows, sender).then(|| rows.clone())
    }

    /// The conversation's rows as stored now (after a committed write, or as read).
    pub fn remember(&self, group: &str, rows: Vec<GroupRow>) {
        let mut conversations = lock(&self.conversations);
        if rows.is_empty() || !rows.iter().all(small) {
            conversations.remove(group);
            return;
        }
        make_room(&mut conversations, group);
        conversations.insert(group.to_owned(), rows);
    }

    pub fn forget(&self, group: &str) {
        lock(&self.conversations).remove(group);
    }

    /// A group row the stream shows written: it replaces its owner's remembered rows unless one
    /// of them is newer.
    pub fn learn(&self, row: GroupRow) {
        let Some(group) = row.group_uuid().map(str::to_owned) else {
            return;
        };
        let mut conversations = lock(&self.conversations);
        if !small(&row) {
            conversations.remove(&group);
            return;
        }
        if let Some(rows) = conversations.get_mut(&group) {
            if rows.iter().any(|known| known.owner == row.owner && newer(known, &row)) {
                return;
            }
            rows.retain(|known| known.owner != row.owner);
            rows.push(row);
            return;
        }
        make_room(&mut conversations, &group);
        conversations.insert(group, vec![row]);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.conversations).len()
    }
}

fn make_room(conversations: &mut HashMap<String, Vec<GroupRow>>, group: &str) {
    if conversations.len() >= CONVERSATIONS && !conversations.contains_key(group) {
        if let Some(evicted) = conversations.keys().next().cloned() {
            conversations.remove(&evicted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::model::test_row;
    use aws_sdk_dynamodb::types::AttributeValue;

    const T0: &str = "2024-01-01T00:00:00";
    const T1: &str = "2024-01-01T00:00:01";
    const T2: &str = "2024-01-01T00:00:02";

    fn sks(rows: &[GroupRow]) -> Vec<(&str, &str)> {
        let mut sks: Vec<_> = rows.iter().map(|row| (row.owner.as_str(), row.sk.as_str())).collect();
        sks.sort();
        sks
    }

    #[test]
    fn a_conversation_is_recalled_only_once_every_participant_has_a_row() {
        let memory = RowMemory::default();
        memory.learn(test_row("a", "b", T0));
        assert_eq!(memory.recall("g", Some("a")), None, "b's row is not known yet");
        memory.learn(test_row("b", "a", T0));
        let rows = memory.recall("g", Some("a")).expect("complete");
        assert_eq!(sks(&rows), [("a", T0), ("b", T0)]);
        assert_eq!(memory.recall("g", Some("c")), None, "the sender has no row");
        assert_eq!(memory.recall("other", None), None);
    }

    #[test]
    fn a_lagging_record_never_replaces_a_newer_row() {
        let memory = RowMemory::default();
        // The updater wrote the rows at T2; the stream then shows its earlier write at T1.
        memory.remember("g", vec![test_row("a", "b", T2), test_row("b", "a", T2)]);
        memory.learn(test_row("a", "b", T1));
        memory.learn(test_row("b", "a", T2));
        let rows = memory.recall("g", None).expect("complete");
        assert_eq!(sks(&rows), [("a", T2), ("b", T2)]);
    }

    #[test]
    fn a_newer_row_replaces_its_owners_rows() {
        let memory = RowMemory::default();
        memory.remember("g", vec![test_row("a", "b", T0), test_row("b", "a", T0)]);
        // Another writer moved a's row.
        memory.learn(test_row("a", "b", T1));
        let rows = memory.recall("g", None).expect("complete");
        assert_eq!(sks(&rows), [("a", T1), ("b", T0)]);
    }

    #[test]
    fn rows_without_a_conversation_or_with_long_texts_are_not_remembered() {
        let memory = RowMemory::default();
        let mut loose = test_row("a", "b", T0);
        loose.item.remove("message_group_uuid");
        memory.learn(loose);
        assert_eq!(memory.len(), 0);

        memory.learn(test_row("a", "b", T0));
        memory.learn(test_row("b", "a", T0));
        let mut long = test_row("a", "b", T1);
        long.item
            .insert("message".into(), AttributeValue::S("x".repeat(TEXT_BYTES + 1)));
        memory.learn(long);
        assert_eq!(memory.recall("g", None), None, "the conversation is forgotten");
    }

    #[test]
    fn memory_is_bounded() {
        let memory = RowMemory::default();
        for n in 0..CONVERSATIONS + 10 {
            let mut row = test_row("a", "a", T0);
            row.item
                .insert("message_group_uuid".into(), AttributeValue::S(format!("g{n}")));
            memory.learn(row);
        }
        assert_eq!(memory.len(), CONVERSATIONS);
    }
}
