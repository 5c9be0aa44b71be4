//! Text to token ids for embedding models, with the model's length limit applied as the request asks.
//! Callers run it off the async runtime's workers (it is CPU work). [`gguf`] builds a generation model's
//! tokenizer from its GGUF metadata and detokenizes incrementally.
pub mod chat;
pub mod gguf;

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// Which end of an over-long input to cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Keep everything; the caller rejects inputs over the limit.
    None,
    /// Keep the start (sentence-transformers' behaviour).
    Right,
    /// Keep the end.
    Left,
}

/// One tokenizer per truncation mode: `tokenizers` keeps truncation as configuration rather than a call
/// argument, and three small copies are cheaper than a lock around one mutable instance.
pub struct TextTokenizer {
    plain: Tokenizer,
    right: Tokenizer,
    left: Tokenizer,
    max_tokens: usize,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; truncation cuts to `max_tokens`, special tokens included.
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<Self, TokenizerError> {
        let load_err = |reason: String| TokenizerError::Load { path: path.display().to_string(), reason };
        let mut plain = Tokenizer::from_file(path).map_err(|e| load_err(e.to_string()))?;
        // tokenizer.json files often carry the exporter's padding and truncation; the batcher pads and
        // the request decides truncation, so both are cleared.
        plain.with_padding(None);
        plain.with_truncation(None).map_err(|e| load_err(e.to_string()))?;
        let with = |direction| -> Result<Tokenizer, TokenizerError> {
            let mut t = plain.clone();
            t.with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                direction,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| load_err(e.to_string()))?;
            Ok(t)
        };
        let right = with(TruncationDirection::Right)?;
        let left = with(TruncationDirection::Left)?;
        Ok(Self { plain, right, left, max_tokens })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids with the model's special tokens ([CLS] ... [SEP] for BERT).
    pub fn encode(&self, text: &str, truncation: Truncation) -> Result<Vec<u32>, TokenizerError> {
        let t = match truncation {
            Truncation::None => &self.plain,
            Truncation::Right => &self.right,
            Truncation::Left => &self.left,
        };
        let enc = t.encode(text, true).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of a minimal input (just the special tokens), for warm-up passes.
    pub fn minimal(&self) -> Result<Vec<u32>, TokenizerError> {
        self.encode("", Truncation::None)
    }
}
