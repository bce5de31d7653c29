//! The command line: parse, load settings, run a subcommand, map the outcome to an exit code.
//!
//! Exit codes: 0 success; 1 a runtime failure (AWS unreachable, shutdown grace exceeded);
//! 2 bad usage or bad configuration (the message names the key). Command output goes to
//! stdout, logs to stderr.

use std::process::ExitCode;

use anyhow::Context as _;
use aws_sdk_dynamodb::types::AttributeValue;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::aws::{self, AwsOverrides, Item};
use crate::config::{self, Settings, Sources};
use crate::groups::admin::{self, User};
use crate::groups::reconcile;
use crate::groups::updater::GroupSummaryUpdater;
use crate::stream::LeaseStore;
use crate::{app, dispatch, telemetry};

/// Keeps Cruddur's conversation list ("message groups") current from the messages table's
/// DynamoDB stream.
///
/// Settings come from config/default.toml, config/<WORKER_ENV>.toml, WORKER_* environment
/// variables and flags, later ones winning (see config/default.toml for every key). AWS
/// endpoint, region and credentials come from the usual AWS variables (AWS_ENDPOINT_URL,
/// AWS_REGION, AWS_ACCESS_KEY_ID, ...) or the task role.
#[derive(Debug, Parser)]
#[command(name = "cruddur-stream-worker", version, about, long_about)]
pub struct Cli {
    /// Directory holding default.toml and <env>.toml.
    #[arg(
        long,
        global = true,
        env = "WORKER_CONFIG_DIR",
        default_value = "config",
        value_name = "DIR"
    )]
    config_dir: std::path::PathBuf,
    /// Overlay config/<ENV>.toml (e.g. local).
    #[arg(long = "env", global = true, env = "WORKER_ENV", value_name = "ENV")]
    environment: Option<String>,
    /// Set any config key, e.g. --set batch_size=100 (repeatable; beats the environment).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    set: Vec<(String, String)>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker: read the stream, update group rows, serve /metrics /healthz /readyz.
    Run(RunFlags),
    /// Create the messages table (with its GSI and stream) and the lease table, if missing.
    Setup,
    /// Write demo users' conversations the way the app does (skips those that exist).
    Seed,
    /// Post a message as the app does: into the existing conversation or a new one.
    Send {
        /// Sender's handle.
        #[arg(long, value_name = "HANDLE")]
        from: String,
        /// Recipient's handle.
        #[arg(long, value_name = "HANDLE")]
        to: String,
        /// The message text.
        text: String,
    },
    /// A user's conversations as the app lists them, newest first.
    Groups { handle: String },
    /// A conversation's messages, newest first.
    Messages { group_uuid: String },
    /// Every item of the messages table, one JSON object per line (for debugging).
    Scan,
    /// The lease table: each shard's owner, lease counter, checkpoint and lineage.
    Leases,
    /// Rebuild every conversation's group rows from its message rows: move stale rows to the
    /// newest message, create missing rows, delete duplicates, put every row's sk in the
    /// canonical form (UTC, +00:00, microseconds). Safe while workers run. Run it
    /// after a stream gap (the worker logs when). Progress goes to stderr, changes to stdout.
    Reconcile {
        /// Report what would change without writing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Replay dead letters from the configured destination (dead_letter_file or
    /// dead_letter_queue_url; e.g. --set dead_letter_file=PATH) once their cause is fixed.
    /// Replayed letters are removed; those that fail again are written back with the new error.
    /// Exit 1 when any failed again.
    Redrive,
    /// Probe a running worker's /healthz (for container health checks; exit 0 when healthy).
    Healthcheck {
        /// The worker's address; default: http_addr from the settings, on loopback.
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<std::net::SocketAddr>,
    },
}

#[derive(Debug, Args)]
struct RunFlags {
    /// Address for /metrics, /healthz and /readyz (key http_addr).
    #[arg(long, value_name = "ADDR")]
    http_addr: Option<String>,
    /// TRIM_HORIZON or LATEST, for shards with no checkpoint (key starting_position).
    #[arg(long, value_name = "POSITION")]
    starting_position: Option<String>,
    /// This worker's name in the lease table (key worker_id).
    #[arg(long, value_name = "ID")]
    worker_id: Option<String>,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
    Ok((key.trim().to_owned(), value.to_owned()))
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match load_settings(&cli) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(settings.log_format, &settings.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // A missing region or dead-letter destination is bad configuration, like a bad key.
            let bad_config = error
                .downcast_ref::<app::AppError>()
                .is_some_and(app::AppError::is_config);
            if error.is::<NoRegion>() || bad_config {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The AWS configuration names no region.
#[derive(Debug, thiserror::Error)]
#[error("no AWS region: set AWS_REGION (any name works with DynamoDB Local)")]
struct NoRegion;

fn load_settings(cli: &Cli) -> Result<Settings, config::ConfigError> {
    let mut sources = Sources::from_process();
    sources.config_dir = cli.config_dir.clone();
    sources.environment = cli.environment.clone().filter(|env| !env.is_empty());
    for (key, value) in &cli.set {
        sources.flags.push((key.clone(), value.clone(), format!("--set {key}")));
    }
    if let Command::Run(flags) = &cli.command {
        let named = [
            ("http_addr", &flags.http_addr, "--http-addr"),
            ("starting_position", &flags.starting_position, "--starting-position"),
            ("worker_id", &flags.worker_id, "--worker-id"),
        ];
        for (key, value, flag) in named {
            if let Some(value) = value {
                sources.flags.push((key.to_owned(), value.clone(), flag.to_owned()));
            }
        }
    }
    config::load(&sources)
}

async fn execute(command: Command, settings: Settings) -> anyhow::Result<()> {
    if let Command::Healthcheck { addr } = command {
        // No AWS needed: only the worker's own endpoint.
        return healthcheck(addr.unwrap_or_else(|| loopback(settings.http_addr))).await;
    }
    let sdk = aws::load_sdk_config(AwsOverrides::default()).await;
    if sdk.region().is_none_or(|region| region.as_ref().trim().is_empty()) {
        return Err(NoRegion.into());
    }
    let client = aws::dynamodb_client(&sdk);
    let table = settings.table_name.as_str();
    match command {
        Command::Run(_) => run(&settings, &sdk).await,
        Command::Setup => {
            let created = admin::create_messages_table(&client, table).await?;
            println!("{table}: {}", if created { "created" } else { "exists" });
            let leases = LeaseStore::dynamodb(client, &settings.lease_table_name, &settings.worker_id);
            let created = leases.ensure_table().await?;
            println!(
                "{}: {}",
                settings.lease_table_name,
                if created { "created" } else { "exists" }
            );
            Ok(())
        }
        Command::Seed => {
            let seeded = admin::seed(&client, table).await?;
            println!(
                "seeded {} conversations ({} messages); {} already there",
                seeded.conversations_created, seeded.messages, seeded.conversations_skipped
            );
            Ok(())
        }
        Command::Send { from, to, text } => {
            let (from, to) = (User::from_handle(&from), User::from_handle(&to));
            let sent = admin::send(&client, table, &from, &to, &text, chrono::Utc::now()).await?;
            let kind = if sent.new_conversation {
                "new conversation"
            } else {
                "conversation"
            };
            println!("sent to {kind} {} at {}", sent.group_uuid, sent.created_at);
            Ok(())
        }
        Command::Groups { handle } => {
            let user = User::from_handle(&handle);
            for row in admin::conversations(&client, table, &user).await? {
                println!(
                    "{}  {}  @{} ({})  {}",
                    field(&row, "sk"),
                    field(&row, "message_group_uuid"),
                    field(&row, "user_handle"),
                    field(&row, "user_display_name"),
                    field(&row, "message")
                );
            }
            Ok(())
        }
        Command::Messages { group_uuid } => {
            for row in admin::messages(&client, table, &group_uuid).await? {
                println!(
                    "{}  @{}  {}",
                    field(&row, "sk"),
                    field(&row, "user_handle"),
                    field(&row, "message")
                );
            }
            Ok(())
        }
        Command::Leases => {
            let store = LeaseStore::dynamodb(client, &settings.lease_table_name, &settings.worker_id);
            let mut leases: Vec<_> = store.load_all().await?.into_values().collect();
            leases.sort_by(|a, b| a.shard.cmp(&b.shard));
            println!(
                "{:<40}  {:<24}  {:>7}  {:<5}  {:<26}  parents",
                "shard", "owner", "counter", "ended", "checkpoint"
            );
            for lease in leases {
                let parents: Vec<&str> = lease.parents.iter().map(|p| p.0.as_str()).collect();
                println!(
                    "{:<40}  {:<24}  {:>7}  {:<5}  {:<26}  {}",
                    lease.shard.0,
                    lease.owner.as_deref().unwrap_or("-"),
                    lease.counter,
                    lease.shard_end,
                    lease.checkpoint.encode(),
                    if parents.is_empty() {
                        "-".to_owned()
                    } else {
                        parents.join(",")
                    }
                );
            }
            Ok(())
        }
        Command::Healthcheck { .. } => Ok(()),
        Command::Reconcile { dry_run } => {
            let updater = GroupSummaryUpdater::new(client, table);
            let mut progress = Progress::new(dry_run);
            let totals = reconcile::reconcile(&updater, &app::handler_retry(&settings), dry_run, &mut progress).await?;
            let verb = if dry_run { "would be " } else { "" };
            println!(
                "reconcile{}: {} items, {} conversations; {} {verb}repaired ({} stale rows moved, {} missing rows created, \
                 {} duplicate rows deleted, {} rows normalized); {} not repairable",
                if dry_run { " (dry run, nothing written)" } else { "" },
                totals.items,
                totals.conversations,
                totals.repaired,
                totals.moved,
                totals.created,
                totals.duplicates,
                totals.normalized,
                totals.problems
            );
            Ok(())
        }
        Command::Redrive => {
            let mut destination = app::dead_letter_destination(&settings, &sdk)?;
            destination
                .check()
                .await
                .with_context(|| format!("dead-letter destination {}", destination.describe()))?;
            let updater = GroupSummaryUpdater::new(client, table);
            let policy = app::handler_retry(&settings);
            eprintln!("redrive: replaying dead letters from {}", destination.describe());
            let counts = destination
                .redrive(|letter| {
                    let (updater, policy) = (&updater, &policy);
                    async move {
                        let (shard, sequence) = (letter.shard.clone(), letter.sequence_number.clone());
                        match dispatch::replay(updater, policy, letter).await {
                            Ok(outcome) => {
                                println!("{shard} {sequence}: {outcome}");
                                Ok(())
                            }
                            Err(again) => {
                                println!(
                                    "{shard} {sequence}: failed again, kept ({}: {})",
                                    again.reason, again.error
                                );
                                Err(again)
                            }
                        }
                    }
                })
                .await?;
            println!(
                "redrive: {} replayed, {} failed again and kept, {} unreadable entries left in place",
                counts.replayed, counts.kept, counts.unreadable
            );
            anyhow::ensure!(counts.kept == 0, "{} dead letters failed again", counts.kept);
            Ok(())
        }
        Command::Scan => {
            for item in admin::scan(&client, table).await? {
                println!("{}", item_to_json(&item));
            }
            Ok(())
        }
    }
}

/// Reconcile's progress on stderr (at most every 2 s) and its changes on stdout.
struct Progress {
    dry_run: bool,
    last: std::time::Instant,
}

impl Progress {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(2);

    fn new(dry_run: bool) -> Self {
        Self {
            dry_run,
            last: std::time::Instant::now(),
        }
    }

    fn due(&mut self) -> bool {
        let due = self.last.elapsed() >= Self::EVERY;
        if due {
            self.last = std::time::Instant::now();
        }
        due
    }
}

impl reconcile::Observer for Progress {
    fn scanned(&mut self, items: u64) {
        if self.due() {
            eprintln!("reconcile: scanned {items} items");
        }
    }

    fn repaired(&mut self, group_uuid: &str, repair: &reconcile::Repair) {
        let verb = if self.dry_run { "would " } else { "" };
        if repair.moved + repair.created + repair.duplicates + repair.normalized > 0 {
            println!(
                "{group_uuid}: {verb}move {} stale, {verb}create {} missing, {verb}delete {} duplicate, \
                 {verb}normalize {} row(s)",
                repair.moved, repair.created, repair.duplicates, repair.normalized
            );
        }
        if let Some(problem) = &repair.problem {
            println!("{group_uuid}: not repaired: {problem}");
        }
    }

    fn checked(&mut self, done: usize, total: usize) {
        if done == total || self.due() {
            eprintln!("reconcile: checked {done}/{total} conversations");
        }
    }
}

/// Runs the worker until SIGTERM or SIGINT, then gives it `shutdown_grace` to finish.
async fn run(settings: &Settings, sdk: &aws_config::SdkConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let running = app::start(settings, sdk, shutdown.clone()).await?;
    let mut finished = std::pin::pin!(running.wait());
    let signal = tokio::select! {
        result = &mut finished => {
            // The worker stopped on its own: only a fatal error does that.
            result.context("the worker stopped")?;
            return Ok(());
        }
        signal = shutdown_signal() => signal,
    };
    tracing::info!(
        signal,
        grace_seconds = settings.shutdown_grace.as_secs(),
        "shutting down: finishing in-flight work"
    );
    shutdown.cancel();
    match tokio::time::timeout(settings.shutdown_grace, finished).await {
        Ok(result) => {
            let report = result.context("the worker failed while shutting down")?;
            tracing::info!(
                records = report.records(),
                shards = report.shards.len(),
                "stopped; checkpoints written"
            );
            Ok(())
        }
        Err(_) => anyhow::bail!(
            "shutdown grace of {} s exceeded; unfinished records will be read again from the last checkpoint",
            settings.shutdown_grace.as_secs()
        ),
    }
}

/// Where a worker listening on `addr` answers on this machine (0.0.0.0 means every interface).
fn loopback(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}

/// GET /healthz with a 3 s limit; Ok only on 200.
async fn healthcheck(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(3), probe)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}: no answer within 3 s"))?
        .with_context(|| format!("cannot reach {addr}"))?;
    let status_line = String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(
        status_line.split(' ').nth(1) == Some("200"),
        "{addr}/healthz answered {status_line:?}"
    );
    println!("healthy");
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

fn field<'a>(item: &'a Item, name: &str) -> &'a str {
    crate::groups::model::text(item, name).unwrap_or("-")
}

/// An item as plain JSON: strings, numbers, booleans, lists, maps; binary as its size.
fn item_to_json(item: &Item) -> serde_json::Value {
    let mut names: Vec<&String> = item.keys().collect();
    names.sort();
    serde_json::Value::Object(
        names
            .into_iter()
            .map(|name| (name.clone(), value_to_json(&item[name])))
            .collect(),
    )
}

fn value_to_json(value: &AttributeValue) -> serde_json::Value {
    use serde_json::Value as Json;
    let number = |text: &String| {
        text.parse::<serde_json::Number>()
            .map_or_else(|_| Json::String(text.clone()), Json::Number)
    };
    match value {
        AttributeValue::S(text) => Json::String(text.clone()),
        AttributeValue::N(text) => number(text),
        AttributeValue::Bool(flag) => Json::Bool(*flag),
        AttributeValue::Null(_) => Json::Null,
        AttributeValue::Ss(texts) => Json::Array(texts.iter().cloned().map(Json::String).collect()),
        AttributeValue::Ns(numbers) => Json::Array(numbers.iter().map(number).collect()),
        AttributeValue::L(values) => Json::Array(values.iter().map(value_to_json).collect()),
        AttributeValue::M(map) => item_to_json(map),
        AttributeValue::B(blob) => Json::String(format!("<{} bytes>", blob.as_ref().len())),
        AttributeValue::Bs(blobs) => Json::Array(
            blobs
                .iter()
                .map(|b| Json::String(format!("<{} bytes>", b.as_ref().len())))
                .collect(),
        ),
        _ => Json::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn set_takes_key_value_pairs() {
        assert_eq!(parse_key_value("batch_size=10"), Ok(("batch_size".into(), "10".into())));
        assert_eq!(parse_key_value("log_level=a=b"), Ok(("log_level".into(), "a=b".into())));
        assert!(parse_key_value("nothing").is_err());
    }

    #[test]
    fn items_render_as_plain_json() {
        let item = Item::from([
            ("pk".to_owned(), AttributeValue::S("MSG#g".into())),
            ("n".to_owned(), AttributeValue::N("42".into())),
            ("l".to_owned(), AttributeValue::L(vec![AttributeValue::Bool(true)])),
        ]);
        assert_eq!(item_to_json(&item).to_string(), r#"{"l":[true],"n":42,"pk":"MSG#g"}"#);
    }
}
