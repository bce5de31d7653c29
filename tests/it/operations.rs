//! How the worker runs: checkpoints, restarts, what it ignores, metrics, readiness, signals,
//! configuration errors, and the CLI.

use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use cruddur_stream_worker::stream::SequenceNumber;

use crate::support::{s, users, wait_until, TestDb};

fn sequence(text: &str) -> SequenceNumber {
    SequenceNumber::parse(text).expect("sequence number")
}

#[tokio::test]
async fn a_restart_resumes_after_the_checkpoint() {
    let db = TestDb::new().await;
    let people = users(&["gus", "hal", "ivy", "jan"]);
    // A user's conversations never share a timestamp (group rows are keyed by it): the
    // seconds field tells the conversations apart.
    let mut groups = Vec::new();
    for (index, pair) in [(0, 1), (0, 2), (1, 3), (2, 3)].into_iter().enumerate() {
        let opened = format!("2023-01-01T00:00:{index:02}");
        groups.push(
            db.conversation(&people[pair.0], &people[pair.1], &opened, "start")
                .await,
        );
    }
    for round in 0..40 {
        for (index, group) in groups.iter().enumerate() {
            let sk = format!("2023-01-02T00:{round:02}:{index:02}");
            db.message(group, &people[0], &sk, &format!("round {round}")).await;
        }
    }
    // Small batches and little concurrency so that the stop lands mid-stream.
    let worker = db
        .start_worker(&[
            ("batch_size", "7"),
            ("read_ahead_bytes", "0"),
            ("max_in_flight", "1"),
            ("checkpoint_interval_ms", "0"),
        ])
        .await;
    let started = wait_until(Duration::from_secs(30), || async {
        db.leases()
            .await
            .values()
            .any(|lease| s(lease, "checkpoint").bytes().all(|b| b.is_ascii_digit()))
    })
    .await;
    assert!(started, "a checkpoint was written");
    let first = worker.stop().await;
    let written = db.stream_records().await.len();
    assert!(
        (first.records() as usize) < written,
        "the stop landed mid-stream ({} of {written} read)",
        first.records()
    );
    let leases = db.leases().await;
    assert_eq!(leases.len(), 1, "DynamoDB Local streams have one shard");
    let lease = leases.values().next().expect("lease");
    let checkpoint = sequence(s(lease, "checkpoint"));
    assert_eq!(s(lease, "owner"), "", "a graceful stop releases the lease");
    assert_eq!(lease.get("shard_end"), Some(&AttributeValue::Bool(false)));
    let first_last = first.shards[0].last.clone().expect("read something");
    assert_eq!(checkpoint, first_last, "a graceful stop checkpoints everything it read");

    // More messages while it is down, then start again.
    let resumed = |index: usize| format!("2023-01-03T00:00:{index:02}");
    for (index, group) in groups.iter().enumerate() {
        db.message(group, &people[3], &resumed(index), "after the restart")
            .await;
    }
    let worker = db.start_worker(&[]).await;
    for (index, group) in groups.iter().enumerate() {
        db.wait_for_group(group, &resumed(index), "after the restart").await;
    }
    // Let it read its own last rewrites too, so that the stream's end is where it stopped.
    db.wait_caught_up().await;
    let second = worker.stop().await;
    let resumed_at = second.shards[0].first.clone().expect("read something");
    assert!(
        resumed_at > checkpoint,
        "nothing at or before the checkpoint is read again"
    );
    let expected_after: usize = db
        .stream_records()
        .await
        .iter()
        .filter(|record| sequence(&record.sequence) > checkpoint)
        .count();
    assert_eq!(
        second.records() as usize,
        expected_after,
        "the second run read exactly what followed the checkpoint"
    );
}

#[tokio::test]
async fn removes_modifies_and_group_rows_are_ignored_and_counted() {
    let db = TestDb::new().await;
    let people = users(&["kim", "lou"]);
    let group = db
        .conversation(&people[0], &people[1], "2023-06-01T00:00:00", "open")
        .await;
    db.message(&group, &people[1], "2023-06-01T00:01:00", "edited soon")
        .await;
    // MODIFY: the app edits a message in place. REMOVE: it deletes one.
    db.message(&group, &people[1], "2023-06-01T00:01:00", "edited").await;
    db.client
        .delete_item()
        .table_name(&db.table)
        .key("pk", AttributeValue::S(format!("MSG#{group}")))
        .key("sk", AttributeValue::S("2023-06-01T00:00:00".into()))
        .send()
        .await
        .expect("delete message");
    let worker = db.start_worker(&[]).await;
    let counted = wait_until(Duration::from_secs(30), || async {
        worker
            .metric("stream_worker_records_ignored_total", r#"reason="remove""#)
            .await
            >= 1.0
            && worker
                .metric("stream_worker_records_ignored_total", r#"reason="modify""#)
                .await
                >= 1.0
            && worker
                .metric("stream_worker_records_ignored_total", r#"reason="group_row""#)
                .await
                >= 2.0
    })
    .await;
    assert!(counted, "each kind is counted under its reason");
    assert_eq!(
        worker
            .metric("stream_worker_records_received_total", r#"event="modify""#)
            .await,
        1.0
    );
    // The edit did not move the rows: only the insert did.
    db.wait_for_group(&group, "2023-06-01T00:01:00", "edited soon").await;
    worker.stop().await;
}

#[tokio::test]
async fn metrics_parse_and_move_and_readiness_waits_for_the_stream() {
    let db = TestDb::empty().await;
    let worker = db.start_worker(&[]).await;
    assert_eq!(worker.get("/healthz").await.0, 200);
    let (status, body) = worker.get("/readyz").await;
    assert_eq!(status, 503, "no table, no stream: not ready ({body})");

    cruddur_stream_worker::groups::admin::create_messages_table(&db.client, &db.table)
        .await
        .expect("create table");
    let ready = wait_until(Duration::from_secs(30), || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;
    assert!(ready, "ready once the stream is read");
    assert!(
        !db.leases().await.is_empty(),
        "the worker created the lease table and a lease"
    );

    let before = worker.metric("stream_worker_records_received_total", "").await;
    let people = users(&["max", "ned"]);
    let group = db
        .conversation(&people[0], &people[1], "2023-07-01T00:00:00", "one")
        .await;
    db.message(&group, &people[0], "2023-07-01T00:00:01", "two").await;
    db.wait_for_group(&group, "2023-07-01T00:00:01", "two").await;
    let after = worker.metric("stream_worker_records_received_total", "").await;
    assert!(
        after >= before + 4.0,
        "records_received_total moved from {before} to {after}"
    );

    // The rows are visible a moment before the updater counts its outcome.
    let counted = wait_until(Duration::from_secs(30), || async {
        worker.metric("stream_worker_group_updates_total", "").await >= 1.0
    })
    .await;
    assert!(counted, "the update was counted");
    let (status, body) = worker.get("/metrics").await;
    assert_eq!(status, 200);
    assert_prometheus_text(&body);
    for name in [
        "stream_worker_records_received_total",
        "stream_worker_records_ignored_total",
        "stream_worker_group_updates_total",
        "stream_worker_checkpoints_total",
        "stream_worker_iterator_age_seconds",
        "stream_worker_processing_lag_seconds",
        "stream_worker_getrecords_duration_seconds",
        "stream_worker_group_update_duration_seconds",
        "stream_worker_in_flight",
    ] {
        assert!(body.contains(&format!("# HELP {name} ")), "{name} is described");
        assert!(
            body.lines()
                .any(|line| line.starts_with(name) && !line.starts_with('#')),
            "{name} has a sample"
        );
    }
    worker.stop().await;
}

/// Every line is a comment (`# HELP`/`# TYPE`), blank, or `name{labels} value` with a number.
fn assert_prometheus_text(body: &str) {
    for line in body.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "bad comment: {line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value: {line}"
        );
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels: {line}");
        }
    }
}

#[tokio::test]
async fn sigterm_exits_zero_after_writing_the_final_checkpoint() {
    let db = TestDb::new().await;
    let people = users(&["oli", "pat"]);
    let group = db
        .conversation(&people[0], &people[1], "2023-08-01T00:00:00", "one")
        .await;
    db.message(&group, &people[1], "2023-08-01T00:00:05", "two").await;
    // No periodic checkpoint within the test: the only one is the shutdown's.
    let mut worker = db
        .spawn_worker_process(&[
            "--set",
            "checkpoint_interval_ms=600000",
            "--set",
            "idle_interval_ms=20",
            "--set",
            "status_log_interval_ms=100",
        ])
        .await;
    db.wait_for_group(&group, "2023-08-01T00:00:05", "two").await;
    // Wait until the worker has read everything, its own group-row rewrites included.
    let read_all = wait_until(Duration::from_secs(30), || async {
        let received = worker.metric("stream_worker_records_received_total", "").await;
        received as usize == db.stream_records().await.len()
    })
    .await;
    assert!(read_all, "the worker read the whole stream");
    let leases = db.leases().await;
    assert!(
        leases.values().all(|lease| s(lease, "checkpoint") == "TRIM_HORIZON"),
        "no checkpoint before the signal"
    );

    // The status line (the CloudWatch alarm's source) comes every status_log_interval_ms.
    let status_logged = wait_until(Duration::from_secs(30), || async {
        worker.log().contains("\"message\":\"status\"")
    })
    .await;
    assert!(status_logged, "{}", worker.log());

    worker.signal("TERM");
    assert_eq!(worker.wait_exit().await.code(), Some(0), "SIGTERM exits 0");

    let last = db
        .stream_records()
        .await
        .last()
        .map(|record| record.sequence.clone())
        .expect("records");
    let leases = db.leases().await;
    let lease = leases.values().next().expect("lease");
    assert_eq!(
        sequence(s(lease, "checkpoint")),
        sequence(&last),
        "the final checkpoint covers every record read"
    );
    assert_eq!(s(lease, "owner"), "", "and the lease is released");
    // Give the log reader a moment to see the last lines.
    let logged = wait_until(Duration::from_secs(5), || async {
        worker.log().contains("checkpoints written")
    })
    .await;
    assert!(logged, "{}", worker.log());
    let status = worker
        .log()
        .lines()
        .find(|line| line.contains("\"message\":\"status\""))
        .map(str::to_owned);
    // The status line is CloudWatch EMF: every metric it declares is a number at its root.
    let status: serde_json::Value = serde_json::from_str(&status.expect("a status line")).expect("JSON");
    let directive = &status["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], "CruddurStreamWorker", "{status}");
    assert!(status["_aws"]["Timestamp"].is_u64(), "{status}");
    let declared: Vec<&str> = directive["Metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .filter_map(|metric| metric["Name"].as_str())
        .collect();
    for name in [
        "ProcessingLagSeconds",
        "IteratorAgeSeconds",
        "DeadLetters",
        "GroupUpdates",
        "LeasesHeld",
    ] {
        assert!(declared.contains(&name), "{name} is declared: {status}");
        assert!(status[name].is_number(), "{name} is a number: {status}");
    }
    let held_one = worker
        .log()
        .lines()
        .filter(|line| line.contains("\"message\":\"status\""))
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .any(|line| line["LeasesHeld"] == 1 && line["ShardsReading"] == 1);
    assert!(held_one, "a status line while the shard was read says so");
    assert!(!worker.log().contains("\"two\""), "message text never reaches the log");
}

#[tokio::test]
async fn bad_configuration_exits_2_naming_the_key() {
    let db = TestDb::empty().await;
    struct Case {
        args: &'static [&'static str],
        env: Option<(&'static str, &'static str)>,
        key: &'static str,
    }
    let cases = [
        Case {
            args: &["run"],
            env: Some(("WORKER_STARTING_POSITION", "SOMETIMES")),
            key: "starting_position",
        },
        Case {
            args: &["run"],
            env: Some(("WORKER_HTTP_ADDR", "not-an-address")),
            key: "http_addr",
        },
        Case {
            args: &["run", "--set", "batch_size=0"],
            env: None,
            key: "batch_size",
        },
        Case {
            args: &["run", "--set", "no_such_key=1"],
            env: None,
            key: "no_such_key",
        },
        Case {
            args: &["run", "--starting-position", "NEVER"],
            env: None,
            key: "starting_position",
        },
        Case {
            args: &["setup"],
            env: Some(("AWS_REGION", "")),
            key: "AWS_REGION",
        },
        Case {
            args: &["run"],
            env: Some(("WORKER_BATCH_SIZ", "10")),
            key: "did you mean WORKER_BATCH_SIZE?",
        },
        Case {
            args: &["run"],
            env: Some(("WORKER_LOG_LEVEL", "warning")),
            key: "WORKER_LOG_LEVEL",
        },
    ];
    for Case { args, env, key } in cases {
        let mut command = db.command(args);
        command.envs(env);
        let output = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .expect("exits")
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(key), "the error names {key}: {stderr}");
    }
}

#[tokio::test]
async fn the_cli_sets_up_sends_and_lists_as_the_app_does() {
    let db = TestDb::empty().await;
    let run = |args: &'static [&'static str]| {
        let mut command = db.command(args);
        async move {
            let output = tokio::time::timeout(Duration::from_secs(60), command.output())
                .await
                .expect("exits")
                .expect("runs");
            assert!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
    };
    assert!(run(&["setup"]).await.contains("created"));
    assert!(run(&["setup"]).await.contains("exists"), "setup is idempotent");
    assert!(run(&["seed"]).await.contains("seeded 3 conversations"));
    assert!(run(&["seed"]).await.contains("3 already there"), "seed is idempotent");

    let worker = db.start_worker(&[]).await;
    assert!(run(&["send", "--from", "qin", "--to", "rex", "first words"])
        .await
        .contains("new conversation"));
    assert!(run(&["send", "--from", "rex", "--to", "qin", "a reply"])
        .await
        .contains("sent to conversation"));
    let listed = wait_until(Duration::from_secs(30), || async {
        let groups = run(&["groups", "qin"]).await;
        groups
            .lines()
            .next()
            .is_some_and(|top| top.contains("@rex") && top.contains("a reply"))
    })
    .await;
    assert!(listed, "groups shows the reply on top");
    let seeded = run(&["groups", "andrewbrown"]).await;
    assert_eq!(
        seeded.lines().count(),
        2,
        "andrewbrown has two seeded conversations: {seeded}"
    );
    let scan = run(&["scan"]).await;
    assert!(
        scan.lines()
            .all(|line| serde_json::from_str::<serde_json::Value>(line).is_ok()),
        "scan prints JSON lines"
    );
    worker.stop().await;
    let group = db.group_rows_of_any("rex").await;
    let messages = run_messages(&db, &group).await;
    assert_eq!(messages.lines().count(), 2);
    assert!(messages.lines().next().is_some_and(|newest| newest.contains("a reply")));
}

async fn run_messages(db: &TestDb, group: &str) -> String {
    let output = db.command(&["messages", group]).output().await.expect("runs");
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn latest_reads_only_what_arrives_after_the_first_start() {
    let db = TestDb::new().await;
    let people = users(&["lia", "mo"]);
    let group = db
        .conversation(&people[0], &people[1], "2023-12-01T00:00:00", "before")
        .await;
    db.message(&group, &people[1], "2023-12-01T00:00:01", "also before")
        .await;
    // LATEST is resolved to the start's minute (creation times are stamped to the minute on
    // DynamoDB Local): start in the next one, so that the records above are before it.
    let now = chrono::Utc::now();
    let into_minute = u64::from(chrono::Timelike::second(&now)) * 1000 + u64::from(now.timestamp_subsec_millis());
    tokio::time::sleep(Duration::from_millis(61_000 - into_minute)).await;

    let worker = db.start_worker(&[("starting_position", "LATEST")]).await;
    let ready = wait_until(Duration::from_secs(30), || async {
        worker.get("/readyz").await.0 == 200
    })
    .await;
    assert!(ready);
    for lease in db.leases().await.values() {
        let checkpoint = s(lease, "checkpoint");
        assert!(
            checkpoint.starts_with("LATEST@"),
            "LATEST stored resolved: {checkpoint}"
        );
    }
    db.message(&group, &people[0], "2023-12-01T00:00:02", "after").await;
    db.wait_for_group(&group, "2023-12-01T00:00:02", "after").await;
    assert_eq!(
        worker.metric("stream_worker_group_updates_total", "").await,
        1.0,
        "only the message written after the start was handed over"
    );
    worker.stop().await;
}

async fn command(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    db.run_command(args, &[]).await
}

/// `set-checkpoint` while a worker reads the shard: refused without a confirmation, shown but not
/// written with --dry-run, and with --yes the worker loses the lease, the fleet gives it out
/// again and the shard is read again from the new checkpoint. Bad shards and positions exit 2.
#[tokio::test]
async fn an_operator_resets_a_checkpoint_under_a_running_worker() {
    let db = TestDb::new().await;
    let people = users(&["opa", "opb"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-09-01T00:00:00", "open")
        .await;
    db.message(&group, &people[1], "2024-09-01T00:00:01", "read").await;
    let worker = db.start_worker(&[]).await;
    db.wait_caught_up().await;
    let leases = db.leases().await;
    let (shard, row) = leases.iter().next().expect("a lease");
    let checkpoint = s(row, "checkpoint").to_owned();
    let received = || async { worker.metric("stream_worker_records_received_total", "").await };
    let before = received().await;
    assert!(before >= 3.0, "the worker read the conversation: {before}");

    let (code, _, err) = command(&db, &["set-checkpoint", shard, "TRIM_HORIZON"]).await;
    assert_eq!(code, 2, "refused without --yes: {err}");
    assert!(err.contains("--yes"), "{err}");
    let (code, out, err) = command(&db, &["set-checkpoint", shard, "trim_horizon", "--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("{checkpoint} -> TRIM_HORIZON")) && out.contains("dry run"),
        "{out}"
    );
    assert_eq!(
        s(&db.leases().await[shard], "checkpoint"),
        checkpoint,
        "nothing written"
    );

    let (code, out, err) = command(&db, &["set-checkpoint", shard, "TRIM_HORIZON", "--yes"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let read_again = wait_until(Duration::from_secs(30), || async { received().await >= 2.0 * before }).await;
    assert!(
        read_again,
        "the shard was read again from the horizon: {} of {before}",
        received().await
    );

    for (args, wanted) in [
        (vec!["release-lease", "no-such-shard", "--yes"], "no lease row"),
        (
            vec!["set-checkpoint", shard.as_str(), "banana", "--yes"],
            "not a position",
        ),
    ] {
        let (code, _, err) = command(&db, &args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(wanted), "{args:?}: {err}");
    }
}
