//! The fleet's idle cost, measured: W worker processes over a Kinesis stream of S shards on
//! kinesalite, their lease table on DynamoDB Local, each behind a counting proxy. The DynamoDB
//! proxy asks every request for its consumed capacity (`ReturnConsumedCapacity = TOTAL`), so the
//! read and write units are DynamoDB Local's own count, not an estimate. Prints one JSON object:
//! the time to balance after the last start, then per second over an idle spell: lease-table
//! read and write units and requests by operation, GetRecords per shard, and stream listings.
//!
//!   cargo bench --bench suite -- fleet --endpoint URL --kinesis URL --worker BIN
//!                                      --workers W --shards S --seconds T

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use super::{Db, Failure, Flags, LEASE_TABLE, REGION};
use cruddur_stream_worker::aws::{self, AwsOverrides};

/// DynamoDB operations that report consumed capacity when asked.
const METERED: [&str; 8] = [
    "Scan",
    "Query",
    "GetItem",
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "BatchGetItem",
    "TransactWriteItems",
];

/// Requests by operation, and capacity units by kind.
#[derive(Debug, Default, Clone)]
struct Tally {
    requests: BTreeMap<String, u64>,
    read_units: f64,
    write_units: f64,
}

/// A forwarding proxy on loopback that counts what passes.
struct CountingProxy {
    addr: SocketAddr,
    tally: Arc<Mutex<Tally>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(upstream: &str) -> Result<Self, Failure> {
        let upstream: SocketAddr = upstream.trim_start_matches("http://").trim_end_matches('/').parse()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let shared = tally.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tally = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| forward(request, upstream, tally.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, tally, task })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What passed since the last call.
    fn take(&self) -> Tally {
        std::mem::take(&mut *self.tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    request: Request<Incoming>,
    upstream: SocketAddr,
    tally: Arc<Mutex<Tally>>,
) -> Result<Response<Full<Bytes>>, Failure> {
    let target = request
        .headers()
        .get("x-amz-target")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let operation = target.rsplit('.').next().unwrap_or_default().to_owned();
    let (mut parts, body) = request.into_parts();
    let mut body = body.collect().await?.to_bytes();
    let metered = target.starts_with("DynamoDB_") && METERED.contains(&operation.as_str());
    if metered {
        let mut json: Value = serde_json::from_slice(&body)?;
        json["ReturnConsumedCapacity"] = json!("TOTAL");
        body = Bytes::from(serde_json::to_vec(&json)?);
        parts.headers.insert("content-length", body.len().into());
    }
    let stream = TcpStream::connect(upstream).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(Request::from_parts(parts, Full::new(body))).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    let units = if metered { consumed(&body) } else { 0.0 };
    let mut tally = tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    *tally.requests.entry(operation.clone()).or_default() += 1;
    if matches!(operation.as_str(), "Scan" | "Query" | "GetItem" | "BatchGetItem") {
        tally.read_units += units;
    } else {
        tally.write_units += units;
    }
    Ok(Response::from_parts(parts, Full::new(body)))
}

/// The capacity units a response reports (one entry, or a list for batches and transactions).
fn consumed(body: &[u8]) -> f64 {
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return 0.0;
    };
    let units = |entry: &Value| entry["CapacityUnits"].as_f64().unwrap_or(0.0);
    match &json["ConsumedCapacity"] {
        Value::Array(entries) => entries.iter().map(units).sum(),
        entry @ Value::Object(_) => units(entry),
        _ => 0.0,
    }
}

/// Owners' shares of the lease table's shard rows (`None` until every one of `shards` is owned).
async fn shares(db: &Db, shards: usize) -> Result<Option<Vec<usize>>, Failure> {
    let rows = aws::scan_all(db.client.scan().table_name(LEASE_TABLE).consistent_read(true)).await?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut owned = 0;
    for row in rows {
        let key = row
            .get("shard_id")
            .and_then(|v| v.as_s().ok())
            .cloned()
            .unwrap_or_default();
        if key.starts_with('~') {
            continue;
        }
        if let Some(owner) = row.get("owner").and_then(|v| v.as_s().ok()) {
            *counts.entry(owner.clone()).or_default() += 1;
            owned += 1;
        }
    }
    Ok((owned == shards).then(|| counts.into_values().collect()))
}

pub async fn fleet(flags: &Flags) -> Result<Value, Failure> {
    let endpoint = flags.text("endpoint")?;
    let kinesis = flags.text("kinesis")?;
    let binary = flags.text("worker")?;
    let workers = usize::try_from(flags.number("workers", 4)?)?;
    let shards = usize::try_from(flags.number("shards", 32)?)?;
    let seconds = flags.number("seconds", 60)?;
    let db = Db::fresh(&endpoint).await?;
    let (_, stream) = create_stream(&db, &kinesis, shards).await?;
    let (dynamodb_proxy, kinesis_proxy) = (
        CountingProxy::start(&endpoint).await?,
        CountingProxy::start(&kinesis).await?,
    );
    let letters = tempfile_path("fleet-letters");
    let mut children = Vec::new();
    for index in 0..workers {
        let mut command = db.worker(&binary, 250, &letters);
        command
            .env("AWS_ENDPOINT_URL_DYNAMODB", dynamodb_proxy.url())
            .env("AWS_ENDPOINT_URL_KINESIS", kinesis_proxy.url())
            .env("WORKER_SOURCE", "kinesis")
            .env("WORKER_KINESIS_STREAM_NAME", &stream)
            .env("WORKER_ID", format!("fleet-{index:02}"))
            .stdin(Stdio::null());
        children.push(command.spawn()?);
    }
    let started = Instant::now();
    let balanced = loop {
        if let Some(counts) = shares(&db, shards).await? {
            let (max, min) = (counts.iter().max().copied(), counts.iter().min().copied());
            if counts.len() == workers && max.zip(min).is_some_and(|(max, min)| max - min <= 1) {
                break Some(started.elapsed().as_secs_f64());
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Past the readers' quiet spell (10 s without a record), into the idle back-off.
    tokio::time::sleep(Duration::from_secs(12)).await;
    dynamodb_proxy.take();
    kinesis_proxy.take();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (leases, reads) = (dynamodb_proxy.take(), kinesis_proxy.take());
    for child in &mut children {
        let _ = child.kill().await;
    }
    let _ = std::fs::remove_file(&letters);
    let per_second = |count: f64| count / seconds as f64;
    let requests: BTreeMap<&String, f64> = leases
        .requests
        .iter()
        .map(|(op, n)| (op, per_second(*n as f64)))
        .collect();
    let get_records = *reads.requests.get("GetRecords").unwrap_or(&0) as f64;
    let listings = reads.requests.get("ListShards").copied().unwrap_or(0)
        + reads.requests.get("DescribeStream").copied().unwrap_or(0);
    db.drop_tables().await?;
    Ok(json!({
        "scenario": "fleet", "workers": workers, "shards": shards, "seconds": seconds,
        "balanced_after_seconds": balanced,
        "lease_read_units_per_second": per_second(leases.read_units),
        "lease_write_units_per_second": per_second(leases.write_units),
        "lease_requests_per_second": requests,
        "get_records_per_shard_per_second": per_second(get_records) / shards as f64,
        "stream_listings_per_second": per_second(listings as f64),
    }))
}

/// A Kinesis stream of `shards` shards on kinesalite, named for the database, and a client of
/// kinesalite for it.
pub(super) async fn create_stream(
    db: &Db,
    kinesis: &str,
    shards: usize,
) -> Result<(aws_sdk_kinesis::Client, String), Failure> {
    let sdk = aws::load_sdk_config(AwsOverrides {
        endpoint_url: Some(kinesis.to_owned()),
        region: Some(REGION.to_owned()),
        credentials: Some((db.access_key.clone(), "secret".to_owned())),
    })
    .await;
    let client = aws::kinesis_client(&sdk);
    let name = format!("fleet-{}", &db.access_key[5..17]);
    client
        .create_stream()
        .stream_name(&name)
        .shard_count(i32::try_from(shards)?)
        .send()
        .await?;
    for _ in 0..100 {
        let summary = client.describe_stream_summary().stream_name(&name).send().await?;
        if summary
            .stream_description_summary()
            .is_some_and(|s| s.stream_status() == &aws_sdk_kinesis::types::StreamStatus::Active)
        {
            return Ok((client, name));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the stream never became active".into())
}

fn tempfile_path(stem: &str) -> String {
    std::env::temp_dir()
        .join(format!("{stem}-{}.jsonl", uuid::Uuid::new_v4().simple()))
        .to_string_lossy()
        .into_owned()
}
