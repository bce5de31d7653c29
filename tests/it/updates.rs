//! What the worker does to group rows.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::support::{s, users, TestDb};

#[tokio::test]
async fn a_message_moves_both_group_rows_and_keeps_unknown_attributes() {
    let db = TestDb::new().await;
    let people = users(&["ana", "ben"]);
    let group = db
        .conversation(&people[0], &people[1], "2023-03-20T22:52:11.123456+00:00", "first")
        .await;
    // Attributes the worker does not know, on both rows (written as the app might one day).
    for mut row in db.group_rows(&group).await {
        row.insert("pinned".into(), AttributeValue::Bool(true));
        row.insert("labels".into(), AttributeValue::Ss(vec!["work".into()]));
        db.client
            .put_item()
            .table_name(&db.table)
            .set_item(Some(row))
            .send()
            .await
            .expect("add attributes");
    }
    db.message(&group, &people[1], "2023-03-21T08:00:00.5+00:00", "second")
        .await;

    let worker = db.start_worker(&[]).await;
    db.wait_for_group(&group, "2023-03-21T08:00:00.5+00:00", "second").await;
    let rows = db.group_rows(&group).await;
    assert_eq!(rows.len(), 2, "exactly one row per participant");
    let by_owner: HashMap<&str, _> = rows.iter().map(|row| (s(row, "pk"), row)).collect();
    for (owner, other) in [(&people[0], &people[1]), (&people[1], &people[0])] {
        let row = by_owner[format!("GRP#{}", owner.uuid).as_str()];
        assert_eq!(s(row, "user_uuid"), other.uuid, "the other participant stays");
        assert_eq!(s(row, "user_handle"), other.handle);
        assert_eq!(s(row, "message_group_uuid"), group);
        assert_eq!(
            row.get("pinned"),
            Some(&AttributeValue::Bool(true)),
            "unknown attributes survive"
        );
        assert_eq!(row.get("labels"), Some(&AttributeValue::Ss(vec!["work".into()])));
    }
    assert_eq!(
        worker
            .metric("stream_worker_group_updates_total", r#"outcome="applied""#)
            .await,
        1.0
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_burst_over_many_groups_ends_with_one_row_per_participant_at_the_newest_message() {
    let db = TestDb::new().await;
    let people = users(&["p0", "p1", "p2", "p3", "p4", "p5"]);
    let mut expected = Vec::new();
    let mut groups = Vec::new();
    // Group rows are keyed by (owner, time of last message): a user's conversations never share
    // a timestamp in the app (microseconds), so every conversation here has its own second.
    for index in 0..12 {
        let (a, b) = (&people[index % 6], &people[(index + 1 + index / 6) % 6]);
        let opened = format!("2023-01-01T00:00:{index:02}+00:00");
        groups.push((db.conversation(a, b, &opened, "hello").await, a.clone(), b.clone()));
    }
    // Several messages per group, written out of time order and in mixed forms, all before the
    // worker starts so they arrive in one batch.
    let forms = [
        "2023-02-0{d}T10:00:{s}",
        "2023-02-0{d}T15:30:{s}+05:30",
        "2023-02-0{d}T10:00:{s}.250000+00:00",
    ];
    for (index, (group, a, b)) in groups.iter().enumerate() {
        let days = [3, 1, 5, 2, 4];
        let mut newest = (chrono::DateTime::<chrono::Utc>::MIN_UTC, String::new(), String::new());
        for (step, day) in days.iter().enumerate() {
            let sk = forms[(index + step) % forms.len()]
                .replace("{d}", &day.to_string())
                .replace("{s}", &format!("{index:02}"));
            let text = format!("group {index} message {step}");
            db.message(group, if step % 2 == 0 { a } else { b }, &sk, &text).await;
            let at = cruddur_stream_worker::groups::timestamp::parse(&sk).expect("valid");
            if at > newest.0 {
                newest = (at, sk, text);
            }
        }
        expected.push((group.clone(), newest.1, newest.2));
    }
    let worker = db.start_worker(&[("max_in_flight", "4")]).await;
    // And more while it runs: a second wave to half the groups, newer than anything before.
    let second_wave = |index: usize| format!("2023-03-01T00:00:{index:02}Z");
    for (index, (group, a, _)) in groups.iter().enumerate().step_by(2) {
        db.message(group, a, &second_wave(index), "second wave").await;
    }
    for (index, (group, sk, text)) in expected.iter().enumerate() {
        if index % 2 == 0 {
            db.wait_for_group(group, &second_wave(index), "second wave").await;
        } else {
            db.wait_for_group(group, sk, text).await;
        }
    }
    assert!(
        worker.metric("stream_worker_records_coalesced_total", "").await > 0.0,
        "same-batch messages coalesce"
    );
    worker.stop().await;
    // Nothing else appeared: 12 conversations, 2 rows each.
    let all = db.snapshot().await;
    assert_eq!(all.iter().filter(|item| item["pk"].contains("GRP#")).count(), 24);
}

#[tokio::test]
async fn replays_and_late_records_change_nothing_and_offsets_order_by_instant() {
    let db = TestDb::new().await;
    let people = users(&["cat", "dan"]);
    let group = db
        .conversation(&people[0], &people[1], "2023-03-22T08:00:00", "opening")
        .await;
    db.message(&group, &people[0], "2023-03-22T10:00:00", "ten utc").await;
    // Later as a string, earlier as an instant (09:06 UTC): must not win.
    db.message(
        &group,
        &people[1],
        "2023-03-22T14:36:25.547845+05:30",
        "nine oh six utc",
    )
    .await;
    let worker = db.start_worker(&[]).await;
    db.wait_for_group(&group, "2023-03-22T10:00:00", "ten utc").await;

    // A late record, arriving after the newer one was applied.
    db.message(&group, &people[1], "2023-03-22T09:59:59.999999+00:00", "late")
        .await;
    // Then a genuinely newer one in an offset form: 10:30 UTC.
    db.message(&group, &people[0], "2023-03-22T16:00:00+05:30", "ten thirty utc")
        .await;
    db.wait_for_group(&group, "2023-03-22T16:00:00+05:30", "ten thirty utc")
        .await;
    // Both workers share this process's metrics: compare against the counts so far.
    let applied_before = worker
        .metric("stream_worker_group_updates_total", r#"outcome="applied""#)
        .await;
    let stale_before = worker
        .metric("stream_worker_group_updates_total", r#"outcome="stale""#)
        .await;
    assert!(applied_before >= 2.0, "the newer messages were applied");
    worker.stop().await;
    let settled = db.snapshot().await;

    // Replay the whole stream from the start: forget every checkpoint.
    db.client
        .delete_table()
        .table_name(&db.lease_table)
        .send()
        .await
        .expect("drop leases");
    let worker = db.start_worker(&[]).await;
    db.wait_caught_up().await;
    let stale = worker
        .metric("stream_worker_group_updates_total", r#"outcome="stale""#)
        .await;
    assert!(stale > stale_before, "the replayed messages were found stale");
    let applied = worker
        .metric("stream_worker_group_updates_total", r#"outcome="applied""#)
        .await;
    assert_eq!(applied, applied_before, "the replay applied nothing");
    let report = worker.stop().await;
    assert!(report.records() >= 5, "the replay re-read the stream");
    assert_eq!(db.snapshot().await, settled, "a replay changes nothing");
}

#[tokio::test]
async fn a_new_conversation_needs_no_change_and_causes_no_error() {
    let db = TestDb::new().await;
    let people = users(&["eve", "fay"]);
    let group = db
        .conversation(&people[0], &people[1], "2023-05-01T12:00:00.000001+00:00", "hi there")
        .await;
    let before = db.snapshot().await;
    let worker = db.start_worker(&[]).await;
    db.wait_caught_up().await;
    assert_eq!(
        worker.metric("stream_worker_group_updates_total", "").await,
        1.0,
        "the first message was handled"
    );
    assert_eq!(
        worker
            .metric("stream_worker_group_updates_total", r#"outcome="applied""#)
            .await,
        0.0
    );
    assert_eq!(worker.metric("stream_worker_dead_letters_total", "").await, 0.0);
    worker.stop().await;
    assert_eq!(db.snapshot().await, before);
    let rows = db.group_rows(&group).await;
    assert!(rows
        .iter()
        .all(|row| s(row, "sk") == "2023-05-01T12:00:00.000001+00:00" && s(row, "message") == "hi there"));
}

/// A conversation's messages spread over many GetRecords pages; how many updates they make.
async fn updates_for_a_paged_backlog(read_ahead: &str) -> f64 {
    let db = TestDb::new().await;
    let people = users(&["ra1", "ra2"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-07-01T00:00:00", "open")
        .await;
    for n in 1..=9 {
        db.message(
            &group,
            &people[n % 2],
            &format!("2024-07-01T00:00:0{n}"),
            &format!("m{n}"),
        )
        .await;
    }
    let worker = db
        .start_worker(&[("batch_size", "2"), ("read_ahead_records", read_ahead)])
        .await;
    db.wait_for_group(&group, "2024-07-01T00:00:09", "m9").await;
    let applied = worker
        .metric("stream_worker_group_updates_total", r#"outcome="applied""#)
        .await;
    worker.stop().await;
    applied
}

/// Under a backlog, full pages are read ahead: the messages make one update, not one per page.
#[tokio::test]
async fn a_backlog_read_ahead_makes_one_update_per_conversation() {
    assert_eq!(updates_for_a_paged_backlog("100").await, 1.0);
}

/// The reference for the test above: without read-ahead, each page makes its own update.
#[tokio::test]
async fn without_read_ahead_each_page_makes_its_own_update() {
    assert!(updates_for_a_paged_backlog("2").await > 1.0);
}
