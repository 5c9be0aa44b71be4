//! Predict end to end: the real binary, the real MiniLM model, a generated tonic client.
mod common;

use std::time::Duration;

use common::{Server, cosine, max_abs_diff};
use omnibus::server::pb::{self, PredictRequest};
use serde::Deserialize;
use tonic::{Code, Request};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[derive(Deserialize)]
struct Reference {
    sentences: Vec<String>,
    token_ids: Vec<Vec<u32>>,
    vectors: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/embeddings.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn request(inputs: &[&str]) -> PredictRequest {
    PredictRequest { inputs: inputs.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// 32 texts of the realistic corpus (3 to ~100 words; prose, code, five languages), all different.
fn mixed_sentences() -> Vec<String> {
    let corpus = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/corpus/tune.txt")).unwrap();
    corpus.lines().step_by(17).take(32).map(str::to_string).collect()
}

#[tokio::test]
async fn health_reflection_and_list_models() {
    let server = Server::start(&[]).await;
    // Reflection v1 lists our service and health.
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["omnibus.v1.Inference", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    // v1alpha answers too (older grpcurl and ghz use it).
    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let req = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "omnibus.v1.PredictRequest".into(),
            ),
        ),
    };
    let mut stream = alpha.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(
            resp.message_response,
            Some(tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f))
                if !f.file_descriptor_proto.is_empty()
        ),
        "{resp:?}"
    );
    // Health per service.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "omnibus.v1.Inference".into() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    let models = server.client().await.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    let minilm = models.iter().find(|m| m.name == "all-MiniLM-L6-v2").expect("MiniLM listed");
    assert_eq!(minilm.kind, pb::ModelKind::Embedding as i32);
    assert_eq!(minilm.device, "cpu");
    assert!(minilm.is_default);
    let limits = minilm.limits.unwrap();
    assert_eq!(limits.embedding_dimension, 384);
    assert_eq!(limits.max_input_tokens, 256);
    assert_eq!(limits.max_batch_size, 32);
}

#[tokio::test]
async fn embeddings_match_sentence_transformers() {
    embeddings_match(Server::start(&[]).await).await;
}

/// The device-generic encoder (candle's ops on the packed layout, what GPUs run) through the real server
/// on candle's CPU backend.
#[tokio::test]
async fn device_generic_embeddings_match_sentence_transformers() {
    embeddings_match(Server::start_env(&[], &[("OMNIBUS_ENGINE", "device-generic")]).await).await;
}

async fn embeddings_match(server: Server) {
    let reference = reference();
    let mut client = server.client().await;
    let inputs: Vec<&str> = reference.sentences.iter().map(String::as_str).collect();
    let resp = client.predict(request(&inputs)).await.unwrap().into_inner();
    assert_eq!(resp.outputs.len(), reference.vectors.len());
    for (i, (got, want)) in resp.outputs.iter().zip(&reference.vectors).enumerate() {
        let c = cosine(&got.values, want);
        assert!(c >= 0.9999, "sentence {i}: cosine {c}");
        let norm: f32 = got.values.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "sentence {i} is not normalised: {norm}");
    }
    let meta = resp.metadata.unwrap();
    let tokens: usize = reference.token_ids.iter().map(Vec::len).sum();
    assert_eq!(meta.prompt_tokens as usize, tokens);
    assert_eq!(meta.model, "all-MiniLM-L6-v2");
    assert!(meta.batch_size >= 2);

    // normalize=false returns the raw mean-pooled vector: same direction, not unit length.
    let mut raw = request(&inputs[..1]);
    raw.normalize = Some(false);
    let resp = client.predict(raw).await.unwrap().into_inner();
    let v = &resp.outputs[0].values;
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() > 1e-2, "unnormalised vector has norm {norm}");
    assert!(cosine(v, &reference.vectors[0]) >= 0.9999);
}

#[tokio::test]
async fn a_sentence_gets_the_same_vector_alone_and_in_a_concurrent_batch() {
    let server = Server::start(&[]).await;
    let sentences = mixed_sentences();
    let mut client = server.client().await;
    let alone: Vec<Vec<f32>> = {
        let mut v = Vec::new();
        for s in &sentences {
            let resp = client.predict(request(&[s.as_str()])).await.unwrap().into_inner();
            assert_eq!(resp.metadata.unwrap().batch_size, 1, "a sequential caller rides alone");
            v.push(resp.outputs.into_iter().next().unwrap().values);
        }
        v
    };
    let mut tasks = Vec::new();
    for s in sentences.clone() {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move { c.predict(request(&[s.as_str()])).await.unwrap().into_inner() }));
    }
    let mut largest_batch = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let resp = t.await.unwrap();
        largest_batch = largest_batch.max(resp.metadata.unwrap().batch_size);
        // Packed batches and a fixed order of every sum: the same bits, not just close.
        let d = max_abs_diff(&resp.outputs[0].values, &alone[i]);
        assert_eq!(resp.outputs[0].values, alone[i], "sentence {i}: batched differs from alone by {d}");
    }
    assert!(largest_batch > 1, "32 concurrent callers were never batched together");
}

#[tokio::test]
async fn a_full_window_batches_all_concurrent_callers() {
    // A 2 s window and a batch size of 32: 32 callers, each calling again as soon as it is answered.
    // The first round may start before every caller has reached the server (a request waits only for
    // company that is expected: announced, or answered together with it); from then on, callers
    // answered together are expected together, and the window holds them in one batch of 32. The
    // window only bounds how long a request waits for company that does not come: it is long here so
    // that a batch computed slowly (a debug build beside other tests) cannot outlast it, which would let
    // the first round's two groups run apart again.
    let server = Server::start(&["--max-queue-delay", "2s"]).await;
    let client = server.client().await;
    let mut tasks = Vec::new();
    for s in mixed_sentences() {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut sizes = Vec::new();
            for _ in 0..3 {
                let m = c.predict(request(&[s.as_str()])).await.unwrap().into_inner().metadata.unwrap();
                assert_eq!(m.batch_size, m.batch_requests, "one input per request");
                sizes.push(m.batch_size);
            }
            sizes
        }));
    }
    let mut last = Vec::new();
    for t in tasks {
        last.push(*t.await.unwrap().last().unwrap());
    }
    assert!(last.iter().all(|&s| s == 32), "batch sizes of the third round {last:?}");
}

fn assert_status(result: Result<tonic::Response<pb::PredictResponse>, tonic::Status>, code: Code, needles: &[&str]) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    for n in needles {
        assert!(status.message().contains(n), "{:?} does not mention {n:?}", status.message());
    }
}

#[tokio::test]
async fn bad_inputs_get_precise_statuses_and_harm_nobody() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    assert_status(client.predict(request(&[])).await, Code::InvalidArgument, &["inputs", "at least 1", "got 0"]);
    let many: Vec<&str> = vec!["x"; 33];
    assert_status(client.predict(request(&many)).await, Code::InvalidArgument, &["inputs", "32", "33"]);
    assert_status(client.predict(request(&["ok", ""])).await, Code::InvalidArgument, &["inputs[1]", "non-empty"]);
    let long = "word ".repeat(400);
    assert_status(
        client.predict(request(&["fine", &long])).await,
        Code::InvalidArgument,
        &["inputs[1]", "402 tokens", "256", "truncate"],
    );
    let mut unknown = request(&["hello"]);
    unknown.model = "no-such-model".into();
    assert_status(client.predict(unknown).await, Code::NotFound, &["no-such-model", "all-MiniLM-L6-v2"]);
    let mut bad_enum = request(&["hello"]);
    bad_enum.truncation_direction = 42;
    assert_status(client.predict(bad_enum).await, Code::InvalidArgument, &["truncation_direction", "42"]);
    let mut req = Request::new(request(&["hello"]));
    req.metadata_mut().insert("grpc-timeout", "soon".parse().unwrap());
    assert_status(client.predict(req).await, Code::InvalidArgument, &["grpc-timeout"]);

    // Truncation cuts to exactly the limit, from either end, and the two ends differ.
    let long = format!("{} {}", "alpha ".repeat(300), "omega ".repeat(300));
    let mut right = request(&[&long]);
    right.truncate = true;
    let r = client.predict(right).await.unwrap().into_inner();
    assert_eq!(r.metadata.unwrap().prompt_tokens, 256);
    let mut left = request(&[&long]);
    left.truncate = true;
    left.truncation_direction = pb::TruncationDirection::Left as i32;
    let l = client.predict(left).await.unwrap().into_inner();
    assert!(cosine(&r.outputs[0].values, &l.outputs[0].values) < 0.99);

    // After all that, the server still answers well-formed requests.
    let ok = client.predict(request(&["still here"])).await.unwrap().into_inner();
    assert_eq!(ok.outputs[0].values.len(), 384);
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_at_once() {
    // One input per batch and two waiting places: 48 concurrent long inputs overflow it.
    let server = Server::start(&["--max-batch-size", "1", "--max-queue", "2"]).await;
    let client = server.client().await;
    let long = "word ".repeat(200); // 202 tokens
    let mut tasks = Vec::new();
    for _ in 0..48 {
        let mut c = client.clone();
        let text = long.clone();
        tasks.push(tokio::spawn(async move { c.predict(request(&[&text])).await }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.message().contains("overloaded"), "{}", s.message());
                exhausted += 1;
            }
            Err(s) => panic!("unexpected status {s:?}"),
        }
    }
    assert!(ok >= 1, "admitted requests must still succeed");
    assert!(exhausted >= 1, "48 callers against 2 places never overflowed ({ok} ok)");
}

#[tokio::test]
async fn a_request_past_its_deadline_in_the_queue_gets_deadline_exceeded() {
    // The model is busy for a second or more with 32 long inputs; a request with a 100 ms deadline waits
    // behind them and must be answered DEADLINE_EXCEEDED, not after the long batch.
    let server = Server::start(&[]).await;
    let mut busy = server.client().await;
    let long = "word ".repeat(250);
    let heavy = tokio::spawn(async move {
        let mut req = request(&vec![long.as_str(); 32]);
        req.truncate = true;
        busy.predict(req).await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut client = server.client_without_timer();
    let mut req = Request::new(request(&["waiting for the model"]));
    req.set_timeout(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let status = client.predict(req).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_millis(500), "answered only after {:?}", started.elapsed());
    assert!(!heavy.is_finished(), "the long batch finished first: the test proved nothing");
    heavy.await.unwrap().unwrap();
}
