//! What Kubernetes sees of the real binary: liveness that fails when a model thread hangs (through the
//! debug builds' fault hook), the memory plan from a limit, and the manifests' memory settings fitting
//! their limit with the models actually loaded.
mod common;

use std::time::{Duration, Instant};

use common::{Server, sample};
use omnibus::server::pb::PredictRequest;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn health(server: &Server, service: &str) -> i32 {
    let mut h = HealthClient::new(server.channel().await);
    h.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status
}

#[tokio::test]
async fn a_hung_model_thread_fails_liveness() {
    // "word" x 75 plus [CLS] and [SEP]: the fault hook hangs the embedding thread on a 77-token input.
    let server = Server::start_env(&["--engine-stall-timeout", "2s"], &[("OMNIBUS_TEST_HANG_TOKENS", "77")]).await;
    assert_eq!(health(&server, "").await, ServingStatus::Serving as i32);
    let mut client = server.client().await;
    let hung = tokio::spawn(async move {
        let req = PredictRequest { inputs: vec!["word ".repeat(75)], ..Default::default() };
        client.predict(req).await
    });
    let started = Instant::now();
    while health(&server, "").await == ServingStatus::Serving as i32 {
        assert!(started.elapsed() < Duration::from_secs(10), "liveness still SERVING after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1500), "NOT_SERVING before the stall timeout");
    assert_eq!(health(&server, "omnibus.v1.Inference").await, ServingStatus::NotServing as i32);
    let scrape = server.scrape().await;
    assert_eq!(sample(&scrape, r#"omnibus_engine_stalled{model="all-MiniLM-L6-v2"}"#), 1.0);
    assert_eq!(sample(&scrape, r#"omnibus_engine_stalled{model="SmolLM2-135M-Instruct.Q4_1"}"#), 0.0);
    assert!(!hung.is_finished());
}

#[tokio::test]
async fn an_idle_server_stays_live() {
    let server = Server::start(&["--engine-stall-timeout", "1s"]).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(health(&server, "").await, ServingStatus::Serving as i32);
    let scrape = server.scrape().await;
    assert_eq!(sample(&scrape, r#"omnibus_engine_stalled{model="all-MiniLM-L6-v2"}"#), 0.0);
}

/// The memory settings the manifests ship (the pod's limit, and OMNIBUS_* from the ConfigMap), applied
/// to the real models: the plan the server makes from the limit must fit it, and the gauges must say
/// so: resident memory after load plus the KV cache and batch budgets stay under the limit.
#[tokio::test]
async fn the_manifests_memory_settings_fit_their_limit() {
    let deployment =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/base/deployment.yaml")).unwrap();
    let limit = deployment
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("limits:"))
        .find_map(|l| l.trim().strip_prefix("memory:"))
        .map(|v| omnibus::config::parse_bytes(v.trim().trim_matches('"')).unwrap())
        .expect("the Deployment sets a memory limit");
    let limit_arg = limit.to_string();
    let server = Server::start(&["--memory-limit", &limit_arg]).await;
    let scrape = server.scrape().await;
    let rss = sample(&scrape, "omnibus_resident_memory_bytes");
    let kv = sample(&scrape, r#"omnibus_model_memory_bytes{model="SmolLM2-135M-Instruct.Q4_1",kind="kv_budget"}"#);
    let batch = sample(&scrape, r#"omnibus_model_memory_bytes{model="all-MiniLM-L6-v2",kind="batch_budget"}"#);
    assert!(rss > 0.0 && kv > 0.0 && batch > 0.0, "rss {rss}, kv {kv}, batch {batch}");
    assert!(rss + kv + batch <= limit as f64, "{rss} + {kv} + {batch} > {limit}");
    let free = sample(&scrape, r#"omnibus_kv_tokens{model="SmolLM2-135M-Instruct.Q4_1",state="free"}"#);
    assert!(free > 4096.0, "only {free} KV positions fit the limit");
}

#[tokio::test]
async fn a_limit_too_small_for_the_models_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_omnibus"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--memory-limit", "300Mi", "--model-dir"])
        .arg(common::model_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the memory limit of 300 MiB (--memory-limit) leaves nothing"), "{stderr}");
}
