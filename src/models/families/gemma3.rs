//! The gemma3 family's switches on the shared decoder.
use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::{Result, bail};

use super::{Activation, LlamaConfig};

/// Gemma 3: GeGLU, NeoX RoPE, Q/K norms, post-norms, embeddings scaled by sqrt(width), and sliding-window
/// layers (five in six, base 10,000) between global ones, as llama.cpp's `llama_model_gemma3` reads them.
pub(super) fn switches(m: &HashMap<String, Value>, c: &mut LlamaConfig) -> Result<()> {
    c.activation = Activation::GeluTanh;
    c.rope_neox = true;
    c.qk_norm = true;
    c.post_norms = true;
    c.embed_scale = Some((c.n_embd as f32).sqrt());
    if let Some(w) = m.get("gemma3.attention.sliding_window").map(|v| v.to_u32()).transpose()?.filter(|&w| w > 0) {
        let pattern = m.get("gemma3.attention.sliding_window_pattern").map(|v| v.to_u32()).transpose()?.unwrap_or(6);
        let pattern = pattern as usize;
        c.window =
            (0..c.n_layer).map(|il| (pattern == 0 || il % pattern < pattern - 1).then_some(w as usize)).collect();
        c.rope_base_swa = m.get("gemma3.rope.freq_base_swa").map(|v| v.to_f32()).transpose()?.unwrap_or(10_000.0);
    }
    if m.contains_key("gemma3.final_logit_softcapping") {
        bail!("gemma3 with final_logit_softcapping is not supported yet");
    }
    Ok(())
}
