//! inference.GRPCInferenceService, the KServe v2 Open Inference Protocol, beside omnibus.v1.Inference on
//! the same port and through the same batchers, limits, deadlines, drain and metrics. Tensors in either
//! form (`raw_input_contents` or typed `contents`) are parsed here into the same `validate` parameters
//! the native API uses; answers are always raw, as Triton's are.
//!
//! - An embedding model takes `TEXT` (BYTES, shape `[batch]` or `[batch, 1]`) and answers `EMBEDDING`
//!   (FP32, `[batch, dimension]`). Parameters: `truncate` (bool), `normalize` (bool).
//! - A generation model takes `text_input` (BYTES, `[1]` or `[1, 1]`) and answers `text_output` (BYTES,
//!   `[1]`): the whole text from ModelInfer, one token per response from ModelStreamInfer (decoupled; the
//!   last response carries `triton_final_response = true`, the finish reason and token counts).
//!   Parameters: `max_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop` (string).
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::calls::{Calls, Outcome};
use super::predict::UNKNOWN_MODEL;
use super::status::ServeError;
use super::{convert, deadline};
use crate::batcher::generate::GenEvent;
use crate::config::ModelControl;
use crate::engine::Finish;
use crate::registry::{AnyModel, EmbeddingModel, GenerationModel, Registry};
use crate::tokenizer::Truncation;
use crate::validate::{GenerateParams, PredictParams, ValidationError};

pub use super::pb::oip as pb;

use pb::grpc_inference_service_server::GrpcInferenceService;
use pb::infer_parameter::ParameterChoice;
use pb::model_infer_request::InferInputTensor;
use pb::model_infer_response::InferOutputTensor;

pub use pb::grpc_inference_service_server::GrpcInferenceServiceServer;

const TEXT: &str = "TEXT";
const EMBEDDING: &str = "EMBEDDING";
const TEXT_INPUT: &str = "text_input";
const TEXT_OUTPUT: &str = "text_output";

#[derive(Clone)]
pub struct OipService {
    pub registry: Arc<OnceLock<Arc<Registry>>>,
    pub calls: Arc<Calls>,
    pub model_control: ModelControl,
}

impl OipService {
    fn registry(&self) -> Result<Arc<Registry>, Status> {
        self.registry.get().cloned().ok_or_else(|| ServeError::NotReady.into())
    }

    fn model(&self, name: &str, version: &str) -> Result<AnyModel, ServeError> {
        let registry = self.registry().map_err(|_| ServeError::NotReady)?;
        if name.is_empty() {
            return Err(tensor_error("model_name", "the name of a loaded model", "an empty name").into());
        }
        let version = match version {
            "" => None,
            v => Some(v.parse::<u64>().ok().filter(|&v| v > 0).ok_or_else(|| {
                tensor_error("model_version", "a version number (1, 2, ...) or empty", &format!("{v:?}"))
            })?),
        };
        Ok(registry.model_at(name, version)?)
    }
}

impl OipService {
    /// Runs a repository call: refused while draining and, when it changes the repository (`control`),
    /// unless --model-control-mode is explicit; recorded in the metrics without a model label (the name
    /// is the client's, and labels must stay a bounded set).
    async fn admin<T>(
        &self,
        method: &'static str,
        control: bool,
        work: impl Future<Output = Result<T, ServeError>>,
    ) -> Result<Response<T>, Status> {
        let run = async {
            let outcome = Outcome::new(&self.calls, method, None);
            if control && self.model_control != ModelControl::Explicit {
                return Err(outcome.fail(ServeError::ModelControlDisabled));
            }
            match work.await {
                Ok(r) => {
                    outcome.ok();
                    Ok(Response::new(r))
                }
                Err(e) => Err(outcome.fail(e)),
            }
        };
        self.calls.unary(method, run).await
    }
}

fn tensor_error(field: &str, expected: &str, got: &str) -> ValidationError {
    ValidationError::Tensor { field: field.to_string(), expected: expected.to_string(), got: got.to_string() }
}

fn tensor_meta(name: &str, datatype: &str, shape: Vec<i64>) -> pb::model_metadata_response::TensorMetadata {
    pb::model_metadata_response::TensorMetadata { name: name.into(), datatype: datatype.into(), shape }
}

/// The BYTES elements of input `i`, from the raw contents or the typed ones.
fn bytes_elements(req: &pb::ModelInferRequest, i: usize) -> Result<Vec<Vec<u8>>, ValidationError> {
    let input = &req.inputs[i];
    if let Some(raw) = req.raw_input_contents.get(i) {
        if input.contents.as_ref().is_some_and(|c| !c.bytes_contents.is_empty()) {
            return Err(tensor_error(
                &format!("inputs[{i}].contents"),
                "no typed contents when raw_input_contents is used",
                "both",
            ));
        }
        let mut out = Vec::new();
        let mut rest = raw.as_slice();
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(tensor_error(
                    &format!("raw_input_contents[{i}]"),
                    "a 4-byte length before each BYTES element",
                    &format!("{} trailing bytes", rest.len()),
                ));
            }
            let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            if rest.len() < 4 + n {
                return Err(tensor_error(
                    &format!("raw_input_contents[{i}]"),
                    &format!("{n} bytes after a length of {n}"),
                    &format!("{}", rest.len() - 4),
                ));
            }
            out.push(rest[4..4 + n].to_vec());
            rest = &rest[4 + n..];
        }
        return Ok(out);
    }
    Ok(input.contents.as_ref().map(|c| c.bytes_contents.clone()).unwrap_or_default())
}

/// The single input a model takes, checked: its name, datatype BYTES, a shape of `[n]` or `[n, 1]` whose
/// element count matches the data; returns the elements as text.
fn text_input(req: &pb::ModelInferRequest, name: &str, one: bool) -> Result<Vec<String>, ValidationError> {
    let shapes = if one { "[1] or [1, 1]" } else { "[batch] or [batch, 1]" };
    let expected = format!("one input named {name:?} of datatype BYTES and shape {shapes}");
    let [input]: &[InferInputTensor; 1] = req.inputs.as_slice().try_into().map_err(|_| {
        let names: Vec<&str> = req.inputs.iter().map(|t| t.name.as_str()).collect();
        tensor_error("inputs", &expected, &format!("{} inputs {names:?}", names.len()))
    })?;
    // Raw contents come one per input, in order (Triton refuses any other count too).
    if !req.raw_input_contents.is_empty() && req.raw_input_contents.len() != req.inputs.len() {
        return Err(tensor_error(
            "raw_input_contents",
            &format!("one entry per input ({})", req.inputs.len()),
            &format!("{} entries", req.raw_input_contents.len()),
        ));
    }
    let got = format!("name {:?}, datatype {:?}, shape {:?}", input.name, input.datatype, input.shape);
    let shape_ok = match input.shape.as_slice() {
        [n] | [n, 1] => *n >= 1 && (!one || *n == 1),
        _ => false,
    };
    if input.name != name || input.datatype != "BYTES" || !shape_ok {
        return Err(tensor_error("inputs[0]", &expected, &got));
    }
    let elements = bytes_elements(req, 0)?;
    if elements.len() as i64 != input.shape[0] {
        return Err(tensor_error(
            "inputs[0]",
            &format!("{} elements for shape {:?}", input.shape[0], input.shape),
            &format!("{} elements", elements.len()),
        ));
    }
    for out in &req.outputs {
        let want = if one { TEXT_OUTPUT } else { EMBEDDING };
        if out.name != want {
            return Err(tensor_error("outputs", &format!("the output {want:?}"), &format!("{:?}", out.name)));
        }
    }
    elements
        .into_iter()
        .enumerate()
        .map(|(j, e)| {
            String::from_utf8(e).map_err(|_| tensor_error(&format!("inputs[0][{j}]"), "UTF-8 text", "other bytes"))
        })
        .collect()
}

fn param<'a>(params: &'a HashMap<String, pb::InferParameter>, key: &str) -> Option<&'a ParameterChoice> {
    params.get(key).and_then(|p| p.parameter_choice.as_ref())
}

fn param_bool(params: &HashMap<String, pb::InferParameter>, key: &str) -> Result<Option<bool>, ValidationError> {
    match param(params, key) {
        None => Ok(None),
        Some(ParameterChoice::BoolParam(b)) => Ok(Some(*b)),
        Some(other) => Err(tensor_error(&format!("parameters.{key}"), "a bool", &format!("{other:?}"))),
    }
}

fn param_f64(params: &HashMap<String, pb::InferParameter>, key: &str) -> Result<Option<f64>, ValidationError> {
    match param(params, key) {
        None => Ok(None),
        Some(ParameterChoice::DoubleParam(v)) => Ok(Some(*v)),
        Some(ParameterChoice::Int64Param(v)) => Ok(Some(*v as f64)),
        Some(ParameterChoice::Uint64Param(v)) => Ok(Some(*v as f64)),
        Some(ParameterChoice::StringParam(s)) => {
            s.parse().map(Some).map_err(|_| tensor_error(&format!("parameters.{key}"), "a number", &format!("{s:?}")))
        }
        Some(other) => Err(tensor_error(&format!("parameters.{key}"), "a number", &format!("{other:?}"))),
    }
}

fn generate_params(req: &pb::ModelInferRequest) -> Result<GenerateParams, ValidationError> {
    let prompt = text_input(req, TEXT_INPUT, true)?.remove(0);
    let p = &req.parameters;
    let int = |k: &str| -> Result<Option<u64>, ValidationError> {
        match param_f64(p, k)? {
            Some(v) if v >= 0.0 && v.fract() == 0.0 => Ok(Some(v as u64)),
            Some(v) => Err(tensor_error(&format!("parameters.{k}"), "a non-negative integer", &v.to_string())),
            None => Ok(None),
        }
    };
    let stop = match param(p, "stop") {
        None => Vec::new(),
        Some(ParameterChoice::StringParam(s)) => vec![s.clone()],
        Some(other) => return Err(tensor_error("parameters.stop", "a string", &format!("{other:?}"))),
    };
    Ok(GenerateParams {
        prompt,
        messages: Vec::new(),
        max_new_tokens: int("max_tokens")?.unwrap_or(16),
        temperature: param_f64(p, "temperature")?.unwrap_or(0.0) as f32,
        top_k: int("top_k")?.unwrap_or(0).min(u32::MAX as u64) as u32,
        top_p: param_f64(p, "top_p")?.map(|v| v as f32),
        repetition_penalty: None,
        seed: int("seed")?,
        stop,
        logprobs: false,
    })
}

/// One BYTES element in raw form.
fn raw_bytes(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + text.len());
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

fn text_response(model: &GenerationModel, id: &str, text: &str) -> pb::ModelInferResponse {
    pb::ModelInferResponse {
        model_name: model.name.to_string(),
        model_version: model.version.to_string(),
        id: id.into(),
        parameters: HashMap::new(),
        outputs: vec![InferOutputTensor {
            name: TEXT_OUTPUT.into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_output_contents: vec![raw_bytes(text)],
    }
}

fn final_response(
    model: &GenerationModel,
    id: &str,
    finish: Finish,
    prompt_tokens: u32,
    completion_tokens: u32,
) -> pb::ModelInferResponse {
    let p = |c: ParameterChoice| pb::InferParameter { parameter_choice: Some(c) };
    let reason = match finish {
        Finish::Length => "length",
        Finish::StopSequence => "stop",
        Finish::EndOfSequence => "eos",
    };
    let parameters = HashMap::from([
        ("triton_final_response".to_string(), p(ParameterChoice::BoolParam(true))),
        ("finish_reason".to_string(), p(ParameterChoice::StringParam(reason.into()))),
        ("prompt_tokens".to_string(), p(ParameterChoice::Int64Param(prompt_tokens as i64))),
        ("completion_tokens".to_string(), p(ParameterChoice::Int64Param(completion_tokens as i64))),
    ]);
    pb::ModelInferResponse {
        model_name: model.name.to_string(),
        model_version: model.version.to_string(),
        id: id.into(),
        parameters,
        outputs: Vec::new(),
        raw_output_contents: Vec::new(),
    }
}

async fn embed(
    m: Arc<EmbeddingModel>,
    req: pb::ModelInferRequest,
    deadline: Option<tokio::time::Instant>,
    priority: crate::batcher::Priority,
) -> Result<pb::ModelInferResponse, ServeError> {
    let inputs = text_input(&req, TEXT, false)?;
    let params = PredictParams {
        inputs,
        truncate: param_bool(&req.parameters, "truncate")?.unwrap_or(false),
        direction: Truncation::Right,
        normalize: param_bool(&req.parameters, "normalize")?,
    };
    let (out, _) = super::predict::embed(&m, params, deadline, priority).await?;
    let rows = out.vectors.len();
    let mut raw = Vec::with_capacity(rows * m.dimension * 4);
    for v in &out.vectors {
        for x in v {
            raw.extend_from_slice(&x.to_le_bytes());
        }
    }
    Ok(pb::ModelInferResponse {
        model_name: m.name.to_string(),
        model_version: m.version.to_string(),
        id: req.id,
        parameters: HashMap::new(),
        outputs: vec![InferOutputTensor {
            name: EMBEDDING.into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, m.dimension as i64],
            ..Default::default()
        }],
        raw_output_contents: vec![raw],
    })
}

/// Starts a generation from an inference request; its events arrive on the returned stream.
async fn start_generation(
    m: &Arc<GenerationModel>,
    req: &pb::ModelInferRequest,
    deadline: Option<tokio::time::Instant>,
    priority: crate::batcher::Priority,
) -> Result<crate::batcher::generate::GenStream, ServeError> {
    super::generate::start(m, generate_params(req)?, deadline, priority).await
}

type StreamOut = Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for OipService {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let ready = self.registry.get().is_some() && !self.calls.is_draining();
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = self.model(&r.name, &r.version).is_ok() && !self.calls.is_draining();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "omnibus".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let (platform, inputs, outputs) = match self.model(&r.name, &r.version).map_err(Status::from)? {
            AnyModel::Embedding(m) => (
                "omnibus_embedding",
                vec![tensor_meta(TEXT, "BYTES", vec![-1, 1])],
                vec![tensor_meta(EMBEDDING, "FP32", vec![-1, m.dimension as i64])],
            ),
            AnyModel::Generation(_) => (
                "omnibus_generation",
                vec![tensor_meta(TEXT_INPUT, "BYTES", vec![1])],
                vec![tensor_meta(TEXT_OUTPUT, "BYTES", vec![1])],
            ),
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            versions: self.registry()?.serving_versions(&r.name).iter().map(u64::to_string).collect(),
            name: r.name,
            platform: platform.into(),
            inputs,
            outputs,
        }))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = request.into_inner();
        let input = |name: &str, dims: Vec<i64>| pb::ModelInput {
            name: name.into(),
            data_type: pb::DataType::TypeString as i32,
            dims,
        };
        let output = |name: &str, t: pb::DataType, dims: Vec<i64>| pb::ModelOutput {
            name: name.into(),
            data_type: t as i32,
            dims,
        };
        let config = match self.model(&r.name, &r.version).map_err(Status::from)? {
            AnyModel::Embedding(m) => pb::ModelConfig {
                name: r.name,
                platform: "omnibus_embedding".into(),
                backend: "omnibus".into(),
                max_batch_size: m.limits.max_inputs as i32,
                input: vec![input(TEXT, vec![1])],
                output: vec![output(EMBEDDING, pb::DataType::TypeFp32, vec![m.dimension as i64])],
                model_transaction_policy: Some(pb::ModelTransactionPolicy { decoupled: false }),
            },
            AnyModel::Generation(_) => pb::ModelConfig {
                name: r.name,
                platform: "omnibus_generation".into(),
                backend: "omnibus".into(),
                max_batch_size: 0,
                input: vec![input(TEXT_INPUT, vec![1])],
                output: vec![output(TEXT_OUTPUT, pb::DataType::TypeString, vec![1])],
                model_transaction_policy: Some(pb::ModelTransactionPolicy { decoupled: true }),
            },
        };
        Ok(Response::new(pb::ModelConfigResponse { config: Some(config) }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let deadline = deadline::of(&request);
        let calls = self.calls.clone();
        let work = async {
            let mut outcome = Outcome::new(&calls, "ModelInfer", deadline);
            let priority = match convert::priority(0, request.metadata()) {
                Ok(p) => p,
                Err(e) => return Err(outcome.fail(e.into())),
            };
            let req = request.into_inner();
            let model = match self.model(&req.model_name, &req.model_version) {
                Ok(m) => m,
                Err(e) => {
                    outcome.set_model(UNKNOWN_MODEL.into());
                    return Err(outcome.fail(e));
                }
            };
            let result = match model {
                AnyModel::Embedding(m) => {
                    outcome.set_served(m.name.clone(), m.version);
                    embed(m, req, deadline, priority).await
                }
                AnyModel::Generation(m) => {
                    outcome.set_served(m.name.clone(), m.version);
                    async {
                        let mut events = start_generation(&m, &req, deadline, priority).await?;
                        let mut text = String::new();
                        let mut end = None;
                        while let Some(ev) = events.recv().await {
                            match ev? {
                                GenEvent::Token { text: t, .. } => text.push_str(&t),
                                GenEvent::End { finish, prompt_tokens, completion_tokens, .. } => {
                                    end = Some((finish, prompt_tokens, completion_tokens))
                                }
                            }
                        }
                        let mut r = text_response(&m, &req.id, &text);
                        if let Some((finish, p, c)) = end {
                            r.parameters = final_response(&m, &req.id, finish, p, c).parameters;
                            r.parameters.remove("triton_final_response");
                        }
                        Ok(r)
                    }
                    .await
                }
            };
            match result {
                Ok(r) => {
                    outcome.ok();
                    Ok(Response::new(r))
                }
                Err(e) => Err(outcome.fail(e)),
            }
        };
        self.calls.unary("ModelInfer", work).await
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let registry = self.registry()?;
        self.admin("RepositoryIndex", false, super::repository::index(&registry, request.into_inner())).await
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let registry = self.registry()?;
        self.admin("RepositoryModelLoad", true, super::repository::load(&registry, request.into_inner())).await
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let registry = self.registry()?;
        self.admin("RepositoryModelUnload", true, super::repository::unload(&registry, request.into_inner())).await
    }

    type ModelStreamInferStream = StreamOut;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let deadline = deadline::of(&request);
        let priority = convert::priority(0, request.metadata()).map_err(|e| Status::from(ServeError::from(e)))?;
        let guard = self.calls.enter().map_err(Status::from)?;
        let mut inbound = request.into_inner();
        // Room for a few responses in flight; the sender waits when the client reads slowly.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ModelStreamInferResponse, Status>>(64);
        let this = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let error = |msg: String| Ok(pb::ModelStreamInferResponse { error_message: msg, infer_response: None });
            while let Some(next) = inbound.next().await {
                let req = match next {
                    Ok(req) => req,
                    Err(status) => {
                        // A message that does not decode ends the stream with INVALID_ARGUMENT, counted.
                        let status = super::codec::request_error(status);
                        if status.message().starts_with(super::codec::MALFORMED) {
                            super::calls::record_refused("ModelStreamInfer", status.code(), "malformed");
                        }
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let mut outcome = Outcome::new(&this.calls, "ModelStreamInfer", deadline);
                let m = match this.model(&req.model_name, &req.model_version) {
                    Ok(AnyModel::Generation(m)) => m,
                    Ok(AnyModel::Embedding(m)) => {
                        outcome.set_served(m.name.clone(), m.version);
                        match embed(m, req, deadline, priority).await {
                            Ok(r) => {
                                outcome.ok();
                                let _ = tx
                                    .send(Ok(pb::ModelStreamInferResponse {
                                        error_message: String::new(),
                                        infer_response: Some(r),
                                    }))
                                    .await;
                            }
                            Err(e) => {
                                let _ = tx.send(error(outcome.fail(e).message().to_string())).await;
                            }
                        }
                        continue;
                    }
                    Err(e) => {
                        outcome.set_model(UNKNOWN_MODEL.into());
                        let _ = tx.send(error(outcome.fail(e).message().to_string())).await;
                        continue;
                    }
                };
                outcome.set_served(m.name.clone(), m.version);
                let mut events = match start_generation(&m, &req, deadline, priority).await {
                    Ok(ev) => ev,
                    Err(e) => {
                        let _ = tx.send(error(outcome.fail(e).message().to_string())).await;
                        continue;
                    }
                };
                let mut failed = None;
                while let Some(ev) = events.recv().await {
                    let msg = match ev {
                        Ok(GenEvent::Token { text, .. }) => text_response(&m, &req.id, &text),
                        Ok(GenEvent::End { finish, prompt_tokens, completion_tokens, .. }) => {
                            final_response(&m, &req.id, finish, prompt_tokens, completion_tokens)
                        }
                        Err(e) => {
                            failed = Some(ServeError::from(e));
                            break;
                        }
                    };
                    if tx
                        .send(Ok(pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(msg),
                        }))
                        .await
                        .is_err()
                    {
                        return; // the client left; dropping `events` frees the sequence
                    }
                }
                match failed {
                    Some(e) => {
                        let _ = tx.send(error(outcome.fail(e).message().to_string())).await;
                    }
                    None => outcome.ok(),
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    //! The tensor parser on requests written by hand and generated by proptest: every request parses or
    //! gets a `ValidationError` naming its field, never a panic.
    use proptest::prelude::*;

    use super::*;

    fn raw(elements: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in elements {
            out.extend_from_slice(&(e.len() as u32).to_le_bytes());
            out.extend_from_slice(e);
        }
        out
    }

    fn request(name: &str, datatype: &str, shape: Vec<i64>, raw_contents: Vec<Vec<u8>>) -> pb::ModelInferRequest {
        pb::ModelInferRequest {
            inputs: vec![InferInputTensor {
                name: name.into(),
                datatype: datatype.into(),
                shape,
                ..Default::default()
            }],
            raw_input_contents: raw_contents,
            ..Default::default()
        }
    }

    #[test]
    fn raw_and_typed_contents_parse_the_same() {
        let req = request(TEXT, "BYTES", vec![2], vec![raw(&[b"a b", b"c"])]);
        assert_eq!(text_input(&req, TEXT, false).unwrap(), vec!["a b".to_string(), "c".to_string()]);
        let mut typed = request(TEXT, "BYTES", vec![2, 1], vec![]);
        typed.inputs[0].contents = Some(pb::InferTensorContents {
            bytes_contents: vec![b"a b".to_vec(), b"c".to_vec()],
            ..Default::default()
        });
        assert_eq!(text_input(&typed, TEXT, false).unwrap(), vec!["a b".to_string(), "c".to_string()]);
    }

    #[test]
    fn every_malformed_tensor_names_its_field() {
        let err = |req: pb::ModelInferRequest| text_input(&req, TEXT, false).unwrap_err().to_string();
        assert!(err(request("WRONG", "BYTES", vec![1], vec![raw(&[b"x"])])).contains("inputs[0]"));
        assert!(err(request(TEXT, "FP32", vec![1], vec![raw(&[b"x"])])).contains("BYTES"));
        assert!(err(request(TEXT, "BYTES", vec![2, 2], vec![raw(&[b"x"])])).contains("shape"));
        assert!(err(request(TEXT, "BYTES", vec![2], vec![raw(&[b"x"])])).contains("2 elements for shape"));
        // A length prefix longer than the bytes after it, and a buffer cut inside a prefix.
        let mut cut = raw(&[b"hello"]);
        cut.truncate(7);
        assert!(err(request(TEXT, "BYTES", vec![1], vec![cut])).contains("raw_input_contents[0]"));
        assert!(err(request(TEXT, "BYTES", vec![1], vec![vec![1, 0]])).contains("4-byte length"));
        assert!(err(request(TEXT, "BYTES", vec![1], vec![raw(&[&[0xff, 0xfe]])])).contains("UTF-8"));
        // More raw entries than inputs: refused, as Triton refuses them.
        let extra = request(TEXT, "BYTES", vec![1], vec![raw(&[b"x"]), raw(&[b"y"])]);
        assert!(err(extra).contains("raw_input_contents: expected one entry per input (1), got 2 entries"));
        let mut none = request(TEXT, "BYTES", vec![1], vec![]);
        none.inputs.clear();
        assert!(err(none).contains("0 inputs"));
    }

    #[test]
    fn max_tokens_errors_name_the_value_sent() {
        let mut req = request(TEXT_INPUT, "BYTES", vec![1], vec![raw(&[b"hi"])]);
        req.parameters.insert(
            "max_tokens".into(),
            pb::InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(1 << 40)) },
        );
        assert_eq!(generate_params(&req).unwrap().max_new_tokens, 1 << 40);
    }

    fn tensor() -> impl Strategy<Value = InferInputTensor> {
        (
            prop_oneof![Just(TEXT.to_string()), Just(TEXT_INPUT.to_string()), "[a-z_]{0,8}"],
            prop_oneof![Just("BYTES".to_string()), Just("FP32".to_string()), "[A-Z0-9]{0,6}"],
            proptest::collection::vec(-3i64..5, 0..4),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 0..4),
        )
            .prop_map(|(name, datatype, shape, typed)| InferInputTensor {
                name,
                datatype,
                shape,
                contents: Some(pb::InferTensorContents { bytes_contents: typed, ..Default::default() }),
                ..Default::default()
            })
    }

    fn parameter() -> impl Strategy<Value = pb::InferParameter> {
        prop_oneof![
            any::<bool>().prop_map(ParameterChoice::BoolParam),
            any::<i64>().prop_map(ParameterChoice::Int64Param),
            any::<u64>().prop_map(ParameterChoice::Uint64Param),
            any::<f64>().prop_map(ParameterChoice::DoubleParam),
            ".{0,6}".prop_map(ParameterChoice::StringParam),
        ]
        .prop_map(|c| pb::InferParameter { parameter_choice: Some(c) })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn generated_requests_parse_or_name_a_field(
            inputs in proptest::collection::vec(tensor(), 0..3),
            raw_contents in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..24), 0..3),
            params in proptest::collection::hash_map(
                prop_oneof![Just("max_tokens"), Just("temperature"), Just("top_k"), Just("top_p"), Just("seed"),
                            Just("stop"), Just("truncate"), Just("normalize")].prop_map(str::to_string),
                parameter(),
                0..4,
            ),
        ) {
            let req = pb::ModelInferRequest { inputs, raw_input_contents: raw_contents, parameters: params, ..Default::default() };
            for one in [false, true] {
                if let Err(e) = text_input(&req, if one { TEXT_INPUT } else { TEXT }, one) {
                    prop_assert!(matches!(e, ValidationError::Tensor { .. }), "{e:?}");
                }
            }
            if let Err(e) = generate_params(&req) {
                prop_assert!(matches!(e, ValidationError::Tensor { .. }), "{e:?}");
            }
            let _ = param_bool(&req.parameters, "truncate");
        }

        /// Any bytes through the codec: a message or INVALID_ARGUMENT.
        #[test]
        fn any_bytes_decode_or_are_malformed(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(req) = <pb::ModelInferRequest as prost::Message>::decode(bytes.as_slice()) {
                let _ = text_input(&req, TEXT, false);
                let _ = generate_params(&req);
            }
        }
    }
}
