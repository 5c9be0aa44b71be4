//! The BERT encoder on the CPU without padding: a batch's tokens packed end to end as one
//! `[total_tokens, hidden]` matrix for every linear layer, attention per sequence over its own length
//! (TEI's "varlen" layout), Q, K and V in one product. A batch costs what its tokens cost, whatever
//! their mix of lengths, and a sentence's rows are bit-identical alone or in any batch: every row's
//! arithmetic depends only on its own sequence (see `sgemm`).
//!
//! Numerics are HF `BertModel`'s (post-norm layers, exact GELU), in f32, on our kernels and the compute
//! team. The device-generic candle version is [`super::bert::Bert`].
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, bail};

use super::bert::{BertConfig, HiddenAct};
use super::kernels::cpu;
use super::kernels::ops;
use super::kernels::sgemm::{self, Dense, Epilogue, Rows};
use super::kernels::team::{Disjoint, Team};

/// LayerNorm's weight and bias.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

struct Layer {
    /// Q, K and V side by side: `[3 * hidden]` outputs.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    intermediate: Dense,
    output: Dense,
    out_norm: Norm,
}

pub struct PackedBert {
    pub config: BertConfig,
    word: Vec<f32>,
    position: Vec<f32>,
    /// Token type 0's row: inputs carry no segment ids.
    token_type: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
}

/// Where each sequence's rows are in the packed matrix.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
}

struct Weights {
    st: MmapedSafetensors,
    prefix: &'static str,
}

impl Weights {
    fn get(&self, name: &str, numel: usize) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let t = self.st.load(&full, &Device::Cpu)?.to_dtype(DType::F32)?;
        if t.elem_count() != numel {
            bail!("{full} has {} values, expected {numel}", t.elem_count());
        }
        t.flatten_all()?.to_vec1::<f32>()
    }

    fn norm(&self, name: &str, h: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            gamma: self.get(&format!("{name}.weight"), h)?,
            beta: self.get(&format!("{name}.bias"), h)?,
            eps: eps as f32,
        })
    }

    fn dense(&self, name: &str, n: usize, k: usize) -> Result<Dense> {
        let w = self.get(&format!("{name}.weight"), n * k)?;
        let b = self.get(&format!("{name}.bias"), n)?;
        Ok(Dense::new(&w, n, k, Some(&b)))
    }
}

impl PackedBert {
    /// Loads `model.safetensors` (bare names as sentence-transformers saves them, or `bert.`-prefixed).
    pub fn load(weights: &Path, config: BertConfig) -> Result<Self> {
        if config.hidden_act != HiddenAct::Gelu {
            bail!("hidden_act {:?} has no packed CPU kernel (only exact GELU)", config.hidden_act);
        }
        let (h, heads) = (config.hidden_size, config.num_attention_heads);
        if heads == 0 || !h.is_multiple_of(heads) {
            bail!("hidden_size {h} is not a multiple of num_attention_heads {heads}");
        }
        // SAFETY: the file is memory-mapped read-only; omnibus never writes model files, and one changed
        // underneath a running server is outside what any server can defend against.
        let st = unsafe { MmapedSafetensors::new(weights)? };
        let prefix = if st.get("embeddings.word_embeddings.weight").is_ok() { "" } else { "bert." };
        let w = Weights { st, prefix };
        let (ff, eps) = (config.intermediate_size, config.layer_norm_eps);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let a = format!("{p}.attention");
            let (q, k, v) = (
                w.get(&format!("{a}.self.query.weight"), h * h)?,
                w.get(&format!("{a}.self.key.weight"), h * h)?,
                w.get(&format!("{a}.self.value.weight"), h * h)?,
            );
            let (qb, kb, vb) = (
                w.get(&format!("{a}.self.query.bias"), h)?,
                w.get(&format!("{a}.self.key.bias"), h)?,
                w.get(&format!("{a}.self.value.bias"), h)?,
            );
            layers.push(Layer {
                qkv: Dense::stacked(&[(&q, h, Some(&qb)), (&k, h, Some(&kb)), (&v, h, Some(&vb))], h),
                attn_out: w.dense(&format!("{a}.output.dense"), h, h)?,
                attn_norm: w.norm(&format!("{a}.output.LayerNorm"), h, eps)?,
                intermediate: w.dense(&format!("{p}.intermediate.dense"), ff, h)?,
                output: w.dense(&format!("{p}.output.dense"), h, ff)?,
                out_norm: w.norm(&format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        let token_type = w.get("embeddings.token_type_embeddings.weight", config.type_vocab_size * h)?[..h].to_vec();
        Ok(Self {
            word: w.get("embeddings.word_embeddings.weight", config.vocab_size * h)?,
            position: w.get("embeddings.position_embeddings.weight", config.max_position_embeddings * h)?,
            token_type,
            emb_norm: w.norm("embeddings.LayerNorm", h, eps)?,
            layers,
            config,
        })
    }

    /// Every token's last hidden state, the sequences' rows one after another: `[total, hidden]`.
    pub fn forward(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        self.forward_counting(seqs, None)
    }

    /// [`Self::forward`], adding to `subnormals` (when given) how many attention probabilities and
    /// layer outputs were subnormal floats: the guard that keeps them from coming back.
    pub fn forward_counting(&self, seqs: &[&[u32]], subnormals: Option<&AtomicUsize>) -> Result<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden_size;
        let mut spans = Vec::with_capacity(seqs.len());
        let mut total = 0;
        for s in seqs {
            if s.len() > c.max_position_embeddings {
                bail!("{} tokens exceed max_position_embeddings {}", s.len(), c.max_position_embeddings);
            }
            if let Some(&t) = s.iter().find(|&&t| t as usize >= c.vocab_size) {
                bail!("token id {t} is outside the vocabulary of {}", c.vocab_size);
            }
            spans.push(Span { start: total, len: s.len() });
            total += s.len();
        }
        let mut x = Vec::with_capacity(total * h);
        for s in seqs {
            for (p, &t) in s.iter().enumerate() {
                let (w, pos) = (&self.word[t as usize * h..][..h], &self.position[p * h..][..h]);
                x.extend(w.iter().zip(pos).zip(&self.token_type).map(|((a, b), c)| a + b + c));
            }
        }
        layer_norm(&mut x, &self.emb_norm, h);
        let count = |v: &[f32]| {
            if let Some(n) = subnormals {
                n.fetch_add(v.iter().filter(|x| x.is_subnormal()).count(), Ordering::Relaxed);
            }
        };
        for l in &self.layers {
            let qkv = l.qkv.forward(&x, total, Epilogue::Bias);
            let ctx = attention(&qkv, &spans, c.num_attention_heads, h / c.num_attention_heads, subnormals);
            let mut a = l.attn_out.forward(&ctx, total, Epilogue::BiasResidual(&x));
            layer_norm(&mut a, &l.attn_norm, h);
            let inter = l.intermediate.forward(&a, total, Epilogue::BiasGelu);
            count(&inter);
            x = l.output.forward(&inter, total, Epilogue::BiasResidual(&a));
            layer_norm(&mut x, &l.out_norm, h);
            count(&x);
        }
        Ok(x)
    }
}

/// Rows per layer-norm task.
const NORM_ROWS: usize = 64;

/// LayerNorm of every `width`-wide row in place: mean and variance in f32 over eight lanes.
fn layer_norm(x: &mut [f32], n: &Norm, width: usize) {
    let rows = x.len() / width;
    let tasks = rows.div_ceil(NORM_ROWS);
    let buf = Disjoint::new(x);
    Team::global().run(tasks, &|t| {
        let r = t * NORM_ROWS..((t + 1) * NORM_ROWS).min(rows);
        // SAFETY: tasks own disjoint runs of rows.
        let rows = unsafe { buf.range(r.start * width..r.end * width) };
        norm_rows_any(rows, n, width);
    });
}

fn norm_rows_any(x: &mut [f32], n: &Norm, width: usize) {
    #[cfg(target_arch = "x86_64")]
    if cpu::features().avx2_fma {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &mut [f32], n: &Norm, width: usize) {
            norm_rows(x, n, width)
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2(x, n, width) };
    }
    norm_rows(x, n, width)
}

/// Eight-lane sums: vectorizes, and the order is the same on every path.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for &v in rest {
        s += f(v);
    }
    s
}

#[inline(always)]
fn norm_rows(x: &mut [f32], n: &Norm, width: usize) {
    for row in x.chunks_exact_mut(width) {
        let mean = lane_sum(row, |v| v) / width as f32;
        let var = lane_sum(row, |v| (v - mean) * (v - mean)) / width as f32;
        let inv = 1.0 / (var + n.eps).sqrt();
        for ((v, &g), &b) in row.iter_mut().zip(&n.gamma).zip(&n.beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// Self-attention of every sequence over its own rows only: one task per (sequence, head). `qkv` is
/// `[total, 3 * hidden]` (Q, K, V side by side); returns `[total, hidden]`.
fn attention(qkv: &[f32], spans: &[Span], heads: usize, head_dim: usize, subnormals: Option<&AtomicUsize>) -> Vec<f32> {
    let h = heads * head_dim;
    let total = qkv.len() / (3 * h);
    let mut out = vec![f32::NAN; total * h];
    let o = super::kernels::qmatmul::Out::new(&mut out, total, h);
    Team::global().run(spans.len() * heads, &|t| {
        let (span, head) = (spans[t / heads], t % heads);
        let found = attend(qkv, span, head, heads, head_dim, &o);
        if let Some(n) = subnormals {
            n.fetch_add(found, Ordering::Relaxed);
        }
    });
    out
}

/// One head of one sequence: softmax(q k^T / sqrt(d)) v as two small matrix products on the calling
/// thread, through the same micro-kernels as the linear layers (`sgemm::local`): Q times K^T (K packed
/// as the product's right-hand side), a softmax per row, then the probabilities times V. Every score is
/// one multiply-add chain over the head's dimensions, every output one chain over the keys, in a fixed
/// order: a row's result never depends on the other rows. Returns how many probabilities were
/// subnormal (always 0: see `ops::softmax_exp`).
fn attend(qkv: &[f32], s: Span, head: usize, heads: usize, hd: usize, out: &super::kernels::qmatmul::Out) -> usize {
    let (h, len) = (heads * hd, s.len);
    let ld = 3 * h;
    let base = s.start * ld + head * hd;
    let at = |j: usize, part: usize, d: usize| qkv[base + j * ld + part * h + d];
    let kt = sgemm::pack(hd, len, |d, j| at(j, 1, d));
    let mut p = vec![0f32; len * len];
    sgemm::local(Rows { a: &qkv[base..], lda: ld, rows: len }, &kt, &mut p, len);
    let subnormal = softmax_rows_any(&mut p, len, 1.0 / (hd as f32).sqrt());
    let v = sgemm::pack(len, hd, |j, d| at(j, 2, d));
    let mut ctx = vec![0f32; len * hd];
    sgemm::local(Rows { a: &p, lda: len, rows: len }, &v, &mut ctx, hd);
    for (i, row) in ctx.chunks_exact(hd).enumerate() {
        // SAFETY: this task owns head `head`'s columns of its sequence's rows.
        unsafe { out.set_span(s.start + i, head * hd, row) };
    }
    subnormal
}

fn softmax_rows_any(p: &mut [f32], width: usize, scale: f32) -> usize {
    #[cfg(target_arch = "x86_64")]
    if cpu::features().avx2_fma {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(p: &mut [f32], width: usize, scale: f32) -> usize {
            softmax_rows(p, width, scale)
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2(p, width, scale) };
    }
    softmax_rows(p, width, scale)
}

/// Softmax of every `width`-wide row of `scale * p`, in place; counts subnormal results.
#[inline(always)]
fn softmax_rows(p: &mut [f32], width: usize, scale: f32) -> usize {
    let mut subnormal = 0;
    for row in p.chunks_exact_mut(width) {
        let mut max = f32::NEG_INFINITY;
        for v in row.iter_mut() {
            *v *= scale;
            max = max.max(*v);
        }
        for v in row.iter_mut() {
            *v = ops::softmax_exp(*v - max);
        }
        let inv = 1.0 / lane_sum(row, |v| v);
        for v in row.iter_mut() {
            *v *= inv;
            subnormal += v.is_subnormal() as usize;
        }
    }
    subnormal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_sees_only_its_own_sequence() {
        // Two sequences, one head of width 8: each row's output is a mix of its own sequence's values.
        let (heads, hd) = (1, 8);
        let h = heads * hd;
        let spans = [Span { start: 0, len: 2 }, Span { start: 2, len: 3 }];
        let mut qkv = vec![0f32; 5 * 3 * h];
        for r in 0..5 {
            for c in 0..h {
                qkv[r * 3 * h + 2 * h + c] = if r < 2 { 1.0 } else { 100.0 + r as f32 };
            }
        }
        let out = attention(&qkv, &spans, heads, hd, None);
        // Equal scores: the mean of the values of the row's own sequence.
        assert!(out[..2 * h].iter().all(|&v| v == 1.0), "{out:?}");
        assert!(out[2 * h..].iter().all(|&v| (v - 103.0).abs() < 1e-4), "{out:?}");
    }

    #[test]
    fn extreme_scores_give_exact_zeros_not_subnormals() {
        let (heads, hd) = (2, 16);
        let h = heads * hd;
        let len = 40;
        let mut qkv = vec![0f32; len * 3 * h];
        for r in 0..len {
            for c in 0..h {
                // Queries and keys far apart: scores spread over hundreds, so most weights underflow.
                qkv[r * 3 * h + c] = (r as f32 - 20.0) * 0.9;
                qkv[r * 3 * h + h + c] = (c as f32 - 8.0) * (r % 5) as f32;
                qkv[r * 3 * h + 2 * h + c] = 1.0;
            }
        }
        let n = AtomicUsize::new(0);
        let out = attention(&qkv, &[Span { start: 0, len }], heads, hd, Some(&n));
        assert_eq!(n.load(Ordering::Relaxed), 0);
        assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-5));
    }
}
