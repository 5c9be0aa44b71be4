//! The Generate RPC: resolve the model, validate, render and tokenize off the runtime, queue, and stream
//! the scheduler's events as messages. The stream is the receiver: a client that hangs up drops it, and
//! the scheduler frees the sequence before its next step.
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::status::ServeError;
use super::{convert, deadline, pb};
use crate::batcher::generate::GenEvent;
use crate::engine::Finish;
use crate::registry::Registry;
use crate::validate;

pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

pub(super) async fn generate(
    registry: Arc<Registry>,
    request: Request<pb::GenerateRequest>,
) -> Result<Response<GenerateStream>, ServeError> {
    let deadline = deadline::of(&request);
    let req = request.into_inner();
    let model = registry.generator(&req.model)?;
    let params = convert::generate_params(req);
    let m = model.clone();
    let valid =
        tokio::task::spawn_blocking(move || validate::generate(params, &m.limits, &m.tokenizer, m.template.as_deref()))
            .await
            .map_err(|e| ServeError::Internal(format!("tokenization task: {e}")))??;
    let events = model.batcher.generate(valid, deadline).await?;
    let name = model.name.to_string();
    let stream = tokio_stream::wrappers::ReceiverStream::new(events).map(move |event| match event {
        Ok(event) => Ok(to_message(event, &name)),
        Err(err) => Err(Status::from(ServeError::from(err))),
    });
    Ok(Response::new(Box::pin(stream)))
}

fn to_message(event: GenEvent, model: &str) -> pb::GenerateResponse {
    use pb::generate_response::Kind;
    let kind = match event {
        GenEvent::Token { id, text, logprob, index } => Kind::Token(pb::Token { id, text, logprob, index }),
        GenEvent::End { finish, stop, prompt_tokens, completion_tokens, queue_time, time_to_first_token, total } => {
            let finish_reason = match finish {
                Finish::Length => pb::FinishReason::Length,
                Finish::StopSequence => pb::FinishReason::StopSequence,
                Finish::EndOfSequence => pb::FinishReason::EndOfSequence,
            };
            Kind::End(pb::GenerateEnd {
                finish_reason: finish_reason.into(),
                usage: Some(pb::Usage { prompt_tokens, completion_tokens }),
                timings: Some(pb::GenerateTimings {
                    queue_time_us: queue_time.as_micros() as u64,
                    time_to_first_token_us: time_to_first_token.as_micros() as u64,
                    total_time_us: total.as_micros() as u64,
                }),
                stop_sequence: stop.unwrap_or_default(),
                model: model.to_string(),
            })
        }
    };
    pb::GenerateResponse { kind: Some(kind) }
}
