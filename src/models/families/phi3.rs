//! The phi3 family's switches on the shared decoder.
use std::collections::HashMap;

use candle_core::Result;
use candle_core::quantized::gguf_file::Value;

use super::LlamaConfig;

/// Phi-3: NeoX RoPE; fused QKV and gate-up weights are found by name. Its sliding window is ignored, as
/// llama.cpp ignores it; the 128k models' LongRoPE factors are refused at load.
pub(super) fn switches(_: &HashMap<String, Value>, c: &mut LlamaConfig) -> Result<()> {
    c.rope_neox = true;
    Ok(())
}
