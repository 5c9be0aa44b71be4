//! The device-generic decoder: every family of [`super::families::DECODERS`], built from candle's tensor
//! ops (`QMatMul` on the GGUF blocks, RMSNorm, RoPE, softmax attention), so it runs wherever candle runs:
//! on CUDA with candle's kernels, and on candle's CPU backend, where the tests check it against llama.cpp
//! and against our own kernels. Weights, every sequence's KV cache and the activations stay on the
//! device; per step only token ids go up and only the wanted rows' logits come down.
//!
//! Batching is the same as the kernel path's: the linear layers run every sequence's rows as one
//! matrix, attention runs per sequence over its own cache. Each row's result depends only on its own
//! sequence as long as the matrix-product kernel computes rows independently. candle's quantized
//! kernels do on the CPU (each row is quantized and dotted alone). On CUDA they sum in an order that
//! follows the row count, so there every product runs on chunks of exactly 8 rows
//! ([`DEVICE_PRODUCT_ROWS`]); `scripts/gpu-check` measures whether a row's bits then hold.
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor, bail};

use super::families::{Activation, LlamaConfig};
use super::llama::{Decoder, Logits, Step, read_config_and_embedding, read_rope_freqs, rope_table};

/// Positions a sequence's cache grows by: the slab is copied once per this many tokens, and at most
/// this many positions sit reserved but unused.
const CACHE_GROWTH: usize = 256;

enum Qkv {
    Split { q: QMatMul, k: QMatMul, v: QMatMul },
    Fused(QMatMul),
}

enum GateUp {
    Split { gate: QMatMul, up: QMatMul },
    Fused(QMatMul),
}

struct Layer {
    attn_norm: Tensor,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attn_norm: Option<Tensor>,
    post_ffn_norm: Option<Tensor>,
    qkv: Qkv,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate_up: GateUp,
    w_down: QMatMul,
}

/// RoPE's cos and sin for every position of the context, `[context, rope_dims / 2]` each, on the device:
/// a step narrows them to its rows' positions, nothing goes up.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(c: &LlamaConfig, base: f32, scale: f32, freqs: Option<&[f32]>, device: &Device) -> Result<Self> {
        let positions: Vec<usize> = (0..c.context_length).collect();
        let table = rope_table(c, base, scale, freqs, &positions);
        let shape = (c.context_length, c.rope_dims / 2);
        let cos = Tensor::from_vec(table.iter().map(|p| p.0).collect::<Vec<f32>>(), shape, device)?;
        let sin = Tensor::from_vec(table.iter().map(|p| p.1).collect::<Vec<f32>>(), shape, device)?;
        Ok(Self { cos, sin })
    }

    /// Rotates `x` (`[1, heads, rows, head_dim]`) at positions `start..start + rows`.
    fn apply(&self, x: &Tensor, start: usize, c: &LlamaConfig) -> Result<Tensor> {
        let rows = x.dim(2)?;
        let (cos, sin) = (self.cos.narrow(0, start, rows)?, self.sin.narrow(0, start, rows)?);
        let rotate = |x: &Tensor| {
            if c.rope_neox {
                candle_nn::rotary_emb::rope(x, &cos, &sin)
            } else {
                candle_nn::rotary_emb::rope_i(x, &cos, &sin)
            }
        };
        if c.rope_dims == c.head_dim {
            return rotate(&x.contiguous()?);
        }
        let head = rotate(&x.narrow(D::Minus1, 0, c.rope_dims)?.contiguous()?)?;
        let tail = x.narrow(D::Minus1, c.rope_dims, c.head_dim - c.rope_dims)?;
        Tensor::cat(&[&head, &tail], D::Minus1)
    }
}

pub struct DeviceLlama {
    pub config: LlamaConfig,
    device: Device,
    /// The token embedding, dequantized on the device (`[vocab, width]`, f32) for `index_select`.
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    rope: Rope,
    /// The sliding-window layers' own base, without scaling; None when no layer slides.
    rope_swa: Option<Rope>,
    pub weight_types: Vec<GgmlDType>,
    /// Rows per quantized product ([`DEVICE_PRODUCT_ROWS`] on GPUs), or None: whole products.
    product_rows: Option<usize>,
}

/// One sequence's keys and values on the device: per layer a `[kv_heads, capacity, head_dim]` slab,
/// of which the first `len` positions are filled.
pub struct DeviceCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl DeviceCache {
    /// Appends `[kv_heads, rows, head_dim]` keys and values to layer `li` and returns every position's.
    fn append(&mut self, li: usize, k: &Tensor, v: &Tensor, context: usize) -> Result<(Tensor, Tensor)> {
        let rows = k.dim(1)?;
        let need = self.len + rows;
        if need > self.capacity {
            let capacity = need.div_ceil(CACHE_GROWTH).saturating_mul(CACHE_GROWTH).min(context.max(need));
            for slab in self.k.iter_mut().chain(self.v.iter_mut()) {
                let (heads, old, hd) = slab.dims3()?;
                let more = Tensor::zeros((heads, capacity - old, hd), DType::F32, slab.device())?;
                *slab = Tensor::cat(&[&*slab, &more], 1)?;
            }
            self.capacity = capacity;
        }
        self.k[li].slice_set(&k.contiguous()?, 1, self.len)?;
        self.v[li].slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((self.k[li].narrow(1, 0, need)?, self.v[li].narrow(1, 0, need)?))
    }
}

/// Activation rows per quantized product on a GPU: every product runs on chunks of exactly this many.
///
/// candle's CUDA kernels sum in an order that depends on how many rows a product has: its MMVQ kernel
/// takes four warps per weight row up to four activation rows and two from five to eight, and above
/// eight the tiled MMQ kernel takes over. On the first H200 run a prompt read 4 rows a step scored
/// differently from the same prompt read whole (mean KLD 9e-6, |dlogprob| up to 0.21). With every
/// product at eight rows, each row goes through the same kernel with the same partition of its sums,
/// and the kernel computes each activation row apart from the others, so a row's bits no longer
/// depend on the rows beside it. A step's rows are padded once, at the embedding, to a multiple of
/// eight (the pad rows ride along and are never attended to, cached or read out), so the chunks are
/// views; only the attention output and the head's rows are padded again. The cost: a 1-row step
/// computes 8, and a step of more than 8 rows runs one launch per 8 rows, each reading the weights.
/// (On the CPU candle's products already compute each row alone, and run whole.)
const DEVICE_PRODUCT_ROWS: usize = 8;

/// `w.forward(x)` computed on chunks of exactly `n` rows, the last padded with zero rows whose results
/// are dropped.
fn fixed_rows(w: &QMatMul, x: &Tensor, n: usize) -> Result<Tensor> {
    let rows = x.dim(0)?;
    let mut outs = Vec::with_capacity(rows.div_ceil(n));
    for r0 in (0..rows).step_by(n) {
        let take = (rows - r0).min(n);
        // A whole chunk of contiguous rows is a view; only a last, short one is copied, to pad it.
        let chunk = pad_rows(x.narrow(0, r0, take)?, n)?.contiguous()?;
        outs.push(w.forward(&chunk)?.narrow(0, 0, take)?);
    }
    match outs.len() {
        1 => Ok(outs.remove(0)),
        _ => Tensor::cat(&outs, 0),
    }
}

/// `x` (`[r, k]`) with zero rows appended up to `rows`.
fn pad_rows(x: Tensor, rows: usize) -> Result<Tensor> {
    let (r, k) = x.dims2()?;
    match r < rows {
        true => Tensor::cat(&[&x, &Tensor::zeros((rows - r, k), x.dtype(), x.device())?], 0),
        false => Ok(x),
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)
}

fn add_bias(x: Tensor, b: &Option<Tensor>) -> Result<Tensor> {
    match b {
        Some(b) => x.broadcast_add(b),
        None => Ok(x),
    }
}

impl DeviceLlama {
    /// Loads every tensor named the way llama.cpp's converter names them, onto `device`.
    pub fn load_from<R: std::io::Read + std::io::Seek>(
        content: &Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let mut types = Vec::new();
        let mut q = |name: &str, r: &mut R| -> Result<QTensor> {
            let t = content.tensor(r, name, device)?;
            if !types.contains(&t.dtype()) {
                types.push(t.dtype());
            }
            Ok(t)
        };
        let (config, tok) = read_config_and_embedding(content, reader, &mut q)?;
        let embed = tok.dequantize(device)?;
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => QMatMul::from_qtensor(q("output.weight", reader)?)?,
            // Tied embeddings: the output head is the embedding matrix, kept in its blocks.
            false => QMatMul::from_qtensor(tok)?,
        };
        let norm = q("output_norm.weight", reader)?.dequantize(device)?;
        let (q_dim, kv_dim) = (config.n_head * config.head_dim, config.kv_dim());
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("blk.{i}");
            let has = |n: &str| content.tensor_infos.contains_key(&format!("{p}.{n}"));
            if has("rope_factors_long.weight") {
                bail!("{p}: LongRoPE factors (Phi-3 128k) are not supported yet");
            }
            let mut vec = |n: &str, want: Option<usize>, r: &mut R| -> Result<Tensor> {
                let t = q(&format!("{p}.{n}"), r)?.dequantize(device)?.flatten_all()?;
                match want {
                    Some(w) if t.dim(0)? != w => bail!("{p}.{n} has {} values, expected {w}", t.dim(0)?),
                    _ => Ok(t),
                }
            };
            let mut opt = |n: &str, on: bool, want: usize, r: &mut R| -> Result<Option<Tensor>> {
                if on { vec(n, Some(want), r).map(Some) } else { Ok(None) }
            };
            let hd = config.head_dim;
            let q_norm = opt("attn_q_norm.weight", config.qk_norm, hd, reader)?;
            let k_norm = opt("attn_k_norm.weight", config.qk_norm, hd, reader)?;
            let post_attn_norm = opt("post_attention_norm.weight", config.post_norms, config.n_embd, reader)?;
            let post_ffn_norm = opt("post_ffw_norm.weight", config.post_norms, config.n_embd, reader)?;
            let bq = opt("attn_q.bias", has("attn_q.bias"), q_dim, reader)?;
            let bk = opt("attn_k.bias", has("attn_k.bias"), kv_dim, reader)?;
            let bv = opt("attn_v.bias", has("attn_v.bias"), kv_dim, reader)?;
            let attn_norm = opt("attn_norm.weight", true, config.n_embd, reader)?.expect("on");
            let ffn_norm = opt("ffn_norm.weight", true, config.n_embd, reader)?.expect("on");
            let mut m = |n: &str| -> Result<QMatMul> { QMatMul::from_qtensor(q(&format!("{p}.{n}.weight"), reader)?) };
            let qkv = if has("attn_qkv.weight") {
                Qkv::Fused(m("attn_qkv")?)
            } else {
                Qkv::Split { q: m("attn_q")?, k: m("attn_k")?, v: m("attn_v")? }
            };
            let gate_up = if has("ffn_gate.weight") {
                GateUp::Split { gate: m("ffn_gate")?, up: m("ffn_up")? }
            } else {
                GateUp::Fused(m("ffn_up")?)
            };
            layers.push(Layer {
                attn_norm,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                qkv,
                bq,
                bk,
                bv,
                wo: m("attn_output")?,
                ffn_norm,
                gate_up,
                w_down: m("ffn_down")?,
            });
        }
        let freqs = read_rope_freqs(content, reader, &mut q, &config)?;
        let rope = Rope::new(&config, config.rope_base, config.rope_freq_scale, freqs.as_deref(), device)?;
        let rope_swa = match config.window.iter().any(Option::is_some) {
            true => Some(Rope::new(&config, config.rope_base_swa, 1.0, freqs.as_deref(), device)?),
            false => None,
        };
        let product_rows = (!device.is_cpu()).then_some(DEVICE_PRODUCT_ROWS);
        Ok(Self {
            config,
            device: device.clone(),
            embed,
            layers,
            norm,
            output,
            rope,
            rope_swa,
            weight_types: types,
            product_rows,
        })
    }

    /// `w` times the `[rows, k]` activations `x`, whole or in chunks of `product_rows`.
    fn product(&self, w: &QMatMul, x: &Tensor) -> Result<Tensor> {
        match self.product_rows {
            None => w.forward(x),
            Some(n) => fixed_rows(w, x, n),
        }
    }

    /// One sequence's attention at layer `li` over rows `row0..row0 + n` of the projections
    /// (`[rows, width]` each), its keys and values appended to its cache first.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        li: usize,
        cache: &mut DeviceCache,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        row0: usize,
        n: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (hd, heads, kv_heads) = (c.head_dim, c.n_head, c.n_kv_head);
        let window = c.window[li];
        let rope = match (window, &self.rope_swa) {
            (Some(_), Some(swa)) => swa,
            _ => &self.rope,
        };
        let start = cache.len;
        // [1, heads, rows, head_dim], as candle's RoPE takes them.
        let split = |x: &Tensor, h: usize| x.narrow(0, row0, n)?.reshape((n, h, hd))?.transpose(0, 1)?.unsqueeze(0);
        let qs = rope.apply(&split(q, heads)?, start, c)?.squeeze(0)?;
        let ks = rope.apply(&split(k, kv_heads)?, start, c)?.squeeze(0)?;
        let vs = split(v, kv_heads)?.squeeze(0)?;
        let (keys, values) = cache.append(li, &ks, &vs, c.context_length)?;
        let group = heads / kv_heads;
        let scale = 1.0 / (hd as f64).sqrt();
        // Row by row, each over exactly the keys it sees: a row's attention is then the same computation
        // (same shapes, same kernels) whether its sequence is prefilled whole, in pieces, or decoded one
        // token at a time, and beside any other rows. A rectangular masked block would be faster for long
        // prompts, but candle's matrix products and softmax change their float order with the block's
        // size, so a row's bits would depend on how its prompt was cut.
        let qs = qs.contiguous()?;
        let mut rows = Vec::with_capacity(n);
        for j in 0..n {
            let pos = start + j;
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let seen = pos + 1 - first;
            // Views into the slab, not copies: the matrix products take the slab's row stride (cuBLAS as
            // a strided batch, a transposed one for the keys), so a row no longer copies its whole
            // context twice per layer, two kernel launches of O(context) each on a GPU.
            let k = keys.narrow(1, first, seen)?;
            let v = values.narrow(1, first, seen)?;
            // This row's queries grouped by their KV head: [kv_heads, group, head_dim].
            let q = qs.narrow(1, j, 1)?.reshape((kv_heads, group, hd))?;
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            rows.push(probs.matmul(&v)?.reshape((1, heads * hd))?);
        }
        Tensor::cat(&rows, 0)
    }
}

impl Decoder for DeviceLlama {
    type Cache = DeviceCache;

    fn load<R: std::io::Read + std::io::Seek>(content: &Content, reader: &mut R, device: &Device) -> Result<Self> {
        Self::load_from(content, reader, device)
    }

    fn weight_types(&self) -> &[GgmlDType] {
        &self.weight_types
    }

    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn new_cache(&self) -> Result<DeviceCache> {
        let c = &self.config;
        let slab = || Tensor::zeros((c.n_kv_head, 0, c.head_dim), DType::F32, &self.device);
        let k = (0..c.n_layer).map(|_| slab()).collect::<Result<Vec<_>>>()?;
        let v = (0..c.n_layer).map(|_| slab()).collect::<Result<Vec<_>>>()?;
        Ok(DeviceCache { k, v, len: 0, capacity: 0 })
    }

    fn cached(cache: &DeviceCache) -> usize {
        cache.len
    }

    fn forward(&self, steps: &mut [Step<'_, DeviceCache>]) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.kv_dim());
        let total: usize = steps.iter().map(|s| s.tokens.len()).sum();
        if total == 0 {
            return Ok(steps.iter().map(|_| None).collect());
        }
        let mut ids = Vec::with_capacity(total);
        for s in steps.iter() {
            if s.cache.len + s.tokens.len() > c.context_length {
                bail!(
                    "sequence of {} tokens exceeds the context length {}",
                    s.cache.len + s.tokens.len(),
                    c.context_length
                );
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                bail!("token id {t} is outside the vocabulary of {}", c.vocab_size);
            }
            ids.extend_from_slice(s.tokens);
        }
        // The rows every product runs on: the step's, padded on GPUs (see DEVICE_PRODUCT_ROWS) with token
        // 0, whose rows nothing reads.
        let rows = self.product_rows.map_or(total, |n| total.next_multiple_of(n));
        ids.resize(rows, 0);
        let ids = Tensor::from_vec(ids, rows, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        if let Some(scale) = c.embed_scale {
            x = (x * scale as f64)?;
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let (q, k, v) = match &layer.qkv {
                Qkv::Split { q, k, v } => (self.product(q, &xn)?, self.product(k, &xn)?, self.product(v, &xn)?),
                Qkv::Fused(w) => {
                    let qkv = self.product(w, &xn)?;
                    (qkv.narrow(1, 0, q_dim)?, qkv.narrow(1, q_dim, kv_dim)?, qkv.narrow(1, q_dim + kv_dim, kv_dim)?)
                }
            };
            let (mut q, mut k, v) = (add_bias(q, &layer.bq)?, add_bias(k, &layer.bk)?, add_bias(v, &layer.bv)?);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(&q.reshape((rows, c.n_head, c.head_dim))?, qn, c.rms_eps)?.reshape((rows, q_dim))?;
                k = rms_norm(&k.reshape((rows, c.n_kv_head, c.head_dim))?, kn, c.rms_eps)?.reshape((rows, kv_dim))?;
            }
            let mut outs = Vec::with_capacity(steps.len());
            let mut row = 0;
            for s in steps.iter_mut() {
                let n = s.tokens.len();
                if n > 0 {
                    outs.push(self.attend(li, s.cache, &q, &k, &v, row, n)?);
                }
                row += n;
            }
            let attn = pad_rows(Tensor::cat(&outs, 0)?, rows)?;
            let mut o = self.product(&layer.wo, &attn)?;
            if let Some(w) = &layer.post_attn_norm {
                o = rms_norm(&o, w, c.rms_eps)?;
            }
            x = (x + o)?;
            let xn = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let (gate, up) = match &layer.gate_up {
                GateUp::Split { gate, up } => (self.product(gate, &xn)?, self.product(up, &xn)?),
                GateUp::Fused(w) => {
                    let gu = self.product(w, &xn)?;
                    (gu.narrow(1, 0, c.n_ff)?, gu.narrow(1, c.n_ff, c.n_ff)?)
                }
            };
            let act = match c.activation {
                Activation::Silu => candle_nn::ops::silu(&gate)?,
                Activation::GeluTanh => gate.gelu()?,
            };
            let mut down = self.product(&layer.w_down, &(act * up)?)?;
            if let Some(w) = &layer.post_ffn_norm {
                down = rms_norm(&down, w, c.rms_eps)?;
            }
            x = (x + down)?;
            // Every step's cache now holds this layer; the length moves once all layers have it.
            if li + 1 == self.layers.len() {
                for s in steps.iter_mut() {
                    s.cache.len += s.tokens.len();
                }
            }
        }
        // Only the wanted rows go through the head, and only their logits come down.
        let mut wanted = Vec::new();
        let mut rows = Vec::new();
        let mut row = 0;
        for (i, s) in steps.iter().enumerate() {
            let n = s.tokens.len();
            row += n;
            let take = match s.logits {
                _ if n == 0 => 0,
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => n,
            };
            if take > 0 {
                wanted.push((i, take));
                rows.push(x.narrow(0, row - take, take)?);
            }
        }
        let mut out: Vec<Option<Vec<f32>>> = steps.iter().map(|_| None).collect();
        if wanted.is_empty() {
            return Ok(out);
        }
        let head = rms_norm(&Tensor::cat(&rows, 0)?, &self.norm, c.rms_eps)?;
        let mut logits = self.product(&self.output, &head)?;
        if self.product_rows.is_some() {
            // A view of a padded product's rows would bring the padding down too. (A whole product's
            // logits are their own tensor already; copying them again would cost vocab x rows a step.)
            logits = logits.force_contiguous()?;
        }
        let logits = logits.to_device(&Device::Cpu)?;
        let mut first = 0;
        for (i, take) in wanted {
            out[i] = Some(logits.i(first..first + take)?.flatten_all()?.to_vec1::<f32>()?);
            first += take;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder that pads its steps and runs its products in 8-row chunks (what GPUs run), here on the
    /// CPU, gives the whole-product decoder's logits bit for bit: the pad rows are never attended to,
    /// cached or read out. On SmolLM2 (Q4_1) and Gemma 3 (Q4_K_M: Q/K norms, post-norms, sliding
    /// windows), across steps of two sequences with 1 to 13 rows. Quantized files, because candle's CPU
    /// products compute each row alone only for quantized weights: the tiny test files' f32 matrices go
    /// through a general matrix product whose sums follow the row count.
    #[test]
    fn device_generic_padded_steps_give_the_unpadded_logits() {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
        for file in ["SmolLM2-135M-Instruct.Q4_1.gguf", "optional/gemma-3-270m-q4_k_m.gguf"] {
            let path = root.join(file);
            assert!(path.exists(), "{} is missing: python3 models/fetch.py --with gemma3", path.display());
            let load = || {
                let mut f = std::fs::File::open(&path).unwrap();
                let content = Content::read(&mut f).unwrap();
                DeviceLlama::load_from(&content, &mut f, &Device::Cpu).unwrap()
            };
            let whole = load();
            let mut padded = load();
            padded.product_rows = Some(DEVICE_PRODUCT_ROWS);
            let ids: Vec<u32> = (0..40u32).map(|i| 1000 + i * 37).collect();
            // (tokens of sequence a, tokens of sequence b) per step, logits of every row.
            let steps = [(0..5, 5..8), (8..9, 9..10), (10..19, 19..23), (23..24, 24..24), (24..25, 25..37)];
            let run = |m: &DeviceLlama| {
                let (mut a, mut b) = (m.new_cache().unwrap(), m.new_cache().unwrap());
                let mut out = Vec::new();
                for (ra, rb) in steps.clone() {
                    let logits = m
                        .forward(&mut [
                            Step { tokens: &ids[ra], cache: &mut a, logits: Logits::All },
                            Step { tokens: &ids[rb], cache: &mut b, logits: Logits::All },
                        ])
                        .unwrap();
                    out.push(logits.into_iter().map(|l| l.map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())));
                }
                out.into_iter().flatten().collect::<Vec<_>>()
            };
            let (got, want) = (run(&padded), run(&whole));
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g == w, "{file}: step {} sequence {} differs", i / 2, i % 2);
            }
        }
    }

    /// Products in fixed chunks of rows, the last padded (what GPUs run), give the whole product's bits
    /// for every row count around the chunk, on the CPU where a product computes each row alone.
    #[test]
    fn device_generic_products_in_fixed_chunks_are_the_whole_product() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
            let w = Tensor::randn(0f32, 1.0, (48, 256), &dev).unwrap();
            let w = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            for rows in [1, 5, 7, 8, 9, 16, 21] {
                let x = Tensor::randn(0f32, 1.0, (rows, 256), &dev).unwrap();
                let whole = w.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let fixed = fixed_rows(&w, &x, 8).unwrap();
                assert_eq!(fixed.dims(), &[rows, 48]);
                let fixed = fixed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fixed), bits(&whole), "{dtype:?}, {rows} rows");
            }
        }
    }
}
