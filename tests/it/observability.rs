//! What operators see: the worker's scrape passes `promtool check metrics`, a real Prometheus
//! (Debian's package, installed by scripts/test) stores its series, and `healthcheck` probes it.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::support::{users, wait_until, TestDb};

fn tool(variable: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| panic!("{variable} is not set: run the suite with scripts/test"))
}

#[tokio::test]
async fn a_live_scrape_passes_promtool_and_a_real_prometheus_stores_the_series() {
    let db = TestDb::new().await;
    let people = users(&["pam", "quy"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-06-01T00:00:00", "open")
        .await;
    db.message(&group, &people[1], "2024-06-01T00:00:01", "scraped").await;
    let worker = db.start_worker(&[]).await;
    db.wait_for_group(&group, "2024-06-01T00:00:01", "scraped").await;
    let counted = wait_until(Duration::from_secs(30), || async {
        worker.metric("stream_worker_group_updates_total", "").await >= 1.0
    })
    .await;
    assert!(counted);

    let (_, body) = worker.get("/metrics").await;
    let mut promtool = tokio::process::Command::new(tool("CRUDDUR_TEST_PROMTOOL"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .await
        .expect("write scrape");
    let linted = promtool.wait_with_output().await.expect("promtool runs");
    assert!(
        linted.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );

    // A real Prometheus scraping this worker every second, on loopback.
    let dir = std::env::temp_dir().join(format!("prometheus-{}", db.access_key));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: cruddur-stream-worker\n    static_configs:\n      - targets: [\"{}\"]\n",
        worker.http_addr
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("config");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let mut prometheus = tokio::process::Command::new(tool("CRUDDUR_TEST_PROMETHEUS"))
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");
    let api: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let query = "/api/v1/query?query=stream_worker_group_updates_total";
    let stored = wait_until(Duration::from_secs(60), || async {
        let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(api)).await
        else {
            return false;
        };
        drop(stream);
        let (status, body) = crate::support::http_get(api, query).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        status == 200
            && json["data"]["result"]
                .as_array()
                .is_some_and(|result| !result.is_empty())
    })
    .await;
    assert!(stored, "Prometheus returns the worker's series through its query API");
    prometheus.kill().await.expect("stop prometheus");
    let _ = std::fs::remove_dir_all(&dir);
    worker.stop().await;
}

#[tokio::test]
async fn healthcheck_exits_0_for_a_live_worker_and_1_otherwise() {
    let db = TestDb::empty().await;
    let worker = db.start_worker(&[]).await;
    // No AWS set-up at all: a container's health check must not need a region or credentials.
    let live = db
        .command(&["healthcheck", "--addr", &worker.http_addr.to_string()])
        .env_remove("AWS_REGION")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .await
        .expect("runs");
    assert!(live.status.success(), "{}", String::from_utf8_lossy(&live.stderr));
    let addr = worker.http_addr;
    worker.stop().await;
    let gone = db
        .command(&["healthcheck", "--addr", &addr.to_string()])
        .output()
        .await
        .expect("runs");
    assert_eq!(gone.status.code(), Some(1));
}

/// An update that cannot finish (every TransactWriteItems fails, retries never run out) with
/// records read behind it: the processing lag climbs with the clock while reads go on, and each
/// shard's series is there while the shard is read (the iterator age only says what was read).
#[tokio::test]
async fn a_stuck_update_makes_the_processing_lag_climb_while_reads_continue() {
    let db = TestDb::new().await;
    let people = users(&["lag", "lah"]);
    let group = db
        .conversation(&people[0], &people[1], "2024-08-01T00:00:00", "open")
        .await;
    db.message(&group, &people[1], "2024-08-01T00:00:01", "stuck").await;
    let proxy = crate::proxy::FaultProxy::failing("TransactWriteItems").await;
    let overrides = [("retry_max_attempts", "1000000"), ("retry_max_delay_ms", "100")];
    let worker = db.start_worker_via(&proxy.url(), &overrides).await;
    let lag = || async { worker.metric("stream_worker_processing_lag_seconds", "").await };
    let received = || async { worker.metric("stream_worker_records_received_total", "").await };
    assert!(
        wait_until(Duration::from_secs(30), || async { received().await >= 3.0 }).await,
        "the conversation and its message were read"
    );
    // A round publishes the lag: wait for the first one after the read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (lag_before, read_before) = (lag().await, received().await);
    let started = std::time::Instant::now();
    for n in 2..6 {
        db.message(&group, &people[0], &format!("2024-08-01T00:00:0{n}"), "behind")
            .await;
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (lag_after, read_after) = (lag().await, received().await);
    let waited = started.elapsed().as_secs_f64();
    assert!(
        read_after >= read_before + 4.0,
        "reads went on: {read_before} then {read_after}"
    );
    assert!(
        lag_after - lag_before >= waited - 2.0,
        "the lag climbed with the clock: {lag_before} s then {lag_after} s over {waited:.1} s"
    );
    let shard_lag = worker
        .metric("stream_worker_shard_processing_lag_seconds", "shard=")
        .await;
    assert!(shard_lag >= lag_after - 2.0, "the shard's series is there: {shard_lag}");
}
