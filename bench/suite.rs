//! The end-to-end benchmark driver: each scenario runs against a DynamoDB Local (`--endpoint`),
//! in databases of its own (a fresh access key per contender, so one never reads another's
//! records and each stays under DynamoDB Local's ~15 k stream-record slowdown), and prints one
//! JSON object. `bench/run` orchestrates the scenarios and writes docs/BENCHMARKS.md.
//!
//!   cargo bench --bench suite -- read-path --endpoint URL --records N
//!   cargo bench --bench suite -- drain     --endpoint URL --messages N --groups G --worker BIN
//!   cargo bench --bench suite -- latency   --endpoint URL --rate R --groups G --seconds S
//!                                          --idle-ms I --worker BIN
//!   cargo bench --bench suite -- drain-ceiling | drain-lambda (see bench/run)
//!   cargo bench --bench suite -- fleet     --endpoint URL --kinesis URL --worker BIN
//!                                          --workers W --shards S --seconds T (see bench/fleet)
//!   cargo bench --bench suite -- busy-shards --endpoint URL --kinesis URL --worker BIN
//!                                          --shards S --messages-per-shard M (see bench/shards.rs)

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, Delete, KeysAndAttributes, Put, TransactWriteItem};
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use cruddur_stream_worker::aws::{self, AwsOverrides, Item};
use cruddur_stream_worker::deadletter::DeadLetterDestination;
use cruddur_stream_worker::dispatch::{DispatchLimits, DispatchSettings, Dispatcher, Handler, Route};
use cruddur_stream_worker::groups::admin::{self, User};
use cruddur_stream_worker::retry::{RetryPolicy, Retryable};
use cruddur_stream_worker::stream::{
    DynamoDbStreamsSource, LeaseStore, Record, StartingPosition, StreamHealth, StreamSettings, StreamWorker,
};
use futures::{FutureExt as _, StreamExt as _};
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod fleet;
mod shards;

type Failure = Box<dyn std::error::Error + Send + Sync>;

const REGION: &str = "us-east-1";
const TABLE: &str = "cruddur-messages";
/// The worker binary's default lease table (config/default.toml).
const LEASE_TABLE: &str = "cruddur-stream-worker-leases";

/// Flags as `--name value` pairs.
struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: &[String]) -> Self {
        let mut flags = HashMap::new();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if let Some(name) = arg.strip_prefix("--") {
                if let Some(value) = iter.next() {
                    flags.insert(name.to_owned(), value.clone());
                }
            }
        }
        Self(flags)
    }

    fn text(&self, name: &str) -> Result<String, Failure> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| format!("--{name} is required").into())
    }

    fn number(&self, name: &str, default: u64) -> Result<u64, Failure> {
        match self.0.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| format!("--{name} {text:?} is not a number").into()),
        }
    }
}

/// A database of its own on the endpoint.
struct Db {
    access_key: String,
    endpoint: String,
    client: aws_sdk_dynamodb::Client,
    sdk: aws_config::SdkConfig,
}

impl Db {
    async fn fresh(endpoint: &str) -> Result<Self, Failure> {
        let access_key = format!("bench{}", uuid::Uuid::new_v4().simple());
        let sdk = aws::load_sdk_config(AwsOverrides {
            endpoint_url: Some(endpoint.to_owned()),
            region: Some(REGION.to_owned()),
            credentials: Some((access_key.clone(), "secret".to_owned())),
        })
        .await;
        let client = aws::dynamodb_client(&sdk);
        admin::create_messages_table(&client, TABLE).await?;
        // As deployed: the stack creates the lease table, the worker does not time its creation.
        LeaseStore::dynamodb(client.clone(), LEASE_TABLE, "bench")
            .ensure_table()
            .await?;
        Ok(Self {
            access_key,
            endpoint: endpoint.to_owned(),
            client,
            sdk,
        })
    }

    /// Deletes every table of this database once its figures are taken: DynamoDB Local keeps
    /// every database in one JVM, and left in place they slow the contenders that come later.
    async fn drop_tables(&self) -> Result<(), Failure> {
        let listed = self.client.list_tables().send().await?;
        for table in listed.table_names() {
            self.client.delete_table().table_name(table).send().await?;
        }
        Ok(())
    }

    /// The worker binary on this database.
    fn worker(&self, binary: &str, idle_ms: u64, dead_letters: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("run")
            .env_clear()
            .env("AWS_ENDPOINT_URL_DYNAMODB", &self.endpoint)
            .env("AWS_ENDPOINT_URL_DYNAMODB_STREAMS", &self.endpoint)
            .env("AWS_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env(
                "WORKER_HTTP_ADDR",
                std::env::var("BENCH_WORKER_HTTP").unwrap_or_else(|_| "127.0.0.1:0".into()),
            )
            .env("WORKER_LOG_FORMAT", "json")
            .env(
                "WORKER_LOG_LEVEL",
                std::env::var("BENCH_WORKER_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
            )
            .env("WORKER_IDLE_INTERVAL_MS", idle_ms.to_string())
            // Tuning runs: WORKER_* settings (and TOKIO_WORKER_THREADS) given to the suite reach the worker.
            .envs(std::env::vars().filter(|(name, _)| name.starts_with("WORKER_") || name.starts_with("TOKIO_")))
            .env("WORKER_DEAD_LETTER_FILE", dead_letters)
            .stdout(Stdio::null())
            .kill_on_drop(true);
        // BENCH_WORKER_LOG=<file> keeps the worker's warnings (retries, say) for a look afterwards.
        match std::env::var("BENCH_WORKER_LOG")
            .ok()
            .and_then(|path| std::fs::File::create(path).ok())
        {
            Some(file) => command.stderr(file),
            None => command.stderr(Stdio::null()),
        };
        command
    }
}

/// `n` distinct users and conversations between neighbours; timestamps unique per user.
fn people(count: usize) -> Vec<User> {
    (0..count).map(|i| User::from_handle(&format!("bench{i}"))).collect()
}

fn stamp(base: i64, offset_ms: i64) -> String {
    let at = chrono::DateTime::from_timestamp_millis(base + offset_ms).unwrap_or_default();
    // The canonical form (the app on a UTC clock): what the worker writes into group rows.
    at.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

/// Creates `groups` conversations (user 2i with user 2i+1) at distinct times.
async fn conversations(db: &Db, groups: usize) -> Result<Vec<(String, User, User)>, Failure> {
    let users = people(groups * 2);
    let base = chrono::Utc::now().timestamp_millis() - 86_400_000;
    let created = futures::stream::iter(0..groups)
        .map(|index| {
            let (a, b) = (users[index * 2].clone(), users[index * 2 + 1].clone());
            let group = uuid::Uuid::new_v4().to_string();
            async move {
                let at = stamp(base, index as i64);
                let message = uuid::Uuid::new_v4().to_string();
                admin::create_conversation(&db.client, TABLE, &group, &at, &message, &a, &b, "hello").await?;
                Ok::<_, Failure>((group, a, b))
            }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await;
    created.into_iter().collect()
}

/// Writes `count` messages round-robin over the groups, 16 in flight, timestamps increasing by
/// 1 ms from now; returns the newest (sk, text) per group.
async fn messages(
    db: &Db,
    groups: &[(String, User, User)],
    count: usize,
) -> Result<HashMap<String, (String, String)>, Failure> {
    let base = chrono::Utc::now().timestamp_millis();
    let written = futures::stream::iter(0..count)
        .map(|n| {
            let (group, a, b) = &groups[n % groups.len()];
            let sender = if n % 2 == 0 { a } else { b };
            let (at, text) = (stamp(base, n as i64), format!("message {n}"));
            async move {
                let id = uuid::Uuid::new_v4().to_string();
                admin::put_message(&db.client, TABLE, group, &at, &id, sender, &text).await?;
                Ok::<_, Failure>((group.clone(), at, text))
            }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await;
    let mut newest = HashMap::new();
    for result in written {
        let (group, at, text) = result?;
        newest.insert(group, (at, text));
    }
    Ok(newest)
}

/// Keys of both final group rows of every group.
fn final_keys(groups: &[(String, User, User)], newest: &HashMap<String, (String, String)>) -> Vec<(Item, String)> {
    let mut keys = Vec::new();
    for (group, a, b) in groups {
        let (at, text) = &newest[group];
        for owner in [a, b] {
            let key = Item::from([
                ("pk".to_owned(), AttributeValue::S(format!("GRP#{}", owner.uuid))),
                ("sk".to_owned(), AttributeValue::S(at.clone())),
            ]);
            keys.push((key, text.clone()));
        }
    }
    keys
}

/// How many of `keys` exist with their text.
async fn present(db: &Db, keys: &[(Item, String)]) -> Result<usize, Failure> {
    Ok(present_keys(db, keys).await?.len())
}

/// Which of `keys` exist with their text (BatchGetItem, 100 at a time).
async fn present_keys(db: &Db, keys: &[(Item, String)]) -> Result<Vec<(Item, String)>, Failure> {
    let mut found = Vec::new();
    for chunk in keys.chunks(100) {
        let mut wanted: HashMap<(String, String), &(Item, String)> = HashMap::new();
        let mut request = KeysAndAttributes::builder();
        for entry in chunk {
            let (key, _) = entry;
            let pk = key["pk"].as_s().map_err(|_| "pk")?.clone();
            let sk = key["sk"].as_s().map_err(|_| "sk")?.clone();
            if wanted.insert((pk, sk), entry).is_none() {
                request = request.keys(key.clone());
            }
        }
        let mut pending = Some(request.build()?);
        while let Some(keys) = pending.take() {
            let output = db.client.batch_get_item().request_items(TABLE, keys).send().await?;
            for item in output.responses.and_then(|mut r| r.remove(TABLE)).unwrap_or_default() {
                let field = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
                if let Some(entry) = wanted.get(&(field("pk"), field("sk"))) {
                    if entry.1 == field("message") {
                        found.push((*entry).clone());
                    }
                }
            }
            pending = output.unprocessed_keys.and_then(|mut left| left.remove(TABLE));
        }
    }
    Ok(found)
}

/// Polls until every key is present; returns the elapsed time since `started`, or `None`
/// after `limit`.
async fn wait_final(
    db: &Db,
    keys: &[(Item, String)],
    started: Instant,
    limit: Duration,
) -> Result<Option<f64>, Failure> {
    while started.elapsed() < limit {
        if present(db, keys).await? == keys.len() {
            return Ok(Some(started.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}

/// A handler that does nothing: the read path's own cost.
struct Noop {
    routed: AtomicU64,
    /// When the first record was routed: the worker's start-up, seen from the outside.
    first: std::sync::OnceLock<Instant>,
}

#[derive(Debug)]
struct NeverFails;

impl std::fmt::Display for NeverFails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl Retryable for NeverFails {
    fn is_retryable(&self) -> bool {
        false
    }
}

impl Handler for Noop {
    type Event = ();
    type Error = NeverFails;

    fn route(&self, record: &Record) -> Route<()> {
        self.routed.fetch_add(1, Ordering::Relaxed);
        self.first.get_or_init(Instant::now);
        // Keyed like the real handler (by conversation: the pk), so coalescing works as it does there.
        let key = match record.keys.get("pk") {
            Some(AttributeValue::S(pk)) => pk.clone(),
            _ => String::new(),
        };
        Route::Apply { key, event: () }
    }

    fn supersedes(&self, _: &(), _: &()) -> bool {
        true
    }

    async fn handle(&self, _: &()) -> Result<(), NeverFails> {
        Ok(())
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        base_delay: Duration::from_millis(50),
        max_delay: Duration::from_secs(5),
        max_attempts: None,
    }
}

/// An iterator on the table's one stream shard (DynamoDB Local gives a stream one shard).
async fn shard_iterator(
    db: &Db,
    streams: &aws_sdk_dynamodbstreams::Client,
    kind: ShardIteratorType,
) -> Result<Option<String>, Failure> {
    let described = db.client.describe_table().table_name(TABLE).send().await?;
    let arn = described.table.and_then(|t| t.latest_stream_arn).ok_or("no stream")?;
    let stream = streams.describe_stream().stream_arn(&arn).send().await?;
    let shard = stream
        .stream_description
        .and_then(|d| d.shards)
        .and_then(|mut shards| shards.pop())
        .and_then(|shard| shard.shard_id)
        .ok_or("no shard")?;
    let output = streams
        .get_shard_iterator()
        .stream_arn(&arn)
        .shard_id(shard)
        .shard_iterator_type(kind)
        .send()
        .await?;
    Ok(output.shard_iterator)
}

/// How fast a contender read: records a second over the whole read, and the seconds from its
/// start to its first record (what start-up costs it).
struct ReadTimes {
    rate: f64,
    first_record: f64,
}

/// A bare GetRecords loop over the table's one shard, from the horizon. With `hold`, each page
/// is kept until the next one is decoded (as a reader that reads ahead keeps it): a diagnostic
/// of what keeping a page alive costs the decoding of the next.
async fn bare_read(db: &Db, records: u64, hold: bool) -> Result<ReadTimes, Failure> {
    let streams = aws::streams_client(&db.sdk);
    let started = Instant::now();
    let mut iterator = shard_iterator(db, &streams, ShardIteratorType::TrimHorizon).await?;
    let mut seen = 0u64;
    let mut first = None;
    let mut held = None;
    while let Some(current) = iterator.take() {
        let mut output = streams.get_records().shard_iterator(current).limit(1000).send().await?;
        let page = output.records.take().unwrap_or_default();
        seen += page.len() as u64;
        if hold {
            held = Some(page);
        } else {
            drop(page);
        }
        if seen > 0 {
            first.get_or_insert_with(|| started.elapsed().as_secs_f64());
        }
        if seen >= records {
            break;
        }
        iterator = output.next_shard_iterator;
    }
    let rate = seen as f64 / started.elapsed().as_secs_f64();
    drop(held);
    Ok(ReadTimes {
        rate,
        first_record: first.unwrap_or(f64::NAN),
    })
}

/// The stream worker with a handler that does nothing, from the horizon.
async fn worker_read(db: &Db, records: u64, run: usize) -> Result<ReadTimes, Failure> {
    let handler = Arc::new(Noop {
        routed: AtomicU64::new(0),
        first: std::sync::OnceLock::new(),
    });
    let scratch = std::env::temp_dir().join(format!("bench-dead-letters-{}.jsonl", db.access_key));
    let dispatcher = Arc::new(Dispatcher::new(
        handler.clone(),
        DispatchSettings {
            limits: DispatchLimits {
                max_in_flight: 64,
                max_pending_records: 20_000,
                max_folded_records: 5_000,
                read_ahead_bytes: 64 << 20,
                max_record_age: None,
            },
            retry: policy(),
            dead_letters: DeadLetterDestination::File(scratch),
            worker_id: "bench".into(),
        },
    ));
    let source = DynamoDbStreamsSource::new(db.client.clone(), aws::streams_client(&db.sdk), TABLE);
    let leases = LeaseStore::dynamodb(db.client.clone(), format!("bench-leases-{run}"), "bench");
    leases.ensure_table().await?;
    let settings = StreamSettings {
        starting_position: StartingPosition::TrimHorizon,
        batch_size: 1000,
        idle_interval: Duration::from_millis(250),
        max_idle_interval: Duration::from_millis(250),
        max_reads_per_second: 1000,
        shard_sync_interval: Duration::from_secs(10),
        checkpoint_interval: Duration::from_secs(1),
        lease_duration: Duration::from_secs(10),
        lease_take_interval: Duration::from_millis(500),
        heartbeat_interval: Duration::from_millis(200),
        status_interval: Duration::from_secs(3600),
        retry: policy(),
    };
    let worker = StreamWorker::new(
        source,
        dispatcher.clone(),
        leases,
        settings,
        Arc::new(StreamHealth::default()),
    );
    let stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(worker.run(stop.clone()));
    while handler.routed.load(Ordering::Relaxed) < records || dispatcher.in_flight() > 0 {
        if started.elapsed() > Duration::from_secs(300) {
            return Err("the worker did not read every record within 300 s".into());
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let rate = records as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    task.await??;
    let first_record = handler.first.get().map_or(f64::NAN, |at| (*at - started).as_secs_f64());
    Ok(ReadTimes { rate, first_record })
}

async fn read_path(flags: &Flags) -> Result<serde_json::Value, Failure> {
    let records = flags.number("records", 10_000)?;
    let rounds = flags.number("rounds", 3)? as usize;
    let db = Db::fresh(&flags.text("endpoint")?).await?;
    let groups = conversations(&db, 50).await?;
    messages(&db, &groups, records.saturating_sub(150) as usize).await?;
    let (mut bare, mut worker) = (Vec::new(), Vec::new());
    let (mut bare_first, mut worker_first) = (Vec::new(), Vec::new());
    let (mut held, mut held_cpu) = (Vec::new(), Vec::new());
    // CPU of this process per record read: the machine-independent cost of each contender
    // (DynamoDB Local runs on the same cores, so any extra CPU also slows the reads).
    let (mut bare_cpu, mut worker_cpu) = (Vec::new(), Vec::new());
    let cpu = || footprint(std::process::id()).map(|(seconds, _)| seconds);
    let per_record = |before: f64, after: f64| (after - before) / records as f64 * 1e6;
    for run in 0..rounds {
        // Alternate, so that drift on the machine hits both alike.
        let before = cpu()?;
        let times = bare_read(&db, records, false).await?;
        bare.push(times.rate);
        bare_first.push(times.first_record);
        let between = cpu()?;
        let times = worker_read(&db, records, run).await?;
        worker.push(times.rate);
        worker_first.push(times.first_record);
        let after = cpu()?;
        bare_cpu.push(per_record(before, between));
        worker_cpu.push(per_record(between, after));
        held.push(bare_read(&db, records, true).await?.rate);
        held_cpu.push(per_record(after, cpu()?));
    }
    let best = |rates: &[f64]| rates.iter().copied().fold(0.0, f64::max);
    db.drop_tables().await?;
    Ok(json!({
        "scenario": "read_path", "records": records, "rounds": rounds,
        "bare_records_per_second": bare, "worker_records_per_second": worker,
        "bare_cpu_us_per_record": bare_cpu, "worker_cpu_us_per_record": worker_cpu,
        "bare_first_record_seconds": bare_first, "worker_first_record_seconds": worker_first,
        "bare_holding_records_per_second": held, "bare_holding_cpu_us_per_record": held_cpu,
        "ratio_of_best": best(&worker) / best(&bare),
    }))
}

/// A backlog in one database: its final group-row keys and texts.
struct Seeded {
    db: Db,
    keys: Vec<(Item, String)>,
}

/// Seeds `--databases` fresh databases (1 by default), each with its part of `--groups`
/// conversations and `--messages` later messages: a backlog past DynamoDB Local's ~15 k
/// stream-record slowdown is split so that the slowdown does not decide the figure. Returns
/// them and the messages in all.
async fn seeded(flags: &Flags) -> Result<(Vec<Seeded>, usize), Failure> {
    let databases = flags.number("databases", 1)?.max(1) as usize;
    let groups = flags.number("groups", 200)? as usize / databases;
    let count = flags.number("messages", 4_000)? as usize / databases;
    let mut seeded = Vec::new();
    for _ in 0..databases {
        let db = Db::fresh(&flags.text("endpoint")?).await?;
        let conversations = conversations(&db, groups).await?;
        let newest = messages(&db, &conversations, count).await?;
        seeded.push(Seeded {
            keys: final_keys(&conversations, &newest),
            db,
        });
    }
    Ok((seeded, count * databases))
}

/// Waits for every database's final rows: the time the last one took, `None` past `limit`.
async fn wait_all(seeded: &[Seeded], started: Instant, limit: Duration) -> Result<Option<f64>, Failure> {
    let waits = seeded.iter().map(|one| wait_final(&one.db, &one.keys, started, limit));
    let times = futures::future::try_join_all(waits).await?;
    Ok(times
        .into_iter()
        .try_fold(0.0, |most: f64, time| time.map(|time| most.max(time))))
}

async fn drop_all(seeded: &[Seeded]) -> Result<(), Failure> {
    for one in seeded {
        one.db.drop_tables().await?;
    }
    Ok(())
}

fn conversations_in(seeded: &[Seeded]) -> usize {
    seeded.iter().map(|one| one.keys.len() / 2).sum()
}

/// The worker binary drains a backlog written while nothing consumed it (one worker process per
/// database): how long, its peak RSS and CPU (the largest of the processes), and from their
/// /metrics the records read, updates and TransactWriteItems calls (summed).
async fn drain(flags: &Flags) -> Result<serde_json::Value, Failure> {
    let (seeded, count) = seeded(flags).await?;
    // Wall-clock start, so that bench/drain-timeline can line the worker's log up with it.
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64());
    let started = Instant::now();
    let mut workers = Vec::new();
    for one in &seeded {
        let scratch = std::env::temp_dir().join(format!("bench-{}.jsonl", one.db.access_key));
        let http = match std::env::var("BENCH_WORKER_HTTP").ok().filter(|_| seeded.len() == 1) {
            Some(addr) => addr,
            None => format!("127.0.0.1:{}", free_port()?),
        };
        let child = one
            .db
            .worker(&flags.text("worker")?, 250, &scratch.to_string_lossy())
            .env("WORKER_HTTP_ADDR", &http)
            .spawn()?;
        workers.push((child, http));
    }
    let seconds = wait_all(&seeded, started, Duration::from_secs(600)).await?;
    let (mut cpu_seconds, mut peak_rss, mut counts) = (0.0f64, 0u64, WorkerCounts::default());
    for (child, http) in &mut workers {
        let (cpu, rss) = child.id().map_or(Ok((0.0, 0)), footprint)?;
        (cpu_seconds, peak_rss) = (cpu_seconds.max(cpu), peak_rss.max(rss));
        counts.add(worker_counts(http).await);
    }
    keep_worker_metrics().await;
    for (child, _) in &mut workers {
        child.kill().await?;
    }
    drop_all(&seeded).await?;
    let per_call = counts.updates / counts.calls.max(1.0);
    Ok(
        json!({ "scenario": "drain", "contender": "worker", "messages": count, "groups": conversations_in(&seeded),
               "databases": seeded.len(), "seconds": seconds, "started_unix": started_unix,
               "peak_rss_bytes": peak_rss, "cpu_seconds": cpu_seconds, "records_read": counts.records,
               "updates": counts.updates, "transact_calls": counts.calls, "conversations_per_call": per_call }),
    )
}

fn free_port() -> Result<u16, Failure> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What a worker's /metrics says it did.
#[derive(Default)]
struct WorkerCounts {
    records: f64,
    updates: f64,
    calls: f64,
}

impl WorkerCounts {
    fn add(&mut self, other: WorkerCounts) {
        self.records += other.records;
        self.updates += other.updates;
        self.calls += other.calls;
    }
}

/// Sums of the worker's counters (every label set), read from its /metrics with curl.
async fn worker_counts(addr: &str) -> WorkerCounts {
    let Ok(output) = tokio::process::Command::new("curl")
        .args(["-s", &format!("http://{addr}/metrics")])
        .output()
        .await
    else {
        return WorkerCounts::default();
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
            .filter(|line| name != "stream_worker_group_updates_total" || line.contains("outcome=\"applied\""))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    WorkerCounts {
        records: sum("stream_worker_records_received_total"),
        updates: sum("stream_worker_group_updates_total"),
        calls: sum("stream_worker_write_transactions_total"),
    }
}

/// The seed Lambda's logic as a Python boto3 poller (one per database), on the same backlog.
async fn drain_lambda(flags: &Flags) -> Result<serde_json::Value, Failure> {
    let (seeded, count) = seeded(flags).await?;
    let started = Instant::now();
    let mut pollers = Vec::new();
    for one in &seeded {
        let child = tokio::process::Command::new("python3")
            .arg(flags.text("poller")?)
            .env("AWS_ENDPOINT_URL", &one.db.endpoint)
            .env("AWS_REGION", REGION)
            .env("AWS_DEFAULT_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", &one.db.access_key)
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        pollers.push(child);
    }
    let limit = Duration::from_secs(flags.number("limit-seconds", 900)?);
    let seconds = wait_all(&seeded, started, limit).await?;
    for child in &mut pollers {
        child.kill().await?;
    }
    drop_all(&seeded).await?;
    Ok(
        json!({ "scenario": "drain", "contender": "lambda_logic", "messages": count, "groups": conversations_in(&seeded),
               "databases": seeded.len(), "seconds": seconds, "limit_seconds": limit.as_secs() }),
    )
}

/// The ceiling: knowing the final state, the fewest calls that reach it: TransactWriteItems of
/// `--pack` conversations each (delete both old rows, put both new ones; 25 conversations make
/// the API's 100 actions), 32 in flight. No stream read at all.
async fn drain_ceiling(flags: &Flags) -> Result<serde_json::Value, Failure> {
    let (seeded, count) = seeded(flags).await?;
    let conditional = flags.number("conditional", 0)? == 1;
    // Conversations per TransactWriteItems (4 actions each; the API takes up to 100 actions).
    let pack = flags.number("pack", 1)?.clamp(1, 25) as usize;
    let mut plans = Vec::new();
    for one in &seeded {
        plans.push(ceiling_plan(one).await?);
    }
    let failed = CancellationToken::new();
    let started = Instant::now();
    let writes = futures::future::join_all(
        seeded
            .iter()
            .zip(&plans)
            .map(|(one, plan)| ceiling_writes(&one.db, plan, conditional, pack)),
    )
    .map(|results| {
        if results.iter().any(Result::is_err) {
            failed.cancel();
        }
        (results, started.elapsed().as_secs_f64())
    });
    // Timed by the same observer as every other contender (polling the final rows while the
    // writes run), so that its reads load DynamoDB Local alike and its lag counts alike.
    let observed = failed.run_until_cancelled(wait_all(&seeded, started, Duration::from_secs(600)));
    let ((results, writes_seconds), seconds) = tokio::join!(writes, observed);
    for result in results {
        result?;
    }
    let seconds = seconds.ok_or("the ceiling's writes failed")?;
    drop_all(&seeded).await?;
    Ok(
        json!({ "scenario": "drain", "contender": if conditional { "ceiling_conditional" } else { "ceiling" },
               "messages": count, "groups": conversations_in(&seeded), "databases": seeded.len(),
               "seconds": seconds?, "writes_seconds": writes_seconds }),
    )
}

/// What the ceiling writes in one database: each conversation's group rows as stored, and each
/// owner's final key and text.
struct CeilingPlan {
    conversations: Vec<Vec<Item>>,
    target: HashMap<String, (String, String)>,
}

async fn ceiling_plan(one: &Seeded) -> Result<CeilingPlan, Failure> {
    let rows = aws::scan_all(
        one.db
            .client
            .scan()
            .table_name(TABLE)
            .filter_expression("begins_with(pk, :grp)")
            .expression_attribute_values(":grp", AttributeValue::S("GRP#".into())),
    )
    .await?;
    let target = one
        .keys
        .iter()
        .map(|(key, text)| {
            let field = |name: &str| key[name].as_s().cloned().unwrap_or_default();
            (field("pk"), (field("sk"), text.clone()))
        })
        .collect();
    let mut by_group: HashMap<String, Vec<Item>> = HashMap::new();
    for row in rows {
        let group = row
            .get("message_group_uuid")
            .and_then(|v| v.as_s().ok())
            .cloned()
            .unwrap_or_default();
        by_group.entry(group).or_default().push(row);
    }
    Ok(CeilingPlan {
        conversations: by_group.into_values().collect(),
        target,
    })
}

/// The ceiling's transactions in one database, `pack` conversations each, 32 in flight.
async fn ceiling_writes(db: &Db, plan: &CeilingPlan, conditional: bool, pack: usize) -> Result<(), Failure> {
    let target = &plan.target;
    let results: Vec<Result<(), Failure>> =
        futures::stream::iter(plan.conversations.chunks(pack).map(<[Vec<Item>]>::concat))
            .map(|rows| async move {
                let mut items = Vec::new();
                for row in rows {
                    let pk = row["pk"].as_s().map_err(|_| "pk")?.clone();
                    let (sk, text) = target.get(&pk).ok_or("unknown owner")?;
                    let mut moved = row.clone();
                    moved.insert("sk".into(), AttributeValue::S(sk.clone()));
                    moved.insert("message".into(), AttributeValue::S(text.clone()));
                    let key = Item::from([
                        ("pk".to_owned(), row["pk"].clone()),
                        ("sk".to_owned(), row["sk"].clone()),
                    ]);
                    let mut delete = Delete::builder().table_name(TABLE).set_key(Some(key));
                    let mut put = Put::builder().table_name(TABLE).set_item(Some(moved));
                    if conditional {
                        // The worker's safety: delete only if stored unchanged, put only into a free key.
                        let mut condition = String::from("attribute_exists(pk)");
                        for (index, (name, value)) in row.iter().filter(|(n, _)| *n != "pk" && *n != "sk").enumerate() {
                            condition.push_str(&format!(" AND #a{index} = :v{index}"));
                            delete = delete
                                .expression_attribute_names(format!("#a{index}"), name)
                                .expression_attribute_values(format!(":v{index}"), value.clone());
                        }
                        delete = delete.condition_expression(condition);
                        put = put.condition_expression("attribute_not_exists(pk)");
                    }
                    items.push(TransactWriteItem::builder().delete(delete.build()?).build());
                    items.push(TransactWriteItem::builder().put(put.build()?).build());
                }
                db.client
                    .transact_write_items()
                    .set_transact_items(Some(items))
                    .send()
                    .await?;
                Ok::<_, Failure>(())
            })
            .buffer_unordered(32)
            .collect()
            .await;
    results.into_iter().collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// /proc figures of a process: (CPU seconds, peak RSS bytes).
fn footprint(pid: u32) -> Result<(f64, u64), Failure> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(") ").ok_or("stat")?.1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or("VmHWM")?
        .parse()?;
    // USER_HZ is 100 on Linux.
    Ok((ticks / 100.0, peak_kib * 1024))
}

/// The floor for steady latency: the least a consumer can do per message on this stream. It
/// polls GetRecords (waiting `idle` after an empty read, like the worker), knows every group
/// row's key from memory (it is their only writer), and moves both rows in one
/// TransactWriteItems per message, without reading anything. Runs until `stop`.
async fn floor_consumer(
    db: Arc<Db>,
    groups: Arc<Vec<(String, User, User)>>,
    idle: Duration,
    stop: CancellationToken,
) -> Result<(), Failure> {
    let streams = aws::streams_client(&db.sdk);
    let mut iterator = shard_iterator(&db, &streams, ShardIteratorType::Latest).await?;
    // Current sk of each group's rows, and who its participants are.
    let members: HashMap<String, (User, User)> = groups
        .iter()
        .map(|(g, a, b)| (g.clone(), (a.clone(), b.clone())))
        .collect();
    let rows = aws::scan_all(db.client.scan().table_name(TABLE).consistent_read(true)).await?;
    let mut current: HashMap<String, Item> = HashMap::new();
    for row in rows {
        if let Some(pk) = row
            .get("pk")
            .and_then(|v| v.as_s().ok())
            .filter(|pk| pk.starts_with("GRP#"))
        {
            current.insert(pk.clone(), row);
        }
    }
    let current = Arc::new(tokio::sync::Mutex::new(current));
    let mut moves = tokio::task::JoinSet::new();
    while let Some(at) = iterator.take() {
        if stop.is_cancelled() {
            break;
        }
        let output = streams.get_records().shard_iterator(at).limit(1000).send().await?;
        let records = output.records.unwrap_or_default();
        let mut any = false;
        for record in records {
            let Some(change) = record.dynamodb else { continue };
            let keys = change.keys.unwrap_or_default();
            let text_of = |item: &HashMap<String, aws_sdk_dynamodbstreams::types::AttributeValue>, name: &str| {
                item.get(name).and_then(|v| v.as_s().ok()).cloned()
            };
            let Some(pk) = text_of(&keys, "pk").filter(|pk| pk.starts_with("MSG#")) else {
                continue;
            };
            if record.event_name.as_ref().map(|e| e.as_str()) != Some("INSERT") {
                continue;
            }
            any = true;
            let (Some(sk), Some(text)) = (
                text_of(&keys, "sk"),
                change.new_image.as_ref().and_then(|i| text_of(i, "message")),
            ) else {
                continue;
            };
            let Some((a, b)) = members.get(&pk["MSG#".len()..]).cloned() else {
                continue;
            };
            let (db, current) = (db.clone(), current.clone());
            moves.spawn(async move {
                let mut items = Vec::new();
                let mut state = current.lock().await;
                for owner in [&a, &b] {
                    let owner_pk = format!("GRP#{}", owner.uuid);
                    let Some(old) = state.get(&owner_pk).cloned() else {
                        continue;
                    };
                    let mut moved = old.clone();
                    moved.insert("sk".into(), AttributeValue::S(sk.clone()));
                    moved.insert("message".into(), AttributeValue::S(text.clone()));
                    let key = Item::from([
                        ("pk".to_owned(), old["pk"].clone()),
                        ("sk".to_owned(), old["sk"].clone()),
                    ]);
                    items.push(
                        TransactWriteItem::builder()
                            .delete(Delete::builder().table_name(TABLE).set_key(Some(key)).build()?)
                            .build(),
                    );
                    items.push(
                        TransactWriteItem::builder()
                            .put(Put::builder().table_name(TABLE).set_item(Some(moved.clone())).build()?)
                            .build(),
                    );
                    state.insert(owner_pk, moved);
                }
                drop(state);
                db.client
                    .transact_write_items()
                    .set_transact_items(Some(items))
                    .send()
                    .await?;
                Ok::<_, Failure>(())
            });
        }
        iterator = output.next_shard_iterator;
        if !any {
            tokio::time::sleep(idle).await;
        }
    }
    while let Some(result) = moves.join_next().await {
        result??;
    }
    Ok(())
}

/// With BENCH_WORKER_HTTP=127.0.0.1:N, keeps the worker's /metrics in
/// /tmp/bench-worker-metrics.txt for a look afterwards (calls made, updates, lookups).
async fn keep_worker_metrics() {
    if let Ok(addr) = std::env::var("BENCH_WORKER_HTTP") {
        let _ = tokio::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/tmp/bench-worker-metrics.txt",
                &format!("http://{addr}/metrics"),
            ])
            .status()
            .await;
    }
}

/// A message whose rows are awaited: their final keys and texts, and when PutItem returned.
type Pending = (Vec<(Item, String)>, Instant);

/// A writer at a fixed rate; latency from PutItem's return until both group rows show it.
async fn latency(flags: &Flags) -> Result<serde_json::Value, Failure> {
    let rate = flags.number("rate", 200)?;
    let seconds = flags.number("seconds", 20)?;
    let idle_ms = flags.number("idle-ms", 250)?;
    let db = Arc::new(Db::fresh(&flags.text("endpoint")?).await?);
    let groups = Arc::new(conversations(&db, flags.number("groups", 500)? as usize).await?);
    let floor = flags.text("contender").unwrap_or_default() == "floor";
    let scratch = std::env::temp_dir().join(format!("bench-{}.jsonl", db.access_key));
    let floor_stop = CancellationToken::new();
    let (mut child, floor_task) = if floor {
        let task = tokio::spawn(floor_consumer(
            db.clone(),
            groups.clone(),
            Duration::from_millis(idle_ms),
            floor_stop.clone(),
        ));
        (None, Some(task))
    } else {
        (
            Some(
                db.worker(&flags.text("worker")?, idle_ms, &scratch.to_string_lossy())
                    .spawn()?,
            ),
            None,
        )
    };
    let pid = match &child {
        Some(child) => child.id().ok_or("worker pid")?,
        None => std::process::id(),
    };
    // Let it start, take the lease and catch up with the conversations.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu_before, _) = footprint(pid)?;
    let steady = Instant::now();
    let pending: Arc<tokio::sync::Mutex<Vec<Pending>>> = Default::default();
    let latencies: Arc<tokio::sync::Mutex<Vec<f64>>> = Default::default();
    let done = CancellationToken::new();
    let checker = {
        let (db, pending, latencies, done) = (db.clone(), pending.clone(), latencies.clone(), done.clone());
        tokio::spawn(async move {
            // One pass over every pending message every 10 ms: keys in BatchGetItem calls of 100, 2 in
            // flight, so that checking keeps up with the writer and adds ~one round trip.
            loop {
                let batch: Vec<_> = pending.lock().await.drain(..).collect();
                if batch.is_empty() && done.is_cancelled() {
                    return Ok::<_, Failure>(());
                }
                let checked = futures::stream::iter(batch.chunks(50).map(<[_]>::to_vec))
                    .map(|chunk| {
                        let db = db.clone();
                        async move {
                            let keys: Vec<(Item, String)> = chunk.iter().flat_map(|(keys, _)| keys.clone()).collect();
                            let found = present_keys(&db, &keys).await?;
                            Ok::<_, Failure>((chunk, found))
                        }
                    })
                    .buffer_unordered(2)
                    .collect::<Vec<_>>()
                    .await;
                let mut left = Vec::new();
                for result in checked {
                    let (chunk, found) = result?;
                    for (keys, written) in chunk {
                        if keys.iter().all(|key| found.contains(key)) {
                            latencies.lock().await.push(written.elapsed().as_secs_f64());
                        } else if written.elapsed() < Duration::from_secs(30) {
                            left.push((keys, written));
                        }
                    }
                }
                pending.lock().await.extend(left);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let total = rate * seconds;
    let base = chrono::Utc::now().timestamp_millis();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut writers = tokio::task::JoinSet::new();
    for n in 0..total {
        tick.tick().await;
        let (db, groups, pending) = (db.clone(), groups.clone(), pending.clone());
        writers.spawn(async move {
            let (group, a, b) = &groups[n as usize % groups.len()];
            let (at, text) = (stamp(base, n as i64), format!("message {n}"));
            let id = uuid::Uuid::new_v4().to_string();
            admin::put_message(
                &db.client,
                TABLE,
                group,
                &at,
                &id,
                if n % 2 == 0 { a } else { b },
                &text,
            )
            .await?;
            let written = Instant::now();
            let newest = HashMap::from([(group.clone(), (at, text))]);
            let keys = final_keys(&[(group.clone(), a.clone(), b.clone())], &newest);
            pending.lock().await.push((keys, written));
            Ok::<_, Failure>(())
        });
    }
    while let Some(result) = writers.join_next().await {
        result??;
    }
    done.cancel();
    checker.await??;
    let steady_seconds = steady.elapsed().as_secs_f64();
    keep_worker_metrics().await;
    let (cpu_after, peak_rss) = footprint(pid)?;
    if let Some(child) = child.as_mut() {
        child.kill().await?;
    }
    floor_stop.cancel();
    if let Some(task) = floor_task {
        task.await??;
    }
    db.drop_tables().await?;
    let mut sorted = latencies.lock().await.clone();
    sorted.sort_by(f64::total_cmp);
    let wait = idle_ms as f64 / 2000.0;
    Ok(json!({
        "scenario": "latency", "contender": if floor { "floor" } else { "worker" }, "rate": rate, "seconds": seconds, "idle_ms": idle_ms,
        "messages": total, "measured": sorted.len(),
        "p50": percentile(&sorted, 0.50), "p95": percentile(&sorted, 0.95), "p99": percentile(&sorted, 0.99),
        "added_p50": percentile(&sorted, 0.50) - wait, "added_p99": percentile(&sorted, 0.99) - wait,
        "cpu_share_of_one_core": (cpu_after - cpu_before) / steady_seconds,
        "peak_rss_bytes": peak_rss,
    }))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|arg| arg != "--bench").collect();
    let Some(scenario) = args.first().cloned() else {
        // `cargo test --benches` runs this with no scenario: nothing to do here.
        return;
    };
    let flags = Flags::parse(&args[1..]);
    let result = match scenario.as_str() {
        "read-path" => read_path(&flags).await,
        "drain" => drain(&flags).await,
        "drain-lambda" => drain_lambda(&flags).await,
        "drain-ceiling" => drain_ceiling(&flags).await,
        "latency" => latency(&flags).await,
        "fleet" => fleet::fleet(&flags).await,
        "busy-shards" => shards::busy_shards(&flags).await,
        other => Err(format!("unknown scenario {other:?}").into()),
    };
    match result {
        Ok(value) => println!("{value}"),
        Err(error) => {
            eprintln!("bench suite {scenario}: {error}");
            std::process::exit(1);
        }
    }
}
