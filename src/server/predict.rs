//! The Predict RPC: resolve the model, validate and tokenize off the runtime, queue, answer. The batch's
//! figures are in the response body and, for proxies and logs, in response headers.
use std::sync::Arc;

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::calls::{Calls, Outcome};
use super::status::ServeError;
use super::{convert, deadline, pb};
use crate::batcher::{Embedded, Priority};
use crate::registry::{EmbeddingModel, Registry};
use crate::validate::{self, PredictParams};

/// What every embedding call does once its model and parameters are known, whichever API it came in
/// by: validate and tokenize off the runtime's workers (CPU work), count the tokens, queue, wait.
/// Returns the batch's answer and the request's token count.
pub(super) async fn embed(
    model: &EmbeddingModel,
    params: PredictParams,
    deadline: Option<Instant>,
    priority: Priority,
) -> Result<(Embedded, u32), ServeError> {
    let (tokenizer, limits) = (model.tokenizer.clone(), model.limits.clone());
    // Announced before tokenizing, so that a batch about to start waits for it.
    let replica = model.batcher.pick().clone();
    let announced = replica.announce();
    let valid = tokio::task::spawn_blocking(move || validate::predict(params, &limits, &tokenizer))
        .await
        .map_err(|e| ServeError::Internal(format!("tokenization task: {e}")))??;
    let prompt_tokens = valid.tokens() as u32;
    crate::metrics::PROMPT_TOKENS.with(&[&model.name]).add(prompt_tokens as i64);
    Ok((replica.embed(valid, deadline, priority, Some(announced)).await?, prompt_tokens))
}

/// The model name used in metrics for calls whose model could not be resolved.
pub(super) const UNKNOWN_MODEL: &str = "unknown";

pub(super) async fn predict(
    registry: Arc<Registry>,
    calls: &Arc<Calls>,
    request: Request<pb::PredictRequest>,
) -> Result<Response<pb::PredictResponse>, Status> {
    let deadline = deadline::of(&request);
    let mut outcome = Outcome::new(calls, "Predict", deadline);
    let priority = convert::priority(request.get_ref().priority, request.metadata());
    let req = request.into_inner();
    let model = match registry.embedder(&req.model) {
        Ok(m) => m,
        Err(e) => {
            outcome.set_model(UNKNOWN_MODEL.into());
            return Err(outcome.fail(e.into()));
        }
    };
    outcome.set_served(model.name.clone(), model.version);
    let result = async move {
        let priority = priority?;
        let params = convert::predict_params(req)?;
        let (out, prompt_tokens) = embed(&model, params, deadline, priority).await?;
        let mut response = Response::new(pb::PredictResponse {
            outputs: out.vectors.into_iter().map(|values| pb::Embedding { values }).collect(),
            metadata: Some(pb::PredictMetadata {
                batch_size: out.batch_size as u32,
                queue_time_us: out.queue_time.as_micros() as u64,
                inference_time_us: out.inference_time.as_micros() as u64,
                prompt_tokens,
                model: model.name.to_string(),
                batch_requests: out.batch_requests as u32,
                model_version: model.version.to_string(),
            }),
        });
        let md = response.metadata_mut();
        md.insert("x-omnibus-queue-time-us", (out.queue_time.as_micros() as u64).into());
        md.insert("x-omnibus-inference-time-us", (out.inference_time.as_micros() as u64).into());
        md.insert("x-omnibus-batch-size", (out.batch_size as u64).into());
        Ok::<_, ServeError>(response)
    }
    .await;
    match result {
        Ok(response) => {
            outcome.ok();
            Ok(response)
        }
        Err(e) => Err(outcome.fail(e)),
    }
}
