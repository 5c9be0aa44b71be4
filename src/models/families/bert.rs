//! The BERT family's admission to the shared encoder (`models::bert`, `models::bert_packed`).
use crate::models::bert::BertConfig;

/// BERT with absolute position embeddings. Relative position schemes change attention itself, so they
/// are refused rather than run as absolute.
pub(super) fn check(config: &BertConfig) -> Result<(), String> {
    match config.position_embedding_type.as_deref() {
        None | Some("absolute") => Ok(()),
        Some(other) => Err(format!("position_embedding_type {other:?} is not supported (supported: absolute)")),
    }
}
