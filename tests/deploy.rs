//! deploy/ and the Dockerfile against the binary: every setting the ConfigMap and the image set is a
//! real flag with a valid value, the ports match the ones the server listens on by default, the probes
//! ask the health service about services it reports on, and the autoscalers read a metric the server
//! exports. (scripts/check-deploy validates the rendered manifests against the Kubernetes schemas.)
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use clap::Parser;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `key: value` lines under `data:` in a ConfigMap (our manifests keep them flat and quoted).
fn configmap_data(yaml: &str) -> BTreeMap<String, String> {
    let data = yaml.split("\ndata:\n").nth(1).expect("a data: section");
    data.lines()
        .filter(|l| l.starts_with("  ") && !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// The values of every `key: value` line with this key, in order.
fn values<'a>(yaml: &'a str, key: &str) -> Vec<&'a str> {
    yaml.lines()
        .filter_map(|l| l.trim().strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.trim().trim_matches('"'))
        .collect()
}

/// `OMNIBUS_MAX_QUEUE` -> `--max-queue`.
fn flag(env: &str) -> String {
    format!("--{}", env.strip_prefix("OMNIBUS_").expect("OMNIBUS_ prefix").to_ascii_lowercase().replace('_', "-"))
}

/// Parses settings given as environment-variable names through the binary's own flag parser.
fn parse_serve(settings: &BTreeMap<String, String>) -> omnibus::config::ServeArgs {
    let mut argv = vec!["omnibus".to_string()];
    for (k, v) in settings {
        argv.push(flag(k));
        argv.push(v.clone());
    }
    match omnibus::config::ServeArgs::try_parse_from(&argv) {
        Ok(args) => args,
        Err(e) => panic!("{argv:?} is not a valid omnibus serve command line: {e}"),
    }
}

fn port(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

#[test]
fn configmap_and_overlays_are_valid_flags_with_matching_ports() {
    let mut settings = configmap_data(&read("deploy/base/configmap.yaml"));
    assert!(!settings.is_empty());
    // The overlays' literals merge into it.
    for overlay in ["cpu", "gpu"] {
        let k = read(&format!("deploy/overlays/{overlay}/kustomization.yaml"));
        for lit in k.lines().filter_map(|l| l.trim().strip_prefix("- OMNIBUS_")) {
            let (key, v) = lit.split_once('=').unwrap();
            let mut s = settings.clone();
            s.insert(format!("OMNIBUS_{key}"), v.to_string());
            parse_serve(&s);
        }
    }
    settings.insert("OMNIBUS_MODEL_DIR".into(), ".".into()); // validate() checks the directory exists
    let args = parse_serve(&settings);
    let cfg = args.validate().expect("the ConfigMap's settings pass the server's own checks");
    let grpc = cfg.server.listen.port().to_string();
    let metrics = cfg.server.metrics_listen.expect("metrics on").port().to_string();
    let deployment = read("deploy/base/deployment.yaml");
    assert_eq!(values(&deployment, "containerPort"), vec![grpc.as_str(), metrics.as_str()]);
    let probe_ports: Vec<&str> = values(&deployment, "port").into_iter().filter(|p| p.parse::<u16>().is_ok()).collect();
    assert_eq!(probe_ports, vec![grpc.as_str(); 3], "startup, liveness and readiness probe the gRPC port");
    assert!(deployment.contains("prometheus.io/port: \"9090\"") && metrics == "9090");
    let service = read("deploy/base/service.yaml");
    assert!(service.contains(&format!("port: {grpc}")) && service.contains("name: grpc"));
    assert!(service.contains("appProtocol: grpc"));
    // The drain fits in the pod's termination grace period.
    let grace: u64 = values(&deployment, "terminationGracePeriodSeconds")[0].parse().unwrap();
    let pre_stop: u64 = values(&deployment, "seconds")[0].parse().unwrap();
    assert!(pre_stop + cfg.server.shutdown_grace.as_secs() < grace, "preStop + --shutdown-grace < {grace}");
}

#[test]
fn the_image_and_the_binary_agree() {
    let docker = read("Dockerfile");
    let defaults = omnibus::config::ServeArgs::try_parse_from(["omnibus"]).unwrap();
    let expose: Vec<&str> = docker.lines().filter_map(|l| l.strip_prefix("EXPOSE ")).collect();
    let want = format!("{} {}", defaults.listen.port(), port(&defaults.metrics_listen));
    assert!(!expose.is_empty() && expose.iter().all(|e| *e == want), "EXPOSE {expose:?} vs {want}");
    for line in
        docker.lines().filter(|l| l.trim_start().starts_with("ENV OMNIBUS_") || l.trim_start().starts_with("OMNIBUS_"))
    {
        for pair in line.split_whitespace().filter(|w| w.starts_with("OMNIBUS_")) {
            let (k, v) = pair.split_once('=').unwrap();
            let mut s = BTreeMap::new();
            s.insert(k.to_string(), v.to_string());
            parse_serve(&s);
        }
    }
    // HEALTHCHECK runs a real subcommand with real flags.
    let hc =
        docker.lines().find(|l| l.contains("CMD [\"/usr/local/bin/omnibus\", \"health\"")).expect("a health check");
    let argv: Vec<String> = hc
        .split('[')
        .nth(1)
        .unwrap()
        .trim_end_matches(']')
        .split(", ")
        .map(|s| s.trim_matches('"').replace("/usr/local/bin/", ""))
        .collect();
    assert_eq!(argv.get(1).map(String::as_str), Some("health"), "{argv:?}");
    let flags = std::iter::once("omnibus").chain(argv[2..].iter().map(String::as_str));
    assert!(omnibus::client::health::HealthArgs::try_parse_from(flags).is_ok(), "{argv:?}");
    assert!(docker.contains("STOPSIGNAL SIGTERM") && docker.contains("USER 10001"));
}

#[test]
fn autoscalers_read_a_metric_the_server_exports() {
    let names = omnibus::metrics::names();
    let keda = read("deploy/components/keda/scaledobject.yaml");
    assert!(names.contains(&"omnibus_queue_size"));
    let query = values(&keda, "query")[0];
    for word in query.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| w.starts_with("omnibus_")) {
        assert!(names.contains(&word), "{word} is not a metric omnibus exports");
    }
    assert_eq!(values(&keda, "minReplicaCount"), vec!["1"], "never scale to zero: cold starts load models");
    let hpa = read("deploy/components/hpa/hpa.yaml");
    let metric = hpa.split("metric:").nth(1).and_then(|m| values(m, "name").first().copied()).unwrap();
    assert!(names.contains(&metric), "{metric}");
    // KEDA's AverageValue divides by the threshold only: the query must be a total, not a per-pod
    // average (tests/autoscale.rs evaluates it in a real Prometheus); the HPA's Pods metric is the
    // per-pod value, which the HPA averages itself.
    assert_eq!(values(&keda, "metricType"), vec!["AverageValue"]);
    assert!(query.starts_with("sum(") && !query.contains('/') && !query.contains("count"), "{query}");
    assert!(hpa.contains("type: Pods") && hpa.contains("type: AverageValue"));
    // Retries: never on overload or deadlines.
    let istio = read("deploy/base/istio.yaml");
    for retry_on in values(&istio, "retryOn") {
        assert!(retry_on.contains("unavailable"), "{retry_on}");
        assert!(!retry_on.contains("resource-exhausted") && !retry_on.contains("deadline-exceeded"), "{retry_on}");
    }
    assert!(istio.contains("mode: STRICT"));
    // Outlier detection counts connection-level failures only: a trailers-only DEADLINE_EXCEEDED is a
    // 504 to Envoy and must not eject a slow pod.
    assert_eq!(values(&istio, "consecutive5xxErrors"), vec!["0"]);
    assert_eq!(values(&istio, "splitExternalLocalOriginErrors"), vec!["true"]);
    assert!(values(&istio, "consecutiveGatewayErrors").is_empty());
    // Generation streams have no route timeout (the server's deadline is in charge); unary calls one
    // above the server's --request-timeout.
    let streams = istio.split("- name: generation-streams").nth(1).unwrap().split("- name: unary").next().unwrap();
    assert!(streams.contains("/omnibus.v1.Inference/Generate") && !streams.contains("timeout:"), "{streams}");
}

/// Pods are sized from their own resources: threads from the CPU request, the memory plan from the
/// limit, and requests equal to limits (the CPU limit is the quota the threads match).
#[test]
fn pods_are_sized_from_their_own_resources() {
    let deployment = read("deploy/base/deployment.yaml");
    let env = deployment.split("env:").nth(1).unwrap();
    assert!(env.contains("name: OMNIBUS_THREADS") && env.contains("resource: requests.cpu"), "{env}");
    assert!(env.contains("name: OMNIBUS_MEMORY_LIMIT") && env.contains("resource: limits.memory"), "{env}");
    let resources = deployment.split("resources:").nth(1).unwrap();
    let requests = resources.split("limits:").next().unwrap();
    let limits = resources.split("limits:").nth(1).unwrap();
    for key in ["cpu", "memory"] {
        assert_eq!(values(requests, key), values(limits, key), "{key}: requests and limits differ");
    }
    // The flags those variables feed accept what the downward API writes (whole CPUs; bytes).
    assert_eq!(omnibus::config::parse_bytes("2147483648"), Ok(2 << 30));
}

#[tokio::test]
async fn the_probed_health_services_are_the_ones_the_server_reports() {
    let deployment = read("deploy/base/deployment.yaml");
    let services: Vec<&str> = values(&deployment, "service");
    assert_eq!(services.len(), 3);
    let server = common::Server::start(&[]).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in services {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "probe service {service:?}");
    }
}
