//! A fault-injecting HTTP proxy on 127.0.0.1, between the worker and a local AWS service: on a
//! configurable share of requests (optionally only those of one operation, by `X-Amz-Target`),
//! it answers with a throttling error or a 500, resets the connection, or adds latency before
//! forwarding. Everything else is forwarded untouched, one upstream connection per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 400 ThrottlingException.
    Throttle,
    /// 500 InternalServerError.
    ServerError,
    /// The connection is reset (RST) with no response.
    Reset,
    /// The request is forwarded after a delay.
    Latency(Duration),
}

/// Which requests fail, and how.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Share of matching requests that get a fault, 0.0 to 1.0.
    pub share: f64,
    /// The faults, chosen uniformly.
    pub kinds: Vec<Fault>,
    /// Only requests whose `X-Amz-Target` contains this (e.g. "TransactWriteItems").
    pub target: Option<String>,
}

impl Faults {
    pub fn none() -> Self {
        Self {
            share: 0.0,
            kinds: Vec::new(),
            target: None,
        }
    }

    /// Every kind of fault on `share` of all requests.
    pub fn mixed(share: f64) -> Self {
        Self {
            share,
            kinds: vec![
                Fault::Throttle,
                Fault::ServerError,
                Fault::Reset,
                Fault::Latency(Duration::from_millis(150)),
            ],
            target: None,
        }
    }
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    injected: AtomicU64,
    /// Requests seen per `X-Amz-Target`.
    targets: Mutex<std::collections::HashMap<String, u64>>,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy to the test's DynamoDB Local that answers every `target` request with a 500.
    pub async fn failing(target: &str) -> Self {
        Self::start(
            &crate::support::endpoint(),
            Faults {
                share: 1.0,
                kinds: vec![Fault::ServerError],
                target: Some(target.into()),
            },
        )
        .await
    }

    /// Listens on a free loopback port and forwards to `upstream` (`http://127.0.0.1:N`).
    pub async fn start(upstream: &str, faults: Faults) -> Self {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream is http://IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let faults = Arc::new(Mutex::new(faults));
        let counts = Arc::new(Counts::default());
        let (shared_faults, shared_counts) = (faults.clone(), counts.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Dropping the connection then sends a reset, not an orderly close.
                let _ = stream.set_zero_linger();
                let (faults, counts) = (shared_faults.clone(), shared_counts.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        handle(request, upstream, faults.clone(), counts.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            faults,
            counts,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, faults: Faults) {
        *self.faults.lock().expect("faults") = faults;
    }

    /// Requests seen whose `X-Amz-Target` contains `target` (e.g. "BatchGetItem").
    pub fn requests_of(&self, target: &str) -> u64 {
        let targets = self.counts.targets.lock().expect("targets");
        targets
            .iter()
            .filter(|(seen, _)| seen.contains(target))
            .map(|(_, count)| count)
            .sum()
    }

    /// (requests seen, faults injected).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.requests.load(Ordering::Relaxed),
            self.counts.injected.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn error_response(status: u16, code: &str) -> Response<Full<Bytes>> {
    let body =
        format!(r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{code}","message":"injected by the test proxy"}}"#);
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amzn-query-error", format!("{code};Sender"))
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

async fn handle(
    request: Request<Incoming>,
    upstream: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    counts: Arc<Counts>,
) -> Result<Response<Full<Bytes>>, Failure> {
    counts.requests.fetch_add(1, Ordering::Relaxed);
    let target = request
        .headers()
        .get("x-amz-target")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    *counts
        .targets
        .lock()
        .expect("targets")
        .entry(target.clone())
        .or_default() += 1;
    let fault = {
        let faults = faults.lock().expect("faults");
        let matches = faults.target.as_deref().is_none_or(|wanted| target.contains(wanted));
        if matches && !faults.kinds.is_empty() && fastrand::f64() < faults.share {
            Some(faults.kinds[fastrand::usize(..faults.kinds.len())])
        } else {
            None
        }
    };
    if fault.is_some() {
        counts.injected.fetch_add(1, Ordering::Relaxed);
    }
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    match fault {
        Some(Fault::Throttle) => return Ok(error_response(400, "ThrottlingException")),
        Some(Fault::ServerError) => return Ok(error_response(500, "InternalServerError")),
        Some(Fault::Reset) => return Err("injected reset".into()),
        Some(Fault::Latency(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }
    let stream = TcpStream::connect(upstream).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let forwarded = Request::from_parts(parts, Full::new(body));
    let response = sender.send_request(forwarded).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
