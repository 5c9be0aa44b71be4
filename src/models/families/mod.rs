//! The one place that knows model families: `general.architecture` of a GGUF file to the switches that
//! family turns on in the shared decoder ([`super::llama`]), and `model_type` of an encoder's `config.json`
//! to the check that admits it to the shared BERT encoder. A new family is one file here and one line in
//! a table; anything not in a table is refused at load, naming it and the supported list.
use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::{Result, bail};

use super::bert::BertConfig;

mod bert;
mod gemma3;
mod phi3;
mod qwen2;
mod qwen3;

/// What a decoder family's entry does: switch its features on in the config, from the file's metadata.
pub type Switches = fn(&HashMap<String, Value>, &mut LlamaConfig) -> Result<()>;

/// The decoder families, by `general.architecture`. Plain llama (Llama 2/3.x, Mistral, TinyLlama, SmolLM)
/// switches nothing on: the common reading below covers it, RoPE scaling and `rope_freqs` included.
pub const DECODERS: &[(&str, Switches)] = &[
    ("llama", |_, _| Ok(())),
    ("qwen2", qwen2::switches),
    ("qwen3", qwen3::switches),
    ("phi3", phi3::switches),
    ("gemma3", gemma3::switches),
];

/// What an encoder family's entry does: refuse a `config.json` the shared encoder would run wrongly.
pub type EncoderCheck = fn(&BertConfig) -> std::result::Result<(), String>;

/// The encoder families, by `config.json` `model_type` (a file without one is taken as BERT, as
/// sentence-transformers' older exports are).
pub const ENCODERS: &[(&str, EncoderCheck)] = &[("bert", bert::check)];

/// Admits an encoder's config through its family's entry, or says which families there are.
pub fn check_encoder(config: &BertConfig) -> std::result::Result<(), String> {
    let kind = config.model_type.as_deref().unwrap_or("bert");
    match ENCODERS.iter().find(|(k, _)| *k == kind) {
        Some((_, check)) => check(config),
        None => {
            let known: Vec<&str> = ENCODERS.iter().map(|(k, _)| *k).collect();
            Err(format!("model_type {kind:?} is not supported (supported: {})", known.join(", ")))
        }
    }
}

/// The feed-forward activation of the gated FFN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU(gate) * up (llama, Qwen, Mistral, Phi-3).
    Silu,
    /// GELU, tanh approximation, of the gate, times up (Gemma's GeGLU).
    GeluTanh,
}

/// Hyper-parameters from the GGUF metadata (`<architecture>.*`) and the architecture's switches.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub rope_base: f32,
    pub rope_dims: usize,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
    /// RoPE rotates the halves of each head (GPT-NeoX) instead of adjacent pairs.
    pub rope_neox: bool,
    /// Per layer: the sliding window (a row sees only the last `w` positions, itself included).
    pub window: Vec<Option<usize>>,
    /// RoPE base of the sliding-window layers.
    pub rope_base_swa: f32,
    /// Per-head RMSNorm of queries and keys before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before each residual add (`post_attention_norm`,
    /// `post_ffw_norm`).
    pub post_norms: bool,
    /// The embedding rows are multiplied by this (Gemma: sqrt of the width).
    pub embed_scale: Option<f32>,
    pub activation: Activation,
    /// Linear RoPE scaling: every angle times this (1 / `rope.scaling.factor`).
    pub rope_freq_scale: f32,
}

fn md<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key).ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata has no {key}")))
}

impl LlamaConfig {
    pub fn from_metadata(m: &HashMap<String, Value>) -> Result<Self> {
        let arch = md(m, "general.architecture")?.to_string()?.clone();
        let Some(&(_, switches)) = DECODERS.iter().find(|(a, _)| *a == arch) else {
            let known: Vec<&str> = DECODERS.iter().map(|(a, _)| *a).collect();
            bail!("general.architecture {arch:?} is not supported (supported: {})", known.join(", "));
        };
        let u = |k: &str| -> Result<usize> { Ok(md(m, &format!("{arch}.{k}"))?.to_u32()? as usize) };
        let n_embd = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let n_kv_head = u("attention.head_count_kv").unwrap_or(n_head);
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            bail!("inconsistent heads: {n_head} heads, {n_kv_head} kv heads");
        }
        let head_dim = u("attention.key_length").unwrap_or(n_embd / n_head);
        if u("attention.value_length").unwrap_or(head_dim) != head_dim {
            bail!("{arch}: keys and values of different widths are not supported");
        }
        let n_layer = u("block_count")?;
        let mut cfg = Self {
            arch: arch.clone(),
            n_layer,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            n_ff: u("feed_forward_length")?,
            rope_base: m.get(&format!("{arch}.rope.freq_base")).map(|v| v.to_f32()).transpose()?.unwrap_or(10_000.0),
            rope_dims: u("rope.dimension_count").unwrap_or(head_dim),
            rms_eps: md(m, &format!("{arch}.attention.layer_norm_rms_epsilon"))?.to_f32()?,
            context_length: u("context_length")?,
            vocab_size: 0,
            rope_neox: false,
            window: vec![None; n_layer],
            rope_base_swa: 10_000.0,
            qk_norm: false,
            post_norms: false,
            embed_scale: None,
            activation: Activation::Silu,
            rope_freq_scale: 1.0,
        };
        if let Some(kind) = m.get(&format!("{arch}.rope.scaling.type")) {
            let kind = kind.to_string()?;
            match kind.as_str() {
                "none" => {}
                // ggml: every angle times 1 / factor.
                "linear" => {
                    let factor = md(m, &format!("{arch}.rope.scaling.factor"))?.to_f32()?;
                    if factor.is_nan() || factor <= 0.0 {
                        bail!("{arch}.rope.scaling.factor {factor} is not positive");
                    }
                    cfg.rope_freq_scale = 1.0 / factor;
                }
                _ => bail!("{arch}.rope.scaling.type {kind:?} is not supported yet (supported: none, linear)"),
            }
        }
        if cfg.rope_dims > head_dim || !cfg.rope_dims.is_multiple_of(2) {
            bail!("rope.dimension_count {} for heads of {head_dim}", cfg.rope_dims);
        }
        switches(m, &mut cfg)?;
        Ok(cfg)
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(arch: &str, extra: &[(&str, Value)]) -> HashMap<String, Value> {
        let mut m = HashMap::new();
        m.insert("general.architecture".to_string(), Value::String(arch.to_string()));
        for (k, v) in [
            ("embedding_length", 64u32),
            ("attention.head_count", 4),
            ("block_count", 2),
            ("feed_forward_length", 128),
            ("context_length", 256),
        ] {
            m.insert(format!("{arch}.{k}"), Value::U32(v));
        }
        m.insert(format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-6));
        for (k, v) in extra {
            m.insert(format!("{arch}.{k}"), v.clone());
        }
        m
    }

    #[test]
    fn unsupported_files_are_refused_by_name() {
        let err = LlamaConfig::from_metadata(&metadata("falcon", &[])).unwrap_err().to_string();
        assert!(
            err.contains(
                "general.architecture \"falcon\" is not supported (supported: llama, qwen2, qwen3, phi3, gemma3)"
            ),
            "{err}"
        );
        let yarn = [("rope.scaling.type", Value::String("yarn".into()))];
        let err = LlamaConfig::from_metadata(&metadata("llama", &yarn)).unwrap_err().to_string();
        assert!(
            err.contains("llama.rope.scaling.type \"yarn\" is not supported yet (supported: none, linear)"),
            "{err}"
        );
        let heads = [("attention.head_count_kv", Value::U32(3))];
        let err = LlamaConfig::from_metadata(&metadata("qwen2", &heads)).unwrap_err().to_string();
        assert!(err.contains("4 heads, 3 kv heads"), "{err}");
    }

    #[test]
    fn architectures_switch_on_their_features() {
        let c = LlamaConfig::from_metadata(&metadata("llama", &[])).unwrap();
        assert!(!c.rope_neox && !c.qk_norm && c.window.iter().all(Option::is_none) && c.head_dim == 16);
        let linear = [("rope.scaling.type", Value::String("linear".into())), ("rope.scaling.factor", Value::F32(4.0))];
        assert_eq!(LlamaConfig::from_metadata(&metadata("llama", &linear)).unwrap().rope_freq_scale, 0.25);
        let q3 = LlamaConfig::from_metadata(&metadata("qwen3", &[("attention.key_length", Value::U32(32))])).unwrap();
        assert!(q3.rope_neox && q3.qk_norm && q3.head_dim == 32);
        let g =
            LlamaConfig::from_metadata(&metadata("gemma3", &[("attention.sliding_window", Value::U32(512))])).unwrap();
        assert_eq!(g.activation, Activation::GeluTanh);
        assert_eq!(g.embed_scale, Some(8.0));
        // Five sliding-window layers in six: with two layers, both are local.
        assert_eq!(g.window, vec![Some(512), Some(512)]);
    }

    fn bert_config(extra: serde_json::Value) -> BertConfig {
        let mut c = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16, "hidden_act": "gelu", "max_position_embeddings": 16,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12
        });
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(c).unwrap()
    }

    #[test]
    fn encoders_are_admitted_by_model_type() {
        assert_eq!(check_encoder(&bert_config(serde_json::json!({}))), Ok(()));
        assert_eq!(check_encoder(&bert_config(serde_json::json!({"model_type": "bert"}))), Ok(()));
        let err = check_encoder(&bert_config(serde_json::json!({"model_type": "xlm-roberta"}))).unwrap_err();
        assert_eq!(err, "model_type \"xlm-roberta\" is not supported (supported: bert)");
        let rel = serde_json::json!({"position_embedding_type": "relative_key"});
        let err = check_encoder(&bert_config(rel)).unwrap_err();
        assert!(err.contains("position_embedding_type \"relative_key\""), "{err}");
    }
}
