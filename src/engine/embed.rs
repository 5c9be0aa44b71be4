//! A sentence-transformers folder (BERT weights + pooling + normalize config) as an [`Embedder`].
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use tracing::{info, warn};

use super::{EmbedEngine, Embedder, EngineError};
use crate::models::bert::{Bert, BertConfig, HiddenAct, cls_pool, max_pool, mean_pool};
use crate::models::bert_packed::PackedBert;
use crate::tokenizer::TextTokenizer;

/// How token states become one sentence vector (sentence-transformers' Pooling module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    /// Sum divided by sqrt(tokens).
    MeanSqrtLen,
}

/// What the rest of the server needs to know about a loaded embedder.
#[derive(Debug, Clone)]
pub struct EmbedderInfo {
    pub dimension: usize,
    /// Longest input in tokens, special tokens included (sentence-transformers' max_seq_length).
    pub max_input_tokens: usize,
    /// Whether the model's own pipeline normalises (a Normalize module).
    pub normalize: bool,
    pub pooling: Pooling,
    /// Activation memory per token of a batch at its peak (f32): the layer input, Q/K/V, the attention
    /// context, the attention output, the intermediate layer, the packed copy a product reads, and
    /// the layer output. The memory plan sizes the token budget with it.
    pub activation_bytes_per_token: u64,
}

pub struct SentenceEmbedder {
    encoder: Encoder,
    pooling: Pooling,
}

/// The one place the encoder's path is chosen: on the CPU our packed kernels (no padding, see
/// `models::bert_packed`); elsewhere (or with OMNIBUS_ENGINE=device-generic) candle's ops on the same
/// packed layout, or on a padded batch when a test asks for the padded reference.
enum Encoder {
    Packed(PackedBert),
    Device { bert: Bert, device: Device },
    Padded { bert: Bert, device: Device, pad_id: u32 },
}

/// How an encoder runs, when the caller chooses rather than the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderPath {
    /// Our packed CPU kernels (the CPU default).
    Kernels,
    /// candle's ops on the packed layout (every other device's path).
    DeviceGeneric,
    /// candle's ops on a padded batch with a mask (the layout sentence-transformers uses).
    Padded,
}

#[derive(Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::load(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::load(path, e))
}

impl SentenceEmbedder {
    /// Loads `config.json`, `model.safetensors` and the sentence-transformers module configs of `dir`, on
    /// the path the device calls for.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, EmbedderInfo), EngineError> {
        Self::load_on(dir, device, None)
    }

    /// As [`Self::load`], on a chosen path (tests compare them on one device).
    pub fn load_on(
        dir: &Path,
        device: &Device,
        path: Option<EncoderPath>,
    ) -> Result<(Self, EmbedderInfo), EngineError> {
        let config: BertConfig = read_json(&dir.join("config.json"))?;
        // RoBERTa-style models offset their positions by the pad id, and others differ more: the encoder
        // table admits only what the shared encoder runs as its family does.
        crate::models::families::check_encoder(&config).map_err(|e| EngineError::load(dir.join("config.json"), e))?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(EngineError::load(&weights, "missing (only safetensors weights are supported)"));
        }
        let (pooling, normalize) = Self::pipeline(dir)?;
        let st: Option<SentenceBertConfig> = match dir.join("sentence_bert_config.json") {
            p if p.exists() => Some(read_json(&p)?),
            _ => None,
        };
        let max_input_tokens = st
            .and_then(|c| c.max_seq_length)
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        let dimension = config.hidden_size;
        let (h, ff) = (config.hidden_size as u64, config.intermediate_size as u64);
        let activation_bytes_per_token = 4 * (h + 3 * h + h + h + ff + ff.max(h) + h);
        let path = match path {
            Some(p) => p,
            None if !super::device::device_generic(device) => EncoderPath::Kernels,
            None => EncoderPath::DeviceGeneric,
        };
        // Our kernels implement exact GELU only; other activations take candle's ops.
        let path = if path == EncoderPath::Kernels && config.hidden_act != HiddenAct::Gelu {
            EncoderPath::DeviceGeneric
        } else {
            path
        };
        let encoder = if path == EncoderPath::Kernels {
            Encoder::Packed(PackedBert::load(&weights, config).map_err(|e| EngineError::load(&weights, e))?)
        } else {
            // SAFETY: the file is memory-mapped read-only; omnibus never writes model files, and one that
            // is changed underneath a running server is outside what any server can defend against.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
                .map_err(|e| EngineError::load(&weights, e))?;
            let pad_id = config.pad_token_id;
            let bert = Bert::load(vb, config).map_err(|e| EngineError::load(&weights, e))?;
            match path {
                EncoderPath::Padded => Encoder::Padded { bert, device: device.clone(), pad_id },
                _ => Encoder::Device { bert, device: device.clone() },
            }
        };
        let info = EmbedderInfo { dimension, max_input_tokens, normalize, pooling, activation_bytes_per_token };
        Ok((Self { encoder, pooling }, info))
    }

    /// Reads modules.json: which pooling, and whether a Normalize module follows. A folder without it is
    /// a plain transformer: mean pooling, no normalisation (what sentence-transformers assumes too).
    fn pipeline(dir: &Path) -> Result<(Pooling, bool), EngineError> {
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok((Pooling::Mean, false));
        }
        let modules: Vec<Module> = read_json(&modules_path)?;
        let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
        let pooling = match modules.iter().find(|m| m.kind.ends_with(".Pooling")) {
            None => Pooling::Mean,
            Some(m) => {
                let p = dir.join(&m.path).join("config.json");
                let c: PoolingConfig = if p.exists() { read_json(&p)? } else { PoolingConfig::default() };
                match (
                    c.pooling_mode_cls_token,
                    c.pooling_mode_mean_tokens,
                    c.pooling_mode_max_tokens,
                    c.pooling_mode_mean_sqrt_len_tokens,
                ) {
                    (true, false, false, false) => Pooling::Cls,
                    (false, false, true, false) => Pooling::Max,
                    (false, false, false, true) => Pooling::MeanSqrtLen,
                    (false, true, false, false) | (false, false, false, false) => Pooling::Mean,
                    _ => {
                        return Err(EngineError::load(p, "several pooling modes at once are not supported"));
                    }
                }
            }
        };
        Ok((pooling, normalize))
    }
}

/// One device's replica of a sentence-transformers folder, ready to serve.
pub struct ReadyEmbedder {
    pub engine: EmbedEngine,
    pub tokenizer: TextTokenizer,
    pub info: EmbedderInfo,
}

/// Everything a folder needs before it serves on `device`: its weights, its `tokenizer.json`, one warm-up
/// forward pass (so the first caller does not pay for lazy allocations and page faults of the weights), and
/// the model thread. The registry only sees the result.
pub fn ready_embedder(name: &str, dir: &Path, device: &Device) -> Result<ReadyEmbedder, EngineError> {
    let started = std::time::Instant::now();
    let (mut model, info) = SentenceEmbedder::load(dir, device)?;
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), info.max_input_tokens)?;
    let warm = model.embed(&[tokenizer.minimal()?])?;
    if warm.first().map(Vec::len) != Some(info.dimension) {
        warn!(model = %name, "warm-up returned an unexpected width");
    }
    info!(
        model = %name,
        dimension = info.dimension,
        max_input_tokens = info.max_input_tokens,
        normalize = info.normalize,
        pooling = ?info.pooling,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "embedding model loaded and warmed"
    );
    let engine = EmbedEngine::spawn(name, model).map_err(|e| EngineError::load(dir, e))?;
    Ok(ReadyEmbedder { engine, tokenizer, info })
}

impl Embedder for SentenceEmbedder {
    fn embed(&mut self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match &self.encoder {
            Encoder::Packed(bert) => {
                let seqs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
                let hidden = bert.forward(&seqs)?;
                Ok(pool_packed(&hidden, batch, bert.config.hidden_size, self.pooling))
            }
            Encoder::Device { bert, device } => {
                let seqs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
                let hidden = bert.forward_packed(&seqs, device)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(pool_packed(&hidden, batch, bert.config.hidden_size, self.pooling))
            }
            Encoder::Padded { bert, device, pad_id } => embed_padded(bert, device, *pad_id, batch, self.pooling),
        }
    }
}

/// Pools each sequence's own rows of the packed hidden states (`[total, width]`).
fn pool_packed(hidden: &[f32], batch: &[Vec<u32>], width: usize, pooling: Pooling) -> Vec<Vec<f32>> {
    let mut start = 0;
    batch
        .iter()
        .map(|seq| {
            let rows = &hidden[start * width..(start + seq.len()) * width];
            start += seq.len();
            let n = seq.len().max(1) as f32;
            match pooling {
                Pooling::Cls => rows[..width].to_vec(),
                Pooling::Max => rows.chunks_exact(width).fold(vec![f32::NEG_INFINITY; width], |mut m, r| {
                    m.iter_mut().zip(r).for_each(|(m, &v)| *m = m.max(v));
                    m
                }),
                Pooling::Mean | Pooling::MeanSqrtLen => {
                    let mut sum = vec![0f32; width];
                    for r in rows.chunks_exact(width) {
                        sum.iter_mut().zip(r).for_each(|(s, &v)| *s += v);
                    }
                    let d = if pooling == Pooling::Mean { n } else { n.sqrt() };
                    sum.iter_mut().for_each(|s| *s /= d);
                    sum
                }
            }
        })
        .collect()
}

/// candle's path: a padded `[batch, longest]` batch with its attention mask.
fn embed_padded(
    bert: &Bert,
    device: &Device,
    pad_id: u32,
    batch: &[Vec<u32>],
    pooling: Pooling,
) -> Result<Vec<Vec<f32>>, EngineError> {
    let len = batch.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(batch.len() * len);
    let mut mask = Vec::with_capacity(batch.len() * len);
    for seq in batch {
        ids.extend_from_slice(seq);
        ids.extend(std::iter::repeat_n(pad_id, len - seq.len()));
        mask.extend(std::iter::repeat_n(1f32, seq.len()));
        mask.extend(std::iter::repeat_n(0f32, len - seq.len()));
    }
    let ids = Tensor::from_vec(ids, (batch.len(), len), device)?;
    let mask = Tensor::from_vec(mask, (batch.len(), len), device)?;
    let hidden = bert.forward(&ids, &mask)?;
    let pooled = match pooling {
        Pooling::Mean => mean_pool(&hidden, &mask)?,
        Pooling::Cls => cls_pool(&hidden)?,
        Pooling::Max => max_pool(&hidden, &mask)?,
        Pooling::MeanSqrtLen => {
            let m = mask.unsqueeze(2)?;
            let sum = hidden.broadcast_mul(&m)?.sum(1)?;
            sum.broadcast_div(&m.sum(1)?.sqrt()?)?
        }
    };
    Ok(pooled.to_dtype(DType::F32)?.to_vec2()?)
}
