//! A database of its own per test ([`TestDb`]: DynamoDB Local keeps one per access key), the
//! app's own writes (conversations, messages), and reading the table, its lease rows and its
//! stream back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::observers::wait_until;
use super::servers::{endpoint, sdk_for};
use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use cruddur_stream_worker::aws::{self, Item};
use cruddur_stream_worker::groups::admin::{self, User};
use cruddur_stream_worker::groups::model::MessageInserted;
use cruddur_stream_worker::stream::{SequenceNumber, LEASE_TABLE_KEY};

/// One record of the table's stream, as read back directly.
#[derive(Debug, Clone)]
pub struct StreamedChange {
    pub sequence: String,
}

/// One test's own database: DynamoDB Local keeps one per access key.
#[derive(Clone)]
pub struct TestDb {
    pub access_key: String,
    pub sdk: SdkConfig,
    pub client: aws_sdk_dynamodb::Client,
    pub table: String,
    pub lease_table: String,
    /// Where this test's workers write dead letters (unless told to use a queue).
    pub dead_letter_file: PathBuf,
}

impl TestDb {
    /// A fresh database with the messages table created.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        admin::create_messages_table(&db.client, &db.table)
            .await
            .expect("create messages table");
        db
    }

    /// A fresh database with no tables.
    pub async fn empty() -> Self {
        // Worker logs show up with a failing test's output (nextest captures them).
        cruddur_stream_worker::telemetry::init_logging(&cruddur_stream_worker::telemetry::LoggingSettings {
            format: cruddur_stream_worker::telemetry::LogFormat::Text,
            level: "warn,cruddur_stream_worker=info".into(),
            metrics_namespace: "CruddurStreamWorker".into(),
        });
        let access_key = format!("test{}", uuid::Uuid::new_v4().simple());
        let sdk = sdk_for(&endpoint(), &access_key).await;
        let client = aws::dynamodb_client(&sdk);
        let scratch = std::env::temp_dir().join(format!("cruddur-it-{access_key}"));
        std::fs::create_dir_all(&scratch).expect("scratch directory");
        Self {
            access_key,
            sdk,
            client,
            table: "cruddur-messages".into(),
            lease_table: "cruddur-stream-worker-leases".into(),
            dead_letter_file: scratch.join("dead-letters.jsonl"),
        }
    }

    /// Opens a conversation the way the app does; returns its group uuid.
    pub async fn conversation(&self, from: &User, to: &User, at: &str, text: &str) -> String {
        let group = uuid::Uuid::new_v4().to_string();
        admin::create_conversation(
            &self.client,
            &self.table,
            &group,
            at,
            &uuid::Uuid::new_v4().to_string(),
            from,
            to,
            text,
        )
        .await
        .expect("create conversation");
        group
    }

    /// Posts a later message the way the app does.
    pub async fn message(&self, group: &str, sender: &User, at: &str, text: &str) {
        admin::put_message(
            &self.client,
            &self.table,
            group,
            at,
            &uuid::Uuid::new_v4().to_string(),
            sender,
            text,
        )
        .await
        .expect("put message");
    }

    /// Every group row of a conversation, read consistently from the table.
    pub async fn group_rows(&self, group: &str) -> Vec<Item> {
        let scan = self
            .client
            .scan()
            .table_name(&self.table)
            .consistent_read(true)
            .filter_expression("begins_with(pk, :grp) AND message_group_uuid = :group")
            .expression_attribute_values(":grp", AttributeValue::S("GRP#".into()))
            .expression_attribute_values(":group", AttributeValue::S(group.to_owned()));
        aws::scan_all(scan).await.expect("scan group rows")
    }

    /// Every item of the messages table, sorted, for before/after comparisons.
    pub async fn snapshot(&self) -> Vec<BTreeMap<String, String>> {
        let mut items: Vec<BTreeMap<String, String>> = admin::scan(&self.client, &self.table)
            .await
            .expect("scan")
            .into_iter()
            .map(|item| item.into_iter().map(|(k, v)| (k, format!("{v:?}"))).collect())
            .collect();
        items.sort();
        items
    }

    /// Waits until every participant of `group` has exactly one row at `sk` (in the canonical
    /// form group rows take) with `text`.
    pub async fn wait_for_group(&self, group: &str, sk: &str, text: &str) {
        let last = std::sync::Mutex::new(Vec::new());
        let done = wait_until(Duration::from_secs(30), || async {
            let rows = self.group_rows(group).await;
            let reached = rows.len() == 2
                && rows
                    .iter()
                    .all(|row| s(row, "sk") == canonical(sk) && s(row, "message") == text);
            *last.lock().expect("not poisoned") = rows;
            reached
        })
        .await;
        assert!(
            done,
            "group {group} never reached {sk} {text:?}; rows: {:#?}",
            last.lock().expect("not poisoned")
        );
    }

    /// Forgets every checkpoint (drops the lease table): the next worker replays the stream
    /// from its start.
    pub async fn forget_checkpoints(&self) {
        self.client
            .delete_table()
            .table_name(&self.lease_table)
            .send()
            .await
            .expect("drop leases");
    }

    /// A message event of `group` as the stream would carry it, with a uuid named after `sk`.
    pub fn message_event(group: &str, sender: &User, sk: &str, text: &str) -> MessageInserted {
        MessageInserted {
            group_uuid: group.to_owned(),
            sk: sk.to_owned(),
            at: cruddur_stream_worker::groups::timestamp::parse(sk).expect("timestamp"),
            message_uuid: Some(format!("m-{sk}")),
            text: text.to_owned(),
            sender_uuid: Some(sender.uuid.clone()),
        }
    }

    /// The lease row of every shard, by shard id.
    pub async fn leases(&self) -> BTreeMap<String, Item> {
        let scan = self.client.scan().table_name(&self.lease_table).consistent_read(true);
        let items = match aws::scan_all(scan).await {
            Ok(items) => items,
            Err(error) if error.is_code("ResourceNotFoundException") => Vec::new(),
            Err(error) => panic!("scan leases: {error}"),
        };
        items
            .into_iter()
            .map(|item| (s(&item, LEASE_TABLE_KEY).to_owned(), item))
            .filter(|(key, _)| !key.starts_with('~'))
            .collect()
    }

    /// Waits until the shard's checkpoint names the newest record in the stream: everything
    /// written so far has been handled.
    pub async fn wait_caught_up(&self) {
        let last = self
            .stream_records()
            .await
            .last()
            .map(|record| record.sequence.clone())
            .expect("records in the stream");
        let target = SequenceNumber::parse(&last).expect("a sequence number");
        // At or past it: the worker's own group-row writes add records after it.
        let caught_up = wait_until(Duration::from_secs(30), || async {
            self.leases()
                .await
                .values()
                .any(|lease| SequenceNumber::parse(s(lease, "checkpoint")).is_some_and(|at| at >= target))
        })
        .await;
        assert!(
            caught_up,
            "the checkpoint never reached {last}: {:#?}",
            self.leases().await
        );
    }

    /// Every record in the table's stream, in order.
    pub async fn stream_records(&self) -> Vec<StreamedChange> {
        use aws_sdk_dynamodbstreams::types::ShardIteratorType;
        let streams = aws::streams_client(&self.sdk);
        let described = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .expect("describe table");
        let arn = described
            .table()
            .and_then(|t| t.latest_stream_arn())
            .expect("stream")
            .to_owned();
        let stream = streams
            .describe_stream()
            .stream_arn(&arn)
            .send()
            .await
            .expect("describe stream");
        let mut records = Vec::new();
        for shard in stream.stream_description().map(|d| d.shards()).unwrap_or_default() {
            let mut iterator = streams
                .get_shard_iterator()
                .stream_arn(&arn)
                .shard_id(shard.shard_id().unwrap_or_default())
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("iterator")
                .shard_iterator
                .expect("iterator");
            for _ in 0..1000 {
                let page = streams
                    .get_records()
                    .shard_iterator(&iterator)
                    .send()
                    .await
                    .expect("get records");
                if page.records().is_empty() {
                    break;
                }
                for record in page.records() {
                    let change = record.dynamodb().expect("change");
                    records.push(StreamedChange {
                        sequence: change.sequence_number().unwrap_or_default().to_owned(),
                    });
                }
                match page.next_shard_iterator {
                    Some(next) => iterator = next,
                    None => break,
                }
            }
        }
        records
    }
}

/// A string attribute, or "" when absent.
pub fn s<'a>(item: &'a Item, name: &str) -> &'a str {
    match item.get(name) {
        Some(AttributeValue::S(value)) => value,
        _ => "",
    }
}

/// The form a group row's `sk` takes for a message at `sk`.
pub fn canonical(sk: &str) -> String {
    cruddur_stream_worker::groups::timestamp::canonical(sk).unwrap_or_else(|| panic!("{sk} is a timestamp"))
}

/// Test users with handles unique to the test, so nothing leaks between tests by name.
pub fn users(names: &[&str]) -> Vec<User> {
    names.iter().map(|name| User::from_handle(name)).collect()
}

impl TestDb {
    /// The group uuid of some conversation of the user with this handle.
    pub async fn group_rows_of_any(&self, handle: &str) -> String {
        let user = User::from_handle(handle);
        let rows = admin::conversations(&self.client, &self.table, &user)
            .await
            .expect("query");
        s(rows.first().expect("a conversation"), "message_group_uuid").to_owned()
    }
}
