//! Bounded fuzzing of the live server: valid requests of every RPC, encoded, then mutated by proptest
//! (bytes flipped, cut, inserted, the frame's length prefix lied about), sent as raw gRPC frames. Every
//! answer must be a gRPC status other than INTERNAL or UNKNOWN (or a success), and the server must keep
//! serving a well-behaved client between the cases. The case count is fixed so CI time is bounded.
mod common;

use std::time::Duration;

use common::Server;
use http_body_util::{BodyExt, Full};
use omnibus::server::pb;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tonic::Code;

const CASES: usize = 400;

/// An encoded, valid request for `method`.
fn valid(method: usize, text: &str) -> (&'static str, Vec<u8>) {
    use prost::Message;
    match method % 4 {
        0 => (
            "/omnibus.v1.Inference/Predict",
            pb::PredictRequest { inputs: vec![text.into(), "two".into()], truncate: true, ..Default::default() }
                .encode_to_vec(),
        ),
        1 => (
            "/omnibus.v1.Inference/Generate",
            pb::GenerateRequest { prompt: format!("{text} "), max_new_tokens: 3, ..Default::default() }.encode_to_vec(),
        ),
        2 => ("/omnibus.v1.Inference/ListModels", pb::ListModelsRequest {}.encode_to_vec()),
        _ => {
            let mut raw = (text.len() as u32).to_le_bytes().to_vec();
            raw.extend_from_slice(text.as_bytes());
            (
                "/inference.GRPCInferenceService/ModelInfer",
                omnibus::server::oip::pb::ModelInferRequest {
                    model_name: "all-MiniLM-L6-v2".into(),
                    inputs: vec![omnibus::server::oip::pb::model_infer_request::InferInputTensor {
                        name: "TEXT".into(),
                        datatype: "BYTES".into(),
                        shape: vec![1],
                        ..Default::default()
                    }],
                    raw_input_contents: vec![raw],
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    /// The 5-byte gRPC frame header's length field, lied about.
    Length(u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (0u32..2000).prop_map(Mutation::Length),
    ]
}

fn frame(body: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut body = body.to_vec();
    let mut len = body.len() as u32;
    let mut lied = false;
    for m in mutations {
        match m {
            Mutation::Flip(i, x) if !body.is_empty() => {
                let i = i % body.len();
                body[i] ^= x;
            }
            Mutation::Cut(i) => body.truncate(i % (body.len() + 1)),
            Mutation::Insert(i, b) => {
                let i = i % (body.len() + 1);
                body.splice(i..i, b.iter().copied());
            }
            Mutation::Length(n) => {
                len = *n;
                lied = true;
            }
            _ => {}
        }
    }
    if !lied {
        len = body.len() as u32;
    }
    let mut f = vec![0u8];
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&body);
    f
}

#[tokio::test]
async fn mutated_requests_get_statuses_and_the_server_lives() {
    let server = Server::start(&["--request-timeout", "5s"]).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<bytes::Bytes>>();
    let mut good = server.client().await;
    let mut runner = TestRunner::deterministic();
    let case = (0usize..4, "[a-zA-Z ]{1,40}", proptest::collection::vec(mutation(), 1..4));
    let mut codes = std::collections::BTreeMap::new();
    for n in 0..CASES {
        let (method, text, mutations) = case.new_tree(&mut runner).unwrap().current();
        let (path, body) = valid(method, &text);
        let req = http::Request::post(format!("{}{path}", server.url()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(bytes::Bytes::from(frame(&body, &mutations))))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .unwrap_or_else(|_| panic!("case {n} ({path}, {mutations:?}): no answer in 10 s"))
            .unwrap_or_else(|e| panic!("case {n} ({path}, {mutations:?}): {e}"));
        let (parts, body) = resp.into_parts();
        let collected = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await
            .unwrap_or_else(|_| panic!("case {n} ({path}, {mutations:?}): the body never ended"))
            .unwrap_or_else(|e| panic!("case {n} ({path}, {mutations:?}): {e}"));
        let trailers = collected.trailers().cloned();
        let headers = trailers.as_ref().filter(|t| t.contains_key("grpc-status")).unwrap_or(&parts.headers);
        let status = tonic::Status::from_header_map(headers)
            .unwrap_or_else(|| panic!("case {n} ({path}, {mutations:?}): no grpc-status"));
        assert!(
            !matches!(status.code(), Code::Internal | Code::Unknown),
            "case {n} ({path}, {mutations:?}): {status:?}"
        );
        *codes.entry(format!("{:?}", status.code())).or_insert(0) += 1;
        if n % 50 == 0 {
            good.predict(pb::PredictRequest { inputs: vec!["still fine".into()], ..Default::default() })
                .await
                .unwrap_or_else(|e| panic!("the well-behaved client failed after case {n}: {e:?}"));
        }
    }
    eprintln!("{CASES} mutated requests: {codes:?}");
    assert!(codes.contains_key("InvalidArgument"), "no case was malformed enough: {codes:?}");
}
