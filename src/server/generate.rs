//! The Generate RPC: resolve the model, start it through [`infer::generate`], and stream the scheduler's
//! events as messages, through [`infer::stream`]'s lifecycle. The stream is the receiver: a client that
//! hangs up drops it, and the scheduler frees the sequence before its next step.
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::calls::{Calls, Outcome};
use super::infer::{self, UNKNOWN_MODEL};
use super::status::ServeError;
use super::{convert, deadline, pb};
use crate::batcher::generate::GenEvent;
use crate::engine::Finish;
use crate::registry::{GenerationModel, Registry};

pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

const METHOD: &str = "Generate";

pub(super) async fn generate(
    registry: Arc<Registry>,
    calls: &Arc<Calls>,
    request: Request<pb::GenerateRequest>,
) -> Result<Response<GenerateStream>, Status> {
    let deadline = deadline::of(&request);
    let mut outcome = Outcome::new(calls, METHOD, deadline);
    let guard = match calls.enter() {
        Ok(g) => g,
        Err(e) => return Err(outcome.fail(e)),
    };
    let priority = convert::priority(request.get_ref().priority, request.metadata());
    let req = request.into_inner();
    let model = match registry.generator(&req.model) {
        Ok(m) => m,
        Err(e) => {
            outcome.set_model(UNKNOWN_MODEL.into());
            return Err(outcome.fail(e.into()));
        }
    };
    outcome.set_served(model.name.clone(), model.version);
    let queued = async { infer::generate(&model, convert::generate_params(req), deadline, priority?).await };
    let events = match queued.await {
        Ok(events) => events,
        Err(e) => return Err(outcome.fail(e)),
    };
    // The stream owns the model version's `Arc`: a version swapped out mid-stream stays loaded until
    // this stream's last token.
    let stream = tokio_stream::wrappers::ReceiverStream::new(events).map(move |event| match event {
        Ok(event) => Ok(to_message(event, &model)),
        Err(err) => Err(ServeError::from(err)),
    });
    let stream = infer::stream(calls, guard, outcome, Box::pin(stream));
    Ok(Response::new(Box::pin(stream)))
}

/// A token's own text (a control token: its name); part of a UTF-8 character shows as U+FFFD.
fn token_text(model: &GenerationModel, id: u32) -> String {
    let bytes = model.tokenizer.token_bytes(id);
    if bytes.is_empty() {
        model.tokenizer.token_text(id).unwrap_or_default().to_string()
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

fn alternatives(model: &GenerationModel, top: Vec<(u32, f32)>) -> Vec<pb::TokenLogprob> {
    top.into_iter().map(|(id, logprob)| pb::TokenLogprob { id, text: token_text(model, id), logprob }).collect()
}

fn to_message(event: GenEvent, model: &GenerationModel) -> pb::GenerateResponse {
    use pb::generate_response::Kind;
    let kind = match event {
        GenEvent::PromptLogprobs(positions) => Kind::PromptLogprobs(pb::PromptLogprobs {
            positions: positions
                .into_iter()
                .map(|p| pb::TokenLogprobs {
                    id: p.id,
                    text: token_text(model, p.id),
                    logprob: p.logprob,
                    top: alternatives(model, p.top),
                })
                .collect(),
        }),
        GenEvent::Token { id, text, logprob, index, top } => {
            Kind::Token(pb::Token { id, text, logprob, index, top_logprobs: alternatives(model, top) })
        }
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
                model: model.name.to_string(),
                model_version: model.version.to_string(),
            })
        }
    };
    pb::GenerateResponse { kind: Some(kind) }
}
