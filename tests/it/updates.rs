//! What the worker does to group rows.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, FixedOffset, SubsecRound, TimeZone, Timelike, Utc};

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
    db.forget_checkpoints().await;
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

/// The app opens a conversation with both group rows at its writer's local offset: the first
/// message's own record puts them in the canonical form (and names the message), once.
#[tokio::test]
async fn a_new_conversation_takes_the_canonical_form_once_and_causes_no_error() {
    let db = TestDb::new().await;
    let people = users(&["eve", "fay"]);
    let opened = "2026-05-01T17:30:00.000001+05:30";
    let group = db.conversation(&people[0], &people[1], opened, "hi there").await;
    let worker = db.start_worker(&[]).await;
    db.wait_for_group(&group, opened, "hi there").await;
    db.wait_caught_up().await;
    assert_eq!(
        worker
            .metric("stream_worker_group_updates_total", r#"outcome="applied""#)
            .await,
        1.0
    );
    assert_eq!(worker.metric("stream_worker_dead_letters_total", "").await, 0.0);
    worker.stop().await;
    let rows = db.group_rows(&group).await;
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(s(row, "sk"), "2026-05-01T12:00:00.000001+00:00");
        assert_eq!(s(row, "message"), "hi there");
        assert!(!s(row, "message_uuid").is_empty(), "the row names its message");
    }

    // Replayed from the start, the message finds its rows already there.
    let settled = db.snapshot().await;
    db.forget_checkpoints().await;
    let worker = db.start_worker(&[]).await;
    db.wait_caught_up().await;
    assert_eq!(
        worker
            .metric("stream_worker_group_updates_total", r#"outcome="applied""#)
            .await,
        1.0,
        "nothing more applied (the metric is this process's)"
    );
    worker.stop().await;
    assert_eq!(db.snapshot().await, settled);
}

/// How the app's writers stamp a message: `isoformat()` of their local time, with `digits`
/// fractional digits (0 means none, as Python prints a zero microsecond); `Z` for `utc_z`.
fn stamp(at: DateTime<Utc>, offset_minutes: i32, digits: usize, utc_z: bool) -> String {
    let offset = FixedOffset::east_opt(offset_minutes * 60).expect("offset");
    let local = at.with_timezone(&offset);
    let mut text = local.format("%Y-%m-%dT%H:%M:%S").to_string();
    if digits > 0 {
        let nanos = format!("{:09}", local.nanosecond());
        text.push('.');
        text.push_str(&nanos[..digits]);
    }
    if utc_z {
        text.push('Z');
    } else {
        text.push_str(&local.format("%:z").to_string());
    }
    text
}

/// A writer: its offset at an instant (New York falls back from -04:00 to -05:00 at 06:00 UTC
/// on 2026-11-01), and whether it writes `Z`.
fn writer_offset(writer: usize, at: DateTime<Utc>) -> (i32, bool) {
    let fall_back = Utc.with_ymd_and_hms(2026, 11, 1, 6, 0, 0).single().expect("instant");
    match writer % 5 {
        0 => (330, false),
        1 => (if at < fall_back { -240 } else { -300 }, false),
        2 => (630, false),
        3 => (0, true),
        _ => (0, false),
    }
}

/// Writers at +05:30, -05:00 (and -04:00 before the fall-back hour), +10:30, `Z` and +00:00,
/// 0–9 fractional digits, messages in New York's repeated hour and across New Year: every user
/// lists their conversations, exactly as the app does, in the order of their last messages'
/// instants, and a new conversation lands on top.
#[tokio::test]
async fn the_app_lists_conversations_in_true_recency_order_whatever_the_writers_clocks() {
    let db = TestDb::new().await;
    let people = users(&["kol", "nyc", "adl", "zulu", "lon", "rdr"]);
    let pairs = [
        (0, 1),
        (0, 2),
        (1, 2),
        (3, 4),
        (5, 0),
        (5, 1),
        (5, 2),
        (5, 3),
        (5, 4),
        (3, 0),
        (4, 1),
        (2, 3),
    ];
    // Two clusters of instants: New York's repeated hour (05:00–07:00 UTC on 2026-11-01) and
    // New Year as every writer meets it (2026-12-31T12:00Z to 2027-01-01T06:00Z); within a
    // cluster every message has its own minute (53 is prime to both spans), odd fractions.
    let clusters = [
        (
            Utc.with_ymd_and_hms(2026, 11, 1, 5, 0, 0).single().expect("instant"),
            120,
        ),
        (
            Utc.with_ymd_and_hms(2026, 12, 31, 12, 0, 0).single().expect("instant"),
            1080,
        ),
    ];
    let mut counts = [0i64; 2];
    let mut digits = 0usize;
    let mut next_stamp = |writer: usize, conversation: usize| {
        let cluster = usize::from(conversation >= 7);
        let (base, span) = clusters[cluster];
        counts[cluster] += 1;
        digits += 1;
        let minutes = counts[cluster] * 53 % span;
        let at = base
            + chrono::Duration::minutes(minutes)
            + chrono::Duration::nanoseconds(digits as i64 * 123_456_789 % 1_000_000_000);
        let (offset, utc_z) = writer_offset(writer, at);
        stamp(at, offset, digits % 10, utc_z)
    };
    // The app's precision is the microsecond: a tenth digit and beyond are cut.
    let instant = |sk: &str| {
        DateTime::parse_from_rfc3339(sk)
            .expect("rfc 3339")
            .with_timezone(&Utc)
            .trunc_subsecs(6)
    };
    // Per conversation: group, participants, newest (instant, sk, text).
    let mut conversations = Vec::new();
    for (index, &(a, b)) in pairs.iter().enumerate() {
        let opened = next_stamp(a, index);
        let group = db
            .conversation(&people[a], &people[b], &opened, &format!("c{index} open"))
            .await;
        conversations.push((group, a, b, (instant(&opened), opened, format!("c{index} open"))));
    }
    let worker = db.start_worker(&[]).await;
    for step in 1..=3i64 {
        for (index, (group, a, b, newest)) in conversations.iter_mut().enumerate() {
            let sender = if step % 2 == 0 { *a } else { *b };
            let sk = next_stamp(sender, index);
            let text = format!("c{index} m{step}");
            db.message(group, &people[sender], &sk, &text).await;
            if instant(&sk) > newest.0 {
                *newest = (instant(&sk), sk, text);
            }
        }
    }
    // Last: a new conversation, from Kolkata, later than everything.
    let latest = Utc.with_ymd_and_hms(2027, 1, 1, 9, 0, 0).single().expect("instant");
    let opened = stamp(latest, 330, 6, false);
    let group = db.conversation(&people[0], &people[4], &opened, "brand new").await;
    conversations.push((group, 0, 4, (instant(&opened), opened, "brand new".to_owned())));
    for (group, _, _, (_, sk, text)) in &conversations {
        db.wait_for_group(group, sk, text).await;
    }
    worker.stop().await;

    for (person, user) in people.iter().enumerate() {
        let mut mine: Vec<(DateTime<Utc>, &str)> = conversations
            .iter()
            .filter(|(_, a, b, _)| *a == person || *b == person)
            .map(|(group, _, _, (at, _, _))| (*at, group.as_str()))
            .collect();
        mine.sort_by(|x, y| y.cmp(x));
        let mut listed = Vec::new();
        for year in ["2027", "2026"] {
            for row in app_list_message_groups(&db, &user.uuid, year).await {
                for name in [
                    "message_group_uuid",
                    "user_display_name",
                    "user_handle",
                    "message",
                    "sk",
                ] {
                    assert!(row.contains_key(name), "the app reads {name}: {row:?}");
                }
                let at = instant(s(&row, "sk"));
                assert_eq!(s(&row, "sk"), at.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string());
                listed.push((at, s(&row, "message_group_uuid").to_owned()));
            }
        }
        let listed: Vec<(DateTime<Utc>, &str)> = listed.iter().map(|(at, group)| (*at, group.as_str())).collect();
        assert_eq!(listed, mine, "{}'s conversations, as the app lists them", user.handle);
    }
}

/// The app's `list_message_groups`: `pk = GRP#<uuid> AND begins_with(sk, <year>)`, newest first
/// by raw string, 20 at most.
async fn app_list_message_groups(db: &TestDb, user_uuid: &str, year: &str) -> Vec<HashMap<String, AttributeValue>> {
    db.client
        .query()
        .table_name(&db.table)
        .key_condition_expression("pk = :pk AND begins_with(sk, :year)")
        .expression_attribute_values(":pk", AttributeValue::S(format!("GRP#{user_uuid}")))
        .expression_attribute_values(":year", AttributeValue::S(year.to_owned()))
        .scan_index_forward(false)
        .limit(20)
        .send()
        .await
        .expect("list message groups")
        .items
        .unwrap_or_default()
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
        .start_worker(&[("batch_size", "2"), ("read_ahead_bytes", read_ahead)])
        .await;
    db.wait_for_group(&group, "2024-07-01T00:00:09", "m9").await;
    let applied = worker
        .metric("stream_worker_group_updates_total", r#"outcome="applied""#)
        .await;
    worker.stop().await;
    applied
}

/// Under a backlog, full pages are folded before anything is written: the messages make one
/// update, not one per page.
#[tokio::test]
async fn a_backlog_read_ahead_makes_one_update_per_conversation() {
    assert_eq!(updates_for_a_paged_backlog("65536").await, 1.0);
}

/// The reference for the test above: without read-ahead, each page makes its own update.
#[tokio::test]
async fn without_read_ahead_each_page_makes_its_own_update() {
    assert!(updates_for_a_paged_backlog("0").await > 1.0);
}
