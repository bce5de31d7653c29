//! The bad days: iterators that expire, records trimmed away, updaters racing each other, and a
//! row key another conversation already holds.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use cruddur_stream_worker::groups::model::MessageInserted;
use cruddur_stream_worker::groups::timestamp;
use cruddur_stream_worker::groups::updater::GroupSummaryUpdater;
use cruddur_stream_worker::retry::{retry, RetryPolicy};
use cruddur_stream_worker::stream::{Batch, Position, ShardId, StreamError, StreamShards, StreamSource};

use crate::support::{canonical, s, users, wait_until, TestDb};

/// What to do to one read.
#[derive(Clone, Copy)]
enum Fault {
    /// Hand the real service an iterator made 20 minutes ago: it answers ExpiredIterator.
    ExpireIterator,
    /// Answer as the service does when records were trimmed before they were read.
    Trim,
}

/// The real source, with `fault` injected into read number `at` (counting from 0).
struct Faulty<S> {
    inner: S,
    fault: Fault,
    at: u32,
    reads: AtomicU32,
    expired_answers: Arc<AtomicU32>,
}

impl<S> Faulty<S> {
    /// `inner`, answering read number `at` as if its records were trimmed.
    fn trimming(inner: S, at: u32) -> Self {
        Self {
            inner,
            fault: Fault::Trim,
            at,
            reads: AtomicU32::new(0),
            expired_answers: Arc::new(AtomicU32::new(0)),
        }
    }
}

impl<S: StreamSource> StreamSource for Faulty<S> {
    async fn describe(&self) -> Result<StreamShards, StreamError> {
        self.inner.describe().await
    }

    async fn iterator(&self, stream_id: &str, shard: &ShardId, position: &Position) -> Result<String, StreamError> {
        self.inner.iterator(stream_id, shard, position).await
    }

    async fn read(&self, iterator: &str, limit: i32) -> Result<Batch, StreamError> {
        if self.reads.fetch_add(1, Ordering::SeqCst) != self.at {
            return self.inner.read(iterator, limit).await;
        }
        match self.fault {
            Fault::ExpireIterator => {
                let result = self
                    .inner
                    .read(&aged(iterator, Duration::from_secs(20 * 60)), limit)
                    .await;
                if matches!(result, Err(StreamError::ExpiredIterator)) {
                    self.expired_answers.fetch_add(1, Ordering::SeqCst);
                }
                result
            }
            Fault::Trim => Err(StreamError::Trimmed("injected by the test".into())),
        }
    }
}

/// DynamoDB Local's iterator is `<stream arn>|001|base64(<shard>|<sequence>|<creation ms>)`:
/// the same iterator, created `age` ago.
fn aged(iterator: &str, age: Duration) -> String {
    let engine = base64::engine::general_purpose::STANDARD;
    let (prefix, encoded) = iterator.rsplit_once('|').expect("iterator has parts");
    let decoded = String::from_utf8(engine.decode(encoded).expect("base64")).expect("utf-8");
    let (rest, created) = decoded.rsplit_once('|').expect("creation time");
    let created: u64 = created.parse().expect("milliseconds");
    let older = created - age.as_millis() as u64;
    let forged = format!("{rest}|{older:0width$}", width = decoded.len() - rest.len() - 1);
    format!("{prefix}|{}", engine.encode(forged))
}

/// Twelve messages to three conversations, each with its own newest message.
async fn traffic(db: &TestDb) -> Vec<(String, String, String)> {
    let people = users(&["sam", "tia", "uma", "vic"]);
    let mut expected = Vec::new();
    for index in 0..3 {
        let opened = format!("2023-09-01T00:00:0{index}");
        let group = db
            .conversation(&people[index], &people[index + 1], &opened, "open")
            .await;
        for step in 0..4 {
            let sk = format!("2023-09-0{}T00:00:0{index}", step + 2);
            db.message(&group, &people[index], &sk, &format!("step {step}")).await;
        }
        expected.push((group, format!("2023-09-05T00:00:0{index}"), "step 3".to_owned()));
    }
    expected
}

#[tokio::test]
async fn an_expired_iterator_resumes_from_the_checkpoint_without_skipping_or_repeating() {
    let db = TestDb::new().await;
    let expected = traffic(&db).await;
    let expired_answers = Arc::new(AtomicU32::new(0));
    let source = Faulty {
        inner: db.stream_source(),
        fault: Fault::ExpireIterator,
        at: 2,
        reads: AtomicU32::new(0),
        expired_answers: expired_answers.clone(),
    };
    let worker = db
        .start_worker_on(source, &[("batch_size", "4"), ("read_ahead_bytes", "0")])
        .await;
    for (group, sk, text) in &expected {
        db.wait_for_group(group, sk, text).await;
    }
    db.wait_caught_up().await;
    let report = worker.stop().await;
    assert_eq!(
        expired_answers.load(Ordering::SeqCst),
        1,
        "DynamoDB Local said the iterator expired"
    );
    let in_stream = db.stream_records().await.len() as u64;
    assert_eq!(
        report.records(),
        in_stream,
        "every record read exactly once across the expiry"
    );
}

#[tokio::test]
async fn trimmed_records_are_counted_as_a_gap_and_reading_restarts_at_the_horizon() {
    let db = TestDb::new().await;
    let expected = traffic(&db).await;
    let source = Faulty::trimming(db.stream_source(), 1);
    let worker = db
        .start_worker_on(source, &[("batch_size", "4"), ("read_ahead_bytes", "0")])
        .await;
    for (group, sk, text) in &expected {
        db.wait_for_group(group, sk, text).await;
    }
    db.wait_caught_up().await;
    assert_eq!(
        worker.metric("stream_worker_stream_gaps_total", "").await,
        1.0,
        "the gap is counted"
    );
    let report = worker.stop().await;
    let in_stream = db.stream_records().await.len() as u64;
    assert!(
        report.records() > in_stream,
        "reading restarted at TRIM_HORIZON (records read again)"
    );
}

/// A new user's first run: an empty stream. DynamoDB Local answers the first read from
/// TRIM_HORIZON of an empty shard with TrimmedDataAccessException; from the horizon nothing can
/// have been lost, so no gap is counted (no ERROR either), and the worker still reads what comes.
#[tokio::test]
async fn a_fresh_start_on_an_empty_stream_raises_no_alarm() {
    let db = TestDb::new().await;
    // The stream exists but holds nothing: write and delete nothing, just enable it.
    let worker = db.start_worker(&[]).await;
    let reading = wait_until(Duration::from_secs(20), || async {
        worker.metric("stream_worker_leases_held", "").await >= 1.0 && worker.get("/readyz").await.0 == 200
    })
    .await;
    assert!(reading, "the worker holds the shard and reads it");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(worker.metric("stream_worker_stream_gaps_total", "").await, 0.0);
    let people = users(&["fa", "fb"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-01-01T00:00:00Z", "hi")
        .await;
    db.message(&group, &people[1], "2024-01-01T00:00:01Z", "hello").await;
    db.wait_for_group(&group, "2024-01-01T00:00:01Z", "hello").await;
    assert_eq!(worker.metric("stream_worker_stream_gaps_total", "").await, 0.0);
    worker.stop().await;
}

/// The same answer to the very first read from TRIM_HORIZON, injected: still no gap.
#[tokio::test]
async fn a_trimmed_answer_before_anything_was_read_from_the_horizon_is_no_gap() {
    let db = TestDb::new().await;
    let expected = traffic(&db).await;
    let source = Faulty::trimming(db.stream_source(), 0);
    let worker = db.start_worker_on(source, &[("batch_size", "4")]).await;
    for (group, sk, text) in &expected {
        db.wait_for_group(group, sk, text).await;
    }
    assert_eq!(worker.metric("stream_worker_stream_gaps_total", "").await, 0.0);
    worker.stop().await;
}

#[tokio::test]
async fn racing_updaters_converge_on_the_newest_message() {
    let db = TestDb::new().await;
    let people = users(&["wes", "xia"]);
    let group = db
        .conversation(&people[0], &people[1], "2023-10-01T00:00:00", "open")
        .await;
    let updater = Arc::new(GroupSummaryUpdater::new(db.client.clone(), &db.table));
    let policy = RetryPolicy {
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
        max_attempts: Some(50),
    };
    for round in 0..15u32 {
        // Three updaters at once, each with its own message: whichever commits first, the
        // others lose their race, re-read, and must end at the newest.
        let mut tasks = Vec::new();
        for contender in 0..3u32 {
            let sk = format!("2023-10-02T00:{round:02}:0{contender}");
            let message = MessageInserted {
                group_uuid: group.clone(),
                at: timestamp::parse(&sk).expect("timestamp"),
                message_uuid: Some(format!("round {round} contender {contender}")),
                sk,
                text: format!("round {round} contender {contender}"),
                sender_uuid: Some(people[(contender % 2) as usize].uuid.clone()),
            };
            let (updater, policy) = (updater.clone(), policy.clone());
            tasks.push(tokio::spawn(async move {
                retry(&policy, "test", || updater.apply(&message)).await
            }));
        }
        for task in tasks {
            task.await.expect("task").expect("update succeeds");
        }
        let rows = db.group_rows(&group).await;
        assert_eq!(rows.len(), 2, "round {round}: one row per participant: {rows:#?}");
        for row in &rows {
            assert_eq!(
                s(row, "sk"),
                canonical(&format!("2023-10-02T00:{round:02}:02")),
                "round {round}"
            );
            assert_eq!(s(row, "message"), format!("round {round} contender 2"));
        }
    }
}

#[tokio::test]
async fn a_row_key_held_by_another_conversation_is_never_overwritten() {
    let db = TestDb::new().await;
    let people = users(&["yan", "zed", "amy"]);
    let (yan, zed, amy) = (&people[0], &people[1], &people[2]);
    let first = db.conversation(yan, zed, "2023-11-01T00:00:00", "with zed").await;
    let second = db.conversation(yan, amy, "2023-11-01T00:00:01", "with amy").await;
    // A message to the second conversation at exactly the first conversation's row key.
    db.message(&second, amy, "2023-11-01T00:00:00", "collides").await;
    let worker = db.start_worker(&[("retry_max_attempts", "2")]).await;
    db.wait_caught_up().await;
    assert!(
        worker
            .metric("stream_worker_dead_letters_total", r#"reason="retries_exhausted""#)
            .await
            == 0.0
    );
    worker.stop().await;
    // The colliding message is older than the second conversation's rows, so it is stale; the
    // first conversation's row is untouched either way.
    let rows = db.group_rows(&first).await;
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|row| s(row, "sk") == canonical("2023-11-01T00:00:00") && s(row, "message") == "with zed"));
    assert_eq!(db.group_rows(&second).await.len(), 2);

    // Now a newer message that lands exactly on a key the other conversation holds (amy's row
    // of the conversation with zed, opened at that very instant).
    let held = db
        .conversation(zed, amy, "2023-11-02T00:00:00.000000+00:00", "zed and amy")
        .await;
    db.message(&second, amy, "2023-11-02T05:30:00+05:30", "collides for real")
        .await;
    let worker = db.start_worker(&[("retry_max_attempts", "20")]).await;
    let gave_up = wait_until(Duration::from_secs(30), || async {
        worker
            .metric("stream_worker_dead_letters_total", r#"reason="permanent_error""#)
            .await
            >= 1.0
    })
    .await;
    assert!(gave_up, "the update fails for good instead of overwriting");
    worker.stop().await;
    let letters = db.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(
        letters[0].attempts, 1,
        "the cancellation reasons say it at once: no rounds of re-reads"
    );
    assert!(letters[0].error.contains(&held), "{}", letters[0].error);
    let held_rows = db.group_rows(&held).await;
    assert_eq!(held_rows.len(), 2, "the other conversation keeps both rows");
    assert!(held_rows.iter().all(|row| s(row, "message") == "zed and amy"));
    let second_rows = db.group_rows(&second).await;
    assert_eq!(
        second_rows.len(),
        2,
        "and the conversation that could not move keeps its rows"
    );
    assert!(second_rows.iter().all(|row| s(row, "message") == "with amy"));
}

/// An updater remembers the rows it wrote; when someone else moved them since, its conditional
/// transaction fails, it forgets and reads again: nothing moves backwards, nothing doubles.
#[tokio::test]
async fn remembered_rows_that_went_stale_are_read_again() {
    let db = TestDb::new().await;
    let people = users(&["mo", "ne"]);
    let group = db
        .conversation(&people[0], &people[1], "2023-12-01T00:00:00", "open")
        .await;
    let message = |sk: &str, text: &str| TestDb::message_event(&group, &people[0], sk, text);
    let ours = GroupSummaryUpdater::new(db.client.clone(), &db.table);
    let theirs = GroupSummaryUpdater::new(db.client.clone(), &db.table);
    assert_eq!(
        ours.apply(&message("2023-12-01T00:00:01", "one"))
            .await
            .expect("applies"),
        "applied"
    );
    assert_eq!(
        theirs
            .apply(&message("2023-12-01T00:00:03", "three"))
            .await
            .expect("applies"),
        "applied"
    );
    // Ours still remembers the rows at 00:00:01; they are at 00:00:03 now.
    assert_eq!(
        ours.apply(&message("2023-12-01T00:00:02", "two"))
            .await
            .expect("decides"),
        "stale"
    );
    let rows = db.group_rows(&group).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert!(rows
        .iter()
        .all(|row| s(row, "sk") == canonical("2023-12-01T00:00:03") && s(row, "message") == "three"));
    assert_eq!(
        ours.apply(&message("2023-12-01T00:00:04", "four"))
            .await
            .expect("applies"),
        "applied"
    );
    let rows = db.group_rows(&group).await;
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|row| s(row, "sk") == canonical("2023-12-01T00:00:04") && s(row, "message") == "four"));
}

/// The app adds an attribute to a group row (a MODIFY another worker's shard carries, so this
/// updater never learns of it): the next move keeps it. Remembered rows never build a write.
#[tokio::test]
async fn an_attribute_added_behind_the_updaters_memory_survives_the_next_move() {
    let db = TestDb::new().await;
    let people = users(&["pa", "pb"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-02-01T00:00:00+00:00", "open")
        .await;
    let message = |sk: &str, text: &str| TestDb::message_event(&group, &people[0], sk, text);
    let updater = GroupSummaryUpdater::new(db.client.clone(), &db.table);
    assert_eq!(
        updater
            .apply(&message("2024-02-01T00:00:01Z", "one"))
            .await
            .expect("applies"),
        "applied"
    );
    // The app pins the conversation for both participants.
    for row in db.group_rows(&group).await {
        db.client
            .update_item()
            .table_name(&db.table)
            .key("pk", row["pk"].clone())
            .key("sk", row["sk"].clone())
            .update_expression("SET pinned = :yes")
            .expression_attribute_values(":yes", aws_sdk_dynamodb::types::AttributeValue::Bool(true))
            .send()
            .await
            .expect("pin");
    }
    assert_eq!(
        updater
            .apply(&message("2024-02-01T00:00:02Z", "two"))
            .await
            .expect("applies"),
        "applied"
    );
    let rows = db.group_rows(&group).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for row in &rows {
        assert_eq!(s(row, "message"), "two");
        assert_eq!(
            row.get("pinned"),
            Some(&aws_sdk_dynamodb::types::AttributeValue::Bool(true)),
            "the app's attribute survives: {row:#?}"
        );
    }
    // A replay is settled from memory, without a read.
    assert_eq!(
        updater
            .apply(&message("2024-02-01T00:00:02Z", "two"))
            .await
            .expect("decides"),
        "stale"
    );
}

/// The real source, listing one more shard than the stream has: a shard trimmed away between
/// the listing and the read (the source answers ResourceNotFound for it).
pub struct Phantom<S> {
    pub inner: S,
    pub shard: ShardId,
}

impl<S: StreamSource> StreamSource for Phantom<S> {
    async fn describe(&self) -> Result<StreamShards, StreamError> {
        let mut described = self.inner.describe().await?;
        described.shards.push(cruddur_stream_worker::stream::ShardInfo {
            id: self.shard.clone(),
            parents: vec![],
            closed: false,
        });
        Ok(described)
    }

    async fn iterator(&self, stream_id: &str, shard: &ShardId, position: &Position) -> Result<String, StreamError> {
        self.inner.iterator(stream_id, shard, position).await
    }

    async fn read(&self, iterator: &str, limit: i32) -> Result<Batch, StreamError> {
        self.inner.read(iterator, limit).await
    }
}

/// A shard the source says does not exist: its lease is finished (a gap counted once), not
/// retried forever or restarted every few seconds, and the real shard is read as ever.
#[tokio::test]
async fn a_shard_that_no_longer_exists_finishes_its_lease() {
    let db = TestDb::new().await;
    let expected = traffic(&db).await;
    let phantom = ShardId("shardId-00000001700000000000-00000000".into());
    let source = Phantom {
        inner: db.stream_source(),
        shard: phantom.clone(),
    };
    let worker = db.start_worker_on(source, &[]).await;
    for (group, sk, text) in &expected {
        db.wait_for_group(group, sk, text).await;
    }
    let finished = wait_until(Duration::from_secs(20), || async {
        db.leases()
            .await
            .get(&phantom.0)
            .is_some_and(|lease| lease.get("shard_end") == Some(&aws_sdk_dynamodb::types::AttributeValue::Bool(true)))
    })
    .await;
    assert!(finished, "the gone shard's lease is finished: {:#?}", db.leases().await);
    // Several lease rounds later: counted once, not restarted.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(worker.metric("stream_worker_stream_gaps_total", "").await, 1.0);
    tokio::time::timeout(Duration::from_secs(10), worker.stop())
        .await
        .expect("stops at once");
}
