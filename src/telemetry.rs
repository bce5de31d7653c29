//! Metric names, their descriptions, the Prometheus recorder, and logging.
//!
//! Every metric the worker exports is named in [`metric`] and described in [`describe`]: one
//! place to read what is exported (the README's table mirrors it). Names follow Prometheus
//! conventions: the `stream_worker_` prefix, `_total` counters, base units (`_seconds`),
//! labels with a small fixed set of values (never a shard, group or user id).
//!
//! Logs go to stderr (stdout is for command output): JSON lines when it is not a terminal (ECS, CI), human text otherwise. Nothing
//! here logs message text; handlers must not either.

pub mod emf;

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tracing_subscriber::EnvFilter;

/// Metric names, one constant each.
pub mod metric {
    pub const RECORDS_RECEIVED: &str = "stream_worker_records_received_total";
    pub const RECORDS_IGNORED: &str = "stream_worker_records_ignored_total";
    pub const RECORDS_COALESCED: &str = "stream_worker_records_coalesced_total";
    pub const DEAD_LETTERS: &str = "stream_worker_dead_letters_total";
    pub const GROUP_UPDATES: &str = "stream_worker_group_updates_total";
    pub const GROUP_UPDATE_RACES: &str = "stream_worker_group_update_races_total";
    pub const WRITE_TRANSACTIONS: &str = "stream_worker_write_transactions_total";
    pub const GROUP_ROW_LOOKUPS: &str = "stream_worker_group_row_lookups_total";
    pub const GROUP_UPDATE_DURATION: &str = "stream_worker_group_update_duration_seconds";
    pub const RETRIES: &str = "stream_worker_retries_total";
    pub const CHECKPOINTS: &str = "stream_worker_checkpoints_total";
    pub const ITERATOR_AGE: &str = "stream_worker_iterator_age_seconds";
    pub const SHARD_ITERATOR_AGE: &str = "stream_worker_shard_iterator_age_seconds";
    pub const PROCESSING_LAG: &str = "stream_worker_processing_lag_seconds";
    pub const SHARD_PROCESSING_LAG: &str = "stream_worker_shard_processing_lag_seconds";
    pub const GETRECORDS_DURATION: &str = "stream_worker_getrecords_duration_seconds";
    pub const IN_FLIGHT: &str = "stream_worker_in_flight";
    pub const SHARDS_READING: &str = "stream_worker_shards_reading";
    pub const STREAM_GAPS: &str = "stream_worker_stream_gaps_total";
    pub const LEASES_HELD: &str = "stream_worker_leases_held";
    pub const LEASE_TAKEOVERS: &str = "stream_worker_lease_takeovers_total";
    pub const LEASE_LOST: &str = "stream_worker_lease_lost_total";
    pub const DUPLICATE_WORKER_ID: &str = "stream_worker_duplicate_worker_id_total";
    pub const SHARDS: &str = "stream_worker_shards";

    /// Every metric the worker exports.
    pub const ALL: &[&str] = &[
        RECORDS_RECEIVED,
        RECORDS_IGNORED,
        RECORDS_COALESCED,
        DEAD_LETTERS,
        GROUP_UPDATES,
        GROUP_UPDATE_RACES,
        WRITE_TRANSACTIONS,
        GROUP_ROW_LOOKUPS,
        GROUP_UPDATE_DURATION,
        RETRIES,
        CHECKPOINTS,
        ITERATOR_AGE,
        SHARD_ITERATOR_AGE,
        PROCESSING_LAG,
        SHARD_PROCESSING_LAG,
        GETRECORDS_DURATION,
        IN_FLIGHT,
        SHARDS_READING,
        STREAM_GAPS,
        LEASES_HELD,
        LEASE_TAKEOVERS,
        LEASE_LOST,
        DUPLICATE_WORKER_ID,
        SHARDS,
    ];
}

/// Per-label tallies of one batch, so that a labelled counter is updated once per label and
/// batch rather than once per record (each update looks its series up in the registry, a cost
/// that showed per record on the read path). Few labels: a linear search beats hashing.
#[derive(Debug)]
pub struct Tally<L>(Vec<(L, u64)>);

impl<L: PartialEq> Default for Tally<L> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<L: PartialEq> Tally<L> {
    pub fn add(&mut self, label: L, count: u64) {
        match self.0.iter_mut().find(|(seen, _)| *seen == label) {
            Some((_, total)) => *total += count,
            None => self.0.push((label, count)),
        }
    }

    /// Each label with its total, in the order labels were first added.
    pub fn into_counts(self) -> impl Iterator<Item = (L, u64)> {
        self.0.into_iter()
    }
}

/// Histogram buckets for latencies, in seconds: DynamoDB round trips are milliseconds, retries
/// under throttling reach seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A gauge not set for this long leaves `/metrics`.
pub const GAUGE_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Registers the `# HELP` text of every metric.
pub fn describe() {
    use metric::*;
    describe_counter!(
        RECORDS_RECEIVED,
        "Stream records read, by event (insert, modify, remove, other)."
    );
    describe_counter!(
        RECORDS_IGNORED,
        "Records that need no work, by reason (remove, modify, group_row, other_item, other_event)."
    );
    describe_counter!(
        RECORDS_COALESCED,
        "Records folded into a newer record for the same key in the same batch."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Records whose handling failed for good (logged with shard and sequence number), by reason."
    );
    describe_counter!(
        GROUP_UPDATES,
        "Group-summary updates, by outcome (applied, stale, no_rows)."
    );
    describe_counter!(
        GROUP_UPDATE_RACES,
        "Group-row transactions that lost a race (a condition failed) and were decided again on fresh reads."
    );
    describe_counter!(
        WRITE_TRANSACTIONS,
        "TransactWriteItems calls made for group updates; updates that wait for a call share the next one, \
         so under load this grows slower than the updates."
    );
    describe_counter!(
        GROUP_ROW_LOOKUPS,
        "Times an update looked up its conversation's group rows, by source: memory (no read: nothing to do), \
         key (remembered rows read again by key before a move), index (a GSI query), \
         table (strongly consistent queries, after a lost race or a lagging index)."
    );
    describe_histogram!(
        GROUP_UPDATE_DURATION,
        Unit::Seconds,
        "Time to bring one conversation's group rows up to a message, retries included."
    );
    describe_counter!(RETRIES, "Retried operations after a transient failure, by operation.");
    describe_counter!(CHECKPOINTS, "Checkpoints written to the lease table.");
    describe_gauge!(
        ITERATOR_AGE,
        Unit::Seconds,
        "Age of the newest record read, maximum over shards (0 when caught up)."
    );
    describe_gauge!(
        SHARD_ITERATOR_AGE,
        Unit::Seconds,
        "Per shard this worker reads: how far behind the tip at its last read (MillisBehindLatest, or the newest \
         record's age); the series goes once the shard is released or finished."
    );
    describe_gauge!(
        PROCESSING_LAG,
        Unit::Seconds,
        "Processing lag, maximum over shards: how long the oldest record read but not yet handled has waited, \
         or with none waiting the iterator age plus the time since the last read. Refreshed every lease round."
    );
    describe_gauge!(
        SHARD_PROCESSING_LAG,
        Unit::Seconds,
        "Per shard this worker reads: the processing lag (see stream_worker_processing_lag_seconds); the series \
         lives while the shard is read."
    );
    describe_histogram!(
        GETRECORDS_DURATION,
        Unit::Seconds,
        "GetRecords round trips, retries excluded."
    );
    describe_gauge!(IN_FLIGHT, "Updates handed to handlers and not yet finished.");
    describe_gauge!(SHARDS_READING, "Shards this worker is reading now.");
    describe_gauge!(LEASES_HELD, "Shard leases this worker holds.");
    describe_counter!(
        LEASE_TAKEOVERS,
        "Leases this worker took from another, by reason (expired, stolen, released)."
    );
    describe_counter!(
        LEASE_LOST,
        "Leases this worker lost to another worker while holding them."
    );
    describe_counter!(
        DUPLICATE_WORKER_ID,
        "Lease writes that found the lease written by another live task with this worker's own id \
         (two tasks given one WORKER_ID)."
    );
    describe_gauge!(
        SHARDS,
        "Shards by state as this worker sees the lease table (reading, owned_elsewhere, free, blocked, finished)."
    );
    describe_counter!(
        STREAM_GAPS,
        "Times records were trimmed before they were read (data lost from the stream)."
    );
}

/// Exports every metric without labels from the start, at zero, so that dashboards and alerts
/// see a series before the first event (labelled series appear with their first event).
fn register_unlabelled() {
    use metric::*;
    for counter in [
        RECORDS_COALESCED,
        CHECKPOINTS,
        STREAM_GAPS,
        GROUP_UPDATE_RACES,
        WRITE_TRANSACTIONS,
        LEASE_LOST,
        DUPLICATE_WORKER_ID,
    ] {
        metrics::counter!(counter).absolute(0);
    }
    for gauge in [ITERATOR_AGE, PROCESSING_LAG, IN_FLIGHT, SHARDS_READING, LEASES_HELD] {
        metrics::gauge!(gauge).set(0.0);
    }
    for histogram in [GROUP_UPDATE_DURATION, GETRECORDS_DURATION] {
        let _registered = metrics::histogram!(histogram);
    }
}

/// Installs the process-wide Prometheus recorder once and returns its handle; later calls
/// return the same handle (tests start several workers in one process).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Gauges not set for a while disappear: that is how a released shard's series goes
            // (the metrics API has no removal). Every other gauge is set at least every few
            // seconds while the worker runs.
            let builder = PrometheusBuilder::new()
                .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT))
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .expect("bucket list is not empty");
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program's); render ours anyway
                // so /metrics answers, though it will stay empty.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe();
            register_unlabelled();
            handle
        })
        .clone()
}

/// How and what is logged (the `[logging]` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingSettings {
    pub format: LogFormat,
    /// A tracing filter directive; `RUST_LOG` wins.
    pub level: String,
    /// CloudWatch namespace of the status line's metrics (JSON logs only: [`emf`]).
    pub metrics_namespace: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, text otherwise.
    Auto,
    Json,
    Text,
}

/// Starts logging. `settings.level` is an `EnvFilter` directive (`info`,
/// `cruddur_stream_worker=debug`); `RUST_LOG` overrides it. With JSON logs the status line is
/// an EMF document ([`emf`]). Safe to call twice (the second call does nothing).
pub fn init_logging(settings: &LoggingSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    emf::configure(json.then(|| settings.metrics_namespace.clone()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).with_current_span(false).try_init()
    } else {
        builder.with_target(false).try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::{metric, Tally};

    #[test]
    fn a_tally_sums_per_label_in_first_seen_order() {
        let mut tally = Tally::default();
        for label in ["insert", "remove", "insert", "modify", "insert"] {
            tally.add(label, 1);
        }
        tally.add("remove", 3);
        let counts: Vec<_> = tally.into_counts().collect();
        assert_eq!(counts, [("insert", 3), ("remove", 4), ("modify", 1)]);
    }

    #[test]
    fn the_readme_lists_every_metric() {
        let readme = include_str!("../README.md");
        for name in metric::ALL {
            assert!(
                readme.contains(&format!("| `{name}` |")),
                "README's metrics tables lack {name}"
            );
        }
    }
}
