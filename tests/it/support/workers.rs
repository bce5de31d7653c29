//! Workers under test: in this process ([`TestWorker`], on any source or through a proxy) or
//! as the binary in its own process ([`ChildWorker`], as on ECS), and the binary's commands.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::observers::{http_get, metric_value, wait_until};
use super::servers::{endpoint, repo, sdk_for, REGION};
use super::tables::{s, TestDb};
use aws_config::SdkConfig;
use cruddur_stream_worker::app;
use cruddur_stream_worker::aws::{self};
use cruddur_stream_worker::config::{self, Settings, Sources};
use cruddur_stream_worker::stream::StreamReport;
use tokio_util::sync::CancellationToken;

impl TestDb {
    /// Settings as the binary would load them, plus `overrides` (key, value), with fast polling
    /// and an ephemeral HTTP port.
    pub fn settings(&self, overrides: &[(&str, &str)]) -> Settings {
        let mut flags: Vec<(String, String, String)> = [
            ("http_addr", "127.0.0.1:0"),
            ("idle_interval_ms", "20"),
            ("max_idle_interval_ms", "20"),
            ("max_reads_per_second", "1000"),
            ("shard_sync_interval_ms", "200"),
            ("checkpoint_interval_ms", "100"),
            ("retry_base_delay_ms", "10"),
            ("retry_max_delay_ms", "200"),
            ("worker_id", "test-worker"),
            ("dead_letter_file", self.dead_letter_file.to_str().expect("utf-8 path")),
        ]
        .iter()
        .chain(overrides)
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned(), format!("test override {key}")))
        .collect();
        if overrides.iter().any(|(key, _)| *key == "dead_letter_queue_url") {
            flags.push(("dead_letter_file".into(), String::new(), "test".into()));
        }
        flags.push(("table_name".into(), self.table.clone(), "test".into()));
        flags.push(("lease_table_name".into(), self.lease_table.clone(), "test".into()));
        config::load(&Sources {
            config_dir: repo().join("config"),
            environment: None,
            env_vars: BTreeMap::new(),
            flags,
        })
        .expect("test settings are valid")
    }

    /// Starts a worker in this process.
    pub async fn start_worker(&self, overrides: &[(&str, &str)]) -> TestWorker {
        self.start_worker_on(self.stream_source(), overrides).await
    }

    /// The binary, with this database's endpoint and credentials in its environment.
    /// Runs the binary with `args` (and `env` on top) to its end: exit code, stdout, stderr.
    pub async fn run_command(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let output = self
            .command(args)
            .envs(env.iter().copied())
            .output()
            .await
            .expect("run command");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cruddur-stream-worker"));
        command
            .args(args)
            .current_dir(repo())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_ENDPOINT_URL_DYNAMODB", endpoint())
            .env("AWS_ENDPOINT_URL_DYNAMODB_STREAMS", endpoint())
            .env("AWS_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("WORKER_HTTP_ADDR", "127.0.0.1:0")
            .env("WORKER_LOG_FORMAT", "json")
            .env("WORKER_DEAD_LETTER_FILE", &self.dead_letter_file)
            .kill_on_drop(true);
        if let Ok(kinesis) = std::env::var("CRUDDUR_TEST_KINESIS") {
            command.env("AWS_ENDPOINT_URL_KINESIS", kinesis);
        }
        command
    }
}

impl TestDb {
    /// Starts a worker in this process on `source` instead of the table's own stream source.
    pub async fn start_worker_on<S: cruddur_stream_worker::stream::StreamSource>(
        &self,
        source: S,
        overrides: &[(&str, &str)],
    ) -> TestWorker {
        self.start_worker_with(&self.sdk, source, overrides).await
    }

    /// Starts a worker in this process on `source`, its other AWS calls made with `sdk`.
    pub async fn start_worker_with<S: cruddur_stream_worker::stream::StreamSource>(
        &self,
        sdk: &SdkConfig,
        source: S,
        overrides: &[(&str, &str)],
    ) -> TestWorker {
        let shutdown = CancellationToken::new();
        let running = app::start_with_source(&self.settings(overrides), sdk, source, shutdown.clone())
            .await
            .expect("worker starts");
        TestWorker {
            http_addr: running.http_addr,
            running: Some(running),
            shutdown,
        }
    }

    /// The table's real DynamoDB Streams source.
    pub fn stream_source(&self) -> cruddur_stream_worker::stream::DynamoDbStreamsSource {
        cruddur_stream_worker::stream::DynamoDbStreamsSource::new(
            self.client.clone(),
            aws::streams_client(&self.sdk),
            &self.table,
        )
    }
}

impl TestDb {
    /// The SDK configuration of this database, sent to `endpoint` (a proxy) instead.
    pub async fn sdk_via(&self, endpoint: &str) -> SdkConfig {
        sdk_for(endpoint, &self.access_key).await
    }

    /// Starts a worker in this process whose every AWS call goes through `endpoint`.
    pub async fn start_worker_via(&self, endpoint: &str, overrides: &[(&str, &str)]) -> TestWorker {
        let sdk = self.sdk_via(endpoint).await;
        let source = cruddur_stream_worker::stream::DynamoDbStreamsSource::new(
            aws::dynamodb_client(&sdk),
            aws::streams_client(&sdk),
            &self.table,
        );
        self.start_worker_with(&sdk, source, overrides).await
    }
}

/// A worker running in this process.
pub struct TestWorker {
    pub http_addr: SocketAddr,
    running: Option<app::Running>,
    shutdown: CancellationToken,
}

impl TestWorker {
    /// Stops it as SIGTERM would and returns what it read.
    pub async fn stop(mut self) -> StreamReport {
        self.shutdown.cancel();
        let running = self.running.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), running.wait())
            .await
            .expect("worker stops within 30 s")
            .expect("worker stops cleanly")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http_addr, path).await
    }

    /// The sum of a metric's samples whose labels contain `labels` (e.g. `reason="remove"`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        metric_value(&body, name, labels)
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The worker binary running as its own process, as on ECS.
pub struct ChildWorker {
    pub child: tokio::process::Child,
    pub http_addr: SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl TestDb {
    /// Starts `cruddur-stream-worker run ARGS` and waits until it listens.
    pub async fn spawn_worker_process(&self, args: &[&str]) -> ChildWorker {
        self.spawn_worker_process_with(args, &[]).await
    }

    /// [`Self::spawn_worker_process`] with extra environment variables.
    pub async fn spawn_worker_process_with(&self, args: &[&str], env: &[(&str, &str)]) -> ChildWorker {
        use tokio::io::AsyncBufReadExt;
        let mut command = self.command(&[&["run"], args].concat());
        command.envs(env.iter().copied());
        let mut child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn worker");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let collected = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = collected.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let address = || -> Option<SocketAddr> {
            let log = log.lock().expect("log");
            let started = log.lines().find(|line| line.contains("worker started"))?;
            let json: serde_json::Value = serde_json::from_str(started).ok()?;
            json["http_addr"].as_str()?.parse().ok()
        };
        let started = wait_until(Duration::from_secs(30), || async { address().is_some() }).await;
        assert!(started, "worker started: {}", log.lock().expect("log"));
        ChildWorker {
            child,
            http_addr: address().expect("address"),
            log,
        }
    }

    /// The owner of every lease row, by shard.
    pub async fn owners(&self) -> BTreeMap<String, String> {
        self.leases()
            .await
            .into_iter()
            .map(|(shard, lease)| (shard, s(&lease, "owner").to_owned()))
            .collect()
    }
}

impl ChildWorker {
    /// The process's resident memory now (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// Sends a signal by name (TERM, KILL, STOP, CONT).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{name} {pid}");
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait")
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = http_get(self.http_addr, "/metrics").await;
        metric_value(&body, name, labels)
    }
}
