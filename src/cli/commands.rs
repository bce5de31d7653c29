//! One function per command. Each does its work and prints through [`render`]; exit codes are
//! the caller's ([`super::main`]).
//!
//! [`render`]: super::render

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::render;
use crate::aws::{self, AwsOverrides};
use crate::config::Settings;
use crate::groups::admin::{self, User};
use crate::groups::reconcile;
use crate::groups::updater::GroupSummaryUpdater;
use crate::stream::{LeaseStore, LeaseTable as _, Position, SequenceNumber, ShardId};
use crate::{app, dispatch};

/// What every command that talks to AWS starts from.
pub struct Aws {
    pub settings: Settings,
    pub sdk: aws_config::SdkConfig,
    pub client: aws_sdk_dynamodb::Client,
}

/// The AWS configuration names no region.
#[derive(Debug, thiserror::Error)]
#[error("no AWS region: set AWS_REGION (any name works with DynamoDB Local)")]
pub struct NoRegion;

/// A command refused as asked: bad usage (exit 2), nothing written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl Aws {
    /// Loads the AWS configuration (environment, profile, task role); a region is required.
    pub async fn connect(settings: Settings) -> anyhow::Result<Self> {
        let sdk = aws::load_sdk_config(AwsOverrides::default()).await;
        if sdk.region().is_none_or(|region| region.as_ref().trim().is_empty()) {
            return Err(NoRegion.into());
        }
        let client = aws::dynamodb_client(&sdk);
        Ok(Self { settings, sdk, client })
    }

    fn table(&self) -> &str {
        &self.settings.table_name
    }

    fn leases(&self) -> LeaseStore {
        LeaseStore::dynamodb(
            self.client.clone(),
            &self.settings.lease_table_name,
            &self.settings.worker_id,
        )
    }

    fn updater(&self) -> GroupSummaryUpdater {
        GroupSummaryUpdater::new(self.client.clone(), self.table())
    }
}

pub async fn setup(aws: &Aws) -> anyhow::Result<()> {
    let created = admin::create_messages_table(&aws.client, aws.table()).await?;
    println!("{}", render::table_ready(aws.table(), created));
    let created = aws.leases().ensure_table().await?;
    println!("{}", render::table_ready(&aws.settings.lease_table_name, created));
    Ok(())
}

pub async fn seed(aws: &Aws) -> anyhow::Result<()> {
    let seeded = admin::seed(&aws.client, aws.table()).await?;
    println!("{}", render::seeded(&seeded));
    Ok(())
}

pub async fn send(aws: &Aws, from: &str, to: &str, text: &str) -> anyhow::Result<()> {
    let (from, to) = (User::from_handle(from), User::from_handle(to));
    let sent = admin::send(&aws.client, aws.table(), &from, &to, text, chrono::Utc::now()).await?;
    println!("{}", render::sent(&sent));
    Ok(())
}

pub async fn groups(aws: &Aws, handle: &str) -> anyhow::Result<()> {
    let user = User::from_handle(handle);
    for row in admin::conversations(&aws.client, aws.table(), &user).await? {
        println!("{}", render::group_row(&row));
    }
    Ok(())
}

pub async fn messages(aws: &Aws, group_uuid: &str) -> anyhow::Result<()> {
    for row in admin::messages(&aws.client, aws.table(), group_uuid).await? {
        println!("{}", render::message_row(&row));
    }
    Ok(())
}

pub async fn scan(aws: &Aws) -> anyhow::Result<()> {
    for item in admin::scan(&aws.client, aws.table()).await? {
        println!("{}", render::item_to_json(&item));
    }
    Ok(())
}

pub async fn leases(aws: &Aws) -> anyhow::Result<()> {
    let mut leases: Vec<_> = aws.leases().load_all().await?.into_values().collect();
    for line in render::lease_table(&mut leases) {
        println!("{line}");
    }
    Ok(())
}

/// What an operator asks of one shard's lease, and how sure they are.
pub struct ForceRelease {
    pub shard: String,
    /// `None`: keep the checkpoint (release only). `LATEST` is resolved now.
    pub checkpoint: Option<String>,
    pub dry_run: bool,
    pub yes: bool,
}

/// `release-lease` and `set-checkpoint`: one conditional take, checkpoint and release, after
/// showing the change and getting a confirmation.
pub async fn force_release(aws: &Aws, ask: ForceRelease) -> anyhow::Result<()> {
    let checkpoint = match ask.checkpoint.as_deref() {
        None => None,
        Some(text) => Some(parse_checkpoint(text)?),
    };
    let leases = aws.leases();
    let shard = ShardId(ask.shard.clone());
    let seen = leases
        .table()
        .get(&shard)
        .await?
        .ok_or_else(|| Refused(format!("no lease row for shard {}: see `leases`", ask.shard)))?;
    if seen.shard_end {
        return Err(Refused(format!(
            "shard {} is finished (read to its end): nothing to release or move",
            ask.shard
        ))
        .into());
    }
    let to = checkpoint.as_ref().unwrap_or(&seen.checkpoint);
    let owner = seen.owner.as_deref().unwrap_or("(none)");
    println!(
        "shard {}: owner {owner} -> (none, the fleet gives it out again); checkpoint {} -> {}",
        ask.shard,
        seen.checkpoint.encode(),
        to.encode()
    );
    if ask.dry_run {
        println!("dry run: nothing written");
        return Ok(());
    }
    confirm(ask.yes)?;
    let after = leases.force_release(&seen, checkpoint.as_ref()).await?;
    println!("done: checkpoint {}, lease free", after.checkpoint.encode());
    Ok(())
}

fn parse_checkpoint(text: &str) -> Result<Position, Refused> {
    match text.to_ascii_uppercase().as_str() {
        "TRIM_HORIZON" => Ok(Position::TrimHorizon),
        "LATEST" => Ok(Position::latest_now()),
        _ => SequenceNumber::parse(text).map(Position::After).ok_or_else(|| {
            Refused(format!(
                "{text:?} is not a position: TRIM_HORIZON, LATEST or a sequence number (digits)"
            ))
        }),
    }
}

/// `--yes`, or a `yes` typed at a terminal; otherwise refused.
fn confirm(yes: bool) -> Result<(), Refused> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Refused(
            "not confirmed: pass --yes (or --dry-run to see the change only)".into(),
        ));
    }
    print!("type yes to go on: ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(Refused("not confirmed: nothing written".into()))
    }
}

pub async fn reconcile(aws: &Aws, dry_run: bool) -> anyhow::Result<()> {
    let mut progress = render::Progress::new(dry_run);
    let policy = aws.settings.retry.clone();
    let totals = reconcile::reconcile(&aws.updater(), &policy, dry_run, &mut progress).await?;
    println!("{}", render::reconcile_totals(&totals, dry_run));
    Ok(())
}

/// Replays every dead letter; exit 1 when any failed again.
pub async fn redrive(aws: &Aws) -> anyhow::Result<()> {
    let mut destination = app::dead_letter_destination(&aws.settings, &aws.sdk)?;
    destination
        .check()
        .await
        .with_context(|| format!("dead-letter destination {}", destination.describe()))?;
    let updater = aws.updater();
    let policy = aws.settings.retry.clone();
    eprintln!("redrive: replaying dead letters from {}", destination.describe());
    let counts = destination
        .redrive(|letter| {
            let (updater, policy) = (&updater, &policy);
            async move {
                let (shard, sequence) = (letter.shard.clone(), letter.sequence_number.clone());
                let result = dispatch::replay(updater, policy, letter).await;
                let line = match &result {
                    Ok(outcome) => render::redriven(&shard, &sequence, Ok(outcome)),
                    Err(again) => render::redriven(&shard, &sequence, Err((&again.reason, &again.error))),
                };
                println!("{line}");
                result.map(|_| ())
            }
        })
        .await?;
    println!("{}", render::redrive_counts(&counts));
    anyhow::ensure!(counts.kept == 0, "{} dead letters failed again", counts.kept);
    Ok(())
}

/// Runs the worker until SIGTERM or SIGINT, then gives it `shutdown_grace` to finish.
pub async fn run(aws: &Aws) -> anyhow::Result<()> {
    let settings = &aws.settings;
    let shutdown = CancellationToken::new();
    let running = app::start(settings, &aws.sdk, shutdown.clone()).await?;
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

/// GET /healthz with a 3 s limit; Ok only on 200. Needs nothing of AWS.
pub async fn healthcheck(addr: std::net::SocketAddr) -> anyhow::Result<()> {
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
