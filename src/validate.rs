//! Parse, don't validate: untrusted request fields become `Valid*` types here, in one place, or a
//! [`ValidationError`] that names the field, the bound and the given value. Later layers take only
//! `Valid*` types. No tonic here: `server::convert` hands over plain fields.
use crate::tokenizer::{TextTokenizer, TokenizerError, Truncation};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("model: no {kind} model named {name:?} is loaded (loaded: {loaded})")]
    UnknownModel { kind: &'static str, name: String, loaded: String },
    #[error("{field}: unknown enum value {value}")]
    UnknownEnum { field: &'static str, value: i32 },
    #[error("inputs: at least 1 input is required, got 0")]
    NoInputs,
    #[error("inputs: at most {max} inputs per request (the model's max_batch_size), got {got}")]
    TooManyInputs { max: usize, got: usize },
    #[error("inputs[{index}]: must be a non-empty string, got \"\"")]
    EmptyInput { index: usize },
    #[error(
        "inputs[{index}]: {tokens} tokens is above the model's max_input_tokens of {max}; shorten it or set \
         truncate=true"
    )]
    TooManyTokens { index: usize, tokens: usize, max: usize },
    #[error(
        "inputs: {inputs} inputs padded to the longest ({longest} tokens) make {total} tokens, above the \
         model's max_batch_tokens of {max}; send fewer or shorter inputs per request"
    )]
    TooManyBatchTokens { inputs: usize, longest: usize, total: usize, max: usize },
    #[error("inputs[{index}]: {source}")]
    Tokenizer {
        index: usize,
        #[source]
        source: TokenizerErrorEq,
    },
}

/// [`TokenizerError`] by message, so that [`ValidationError`] stays comparable in tests.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct TokenizerErrorEq(String);

impl From<TokenizerError> for TokenizerErrorEq {
    fn from(e: TokenizerError) -> Self {
        Self(e.to_string())
    }
}

/// A Predict request's fields, as the wire gave them (enums already mapped).
#[derive(Debug, Clone)]
pub struct PredictParams {
    pub inputs: Vec<String>,
    pub truncate: bool,
    pub direction: Truncation,
    pub normalize: Option<bool>,
}

/// The limits a Predict request is checked against: the model's and the batcher's.
#[derive(Debug, Clone)]
pub struct PredictLimits {
    pub max_inputs: usize,
    pub max_input_tokens: usize,
    pub max_batch_tokens: usize,
    /// What an unset `normalize` means for this model.
    pub default_normalize: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidInput {
    /// Token ids, special tokens included, within the model's limit.
    pub ids: Vec<u32>,
}

/// A Predict request that fits every limit of its model.
#[derive(Debug, Clone)]
pub struct ValidPredict {
    pub inputs: Vec<ValidInput>,
    pub normalize: bool,
}

impl ValidPredict {
    pub fn longest(&self) -> usize {
        self.inputs.iter().map(|i| i.ids.len()).max().unwrap_or(0)
    }

    pub fn tokens(&self) -> usize {
        self.inputs.iter().map(|i| i.ids.len()).sum()
    }
}

/// Checks the request's shape, tokenizes it and checks it against the model's limits. CPU work: call it
/// off the async runtime's workers.
pub fn predict(
    params: PredictParams,
    limits: &PredictLimits,
    tokenizer: &TextTokenizer,
) -> Result<ValidPredict, ValidationError> {
    let n = params.inputs.len();
    if n == 0 {
        return Err(ValidationError::NoInputs);
    }
    if n > limits.max_inputs {
        return Err(ValidationError::TooManyInputs { max: limits.max_inputs, got: n });
    }
    if let Some(index) = params.inputs.iter().position(String::is_empty) {
        return Err(ValidationError::EmptyInput { index });
    }
    let truncation = if params.truncate { params.direction } else { Truncation::None };
    let mut inputs = Vec::with_capacity(n);
    for (index, text) in params.inputs.iter().enumerate() {
        let ids =
            tokenizer.encode(text, truncation).map_err(|e| ValidationError::Tokenizer { index, source: e.into() })?;
        if ids.len() > limits.max_input_tokens {
            return Err(ValidationError::TooManyTokens { index, tokens: ids.len(), max: limits.max_input_tokens });
        }
        inputs.push(ValidInput { ids });
    }
    let valid = ValidPredict { inputs, normalize: params.normalize.unwrap_or(limits.default_normalize) };
    let longest = valid.longest();
    let total = n * longest;
    if total > limits.max_batch_tokens {
        return Err(ValidationError::TooManyBatchTokens { inputs: n, longest, total, max: limits.max_batch_tokens });
    }
    Ok(valid)
}
