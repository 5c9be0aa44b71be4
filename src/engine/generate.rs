//! A generation model on its own OS thread. It owns the weights and every running sequence's KV cache,
//! sampler and text state, and runs one batched step whenever the scheduler (`batcher::generate`) asks:
//! new sequences' prompts go in as prefill chunks beside the decode rows of running ones.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError};

use candle_core::Device;
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::EngineError;
use super::sampling::{Rng, logprob, sample, top_logprobs};
use super::text::{Matched, StopMatcher, TextToken};
use crate::models::llama::{Decoder, Llama, Logits, Step};
use crate::models::llama_device::DeviceLlama;
use crate::tokenizer::TokenizerError;
use crate::tokenizer::chat::ChatTemplate;
use crate::tokenizer::gguf::{Detokenizer, GgufTokenizer, GgufVocab};
use crate::validate::{Sampling, ValidGenerate};

/// The scheduler's name for a sequence.
pub type SeqId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Length,
    StopSequence,
    EndOfSequence,
}

/// What happened to one sequence in a step.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// Before the first token, when asked: every prompt position after the first.
    PromptLogprobs(Vec<PositionLogprobs>),
    Token {
        token: TextToken,
        index: u32,
    },
    End {
        finish: Finish,
        stop: Option<String>,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    Failed(String),
}

/// A prompt position: the actual token there, its log-probability given the tokens before it, and the
/// most likely tokens at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionLogprobs {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One step's instructions: sequences to start and sequences to forget (cancelled or expired).
#[derive(Debug, Default)]
pub struct StepPlan {
    pub admit: Vec<(SeqId, ValidGenerate)>,
    pub drop: Vec<SeqId>,
}

#[derive(Debug, Default)]
pub struct StepReport {
    pub events: Vec<(SeqId, SeqEvent)>,
}

/// A generation model as the engine thread drives it; a fake one tests the scheduler's timing.
pub trait Generator: Send + 'static {
    fn step(&mut self, plan: StepPlan) -> Result<StepReport, EngineError>;
}

struct Job {
    plan: StepPlan,
    reply: oneshot::Sender<Result<StepReport, EngineError>>,
}

/// Handle to a generator running on its own OS thread.
#[derive(Clone)]
pub struct GenEngine {
    tx: SyncSender<Job>,
    heart: super::Heartbeat,
}

impl GenEngine {
    pub fn spawn<G: Generator>(name: &str, mut generator: G) -> std::io::Result<Self> {
        let heart = super::Heartbeat::new();
        let tx = super::thread::spawn(name, heart.clone(), move |job: Job| {
            let result = super::thread::guarded(|| generator.step(job.plan));
            if let Err(err) = &result {
                error!(error = %err, "generation step failed");
            }
            let _ = job.reply.send(result);
        })?;
        Ok(Self { tx, heart })
    }

    /// The model thread's heartbeat.
    pub fn heartbeat(&self) -> &super::Heartbeat {
        &self.heart
    }

    pub fn submit(&self, plan: StepPlan) -> oneshot::Receiver<Result<StepReport, EngineError>> {
        let (reply, rx) = oneshot::channel();
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) = self.tx.try_send(Job { plan, reply }) {
            let _ = job.reply.send(Err(EngineError::Stopped));
        }
        rx
    }
}

struct Sequence<C> {
    cache: C,
    prompt: Vec<u32>,
    /// Prompt tokens already through the model.
    fed: usize,
    generated: Vec<u32>,
    emitted: u32,
    max_new_tokens: usize,
    sampling: Sampling,
    rng: Rng,
    logprobs: bool,
    /// Alternatives per prompt position (0: prompt log-probabilities off), and those gathered so far.
    prompt_logprobs: usize,
    prompt_lp: Vec<PositionLogprobs>,
    top_logprobs: usize,
    detok: Detokenizer,
    stops: StopMatcher,
}

/// Prompt tokens per step on the CPU when the operator sets none, while other sequences run or wait
/// beside the prompt. A small chunk lets prompts that arrive together start streaming one after another
/// (16 clients' median time to first token fell from ~300-420 ms with 256 to ~120-150 ms with 32), and
/// a step never stalls running streams for more than ~20 ms of prompt.
pub const CPU_PREFILL_CHUNK: usize = 32;
/// Prompt tokens per step on the CPU when the operator sets none and the prompt's sequence is the only
/// one: no stream is running to stall and no other prompt waits for its turn, and longer steps pay. The
/// prefill kernels unpack each weight tile once per step for all its rows, and a longer step reloads the
/// keys fewer times: a lone 256-token prompt on SmolLM2 Q4_K_M ran at 1607, 1795, 1918 and 1984
/// tokens/s in steps of 32, 64, 128 and 256 (alternated, 2 cores). A request that arrives meanwhile
/// waits for the step in progress (~130 ms at 256 rows), as llama-server's default 512-token batches
/// make it wait too.
pub const CPU_PREFILL_CHUNK_ALONE: usize = 256;
/// On GPUs, chunks as big as vLLM's. That rests on a GPU step costing little more with more rows, which
/// holds for a GPU's arithmetic but not for today's device path, whose cost per row is launches
/// (attention row by row, products in 8-row chunks); a smaller chunk would stall running streams for
/// less at a time. Not yet measured on a GPU.
pub const DEVICE_PREFILL_CHUNK: usize = 512;

/// How many prompt tokens one step may read, across the sequences it feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillChunk {
    /// While other sequences run or wait beside the prompt: bounds how long one step can stall the
    /// running streams' next tokens while a long prompt is read.
    pub shared: usize,
    /// While the prompt's sequence is the only one.
    pub alone: usize,
}

impl PrefillChunk {
    /// The operator's chunk (`--prefill-chunk`) in every case, or the device's defaults.
    pub fn new(operator: Option<usize>, device: &Device) -> Self {
        match operator {
            Some(n) => Self { shared: n.max(1), alone: n.max(1) },
            None if device.is_cpu() => Self { shared: CPU_PREFILL_CHUNK, alone: CPU_PREFILL_CHUNK_ALONE },
            None => Self { shared: DEVICE_PREFILL_CHUNK, alone: DEVICE_PREFILL_CHUNK },
        }
    }

    /// This step's budget of prompt tokens, with `sequences` live (decoding or reading their prompts).
    /// A sequence that asked for prompt log-probabilities keeps the shared chunk even alone: each of its
    /// rows returns a whole vocabulary of logits (256 rows of Gemma 3's 262k would be 268 MB).
    pub fn budget(&self, sequences: usize, prompt_logprobs: bool) -> usize {
        if sequences == 1 && !prompt_logprobs { self.alone.max(self.shared) } else { self.shared }
    }
}

/// The real generator: a decoder of any family, on our kernels (`Llama`) or candle's (`DeviceLlama`),
/// and its tokenizer.
pub struct LlamaGenerator<D: Decoder = Llama> {
    model: D,
    tokenizer: Arc<GgufTokenizer>,
    /// Prompt tokens fed per step across all sequences.
    prefill_chunk: PrefillChunk,
    seqs: BTreeMap<SeqId, Sequence<D::Cache>>,
}

/// The tokenizer a GGUF file carries in its metadata. The file's values are read here, where candle's
/// GGUF types are known; the tokenizer module builds from plain values.
pub fn gguf_tokenizer(md: &HashMap<String, gguf_file::Value>) -> Result<GgufTokenizer, TokenizerError> {
    let load = |reason: String| TokenizerError::Load { path: "GGUF metadata".into(), reason };
    let text = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
    let strings = |k: &str| -> Result<Vec<String>, TokenizerError> {
        match md.get(k) {
            None => Ok(Vec::new()),
            Some(v) => v
                .to_vec()
                .map_err(|e| load(format!("{k}: {e}")))?
                .iter()
                .map(|x| x.to_string().cloned().map_err(|e| load(format!("{k}: {e}"))))
                .collect(),
        }
    };
    let token_types = match md.get("tokenizer.ggml.token_type") {
        Some(v) => Some(
            v.to_vec()
                .map_err(|e| load(format!("tokenizer.ggml.token_type: {e}")))?
                .iter()
                .map(|x| x.to_i32().unwrap_or(1))
                .collect(),
        ),
        None => None,
    };
    let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    GgufTokenizer::new(GgufVocab {
        model: text("tokenizer.ggml.model").unwrap_or_default(),
        pre: text("tokenizer.ggml.pre"),
        tokens: strings("tokenizer.ggml.tokens")?,
        merges: strings("tokenizer.ggml.merges")?,
        scores: match md.get("tokenizer.ggml.scores") {
            Some(v) => v
                .to_vec()
                .map_err(|e| load(format!("tokenizer.ggml.scores: {e}")))?
                .iter()
                .map(|x| x.to_f32().map_err(|e| load(format!("tokenizer.ggml.scores: {e}"))))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        },
        token_types,
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        add_bos: md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()),
        add_eos: md.get("tokenizer.ggml.add_eos_token").and_then(|v| v.to_bool().ok()),
        add_space_prefix: md.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()),
        chat_template: text("tokenizer.chat_template"),
    })
}

/// The tokenizer of the GGUF file at `path` (its metadata only; no weights are read).
pub fn load_gguf_tokenizer(path: &Path) -> Result<GgufTokenizer, EngineError> {
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::load(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| EngineError::load(path, e))?;
    gguf_tokenizer(&content.metadata).map_err(|e| EngineError::load(path, e))
}

/// What loading a GGUF file tells the rest of the server.
pub struct LoadedLlama<D: Decoder = Llama> {
    pub generator: LlamaGenerator<D>,
    pub tokenizer: Arc<GgufTokenizer>,
    pub context_length: usize,
    /// KV-cache bytes per position (keys and values of every layer, f32).
    pub kv_bytes_per_token: u64,
}

/// One device's replica of a GGUF model, ready to serve.
pub struct ReadyGenerator {
    pub engine: GenEngine,
    pub tokenizer: Arc<GgufTokenizer>,
    /// The file's chat template, or None when it has none or minijinja cannot use it.
    pub template: Option<Arc<ChatTemplate>>,
    pub context_length: usize,
    pub kv_bytes_per_token: u64,
}

/// Everything a GGUF file needs before it serves on `device`: weights, tokenizer and chat template from the
/// file, the warm-up pass, and the model thread. The registry only sees the result.
pub fn ready_generator(
    name: &str,
    path: &Path,
    device: &Device,
    prefill_chunk: Option<usize>,
) -> Result<ReadyGenerator, EngineError> {
    let prefill_chunk = PrefillChunk::new(prefill_chunk, device);
    // The one place the decoder is chosen: our kernels on the CPU, candle's ops on any other device
    // (or on the CPU too, when OMNIBUS_ENGINE=device-generic asks, as the device-generic tests do).
    let (engine, tokenizer, context_length, kv_bytes_per_token) = if super::device::device_generic(device) {
        let l = LlamaGenerator::<DeviceLlama>::load(path, device, prefill_chunk)?;
        (GenEngine::spawn(name, l.generator), l.tokenizer, l.context_length, l.kv_bytes_per_token)
    } else {
        let l = LlamaGenerator::<Llama>::load(path, device, prefill_chunk)?;
        (GenEngine::spawn(name, l.generator), l.tokenizer, l.context_length, l.kv_bytes_per_token)
    };
    let template = tokenizer.chat_template.as_deref().and_then(|source| {
        let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("").to_string();
        ChatTemplate::new(source, &text(tokenizer.bos), &text(tokenizer.eos))
            .inspect_err(|e| warn!(model = %name, error = %e, "chat template unusable; only raw prompts are served"))
            .ok()
            .map(Arc::new)
    });
    let engine = engine.map_err(|e| EngineError::load(path, e))?;
    Ok(ReadyGenerator { engine, tokenizer, template, context_length, kv_bytes_per_token })
}

impl<D: Decoder> LlamaGenerator<D> {
    pub fn new(model: D, tokenizer: Arc<GgufTokenizer>, prefill_chunk: PrefillChunk) -> Self {
        Self { model, tokenizer, prefill_chunk, seqs: BTreeMap::new() }
    }

    /// Loads a llama GGUF and its tokenizer from the same file, and warms it with one forward pass.
    pub fn load(path: &Path, device: &Device, prefill_chunk: PrefillChunk) -> Result<LoadedLlama<D>, EngineError> {
        let started = std::time::Instant::now();
        let mut file = std::fs::File::open(path).map_err(|e| EngineError::load(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| EngineError::load(path, e))?;
        let tokenizer = Arc::new(gguf_tokenizer(&content.metadata).map_err(|e| EngineError::load(path, e))?);
        let model = D::load(&content, &mut file, device).map_err(|e| EngineError::load(path, e))?;
        if tokenizer.vocab_size() != model.config().vocab_size {
            return Err(EngineError::load(
                path,
                format!(
                    "the tokenizer has {} tokens but the embedding {} rows",
                    tokenizer.vocab_size(),
                    model.config().vocab_size
                ),
            ));
        }
        // Warm-up: one real forward pass before health says SERVING.
        let mut cache = model.new_cache().map_err(|e| EngineError::load(path, e))?;
        let first = tokenizer.bos.unwrap_or(0);
        model
            .forward(&mut [Step { tokens: &[first], cache: &mut cache, logits: Logits::Last }])
            .map_err(|e| EngineError::load(path, e))?;
        let context_length = model.config().context_length;
        info!(
            path = %path.display(),
            layers = model.config().n_layer,
            width = model.config().n_embd,
            context_length,
            weights = ?model.weight_types(),
            decoder = std::any::type_name::<D>().rsplit("::").next().unwrap_or("?"),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "generation model loaded and warmed"
        );
        let c = model.config();
        let kv_bytes_per_token = (c.n_layer * 2 * c.n_kv_head * c.head_dim * std::mem::size_of::<f32>()) as u64;
        let generator = Self::new(model, tokenizer.clone(), prefill_chunk);
        Ok(LoadedLlama { generator, tokenizer, context_length, kv_bytes_per_token })
    }

    /// After a sampled token: text, stop sequences and end conditions.
    fn after_token(&mut self, id: SeqId, token: u32, logits: &[f32], events: &mut Vec<(SeqId, SeqEvent)>) -> bool {
        let tokenizer = self.tokenizer.clone();
        let seq = self.seqs.get_mut(&id).expect("a sequence of this step");
        seq.generated.push(token);
        let end = |finish, stop, seq: &Sequence<D::Cache>| SeqEvent::End {
            finish,
            stop,
            prompt_tokens: seq.prompt.len() as u32,
            completion_tokens: seq.generated.len() as u32,
        };
        let push = |t: TextToken, seq: &mut Sequence<D::Cache>, events: &mut Vec<(SeqId, SeqEvent)>| {
            events.push((id, SeqEvent::Token { token: t, index: seq.emitted }));
            seq.emitted += 1;
        };
        if tokenizer.is_end_of_generation(token) {
            for t in seq.stops.flush() {
                push(t, seq, events);
            }
            events.push((id, end(Finish::EndOfSequence, None, seq)));
            return true;
        }
        let text = seq.detok.push(tokenizer.token_bytes(token));
        let lp = if seq.logprobs || seq.top_logprobs > 0 { logprob(logits, token) } else { 0.0 };
        let top = top_logprobs(logits, seq.top_logprobs);
        match seq.stops.push(TextToken { id: token, text, logprob: lp, top }) {
            Matched::Emit(ts) => ts.into_iter().for_each(|t| push(t, seq, events)),
            Matched::Stop { emit, stop } => {
                emit.into_iter().for_each(|t| push(t, seq, events));
                events.push((id, end(Finish::StopSequence, Some(stop), seq)));
                return true;
            }
        }
        if seq.generated.len() >= seq.max_new_tokens {
            for t in seq.stops.flush() {
                push(t, seq, events);
            }
            events.push((id, end(Finish::Length, None, seq)));
            return true;
        }
        false
    }
}

impl<D: Decoder> Generator for LlamaGenerator<D> {
    fn step(&mut self, plan: StepPlan) -> Result<StepReport, EngineError> {
        for id in &plan.drop {
            self.seqs.remove(id);
        }
        for (id, req) in plan.admit {
            self.seqs.insert(
                id,
                Sequence {
                    cache: self.model.new_cache()?,
                    rng: Rng::new(req.sampling.seed),
                    prompt: req.prompt_ids,
                    fed: 0,
                    generated: Vec::new(),
                    emitted: 0,
                    max_new_tokens: req.max_new_tokens,
                    sampling: req.sampling,
                    logprobs: req.logprobs,
                    prompt_logprobs: req.prompt_logprobs,
                    prompt_lp: Vec::new(),
                    top_logprobs: req.top_logprobs,
                    detok: Detokenizer::default(),
                    stops: StopMatcher::new(req.stop),
                },
            );
        }
        // This step's rows: one token per decoding sequence, prompt chunks within the prefill budget.
        // Each input: the sequence, its tokens, where they start, whether the next token is sampled
        // after them (the prompt's last chunk, or a decode row), and which rows' logits are wanted.
        let lone_logprobs = self.seqs.values().next().is_some_and(|s| s.prompt_logprobs > 0);
        let mut budget = self.prefill_chunk.budget(self.seqs.len(), lone_logprobs);
        let mut inputs: Vec<(SeqId, Vec<u32>, usize, bool, Logits)> = Vec::new();
        for (&id, seq) in &self.seqs {
            if seq.fed < seq.prompt.len() {
                let n = (seq.prompt.len() - seq.fed).min(budget);
                if n == 0 {
                    continue;
                }
                budget -= n;
                let done = seq.fed + n == seq.prompt.len();
                let want = match (seq.prompt_logprobs > 0, done) {
                    (true, _) => Logits::All,
                    (false, true) => Logits::Last,
                    (false, false) => Logits::None,
                };
                inputs.push((id, seq.prompt[seq.fed..seq.fed + n].to_vec(), seq.fed, done, want));
            } else if let Some(&last) = seq.generated.last() {
                inputs.push((id, vec![last], D::cached(&seq.cache), true, Logits::Last));
            }
        }
        let mut report = StepReport::default();
        if inputs.is_empty() {
            return Ok(report);
        }
        let logits = {
            let mut by_id: BTreeMap<SeqId, &mut Sequence<D::Cache>> =
                self.seqs.iter_mut().map(|(k, v)| (*k, v)).collect();
            let mut steps: Vec<Step<'_, D::Cache>> = Vec::with_capacity(inputs.len());
            for (id, tokens, _, _, want) in &inputs {
                let seq = by_id.remove(id).expect("planned sequences exist");
                seq.fed += if seq.fed < seq.prompt.len() { tokens.len() } else { 0 };
                steps.push(Step { tokens, cache: &mut seq.cache, logits: *want });
            }
            match self.model.forward(&mut steps) {
                Ok(l) => l,
                Err(e) => {
                    drop(steps);
                    // Half-advanced caches cannot be trusted: the scheduler fails every running sequence.
                    self.seqs.clear();
                    return Err(EngineError::from_step(e));
                }
            }
        };
        let vocab = self.model.config().vocab_size;
        let mut finished = Vec::new();
        for ((id, tokens, start, sample_next, want), logits) in inputs.iter().zip(logits) {
            let Some(logits) = logits else { continue };
            let seq = self.seqs.get_mut(id).expect("planned sequences exist");
            if *want == Logits::All {
                // Row j predicts prompt token start + j + 1 (none after the prompt's last token).
                for j in 0..tokens.len() {
                    let Some(&next) = seq.prompt.get(start + j + 1) else { break };
                    let row = &logits[j * vocab..(j + 1) * vocab];
                    seq.prompt_lp.push(PositionLogprobs {
                        id: next,
                        logprob: logprob(row, next),
                        top: top_logprobs(row, seq.prompt_logprobs),
                    });
                }
                if *sample_next {
                    report.events.push((*id, SeqEvent::PromptLogprobs(std::mem::take(&mut seq.prompt_lp))));
                }
            }
            if !*sample_next {
                continue;
            }
            let mut logits = if *want == Logits::All { logits[(tokens.len() - 1) * vocab..].to_vec() } else { logits };
            let raw = if seq.logprobs || seq.top_logprobs > 0 { Some(logits.clone()) } else { None };
            let history: Vec<u32> = if seq.sampling.repetition_penalty != 1.0 {
                seq.prompt.iter().chain(&seq.generated).copied().collect()
            } else {
                Vec::new()
            };
            let token = sample(&mut logits, &history, &seq.sampling, &mut seq.rng);
            if self.after_token(*id, token, raw.as_deref().unwrap_or(&logits), &mut report.events) {
                finished.push(*id);
            }
        }
        for id in finished {
            self.seqs.remove(&id);
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_prompt_takes_the_long_chunk_and_company_the_short_one() {
        let cpu = PrefillChunk::new(None, &Device::Cpu);
        assert_eq!(cpu, PrefillChunk { shared: CPU_PREFILL_CHUNK, alone: CPU_PREFILL_CHUNK_ALONE });
        assert_eq!(cpu.budget(1, false), CPU_PREFILL_CHUNK_ALONE);
        // Another sequence decoding or reading its prompt beside it: the short chunk.
        assert_eq!(cpu.budget(2, false), CPU_PREFILL_CHUNK);
        assert_eq!(cpu.budget(16, false), CPU_PREFILL_CHUNK);
        // Prompt log-probabilities return every row's logits: the short chunk even alone.
        assert_eq!(cpu.budget(1, true), CPU_PREFILL_CHUNK);
        // The operator's chunk holds in every case (and at least one token).
        let set = PrefillChunk::new(Some(64), &Device::Cpu);
        assert_eq!((set.budget(1, false), set.budget(3, false)), (64, 64));
        assert_eq!(PrefillChunk::new(Some(0), &Device::Cpu).budget(1, false), 1);
    }
}
