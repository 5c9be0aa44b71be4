//! BERT encoder as sentence-transformers runs it (HF `BertModel`): embeddings, then post-norm encoder
//! layers; `forward` returns every token's last hidden state for a padded batch with its attention mask.
use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder, embedding, layer_norm, linear};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// Exact GELU with erf, what HF's "gelu" is.
    Gelu,
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluApproximate,
    Relu,
}

fn default_act() -> HiddenAct {
    HiddenAct::Gelu
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// The fields of a HF BERT `config.json` that inference needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: HiddenAct,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub model_type: Option<String>,
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    act: HiddenAct,
    pub config: BertConfig,
}

impl Bert {
    /// Loads the weights; accepts both bare (`embeddings.*`, as sentence-transformers saves) and
    /// `bert.`-prefixed names (as `BertForMaskedLM` and friends save).
    pub fn load(vb: VarBuilder<'_>, config: BertConfig) -> Result<Self> {
        if !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size,
                config.num_attention_heads
            );
        }
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") { vb } else { vb.pp("bert") };
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let e = vb.pp("embeddings");
        let embeddings = Embeddings {
            word: embedding(config.vocab_size, h, e.pp("word_embeddings"))?,
            position: embedding(config.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type: embedding(config.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: layer_norm(h, eps, e.pp("LayerNorm"))?,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            layers.push(Layer {
                query: linear(h, h, a.pp("self.query"))?,
                key: linear(h, h, a.pp("self.key"))?,
                value: linear(h, h, a.pp("self.value"))?,
                attn_out: linear(h, h, a.pp("output.dense"))?,
                attn_norm: layer_norm(h, eps, a.pp("output.LayerNorm"))?,
                intermediate: linear(h, config.intermediate_size, l.pp("intermediate.dense"))?,
                output: linear(config.intermediate_size, h, l.pp("output.dense"))?,
                out_norm: layer_norm(h, eps, l.pp("output.LayerNorm"))?,
            });
        }
        Ok(Self {
            embeddings,
            layers,
            heads: config.num_attention_heads,
            head_dim: h / config.num_attention_heads,
            hidden: h,
            act: config.hidden_act,
            config,
        })
    }

    /// `input_ids`: `[batch, len]` u32, padded; `mask`: `[batch, len]` f32, 1 for real tokens and 0 for
    /// padding. Returns `[batch, len, hidden]`; rows at padding positions are meaningless.
    pub fn forward(&self, input_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, len) = input_ids.dims2()?;
        if len > self.config.max_position_embeddings {
            candle_core::bail!("{len} tokens exceed max_position_embeddings {}", self.config.max_position_embeddings);
        }
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, len as u32, device)?;
        let types = Tensor::zeros(len, DType::U32, device)?;
        // Position and token-type rows are the same for every sequence: add them once, broadcast.
        let pos_type = (self.embeddings.position.forward(&positions)? + self.embeddings.token_type.forward(&types)?)?;
        let words = self.embeddings.word.forward(input_ids)?; // [b, len, h]
        let x = words.broadcast_add(&pos_type)?;
        let x = self.embeddings.norm.forward(&x)?;
        // Work on [b * len, h] so every linear layer is one plain matrix product.
        let mut x = x.reshape((b * len, self.hidden))?;
        // Additive mask: 0 where attended, a large negative where padded (what HF does with finfo.min;
        // -1e9 keeps clear of inf - inf when a whole row is padding).
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, len))?;
        for layer in &self.layers {
            x = self.layer(layer, &x, &bias, b, len)?;
        }
        x.reshape((b, len, self.hidden))
    }

    /// The packed layout on any device: every sequence's tokens end to end as one `[total, hidden]`
    /// matrix for the linear layers, attention per sequence over its own length (no padding, no mask).
    /// Returns `[total, hidden]`, each sequence's rows in order.
    pub fn forward_packed(&self, seqs: &[&[u32]], device: &candle_core::Device) -> Result<Tensor> {
        let max = self.config.max_position_embeddings;
        if let Some(s) = seqs.iter().find(|s| s.len() > max) {
            candle_core::bail!("{} tokens exceed max_position_embeddings {max}", s.len());
        }
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let positions: Vec<u32> = seqs.iter().flat_map(|s| 0..s.len() as u32).collect();
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, device)?;
        let positions = Tensor::from_vec(positions, total, device)?;
        let types = Tensor::zeros(total, DType::U32, device)?;
        let e = &self.embeddings;
        let x = ((e.word.forward(&ids)? + e.position.forward(&positions)?)? + e.token_type.forward(&types)?)?;
        let mut x = e.norm.forward(&x)?;
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        for layer in &self.layers {
            x = self.packed_layer(layer, &x, &lens)?;
        }
        Ok(x)
    }

    fn packed_layer(&self, l: &Layer, x: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (q, k, v) = (l.query.forward(x)?, l.key.forward(x)?, l.value.forward(x)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut ctx = Vec::with_capacity(lens.len());
        let mut row = 0;
        for &n in lens {
            let heads = |t: &Tensor| t.narrow(0, row, n)?.reshape((n, self.heads, self.head_dim))?.transpose(0, 1);
            let (qs, ks, vs) = (heads(&q)?.contiguous()?, heads(&k)?.contiguous()?, heads(&v)?.contiguous()?);
            let probs = super::kernels::ops::softmax_last_dim(&(qs.matmul(&ks.t()?)? * scale)?)?;
            ctx.push(probs.matmul(&vs)?.transpose(0, 1)?.reshape((n, self.hidden))?);
            row += n;
        }
        let ctx = Tensor::cat(&ctx, 0)?;
        self.after_attention(l, &ctx, x)
    }

    /// The rest of a layer once attention's context is known, the same for both layouts: the output
    /// projection and residual norm, then the feed-forward block and its residual norm.
    fn after_attention(&self, l: &Layer, ctx: &Tensor, x: &Tensor) -> Result<Tensor> {
        let attn = l.attn_norm.forward(&(l.attn_out.forward(ctx)? + x)?)?;
        let inter = l.intermediate.forward(&attn)?;
        let inter = match self.act {
            HiddenAct::Gelu => super::kernels::ops::gelu_erf(&inter)?,
            HiddenAct::GeluApproximate => inter.gelu()?,
            HiddenAct::Relu => inter.relu()?,
        };
        l.out_norm.forward(&(l.output.forward(&inter)? + attn)?)
    }

    fn layer(&self, l: &Layer, x: &Tensor, bias: &Tensor, b: usize, len: usize) -> Result<Tensor> {
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, len, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = split(l.query.forward(x)?)?;
        let k = split(l.key.forward(x)?)?;
        let v = split(l.value.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
        let probs = super::kernels::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * len, self.hidden))?;
        self.after_attention(l, &ctx, x)
    }
}

/// Mean of the hidden states over real tokens: `[b, len, h]`, `[b, len]` -> `[b, h]`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?; // [b, len, 1]
    let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
    let count = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    sum.broadcast_div(&count)
}

/// Element-wise max over real tokens.
pub fn max_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    // Padding gets -1e9 so it never wins (sentence-transformers does the same).
    let masked = hidden.broadcast_add(&((mask - 1.0)? * 1e9)?)?;
    masked.max(1)
}

/// The first token's ([CLS]) hidden state.
pub fn cls_pool(hidden: &Tensor) -> Result<Tensor> {
    hidden.narrow(1, 0, 1)?.squeeze(1)
}
