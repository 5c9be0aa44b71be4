//! The decoder-only transformers of GGUF files (llama and its relatives), loaded from GGUF. One struct
//! serves every architecture of [`super::families::DECODERS`], the one table from `general.architecture`
//! to what that architecture switches on (Q/K norms, extra norms, GeGLU, NeoX RoPE, sliding windows), read
//! into a [`LlamaConfig`]. The weights are immutable and shared; each sequence's
//! KV cache and position live in a [`KvCache`] passed to `forward`, so one forward pass can advance many
//! sequences at once, each at its own position, some prefilling and some decoding.
//!
//! Numerics follow llama.cpp's CPU path, so greedy tokens match it: quantized weights multiply
//! activations that are themselves quantized per block, as ggml does (see `qmatmul`), the
//! KV cache is f32, RMSNorm accumulates in f64, and RoPE angles are built by repeated f32
//! multiplication as ggml builds them. Every row's result depends only on its own sequence, so a
//! sequence decodes to the same tokens alone or in any batch.

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, bail};

pub use super::families::{Activation, LlamaConfig};
use super::kernels::qmatmul::{QMatrix, QRows};
use super::kernels::rope::Rotation;
use super::kernels::team::{Disjoint, Team};

/// Prompt rows per attention task: later rows see more positions, so small runs balance the cores.
const ATTENTION_ROWS: usize = 16;

/// Positions a sequence's KV cache has room for from its first step (then it doubles as it grows):
/// 128 is 5.9 MB for SmolLM2 (30 layers of 192-wide f32 keys and values), less than doubling from a
/// 20-token prompt leaves a 64-token reply holding (160 positions).
const KV_RESERVE: usize = 128;

/// A weight matrix in our weight-stationary kernels for every GGUF type (`qmatmul`). Other devices run
/// the device-generic decoder (`llama_device`) on candle's kernels instead.
struct Linear(QMatrix);

impl Linear {
    fn new(t: QTensor, device: &Device) -> Result<Self> {
        if !device.is_cpu() {
            bail!("the kernel decoder runs on the CPU; {device:?} takes the device-generic one");
        }
        Ok(Self(QMatrix::from_qtensor(&t)?))
    }

    /// `x @ w.T` for `rows` rows of `x`, flattened.
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        Ok(self.0.forward(x, rows))
    }

    /// [`Linear::forward`] with the rows of the result in one vector per part of `parts` rows.
    fn forward_parts(&self, x: &[f32], parts: &[usize]) -> Vec<Vec<f32>> {
        self.0.forward_parts(x, parts)
    }
}

/// The attention projections: separate, or one fused `attn_qkv` (Phi-3) whose rows hold Q, K, V in turn.
enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The FFN's gate and up projections: separate, or one fused `ffn_up` (Phi-3) of gate then up.
enum GateUp {
    Split { gate: Linear, up: Linear },
    Fused(Linear),
}

/// Splits each `width`-value row of `x` at `cuts` (widths summing to `width`) into one matrix per part.
fn split_rows(x: &[f32], cuts: &[usize]) -> Vec<Vec<f32>> {
    let width: usize = cuts.iter().sum();
    let rows = x.len() / width.max(1);
    let mut parts: Vec<Vec<f32>> = cuts.iter().map(|&w| Vec::with_capacity(w * rows)).collect();
    for row in x.chunks_exact(width) {
        let mut at = 0;
        for (part, &w) in parts.iter_mut().zip(cuts) {
            part.extend_from_slice(&row[at..at + w]);
            at += w;
        }
    }
    parts
}

fn add_bias(x: &mut [f32], bias: &[f32]) {
    if bias.is_empty() {
        return;
    }
    for row in x.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// With `qk_norm`: per-head RMSNorm weights of queries and keys.
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    /// With `post_norms`.
    post_attn_norm: Vec<f32>,
    post_ffn_norm: Vec<f32>,
    qkv: Qkv,
    /// Q, K and V biases (Qwen 2); empty when the file has none.
    bq: Vec<f32>,
    bk: Vec<f32>,
    bv: Vec<f32>,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate_up: GateUp,
    w_down: Linear,
}

pub struct Llama {
    pub config: LlamaConfig,
    /// The token embedding in its own blocks, a row dequantized per lookup as ggml's get_rows does.
    embed: QRows,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    /// Llama 3.1+ RoPE frequency factors (`rope_freqs.weight`): pair `i`'s angle is divided by `[i]`.
    rope_freqs: Option<Vec<f32>>,
    /// The weight types found, for logs.
    pub weight_types: Vec<GgmlDType>,
}

/// One sequence's attention state: per layer, the keys and values of every position so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    pub fn new(config: &LlamaConfig) -> Self {
        Self { k: vec![Vec::new(); config.n_layer], v: vec![Vec::new(); config.n_layer], len: 0 }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which rows of a step go through the output head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: a prompt chunk that is not the last.
    None,
    /// The row after the last token: the next token's distribution.
    Last,
    /// Every row: row j predicts the token after `tokens[j]` (prompt log-probabilities, scoring).
    All,
}

/// One sequence's share of a forward pass.
pub struct Step<'a, C = KvCache> {
    /// Tokens to append (the whole or part of a prompt, or one generated token).
    pub tokens: &'a [u32],
    pub cache: &'a mut C,
    pub logits: Logits,
}

/// What the generation engine drives: a decoder of some family with its own per-sequence cache. Two
/// implement it: [`Llama`] on our CPU kernels and `llama_device::DeviceLlama` on candle's ops, for any
/// device.
pub trait Decoder: Send + Sized + 'static {
    type Cache: Send;
    /// Loads every tensor named the way llama.cpp's converter names them, onto `device`.
    fn load<R: std::io::Read + std::io::Seek>(content: &Content, reader: &mut R, device: &Device) -> Result<Self>;
    fn config(&self) -> &LlamaConfig;
    /// The weight types found, for logs.
    fn weight_types(&self) -> &[GgmlDType];
    /// An empty cache for a new sequence.
    fn new_cache(&self) -> Result<Self::Cache>;
    /// Positions a cache holds.
    fn cached(cache: &Self::Cache) -> usize;
    /// Advances every step's sequence by its tokens and returns, for each step that asked, its logits:
    /// the last row's (`vocab` values) or every row's (`tokens × vocab`, row-major).
    fn forward(&self, steps: &mut [Step<'_, Self::Cache>]) -> Result<Vec<Option<Vec<f32>>>>;
}

impl Decoder for Llama {
    type Cache = KvCache;
    fn load<R: std::io::Read + std::io::Seek>(content: &Content, reader: &mut R, device: &Device) -> Result<Self> {
        Llama::load(content, reader, device)
    }
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn weight_types(&self) -> &[GgmlDType] {
        &self.weight_types
    }
    fn new_cache(&self) -> Result<KvCache> {
        Ok(KvCache::new(&self.config))
    }
    fn cached(cache: &KvCache) -> usize {
        cache.len
    }
    fn forward(&self, steps: &mut [Step<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        Llama::forward(self, steps)
    }
}

/// What both decoders read first: the config from the metadata and the token embedding, whose rows give
/// the vocabulary's size. `q` reads a tensor by name (and notes its type).
pub(crate) fn read_config_and_embedding<R>(
    content: &Content,
    reader: &mut R,
    q: &mut impl FnMut(&str, &mut R) -> Result<QTensor>,
) -> Result<(LlamaConfig, QTensor)> {
    let mut config = LlamaConfig::from_metadata(&content.metadata)?;
    let tok = q("token_embd.weight", reader)?;
    let (vocab, width) = tok.shape().dims2()?;
    if width != config.n_embd {
        bail!("token_embd.weight is {vocab}x{width}, expected width {}", config.n_embd);
    }
    config.vocab_size = vocab;
    Ok((config, tok))
}

/// Llama 3.1+ RoPE frequency factors (`rope_freqs.weight`), one per rotated pair, on the host (the RoPE
/// tables are built there); None when the file has none.
pub(crate) fn read_rope_freqs<R>(
    content: &Content,
    reader: &mut R,
    q: &mut impl FnMut(&str, &mut R) -> Result<QTensor>,
    config: &LlamaConfig,
) -> Result<Option<Vec<f32>>> {
    if !content.tensor_infos.contains_key("rope_freqs.weight") {
        return Ok(None);
    }
    let f = load_vec(q("rope_freqs.weight", reader)?, &Device::Cpu)?;
    if f.len() != config.rope_dims / 2 {
        bail!("rope_freqs.weight has {} values, expected {}", f.len(), config.rope_dims / 2);
    }
    Ok(Some(f))
}

fn load_vec(t: QTensor, device: &Device) -> Result<Vec<f32>> {
    t.dequantize(device)?.flatten_all()?.to_vec1::<f32>()
}

impl Llama {
    /// Loads every tensor named the way llama.cpp's converter names them.
    pub fn load<R: std::io::Read + std::io::Seek>(content: &Content, reader: &mut R, device: &Device) -> Result<Self> {
        let mut types = Vec::new();
        let mut q = |name: &str, r: &mut R| -> Result<QTensor> {
            let t = content.tensor(r, name, device)?;
            if !types.contains(&t.dtype()) {
                types.push(t.dtype());
            }
            Ok(t)
        };
        let (config, tok) = read_config_and_embedding(content, reader, &mut q)?;
        let embed = QRows::from_qtensor(&tok)?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            Linear::new(q("output.weight", reader)?, device)?
        } else {
            // Tied embeddings: the output head is the embedding matrix.
            Linear::new(tok, device)?
        };
        let norm = load_vec(q("output_norm.weight", reader)?, device)?;
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("blk.{i}");
            let mut norm = |n: &str, on: bool| -> Result<Vec<f32>> {
                if on { load_vec(q(&format!("{p}.{n}.weight"), reader)?, device) } else { Ok(Vec::new()) }
            };
            let (q_norm, k_norm) = (norm("attn_q_norm", config.qk_norm)?, norm("attn_k_norm", config.qk_norm)?);
            let post_attn_norm = norm("post_attention_norm", config.post_norms)?;
            let post_ffn_norm = norm("post_ffw_norm", config.post_norms)?;
            for (name, w, want) in
                [("attn_q_norm", &q_norm, config.head_dim), ("attn_k_norm", &k_norm, config.head_dim)]
            {
                if config.qk_norm && w.len() != want {
                    bail!("{p}.{name}.weight has {} values, expected {want}", w.len());
                }
            }
            let has = |n: &str| content.tensor_infos.contains_key(&format!("{p}.{n}"));
            if has("rope_factors_long.weight") {
                bail!("{p}: LongRoPE factors (Phi-3 128k) are not supported yet");
            }
            let (fused_qkv, fused_ffn) = (has("attn_qkv.weight"), !has("ffn_gate.weight"));
            let mut bias = |n: &str, r: &mut R| -> Result<Vec<f32>> {
                if has(&format!("{n}.bias")) {
                    load_vec(q(&format!("{p}.{n}.bias"), r)?, device)
                } else {
                    Ok(Vec::new())
                }
            };
            let (bq, bk, bv) = (bias("attn_q", reader)?, bias("attn_k", reader)?, bias("attn_v", reader)?);
            let mut m = |n: &str| -> Result<Linear> { Linear::new(q(&format!("{p}.{n}.weight"), reader)?, device) };
            let qkv = if fused_qkv {
                Qkv::Fused(m("attn_qkv")?)
            } else {
                Qkv::Split { q: m("attn_q")?, k: m("attn_k")?, v: m("attn_v")? }
            };
            let gate_up = if fused_ffn {
                GateUp::Fused(m("ffn_up")?)
            } else {
                GateUp::Split { gate: m("ffn_gate")?, up: m("ffn_up")? }
            };
            let (q_dim, kv_dim) = (config.n_head * config.head_dim, config.kv_dim());
            for (name, b, want) in [("attn_q", &bq, q_dim), ("attn_k", &bk, kv_dim), ("attn_v", &bv, kv_dim)] {
                if !b.is_empty() && b.len() != want {
                    bail!("{p}.{name}.bias has {} values, expected {want}", b.len());
                }
            }
            let layer = Layer {
                qkv,
                bq,
                bk,
                bv,
                gate_up,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                wo: m("attn_output")?,
                w_down: m("ffn_down")?,
                attn_norm: load_vec(q(&format!("{p}.attn_norm.weight"), reader)?, device)?,
                ffn_norm: load_vec(q(&format!("{p}.ffn_norm.weight"), reader)?, device)?,
            };
            layers.push(layer);
        }
        let rope_freqs = read_rope_freqs(content, reader, &mut q, &config)?;
        Ok(Self { config, embed, layers, norm, output, rope_freqs, weight_types: types })
    }

    /// Advances every step's sequence by its tokens and returns, for each step that asked, its logits:
    /// the last row's (`vocab` values) or every row's (`tokens × vocab`, row-major). Each row's logits
    /// are the same bits whichever rows run beside it.
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        let (h, kv_dim, q_dim) = (c.n_embd, c.kv_dim(), c.n_head * c.head_dim);
        let total: usize = steps.iter().map(|s| s.tokens.len()).sum();
        if total == 0 {
            return Ok(steps.iter().map(|_| None).collect());
        }
        // Row r belongs to sequence seq_of[r] at position pos_of[r].
        let mut pos_of = Vec::with_capacity(total);
        let mut x = Vec::with_capacity(total * h);
        for s in steps.iter() {
            if s.cache.len + s.tokens.len() > c.context_length {
                bail!(
                    "sequence of {} tokens exceeds the context length {}",
                    s.cache.len + s.tokens.len(),
                    c.context_length
                );
            }
            for (j, &t) in s.tokens.iter().enumerate() {
                let t = t as usize;
                if t >= c.vocab_size {
                    bail!("token id {t} is outside the vocabulary of {}", c.vocab_size);
                }
                self.embed.push_row(t, &mut x);
                pos_of.push(s.cache.len + j);
            }
        }
        if let Some(scale) = c.embed_scale {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        let freqs = self.rope_freqs.as_deref();
        let rope = RopeRows::new(c, c.rope_base, c.rope_freq_scale, freqs, &pos_of);
        // Sliding-window layers take their own base and no scaling (llama.cpp's rope_freq_scale_train_swa).
        let rope_swa =
            c.window.iter().any(Option::is_some).then(|| RopeRows::new(c, c.rope_base_swa, 1.0, freqs, &pos_of));
        // Buffers every layer overwrites whole: zero-filled once per step, not once per layer (the
        // allocator's zeroing of fresh ones was ~2% of the engine thread at eight streams).
        let (mut xn, mut attn, mut act) = (Vec::new(), vec![0f32; total * q_dim], Vec::new());
        for (li, layer) in self.layers.iter().enumerate() {
            let window = c.window[li];
            let rope = if window.is_some() { rope_swa.as_ref().unwrap_or(&rope) } else { &rope };
            rms_norm_into(&x, &layer.attn_norm, h, c.rms_eps, &mut xn);
            let (mut q, mut k, mut v) = match &layer.qkv {
                Qkv::Split { q, k, v } => {
                    let mut out = QMatrix::forward_many(&[&q.0, &k.0, &v.0], &xn, total).into_iter();
                    (out.next().unwrap(), out.next().unwrap(), out.next().unwrap())
                }
                Qkv::Fused(w) => {
                    let mut parts = split_rows(&w.forward(&xn, total)?, &[q_dim, kv_dim, kv_dim]).into_iter();
                    (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
                }
            };
            add_bias(&mut q, &layer.bq);
            add_bias(&mut k, &layer.bk);
            add_bias(&mut v, &layer.bv);
            if c.qk_norm {
                q = rms_norm(&q, &layer.q_norm, c.head_dim, c.rms_eps);
                k = rms_norm(&k, &layer.k_norm, c.head_dim, c.rms_eps);
            }
            rope.apply(&mut q, c.n_head, c.head_dim);
            rope.apply(&mut k, c.n_kv_head, c.head_dim);
            // Append the new keys and values, then attend: every (sequence, run of rows) is a task on the
            // team, so a long prompt's attention, and a batch's, is spread over the cores too.
            let mut spans = Vec::with_capacity(steps.len());
            let mut row = 0;
            for s in steps.iter_mut() {
                let n = s.tokens.len();
                if s.cache.k[li].is_empty() {
                    // Room for the first KV_RESERVE positions at once: growing from the prompt's length by
                    // doubling copied a short request's whole cache two or three times (~2% of the engine
                    // thread at eight streams of 20 + 64 tokens).
                    let rows = (s.cache.len + n).max(KV_RESERVE);
                    s.cache.k[li].reserve_exact(rows * kv_dim);
                    s.cache.v[li].reserve_exact(rows * kv_dim);
                }
                s.cache.k[li].extend_from_slice(&k[row * kv_dim..(row + n) * kv_dim]);
                s.cache.v[li].extend_from_slice(&v[row * kv_dim..(row + n) * kv_dim]);
                spans.push((row, s.cache.len));
                row += n;
            }
            let mut tasks = Vec::new(); // (sequence, rows j0..j1, heads)
            for (si, s) in steps.iter().enumerate() {
                for j0 in (0..s.tokens.len()).step_by(ATTENTION_ROWS) {
                    tasks.push((si, j0, (j0 + ATTENTION_ROWS).min(s.tokens.len()), 0..c.n_head));
                }
            }
            // Too few tasks to keep every thread busy (one or two decoding sequences): one row's heads
            // are independent, so each head of a one-row task becomes a task of its own. A head's
            // arithmetic is the same wherever it runs: no bit changes.
            let team = Team::global();
            if tasks.len() < 2 * team.threads() {
                tasks = tasks
                    .into_iter()
                    .flat_map(|(si, j0, j1, heads)| -> Vec<_> {
                        if j1 - j0 == 1 {
                            heads.map(|h| (si, j0, j1, h..h + 1)).collect()
                        } else {
                            vec![(si, j0, j1, heads)]
                        }
                    })
                    .collect();
            }
            // Longest first (keys x rows x heads), so the region does not end on one long sequence's task
            // while the other threads wait: at 16 decode rows of mixed lengths, the wait at the end of
            // each region was a few percent of the step. Order never changes a task's arithmetic.
            tasks.sort_by_key(|(si, j0, j1, heads)| std::cmp::Reverse((spans[*si].1 + j1) * (j1 - j0) * heads.len()));
            let out = Disjoint::new(&mut attn);
            let steps_ref = &*steps;
            team.run(tasks.len(), &|t| {
                let (si, j0, j1, ref heads) = tasks[t];
                let (row0, start) = spans[si];
                let cache = &steps_ref[si].cache;
                let rows = (row0 + j0) * q_dim..(row0 + j1) * q_dim;
                // Whole rows, or one row's heads: either way a contiguous part of `attn`.
                let outs = if heads.len() == c.n_head {
                    rows.clone()
                } else {
                    rows.start + heads.start * c.head_dim..rows.start + heads.end * c.head_dim
                };
                // SAFETY: tasks cover disjoint rows, or disjoint heads of one row, of `attn`.
                let o = unsafe { out.range(outs) };
                super::kernels::attention::causal(
                    &q[rows],
                    &cache.k[li],
                    &cache.v[li],
                    start + j0,
                    c.n_head,
                    c.n_kv_head,
                    c.head_dim,
                    window.unwrap_or(usize::MAX),
                    heads.clone(),
                    o,
                );
            });
            let mut o = layer.wo.forward(&attn, total)?;
            if c.post_norms {
                o = rms_norm(&o, &layer.post_attn_norm, h, c.rms_eps);
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            rms_norm_into(&x, &layer.ffn_norm, h, c.rms_eps, &mut xn);
            let (gate, up) = match &layer.gate_up {
                GateUp::Split { gate, up } => {
                    let mut out = QMatrix::forward_many(&[&gate.0, &up.0], &xn, total).into_iter();
                    (out.next().unwrap(), out.next().unwrap())
                }
                GateUp::Fused(w) => {
                    let mut parts = split_rows(&w.forward(&xn, total)?, &[c.n_ff, c.n_ff]).into_iter();
                    (parts.next().unwrap(), parts.next().unwrap())
                }
            };
            gated_into(&gate, &up, c.n_ff, c.activation, &mut act);
            let mut down = layer.w_down.forward(&act, total)?;
            if c.post_norms {
                down = rms_norm(&down, &layer.post_ffn_norm, h, c.rms_eps);
            }
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        // Only the rows whose logits are wanted go through the head: usually each sequence's last.
        let mut wanted = Vec::new(); // (step, rows)
        let mut head_rows = Vec::new();
        let mut row = 0;
        for (i, s) in steps.iter_mut().enumerate() {
            let n = s.tokens.len();
            row += n;
            s.cache.len += n;
            let take = match s.logits {
                _ if n == 0 => 0,
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => n,
            };
            if take > 0 {
                wanted.push((i, take));
                head_rows.extend_from_slice(&x[(row - take) * h..row * h]);
            }
        }
        let mut out: Vec<Option<Vec<f32>>> = steps.iter().map(|_| None).collect();
        if wanted.is_empty() {
            return Ok(out);
        }
        let xn = rms_norm(&head_rows, &self.norm, h, c.rms_eps);
        // Each sequence's rows straight into a vector of its own: 16 rows' logits are 3 MB (Gemma 3's,
        // 16 MB), and copying them out of one buffer was ~2% of an eight-stream step.
        let parts: Vec<usize> = wanted.iter().map(|&(_, take)| take).collect();
        for ((i, _), logits) in wanted.iter().zip(self.output.forward_parts(&xn, &parts)) {
            out[*i] = Some(logits);
        }
        Ok(out)
    }
}

/// RMSNorm per row as ggml computes it: the mean square in f64, then `x * (1/sqrt(mean + eps)) * w` in f32.
fn rms_norm(x: &[f32], w: &[f32], width: usize, eps: f32) -> Vec<f32> {
    let mut out = Vec::new();
    rms_norm_into(x, w, width, eps, &mut out);
    out
}

/// [`rms_norm`] into `out`, resized to `x`'s length (zero-filled only where it grows).
fn rms_norm_into(x: &[f32], w: &[f32], width: usize, eps: f32, out: &mut Vec<f32>) {
    out.resize(x.len(), 0.0);
    Team::global().rows(out, width, &|r0, out| {
        let x = &x[r0 * width..r0 * width + out.len()];
        #[cfg(target_arch = "x86_64")]
        if super::kernels::cpu::features().avx2_fma {
            // SAFETY: the CPU has AVX2 and FMA (detected at run time).
            return unsafe { norm_rows_avx2(x, w, width, eps, out) };
        }
        norm_rows(x, w, width, eps, out, sum_of_squares)
    });
}

/// [`norm_rows`] compiled for AVX2, with [`sum_of_squares_avx2`]: LLVM vectorises the scaling without
/// moving a rounding (no float operation is reordered or fused), so the same bits in fewer
/// instructions than the SSE2 baseline. Gemma 3 runs six norms a layer; in SSE2 they were ~3% of a
/// prefill.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_rows_avx2(x: &[f32], w: &[f32], width: usize, eps: f32, out: &mut [f32]) {
    // SAFETY: compiled for AVX2, which `sum_of_squares_avx2` needs.
    norm_rows(x, w, width, eps, out, |row| unsafe { sum_of_squares_avx2(row) })
}

/// Each row of `x` (rows of `width`) normalised and scaled by `w` into the same row of `out`;
/// `squares` is [`sum_of_squares`] or its bits.
#[inline(always)]
fn norm_rows(x: &[f32], w: &[f32], width: usize, eps: f32, out: &mut [f32], squares: impl Fn(&[f32]) -> f64) {
    for (o, row) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
        let mean = (squares(row) / width as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        o.iter_mut().zip(row.iter().zip(w)).for_each(|(o, (&v, &g))| *o = (v * scale) * g);
    }
}

/// The sum of a row's squares (each squared in f32, as ggml does) in f64: eight running sums added
/// pairwise at the end, in a fixed order. ggml keeps one running sum; its chain of dependent f64 adds
/// was ~0.8 µs a 576-wide row, on the engine thread alone at 16 rows (too few values for a team region)
/// while the team waited. f64's 29 spare bits make the f32 mean the same but for a rounding boundary
/// crossed about once in a million rows, well inside the fidelity contract.
#[inline(always)]
fn sum_of_squares(row: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v * v) as f64;
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for &v in tail {
        sum += (v * v) as f64;
    }
    sum
}

/// [`sum_of_squares`] in two 256-bit registers of four f64 sums: `lo` holds running sums 0-3 and `hi`
/// 4-7, each taking its values in the same order, and `lo + hi` then folds them in the same pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_of_squares_avx2(row: &[f32]) -> f64 {
    use std::arch::x86_64::*;
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    // SAFETY: each load reads one whole chunk of eight.
    let l = unsafe {
        let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        for c in chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            let sq = _mm256_mul_ps(v, v);
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(sq)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(sq)));
        }
        // Lanes acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7].
        let mut l = [0f64; 4];
        _mm256_storeu_pd(l.as_mut_ptr(), _mm256_add_pd(lo, hi));
        l
    };
    let mut sum = (l[0] + l[2]) + (l[1] + l[3]);
    for &v in tail {
        sum += (v * v) as f64;
    }
    sum
}

/// The feed-forward gate: `act(gate) * up`, element by element, rows spread over the team.
/// The result goes to `out`, resized to `gate`'s length (zero-filled only where it grows).
fn gated_into(gate: &[f32], up: &[f32], width: usize, activation: Activation, out: &mut Vec<f32>) {
    out.resize(gate.len(), 0.0);
    Team::global().rows_from(2048, out, width, &|r0, out| {
        let at = r0 * width..r0 * width + out.len();
        let (g, u) = (&gate[at.clone()], &up[at]);
        match activation {
            // libm's expf (or its bits eight at a time, `kernels::expf`): llama.cpp's vectorized
            // exponential here (tried) moved greedy SmolLM2 off llama.cpp's tokens on a test prompt and
            // the fidelity run farther away (mean KLD 0.002293 -> 0.002326).
            Activation::Silu => super::kernels::expf::silu_gate(g, u, out),
            Activation::GeluTanh => super::kernels::ops::gelu_tanh_gate(g, u, out),
        }
    });
}

/// Per position, `rope_dims / 2` (cos, sin) pairs, with ggml's angles: theta_scale = powf(base, -2/n_dims);
/// theta starts at the position and is multiplied by theta_scale once per pair, in f32. The same rounding
/// gives the same angles.
pub(crate) fn rope_table(
    c: &LlamaConfig,
    base: f32,
    scale: f32,
    freqs: Option<&[f32]>,
    positions: &[usize],
) -> Vec<(f32, f32)> {
    let half = c.rope_dims / 2;
    let theta_scale = base.powf(-2.0 / c.rope_dims as f32);
    let mut table = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        let mut theta = p as f32;
        for i in 0..half {
            // ggml's rope_yarn without extrapolation: (theta / freq_factor) * freq_scale.
            let t = freqs.map_or(theta, |f| theta / f[i]) * scale;
            table.push((t.cos(), t.sin()));
            theta *= theta_scale;
        }
    }
    table
}

/// RoPE with the cos/sin of every row's position: llama's "normal" mode rotates adjacent pairs, NeoX's
/// (Gemma, Qwen) pairs value `i` with value `i + dims / 2`.
struct RopeRows(Rotation);

impl RopeRows {
    fn new(c: &LlamaConfig, base: f32, scale: f32, freqs: Option<&[f32]>, positions: &[usize]) -> Self {
        let table = rope_table(c, base, scale, freqs, positions);
        Self(Rotation::new(&table, c.rope_dims / 2, c.rope_neox))
    }

    fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize) {
        Team::global().rows(x, heads * head_dim, &|r0, part| self.0.apply(part, r0, heads, head_dim));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The eight-lane sum of squares gives ggml's one-running-sum mean in f32 (rows of every width
    /// class: below eight, a tail, whole lanes; values across many magnitudes), and a row's result does
    /// not depend on the rows normalized with it.
    #[test]
    fn rms_norm_matches_the_running_sum() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut differ = 0;
        let mut total = 0;
        for width in [1usize, 7, 8, 13, 64, 576, 2048] {
            let rows = 200;
            let x: Vec<f32> =
                (0..rows * width).map(|_| ((next() - 0.5) * 10f64.powf(next() * 8.0 - 4.0)) as f32).collect();
            let w: Vec<f32> = (0..width).map(|_| next() as f32 + 0.5).collect();
            let all = rms_norm(&x, &w, width, 1e-5);
            for r in 0..rows {
                let row = &x[r * width..(r + 1) * width];
                let running: f64 = row.iter().map(|&v| (v * v) as f64).sum();
                total += 1;
                differ += usize::from((sum_of_squares(row) / width as f64) as f32 != (running / width as f64) as f32);
                #[cfg(target_arch = "x86_64")]
                if super::super::kernels::cpu::features().avx2_fma {
                    // SAFETY: the CPU has AVX2 (checked above).
                    let avx2 = unsafe { sum_of_squares_avx2(row) };
                    assert_eq!(avx2.to_bits(), sum_of_squares(row).to_bits(), "AVX2: width {width} row {r}");
                }
                assert_eq!(rms_norm(row, &w, width, 1e-5), all[r * width..(r + 1) * width], "width {width} row {r}");
            }
        }
        assert!(differ * 1000 <= total, "{differ} of {total} means differ from the running sum's");
    }
}
