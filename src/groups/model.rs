//! The Cruddur rows this worker reads and writes, and what a stream record means for them.
//!
//! - Message row: `pk = MSG#<message_group_uuid>`, `sk = created_at`, `message_uuid`,
//!   `message`, `user_uuid`, `user_display_name`, `user_handle` (the sender). It carries no
//!   `message_group_uuid`, so it stays out of the GSI.
//! - Group row, one per participant: `pk = GRP#<owner_user_uuid>`, `sk = last message time`,
//!   `message_group_uuid`, `message`, and the *other* participant's `user_uuid`,
//!   `user_display_name`, `user_handle`. This worker writes its `sk` in the canonical form
//!   ([`timestamp::canonical`]) and adds `message_uuid`, the message the row shows, so that
//!   rows and messages share one total order ([`Position`]).

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
/// On a message row, its uuid; on a group row (written by this worker), the uuid of the
/// message the row shows.
pub const MESSAGE_UUID: &str = "message_uuid";

/// Where a message, or the message a group row shows, stands in its conversation: by instant,
/// then by [`Rank`]. One total order for coalescing, updating and reconciling, so that two
/// messages at one instant leave the same survivor however they arrive. A row whose `sk` is
/// not a timestamp sorts before everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position<'a> {
    pub at: Option<DateTime<Utc>>,
    pub rank: Rank<'a>,
}

/// The order within one instant, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank<'a> {
    /// No message uuid: a message without one, or a row the app wrote at its writer's offset
    /// (which every message of its instant moves, into the canonical form).
    Unnamed,
    /// The message's uuid (on a row: the message it shows), in string order.
    Message(&'a str),
    /// A row the app wrote itself (no message uuid) already in the canonical form: it stands
    /// after every message of its instant, so the message it was written with (in the same
    /// batch) changes nothing and costs no write.
    Settled,
}

impl<'a> Rank<'a> {
    fn of_message(uuid: Option<&'a str>) -> Self {
        uuid.map_or(Rank::Unnamed, Rank::Message)
    }
}

/// A message was posted to a conversation: its group rows must move up to it.
#[derive(Clone, PartialEq, Eq)]
pub struct MessageInserted {
    pub group_uuid: String,
    /// The message's `sk` exactly as stored (message rows are never rewritten); group rows
    /// take its canonical form.
    pub sk: String,
    pub at: DateTime<Utc>,
    /// The message's own uuid, when its row has one (the app always writes one).
    pub message_uuid: Option<String>,
    pub text: String,
    /// The sender's user uuid, when the row has one: the way to the group rows without the
    /// eventually consistent index.
    pub sender_uuid: Option<String>,
}

impl<'a> Position<'a> {
    pub fn of_message(at: DateTime<Utc>, uuid: Option<&'a str>) -> Self {
        Position {
            at: Some(at),
            rank: Rank::of_message(uuid),
        }
    }
}

impl MessageInserted {
    pub fn position(&self) -> Position<'_> {
        Position::of_message(self.at, self.message_uuid.as_deref())
    }

    /// The `sk` its group rows take: the canonical form of its instant.
    pub fn row_sk(&self) -> String {
        timestamp::format(self.at)
    }
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

/// Why a message record cannot be handled: dead-letter reasons (metric labels).
pub mod reject {
    /// A required attribute is absent (pk, sk, message).
    pub const MISSING_ATTRIBUTE: &str = "missing_attribute";
    /// A required attribute is not a string.
    pub const WRONG_TYPE: &str = "wrong_type";
    /// `pk` is `MSG#` and nothing more.
    pub const EMPTY_GROUP_UUID: &str = "empty_group_uuid";
    /// `sk` is not a timestamp.
    pub const BAD_TIMESTAMP: &str = "bad_timestamp";
    /// The record has no new image: the stream does not include NEW_IMAGE.
    pub const NO_NEW_IMAGE: &str = "no_new_image";
}

/// A required string attribute, or the reason it is not one.
fn required<'a>(item: &'a Item, name: &str, what: &str) -> Result<&'a str, (&'static str, String)> {
    match item.get(name) {
        Some(AttributeValue::S(value)) => Ok(value),
        Some(other) => Err((
            reject::WRONG_TYPE,
            format!("{what} `{name}` is not a string: {}", type_name(other)),
        )),
        None => Err((reject::MISSING_ATTRIBUTE, format!("{what} has no `{name}`"))),
    }
}

fn type_name(value: &AttributeValue) -> &'static str {
    match value {
        AttributeValue::N(_) => "N",
        AttributeValue::B(_) => "B",
        AttributeValue::Bool(_) => "BOOL",
        AttributeValue::Null(_) => "NULL",
        AttributeValue::L(_) => "L",
        AttributeValue::M(_) => "M",
        AttributeValue::Ss(_) => "SS",
        AttributeValue::Ns(_) => "NS",
        AttributeValue::Bs(_) => "BS",
        _ => "unknown",
    }
}

/// What a stream record means for group summaries.
pub fn route(record: &Record) -> Route<MessageInserted> {
    match decode(record) {
        Ok(route) => route,
        Err((reason, detail)) => Route::Reject { reason, detail },
    }
}

fn decode(record: &Record) -> Result<Route<MessageInserted>, (&'static str, String)> {
    match record.event {
        EventKind::Insert => {}
        EventKind::Modify => return Ok(Route::Ignore("modify")),
        EventKind::Remove => return Ok(Route::Ignore("remove")),
        EventKind::Other => return Ok(Route::Ignore("other_event")),
    }
    let pk = required(&record.keys, "pk", "the record's keys")?;
    if pk.starts_with(GROUP_PREFIX) {
        return Ok(Route::Ignore("group_row"));
    }
    let Some(group_uuid) = pk.strip_prefix(MESSAGE_PREFIX) else {
        return Ok(Route::Ignore("other_item"));
    };
    if group_uuid.trim().is_empty() {
        return Err((reject::EMPTY_GROUP_UUID, format!("message row with pk {pk:?}")));
    }
    let sk = required(&record.keys, "sk", "the message row's keys")?;
    let Some(at) = timestamp::parse(sk) else {
        return Err((reject::BAD_TIMESTAMP, format!("message sk {sk:?} is not a timestamp")));
    };
    let Some(image) = record.new_image.as_ref() else {
        return Err((
            reject::NO_NEW_IMAGE,
            "no new image: the stream must include NEW_IMAGE".into(),
        ));
    };
    let message = required(image, "message", "the message row")?;
    let optional = |name| match image.get(name) {
        None => Ok(None),
        Some(_) => required(image, name, "the message row").map(|value| Some(value.to_owned())),
    };
    let sender_uuid = optional("user_uuid")?;
    let message_uuid = optional(MESSAGE_UUID)?;
    Ok(Route::Apply {
        key: group_uuid.to_owned(),
        event: MessageInserted {
            group_uuid: group_uuid.to_owned(),
            sk: sk.to_owned(),
            at,
            message_uuid,
            text: message.to_owned(),
            sender_uuid,
        },
    })
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
    /// The stored `sk` is already in the canonical form ([`timestamp::canonical`]).
    pub canonical: bool,
}

impl GroupRow {
    /// `None` for anything that is not a group row.
    pub fn from_item(item: Item) -> Option<Self> {
        let owner = text(&item, "pk")?.strip_prefix(GROUP_PREFIX)?.to_owned();
        let sk = text(&item, "sk")?.to_owned();
        let at = timestamp::parse(&sk);
        let canonical = at.is_some_and(|at| timestamp::format(at) == sk);
        Some(Self {
            item,
            owner,
            sk,
            at,
            canonical,
        })
    }

    /// The other participant's user uuid.
    pub fn other_user(&self) -> Option<&str> {
        text(&self.item, "user_uuid")
    }

    /// The conversation the row belongs to.
    pub fn group_uuid(&self) -> Option<&str> {
        text(&self.item, "message_group_uuid")
    }

    /// Where the message the row shows stands.
    pub fn position(&self) -> Position<'_> {
        let rank = match text(&self.item, MESSAGE_UUID) {
            Some(uuid) => Rank::Message(uuid),
            None if self.canonical => Rank::Settled,
            None => Rank::Unnamed,
        };
        Position { at: self.at, rank }
    }
}

/// A group row as a stream record shows it written (an INSERT or MODIFY of a `GRP#` row with
/// its new image and its conversation); `None` for every other record.
pub fn group_row_written(record: &Record) -> Option<GroupRow> {
    if !matches!(record.event, EventKind::Insert | EventKind::Modify) {
        return None;
    }
    let image = record.new_image.as_ref()?;
    if !text(image, "pk")?.starts_with(GROUP_PREFIX) {
        return None;
    }
    text(image, "message_group_uuid")?;
    GroupRow::from_item(image.clone())
}

/// Do `rows` show a row for every participant they name (and for the sender)? Only then may
/// they stand for the whole conversation.
pub(crate) fn shows_every_participant(rows: &[GroupRow], sender: Option<&str>) -> bool {
    if rows.is_empty() {
        return false;
    }
    let has_row = |user: &str| rows.iter().any(|row| row.owner == user);
    rows.iter().filter_map(GroupRow::other_user).all(has_row) && sender.is_none_or(has_row)
}

/// A group row of conversation `g`, for tests.
#[cfg(test)]
pub(crate) fn test_row(owner: &str, other: &str, sk: &str) -> GroupRow {
    let item: Item = [
        ("pk", format!("{GROUP_PREFIX}{owner}")),
        ("sk", sk.to_owned()),
        ("message_group_uuid", "g".to_owned()),
        ("user_uuid", other.to_owned()),
        ("message", "x".to_owned()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), AttributeValue::S(value)))
    .collect();
    GroupRow::from_item(item).expect("a group row")
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
    fn undecodable_messages_are_rejected_with_a_reason() {
        let mut wrong_type = record(EventKind::Insert, "MSG#g", "2023-03-20T22:52:11", &[]);
        wrong_type
            .new_image
            .as_mut()
            .expect("image")
            .insert("message".into(), AttributeValue::N("7".into()));
        let mut no_image = record(EventKind::Insert, "MSG#g", "2023-03-20T22:52:11", &[("message", "x")]);
        no_image.new_image = None;
        let mut no_sk = record(EventKind::Insert, "MSG#g", "x", &[("message", "x")]);
        no_sk.keys.remove("sk");
        let cases = [
            (
                record(EventKind::Insert, "MSG#", "2023-03-20T22:52:11", &[("message", "x")]),
                reject::EMPTY_GROUP_UUID,
            ),
            (
                record(EventKind::Insert, "MSG#g", "not a time", &[("message", "x")]),
                reject::BAD_TIMESTAMP,
            ),
            (
                record(EventKind::Insert, "MSG#g", "2023-03-20T22:52:11", &[]),
                reject::MISSING_ATTRIBUTE,
            ),
            (wrong_type, reject::WRONG_TYPE),
            (no_image, reject::NO_NEW_IMAGE),
            (no_sk, reject::MISSING_ATTRIBUTE),
        ];
        for (r, expected) in cases {
            match route(&r) {
                Route::Reject { reason, .. } => assert_eq!(reason, expected, "{:?}", r.keys),
                other => panic!("expected reject({expected}), got {other:?}"),
            }
        }
    }

    #[test]
    fn debug_output_hides_the_text() {
        let event = MessageInserted {
            group_uuid: "g".into(),
            sk: "t".into(),
            at: Utc::now(),
            message_uuid: None,
            text: "secret words".into(),
            sender_uuid: None,
        };
        assert!(!format!("{event:?}").contains("secret"));
    }

    const T: &str = "2023-03-20T10:00:00";

    #[test]
    fn the_index_is_trusted_only_when_it_shows_everyone() {
        assert!(shows_every_participant(
            &[test_row("a", "b", T), test_row("b", "a", T)],
            Some("a")
        ));
        assert!(
            !shows_every_participant(&[test_row("a", "b", T)], Some("a")),
            "b's row is missing"
        );
        assert!(
            !shows_every_participant(&[test_row("b", "a", T), test_row("a", "b", T)], Some("c")),
            "sender has no row"
        );
        assert!(
            shows_every_participant(&[test_row("a", "a", T)], Some("a")),
            "a note to self"
        );
        assert!(!shows_every_participant(&[], Some("a")));
    }
}
