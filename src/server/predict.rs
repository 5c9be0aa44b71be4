//! The Predict RPC: resolve the model, validate and tokenize off the runtime, queue, answer.
use std::sync::Arc;

use tonic::{Request, Response};

use super::status::ServeError;
use super::{convert, deadline, pb};
use crate::registry::Registry;
use crate::validate;

pub(super) async fn predict(
    registry: Arc<Registry>,
    request: Request<pb::PredictRequest>,
) -> Result<Response<pb::PredictResponse>, ServeError> {
    let deadline = deadline::of(&request);
    let req = request.into_inner();
    let model = registry.embedder(&req.model)?;
    let params = convert::predict_params(req)?;
    let (tokenizer, limits) = (model.tokenizer.clone(), model.limits.clone());
    // Tokenization is CPU work: keep it off the runtime's workers.
    let valid = tokio::task::spawn_blocking(move || validate::predict(params, &limits, &tokenizer))
        .await
        .map_err(|e| ServeError::Internal(format!("tokenization task: {e}")))??;
    let prompt_tokens = valid.tokens() as u32;
    let out = model.batcher.embed(valid, deadline).await?;
    Ok(Response::new(pb::PredictResponse {
        outputs: out.vectors.into_iter().map(|values| pb::Embedding { values }).collect(),
        metadata: Some(pb::PredictMetadata {
            batch_size: out.batch_size as u32,
            queue_time_us: out.queue_time.as_micros() as u64,
            inference_time_us: out.inference_time.as_micros() as u64,
            prompt_tokens,
            model: model.name.to_string(),
            batch_requests: out.batch_requests as u32,
        }),
    }))
}
