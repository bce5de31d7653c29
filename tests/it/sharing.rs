//! Several workers on one table, each its own process as on ECS: one reads the shard, the
//! others stand by; the shard changes hands on a graceful stop, a crash, or a pause past the
//! lease duration, and nothing is lost or checkpointed by a worker that no longer owns it.

use std::time::Duration;

use crate::support::{s, users, wait_until, ChildWorker, LeaseWatch, TestDb};

/// Fast leases for tests: `lease_duration_ms` as given, rounds every 100 ms, beats every 200.
fn args<'a>(id: &'a str, lease_duration_ms: &'a str) -> Vec<String> {
    [
        "--worker-id",
        id,
        "--set",
        &format!("lease_duration_ms={lease_duration_ms}"),
        "--set",
        "lease_take_interval_ms=100",
        "--set",
        "heartbeat_interval_ms=200",
        "--set",
        "idle_interval_ms=20",
        "--set",
        "shard_sync_interval_ms=500",
        "--set",
        "checkpoint_interval_ms=100",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect()
}

async fn spawn(db: &TestDb, id: &str, lease_duration_ms: &str) -> ChildWorker {
    let args = args(id, lease_duration_ms);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    db.spawn_worker_process(&args).await
}

/// Waits until the table's one shard is owned by one of `candidates`; returns which.
async fn owner_among(db: &TestDb, candidates: &[&str]) -> String {
    let owner = std::sync::Mutex::new(String::new());
    let owned = wait_until(Duration::from_secs(30), || async {
        let now = db.owners().await.values().next().cloned().unwrap_or_default();
        let found = candidates.contains(&now.as_str());
        *owner.lock().expect("owner") = now;
        found
    })
    .await;
    let owner = owner.into_inner().expect("owner");
    assert!(owned, "the shard is owned by one of {candidates:?}, not {owner:?}");
    owner
}

#[tokio::test]
async fn one_worker_reads_the_other_stands_by_and_takes_over_at_once_on_sigterm() {
    let db = TestDb::new().await;
    let watch = LeaseWatch::start(&db);
    let people = users(&["ada", "bob"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-02-01T00:00:00", "open")
        .await;
    db.message(&group, &people[1], "2024-02-01T00:00:01", "one").await;
    // A lease duration far beyond the test: only a release can move the lease.
    let mut workers = [spawn(&db, "alpha", "600000").await, spawn(&db, "beta", "600000").await];
    db.wait_for_group(&group, "2024-02-01T00:00:01", "one").await;
    let reader = owner_among(&db, &["alpha", "beta"]).await;
    let (reading, standing_by) = if reader == "alpha" { (0, 1) } else { (1, 0) };
    for worker in &workers {
        let ready = wait_until(Duration::from_secs(30), || async {
            crate::support::http_get(worker.http_addr, "/readyz").await.0 == 200
        })
        .await;
        assert!(ready, "both are ready: the reader and the one standing by");
    }
    assert_eq!(workers[reading].metric("stream_worker_leases_held", "").await, 1.0);
    assert_eq!(workers[standing_by].metric("stream_worker_leases_held", "").await, 0.0);
    assert_eq!(
        workers[standing_by]
            .metric("stream_worker_records_received_total", "")
            .await,
        0.0,
        "stands by"
    );

    workers[reading].signal("TERM");
    assert_eq!(workers[reading].wait_exit().await.code(), Some(0));
    let successor = if reader == "alpha" { "beta" } else { "alpha" };
    assert_eq!(
        owner_among(&db, &[successor]).await,
        successor,
        "the released lease is taken, not left to expire"
    );
    // The successor counts the takeover when it takes the lease up, a round after the row shows
    // it as owner: wait (at most 10 s) for the count rather than read it once. If it never
    // comes, say what was counted and what each worker logged of its leases.
    let counted = wait_until(Duration::from_secs(10), || async {
        workers[standing_by]
            .metric("stream_worker_lease_takeovers_total", r#"reason="released""#)
            .await
            >= 1.0
    })
    .await;
    if !counted {
        let mut seen = Vec::new();
        for reason in ["released", "expired", "stolen", "new"] {
            let label = format!(r#"reason="{reason}""#);
            seen.push((
                reason,
                workers[standing_by]
                    .metric("stream_worker_lease_takeovers_total", &label)
                    .await,
            ));
        }
        let logs: Vec<String> = workers
            .iter()
            .map(|w| {
                w.log()
                    .lines()
                    .filter(|l| l.contains("lease") || l.contains("leader") || l.contains("assign"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        panic!("the takeover of a released lease is not counted as released; takeovers by reason: {seen:?}\nreader {reader}\n{}", logs.join("\n---\n"));
    }
    let released = workers[standing_by]
        .metric("stream_worker_lease_takeovers_total", r#"reason="released""#)
        .await;
    assert_eq!(released, 1.0, "counted once");

    db.message(&group, &people[0], "2024-02-01T00:00:02", "two").await;
    db.wait_for_group(&group, "2024-02-01T00:00:02", "two").await;
    workers[standing_by].signal("TERM");
    assert_eq!(workers[standing_by].wait_exit().await.code(), Some(0));
    watch.finish().await;
}

#[tokio::test]
async fn a_killed_workers_shard_is_taken_over_after_expiry_and_nothing_is_lost() {
    let db = TestDb::new().await;
    let watch = LeaseWatch::start(&db);
    let people = users(&["cid", "dee", "eli"]);
    let first = db
        .conversation(&people[0], &people[1], "2024-03-01T00:00:00", "open")
        .await;
    let second = db
        .conversation(&people[1], &people[2], "2024-03-01T00:00:01", "open")
        .await;
    let mut workers = [spawn(&db, "alpha", "2000").await, spawn(&db, "beta", "2000").await];
    db.message(&first, &people[0], "2024-03-01T00:01:00", "before the crash")
        .await;
    db.wait_for_group(&first, "2024-03-01T00:01:00", "before the crash")
        .await;
    let crashed = owner_among(&db, &["alpha", "beta"]).await;
    let (dead, alive) = if crashed == "alpha" { (0, 1) } else { (1, 0) };

    workers[dead].signal("KILL");
    workers[dead].wait_exit().await;
    // Written while nobody reads: the successor must resume from the checkpoint and apply them.
    for minute in 2..6 {
        db.message(
            &first,
            &people[1],
            &format!("2024-03-01T00:0{minute}:00"),
            &format!("minute {minute}"),
        )
        .await;
        db.message(
            &second,
            &people[2],
            &format!("2024-03-01T00:0{minute}:01"),
            &format!("minute {minute}"),
        )
        .await;
    }
    let successor = if crashed == "alpha" { "beta" } else { "alpha" };
    assert_eq!(owner_among(&db, &[successor]).await, successor);
    db.wait_for_group(&first, "2024-03-01T00:05:00", "minute 5").await;
    db.wait_for_group(&second, "2024-03-01T00:05:01", "minute 5").await;
    let expired = workers[alive]
        .metric("stream_worker_lease_takeovers_total", r#"reason="expired""#)
        .await;
    assert_eq!(expired, 1.0, "taken over because the lease expired");
    workers[alive].signal("TERM");
    assert_eq!(workers[alive].wait_exit().await.code(), Some(0));
    watch.finish().await;
}

#[tokio::test]
async fn a_paused_worker_cannot_checkpoint_over_its_successor_and_stops_reading() {
    let db = TestDb::new().await;
    let watch = LeaseWatch::start(&db);
    let people = users(&["fay", "gil"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-04-01T00:00:00", "open")
        .await;
    let mut workers = [spawn(&db, "alpha", "2000").await, spawn(&db, "beta", "2000").await];
    db.message(&group, &people[1], "2024-04-01T00:00:01", "one").await;
    db.wait_for_group(&group, "2024-04-01T00:00:01", "one").await;
    let paused_id = owner_among(&db, &["alpha", "beta"]).await;
    let paused = if paused_id == "alpha" { 0 } else { 1 };
    let successor = if paused_id == "alpha" { "beta" } else { "alpha" };

    workers[paused].signal("STOP");
    assert_eq!(
        owner_among(&db, &[successor]).await,
        successor,
        "taken over while paused"
    );
    db.message(&group, &people[0], "2024-04-01T00:00:02", "two").await;
    db.wait_for_group(&group, "2024-04-01T00:00:02", "two").await;

    workers[paused].signal("CONT");
    // The paused worker wakes up holding a lease it no longer owns: it must notice and stop.
    let noticed = wait_until(Duration::from_secs(30), || async {
        workers[paused].metric("stream_worker_lease_lost_total", "").await >= 1.0
    })
    .await;
    assert!(noticed, "the paused worker noticed the loss: {}", workers[paused].log());
    // The gauge follows at the end of that lease round.
    let let_go = wait_until(Duration::from_secs(30), || async {
        workers[paused].metric("stream_worker_leases_held", "").await == 0.0
    })
    .await;
    assert!(let_go, "the paused worker holds no lease");
    let received_after_loss = workers[paused].metric("stream_worker_records_received_total", "").await;
    db.message(&group, &people[1], "2024-04-01T00:00:03", "three").await;
    db.wait_for_group(&group, "2024-04-01T00:00:03", "three").await;
    db.wait_caught_up().await;
    for _ in 0..10 {
        let lease = db.leases().await.into_values().next().expect("lease");
        assert_eq!(
            s(&lease, "owner"),
            successor,
            "the paused worker never took the lease back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        workers[paused].metric("stream_worker_records_received_total", "").await,
        received_after_loss,
        "and read nothing more"
    );
    for worker in workers.iter_mut() {
        worker.signal("TERM");
        assert_eq!(worker.wait_exit().await.code(), Some(0));
    }
    watch.finish().await;
}

/// The lease-table scan of the owner turns slow (10 s per Scan, behind a proxy): its renewals go
/// on regardless, so a second worker never finds the lease expired and takes nothing.
#[tokio::test]
async fn renewals_go_on_while_the_lease_table_scan_is_slow() {
    use crate::proxy::{Fault, FaultProxy, Faults};
    let db = TestDb::new().await;
    let proxy = FaultProxy::start(&crate::support::endpoint(), Faults::none()).await;
    let owner = db
        .start_worker_via(
            &proxy.url(),
            &[
                ("lease_duration_ms", "1500"),
                ("lease_take_interval_ms", "100"),
                ("heartbeat_interval_ms", "200"),
                ("worker_id", "slow-scanner"),
            ],
        )
        .await;
    owner_among(&db, &["slow-scanner"]).await;
    proxy.set(Faults {
        share: 1.0,
        kinds: vec![Fault::Latency(Duration::from_secs(10))],
        target: Some("DynamoDB_20120810.Scan".into()),
    });
    let mut other = spawn(&db, "standby", "1500").await;
    // Five lease durations: an unrenewed lease would have been taken three times over.
    tokio::time::sleep(Duration::from_millis(7_500)).await;
    assert_eq!(
        db.owners().await.values().next().map(String::as_str),
        Some("slow-scanner"),
        "{}",
        other.log()
    );
    assert_eq!(
        other
            .metric("stream_worker_lease_takeovers_total", r#"reason="expired""#)
            .await,
        0.0
    );
    other.signal("TERM");
    other.wait_exit().await;
    proxy.set(Faults::none());
    tokio::time::timeout(Duration::from_secs(20), owner.stop())
        .await
        .expect("the owner stops");
}

/// Two live tasks given one worker id: the one whose lease is taken from under it by its twin
/// says so loudly (ERROR, metric) and leaves the twin's lease alone, instead of the two taking
/// the shard from each other every round.
#[tokio::test]
async fn two_live_tasks_with_one_worker_id_are_reported_and_do_not_fight() {
    let db = TestDb::new().await;
    let first = spawn(&db, "twin", "1500").await;
    owner_among(&db, &["twin"]).await;
    // Restart semantics: the second takes the lease under its id at once.
    let second = spawn(&db, "twin", "1500").await;
    let reported = wait_until(Duration::from_secs(15), || async {
        first.metric("stream_worker_duplicate_worker_id_total", "").await >= 1.0
    })
    .await;
    assert!(reported, "{}", first.log());
    assert!(first.log().contains("another live worker uses this worker id"));
    let taken = |worker: &ChildWorker| worker.log().matches("\"lease taken\"").count();
    let before = taken(&first) + taken(&second);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = taken(&first) + taken(&second);
    assert_eq!(after, before, "no tug of war: {}\n{}", first.log(), second.log());
}
