//! Parse, don't validate: untrusted request fields become `Valid*` types here, in one place, or a
//! [`ValidationError`] that names the field, the bound and the given value. Later layers take only
//! `Valid*` types. No tonic here: `server::convert` hands over plain fields.
use crate::tokenizer::chat::ChatTemplate;
use crate::tokenizer::gguf::GgufTokenizer;
use crate::tokenizer::{MAX_BYTES_PER_TOKEN, TextTokenizer, TokenizerError, Truncation};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ValidationError {
    #[error("model: no {}model named {name:?} is loaded (loaded: {loaded})", kind_label(.kind))]
    /// `kind` is "embedding" or "generation", or empty when a model of either kind would do.
    UnknownModel { kind: &'static str, name: String, loaded: String },
    #[error("model_version: model {name:?} serves no version {version} (serving: {serving})")]
    UnknownVersion { name: String, version: u64, serving: String },
    #[error("{field}: unknown enum value {value}")]
    UnknownEnum { field: &'static str, value: i32 },
    #[error("{header}: expected {expected}, got {got:?}")]
    BadHeader { header: &'static str, expected: &'static str, got: String },
    /// An Open Inference Protocol tensor or parameter that is not what the model takes.
    #[error("{field}: expected {expected}, got {got}")]
    Tensor { field: String, expected: String, got: String },
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
        "inputs: {inputs} inputs make {total} tokens, above the model's max_batch_tokens of {max}; send fewer \
         or shorter inputs per request"
    )]
    TooManyBatchTokens { inputs: usize, total: usize, max: usize },
    #[error(
        "{field}: {bytes} bytes is more text than this model reads ({max_tokens} tokens, at most {max_bytes} bytes \
         are tokenized); {hint}"
    )]
    TooManyBytes { field: String, bytes: usize, max_bytes: usize, max_tokens: usize, hint: &'static str },
    #[error("prompt, messages: exactly one must be set, got {0}")]
    PromptOrMessages(&'static str),
    #[error("max_new_tokens: must be between 1 and {max}, got {got}")]
    MaxNewTokens { max: usize, got: u64 },
    #[error(
        "max_new_tokens: the prompt's {prompt} tokens plus max_new_tokens {new} make {total}, above the model's \
         context length of {max}"
    )]
    ContextOverflow { prompt: usize, new: usize, total: usize, max: usize },
    #[error("sampling.temperature: must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("sampling.top_p: must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("sampling.repetition_penalty: must be a finite number > 0, got {0}")]
    RepetitionPenalty(f32),
    #[error("messages[{index}].role: must be one of system, user, assistant, tool; got {role:?}")]
    UnknownRole { index: usize, role: String },
    #[error("stop: at most {max} stop sequences, got {got}")]
    TooManyStops { max: usize, got: usize },
    #[error("stop[{index}]: must be 1 to {max} bytes long, got {got}")]
    StopLength { index: usize, max: usize, got: usize },
    #[error("{field}: at most {max} alternatives per position, got {got}")]
    TooManyLogprobs { field: &'static str, max: usize, got: u32 },
    #[error("messages: {0}")]
    ChatTemplate(String),
    #[error("prompt: {source}")]
    PromptTokenizer {
        #[source]
        source: TokenizerErrorEq,
    },
    #[error("inputs[{index}]: {source}")]
    Tokenizer {
        index: usize,
        #[source]
        source: TokenizerErrorEq,
    },
}

/// "embedding " for "embedding", nothing for no kind: the word before "model" in an error.
fn kind_label(kind: &str) -> String {
    if kind.is_empty() { String::new() } else { format!("{kind} ") }
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
    // Refused before any tokenizing: text this long cannot fit the window (see MAX_BYTES_PER_TOKEN). With
    // truncation, the tokenizer reads only the part it keeps.
    if truncation == Truncation::None
        && let Some((index, text)) = params.inputs.iter().enumerate().find(|(_, t)| t.len() > tokenizer.max_bytes())
    {
        return Err(ValidationError::TooManyBytes {
            field: format!("inputs[{index}]"),
            bytes: text.len(),
            max_bytes: tokenizer.max_bytes(),
            max_tokens: limits.max_input_tokens,
            hint: "shorten it or set truncate=true",
        });
    }
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
    // Batches are packed, not padded: a request costs the sum of its inputs' tokens.
    let total = valid.tokens();
    if total > limits.max_batch_tokens {
        return Err(ValidationError::TooManyBatchTokens { inputs: n, total, max: limits.max_batch_tokens });
    }
    Ok(valid)
}

/// A Tokenize request's text: at most what the model can read (64 bytes per token of its window), so
/// the CPU a call can buy stays bounded.
pub fn tokenize_text(text: &str, max_tokens: usize) -> Result<(), ValidationError> {
    let max_bytes = max_tokens.saturating_mul(MAX_BYTES_PER_TOKEN);
    if text.len() > max_bytes {
        return Err(ValidationError::TooManyBytes {
            field: "text".into(),
            bytes: text.len(),
            max_bytes,
            max_tokens,
            hint: "send it in parts",
        });
    }
    Ok(())
}

/// The most stop sequences a request may carry, and their longest length in bytes: both bound the
/// work of matching them against every generated token.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// The most alternatives a position's log-probabilities may list (OpenAI's and vLLM's bound).
pub const MAX_LOGPROBS: usize = 20;
const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// A Generate request's fields, as the wire gave them.
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    pub prompt: String,
    /// (role, content)
    pub messages: Vec<(String, String)>,
    /// As sent (the Open Inference Protocol's `max_tokens` is 64-bit): checked against the limit, never
    /// clamped, so an error names the value the client sent.
    pub max_new_tokens: u64,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub logprobs: bool,
    /// Alternatives per prompt position (0: no prompt log-probabilities).
    pub prompt_logprobs: u32,
    /// Alternatives per generated token (0: none).
    pub top_logprobs: u32,
}

/// What a Generate request is checked against.
#[derive(Debug, Clone)]
pub struct GenerateLimits {
    pub context_length: usize,
    /// The server's cap on max_new_tokens.
    pub max_new_tokens: usize,
}

/// A Generate request that fits its model.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGenerate {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub logprobs: bool,
    /// Score the prompt: every position's log-probability and this many alternatives (0: off).
    pub prompt_logprobs: usize,
    /// This many alternatives with each generated token (0: none).
    pub top_logprobs: usize,
}

impl ValidGenerate {
    /// KV-cache positions this sequence may need at most.
    pub fn kv_tokens(&self) -> usize {
        self.prompt_ids.len() + self.max_new_tokens
    }
}

/// Checks a Generate request, renders its chat template if any, and tokenizes it. CPU work: call it
/// off the async runtime's workers.
pub fn generate(
    params: GenerateParams,
    limits: &GenerateLimits,
    tokenizer: &GgufTokenizer,
    template: Option<&ChatTemplate>,
) -> Result<ValidGenerate, ValidationError> {
    // Refused before rendering or tokenizing anything: text this long cannot fit the context.
    let max_bytes = limits.context_length.saturating_mul(MAX_BYTES_PER_TOKEN);
    let too_long = |field: &str, bytes: usize| ValidationError::TooManyBytes {
        field: field.into(),
        bytes,
        max_bytes,
        max_tokens: limits.context_length,
        hint: "shorten it",
    };
    let given = params.prompt.len() + params.messages.iter().map(|(r, c)| r.len() + c.len()).sum::<usize>();
    if given > max_bytes {
        return Err(too_long(if params.messages.is_empty() { "prompt" } else { "messages" }, given));
    }
    let text = match (params.prompt.is_empty(), params.messages.is_empty()) {
        (false, false) => return Err(ValidationError::PromptOrMessages("both")),
        (true, true) => return Err(ValidationError::PromptOrMessages("neither (or an empty prompt)")),
        (false, true) => params.prompt,
        (true, false) => {
            if let Some((index, (role, _))) =
                params.messages.iter().enumerate().find(|(_, (r, _))| !ROLES.contains(&r.as_str()))
            {
                return Err(ValidationError::UnknownRole { index, role: role.clone() });
            }
            let template = template.ok_or_else(|| {
                ValidationError::ChatTemplate("this model has no chat template; send a raw prompt instead".into())
            })?;
            template.render(&params.messages).map_err(ValidationError::ChatTemplate)?
        }
    };
    if params.max_new_tokens == 0 || params.max_new_tokens > limits.max_new_tokens as u64 {
        return Err(ValidationError::MaxNewTokens { max: limits.max_new_tokens, got: params.max_new_tokens });
    }
    let t = params.temperature;
    if !t.is_finite() || t < 0.0 {
        return Err(ValidationError::Temperature(t));
    }
    let top_p = params.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ValidationError::TopP(top_p));
    }
    let penalty = params.repetition_penalty.unwrap_or(1.0);
    if !penalty.is_finite() || penalty <= 0.0 {
        return Err(ValidationError::RepetitionPenalty(penalty));
    }
    if params.stop.len() > MAX_STOPS {
        return Err(ValidationError::TooManyStops { max: MAX_STOPS, got: params.stop.len() });
    }
    if let Some((index, s)) = params.stop.iter().enumerate().find(|(_, s)| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(ValidationError::StopLength { index, max: MAX_STOP_BYTES, got: s.len() });
    }
    for (field, got) in [("prompt_logprobs", params.prompt_logprobs), ("top_logprobs", params.top_logprobs)] {
        if got as usize > MAX_LOGPROBS {
            return Err(ValidationError::TooManyLogprobs { field, max: MAX_LOGPROBS, got });
        }
    }
    if text.len() > max_bytes {
        return Err(too_long("messages", text.len()));
    }
    let prompt_ids = tokenizer.encode(&text).map_err(|e| ValidationError::PromptTokenizer { source: e.into() })?;
    if prompt_ids.is_empty() {
        return Err(ValidationError::PromptOrMessages("neither (the prompt has no tokens)"));
    }
    let new = params.max_new_tokens as usize;
    if prompt_ids.len() + new > limits.context_length {
        return Err(ValidationError::ContextOverflow {
            prompt: prompt_ids.len(),
            new,
            total: prompt_ids.len() + new,
            max: limits.context_length,
        });
    }
    Ok(ValidGenerate {
        prompt_ids,
        max_new_tokens: new,
        sampling: Sampling {
            temperature: t,
            top_k: params.top_k as usize,
            top_p,
            repetition_penalty: penalty,
            // Unseeded requests still get a seed, so every sampled stream is reproducible from logs.
            seed: params.seed.unwrap_or_else(random_seed),
        },
        stop: params.stop,
        logprobs: params.logprobs,
        prompt_logprobs: params.prompt_logprobs as usize,
        top_logprobs: params.top_logprobs as usize,
    })
}

/// Sampling settings of one sequence, validated: what the engine's sampler takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no limit.
    pub top_k: usize,
    /// In (0, 1].
    pub top_p: f32,
    /// 1 means off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    //! One test per rule, against the default models' real tokenizers (fetched by `models/fetch.py`,
    //! which the test command runs first).
    use std::path::Path;

    use super::*;

    fn minilm() -> TextTokenizer {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2/tokenizer.json");
        TextTokenizer::from_file(&p, 256).expect("MiniLM's tokenizer: run python3 models/fetch.py")
    }

    fn smollm() -> (GgufTokenizer, ChatTemplate) {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let tok = crate::engine::load_gguf_tokenizer(&p).expect("SmolLM2: run python3 models/fetch.py");
        let source = tok.chat_template.clone().expect("SmolLM2 carries a chat template");
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default().to_string();
        let template = ChatTemplate::new(&source, &text(tok.bos), &text(tok.eos)).unwrap();
        (tok, template)
    }

    fn plimits() -> PredictLimits {
        PredictLimits { max_inputs: 4, max_input_tokens: 256, max_batch_tokens: 300, default_normalize: true }
    }

    fn pparams(inputs: &[&str]) -> PredictParams {
        PredictParams {
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            truncate: false,
            direction: Truncation::Right,
            normalize: None,
        }
    }

    #[test]
    fn predict_rules_name_the_field_the_bound_and_the_value() {
        let tok = minilm();
        let check = |p: PredictParams| predict(p, &plimits(), &tok);
        assert_eq!(check(pparams(&[])).unwrap_err(), ValidationError::NoInputs);
        assert_eq!(check(pparams(&["a"; 5])).unwrap_err(), ValidationError::TooManyInputs { max: 4, got: 5 });
        assert_eq!(check(pparams(&["a", ""])).unwrap_err(), ValidationError::EmptyInput { index: 1 });
        // Far more bytes than the window can hold: refused before any tokenizing.
        let huge = "word ".repeat(tok.max_bytes() / 5 + 1);
        match check(pparams(&["ok", &huge])).unwrap_err() {
            ValidationError::TooManyBytes { field, bytes, max_bytes, .. } => {
                assert_eq!((field.as_str(), bytes, max_bytes), ("inputs[1]", huge.len(), tok.max_bytes()));
            }
            other => panic!("{other:?}"),
        }
        // Within the bytes, over the tokens: named with its count; with truncation it is cut to fit.
        let long = "word ".repeat(300);
        match check(pparams(&[&long])).unwrap_err() {
            ValidationError::TooManyTokens { index: 0, tokens, max: 256 } => assert!(tokens > 256),
            other => panic!("{other:?}"),
        }
        let cut = check(PredictParams { truncate: true, ..pparams(&[&long]) }).unwrap();
        assert_eq!(cut.inputs[0].ids.len(), 256);
        // Two inputs that fit alone but not together in the request's token budget.
        let mid = "word ".repeat(200);
        match check(PredictParams { truncate: true, ..pparams(&[&mid, &mid]) }).unwrap_err() {
            ValidationError::TooManyBatchTokens { inputs: 2, total, max: 300 } => assert!(total > 300),
            other => panic!("{other:?}"),
        }
        // What an unset normalize means comes from the model.
        assert!(check(pparams(&["a sentence"])).unwrap().normalize);
        assert!(!check(PredictParams { normalize: Some(false), ..pparams(&["a sentence"]) }).unwrap().normalize);
    }

    fn glimits() -> GenerateLimits {
        GenerateLimits { context_length: 64, max_new_tokens: 32 }
    }

    fn gparams(prompt: &str) -> GenerateParams {
        GenerateParams { prompt: prompt.into(), max_new_tokens: 8, ..Default::default() }
    }

    #[test]
    fn generate_rules_name_the_field_the_bound_and_the_value() {
        let (tok, template) = smollm();
        let check = |p: GenerateParams| generate(p, &glimits(), &tok, Some(&template));
        let err = |p: GenerateParams| check(p).unwrap_err();
        let msgs = |role: &str| vec![(role.to_string(), "hi".to_string())];
        assert_eq!(
            err(GenerateParams { messages: msgs("user"), ..gparams("x") }),
            ValidationError::PromptOrMessages("both")
        );
        assert!(matches!(err(gparams("")), ValidationError::PromptOrMessages(_)));
        assert_eq!(
            err(GenerateParams { messages: msgs("robot"), ..gparams("") }),
            ValidationError::UnknownRole { index: 0, role: "robot".into() }
        );
        let no_template = generate(GenerateParams { messages: msgs("user"), ..gparams("") }, &glimits(), &tok, None);
        assert!(matches!(no_template, Err(ValidationError::ChatTemplate(_))));
        assert_eq!(
            err(GenerateParams { max_new_tokens: 0, ..gparams("x") }),
            ValidationError::MaxNewTokens { max: 32, got: 0 }
        );
        assert_eq!(
            err(GenerateParams { max_new_tokens: 1 << 40, ..gparams("x") }),
            ValidationError::MaxNewTokens { max: 32, got: 1 << 40 }
        );
        assert!(matches!(
            err(GenerateParams { temperature: f32::NAN, ..gparams("x") }),
            ValidationError::Temperature(_)
        ));
        assert_eq!(err(GenerateParams { temperature: -1.0, ..gparams("x") }), ValidationError::Temperature(-1.0));
        assert_eq!(err(GenerateParams { top_p: Some(0.0), ..gparams("x") }), ValidationError::TopP(0.0));
        assert_eq!(err(GenerateParams { top_p: Some(1.5), ..gparams("x") }), ValidationError::TopP(1.5));
        assert_eq!(
            err(GenerateParams { repetition_penalty: Some(0.0), ..gparams("x") }),
            ValidationError::RepetitionPenalty(0.0)
        );
        let stops = vec!["s".to_string(); MAX_STOPS + 1];
        assert_eq!(
            err(GenerateParams { stop: stops, ..gparams("x") }),
            ValidationError::TooManyStops { max: MAX_STOPS, got: MAX_STOPS + 1 }
        );
        assert_eq!(
            err(GenerateParams { stop: vec!["ok".into(), String::new()], ..gparams("x") }),
            ValidationError::StopLength { index: 1, max: MAX_STOP_BYTES, got: 0 }
        );
        let long_stop = "x".repeat(MAX_STOP_BYTES + 1);
        assert_eq!(
            err(GenerateParams { stop: vec![long_stop], ..gparams("x") }),
            ValidationError::StopLength { index: 0, max: MAX_STOP_BYTES, got: MAX_STOP_BYTES + 1 }
        );
        assert_eq!(
            err(GenerateParams { prompt_logprobs: 21, ..gparams("x") }),
            ValidationError::TooManyLogprobs { field: "prompt_logprobs", max: MAX_LOGPROBS, got: 21 }
        );
        assert_eq!(
            err(GenerateParams { top_logprobs: 99, ..gparams("x") }),
            ValidationError::TooManyLogprobs { field: "top_logprobs", max: MAX_LOGPROBS, got: 99 }
        );
        // More bytes than 64 per token of the context: refused before tokenizing.
        let huge = "a".repeat(64 * MAX_BYTES_PER_TOKEN + 1);
        assert!(matches!(err(gparams(&huge)), ValidationError::TooManyBytes { ref field, .. } if field == "prompt"));
        // The prompt's tokens plus max_new_tokens past the context.
        match err(GenerateParams { max_new_tokens: 32, ..gparams(&"word ".repeat(40)) }) {
            ValidationError::ContextOverflow { new: 32, max: 64, prompt, total } => {
                assert_eq!(total, prompt + 32);
                assert!(total > 64);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_valid_generate_request_keeps_its_settings_and_fills_defaults() {
        let (tok, template) = smollm();
        let v = generate(
            GenerateParams { seed: Some(7), top_k: 5, stop: vec!["\n".into()], ..gparams("Hello") },
            &glimits(),
            &tok,
            Some(&template),
        )
        .unwrap();
        assert_eq!(v.sampling, Sampling { temperature: 0.0, top_k: 5, top_p: 1.0, repetition_penalty: 1.0, seed: 7 });
        assert_eq!((v.max_new_tokens, v.stop.as_slice()), (8, ["\n".to_string()].as_slice()));
        assert_eq!(v.kv_tokens(), v.prompt_ids.len() + 8);
        assert!(!v.prompt_ids.is_empty());
        // An unseeded request still gets a seed, so its stream can be reproduced from the logs.
        let a = generate(gparams("Hello"), &glimits(), &tok, None).unwrap();
        let b = generate(gparams("Hello"), &glimits(), &tok, None).unwrap();
        assert_eq!(a.prompt_ids, b.prompt_ids);
        // Chat messages are rendered through the model's template.
        let chat = GenerateParams { messages: vec![("user".into(), "Hi".into())], ..gparams("") };
        let v = generate(chat, &glimits(), &tok, Some(&template)).unwrap();
        assert!(v.prompt_ids.len() > 3, "the template adds its role markers");
    }
}
