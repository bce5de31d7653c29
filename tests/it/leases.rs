//! The lease table's contract: one suite, run against DynamoDB Local and against the in-memory
//! twin the unit tests and simulations use. A rule the twin keeps and DynamoDB does not (or the
//! reverse) fails here, so the twin cannot drift.

use cruddur_stream_worker::stream::lease::{Assignment, BeatRefused, OwnedWrite};
use cruddur_stream_worker::stream::{
    DynamoDbLeaseTable, Lease, LeaseTable, Position, SequenceNumber, ShardId, StreamError,
};

use crate::support::TestDb;

/// Runs each rule against both tables: `dynamodb::<rule>` and `memory::<rule>`.
macro_rules! contract {
    ($($rule:ident),* $(,)?) => {
        mod dynamodb {
            $(#[tokio::test]
            async fn $rule() {
                super::$rule(super::dynamodb_table().await).await;
            })*
        }
        mod memory {
            $(#[tokio::test]
            async fn $rule() {
                super::$rule(cruddur_stream_worker::stream::MemoryLeaseTable::default()).await;
            })*
        }
    };
}

contract!(
    the_table_is_created_once,
    a_row_is_created_only_where_none_is,
    a_take_needs_the_counter_and_owner_as_seen,
    an_owners_write_needs_its_owner_and_its_counter,
    checkpoints_and_releases_keep_what_they_do_not_change,
    only_finished_rows_are_deleted,
    a_row_is_retired_only_if_nobody_wrote_it_since,
    of_two_workers_taking_one_row_one_wins,
    a_beat_needs_the_entry_as_last_written,
    leadership_is_claimed_only_from_the_term_seen,
    a_notification_may_name_only_the_stream,
    an_assignment_and_a_hand_over_round_trip,
    coordination_rows_are_not_leases,
);

static HORIZON: Position = Position::TrimHorizon;

/// An owner's write that moves only the counter (a checkpoint where the row already stands).
fn unmoved() -> OwnedWrite<'static> {
    OwnedWrite::Checkpoint {
        position: &HORIZON,
        shard_end: false,
    }
}

/// A table of its own on DynamoDB Local, not created yet.
async fn dynamodb_table() -> DynamoDbLeaseTable {
    let db = TestDb::empty().await;
    DynamoDbLeaseTable::new(db.client.clone(), db.lease_table.clone())
}

fn shard(id: &str) -> ShardId {
    ShardId(id.to_owned())
}

fn new_row(id: &str) -> Lease {
    Lease {
        shard: shard(id),
        checkpoint: Position::TrimHorizon,
        owner: None,
        parents: vec![shard("parent-a"), shard("parent-b")],
        shard_end: false,
        stream_id: Some("arn:stream/1".to_owned()),
        counter: 0,
    }
}

async fn created<T: LeaseTable>(table: &T, id: &str) -> Lease {
    table.ensure().await.expect("ensure");
    assert!(table.create(&new_row(id)).await.expect("create"));
    row(table, id).await.expect("row created")
}

async fn row<T: LeaseTable>(table: &T, id: &str) -> Option<Lease> {
    table.load_all().await.expect("load").remove(&shard(id))
}

async fn taken<T: LeaseTable>(table: &T, id: &str, owner: &str) -> Lease {
    let seen = created(table, id).await;
    table.take(&seen, owner).await.expect("take").expect("free row taken")
}

fn lost_to(result: Result<u64, StreamError>) -> String {
    match result {
        Err(StreamError::LeaseLost { owner, .. }) => owner,
        other => panic!("expected the lease lost, got {other:?}"),
    }
}

async fn the_table_is_created_once<T: LeaseTable>(table: T) {
    assert!(table.load_all().await.is_err(), "no table, no rows");
    assert!(table.ensure().await.expect("ensure"), "created");
    assert!(!table.ensure().await.expect("ensure again"), "already there");
    assert!(table.load_all().await.expect("load").is_empty());
}

async fn a_row_is_created_only_where_none_is<T: LeaseTable>(table: T) {
    let first = created(&table, "shard-1").await;
    assert_eq!(first, new_row("shard-1"), "every field as written");
    let mut again = new_row("shard-1");
    again.checkpoint = Position::After(SequenceNumber::parse("00042").expect("sequence"));
    assert!(!table.create(&again).await.expect("create again"), "not added twice");
    assert_eq!(row(&table, "shard-1").await, Some(first), "the first row stands");

    let mut latest = new_row("shard-2");
    latest.checkpoint = Position::decode("LATEST@2026-12-04T16:50:00.000Z").expect("position");
    latest.shard_end = true;
    latest.parents.clear();
    assert!(table.create(&latest).await.expect("create"));
    assert_eq!(row(&table, "shard-2").await, Some(latest));
}

async fn a_take_needs_the_counter_and_owner_as_seen<T: LeaseTable>(table: T) {
    let seen = created(&table, "shard-1").await;
    let mut stale = seen.clone();
    stale.counter += 1;
    assert_eq!(table.take(&stale, "w1").await.expect("take"), None, "counter moved");
    let mut wrong_owner = seen.clone();
    wrong_owner.owner = Some("w9".into());
    assert_eq!(
        table.take(&wrong_owner, "w1").await.expect("take"),
        None,
        "owner differs"
    );

    let mine = table.take(&seen, "w1").await.expect("take").expect("free row taken");
    assert_eq!(mine.owner.as_deref(), Some("w1"));
    assert_eq!(mine.counter, seen.counter + 1);
    assert_eq!(table.take(&seen, "w2").await.expect("take"), None, "taken since seen");

    let stolen = table
        .take(&mine, "w2")
        .await
        .expect("steal")
        .expect("owned row taken as seen");
    assert_eq!(stolen.owner.as_deref(), Some("w2"));
    assert_eq!(stolen.counter, mine.counter + 1);
    assert_eq!(
        table.take(&new_row("no-such-shard"), "w1").await.expect("take"),
        None,
        "no row"
    );
}

async fn an_owners_write_needs_its_owner_and_its_counter<T: LeaseTable>(table: T) {
    let mine = taken(&table, "shard-1", "w1").await;
    let id = &mine.shard;
    let renewed = table.write(id, "w1", mine.counter, unmoved()).await.expect("renew");
    assert_eq!(renewed, mine.counter + 1);
    assert_eq!(row(&table, "shard-1").await.map(|row| row.counter), Some(renewed));

    // The counter is the proof: an owner's write at a counter it did not produce last is lost,
    // though the name matches (a restarted or twin worker of the same id).
    let stale = table.write(id, "w1", mine.counter, unmoved()).await;
    assert_eq!(lost_to(stale), "w1");
    let position = Position::After(SequenceNumber::parse("00042").expect("sequence"));
    let checkpoint = OwnedWrite::Checkpoint {
        position: &position,
        shard_end: false,
    };
    assert_eq!(
        lost_to(table.write(id, "w2", renewed, checkpoint).await),
        "w1",
        "not the owner"
    );
    assert_eq!(
        row(&table, "shard-1").await.map(|row| row.checkpoint),
        Some(Position::TrimHorizon)
    );
    assert_eq!(
        lost_to(table.write(&shard("no-such-shard"), "w1", 0, unmoved()).await),
        "nobody"
    );
}

async fn checkpoints_and_releases_keep_what_they_do_not_change<T: LeaseTable>(table: T) {
    let mine = taken(&table, "shard-1", "w1").await;
    let position = Position::After(SequenceNumber::parse("00042").expect("sequence"));
    let checkpoint = OwnedWrite::Checkpoint {
        position: &position,
        shard_end: true,
    };
    let counter = table
        .write(&mine.shard, "w1", mine.counter, checkpoint)
        .await
        .expect("checkpoint");
    let after = row(&table, "shard-1").await.expect("row");
    assert_eq!(
        (after.checkpoint.clone(), after.shard_end, after.counter),
        (position.clone(), true, counter)
    );
    assert_eq!(
        (after.parents, after.stream_id),
        (mine.parents.clone(), mine.stream_id.clone())
    );

    let released = table
        .write(&mine.shard, "w1", counter, OwnedWrite::Release)
        .await
        .expect("release");
    let after = row(&table, "shard-1").await.expect("row");
    assert_eq!(
        (after.owner, after.counter, after.checkpoint),
        (None, released, position)
    );
    assert_eq!(
        lost_to(table.write(&mine.shard, "w1", released, unmoved()).await),
        "nobody",
        "released is released"
    );
}

async fn only_finished_rows_are_deleted<T: LeaseTable>(table: T) {
    let mine = taken(&table, "shard-1", "w1").await;
    assert!(!table.delete_finished(&mine.shard).await.expect("delete"), "unfinished");
    assert!(row(&table, "shard-1").await.is_some());
    let end = Position::TrimHorizon;
    let finish = OwnedWrite::Checkpoint {
        position: &end,
        shard_end: true,
    };
    table
        .write(&mine.shard, "w1", mine.counter, finish)
        .await
        .expect("finish");
    assert!(table.delete_finished(&mine.shard).await.expect("delete"), "finished");
    assert!(row(&table, "shard-1").await.is_none());
    assert!(!table.delete_finished(&mine.shard).await.expect("delete"), "no row");
}

async fn a_row_is_retired_only_if_nobody_wrote_it_since<T: LeaseTable>(table: T) {
    let seen = taken(&table, "shard-1", "w1").await;
    table
        .write(&seen.shard, "w1", seen.counter, unmoved())
        .await
        .expect("renew");
    assert!(!table.retire(&seen).await.expect("retire"), "renewed since seen");
    assert!(row(&table, "shard-1").await.is_some());
    let now = row(&table, "shard-1").await.expect("row");
    assert!(table.retire(&now).await.expect("retire"), "as seen");
    assert!(row(&table, "shard-1").await.is_none());
    assert!(!table.retire(&now).await.expect("retire"), "no row");
}

async fn of_two_workers_taking_one_row_one_wins<T: LeaseTable>(table: T) {
    let seen = created(&table, "shard-1").await;
    let (one, two) = tokio::join!(table.take(&seen, "w1"), table.take(&seen, "w2"));
    let winners: Vec<Lease> = [one, two]
        .into_iter()
        .filter_map(|taken| taken.expect("take"))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one take succeeds");
    assert_eq!(row(&table, "shard-1").await, winners.into_iter().next());
}

async fn a_beat_needs_the_entry_as_last_written<T: LeaseTable>(table: T) {
    table.ensure().await.expect("ensure");
    let fleet = table.beat("w1", None, 5, false).await.expect("beat").expect("joined");
    assert_eq!(fleet.beats.get("w1"), Some(&5));
    let fleet = table
        .beat("w1", Some(5), 6, false)
        .await
        .expect("beat")
        .expect("beats on");
    assert_eq!(fleet.beats.get("w1"), Some(&6));
    table.beat("w2", None, 1, true).await.expect("beat").expect("joined");
    assert_eq!(
        table.beat("w1", Some(5), 7, false).await.expect("beat"),
        Err(BeatRefused::Twin),
        "another process wrote w1's entry"
    );
    assert!(!table.remove_member("w1", 5).await.expect("remove"), "not as seen");
    assert!(table.remove_member("w1", 6).await.expect("remove"));
    assert_eq!(
        table.beat("w1", Some(6), 7, false).await.expect("beat"),
        Err(BeatRefused::Evicted)
    );
    let fleet = table
        .beat("w2", Some(1), 2, false)
        .await
        .expect("beat")
        .expect("beats on");
    assert!(!fleet.beats.contains_key("w1"));
    assert!(
        fleet.leaving.contains("w2"),
        "a leaving mark stays until the member is removed"
    );
}

async fn leadership_is_claimed_only_from_the_term_seen<T: LeaseTable>(table: T) {
    table.ensure().await.expect("ensure");
    assert!(table.claim_leadership("w1", None, 0).await.expect("claim"));
    assert!(
        !table.claim_leadership("w2", None, 0).await.expect("claim"),
        "w1 got there first"
    );
    assert!(
        !table.claim_leadership("w2", Some("w1"), 0).await.expect("claim"),
        "an old term"
    );
    assert!(table.claim_leadership("w2", Some("w1"), 1).await.expect("claim"));
    table.resign("w1", 1).await.expect("resign");
    let fleet = table.beat("w3", None, 1, false).await.expect("beat").expect("joined");
    assert_eq!(
        (fleet.leader.as_deref(), fleet.term),
        (Some("w2"), 2),
        "a stale resign changes nothing"
    );
    table.resign("w2", 2).await.expect("resign");
    table
        .notify(&["w3".to_owned()], Some("arn:stream/1"))
        .await
        .expect("notify");
    table.mark_changed().await.expect("changed");
    let fleet = table
        .beat("w3", Some(1), 2, false)
        .await
        .expect("beat")
        .expect("beats on");
    assert_eq!(fleet.leader, None);
    assert_eq!(fleet.epochs.get("w3"), Some(&1));
    assert_eq!(fleet.changes, 1);
    assert_eq!(fleet.stream_id.as_deref(), Some("arn:stream/1"));
}

/// A leader that finds a new stream with no worker to wake records the stream alone.
async fn a_notification_may_name_only_the_stream<T: LeaseTable>(table: T) {
    table.ensure().await.expect("ensure");
    table.notify(&[], Some("arn:stream/2")).await.expect("notify");
    let fleet = table.beat("w1", None, 1, false).await.expect("beat").expect("joined");
    assert_eq!(fleet.stream_id.as_deref(), Some("arn:stream/2"));
    assert!(fleet.epochs.is_empty(), "nobody woken: {:?}", fleet.epochs);
}

async fn an_assignment_and_a_hand_over_round_trip<T: LeaseTable>(table: T) {
    let seen = created(&table, "shard-1").await;
    assert_eq!(table.assignment("w1").await.expect("read"), Assignment::default());
    let assignment = Assignment {
        shards: vec![shard("shard-1"), shard("shard-2")],
        give: [(shard("shard-3"), "w2".to_owned())].into(),
        receive: [(shard("shard-2"), "w3".to_owned())].into(),
    };
    table.put_assignment("w1", &assignment).await.expect("write");
    assert_eq!(table.assignment("w1").await.expect("read"), assignment);
    let taken = table.take(&seen, "w1").await.expect("take").expect("taken");
    let counter = table
        .write(&taken.shard, "w1", taken.counter, OwnedWrite::HandOver { to: "w2" })
        .await
        .expect("handed over");
    let now = table.get(&shard("shard-1")).await.expect("get").expect("row");
    assert_eq!((now.owner.as_deref(), now.counter), (Some("w2"), counter));
    assert_eq!(now.checkpoint, seen.checkpoint, "the checkpoint goes with it");
    assert_eq!(lost_to(table.write(&taken.shard, "w1", counter, unmoved()).await), "w2");
}

async fn coordination_rows_are_not_leases<T: LeaseTable>(table: T) {
    created(&table, "shard-1").await;
    table.beat("w1", None, 1, false).await.expect("beat").expect("joined");
    table.put_assignment("w1", &Assignment::default()).await.expect("write");
    let rows = table.load_all().await.expect("scan");
    assert_eq!(rows.keys().cloned().collect::<Vec<_>>(), vec![shard("shard-1")]);
}
