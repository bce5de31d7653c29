//! Memory per busy shard, measured: one worker process draining a Kinesis stream of S shards on
//! kinesalite, every shard holding a backlog of the same size (Cruddur messages as Kinesis Data
//! Streams for DynamoDB carries them, each conversation on one shard), the group rows on
//! DynamoDB Local. Prints one JSON object: the drain's time, the worker's peak RSS and CPU, and
//! the records it read. `bench/run` runs it at several shard counts; the growth of peak RSS
//! with S is what each busy shard costs (README, "Memory").
//!
//!   cargo bench --bench suite -- busy-shards --endpoint URL --kinesis URL --worker BIN
//!                                            --shards S --messages-per-shard M --groups-per-shard G

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use cruddur_stream_worker::aws::Item;
use cruddur_stream_worker::groups::admin::User;
use cruddur_stream_worker::stream::change;
use futures::StreamExt as _;
use serde_json::{json, Value};

use super::fleet::create_stream;
use super::{conversations, final_keys, footprint, free_port, stamp, wait_final, worker_counts, Db, Failure, Flags};

/// Records per PutRecords call (the API's limit is 500).
const PUT_BATCH: usize = 500;

pub async fn busy_shards(flags: &Flags) -> Result<Value, Failure> {
    let shards = usize::try_from(flags.number("shards", 8)?)?;
    let per_shard = usize::try_from(flags.number("messages-per-shard", 2_000)?)?;
    let groups_per_shard = usize::try_from(flags.number("groups-per-shard", 10)?)?.max(1);
    let kinesis_url = flags.text("kinesis")?;
    let db = Db::fresh(&flags.text("endpoint")?).await?;
    let groups = conversations(&db, shards * groups_per_shard).await?;
    let (kinesis, stream) = create_stream(&db, &kinesis_url, shards).await?;
    let hash_keys = shard_hash_keys(&kinesis, &stream).await?;
    let newest = publish(&kinesis, &stream, &groups, &hash_keys, per_shard).await?;
    let keys = final_keys(&groups, &newest);

    let letters = std::env::temp_dir().join(format!("bench-{}.jsonl", db.access_key));
    let http = format!("127.0.0.1:{}", free_port()?);
    let started = Instant::now();
    let mut child = db
        .worker(&flags.text("worker")?, 250, &letters.to_string_lossy())
        .env("AWS_ENDPOINT_URL_KINESIS", &kinesis_url)
        .env("WORKER_SOURCE", "kinesis")
        .env("WORKER_KINESIS_STREAM_NAME", &stream)
        .env("WORKER_HTTP_ADDR", &http)
        .spawn()?;
    let seconds = wait_final(&db, &keys, started, Duration::from_secs(600)).await?;
    let (cpu_seconds, peak_rss) = child.id().map_or(Ok((0.0, 0)), footprint)?;
    let counts = worker_counts(&http).await;
    child.kill().await?;
    let _ = std::fs::remove_file(&letters);
    kinesis.delete_stream().stream_name(&stream).send().await?;
    db.drop_tables().await?;
    Ok(json!({
        "scenario": "busy_shards", "shards": shards, "messages_per_shard": per_shard,
        "groups": groups.len(), "seconds": seconds, "peak_rss_bytes": peak_rss,
        "cpu_seconds": cpu_seconds, "records_read": counts.records, "updates": counts.updates,
    }))
}

/// Each shard's starting hash key, in the stream's order: a record sent with it as its
/// explicit hash key lands on that shard.
async fn shard_hash_keys(kinesis: &aws_sdk_kinesis::Client, stream: &str) -> Result<Vec<String>, Failure> {
    let listed = kinesis.list_shards().stream_name(stream).send().await?;
    Ok(listed
        .shards()
        .iter()
        .filter_map(|shard| shard.hash_key_range().map(|range| range.starting_hash_key().to_owned()))
        .collect())
}

/// Publishes `per_shard` new messages to every shard, round-robin over the conversations that
/// shard carries (conversation i on shard i mod S), as INSERT change records with images.
/// Returns the newest (sk, text) per conversation.
async fn publish(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    groups: &[(String, User, User)],
    hash_keys: &[String],
    per_shard: usize,
) -> Result<HashMap<String, (String, String)>, Failure> {
    let shards = hash_keys.len();
    let base = chrono::Utc::now().timestamp_millis();
    let mut newest = HashMap::new();
    let mut batches: Vec<Vec<PutRecordsRequestEntry>> = Vec::new();
    for n in 0..shards * per_shard {
        let shard = n % shards;
        let round = n / shards;
        let index = shard + (round % (groups.len() / shards)) * shards;
        let (group, a, b) = &groups[index];
        let sender = if round.is_multiple_of(2) { a } else { b };
        let (at, text) = (stamp(base, n as i64), format!("message {n}"));
        let data = change_record(group, &at, sender, &text, base);
        if batches.last().is_none_or(|batch| batch.len() == PUT_BATCH) {
            batches.push(Vec::with_capacity(PUT_BATCH));
        }
        let batch = batches.last_mut().ok_or("no batch")?;
        batch.push(
            PutRecordsRequestEntry::builder()
                .data(Blob::new(data))
                .partition_key(format!("MSG#{group}"))
                .explicit_hash_key(&hash_keys[shard])
                .build()?,
        );
        newest.insert(group.clone(), (at, text));
    }
    let sent = futures::stream::iter(batches)
        .map(|batch| async move {
            let output = kinesis
                .put_records()
                .stream_name(stream)
                .set_records(Some(batch))
                .send()
                .await?;
            match output.failed_record_count() {
                Some(failed) if failed > 0 => Err(Failure::from(format!("{failed} records not put"))),
                _ => Ok(()),
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    sent.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(newest)
}

/// The INSERT change record of a message row, as Kinesis Data Streams for DynamoDB writes it.
fn change_record(group: &str, at: &str, sender: &User, text: &str, created_ms: i64) -> Vec<u8> {
    let s = |value: &str| AttributeValue::S(value.to_owned());
    let keys = Item::from([("pk".to_owned(), s(&format!("MSG#{group}"))), ("sk".to_owned(), s(at))]);
    let mut image = keys.clone();
    image.extend([
        ("message_uuid".to_owned(), s(&uuid::Uuid::new_v4().to_string())),
        ("message".to_owned(), s(text)),
        ("user_uuid".to_owned(), s(&sender.uuid)),
        ("user_display_name".to_owned(), s(&sender.display_name)),
        ("user_handle".to_owned(), s(&sender.handle)),
    ]);
    let record = json!({
        "awsRegion": "us-east-1", "eventID": uuid::Uuid::new_v4().to_string(), "eventName": "INSERT",
        "tableName": "cruddur-messages", "recordFormat": "application/json", "eventSource": "aws:dynamodb",
        "dynamodb": {
            "ApproximateCreationDateTime": created_ms,
            "ApproximateCreationDateTimePrecision": "MILLISECOND",
            "Keys": change::item_to_json(&keys),
            "NewImage": change::item_to_json(&image),
            "SizeBytes": 300,
        },
    });
    record.to_string().into_bytes()
}
