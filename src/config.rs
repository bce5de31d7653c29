//! Settings: layered, validated once, typed.
//!
//! Layers, later wins: `config/default.toml` (built into the binary too, so it runs without a
//! config directory), `config/<WORKER_ENV>.toml`, `WORKER_*` environment variables, then
//! command-line flags (`--set key=value` and the named flags).
//!
//! The keys are those `config/default.toml` lists, grouped in sections by the layer that uses
//! them (`[stream]`, `[dispatch]`, `[groups]`, `[retry]`, `[dead_letters]`, `[http]`,
//! `[logging]`); [`load`] builds each layer's own settings struct from its section. Every key's
//! name is unique: its environment variable is `WORKER_` + the key in capitals, except
//! `worker_id` (`WORKER_ID`), and an overlay file may write it in its section or at the top.
//! Adding a key: the TOML, the field of its layer's struct, the line here that reads it.
//!
//! Invariant: every error names the key and where its value came from; an unknown key in a
//! file or flag is an error (a typo must not silently fall back to a default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::dispatch::DispatchLimits;
use crate::groups::updater::GroupsSettings;
use crate::http::HttpSettings;
use crate::retry::RetryPolicy;
use crate::stream::{StartingPosition, StreamSettings};
use crate::telemetry::{LogFormat, LoggingSettings};

/// The built-in defaults: the repository's `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A key of the settings, as `config/default.toml` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub name: String,
    /// The section it is listed under; `None` for the top-level keys.
    pub section: Option<String>,
    /// Its environment variable.
    pub variable: String,
}

/// Every key, read once from the built-in `default.toml`.
pub fn keys() -> &'static [Key] {
    static KEYS: std::sync::LazyLock<Vec<Key>> = std::sync::LazyLock::new(|| {
        let table: toml::Table = DEFAULT_TOML.parse().unwrap_or_default();
        let mut keys = Vec::new();
        for (name, value) in table {
            match value {
                toml::Value::Table(section) => keys.extend(section.keys().map(|key| Key {
                    variable: variable_of(key),
                    name: key.clone(),
                    section: Some(name.clone()),
                })),
                _ => keys.push(Key {
                    variable: variable_of(&name),
                    name,
                    section: None,
                }),
            }
        }
        keys
    });
    &KEYS
}

fn variable_of(key: &str) -> String {
    match key {
        "worker_id" => "WORKER_ID".to_owned(),
        key => format!("WORKER_{}", key.to_ascii_uppercase()),
    }
}

/// Where the table's change records are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The table's own DynamoDB stream.
    DynamoDb,
    /// A Kinesis data stream the table streams into.
    Kinesis { stream_name: String },
}

/// Where records that fail for good are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterTarget {
    /// JSON lines appended to this file.
    File(PathBuf),
    /// An SQS queue URL.
    Queue(String),
}

/// The validated settings: the top-level keys, and each layer's own settings struct.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: Source,
    pub table_name: String,
    pub lease_table_name: String,
    pub worker_id: String,
    pub shutdown_grace: Duration,
    pub stream: StreamSettings,
    pub dispatch: DispatchLimits,
    pub groups: GroupsSettings,
    /// Retries of group updates; the stream's own calls retry with the same delays, unbounded.
    pub retry: RetryPolicy,
    /// `None` when neither key is set: commands that need one say so.
    pub dead_letters: Option<DeadLetterTarget>,
    pub http: HttpSettings,
    pub logging: LoggingSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config key `{key}` (from {origin}): {problem}")]
    Invalid {
        key: String,
        origin: String,
        problem: String,
    },
    #[error("unknown config key `{key}` in {origin}")]
    Unknown { key: String, origin: String },
    #[error("unknown environment variable {name}{}", closest.as_deref().map(|c| format!(" (did you mean {c}?)")).unwrap_or_default())]
    UnknownVariable { name: String, closest: Option<String> },
    #[error("config file {path}: {problem}")]
    File { path: String, problem: String },
}

/// Where settings come from; the binary fills it from the process, tests build it by hand.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Directory of `default.toml` and `<env>.toml`.
    pub config_dir: PathBuf,
    /// The `WORKER_ENV` overlay to apply, if any.
    pub environment: Option<String>,
    /// Environment variables (only `WORKER_*` names are read).
    pub env_vars: BTreeMap<String, String>,
    /// `(key, value, flag)` from the command line, in order.
    pub flags: Vec<(String, String, String)>,
}

impl Sources {
    /// The process's environment and the default config directory (`WORKER_CONFIG_DIR`, or
    /// `config`), environment from `WORKER_ENV`.
    pub fn from_process() -> Self {
        let env_vars: BTreeMap<String, String> = std::env::vars()
            .filter(|(name, _)| name.starts_with("WORKER_"))
            .collect();
        Self {
            config_dir: PathBuf::from(env_vars.get("WORKER_CONFIG_DIR").map_or("config", String::as_str)),
            environment: env_vars.get("WORKER_ENV").filter(|env| !env.is_empty()).cloned(),
            env_vars,
            flags: Vec::new(),
        }
    }
}

enum Value {
    Toml(toml::Value),
    Text(String),
}

struct Entry {
    value: Value,
    origin: String,
}

/// Values by key, each with its origin, and which keys validation read.
#[derive(Default)]
struct Layers {
    entries: BTreeMap<&'static str, Entry>,
    read: std::cell::RefCell<std::collections::BTreeSet<&'static str>>,
}

fn known_key(name: &str) -> Option<&'static Key> {
    keys().iter().find(|key| key.name == name)
}

impl Layers {
    fn merge_file(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let table: toml::Table = text.parse().map_err(|error: toml::de::Error| ConfigError::File {
            path: origin.to_owned(),
            problem: error.message().to_owned(),
        })?;
        for (name, value) in table {
            match value {
                toml::Value::Table(section) if keys().iter().any(|key| key.section.as_ref() == Some(&name)) => {
                    for (key, value) in section {
                        self.merge_value(&key, Some(&name), value, origin)?;
                    }
                }
                value => self.merge_value(&name, None, value, origin)?,
            }
        }
        Ok(())
    }

    /// One key of a file: known, and in its own section when written in one.
    fn merge_value(
        &mut self,
        name: &str,
        section: Option<&str>,
        value: toml::Value,
        origin: &str,
    ) -> Result<(), ConfigError> {
        let unknown = || ConfigError::Unknown {
            key: section.map_or_else(|| name.to_owned(), |section| format!("{section}.{name}")),
            origin: origin.to_owned(),
        };
        let key = known_key(name).ok_or_else(unknown)?;
        if section.is_some() && key.section.as_deref() != section {
            return Err(unknown());
        }
        self.entries.insert(
            &key.name,
            Entry {
                value: Value::Toml(value),
                origin: origin.to_owned(),
            },
        );
        Ok(())
    }

    fn entry(&self, key: &'static str) -> Result<&Entry, ConfigError> {
        self.read.borrow_mut().insert(key);
        self.entries.get(key).ok_or_else(|| ConfigError::Invalid {
            key: key.to_owned(),
            origin: "all layers".to_owned(),
            problem: "missing (config/default.toml lists every key)".to_owned(),
        })
    }

    fn invalid(&self, key: &'static str, problem: impl Into<String>) -> ConfigError {
        let origin = self
            .entries
            .get(key)
            .map_or_else(|| "all layers".to_owned(), |entry| entry.origin.clone());
        ConfigError::Invalid {
            key: key.to_owned(),
            origin,
            problem: problem.into(),
        }
    }

    fn string(&self, key: &'static str) -> Result<String, ConfigError> {
        match &self.entry(key)?.value {
            Value::Text(text) | Value::Toml(toml::Value::String(text)) => Ok(text.clone()),
            Value::Toml(other) => Err(self.invalid(key, format!("expected a string, got {}", other.type_str()))),
        }
    }

    fn integer(&self, key: &'static str, min: u64, max: u64) -> Result<u64, ConfigError> {
        let value = match &self.entry(key)?.value {
            Value::Toml(toml::Value::Integer(number)) => u64::try_from(*number).ok(),
            Value::Text(text) => text.trim().parse::<u64>().ok(),
            Value::Toml(_) => None,
        };
        match value {
            Some(number) if (min..=max).contains(&number) => Ok(number),
            _ => Err(self.invalid(key, format!("expected a whole number from {min} to {max}"))),
        }
    }

    fn count(&self, key: &'static str, min: u64, max: u64) -> Result<usize, ConfigError> {
        self.integer(key, min, max)
            .map(|number| usize::try_from(number).unwrap_or(usize::MAX))
    }

    fn millis(&self, key: &'static str, min: u64, max: u64) -> Result<Duration, ConfigError> {
        self.integer(key, min, max).map(Duration::from_millis)
    }
}

/// Loads and validates every layer.
pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
    validate(&merge(sources)?)
}

/// Every layer merged, not yet validated.
fn merge(sources: &Sources) -> Result<Layers, ConfigError> {
    let mut layers = Layers::default();
    let default_path = sources.config_dir.join("default.toml");
    match read_optional(&default_path)? {
        Some(text) => layers.merge_file(&text, &default_path.display().to_string())?,
        None => layers.merge_file(DEFAULT_TOML, "built-in default.toml")?,
    }
    if let Some(environment) = &sources.environment {
        let path = sources.config_dir.join(format!("{environment}.toml"));
        let text = read_optional(&path)?.ok_or_else(|| ConfigError::Invalid {
            key: "env".to_owned(),
            origin: "WORKER_ENV or --env".to_owned(),
            problem: format!("no config file {}", path.display()),
        })?;
        layers.merge_file(&text, &path.display().to_string())?;
    }
    check_variables(&sources.env_vars)?;
    for key in keys() {
        if let Some(value) = sources.env_vars.get(&key.variable) {
            let variable = &key.variable;
            layers.entries.insert(
                &key.name,
                Entry {
                    value: Value::Text(value.clone()),
                    origin: format!("environment variable {variable}"),
                },
            );
        }
    }
    for (name, value, flag) in &sources.flags {
        // `--set key=value`, or `--set section.key=value` as the file spells it.
        let (section, bare) = name
            .rsplit_once('.')
            .map_or((None, name.as_str()), |(s, k)| (Some(s), k));
        let key = known_key(bare)
            .filter(|key| section.is_none() || key.section.as_deref() == section)
            .ok_or_else(|| ConfigError::Unknown {
                key: name.clone(),
                origin: flag.clone(),
            })?;
        layers.entries.insert(
            &key.name,
            Entry {
                value: Value::Text(value.clone()),
                origin: flag.clone(),
            },
        );
    }
    Ok(layers)
}

/// `WORKER_*` variables that are not keys: they choose the layers.
const LAYER_VARIABLES: [&str; 2] = ["WORKER_ENV", "WORKER_CONFIG_DIR"];

/// Every `WORKER_*` variable must be a key's (or choose the layers): a misspelt one is an error
/// naming the closest known variable, not silently ignored.
fn check_variables(env_vars: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    let known = || keys().iter().map(|key| key.variable.as_str()).chain(LAYER_VARIABLES);
    for name in env_vars.keys().filter(|name| name.starts_with("WORKER_")) {
        if known().any(|variable| variable == name) {
            continue;
        }
        let closest = known()
            .map(|variable| (edit_distance(name, variable), variable))
            .min()
            .filter(|(distance, _)| *distance <= 3)
            .map(|(_, variable)| variable.to_owned());
        return Err(ConfigError::UnknownVariable {
            name: name.clone(),
            closest,
        });
    }
    Ok(())
}

/// Levenshtein distance (ASCII names).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A `log_level` filter must be able to match: every directive a level (`warn`) or
/// `target=level`, the levels spelt as tracing spells them (`warning` would be read as a target
/// that never logs, silencing everything).
fn check_log_level(filter: &str) -> Result<(), String> {
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let closest = LEVELS
                .iter()
                .min_by_key(|known| edit_distance(&level.to_ascii_lowercase(), known))
                .copied()
                .unwrap_or("info");
            return Err(format!(
                "{directive:?} names no level (trace, debug, info, warn, error, off): did you mean {closest:?}?"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|error| format!("{filter:?} is not a tracing filter: {error}"))
}

fn read_optional(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(ConfigError::File {
            path: path.display().to_string(),
            problem: error.to_string(),
        }),
    }
}

fn table_name(layers: &Layers, key: &'static str) -> Result<String, ConfigError> {
    let name = layers.string(key)?;
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !(3..=255).contains(&name.len()) || !valid_chars {
        return Err(layers.invalid(
            key,
            format!("{name:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)"),
        ));
    }
    Ok(name)
}

fn validate(layers: &Layers) -> Result<Settings, ConfigError> {
    let worker_id = match layers.string("worker_id")?.trim() {
        "" => generated_worker_id(),
        id => id.to_owned(),
    };
    let retry = retry(layers)?;
    let source = source(layers)?;
    Ok(Settings {
        stream: stream(layers, &retry, &source)?,
        source,
        table_name: table_name(layers, "table_name")?,
        lease_table_name: table_name(layers, "lease_table_name")?,
        worker_id,
        shutdown_grace: Duration::from_secs(layers.integer("shutdown_grace_seconds", 1, 3_600)?),
        dispatch: dispatch(layers)?,
        groups: GroupsSettings {
            max_write_calls: layers.count("max_write_calls", 1, 1_000)?,
            max_read_calls: layers.count("max_read_calls", 1, 1_000)?,
        },
        retry,
        dead_letters: dead_letters(layers)?,
        http: http(layers)?,
        logging: logging(layers)?,
    })
}

fn source(layers: &Layers) -> Result<Source, ConfigError> {
    match layers.string("source")?.to_ascii_lowercase().as_str() {
        "dynamodb" => Ok(Source::DynamoDb),
        "kinesis" => {
            let stream_name = layers.string("kinesis_stream_name")?.trim().to_owned();
            if stream_name.is_empty() {
                return Err(layers.invalid("kinesis_stream_name", "required when source is kinesis"));
            }
            Ok(Source::Kinesis { stream_name })
        }
        other => Err(layers.invalid("source", format!("{other:?} is neither dynamodb nor kinesis"))),
    }
}

/// GetRecords calls per shard a second when `max_reads_per_second` is 0: Kinesis allows 5 (shared
/// by every consumer of the stream); DynamoDB Streams states no per-shard rate (it throttles more
/// than two readers of a shard), so a backlog is read at up to 10 pages a second.
const KINESIS_READS_PER_SECOND: u32 = 5;
const DYNAMODB_STREAMS_READS_PER_SECOND: u32 = 10;

/// Reads a second that polling every `interval` takes (rounded up).
fn reads_at(interval: Duration) -> u32 {
    let millis = interval.as_millis().max(1);
    u32::try_from(1000u128.div_ceil(millis)).unwrap_or(1_000)
}

/// `starting_position`, with `starting_timestamp` for `AT_TIMESTAMP` (and only then).
fn starting_position(layers: &Layers) -> Result<StartingPosition, ConfigError> {
    let timestamp = layers.string("starting_timestamp")?;
    let position = match layers.string("starting_position")?.to_ascii_uppercase().as_str() {
        "TRIM_HORIZON" => StartingPosition::TrimHorizon,
        "LATEST" => StartingPosition::Latest,
        "AT_TIMESTAMP" => {
            let at = chrono::DateTime::parse_from_rfc3339(timestamp.trim()).map_err(|_| {
                layers.invalid(
                    "starting_timestamp",
                    format!(
                        "{timestamp:?} is not an RFC 3339 instant, like 2026-12-01T00:00:00Z (AT_TIMESTAMP needs one)"
                    ),
                )
            })?;
            return Ok(StartingPosition::AtTimestamp(at.with_timezone(&chrono::Utc).into()));
        }
        other => {
            return Err(layers.invalid(
                "starting_position",
                format!("{other:?} is none of TRIM_HORIZON, LATEST, AT_TIMESTAMP"),
            ))
        }
    };
    if !timestamp.trim().is_empty() {
        return Err(layers.invalid(
            "starting_timestamp",
            "is only read with starting_position = AT_TIMESTAMP",
        ));
    }
    Ok(position)
}

/// `[stream]`; its AWS calls retry with the updates' delays, until shutdown.
fn stream(layers: &Layers, retry: &RetryPolicy, source: &Source) -> Result<StreamSettings, ConfigError> {
    let starting_position = starting_position(layers)?;
    let idle_interval = layers.millis("idle_interval_ms", 1, 60_000)?;
    let max_idle_interval = layers.millis("max_idle_interval_ms", 1, 600_000)?;
    if max_idle_interval < idle_interval {
        return Err(layers.invalid("max_idle_interval_ms", "must not be below idle_interval_ms"));
    }
    let lease_duration = layers.millis("lease_duration_ms", 1_000, 600_000)?;
    let lease_take_interval = layers.millis("lease_take_interval_ms", 50, 60_000)?;
    if lease_take_interval * 2 > lease_duration {
        return Err(layers.invalid("lease_take_interval_ms", "must be at most half of lease_duration_ms"));
    }
    let heartbeat_interval = layers.millis("heartbeat_interval_ms", 50, 60_000)?;
    if heartbeat_interval * 3 > lease_duration {
        return Err(layers.invalid("heartbeat_interval_ms", "must be at most a third of lease_duration_ms"));
    }
    Ok(StreamSettings {
        starting_position,
        batch_size: i32::try_from(layers.integer("batch_size", 1, 1000)?).unwrap_or(1000),
        idle_interval,
        max_idle_interval,
        max_reads_per_second: match layers.integer("max_reads_per_second", 0, 1_000)? {
            0 if matches!(source, Source::Kinesis { .. }) => KINESIS_READS_PER_SECOND,
            // No stated rate: 10 a second, or as often as the idle interval asks if that is more.
            0 => DYNAMODB_STREAMS_READS_PER_SECOND.max(reads_at(idle_interval)),
            reads => u32::try_from(reads).unwrap_or(1_000),
        },
        shard_sync_interval: layers.millis("shard_sync_interval_ms", 100, 3_600_000)?,
        checkpoint_interval: layers.millis("checkpoint_interval_ms", 0, 600_000)?,
        lease_duration,
        lease_take_interval,
        heartbeat_interval,
        status_interval: layers.millis("status_log_interval_ms", 100, 3_600_000)?,
        retry: RetryPolicy {
            max_attempts: None,
            ..retry.clone()
        },
    })
}

/// `[dispatch]`.
fn dispatch(layers: &Layers) -> Result<DispatchLimits, ConfigError> {
    Ok(DispatchLimits {
        max_in_flight: layers.count("max_in_flight", 1, 100_000)?,
        max_pending_records: layers.count("max_pending_records", 1, 10_000_000)?,
        max_folded_records: layers.count("max_folded_records", 1, 10_000_000)?,
        read_ahead_bytes: layers.count("read_ahead_bytes", 0, 1 << 34)?,
        max_record_age: match layers.integer("max_record_age_seconds", 0, 604_800)? {
            0 => None,
            seconds => Some(Duration::from_secs(seconds)),
        },
    })
}

/// `[retry]`.
fn retry(layers: &Layers) -> Result<RetryPolicy, ConfigError> {
    let base_delay = layers.millis("retry_base_delay_ms", 1, 60_000)?;
    let max_delay = layers.millis("retry_max_delay_ms", 1, 600_000)?;
    if max_delay < base_delay {
        return Err(layers.invalid("retry_max_delay_ms", "must not be below retry_base_delay_ms"));
    }
    let max_attempts = match layers.integer("retry_max_attempts", 0, 1_000_000)? {
        0 => None,
        attempts => Some(u32::try_from(attempts).unwrap_or(u32::MAX)),
    };
    Ok(RetryPolicy {
        base_delay,
        max_delay,
        max_attempts,
    })
}

/// `[dead_letters]`: one destination at most.
fn dead_letters(layers: &Layers) -> Result<Option<DeadLetterTarget>, ConfigError> {
    let file = layers.string("dead_letter_file")?.trim().to_owned();
    let queue_url = layers.string("dead_letter_queue_url")?.trim().to_owned();
    match (file.is_empty(), queue_url.is_empty()) {
        (true, true) => Ok(None),
        (false, true) => Ok(Some(DeadLetterTarget::File(PathBuf::from(file)))),
        (true, false) => {
            if !(queue_url.starts_with("https://") || queue_url.starts_with("http://")) {
                return Err(layers.invalid(
                    "dead_letter_queue_url",
                    format!("{queue_url:?} is not a queue URL (https://sqs.<region>.amazonaws.com/<account>/<name>)"),
                ));
            }
            Ok(Some(DeadLetterTarget::Queue(queue_url)))
        }
        (false, false) => Err(layers.invalid(
            "dead_letter_queue_url",
            "set either dead_letter_file or dead_letter_queue_url, not both",
        )),
    }
}

/// `[http]`.
fn http(layers: &Layers) -> Result<HttpSettings, ConfigError> {
    let addr = layers.string("http_addr")?;
    let addr = addr.parse::<SocketAddr>().map_err(|_| {
        layers.invalid(
            "http_addr",
            format!("{addr:?} is not an IP address with a port, like 0.0.0.0:9090"),
        )
    })?;
    Ok(HttpSettings {
        addr,
        ready_max_poll_age: layers.millis("ready_max_poll_age_ms", 1_000, 3_600_000)?,
    })
}

/// `[logging]`.
fn logging(layers: &Layers) -> Result<LoggingSettings, ConfigError> {
    let format = match layers.string("log_format")?.to_ascii_lowercase().as_str() {
        "auto" => LogFormat::Auto,
        "json" => LogFormat::Json,
        "text" => LogFormat::Text,
        other => return Err(layers.invalid("log_format", format!("{other:?} is none of auto, json, text"))),
    };
    let level = layers.string("log_level")?;
    check_log_level(&level).map_err(|problem| layers.invalid("log_level", problem))?;
    let metrics_namespace = layers.string("metrics_namespace")?;
    if metrics_namespace.is_empty() || metrics_namespace.len() > 255 || metrics_namespace.starts_with("AWS/") {
        return Err(layers.invalid(
            "metrics_namespace",
            format!(
                "{metrics_namespace:?} is not a CloudWatch namespace of your own (1 to 255 characters, not AWS/...)"
            ),
        ));
    }
    Ok(LoggingSettings {
        format,
        level,
        metrics_namespace,
    })
}

/// `<hostname>-<8 hex>`: unique per process even where every task's pid is 1.
fn generated_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{:08x}", fastrand::u32(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(env: &[(&str, &str)], flags: &[(&str, &str)]) -> Sources {
        Sources {
            config_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/config")),
            environment: None,
            env_vars: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            flags: flags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned(), format!("--set {k}")))
                .collect(),
        }
    }

    fn error_text(sources: &Sources) -> String {
        load(sources).expect_err("should fail").to_string()
    }

    /// AT_TIMESTAMP takes its instant from starting_timestamp; a missing or unreadable one, or
    /// one given with another position, is an error naming the key.
    #[test]
    fn at_timestamp_needs_an_instant_and_only_it_takes_one() {
        let at = |env: &[(&str, &str)]| load(&sources(env, &[])).map(|settings| settings.stream.starting_position);
        let given = at(&[
            ("WORKER_STARTING_POSITION", "at_timestamp"),
            ("WORKER_STARTING_TIMESTAMP", "2026-12-01T01:00:00+01:00"),
        ])
        .expect("valid");
        let instant = std::time::UNIX_EPOCH + Duration::from_secs(1_796_083_200);
        assert_eq!(given, StartingPosition::AtTimestamp(instant));
        for env in [
            vec![("WORKER_STARTING_POSITION", "AT_TIMESTAMP")],
            vec![
                ("WORKER_STARTING_POSITION", "AT_TIMESTAMP"),
                ("WORKER_STARTING_TIMESTAMP", "yesterday"),
            ],
            vec![("WORKER_STARTING_TIMESTAMP", "2026-12-01T00:00:00Z")],
        ] {
            let text = error_text(&sources(&env, &[]));
            assert!(text.contains("starting_timestamp"), "{env:?}: {text}");
        }
        let text = error_text(&sources(&[("WORKER_STARTING_POSITION", "NOW")], &[]));
        assert!(text.contains("AT_TIMESTAMP"), "{text}");
    }

    #[test]
    fn a_misspelt_variable_is_an_error_naming_the_closest_one() {
        let text = error_text(&sources(&[("WORKER_BATCH_SIZ", "10")], &[]));
        assert!(
            text.contains("WORKER_BATCH_SIZ") && text.contains("did you mean WORKER_BATCH_SIZE?"),
            "{text}"
        );
        let text = error_text(&sources(&[("WORKER_SOMETHING_ELSE_ENTIRELY", "1")], &[]));
        assert!(!text.contains("did you mean"), "{text}");
        assert!(load(&sources(&[("WORKER_CONFIG_DIR", "config"), ("WORKER_ENV", "")], &[])).is_ok());
    }

    #[test]
    fn a_log_level_that_can_never_match_is_an_error() {
        for bad in ["warning", "info,cruddur_stream_worker=verbose", "WARNING"] {
            let text = error_text(&sources(&[("WORKER_LOG_LEVEL", bad)], &[]));
            assert!(
                text.contains("log_level") && text.contains("WORKER_LOG_LEVEL"),
                "{text}"
            );
        }
        assert!(error_text(&sources(&[("WORKER_LOG_LEVEL", "warning")], &[])).contains("did you mean \"warn\"?"));
        for good in [
            "warn",
            "INFO",
            "warn,cruddur_stream_worker=debug",
            "aws_smithy_runtime=off,info",
        ] {
            assert!(load(&sources(&[("WORKER_LOG_LEVEL", good)], &[])).is_ok(), "{good}");
        }
    }

    #[test]
    fn reads_per_second_default_to_the_sources_pace() {
        let reads = |env: &[(&str, &str)]| load(&sources(env, &[])).expect("valid").stream.max_reads_per_second;
        assert_eq!(reads(&[]), 10, "DynamoDB Streams");
        assert_eq!(
            reads(&[("WORKER_IDLE_INTERVAL_MS", "50")]),
            20,
            "never slower than the idle interval asked for"
        );
        let kinesis = [("WORKER_SOURCE", "kinesis"), ("WORKER_KINESIS_STREAM_NAME", "s")];
        assert_eq!(reads(&kinesis), 5, "Kinesis's per-shard limit");
        let mut set = kinesis.to_vec();
        set.push(("WORKER_MAX_READS_PER_SECOND", "3"));
        assert_eq!(reads(&set), 3, "as set");
    }

    #[test]
    fn defaults_load_and_match_the_issue() {
        let settings = load(&sources(&[], &[])).expect("defaults are valid");
        assert_eq!(settings.table_name, "cruddur-messages");
        assert_eq!(settings.lease_table_name, "cruddur-stream-worker-leases");
        assert_eq!(settings.http.addr, "0.0.0.0:9090".parse().expect("addr"));
        assert_eq!(settings.stream.starting_position, StartingPosition::TrimHorizon);
        assert_eq!(settings.stream.idle_interval, Duration::from_millis(250));
        assert_eq!(
            settings.stream.retry.max_attempts, None,
            "the stream's reads retry until shutdown"
        );
        assert_eq!(settings.retry.max_attempts, Some(20));
        assert_eq!(settings.dispatch.max_in_flight, 64);
        assert_eq!(settings.groups.max_write_calls, 4);
        assert_eq!(settings.groups.max_read_calls, 4);
        assert_eq!(settings.shutdown_grace, Duration::from_secs(25));
        assert!(!settings.worker_id.is_empty());
    }

    #[test]
    fn every_key_of_the_defaults_is_read_and_has_its_variable() {
        // Kinesis, so that its stream name is read too.
        let kinesis = [("WORKER_SOURCE", "kinesis"), ("WORKER_KINESIS_STREAM_NAME", "changes")];
        let layers = merge(&sources(&kinesis, &[])).expect("defaults merge");
        validate(&layers).expect("defaults are valid");
        let read = layers.read.borrow();
        let unread: Vec<&str> = keys()
            .iter()
            .map(|key| key.name.as_str())
            .filter(|key| !read.contains(key))
            .collect();
        assert!(
            unread.is_empty(),
            "keys in default.toml that no setting reads: {unread:?}"
        );
        assert_eq!(keys().len(), read.len(), "every key read is listed");
        let key = |name: &str| keys().iter().find(|key| key.name == name).cloned().expect("listed");
        assert_eq!(key("batch_size").variable, "WORKER_BATCH_SIZE");
        assert_eq!(key("batch_size").section.as_deref(), Some("stream"));
        assert_eq!(key("worker_id").variable, "WORKER_ID");
        assert_eq!(key("table_name").section, None);
    }

    #[test]
    fn a_key_is_read_in_its_section_or_at_the_top_never_in_another_section() {
        let dir = std::env::temp_dir().join(format!("cruddur-config-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("scratch");
        std::fs::copy(
            format!("{}/config/default.toml", env!("CARGO_MANIFEST_DIR")),
            dir.join("default.toml"),
        )
        .expect("copy defaults");
        let overlay = |name: &str, text: &str| {
            std::fs::write(dir.join(format!("{name}.toml")), text).expect("overlay");
            let mut layered = sources(&[], &[]);
            layered.config_dir = dir.clone();
            layered.environment = Some(name.to_owned());
            load(&layered)
        };
        let sectioned = overlay("sectioned", "[stream]\nbatch_size = 7\n").expect("valid");
        assert_eq!(sectioned.stream.batch_size, 7);
        let flat = overlay("flat", "batch_size = 8\nmax_in_flight = 3\n").expect("valid");
        assert_eq!((flat.stream.batch_size, flat.dispatch.max_in_flight), (8, 3));
        let misplaced = overlay("misplaced", "[dispatch]\nbatch_size = 9\n").expect_err("wrong section");
        assert!(misplaced.to_string().contains("dispatch.batch_size"), "{misplaced}");
        let by_section = load(&sources(&[], &[("stream.batch_size", "11")])).expect("valid");
        assert_eq!(by_section.stream.batch_size, 11);
        assert!(error_text(&sources(&[], &[("retry.batch_size", "11")])).contains("retry.batch_size"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn layers_override_in_order() {
        let mut layered = sources(
            &[("WORKER_TABLE_NAME", "from-env"), ("WORKER_ID", "w-env")],
            &[("table_name", "from-flag")],
        );
        layered.environment = Some("local".into());
        let settings = load(&layered).expect("valid");
        assert_eq!(settings.table_name, "from-flag", "flags beat the environment");
        assert_eq!(settings.worker_id, "w-env", "the environment beats the env file");
        assert_eq!(
            settings.http.addr,
            "127.0.0.1:9090".parse().expect("addr"),
            "the env file beats defaults"
        );
    }

    #[test]
    fn errors_name_the_key_and_its_origin() {
        let text = error_text(&sources(&[("WORKER_STARTING_POSITION", "SOMETIMES")], &[]));
        assert!(
            text.contains("starting_position") && text.contains("WORKER_STARTING_POSITION"),
            "{text}"
        );
        let text = error_text(&sources(&[("WORKER_HTTP_ADDR", "nowhere")], &[]));
        assert!(text.contains("http_addr"), "{text}");
        let text = error_text(&sources(&[], &[("batch_size", "5000")]));
        assert!(
            text.contains("batch_size") && text.contains("--set batch_size"),
            "{text}"
        );
        let text = error_text(&sources(
            &[
                ("WORKER_RETRY_BASE_DELAY_MS", "100"),
                ("WORKER_RETRY_MAX_DELAY_MS", "10"),
            ],
            &[],
        ));
        assert!(text.contains("retry_max_delay_ms"), "{text}");
        let text = error_text(&sources(&[("WORKER_TABLE_NAME", "no spaces allowed")], &[]));
        assert!(text.contains("table_name"), "{text}");
        let text = error_text(&sources(&[("WORKER_LEASE_DURATION_MS", "2000")], &[]));
        assert!(
            text.contains("heartbeat_interval_ms") && text.contains("a third of lease_duration_ms"),
            "a heartbeat too rare for the lease duration: {text}"
        );
    }

    #[test]
    fn unknown_keys_and_missing_env_files_are_errors() {
        assert!(error_text(&sources(&[], &[("tabel_name", "x")])).contains("tabel_name"));
        let mut missing = sources(&[], &[]);
        missing.environment = Some("nowhere".into());
        assert!(error_text(&missing).contains("nowhere.toml"));
    }

    #[test]
    fn kinesis_needs_a_stream_name() {
        let text = error_text(&sources(&[("WORKER_SOURCE", "kinesis")], &[]));
        assert!(text.contains("kinesis_stream_name"), "{text}");
        let settings = load(&sources(
            &[("WORKER_SOURCE", "kinesis"), ("WORKER_KINESIS_STREAM_NAME", "changes")],
            &[],
        ))
        .expect("valid");
        assert_eq!(
            settings.source,
            Source::Kinesis {
                stream_name: "changes".into()
            }
        );
        assert!(error_text(&sources(&[("WORKER_SOURCE", "kafka")], &[])).contains("source"));
    }

    #[test]
    fn zero_attempts_or_age_means_unbounded() {
        let defaults = load(&sources(&[], &[])).expect("valid");
        assert_eq!(defaults.retry.max_attempts, Some(20));
        assert_eq!(defaults.dispatch.max_record_age, None);
        let unbounded = load(&sources(&[("WORKER_RETRY_MAX_ATTEMPTS", "0")], &[])).expect("valid");
        assert_eq!(unbounded.retry.max_attempts, None);
        let aged = load(&sources(&[("WORKER_MAX_RECORD_AGE_SECONDS", "60")], &[])).expect("valid");
        assert_eq!(aged.dispatch.max_record_age, Some(Duration::from_secs(60)));
        assert!(
            error_text(&sources(&[("WORKER_MAX_RECORD_AGE_SECONDS", "-1")], &[])).contains("max_record_age_seconds")
        );
    }

    #[test]
    fn one_dead_letter_destination_at_most() {
        assert_eq!(load(&sources(&[], &[])).expect("valid").dead_letters, None);
        let file = load(&sources(&[("WORKER_DEAD_LETTER_FILE", "/tmp/dl.jsonl")], &[])).expect("valid");
        assert_eq!(file.dead_letters, Some(DeadLetterTarget::File("/tmp/dl.jsonl".into())));
        let url = "https://sqs.eu-west-1.amazonaws.com/123456789012/dlq";
        let queue = load(&sources(&[("WORKER_DEAD_LETTER_QUEUE_URL", url)], &[])).expect("valid");
        assert_eq!(queue.dead_letters, Some(DeadLetterTarget::Queue(url.into())));
        let both = error_text(&sources(
            &[("WORKER_DEAD_LETTER_FILE", "x"), ("WORKER_DEAD_LETTER_QUEUE_URL", url)],
            &[],
        ));
        assert!(both.contains("not both"), "{both}");
        let bad = error_text(&sources(&[("WORKER_DEAD_LETTER_QUEUE_URL", "dlq")], &[]));
        assert!(
            bad.contains("dead_letter_queue_url") && bad.contains("WORKER_DEAD_LETTER_QUEUE_URL"),
            "{bad}"
        );
    }
}
