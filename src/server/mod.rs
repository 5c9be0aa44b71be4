//! The gRPC front: the only module that imports tonic and the generated code. It builds the services
//! (omnibus.v1.Inference, grpc.health.v1.Health, reflection v1 and v1alpha), starts model loading in the
//! background (health says NOT_SERVING until every model is loaded and warmed), and serves until shutdown.
mod convert;
mod deadline;
mod generate;
mod models;
mod predict;
mod status;

use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tracing::{error, info};

pub use status::ServeError;

use crate::config::ServeConfig;
use crate::registry::{Registry, RegistryError};

/// The generated code and the descriptor set that reflection serves.
pub mod pb {
    tonic::include_proto!("omnibus.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/omnibus_descriptor.bin"));
}

use pb::inference_server::{Inference, InferenceServer};

/// The fully qualified name health reports the Inference service under.
pub const INFERENCE_SERVICE: &str = "omnibus.v1.Inference";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("loading models: {0}")]
    Registry(#[from] RegistryError),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// omnibus.v1.Inference; answers UNAVAILABLE until the models are loaded.
#[derive(Clone)]
struct InferenceService {
    registry: Arc<OnceLock<Arc<Registry>>>,
}

impl InferenceService {
    fn registry(&self) -> Result<Arc<Registry>, Status> {
        self.registry.get().cloned().ok_or_else(|| ServeError::NotReady.into())
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn predict(&self, request: Request<pb::PredictRequest>) -> Result<Response<pb::PredictResponse>, Status> {
        let registry = self.registry()?;
        predict::predict(registry, request).await.map_err(Status::from)
    }

    type GenerateStream = generate::GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let registry = self.registry()?;
        generate::generate(registry, request).await.map_err(Status::from)
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let registry = self.registry()?;
        Ok(Response::new(models::list(&registry)))
    }
}

/// Serves on `listener` until `shutdown` resolves. Fails when the models cannot be loaded.
pub async fn serve(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    reporter.set_service_status(INFERENCE_SERVICE, ServingStatus::NotServing).await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let cell = Arc::new(OnceLock::new());
    let inference = InferenceServer::new(InferenceService { registry: cell.clone() })
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);

    // Models load while the server already answers health checks (NOT_SERVING), as startup probes expect.
    let (failed_tx, failed_rx) = oneshot::channel::<RegistryError>();
    let (model_config, batch_config, gen_config) =
        (config.model.clone(), config.batch.clone(), config.generate.clone());
    tokio::spawn(async move {
        match Registry::load(model_config, batch_config, gen_config).await {
            Ok(registry) => {
                let _ = cell.set(Arc::new(registry));
                reporter.set_service_status(INFERENCE_SERVICE, ServingStatus::Serving).await;
                reporter.set_service_status("", ServingStatus::Serving).await;
                info!("all models loaded and warmed; SERVING");
            }
            Err(err) => {
                error!(error = %err, "model loading failed");
                let _ = failed_tx.send(err);
            }
        }
    });

    // Nagle's algorithm holds small responses back for the peer's delayed ACK (40 ms and more per
    // call); a request-response protocol wants every frame out at once.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .layer(deadline::DeadlineLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::select! {
        result = server => Ok(result?),
        Ok(err) = failed_rx => Err(err.into()),
    }
}
