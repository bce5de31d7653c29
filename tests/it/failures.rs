//! A bad day: poison records, injected faults, crashes, a dead-letter destination that is down,
//! a damaged table (reconcile) and dead letters replayed once fixed (redrive).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use cruddur_stream_worker::aws::Item;
use cruddur_stream_worker::deadletter::DeadLetter;
use cruddur_stream_worker::groups::admin::User;
use cruddur_stream_worker::stream::SequenceNumber;

use crate::proxy::{Fault, FaultProxy, Faults};
use crate::support::{canonical, endpoint, s, users, wait_until, TestDb, TestQueue};

fn text(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

impl TestDb {
    async fn put_raw(&self, item: &[(&str, AttributeValue)]) {
        let item: Item = item.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .expect("put raw item");
    }

    /// The checkpoint of the (one) shard, as a sequence number.
    async fn checkpoint(&self) -> Option<SequenceNumber> {
        self.leases()
            .await
            .values()
            .find_map(|lease| SequenceNumber::parse(s(lease, "checkpoint")))
    }

    /// Every group row of `group` is at `sk`'s instant (in any form) and there is one per
    /// participant in `owners`.
    async fn group_is_at(&self, group: &str, owners: &[&User], sk: &str, message: &str) -> bool {
        let rows = self.group_rows(group).await;
        let row_owners: BTreeSet<&str> = rows.iter().map(|row| s(row, "pk")).collect();
        let wanted: BTreeSet<String> = owners.iter().map(|u| format!("GRP#{}", u.uuid)).collect();
        rows.len() == owners.len()
            && row_owners == wanted.iter().map(String::as_str).collect()
            && rows
                .iter()
                .all(|row| canonical(s(row, "sk")) == canonical(sk) && s(row, "message") == message)
    }
}

/// Poison records of every kind, mixed into good ones (one with a 390 KB text).
#[tokio::test]
async fn poison_records_are_dead_lettered_once_and_the_shard_moves_on() {
    let db = TestDb::new().await;
    let people = users(&["pia", "quin", "rex"]);
    let (pia, quin, rex) = (&people[0], &people[1], &people[2]);
    let first = db.conversation(pia, quin, "2024-01-01T00:00:00", "first").await;
    let second = db.conversation(pia, rex, "2024-01-01T00:00:00.5", "second").await;
    let pk = text(&format!("MSG#{first}"));
    db.put_raw(&[("pk", pk.clone()), ("sk", text("2024-01-01T00:00:01"))])
        .await;
    db.message(&second, rex, "2024-01-01T00:00:02", "good one").await;
    db.put_raw(&[
        ("pk", pk.clone()),
        ("sk", text("2024-01-01T00:00:03")),
        ("message", AttributeValue::N("5".into())),
    ])
    .await;
    db.put_raw(&[
        ("pk", text("MSG#")),
        ("sk", text("2024-01-01T00:00:04")),
        ("message", text("x")),
    ])
    .await;
    let big = "b".repeat(390_000);
    db.message(&first, quin, "2024-01-01T00:00:05", &big).await;
    db.put_raw(&[("pk", pk.clone()), ("sk", text("not a time")), ("message", text("x"))])
        .await;

    let worker = db.start_worker(&[]).await;
    // The last record in the stream is poison: catching up means the checkpoint passed it.
    db.wait_caught_up().await;
    assert_eq!(worker.get("/healthz").await.0, 200, "the worker never crashed");
    assert!(
        db.group_is_at(&first, &[pia, quin], "2024-01-01T00:00:05", &big).await,
        "390 KB applied"
    );
    assert!(
        db.group_is_at(&second, &[pia, rex], "2024-01-01T00:00:02", "good one")
            .await
    );

    let letters = db.dead_letters();
    let reasons: BTreeMap<&str, usize> = letters.iter().fold(BTreeMap::new(), |mut counts, letter| {
        *counts.entry(letter.reason.as_str()).or_default() += 1;
        counts
    });
    assert_eq!(
        reasons,
        BTreeMap::from([
            ("bad_timestamp", 1),
            ("empty_group_uuid", 1),
            ("missing_attribute", 1),
            ("wrong_type", 1)
        ]),
        "{letters:#?}"
    );
    let sequences: BTreeSet<&str> = letters.iter().map(|l| l.sequence_number.as_str()).collect();
    assert_eq!(sequences.len(), 4, "each poison record once");
    for letter in &letters {
        assert!(!letter.shard.is_empty() && !letter.error.is_empty() && letter.attempts == 0);
        let record = letter.record().expect("the letter keeps its record");
        assert_eq!(record.sequence_number.text(), letter.sequence_number);
    }
    for (reason, _) in reasons {
        let labels = format!(r#"reason="{reason}""#);
        assert_eq!(worker.metric("stream_worker_dead_letters_total", &labels).await, 1.0);
    }
    worker.stop().await;
}

/// Every group converges through a proxy that fails a fifth of all requests.
#[tokio::test]
async fn at_twenty_percent_faults_every_group_converges_and_nothing_is_dead_lettered() {
    let db = TestDb::new().await;
    let people = users(&["fa", "fb", "fc", "fd", "fe", "ff"]);
    let mut groups = Vec::new();
    for (index, pair) in people.chunks(2).enumerate() {
        for round in 0..2 {
            let at = format!("2024-02-0{}T00:00:0{round}", index + 1);
            let group = db.conversation(&pair[0], &pair[1], &at, "hello").await;
            groups.push((group, &pair[0], &pair[1], round));
        }
    }
    // The worker runs while the messages arrive, a few at a time, so that reads and updates are
    // many (a backlog read at once would need only a handful of requests).
    let proxy = FaultProxy::start(&endpoint(), Faults::mixed(0.2)).await;
    let worker = db.start_worker_via(&proxy.url(), &[]).await;
    let mut newest = BTreeMap::new();
    for step in 0..8 {
        for (group, a, b, round) in &groups {
            let at = format!("2024-02-10T00:{step:02}:0{round}");
            let sender = if step % 2 == 0 { *a } else { *b };
            db.message(group, sender, &at, &format!("step {step}")).await;
            newest.insert(group.clone(), at);
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
    let converged = wait_until(Duration::from_secs(90), || async {
        for (group, a, b, _) in &groups {
            if !db.group_is_at(group, &[*a, *b], &newest[group], "step 7").await {
                return false;
            }
        }
        true
    })
    .await;
    assert!(converged, "every group reaches its newest message");
    let (requests, injected) = proxy.counts();
    assert!(
        injected > 0 && injected < requests,
        "{injected} faults in {requests} requests"
    );
    assert!(
        worker.metric("stream_worker_retries_total", "").await > 0.0,
        "retries are counted"
    );
    assert_eq!(worker.metric("stream_worker_dead_letters_total", "").await, 0.0);
    worker.stop().await;
    assert!(db.dead_letters().is_empty(), "nothing transient was dead-lettered");
}

/// kill -9 at random moments during a storm of messages, ten times.
#[tokio::test]
async fn crashes_during_a_storm_never_lose_or_double_a_row() {
    let db = TestDb::new().await;
    let people = users(&["ka", "kb", "kc", "kd", "ke"]);
    // Each pair talks once: a ring, so every user is in two conversations.
    let mut groups = Vec::new();
    for index in 0..people.len() {
        let (a, b) = (&people[index], &people[(index + 1) % people.len()]);
        let at = format!("2024-03-01T00:00:0{index}");
        groups.push((db.conversation(a, b, &at, "open").await, a.clone(), b.clone()));
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (db, groups, stop) = (db.clone(), groups.clone(), stop.clone());
        tokio::spawn(async move {
            // Timestamps grow by one millisecond per message: every row key stays unique.
            let mut newest: BTreeMap<String, (String, String)> = BTreeMap::new();
            let start = chrono::DateTime::parse_from_rfc3339("2024-03-02T00:00:00Z").expect("time");
            for n in 0..3_000i64 {
                if stop.is_cancelled() {
                    break;
                }
                let (group, a, b) = &groups[(n as usize) % groups.len()];
                let at = (start + chrono::Duration::milliseconds(n))
                    .format("%Y-%m-%dT%H:%M:%S%.3f")
                    .to_string();
                let body = format!("storm {n}");
                db.message(group, if n % 2 == 0 { a } else { b }, &at, &body).await;
                newest.insert(group.clone(), (at, body));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            newest
        })
    };
    // One worker id across restarts, as a fixed-id deployment (or scripts/local) restarts: the
    // new process resumes its own lease at once, so every round reads during the storm.
    let restart_args = ["--worker-id", "crash-worker"];
    for round in 0..10 {
        let worker = db.spawn_worker_process(&restart_args).await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(200..1_500))).await;
        let mut worker = worker;
        worker.signal("KILL");
        let status = worker.wait_exit().await;
        assert!(!status.success(), "round {round}: killed");
    }
    stop.cancel();
    let newest = writer.await.expect("writer");
    let worker = db.spawn_worker_process(&restart_args).await;
    let converged = wait_until(Duration::from_secs(90), || async {
        for (group, a, b) in &groups {
            let (at, body) = &newest[group];
            if !db.group_is_at(group, &[a, b], at, body).await {
                return false;
            }
        }
        true
    })
    .await;
    let mut detail = String::new();
    for (group, _, _) in &groups {
        let rows = db.group_rows(group).await;
        detail.push_str(&format!(
            "{group}: {:?}\n",
            rows.iter().map(|r| (s(r, "pk"), s(r, "sk"))).collect::<Vec<_>>()
        ));
    }
    assert!(converged, "one row per participant at the newest message:\n{detail}");
    drop(worker);
    assert!(db.dead_letters().is_empty());
}

/// The dead-letter queue is unreachable: the shard waits behind the poison record (no
/// checkpoint past it) while other records go on; once the queue is back, the letter is
/// written once and the shard moves on.
#[tokio::test]
async fn a_dead_letter_queue_that_is_down_holds_the_checkpoint_until_it_is_back() {
    let db = TestDb::new().await;
    let queue = TestQueue::create().await;
    let proxy = FaultProxy::start(
        &crate::support::sqs_endpoint(),
        Faults {
            share: 1.0,
            kinds: vec![Fault::Reset, Fault::ServerError],
            target: None,
        },
    )
    .await;
    let people = users(&["qa", "qb"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-04-01T00:00:00", "open")
        .await;
    db.put_raw(&[
        ("pk", text(&format!("MSG#{group}"))),
        ("sk", text("2024-04-01T00:00:01")),
    ])
    .await;
    let poison = db
        .stream_records()
        .await
        .last()
        .map(|record| record.sequence.clone())
        .expect("poison record");
    db.message(&group, &people[1], "2024-04-01T00:00:02", "after the poison")
        .await;

    let proxy_url = proxy.url();
    let worker = db
        .spawn_worker_process_with(
            &[],
            &[
                ("AWS_ENDPOINT_URL_SQS", proxy_url.as_str()),
                ("WORKER_DEAD_LETTER_FILE", ""),
                ("WORKER_DEAD_LETTER_QUEUE_URL", queue.url.as_str()),
                ("WORKER_RETRY_MAX_DELAY_MS", "100"),
                ("WORKER_CHECKPOINT_INTERVAL_MS", "50"),
            ],
        )
        .await;
    db.wait_for_group(&group, "2024-04-01T00:00:02", "after the poison")
        .await;
    let retried = wait_until(Duration::from_secs(30), || async {
        worker
            .metric("stream_worker_retries_total", r#"operation="write_dead_letter""#)
            .await
            >= 3.0
    })
    .await;
    assert!(retried, "the dead letter is retried: {}", worker.log());
    // Several checkpoint intervals pass while the letter cannot be stored.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let poison = SequenceNumber::parse(&poison).expect("sequence");
    assert!(
        db.checkpoint().await.is_none_or(|checkpoint| checkpoint < poison),
        "no checkpoint past the poison record while its letter is not stored"
    );
    assert!(queue.bodies().await.is_empty());

    proxy.set(Faults::none());
    db.wait_caught_up().await;
    let bodies = queue.bodies().await;
    assert_eq!(bodies.len(), 1, "written once: {bodies:?}");
    let letter: DeadLetter = serde_json::from_str(&bodies[0]).expect("a dead letter");
    assert_eq!(letter.reason, "missing_attribute");
    assert_eq!(
        worker
            .metric("stream_worker_dead_letters_total", r#"reason="missing_attribute""#)
            .await,
        1.0
    );
}

async fn run_command(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    run_command_with(db, args, &[]).await
}

async fn run_command_with(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    db.run_command(args, env).await
}

/// A table damaged on purpose: stale rows, a deleted row, a duplicate row.
#[tokio::test]
async fn reconcile_repairs_a_damaged_table_and_then_finds_nothing_to_do() {
    let db = TestDb::new().await;
    let people = users(&["ra", "rb", "rc", "rd"]);
    let (ra, rb, rc, rd) = (&people[0], &people[1], &people[2], &people[3]);
    // No worker runs: later messages leave the rows stale.
    let stale = db.conversation(ra, rb, "2024-05-01T00:00:00", "old").await;
    db.message(&stale, rb, "2024-05-01T00:00:09", "newest").await;
    db.message(&stale, ra, "2024-05-01T00:00:05", "older").await;
    let missing = db.conversation(ra, rc, "2024-05-01T00:00:01", "one").await;
    let rc_row = Item::from([
        ("pk".to_owned(), text(&format!("GRP#{}", rc.uuid))),
        ("sk".to_owned(), text("2024-05-01T00:00:01")),
    ]);
    db.client
        .delete_item()
        .table_name(&db.table)
        .set_key(Some(rc_row))
        .send()
        .await
        .expect("delete a row");
    let doubled = db.conversation(rb, rd, "2024-05-01T00:00:02", "two").await;
    db.put_raw(&[
        ("pk", text(&format!("GRP#{}", rd.uuid))),
        ("sk", text("2024-04-01T00:00:00")),
        ("message_group_uuid", text(&doubled)),
        ("message", text("a stray copy")),
        ("user_uuid", text(&rb.uuid)),
    ])
    .await;
    let fine = db.conversation(rc, rd, "2024-05-01T00:00:03", "fine").await;

    let before = db.snapshot().await;
    let (code, out, err) = run_command(&db, &["reconcile", "--dry-run"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(db.snapshot().await, before, "a dry run writes nothing");
    assert!(out.contains("would"), "{out}");
    assert!(
        out.contains(
            "4 would be repaired (2 stale rows moved, 1 missing rows created, 1 duplicate rows deleted, \
             5 rows normalized)"
        ),
        "{out}"
    );

    let (code, out, err) = run_command(&db, &["reconcile"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("reconcile: checked 4/4 conversations"), "progress: {err}");
    assert!(db.group_is_at(&stale, &[ra, rb], "2024-05-01T00:00:09", "newest").await);
    assert!(db.group_is_at(&missing, &[ra, rc], "2024-05-01T00:00:01", "one").await);
    assert!(db.group_is_at(&doubled, &[rb, rd], "2024-05-01T00:00:02", "two").await);
    assert!(db.group_is_at(&fine, &[rc, rd], "2024-05-01T00:00:03", "fine").await);
    let group_rows: Vec<_> = db
        .snapshot()
        .await
        .into_iter()
        .filter(|item| item["pk"].contains("GRP#"))
        .collect();
    assert_eq!(group_rows.len(), 8);
    for row in &group_rows {
        let sk = row["sk"].trim_start_matches("S(\"").trim_end_matches("\")");
        assert_eq!(sk, canonical(sk), "every group row in the canonical form: {row:?}");
    }
    let rebuilt = db.group_rows(&missing).await;
    let rc_row = rebuilt
        .iter()
        .find(|row| s(row, "pk") == format!("GRP#{}", rc.uuid))
        .expect("rc's row is back");
    assert_eq!(
        (
            s(rc_row, "user_uuid"),
            s(rc_row, "user_handle"),
            s(rc_row, "user_display_name")
        ),
        (ra.uuid.as_str(), ra.handle.as_str(), ra.display_name.as_str()),
        "it names the other participant"
    );

    let after = db.snapshot().await;
    let (code, out, err) = run_command(&db, &["reconcile"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("; 0 repaired"), "{out}");
    assert_eq!(db.snapshot().await, after, "a correct table is left alone");
}

/// A conversation with a message whose update cannot apply (the proxy fails every
/// TransactWriteItems) followed by a poison record: once a worker ran through the proxy, one
/// letter can be redriven and one never can. The day names the timestamps.
async fn stuck_and_poisoned(db: &TestDb, names: [&str; 2], day: &str) -> (Vec<User>, String, FaultProxy) {
    let people = users(&names);
    let group = db
        .conversation(&people[0], &people[1], &format!("{day}T00:00:00"), "open")
        .await;
    db.message(&group, &people[1], &format!("{day}T00:00:01"), "stuck")
        .await;
    db.put_raw(&[
        ("pk", text(&format!("MSG#{group}"))),
        ("sk", text(&format!("{day}T00:00:02"))),
    ])
    .await;
    let proxy = FaultProxy::failing("TransactWriteItems").await;
    (people, group, proxy)
}

/// Updates fail for good while DynamoDB rejects every transaction; `redrive` applies them once
/// that is fixed and keeps what still cannot be applied.
#[tokio::test]
async fn redrive_applies_fixed_dead_letters_and_keeps_the_rest() {
    let db = TestDb::new().await;
    let (people, group, proxy) = stuck_and_poisoned(&db, ["da", "db"], "2024-06-01").await;
    let worker = db.start_worker_via(&proxy.url(), &[("retry_max_attempts", "3")]).await;
    db.wait_caught_up().await;
    assert_eq!(
        worker
            .metric("stream_worker_dead_letters_total", r#"reason="retries_exhausted""#)
            .await,
        1.0
    );
    worker.stop().await;
    assert!(
        db.group_is_at(&group, &[&people[0], &people[1]], "2024-06-01T00:00:00", "open")
            .await
    );
    let letters = db.dead_letters();
    assert_eq!(letters.len(), 2, "{letters:#?}");
    let stuck = letters
        .iter()
        .find(|l| l.reason == "retries_exhausted")
        .expect("the failed update");
    assert_eq!(stuck.attempts, 3);

    // The cause is fixed: DynamoDB is reached directly.
    let (code, out, err) = run_command(&db, &["redrive"]).await;
    assert_eq!(code, 1, "one letter still fails: {out}{err}");
    assert!(out.contains("1 replayed, 1 failed again and kept"), "{out}");
    assert!(
        db.group_is_at(&group, &[&people[0], &people[1]], "2024-06-01T00:00:01", "stuck")
            .await
    );
    let left = db.dead_letters();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].reason, "missing_attribute");

    let (code, out, err) = run_command(&db, &["redrive"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("0 replayed, 1 failed again"), "{out}");
}

/// A worker process writing dead letters to a queue (`queue_env`) and its DynamoDB calls
/// through `proxy`, giving up an update after `attempts`.
async fn spawn_with_queue_through(
    db: &TestDb,
    queue_env: &[(&str, &str)],
    proxy: &FaultProxy,
    attempts: &str,
) -> crate::support::ChildWorker {
    let proxy_url = proxy.url();
    let env = [
        ("AWS_ENDPOINT_URL_DYNAMODB", proxy_url.as_str()),
        ("WORKER_RETRY_MAX_ATTEMPTS", attempts),
        ("WORKER_RETRY_MAX_DELAY_MS", "100"),
        ("WORKER_CHECKPOINT_INTERVAL_MS", "50"),
    ];
    db.spawn_worker_process_with(&[], &[queue_env, &env[..]].concat()).await
}

/// The same from an SQS queue: what applies is deleted, what fails again goes back, and a
/// second redrive right after the first sees the letter it wrote back (not hidden for the
/// visibility timeout).
#[tokio::test]
async fn redrive_from_a_queue_deletes_what_applied_and_keeps_the_rest_visible() {
    let db = TestDb::new().await;
    let queue = TestQueue::create().await;
    let (people, group, proxy) = stuck_and_poisoned(&db, ["sa", "sb"], "2024-07-01").await;
    let sqs = crate::support::sqs_endpoint();
    let queue_env = queue.worker_env(&sqs);
    let mut worker = spawn_with_queue_through(&db, &queue_env, &proxy, "3").await;
    db.wait_caught_up().await;
    assert_eq!(
        worker
            .metric("stream_worker_dead_letters_total", r#"reason="retries_exhausted""#)
            .await,
        1.0,
        "{}",
        worker.log()
    );
    worker.signal("TERM");
    assert!(worker.wait_exit().await.success(), "{}", worker.log());

    let (code, out, err) = run_command_with(&db, &["redrive"], &queue_env).await;
    assert_eq!(code, 1, "one letter still fails: {out}{err}");
    assert!(out.contains("1 replayed, 1 failed again and kept"), "{out}");
    assert!(
        db.group_is_at(&group, &[&people[0], &people[1]], "2024-07-01T00:00:01", "stuck")
            .await
    );
    // At once, well inside the 120 s the first run's receives hid the messages for.
    let (code, out, err) = run_command_with(&db, &["redrive"], &queue_env).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("0 replayed, 1 failed again and kept"), "{out}");
    let bodies = queue.bodies().await;
    assert_eq!(bodies.len(), 1, "only the letter that failed again is left: {bodies:?}");
    let letter: DeadLetter = serde_json::from_str(&bodies[0]).expect("a dead letter");
    assert_eq!(letter.reason, "missing_attribute");
}

#[tokio::test]
async fn run_without_a_dead_letter_destination_is_a_configuration_error() {
    let db = TestDb::new().await;
    let output = db
        .command(&["run"])
        .env("WORKER_DEAD_LETTER_FILE", "")
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("WORKER_DEAD_LETTER_QUEUE_URL") && stderr.contains("WORKER_DEAD_LETTER_FILE"),
        "{stderr}"
    );
}

/// The updater remembers the rows it wrote: the next update of the conversation reads them
/// again by key, with no query. Every Query fails behind the proxy, so a query would fail the
/// update.
#[tokio::test]
async fn a_second_update_of_a_conversation_reads_its_rows_by_key_without_a_query() {
    use cruddur_stream_worker::groups::updater::GroupSummaryUpdater;
    let db = TestDb::new().await;
    let people = users(&["la", "lb"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-08-01T00:00:00", "open")
        .await;
    let proxy = FaultProxy::start(&endpoint(), Faults::none()).await;
    let client = cruddur_stream_worker::aws::dynamodb_client(&db.sdk_via(&proxy.url()).await);
    let updater = GroupSummaryUpdater::new(client, &db.table);
    let message = |sk: &str, text: &str| TestDb::message_event(&group, &people[0], sk, text);
    assert_eq!(
        updater
            .apply(&message("2024-08-01T00:00:01", "one"))
            .await
            .expect("applies"),
        "applied"
    );
    proxy.set(Faults {
        share: 1.0,
        kinds: vec![Fault::ServerError],
        target: Some("DynamoDB_20120810.Query".into()),
    });
    assert_eq!(
        updater
            .apply(&message("2024-08-01T00:00:02", "two"))
            .await
            .expect("no query needed"),
        "applied"
    );
    assert_eq!(
        updater
            .apply(&message("2024-08-01T00:00:01", "one"))
            .await
            .expect("no read at all for a late record"),
        "stale"
    );
    assert!(
        db.group_is_at(&group, &[&people[0], &people[1]], "2024-08-01T00:00:02", "two")
            .await
    );
}

/// Updates of many conversations that need their rows at the same moment (a poll's worth) read
/// them in shared BatchGetItem calls, each still getting its own rows: every conversation ends
/// at its own message, in far fewer reads than conversations.
#[tokio::test]
async fn updates_that_read_their_rows_at_once_share_the_reads() {
    use cruddur_stream_worker::groups::updater::GroupSummaryUpdater;
    let db = TestDb::new().await;
    let names: Vec<String> = (0..24).map(|n| format!("r{n}")).collect();
    let people = users(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let mut groups = Vec::new();
    for pair in people.chunks(2) {
        groups.push(db.conversation(&pair[0], &pair[1], "2024-10-01T00:00:00", "open").await);
    }
    let proxy = FaultProxy::start(&endpoint(), Faults::none()).await;
    let client = cruddur_stream_worker::aws::dynamodb_client(&db.sdk_via(&proxy.url()).await);
    let updater = GroupSummaryUpdater::new(client, &db.table);
    // One update each, one after another: the updater now remembers every conversation's rows.
    for (group, pair) in groups.iter().zip(people.chunks(2)) {
        let first = TestDb::message_event(group, &pair[0], "2024-10-01T00:00:01", "one");
        assert_eq!(updater.apply(&first).await.expect("applies"), "applied");
    }
    let reads_before = proxy.requests_of("BatchGetItem");
    let tasks: Vec<_> = groups
        .iter()
        .zip(people.chunks(2))
        .enumerate()
        .map(|(n, (group, pair))| {
            let message = TestDb::message_event(group, &pair[1], "2024-10-01T00:00:02", &format!("two {n}"));
            let updater = updater.clone();
            tokio::spawn(async move { updater.apply(&message).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task").expect("applies"), "applied");
    }
    let reads = proxy.requests_of("BatchGetItem") - reads_before;
    assert!(
        reads <= 3,
        "{} conversations read their rows in {reads} calls",
        groups.len()
    );
    for (n, (group, pair)) in groups.iter().zip(people.chunks(2)).enumerate() {
        assert!(
            db.group_is_at(group, &[&pair[0], &pair[1]], "2024-10-01T00:00:02", &format!("two {n}"))
                .await,
            "conversation {n}"
        );
    }
}

/// The stream shows the group rows written when the conversations were opened: the worker
/// learns them there, so even its first update of each conversation needs no query (it reads
/// the rows by key). Every Query fails behind the proxy; with 2 attempts a query would
/// dead-letter the update.
#[tokio::test]
async fn group_rows_seen_in_the_stream_spare_the_first_query() {
    let db = TestDb::new().await;
    let people = users(&["ka", "kb", "kc"]);
    let mut expected = Vec::new();
    for (n, (from, to)) in [(0, 1), (1, 2), (2, 0)].into_iter().enumerate() {
        let (from, to) = (&people[from], &people[to]);
        let group = db
            .conversation(from, to, &format!("2024-09-0{}T00:00:00", n + 1), "open")
            .await;
        db.message(&group, to, &format!("2024-09-0{}T00:00:01", n + 1), "reply")
            .await;
        db.message(&group, from, &format!("2024-09-0{}T00:00:02", n + 1), "last")
            .await;
        expected.push((group, format!("2024-09-0{}T00:00:02", n + 1)));
    }
    let proxy = FaultProxy::start(
        &endpoint(),
        Faults {
            share: 1.0,
            kinds: vec![Fault::ServerError],
            target: Some("DynamoDB_20120810.Query".into()),
        },
    )
    .await;
    let proxy_url = proxy.url();
    let worker = db
        .spawn_worker_process_with(
            &[],
            &[
                ("AWS_ENDPOINT_URL_DYNAMODB", proxy_url.as_str()),
                ("WORKER_RETRY_MAX_ATTEMPTS", "2"),
            ],
        )
        .await;
    for (group, sk) in &expected {
        db.wait_for_group(group, sk, "last").await;
    }
    let lookups = |source: &'static str| {
        let worker = &worker;
        async move {
            worker
                .metric(
                    "stream_worker_group_row_lookups_total",
                    &format!(r#"source="{source}""#),
                )
                .await
        }
    };
    assert!(lookups("key").await >= 3.0, "{}", worker.log());
    assert_eq!(lookups("index").await, 0.0, "no update read the index");
    assert_eq!(lookups("table").await, 0.0, "no update queried the table");
    assert_eq!(proxy.counts().1, 0, "no Query was even tried");
    assert!(db.dead_letters().is_empty());
}

#[tokio::test]
async fn run_with_an_unwritable_dead_letter_file_fails_at_start() {
    let db = TestDb::new().await;
    let output = db
        .command(&["run"])
        .env("WORKER_DEAD_LETTER_FILE", "/nonexistent-directory/dead-letters.jsonl")
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot be written"), "{stderr}");
}

/// A message of 300 KB whose update fails for good: its letter would be over the queue's
/// 256 KiB. It is stored with the record's keys only, the shard moves on, and `redrive` reads
/// the message back from the table to apply it.
#[tokio::test]
async fn an_oversized_dead_letter_is_stored_by_its_keys_and_redrive_reads_the_message_back() {
    let db = TestDb::new().await;
    let queue = TestQueue::create().await;
    queue.limit_messages_to(262_144).await;
    let people = users(&["ova", "ovb"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-10-01T00:00:00Z", "open")
        .await;
    let long = "a long message ".repeat(20_000);
    db.message(&group, &people[1], "2024-10-01T00:00:01Z", &long).await;
    let proxy = FaultProxy::failing("TransactWriteItems").await;
    let sqs = crate::support::sqs_endpoint();
    let queue_env = queue.worker_env(&sqs);
    let mut worker = spawn_with_queue_through(&db, &queue_env, &proxy, "2").await;
    db.wait_caught_up().await;
    assert_eq!(
        worker.metric("stream_worker_dead_letters_total", "").await,
        1.0,
        "{}",
        worker.log()
    );
    worker.signal("TERM");
    assert!(worker.wait_exit().await.success(), "{}", worker.log());
    let bodies = queue.bodies_hidden_for(0).await;
    assert_eq!(bodies.len(), 1, "one letter");
    assert!(bodies[0].len() <= 262_144);
    let letter: DeadLetter = serde_json::from_str(&bodies[0]).expect("a dead letter");
    assert!(letter.record_trimmed);
    assert_eq!(letter.covers.len(), 1, "the opening message, folded in");

    let (code, out, err) = run_command_with(&db, &["redrive"], &queue_env).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 replayed"), "{out}");
    assert!(
        db.group_is_at(&group, &[&people[0], &people[1]], "2024-10-01T00:00:01Z", &long)
            .await
    );
}

/// A wrong queue URL is bad configuration: `run` says so and exits 2 at start, not at the first
/// record that fails.
#[tokio::test]
async fn run_with_a_queue_that_does_not_exist_exits_2_at_start() {
    let db = TestDb::new().await;
    let queue = TestQueue::create().await;
    let missing = format!("{}-missing", queue.url);
    let sqs = crate::support::sqs_endpoint();
    let env = [
        ("AWS_ENDPOINT_URL_SQS", sqs.as_str()),
        ("WORKER_DEAD_LETTER_FILE", ""),
        ("WORKER_DEAD_LETTER_QUEUE_URL", missing.as_str()),
    ];
    let run = run_command_with(&db, &["run"], &env);
    let (code, out, err) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("run stops at start");
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(&missing) && err.contains("GetQueueAttributes"), "{err}");
}

/// The queue is deleted while the worker runs: the next dead letter can be stored nowhere. The
/// worker stops with an error that says so (no endless retries), and its checkpoint stays
/// before that record.
#[tokio::test]
async fn a_dead_letter_that_can_be_stored_nowhere_stops_the_worker_with_a_clear_error() {
    let db = TestDb::new().await;
    let queue = TestQueue::create().await;
    let people = users(&["nwa", "nwb"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-11-01T00:00:00Z", "open")
        .await;
    let sqs = crate::support::sqs_endpoint();
    let mut worker = db
        .spawn_worker_process_with(
            &[],
            &[
                ("AWS_ENDPOINT_URL_SQS", sqs.as_str()),
                ("WORKER_DEAD_LETTER_FILE", ""),
                ("WORKER_DEAD_LETTER_QUEUE_URL", queue.url.as_str()),
                ("WORKER_CHECKPOINT_INTERVAL_MS", "50"),
            ],
        )
        .await;
    db.wait_caught_up().await;
    queue
        .client
        .delete_queue()
        .queue_url(&queue.url)
        .send()
        .await
        .expect("delete the queue");
    db.put_raw(&[
        ("pk", text(&format!("MSG#{group}"))),
        ("sk", text("2024-11-01T00:00:01Z")),
    ])
    .await;
    let poison = db
        .stream_records()
        .await
        .last()
        .map(|record| SequenceNumber::parse(&record.sequence).expect("sequence"))
        .expect("poison record");
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait_exit())
        .await
        .unwrap_or_else(|_| panic!("the worker stops by itself: {}", worker.log()));
    assert_eq!(status.code(), Some(1), "{}", worker.log());
    let log = worker.log();
    assert!(log.contains("cannot be stored"), "{log}");
    assert!(
        db.checkpoint().await.is_none_or(|checkpoint| checkpoint < poison),
        "no checkpoint past the record whose letter was lost"
    );
}
