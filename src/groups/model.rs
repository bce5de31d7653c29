//! The Cruddur rows this worker reads and writes, and what a stream record means for them.
//!
//! - Message row: `pk = MSG#<message_group_uuid>`, `sk = created_at`, `message_uuid`,
//!   `message`, `user_uuid`, `user_display_name`, `user_handle` (the sender). It carries no
//!   `message_group_uuid`, so it stays out of the GSI.
//! - Group row, one per participant: `pk = GRP#<owner_user_uuid>`, `sk = last message time`,
//!   `message_group_uuid`, `message`, and the *other* participant's `user_uuid`,
//!   `user_display_name`, `user_handle`.

use std::fmt;

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};

use super::timestamp;
use crate::aws::Item;
use crate::dispatch::Route;
use crate::stream::{EventKind, Record};

pub const MESSAGE_PREFIX: &str = "MSG#";
pub const GROUP_PREFIX: &str = "GRP#";
pub const GROUP_INDEX: &str = "message-group-sk-index";

/// A message was posted to a conversation: its group rows must move up to it.
#[derive(Clone, PartialEq, Eq)]
pub struct MessageInserted {
    pub group_uuid: String,
    /// The message's `sk` exactly as stored: group rows take it verbatim.
    pub sk: String,
    pub at: DateTime<Utc>,
    pub text: String,
    /// The sender's user uuid, when the row has one: the way to the group rows without the
    /// eventually consistent index.
    pub sender_uuid: Option<String>,
}

/// Message text never reaches a log.
impl fmt::Debug for MessageInserted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageInserted")
            .field("group_uuid", &self.group_uuid)
            .field("sk", &self.sk)
            .field("text_bytes", &self.text.len())
            .finish()
    }
}

pub(crate) fn text<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(value)) => Some(value),
        _ => None,
    }
}

/// What a stream record means for group summaries.
pub fn route(record: &Record) -> Route<MessageInserted> {
    let reject = |detail: String| Route::Reject {
        reason: "undecodable",
        detail,
    };
    match record.event {
        EventKind::Insert => {}
        EventKind::Modify => return Route::Ignore("modify"),
        EventKind::Remove => return Route::Ignore("remove"),
        EventKind::Other => return Route::Ignore("other_event"),
    }
    let Some(pk) = text(&record.keys, "pk") else {
        return reject("no string pk in the record's keys".into());
    };
    if pk.starts_with(GROUP_PREFIX) {
        return Route::Ignore("group_row");
    }
    let Some(group_uuid) = pk.strip_prefix(MESSAGE_PREFIX) else {
        return Route::Ignore("other_item");
    };
    if group_uuid.is_empty() {
        return reject("message row with an empty group uuid".into());
    }
    let Some(sk) = text(&record.keys, "sk") else {
        return reject("message row without a string sk".into());
    };
    let Some(at) = timestamp::parse(sk) else {
        return reject(format!("message sk {sk:?} is not a timestamp"));
    };
    let Some(image) = record.new_image.as_ref() else {
        return reject("no new image: the stream must include NEW_IMAGE".into());
    };
    let Some(message) = text(image, "message") else {
        return reject("message row without a string `message`".into());
    };
    Route::Apply {
        key: group_uuid.to_owned(),
        event: MessageInserted {
            group_uuid: group_uuid.to_owned(),
            sk: sk.to_owned(),
            at,
            text: message.to_owned(),
            sender_uuid: text(image, "user_uuid").map(str::to_owned),
        },
    }
}

/// A participant's group row as read from the table.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRow {
    pub item: Item,
    /// The owner's user uuid (the `pk` without `GRP#`).
    pub owner: String,
    pub sk: String,
    /// `None` when the stored `sk` is not a timestamp; such a row counts as older than any
    /// message, so the next message repairs it.
    pub at: Option<DateTime<Utc>>,
}

impl GroupRow {
    /// `None` for anything that is not a group row.
    pub fn from_item(item: Item) -> Option<Self> {
        let owner = text(&item, "pk")?.strip_prefix(GROUP_PREFIX)?.to_owned();
        let sk = text(&item, "sk")?.to_owned();
        let at = timestamp::parse(&sk);
        Some(Self { item, owner, sk, at })
    }

    /// The other participant's user uuid.
    pub fn other_user(&self) -> Option<&str> {
        text(&self.item, "user_uuid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::SequenceNumber;
    use std::collections::HashMap;

    fn s(value: &str) -> AttributeValue {
        AttributeValue::S(value.to_owned())
    }

    fn record(event: EventKind, pk: &str, sk: &str, image: &[(&str, &str)]) -> Record {
        let keys: Item = HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), s(sk))]);
        let mut new_image = keys.clone();
        new_image.extend(image.iter().map(|(k, v)| ((*k).to_owned(), s(v))));
        Record {
            sequence_number: SequenceNumber::parse("1").expect("digits"),
            event,
            keys,
            new_image: Some(new_image),
            created_at: None,
        }
    }

    #[test]
    fn a_message_insert_routes_by_group() {
        let r = record(
            EventKind::Insert,
            "MSG#g-1",
            "2023-03-20T22:52:11+00:00",
            &[("message", "hi"), ("user_uuid", "u-1")],
        );
        let Route::Apply { key, event } = route(&r) else {
            panic!("should apply")
        };
        assert_eq!(key, "g-1");
        assert_eq!(event.text, "hi");
        assert_eq!(event.sender_uuid.as_deref(), Some("u-1"));
        assert_eq!(event.sk, "2023-03-20T22:52:11+00:00");
    }

    #[test]
    fn other_records_are_ignored_with_a_reason() {
        let cases = [
            (record(EventKind::Remove, "MSG#g", "2023-03-20T22:52:11", &[]), "remove"),
            (
                record(EventKind::Modify, "MSG#g", "2023-03-20T22:52:11", &[("message", "x")]),
                "modify",
            ),
            (
                record(EventKind::Insert, "GRP#u", "2023-03-20T22:52:11", &[]),
                "group_row",
            ),
            (record(EventKind::Insert, "USER#u", "x", &[]), "other_item"),
            (record(EventKind::Other, "MSG#g", "x", &[]), "other_event"),
        ];
        for (r, expected) in cases {
            match route(&r) {
                Route::Ignore(reason) => assert_eq!(reason, expected),
                other => panic!("expected ignore({expected}), got {other:?}"),
            }
        }
    }

    #[test]
    fn undecodable_messages_are_rejected() {
        let cases = [
            record(EventKind::Insert, "MSG#", "2023-03-20T22:52:11", &[("message", "x")]),
            record(EventKind::Insert, "MSG#g", "not a time", &[("message", "x")]),
            record(EventKind::Insert, "MSG#g", "2023-03-20T22:52:11", &[]),
        ];
        for r in cases {
            assert!(
                matches!(
                    route(&r),
                    Route::Reject {
                        reason: "undecodable",
                        ..
                    }
                ),
                "{:?}",
                r.keys
            );
        }
    }

    #[test]
    fn debug_output_hides_the_text() {
        let event = MessageInserted {
            group_uuid: "g".into(),
            sk: "t".into(),
            at: Utc::now(),
            text: "secret words".into(),
            sender_uuid: None,
        };
        assert!(!format!("{event:?}").contains("secret"));
    }
}
