//! The Tokenize RPC: a text's token ids and pieces under any loaded model's tokenizer (embedding or
//! generation), tokenized off the runtime's workers, its length bounded like every other input.
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::calls::{Calls, Outcome};
use super::infer::UNKNOWN_MODEL;
use super::pb;
use super::status::ServeError;
use crate::registry::{AnyModel, Registry};
use crate::validate;

const METHOD: &str = "Tokenize";

pub(super) async fn tokenize(
    registry: Arc<Registry>,
    calls: &Arc<Calls>,
    request: Request<pb::TokenizeRequest>,
) -> Result<Response<pb::TokenizeResponse>, Status> {
    let deadline = super::deadline::of(&request);
    let mut outcome = Outcome::new(calls, METHOD, deadline);
    let req = request.into_inner();
    // An empty name: the default generation model (counting prompt tokens is the common use), else the
    // default embedding model.
    let name = match req.model.as_str() {
        "" => registry.default_generator().or_else(|| registry.default_embedder()).unwrap_or_default(),
        n => n.to_string(),
    };
    let model = match registry.model_at(&name, None) {
        Ok(m) => m,
        Err(e) => {
            outcome.set_model(UNKNOWN_MODEL.into());
            return Err(outcome.fail(e.into()));
        }
    };
    let (text, special) = (req.text, req.add_special_tokens);
    let work = match model {
        AnyModel::Embedding(m) => {
            outcome.set_served(m.name.clone(), m.version);
            let window = m.tokenizer.max_tokens();
            tokio::task::spawn_blocking(move || {
                validate::tokenize_text(&text, window)?;
                m.tokenizer.tokenize(&text, special).map_err(|e| ServeError::Internal(e.to_string()))
            })
        }
        AnyModel::Generation(m) => {
            outcome.set_served(m.name.clone(), m.version);
            let window = m.limits.context_length;
            tokio::task::spawn_blocking(move || {
                validate::tokenize_text(&text, window)?;
                m.tokenizer.tokenize(&text, special).map_err(|e| ServeError::Internal(e.to_string()))
            })
        }
    };
    match work.await.map_err(|e| ServeError::Internal(format!("tokenization task: {e}"))) {
        Ok(Ok(tokens)) => {
            outcome.ok();
            let (ids, pieces) = tokens.into_iter().unzip();
            Ok(Response::new(pb::TokenizeResponse { ids, pieces }))
        }
        Ok(Err(e)) | Err(e) => Err(outcome.fail(e)),
    }
}
