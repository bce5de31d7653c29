//! The Kinesis source on kinesalite: multi-shard streams, several workers, split and merge.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::proxy::{Fault, FaultProxy, Faults};
use crate::support::{s, users, wait_until, LeaseWatch, TestDb, TestKinesis, TestQueue};

/// `count` conversations among `people`, each with its own opening second.
async fn conversations(db: &TestDb, stream: &TestKinesis, count: usize) -> Vec<(String, usize)> {
    let people = users(&["ka", "kb", "kc", "kd", "ke"]);
    let mut groups = Vec::new();
    for index in 0..count {
        let (a, b) = (index % people.len(), (index + 1 + index / people.len()) % people.len());
        let opened = format!("2024-05-01T00:00:{index:02}");
        groups.push((
            db.kinesis_conversation(stream, &people[a], &people[b], &opened, "open")
                .await,
            a,
        ));
    }
    groups
}

/// One message to every conversation at `minute` (each conversation's own second); returns
/// what every conversation must end at.
async fn wave(
    db: &TestDb,
    stream: &TestKinesis,
    groups: &[(String, usize)],
    minute: u32,
) -> Vec<(String, String, String)> {
    let people = users(&["ka", "kb", "kc", "kd", "ke"]);
    let mut expected = Vec::new();
    for (index, (group, sender)) in groups.iter().enumerate() {
        let sk = format!("2024-05-01T00:{minute:02}:{index:02}");
        let text = format!("minute {minute}");
        db.kinesis_message(stream, group, &people[*sender], &sk, &text).await;
        expected.push((group.clone(), sk, text));
    }
    expected
}

async fn converge(db: &TestDb, expected: &[(String, String, String)]) {
    for (group, sk, text) in expected {
        db.wait_for_group(group, sk, text).await;
    }
}

#[tokio::test]
async fn a_four_shard_stream_is_read_in_full() {
    let db = TestDb::new().await;
    let stream = db.kinesis_stream(4).await;
    let groups = conversations(&db, &stream, 8).await;
    wave(&db, &stream, &groups, 1).await;
    let expected = wave(&db, &stream, &groups, 2).await;
    let worker = db.start_kinesis_worker(&stream, &[]).await;
    converge(&db, &expected).await;
    assert_eq!(worker.metric("stream_worker_leases_held", "").await, 4.0);
    let (_, metrics) = worker.get("/metrics").await;
    let per_shard = metrics
        .lines()
        .filter(|line| line.starts_with("stream_worker_shard_iterator_age_seconds{shard="))
        .count();
    assert_eq!(per_shard, 4, "one lag series per shard read");
    let report = worker.stop().await;
    // 8 conversations x 3 rows + 16 messages, each read once, across the four shards.
    assert_eq!(report.records(), 8 * 3 + 16);
    let leases = db.leases().await;
    assert_eq!(leases.len(), 4);
}

/// A worker process's arguments: `id` reading the Kinesis stream `stream` with fast leases
/// (3 s), and `settings` on top.
fn kinesis_args(id: &str, stream: &str, settings: &[(&str, &str)]) -> Vec<String> {
    let mut args = vec![
        "--worker-id".to_owned(),
        id.to_owned(),
        "--set".to_owned(),
        "source=kinesis".to_owned(),
        "--set".to_owned(),
        format!("kinesis_stream_name={stream}"),
        "--set".to_owned(),
        "lease_duration_ms=3000".to_owned(),
    ];
    for (key, value) in settings {
        args.push("--set".to_owned());
        args.push(format!("{key}={value}"));
    }
    args
}

/// Waits until every shard is owned and the owners' shares are as `expected` (sorted).
async fn shares_settle(db: &TestDb, expected: &[usize]) -> BTreeMap<String, usize> {
    let last = std::sync::Mutex::new(BTreeMap::new());
    let settled = wait_until(Duration::from_secs(60), || async {
        let owners = db.owners().await;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for owner in owners.values() {
            *counts.entry(owner.clone()).or_default() += 1;
        }
        let mut shares: Vec<usize> = counts
            .iter()
            .filter(|(owner, _)| !owner.is_empty())
            .map(|(_, n)| *n)
            .collect();
        shares.sort_unstable();
        *last.lock().expect("last") = counts;
        shares == expected
    })
    .await;
    let last = last.into_inner().expect("last");
    assert!(settled, "shares never became {expected:?}: {last:?}");
    last
}

#[tokio::test]
async fn two_then_three_workers_share_four_shards_within_one_and_survive_a_crash() {
    let db = TestDb::new().await;
    let stream = db.kinesis_stream(4).await;
    let watch = LeaseWatch::start(&db);
    let groups = conversations(&db, &stream, 8).await;
    let spawn = |id: &'static str| {
        let args = kinesis_args(
            id,
            &stream.name,
            &[("lease_take_interval_ms", "100"), ("idle_interval_ms", "20")],
        );
        let db = &db;
        async move {
            db.spawn_worker_process(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .await
        }
    };
    let mut workers = vec![spawn("alpha").await, spawn("beta").await];
    shares_settle(&db, &[2, 2]).await;
    converge(&db, &wave(&db, &stream, &groups, 1).await).await;

    workers.push(spawn("gamma").await);
    shares_settle(&db, &[1, 1, 2]).await;
    converge(&db, &wave(&db, &stream, &groups, 2).await).await;
    // Still one reader per shard after the move: held leases add up to the shard count. Each
    // worker sets its gauge once per lease round, so a busy machine may show a round's lag.
    let last = std::sync::Mutex::new(Vec::new());
    let one_each = wait_until(Duration::from_secs(15), || async {
        let mut held = Vec::new();
        for worker in &workers {
            held.push(worker.metric("stream_worker_leases_held", "").await);
        }
        let total: f64 = held.iter().sum();
        *last.lock().expect("last") = held;
        total == 4.0
    })
    .await;
    assert!(one_each, "leases held per worker: {:?}", last.lock().expect("last"));

    // A crash: the survivors take the dead worker's shards once its leases expire, resume from
    // its checkpoints, and lose nothing written meanwhile.
    let mut dead = workers.pop().expect("gamma");
    dead.signal("KILL");
    dead.wait_exit().await;
    let expected = wave(&db, &stream, &groups, 3).await;
    let shares = shares_settle(&db, &[2, 2]).await;
    assert!(
        !shares.contains_key("gamma"),
        "nothing left with the dead worker: {shares:?}"
    );
    converge(&db, &expected).await;
    for worker in workers.iter_mut() {
        worker.signal("TERM");
        assert_eq!(worker.wait_exit().await.code(), Some(0));
    }
    watch.finish().await;
}

#[tokio::test]
async fn a_split_and_a_merge_while_writing_lose_nothing_and_parents_finish_first() {
    let db = TestDb::new().await;
    let stream = db.kinesis_stream(2).await;
    let groups = conversations(&db, &stream, 6).await;
    wave(&db, &stream, &groups, 1).await;
    let worker = db.start_kinesis_worker(&stream, &[]).await;

    // Split the first shard at the middle of its hash range.
    let shards = stream.shards().await;
    let (first, start, end) = (shards[0].id.clone(), shards[0].hash_start, shards[0].hash_end);
    stream
        .client
        .split_shard()
        .stream_name(&stream.name)
        .shard_to_split(&first)
        .new_starting_hash_key((start + (end - start) / 2).to_string())
        .send()
        .await
        .expect("split");
    stream.wait_active().await;
    wave(&db, &stream, &groups, 2).await;

    // Merge the upper child of the split with the second original shard (adjacent ranges).
    let shards = stream.shards().await;
    let second = shards[1].id.clone();
    let upper_child = shards
        .iter()
        .filter(|shard| shard.parents == [first.clone()] && !shard.closed)
        .max_by_key(|shard| shard.hash_start)
        .map(|shard| shard.id.clone())
        .expect("split children");
    stream
        .client
        .merge_shards()
        .stream_name(&stream.name)
        .shard_to_merge(&upper_child)
        .adjacent_shard_to_merge(&second)
        .send()
        .await
        .expect("merge");
    stream.wait_active().await;
    let expected = wave(&db, &stream, &groups, 3).await;
    converge(&db, &expected).await;
    let report = worker.stop().await;

    let shards = stream.shards().await;
    let merged = shards
        .iter()
        .find(|shard| shard.parents.len() == 2)
        .expect("the merged shard");
    let leases = db.leases().await;
    for parent in &merged.parents {
        assert_eq!(
            leases[parent].get("shard_end"),
            Some(&AttributeValue::Bool(true)),
            "{parent} finished"
        );
    }
    assert_eq!(leases[&first].get("shard_end"), Some(&AttributeValue::Bool(true)));
    // Children started only after every parent's reader finished.
    let reader = |id: &str| report.shards.iter().find(|r| r.shard.0 == id).cloned();
    for shard in &shards {
        let (id, parents) = (&shard.id, &shard.parents);
        let Some(child) = reader(id) else { continue };
        for parent in parents {
            let parent = reader(parent).expect("the parent was read by this worker");
            assert!(parent.ended);
            assert!(
                child.started_at >= parent.finished_at,
                "{id} started before {} finished",
                parent.shard
            );
        }
    }
    // 6 conversations x 3 rows + 18 messages, each read exactly once.
    assert_eq!(report.records(), 6 * 3 + 18);
    let mut open = leases
        .values()
        .filter(|lease| lease.get("shard_end") == Some(&AttributeValue::Bool(false)));
    assert!(
        open.all(|lease| s(lease, "owner").is_empty()),
        "unfinished leases are released on stop"
    );
}

/// Kinesis Data Streams for DynamoDB stamps `ApproximateCreationDateTime` in microseconds unless
/// the table says MILLISECOND. Three conversations written two hours ago, in each form (the
/// precision named, or not and inferred), whose updates keep failing: each is given up as too
/// old (`max_record_age_seconds`), none retried forever.
#[tokio::test]
async fn record_ages_count_from_creation_times_in_either_precision() {
    let db = TestDb::new().await;
    let stream = db.kinesis_stream(1).await;
    let people = users(&["ta", "tb"]);
    let two_hours_ago = chrono::Utc::now() - chrono::Duration::hours(2);
    let forms = [
        (serde_json::json!(two_hours_ago.timestamp_micros()), Some("MICROSECOND")),
        (serde_json::json!(two_hours_ago.timestamp_micros()), None),
        (serde_json::json!(two_hours_ago.timestamp_millis()), Some("MILLISECOND")),
    ];
    for (index, (created, precision)) in forms.into_iter().enumerate() {
        let opened = format!("2024-06-0{}T00:00:00+00:00", index + 1);
        let group = db.conversation(&people[0], &people[1], &opened, "open").await;
        let later = format!("2024-06-0{}T00:00:01+00:00", index + 1);
        db.message(&group, &people[1], &later, "later").await;
        for (pk, sk) in [
            (format!("GRP#{}", people[0].uuid), opened.as_str()),
            (format!("GRP#{}", people[1].uuid), opened.as_str()),
            (format!("MSG#{group}"), opened.as_str()),
            (format!("MSG#{group}"), later.as_str()),
        ] {
            stream.publish_change(&db, &pk, sk, created.clone(), precision).await;
        }
    }
    let proxy = FaultProxy::failing("TransactWriteItems").await;
    let worker = db
        .start_kinesis_worker_via(
            &stream,
            &proxy.url(),
            &[("max_record_age_seconds", "60"), ("retry_max_attempts", "0")],
        )
        .await;
    let too_old = wait_until(Duration::from_secs(30), || async {
        worker
            .metric("stream_worker_dead_letters_total", r#"reason="record_too_old""#)
            .await
            >= 3.0
    })
    .await;
    assert!(
        too_old,
        "every update was given up as too old: {:#?}",
        db.dead_letters()
    );
    worker.stop().await;
    let letters = db.dead_letters();
    assert_eq!(letters.len(), 3, "{letters:#?}");
    assert!(letters.iter().all(|letter| letter.reason == "record_too_old"));
}

/// Kinesis answers GetShardIterator for a shard that no longer exists with ResourceNotFound:
/// the lease is finished (a gap counted), not retried forever, and the worker stops at once.
#[tokio::test]
async fn a_kinesis_shard_that_no_longer_exists_finishes_its_lease() {
    use cruddur_stream_worker::stream::{KinesisSource, ShardId};
    let db = TestDb::new().await;
    let stream = db.kinesis_stream(1).await;
    let groups = conversations(&db, &stream, 2).await;
    let expected = wave(&db, &stream, &groups, 1).await;
    let phantom = ShardId("shardId-000000000099".into());
    let source = crate::faults::Phantom {
        inner: KinesisSource::new(stream.client.clone(), &stream.name),
        shard: phantom.clone(),
    };
    let worker = db.start_worker_on(source, &[]).await;
    converge(&db, &expected).await;
    let finished = wait_until(Duration::from_secs(20), || async {
        db.leases()
            .await
            .get(&phantom.0)
            .is_some_and(|lease| lease.get("shard_end") == Some(&AttributeValue::Bool(true)))
    })
    .await;
    assert!(finished, "the gone shard's lease is finished: {:#?}", db.leases().await);
    assert_eq!(worker.metric("stream_worker_stream_gaps_total", "").await, 1.0);
    tokio::time::timeout(Duration::from_secs(10), worker.stop())
        .await
        .expect("stops at once");
}

/// One record that cannot be dead-lettered for now (the queue unreachable) holds the checkpoint
/// while 100 000 records of a conversation stream in behind it. The worker reads up to its
/// pending bound and waits there, its memory flat; without the bound it read them all and kept
/// every one waiting for the checkpoint.
#[tokio::test]
async fn behind_a_stuck_record_reading_waits_at_the_bound_and_memory_stays_flat() {
    let db = TestDb::new().await;
    let stream = db.kinesis_stream(1).await;
    let people = users(&["sta", "stb"]);
    let group = db
        .kinesis_conversation(&stream, &people[0], &people[1], "2024-03-01T00:00:00Z", "open")
        .await;
    let change = |sk: String, message: Option<String>| {
        let mut image = serde_json::json!({
            "pk": {"S": format!("MSG#{group}")}, "sk": {"S": sk},
            "user_uuid": {"S": people[1].uuid.clone()},
            "message_uuid": {"S": uuid::Uuid::new_v4().to_string()},
        });
        if let Some(message) = message {
            image["message"] = serde_json::json!({ "S": message });
        }
        serde_json::json!({
            "eventName": "INSERT",
            "dynamodb": {
                "Keys": {"pk": {"S": format!("MSG#{group}")}, "sk": image["sk"].clone()},
                "NewImage": image,
                "ApproximateCreationDateTime": chrono::Utc::now().timestamp_micros(),
            },
        })
    };
    // A poison record (no `message`) first, then the flood.
    let mut changes = vec![change("2024-03-01T00:00:00.5Z".into(), None)];
    let base = chrono::DateTime::parse_from_rfc3339("2024-03-01T00:00:01Z").expect("instant");
    changes.extend((0..100_000i64).map(|n| {
        let at = (base + chrono::Duration::milliseconds(n)).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        change(at, Some(format!("message {n}")))
    }));
    stream.publish_changes(&format!("MSG#{group}"), &changes).await;

    let queue = TestQueue::create().await;
    let sqs_down = FaultProxy::start(
        &crate::support::sqs_endpoint(),
        Faults {
            share: 1.0,
            kinds: vec![Fault::ServerError],
            target: None,
        },
    )
    .await;
    let sqs_down_url = sqs_down.url();
    let mut env = queue.worker_env(&sqs_down_url).to_vec();
    env.extend([
        ("WORKER_SOURCE", "kinesis"),
        ("WORKER_KINESIS_STREAM_NAME", stream.name.as_str()),
        ("WORKER_RETRY_MAX_DELAY_MS", "200"),
    ]);
    let mut worker = db.spawn_worker_process_with(&[], &env).await;
    // Reading goes on until the bound, then stands still (bounded: a minute at most).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = -1.0;
    let mut settled = false;
    while std::time::Instant::now() < deadline && !settled {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = worker.metric("stream_worker_records_received_total", "").await;
        settled = now > 0.0 && now == last;
        last = now;
    }
    let read = last;
    assert!(
        settled,
        "reading never stood still: {read} records read; {}",
        worker.log()
    );
    assert!(
        read < 40_000.0,
        "the worker read {read} of 100 003 records behind a stuck one (bound: 20 000 pending)"
    );
    let rss = worker.rss_bytes();
    assert!(rss < 64 << 20, "resident memory {} MiB", rss >> 20);
    worker.signal("KILL");
    worker.wait_exit().await;
}

/// Records all `workers` received so far.
async fn received(workers: &[crate::support::ChildWorker]) -> f64 {
    let mut total = 0.0;
    for worker in workers {
        total += worker.metric("stream_worker_records_received_total", "").await;
    }
    total
}

/// Four worker processes over 64 shards: one leader assigns 16 each; a graceful stop hands each
/// shard over after its final checkpoint (no record read twice), a kill -9 is taken over after
/// the lease duration, and lease counters never go backwards.
#[tokio::test]
async fn four_workers_share_sixty_four_shards_and_a_stop_hands_over_without_reading_twice() {
    let db = TestDb::new().await;
    let stream = db.kinesis_stream(64).await;
    let watch = LeaseWatch::start(&db);
    let groups = conversations(&db, &stream, 20).await;
    let mut published = 20.0 * 3.0;
    let mut workers = Vec::new();
    for id in ["alpha", "beta", "gamma", "delta"] {
        let args = kinesis_args(
            id,
            &stream.name,
            &[
                ("heartbeat_interval_ms", "200"),
                ("lease_take_interval_ms", "100"),
                ("idle_interval_ms", "200"),
                ("max_idle_interval_ms", "1000"),
            ],
        );
        workers.push(
            db.spawn_worker_process(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .await,
        );
    }
    shares_settle(&db, &[16, 16, 16, 16]).await;
    converge(&db, &wave(&db, &stream, &groups, 1).await).await;
    published += 20.0;
    let all_read = wait_until(Duration::from_secs(30), || async {
        received(&workers).await >= published
    })
    .await;
    assert!(
        all_read,
        "every record read: {} of {published}",
        received(&workers).await
    );

    // A graceful stop: its 16 shards go to the three others, each after its final checkpoint.
    let mut leaving = workers.pop().expect("delta");
    let read_by_leaver = leaving.metric("stream_worker_records_received_total", "").await;
    leaving.signal("TERM");
    assert_eq!(leaving.wait_exit().await.code(), Some(0));
    shares_settle(&db, &[21, 21, 22]).await;
    converge(&db, &wave(&db, &stream, &groups, 2).await).await;
    published += 20.0;
    let all_read = wait_until(Duration::from_secs(30), || async {
        received(&workers).await + read_by_leaver >= published
    })
    .await;
    assert!(all_read);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        received(&workers).await + read_by_leaver,
        published,
        "each record read once, through joins and hand-overs"
    );

    // A kill -9: its shards are taken over after the lease duration; nothing is lost.
    let mut dead = workers.pop().expect("gamma");
    dead.signal("KILL");
    dead.wait_exit().await;
    let expected = wave(&db, &stream, &groups, 3).await;
    shares_settle(&db, &[32, 32]).await;
    converge(&db, &expected).await;
    for worker in workers.iter_mut() {
        worker.signal("TERM");
        assert_eq!(worker.wait_exit().await.code(), Some(0));
    }
    watch.finish().await;
}
