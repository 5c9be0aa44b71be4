//! The gRPC front: the only module that imports tonic and the generated code. It builds the services
//! (omnibus.v1.Inference, grpc.health.v1.Health, reflection v1 and v1alpha), starts model loading in the
//! background (health says NOT_SERVING until every model is loaded and warmed), serves the metrics
//! listener, and on shutdown drains: health NOT_SERVING, new calls UNAVAILABLE, running calls finish
//! within the grace period, what is left then ends with UNAVAILABLE.
mod calls;
pub(crate) mod codec;
mod conn;
mod convert;
mod deadline;
mod drain;
mod edge;
mod generate;
mod infer;
mod metrics_http;
mod models;
pub mod oip;
pub mod pb;
mod predict;
mod repository;
mod status;
mod tokenize;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

pub use convert::PRIORITY_HEADER;
pub use edge::REQUEST_ID;
pub use status::{RETRY_INFO_TYPE, ServeError, retry_delay};

use self::calls::Calls;
use crate::config::{ServeConfig, TlsFiles};
use crate::registry::{Registry, RegistryError};

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
    #[error("reading {path}: {source}")]
    TlsFile { path: String, source: std::io::Error },
}

/// omnibus.v1.Inference; answers UNAVAILABLE until the models are loaded and once the server drains.
#[derive(Clone)]
struct InferenceService {
    registry: Arc<OnceLock<Arc<Registry>>>,
    calls: Arc<Calls>,
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
        self.calls.unary("Predict", predict::predict(registry, &self.calls, request)).await
    }

    type GenerateStream = generate::GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let registry = self.registry()?;
        generate::generate(registry, &self.calls, request).await
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let registry = self.registry()?;
        self.calls.unary("Tokenize", tokenize::tokenize(registry, &self.calls, request)).await
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let registry = self.registry()?;
        Ok(Response::new(models::list(&registry)))
    }
}

/// After the drain, how long tonic may take to close connections (clients holding idle streams, such as
/// health watches, would otherwise keep it open) before the server stops anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

fn read(path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::TlsFile { path: path.display().to_string(), source })
}

fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig, ServerError> {
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(tls)
}

/// Liveness that sees the engines: while any model thread has shown no life for `timeout`, health is
/// NOT_SERVING for the whole server (the liveness probe's service) and the inference service, so
/// Kubernetes restarts the pod; if the thread comes back before that, so does SERVING.
async fn watch_engines(
    registry: Arc<OnceLock<Arc<Registry>>>,
    reporter: tonic_health::server::HealthReporter,
    calls: Arc<Calls>,
    timeout: Duration,
) {
    let mut was_stalled = false;
    let every = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        let Some(registry) = registry.get() else { continue };
        let stalled = registry.stalled(timeout);
        let names = registry.embedders().into_iter().map(|s| s.stable.name.clone());
        let names = names.chain(registry.generators().into_iter().map(|s| s.stable.name.clone()));
        for name in names {
            let on = stalled.iter().any(|(n, _)| *n == name);
            crate::metrics::ENGINE_STALLED.with(&[&name]).set(on as i64);
        }
        if !stalled.is_empty() && !was_stalled {
            let which: Vec<String> = stalled.iter().map(|(n, d)| format!("{n} ({} s)", d.as_secs())).collect();
            error!(models = %which.join(", "), "model thread stalled past --engine-stall-timeout; NOT_SERVING");
            reporter.set_service_status("", ServingStatus::NotServing).await;
            reporter.set_service_status(INFERENCE_SERVICE, ServingStatus::NotServing).await;
        } else if stalled.is_empty() && was_stalled && !calls.is_draining() {
            info!("model threads are alive again; SERVING");
            reporter.set_service_status(INFERENCE_SERVICE, ServingStatus::Serving).await;
            reporter.set_service_status("", ServingStatus::Serving).await;
        }
        was_stalled = !stalled.is_empty();
    }
}

/// Serves on `listener` (and metrics on `metrics`) until `shutdown` resolves and the drain is over.
/// Fails when the models cannot be loaded.
pub async fn serve(
    config: ServeConfig,
    listener: TcpListener,
    metrics: Option<TcpListener>,
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

    let sc = config.server.clone();
    let cell = Arc::new(OnceLock::new());
    let calls = Calls::new(sc.shutdown_grace);
    let inference = InferenceServer::new(InferenceService { registry: cell.clone(), calls: calls.clone() })
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(sc.max_message_size)
        .max_encoding_message_size(sc.max_message_size);

    let oip = oip::GrpcInferenceServiceServer::new(oip::OipService {
        registry: cell.clone(),
        calls: calls.clone(),
        model_control: sc.model_control,
        max_message_size: sc.max_message_size,
    })
    .accept_compressed(CompressionEncoding::Gzip)
    .send_compressed(CompressionEncoding::Gzip)
    .max_decoding_message_size(sc.max_message_size)
    .max_encoding_message_size(sc.max_message_size);

    if let Some(metrics) = metrics {
        tokio::spawn(metrics_http::serve(metrics, cell.clone()));
    }

    if let Some(timeout) = sc.engine_stall_timeout {
        tokio::spawn(watch_engines(cell.clone(), reporter.clone(), calls.clone(), timeout));
    }

    // Models load while the server already answers health checks (NOT_SERVING), as startup probes expect.
    let (failed_tx, failed_rx) = oneshot::channel::<RegistryError>();
    let (model_config, batch_config, gen_config) =
        (config.model.clone(), config.batch.clone(), config.generate.clone());
    let loading_reporter = reporter.clone();
    let loading = tokio::spawn(async move {
        match Registry::load(model_config, batch_config, gen_config).await {
            Ok(registry) => {
                let _ = cell.set(Arc::new(registry));
                loading_reporter.set_service_status(INFERENCE_SERVICE, ServingStatus::Serving).await;
                loading_reporter.set_service_status("", ServingStatus::Serving).await;
                info!("all models loaded and warmed; SERVING");
            }
            Err(err) => {
                error!(error = %err, "model loading failed");
                let _ = failed_tx.send(err);
            }
        }
    });

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(drain::on(shutdown, loading, reporter, calls.clone(), stop_tx));

    let incoming = conn::incoming(
        listener,
        conn::ConnLimits { handshake_timeout: sc.handshake_timeout, idle_timeout: sc.idle_timeout },
    );
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(sc.max_concurrent_streams)
        // HTTP/2's own header limit is set far above ours (the edge layer's --max-header-bytes): over it,
        // h2 refuses the stream with HTTP 431 (UNKNOWN to gRPC clients), and at 4x it closes the whole
        // connection (ENHANCE_YOUR_CALM) with every other call on it.
        .http2_max_header_list_size(sc.max_header_bytes.saturating_mul(4).max(1 << 20).min(u32::MAX as usize) as u32)
        .http2_keepalive_interval(sc.keepalive_interval)
        .http2_keepalive_timeout(Some(sc.keepalive_timeout))
        .max_connection_age_grace(sc.max_connection_age_grace);
    if let Some(age) = sc.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    if let Some(files) = &sc.tls {
        builder = builder.tls_config(tls_config(files)?)?;
    }
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let server = builder
        .layer(edge::EdgeLayer { max_message_size: sc.max_message_size, max_header_bytes: sc.max_header_bytes })
        .layer(deadline::DeadlineLayer { default: sc.request_timeout, stream_default: sc.stream_timeout })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .add_service(oip)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_rx.await;
            let _ = stopped_tx.send(true);
        });
    let mut stopped = stopped_rx.clone();
    let close_deadline = async move {
        let _ = stopped.wait_for(|s| *s).await;
        tokio::time::sleep(CLOSE_TIMEOUT).await;
    };
    tokio::select! {
        result = server => Ok(result?),
        Ok(err) = failed_rx => Err(err.into()),
        _ = close_deadline => {
            warn!("connections still open {CLOSE_TIMEOUT:?} after the drain; stopping anyway");
            Ok(())
        }
    }
}
