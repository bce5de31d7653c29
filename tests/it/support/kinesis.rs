//! A Kinesis data stream of the test's own on kinesalite ([`TestKinesis`]), carrying the test
//! table's changes as Kinesis Data Streams for DynamoDB would, and its shards as listed.

use std::time::Duration;

use super::observers::wait_until;
use super::servers::REGION;
use super::tables::TestDb;
use super::workers::TestWorker;
use aws_sdk_dynamodb::types::AttributeValue;
use cruddur_stream_worker::aws::{self, AwsOverrides, Item};
use cruddur_stream_worker::groups::admin::User;

/// One shard of a Kinesis stream, as ListShards describes it.
#[derive(Debug, Clone)]
pub struct KinesisShard {
    pub id: String,
    /// One after a split, two after a merge.
    pub parents: Vec<String>,
    pub hash_start: u128,
    pub hash_end: u128,
    pub closed: bool,
}

/// A Kinesis data stream of this test's own on the kinesalite `scripts/test` starts, carrying
/// the test table's changes as Kinesis Data Streams for DynamoDB would.
pub struct TestKinesis {
    pub client: aws_sdk_kinesis::Client,
    pub name: String,
}

impl TestDb {
    pub async fn kinesis_stream(&self, shards: i32) -> TestKinesis {
        let endpoint = std::env::var("CRUDDUR_TEST_KINESIS")
            .unwrap_or_else(|_| panic!("CRUDDUR_TEST_KINESIS is not set: run the suite with scripts/test"));
        let sdk = aws::load_sdk_config(AwsOverrides {
            endpoint_url: Some(endpoint),
            region: Some(REGION.to_owned()),
            credentials: Some((self.access_key.clone(), "secret".to_owned())),
        })
        .await;
        let client = aws::kinesis_client(&sdk);
        let name = format!("changes-{}", &self.access_key[4..16]);
        client
            .create_stream()
            .stream_name(&name)
            .shard_count(shards)
            .send()
            .await
            .expect("create stream");
        let stream = TestKinesis { client, name };
        stream.wait_active().await;
        stream
    }

    /// Writes a message the way the app does and publishes its change record.
    pub async fn kinesis_message(&self, stream: &TestKinesis, group: &str, sender: &User, at: &str, text: &str) {
        self.message(group, sender, at, text).await;
        stream.publish_item(self, &format!("MSG#{group}"), at).await;
    }

    /// Opens a conversation the way the app does and publishes its three change records.
    pub async fn kinesis_conversation(
        &self,
        stream: &TestKinesis,
        from: &User,
        to: &User,
        at: &str,
        text: &str,
    ) -> String {
        let group = self.conversation(from, to, at, text).await;
        for pk in [
            format!("GRP#{}", from.uuid),
            format!("GRP#{}", to.uuid),
            format!("MSG#{group}"),
        ] {
            stream.publish_item(self, &pk, at).await;
        }
        group
    }

    /// A worker in this process reading `stream`, its DynamoDB calls through `endpoint` (a proxy).
    pub async fn start_kinesis_worker_via(
        &self,
        stream: &TestKinesis,
        endpoint: &str,
        overrides: &[(&str, &str)],
    ) -> TestWorker {
        let sdk = self.sdk_via(endpoint).await;
        let source = cruddur_stream_worker::stream::KinesisSource::new(stream.client.clone(), &stream.name);
        self.start_worker_with(&sdk, source, overrides).await
    }

    /// A worker in this process reading `stream`.
    pub async fn start_kinesis_worker(&self, stream: &TestKinesis, overrides: &[(&str, &str)]) -> TestWorker {
        let source = cruddur_stream_worker::stream::KinesisSource::new(stream.client.clone(), &stream.name);
        self.start_worker_on(source, overrides).await
    }
}

impl TestKinesis {
    pub async fn wait_active(&self) {
        let active = wait_until(Duration::from_secs(30), || async {
            let summary = self
                .client
                .describe_stream_summary()
                .stream_name(&self.name)
                .send()
                .await;
            summary
                .ok()
                .and_then(|s| s.stream_description_summary)
                .is_some_and(|s| s.stream_status.as_str() == "ACTIVE")
        })
        .await;
        assert!(active, "stream {} active", self.name);
    }

    /// Publishes the INSERT change record of the item at (pk, sk), as read from the table,
    /// partitioned by pk as DynamoDB does, created now (in milliseconds, no precision field).
    async fn publish_item(&self, db: &TestDb, pk: &str, sk: &str) {
        let now = serde_json::json!(chrono::Utc::now().timestamp_millis());
        self.publish_change(db, pk, sk, now, None).await;
    }

    /// Publishes the INSERT change record of the item at (pk, sk) with this
    /// `ApproximateCreationDateTime` and, when given, `ApproximateCreationDateTimePrecision`.
    pub async fn publish_change(
        &self,
        db: &TestDb,
        pk: &str,
        sk: &str,
        created: serde_json::Value,
        precision: Option<&str>,
    ) {
        let item = db
            .client
            .get_item()
            .table_name(&db.table)
            .key("pk", AttributeValue::S(pk.to_owned()))
            .key("sk", AttributeValue::S(sk.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .expect("get item")
            .item
            .expect("the item exists");
        let image = dynamodb_json(&item);
        let keys = dynamodb_json(&Item::from([
            ("pk".to_owned(), AttributeValue::S(pk.to_owned())),
            ("sk".to_owned(), AttributeValue::S(sk.to_owned())),
        ]));
        let mut change = serde_json::json!({
            "eventName": "INSERT",
            "eventSource": "aws:dynamodb",
            "tableName": db.table,
            "dynamodb": { "ApproximateCreationDateTime": created, "Keys": keys, "NewImage": image },
        });
        if let Some(precision) = precision {
            change["dynamodb"]["ApproximateCreationDateTimePrecision"] = serde_json::json!(precision);
        }
        let data = aws_sdk_kinesis::primitives::Blob::new(change.to_string());
        kinesalite_retries("put record", || async {
            self.client
                .put_record()
                .stream_name(&self.name)
                .partition_key(pk)
                .data(data.clone())
                .send()
                .await
                .map(drop)
                .map_err(|error| format!("{error:?}"))
        })
        .await;
    }

    /// Publishes change records (DynamoDB JSON, as Kinesis Data Streams for DynamoDB writes
    /// them) under one partition key, 500 to a PutRecords call.
    pub async fn publish_changes(&self, partition_key: &str, changes: &[serde_json::Value]) {
        for chunk in changes.chunks(500) {
            let entries: Vec<_> = chunk
                .iter()
                .map(|change| {
                    aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                        .partition_key(partition_key)
                        .data(aws_sdk_kinesis::primitives::Blob::new(change.to_string()))
                        .build()
                        .expect("entry")
                })
                .collect();
            kinesalite_retries("put records", || async {
                let output = self
                    .client
                    .put_records()
                    .stream_name(&self.name)
                    .set_records(Some(entries.clone()))
                    .send()
                    .await
                    .map_err(|error| format!("{error:?}"))?;
                match output.failed_record_count.unwrap_or(0) {
                    0 => Ok(()),
                    failed => Err(format!("{failed} records not published")),
                }
            })
            .await;
        }
    }

    /// Every shard, as listed.
    pub async fn shards(&self) -> Vec<KinesisShard> {
        let output = self
            .client
            .list_shards()
            .stream_name(&self.name)
            .send()
            .await
            .expect("list shards");
        output
            .shards
            .unwrap_or_default()
            .into_iter()
            .map(|shard| {
                let range = shard.hash_key_range.expect("hash range");
                KinesisShard {
                    id: shard.shard_id,
                    parents: [shard.parent_shard_id, shard.adjacent_parent_shard_id]
                        .into_iter()
                        .flatten()
                        .collect(),
                    hash_start: range.starting_hash_key.parse().expect("hash key"),
                    hash_end: range.ending_hash_key.parse().expect("hash key"),
                    closed: shard
                        .sequence_number_range
                        .is_some_and(|r| r.ending_sequence_number.is_some()),
                }
            })
            .collect()
    }
}

/// An item in DynamoDB JSON (strings, numbers, booleans, lists, maps: what the tests write).
fn dynamodb_json(item: &Item) -> serde_json::Value {
    fn value(v: &AttributeValue) -> serde_json::Value {
        match v {
            AttributeValue::S(s) => serde_json::json!({ "S": s }),
            AttributeValue::N(n) => serde_json::json!({ "N": n }),
            AttributeValue::Bool(b) => serde_json::json!({ "BOOL": b }),
            AttributeValue::Ss(ss) => serde_json::json!({ "SS": ss }),
            AttributeValue::L(l) => serde_json::json!({ "L": l.iter().map(value).collect::<Vec<_>>() }),
            AttributeValue::M(m) => serde_json::json!({ "M": dynamodb_json(m) }),
            _ => serde_json::json!({ "NULL": true }),
        }
    }
    serde_json::Value::Object(item.iter().map(|(k, v)| (k.clone(), value(v))).collect())
}

/// Sends a write to kinesalite, again if it fails: kinesalite drops a connection now and then
/// under a parallel suite (bounded to 10 attempts; a write stored and sent again only repeats
/// records, which an at-least-once reader must take anyway).
async fn kinesalite_retries<F, Fut>(what: &str, mut send: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    for attempt in 1..=10u64 {
        match send().await {
            Ok(()) => return,
            Err(error) if attempt == 10 => panic!("{what}: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100 * attempt)).await,
        }
    }
}
