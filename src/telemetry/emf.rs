//! The status line: every `status_log_interval_ms`, one line saying how this worker is doing.
//!
//! With JSON logs the line is a CloudWatch Embedded Metric Format document (the `_aws`
//! envelope): CloudWatch Logs, fed by the ECS `awslogs` driver with no agent, turns its members
//! into metrics of the configured namespace. They carry no dimensions: every task writes its own
//! values into the same metrics and CloudWatch's statistics combine them (Maximum of the lag,
//! Sum of dead letters, Average of leases held = shards per worker, Sum of `WorkersRunning` per
//! minute = tasks alive). With text logs it is a plain `status` event.
//!
//! Invariants: one line per status, written in one write; counts are the increase since this
//! process's previous line; the line is written whatever the log level (alarms read it).
//!
//! Must not: add per-shard or per-task dimensions (each combination is a billed metric).

use std::io::Write as _;
use std::sync::{Mutex, OnceLock};

use serde_json::{json, Value};

use super::metric;
use crate::lock::lock;

/// What a status line reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub processing_lag_seconds: f64,
    pub iterator_age_seconds: f64,
    pub leases_held: usize,
    pub shards_reading: usize,
    pub leading: bool,
}

/// Counter totals, and their increases between two lines.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Counts {
    pub dead_letters: f64,
    pub updates: f64,
    pub records: f64,
}

impl Counts {
    /// The totals of Prometheus text (every series of each counter summed).
    pub fn read(text: &str) -> Self {
        Self {
            dead_letters: total(text, metric::DEAD_LETTERS),
            updates: total(text, metric::GROUP_UPDATES),
            records: total(text, metric::RECORDS_RECEIVED),
        }
    }

    fn since(self, earlier: Counts) -> Self {
        let up = |now: f64, then: f64| (now - then).max(0.0);
        Self {
            dead_letters: up(self.dead_letters, earlier.dead_letters),
            updates: up(self.updates, earlier.updates),
            records: up(self.records, earlier.records),
        }
    }
}

fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| series.split_once('{').map_or(*series, |(base, _)| base) == name)
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// Each metric of the document: its member name and CloudWatch unit.
pub const METRICS: &[(&str, &str)] = &[
    ("ProcessingLagSeconds", "Seconds"),
    ("IteratorAgeSeconds", "Seconds"),
    ("DeadLetters", "Count"),
    ("GroupUpdates", "Count"),
    ("RecordsReceived", "Count"),
    ("LeasesHeld", "Count"),
    ("ShardsReading", "Count"),
    ("WorkersRunning", "Count"),
];

/// The namespace, when lines are EMF (JSON logs); unset or `None`: text.
static NAMESPACE: OnceLock<Option<String>> = OnceLock::new();
static LAST: Mutex<Counts> = Mutex::new(Counts {
    dead_letters: 0.0,
    updates: 0.0,
    records: 0.0,
});

/// Set once, by logging's start: EMF into `namespace`, or text when `None`.
pub(super) fn configure(namespace: Option<String>) {
    let _ = NAMESPACE.set(namespace);
}

/// Writes one status line.
pub fn write(status: &Status) {
    let Some(namespace) = NAMESPACE.get().and_then(Option::as_deref) else {
        tracing::info!(
            processing_lag_seconds = status.processing_lag_seconds,
            iterator_age_seconds = status.iterator_age_seconds,
            leases_held = status.leases_held,
            shards_reading = status.shards_reading,
            leading = status.leading,
            "status"
        );
        return;
    };
    let totals = Counts::read(&super::prometheus().render());
    let increase = {
        let mut last = lock(&LAST);
        let increase = totals.since(*last);
        *last = totals;
        increase
    };
    let now = chrono::Utc::now();
    let mut line = document(namespace, status, &increase, now).to_string();
    line.push('\n');
    // Like every log line: stderr, one write.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// The EMF document of one status line.
pub fn document(namespace: &str, status: &Status, increase: &Counts, now: chrono::DateTime<chrono::Utc>) -> Value {
    let metrics: Vec<Value> = METRICS
        .iter()
        .map(|(name, unit)| json!({ "Name": name, "Unit": unit }))
        .collect();
    json!({
        "_aws": {
            "Timestamp": now.timestamp_millis(),
            "CloudWatchMetrics": [{ "Namespace": namespace, "Dimensions": [[]], "Metrics": metrics }],
        },
        "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "level": "INFO",
        "message": "status",
        "leading": status.leading,
        "ProcessingLagSeconds": status.processing_lag_seconds,
        "IteratorAgeSeconds": status.iterator_age_seconds,
        "DeadLetters": increase.dead_letters,
        "GroupUpdates": increase.updates,
        "RecordsReceived": increase.records,
        "LeasesHeld": status.leases_held,
        "ShardsReading": status.shards_reading,
        "WorkersRunning": 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line parses back into its metrics: every metric it declares is a number at the root,
    /// the envelope has what the specification requires, counts are increases.
    #[test]
    fn a_status_line_parses_back_into_its_metrics() {
        let before = Counts::read(
            "# HELP stream_worker_dead_letters_total x\nstream_worker_dead_letters_total{reason=\"poison\"} 2\n\
             stream_worker_group_updates_total{outcome=\"moved\"} 10\nstream_worker_group_updates_total{outcome=\"stale\"} 5\n",
        );
        let after = Counts::read(
            "stream_worker_dead_letters_total{reason=\"poison\"} 3\nstream_worker_dead_letters_total{reason=\"retries_exhausted\"} 1\n\
             stream_worker_group_updates_total{outcome=\"moved\"} 30\nstream_worker_group_updates_total{outcome=\"stale\"} 5\n\
             stream_worker_records_received_total{event=\"insert\"} 7\nstream_worker_records_received_total_other 100\n",
        );
        let status = Status {
            processing_lag_seconds: 12.5,
            iterator_age_seconds: 3.0,
            leases_held: 4,
            shards_reading: 3,
            leading: true,
        };
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-07T12:00:00Z")
            .expect("time")
            .to_utc();
        let line = document("Cruddur/Test", &status, &after.since(before), at).to_string();

        let parsed: Value = serde_json::from_str(&line).expect("one JSON object");
        let envelope = &parsed["_aws"];
        assert_eq!(envelope["Timestamp"], json!(at.timestamp_millis()));
        let directive = &envelope["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "Cruddur/Test");
        assert_eq!(
            directive["Dimensions"],
            json!([[]]),
            "no dimensions: one metric per name"
        );
        let mut values = std::collections::BTreeMap::new();
        for metric in directive["Metrics"].as_array().expect("metrics") {
            let name = metric["Name"].as_str().expect("name");
            let value = parsed[name]
                .as_f64()
                .unwrap_or_else(|| panic!("{name} is a number at the root"));
            values.insert(name.to_owned(), value);
        }
        assert_eq!(values["ProcessingLagSeconds"], 12.5);
        assert_eq!(values["IteratorAgeSeconds"], 3.0);
        assert_eq!(values["DeadLetters"], 2.0, "the increase over every reason");
        assert_eq!(values["GroupUpdates"], 20.0);
        assert_eq!(values["RecordsReceived"], 7.0, "a longer name is another metric");
        assert_eq!(values["LeasesHeld"], 4.0);
        assert_eq!(values["ShardsReading"], 3.0);
        assert_eq!(values["WorkersRunning"], 1.0);
        assert_eq!(values.len(), METRICS.len());
        assert_eq!(parsed["message"], "status");
    }

    /// A counter that went down (the process restarted its registry) counts as no increase.
    #[test]
    fn counts_never_go_negative() {
        let earlier = Counts {
            dead_letters: 5.0,
            updates: 1.0,
            records: 0.0,
        };
        let now = Counts {
            dead_letters: 1.0,
            updates: 4.0,
            records: 2.0,
        };
        assert_eq!(
            now.since(earlier),
            Counts {
                dead_letters: 0.0,
                updates: 3.0,
                records: 2.0
            }
        );
    }
}
