//! The Open Inference Protocol (inference.GRPCInferenceService) end to end with the real binary and
//! models: health and metadata, ModelInfer on the embedding model equal to Predict (raw and typed inputs),
//! ModelStreamInfer on the generation model equal to Generate, and precise errors.
mod common;

use std::collections::HashMap;

use common::Server;
use omnibus::server::oip::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use omnibus::server::oip::pb::infer_parameter::ParameterChoice;
use omnibus::server::oip::pb::model_infer_request::InferInputTensor;
use omnibus::server::oip::pb::{self as ip, InferParameter, InferTensorContents, ModelInferRequest};
use omnibus::server::pb::generate_response::Kind;
use omnibus::server::pb::{GenerateRequest, PredictRequest};
use tonic::Code;

const EMBEDDER: &str = "all-MiniLM-L6-v2";
const GENERATOR: &str = "SmolLM2-135M-Instruct.Q4_1";

fn raw_bytes(items: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in items {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out
}

fn text_tensor(name: &str, n: usize) -> InferInputTensor {
    InferInputTensor { name: name.into(), datatype: "BYTES".into(), shape: vec![n as i64], ..Default::default() }
}

fn floats(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[tokio::test]
async fn embeddings_through_model_infer_equal_predict() {
    let server = Server::start(&[]).await;
    let mut oip = GrpcInferenceServiceClient::new(server.channel().await);
    assert!(oip.server_live(ip::ServerLiveRequest {}).await.unwrap().into_inner().live);
    assert!(oip.server_ready(ip::ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let ready = oip.model_ready(ip::ModelReadyRequest { name: EMBEDDER.into(), version: String::new() }).await;
    assert!(ready.unwrap().into_inner().ready);
    let meta = oip.model_metadata(ip::ModelMetadataRequest { name: EMBEDDER.into(), version: String::new() });
    let meta = meta.await.unwrap().into_inner();
    assert_eq!((meta.inputs[0].name.as_str(), meta.outputs[0].shape.as_slice()), ("TEXT", &[-1, 384][..]));
    let texts = ["The quick brown fox", "gRPC is fast", "héllo wörld"];
    let want = server
        .client()
        .await
        .predict(PredictRequest { inputs: texts.iter().map(|s| s.to_string()).collect(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .outputs;
    // Raw form.
    let raw = ModelInferRequest {
        model_name: EMBEDDER.into(),
        id: "r1".into(),
        inputs: vec![text_tensor("TEXT", 3)],
        raw_input_contents: vec![raw_bytes(&texts)],
        ..Default::default()
    };
    let out = oip.model_infer(raw).await.unwrap().into_inner();
    assert_eq!(
        (out.id.as_str(), out.outputs[0].name.as_str(), out.outputs[0].datatype.as_str()),
        ("r1", "EMBEDDING", "FP32")
    );
    assert_eq!(out.outputs[0].shape, vec![3, 384]);
    let got = floats(&out.raw_output_contents[0]);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&got[i * 384..(i + 1) * 384], w.values.as_slice(), "row {i} equals Predict's");
    }
    // Typed form, shape [n, 1].
    let mut typed_input = text_tensor("TEXT", 3);
    typed_input.shape = vec![3, 1];
    typed_input.contents = Some(InferTensorContents {
        bytes_contents: texts.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..Default::default()
    });
    let typed = ModelInferRequest { model_name: EMBEDDER.into(), inputs: vec![typed_input], ..Default::default() };
    let out = oip.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(&floats(&out.raw_output_contents[0])[..384], want[0].values.as_slice());
}

#[tokio::test]
async fn wrong_names_shapes_and_types_are_invalid_argument() {
    let server = Server::start(&[]).await;
    let mut oip = GrpcInferenceServiceClient::new(server.channel().await);
    let mut bad = text_tensor("TEXT", 1);
    bad.datatype = "FP32".into();
    let req = ModelInferRequest {
        model_name: EMBEDDER.into(),
        inputs: vec![bad],
        raw_input_contents: vec![raw_bytes(&["x"])],
        ..Default::default()
    };
    let s = oip.model_infer(req).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("\"TEXT\" of datatype BYTES") && s.message().contains("\"FP32\""), "{}", s.message());
    let req = ModelInferRequest {
        model_name: EMBEDDER.into(),
        inputs: vec![text_tensor("input_ids", 1)],
        raw_input_contents: vec![raw_bytes(&["x"])],
        ..Default::default()
    };
    let s = oip.model_infer(req).await.unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("input_ids"), "{s:?}");
    let req = ModelInferRequest {
        model_name: EMBEDDER.into(),
        inputs: vec![text_tensor("TEXT", 2)],
        raw_input_contents: vec![raw_bytes(&["only one"])],
        ..Default::default()
    };
    let s = oip.model_infer(req).await.unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("2 elements"), "{s:?}");
    let s =
        oip.model_metadata(ip::ModelMetadataRequest { name: "nope".into(), version: String::new() }).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
}

#[tokio::test]
async fn generation_streams_one_response_per_token_equal_to_generate() {
    let server = Server::start(&[]).await;
    let prompt = "Rust is a programming language that";
    let mut want = String::new();
    let mut stream = server
        .client()
        .await
        .generate(GenerateRequest { prompt: prompt.into(), max_new_tokens: 12, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(Kind::Token(t)) = m.kind {
            want.push_str(&t.text);
        }
    }
    let mut oip = GrpcInferenceServiceClient::new(server.channel().await);
    let req = ModelInferRequest {
        model_name: GENERATOR.into(),
        id: "g1".into(),
        inputs: vec![text_tensor("text_input", 1)],
        raw_input_contents: vec![raw_bytes(&[prompt])],
        parameters: HashMap::from([(
            "max_tokens".to_string(),
            InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(12)) },
        )]),
        ..Default::default()
    };
    let mut responses = oip.model_stream_infer(tokio_stream::iter([req.clone()])).await.unwrap().into_inner();
    let (mut text, mut tokens, mut finals) = (String::new(), 0, 0);
    while let Some(r) = responses.message().await.unwrap() {
        assert!(r.error_message.is_empty(), "{}", r.error_message);
        let r = r.infer_response.unwrap();
        assert_eq!(r.id, "g1");
        if let Some(ParameterChoice::BoolParam(true)) =
            r.parameters.get("triton_final_response").and_then(|p| p.parameter_choice.clone())
        {
            finals += 1;
            break;
        }
        let raw = &r.raw_output_contents[0];
        text.push_str(std::str::from_utf8(&raw[4..]).unwrap());
        tokens += 1;
    }
    assert_eq!(finals, 1);
    assert!(tokens >= 1);
    assert_eq!(text, want, "the same greedy text as Generate");
    // ModelInfer on the generation model answers the whole text at once.
    let whole = oip.model_infer(req).await.unwrap().into_inner();
    assert_eq!(std::str::from_utf8(&whole.raw_output_contents[0][4..]).unwrap(), want);
}
