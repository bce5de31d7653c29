//! Operator and demo commands over the messages table, written the way the Cruddur app writes:
//! `setup` (the table), `seed`, `send`, and the app's two listings.
//!
//! A new conversation is one BatchWriteItem of three rows (both group rows and the first
//! message, one timestamp); a later message is one PutItem of its row. Group rows are never
//! touched here after creation: moving them is the worker's job.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, PutRequest, ScalarAttributeType, StreamSpecification, StreamViewType, WriteRequest,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::model::{text, GROUP_INDEX, GROUP_PREFIX, MESSAGE_PREFIX};
use super::timestamp;
use crate::aws::{self, AwsError, Item};

/// Namespace of the stable per-handle user uuids (the real app keeps users in Postgres).
const USER_NAMESPACE: Uuid = Uuid::from_u128(0x6f1e_7d2c_4b5a_4e3f_9a8b_1c2d_3e4f_5a6b);

/// Demo users: handle and display name.
pub const DEMO_USERS: &[(&str, &str)] = &[
    ("andrewbrown", "Andrew Brown"),
    ("bayko", "Andrew Bayko"),
    ("londo", "Londo Mollari"),
    ("worf", "Worf"),
];

/// A Cruddur user as the messages table records one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uuid: String,
    pub handle: String,
    pub display_name: String,
}

impl User {
    /// The user with this handle: a stable uuid per handle; the demo display name if known.
    pub fn from_handle(handle: &str) -> Self {
        let handle = handle.trim_start_matches('@');
        let display_name = DEMO_USERS
            .iter()
            .find(|(known, _)| *known == handle)
            .map_or(handle, |(_, name)| name)
            .to_owned();
        Self {
            uuid: Uuid::new_v5(&USER_NAMESPACE, handle.as_bytes()).to_string(),
            handle: handle.to_owned(),
            display_name,
        }
    }
}

/// Creates `cruddur-messages` as the app expects it (keys, GSI, NEW_IMAGE stream) unless it
/// exists. Returns whether it created it.
pub async fn create_messages_table(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<bool, AwsError> {
    let invalid = |error| AwsError::invalid_request("CreateTable", error);
    let string_attribute = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(invalid)
    };
    let key = |name: &str, key_type| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(key_type)
            .build()
            .map_err(invalid)
    };
    let index = GlobalSecondaryIndex::builder()
        .index_name(GROUP_INDEX)
        .key_schema(key("message_group_uuid", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .projection(Projection::builder().projection_type(ProjectionType::All).build())
        .build()
        .map_err(invalid)?;
    let stream = StreamSpecification::builder()
        .stream_enabled(true)
        .stream_view_type(StreamViewType::NewImage)
        .build()
        .map_err(invalid)?;
    let definitions = vec![
        string_attribute("pk")?,
        string_attribute("sk")?,
        string_attribute("message_group_uuid")?,
    ];
    let keys = vec![key("pk", KeyType::Hash)?, key("sk", KeyType::Range)?];
    aws::create_table_if_missing(client, table, |request| {
        request
            .set_attribute_definitions(Some(definitions))
            .set_key_schema(Some(keys))
            .global_secondary_indexes(index)
            .stream_specification(stream)
            .billing_mode(BillingMode::PayPerRequest)
    })
    .await
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

fn message_row(group_uuid: &str, sk: &str, message_uuid: &str, sender: &User, message: &str) -> Item {
    Item::from([
        ("pk".to_owned(), s(&format!("{MESSAGE_PREFIX}{group_uuid}"))),
        ("sk".to_owned(), s(sk)),
        ("message_uuid".to_owned(), s(message_uuid)),
        ("message".to_owned(), s(message)),
        ("user_uuid".to_owned(), s(&sender.uuid)),
        ("user_display_name".to_owned(), s(&sender.display_name)),
        ("user_handle".to_owned(), s(&sender.handle)),
    ])
}

fn group_row(group_uuid: &str, sk: &str, owner: &User, other: &User, message: &str) -> Item {
    Item::from([
        ("pk".to_owned(), s(&format!("{GROUP_PREFIX}{}", owner.uuid))),
        ("sk".to_owned(), s(sk)),
        ("message_group_uuid".to_owned(), s(group_uuid)),
        ("message".to_owned(), s(message)),
        ("user_uuid".to_owned(), s(&other.uuid)),
        ("user_display_name".to_owned(), s(&other.display_name)),
        ("user_handle".to_owned(), s(&other.handle)),
    ])
}

/// What `send` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub group_uuid: String,
    pub created_at: String,
    pub new_conversation: bool,
}

/// The group uuid of the conversation `owner` has with `other`, read consistently.
pub async fn find_conversation(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    owner: &User,
    other: &User,
) -> Result<Option<String>, AwsError> {
    let query = client
        .query()
        .table_name(table)
        .consistent_read(true)
        .key_condition_expression("pk = :pk")
        .filter_expression("user_uuid = :other")
        .expression_attribute_values(":pk", s(&format!("{GROUP_PREFIX}{}", owner.uuid)))
        .expression_attribute_values(":other", s(&other.uuid));
    let rows = aws::query_all(query).await?;
    Ok(rows
        .iter()
        .find_map(|row| text(row, "message_group_uuid"))
        .map(str::to_owned))
}

/// Posts a message as the app does: into the existing conversation, or a new one.
pub async fn send(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    from: &User,
    to: &User,
    message: &str,
    at: DateTime<Utc>,
) -> Result<Sent, AwsError> {
    let created_at = timestamp::format(at);
    let message_uuid = Uuid::new_v4().to_string();
    match find_conversation(client, table, from, to).await? {
        Some(group_uuid) => {
            put_message(client, table, &group_uuid, &created_at, &message_uuid, from, message).await?;
            Ok(Sent {
                group_uuid,
                created_at,
                new_conversation: false,
            })
        }
        None => {
            let group_uuid = Uuid::new_v4().to_string();
            create_conversation(
                client,
                table,
                &group_uuid,
                &created_at,
                &message_uuid,
                from,
                to,
                message,
            )
            .await?;
            Ok(Sent {
                group_uuid,
                created_at,
                new_conversation: true,
            })
        }
    }
}

/// A later message: one PutItem of the message row.
pub async fn put_message(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    group_uuid: &str,
    created_at: &str,
    message_uuid: &str,
    sender: &User,
    message: &str,
) -> Result<(), AwsError> {
    client
        .put_item()
        .table_name(table)
        .set_item(Some(message_row(group_uuid, created_at, message_uuid, sender, message)))
        .send()
        .await
        .map_err(|error| AwsError::from_sdk("PutItem", &error))?;
    Ok(())
}

/// A new conversation: one BatchWriteItem of both group rows and the first message.
#[allow(clippy::too_many_arguments)]
pub async fn create_conversation(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    group_uuid: &str,
    created_at: &str,
    message_uuid: &str,
    from: &User,
    to: &User,
    message: &str,
) -> Result<(), AwsError> {
    let rows = [
        group_row(group_uuid, created_at, from, to, message),
        group_row(group_uuid, created_at, to, from, message),
        message_row(group_uuid, created_at, message_uuid, from, message),
    ];
    let mut requests = Vec::with_capacity(rows.len());
    for row in rows {
        let put = PutRequest::builder()
            .set_item(Some(row))
            .build()
            .map_err(|e| AwsError::invalid_request("BatchWriteItem", e))?;
        requests.push(WriteRequest::builder().put_request(put).build());
    }
    // BatchWriteItem may leave items unprocessed under load; resend them (bounded).
    for attempt in 0..10u32 {
        let output = client
            .batch_write_item()
            .request_items(table, requests)
            .send()
            .await
            .map_err(|error| AwsError::from_sdk("BatchWriteItem", &error))?;
        requests = output
            .unprocessed_items
            .and_then(|mut left| left.remove(table))
            .unwrap_or_default();
        if requests.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50 << attempt.min(5))).await;
    }
    Err(AwsError {
        operation: "BatchWriteItem",
        code: None,
        message: format!("{} items still unprocessed after 10 attempts", requests.len()),
        retryable: true,
    })
}

/// A demo conversation: the first message opens it, the rest follow, senders alternating.
struct SeedConversation {
    from: &'static str,
    to: &'static str,
    /// `(sk, text)`, in the order the app would write them.
    messages: &'static [(&'static str, &'static str)],
}

const SEED: &[SeedConversation] = &[
    SeedConversation {
        from: "andrewbrown",
        to: "bayko",
        messages: &[
            ("2023-03-20T22:52:11.123456+00:00", "Have you watched Babylon 5?"),
            ("2023-03-21T09:15:00", "Season one is slow, stick with it."),
            ("2023-03-21T15:00:00.500000+05:30", "Londo is the best character."),
        ],
    },
    SeedConversation {
        from: "andrewbrown",
        to: "londo",
        messages: &[
            ("2023-03-22T14:36:25.547845+05:30", "Ambassador, a word?"),
            ("2023-03-22T10:00:00+00:00", "About the Centauri Republic."),
        ],
    },
    SeedConversation {
        from: "bayko",
        to: "worf",
        messages: &[("2023-04-05T15:50:37.922515", "Today is a good day to chat.")],
    },
];

/// What `seed` wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seeded {
    pub conversations_created: usize,
    pub conversations_skipped: usize,
    pub messages: usize,
}

/// Demo conversations, in the timestamp forms real tables hold. Idempotent: a conversation
/// that exists is left alone (re-creating it would leave a second row per participant once the
/// worker has moved the first).
pub async fn seed(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<Seeded, AwsError> {
    let mut seeded = Seeded::default();
    for SeedConversation { from, to, messages } in SEED {
        let (from, to) = (User::from_handle(from), User::from_handle(to));
        let group_uuid = Uuid::new_v5(
            &USER_NAMESPACE,
            format!("seed:{}:{}", from.handle, to.handle).as_bytes(),
        )
        .to_string();
        if find_conversation(client, table, &from, &to).await?.is_some() {
            seeded.conversations_skipped += 1;
            continue;
        }
        let message_uuid =
            |sk: &str| Uuid::new_v5(&USER_NAMESPACE, format!("{group_uuid}:{sk}").as_bytes()).to_string();
        let Some(((first_sk, first_text), later)) = messages.split_first() else {
            continue;
        };
        create_conversation(
            client,
            table,
            &group_uuid,
            first_sk,
            &message_uuid(first_sk),
            &from,
            &to,
            first_text,
        )
        .await?;
        for (index, (sk, message)) in later.iter().enumerate() {
            // Alternate senders, as a conversation does.
            let sender = if index % 2 == 0 { &to } else { &from };
            put_message(client, table, &group_uuid, sk, &message_uuid(sk), sender, message).await?;
        }
        seeded.conversations_created += 1;
        seeded.messages += messages.len();
    }
    Ok(seeded)
}

/// A user's conversations as the app lists them: newest first.
pub async fn conversations(client: &aws_sdk_dynamodb::Client, table: &str, user: &User) -> Result<Vec<Item>, AwsError> {
    let query = client
        .query()
        .table_name(table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", s(&format!("{GROUP_PREFIX}{}", user.uuid)))
        .scan_index_forward(false);
    aws::query_all(query).await
}

/// A conversation's messages as the app lists them: newest first.
pub async fn messages(client: &aws_sdk_dynamodb::Client, table: &str, group_uuid: &str) -> Result<Vec<Item>, AwsError> {
    let query = client
        .query()
        .table_name(table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", s(&format!("{MESSAGE_PREFIX}{group_uuid}")))
        .scan_index_forward(false);
    aws::query_all(query).await
}

/// Every item of the table.
pub async fn scan(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<Vec<Item>, AwsError> {
    aws::scan_all(client.scan().table_name(table)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_have_stable_uuids_per_handle() {
        assert_eq!(User::from_handle("bayko"), User::from_handle("@bayko"));
        assert_ne!(User::from_handle("bayko").uuid, User::from_handle("londo").uuid);
        assert_eq!(User::from_handle("londo").display_name, "Londo Mollari");
        assert_eq!(User::from_handle("someone").display_name, "someone");
    }

    #[test]
    fn group_rows_name_the_other_participant() {
        let (a, b) = (User::from_handle("a"), User::from_handle("b"));
        let row = group_row("g", "t", &a, &b, "hi");
        assert_eq!(text(&row, "pk"), Some(format!("GRP#{}", a.uuid).as_str()));
        assert_eq!(text(&row, "user_uuid"), Some(b.uuid.as_str()));
        assert!(
            !message_row("g", "t", "m", &a, "hi").contains_key("message_group_uuid"),
            "message rows stay out of the GSI"
        );
    }
}
