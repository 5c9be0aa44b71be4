//! The call path both APIs share (omnibus.v1 and the Open Inference Protocol): once a handler has
//! resolved its model and parsed its parameters, embedding and generation run here, and every stream
//! runs through one lifecycle, [`stream`]: the call's deadline, the grace period's cut, and one
//! recorded outcome. The handlers only translate messages.
use std::sync::Arc;

use tokio::time::Instant;

use super::calls::{CallGuard, CallStream, Calls, Inner, Outcome};
use super::status::ServeError;
use crate::batcher::generate::GenStream;
use crate::batcher::{Embedded, Priority};
use crate::registry::{EmbeddingModel, GenerationModel};
use crate::validate::{self, GenerateParams, PredictParams};

/// The model name used in metrics for calls whose model could not be resolved.
pub(super) const UNKNOWN_MODEL: &str = "unknown";

/// Validates and tokenizes off the runtime's workers (CPU work), counts the tokens, queues, waits.
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

/// Validates, renders and tokenizes off the runtime's workers, then queues. Tokens arrive on the
/// returned stream; dropping it frees the sequence before its next step.
pub(super) async fn generate(
    model: &Arc<GenerationModel>,
    params: GenerateParams,
    deadline: Option<Instant>,
    priority: Priority,
) -> Result<GenStream, ServeError> {
    let m = model.clone();
    let valid =
        tokio::task::spawn_blocking(move || validate::generate(params, &m.limits, &m.tokenizer, m.template.as_deref()))
            .await
            .map_err(|e| ServeError::Internal(format!("tokenization task: {e}")))??;
    Ok(model.batcher.generate(valid, deadline, priority).await?)
}

/// Every response stream's lifecycle, whichever API: it holds the call's place in the in-flight count
/// (`guard`), ends with DEADLINE_EXCEEDED at the call's deadline or UNAVAILABLE when the grace period
/// ends, and records `outcome` once, with the reason its error carries.
pub(super) fn stream<T: Send + 'static>(
    calls: &Arc<Calls>,
    guard: CallGuard,
    outcome: Outcome,
    messages: Inner<T>,
) -> CallStream<T> {
    CallStream::new(calls, guard, outcome, messages)
}
