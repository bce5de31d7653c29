//! What tests watch: metrics in the Prometheus text format, plain HTTP on loopback, polling
//! with a limit, the lease table's invariants over time ([`LeaseWatch`]), and dead letters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::tables::{s, TestDb};
use aws_sdk_dynamodb::types::AttributeValue;
use cruddur_stream_worker::aws::{self};
use cruddur_stream_worker::stream::LEASE_TABLE_KEY;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

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

impl TestDb {
    /// The dead letters in this test's file, in the order written.
    pub fn dead_letters(&self) -> Vec<cruddur_stream_worker::deadletter::DeadLetter> {
        std::fs::read_to_string(&self.dead_letter_file)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a dead letter ({e}): {line}")))
            .collect()
    }
}
