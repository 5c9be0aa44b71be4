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

/// A ModelStreamInfer response, or the error that ends the stream.
type StreamItem = Result<pb::ModelStreamInferResponse, ServeError>;

/// The client has gone (the response stream ended): stop.
struct Gone;

/// Runs `work` unless the response stream ends first (deadline, grace, the client gone): then the work
/// is dropped, which frees a queued or running request before its next step.
async fn unless_gone<T>(tx: &tokio::sync::mpsc::Sender<StreamItem>, work: impl Future<Output = T>) -> Result<T, Gone> {
    tokio::select! {
        r = work => Ok(r),
        _ = tx.closed() => Err(Gone),
    }
}

async fn reply(tx: &tokio::sync::mpsc::Sender<StreamItem>, r: pb::ModelInferResponse) -> Result<(), Gone> {
    let msg = pb::ModelStreamInferResponse { error_message: String::new(), infer_response: Some(r) };
    tx.send(Ok(msg)).await.map_err(|_| Gone)
}

/// A request's failure, answered in band as Triton does, and counted once it is sent.
async fn in_band(
    tx: &tokio::sync::mpsc::Sender<StreamItem>,
    err: ServeError,
    served: Option<(&str, u64)>,
) -> Result<(), Gone> {
    let msg = pb::ModelStreamInferResponse { error_message: err.to_string(), infer_response: None };
    tx.send(Ok(msg)).await.map_err(|_| Gone)?;
    calls::record_in_band("ModelStreamInfer", served, &err);
    Ok(())
}

/// Serves a ModelStreamInfer stream's requests one after another until the client closes its side, a
/// message cannot be read, or the response stream ends.
async fn stream_session(
    this: &OipService,
    inbound: &mut Streaming<pb::ModelInferRequest>,
    tx: &tokio::sync::mpsc::Sender<StreamItem>,
    label: &calls::Label,
    deadline: Option<tokio::time::Instant>,
    priority: Priority,
) -> Result<(), Gone> {
    let mut labelled = false;
    loop {
        let req = match unless_gone(tx, inbound.next()).await? {
            None => return Ok(()),
            Some(Ok(req)) => req,
            Some(Err(status)) => {
                // tonic's own error reading the stream ends the call (see ServeError::from_stream_read).
                let _ = tx.send(Err(ServeError::from_stream_read(&status, this.max_message_size))).await;
                return Ok(());
            }
        };
        // A draining server takes no new work, even on a stream that is already open.
        if this.calls.is_draining() {
            in_band(tx, ServeError::ShuttingDown, None).await?;
            continue;
        }
        let model = match this.model(&req.model_name, &req.model_version) {
            Ok(m) => m,
            Err(e) => {
                in_band(tx, e, None).await?;
                continue;
            }
        };
        let (name, version) = match &model {
            AnyModel::Embedding(m) => (m.name.clone(), m.version),
            AnyModel::Generation(m) => (m.name.clone(), m.version),
        };
        if !labelled {
            label.set_served(name.clone(), version);
            labelled = true;
        }
        let served = Some((&*name, version));
        match model {
            AnyModel::Embedding(m) => match unless_gone(tx, embed(m, req, deadline, priority)).await? {
                Ok(r) => reply(tx, r).await?,
                Err(e) => in_band(tx, e, served).await?,
            },
            AnyModel::Generation(m) => {
                let mut events = match unless_gone(tx, start_generation(&m, &req, deadline, priority)).await? {
                    Ok(events) => events,
                    Err(e) => {
                        in_band(tx, e, served).await?;
                        continue;
                    }
                };
                // Returning drops `events`, which frees the sequence before its next step.
                while let Some(ev) = unless_gone(tx, events.recv()).await? {
                    match ev {
                        // Never asked for through this protocol.
                        Ok(GenEvent::PromptLogprobs(_)) => {}
                        Ok(GenEvent::Token { text, .. }) => {
                            reply(tx, text_response((&m.name, m.version), &req.id, &text)).await?
                        }
                        Ok(GenEvent::End { finish, prompt_tokens, completion_tokens, .. }) => {
                            let r =
                                final_response((&m.name, m.version), &req.id, finish, prompt_tokens, completion_tokens);
                            reply(tx, r).await?
                        }
                        Err(e) => in_band(tx, e.into(), served).await?,
                    }
                }
            }
        }
    }
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
    /// deadline (the caller's grpc-timeout only: a session has no server default), the grace period's
    /// cut, one recorded outcome (labelled with the model of its first request). Each request's own
    /// failure is answered in band, in `error_message`, as Triton does, and counted among the failures;
    /// a message that does not decode ends the stream with INVALID_ARGUMENT.
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
            let _ = stream_session(&this, &mut inbound, &tx, &label, deadline, priority).await;
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
