//! The deploy files agree with the worker: the dashboard graphs only metrics it exports, the
//! task definition leaves the worker its shutdown grace, the image checks itself and runs as a
//! non-root user. (cfn-lint, promtool and a compose parse run in scripts/test.)

use cruddur_stream_worker::telemetry::metric;

use crate::support::repo;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// `stream_worker_*` names in a text, with Prometheus' histogram suffixes taken off.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("stream_worker_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.push(base.to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_parses_and_graphs_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/cruddur-stream-worker.json")).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    let mut graphed = Vec::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has a query", panel["title"]);
        for target in targets {
            graphed.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    for name in &graphed {
        assert!(
            metric::ALL.contains(&name.as_str()),
            "the dashboard graphs {name}, which the worker does not export"
        );
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|variable| variable["name"].as_str())
        .collect();
    assert_eq!(variables, ["job", "task", "shard"]);
    let shards = panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
        .filter_map(|target| target["expr"].as_str())
        .find(|expr| expr.contains(metric::SHARDS))
        .expect("a shards-by-state panel");
    assert!(
        shards.starts_with("max by (state)"),
        "every worker reports the whole table: {shards} would count each shard once per worker"
    );
    for wanted in [
        metric::RECORDS_RECEIVED,
        metric::SHARD_PROCESSING_LAG,
        metric::GROUP_UPDATE_DURATION,
        metric::RETRIES,
        metric::LEASES_HELD,
    ] {
        assert!(
            graphed.iter().any(|name| name == wanted),
            "the dashboard shows {wanted}"
        );
    }
}

#[test]
fn alert_rules_use_only_exported_metrics() {
    let used = metric_names(&read("deploy/prometheus/alerts.yml"));
    assert!(
        used.iter().any(|name| name == metric::PROCESSING_LAG),
        "an alert watches the processing lag"
    );
    assert!(
        read("deploy/prometheus/alerts.yml").contains("absent(up{job=\"cruddur-stream-worker\"})"),
        "an alert fires when no worker target exists at all"
    );
    for name in used {
        assert!(
            metric::ALL.contains(&name.as_str()),
            "alerts.yml uses {name}, which the worker does not export"
        );
    }
}

#[test]
fn the_task_definition_leaves_the_worker_its_grace_and_checks_its_health() {
    let task: serde_json::Value = serde_json::from_str(&read("deploy/ecs/task-definition.json")).expect("task JSON");
    assert_eq!(task["networkMode"], "awsvpc");
    let container = &task["containerDefinitions"][0];
    let grace = container["environment"]
        .as_array()
        .expect("environment")
        .iter()
        .find(|pair| pair["name"] == "WORKER_SHUTDOWN_GRACE_SECONDS")
        .and_then(|pair| pair["value"].as_str()?.parse::<u64>().ok())
        .expect("the grace is set");
    assert!(
        container["stopTimeout"].as_u64().expect("stopTimeout") > grace,
        "ECS must wait longer than the grace"
    );
    assert_eq!(container["healthCheck"]["command"][2], "healthcheck");
    assert_eq!(container["readonlyRootFilesystem"], true);
    let template = read("deploy/ecs/cloudformation.yaml");
    assert!(
        template.contains(&format!("StopTimeout: {}", container["stopTimeout"])),
        "the template agrees"
    );
}

#[test]
fn the_image_runs_as_non_root_and_checks_itself() {
    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.contains("USER nonroot"));
    assert!(dockerfile.contains(r#"CMD ["/app/cruddur-stream-worker", "healthcheck"]"#));
    assert!(
        dockerfile.contains(r#"ENTRYPOINT ["/app/cruddur-stream-worker"]"#),
        "the binary is PID 1 and gets SIGTERM"
    );
}

#[test]
fn every_deployment_names_a_dead_letter_destination() {
    // `run` refuses to start without one: a deploy file without it would never start.
    let task: serde_json::Value = serde_json::from_str(&read("deploy/ecs/task-definition.json")).expect("JSON");
    let names: Vec<&str> = task["containerDefinitions"][0]["environment"]
        .as_array()
        .expect("environment")
        .iter()
        .filter_map(|variable| variable["name"].as_str())
        .collect();
    assert!(names.contains(&"WORKER_DEAD_LETTER_QUEUE_URL"), "{names:?}");
    assert!(read("deploy/ecs/cloudformation.yaml")
        .contains("{ Name: WORKER_DEAD_LETTER_QUEUE_URL, Value: !Ref DeadLetterQueue }"));
    let compose = read("deploy/docker-compose.yml");
    assert!(compose.contains("WORKER_DEAD_LETTER_FILE: /var/lib/cruddur-stream-worker/"));
    assert!(
        compose.contains("dead-letters:/var/lib/cruddur-stream-worker"),
        "on a volume: the root is read-only"
    );
    assert!(read("deploy/Dockerfile")
        .contains("--chown=nonroot:nonroot /data/cruddur-stream-worker /var/lib/cruddur-stream-worker"));
}

#[test]
fn the_build_context_holds_what_the_dockerfile_copies_and_no_build_output() {
    let ignore = read(".dockerignore");
    let lines: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines.first(), Some(&"*"), "everything is left out unless named");
    let copied: Vec<String> = read("deploy/Dockerfile")
        .lines()
        .filter(|line| line.starts_with("COPY ") && !line.contains("--from"))
        .flat_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            parts[1..parts.len() - 1]
                .iter()
                .map(|part| part.trim_end_matches('/').to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!copied.is_empty());
    for source in &copied {
        assert!(
            lines
                .iter()
                .any(|line| line.trim_start_matches('!').trim_end_matches('/') == source),
            "{source} is copied but left out of the context"
        );
    }
    assert!(
        !lines.iter().any(|line| line.contains("target")),
        "target/ never goes in"
    );
}

#[test]
fn every_worker_variable_in_the_deploy_files_is_a_known_key() {
    // Unknown WORKER_* variables stop the worker at start: a misspelt one here would never run.
    let known: Vec<&str> = cruddur_stream_worker::config::keys()
        .iter()
        .map(|key| key.variable.as_str())
        .chain(["WORKER_ENV", "WORKER_CONFIG_DIR"])
        .collect();
    for file in [
        "deploy/Dockerfile",
        "deploy/docker-compose.yml",
        "deploy/ecs/task-definition.json",
        "deploy/ecs/cloudformation.yaml",
    ] {
        let text = read(file);
        let mut found = 0;
        for (start, _) in text.match_indices("WORKER_") {
            let preceded = text[..start]
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if preceded {
                continue;
            }
            let name: String = text[start..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            assert!(known.contains(&name.as_str()), "{file}: {name} is not a known variable");
            found += 1;
        }
        assert!(found > 0, "{file} sets worker variables");
    }
}

/// The stack's alarms watch metrics the status line declares, in the namespace the task gives
/// the worker, and each notifies the alarm topic: lag, dead letters and missing tasks.
#[test]
fn the_alarms_watch_the_status_line_metrics_and_notify_the_topic() {
    use cruddur_stream_worker::telemetry::emf;
    let template = read("deploy/ecs/cloudformation.yaml");
    let namespace = template
        .lines()
        .find(|line| line.contains("Name: WORKER_METRICS_NAMESPACE"))
        .and_then(|line| line.split("Value: ").nth(1))
        .map(|value| value.trim_end_matches([' ', '}']).to_owned())
        .expect("the task names the metrics namespace");
    let alarms: Vec<&str> = template.split("Type: AWS::CloudWatch::Alarm").skip(1).collect();
    let mut watched = Vec::new();
    for alarm in &alarms {
        let alarm = alarm.split("\n\n").next().unwrap_or(alarm);
        let field = |name: &str| {
            alarm
                .lines()
                .find_map(|line| line.trim().strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("an alarm without {name}: {alarm}"))
        };
        let metric = field("MetricName:");
        assert!(
            emf::METRICS.iter().any(|(name, _)| *name == metric),
            "{metric} is not in the status line"
        );
        assert_eq!(
            field("Namespace:"),
            namespace,
            "{metric}'s alarm reads the worker's namespace"
        );
        assert_eq!(
            field("AlarmActions:"),
            "[!Ref AlarmTopic]",
            "{metric}'s alarm notifies the topic"
        );
        watched.push(metric.to_owned());
    }
    for wanted in ["ProcessingLagSeconds", "DeadLetters", "WorkersRunning"] {
        assert!(
            watched.iter().any(|name| name == wanted),
            "an alarm on {wanted}: {watched:?}"
        );
    }
    // Scaling tracks shards per task: the average of the tasks' LeasesHeld, in the same namespace.
    let scaling = template
        .split("CustomizedMetricSpecification:")
        .nth(1)
        .expect("a target-tracking policy on a metric of the worker's");
    assert!(scaling.contains(&format!("Namespace: {namespace}")), "{scaling}");
    assert!(scaling.contains("MetricName: LeasesHeld") && scaling.contains("Statistic: Average"));
    assert!(
        template.contains("CpuArchitecture: !Ref CpuArchitecture"),
        "the architecture is a parameter"
    );
}

/// Prometheus on ECS: the stack registers each task in Cloud Map and admits Prometheus on the
/// metrics port; the ECS scrape config finds them by DNS under the job name the alerts use.
#[test]
fn prometheus_on_ecs_finds_every_task_on_the_metrics_port() {
    let template = read("deploy/ecs/cloudformation.yaml");
    for wanted in [
        "Type: AWS::ServiceDiscovery::Service",
        "RegistryArn: !GetAtt DiscoveryService.Arn",
        "Type: A",
        "Type: AWS::EC2::SecurityGroupIngress",
        "FromPort: 9090",
        "- ContainerPort: 9090",
    ] {
        assert!(template.contains(wanted), "the template lacks {wanted}");
    }
    let scrape = read("deploy/prometheus/ecs.yml");
    assert!(
        scrape.contains("job_name: cruddur-stream-worker"),
        "the alerts' job label"
    );
    assert!(scrape.contains("dns_sd_configs:") && scrape.contains("port: 9090"));
    assert!(read("deploy/prometheus/alerts.yml").contains("job=\"cruddur-stream-worker\""));
}

/// Every base and service image is pinned by digest, and the build image's toolchain is the
/// crate's rust-version.
#[test]
fn every_image_is_pinned_by_digest() {
    let dockerfile = read("deploy/Dockerfile");
    let compose = read("deploy/docker-compose.yml");
    let images: Vec<&str> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("FROM "))
        .chain(compose.lines().filter_map(|line| line.trim().strip_prefix("image: ")))
        .filter(|image| !image.starts_with("cruddur-stream-worker:"))
        .collect();
    assert!(images.len() >= 5, "{images:?}");
    for image in &images {
        let digest = image
            .split_once("@sha256:")
            .map(|(_, rest)| &rest[..64.min(rest.len())]);
        assert!(
            digest.is_some_and(|hex| hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())),
            "{image} is not pinned by digest"
        );
    }
    let manifest = read("Cargo.toml");
    let version = manifest
        .lines()
        .find_map(|line| line.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("rust-version");
    assert!(
        dockerfile.contains(&format!("FROM rust:{version}-")),
        "the build image is Rust {version}"
    );
}
