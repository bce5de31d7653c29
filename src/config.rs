//! Settings: layered, validated once, typed.
//!
//! Layers, later wins: `config/default.toml` (built into the binary too, so it runs without a
//! config directory), `config/<WORKER_ENV>.toml`, `WORKER_*` environment variables, then
//! command-line flags (`--set key=value` and the named flags). Keys are flat; a key's
//! environment variable is `WORKER_` + the key in capitals, except `worker_id` (`WORKER_ID`).
//!
//! Invariant: every error names the key and where its value came from; an unknown key in a
//! file or flag is an error (a typo must not silently fall back to a default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::stream::StartingPosition;
use crate::telemetry::LogFormat;

/// The built-in defaults: the repository's `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Every key, with its environment variable.
pub const KEYS: &[(&str, &str)] = &[
    ("source", "WORKER_SOURCE"),
    ("kinesis_stream_name", "WORKER_KINESIS_STREAM_NAME"),
    ("table_name", "WORKER_TABLE_NAME"),
    ("lease_table_name", "WORKER_LEASE_TABLE_NAME"),
    ("worker_id", "WORKER_ID"),
    ("http_addr", "WORKER_HTTP_ADDR"),
    ("starting_position", "WORKER_STARTING_POSITION"),
    ("batch_size", "WORKER_BATCH_SIZE"),
    ("read_ahead_records", "WORKER_READ_AHEAD_RECORDS"),
    ("idle_interval_ms", "WORKER_IDLE_INTERVAL_MS"),
    ("shard_sync_interval_ms", "WORKER_SHARD_SYNC_INTERVAL_MS"),
    ("checkpoint_interval_ms", "WORKER_CHECKPOINT_INTERVAL_MS"),
    ("max_in_flight", "WORKER_MAX_IN_FLIGHT"),
    ("max_pending_records", "WORKER_MAX_PENDING_RECORDS"),
    ("max_folded_records", "WORKER_MAX_FOLDED_RECORDS"),
    ("max_write_calls", "WORKER_MAX_WRITE_CALLS"),
    ("lease_duration_ms", "WORKER_LEASE_DURATION_MS"),
    ("lease_take_interval_ms", "WORKER_LEASE_TAKE_INTERVAL_MS"),
    ("max_steals_per_round", "WORKER_MAX_STEALS_PER_ROUND"),
    ("status_log_interval_ms", "WORKER_STATUS_LOG_INTERVAL_MS"),
    ("retry_base_delay_ms", "WORKER_RETRY_BASE_DELAY_MS"),
    ("retry_max_delay_ms", "WORKER_RETRY_MAX_DELAY_MS"),
    ("retry_max_attempts", "WORKER_RETRY_MAX_ATTEMPTS"),
    ("max_record_age_seconds", "WORKER_MAX_RECORD_AGE_SECONDS"),
    ("dead_letter_file", "WORKER_DEAD_LETTER_FILE"),
    ("dead_letter_queue_url", "WORKER_DEAD_LETTER_QUEUE_URL"),
    ("ready_max_poll_age_ms", "WORKER_READY_MAX_POLL_AGE_MS"),
    ("shutdown_grace_seconds", "WORKER_SHUTDOWN_GRACE_SECONDS"),
    ("log_format", "WORKER_LOG_FORMAT"),
    ("log_level", "WORKER_LOG_LEVEL"),
];

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

/// The validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub source: Source,
    pub table_name: String,
    pub lease_table_name: String,
    pub worker_id: String,
    pub http_addr: SocketAddr,
    pub starting_position: StartingPosition,
    pub batch_size: i32,
    pub read_ahead_records: usize,
    pub idle_interval: Duration,
    pub shard_sync_interval: Duration,
    pub checkpoint_interval: Duration,
    pub max_in_flight: usize,
    /// Records of one shard read but not yet passed by its checkpoint; reading waits beyond.
    pub max_pending_records: usize,
    /// Records one waiting update may fold in; later ones make the next update.
    pub max_folded_records: usize,
    /// `TransactWriteItems` calls in flight at once; updates waiting for one share it.
    pub max_write_calls: usize,
    pub lease_duration: Duration,
    pub lease_take_interval: Duration,
    pub max_steals_per_round: usize,
    pub status_log_interval: Duration,
    pub retry_base_delay: Duration,
    pub retry_max_delay: Duration,
    /// `None`: unbounded.
    pub retry_max_attempts: Option<u32>,
    /// `None`: unbounded.
    pub max_record_age: Option<Duration>,
    /// `None` when neither key is set: commands that need one say so.
    pub dead_letters: Option<DeadLetterTarget>,
    pub ready_max_poll_age: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
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

/// Values by key, each with its origin.
struct Layers(BTreeMap<&'static str, Entry>);

fn known_key(name: &str) -> Option<&'static str> {
    KEYS.iter().map(|(key, _)| *key).find(|key| *key == name)
}

impl Layers {
    fn merge_file(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let table: toml::Table = text.parse().map_err(|error: toml::de::Error| ConfigError::File {
            path: origin.to_owned(),
            problem: error.message().to_owned(),
        })?;
        for (name, value) in table {
            let key = known_key(&name).ok_or_else(|| ConfigError::Unknown {
                key: name.clone(),
                origin: origin.to_owned(),
            })?;
            self.0.insert(
                key,
                Entry {
                    value: Value::Toml(value),
                    origin: origin.to_owned(),
                },
            );
        }
        Ok(())
    }

    fn entry(&self, key: &'static str) -> Result<&Entry, ConfigError> {
        self.0.get(key).ok_or_else(|| ConfigError::Invalid {
            key: key.to_owned(),
            origin: "all layers".to_owned(),
            problem: "missing (config/default.toml lists every key)".to_owned(),
        })
    }

    fn invalid(&self, key: &'static str, problem: impl Into<String>) -> ConfigError {
        let origin = self
            .0
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

    fn millis(&self, key: &'static str, min: u64, max: u64) -> Result<Duration, ConfigError> {
        self.integer(key, min, max).map(Duration::from_millis)
    }
}

/// Loads and validates every layer.
pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
    let mut layers = Layers(BTreeMap::new());
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
    for (key, variable) in KEYS {
        if let Some(value) = sources.env_vars.get(*variable) {
            layers.0.insert(
                key,
                Entry {
                    value: Value::Text(value.clone()),
                    origin: format!("environment variable {variable}"),
                },
            );
        }
    }
    for (name, value, flag) in &sources.flags {
        let key = known_key(name).ok_or_else(|| ConfigError::Unknown {
            key: name.clone(),
            origin: flag.clone(),
        })?;
        layers.0.insert(
            key,
            Entry {
                value: Value::Text(value.clone()),
                origin: flag.clone(),
            },
        );
    }
    validate(&layers)
}

/// `WORKER_*` variables that are not keys: they choose the layers.
const LAYER_VARIABLES: [&str; 2] = ["WORKER_ENV", "WORKER_CONFIG_DIR"];

/// Every `WORKER_*` variable must be a key's (or choose the layers): a misspelt one is an error
/// naming the closest known variable, not silently ignored.
fn check_variables(env_vars: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    let known = || KEYS.iter().map(|(_, variable)| *variable).chain(LAYER_VARIABLES);
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
    let http_addr = layers.string("http_addr")?;
    let http_addr = http_addr.parse::<SocketAddr>().map_err(|_| {
        layers.invalid(
            "http_addr",
            format!("{http_addr:?} is not an IP address with a port, like 0.0.0.0:9090"),
        )
    })?;
    let starting_position = match layers.string("starting_position")?.to_ascii_uppercase().as_str() {
        "TRIM_HORIZON" => StartingPosition::TrimHorizon,
        "LATEST" => StartingPosition::Latest,
        other => {
            return Err(layers.invalid(
                "starting_position",
                format!("{other:?} is neither TRIM_HORIZON nor LATEST"),
            ))
        }
    };
    let log_format = match layers.string("log_format")?.to_ascii_lowercase().as_str() {
        "auto" => LogFormat::Auto,
        "json" => LogFormat::Json,
        "text" => LogFormat::Text,
        other => return Err(layers.invalid("log_format", format!("{other:?} is none of auto, json, text"))),
    };
    let log_level = layers.string("log_level")?;
    check_log_level(&log_level).map_err(|problem| layers.invalid("log_level", problem))?;
    let worker_id = match layers.string("worker_id")?.trim() {
        "" => generated_worker_id(),
        id => id.to_owned(),
    };
    let retry_base_delay = layers.millis("retry_base_delay_ms", 1, 60_000)?;
    let retry_max_delay = layers.millis("retry_max_delay_ms", 1, 600_000)?;
    if retry_max_delay < retry_base_delay {
        return Err(layers.invalid("retry_max_delay_ms", "must not be below retry_base_delay_ms"));
    }
    let lease_duration = layers.millis("lease_duration_ms", 1_000, 600_000)?;
    let lease_take_interval = layers.millis("lease_take_interval_ms", 50, 60_000)?;
    if lease_take_interval * 2 > lease_duration {
        return Err(layers.invalid("lease_take_interval_ms", "must be at most half of lease_duration_ms"));
    }
    let retry_max_attempts = match layers.integer("retry_max_attempts", 0, 1_000_000)? {
        0 => None,
        attempts => Some(u32::try_from(attempts).unwrap_or(u32::MAX)),
    };
    let max_record_age = match layers.integer("max_record_age_seconds", 0, 604_800)? {
        0 => None,
        seconds => Some(Duration::from_secs(seconds)),
    };
    let dead_letter_file = layers.string("dead_letter_file")?.trim().to_owned();
    let dead_letter_queue_url = layers.string("dead_letter_queue_url")?.trim().to_owned();
    let dead_letters = match (dead_letter_file.is_empty(), dead_letter_queue_url.is_empty()) {
        (true, true) => None,
        (false, true) => Some(DeadLetterTarget::File(PathBuf::from(dead_letter_file))),
        (true, false) => {
            if !(dead_letter_queue_url.starts_with("https://") || dead_letter_queue_url.starts_with("http://")) {
                return Err(layers.invalid(
                    "dead_letter_queue_url",
                    format!("{dead_letter_queue_url:?} is not a queue URL (https://sqs.<region>.amazonaws.com/<account>/<name>)"),
                ));
            }
            Some(DeadLetterTarget::Queue(dead_letter_queue_url))
        }
        (false, false) => {
            return Err(layers.invalid(
                "dead_letter_queue_url",
                "set either dead_letter_file or dead_letter_queue_url, not both",
            ))
        }
    };
    let batch_size = layers.integer("batch_size", 1, 1000)?;
    let read_ahead_records = usize::try_from(layers.integer("read_ahead_records", 1, 10_000)?).unwrap_or(10_000);
    let source = match layers.string("source")?.to_ascii_lowercase().as_str() {
        "dynamodb" => Source::DynamoDb,
        "kinesis" => {
            let stream_name = layers.string("kinesis_stream_name")?.trim().to_owned();
            if stream_name.is_empty() {
                return Err(layers.invalid("kinesis_stream_name", "required when source is kinesis"));
            }
            Source::Kinesis { stream_name }
        }
        other => return Err(layers.invalid("source", format!("{other:?} is neither dynamodb nor kinesis"))),
    };
    Ok(Settings {
        source,
        table_name: table_name(layers, "table_name")?,
        lease_table_name: table_name(layers, "lease_table_name")?,
        worker_id,
        http_addr,
        starting_position,
        batch_size: i32::try_from(batch_size).unwrap_or(1000),
        read_ahead_records,
        idle_interval: layers.millis("idle_interval_ms", 1, 60_000)?,
        shard_sync_interval: layers.millis("shard_sync_interval_ms", 100, 3_600_000)?,
        checkpoint_interval: layers.millis("checkpoint_interval_ms", 0, 600_000)?,
        max_in_flight: usize::try_from(layers.integer("max_in_flight", 1, 100_000)?).unwrap_or(100_000),
        max_pending_records: usize::try_from(layers.integer("max_pending_records", 1, 10_000_000)?)
            .unwrap_or(10_000_000),
        max_folded_records: usize::try_from(layers.integer("max_folded_records", 1, 10_000_000)?).unwrap_or(10_000_000),
        max_write_calls: usize::try_from(layers.integer("max_write_calls", 1, 1_000)?).unwrap_or(1_000),
        lease_duration,
        lease_take_interval,
        status_log_interval: layers.millis("status_log_interval_ms", 100, 3_600_000)?,
        max_steals_per_round: usize::try_from(layers.integer("max_steals_per_round", 0, 1_000)?).unwrap_or(1_000),
        retry_base_delay,
        retry_max_delay,
        retry_max_attempts,
        max_record_age,
        dead_letters,
        ready_max_poll_age: layers.millis("ready_max_poll_age_ms", 1_000, 3_600_000)?,
        shutdown_grace: Duration::from_secs(layers.integer("shutdown_grace_seconds", 1, 3_600)?),
        log_format,
        log_level,
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
    fn defaults_load_and_match_the_issue() {
        let settings = load(&sources(&[], &[])).expect("defaults are valid");
        assert_eq!(settings.table_name, "cruddur-messages");
        assert_eq!(settings.lease_table_name, "cruddur-stream-worker-leases");
        assert_eq!(settings.http_addr, "0.0.0.0:9090".parse().expect("addr"));
        assert_eq!(settings.starting_position, StartingPosition::TrimHorizon);
        assert_eq!(settings.idle_interval, Duration::from_millis(250));
        assert_eq!(settings.shutdown_grace, Duration::from_secs(25));
        assert!(!settings.worker_id.is_empty());
    }

    #[test]
    fn the_built_in_defaults_are_the_repository_file_and_list_every_key() {
        let table: toml::Table = DEFAULT_TOML.parse().expect("valid TOML");
        for (key, _) in KEYS {
            assert!(table.contains_key(*key), "default.toml lacks {key}");
        }
        assert_eq!(table.len(), KEYS.len());
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
            settings.http_addr,
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
        assert_eq!(defaults.retry_max_attempts, Some(20));
        assert_eq!(defaults.max_record_age, None);
        let unbounded = load(&sources(&[("WORKER_RETRY_MAX_ATTEMPTS", "0")], &[])).expect("valid");
        assert_eq!(unbounded.retry_max_attempts, None);
        let aged = load(&sources(&[("WORKER_MAX_RECORD_AGE_SECONDS", "60")], &[])).expect("valid");
        assert_eq!(aged.max_record_age, Some(Duration::from_secs(60)));
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
