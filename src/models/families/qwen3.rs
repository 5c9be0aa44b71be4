//! The qwen3 family's switches on the shared decoder.
use std::collections::HashMap;

use candle_core::Result;
use candle_core::quantized::gguf_file::Value;

use super::LlamaConfig;

/// Qwen 3: NeoX RoPE and per-head Q/K RMSNorm.
pub(super) fn switches(_: &HashMap<String, Value>, c: &mut LlamaConfig) -> Result<()> {
    c.rope_neox = true;
    c.qk_norm = true;
    Ok(())
}
