//! The Predict RPC: resolve the model, parse the message, run it through [`infer::embed`], answer. The batch's
//! figures are in the response body and, for proxies and logs, in response headers.
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::calls::{Calls, Outcome};
use super::infer::{self, UNKNOWN_MODEL};
use super::status::ServeError;
use super::{convert, deadline, pb};
use crate::registry::Registry;

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
        let (out, prompt_tokens) = infer::embed(&model, params, deadline, priority).await?;
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
