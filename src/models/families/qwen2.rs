//! The qwen2 family's switches on the shared decoder.
use std::collections::HashMap;

use candle_core::Result;
use candle_core::quantized::gguf_file::Value;

use super::LlamaConfig;

/// Qwen 2 / 2.5: NeoX RoPE; the Q, K and V biases are read wherever a file has them.
pub(super) fn switches(_: &HashMap<String, Value>, c: &mut LlamaConfig) -> Result<()> {
    c.rope_neox = true;
    Ok(())
}
