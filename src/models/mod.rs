//! Model architectures as plain structs with a constructor from weights and a `forward`, like candle's:
//! the decoders of GGUF files (`llama` serves every decoder family on our CPU kernels, `llama_device` on
//! candle's ops for any device) and the BERT encoders (`bert` on
//! candle, `bert_packed` on our kernels). Which families exist, and what each switches on, is
//! [`families`]' tables. Weights are immutable; anything per request is an argument. The kernels under
//! them live in [`kernels`].
pub mod bert;
pub mod bert_packed;
pub mod families;
pub mod kernels;
pub mod llama;
pub mod llama_device;
