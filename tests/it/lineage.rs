//! Shard lineage on the real DynamoDB Local: shards closed on demand through the test launcher.

use aws_sdk_dynamodb::types::AttributeValue;
use cruddur_stream_worker::stream::Position;

use crate::support::{s, users, TestDb};

#[tokio::test]
async fn parents_are_read_to_their_end_before_children_and_new_shards_are_picked_up() {
    let db = TestDb::new().await;
    let people = users(&["bo", "cy"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-01-01T00:00:00", "open")
        .await;
    let at = |minute: u32| format!("2024-01-01T00:{minute:02}:00");
    for minute in 1..=3 {
        db.message(&group, &people[0], &at(minute), &format!("minute {minute}"))
            .await;
    }
    db.rollover().await;
    for minute in 4..=6 {
        db.message(&group, &people[1], &at(minute), &format!("minute {minute}"))
            .await;
    }
    // A closed parent and an open child exist before the worker starts.
    let worker = db.start_worker(&[]).await;
    db.wait_for_group(&group, &at(6), "minute 6").await;

    // The open shard closes while the worker reads it; a third generation appears.
    db.rollover().await;
    for minute in 7..=9 {
        db.message(&group, &people[0], &at(minute), &format!("minute {minute}"))
            .await;
    }
    db.wait_for_group(&group, &at(9), "minute 9").await;
    db.wait_caught_up().await;
    let report = worker.stop().await;

    let leases = db.leases().await;
    assert_eq!(leases.len(), 3, "three generations of shards: {leases:#?}");
    let mut by_parent = std::collections::HashMap::new();
    for lease in leases.values() {
        let parents = match lease.get("parent_shard_ids") {
            Some(AttributeValue::L(parents)) => parents.iter().filter_map(|p| p.as_s().ok().cloned()).collect(),
            _ => Vec::new(),
        };
        by_parent.insert(
            parents.first().cloned().unwrap_or_default(),
            s(lease, "shard_id").to_owned(),
        );
    }
    let first = by_parent[""].clone();
    let second = by_parent[&first].clone();
    let third = by_parent[&second].clone();
    for closed in [&first, &second] {
        assert_eq!(
            leases[closed].get("shard_end"),
            Some(&AttributeValue::Bool(true)),
            "{closed} read to its end"
        );
    }
    assert_eq!(leases[&third].get("shard_end"), Some(&AttributeValue::Bool(false)));

    // Each generation started only after its parent's reader finished, and each record was read
    // once, in one shard.
    let reader = |shard: &str| {
        report
            .shards
            .iter()
            .find(|r| r.shard.0 == shard)
            .expect("a report per shard")
            .clone()
    };
    let (one, two, three) = (reader(&first), reader(&second), reader(&third));
    assert!(one.ended && two.ended && !three.ended);
    assert!(two.started_at >= one.finished_at, "the child waited for its parent");
    assert!(
        three.started_at >= two.finished_at,
        "the grandchild waited for its parent"
    );
    let last = |r: &cruddur_stream_worker::stream::ShardReport| r.last.clone().expect("records");
    assert!(two.first.clone().expect("records") > last(&one));
    assert!(three.first.clone().expect("records") > last(&two));
    assert_eq!(
        report.records(),
        db.stream_records().await.len() as u64,
        "every record read exactly once"
    );
    assert_eq!(two.checkpoint, Some(Position::After(last(&two))));
}

/// Back after more than a day down: the lease rows name shards long trimmed (here an unfinished
/// one of this very stream), and no listed shard has a row. The stream is not fresh: with
/// `starting_position = LATEST` the listed shard still starts at the horizon (nothing retained
/// is skipped), the gap is counted and logged once, and the orphaned row is retired. (Locally the
/// skip itself cannot show: DynamoDB Local stamps records to the minute, and a resolved LATEST
/// keeps the records of its own minute; `lineage::is_fresh`'s unit test covers that decision.)
#[tokio::test]
async fn after_an_outage_past_the_retention_the_gap_is_reported_and_nothing_retained_is_skipped() {
    use cruddur_stream_worker::stream::{LeaseStore, SequenceNumber, ShardId, ShardInfo, StreamSource};
    let db = TestDb::new().await;
    let people = users(&["oa", "ob"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-12-01T00:00:00Z", "open")
        .await;
    db.message(&group, &people[1], "2024-12-01T00:00:01Z", "while we were down")
        .await;
    let described = db.stream_source().describe().await.expect("describe");
    let earlier = LeaseStore::dynamodb(db.client.clone(), &db.lease_table, "a-worker-of-yesterday");
    earlier.ensure_table().await.expect("lease table");
    let gone = ShardInfo {
        id: ShardId("shardId-00000001700000000000-0ld5ba4d".into()),
        parents: vec![],
        closed: false,
    };
    let checkpoint = Position::After(SequenceNumber::parse("000000000000000000100").expect("digits"));
    earlier
        .create(&described.stream_id, &gone, &checkpoint, false)
        .await
        .expect("an orphaned row");

    let worker = db.start_worker(&[("starting_position", "LATEST")]).await;
    db.wait_for_group(&group, "2024-12-01T00:00:01Z", "while we were down")
        .await;
    let retired = crate::support::wait_until(std::time::Duration::from_secs(20), || async {
        !db.leases().await.contains_key(&gone.id.0)
    })
    .await;
    assert!(retired, "the orphaned row is retired: {:#?}", db.leases().await);
    assert_eq!(worker.metric("stream_worker_stream_gaps_total", "").await, 1.0);
    worker.stop().await;
}

/// `LATEST` is resolved once and stored so: a worker that stops before its first checkpoint
/// hands over a position that skips nothing written after it started.
#[tokio::test]
async fn latest_is_stored_resolved_so_a_handoff_skips_nothing() {
    let db = TestDb::new().await;
    let people = users(&["la", "lb"]);
    let first = db.start_worker(&[("starting_position", "LATEST")]).await;
    let stored = crate::support::wait_until(std::time::Duration::from_secs(20), || async {
        !db.leases().await.is_empty()
    })
    .await;
    assert!(stored, "the lease row exists");
    first.stop().await;
    for lease in db.leases().await.values() {
        let checkpoint = s(lease, "checkpoint");
        assert!(checkpoint.starts_with("LATEST@"), "never a bare LATEST: {checkpoint}");
    }
    // Written between the two workers: after the first asked for LATEST.
    let group = db
        .conversation(&people[0], &people[1], "2024-12-02T00:00:00Z", "open")
        .await;
    db.message(&group, &people[1], "2024-12-02T00:00:01Z", "in the handoff")
        .await;
    let second = db.start_worker(&[("starting_position", "LATEST")]).await;
    db.wait_for_group(&group, "2024-12-02T00:00:01Z", "in the handoff")
        .await;
    second.stop().await;
}
