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
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use self::tensors::{
    EMBEDDING, TEXT, TEXT_INPUT, TEXT_OUTPUT, embedding_response, final_response, generate_params, predict_params,
    tensor_error, tensor_meta, text_response,
};
use super::calls::{self, Calls, Outcome};
use super::infer::{self, UNKNOWN_MODEL};
use super::status::ServeError;
use super::{convert, deadline};
use crate::batcher::Priority;
use crate::batcher::generate::GenEvent;
use crate::config::ModelControl;
use crate::registry::{AnyModel, EmbeddingModel, GenerationModel, Registry};

mod tensors;

pub use super::pb::oip as pb;

use pb::grpc_inference_service_server::GrpcInferenceService;

pub use pb::grpc_inference_service_server::GrpcInferenceServiceServer;

#[derive(Clone)]
pub struct OipService {
    pub registry: Arc<OnceLock<Arc<Registry>>>,
    pub calls: Arc<Calls>,
    pub model_control: ModelControl,
    /// --max-message-size, for the error of a streamed message above it.
    pub max_message_size: usize,
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

/// An embedding model's answer to one inference request.
async fn embed(
    m: Arc<EmbeddingModel>,
    req: pb::ModelInferRequest,
    deadline: Option<tokio::time::Instant>,
    priority: Priority,
) -> Result<pb::ModelInferResponse, ServeError> {
    let (out, _) = infer::embed(&m, predict_params(&req)?, deadline, priority).await?;
    Ok(embedding_response((&m.name, m.version), req.id, m.dimension, &out))
}

/// Starts a generation from an inference request; its events arrive on the returned stream.
async fn start_generation(
    m: &Arc<GenerationModel>,
    req: &pb::ModelInferRequest,
    deadline: Option<tokio::time::Instant>,
    priority: Priority,
) -> Result<crate::batcher::generate::GenStream, ServeError> {
    infer::generate(m, generate_params(req)?, deadline, priority).await
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
                                // Never asked for through this protocol.
                                GenEvent::PromptLogprobs(_) => {}
                                GenEvent::Token { text: t, .. } => text.push_str(&t),
                                GenEvent::End { finish, prompt_tokens, completion_tokens, .. } => {
                                    end = Some((finish, prompt_tokens, completion_tokens))
                                }
                            }
                        }
                        let mut r = text_response((&m.name, m.version), &req.id, &text);
                        if let Some((finish, p, c)) = end {
                            r.parameters = final_response((&m.name, m.version), &req.id, finish, p, c).parameters;
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

    /// One call for the whole stream, through the same lifecycle as Generate (`infer::stream`): its
    /// deadline, the grace period's cut, one recorded outcome (labelled with the model of its first
    /// request). Each request's own failure is answered in band, in `error_message`, as Triton does, and
    /// counted among the failures; a message that does not decode ends the stream with INVALID_ARGUMENT.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        const METHOD: &str = "ModelStreamInfer";
        let deadline = deadline::of(&request);
        let outcome = Outcome::new(&self.calls, METHOD, deadline);
        let guard = match self.calls.enter() {
            Ok(g) => g,
            Err(e) => return Err(outcome.fail(e)),
        };
        let priority = match convert::priority(0, request.metadata()) {
            Ok(p) => p,
            Err(e) => return Err(outcome.fail(e.into())),
        };
        let mut inbound = request.into_inner();
        // Room for a few responses in flight; the sender waits when the client reads slowly.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ModelStreamInferResponse, ServeError>>(64);
        let stream =
            infer::stream(&self.calls, guard, outcome, Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let label = stream.label();
        let this = self.clone();
        tokio::spawn(async move {
            let in_band = |e: ServeError, served: Option<(&str, u64)>| {
                calls::record_in_band(METHOD, served, &e);
                Ok(pb::ModelStreamInferResponse { error_message: e.to_string(), infer_response: None })
            };
            let reply = |r: pb::ModelInferResponse| {
                Ok(pb::ModelStreamInferResponse { error_message: String::new(), infer_response: Some(r) })
            };
            loop {
                // The response stream ends (deadline, grace, the client gone): stop reading too.
                let next = tokio::select! {
                    next = inbound.next() => next,
                    _ = tx.closed() => return,
                };
                let req = match next {
                    None => return,
                    Some(Ok(req)) => req,
                    Some(Err(status)) => {
                        // tonic's own error reading the stream: a message that does not decode, or one
                        // above the size limit, ends the call with its error; anything else is the
                        // client's side of the stream going away.
                        let err = ServeError::from_tonic(&status, this.max_message_size)
                            .unwrap_or(ServeError::ClientCancelled);
                        let _ = tx.send(Err(err)).await;
                        return;
                    }
                };
                let sent = match this.model(&req.model_name, &req.model_version) {
                    Err(e) => tx.send(in_band(e, None)).await,
                    Ok(AnyModel::Embedding(m)) => {
                        label.set_served(m.name.clone(), m.version);
                        let served = (m.name.clone(), m.version);
                        match embed(m, req, deadline, priority).await {
                            Ok(r) => tx.send(reply(r)).await,
                            Err(e) => tx.send(in_band(e, Some((&served.0, served.1)))).await,
                        }
                    }
                    Ok(AnyModel::Generation(m)) => {
                        label.set_served(m.name.clone(), m.version);
                        let served = Some((&*m.name, m.version));
                        match start_generation(&m, &req, deadline, priority).await {
                            Err(e) => tx.send(in_band(e, served)).await,
                            Ok(mut events) => {
                                let mut sent = Ok(());
                                while let Some(ev) = events.recv().await {
                                    let msg = match ev {
                                        // Never asked for through this protocol.
                                        Ok(GenEvent::PromptLogprobs(_)) => continue,
                                        Ok(GenEvent::Token { text, .. }) => {
                                            reply(text_response((&m.name, m.version), &req.id, &text))
                                        }
                                        Ok(GenEvent::End { finish, prompt_tokens, completion_tokens, .. }) => {
                                            reply(final_response(
                                                (&m.name, m.version),
                                                &req.id,
                                                finish,
                                                prompt_tokens,
                                                completion_tokens,
                                            ))
                                        }
                                        Err(e) => in_band(e.into(), served),
                                    };
                                    // A closed channel: the client left; dropping `events` frees the sequence.
                                    sent = tx.send(msg).await;
                                    if sent.is_err() {
                                        break;
                                    }
                                }
                                sent
                            }
                        }
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
