//! A client we did not write: NVIDIA's `tritonclient[grpc]` drives the Open Inference Protocol side
//! of the real server (liveness, metadata, ModelInfer on the embedding model, ModelStreamInfer on the
//! generation model, and the repository extension: index, load, unload), checked against what the
//! native Predict and Generate answer. `scripts/test` installs tests/interop/triton-requirements.txt
//! into `.venv-triton`.
mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Server;
use omnibus::server::pb::generate_response::Kind;
use omnibus::server::pb::{GenerateRequest, PredictRequest};

#[tokio::test]
async fn tritonclient_drives_model_infer_and_model_stream_infer() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv-triton/bin/python");
    assert!(python.exists(), "{} is missing: run ./scripts/test", python.display());
    let server = Server::start(&["--model-control-mode", "explicit"]).await;
    let mut client = server.client().await;
    let texts = vec!["The quick brown fox".to_string(), "Open Inference Protocol".to_string()];
    let vectors: Vec<Vec<f32>> = client
        .predict(PredictRequest { inputs: texts.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .outputs
        .into_iter()
        .map(|e| e.values)
        .collect();
    let prompt = "The capital of France is";
    let mut stream = client
        .generate(GenerateRequest { prompt: prompt.into(), max_new_tokens: 10, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(Kind::Token(t)) = m.kind {
            text.push_str(&t.text);
        }
    }
    let expected = serde_json::json!({
        "embedder": "all-MiniLM-L6-v2",
        "generator": "SmolLM2-135M-Instruct.Q4_1",
        "texts": texts,
        "vectors": vectors,
        "prompt": prompt,
        "max_tokens": 10,
        "text": text,
    });
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("triton-expected-{}.json", std::process::id()));
    std::fs::write(&path, expected.to_string()).unwrap();
    let addr = server.addr.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python).arg(root.join("tests/interop/triton.py")).arg(addr).arg(path).output().expect("run python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "tritonclient failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("triton: all checks passed"), "{stdout}");
}
