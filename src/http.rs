//! The HTTP endpoints: `/metrics` (Prometheus text format), `/healthz` (the process is alive)
//! and `/readyz` (the stream is found and was read recently).
//!
//! Must not: block on anything the worker does; every answer is computed from state in memory.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `Ok` when ready, otherwise the reason (shown in the 503 body).
/// Where the endpoints listen and when readiness fails (the `[http]` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub addr: std::net::SocketAddr,
    /// `/readyz` fails when no read (or, standing by, no lease round) succeeded for this long.
    pub ready_max_poll_age: std::time::Duration,
}

pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct Endpoints {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// Serves until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Endpoints { metrics, readiness });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn render_metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        endpoints.metrics.render(),
    )
}

async fn ready(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    match (endpoints.readiness)() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}
