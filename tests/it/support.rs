//! Shared test plumbing: a database of its own per test on the DynamoDB Local that
//! `scripts/test` starts, an in-process worker, the binary, and reading the stream directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use cruddur_stream_worker::app;
use cruddur_stream_worker::aws::{self, AwsOverrides, Item};
use cruddur_stream_worker::config::{self, Settings, Sources};
use cruddur_stream_worker::groups::admin::{self, User};
use cruddur_stream_worker::groups::model::MessageInserted;
use cruddur_stream_worker::stream::{SequenceNumber, StreamReport, LEASE_TABLE_KEY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub const REGION: &str = "us-east-1";

/// The DynamoDB Local endpoint `scripts/test` started.
pub fn endpoint() -> String {
    std::env::var("CRUDDUR_TEST_DYNAMODB").unwrap_or_else(|_| {
        panic!("CRUDDUR_TEST_DYNAMODB is not set: run the suite with scripts/test (it starts DynamoDB Local)")
    })
}

/// SDK configuration for `endpoint` with an access key of its own.
async fn sdk_for(endpoint: &str, access_key: &str) -> SdkConfig {
    aws::load_sdk_config(AwsOverrides {
        endpoint_url: Some(endpoint.to_owned()),
        region: Some(REGION.to_owned()),
        credentials: Some((access_key.to_owned(), "secret".to_owned())),
    })
    .await
}

/// One test's own database: DynamoDB Local keeps one per access key.
#[derive(Clone)]
pub struct TestDb {
    pub access_key: String,
    pub sdk: SdkConfig,
    pub client: aws_sdk_dynamodb::Client,
    pub table: String,
    pub lease_table: String,
    /// Where this test's workers write dead letters (unless told to use a queue).
    pub dead_letter_file: PathBuf,
}

impl TestDb {
    /// A fresh database with the messages table created.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        admin::create_messages_table(&db.client, &db.table)
            .await
            .expect("create messages table");
        db
    }

    /// A fresh database with no tables.
    pub async fn empty() -> Self {
        // Worker logs show up with a failing test's output (nextest captures them).
        cruddur_stream_worker::telemetry::init_logging(
            cruddur_stream_worker::telemetry::LogFormat::Text,
            "warn,cruddur_stream_worker=info",
        );
        let access_key = format!("test{}", uuid::Uuid::new_v4().simple());
        let sdk = sdk_for(&endpoint(), &access_key).await;
        let client = aws::dynamodb_client(&sdk);
        let scratch = std::env::temp_dir().join(format!("cruddur-it-{access_key}"));
        std::fs::create_dir_all(&scratch).expect("scratch directory");
        Self {
            access_key,
            sdk,
            client,
            table: "cruddur-messages".into(),
            lease_table: "cruddur-stream-worker-leases".into(),
            dead_letter_file: scratch.join("dead-letters.jsonl"),
        }
    }

    /// Settings as the binary would load them, plus `overrides` (key, value), with fast polling
    /// and an ephemeral HTTP port.
    pub fn settings(&self, overrides: &[(&str, &str)]) -> Settings {
        let mut flags: Vec<(String, String, String)> = [
            ("http_addr", "127.0.0.1:0"),
            ("idle_interval_ms", "20"),
            ("shard_sync_interval_ms", "200"),
            ("checkpoint_interval_ms", "100"),
            ("retry_base_delay_ms", "10"),
            ("retry_max_delay_ms", "200"),
            ("worker_id", "test-worker"),
            ("dead_letter_file", self.dead_letter_file.to_str().expect("utf-8 path")),
        ]
        .iter()
        .chain(overrides)
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned(), format!("test override {key}")))
        .collect();
        if overrides.iter().any(|(key, _)| *key == "dead_letter_queue_url") {
            flags.push(("dead_letter_file".into(), String::new(), "test".into()));
        }
        flags.push(("table_name".into(), self.table.clone(), "test".into()));
        flags.push(("lease_table_name".into(), self.lease_table.clone(), "test".into()));
        config::load(&Sources {
            config_dir: repo().join("config"),
            environment: None,
            env_vars: BTreeMap::new(),
            flags,
        })
        .expect("test settings are valid")
    }

    /// Starts a worker in this process.
    pub async fn start_worker(&self, overrides: &[(&str, &str)]) -> TestWorker {
        self.start_worker_on(self.stream_source(), overrides).await
    }

    /// The binary, with this database's endpoint and credentials in its environment.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cruddur-stream-worker"));
        command
            .args(args)
            .current_dir(repo())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_ENDPOINT_URL_DYNAMODB", endpoint())
            .env("AWS_ENDPOINT_URL_DYNAMODB_STREAMS", endpoint())
            .env("AWS_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("WORKER_HTTP_ADDR", "127.0.0.1:0")
            .env("WORKER_LOG_FORMAT", "json")
            .env("WORKER_DEAD_LETTER_FILE", &self.dead_letter_file)
            .kill_on_drop(true);
        if let Ok(kinesis) = std::env::var("CRUDDUR_TEST_KINESIS") {
            command.env("AWS_ENDPOINT_URL_KINESIS", kinesis);
        }
        command
    }

    /// Opens a conversation the way the app does; returns its group uuid.
    pub async fn conversation(&self, from: &User, to: &User, at: &str, text: &str) -> String {
        let group = uuid::Uuid::new_v4().to_string();
        admin::create_conversation(
            &self.client,
            &self.table,
            &group,
            at,
            &uuid::Uuid::new_v4().to_string(),
            from,
            to,
            text,
        )
        .await
        .expect("create conversation");
        group
    }

    /// Posts a later message the way the app does.
    pub async fn message(&self, group: &str, sender: &User, at: &str, text: &str) {
        admin::put_message(
            &self.client,
            &self.table,
            group,
            at,
            &uuid::Uuid::new_v4().to_string(),
            sender,
            text,
        )
        .await
        .expect("put message");
    }

    /// Every group row of a conversation, read consistently from the table.
    pub async fn group_rows(&self, group: &str) -> Vec<Item> {
        let scan = self
            .client
            .scan()
            .table_name(&self.table)
            .consistent_read(true)
            .filter_expression("begins_with(pk, :grp) AND message_group_uuid = :group")
            .expression_attribute_values(":grp", AttributeValue::S("GRP#".into()))
            .expression_attribute_values(":group", AttributeValue::S(group.to_owned()));
        aws::scan_all(scan).await.expect("scan group rows")
    }

    /// Every item of the messages table, sorted, for before/after comparisons.
    pub async fn snapshot(&self) -> Vec<BTreeMap<String, String>> {
        let mut items: Vec<BTreeMap<String, String>> = admin::scan(&self.client, &self.table)
            .await
            .expect("scan")
            .into_iter()
            .map(|item| item.into_iter().map(|(k, v)| (k, format!("{v:?}"))).collect())
            .collect();
        items.sort();
        items
    }

    /// Waits until every participant of `group` has exactly one row at `sk` (in the canonical
    /// form group rows take) with `text`.
    pub async fn wait_for_group(&self, group: &str, sk: &str, text: &str) {
        let last = std::sync::Mutex::new(Vec::new());
        let done = wait_until(Duration::from_secs(30), || async {
            let rows = self.group_rows(group).await;
            let reached = rows.len() == 2
                && rows
                    .iter()
                    .all(|row| s(row, "sk") == canonical(sk) && s(row, "message") == text);
            *last.lock().expect("not poisoned") = rows;
            reached
        })
        .await;
        assert!(
            done,
            "group {group} never reached {sk} {text:?}; rows: {:#?}",
            last.lock().expect("not poisoned")
        );
    }

    /// Forgets every checkpoint (drops the lease table): the next worker replays the stream
    /// from its start.
    pub async fn forget_checkpoints(&self) {
        self.client
            .delete_table()
            .table_name(&self.lease_table)
            .send()
            .await
            .expect("drop leases");
    }

    /// A message event of `group` as the stream would carry it, with a uuid named after `sk`.
    pub fn message_event(group: &str, sender: &User, sk: &str, text: &str) -> MessageInserted {
        MessageInserted {
            group_uuid: group.to_owned(),
            sk: sk.to_owned(),
            at: cruddur_stream_worker::groups::timestamp::parse(sk).expect("timestamp"),
            message_uuid: Some(format!("m-{sk}")),
            text: text.to_owned(),
            sender_uuid: Some(sender.uuid.clone()),
        }
    }

    /// The lease row of every shard, by shard id.
    pub async fn leases(&self) -> BTreeMap<String, Item> {
        let scan = self.client.scan().table_name(&self.lease_table).consistent_read(true);
        let items = match aws::scan_all(scan).await {
            Ok(items) => items,
            Err(error) if error.is_code("ResourceNotFoundException") => Vec::new(),
            Err(error) => panic!("scan leases: {error}"),
        };
        items
            .into_iter()
            .map(|item| (s(&item, LEASE_TABLE_KEY).to_owned(), item))
            .collect()
    }

    /// Waits until the shard's checkpoint names the newest record in the stream: everything
    /// written so far has been handled.
    pub async fn wait_caught_up(&self) {
        let last = self
            .stream_records()
            .await
            .last()
            .map(|(seq, _, _)| seq.clone())
            .expect("records in the stream");
        let target = SequenceNumber::parse(&last).expect("a sequence number");
        // At or past it: the worker's own group-row writes add records after it.
        let caught_up = wait_until(Duration::from_secs(30), || async {
            self.leases()
                .await
                .values()
                .any(|lease| SequenceNumber::parse(s(lease, "checkpoint")).is_some_and(|at| at >= target))
        })
        .await;
        assert!(
            caught_up,
            "the checkpoint never reached {last}: {:#?}",
            self.leases().await
        );
    }

    /// Every record in the table's stream, in order: (sequence number, event name, pk).
    pub async fn stream_records(&self) -> Vec<(String, String, String)> {
        use aws_sdk_dynamodbstreams::types::ShardIteratorType;
        let streams = aws::streams_client(&self.sdk);
        let described = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .expect("describe table");
        let arn = described
            .table()
            .and_then(|t| t.latest_stream_arn())
            .expect("stream")
            .to_owned();
        let stream = streams
            .describe_stream()
            .stream_arn(&arn)
            .send()
            .await
            .expect("describe stream");
        let mut records = Vec::new();
        for shard in stream.stream_description().map(|d| d.shards()).unwrap_or_default() {
            let mut iterator = streams
                .get_shard_iterator()
                .stream_arn(&arn)
                .shard_id(shard.shard_id().unwrap_or_default())
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("iterator")
                .shard_iterator
                .expect("iterator");
            for _ in 0..1000 {
                let page = streams
                    .get_records()
                    .shard_iterator(&iterator)
                    .send()
                    .await
                    .expect("get records");
                if page.records().is_empty() {
                    break;
                }
                for record in page.records() {
                    let change = record.dynamodb().expect("change");
                    let pk = match change.keys().and_then(|k| k.get("pk")) {
                        Some(aws_sdk_dynamodbstreams::types::AttributeValue::S(pk)) => pk.clone(),
                        _ => String::new(),
                    };
                    let event = record.event_name().map(|e| e.as_str().to_owned()).unwrap_or_default();
                    records.push((change.sequence_number().unwrap_or_default().to_owned(), event, pk));
                }
                match page.next_shard_iterator {
                    Some(next) => iterator = next,
                    None => break,
                }
            }
        }
        records
    }
}

/// A worker running in this process.
pub struct TestWorker {
    pub http_addr: SocketAddr,
    running: Option<app::Running>,
    shutdown: CancellationToken,
}

impl TestWorker {
    /// Stops it as SIGTERM would and returns what it read.
    pub async fn stop(mut self) -> StreamReport {
        self.shutdown.cancel();
        let running = self.running.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), running.wait())
            .await
            .expect("worker stops within 30 s")
            .expect("worker stops cleanly")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http_addr, path).await
    }

    /// The sum of a metric's samples whose labels contain `labels` (e.g. `reason="remove"`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        metric_value(&body, name, labels)
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn metric_value(body: &str, name: &str, labels: &str) -> f64 {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            series_name == name && series_labels.contains(labels)
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read response");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, decode_chunked(&body))
}

/// Axum answers with chunked bodies when it does not know the length up front.
fn decode_chunked(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 {
            return out;
        }
        let Some(chunk) = after.get(..size) else {
            return body.to_owned();
        };
        out.push_str(chunk);
        rest = after.get(size + 2..).unwrap_or_default();
    }
}

/// Polls `condition` every 50 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A string attribute, or "" when absent.
pub fn s<'a>(item: &'a Item, name: &str) -> &'a str {
    match item.get(name) {
        Some(AttributeValue::S(value)) => value,
        _ => "",
    }
}

/// The form a group row's `sk` takes for a message at `sk`.
pub fn canonical(sk: &str) -> String {
    cruddur_stream_worker::groups::timestamp::canonical(sk).unwrap_or_else(|| panic!("{sk} is a timestamp"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Test users with handles unique to the test, so nothing leaks between tests by name.
pub fn users(names: &[&str]) -> Vec<User> {
    names.iter().map(|name| User::from_handle(name)).collect()
}

impl TestDb {
    /// The group uuid of some conversation of the user with this handle.
    pub async fn group_rows_of_any(&self, handle: &str) -> String {
        let user = User::from_handle(handle);
        let rows = admin::conversations(&self.client, &self.table, &user)
            .await
            .expect("query");
        s(rows.first().expect("a conversation"), "message_group_uuid").to_owned()
    }
}

impl TestDb {
    /// Starts a worker in this process on `source` instead of the table's own stream source.
    pub async fn start_worker_on<S: cruddur_stream_worker::stream::StreamSource>(
        &self,
        source: S,
        overrides: &[(&str, &str)],
    ) -> TestWorker {
        self.start_worker_with(&self.sdk, source, overrides).await
    }

    /// Starts a worker in this process on `source`, its other AWS calls made with `sdk`.
    pub async fn start_worker_with<S: cruddur_stream_worker::stream::StreamSource>(
        &self,
        sdk: &SdkConfig,
        source: S,
        overrides: &[(&str, &str)],
    ) -> TestWorker {
        let shutdown = CancellationToken::new();
        let running = app::start_with_source(&self.settings(overrides), sdk, source, shutdown.clone())
            .await
            .expect("worker starts");
        TestWorker {
            http_addr: running.http_addr,
            running: Some(running),
            shutdown,
        }
    }

    /// The table's real DynamoDB Streams source.
    pub fn stream_source(&self) -> cruddur_stream_worker::stream::DynamoDbStreamsSource {
        cruddur_stream_worker::stream::DynamoDbStreamsSource::new(
            self.client.clone(),
            aws::streams_client(&self.sdk),
            &self.table,
        )
    }
}

impl TestDb {
    /// Closes the current shard of every stream in this test's database (a child shard opens),
    /// through the launcher `scripts/test` starts DynamoDB Local with.
    pub async fn rollover(&self) {
        let control = std::env::var("CRUDDUR_TEST_DYNAMODB_CONTROL")
            .unwrap_or_else(|_| panic!("CRUDDUR_TEST_DYNAMODB_CONTROL is not set: run the suite with scripts/test"));
        let addr: SocketAddr = control.trim_start_matches("http://").parse().expect("control address");
        let (status, body) = http_get(addr, &format!("/rollover?key={}", self.access_key)).await;
        assert_eq!((status, body.as_str()), (200, "1"), "one database rolled over");
    }
}

/// The worker binary running as its own process, as on ECS.
pub struct ChildWorker {
    pub child: tokio::process::Child,
    pub http_addr: SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl TestDb {
    /// Starts `cruddur-stream-worker run ARGS` and waits until it listens.
    pub async fn spawn_worker_process(&self, args: &[&str]) -> ChildWorker {
        self.spawn_worker_process_with(args, &[]).await
    }

    /// [`Self::spawn_worker_process`] with extra environment variables.
    pub async fn spawn_worker_process_with(&self, args: &[&str], env: &[(&str, &str)]) -> ChildWorker {
        use tokio::io::AsyncBufReadExt;
        let mut command = self.command(&[&["run"], args].concat());
        command.envs(env.iter().copied());
        let mut child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn worker");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let collected = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = collected.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let address = || -> Option<SocketAddr> {
            let log = log.lock().expect("log");
            let started = log.lines().find(|line| line.contains("worker started"))?;
            let json: serde_json::Value = serde_json::from_str(started).ok()?;
            json["http_addr"].as_str()?.parse().ok()
        };
        let started = wait_until(Duration::from_secs(30), || async { address().is_some() }).await;
        assert!(started, "worker started: {}", log.lock().expect("log"));
        ChildWorker {
            child,
            http_addr: address().expect("address"),
            log,
        }
    }

    /// The owner of every lease row, by shard.
    pub async fn owners(&self) -> BTreeMap<String, String> {
        self.leases()
            .await
            .into_iter()
            .map(|(shard, lease)| (shard, s(&lease, "owner").to_owned()))
            .collect()
    }
}

impl ChildWorker {
    /// The process's resident memory now (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// Sends a signal by name (TERM, KILL, STOP, CONT).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{name} {pid}");
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait")
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = http_get(self.http_addr, "/metrics").await;
        metric_value(&body, name, labels)
    }
}

/// Watches the lease table in the background and checks what must always hold of it: every
/// lease counter only ever increases.
pub struct LeaseWatch {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl LeaseWatch {
    pub fn start(db: &TestDb) -> Self {
        let stop = CancellationToken::new();
        let (client, table, token) = (db.client.clone(), db.lease_table.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut last: BTreeMap<String, u64> = BTreeMap::new();
            let mut violations = Vec::new();
            for _ in 0..6000 {
                if token.is_cancelled() {
                    break;
                }
                let scan = client.scan().table_name(&table).consistent_read(true);
                if let Ok(items) = aws::scan_all(scan).await {
                    for item in items {
                        let shard = s(&item, LEASE_TABLE_KEY).to_owned();
                        let counter = match item.get("lease_counter") {
                            Some(AttributeValue::N(n)) => n.parse().unwrap_or(0),
                            _ => 0,
                        };
                        if let Some(previous) = last.insert(shard.clone(), counter) {
                            if counter < previous {
                                violations.push(format!("{shard}: counter went from {previous} to {counter}"));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            violations
        });
        Self { stop, task }
    }

    pub async fn finish(self) {
        self.stop.cancel();
        let violations = self.task.await.expect("watch");
        assert!(violations.is_empty(), "lease counters went backwards: {violations:?}");
    }
}

/// A Kinesis data stream of this test's own on the kinesalite `scripts/test` starts, carrying
/// the test table's changes as Kinesis Data Streams for DynamoDB would.
pub struct TestKinesis {
    pub client: aws_sdk_kinesis::Client,
    pub name: String,
}

impl TestDb {
    pub async fn kinesis_stream(&self, shards: i32) -> TestKinesis {
        let endpoint = std::env::var("CRUDDUR_TEST_KINESIS")
            .unwrap_or_else(|_| panic!("CRUDDUR_TEST_KINESIS is not set: run the suite with scripts/test"));
        let sdk = aws::load_sdk_config(AwsOverrides {
            endpoint_url: Some(endpoint),
            region: Some(REGION.to_owned()),
            credentials: Some((self.access_key.clone(), "secret".to_owned())),
        })
        .await;
        let client = aws::kinesis_client(&sdk);
        let name = format!("changes-{}", &self.access_key[4..16]);
        client
            .create_stream()
            .stream_name(&name)
            .shard_count(shards)
            .send()
            .await
            .expect("create stream");
        let stream = TestKinesis { client, name };
        stream.wait_active().await;
        stream
    }

    /// Writes a message the way the app does and publishes its change record.
    pub async fn kinesis_message(&self, stream: &TestKinesis, group: &str, sender: &User, at: &str, text: &str) {
        self.message(group, sender, at, text).await;
        stream.publish_item(self, &format!("MSG#{group}"), at).await;
    }

    /// Opens a conversation the way the app does and publishes its three change records.
    pub async fn kinesis_conversation(
        &self,
        stream: &TestKinesis,
        from: &User,
        to: &User,
        at: &str,
        text: &str,
    ) -> String {
        let group = self.conversation(from, to, at, text).await;
        for pk in [
            format!("GRP#{}", from.uuid),
            format!("GRP#{}", to.uuid),
            format!("MSG#{group}"),
        ] {
            stream.publish_item(self, &pk, at).await;
        }
        group
    }

    /// A worker in this process reading `stream`, its DynamoDB calls through `endpoint` (a proxy).
    pub async fn start_kinesis_worker_via(
        &self,
        stream: &TestKinesis,
        endpoint: &str,
        overrides: &[(&str, &str)],
    ) -> TestWorker {
        let sdk = self.sdk_via(endpoint).await;
        let source = cruddur_stream_worker::stream::KinesisSource::new(stream.client.clone(), &stream.name);
        self.start_worker_with(&sdk, source, overrides).await
    }

    /// A worker in this process reading `stream`.
    pub async fn start_kinesis_worker(&self, stream: &TestKinesis, overrides: &[(&str, &str)]) -> TestWorker {
        let source = cruddur_stream_worker::stream::KinesisSource::new(stream.client.clone(), &stream.name);
        self.start_worker_on(source, overrides).await
    }
}

impl TestKinesis {
    pub async fn wait_active(&self) {
        let active = wait_until(Duration::from_secs(30), || async {
            let summary = self
                .client
                .describe_stream_summary()
                .stream_name(&self.name)
                .send()
                .await;
            summary
                .ok()
                .and_then(|s| s.stream_description_summary)
                .is_some_and(|s| s.stream_status.as_str() == "ACTIVE")
        })
        .await;
        assert!(active, "stream {} active", self.name);
    }

    /// Publishes the INSERT change record of the item at (pk, sk), as read from the table,
    /// partitioned by pk as DynamoDB does, created now (in milliseconds, no precision field).
    async fn publish_item(&self, db: &TestDb, pk: &str, sk: &str) {
        let now = serde_json::json!(chrono::Utc::now().timestamp_millis());
        self.publish_change(db, pk, sk, now, None).await;
    }

    /// Publishes the INSERT change record of the item at (pk, sk) with this
    /// `ApproximateCreationDateTime` and, when given, `ApproximateCreationDateTimePrecision`.
    pub async fn publish_change(
        &self,
        db: &TestDb,
        pk: &str,
        sk: &str,
        created: serde_json::Value,
        precision: Option<&str>,
    ) {
        let item = db
            .client
            .get_item()
            .table_name(&db.table)
            .key("pk", AttributeValue::S(pk.to_owned()))
            .key("sk", AttributeValue::S(sk.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .expect("get item")
            .item
            .expect("the item exists");
        let image = dynamodb_json(&item);
        let keys = dynamodb_json(&Item::from([
            ("pk".to_owned(), AttributeValue::S(pk.to_owned())),
            ("sk".to_owned(), AttributeValue::S(sk.to_owned())),
        ]));
        let mut change = serde_json::json!({
            "eventName": "INSERT",
            "eventSource": "aws:dynamodb",
            "tableName": db.table,
            "dynamodb": { "ApproximateCreationDateTime": created, "Keys": keys, "NewImage": image },
        });
        if let Some(precision) = precision {
            change["dynamodb"]["ApproximateCreationDateTimePrecision"] = serde_json::json!(precision);
        }
        self.client
            .put_record()
            .stream_name(&self.name)
            .partition_key(pk)
            .data(aws_sdk_kinesis::primitives::Blob::new(change.to_string()))
            .send()
            .await
            .expect("put record");
    }

    /// Publishes change records (DynamoDB JSON, as Kinesis Data Streams for DynamoDB writes
    /// them) under one partition key, 500 to a PutRecords call.
    pub async fn publish_changes(&self, partition_key: &str, changes: &[serde_json::Value]) {
        for chunk in changes.chunks(500) {
            let entries: Vec<_> = chunk
                .iter()
                .map(|change| {
                    aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                        .partition_key(partition_key)
                        .data(aws_sdk_kinesis::primitives::Blob::new(change.to_string()))
                        .build()
                        .expect("entry")
                })
                .collect();
            // kinesalite drops a connection now and then under a parallel suite: try again
            // (bounded; a chunk partly stored and sent again only repeats records).
            let mut attempt = 0;
            loop {
                attempt += 1;
                let sent = self
                    .client
                    .put_records()
                    .stream_name(&self.name)
                    .set_records(Some(entries.clone()))
                    .send()
                    .await;
                match sent {
                    Ok(output) if output.failed_record_count.unwrap_or(0) == 0 => break,
                    other if attempt < 10 => {
                        let _ = other;
                        tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                    }
                    Ok(output) => panic!("{:?} records not published", output.failed_record_count),
                    Err(error) => panic!("put records: {error:?}"),
                }
            }
        }
    }

    /// Every shard: (id, parents, starting hash key, ending hash key, closed).
    pub async fn shards(&self) -> Vec<(String, Vec<String>, u128, u128, bool)> {
        let output = self
            .client
            .list_shards()
            .stream_name(&self.name)
            .send()
            .await
            .expect("list shards");
        output
            .shards
            .unwrap_or_default()
            .into_iter()
            .map(|shard| {
                let range = shard.hash_key_range.expect("hash range");
                (
                    shard.shard_id,
                    [shard.parent_shard_id, shard.adjacent_parent_shard_id]
                        .into_iter()
                        .flatten()
                        .collect(),
                    range.starting_hash_key.parse().expect("hash key"),
                    range.ending_hash_key.parse().expect("hash key"),
                    shard
                        .sequence_number_range
                        .is_some_and(|r| r.ending_sequence_number.is_some()),
                )
            })
            .collect()
    }
}

/// An item in DynamoDB JSON (strings, numbers, booleans, lists, maps: what the tests write).
fn dynamodb_json(item: &Item) -> serde_json::Value {
    fn value(v: &AttributeValue) -> serde_json::Value {
        match v {
            AttributeValue::S(s) => serde_json::json!({ "S": s }),
            AttributeValue::N(n) => serde_json::json!({ "N": n }),
            AttributeValue::Bool(b) => serde_json::json!({ "BOOL": b }),
            AttributeValue::Ss(ss) => serde_json::json!({ "SS": ss }),
            AttributeValue::L(l) => serde_json::json!({ "L": l.iter().map(value).collect::<Vec<_>>() }),
            AttributeValue::M(m) => serde_json::json!({ "M": dynamodb_json(m) }),
            _ => serde_json::json!({ "NULL": true }),
        }
    }
    serde_json::Value::Object(item.iter().map(|(k, v)| (k.clone(), value(v))).collect())
}

impl TestDb {
    /// The dead letters in this test's file, in the order written.
    pub fn dead_letters(&self) -> Vec<cruddur_stream_worker::deadletter::DeadLetter> {
        std::fs::read_to_string(&self.dead_letter_file)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a dead letter ({e}): {line}")))
            .collect()
    }

    /// The SDK configuration of this database, sent to `endpoint` (a proxy) instead.
    pub async fn sdk_via(&self, endpoint: &str) -> SdkConfig {
        sdk_for(endpoint, &self.access_key).await
    }

    /// Starts a worker in this process whose every AWS call goes through `endpoint`.
    pub async fn start_worker_via(&self, endpoint: &str, overrides: &[(&str, &str)]) -> TestWorker {
        let sdk = self.sdk_via(endpoint).await;
        let source = cruddur_stream_worker::stream::DynamoDbStreamsSource::new(
            aws::dynamodb_client(&sdk),
            aws::streams_client(&sdk),
            &self.table,
        );
        self.start_worker_with(&sdk, source, overrides).await
    }
}

/// The moto server `scripts/test` started (a real local SQS).
pub fn sqs_endpoint() -> String {
    std::env::var("CRUDDUR_TEST_SQS")
        .unwrap_or_else(|_| panic!("CRUDDUR_TEST_SQS is not set: run the suite with scripts/test (it starts moto)"))
}

/// A queue of this test's own on the local SQS.
pub struct TestQueue {
    pub client: aws_sdk_sqs::Client,
    pub url: String,
}

impl TestQueue {
    pub async fn create() -> Self {
        let sdk = aws::load_sdk_config(AwsOverrides {
            endpoint_url: Some(sqs_endpoint()),
            region: Some(REGION.to_owned()),
            credentials: Some(("test".to_owned(), "secret".to_owned())),
        })
        .await;
        let client = aws::sqs_client(&sdk);
        let name = format!("dead-letters-{}", uuid::Uuid::new_v4().simple());
        let created = client
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .expect("create queue");
        Self {
            client,
            url: created.queue_url.expect("queue url"),
        }
    }

    /// A worker's environment for dead letters to this queue on `sqs` (the local SQS).
    pub fn worker_env<'a>(&'a self, sqs: &'a str) -> [(&'static str, &'a str); 3] {
        [
            ("AWS_ENDPOINT_URL_SQS", sqs),
            ("WORKER_DEAD_LETTER_FILE", ""),
            ("WORKER_DEAD_LETTER_QUEUE_URL", self.url.as_str()),
        ]
    }

    /// Sets the queue's `MaximumMessageSize` (local SQS makes queues of 1 MiB; older queues,
    /// and many templates, have 256 KiB).
    pub async fn limit_messages_to(&self, bytes: usize) {
        self.client
            .set_queue_attributes()
            .queue_url(&self.url)
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::MaximumMessageSize,
                bytes.to_string(),
            )
            .send()
            .await
            .expect("set the message size limit");
    }

    /// Every message body in the queue, leaving them there (invisible for a while).
    pub async fn bodies(&self) -> Vec<String> {
        self.bodies_hidden_for(30).await
    }

    /// Every message body in the queue, hidden for `seconds` after (0: visible again at once).
    pub async fn bodies_hidden_for(&self, seconds: i32) -> Vec<String> {
        let mut bodies = Vec::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            let received = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .visibility_timeout(seconds)
                .send()
                .await
                .expect("receive");
            let messages: Vec<_> = received
                .messages
                .unwrap_or_default()
                .into_iter()
                .filter(|m| seen.insert(m.message_id.clone()))
                .collect();
            if messages.is_empty() {
                return bodies;
            }
            bodies.extend(messages.into_iter().filter_map(|m| m.body));
        }
    }
}
