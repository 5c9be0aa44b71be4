//! Model versions and hot swap, end to end with the real binary and models, through the Open Inference
//! Protocol's repository extension: a swap under load fails no request, in-flight requests finish on the
//! version they started on, the old version is then freed; canaries take their exact share and roll
//! back; errors name what exists.
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Server;
use omnibus::server::oip::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use omnibus::server::oip::pb::model_infer_request::InferInputTensor;
use omnibus::server::oip::pb::model_repository_parameter::ParameterChoice;
use omnibus::server::oip::pb::{self as ip, ModelRepositoryParameter};
use omnibus::server::pb::generate_response::Kind;
use omnibus::server::pb::{GenerateRequest, ListModelsRequest, PredictRequest};
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::Channel;

const EMBEDDER: &str = "minilm";
const GENERATOR: &str = "smol";

/// A versioned repository of symlinks to the default models: `minilm/1/` and `smol/1/model.gguf`.
fn repository(tag: &str) -> PathBuf {
    let models = common::model_dir();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("repo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    add_version(&root, &models, 1);
    root
}

fn add_version(root: &Path, models: &Path, v: u64) {
    std::fs::create_dir_all(root.join(GENERATOR).join(v.to_string())).unwrap();
    std::fs::create_dir_all(root.join(EMBEDDER)).unwrap();
    std::os::unix::fs::symlink(models.join("all-MiniLM-L6-v2"), root.join(EMBEDDER).join(v.to_string())).unwrap();
    std::os::unix::fs::symlink(
        models.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        root.join(GENERATOR).join(v.to_string()).join("model.gguf"),
    )
    .unwrap();
}

fn params(kv: &[(&str, ParameterChoice)]) -> std::collections::HashMap<String, ModelRepositoryParameter> {
    kv.iter().map(|(k, c)| (k.to_string(), ModelRepositoryParameter { parameter_choice: Some(c.clone()) })).collect()
}

async fn load(
    oip: &mut GrpcInferenceServiceClient<Channel>,
    name: &str,
    kv: &[(&str, ParameterChoice)],
) -> Result<(), tonic::Status> {
    let req = ip::RepositoryModelLoadRequest { model_name: name.into(), parameters: params(kv), ..Default::default() };
    oip.repository_model_load(req).await.map(|_| ())
}

async fn unload(
    oip: &mut GrpcInferenceServiceClient<Channel>,
    name: &str,
    kv: &[(&str, ParameterChoice)],
) -> Result<(), tonic::Status> {
    let req =
        ip::RepositoryModelUnloadRequest { model_name: name.into(), parameters: params(kv), ..Default::default() };
    oip.repository_model_unload(req).await.map(|_| ())
}

/// (version, state) of every index entry of `name`.
async fn index(oip: &mut GrpcInferenceServiceClient<Channel>, name: &str) -> Vec<(String, String)> {
    let r = oip.repository_index(ip::RepositoryIndexRequest::default()).await.unwrap().into_inner();
    r.models.into_iter().filter(|m| m.name == name).map(|m| (m.version, m.state)).collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

async fn predict_version(server: &Server, text: &str) -> Result<(String, Vec<f32>), tonic::Status> {
    let r = server
        .client()
        .await
        .predict(PredictRequest { model: EMBEDDER.into(), inputs: vec![text.into()], ..Default::default() })
        .await?
        .into_inner();
    Ok((r.metadata.unwrap().model_version, r.outputs.into_iter().next().unwrap().values))
}

/// Streams a generation to its end; returns the tokens' count and the version its end names.
async fn generate(server: &Server, max_new_tokens: u32) -> Result<(usize, String), tonic::Status> {
    let mut stream = server
        .client()
        .await
        .generate(GenerateRequest {
            model: GENERATOR.into(),
            // Greedy decoding keeps counting: no end of sequence before max_new_tokens.
            prompt: "Count from 1 to 1000: 1, 2, 3, 4, 5,".into(),
            max_new_tokens,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut tokens = 0;
    while let Some(msg) = stream.message().await? {
        match msg.kind {
            Some(Kind::Token(_)) => tokens += 1,
            Some(Kind::End(end)) => return Ok((tokens, end.model_version)),
            Some(Kind::PromptLogprobs(_)) | None => {}
        }
    }
    panic!("the stream ended without its end message");
}

/// Polls the index until `name`'s entries are `want` (a retired version is freed once its last
/// request has ended, which the test cannot observe more directly than this).
async fn wait_index(oip: &mut GrpcInferenceServiceClient<Channel>, name: &str, want: Vec<(String, String)>) {
    let limit = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = index(oip, name).await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < limit, "index of {name}: {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_swap_under_load_fails_no_request_and_frees_the_old_version() {
    let root = repository("swap");
    let server = Arc::new(Server::start_in(&root, &["--model-control-mode", "explicit"]).await);
    let mut oip = GrpcInferenceServiceClient::new(server.channel().await);
    let (v1, before) = predict_version(&server, "the same sentence").await.unwrap();
    assert_eq!(v1, "1");

    // Version 2 appears on disk; it is listed but not loaded.
    add_version(&root, &common::model_dir(), 2);
    assert_eq!(index(&mut oip, EMBEDDER).await, pairs(&[("1", "READY"), ("2", "UNAVAILABLE")]));

    // Load: 6 Predict clients without pause, and generations started on version 1.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load_tasks = JoinSet::new();
    for c in 0..6 {
        let (server, stop) = (server.clone(), stop.clone());
        load_tasks.spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (v, _) = predict_version(&server, &format!("client {c} sentence {}", seen.len())).await?;
                seen.push(v);
            }
            Ok::<_, tonic::Status>(seen)
        });
    }
    let long = {
        let server = server.clone();
        tokio::spawn(async move { generate(&server, 400).await })
    };
    // The swap starts once the generation is decoding, so it is in flight.
    let limit = tokio::time::Instant::now() + Duration::from_secs(30);
    while common::sample(&server.scrape().await, "omnibus_running_sequences{model=\"smol\"}") < 1.0 {
        assert!(tokio::time::Instant::now() < limit, "the generation never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load(&mut oip, GENERATOR, &[]).await.expect("load the highest version");
    assert!(!long.is_finished(), "the generation outlived the swap");
    assert_eq!(index(&mut oip, GENERATOR).await, pairs(&[("1", "UNLOADING"), ("2", "READY")]));
    load(&mut oip, EMBEDDER, &[]).await.expect("load the highest version");

    // New requests get version 2 at once.
    let (v2, after) = predict_version(&server, "the same sentence").await.unwrap();
    assert_eq!(v2, "2");
    assert_eq!(before, after, "both versions are the same files");
    let (_, v) = generate(&server, 4).await.unwrap();
    assert_eq!(v, "2");

    // The generation that started on version 1 ends there, whole.
    let (tokens, v) = long.await.unwrap().expect("the in-flight generation is not cut by the swap");
    assert_eq!((tokens, v.as_str()), (400, "1"));

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    while let Some(seen) = load_tasks.join_next().await {
        let seen = seen.unwrap().expect("no Predict fails during the swap");
        // Each client sees version 1, then version 2, never back.
        let switch = seen.iter().position(|v| v == "2").unwrap_or(seen.len());
        assert!(seen[..switch].iter().all(|v| v == "1") && seen[switch..].iter().all(|v| v == "2"), "{seen:?}");
        total += seen.len();
    }
    assert!(total >= 6, "the clients ran ({total} requests)");

    // Version 1 is freed once its requests are done; ModelMetadata lists only version 2.
    wait_index(&mut oip, EMBEDDER, pairs(&[("1", "UNAVAILABLE"), ("2", "READY")])).await;
    wait_index(&mut oip, GENERATOR, pairs(&[("1", "UNAVAILABLE"), ("2", "READY")])).await;
    let meta = oip.model_metadata(ip::ModelMetadataRequest { name: EMBEDDER.into(), version: String::new() });
    assert_eq!(meta.await.unwrap().into_inner().versions, vec!["2".to_string()]);
    let scrape = server.scrape().await;
    let failures: Vec<&str> = scrape.lines().filter(|l| l.starts_with("omnibus_request_failures_total")).collect();
    assert!(failures.is_empty(), "no call failed for any reason: {failures:?}");
}

#[tokio::test]
async fn canary_takes_its_share_then_rolls_back_or_is_promoted() {
    let root = repository("canary");
    add_version(&root, &common::model_dir(), 2);
    add_version(&root, &common::model_dir(), 3);
    // Version 3 is the highest: the one that loads at start.
    let server = Server::start_in(&root, &["--model-control-mode", "explicit"]).await;
    let mut oip = GrpcInferenceServiceClient::new(server.channel().await);
    load(&mut oip, EMBEDDER, &[("version", ParameterChoice::StringParam("1".into()))]).await.unwrap();
    assert_eq!(predict_version(&server, "x").await.unwrap().0, "1");

    load(
        &mut oip,
        EMBEDDER,
        &[("version", ParameterChoice::Int64Param(2)), ("canary_percent", ParameterChoice::Int64Param(25))],
    )
    .await
    .unwrap();
    let mut versions = Vec::new();
    for i in 0..40 {
        versions.push(predict_version(&server, &format!("sentence {i}")).await.unwrap().0);
    }
    assert_eq!(versions.iter().filter(|v| *v == "2").count(), 10, "{versions:?}");
    assert_eq!(versions.iter().filter(|v| *v == "1").count(), 30, "{versions:?}");
    // Counted by version, so the canary's error rate can be compared with the stable one's.
    let scrape = server.scrape().await;
    let ok = |v: &str| {
        format!("omnibus_requests_total{{model=\"{EMBEDDER}\",version=\"{v}\",method=\"Predict\",code=\"OK\"}}")
    };
    assert_eq!((common::sample(&scrape, &ok("1")), common::sample(&scrape, &ok("2"))), (31.0, 10.0));
    let listed = server.client().await.list_models(ListModelsRequest {}).await.unwrap().into_inner();
    let m = listed.models.iter().find(|m| m.name == EMBEDDER).unwrap();
    let canary = m.canary.as_ref().expect("the canary is listed");
    assert_eq!((m.version.as_str(), canary.version.as_str(), canary.percent), ("1", "2", 25));
    assert_eq!(index(&mut oip, EMBEDDER).await[1], ("2".to_string(), "READY".to_string()));

    // A client may pin the canary (or the stable version) by number.
    let pinned = ip::ModelInferRequest {
        model_name: EMBEDDER.into(),
        model_version: "2".into(),
        inputs: vec![InferInputTensor {
            name: "TEXT".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_input_contents: vec![[&3u32.to_le_bytes()[..], b"abc"].concat()],
        ..Default::default()
    };
    assert_eq!(oip.model_infer(pinned.clone()).await.unwrap().into_inner().model_version, "2");
    let missing = oip.model_infer(ip::ModelInferRequest { model_version: "3".into(), ..pinned.clone() }).await;
    let missing = missing.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("no version 3") && missing.message().contains("1, 2"), "{}", missing.message());

    // Rollback: unloading the canary's version sends everything back to the stable one.
    unload(&mut oip, EMBEDDER, &[("version", ParameterChoice::StringParam("2".into()))]).await.unwrap();
    for i in 0..8 {
        assert_eq!(predict_version(&server, &format!("after rollback {i}")).await.unwrap().0, "1");
    }
    // Promotion: the canary's version loaded without a share becomes stable without a reload.
    load(
        &mut oip,
        EMBEDDER,
        &[("version", ParameterChoice::Int64Param(3)), ("canary_percent", ParameterChoice::Int64Param(50))],
    )
    .await
    .unwrap();
    load(&mut oip, EMBEDDER, &[("version", ParameterChoice::Int64Param(3))]).await.unwrap();
    for i in 0..8 {
        assert_eq!(predict_version(&server, &format!("after promotion {i}")).await.unwrap().0, "3");
    }
    wait_index(&mut oip, EMBEDDER, pairs(&[("1", "UNAVAILABLE"), ("2", "UNAVAILABLE"), ("3", "READY")])).await;

    // Unload: the model is gone for new requests until it is loaded again.
    unload(&mut oip, EMBEDDER, &[]).await.unwrap();
    let gone = predict_version(&server, "x").await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{}", gone.message());
    load(&mut oip, EMBEDDER, &[]).await.unwrap();
    assert_eq!(predict_version(&server, "x").await.unwrap().0, "3");
}

#[tokio::test]
async fn repository_errors_name_what_exists() {
    let root = repository("errors");
    let server = Server::start_in(&root, &["--model-control-mode", "explicit"]).await;
    let mut oip = GrpcInferenceServiceClient::new(server.channel().await);
    let err = load(&mut oip, "nope", &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("minilm") && err.message().contains("smol"), "{}", err.message());
    let err = load(&mut oip, EMBEDDER, &[("version", ParameterChoice::Int64Param(9))]).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("no version 9") && err.message().contains("has: 1"), "{}", err.message());
    let err = load(&mut oip, EMBEDDER, &[("canary_percent", ParameterChoice::Int64Param(0))]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("canary_percent") && err.message().contains("1 to 99"), "{}", err.message());
    let err = load(
        &mut oip,
        EMBEDDER,
        &[("version", ParameterChoice::Int64Param(1)), ("canary_percent", ParameterChoice::Int64Param(5))],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a canary of the stable version: {}", err.message());
    let err = unload(&mut oip, EMBEDDER, &[("version", ParameterChoice::Int64Param(4))]).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = oip.repository_model_load(ip::RepositoryModelLoadRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("model_name"), "{}", err.message());

    // Without --model-control-mode explicit, the repository can be read but not changed.
    let locked = Server::start_in(&root, &[]).await;
    let mut oip = GrpcInferenceServiceClient::new(locked.channel().await);
    assert_eq!(index(&mut oip, EMBEDDER).await, pairs(&[("1", "READY")]));
    let err = load(&mut oip, EMBEDDER, &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("--model-control-mode explicit"), "{}", err.message());
    assert_eq!(unload(&mut oip, EMBEDDER, &[]).await.unwrap_err().code(), Code::FailedPrecondition);
}
