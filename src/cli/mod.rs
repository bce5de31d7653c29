//! The command line: parse, load settings, run a subcommand, map the outcome to an exit code.
//! Each command is one function of [`commands`]; what they print is made in [`render`].
//! `healthcheck` answers before any AWS set-up (it only probes the worker's own endpoint).
//!
//! Exit codes: 0 success; 1 a runtime failure (AWS unreachable, shutdown grace exceeded);
//! 2 bad usage or bad configuration (the message names the key). Command output goes to
//! stdout, logs to stderr.

mod allocator;
mod commands;
mod render;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Settings, Sources};
use crate::{app, telemetry};

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
    /// Take a shard's lease from whoever holds it and leave it free: that reader stops without
    /// checkpointing, and the fleet gives the shard out again, reading on from its checkpoint
    /// (for a reader that is stuck). Shows the change first; asks for a confirmation.
    ReleaseLease {
        shard: String,
        /// Show the change without writing.
        #[arg(long)]
        dry_run: bool,
        /// Confirm without asking (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Set a shard's checkpoint, taking its lease from whoever holds it (that reader stops
    /// without checkpointing) and leaving it free: the fleet reads on from POSITION.
    /// TRIM_HORIZON reads all the stream still holds again, LATEST skips to now, a sequence
    /// number reads on after that record. Shows the change first; asks for a confirmation.
    SetCheckpoint {
        shard: String,
        #[arg(value_name = "POSITION")]
        position: String,
        /// Show the change without writing.
        #[arg(long)]
        dry_run: bool,
        /// Confirm without asking (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
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
    /// TRIM_HORIZON, LATEST or AT_TIMESTAMP, for shards with no checkpoint (key
    /// starting_position).
    #[arg(long, value_name = "POSITION")]
    starting_position: Option<String>,
    /// With AT_TIMESTAMP: an RFC 3339 instant, like 2026-12-01T00:00:00Z (key
    /// starting_timestamp).
    #[arg(long, value_name = "INSTANT")]
    starting_timestamp: Option<String>,
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
    allocator::tune();
    let cli = Cli::parse();
    let settings = match load_settings(&cli) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(&settings.logging);
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
            if error.is::<commands::NoRegion>() || error.is::<commands::Refused>() || bad_config {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

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
            ("starting_timestamp", &flags.starting_timestamp, "--starting-timestamp"),
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
        return commands::healthcheck(addr.unwrap_or_else(|| loopback(settings.http.addr))).await;
    }
    let aws = commands::Aws::connect(settings).await?;
    match command {
        Command::Run(_) => commands::run(&aws).await,
        Command::Setup => commands::setup(&aws).await,
        Command::Seed => commands::seed(&aws).await,
        Command::Send { from, to, text } => commands::send(&aws, &from, &to, &text).await,
        Command::Groups { handle } => commands::groups(&aws, &handle).await,
        Command::Messages { group_uuid } => commands::messages(&aws, &group_uuid).await,
        Command::Scan => commands::scan(&aws).await,
        Command::Leases => commands::leases(&aws).await,
        Command::ReleaseLease { shard, dry_run, yes } => {
            let ask = commands::ForceRelease {
                shard,
                checkpoint: None,
                dry_run,
                yes,
            };
            commands::force_release(&aws, ask).await
        }
        Command::SetCheckpoint {
            shard,
            position,
            dry_run,
            yes,
        } => {
            let ask = commands::ForceRelease {
                shard,
                checkpoint: Some(position),
                dry_run,
                yes,
            };
            commands::force_release(&aws, ask).await
        }
        Command::Reconcile { dry_run } => commands::reconcile(&aws, dry_run).await,
        Command::Redrive => commands::redrive(&aws).await,
        Command::Healthcheck { .. } => Ok(()),
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
    fn a_healthcheck_probes_loopback_when_the_worker_listens_everywhere() {
        let everywhere: std::net::SocketAddr = "0.0.0.0:9090".parse().expect("address");
        assert_eq!(loopback(everywhere).to_string(), "127.0.0.1:9090");
        let one: std::net::SocketAddr = "10.0.0.7:9090".parse().expect("address");
        assert_eq!(loopback(one), one);
    }
}
