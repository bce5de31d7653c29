//! Wiring: settings and AWS clients in, a running worker out.
//!
//! Data flows one way: the source (the table's DynamoDB stream, or a Kinesis data stream the
//! table streams into) feeds the stream worker, whose consumer is the dispatcher, whose handler
//! is the group-summary updater; the stream worker checkpoints what the dispatcher reports
//! handled. This is the only module that knows all of them.
//!
//! Shutdown: cancelling the token stops reading; each shard drains its in-flight updates and
//! writes its checkpoint; then the HTTP server stops. The caller bounds the wait (the grace).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DeadLetterTarget, Settings, Source};
use crate::deadletter::{DeadLetterDestination, DeadLetterError};
use crate::dispatch::{DispatchSettings, Dispatcher};
use crate::groups::updater::GroupSummaryUpdater;
use crate::retry::Retryable;
use crate::stream::{
    DynamoDbStreamsSource, KinesisSource, LeaseStore, StreamError, StreamHealth, StreamReport, StreamSource,
    StreamWorker,
};
use crate::{aws, http, telemetry};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} (http_addr): {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The worker's task panicked or was cancelled: the join error, whole.
    #[error("worker task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(
        "no dead-letter destination: set dead_letter_queue_url (WORKER_DEAD_LETTER_QUEUE_URL) \
         or dead_letter_file (WORKER_DEAD_LETTER_FILE)"
    )]
    NoDeadLetters,
    #[error("dead-letter destination {destination} cannot be written: {source}")]
    DeadLetters {
        destination: String,
        source: DeadLetterError,
    },
    #[error("{0}; the checkpoint stays before that record: fix the destination and start again")]
    DeadLetterLost(String),
}

impl AppError {
    /// Bad configuration rather than a runtime failure: no destination, or one that answers
    /// with a permanent error at start (a wrong queue URL, a missing permission).
    pub fn is_config(&self) -> bool {
        match self {
            AppError::NoDeadLetters => true,
            AppError::DeadLetters {
                source: DeadLetterError::Aws(error),
                ..
            } => !error.is_retryable(),
            _ => false,
        }
    }
}

/// The configured dead-letter destination, with its client.
pub fn dead_letter_destination(settings: &Settings, sdk: &SdkConfig) -> Result<DeadLetterDestination, AppError> {
    match &settings.dead_letters {
        None => Err(AppError::NoDeadLetters),
        Some(DeadLetterTarget::File(path)) => Ok(DeadLetterDestination::File(path.clone())),
        Some(DeadLetterTarget::Queue(url)) => Ok(DeadLetterDestination::Queue {
            client: aws::sqs_client(sdk),
            url: url.clone(),
            max_bytes: crate::deadletter::DEFAULT_QUEUE_MESSAGE_BYTES,
        }),
    }
}

/// A started worker.
pub struct Running {
    /// Where `/metrics`, `/healthz` and `/readyz` answer (the bound port when 0 was asked).
    pub http_addr: SocketAddr,
    task: JoinHandle<Result<StreamReport, AppError>>,
}

impl Running {
    /// Waits until the worker has stopped (after its shutdown token fired, or a fatal error).
    pub async fn wait(self) -> Result<StreamReport, AppError> {
        self.task.await?
    }
}

/// Starts the worker on the configured source: HTTP endpoints at once, then the stream (waiting
/// for the table or stream if it does not exist yet).
pub async fn start(settings: &Settings, sdk: &SdkConfig, shutdown: CancellationToken) -> Result<Running, AppError> {
    match &settings.source {
        Source::DynamoDb => {
            let source = DynamoDbStreamsSource::new(
                aws::dynamodb_client(sdk),
                aws::streams_client(sdk),
                &settings.table_name,
            );
            start_with_source(settings, sdk, source, shutdown).await
        }
        Source::Kinesis { stream_name } => {
            let source = KinesisSource::new(aws::kinesis_client(sdk), stream_name);
            start_with_source(settings, sdk, source, shutdown).await
        }
    }
}

/// Starts the worker on any source of the table's change records.
pub async fn start_with_source<S: StreamSource>(
    settings: &Settings,
    sdk: &SdkConfig,
    source: S,
    shutdown: CancellationToken,
) -> Result<Running, AppError> {
    let metrics = telemetry::prometheus();
    let mut dead_letters = dead_letter_destination(settings, sdk)?;
    dead_letters.check().await.map_err(|source| AppError::DeadLetters {
        destination: dead_letters.describe(),
        source,
    })?;
    let listener = TcpListener::bind(settings.http.addr)
        .await
        .map_err(|source| AppError::Bind {
            addr: settings.http.addr,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| AppError::Bind {
        addr: settings.http.addr,
        source,
    })?;

    let tables = aws::dynamodb_client(sdk);
    let updater =
        Arc::new(GroupSummaryUpdater::new(tables.clone(), &settings.table_name).with_settings(&settings.groups));
    let dispatcher = Arc::new(Dispatcher::new(
        updater,
        DispatchSettings {
            limits: settings.dispatch.clone(),
            retry: settings.retry.clone(),
            dead_letters: dead_letters.clone(),
            worker_id: settings.worker_id.clone(),
        },
    ));
    let leases = LeaseStore::dynamodb(tables, &settings.lease_table_name, &settings.worker_id);
    let health = Arc::new(StreamHealth::default());
    let worker = StreamWorker::new(
        source,
        dispatcher.clone(),
        leases,
        settings.stream.clone(),
        health.clone(),
    );

    let http_stop = CancellationToken::new();
    let max_poll_age = settings.http.ready_max_poll_age;
    let readiness: http::Readiness = Arc::new(move || health.readiness(max_poll_age));
    let server = tokio::spawn(http::serve(listener, metrics.clone(), readiness, http_stop.clone()));
    // The app's own background tasks: waited for before the worker counts as stopped.
    let background = TaskTracker::new();
    let upkeep_stop = http_stop.clone();
    let in_flight = dispatcher.clone();
    background.spawn(async move {
        // Histograms need draining now and then when the exporter's own listener is not used,
        // and gauges setting now and then or they go idle.
        let mut every = tokio::time::interval(Duration::from_secs(5));
        while upkeep_stop.run_until_cancelled(every.tick()).await.is_some() {
            metrics::gauge!(telemetry::metric::IN_FLIGHT).set(in_flight.in_flight() as f64);
            metrics.run_upkeep();
        }
    });
    tracing::info!(%http_addr, worker_id = %settings.worker_id, table = %settings.table_name, dead_letters = %dead_letters.describe(), "worker started");

    // The worker stops on shutdown, or when a dead letter can be stored nowhere.
    let stop = shutdown.child_token();
    let (failed, stopper) = (dispatcher.failed(), stop.clone());
    background.spawn(async move {
        if stopper.run_until_cancelled(failed.cancelled()).await.is_some() {
            stopper.cancel();
        }
    });
    background.close();
    let task = tokio::spawn(async move {
        let result = worker.run(stop.clone()).await;
        // Readers drained their lanes; this also waits for anything a failed reader left.
        dispatcher.wait_idle().await;
        stop.cancel();
        http_stop.cancel();
        if let Ok(Err(error)) = server.await {
            tracing::warn!(error = %error, "HTTP server stopped with an error");
        }
        background.wait().await;
        if let Some(failure) = dispatcher.failure() {
            return Err(AppError::DeadLetterLost(failure));
        }
        Ok(result?)
    });
    Ok(Running { http_addr, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_worker_task_keeps_its_panic() {
        let task = tokio::spawn(async { panic!("boom") });
        let running = Running {
            http_addr: "127.0.0.1:0".parse().expect("address"),
            task: tokio::spawn(async move {
                task.await?;
                Ok(StreamReport::default())
            }),
        };
        match running.wait().await {
            Err(AppError::Task(error)) => {
                assert!(error.is_panic(), "the join error itself, not its text");
                let payload = error.into_panic();
                assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
            }
            other => panic!("expected the task's failure, got {other:?}"),
        }
    }
}
